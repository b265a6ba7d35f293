"""Arcee Fusion: take the other model's value only where it changed the base "importantly".

As mergekit 0.1.5 (merge_methods/arcee_fusion.py), in the compute dtype, for the base θ₀ and one
other model θ₁:

    importance = |θ₁ − θ₀| · KL(softmax(θ₁) ‖ softmax(θ₀))     (softmax and KL along the last dim,
                                                                 each probability + 1e-8)
    threshold  = median + 1.5·(q₃ − q₁)                          (quartiles of the importance)
    θ = θ₀ + (θ₁ − θ₀)·[importance ≥ threshold]

Quartiles are the order statistics at ⌊q·(n−1)⌋ of all entries. mergekit estimates them from a
random sample of 10⁶ entries (with replacement) when a tensor is larger than that; seme always uses
every entry (exact, deterministic), so the two agree exactly up to 10⁶ entries per tensor.
"""

from __future__ import annotations

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import MethodSpec, register
from seme.methods._params import non_base

QUANTILES = (0.25, 0.5, 0.75)


def quartiles(x: torch.Tensor) -> list[torch.Tensor]:
    """(q₁, median, q₃) of all entries of ``x``: the order statistics at ⌊q·(n−1)⌋ (0-based, the
    index computed in float32 as mergekit does)."""
    flat = x.reshape(-1)
    pos = (torch.tensor(QUANTILES) * (flat.numel() - 1)).long().tolist()
    key = flat if flat.dtype in (torch.float32, torch.float64) else flat.float()  # exact widening
    return [torch.kthvalue(key, p + 1).values.to(flat.dtype) for p in pos]


def importance(x: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """|x − base| times the KL divergence of the softmax of ``x`` from that of ``base`` per row."""
    p = torch.softmax(x, dim=-1) + 1e-8
    q = torch.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return (x - base).abs() * kl


def arcee_fusion(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Arcee Fusion of ``base`` and the one other model (module docstring)."""
    idx = non_base("arcee_fusion", base, tensors)
    if len(idx) != 1:
        raise ConfigError(f"arcee_fusion merges exactly 2 models, base_model and one other; got {len(idx)} other(s)")
    if not base.is_floating_point():
        raise ConfigError(f"arcee_fusion: tensors must be floating point, got {base.dtype}")
    x = tensors[idx[0]]
    if base.numel() == 0:
        return base
    imp = importance(x, base)
    q1, med, q3 = quartiles(imp)
    mask = (imp >= med + 1.5 * (q3 - q1)).float()
    return base + (x - base) * mask


register(
    MethodSpec(
        name="arcee_fusion",
        fn=arcee_fusion,
        needs_base=True,
        global_params={},
        model_params={},
        description="keep the other model's changes where |Δ|·KL is an outlier (Arcee Fusion)",
    )
)
