"""Helpers for the SeMe tests: function-preserving transformed copies, logits, configs.

The transformations here are written independently of seme.semantic.alignment (plain state-dict edits in
float64), so the tests compare two implementations of the same symmetry.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))[None, :]


def transformed_copy(src: Path, dst: Path, seed: int = 7, rotate: bool = True, permute: bool = True,
                     norm_offset: float = 0.0) -> dict:
    """Write a function-equivalent copy of a llama/qwen2/gemma2 checkpoint.

    Residual rotation Q (norms folded into the reads first, gains set to 1), then random permutations
    of MLP neurons (copy neuron j = original neuron pi[j]) and of KV groups. Returns the truth.
    """
    cfg = json.loads((src / "config.json").read_text())
    sd = {k: v.double() for k, v in load_file(src / "model.safetensors").items()}
    L, d = cfg["num_hidden_layers"], cfg["hidden_size"]
    nh, nkv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    hd = cfg.get("head_dim") or d // nh
    inter = cfg["intermediate_size"]
    g = torch.Generator().manual_seed(seed)
    truth: dict = {"mlp": {}, "attn": {}}
    p = "model.layers.{}."
    if rotate:
        Q = random_orthogonal(d, seed)
        truth["Q"] = Q
        for i in range(L):
            ln, pn = p.format(i) + "input_layernorm.weight", p.format(i) + "post_attention_layernorm.weight"
            for u in ("q", "k", "v"):
                w = p.format(i) + f"self_attn.{u}_proj.weight"
                sd[w] = (sd[w] * sd[ln][None, :]) @ Q.T
            for u in ("gate", "up"):
                w = p.format(i) + f"mlp.{u}_proj.weight"
                sd[w] = (sd[w] * sd[pn][None, :]) @ Q.T
            sd[ln] = torch.ones(d, dtype=torch.float64)
            sd[pn] = torch.ones(d, dtype=torch.float64)
            for w in (p.format(i) + "self_attn.o_proj.weight", p.format(i) + "mlp.down_proj.weight"):
                sd[w] = Q @ sd[w]
        sd["lm_head.weight"] = (sd["lm_head.weight"] * sd["model.norm.weight"][None, :]) @ Q.T
        sd["model.norm.weight"] = torch.ones(d, dtype=torch.float64)
        sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] @ Q.T
    if permute:
        r = nh // nkv
        for i in range(L):
            pi = torch.randperm(inter, generator=g)
            truth["mlp"][i] = pi
            for u in ("gate", "up"):
                w = p.format(i) + f"mlp.{u}_proj.weight"
                sd[w] = sd[w][pi]
            w = p.format(i) + "mlp.down_proj.weight"
            sd[w] = sd[w][:, pi]
            gp = torch.randperm(nkv, generator=g)
            truth["attn"][i] = gp
            qheads = (gp[:, None] * r + torch.arange(r)[None, :]).reshape(-1)
            qrows = (qheads[:, None] * hd + torch.arange(hd)).reshape(-1)
            kvrows = (gp[:, None] * hd + torch.arange(hd)).reshape(-1)
            for u, rows in (("q", qrows), ("k", kvrows), ("v", kvrows)):
                for kind in ("weight", "bias"):
                    w = p.format(i) + f"self_attn.{u}_proj.{kind}"
                    if w in sd:
                        sd[w] = sd[w][rows]
            w = p.format(i) + "self_attn.o_proj.weight"
            sd[w] = sd[w][:, qrows]
    dst.mkdir(parents=True, exist_ok=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copyfile(f, dst / f.name)
    save_file({k: v.float().contiguous() for k, v in sd.items()}, dst / "model.safetensors",
              metadata={"format": "pt"})
    return truth


def logits(model_dir: Path, ids: torch.Tensor | None = None) -> torch.Tensor:
    """Float32 logits of a checkpoint on fixed random token ids (transformers forward)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    if ids is None:
        ids = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        return model(input_ids=ids).logits


def seme_config(models: list[Path], base: Path | None = None, **params) -> dict:
    cfg: dict = {"merge_method": "seme", "models": [{"model": str(m)} for m in models], "parameters": params}
    if base is not None:
        cfg["base_model"] = str(base)
    return cfg


def tensors(model_dir: Path) -> dict[str, torch.Tensor]:
    out = {}
    for f in sorted(Path(model_dir).glob("*.safetensors")):
        out.update(load_file(f))
    return out
