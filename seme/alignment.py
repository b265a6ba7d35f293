"""Semantics-preservative transformations: bring every source into the anchor's coordinates (§3).

Three function-preserving maps, estimated from weights alone:

1. *Residual rotation* (pure pre-norm families only): R_k = argmin ‖Ŝ_k R_kᵀ − Ŝ_a‖_F over the
   index-aligned tokens (orthogonal Procrustes on the semantic bases). Applied only when some
   ‖R_k − I‖_F ≥ rotation_tol·√d; then every residual norm gain is folded into the read matrices it
   feeds (in *every* model, anchor included) and write matrices get U ← R U, read matrices A ← A Rᵀ.
2. *Unit permutations*: MLP neurons and attention heads (by whole KV groups), matched to the anchor
   with the Hungarian algorithm on −cos_F(write vectors) − cos(read vectors).
3. *Vocabulary mapping* by token string when tokenizers differ (tokenizer files are read only for
   the token strings; without them, equal vocabulary sizes mean the same vocabulary).

:class:`ModelView` applies all of them lazily, one tensor at a time. :func:`compute_alignment` also
runs the Select statistics (σ, semantic Gram matrices of the task vectors per module, §4), so the
artifact holds everything the merge needs besides the checkpoints. :func:`align` writes the artifact
(§7): ``alignment.json``, ``alignment.safetensors``, ``semantic_shift.png``, ``coefficients.png``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seme.architectures import Architecture
from seme.checkpoint import Checkpoint
from seme.errors import AlignmentError, ConfigError
from seme.semantics import (
    SemanticBasis,
    compute_basis,
    effective_readout,
    lapack_one_thread,
    resolve_device,
    spectrum_summary,
    token_subset,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1

#: SeMe's global parameters and defaults (seme-method.md; docs/seme-method.md explains each).
GLOBAL_PARAMS: dict[str, Any] = {
    "select_ratio": 0.1,
    "select_floor": 1e-6,
    "compute": "default",
    "erase": "ties",
    "density": 0.5,
    "scale": 1.0,
    "tokens": 8192,
    "ridge": 1e-6,
    "rotation_tol": 1e-3,
    "perm_identity": 0.99,
    "block_size": 512,
}
MODEL_PARAMS: dict[str, Any] = {"weight": 1.0}
COMPUTE_MODES = ("default", "overlap", "cap")
ERASE_MODES = ("ties", "none")

# Unit layouts: how a (possibly fused) read matrix splits into q/k/v or gate/up row blocks.
_ATTN_READ = {"q": ("q",), "k": ("k",), "v": ("v",), "qkv": ("q", "k", "v")}
_MLP_READ = {"gate": ("gate",), "up": ("up",), "gate_up": ("gate", "up")}
_ROW_KINDS = ("embed", "lm_head", "pos_embed")


# ------------------------------------------------------------------------------------------------
# Settings
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Settings:
    """SeMe's global settings, validated."""

    select_ratio: float = 0.1
    select_floor: float = 1e-6
    compute: str = "default"
    erase: str = "ties"
    density: float = 0.5
    scale: float = 1.0
    tokens: int = 8192
    ridge: float = 1e-6
    rotation_tol: float = 1e-3
    perm_identity: float = 0.99
    block_size: int = 512

    @classmethod
    def from_config(cls, cfg: Any) -> Settings:
        """Read the scalar SeMe parameters of a MergeConfig (unknown keys were rejected by load_config)."""
        raw = dict(GLOBAL_PARAMS)
        for i, m in enumerate(cfg.models):
            extra = sorted(set(m.parameters) - set(MODEL_PARAMS))
            if extra:
                raise ConfigError(
                    f"models[{i}] ({m.model}): SeMe parameter {extra[0]} is global; set it under `parameters`"
                )
        for k, v in (cfg.parameters or {}).items():
            if k in raw:
                if isinstance(v, (list, dict)) and k not in ("scale",):
                    raise ConfigError(f"SeMe parameter {k} must be a scalar, got {v!r}")
                raw[k] = v
        if isinstance(raw["scale"], (list, dict)):
            raw["scale"] = GLOBAL_PARAMS["scale"]  # per-module values are resolved by the merger
        try:
            s = cls(
                select_ratio=float(raw["select_ratio"]),
                select_floor=float(raw["select_floor"]),
                compute=str(raw["compute"]),
                erase=str(raw["erase"]),
                density=float(raw["density"]),
                scale=float(raw["scale"]),
                tokens=int(raw["tokens"]),
                ridge=float(raw["ridge"]),
                rotation_tol=float(raw["rotation_tol"]),
                perm_identity=float(raw["perm_identity"]),
                block_size=int(raw["block_size"]),
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"SeMe parameters: {e}") from None
        if s.compute not in COMPUTE_MODES:
            raise ConfigError(f"SeMe parameter compute={s.compute!r}; valid: {', '.join(COMPUTE_MODES)}")
        if s.erase not in ERASE_MODES:
            raise ConfigError(f"SeMe parameter erase={s.erase!r}; valid: {', '.join(ERASE_MODES)}")
        if not 0.0 < s.density <= 1.0:
            raise ConfigError(f"SeMe parameter density={s.density} must be in (0, 1]")
        if s.select_ratio < 0 or s.select_floor < 0:
            raise ConfigError("SeMe parameters select_ratio and select_floor must be >= 0")
        if s.tokens < 1 or s.block_size < 1:
            raise ConfigError("SeMe parameters tokens and block_size must be >= 1")
        return s


# ------------------------------------------------------------------------------------------------
# Per-checkpoint transforms
# ------------------------------------------------------------------------------------------------


def module_key(role: Any) -> str:
    """The Select/Compute module of a tensor: ``attn.L``, ``mlp.L``, ``embed``, ``head``, ``other[.L]``."""
    if role.module in ("attn", "mlp") and role.layer is not None:
        return f"{role.module}.{role.layer}"
    if role.module in ("embed", "head"):
        return role.module
    return "other" if role.layer is None else f"other.{role.layer}"


class Layout:
    """Name lookups for one architecture: (layer, unit) -> tensor name, and which norm feeds what."""

    def __init__(self, arch: Architecture, names: list[str]) -> None:
        self.arch = arch
        self.by_unit: dict[tuple[int | None, str], str] = {}
        self.kind_of_unit: dict[tuple[int | None, str], str] = {}
        for n in names:
            r = arch.role(n)
            if r.unit:
                self.by_unit[(r.layer, r.unit)] = n
                self.kind_of_unit[(r.layer, r.unit)] = r.kind
        self.feeder: dict[str, str] = {}  # read unit -> norm unit feeding it
        for norm_unit, reads in arch.norm_feeds.items():
            for u in reads:
                self.feeder[u] = norm_unit
        self.final_norm = self.by_unit.get((None, "final_norm"))
        self.embed = self.by_unit.get((None, "embed"))
        self.lm_head = self.by_unit.get((None, "lm_head"))
        self.tied = self.lm_head is None

    def head_name(self) -> str:
        name = self.lm_head or self.embed
        if name is None:
            raise AlignmentError(f"no embedding or LM head tensor found for family {self.arch.family}")
        return name

    def sizes(self, unit: str) -> int:
        a = self.arch
        return {"q": a.num_heads * a.head_dim, "k": a.num_kv_heads * a.head_dim,
                "v": a.num_kv_heads * a.head_dim, "gate": a.intermediate_size,
                "up": a.intermediate_size}[unit]


@dataclass
class ModelAlignment:
    """The transforms that map one checkpoint into the anchor's coordinates."""

    rotation: torch.Tensor | None = None  # d×d float64, x_anchor = R x_model
    fold: bool = False  # fold residual norm gains into the read matrices they feed
    fold_final: bool = False  # also the final norm into the LM head (not for tied embeddings)
    mlp_perm: dict[int, torch.Tensor] = field(default_factory=dict)  # aligned[j] = model[perm[j]]
    attn_perm: dict[int, torch.Tensor] = field(default_factory=dict)  # over KV groups
    vocab_map: torch.Tensor | None = None  # anchor id -> model id, -1 when absent


def _all_finite(t: torch.Tensor) -> bool:
    """No NaN/Inf in ``t`` (float32). One reduction instead of an n-byte mask: any NaN or Inf makes
    the sum non-finite, so a finite sum proves the tensor finite; a non-finite sum (possibly overflow
    of huge finite values) falls back to the exact elementwise test."""
    if t.numel() == 0 or bool(torch.isfinite(t.sum())):
        return True
    return bool(torch.isfinite(t).all())


class ModelView:
    """A checkpoint seen in the anchor's coordinates, one tensor at a time.

    ``get(name)`` returns float32 in (out, in) orientation (GPT-2 Conv1D weights are transposed) and,
    for embedding/LM-head rows under a vocabulary map, zero rows where the model lacks the token
    (``row_mask(name)`` says which rows are real).
    """

    def __init__(self, ckpt: Checkpoint, layout: Layout, al: ModelAlignment, device: str = "cpu",
                 anchor_vocab: int | None = None) -> None:
        self.ckpt = ckpt
        self.layout = layout
        self.arch = layout.arch
        self.al = al
        self.device = device
        self.anchor_vocab = anchor_vocab
        self._gains: dict[str, torch.Tensor] = {}
        self._aligned: dict[str, torch.Tensor] | None = None  # see keep_aligned
        self._rot32 = al.rotation.to(device=device, dtype=torch.float32) if al.rotation is not None else None

    def _raw(self, name: str) -> torch.Tensor:
        t = self.ckpt.get(name).to(device=self.device, dtype=torch.float32)
        if not _all_finite(t):
            raise AlignmentError(f"{self.ckpt.file_of(name)}: tensor {name} contains NaN or Inf values")
        return t

    def gain(self, norm_name: str) -> torch.Tensor:
        """Effective gain (stored + norm offset) of a norm tensor, cached (tiny)."""
        if norm_name not in self._gains:
            self._gains[norm_name] = self._raw(norm_name) + self.arch.norm_offset
        return self._gains[norm_name]

    def row_mask(self, name: str) -> torch.Tensor | None:
        role = self.arch.role(name)
        if role.kind in ("embed", "lm_head") and self.al.vocab_map is not None:
            return (self.al.vocab_map >= 0).to(self.device)
        return None

    def keep_aligned(self, on: bool) -> None:
        """Cache each tensor after vocabulary map, folding and rotation (before unit permutations) until
        called with False: ``compute_alignment`` reads a layer for unit matching and again for the
        Select statistics, and this way each tensor is read, checked and rotated once."""
        self._aligned = {} if on else None

    def get(self, name: str) -> torch.Tensor:
        role = self.arch.role(name)
        cache = self._aligned
        t = cache.get(name) if cache is not None else None
        if t is None:
            t = self._align_residual(name, role)
            if cache is not None:
                cache[name] = t
        if not t.is_floating_point():
            return t
        layer, unit, kind = role.layer, role.unit, role.kind
        al = self.al
        # 4. unit permutations
        if layer is not None:
            base_unit = unit[: -len("_bias")] if (kind == "bias" and unit.endswith("_bias")) else unit
            if layer in al.mlp_perm and role.module == "mlp":
                t = self._permute_mlp(t, kind, base_unit, al.mlp_perm[layer])
            if layer in al.attn_perm and role.module == "attn":
                t = self._permute_attn(t, kind, base_unit, al.attn_perm[layer])
        return t

    def _align_residual(self, name: str, role: Any) -> torch.Tensor:
        """Steps 1-3 of :meth:`get`: vocabulary map, norm folding, residual rotation."""
        t = self._raw(name)
        if not t.is_floating_point():
            return t
        if role.transposed and t.dim() == 2:
            t = t.T.contiguous()
        al, lay = self.al, self.layout
        kind, unit, layer = role.kind, role.unit, role.layer
        # 1. vocabulary mapping (rows in the anchor's token order)
        if kind in ("embed", "lm_head") and al.vocab_map is not None:
            vm = al.vocab_map.to(self.device)
            out = torch.zeros(vm.numel(), t.shape[1], dtype=t.dtype, device=t.device)
            ok = vm >= 0
            out[ok] = t[vm[ok]]
            t = out
        # 2. norm folding: a read matrix's columns scale by the gain of the norm feeding it
        gain = None
        if al.fold:
            if kind == "read" and unit in lay.feeder:
                norm_name = lay.by_unit.get((layer, lay.feeder[unit]))
                if norm_name is not None:
                    gain = self.gain(norm_name)
            elif kind == "lm_head" and al.fold_final and lay.final_norm:
                gain = self.gain(lay.final_norm)
            elif (kind == "norm" and unit in self.arch.norm_feeds) or (kind == "final_norm" and al.fold_final):
                t = torch.full_like(t, 1.0 - self.arch.norm_offset)
        # 3. residual rotation (x_anchor = R x_model); with folding, (A·diag(g))Rᵀ = A·(diag(g)Rᵀ):
        # the gain goes into the d×d factor, one pass over A
        R = self._rot32
        if R is not None and kind in ("read", "embed", "lm_head", "pos_embed") and t.dim() == 2:
            t = t @ (R.T if gain is None else gain[:, None] * R.T)
        elif gain is not None:
            t = t * gain[None, :]
        elif R is not None and (kind == "write" or (
            kind == "bias" and lay.kind_of_unit.get((layer, unit.removesuffix("_bias"))) == "write"
        )):
            t = R @ t
        return t

    def _permute_mlp(self, t: torch.Tensor, kind: str, unit: str, perm: torch.Tensor) -> torch.Tensor:
        perm = perm.to(self.device)
        if unit in _MLP_READ and kind in ("read", "bias"):
            n = self.arch.intermediate_size
            parts = [t[i * n : (i + 1) * n][perm] for i in range(len(_MLP_READ[unit]))]
            return torch.cat(parts)
        if unit == "down" and kind == "write":
            return t[:, perm]
        return t

    def _permute_attn(self, t: torch.Tensor, kind: str, unit: str, gperm: torch.Tensor) -> torch.Tensor:
        if unit in _ATTN_READ and kind in ("read", "bias"):
            parts, off = [], 0
            for u in _ATTN_READ[unit]:
                n = self.layout.sizes(u)
                parts.append(t[off : off + n][self._head_rows(u, gperm)])
                off += n
            return torch.cat(parts)
        if unit == "o" and kind == "write":
            return t[:, self._head_rows("q", gperm)]
        return t

    def _head_rows(self, unit: str, gperm: torch.Tensor) -> torch.Tensor:
        return head_rows(self.arch, unit, gperm).to(self.device)


def head_rows(arch: Architecture, unit: str, gperm: torch.Tensor) -> torch.Tensor:
    """Row index of a q/k/v block (or o columns, unit 'q') under a permutation of KV groups."""
    hd, nkv = arch.head_dim, arch.num_kv_heads
    r = arch.num_heads // nkv if unit == "q" else 1
    heads = (gperm.cpu()[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
    return (heads[:, None] * hd + torch.arange(hd)[None, :]).reshape(-1)


# ------------------------------------------------------------------------------------------------
# Vocabulary
# ------------------------------------------------------------------------------------------------


def read_vocab(path: Path) -> dict[str, int] | None:
    """Token string -> id from ``tokenizer.json`` or ``vocab.json`` (None when neither exists).

    Only the JSON is parsed (no tokenizer library, no text): the strings identify tokens across
    checkpoints whose tokenizers differ.
    """
    from seme.checkpoint import read_json

    tj = path / "tokenizer.json"
    if os.path.lexists(tj):
        data = read_json(tj, AlignmentError, "tokenizer JSON")
        model = data.get("model") if isinstance(data, dict) else None
        vocab = model.get("vocab") if isinstance(model, dict) else None
        out: dict[str, int] = {}
        try:
            if isinstance(vocab, dict):
                out.update({str(k): _token_id(v) for k, v in vocab.items()})
            elif isinstance(vocab, list):  # Unigram: [[piece, score], ...]
                for i, p in enumerate(vocab):
                    if not isinstance(p, list) or not p or not isinstance(p[0], str):
                        raise ValueError(f"vocab entry {i} is {p!r}, not [piece, score]")
                    out[p[0]] = i
            elif vocab is not None:
                raise ValueError(f"model.vocab is a {type(vocab).__name__}")
            for tok in data.get("added_tokens") or []:
                out[str(tok["content"])] = _token_id(tok["id"])
        except (ValueError, TypeError, KeyError, AttributeError) as e:
            raise AlignmentError(f"{tj}: invalid tokenizer vocabulary ({e})") from None
        return out or None
    vj = path / "vocab.json"
    if os.path.lexists(vj):
        data = read_json(vj, AlignmentError, "vocab JSON")
        try:
            if not isinstance(data, dict):
                raise TypeError(f"a {type(data).__name__}, not an object of token -> id")
            return {str(k): _token_id(v) for k, v in data.items()}
        except (ValueError, TypeError) as e:
            raise AlignmentError(f"{vj}: invalid vocab JSON ({e})") from None
    return None


def _token_id(v: Any) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < 0:
        raise ValueError(f"token id {v!r} is not a non-negative integer")
    return v


def vocab_mapping(anchor: Checkpoint, va: int, model: Checkpoint, vm: int) -> tuple[torch.Tensor | None, dict]:
    """Anchor id -> model id (-1 absent), or None for the identity; plus a record for alignment.json."""
    a_vocab, m_vocab = read_vocab(anchor.path), read_vocab(model.path)
    if a_vocab is None or m_vocab is None:
        if va == vm:
            return None, {"mode": "identity", "reason": "no tokenizer files; equal vocabulary sizes"}
        raise AlignmentError(
            f"{model.path}: vocabulary size {vm} differs from the anchor's {va} ({anchor.path}) and "
            "tokenizer files are missing, so tokens cannot be matched by string"
        )
    if a_vocab == m_vocab and va == vm:
        return None, {"mode": "identity", "reason": "identical tokenizer vocabularies"}
    id_to_str = {i: s for s, i in a_vocab.items() if 0 <= i < va}
    vmap = torch.full((va,), -1, dtype=torch.int64)
    for i, s in id_to_str.items():
        j = m_vocab.get(s)
        if j is not None and 0 <= j < vm:
            vmap[i] = j
    shared = int((vmap >= 0).sum())
    if shared == 0:
        raise AlignmentError(f"{model.path}: its vocabulary shares no token with the anchor's ({anchor.path})")
    return vmap, {"mode": "by_string", "shared": shared, "anchor_vocab": va, "model_vocab": vm}


# ------------------------------------------------------------------------------------------------
# Alignment computation
# ------------------------------------------------------------------------------------------------


@dataclass
class Alignment:
    """An alignment: ``meta`` (alignment.json) + ``tensors`` (alignment.safetensors)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    anchor_basis: SemanticBasis | None = field(default=None, repr=False)  # in memory only

    def model_alignment(self, key: str) -> ModelAlignment:
        """Transforms of model ``key`` ("base" or the source index as a string)."""
        t = self.tensors
        m = self.meta["models"][key]
        al = ModelAlignment(
            rotation=t.get(f"rotation.{key}"),
            fold=bool(self.meta["rotation"]["applied"]),
            fold_final=bool(self.meta["rotation"]["fold_final"]),
            vocab_map=t.get(f"vocab_map.{key}"),
        )
        for layer in m.get("mlp_permuted_layers", []):
            al.mlp_perm[int(layer)] = t[f"mlp_perm.{key}.{layer}"]
        for layer in m.get("attn_permuted_layers", []):
            al.attn_perm[int(layer)] = t[f"attn_perm.{key}.{layer}"]
        return al

    @property
    def token_subset(self) -> torch.Tensor:
        return self.tensors["tokens"]


def check_compatible(models: list[tuple[str, Checkpoint]]) -> None:
    """Same family, sizes and tensor names/shapes (rows of embeddings/LM head may differ)."""
    a = models[0][1]
    arch_a = a.architecture
    fields = ("family", "hidden_size", "num_layers", "num_heads", "num_kv_heads", "head_dim",
              "intermediate_size", "tied_embeddings")
    for key, m in models[1:]:
        arch = m.architecture
        for f in fields:
            if getattr(arch, f) != getattr(arch_a, f):
                raise AlignmentError(
                    f"{m.path}: {f} is {getattr(arch, f)!r} but the anchor {a.path} has "
                    f"{getattr(arch_a, f)!r}; SeMe merges models of one architecture"
                )
        missing = sorted(set(a.names) ^ set(m.names))
        if missing:
            raise AlignmentError(f"{m.path}: tensor {missing[0]} is not in both it and the anchor {a.path}")
        for n in a.names:
            sa, sm = a.shape(n), m.shape(n)
            if sa != sm:
                kind = arch_a.role(n).kind
                if kind in ("embed", "lm_head") and sa[1:] == sm[1:]:
                    continue
                raise AlignmentError(f"{m.path}: tensor {n} has shape {sm}, the anchor's is {sa}")


def _head_and_gain(view: ModelView) -> tuple[torch.Tensor, torch.Tensor | None]:
    lay = view.layout
    head = view.ckpt.get(lay.head_name())
    gain = view.ckpt.get(lay.final_norm) if lay.final_norm else None
    if view.al.vocab_map is not None:
        vm = view.al.vocab_map
        out = torch.zeros(vm.numel(), head.shape[1], dtype=head.dtype)
        out[vm >= 0] = head[vm[vm >= 0]]
        head = out
    return head, gain


def model_basis(ckpt: Checkpoint, layout: Layout, vocab_map: torch.Tensor | None, ridge: float,
                device: str) -> SemanticBasis:
    """Semantic bases of a checkpoint (final-norm gain folded), rows in the anchor's token order."""
    view = ModelView(ckpt, layout, ModelAlignment(vocab_map=vocab_map))
    head, gain = _head_and_gain(view)
    where = f"{ckpt.path} ({layout.head_name()})"
    W = effective_readout(head, gain, layout.arch.norm_offset, where)  # absent tokens: zero rows
    return compute_basis(W, where, ridge=ridge, device=device)


def procrustes(models: dict[str, SemanticBasis], ba: SemanticBasis, shared: dict[str, torch.Tensor | None]
               ) -> dict[str, tuple[torch.Tensor, float, float]]:
    """R_k = argmin ‖Ŝ_k R_kᵀ − Ŝ_a‖_F (orthogonal) over the tokens each model shares with the anchor.

    The cross-covariance comes from the factored bases (no unit rows are formed). Returns per model
    (R, RMS row residual with R, RMS row residual with the identity).
    """
    d, dev = ba.hidden_size, ba.W.device
    # Ŝ_mᵀŜ_a = M_m⁻¹ (W_mᵀ diag(1/‖s_m‖·1/‖s_a‖) W_a) M_a⁻¹: one V×d×d product per model, no unit rows.
    C: dict[str, torch.Tensor] = {}
    n: dict[str, float] = {}
    inv_a = ba.inv_norm.to(dev)
    for k, bm in models.items():
        w_a, w_m = inv_a, bm.inv_norm.to(dev)  # scaled separately: zero rows have 1/‖s‖ = 1e300
        mask = shared.get(k)
        if mask is not None:
            mask = mask.to(dev)
            w_a = w_a * mask.to(w_a.dtype)
            n[k] = float(mask.sum())
        else:
            n[k] = float(ba.vocab_size)
        mid = torch.zeros(d, d, dtype=torch.float64, device=dev)
        for lo in range(0, ba.vocab_size, 8192):
            hi = min(lo + 8192, ba.vocab_size)
            rows_m = bm.W[lo:hi].double().mul_(w_m[lo:hi, None])
            mid.addmm_(rows_m.T, ba.W[lo:hi].double().mul_(w_a[lo:hi, None]))
        C[k] = bm.minv @ mid @ ba.minv
    out = {}
    for k, Ck in C.items():
        with lapack_one_thread():
            U, S, Vh = torch.linalg.svd(Ck)
        Q = U @ Vh  # minimises ‖Ŝ_m Q − Ŝ_a‖; R = Qᵀ
        resid_sq = max(0.0, 2 * n[k] - 2 * float(S.sum()))  # ‖Ŝ_m Q‖² = ‖Ŝ_a‖² = n (unit rows)
        ident_sq = max(0.0, 2 * n[k] - 2 * float(torch.trace(Ck)))
        out[k] = (Q.T.contiguous(), math.sqrt(resid_sq / max(n[k], 1.0)), math.sqrt(ident_sq / max(n[k], 1.0)))
    return out


def _hungarian(cost: torch.Tensor, identity_frac: float) -> tuple[torch.Tensor | None, float]:
    """Perm with aligned[j] = model[perm[j]] minimising the cost (rows: anchor units); None = identity."""
    import numpy as np
    from scipy.optimize import linear_sum_assignment

    c = cost.detach().double().cpu()
    if not bool(torch.isfinite(c).all()):
        raise AlignmentError("non-finite unit matching cost (NaN/Inf weights?)")
    perm = None
    if c.shape[0] == c.shape[1] and c.shape[1] >= 2:
        # Exact shortcut: when every row's minimum is strict and the row argmins form a permutation,
        # that assignment reaches the lower bound Σ_i min_j c_ij and is the unique optimum.
        two = torch.topk(c, 2, dim=1, largest=False)
        arg = two.indices[:, 0]
        strict = bool((two.values[:, 0] < two.values[:, 1]).all())
        if strict and int(torch.bincount(arg, minlength=c.shape[1]).max()) == 1:
            perm = arg.to(torch.int64)
    if perm is None:
        _rows, cols = linear_sum_assignment(np.ascontiguousarray(c.numpy()))
        perm = torch.as_tensor(cols, dtype=torch.int64)
    frac = float((perm == torch.arange(perm.numel())).double().mean())
    return (None if frac >= identity_frac else perm), frac


def _unit_features(reads: list[torch.Tensor], W: torch.Tensor, F: torch.Tensor, weighted: bool) -> torch.Tensor:
    """Per unit (rows): [write block, unit F-norm | read vector, unit norm], so that one GEMM of two
    feature matrices gives cos_F(writes) + cos(reads) for all unit pairs.

    reads: row blocks (G, r_i) whose concatenation is each unit's read vector; W: (d, G, m) write
    columns per unit (a view of the d × G·m write matrix). ``weighted`` multiplies the write part by F
    (one side of ⟨a, F b⟩; F is symmetric). Written into one buffer: no concatenated copies.
    """
    d, G, m = W.shape
    W2 = W.reshape(d, G * m)
    FW = F @ W2
    nw = (W2 * FW).reshape(d, G, m).sum(dim=(0, 2)).clamp_min(1e-30).sqrt()
    wf = (FW if weighted else W2).reshape(d, G, m).permute(1, 0, 2).reshape(G, d * m)
    out = torch.empty(G, d * m + sum(r.shape[1] for r in reads), dtype=W.dtype, device=W.device)
    torch.div(wf, nw[:, None], out=out[:, : d * m])
    nr = sum((r * r).sum(dim=1) for r in reads).sqrt().clamp_min(1e-30)[:, None]
    off = d * m
    for r in reads:
        torch.div(r, nr, out=out[:, off : off + r.shape[1]])
        off += r.shape[1]
    return out


def _mlp_vectors(view: ModelView, layer: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """(read row blocks per neuron ([I × d] per read unit), write columns as (d, I, 1)) for one MLP."""
    lay = view.layout
    reads = []
    for unit, parts in _MLP_READ.items():
        name = lay.by_unit.get((layer, unit))
        if name is None:
            continue
        t = view.get(name)
        n = view.arch.intermediate_size
        reads += [t[i * n : (i + 1) * n] for i in range(len(parts))]
    down = lay.by_unit.get((layer, "down"))
    if not reads or down is None:
        return None
    U = view.get(down)  # d × I
    return reads, U.unsqueeze(2)


def _attn_vectors(view: ModelView, layer: int) -> tuple[list[torch.Tensor], torch.Tensor] | None:
    """(read blocks per KV group flattened ([G × ·] per unit), write blocks (d, G, r·hd)) for attention."""
    lay, arch = view.layout, view.arch
    G = arch.num_kv_heads
    reads = []
    ident = torch.arange(G)
    for unit, parts in _ATTN_READ.items():
        name = lay.by_unit.get((layer, unit))
        if name is None:
            continue
        t = view.get(name)
        off = 0
        for u in parts:
            n = lay.sizes(u)
            blk = t[off : off + n][head_rows(arch, u, ident).to(t.device)]
            reads.append(blk.reshape(G, -1))
            off += n
    o = lay.by_unit.get((layer, "o"))
    if not reads or o is None:
        return None
    O = view.get(o)  # d × (nh·hd): KV group g owns columns [g·r·hd, (g+1)·r·hd)
    return reads, O.reshape(O.shape[0], G, -1)


def match_layer(anchor: ModelView, model: ModelView, layer: int, F: torch.Tensor,
                identity_frac: float, cache: dict[Any, Any] | None = None) -> dict[str, Any]:
    """Hungarian matching of MLP neurons and KV groups of ``layer``; sets model.al perms in place.

    Cost −cos_F(write vectors) − cos(read vectors), as one GEMM of unit features (F applied on the
    anchor's side). ``cache`` keeps the anchor's features between calls for several models.
    """
    out: dict[str, Any] = {}
    cache = {} if cache is None else cache
    F32 = F.to(device=anchor.device, dtype=torch.float32)
    for kind, fn, store in (("mlp", _mlp_vectors, model.al.mlp_perm), ("attn", _attn_vectors, model.al.attn_perm)):
        store.pop(layer, None)
        if (kind, layer) not in cache:
            va = fn(anchor, layer)
            cache[(kind, layer)] = None if va is None else _unit_features(*va, F32, weighted=True)
        fa = cache[(kind, layer)]
        vm = fn(model, layer) if fa is not None else None
        if fa is None or vm is None:
            continue
        cost = fa @ _unit_features(*vm, F32, weighted=False).T
        perm, frac = _hungarian(cost.neg_(), identity_frac)
        if perm is not None:
            store[layer] = perm
        out[kind] = {"identity": perm is None, "identity_fraction": frac}
    return out


def task_vectors(views: list[ModelView], base_view: ModelView | None, name: str
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]] | None:
    """(θ_0, [Δ_k], [row mask_k]) of one tensor in the anchor's coordinates; None for integer tensors.

    θ_0 is the base when given, else the mean of the aligned sources (per row, over the sources that
    have the token, under a vocabulary map). Rows a source lacks get Δ = 0.
    """
    ts = [v.get(name) for v in views]
    if not ts[0].is_floating_point():
        return None
    masks = [v.row_mask(name) for v in views]
    if base_view is not None:
        t0 = base_view.get(name)
    elif any(m is not None for m in masks):
        w = torch.stack([m.float() if m is not None else torch.ones(ts[0].shape[0], device=ts[0].device)
                         for m in masks])
        t0 = sum(wk[:, None] * tk for wk, tk in zip(w, ts)) / w.sum(0).clamp_min(1)[:, None]
    elif len(ts) > 1:
        t0 = ts[0] + ts[1]  # the mean, summed in place (no stacked copy)
        for t in ts[2:]:
            t0.add_(t)
        t0.div_(len(ts))
    else:
        t0 = ts[0].clone()
    deltas = []
    for t, m in zip(ts, masks):
        dlt = t - t0
        if m is not None:
            dlt = dlt * m[:, None].to(dlt.dtype)
        deltas.append(dlt)
    return t0, deltas, masks


_STATS_ROWS = 8192  # vectors per block in the Select statistics (bounds the stacked copies)


def _task_stats(views: list[ModelView], base_view: ModelView | None, names: list[str], arch: Architecture,
                F: torch.Tensor, stats: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per module: semantic Gram matrix of the task vectors and ‖θ_0‖²_sem (Select's inputs, §4).

    Accumulates into ``stats`` (so it can run layer by layer).
    """
    K = len(views)
    F32 = F.to(device=views[0].device, dtype=torch.float32)
    for name in names:
        role = arch.role(name)
        tv = task_vectors(views, base_view, name)
        if tv is None:
            continue
        t0, deltas, _masks = tv
        kind = role.kind
        if kind == "write":
            metric = "write"
        elif kind in ("read", *_ROW_KINDS) and t0.dim() == 2:
            metric = "read"
        else:
            metric = "plain"

        # Per block of vectors: each task vector and θ_0 times F (write matrices as F·X: tr(XᵀFY) needs
        # no transpose), then the Gram entries as dot products (no stacked copies).
        key = module_key(role)
        st = stats.setdefault(key, {"gram": torch.zeros(K, K, dtype=torch.float64), "base_sq": 0.0,
                                    "first": name, "tensors": 0})
        xs = [*deltas, t0]
        if metric == "plain":
            xs = [x.reshape(1, -1) for x in xs]
        g = torch.zeros(K, K, dtype=torch.float64)
        base_sq = 0.0
        n = xs[0].shape[1] if metric == "write" else xs[0].shape[0]
        for lo in range(0, n, _STATS_ROWS):
            if metric == "write":
                blk = [x[:, lo : lo + _STATS_ROWS] for x in xs]
                fblk = [F32 @ x for x in blk]
            else:
                blk = [x[lo : lo + _STATS_ROWS] for x in xs]
                fblk = blk if metric == "plain" else [x @ F32 for x in blk]
            flat = [x.reshape(-1) for x in blk]
            fflat = [x.reshape(-1) for x in fblk]
            for j in range(K):
                for k in range(j, K):
                    v = float(torch.dot(flat[j], fflat[k]))
                    g[j, k] += v
                    if k != j:
                        g[k, j] += v
            base_sq += float(torch.dot(flat[K], fflat[K]))
        st["gram"] += g
        st["base_sq"] += base_sq
        st["tensors"] += 1
    return stats


def select_and_compute(gram: torch.Tensor, base_sq: float, weights: list[float], s: Settings) -> dict[str, Any]:
    """Select (σ, participation) and Compute (λ) for one module from its task-vector Gram matrix."""
    K = gram.shape[0]
    diag = gram.diagonal().clamp_min(0)
    sigma = diag.sqrt() / math.sqrt(base_sq) if base_sq > 0 else diag.sqrt()
    smax = float(sigma.max()) if K else 0.0
    selected = [(float(sigma[k]) >= s.select_ratio * smax) and float(sigma[k]) > s.select_floor for k in range(K)]
    lam = [float(w) for w in weights]
    norms = diag.sqrt()
    overlap = torch.zeros(K, K, dtype=torch.float64)
    for j in range(K):
        for k in range(K):
            if norms[j] > 0 and norms[k] > 0:
                overlap[j, k] = gram[j, k] / (norms[j] * norms[k])
    sel = [k for k in range(K) if selected[k]]
    cap = 1.0
    if s.compute == "overlap":
        for k in sel:
            tot = sum(max(0.0, float(overlap[j, k])) for j in sel)
            lam[k] = lam[k] / tot if tot > 0 else lam[k]
    elif s.compute == "cap" and sel:
        w = torch.tensor([lam[k] for k in sel], dtype=torch.float64)
        g = gram[sel][:, sel]
        largest = float((w * w * g.diagonal().clamp_min(0)).sqrt().max())
        total = float((w[:, None] * w[None, :] * g).sum().clamp_min(0).sqrt())
        cap = min(1.0, largest / total) if total > 0 else 1.0
        lam = [x * cap for x in lam]
    return {
        "sigma": [float(x) for x in sigma],
        "selected": selected,
        "lambda": [lam[k] if selected[k] else 0.0 for k in range(K)],
        "overlap": overlap.tolist(),
        "cap": cap,
    }


def module_weights(cfg: Any, arch: Architecture, first_tensor: str) -> list[float]:
    """Per-source ``weight`` (λ) for a module, resolved at its first tensor (gradients/filters allowed)."""
    from seme.config import ParamResolver

    res = ParamResolver(cfg, GLOBAL_PARAMS, MODEL_PARAMS)
    t = arch.t_of(first_tensor) if first_tensor else 0.0
    out = []
    for k in range(len(cfg.models)):
        try:
            out.append(float(res.model_params(k, first_tensor, t)["weight"]))
        except (TypeError, ValueError):
            raise ConfigError(f"models[{k}]: SeMe parameter weight must be a number") from None
    return out


def model_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """sha256 per weight file (names relative to the checkpoint directory)."""
    from seme.fsutil import sha256_file

    return {str(Path(f).relative_to(ckpt.path)): sha256_file(f) for f in ckpt.files}


def compute_alignment(cfg: Any, sources: list[Checkpoint], base: Checkpoint | None, device: str = "cpu",
                      progress: bool = False) -> Alignment:
    """Estimate rotations, permutations and vocabulary maps, and the Select statistics (§3-§4)."""
    t_start, c_start = time.perf_counter(), time.process_time()  # wall and CPU seconds per phase
    timings: dict[str, float] = {}
    device = resolve_device(device)
    s = Settings.from_config(cfg)
    if not sources:
        raise AlignmentError("SeMe needs at least one source model")
    keys = (["base"] if base is not None else []) + [str(i) for i in range(len(sources))]
    ckpts = ([base] if base is not None else []) + list(sources)
    models = list(zip(keys, ckpts))
    check_compatible(models)
    anchor_key, anchor = models[0]
    arch = anchor.architecture
    layout = Layout(arch, anchor.names)
    va = anchor.shape(layout.head_name())[0]
    d = arch.hidden_size

    # Vocabulary maps.
    als: dict[str, ModelAlignment] = {}
    vocab_records: dict[str, Any] = {}
    for key, ck in models:
        if key == anchor_key:
            als[key] = ModelAlignment()
            vocab_records[key] = {"mode": "identity", "reason": "anchor"}
            continue
        vm = ck.shape(layout.head_name())[0]
        vmap, rec = vocab_mapping(anchor, va, ck, vm)
        als[key] = ModelAlignment(vocab_map=vmap)
        vocab_records[key] = rec

    # Semantic bases.
    t, c = time.perf_counter(), time.process_time()
    bases = {key: model_basis(ck, layout, als[key].vocab_map, s.ridge, device) for key, ck in models}
    ba = bases[anchor_key]
    timings["bases_s"] = time.perf_counter() - t
    timings["bases_cpu_s"] = time.process_time() - c

    # Residual rotation.
    t, c = time.perf_counter(), time.process_time()
    rot_records: dict[str, Any] = {}
    rotations: dict[str, torch.Tensor] = {}
    others = [key for key in keys if key != anchor_key]
    fits = procrustes({k: bases[k] for k in others}, ba,
                      {k: (None if als[k].vocab_map is None else als[k].vocab_map >= 0) for k in others})
    for key in others:
        R, resid, resid_id = fits[key]
        dev_ = float((R - torch.eye(d, dtype=R.dtype, device=R.device)).norm())
        rotations[key] = R
        rot_records[key] = {"deviation_from_identity": dev_, "procrustes_residual": resid,
                            "identity_residual": resid_id}
    # Rotate only when some R_k is far from I *and* explains most of the basis mismatch: for fine-tunes
    # of one base, Procrustes on a small vocabulary fits noise (R ≠ I, residual barely lower).
    needed = any(r["deviation_from_identity"] >= s.rotation_tol * math.sqrt(d)
                 and r["procrustes_residual"] < 0.5 * r["identity_residual"] for r in rot_records.values())
    applied, reason = False, "all rotations within rotation_tol of the identity"
    fold_final = not layout.tied
    if needed and not arch.residual_rotation_ok:
        reason = f"family {arch.family} has post-norms on the residual: permutations only"
    elif needed and layout.tied and layout.final_norm:
        gains = [ModelView(ck, layout, ModelAlignment()).gain(layout.final_norm) for _k, ck in models]
        if all(float((g - g.mean()).abs().max()) <= 1e-6 * max(1.0, float(g.abs().mean())) for g in gains):
            applied, reason = True, "rotated; tied embeddings with uniform final-norm gain (left unfolded)"
        else:
            reason = ("tied embeddings with a non-uniform final-norm gain: folding it would untie the "
                      "LM head, so the rotation is not applied (permutations only)")
            log.warning("SeMe: %s", reason)
    elif needed:
        applied, reason = True, "rotated with norm gains folded into the read matrices"
    for key in keys:
        al = als[key]
        al.fold = applied
        al.fold_final = applied and fold_final
        if applied and key != anchor_key:
            al.rotation = rotations[key]
    timings["rotation_s"] = time.perf_counter() - t
    timings["rotation_cpu_s"] = time.process_time() - c

    # Unit permutations (after rotation), then Select statistics, layer by layer.
    t, c = time.perf_counter(), time.process_time()
    views = {key: ModelView(ck, layout, als[key], device=device) for key, ck in models}
    F = ba.F
    perm_records: dict[str, dict[str, Any]] = {key: {} for key in keys}
    src_views = [views[str(i)] for i in range(len(sources))]
    base_view = views["base"] if base is not None else None
    by_layer: dict[int | None, list[str]] = {}
    for n in anchor.names:
        by_layer.setdefault(arch.role(n).layer, []).append(n)
    stats: dict[str, dict[str, Any]] = {}
    t_stats = c_stats = 0.0
    for layer in range(arch.num_layers):
        cache: dict[Any, Any] = {}
        for v in views.values():
            v.keep_aligned(True)  # one read per tensor for matching + statistics
        for key in keys:
            if key != anchor_key:
                perm_records[key][str(layer)] = match_layer(views[anchor_key], views[key], layer, F,
                                                            s.perm_identity, cache)
        ts, cs = time.perf_counter(), time.process_time()
        _task_stats(src_views, base_view, by_layer.pop(layer, []), arch, F, stats)
        for v in views.values():
            v.keep_aligned(False)
        t_stats += time.perf_counter() - ts
        c_stats += time.process_time() - cs
    ts, cs = time.perf_counter(), time.process_time()
    _task_stats(src_views, base_view, [n for names in by_layer.values() for n in names], arch, F, stats)
    t_stats += time.perf_counter() - ts
    c_stats += time.process_time() - cs
    timings["select_stats_s"] = t_stats
    timings["permutations_s"] = time.perf_counter() - t - t_stats
    timings["select_stats_cpu_s"] = c_stats
    timings["permutations_cpu_s"] = time.process_time() - c - c_stats

    # Token subset T (anchor ids every source has).
    shared = torch.ones(va, dtype=torch.bool)
    for key in keys:
        if als[key].vocab_map is not None:
            shared &= als[key].vocab_map >= 0
    T = token_subset(ba.W, anchor.config, s.tokens, allowed=shared)
    if T.numel() < d:
        raise AlignmentError(f"token subset has {T.numel()} tokens, fewer than the hidden size {d}")

    tensors: dict[str, torch.Tensor] = {"tokens": T.to(torch.int64).cpu()}
    meta_models: dict[str, Any] = {}
    for key, ck in models:
        al = als[key]
        if al.rotation is not None:
            tensors[f"rotation.{key}"] = al.rotation.double().cpu()
        if al.vocab_map is not None:
            tensors[f"vocab_map.{key}"] = al.vocab_map.cpu()
        for layer, p in al.mlp_perm.items():
            tensors[f"mlp_perm.{key}.{layer}"] = p.cpu()
        for layer, p in al.attn_perm.items():
            tensors[f"attn_perm.{key}.{layer}"] = p.cpu()
        b = bases[key]
        meta_models[key] = {
            "path": str(ck.path),
            "sha256": model_sha256(ck),
            "role": "base" if key == "base" else "source",
            "anchor": key == anchor_key,
            "vocabulary": vocab_records[key],
            "rotation": rot_records.get(key, {"deviation_from_identity": 0.0, "procrustes_residual": 0.0}),
            "permutations": perm_records[key],
            "mlp_permuted_layers": sorted(al.mlp_perm),
            "attn_permuted_layers": sorted(al.attn_perm),
            "basis": {"self_recovery": b.self_recovery, "rank": b.rank, "eps": b.eps},
        }
    modules = {}
    for key, st in stats.items():
        sc = select_and_compute(st["gram"], st["base_sq"], module_weights(cfg, arch, st["first"]), s)
        modules[key] = {"gram": st["gram"].tolist(), "base_sq": st["base_sq"], "first_tensor": st["first"],
                        **sc}
    timings["total_s"] = time.perf_counter() - t_start
    timings["total_cpu_s"] = time.process_time() - c_start
    meta = {
        "format_version": FORMAT_VERSION,
        "method": "seme",
        "anchor": anchor_key,
        "base": str(base.path) if base is not None else None,
        "family": arch.family,
        "hidden_size": d,
        "num_layers": arch.num_layers,
        "settings": {k: getattr(s, k) for k in GLOBAL_PARAMS},
        "weights": [module_weights(cfg, arch, "")[k] for k in range(len(sources))],
        "models": meta_models,
        "rotation": {"needed": needed, "applied": applied, "fold_final": applied and fold_final,
                     "reason": reason},
        "token_subset": {"size": int(T.numel()), "vocab": va},
        "f_spectrum": spectrum_summary(F),
        "modules": modules,
        "timings": timings,
        "device": device,
    }
    return Alignment(meta=meta, tensors=tensors, anchor_basis=ba)


# ------------------------------------------------------------------------------------------------
# Artifact I/O
# ------------------------------------------------------------------------------------------------


def write_alignment(alignment: Alignment, out: Path) -> None:
    """Write alignment.json, alignment.safetensors and the two heatmaps into ``out``."""
    import hashlib

    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    raw = save({k: v.contiguous() for k, v in alignment.tensors.items()},
               metadata={"format": "seme-alignment", "format_version": str(FORMAT_VERSION)})
    (out / "alignment.safetensors").write_bytes(raw)
    # the tensors' digest, checked on load: a changed alignment.safetensors is refused, not half-used
    alignment.meta["tensors_sha256"] = hashlib.sha256(raw).hexdigest()
    (out / "alignment.json").write_text(json.dumps(alignment.meta, indent=2))
    plot_heatmaps(alignment.meta, out)


def plot_heatmaps(meta: dict[str, Any], out: Path) -> None:
    """semantic_shift.png (σ) and coefficients.png (λ): layers × sources, one panel per module kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = int(meta["num_layers"])
    K = len(meta["weights"])
    for field_, fname, title in (("sigma", "semantic_shift.png", "semantic displacement σ"),
                                 ("lambda", "coefficients.png", "coefficient λ (0: not selected)")):
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * K, 2 + 0.18 * n_layers), squeeze=False)
        for ax, mod in zip(axes[0], ("attn", "mlp")):
            grid = torch.zeros(n_layers, K)
            for layer in range(n_layers):
                m = meta["modules"].get(f"{mod}.{layer}")
                if m:
                    grid[layer] = torch.tensor(m[field_], dtype=torch.float32)
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", origin="upper")
            ax.set_title(f"{mod}: {title}", fontsize=8)
            ax.set_xlabel("source")
            ax.set_ylabel("layer")
            ax.set_xticks(range(K))
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)


def load_alignment(path: str | os.PathLike) -> Alignment:
    """Read an alignment artifact directory; AlignmentError when it is missing or malformed."""
    from safetensors.torch import load_file

    p = Path(path)
    js, st = p / "alignment.json", p / "alignment.safetensors"
    if not js.is_file() or not st.is_file():
        raise AlignmentError(f"{p}: not an alignment artifact (needs alignment.json and alignment.safetensors)")
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignmentError(f"{js}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise AlignmentError(f"{js}: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AlignmentError(f"{js}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    want = meta.get("tensors_sha256")
    if not isinstance(want, str):
        raise AlignmentError(f"{js}: no tensors_sha256 recorded; re-run `seme align` to make a verifiable artifact")
    from seme.fsutil import sha256_file

    if sha256_file(st) != want:
        raise AlignmentError(f"{st}: sha256 does not match the one in alignment.json (modified or corrupt)")
    try:
        tensors = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - safetensors raises several unrelated types
        raise AlignmentError(f"{st}: corrupt alignment tensors ({e})") from None
    if "tokens" not in tensors:
        raise AlignmentError(f"{st}: missing the token subset")
    _check_alignment_shapes(meta, tensors, js)
    return Alignment(meta=meta, tensors=tensors)


def _check_alignment_shapes(meta: dict[str, Any], tensors: dict[str, torch.Tensor], js: Path) -> None:
    """The structure ``Alignment.model_alignment`` relies on, so a bad artifact fails here, in one line."""
    models = meta.get("models")
    rot = meta.get("rotation")
    if not isinstance(models, dict) or not isinstance(rot, dict) or not {"applied", "fold_final"} <= set(rot):
        raise AlignmentError(f"{js}: missing or malformed 'models'/'rotation'")
    for key, m in models.items():
        if not isinstance(m, dict):
            raise AlignmentError(f"{js}: models.{key} is not an object")
        for kind in ("mlp", "attn"):
            layers = m.get(f"{kind}_permuted_layers", [])
            if not isinstance(layers, list):
                raise AlignmentError(f"{js}: models.{key}.{kind}_permuted_layers is not a list")
            for layer in layers:
                t = tensors.get(f"{kind}_perm.{key}.{layer}")
                if t is None or t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
                    raise AlignmentError(f"{js}: permutation {kind}_perm.{key}.{layer} is missing or malformed")
                if not torch.equal(torch.sort(t).values, torch.arange(t.numel())):
                    raise AlignmentError(f"{js}: {kind}_perm.{key}.{layer} is not a permutation")


def align(config: Any, out_dir: str | os.PathLike, device: str = "cpu", overwrite: bool = False,
          allow_pickle: bool = False) -> Path:
    """Compute the alignment artifact for a SeMe merge config into ``out_dir`` (atomic). Data-free."""
    from seme.checkpoint import open_checkpoint
    from seme.config import MergeConfig, load_config
    from seme.fsutil import atomic_dir, check_out_dir, clean_stale_temps

    cfg = config if isinstance(config, MergeConfig) else load_config(config)
    if cfg.merge_method != "seme":
        raise ConfigError(f"seme align needs merge_method: seme, the config has {cfg.merge_method!r}")
    protect = [cfg.base_model, *(m.model for m in cfg.models),
               config if isinstance(config, (str, os.PathLike)) else None]
    clean_stale_temps(check_out_dir(out_dir, overwrite, protect=protect).parent)  # fail fast
    sources = [open_checkpoint(m.model, allow_pickle=allow_pickle) for m in cfg.models]
    base = open_checkpoint(cfg.base_model, allow_pickle=allow_pickle) if cfg.base_model else None
    protect += [ck.path for ck in [*sources, *([base] if base else [])]]
    with atomic_dir(out_dir, overwrite=overwrite, protect=protect) as tmp:
        al = compute_alignment(cfg, sources, base, device=device)
        write_alignment(al, tmp)
    return Path(out_dir).absolute()
