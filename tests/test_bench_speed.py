"""Smoke test of the speed-benchmark harness (``seme bench speed``) on tiny llama checkpoints.

Runs the real harness end to end (real ``seme merge`` and ``mergekit-yaml`` subprocesses, real
safetensors files, real I/O-limit copy) with one timed run, and checks the reports' structure and
internal consistency. Nothing here depends on how fast anything is.
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from seme.bench import speed

VENV_BIN = Path(sys.executable).parent


def test_generated_models_are_llama_shaped_variants(tmp_path):
    models = speed.ensure_models("tiny", tmp_path)
    cfg = speed.llama_config("tiny")
    plan = dict(speed.tensor_plan(cfg))
    again = speed.ensure_models("tiny", tmp_path)  # cached: same directories, not regenerated
    assert again == models
    with safe_open(str(models["base"] / "model.safetensors"), "pt") as b, \
         safe_open(str(models["ft1"] / "model.safetensors"), "pt") as f1, \
         safe_open(str(models["ft2"] / "model.safetensors"), "pt") as f2:
        assert set(b.keys()) == set(plan)
        name = "model.layers.1.mlp.up_proj.weight"
        tb, t1, t2 = b.get_tensor(name), f1.get_tensor(name), f2.get_tensor(name)
        assert tuple(tb.shape) == plan[name] and tb.dtype == torch.bfloat16
        d1, d2 = (t1.float() - tb.float()), (t2.float() - tb.float())
        # fine-tune-like: small, non-zero perturbations that differ between variants
        assert 0 < d1.std() < 0.5 * tb.float().std()
        assert not torch.equal(d1, d2)
    assert speed.largest_tensor_bytes(models["base"]) == max(
        speed._numel(s) for s in plan.values()) * 2


def test_io_limit_reads_all_inputs_and_writes_one_output(tmp_path):
    models = speed.ensure_models("tiny", tmp_path / "cache")
    inputs = [models["base"], models["ft1"], models["ft2"]]
    rec = speed.io_limit(inputs, tmp_path / "io-out")
    sizes = [sum(f.stat().st_size for f in speed.weight_files(d)) for d in inputs]
    assert rec["bytes_read"] == sum(sizes)
    assert rec["bytes_written"] == sizes[0]
    assert not (tmp_path / "io-out").exists()


@pytest.mark.skipif(shutil.which("mergekit-yaml", path=str(VENV_BIN)) is None, reason="mergekit not installed")
def test_harness_end_to_end_writes_json_markdown_png(tmp_path):
    out = tmp_path / "report"
    rc = speed.main([
        "--scales", "tiny", "--methods", "linear,ties", "--runs", "1", "--no-warmup",
        "--mergekit-variants", "default", "--out", str(out), "--cache", str(tmp_path / "cache"),
    ])
    assert rc == 0
    data = json.loads((out / "speed.json").read_text())
    assert data["environment"]["versions"]["mergekit"] == "0.1.5"
    assert data["help_s"] > 0
    (sr,) = data["scales"]
    assert sr["scale"] == "tiny" and sr["tools"] == ["seme", "mergekit-default"]
    for method in ("linear", "ties"):
        m = sr["methods"][method]
        assert m["k_inputs"] == (3 if method == "linear" else 4)
        for tool in ("seme", "mergekit-default", "io_limit"):
            (run,) = m["runs"][tool]
            assert run["wall_s"] > 0 and run["cpu_s"] >= 0
            assert m["median"][tool]["wall_s"] == run["wall_s"]
        for tool in ("seme", "mergekit-default"):
            run = m["runs"][tool][0]
            assert run["rc"] == 0 and run["peak_rss_bytes"] > 10 * 1024**2
            assert run["out_files"] == ["model.safetensors"]
    summ = sr["summary"]
    names = [t["target"] for t in summ["targets"]]
    assert "TIES ≤ 1.3× task arithmetic (seme)" not in names  # task_arithmetic not run
    assert "linear ≤ 1.5× the I/O limit (seme)" in names
    row = next(r for r in summ["rows"] if r["method"] == "linear")
    assert row["speedup_mergekit-default"] == pytest.approx(
        row["mergekit-default"]["wall_s"] / row["seme"]["wall_s"])
    md = (out / "speed.md").read_text()
    for needle in ("llama-tiny", "mergekit 0.1.5", "load average", "speed-up vs mergekit-default",
                   "RSS target MB", "`seme --help`"):
        assert needle in md
    assert (out / "speed.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # merged outputs are cleaned up between runs
    assert not (tmp_path / "cache" / "runs" / "tiny").exists()

    # re-rendering from the JSON reproduces the Markdown
    rc = speed.main(["--render", str(out / "speed.json"), "--out", str(tmp_path / "again")])
    assert rc == 0 and (tmp_path / "again" / "speed.md").read_text() == md


def test_unknown_method_is_a_config_error(tmp_path):
    from seme.errors import ConfigError

    with pytest.raises(ConfigError, match="unknown method/scale 'nope'"):
        speed.main(["--methods", "nope", "--out", str(tmp_path)])
