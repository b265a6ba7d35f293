"""SeMe speed benchmark: align (no Erase) and the full merge (with Erase) on real-size shapes.

Three random checkpoints of one shape: a random model and two function-equivalent copies of it in other
coordinates (rotated residual, folded norms, permuted neurons and KV groups) with 1% noise, so the
alignment does all of its work (a rotation with norm folding, non-identity permutations in every layer). Targets on 2 CPU cores
for SmolLM2-135M's shape: align ≤ 60 s, full merge (alignment inline + Erase over 8192 tokens) ≤ 5 min.

    nice python tests/benchmarks/bench_seme.py --out /tmp/bench_seme [--device cuda] [--shape qwen2.5-1.5b]

Each step (align; TIES on the same checkpoints, base = the first; the full SeMe merge) runs in a fresh
process, so each peak RSS is that step's own and not the model builder's. Targets against TIES (issue
15): SeMe's peak RSS ≤ 2× and wall ≤ 3× TIES's. Writes ``bench_seme.json`` and ``bench_seme.md`` into
--out. Not part of the test suite. ``--models A B C`` reuses three existing checkpoints.
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


def step(kind: str, models: list[Path], out: Path, device: str, threads: int, tokens: int) -> dict:
    """One timed step in this (fresh) process: ``align``, ``seme`` (full merge, alignment inline) or
    ``ties`` (base = the first model, density 0.5, on the same checkpoints). Peak RSS is this process's."""
    import resource

    t, c = time.perf_counter(), time.process_time()
    from seme.config import load_config
    from seme.merge import run_merge

    if kind == "ties":
        cfg = load_config({"merge_method": "ties", "base_model": str(models[0]),
                           "models": [{"model": str(m), "parameters": {"weight": 1.0, "density": 0.5}}
                                      for m in models[1:]]})
    else:
        import torch

        torch.set_num_threads(threads)
        cfg = load_config({"merge_method": "seme", "models": [{"model": str(m)} for m in models],
                           "parameters": {"tokens": tokens}})
    rec: dict = {}
    if kind == "align":
        from seme.semantic.alignment import align

        art = align(cfg, out, device=device, overwrite=True)
        rec["meta"] = json.loads((art / "alignment.json").read_text())
    else:
        res = run_merge(cfg, out, device=device if kind == "seme" else "cpu", overwrite=True, progress=False)
        rec["engine"] = res.manifest["engine"]
        rec["seme"] = res.manifest.get("seme")
    rec.update(wall_s=round(time.perf_counter() - t, 2), cpu_s=round(time.process_time() - c, 2),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               load_average=os.getloadavg())
    if kind == "seme":
        from seme.semantic.erase import _ties_kernel

        # Erase after its GEMM: the fused numba kernel, or the torch ops (SEME_KERNELS=off / no numba)
        rec["erase_kernel"] = "numba" if device == "cpu" and _ties_kernel() is not None else "torch"
    return rec


def _in_subprocess(kind: str, models: list[Path], out: Path, args: argparse.Namespace) -> dict:
    """Run :func:`step` in a fresh interpreter, so its peak RSS is its own (not the model builder's)."""
    import subprocess
    import sys

    cmd = [sys.executable, __file__, "--step", kind, "--out", str(out), "--device", args.device,
           "--threads", str(args.threads), "--tokens", str(args.tokens), "--models", *map(str, models)]
    done = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="bench_seme_out")
    ap.add_argument("--shape", default="smollm2-135m", choices=sorted(SHAPES))
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--keep", action="store_true", help="keep the random checkpoints")
    ap.add_argument("--models", nargs=3, type=Path, help="use these three checkpoints instead of making them")
    ap.add_argument("--step", choices=("align", "seme", "ties"), help=argparse.SUPPRESS)  # internal
    args = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.step:
        print(json.dumps(step(args.step, args.models, Path(args.out), args.device, args.threads, args.tokens)))
        return
    out = Path(args.out).absolute()
    work = out / f"models-{args.shape}"
    out.mkdir(parents=True, exist_ok=True)
    t = time.perf_counter()
    if args.models:
        models = [m.absolute() for m in args.models]
    else:
        import torch

        torch.set_num_threads(args.threads)
        m0 = make_checkpoint(work / "m0", SHAPES[args.shape], seed=0)
        models = [m0] + [transformed_variant(m0, work / f"m{i}", SHAPES[args.shape], seed=i) for i in (1, 2)]
    t_make = time.perf_counter() - t
    al = _in_subprocess("align", models, out / f"alignment-{args.shape}", args)
    meta = al.pop("meta")
    ties = _in_subprocess("ties", models, out / f"ties-{args.shape}", args)
    mg = _in_subprocess("seme", models, out / f"merged-{args.shape}", args)
    seme = mg["seme"]
    report = {
        "shape": args.shape,
        "device": args.device,
        "threads": args.threads,
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "tokens": int(meta["token_subset"]["size"]),
        "make_checkpoints_s": round(t_make, 2),
        "align_s": al["wall_s"],
        "align_cpu_s": al["cpu_s"],  # CPU seconds: on a shared machine wall time overstates
        "align_peak_rss_mb": al["peak_rss_mb"],
        "align_breakdown_s": {k: round(v, 2) for k, v in meta["timings"].items()},
        "merge_total_s": mg["wall_s"],
        "merge_cpu_s": mg["cpu_s"],
        "peak_rss_mb": mg["peak_rss_mb"],
        "ties": {k: ties[k] for k in ("wall_s", "cpu_s", "peak_rss_mb", "engine")},
        "ratio_to_ties": {"wall": round(mg["wall_s"] / ties["wall_s"], 2),
                          "peak_rss": round(mg["peak_rss_mb"] / ties["peak_rss_mb"], 2)},
        "load_average": {"align": al["load_average"], "ties": ties["load_average"], "seme": mg["load_average"]},
        "merge_breakdown_s": {k: round(v, 2) for k, v in seme["merge_timings"].items()},
        "rotation": meta["rotation"],
        "erase_kernel": mg["erase_kernel"],
        # libgomp's idle threads spin by default; PASSIVE makes them sleep (matters on a shared machine)
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
        "targets": ({"align_s": 60, "merge_total_s": 300, "ratio_to_ties": {"wall": 3, "peak_rss": 2}}
                    if args.shape == "smollm2-135m" else {}),
    }
    (out / "bench_seme.json").write_text(json.dumps(report, indent=2))
    md = [
        f"# SeMe speed: {args.shape} on {args.device} ({args.threads} threads)",
        "",
        "| step | seconds | CPU s | peak RSS MB |",
        "|---|---|---|---|",
        (f"| align (bases, rotation, permutations, Select statistics; no Erase) | {report['align_s']} | "
         f"{report['align_cpu_s']} | {report['align_peak_rss_mb']} |"),
        (f"| full merge (alignment inline + Select/Compute/Erase, |T| = {report['tokens']}) | "
         f"{report['merge_total_s']} | {report['merge_cpu_s']} | {report['peak_rss_mb']} |"),
        (f"| of which Erase | {report['merge_breakdown_s'].get('erase_s')} | "
         f"{report['merge_breakdown_s'].get('erase_cpu_s')} | |"),
        f"| TIES on the same checkpoints (base = m0) | {ties['wall_s']} | {ties['cpu_s']} | {ties['peak_rss_mb']} |",
        "",
        (f"SeMe / TIES: wall {report['ratio_to_ties']['wall']}×, peak RSS {report['ratio_to_ties']['peak_rss']}×. "
         f"Load average (1 min) at the end of align / TIES / SeMe: {al['load_average'][0]:.1f} / "
         f"{ties['load_average'][0]:.1f} / {mg['load_average'][0]:.1f}. "
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
    if not args.keep and not args.models:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
