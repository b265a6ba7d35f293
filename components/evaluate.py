"""Evaluate the merged model and its parents on one suite."""

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
    metrics: Output[Metrics],
    report: Output[Artifact],
    device: str = "auto",
) -> None:
    """Run ``seme.evaluation.evaluate`` on the merged model, every source and the base.

    ``report`` is a directory of metrics JSON files (interfaces.md), one per model: ``merged.json``,
    ``source-<i>.json`` and ``base.json``, plus ``index.json`` mapping each file to the checkpoint URI;
    the gate reads it. ``metrics`` carries the merged model's scalars for the KFP UI.
    Metadata: ``suite``, ``sha256``.
    """
    import json
    import os

    from components.common import artifact_digest
    from seme.evaluation import evaluate, write_metrics
    from seme.merge import resolve_device

    dev = str(resolve_device(device))
    os.makedirs(report.path, exist_ok=True)
    models = [("merged", merged)] + [(f"source-{i}", s) for i, s in enumerate(sources)]
    if base.metadata.get("uri"):
        models.append(("base", base))
    index = {}
    for name, art in models:
        res = evaluate(art.path, suite, device=dev, limit=limit or None, progress=False)
        res["model"] = art.metadata.get("uri") or name
        write_metrics(res, os.path.join(report.path, f"{name}.json"))
        index[name] = {"file": f"{name}.json", "uri": art.metadata.get("uri", ""), "sha256": art.metadata.get("sha256", "")}
        if name == "merged":
            for group in ("tasks", "general"):
                for task, m in res.get(group, {}).items():
                    metrics.log_metric(f"{task}.{m['metric']}", float(m["value"]))
    with open(os.path.join(report.path, "index.json"), "w") as f:
        json.dump(index, f, indent=2)
    report.metadata.update({"suite": suite, "sha256": artifact_digest(report.path)})
