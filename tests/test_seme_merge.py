"""SeMe Select/Compute/Erase through the real executor (seme.merge.run_merge) on tiny checkpoints."""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch
from seme_helpers import logits, seme_config, tensors, transformed_copy

from seme.config import load_config
from seme.errors import AlignmentError
from seme.merge import run_merge
from seme.semantic.erase import erase_ties


def _merge(cfg: dict, out, **kw):
    return run_merge(load_config(cfg), out, progress=False, **kw)


@pytest.mark.parametrize("family,rotate", [("llama", True), ("gemma2", False)])
def test_merging_a_transformed_copy_preserves_logits_and_linear_does_not(tiny_model, tmp_path, family, rotate):
    src = tiny_model("orig", family=family)
    copy = tmp_path / "copy"
    transformed_copy(src, copy, rotate=rotate)
    ref = logits(src)
    res = _merge(seme_config([src, copy]), tmp_path / "seme")
    seme_err = float((logits(tmp_path / "seme") - ref).abs().max())
    assert seme_err < 1e-2
    assert res.manifest["seme"]["rotation"]["applied"] is rotate
    lin = {"merge_method": "linear", "models": [{"model": str(src), "parameters": {"weight": 0.5}},
                                                {"model": str(copy), "parameters": {"weight": 0.5}}]}
    _merge(lin, tmp_path / "linear")
    lin_err = float((logits(tmp_path / "linear") - ref).abs().max())
    assert lin_err > 0.3 and lin_err > 50 * seme_err
    assert (tmp_path / "seme" / "seme_alignment" / "alignment.json").is_file()


def test_erase_none_is_the_weighted_sum_of_task_vectors(tiny_model, perturbed, tmp_path):
    base = tiny_model("base")
    a, c = perturbed(base, "a", 0.02, 1), perturbed(base, "c", 0.02, 2)
    cfg = seme_config([a, c], base, erase="none", select_ratio=0.0, scale=1.0)
    cfg["models"][0]["parameters"] = {"weight": 0.7}
    cfg["models"][1]["parameters"] = {"weight": 0.4}
    res = _merge(cfg, tmp_path / "out")
    assert res.manifest["seme"]["rotation"]["applied"] is False
    tb, ta, tc, out = tensors(base), tensors(a), tensors(c), tensors(tmp_path / "out")
    for n, t0 in tb.items():
        want = t0 + 0.7 * (ta[n] - t0) + 0.4 * (tc[n] - t0)
        assert torch.allclose(out[n], want, atol=1e-6, rtol=0), n


def test_ties_erase_differs_from_plain_sum_and_select_drops_unchanged_sources(tiny_model, perturbed, tmp_path):
    base = tiny_model("base")
    a, c = perturbed(base, "a", 0.02, 1), perturbed(base, "c", 0.02, 2)
    res = _merge(seme_config([a, c, base], base), tmp_path / "ties")
    _merge(seme_config([a, c, base], base, erase="none"), tmp_path / "none")
    t_ties, t_none, tb = tensors(tmp_path / "ties"), tensors(tmp_path / "none"), tensors(base)
    n = "model.layers.0.mlp.down_proj.weight"
    assert (t_ties[n] - t_none[n]).abs().max() > 1e-4
    # TIES keeps the update at the scale of one source, the plain sum doubles it
    assert (t_ties[n] - tb[n]).norm() < (t_none[n] - tb[n]).norm()
    sel = res.manifest["seme"]["selected_modules_per_source"]
    assert sel[0] == sel[1] == res.manifest["seme"]["layer_modules"] and sel[2] == 0
    for mode in ("overlap", "cap"):
        _merge(seme_config([a, c], base, compute=mode, erase="none"), tmp_path / mode)
    t_cap = tensors(tmp_path / "cap")
    assert (t_cap[n] - tb[n]).norm() < (t_none[n] - tb[n]).norm()
    assert all(torch.isfinite(v).all() for v in tensors(tmp_path / "overlap").values())


def test_merge_of_identical_models_and_single_source(tiny_model, perturbed, tmp_path):
    m = tiny_model("m")
    _merge(seme_config([m, m]), tmp_path / "mm")
    tm, tmm = tensors(m), tensors(tmp_path / "mm")
    assert all(torch.equal(tm[n], tmm[n]) for n in tm)
    base = tiny_model("base", seed=3)
    a = perturbed(base, "a", 0.05, 1)
    _merge(seme_config([a], base, scale=1.0), tmp_path / "single")
    ta, ts = tensors(a), tensors(tmp_path / "single")
    assert all(torch.allclose(ta[n], ts[n], atol=1e-6, rtol=0) for n in ta)


def test_erase_ties_matches_a_reference_implementation():
    g = torch.Generator().manual_seed(0)
    K, d, n, T = 3, 16, 40, 64
    X = torch.randn(K, d, n, generator=g, dtype=torch.float64)
    S = torch.randn(T, d, generator=g, dtype=torch.float64)
    S = S / S.norm(dim=1, keepdim=True)
    P = torch.linalg.solve(S.T @ S, S.T)
    assert torch.allclose(P @ S, torch.eye(d, dtype=torch.float64), atol=1e-10)
    got = erase_ties(X, S, P, density=0.5, block=7)
    want = torch.empty(d, n, dtype=torch.float64)
    for j in range(n):
        cs = []
        for k in range(K):
            c = S @ X[k, :, j]
            top = c.abs().sort(descending=True).indices[: math.ceil(0.5 * T)]
            trimmed = torch.zeros_like(c)
            trimmed[top] = c[top]
            cs.append(trimmed)
        C = torch.stack(cs)
        s = torch.sign(C.sum(0))
        keep = (torch.sign(C) == s) & (C != 0)
        mean = (C * keep).sum(0) / keep.sum(0).clamp_min(1)
        want[:, j] = P @ mean
    assert torch.allclose(got, want, atol=1e-10)
    # density 1 and one source: TIES is the identity on the task vector
    assert torch.allclose(erase_ties(X[:1], S, P, density=1.0), X[0], atol=1e-10)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_row_thresholds_equal_the_exact_sort(threads):
    """The threaded per-row selection returns the keep-th largest entry of every row, ties included."""
    from seme.semantic.erase import _row_thresholds

    g = torch.Generator().manual_seed(threads)
    a = torch.randn(301, 257, generator=g).abs()
    a[5] = 0.25  # a constant row
    a[7, ::3] = 1.5  # many ties at the top
    a[9] = torch.randint(0, 4, (257,), generator=g).float()  # ties everywhere
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        for keep in (1, 2, 50, 128, 129, 256, 257):
            want = a.sort(dim=1, descending=True).values[:, keep - 1 : keep]
            got = _row_thresholds(a, keep)
            assert got.shape == (301, 1)
            assert torch.equal(got, want), keep
    finally:
        torch.set_num_threads(old)


def test_kth_largest_abs_equals_the_exact_sort():
    """The kernel's histogram select returns the keep-th largest |x| exactly (ties, zeros, signs)."""
    pytest.importorskip("numba")
    import numpy as np

    from seme.semantic.erase_kernel import kth_largest_abs

    g = torch.Generator().manual_seed(0)
    rows = [torch.randn(300, generator=g), torch.zeros(300), torch.full((300,), -0.5),
            torch.randint(-3, 4, (300,), generator=g).float(), torch.randn(300, generator=g) * 1e-40,
            torch.cat([torch.randn(150, generator=g) * 1e6, torch.randn(150, generator=g) * 1e-6])]
    hist, cand = np.empty(2048, dtype=np.int64), np.empty(300, dtype=np.uint32)
    for row in rows:
        want_sorted = row.abs().sort(descending=True).values
        for keep in (1, 2, 149, 150, 151, 299, 300):
            got = np.array([kth_largest_abs(row.numpy().view(np.uint32), keep, hist, cand)], dtype=np.uint32)
            assert float(got.view(np.float32)[0]) == float(want_sorted[keep - 1]), keep


@pytest.mark.parametrize("K,density", [(2, 0.5), (3, 0.5), (3, 0.2), (4, 1.0), (5, 0.73)])
def test_fused_erase_kernel_equals_the_torch_path(monkeypatch, K, density):
    pytest.importorskip("numba")
    from seme.semantic import erase as seme_erase

    g = torch.Generator().manual_seed(K)
    d, n, T = 24, 53, 301
    X = torch.randn(K, n, d, generator=g)
    X[:, 7] = 0  # a vector no source changes
    X[1, 9] = -X[0, 9]  # sources that cancel
    S = torch.randn(T, d, generator=g, dtype=torch.float64)
    S = S / S.norm(dim=1, keepdim=True)
    P = torch.linalg.solve(S.T @ S, S.T)
    S32, P32 = S.float(), P.float()
    assert seme_erase._ties_kernel() is not None
    fused = seme_erase.erase_ties_rows(X, S32, P32, density, block=16)
    monkeypatch.setattr(seme_erase, "_ties_kernel", lambda: None)
    torch_path = seme_erase.erase_ties_rows(X, S32, P32, density, block=16)
    # same arithmetic; torch's float32 reduction over 5+ sources may associate differently (1 ulp)
    assert float((fused - torch_path).abs().max()) <= 1e-6 * float(torch_path.abs().max())
    if K <= 4:
        assert torch.equal(fused, torch_path)
    # and both follow the float64 reference up to float32 rounding
    ref = erase_ties(X.double().transpose(1, 2), S, P, density=density, block=16).T
    assert torch.allclose(fused.double(), ref, atol=1e-4 * float(ref.abs().max()))


def test_embedding_rows_stream_in_blocks(tiny_model, perturbed, tmp_path, monkeypatch):
    """Embedding / LM-head rows are merged, and their Select statistics gathered, block of rows by
    block of rows (no whole V×d task vector): blocks of 20 rows give what whole tensors give."""
    from seme.semantic import transform

    base = tiny_model("base")
    a, c = perturbed(base, "a", 0.02, 1), perturbed(base, "c", 0.02, 2)
    cfg = seme_config([a, c], base, compute="cap")  # cap: the per-row Compute with the most arithmetic
    _merge(cfg, tmp_path / "whole")
    monkeypatch.setattr(transform, "ROW_BLOCK", 20)  # 128 tokens: 7 blocks, the last one short
    _merge(cfg, tmp_path / "blocks")
    t1, t2 = tensors(tmp_path / "whole"), tensors(tmp_path / "blocks")
    rows = [n for n in t1 if "embed" in n or "lm_head" in n]
    assert rows and all(torch.allclose(t1[n], t2[n], atol=1e-6, rtol=0) for n in t1)
    assert any(not torch.equal(t1[n], tensors(base)[n]) for n in rows)  # the rows really merged
    m1, m2 = (json.loads((tmp_path / d / "seme_alignment" / "alignment.json").read_text())["modules"]
              for d in ("whole", "blocks"))
    for key in ("embed", "head"):
        if key in m1:
            assert torch.allclose(torch.tensor(m1[key]["gram"]), torch.tensor(m2[key]["gram"]), rtol=1e-9)


def test_saved_alignment_is_reused_and_checked(tiny_model, tmp_path):
    from seme.semantic.alignment import align

    src = tiny_model("orig")
    copy = tmp_path / "copy"
    transformed_copy(src, copy)
    cfg = seme_config([src, copy])
    art = align(load_config(cfg), tmp_path / "art")
    _merge(cfg, tmp_path / "with_art", alignment=art)
    _merge(cfg, tmp_path / "inline")
    t1, t2 = tensors(tmp_path / "with_art"), tensors(tmp_path / "inline")
    assert all(torch.equal(t1[n], t2[n]) for n in t1)
    other = tiny_model("other", seed=5)
    with pytest.raises(AlignmentError, match="re-run seme align"):
        _merge(seme_config([src, other]), tmp_path / "bad", alignment=art)
    assert not (tmp_path / "bad").exists()


def test_data_free_no_tokenizer_no_dataset(tiny_model, perturbed, tmp_path):
    base = tiny_model("base")
    a, c = perturbed(base, "a", 0.02, 1), perturbed(base, "c", 0.02, 2)
    for d in (base, a, c):
        for f in d.iterdir():
            if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens")):
                f.unlink()
    opened: list[str] = []
    imported: list[str] = []
    active = [True]

    def hook(event, args):
        if not active[0]:
            return
        if event == "open" and isinstance(args[0], str):
            opened.append(args[0])
        elif event == "import":
            imported.append(str(args[0]))

    sys.addaudithook(hook)
    try:
        from seme.semantic.alignment import align

        cfg = seme_config([a, c], base)
        align(load_config(cfg), tmp_path / "art")
        _merge(cfg, tmp_path / "out")
    finally:
        active[0] = False
    assert (tmp_path / "out" / "model.safetensors").is_file()
    names = [p.rsplit("/", 1)[-1] for p in opened]
    assert not [n for n in names if n.startswith(("tokenizer", "vocab", "merges"))]
    assert not [p for p in opened if "dataset" in p.lower() or p.endswith((".arrow", ".parquet", ".jsonl"))]
    assert not [m for m in imported if m.split(".")[0] == "datasets"]


def test_data_free_diagnostics(tiny_model, perturbed, tmp_path):
    from seme.semantic.diagnostics import data_free_report, format_report

    m = tiny_model("m")
    far = tiny_model("far", seed=9)
    rep = data_free_report(m, [m, far])
    assert len(rep["layers"]) == 2 and rep["probes"] > 0
    assert abs(rep["mean_kl"][0]) < 1e-6  # a model against itself
    assert rep["mean_kl"][1] > 1e-3  # an unrelated model
    text = format_report(rep)
    assert "mean" in text and "KL(src1" in text
    json.dumps(rep)


@pytest.mark.parametrize("family", ["qwen3", "phi3", "gpt2"])
def test_other_families_merge_and_match_permuted_units(tiny_model, perturbed, tmp_path, family):
    """Fused q/k/v and gate/up (phi3), Conv1D-transposed weights (gpt2), q/k norms (qwen3)."""
    from seme.checkpoint import Checkpoint
    from seme.semantic.alignment import compute_alignment

    base = tiny_model("base", family=family)
    a, c = perturbed(base, "a", 0.02, 1), perturbed(base, "c", 0.02, 2)
    _merge(seme_config([a, c], base, erase="none", select_ratio=0.0), tmp_path / "out")
    tb, ta, tc, out = tensors(base), tensors(a), tensors(c), tensors(tmp_path / "out")
    for n, t0 in tb.items():
        assert torch.allclose(out[n], ta[n] + tc[n] - t0, atol=1e-5, rtol=0), n
    far = tiny_model("far", family=family, seed=5)
    al = compute_alignment(load_config(seme_config([base, far])), [Checkpoint(base), Checkpoint(far)], None)
    assert al.meta["models"]["1"]["mlp_permuted_layers"] == [0, 1]  # unrelated models: real matchings
