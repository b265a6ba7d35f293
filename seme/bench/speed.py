"""``seme bench speed``: seme against mergekit 0.1.5 and against the machine's own I/O limit.

For each scale (llama-shaped bf16 checkpoints with random weights: a base and three fine-tune-like
variants, generated once and cached) and each shared method, the harness runs ``seme merge`` and
``mergekit-yaml`` as subprocesses on the same YAML, alternating the tools run by run (A B C A B C …)
so that drift in machine load hits all of them alike. Each run records wall time, CPU time
(user + sys from ``wait4``) and peak RSS (``ru_maxrss`` of the child). The I/O limit is measured in
the same rotation: read every input file once and write one output of the merged size with plain
buffered file copies; whether the inputs were in the page cache is recorded (``fincore``).

Writes ``speed.json`` (every run + summary), ``speed.md`` (tables + target verdicts) and
``speed.png`` into ``--out``. Medians are reported; ratios are mergekit / seme (speed-up).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CACHE_ENV = "SEME_BENCH_CACHE"
METHODS = ("linear", "task_arithmetic", "ties", "dare_ties", "slerp")

#: llama-shaped model sizes. "1b" follows Llama-3.2-1B's layer shapes with fewer layers and a 32k
#: vocabulary (≈1.1B parameters, untied head); "135m" is SmolLM2-135M's shape (tied embeddings).
SCALES: dict[str, dict[str, Any]] = {
    "tiny": {"hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "tie_word_embeddings": False},
    "135m": {"hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
             "num_key_value_heads": 3, "vocab_size": 49152, "tie_word_embeddings": True},
    "1b": {"hidden_size": 2048, "intermediate_size": 8192, "num_hidden_layers": 16, "num_attention_heads": 32,
             "num_key_value_heads": 8, "vocab_size": 32000, "tie_word_embeddings": False},
}
VARIANTS = ("ft1", "ft2", "ft3")
BASE_STD = 0.02  # initialiser scale of the random base weights
DELTA_STD = 0.002  # fine-tune-like perturbation: 10% of the weight scale
RSS_SLACK = 300 * 1000**2  # the "+ 300 MB" of the peak-RSS target
SEME_SHARD_BYTES = 2 * 1024**3  # seme's default out_shard_size


# ------------------------------------------------------------------------------------------------
# Inputs: cached random llama checkpoints
# ------------------------------------------------------------------------------------------------


def cache_root(override: str | None = None) -> Path:
    """``--cache`` > ``$SEME_BENCH_CACHE`` > ``~/.cache/seme/bench``."""
    return Path(override or os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "seme" / "bench").expanduser()


def llama_config(scale: str) -> dict[str, Any]:
    s = SCALES[scale]
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        **s,
        "head_dim": s["hidden_size"] // s["num_attention_heads"],
        "hidden_act": "silu",
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
    }


def tensor_plan(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes of a llama checkpoint, in Hugging Face's (sorted) file order."""
    h, i, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    hd = cfg["head_dim"]
    q, kv = cfg["num_attention_heads"] * hd, cfg["num_key_value_heads"] * hd
    out = [("model.embed_tokens.weight", (v, h))]
    for layer in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not cfg["tie_word_embeddings"]:
        out.append(("lm_head.weight", (v, h)))
    return out


def ensure_models(scale: str, root: Path, log=print) -> dict[str, Path]:
    """The base and variant checkpoints for ``scale``, generated on first use (atomically)."""
    final = root / f"llama-{scale}"
    names = ("base", *VARIANTS)
    if (final / "COMPLETE").is_file():
        return {n: final / n for n in names}
    import torch

    from seme.checkpoint import CheckpointWriter
    from seme.fsutil import atomic_dir

    cfg = llama_config(scale)
    plan = tensor_plan(cfg)
    log(f"generating llama-{scale} base + {len(VARIANTS)} variants in {final} (once; cached)")
    root.mkdir(parents=True, exist_ok=True)
    with atomic_dir(final, overwrite=True, markers=None) as tmp:  # seme's own cache dir
        writers = {}
        for n in names:
            (tmp / n).mkdir()
            (tmp / n / "config.json").write_text(json.dumps(cfg, indent=2))
            (tmp / n / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
            writers[n] = CheckpointWriter(tmp / n, [(t, s, torch.bfloat16) for t, s in plan], 5 * 1024**3)
        for k, (tname, shape) in enumerate(plan):
            g = torch.Generator().manual_seed(1000 + k)
            if len(shape) == 1:  # norm gains around 1
                base = 1.0 + 0.05 * torch.randn(shape, generator=g)
            else:
                base = BASE_STD * torch.randn(shape, generator=g)
            writers["base"].write(tname, base.to(torch.bfloat16))
            # one noise draw per tensor; each variant reads it at a different offset, so at every
            # position the variants' deltas are distinct draws (independent), at half the RNG cost
            noise = torch.randn(base.numel(), generator=g).mul_(DELTA_STD * (5.0 if len(shape) == 1 else 1.0))
            for j, n in enumerate(VARIANTS):
                shift = (j * 7919 + 1) % max(1, base.numel())
                delta = torch.roll(noise, shift).view(shape)
                writers[n].write(tname, (base + delta).to(torch.bfloat16))
        for w in writers.values():
            w.close()
        (tmp / "COMPLETE").write_text(json.dumps({"scale": scale, "created": _now()}))
    return {n: final / n for n in names}


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------


def merge_config(method: str, models: dict[str, Path]) -> dict[str, Any]:
    """One YAML both tools read (mergekit ignores ``seed``; it gets ``--random-seed``)."""
    base, fts = str(models["base"]), [str(models[v]) for v in VARIANTS]
    common = {"dtype": "bfloat16", "seed": 0}
    if method == "linear":
        return {"merge_method": "linear", "models": [{"model": m, "parameters": {"weight": 1.0}} for m in fts],
                **common}
    if method == "slerp":
        return {"merge_method": "slerp", "base_model": base,
                "models": [{"model": base}, {"model": fts[0]}], "parameters": {"t": 0.5}, **common}
    params = {"task_arithmetic": {"weight": 0.5}, "ties": {"weight": 0.5, "density": 0.5},
              "dare_ties": {"weight": 0.5, "density": 0.5}}[method]
    return {"merge_method": method, "base_model": base,
            "models": [{"model": m, "parameters": dict(params)} for m in fts], **common}


def config_inputs(cfg: dict[str, Any]) -> list[Path]:
    """The distinct input checkpoint directories of a config."""
    seen: list[Path] = []
    for p in ([cfg["base_model"]] if cfg.get("base_model") else []) + [m["model"] for m in cfg["models"]]:
        if Path(p) not in seen:
            seen.append(Path(p))
    return seen


def weight_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def largest_tensor_bytes(d: Path) -> int:
    """Largest tensor of a checkpoint in its stored dtype (from the safetensors headers)."""
    best = 0
    for f in weight_files(d):
        with open(f, "rb") as fh:
            n = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(n))
        for k, v in header.items():
            if k != "__metadata__":
                best = max(best, v["data_offsets"][1] - v["data_offsets"][0])
    return best


# ------------------------------------------------------------------------------------------------
# Measurements
# ------------------------------------------------------------------------------------------------


def run_timed(cmd: list[str], log_path: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall, CPU (user+sys) and peak RSS of the child from ``wait4``."""
    load0 = os.getloadavg()[0]
    with open(log_path, "ab") as log:
        log.write(("\n$ " + " ".join(cmd) + "\n").encode())
        log.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "wall_s": wall,
        "cpu_s": ru.ru_utime + ru.ru_stime,
        "peak_rss_bytes": ru.ru_maxrss * 1024,
        "rc": proc.returncode,
        "load1_before": load0,
        "load1_after": os.getloadavg()[0],
    }


def io_limit(inputs: list[Path], out_dir: Path) -> dict[str, Any]:
    """Read every input weight file once and write one output of the merged size (plain copies).

    The anchor's (first input's) files are copied to ``out_dir`` (read + write); the others are
    read into a reusable buffer. Buffered 8 MiB reads/writes, no fsync (neither tool fsyncs).
    """
    buf = bytearray(8 << 20)
    view = memoryview(buf)
    read = written = 0
    out_dir.mkdir(parents=True)
    r0 = os.times()
    t0 = time.perf_counter()
    for k, d in enumerate(inputs):
        for f in weight_files(d):
            with contextlib.ExitStack() as stack:
                src = stack.enter_context(open(f, "rb", buffering=0))
                dst = stack.enter_context(open(out_dir / f.name, "wb", buffering=0)) if k == 0 else None
                while n := src.readinto(buf):
                    read += n
                    if dst is not None:
                        written += dst.write(view[:n])
    wall = time.perf_counter() - t0
    r1 = os.times()
    shutil.rmtree(out_dir)
    return {"wall_s": wall, "cpu_s": (r1.user - r0.user) + (r1.system - r0.system),
            "bytes_read": read, "bytes_written": written, "load1_after": os.getloadavg()[0]}


def page_cache_fraction(files: list[Path]) -> float | None:
    """Fraction of the files' bytes resident in the page cache (util-linux ``fincore``), or None."""
    if not shutil.which("fincore") or not files:
        return None
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--raw", "-o", "RES,SIZE", *map(str, files)],
                             capture_output=True, text=True, check=True).stdout
    except (subprocess.CalledProcessError, OSError):
        return None
    res = size = 0
    for line in out.split("\n"):
        parts = line.split()
        if len(parts) == 2:
            res += int(parts[0])
            size += int(parts[1])
    return min(1.0, res / size) if size else None  # fincore rounds up to whole pages


def help_time(seme_bin: str, n: int = 5) -> float:
    """Median wall time of ``seme --help``."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([seme_bin, "--help"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def import_floor(n: int = 5) -> float:
    """Median wall time of ``python -c "import torch"`` with this interpreter: the fixed cost any
    torch-based merge tool pays before reading a byte (part of every seme and mergekit run)."""
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, check=True)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ------------------------------------------------------------------------------------------------
# The protocol
# ------------------------------------------------------------------------------------------------


def tool_commands(tool: str, cfg_path: Path, out: Path, bins: dict[str, str], device: str,
                  mk_shard_params: int) -> list[str]:
    if tool == "seme":
        return [bins["seme"], "merge", str(cfg_path), str(out), "--device", device]
    cmd = [bins["mergekit"], str(cfg_path), str(out), "--random-seed", "0"]
    if device != "cpu":
        cmd.append("--cuda")
    if tool == "mergekit-matched":
        cmd += ["--out-shard-size", str(mk_shard_params)]
    return cmd


def bench_scale(scale: str, args: argparse.Namespace, bins: dict[str, str], log=print) -> dict[str, Any]:
    import yaml

    root = cache_root(args.cache)
    models = ensure_models(scale, root, log)
    work = root / "runs" / scale
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    log_path = Path(args.out) / f"speed-{scale}.log"
    tools = ["seme"] + ([] if args.no_mergekit else [f"mergekit-{v}" for v in args.mergekit_variants])
    all_files = [f for m in models.values() for f in weight_files(m)]
    cache_before = page_cache_fraction(all_files)
    # untimed warm-up: every input through the page cache once (and every tool's imports)
    for f in all_files:
        with open(f, "rb", buffering=0) as fh:
            while fh.read(8 << 20):
                pass
    cache_warm = page_cache_fraction(all_files)
    # mergekit counts shards in parameters; seme in bytes: bf16 → 2 bytes per parameter
    mk_shard_params = SEME_SHARD_BYTES // 2
    methods_out: dict[str, Any] = {}
    for method in args.methods:
        cfg = merge_config(method, models)
        cfg_path = work / f"{method}.yaml"
        cfg_path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        inputs = config_inputs(cfg)
        runs: dict[str, list[dict[str, Any]]] = {t: [] for t in [*tools, "io_limit"]}
        out = work / "out"
        for r in range(-1 if args.warmup else 0, args.runs):
            for tool in [*tools, "io_limit"]:
                shutil.rmtree(out, ignore_errors=True)
                if tool == "io_limit":
                    rec = io_limit(inputs, out)
                else:
                    rec = run_timed(tool_commands(tool, cfg_path, out, bins, args.device, mk_shard_params),
                                    log_path)
                    if rec["rc"] != 0:
                        raise RuntimeError(f"{tool} {method} failed (rc {rec['rc']}); see {log_path}")
                    rec["out_files"] = sorted(p.name for p in out.glob("*.safetensors"))
                    if tool == "seme":  # which executor ran: torch-free kernels, kernels on torch, torch
                        man = json.loads((out / "seme_manifest.json").read_text())
                        rec["engine"] = man.get("engine")
                    shutil.rmtree(out, ignore_errors=True)
                rec["run"] = r
                if r >= 0:
                    runs[tool].append(rec)
                log(f"[{scale}] {method:16s} {tool:18s} run {r}: {rec['wall_s']:7.2f} s wall "
                    f"{rec['cpu_s']:7.2f} s cpu {rec.get('peak_rss_bytes', 0) / 1e6:7.0f} MB")
        methods_out[method] = {
            "config": cfg,
            "inputs": [str(p) for p in inputs],
            "k_inputs": len(inputs),
            "runs": runs,
            "median": {t: _medians(v) for t, v in runs.items() if v},
            "seme_engine": sorted({r.get("engine") or "?" for r in runs["seme"]}),
        }
    cache_after = page_cache_fraction(all_files)
    shutil.rmtree(work, ignore_errors=True)
    largest = largest_tensor_bytes(models["base"])
    n_params = sum(_numel(s) for _, s in tensor_plan(llama_config(scale)))
    return {
        "scale": scale,
        "model_config": llama_config(scale),
        "parameters": n_params,
        "checkpoint_bytes": sum(f.stat().st_size for f in weight_files(models["base"])),
        "largest_tensor_bytes": largest,
        "runs_per_tool": args.runs,
        "tools": tools,
        "mergekit_out_shard_size_matched": mk_shard_params,
        "page_cache": {"before_warmup": cache_before, "after_warmup": cache_warm, "at_end": cache_after},
        "methods": methods_out,
    }


def _medians(recs: list[dict[str, Any]]) -> dict[str, float]:
    keys = ("wall_s", "cpu_s", "peak_rss_bytes")
    return {k: statistics.median(r[k] for r in recs) for k in keys if all(k in r for r in recs)}


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


# ------------------------------------------------------------------------------------------------
# Verdicts and reports
# ------------------------------------------------------------------------------------------------


def summarize(scale_res: dict[str, Any]) -> dict[str, Any]:
    """Ratios and target verdicts for one scale."""
    ms = scale_res["methods"]
    rows, targets = [], []
    mk_tools = [t for t in scale_res["tools"] if t.startswith("mergekit")]
    for method, m in ms.items():
        med = m["median"]
        s = med["seme"]
        row = {"method": method, "seme": s, "io_limit": med.get("io_limit", {}).get("wall_s"),
               "k_inputs": m["k_inputs"]}
        for t in mk_tools:
            if t in med:
                row[t] = med[t]
                row[f"speedup_{t}"] = med[t]["wall_s"] / s["wall_s"]
        rss_target = (m["k_inputs"] + 1) * scale_res["largest_tensor_bytes"] + RSS_SLACK
        row["rss_target_bytes"] = rss_target
        rows.append(row)
        for t in mk_tools:
            if t in med:
                targets.append({"target": f"{method}: seme ≥ 2× faster than {t}",
                                "value": round(row[f"speedup_{t}"], 2), "limit": 2.0,
                                "hit": row[f"speedup_{t}"] >= 2.0})
        targets.append({"target": f"{method}: seme peak RSS ≤ (K+1)×largest tensor + 300 MB (K={m['k_inputs']})",
                        "value": round(s["peak_rss_bytes"] / 1e6), "limit": round(rss_target / 1e6),
                        "hit": s["peak_rss_bytes"] <= rss_target})
    if "ties" in ms and "task_arithmetic" in ms:
        r = ms["ties"]["median"]["seme"]["wall_s"] / ms["task_arithmetic"]["median"]["seme"]["wall_s"]
        targets.append({"target": "TIES ≤ 1.3× task arithmetic (seme)", "value": round(r, 2), "limit": 1.3,
                        "hit": r <= 1.3})
    if "linear" in ms and "io_limit" in ms["linear"]["median"]:
        r = ms["linear"]["median"]["seme"]["wall_s"] / ms["linear"]["median"]["io_limit"]["wall_s"]
        targets.append({"target": "linear ≤ 1.5× the I/O limit (seme)", "value": round(r, 2), "limit": 1.5,
                        "hit": r <= 1.5})
    return {"rows": rows, "targets": targets}


def environment(bins: dict[str, str]) -> dict[str, Any]:
    from importlib import metadata

    def ver(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().split("\n"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = None
    try:
        for line in Path("/proc/meminfo").read_text().split("\n"):
            if line.startswith("MemTotal"):
                mem = int(line.split()[1]) * 1024
    except OSError:
        pass
    return {
        "date": _now(),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": cpu,
        "mem_total_bytes": mem,
        "gpu": _gpu_name(),
        "python": platform.python_version(),
        "versions": {p: ver(p) for p in ("seme", "torch", "mergekit", "safetensors", "transformers")},
        "loadavg_start": os.getloadavg(),
        "bins": bins,
        "git": _git_state(),
    }


def _git_state() -> dict[str, Any] | None:
    """Commit and uncommitted changes under seme/ of the checkout being measured (None outside git)."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True, timeout=20).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--", "seme"], capture_output=True,
                               text=True, check=True, timeout=20).stdout.split("\n")
    except (OSError, subprocess.SubprocessError):
        return None
    return {"commit": head, "dirty": [line[3:] for line in dirty if line.strip()]}


def _gpu_name() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                              text=True, timeout=20, check=False).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _gb(b: float | None) -> str:
    return "–" if b is None else f"{b / 1e9:.2f}"


def render_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    v = env["versions"]
    lines = [
        "# Speed and memory: seme vs mergekit 0.1.5 vs the I/O limit",
        "",
        (f"- date: {env['date']}; machine: {env['cpus']} CPU cores ({env['cpu_model']}), "
        f"{_gb(env['mem_total_bytes'])} GB RAM, GPU: {env['gpu'] or 'none'}; device: {result['device']}"),
        (f"- versions: seme {v['seme']}, torch {v['torch']}, mergekit {v['mergekit']}, "
        f"safetensors {v['safetensors']}, transformers {v['transformers']}, Python {env['python']}"),
        (f"- load average (1/5/15 min) at start: {', '.join(f'{x:.2f}' for x in env['loadavg_start'])}; "
        f"at end: {', '.join(f'{x:.2f}' for x in result['loadavg_end'])}"),
        (f"- `python -c 'import torch'`: {result['import_torch_s']:.2f} s (median of 5): a fixed cost of "
         "mergekit, and of seme where it runs on torch (engine `kernels` or `torch` below; the `kernels, "
         "torch-free` engine never imports torch)" if result.get("import_torch_s") else "- import floor: n/a"),
        f"- `seme --help`: {result['help_s']:.3f} s (median of 5); code: "
        + (f"commit {env['git']['commit']}" + (f", uncommitted changes in {', '.join(env['git']['dirty'])}"
                                                 if env["git"]["dirty"] else "") if env.get("git") else "n/a"),
        ("- protocol: tools alternate run by run (seme, mergekit defaults, mergekit with matched "
        "`--out-shard-size`, I/O limit); medians; speed-up = mergekit wall / seme wall. "
        "All configs compute in bfloat16 (`dtype: bfloat16`)."),
        "",
    ]
    for sr in result["scales"]:
        summ = summarize(sr)
        pc = sr["page_cache"]
        lines += [
            (f"## llama-{sr['scale']}: {sr['parameters'] / 1e6:.1f}M parameters, "
            f"{_gb(sr['checkpoint_bytes'])} GB per checkpoint (bf16), largest tensor "
            f"{sr['largest_tensor_bytes'] / 1e6:.1f} MB"),
            "",
            f"{sr['runs_per_tool']} timed runs per tool and method. Page cache (fraction of all input bytes "
            f"resident): {_pct(pc['before_warmup'])} before the warm-up read, {_pct(pc['after_warmup'])} "
            f"after it, {_pct(pc['at_end'])} at the end: the I/O limit and all runs are **warm-cache** "
            "numbers." if pc["after_warmup"] is not None and pc["after_warmup"] > 0.95 else
            f"{sr['runs_per_tool']} timed runs per tool and method. Page cache: {pc}.",
            "",
        ]
        loads = [r[k] for m in sr["methods"].values() for rs in m["runs"].values() for r in rs
                 for k in ("load1_before", "load1_after") if k in r]
        if loads:
            lines += [f"1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f} on "
                      f"{result['environment']['cpus']} cores (other processes were running)"
                      if max(loads) > (result["environment"]["cpus"] or 1) else
                      f"1-minute load average during the runs: {min(loads):.1f}–{max(loads):.1f}", ""]
        mk = [t for t in sr["tools"] if t.startswith("mergekit")]
        head = ["method", "K", "seme engine", "seme wall s", *[f"{t} wall s" for t in mk], *[f"speed-up vs {t}" for t in mk],
                "I/O limit s", "seme CPU s", *[f"{t} CPU s" for t in mk], "seme peak RSS MB",
                *[f"{t} peak RSS MB" for t in mk], "RSS target MB"]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for row in summ["rows"]:
            engine = " / ".join(sr["methods"][row["method"]].get("seme_engine", ["?"]))
            cells = [row["method"], str(row["k_inputs"]), engine, f"{row['seme']['wall_s']:.2f}",
                     *[f"{row[t]['wall_s']:.2f}" if t in row else "–" for t in mk],
                     *[f"{row['speedup_' + t]:.2f}×" if t in row else "–" for t in mk],
                     "–" if row["io_limit"] is None else f"{row['io_limit']:.2f}",
                     f"{row['seme']['cpu_s']:.2f}", *[f"{row[t]['cpu_s']:.2f}" if t in row else "–" for t in mk],
                     f"{row['seme']['peak_rss_bytes'] / 1e6:.0f}",
                     *[f"{row[t]['peak_rss_bytes'] / 1e6:.0f}" if t in row else "–" for t in mk],
                     f"{row['rss_target_bytes'] / 1e6:.0f}"]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "| target | value | limit | hit |", "|---|---|---|---|"]
        for t in summ["targets"]:
            lines.append(f"| {t['target']} | {t['value']} | {t['limit']} | {'yes' if t['hit'] else '**no**'} |")
        lines.append("")
    lines.append(f"`seme --help` < 1 s: {'yes' if result['help_s'] < 1 else '**no**'} ({result['help_s']:.3f} s)")
    lines.append("")
    return "\n".join(lines)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def render_png(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scales = result["scales"]
    fig, axes = plt.subplots(1, len(scales), figsize=(6.5 * len(scales), 4.2), squeeze=False)
    for ax, sr in zip(axes[0], scales):
        methods = list(sr["methods"])
        tools = sr["tools"]
        width = 0.8 / len(tools)
        for j, tool in enumerate(tools):
            ys = [sr["methods"][m]["median"].get(tool, {}).get("wall_s", 0.0) for m in methods]
            ax.bar([i + (j - (len(tools) - 1) / 2) * width for i in range(len(methods))], ys, width, label=tool)
        for i, m in enumerate(methods):
            io = sr["methods"][m]["median"].get("io_limit", {}).get("wall_s")
            if io is not None:
                ax.hlines(io, i - 0.4, i + 0.4, colors="black", linestyles="dashed",
                          label="I/O limit" if i == 0 else None)
        ax.set_xticks(range(len(methods)), methods, rotation=20)
        ax.set_ylabel("median wall time (s)")
        ax.set_title(f"llama-{sr['scale']} ({sr['parameters'] / 1e6:.0f}M, bf16), {sr['runs_per_tool']} runs")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(result: dict[str, Any], out: Path) -> None:
    for sr in result["scales"]:
        sr["summary"] = summarize(sr)
    (out / "speed.json").write_text(json.dumps(result, indent=2))
    (out / "speed.md").write_text(render_markdown(result))
    render_png(result, out / "speed.png")


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------


def _sibling_bin(name: str) -> str:
    p = Path(sys.executable).parent / name
    return str(p) if p.exists() else (shutil.which(name) or name)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seme bench speed", description=__doc__.split("\n")[0])
    p.add_argument("--scales", default="135m", help=f"comma list of {', '.join(SCALES)} (default 135m)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list (default: all five shared methods)")
    p.add_argument("--runs", type=int, default=5, help="timed runs per tool and method (default 5)")
    p.add_argument("--no-warmup", dest="warmup", action="store_false", help="skip the untimed first round")
    p.add_argument("--out", default="bench-results/speed", help="report directory (JSON, MD, PNG, logs)")
    p.add_argument("--cache", default=None, help=f"model cache (default ${CACHE_ENV} or ~/.cache/seme/bench)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (passed to both tools)")
    p.add_argument("--no-mergekit", action="store_true", help="time seme and the I/O limit only")
    p.add_argument("--mergekit-variants", default="default,matched",
                   help="default (mergekit's CPU defaults) and/or matched (--out-shard-size = seme's shards)")
    p.add_argument("--seme-bin", default=None, help="seme executable (default: next to this Python)")
    p.add_argument("--mergekit-bin", default=None, help="mergekit-yaml executable (default: next to this Python)")
    p.add_argument("--render", nargs="+", metavar="JSON", help="only re-render reports from speed.json files")
    return p


def main(argv: list[str]) -> int:
    """``seme bench speed [options]``; returns the exit code."""
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.render:
        parts = [json.loads(Path(f).read_text()) for f in args.render]
        result = parts[0]
        for extra in parts[1:]:
            result["scales"] += extra["scales"]
        write_reports(result, out)
        print(f"wrote {out / 'speed.md'}")
        return 0
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in args.methods if m not in METHODS]
    scales = [s.strip() for s in args.scales.split(",") if s.strip()]
    bad += [s for s in scales if s not in SCALES]
    if bad:
        from seme.errors import ConfigError

        raise ConfigError(f"unknown method/scale {bad[0]!r}; methods: {', '.join(METHODS)}; scales: {', '.join(SCALES)}")
    args.mergekit_variants = [v.strip() for v in args.mergekit_variants.split(",") if v.strip()]
    bins = {"seme": args.seme_bin or _sibling_bin("seme"), "mergekit": args.mergekit_bin or _sibling_bin("mergekit-yaml")}
    if not args.no_mergekit and not Path(bins["mergekit"]).exists() and not shutil.which(bins["mergekit"]):
        from seme.errors import ConfigError

        raise ConfigError(f"mergekit-yaml not found ({bins['mergekit']}); install mergekit==0.1.5 or pass --no-mergekit")

    def log(msg: str) -> None:
        print(msg, flush=True)

    result: dict[str, Any] = {"environment": environment(bins), "device": args.device}
    result["help_s"] = help_time(bins["seme"])
    result["import_torch_s"] = import_floor()
    result["scales"] = [bench_scale(s, args, bins, log) for s in scales]
    result["loadavg_end"] = os.getloadavg()
    write_reports(result, out)
    log(f"wrote {out / 'speed.json'}, {out / 'speed.md'}, {out / 'speed.png'}")
    return 0
