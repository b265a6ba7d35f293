"""``seme bench quality``: merge the zoo's experts with every method, evaluate everything, report.

For each method (and a scale sweep where the method has a scale) the experts are merged with
``seme.merge.run_merge``; mergekit 0.1.5's ``ties`` and ``task_arithmetic`` run on the same experts
through ``mergekit-yaml`` as an outside reference. The base, every expert and every merged model are
evaluated with the zoo's suite. Reports: ``quality.json``, ``quality.md`` (per task raw score and
normalized = merged / expert), ``quality.png`` (task retention vs general perplexity, Pareto front).
A method that fails is reported as failed, with its error, never dropped.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import fcntl
import json
import logging
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

EVAL_CACHE_VERSION = 1


@dataclass
class Variant:
    """One merge to run: a label, a method family and its config (seme or mergekit)."""

    label: str
    family: str
    method: str
    params: dict[str, Any]
    model_params: dict[str, Any] = field(default_factory=dict)
    scale: float | None = None
    engine: str = "seme"          # seme | mergekit
    uses_base: bool = True


def variants(full: bool) -> list[Variant]:
    """The benchmark grid: every method, SeMe ablations (seme-method.md §9), scale sweeps."""
    sweep = (0.5, 0.7, 1.0) if full else (1.0,)
    v: list[Variant] = [Variant("linear", "linear", "linear", {"normalize": True}, {"weight": 1.0},
                                uses_base=False)]
    for s in (0.3, 0.5, 0.7, 1.0) if full else (0.5,):
        v.append(Variant(f"task_arithmetic@{s}", "task_arithmetic", "task_arithmetic", {"lambda": s},
                         {"weight": 1.0}, s))
    for s in sweep:
        v.append(Variant(f"ties@{s}", "ties", "ties", {"lambda": s}, {"weight": 1.0, "density": 0.5}, s))
    for s in sweep if full else ():
        v.append(Variant(f"dare_ties@{s}", "dare_ties", "dare_ties", {"lambda": s},
                         {"weight": 1.0, "density": 0.5}, s))
    v.append(Variant("model_stock", "model_stock", "model_stock", {}, {}))
    for s in sweep:
        v.append(Variant(f"seme@{s}", "seme", "seme", {"scale": s}, {"weight": 1.0}, s))
    if full:
        v += [
            Variant("seme_no_erase", "seme_no_erase", "seme", {"erase": "none"}, {"weight": 1.0}, 1.0),
            Variant("seme_no_select", "seme_no_select", "seme", {"select_ratio": 0.0}, {"weight": 1.0}, 1.0),
            Variant("seme_overlap", "seme_overlap", "seme", {"compute": "overlap"}, {"weight": 1.0}, 1.0),
            Variant("seme_cap", "seme_cap", "seme", {"compute": "cap"}, {"weight": 1.0}, 1.0),
        ]
    v.append(Variant("mergekit_ties", "mergekit_ties", "ties", {"normalize": True},
                     {"weight": 1.0, "density": 0.5}, 1.0, engine="mergekit"))
    if full:
        v.append(Variant("mergekit_task_arithmetic", "mergekit_task_arithmetic", "task_arithmetic", {},
                         {"weight": 0.5}, 0.5, engine="mergekit"))
    return v


def merge_config(var: Variant, base: Path, experts: list[Path], out_dtype: str) -> dict[str, Any]:
    """The mergekit-compatible config dict of one variant."""
    cfg: dict[str, Any] = {
        "merge_method": var.method,
        "models": [{"model": str(e), "parameters": dict(var.model_params)} for e in experts],
        "parameters": dict(var.params),
        "dtype": "float32",
        "out_dtype": out_dtype,
        "seed": 0,
        "tokenizer_source": "base",
    }
    if var.uses_base:
        cfg["base_model"] = str(base)
    else:
        cfg["tokenizer_source"] = str(experts[0])
    return cfg


def _mergekit_exe() -> str | None:
    cand = Path(sys.executable).with_name("mergekit-yaml")
    return str(cand) if cand.exists() else shutil.which("mergekit-yaml")


def run_variant(var: Variant, cfg: dict[str, Any], out: Path, device: str, progress: bool,
                alignment: Path | None = None) -> dict[str, Any]:
    """Merge one variant into ``out``; returns status, seconds and the error (if any).

    ``alignment``: a SeMe alignment artifact shared by the SeMe variants (``seme align`` once, then
    merge many, as seme-method.md §7 intends); its time is reported once, separately.
    """
    t0 = time.perf_counter()
    try:
        if var.engine == "mergekit":
            exe = _mergekit_exe()
            if exe is None:
                raise RuntimeError("mergekit-yaml not found (pip install mergekit==0.1.5)")
            mk = dict(cfg)
            mk["dtype"] = "float32"
            mk.pop("seed", None)
            cfg_path = out.with_name(out.name + ".mergekit.yml")
            import yaml

            cfg_path.write_text(yaml.safe_dump(mk))
            if out.exists():
                shutil.rmtree(out)
            r = subprocess.run([exe, str(cfg_path), str(out), "--copy-tokenizer"] +
                               (["--cuda"] if device.startswith("cuda") else []),
                               check=False, capture_output=True, text=True)
            if r.returncode != 0:
                tail = (r.stderr or r.stdout).strip().splitlines()
                raise RuntimeError(f"mergekit-yaml exit {r.returncode}: {tail[-1] if tail else ''}")
        else:
            from seme.config import load_config
            from seme.merge import run_merge

            run_merge(load_config(cfg), out, alignment=alignment if var.method == "seme" else None,
                      device=device, overwrite=True, progress=progress)
        return {"status": "ok", "merge_s": round(time.perf_counter() - t0, 1)}
    except Exception as e:  # noqa: BLE001 - a failing method is reported, not hidden
        msg = " ".join(str(e).split())[:400] or type(e).__name__
        log.warning("method %s failed: %s", var.label, msg)
        shutil.rmtree(out, ignore_errors=True)
        return {"status": "failed", "error": f"{type(e).__name__}: {msg}",
                "merge_s": round(time.perf_counter() - t0, 1)}


def _cpu_s() -> float:
    """CPU seconds of this process and its finished children (mergekit runs as a child)."""
    import resource

    me, ch = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + ch.ru_utime + ch.ru_stime


def _shared_alignment(grid: list[Variant], base: Path, experts: list[Path], out_dtype: str, models_dir: Path,
                      device: str, reuse: Path | None = None) -> tuple[Path | None, dict[str, Any]]:
    """Compute one SeMe alignment for every SeMe variant of the grid (None when the grid has none).

    ``reuse``: an existing artifact (another run's, same zoo); seme's merge verifies its sources.
    """
    seme_vars = [v for v in grid if v.engine == "seme" and v.method == "seme"]
    if not seme_vars:
        return None, {}
    if reuse is not None:
        return reuse, {"reused": str(reuse), "wall_s": 0.0, "variants": [v.label for v in seme_vars]}
    out = models_dir / "seme_alignment"
    t0, c0 = time.perf_counter(), time.process_time()
    print(f"[bench] aligning once for {len(seme_vars)} SeMe variants", file=sys.stderr, flush=True)
    try:
        from seme.config import load_config
        from seme.semantic.alignment import align

        align(load_config(merge_config(seme_vars[0], base, experts, out_dtype)), out, device=device,
              overwrite=True)
    except Exception as e:  # noqa: BLE001 - then every SeMe variant aligns inline (and may fail there)
        return None, {"error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}",
                      "wall_s": round(time.perf_counter() - t0, 1)}
    return out, {"wall_s": round(time.perf_counter() - t0, 1), "cpu_s": round(time.process_time() - c0, 1),
                 "variants": [v.label for v in seme_vars]}


def eval_cached(model_dir: Path, suite: str, zoo_dir: Path, limit: int | None, cache_dir: Path | None,
                device: str, progress: bool) -> dict[str, Any]:
    """Evaluate a model; parents (base/experts) are cached by weights sha256 inside the zoo."""
    from seme import __version__
    from seme.evaluation import evaluate, write_metrics
    from seme.evaluation.suites import get_suite, suite_fingerprint
    from seme.fsutil import sha256_file

    key = None
    if cache_dir is not None:
        sha = sha256_file(model_dir / "model.safetensors")[:16]
        iset = zoo_dir / "instruction_set.json"  # the instruction items are part of the measurement
        isha = sha256_file(iset)[:8] if iset.is_file() else "noinstr"
        fp = suite_fingerprint(get_suite(suite))  # a changed task (data, settings) is a cache miss
        key = cache_dir / f"{suite}-{limit or 'all'}-v{EVAL_CACHE_VERSION}-{__version__}-{fp}-{isha}-{sha}.json"
        # concurrent runs on one zoo: one evaluates a parent, the others wait for its cached result
        with open(key.with_name(f".{key.name}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if key.is_file():
                return json.loads(key.read_text())
            m = evaluate(model_dir, suite, zoo_dir=zoo_dir, limit=limit, device=device, progress=progress)
            write_metrics(m, key)
            return m
    return evaluate(model_dir, suite, zoo_dir=zoo_dir, limit=limit, device=device, progress=progress)


def summarize(rows: list[dict[str, Any]], tasks: list[str]) -> dict[str, Any]:
    """Normalized scores (merged / expert), per-task winners, Pareto front, matched-perplexity table."""
    experts = {r["expert_task"]: r for r in rows if r["kind"] == "expert"}
    base = next(r for r in rows if r["kind"] == "base")
    base_ppl = base["metrics"]["general"]["prose"]["value"]
    informative = informative_tasks(experts, base, tasks)
    for r in rows:
        if r.get("status") != "ok":
            continue
        m = r["metrics"]
        r["norm"] = {}
        for t in tasks:
            ev = experts[t]["metrics"]["tasks"][t]["value"] if t in experts else None
            r["norm"][t] = (m["tasks"][t]["value"] / ev) if ev else None
        vals = [v for v in r["norm"].values() if v is not None]
        r["mean_norm_all"] = sum(vals) / len(vals) if vals else None
        vals = [r["norm"][t] for t in informative if r["norm"][t] is not None]
        r["mean_norm"] = sum(vals) / len(vals) if vals else None
        r["ppl"] = m["general"]["prose"]["value"]
        r["ppl_ratio"] = r["ppl"] / base_ppl
    merged = [r for r in rows if r["kind"] == "merged" and r.get("status") == "ok"]
    winners = {}
    for t in tasks:
        if merged:
            top = max(r["metrics"]["tasks"][t]["value"] for r in merged)
            best = [r for r in merged if r["metrics"]["tasks"][t]["value"] == top]
            # a tie is reported as a tie, and "nobody solves anything" is not a win
            winners[t] = {"label": " = ".join(r["label"] for r in best) if top > 0 else None,
                          "value": top, "norm": best[0]["norm"][t]}
    pareto = []
    for r in merged:
        dominated = any(
            o is not r and o["mean_norm"] >= r["mean_norm"] and o["ppl"] <= r["ppl"]
            and (o["mean_norm"] > r["mean_norm"] or o["ppl"] < r["ppl"]) for o in merged)
        if not dominated:
            pareto.append(r["label"])
    matched = {}
    for thr in (1.1, 1.25, 1.5, 2.0, 4.0):
        per: dict[str, Any] = {}
        for r in merged:
            if r["ppl_ratio"] <= thr and (r["family"] not in per or r["mean_norm"] > per[r["family"]]["mean_norm"]):
                per[r["family"]] = {"label": r["label"], "mean_norm": r["mean_norm"], "ppl_ratio": r["ppl_ratio"]}
        matched[str(thr)] = per
    return {"base_ppl": base_ppl, "winners": winners, "pareto": pareto, "matched_ppl": matched,
            "informative_tasks": informative}


def informative_tasks(experts: dict[str, Any], base: dict[str, Any], tasks: list[str]) -> list[str]:
    """Tasks whose expert is clearly better than the base (95% CIs disjoint): the mean normalized
    score uses only these, so a task the expert did not really learn (a ratio of a few items, or
    of the base's own ability) does not decide the ranking. All tasks with an expert if none is."""
    out = []
    for t in tasks:
        if t not in experts:
            continue
        e, b = experts[t]["metrics"]["tasks"][t], base["metrics"]["tasks"][t]
        if "ci95" in e and "ci95" in b:
            if e["ci95"][0] > b["ci95"][1]:
                out.append(t)
        elif e["value"] > b["value"]:
            out.append(t)
    return out or [t for t in tasks if t in experts]


def _fmt(v: Any, nd: int = 3) -> str:
    return "–" if v is None else f"{v:.{nd}f}"


def write_markdown(report: dict[str, Any], path: Path) -> None:
    """The Markdown report: set-up, per-model table (raw and normalized), winners, Pareto, failures."""
    tasks = report["tasks"]
    s = report["summary"]
    L = [f"# Merge quality benchmark ({report['zoo']['name']} zoo, suite `{report['suite']}`)", ""]
    if report["zoo"]["name"] == "tiny":
        L += ["> **Tiny CI zoo** (small llama pretrained ~1 min on CPU, LoRA experts): these numbers test",
              "> the harness; they say little about real models.", ""]
    L += [f"- date: {report['created']}",
          f"- machine: {report['machine']}",
          "- versions: " + ", ".join(f"{k} {v}" for k, v in report["versions"].items()),
          (f"- mode: {'quick' if report['quick'] else 'full'}; items per task: {report['limit'] or 'all'}; "
          f"device: {report['device']}; torch threads: {report['threads']}"),
          (f"- wall time: bench {report['wall_s']:.0f} s (merges {report['merge_s_total']:.0f} s, evals "
          f"{report['eval_s_total']:.0f} s); zoo build (when built, cached since) {report['zoo'].get('parts_wall_s', '?')} s"),
          *([(f"- CPU time: {report['cpu_s']:.0f} s (this process and its children); load average (1/5/15 min) "
              f"at start {'/'.join(f'{x:.1f}' for x in report['loadavg_start'])}, at end "
              f"{'/'.join(f'{x:.1f}' for x in report['loadavg_end'])}")] if "cpu_s" in report else []),
          *([(f"- SeMe alignment: computed once in {al['wall_s']:.0f} s wall ({al.get('cpu_s', 0):.0f} s CPU), "
              "shared by the SeMe variants (their merge s exclude it)")]
            if (al := report.get("seme_alignment") or {}).get("wall_s") and not al.get("error") else []),
          ("- normalized = merged score / the task's expert score; ppl = perplexity on held-out pydoc prose "
          f"(base {s['base_ppl']:.2f})"),
          ("- \\* mean norm = mean normalized score over the tasks whose expert is clearly better than the base "
           f"(95% CIs disjoint): {', '.join(s.get('informative_tasks', tasks))}; the Pareto front and the "
           "matched-perplexity table use it"), ""]
    head = ["model", "kind"] + [f"{t} raw (norm)" for t in tasks] + ["mean norm*", "prose ppl", "ppl/base"]
    has_instr = any("instruction" in (r.get("metrics") or {}).get("general", {}) for r in report["rows"])
    if has_instr:
        head.append("instruction")
    head += ["merge s", "status"]
    L += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in report["rows"]:
        if r.get("status") != "ok":
            cells = [r["label"], r["kind"]] + ["–"] * (len(head) - 4) + [_fmt(r.get("merge_s"), 0), "**failed**"]
            L.append("| " + " | ".join(cells) + " |")
            continue
        m = r["metrics"]
        cells = [r["label"], r["kind"]]
        for t in tasks:
            cells.append(f"{m['tasks'][t]['value']:.3f} ({_fmt(r['norm'].get(t), 2)})")
        cells += [_fmt(r["mean_norm"]), f"{r['ppl']:.2f}", f"{r['ppl_ratio']:.2f}"]
        if has_instr:
            ins = m["general"].get("instruction")
            cells.append(f"{ins['value']:.2f}" if ins else "–")
        cells += [_fmt(r.get("merge_s"), 0), "ok"]
        L.append("| " + " | ".join(cells) + " |")
    L += ["", "## Which method wins each task (best raw score among merged models)", ""]
    for t, w in s["winners"].items():
        if w["label"] is None:
            L.append(f"- **{t}**: none: every merged model scores 0")
        else:
            L.append(f"- **{t}**: {w['label']} ({w['value']:.3f}, {_fmt(w['norm'], 2)} of the expert)")
    L += ["", "## Pareto front (mean normalized task score ↑ vs prose perplexity ↓)", "",
          ", ".join(s["pareto"]) or "–", "", "## At matched general perplexity", "",
          ("Best mean normalized task score per method family among its settings whose prose perplexity "
          "is at most the given multiple of the base's:"), ""]
    fams = sorted({f for per in s["matched_ppl"].values() for f in per})
    L += ["| ppl ≤ × base | " + " | ".join(fams) + " |", "|---|" + "---|" * len(fams)]
    for thr, per in s["matched_ppl"].items():
        L.append(f"| {thr} | " + " | ".join(
            f"{per[f]['mean_norm']:.3f} ({per[f]['label']})" if f in per else "–" for f in fams) + " |")
    failed = [r for r in report["rows"] if r.get("status") == "failed"]
    if failed:
        L += ["", "## Failed methods", ""] + [f"- {r['label']}: `{r['error']}`" for r in failed]
    for n in report.get("notes", []):
        L += ["", f"Note: {n}"]
    path.write_text("\n".join(L) + "\n")


def write_chart(report: dict[str, Any], path: Path) -> None:
    """PNG: mean normalized task score vs prose perplexity ratio (Pareto front), and per-task bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in report["rows"] if r.get("status") == "ok" and r.get("mean_norm") is not None]
    tasks = report["tasks"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(14, 5.5))
    fams = sorted({r["family"] for r in ok})
    cmap = plt.get_cmap("tab20")
    for i, f in enumerate(fams):
        pts = [r for r in ok if r["family"] == f]
        a1.scatter([r["ppl_ratio"] for r in pts], [r["mean_norm"] for r in pts], label=f, color=cmap(i % 20),
                   marker="*" if f in ("base", "expert") else "o", s=80)
        for r in pts:
            a1.annotate(r["label"], (r["ppl_ratio"], r["mean_norm"]), fontsize=6, alpha=0.7)
    front = sorted((r for r in ok if r["label"] in report["summary"]["pareto"]), key=lambda r: r["ppl_ratio"])
    if front:
        a1.plot([r["ppl_ratio"] for r in front], [r["mean_norm"] for r in front], "k--", lw=1, label="Pareto")
    a1.set_xscale("log")
    a1.set_xlabel("prose perplexity / base (log, lower is better)")
    a1.set_ylabel("mean normalized task score (merged / expert)")
    a1.set_title("task retention vs general ability")
    a1.legend(fontsize=7)
    merged = [r for r in ok if r["kind"] == "merged"]
    width = 0.8 / max(1, len(tasks))
    for j, t in enumerate(tasks):
        a2.bar([i + j * width for i in range(len(merged))], [r["norm"].get(t) or 0 for r in merged], width,
               label=t)
    a2.set_xticks([i + 0.4 - width / 2 for i in range(len(merged))])
    a2.set_xticklabels([r["label"] for r in merged], rotation=60, ha="right", fontsize=7)
    a2.axhline(1.0, color="k", lw=0.8)
    a2.set_ylabel("normalized score (merged / expert)")
    a2.set_title("per task")
    a2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_bench(
    zoo_dir: Path,
    out_dir: Path,
    quick: bool = False,
    only: list[str] | None = None,
    limit: int | None = None,
    device: str = "cpu",
    keep_models: bool = False,
    progress: bool = True,
    seme_alignment: Path | None = None,
) -> dict[str, Any]:
    """Run the benchmark on a built zoo; returns the report dict (also written to ``out_dir``)."""
    import torch

    from seme import __version__
    from seme.errors import ConfigError
    from seme.evaluation import get_suite
    from seme.zoo import _versions, load_zoo

    t_start = time.perf_counter()
    load0, cpu0 = list(os.getloadavg()), _cpu_s()
    zoo = load_zoo(zoo_dir)
    suite = zoo["suite"]
    tasks = [t for t in get_suite(suite).tasks if t in zoo["experts"]]
    base = zoo_dir / zoo["base"]["path"]
    experts = [zoo_dir / zoo["experts"][t]["path"] for t in tasks]
    grid = variants(full=not quick)
    if only:
        known = {v.label for v in variants(True)} | {v.family for v in variants(True)}
        bad = [o for o in only if o not in known]
        if bad:
            raise ConfigError(f"unknown bench method(s) {bad}; known: {', '.join(sorted(known))}")
        # in the order given (a long run puts what matters most first)
        grid = sorted((v for v in variants(True) if v.label in only or v.family in only),
                      key=lambda v: only.index(v.label) if v.label in only else only.index(v.family))
    notes: list[str] = []
    try:
        from seme import methods

        methods.get("seme")
    except Exception:  # noqa: BLE001 - SeMe may not be installed in this checkout yet
        try:
            import seme.semantic.merger  # noqa: F401 - registers the method
        except Exception as e:  # noqa: BLE001
            notes.append(f"SeMe unavailable ({type(e).__name__}: {e}); its rows are marked failed")
    out_dir.mkdir(parents=True, exist_ok=True)
    models_dir = out_dir / "models"
    models_dir.mkdir(exist_ok=True)
    cache = zoo_dir / "evals"
    cache.mkdir(exist_ok=True)
    out_dtype = json.loads((base / "config.json").read_text()).get("dtype") or "float32"
    rows: list[dict[str, Any]] = []
    eval_s = merge_s = 0.0

    def evaluate_row(row: dict[str, Any], path: Path, cached: bool) -> None:
        nonlocal eval_s
        t0 = time.perf_counter()
        row["metrics"] = eval_cached(path, suite, zoo_dir, limit, cache if cached else None, device, progress)
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        eval_s += row["eval_s"]
        print(f"[bench] evaluated {row['label']} in {row['eval_s']:.0f}s", file=sys.stderr, flush=True)

    # aligned first: a concurrent run (other variants) evaluates the uncached parents meanwhile
    alignment, align_info = _shared_alignment(grid, base, experts, out_dtype, models_dir, device, seme_alignment)
    if align_info.get("error"):
        notes.append(f"shared SeMe alignment failed ({align_info['error']}); each SeMe variant aligned inline")
    r = {"label": "base", "kind": "base", "family": "base", "status": "ok"}
    evaluate_row(r, base, True)
    rows.append(r)
    for t, e in zip(tasks, experts, strict=True):
        r = {"label": f"expert:{t}", "kind": "expert", "family": "expert", "expert_task": t, "status": "ok"}
        evaluate_row(r, e, True)
        rows.append(r)
    def make_report(complete: bool) -> dict[str, Any]:
        rep: dict[str, Any] = {
            "zoo": {"dir": str(zoo_dir), "name": zoo["name"], "parts_wall_s": zoo.get("parts_wall_s"),
                    "experts": {t: {k: zoo["experts"][t].get(k) for k in ("recipe", "train_data_sha256", "wall_s")}
                                for t in tasks}},
            "suite": suite, "tasks": tasks, "quick": quick, "limit": limit, "device": device,
            "threads": torch.get_num_threads(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, "
                       f"{'CUDA' if torch.cuda.is_available() else 'no GPU'}, {platform.platform()}",
            "versions": {**_versions(), "seme": __version__},
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "rows": rows, "notes": list(notes), "complete": complete,
            "merge_s_total": round(merge_s + align_info.get("wall_s", 0.0), 1), "eval_s_total": round(eval_s, 1),
            "seme_alignment": align_info, "loadavg_start": load0, "loadavg_end": list(os.getloadavg()),
            "cpu_s": round(_cpu_s() - cpu0, 1),
        }
        if not complete:
            rep["notes"].append(f"partial report: {len(rows)} of {len(grid) + len(tasks) + 1} rows done")
        rep["summary"] = summarize(rows, tasks)
        rep["wall_s"] = round(time.perf_counter() - t_start, 1)
        (out_dir / "quality.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
        write_markdown(rep, out_dir / "quality.md")
        return rep

    for var in grid:
        out = models_dir / var.label.replace("@", "_")
        cfg = merge_config(var, base, experts, out_dtype)
        print(f"[bench] merging {var.label}", file=sys.stderr, flush=True)
        res = run_variant(var, cfg, out, device, progress, alignment)
        merge_s += res["merge_s"]
        row = {"label": var.label, "kind": "merged", "family": var.family, "method": var.method,
               "engine": var.engine, "scale": var.scale, "config": cfg, **res}
        if res["status"] == "ok":
            try:
                evaluate_row(row, out, False)
            except Exception as e:  # noqa: BLE001 - a merged model that cannot be evaluated is a failure
                row.update(status="failed", error=f"eval: {type(e).__name__}: {e}")
            if not keep_models:
                shutil.rmtree(out, ignore_errors=True)
        rows.append(row)
        make_report(False)  # a report after every row, so an interrupted run still leaves one
    report = make_report(True)
    write_chart(report, out_dir / "quality.png")
    if not keep_models:
        shutil.rmtree(models_dir, ignore_errors=True)
    return report


def combine_reports(paths: list[Path], out_dir: Path) -> dict[str, Any]:
    """One report from runs of the same zoo/suite/limit done concurrently (each with part of the grid).

    Parents come from the first report; merged rows from all, in grid order; wall time is the
    longest run's, merge/eval/CPU seconds are summed.
    """
    from seme.errors import ConfigError

    reps = [json.loads(Path(p).read_text()) for p in paths]
    first = reps[0]
    for p, r in zip(paths, reps, strict=True):
        if (r["zoo"]["name"], r["suite"], r["limit"]) != (first["zoo"]["name"], first["suite"], first["limit"]):
            raise ConfigError(f"{p}: zoo/suite/limit differ from {paths[0]}; reports cannot be combined")
    order = {v.label: i for i, v in enumerate(variants(True))}
    merged = sorted((row for r in reps for row in r["rows"] if row["kind"] == "merged"),
                    key=lambda row: order.get(row["label"], len(order)))
    labels = [row["label"] for row in merged]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise ConfigError(f"variants {dup} appear in more than one report")
    rep = dict(first)
    rep["rows"] = [row for row in first["rows"] if row["kind"] != "merged"] + merged
    rep["summary"] = summarize(rep["rows"], rep["tasks"])
    rep["wall_s"] = max(r["wall_s"] for r in reps)
    for k in ("merge_s_total", "eval_s_total", "cpu_s"):
        rep[k] = round(sum(r.get(k, 0.0) for r in reps), 1)
    rep["complete"] = all(r.get("complete", True) for r in reps)
    rep["seme_alignment"] = next((r["seme_alignment"] for r in reps if r.get("seme_alignment")), {})
    rep["loadavg_end"] = max((r.get("loadavg_end") or [0, 0, 0] for r in reps), key=lambda x: x[0])
    rep["notes"] = [n for r in reps for n in r.get("notes", [])] + [
        (f"combined from {len(reps)} concurrent runs ({', '.join(str(p) for p in paths)}) with "
         f"{'/'.join(str(r['threads']) for r in reps)} torch thread(s); parents' evals shared through the "
         "zoo's eval cache; wall time is the longest run's, merge/eval/CPU seconds are summed over the runs")]
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quality.json").write_text(json.dumps(rep, indent=2, default=str) + "\n")
    write_markdown(rep, out_dir / "quality.md")
    write_chart(rep, out_dir / "quality.png")
    return rep


def main(argv: list[str] | None = None) -> int:
    """``seme bench quality [--quick] [--tiny] [--zoo DIR] [--out DIR] [--methods ...] [--limit N]``."""
    p = argparse.ArgumentParser(prog="seme bench quality",
                                description="merge the zoo's experts with every method and evaluate")
    p.add_argument("--quick", action="store_true", help="a subset of methods and items (≤ 10 min)")
    p.add_argument("--tiny", action="store_true", help="use the tiny CI zoo")
    p.add_argument("--zoo", default=None, help="a built zoo directory (default: the cached zoo; built if missing)")
    p.add_argument("--out", default=None, help="report directory (default: bench-results/quality-<time>)")
    p.add_argument("--methods", nargs="+", default=None, help="only these variants or families")
    p.add_argument("--limit", type=int, default=None, help="items per task (default: all; --quick: 40)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--keep-models", action="store_true", help="keep the merged checkpoints")
    p.add_argument("-q", "--quiet", action="store_true")
    p.add_argument("--seme-alignment", default=None, metavar="DIR",
                   help="reuse this SeMe alignment artifact (same zoo) instead of aligning again")
    p.add_argument("--combine", nargs="+", default=None, metavar="QUALITY_JSON",
                   help="combine reports of concurrent runs (disjoint --methods) into --out; runs nothing")
    a = p.parse_args(argv)
    if a.combine:
        out = Path(a.out) if a.out else Path("bench-results") / f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
        combine_reports([Path(x) for x in a.combine], out)
        print((out / "quality.md").read_text())
        return 0
    import torch

    from seme.zoo import build_zoo

    if a.threads:
        torch.set_num_threads(a.threads)
    zoo_dir = Path(a.zoo) if a.zoo else build_zoo(tiny=a.tiny, progress=not a.quiet)
    out = Path(a.out) if a.out else Path("bench-results") / f"quality-{time.strftime('%Y%m%d-%H%M%S')}"
    limit = a.limit if a.limit is not None else (40 if a.quick else None)
    rep = run_bench(zoo_dir, out, quick=a.quick, only=a.methods, limit=limit, device=a.device,
                    keep_models=a.keep_models, progress=not a.quiet,
                    seme_alignment=Path(a.seme_alignment) if a.seme_alignment else None)
    print((out / "quality.md").read_text())
    print(f"reports: {out / 'quality.json'}, {out / 'quality.md'}, {out / 'quality.png'}")
    return 0 if all(r.get("status") == "ok" for r in rep["rows"] if r["kind"] != "merged") else 1
