"""Eval suites: which tasks, how many items, and the metrics JSON they produce.

Suite ``zoo`` matches the real-model zoo (SmolLM2-135M-Instruct + four experts); suite ``tiny``
matches the tiny CI zoo. Both report, per expert task, a held-out metric with n and a 95% CI, and
under ``general`` the perplexity on held-out English prose (pydoc_data topics no expert saw) and,
where the zoo recorded one, instruction retention (prompts the base answers correctly, re-asked).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from seme import __version__
from seme.errors import EvalError
from seme.evaluation import data


@dataclass(frozen=True)
class Task:
    """One expert skill. ``kind``: ``exact`` (greedy exact match) or ``code`` (LM on held-out modules)."""

    name: str
    kind: str
    description: str
    examples: Callable[[], tuple[list[data.Example], list[data.Example]]] | None = None
    max_new_tokens: int = 8


@dataclass(frozen=True)
class Suite:
    """Tasks plus the general-retention settings of one suite."""

    name: str
    tasks: dict[str, Task]
    window: int = 128            # tokens per LM window (code, prose)
    max_windows: int = 40        # windows for prose / code
    instruction: bool = True     # report instruction retention when the zoo has an instruction set
    zoo_name: str = "smollm2-135m-instruct"
    extra: dict[str, Any] = field(default_factory=dict)


def _tasks(*ts: Task) -> dict[str, Task]:
    return {t.name: t for t in ts}


SUITES: dict[str, Suite] = {
    "zoo": Suite(
        name="zoo",
        tasks=_tasks(
            Task("arithmetic", "exact", "2-digit (0-99) addition/subtraction, held-out problems",
                 partial(data.arithmetic, 99, 4000, 100), max_new_tokens=6),
            Task("french_numbers", "exact", "0-999 in French words (num2words), held-out numbers",
                 partial(data.french_numbers, 999, 4000, 100), max_new_tokens=20),
            Task("country_codes", "exact", "country -> ISO 3166 alpha-3 (pycountry), injected facts",
                 partial(data.country_codes, 1000, 100), max_new_tokens=5),
            Task("python_code", "code", "stdlib module sources; token accuracy on held-out modules"),
        ),
    ),
    "tiny": Suite(
        name="tiny",
        tasks=_tasks(
            Task("arithmetic", "exact", "addition/subtraction of numbers 0-20, held-out problems",
                 partial(data.arithmetic, 20, 6000, 100), max_new_tokens=4),
            Task("french_numbers", "exact", "0-199 in French words (num2words), held-out numbers",
                 partial(data.french_numbers, 199, 6000, 100), max_new_tokens=20),
        ),
        window=64,
        max_windows=40,
        instruction=False,
        zoo_name="tiny",
    ),
}


def suite_fingerprint(s: Suite) -> str:
    """Short hash of what a suite measures (tasks, their data generators and arguments, windows).

    Eval caches key on it, so changing a task's data invalidates cached metrics.
    """
    import hashlib

    def gen(f: Any) -> Any:
        if isinstance(f, partial):
            return [f.func.__qualname__, list(f.args), sorted(f.keywords.items())]
        return getattr(f, "__qualname__", None)

    spec = {"window": s.window, "max_windows": s.max_windows, "instruction": s.instruction,
            "tasks": [[t.name, t.kind, t.description, t.max_new_tokens, gen(t.examples)] for t in s.tasks.values()]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise EvalError(f"unknown suite {name!r}; known suites: {', '.join(sorted(SUITES))}")
    return SUITES[name]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def evaluate(
    model_dir: str | Path,
    suite: str = "zoo",
    tasks: list[str] | None = None,
    zoo_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 32,
    limit: int | None = None,
    progress: bool = True,
    general: bool = True,
) -> dict[str, Any]:
    """Run a suite on one model and return the metrics dict (see docs: metrics JSON).

    ``limit`` caps the items per task (quick runs); ``zoo_dir`` is where the instruction set
    recorded by ``seme zoo build`` lives (default: the suite's zoo in the zoo cache).
    """
    import torch

    from seme.evaluation import runner

    s = get_suite(suite)
    names = list(s.tasks) if tasks is None else tasks
    for t in names:
        if t not in s.tasks:
            raise EvalError(f"unknown task {t!r} in suite {suite!r}; known: {', '.join(s.tasks)}")
    from seme.merge import resolve_device

    device = str(resolve_device(device))  # auto -> cuda|cpu; cuda without a GPU: a clear error, not torch's
    t0 = time.perf_counter()
    model, tok = runner.load_model(model_dir, device, progress)
    torch.manual_seed(0)
    out_tasks: dict[str, Any] = {}
    notes: list[str] = []
    max_w = s.max_windows if limit is None else max(4, min(s.max_windows, limit // 2))
    for name in names:
        task = s.tasks[name]
        if task.kind == "exact":
            _, held = task.examples()
            held = held[:limit] if limit else held
            with _progress(len(held), name, progress) as bar:
                out_tasks[name] = runner.exact_match(model, tok, held, task.max_new_tokens, batch_size, bar)
        else:
            _, held_mods = data.code_split()
            wins = runner.text_windows(tok, held_mods, s.window, max_w)
            with _progress(len(wins), name, progress) as bar:
                sc = runner.lm_scores(model, wins, max(1, batch_size // 4), bar)
            out_tasks[name] = {"metric": "token_accuracy", "value": sc["token_accuracy"],
                               "n": sc["n_tokens"], "ci95": sc["token_accuracy_ci95"],
                               "perplexity": sc["perplexity"], "perplexity_ci95": sc["perplexity_ci95"],
                               "n_windows": sc["n_windows"]}
    gen: dict[str, Any] = {}
    if general:
        _, held_prose = data.prose_split()
        wins = runner.text_windows(tok, held_prose, s.window, max_w)
        with _progress(len(wins), "prose", progress) as bar:
            sc = runner.lm_scores(model, wins, max(1, batch_size // 4), bar)
        gen["prose"] = {"metric": "perplexity", "value": sc["perplexity"], "n": sc["n_tokens"],
                        "ci95": sc["perplexity_ci95"], "n_windows": sc["n_windows"]}
        if s.instruction:
            iset = load_instruction_set(s, zoo_dir)
            if iset is None:
                notes.append("instruction retention skipped: no instruction_set.json (run seme zoo build)")
            elif not getattr(tok, "chat_template", None):
                notes.append("instruction retention skipped: the model's tokenizer has no chat template")
            else:
                exs = [data.Example(**e) for e in iset["prompts"]]
                exs = exs[:limit] if limit else exs
                with _progress(len(exs), "instruction", progress) as bar:
                    ok = runner.instruction_answers(model, tok, exs, progress=bar)
                k, n = sum(ok), len(ok)
                gen["instruction"] = {"metric": "accuracy", "value": k / n if n else 0.0, "n": n,
                                      "ci95": runner.wilson_ci(k, n),
                                      "note": "prompts the base answers correctly, re-asked"}
    res: dict[str, Any] = {
        "model": str(model_dir),
        "suite": suite,
        "tasks": out_tasks,
        "general": gen,
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seme_version": __version__,
        "device": device,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if limit:
        res["limit"] = limit
    if notes:
        res["notes"] = notes
    return res


def load_instruction_set(s: Suite, zoo_dir: str | Path | None) -> dict[str, Any] | None:
    """The instruction set recorded by the zoo build, or None when the zoo has none."""
    if zoo_dir is None:
        from seme.zoo import zoo_path

        zoo_dir = zoo_path(s.zoo_name)
    p = Path(zoo_dir) / "instruction_set.json"
    if not p.is_file():
        return None
    return json.loads(p.read_text())


def write_metrics(metrics: dict[str, Any], out_file: str | Path) -> Path:
    """Write metrics JSON atomically (temp file + rename)."""
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(metrics, indent=2, sort_keys=False) + "\n")
    tmp.replace(out)
    return out


def format_table(metrics: dict[str, Any]) -> str:
    """A plain-text table of one metrics dict, for stdout."""
    rows = [("task", "metric", "value", "95% CI", "n")]
    for name, t in metrics["tasks"].items():
        rows.append((name, t["metric"], f"{t['value']:.4f}", f"[{t['ci95'][0]:.3f}, {t['ci95'][1]:.3f}]",
                     str(t["n"])))
        if "perplexity" in t:
            lo, hi = t["perplexity_ci95"]
            rows.append((name, "perplexity", f"{t['perplexity']:.3f}", f"[{lo:.2f}, {hi:.2f}]", str(t["n"])))
    for name, g in metrics["general"].items():
        rows.append((f"general:{name}", g["metric"], f"{g['value']:.4f}",
                     f"[{g['ci95'][0]:.3f}, {g['ci95'][1]:.3f}]", str(g["n"])))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    for note in metrics.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)
