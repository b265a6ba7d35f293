"""The model zoo: a real base plus experts really fine-tuned from it, cached, for eval and benchmarks.

Layout of one zoo (``<root>/<name>/``)::

    base/                  HF safetensors dir (+ source.json: where it came from, sha256)
    experts/<task>/        full-weight fine-tunes (LoRA merged), each with expert.json (recipe, seeds,
                           data sha256, losses, wall time)
    instruction_set.json   prompts the base answers correctly (real zoo only)
    zoo.json               the manifest, written last

Every directory is written through ``seme.fsutil.atomic_dir``; a directory counts as built only when
its recorded key matches, so an interrupted build resumes (finished parts are kept, a half-written
part is never used; stale temporaries are removed). The key holds everything that produced the part:
the recipe, the training data's hash, the zoo code (:func:`code_fingerprint`), the library versions
and the training thread count; a change to any of them rebuilds.

Training is reproducible: a fixed torch thread count (``ZooRecipe.train_threads``; the tiny zoo's is
fixed so its weights are bit-identical on every machine of one kind, see ``tiny_digests.json``),
deterministic algorithms, and seeds for the data order, the initialisation and the tokenizer.
After the build every expert is evaluated on its own task next to the base (value, n, 95% CI, prose
perplexity); the manifest records it. Root: ``$SEME_ZOO_DIR`` or ``~/.cache/seme/zoo``.
"""

from __future__ import annotations

import ast
import contextlib
import datetime as _dt
import fcntl
import hashlib
import json
import logging
import os
import platform
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from seme.errors import OutputError
from seme.fsutil import atomic_dir, sha256_file
from seme.zoo.finetune import LoraRecipe

log = logging.getLogger(__name__)

REAL_NAME = "smollm2-135m-instruct"
TINY_NAME = "tiny"


@dataclass(frozen=True)
class ZooRecipe:
    """A zoo: its eval suite, base settings and one LoRA recipe per expert task."""

    name: str
    suite: str
    experts: dict[str, LoraRecipe]
    base_dtype: str = "bfloat16"
    tiny_steps: int = 0
    instruction: bool = True
    train_threads: int | None = None  # fixed torch threads while training (None: the caller's setting)
    quality: bool = True              # evaluate each expert on its own task next to the base (manifest)
    meta: dict[str, Any] = field(default_factory=dict)


REAL = ZooRecipe(
    name=REAL_NAME,
    suite="zoo",
    experts={
        # step counts sized for two shared CPU cores (5-12 s per step for 135M parameters, ≤ 15 min each)
        "arithmetic": LoraRecipe(steps=80, batch=16, lr=2e-3, seed=1, warmup=8),
        "french_numbers": LoraRecipe(steps=50, batch=16, lr=2e-3, seed=2, warmup=4),
        "country_codes": LoraRecipe(steps=50, batch=16, lr=2e-3, seed=3, warmup=4),
        "python_code": LoraRecipe(steps=20, batch=8, lr=1e-3, seed=4, window=64, warmup=2),
    },
)

TINY = ZooRecipe(
    name=TINY_NAME,
    suite="tiny",
    experts={
        # tuned with 1 thread (grid in the rel-ci report): replaying the base's pretraining text keeps
        # prose perplexity within ~1.05x the base's; arithmetic needs rank 32 and 1000 steps
        "arithmetic": LoraRecipe(steps=1000, batch=32, lr=3e-3, rank=32, alpha=64, seed=1, replay=0.5),
        "french_numbers": LoraRecipe(steps=300, batch=32, lr=3e-3, seed=2, replay=0.5),
    },
    base_dtype="float32",
    tiny_steps=400,
    instruction=False,
    train_threads=1,  # fixed: the same weights (tiny_digests.json) on every machine of one kind
)


DIGESTS_FILE = Path(__file__).with_name("tiny_digests.json")


def zoo_root() -> Path:
    """Cache root: ``$SEME_ZOO_DIR`` or ``~/.cache/seme/zoo``."""
    env = os.environ.get("SEME_ZOO_DIR")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "seme" / "zoo"


def zoo_path(name: str, root: str | Path | None = None) -> Path:
    """Directory of zoo ``name`` under ``root`` (default: :func:`zoo_root`)."""
    return (Path(root).expanduser() if root is not None else zoo_root()) / name


def _hash(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def _read_json(p: Path) -> dict[str, Any] | None:
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def _write_json(p: Path, obj: Any) -> None:
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(p)


def _clean_stale(d: Path) -> None:
    """Remove temporaries that an interrupted build left (``.<name>.tmp-*`` siblings, ``*.part``)."""
    if not d.is_dir():
        return
    for p in d.iterdir():
        if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name or p.name.endswith(".part")):
            log.info("removing stale temporary %s", p)
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)


def _versions() -> dict[str, str]:
    import importlib.metadata as md

    out = {"python": platform.python_version()}
    for pkg in ("torch", "transformers", "peft", "tokenizers", "num2words", "pycountry", "seme"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            pass
    return out


def _weights_sha(d: Path) -> str:
    return sha256_file(d / "model.safetensors")


def code_fingerprint() -> str:
    """Hash of the zoo's code (``seme/zoo/*.py``) as parsed, without comments or docstrings.

    Part of every cache key, so a zoo built by older code is rebuilt, never used; an edit to a
    comment or docstring keeps the cache.
    """
    h = hashlib.sha256()
    for f in sorted(Path(__file__).parent.glob("*.py")):
        tree = ast.parse(f.read_text(), str(f))
        for node in ast.walk(tree):
            body = getattr(node, "body", None)
            if (isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                    and body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                    and isinstance(body[0].value.value, str)):
                node.body = body[1:] or [ast.Pass()]
        h.update(f.name.encode() + b"\0" + ast.dump(tree).encode() + b"\0")
    return h.hexdigest()


def _build_env(recipe: ZooRecipe, threads: int) -> dict[str, Any]:
    """What produced a part besides its recipe and data: the code, the libraries, the thread count."""
    versions = _versions()
    versions.pop("seme", None)  # the code fingerprint says more than the package version
    return {"code": code_fingerprint(), "versions": versions, "train_threads": threads}


@contextlib.contextmanager
def deterministic(threads: int, seed: int = 0) -> Iterator[None]:
    """Reproducible training inside the block: ``threads`` torch threads, deterministic algorithms,
    seeded ``random``/numpy/torch; the caller's torch settings are restored afterwards."""
    import random

    import numpy as np
    import torch

    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled(),
            torch.is_deterministic_algorithms_warn_only_enabled())
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(True)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    try:
        yield
    finally:
        torch.set_num_threads(prev[0])
        torch.use_deterministic_algorithms(prev[1], warn_only=prev[2])


def build_zoo(
    root: str | Path | None = None,
    tiny: bool = False,
    base: str | Path | None = None,
    threads: int | None = None,
    progress: bool = True,
    recipe: ZooRecipe | None = None,
) -> Path:
    """Build (or complete) a zoo and return its directory; finished parts are cache hits.

    ``recipe`` overrides the built-in REAL/TINY recipes (tests use a micro recipe). ``threads`` sets
    torch's threads for this process; training uses the recipe's ``train_threads`` where it fixes one.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    recipe = recipe or (TINY if tiny else REAL)
    tiny = tiny or recipe.tiny_steps > 0
    name = recipe.name
    if base is not None and not tiny:
        bpath = Path(base).expanduser().absolute()
        name = f"custom-{hashlib.sha256(str(bpath).encode()).hexdigest()[:10]}"
    zdir = (Path(root).expanduser() if root is not None else zoo_root()) / name
    try:
        zdir.mkdir(parents=True, exist_ok=True)
        lock = open(zdir / ".lock", "w")  # noqa: SIM115 - held for the whole build
    except OSError as e:
        raise OutputError(f"cannot create zoo directory {zdir}: {e.strerror}") from None
    with lock:
        # one builder per zoo: a second one waits, then finds every part built (cache hits)
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _build_locked(zdir, name, recipe, base, progress)


def _build_locked(zdir: Path, name: str, recipe: ZooRecipe, base: str | Path | None, progress: bool) -> Path:
    """The build proper; the caller holds the zoo's lock, so temporaries left here are stale."""
    import torch

    from seme.evaluation import data
    from seme.evaluation.suites import get_suite
    from seme.zoo import base as zbase
    from seme.zoo.finetune import lora_finetune

    tiny = recipe.tiny_steps > 0
    _clean_stale(zdir)
    _clean_stale(zdir / "experts")
    t_start = time.perf_counter()
    threads = recipe.train_threads or torch.get_num_threads()
    env = _build_env(recipe, threads)
    manifest: dict[str, Any] = {"name": name, "suite": recipe.suite, "versions": _versions(),
                                "threads": threads, "code_fingerprint": env["code"],
                                "machine": platform.machine(), "cpu_capability": _cpu_capability(),
                                "cpus": os.cpu_count()}

    # ---- base
    base_dir = zdir / "base"
    if tiny:
        prose_sha = data.data_hash(sorted(data.prose_split()[0].items()))
        base_key = _hash({"tiny": recipe.tiny_steps, "v": 2, "data": prose_sha, **env})
    elif base is not None:
        base_key = _hash({"base": str(Path(base).expanduser().absolute()), "dtype": recipe.base_dtype, **env})
    else:
        base_key = _hash({"smollm2": zbase.SMOLLM2_PACKAGE, "dtype": recipe.base_dtype, **env})
    src = _read_json(base_dir / "source.json") if base_dir.is_dir() else None
    built = _read_json(zdir / "base.key.json")
    if src is None or built is None or built.get("key") != base_key:
        t0 = time.perf_counter()
        log.info("building base of zoo %s", name)
        if tiny:
            with deterministic(threads, seed=0):
                info = zbase.build_tiny_base(base_dir, steps=recipe.tiny_steps)
        else:
            source = Path(base).expanduser() if base is not None else zbase.fetch_smollm2_gguf(zdir / "source")
            info = zbase.prepare_base(source, base_dir, recipe.base_dtype)
        _write_json(zdir / "base.key.json", {"key": base_key, "wall_s": round(time.perf_counter() - t0, 1)})
        src = info
    manifest["base"] = {"path": "base", "source": src, "sha256": _weights_sha(base_dir),
                        "family": _family(base_dir),
                        "wall_s": (_read_json(zdir / "base.key.json") or {}).get("wall_s")}
    base_sha = manifest["base"]["sha256"]

    # ---- instruction set (prompts the base answers correctly)
    if recipe.instruction:
        iset = _read_json(zdir / "instruction_set.json")
        if iset is None or iset.get("base_sha256") != base_sha:
            iset = build_instruction_set(base_dir, base_sha, progress)
            _write_json(zdir / "instruction_set.json", iset)
        manifest["instruction_set"] = {"path": "instruction_set.json", "n": len(iset["prompts"]),
                                       "candidates": iset["candidates"]}
    # ---- experts
    suite = get_suite(recipe.suite)
    manifest["experts"] = {}
    (zdir / "experts").mkdir(exist_ok=True)
    for task_name, lr in recipe.experts.items():
        task = suite.tasks[task_name]
        if task.kind == "exact_match":
            train, held = task.examples()
            data_sha = data.data_hash([[e.prompt, e.answer] for e in train])
            held_sha = data.data_hash([[e.prompt, e.answer] for e in held])
            texts = None
        else:
            tmods, hmods = data.code_split()
            train, texts = None, tmods
            data_sha = data.data_hash({k: hashlib.sha256(v.encode()).hexdigest() for k, v in tmods.items()})
            held_sha = data.data_hash(sorted(hmods))
        replay_sha = data.data_hash(sorted(data.prose_split()[0].items())) if lr.replay else None
        key = _hash({"base": base_sha, "recipe": lr.as_dict(), "data": data_sha, "replay": replay_sha, **env})
        edir = zdir / "experts" / task_name
        rec = _read_json(edir / "expert.json") if edir.is_dir() else None
        if rec is None or rec.get("key") != key or not (edir / "model.safetensors").is_file():
            log.info("fine-tuning expert %s of zoo %s", task_name, name)
            t0 = time.perf_counter()
            with deterministic(threads, seed=lr.seed):
                model, tok, stats = lora_finetune(base_dir, lr, examples=train, texts=texts, progress=progress,
                                                  replay_texts=data.prose_split()[0] if lr.replay else None)
            rec = {"task": task_name, "key": key, "kind": "lora", "recipe": lr.as_dict(),
                   "base_sha256": base_sha, "train_data_sha256": data_sha, "heldout_data_sha256": held_sha,
                   "train_items": len(train) if train is not None else len(texts or {}),
                   "threads": threads, **stats, "wall_s": round(time.perf_counter() - t0, 1)}
            with atomic_dir(edir, overwrite=True, markers=None) as tmp:  # seme's own cache dir
                zbase.save_hf(model, tok, tmp, recipe.base_dtype)
                _write_json(tmp / "expert.json", rec)
            del model
        rec = dict(rec)
        rec["path"] = f"experts/{task_name}"
        rec["sha256"] = _weights_sha(edir)
        rec["family"] = manifest["base"]["family"]
        manifest["experts"][task_name] = rec

    # wall time the parts took when they were built (a cache hit costs only build_wall_s)
    manifest["parts_wall_s"] = round((manifest["base"]["wall_s"] or 0) + sum(
        e.get("wall_s", 0) for e in manifest["experts"].values()), 1)
    # ---- each expert on its own task next to the base (cached by weights digest in <zoo>/evals)
    if recipe.quality:
        with deterministic(threads):  # reproducible values, and no thread oversubscription on shared CPUs
            quality = expert_quality(zdir, recipe.suite, base_sha, manifest["experts"], progress)
        for task_name, q in quality.items():
            manifest["experts"][task_name]["quality"] = q
    manifest["created"] = _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")
    manifest["build_wall_s"] = round(time.perf_counter() - t_start, 1)
    old = _read_json(zdir / "zoo.json")
    if old is None or {k: v for k, v in old.items() if k not in ("created", "build_wall_s")} != {
        k: v for k, v in json.loads(json.dumps(manifest, default=str)).items()
        if k not in ("created", "build_wall_s")
    }:
        _write_json(zdir / "zoo.json", manifest)
    return zdir


# the bar each expert must clear (issue: a zoo whose experts lack their skill makes every merge look bad)
QUALITY_BAR = {"expert_min": 0.7, "base_max": 0.2, "max_ppl_ratio": 1.5}


def expert_quality(zdir: Path, suite: str, base_sha: str, experts: dict[str, dict[str, Any]],
                   progress: bool = False) -> dict[str, dict[str, Any]]:
    """Each expert's held-out value on its own task (n, 95% CI) next to the base's, and both models'
    prose perplexity; ``meets_bar`` says whether the expert clears :data:`QUALITY_BAR`.

    The evaluations are cached in ``<zoo>/evals`` by weights digest (shared with ``seme bench quality``).
    """
    from seme.bench.quality import eval_cached

    cache = zdir / "evals"
    cache.mkdir(exist_ok=True)
    bm = eval_cached(zdir / "base", suite, zdir, None, cache, "cpu", progress)
    base_ppl = bm["general"]["prose"]["value"]
    out = {}
    for task, e in experts.items():
        em = eval_cached(zdir / e["path"], suite, zdir, None, cache, "cpu", progress)
        mine, ref = em["tasks"][task], bm["tasks"][task]
        ppl = em["general"]["prose"]["value"]
        q = {"task": task, "metric": mine["metric"], "value": mine["value"], "n": mine["n"],
             "ci95": mine["ci95"], "base_value": ref["value"], "base_n": ref["n"], "base_ci95": ref["ci95"],
             "prose_ppl": ppl, "base_prose_ppl": base_ppl, "ppl_ratio": ppl / base_ppl,
             "base_sha256": base_sha}
        q["meets_bar"] = bool(q["value"] >= QUALITY_BAR["expert_min"] and q["base_value"] <= QUALITY_BAR["base_max"]
                              and q["ppl_ratio"] <= QUALITY_BAR["max_ppl_ratio"] and mine["ci95"][0] > ref["ci95"][1])
        out[task] = q
    return out


def _family(model_dir: Path) -> str:
    """The architecture family (``model_type`` of the config), e.g. ``llama``."""
    cfg = _read_json(model_dir / "config.json") or {}
    return str(cfg.get("model_type", "unknown"))


def _cpu_capability() -> str:
    """The SIMD level torch's CPU kernels use (AVX2, AVX512, ...): float results depend on it."""
    import torch

    try:
        return str(torch.backends.cpu.get_cpu_capability())
    except AttributeError:  # older torch
        return "unknown"


def digests(zdir: Path) -> dict[str, str]:
    """sha256 of every part's weights and of the base's tokenizer: what ``tiny_digests.json`` records."""
    out = {"base/tokenizer.json": sha256_file(zdir / "base" / "tokenizer.json")}
    for d in [zdir / "base", *sorted((zdir / "experts").iterdir())]:
        if (d / "model.safetensors").is_file():
            out[f"{d.relative_to(zdir).as_posix()}/model.safetensors"] = _weights_sha(d)
    return dict(sorted(out.items()))


def recorded_digests() -> dict[str, Any]:
    """The recorded tiny-zoo digests and the platform (versions, CPU capability, threads) they hold on."""
    return json.loads(DIGESTS_FILE.read_text())


def record_digests(zdir: str | Path | None = None) -> Path:
    """Record a built tiny zoo's digests (default: the cached one) in ``tiny_digests.json``, with the
    platform they hold on and the experts' measured quality; run after an intended change."""
    z = Path(zdir) if zdir is not None else build_zoo(tiny=True, progress=False)
    m = load_zoo(z)
    rec = {"note": "sha256 of the tiny CI zoo's parts; bit-identical where versions, machine and cpu_capability "
                   "match (tests/test_zoo.py checks it)",
           "versions": {k: v for k, v in m["versions"].items() if k != "seme"},
           "machine": m["machine"], "cpu_capability": m["cpu_capability"], "threads": m["threads"],
           "code_fingerprint": m["code_fingerprint"], "parts_wall_s": m.get("parts_wall_s"),
           "digests": digests(z),
           "quality": {t: {k: e["quality"][k] for k in ("value", "n", "ci95", "base_value", "ppl_ratio")}
                       for t, e in m["experts"].items() if "quality" in e}}
    _write_json(DIGESTS_FILE, rec)
    return DIGESTS_FILE


def build_instruction_set(base_dir: Path, base_sha: str, progress: bool = True) -> dict[str, Any]:
    """Run the base on the instruction candidates and keep the prompts it answers correctly."""
    from seme.evaluation import data, runner

    model, tok = runner.load_model(base_dir)
    cands = data.instruction_candidates()
    if not getattr(tok, "chat_template", None):
        return {"base_sha256": base_sha, "candidates": len(cands), "prompts": [],
                "note": "base tokenizer has no chat template"}
    ok = runner.instruction_answers(model, tok, cands)
    keep = [{"prompt": e.prompt, "answer": e.answer} for e, good in zip(cands, ok, strict=True) if good]
    return {"base_sha256": base_sha, "candidates": len(cands), "prompts": keep,
            "source": "calendar month/day names, num2words English, pydoc_data held-out words"}


def load_zoo(zoo_dir: str | Path) -> dict[str, Any]:
    """Read a zoo manifest; error if the zoo was never completed."""
    from seme.errors import EvalError

    p = Path(zoo_dir) / "zoo.json"
    m = _read_json(p)
    if m is None:
        raise EvalError(f"{zoo_dir} is not a built zoo (no readable zoo.json); run `seme zoo build`")
    return m
