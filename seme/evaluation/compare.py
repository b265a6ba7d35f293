"""Paired comparisons: one model's metrics against others', task by task, on the same items.

``seme eval --compare A.json B.json …`` (and the pipeline's report) gives, per task, A − B with a
95% paired-bootstrap interval and a p-value: exact McNemar for accuracies, paired bootstrap for
perplexity and other non-binary metrics. Pairing needs the per-item results that ``seme eval``
writes; tasks without them, or measured on different items, are listed as not comparable.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from seme.errors import EvalError
from seme.evaluation.stats import N_BOOT, compare_entries


def read_metrics(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    try:
        m = json.loads(p.read_text())
    except OSError as e:
        raise EvalError(f"cannot read metrics {p}: {e.strerror}") from None
    except ValueError as e:
        raise EvalError(f"{p}: not valid JSON ({e})") from None
    if not isinstance(m, dict) or not isinstance(m.get("tasks"), dict):
        raise EvalError(f"{p}: not a metrics JSON of seme eval (no 'tasks')")
    return m


def compare_pair(a: dict[str, Any], b: dict[str, Any], n_boot: int = N_BOOT) -> dict[str, Any]:
    """``{task: comparison}`` of ``a`` − ``b`` for every task (and general entry) both report."""
    out: dict[str, Any] = {}
    for section, prefix in (("tasks", ""), ("general", "general:")):
        ta, tb = a.get(section) or {}, b.get(section) or {}
        for name in sorted(set(ta) & set(tb)):
            key = f"{prefix}{name}"
            try:
                out[key] = compare_entries(ta[name], tb[name], key, n_boot)
            except (KeyError, ValueError, TypeError, ZeroDivisionError) as e:
                reason = "no per-item results" if isinstance(e, KeyError) else str(e)
                out[key] = {"metric": ta[name].get("metric"), "comparable": False, "reason": reason}
    return out


def compare(metrics: list[dict[str, Any]], names: list[str] | None = None,
            n_boot: int = N_BOOT) -> dict[str, Any]:
    """The first model against each of the others: ``{"model": A, "against": {name: {task: …}}}``."""
    if len(metrics) < 2:
        raise EvalError("--compare needs at least two metrics files (A B [C …]): A is compared with each")
    names = names or [str(m.get("model", f"model{i}")) for i, m in enumerate(metrics)]
    dtypes = {m.get("dtype", "float32") for m in metrics}
    if len(dtypes) > 1:
        raise EvalError(f"the metrics were computed at different dtypes ({', '.join(sorted(dtypes))}); "
                        "compare models evaluated at one dtype")
    return {"model": names[0], "n_boot": n_boot,
            "against": {names[i]: compare_pair(metrics[0], metrics[i], n_boot) for i in range(1, len(metrics))}}


def format_comparison(c: dict[str, Any]) -> str:
    rows = [("vs", "task", "metric", "A", "B", "A - B", "95% CI", "p", "test")]
    for other, tasks in c["against"].items():
        for task, r in tasks.items():
            if r.get("comparable") is False:
                rows.append((other, task, str(r.get("metric")), "-", "-", "-", "-", "-", r["reason"]))
                continue
            sig = " *" if r["significant"] else ""
            rows.append((other, task, r["metric"], f"{r['a']:.4f}", f"{r['b']:.4f}", f"{r['diff']:+.4f}",
                         f"[{r['ci95'][0]:+.4f}, {r['ci95'][1]:+.4f}]", f"{r['p_value']:.3g}{sig}", r["test"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(x.ljust(w) for x, w in zip(r, widths, strict=True)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"A = {c['model']}; * p < 0.05")
    return "\n".join(lines)
