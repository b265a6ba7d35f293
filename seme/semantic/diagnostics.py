"""Data-free diagnostics: per-layer knowledge stability of a merged model against its sources (§8).

Probe inputs are unit semantic bases ŝ_i (a fixed subset of 512 tokens of T), scaled to the median
norm of the model's embedding rows. Each layer's MLP (with its pre-norm, and its post-norm where the
family has one) maps a probe to y; its *semantic distribution* is softmax(Ŝ_T ŷ / τ) over the token
subset T (ŷ = y/‖y‖, so the logits are cosines / τ). Per layer we report the mean
KL(p_source ‖ p_merged). No text, no tokenizer, no dataset.

Each model uses its own bases for probes and read-out, so the comparison is in token space and does
not depend on the residual coordinates (a rotated merge compares correctly with unrotated sources).

Part of the method: *data-free diagnostics* (seme-method.md §8), ``seme eval --data-free``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from seme.checkpoint import Checkpoint, open_checkpoint
from seme.errors import EvalError
from seme.semantic.bases import model_basis, spectrum_summary, token_subset
from seme.semantic.settings import resolve_device
from seme.semantic.transform import Layout, ModelAlignment, ModelView


def _act(config: dict[str, Any]):
    from transformers.activations import ACT2FN

    name = config.get("hidden_act") or config.get("hidden_activation") or config.get("activation_function") or "silu"
    if name not in ACT2FN:
        raise EvalError(f"unknown activation {name!r} in config.json")
    return ACT2FN[name]


def _rms(x: torch.Tensor, gain: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * gain


def mlp_forward(view: ModelView, layer: int, x: torch.Tensor) -> torch.Tensor:
    """What layer ``layer``'s MLP block writes to the residual for input x (pre-norm, MLP, post-norm)."""
    lay, arch, cfg = view.layout, view.arch, view.ckpt.config
    eps = float(cfg.get("rms_norm_eps") or cfg.get("layer_norm_epsilon") or cfg.get("layer_norm_eps") or 1e-6)
    by = lay.by_unit
    if (layer, "post_attn_norm_weight") in by:  # LayerNorm pre-norm (GPT-2)
        w, b = view.get(by[(layer, "post_attn_norm_weight")]), view.get(by[(layer, "post_attn_norm_bias")])
        h = torch.nn.functional.layer_norm(x, (x.shape[-1],), w, b, eps)
    else:
        norm_unit = next((n for n, reads in arch.norm_feeds.items() if {"gate", "up", "gate_up"} & set(reads)),
                         None)
        name = by.get((layer, norm_unit)) if norm_unit else None
        h = _rms(x, view.gain(name), eps) if name else x
    act = _act(cfg)

    def lin(unit: str, inp: torch.Tensor) -> torch.Tensor | None:
        name = by.get((layer, unit))
        if name is None:
            return None
        out = inp @ view.get(name).T
        bias = by.get((layer, f"{unit}_bias"))
        return out + view.get(bias) if bias else out

    gu = lin("gate_up", h)
    if gu is not None:
        g, u = gu.chunk(2, dim=-1)
        a = act(g) * u
    else:
        g, u = lin("gate", h), lin("up", h)
        if u is None:
            raise EvalError(f"{view.ckpt.path}: layer {layer} has no MLP input projection")
        a = act(g) * u if g is not None else act(u)
    y = lin("down", a)
    if y is None:
        raise EvalError(f"{view.ckpt.path}: layer {layer} has no MLP output projection")
    post = by.get((layer, "post_ffn_norm"))
    return _rms(y, view.gain(post), eps) if post else y


def data_free_report(model_dir: str | os.PathLike, sources: list[str | os.PathLike], device: str = "cpu",
                     probes: int = 512, tau: float = 0.05, tokens: int = 8192) -> dict[str, Any]:
    """Per-layer mean KL(source ‖ merged) of MLP semantic distributions on basis probes (§8)."""
    device = resolve_device(device)
    if not sources:
        raise EvalError("data-free diagnostics need at least one --sources model")
    merged = open_checkpoint(model_dir)
    srcs = [open_checkpoint(s) for s in sources]
    arch = merged.architecture
    for s in srcs:
        a = s.architecture
        for f in ("family", "hidden_size", "num_layers", "vocab_size"):
            if getattr(a, f) != getattr(arch, f):
                raise EvalError(f"{s.path}: {f} {getattr(a, f)!r} differs from {merged.path}'s {getattr(arch, f)!r}")
    from seme.merge import check_compatible  # same tensor names and shapes, or one clear error

    check_compatible([merged, *srcs])

    def prepare(ck: Checkpoint) -> tuple[ModelView, Any]:
        lay = Layout(ck.architecture, ck.names)
        basis = model_basis(ck, lay, None, 1e-6, device)
        return ModelView(ck, lay, ModelAlignment(), device=device), basis

    mv, mb = prepare(merged)
    T = token_subset(mb.W, merged.config, tokens)
    step = max(1, math.ceil(T.numel() / probes))
    probe_ids = T[::step][:probes]
    models = [(mv, mb)] + [prepare(s) for s in srcs]
    inputs, readouts = [], []
    with torch.no_grad():
        for view, basis in models:
            emb = view.get(view.layout.embed or view.layout.head_name())
            scale = float(emb.norm(dim=1).median())
            inputs.append((basis.unit_rows(probe_ids) * scale).float().to(device))
            readouts.append(basis.unit_rows(T).float().to(device))
        layers = []
        for layer in range(arch.num_layers):
            logps = []
            for (view, _b), x, S in zip(models, inputs, readouts):
                y = mlp_forward(view, layer, x)
                y = y / y.norm(dim=-1, keepdim=True).clamp_min(1e-30)
                logps.append(torch.log_softmax((y @ S.T) / tau, dim=-1))
            lm = logps[0]
            kls = [float((lp.exp() * (lp - lm)).sum(-1).mean()) for lp in logps[1:]]
            layers.append({"layer": layer, "kl": kls})
    K = len(srcs)
    return {
        "model": str(merged.path),
        "sources": [str(s.path) for s in srcs],
        "tau": tau,
        "probes": int(probe_ids.numel()),
        "tokens": int(T.numel()),
        "layers": layers,
        "mean_kl": [sum(r["kl"][k] for r in layers) / max(1, len(layers)) for k in range(K)],
        "f_spectrum": spectrum_summary(mb.F),
        "self_recovery": mb.self_recovery,
    }


def format_report(report: dict[str, Any]) -> str:
    """A plain-text table: one row per layer, one column per source (mean KL, nats)."""
    K = len(report["sources"])
    head = ["layer"] + [f"KL(src{k}‖merged)" for k in range(K)]
    rows = [[str(r["layer"])] + [f"{v:.4g}" for v in r["kl"]] for r in report["layers"]]
    rows.append(["mean"] + [f"{v:.4g}" for v in report["mean_kl"]])
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(head)]
    lines = ["  ".join(h.rjust(w) for h, w in zip(head, widths))]
    lines += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows]
    fs = report["f_spectrum"]
    lines.append(f"sources: {', '.join(f'src{k}={p}' for k, p in enumerate(report['sources']))}")
    lines.append(f"semantic metric F: eigenvalues {fs['min']:.3g} … {fs['max']:.3g} (mean {fs['mean']:.3g}); "
                 f"basis self-recovery {report['self_recovery']:.3f}; {report['probes']} probes, "
                 f"|T| = {report['tokens']}, τ = {report['tau']}")
    return "\n".join(lines)
