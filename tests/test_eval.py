"""seme eval on the tiny zoo: metrics JSON shape, the same items for every model, bad inputs.

The models are the real tiny zoo (pretrained llama + LoRA experts), shared per session through the
zoo's on-disk cache.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from seme.errors import EvalError


@pytest.fixture(scope="session")
def tiny_metrics(tiny_zoo: Path) -> dict[str, dict]:
    from seme.evaluation import evaluate

    return {name: evaluate(tiny_zoo / rel, "tiny", zoo_dir=tiny_zoo, limit=60, progress=False)
            for name, rel in (("base", "base"), ("arithmetic", "experts/arithmetic"),
                              ("french_numbers", "experts/french_numbers"))}


def test_cli_writes_metrics_json_and_table(tiny_zoo: Path, tmp_path: Path, capsys) -> None:
    from seme.cli import main

    out = tmp_path / "m" / "metrics.json"
    rc = main(["-q", "eval", str(tiny_zoo / "experts" / "arithmetic"), "--suite", "tiny", "--out", str(out),
               "--limit", "20"])
    assert rc == 0
    m = json.loads(out.read_text())
    assert set(m) >= {"model", "suite", "tasks", "general", "created", "seme_version"}
    assert m["suite"] == "tiny" and set(m["tasks"]) == {"arithmetic", "french_numbers"}
    for t in m["tasks"].values():
        assert t["metric"] == "accuracy" and t["n"] > 0 and 0 <= t["value"] <= 1
        lo, hi = t["ci95"]
        assert lo <= t["value"] <= hi
    p = m["general"]["prose"]
    assert p["metric"] == "perplexity" and p["value"] > 1 and p["ci95"][0] < p["value"] < p["ci95"][1]
    stdout = capsys.readouterr().out
    assert "arithmetic" in stdout and "general:prose" in stdout and "95% CI" in stdout


def test_every_model_is_measured_on_the_same_items(tiny_metrics: dict[str, dict]) -> None:
    """Mechanics only (how good the experts are is the zoo manifest's and the benchmark's business):
    every model answers the same held-out items of each task and the same prose windows, and each
    value lies inside its 95% interval."""
    from seme.evaluation.suites import get_suite

    for task in ("arithmetic", "french_numbers"):
        ns = {m["tasks"][task]["n"] for m in tiny_metrics.values()}
        assert ns == {min(60, len(get_suite("tiny").tasks[task].examples()[1]))}, (task, ns)
        for name, m in tiny_metrics.items():
            t = m["tasks"][task]
            assert t["ci95"][0] <= t["value"] <= t["ci95"][1], (name, task, t)
            assert t["value"] * t["n"] == pytest.approx(round(t["value"] * t["n"])), "a count of items"
    ns = {m["general"]["prose"]["n"] for m in tiny_metrics.values()}
    assert len(ns) == 1


def test_unknown_suite_and_task(tiny_zoo: Path, capsys) -> None:
    from seme.cli import main
    from seme.evaluation import evaluate

    assert main(["eval", str(tiny_zoo / "base"), "--suite", "nope"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("seme: error: unknown suite 'nope'") and err.count("\n") == 1
    with pytest.raises(EvalError, match="unknown task 'poetry'"):
        evaluate(tiny_zoo / "base", "tiny", tasks=["poetry"], progress=False)


def test_missing_tokenizer_and_not_causal(tiny_zoo: Path, tmp_path: Path) -> None:
    from seme.evaluation import evaluate

    notok = tmp_path / "notok"
    notok.mkdir()
    shutil.copy(tiny_zoo / "base" / "config.json", notok)
    shutil.copy(tiny_zoo / "base" / "model.safetensors", notok)
    with pytest.raises(EvalError, match=r"notok has no tokenizer"):
        evaluate(notok, "tiny", progress=False)
    enc = tmp_path / "encoder"
    shutil.copytree(tiny_zoo / "base", enc)
    cfg = json.loads((enc / "config.json").read_text())
    cfg.update(model_type="bert", architectures=["BertModel"])
    (enc / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(EvalError, match="not a causal language model"):
        evaluate(enc, "tiny", progress=False)
    with pytest.raises(EvalError, match="does not exist"):
        evaluate(tmp_path / "nothing", "tiny", progress=False)


def test_data_free_needs_sources_and_prints_report(tiny_zoo: Path, capsys) -> None:
    from seme.cli import main

    assert main(["eval", str(tiny_zoo / "base"), "--data-free"]) == 1
    assert "--sources" in capsys.readouterr().err
    rc = main(["-q", "eval", str(tiny_zoo / "experts" / "arithmetic"), "--data-free", "--sources",
               str(tiny_zoo / "base"), str(tiny_zoo / "experts" / "arithmetic")])
    assert rc == 0
    out = capsys.readouterr().out
    assert "mean" in out


def test_suite_fingerprint_follows_task_data() -> None:
    """Eval caches key on the suite fingerprint: changing a task's data generator changes it."""
    import dataclasses

    from seme.evaluation.suites import get_suite, suite_fingerprint

    s = get_suite("tiny")
    fp = suite_fingerprint(s)
    assert fp == suite_fingerprint(get_suite("tiny")) and fp != suite_fingerprint(get_suite("zoo"))
    t = s.tasks["arithmetic"]
    moved = dataclasses.replace(t, args={**t.args, "max_operand": 21})
    s2 = dataclasses.replace(s, tasks={**s.tasks, "arithmetic": moved})
    assert suite_fingerprint(s2) != fp
