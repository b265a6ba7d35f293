"""The alignment artifact: what ``seme align`` writes and ``seme merge --alignment`` reads (§7).

``alignment.json`` (format version, models with path and per-file sha256, anchor, settings,
per-module σ / selection / λ / overlaps / Gram matrices, rotation record, permutation flags,
vocabulary records, F spectrum, timings, device), ``alignment.safetensors`` (R_k, permutations,
vocabulary maps, token subset T), and two heatmaps (``semantic_shift.png``: σ, ``coefficients.png``:
λ; layers × sources). :func:`verify_alignment` checks that an artifact belongs to the checkpoints of
a merge.

Part of the method: the *semantics-preservative transformations*, stored.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from seme.checkpoint import Checkpoint
from seme.errors import AlignmentError
from seme.semantic.bases import SemanticBasis
from seme.semantic.transform import ModelAlignment

FORMAT_VERSION = 1

@dataclass
class Alignment:
    """An alignment: ``meta`` (alignment.json) + ``tensors`` (alignment.safetensors)."""

    meta: dict[str, Any]
    tensors: dict[str, torch.Tensor]
    anchor_basis: SemanticBasis | None = field(default=None, repr=False)  # in memory only

    def model_alignment(self, key: str) -> ModelAlignment:
        """Transforms of model ``key`` ("base" or the source index as a string)."""
        t = self.tensors
        m = self.meta["models"][key]
        al = ModelAlignment(
            rotation=t.get(f"rotation.{key}"),
            fold=bool(self.meta["rotation"]["applied"]),
            fold_final=bool(self.meta["rotation"]["fold_final"]),
            vocab_map=t.get(f"vocab_map.{key}"),
        )
        for layer in m.get("mlp_permuted_layers", []):
            al.mlp_perm[int(layer)] = t[f"mlp_perm.{key}.{layer}"]
        for layer in m.get("attn_permuted_layers", []):
            al.attn_perm[int(layer)] = t[f"attn_perm.{key}.{layer}"]
        return al

    @property
    def token_subset(self) -> torch.Tensor:
        return self.tensors["tokens"]


def model_sha256(ckpt: Checkpoint) -> dict[str, str]:
    """sha256 per weight file (names relative to the checkpoint directory)."""
    from seme.fsutil import sha256_file

    return {str(Path(f).relative_to(ckpt.path)): sha256_file(f) for f in ckpt.files}


def write_alignment(alignment: Alignment, out: Path) -> None:
    """Write alignment.json, alignment.safetensors and the two heatmaps into ``out``."""
    import hashlib

    from safetensors.torch import save

    out.mkdir(parents=True, exist_ok=True)
    raw = save({k: v.contiguous() for k, v in alignment.tensors.items()},
               metadata={"format": "seme-alignment", "format_version": str(FORMAT_VERSION)})
    (out / "alignment.safetensors").write_bytes(raw)
    # the tensors' digest, checked on load: a changed alignment.safetensors is refused, not half-used
    alignment.meta["tensors_sha256"] = hashlib.sha256(raw).hexdigest()
    (out / "alignment.json").write_text(json.dumps(alignment.meta, indent=2))
    plot_heatmaps(alignment.meta, out)


def plot_heatmaps(meta: dict[str, Any], out: Path) -> None:
    """semantic_shift.png (σ) and coefficients.png (λ): layers × sources, one panel per module kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n_layers = int(meta["num_layers"])
    K = len(meta["weights"])
    for field_, fname, title in (("sigma", "semantic_shift.png", "semantic displacement σ"),
                                 ("lambda", "coefficients.png", "coefficient λ (0: not selected)")):
        fig, axes = plt.subplots(1, 2, figsize=(4 + 1.2 * K, 2 + 0.18 * n_layers), squeeze=False)
        for ax, mod in zip(axes[0], ("attn", "mlp")):
            grid = torch.zeros(n_layers, K)
            for layer in range(n_layers):
                m = meta["modules"].get(f"{mod}.{layer}")
                if m:
                    grid[layer] = torch.tensor(m[field_], dtype=torch.float32)
            im = ax.imshow(grid.numpy(), aspect="auto", cmap="viridis", origin="upper")
            ax.set_title(f"{mod}: {title}", fontsize=8)
            ax.set_xlabel("source")
            ax.set_ylabel("layer")
            ax.set_xticks(range(K))
            fig.colorbar(im, ax=ax)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=100)
        plt.close(fig)


def load_alignment(path: str | os.PathLike) -> Alignment:
    """Read an alignment artifact directory; AlignmentError when it is missing or malformed."""
    from safetensors.torch import load_file

    p = Path(path)
    js, st = p / "alignment.json", p / "alignment.safetensors"
    if not js.is_file() or not st.is_file():
        raise AlignmentError(f"{p}: not an alignment artifact (needs alignment.json and alignment.safetensors)")
    try:
        meta = json.loads(js.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise AlignmentError(f"{js}: invalid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise AlignmentError(f"{js}: not a JSON object")
    if meta.get("format_version") != FORMAT_VERSION:
        raise AlignmentError(f"{js}: format_version {meta.get('format_version')!r}, expected {FORMAT_VERSION}")
    want = meta.get("tensors_sha256")
    if not isinstance(want, str):
        raise AlignmentError(f"{js}: no tensors_sha256 recorded; re-run `seme align` to make a verifiable artifact")
    from seme.fsutil import sha256_file

    if sha256_file(st) != want:
        raise AlignmentError(f"{st}: sha256 does not match the one in alignment.json (modified or corrupt)")
    try:
        tensors = load_file(str(st))
    except Exception as e:  # noqa: BLE001 - safetensors raises several unrelated types
        raise AlignmentError(f"{st}: corrupt alignment tensors ({e})") from None
    if "tokens" not in tensors:
        raise AlignmentError(f"{st}: missing the token subset")
    _check_alignment_shapes(meta, tensors, js)
    return Alignment(meta=meta, tensors=tensors)


def _check_alignment_shapes(meta: dict[str, Any], tensors: dict[str, torch.Tensor], js: Path) -> None:
    """The structure ``Alignment.model_alignment`` relies on, so a bad artifact fails here, in one line."""
    models = meta.get("models")
    rot = meta.get("rotation")
    if not isinstance(models, dict) or not isinstance(rot, dict) or not {"applied", "fold_final"} <= set(rot):
        raise AlignmentError(f"{js}: missing or malformed 'models'/'rotation'")
    for key, m in models.items():
        if not isinstance(m, dict):
            raise AlignmentError(f"{js}: models.{key} is not an object")
        for kind in ("mlp", "attn"):
            layers = m.get(f"{kind}_permuted_layers", [])
            if not isinstance(layers, list):
                raise AlignmentError(f"{js}: models.{key}.{kind}_permuted_layers is not a list")
            for layer in layers:
                t = tensors.get(f"{kind}_perm.{key}.{layer}")
                if t is None or t.dim() != 1 or t.is_floating_point() or t.dtype == torch.bool:
                    raise AlignmentError(f"{js}: permutation {kind}_perm.{key}.{layer} is missing or malformed")
                if not torch.equal(torch.sort(t).values, torch.arange(t.numel())):
                    raise AlignmentError(f"{js}: {kind}_perm.{key}.{layer} is not a permutation")



def verify_alignment(al: Alignment, sources: list[Checkpoint], base: Checkpoint | None, where: Path) -> None:
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
