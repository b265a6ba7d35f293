"""The executor's fast paths (issue 7): zero-copy views, page release, streaming output hashes,
row-block merging of element-wise methods, the sum-based NaN/Inf check and cached input digests.

Every fast path is checked against the plain path it replaces, on real safetensors files.
"""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from seme import merge as merge_mod
from seme.checkpoint import Checkpoint, CheckpointWriter, check_finite, file_records
from seme.config import MergeConfig
from seme.errors import CheckpointError
from seme.fsutil import sha256_file

LLAMA = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 24,
         "intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
         "vocab_size": 37}


def _ckpt(tmp_path, tensors: dict[str, torch.Tensor], name: str = "m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA))
    save_file(tensors, str(d / "model.safetensors"))
    return d


def test_view_is_zero_copy_and_equals_get(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {
        "a": torch.randn(33, 7, generator=g).bfloat16(),
        "b": torch.randn(5, generator=g),
        "c": torch.arange(6, dtype=torch.int64).view(2, 3),
        "e": torch.empty(0, 4),
    }
    ck = Checkpoint(_ckpt(tmp_path, tensors))
    for n, t in tensors.items():
        v = ck.view(n)
        assert v.dtype == t.dtype and v.shape == t.shape and torch.equal(v, t)
        assert torch.equal(ck.get(n), t)
    # the same memory each time (a map, not a copy); get() is an independent copy
    assert ck.view("a").data_ptr() == ck.view("a").data_ptr()
    assert ck.get("a").data_ptr() != ck.view("a").data_ptr()
    # releasing the pages keeps the view valid: the data comes back from the file
    v = ck.view("a")
    ck.release("a")
    ck.release("a", (3, 9))
    assert torch.equal(v, tensors["a"])
    # a stray write into a view never reaches the file (copy-on-write map)
    v.zero_()
    assert torch.equal(load_file(str(ck.files[0]))["a"], tensors["a"])


@pytest.mark.parametrize("shard_bytes", [10**9, 300])
def test_writer_streams_sha256_of_every_shard(tmp_path, shard_bytes):
    g = torch.Generator().manual_seed(1)
    tensors = {f"t{i}": torch.randn(10, i + 1, generator=g) for i in range(6)}
    plan = [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()]
    w = CheckpointWriter(tmp_path, plan, shard_bytes)
    for n, t in tensors.items():
        w.write(n, t)
    files = w.close()
    digests = w.sha256s()
    shards = [f for f in files if f.endswith(".safetensors")]
    assert (len(shards) > 1) == (shard_bytes == 300)
    assert set(digests) == set(shards)
    for f in shards:
        assert digests[f] == sha256_file(tmp_path / f)
    recs = file_records(tmp_path, files, known=digests)
    assert all(r["sha256"] == sha256_file(tmp_path / r["path"]) for r in recs)


def test_writer_out_of_order_falls_back_to_reading(tmp_path):
    tensors = {"x": torch.ones(4, 4), "y": torch.zeros(8)}
    w = CheckpointWriter(tmp_path, [(n, tuple(t.shape), t.dtype) for n, t in tensors.items()])
    w.write("y", tensors["y"])
    w.write("x", tensors["x"])
    (f,) = w.close()
    assert w.sha256s() == {}  # not streamed in order: nothing claimed
    assert file_records(tmp_path, [f], known=w.sha256s())[0]["sha256"] == sha256_file(tmp_path / f)
    assert torch.equal(load_file(str(tmp_path / f))["x"], tensors["x"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_check_finite_finds_nan_and_inf(dtype, bad):
    t = torch.zeros(1000, dtype=dtype)
    t[777] = bad
    with pytest.raises(CheckpointError, match=f"tensor w.* contains {'NaN' if math.isnan(bad) else 'Inf'}"):
        check_finite("w", t, "f.safetensors")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_check_finite_accepts_huge_finite_values_whose_sum_overflows(dtype):
    t = torch.full((64,), torch.finfo(dtype).max, dtype=dtype)
    check_finite("w", t, "f.safetensors")  # the sum overflows; the exact test must clear it
    check_finite("w", torch.empty(0, dtype=dtype), "f.safetensors")


def test_cached_sha256_hits_and_invalidates(tmp_path, monkeypatch):
    monkeypatch.setenv(merge_mod.HASH_CACHE_ENV, str(tmp_path / "cache"))
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 1000)
    d1 = merge_mod.cached_sha256(f)
    assert d1 == sha256_file(f)
    assert len(list((tmp_path / "cache").glob("*.json"))) == 1
    calls = []
    monkeypatch.setattr(merge_mod, "sha256_file", lambda p: calls.append(p) or "x")
    assert merge_mod.cached_sha256(f) == d1 and calls == []  # served from the cache
    # same size, contents changed in place: ctime/mtime move, so the digest is recomputed
    st = f.stat()
    with open(f, "r+b") as fh:
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # even with the old mtime restored
    assert merge_mod.cached_sha256(f) == "x" and calls == [f]
    monkeypatch.setenv(merge_mod.HASH_CACHE_ENV, "off")
    calls.clear()
    merge_mod.cached_sha256(f)
    assert calls == [f]


@pytest.mark.parametrize("method", ["linear", "task_arithmetic"])
def test_row_block_merging_equals_whole_tensor_merging(tmp_path, monkeypatch, method):
    g = torch.Generator().manual_seed(2)
    base = {"big": torch.randn(37, 24, generator=g).bfloat16(), "vec": torch.randn(24, generator=g).bfloat16(),
            "ids": torch.arange(5)}
    dirs = [_ckpt(tmp_path, base, "base")]
    for i in range(3):
        dirs.append(_ckpt(tmp_path, {k: (v + 0.01 * torch.randn(v.shape, generator=g)).to(v.dtype)
                                     if v.is_floating_point() else v for k, v in base.items()}, f"ft{i}"))
    cfg = MergeConfig(
        merge_method=method,
        base_model=str(dirs[0]) if method != "linear" else None,
        models=[{"model": str(d), "parameters": {"weight": w}} for d, w in zip(dirs[1:], (0.3, 0.5, 0.9))],
        dtype="bfloat16",
    )
    monkeypatch.setenv(merge_mod.HASH_CACHE_ENV, "off")
    whole = merge_mod.run_merge(cfg, tmp_path / "whole", progress=False)
    calls = []
    real = merge_mod._merge_rows
    monkeypatch.setattr(merge_mod, "CHUNK_BYTES", 5 * 24 * 2)  # 5 rows per block: 8 blocks
    monkeypatch.setattr(merge_mod, "_merge_rows", lambda *a, **k: calls.append(a[7]) or real(*a, **k))
    monkeypatch.setenv(merge_mod.KERNELS_ENV, "off")  # the torch path (``whole`` used the fused kernels)
    rows = merge_mod.run_merge(cfg, tmp_path / "rows", progress=False)
    assert calls == ["big"]  # only the 2-D tensor above the block size goes through row blocks
    a = load_file(str(whole.out_dir / "model.safetensors"))
    b = load_file(str(rows.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    man = json.loads((rows.out_dir / "seme_manifest.json").read_text())
    rec = {r["path"]: r["sha256"] for r in man["files"]}
    assert rec["model.safetensors"] == sha256_file(rows.out_dir / "model.safetensors")
