"""Model references: what a config may name as a model, and how each becomes a checkpoint.

- a local checkpoint directory;
- ``s3://bucket/prefix`` (fetched, verified and cached by ``seme.storage.fetch``);
- a Hugging Face repo id ``org/name`` or ``org/name@revision``, resolved by ``huggingface_hub``
  from the local cache (and from the Hub when it is reachable and ``HF_HUB_OFFLINE`` is not set);
- ``base+adapter`` (mergekit's syntax), each side any of the above, or a PEFT adapter directory
  alone (its base from ``adapter_config.json``'s ``base_model_name_or_path``).

A LoRA adapter is applied on the fly, tensor by tensor, as ``W + scale * B @ A`` in the
checkpoint view (:class:`AdapterCheckpoint`): the merged model is never written to disk. The
arithmetic is peft's ``merge_and_unload`` (float32 delta ``(B @ A) * scale``, added to ``W`` in
its dtype), so the tensors are the same.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any

from seme.errors import CheckpointError

ADAPTER_CONFIG = "adapter_config.json"
_HF_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+(@[\w.\-/]+)?$")
_HF_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken"]


def is_hub_id(ref: str) -> bool:
    """``org/name[@revision]`` that is not an existing local path."""
    return bool(_HF_ID.match(ref)) and not Path(ref).expanduser().exists() and not ref.startswith((".", "~"))


def hub_snapshot(ref: str) -> Path:
    """The local snapshot directory of Hugging Face repo ``org/name[@revision]``."""
    repo, _, revision = ref.partition("@")
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError:  # pragma: no cover - a dependency of transformers
        raise CheckpointError(f"{ref}: resolving Hugging Face repo ids needs huggingface_hub") from None
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    try:
        path = snapshot_download(
            repo_id=repo, revision=revision or None, allow_patterns=_HF_PATTERNS,
            cache_dir=os.environ.get("HF_HUB_CACHE") or None, local_files_only=offline,
        )
    except (LocalEntryNotFoundError, FileNotFoundError):
        where = "offline (HF_HUB_OFFLINE=1)" if offline else "and the Hub cannot be reached"
        what = "that revision of the Hugging Face repo" if revision else "a Hugging Face repo"
        raise CheckpointError(
            f"{ref}: no such checkpoint directory, and {what} not in the local Hugging Face cache {where}"
        ) from None
    except RevisionNotFoundError:
        raise CheckpointError(f"{ref}: revision {revision!r} not found on the Hugging Face Hub") from None
    except (RepositoryNotFoundError, GatedRepoError) as e:
        raise CheckpointError(f"{ref}: Hugging Face repo not found or not accessible ({type(e).__name__})") from None
    except OSError as e:
        raise CheckpointError(f"{ref}: cannot fetch from the Hugging Face Hub ({e})") from None
    return Path(path)


def local_dir(ref: str) -> Path:
    """A local directory for a plain reference (no ``+adapter``): local, s3:// or Hub."""
    if ref.startswith("s3://"):
        from seme.storage import fetch  # heavy (boto3): only when needed

        return Path(fetch(ref))
    p = Path(ref).expanduser()
    if p.exists() or not is_hub_id(ref):
        return p
    return hub_snapshot(ref)


def split_adapter(ref: str) -> tuple[str, str | None]:
    """``base+adapter`` -> (base, adapter); a reference without ``+`` (or an existing path with one)
    -> (ref, None)."""
    if "+" not in ref or Path(ref).expanduser().exists():
        return ref, None
    base, _, adapter = ref.rpartition("+")
    return base, adapter


def open_ref(ref: str, allow_pickle: bool = False):
    """A checkpoint (or an :class:`AdapterCheckpoint` view) for any model reference."""
    from seme.checkpoint import Checkpoint

    base_ref, adapter_ref = split_adapter(str(ref))
    path = local_dir(base_ref)
    if adapter_ref is None:
        if (path / ADAPTER_CONFIG).is_file() and not (path / "config.json").is_file():
            base_of = _adapter_config(path).get("base_model_name_or_path")
            if not base_of:
                raise CheckpointError(f"{path / ADAPTER_CONFIG}: no base_model_name_or_path; give 'base+adapter'")
            return AdapterCheckpoint(open_ref(base_of, allow_pickle), path, f"{base_of}+{ref}")
        return Checkpoint(path, allow_pickle=allow_pickle)
    adapter = local_dir(adapter_ref)
    if not (adapter / ADAPTER_CONFIG).is_file():
        raise CheckpointError(f"{adapter}: not a PEFT adapter (no {ADAPTER_CONFIG})")
    return AdapterCheckpoint(Checkpoint(path, allow_pickle=allow_pickle), adapter, str(ref))


def _adapter_config(path: Path) -> dict[str, Any]:
    try:
        return json.loads((path / ADAPTER_CONFIG).read_text())
    except (ValueError, OSError) as e:
        raise CheckpointError(f"{path / ADAPTER_CONFIG}: cannot read ({e})") from None


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """peft's ``rank_pattern`` / ``alpha_pattern`` lookup: a key matching the module name's end."""
    for key, val in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return val
    return default


class _AdapterTensors:
    """The (small) tensors of an adapter directory, loaded whole."""

    def __init__(self, path: Path) -> None:
        self.files = sorted(path.glob("adapter_model*.safetensors"))
        if not self.files:
            bins = sorted(path.glob("adapter_model*.bin"))
            raise CheckpointError(
                f"{bins[0]}: pickle adapter refused; save it with safetensors" if bins
                else f"{path}: no adapter_model.safetensors"
            )
        from safetensors.torch import load_file

        self.t: dict[str, Any] = {}
        for f in self.files:
            try:
                self.t.update(load_file(str(f)))
            except Exception as e:  # noqa: BLE001 - any read failure is one line about the file
                raise CheckpointError(f"{f}: cannot read adapter tensors ({e})") from None
        self.names = list(self.t)

    def __contains__(self, name: str) -> bool:
        return name in self.t

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.t[name].shape)

    def view(self, name: str):
        return self.t[name]

    def get(self, name: str):
        return self.t[name].clone()

    def close(self) -> None:
        self.t.clear()


class AdapterCheckpoint:
    """A base checkpoint with a PEFT LoRA adapter applied on the fly (read-only view).

    Untouched tensors are the base's own (zero-copy); each LoRA target ``W`` is computed when it is
    read, as ``W + scale * B @ A``; ``modules_to_save`` tensors replace the base's.
    """

    def __init__(self, base: Any, adapter_dir: Path, label: str) -> None:
        self.base = base
        self.adapter_dir = Path(adapter_dir)
        self.label = label
        self.config = base.config
        self.path = base.path  # tokenizer and side files come from the base
        conf = _adapter_config(self.adapter_dir)
        ptype = str(conf.get("peft_type", "LORA")).upper()
        if ptype != "LORA":
            raise CheckpointError(f"{self.adapter_dir}: peft_type {ptype}: seme applies LoRA adapters only")
        if conf.get("use_dora"):
            raise CheckpointError(f"{self.adapter_dir}: DoRA adapters: seme cannot honour use_dora")
        self.ad = _AdapterTensors(self.adapter_dir)
        self.fan_in_fan_out = bool(conf.get("fan_in_fan_out"))
        r0, alpha0 = conf.get("r", 8), conf.get("lora_alpha", 8)
        self.targets: dict[str, tuple[str, str, float]] = {}  # base name -> (A name, B name, scale)
        self.replaced: dict[str, str] = {}  # base name -> adapter name (modules_to_save)
        for n in self.ad.names:
            m = re.match(r"^(?:base_model\.model\.)?(.*)\.lora_A(?:\.[\w-]+)?\.weight$", n)
            if m:
                module = m.group(1)
                bname = n.replace(".lora_A.", ".lora_B.")
                if bname not in self.ad:
                    raise CheckpointError(f"{self.adapter_dir}: {n} has no matching lora_B")
                alpha = _pattern_value(conf.get("alpha_pattern"), module, alpha0)
                rank = _pattern_value(conf.get("rank_pattern"), module, r0)
                scale = alpha / math.sqrt(rank) if conf.get("use_rslora") else alpha / rank
                self.targets[f"{module}.weight"] = (n, bname, scale)
            elif ".lora_B" in n:
                continue
            elif re.search(r"lora_(embedding_)?[AB]|lora_magnitude|\.lora_", n):
                raise CheckpointError(f"{self.adapter_dir}: tensor {n}: seme cannot honour this adapter part")
            else:
                target = re.sub(r"^base_model\.model\.", "", n).replace(".modules_to_save.default", "")
                self.replaced[target] = n
        self.names = list(base.names)
        for name, (a, b, _) in self.targets.items():
            if name not in base:
                raise CheckpointError(
                    f"adapter {self.adapter_dir} does not match base {base.path}: the base has no tensor {name}"
                )
            out_f, in_f = base.shape(name)[:2] if not self.fan_in_fan_out else base.shape(name)[1::-1]
            if self.ad.shape(b)[0] != out_f or self.ad.shape(a)[1] != in_f:
                raise CheckpointError(
                    f"adapter {self.adapter_dir} does not match base {base.path}: {name} is "
                    f"{list(base.shape(name))}, the adapter's B @ A is "
                    f"[{self.ad.shape(b)[0]}, {self.ad.shape(a)[1]}]"
                )
        for name, n in self.replaced.items():
            if name not in base or base.shape(name) != self.ad.shape(n):
                raise CheckpointError(
                    f"adapter {self.adapter_dir} does not match base {base.path}: tensor {name}"
                )
        self.computed = {n: None for n in [*self.targets, *self.replaced]}

    @property
    def files(self) -> list[Path]:
        return [*self.base.files, *self.ad.files, self.adapter_dir / ADAPTER_CONFIG]

    @property
    def hashed_path(self) -> Path:
        return self.adapter_dir

    @property
    def architecture(self):
        return self.base.architecture

    def __contains__(self, name: str) -> bool:
        return name in self.base

    def source(self, name: str) -> tuple[Any, str]:
        return (self, name) if name in self.computed else (self.base, name)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.base.shape(name)

    def st_dtype(self, name: str) -> str:
        return self.base.st_dtype(name)

    def dtype(self, name: str):
        return self.base.dtype(name)

    def nbytes(self, name: str) -> int:
        return self.base.nbytes(name)

    def file_of(self, name: str) -> Path:
        return self.base.file_of(name)

    def get(self, name: str):
        if name in self.replaced:
            return self.ad.get(self.replaced[name]).to(self.base.dtype(name))
        if name not in self.targets:
            return self.base.get(name)
        from seme.lazy import torch

        a, b, scale = self.targets[name]
        w = self.base.view(name)
        delta = self.ad.view(b).float() @ self.ad.view(a).float()
        if self.fan_in_fan_out:
            delta = delta.T
        delta = delta * scale
        if w.dtype == torch.float32:
            return w + delta
        return (w.float() + delta).to(w.dtype)

    def view(self, name: str):
        return self.get(name) if name in self.computed else self.base.view(name)

    def array(self, name: str):
        return None if name in self.computed else self.base.array(name)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        self.base.release(name, rows)

    def release_entries(self, name: str, lo: int, hi: int) -> None:
        self.base.release_entries(name, lo, hi)

    def prefetch(self, name: str) -> None:
        self.base.prefetch(name)

    def close(self) -> None:
        self.base.close()
        self.ad.close()
