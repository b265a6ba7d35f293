"""Merge the fetched checkpoints per the merge config; publish the result to object storage."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def merge_checkpoints(
    merge_config: str,
    sources: Input[list[Model]],
    base: Input[Model],
    alignment: Input[Artifact],
    output_uri: str,
    s3_endpoint: str,
    pipeline_run: str,
    merged: Output[Model],
    manifest: Output[Artifact],
    device: str = "auto",
    volume_dir: str = "",
) -> None:
    """Run ``seme.merge.run_merge`` into the Model artifact and publish it to ``output_uri/pipeline_run``.

    The published prefix is per pipeline run, so a rerun never overwrites an earlier result.
    Metadata: ``uri`` (published location), ``sha256``, ``method``, ``config_sha256``, ``sources``
    (``[{uri, sha256}]`` of the verified inputs, as the registry's ``seme.sources`` tag wants them),
    and ``volume_path`` when ``volume_dir`` (``--pvc`` mode) put the merged checkpoint on the run's volume.
    ``manifest``: the merged checkpoint's ``seme_manifest.json`` alone (its identity, for the gate).
    """
    import os
    import shutil

    import yaml

    from components.common import artifact_digest, fetched_paths, localize_config, volume_target
    from seme.config import load_config
    from seme.merge import run_merge
    from seme.storage import publish

    cfg = load_config(localize_config(merge_config, fetched_paths(*sources, base)))
    aligned = None if alignment.metadata.get("skipped", True) else alignment.path
    out = volume_target(volume_dir, "merged") or merged.path
    run_merge(cfg, out, alignment=aligned, device=device, progress=False)
    if out != merged.path:
        os.makedirs(merged.path, exist_ok=True)
        merged.metadata["volume_path"] = out
    # the merged checkpoint's identity, small enough to go where the model need not (the gate)
    os.makedirs(manifest.path, exist_ok=True)
    shutil.copyfile(
        os.path.join(out, "seme_manifest.json"), os.path.join(manifest.path, "seme_manifest.json")
    )
    manifest.metadata["sha256"] = artifact_digest(manifest.path)
    uri = ""
    if output_uri:
        uri = f"{output_uri.rstrip('/')}/{pipeline_run}"
        publish(out, uri, endpoint_url=s3_endpoint or None)
    merged.metadata.update(
        {
            "uri": uri,
            "sha256": artifact_digest(out),
            "method": cfg.merge_method,
            # of the config as given (with its s3:// URIs), not of the local paths it ran with
            "config_sha256": load_config(yaml.safe_load(merge_config)).sha256(),
            "sources": [
                {"uri": a.metadata["uri"], "sha256": a.metadata.get("sha256", "")}
                for a in [base, *sources]
                if a.metadata.get("uri")
            ],
        }
    )
