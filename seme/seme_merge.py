"""SeMe's Select → Compute → Erase, one output tensor at a time (seme-method.md §4-§6).

The executor (``seme.merge.run_merge``) calls :meth:`SemeMerger.prepare` once, then
:meth:`SemeMerger.merge_tensor` for every output tensor in the anchor's order. Per tensor the merger
reads the sources (and base) through :class:`~seme.alignment.ModelView` (rotation, folding,
permutations and vocabulary map applied lazily), forms task vectors Δ_k = θ_k − θ_0 and:

- layer matrices (read/write): the module's selected sources, λ-weighted; with ``erase: ties`` and at
  least two selected sources, TIES in semantic coordinates over the token subset T (trim, elect,
  erase, disjoint mean), mapped back with Ŝ_T⁺, in blocks of ``block_size`` vectors (on the GPU when
  the device is cuda);
- embedding / LM-head rows: Select and Compute per token row (no Erase);
- norm gains and biases: the module's λ, no Erase.

Memory stays at a few tensors plus the d×d metric and the |T|×d bases: no model is ever loaded whole.
"""

from __future__ import annotations

import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from itertools import pairwise
from pathlib import Path
from typing import Any

import torch

from seme import methods
from seme.alignment import (
    _ROW_KINDS,
    GLOBAL_PARAMS,
    MODEL_PARAMS,
    Alignment,
    Layout,
    ModelView,
    Settings,
    compute_alignment,
    load_alignment,
    model_basis,
    model_sha256,
    module_key,
    module_weights,
    select_and_compute,
    task_vectors,
    write_alignment,
)
from seme.checkpoint import Checkpoint
from seme.errors import AlignmentError, ConfigError
from seme.semantics import pseudo_inverse_rows, resolve_device

log = logging.getLogger(__name__)


def _not_per_tensor(*_args: Any, **_kwargs: Any) -> torch.Tensor:
    """SeMe needs whole-module statistics; the executor drives it through SemeMerger instead."""
    raise ConfigError("merge_method seme is run by seme.merge.run_merge through SemeMerger, not per tensor")


SPEC = methods.register(
    methods.MethodSpec(
        name="seme",
        fn=_not_per_tensor,
        needs_base=False,
        global_params=dict(GLOBAL_PARAMS),
        model_params=dict(MODEL_PARAMS),
        description="SeMe: semantic alignment + Select/Compute/Erase, data-free (docs/seme-method.md)",
    )
)


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
    """The fused Trim/Elect/Erase/mean kernel (``seme.seme_kernels``, numba), or None.

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
    from seme.seme_kernels import ties_rows

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


class SemeMerger:
    """Streams a SeMe merge: one output tensor per :meth:`merge_tensor` call."""

    def __init__(self, cfg: Any, sources: list[Checkpoint], base: Checkpoint | None, alignment: Alignment,
                 device: str, settings: Settings, inline: bool, alignment_dir: Path | None) -> None:
        self.cfg = cfg
        self.sources = sources
        self.base = base
        self.alignment = alignment
        self.device = device
        self.settings = settings
        self.inline = inline
        self.alignment_dir = alignment_dir
        anchor = base or sources[0]
        self.anchor = anchor
        self.arch = anchor.architecture
        self.layout = Layout(self.arch, anchor.names)
        self.src_views = [ModelView(s, self.layout, alignment.model_alignment(str(i)), device=device)
                          for i, s in enumerate(sources)]
        self.base_view = (ModelView(base, self.layout, alignment.model_alignment("base"), device=device)
                          if base is not None else None)
        t = time.perf_counter()
        basis = getattr(alignment, "anchor_basis", None)
        if basis is None:
            basis = model_basis(anchor, self.layout, None, float(alignment.meta["settings"]["ridge"]), device)
        self.F32 = basis.F.to(device=device, dtype=torch.float32)
        T = alignment.token_subset.to(basis.W.device)
        S_T = basis.unit_rows(T)
        self.S_T = S_T.to(device=device, dtype=torch.float32)
        self.P = pseudo_inverse_rows(S_T).to(device=device, dtype=torch.float32)
        del basis
        self.timings: dict[str, float] = {"erase_basis_s": time.perf_counter() - t, "erase_s": 0.0,
                                          "erase_cpu_s": 0.0, "merge_cpu_s": 0.0,
                                          "merge_s": 0.0}
        self.modules = self._plan_modules()

    # -- preparation -----------------------------------------------------------------------------
    @classmethod
    def prepare(cls, config: Any, sources: list[Checkpoint], base: Checkpoint | None,
                alignment_dir: Path | None, device: str = "cpu") -> SemeMerger:
        """Load (and verify) or compute the alignment, then precompute Ŝ_T, Ŝ_T⁺ and the module plan."""
        device = resolve_device(device)
        settings = Settings.from_config(config)
        if alignment_dir is not None:
            al = load_alignment(alignment_dir)
            _verify(al, sources, base, Path(alignment_dir))
            inline = False
        else:
            al = compute_alignment(config, sources, base, device=device)
            inline = True
        return cls(config, sources, base, al, device, settings, inline, alignment_dir)

    def _plan_modules(self) -> dict[str, dict[str, Any]]:
        """Select/Compute per module with this merge's settings, from the alignment's Gram matrices."""
        from seme.config import ParamResolver

        res = ParamResolver(self.cfg, GLOBAL_PARAMS, MODEL_PARAMS)
        plan = {}
        for key, m in self.alignment.meta["modules"].items():
            first = m["first_tensor"]
            gram = torch.tensor(m["gram"], dtype=torch.float64)
            weights = module_weights(self.cfg, self.arch, first)
            sc = select_and_compute(gram, float(m["base_sq"]), weights, self.settings)
            gp = res.global_params(first, self.arch.t_of(first))
            try:
                alpha = float(gp["scale"])
            except (TypeError, ValueError):
                raise ConfigError(f"SeMe parameter scale must be a number (module {key})") from None
            plan[key] = {**sc, "alpha": alpha, "weights": weights, "gram": m["gram"], "base_sq": m["base_sq"],
                         "first_tensor": first}
        return plan

    # -- merging ---------------------------------------------------------------------------------
    def merge_tensor(self, name: str) -> torch.Tensor:
        """The merged tensor ``name`` (float32, the anchor's layout); the executor casts and writes it."""
        t_start, c_start = time.perf_counter(), time.process_time()  # CPU: the whole process
        role = self.arch.role(name)
        tv = task_vectors(self.src_views, self.base_view, name)
        if tv is None:  # integer buffers: the anchor's
            return self.anchor.get(name)
        t0, deltas, masks = tv
        key = module_key(role)
        mod = self.modules.get(key)
        if mod is None:
            raise AlignmentError(f"alignment has no statistics for module {key} (tensor {name}); re-run seme align")
        alpha = mod["alpha"]
        sel = [k for k, s in enumerate(mod["selected"]) if s]
        if role.kind in _ROW_KINDS and t0.dim() == 2:
            out = self._merge_rows(t0, deltas, masks, mod)
        elif not sel:
            out = t0
        elif (role.kind in ("read", "write") and t0.dim() == 2 and self.settings.erase == "ties"
              and len(sel) >= 2):
            te, ce = time.perf_counter(), time.process_time()
            # vectors as rows: write columns (transposed once) or read rows (as stored)
            X = torch.stack([mod["lambda"][k] * (deltas[k].T if role.kind == "write" else deltas[k])
                             for k in sel])
            merged = erase_ties_rows(X, self.S_T, self.P, self.settings.density, self.settings.block_size)
            out = t0 + alpha * (merged.T if role.kind == "write" else merged)
            self.timings["erase_s"] += time.perf_counter() - te
            self.timings["erase_cpu_s"] += time.process_time() - ce
        else:
            out = t0 + alpha * sum(mod["lambda"][k] * deltas[k] for k in sel)
        if role.transposed and out.dim() == 2:
            out = out.T
        self.timings["merge_s"] += time.perf_counter() - t_start
        self.timings["merge_cpu_s"] += time.process_time() - c_start
        return out.contiguous()

    def _merge_rows(self, t0: torch.Tensor, deltas: list[torch.Tensor], masks: list[torch.Tensor | None],
                    mod: dict[str, Any]) -> torch.Tensor:
        """Embedding / LM-head rows: Select and Compute per token row with the module's λ (§6)."""
        s = self.settings
        K = len(deltas)
        F = self.F32
        w = torch.tensor(mod["weights"], dtype=torch.float32, device=t0.device)
        out = t0.clone()
        for lo in range(0, t0.shape[0], 8192):
            hi = min(lo + 8192, t0.shape[0])
            D = torch.stack([dk[lo:hi] for dk in deltas])  # K×n×d
            FD = D @ F
            sq = (D * FD).sum(-1).clamp_min(0)  # K×n
            b0 = t0[lo:hi]
            base = ((b0 @ F) * b0).sum(-1).clamp_min(0)
            sigma = torch.where(base > 0, sq.sqrt() / base.sqrt().clamp_min(1e-30), sq.sqrt())
            smax = sigma.max(0).values
            sel = (sigma >= s.select_ratio * smax) & (sigma > s.select_floor)
            for k, m in enumerate(masks):
                if m is not None:
                    sel[k] &= m[lo:hi].bool()
            lam = w[:, None].expand(K, hi - lo).clone()
            if s.compute == "overlap":
                G = torch.einsum("jnd,knd->jkn", D, FD)
                nrm = sq.sqrt()
                O = G / (nrm[:, None] * nrm[None, :]).clamp_min(1e-30)
                tot = (O.clamp_min(0) * sel[:, None, :]).sum(0)  # Σ_j∈sel max(0, O_jk)
                lam = torch.where(tot > 0, lam / tot.clamp_min(1e-30), lam)
            elif s.compute == "cap":
                lw = lam * sel
                summed = (lw[:, :, None] * D).sum(0)
                tot = ((summed @ F) * summed).sum(-1).clamp_min(0).sqrt()
                largest = (lw.abs() * sq.sqrt()).max(0).values
                cap = torch.where(tot > 0, (largest / tot.clamp_min(1e-30)).clamp(max=1.0), torch.ones_like(tot))
                lam = lam * cap[None, :]
            coef = lam * sel
            out[lo:hi] = b0 + mod["alpha"] * (coef[:, :, None] * D).sum(0)
        return out

    # -- outputs ---------------------------------------------------------------------------------
    def merge_meta(self) -> dict[str, Any]:
        """alignment.json as this merge used it (modules carry this merge's selection and λ)."""
        meta = dict(self.alignment.meta)
        meta["modules"] = {
            k: {kk: v for kk, v in m.items()} for k, m in self.modules.items()
        }
        meta["merge_settings"] = {k: getattr(self.settings, k) for k in GLOBAL_PARAMS}
        meta["merge_timings"] = dict(self.timings)
        return meta

    def manifest_extra(self) -> dict[str, Any]:
        """SeMe's entry in seme_manifest.json."""
        K = len(self.sources)
        layer_mods = [m for k, m in self.modules.items() if k.startswith(("attn.", "mlp."))]
        return {
            "alignment": "inline" if self.inline else str(self.alignment_dir),
            "anchor": self.alignment.meta["anchor"],
            "settings": {k: getattr(self.settings, k) for k in GLOBAL_PARAMS},
            "rotation": self.alignment.meta["rotation"],
            "selected_modules_per_source": [sum(1 for m in layer_mods if m["selected"][k]) for k in range(K)],
            "layer_modules": len(layer_mods),
            "token_subset": int(self.alignment.token_subset.numel()),
            "f_spectrum": self.alignment.meta.get("f_spectrum"),
            "alignment_timings": self.alignment.meta.get("timings"),
            "merge_timings": dict(self.timings),
            "device": self.device,
        }

    def write_artifacts(self, out_dir: Path) -> None:
        """The alignment artifact as used by this merge, under ``out_dir/seme_alignment``."""
        write_alignment(Alignment(meta=self.merge_meta(), tensors=self.alignment.tensors),
                        Path(out_dir) / "seme_alignment")


def _verify(al: Alignment, sources: list[Checkpoint], base: Checkpoint | None, where: Path) -> None:
    """The artifact must have been computed for exactly these checkpoints (sha256 of their files)."""
    models = al.meta.get("models", {})
    want = (["base"] if base is not None else []) + [str(i) for i in range(len(sources))]
    if sorted(models) != sorted(want):
        raise AlignmentError(
            f"{where}: alignment was computed for models {sorted(models)}, this merge has {want} "
            "(base and sources must match the config used by seme align)"
        )
    for key, ck in zip(want, ([base] if base is not None else []) + list(sources)):
        if models[key]["sha256"] != model_sha256(ck):
            raise AlignmentError(
                f"{where}: alignment was computed for {models[key]['path']}, whose weights differ from "
                f"{ck.path}; re-run seme align"
            )
