"""Fused CPU kernels (numba) for the classic methods: one pass over the inputs per output tensor.

The torch implementations in ``seme.methods`` are the reference: they follow mergekit op by op, and
each op is a separate pass over memory (bf16 → float32 → op → bf16 …). On a CPU that makes a merge
compute-bound: TIES did about 25 passes. These kernels walk the tensors once, in cache-sized
chunks, on all cores, and reproduce the reference's arithmetic exactly: every op the reference
runs in the compute dtype is done in float32 and rounded to that dtype at the same point
(round-to-nearest-even, as torch does), so the fast path's output equals the reference's bit for
bit (``tests/test_kernels.py`` checks this on random tensors for every method and dtype; SLERP's
two coefficients come from the reference's own sums).

Data travel as raw bits: bfloat16 as uint16, float32 as uint32 (the kernels read ``itemsize``; a
``half`` argument says whether the compute dtype is bfloat16). The
kernels also count non-finite entries of every input and of the output, so the executor needs no
separate NaN/Inf pass. Kernels compile on first use and are cached on disk
(``$NUMBA_CACHE_DIR``, default ``~/.cache/seme/numba``).
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

import numpy as np


def _cache_dir() -> str:
    """A writable directory for numba's compiled-kernel cache (read-only homes exist in pods)."""
    for cand in (os.environ.get("NUMBA_CACHE_DIR"), Path.home() / ".cache" / "seme" / "numba",
                 Path(tempfile.gettempdir()) / f"seme-numba-{os.getuid()}"):
        if not cand:
            continue
        try:
            Path(cand).mkdir(parents=True, exist_ok=True)
            if os.access(cand, os.W_OK):
                return str(cand)
        except OSError:
            continue
    raise ImportError("no writable directory for the kernel cache (set NUMBA_CACHE_DIR)")


os.environ["NUMBA_CACHE_DIR"] = _cache_dir()

from llvmlite import ir as llir  # noqa: E402
from numba import njit  # noqa: E402  # after NUMBA_CACHE_DIR is set
from numba.core import types as nbt  # noqa: E402
from numba.extending import intrinsic  # noqa: E402


def _skip_blas_probe() -> None:
    """Keep numba from importing scipy.linalg (0.2 s) to find BLAS the first time it types a call.

    numba probes once, when ``numba.np.arraymath`` is first imported, by importing
    ``scipy.linalg.cython_blas``. No kernel of seme uses BLAS (np.dot, np.linalg), so when nothing
    has imported scipy.linalg yet, that one import is made to fail and numba records that it has no
    BLAS; scipy itself is untouched and imports normally afterwards.
    """
    if "numba.np.arraymath" in sys.modules or "scipy.linalg" in sys.modules:
        return
    sys.modules["scipy.linalg.cython_blas"] = None  # type: ignore[assignment]  # ImportError on import
    try:
        import numba.np.arraymath  # noqa: F401
    finally:
        del sys.modules["scipy.linalg.cython_blas"]


_skip_blas_probe()

CH = 4096  # entries per chunk: a few float32 scratch rows stay in the L1/L2 cache


@intrinsic
def _f2u(typingctx, x):
    """A float32's bits as a uint32 (a register bitcast, no memory round trip)."""
    if x != nbt.float32:
        return None
    return nbt.uint32(nbt.float32), lambda context, builder, sig, args: builder.bitcast(args[0], llir.IntType(32))


@intrinsic
def _u2f(typingctx, x):
    """The float32 whose bits are the uint32 ``x``."""
    if x != nbt.uint32:
        return None
    return nbt.float32(nbt.uint32), lambda context, builder, sig, args: builder.bitcast(args[0], llir.FloatType())
EXP = np.uint32(0x7F800000)

_opts = {"nogil": True, "cache": True, "fastmath": False, "error_model": "numpy"}


@njit(inline="always", **_opts)
def _load(src, lo, m, dst):
    """Bits of src[lo:lo+m] as float32 bits into ``dst`` (uint32); returns # non-finite."""
    s, sh = _chunk(src, lo, m)
    bad = 0
    for i in range(m):
        u = _wide(s[i], sh)
        dst[i] = u
        bad += (u & EXP) == EXP
    return bad


@njit(inline="always", **_opts)
def _round16(u, m):
    """Round the float32 bits u[:m] to bfloat16 in place (nearest even), kept as float32 bits."""
    for i in range(m):
        x = u[i]
        u[i] = (x + np.uint32(0x7FFF) + ((x >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000)


@njit(inline="always", **_opts)
def _store(u, m, out, lo):
    """float32 bits u[:m] into ``out`` (uint16: rounded to bfloat16; uint32: as is); # non-finite."""
    bad = 0
    o = out[lo : lo + m]
    if out.itemsize == 2:
        _round16(u, m)
        for i in range(m):
            x = u[i]
            bad += (x & EXP) == EXP
            o[i] = x >> np.uint32(16)
    else:
        for i in range(m):
            x = u[i]
            bad += (x & EXP) == EXP
            o[i] = x
    return bad


MAXK = 8  # sources per kernel call (x0 … x7; unused ones are empty arrays)


@njit(inline="always", **_opts)
def _pick(j, x0, x1, x2, x3, x4, x5, x6, x7):
    if j == 0:
        return x0
    if j == 1:
        return x1
    if j == 2:
        return x2
    if j == 3:
        return x3
    if j == 4:
        return x4
    if j == 5:
        return x5
    if j == 6:
        return x6
    return x7


@njit(inline="always", **_opts)
def _chunk(x, c0, m):
    """``x[c0:c0+m]`` indexed from 0 (no wraparound checks, so loops over it vectorize) and the
    shift that widens its entries (bfloat16 or float32 bits) to float32 bits."""
    return x[c0 : c0 + m], np.uint32((4 - x.itemsize) * 8)


@njit(inline="always", **_opts)
def _wide(v, sh):
    """One entry's bits widened to float32 bits (``sh`` from ``_chunk``)."""
    return np.uint32(np.uint32(v) << sh)


@njit(inline="always", **_opts)
def _r16(x, half):
    """The float32 ``x`` rounded to bfloat16 (nearest even, as torch) when ``half``; else ``x``."""
    u = _f2u(x)
    r = np.uint32((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1))) & np.uint32(0xFFFF0000))
    return _u2f(r if half else u)  # a select, not a branch: the loops stay vectorizable


@njit(inline="always", **_opts)
def _rnd(u, m, half):
    if half:
        _round16(u, m)


@njit(inline="always", **_opts)
def _delta(x, c0, m, fb, u, f, half):
    """δ = x[c0:c0+m] − b (``fb``: the base chunk, float32) into ``f`` (bits in ``u``), rounded to
    the compute dtype as torch's subtraction is; returns # non-finite entries of x."""
    bad = _load(x, c0, m, u)
    for i in range(m):
        f[i] = f[i] - fb[i]
    _rnd(u, m, half)
    return bad


@njit(**{**_opts, "fastmath": {"contract"}})
def linear_kernel(K, x0, x1, x2, x3, x4, x5, x6, x7, w, normalize, denom, half, out, lo, hi):
    """θ[lo:hi] = Σ w_k x_k (÷ denom): float32 fused multiply-adds, one rounding at the end.

    ``half``: the compute dtype is bfloat16 (the inputs may be bfloat16 under a float32 compute
    dtype: widening is exact). Returns the number of non-finite entries of each input and of the
    output (K + 1 counts)."""
    bad = np.zeros(K + 1, np.int64)
    acc = np.empty(CH, np.float32)
    half_out = half and out.itemsize == 4  # in the compute dtype first (a bfloat16 output: _store)
    for c0 in range(lo, hi, CH):
        m = min(CH, hi - c0)
        acc[:m] = 0
        for k in range(K):
            x = _pick(k, x0, x1, x2, x3, x4, x5, x6, x7)
            s, sh = _chunk(x, c0, m)
            wk = w[k]
            nb = 0
            for i in range(m):
                u = _wide(s[i], sh)
                nb += (u & EXP) == EXP
                acc[i] = acc[i] + wk * _u2f(u)  # fused multiply-add, as torch's add_(alpha=)
            bad[k] += nb
        for i in range(m):
            a = acc[i] / denom if normalize else acc[i]
            acc[i] = _r16(a, half_out)
        bad[K] += _store(acc.view(np.uint32), m, out, c0)
    return bad


# --- DARE masks: a counter-based hash, so a mask entry depends only on (key, flat index) ---------
#
# keep(i) ⇔ h(i) < density · 2³², h = fmix32(fmix32(lo32(i) ⊕ k1) ⊕ hi32(i) ⊕ k2) with murmur3's
# finalizer. Any block of any tensor can be masked on its own, in any order, on any thread or
# device, with the same result; ``seme.methods.gta.dare_keep`` computes the same mask with torch.

M32 = np.uint64(0xFFFFFFFF)


@njit(inline="always", **_opts)
def _fmix32(x):
    """murmur3's finalizer on a uint32, in 32-bit arithmetic (products wrap mod 2³²: 32-bit vector
    multiplies)."""
    x = np.uint32(x ^ (x >> np.uint32(16)))
    x = np.uint32(x * np.uint32(0x85EBCA6B))
    x = np.uint32(x ^ (x >> np.uint32(13)))
    x = np.uint32(x * np.uint32(0xC2B2AE35))
    return np.uint32(x ^ (x >> np.uint32(16)))


@njit(inline="always", **_opts)
def _dare_keep(i, k1, k2, thr):
    ii = np.uint64(i)
    h = _fmix32(np.uint32((ii & M32) ^ k1))
    h = _fmix32(np.uint32(np.uint64(h) ^ (ii >> np.uint64(32)) ^ k2))
    return np.uint64(h) < thr


# --- generalized task arithmetic: task_arithmetic, ties, dare_linear, dare_ties (pass 2) ---------

SP_NONE, SP_MAGNITUDE, SP_RANDOM = 0, 1, 2


@njit(inline="always", **_opts)
def _trim_bound(thr, cj, half, m):
    """(t, cj) of a top-k trim on one chunk, in the kernels' magnitude-key bits: keep key > t,
    or key == t before index cj. ``thr`` < 0 (no trim) gives the bound that keeps every key of an
    ``m``-entry chunk: key ≥ 0 = t, before m."""
    if thr < 0:
        return np.uint32(0), np.int64(m)
    return (np.uint32(thr << 16) if half else np.uint32(thr)), np.int64(cj)


@njit(inline="always", **_opts)
def _task_vector(x, c0, m, fb, d, half, kmask, sparsify, thr, cj, k1, k2, dthr, smul, sdiv, wj):
    """One source's weighted, sparsified task vector on a chunk, in one pass: d[:m] = w·(rescaled
    (masked (x − b))), each op rounded to the compute dtype where the reference rounds. ``fb``: the
    base chunk (float32); ``cj``: the tie cut relative to the chunk. Returns # non-finite in x."""
    s, sh = _chunk(x, c0, m)
    # Branch-free, so the loop vectorizes: no trim is the trim that keeps every key; no rescale
    # multiplies and divides by 1, which is exact.
    t, cj = _trim_bound(thr if sparsify == SP_MAGNITUDE else -1, cj, half, m)
    sm = smul if not np.isnan(smul) else np.float32(1.0)
    sd = sdiv if np.isnan(smul) and not np.isnan(sdiv) else np.float32(1.0)
    bad = 0
    if sparsify == SP_RANDOM:
        for i in range(m):
            u = _wide(s[i], sh)
            bad += (u & EXP) == EXP
            v = _r16(_u2f(u) - fb[i], half)
            v = v if _dare_keep(c0 + i, k1, k2, dthr) else np.float32(0.0)
            v = _r16(_r16(v * sm, half) / sd, half)
            d[i] = _r16(v * wj, half)
    elif np.isnan(smul) and np.isnan(sdiv):  # no rescale (the common case): no divide at all
        for i in range(m):
            u = _wide(s[i], sh)
            bad += (u & EXP) == EXP
            v = _r16(_u2f(u) - fb[i], half)
            key = _f2u(v) & kmask
            v = v if (key > t) | ((key == t) & (i < cj)) else np.float32(0.0)
            d[i] = _r16(v * wj, half)
    else:
        for i in range(m):
            u = _wide(s[i], sh)
            bad += (u & EXP) == EXP
            v = _r16(_u2f(u) - fb[i], half)
            key = _f2u(v) & kmask
            v = v if (key > t) | ((key == t) & (i < cj)) else np.float32(0.0)
            v = _r16(_r16(v * sm, half) / sd, half)
            d[i] = _r16(v * wj, half)
    return bad


@njit(**_opts)
def gta_kernel(b, K, x0, x1, x2, x3, x4, x5, x6, x7, w, sparsify, thr, cut, k1, k2, dthr, smul, sdiv, consensus, normalize,
               ndiv, lam, half, out, lo, hi):
    """Pass 2 of the GTA recipe on flat entries [lo, hi) of one tensor, op for op as
    ``seme.methods.gta`` (each op rounded to the compute dtype: bfloat16 when ``half``, else float32;
    bfloat16 inputs under a float32 compute dtype are widened exactly).

    Per source j: ``thr[j]``/``cut[j]`` (magnitude: keep key > thr, or key == thr before flat index
    cut; thr < 0: no trim), ``k1/k2/dthr`` (random: the DARE hash mask), ``smul[j]``/``sdiv[j]``
    (rescale factor / divisor; NaN: none), ``w[j]`` the weight in the compute dtype. ``ndiv``: the
    normalize divisor without consensus. Returns non-finite counts: base, each source, output.

    Per chunk: one fused pass per source (``_task_vector``), the sums (one pass per source), and
    one fused pass for everything after them.
    """
    kmask = np.uint32(0x7FFF0000) if half else np.uint32(0x7FFFFFFF)
    half_out = half and out.itemsize == 4  # a bfloat16 output is rounded by _store
    bad = np.zeros(K + 2, np.int64)
    ub = np.empty(CH, np.uint32)
    fb = ub.view(np.float32)
    D = np.empty((K, CH), np.float32)
    acc = np.empty(CH, np.float32)
    sgn = np.empty(CH, np.float32)
    dv = np.empty(CH, np.float32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for c0 in range(lo, hi, CH):
        m = min(CH, hi - c0)
        bad[0] += _load(b, c0, m, ub)
        for j in range(K):
            bad[1 + j] += _task_vector(_pick(j, x0, x1, x2, x3, x4, x5, x6, x7), c0, m, fb, D[j], half, kmask,
                                       sparsify, thr[j], cut[j] - c0, k1[j], k2[j], dthr[j], smul[j], sdiv[j], w[j])
        acc[:m] = 0
        for j in range(K):
            dj = D[j]
            for i in range(m):
                acc[i] = acc[i] + dj[i]
        if consensus:
            for i in range(m):
                sgn[i] = one if _r16(acc[i], half) >= 0 else -one
                acc[i] = zero
                dv[i] = zero
            for j in range(K):
                dj = D[j]
                wj = w[j]
                for i in range(m):
                    p = dj[i] * sgn[i]
                    pos = p > 0
                    acc[i] = acc[i] + (p if pos else zero)
                    dv[i] = dv[i] + (wj if pos else zero)
            for i in range(m):
                a = _r16(acc[i], half) * sgn[i]
                if normalize:
                    dd = _r16(dv[i], half)
                    a = _r16(a / (dd if dd != 0 else one), half)
                if lam != 1:
                    a = _r16(a * lam, half)
                acc[i] = _r16(a + fb[i], half_out)
        else:
            for i in range(m):
                a = _r16(acc[i], half)
                if normalize:
                    a = _r16(a / ndiv, half)
                if lam != 1:
                    a = _r16(a * lam, half)
                acc[i] = _r16(a + fb[i], half_out)
        bad[K + 1] += _store(acc.view(np.uint32), m, out, c0)
    return bad


# --- TIES pass 1: the top-k threshold of |δ| by radix selection ----------------------------------


@njit(**_opts)
def topk_bucket(hists, q, k):
    """The bucket holding the k-th largest key of task vector ``q``, given its per-range histograms
    ``hists[r, q]``: (bucket, entries in higher buckets, the bucket's total count)."""
    above = np.int64(0)
    for bucket in range(hists.shape[2] - 1, -1, -1):
        c = np.int64(0)
        for r in range(hists.shape[0]):
            c += hists[r, q, bucket]
        if above + c >= k:
            return bucket, above, c
        above += c
    return 0, above, 0


@njit(**_opts)
def delta_key_hist(b, K, x0, x1, x2, x3, x4, x5, x6, x7, half, hist4, hist, lo, hi):
    """Per task vector δ_j = x_j − b (rounded to the dtype), a histogram (2¹⁵ buckets) of the top
    15 magnitude bits over flat entries [lo, hi): exact keys for bfloat16, buckets of 2¹⁶ keys for
    float32. Reads the base once for all K.

    Four interleaved sub-histograms each: task-vector magnitudes crowd into few buckets, and
    back-to-back increments of one counter would wait on each other. ``half``: bfloat16 compute.
    ``hist4``: int32 scratch of at least (K, 4, 2¹⁵), all zero on entry and left all zero (reused
    across calls); ``hist``: the (K, 2¹⁵) int32 output, zero on entry (a range holds fewer than
    2³¹ entries). Only the buckets between the smallest and the largest key seen are summed and
    cleared: task vectors span a few exponents, so that is a small part of the 2¹⁵."""
    ub = np.empty(CH, np.uint32)
    fb = ub.view(np.float32)
    u = np.empty(CH, np.uint32)
    kmin = np.full(K, (1 << 15) - 1, np.int64)
    kmax = np.zeros(K, np.int64)
    for c0 in range(lo, hi, CH):
        m = min(CH, hi - c0)
        _load(b, c0, m, ub)
        for j in range(K):
            x = _pick(j, x0, x1, x2, x3, x4, x5, x6, x7)
            s, sh = _chunk(x, c0, m)
            kl = np.uint32(kmin[j])
            kh = np.uint32(kmax[j])
            for i in range(m):
                v = _r16(_u2f(_wide(s[i], sh)) - fb[i], half)
                k = np.uint32((_f2u(v) & np.uint32(0x7FFFFFFF)) >> np.uint32(16))
                u[i] = k
                kl = min(kl, k)
                kh = max(kh, k)
            kmin[j] = kl
            kmax[j] = kh
            h = hist4[j]
            m4 = m - m % 4
            for i in range(0, m4, 4):
                h[0, u[i]] += 1
                h[1, u[i + 1]] += 1
                h[2, u[i + 2]] += 1
                h[3, u[i + 3]] += 1
            for i in range(m4, m):
                h[0, u[i]] += 1
    for j in range(K):
        for i in range(kmin[j], kmax[j] + 1):
            hist[j, i] = (hist4[j, 0, i] + hist4[j, 1, i]) + (hist4[j, 2, i] + hist4[j, 3, i])
            hist4[j, 0, i] = 0
            hist4[j, 1, i] = 0
            hist4[j, 2, i] = 0
            hist4[j, 3, i] = 0
    return 0


@njit(**_opts)
def delta_key_gather(t, b, bucket, count, lo, hi):
    """float32 only: the keys (31 magnitude bits) of δ in ``bucket`` and their flat indices."""
    keys = np.empty(count, np.int64)
    idx = np.empty(count, np.int64)
    ub = np.empty(CH, np.uint32)
    fb = ub.view(np.float32)
    u = np.empty(CH, np.uint32)
    f = u.view(np.float32)
    n = 0
    for c0 in range(lo, hi, CH):
        m = min(CH, hi - c0)
        _load(b, c0, m, ub)
        _load(t, c0, m, u)
        for i in range(m):
            f[i] = f[i] - fb[i]
            key = u[i] & np.uint32(0x7FFFFFFF)
            if (key >> np.uint32(16)) == bucket:
                keys[n] = key
                idx[n] = c0 + i
                n += 1
    return keys[:n], idx[:n]


@njit(**_opts)
def delta_nth_equal(t, b, thr16, need, lo, hi):
    """bfloat16 only: flat index of the ``need``-th (0-based) entry whose |δ| key equals thr16.

    Counts the matches a chunk at a time (a vectorized count), and walks entry by entry only in
    the chunk that holds the answer."""
    mask = np.uint32(0x7FFFFFFF)
    for c0 in range(lo, hi, CH):
        m = min(CH, hi - c0)
        xt, st_ = _chunk(t, c0, m)
        xb, sb_ = _chunk(b, c0, m)
        c = 0
        for i in range(m):
            v = _r16(_u2f(_wide(xt[i], st_)) - _u2f(_wide(xb[i], sb_)), True)
            c += ((_f2u(v) & mask) >> np.uint32(16)) == thr16
        if need < c:
            for i in range(m):
                v = _r16(_u2f(_wide(xt[i], st_)) - _u2f(_wide(xb[i], sb_)), True)
                if ((_f2u(v) & mask) >> np.uint32(16)) == thr16:
                    if need == 0:
                        return c0 + i
                    need -= 1
        need -= c
    return -1


@njit(**_opts)
def delta_l1(b, K, x0, x1, x2, x3, x4, x5, x6, x7, sparsify, thr, cut, k1, k2, dthr, half, lo, hi):
    """Per task vector j: (Σ|δ_j|, Σ|δ_j after its trim or drop|) over [lo, hi), float64 (four
    partial sums each, so the additions do not wait on one another): L1 rescaling's two norms.

    Per chunk: the base once; per source one fused pass (δ, its magnitude and its keep flag), then
    the float64 sums, in the same order as one source at a time."""
    kmask = np.uint32(0x7FFF0000) if half else np.uint32(0x7FFFFFFF)
    out = np.zeros((K, 2), np.float64)
    sums = np.zeros((K, 8), np.float64)  # per source: 4 partial sums before, 4 after
    ub = np.empty(CH, np.uint32)
    fb = ub.view(np.float32)
    f = np.empty(CH, np.float32)
    keep = np.empty(CH, np.float32)
    one = np.float32(1.0)
    zero = np.float32(0.0)
    for c0 in range(lo, hi, CH):
        m = min(CH, hi - c0)
        _load(b, c0, m, ub)
        for j in range(K):
            x = _pick(j, x0, x1, x2, x3, x4, x5, x6, x7)
            s, sh = _chunk(x, c0, m)
            if sparsify == SP_MAGNITUDE:
                t, cj = _trim_bound(thr[j], cut[j] - c0, half, m)
                for i in range(m):
                    v = _r16(_u2f(_wide(s[i], sh)) - fb[i], half)
                    key = _f2u(v) & kmask
                    f[i] = abs(v)
                    keep[i] = one if (key > t) | ((key == t) & (i < cj)) else zero
            else:
                for i in range(m):
                    v = _r16(_u2f(_wide(s[i], sh)) - fb[i], half)
                    f[i] = abs(v)
                    keep[i] = one if _dare_keep(c0 + i, k1[j], k2[j], dthr[j]) else zero
            sb0, sb1, sb2, sb3, sa0, sa1, sa2, sa3 = sums[j]
            m4 = m - m % 4
            for i in range(0, m4, 4):
                a0 = np.float64(f[i])
                a1 = np.float64(f[i + 1])
                a2 = np.float64(f[i + 2])
                a3 = np.float64(f[i + 3])
                sb0 += a0
                sb1 += a1
                sb2 += a2
                sb3 += a3
                sa0 += a0 * keep[i]
                sa1 += a1 * keep[i + 1]
                sa2 += a2 * keep[i + 2]
                sa3 += a3 * keep[i + 3]
            for i in range(m4, m):
                a0 = np.float64(f[i])
                sb0 += a0
                sa0 += a0 * keep[i]
            sums[j, 0], sums[j, 1], sums[j, 2], sums[j, 3] = sb0, sb1, sb2, sb3
            sums[j, 4], sums[j, 5], sums[j, 6], sums[j, 7] = sa0, sa1, sa2, sa3
    for j in range(K):
        out[j, 0] = (sums[j, 0] + sums[j, 1]) + (sums[j, 2] + sums[j, 3])
        out[j, 1] = (sums[j, 4] + sums[j, 5]) + (sums[j, 6] + sums[j, 7])
    return out


# --- SLERP ----------------------------------------------------------------------------------------


@njit(**_opts)
def lerp_kernel(a, b, ca, cb, out, lo, hi):
    """out = ca·a + cb·b in float32 (two products, one sum, each rounded: no fused multiply-add)."""
    bad = np.zeros(3, np.int64)
    ua = np.empty(CH, np.uint32)
    fa = ua.view(np.float32)
    ub = np.empty(CH, np.uint32)
    fb = ub.view(np.float32)
    for c0 in range(lo, hi, CH):
        m = min(CH, hi - c0)
        bad[0] += _load(a, c0, m, ua)
        bad[1] += _load(b, c0, m, ub)
        for i in range(m):
            fa[i] = ca * fa[i] + cb * fb[i]
        _rnd(ua, m, a.itemsize == 2 and out.itemsize == 4)  # in the compute dtype first
        bad[2] += _store(ua, m, out, c0)
    return bad
