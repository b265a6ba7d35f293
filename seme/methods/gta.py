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
the deterministic methods (up to summation order in float32). DARE's masks are a hash of
(key, entry index) with keys from the per-tensor seed (``dare_keys``), so they are reproducible and
independent of tensor order, blocks and thread count.
"""

from __future__ import annotations

import hashlib
from functools import partial

from seme.lazy import torch

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


def _int_view(dtype: torch.dtype) -> torch.dtype | None:
    """The signed integer dtype of a float dtype's width (its bits, for exact key comparisons)."""
    return {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}.get(dtype)


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
    itype = _int_view(flat.dtype)
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


_M32 = 0xFFFFFFFF
_HASH_PIECE = 1 << 16


def dare_keys(seed: int | torch.Generator, k: int) -> list[tuple[int, int]]:
    """Two 32-bit hash keys per task vector, from the per-tensor seed (or the seed a generator was
    given): sha256 of (seed, j), so the torch and the torch-free paths derive the same masks."""
    if not isinstance(seed, int):
        seed = seed.initial_seed()
    keys = []
    for j in range(k):
        h = hashlib.sha256(f"seme-dare:{seed}:{j}".encode()).digest()
        keys.append((int.from_bytes(h[:4], "little"), int.from_bytes(h[4:8], "little")))
    return keys


def dare_threshold(dens: float) -> int:
    """An entry is kept when its 32-bit hash is below this: P(keep) = density (to 2⁻³²)."""
    return min(int(dens * 2.0**32), _M32)


def _fmix32_(x: torch.Tensor, tmp: torch.Tensor) -> None:
    """murmur3's 32-bit finalizer, in place on int64 values < 2³² (products wrap mod 2⁶⁴)."""
    for mult, shift in ((0x85EBCA6B, 16), (0xC2B2AE35, 13), (None, 16)):
        torch.bitwise_right_shift(x, shift, out=tmp)
        x.bitwise_xor_(tmp)
        if mult is not None:
            x.mul_(mult).bitwise_and_(_M32)


def dare_keep(key: tuple[int, int], dens: float, lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """DARE's keep mask for the flat entries [lo, hi) of one task vector.

    A counter-based hash of (key, flat index), not a sequential random stream: any block can be
    masked on its own, in any order, with the same result as the whole tensor; the CPU kernels
    (``seme.kernels``) compute the same mask. P(keep) = density.
    """
    out = torch.empty(hi - lo, dtype=torch.bool, device=device)
    thr = dare_threshold(dens)
    for a in range(lo, hi, _HASH_PIECE):  # int64 scratch of 512 KiB: below the heap's mmap threshold
        b = min(hi, a + _HASH_PIECE)
        torch.lt(entry_hash(key, a, b, device), thr, out=out[a - lo : b - lo])
    return out


def entry_hash(key: tuple[int, int], lo: int, hi: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The 32-bit hashes (as int64) of the flat entries [lo, hi) under ``key``: DARE's mask is
    hash < density·2³²; DELLA compares them with a per-entry probability the same way."""
    i = torch.arange(lo, hi, dtype=torch.int64, device=device)
    tmp = torch.empty_like(i)
    h = torch.bitwise_and(i, _M32).bitwise_xor_(key[0])
    _fmix32_(h, tmp)
    torch.bitwise_right_shift(i, 32, out=tmp)
    h.bitwise_xor_(tmp).bitwise_xor_(key[1])
    _fmix32_(h, tmp)
    return h


def dare_(delta: torch.Tensor, dens: float, rescale: str | None, key: tuple[int, int]) -> torch.Tensor:
    """DARE drop, in place: keep each entry with probability ``density`` (the hash mask of ``key``)."""
    if dens >= 1.0 or delta.numel() == 0:
        return delta
    before = _l1(delta) if rescale == "l1" else None
    keep = dare_keep(key, dens, 0, delta.numel(), delta.device).view(delta.shape)
    delta.masked_fill_(keep.logical_not_(), 0)
    del keep
    if rescale == "l1":
        _rescale_l1_(delta, before)
    elif rescale == "exact":
        delta.div_(dens)
    return delta


def sign_consensus(deltas: torch.Tensor) -> torch.Tensor:
    """TIES sign election ('sum'): mask of the entries whose sign equals that of the column sum.

    ``deltas`` is (K, ...). A zero sum elects +; zero entries are never kept.
    """
    return (deltas * elect_sign(deltas)) > 0


def elect_sign(deltas: torch.Tensor) -> torch.Tensor:
    """+1 where Σ_k δ_k ≥ 0, else −1, in the dtype of ``deltas``."""
    return (deltas.sum(dim=0) >= 0).to(deltas.dtype).mul_(2).sub_(1)  # 1·2−1, 0·2−1: exact


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
        divisor.add_(divisor == 0)  # 0 → 1, others + 0 unchanged (faster than boolean indexing)
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
    idx, normalize, lam, rescale, weights, dens = _settings(method, base, tensors, model_params, params, sparsify)
    if not idx:
        return base
    if sparsify == "random" and rng is None:
        raise ValueError(f"{method}: a torch.Generator is required for DARE masks")

    keys = dare_keys(rng, len(idx)) if sparsify == "random" else None
    deltas = torch.empty((len(idx), *base.shape), dtype=base.dtype, device=base.device)
    for j, i in enumerate(idx):
        d = torch.sub(tensors[i], base, out=deltas[j])
        if sparsify == "magnitude":
            magnitude_(d, dens[j], rescale)
        elif sparsify == "random":
            dare_(d, dens[j], rescale, keys[j])
    mixed = _combine(deltas, weights, base, normalize, consensus)
    del deltas
    return _finish(mixed, lam, base)


def _settings(
    method: str,
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    sparsify: str | None,
) -> tuple[list[int], bool, float, str | None, list[float], list[float]]:
    """Checked parameters: (non-base indices, normalize, lambda, rescale, weights, densities)."""
    idx = non_base(method, base, tensors)
    if not base.is_floating_point():
        raise ConfigError(f"{method}: tensors must be floating point, got {base.dtype}")
    return (idx, *checked_params(method, idx, model_params, params, sparsify))


def checked_params(
    method: str, idx: list[int], model_params: list[dict], params: dict, sparsify: str | None
) -> tuple[bool, float, str | None, list[float], list[float]]:
    """(normalize, lambda, rescale, weights, densities) of the task vectors ``idx``, checked."""
    normalize = as_bool(method, "normalize", params["normalize"])
    lam = as_float(method, "lambda", params["lambda"])
    rescale = rescale_mode(method, params.get("rescale", False))
    weights = [as_float(method, "weight", model_params[i].get("weight"), f"model {i}") for i in idx]
    dens = [
        density(method, model_params[i].get("density", 1.0), f"model {i}") if sparsify else 1.0
        for i in idx
    ]
    return normalize, lam, rescale, weights, dens


def _combine(
    deltas: torch.Tensor, weights: list[float], base: torch.Tensor, normalize: bool, consensus: bool
) -> torch.Tensor:
    """Steps 3-5 on the sparsified task vectors ``deltas`` (K, ...), in place: weight, (elect the
    sign,) sum, normalize; :func:`_finish` applies λ and adds the base."""
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
    return mixed


def _finish(mixed: torch.Tensor, lam: float, base: torch.Tensor) -> torch.Tensor:
    """θ = θ_base + λ·Δ, in place on ``mixed``."""
    if lam != 1.0:
        mixed.mul_(lam)
    return mixed.add_(base)


# --- TIES in two passes (streamed by the executor in row blocks) --------------------------------
#
# Pass 1 (:func:`ties_prepare`) reduces each task vector to a few numbers, one source at a time and
# block by block: the top-k threshold t on the bit patterns of |δ| (a 15-bit histogram summed over
# blocks, exact; for float32 the candidates of the one bucket holding the k-th entry are gathered
# with their flat indices and the pick made among them), the flat index ``cut`` before which the
# entries equal to t are kept (topk_mask's tie rule: lowest indices first) and, for ``rescale:
# l1``, the factor before/after. Pass 2 (:func:`ties_block`) recomputes δ for a block of rows and
# applies exactly the whole-tensor operations, element-wise: the result is bit-identical to
# :func:`gta_merge`. The L1 norms are float64 sums of per-block float64 sums, rounded once, as the
# whole-tensor sum is (whose own order already depends on the thread count).

_PASS1_ELEMS = 1 << 20  # elements per pass-1 block (a multiple of 64): δ, key and masks stay small


def _blocks(n: int) -> range:
    return range(0, n, _PASS1_ELEMS)


def _delta_block(t: torch.Tensor, b: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """δ[lo:hi] of the flat tensors ``t`` and ``b``."""
    return torch.sub(t[lo:hi], b[lo:hi])


def _abs_key(d: torch.Tensor, itype: torch.dtype) -> torch.Tensor:
    """Bit patterns of |d| as non-negative ints (they order like |d|)."""
    nbits = 32 if itype == torch.int32 else 16
    return d.view(itype) & ((1 << (nbits - 1)) - 1)


def _keep_mask(key: torch.Tensor, thr: object, cut: int, lo: int) -> torch.Tensor:
    """Entries of a block starting at flat index ``lo`` that the top-k trim keeps."""
    if cut <= lo:
        return key > thr
    keep = key >= thr
    if cut < lo + key.numel():  # from the cut on, entries equal to thr are dropped
        keep.view(-1)[cut - lo :] = key.reshape(-1)[cut - lo :] > thr
    return keep


def _nth_true(mask: torch.Tensor, m: int, chunk: int = 1 << 13) -> int:
    """Flat index of the ``m``-th (0-based) True of ``mask``, which holds more than ``m`` Trues.

    Counts per chunk first, so ``nonzero`` runs on one chunk instead of the whole block."""
    whole = mask.numel() // chunk * chunk
    if whole:
        cum = mask[:whole].view(-1, chunk).sum(1).cumsum(0)
        j = int(torch.searchsorted(cum, m, right=True))  # first chunk whose running count exceeds m
        if j < cum.numel():
            start = j * chunk
            m -= int(cum[j - 1]) if j else 0
            return start + int(torch.nonzero(mask[start : start + chunk])[m])
        m -= int(cum[-1])
    return whole + int(torch.nonzero(mask[whole:])[m])


def _trim_stats(t: torch.Tensor, b: torch.Tensor, dens: float, rescale: str | None) -> dict:
    """Pass 1 for one task vector δ = t − b: what :func:`magnitude_` does, as numbers."""
    t, b = t.reshape(-1), b.reshape(-1)  # views of the (contiguous) inputs
    n = b.numel()
    st: dict = {"thr": None, "cut": n, "factor": None, "div": dens if rescale == "exact" else None}
    k = max(1, int(dens * n))
    itype = _int_view(b.dtype)
    if k < n and itype is None:  # float64 and friends: one whole-tensor δ (rare; not streamed)
        d = _delta_block(t, b, 0, n)
        key = d.abs()
        thr = torch.kthvalue(key, n - k + 1).values
        n_gt, n_eq = int((key > thr).sum()), int((key == thr).sum())
        if n_gt + n_eq > k:
            st["cut"] = int(torch.nonzero(key == thr)[k - n_gt])
        st["thr"] = thr
        del d, key
    elif k < n:
        nbits = 32 if itype == torch.int32 else 16
        shift = nbits - 16
        hist = torch.zeros(1 << 15, dtype=torch.int64, device=b.device)
        per_block = []  # 16-bit dtypes: each block's histogram, to find the block of the tie cut
        for lo in _blocks(n):
            key = _abs_key(_delta_block(t, b, lo, lo + _PASS1_ELEMS), itype)
            h = torch.bincount(key >> shift if shift else key, minlength=1 << 15)
            hist += h
            if not shift:
                per_block.append(h)
            del key, h
        from_top = hist.flip(0).cumsum(0)
        i = int(torch.searchsorted(from_top, k))
        bucket = (1 << 15) - 1 - i
        above = int(from_top[i] - hist[bucket])
        if not shift:
            thr, n_gt, n_eq = bucket, above, int(hist[bucket])
            if n_gt + n_eq > k:  # the (k − n_gt)-th entry equal to thr, in flat order, is dropped
                need = k - n_gt
                for lo, h in zip(_blocks(n), per_block):
                    c = int(h[thr])
                    if need < c:
                        eq = _abs_key(_delta_block(t, b, lo, lo + _PASS1_ELEMS), itype) == thr
                        st["cut"] = lo + _nth_true(eq, need)
                        break
                    need -= c
            del per_block
        else:
            cands, where = [], []
            for lo in _blocks(n):
                key = _abs_key(_delta_block(t, b, lo, lo + _PASS1_ELEMS), itype)
                pos = torch.nonzero((key >> shift) == bucket).squeeze(1)
                cands.append(key[pos])
                where.append(pos + lo)
            cand, where = torch.cat(cands), torch.cat(where)
            thr_t = torch.kthvalue(cand, cand.numel() - (k - above) + 1).values
            thr, n_gt = int(thr_t), above + int((cand > thr_t).sum())
            ties = where[cand == thr_t]
            if n_gt + ties.numel() > k:
                st["cut"] = int(ties[k - n_gt])
        st["thr"] = thr
    if rescale == "l1":

        def keep(d: torch.Tensor, lo: int) -> torch.Tensor | None:
            if st["thr"] is None:
                return None
            return _keep_mask(_abs_key(d, itype) if itype is not None else d.abs(), st["thr"], st["cut"], lo)

        st["factor"] = _l1_factor(t, b, keep)
    return st


def _l1_factor(t: torch.Tensor, b: torch.Tensor, keep) -> torch.Tensor | None:
    """L1 rescaling's factor ‖δ‖₁ / ‖δ after the drop‖₁ for the flat δ = t − b, block by block;
    ``keep(δ_block, lo)`` gives the block's keep mask (None: all kept). None when a norm is ~0."""
    before = torch.zeros((), dtype=torch.float64, device=b.device)
    after = torch.zeros((), dtype=torch.float64, device=b.device)
    for lo in _blocks(b.numel()):
        d = _delta_block(t, b, lo, lo + _PASS1_ELEMS)
        before += d.abs().sum(dtype=torch.float64)
        mask = keep(d, lo)
        if mask is not None:
            d.masked_fill_(mask.logical_not_(), 0)
        after += d.abs().sum(dtype=torch.float64)
    before, after = before.to(b.dtype), after.to(b.dtype)
    return None if (before < _EPS or after < _EPS) else before / after


def _dare_stats(t: torch.Tensor, b: torch.Tensor, dens: float, rescale: str | None, key: tuple[int, int]) -> dict:
    """Pass 1 for one DARE task vector: its mask key and, for ``rescale: l1``, the factor."""
    t, b = t.reshape(-1), b.reshape(-1)
    n = b.numel()
    st: dict = {"thr": None, "cut": n, "factor": None, "div": dens if rescale == "exact" else None,
                "dare": (key, dens)}
    if rescale == "l1":
        st["factor"] = _l1_factor(t, b, lambda d, lo: dare_keep(key, dens, lo, lo + d.numel(), d.device))
    return st


def ties_prepare(
    base: torch.Tensor | None,
    tensors: list[torch.Tensor],
    model_params: list[dict],
    params: dict,
    rng: torch.Generator | None,
    *,
    method: str,
    sparsify: str = "magnitude",
) -> dict | None:
    """Pass 1 of TIES / DARE: per-task-vector statistics (see above); None when nothing to merge."""
    idx, normalize, lam, rescale, weights, dens = _settings(method, base, tensors, model_params, params, sparsify)
    if not idx:
        return None
    if sparsify == "random":
        if rng is None:
            raise ValueError(f"{method}: a torch.Generator is required for DARE masks")
        keys = dare_keys(rng, len(idx))

        def stats(t: torch.Tensor, j: int) -> dict:
            return _dare_stats(t, base, dens[j], rescale, keys[j])
    else:

        def stats(t: torch.Tensor, j: int) -> dict:
            return _trim_stats(t, base, dens[j], rescale)
    trims = [None if dens[j] >= 1.0 or base.numel() == 0 else stats(tensors[i], j) for j, i in enumerate(idx)]
    return {"idx": idx, "normalize": normalize, "lam": lam, "weights": weights, "trims": trims,
            "consensus": method != "dare_linear"}


def ties_block(state: dict, base: torch.Tensor, tensors: list[torch.Tensor], row0: int) -> torch.Tensor:
    """Pass 2 of TIES on rows ``row0 …`` of the tensor (``base`` and ``tensors`` are those rows)."""
    idx = state["idx"]
    lo = row0 * (base.numel() // base.shape[0]) if base.dim() else 0
    itype = _int_view(base.dtype)
    deltas = torch.empty((len(idx), *base.shape), dtype=base.dtype, device=base.device)
    for j, i in enumerate(idx):
        d = torch.sub(tensors[i], base, out=deltas[j])
        st = state["trims"][j]
        if st is None:
            continue
        if st["thr"] is not None:
            key = _abs_key(d, itype) if itype is not None else d.abs()
            keep = _keep_mask(key, st["thr"], st["cut"], lo)
            if itype is not None:  # the bits of dropped entries cleared: +0 as masked_fill_ gives,
                d.view(itype).mul_(keep)  # several times faster for bfloat16
            else:
                d.masked_fill_(keep.logical_not_(), 0)
            del key, keep
        elif st.get("dare") is not None:
            (k, dens) = st["dare"]
            d.masked_fill_(dare_keep(k, dens, lo, lo + d.numel(), d.device).view(d.shape).logical_not_(), 0)
        if st["factor"] is not None:
            d.mul_(st["factor"])
        elif st["div"] is not None:
            d.div_(st["div"])
    mixed = _combine(deltas, state["weights"], base, state["normalize"], state["consensus"])
    del deltas
    return _finish(mixed, state["lam"], base)


_GLOBAL = {"normalize": False, "lambda": 1.0, "rescale": False, "int8_mask": False}
_MODEL = {"weight": 1.0, "density": 1.0}

_METHODS = (  # name, sparsify, consensus, default normalize, default rescale, description
    ("task_arithmetic", None, False, False, False, "base + Σ w·(θ−base) (arXiv:2212.04089)"),
    ("ties", "magnitude", True, True, False, "trim, elect sign, disjoint merge (arXiv:2306.01708)"),
    ("dare_ties", "random", True, False, True, "DARE drop + TIES sign election (arXiv:2311.03099)"),
    ("dare_linear", "random", False, False, True, "DARE drop + task arithmetic (arXiv:2311.03099)"),
)
#: each method's sparsification and sign consensus (the fused kernels and the executor read it too)
VARIANTS: dict[str, dict] = {m[0]: {"sparsify": m[1], "consensus": m[2]} for m in _METHODS}

for _name, _sparsify, _consensus, _normalize, _rescale, _desc in _METHODS:
    register(
        MethodSpec(
            name=_name,
            fn=partial(gta_merge, method=_name, sparsify=_sparsify, consensus=_consensus),
            needs_base=True,
            global_params={**_GLOBAL, "normalize": _normalize, "rescale": _rescale},
            model_params=dict(_MODEL),
            description=_desc,
            **(
                {"prepare": partial(ties_prepare, method=_name, sparsify=_sparsify), "fn_block": ties_block}
                if _sparsify
                else {}
            ),
        )
    )
