"""Run the merge pipeline on one machine: KFP's local runner, against given or embedded services.

``run_local`` executes the very same ``merge_pipeline`` that ``seme pipeline compile`` writes, with
``kfp.local.SubprocessRunner(use_venv=False)`` (every step a subprocess of this Python). KFP 2.17's
local runner supports everything the pipeline uses: ``ParallelFor`` with ``dsl.Collected``,
``dsl.If``/``dsl.Else``, the ``ExitHandler`` and retries. Differences from a cluster run:

- Kubernetes settings (GPU request, node selector, toleration, secret/config-map env, CPU/memory
  requests and limits) are ignored, so ``align`` runs on the CPU (its ``device="auto"`` fallback);
- the retry backoff is 1 s instead of 30 s (same retry count), so a failing run fails quickly;
- services: ``--s3-endpoint`` / ``$AWS_ENDPOINT_URL_S3`` and ``--mlflow-uri`` / ``$MLFLOW_TRACKING_URI``
  when given, else embedded defaults: an in-process moto S3 server on 127.0.0.1 (it stops when the
  run ends, so the merged model's s3:// copy goes with it; the local copy stays) and a SQLite MLflow
  store in the work directory.

Merge configs may name local checkpoint directories: they are published to the object store first
(``s3://seme-models/inputs/<digest>/<name>``), so the pipeline fetches and verifies them like any
other input.
"""

import contextlib
import json
import logging
import os
import re
import socket
import sys
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

DEFAULT_OUTPUT_URI = "s3://seme-models/merged"
DEFAULT_INPUTS_URI = "s3://seme-models/inputs"
_EMBEDDED_AWS = {
    "AWS_ACCESS_KEY_ID": "seme-local",
    "AWS_SECRET_ACCESS_KEY": "seme-local-not-a-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def _environ(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for this process and the step subprocesses; restore them after."""
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@contextlib.contextmanager
def services(
    workdir: Path, s3_endpoint: str | None = None, mlflow_uri: str | None = None
) -> Iterator[dict[str, Any]]:
    """The S3 endpoint and MLflow tracking URI to use: the given ones, the environment's, or embedded ones."""
    s3_endpoint = s3_endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or None
    mlflow_uri = mlflow_uri or os.environ.get("MLFLOW_TRACKING_URI") or None
    info: dict[str, Any] = {"s3_embedded": s3_endpoint is None, "mlflow_embedded": mlflow_uri is None}
    env: dict[str, str] = {}
    server = None
    if s3_endpoint is None:
        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per S3 request otherwise

        port = _free_port()
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
        server.start()
        s3_endpoint = f"http://127.0.0.1:{port}"
        env.update(_EMBEDDED_AWS)
    if mlflow_uri is None:
        for name in ("mlflow.store.db.utils", "alembic"):  # "Creating initial MLflow database tables..."
            logging.getLogger(name).setLevel(logging.WARNING)
        mlflow_uri = f"sqlite:///{(workdir / 'mlflow.db').absolute()}"
        _local_experiment(mlflow_uri, workdir / "mlartifacts")
    env.update({"AWS_ENDPOINT_URL_S3": s3_endpoint, "MLFLOW_TRACKING_URI": mlflow_uri, "HF_HUB_OFFLINE": "1"})
    info.update(s3_endpoint=s3_endpoint, mlflow_uri=mlflow_uri)
    try:
        with _environ(env):
            yield info
    finally:
        if server is not None:
            server.stop()


def _local_experiment(tracking_uri: str, artifacts: Path) -> None:
    """Create the ``seme`` experiment of an embedded store with its artifacts in the work directory
    (MLflow would otherwise put them under the current directory)."""
    from mlflow import MlflowClient

    from seme.registry import EXPERIMENT

    c = MlflowClient(tracking_uri=tracking_uri)
    if c.get_experiment_by_name(EXPERIMENT) is None:
        c.create_experiment(EXPERIMENT, artifact_location=artifacts.absolute().as_uri())


def _ensure_bucket(uri: str, endpoint: str) -> None:
    import boto3

    from seme.storage import parse_uri

    bucket, _ = parse_uri(uri)
    s3 = boto3.client("s3", endpoint_url=endpoint)
    with contextlib.suppress(s3.exceptions.BucketAlreadyOwnedByYou, s3.exceptions.BucketAlreadyExists):
        s3.create_bucket(Bucket=bucket)


def stage_inputs(
    cfg: dict[str, Any], s3_endpoint: str, inputs_uri: str = DEFAULT_INPUTS_URI
) -> tuple[dict[str, Any], list[str], str, dict[str, str]]:
    """Publish the config's local checkpoint directories; return (config with URIs, source URIs, base URI, local→URI).

    Each directory goes to ``<inputs_uri>/<digest[:12]>/<dir name>`` (content-addressed: a rerun
    republishes to the same place, a changed checkpoint to a new one; the last segment stays the
    directory's name, which the evaluation report uses to name the parent).
    """
    from components.common import artifact_digest
    from seme.errors import ConfigError
    from seme.storage import is_s3_uri, publish

    published: dict[str, str] = {}

    def to_uri(ref: str, where: str) -> str:
        if is_s3_uri(ref):
            return ref.rstrip("/")
        p = Path(ref).expanduser()
        if not p.is_dir():
            raise ConfigError(f"merge config: {where} {ref} is neither an s3:// URI nor a local directory")
        key = str(p.resolve())
        if key not in published:
            uri = f"{inputs_uri.rstrip('/')}/{artifact_digest(p)[:12]}/{p.resolve().name}"
            _ensure_bucket(uri, s3_endpoint)
            publish(p, uri, endpoint_url=s3_endpoint)
            published[key] = uri
        return published[key]

    cfg = json.loads(json.dumps(cfg))
    models = cfg.get("models") or []
    if not models:
        raise ConfigError("merge config: 'models' is empty; list at least one model")
    for i, m in enumerate(models):
        m["model"] = to_uri(str(m["model"]), f"models[{i}].model")
    base_uri = ""
    if cfg.get("base_model"):
        base_uri = cfg["base_model"] = to_uri(str(cfg["base_model"]), "base_model")
    tok = cfg.get("tokenizer_source")
    if tok and tok != "base" and not is_s3_uri(tok) and Path(tok).expanduser().is_dir():
        cfg["tokenizer_source"] = to_uri(tok, "tokenizer_source")
    sources = list(dict.fromkeys(m["model"] for m in models if m["model"] != base_uri))
    return cfg, sources, base_uri, published


def stage_task_file(tasks: str, s3_endpoint: str, inputs_uri: str = DEFAULT_INPUTS_URI) -> str:
    """The pipeline's ``eval_tasks``: an s3:// URI or YAML text unchanged; a local task file's directory
    published to ``<inputs_uri>/<digest[:12]>/<dir name>`` and the file's URI returned."""
    from components.common import artifact_digest
    from seme.storage import is_s3_uri, publish

    if not tasks or is_s3_uri(tasks) or "\n" in tasks:
        return tasks
    p = Path(tasks).expanduser()
    if not p.is_file():
        from seme.errors import ConfigError

        raise ConfigError(f"task file {p} does not exist")
    d = p.resolve().parent
    uri = f"{inputs_uri.rstrip('/')}/{artifact_digest(d)[:12]}/{d.name}"
    _ensure_bucket(uri, s3_endpoint)
    publish(d, uri, endpoint_url=s3_endpoint)
    return f"{uri}/{p.name}"


def expert_tasks_from_dirs(published: dict[str, str]) -> dict[str, str]:
    """``{task: uri}`` for published local checkpoints that say which task they are the expert of
    (``expert.json`` with a ``task`` key, as written by ``seme zoo build``)."""
    out: dict[str, str] = {}
    for local, uri in published.items():
        rec = Path(local) / "expert.json"
        if rec.is_file():
            task = json.loads(rec.read_text()).get("task")
            if task:
                out[task] = uri
    return out


def _executor_outputs(run_dir: Path) -> dict[str, dict[str, Any]]:
    """``{task dir relative to the run: executor_output.json}`` of every step that finished."""
    out = {}
    for f in sorted(run_dir.rglob("executor_output.json")):
        try:
            out[f.parent.relative_to(run_dir).as_posix()] = json.loads(f.read_text() or "{}")
        except ValueError:
            continue
    return out


def _artifact(outputs: dict[str, Any], name: str) -> dict[str, Any] | None:
    arts = (outputs.get("artifacts") or {}).get(name, {}).get("artifacts") or []
    return arts[0] if arts else None


def collect(run_dir: Path) -> dict[str, Any]:
    """What the run produced, read back from the local pipeline root (task name → outputs)."""
    outs = _executor_outputs(run_dir)
    res: dict[str, Any] = {"run_dir": str(run_dir), "steps": sorted(outs)}
    for task, o in outs.items():
        leaf = task.rsplit("/", 1)[-1]
        if leaf == "merge-checkpoints" and (a := _artifact(o, "merged")):
            res["merged"] = {"path": a["uri"], **(a.get("metadata") or {})}
        elif leaf == "compute-alignment" and (a := _artifact(o, "alignment")):
            res["alignment"] = {"path": a["uri"], **(a.get("metadata") or {})}
        elif leaf == "evaluate-models" and (a := _artifact(o, "report")):
            rdir = Path(a["uri"])
            res["report"] = str(rdir)
            bundle = rdir / "bundle.json"
            if bundle.is_file():
                b = json.loads(bundle.read_text())
                res["metrics"] = {"merged": b["merged"], **b.get("parents", {})}
                res["experts"] = b.get("experts", {})
        elif leaf == "validation-gate" and (a := _artifact(o, "result")):
            res["gate"] = {"passed": bool((a.get("metadata") or {}).get("passed")), "result": a["uri"]}
        elif leaf.startswith("register-model") and (a := _artifact(o, "model_version")):
            res["registry"] = dict(a.get("metadata") or {})
    return res


def run_local(
    merge_config: dict[str, Any],
    *,
    workdir: str | os.PathLike,
    suite: str = "zoo",
    limit: int = 0,
    tasks: str = "",
    gate_policy: str = "",
    registered_model_name: str = "seme-merged",
    expert_tasks: dict[str, str] | None = None,
    output_uri: str = DEFAULT_OUTPUT_URI,
    inputs_uri: str = DEFAULT_INPUTS_URI,
    s3_endpoint: str | None = None,
    mlflow_uri: str | None = None,
    log_file: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Run ``merge_pipeline`` locally; return a summary (status, merged model, metrics, gate, registry).

    ``merge_config`` is the config dict (local paths or s3:// URIs); ``gate_policy`` the policy YAML
    text (empty: default policy); ``tasks`` a task file replacing ``suite``: an s3:// URI, YAML
    text, or a local file (its directory is published to ``inputs_uri`` first, like local
    checkpoints, so the evaluate step fetches and verifies it); ``expert_tasks`` maps a task to the checkpoint (path or URI) that
    is its specialist (default: read from the checkpoints' ``expert.json``). Step logs go to
    ``log_file`` (default: ``<workdir>/pipeline.log``).
    """
    from kfp import local

    from pipelines.merge import ClusterOptions, build_merge_pipeline

    work = Path(workdir).absolute()
    work.mkdir(parents=True, exist_ok=True)
    root = work / "kfp"
    log_path = Path(log_file) if log_file else work / "pipeline.log"
    t0 = time.perf_counter()
    with services(work, s3_endpoint, mlflow_uri) as svc:
        _ensure_bucket(output_uri, svc["s3_endpoint"])
        cfg, sources, base_uri, published = stage_inputs(merge_config, svc["s3_endpoint"], inputs_uri)
        if expert_tasks:
            experts = {
                t: published.get(str(Path(p).expanduser().resolve()), p) for t, p in expert_tasks.items()
            }
        else:
            experts = expert_tasks_from_dirs(published)
        params = {
            "source_uris": sources,
            "base_uri": base_uri,
            "merge_config": _yaml(cfg),
            "eval_suite": suite,
            "eval_limit": int(limit),
            "eval_tasks": stage_task_file(tasks, svc["s3_endpoint"], inputs_uri),
            "expert_tasks": experts,
            "gate_policy": gate_policy,
            "registered_model_name": registered_model_name,
            "output_uri": output_uri,
            "mlflow_tracking_uri": svc["mlflow_uri"],
            "s3_endpoint": svc["s3_endpoint"],
        }
        # the gate reads the merged weights only when the policy has weight checks
        pipeline = build_merge_pipeline(
            ClusterOptions(retry_backoff="1s", gate_weight_check=_weight_checks(gate_policy))
        )
        local.init(
            runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(root), raise_on_error=True
        )
        before = set(root.glob("*")) if root.exists() else set()
        status, error = "SUCCEEDED", ""
        with open(log_path, "a") as log, contextlib.redirect_stdout(log), warnings.catch_warnings():
            # the runner warns that a non-"python" image and the Kubernetes settings have no effect locally
            warnings.simplefilter("ignore", RuntimeWarning)
            warnings.simplefilter("ignore", UserWarning)
            try:
                pipeline(**params)
            except (
                RuntimeError
            ) as e:  # the local runner's "finished with status FAILURE. Inner task failed: ..."
                status, error = "FAILED", re.sub(r"\x1b\[[0-9;]*m", "", str(e).strip().splitlines()[0])
        new = sorted(set(root.glob("*")) - before, key=lambda p: p.stat().st_mtime)
        summary = collect(new[-1]) if new else {"steps": []}
        summary.update(
            status=status,
            error=error,
            params={k: v for k, v in params.items() if k != "merge_config"},
            merge_config=cfg,
            s3_endpoint=svc["s3_endpoint"],
            s3_embedded=svc["s3_embedded"],
            mlflow_uri=svc["mlflow_uri"],
            log=str(log_path),
            wall_s=round(time.perf_counter() - t0, 1),
        )
        summary["aliases"] = _aliases(svc["mlflow_uri"], registered_model_name)
    return summary


def _weight_checks(policy_text: str) -> bool:
    """Whether a gate policy (YAML text; empty: the default, which has none) asks for weight checks."""
    import yaml

    try:
        weights = (yaml.safe_load(policy_text or "") or {}).get("weights") or {}
    except (yaml.YAMLError, AttributeError):
        return False  # the gate step reports a broken policy itself
    if not isinstance(weights, dict):
        return False
    return bool(weights.get("finite")) or weights.get("max_abs") is not None


def _yaml(cfg: dict[str, Any]) -> str:
    import yaml

    return yaml.safe_dump(cfg, sort_keys=False)


def _aliases(tracking_uri: str, name: str) -> dict[str, str]:
    """``{alias: version}`` of the registered model as MLflow has it now (empty if not registered)."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        rm = MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri).get_registered_model(name)
    except MlflowException:
        return {}
    return {k: str(v) for k, v in sorted((rm.aliases or {}).items())}


def format_summary(s: dict[str, Any]) -> str:
    """The human summary of a local run (what ``seme pipeline run-local`` and ``make demo`` print)."""
    lines = [
        f"pipeline run: {s['status']}"
        + (f" ({s['error']})" if s.get("error") else "")
        + f" in {s['wall_s']} s"
    ]
    if m := s.get("merged"):
        lines.append(f"merged model: {m['path']}")
        if m.get("uri"):
            gone = " (embedded S3: gone after the run)" if s.get("s3_embedded") else ""
            lines.append(f"  published:  {m['uri']}{gone}")
        lines.append(f"  sha256:     {m.get('sha256', '')}")
    if metrics := s.get("metrics"):
        names = list(metrics)
        rows = sorted({(g, t) for n in names for g in ("tasks", "general") for t in metrics[n].get(g, {})})
        w = max([len(t) for _, t in rows] + [8])
        lines.append("metrics:")
        lines.append("  " + "task".ljust(w + 14) + "".join(n[:16].rjust(18) for n in names))
        for g, t in rows:
            metric = next(
                (metrics[n][g][t].get("metric", "") for n in names if t in metrics[n].get(g, {})), ""
            )
            vals = []
            for n in names:
                e = metrics[n].get(g, {}).get(t)
                v = e.get("value") if isinstance(e, dict) else e
                vals.append(f"{v:.4g}".rjust(18) if isinstance(v, int | float) else "-".rjust(18))
            lines.append("  " + f"{t} ({metric})".ljust(w + 14) + "".join(vals))
        if s.get("experts"):
            lines.append("  experts: " + ", ".join(f"{t} -> {n}" for t, n in s["experts"].items()))
    if g := s.get("gate"):
        lines.append(f"gate: {'PASSED' if g['passed'] else 'FAILED'}  ({g['result']}/gate_summary.md)")
    if r := s.get("registry"):
        alias = r.get("alias") or "none (gate failed)"
        lines.append(f"registry: {r.get('name')} version {r.get('version')}, alias {alias}")
    if s.get("aliases"):
        lines.append("  aliases now: " + ", ".join(f"{a} -> v{v}" for a, v in s["aliases"].items()))
    lines.append(f"mlflow: {s['mlflow_uri']}")
    if a := s.get("alignment"):
        plots = sorted(str(p) for p in Path(a["path"]).glob("*.png"))
        if plots:
            lines.append("plots: " + ", ".join(plots))
    lines.append(f"step logs: {s['log']}")
    return "\n".join(lines)


def print_summary(s: dict[str, Any]) -> None:
    print(format_summary(s), file=sys.stdout)


def run_demo(workdir: str | os.PathLike | None = None) -> int:
    """``make demo``: the tiny zoo, a SeMe merge through the whole pipeline.

    ``SEME_DEMO_ZOO=real`` uses the real SmolLM2 zoo instead when it is cached (``seme zoo build``);
    its SeMe merge and evaluations take far longer on CPU, so evals are limited to 20 items per task.
    """
    import tempfile

    from seme.zoo import REAL_NAME, build_zoo, load_zoo, zoo_path

    real = zoo_path(REAL_NAME)
    limit = 0
    if os.environ.get("SEME_DEMO_ZOO") == "real" and (real / "zoo.json").is_file():
        zdir, suite, limit = real, "zoo", 20
    else:
        print("building the tiny zoo (cached after the first time) ...", file=sys.stderr)
        zdir, suite = build_zoo(tiny=True), "tiny"
    zoo = load_zoo(zdir)
    experts = {task: str(zdir / e["path"]) for task, e in zoo["experts"].items()}
    cfg = {
        "merge_method": "seme",
        "base_model": str(zdir / "base"),
        "models": [{"model": p} for p in experts.values()],
        "dtype": "float32",
    }
    work = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="seme-demo-"))
    print(f"running the merge pipeline locally (KFP local runner) in {work} ...", file=sys.stderr)
    with services(work) as svc:  # kept up after the run: the registered version is loaded back from it
        summary = run_local(
            cfg,
            workdir=work,
            suite=suite,
            expert_tasks=experts,
            registered_model_name="seme-demo",
            s3_endpoint=svc["s3_endpoint"],
            mlflow_uri=svc["mlflow_uri"],
            **({"limit": limit} if limit else {}),
        )
        print_summary(summary)
        if summary["status"] != "SUCCEEDED":
            return 1
        from seme.demo import load_back

        reg = summary.get("registry") or {}
        line = load_back(
            "seme-demo",
            svc["mlflow_uri"],
            svc["s3_endpoint"],
            None if reg.get("alias") else reg.get("version"),
        )
        print(f"loaded back with mlflow.transformers.load_model; it says: {line}")
    return 0
