"""Semantics-preservative transformations, applied: a checkpoint seen in the anchor's coordinates.

The alignment (``seme.semantic.alignment``) estimates, per model, a residual rotation R (with the norm
gains folded into the read matrices they feed), unit permutations (MLP neurons, attention heads by
whole KV groups) and a vocabulary map. :class:`ModelView` applies them lazily, one tensor (or one
block of embedding rows) at a time, over the checkpoint's memory map: nothing is copied that the
transforms leave unchanged, and :meth:`ModelView.release` gives a tensor's pages back once it has
been used, so resident memory stays at one layer of every model. :func:`task_vectors` forms
Δ_k = θ_k − θ_0 in those coordinates.

Part of the method: *semantics-preservative transformations* (seme-method.md §3), as the merge sees
them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from seme.architectures import Architecture
from seme.checkpoint import Checkpoint
from seme.errors import AlignmentError

# Unit layouts: how a (possibly fused) read matrix splits into q/k/v or gate/up row blocks.
ATTN_READ = {"q": ("q",), "k": ("k",), "v": ("v",), "qkv": ("q", "k", "v")}
MLP_READ = {"gate": ("gate",), "up": ("up",), "gate_up": ("gate", "up")}
ROW_KINDS = ("embed", "lm_head", "pos_embed")


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

    def _raw(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` (rows ``[lo, hi)`` of it, in the anchor's token order under a vocabulary
        map) as float32 on the device: a view of the memory map when nothing needs converting."""
        t = self.ckpt.view(name)
        if rows is not None:
            lo, hi = rows
            vm = self.al.vocab_map
            if vm is not None and self.arch.role(name).kind in ("embed", "lm_head"):
                part = vm[lo:hi]
                ok = part >= 0
                out = torch.zeros(hi - lo, t.shape[1], dtype=t.dtype)
                out[ok] = t[part[ok]]
                t = out
            else:
                t = t[lo:hi]
        t = t.to(device=self.device, dtype=torch.float32)
        if not _all_finite(t):
            raise AlignmentError(f"{self.ckpt.file_of(name)}: tensor {name} contains NaN or Inf values")
        return t

    def anchor_rows(self, name: str) -> int:
        """Rows of an embedding / LM head in the anchor's token order (its own count without a map)."""
        vm = self.al.vocab_map
        if vm is not None and self.arch.role(name).kind in ("embed", "lm_head"):
            return int(vm.numel())
        return int(self.ckpt.shape(name)[0])

    def gain(self, norm_name: str) -> torch.Tensor:
        """Effective gain (stored + norm offset) of a norm tensor, cached (tiny)."""
        if norm_name not in self._gains:
            self._gains[norm_name] = self._raw(norm_name) + self.arch.norm_offset
        return self._gains[norm_name]

    def row_mask(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Which embedding/LM-head rows (of ``rows``) the model really has; None: all of them."""
        role = self.arch.role(name)
        if role.kind in ("embed", "lm_head") and self.al.vocab_map is not None:
            vm = self.al.vocab_map if rows is None else self.al.vocab_map[rows[0] : rows[1]]
            return (vm >= 0).to(self.device)
        return None

    def release(self, names: list[str] | str, rows: tuple[int, int] | None = None) -> None:
        """Give the pages of these tensors (of their rows ``[lo, hi)`` in the anchor's token order)
        back to the OS; they stay in the page cache. Under a vocabulary map a block of anchor rows
        is scattered over the model's rows: those pages go when the whole tensor is released."""
        for n in [names] if isinstance(names, str) else names:
            if rows is None:
                self.ckpt.release(n)
            elif self.al.vocab_map is None or self.arch.role(n).kind not in ("embed", "lm_head"):
                self.ckpt.release(n, rows)

    def keep_aligned(self, on: bool) -> None:
        """Cache each tensor after vocabulary map, folding and rotation (before unit permutations) until
        called with False: ``compute_alignment`` reads a layer for unit matching and again for the
        Select statistics, and this way each tensor is read, checked and rotated once."""
        self._aligned = {} if on else None

    def get(self, name: str, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Tensor ``name`` in the anchor's coordinates (float32, (out, in)); ``rows`` = ``(lo, hi)``
        reads only those rows of an embedding / LM head / position embedding."""
        role = self.arch.role(name)
        if rows is not None:
            if role.kind not in ROW_KINDS:
                raise ValueError(f"row blocks only for embedding rows, not {name}")
            return self._align_residual(name, role, rows)
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

    def _align_residual(self, name: str, role: Any, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """Steps 1-3 of :meth:`get`: vocabulary map, norm folding, residual rotation."""
        if rows is None and role.kind in ("embed", "lm_head"):
            rows = (0, self.anchor_rows(name))
        t = self._raw(name, rows)  # 1. vocabulary mapping (rows in the anchor's token order)
        if not t.is_floating_point():
            return t
        if role.transposed and t.dim() == 2:
            t = t.T.contiguous()
        al, lay = self.al, self.layout
        kind, unit, layer = role.kind, role.unit, role.layer
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
        if unit in MLP_READ and kind in ("read", "bias"):
            n = self.arch.intermediate_size
            parts = [t[i * n : (i + 1) * n][perm] for i in range(len(MLP_READ[unit]))]
            return torch.cat(parts)
        if unit == "down" and kind == "write":
            return t[:, perm]
        return t

    def _permute_attn(self, t: torch.Tensor, kind: str, unit: str, gperm: torch.Tensor) -> torch.Tensor:
        if unit in ATTN_READ and kind in ("read", "bias"):
            parts, off = [], 0
            for u in ATTN_READ[unit]:
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



def task_vectors(views: list[ModelView], base_view: ModelView | None, name: str,
                 rows: tuple[int, int] | None = None
                 ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor | None]] | None:
    """(θ_0, [Δ_k], [row mask_k]) of one tensor in the anchor's coordinates; None for integer tensors.

    θ_0 is the base when given, else the mean of the aligned sources (per row, over the sources that
    have the token, under a vocabulary map). Rows a source lacks get Δ = 0. ``rows`` restricts an
    embedding / LM head to a block of rows (see :func:`row_blocks`).
    """
    ts = [v.get(name, rows) for v in views]
    if not ts[0].is_floating_point():
        return None
    masks = [v.row_mask(name, rows) for v in views]
    if base_view is not None:
        t0 = base_view.get(name, rows)
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


ROW_BLOCK = 8192  # embedding rows per block: bounds the K + 2 row-block copies of a task-vector step


def row_blocks(view: ModelView, name: str) -> list[tuple[int, int] | None]:
    """The row blocks in which a tensor is processed: blocks of ``ROW_BLOCK`` rows for an embedding,
    LM head or position embedding (each would otherwise cost K + 2 whole V×d float32 copies), else
    ``[None]`` (the whole tensor, a layer's matrix)."""
    role = view.arch.role(name)
    if role.kind not in ROW_KINDS or len(view.ckpt.shape(name)) != 2:
        return [None]
    n = view.anchor_rows(name)
    return [(lo, min(lo + ROW_BLOCK, n)) for lo in range(0, n, ROW_BLOCK)]
