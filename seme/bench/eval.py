"""``seme bench eval``: evaluation throughput, the task-file path against an earlier implementation.

Workload (the issue's): 5 exact-match tasks x 200 items (generated arithmetic, French numbers and
ISO country codes) + 40 prose windows of 128 tokens, on one model (default: SmolLM2-135M-Instruct
as ``seme zoo build`` prepares it). "after" is this tree's :func:`seme.evaluation.kinds` path (the
same code ``seme eval`` runs); "before" (``--before-src DIR``) imports ``seme/evaluation/runner.py``
from another checkout (e.g. the code at main before task files) and runs its ``exact_match`` and
``lm_scores`` with that code's defaults. The model is loaded once per side and not timed; both sides
see the same items, and their per-task accuracies are reported so that a speed-up that changes
answers would show. Writes ``eval_speed.json`` and ``eval_speed.md`` into ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.util
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

TASKS = (  # name, generator, args, max_new_tokens
    ("arith2", "arithmetic", {"max_operand": 99, "n_train": 0, "n_eval": 200}, 6),
    ("arith3", "arithmetic", {"max_operand": 300, "n_train": 0, "n_eval": 200}, 6),
    ("french3", "french_numbers", {"max_number": 999, "n_train": 0, "n_eval": 200}, 20),
    ("french4", "french_numbers", {"max_number": 9999, "n_train": 0, "n_eval": 200}, 20),
    ("iso3", "country_codes", {"n_train": 0, "n_eval": 200}, 5),
)


def write_task_file(d: Path, n_items: int, windows: int) -> Path:
    """The benchmark's task file (generators; 128-token prose windows)."""
    import yaml

    tasks: list[dict[str, Any]] = [
        {"name": n, "kind": "exact_match", "generator": g, "args": {**a, "n_eval": n_items}, "max_new_tokens": m}
        for n, g, a, m in TASKS]
    tasks.append({"name": "prose", "kind": "perplexity", "generator": "prose", "window": 128,
                  "max_windows": windows})
    d.mkdir(parents=True, exist_ok=True)
    p = d / "bench_tasks.yaml"
    p.write_text(yaml.safe_dump({"name": "bench-eval", "tasks": tasks}, sort_keys=False))
    return p


def _load_module(path: Path, name: str) -> Any:
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(mod)
    return mod


def run_after(model: Any, tok: Any, tf: Any, batch_size: int) -> dict[str, Any]:
    from seme.evaluation import kinds

    out: dict[str, Any] = {}
    t_all = time.perf_counter()
    for spec in tf.tasks:
        t0 = time.perf_counter()
        pr = kinds.prepare(spec, tok, None)
        run = kinds.run_exact_match if spec.kind == "exact_match" else kinds.run_perplexity
        e = run(pr, model, tok, batch_size, None)
        out[spec.name] = {"s": time.perf_counter() - t0, "value": e["value"], "n": len(pr.items) or len(pr.windows)}
    return {"tasks": out, "total_s": time.perf_counter() - t_all}


def run_before(src: Path, model: Any, tok: Any, tf: Any) -> dict[str, Any]:
    """The earlier runner (``src/seme/evaluation/runner.py``) with its own defaults (batch 32; LM batch 8)."""
    old = _load_module(src / "seme" / "evaluation" / "runner.py", "seme_eval_runner_before")
    out: dict[str, Any] = {}
    t_all = time.perf_counter()
    for spec in tf.tasks:
        t0 = time.perf_counter()
        if spec.kind == "exact_match":
            e = old.exact_match(model, tok, spec.items, spec.options["max_new_tokens"], 32)
            out[spec.name] = {"s": time.perf_counter() - t0, "value": e["value"], "n": len(spec.items)}
        else:
            wins = old.text_windows(tok, spec.texts, spec.options["window"], spec.options["max_windows"])
            sc = old.lm_scores(model, wins, 8)
            out[spec.name] = {"s": time.perf_counter() - t0, "value": sc["perplexity"], "n": len(wins)}
    return {"tasks": out, "total_s": time.perf_counter() - t_all}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="seme bench eval", description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default=None, help="checkpoint dir (default: the real zoo's base)")
    ap.add_argument("--before-src", default=None, help="a checkout whose seme/evaluation/runner.py is 'before'")
    ap.add_argument("--items", type=int, default=200)
    ap.add_argument("--windows", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-bf16", dest="bf16", action="store_false", help="skip the bfloat16 'after' run")
    ap.add_argument("--out", default="eval-speed-out")
    a = ap.parse_args(argv)

    import torch

    from seme.evaluation import runner
    from seme.evaluation.taskfile import load_task_file

    torch.set_num_threads(a.threads)
    if a.model is None:
        from seme.zoo import REAL_NAME, zoo_path

        a.model = str(zoo_path(REAL_NAME) / "base")
    out = Path(a.out)
    tf = load_task_file(write_task_file(out, a.items, a.windows))
    model, tok = runner.load_model(a.model, progress=False)
    n_items = sum(len(t.items) for t in tf.tasks) + a.windows
    load0 = os.getloadavg()
    report: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"), "model": a.model,
        "machine": {"cpu": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "threads": a.threads, "python": platform.python_version(), "torch": torch.__version__},
        "workload": {"exact_match_tasks": len(TASKS), "items_per_task": a.items, "prose_windows": a.windows,
                     "window_tokens": 128, "items_total": n_items},
    }
    if a.before_src:
        print("before ...", file=sys.stderr)
        report["before"] = run_before(Path(a.before_src), model, tok, tf)
    print("after ...", file=sys.stderr)
    report["after"] = run_after(model, tok, tf, a.batch_size)
    if a.bf16:  # informational: the opt-in --dtype bfloat16 (different rounding, so other values)
        print("after (bfloat16) ...", file=sys.stderr)
        del model
        model, tok = runner.load_model(a.model, progress=False, dtype="bfloat16")
        report["after_bf16"] = run_after(model, tok, tf, a.batch_size)
    report["loadavg_start"], report["loadavg_end"] = list(load0), list(os.getloadavg())
    for side in ("before", "after", "after_bf16"):
        if side in report:
            report[side]["items_per_s"] = n_items / report[side]["total_s"]
    if "before" in report:
        report["speedup"] = report["before"]["total_s"] / report["after"]["total_s"]
        if "after_bf16" in report:
            report["speedup_bf16"] = report["before"]["total_s"] / report["after_bf16"]["total_s"]
    (out / "eval_speed.json").write_text(json.dumps(report, indent=2) + "\n")
    (out / "eval_speed.md").write_text(format_report(report))
    print(format_report(report))
    return 0


def format_report(r: dict[str, Any]) -> str:
    sides = [s for s in ("before", "after", "after_bf16") if s in r]
    w, m = r["workload"], r["machine"]
    intro = (f"model `{r['model']}`; {w['exact_match_tasks']} exact-match tasks x {w['items_per_task']} items "
             f"+ {w['prose_windows']} prose windows of 128 tokens; {m['threads']} threads on {m['cpus']} CPUs "
             f"({m['cpu']}); load average {r['loadavg_start'][0]:.1f} at start, {r['loadavg_end'][0]:.1f} at end.")
    lines = [f"# seme eval speed ({r['date']})", "", intro, "",
             "| task | " + " | ".join(f"{s} s | {s} value" for s in sides) + " |",
             "|---|" + "---|---|" * len(sides)]
    for name in r[sides[-1]]["tasks"]:
        cells = [f"{r[s]['tasks'][name]['s']:.1f} | {r[s]['tasks'][name]['value']:.4g}" for s in sides]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("| **total** | " + " | ".join(f"**{r[s]['total_s']:.1f}** | {r[s]['items_per_s']:.1f} items/s"
                                               for s in sides) + " |")
    if "speedup" in r:
        lines += ["", f"speed-up (float32, the default): **{r['speedup']:.2f}x**"]
    if "speedup_bf16" in r:
        lines.append(f"speed-up with `--dtype bfloat16` (opt-in; values differ by rounding): "
                     f"**{r['speedup_bf16']:.2f}x**")
    return "\n".join(lines) + "\n"
