"""The zoo: tiny CI zoo build, cache hits and cache keys, reproducible weights, resume after an
interruption, bad bases.

Everything is real: a small llama really pretrained on pydoc_data text, LoRA experts really
fine-tuned and merged. The tiny zoo lives in the zoo cache ($SEME_ZOO_DIR or ~/.cache/seme/zoo),
keyed by the code and libraries that build it, so it is built once per machine and code version
(a few CPU-minutes) and is a cache hit afterwards. Quality is recorded in the manifest, not asserted
here (that is the benchmark's job); these tests assert the mechanics.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from seme.errors import CheckpointError
from seme.fsutil import sha256_file


def _micro(name: str = "micro"):
    """The tiny recipe cut to a few steps, without the quality evaluation: seconds to build."""
    from seme.zoo import TINY

    return replace(TINY, name=name, tiny_steps=8, quality=False,
                   experts={k: replace(v, steps=6, batch=8) for k, v in TINY.experts.items()})


def _files(z: Path) -> dict[str, tuple[int, int]]:
    """Identity (inode, mtime ns) of every weights file: a rebuilt part gets a new file."""
    return {p.relative_to(z).as_posix(): (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in z.rglob("model.safetensors")}


def test_tiny_zoo_manifest_and_cache_hit(tiny_zoo: Path) -> None:
    from seme.evaluation.suites import get_suite
    from seme.zoo import QUALITY_BAR, TINY, build_zoo, code_fingerprint, load_zoo

    m = load_zoo(tiny_zoo)
    assert m["suite"] == "tiny" and m["code_fingerprint"] == code_fingerprint()
    assert m["threads"] == TINY.train_threads and m["base"]["family"] == "llama"
    assert set(m["experts"]) == {"arithmetic", "french_numbers"}
    seeds = set()
    for name, e in m["experts"].items():
        d = tiny_zoo / e["path"]
        assert sha256_file(d / "model.safetensors") == e["sha256"]
        assert len(e["train_data_sha256"]) == 64 and len(e["heldout_data_sha256"]) == 64
        assert e["loss_last"] < e["loss_first"], name  # the fine-tune really learned something
        assert (d / "tokenizer.json").is_file() and (d / "config.json").is_file()
        assert e["kind"] == "lora" and e["family"] == "llama" and e["steps"] == e["recipe"]["steps"]
        seeds.add(e["recipe"]["seed"])
        assert e["sha256"] != m["base"]["sha256"]
        # the expert's own-task value next to the base's, on the same held-out items (recorded, and
        # judged against the bar, not asserted: quality claims belong to the benchmark)
        q = e["quality"]
        assert q["task"] == name and q["n"] == q["base_n"] == len(get_suite("tiny").tasks[name].examples()[1])
        assert q["ci95"][0] <= q["value"] <= q["ci95"][1] and q["base_ci95"][0] <= q["base_value"] <= q["base_ci95"][1]
        assert q["ppl_ratio"] == pytest.approx(q["prose_ppl"] / q["base_prose_ppl"])
        assert q["meets_bar"] == (q["value"] >= QUALITY_BAR["expert_min"] and q["base_value"] <= QUALITY_BAR["base_max"]
                                  and q["ppl_ratio"] <= QUALITY_BAR["max_ppl_ratio"] and q["ci95"][0] > q["base_ci95"][1])
    assert len(seeds) == 2
    before = _files(tiny_zoo)
    again = build_zoo(root=tiny_zoo.parent, tiny=True, progress=False)
    assert again == tiny_zoo
    assert _files(tiny_zoo) == before, "a warm zoo is a cache hit: no part is rebuilt"


def test_tiny_zoo_weights_match_the_recorded_digests(tiny_zoo: Path) -> None:
    """The tiny zoo is reproducible: on a machine of the recorded kind (same libraries, same CPU
    kernels) its weights are bit-identical to seme/zoo/tiny_digests.json. A difference means the
    build changed (code, recipe, data or library behaviour); if that was intended, re-record."""
    from seme.zoo import digests, load_zoo, recorded_digests

    rec = recorded_digests()
    m = load_zoo(tiny_zoo)
    want = {k: rec[k] for k in ("versions", "cpu_capability", "machine")}
    here = {"versions": {k: m["versions"].get(k) for k in rec["versions"]},
            "cpu_capability": m["cpu_capability"], "machine": m["machine"]}
    if here != want:
        pytest.skip(f"digests recorded on {want}, this machine is {here}")
    got = digests(tiny_zoo)
    assert got == rec["digests"], (
        "the tiny zoo's weights differ from seme/zoo/tiny_digests.json; if the change is intended, run "
        "`python -c 'from seme.zoo import record_digests; record_digests()'`; now: " + json.dumps(got, indent=1))


def test_build_is_reproducible_across_processes_and_thread_settings(tmp_path: Path) -> None:
    """Two builds of one recipe, one here with 1 ambient torch thread and one in another process with
    3, give bit-identical weights: training runs with the recipe's fixed thread count, deterministic
    algorithms and seeds; the caller's torch settings are restored afterwards."""
    import torch

    from seme.zoo import build_zoo, digests

    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = digests(build_zoo(root=tmp_path / "a", recipe=_micro(), progress=False))
        assert torch.get_num_threads() == 1 and not torch.are_deterministic_algorithms_enabled()
    finally:
        torch.set_num_threads(prev)
    code = ("import json, sys, torch; from tests.test_zoo import _micro; from seme.zoo import build_zoo, digests;"
            "torch.set_num_threads(3); print(json.dumps(digests(build_zoo(root=sys.argv[1], recipe=_micro(),"
            " progress=False))))")
    env = {**os.environ, "OMP_NUM_THREADS": "3",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "b")], capture_output=True, text=True,
                       env=env, timeout=600, check=False)
    assert r.returncode == 0, r.stderr[-2000:]
    there = json.loads(r.stdout.strip().splitlines()[-1])
    assert len(here) == 4 and here == there


def test_cache_key_holds_the_code_and_library_versions(tmp_path: Path, monkeypatch) -> None:
    """A zoo built by other code or other libraries is rebuilt, never used."""
    from seme import zoo

    z = zoo.build_zoo(root=tmp_path, recipe=_micro(), progress=False)
    first = _files(z)
    zoo.build_zoo(root=tmp_path, recipe=_micro(), progress=False)
    assert _files(z) == first  # same code, same libraries: a cache hit
    monkeypatch.setattr(zoo, "code_fingerprint", lambda: "0" * 64)
    zoo.build_zoo(root=tmp_path, recipe=_micro(), progress=False)
    rebuilt = _files(z)
    assert set(rebuilt) == set(first) and all(rebuilt[k] != first[k] for k in first)
    real_versions = zoo._versions
    monkeypatch.setattr(zoo, "_versions", lambda: {**real_versions(), "transformers": "0.0"})
    zoo.build_zoo(root=tmp_path, recipe=_micro(), progress=False)
    assert all(_files(z)[k] != rebuilt[k] for k in first)
    assert zoo.load_zoo(z)["versions"]["transformers"] == "0.0"


def test_interrupted_build_resumes_deterministically(tmp_path: Path) -> None:
    """A half-written expert (temp dir) is never used: it is removed and the expert rebuilt, bit-identical
    to the original (seeded LoRA); finished parts are kept. A micro recipe keeps this fast."""
    from seme.zoo import build_zoo, load_zoo

    micro = _micro()
    z = build_zoo(root=tmp_path, recipe=micro, progress=False)
    m0 = load_zoo(z)
    want = m0["experts"]["french_numbers"]["sha256"]
    keep_mtime = (z / "experts" / "arithmetic" / "model.safetensors").stat().st_mtime
    base_mtime = (z / "base" / "model.safetensors").stat().st_mtime
    # an interrupted run: the expert's temp sibling holds a truncated file, the expert is gone
    shutil.rmtree(z / "experts" / "french_numbers")
    stale = z / "experts" / ".french_numbers.tmp-deadbeef"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\x00" * 100)
    (z / "zoo.json").unlink()
    build_zoo(root=tmp_path, recipe=micro, progress=False)
    assert not stale.exists()
    m = load_zoo(z)
    assert m["experts"]["french_numbers"]["sha256"] == want
    assert m["experts"]["arithmetic"]["sha256"] == m0["experts"]["arithmetic"]["sha256"]
    assert (z / "experts" / "arithmetic" / "model.safetensors").stat().st_mtime == keep_mtime  # kept
    assert (z / "base" / "model.safetensors").stat().st_mtime == base_mtime
    # a changed recipe is not a cache hit: that expert is rebuilt, with different weights
    micro2 = replace(micro, experts={**micro.experts, "arithmetic": replace(micro.experts["arithmetic"], seed=9)})
    build_zoo(root=tmp_path, recipe=micro2, progress=False)
    assert load_zoo(z)["experts"]["arithmetic"]["sha256"] != m0["experts"]["arithmetic"]["sha256"]
    assert load_zoo(z)["experts"]["french_numbers"]["sha256"] == want


def test_bad_base_is_a_clear_error(tmp_path: Path) -> None:
    from seme.zoo import build_zoo

    with pytest.raises(CheckpointError, match="neither a .gguf file nor"):
        build_zoo(root=tmp_path / "z", base=tmp_path / "missing.gguf", progress=False)
    bert = tmp_path / "bert"
    bert.mkdir()
    (bert / "config.json").write_text(json.dumps({"model_type": "bert", "architectures": ["BertModel"],
                                                  "hidden_size": 32, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2, "intermediate_size": 64}))
    with pytest.raises(CheckpointError, match="not a causal language model"):
        build_zoo(root=tmp_path / "z", base=bert, progress=False)
    not_gguf = tmp_path / "junk.gguf"
    not_gguf.write_bytes(b"this is not gguf")
    with pytest.raises(CheckpointError, match=r"junk\.gguf"):
        build_zoo(root=tmp_path / "z", base=not_gguf, progress=False)
    # a failed build leaves no base that looks complete
    assert not list((tmp_path / "z").rglob("model.safetensors"))


def test_zoo_cli_build_prints_summary(tiny_zoo: Path, capsys: pytest.CaptureFixture) -> None:
    from seme.cli import main

    assert main(["-q", "zoo", "build", "--tiny", "--out", str(tiny_zoo.parent)]) == 0
    out = capsys.readouterr().out
    assert str(tiny_zoo) in out and "arithmetic" in out and "french_numbers" in out
    assert out.count("own task ") == 2 and "x the base's" in out
