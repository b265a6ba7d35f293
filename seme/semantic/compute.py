"""Compute: the coefficient λ_{k,m} of each selected source in each module (seme-method.md §4).

``compute: default`` takes the source's configured ``weight``. Two alternatives are options for the
benchmark to judge: ``overlap`` (λ_k = weight_k / Σ_j max(0, O_jk), O the semantic cosine of the task
vectors) and ``cap`` (one factor per module, min(1, max_k‖λ_kΔ_k‖_sem / ‖Σ_k λ_kΔ_k‖_sem), so the
merged displacement does not exceed the largest single source's). :func:`compute` works per module
from its semantic Gram matrix; :func:`compute_rows` per embedding / LM-head row (§6).

Part of the method: *Compute*.
"""

from __future__ import annotations

from typing import Any

import torch

from seme.architectures import Architecture
from seme.errors import ConfigError
from seme.semantic.select import select
from seme.semantic.settings import GLOBAL_PARAMS, MODEL_PARAMS, Settings


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


def compute(gram: torch.Tensor, selected: list[bool], weights: list[float], s: Settings) -> dict[str, Any]:
    """λ per source of one module (0 where not selected), the semantic overlaps and the cap factor."""
    K = gram.shape[0]
    lam = [float(w) for w in weights]
    norms = gram.diagonal().clamp_min(0).sqrt()
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
    return {"lambda": [lam[k] if selected[k] else 0.0 for k in range(K)], "overlap": overlap.tolist(), "cap": cap}


def select_and_compute(gram: torch.Tensor, base_sq: float, weights: list[float], s: Settings) -> dict[str, Any]:
    """Select (σ, participation) and Compute (λ) for one module from its task-vector Gram matrix."""
    sel = select(gram, base_sq, s)
    return {**sel, **compute(gram, sel["selected"], weights, s)}


def compute_rows(D: torch.Tensor, FD: torch.Tensor, sq: torch.Tensor, sel: torch.Tensor, weights: torch.Tensor,
                 F: torch.Tensor, s: Settings) -> torch.Tensor:
    """λ per source and token row (K×n), 0 where the source does not take part (§6).

    D: K×n×d task-vector rows, FD = D·F, sq: their semantic squared norms, sel: participation.
    """
    K, n = sel.shape
    lam = weights[:, None].expand(K, n).clone()
    if s.compute == "overlap":
        G = torch.einsum("jnd,knd->jkn", D, FD)
        nrm = sq.sqrt()
        O = G / (nrm[:, None] * nrm[None, :]).clamp_min(1e-30)
        tot = (O.clamp_min(0) * sel[:, None, :]).sum(0)  # Σ_j∈sel max(0, O_jk)
        lam = torch.where(tot > 0, lam / tot.clamp_min(1e-30), lam)
    elif s.compute == "cap":
        lw = lam * sel
        summed = (lw[:, :, None] * D).sum(0)
        tot = ((summed @ F) * summed).sum(-1).clamp_min(0).sqrt()
        largest = (lw.abs() * sq.sqrt()).max(0).values
        cap = torch.where(tot > 0, (largest / tot.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(tot))
        lam = lam * cap[None, :]
    return lam * sel
