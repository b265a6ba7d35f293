"""How the output's tensors map onto the inputs: mergekit's ``slices`` / ``modules`` / vocabularies.

A ``models:`` config merges tensor ``n`` of every input into tensor ``n`` of the output. A
``slices:`` config (mergekit 0.1.5, plan.py) builds the output layer by layer: output slice ``s``
with sources ``[(model_k, [lo_k, hi_k))]`` yields ``hi - lo`` output layers, output layer ``j`` of the
slice merged from layer ``lo_k + j`` of each source ``k``. Tensors outside the layers come from the
first slice's sources (embeddings) or the last slice's (final norm, LM head), as mergekit plans its
pre- and post-layer weights.

The executor stays unaware of all this: each *position* ``k`` (the k-th source of every slice) is a
:class:`MappedCheckpoint`, a checkpoint-like view whose tensor names are the output's and whose
tensors are the sources' (zero-copy), or computed on the fly (vocabulary permutation). The per-tensor
parameters and depth ``t`` come from :class:`SliceResolver`, with mergekit's precedence: the
source's own parameters, then the slice's, the module's, the global ones, the method's defaults.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seme.architectures import Architecture, resolve
from seme.checkpoint import ITEMSIZE, Checkpoint
from seme.config import MergeConfig, SliceDef, evaluate
from seme.errors import CheckpointError, ConfigError

LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
_POST_KINDS = frozenset({"final_norm", "lm_head"})


class MappedCheckpoint:
    """A read-only checkpoint view: output names -> ``(checkpoint, source name)``, or computed.

    It offers what the executor calls on a :class:`~seme.checkpoint.Checkpoint`. A computed tensor
    (``computed[name] = (fn, code, shape)``) has no raw bits (``array`` is None), so the executor
    takes its torch path for that merge.
    """

    def __init__(self, entries: dict[str, tuple[Checkpoint, str]], config: dict[str, Any], label: str,
                 computed: dict[str, tuple[Callable[[], Any], str, tuple[int, ...]]] | None = None) -> None:
        self.entries = entries
        self.config = config
        self.path = Path(label)
        self.computed = computed or {}
        self.names = list(entries)
        self._arch: Architecture | None = None

    @property
    def files(self) -> list[Path]:
        return sorted({f for ck, _ in self.entries.values() for f in ck.files})

    @property
    def architecture(self) -> Architecture:
        if self._arch is None:
            self._arch = resolve(self.config, str(self.path))
        return self._arch

    def source(self, name: str) -> tuple[Checkpoint, str]:
        return self.entries[self._check(name)]

    def _check(self, name: str) -> str:
        if name not in self.entries:
            raise CheckpointError(f"{self.path}: tensor {name} not found")
        return name

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def shape(self, name: str) -> tuple[int, ...]:
        if name in self.computed:
            return self.computed[name][2]
        ck, n = self.source(name)
        return ck.shape(n)

    def st_dtype(self, name: str) -> str:
        if name in self.computed:
            return self.computed[name][1]
        ck, n = self.source(name)
        return ck.st_dtype(n)

    def dtype(self, name: str):
        from seme.checkpoint import torch_dtype

        return torch_dtype(self.st_dtype(name))

    def nbytes(self, name: str) -> int:
        n = 1
        for s in self.shape(name):
            n *= s
        return n * ITEMSIZE.get(self.st_dtype(name), 4)

    def file_of(self, name: str) -> Path:
        ck, n = self.source(name)
        return ck.file_of(n)

    def get(self, name: str):
        if name in self.computed:
            return self.computed[name][0]()
        ck, n = self.source(name)
        return ck.get(n)

    def view(self, name: str):
        if name in self.computed:
            return self.computed[name][0]()
        ck, n = self.source(name)
        return ck.view(n)

    def array(self, name: str):
        if name in self.computed:
            return None
        ck, n = self.source(name)
        return ck.array(n)

    def release(self, name: str, rows: tuple[int, int] | None = None) -> None:
        if name in self.entries and name not in self.computed:
            ck, n = self.entries[name]
            ck.release(n, rows)

    def release_entries(self, name: str, lo: int, hi: int) -> None:
        if name in self.entries and name not in self.computed:
            ck, n = self.entries[name]
            ck.release_entries(n, lo, hi)

    def prefetch(self, name: str) -> None:
        if name in self.entries and name not in self.computed:
            ck, n = self.entries[name]
            ck.prefetch(n)

    def close(self) -> None:
        for ck in {id(c): c for c, _ in self.entries.values()}.values():
            ck.close()


def same_source(a: Any, b: Any, name: str) -> bool:
    """Whether checkpoints (or views) ``a`` and ``b`` give the same stored tensor for ``name``: the
    executor then hands both the same tensor object, which is how methods recognise the base."""
    if a is b:
        return True
    if a is None or b is None:
        return False
    sa = a.source(name) if isinstance(a, MappedCheckpoint) else (a, name)
    sb = b.source(name) if isinstance(b, MappedCheckpoint) else (b, name)
    return sa[0] is sb[0] and sa[1] == sb[1]


def rename_layer(name: str, old: int, new: int) -> str:
    """``model.layers.<old>.x`` -> ``model.layers.<new>.x`` (the first ``layers|h|blocks`` index)."""
    parts = name.split(".")
    for i in range(1, len(parts)):
        if parts[i] == str(old) and parts[i - 1] in ("layers", "h", "blocks"):
            parts[i] = str(new)
            return ".".join(parts)
    raise CheckpointError(f"tensor {name}: cannot find its layer index {old}")  # pragma: no cover


def out_config(anchor_config: dict[str, Any], layer_types: list[Any]) -> dict[str, Any]:
    """The output config.json: the anchor model's, with the output's layer count and, where the
    config lists per-layer types (``layer_types``: sliding or full attention), each output layer's
    type taken from the layer it came from (transformers refuses a list of another length)."""
    cfg = dict(anchor_config)
    for k in LAYER_KEYS:
        if k in cfg:
            cfg[k] = len(layer_types)
            break
    if isinstance(cfg.get("layer_types"), list):
        cfg["layer_types"] = layer_types
    return cfg


@dataclass
class Layout:
    """The executor's inputs for one merge: the positions (``sources``), the base, the anchor
    (names, shapes, config of the output), the ``(reference, checkpoint)`` pairs to hash, and the
    resolver of per-tensor parameters."""

    sources: list[Any]
    base: Any | None
    refs: list[tuple[str, Checkpoint]]
    resolver: Any
    config: dict[str, Any]
    opened: dict[str, Checkpoint] = field(default_factory=dict)
    vocab: Any = None  # seme.vocab.Vocabulary when the vocabularies were re-indexed

    @property
    def anchor(self) -> Any:
        return self.base if self.base is not None else self.sources[0]


class SliceResolver:
    """Per-tensor parameters of a ``slices:`` merge, with mergekit 0.1.5's precedence
    (``ConfigReader.parameter_sources``): every source of the tensor's slice that is the same model
    (in order), the slice's ``parameters``, the module's, the global ones; then the defaults."""

    def __init__(self, cfg: MergeConfig, global_defaults: dict[str, Any], model_defaults: dict[str, Any],
                 where: dict[str, tuple[int, float, int | None]], slices: list[SliceDef],
                 positions: list[MappedCheckpoint]) -> None:
        self.cfg = cfg
        self.global_defaults = global_defaults
        self.model_defaults = model_defaults
        self.where = where  # output name -> (slice index, t, source layer offset)
        self.slices = slices
        self.positions = positions
        self.module = cfg.module_parameters()

    def t_of(self, name: str) -> float:
        return self.where[name][1]

    def _shared(self, s: int) -> list[dict[str, Any]]:
        return [self.slices[s].parameters, self.module, self.cfg.parameters]

    def global_params(self, tensor_name: str, t: float | None = None) -> dict[str, Any]:
        s, t, _ = self.where[tensor_name]
        return _resolve(self.global_defaults, self._shared(s), tensor_name, t)

    def model_params(self, index: int, tensor_name: str, t: float | None = None) -> dict[str, Any]:
        s, t, _ = self.where[tensor_name]
        model = self.slices[s].sources[index].model
        own = [src.parameters for src in self.slices[s].sources if src.model == model]
        src_name = self.positions[index].source(tensor_name)[1]  # mergekit filters on the input's name
        return _resolve(self.model_defaults, [*own, *self._shared(s)], src_name, t)


def _resolve(defaults: dict[str, Any], scopes: list[dict[str, Any]], name: str, t: float) -> dict[str, Any]:
    out = {}
    for k, default in defaults.items():
        v = None
        for scope in scopes:
            if scope and k in scope:
                v = evaluate(scope[k], name, t)
                if v is not None:
                    break
        out[k] = default if v is None else v
    return out


def plan_slices(cfg: MergeConfig, spec: Any, open_ref: Callable[[str], Checkpoint]) -> Layout:
    """The layout of a ``slices:`` (or ``modules:`` with slices) config."""
    slices = cfg.output_slices() or []
    k = max(len(sl.sources) for sl in slices)  # positions; a slice may have fewer sources than k
    for i, sl in enumerate(slices):
        if spec.name == "passthrough" and len(sl.sources) != 1:
            raise ConfigError(f"slices[{i}]: passthrough takes exactly one source per slice, got {len(sl.sources)}")
    cks = {ref: open_ref(ref) for ref in cfg.referenced_models()}
    for i, sl in enumerate(slices):
        for j, src in enumerate(sl.sources):
            n = cks[src.model].architecture.num_layers
            lo, hi = src.layer_range
            if hi > n:
                raise ConfigError(
                    f"slices[{i}].sources[{j}] ({src.model}): layer_range [{lo}, {hi}] is out of bounds; "
                    f"the model has {n} layers (0..{n - 1})"
                )
    first = cks[slices[0].sources[0].model]
    anchor_ref = cfg.base_model or slices[0].sources[0].model
    anchor_ck = cks[anchor_ref]
    total = sum(sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0] for sl in slices)
    if total == 0:
        raise ConfigError("slices: the slices select no layers; the output would have none")
    layer_names = _layer_tensors(cks)
    entries: list[dict[str, tuple[Checkpoint, str]]] = [{} for _ in range(k)]
    base_entries: dict[str, tuple[Checkpoint, str]] = {}
    where: dict[str, tuple[int, float, int | None]] = {}
    base_missing: list[int] = []

    def base_index(s: int) -> int | None:
        ref = slices[s].base_model or cfg.base_model
        for j, src in enumerate(slices[s].sources):
            if ref is not None and src.model == ref:
                return j
        return None

    def add(out: str, s: int, t: float, per_src: list[tuple[Checkpoint, str]], layer: int | None) -> None:
        for pos, e in enumerate(per_src):
            entries[pos][out] = e
        bi = base_index(s)
        if bi is not None and bi < len(per_src):
            base_entries[out] = per_src[bi]
        elif s not in base_missing:
            base_missing.append(s)
        where[out] = (s, t, layer)

    pre = [n for n in first.names if first.architecture.role(n).layer is None
           and first.architecture.role(n).kind not in _POST_KINDS]
    post = [n for n in first.names if first.architecture.role(n).layer is None
            and first.architecture.role(n).kind in _POST_KINDS]
    for n in pre:
        add(n, 0, 0.0, [(_has(cks[src.model], n, src.model), n) for src in slices[0].sources], None)
    out_layer = 0
    types: list[Any] = []
    for s, sl in enumerate(slices):
        span = sl.sources[0].layer_range[1] - sl.sources[0].layer_range[0]
        for j in range(span):
            t = j / (span - 1) if span > 1 else 1.0
            ref_layer = sl.sources[0].layer_range[0] + j
            suffixes = layer_names[sl.sources[0].model][ref_layer]
            for src in sl.sources[1:]:
                other = layer_names[src.model][src.layer_range[0] + j]
                if other != suffixes:
                    raise CheckpointError(
                        f"slices[{s}]: layer {src.layer_range[0] + j} of {src.model} and layer {ref_layer} "
                        f"of {sl.sources[0].model} hold different tensors"
                    )
            for suffix in suffixes:
                per_src = []
                for src in sl.sources:
                    layer = src.layer_range[0] + j
                    name = suffix.replace("{L}", str(layer))
                    per_src.append((cks[src.model], name))
                add(suffixes[suffix].replace("{L}", str(out_layer)), s, t, per_src, j)
            src_types = cks[sl.sources[0].model].config.get("layer_types") or []
            types.append(src_types[ref_layer] if ref_layer < len(src_types) else None)
            out_layer += 1
    last = slices[-1].sources[: len(slices[0].sources)]  # as mergekit pairs them (plan_module)
    for n in post:
        add(n, len(slices) - 1, 0.0, [(_has(cks[src.model], n, src.model), n) for src in last], None)
    _check_shapes(entries, base_entries)
    config = out_config(anchor_ck.config, types)
    label = f"{anchor_ref} (sliced)"
    positions = [MappedCheckpoint(e, config, label) for e in entries]
    base = None
    if spec.needs_base:
        if base_missing:
            s = base_missing[0]
            raise ConfigError(
                f"slices[{s}]: base_model {slices[s].base_model or cfg.base_model} is not one of its sources; "
                f"{spec.name} needs the base among each slice's sources"
            )
        base = MappedCheckpoint(base_entries, config, label)
    elif len(base_entries) == len(entries[0]):  # a base the method may use but does not need
        base = MappedCheckpoint(base_entries, config, label)
    resolver = SliceResolver(cfg, spec.global_params, spec.model_params, where, slices, positions)
    refs = [(r, ck) for r, ck in cks.items()]
    return Layout(positions, base, refs, resolver, config, cks)


def _has(ck: Checkpoint, name: str, ref: str) -> Checkpoint:
    if name not in ck:
        raise CheckpointError(f"{ref}: tensor {name} is missing")
    return ck


def _layer_tensors(cks: dict[str, Checkpoint]) -> dict[str, dict[int, dict[str, str]]]:
    """Per model, per layer: ``{source pattern: output pattern}`` with ``{L}`` for the layer index
    (the same pattern on both sides: a layer's tensors keep their names but for the index)."""
    out: dict[str, dict[int, dict[str, str]]] = {}
    for ref, ck in cks.items():
        layers: dict[int, dict[str, str]] = {}
        arch = ck.architecture
        for n in ck.names:
            layer = arch.role(n).layer
            if layer is None:
                continue
            pat = rename_layer(n, layer, -1).replace(".-1.", ".{L}.")
            layers.setdefault(layer, {})[pat] = pat
        out[ref] = layers
    return out


def _check_shapes(entries: list[dict[str, tuple[Checkpoint, str]]], base: dict[str, tuple[Checkpoint, str]]) -> None:
    for name, (ck0, n0) in entries[0].items():
        shape = ck0.shape(n0)
        for e in [*entries[1:], base]:
            if name not in e:
                continue
            ck, n = e[name]
            if ck.shape(n) != shape:
                raise CheckpointError(
                    f"tensor {name}: shape {list(ck.shape(n))} of {n} in {ck.path} does not match "
                    f"{list(shape)} of {n0} in {ck0.path}"
                )


def same_path(a: str, b: str) -> bool:
    return os.path.abspath(os.path.expanduser(a)) == os.path.abspath(os.path.expanduser(b))
