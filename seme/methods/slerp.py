"""SLERP: spherical interpolation between the base model and one other model.

Per tensor (flattened as one vector, mergekit 0.1.5 merge_methods/slerp.py:20-78, 92-101):

    θ = sin((1−t)Ω)/sin Ω · a + sin(tΩ)/sin Ω · b,    cos Ω = ⟨a/‖a‖, b/‖b‖⟩

with a the base (t = 0 gives the base, t = 1 the other model). When |cos Ω| > 0.9995 (nearly
collinear, or antipodal) it falls back to linear interpolation (1−t)·a + t·b. Norms below 1e-8 count
as 1. Computed in float32 (float64 for float64 inputs) and rounded once to the input dtype.
"""

from __future__ import annotations

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import REQUIRED, MethodSpec, register
from seme.methods._params import as_float, non_base

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8
CHUNK = 1 << 20  # entries per chunk of float32 scratch


def slerp_coefficients(t: float, x: torch.Tensor, y: torch.Tensor, done=None) -> tuple[torch.Tensor, torch.Tensor, list]:
    """(c_a, c_b, chunks) with θ = c_a·x + c_b·y for the flat, non-empty ``x`` (t = 0) and ``y``.

    The norms and the dot are summed per chunk in the same order as mergekit, which makes the
    coefficients (ill-conditioned near collinearity) agree; the fused CPU kernels use them too.
    ``done(lo, hi)``, if given, is called after each chunk's last use in each pass (the executor
    gives the inputs' pages of that chunk back, so the two inputs are never resident whole).
    """
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    tt = torch.tensor(t, dtype=dtype, device=x.device)
    spans = [(i, min(i + CHUNK, x.numel())) for i in range(0, x.numel(), CHUNK)]

    # Two reused chunk buffers: a fresh float32 temporary per op and chunk cost a page fault per
    # 4 KiB (allocations this large are mmap'ed), which made SLERP's time mostly system time.
    sa, sb = (torch.empty(min(CHUNK, x.numel()), dtype=dtype, device=x.device) for _ in range(2))

    def used(part: torch.Tensor, i: int, j: int) -> torch.Tensor:
        if done is not None:
            done(i, j)
        return part

    def norm(v: torch.Tensor) -> torch.Tensor:
        parts = torch.stack([used(torch.linalg.vector_norm(sa[: j - i].copy_(v[i:j])), i, j) for i, j in spans])
        n = torch.linalg.vector_norm(parts)
        return torch.where(n > NORM_EPS, n, 1)

    def dot_part(i: int, j: int) -> torch.Tensor:
        a = sa[: j - i].copy_(x[i:j]).div_(na)  # (x / na) * (y / nb), op for op, in place
        return used(a.mul_(sb[: j - i].copy_(y[i:j]).div_(nb)).sum(), i, j)

    na, nb = norm(x), norm(y)
    # normalise before multiplying so the dot cannot overflow
    dot = torch.stack([dot_part(i, j) for i, j in spans])
    dot = dot.sum().clamp(-1, 1)
    if dot.abs() > DOT_THRESHOLD:
        return 1 - tt, tt, spans
    theta = torch.acos(dot)
    sin_theta = torch.sin(theta)
    return torch.sin((1 - tt) * theta) / sin_theta, torch.sin(tt * theta) / sin_theta, spans


def slerp_tensors(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``a`` (t = 0) to ``b`` (t = 1), in the dtype of ``a``.

    Works through the flattened tensors in chunks of ``CHUNK`` entries, so the float32 scratch
    stays small for large half-precision tensors; norms and dot are summed per chunk in the same
    order as mergekit, which makes the coefficients (ill-conditioned near collinearity) agree.
    """
    x, y = a.reshape(-1), b.reshape(-1)
    if x.numel() == 0:
        return a.clone()
    ca, cb, spans = slerp_coefficients(t, x, y)
    dtype = ca.dtype
    out = torch.empty_like(x)
    for i, j in spans:
        out[i:j] = ca * x[i:j].to(dtype) + cb * y[i:j].to(dtype)
    return out.view(a.shape)


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
