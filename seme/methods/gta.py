"""Generalized task arithmetic: task_arithmetic, ties, dare_linear, dare_ties.

All four share one recipe (mergekit 0.1.5, merge_methods/generalized_task_arithmetic.py:91-145):

1. task vectors  δ_i = θ_i − θ_base  for every model that is not the base;
2. sparsify each δ_i: TIES keeps the top ``density`` fraction by magnitude, DARE keeps each entry
   with probability ``density``; ``rescale`` then restores the L1 norm of δ_i (mergekit's
   ``rescale: true``) or divides by ``density`` (``rescale: exact``, DARE's 1/p);
3. weight: δ_i ← w_i δ_i;
4. TIES / DARE-TIES: elect a sign per entry, s = sign(Σ_i δ_i) (0 counts as +), and drop every
   entry whose sign differs (zeros are dropped too);
5. Δ = Σ_i δ_i, divided by Σ_i w_i over the kept entries when ``normalize``, times ``lambda``;
6. θ = θ_base + Δ.

Steps run in the compute dtype in mergekit's order, so results agree with mergekit bit for bit on
the deterministic methods (up to summation order in float32). DARE draws its masks from the given
per-tensor generator, so they are reproducible and independent of tensor order and thread count.
"""

from __future__ import annotations

from functools import partial

import torch

from seme.errors import ConfigError
from seme.methods import MethodSpec, register
from seme.methods._params import as_bool, as_float, density, non_base

_EPS = 1e-7  # below this, a norm counts as zero and the mask is not rescaled (mergekit sparsify.py:27)


def rescale_mode(method: str, value: object) -> str | None:
    """``rescale`` -> None | "l1" (mergekit's ``true``: keep the L1 norm) | "exact" (÷ density)."""
    if isinstance(value, str) and value.strip().lower() == "exact":
        return "exact"
    if isinstance(value, str) and value.strip().lower() == "l1":
        return "l1"
    try:
        return "l1" if as_bool(method, "rescale", value) else None
    except ConfigError:
        raise ConfigError(f"{method}: rescale must be true, false or 'exact', got {value!r}") from None


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries of largest magnitude (ties at the cut: lowest index).

    Uses a kthvalue threshold (linear-time selection) instead of sorting the whole tensor.
    """
    n = x.numel()
    flat = x.reshape(-1)
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view(x.shape)
    mag = flat.abs()
    if mag.device.type == "cpu" and mag.dtype in (torch.bfloat16, torch.float16):
        mag = mag.float()  # |x| is exact in float32; CPU selection kernels are fastest there
    thr = torch.kthvalue(mag, n - k + 1).values  # the k-th largest magnitude
    keep = mag > thr
    missing = k - int(keep.sum())
    if missing > 0:  # several entries equal the threshold: keep the first `missing` of them
        ties = torch.nonzero(mag == thr).squeeze(1)[:missing]
        keep[ties] = True
    return keep.view(x.shape)


def _l1(x: torch.Tensor) -> torch.Tensor:
    """L1 norm, accumulated in float64 and rounded once to ``x``'s dtype.

    mergekit sums in the dtype itself; a float64 accumulator gives that sum correctly rounded, so
    the result no longer depends on how many threads split the reduction.
    """
    return x.abs().sum(dtype=torch.float64).to(x.dtype)


def _rescale_l1_(delta: torch.Tensor, before: torch.Tensor) -> None:
    """Scale the masked ``delta`` in place so its L1 norm is ``before`` again (mergekit's rescale)."""
    after = _l1(delta)
    if before < _EPS or after < _EPS:
        return
    delta.mul_(before / after)


def magnitude_(delta: torch.Tensor, dens: float, rescale: str | None) -> torch.Tensor:
    """TIES trim, in place: keep the ``max(1, int(density·n))`` largest-magnitude entries."""
    if dens >= 1.0 or delta.numel() == 0:
        return delta
    before = _l1(delta) if rescale == "l1" else None
    delta.mul_(topk_mask(delta, max(1, int(dens * delta.numel()))))
    if rescale == "l1":
        _rescale_l1_(delta, before)
    elif rescale == "exact":
        delta.div_(dens)
    return delta


def dare_(delta: torch.Tensor, dens: float, rescale: str | None, rng: torch.Generator) -> torch.Tensor:
    """DARE drop, in place: keep each entry with probability ``density`` (Bernoulli from ``rng``)."""
    if dens >= 1.0 or delta.numel() == 0:
        return delta
    # mergekit works in float32 for float16 on CPU (bernoulli has no CPU half kernel)
    work = delta.float() if (delta.dtype == torch.float16 and delta.device.type == "cpu") else delta
    mask = torch.empty_like(work).bernoulli_(dens, generator=rng)
    before = _l1(work) if rescale == "l1" else None
    work.mul_(mask)
    del mask
    if rescale == "l1":
        _rescale_l1_(work, before)
    elif rescale == "exact":
        work.div_(dens)
    if work is not delta:
        delta.copy_(work)
    return delta


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election ('sum'): keep entries whose sign equals that of the column sum.

    ``deltas`` is (K, ...). A zero sum elects +; zero entries are never kept.
    """
    positive = deltas.sum(dim=0) >= 0
    return torch.where(positive, deltas > 0, deltas < 0)


def gta_merge(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None,
    *,
    method: str,
    sparsify: str | None,
    consensus: bool,
) -> torch.Tensor:
    """The shared recipe (module docstring); ``sparsify`` is None, "magnitude" or "random"."""
    idx = non_base(method, base, tensors)
    if not base.is_floating_point():
        raise ConfigError(f"{method}: tensors must be floating point, got {base.dtype}")
    normalize = as_bool(method, "normalize", params["normalize"])
    lam = as_float(method, "lambda", params["lambda"])
    rescale = rescale_mode(method, params.get("rescale", False))
    weights = [as_float(method, "weight", model_params[i].get("weight"), f"model {i}") for i in idx]
    dens = [
        density(method, model_params[i].get("density", 1.0), f"model {i}") if sparsify else 1.0
        for i in idx
    ]
    if not idx:
        return base
    if sparsify == "random" and rng is None:
        raise ValueError(f"{method}: a torch.Generator is required for DARE masks")

    deltas = torch.empty((len(idx), *base.shape), dtype=base.dtype, device=base.device)
    for j, i in enumerate(idx):
        d = torch.sub(tensors[i], base, out=deltas[j])
        if sparsify == "magnitude":
            magnitude_(d, dens[j], rescale)
        elif sparsify == "random":
            dare_(d, dens[j], rescale, rng)
    w = torch.tensor(weights, dtype=deltas.dtype, device=deltas.device).view(-1, *([1] * base.dim()))
    deltas.mul_(w)

    if consensus:
        keep = sign_consensus(deltas)
        deltas.mul_(keep)
        mixed = deltas.sum(dim=0)
        if normalize:
            divisor = (w * keep).sum(dim=0)
            divisor[divisor == 0] = 1
            mixed.div_(divisor)
    else:
        mixed = deltas.sum(dim=0)
        if normalize:
            divisor = w.sum(dim=0)
            divisor[divisor.abs() < 1e-8] = 1
            mixed.div_(divisor)
    del deltas
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed.add_(base)


_GLOBAL = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
_MODEL = {"weight": 1.0, "density": 1.0}

for _name, _sparsify, _consensus, _normalize, _rescale, _desc in (
    ("task_arithmetic", None, False, False, False, "base + Σ w·(θ−base) (arXiv:2212.04089)"),
    ("ties", "magnitude", True, True, False, "trim, elect sign, disjoint merge (arXiv:2306.01708)"),
    ("dare_ties", "random", True, False, True, "DARE drop + TIES sign election (arXiv:2311.03099)"),
    ("dare_linear", "random", False, False, True, "DARE drop + task arithmetic (arXiv:2311.03099)"),
):
    register(
        MethodSpec(
            name=_name,
            fn=partial(gta_merge, method=_name, sparsify=_sparsify, consensus=_consensus),
            needs_base=True,
            global_params={**_GLOBAL, "normalize": _normalize, "rescale": _rescale},
            model_params=dict(_MODEL),
            description=_desc,
        )
    )
