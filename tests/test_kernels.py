"""The fused CPU kernels (seme.kernels via seme.methods.fused) equal the torch methods bit for bit.

The torch functions in seme.methods are the reference (checked against closed forms and against
mergekit elsewhere); here every method, in bfloat16 and float32, on tensors whose task vectors
have long runs of equal magnitudes (so TIES's tie rule decides), with blocks and thread ranges
small enough that the top-k cut and the DARE hash straddle them.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from seme import kernels as K
from seme import methods
from seme.methods import fused, gta

CASES = [
    ("linear", {"normalize": True}, [0.3, 0.7, 1.1], None),
    ("linear", {"normalize": False}, [0.3, 0.7, 1.1], None),
    ("task_arithmetic", {"normalize": True, "lambda": 0.6}, [0.3, 0.7, 1.1], None),
    ("task_arithmetic", {"normalize": False, "lambda": 1.0}, [0.5, 0.5, 0.5], None),
    ("ties", {"normalize": True, "lambda": 1.0}, [0.3, 0.7, 1.1], [0.5, 0.3, 0.8]),
    ("ties", {"normalize": False, "lambda": 0.7, "rescale": True}, [0.3, 0.7, 1.1], [0.5, 0.3, 1.0]),
    ("ties", {"normalize": True, "lambda": 1.0, "rescale": "exact"}, [0.3, 0.7, 1.1], [0.5, 0.05, 0.9]),
    ("dare_ties", {"normalize": False, "lambda": 1.0, "rescale": True}, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]),
    ("dare_ties", {"normalize": True, "lambda": 0.8, "rescale": False}, [0.5, 1.0, 0.2], [0.9, 0.2, 1.0]),
    ("dare_linear", {"normalize": False, "lambda": 1.0, "rescale": "exact"}, [0.5, 0.5, 0.5], [0.3, 0.3, 0.3]),
    ("slerp", {"t": 0.3}, None, None),
]


def _inputs(dtype: torch.dtype, shape: tuple[int, ...], coarse: bool, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    if coarse:  # few distinct task-vector magnitudes: long runs of ties at the top-k cut
        fts = [(base.double() + torch.randint(-4, 5, shape, generator=g).double() * 0.125).to(dtype)
               for _ in range(3)]
    else:
        fts = [(base + 0.01 * torch.randn(shape, generator=g)).to(dtype) for _ in range(3)]
    return base, fts


def _call(name, gp, w, d, base, fts):
    spec = methods.get(name)
    params = {**spec.global_params, **gp}
    if name == "linear":
        b, ts, mp = None, fts, [{"weight": x} for x in w]
    elif name == "slerp":
        b, ts, mp = base, [base, fts[0]], [{}, {}]
    else:  # the base also listed among the models: left out, as mergekit does
        b, ts = base, [base, *fts]
        mp = [{"weight": 1.0, "density": 1.0}] + [{"weight": x, "density": y or 1.0} for x, y in zip(w, d or [None] * 3)]
    ref = spec.fn(b, ts, mp, params, torch.Generator().manual_seed(7))
    out, bad = fused.get(name)(b, ts, mp, params, torch.Generator().manual_seed(7), ref.dtype)
    return ref, out, bad


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}-{i}" for i, c in enumerate(CASES)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("coarse", [False, True])
@pytest.mark.parametrize("shape", [(67, 1031), (37, 211)], ids=["69077", "7807"])
def test_fused_equals_torch_bit_for_bit(monkeypatch, case, dtype, coarse, shape):
    """69077 entries: not a multiple of a chunk, above ``fused.SMALL`` (TIES thresholds from the
    histograms); 7807: below it (from a numpy partition)."""
    monkeypatch.setattr(fused, "BLOCK", 4 * K.CH)  # several blocks, and thread ranges inside them
    monkeypatch.setenv("SEME_THREADS", "3")
    name, gp, w, d = case
    assert (shape[0] * shape[1] <= fused.SMALL) == (shape == (37, 211))
    base, fts = _inputs(dtype, shape, coarse)
    ref, out, bad = _call(name, gp, w, d, base, fts)
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert torch.equal(out.view(torch.uint8), ref.view(torch.uint8)), (name, gp, dtype, coarse)
    assert bad["out"] == 0 and bad["base"] == 0 and not any(bad["sources"])
    assert not torch.equal(out, base)  # the merge did something


def test_the_tie_cut_falls_inside_a_later_range(monkeypatch):
    """bf16 TIES: the k-th magnitude is shared by many entries, and the cut is found in the right
    range (not the first), so the per-range tie counting is exercised."""
    monkeypatch.setattr(fused, "BLOCK", 2 * K.CH)
    base, fts = _inputs(torch.bfloat16, (67, 1031), True)
    x, b = fused.bits(fts[0]), fused.bits(base)
    ranges = [r for rs in fused.blocks(b.size) for r in rs]
    hists = np.zeros((len(ranges), 1, 1 << 15), np.int32)
    fused.run(fused._hist, b.size, {lo: hists[i] for i, (lo, _) in enumerate(ranges)}, b, *fused._pack([x]), True)
    _thr, cut = fused._topk_threshold(x, b, int(0.3 * base.numel()), True, ranges, hists, 0)
    assert 2 * K.CH < cut < base.numel()
    keep = gta.topk_mask(fts[0] - base, int(0.3 * base.numel())).reshape(-1)
    assert int(torch.nonzero(keep).max()) >= cut - 1


def test_dare_hash_is_the_same_in_numba_and_torch():
    for key, dens, lo in (((1, 2), 0.5, 0), ((0xFFFFFFFF, 12345), 0.1, 2**32 - 500), ((7, 0), 0.9, 10**6)):
        mask = gta.dare_keep(key, dens, lo, lo + 1000)
        thr = np.uint64(gta.dare_threshold(dens))
        nb = [K._dare_keep(i, np.uint64(key[0]), np.uint64(key[1]), thr) for i in range(lo, lo + 1000)]
        assert mask.tolist() == nb
    big = gta.dare_keep((3, 4), 0.3, 0, 200_000)
    assert abs(float(big.float().mean()) - 0.3) < 5 * (0.21 / 200_000) ** 0.5


@pytest.mark.parametrize("where", ["base", "source", "output"])
def test_non_finite_values_are_counted(where):
    base, fts = _inputs(torch.bfloat16, (40, 300), False)
    base, fts = base.clone(), [t.clone() for t in fts]
    spec = methods.get("task_arithmetic")
    mp = [{"weight": 1.0}] * 3
    gp = dict(spec.global_params)
    if where == "base":
        base[3, 7] = float("nan")
    elif where == "source":
        fts[1][5, 2] = float("inf")
    else:  # finite inputs whose weighted sum overflows bfloat16
        base[0, 0], fts[0][0, 0] = 3e38, -3e38
        mp = [{"weight": 1.0}, {"weight": 0.0}, {"weight": 0.0}]
    _out, bad = fused.get("task_arithmetic")(base, fts, mp, gp, None, torch.bfloat16)
    if where == "base":
        assert bad["base"] == 1
    elif where == "source":
        assert bad["sources"] == [0, 1, 0]
    else:
        assert bad["base"] == 0 and not any(bad["sources"]) and bad["out"] >= 1


def _tiny_checkpoints(tmp_path, dtype: torch.dtype, k: int) -> list:
    from safetensors.torch import save_file

    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 32,
             "num_hidden_layers": 1, "vocab_size": 300}
    g = torch.Generator().manual_seed(1)
    base = {"model.embed_tokens.weight": torch.randn(300, 32, generator=g),
            "model.layers.0.mlp.up_proj.weight": torch.randn(64, 32, generator=g),
            "model.norm.weight": torch.ones(32)}
    dirs = []
    for i in range(k):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(llama))
        sd = {n: (v + (0.02 * torch.randn(v.shape, generator=g) if i else 0)).to(dtype) for n, v in base.items()}
        save_file(sd, str(d / "model.safetensors"))
        dirs.append(d)
    return dirs


@pytest.mark.parametrize(("method", "compute"), [("linear", "bfloat16"), ("task_arithmetic", "bfloat16"),
                                                ("ties", "bfloat16"), ("dare_ties", "bfloat16"), ("slerp", "bfloat16"),
                                                ("linear", "float32"), ("ties", "float32"), ("dare_ties", "float32")])
def test_run_merge_writes_the_same_bytes_with_and_without_kernels(tmp_path, monkeypatch, method, compute):
    """bfloat16 checkpoints merged by the torch-free kernels, by the kernels on torch tensors and by
    the torch methods: the same bytes, in a bfloat16 compute dtype and in float32 (widened inputs)."""
    from seme import merge as merge_mod
    from seme.config import MergeConfig

    monkeypatch.setenv(merge_mod.HASH_CACHE_ENV, "off")
    d = _tiny_checkpoints(tmp_path, torch.bfloat16, 4)
    if method == "slerp":
        cfg = {"merge_method": "slerp", "base_model": str(d[0]), "parameters": {"t": 0.4},
               "models": [{"model": str(d[0])}, {"model": str(d[1])}]}
    elif method == "linear":
        cfg = {"merge_method": "linear", "models": [{"model": str(x), "parameters": {"weight": 1.0}} for x in d]}
    else:
        cfg = {"merge_method": method, "base_model": str(d[0]),
               "models": [{"model": str(x), "parameters": {"weight": 0.5, "density": 0.4}} for x in d[1:]]}
    cfg = MergeConfig.model_validate({**cfg, "dtype": compute, "seed": 3})
    engines = {"auto": "kernels" if method == "slerp" else "kernels, torch-free", "torch": "kernels", "off": "torch"}
    outs = {}
    for mode, engine in engines.items():  # torch-free kernels, kernels on torch tensors, torch methods
        if mode != "auto":
            monkeypatch.setenv(merge_mod.KERNELS_ENV, mode)
        res = merge_mod.run_merge(cfg, tmp_path / mode, progress=False)
        assert res.manifest["engine"] == engine
        outs[mode] = (res.out_dir / "model.safetensors").read_bytes()
    assert outs["auto"] == outs["torch"] == outs["off"]


def test_more_sources_than_the_kernels_take_use_the_torch_path(tmp_path, monkeypatch):
    from seme import merge as merge_mod
    from seme.config import MergeConfig

    d = _tiny_checkpoints(tmp_path, torch.float32, K.MAXK + 1)
    cfg = MergeConfig.model_validate({"merge_method": "linear", "dtype": "float32",
                                      "models": [{"model": str(x)} for x in d]})
    res = merge_mod.run_merge(cfg, tmp_path / "out", progress=False)
    from safetensors.torch import load_file

    out = load_file(str(res.out_dir / "model.safetensors"))
    ins = [load_file(str(x / "model.safetensors")) for x in d]
    n = "model.layers.0.mlp.up_proj.weight"
    torch.testing.assert_close(out[n], sum(t[n] for t in ins) / len(ins), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ["linear", "task_arithmetic", "ties", "dare_ties", "slerp"])
@pytest.mark.parametrize("dtype,od", [(torch.float32, torch.bfloat16), (torch.bfloat16, torch.float32)])
def test_output_dtype_other_than_the_compute_dtype(name, dtype, od):
    """out_dtype ≠ dtype: the kernels round as the executor's ``.to(out_dtype)`` does."""
    case = next(c for c in CASES if c[0] == name)
    base, fts = _inputs(dtype, (33, 515), coarse=False)
    ref, _out, _bad = _call(*case, base, fts)
    spec = methods.get(name)
    _n, gp, w, d = case
    params = {**spec.global_params, **gp}
    if name == "linear":
        b, ts, mp = None, fts, [{"weight": x} for x in w]
    elif name == "slerp":
        b, ts, mp = base, [base, fts[0]], [{}, {}]
    else:
        b, ts = base, [base, *fts]
        mp = [{"weight": 1.0, "density": 1.0}] + [{"weight": x, "density": y or 1.0} for x, y in zip(w, d or [None] * 3)]
    out, _bad = fused.get(name)(b, ts, mp, params, torch.Generator().manual_seed(7), od)
    assert out.dtype == od
    assert torch.equal(out.view(torch.uint8), ref.to(od).view(torch.uint8))


def test_torch_sum_order_is_torchs():
    """The torch-free path sums weights in torch's order (the last bit depends on it): checked
    against torch itself for every length the kernels take, float32 and bfloat16."""
    g = torch.Generator().manual_seed(0)
    for n in range(1, K.MAXK + 1):
        for _ in range(300):
            w = (torch.rand(n, generator=g) * 6 - 3) * 10 ** torch.randint(-3, 2, (n,), generator=g)
            assert float(w.sum()) == float(fused.torch_sum(w.numpy()))
            wb = w.to(torch.bfloat16)
            assert float(wb.sum()) == float(fused.torch_sum(wb.float().numpy(), half=True))
            assert np.array_equal(fused.in_dtype(w.double().tolist(), True), wb.float().numpy())


def test_classic_cli_merge_never_imports_torch(tmp_path):
    """``seme merge`` of bfloat16 checkpoints with a classic method runs on the kernels without
    importing torch (1.5 s of start-up); the output equals the torch path's."""
    import subprocess
    import sys

    d = _tiny_checkpoints(tmp_path, torch.bfloat16, 3)
    cfg = tmp_path / "ties.yaml"
    cfg.write_text(json.dumps({"merge_method": "ties", "base_model": str(d[0]), "dtype": "bfloat16",
                               "models": [{"model": str(x), "parameters": {"weight": 0.5, "density": 0.5}}
                                          for x in d[1:]]}))
    probe = ("import sys; from seme.cli import main; rc = main(['-q', 'merge', sys.argv[1], sys.argv[2]]); "
             "print('torch' in sys.modules, 'safetensors' in sys.modules); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", probe, str(cfg), str(tmp_path / "fast")], capture_output=True,
                         text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "False False"
    slow = subprocess.run([sys.executable, "-m", "seme", "-q", "merge", str(cfg), str(tmp_path / "slow")],
                          capture_output=True, text=True, env={**__import__("os").environ, "SEME_KERNELS": "off"})
    assert slow.returncode == 0, slow.stderr
    fast_m = json.loads((tmp_path / "fast" / "seme_manifest.json").read_text())
    assert fast_m["engine"] == "kernels, torch-free" and fast_m["torch_version"] == torch.__version__
    assert (tmp_path / "fast" / "model.safetensors").read_bytes() == (tmp_path / "slow" / "model.safetensors").read_bytes()
