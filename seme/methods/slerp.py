"""SLERP: spherical interpolation between the base model and one other model.

Per tensor (flattened as one vector, mergekit 0.1.5 merge_methods/slerp.py:18-76, 90-99):

    θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,    cos Ω = ⟨a/‖a‖, b/‖b‖⟩

with a the base (t = 0 gives the base, t = 1 the other model). When |cos Ω| > 0.9995 (nearly
collinear, or antipodal) it falls back to linear interpolation (1−t)·a + t·b. Norms below 1e-8 count
as 1. Computed in float32 (float64 for float64 inputs) and rounded once to the input dtype.
"""

from __future__ import annotations

import torch

from seme.errors import ConfigError
from seme.methods import REQUIRED, MethodSpec, register
from seme.methods._params import as_float, non_base

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), in the dtype of ``a``."""
    dtype = torch.float64 if a.dtype == torch.float64 else torch.float32
    x = a.reshape(-1).to(dtype)
    y = b.reshape(-1).to(dtype)
    tt = torch.tensor(t, dtype=dtype, device=x.device)
    if x.numel() == 0:
        return a.clone()
    na = torch.linalg.vector_norm(x)
    nb = torch.linalg.vector_norm(y)
    na = torch.where(na > NORM_EPS, na, 1)
    nb = torch.where(nb > NORM_EPS, nb, 1)
    # normalise before multiplying so the dot cannot overflow
    dot = torch.dot(x / na, y / nb).clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        ca, cb = 1 - tt, tt
    else:
        theta = torch.acos(dot)
        sin_theta = torch.sin(theta)
        ca = torch.sin((1 - tt) * theta) / sin_theta
        cb = torch.sin(tt * theta) / sin_theta
    # scale in place where .to() already made a private copy; never write into the inputs
    out = x.mul_(ca) if x.data_ptr() != a.data_ptr() else x * ca
    out.add_(y.mul_(cb) if y.data_ptr() != b.data_ptr() else y * cb)
    return out.view(a.shape).to(a.dtype)


def slerp(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """SLERP between ``base`` and the one model that is not the base, at ``params['t']``."""
    if base is not None and not base.is_floating_point():
        raise ConfigError(f"slerp: tensors must be floating point, got {base.dtype}")
    others = non_base("slerp", base, tensors)
    if len(others) != 1:
        listed = len(tensors) - len(others)
        raise ConfigError(
            f"slerp merges exactly 2 models, the base_model and one other; got {len(others)} other "
            f"model(s)" + ("" if listed else " (is base_model one of the models?)")
        )
    t = as_float("slerp", "t", params.get("t"))
    return slerp_tensors(t, base, tensors[others[0]])


register(
    MethodSpec(
        name="slerp",
        fn=slerp,
        needs_base=True,
        global_params={"t": REQUIRED},
        model_params={},
        description="spherical interpolation between base_model (t=0) and one other model",
    )
)
