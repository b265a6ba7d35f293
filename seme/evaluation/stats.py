"""Statistics of an evaluation: confidence intervals and paired comparisons of two models.

Intervals: Wilson score for proportions, normal approximation for means. Paired comparisons use the
per-item results both models wrote for the same items: the exact McNemar test for accuracies (a
binomial test on the discordant items) and a paired bootstrap for everything else (perplexity,
token accuracy, scores). Bootstrap draws come from a seed derived from the task name, so a
comparison is reproducible to the last digit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from typing import Any

N_BOOT = 10_000


def wilson_ci(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for a proportion k/n."""
    if n == 0:
        return [0.0, 0.0]
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, c - h), min(1.0, c + h)]


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width of a normal-approximation 95% interval."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, z * math.sqrt(var / n)


def mcnemar_exact(a: Sequence[int | bool], b: Sequence[int | bool]) -> float:
    """Two-sided exact McNemar p-value for paired binary outcomes (binomial test on discordant pairs)."""
    from scipy.stats import binomtest

    n01 = sum(1 for x, y in zip(a, b, strict=True) if not x and y)
    n10 = sum(1 for x, y in zip(a, b, strict=True) if x and not y)
    if n01 + n10 == 0:
        return 1.0
    return float(binomtest(n10, n01 + n10, 0.5).pvalue)


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"seme-compare:{name}".encode()).digest()[:8], "big")


def paired_bootstrap(stat: Any, a: dict[str, Any], b: dict[str, Any], seed_name: str,
                     n_boot: int = N_BOOT) -> tuple[list[float], float]:
    """95% percentile CI of ``stat(a) - stat(b)`` over items resampled jointly, and a two-sided p-value.

    ``a``/``b`` map column names to equal-length arrays (one entry per item); ``stat`` maps such a
    dict of 2-D arrays (draws x items) to one value per draw. p = 2 min(P(d* <= 0), P(d* >= 0)),
    the paired bootstrap test of Koehn (2004), with +1 smoothing so it is never exactly 0.
    """
    import numpy as np

    n = len(next(iter(a.values())))
    rng = np.random.default_rng(_seed(seed_name))
    idx = rng.integers(0, n, size=(n_boot, n))
    da = stat({k: np.asarray(v, dtype=np.float64)[idx] for k, v in a.items()})
    db = stat({k: np.asarray(v, dtype=np.float64)[idx] for k, v in b.items()})
    d = da - db
    lo, hi = np.quantile(d, [0.025, 0.975])
    p = 2 * min((np.sum(d <= 0) + 1) / (n_boot + 1), (np.sum(d >= 0) + 1) / (n_boot + 1))
    return [float(lo), float(hi)], float(min(1.0, p))


def _ppl(c: dict[str, Any]) -> Any:
    import numpy as np

    return np.exp(c["nll"].sum(-1) / c["tokens"].sum(-1))


def _ratio(num: str, den: str) -> Any:
    return lambda c: c[num].sum(-1) / c[den].sum(-1)


def _mean(key: str) -> Any:
    return lambda c: c[key].mean(-1)


def task_value(entry: dict[str, Any], metric: str | None = None) -> tuple[float, str, dict[str, list]]:
    """(value, test, columns) of a task entry's per-item results for ``metric`` (default: its headline)."""
    items = entry.get("per_item") or {}
    metric = metric or entry.get("metric", "")
    if metric == "perplexity" and {"nll", "tokens"} <= set(items):
        cols = {"nll": items["nll"], "tokens": items["tokens"]}
        return math.exp(sum(cols["nll"]) / sum(cols["tokens"])), "perplexity", cols
    if metric == "token_accuracy" and {"correct_tokens", "tokens"} <= set(items):
        cols = {"correct_tokens": items["correct_tokens"], "tokens": items["tokens"]}
        return sum(cols["correct_tokens"]) / sum(cols["tokens"]), "token_ratio", cols
    key = "correct_norm" if metric in ("accuracy_norm", "acc_norm") and "correct_norm" in items else (
        "correct" if "correct" in items else "score" if "score" in items else None)
    if key is None:
        raise KeyError("no per-item results")
    vals = [float(v) for v in items[key]]
    binary = key != "score" or all(v in (0.0, 1.0) for v in vals)
    return sum(vals) / max(1, len(vals)), "binary" if binary else "mean", {"x": vals}


def compare_entries(a: dict[str, Any], b: dict[str, Any], name: str, n_boot: int = N_BOOT) -> dict[str, Any]:
    """Paired comparison of one task between two models (``a`` − ``b``) from their per-item results.

    Returns ``{metric, a, b, diff, ci95, p_value, test, n, significant}``; raises KeyError/ValueError
    when the entries cannot be paired (no per-item results, different items).
    """
    metric = a.get("metric", "")
    if b.get("metric", "") != metric:
        raise ValueError(f"different metrics ({metric} vs {b.get('metric')})")
    if a.get("items_sha256") and b.get("items_sha256") and a["items_sha256"] != b["items_sha256"]:
        raise ValueError("the two results were computed on different items")
    va, kind, ca = task_value(a, metric)
    vb, kind_b, cb = task_value(b, metric)
    n = len(next(iter(ca.values())))
    if len(next(iter(cb.values()))) != n or kind != kind_b:
        raise ValueError(f"different numbers of items ({n} vs {len(next(iter(cb.values())))})")
    if kind == "perplexity":
        ci, p = paired_bootstrap(_ppl, ca, cb, name, n_boot)
        test = "paired bootstrap"
    elif kind == "token_ratio":
        ci, p = paired_bootstrap(_ratio("correct_tokens", "tokens"), ca, cb, name, n_boot)
        test = "paired bootstrap"
    else:
        ci, _p = paired_bootstrap(_mean("x"), ca, cb, name, n_boot)
        if kind == "binary":
            p, test = mcnemar_exact(ca["x"], cb["x"]), "exact McNemar"
        else:
            p, test = _p, "paired bootstrap"
    return {"metric": metric, "a": va, "b": vb, "diff": va - vb, "ci95": ci, "p_value": p, "test": test,
            "n": n, "significant": p < 0.05}
