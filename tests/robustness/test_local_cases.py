"""Bad local input through ``seme merge / align / inspect / eval``: each case asserts the promise.

Every case builds its bad input in its own directory next to shared, read-only tiny models (built
once per module), runs seme, and checks with :func:`assert_clean_failure`: exit ≠ 0, exactly one
``seme: error:`` line naming the file/tensor, no traceback, no complete-looking output or temp dir
left, and the shared inputs plus an unrelated file byte-identical afterwards.

Cases that only parse and validate run ``seme.cli.main`` in this process (``inproc``); cases that
could hang (FIFOs), depend on the working directory or on signals run a real ``python -m seme``.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from robustness.harness import assert_clean_failure, run_seme, run_seme_inproc, snapshot

# ------------------------------------------------------------------------------------------------
# The shared world: tiny models built once
# ------------------------------------------------------------------------------------------------


@dataclass
class World:
    root: Path
    base: Path  # llama, 2 layers
    expert: Path  # base + noise
    wide: Path  # llama with another intermediate_size
    narrow: Path  # llama with another hidden_size
    gpt2: Path  # another family
    merged: Path  # a finished seme output (merge of base + expert)
    align: Path  # a `seme align` artifact for base + expert
    seme_cfg: Path
    unrelated: Path

    def roots(self) -> tuple[Path, ...]:
        return (self.root / "in",)


def _vocab_tokenizer(d: Path, n: int = 128) -> None:
    (d / "tokenizer.json").write_text(json.dumps({"model": {"type": "BPE", "vocab": {f"t{i}": i for i in range(n)}}}))


def _write_cfg(path: Path, method: str, models: list, base: Path | None = None, **extra) -> Path:
    data = {"merge_method": method, "models": [{"model": str(m)} for m in models], **extra}
    if base is not None:
        data["base_model"] = str(base)
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> World:
    from conftest import make_tiny_model, perturb_model

    root = tmp_path_factory.mktemp("world")
    i = root / "in"
    base = make_tiny_model(i / "base", seed=0)
    _vocab_tokenizer(base)
    expert = perturb_model(base, i / "expert", scale=0.05, seed=3)
    wide = make_tiny_model(i / "wide", seed=1, intermediate_size=96)
    narrow = make_tiny_model(i / "narrow", seed=1, hidden_size=32, num_attention_heads=2, num_key_value_heads=1)
    gpt2 = make_tiny_model(i / "gpt2", family="gpt2", seed=1)
    cfg = _write_cfg(i / "linear.yaml", "linear", [base, expert])
    seme_cfg = _write_cfg(i / "seme.yaml", "seme", [base, expert], base=base)
    merged, al = i / "merged", i / "align"
    r = run_seme_inproc(["-q", "merge", cfg, merged])
    assert r.rc == 0, r
    r = run_seme_inproc(["-q", "align", seme_cfg, al])
    assert r.rc == 0, r
    unrelated = i / "unrelated"
    unrelated.mkdir()
    (unrelated / "notes.txt").write_text("a user's file that no seme run may touch\n")
    return World(root, base, expert, wide, narrow, gpt2, merged, al, seme_cfg, unrelated)


# ------------------------------------------------------------------------------------------------
# Building bad inputs
# ------------------------------------------------------------------------------------------------


def copy_model(src: Path, d: Path, name: str = "bad") -> Path:
    dst = d / name
    shutil.copytree(src, dst, symlinks=True)
    return dst


def read_st(path: Path) -> tuple[dict, bytes]:
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def write_st(path: Path, header: dict | bytes, data: bytes) -> None:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


def edit_config(m: Path, **kv) -> None:
    cfg = json.loads((m / "config.json").read_text())
    for k, v in kv.items():
        if v is _DEL:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (m / "config.json").write_text(json.dumps(cfg))


_DEL = object()


def set_tensor(m: Path, name: str, value: float) -> None:
    """Put ``value`` into the first entry of float32 tensor ``name`` of m/model.safetensors."""
    f = m / "model.safetensors"
    header, data = read_st(f)
    b = header[name]["data_offsets"][0]
    assert header[name]["dtype"] == "F32"
    data = data[:b] + struct.pack("<f", value) + data[b + 4 :]
    write_st(f, header, data)


def split_into_two(m: Path, same_names: bool = False) -> tuple[Path, Path]:
    """Split model.safetensors into two shards (no index); ``same_names``: both hold every tensor."""
    from safetensors.torch import load_file, save_file

    sd = load_file(m / "model.safetensors")
    (m / "model.safetensors").unlink()
    names = sorted(sd)
    a, b = m / "model-a.safetensors", m / "model-b.safetensors"
    if same_names:
        save_file(sd, a)
        save_file(sd, b)
    else:
        save_file({k: sd[k] for k in names[: len(names) // 2]}, a)
        save_file({k: sd[k] for k in names[len(names) // 2 :]}, b)
    return a, b


def to_index(m: Path, weight_map) -> Path:
    """Replace model.safetensors by shard.safetensors plus an index whose weight_map is given
    (a callable gets the real map and returns the one to write)."""
    header, _ = read_st(m / "model.safetensors")
    (m / "model.safetensors").rename(m / "shard.safetensors")
    real = {k: "shard.safetensors" for k in header if k != "__metadata__"}
    wm = weight_map(real) if callable(weight_map) else weight_map
    idx = m / "model.safetensors.index.json"
    idx.write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    return idx


# ------------------------------------------------------------------------------------------------
# Cases
# ------------------------------------------------------------------------------------------------


@dataclass
class Spec:
    argv: list
    names: list[str] = field(default_factory=list)
    out: Path | None = None
    cwd: Path | None = None
    process: bool = False  # a real `python -m seme` (hangs, cwd, signals)
    rc: int | None = None


CASES: dict[str, Callable[[Path, World], Spec]] = {}


def case(name: str):
    def deco(fn):
        assert name not in CASES, name
        CASES[name] = fn
        return fn
    return deco


def merge_with(d: Path, w: World, bad: Path, names: list[str] | None = None, method: str = "linear",
               base: Path | None = None, extra_args: tuple = (), **cfg_extra) -> Spec:
    """``seme merge`` of the good base with ``bad``; the error must name ``names`` (default: ``bad``)."""
    cfg = _write_cfg(d / "cfg.yaml", method, [w.base, bad], base=base, **cfg_extra)
    out = d / "out"
    return Spec(["merge", cfg, out, *extra_args], names if names is not None else [str(bad)], out=out)


def raw_config(text: str | bytes, *names: str, process: bool = False):
    """A merge config file with exactly this content; the error must name the file and ``names``."""
    def build(d: Path, w: World) -> Spec:
        p = d / "cfg.yaml"
        body = text.format(base=w.base, expert=w.expert) if isinstance(text, str) else text
        p.write_bytes(body.encode() if isinstance(body, str) else body)
        want = list(names) if names and names[0].startswith("/") else [str(p), *names]  # another file's fault
        return Spec(["merge", p, d / "out"], want, out=d / "out", process=process)
    return build


# -- merge config ------------------------------------------------------------------------------

_GOOD = "merge_method: linear\nmodels:\n  - model: {base}\n  - model: {expert}\n"
_BASE = "base_model: {base}\n"
CONFIG_TEXT = {
    "cfg-non-utf8": (b"merge_method: linear\nmodels: [{model: caf\xe9}]\n", "UTF-8"),
    "cfg-utf16-bom": ("merge_method: linear".encode("utf-16"), "UTF-8"),
    "cfg-binary-garbage": (bytes(range(256)) * 4, None),
    "cfg-nul-bytes": (b"merge_method: linear\x00\x00\n", None),
    "cfg-deep-list-5000": ("models: " + "[" * 5000 + "]" * 5000 + "\n", None),
    "cfg-deep-map-5000": ("models: " + "{{a: " * 5000 + "1" + "}}" * 5000 + "\n", None),
    "cfg-deep-block-600": ("".join("  " * i + f"k{i}:\n" for i in range(600)) + "  " * 600 + "x\n", None),
    "cfg-alias-bomb": ("a: &a [x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
    ) + "merge_method: linear\nmodels: *i\n", "alias"),
    "cfg-alias-small-bomb": ("a: &a [x,x,x,x,x,x,x,x,x,x]\n" + "".join(
        f"{c}: &{c} [{','.join(['*' + p] * 10)}]\n" for p, c in zip("abcd", "bcde")
    ) + "merge_method: linear\nmodels: *e\n", None),
    "cfg-empty": ("", None),
    "cfg-only-comment": ("# nothing here\n", None),
    "cfg-top-list": ("- merge_method: linear\n", "mapping"),
    "cfg-top-scalar": ("linear\n", "mapping"),
    "cfg-invalid-yaml": ("merge_method: linear\nmodels: [unclosed\n", "YAML"),
    "cfg-tab-indent": ("merge_method: linear\nmodels:\n\t- model: x\n", "YAML"),
    "cfg-two-documents": (_GOOD + "---\n" + _GOOD, "YAML"),
    "cfg-unknown-key": (_GOOD + "mergemethod: ties\n", "mergemethod"),
    "cfg-missing-method": ("models:\n  - model: {base}\n", "merge_method"),
    "cfg-missing-models": ("merge_method: linear\n", "models"),
    "cfg-models-empty": ("merge_method: linear\nmodels: []\n", "models"),
    "cfg-models-string": ("merge_method: linear\nmodels: {base}\n", "models"),
    "cfg-models-entry-int": ("merge_method: linear\nmodels: [5]\n", "models"),
    "cfg-model-missing-key": ("merge_method: linear\nmodels:\n  - parameters: {{weight: 1}}\n", "model"),
    "cfg-model-path-list": ("merge_method: linear\nmodels:\n  - model: [a, b]\n", "model"),
    "cfg-unknown-method": ("merge_method: blend9\nmodels:\n  - model: {base}\n", "blend9"),
    "cfg-method-int": ("merge_method: 7\nmodels:\n  - model: {base}\n", "merge_method"),
    "cfg-unknown-param": (_GOOD + "parameters: {{wieght: 1}}\n", "wieght"),
    "cfg-unknown-model-param": ("merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{denisty: 1}}\n",
                                "denisty"),
    "cfg-parameters-list": (_GOOD + "parameters: [1, 2]\n", "parameters"),
    "cfg-dtype-bad": (_GOOD + "dtype: float8\n", "float8"),
    "cfg-out-dtype-bad": (_GOOD + "out_dtype: int4\n", "int4"),
    "cfg-dtype-list": (_GOOD + "dtype: [float32]\n", "dtype"),
    "cfg-shard-inf": (_GOOD + "out_shard_size: infGB\n", "out_shard_size"),
    "cfg-shard-nan": (_GOOD + "out_shard_size: nanGB\n", "out_shard_size"),
    "cfg-shard-yaml-inf": (_GOOD + "out_shard_size: .inf\n", "out_shard_size"),
    "cfg-shard-list": (_GOOD + "out_shard_size: [1GB]\n", "out_shard_size"),
    "cfg-shard-negative": (_GOOD + "out_shard_size: -5\n", "out_shard_size"),
    "cfg-shard-negative-str": (_GOOD + "out_shard_size: -5MB\n", "out_shard_size"),
    "cfg-shard-zero": (_GOOD + "out_shard_size: 0\n", "out_shard_size"),
    "cfg-shard-word": (_GOOD + "out_shard_size: big\n", "out_shard_size"),
    "cfg-shard-bool": (_GOOD + "out_shard_size: true\n", "out_shard_size"),
    "cfg-shard-huge": (_GOOD + "out_shard_size: 1e300GB\n", "out_shard_size"),
    "cfg-seed-string": (_GOOD + "seed: lucky\n", "seed"),
    "cfg-seed-float": (_GOOD + "seed: 1.5\n", "seed"),
    "cfg-registry-unknown": (_GOOD + "registry: {{nmae: x}}\n", "nmae"),
    "cfg-model-missing-dir": ("merge_method: linear\nmodels:\n  - model: {base}\n  - model: /nonexistent/m\n",
                              "/nonexistent/m"),
    "cfg-base-missing-dir": ("merge_method: ties\nbase_model: /nonexistent/b\nmodels:\n  - model: {base}\n",
                             "/nonexistent/b"),
    "cfg-ties-no-base": ("merge_method: ties\nmodels:\n  - model: {base}\n", "base_model"),
    "cfg-slerp-no-t": ("merge_method: slerp\n" + _BASE + "models:\n  - model: {base}\n  - model: {expert}\n", "t"),
}
for _n, (_text, _name) in CONFIG_TEXT.items():
    case(_n)(raw_config(_text, *([_name] if _name else [])))

# parameter values that only a merge can reject (they are resolved per tensor)
PARAM_VALUES = {
    "param-weight-string": ("linear", None, "parameters: {{weight: heavy}}\n", "weight"),
    "param-weight-nan": ("linear", None, "parameters: {{weight: .nan}}\n", "weight"),
    "param-weight-inf": ("linear", None, "parameters: {{weight: .inf}}\n", "weight"),
    "param-weight-dict": ("linear", None, "parameters: {{weight: {{a: 1}}}}\n", "weight"),
    "param-weight-zero-sum": ("linear", None, "parameters: {{weight: 0}}\n", None),
    "param-mixed-list": ("linear", None, "parameters: {{weight: [1, {{filter: x, value: 2}}]}}\n", None),
    "param-empty-list": ("linear", None, "parameters: {{weight: []}}\n", None),
    "param-density-2": ("ties", True, "parameters: {{density: 2, weight: 1}}\n", "density"),
    "param-density-string": ("ties", True, "parameters: {{density: half, weight: 1}}\n", "density"),
    "param-slerp-t-string": ("slerp", True, "parameters: {{t: middle}}\n", "t"),
    "param-normalize-string": ("linear", None, "parameters: {{normalize: maybe}}\n", "normalize"),
}


def _param_case(method: str, needs_base: bool | None, params: str, name: str | None):
    text = f"merge_method: {method}\n" + (_BASE if needs_base else "") + \
        "models:\n  - model: {base}\n  - model: {expert}\n" + params
    return raw_config(text, *([name] if name else []))


for _n, _v in PARAM_VALUES.items():
    case(_n)(_param_case(*_v))


@case("cfg-is-fifo")
def _(d, w):
    p = d / "cfg.yaml"
    os.mkfifo(p)
    return Spec(["merge", p, d / "out"], [str(p), "regular file"], out=d / "out", process=True)


@case("cfg-is-directory")
def _(d, w):
    p = d / "cfg.yaml"
    p.mkdir()
    return Spec(["merge", p, d / "out"], [str(p)], out=d / "out")


@case("cfg-too-large")
def _(d, w):
    p = d / "cfg.yaml"
    p.write_text(_GOOD.format(base=w.base, expert=w.expert) + "# " + "x" * (2 << 20) + "\n")
    return Spec(["merge", p, d / "out"], [str(p), "larger"], out=d / "out")


@case("cfg-missing-file")
def _(d, w):
    return Spec(["merge", d / "none.yaml", d / "out"], [str(d / "none.yaml")], out=d / "out", rc=2)


@case("cfg-dangling-symlink")
def _(d, w):
    p = d / "cfg.yaml"
    p.symlink_to(d / "gone.yaml")
    return Spec(["merge", p, d / "out"], [str(p)], out=d / "out")


@case("cfg-tokenizer-source-missing")
def _(d, w):
    return merge_with(d, w, w.expert, names=["/nonexistent/tok"], tokenizer_source="/nonexistent/tok")


# -- checkpoints: config.json ------------------------------------------------------------------


def bad_model(mutate: Callable[[Path], object], names: Callable[[Path], list[str]] | None = None,
              process: bool = False, cmd: str = "merge"):
    """A copy of the expert, mutated, merged with the base (``cmd="inspect"``: inspected)."""
    def build(d: Path, w: World) -> Spec:
        m = copy_model(w.expert, d)
        mutate(m)
        want = names(m) if names else [str(m)]
        if cmd == "inspect":
            return Spec(["inspect", m], want, process=process)
        s = merge_with(d, w, m, names=want)
        s.process = process
        return s
    return build


def _cfg_file(m: Path) -> list[str]:
    return [str(m / "config.json")]


def _st_file(m: Path) -> list[str]:
    return [str(m / "model.safetensors")]


CONFIG_JSON = {
    "ckpt-config-missing": (lambda m: (m / "config.json").unlink(), _cfg_file),
    "ckpt-config-list": (lambda m: (m / "config.json").write_text("[1, 2, 3]"), _cfg_file),
    "ckpt-config-string": (lambda m: (m / "config.json").write_text('"llama"'), _cfg_file),
    "ckpt-config-null": (lambda m: (m / "config.json").write_text("null"), _cfg_file),
    "ckpt-config-invalid-json": (lambda m: (m / "config.json").write_text("{model_type: llama"), _cfg_file),
    "ckpt-config-non-utf8": (lambda m: (m / "config.json").write_bytes(b'{"model_type": "ll\xe9ma"}'), _cfg_file),
    "ckpt-config-deep": (lambda m: (m / "config.json").write_text("[" * 100000 + "]" * 100000), _cfg_file),
    "ckpt-config-empty": (lambda m: (m / "config.json").write_text(""), _cfg_file),
    "ckpt-config-directory": (lambda m: ((m / "config.json").unlink(), (m / "config.json").mkdir()), _cfg_file),
    "ckpt-hidden-size-string": (lambda m: edit_config(m, hidden_size="big"), lambda m: [str(m), "hidden_size"]),
    "ckpt-hidden-size-negative": (lambda m: edit_config(m, hidden_size=-64), lambda m: [str(m), "hidden_size"]),
    "ckpt-hidden-size-float": (lambda m: edit_config(m, hidden_size=64.5), lambda m: [str(m), "hidden_size"]),
    "ckpt-hidden-size-missing": (lambda m: edit_config(m, hidden_size=_DEL), lambda m: [str(m), "hidden_size"]),
    "ckpt-layers-40": (lambda m: edit_config(m, num_hidden_layers=40), lambda m: [str(m), "num_hidden_layers"]),
    "ckpt-layers-1": (lambda m: edit_config(m, num_hidden_layers=1), lambda m: [str(m), "num_hidden_layers"]),
    "ckpt-layers-string": (lambda m: edit_config(m, num_hidden_layers="two"), lambda m: [str(m), "num_hidden_layers"]),
    "ckpt-layers-bool": (lambda m: edit_config(m, num_hidden_layers=True), lambda m: [str(m), "num_hidden_layers"]),
    "ckpt-heads-zero": (lambda m: edit_config(m, num_attention_heads=0), lambda m: [str(m), "num_attention_heads"]),
    "ckpt-vocab-size-string": (lambda m: edit_config(m, vocab_size="many"), lambda m: [str(m), "vocab_size"]),
    "ckpt-model-type-other": (lambda m: edit_config(m, model_type="gpt2"), lambda m: [str(m)]),
}
for _n, (_mut, _names) in CONFIG_JSON.items():
    case(_n)(bad_model(_mut, _names))

# -- checkpoints: weights ----------------------------------------------------------------------


def _truncate(frac: float):
    def mut(m: Path) -> None:
        f = m / "model.safetensors"
        raw = f.read_bytes()
        f.write_bytes(raw[: int(len(raw) * frac)])
    return mut


def _header_edit(fn: Callable[[dict], object]):
    def mut(m: Path) -> None:
        f = m / "model.safetensors"
        header, data = read_st(f)
        fn(header)
        write_st(f, header, data)
    return mut


def _first_tensor(h: dict) -> str:
    return min(k for k in h if k != "__metadata__")


def _retype(h: dict) -> None:
    h[_first_tensor(h)]["dtype"] = "Q4"


def _reshape(h: dict) -> None:
    h[_first_tensor(h)]["shape"] = [3, 3]


def _offsets(h: dict) -> None:
    k = _first_tensor(h)
    b, e = h[k]["data_offsets"]
    h[k]["data_offsets"] = [b, e - 4]


def _tensor_entry(h: dict) -> None:
    h[_first_tensor(h)] = "F32"


def _fifo(rel: str):
    def mut(m: Path) -> None:
        (m / rel).unlink()
        os.mkfifo(m / rel)
    return mut


def _nan(value: float):
    return lambda m: set_tensor(m, "model.layers.1.mlp.down_proj.weight", value)


def _pickle_only(m: Path) -> None:
    import torch
    from safetensors.torch import load_file

    torch.save(load_file(m / "model.safetensors"), m / "pytorch_model.bin")
    (m / "model.safetensors").unlink()


def _drop_tensor(name: str):
    def mut(m: Path) -> None:
        from safetensors.torch import load_file, save_file

        sd = load_file(m / "model.safetensors")
        del sd[name]
        save_file(sd, m / "model.safetensors")
    return mut


def _add_tensor(m: Path) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    sd = load_file(m / "model.safetensors")
    sd["model.extra.weight"] = torch.zeros(4)
    save_file(sd, m / "model.safetensors")


def _int_weights(m: Path) -> None:
    from safetensors.torch import load_file, save_file

    sd = load_file(m / "model.safetensors")
    sd["model.norm.weight"] = sd["model.norm.weight"].to(dtype=__import__("torch").int32)
    save_file(sd, m / "model.safetensors")


WEIGHTS = {
    "st-truncated-half": (_truncate(0.5), _st_file),
    "st-truncated-header": (_truncate(0.001), _st_file),
    "st-empty-file": (lambda m: (m / "model.safetensors").write_bytes(b""), _st_file),
    "st-seven-bytes": (lambda m: (m / "model.safetensors").write_bytes(b"\x01" * 7), _st_file),
    "st-header-length-huge": (lambda m: (m / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 60) + b"{}"),
                              _st_file),
    "st-header-not-json": (lambda m: write_st(m / "model.safetensors", b"not json at all!", b""), _st_file),
    "st-header-list": (lambda m: write_st(m / "model.safetensors", b"[1,2,3]", b""), _st_file),
    "st-header-non-utf8": (lambda m: write_st(m / "model.safetensors", b'{"\xff": 1}', b""), _st_file),
    "st-dtype-unknown": (_header_edit(_retype), _st_file),
    "st-shape-mismatch": (_header_edit(_reshape), _st_file),
    "st-offsets-short": (_header_edit(_offsets), _st_file),
    "st-entry-not-object": (_header_edit(_tensor_entry), _st_file),
    "st-trailing-garbage": (lambda m: (m / "model.safetensors").write_bytes(
        (m / "model.safetensors").read_bytes() + b"junk"), _st_file),
    "st-fifo": (_fifo("model.safetensors"), lambda m: [str(m / "model.safetensors"), "regular file"]),
    "st-directory": (lambda m: ((m / "model.safetensors").unlink(), (m / "model.safetensors").mkdir()),
                     _st_file),
    "st-dangling-symlink": (lambda m: ((m / "model.safetensors").unlink(),
                                       (m / "model.safetensors").symlink_to(m / "gone.safetensors")), _st_file),
    "st-symlink-loop": (lambda m: ((m / "model.safetensors").unlink(),
                                   (m / "model.safetensors").symlink_to(m / "model.safetensors")), _st_file),
    "st-symlink-to-dev-zero": (lambda m: ((m / "model.safetensors").unlink(),
                                          (m / "model.safetensors").symlink_to("/dev/zero")),
                               lambda m: [str(m / "model.safetensors"), "regular file"]),
    "st-no-weights": (lambda m: (m / "model.safetensors").unlink(), lambda m: [str(m)]),
    "st-nan": (_nan(float("nan")), lambda m: ["model.layers.1.mlp.down_proj.weight", "NaN"]),
    "st-inf": (_nan(float("inf")), lambda m: ["model.layers.1.mlp.down_proj.weight", "Inf"]),
    "st-neg-inf": (_nan(float("-inf")), lambda m: ["model.layers.1.mlp.down_proj.weight", "Inf"]),
    "st-pickle-refused": (_pickle_only, lambda m: [str(m / "pytorch_model.bin"), "--allow-pickle"]),
    "st-missing-tensor": (_drop_tensor("model.layers.0.mlp.up_proj.weight"),
                          lambda m: ["model.layers.0.mlp.up_proj.weight", str(m)]),
    "st-extra-tensor": (_add_tensor, lambda m: ["model.extra.weight", str(m)]),
    "st-int-weights": (_int_weights, lambda m: ["model.norm.weight"]),
    "st-two-shards-same-names": (lambda m: split_into_two(m, same_names=True),
                                 lambda m: [str(m / "model-a.safetensors"), str(m / "model-b.safetensors")]),
}
for _n, (_mut, _names) in WEIGHTS.items():
    case(_n)(bad_model(_mut, _names, process="fifo" in _n or "dev-zero" in _n))

def _pickle_allowed(payload: Callable[[Path], object], names: Callable[[Path], list[str]]):
    """A pickle checkpoint that --allow-pickle still must not load (corrupt, or code to run)."""
    def build(d: Path, w: World) -> Spec:
        m = copy_model(w.expert, d)
        (m / "model.safetensors").unlink()
        payload(m)
        s = merge_with(d, w, m, names=names(m), extra_args=("--allow-pickle",))
        return s
    return build


class _RunsCode:
    """Unpickling this would create a file next to the checkpoint (weights_only must refuse it)."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.mkdir, (self.target,))


def _code_pickle(m: Path) -> None:
    import pickle

    with open(m / "pytorch_model.bin", "wb") as f:
        pickle.dump({"model.norm.weight": _RunsCode(str(m / "PWNED"))}, f)


case("st-pickle-corrupt-allowed")(_pickle_allowed(
    lambda m: (m / "pytorch_model.bin").write_bytes(b"\x80\x04garbage"), lambda m: [str(m / "pytorch_model.bin")]))
case("st-pickle-runs-code-allowed")(_pickle_allowed(_code_pickle, lambda m: [str(m / "pytorch_model.bin")]))


@case("cfg-model-is-a-file")
def _(d, w):
    return merge_with(d, w, w.base / "config.json", names=[str(w.base / "config.json")])


@case("inspect-config-fifo")
def _(d, w):
    m = copy_model(w.expert, d)
    _fifo("config.json")(m)
    return Spec(["inspect", m], [str(m / "config.json"), "regular file"], process=True)


# -- checkpoints: index ------------------------------------------------------------------------


def _idx_file(m: Path) -> list[str]:
    return [str(m / "model.safetensors.index.json")]


INDEX = {
    "idx-weight-map-list": (lambda m: to_index(m, lambda wm: list(wm.values())), _idx_file),
    "idx-weight-map-ints": (lambda m: to_index(m, lambda wm: {k: 1 for k in wm}), _idx_file),
    "idx-weight-map-null": (lambda m: to_index(m, None), _idx_file),
    "idx-weight-map-empty": (lambda m: to_index(m, {}), _idx_file),
    "idx-shard-dotdot": (lambda m: to_index(m, lambda wm: {k: "../x.safetensors" for k in wm}),
                         lambda m: [str(m / "model.safetensors.index.json"), "../x.safetensors"]),
    "idx-shard-dotdot-real": (lambda m: (to_index(m, lambda wm: {k: "../evil.safetensors" for k in wm}),
                                         shutil.copyfile(m / "shard.safetensors", m.parent / "evil.safetensors")),
                              lambda m: [str(m / "model.safetensors.index.json"), "outside"]),
    "idx-shard-absolute": (lambda m: to_index(m, lambda wm: {k: str(m / "shard.safetensors") for k in wm}),
                           lambda m: [str(m / "model.safetensors.index.json"), "outside"]),
    "idx-shard-nested-dotdot": (lambda m: to_index(m, lambda wm: {k: "sub/../../x.safetensors" for k in wm}),
                                lambda m: [str(m / "model.safetensors.index.json"), "outside"]),
    "idx-shard-missing": (lambda m: to_index(m, lambda wm: {k: "gone.safetensors" for k in wm}),
                          lambda m: [str(m / "gone.safetensors")]),
    "idx-tensor-not-in-shard": (lambda m: to_index(m, lambda wm: {**wm, "model.ghost.weight": "shard.safetensors"}),
                                lambda m: ["model.ghost.weight"]),
    "idx-invalid-json": (lambda m: (to_index(m, {}), (m / "model.safetensors.index.json").write_text("{")),
                         _idx_file),
    "idx-top-list": (lambda m: (to_index(m, {}), (m / "model.safetensors.index.json").write_text("[]")), _idx_file),
    "idx-shard-fifo": (lambda m: (to_index(m, lambda wm: wm), _fifo("shard.safetensors")(m)),
                       lambda m: [str(m / "shard.safetensors"), "regular file"]),
    "idx-is-fifo": (lambda m: (to_index(m, {}), _fifo("model.safetensors.index.json")(m)), _idx_file),
}
for _n, (_mut, _names) in INDEX.items():
    case(_n)(bad_model(_mut, _names, process="fifo" in _n))

# -- inspect -----------------------------------------------------------------------------------

INSPECT = {
    "inspect-config-list": (CONFIG_JSON["ckpt-config-list"][0], _cfg_file),
    "inspect-hidden-size-string": CONFIG_JSON["ckpt-hidden-size-string"],
    "inspect-layers-40": CONFIG_JSON["ckpt-layers-40"],
    "inspect-truncated": WEIGHTS["st-truncated-half"],
    "inspect-fifo": WEIGHTS["st-fifo"],
    "inspect-two-shards-same-names": WEIGHTS["st-two-shards-same-names"],
    "inspect-idx-dotdot": INDEX["idx-shard-dotdot-real"],
    "inspect-idx-absolute": INDEX["idx-shard-absolute"],
    "inspect-idx-weight-map-list": INDEX["idx-weight-map-list"],
    "inspect-idx-weight-map-ints": INDEX["idx-weight-map-ints"],
    "inspect-pickle-refused": WEIGHTS["st-pickle-refused"],
}
for _n, (_mut, _names) in INSPECT.items():
    case(_n)(bad_model(_mut, _names, cmd="inspect", process="fifo" in _n))


@case("inspect-missing-dir")
def _(d, w):
    return Spec(["inspect", d / "nothing"], [str(d / "nothing")])


@case("inspect-a-file")
def _(d, w):
    return Spec(["inspect", w.base / "config.json"], [str(w.base / "config.json")])


# -- mismatched models -------------------------------------------------------------------------


@case("mix-intermediate-size")
def _(d, w):
    return merge_with(d, w, w.wide, names=["shape", str(w.wide)])


@case("mix-hidden-size")
def _(d, w):
    return merge_with(d, w, w.narrow, names=["hidden size", str(w.narrow)])


@case("mix-family")
def _(d, w):
    return merge_with(d, w, w.gpt2, names=[str(w.gpt2)])


@case("mix-gta-base-wide")
def _(d, w):
    return merge_with(d, w, w.expert, method="ties", base=w.wide, names=[str(w.wide)])


# -- output directory --------------------------------------------------------------------------


def _linear_cfg(d: Path, w: World) -> Path:
    return _write_cfg(d / "cfg.yaml", "linear", [w.base, w.expert])


@case("out-exists")
def _(d, w):
    out = d / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    return Spec(["merge", _linear_cfg(d, w), out], [str(out), "already exists"])


@case("out-overwrite-user-dir")
def _(d, w):
    out = d / "out"
    out.mkdir()
    (out / "mine.txt").write_text("keep")
    return Spec(["merge", _linear_cfg(d, w), out, "--overwrite"], [str(out), "not a finished seme output"])


@case("out-overwrite-input-model")
def _(d, w):
    return Spec(["merge", _linear_cfg(d, w), w.expert, "--overwrite"], [str(w.expert)])


@case("out-overwrite-inputs-parent")
def _(d, w):
    return Spec(["merge", _linear_cfg(d, w), w.root / "in", "--overwrite"], [str(w.root / "in")])


@case("out-overwrite-seme-input")
def _(d, w):  # a finished seme output that is also an input of this merge
    cfg = _write_cfg(d / "cfg.yaml", "linear", [w.base, w.merged])
    return Spec(["merge", cfg, w.merged, "--overwrite"], [str(w.merged), "input"])


@case("out-overwrite-config-dir")
def _(d, w):  # the config file lives inside the seme output to be replaced
    prev = copy_model(w.merged, d, "prev")
    cfg = _write_cfg(prev / "cfg.yaml", "linear", [w.base, w.expert])
    return Spec(["merge", cfg, prev, "--overwrite"], [str(prev), "input"])


@case("out-overwrite-alignment-input")
def _(d, w):
    cfg = _write_cfg(d / "cfg.yaml", "seme", [w.base, w.expert], base=w.base)
    return Spec(["merge", cfg, w.align, "--alignment", w.align, "--overwrite"], [str(w.align), "input"])


@case("out-overwrite-cwd")
def _(d, w):
    prev = copy_model(w.merged, d, "prev")
    cfg = _linear_cfg(d, w)
    return Spec(["merge", cfg, ".", "--overwrite"], [str(prev), "current directory"], cwd=prev, process=True)


@case("out-overwrite-cwd-ancestor")
def _(d, w):
    prev = copy_model(w.merged, d, "prev")
    (prev / "sub").mkdir()
    return Spec(["merge", _linear_cfg(d, w), "..", "--overwrite"], [str(prev), "current directory"],
                cwd=prev / "sub", process=True)


@case("out-overwrite-regular-file")
def _(d, w):
    f = d / "out"
    f.write_text("a file")
    return Spec(["merge", _linear_cfg(d, w), f, "--overwrite"], [str(f), "not a directory"])


@case("out-overwrite-symlink")
def _(d, w):
    prev = copy_model(w.merged, d, "prev")
    link = d / "out"
    link.symlink_to(prev)
    return Spec(["merge", _linear_cfg(d, w), link, "--overwrite"], [str(link), "symlink"])


@case("out-overwrite-fake-manifest")
def _(d, w):
    out = d / "out"
    out.mkdir()
    (out / "seme_manifest.json").write_text("not json, not seme's")
    (out / "mine.txt").write_text("keep")
    return Spec(["merge", _linear_cfg(d, w), out, "--overwrite"], [str(out), "not a finished seme output"])


@case("out-overwrite-home-like")
def _(d, w):
    home = d / "home"
    (home / "work").mkdir(parents=True)
    (home / ".bashrc").write_text("export X=1\n")
    return Spec(["merge", _linear_cfg(d, w), home, "--overwrite"], [str(home)])


@case("out-parent-is-file")
def _(d, w):
    f = d / "file"
    f.write_text("x")
    return Spec(["merge", _linear_cfg(d, w), f / "out"], [str(f)])


@case("align-overwrite-input-model")
def _(d, w):
    return Spec(["align", w.seme_cfg, w.expert, "--overwrite"], [str(w.expert)])


# -- alignment artifact ------------------------------------------------------------------------


def alignment_case(mutate: Callable[[Path], object], names: Callable[[Path], list[str]], process: bool = False):
    def build(d: Path, w: World) -> Spec:
        al = copy_model(w.align, d, "al")
        mutate(al)
        out = d / "out"
        return Spec(["merge", w.seme_cfg, out, "--alignment", al], names(al), out=out, process=process)
    return build


def _flip_byte(al: Path) -> None:
    f = al / "alignment.safetensors"
    raw = bytearray(f.read_bytes())
    raw[-3] ^= 0x55
    f.write_bytes(bytes(raw))


def _swap_tensors(al: Path) -> None:  # a valid file, other content (e.g. out-of-range token ids)
    import torch
    from safetensors.torch import load_file, save_file

    t = load_file(al / "alignment.safetensors")
    t["tokens"] = torch.full_like(t["tokens"], 10**6)
    save_file(t, al / "alignment.safetensors")


def _edit_meta(**kv):
    def mut(al: Path) -> None:
        meta = json.loads((al / "alignment.json").read_text())
        for k, v in kv.items():
            if v is _DEL:
                meta.pop(k, None)
            else:
                meta[k] = v
        (al / "alignment.json").write_text(json.dumps(meta))
    return mut


def _al_st(al: Path) -> list[str]:
    return [str(al / "alignment.safetensors")]


def _al_js(al: Path) -> list[str]:
    return [str(al / "alignment.json")]


ALIGN = {
    "al-tensors-byte-flipped": (_flip_byte, _al_st),
    "al-tensors-replaced": (_swap_tensors, _al_st),
    "al-tensors-truncated": (lambda al: (al / "alignment.safetensors").write_bytes(
        (al / "alignment.safetensors").read_bytes()[:100]), _al_st),
    "al-tensors-missing": (lambda al: (al / "alignment.safetensors").unlink(), lambda al: [str(al)]),
    "al-tensors-fifo": (lambda al: ((al / "alignment.safetensors").unlink(), os.mkfifo(al / "alignment.safetensors")),
                        lambda al: [str(al)]),
    "al-json-no-digest": (_edit_meta(tensors_sha256=_DEL), _al_js),
    "al-json-wrong-digest": (_edit_meta(tensors_sha256="0" * 64), _al_st),
    "al-json-version-9": (_edit_meta(format_version=9), _al_js),
    "al-json-invalid": (lambda al: (al / "alignment.json").write_text("{"), _al_js),
    "al-json-list": (lambda al: (al / "alignment.json").write_text("[]"), _al_js),
    "al-json-missing": (lambda al: (al / "alignment.json").unlink(), lambda al: [str(al)]),
}
for _n, (_mut, _names) in ALIGN.items():
    case(_n)(alignment_case(_mut, _names, process="fifo" in _n))


@case("al-dir-missing")
def _(d, w):
    return Spec(["merge", w.seme_cfg, d / "out", "--alignment", d / "none"], [str(d / "none")], out=d / "out")


@case("al-with-linear")
def _(d, w):
    return Spec(["merge", _linear_cfg(d, w), d / "out", "--alignment", w.align], ["--alignment"], out=d / "out")


@case("align-linear-config")
def _(d, w):
    return Spec(["align", _linear_cfg(d, w), d / "al"], ["seme"], out=d / "al")


def _vocab_model(tok: str | dict | list):
    def build(d: Path, w: World) -> Spec:
        m = copy_model(w.expert, d)
        (m / "tokenizer.json").write_text(tok if isinstance(tok, str) else json.dumps(tok))
        cfg = _write_cfg(d / "cfg.yaml", "seme", [w.base, m], base=w.base)
        return Spec(["align", cfg, d / "al"], [str(m / "tokenizer.json")], out=d / "al")
    return build


VOCAB = {
    "vocab-list-of-ints": {"model": {"vocab": list(range(128))}},
    "vocab-string": {"model": {"vocab": "abc"}},
    "vocab-ids-strings": {"model": {"vocab": {f"t{i}": str(i) for i in range(128)}}},
    "vocab-top-list": [1, 2, 3],
    "vocab-invalid-json": "{",
    "vocab-added-token-bad": {"model": {"vocab": {"t0": 0}}, "added_tokens": [{"id": 5}]},
}
for _n, _tok in VOCAB.items():
    case(_n)(_vocab_model(_tok))

# -- eval --------------------------------------------------------------------------------------


@case("eval-data-free-wide-source")
def _(d, w):
    return Spec(["eval", w.base, "--data-free", "--sources", w.wide], ["shape", str(w.wide)])


@case("eval-data-free-other-family")
def _(d, w):
    return Spec(["eval", w.base, "--data-free", "--sources", w.gpt2], [str(w.gpt2)])


@case("eval-data-free-narrow")
def _(d, w):
    return Spec(["eval", w.base, "--data-free", "--sources", w.narrow], [str(w.narrow)])


@case("eval-data-free-no-sources")
def _(d, w):
    return Spec(["eval", w.base, "--data-free"], ["--sources"])


@case("eval-data-free-bad-model")
def _(d, w):
    m = copy_model(w.expert, d)
    (m / "config.json").write_text("[]")
    return Spec(["eval", m, "--data-free", "--sources", w.base], [str(m / "config.json")])


@case("eval-no-suite")
def _(d, w):
    return Spec(["eval", w.base], ["--suite"])


# ------------------------------------------------------------------------------------------------
# The test
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(CASES))
def test_bad_local_input(name: str, world: World, tmp_path: Path) -> None:
    d = tmp_path / "case"
    d.mkdir()
    spec = CASES[name](d, world)
    roots = (*world.roots(), d)
    before = snapshot(*roots)
    argv = ["-q", *spec.argv]
    if spec.process:
        r = run_seme(argv, cwd=spec.cwd, timeout=60)
    else:
        assert spec.cwd is None
        r = run_seme_inproc(argv)
    assert_clean_failure(r, names=spec.names, out=spec.out, before=before, roots=roots, rc=spec.rc)


#: one case per kind, run again as a real ``python -m seme`` process: the in-process runs above must
#: not hide what only a process shows (exit status, stderr as printed, imports, signal handlers)
AS_PROCESS = ("cfg-alias-bomb", "cfg-deep-list-5000", "cfg-non-utf8", "param-weight-string", "ckpt-config-list",
              "ckpt-layers-40", "st-nan", "st-truncated-half", "idx-shard-dotdot-real", "out-overwrite-input-model",
              "al-tensors-byte-flipped", "inspect-config-list")


@pytest.mark.parametrize("name", AS_PROCESS)
def test_bad_local_input_as_process(name: str, world: World, tmp_path: Path) -> None:
    d = tmp_path / "case"
    d.mkdir()
    spec = CASES[name](d, world)
    roots = (*world.roots(), d)
    before = snapshot(*roots)
    r = run_seme(["-q", *spec.argv], cwd=spec.cwd, timeout=120)
    assert_clean_failure(r, names=spec.names, out=spec.out, before=before, roots=roots, rc=spec.rc)
