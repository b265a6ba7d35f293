"""seme bench quality --quick on the real tiny zoo: real merges (seme's executor), real evals,
JSON + Markdown + PNG reports; failures reported, not hidden; the summary logic on its own."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seme.errors import ConfigError


def test_quick_bench_two_methods_writes_reports(tiny_zoo: Path, tmp_path: Path, capsys) -> None:
    from seme.bench.quality import main

    out = tmp_path / "q"
    rc = main(["--quick", "--zoo", str(tiny_zoo), "--out", str(out), "--methods", "task_arithmetic@0.5",
               "ties@1.0", "--limit", "20", "-q"])
    assert rc == 0
    rep = json.loads((out / "quality.json").read_text())
    kinds = [r["kind"] for r in rep["rows"]]
    assert kinds.count("base") == 1 and kinds.count("expert") == 2 and kinds.count("merged") == 2
    for r in rep["rows"]:
        assert r["status"] == "ok", r
        assert set(r["metrics"]["tasks"]) == {"arithmetic", "french_numbers"}
    for r in rep["rows"]:
        if r["kind"] == "expert":  # an expert normalized on its own task is exactly 1 (undefined at 0)
            own = r["metrics"]["tasks"][r["expert_task"]]["value"]
            assert r["norm"][r["expert_task"]] == (pytest.approx(1.0) if own else None)
    merged = {r["label"]: r for r in rep["rows"] if r["kind"] == "merged"}
    assert set(merged) == {"task_arithmetic@0.5", "ties@1.0"}
    assert merged["ties@1.0"]["config"]["merge_method"] == "ties"
    assert set(rep["summary"]["winners"]) == {"arithmetic", "french_numbers"}
    assert set(rep["summary"]["pareto"]) <= set(merged) and rep["summary"]["pareto"]  # someone is undominated
    md = (out / "quality.md").read_text()
    assert "Tiny CI zoo" in md and "| ties@1.0 |" in md and "wins each task" in md
    assert (out / "quality.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not (out / "models").exists()  # merged checkpoints removed unless --keep-models
    # parents' evals are cached in the zoo, keyed by the suite's fingerprint and weights sha256: one
    # file per parent (other files there, from other limits or older weights, are not this run's)
    from seme.evaluation.suites import get_suite, suite_fingerprint
    from seme.zoo import load_zoo

    fp = suite_fingerprint(get_suite("tiny"))
    zm = load_zoo(tiny_zoo)
    for sha in [zm["base"]["sha256"], *(e["sha256"] for e in zm["experts"].values())]:
        assert len(list((tiny_zoo / "evals").glob(f"tiny-20-*-{fp}-*-{sha[:16]}.json"))) == 1, sha
    assert "reports:" in capsys.readouterr().out
    assert rep["complete"] and rep["cpu_s"] > 0 and len(rep["loadavg_start"]) == 3

    # two concurrent runs, each with part of the grid, combine into the same table
    from seme.bench.quality import combine_reports

    parts = []
    for i, keep in enumerate(("task_arithmetic@0.5", "ties@1.0")):
        part = dict(rep, rows=[r for r in rep["rows"] if r["kind"] != "merged" or r["label"] == keep])
        parts.append(tmp_path / f"part{i}.json")
        parts[-1].write_text(json.dumps(part))
    comb = combine_reports(parts[::-1], tmp_path / "comb")
    assert [r["label"] for r in comb["rows"]] == [r["label"] for r in rep["rows"]]
    assert comb["summary"] == rep["summary"] and comb["merge_s_total"] == pytest.approx(2 * rep["merge_s_total"])
    assert "combined from 2 concurrent runs" in (tmp_path / "comb" / "quality.md").read_text()
    with pytest.raises(ConfigError, match="more than one report"):
        combine_reports([out / "quality.json", parts[0]], tmp_path / "dup")


def test_failed_method_is_reported(tiny_zoo: Path, tmp_path: Path) -> None:
    from seme.bench.quality import Variant, merge_config, run_variant

    var = Variant("ties@1.0", "ties", "ties", {"lambda": 1.0}, {"weight": 1.0, "density": 0.5}, 1.0)
    cfg = merge_config(var, tiny_zoo / "base", [tiny_zoo / "experts" / "arithmetic", tmp_path / "missing"],
                       "float32")
    res = run_variant(var, cfg, tmp_path / "out", "cpu", progress=False)
    assert res["status"] == "failed" and "missing" in res["error"]
    assert not (tmp_path / "out").exists()


def test_unknown_method_is_a_config_error(tiny_zoo: Path, tmp_path: Path) -> None:
    from seme.bench.quality import run_bench

    with pytest.raises(ConfigError, match="unknown bench method"):
        run_bench(tiny_zoo, tmp_path / "x", only=["soup"], progress=False)


def test_summary_pareto_and_matched_perplexity() -> None:
    from seme.bench.quality import summarize

    def row(label, kind, fam, a, f, ppl, task=None):
        return {"label": label, "kind": kind, "family": fam, "status": "ok", "expert_task": task,
                "metrics": {"tasks": {"a": {"value": a}, "f": {"value": f}},
                            "general": {"prose": {"value": ppl}}}}

    rows = [row("base", "base", "base", 0.0, 0.0, 10.0), row("ea", "expert", "expert", 0.8, 0.0, 20.0, "a"),
            row("ef", "expert", "expert", 0.0, 0.5, 20.0, "f"),
            row("m1", "merged", "x", 0.4, 0.25, 11.0), row("m2", "merged", "x", 0.8, 0.5, 30.0),
            row("m3", "merged", "y", 0.2, 0.1, 15.0)]
    s = summarize(rows, ["a", "f"])
    assert rows[3]["mean_norm"] == pytest.approx(0.5) and rows[4]["mean_norm"] == pytest.approx(1.0)
    assert set(s["pareto"]) == {"m1", "m2"}  # m3 is dominated by m1
    assert s["winners"]["a"]["label"] == "m2"
    assert s["matched_ppl"]["1.25"]["x"]["label"] == "m1"
    assert s["matched_ppl"]["2.0"]["y"]["label"] == "m3"


def test_shared_seme_alignment_gives_the_inline_merge(tiny_zoo: Path, tmp_path: Path) -> None:
    """The bench aligns once for all SeMe variants; a merge from it equals one that aligns inline."""
    from safetensors.torch import load_file

    from seme.bench.quality import _shared_alignment, merge_config, run_variant, variants

    grid = [v for v in variants(True) if v.label in ("seme@0.7", "seme_no_select", "ties@1.0")]
    experts = [tiny_zoo / "experts" / t for t in ("arithmetic", "french_numbers")]
    al, info = _shared_alignment(grid, tiny_zoo / "base", experts, "float32", tmp_path, "cpu")
    assert al is not None and (al / "alignment.json").is_file(), info
    assert info["variants"] == ["seme@0.7", "seme_no_select"] and info["wall_s"] >= 0
    var = grid[[v.label for v in grid].index("seme@0.7")]
    cfg = merge_config(var, tiny_zoo / "base", experts, "float32")
    shared = run_variant(var, cfg, tmp_path / "shared", "cpu", False, al)
    inline = run_variant(var, cfg, tmp_path / "inline", "cpu", False)
    assert shared["status"] == inline["status"] == "ok", (shared, inline)
    a, b = load_file(tmp_path / "shared" / "model.safetensors"), load_file(tmp_path / "inline" / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    assert _shared_alignment([v for v in grid if v.method != "seme"], tiny_zoo / "base", experts, "float32",
                             tmp_path, "cpu") == (None, {})


def test_mean_norm_uses_tasks_the_experts_really_learned() -> None:
    """A task whose expert's 95% CI overlaps the base's does not enter the mean normalized score."""
    from seme.bench.quality import summarize
    from seme.evaluation.runner import wilson_ci

    def row(label, kind, a, f, task=None):
        return {"label": label, "kind": kind, "family": kind, "status": "ok", "expert_task": task,
                "metrics": {"tasks": {"a": {"value": a / 40, "ci95": wilson_ci(a, 40)},
                                      "f": {"value": f / 40, "ci95": wilson_ci(f, 40)}},
                            "general": {"prose": {"value": 10.0}}}}

    # expert a: 2/40 vs base 0/40 (CIs overlap); expert f: 24/40 vs 0/40
    rows = [row("base", "base", 0, 0), row("ea", "expert", 2, 0, "a"), row("ef", "expert", 0, 24, "f"),
            row("m", "merged", 3, 12)]
    s = summarize(rows, ["a", "f"])
    assert s["informative_tasks"] == ["f"]
    assert rows[3]["norm"]["a"] == pytest.approx(1.5) and rows[3]["mean_norm"] == pytest.approx(0.5)
    assert rows[3]["mean_norm_all"] == pytest.approx(1.0)
