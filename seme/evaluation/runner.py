"""Model loading and the measurements: greedy exact match, perplexity, token accuracy, 95% CIs.

Everything runs batched on CPU by default (float32), under ``torch.inference_mode``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from seme.errors import EvalError
from seme.evaluation.data import Example, normalize_answer

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


def load_model(model_dir: str | Path, device: str = "cpu", progress: bool = True) -> tuple[Any, Any]:
    """Load (model, tokenizer) for evaluation: float32 on CPU, eval mode, left padding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if not progress:
        hf_logging.disable_progress_bar()

    check_model_dir(model_dir)
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir))
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise EvalError(f"cannot load the tokenizer of {model_dir}: {str(e).splitlines()[0]}") from None
    try:
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"cannot load {model_dir} as a causal LM: {str(e).splitlines()[0]}") from None
    model.to(device).eval()
    tok.padding_side = "left"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


# ---------------------------------------------------------------- statistics


def wilson_ci(k: int, n: int, z: float = 1.96) -> list[float]:
    """95% Wilson score interval for a proportion k/n."""
    if n == 0:
        return [0.0, 0.0]
    p = k / n
    den = 1 + z * z / n
    c = (p + z * z / (2 * n)) / den
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return [max(0.0, c - h), min(1.0, c + h)]


def mean_ci(values: Sequence[float], z: float = 1.96) -> tuple[float, float]:
    """Mean and half-width of a normal-approximation 95% interval."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    var = sum((v - m) ** 2 for v in values) / (n - 1)
    return m, z * math.sqrt(var / n)


# ---------------------------------------------------------------- measurements


def _batches(items: list, size: int) -> list[list]:
    return [items[i : i + size] for i in range(0, len(items), size)]


def greedy_generate(
    model: Any,
    tok: Any,
    prompts: list[str],
    max_new_tokens: int,
    batch_size: int = 32,
    stop_at_newline: bool = True,
    add_special_tokens: bool = True,
    progress: Any = None,
) -> list[str]:
    """Greedy continuations of ``prompts`` (batched, left-padded), cut at the first newline."""
    import inspect

    import torch

    # transformers 5.x renamed ``past_key_values`` to ``cache`` in forward(); accept both
    cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[str] = [""] * len(prompts)
    eos = tok.eos_token_id
    nl_ids = set(tok.encode("\n", add_special_tokens=False)) if stop_at_newline else set()
    for idx in _batches(order, batch_size):
        enc = tok([prompts[i] for i in idx], return_tensors="pt", padding=True,
                  add_special_tokens=add_special_tokens)
        dev = next(model.parameters()).device
        ids, mask = enc["input_ids"].to(dev), enc["attention_mask"].to(dev)
        done = torch.zeros(len(idx), dtype=torch.bool)
        gen: list[list[int]] = [[] for _ in idx]
        past = None
        pos = (mask.cumsum(-1) - 1).clamp(min=0)
        cur_ids, cur_pos = ids, pos
        with torch.inference_mode():
            for _ in range(max_new_tokens):
                res = model(input_ids=cur_ids, attention_mask=mask, position_ids=cur_pos,
                            use_cache=True, logits_to_keep=1, **{cache_kw: past})
                past = getattr(res, "cache", None) or res.past_key_values
                nxt = res.logits[:, -1, :].argmax(-1)
                for j, t in enumerate(nxt.tolist()):
                    if not done[j]:
                        if t == eos or t in nl_ids:
                            done[j] = True
                        else:
                            gen[j].append(t)
                if bool(done.all()):
                    break
                cur_ids = nxt[:, None]
                cur_pos = cur_pos[:, -1:] + 1
                mask = torch.cat([mask, torch.ones(len(idx), 1, dtype=mask.dtype, device=dev)], dim=1)
        for j, i in enumerate(idx):
            text = tok.decode(gen[j], skip_special_tokens=True)
            out[i] = text.split("\n")[0] if stop_at_newline else text
        if progress is not None:
            progress.update(len(idx))
    return out


def exact_match(model: Any, tok: Any, examples: list[Example], max_new_tokens: int,
                batch_size: int = 32, progress: Any = None) -> dict[str, Any]:
    """Greedy exact-match accuracy (answers compared after stripping whitespace)."""
    preds = greedy_generate(model, tok, [e.prompt for e in examples], max_new_tokens, batch_size,
                            progress=progress)
    k = sum(p.strip() == e.answer.strip() for p, e in zip(preds, examples, strict=True))
    n = len(examples)
    return {"metric": "accuracy", "value": k / n if n else 0.0, "n": n, "ci95": wilson_ci(k, n),
            "examples": [{"prompt": e.prompt, "answer": e.answer, "pred": p}
                         for e, p in list(zip(examples, preds, strict=True))[:5]]}


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


def text_windows(tok: Any, texts: dict[str, str], window: int, max_windows: int,
                 per_text: int = 4) -> list[list[int]]:
    """Token windows of length ``window`` spread over each text (sorted by name), at most ``max_windows``."""
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


def lm_scores(model: Any, windows: list[list[int]], batch_size: int = 8,
              progress: Any = None) -> dict[str, Any]:
    """Perplexity and next-token accuracy over equal-length token windows, with 95% CIs."""
    import torch
    import torch.nn.functional as F

    nlls: list[float] = []
    accs: list[float] = []
    for b in _batches(windows, batch_size):
        ids = torch.tensor(b, dtype=torch.long, device=next(model.parameters()).device)
        with torch.inference_mode():
            logits = model(input_ids=ids).logits[:, :-1].float()
        tgt = ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), tgt.reshape(-1), reduction="none")
        nll = nll.view(tgt.shape)
        nlls += nll.mean(1).tolist()
        accs += (logits.argmax(-1) == tgt).float().mean(1).tolist()
        if progress is not None:
            progress.update(len(b))
    m, h = mean_ci(nlls)
    a, ah = mean_ci(accs)
    tokens = len(windows) * (len(windows[0]) - 1) if windows else 0
    return {
        "perplexity": math.exp(m), "perplexity_ci95": [math.exp(m - h), math.exp(m + h)],
        "token_accuracy": a, "token_accuracy_ci95": [max(0.0, a - ah), min(1.0, a + ah)],
        "n_tokens": tokens, "n_windows": len(windows),
    }
