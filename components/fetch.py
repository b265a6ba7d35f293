"""Fetch one checkpoint from object storage into a verified Model artifact."""

from kfp import dsl
from kfp.dsl import Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def fetch_checkpoint(uri: str, s3_endpoint: str, checkpoint: Output[Model], volume_dir: str = "") -> None:
    """Download ``uri`` (``s3://bucket/prefix``) with every file's sha256 verified.

    An empty ``uri`` means "no checkpoint" (a merge without base model): the artifact is an empty
    directory with ``metadata.uri == ""``. Metadata: ``uri``, ``sha256`` (digest of the directory).
    With ``volume_dir`` (``--pvc`` mode) the checkpoint goes onto the run's volume and the artifact
    only records ``metadata.volume_path``: later steps mount the volume instead of downloading it.
    """
    import hashlib
    import os

    from components.common import artifact_digest, volume_target
    from seme.storage import fetch

    if not uri:
        os.makedirs(checkpoint.path, exist_ok=True)
        checkpoint.metadata.update({"uri": "", "sha256": ""})
        return
    on_volume = volume_target(volume_dir, "fetched", hashlib.sha256(uri.encode()).hexdigest()[:16])
    path = fetch(uri, endpoint_url=s3_endpoint or None, dest=on_volume or checkpoint.path)
    checkpoint.metadata.update({"uri": uri, "sha256": artifact_digest(path)})
    if on_volume:
        os.makedirs(checkpoint.path, exist_ok=True)
        checkpoint.metadata["volume_path"] = str(path)
