"""Shared fixtures: tiny real Hugging Face checkpoints built from transformers configs."""
# ruff: noqa: C408  (keyword dicts read like the transformers configs they build)

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("MPLBACKEND", "Agg")

sys.path.insert(0, str(Path(__file__).parent))  # tests/services.py and helpers importable

pytest_plugins = ["services"]  # service fixtures (moto S3, MLflow) live in tests/services.py

TINY = {
    "llama": dict(
        model_type="llama", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "qwen2": dict(
        model_type="qwen2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        tie_word_embeddings=False,
    ),
    "gemma2": dict(
        model_type="gemma2", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        max_position_embeddings=64, sliding_window=32,
    ),
    "qwen3": dict(
        model_type="qwen3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        max_position_embeddings=64, tie_word_embeddings=False,
    ),
    "phi3": dict(
        model_type="phi3", hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128, max_position_embeddings=64,
        pad_token_id=0, tie_word_embeddings=False,
    ),
    "gpt2": dict(model_type="gpt2", n_embd=64, n_layer=2, n_head=4, vocab_size=128, n_positions=64),
}


def make_tiny_model(out: Path, family: str = "llama", seed: int = 0, **overrides) -> Path:
    """Write a random tiny model of ``family`` with transformers' save_pretrained (safetensors)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(TINY[family])
    kw.update(overrides)
    model_type = kw.pop("model_type")
    cfg = AutoConfig.for_model(model_type, **kw)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():  # make norms non-trivial so tests see them
        for n, p in model.named_parameters():
            if "norm" in n or "ln_" in n:
                p.add_(0.1 * torch.randn_like(p))
    model.save_pretrained(out, safe_serialization=True)
    return out


def perturb_model(src: Path, dst: Path, scale: float = 0.01, seed: int = 1) -> Path:
    """A fine-tune-like variant: src + scale * N(0, std(tensor)) per tensor (same config)."""
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    g = torch.Generator().manual_seed(seed)
    for f in src.glob("*.safetensors"):
        sd = load_file(f)
        out = {}
        for k, v in sorted(sd.items()):
            if v.is_floating_point():
                noise = torch.randn(v.shape, generator=g, dtype=torch.float32)
                std = float(v.float().std()) if v.numel() > 1 else 1.0
                out[k] = (v.float() + scale * (std or 1.0) * noise).to(v.dtype)
            else:
                out[k] = v
        save_file(out, dst / f.name, metadata={"format": "pt"})
    return dst


@pytest.fixture(autouse=True, scope="session")
def _threads():
    import torch

    torch.set_num_threads(2)


@pytest.fixture
def tiny_model(tmp_path):
    """Factory: tiny_model(name="m", family="llama", seed=0, **config_overrides) -> Path."""

    def make(name: str = "m", family: str = "llama", seed: int = 0, **overrides) -> Path:
        return make_tiny_model(tmp_path / name, family=family, seed=seed, **overrides)

    return make


@pytest.fixture
def perturbed(tmp_path):
    """Factory: perturbed(src, name, scale=0.01, seed=1) -> Path."""

    def make(src: Path, name: str, scale: float = 0.01, seed: int = 1) -> Path:
        return perturb_model(src, tmp_path / name, scale=scale, seed=seed)

    return make


@pytest.fixture(scope="session")
def tiny_zoo() -> Path:
    """The tiny CI zoo (``seme zoo build --tiny``), from the zoo cache ($SEME_ZOO_DIR or
    ~/.cache/seme/zoo): built once per machine (a few minutes on 2 cores), keyed by its recipe, code and libraries."""
    from seme.zoo import build_zoo

    return build_zoo(tiny=True, progress=False)
