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


_INT_VIEW = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}


def _kth_largest_key(key: torch.Tensor, k: int, bits: int) -> tuple[torch.Tensor, int, int]:
    """(t, #entries > t, #entries == t) for t the k-th largest of ``key``: non-negative ints, the bit
    patterns of |x|, which order like |x|. Radix selection: a histogram of the top 15 bits, then
    an exact pick inside the one bucket that holds the k-th entry."""
    shift = bits - 16  # 16 for float32 (31 value bits), 0 for the 16-bit floats (15 value bits)
    top = key >> shift if shift else key.int()
    hist = torch.bincount(top, minlength=1 << 15)
    from_top = hist.flip(0).cumsum(0)
    i = int(torch.searchsorted(from_top, k))  # first bucket (from the top) reaching k entries
    bucket = (1 << 15) - 1 - i
    above = int(from_top[i] - hist[bucket])
    if not shift:
        return torch.tensor(bucket, dtype=key.dtype, device=key.device), above, int(hist[bucket])
    cand = key[top == bucket]
    thr = torch.kthvalue(cand, cand.numel() - (k - above) + 1).values
    return thr, above + int((cand > thr).sum()), int((cand == thr).sum())


def topk_mask(x: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of exactly ``k`` entries of largest magnitude (ties at the cut: lowest index).

    Linear time: a radix select on the bit patterns of |x| for float32/bfloat16/float16 (a
    kthvalue threshold for other dtypes) instead of sorting the whole tensor.
    """
    n = x.numel()
    flat = x.reshape(-1)
    if k >= n:
        return torch.ones_like(flat, dtype=torch.bool).view(x.shape)
    itype = _INT_VIEW.get(flat.dtype)
    if itype is not None:
        nbits = 32 if itype == torch.int32 else 16
        key = flat.view(itype) & ((1 << (nbits - 1)) - 1)  # clear the sign bit: |x|
        thr, n_gt, n_eq = _kth_largest_key(key, k, nbits)
    else:
        key = flat.abs()
        thr = torch.kthvalue(key, n - k + 1).values  # the k-th largest magnitude
        n_gt, n_eq = int((key > thr).sum()), int((key == thr).sum())
    keep = key >= thr
    if n_gt + n_eq > k:  # several entries equal the threshold: keep only the first of them
        ties = torch.nonzero(key == thr).squeeze(1)
        keep[ties[k - n_gt :]] = False
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
    delta.masked_fill_(topk_mask(delta, max(1, int(dens * delta.numel()))).logical_not_(), 0)
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
    """TIES sign election ('sum'): mask of the entries whose sign equals that of the column sum.

    ``deltas`` is (K, ...). A zero sum elects +; zero entries are never kept.
    """
    return (deltas * elect_sign(deltas)) > 0


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """+1 where Σ_k δ_k ≥ 0, else −1, in the dtype of ``deltas``."""
    return torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).to(deltas.dtype)


def disjoint_merge_(deltas: torch.Tensor, weights: torch.Tensor, normalize: bool) -> torch.Tensor:
    """Σ of the sign-agreeing entries of ``deltas`` (K, ...), ÷ Σ of their weights if ``normalize``.

    Works in place on ``deltas`` with few passes: p = δ·s is positive exactly where δ agrees with
    the elected sign s, so Σ_k max(p_k, 0)·s is the sum of the kept entries (bit for bit: the same
    values summed in the same order, only negated), and sign(max(p_k, 0)) is the keep mask.
    """
    s = elect_sign(deltas)
    deltas.mul_(s).clamp_min_(0)
    mixed = deltas.sum(dim=0).mul_(s)
    if normalize:
        divisor = deltas.sign_().mul_(weights).sum(dim=0)  # Σ of the kept models' weights
        divisor[divisor == 0] = 1
        mixed.div_(divisor)
    return mixed


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
        mixed = disjoint_merge_(deltas, w, normalize)
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
