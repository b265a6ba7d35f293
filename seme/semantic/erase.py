"""Erase: TIES in semantic coordinates, the interference removal between sources (seme-method.md §5).

Per residual-side vector (column of a write matrix, row of a read matrix) the selected sources'
λ-weighted task vectors are projected onto the token subset, c_k = λ_k Ŝ_T Δ_k ∈ R^|T|; Trim keeps
the top ``density`` of |c_k| (an exact selection of the threshold, no sort), Elect takes a sign per
token from the trimmed sum, Erase drops the entries that disagree with it, and the disjoint mean is
mapped back with Ŝ_T⁺ = (Ŝ_TᵀŜ_T)⁻¹Ŝ_Tᵀ. Vectors go in blocks of ``block_size`` (memory
O(K·|T|·block_size)). On the CPU everything between the two GEMMs is one fused numba kernel per
vector (``seme.semantic.erase_kernel``); the torch ops here are the reference and the GPU path, with
the same output (``SEME_KERNELS=off`` selects them).

Part of the method: *Erase*.
"""

from __future__ import annotations

import logging
import math
import os
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from typing import Any

import torch

log = logging.getLogger(__name__)

def erase_ties(X: torch.Tensor, S_T: torch.Tensor, P: torch.Tensor, density: float,
               block: int = 512) -> torch.Tensor:
    """TIES in semantic coordinates (§5) for residual-side vectors.

    X: (K, d, n) λ-weighted task vectors of the selected sources (columns are vectors).
    S_T: (|T|, d) unit semantic bases of the token subset; P = Ŝ_T⁺ (d, |T|).
    Returns Δ* (d, n). Trim keeps the top ``density`` fraction of |c| per vector; a sign is elected
    per token from the trimmed sum; entries of the other sign are erased; the kept entries are
    averaged (disjoint mean) and mapped back with P. See :func:`erase_ties_rows`.
    """
    return erase_ties_rows(X.transpose(1, 2), S_T, P, density, block).T


def erase_ties_rows(X: torch.Tensor, S_T: torch.Tensor, P: torch.Tensor, density: float,
                    block: int = 512) -> torch.Tensor:
    """TIES in semantic coordinates (§5), vectors as rows: X (K, n, d) -> Δ* (n, d).

    Per block of b vectors the K sources are projected with one GEMM into a (K, b, |T|) buffer (|T|
    contiguous, so the per-vector selection runs along memory). Trim zeroes entries below each
    vector's top-``density`` threshold; with s the elected sign (sign of the trimmed sum), c·s > 0
    marks the agreeing entries and Σ max(c·s, 0)·s is their sum (sign flips are exact, so this equals
    the plain masked sum); the disjoint mean is mapped back with P = Ŝ_T⁺. Every intermediate lives in
    buffers allocated once per call (fresh multi-MB allocations cost page faults on every block).
    On the CPU, everything after the GEMM runs as one fused numba kernel per vector (selection,
    trim, elect, erase, mean in cache), unless ``SEME_KERNELS=off``; the torch ops below are the
    reference and the GPU path.
    """
    K, n, d = X.shape
    T = S_T.shape[0]
    keep = max(1, math.ceil(density * T))
    trim = keep < T
    out = torch.empty(n, d, dtype=X.dtype, device=X.device)
    St = S_T.T  # (d, |T|) view: mm reads it transposed, no copy
    Pt = P.T  # (|T|, d)
    count_dtype = torch.uint8 if K < 256 else torch.int32
    bmax = min(block, max(n, 1))
    opts = {"dtype": X.dtype, "device": X.device}
    buf, kbuf = torch.empty(K * bmax * T, **opts), torch.empty(bmax * T, **opts)
    kernel = _ties_kernel() if X.device.type == "cpu" and X.dtype == torch.float32 else None
    if kernel is None:  # the torch path's buffers
        mbuf = torch.empty(K * bmax * T, dtype=torch.bool, device=X.device)
        sbuf = torch.empty(bmax * T, **opts)
        cbuf = torch.empty(bmax * T, dtype=count_dtype, device=X.device)
        if trim:
            abuf = torch.empty(K * bmax * T, **opts)
            pbuf = torch.empty(K * bmax * T, dtype=X.dtype) if X.device.type == "cpu" else None
    for lo in range(0, n, block):
        hi = min(lo + block, n)
        b = hi - lo
        kb = K * b * T
        c = torch.mm(X[:, lo:hi].reshape(K * b, d), St, out=buf[:kb].view(K * b, T))
        if kernel is not None:  # one fused pass per vector (CPU)
            mean = kbuf[: b * T].view(b, T)
            _ties_fused(kernel, c, K, b, keep, mean)
            torch.mm(mean, Pt, out=out[lo:hi])
            continue
        if trim:
            a = torch.abs(c, out=abuf[:kb].view(K * b, T))
            thr = _row_thresholds(a, keep, pbuf).to(a.device)
            c.masked_fill_(torch.lt(a, thr, out=mbuf[:kb].view(K * b, T)), 0)
            del a
        c3 = c.view(K, b, T)
        s = torch.sum(c3, dim=0, out=sbuf[: b * T].view(b, T)).sign_()  # elected sign per token
        c3.mul_(s)
        agree = torch.gt(c3, 0, out=mbuf[:kb].view(K, b, T))
        count = torch.sum(agree, dim=0, dtype=count_dtype, out=cbuf[: b * T].view(b, T))  # uint8: ~8x faster
        kept = torch.sum(c3.clamp_min_(0), dim=0, out=kbuf[: b * T].view(b, T)).mul_(s)
        torch.mm(kept.div_(count.clamp_min_(1)), Pt, out=out[lo:hi])
    return out


# -- the step between the GEMMs: fused kernel (CPU) or exact per-row selection (torch path) -----------

_SELECT_POOL: ThreadPoolExecutor | None = None
_SELECT_MIN_ROWS = 64  # rows per selection thread below which threading does not pay


def _select_pool() -> ThreadPoolExecutor:
    global _SELECT_POOL
    if _SELECT_POOL is None:
        _SELECT_POOL = ThreadPoolExecutor(max_workers=max(1, os.cpu_count() or 1), thread_name_prefix="seme-select")
    return _SELECT_POOL


def _row_thresholds(a: torch.Tensor, keep: int, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per row of ``a`` (m×|T|, non-negative): the ``keep``-th largest entry, as an (m, 1) column.

    On the CPU numpy's introselect (``np.partition``) is several times faster than torch.kthvalue and
    returns the same element; it releases the GIL, so row chunks run on ``torch.get_num_threads()``
    threads. ``scratch`` (a float32 CPU tensor with at least m·|T| elements) is the buffer each chunk
    is copied into and partitioned in place (else a fresh copy); ``a`` itself is left unchanged.
    Elsewhere kthvalue along the contiguous last dim.
    """
    m, T = a.shape
    kth = T - keep
    if a.device.type != "cpu":
        return a.kthvalue(kth + 1, dim=1, keepdim=True).values
    import numpy as np

    an = a.numpy()
    buf = scratch.reshape(-1)[: m * T].view(m, T).numpy() if scratch is not None else np.empty_like(an)
    out = np.empty((m, 1), dtype=an.dtype)

    def part(lo: int, hi: int) -> None:
        np.copyto(buf[lo:hi], an[lo:hi])
        buf[lo:hi].partition(kth, axis=1)
        out[lo:hi] = buf[lo:hi, kth : kth + 1]

    nt = max(1, min(torch.get_num_threads(), m // _SELECT_MIN_ROWS))
    if nt == 1:
        part(0, m)
    else:
        bounds = [m * i // nt for i in range(nt + 1)]
        for f in [_select_pool().submit(part, lo, hi) for lo, hi in pairwise(bounds)]:
            f.result()
    return torch.from_numpy(out)


_KERNELS_ENV = "SEME_KERNELS"  # "off": torch path only (same switch as the classic methods' kernels)
_TIES_KERNEL: Any = None  # the fused numba kernel once built; False when unavailable


def _ties_kernel() -> Any:
    """The fused Trim/Elect/Erase/mean kernel (``seme.semantic.erase_kernel``, numba), or None.

    None on request (``SEME_KERNELS=off``) or when numba cannot be imported: the torch path is the
    reference and gives the same values.
    """
    global _TIES_KERNEL
    if _TIES_KERNEL is None:
        if os.environ.get(_KERNELS_ENV, "").lower() in ("off", "0", "false", "no"):
            return None
        try:
            _TIES_KERNEL = _build_ties_kernel()
        except ImportError as e:
            log.warning("SeMe: fused Erase kernel unavailable (%s); using the torch implementation", e)
            _TIES_KERNEL = False
    return _TIES_KERNEL or None


def _build_ties_kernel() -> Any:
    from seme.semantic.erase_kernel import ties_rows

    return ties_rows


def _ties_fused(kernel: Any, c: torch.Tensor, K: int, b: int, keep: int, out: torch.Tensor) -> None:
    """Run the fused kernel over the b vectors of a block, in row chunks on the selection threads."""
    cn, on = c.numpy(), out.numpy()
    nt = max(1, min(torch.get_num_threads(), b // 8))
    if nt == 1:
        kernel(cn, K, b, keep, 0, b, on)
        return
    bounds = [b * i // nt for i in range(nt + 1)]
    for f in [_select_pool().submit(kernel, cn, K, b, keep, lo, hi, on) for lo, hi in pairwise(bounds)]:
        f.result()
