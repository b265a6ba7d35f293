"""NearSwap: take the other model's value where it is close to the base's, keep the base elsewhere.

As mergekit 0.1.5 (merge_methods/nearswap.py), per entry, in the compute dtype, for the base a and
one other model b:

    w = clamp(t / max(|a − b|, 1e-6), 0, 1),     θ = w·b + (1 − w)·a

so entries that differ by at most ``t`` become b's, and larger differences move toward b by t/|a−b|.
"""

from __future__ import annotations

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import REQUIRED, MethodSpec, register
from seme.methods._params import as_float, non_base


def nearswap(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """NearSwap of ``base`` toward the one other model at similarity threshold ``params['t']``."""
    idx = non_base("nearswap", base, tensors)
    if len(idx) != 1:
        raise ConfigError(f"nearswap merges exactly 2 models, base_model and one other; got {len(idx)} other(s)")
    if not base.is_floating_point():
        raise ConfigError(f"nearswap: tensors must be floating point, got {base.dtype}")
    t = as_float("nearswap", "t", params.get("t"))
    if t < 0:
        raise ConfigError(f"nearswap: t must be ≥ 0, got {t}")
    b = tensors[idx[0]]
    w = (t / (base - b).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * b + (1 - w) * base


register(
    MethodSpec(
        name="nearswap",
        fn=nearswap,
        needs_base=True,
        global_params={"t": REQUIRED},
        model_params={},
        description="interpolate base -> other by t/|difference| per entry (NearSwap)",
    )
)
