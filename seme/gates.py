"""Validation gate: a policy YAML turned into a Great Expectations (Core 1.x) suite over the metrics.

Input is a *metrics bundle* (JSON, see ``seme/policies/default_gate.yaml`` for the full shape):
``{"merged": <metrics>, "parents": {"base": <metrics>, "<expert>": <metrics>}, "experts": {"<task>":
"<expert>"}, "model_dir": "..."}``, each ``<metrics>`` being the JSON of ``seme eval``.

The bundle becomes a table with one row per check (an expert's task, a general metric, or a task
the merged model reports without a specialist); the policy becomes expectations on that table:

- every expected task is present (``expect_column_distinct_values_to_contain_set``),
- on each expert's task, merged / expert >= r (or <= 1/r for lower-is-better metrics); against a
  negative reference (signed metrics such as log-probabilities) the "ratio" is the change relative
  to its magnitude, 1 + (merged - ref) / |ref|, so a ratio of two negatives never passes a worse model,
- each general metric, merged / base <= 1 + p (lower is better) or >= 1 - d (higher is better),
- every value used is present and finite (``expect_column_values_to_not_be_null`` / ``_be_between``),
- optionally, weight checks on the merged checkpoint (a second table: one row per tensor).

The result records which checkpoint it judged (``model``: path and :func:`checkpoint_digest`), and
``seme register`` refuses a result that does not name the checkpoint being registered
(:func:`verify_gate_binding`). Policies carry a ``version`` (only 1 exists; others are refused) and
are type-checked (``tasks: arithmetic`` is an error, not five one-letter tasks).

Each expectation carries a ``meta.check`` id and a human sentence, so the Markdown summary can name
every failed expectation with the numbers behind it. The GX validation results are kept verbatim
(non-finite numbers as strings) in ``gate_result.json``.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seme.errors import ConfigError

log = logging.getLogger(__name__)

DEFAULT_POLICY = Path(__file__).parent / "policies" / "default_gate.yaml"
RESULT_FILE = "gate_result.json"
SUMMARY_FILE = "gate_summary.md"
_BIG = 1e300  # "finite" bound: GX between() with ±1e300 rejects ±inf
POLICY_VERSIONS = (1,)  # policy file versions this code understands; any other is refused


@dataclass
class GateResult:
    """The verdict, each check (id, passed, sentence), the GX results and where they were written."""

    passed: bool
    checks: list[dict[str, Any]]
    gx: list[dict[str, Any]]
    policy: dict[str, Any]
    summary: str
    result_path: Path | None = None
    summary_path: Path | None = None
    failures: list[str] = field(default_factory=list)
    model: dict[str, Any] | None = None  # {"path", "digest"} of the checkpoint judged (see checkpoint_digest)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "model": self.model,
            "verdict": "passed" if self.passed else "failed",
            "failures": self.failures,
            "checks": self.checks,
            "policy": self.policy,
            "great_expectations": self.gx,
        }


# ------------------------------------------------------------------------------------------------
# Policy and bundle
# ------------------------------------------------------------------------------------------------


def load_policy(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """Read and validate a gate policy (default: ``seme/policies/default_gate.yaml``)."""
    import yaml

    p = Path(path) if path is not None else DEFAULT_POLICY
    try:
        raw = yaml.safe_load(p.read_text(encoding="utf-8"))
    except OSError as e:
        raise ConfigError(f"cannot read gate policy {p}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"gate policy {p} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"gate policy {p} is not valid YAML: {' '.join(str(e).split())[:300]}") from None
    except RecursionError:
        raise ConfigError(f"gate policy {p}: nested too deeply") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"gate policy {p}: expected a mapping at the top level")
    known = {
        "version",
        "tasks",
        "expert_retention",
        "general",
        "lower_is_better",
        "require_finite",
        "weights",
        "expert_significance",
    }
    unknown = sorted(set(raw) - known)
    if unknown:
        raise ConfigError(
            f"gate policy {p}: unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})"
        )
    version = raw.get("version", 1)
    if isinstance(version, bool) or version not in POLICY_VERSIONS:
        raise ConfigError(
            f"gate policy {p}: version {version!r:.40} is not supported by this seme "
            f"(supported: {', '.join(map(str, POLICY_VERSIONS))})"
        )
    er = _mapping(raw, "expert_retention", p)
    _mapping(er, "per_task", p, "expert_retention.")
    _mapping(raw, "general", p)
    _mapping(raw, "weights", p)
    for key in ("tasks", "lower_is_better"):
        _str_list(raw, key, p)
    for key in ("require_finite",):
        if key in raw and not isinstance(raw[key], bool):
            raise ConfigError(f"gate policy {p}: {key} must be true or false, got {raw[key]!r:.40}")
    pol = {
        "version": version,
        "tasks": [str(t) for t in (raw.get("tasks") or [])],
        # 0: no retention floor (only presence and finiteness are checked)
        "min_ratio": _num(er.get("min_ratio", 0.9), p, "expert_retention.min_ratio", lo=0.0, hi=1.0),
        "per_task": {
            str(k): _num(v, p, f"expert_retention.per_task.{k}", lo=0.0, hi=1.0)
            for k, v in (er.get("per_task") or {}).items()
        },
        "general": {},
        "lower_is_better": [str(m).lower() for m in (raw.get("lower_is_better") or [])],
        "require_finite": bool(raw.get("require_finite", True)),
        "weights": {"finite": False, "max_abs": None},
    }
    for name, spec in (raw.get("general") or {}).items():
        spec = spec or {}
        if not isinstance(spec, dict) or not ({"max_increase", "max_decrease"} & set(spec)):
            raise ConfigError(f"gate policy {p}: general.{name} needs max_increase (or max_decrease)")
        if not isinstance(spec.get("required", True), bool):
            raise ConfigError(f"gate policy {p}: general.{name}.required must be true or false")
        g: dict[str, Any] = {"required": spec.get("required", True)}
        if "max_increase" in spec:
            g["max_increase"] = _num(spec["max_increase"], p, f"general.{name}.max_increase", lo=0.0)
        if "max_decrease" in spec:
            g["max_decrease"] = _num(spec["max_decrease"], p, f"general.{name}.max_decrease", lo=0.0, hi=1.0)
        pol["general"][str(name)] = g
    w = raw.get("weights") or {}
    unknown_w = sorted(set(w) - {"finite", "max_abs"})
    if unknown_w:
        raise ConfigError(
            f"gate policy {p}: unknown weight check(s) {', '.join(unknown_w)} (known: finite, max_abs)"
        )
    if not isinstance(w.get("finite", False), bool):
        raise ConfigError(f"gate policy {p}: weights.finite must be true or false")
    pol["weights"]["finite"] = w.get("finite", False)
    if w.get("max_abs") is not None:
        pol["weights"]["max_abs"] = _num(w["max_abs"], p, "weights.max_abs", lo=0.0, lo_open=True)
    pol["expert_significance"] = _significance_policy(raw.get("expert_significance"), p)
    pol["source"] = str(p)
    pol["sha256"] = hashlib.sha256(p.read_bytes()).hexdigest()
    return pol


# ------------------------------------------------------------------------------------------------
# "Not significantly worse than the expert" (paired, per item)
# ------------------------------------------------------------------------------------------------


def _significance_policy(spec: Any, p: Path) -> dict[str, Any] | None:
    """``expert_significance: {alpha: 0.05}`` (or ``true``): None when the policy does not ask for it."""
    if spec in (None, False):
        return None
    spec = {} if spec is True else spec
    if not isinstance(spec, dict) or set(spec) - {"alpha", "tasks"}:
        raise ConfigError(f"gate policy {p}: expert_significance takes alpha (and optionally tasks)")
    alpha = _num(spec.get("alpha", 0.05), p, "expert_significance.alpha", lo=0.0, hi=0.5, lo_open=True)
    tasks = spec.get("tasks")
    return {"alpha": alpha, "tasks": None if tasks is None else [str(t) for t in tasks]}


def significance_rows(bundle: dict[str, Any], policy: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per expert task: the paired comparison merged − expert on the same items.

    ``worse`` is 1 when the merged model is worse (in the metric's direction) with p < alpha, 0 when
    not, and NaN when the two results cannot be paired (no per-item results, different items), which
    fails the check: "not significantly worse" has to be shown, not assumed.
    """
    from seme.evaluation.stats import compare_entries

    sig = policy.get("expert_significance")
    if not sig:
        return []
    lower = set(policy["lower_is_better"])
    parents = bundle.get("parents") or {}
    rows = []
    for task, expert in sorted((bundle.get("experts") or {}).items()):
        if sig["tasks"] is not None and task not in sig["tasks"]:
            continue
        m = (bundle["merged"].get("tasks") or {}).get(task)
        e = (parents.get(expert, {}).get("tasks") or {}).get(task)
        row = {"check": f"significance:{task}", "task": task, "expert": expert, "alpha": sig["alpha"],
               "diff": math.nan, "p_value": math.nan, "worse": math.nan, "reason": ""}
        if not isinstance(m, dict) or not isinstance(e, dict):
            row["reason"] = "task missing from the merged or the expert's metrics"
        else:
            try:
                c = compare_entries(m, e, f"gate:{task}")
            except (KeyError, ValueError, TypeError, ZeroDivisionError) as err:
                row["reason"] = "no per-item results" if isinstance(err, KeyError) else str(err)
            else:
                bad = c["diff"] > 0 if str(m.get("metric", "")).lower() in lower else c["diff"] < 0
                row.update(metric=c["metric"], diff=c["diff"], p_value=c["p_value"], test=c["test"],
                           ci95=c["ci95"], worse=float(bad and c["p_value"] < sig["alpha"]))
        rows.append(row)
    return rows


def significance_expectations(rows: list[dict[str, Any]]) -> list[tuple[str, str, Any]]:
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    out = []
    for r in rows:
        cond = Column("check") == r["check"]
        sent = (f"merged is not significantly worse than expert '{r['expert']}' on '{r['task']}' "
                f"(paired test, alpha {_fmt(r['alpha'])})")
        out.append((r["check"], sent, gxe.ExpectColumnValuesToBeBetween(column="worse", min_value=0, max_value=0,
                                                                         row_condition=cond)))
        out.append((f"{r['check']}:defined", f"per-item results of merged and expert pair up on '{r['task']}'",
                    gxe.ExpectColumnValuesToNotBeNull(column="worse", row_condition=cond)))
    return out


def _mapping(raw: dict[str, Any], key: str, p: Path, prefix: str = "") -> dict[str, Any]:
    """``raw[key]`` as a mapping ({} when absent or null); anything else is a ConfigError."""
    v = raw.get(key)
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"gate policy {p}: {prefix}{key} must be a mapping, got {type(v).__name__} {v!r:.40}")
    return v


def _str_list(raw: dict[str, Any], key: str, p: Path) -> None:
    """``raw[key]`` must be a list of names (a bare string would be read letter by letter)."""
    v = raw.get(key)
    if v is None:
        return
    if not isinstance(v, list) or not all(isinstance(t, str) and t for t in v):
        raise ConfigError(
            f"gate policy {p}: {key} must be a list of names, e.g. [{key}_a, {key}_b], got {v!r:.60}"
        )


def _num(
    v: Any, p: Path, key: str, lo: float | None = None, hi: float | None = None, lo_open: bool = False
) -> float:
    if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
        raise ConfigError(f"gate policy {p}: {key} must be a number, got {v!r}")
    if (lo is not None and (v < lo or (lo_open and v == lo))) or (hi is not None and v > hi):
        rng = f"{'(' if lo_open else '['}{lo}, {hi if hi is not None else 'inf'}]"
        raise ConfigError(f"gate policy {p}: {key} = {v} is outside {rng}")
    return float(v)


def load_bundle(path_or_dict: str | os.PathLike | dict[str, Any]) -> tuple[dict[str, Any], str]:
    """Read and check the shape of a metrics bundle; returns (bundle, where) for messages."""
    if isinstance(path_or_dict, dict):
        b, where = path_or_dict, "metrics bundle"
    else:
        where = str(path_or_dict)
        try:
            b = json.loads(Path(path_or_dict).read_text())
        except OSError as e:
            raise ConfigError(f"cannot read metrics bundle {where}: {e.strerror}") from None
        except ValueError as e:
            raise ConfigError(f"metrics bundle {where} is not valid JSON: {str(e)[:200]}") from None
        except RecursionError:
            raise ConfigError(f"metrics bundle {where}: nested too deeply") from None
    if not isinstance(b, dict) or not isinstance(b.get("merged"), dict):
        raise ConfigError(
            f"metrics bundle {where}: needs a 'merged' metrics object (see seme/policies/default_gate.yaml)"
        )
    parents = b.get("parents") or {}
    experts = b.get("experts") or {}
    if not isinstance(parents, dict) or not all(isinstance(v, dict) for v in parents.values()):
        raise ConfigError(f"metrics bundle {where}: 'parents' must map a name to a metrics object")
    if not isinstance(experts, dict):
        raise ConfigError(f"metrics bundle {where}: 'experts' must map a task to an expert name")
    if not isinstance(b.get("base", "base"), str) or not isinstance(b.get("model_dir", ""), str | None):
        raise ConfigError(f"metrics bundle {where}: 'base' and 'model_dir' must be strings")
    for task, name in experts.items():
        if not isinstance(name, str):
            raise ConfigError(f"metrics bundle {where}: expert of task {task!r} must be a name, got {name!r:.40}")
        if name not in parents:
            raise ConfigError(
                f"metrics bundle {where}: expert {name!r} of task {task!r} has no metrics in 'parents'"
            )
    for name, m in [("merged", b["merged"]), *parents.items()]:
        if not isinstance(m.get("tasks", {}), dict) or not isinstance(m.get("general", {}), dict):
            raise ConfigError(
                f"metrics bundle {where}: metrics of {name!r} need 'tasks' and 'general' objects"
            )
    return b, where


def make_bundle(
    merged: dict[str, Any],
    parents: dict[str, dict[str, Any]],
    experts: dict[str, str],
    model_dir: str | None = None,
    base: str = "base",
) -> dict[str, Any]:
    """Assemble a metrics bundle from metrics dicts (what the pipeline's gate step writes)."""
    b: dict[str, Any] = {"merged": merged, "parents": parents, "experts": experts, "base": base}
    if model_dir:
        b["model_dir"] = str(model_dir)
    return b


def _value(entry: Any) -> float:
    """A metric value from ``{"value": x}`` or a bare number; NaN when missing or not a number."""
    v = entry.get("value") if isinstance(entry, dict) else entry
    if isinstance(v, bool) or not isinstance(v, int | float | str):
        return math.nan
    try:
        return float(v)  # "NaN"/"inf" strings from JSON writers that avoid bare NaN
    except ValueError:
        return math.nan


def _metric_name(entry: Any, default: str) -> str:
    return str(entry.get("metric", default)) if isinstance(entry, dict) else default


def _general_entries(m: dict[str, Any], key: str) -> dict[str, Any]:
    """General entries matched by policy key ``key``: by entry name, or by its ``metric`` field."""
    gen = m.get("general") or {}
    if key in gen:
        return {key: gen[key]}
    return {n: e for n, e in gen.items() if _metric_name(e, n).lower() == key.lower()}


# ------------------------------------------------------------------------------------------------
# Tables
# ------------------------------------------------------------------------------------------------


def build_table(bundle: dict[str, Any], policy: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per check: kind (expert | general | info), task, metric, merged, reference, ratio, bounds."""
    merged = bundle["merged"]
    parents = bundle.get("parents") or {}
    experts = bundle.get("experts") or {}
    base_name = bundle.get("base", "base")
    base = parents.get(base_name)
    lower = set(policy["lower_is_better"])
    rows: list[dict[str, Any]] = []

    def row(
        kind: str, check: str, task: str, metric: str, m: float, ref: float, ref_model: str, lo: Any, hi: Any
    ):
        if math.isnan(m) or math.isnan(ref):
            ratio = math.nan  # fails the not-null checks, which name the missing value
        elif ref == 0.0:
            ratio = 1.0 if m == 0.0 else math.copysign(math.inf, m)
        elif ref > 0.0:
            ratio = m / ref
        else:  # signed metric (log-prob...): the change relative to |reference|, so -9 vs -1 is -7, not 9
            ratio = 1.0 + (m - ref) / abs(ref)
        rows.append(
            {"check": check, "kind": kind, "task": task, "metric": metric, "higher_is_better": metric.lower() not in lower,
             "merged": m, "reference": ref, "reference_model": ref_model, "ratio": ratio, "min_ratio": lo, "max_ratio": hi}
        )  # fmt: skip

    tasks = merged.get("tasks") or {}
    for task in sorted(tasks):
        entry = tasks[task]
        metric = _metric_name(entry, "value")
        if task in experts:
            name = experts[task]
            ref = _value((parents[name].get("tasks") or {}).get(task))
            r = policy["per_task"].get(task, policy["min_ratio"])
            lo, hi = (r, None) if metric.lower() not in lower else (None, 1.0 / r if r else None)
            lo = lo or None  # min_ratio 0: no ratio check for this task
            row("expert", f"expert:{task}", task, metric, _value(entry), ref, name, lo, hi)
        else:
            ref = _value((base.get("tasks") or {}).get(task)) if base else math.nan
            row(
                "info",
                f"info:{task}",
                task,
                metric,
                _value(entry),
                ref,
                base_name if base else "",
                None,
                None,
            )
    for key, g in sorted(policy["general"].items()):
        found = _general_entries(merged, key)
        if not found and g["required"]:  # a row that fails the not-null check, named after the key
            row("general", f"general:{key}", f"general:{key}", key, math.nan, math.nan, base_name, None, None)
        for name, entry in sorted(found.items()):
            metric = _metric_name(entry, name)
            ref_entry = (base.get("general") or {}).get(name) if base else None
            ref = _value(ref_entry)
            if metric.lower() in lower:
                lo, hi = None, 1.0 + g.get("max_increase", 0.0)
            else:
                lo, hi = 1.0 - g.get("max_decrease", 0.0), None
            row(
                "general", f"general:{name}", f"general:{name}", metric, _value(entry), ref, base_name, lo, hi
            )
    return rows


def weight_table(model_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """One row per tensor of the merged checkpoint: non-finite count and max |w| (streamed, one at a time)."""
    import torch

    from seme.checkpoint import open_checkpoint

    ck = open_checkpoint(str(model_dir))
    rows = []
    try:
        for name in ck.names:
            t = ck.get(name)
            if t.is_floating_point():
                finite = torch.isfinite(t)
                bad = int((~finite).sum())
                mx = float(t[finite].abs().max()) if bool(finite.any()) else math.nan
            else:
                bad, mx = 0, float(t.abs().max()) if t.numel() else 0.0
            rows.append({"tensor": name, "file": ck.file_of(name).name, "nonfinite": bad, "max_abs": mx})
            del t
    finally:
        ck.close()
    return rows


# ------------------------------------------------------------------------------------------------
# Great Expectations
# ------------------------------------------------------------------------------------------------


def _fmt(x: Any) -> str:
    if isinstance(x, float):
        return f"{x:.4g}" if math.isfinite(x) else str(x)
    return str(x)


def build_expectations(
    rows: list[dict[str, Any]], policy: dict[str, Any], bundle: dict[str, Any]
) -> list[tuple[str, str, Any]]:
    """(check id, sentence, GX expectation) for the metrics table."""
    import great_expectations.expectations as gxe
    from great_expectations.expectations.row_conditions import Column

    out: list[tuple[str, str, Any]] = []
    expected = sorted(set(policy["tasks"]) | set(bundle.get("experts") or {}))
    for task in expected:
        out.append(
            (f"present:{task}", f"the merged model reports task '{task}'",
             gxe.ExpectColumnDistinctValuesToContainSet(column="task", value_set=[task]))
        )  # fmt: skip
    for r in rows:
        if r["kind"] == "info":
            continue
        cond = Column("check") == r["check"]
        if r["kind"] == "expert":
            what = f"merged {r['metric']} on '{r['task']}' vs expert '{r['reference_model']}'"
        else:
            what = f"merged general {r['metric']} ({r['task'].split(':', 1)[1]}) vs base '{r['reference_model']}'"
        if r["min_ratio"] is not None:
            sent = f"{what}: ratio >= {_fmt(r['min_ratio'])}"
            e = gxe.ExpectColumnValuesToBeBetween(
                column="ratio", min_value=r["min_ratio"], row_condition=cond
            )
        elif r["max_ratio"] is not None:
            sent = f"{what}: ratio <= {_fmt(r['max_ratio'])}"
            e = gxe.ExpectColumnValuesToBeBetween(
                column="ratio", max_value=r["max_ratio"], row_condition=cond
            )
        else:
            continue
        out.append((r["check"], sent, e))
    checked = Column("kind") != "info"
    for col in ("merged", "reference"):  # a check without its numbers cannot pass
        out.append(
            (f"not_null:{col}", f"no missing {col} value in any check",
             gxe.ExpectColumnValuesToNotBeNull(column=col, row_condition=checked))
        )  # fmt: skip
        if policy["require_finite"]:
            out.append(
                (f"finite:{col}", f"no infinite {col} value in any check",
                 gxe.ExpectColumnValuesToBeBetween(column=col, min_value=-_BIG, max_value=_BIG, row_condition=checked))
            )  # fmt: skip
    return out


def weight_expectations(policy: dict[str, Any]) -> list[tuple[str, str, Any]]:
    import great_expectations.expectations as gxe

    out: list[tuple[str, str, Any]] = []
    if policy["weights"]["finite"]:
        out.append(("weights:finite", "no NaN/Inf in any tensor of the merged checkpoint",
                    gxe.ExpectColumnValuesToBeBetween(column="nonfinite", max_value=0)))  # fmt: skip
    if policy["weights"]["max_abs"] is not None:
        m = policy["weights"]["max_abs"]
        out.append(("weights:max_abs", f"every tensor has max |w| <= {_fmt(m)}",
                    gxe.ExpectColumnValuesToBeBetween(column="max_abs", max_value=m)))  # fmt: skip
        out.append(("weights:max_abs_defined", "every tensor has at least one finite value",
                    gxe.ExpectColumnValuesToNotBeNull(column="max_abs")))  # fmt: skip
    return out


def _validate(ctx: Any, name: str, rows: list[dict[str, Any]], exps: list[tuple[str, str, Any]], index: str):
    """Run one suite over one DataFrame; returns the GX result (CheckpointResult-free, plain validation)."""
    import great_expectations as gx
    import pandas as pd

    df = pd.DataFrame(rows)
    asset = ctx.data_sources.add_pandas(f"seme_{name}").add_dataframe_asset(name)
    batch = asset.add_batch_definition_whole_dataframe("all")
    suite = ctx.suites.add(gx.ExpectationSuite(name=f"seme_gate_{name}"))
    for check, sentence, e in exps:
        e.meta = {"check": check, "description": sentence}
        suite.add_expectation(e)
    vd = ctx.validation_definitions.add(
        gx.ValidationDefinition(name=f"seme_gate_{name}", data=batch, suite=suite)
    )
    return vd.run(
        batch_parameters={"dataframe": df},
        result_format={"result_format": "COMPLETE", "unexpected_index_column_names": [index]},
    )


def _gx_context() -> Any:
    os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")  # no network calls from the gate
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    if not log.isEnabledFor(logging.DEBUG):  # GX sets its loggers to INFO ("Created temporary directory")
        for name in ("great_expectations", "great_expectations.data_context.types.base"):
            logging.getLogger(name).setLevel(logging.WARNING)

    ctx = gx.get_context(mode="ephemeral")
    ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
    return ctx


def _jsonable(x: Any) -> Any:
    """Strict JSON: non-finite floats become strings ('NaN', 'Infinity')."""
    if isinstance(x, float) and not math.isfinite(x):
        return "NaN" if math.isnan(x) else ("Infinity" if x > 0 else "-Infinity")
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    return x


def _explain(check: str, rows_by_check: dict[str, dict[str, Any]], res: dict[str, Any], tensors: bool) -> str:
    """The numbers behind a failed expectation, in words."""
    r = rows_by_check.get(check)
    if check.startswith("present:"):
        reported = sorted(x["task"] for x in rows_by_check.values() if x["kind"] != "general")
        return f"task missing from the merged metrics (reported: {', '.join(reported) or 'none'})"
    if r is not None:
        return (f"merged {_fmt(r['merged'])}, {r['reference_model'] or 'reference'} {_fmt(r['reference'])}, "
                f"ratio {_fmt(r['ratio'])}")  # fmt: skip
    idx = res.get("unexpected_index_list") or res.get("partial_unexpected_index_list") or []
    names = [i.get("tensor" if tensors else "check") if isinstance(i, dict) else str(i) for i in idx]
    vals = res.get("partial_unexpected_list") or []
    if names:
        shown = ", ".join(f"{n} ({_fmt(v)})" for n, v in zip(names[:8], vals[:8], strict=False))
        more = f" and {len(names) - 8} more" if len(names) > 8 else ""
        return f"offending {'tensors' if tensors else 'checks'}: {shown}{more}"
    return f"{res.get('unexpected_count', '?')} unexpected value(s)"


def run_gate(
    bundle_path: str | os.PathLike | dict[str, Any],
    policy_path: str | os.PathLike | None = None,
    out_dir: str | os.PathLike | None = None,
    *,
    model_dir: str | os.PathLike | None = None,
) -> GateResult:
    """Validate a metrics bundle against a policy; write ``gate_result.json`` and ``gate_summary.md``."""
    policy = load_policy(policy_path)
    bundle, where = load_bundle(bundle_path)
    md = model_dir or bundle.get("model_dir")
    judged = None  # the checkpoint this verdict is about (register refuses a result without it)
    if model_dir is not None or (md and (is_s3(md) or Path(md).is_dir())):
        judged = {"path": str(md), "digest": checkpoint_digest(md)}
    rows = build_table(bundle, policy)
    ctx = _gx_context()
    results = [
        ("metrics", _validate(ctx, "metrics", rows, build_expectations(rows, policy, bundle), "check"))
    ]

    srows = significance_rows(bundle, policy)
    if srows:
        results.append(("significance", _validate(ctx, "significance", srows,
                                                  significance_expectations(srows), "check")))
    wexps = weight_expectations(policy)
    if wexps:
        md = model_dir or bundle.get("model_dir")
        if not md:
            raise ConfigError(
                f"gate policy {policy['source']} asks for weight checks but {where} has no 'model_dir' (or pass --model-dir)"
            )
        wrows = weight_table(md)
        results.append(("weights", _validate(ctx, "weights", wrows, wexps, "tensor")))

    rows_by_check = {r["check"]: r for r in rows}
    sig_by_check = {r["check"]: r for r in srows}
    checks: list[dict[str, Any]] = []
    gx_json: list[dict[str, Any]] = []
    for name, res in results:
        gx_json.append(_jsonable(res.to_json_dict()))
        for er in res.results:
            meta = er.expectation_config.meta or {}
            check = meta.get("check", er.expectation_config.type)
            ok = bool(er.success)
            item = {
                "check": check,
                "suite": f"seme_gate_{name}",
                "expectation": er.expectation_config.type,
                "description": meta.get("description", ""),
                "passed": ok,
            }
            if not ok and name == "significance":
                r = sig_by_check.get(check.removesuffix(":defined"), {})
                item["detail"] = r.get("reason") or (
                    f"merged − expert = {_fmt(r.get('diff'))} (95% CI {[round(x, 4) for x in r.get('ci95', [])]}), "
                    f"p = {_fmt(r.get('p_value'))} by {r.get('test')}")
            elif not ok:
                item["detail"] = _explain(check, rows_by_check, er.result or {}, tensors=name == "weights")
                if er.exception_info and er.exception_info.get("raised_exception"):
                    item["detail"] = f"expectation raised: {er.exception_info.get('exception_message')}"
            checks.append(item)
    failures = [f"{c['check']}: {c['description']} — {c['detail']}" for c in checks if not c["passed"]]
    passed = not failures and all(bool(res.success) for _, res in results)
    summary = _summary(passed, checks, rows, policy, where)
    gate = GateResult(passed, checks, gx_json, policy, summary, failures=failures, model=judged)
    if out_dir is not None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        doc = {**gate.to_dict(), "table": _jsonable(rows), "bundle": where}
        if srows:
            doc["significance"] = _jsonable(srows)
        gate.result_path = _write_atomic(
            out / RESULT_FILE, json.dumps(_jsonable(doc), indent=2, allow_nan=False) + "\n"
        )
        gate.summary_path = _write_atomic(out / SUMMARY_FILE, summary)
    log.info("gate %s (%d checks, %d failed)", "passed" if passed else "failed", len(checks), len(failures))
    return gate


def is_s3(path: str | os.PathLike) -> bool:
    return str(path).startswith("s3://")


def checkpoint_digest(model_dir: str | os.PathLike) -> str:
    """The identity of a checkpoint that a gate result is bound to: ``sha256:<hex>`` of its
    ``seme_manifest.json`` (which lists every file's sha256), or, for a directory without one, of
    the sorted ``"<sha256>  <path>"`` lines of its files. Cheap for seme outputs (one small file)."""
    from seme.fsutil import sha256_file

    if is_s3(model_dir):
        from seme.storage import get_manifest_bytes

        raw = get_manifest_bytes(str(model_dir))
        if raw is None:
            raise ConfigError(f"{model_dir}: no seme_manifest.json under this prefix; cannot identify the model")
        return "sha256:" + hashlib.sha256(raw).hexdigest()
    d = Path(model_dir)
    if not d.is_dir():
        raise ConfigError(f"{d}: no such model directory")
    if (d / "seme_manifest.json").is_file():
        return "sha256:" + sha256_file(d / "seme_manifest.json")
    skip = {RESULT_FILE, SUMMARY_FILE, ".seme_fetch.json"}
    lines = [
        f"{sha256_file(f)}  {f.relative_to(d).as_posix()}\n"
        for f in sorted(d.rglob("*"))
        if f.is_file() and f.name not in skip
    ]
    return "sha256:" + hashlib.sha256("".join(lines).encode()).hexdigest()


def verify_gate_binding(gate: str | os.PathLike | dict[str, Any], model_dir: str | os.PathLike) -> dict[str, Any]:
    """The gate result ``gate`` (a gate_result.json path or its dict), checked to be the verdict on
    ``model_dir``: it must record the digest of the checkpoint it judged, equal to ``model_dir``'s.
    Raises RegistryError (nothing registered, no alias moved) otherwise."""
    from seme.errors import RegistryError, SemeError

    where = "gate result" if isinstance(gate, dict) else str(gate)
    if isinstance(gate, dict):
        doc = gate
    else:
        try:
            doc = json.loads(Path(gate).read_text(encoding="utf-8"))
        except OSError as e:
            raise RegistryError(f"cannot read gate result {gate}: {e.strerror}") from None
        except (ValueError, RecursionError):
            raise RegistryError(f"gate result {gate} is not valid JSON") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("passed"), bool):
        raise RegistryError(f"{where}: not a gate result of `seme gate` (no boolean 'passed')")
    judged = doc.get("model")
    digest = judged.get("digest") if isinstance(judged, dict) else None
    if not isinstance(digest, str) or not digest.startswith("sha256:"):
        raise RegistryError(
            f"{where}: the gate result does not record which checkpoint it judged (no model digest); "
            f"run `seme gate ... --model-dir {model_dir}` again; refusing to register"
        )
    try:
        actual = checkpoint_digest(model_dir)
    except SemeError as e:
        raise RegistryError(f"cannot identify {model_dir} to check {where}: {e}") from None
    if actual != digest:
        raise RegistryError(
            f"{where} judged another checkpoint ({judged.get('path')}, {digest[:19]}…), not {model_dir} "
            f"({actual[:19]}…); refusing to register"
        )
    return doc


def _write_atomic(path: Path, text: str) -> Path:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    tmp.replace(path)
    return path


def _summary(
    passed: bool, checks: list[dict[str, Any]], rows: list[dict[str, Any]], policy: dict, where: str
) -> str:
    n_fail = sum(not c["passed"] for c in checks)
    lines = [
        f"# Validation gate: {'PASSED' if passed else 'FAILED'}",
        "",
        (
            f"{len(checks) - n_fail} of {len(checks)} expectations passed. Metrics: `{where}`; "
            f"policy: `{policy['source']}` (sha256 {policy['sha256'][:12]})."
        ),
        "",
    ]
    if n_fail:
        lines += ["## Failed expectations", ""]
        for c in checks:
            if not c["passed"]:
                lines.append(f"- **{c['check']}** (`{c['expectation']}`): {c['description']} — {c['detail']}")
        lines.append("")
    lines += [
        "## Metrics checked",
        "",
        "| check | metric | merged | reference | ratio | bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        bound = (f">= {_fmt(r['min_ratio'])}" if r["min_ratio"] is not None
                 else f"<= {_fmt(r['max_ratio'])}" if r["max_ratio"] is not None else "(info)")  # fmt: skip
        ref = (
            f"{_fmt(r['reference'])} ({r['reference_model']})"
            if r["reference_model"]
            else _fmt(r["reference"])
        )
        lines.append(
            f"| {r['check']} | {r['metric']} | {_fmt(r['merged'])} | {ref} | {_fmt(r['ratio'])} | {bound} |"
        )
    return "\n".join(lines) + "\n"
