"""Registered versions as MLflow models: one copy of the weights, guarded by the seme manifest.

A registered version is an MLflow 3 ``LoggedModel`` (lineage as params, metrics, tags and a
``lineage.json`` artifact) whose model version points at the checkpoint's location. The location
holds the checkpoint as ``seme merge`` wrote it plus a small MLflow "wrapper" next to it:

    MLmodel                   transformers flavor (model_binary ".": the checkpoint itself) + pyfunc,
                              a signature, and the lineage as ``metadata.seme``
    components/tokenizer/     the tokenizer, as the transformers flavor expects it
    requirements.txt, python_env.yaml, conda.yaml

so ``mlflow.transformers.load_model("models:/NAME@ALIAS")`` and ``mlflow.pyfunc.load_model(...)``
work as for any MLflow model, and no second copy of the weights is made:

- a published ``s3://`` prefix (the pipeline's case) is the model's location; the wrapper is
  uploaded into it, and the version's source is the prefix;
- a local directory is logged once, with the wrapper, as the LoggedModel's artifacts
  (source ``models:/<model_id>``).

The wrapper's sha256s and the manifest's own sha256 are recorded as version tags (they live in the
MLflow server, out of reach of whoever can write the bucket), so :func:`verify` (``seme verify``)
catches a changed weight file, a rewritten manifest or a changed wrapper, and :func:`load_verified`
verifies before it loads. Runs are named ``<method>-<registered name>-<config digest[:8]>``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seme import registry
from seme.errors import RegistryError, StorageError
from seme.fsutil import sha256_file

log = logging.getLogger(__name__)

TASK = "text-generation"
WRAPPER_DIR = "components"
TAG_LOCATION, TAG_MODEL_ID = "seme.location", "seme.model_id"
TAG_MANIFEST_SHA, TAG_WRAPPER = "seme.manifest_sha256", "seme.mlflow_files"
TAG_MLFLOW_MODEL = "seme.mlflow_model"
#: generation defaults the pyfunc flavor passes to the pipeline (overridable per call via params)
PYFUNC_CONFIG = {"max_new_tokens": 32, "do_sample": False}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt")
_MLFLOW_FILES = ("MLmodel", "requirements.txt", "python_env.yaml", "conda.yaml", "lineage.json")


@dataclass(frozen=True)
class RegisteredVersion:
    name: str
    version: str
    run_id: str
    model_id: str
    location: str
    gate: str

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def run_name(method: str, name: str, config_sha256: str) -> str:
    """``<method>-<registered name>-<short config digest>``: what a person scanning runs needs."""
    digest = (config_sha256 or "").strip()[:8] or "noconfig"
    return f"{method or 'merge'}-{name}-{digest}"


def is_wrapper_file(rel: str) -> bool:
    """True for the files the MLflow wrapper adds next to a checkpoint."""
    return rel in _MLFLOW_FILES or rel.startswith(f"{WRAPPER_DIR}/")


# ------------------------------------------------------------------------------------------------
# Lineage and the MLmodel wrapper
# ------------------------------------------------------------------------------------------------


def lineage(
    manifest: dict[str, Any],
    metrics: dict[str, Any] | None,
    gate: dict[str, Any] | None,
    alignment_dir: str | os.PathLike | None,
    location: str,
) -> dict[str, Any]:
    """What the version was made from and how it scored: sources, config, alignment, metrics, gate."""
    align: dict[str, Any] | None = None
    if alignment_dir is not None and (Path(alignment_dir) / "alignment.json").is_file():
        doc = json.loads((Path(alignment_dir) / "alignment.json").read_text())
        align = {k: v for k, v in doc.items() if isinstance(v, str | int | float | bool) or v is None}
        align["sha256"] = sha256_file(Path(alignment_dir) / "alignment.json")
    return {
        "method": manifest.get("method"),
        "config_sha256": manifest.get("config_sha256"),
        "config": manifest.get("config"),
        "parameters": manifest.get("parameters"),
        "sources": registry.sources_of(manifest),
        "seme_version": manifest.get("seme_version"),
        "dtype": manifest.get("out_dtype") or manifest.get("dtype"),
        "alignment": align,
        "metrics": registry.metrics_of(metrics) if metrics else {},
        "gate": None
        if gate is None
        else {
            "passed": gate.get("passed") is True,
            **{k: gate[k] for k in ("verdict", "policy", "failures") if k in gate},
        },
        "location": location,
    }


def _torch_dtype(config: dict[str, Any]) -> str | None:
    d = config.get("dtype") or config.get("torch_dtype")
    return f"torch.{d}" if isinstance(d, str) and d in ("float32", "bfloat16", "float16") else None


def describe(checkpoint: Path) -> tuple[dict[str, Any], list[str], Any]:
    """``(config, architectures, tokenizer)`` of a checkpoint, or a RegistryError saying why it cannot
    be served as a text-generation model (reads config and tokenizer only)."""
    from transformers import AutoTokenizer

    cfg_path = checkpoint / "config.json"
    if not cfg_path.is_file():
        raise RegistryError(f"{checkpoint}: no config.json; cannot describe it as an MLflow model")
    config = json.loads(cfg_path.read_text())
    archs = config.get("architectures") or []
    if not archs:
        raise RegistryError(f"{cfg_path}: no 'architectures' entry; cannot name the model class")
    try:
        tok = AutoTokenizer.from_pretrained(str(checkpoint))
    except Exception as e:  # noqa: BLE001 - any tokenizer failure is the same user problem
        raise RegistryError(
            f"{checkpoint}: no usable tokenizer ({str(e).splitlines()[0][:200]}); "
            "a served text-generation model needs one (set tokenizer_source in the merge config)"
        ) from None
    return config, archs, tok


def write_wrapper(
    checkpoint: Path, out: Path, meta: dict[str, Any], model_id: str | None = None
) -> dict[str, str]:
    """Write the MLflow wrapper for ``checkpoint`` (config + tokenizer read; weights never loaded) into
    ``out``; returns ``{relative path: sha256}`` of what was written."""
    import transformers
    from mlflow.models import Model
    from mlflow.models.signature import ModelSignature
    from mlflow.pyfunc import add_to_model
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema
    from mlflow.utils.environment import _mlflow_conda_env, _PythonEnv

    config, archs, tok = describe(checkpoint)
    out.mkdir(parents=True, exist_ok=True)
    tok.save_pretrained(str(out / WRAPPER_DIR / "tokenizer"))

    flavor = {
        "task": TASK,
        "instance_type": "TextGenerationPipeline",
        "pipeline_model_type": archs[0],
        "source_model_name": meta.get("location", str(checkpoint)),
        "model_binary": ".",  # the checkpoint files sit next to MLmodel: no copy under model/
        "components": ["tokenizer"],
        "tokenizer_type": type(tok).__name__,
    }
    if dt := _torch_dtype(config):
        flavor["torch_dtype"] = dt
    signature = ModelSignature(
        inputs=Schema([ColSpec("string")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema(
            [
                ParamSpec("max_new_tokens", "long", PYFUNC_CONFIG["max_new_tokens"]),
                ParamSpec("do_sample", "boolean", PYFUNC_CONFIG["do_sample"]),
            ]
        ),
    )
    model = Model(signature=signature, metadata={"seme": meta}, model_id=model_id)
    model.add_flavor("transformers", transformers_version=transformers.__version__, code=None, **flavor)
    add_to_model(
        model,
        loader_module="mlflow.transformers",
        conda_env="conda.yaml",
        python_env="python_env.yaml",
        model_config=dict(PYFUNC_CONFIG),
    )
    model.model_size_bytes = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    model.save(str(out / "MLmodel"))
    reqs = _requirements()
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    import yaml

    (out / "conda.yaml").write_text(yaml.safe_dump(_mlflow_conda_env(additional_pip_deps=reqs)))
    _PythonEnv.current().to_yaml(str(out / "python_env.yaml"))
    (out / "lineage.json").write_text(json.dumps(meta, indent=2, default=str))
    return {p.relative_to(out).as_posix(): sha256_file(p) for p in sorted(out.rglob("*")) if p.is_file()}


def _requirements() -> list[str]:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for pkg in ("mlflow", "transformers", "torch", "tokenizers", "safetensors", "accelerate"):
        try:
            out.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            continue
    return out


# ------------------------------------------------------------------------------------------------
# S3 helpers (the checkpoint's small files; the wrapper upload)
# ------------------------------------------------------------------------------------------------


def _s3(endpoint_url: str | None) -> Any:
    from seme.storage import _client

    return _client(endpoint_url, pool=4)


def _side_files(uri: str, manifest: dict[str, Any], dest: Path, endpoint_url: str | None) -> Path:
    """Download the checkpoint's manifest and small files (config, tokenizer: not the weights), verified."""
    from seme.storage import MANIFEST, manifest_files, parse_uri, safe_relpath

    bucket, prefix = parse_uri(uri)
    s3 = _s3(endpoint_url)
    wanted = {MANIFEST: None}
    for rel, (sha, _size) in manifest_files(manifest, f"{uri}/{MANIFEST}").items():
        if not rel.endswith(_WEIGHT_SUFFIXES):
            wanted[safe_relpath(rel, uri)] = sha
    for rel, sha in sorted(wanted.items()):
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        key = f"{prefix}/{rel}" if prefix else rel
        try:
            s3.download_file(bucket, key, str(target))
        except Exception as e:  # noqa: BLE001 - boto/botocore raise many kinds
            raise StorageError(
                f"s3://{bucket}/{key}: cannot download ({str(e).splitlines()[0][:200]})"
            ) from None
        if sha is not None and sha256_file(target) != sha:
            raise StorageError(f"s3://{bucket}/{key}: sha256 does not match {MANIFEST}")
    return dest


def _upload(src: Path, files: list[str], uri: str, endpoint_url: str | None) -> None:
    from seme.storage import parse_uri

    bucket, prefix = parse_uri(uri)
    s3 = _s3(endpoint_url)
    for rel in files:
        key = f"{prefix}/{rel}" if prefix else rel
        try:
            s3.upload_file(str(src / rel), bucket, key)
        except Exception as e:  # noqa: BLE001
            raise StorageError(
                f"uploading {rel} to s3://{bucket}/{key} failed ({str(e).splitlines()[0][:200]})"
            ) from None


# ------------------------------------------------------------------------------------------------
# Register
# ------------------------------------------------------------------------------------------------


def _read_json(doc: dict | str | os.PathLike | None, what: str) -> dict[str, Any] | None:
    if doc is None or isinstance(doc, dict):
        return doc
    try:
        return json.loads(Path(doc).read_text())
    except (OSError, ValueError) as e:
        raise RegistryError(f"cannot read {what} {doc}: {e}") from None


def _flat_params(meta: dict[str, Any]) -> dict[str, str]:
    out: dict[str, str] = {}
    for k in ("method", "config_sha256", "seme_version", "dtype", "location"):
        if meta.get(k) is not None:
            out[k] = str(meta[k])
    out["sources"] = json.dumps(meta["sources"])[:6000]
    for k, v in (
        (meta.get("parameters") or {}).get("global", {}).items()
        if isinstance((meta.get("parameters") or {}).get("global"), dict)
        else []
    ):
        out[f"params.global.{k}"] = json.dumps(v)[:6000]
    if meta.get("alignment"):
        out["alignment.sha256"] = str(meta["alignment"].get("sha256"))
    return {re.sub(r"[^\w\-. /:]", "_", k)[:250]: v for k, v in out.items()}


def register_version(
    model_dir: str | os.PathLike,
    name: str = registry.DEFAULT_NAME,
    *,
    metrics: dict | str | os.PathLike | None = None,
    gate: Any = None,
    alignment_dir: str | os.PathLike | None = None,
    source_uri: str | None = None,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    pipeline_run: str | None = None,
    tracking_uri: str | None = None,
    endpoint_url: str | None = None,
    strict: bool = False,
) -> RegisteredVersion:
    """Log the merge run, create its LoggedModel, write the MLflow wrapper next to the weights and
    register a version of ``name`` pointing there (``pilot`` only when the gate passed).

    ``model_dir``: the merged checkpoint (local directory or published ``s3://`` prefix);
    ``source_uri``: where the local ``model_dir`` was published (the pipeline's case). ``gate``: a
    gate result bound to ``model_dir`` (``seme gate --model-dir``), else RegistryError. A checkpoint
    that cannot be served (no tokenizer or model class) is registered as plain files with a warning
    and the version tag ``seme.mlflow_model = "no: <why>"``; ``strict`` makes that an error.
    """
    from mlflow.entities import LoggedModelStatus, Metric

    uri = registry.resolve_tracking_uri(tracking_uri)
    c = registry.client(uri)
    is_s3 = str(model_dir).startswith("s3://")
    if not is_s3 and not Path(model_dir).is_dir():
        raise RegistryError(f"{model_dir}: no such model directory")
    location = str(model_dir) if is_s3 else (source_uri or "")
    if location and not location.startswith("s3://"):
        raise RegistryError(f"{location}: a model location must be an s3:// prefix")
    manifest = registry.read_manifest(model_dir)
    if location and not is_s3 and manifest:  # the published prefix must hold this very checkpoint
        from seme.storage import get_manifest

        if get_manifest(location, endpoint_url) != manifest:
            raise RegistryError(
                f"{location} does not hold the checkpoint {model_dir} (its seme_manifest.json differs "
                "or is missing): publish it there first (seme publish)"
            )
    if gate is not None:  # the verdict must be about this very checkpoint: checked before anything is logged
        from seme.gates import verify_gate_binding

        verify_gate_binding(gate if isinstance(gate, str | os.PathLike | dict) else gate.to_dict(), model_dir)
    metrics_doc = _read_json(metrics, "metrics")
    gate_doc, _ = registry._gate_doc(gate)
    gate_ok = bool(gate_doc and gate_doc.get("passed") is True)

    with tempfile.TemporaryDirectory(prefix="seme-register-") as td:
        tmp = Path(td)
        if run_id is None:
            run_id = registry.log_merge_run(
                # a metrics *path* lets the run also log the report's task file and comparison beside it
                model_dir, metrics=metrics if isinstance(metrics, str | os.PathLike) else metrics_doc,
                gate=gate, alignment_dir=alignment_dir, params=params,
                run_name=run_name(str(manifest.get("method", "")), name, str(manifest.get("config_sha256", ""))),
                pipeline_run=pipeline_run, tracking_uri=uri,
            )  # fmt: skip
        try:
            if not manifest.get("files"):
                raise RegistryError(f"{model_dir}: no seme_manifest.json listing its files")
            local = (
                Path(model_dir)
                if not is_s3
                else _side_files(str(model_dir), manifest, tmp / "side", endpoint_url)
            )
            describe(local)
        except RegistryError as e:
            if strict:
                raise
            # Not servable or not guarded: registered as files, said loudly and tagged.
            log.warning("%s; registering %s as plain files, not as an MLflow model", e, name)
            vtags = {**(tags or {}), TAG_MLFLOW_MODEL: f"no: {e}"[:4000]}
            version = registry.register_model(
                str(model_dir), name, run_id, vtags, gate_ok, pipeline_run=pipeline_run, tracking_uri=uri,
                source_uri=source_uri,
            )  # fmt: skip
            mv = registry.client(uri).get_model_version(name, version)
            return RegisteredVersion(
                name, str(version), run_id, "", mv.source, "passed" if gate_ok else "failed"
            )
        manifest_sha = sha256_file(local / "seme_manifest.json")
        meta = lineage(manifest, metrics_doc, gate_doc, alignment_dir, location or "mlflow-artifacts")
        lm_tags = {registry.TAG_GATE: "passed" if gate_ok else "failed", TAG_MANIFEST_SHA: manifest_sha}
        if pipeline_run:
            lm_tags[registry.TAG_PIPELINE] = pipeline_run
        lm = registry._call(
            "create logged model", uri, c.create_logged_model, registry._experiment_id(c, uri), name=name,
            source_run_id=run_id, tags=lm_tags, params=_flat_params(meta), model_type="transformers",
        )  # fmt: skip
        model_id = lm.model_id
        try:
            wrap = tmp / "wrapper"
            wrapper = write_wrapper(local, wrap, meta, model_id=model_id)
            if location:  # the published prefix is the model: the wrapper goes next to the weights
                _upload(wrap, sorted(wrapper), location, endpoint_url)
                side = tmp / "lineage"
                side.mkdir()
                shutil.copyfile(wrap / "lineage.json", side / "lineage.json")
                shutil.copyfile(local / "seme_manifest.json", side / "seme_manifest.json")
                registry._call("log lineage", uri, c.log_model_artifacts, model_id, str(side))
                source = location
            else:  # one copy: the checkpoint and its wrapper become the LoggedModel's artifacts
                registry._call(f"upload {local}", uri, c.log_model_artifacts, model_id, str(local))
                registry._call("upload the MLflow wrapper", uri, c.log_model_artifacts, model_id, str(wrap))
                source = f"models:/{model_id}"
            now = int(time.time() * 1000)
            mets = [Metric(k, v, now, 0, model_id=model_id) for k, v in sorted(meta["metrics"].items())]
            for i in range(0, len(mets), 100):
                registry._call("log model metrics", uri, c.log_batch, run_id, metrics=mets[i : i + 100])
            wrapper_tag = json.dumps(wrapper, sort_keys=True)
            registry._call(
                "tag logged model", uri, c.set_logged_model_tags, model_id,
                {TAG_WRAPPER: wrapper_tag, TAG_LOCATION: source},
            )  # fmt: skip
            vtags = {**(tags or {}), TAG_MLFLOW_MODEL: "yes", TAG_LOCATION: source, TAG_MODEL_ID: model_id,
                     TAG_MANIFEST_SHA: manifest_sha, TAG_WRAPPER: wrapper_tag}  # fmt: skip
            version = registry.register_model(
                str(model_dir), name, run_id, vtags, gate_ok, pipeline_run=pipeline_run, tracking_uri=uri,
                source_uri=source, model_id=None if location else model_id,
            )  # fmt: skip
            # the LoggedModel -> version link MLflow's own register_model records (an s3:// source
            # carries no model id, so the version side of the link is the seme.model_id tag)
            linked = json.loads(c.get_logged_model(model_id).tags.get("mlflow.modelVersions") or "[]")
            registry._call(
                "link logged model", uri, c.set_logged_model_tags, model_id,
                {"mlflow.modelVersions": json.dumps([*linked, {"name": name, "version": str(version)}])},
            )  # fmt: skip
        except BaseException:
            try:
                c.finalize_logged_model(model_id, LoggedModelStatus.FAILED)
            except Exception:  # noqa: BLE001 - the original error is the one to report
                log.warning("could not mark logged model %s as FAILED", model_id)
            raise
        registry._call(
            "finalize logged model", uri, c.finalize_logged_model, model_id, LoggedModelStatus.READY
        )
    log.info("registered %s version %s as logged model %s at %s", name, version, model_id, source)
    return RegisteredVersion(name, str(version), run_id, model_id, source, "passed" if gate_ok else "failed")


# ------------------------------------------------------------------------------------------------
# Verify and load
# ------------------------------------------------------------------------------------------------


def resolve(
    ref: str, *, alias: str | None = None, version: str | None = None, tracking_uri: str | None = None
) -> Any:
    """The ModelVersion for ``NAME`` (+ ``alias``/``version``), ``NAME@ALIAS`` or ``models:/NAME@ALIAS``."""
    uri = registry.resolve_tracking_uri(tracking_uri)
    c = registry.client(uri)
    ref = ref.removeprefix("models:/")
    if "@" in ref:
        ref, alias = ref.split("@", 1)
    elif "/" in ref:
        ref, version = ref.split("/", 1)
    if alias:
        return registry._call(f"read {ref}@{alias}", uri, c.get_model_version_by_alias, ref, alias)
    if version:
        return registry._call(f"read {ref} version {version}", uri, c.get_model_version, ref, version)
    raise RegistryError(f"{ref}: name an alias or a version (NAME@ALIAS, --alias or --version)")


def verify(
    ref: str,
    *,
    alias: str | None = None,
    version: str | None = None,
    dest: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
    endpoint_url: str | None = None,
) -> dict[str, Any]:
    """Download the version's files and check every one: the weights and side files against
    ``seme_manifest.json``, the manifest against the sha256 recorded at registration, the MLflow
    wrapper against its recorded sha256s. Raises StorageError/RegistryError naming the first file
    that does not match; returns ``{name, version, location, path, files}`` (path: the verified
    directory, under ``dest`` when given, else removed)."""
    from seme.storage import MANIFEST, RECORD, fetch, manifest_files

    mv = resolve(ref, alias=alias, version=version, tracking_uri=tracking_uri)
    tags = mv.tags or {}
    where = f"{mv.name} version {mv.version}"
    if TAG_MANIFEST_SHA not in tags or TAG_WRAPPER not in tags:
        raise RegistryError(
            f"{where} was not registered as an MLflow model by seme (no {TAG_MANIFEST_SHA} tag)"
        )
    location = tags.get(TAG_LOCATION) or mv.source
    keep = dest is not None
    root = Path(dest) if keep else Path(tempfile.mkdtemp(prefix="seme-verify-"))
    try:
        if location.startswith("s3://"):
            # fetch verifies the manifest's files; the MLflow files are checked below, against the registry
            wrapper_files = frozenset(json.loads(tags[TAG_WRAPPER]))
            got = fetch(location, dest=root / "model", endpoint_url=endpoint_url, also_fetch=wrapper_files)
            computed = {r: f["sha256"] for r, f in json.loads((got / RECORD).read_text())["files"].items()}
        else:
            import mlflow

            got = Path(
                mlflow.artifacts.download_artifacts(
                    location,
                    dst_path=str(root / "dl"),
                    tracking_uri=registry.resolve_tracking_uri(tracking_uri),
                )
            )
            computed = {p.relative_to(got).as_posix(): sha256_file(p) for p in got.rglob("*") if p.is_file()}
            expected = manifest_files(json.loads((got / MANIFEST).read_text()), f"{location}/{MANIFEST}")
            for rel, (sha, _size) in sorted(expected.items()):
                if computed.get(rel) != sha:
                    raise StorageError(
                        f"{location}/{rel}: sha256 does not match {MANIFEST} (changed or missing)"
                    )
        if sha256_file(got / MANIFEST) != tags[TAG_MANIFEST_SHA]:
            raise StorageError(f"{location}/{MANIFEST}: changed since {where} was registered")
        for rel, sha in sorted(json.loads(tags[TAG_WRAPPER]).items()):
            if computed.get(rel) != sha:
                raise StorageError(
                    f"{location}/{rel}: MLflow wrapper file changed or missing since {where} was registered"
                )
    except BaseException:
        if not keep:
            shutil.rmtree(root, ignore_errors=True)
        raise
    if not keep:
        shutil.rmtree(root, ignore_errors=True)
    return {"name": mv.name, "version": str(mv.version), "location": location,
            "path": str(got) if keep else None, "files": len(computed)}  # fmt: skip


def load_verified(
    ref: str,
    flavor: str = "transformers",
    *,
    dest: str | os.PathLike,
    tracking_uri: str | None = None,
    endpoint_url: str | None = None,
    **kwargs: Any,
) -> Any:
    """Verify the version (see :func:`verify`) into ``dest``, then load that verified copy with
    ``mlflow.transformers.load_model`` (``flavor="transformers"``) or ``mlflow.pyfunc.load_model``."""
    res = verify(ref, dest=dest, tracking_uri=tracking_uri, endpoint_url=endpoint_url)
    if flavor == "transformers":
        import mlflow.transformers

        return mlflow.transformers.load_model(res["path"], **kwargs)
    if flavor == "pyfunc":
        import mlflow.pyfunc

        return mlflow.pyfunc.load_model(res["path"], **kwargs)
    raise RegistryError(f"unknown flavor {flavor!r}: transformers or pyfunc")
