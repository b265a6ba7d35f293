"""The zoo: tiny CI zoo build, cache hits, deterministic resume after an interruption, bad bases.

Everything is real: a small llama really pretrained on pydoc_data text, LoRA experts really
fine-tuned and merged. The tiny zoo lives in the zoo cache ($SEME_ZOO_DIR or ~/.cache/seme/zoo),
so it is built once per machine (about 5-8 CPU-minutes) and is a cache hit afterwards.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest

from seme.errors import CheckpointError
from seme.fsutil import sha256_file


def test_tiny_zoo_manifest_and_cache_hit(tiny_zoo: Path) -> None:
    from seme.zoo import build_zoo, load_zoo

    m = load_zoo(tiny_zoo)
    assert m["suite"] == "tiny"
    assert set(m["experts"]) == {"arithmetic", "french_numbers"}
    seeds = set()
    for name, e in m["experts"].items():
        d = tiny_zoo / e["path"]
        assert sha256_file(d / "model.safetensors") == e["sha256"]
        assert len(e["train_data_sha256"]) == 64 and len(e["heldout_data_sha256"]) == 64
        assert e["loss_last"] < e["loss_first"], name  # the fine-tune really learned something
        assert (d / "tokenizer.json").is_file() and (d / "config.json").is_file()
        seeds.add(e["recipe"]["seed"])
        assert e["sha256"] != m["base"]["sha256"]
    assert len(seeds) == 2
    mtimes = {p: p.stat().st_mtime for p in tiny_zoo.rglob("model.safetensors")}
    t0 = time.perf_counter()
    again = build_zoo(root=tiny_zoo.parent, tiny=True, progress=False)
    assert again == tiny_zoo
    assert time.perf_counter() - t0 < 20, "a warm zoo must be a cache hit"
    assert {p: p.stat().st_mtime for p in tiny_zoo.rglob("model.safetensors")} == mtimes


def test_interrupted_build_resumes_deterministically(tmp_path: Path) -> None:
    """A half-written expert (temp dir) is never used: it is removed and the expert rebuilt, bit-identical
    to the original (seeded LoRA); finished parts are kept. A micro recipe keeps this fast."""
    from dataclasses import replace

    from seme.zoo import TINY, build_zoo, load_zoo

    micro = replace(TINY, name="micro", tiny_steps=8,
                    experts={k: replace(v, steps=6, batch=8) for k, v in TINY.experts.items()})
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
