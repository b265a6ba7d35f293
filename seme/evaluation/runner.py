"""Model loading and the batched measurements every task kind is built from.

- :func:`greedy_tokens` / :func:`greedy_generate`: greedy decoding of many prompts at once, left
  padded, with a KV cache; rows that finished (end of sequence, newline) leave the batch, so a batch
  costs what its longest *live* answer costs.
- :func:`continuation_logprobs`: log-likelihood of continuations after contexts (multiple choice),
  left padded so every continuation ends in the last column and only those columns reach the head.
- :func:`window_scores`: per-window NLL and next-token accuracy over equal-length token windows.

Everything runs in float32 (CPU by default, ``cuda`` when asked) under ``torch.inference_mode``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from seme.errors import EvalError
from seme.evaluation.data import Example, normalize_answer
from seme.evaluation.stats import mean_ci, wilson_ci  # noqa: F401 - re-exported

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def check_model_dir(model_dir: str | Path) -> dict[str, Any]:
    """Validate that ``model_dir`` holds a causal LM checkpoint with a tokenizer; return its config."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    d = Path(model_dir)
    if not d.is_dir():
        raise EvalError(f"model directory {d} does not exist")
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise EvalError(f"{d} has no config.json: not a Hugging Face checkpoint directory")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise EvalError(f"cannot read {cfg_path}: {e}") from None
    archs = cfg.get("architectures") or []
    mtype = cfg.get("model_type")
    causal = any(a.endswith("ForCausalLM") for a in archs) or (
        not archs and mtype in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
    )
    if not causal:
        raise EvalError(
            f"{d} is not a causal language model (model_type={mtype!r}, architectures={archs}); "
            "eval needs a *ForCausalLM checkpoint"
        )
    if not any((d / f).is_file() for f in _TOKENIZER_FILES):
        raise EvalError(f"{d} has no tokenizer (none of {', '.join(_TOKENIZER_FILES)}); copy it from the base")
    return cfg


def load_tokenizer(model_dir: str | Path) -> Any:
    """The checkpoint's tokenizer, set up for batched evaluation (left padding, a pad token)."""
    from transformers import AutoTokenizer

    check_model_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise EvalError(f"cannot load the tokenizer of {model_dir}: {str(e).splitlines()[0]}") from None
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


DTYPES = ("float32", "bfloat16")


def load_model(model_dir: str | Path, device: str = "cpu", progress: bool = True,
               tok: Any = None, dtype: str = "float32") -> tuple[Any, Any]:
    """Load (model, tokenizer) for evaluation: float32 (or bfloat16 when asked), eval mode, left padding.

    bfloat16 is several times faster on CPUs with bf16 instructions but rounds activations, so its
    numbers differ slightly from float32's; compare models only at the same dtype.
    """
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()
    if dtype not in DTYPES:
        raise EvalError(f"eval dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    tok = tok if tok is not None else load_tokenizer(model_dir)
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=getattr(torch, dtype))
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"cannot load {model_dir} as a causal LM: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    return model, tok


# ---------------------------------------------------------------- generation


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def _cache_kw(model: Any) -> str:
    import inspect

    # transformers 5.x renamed ``past_key_values`` to ``cache`` in forward(); accept both
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def newline_ids(tok: Any) -> set[int]:
    """Ids of every vocabulary token whose text contains a newline (computed once per tokenizer)."""
    cached = getattr(tok, "_seme_newline_ids", None)
    if cached is None:
        n = len(tok)
        texts = tok.batch_decode([[i] for i in range(n)])
        cached = {i for i, t in enumerate(texts) if "\n" in t}
        tok._seme_newline_ids = cached
    return cached


def _left_pad(seqs: list[list[int]], pad_id: int, device: Any) -> tuple[Any, Any, Any]:
    """(input_ids, attention_mask, position_ids) of left-padded sequences."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for r, s in enumerate(seqs):
        if s:
            ids[r, width - len(s):] = torch.tensor(s, dtype=torch.long)
            mask[r, width - len(s):] = 1
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids.to(device), mask.to(device), pos.to(device)


def greedy_tokens(model: Any, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int],
                  end_ids: set[int], pad_id: int, batch_size: int = 64, progress: Any = None,
                  decided: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuations (token ids) of tokenized prompts, batched with left padding and a KV cache.

    A row ends at a token in ``end_ids`` (not kept: end of sequence), after a token in ``stop_ids``
    (kept: e.g. any token containing a newline), or when ``decided(prompt index, tokens so far)`` says
    that more tokens cannot change the outcome. Finished rows leave the batch and its cache.
    Prompts are batched by length so that little padding is computed.
    """
    import torch

    kw = _cache_kw(model)
    dev = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    for idx in _batches(order, batch_size):
        ids, mask, pos = _left_pad([prompts[i] for i in idx], pad_id, dev)
        alive = list(idx)
        cache = None
        cur_ids, cur_pos = ids, pos
        with torch.inference_mode():
            for step in range(max_new_tokens):
                res = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos, use_cache=True,
                            logits_to_keep=1, **{kw: cache})
                cache = getattr(res, "cache", None) or res.past_key_values
                nxt = res.logits[:, -1, :].argmax(-1)
                keep = []
                for r, t in enumerate(nxt.tolist()):
                    i = alive[r]
                    if i is None or t in end_ids:  # None: finished, kept only by a cache that cannot drop rows
                        continue
                    out[i].append(t)
                    if t not in stop_ids and not (decided is not None and decided(i, out[i])):
                        keep.append(r)
                if not keep or step == max_new_tokens - 1:
                    break
                if len(keep) < len(alive):  # drop finished rows from the batch and the cache
                    sel = torch.tensor(keep, device=dev)
                    try:
                        cache.batch_select_indices(sel)
                    except (AttributeError, NotImplementedError, RuntimeError, ValueError):
                        alive = [a if r in keep else None for r, a in enumerate(alive)]
                    else:
                        mask, nxt, cur_pos = mask[sel], nxt[sel], cur_pos[sel]
                        alive = [alive[r] for r in keep]
                cur_ids = nxt[:, None]
                cur_pos = cur_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones(len(alive), 1, dtype=mask.dtype, device=dev)], dim=1)
        if progress is not None:
            progress.update(len(idx))
    return out


def greedy_generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 64,
    stop_at_newline: bool = True,
    add_special_tokens: bool = True,
    progress: Any = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` as text, cut at the first newline (``stop_at_newline``)."""
    enc = [tok.encode(p, add_special_tokens=add_special_tokens) for p in prompts]
    ends = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    stops = newline_ids(tok) if stop_at_newline else set()
    gen = greedy_tokens(model, enc, max_new_tokens, stops, ends, tok.pad_token_id, batch_size, progress)
    texts = tok.batch_decode(gen, skip_special_tokens=True)
    return [t.split("\n")[0] for t in texts] if stop_at_newline else texts


def chat_prompts(tok: Any, questions: list[str]) -> list[str]:
    """Render user questions with the model's chat template (generation prompt appended)."""
    return [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False,
                                    add_generation_prompt=True) for q in questions]


def instruction_answers(model: Any, tok: Any, examples: list[Example], max_new_tokens: int = 24,
                        batch_size: int = 16, progress: Any = None) -> list[bool]:
    """Ask chat questions; correct iff the normalized reference appears in the normalized reply."""
    prompts = chat_prompts(tok, [e.prompt for e in examples])
    replies = greedy_generate(model, tok, prompts, max_new_tokens, batch_size, stop_at_newline=False,
                              add_special_tokens=False, progress=progress)
    return [normalize_answer(e.answer) in normalize_answer(r) for e, r in zip(examples, replies, strict=True)]


# ---------------------------------------------------------------- scoring


def continuation_logprobs(model: Any, pairs: list[tuple[list[int], list[int]]], pad_id: int,
                          batch_size: int = 32, max_length: int | None = None,
                          progress: Any = None) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether every continuation token is the argmax) per pair.

    Sequences are left padded, so every continuation ends in the last column: only the last
    ``max continuation length`` positions go through the LM head (``logits_to_keep``).
    """
    import torch

    dev = next(model.parameters()).device
    out: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
    order = sorted(range(len(pairs)), key=lambda i: -(len(pairs[i][0]) + len(pairs[i][1])))
    for idx in _batches(order, batch_size):
        seqs, conts = [], []
        for i in idx:
            ctx, cont = pairs[i]
            if not cont:
                raise EvalError("an empty continuation has no likelihood")
            whole = (ctx + cont)[-(max_length + 1):] if max_length else ctx + cont
            seqs.append(whole[:-1])
            conts.append(cont)
        ids, mask, pos = _left_pad(seqs, pad_id, dev)
        keep = max(len(c) for c in conts)
        with torch.inference_mode():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=keep).logits
            logp = torch.log_softmax(logits.float(), dim=-1)
            greedy = logits.argmax(-1)
        for r, (i, cont) in enumerate(zip(idx, conts, strict=True)):
            k = len(cont)
            tgt = torch.tensor(cont, device=dev)
            lp = logp[r, keep - k:].gather(-1, tgt[:, None]).sum()
            out[i] = (float(lp), bool((greedy[r, keep - k:] == tgt).all()))
        if progress is not None:
            progress.update(len(idx))
    return out


def text_windows(tok: Any, texts: dict[str, str], window: int, max_windows: int,
                 per_text: int = 4) -> list[list[int]]:
    """Token windows of length ``window`` spread over each text (sorted by name), at most ``max_windows``.

    The text is cut into consecutive windows; every ``step``-th one is kept (``step = n // k`` for n
    windows in the text and k = ``per_text``), so the kept windows spread over the whole text. A
    single text keeps up to ``max_windows``; several texts up to ``per_text`` each, then the whole
    selection is thinned evenly to ``max_windows``.
    """
    if len(texts) == 1:
        per_text = max_windows
    wins: list[list[int]] = []
    for name in sorted(texts):
        ids = tok.encode(texts[name], add_special_tokens=False)
        n_full = len(ids) // window
        if n_full == 0:
            continue
        step = max(1, n_full // per_text)
        for w in range(0, n_full, step)[:per_text]:
            wins.append(ids[w * window : (w + 1) * window])
    if len(wins) > max_windows:  # spread the selection evenly over all texts
        stride = len(wins) / max_windows
        wins = [wins[int(i * stride)] for i in range(max_windows)]
    return wins


def window_scores(model: Any, windows: list[list[int]], batch_size: int = 8,
                  progress: Any = None) -> list[tuple[float, int, int]]:
    """(sum NLL, predicted tokens, correctly predicted tokens) per equal-length token window."""
    import torch
    import torch.nn.functional as F

    dev = next(model.parameters()).device
    out: list[tuple[float, int, int]] = []
    for b in _batches(windows, batch_size):
        ids = torch.tensor(b, dtype=torch.long, device=dev)
        with torch.inference_mode():
            logits = model(input_ids=ids[:, :-1]).logits
            tgt = ids[:, 1:]
            nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), tgt.reshape(-1),
                                  reduction="none").view(tgt.shape)
            ok = (logits.argmax(-1) == tgt).sum(1)
        out += [(float(s), tgt.shape[1], int(c)) for s, c in zip(nll.sum(1).tolist(), ok.tolist(), strict=True)]
        if progress is not None:
            progress.update(len(b))
    return out
