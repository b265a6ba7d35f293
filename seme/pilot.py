"""The pilot period: serving evidence that must show the pilot is not worse before it takes production.

``seme pilot record NAME --metrics FILE`` logs what serving measured for the pilot version and for
production over the same period: per metric ``{value, n}`` for each arm (a rate or proportion in
[0, 1]; or a mean with ``std``). The record goes to the pilot version's MLflow run (metrics
``pilot/<m>/value|n``, ``production/<m>/value|n``, one step per record, and the file as an artifact)
and the latest one to the version tag ``seme.pilot.evidence``.

The promotion policy (YAML, like the gate's; default ``seme/policies/promotion.yaml``):

    min_duration: 7d        # the evidence period must cover at least this (s, m, h, d; or seconds)
    min_n: 1000             # per arm and metric
    alpha: 0.05             # one-sided test level: "pilot significantly worse than production"
    metrics:                # the metrics that must not be significantly worse (empty: every recorded one)
      task_success: {higher_is_better: true}
      error_rate: {higher_is_better: false, min_n: 5000}

:func:`decide` returns ``promote``, ``wait`` (with every reason) or ``reject``. Samples are checked
first (a test on too few samples is not trusted), then the one-sided two-sample test per metric
(pooled two-proportion z-test; Welch's z-test on means when ``std`` is given), reported with its
p-value; a significantly worse pilot is rejected even before its duration is up (harm stops early);
otherwise the duration must be covered. :func:`promote` acts on it: ``promote`` moves production
(``seme.registry.promote``), ``wait`` moves nothing, ``reject`` removes the ``pilot`` alias and tags
the version ``seme.pilot = rejected`` while production stays where it is.

The clock is injectable (``now``; the CLI reads ``$SEME_NOW``, ISO 8601, for replays and tests) and
is recorded in the evidence (``recorded``), so durations are testable without sleeping.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from seme import registry
from seme.errors import ConfigError, RegistryError

log = logging.getLogger(__name__)

TAG_EVIDENCE, TAG_RECORDS, TAG_PILOT = "seme.pilot.evidence", "seme.pilot.records", "seme.pilot"
TAG_REASON = "seme.pilot.reason"
DEFAULT_POLICY = Path(__file__).parent / "policies" / "promotion.yaml"
ARMS = ("pilot", "production")
_SKEW = timedelta(seconds=60)


class NotYet(RegistryError):
    """Promotion refused for now: the pilot evidence does not suffice yet."""


class Rejected(RegistryError):
    """The pilot was significantly worse than production and lost its alias."""


# ------------------------------------------------------------------------------------------------
# Clock, durations, files
# ------------------------------------------------------------------------------------------------


def now_utc(now: datetime | None = None) -> datetime:
    """``now``, else ``$SEME_NOW`` (ISO 8601), else the system clock; always timezone-aware UTC."""
    if now is None and os.environ.get("SEME_NOW"):
        now = parse_time(os.environ["SEME_NOW"], "$SEME_NOW")
    now = now or datetime.now(UTC)
    return now if now.tzinfo else now.replace(tzinfo=UTC)


def parse_time(text: Any, where: str) -> datetime:
    try:
        t = datetime.fromisoformat(str(text))
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not an ISO 8601 time") from None
    return t if t.tzinfo else t.replace(tzinfo=UTC)


def parse_duration(v: Any, where: str) -> float:
    """Seconds from ``3600``, ``"90s"``, ``"30m"``, ``"12h"`` or ``"7d"``."""
    if isinstance(v, int | float) and not isinstance(v, bool) and v >= 0:
        return float(v)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd])\s*", str(v))
    if not m:
        raise ConfigError(f"{where}: {v!r} is not a duration (e.g. 3600, 90s, 30m, 12h, 7d)")
    return float(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


def _read_doc(path: str | os.PathLike, what: str) -> dict[str, Any]:
    import yaml

    p = Path(path)
    try:
        doc = yaml.safe_load(p.read_text())  # JSON is YAML
    except OSError as e:
        raise ConfigError(f"cannot read {what} {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{what} {p} is not valid YAML/JSON: {' '.join(str(e).split())[:200]}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{what} {p}: expected a mapping at the top level")
    return doc


def load_policy(path: str | os.PathLike | None = None) -> dict[str, Any]:
    """The promotion policy, validated: ``{min_duration_s, min_n, alpha, metrics: {m: {higher_is_better, min_n}}}``."""
    p = Path(path) if path else DEFAULT_POLICY
    doc = _read_doc(p, "promotion policy")
    unknown = set(doc) - {"min_duration", "min_n", "alpha", "metrics"}
    if unknown:
        raise ConfigError(f"promotion policy {p}: unknown key(s) {', '.join(sorted(unknown))}")
    min_n = doc.get("min_n", 1000)
    alpha = doc.get("alpha", 0.05)
    if not isinstance(min_n, int) or isinstance(min_n, bool) or min_n < 1:
        raise ConfigError(f"promotion policy {p}: min_n must be a positive integer, got {min_n!r}")
    if not isinstance(alpha, int | float) or not 0 < alpha < 1:
        raise ConfigError(f"promotion policy {p}: alpha must be in (0, 1), got {alpha!r}")
    metrics = {}
    for name, spec in (doc.get("metrics") or {}).items():
        spec = spec or {}
        if not isinstance(spec, dict) or set(spec) - {"higher_is_better", "min_n"}:
            raise ConfigError(f"promotion policy {p}: metrics.{name} takes higher_is_better and min_n")
        hib = spec.get("higher_is_better", True)
        if not isinstance(hib, bool):
            raise ConfigError(f"promotion policy {p}: metrics.{name}.higher_is_better must be true or false")
        metrics[str(name)] = {"higher_is_better": hib, "min_n": int(spec.get("min_n", min_n))}
    return {
        "path": str(p),
        "min_duration_s": parse_duration(
            doc.get("min_duration", "7d"), f"promotion policy {p}: min_duration"
        ),
        "min_n": min_n,
        "alpha": float(alpha),
        "metrics": metrics,
    }


def load_evidence(path: str | os.PathLike) -> dict[str, Any]:
    """A serving metrics file, validated: ``{period: {start, end}, metrics: {m: {pilot: {value, n[, std]},
    production: {...}[, higher_is_better]}}}``."""
    p = Path(path)
    doc = _read_doc(p, "pilot metrics")
    period = doc.get("period") or {}
    if not isinstance(period, dict) or "start" not in period or "end" not in period:
        raise ConfigError(f"pilot metrics {p}: needs period: {{start: ISO time, end: ISO time}}")
    start = parse_time(period["start"], f"pilot metrics {p}: period.start")
    end = parse_time(period["end"], f"pilot metrics {p}: period.end")
    if end <= start:
        raise ConfigError(f"pilot metrics {p}: period.end must be after period.start")
    metrics = doc.get("metrics")
    if not isinstance(metrics, dict) or not metrics:
        raise ConfigError(
            f"pilot metrics {p}: needs metrics: {{NAME: {{pilot: {{value, n}}, production: {{value, n}}}}}}"
        )
    out: dict[str, Any] = {}
    for name, m in metrics.items():
        where = f"pilot metrics {p}: metrics.{name}"
        if not isinstance(m, dict):
            raise ConfigError(f"{where}: expected a mapping with pilot and production")
        entry: dict[str, Any] = {}
        for arm in ARMS:
            a = m.get(arm)
            if not isinstance(a, dict) or "value" not in a or "n" not in a:
                raise ConfigError(f"{where}.{arm}: needs value and n")
            v, n = a["value"], a["n"]
            if not isinstance(v, int | float) or isinstance(v, bool) or not math.isfinite(v):
                raise ConfigError(f"{where}.{arm}.value: a finite number, got {v!r}")
            if not isinstance(n, int) or isinstance(n, bool) or n < 0:
                raise ConfigError(f"{where}.{arm}.n: a non-negative integer, got {n!r}")
            e = {"value": float(v), "n": n}
            if "std" in a:
                if not isinstance(a["std"], int | float) or a["std"] < 0:
                    raise ConfigError(f"{where}.{arm}.std: a non-negative number, got {a['std']!r}")
                e["std"] = float(a["std"])
            elif not 0.0 <= v <= 1.0:
                raise ConfigError(f"{where}.{arm}: a value outside [0, 1] is a mean and needs std")
            entry[arm] = e
        if "higher_is_better" in m:
            entry["higher_is_better"] = bool(m["higher_is_better"])
        out[str(name)] = entry
    return {"period": {"start": start.isoformat(), "end": end.isoformat()}, "metrics": out}


# ------------------------------------------------------------------------------------------------
# The test and the decision
# ------------------------------------------------------------------------------------------------


def worse_p_value(pilot: dict[str, Any], prod: dict[str, Any], higher_is_better: bool) -> float:
    """One-sided p-value of "the pilot is worse than production" being due to chance.

    Proportions: pooled two-proportion z-test; means (``std`` on both arms): Welch's z statistic.
    Small p: the pilot is significantly worse.
    """
    n1, n2 = pilot["n"], prod["n"]
    if n1 == 0 or n2 == 0:
        return 1.0
    diff = pilot["value"] - prod["value"]
    if not higher_is_better:
        diff = -diff
    if "std" in pilot and "std" in prod:
        se = math.sqrt(pilot["std"] ** 2 / n1 + prod["std"] ** 2 / n2)
    else:
        pooled = (pilot["value"] * n1 + prod["value"] * n2) / (n1 + n2)
        se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0 if diff < 0 else 1.0
    z = diff / se
    return 0.5 * math.erfc(-z / math.sqrt(2))  # Φ(z): small when the pilot is clearly lower


@dataclass
class Decision:
    action: str  # promote | wait | reject
    reasons: list[str] = field(default_factory=list)
    tests: dict[str, dict[str, Any]] = field(default_factory=dict)
    version: str | None = None
    production: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def decide(
    evidence: dict[str, Any] | None, policy: dict[str, Any], production: str | None = None
) -> Decision:
    """``promote`` / ``wait`` / ``reject`` for the latest evidence under ``policy`` (pure: no I/O)."""
    d = Decision("wait")
    if not evidence:
        d.reasons.append("no pilot evidence recorded yet (`seme pilot record NAME --metrics FILE`)")
        return d
    if production is not None and evidence.get("production_version") not in (None, production):
        d.reasons.append(
            f"the evidence compares against production version {evidence['production_version']}, "
            f"but production is now version {production}: record evidence against the current one"
        )
        return d
    metrics = evidence["metrics"]
    wanted = policy["metrics"] or {
        m: {"higher_is_better": e.get("higher_is_better", True), "min_n": policy["min_n"]}
        for m, e in metrics.items()
    }
    enough = True
    for m, spec in sorted(wanted.items()):
        if m not in metrics:
            d.reasons.append(f"metric {m!r} required by the policy was not recorded")
            enough = False
            continue
        e = metrics[m]
        for arm in ARMS:
            if e[arm]["n"] < spec["min_n"]:
                d.reasons.append(
                    f"{m}: {arm} has n = {e[arm]['n']}, the policy needs at least {spec['min_n']}"
                )
                enough = False
        p = worse_p_value(e["pilot"], e["production"], spec["higher_is_better"])
        worse = p < policy["alpha"]
        d.tests[m] = {
            "pilot": e["pilot"], "production": e["production"], "higher_is_better": spec["higher_is_better"],
            "test": "welch-z" if "std" in e["pilot"] and "std" in e["production"] else "two-proportion-z",
            "p_value": p, "alpha": policy["alpha"], "significantly_worse": worse,
        }  # fmt: skip
    if not enough:
        return d
    worse = [m for m, t in d.tests.items() if t["significantly_worse"]]
    if worse:
        d.action = "reject"
        d.reasons = [
            f"{m}: pilot {d.tests[m]['pilot']['value']:.4g} vs production {d.tests[m]['production']['value']:.4g} "
            f"is significantly worse (one-sided p = {d.tests[m]['p_value']:.3g} < {policy['alpha']})"
            for m in worse
        ]
        return d
    start, end = (
        parse_time(evidence["period"]["start"], "evidence"),
        parse_time(evidence["period"]["end"], "evidence"),
    )
    covered = (end - start).total_seconds()
    if covered < policy["min_duration_s"]:
        d.reasons.append(
            f"the pilot evidence covers {_human(covered)}; the policy needs at least {_human(policy['min_duration_s'])}"
        )
        return d
    d.action = "promote"
    d.reasons = [
        f"{m}: not significantly worse (p = {t['p_value']:.3g} ≥ {policy['alpha']})"
        for m, t in sorted(d.tests.items())
    ]
    return d


def _human(seconds: float) -> str:
    for unit, s in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= s:
            return f"{seconds / s:.1f} {unit}"
    return f"{seconds:.0f} s"


# ------------------------------------------------------------------------------------------------
# Registry side: record, status, promote
# ------------------------------------------------------------------------------------------------


def _pilot_version(c: Any, uri: str, name: str, version: str | None) -> Any:
    if version is None:
        al = registry.aliases(name, tracking_uri=uri)
        if registry.PILOT not in al:
            raise RegistryError(f"{name}: no version holds alias 'pilot' (pass --version)")
        version = al[registry.PILOT]
    return registry._call(f"read {name} version {version}", uri, c.get_model_version, name, str(version))


def record(
    name: str,
    metrics_file: str | os.PathLike,
    *,
    version: str | None = None,
    now: datetime | None = None,
    tracking_uri: str | None = None,
) -> dict[str, Any]:
    """Log one serving measurement of the pilot (default: the version holding ``pilot``) and production
    to the version's run and tag; returns the stored evidence."""
    from mlflow.entities import Metric

    uri = registry.resolve_tracking_uri(tracking_uri)
    c = registry.client(uri)
    ev = load_evidence(metrics_file)
    mv = _pilot_version(c, uri, name, version)
    t = now_utc(now)
    end = parse_time(ev["period"]["end"], str(metrics_file))
    if end > t + _SKEW:
        raise ConfigError(
            f"pilot metrics {metrics_file}: period.end {end.isoformat()} is in the future (now {t.isoformat()})"
        )
    created = datetime.fromtimestamp(mv.creation_timestamp / 1000, UTC)
    if parse_time(ev["period"]["start"], str(metrics_file)) < created - _SKEW:
        raise ConfigError(
            f"pilot metrics {metrics_file}: period.start is before {name} version {mv.version} existed "
            f"({created.isoformat()})"
        )
    if not mv.run_id:
        raise RegistryError(f"{name} version {mv.version} has no run to log pilot evidence to")
    prod = registry.aliases(name, tracking_uri=uri).get(registry.PRODUCTION)
    n = int((mv.tags or {}).get(TAG_RECORDS, "0")) + 1
    evidence = {
        **ev,
        "version": str(mv.version),
        "production_version": prod,
        "recorded": t.isoformat(),
        "record": n,
    }
    ts = int(t.timestamp() * 1000)
    mets = [
        Metric(f"{arm}/{m}/{k}", float(e[arm][k]), ts, n)
        for m, e in sorted(ev["metrics"].items())
        for arm in ARMS
        for k in ("value", "n")
    ]
    registry._call("log pilot metrics", uri, c.log_batch, mv.run_id, metrics=mets)
    registry._call("log pilot evidence", uri, c.log_dict, mv.run_id, evidence, f"pilot/evidence-{n:04d}.json")
    text = json.dumps(evidence, sort_keys=True, separators=(",", ":"))
    if len(text) > 5000:
        raise ConfigError(
            f"pilot metrics {metrics_file}: too many metrics for one record (keep it under ~40)"
        )
    for k, v in ((TAG_EVIDENCE, text), (TAG_RECORDS, str(n))):
        registry._call("tag pilot evidence", uri, c.set_model_version_tag, name, str(mv.version), k, v)
    log.info("%s version %s: pilot evidence %d recorded", name, mv.version, n)
    return evidence


def status(
    name: str,
    *,
    version: str | None = None,
    policy: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
) -> Decision:
    """The decision for the pilot version now (no alias moves)."""
    uri = registry.resolve_tracking_uri(tracking_uri)
    c = registry.client(uri)
    pol = load_policy(policy)
    mv = _pilot_version(c, uri, name, version)
    raw = (mv.tags or {}).get(TAG_EVIDENCE)
    prod = registry.aliases(name, tracking_uri=uri).get(registry.PRODUCTION)
    d = decide(json.loads(raw) if raw else None, pol, production=prod)
    d.version, d.production = str(mv.version), prod
    return d


def promote(
    name: str,
    *,
    version: str | None = None,
    policy: str | os.PathLike | None = None,
    tracking_uri: str | None = None,
) -> Decision:
    """Act on :func:`status`: move production (promote), nothing (wait), or reject the pilot."""
    uri = registry.resolve_tracking_uri(tracking_uri)
    d = status(name, version=version, policy=policy, tracking_uri=uri)
    if d.action == "promote":
        moves = registry.promote(name, registry.PRODUCTION, d.version, tracking_uri=uri)
        c = registry.client(uri)
        registry._call("tag version", uri, c.set_model_version_tag, name, d.version, TAG_PILOT, "promoted")
        d.production = moves[registry.PRODUCTION]
    elif d.action == "reject":
        c = registry.client(uri)
        al = registry.aliases(name, tracking_uri=uri)
        for k, v in ((TAG_PILOT, "rejected"), (TAG_REASON, "; ".join(d.reasons)[:4000])):
            registry._call("tag version", uri, c.set_model_version_tag, name, d.version, k, v)
        if al.get(registry.PILOT) == d.version:
            registry._call(
                f"remove alias pilot of {name}", uri, c.delete_registered_model_alias, name, registry.PILOT
            )
        log.warning("%s version %s rejected: %s", name, d.version, "; ".join(d.reasons))
    return d
