"""What every component shares: the project image and the artifact digest recorded as metadata.

Imported inside component bodies (``from components.common import ...``): the image installs this
package next to ``seme``, and locally it is importable from the checkout.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

#: The default project image every component runs in (infra/docker/Dockerfile; the CUDA variant is
#: tagged ``<version>-cu128``). ``seme pipeline compile --image IMAGE[@sha256:...]`` replaces it on
#: every step: a compiled pipeline names exactly one image.
IMAGE = "ghcr.io/seme-project/seme:0.1.0"

# Files that describe a directory rather than belong to it: excluded from its digest.
_BOOKKEEPING = {".seme_fetch.json"}


def artifact_digest(path: str | os.PathLike) -> str:
    """sha256 of a file, or of a directory as the sorted ``"<sha256>  <relative path>"`` lines of its files.

    For a directory the per-file digests recorded by ``seme fetch`` (``.seme_fetch.json``) are used
    when present, so a verified multi-GB checkpoint is not read twice.
    """
    from seme.fsutil import sha256_file

    p = Path(path)
    if p.is_file():
        return sha256_file(p)
    known: dict[str, str] = {}
    record = p / ".seme_fetch.json"
    if record.is_file():
        known = {rel: f["sha256"] for rel, f in json.loads(record.read_text()).get("files", {}).items()}
    lines = []
    for rel in sorted(x.relative_to(p).as_posix() for x in p.rglob("*") if x.is_file()):
        if rel not in _BOOKKEEPING:
            lines.append(f"{known.get(rel) or sha256_file(p / rel)}  {rel}\n")
    return hashlib.sha256("".join(lines).encode()).hexdigest()


def localize_config(config_yaml: str, fetched: dict[str, str]) -> dict:
    """The merge config with every fetched ``s3://`` reference replaced by its local artifact path.

    The pipeline fetches ``source_uris`` and ``base_uri`` in their own steps; the config names the
    same URIs (``models[].model``, ``base_model``, ``tokenizer_source``). A config URI that was not
    fetched, or a fetched URI the config does not use, is a ``ConfigError`` naming it, so the
    pipeline never merges something other than what it verified.
    """
    import yaml

    from seme.errors import ConfigError

    try:
        cfg = yaml.safe_load(config_yaml)
    except yaml.YAMLError as e:
        raise ConfigError(f"merge_config: invalid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(cfg, dict):
        raise ConfigError("merge_config: a merge config must be a YAML mapping")
    used: set[str] = set()

    def local(ref: object, where: str) -> object:
        if not isinstance(ref, str) or not ref.startswith("s3://"):
            return ref
        key = ref.rstrip("/")
        if key not in fetched:
            raise ConfigError(
                f"merge_config: {where} names {ref}, which is not among the pipeline's source_uris/base_uri"
            )
        used.add(key)
        return fetched[key]

    for i, m in enumerate(cfg.get("models") or []):
        if isinstance(m, dict) and "model" in m:
            m["model"] = local(m["model"], f"models[{i}].model")
    for key in ("base_model", "tokenizer_source"):
        if key in cfg:
            cfg[key] = local(cfg[key], key)
    unused = sorted(set(fetched) - used)
    if unused:
        raise ConfigError(f"merge_config does not use the fetched checkpoint(s) {', '.join(unused)}")
    return cfg


#: Where the run's PersistentVolumeClaim is mounted in ``--pvc`` mode (pipelines/merge.py).
VOLUME_MOUNT = "/mnt/seme"


def model_path(artifact: object) -> str:
    """Where a checkpoint artifact's files are: on the run's volume (``--pvc`` mode: the artifact
    only records ``metadata.volume_path``) or in the artifact itself (KFP's artifact store)."""
    return (artifact.metadata or {}).get("volume_path") or artifact.path  # type: ignore[attr-defined]


def volume_target(volume_dir: str, *parts: str) -> str | None:
    """A directory on the run's volume for a step's output, or None without a volume."""
    return os.path.join(volume_dir, *parts) if volume_dir else None


def fetched_paths(*artifacts: object) -> dict[str, str]:
    """``{uri: local path}`` of fetch_checkpoint outputs (Model artifacts; empty URIs skipped)."""
    out: dict[str, str] = {}
    for a in artifacts:
        uri = (a.metadata or {}).get("uri", "")  # type: ignore[attr-defined]
        if uri:
            out[uri.rstrip("/")] = model_path(a)
    return out


def parent_names(uris: list[str]) -> list[str]:
    """Readable, unique names for source checkpoints: the URI's last segment (``-2``, ``-3`` on clashes)."""
    names: list[str] = []
    for i, uri in enumerate(uris):
        stem = uri.rstrip("/").rsplit("/", 1)[-1] or f"source-{i}"
        name, k = stem, 2
        while name in names or name in ("merged", "base"):
            name, k = f"{stem}-{k}", k + 1
        names.append(name)
    return names


def record_pipeline_status(
    pipeline_run: str, state: str, error: str, registered_model_name: str, tracking_uri: str | None
) -> list[str]:
    """The exit handler's job: tag the run's MLflow records with its final state (see seme.registry)."""
    from seme import registry

    return registry.record_pipeline_status(pipeline_run, state, error, registered_model_name, tracking_uri)


def gate_step(report_dir: str, policy: str, out_dir: str, model_dir: str, weights: bool) -> bool:
    """The gate steps' body: ``seme.gates.run_gate`` on ``report_dir/bundle.json`` with the policy text
    (empty: default), bound to ``model_dir`` (the merged checkpoint, or a directory holding just its
    ``seme_manifest.json`` when ``weights`` is False: same identity, no weights to read)."""
    import json
    import os
    import tempfile

    from seme.errors import ConfigError
    from seme.gates import load_policy, run_gate, weight_expectations

    policy_path = None
    if policy.strip():
        fd, policy_path = tempfile.mkstemp(suffix=".yaml")
        with os.fdopen(fd, "w") as f:
            f.write(policy)
    if not weights and weight_expectations(load_policy(policy_path)):
        raise ConfigError(
            "gate_policy asks for weight checks, but this pipeline's gate does not read the weights: "
            "compile it with `seme pipeline compile --gate-weight-check`"
        )
    with open(os.path.join(report_dir, "bundle.json")) as f:
        bundle = json.load(f)
    bundle.pop("model_dir", None)  # the evaluate pod's path means nothing here
    return bool(run_gate(bundle, policy_path, out_dir, model_dir=model_dir).passed)
