"""TIES in two passes (statistics, then row blocks) equals the whole-tensor TIES bit for bit.

Real tensors with many equal magnitudes, so the top-k cut falls inside a run of ties and the
"lowest index first" rule decides; pass 1 is run with tiny blocks so that run spans blocks.
"""

from __future__ import annotations

import pytest
import torch

from seme import methods
from seme.methods import gta


def _inputs(dtype: torch.dtype, shape: tuple[int, int], seed: int) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(dtype)
    # task vectors on a coarse grid: few distinct magnitudes, long runs of ties
    fts = [(base.double() + torch.randint(-4, 5, shape, generator=g).double() * 0.125).to(dtype) for _ in range(3)]
    return base, [base, *fts]


def _params(spec: methods.MethodSpec, **over: object) -> dict:
    return {**spec.global_params, **over}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
@pytest.mark.parametrize("rescale", [False, "l1", "exact"])
@pytest.mark.parametrize("dens", [0.3, 1.0])
def test_two_pass_ties_is_bit_identical(monkeypatch, dtype, rescale, dens) -> None:
    monkeypatch.setattr(gta, "_PASS1_ELEMS", 128)  # pass 1 in many blocks (a multiple of 64)
    spec = methods.get("ties")
    base, ts = _inputs(dtype, (37, 64), seed=3)
    mp = [{"weight": 1.0, "density": 1.0}] + [{"weight": w, "density": d} for w, d in
                                             ((0.5, dens), (0.7, 0.9 * dens), (0.3, 0.55 * dens))]
    gp = _params(spec, rescale=rescale, **{"lambda": 0.9})
    whole = spec.fn(base, ts, mp, gp, None)
    state = spec.prepare(base, ts, mp, gp, None)
    assert state is not None
    for step in (1, 5, 37):  # row blocks of every size, the cut anywhere inside one
        out = torch.empty_like(base)
        for r0 in range(0, base.shape[0], step):
            r1 = min(base.shape[0], r0 + step)
            out[r0:r1] = spec.fn_block(state, base[r0:r1], [t[r0:r1] for t in ts], r0)
        assert torch.equal(out.view(torch.uint8), whole.view(torch.uint8)), (dtype, rescale, step)


def test_tie_cut_is_inside_the_tensor() -> None:
    """The inputs above do exercise the tie rule: the k-th magnitude is shared by many entries."""
    base, ts = _inputs(torch.bfloat16, (37, 64), seed=3)
    st = gta._trim_stats(ts[1], base, 0.3, None)
    assert 0 < st["cut"] < base.numel()


def test_executor_streams_the_sparsifying_methods() -> None:
    for name in ("ties", "dare_ties", "dare_linear"):
        assert methods.get(name).fn_block is not None, name
    assert methods.get("task_arithmetic").fn_block is None  # element-wise: no pass 1 needed


@pytest.mark.parametrize("name", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rescale", [False, "l1", "exact"])
def test_two_pass_dare_is_bit_identical(monkeypatch, name, dtype, rescale) -> None:
    """DARE's masks hash (key, flat index), so row blocks reproduce the whole-tensor merge."""
    monkeypatch.setattr(gta, "_PASS1_ELEMS", 128)
    spec = methods.get(name)
    base, ts = _inputs(dtype, (37, 64), seed=4)
    mp = [{"weight": 1.0, "density": 1.0}] + [{"weight": w, "density": d} for w, d in
                                             ((0.5, 0.4), (0.7, 0.9), (0.3, 0.2))]
    gp = _params(spec, rescale=rescale)
    whole = spec.fn(base, ts, mp, gp, torch.Generator().manual_seed(11))
    state = spec.prepare(base, ts, mp, gp, torch.Generator().manual_seed(11))
    for step in (1, 7, 37):
        out = torch.empty_like(base)
        for r0 in range(0, base.shape[0], step):
            r1 = min(base.shape[0], r0 + step)
            out[r0:r1] = spec.fn_block(state, base[r0:r1], [t[r0:r1] for t in ts], r0)
        assert torch.equal(out.view(torch.uint8), whole.view(torch.uint8)), (name, dtype, rescale, step)
    # and the masks really drop entries (not an identity merge)
    assert not torch.equal(whole, spec.fn(base, ts, [{**p, "density": 1.0} for p in mp], gp,
                                          torch.Generator().manual_seed(11)))


def test_executor_merges_ties_in_row_blocks(tmp_path, monkeypatch) -> None:
    """run_merge: TIES through pass 1 + row blocks writes the same bytes as whole-tensor TIES."""
    import json

    from safetensors.torch import load_file, save_file

    from seme import merge as merge_mod
    from seme.config import MergeConfig

    llama = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 24,
             "num_hidden_layers": 1, "vocab_size": 37}
    g = torch.Generator().manual_seed(5)
    base = {"big": torch.randn(37, 24, generator=g).bfloat16(), "vec": torch.randn(24, generator=g).bfloat16()}
    dirs = []
    for i in range(4):
        d = tmp_path / f"m{i}"
        d.mkdir()
        (d / "config.json").write_text(json.dumps(llama))
        ts = base if i == 0 else {k: (v.double() + torch.randint(-3, 4, v.shape, generator=g) * 0.0625).to(v.dtype)
                                  for k, v in base.items()}
        save_file(ts, str(d / "model.safetensors"))
        dirs.append(d)
    cfg = MergeConfig(merge_method="ties", base_model=str(dirs[0]), dtype="bfloat16",
                      models=[{"model": str(d), "parameters": {"weight": w, "density": 0.4}}
                              for d, w in zip(dirs[1:], (0.3, 0.5, 0.9))])
    monkeypatch.setenv(merge_mod.HASH_CACHE_ENV, "off")
    whole = merge_mod.run_merge(cfg, tmp_path / "whole", progress=False)
    calls = []
    real = merge_mod._merge_rows
    monkeypatch.setattr(merge_mod, "CHUNK_BYTES", 5 * 24 * 2)  # 5 rows per block
    monkeypatch.setattr(gta, "_PASS1_ELEMS", 64)
    monkeypatch.setattr(merge_mod, "_merge_rows", lambda *a, **k: calls.append((a[7], "block" in k)) or real(*a, **k))
    # the torch path (``whole`` above ran on the fused CPU kernels: the engines must agree too)
    monkeypatch.setenv(merge_mod.KERNELS_ENV, "off")
    rows = merge_mod.run_merge(cfg, tmp_path / "rows", progress=False)
    assert calls == [("big", True)]
    a, b = load_file(str(whole.out_dir / "model.safetensors")), load_file(str(rows.out_dir / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("n", [5, 8192, 3 * 8192 + 17])
def test_nth_true_matches_nonzero(n) -> None:
    g = torch.Generator().manual_seed(n)
    mask = torch.rand(n, generator=g) < 0.3
    where = torch.nonzero(mask).squeeze(1)
    for m in {0, where.numel() // 2, where.numel() - 1}:
        assert gta._nth_true(mask, m, chunk=8192) == int(where[m])
        assert gta._nth_true(mask, m, chunk=64) == int(where[m])
