"""Linear merge (model soup): a weighted average of the models' tensors.

    θ = Σ_i w_i θ_i / Σ_i w_i        (without normalize: Σ_i w_i θ_i)

As mergekit 0.1.5 does (merge_methods/linear.py:20-38), it accumulates in float32 (float64 for
float64 inputs) whatever the compute dtype, and rounds once at the end. The base model plays no
special part: it is averaged only if it is listed under ``models``.
"""

from __future__ import annotations

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import MethodSpec, register
from seme.methods._params import as_bool, as_float


def linear(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Weighted average of ``tensors`` (``base`` is ignored)."""
    if not tensors:
        raise ConfigError("linear: no models to merge")
    first = tensors[0]
    if not first.is_floating_point():
        raise ConfigError(f"linear: tensors must be floating point, got {first.dtype}")
    normalize = as_bool("linear", "normalize", params.get("normalize", True))
    weights = [as_float("linear", "weight", mp.get("weight"), f"model {i}") for i, mp in enumerate(model_params)]
    acc_dtype = torch.float64 if first.dtype == torch.float64 else torch.float32
    w = torch.tensor(weights, dtype=acc_dtype)  # weights rounded to the accumulator dtype, as mergekit
    if normalize:
        denom = float(w.sum())
        if denom == 0.0:
            raise ConfigError(f"linear: the weights sum to 0 ({weights}); cannot normalize")
    acc = torch.zeros(first.shape, dtype=acc_dtype, device=first.device)
    for t, wi in zip(tensors, w.tolist()):
        acc.add_(t, alpha=wi)
    if normalize:
        acc.div_(denom)
    return acc.to(first.dtype)


register(
    MethodSpec(
        name="linear",
        fn=linear,
        needs_base=False,
        global_params={"normalize": True},
        model_params={"weight": 1.0},
        description="weighted average of the models (arXiv:2203.05482)",
    )
)
