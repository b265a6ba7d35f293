"""seme.gates: policy -> real Great Expectations suite over the metrics bundle; CLI exit codes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest

from seme.errors import ConfigError
from seme.gates import RESULT_FILE, SUMMARY_FILE, load_policy, run_gate


def metrics(tasks: dict[str, tuple[str, float]], ppl: float | None) -> dict:
    """A metrics JSON in the shape `seme eval` writes."""
    return {
        "model": "m",
        "suite": "tiny",
        "tasks": {t: {"metric": m, "value": v, "n": 50, "ci95": [0, 1]} for t, (m, v) in tasks.items()},
        "general": {} if ppl is None else {"prose": {"metric": "perplexity", "value": ppl, "n": 1000}},
    }


@pytest.fixture
def bundle() -> dict:
    """Merged keeps >= 90% of each expert on its task (code is perplexity: lower is better)."""
    return {
        "merged": metrics({"arith": ("accuracy", 0.76), "capitals": ("accuracy", 0.70), "code": ("perplexity", 10.8)}, 21.0),
        "parents": {
            "base": metrics({"arith": ("accuracy", 0.10), "capitals": ("accuracy", 0.30), "code": ("perplexity", 14.0)}, 20.0),
            "math": metrics({"arith": ("accuracy", 0.80), "capitals": ("accuracy", 0.20)}, 25.0),
            "geo": metrics({"capitals": ("accuracy", 0.75)}, 24.0),
            "coder": metrics({"code": ("perplexity", 10.0)}, 30.0),
        },
        "experts": {"arith": "math", "capitals": "geo", "code": "coder"},
    }  # fmt: skip


def write(tmp_path: Path, name: str, obj: dict | str) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


def failed(res) -> set[str]:
    return {c["check"] for c in res.checks if not c["passed"]}


def test_passing_bundle_writes_gx_result_and_summary(tmp_path, bundle):
    res = run_gate(write(tmp_path, "b.json", bundle), None, tmp_path / "out")
    assert res.passed, res.failures
    assert failed(res) == set()
    ids = {c["check"] for c in res.checks}
    assert {
        "present:arith",
        "present:capitals",
        "present:code",
        "expert:arith",
        "expert:code",
        "general:prose",
    } <= ids
    doc = json.loads((tmp_path / "out" / RESULT_FILE).read_text())  # strict JSON
    assert doc["verdict"] == "passed"
    gx = doc["great_expectations"][0]
    assert gx["success"] is True and gx["suite_name"] == "seme_gate_metrics"
    assert len(gx["results"]) == len(res.checks)
    assert (tmp_path / "out" / SUMMARY_FILE).read_text().startswith("# Validation gate: PASSED")


def test_failing_expert_and_general_checks_are_named(tmp_path, bundle):
    b = copy.deepcopy(bundle)
    b["merged"]["tasks"]["arith"]["value"] = 0.70  # 0.70 / 0.80 = 0.875 < 0.9
    b["merged"]["tasks"]["code"]["value"] = 11.2  # perplexity: 11.2 > 10.0 / 0.9 = 11.11
    b["merged"]["general"]["prose"]["value"] = 22.5  # 22.5 > 1.1 * 20.0
    res = run_gate(b, None, tmp_path / "out")
    assert not res.passed
    assert failed(res) == {"expert:arith", "expert:code", "general:prose"}
    summary = (tmp_path / "out" / SUMMARY_FILE).read_text()
    assert summary.startswith("# Validation gate: FAILED")
    for check in ("expert:arith", "expert:code", "general:prose"):
        assert f"**{check}**" in summary
    assert "ratio 0.875" in summary and "'math'" in summary
    # just inside the bounds passes: the thresholds are the policy's, not hard-coded results
    b["merged"]["tasks"]["arith"]["value"] = 0.721
    b["merged"]["tasks"]["code"]["value"] = 11.1
    b["merged"]["general"]["prose"]["value"] = 21.99
    assert run_gate(b).passed


def test_missing_task_missing_value_and_non_finite(tmp_path, bundle):
    b = copy.deepcopy(bundle)
    del b["merged"]["tasks"]["capitals"]
    res = run_gate(b)
    assert failed(res) == {"present:capitals"}
    b = copy.deepcopy(bundle)
    b["parents"]["math"]["tasks"]["arith"]["value"] = None  # the expert's score is missing
    res = run_gate(b)
    assert failed(res) == {"not_null:reference"}
    assert "expert:arith" in next(c["detail"] for c in res.checks if c["check"] == "not_null:reference")
    b = copy.deepcopy(bundle)
    b["merged"]["general"]["prose"]["value"] = math.inf
    res = run_gate(b, None, tmp_path / "o")
    assert "finite:merged" in failed(res) and not res.passed
    json.loads((tmp_path / "o" / RESULT_FILE).read_text())  # still strict JSON
    b = copy.deepcopy(bundle)
    b["merged"]["general"] = {}  # the required general perplexity is absent
    assert "not_null:merged" in failed(run_gate(b))


def test_policy_overrides_and_bad_policies(tmp_path, bundle):
    b = copy.deepcopy(bundle)
    b["merged"]["tasks"]["arith"]["value"] = 0.50
    assert failed(run_gate(b)) == {"expert:arith"}
    lenient = write(
        tmp_path,
        "p.yaml",
        "expert_retention: {min_ratio: 0.9, per_task: {arith: 0.6}}\n"
        "general: {perplexity: {max_increase: 0.01}}\nlower_is_better: [perplexity]\n",
    )
    res = run_gate(b, lenient)
    assert failed(res) == {"general:prose"}  # arith now allowed 0.6; prose 21/20 > 1.01
    pol = load_policy(None)
    assert pol["min_ratio"] == 0.9 and pol["general"]["perplexity"]["max_increase"] == 0.1
    for text, msg in [
        ("expert_retention: {min_ratio: 1.5}\n", r"min_ratio = 1.5 is outside"),
        ("thresholds: 3\n", r"unknown key\(s\) thresholds"),
        ("general: {perplexity: {}}\n", r"general.perplexity needs max_increase"),
        ("weights: {no_nan: true}\n", r"unknown weight check\(s\) no_nan"),
        ("[1, 2\n", r"not valid YAML"),
    ]:
        with pytest.raises(ConfigError, match=msg):
            run_gate(bundle, write(tmp_path, "bad.yaml", text))
    with pytest.raises(ConfigError, match=r"expert 'nobody' of task 'x' has no metrics"):
        run_gate({**bundle, "experts": {"x": "nobody"}})
    with pytest.raises(ConfigError, match=r"not valid JSON"):
        run_gate(write(tmp_path, "b.json", "{"))


def test_min_ratio_zero_checks_only_presence_and_finiteness(tmp_path, bundle):
    """A floor of 0 (the pipeline tests' pass-by-construction policy): any finite score passes, even
    0 against a perfect expert or a far worse perplexity; a missing task or a NaN still fails."""
    floor0 = write(tmp_path, "p0.yaml", "version: 1\nexpert_retention: {min_ratio: 0}\ngeneral: {}\n")
    b = copy.deepcopy(bundle)
    b["merged"]["tasks"]["arith"]["value"] = 0.0
    b["merged"]["tasks"]["code"]["value"] = 1e6  # perplexity: lower is better, no bound either
    b["parents"]["math"]["tasks"]["arith"]["value"] = 1.0
    res = run_gate(b, floor0)
    assert res.passed, res.failures
    assert not any(c["check"].startswith(("expert:", "general:")) for c in res.checks)
    b["merged"]["tasks"]["arith"]["value"] = float("nan")
    assert failed(run_gate(b, floor0)) == {"not_null:merged"}
    del b["merged"]["tasks"]["arith"]
    assert "present:arith" in failed(run_gate(b, floor0))
    with pytest.raises(ConfigError, match=r"min_ratio = -0.1 is outside"):
        load_policy(write(tmp_path, "neg.yaml", "expert_retention: {min_ratio: -0.1}\n"))


def write_checkpoint(root: Path) -> list[str]:
    """A real sharded safetensors checkpoint (two shards + index), tensor names as in llama."""
    import torch
    from safetensors.torch import save_file

    root.mkdir()
    g = torch.Generator().manual_seed(0)
    names = [f"model.layers.{i}.mlp.{u}.weight" for i in range(2) for u in ("up_proj", "down_proj")]
    weight_map = {}
    for shard, part in enumerate((names[:2], names[2:]), 1):
        fname = f"model-0000{shard}-of-00002.safetensors"
        save_file(
            {n: torch.randn(8, 4, generator=g) for n in part}, str(root / fname), metadata={"format": "pt"}
        )
        weight_map.update(dict.fromkeys(part, fname))
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 2}))
    return names


def test_weight_checks_on_a_real_checkpoint(tmp_path, bundle):
    from safetensors.torch import load_file, save_file

    model = tmp_path / "merged"
    names = write_checkpoint(model)
    policy = write(tmp_path, "w.yaml", "weights: {finite: true, max_abs: 100.0}\n")
    res = run_gate({**bundle, "model_dir": str(model)}, policy, tmp_path / "ok")
    assert res.passed, res.failures
    weights = json.loads((tmp_path / "ok" / RESULT_FILE).read_text())["great_expectations"][1]
    assert weights["suite_name"] == "seme_gate_weights" and weights["success"] is True
    # poison one tensor with NaN (first shard) and another with a huge value (second shard)
    for name, value in ((names[1], float("nan")), (names[2], 1e6)):
        f = next(p for p in model.glob("*.safetensors") if name in load_file(p))
        sd = load_file(f)
        sd[name][0, 0] = value
        save_file(sd, str(f), metadata={"format": "pt"})
    res = run_gate({**bundle, "model_dir": str(model)}, policy, tmp_path / "bad")
    assert failed(res) == {"weights:finite", "weights:max_abs"}
    detail = {c["check"]: c["detail"] for c in res.checks if not c["passed"]}
    assert names[1] in detail["weights:finite"] and names[2] in detail["weights:max_abs"]
    assert names[0] not in detail["weights:finite"]
    with pytest.raises(ConfigError, match=r"no 'model_dir'"):
        run_gate(bundle, policy)


def test_cli_exit_codes(tmp_path, bundle, capsys, monkeypatch):
    from seme.cli import main

    assert main(["gate", str(write(tmp_path, "ok.json", bundle)), "--out", str(tmp_path / "a")]) == 0
    assert "PASSED" in capsys.readouterr().out and (tmp_path / "a" / RESULT_FILE).is_file()
    b = copy.deepcopy(bundle)
    b["merged"]["tasks"]["capitals"]["value"] = 0.1
    monkeypatch.chdir(Path(__file__).parents[1])
    policy = "seme/policies/default_gate.yaml"
    assert (
        main(["gate", str(write(tmp_path, "bad.json", b)), "--policy", policy, "--out", str(tmp_path / "b")])
        == 3
    )
    assert "**expert:capitals**" in capsys.readouterr().out
    assert main(["gate", str(tmp_path / "none.json")]) == 2
    assert capsys.readouterr().err.startswith("seme: error: cannot read metrics bundle")
