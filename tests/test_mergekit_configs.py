"""mergekit configs as published (``slices`` with ``layer_range``, passthrough stacking, TIES with
``tokenizer_source: union``, ``chat_template``) run by seme give mergekit 0.1.5's tensors and
config.json: both tools merge the same tiny real checkpoints (4 layers, transformers'
save_pretrained) and the outputs are compared tensor for tensor. Bad inputs give one-line errors."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model, perturb_model
from test_mergekit_crosscheck import load_dir, run_mergekit

FAMILIES = ["llama", "qwen2", "gemma2"]


def add_tokenizer(d: Path, extra: tuple[str, ...] = ()) -> None:
    """A real fast tokenizer (word level, 100 tokens) saved next to the model, with ``extra``
    special tokens added after them (as chat fine-tunes add <|im_start|> …)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i + 3 for i in range(97)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    if extra:
        fast.add_special_tokens({"additional_special_tokens": list(extra)})
    fast.save_pretrained(d)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, dict[str, str]]:
    root = tmp_path_factory.mktemp("mk_configs")
    out = {}
    for fam in FAMILIES:
        a = make_tiny_model(root / f"{fam}_a", family=fam, seed=0, num_hidden_layers=4)
        b = perturb_model(a, root / f"{fam}_b", scale=0.05, seed=3)
        out[fam] = {"a": str(a), "b": str(b)}
    return out


def run_seme(cfg: dict, out: Path) -> dict[str, torch.Tensor]:
    from seme.config import load_config
    from seme.merge import run_merge

    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    run_merge(load_config(path), out, progress=False)
    return load_dir(out)


def config_diff(a: Path, b: Path, ignore: tuple[str, ...] = ()) -> dict:
    ca, cb = (json.loads((d / "config.json").read_text()) for d in (a, b))
    return {k: (ca.get(k), cb.get(k)) for k in set(ca) | set(cb) if ca.get(k) != cb.get(k) and k not in ignore}


def assert_same(mk: dict, ours: dict) -> None:
    assert sorted(mk) == sorted(ours)
    for n, t in mk.items():
        assert t.shape == ours[n].shape, n
        assert torch.equal(t, ours[n].to(t.dtype)), n


@pytest.mark.parametrize("fam", FAMILIES)
def test_slices_slerp_with_filters_and_gradients(zoo, tmp_path, fam):
    """The most published mergekit form: one slice over both models, t by filter and gradient."""
    a, b = zoo[fam]["a"], zoo[fam]["b"]
    cfg = {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
        "merge_method": "slerp",
        "base_model": a,
        "parameters": {"t": [
            {"filter": "self_attn", "value": [0, 0.5, 0.3, 0.7, 1]},
            {"filter": "mlp", "value": [1, 0.5, 0.7, 0.3, 0]},
            {"value": 0.5},
        ]},
        "dtype": "bfloat16",
        "out_dtype": "bfloat16",
    }
    mk, ours = run_mergekit(cfg, tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    assert config_diff(tmp_path / "mk", tmp_path / "seme") == {}


def test_slices_with_different_ranges_and_slice_parameters(zoo, tmp_path):
    """Slices taking different layer ranges from each model, a slice-level parameter overriding the
    global gradient (mergekit's precedence: source > slice > global), gradients per slice."""
    a, b = zoo["qwen2"]["a"], zoo["qwen2"]["b"]
    cfg = {
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [2, 4]}]},
            {"sources": [{"model": a, "layer_range": [2, 4]}, {"model": b, "layer_range": [0, 2]}],
             "parameters": {"t": 0.3}},
        ],
        "merge_method": "slerp",
        "base_model": a,
        "parameters": {"t": [0.1, 0.9]},
        "dtype": "float32",
    }
    mk, ours = run_mergekit(cfg, tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    assert config_diff(tmp_path / "mk", tmp_path / "seme") == {}


def test_slices_with_different_numbers_of_sources(zoo, tmp_path):
    """A slice merging two models next to a slice copying one (linear): mergekit pairs the
    embeddings with the first slice's sources and the final norm and head with the last slice's."""
    a, b = zoo["llama"]["a"], zoo["llama"]["b"]
    cfg = {
        "slices": [
            {"sources": [{"model": a, "layer_range": [0, 2], "parameters": {"weight": 0.3}},
                         {"model": b, "layer_range": [0, 2], "parameters": {"weight": 0.7}}]},
            {"sources": [{"model": b, "layer_range": [2, 4]}]},
        ],
        "merge_method": "linear", "parameters": {"weight": 1.0}, "dtype": "float32",
    }
    mk, ours = run_mergekit(cfg, tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    b_sd = load_dir(Path(b))
    assert torch.equal(ours["model.norm.weight"], b_sd["model.norm.weight"])


def test_passthrough_stacking_changes_layer_count(zoo, tmp_path):
    a, b = zoo["llama"]["a"], zoo["llama"]["b"]
    cfg = {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 3]}]},
                   {"sources": [{"model": b, "layer_range": [1, 4], "parameters": {"scale": 0.5}}]}],
        "merge_method": "passthrough",
        "dtype": "float32",
    }
    mk, ours = run_mergekit(cfg, tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    assert config_diff(tmp_path / "mk", tmp_path / "seme") == {}
    assert json.loads((tmp_path / "seme" / "config.json").read_text())["num_hidden_layers"] == 6


def test_passthrough_gemma2_layer_types_stay_consistent(zoo, tmp_path):
    """mergekit 0.1.5 cannot save this one (transformers 5 refuses its config: 6 layers, 4
    layer_types); seme writes each output layer's type from its source layer, and the output loads."""
    from transformers import AutoModelForCausalLM

    a, b = zoo["gemma2"]["a"], zoo["gemma2"]["b"]
    cfg = {"slices": [{"sources": [{"model": a, "layer_range": [0, 4]}]},
                      {"sources": [{"model": b, "layer_range": [1, 3]}]}],
           "merge_method": "passthrough"}
    ours = run_seme(cfg, tmp_path / "seme")
    conf = json.loads((tmp_path / "seme" / "config.json").read_text())
    src_types = json.loads((Path(a) / "config.json").read_text())["layer_types"]
    assert conf["num_hidden_layers"] == 6 and conf["layer_types"] == src_types + src_types[1:3]
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "seme")
    assert len(model.model.layers) == 6
    b_sd = load_dir(Path(b))
    assert torch.equal(ours["model.layers.5.mlp.down_proj.weight"], b_sd["model.layers.2.mlp.down_proj.weight"])


def test_ties_with_union_tokenizer_and_chat_template(tmp_path):
    """TIES over a model whose fine-tune added chat tokens: mergekit's union vocabulary (added rows
    taken from the one model that has them), config vocab_size, tokenizer and chat template."""
    from transformers import AutoTokenizer

    base = make_tiny_model(tmp_path / "base", family="llama", seed=0)
    add_tokenizer(base)
    m1 = perturb_model(base, tmp_path / "m1", 0.05, 1)
    m2 = perturb_model(base, tmp_path / "m2", 0.05, 2)
    add_tokenizer(m2, ("<|im_start|>", "<|im_end|>"))
    cfg = {
        "models": [{"model": str(m1), "parameters": {"weight": 0.6, "density": 0.5}},
                   {"model": str(m2), "parameters": {"weight": 0.4, "density": 0.7}}],
        "merge_method": "ties", "base_model": str(base), "parameters": {"normalize": True},
        "dtype": "float32", "tokenizer_source": "union", "chat_template": "chatml",
    }
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(quiet=True, write_model_card=False, random_seed=0))
    mk, ours = load_dir(tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    assert ours["model.embed_tokens.weight"].shape[0] == 102
    assert config_diff(tmp_path / "mk", tmp_path / "seme") == {}
    tk_mk, tk_ours = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("mk", "seme"))
    assert tk_mk.get_vocab() == tk_ours.get_vocab()
    msgs = [{"role": "system", "content": "w5"}, {"role": "user", "content": "w1 w2"},
            {"role": "assistant", "content": "w3"}]
    render = [t.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True) for t in (tk_mk, tk_ours)]
    assert render[0] == render[1] and render[1].startswith("<|im_start|>system\nw5<|im_end|>\n")


def test_slices_slerp_with_union_tokenizer(tmp_path):
    """The vocabulary re-indexing under ``slices:`` (qwen2): rows per model, then SLERP per layer."""
    base = make_tiny_model(tmp_path / "base", family="qwen2", seed=0, num_hidden_layers=4)
    add_tokenizer(base)
    m2 = perturb_model(base, tmp_path / "m2", 0.05, 2)
    add_tokenizer(m2, ("<|im_start|>", "<|im_end|>"))
    cfg = {"slices": [{"sources": [{"model": str(base), "layer_range": [0, 4]}, {"model": str(m2), "layer_range": [0, 4]}]}],
           "merge_method": "slerp", "base_model": str(base), "parameters": {"t": [0.2, 0.8]}, "dtype": "float32",
           "tokenizer_source": "union"}
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(quiet=True, write_model_card=False, random_seed=0))
    mk, ours = load_dir(tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    assert ours["model.embed_tokens.weight"].shape[0] > 100
    assert config_diff(tmp_path / "mk", tmp_path / "seme") == {}


def test_literal_chat_template_and_tokenizer_block(tmp_path):
    """A literal Jinja template and the ``tokenizer:`` block (source base, padding to a multiple of
    8: mean rows, as mergekit) equal mergekit; an added token whose row comes from the base's
    ``</s>`` (mergekit 0.1.5 fails on this one: it adds the token to the base's own tokenizer)."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    base = make_tiny_model(tmp_path / "base", family="llama", seed=0, vocab_size=100)
    add_tokenizer(base)
    m1 = perturb_model(base, tmp_path / "m1", 0.05, 1)
    jinja = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}"
    cfg = {
        "models": [{"model": str(base), "parameters": {"weight": 0.5}}, {"model": str(m1), "parameters": {"weight": 0.5}}],
        "merge_method": "linear", "base_model": str(base), "dtype": "float32", "chat_template": jinja,
        "tokenizer": {"source": "base", "pad_to_multiple_of": 8},
    }
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(quiet=True, write_model_card=False, random_seed=0))
    mk, ours = load_dir(tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    assert ours["model.embed_tokens.weight"].shape[0] == 104  # 100 tokens padded to a multiple of 8
    assert config_diff(tmp_path / "mk", tmp_path / "seme") == {}
    assert AutoTokenizer.from_pretrained(tmp_path / "seme").chat_template == jinja

    cfg["tokenizer"]["tokens"] = {"<tool>": {"source": {"kind": "model_token", "model": str(base), "token": "</s>"}}}
    emb = run_seme(cfg, tmp_path / "seme2")["model.embed_tokens.weight"]
    b = load_file(base / "model.safetensors")["model.embed_tokens.weight"]
    m = load_file(m1 / "model.safetensors")["model.embed_tokens.weight"]
    assert emb.shape[0] == 104 and torch.equal(emb[100], b[2])  # <tool>: the base's </s> in both models
    assert torch.allclose(emb[2], (b[2] + m[2]) / 2) and not torch.equal(emb[2], b[2])
    assert AutoTokenizer.from_pretrained(tmp_path / "seme2").get_vocab()["<tool>"] == 100


def _cli(capsys, *argv):
    from seme.cli import main

    capsys.readouterr()  # drop what the fixtures printed
    rc = main(list(argv))
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line(rc, err, *needles):
    assert rc != 0
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("seme: error: "), err
    for n in needles:
        assert n in lines[0], (n, lines[0])


def _write(tmp_path, cfg: dict) -> str:
    p = tmp_path / "c.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return str(p)


def test_bad_slices_are_one_line_errors(zoo, tmp_path, capsys):
    a, b = zoo["llama"]["a"], zoo["llama"]["b"]
    out = tmp_path / "out"
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 6]}, {"model": b, "layer_range": [0, 6]}]}],
        "merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5}}), str(out))
    _one_line(rc, err, "layer_range [0, 6]", "out of bounds", "4 layers")
    # overlapping/duplicated passthrough ranges with two sources per slice: no single model to copy
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 3]}, {"model": b, "layer_range": [1, 4]}]}],
        "merge_method": "passthrough"}), str(out))
    _one_line(rc, err, "passthrough", "one source")
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, {
        "slices": [{"sources": [{"model": a, "layer_range": [3, 1]}]}], "merge_method": "passthrough"}), str(out))
    _one_line(rc, err, "layer_range [3, 1]")
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, {
        "slices": [{"sources": [{"model": a, "layer_range": [2, 2]}]}], "merge_method": "passthrough"}), str(out))
    _one_line(rc, err, "no layers")
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}, {"model": b, "layer_range": [0, 3]}]}],
        "merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5}}), str(out))
    _one_line(rc, err, "same number of layers")
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, {
        "models": [{"model": a}], "slices": [{"sources": [{"model": a, "layer_range": [0, 2]}]}],
        "merge_method": "linear"}), str(out))
    _one_line(rc, err, "exactly one of 'models', 'slices' or 'modules'")
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, {
        "models": [{"model": a, "parameters": {"weight": 1}}], "merge_method": "linear",
        "chat_template": "klingon"}), str(out))
    _one_line(rc, err, "chat_template 'klingon'", "chatml")
    assert not out.exists()


def test_parameter_of_another_method_warns_typo_fails(zoo, tmp_path, capsys, caplog):
    a, b = zoo["llama"]["a"], zoo["llama"]["b"]
    cfg = {"models": [{"model": a, "parameters": {"weight": 0.5, "density": 0.5}},
                      {"model": b, "parameters": {"density": 0.3}}],
           "merge_method": "linear", "parameters": {"weight": 0.5}}
    rc, _, err = _cli(capsys, "-q", "merge", _write(tmp_path, cfg), str(tmp_path / "out"))
    assert rc == 0
    warn = [r.getMessage() for r in caplog.records if "density" in r.getMessage()]
    assert len(warn) == 1 and "not used by linear" in warn[0] and "models[1]" in warn[0]
    cfg["models"][1]["parameters"] = {"wieght": 1}
    rc, _, err = _cli(capsys, "merge", _write(tmp_path, cfg), str(tmp_path / "out2"))
    _one_line(rc, err, "unknown parameter 'wieght'", "valid: normalize, weight")


def test_modules_form_and_module_parameters(zoo, tmp_path):
    """``modules:`` (mergekit's per-module form) with module-level parameters equals mergekit."""
    a, b = zoo["llama"]["a"], zoo["llama"]["b"]
    cfg = {"modules": {"default": {
        "slices": [{"sources": [{"model": a, "layer_range": [0, 4]}, {"model": b, "layer_range": [0, 4]}]}],
        "parameters": {"t": [0.2, 0.8]}}},
        "merge_method": "slerp", "base_model": a, "parameters": {"t": 0.5}, "dtype": "float32"}

    mk, ours = run_mergekit(cfg, tmp_path / "mk"), run_seme(cfg, tmp_path / "seme")
    assert_same(mk, ours)
    # modules with models: module parameters between the models' and the global
    cfg["modules"]["default"] = {"models": [{"model": a, "parameters": {"weight": 2.0}}, {"model": b}],
                                 "parameters": {"weight": [0.5, 1.5]}}
    cfg.update(merge_method="linear", parameters={"weight": 9.0})
    del cfg["base_model"]
    assert_same(run_mergekit(cfg, tmp_path / "mk2"), run_seme(cfg, tmp_path / "seme2"))


def test_chat_template_auto_takes_the_inputs_common_template(tmp_path):
    from transformers import AutoTokenizer

    base = make_tiny_model(tmp_path / "base", family="llama", seed=0)
    add_tokenizer(base)
    m1 = perturb_model(base, tmp_path / "m1", 0.05, 1)
    m2 = perturb_model(base, tmp_path / "m2", 0.05, 2)
    common = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    for d in (m1, m2):
        (d / "chat_template.jinja").write_text(common)
    cfg = {"models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in (base, m1, m2)],
           "merge_method": "linear", "dtype": "float32", "chat_template": "auto"}
    from mergekit.config import MergeConfiguration
    from mergekit.merge import run_merge
    from mergekit.options import MergeOptions

    logging.getLogger("mergekit").setLevel(logging.ERROR)
    run_merge(MergeConfiguration.model_validate(cfg), str(tmp_path / "mk"),
              MergeOptions(quiet=True, write_model_card=False, random_seed=0))
    run_seme(cfg, tmp_path / "seme")
    tk_mk, tk_ours = (AutoTokenizer.from_pretrained(tmp_path / d) for d in ("mk", "seme"))
    assert tk_ours.chat_template == common == tk_mk.chat_template


def test_parameter_values_as_mergekit_evaluates_them():
    """Gradients of discrete values pick an entry; ``filter: "*"`` matches every tensor; numeric
    gradients interpolate (mergekit 0.1.5's evaluate_setting)."""
    from mergekit.config import ConditionalParameter, evaluate_setting

    from seme.config import evaluate

    cases = [([True, False, True], 0.6), (["a", "b", "c"], 0.5), ([0.0, 1.0, 0.5], 0.75), ([0.2, 0.9], 1.0),
             ([{"filter": "*", "value": 0.3}], 0.0), ([{"filter": "mlp", "value": [0, 1]}, {"value": 0.5}], 0.5)]
    for value, t in cases:
        mk_value = [ConditionalParameter(**v) for v in value] if isinstance(value[0], dict) else value
        assert evaluate(value, "model.layers.1.mlp.up_proj.weight", t) == evaluate_setting(
            "model.layers.1.mlp.up_proj.weight", mk_value, t, validate=lambda x: x), (value, t)
