"""Model references (seme.refs): a LoRA adapter applied on the fly equals peft's merge_and_unload
tensor for tensor; a Hugging Face repo id resolves from a cache laid out as huggingface_hub lays it
out, offline; bad references are one-line errors. Real tiny models, a real peft LoRA."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model
from test_mergekit_crosscheck import load_dir


def _merge(tmp_path: Path, cfg: dict, name: str = "out") -> dict[str, torch.Tensor]:
    from seme.config import load_config
    from seme.merge import run_merge

    p = tmp_path / f"{name}.yaml"
    p.write_text(yaml.safe_dump(cfg))
    run_merge(load_config(p), tmp_path / name, progress=False)
    return load_dir(tmp_path / name)


def _lora(base: Path, out: Path, seed: int, dtype: torch.dtype, **kw) -> dict[str, torch.Tensor]:
    """Save a random (non-zero) peft LoRA for ``base`` to ``out``; return peft's merged tensors."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    conf = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                      init_lora_weights=False, **kw)
    get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), conf).save_pretrained(out)
    merged = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base, dtype=dtype), out)
    return {k: v.detach().clone() for k, v in merged.merge_and_unload().state_dict().items()}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lora_adapter_equals_peft_merge_and_unload(tmp_path, dtype):
    base = make_tiny_model(tmp_path / "base", "llama", seed=0, dtype=str(dtype).split(".")[1])
    ref = _lora(base, tmp_path / "adapter", 0, dtype)
    base_sd = load_dir(base)
    for model in (f"{base}+{tmp_path / 'adapter'}", str(tmp_path / "adapter")):  # base+adapter; adapter dir
        ours = _merge(tmp_path, {"models": [{"model": model}], "merge_method": "passthrough"}, f"o{len(model)}")
        assert sorted(ours) == sorted(k for k in ref if k in base_sd)
        for k in ours:
            assert torch.equal(ours[k], ref[k]), k
        assert sum(not torch.equal(ours[k], base_sd[k]) for k in ours) == 6  # 3 modules x 2 layers
    assert not (tmp_path / "adapter" / "model.safetensors").exists()  # nothing materialized


def test_adapters_in_a_task_arithmetic_merge(tmp_path):
    """Two LoRA experts merged with task arithmetic equal the merge of their peft-merged models
    (rslora scaling on one of them)."""
    base = make_tiny_model(tmp_path / "base", "llama", seed=0)
    r1 = _lora(base, tmp_path / "a1", 1, torch.float32)
    r2 = _lora(base, tmp_path / "a2", 2, torch.float32, use_rslora=True)
    for i, r in enumerate((r1, r2)):
        d = tmp_path / f"full{i}"
        shutil.copytree(base, d)
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in r.items() if k in load_dir(base)}, d / "model.safetensors",
                  metadata={"format": "pt"})
    cfg = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32",
           "parameters": {"weight": 0.7}}
    ours = _merge(tmp_path, {**cfg, "models": [{"model": f"{base}+{tmp_path / 'a1'}"},
                                               {"model": str(tmp_path / "a2")}]}, "ad")
    full = _merge(tmp_path, {**cfg, "models": [{"model": str(tmp_path / "full0")},
                                               {"model": str(tmp_path / "full1")}]}, "full")
    for k in full:
        assert torch.equal(ours[k], full[k]), k
    man = json.loads((tmp_path / "ad" / "seme_manifest.json").read_text())
    assert {Path(i["local_path"]).name for i in man["inputs"]} == {"base", "a1", "a2"}
    front = yaml.safe_load((tmp_path / "ad" / "README.md").read_text().split("---")[1])
    assert front["base_model"] == ["base", "a1", "a2"] and front["tags"] == ["merge", "seme", "task_arithmetic"]


def _hub_cache(root: Path, repo: str, src: Path, commit: str, branch: str = "main") -> None:
    """Lay ``src``'s files out as huggingface_hub's cache does: blobs by digest, a snapshot per
    commit of symlinks to them, refs/<branch> naming the commit."""
    repo_dir = root / ("models--" + repo.replace("/", "--"))
    (repo_dir / "blobs").mkdir(parents=True, exist_ok=True)
    snap = repo_dir / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        data = f.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        (repo_dir / "blobs" / digest).write_bytes(data)
        os.symlink(f"../../blobs/{digest}", snap / f.name)
    (repo_dir / "refs").mkdir(exist_ok=True)
    (repo_dir / "refs" / branch).write_text(commit)


def test_hub_id_resolves_from_the_local_cache_offline(tmp_path, monkeypatch):
    a = make_tiny_model(tmp_path / "a", "qwen2", seed=0)
    b = make_tiny_model(tmp_path / "b", "qwen2", seed=1)
    cache = tmp_path / "hub"
    c1, c2 = "1" * 40, "2" * 40
    _hub_cache(cache, "tiny-org/qwen-a", a, c1)
    _hub_cache(cache, "tiny-org/qwen-a", b, c2, branch="v2")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from seme.refs import open_ref

    assert open_ref("tiny-org/qwen-a").path == cache / "models--tiny-org--qwen-a" / "snapshots" / c1
    assert open_ref("tiny-org/qwen-a@v2").path.name == c2
    assert open_ref(f"tiny-org/qwen-a@{c2}").path.name == c2
    ours = _merge(tmp_path, {"models": [{"model": "tiny-org/qwen-a", "parameters": {"weight": 1.0}},
                                        {"model": "tiny-org/qwen-a@v2", "parameters": {"weight": 1.0}}],
                             "merge_method": "linear", "dtype": "float32"})
    la, lb = load_dir(a), load_dir(b)
    for k in ours:
        assert torch.allclose(ours[k], (la[k] + lb[k]) / 2), k
    card = (tmp_path / "out" / "README.md").read_text()
    assert card.startswith("---\nbase_model:\n- tiny-org/qwen-a\nlibrary_name: transformers\n")
    assert "- tiny-org/qwen-a@v2\n" in card.split("---")[2]  # the body names the revision


def _cli(capsys, *argv):
    from seme.cli import main

    capsys.readouterr()  # drop what the fixtures printed
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(rc, err, *needles):
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("seme: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def test_bad_references_are_one_line_errors(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    base = make_tiny_model(tmp_path / "base", "llama", seed=0)
    other = make_tiny_model(tmp_path / "other", "llama", seed=0, hidden_size=32, intermediate_size=64)
    _lora(base, tmp_path / "adapter", 0, torch.float32)
    out = tmp_path / "out"

    def run(model: str):
        p = tmp_path / "c.yaml"
        p.write_text(yaml.safe_dump({"models": [{"model": model}], "merge_method": "passthrough"}))
        return _cli(capsys, "merge", str(p), str(out))

    _one_line(*run("no-such-org/no-such-model")[::2], "no-such-org/no-such-model", "not in the local Hugging Face cache",
              "offline")
    _one_line(*run(f"{other}+{tmp_path / 'adapter'}")[::2], "does not match base", "the adapter's B @ A is")
    _one_line(*run(f"{base}+{other}")[::2], "not a PEFT adapter")
    assert not out.exists()
