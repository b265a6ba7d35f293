"""SeMe speed benchmark: align (no Erase) and the full merge (with Erase) on real-size shapes.

Three random checkpoints of one shape: a random model and two function-equivalent copies of it in other
coordinates (rotated residual, folded norms, permuted neurons and KV groups) with 1% noise, so the
alignment does all of its work (a rotation with norm folding, non-identity permutations in every layer). Targets on 2 CPU cores
for SmolLM2-135M's shape: align ≤ 60 s, full merge (alignment inline + Erase over 8192 tokens) ≤ 5 min.

    nice python tests/benchmarks/bench_seme.py --out /tmp/bench_seme [--device cuda] [--shape qwen2.5-1.5b]

Writes ``bench_seme.json`` and ``bench_seme.md`` into --out. Not part of the test suite.
``SEME_KERNELS=off`` measures Erase's torch path instead of the fused numba kernel (same output). On a
shared machine set ``OMP_WAIT_POLICY=PASSIVE`` for both A and B or for neither: libgomp's idle threads
otherwise spin after every parallel op, which roughly doubled align's CPU seconds under load ≈ 5.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import time
from pathlib import Path

SHAPES = {
    "smollm2-135m": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30,
        "num_attention_heads": 9, "num_key_value_heads": 3, "vocab_size": 49152,
        "tie_word_embeddings": True, "max_position_embeddings": 2048, "bos_token_id": 0, "eos_token_id": 0,
    },
    # about 10x the parameters: the GPU run's second shape
    "qwen2.5-1.5b": {
        "model_type": "qwen2", "hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28,
        "num_attention_heads": 12, "num_key_value_heads": 2, "vocab_size": 151936,
        "tie_word_embeddings": True, "max_position_embeddings": 4096,
    },
}


def make_checkpoint(out: Path, shape: dict, seed: int) -> Path:
    """A random checkpoint of ``shape`` (names from transformers on the meta device, values seeded)."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM

    kw = dict(shape)
    cfg = AutoConfig.for_model(kw.pop("model_type"), **kw)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, p in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if name.endswith("norm.weight") and name != "model.norm.weight":
            sd[name] = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        elif name.endswith("norm.weight"):
            sd[name] = torch.ones(p.shape)
        elif name.endswith(".bias"):
            sd[name] = 0.02 * torch.randn(p.shape, generator=g)
        else:
            sd[name] = 0.02 * torch.randn(p.shape, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    cfg.to_json_file(str(out / "config.json"))
    return out


def transformed_variant(src: Path, out: Path, shape: dict, seed: int, noise: float = 0.01) -> Path:
    """A function-equivalent copy of ``src`` in other coordinates, plus fine-tune-like noise.

    Norm gains folded into the reads, residual rotated by a random orthogonal Q, MLP neurons and KV
    groups permuted: the alignment has to undo all of it (the heavy path of ``seme align``).
    """
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(str(src / "model.safetensors"))
    g = torch.Generator().manual_seed(1000 + seed)
    d, inter = shape["hidden_size"], shape["intermediate_size"]
    nh, nkv = shape["num_attention_heads"], shape["num_key_value_heads"]
    hd, r = d // nh, nh // nkv
    q, rr = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    Q = (q * torch.sign(torch.diagonal(rr))[None, :]).float()
    sd["model.embed_tokens.weight"] = sd["model.embed_tokens.weight"] @ Q.T
    for i in range(shape["num_hidden_layers"]):
        p = f"model.layers.{i}."
        ln, pn = p + "input_layernorm.weight", p + "post_attention_layernorm.weight"
        pi = torch.randperm(inter, generator=g)
        gp = torch.randperm(nkv, generator=g)
        qrows = (((gp[:, None] * r + torch.arange(r)).reshape(-1))[:, None] * hd + torch.arange(hd)).reshape(-1)
        kvrows = (gp[:, None] * hd + torch.arange(hd)).reshape(-1)
        for u, rows in (("q", qrows), ("k", kvrows), ("v", kvrows)):
            w = p + f"self_attn.{u}_proj.weight"
            sd[w] = ((sd[w] * sd[ln][None, :]) @ Q.T)[rows]
        for u in ("gate", "up"):
            w = p + f"mlp.{u}_proj.weight"
            sd[w] = ((sd[w] * sd[pn][None, :]) @ Q.T)[pi]
        sd[ln], sd[pn] = torch.ones(d), torch.ones(d)
        sd[p + "self_attn.o_proj.weight"] = (Q @ sd[p + "self_attn.o_proj.weight"])[:, qrows]
        sd[p + "mlp.down_proj.weight"] = (Q @ sd[p + "mlp.down_proj.weight"])[:, pi]
    for k, v in sd.items():
        if v.dim() == 2:
            sd[k] = v + noise * float(v.std()) * torch.randn(v.shape, generator=g)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(out / "model.safetensors"), metadata={"format": "pt"})
    (out / "config.json").write_text((src / "config.json").read_text())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_seme_out")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoints")
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    torch.set_num_threads(args.threads)
    from seme.config import load_config
    from seme.merge import run_merge
    from seme.semantic.alignment import align
    from seme.semantic.erase import _ties_kernel

    out = Path(args.out).absolute()
    work = out / f"models-{args.shape}"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    m0 = make_checkpoint(work / "m0", SHAPES[args.shape], seed=0)
    models = [m0] + [transformed_variant(m0, work / f"m{i}", SHAPES[args.shape], seed=i) for i in (1, 2)]
    t_make = time.perf_counter() - t
    cfg = load_config({"merge_method": "seme", "models": [{"model": str(m)} for m in models],
                       "parameters": {"tokens": args.tokens}})
    t, c = time.perf_counter(), time.process_time()
    art = align(cfg, out / f"alignment-{args.shape}", device=args.device, overwrite=True)
    t_align, c_align = time.perf_counter() - t, time.process_time() - c
    meta = json.loads((art / "alignment.json").read_text())
    t, c = time.perf_counter(), time.process_time()
    res = run_merge(cfg, out / f"merged-{args.shape}", device=args.device, overwrite=True, progress=False)
    t_merge, c_merge = time.perf_counter() - t, time.process_time() - c
    seme = res.manifest["seme"]
    report = {
        "shape": args.shape,
        "device": args.device,
        "threads": args.threads,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "tokens": int(meta["token_subset"]["size"]),
        "make_checkpoints_s": round(t_make, 2),
        "align_s": round(t_align, 2),
        "align_cpu_s": round(c_align, 2),  # CPU seconds: on a shared machine wall time overstates
        "align_breakdown_s": {k: round(v, 2) for k, v in meta["timings"].items()},
        "merge_total_s": round(t_merge, 2),
        "merge_cpu_s": round(c_merge, 2),
        "load_average": os.getloadavg(),
        "merge_breakdown_s": {k: round(v, 2) for k, v in seme["merge_timings"].items()},
        "rotation": meta["rotation"],
        "peak_rss_mb": round(res.peak_rss_bytes / 1e6),
        # Erase after its GEMM: the fused numba kernel, or the torch ops (SEME_KERNELS=off / no numba)
        "erase_kernel": "numba" if args.device == "cpu" and _ties_kernel() is not None else "torch",
        # libgomp's idle threads spin by default; PASSIVE makes them sleep (matters on a shared machine)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "targets": {"align_s": 60, "merge_total_s": 300} if args.shape == "smollm2-135m" else {},
    }
    (out / "bench_seme.json").write_text(json.dumps(report, indent=2))
    md = [
        f"# SeMe speed: {args.shape} on {args.device} ({args.threads} threads)",
        "",
        "| step | seconds |",
        "|---|---|",
        f"| align (bases, rotation, permutations, Select statistics; no Erase) | {report['align_s']} |",
        (f"| full merge (alignment inline + Select/Compute/Erase, |T| = {report['tokens']}) | "
         f"{report['merge_total_s']} |"),
        f"| of which Erase | {report['merge_breakdown_s'].get('erase_s')} |",
        "",
        (f"CPU seconds: align {report['align_cpu_s']}, merge {report['merge_cpu_s']}; load average at the "
         f"end {report['load_average'][0]:.1f}. Peak RSS {report['peak_rss_mb']} MB. "
         f"Rotation: {meta['rotation']['reason']}. Erase kernel: {report['erase_kernel']}; "
         f"OMP_WAIT_POLICY: {report['omp_wait_policy']}."),
        "",
        "CPU seconds per phase (process-wide): align "
        + ", ".join(f"{k.removesuffix('_cpu_s')} {v}" for k, v in report["align_breakdown_s"].items()
                    if k.endswith("_cpu_s"))
        + "; merge "
        + ", ".join(f"{k.removesuffix('_cpu_s')} {v}" for k, v in report["merge_breakdown_s"].items()
                    if k.endswith("_cpu_s"))
        + ".",
    ]
    (out / "bench_seme.md").write_text("\n".join(md) + "\n")
    print(json.dumps(report, indent=2))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
