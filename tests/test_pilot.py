"""Pilot evidence gates production (seme.pilot) against a real MLflow server: refused before the
duration, refused with too few samples, promoted when not worse, rejected when significantly worse
(production untouched), and the promote pipeline's step exits cleanly with "not yet"."""

from __future__ import annotations

import json
import math
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from seme import pilot, registry
from seme.errors import ConfigError


@pytest.fixture(autouse=True)
def fast_retries(monkeypatch):
    monkeypatch.setenv("SEME_REGISTRY_RETRIES", "1")
    monkeypatch.setenv("SEME_REGISTRY_BACKOFF", "0.05")


@pytest.fixture
def uri(mlflow_server, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    return mlflow_server


@pytest.fixture
def name() -> str:
    return f"seme-pilot-{uuid.uuid4().hex[:8]}"


def _version(tmp: Path, name: str, tag: str) -> str:
    d = tmp / tag
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "tag": tag}))
    return registry.register_model(d, name, gate_passed=True)


@pytest.fixture
def rollout(tmp_path, uri, name):
    """v1 in production (broken glass once, to have a production), v2 holding pilot."""
    from seme.cli import main

    v1 = _version(tmp_path, name, "v1")
    assert main(["promote", name, "--skip-evidence"]) == 0
    v2 = _version(tmp_path, name, "v2")
    assert registry.aliases(name) == {"pilot": v2, "production": v1}
    created = datetime.fromtimestamp(
        registry.client(uri).get_model_version(name, v2).creation_timestamp / 1000, UTC
    )
    return v1, v2, created


def _policy(tmp: Path, **kw) -> Path:
    doc = {"min_duration": "7d", "min_n": 1000, "alpha": 0.05,
           "metrics": {"task_success": {"higher_is_better": True}, "error_rate": {"higher_is_better": False}}}  # fmt: skip
    doc.update(kw)
    p = tmp / f"policy-{uuid.uuid4().hex[:6]}.yaml"
    p.write_text(yaml.safe_dump(doc))
    return p


def _evidence(tmp: Path, start: datetime, hours: float, pilot_success: float, n: int = 4000) -> Path:
    doc = {
        "period": {"start": start.isoformat(), "end": (start + timedelta(hours=hours)).isoformat()},
        "metrics": {
            "task_success": {
                "pilot": {"value": pilot_success, "n": n},
                "production": {"value": 0.80, "n": 3 * n},
            },
            "error_rate": {"pilot": {"value": 0.020, "n": n}, "production": {"value": 0.021, "n": 3 * n}},
        },
    }
    p = tmp / f"serving-{uuid.uuid4().hex[:6]}.json"
    p.write_text(json.dumps(doc))
    return p


def test_refused_before_duration_then_promoted_when_not_worse(
    tmp_path, uri, name, rollout, capsys, monkeypatch
):
    from seme.cli import main

    v1, v2, created = rollout
    policy = _policy(tmp_path)
    # no evidence at all: refused, nothing moves
    assert main(["promote", name, "--policy", str(policy)]) == 1
    assert "no pilot evidence recorded yet" in capsys.readouterr().err
    # one day of traffic, pilot as good as production: not yet (the clock is injected, no sleeping)
    day = created + timedelta(days=1)
    monkeypatch.setenv("SEME_NOW", day.isoformat())
    assert main(["pilot", "record", name, "--metrics", str(_evidence(tmp_path, created, 24, 0.805))]) == 0
    rec = json.loads(capsys.readouterr().out)
    assert rec["version"] == v2 and rec["production_version"] == v1 and rec["record"] == 1
    assert main(["promote", name, "--policy", str(policy)]) == 1
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("seme: error: ")]  # one error line
    assert line.startswith(f"seme: error: refusing to promote {name} version {v2} yet: ")
    assert "covers 1.0 d; the policy needs at least 7.0 d" in line
    assert registry.aliases(name) == {"pilot": v2, "production": v1}
    # a policy without a minimum duration takes the same evidence (the duration is the only reason)
    assert pilot.status(name, policy=_policy(tmp_path, min_duration=0)).action == "promote"

    # eight days: promoted, p-values reported; the run holds both records as metrics and artifacts
    week = created + timedelta(days=8)
    monkeypatch.setenv("SEME_NOW", week.isoformat())
    assert main(["pilot", "record", name, "--metrics", str(_evidence(tmp_path, created, 8 * 24, 0.805))]) == 0
    capsys.readouterr()
    assert main(["promote", name, "--policy", str(policy)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["production"] == v2 and out["previous-production"] == v1
    assert set(out["tests"]) == {"task_success", "error_rate"} and all(
        p > 0.05 for p in out["tests"].values()
    )
    assert registry.aliases(name) == {"pilot": v2, "production": v2, "previous-production": v1}
    c = registry.client(uri)
    mv = c.get_model_version(name, v2)
    assert mv.tags["seme.pilot"] == "promoted" and mv.tags["seme.pilot.records"] == "2"
    hist = c.get_metric_history(mv.run_id, "pilot/task_success/n")
    assert sorted(m.step for m in hist) == [1, 2] and all(m.value == 4000 for m in hist)
    arts = {a.path for a in c.list_artifacts(mv.run_id, "pilot")}
    assert arts == {"pilot/evidence-0001.json", "pilot/evidence-0002.json"}


def test_refused_with_too_few_samples(tmp_path, uri, name, rollout, capsys, monkeypatch):
    from seme.cli import main

    v1, v2, created = rollout
    monkeypatch.setenv("SEME_NOW", (created + timedelta(days=9)).isoformat())
    ev = _evidence(tmp_path, created, 9 * 24, 0.60, n=200)  # far worse, but on 200 samples
    assert main(["pilot", "record", name, "--metrics", str(ev)]) == 0
    assert main(["promote", name, "--policy", str(_policy(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert "task_success: pilot has n = 200, the policy needs at least 1000" in err
    assert "error_rate: pilot has n = 200" in err
    assert registry.aliases(name) == {"pilot": v2, "production": v1}
    assert "seme.pilot" not in registry.client(uri).get_model_version(name, v2).tags


def test_significantly_worse_pilot_is_rejected_and_production_stays(
    tmp_path, uri, name, rollout, capsys, monkeypatch
):
    from scipy.stats import norm

    from seme.cli import main

    v1, v2, created = rollout
    # two days in (before the 7-day minimum), with enough samples: harm is acted on at once
    monkeypatch.setenv("SEME_NOW", (created + timedelta(days=2)).isoformat())
    assert main(["pilot", "record", name, "--metrics", str(_evidence(tmp_path, created, 48, 0.78))]) == 0
    d = pilot.status(name, policy=_policy(tmp_path))
    assert d.action == "reject" and d.tests["task_success"]["significantly_worse"] is True
    assert d.tests["error_rate"]["significantly_worse"] is False
    # the p-value is the one-sided pooled two-proportion z-test (cross-checked with scipy's normal)
    p1, n1, p2, n2 = 0.78, 4000, 0.80, 12000
    pooled = (p1 * n1 + p2 * n2) / (n1 + n2)
    z = (p1 - p2) / math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    assert d.tests["task_success"]["p_value"] == pytest.approx(norm.cdf(z), rel=1e-9) and norm.cdf(z) < 0.01
    assert main(["promote", name, "--policy", str(_policy(tmp_path))]) == 1
    err = capsys.readouterr().err
    assert f"version {v2} rejected, alias pilot removed, production stays at {v1}" in err
    assert "task_success: pilot 0.78 vs production 0.8 is significantly worse (one-sided p = " in err
    assert registry.aliases(name) == {"production": v1}
    tags = registry.client(uri).get_model_version(name, v2).tags
    assert tags["seme.pilot"] == "rejected" and "task_success" in tags["seme.pilot.reason"]


def test_evidence_files_are_checked(tmp_path, uri, name, rollout, monkeypatch):
    _v1, v2, created = rollout
    monkeypatch.setenv("SEME_NOW", (created + timedelta(hours=1)).isoformat())
    with pytest.raises(ConfigError, match="period.end .* is in the future"):
        pilot.record(name, _evidence(tmp_path, created, 2, 0.8))
    with pytest.raises(ConfigError, match=f"period.start is before {name} version {v2} existed"):
        pilot.record(name, _evidence(tmp_path, created - timedelta(days=3), 1, 0.8))
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"period": {"start": "2026-01-01", "end": "2026-01-02"},
                                   "metrics": {"latency_ms": {"pilot": {"value": 120, "n": 10}, "production": {"value": 110, "n": 10}}}}))  # fmt: skip
    with pytest.raises(
        ConfigError, match=r"latency_ms\.pilot: a value outside \[0, 1\] is a mean and needs std"
    ):
        pilot.record(name, bad)
    with pytest.raises(ConfigError, match="min_duration: 'a week' is not a duration"):
        pilot.load_policy(_policy(tmp_path, min_duration="a week"))
    # evidence recorded against an older production is not evidence against the current one
    assert (
        pilot.decide({"production_version": "7", "metrics": {}, "period": {}}, pilot.load_policy(), "9")
        .reasons[0]
        .startswith("the evidence compares against production version 7")
    )


def test_promote_pipeline_step_says_not_yet_and_succeeds(tmp_path, uri, name, rollout):
    """The scheduled promote step under the KFP local runner: not enough evidence is a clean exit."""
    from kfp import local

    from components.promote import promote_model

    v1, v2, _ = rollout
    local.init(runner=local.SubprocessRunner(use_venv=False), pipeline_root=str(tmp_path / "kfp"))
    task = promote_model(
        registered_model_name=name, version="", to_alias="production", mlflow_tracking_uri=uri,
        promotion_policy=_policy(tmp_path).read_text(),
    )  # fmt: skip
    assert task.outputs["Output"] == "wait"
    meta = task.outputs["promotion"].metadata
    assert meta["decision"] == "wait" and "no pilot evidence recorded yet" in meta["reasons"][0]
    assert registry.aliases(name) == {"pilot": v2, "production": v1}


def test_schedule_promote_sends_the_promote_pipeline_with_the_policy(tmp_path, monkeypatch, capsys):
    """`seme pipeline schedule-promote` against a fake KFP API server (no KFP server runs here)."""
    from test_pipeline import FakeKfpApi

    from seme.cli import main

    monkeypatch.setenv("HOME", str(tmp_path))
    api = FakeKfpApi()
    try:
        policy = _policy(tmp_path, min_duration="3d")
        rc = main(["pipeline", "schedule-promote", "seme-merged", "--cron", "0 0 * * * *", "--host", api.url,
                   "--policy", str(policy)])  # fmt: skip
        assert rc == 0 and "recurring run rr-42 (seme-promote-seme-merged)" in capsys.readouterr().out
        rr = next(b for m, path, b in api.requests if m == "POST" and path == "/apis/v2beta1/recurringruns")
        assert rr["pipeline_spec"]["pipeline_spec"]["pipelineInfo"]["name"] == "seme-promote"
        params = rr["runtime_config"]["parameters"]
        assert params["registered_model_name"] == "seme-merged" and params["to_alias"] == "production"
        assert yaml.safe_load(params["promotion_policy"])["min_duration"] == "3d"
        bad = tmp_path / "bad.yaml"
        bad.write_text("alpha: 2\n")
        n = len(api.requests)
        assert main(["pipeline", "schedule-promote", "x", "--cron", "0 0 * * * *", "--host", api.url,
                     "--policy", str(bad)]) == 2  # fmt: skip
        assert "alpha must be in (0, 1)" in capsys.readouterr().err and len(api.requests) == n
    finally:
        api.close()
