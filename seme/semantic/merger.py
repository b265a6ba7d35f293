"""SeMe's merge driver: Select → Compute → Erase, one output tensor at a time (seme-method.md §4-§6).

The executor (``seme.merge.run_merge``) calls :meth:`SemeMerger.prepare` once (load and verify the
alignment artifact, or compute it inline), then :meth:`SemeMerger.merge_tensor` for every output
tensor in the anchor's order. Per tensor the merger reads the sources (and base) through
:class:`~seme.semantic.transform.ModelView` (rotation, folding, permutations and vocabulary map
applied lazily), forms task vectors Δ_k = θ_k − θ_0 and:

- layer matrices (read/write): the module's selected sources, λ-weighted; with ``erase: ties`` and at
  least two selected sources, Erase (``seme.semantic.erase``), else θ_0 + α Σ λ_k Δ_k;
- embedding / LM-head rows: Select and Compute per token row (no Erase), block of rows by block;
- norm gains and biases: the module's λ, no Erase.

Memory: one tensor (or one block of embedding rows) of every input at a time, plus the d×d metric,
Ŝ_T and Ŝ_T⁺ (|T|×d); the executor gives each tensor's input pages back once it is written.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

import torch

from seme import methods
from seme.checkpoint import Checkpoint
from seme.errors import AlignmentError, ConfigError
from seme.semantic.alignment import compute_alignment
from seme.semantic.artifact import Alignment, load_alignment, verify_alignment, write_alignment
from seme.semantic.bases import model_basis, pseudo_inverse_rows
from seme.semantic.compute import compute_rows, module_weights, select_and_compute
from seme.semantic.erase import erase_ties_rows
from seme.semantic.select import select_rows
from seme.semantic.settings import GLOBAL_PARAMS, MODEL_PARAMS, Settings, resolve_device
from seme.semantic.transform import ROW_KINDS, Layout, ModelView, module_key, row_blocks, task_vectors

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
        basis = alignment.anchor_basis
        alignment.anchor_basis = None  # only Ŝ_T, Ŝ_T⁺ and F are kept: not the V×d readout
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
            verify_alignment(al, sources, base, Path(alignment_dir))
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
        mod = self.modules.get(module_key(role))
        if role.kind in ROW_KINDS and len(self.anchor.shape(name)) == 2:
            out = self._merge_rows(name, mod)
        else:
            out = self._merge_tensor(name, role, mod)
        if role.transposed and out.dim() == 2:
            out = out.T
        self.timings["merge_s"] += time.perf_counter() - t_start
        self.timings["merge_cpu_s"] += time.process_time() - c_start
        return out.contiguous()

    def _module(self, mod: dict[str, Any] | None, name: str) -> dict[str, Any]:
        if mod is None:
            raise AlignmentError(f"alignment has no statistics for module {module_key(self.arch.role(name))} "
                                 f"(tensor {name}); re-run seme align")
        return mod

    def _merge_tensor(self, name: str, role: Any, mod: dict[str, Any] | None) -> torch.Tensor:
        """A layer matrix, norm gain or bias: the module's selected sources, Erase for matrices."""
        tv = task_vectors(self.src_views, self.base_view, name)
        if tv is None:  # integer buffers: the anchor's
            return self.anchor.get(name)
        t0, deltas, _masks = tv
        mod = self._module(mod, name)
        alpha, lam = mod["alpha"], mod["lambda"]
        sel = [k for k, s in enumerate(mod["selected"]) if s]
        if not sel:
            return t0
        if role.kind in ("read", "write") and t0.dim() == 2 and self.settings.erase == "ties" and len(sel) >= 2:
            te, ce = time.perf_counter(), time.process_time()
            # vectors as rows: write columns (transposed once) or read rows (as stored)
            X = torch.stack([lam[k] * (deltas[k].T if role.kind == "write" else deltas[k]) for k in sel])
            merged = erase_ties_rows(X, self.S_T, self.P, self.settings.density, self.settings.block_size)
            self.timings["erase_s"] += time.perf_counter() - te
            self.timings["erase_cpu_s"] += time.process_time() - ce
            return t0 + alpha * (merged.T if role.kind == "write" else merged)
        return t0 + alpha * sum(lam[k] * deltas[k] for k in sel)

    def _merge_rows(self, name: str, mod: dict[str, Any] | None) -> torch.Tensor:
        """Embedding / LM-head rows: Select and Compute per token row with the module's λ (§6), block
        of rows by block of rows (no whole V×d task vector is formed)."""
        w = None
        out = None
        for rows in row_blocks(self.src_views[0], name):
            t0, deltas, masks = task_vectors(self.src_views, self.base_view, name, rows)
            mod = self._module(mod, name)
            if out is None:
                out = torch.empty(self.src_views[0].anchor_rows(name), t0.shape[1], dtype=t0.dtype,
                                  device=t0.device)
                w = torch.tensor(mod["weights"], dtype=torch.float32, device=t0.device)
            D = torch.stack(deltas)  # K×n×d
            FD = D @ self.F32
            sel, sq = select_rows(D, FD, t0, self.F32, self.settings, masks)
            coef = compute_rows(D, FD, sq, sel, w, self.F32, self.settings)
            out[rows[0] : rows[1]] = t0 + mod["alpha"] * (coef[:, :, None] * D).sum(0)
            for v in [*self.src_views, *([self.base_view] if self.base_view is not None else [])]:
                v.release(name, rows)
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


