"""Checkpoint reader/writer on real safetensors files."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from seme.checkpoint import Checkpoint, CheckpointWriter, copy_side_files
from seme.errors import CheckpointError, OutputError
from seme.fsutil import atomic_dir


def _plan(sd):
    return [(k, tuple(v.shape), v.dtype) for k, v in sd.items()]


def test_writer_single_file_roundtrip(tmp_path):
    sd = {"a": torch.randn(3, 4), "b": torch.randn(5).to(torch.bfloat16), "c": torch.arange(6)}
    w = CheckpointWriter(tmp_path, _plan(sd))
    for k in reversed(list(sd)):  # any order works: offsets are planned
        w.write(k, sd[k])
    assert w.close() == ["model.safetensors"]
    back = load_file(tmp_path / "model.safetensors")
    for k, v in sd.items():
        assert torch.equal(back[k], v)


def test_writer_shards_and_index_roundtrip(tmp_path):
    sd = {f"t{i}": torch.randn(64, 64) for i in range(5)}  # 16 KiB each
    w = CheckpointWriter(tmp_path, _plan(sd), max_shard_bytes=40_000)
    for k, v in sd.items():
        w.write(k, v)
    files = w.close()
    assert files[-1] == "model.safetensors.index.json"
    assert files[:-1] == [f"model-{i:05d}-of-00003.safetensors" for i in (1, 2, 3)]
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["metadata"]["total_size"] == 5 * 64 * 64 * 4
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 64}))
    ck = Checkpoint(tmp_path)
    assert sorted(ck.names) == sorted(sd)
    for k, v in sd.items():
        assert torch.equal(ck.get(k), v)
        assert ck.shape(k) == (64, 64) and ck.dtype(k) == torch.float32


def test_writer_rejects_wrong_shape_and_missing(tmp_path):
    w = CheckpointWriter(tmp_path, [("a", (2, 2), torch.float32), ("b", (2,), torch.float32)])
    with pytest.raises(CheckpointError, match="tensor a"):
        w.write("a", torch.zeros(3, 2))
    w.write("a", torch.zeros(2, 2))
    with pytest.raises(CheckpointError, match="tensor b was planned but never written"):
        w.close()


def _model_dir(tmp_path, name="m"):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4}))
    save_file({"w": torch.ones(4, 4)}, d / "model.safetensors")
    return d


def test_reader_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint"):
        Checkpoint(tmp_path / "nope")
    d = _model_dir(tmp_path)
    raw = (d / "model.safetensors").read_bytes()
    (d / "model.safetensors").write_bytes(raw[:-10])  # truncated
    with pytest.raises(CheckpointError, match=r"model\.safetensors: corrupt or truncated"):
        Checkpoint(d)
    (d / "model.safetensors").write_bytes(b"\xff" * 64)  # garbage header
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        Checkpoint(d)


def test_pickle_refused_unless_allowed(tmp_path):
    d = tmp_path / "p"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4}))
    torch.save({"w": torch.ones(2, 2)}, d / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pickle checkpoint refused"):
        Checkpoint(d)
    ck = Checkpoint(d, allow_pickle=True)
    assert torch.equal(ck.get("w"), torch.ones(2, 2))


def test_atomic_dir_leaves_nothing_on_failure(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError), atomic_dir(out) as tmp:
        (tmp / "model.safetensors").write_text("partial")
        raise RuntimeError("boom")
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []
    out.mkdir()
    with pytest.raises(OutputError, match="already exists"), atomic_dir(out):
        pass
    with pytest.raises(OutputError, match="not a finished seme output"), atomic_dir(out, overwrite=True):
        pass
    with atomic_dir(out, overwrite=True, markers=None) as tmp:  # seme's own caches replace any dir
        (tmp / "x").write_text("new")
    assert (out / "x").read_text() == "new"


def test_copy_side_files(tmp_path):
    src = _model_dir(tmp_path, "src")
    (src / "tokenizer.json").write_text("{}")
    (src / "generation_config.json").write_text("{}")
    dst = tmp_path / "dst"
    dst.mkdir()
    got = copy_side_files(src, dst)
    assert set(got) == {"config.json", "tokenizer.json", "generation_config.json"}


def _raw_file(header: dict, data: bytes) -> bytes:
    h = json.dumps(header).encode()
    return len(h).to_bytes(8, "little") + h + data


@pytest.mark.parametrize(("header", "data", "why"), [
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 12, "ends at byte"),  # trailing bytes
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}}, b"\0" * 8, "do not match shape"),
    ({"w": {"dtype": "Q7", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid entry"),
    ({"w": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "gap or overlap"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}}, b"\0" * 12, "gap or overlap"),
    ({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8, "invalid entry"),
    ([1, 2], b"", "not a JSON object"),
])
def test_reader_checks_the_header_as_safetensors_does(tmp_path, header, data, why):
    """The reader validates headers itself (no safetensors/torch import on the fast path): every
    defect the safetensors library rejects is a one-line error naming the file."""
    d = _model_dir(tmp_path)
    (d / "model.safetensors").write_bytes(_raw_file(header, data))
    with pytest.raises(CheckpointError, match=rf"model\.safetensors: corrupt or truncated safetensors file \(.*{why}"):
        Checkpoint(d)


def test_array_view_matches_the_tensor(tmp_path):
    """``Checkpoint.array``: the raw bits over the memory map, equal to the tensor's."""
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 1, "hidden_size": 4}))
    sd = {"a": torch.randn(3, 5).to(torch.bfloat16), "b": torch.randn(7), "i": torch.arange(4), "e": torch.empty(0)}
    save_file(sd, d / "model.safetensors")
    ck = Checkpoint(d)
    assert ck.st_dtype("a") == "BF16" and ck.dtype("a") == torch.bfloat16
    for n, t in sd.items():
        arr = ck.array(n)
        assert arr.nbytes == t.numel() * t.element_size()
        assert arr.tobytes() == t.contiguous().view(torch.uint8).numpy().tobytes()
