"""Deterministic LoRA fine-tuning (peft) of a base on one skill, merged into full weights.

Exact-answer tasks train on the answer tokens only; the base is left-padded so that the answers sit
at the end of every row and only their logits are computed (``logits_to_keep``), which keeps a
135M-parameter model with a 49k vocabulary affordable on two CPU cores. The code task trains on
token windows of standard-library module sources.
"""

from __future__ import annotations

import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from seme.evaluation.data import Example


@dataclass(frozen=True)
class LoraRecipe:
    """Everything that determines an expert (recorded, hashed into the cache key)."""

    steps: int
    batch: int
    lr: float
    rank: int = 16
    alpha: int = 32
    seed: int = 0
    window: int = 64          # code task: tokens per window
    warmup: int = 10
    replay: float = 0.0       # weight of a language-model loss on general text each step (keeps prose)
    replay_batch: int = 8     # windows of general text per step when replay > 0
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _exact_batches(tok: Any, examples: list[Example], r: LoraRecipe) -> list[tuple[Any, Any, Any]]:
    """Left-padded (ids, mask, answer mask) batches in a seeded order."""
    import torch

    rng = random.Random(r.seed)
    cache: dict[int, tuple[list[int], list[int]]] = {}

    def pair(i: int) -> tuple[list[int], list[int]]:  # tokenize only the examples actually used
        if i not in cache:
            e = examples[i]
            cache[i] = (tok(e.prompt)["input_ids"], tok(e.answer + "\n", add_special_tokens=False)["input_ids"])
        return cache[i]

    batches = []
    order: list[int] = []
    while len(batches) < r.steps:
        if not order:
            order = list(range(len(examples)))
            rng.shuffle(order)
        idx, order = order[: r.batch], order[r.batch :]
        rows = [pair(i) for i in idx]
        L = max(len(p) + len(a) for p, a in rows)
        ids = torch.full((len(rows), L), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), L), dtype=torch.long)
        amask = torch.zeros((len(rows), L), dtype=torch.bool)
        for j, (p, a) in enumerate(rows):
            s = p + a
            ids[j, L - len(s) :] = torch.tensor(s)
            mask[j, L - len(s) :] = 1
            amask[j, L - len(a) :] = True
        batches.append((ids, mask, amask))
    return batches


def _code_batches(tok: Any, texts: dict[str, str], r: LoraRecipe, batch: int | None = None,
                  salt: int = 0) -> list[Any]:
    """Token windows from the training modules, sampled with a seeded generator."""
    import torch

    ids = [i for k in sorted(texts) for i in tok.encode(texts[k], add_special_tokens=False)]
    n = len(ids) // r.window
    wins = torch.tensor(ids[: n * r.window]).view(n, r.window)
    g = torch.Generator().manual_seed(r.seed + salt)
    return [wins[torch.randint(0, n, (batch or r.batch,), generator=g)] for _ in range(r.steps)]


def lora_finetune(
    base_dir: Path,
    recipe: LoraRecipe,
    examples: list[Example] | None = None,
    texts: dict[str, str] | None = None,
    progress: bool = True,
    replay_texts: dict[str, str] | None = None,
) -> tuple[Any, Any, dict[str, Any]]:
    """Fine-tune ``base_dir`` with LoRA on ``examples`` (exact task) or ``texts`` (code); merged model.

    With ``recipe.replay > 0``, each step also takes a language-model loss on windows of
    ``replay_texts`` (general text, e.g. the base's pretraining text), so the skill is learned without
    forgetting general language."""
    import torch
    import torch.nn.functional as F
    from peft import LoraConfig, get_peft_model
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    torch.manual_seed(recipe.seed)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
    model.config.use_cache = False
    lcfg = LoraConfig(r=recipe.rank, lora_alpha=recipe.alpha, lora_dropout=0.0,
                      target_modules=list(recipe.targets), bias="none", task_type="CAUSAL_LM")
    pm = get_peft_model(model, lcfg)
    pm.train()
    params = [p for p in pm.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=recipe.lr, weight_decay=0.0)

    def lr_at(step: int) -> float:  # linear warm-up, then linear decay to 10%
        if step < recipe.warmup:
            return (step + 1) / recipe.warmup
        return 1.0 - 0.9 * (step - recipe.warmup) / max(1, recipe.steps - recipe.warmup)

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    if examples is not None:
        batches: list[Any] = _exact_batches(tok, examples, recipe)
    elif texts is not None:
        batches = _code_batches(tok, texts, recipe)
    else:
        raise ValueError("lora_finetune needs examples or texts")
    replay: list[Any] = [None] * len(batches)
    if recipe.replay > 0:
        if not replay_texts:
            raise ValueError("a recipe with replay needs replay_texts")
        replay = _code_batches(tok, replay_texts, recipe, batch=recipe.replay_batch, salt=7919)
    losses: list[float] = []
    t0 = time.perf_counter()
    for b, rb in tqdm(zip(batches, replay, strict=True), desc="lora", total=len(batches), disable=not progress,
                      leave=False):
        if isinstance(b, tuple):
            ids, mask, amask = b
            A = int(amask.sum(1).max())
            pos = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = pm(input_ids=ids, attention_mask=mask, position_ids=pos, logits_to_keep=A + 1).logits
            logits = logits[:, :-1]
            tgt = ids[:, -A:]
            m = amask[:, -A:]
            loss = F.cross_entropy(logits[m], tgt[m])
        else:
            loss = pm(input_ids=b, labels=b).loss
        losses.append(loss.item())  # the skill's own loss (reported)
        if rb is not None:
            loss = loss + recipe.replay * pm(input_ids=rb, labels=rb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    merged = pm.merge_and_unload()
    merged.eval()
    k = max(1, min(10, len(losses) // 5))
    stats = {"train_s": round(time.perf_counter() - t0, 1), "loss_first": sum(losses[:k]) / k,
             "loss_last": sum(losses[-k:]) / k, "steps": len(losses)}
    return merged, tok, stats
