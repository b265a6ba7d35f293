"""Tensor roles per model family, as data.

A role says what a tensor *is* to a merge: the token embedding, the LM head, a matrix that reads
the residual stream (rows x d), one that writes into it (d x cols), a norm gain, a bias. SeMe needs
this to put tensors in semantic coordinates; classic methods need only the layer index (for
gradient parameters). Adding a family means adding a table below, not code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from seme.errors import CheckpointError


@dataclass(frozen=True)
class TensorRole:
    """What one tensor is. ``transposed``: stored (in, out) as GPT-2's Conv1D does."""

    kind: str  # embed | lm_head | final_norm | read | write | norm | bias | pos_embed | other
    module: str  # embed | head | attn | mlp | other
    layer: int | None = None
    unit: str = ""
    transposed: bool = False


# (regex, kind, module, unit, transposed). ``{L}`` matches the layer index. First match wins.
_Rule = tuple[str, str, str, str, bool]

_LLAMA_LAYER: list[_Rule] = [
    (r"model\.layers\.{L}\.self_attn\.(q|k|v)_proj\.weight", "read", "attn", r"\1", False),
    (r"model\.layers\.{L}\.self_attn\.(q|k|v)_proj\.bias", "bias", "attn", r"\1_bias", False),
    (r"model\.layers\.{L}\.self_attn\.o_proj\.weight", "write", "attn", "o", False),
    (r"model\.layers\.{L}\.self_attn\.o_proj\.bias", "bias", "attn", "o_bias", False),
    (r"model\.layers\.{L}\.self_attn\.(q|k)_norm\.weight", "norm", "attn", r"\1_norm", False),
    (r"model\.layers\.{L}\.input_layernorm\.weight", "norm", "attn", "input_norm", False),
    (r"model\.layers\.{L}\.post_attention_layernorm\.weight", "norm", "mlp", "post_attn_norm", False),
    (r"model\.layers\.{L}\.mlp\.(gate|up)_proj\.weight", "read", "mlp", r"\1", False),
    (r"model\.layers\.{L}\.mlp\.down_proj\.weight", "write", "mlp", "down", False),
]
_LLAMA_GLOBAL: list[_Rule] = [
    (r"model\.embed_tokens\.weight", "embed", "embed", "embed", False),
    (r"lm_head\.weight", "lm_head", "head", "lm_head", False),
    (r"model\.norm\.weight", "final_norm", "head", "final_norm", False),
]
# Gemma 2/3: post-norms on both residual writes; post_attention_layernorm normalises the attention
# output (so it belongs to attn), pre_feedforward_layernorm is the MLP's pre-norm.
_GEMMA_LAYER: list[_Rule] = [
    (r"model\.layers\.{L}\.post_attention_layernorm\.weight", "norm", "attn", "post_attn_out_norm", False),
    (r"model\.layers\.{L}\.pre_feedforward_layernorm\.weight", "norm", "mlp", "pre_ffn_norm", False),
    (r"model\.layers\.{L}\.post_feedforward_layernorm\.weight", "norm", "mlp", "post_ffn_norm", False),
    *[r for r in _LLAMA_LAYER if "post_attention_layernorm" not in r[0]],
]
_PHI3_LAYER: list[_Rule] = [
    (r"model\.layers\.{L}\.self_attn\.qkv_proj\.weight", "read", "attn", "qkv", False),
    (r"model\.layers\.{L}\.mlp\.gate_up_proj\.weight", "read", "mlp", "gate_up", False),
    *_LLAMA_LAYER,
]
_GPT2_LAYER: list[_Rule] = [
    (r"transformer\.h\.{L}\.ln_1\.(weight|bias)", "norm", "attn", r"input_norm_\1", False),
    (r"transformer\.h\.{L}\.attn\.c_attn\.weight", "read", "attn", "qkv", True),
    (r"transformer\.h\.{L}\.attn\.c_attn\.bias", "bias", "attn", "qkv_bias", False),
    (r"transformer\.h\.{L}\.attn\.c_proj\.weight", "write", "attn", "o", True),
    (r"transformer\.h\.{L}\.attn\.c_proj\.bias", "bias", "attn", "o_bias", False),
    (r"transformer\.h\.{L}\.ln_2\.(weight|bias)", "norm", "mlp", r"post_attn_norm_\1", False),
    (r"transformer\.h\.{L}\.mlp\.c_fc\.weight", "read", "mlp", "up", True),
    (r"transformer\.h\.{L}\.mlp\.c_fc\.bias", "bias", "mlp", "up_bias", False),
    (r"transformer\.h\.{L}\.mlp\.c_proj\.weight", "write", "mlp", "down", True),
    (r"transformer\.h\.{L}\.mlp\.c_proj\.bias", "bias", "mlp", "down_bias", False),
]
_GPT2_GLOBAL: list[_Rule] = [
    (r"transformer\.wte\.weight", "embed", "embed", "embed", False),
    (r"transformer\.wpe\.weight", "pos_embed", "embed", "pos_embed", False),
    (r"lm_head\.weight", "lm_head", "head", "lm_head", False),
    (r"transformer\.ln_f\.(weight|bias)", "final_norm", "head", r"final_norm_\1", False),
]
_GENERIC_LAYER: list[_Rule] = [(r".*\.(?:layers|h|blocks)\.{L}\..*", "other", "other", "", False)]

# Which read units each norm feeds (SeMe folds norm gains into these before rotating).
_PRE_NORM_FEEDS = {
    "input_norm": ("q", "k", "v", "qkv"),
    "post_attn_norm": ("gate", "up", "gate_up"),
    "final_norm": ("lm_head",),
}
_GEMMA_FEEDS = {
    "input_norm": ("q", "k", "v"),
    "pre_ffn_norm": ("gate", "up"),
    "final_norm": ("lm_head",),
}


@dataclass(frozen=True)
class Family:
    """Data describing one architecture family."""

    name: str
    layer_rules: list[_Rule]
    global_rules: list[_Rule]
    residual_rotation_ok: bool  # every residual-facing norm is a pre-norm
    norm_offset: float = 0.0  # Gemma stores gamma - 1: effective gain = offset + stored
    norm_feeds: dict[str, tuple[str, ...]] = field(default_factory=dict)
    tie_default: bool = False


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", _LLAMA_LAYER, _LLAMA_GLOBAL, True, 0.0, _PRE_NORM_FEEDS),
    "mistral": Family("mistral", _LLAMA_LAYER, _LLAMA_GLOBAL, True, 0.0, _PRE_NORM_FEEDS),
    "qwen2": Family("qwen2", _LLAMA_LAYER, _LLAMA_GLOBAL, True, 0.0, _PRE_NORM_FEEDS),
    "qwen3": Family("qwen3", _LLAMA_LAYER, _LLAMA_GLOBAL, True, 0.0, _PRE_NORM_FEEDS),
    "phi3": Family("phi3", _PHI3_LAYER, _LLAMA_GLOBAL, True, 0.0, _PRE_NORM_FEEDS),
    "gemma2": Family("gemma2", _GEMMA_LAYER, _LLAMA_GLOBAL, False, 1.0, _GEMMA_FEEDS, tie_default=True),
    "gemma3_text": Family("gemma3", _GEMMA_LAYER, _LLAMA_GLOBAL, False, 1.0, _GEMMA_FEEDS, tie_default=True),
    "gpt2": Family("gpt2", _GPT2_LAYER, _GPT2_GLOBAL, False, 0.0, {}, tie_default=True),
}
FAMILIES["gemma3"] = FAMILIES["gemma3_text"]

_GENERIC = Family("generic", _GENERIC_LAYER, [], False)


@dataclass
class Architecture:
    """A resolved architecture: family data plus the sizes from config.json."""

    family: str
    model_type: str
    num_layers: int
    hidden_size: int
    vocab_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    tied_embeddings: bool
    norm_offset: float
    residual_rotation_ok: bool
    norm_feeds: dict[str, tuple[str, ...]]
    _rules: list[tuple[re.Pattern[str], str, str, str, bool]] = field(repr=False, default_factory=list)
    _cache: dict[str, TensorRole] = field(repr=False, default_factory=dict)

    @property
    def known(self) -> bool:
        return self.family != "generic"

    def role(self, name: str) -> TensorRole:
        """Role of tensor ``name``; unknown names get kind ``other`` (with a layer if one is found)."""
        hit = self._cache.get(name)
        if hit is not None:
            return hit
        role = TensorRole("other", "other", self.layer_of(name))
        for pat, kind, module, unit, transposed in self._rules:
            m = pat.fullmatch(name)
            if m:
                layer = int(m.group("L")) if "L" in pat.groupindex else None
                role = TensorRole(kind, module, layer, m.expand(unit) if unit else "", transposed)
                break
        self._cache[name] = role
        return role

    @staticmethod
    def layer_of(name: str) -> int | None:
        m = re.search(r"\.(?:layers|h|blocks)\.(\d+)\.", name)
        return int(m.group(1)) if m else None

    def t_of(self, name: str) -> float:
        """Position in depth for gradient parameters, as mergekit defines it.

        Layer tensors: layer / (num_layers - 1) (1 for a single layer). Tensors outside the layers
        (embeddings, final norm, LM head): 0 -- mergekit 0.1.5 plans both its pre- and post-layer
        weights with t = 0 (plan.py, plan_module/plan_slice).
        """
        role = self.role(name)
        if role.layer is not None:
            return 1.0 if self.num_layers <= 1 else role.layer / (self.num_layers - 1)
        return 0.0


def _size(cfg: dict[str, Any], source: str, *keys: str, default: Any = None, minimum: int = 1) -> Any:
    """The first of ``keys`` set in ``cfg``, which must be an integer >= ``minimum`` (CheckpointError
    naming the key and file otherwise); ``default`` when none is set."""
    for k in keys:
        v = cfg.get(k)
        if v is None:
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != int(v) or v < minimum:
            raise CheckpointError(f"{source}: {k} must be an integer >= {minimum}, got {v!r}")
        return int(v)
    return default


def resolve(config: dict[str, Any], source: str = "config.json") -> Architecture:
    """Resolve the architecture of a Hugging Face ``config.json`` dict."""
    if not isinstance(config, dict):
        raise CheckpointError(f"{source}: config.json must be a JSON object, not {type(config).__name__}")
    model_type = str(config.get("model_type", "")).lower()
    fam = FAMILIES.get(model_type, _GENERIC)
    num_layers = _size(config, source, "num_hidden_layers", "n_layer", "num_layers", minimum=0)
    hidden = _size(config, source, "hidden_size", "n_embd", "d_model")
    if num_layers is None or hidden is None:
        raise CheckpointError(f"{source}: cannot determine num_hidden_layers/hidden_size")
    heads = _size(config, source, "num_attention_heads", "n_head", default=1)
    kv = _size(config, source, "num_key_value_heads", default=heads)
    head_dim = _size(config, source, "head_dim", default=hidden // heads)
    tied = bool(config.get("tie_word_embeddings", fam.tie_default if model_type != "gpt2" else True))
    rules = []
    for pat, kind, module, unit, transposed in fam.layer_rules + fam.global_rules:
        rx = re.compile(pat.replace("{L}", r"(?P<L>\d+)"))
        if "{L}" in pat:  # the layer index is group 1, so the unit's group shifts to 2
            unit = unit.replace(r"\1", r"\2")
        rules.append((rx, kind, module, unit, transposed))
    return Architecture(
        family=fam.name,
        model_type=model_type,
        num_layers=int(num_layers),
        hidden_size=int(hidden),
        vocab_size=_size(config, source, "vocab_size", default=0, minimum=0),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        intermediate_size=_size(config, source, "intermediate_size", "n_inner", default=4 * hidden, minimum=0),
        tied_embeddings=tied,
        norm_offset=fam.norm_offset,
        residual_rotation_ok=fam.residual_rotation_ok,
        norm_feeds=dict(fam.norm_feeds),
        _rules=rules,
    )
