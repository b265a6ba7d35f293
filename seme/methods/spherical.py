"""Interpolation on the sphere beyond two-model SLERP: nuslerp, multislerp, karcher.

Each follows mergekit 0.1.5 step for step in the compute dtype (merge_methods/nuslerp.py,
multislerp.py, karcher.py), so results agree to rounding:

- **nuslerp**: SLERP between exactly two models at t = w₁/(w₀+w₁) (0.5 when the weights sum to ~0);
  with a ``base_model``, between their task vectors, added back to the base. ``nuslerp_flatten``
  (default true) treats the tensor as one vector; otherwise each row (``nuslerp_row_wise: false``)
  or each column (``true``) is interpolated on its own. Nearly collinear vectors
  (1 − cos² ≤ 1e-16) are interpolated linearly.
- **multislerp**: barycentric interpolation of any number of models on the hypersphere: unit
  vectors, their weighted mean direction, the weighted tangent vectors there, the exponential map
  back, scaled by the weighted mean norm; with a ``base_model``, of the task vectors. One model
  alone is returned as is.
- **karcher**: the Karcher (Riemannian) mean of all inputs' directions with equal weights
  (fixed-point iteration, ``max_iter`` steps or until the tangent norm < ``tol``), scaled by the
  mean norm. ``base_model``, if given, is one of the averaged inputs (as in mergekit, where the
  base is always an input).
"""

from __future__ import annotations

import math

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import MethodSpec, register
from seme.methods._params import as_bool, as_float, non_base


def _others(method: str, base: torch.Tensor | None, tensors: list[torch.Tensor]) -> list[int]:
    """Indices of the inputs that are not the base (all of them when there is no base)."""
    first = tensors[0] if tensors else base
    if first is not None and not first.is_floating_point():
        raise ConfigError(f"{method}: tensors must be floating point, got {first.dtype}")
    if base is None:
        for i, t in enumerate(tensors):
            if t.shape != tensors[0].shape:
                raise ConfigError(f"{method}: model {i} has shape {list(t.shape)}, model 0 has {list(tensors[0].shape)}")
        return list(range(len(tensors)))
    return non_base(method, base, tensors)


def _weights(method: str, idx: list[int], model_params: list[dict]) -> list[float]:
    return [as_float(method, "weight", model_params[i].get("weight"), f"model {i}") for i in idx]


# --- nuslerp -------------------------------------------------------------------------------------


def nuslerp_tensors(t: float, v0: torch.Tensor, v1: torch.Tensor, row_wise: bool, flatten: bool,
                    eps: float = 1e-8) -> torch.Tensor:
    """SLERP from ``v0`` (t = 0) to ``v1`` (t = 1): of the flattened tensors (``flatten``), else of
    each vector along the last dim (each column when ``row_wise``)."""
    shape = v0.shape
    if flatten:
        v0, v1 = v0.reshape(-1), v1.reshape(-1)
    elif row_wise:
        v0, v1 = v0.transpose(0, -1), v1.transpose(0, -1)

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / torch.linalg.vector_norm(x, dim=-1, keepdim=True).clamp(min=1e-7)

    cos = torch.sum(unit(v0) * unit(v1), dim=-1, keepdim=True).clamp(-1, 1)
    linear = (1 - cos.square()) <= eps**2
    theta = torch.acos(torch.where(linear, 0, cos))
    out = (torch.sin((1 - t) * theta) * v0 + torch.sin(t * theta) * v1) / torch.sin(theta)
    out = torch.where(linear, (1 - t) * v0 + t * v1, out)
    if row_wise and not flatten:
        out = out.transpose(0, -1)
    return out.reshape(shape)


def nuslerp(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """NuSLERP of the two models that are not the base (of their task vectors with a base)."""
    idx = _others("nuslerp", base, tensors)
    if len(idx) != 2:
        raise ConfigError(f"nuslerp merges exactly 2 models besides base_model, got {len(idx)}")
    w = _weights("nuslerp", idx, model_params)
    row_wise = as_bool("nuslerp", "nuslerp_row_wise", params.get("nuslerp_row_wise", False))
    flatten = as_bool("nuslerp", "nuslerp_flatten", params.get("nuslerp_flatten", True))
    total = sum(w)
    t = 0.5 if abs(total) < 1e-6 else w[1] / total
    a, b = tensors[idx[0]], tensors[idx[1]]
    if base is None:
        return nuslerp_tensors(t, a, b, row_wise, flatten)
    return base + nuslerp_tensors(t, a - base, b - base, row_wise, flatten)


# --- multislerp ----------------------------------------------------------------------------------


def multislerp(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Multi-SLERP of the models that are not the base (module docstring)."""
    idx = _others("multislerp", base, tensors)
    if not idx:
        raise ConfigError("multislerp needs at least one model besides base_model")
    w_list = _weights("multislerp", idx, model_params)
    normalize = as_bool("multislerp", "normalize_weights", params.get("normalize_weights", True))
    eps = as_float("multislerp", "eps", params.get("eps", 1e-8))
    if eps < 0:
        raise ConfigError(f"multislerp: eps must be ≥ 0, got {eps}")
    if len(idx) == 1:
        return tensors[idx[0]]
    if normalize and sum(w_list) == 0:
        raise ConfigError(f"multislerp: the weights sum to 0 ({w_list}); cannot normalize")
    vs = torch.stack([tensors[i] for i in idx])
    if base is not None:
        vs -= base
    flat = vs.view(len(idx), -1)
    w = torch.tensor(w_list, dtype=vs.dtype, device=vs.device)
    if normalize:
        w = w / w.sum()
    norms = torch.linalg.vector_norm(flat, dim=-1, keepdim=True)
    units = flat / (norms + eps)
    mean = (units * w.view(-1, 1)).sum(0)
    mean_norm = torch.linalg.vector_norm(mean)
    if mean_norm < eps:
        if len(idx) != 2:
            raise ConfigError(
                "multislerp: the weighted mean direction of the models is zero (antipodal models with "
                "balancing weights); use other weights"
            )
        out = (vs[0] * w[0] + vs[1] * w[1]).view(vs.shape[1:])
        return out if base is None else out + base
    mean = mean / mean_norm
    tangent = units - (units * mean).sum(-1, keepdim=True) * mean
    tan = (tangent * w.view(-1, 1)).sum(0)
    del tangent, units
    tn = torch.linalg.vector_norm(tan) + eps
    out = mean * torch.cos(tn) + tan * (torch.sin(tn) / tn)
    out = (out * (norms.squeeze(-1) * w).sum()).view(vs.shape[1:])
    return out if base is None else out + base


# --- karcher -------------------------------------------------------------------------------------


def karcher_mean(tensors: list[torch.Tensor], alphas: list[float], max_iter: int, tol: float) -> torch.Tensor:
    """Weighted Karcher mean of the tensors' directions, times Σ α_k‖x_k‖ (mergekit karcher.py)."""
    if len(tensors) == 1:
        return tensors[0]
    acc = torch.float64 if tensors[0].dtype == torch.float64 else torch.float32

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x.to(acc))

    norms = [norm(x) for x in tensors]
    units = [torch.zeros_like(x) if n.item() == 0.0 else (x / n).to(x.dtype) for x, n in zip(tensors, norms)]
    valid = [k for k, n in enumerate(norms) if n.item() > tol]
    if not valid:
        return torch.zeros_like(tensors[0])
    a_sum = sum(alphas[k] for k in valid)
    pts = [(alphas[k] / a_sum, units[k]) for k in valid]

    mean = torch.zeros_like(pts[0][1])
    for a, u in pts:
        mean += a * u
    mn = norm(mean)
    mean = pts[0][1].clone() if mn.item() < tol else (mean / mn).to(mean.dtype)
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for a, u in pts:
            dot = torch.clamp(torch.dot(mean.flatten(), u.flatten()), -1.0, 1.0)
            theta = torch.arccos(dot)
            if theta.item() < tol:
                continue
            tangent += a * (theta / torch.sin(theta)) * (u - dot * mean)
        tn = norm(tangent)
        if tn.item() < tol:
            break
        mean = (torch.cos(tn) * mean + torch.sin(tn) * (tangent / tn)).to(mean.dtype)
        un = norm(mean)
        if un.item() > tol:
            mean = (mean / un).to(mean.dtype)
    scale = sum(a * n for a, n in zip(alphas, norms))
    return scale * mean


def karcher(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None = None,
) -> torch.Tensor:
    """Karcher mean of every input with equal weights; the base, if given, is one of them."""
    max_iter = as_float("karcher", "max_iter", params.get("max_iter", 10))
    if max_iter < 0 or max_iter != math.floor(max_iter):
        raise ConfigError(f"karcher: max_iter must be a whole number ≥ 0, got {params.get('max_iter')!r}")
    tol = as_float("karcher", "tol", params.get("tol", 1e-5))
    if tol < 0:
        raise ConfigError(f"karcher: tol must be ≥ 0, got {tol}")
    xs = list(tensors)
    if base is not None and not any(x is base for x in xs):  # mergekit adds the base as the last input
        xs.append(base)
    _others("karcher", None, xs)
    return karcher_mean(xs, [1.0 / len(xs)] * len(xs), int(max_iter), tol)


register(
    MethodSpec(
        name="nuslerp",
        fn=nuslerp,
        needs_base=False,
        global_params={"nuslerp_row_wise": False, "nuslerp_flatten": True},
        model_params={"weight": 1.0},
        description="SLERP of two models (or of their task vectors) at t = w1/(w0+w1), flat, per row or column",
    )
)
register(
    MethodSpec(
        name="multislerp",
        fn=multislerp,
        needs_base=False,
        global_params={"normalize_weights": True, "eps": 1e-8},
        model_params={"weight": 1.0},
        description="barycentric interpolation of any number of models on the hypersphere",
    )
)
register(
    MethodSpec(
        name="karcher",
        fn=karcher,
        needs_base=False,
        global_params={"max_iter": 10, "tol": 1e-5},
        model_params={},
        description="Karcher mean of all inputs on the hypersphere (arXiv:2603.04972)",
    )
)
