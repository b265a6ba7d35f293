"""SeMe alignment (data-free, weights only): the step that asks for a GPU."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def compute_alignment(
    merge_config: str,
    sources: Input[list[Model]],
    base: Input[Model],
    alignment: Output[Artifact],
    device: str = "auto",
) -> None:
    """Compute the SeMe alignment artifact (seme-method.md §7) from the fetched checkpoints.

    ``device="auto"`` uses CUDA when the pod got a GPU and the CPU otherwise (a local run, or a
    cluster compiled with ``--no-gpu``). Methods other than ``seme`` need no alignment: the artifact
    is then an empty directory with ``metadata.skipped = true``.
    Metadata: ``method``, ``device``, ``sha256``, ``skipped``.
    """
    import os

    from components.common import artifact_digest, fetched_paths, localize_config
    from seme.config import load_config
    from seme.merge import resolve_device

    cfg = load_config(localize_config(merge_config, fetched_paths(*sources, base)))
    if cfg.merge_method != "seme":
        os.makedirs(alignment.path, exist_ok=True)
        alignment.metadata.update({"method": cfg.merge_method, "skipped": True, "sha256": ""})
        return
    from seme.semantic.alignment import align

    dev = str(resolve_device(device))
    align(cfg, alignment.path, device=dev)
    alignment.metadata.update(
        {
            "method": cfg.merge_method,
            "skipped": False,
            "device": dev,
            "sha256": artifact_digest(alignment.path),
        }
    )
