"""``seme pipeline compile|run-local|schedule``: the Kubeflow pipelines (components/, pipelines/)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("pipeline", help="Kubeflow pipelines: compile, run locally, schedule")
    psub = p.add_subparsers(dest="pipeline_command", metavar="ACTION", required=True)

    c = psub.add_parser("compile", help="write a pipeline's KFP IR YAML")
    c.add_argument(
        "--pipeline", choices=("merge", "promote"), default="merge", help="which pipeline (default merge)"
    )
    c.add_argument("-o", "--out", help="output file (default: seme-<pipeline>.yaml)")
    _cluster_flags(c)
    c.set_defaults(func=run_compile)

    r = psub.add_parser("run-local", help="run the merge pipeline on this machine (KFP local runner)")
    r.add_argument("config", help="merge config YAML (models: local directories or s3:// URIs)")
    _run_flags(r)
    r.add_argument("--workdir", help="where the local pipeline root, logs and (embedded) MLflow store go")
    r.add_argument(
        "--s3-endpoint", help="S3 endpoint (default: $AWS_ENDPOINT_URL_S3, else an embedded moto server)"
    )
    r.add_argument(
        "--mlflow-uri", help="MLflow tracking URI (default: $MLFLOW_TRACKING_URI, else SQLite in --workdir)"
    )
    r.add_argument(
        "--inputs-uri", default="s3://seme-models/inputs", help="where local input checkpoints are published"
    )
    r.add_argument("--json", action="store_true", help="print the summary as JSON")
    r.set_defaults(func=run_local)

    s = psub.add_parser("schedule", help="create a recurring run of the merge pipeline on a KFP server")
    s.add_argument("config", help="merge config YAML (models: s3:// URIs)")
    s.add_argument("--cron", required=True, help='6-field cron, seconds first: "0 0 3 * * *" = 03:00 daily')
    s.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
    _run_flags(s)
    s.add_argument("--s3-endpoint", default="", help="S3 endpoint (default: the seme-config ConfigMap)")
    s.add_argument(
        "--mlflow-uri", default="", help="MLflow tracking URI (default: the seme-config ConfigMap)"
    )
    s.add_argument("--job-name", default="seme-merge-nightly", help="recurring run name")
    s.add_argument("--experiment", default="seme", help="KFP experiment (created if missing)")
    s.add_argument("--namespace", help="KFP namespace (multi-user installs)")
    s.add_argument("--service-account", default="seme-pipeline-runner", help="Kubernetes SA of the runs")
    s.add_argument("--package", help="compiled IR YAML to schedule (default: compile the merge pipeline now)")
    s.add_argument("--token", help="bearer token for the KFP API (default: $KF_PIPELINES_TOKEN)")
    s.set_defaults(func=run_schedule)

    sp = psub.add_parser(
        "schedule-promote",
        help="create a recurring run of the promote pipeline: pilot -> production once the evidence suffices",
    )
    sp.add_argument("name", help="registered model name")
    sp.add_argument("--cron", required=True, help='6-field cron, seconds first: "0 0 * * * *" = hourly')
    sp.add_argument("--host", required=True, help="KFP API endpoint, e.g. http://ml-pipeline-ui.kubeflow:80")
    sp.add_argument("--policy", help="promotion policy YAML (default: seme/policies/promotion.yaml)")
    sp.add_argument(
        "--mlflow-uri", default="", help="MLflow tracking URI (default: the seme-config ConfigMap)"
    )
    sp.add_argument("--job-name", help="recurring run name (default: seme-promote-NAME)")
    sp.add_argument("--experiment", default="seme", help="KFP experiment (created if missing)")
    sp.add_argument("--namespace", help="KFP namespace (multi-user installs)")
    sp.add_argument("--service-account", default="seme-pipeline-runner", help="Kubernetes SA of the runs")
    sp.add_argument("--package", help="compiled promote pipeline IR YAML (default: compile it now)")
    sp.add_argument("--token", help="bearer token for the KFP API (default: $KF_PIPELINES_TOKEN)")
    sp.set_defaults(func=run_schedule_promote)


def _cluster_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-gpu", action="store_true", help="no GPU request on any step (they then run on CPU)")
    p.add_argument("--gpu-node-selector", default="nvidia.com/gpu.present=true", help="KEY=VALUE for align")
    p.add_argument(
        "--gpu-toleration",
        default="nvidia.com/gpu:Exists:NoSchedule",
        help="KEY:Exists:EFFECT or KEY:Equal:VALUE:EFFECT for align",
    )
    p.add_argument("--config-map", default="seme-config", help="ConfigMap with endpoints (env of every step)")
    p.add_argument(
        "--s3-secret", default="seme-s3", help="Secret with AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY"
    )
    p.add_argument(
        "--image",
        help="container image of every step, REPOSITORY[:TAG][@sha256:DIGEST] (default: the release image)",
    )
    p.add_argument(
        "--gpu-steps",
        help="comma-separated steps that get a GPU, from align,merge,evaluate (default: align, plus merge "
        "when --method/--config is seme or an SVD-family method; evaluate uses a GPU when its pod has one)",
    )
    p.add_argument("--method", help="the merge method the pipeline will run (picks the default --gpu-steps)")
    p.add_argument("--config", dest="method_config", help="merge config YAML to take --method from")
    p.add_argument(
        "--pvc",
        metavar="SIZE",
        help="e.g. 200Gi: one PersistentVolumeClaim per run holds every checkpoint; model-reading steps "
        "mount it instead of copying models through the artifact store",
    )
    p.add_argument(
        "--pvc-storage-class", default="", help="StorageClass of the --pvc volume (default: the cluster's)"
    )
    p.add_argument(
        "--model-size",
        default="tiny",
        choices=("tiny", "1b", "7b", "70b"),
        help="pod CPU/memory requests sized for this model (docs/runbook.md, Sizing; default tiny)",
    )
    p.add_argument(
        "--gate-weight-check",
        action="store_true",
        help="the gate reads the merged weights (needed by a gate policy with weight checks); off: metrics only",
    )


def _run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="zoo", help="evaluation suite (default zoo)")
    p.add_argument("--tasks", default="", metavar="FILE_OR_URI",
                   help="a task file instead of --suite (s3:// URI; run-local also takes a local file)")
    p.add_argument("--limit", type=int, default=0, help="items per eval task (0: all)")
    p.add_argument("--policy", help="gate policy YAML (default: seme's default policy)")
    p.add_argument("--name", default="seme-merged", help="registered model name")
    p.add_argument(
        "--expert",
        action="append",
        default=[],
        metavar="TASK=MODEL",
        help="the source that is TASK's specialist (repeatable; default: from expert.json)",
    )
    p.add_argument(
        "--output-uri", default="s3://seme-models/merged", help="where merged models are published"
    )


def _read(path: str | None, what: str) -> str:
    from pathlib import Path

    from seme.errors import ConfigError

    if not path:
        return ""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{p}: {what} not found")
    return p.read_text()


def _experts(items: list[str]) -> dict[str, str]:
    from seme.errors import ConfigError

    out = {}
    for it in items:
        task, sep, model = it.partition("=")
        if not sep or not task or not model:
            raise ConfigError(f"--expert {it!r}: expected TASK=MODEL")
        out[task] = model
    return out


def _scheduled_tasks(tasks: str) -> str:
    """A scheduled run reads its task file from S3 (or gets it as text, with s3:// or absolute data paths)."""
    from seme.storage import is_s3_uri

    return tasks if not tasks or is_s3_uri(tasks) else _read(tasks, "task file")


_K8S_NAME = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"


def _k8s_name(value: str, flag: str) -> str:
    """A Kubernetes object name (DNS-1123 subdomain: lowercase letters, digits, '-', '.'; ≤ 253)."""
    import re

    from seme.errors import ConfigError

    if not value or len(value) > 253 or not re.fullmatch(_K8S_NAME, value):
        raise ConfigError(
            f"{flag} {value!r}: not a Kubernetes object name (lowercase letters, digits, '-' and '.', "
            "starting and ending with a letter or digit, at most 253 characters)"
        )
    return value


def _check_run(args: argparse.Namespace) -> None:
    """Everything a run needs that can be checked here, before the first expensive step (fetch)."""
    from seme.errors import ConfigError
    from seme.evaluation import get_suite
    from seme.gates import load_policy
    from seme.storage import parse_uri

    get_suite(args.suite)
    tasks = getattr(args, "tasks", "")
    if tasks and not tasks.startswith("s3://"):  # a local task file: checked (and its data) right here
        from seme.evaluation import open_tasks

        open_tasks(task_file=tasks)
    if args.limit < 0:
        raise ConfigError(f"--limit {args.limit}: must be 0 (all items) or a positive number")
    if args.policy:
        _read(args.policy, "gate policy")
        load_policy(args.policy)
    if not args.name.strip():
        raise ConfigError("--name: the registered model name is empty")
    for flag in ("output_uri", "inputs_uri"):
        if getattr(args, flag, None) is not None:
            parse_uri(getattr(args, flag))
    _experts(args.expert)


def _config_dict(path: str) -> dict:
    import yaml

    from seme.config import load_config
    from seme.errors import ConfigError

    load_config(path)  # validate before anything runs
    data = yaml.safe_load(_read(path, "merge config"))
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: a merge config must be a YAML mapping")
    return data


def run_compile(args: argparse.Namespace) -> int:
    _k8s_name(args.config_map, "--config-map")
    _k8s_name(args.s3_secret, "--s3-secret")
    from components.common import IMAGE
    from pipelines.compile import compile_pipeline
    from pipelines.merge import ClusterOptions

    method = args.method
    if args.method_config:
        from seme.config import load_config

        method = load_config(args.method_config).merge_method
    steps = None
    if args.gpu_steps is not None:
        steps = frozenset(x.strip() for x in args.gpu_steps.split(",") if x.strip())
    opts = ClusterOptions(
        gpu=not args.no_gpu,
        gpu_node_selector=args.gpu_node_selector,
        gpu_toleration=args.gpu_toleration,
        config_map=args.config_map,
        s3_secret=args.s3_secret,
        image=args.image or IMAGE,
        gpu_steps=steps,
        method=method,
        pvc_size=args.pvc,
        pvc_storage_class=args.pvc_storage_class,
        model_size=args.model_size,
        gate_weight_check=args.gate_weight_check,
    )
    out = compile_pipeline(args.pipeline, args.out or f"seme-{args.pipeline}.yaml", opts)
    print(out)
    return 0


def run_local(args: argparse.Namespace) -> int:
    import json
    import tempfile
    from pathlib import Path

    from pipelines.local import print_summary
    from pipelines.local import run_local as run

    _check_run(args)
    cfg = _config_dict(args.config)
    summary = run(
        cfg,
        workdir=args.workdir or Path(tempfile.mkdtemp(prefix="seme-pipeline-")),
        suite=args.suite,
        limit=args.limit,
        tasks=args.tasks,
        gate_policy=_read(args.policy, "gate policy"),
        registered_model_name=args.name,
        expert_tasks=_experts(args.expert) or None,
        output_uri=args.output_uri,
        inputs_uri=args.inputs_uri,
        s3_endpoint=args.s3_endpoint,
        mlflow_uri=args.mlflow_uri,
    )
    if args.json:
        print(json.dumps(summary, indent=2, default=str))
    else:
        print_summary(summary)
    if summary["status"] != "SUCCEEDED":
        from seme.errors import PipelineError

        raise PipelineError(f"pipeline run {summary['status'].lower()}: {summary.get('error') or 'see ' + summary['log']}")
    return 0


def run_schedule(args: argparse.Namespace) -> int:
    import os

    import yaml

    from pipelines.schedule import check_cron, schedule
    from seme.errors import ConfigError
    from seme.storage import is_s3_uri

    check_cron(args.cron)
    _check_run(args)
    _k8s_name(args.service_account, "--service-account")
    cfg = _config_dict(args.config)
    refs = [m["model"] for m in cfg["models"]] + ([cfg["base_model"]] if cfg.get("base_model") else [])
    local = [r for r in refs if not is_s3_uri(str(r))]
    if local:
        raise ConfigError(
            f"{args.config}: a scheduled run reads its checkpoints from S3; not an s3:// URI: {local[0]}"
        )
    base = str(cfg.get("base_model") or "")
    experts = _experts(args.expert)
    for task, uri in experts.items():
        if not is_s3_uri(uri):
            raise ConfigError(f"--expert {task}={uri}: a scheduled run needs the s3:// URI of the expert")
    params = {
        "source_uris": list(dict.fromkeys(str(r) for r in refs[: len(cfg["models"])] if str(r) != base)),
        "base_uri": base,
        "merge_config": yaml.safe_dump(cfg, sort_keys=False),
        "eval_suite": args.suite,
        "eval_limit": args.limit,
        "eval_tasks": _scheduled_tasks(args.tasks),
        "expert_tasks": experts,
        "gate_policy": _read(args.policy, "gate policy"),
        "registered_model_name": args.name,
        "output_uri": args.output_uri,
        "mlflow_tracking_uri": args.mlflow_uri,
        "s3_endpoint": args.s3_endpoint,
    }
    res = schedule(
        args.host,
        args.cron,
        params,
        job_name=args.job_name,
        experiment=args.experiment,
        namespace=args.namespace,
        service_account=args.service_account,
        package=args.package,
        existing_token=args.token or os.environ.get("KF_PIPELINES_TOKEN"),
    )
    print(
        f"recurring run {res['recurring_run_id']} ({res['name']}) created on {res['host']}: cron {res['cron']!r}"
    )
    return 0


def run_schedule_promote(args: argparse.Namespace) -> int:
    import os

    from pipelines.schedule import check_cron, schedule
    from seme.pilot import load_policy

    check_cron(args.cron)
    policy = _read(args.policy, "promotion policy")
    if args.policy:
        load_policy(args.policy)  # refuse a bad policy now, not at the first scheduled run
    res = schedule(
        args.host,
        args.cron,
        {
            "registered_model_name": args.name,
            "version": "",
            "to_alias": "production",
            "mlflow_tracking_uri": args.mlflow_uri,
            "promotion_policy": policy,
        },
        job_name=args.job_name or f"seme-promote-{args.name}",
        experiment=args.experiment,
        namespace=args.namespace,
        service_account=args.service_account,
        package=args.package,
        existing_token=args.token or os.environ.get("KF_PIPELINES_TOKEN"),
        pipeline="promote",
    )
    print(
        f"recurring run {res['recurring_run_id']} ({res['name']}) created on {res['host']}: cron {res['cron']!r}"
    )
    return 0
