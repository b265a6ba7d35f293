"""SCE (arXiv:2408.07990): Select, Calculate, Erase over the task vectors δ_k = θ_k − θ_base.

As mergekit 0.1.5 (merge_methods/sce.py), in the compute dtype:

1. Select (``select_topk`` < 1): keep the entries where the task vectors vary most across models,
   the top ``int(select_topk · #nonzero variances)`` of var_k(δ_k) (population variance), in every
   task vector alike; equal variances at the cut keep the lowest index;
2. Calculate: one weight per model, w_k = mean(δ_k²) / Σ_k mean(δ_k²) (all 1/K when that sum is
   below 1e-6);
3. Erase: TIES sign election, s = sign(Σ_k δ_k) (0 counts as +); entries of another sign (and
   zeros) are dropped;
4. θ = θ_base + Σ_k w_k·m_k·δ_k / max(Σ_k w_k·m_k, 1e-6), m_k the kept mask.

No per-model weights: SCE computes them. ``int8_mask`` is accepted for mergekit compatibility
and has no effect on the result.
"""

from __future__ import annotations

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import MethodSpec, register
from seme.methods._params import as_bool, as_float, non_base
from seme.methods.gta import elect_sign, topk_mask


def sce_select(tvs: torch.Tensor, frac: float) -> torch.Tensor:
    """Step 1's mask (shape of one task vector): the top ``frac`` of nonzero variances."""
    var = torch.var(tvs, dim=0, unbiased=False)
    k = int(int(torch.count_nonzero(var)) * frac)
    if k == 0:
        return torch.zeros_like(var, dtype=torch.bool)
    return topk_mask(var, k)


def sce_weights(tvs: torch.Tensor) -> torch.Tensor:
    """Step 2: w_k ∝ mean(δ_k²), normalised to sum 1 (uniform when all are ~0)."""
    w = tvs.square().reshape(tvs.shape[0], -1).mean(dim=1)
    total = float(w.sum())
    if abs(total) < 1e-6:
        return torch.ones_like(w) / w.shape[0]
    return w / total


def sce(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """SCE merge of the models that are not the base (module docstring)."""
    idx = non_base("sce", base, tensors)
    if not base.is_floating_point():
        raise ConfigError(f"sce: tensors must be floating point, got {base.dtype}")
    frac = as_float("sce", "select_topk", params.get("select_topk", 1.0))
    if not 0.0 < frac <= 1.0:
        raise ConfigError(f"sce: select_topk must be in (0, 1], got {frac}")
    as_bool("sce", "int8_mask", params.get("int8_mask", False))
    if not idx:
        return base
    tvs = torch.stack([tensors[i] - base for i in idx])
    if frac < 1.0:
        tvs.mul_(sce_select(tvs, frac))
    keep = (tvs * elect_sign(tvs)) > 0  # sign agrees with the elected one (zeros never do)
    w = sce_weights(tvs).view(-1, *([1] * base.dim()))
    kept_w = w * keep
    merged = (tvs * kept_w).sum(dim=0)
    return base + merged / kept_w.sum(dim=0).clamp(min=1e-6)


register(
    MethodSpec(
        name="sce",
        fn=sce,
        needs_base=True,
        global_params={"select_topk": 1.0, "int8_mask": False},
        model_params={},
        description="select high-variance entries, weight by task-vector energy, erase sign conflicts "
        "(arXiv:2408.07990)",
    )
)
