"""One evaluation path: a task file (a user's, or a built-in suite's) on one model -> metrics JSON.

The built-in suites ``zoo`` (SmolLM2-135M-Instruct + four experts) and ``tiny`` (the tiny CI zoo)
are task files shipped in the package (``seme/evaluation/tasks/*.yaml``) whose items come from the
data generators of :mod:`seme.evaluation.data`. Tasks with ``section: general`` (held-out prose
perplexity, instruction retention) are reported under ``general``.

Order of work: parse and check the task file and load its data, then the tokenizer (prompts and
windows tokenized, chat templates checked), and only then the model, so bad input fails fast.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seme import __version__
from seme.errors import EvalError
from seme.evaluation import data
from seme.evaluation.taskfile import TaskFile, builtin_path, load_task_file


@dataclass(frozen=True)
class Task:
    """A built-in suite's generated task as the zoo build sees it (training data + held-out items)."""

    name: str
    kind: str
    description: str
    generator: str
    args: dict[str, Any]
    max_new_tokens: int = 16

    def examples(self) -> Any:
        """(train, held-out) of the task's generator."""
        return data.GENERATORS[self.generator](**self.args)


@dataclass(frozen=True)
class Suite:
    """A built-in suite: its name, its task file and the generated tasks (``tasks``, by name)."""

    name: str
    path: Path
    tasks: dict[str, Task]


def get_suite(name: str) -> Suite:
    """A built-in suite by name (``zoo``, ``tiny``): its task file, parsed without loading data."""
    import yaml

    p = builtin_path(name)
    raw = yaml.safe_load(p.read_text())
    tasks = {t["name"]: Task(t["name"], t["kind"], t.get("description", ""), t["generator"], t.get("args") or {},
                             t.get("max_new_tokens", 16))
             for t in raw["tasks"] if t.get("section", "tasks") == "tasks" and "generator" in t}
    return Suite(name, p, tasks)


SUITES = ("zoo", "tiny")


def suite_fingerprint(s: Suite) -> str:
    """Short hash of what a suite measures (its task file: tasks, generators and their arguments).

    Eval caches key on it, so changing a task's data invalidates cached metrics.
    """
    spec = {"file": s.path.read_text(), "tasks": [[t.name, t.kind, t.generator, t.args, t.max_new_tokens]
                                                  for t in s.tasks.values()]}
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()[:12]


def _progress(total: int, desc: str, enabled: bool) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=False)


def open_tasks(suite: str | None = None, task_file: str | os.PathLike | None = None, *,
               only: list[str] | None = None, zoo_dir: str | os.PathLike | None = None,
               general: bool = True, source: str | None = None, inline: bool = False) -> TaskFile:
    """The task file of a built-in suite or a user's file, checked and with its data loaded."""
    if (suite is None) == (task_file is None):
        raise EvalError("give a suite name or a task file (not both)")
    path = builtin_path(suite) if suite is not None else Path(task_file)
    tf = load_task_file(path, source=source or (f"seme:{suite}" if suite else None), inline=inline,
                        zoo_dir=zoo_dir)
    if only:
        names = [t.name for t in tf.tasks]
        for n in only:
            if n not in names:
                raise EvalError(f"unknown task {n!r} in {'suite ' + repr(suite) if suite else tf.path}; "
                                f"known: {', '.join(names)}")
        tf.tasks = [t for t in tf.tasks if t.name in only or t.section == "general"]
    if not general:
        tf.tasks = [t for t in tf.tasks if t.section != "general"]
    return tf


def evaluate(
    model_dir: str | Path,
    suite: str | None = "zoo",
    tasks: list[str] | None = None,
    zoo_dir: str | Path | None = None,
    device: str = "cpu",
    batch_size: int = 64,
    limit: int | None = None,
    progress: bool = True,
    general: bool = True,
    task_file: str | os.PathLike | TaskFile | None = None,
    dtype: str = "float32",
) -> dict[str, Any]:
    """Run a built-in suite or a task file on one model and return the metrics dict.

    ``tasks`` keeps only those (non-general) tasks; ``limit`` caps the items per task (perplexity
    tasks: max(4, limit // 2) windows); ``zoo_dir`` is where the instruction set recorded by
    ``seme zoo build`` lives (default: the suite's zoo in the zoo cache).
    """
    from seme.evaluation import kinds, runner

    t0 = time.perf_counter()
    if isinstance(task_file, TaskFile):
        tf = task_file
    else:
        tf = open_tasks(suite if task_file is None else None, task_file, only=tasks, zoo_dir=zoo_dir,
                        general=general)
    tok = runner.load_tokenizer(model_dir)
    prepared = [kinds.prepare(t, tok, limit) for t in tf.tasks]
    from seme.merge import resolve_device

    device = str(resolve_device(device))  # auto -> cuda|cpu; cuda without a GPU: a clear error, not torch's
    model, tok = runner.load_model(model_dir, device, progress, tok=tok, dtype=dtype)
    import torch

    torch.manual_seed(0)
    out: dict[str, dict[str, Any]] = {"tasks": {}, "general": {}}
    notes: list[str] = []
    for pr in prepared:
        spec = pr.spec
        if pr.note:
            notes.append(pr.note)
            continue
        n = len(pr.items) or len(pr.windows)
        with _progress(n, spec.name, progress and spec.kind != "lm_eval") as bar:
            if spec.kind == "exact_match":
                entry = kinds.run_exact_match(pr, model, tok, batch_size, bar)
            elif spec.kind == "multiple_choice":
                entry = kinds.run_multiple_choice(pr, model, tok, batch_size, bar)
            elif spec.kind == "perplexity":
                entry = kinds.run_perplexity(pr, model, tok, batch_size, bar)
            else:
                entry = kinds.run_lm_eval(pr, model, tok, min(batch_size, 32), limit, device, progress)
        entry["kind"] = spec.kind
        if spec.description:
            entry["description"] = spec.description
        out[spec.section][spec.name] = entry
    res: dict[str, Any] = {
        "model": str(model_dir),
        "suite": tf.name,
        "tasks": out["tasks"],
        "general": out["general"],
        "task_file": tf.record(),
        "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "seme_version": __version__,
        "device": device,
        "dtype": dtype,
        "wall_s": round(time.perf_counter() - t0, 2),
    }
    if limit:
        res["limit"] = limit
    if notes:
        res["notes"] = notes
    return res


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
        if "perplexity" in t and t["metric"] != "perplexity":
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
