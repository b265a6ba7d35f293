"""seme's Python API: what the CLI runs, callable from Python (``import seme; seme.merge(...)``).

Every function takes what its ``seme`` subcommand takes and raises a ``seme.errors.SemeError``
subclass for anything a user can act on. Heavy modules (torch, transformers) load on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def _config(config: Any):
    from seme.config import MergeConfig, load_config

    if isinstance(config, MergeConfig):
        return config, None
    if isinstance(config, dict):
        return load_config(config), None
    return load_config(config), str(config)


def merge(config: str | os.PathLike | dict | Any, out_dir: str | os.PathLike, *, alignment: str | None = None,
          device: str = "cpu", overwrite: bool = False, allow_pickle: bool = False,
          progress: bool = False) -> Any:
    """Merge per ``config`` (a YAML path, a dict in the same schema, or a ``MergeConfig``) into the
    Hugging Face checkpoint directory ``out_dir``; returns a ``seme.merge.MergeResult`` (``out_dir``,
    ``manifest``, ``seconds``, ``tensors`` …). The output appears only once complete."""
    from seme.merge import run_merge

    cfg, path = _config(config)
    return run_merge(cfg, out_dir, alignment=alignment, device=device, overwrite=overwrite,
                     allow_pickle=allow_pickle, progress=progress, config_path=path)


def align(config: str | os.PathLike, out_dir: str | os.PathLike, *, device: str = "cpu",
          overwrite: bool = False, allow_pickle: bool = False) -> Path:
    """Compute the SeMe alignment artifact for a ``merge_method: seme`` config (data-free); returns
    the artifact directory, to pass as ``alignment=`` to :func:`merge`."""
    from seme.semantic.alignment import align as _align

    return _align(config, out_dir, device=device, overwrite=overwrite, allow_pickle=allow_pickle)


def evaluate(model_dir: str | os.PathLike, suite: str | None = None, *, tasks: list[str] | None = None,
             zoo_dir: str | None = None, device: str = "cpu", batch_size: int = 64, limit: int | None = None,
             progress: bool = False, task_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Evaluate the checkpoint ``model_dir`` on task suite ``suite`` (``tiny``, ``zoo`` …) or on a task
    file (``task_file``: ``seme eval --tasks``); ``tasks`` keeps only those tasks. Returns the metrics
    dict that ``seme eval --out`` writes and ``seme gate`` reads."""
    from seme.evaluation import evaluate as _evaluate

    return _evaluate(str(model_dir), suite, tasks=tasks, zoo_dir=zoo_dir, device=device, batch_size=batch_size,
                     limit=limit, progress=progress, task_file=task_file)


def validate(config: str | os.PathLike | dict | Any, *, allow_pickle: bool = False) -> dict[str, Any]:
    """Check a merge config without merging: parse it, resolve every model reference (local,
    ``s3://``, Hub id, adapter), check architectures, layer ranges and tensor shapes, and build the
    output vocabulary when a tokenizer source asks for one. Returns a summary of the planned output;
    raises ``ConfigError`` / ``CheckpointError`` on the first problem."""
    from seme import methods
    from seme.merge import open_layout

    cfg, _ = _config(config)
    spec = methods.get(cfg.merge_method)
    layout = open_layout(cfg, spec, allow_pickle=allow_pickle)
    try:
        anchor = layout.anchor
        for name in anchor.names:  # every output tensor resolves to inputs of one shape
            shape = anchor.shape(name)
            for ck in [*layout.sources, *([layout.base] if layout.base is not None else [])]:
                if name in ck and ck.shape(name) != shape:
                    from seme.errors import CheckpointError

                    raise CheckpointError(f"tensor {name}: shape {list(ck.shape(name))} in {ck.path} does not "
                                          f"match {list(shape)} in {anchor.path}")
        arch = anchor.architecture
        return {
            "valid": True,
            "merge_method": spec.name,
            "models": [{"model": ref, "path": str(getattr(ck, "hashed_path", ck.path)),
                        "architecture": ck.architecture.family, "layers": ck.architecture.num_layers}
                       for ref, ck in layout.refs],
            "output": {"architecture": arch.family, "layers": arch.num_layers, "tensors": len(anchor.names),
                       "vocab_size": layout.config.get("vocab_size")},
        }
    finally:
        for ck in layout.opened.values() or [ck for _, ck in layout.refs]:
            ck.close()
