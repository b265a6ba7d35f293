"""One exception family for every user-facing failure.

The CLI prints ``seme: error: <message>`` (one line) and exits with ``exit_code``; no traceback
unless ``--debug``. Messages name the file, tensor or object a person has to act on.
"""

from __future__ import annotations

import re

_URL_USERINFO = re.compile(r"(//)[^/@\s'\"]*@")


def redact_url(text: str) -> str:
    """``text`` with the ``user:password@`` part of every URL in it masked (``//***@``)."""
    return _URL_USERINFO.sub(r"\1***@", text)


class SemeError(Exception):
    """Base of every error a user can act on."""

    exit_code = 1


class ConfigError(SemeError):
    """Invalid merge config, policy or parameter."""

    exit_code = 2


class CheckpointError(SemeError):
    """Missing, corrupt, truncated or incompatible checkpoint, or a bad tensor (NaN/Inf, shape)."""


class OutputError(SemeError):
    """Output directory exists, is not writable, or could not be completed."""


class StorageError(SemeError):
    """Object storage: missing object, checksum mismatch, unsafe key, unreachable endpoint."""


class RegistryError(SemeError):
    """MLflow tracking/registry failure or a refused alias move."""


class AlignmentError(SemeError):
    """SeMe alignment cannot be computed (singular/NaN head, no shared vocabulary, ...)."""


class EvalError(SemeError):
    """Evaluation: unknown suite/task, missing tokenizer, not a causal LM."""


class PipelineError(SemeError):
    """Kubeflow pipeline compile/run/schedule failure."""
