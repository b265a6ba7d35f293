"""Spectral merge methods: ``iso_c``, ``iso_cts``, ``tsv``, ``wudi``, ``cart``, and ``svc`` (a post-hoc
option of any per-tensor method).

Every 2-D tensor (embeddings and LM head included, as FusionBench does) is merged from its task
vectors τ_k = w_k·(θ_k − θ0) (w_k = ``weight``, default 1) with α = ``lambda`` (default 1):

- ``iso_c`` (Iso-C, Marczak et al. 2025): M = Σ_k τ_k = U S Vᵀ; θ = θ0 + α·mean(S)·U Vᵀ over the
  numerically non-zero spectrum (σ > 1e-6·σ_max; ``spectrum: full``: every direction, as FusionBench).
- ``iso_cts`` (Iso-CTS, same paper): the top c = ⌊``common_fraction``·r⌋ directions of M (r its rank;
  c rounded so the rest splits evenly over the K tasks) plus, per task, the top (r − c)/K directions
  of τ_k with M's common subspace projected out; U and V replaced by their polar factors, every σ by
  their mean.
- ``tsv`` (TSV-Merge, Gargiulo et al. 2025): the top ⌊min(m, n)/K⌋ triplets of each τ_k, concatenated
  (U, S, V); θ = θ0 + α·U⊥ S V⊥ᵀ with U⊥, V⊥ the polar factors (P Qᵀ for SVD(U) = P Σ Qᵀ).
- ``wudi`` (WUDI-merging, Cheng et al. 2025, closed form): τ = (Σ_k τ_k C_k)(Σ_k C_k + εI)⁻¹ with
  C_k = τ_kᵀτ_k/‖τ_k‖²_F and ε = ``eps``·tr(Σ_k C_k)/in, the minimiser of
  Σ_k ‖(τ − τ_k)τ_kᵀ‖²_F/‖τ_k‖²_F + ε‖τ‖²_F.
- ``cart`` (Choi et al. 2024): θ̄ = mean_k θ_k; θ = θ̄ + α·Σ_k SVD_k(θ_k − θ̄), rank k =
  ⌈``rank_ratio``·min(m, n)⌉. No base model.
- ``svc: true`` (Singular Value Calibration): for the merged update ΔW = θ − θ0 = U Σ Vᵀ, per left
  direction u_r: s_r^k = ⟨u_rᵀΔW, u_rᵀτ_k⟩/‖u_rᵀτ_k‖² (τ_k unweighted), σ_r ← σ_r·K/Σ_k
  max(``svc_alpha``, s_r^k). Other tensors are left as the method made them.

Other tensors (norms, biases): θ0 + α·mean_k τ_k (``cart``: θ̄), as FusionBench does. The functions
see 2-D tensors as (out, in): the executor transposes GPT-2's Conv1D weights for them
(``MethodSpec.out_in``), which matters for ``wudi`` (input Gram), ``iso_cts`` and ``svc`` (output
subspaces). SVDs run in float32 (float64 for float64 inputs) on the tensors' device; ``wudi`` solves
in float64, where float32 loses the null space of a low-rank Σ_k C_k (tests/test_spectral_methods.py).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from seme.lazy import torch

from seme.errors import ConfigError
from seme.methods import POSTHOC_PARAMS, MethodSpec, register
from seme.methods._params import as_bool, as_float, non_base

#: singular values at or below TOL·σ_max count as zero (the "numerically non-zero spectrum")
TOL = 1e-6
SPECTRA = ("nonzero", "full")


# -- linear algebra ------------------------------------------------------------------------------
def _svd(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return torch.linalg.svd(x, full_matrices=False)


def _rank(s: torch.Tensor, scale: torch.Tensor | float | None = None) -> int:
    """How many of the (descending) singular values ``s`` exceed TOL·``scale`` (default σ_max)."""
    if s.numel() == 0:
        return 0
    top = float(s[0] if scale is None else scale)
    return int((s > TOL * top).sum()) if top > 0 else 0


def _sum(ts: list[torch.Tensor]) -> torch.Tensor:
    """Σ ts in list order (as Python's sum; no stacked copy of every input)."""
    acc = ts[0].clone()
    for t in ts[1:]:
        acc += t
    return acc


def polar(x: torch.Tensor) -> torch.Tensor:
    """The orthonormal polar factor P Qᵀ of ``x`` (SVD x = P Σ Qᵀ): the nearest matrix with
    orthonormal columns (rows, for a wide ``x``)."""
    p, _, qh = _svd(x)
    return p @ qh


def _top(x: torch.Tensor, k: int, nonzero: bool, floor: float | None = None):
    """The top ``k`` singular triplets of ``x`` (fewer with ``nonzero``: only σ > TOL·``floor``)."""
    u, s, vh = _svd(x)
    if nonzero:
        k = min(k, _rank(s, floor))
    return u[:, :k], s[:k], vh[:k]


# -- the updates (pure tensor functions) -------------------------------------------------------
def iso_c_update(taus: list[torch.Tensor], spectrum: str = "nonzero") -> torch.Tensor:
    """Iso-C: Σ_k τ_k with its spectrum flattened to the mean singular value."""
    m = _sum(taus)
    u, s, vh = _svd(m)
    r = s.numel() if spectrum == "full" else _rank(s)
    if r == 0:
        return torch.zeros_like(m)
    return s[:r].mean() * (u[:, :r] @ vh[:r])


def iso_cts_split(r: int, k: int, common_fraction: float) -> tuple[int, int]:
    """(common directions, directions per task) for rank ``r`` and ``k`` tasks, as FusionBench
    rounds them: the task-specific total is the nearest multiple of k (Python's round), capped at r."""
    common = int(r * common_fraction)
    specific = round((r - common) / k) * k
    if specific > r:  # e.g. r = 2, k = 3, fraction 0: FusionBench would ask for -1 common directions
        specific -= k
    return r - specific, specific // k


def iso_cts_update(taus: list[torch.Tensor], common_fraction: float = 0.8,
                   spectrum: str = "nonzero") -> torch.Tensor:
    """Iso-CTS: M's top common subspace plus each task's own top residual directions, orthogonalised,
    with one flat singular value."""
    full = spectrum == "full"
    m = _sum(taus)
    u, s, vh = _svd(m)
    r = s.numel() if full else _rank(s)
    if r == 0:
        return torch.zeros_like(m)
    common, per = iso_cts_split(r, len(taus), common_fraction)
    uc = u[:, :common]
    us, ss, vs = [uc], [s[:common]], [vh[:common]]
    if per:
        for t in taus:
            ut, st, vt = _top(t - uc @ (uc.T @ t), per, not full, floor=s[0])
            us.append(ut)
            ss.append(st)
            vs.append(vt)
    sigma = torch.cat(ss).mean()
    return sigma * (polar(torch.cat(us, 1)) @ polar(torch.cat(vs, 0)))


def tsv_update(taus: list[torch.Tensor], spectrum: str = "full") -> torch.Tensor:
    """TSV-Merge: each task's top ⌊min(m, n)/K⌋ triplets, U and V orthogonalised (polar factors)."""
    q = min(taus[0].shape) // len(taus)
    if q == 0:  # more tasks than dimensions: no triplet survives
        return torch.zeros_like(taus[0])
    parts = [_top(t, q, spectrum == "nonzero") for t in taus]
    s = torch.cat([p[1] for p in parts])
    if s.numel() == 0:  # nothing non-zero
        return torch.zeros_like(taus[0])
    u = polar(torch.cat([p[0] for p in parts], 1))
    vh = polar(torch.cat([p[2] for p in parts], 0))
    return (u * s) @ vh


def wudi_update(taus: list[torch.Tensor], eps: float = 1e-6) -> torch.Tensor:
    """WUDI closed form τ = (Σ τ_k C_k)(Σ C_k + εI)⁻¹, in float64 (see the module docstring)."""
    n_in = taus[0].shape[1]
    gram = torch.zeros((n_in, n_in), dtype=torch.float64, device=taus[0].device)
    rhs = torch.zeros(taus[0].shape, dtype=torch.float64, device=taus[0].device)
    for t in taus:
        t = t.to(torch.float64)
        sq = float((t * t).sum())
        if sq == 0.0:  # a task that left this tensor alone has no interference to avoid
            continue
        c = (t.T @ t).div_(sq)
        gram += c
        rhs += t @ c
    trace = float(gram.diagonal().sum())
    if trace == 0.0:
        return torch.zeros_like(taus[0])
    gram.diagonal().add_(eps * trace / n_in)
    return torch.linalg.solve(gram, rhs, left=False).to(taus[0].dtype)  # X·A = B


def cart_rank(shape: torch.Size | tuple[int, ...], rank_ratio: float) -> int:
    """⌈rank_ratio·min(m, n)⌉ (rounded to 1e-9 first, so 0.08·100 is 8, not 9)."""
    return max(1, math.ceil(round(rank_ratio * min(shape), 9)))


def cart_update(thetas: list[torch.Tensor], rank_ratio: float = 0.08) -> tuple[torch.Tensor, torch.Tensor]:
    """CART: (θ̄, Σ_k of the rank-k truncations of θ_k − θ̄)."""
    mean = _sum(thetas).div_(len(thetas))
    k = cart_rank(mean.shape, rank_ratio)
    acc = torch.zeros_like(mean)
    for t in thetas:
        u, s, vh = _top(t - mean, k, nonzero=False)
        acc += (u * s) @ vh
    return mean, acc


def svc_update(delta: torch.Tensor, taus: list[torch.Tensor], alpha: float = 0.1) -> torch.Tensor:
    """SVC: ``delta``'s singular values rescaled by K/Σ_k max(α, s_r^k) (see the module docstring).

    As FusionBench: ‖u_rᵀτ_k‖² is clamped below at 1e-12 and NaN/−inf coefficients count as α."""
    u, s, vh = _svd(delta)
    merged = s[:, None] * vh  # u_rᵀΔW for every r (rows)
    resp = torch.stack([u.T @ t for t in taus])  # [K, R, n]: u_rᵀτ_k
    den = (resp * resp).sum(-1).clamp_min(1e-12)
    coef = torch.nan_to_num((resp * merged).sum(-1) / den, nan=alpha, neginf=alpha)
    gamma = len(taus) / coef.clamp_min(alpha).sum(0)
    return (u * (gamma * s)) @ vh


# -- parameters --------------------------------------------------------------------------------
def _spectrum(method: str, params: dict, default: str) -> str:
    v = params.get("spectrum", default)
    if v not in SPECTRA:
        raise ConfigError(f"{method}: spectrum must be 'nonzero' or 'full', got {v!r}")
    return v


def _in_range(method: str, name: str, value: Any, lo: float, hi: float, lo_open: bool) -> float:
    v = as_float(method, name, value)
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise ConfigError(f"{method}: {name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {v}")
    return v


def _positive(method: str, name: str, value: Any) -> float:
    v = as_float(method, name, value)
    if v <= 0:
        raise ConfigError(f"{method}: {name} must be > 0, got {v}")
    return v


def _work_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _is_matrix(t: torch.Tensor) -> bool:
    return t.dim() == 2 and t.numel() > 0


# -- the registered methods ------------------------------------------------------------------------
def _base_method(name: str, update: Callable[[list[torch.Tensor], dict], torch.Tensor]) -> Callable:
    """A method θ = θ0 + α·update(τ_1…τ_K) on matrices, θ0 + α·mean τ_k on other tensors."""

    def merge(base: torch.Tensor | None, tensors: list[torch.Tensor], model_params: list[dict],
              params: dict, rng: torch.Generator | None = None) -> torch.Tensor:
        idx = non_base(name, base, tensors)
        if not base.is_floating_point():
            raise ConfigError(f"{name}: tensors must be floating point, got {base.dtype}")
        lam = as_float(name, "lambda", params.get("lambda", 1.0))
        weights = [as_float(name, "weight", model_params[i].get("weight"), f"model {i}") for i in idx]
        if not idx:
            return base
        wd = _work_dtype(base)
        b = base.to(wd)
        taus = [(tensors[i].to(wd) - b).mul_(w) for i, w in zip(idx, weights)]
        tau = update(taus, params) if _is_matrix(base) else _sum(taus).div_(len(taus))
        return b.add_(tau, alpha=lam) if b is not base else b + lam * tau

    merge.__name__ = merge.__qualname__ = name
    merge.__doc__ = f"{name}: θ0 + λ·update on 2-D tensors, θ0 + λ·mean τ_k elsewhere."
    return merge


iso_c = _base_method("iso_c", lambda taus, p: iso_c_update(taus, _spectrum("iso_c", p, "nonzero")))
iso_cts = _base_method("iso_cts", lambda taus, p: iso_cts_update(
    taus, _in_range("iso_cts", "common_fraction", p.get("common_fraction", 0.8), 0.0, 1.0, False),
    _spectrum("iso_cts", p, "nonzero")))
tsv = _base_method("tsv", lambda taus, p: tsv_update(taus, _spectrum("tsv", p, "full")))
wudi = _base_method("wudi", lambda taus, p: wudi_update(taus, _positive("wudi", "eps", p.get("eps", 1e-6))))


def cart(base: torch.Tensor | None, tensors: list[torch.Tensor], model_params: list[dict], params: dict,
         rng: torch.Generator | None = None) -> torch.Tensor:
    """CART: θ̄ + λ·Σ_k low-rank(θ_k − θ̄) on 2-D tensors, θ̄ elsewhere (``base`` is not used)."""
    if not tensors:
        raise ConfigError("cart: no models to merge")
    if not tensors[0].is_floating_point():
        raise ConfigError(f"cart: tensors must be floating point, got {tensors[0].dtype}")
    lam = as_float("cart", "lambda", params.get("lambda", 1.0))
    ratio = _in_range("cart", "rank_ratio", params.get("rank_ratio", 0.08), 0.0, 1.0, True)
    wd = _work_dtype(tensors[0])
    thetas = [t.to(wd) for t in tensors]
    if not _is_matrix(tensors[0]):
        return _sum(thetas).div_(len(thetas))
    mean, low = cart_update(thetas, ratio)
    return mean.add_(low, alpha=lam)


_COMMON = {"lambda": 1.0}
_WEIGHT = {"weight": 1.0}
for _spec in (
    MethodSpec("iso_c", iso_c, True, {**_COMMON, "spectrum": "nonzero"}, _WEIGHT,
               "Σ τ_k with a flat spectrum over its non-zero directions (arXiv:2502.04959)", out_in=True),
    MethodSpec("iso_cts", iso_cts, True, {**_COMMON, "common_fraction": 0.8, "spectrum": "nonzero"}, _WEIGHT,
               "common + task-specific subspaces, orthogonalised, flat spectrum (arXiv:2502.04959)",
               out_in=True),
    MethodSpec("tsv", tsv, True, {**_COMMON, "spectrum": "full"}, _WEIGHT,
               "per-task top singular triplets, orthogonalised (TSV-Merge, arXiv:2412.00081)", out_in=True),
    MethodSpec("wudi", wudi, True, {**_COMMON, "eps": 1e-6}, _WEIGHT,
               "closed-form interference minimiser on the task vectors' input Grams (arXiv:2503.08099)",
               out_in=True),
    MethodSpec("cart", cart, False, {**_COMMON, "rank_ratio": 0.08}, {},
               "mean + low-rank centred task vectors, no base (CART, arXiv:2412.12153)", out_in=True),
):
    register(_spec)


# -- SVC, the post-hoc option ----------------------------------------------------------------------
def with_svc(spec: MethodSpec) -> MethodSpec:
    """``spec`` followed by SVC on every 2-D tensor where the resolved ``svc`` is true.

    Named ``<method>+svc`` (the manifest records it so); whole tensors only (no row blocks), and
    never the fused kernels, which know nothing of SVC."""
    inner = spec.fn

    def merge(base: torch.Tensor | None, tensors: list[torch.Tensor], model_params: list[dict],
              params: dict, rng: torch.Generator | None = None) -> torch.Tensor:
        merged = inner(base, tensors, model_params, params, rng)
        if not as_bool("svc", "svc", params.get("svc", False)) or not _is_matrix(merged):
            return merged
        alpha = _positive("svc", "svc_alpha", params.get("svc_alpha", 0.1))
        idx = non_base("svc", base, tensors)
        if not idx:
            return merged
        wd = _work_dtype(base)
        b = base.to(wd)
        taus = [tensors[i].to(wd) - b for i in idx]
        return b + svc_update(merged.to(wd) - b, taus, alpha)

    return MethodSpec(f"{spec.name}+svc", merge, True, {**spec.global_params, **POSTHOC_PARAMS},
                      spec.model_params, f"{spec.description}, then singular value calibration "
                      "(arXiv:2602.05536)", out_in=True)
