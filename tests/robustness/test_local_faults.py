"""Faults during a local merge, with real ``python -m seme`` processes: kill -9 and SIGTERM mid-merge
(then a rerun succeeds and no temp dir survives it), two concurrent merges into one OUT_DIR (exactly
one wins), a directory created by someone else during the merge (never replaced), a full disk (a
small tmpfs; the error names the path).

The merge is made long enough to be caught in the act by giving the model many small tensors (a few
thousand: the executor's per-tensor cost dominates), and each fault is injected only once the temp
directory holds the output shard, i.e. while tensors are being written.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from robustness.harness import (
    Result,
    assert_clean_failure,
    leftover_temps,
    run_seme,
    seme_env,
    snapshot,
    try_mount_tmpfs,
    umount,
)

N_TENSORS = 3000


@pytest.fixture(scope="module")
def slow(tmp_path_factory) -> dict[str, Path]:
    """Two models of N_TENSORS small tensors each, and linear configs with different weights."""
    import torch
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("slow")
    for name, seed in (("a", 0), ("b", 1)):
        d = root / "in" / name
        d.mkdir(parents=True)
        g = torch.Generator().manual_seed(seed)
        save_file({f"model.layers.0.mlp.p{i}.weight": torch.randn(64, generator=g) for i in range(N_TENSORS)},
                  d / "model.safetensors")
        (d / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 64, "num_hidden_layers": 1,
                                                   "num_attention_heads": 4, "vocab_size": 128}))
    cfgs = {}
    for tag, wa in (("c1", 0.25), ("c2", 0.75)):
        cfgs[tag] = root / "in" / f"{tag}.yaml"
        cfgs[tag].write_text(yaml.safe_dump({
            "merge_method": "linear",
            "models": [{"model": str(root / "in" / "a"), "parameters": {"weight": wa}},
                       {"model": str(root / "in" / "b"), "parameters": {"weight": 1 - wa}}],
        }))
    return {"root": root, "in": root / "in", **cfgs}


def start_merge(cfg: Path, out: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "seme", "-q", "merge", str(cfg), str(out), *extra],
                            env=seme_env(SEME_HASH_CACHE="off"), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(p: subprocess.Popen, argv: list[str] | None = None, timeout: float = 120) -> Result:
    out, err = p.communicate(timeout=timeout)
    return Result(argv or [str(a) for a in p.args[3:]], p.returncode, out, err)


def wait_writing(p: subprocess.Popen, parent: Path, timeout: float = 60) -> Path:
    """Wait until a merge's temp dir holds its output shard (tensors are being written); return it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert p.poll() is None, f"merge ended before the fault could be injected: rc={p.returncode} {p.stderr.read()}"
        for t in leftover_temps(parent):
            if (t / "model.safetensors").exists():
                return t
        time.sleep(0.005)
    raise AssertionError("the merge never started writing")


def assert_complete(out: Path, cfg: Path | None = None) -> dict:
    m = json.loads((out / "seme_manifest.json").read_text())
    assert (out / "model.safetensors").is_file() and m["tensors"] == N_TENSORS
    if cfg is not None:
        assert m["config_path"] == str(cfg)
    return m


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_mid_merge_cleans_up(slow, tmp_path, sig):
    out = tmp_path / "out"
    (tmp_path / "unrelated.txt").write_text("keep")
    before = snapshot(slow["in"], tmp_path)
    p = start_merge(slow["c1"], out)
    wait_writing(p, tmp_path)
    p.send_signal(sig)
    r = finish(p)
    line = assert_clean_failure(r, names="interrupted", out=out, before=before, roots=(slow["in"], tmp_path),
                                rc=143 if sig == signal.SIGTERM else 130)
    assert line == "seme: error: interrupted"
    assert not out.exists()


def test_kill9_mid_merge_then_rerun(slow, tmp_path):
    out = tmp_path / "out"
    before = snapshot(slow["in"])
    p = start_merge(slow["c1"], out)
    tmp = wait_writing(p, tmp_path)
    p.kill()
    p.wait(timeout=60)
    assert tmp.exists() and not out.exists()  # kill -9 runs no cleanup: the temp dir stays...
    r = run_seme(["-q", "merge", slow["c1"], out], env=seme_env(SEME_HASH_CACHE="off"))
    assert r.rc == 0, r
    assert_complete(out, slow["c1"])
    assert leftover_temps(tmp_path) == []  # ...until the next run, which removes it (its owner is gone)
    assert snapshot(slow["in"]) == before


def test_stale_temp_of_a_live_process_is_kept(slow, tmp_path):
    """Only temps whose process is gone are removed: a running merge's temp dir survives another run."""
    out = tmp_path / "out"
    p = start_merge(slow["c1"], out)
    tmp = wait_writing(p, tmp_path)
    r = run_seme(["-q", "merge", slow["c2"], tmp_path / "other"], env=seme_env(SEME_HASH_CACHE="off"))
    assert r.rc == 0, r
    assert tmp.exists() or out.exists()  # the live merge's temp dir (or, if done, its output) is intact
    assert finish(p).rc == 0
    assert_complete(out, slow["c1"])
    assert leftover_temps(tmp_path) == []


def test_two_concurrent_merges_one_wins(slow, tmp_path):
    out = tmp_path / "out"
    p1, p2 = start_merge(slow["c1"], out), start_merge(slow["c2"], out)
    r1, r2 = finish(p1), finish(p2)
    wins = [r for r in (r1, r2) if r.rc == 0]
    assert len(wins) == 1, f"{r1}\n{r2}"
    loser = r2 if wins[0] is r1 else r1
    assert_clean_failure(loser, names=str(out))
    assert_complete(out, slow["c1"] if wins[0] is r1 else slow["c2"])  # the winner's output, whole
    assert leftover_temps(tmp_path) == []


@pytest.mark.parametrize("overwrite", [False, True], ids=["plain", "overwrite"])
def test_dir_created_during_merge_is_never_replaced(slow, tmp_path, overwrite):
    out = tmp_path / "out"
    p = start_merge(slow["c1"], out, *(["--overwrite"] if overwrite else []))
    wait_writing(p, tmp_path)
    out.mkdir()
    (out / "theirs.txt").write_text("created by someone else during the merge")
    before = snapshot(out)
    r = finish(p)
    assert_clean_failure(r, names=str(out), before=before, roots=(out,))
    assert leftover_temps(tmp_path) == []


def test_overwrite_swaps_a_finished_output(slow, tmp_path):
    out = tmp_path / "out"
    assert run_seme(["-q", "merge", slow["c1"], out]).rc == 0
    r = run_seme(["-q", "merge", slow["c2"], out, "--overwrite"])
    assert r.rc == 0, r
    assert_complete(out, slow["c2"])
    assert leftover_temps(tmp_path) == []


@pytest.fixture
def small_disk(tmp_path):
    where = tmp_path / "disk"
    why = try_mount_tmpfs(where, "256k")
    if why:
        pytest.skip(why)
    yield where
    umount(where)


def test_disk_full_names_the_path(slow, small_disk, tmp_path):
    out = small_disk / "out"
    (small_disk / "keep.txt").write_text("on the small disk already")
    before = snapshot(slow["in"], small_disk)
    r = run_seme(["-q", "merge", slow["c1"], out], env=seme_env(SEME_HASH_CACHE="off"))
    line = assert_clean_failure(r, names=[str(out), "No space left on device"], out=out, before=before,
                                roots=(slow["in"], small_disk))
    assert "model.safetensors" in line
    assert sorted(p.name for p in small_disk.iterdir()) == ["keep.txt"]


def test_disk_full_on_align_names_the_path(small_disk, tmp_path):
    """``seme align`` writes through the same atomic directory; a full disk is named there too."""
    from conftest import make_tiny_model, perturb_model

    base = make_tiny_model(tmp_path / "base")
    expert = perturb_model(base, tmp_path / "expert", scale=0.05)
    cfg = tmp_path / "seme.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "seme", "base_model": str(base),
                                   "models": [{"model": str(base)}, {"model": str(expert)}]}))
    # fill the disk but for a few KiB, so the artifact cannot fit
    with open(small_disk / "filler", "wb") as f:
        try:
            f.write(b"\0" * (250 << 10))
        except OSError:
            pass
    before = snapshot(base, expert, small_disk)
    r = run_seme(["-q", "align", cfg, small_disk / "al"])
    assert_clean_failure(r, names=[str(small_disk / "al"), "No space left on device"], out=small_disk / "al",
                         before=before, roots=(base, expert, small_disk))


def test_owner_tagged_temp_names(tmp_path):
    """Temp names carry host and pid; cleanup removes dead owners' temps only, never look-alikes."""
    from seme.fsutil import clean_stale_temps, temp_name

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = tmp_path / temp_name("out")
    assert f"-{os.getpid()}-" in mine.name
    stale = tmp_path / mine.name.replace(f"-{os.getpid()}-", f"-{dead.pid}-")
    other_host = tmp_path / f".out.tmp-elsewhere-{dead.pid}-0123abcd"
    user = tmp_path / ".out.tmp-mine"  # not seme's naming: a user's
    for d in (mine, stale, other_host, user):
        d.mkdir()
    assert clean_stale_temps(tmp_path) == [stale]
    assert mine.exists() and other_host.exists() and user.exists() and not stale.exists()


def _finished(d: Path, tag: str) -> None:
    (d / "seme_manifest.json").write_text(json.dumps({"seme_version": "test", "tag": tag}))


@pytest.mark.parametrize("renameat2", [True, False], ids=["renameat2", "no-renameat2"])
def test_atomic_dir_never_clobbers(tmp_path, monkeypatch, renameat2):
    """The final step on this kernel (renameat2) and on one without it (a C library lacking the call:
    the mkdir-claim fallback): a directory that appears meanwhile is kept; --overwrite swaps only a
    finished output, and a user's directory put in its place meanwhile is kept too."""
    from seme import fsutil
    from seme.errors import OutputError

    if not renameat2:
        monkeypatch.setattr(fsutil, "_LIBC", [object()])  # stands for a libc without renameat2
    out = tmp_path / "out"
    with fsutil.atomic_dir(out) as t:
        _finished(t, "first")
    assert json.loads((out / "seme_manifest.json").read_text())["tag"] == "first"

    late = tmp_path / "late"
    with pytest.raises(OutputError, match="appeared"), fsutil.atomic_dir(late) as t:
        _finished(t, "mine")
        late.mkdir()
        (late / "theirs.txt").write_text("theirs")
    assert [p.name for p in late.iterdir()] == ["theirs.txt"]

    with fsutil.atomic_dir(out, overwrite=True) as t:
        _finished(t, "second")
    assert json.loads((out / "seme_manifest.json").read_text())["tag"] == "second"

    with pytest.raises(OutputError, match="not a finished seme output"), fsutil.atomic_dir(out, overwrite=True) as t:
        _finished(t, "third")
        shutil.rmtree(out)
        out.mkdir()
        (out / "theirs.txt").write_text("theirs")
    assert [p.name for p in out.iterdir()] == ["theirs.txt"]
    assert leftover_temps(tmp_path) == []
