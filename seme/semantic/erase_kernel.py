"""Erase's fused CPU kernel (numba): Trim → Elect → Erase → disjoint mean, one vector at a time.

After the GEMM that projects a block of task vectors onto the token subset (c, (K·b)×|T|), the torch
path in :func:`seme.semantic.erase.erase_ties_rows` makes about a dozen passes over c (abs, a partition
copy, masks, sums) and selects each vector's threshold with numpy's introselect. This kernel does
all of it per vector while its K rows sit in cache: an exact histogram select of the threshold
(11-bit buckets of the |c| bit patterns, then a partition of one bucket), then three vectorisable
loops. Same arithmetic as the torch path (float32 sums over the sources in order): the output is
the same bit for bit up to 4 sources, within an ulp beyond (torch may associate its reduction
differently); ``tests/test_seme_merge.py`` checks both. Compiled on first use and cached
on disk (``$NUMBA_CACHE_DIR``, default ``~/.cache/seme/numba``).

Part of the method: *Erase* (its CPU hot loop; ``seme.semantic.erase`` drives it).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

os.environ.setdefault("NUMBA_CACHE_DIR", str(Path.home() / ".cache" / "seme" / "numba"))

from numba import njit  # after NUMBA_CACHE_DIR is set


@njit(nogil=True, cache=True, error_model="numpy")
def kth_largest_abs(u, keep, hist, cand):
    """The keep-th largest |x| of a float32 row given as uint32 bits ``u``, exactly.

    |x| bits are monotone in |x|: an 11-bit histogram (exponent + 3 mantissa bits) finds the bin
    holding the answer, and a partition of that bin's entries (a few % of the row) finishes.
    """
    hist[:] = 0
    for t in range(u.shape[0]):
        hist[(u[t] & np.uint32(0x7FFFFFFF)) >> np.uint32(20)] += 1
    cum = 0
    top = hist.shape[0] - 1
    while cum + hist[top] < keep:
        cum += hist[top]
        top -= 1
    n = 0
    for t in range(u.shape[0]):
        a = u[t] & np.uint32(0x7FFFFFFF)
        if (a >> np.uint32(20)) == top:
            cand[n] = a
            n += 1
    need = keep - cum  # rank inside the bin, 1 = largest
    return np.partition(cand[:n], n - need)[n - need]


@njit(nogil=True, cache=True, error_model="numpy")
def ties_rows(c, K, b, keep, lo, hi, out):
    """Rows lo..hi of one block: c is (K·b, |T|) float32 (source k, vector j at row k·b + j);
    out[j] gets the disjoint mean of the trimmed entries agreeing with the elected sign, per
    token. Sums run in float32 over k in order, as the torch path's reductions do."""
    T = c.shape[1]
    thr = np.zeros(K, dtype=np.float32)
    tb = np.zeros(1, dtype=np.uint32)
    hist = np.empty(2048, dtype=np.int64)
    cand = np.empty(T, dtype=np.uint32)
    tot = np.empty(T, dtype=np.float32)
    acc = np.empty(T, dtype=np.float32)
    cnt = np.empty(T, dtype=np.float32)
    z = np.float32(0)
    one = np.float32(1)
    for j in range(lo, hi):
        if keep < T:
            for k in range(K):
                tb[0] = kth_largest_abs(c[k * b + j].view(np.uint32), keep, hist, cand)
                thr[k] = tb.view(np.float32)[0]
        tot[:] = z
        for k in range(K):
            row = c[k * b + j]
            th = thr[k]
            for t in range(T):
                v = row[t]
                tot[t] += v if abs(v) >= th else z
        acc[:] = z
        cnt[:] = z
        for k in range(K):
            row = c[k * b + j]
            th = thr[k]
            for t in range(T):
                v = row[t]
                s = tot[t]
                ok = (abs(v) >= th) and ((v > z and s > z) or (v < z and s < z))
                acc[t] += v if ok else z
                cnt[t] += one if ok else z
        for t in range(T):
            out[j, t] = acc[t] / cnt[t] if cnt[t] > z else z
