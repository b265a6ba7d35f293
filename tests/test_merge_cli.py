"""`seme merge` end to end on tiny real models, and every bad input giving one clear error line."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from seme.cli import main


def _cfg(tmp_path: Path, method: str, models, base=None, **extra) -> Path:
    cfg = {"merge_method": method, "models": [{"model": str(m)} for m in models], "dtype": "float32", **extra}
    if base:
        cfg["base_model"] = str(base)
    p = tmp_path / f"{method}-{len(list(tmp_path.iterdir()))}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _run(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # drop what fixtures printed (transformers' save progress)
    rc = main(["-q", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


def _assert_one_line_error(rc, err, *needles):
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("seme: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _no_complete_output(out: Path):
    assert not out.exists()
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert leftovers == []


def test_merge_linear_writes_full_checkpoint(tmp_path, tiny_model, perturbed, capsys):
    a = tiny_model("a")
    (a / "tokenizer.json").write_text("{}")
    b = perturbed(a, "b", scale=0.1)
    out = tmp_path / "out"
    rc, stdout, _ = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, b]), out)
    assert rc == 0
    assert "merged" in stdout and "peak RSS" in stdout
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "README.md", "seme_manifest.json", "tokenizer.json"} <= names
    man = json.loads((out / "seme_manifest.json").read_text())
    assert man["method"] == "linear" and man["tensors"] > 0 and man["peak_rss_bytes"] > 0
    assert {f["path"] for f in man["files"]} >= {"model.safetensors", "config.json"}
    assert len(man["inputs"]) == 2 and all(len(f["sha256"]) == 64 for i in man["inputs"] for f in i["files"])
    ta, tb, tm = (load_file(p / "model.safetensors") for p in (a, b, out))
    for k in ta:
        assert torch.allclose(tm[k], (ta[k] + tb[k]) / 2, atol=1e-6), k


def test_merged_checkpoint_loads_and_generates(tmp_path, tiny_model, perturbed, capsys):
    from transformers import AutoModelForCausalLM

    a = tiny_model("a")
    b = perturbed(a, "b")
    out = tmp_path / "out"
    assert _run(capsys, "merge", _cfg(tmp_path, "task_arithmetic", [b], base=a), out)[0] == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    gen = model.generate(torch.tensor([[1, 2, 3]]), max_new_tokens=4, do_sample=False)
    assert gen.shape == (1, 7)


def test_sharded_output(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    p = _cfg(tmp_path, "linear", [a, a], out_shard_size=20000)
    out = tmp_path / "out"
    assert _run(capsys, "merge", p, out)[0] == 0
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / s).exists() for s in shards)
    from seme.checkpoint import Checkpoint

    merged, orig = Checkpoint(out), Checkpoint(a)
    for n in orig.names:
        assert torch.equal(merged.get(n), orig.get(n))


def test_bf16_out_dtype(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    out = tmp_path / "out"
    assert _run(capsys, "merge", _cfg(tmp_path, "linear", [a], out_dtype="bfloat16"), out)[0] == 0
    sd = load_file(out / "model.safetensors")
    assert all(v.dtype == torch.bfloat16 for v in sd.values())
    conf = json.loads((out / "config.json").read_text())
    assert conf["dtype"] == "bfloat16" and "torch_dtype" not in conf  # transformers' current key


# --- bad input: each a one-line error and no complete-looking output ---------------------------


def test_missing_model_dir(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, tmp_path / "ghost"]), out)
    _assert_one_line_error(rc, err, "ghost", "no such checkpoint")
    _no_complete_output(out)


def test_missing_weights_file(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    b = tiny_model("b", seed=1)
    (b / "model.safetensors").unlink()
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, b]), out)
    _assert_one_line_error(rc, err, str(b))
    _no_complete_output(out)


@pytest.mark.parametrize("damage", ["truncate", "header"])
def test_corrupt_safetensors(tmp_path, tiny_model, capsys, damage):
    a = tiny_model("a")
    b = tiny_model("b", seed=1)
    f = b / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) // 2] if damage == "truncate" else b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, b]), out)
    _assert_one_line_error(rc, err, "model.safetensors", "corrupt or truncated")
    _no_complete_output(out)


def _rewrite(model: Path, fn):
    sd = load_file(model / "model.safetensors")
    fn(sd)
    save_file(sd, model / "model.safetensors", metadata={"format": "pt"})


def test_tensor_missing_from_one_model(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    b = tiny_model("b", seed=1)
    _rewrite(b, lambda sd: sd.pop("model.layers.1.mlp.up_proj.weight"))
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, b]), out)
    _assert_one_line_error(rc, err, "model.layers.1.mlp.up_proj.weight", "missing")
    _no_complete_output(out)


def test_shape_mismatch(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    b = tiny_model("b", seed=1, intermediate_size=96)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, b]), out)
    _assert_one_line_error(rc, err, "mlp", "shape")
    _no_complete_output(out)


def test_different_architectures(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    b = tiny_model("b", family="gpt2")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, b]), out)
    _assert_one_line_error(rc, err, "architecture", "gpt2")
    _no_complete_output(out)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_inf_input(tmp_path, tiny_model, capsys, bad):
    a = tiny_model("a")
    b = tiny_model("b", seed=1)

    def poison(sd):
        sd["model.layers.0.self_attn.k_proj.weight"][0, 0] = bad

    _rewrite(b, poison)
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a, b]), out)
    _assert_one_line_error(rc, err, "model.layers.0.self_attn.k_proj.weight", "NaN" if math.isnan(bad) else "Inf")
    _no_complete_output(out)


def test_unknown_method_and_parameter_and_key(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    out = tmp_path / "out"
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "frankenmerge", [a]), out)
    _assert_one_line_error(rc, err, "frankenmerge", "valid", "linear", "ties")
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a], parameters={"densty": 0.5}), out)
    _assert_one_line_error(rc, err, "densty", "valid")
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a], layer_plan=[]), out)
    _assert_one_line_error(rc, err, "layer_plan", "valid keys")
    _no_complete_output(out)


def test_pickle_checkpoint_needs_flag(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    p = tmp_path / "pkl"
    p.mkdir()
    (p / "config.json").write_text((a / "config.json").read_text())
    torch.save(load_file(a / "model.safetensors"), p / "pytorch_model.bin")
    out = tmp_path / "out"
    cfg = _cfg(tmp_path, "linear", [a, p])
    rc, _, err = _run(capsys, "merge", cfg, out)
    _assert_one_line_error(rc, err, "pytorch_model.bin", "--allow-pickle")
    _no_complete_output(out)
    rc, _, _ = _run(capsys, "merge", cfg, out, "--allow-pickle")
    assert rc == 0 and (out / "model.safetensors").exists()


def test_existing_output_needs_overwrite(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    cfg = _cfg(tmp_path, "linear", [a])
    rc, _, err = _run(capsys, "merge", cfg, out)
    _assert_one_line_error(rc, err, "already exists", "--overwrite")
    assert (out / "keep.txt").read_text() == "mine"
    # --overwrite replaces only a finished seme output, never a user's directory
    rc, _, err = _run(capsys, "merge", cfg, out, "--overwrite")
    _assert_one_line_error(rc, err, str(out), "not a finished seme output")
    assert (out / "keep.txt").read_text() == "mine"
    out2 = tmp_path / "out2"
    assert _run(capsys, "merge", cfg, out2)[0] == 0
    (out2 / "extra.txt").write_text("from the first run")
    assert _run(capsys, "merge", cfg, out2, "--overwrite")[0] == 0
    assert (out2 / "model.safetensors").exists() and not (out2 / "extra.txt").exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


@pytest.fixture
def unwritable_dir(tmp_path):
    """A directory this process cannot write into, even as root: permission bits for a normal user;
    as root (CI), a read-only tmpfs mount, else an immutable directory (chattr +i); skipped only when
    neither is permitted."""
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() != 0:
        ro.chmod(0o500)
        yield ro
        ro.chmod(0o700)
        return
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=64k", "tmpfs", str(ro)], capture_output=True,
                      check=False).returncode == 0:
        yield ro
        subprocess.run(["umount", "-l", str(ro)], check=False)
        return
    if subprocess.run(["chattr", "+i", str(ro)], capture_output=True, check=False).returncode == 0:
        yield ro
        subprocess.run(["chattr", "-i", str(ro)], check=False)
        return
    pytest.skip("as root, neither a read-only tmpfs mount nor chattr +i is permitted here")


def test_unwritable_output_dir(tmp_path, tiny_model, capsys, unwritable_dir):
    a = tiny_model("a")
    assert not os.access(unwritable_dir, os.W_OK)
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a]), unwritable_dir / "out")
    _assert_one_line_error(rc, err, "not writable", str(unwritable_dir))
    assert list(unwritable_dir.iterdir()) == []


def test_output_parent_is_a_file(tmp_path, tiny_model, capsys):
    # Root ignores permission bits, so use a path whose parent is a regular file: not writable as a dir.
    a = tiny_model("a")
    blocker = tmp_path / "file"
    blocker.write_text("x")
    rc, _, err = _run(capsys, "merge", _cfg(tmp_path, "linear", [a]), blocker / "out")
    _assert_one_line_error(rc, err, str(blocker))


def test_cli_subprocess_error_has_no_traceback(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "seme", "merge", str(tmp_path / "none.yaml"), str(tmp_path / "o")],
        capture_output=True, text=True, check=False,
    )
    assert r.returncode == 2
    assert r.stderr.strip() == f"seme: error: {tmp_path / 'none.yaml'}: config file not found"


def test_inspect(tmp_path, tiny_model, capsys):
    a = tiny_model("a")
    rc, out, _ = _run(capsys, "inspect", a, "--json")
    info = json.loads(out)
    assert rc == 0 and info["family"] == "llama" and info["layers"] == 2 and info["hidden_size"] == 64
    assert len(info["files"][0]["sha256"]) == 64
