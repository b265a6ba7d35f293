"""Select: which sources take part in each module, from their semantic displacement (seme-method.md §4).

Per module m (per layer ``attn`` and ``mlp``, plus ``embed`` and ``head``) and source k, the semantic
displacement is σ_{k,m} = ‖Δ_{k,m}‖_sem / ‖θ_{0,m}‖_sem, with ‖X‖²_sem = tr(XᵀFX) for write matrices,
tr(XFXᵀ) for read matrices and row stacks, the plain norm for vectors (F: the semantic metric). Source
k takes part iff σ_{k,m} ≥ ρ·max_j σ_{j,m} and σ_{k,m} > σ_min.

:func:`module_statistics` accumulates, tensor by tensor (embedding rows block by block), each module's
semantic Gram matrix of the task vectors and ‖θ_0‖²_sem: everything Select and Compute need, so the
alignment artifact can be re-used with other Select/Compute parameters. :func:`select` decides per
module; :func:`select_rows` per embedding / LM-head row (§6).

Part of the method: *Select*.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from seme.architectures import Architecture
from seme.semantic.settings import Settings
from seme.semantic.transform import ROW_KINDS, ModelView, module_key, row_blocks, task_vectors

STATS_ROWS = 8192  # vectors per block in the Select statistics (bounds the per-block copies)


def _metric(kind: str, dim: int) -> str:
    """How a tensor's semantic norm is measured: ``write`` (columns enter the residual), ``read``
    (rows read it, and embedding rows), ``plain`` (norm gains, biases)."""
    if kind == "write":
        return "write"
    if kind in ("read", *ROW_KINDS) and dim == 2:
        return "read"
    return "plain"


def _gram_block(xs: list[torch.Tensor], F32: torch.Tensor, metric: str) -> tuple[torch.Tensor, float]:
    """(K×K semantic Gram matrix of xs[:-1], ‖xs[-1]‖²_sem) of one tensor's task vectors and θ_0.

    Per block of vectors: each task vector and θ_0 times F (write matrices as F·X: tr(XᵀFY) needs no
    transpose), then the Gram entries as dot products (no stacked copies).
    """
    K = len(xs) - 1
    if metric == "plain":
        xs = [x.reshape(1, -1) for x in xs]
    g = torch.zeros(K, K, dtype=torch.float64)
    base_sq = 0.0
    n = xs[0].shape[1] if metric == "write" else xs[0].shape[0]
    for lo in range(0, n, STATS_ROWS):
        if metric == "write":
            blk = [x[:, lo : lo + STATS_ROWS] for x in xs]
            fblk = [F32 @ x for x in blk]
        else:
            blk = [x[lo : lo + STATS_ROWS] for x in xs]
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
    return g, base_sq


def module_statistics(views: list[ModelView], base_view: ModelView | None, names: list[str],
                      arch: Architecture, F: torch.Tensor, stats: dict[str, dict[str, Any]]
                      ) -> dict[str, dict[str, Any]]:
    """Per module: semantic Gram matrix of the task vectors and ‖θ_0‖²_sem (Select's inputs, §4).

    Accumulates into ``stats`` (so it can run layer by layer); embeddings go block of rows by block of
    rows, so no whole V×d task vector is ever formed.
    """
    K = len(views)
    F32 = F.to(device=views[0].device, dtype=torch.float32)
    for name in names:
        role = arch.role(name)
        for rows in row_blocks(views[0], name):
            tv = task_vectors(views, base_view, name, rows)
            if tv is None:
                break
            t0, deltas, _masks = tv
            st = stats.setdefault(module_key(role), {"gram": torch.zeros(K, K, dtype=torch.float64),
                                                     "base_sq": 0.0, "first": name, "tensors": 0})
            g, base_sq = _gram_block([*deltas, t0], F32, _metric(role.kind, t0.dim()))
            st["gram"] += g
            st["base_sq"] += base_sq
            del tv, t0, deltas
            if rows is not None:
                for v in [*views, *([base_view] if base_view is not None else [])]:
                    v.release(name, rows)
        else:
            st["tensors"] += 1
    return stats


def select(gram: torch.Tensor, base_sq: float, s: Settings) -> dict[str, Any]:
    """σ_k (semantic displacement) and participation of each source in one module."""
    K = gram.shape[0]
    diag = gram.diagonal().clamp_min(0)
    sigma = diag.sqrt() / math.sqrt(base_sq) if base_sq > 0 else diag.sqrt()
    smax = float(sigma.max()) if K else 0.0
    selected = [(float(sigma[k]) >= s.select_ratio * smax) and float(sigma[k]) > s.select_floor for k in range(K)]
    return {"sigma": [float(x) for x in sigma], "selected": selected}


def select_rows(D: torch.Tensor, FD: torch.Tensor, b0: torch.Tensor, F: torch.Tensor, s: Settings,
                masks: list[torch.Tensor | None]) -> tuple[torch.Tensor, torch.Tensor]:
    """Select per token row (§6): D (K×n×d) task-vector rows, FD = D·F, b0 (n×d) θ_0's rows.

    Returns (participation K×n bool, semantic squared norms K×n). Rows a source lacks (``masks``)
    never take part.
    """
    sq = (D * FD).sum(-1).clamp_min(0)  # K×n
    base = ((b0 @ F) * b0).sum(-1).clamp_min(0)
    sigma = torch.where(base > 0, sq.sqrt() / base.sqrt().clamp_min(1e-30), sq.sqrt())
    smax = sigma.max(0).values
    sel = (sigma >= s.select_ratio * smax) & (sigma > s.select_floor)
    for k, m in enumerate(masks):
        if m is not None:
            sel[k] &= m.bool()
    return sel, sq
