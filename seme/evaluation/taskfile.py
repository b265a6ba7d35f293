"""Task files: what ``seme eval --tasks FILE.yaml`` (and the built-in suites) measure.

A task file lists tasks; each has a ``kind`` and its items come from a ``data`` file (a path relative
to the task file, or an ``s3://`` URI whose prefix is fetched and sha256-verified like a checkpoint)
or from a built-in ``generator`` (the zoo's data, see :mod:`seme.evaluation.data`)::

    name: my-checks                      # optional, default: the file's stem
    tasks:
      - name: capitals
        kind: exact_match                # greedy generation; stripped text == answer
        data: capitals.jsonl             # {"prompt": str, "answer": str} per line
        max_new_tokens: 8
      - name: sentiment
        kind: multiple_choice            # highest log-likelihood choice (and length-normalized)
        data: mc.jsonl                   # {"prompt": str, "choices": [str, ...], "answer": int} per line
      - name: prose
        kind: perplexity                 # token-level perplexity over fixed windows of a text file
        data: prose.txt
        window: 128
      - name: arc_local
        kind: lm_eval                    # a task of lm-evaluation-harness 0.4.x on this checkpoint
        task: arc_local
        include_path: lm_eval_tasks/

Everything here runs before any model is loaded: a bad file fails with one line naming the file and
line (``seme: error: tasks.yaml:7: ...``).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seme.errors import EvalError
from seme.evaluation import data as gen_data
from seme.fsutil import sha256_file

KINDS = ("exact_match", "multiple_choice", "perplexity", "lm_eval")
BUILTIN_DIR = Path(__file__).parent / "tasks"

_COMMON = {"name", "kind", "description", "section", "data", "generator", "args", "optional", "__line__"}
_KIND_KEYS = {
    "exact_match": {"max_new_tokens", "chat", "match", "stop_at_newline"},
    "multiple_choice": {"chat", "metric"},
    "perplexity": {"window", "max_windows", "metric"},
    "lm_eval": {"task", "include_path", "metric", "num_fewshot", "chat"},
}
_DEFAULTS: dict[str, dict[str, Any]] = {
    "exact_match": {"max_new_tokens": 16, "chat": False, "match": "exact", "stop_at_newline": True},
    "multiple_choice": {"chat": False, "metric": "accuracy"},
    "perplexity": {"window": 128, "max_windows": 40, "metric": "perplexity"},
    "lm_eval": {"include_path": None, "metric": "acc", "num_fewshot": None, "chat": False},
}
_CHOICES = {"match": ("exact", "contains"), "section": ("tasks", "general")}
_METRICS = {"multiple_choice": ("accuracy", "accuracy_norm"), "perplexity": ("perplexity", "token_accuracy")}


@dataclass(frozen=True)
class MCItem:
    """A multiple-choice item: the prompt, its choices and the index of the right one."""

    prompt: str
    choices: tuple[str, ...]
    answer: int


@dataclass
class TaskSpec:
    """One task of a task file, with its items loaded and checked (``texts`` for perplexity)."""

    name: str
    kind: str
    where: str                      # "file:line" of the task's entry, for messages
    section: str = "tasks"
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    items: list[Any] = field(default_factory=list)
    texts: dict[str, str] = field(default_factory=dict)
    source: str = ""                # data file / URI as written, or "generator:<name>"
    data_files: list[dict[str, str]] = field(default_factory=list)   # {"path", "source", "sha256"}
    skipped: str = ""               # why an optional task has nothing to measure


@dataclass
class TaskFile:
    """A parsed, checked task file."""

    name: str
    path: Path
    source: str
    sha256: str
    tasks: list[TaskSpec]

    def record(self) -> dict[str, Any]:
        """What the metrics JSON says about the task file: source, digest, every data file's digest."""
        return {"name": self.name, "source": self.source, "path": str(self.path), "sha256": self.sha256,
                "data": [{"task": t.name, **f} for t in self.tasks for f in t.data_files]}


class _LineLoader:
    """A YAML SafeLoader that records the line of every mapping as ``__line__`` (1-based)."""

    @staticmethod
    def load(text: str) -> Any:
        import yaml

        class Loader(yaml.SafeLoader):
            pass

        def construct(loader: Any, node: Any) -> dict[str, Any]:
            d = loader.construct_mapping(node, deep=True)
            d["__line__"] = node.start_mark.line + 1
            return d

        Loader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, construct)
        return yaml.load(text, Loader=Loader)


def builtin_path(suite: str) -> Path:
    """The task file of a built-in suite (``zoo``, ``tiny``), shipped in the package."""
    p = BUILTIN_DIR / f"{suite}.yaml"
    if not p.is_file():
        known = sorted(f.stem for f in BUILTIN_DIR.glob("*.yaml"))
        raise EvalError(f"unknown suite {suite!r}; known suites: {', '.join(known)}")
    return p


def _fetch_file(uri: str, endpoint_url: str | None) -> Path:
    """An ``s3://bucket/prefix/file`` object: its prefix fetched and verified (cached); the local file."""
    from seme.storage import fetch, parse_uri

    bucket, key = parse_uri(uri)
    prefix, _, name = key.rpartition("/")
    if not name:
        raise EvalError(f"{uri}: expected the URI of a file (s3://bucket/prefix/file)")
    local = fetch(f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}", endpoint_url=endpoint_url) / name
    if not local.is_file():
        raise EvalError(f"{uri}: no such object")
    return local


def resolve_source(text_or_path: str, workdir: str | os.PathLike | None = None,
                   endpoint_url: str | None = None) -> Path:
    """A task file given as a path, an ``s3://`` URI or YAML text (the pipeline's ``tasks`` input).

    YAML text is written to ``workdir/tasks.yaml``; its data paths must then be ``s3://`` URIs or
    absolute paths (there is no file for relative paths to be relative to).
    """
    s = str(text_or_path)
    if s.startswith("s3://"):
        return _fetch_file(s.strip(), endpoint_url)
    if "\n" in s or s.lstrip().startswith(("tasks:", "name:", "{")):
        import tempfile

        d = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="seme-tasks-"))
        d.mkdir(parents=True, exist_ok=True)
        p = d / "tasks.yaml"
        p.write_text(s)
        return p
    return Path(s).expanduser()


def load_task_file(path: str | os.PathLike, *, source: str | None = None, inline: bool = False,
                   zoo_dir: str | os.PathLike | None = None, endpoint_url: str | None = None) -> TaskFile:
    """Parse and check a task file and load every task's items; errors name file and line.

    ``inline``: the file was YAML text (relative data paths are refused). ``zoo_dir``: where
    generators that read a zoo (the instruction set) look.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise EvalError(f"task file {p} does not exist")
    try:
        raw = _LineLoader.load(p.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise EvalError(f"task file {p} is not UTF-8 text") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{p}:{mark.line + 1}" if mark else str(p)
        raise EvalError(f"{where}: invalid YAML: {getattr(e, 'problem', None) or e}") from None
    if not isinstance(raw, dict) or not isinstance(raw.get("tasks"), list):
        raise EvalError(f"{p}:1: a task file is a mapping with a 'tasks' list")
    unknown = sorted(set(raw) - {"name", "tasks", "description", "__line__"})
    if unknown:
        raise EvalError(f"{p}:{raw['__line__']}: unknown key(s) {', '.join(unknown)} (known: name, tasks)")
    if not raw["tasks"]:
        raise EvalError(f"{p}:{raw['__line__']}: 'tasks' is empty; list at least one task")
    tasks: list[TaskSpec] = []
    seen: dict[str, str] = {}
    for i, entry in enumerate(raw["tasks"]):
        if not isinstance(entry, dict):
            raise EvalError(f"{p}: tasks[{i}] must be a mapping with name, kind and data")
        t = _parse_task(p, entry, inline, zoo_dir, endpoint_url)
        if t.name in seen:
            raise EvalError(f"{t.where}: task name {t.name!r} repeats the task at {seen[t.name]}")
        seen[t.name] = t.where
        tasks.append(t)
    lm = [t for t in tasks if t.kind == "lm_eval"]
    if lm:
        check_lm_eval_tasks(lm)
    return TaskFile(name=str(raw.get("name") or p.stem), path=p, source=source or str(p),
                    sha256=sha256_file(p), tasks=tasks)


def _parse_task(p: Path, e: dict[str, Any], inline: bool, zoo_dir: Any, endpoint_url: str | None) -> TaskSpec:
    where = f"{p}:{e['__line__']}"
    name, kind = e.get("name"), e.get("kind")
    if not isinstance(name, str) or not name.strip():
        raise EvalError(f"{where}: the task has no 'name'")
    if kind not in KINDS:
        msg = "has no 'kind'" if kind is None else f"unknown kind {kind!r}"
        raise EvalError(f"{where}: task {name!r} {msg}; known kinds: {', '.join(KINDS)}")
    unknown = sorted(set(e) - _COMMON - _KIND_KEYS[kind])
    if unknown:
        known = sorted((_COMMON | _KIND_KEYS[kind]) - {"__line__"})
        raise EvalError(f"{where}: task {name!r}: unknown key(s) {', '.join(unknown)} for kind {kind} "
                        f"(known: {', '.join(known)})")
    opts = {**_DEFAULTS[kind], **{k: v for k, v in e.items() if k in _KIND_KEYS[kind]}}
    for key, allowed in (*_CHOICES.items(), ("metric", _METRICS.get(kind))):
        val = e.get(key, opts.get(key))
        if allowed and val is not None and val not in allowed:
            raise EvalError(f"{where}: task {name!r}: {key} {val!r} is not one of {', '.join(allowed)}")
    for key in ("max_new_tokens", "window", "max_windows", "num_fewshot"):
        v = opts.get(key)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < (0 if key == "num_fewshot" else 1)):
            raise EvalError(f"{where}: task {name!r}: {key} must be a positive integer, got {v!r}")
    if kind == "perplexity" and opts["window"] < 2:
        raise EvalError(f"{where}: task {name!r}: window must be at least 2 tokens")
    t = TaskSpec(name=name, kind=kind, where=where, section=e.get("section", "tasks"), options=opts,
                 description=str(e.get("description", "")))
    if kind == "lm_eval":
        if not isinstance(opts.get("task"), str):
            raise EvalError(f"{where}: task {name!r}: kind lm_eval needs 'task' (a harness task name)")
        if opts["include_path"] is not None:
            inc = Path(str(opts["include_path"])).expanduser()
            inc = inc if inc.is_absolute() else p.parent / inc
            if not inc.exists():
                raise EvalError(f"{where}: task {name!r}: include_path {inc} does not exist")
            opts["include_path"] = str(inc)
            files = sorted(f for f in ([inc] if inc.is_file() else inc.rglob("*")) if f.is_file())
            t.data_files = [{"path": str(f), "source": str(f), "sha256": sha256_file(f)} for f in files]
        t.source = f"lm_eval:{opts['task']}"
        return t
    has_data, has_gen = "data" in e, "generator" in e
    if has_data == has_gen:
        raise EvalError(f"{where}: task {name!r} needs exactly one of 'data' (a file) or 'generator'")
    if has_gen:
        return _generated(t, str(e["generator"]), e.get("args") or {}, bool(e.get("optional")), zoo_dir)
    ref = str(e["data"])
    if ref.startswith("s3://"):
        local = _fetch_file(ref, endpoint_url)
    else:
        local = Path(ref).expanduser()
        if not local.is_absolute():
            if inline:
                raise EvalError(f"{where}: task {name!r}: data {ref!r} is relative, but the task file was "
                                "given as text; use an s3:// URI or an absolute path")
            local = p.parent / local
    if not local.is_file():
        raise EvalError(f"{where}: task {name!r}: data file {local} does not exist")
    t.source = ref
    t.data_files = [{"path": str(local), "source": ref, "sha256": sha256_file(local)}]
    if kind == "perplexity":
        t.texts = _read_texts(local)
        if not any(s.strip() for s in t.texts.values()):
            raise EvalError(f"{local}: no text (empty task {name!r})")
    else:
        t.items = _read_jsonl(local, kind)
        if not t.items:
            raise EvalError(f"{local}: no items (empty task {name!r})")
    return t


def _generated(t: TaskSpec, gen: str, args: dict, optional: bool, zoo_dir: Any) -> TaskSpec:
    """Items from a built-in data generator (the zoo's tasks): held-out items / texts."""
    args = {k: v for k, v in args.items() if k != "__line__"}
    if gen not in gen_data.GENERATORS:
        raise EvalError(f"{t.where}: task {t.name!r}: unknown generator {gen!r}; "
                        f"known: {', '.join(sorted(gen_data.GENERATORS))}")
    fn = gen_data.GENERATORS[gen]
    try:
        out = fn(**args, zoo_dir=zoo_dir) if gen == "instruction_set" else fn(**args)
    except TypeError as e:
        raise EvalError(f"{t.where}: task {t.name!r}: generator {gen}: {e}") from None
    t.source = f"generator:{gen}"
    if out is None:
        if not optional:
            raise EvalError(f"{t.where}: task {t.name!r}: generator {gen} has no data")
        t.skipped = f"{t.name} skipped: no instruction_set.json (run seme zoo build)"
        return t
    if t.kind == "perplexity":
        t.texts = out[1] if isinstance(out, tuple) else out
    else:
        t.items = list(out[1] if isinstance(out, tuple) else out)
    t.data_files = [{"path": "", "source": f"generator:{gen} {json.dumps(args, sort_keys=True)}",
                     "sha256": gen_data.data_hash(t.texts or [[x.prompt, x.answer] for x in t.items])}]
    return t


def _read_texts(path: Path) -> dict[str, str]:
    """A ``.txt`` file is one text; a ``.jsonl`` file holds ``{"text": str}`` per line."""
    if path.suffix == ".jsonl":
        return {f"{path.name}:{i:06d}": r["text"] for i, r in _jsonl_rows(path, {"text": str})}
    try:
        return {path.name: path.read_text(encoding="utf-8")}
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def _jsonl_rows(path: Path, schema: dict[str, type]) -> list[tuple[int, dict[str, Any]]]:
    rows = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as e:
        raise EvalError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
        except ValueError as e:
            raise EvalError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(r, dict):
            raise EvalError(f"{path}:{n}: expected a JSON object with {', '.join(schema)}")
        for k, typ in schema.items():
            if k not in r:
                raise EvalError(f"{path}:{n}: missing {k!r} (each line needs {', '.join(schema)})")
            if not isinstance(r[k], typ) or isinstance(r[k], bool):
                raise EvalError(f"{path}:{n}: {k!r} must be {typ.__name__}, got {type(r[k]).__name__}")
        rows.append((n, r))
    return rows


def _read_jsonl(path: Path, kind: str) -> list[Any]:
    if kind == "exact_match":
        return [gen_data.Example(r["prompt"], r["answer"])
                for _, r in _jsonl_rows(path, {"prompt": str, "answer": str})]
    items = []
    for n, r in _jsonl_rows(path, {"prompt": str, "choices": list, "answer": int}):
        ch = r["choices"]
        if len(ch) < 2 or not all(isinstance(c, str) for c in ch):
            raise EvalError(f"{path}:{n}: 'choices' must be a list of at least 2 strings")
        if not 0 <= r["answer"] < len(ch):
            raise EvalError(f"{path}:{n}: answer index {r['answer']} is out of range for {len(ch)} choices")
        items.append(MCItem(r["prompt"], tuple(ch), r["answer"]))
    return items


def check_lm_eval_tasks(specs: list[TaskSpec]) -> None:
    """Every ``lm_eval`` task name must exist in lm-evaluation-harness (with the task's include_path)."""
    try:
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise EvalError(f"{specs[0].where}: kind lm_eval needs lm-evaluation-harness "
                        "(pip install 'seme[pipeline]')") from None
    defaults: Any = None
    for t in specs:
        name, inc = t.options["task"], t.options["include_path"]
        if inc is not None:  # the local tasks alone first: indexing all of the harness takes ~15 s
            tm = TaskManager(include_path=inc, include_defaults=False)
            if name in tm.all_tasks:
                t.options["_manager"] = tm
                continue
        if defaults is None:
            defaults = TaskManager(include_path=None)
        if name not in defaults.all_tasks:
            where = f" (include_path {inc})" if inc else ""
            raise EvalError(f"{t.where}: task {t.name!r}: lm-eval has no task {name!r}{where}")
        t.options["_manager"] = defaults
