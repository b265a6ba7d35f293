"""The classic methods on the fused CPU kernels of :mod:`seme.kernels`: same results, one pass.

Two layers:

- the **cores** (``linear_bits``, ``gta_bits``) work on numpy arrays of raw bits (bfloat16 as
  uint16, float32 as uint32) and need no torch: the executor's torch-free path
  (``seme.merge``, plain CPU merges of bfloat16/float32 checkpoints) calls them on arrays mapped
  straight from the safetensors files;
- the **torch functions** (``linear``, ``gta_method``, ``slerp``) take what the method's torch
  function takes (the executor's tensors, in the compute dtype) plus the output dtype, and call
  the cores on the tensors' bits.

Each returns the merged result and ``bad``: the non-finite counts the kernels found in the base,
in each input and in the output, so the executor needs no separate NaN/Inf pass. Parameters are
checked by the very same code as the torch methods, and the few scalar steps the torch reference
takes in the compute dtype (weights rounded to bfloat16, their sum, the L1 ratio) are reproduced
exactly in numpy (``tests/test_kernels.py`` compares every method with the torch reference bit
for bit, and the torch-free path with the torch path).

Work is split over threads in contiguous ranges of whole kernel chunks; the kernels release the GIL.
"""

from __future__ import annotations

import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import Any

import numpy as np

from seme import kernels as K
from seme.errors import ConfigError
from seme.lazy import torch
from seme.methods import gta
from seme.methods._params import as_bool, as_float, non_base

MAXK = K.MAXK  # sources per kernel call
_pool: ThreadPoolExecutor | None = None


def threads() -> int:
    """Kernel threads: ``$SEME_THREADS``, else torch's intra-op thread count when torch is loaded,
    else the CPUs this process may run on."""
    env = os.environ.get("SEME_THREADS")
    if env:
        return max(1, int(env))
    if "torch" in sys.modules:
        return max(1, torch.get_num_threads())
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


def bits(t: torch.Tensor) -> np.ndarray:
    """The raw bits of a contiguous bfloat16/float32 tensor as a flat uint16/uint32 array (no copy)."""
    it, nt = {torch.bfloat16: (torch.int16, np.uint16), torch.float32: (torch.int32, np.uint32)}[t.dtype]
    return t.reshape(-1).view(it).numpy().view(nt)


BLOCK = 1 << 22  # entries per block: input pages are given back after each block (bounded RSS)


def _ranges(lo: int, hi: int) -> list[tuple[int, int]]:
    n = hi - lo
    parts = threads() if n >= 1 << 16 else 1
    step = -(-n // parts)
    step = -(-step // K.CH) * K.CH  # whole chunks per part
    return [(a, min(hi, a + step)) for a in range(lo, hi, step)] or [(lo, lo)]


def blocks(n: int) -> list[list[tuple[int, int]]]:
    """The ranges ``run`` splits [0, n) into: blocks of ``BLOCK`` entries, each a list of
    per-thread ranges of whole kernel chunks."""
    return [_ranges(b0, min(n, b0 + BLOCK)) for b0 in range(0, max(n, 1), BLOCK)]


def run(fn, n: int, *args: Any, release=None) -> list[tuple[tuple[int, int], Any]]:
    """``fn(*args, lo, hi)`` over [0, n): the ranges of ``blocks(n)``, a block's ranges on the
    kernel threads at once; ``release(lo, hi)`` after each block. Returns (range, result) pairs in
    range order."""
    global _pool
    out: list[tuple[tuple[int, int], Any]] = []
    for rs in blocks(n):
        if len(rs) == 1:
            out.append((rs[0], fn(*args, *rs[0])))
        else:
            if _pool is None:
                _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="seme-kernel")
            out.extend(zip(rs, _pool.map(lambda r: fn(*args, *r), rs)))
        if release is not None:
            release(rs[0][0], rs[-1][1])
    return out


def _total(res: list[tuple[tuple[int, int], Any]]) -> np.ndarray:
    return np.sum([r for _, r in res], axis=0)


def _pack(xs: list[np.ndarray]) -> tuple:
    """(K, x0 … x7) for the kernels: the inputs' bit arrays, padded with empty arrays."""
    if len(xs) > K.MAXK:
        raise ValueError(f"fused kernels take at most {K.MAXK} inputs")
    return (len(xs), *xs, *[xs[0][:0]] * (K.MAXK - len(xs)))


# --- the compute dtype's scalar arithmetic, as torch does it ------------------------------------


def round_bf16(x: np.ndarray) -> np.ndarray:
    """float32 values rounded to bfloat16 (nearest even, as torch), returned as float32."""
    u = np.asarray(x, np.float32).view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000).astype(np.uint32).view(np.float32)


def in_dtype(values, half: bool) -> np.ndarray:
    """Python floats as torch.tensor(values, dtype) holds them (bfloat16 when ``half``), as float32."""
    v = np.asarray(values, np.float64).astype(np.float32)
    return round_bf16(v) if half else v


def torch_sum(v: np.ndarray, half: bool = False) -> np.float32:
    """``torch.sum`` of a short 1-D float32 (bfloat16 when ``half``) tensor, in torch's order.

    torch's CPU reduction starts four accumulators with the first four entries, adds any further
    entries to the first one (or, for eight entries, sums in plain order), then adds the four up
    in order; the order decides the last bit. ``tests/test_kernels.py`` checks this against
    torch for every length the kernels take.
    """
    f = np.float32
    x = [f(a) for a in np.asarray(v, np.float32)]
    if len(x) in (5, 6, 7):
        acc = x[:4]
        for a in x[4:]:
            acc[0] = f(acc[0] + a)
        x = acc
    s = f(0.0)
    for a in x:
        s = f(s + a)
    return f(round_bf16(np.array([s]))[0]) if half else s


# --- cores: numpy bits in, numpy bits out, no torch ---------------------------------------------


def linear_bits(xs: list[np.ndarray], half: bool, mp: list[dict], gp: dict, o: np.ndarray, release=None) -> dict:
    """:func:`seme.methods.linear.linear` on bit arrays ``xs`` into the output bits ``o``; ``half``:
    the compute dtype is bfloat16 (else float32; bfloat16 inputs are then widened exactly)."""
    normalize = as_bool("linear", "normalize", gp.get("normalize", True))
    weights = [as_float("linear", "weight", p.get("weight"), f"model {i}") for i, p in enumerate(mp)]
    w = in_dtype(weights, False)  # rounded to the float32 accumulator, as the reference
    denom = torch_sum(w)
    if normalize and denom == 0.0:
        raise ConfigError(f"linear: the weights sum to 0 ({weights}); cannot normalize")
    tot = _total(run(K.linear_kernel, o.size, *_pack(xs), w, normalize, np.float32(denom), half, o,
                     release=release))
    return {"base": 0, "sources": tot[:-1].tolist(), "out": int(tot[-1])}


def gta_bits(bb: np.ndarray, xs: list[np.ndarray], idx: list[int], half: bool, mp: list[dict], gp: dict,
             seed: int | None, o: np.ndarray, release=None, *, method: str, sparsify: str | None,
             consensus: bool) -> dict:
    """:func:`seme.methods.gta.gta_merge` (task arithmetic, TIES, DARE) on bit arrays: the base
    ``bb``, the inputs ``xs`` of which ``idx`` are task vectors (the others are the base itself),
    into ``o``, computing in bfloat16 when ``half`` (else float32). ``seed``: the tensor's seed
    (DARE). ``gta_prepare`` then its result."""
    return gta_prepare(bb, xs, idx, half, mp, gp, seed, release, method=method, sparsify=sparsify,
                       consensus=consensus)(o, release)


def gta_prepare(bb: np.ndarray, xs: list[np.ndarray], idx: list[int], half: bool, mp: list[dict], gp: dict,
                seed: int | None, release=None, *, method: str, sparsify: str | None, consensus: bool):
    """Pass 1 of ``gta_bits``: the checked parameters, each task vector's trim threshold (radix
    select) or DARE key, and the L1 factors. Returns ``finish(o, release) -> bad``, pass 2: one
    kernel over all inputs into the output bits ``o``. The executor runs pass 1 of the next tensor
    while pass 2 of this one runs."""
    normalize, lam, rescale, weights, dens = gta.checked_params(method, idx, mp, gp, sparsify)
    if sparsify == "random" and seed is None:
        raise ValueError(f"{method}: a seed is required for DARE masks")
    n = bb.size
    n_inputs = len(xs)
    xs = [xs[i] for i in idx]
    J = len(xs)
    thr = np.full(J, -1, np.int64)
    cut = np.full(J, n, np.int64)
    k1 = np.zeros(J, np.uint64)
    k2 = np.zeros(J, np.uint64)
    dthr = np.full(J, 1 << 32, np.uint64)  # 2³²: every 32-bit hash is below it (no drop)
    smul = np.full(J, np.nan, np.float32)
    sdiv = np.full(J, np.nan, np.float32)
    sp = {None: K.SP_NONE, "magnitude": K.SP_MAGNITUDE, "random": K.SP_RANDOM}[sparsify]
    keys = gta.dare_keys(seed, J) if sparsify == "random" else None
    trim = [j for j in range(J) if sparsify == "magnitude" and dens[j] < 1.0 and max(1, int(dens[j] * n)) < n]
    if trim and n <= SMALL:  # a small tensor: an exact numpy selection costs less than the histograms
        for j in trim:
            thr[j], cut[j] = _topk_small(xs[j], bb, max(1, int(dens[j] * n)), half)
    elif trim:  # pass 1: all the histograms in one read of the inputs
        ranges = [r for rs in blocks(n) for r in rs]
        hists = np.zeros((len(ranges), len(trim), 1 << 15), np.int32)  # (range, task vector, bucket)
        at = {lo: hists[i] for i, (lo, _hi) in enumerate(ranges)}
        run(_hist, n, at, bb, *_pack([xs[j] for j in trim]), half, release=release)
        found = _map(lambda q: _topk_threshold(xs[trim[q]], bb, max(1, int(dens[trim[q]] * n)), half, ranges,
                                               hists, q), range(len(trim)))
        for q, j in enumerate(trim):
            thr[j], cut[j] = found[q]
    for j in range(J):
        if sparsify == "random" and dens[j] < 1.0 and n:
            k1[j], k2[j] = keys[j]
            dthr[j] = gta.dare_threshold(dens[j])
        if sparsify and dens[j] < 1.0 and n and rescale == "exact":
            sdiv[j] = dens[j]
    l1 = [j for j in range(J) if rescale == "l1" and (thr[j] >= 0 or dthr[j] < 1 << 32)]
    if l1:  # L1 rescaling: both norms of every trimmed or dropped vector, in one read
        sel = np.array(l1)
        parts = run(K.delta_l1, n, bb, *_pack([xs[j] for j in l1]), sp, thr[sel], cut[sel],
                    k1[sel], k2[sel], dthr[sel], half, release=release)
        sums = np.zeros((len(l1), 2), np.float64)
        for _, p in parts:  # float64 partial sums in range order
            sums += p
        eps = in_dtype([gta._EPS], half)[0]  # the reference compares in the compute dtype
        for q, j in enumerate(l1):
            before, after = in_dtype(sums[q], half)
            if not (before < eps or after < eps):
                smul[j] = in_dtype([np.float32(before) / np.float32(after)], half)[0]
    w = in_dtype(weights, half)
    ndiv = torch_sum(w, half)
    if abs(ndiv) < in_dtype([1e-8], half)[0]:
        ndiv = np.float32(1.0)

    def finish(o: np.ndarray, release=None) -> dict:
        tot = _total(run(K.gta_kernel, n, bb, *_pack(xs), w, sp, thr, cut, k1, k2, dthr, smul, sdiv, consensus,
                         normalize, np.float32(ndiv), np.float32(lam), half, o, release=release))
        src = [0] * n_inputs
        for j, i in enumerate(idx):
            src[i] = int(tot[1 + j])
        return {"base": int(tot[0]), "sources": src, "out": int(tot[-1])}

    return finish


_scratch = threading.local()
SMALL = 1 << 16  # entries: below this, TIES thresholds come from a numpy partition, not histograms


def _topk_small(x: np.ndarray, b: np.ndarray, k: int, half: bool) -> tuple[int, int]:
    """``_topk_threshold`` for a small tensor: the same (key, tie cut) from an exact numpy
    partition of all the keys (a 2¹⁵-bucket histogram per source cost milliseconds of fixed
    overhead on the many 1-D tensors of a model)."""
    n = b.size
    if k >= n:
        return -1, n

    def f32(a: np.ndarray) -> np.ndarray:
        return (a.astype(np.uint32) << np.uint32((4 - a.itemsize) * 8)).view(np.float32)

    d = f32(x) - f32(b)  # float32, rounded to nearest even as the kernels' subtraction
    if half:
        d = round_bf16(d)
    key = d.view(np.uint32) & np.uint32(0x7FFFFFFF)
    if half:
        key = key >> np.uint32(16)
    thr = int(np.partition(key, n - k)[n - k])  # the k-th largest key
    n_gt = int((key > thr).sum())
    ties = np.flatnonzero(key == thr)
    return thr, (int(ties[k - n_gt]) if n_gt + ties.size > k else n)


def _hist(at: dict, b, K_, *rest):
    """``delta_key_hist`` into ``at[lo]`` (the range's slice of the caller's histograms), with this
    thread's reusable scratch."""
    h4 = getattr(_scratch, "hist4", None)
    if h4 is None:
        h4 = _scratch.hist4 = np.zeros((MAXK, 4, 1 << 15), np.int32)  # the kernel leaves it zero
    lo, hi = rest[-2:]
    return K.delta_key_hist(b, K_, *rest[:-2], h4, at[lo], lo, hi)


def _map(fn, items) -> list:
    """``fn`` over ``items`` on the kernel threads (the kernels release the GIL)."""
    global _pool
    items = list(items)
    if len(items) < 2 or threads() < 2:
        return [fn(x) for x in items]
    if _pool is None:
        _pool = ThreadPoolExecutor(max_workers=threads(), thread_name_prefix="seme-kernel")
    return list(_pool.map(fn, items))


def _topk_threshold(x: np.ndarray, b: np.ndarray, k: int, half: bool, ranges: list, hists: np.ndarray,
                    q: int) -> tuple[int, int]:
    """(threshold key, tie cut) of the top-k trim of δ = x − b, as ``gta.topk_mask`` chooses:
    keep key > thr, and key == thr at flat indices < cut (lowest indices first). ``hists[r, q]``:
    δ's key histogram over ``ranges[r]`` (``delta_key_hist``)."""
    n = b.size
    if k >= n:
        return -1, n
    bucket, above, n_eq = (int(v) for v in K.topk_bucket(hists, q, k))
    if half:
        thr, n_gt = bucket, above
        if n_gt + n_eq <= k:
            return thr, n
        need = k - n_gt
        for r, (lo, hi) in enumerate(ranges):
            c = int(hists[r, q, thr])
            if need < c:
                return thr, int(K.delta_nth_equal(x, b, np.uint32(thr), need, lo, hi))
            need -= c
        raise AssertionError("top-k tie cut not found")  # pragma: no cover - counts guarantee it
    found = [K.delta_key_gather(x, b, np.uint32(bucket), int(hists[r, q, bucket]), lo, hi)
             for r, (lo, hi) in enumerate(ranges)]
    cand = np.concatenate([f[0] for f in found])
    where = np.concatenate([f[1] for f in found])
    r = k - above  # the r-th largest candidate is the threshold
    thr = int(np.partition(cand, cand.size - r)[cand.size - r])
    n_gt = above + int((cand > thr).sum())
    ties = where[cand == thr]
    return thr, (int(ties[k - n_gt]) if n_gt + ties.size > k else n)


#: the methods the torch-free path runs (SLERP's coefficients come from torch's sums)
BIT_METHODS = {"linear": None, **gta.VARIANTS}


# --- the torch functions ------------------------------------------------------------------------


def _out(shape: torch.Size, od: torch.dtype, out: torch.Tensor | None) -> tuple[torch.Tensor, np.ndarray]:
    """The output tensor (``out`` when the caller lends one) and its bits."""
    if out is None:
        out = torch.empty(shape, dtype=od)
    elif out.shape != shape or out.dtype != od or not out.is_contiguous():
        raise ValueError(f"output buffer is {tuple(out.shape)} {out.dtype}, need {tuple(shape)} {od}")
    return out, bits(out)


def linear(b, ts, mp, gp, rng, od, release=None, out=None) -> tuple[torch.Tensor, dict]:
    """:func:`seme.methods.linear.linear`, fused."""
    out, o = _out(ts[0].shape, od, out)
    return out, linear_bits([bits(t) for t in ts], ts[0].dtype == torch.bfloat16, mp, gp, o, release)


def gta_method(b, ts, mp, gp, rng, od, release=None, out=None, *, method: str, sparsify: str | None,
               consensus: bool) -> tuple[torch.Tensor, dict]:
    """:func:`seme.methods.gta.gta_merge`, fused (see ``gta_bits``)."""
    idx = gta._settings(method, b, ts, mp, gp, sparsify)[0]
    if not idx:  # nothing to merge: the base, checked here since no kernel reads it
        nf = int((~torch.isfinite(b)).sum())
        return b, {"base": nf, "sources": [0] * len(ts), "out": nf}
    if sparsify == "random" and rng is None:
        raise ValueError(f"{method}: a torch.Generator is required for DARE masks")
    out, o = _out(b.shape, od, out)
    bad = gta_bits(bits(b), [bits(t) for t in ts], idx, b.dtype == torch.bfloat16, mp, gp,
                   rng.initial_seed() if rng is not None else None, o, release, method=method,
                   sparsify=sparsify, consensus=consensus)
    return out, bad


def slerp(b, ts, mp, gp, rng, od, release=None, out=None) -> tuple[torch.Tensor, dict]:
    """:func:`seme.methods.slerp.slerp`: the coefficients from the reference's own (mergekit-order)
    sums, the interpolation fused."""
    from seme.methods.slerp import slerp_coefficients

    if b is not None and not b.is_floating_point():
        raise ConfigError(f"slerp: tensors must be floating point, got {b.dtype}")
    others = non_base("slerp", b, ts)
    if len(others) != 1:
        from seme.methods.slerp import slerp as reference

        reference(b, ts, mp, gp, rng)  # raises the reference's error
    t = as_float("slerp", "t", gp.get("t"))
    x, y = bits(b), bits(ts[others[0]])
    n = x.size
    if n == 0:
        return b.clone(), {"base": 0, "sources": [0] * len(ts), "out": 0}
    # the reference's sums; each chunk's input pages go back as soon as a pass is done with them
    ca, cb, _ = slerp_coefficients(t, b.reshape(-1), ts[others[0]].reshape(-1), done=release)
    out, o = _out(b.shape, od, out)
    tot = _total(run(K.lerp_kernel, n, x, y, np.float32(float(ca)), np.float32(float(cb)), o, release=release))
    src = [0] * len(ts)
    src[others[0]] = int(tot[1])
    return out, {"base": int(tot[0]), "sources": src, "out": int(tot[2])}


def get(name: str):
    """The fused torch function for method ``name``, or None."""
    if name == "slerp":
        return slerp
    if name not in BIT_METHODS:
        return None
    if name == "linear":
        return linear
    return partial(gta_method, method=name, **BIT_METHODS[name])
