"""Passthrough: copy the one input tensor, optionally scaled (mergekit's layer stacking).

With ``slices:`` each output slice takes one source's layer range, so stacking ranges of one or
several models builds a deeper (or shallower) model: a "frankenmerge". As mergekit 0.1.5
(merge_methods/passthrough.py) it takes exactly one input per tensor and an optional per-model
``scale`` multiplied in the compute dtype.
"""

from __future__ import annotations

from seme.errors import ConfigError
from seme.lazy import torch
from seme.methods import MethodSpec, register
from seme.methods._params import as_float


def passthrough(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """The single input (times ``scale`` when given)."""
    if len(tensors) != 1:
        raise ConfigError(
            f"passthrough takes exactly one source per tensor, got {len(tensors)}; "
            "give each output slice a single source"
        )
    scale = model_params[0].get("scale") if model_params else None
    if scale is None:
        return tensors[0].clone()
    return tensors[0] * as_float("passthrough", "scale", scale, "model 0")


register(
    MethodSpec(
        name="passthrough",
        fn=passthrough,
        needs_base=False,
        model_params={"scale": None},
        description="copy one source per tensor (layer stacking with slices)",
    )
)
