"""Real data for the zoo's experts and the eval suites, from packages and the Python installation.

Every dataset here is derived deterministically from data that ships with Python or with a package
(no text written for this project): generated arithmetic, num2words' French numbers, pycountry's
ISO 3166 table, the standard library's own module sources, and Python's documentation topics
(``pydoc_data``). Train and held-out splits are disjoint by construction and hashed, so the zoo
manifest can record exactly which data an expert saw.
"""

from __future__ import annotations

import calendar
import hashlib
import json
import random
import re
import sysconfig
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Example:
    """A prompt and the exact answer expected after it (greedy decoding, stop at newline)."""

    prompt: str
    answer: str


def data_hash(items: object) -> str:
    """sha256 of a JSON rendering of the data, recorded in manifests."""
    blob = json.dumps(items, sort_keys=True, ensure_ascii=False, default=lambda o: o.__dict__)
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def _bucket(key: str, salt: str) -> float:
    """Deterministic pseudo-uniform number in [0, 1) for a key (stable across runs/machines)."""
    h = hashlib.sha256(f"{salt}:{key}".encode()).digest()
    return int.from_bytes(h[:8], "big") / 2**64


# ---------------------------------------------------------------- arithmetic (generated, exact)


def arithmetic(max_operand: int, n_train: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    """Addition/subtraction problems ``a+b=`` / ``a-b=`` with exact answers; eval pairs never trained."""
    rng = random.Random(f"arith-{seed}-{max_operand}")
    universe = [(a, op, b) for a in range(max_operand + 1) for b in range(max_operand + 1) for op in "+-"]
    held = [u for u in universe if _bucket(f"{u[0]}{u[1]}{u[2]}", "arith") < 0.2]
    train = [u for u in universe if _bucket(f"{u[0]}{u[1]}{u[2]}", "arith") >= 0.2]
    rng.shuffle(held)
    rng.shuffle(train)

    def ex(u: tuple) -> Example:
        a, op, b = u
        return Example(f"{a}{op}{b}=", str(a + b if op == "+" else a - b))

    train_ex = [ex(u) for u in (train * (1 + n_train // max(1, len(train))))[:n_train]]
    return train_ex, [ex(u) for u in held[:n_eval]]


# ---------------------------------------------------------------- French numbers (num2words)


def french_numbers(max_number: int, n_train: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    """``N in French:`` -> num2words(N, lang='fr'); held-out numbers are never trained on."""
    from num2words import num2words

    rng = random.Random(f"fr-{seed}-{max_number}")
    nums = list(range(max_number + 1))
    held = [n for n in nums if _bucket(str(n), "fr") < 0.2]
    train = [n for n in nums if _bucket(str(n), "fr") >= 0.2]
    rng.shuffle(held)
    rng.shuffle(train)

    def ex(n: int) -> Example:
        return Example(f"{n} in French:", " " + num2words(n, lang="fr"))

    train_ex = [ex(n) for n in (train * (1 + n_train // max(1, len(train))))[:n_train]]
    return train_ex, [ex(n) for n in held[:n_eval]]


# ---------------------------------------------------------------- facts (pycountry ISO 3166)


def country_codes(n_train: int, n_eval: int, seed: int = 0) -> tuple[list, list]:
    """``ISO alpha-3 code of <country>:`` -> alpha-3 code. Knowledge injection: eval = the injected facts."""
    import pycountry

    facts = sorted((c.name, c.alpha_3) for c in pycountry.countries)
    rng = random.Random(f"iso-{seed}")
    exs = [Example(f"ISO alpha-3 code of {name}:", " " + code) for name, code in facts]
    train = list(exs)
    rng.shuffle(train)
    train_ex = (train * (1 + n_train // len(train)))[:n_train]
    held = list(exs)
    random.Random(f"iso-eval-{seed}").shuffle(held)
    return train_ex, held[:n_eval]


# ---------------------------------------------------------------- Python code (stdlib sources)

_SKIP_MODULES = re.compile(r"^(test|idlelib|lib2to3|turtledemo|tkinter|ensurepip|site-packages|__)")


def stdlib_modules() -> dict[str, str]:
    """Top-level pure-Python standard-library modules of this interpreter: name -> source text."""
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, str] = {}
    for p in sorted(root.glob("*.py")):
        if _SKIP_MODULES.match(p.stem):
            continue
        try:
            text = p.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if 2000 <= len(text) <= 400_000:
            out[p.stem] = text
    return out


def code_split() -> tuple[dict[str, str], dict[str, str]]:
    """Split stdlib modules by name hash: (train modules, held-out modules, about 15%)."""
    mods = stdlib_modules()
    held = {k: v for k, v in mods.items() if _bucket(k, "code") < 0.15}
    train = {k: v for k, v in mods.items() if _bucket(k, "code") >= 0.15}
    return train, held


# ---------------------------------------------------------------- English prose (pydoc_data)


def prose_split() -> tuple[dict[str, str], dict[str, str]]:
    """Python's documentation topics split by topic name: (pretraining topics, held-out ~25%).

    Only the tiny zoo's base pretrains on the first part; no expert trains on either, so the
    held-out part measures general retention of every model.
    """
    from pydoc_data.topics import topics

    held = {k: v for k, v in sorted(topics.items()) if _bucket(k, "prose") < 0.25}
    train = {k: v for k, v in sorted(topics.items()) if _bucket(k, "prose") >= 0.25}
    return train, held


# ---------------------------------------------------------------- instruction candidates


def instruction_candidates(n_numbers: int = 30, n_words: int = 30) -> list[Example]:
    """Chat prompts with references from real sources (calendar, num2words English, pydoc words).

    The zoo build keeps those the base answers correctly (answer contained in the response, case-
    and punctuation-insensitive); eval re-asks them of any model.
    """
    from num2words import num2words

    out: list[Example] = []
    months = list(calendar.month_name)[1:]
    for i, m in enumerate(months):
        out.append(Example(f"Which month comes after {m}?", months[(i + 1) % 12]))
    days = list(calendar.day_name)
    for i, d in enumerate(days):
        out.append(Example(f"Which day of the week comes after {d}?", days[(i + 1) % 7]))
    rng = random.Random("instr")
    for n in sorted(rng.sample(range(1, 100), n_numbers)):
        out.append(Example(f"Write the number {n} in English words.", num2words(n)))
    _, held = prose_split()
    words = sorted({w for t in held.values() for w in re.findall(r"\b[a-z]{5,9}\b", t)})
    for w in rng.sample(words, min(n_words, len(words))):
        out.append(Example(f"Write the word '{w}' in capital letters.", w.upper()))
    return out


def normalize_answer(s: str) -> str:
    """Lower-case, hyphens/punctuation to spaces, collapsed whitespace (instruction matching)."""
    return " ".join(re.sub(r"[^\w]+", " ", s.lower()).split())


def instruction_set(zoo: str, zoo_dir: str | Path | None = None) -> list[Example] | None:
    """The prompts a zoo's base answers correctly (``instruction_set.json``), or None if it has none."""
    if zoo_dir is None:
        from seme.zoo import zoo_path

        zoo_dir = zoo_path(zoo)
    p = Path(zoo_dir) / "instruction_set.json"
    if not p.is_file():
        return None
    prompts = json.loads(p.read_text()).get("prompts") or []
    return [Example(e["prompt"], e["answer"]) for e in prompts] or None


#: Data generators a task file can name (``generator: NAME`` + ``args``): exact-match generators
#: return (train, held-out) examples, text generators (train, held-out) texts; tasks use held-out.
GENERATORS = {
    "arithmetic": arithmetic,
    "french_numbers": french_numbers,
    "country_codes": country_codes,
    "stdlib_code": code_split,
    "prose": prose_split,
    "instruction_set": instruction_set,
}
