"""MLflow tracking and model registry: merge runs, model versions, staged rollout by aliases.

- Tracking URI from ``MLFLOW_TRACKING_URI`` (default ``sqlite:///./mlruns.db``), experiment ``seme``.
- ``log_merge_run`` logs params (method, resolved parameters, sources), every metric of the merged
  model and its parents per task, and artifacts (manifest, model card, alignment + plots, metrics,
  gate result).
- ``register_model`` logs the checkpoint directory as run artifacts (files only: the model is never
  loaded) and creates a model version whose source points at them, tagged ``seme.method``,
  ``seme.sources``, ``seme.config_sha256``, ``seme.gate``, ``seme.pipeline_run``.
- Aliases: ``pilot`` only for a version whose gate passed; ``production`` only by ``promote``, from
  the ``pilot`` version (or a named version tagged ``seme.gate=passed``), keeping the former one as
  ``previous-production``; ``rollback`` swaps the two. A refused move raises RegistryError saying why.

Every server call is retried with exponential backoff (``SEME_REGISTRY_RETRIES``, default 4;
``SEME_REGISTRY_BACKOFF`` seconds, default 1) and then fails with a RegistryError naming the server.
MLflow's own HTTP retries are lowered (``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` 1, timeout 30 s) unless
set, so "server down" surfaces in seconds rather than minutes, as one error line (retries are logged
at INFO, urllib3's retry warnings are silenced unless ``--debug``). An alias move that fails half-way
is undone before the error is raised, the undo retried twice as long (the registry is left as it was
unless the server stays down throughout; the error then names each alias left moved); a version creation retried after a lost reply is found again by
its ``seme.registration_id`` tag instead of being created twice.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import re
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from seme.errors import RegistryError

log = logging.getLogger(__name__)

EXPERIMENT = "seme"
DEFAULT_NAME = "seme-merged"
DEFAULT_TRACKING_URI = "sqlite:///./mlruns.db"
PILOT, PRODUCTION, PREVIOUS = "pilot", "production", "previous-production"
TAG_METHOD, TAG_SOURCES, TAG_CONFIG = "seme.method", "seme.sources", "seme.config_sha256"
TAG_GATE, TAG_PIPELINE, TAG_REG_ID = "seme.gate", "seme.pipeline_run", "seme.registration_id"
MODEL_ARTIFACT_PATH = "model"
_PARAM_MAX, _TAG_MAX = 6000, 5000
_TRANSIENT_CODES = {
    "INTERNAL_ERROR",
    "TEMPORARILY_UNAVAILABLE",
    "REQUEST_LIMIT_EXCEEDED",
    "DEADLINE_EXCEEDED",
}

T = TypeVar("T")


# ------------------------------------------------------------------------------------------------
# Client, retries, errors
# ------------------------------------------------------------------------------------------------


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else a local SQLite store ``./mlruns.db``."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _redact(uri: str) -> str:
    """The URI without any ``user:password@`` part (never print credentials)."""
    return re.sub(r"//[^/@]*@", "//***@", uri)


def client(uri: str | None = None) -> Any:
    """An ``MlflowClient`` for ``uri`` (tracking and registry on the same store)."""
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # stdout carries our results
    if not log.isEnabledFor(logging.DEBUG):  # "Retrying (Retry(total=0...))" per attempt: one error line is enough
        logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)
    from mlflow import MlflowClient

    u = resolve_tracking_uri(uri)
    return MlflowClient(tracking_uri=u, registry_uri=u)


def _transient(e: BaseException) -> bool:
    """Server down, connection dropped, 5xx, throttled: worth another try."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.error_code in _TRANSIENT_CODES
    try:
        import requests

        if isinstance(e, requests.exceptions.RequestException):
            return True
    except ImportError:  # pragma: no cover - requests ships with mlflow
        pass
    return isinstance(e, ConnectionError | TimeoutError)


def _short(e: BaseException) -> str:
    msg = getattr(e, "message", None) or str(e)
    m = re.search(r"\[Errno \d+\] [^\"')]+", msg) or re.search(
        r"Connection refused|Connection aborted|Max retries exceeded|timed out", msg
    )
    text = m.group(0) if m else " ".join(msg.split())[:300]
    return _redact(text)


def _call(
    what: str, uri: str, fn: Callable[..., T], *args: Any, _patient: bool = False, **kwargs: Any
) -> T:
    """Run one MLflow call with retries on transient failures; raise RegistryError otherwise.

    ``_patient``: twice the retries (at least 4), each wait capped at 10 backoffs — for undoing a
    half-made alias move, where waiting for the server beats leaving the registry changed.
    """
    from mlflow.exceptions import MlflowException

    retries = int(os.environ.get("SEME_REGISTRY_RETRIES", "4"))
    backoff = float(os.environ.get("SEME_REGISTRY_BACKOFF", "1.0"))
    if _patient:
        retries = max(2 * retries, 4)
    for attempt in range(retries + 1):
        try:
            return fn(*args, **kwargs)
        except RegistryError:
            raise
        except Exception as e:  # classified: transient -> retry, else a one-line error
            if not _transient(e):
                if isinstance(e, MlflowException):
                    raise RegistryError(f"{what}: {_redact(' '.join(e.message.split()))[:500]}") from None
                raise
            if attempt == retries:
                raise RegistryError(
                    f"{what}: MLflow tracking server {_redact(uri)} unreachable or failing after "
                    f"{retries + 1} attempts ({_short(e)})"
                ) from None
            wait = min(backoff * 2**attempt, 10 * backoff) if _patient else backoff * 2**attempt
            # INFO: shown with --debug; without it, a down server is one error line at the end
            log.info("%s: %s; retry %d/%d in %.1f s", what, _short(e), attempt + 1, retries, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover


def _not_found(e: BaseException) -> bool:
    return getattr(e, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------


def _experiment_id(c: Any, uri: str) -> str:
    from mlflow.exceptions import MlflowException

    exp = _call("get experiment 'seme'", uri, c.get_experiment_by_name, EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    try:
        return _call("create experiment 'seme'", uri, c.create_experiment, EXPERIMENT)
    except (RegistryError, MlflowException):  # created concurrently by another process
        exp = _call("get experiment 'seme'", uri, c.get_experiment_by_name, EXPERIMENT)
        if exp is None:
            raise
        return exp.experiment_id


def read_manifest(model_dir: str | os.PathLike) -> dict[str, Any]:
    """The merged checkpoint's ``seme_manifest.json`` ({} when absent or the dir is remote)."""
    if str(model_dir).startswith("s3://"):
        from seme.errors import StorageError
        from seme.storage import get_manifest

        try:
            return get_manifest(str(model_dir)) or {}
        except StorageError as e:
            raise RegistryError(f"cannot read the manifest of {model_dir}: {e}") from None
    p = Path(model_dir) / "seme_manifest.json"
    if not p.is_file():
        return {}
    try:
        return json.loads(p.read_text())
    except ValueError:
        raise RegistryError(f"{p}: not valid JSON") from None


def sources_of(manifest: dict[str, Any]) -> list[dict[str, str]]:
    """``[{uri, sha256}]`` per input; sha256 is that of the input's SHA256SUMS (sorted file hashes)."""
    out = []
    for inp in manifest.get("inputs") or []:
        files = sorted((f.get("path", ""), f.get("sha256", "")) for f in inp.get("files") or [])
        sums = "".join(f"{sha}  {path}\n" for path, sha in files)
        out.append(
            {
                "uri": str(inp.get("uri", inp.get("local_path", ""))),
                "sha256": hashlib.sha256(sums.encode()).hexdigest(),
            }
        )
    return out


def _flatten(prefix: str, obj: Any, out: dict[str, str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    elif isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        for i, v in enumerate(obj):
            _flatten(f"{prefix}.{i}", v, out)
    else:
        out[prefix] = obj if isinstance(obj, str) else json.dumps(obj)


def _params(manifest: dict[str, Any], extra: dict[str, Any] | None) -> dict[str, str]:
    p: dict[str, str] = {}
    for k in ("method", "seed", "dtype", "out_dtype", "architecture", "config_sha256", "seme_version"):
        if k in manifest:
            p[k] = str(manifest[k])
    _flatten("params", manifest.get("parameters") or {}, p)
    if manifest.get("inputs"):
        p["sources"] = json.dumps(sources_of(manifest))
    _flatten("", extra or {}, p)
    clean = {}
    for k, v in p.items():
        key = re.sub(r"[^\w\-. /:]", "_", k)[:250]
        clean[key] = v if len(v) <= _PARAM_MAX else v[: _PARAM_MAX - 14] + "…(truncated)"
    return clean


def metrics_of(metrics: dict[str, Any]) -> dict[str, float]:
    """Flat MLflow metrics from a metrics JSON or a gate bundle: ``<model>/<task>/<metric>``."""
    if "merged" in metrics and isinstance(metrics["merged"], dict):
        models = {"merged": metrics["merged"], **(metrics.get("parents") or {})}
    else:
        models = {"merged": metrics}
    out: dict[str, float] = {}
    for name, m in models.items():
        for section, prefix in (("tasks", ""), ("general", "general/")):
            for task, e in (m.get(section) or {}).items():
                v = e.get("value") if isinstance(e, dict) else e
                metric = e.get("metric", "value") if isinstance(e, dict) else "value"
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v):
                    key = re.sub(r"[^\w\-. /:]", "_", f"{name}/{prefix}{task}/{metric}")
                    out[key] = float(v)
    return out


def _gate_doc(gate: Any) -> tuple[dict[str, Any] | None, list[Path]]:
    """(gate result dict, files to log) from a GateResult, a dict, or a gate_result.json path."""
    if gate is None:
        return None, []
    if isinstance(gate, dict):
        return gate, []
    if isinstance(gate, str | os.PathLike):
        p = Path(gate)
        files = [p, p.with_name("gate_summary.md")]
        try:
            return json.loads(p.read_text()), [f for f in files if f.is_file()]
        except (OSError, ValueError) as e:
            raise RegistryError(f"cannot read gate result {p}: {e}") from None
    files = [f for f in (getattr(gate, "result_path", None), getattr(gate, "summary_path", None)) if f]
    return gate.to_dict(), [Path(f) for f in files]


def gate_passed(gate: Any) -> bool:
    doc, _ = _gate_doc(gate)
    return bool(doc and doc.get("passed") is True)


def log_merge_run(
    model_dir: str | os.PathLike,
    *,
    metrics: dict[str, Any] | str | os.PathLike | None = None,
    gate: Any = None,
    alignment_dir: str | os.PathLike | None = None,
    params: dict[str, Any] | None = None,
    run_name: str | None = None,
    pipeline_run: str | None = None,
    tracking_uri: str | None = None,
) -> str:
    """Log one merge run (params, metrics of merged + parents, artifacts) and return its run id."""
    from mlflow.entities import Metric, Param, RunTag

    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    manifest = read_manifest(model_dir)
    if isinstance(metrics, str | os.PathLike):
        try:
            metrics_doc: dict[str, Any] | None = json.loads(Path(metrics).read_text())
        except (OSError, ValueError) as e:
            raise RegistryError(f"cannot read metrics {metrics}: {e}") from None
    else:
        metrics_doc = metrics
    gate_doc, gate_files = _gate_doc(gate)

    exp_id = _experiment_id(c, uri)
    tags = {"seme.model_dir": str(model_dir)}
    if pipeline_run:
        tags[TAG_PIPELINE] = pipeline_run
    if gate_doc is not None:
        tags[TAG_GATE] = "passed" if gate_doc.get("passed") is True else "failed"
    run = _call("create run", uri, c.create_run, exp_id, run_name=run_name, tags=tags)
    run_id = run.info.run_id
    try:
        ps = [Param(k, v) for k, v in sorted(_params(manifest, params).items())]
        ms = metrics_of(metrics_doc) if metrics_doc else {}
        if gate_doc is not None:
            ms["gate/passed"] = 1.0 if gate_doc.get("passed") is True else 0.0
        now = int(time.time() * 1000)
        mets = [Metric(k, v, now, 0) for k, v in sorted(ms.items())]
        for i in range(0, max(len(ps), len(mets)), 100):
            _call(
                "log params/metrics",
                uri,
                c.log_batch,
                run_id,
                metrics=mets[i : i + 100],
                params=ps[i : i + 100],
            )
        _call("set tags", uri, c.log_batch, run_id, tags=[RunTag(k, v) for k, v in tags.items()])
        with tempfile.TemporaryDirectory(prefix="seme-run-") as td:
            tmp = Path(td)
            if metrics_doc is not None:
                (tmp / "metrics.json").write_text(json.dumps(metrics_doc, indent=2, default=str))
            if gate_doc is not None and not gate_files:
                (tmp / "gate_result.json").write_text(json.dumps(gate_doc, indent=2, default=str))
            if any(tmp.iterdir()):
                _call("log metrics/gate artifacts", uri, c.log_artifacts, run_id, str(tmp), "eval")
        for f in gate_files:
            _call(f"log {f.name}", uri, c.log_artifact, run_id, str(f), "eval")
        if metrics_doc is not None:
            _log_eval_details(c, uri, run_id, metrics_doc)
        if isinstance(metrics, str | os.PathLike):  # the evaluation report's task file and comparison
            for name, where in (("tasks.yaml", "eval/task_file"), ("comparison.json", "eval")):
                f = Path(metrics).parent / name
                if f.is_file():
                    _call(f"log {name}", uri, c.log_artifact, run_id, str(f), where)
        md = Path(model_dir)
        for name in ("seme_manifest.json", "README.md", "config.json"):
            if (md / name).is_file():
                _call(f"log {name}", uri, c.log_artifact, run_id, str(md / name), "checkpoint")
        if alignment_dir is not None:
            ad = Path(alignment_dir)
            for f in sorted([*ad.glob("*.json"), *ad.glob("*.png")]):
                _call(f"log {f.name}", uri, c.log_artifact, run_id, str(f), "alignment")
    except BaseException:
        try:
            c.set_terminated(run_id, status="FAILED")
        except Exception:  # noqa: BLE001 - the original error is the one to report
            log.warning("could not mark run %s as FAILED", run_id)
        raise
    _call("end run", uri, c.set_terminated, run_id, status="FINISHED")
    log.info("logged merge run %s", run_id)
    return run_id


def _log_eval_details(c: Any, uri: str, run_id: str, metrics_doc: dict[str, Any]) -> None:
    """Per-item table (``mlflow.log_table``), the merged-vs-parents chart, and the task file and its
    data files as the run's dataset inputs (source + sha256 digest)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    from seme.evaluation.report import datasets_of, item_table, models_of, plot_models

    models = models_of(metrics_doc) if isinstance(metrics_doc.get("merged"), dict) else {"merged": metrics_doc}
    table = item_table(models)
    if table["model"]:
        _call("log per-item table", uri, c.log_table, run_id, table, "eval/items.json")
    with tempfile.TemporaryDirectory(prefix="seme-eval-") as td:
        png = plot_models(models, Path(td) / "merged_vs_parents.png")
        if png is not None:
            _call("log eval chart", uri, c.log_artifact, run_id, str(png), "eval")
    inputs = []
    for d in datasets_of(models["merged"]):
        ds = Dataset(name=d["name"][:500], digest=d["sha256"][:36], source_type="seme",
                     source=json.dumps({"uri": d["source"], "sha256": d["sha256"]}))
        inputs.append(DatasetInput(ds, tags=[InputTag("mlflow.data.context", "eval")]))
    if inputs:
        _call("log eval inputs", uri, c.log_inputs, run_id, inputs)


# ------------------------------------------------------------------------------------------------
# Registry
# ------------------------------------------------------------------------------------------------


def _version_tags(
    manifest: dict[str, Any], gate_ok: bool, pipeline_run: str | None, tags: dict | None
) -> dict:
    t: dict[str, str] = {TAG_GATE: "passed" if gate_ok else "failed"}
    if manifest.get("method"):
        t[TAG_METHOD] = str(manifest["method"])
    if manifest.get("inputs"):
        src = json.dumps(sources_of(manifest))
        t[TAG_SOURCES] = src if len(src) <= _TAG_MAX else src[: _TAG_MAX - 14] + "…(truncated)"
    if manifest.get("config_sha256"):
        t[TAG_CONFIG] = str(manifest["config_sha256"])
    if pipeline_run:
        t[TAG_PIPELINE] = pipeline_run
    for k, v in (tags or {}).items():
        t[str(k)] = str(v)
    t[TAG_GATE] = "passed" if gate_ok else "failed"  # the verdict is not a user tag
    return t


def register_model(
    model_dir: str | os.PathLike,
    name: str = DEFAULT_NAME,
    run_id: str | None = None,
    tags: dict[str, str] | None = None,
    gate_passed: bool = False,
    *,
    pipeline_run: str | None = None,
    tracking_uri: str | None = None,
    source_uri: str | None = None,
    model_id: str | None = None,
) -> str:
    """Register the merged checkpoint as a new version of ``name``; set ``pilot`` if the gate passed.

    A local directory is logged as artifacts of ``run_id`` (a new run when None) under ``model/``
    and the version's source points there; an ``s3://`` URI is used as the source as it is. With
    ``source_uri`` (where a local ``model_dir`` was already published), the manifest is read from
    ``model_dir`` and the version points at ``source_uri``: no second copy in MLflow's artifacts.
    The model is never loaded. ``model_id``: the MLflow 3 LoggedModel a ``models:/<model_id>``
    source names (see ``seme.registry_model``). Returns the version number (a string).
    """
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    manifest = read_manifest(model_dir)
    if source_uri:
        if not str(model_dir).startswith("s3://") and not Path(model_dir).is_dir():
            raise RegistryError(f"{model_dir}: no such model directory")
        source = source_uri
    elif str(model_dir).startswith("s3://"):
        source = str(model_dir)
    else:
        md = Path(model_dir)
        if not md.is_dir():
            raise RegistryError(f"{md}: no such model directory")
        if run_id is None:
            run_id = _call(
                "create run", uri, c.create_run, _experiment_id(c, uri), tags={"seme.model_dir": str(md)}
            ).info.run_id
            _call("end run", uri, c.set_terminated, run_id, status="FINISHED")
        _call(f"upload {md}", uri, c.log_artifacts, run_id, str(md), MODEL_ARTIFACT_PATH)
        source = f"runs:/{run_id}/{MODEL_ARTIFACT_PATH}"
    vtags = _version_tags(manifest, gate_passed, pipeline_run, tags)
    reg_id = uuid.uuid4().hex
    vtags[TAG_REG_ID] = reg_id

    def ensure_model() -> None:
        from mlflow.exceptions import MlflowException

        try:
            c.get_registered_model(name)
        except MlflowException as e:
            if not _not_found(e):
                raise
            try:
                c.create_registered_model(name, description="Merged models produced by seme")
            except MlflowException as e2:  # registered concurrently: fine
                if e2.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise

    _call(f"create registered model {name}", uri, ensure_model)

    def create() -> str:
        # A retry after a lost reply must not create a second version: look for ours first.
        found = c.search_model_versions(f"name = '{name}' and tags.`{TAG_REG_ID}` = '{reg_id}'")
        if found:
            return str(found[0].version)
        mv = c.create_model_version(
            name, source, run_id=run_id, tags=vtags, await_creation_for=60, model_id=model_id
        )
        return str(mv.version)

    version = _call(f"create a version of {name}", uri, create)
    log.info("registered %s version %s (gate %s)", name, version, vtags[TAG_GATE])
    if gate_passed:
        set_alias(name, PILOT, version, tracking_uri=uri)
    return version


def aliases(name: str, *, tracking_uri: str | None = None) -> dict[str, str]:
    """``{alias: version}`` of the registered model ``name``."""
    uri = resolve_tracking_uri(tracking_uri)
    rm = _call(f"read registered model {name}", uri, client(uri).get_registered_model, name)
    return {str(k): str(v) for k, v in (rm.aliases or {}).items()}


def _version(c: Any, uri: str, name: str, version: str) -> Any:
    return _call(f"read {name} version {version}", uri, c.get_model_version, name, str(version))


def set_alias(name: str, alias: str, version: str, *, tracking_uri: str | None = None) -> None:
    """Point ``alias`` at ``version``. ``pilot`` (and any custom alias) needs ``seme.gate=passed``;
    ``production`` and ``previous-production`` move only through ``promote`` / ``rollback``."""
    if alias in (PRODUCTION, PREVIOUS):
        raise RegistryError(
            f"refusing to set {alias!r} on {name} directly: use `seme promote` / `seme rollback`"
        )
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    mv = _version(c, uri, name, version)
    gate = (mv.tags or {}).get(TAG_GATE, "missing")
    if gate != "passed":
        raise RegistryError(
            f"refusing to set {alias!r} on {name} version {version}: its gate is {gate!r}, not 'passed'"
        )
    _call(
        f"set alias {alias} -> {name} v{version}",
        uri,
        c.set_registered_model_alias,
        name,
        alias,
        str(version),
    )
    log.info("%s: %s -> version %s", name, alias, version)


def _move_aliases(
    c: Any, uri: str, name: str, moves: list[tuple[str, str | None]], before: dict[str, str]
) -> None:
    """Apply alias moves in order; if one fails, undo the ones already made, then raise."""
    done: list[str] = []
    for alias, version in moves:
        try:
            if version is None:
                _call(f"remove alias {alias} of {name}", uri, c.delete_registered_model_alias, name, alias)
            else:
                _call(
                    f"set alias {alias} -> {name} v{version}",
                    uri,
                    c.set_registered_model_alias,
                    name,
                    alias,
                    version,
                )
        except RegistryError as e:
            undone, stuck = [], []
            for a in reversed(done):
                try:
                    if before.get(a) is None:
                        _call(f"undo alias {a}", uri, c.delete_registered_model_alias, name, a, _patient=True)
                    else:
                        _call(
                            f"undo alias {a}", uri, c.set_registered_model_alias, name, a, before[a], _patient=True
                        )
                    undone.append(a)
                except RegistryError:
                    stuck.append(f"{a}={dict(moves)[a]} (was {before.get(a)})")
            state = (
                f"; could not undo {', '.join(stuck)}: check `seme promote`/`rollback` when the server is back"
                if stuck
                else (f"; undid {', '.join(undone)}" if undone else "; no alias was moved")
            )
            raise RegistryError(f"{e}{state}") from None
        done.append(alias)


def promote(
    name: str, to: str = PRODUCTION, version: str | None = None, *, tracking_uri: str | None = None
) -> dict[str, str | None]:
    """Move ``to`` (default ``production``) to ``version`` (default: the version holding ``pilot``).

    ``production`` accepts only the ``pilot`` version or a named version tagged ``seme.gate=passed``;
    the former production version becomes ``previous-production``. Returns the moves made.
    """
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    if to == PREVIOUS:
        raise RegistryError(f"refusing to promote to {PREVIOUS!r}: promote keeps it, rollback uses it")
    if to != PRODUCTION:
        if version is None:
            raise RegistryError(f"promote to {to!r} needs --version")
        set_alias(name, to, str(version), tracking_uri=uri)
        return {to: str(version)}
    before = aliases(name, tracking_uri=uri)
    if version is None:
        if PILOT not in before:
            raise RegistryError(
                f"refusing to promote {name}: no version holds alias 'pilot' (pass --version)"
            )
        version = before[PILOT]
    version = str(version)
    mv = _version(c, uri, name, version)
    gate = (mv.tags or {}).get(TAG_GATE, "missing")
    if gate != "passed":
        raise RegistryError(
            f"refusing to promote {name} version {version} to production: its gate is {gate!r}, not 'passed'"
        )
    old = before.get(PRODUCTION)
    if old == version:
        raise RegistryError(f"refusing to promote {name} version {version}: it already holds 'production'")
    moves: list[tuple[str, str | None]] = []
    if old is not None:
        moves.append((PREVIOUS, old))
    moves.append((PRODUCTION, version))
    _move_aliases(c, uri, name, moves, before)
    log.info("%s: production -> version %s (previous-production: %s)", name, version, old)
    return {PRODUCTION: version, PREVIOUS: old if old is not None else before.get(PREVIOUS)}


def rollback(name: str, *, tracking_uri: str | None = None) -> dict[str, str | None]:
    """Swap ``production`` and ``previous-production`` (undo the last promote)."""
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    before = aliases(name, tracking_uri=uri)
    prod, prev = before.get(PRODUCTION), before.get(PREVIOUS)
    if prev is None:
        raise RegistryError(f"refusing to roll back {name}: no version holds 'previous-production'")
    if prod is None:
        raise RegistryError(f"refusing to roll back {name}: no version holds 'production'")
    if prod == prev:
        raise RegistryError(
            f"refusing to roll back {name}: production and previous-production are both version {prod}"
        )
    _move_aliases(c, uri, name, [(PRODUCTION, prev), (PREVIOUS, prod)], before)
    log.info("%s: rolled back production %s -> %s", name, prod, prev)
    return {PRODUCTION: prev, PREVIOUS: prod}


def record_pipeline_status(
    pipeline_run: str, state: str, error: str, registered_model_name: str, tracking_uri: str | None
) -> list[str]:
    """Tag the run's MLflow records with its final state (the exit handler's job); return the run ids.

    The merge run(s) and model version(s) tagged ``seme.pipeline_run = pipeline_run`` get
    ``seme.pipeline_status`` (and ``seme.pipeline_error`` when it failed). A run that failed before
    anything was logged gets a run of its own in experiment ``seme``, ended as FAILED, so every
    pipeline run is visible in MLflow.
    """
    uri = resolve_tracking_uri(tracking_uri)
    c = client(uri)
    tags = {"seme.pipeline_status": state}
    if error:
        tags["seme.pipeline_error"] = error[:4000]
    exp = _call("get experiment 'seme'", uri, c.get_experiment_by_name, EXPERIMENT)
    runs = []
    if exp is not None:
        filt = f"tags.`{TAG_PIPELINE}` = '{pipeline_run}'"
        runs = _call("search runs", uri, c.search_runs, [exp.experiment_id], filt)
    if not runs:
        exp_id = exp.experiment_id if exp is not None else _experiment_id(c, uri)
        run = _call(
            "create run", uri, c.create_run, exp_id, run_name=f"pipeline {pipeline_run}",
            tags={TAG_PIPELINE: pipeline_run},
        )  # fmt: skip
        _call(
            "end run",
            uri,
            c.set_terminated,
            run.info.run_id,
            status="FAILED" if state != "SUCCEEDED" else "FINISHED",
        )
        runs = [run]
    for r in runs:
        for k, v in tags.items():
            _call("tag run", uri, c.set_tag, r.info.run_id, k, v)
    filt = f"name = '{registered_model_name}' and tags.`{TAG_PIPELINE}` = '{pipeline_run}'"
    try:
        versions = c.search_model_versions(filt)
    except Exception:  # noqa: BLE001 - no registered model yet: nothing to tag
        versions = []
    for mv in versions:
        for k, v in tags.items():
            _call(
                "tag version", uri, c.set_model_version_tag, registered_model_name, mv.version, k, v
            )
    return [r.info.run_id for r in runs]
