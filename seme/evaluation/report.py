"""The evaluation report of a merge: merged vs parents as a chart, a per-item table, run inputs.

Used by the pipeline's evaluate step (``comparison.png`` next to the metrics) and by
``seme.registry.log_merge_run`` (the MLflow run's per-item table, chart and dataset inputs).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any


def models_of(bundle: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """``{"merged": metrics, "<parent>": metrics, …}`` of a gate bundle."""
    return {"merged": bundle["merged"], **(bundle.get("parents") or {})}


def _entries(m: dict[str, Any]) -> dict[str, dict[str, Any]]:
    out = {}
    for section, prefix in (("tasks", ""), ("general", "general:")):
        for name, e in (m.get(section) or {}).items():
            if isinstance(e, dict) and isinstance(e.get("value"), int | float):
                out[f"{prefix}{name}"] = e
    return out


def plot_models(models: dict[str, dict[str, Any]], out_png: str | os.PathLike) -> Path | None:
    """One bar group per task (one bar per model) with 95% CI whiskers; a panel per metric.

    None (no file) when no model reports a task with a value."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(models)
    per = {n: _entries(m) for n, m in models.items()}
    tasks = sorted({t for e in per.values() for t in e})
    metrics = sorted({str(per[n][t].get("metric", "value")) for n in names for t in tasks if t in per[n]})
    if not metrics:
        return None
    fig, axes = plt.subplots(len(metrics), 1, figsize=(max(6, 1.6 * len(tasks) + 2), 3.2 * len(metrics)),
                             squeeze=False)
    width = 0.8 / max(1, len(names))
    for ax, metric in zip(axes[:, 0], metrics, strict=True):
        ts = [t for t in tasks if any(t in per[n] and per[n][t].get("metric", "value") == metric for n in names)]
        for i, n in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, t in enumerate(ts):
                e = per[n].get(t)
                if e is None or e.get("metric", "value") != metric:
                    continue
                v = float(e["value"])
                ci = e.get("ci95") or [v, v]
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(v)
                lo.append(max(0.0, v - ci[0]))
                hi.append(max(0.0, ci[1] - v))
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=n)
        ax.set_xticks(range(len(ts)), ts, rotation=15)
        ax.set_ylabel(metric)
        ax.set_title(f"{metric} (95% CI)")
        ax.legend(fontsize=8)
    fig.suptitle("merged vs parents")
    fig.tight_layout()
    out = Path(out_png)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def item_table(models: dict[str, dict[str, Any]]) -> dict[str, list[Any]]:
    """Per-item results of every model as columns (model, task, item, metric, correct, nll, tokens)."""
    cols: dict[str, list[Any]] = {k: [] for k in ("model", "task", "item", "correct", "nll", "tokens")}
    for n, m in models.items():
        for t, e in _entries(m).items():
            items = e.get("per_item") or {}
            k = len(next(iter(items.values()), []))
            for i in range(k):
                cols["model"].append(n)
                cols["task"].append(t)
                cols["item"].append(i)
                c = items.get("correct", items.get("score"))
                cols["correct"].append(None if c is None else c[i])
                cols["nll"].append(items["nll"][i] if "nll" in items else None)
                cols["tokens"].append(items["tokens"][i] if "tokens" in items else None)
    return cols


def datasets_of(metrics: dict[str, Any]) -> list[dict[str, str]]:
    """The task file and every data file a metrics JSON was measured on: name, source, sha256."""
    rec = metrics.get("task_file") or {}
    if not rec:
        return []
    out = [{"name": f"tasks:{rec.get('name', '')}", "source": str(rec.get("source", "")),
            "sha256": str(rec.get("sha256", "")), "path": str(rec.get("path", ""))}]
    for d in rec.get("data") or []:
        out.append({"name": f"{d['task']}:{Path(d['source']).name or d['source']}", "source": d["source"],
                    "sha256": d["sha256"], "path": d.get("path", "")})
    return out
