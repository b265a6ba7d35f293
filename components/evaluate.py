"""Evaluate the merged model and its parents on one suite or task file; write the gate's metrics bundle."""

from kfp import dsl
from kfp.dsl import Artifact, Input, Metrics, Model, Output

from components.common import IMAGE


@dsl.component(base_image=IMAGE, install_kfp_package=False)
def evaluate_models(
    merged: Input[Model],
    sources: Input[list[Model]],
    base: Input[Model],
    suite: str,
    limit: int,
    expert_tasks: dict,
    metrics: Output[Metrics],
    report: Output[Artifact],
    device: str = "auto",
    tasks: str = "",
) -> None:
    """Run ``seme.evaluation.evaluate`` on the merged model, every source and the base.

    ``tasks`` (a task file as YAML text, or its ``s3://`` URI) replaces the built-in ``suite`` when
    given; it is checked, and its data fetched and verified, before any model is loaded.

    ``report`` is a directory: one metrics JSON per model (``merged.json``, ``<parent>.json``) and
    ``bundle.json``, the gate's metrics bundle (``seme.gates.make_bundle``). Parents are named
    ``base`` and by their URI's last segment; ``expert_tasks`` (``{task: source URI}``) says which
    source is the specialist of which task. ``metrics`` carries the merged model's scalars for the
    KFP UI. The report also holds ``comparison.json`` (merged − each parent per task, paired, with
    95% CI and p-value), ``comparison.png`` (merged vs parents, CI whiskers) and the task file.
    Metadata: ``suite``, ``sha256``.
    """
    import json
    import os
    import shutil

    from components.common import artifact_digest, model_path, parent_names
    from seme.errors import ConfigError
    from seme.evaluation import evaluate, open_tasks, write_metrics
    from seme.evaluation.compare import compare_pair
    from seme.evaluation.report import plot_models
    from seme.evaluation.taskfile import resolve_source
    from seme.gates import make_bundle
    from seme.merge import resolve_device

    dev = str(resolve_device(device))
    names = parent_names([s.metadata.get("uri", "") for s in sources])
    parents = list(zip(names, sources, strict=True))
    if base.metadata.get("uri"):
        parents.append(("base", base))
    by_uri = {a.metadata.get("uri", "").rstrip("/"): n for n, a in parents}
    experts = {}
    for task, uri in (expert_tasks or {}).items():
        if uri.rstrip("/") not in by_uri:
            raise ConfigError(
                f"expert_tasks: {task} -> {uri}, which is not one of the pipeline's source_uris"
            )
        experts[task] = by_uri[uri.rstrip("/")]

    os.makedirs(report.path, exist_ok=True)
    if tasks.strip():
        is_uri = tasks.strip().startswith("s3://")
        path = resolve_source(tasks, workdir=report.path)  # YAML text: written to report/tasks.yaml
        tf = open_tasks(task_file=path, source=tasks.strip() if is_uri else "inline", inline=not is_uri)
        copy = os.path.join(report.path, "tasks.yaml")
        if os.path.abspath(path) != os.path.abspath(copy):
            shutil.copyfile(path, copy)
    else:
        tf = open_tasks(suite)
    results = {}
    for name, art in [("merged", merged), *parents]:
        res = evaluate(model_path(art), task_file=tf, device=dev, limit=limit or None, progress=False)
        res["model"] = art.metadata.get("uri") or model_path(art)
        write_metrics(res, os.path.join(report.path, f"{name}.json"))
        results[name] = res
    for group in ("tasks", "general"):
        for task, m in results["merged"].get(group, {}).items():
            metrics.log_metric(f"{task}.{m['metric']}", float(m["value"]))
    bundle = make_bundle(
        results["merged"],
        {n: results[n] for n, _ in parents},
        experts,
        model_dir=model_path(merged),
        base="base",
    )
    with open(os.path.join(report.path, "bundle.json"), "w") as f:
        json.dump(bundle, f, indent=2)
    comparison = {n: compare_pair(results["merged"], results[n]) for n, _ in parents}
    with open(os.path.join(report.path, "comparison.json"), "w") as f:
        json.dump({"model": "merged", "against": comparison}, f, indent=2)
    plot_models(results, os.path.join(report.path, "comparison.png"))
    report.metadata.update({"suite": tf.name, "sha256": artifact_digest(report.path)})
