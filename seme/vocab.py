"""Output vocabularies and chat templates: mergekit's ``tokenizer_source`` / ``tokenizer:`` block.

With a tokenizer source (``base``, ``union`` or a model), mergekit 0.1.5 builds the output tokenizer
and re-indexes every vocabulary-indexed tensor (embeddings, LM head) of every input to the output
vocabulary *before* merging (tokenizer/build.py, tokenizer/embed.py). A token missing from some
inputs gets, in each of them, the row of a donor: the ``tokenizer.tokens`` entry for it when given,
else the one input that has it, else the base when it has it, else the average of the inputs that
have it (zeros when none has it). seme does the same through computed tensors of the layout's views
(``seme.layout.MappedCheckpoint``), one vocabulary tensor at a time.

When every input has the very same tokenizer files and the tokenizer covers the model's embedding
rows exactly, the re-indexing is the identity: nothing is computed and the files are copied.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from seme.checkpoint import TOKENIZER_FILES, Checkpoint, dtype_code, parse_dtype_code, torch_dtype
from seme.config import MergeConfig
from seme.errors import CheckpointError, ConfigError
from seme.layout import Layout, MappedCheckpoint

log = logging.getLogger(__name__)
_VOCAB_KINDS = frozenset({"embed", "lm_head"})

#: Named chat templates (``chat_template: chatml`` …), the formats mergekit 0.1.5 names.
CHAT_TEMPLATES: dict[str, str] = {
    "chatml": (
        "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
        " + '<|im_end|>\\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}"
        "{% endif %}"
    ),
    "llama3": (
        "{% for message in messages %}{% if loop.index0 == 0 %}{{ bos_token }}{% endif %}"
        "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim"
        " + '<|eot_id|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
    ),
    "mistral": (
        "{%- if messages[0]['role'] == 'system' %}{%- set system_message = messages[0]['content'] %}"
        "{%- set loop_messages = messages[1:] %}{%- else %}{%- set loop_messages = messages %}{%- endif %}"
        "{{- bos_token }}{%- for message in loop_messages %}"
        "{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('conversation roles must alternate user/assistant after an optional system "
        "message') }}{%- endif %}{%- if message['role'] == 'user' %}"
        "{%- if loop.first and system_message is defined %}"
        "{{- ' [INST] ' + system_message + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' [INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
        "{%- elif message['role'] == 'assistant' %}{{- ' ' + message['content'] + eos_token }}"
        "{%- else %}{{- raise_exception('only user and assistant roles, after an optional system message') }}"
        "{%- endif %}{%- endfor %}"
    ),
    "alpaca": (
        "{% set sys = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{{ (sys | last).content | trim if sys else '' }}\n\n"
        "{% for message in messages %}"
        "{% if message['role'] == 'user' %}### Instruction:\n{{ message['content'] | trim }}"
        "{% elif message['role'] == 'assistant' %}### Response:\n{{ message['content'] | trim }}"
        "{% elif message['role'] == 'user_context' %}### Input:\n{{ message['content'] | trim }}{% endif %}"
        "{% if message['role'] in ['user', 'assistant', 'user_context'] and not loop.last %}\n\n\n{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt and messages[-1]['role'] != 'assistant' %}### Response:\n{% endif %}"
    ),
    "exaone": (
        "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
        "{{ '[|system|][|endofturn|]\\n' }}{% endif %}{{ '[|' + message['role'] + '|]' + message['content'] }}"
        "{% if message['role'] == 'user' %}{{ '\\n' }}{% else %}{{ '[|endofturn|]\\n' }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}{{ '[|assistant|]' }}{% endif %}"
    ),
}


def resolve_chat_template(cfg: MergeConfig, refs: list[tuple[str, Checkpoint]]) -> str | None:
    """The template text ``chat_template`` asks for: a name, ``auto`` (the template most inputs
    share), or literal Jinja. ConfigError for anything else."""
    ct = cfg.chat_template
    if not ct:
        return None
    if ct == "auto":
        found = [t.strip() for _, ck in refs if (t := read_chat_template(ck.path))]
        return Counter(found).most_common(1)[0][0] if found else None
    if ct in CHAT_TEMPLATES:
        return CHAT_TEMPLATES[ct]
    if "{" in ct and len(ct) >= 20:
        return ct
    raise ConfigError(
        f"chat_template {ct!r} is neither a named template ({', '.join(sorted(CHAT_TEMPLATES))}, auto) "
        "nor a Jinja template"
    )


def read_chat_template(path: Path) -> str | None:
    """A checkpoint's chat template (chat_template.jinja, else tokenizer_config.json's)."""
    f = Path(path) / "chat_template.jinja"
    if f.is_file():
        return f.read_text()
    tc = Path(path) / "tokenizer_config.json"
    if tc.is_file():
        try:
            t = json.loads(tc.read_text()).get("chat_template")
        except ValueError:
            return None
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            t = next((e.get("template") for e in t if e.get("name") == "default"), None)
        return t if isinstance(t, str) else None
    return None


def set_chat_template(cfg: MergeConfig, out: Path, refs: list[tuple[str, Checkpoint]]) -> list[str]:
    """Write the output's chat template as transformers saves it (chat_template.jinja)."""
    text = resolve_chat_template(cfg, refs)
    if text is None:
        return []
    tc = out / "tokenizer_config.json"
    if not tc.is_file():
        log.warning("chat_template given but the output has no tokenizer; no chat template written")
        return []
    conf = json.loads(tc.read_text())
    if "chat_template" in conf:
        conf.pop("chat_template")
        tc.write_text(json.dumps(conf, indent=2, ensure_ascii=False) + "\n")
    (out / "chat_template.jinja").write_text(text)
    return ["chat_template.jinja", "tokenizer_config.json"]


def _fast_vocab(path: Path) -> dict[str, int] | None:
    """token -> id of tokenizer.json (added tokens included), read without transformers; None when
    there is no tokenizer.json or it cannot tell."""
    f = path / "tokenizer.json"
    if not f.is_file():
        return None
    try:
        d = json.loads(f.read_text())
        vocab = d["model"]["vocab"]
        out = dict(vocab) if isinstance(vocab, dict) else {e[0]: i for i, e in enumerate(vocab)}
        out.update({a["content"]: a["id"] for a in d.get("added_tokens") or []})
        return out
    except (ValueError, KeyError, TypeError, IndexError):
        return None


class Vocabulary:
    """The output tokenizer and the per-model re-indexing of the vocabulary tensors."""

    def __init__(self, cfg: MergeConfig, refs: list[tuple[str, Checkpoint]]) -> None:
        self.cfg = cfg
        self.refs = refs
        self.cks = dict(refs)
        ts = cfg.token_source()
        self.tokens = dict(cfg.tokenizer.tokens or {}) if cfg.tokenizer else {}
        self.pad = cfg.tokenizer.pad_to_multiple_of if cfg.tokenizer else None
        self.base_ref = cfg.base_model or refs[0][0]
        self.tokenizer, self.perm = self._build(ts)
        self.vocab = self.tokenizer.get_vocab()
        n = len(self.vocab)
        if self.pad and n % self.pad:
            n += self.pad - n % self.pad
        self.size = n
        self._cache: tuple[str, dict[str, Any]] | None = None

    def _load(self, ref: str):
        from transformers import AutoTokenizer

        path = self.cks[ref].path
        try:
            return AutoTokenizer.from_pretrained(str(path), use_fast=True)
        except Exception as e:  # noqa: BLE001 - any load failure is one line about that model
            raise CheckpointError(f"{ref}: cannot load its tokenizer ({str(e).splitlines()[0]})") from None

    def _vocab_size(self, ref: str) -> int:
        return int(self.cks[ref].architecture.vocab_size)

    def _build(self, ts: str):
        base_tok = self._load(self.base_ref)
        if any(i >= self._vocab_size(self.base_ref) for i in base_tok.get_vocab().values()):
            raise ConfigError(
                f"{self.base_ref}: its tokenizer has tokens beyond the model's vocab_size "
                f"{self._vocab_size(self.base_ref)}; seme cannot honour a tokenizer merge that strips them"
            )
        toks = {self.base_ref: base_tok}
        for ref, _ in self.refs:
            if ref not in toks:
                toks[ref] = self._load(ref)
        if ts == "union":
            out = self._union(base_tok, toks)
        else:  # a fresh copy: added tokens must not leak into the inputs' own vocabularies
            out = self._load(self.base_ref if ts == "base" else ts)
        for tok in self.tokens:
            if tok not in out.get_vocab():
                out.add_tokens(tok)
        vocab_out = out.get_vocab()
        perm = {}
        for ref, tok in toks.items():
            mv, vs = tok.get_vocab(), self._vocab_size(ref)
            perm[ref] = {i: (mv[t] if t in mv and mv[t] < vs else -1) for t, i in vocab_out.items()}
        self.toks = toks
        return out, perm

    def _union(self, base_tok, toks: dict[str, Any]):
        """The base tokenizer plus every other input's tokens it lacks: plain tokens first (in each
        model's id order), then added tokens with their settings (the first model's, as mergekit)."""
        import tempfile

        from transformers import AutoTokenizer

        plain: dict[str, None] = {}
        added: dict[str, Any] = {}
        for ref, tok in toks.items():
            vs = self._vocab_size(ref)
            dec = tok.added_tokens_decoder
            added_names = {a.content for a in dec.values()}
            for t, i in sorted(tok.get_vocab().items(), key=lambda kv: kv[1]):
                if i < vs and t not in added_names:
                    plain.setdefault(t)
            for i, info in sorted(dec.items()):
                if i < vs and info.content not in added:
                    added[info.content] = info
        with tempfile.TemporaryDirectory() as d:  # a copy: the base tokenizer stays as loaded
            base_tok.save_pretrained(d)
            out = AutoTokenizer.from_pretrained(d, use_fast=True)
        have = base_tok.get_vocab()
        for t in plain:
            if t not in added and t not in have:
                out.add_tokens(t)
        for info in added.values():
            out.add_tokens(info)
        return out

    # -- tensors --------------------------------------------------------------------------------
    def permuted(self, name: str, models: list[tuple[str, Checkpoint, str]], compute_dtype: str) -> dict[str, Any]:
        """Every model's tensor ``name`` re-indexed to the output vocabulary (axis 0), in the
        compute dtype, as mergekit's ``PermutedVocabulary``; keyed by reference."""
        if self._cache is not None and self._cache[0] == name:
            return self._cache[1]
        from seme.lazy import torch

        dt = torch_dtype(parse_dtype_code(compute_dtype))
        tensors = {ref: ck.view(src).to(dt) for ref, ck, src in models}
        refs = list(tensors)
        perms = {r: self.perm[r] for r in refs}
        row_shape = tensors[refs[0]].shape[1:]
        fill: dict[int, Any] = {}
        for tok, i in self.vocab.items():
            cfg = self.tokens.get(tok)
            present = [r for r in refs if perms[r][i] >= 0]
            if len(present) == len(refs) and not (cfg and cfg.force):
                continue
            if cfg is not None and cfg.source is not None:
                fill[i] = self._explicit(tok, cfg.source, tensors, perms, i)
            elif cfg is not None and cfg.source is None and not present:
                fill[i] = torch.zeros(row_shape, dtype=dt)
            elif len(present) == 1:
                fill[i] = tensors[present[0]][perms[present[0]][i]]
            elif not present:
                log.warning("token %r is in no input model; its embedding row is zero", tok)
                fill[i] = torch.zeros(row_shape, dtype=dt)
            elif self.base_ref in refs and perms[self.base_ref][i] >= 0:
                fill[i] = tensors[self.base_ref][perms[self.base_ref][i]]
            else:
                acc = torch.zeros(row_shape, dtype=dt)
                for r in present:
                    acc = acc + tensors[r][perms[r][i]]
                fill[i] = acc / len(present)
        out = {}
        n = len(self.vocab)
        for r in refs:
            p = perms[r]
            new = torch.zeros((self.size, *row_shape), dtype=dt)
            src_idx = [(i, j) for i, j in p.items() if j >= 0]
            force = {self.vocab[t] for t, c in self.tokens.items() if c.force and t in self.vocab}
            src_idx = [(i, j) for i, j in src_idx if i not in force]
            if src_idx:
                dst, srcs = zip(*src_idx)
                new[list(dst)] = tensors[r][list(srcs)]
            for i, row in fill.items():
                if p[i] < 0 or i in force:
                    new[i] = row
            if self.size > n:
                new[n:] = new[:n].mean(dim=0)
            out[r] = new
        self._cache = (name, out)
        return out

    def _explicit(self, tok: str, source: Any, tensors: dict, perms: dict, i: int):
        from seme.lazy import torch

        if isinstance(source, dict):
            kind = source.get("kind")
            if kind == "zero":
                first = next(iter(tensors.values()))
                return torch.zeros(first.shape[1:], dtype=first.dtype)
            if kind == "model_token":
                ref = source.get("model")
                if ref not in tensors:
                    raise ConfigError(f"tokenizer.tokens[{tok!r}]: model {ref} is not an input of this tensor")
                tid = source.get("token_id")
                if tid is None:
                    tv = self.toks[ref].get_vocab()
                    if source.get("token") not in tv:
                        raise ConfigError(f"tokenizer.tokens[{tok!r}]: token {source.get('token')!r} not in {ref}")
                    tid = tv[source["token"]]
                if not 0 <= tid < tensors[ref].shape[0]:
                    raise ConfigError(f"tokenizer.tokens[{tok!r}]: token_id {tid} out of range for {ref}")
                return tensors[ref][tid]
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: unknown source kind {kind!r}")
        if source not in tensors:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: source {source} is not one of the input models")
        if perms[source][i] < 0:
            raise ConfigError(f"tokenizer.tokens[{tok!r}]: token not found in {source}")
        return tensors[source][perms[source][i]]

    # -- output ---------------------------------------------------------------------------------
    def update_config(self, config: dict[str, Any]) -> dict[str, Any]:
        out = dict(config)
        out["vocab_size"] = self.size
        return out

    def save_tokenizer(self, out: Path) -> list[str]:
        before = {p.name for p in out.iterdir()}
        for n in TOKENIZER_FILES:  # files of the donor that the new tokenizer replaces
            if (out / n).exists():
                (out / n).unlink()
        self.tokenizer.save_pretrained(str(out))
        return sorted(({p.name for p in out.iterdir()} - before) | {n for n in TOKENIZER_FILES
                       if (out / n).is_file()})


def needs_alignment(cfg: MergeConfig, refs: list[tuple[str, Checkpoint]]) -> bool:
    """False when re-indexing would be the identity: every input's tokenizer.json maps the same
    tokens to the same ids, as many as the embedding rows, and no token settings are given (the
    tokenizer files are then copied). Inputs without any tokenizer files: nothing to align."""
    if cfg.tokenizer is not None and (cfg.tokenizer.tokens or cfg.tokenizer.pad_to_multiple_of):
        return True
    paths = [ck.path for _, ck in refs]
    ts = cfg.token_source()
    if ts not in (None, "base", "union"):
        paths.append(Path(dict(refs)[ts].path) if ts in dict(refs) else Path(ts))
    if not any((p / n).is_file() for p in paths for n in TOKENIZER_FILES):
        return False
    vocabs = [_fast_vocab(p) for p in paths]
    if any(v is None for v in vocabs) or any(v != vocabs[0] for v in vocabs[1:]):
        return True
    return any(len(vocabs[0]) != ck.architecture.vocab_size for _, ck in refs)


def align_vocabularies(cfg: MergeConfig, layout: Layout) -> None:
    """Re-index the layout's vocabulary tensors to the output tokenizer (see the module docs)."""
    if not needs_alignment(cfg, layout.refs):
        return
    if cfg.merge_method == "seme":
        raise ConfigError("merge_method seme: seme cannot honour a tokenizer merge (tokenizer_source/tokenizer)")
    vocab = Vocabulary(cfg, layout.refs)
    ref_of = {id(ck): ref for ref, ck in layout.refs}

    def wrap(view: Any) -> MappedCheckpoint:
        if isinstance(view, MappedCheckpoint):
            entries, config, label = view.entries, view.config, str(view.path)
        else:
            entries, config, label = {n: (view, n) for n in view.names}, view.config, str(view.path)
        return MappedCheckpoint(dict(entries), config, label, computed={})

    positions = [wrap(v) for v in layout.sources]
    base = wrap(layout.base) if layout.base is not None else None
    views = positions + ([base] if base is not None else [])
    arch = views[0].architecture
    code = dtype_code(torch_dtype(parse_dtype_code(cfg.dtype)))
    for name in list(views[0].names):
        if arch.role(name).kind not in _VOCAB_KINDS:
            continue
        models: list[tuple[str, Checkpoint, str]] = []
        for v in views:
            if name in v.entries:
                ck, src = v.entries[name]
                if not any(m[1] is ck and m[2] == src for m in models):
                    models.append((ref_of[id(ck)], ck, src))
        shape = (vocab.size, *views[0].entries[name][0].shape(views[0].entries[name][1])[1:])
        for v in views:
            ck, _src = v.entries[name]
            ref = ref_of[id(ck)]
            v.computed[name] = (
                lambda name=name, ref=ref, models=models: vocab.permuted(name, models, cfg.dtype)[ref],
                code, shape,
            )
    layout.sources = positions
    layout.base = base
    layout.vocab = vocab
    layout.config = vocab.update_config(layout.config)
