"""SeMe alignment (§3): function-preserving transforms, their recovery, vocabulary maps, bad input."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from seme_helpers import logits, seme_config, transformed_copy

from seme.checkpoint import Checkpoint
from seme.config import load_config
from seme.errors import AlignmentError
from seme.semantic.alignment import align, compute_alignment
from seme.semantic.artifact import load_alignment
from seme.semantic.transform import Layout, ModelView


@pytest.mark.parametrize("family,rotate", [("llama", True), ("qwen2", True), ("gemma2", False)])
def test_transformed_copy_has_same_logits(tiny_model, tmp_path, family, rotate):
    src = tiny_model("orig", family=family)
    truth = transformed_copy(src, tmp_path / "copy", rotate=rotate)
    assert truth["mlp"] and (("Q" in truth) == rotate)
    a, b = logits(src), logits(tmp_path / "copy")
    assert (a - b).abs().max() < 1e-3
    # and the copy really differs in its weights
    w0 = load_file(src / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    w1 = load_file(tmp_path / "copy" / "model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert (w0 - w1).abs().max() > 1e-2


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_align_recovers_permutation_and_rotation(tiny_model, tmp_path, family):
    src = tiny_model("orig", family=family)
    truth = transformed_copy(src, tmp_path / "copy")
    cfg = load_config(seme_config([src, tmp_path / "copy"]))
    out = align(cfg, tmp_path / "al")
    al = load_alignment(out)
    assert al.meta["rotation"]["applied"] is True
    R = al.tensors["rotation.1"]
    assert (R - truth["Q"].T).abs().max() < 1e-4  # x_anchor = R x_copy and x_copy = Q x_anchor
    for layer, pi in truth["mlp"].items():
        assert torch.equal(al.tensors[f"mlp_perm.1.{layer}"], torch.argsort(pi))
    for layer, gp in truth["attn"].items():
        if torch.equal(gp, torch.arange(gp.numel())):
            assert f"attn_perm.1.{layer}" not in al.tensors
        else:
            assert torch.equal(al.tensors[f"attn_perm.1.{layer}"], torch.argsort(gp))
    # Every tensor of the aligned copy equals the (norm-folded) original.
    ck_a, ck_c = Checkpoint(src), Checkpoint(tmp_path / "copy")
    lay = Layout(ck_a.architecture, ck_a.names)
    va = ModelView(ck_a, lay, al.model_alignment("0"))
    vc = ModelView(ck_c, lay, al.model_alignment("1"))
    for name in ck_a.names:
        assert (va.get(name) - vc.get(name)).abs().max() < 1e-4, name
    for f in ("alignment.json", "alignment.safetensors", "semantic_shift.png", "coefficients.png"):
        assert (out / f).stat().st_size > 0
    meta = json.loads((out / "alignment.json").read_text())
    assert meta["models"]["1"]["sha256"] and meta["f_spectrum"]["min"] > 0 and meta["timings"]["total_s"] > 0
    assert set(meta["modules"]) >= {"attn.0", "mlp.1", "embed", "head"}


def test_align_to_itself_is_identity(tiny_model, tmp_path):
    src = tiny_model("m")
    al = compute_alignment(load_config(seme_config([src, src])), [Checkpoint(src), Checkpoint(src)], None)
    assert al.meta["rotation"]["applied"] is False
    assert al.meta["models"]["1"]["rotation"]["deviation_from_identity"] < 1e-6
    assert not any(k.startswith(("mlp_perm", "attn_perm", "rotation", "vocab_map")) for k in al.tensors)
    assert all(p[k]["identity"] for p in al.meta["models"]["1"]["permutations"].values() for k in p)


def test_fine_tunes_of_one_base_are_not_rotated(tiny_model, perturbed, tmp_path):
    base = tiny_model("base")
    a, b = perturbed(base, "a", 0.01, 1), perturbed(base, "b", 0.01, 2)
    al = compute_alignment(load_config(seme_config([a, b], base)), [Checkpoint(a), Checkpoint(b)], Checkpoint(base))
    assert al.meta["rotation"]["applied"] is False
    assert not any(k.startswith(("mlp_perm", "attn_perm")) for k in al.tensors)


def _write_vocab(model_dir: Path, strings: list[str]) -> None:
    tok = {"model": {"type": "BPE", "vocab": {s: i for i, s in enumerate(strings)}}, "added_tokens": []}
    (model_dir / "tokenizer.json").write_text(json.dumps(tok))


def test_vocabulary_mapping_by_token_string(tiny_model, tmp_path):
    src = tiny_model("orig")
    V = 128
    strings = [f"tok{i}" for i in range(V)]
    _write_vocab(src, strings)
    # The other model stores the same tokens in a shuffled order, with its own token strings order.
    perm = torch.randperm(V, generator=torch.Generator().manual_seed(3))  # other id j = original id perm[j]
    other = tmp_path / "other"
    other.mkdir()
    sd = load_file(src / "model.safetensors")
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        sd[n] = sd[n][perm].contiguous()
    save_file(sd, other / "model.safetensors", metadata={"format": "pt"})
    (other / "config.json").write_text((src / "config.json").read_text())
    _write_vocab(other, [strings[int(p)] for p in perm])
    al = compute_alignment(load_config(seme_config([src, other])), [Checkpoint(src), Checkpoint(other)], None)
    assert al.meta["models"]["1"]["vocabulary"]["mode"] == "by_string"
    assert al.meta["rotation"]["applied"] is False
    lay = Layout(Checkpoint(src).architecture, Checkpoint(src).names)
    v = ModelView(Checkpoint(other), lay, al.model_alignment("1"))
    for n in ("model.embed_tokens.weight", "lm_head.weight"):
        whole = load_file(src / "model.safetensors")[n]
        assert torch.equal(v.get(n), whole)
        # blocks of rows in the anchor's token order (how statistics and merge stream embeddings)
        assert torch.equal(torch.cat([v.get(n, (lo, min(lo + 48, V))) for lo in range(0, V, 48)]), whole)
    # No shared token string: a clear error.
    _write_vocab(other, [f"zz{i}" for i in range(V)])
    with pytest.raises(AlignmentError, match="shares no token"):
        compute_alignment(load_config(seme_config([src, other])), [Checkpoint(src), Checkpoint(other)], None)


def test_bad_inputs_are_clear_errors(tiny_model, tmp_path):
    llama = tiny_model("llama")
    qwen = tiny_model("qwen", family="qwen2")
    narrow = tiny_model("narrow", hidden_size=32, intermediate_size=64)

    def run(models):
        return compute_alignment(load_config(seme_config(models)), [Checkpoint(m) for m in models], None)

    with pytest.raises(AlignmentError, match="family"):
        run([llama, qwen])
    with pytest.raises(AlignmentError, match="hidden_size"):
        run([llama, narrow])
    sd = load_file(llama / "model.safetensors")
    for name, edit, msg in (("singular", lambda h: h[:, :1].repeat(1, h.shape[1]), "singular"),
                            ("nan", lambda h: h.index_fill(0, torch.tensor([5]), float("nan")), "NaN")):
        bad = tmp_path / name
        bad.mkdir()
        (bad / "config.json").write_text((llama / "config.json").read_text())
        sd2 = dict(sd)
        sd2["lm_head.weight"] = edit(sd["lm_head.weight"]).contiguous()
        save_file(sd2, bad / "model.safetensors", metadata={"format": "pt"})
        with pytest.raises(AlignmentError, match=msg):
            run([bad, llama])


def test_cli_align_and_atomic_output(tiny_model, tmp_path):
    src = tiny_model("orig")
    transformed_copy(src, tmp_path / "copy")
    cfg = tmp_path / "seme.yaml"
    cfg.write_text(json.dumps(seme_config([src, tmp_path / "copy"])))
    out = tmp_path / "artifact"
    r = subprocess.run([sys.executable, "-m", "seme", "align", str(cfg), str(out)], capture_output=True, text=True, check=False,
                       env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"}, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "rotation applied" in r.stdout and (out / "alignment.json").is_file()
    r = subprocess.run([sys.executable, "-m", "seme", "align", str(cfg), str(out)], capture_output=True, text=True,
                       check=False, timeout=120)
    assert r.returncode != 0 and "already exists" in r.stderr
    # A failing alignment leaves nothing that looks complete.
    bad = tmp_path / "bad.yaml"
    bad.write_text(json.dumps(seme_config([src, tiny_model("q", family="qwen2")])))
    r = subprocess.run([sys.executable, "-m", "seme", "align", str(bad), str(tmp_path / "never")],
                       capture_output=True, text=True, check=False, timeout=120)
    assert r.returncode != 0 and "seme: error:" in r.stderr and "family" in r.stderr
    assert not (tmp_path / "never").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".never")]
