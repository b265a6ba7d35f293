"""The four task kinds: prepare (tokenizer only, before the model loads) and run (batched).

Each ``run_*`` returns one task entry of the metrics JSON: ``metric``, ``value``, ``n``, ``ci95``,
``examples`` (the first five items), and ``per_item`` (correctness, or log-likelihoods / NLLs) with
``items_sha256`` (a digest of exactly which items were measured), so that two models' results can be
compared item by item (:mod:`seme.evaluation.compare`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from dataclasses import dataclass, field
from typing import Any

from seme.errors import EvalError
from seme.evaluation import runner
from seme.evaluation.data import data_hash, normalize_answer
from seme.evaluation.stats import mean_ci, wilson_ci
from seme.evaluation.taskfile import TaskSpec

N_EXAMPLES = 5


@dataclass
class Prepared:
    """A task ready to run: its spec and the tokenized inputs (what the model will see)."""

    spec: TaskSpec
    items: list[Any] = field(default_factory=list)
    prompts: list[list[int]] = field(default_factory=list)
    pairs: list[tuple[list[int], list[int]]] = field(default_factory=list)
    windows: list[list[int]] = field(default_factory=list)
    note: str = ""


def has_chat_template(tok: Any) -> bool:
    return bool(getattr(tok, "chat_template", None))


def _render(tok: Any, spec: TaskSpec, prompt: str) -> tuple[str, bool]:
    """(text, add_special_tokens): the prompt, wrapped in the chat template when the task says so."""
    if spec.options.get("chat"):
        return runner.chat_prompts(tok, [prompt])[0], False
    return prompt, True


def prepare(spec: TaskSpec, tok: Any, limit: int | None) -> Prepared:
    """Tokenize a task's inputs; task errors found here still come before the model is loaded."""
    pr = Prepared(spec)
    if spec.skipped:
        pr.note = spec.skipped
        return pr
    if spec.options.get("chat") and not has_chat_template(tok):
        if spec.source.startswith("generator:"):
            pr.note = f"{spec.name} skipped: the model's tokenizer has no chat template"
            return pr
        raise EvalError(f"{spec.where}: task {spec.name!r} asks for chat: true, but the model's "
                        "tokenizer has no chat template")
    if spec.kind == "exact_match":
        pr.items = spec.items[:limit] if limit else list(spec.items)
        for e in pr.items:
            text, special = _render(tok, spec, e.prompt)
            pr.prompts.append(tok.encode(text, add_special_tokens=special))
    elif spec.kind == "multiple_choice":
        pr.items = spec.items[:limit] if limit else list(spec.items)
        for it in pr.items:
            ctx, special = _render(tok, spec, it.prompt)
            for ch in it.choices:
                pr.pairs.append(_context_continuation(tok, ctx, ch, special))
    elif spec.kind == "perplexity":
        mw = spec.options["max_windows"]
        mw = mw if limit is None else max(4, min(mw, limit // 2))
        pr.windows = runner.text_windows(tok, spec.texts, spec.options["window"], mw)
        if not pr.windows:
            raise EvalError(f"{spec.where}: task {spec.name!r}: the text is shorter than one window of "
                            f"{spec.options['window']} tokens")
    return pr


def _context_continuation(tok: Any, ctx: str, cont: str, special: bool) -> tuple[list[int], list[int]]:
    """Token ids of context and continuation as lm-evaluation-harness splits them: trailing spaces of the
    context move to the continuation, and the continuation's ids are those of the whole text after the
    context's ids (so a merge across the boundary is tokenized as the model would see it)."""
    n_sp = len(ctx) - len(ctx.rstrip())
    if n_sp:
        ctx, cont = ctx[:-n_sp], ctx[-n_sp:] + cont
    whole = tok.encode(ctx + cont, add_special_tokens=special)
    c = tok.encode(ctx, add_special_tokens=special)
    return c, whole[len(c):]


def _binary_entry(metric: str, correct: list[int], examples: list[dict], extra: dict | None = None) -> dict:
    k, n = sum(correct), len(correct)
    return {"metric": metric, "value": k / n if n else 0.0, "n": n, "ci95": wilson_ci(k, n),
            **(extra or {}), "examples": examples[:N_EXAMPLES], "per_item": {"correct": correct}}


def run_exact_match(pr: Prepared, model: Any, tok: Any, batch_size: int, progress: Any) -> dict[str, Any]:
    o = pr.spec.options
    nl = o["stop_at_newline"]
    ends = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    decided = _mismatch(tok, [e.answer for e in pr.items], nl) if o["match"] == "exact" else None
    gen = runner.greedy_tokens(model, pr.prompts, o["max_new_tokens"], runner.newline_ids(tok) if nl else set(),
                               ends, tok.pad_token_id, batch_size, progress, decided)
    preds = tok.batch_decode(gen, skip_special_tokens=True)
    preds = [p.split("\n")[0] for p in preds] if nl else preds
    if o["match"] == "contains":
        ok = [int(normalize_answer(e.answer) in normalize_answer(p)) for e, p in zip(pr.items, preds, strict=True)]
    else:
        ok = [int(p.strip() == e.answer.strip()) for e, p in zip(pr.items, preds, strict=True)]
    ex = [{"prompt": e.prompt, "answer": e.answer, "pred": p} for e, p in zip(pr.items, preds, strict=False)]
    entry = _binary_entry("accuracy", ok, ex)
    entry["items_sha256"] = data_hash([[e.prompt, e.answer] for e in pr.items])
    return entry


def _mismatch(tok: Any, answers: list[str], newline: bool) -> Any:
    """``decided(i, tokens)``: True once item i's prediction can no longer equal its answer.

    The prediction is the first line of the decoded tokens, compared after strip(); once its
    left-stripped text is neither a prefix of the answer nor the answer plus whitespace, no further
    token can make it equal, so generation of that item stops there (the recorded prediction is the
    text up to that point). A trailing U+FFFD (a character cut between tokens) is ignored.
    """
    want = [a.strip() for a in answers]

    def decided(i: int, toks: list[int]) -> bool:
        text = tok.decode(toks, skip_special_tokens=True)
        if newline:
            text = text.split("\n")[0]
        s, a = text.lstrip().rstrip("\ufffd"), want[i]
        return not (a.startswith(s) or (s.startswith(a) and not s[len(a):].strip()))

    return decided


def run_multiple_choice(pr: Prepared, model: Any, tok: Any, batch_size: int, progress: Any) -> dict[str, Any]:
    scores = runner.continuation_logprobs(model, pr.pairs, tok.pad_token_id, batch_size)
    ok, ok_norm, ll_all, ex = [], [], [], []
    pos = 0
    for it in pr.items:
        ll = [s for s, _ in scores[pos : pos + len(it.choices)]]
        pos += len(it.choices)
        norm = [v / max(1, len(c.encode("utf-8"))) for v, c in zip(ll, it.choices, strict=True)]
        best, best_n = max(range(len(ll)), key=ll.__getitem__), max(range(len(ll)), key=norm.__getitem__)
        ok.append(int(best == it.answer))
        ok_norm.append(int(best_n == it.answer))
        ll_all.append([round(v, 6) for v in ll])
        ex.append({"prompt": it.prompt, "answer": it.choices[it.answer], "pred": it.choices[best]})
        if progress is not None:
            progress.update(1)
    k, kn, n = sum(ok), sum(ok_norm), len(ok)
    acc = {"accuracy": k / n, "accuracy_ci95": wilson_ci(k, n),
           "accuracy_norm": kn / n, "accuracy_norm_ci95": wilson_ci(kn, n)}
    metric = pr.spec.options["metric"]
    entry = {"metric": metric, "value": acc[metric], "n": n, "ci95": acc[f"{metric}_ci95"], **acc,
             "examples": ex[:N_EXAMPLES],
             "per_item": {"correct": ok, "correct_norm": ok_norm, "loglik": ll_all},
             "items_sha256": data_hash([[it.prompt, list(it.choices), it.answer] for it in pr.items])}
    return entry


def run_perplexity(pr: Prepared, model: Any, tok: Any, batch_size: int, progress: Any) -> dict[str, Any]:
    sc = runner.window_scores(model, pr.windows, max(1, batch_size // 4), progress)
    nll = [s for s, _, _ in sc]
    toks = [t for _, t, _ in sc]
    good = [c for _, _, c in sc]
    m, h = mean_ci([s / t for s, t in zip(nll, toks, strict=True)])
    a, ah = mean_ci([c / t for c, t in zip(good, toks, strict=True)])
    ppl = math.exp(sum(nll) / sum(toks))
    vals = {"perplexity": (ppl, [math.exp(m - h), math.exp(m + h)]),
            "token_accuracy": (sum(good) / sum(toks), [max(0.0, a - ah), min(1.0, a + ah)])}
    metric = pr.spec.options["metric"]
    other = "token_accuracy" if metric == "perplexity" else "perplexity"
    wins = hashlib.sha256(json.dumps(pr.windows).encode()).hexdigest()
    return {"metric": metric, "value": vals[metric][0], "n": sum(toks), "ci95": vals[metric][1],
            other: vals[other][0], f"{other}_ci95": vals[other][1], "n_windows": len(pr.windows),
            "per_item": {"nll": [round(v, 6) for v in nll], "tokens": toks, "correct_tokens": good},
            "items_sha256": wins}


def run_lm_eval(pr: Prepared, model: Any, tok: Any, batch_size: int, limit: int | None,
                device: str, progress: bool = True) -> dict[str, Any]:
    """One lm-evaluation-harness task on the loaded model (the harness's own requests and metrics)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    if not progress:
        import datasets

        datasets.disable_progress_bars()
    o = pr.spec.options
    name, metric = o["task"], o["metric"]
    logging.getLogger("lm_eval").setLevel(logging.ERROR)  # warnings about defaults it fills in
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device=device)
    res = lm_eval.simple_evaluate(model=lm, tasks=[name], num_fewshot=o["num_fewshot"], limit=limit,
                                  task_manager=o["_manager"], log_samples=True, bootstrap_iters=0,
                                  apply_chat_template=bool(o["chat"]), verbosity="ERROR")
    results = res["results"].get(name, {})
    key = next((k for k in results if k.split(",")[0] == metric), None)
    if key is None:
        known = sorted({k.split(",")[0] for k in results if "_stderr" not in k and k != "alias"})
        raise EvalError(f"{pr.spec.where}: task {pr.spec.name!r}: lm-eval task {name!r} reports no metric "
                        f"{metric!r} (it reports: {', '.join(known)})")
    samples = sorted(res["samples"][name], key=lambda s: s["doc_id"])
    vals = [float(s[metric]) for s in samples]
    binary = all(v in (0.0, 1.0) for v in vals)
    n = len(vals)
    value = float(results[key])
    if binary:
        ci = wilson_ci(int(sum(vals)), n)
    else:
        mu, h = mean_ci(vals)
        ci = [mu - h, mu + h]
    ex = [{"doc_id": s["doc_id"], "target": str(s.get("target")), metric: s[metric]} for s in samples]
    return {"metric": metric, "value": value, "n": n, "ci95": ci, "examples": ex[:N_EXAMPLES],
            "per_item": {"correct" if binary else "score": [int(v) if binary else v for v in vals]},
            "items_sha256": data_hash([[s["doc_id"], s.get("doc_hash", "")] for s in samples]),
            "lm_eval": {"task": name, "version": lm_eval.__version__ if hasattr(lm_eval, "__version__") else "",
                        "metric_key": key}}
