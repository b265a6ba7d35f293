"""The ten further mergekit 0.1.5 methods, cross-checked against mergekit itself on tiny llama, qwen2
and gemma2 checkpoints (transformers' save_pretrained, plus fine-tune-like perturbed variants): the
same YAML config merged by mergekit's Python API and by ``seme.merge.run_merge``.

Deterministic methods (breadcrumbs, breadcrumbs_ties, sce, nuslerp, multislerp, karcher, nearswap,
arcee_fusion) must give the same tensors within one rounding step of the dtype. DELLA's masks are
random draws (mergekit: torch's global generator; seme: a hash of the per-tensor seed and the entry
index), so no two runs share a mask; for della / della_linear the test checks what the method
promises instead: the kept fraction equals ``density``, the keep probability rises with the
magnitude rank from density − ε to density + ε, the L1 rescale restores each task vector's norm,
and mergekit and seme agree on these statistics.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from conftest import make_tiny_model, perturb_model

# the cross-check machinery shared with the first seven methods' cross-checks
from test_mergekit_crosscheck import FAMILIES, load_dir, mismatches, run_both, run_seme, step

from seme.errors import ConfigError


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict[str, dict[str, str]]:
    """Per family: a base and three variants m0..m2 (different seeds and sizes of perturbation)."""
    root = tmp_path_factory.mktemp("xcheck2_models")
    out = {}
    for fam in FAMILIES:
        base = make_tiny_model(root / f"{fam}_base", family=fam, seed=0)
        ms = {f"m{i}": str(perturb_model(base, root / f"{fam}_m{i}", scale=0.02 * (i + 1), seed=i + 1))
              for i in range(3)}
        out[fam] = {"base": str(base), **ms}
    return out


def models(z: dict, params: list[dict]) -> list[dict]:
    return [{"model": z[f"m{i}"], "parameters": p} for i, p in enumerate(params)]


def config(case: str, z: dict[str, str], dtype: str) -> dict:
    """The config of one cross-check case: parameters given as scalars, depth gradients and filter
    lists, the base listed among the models or not, base-free variants."""
    cfg: dict = {"dtype": dtype, "out_dtype": dtype}
    method = case.split(":")[0]
    grad_w = [{"filter": "mlp", "value": 0.3}, {"value": [0.5, 1.0]}]
    if method in ("breadcrumbs", "breadcrumbs_ties"):
        cfg.update(base_model=z["base"], models=models(z, [
            {"weight": 0.6, "density": 0.5, "gamma": 0.05},
            {"weight": grad_w, "density": [{"filter": "self_attn", "value": 0.3}, {"value": [0.4, 0.8]}]},
            {"weight": 0.45, "density": 0.7, "gamma": [0.0, 0.1]},
        ]))
        if method == "breadcrumbs_ties":
            cfg["parameters"] = {"normalize": True, "lambda": [1.0, 0.7]}
        else:
            cfg["parameters"] = {"lambda": 0.8}
    elif method == "sce":
        # the base listed among the models too: mergekit leaves it out of the task vectors
        cfg.update(base_model=z["base"], parameters={"select_topk": [{"filter": "mlp", "value": 0.3},
                                                                     {"value": 0.6}]},
                   models=[{"model": z["base"]}, *[{"model": z[f"m{i}"]} for i in range(3)]])
    elif case == "nuslerp":
        cfg.update(base_model=z["base"], models=models(z, [{"weight": 0.3}, {"weight": [0.4, 0.9]}]))
    elif case == "nuslerp:nobase_rows":
        cfg.update(parameters={"nuslerp_flatten": False, "nuslerp_row_wise": True},
                   models=models(z, [{"weight": 0.6}, {"weight": 0.4}]))
    elif case == "nuslerp:nobase_vectors":
        cfg.update(parameters={"nuslerp_flatten": False}, models=models(z, [{"weight": 1.0}, {"weight": 2.0}]))
    elif case == "multislerp":
        cfg.update(base_model=z["base"], models=models(z, [{"weight": 0.5}, {"weight": grad_w}, {"weight": 0.2}]))
    elif case == "multislerp:nobase":
        cfg.update(parameters={"normalize_weights": False},
                   models=models(z, [{"weight": 0.5}, {"weight": 0.3}, {"weight": 0.2}]))
    elif case == "karcher":  # the base is not listed: mergekit adds it as an input
        cfg.update(base_model=z["base"], models=[{"model": z["m0"]}, {"model": z["m2"]}])
    elif case == "karcher:nobase":
        cfg.update(parameters={"max_iter": 20, "tol": 1e-6}, models=[{"model": z[f"m{i}"]} for i in range(3)])
    elif method == "nearswap":
        cfg.update(base_model=z["base"], models=[{"model": z["m1"]}],
                   parameters={"t": [{"filter": "norm", "value": 0.01}, {"value": [2e-4, 8e-4]}]})
    elif method == "arcee_fusion":
        cfg.update(base_model=z["base"], models=[{"model": z["base"]}, {"model": z["m2"]}])
    cfg["merge_method"] = method
    return cfg


EXACT = ["breadcrumbs", "breadcrumbs_ties", "sce", "nuslerp", "multislerp", "karcher", "nearswap",
         "arcee_fusion"]
CASES = [(fam, m, "float32") for fam in FAMILIES for m in EXACT]
CASES += [("llama", c, "float32") for c in ("nuslerp:nobase_rows", "nuslerp:nobase_vectors",
                                             "multislerp:nobase", "karcher:nobase")]
CASES += [("qwen2", m, "bfloat16") for m in EXACT]


@pytest.mark.parametrize("family,case,dtype", CASES, ids=["-".join(c) for c in CASES])
def test_same_tensors_as_mergekit(zoo, tmp_path, monkeypatch, family, case, dtype):
    z = zoo[family]
    cfg = config(case, z, dtype)
    if case == "nearswap":  # element-wise: merged in row blocks; make the tiny tensors span several
        monkeypatch.setattr("seme.merge.CHUNK_BYTES", 2048)
    mk, ours = run_both(cfg, tmp_path)
    dt = getattr(torch, dtype)
    ref = load_dir(Path(z["base"]))
    ref = {n: ref.get(n, ref.get("model.embed_tokens.weight")) for n in mk}
    bad = mismatches(mk, ours, ref, dt)
    if case in ("breadcrumbs", "breadcrumbs_ties", "sce") and dt == torch.bfloat16:
        # bf16 has few significant bits, so many task-vector magnitudes (breadcrumbs) or variances
        # (sce) tie at the cuts; which of them survive is the choice of mergekit's unstable sort
        # (sparsify.py:109) or topk (sce.py:70), while seme ranks equal values by index. With
        # mergekit's order put in, everything agrees entry for entry.
        total = sum(t.numel() for t in mk.values())
        assert sum(bad.values()) / total < 0.08, bad
        from seme.methods import sce, sparse_gta

        def sort_band(x: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
            keep = torch.zeros(x.numel(), dtype=torch.bool)
            keep[torch.sort(x.abs().reshape(-1).float()).indices[lo:hi]] = True
            return keep.view(x.shape)

        def torch_topk(x: torch.Tensor, k: int) -> torch.Tensor:
            keep = torch.zeros(x.numel(), dtype=torch.bool)
            keep[torch.topk(x.abs().reshape(-1), k=k).indices] = True
            return keep.view(x.shape)

        monkeypatch.setattr(sparse_gta, "band_mask", sort_band)
        monkeypatch.setattr(sce, "topk_mask", torch_topk)
        bad = mismatches(mk, run_seme(cfg, tmp_path / "seme_mergekit_order"), ref, dt)
    assert not bad, f"{case}/{family}/{dtype}: entries beyond one rounding step: {bad}"
    # and the merge did something (not just copies of an input)
    inputs = [load_dir(Path(p)) for p in z.values()]
    changed = [n for n, t in mk.items() if all(not torch.equal(t.float(), i[n].float()) for i in inputs if n in i)]
    assert len(changed) > len(mk) // 2, f"{case}: the merge mostly copied an input"


# ---------------------------------------------------------------- DELLA: random, so statistics


def moved(out: dict, base: dict) -> tuple[float, float, int]:
    """(fraction of entries that moved, L1 norm of the movement, entries) over the 2-D tensors."""
    n_moved = total = 0
    l1 = 0.0
    for n, t in out.items():
        if t.dim() != 2:
            continue
        d = t.double() - base[n].double()
        n_moved += int((d != 0).sum())
        total += d.numel()
        l1 += float(d.abs().sum())
    return n_moved / total, l1, total


@pytest.mark.parametrize("method", ["della", "della_linear"])
def test_della_statistics_match_mergekit(zoo, tmp_path, method):
    """Three models, density 0.4 ± 0.2: an entry moves when any of the three draws keeps it (for
    della_linear: probability 1 − 0.6³, since the models' magnitude ranks are independent and each
    row's mean keep probability is the density); mergekit and seme agree on the moved fraction and
    the L1 size of the movement (the default L1 rescale and TIES election included)."""
    z = zoo["llama"]
    ms = models(z, [{"weight": w, "density": 0.4, "epsilon": 0.2} for w in (1.0, 0.5, 0.7)])
    cfg = {"merge_method": method, "base_model": z["base"], "dtype": "float32", "models": ms}
    mk, ours = run_both(cfg, tmp_path, seed=3)
    base = load_dir(Path(z["base"]))
    (f_mk, l1_mk, n), (f_ours, l1_ours, _) = moved(mk, base), moved(ours, base)
    if method == "della_linear":
        expect = 1 - 0.6**3
        for f in (f_mk, f_ours):
            assert abs(f - expect) < 6 * (expect * (1 - expect) / n) ** 0.5, (f, expect)
    assert abs(f_mk - f_ours) < 0.01
    assert abs(l1_ours / l1_mk - 1) < 0.02
    assert not torch.equal(mk["model.layers.0.mlp.up_proj.weight"], ours["model.layers.0.mlp.up_proj.weight"])


def rank_quartiles(d: torch.Tensor) -> torch.Tensor:
    """Per entry of the 2-D ``d``: the quartile (0..3) of its |d| rank within its row."""
    ranks = d.abs().argsort(dim=1).argsort(dim=1)
    return (ranks * 4) // d.shape[1]


def test_della_keep_probability_rises_with_magnitude_rank(zoo, tmp_path):
    """One model, density 0.5, epsilon 0.2, no rescale: entry kept with p = 0.3 + 0.4·rank_norm,
    so the four rank quartiles of each row keep about 35/45/55/65 % in mergekit and in seme; with
    the default rescale, each tensor's movement has the task vector's L1 norm again."""
    z = zoo["qwen2"]
    one = {"model": z["m2"], "parameters": {"weight": 1.0, "density": 0.5, "epsilon": 0.2}}
    cfg = {"merge_method": "della_linear", "base_model": z["base"], "dtype": "float32", "models": [one],
           "parameters": {"rescale": False}}
    mk, ours = run_both(cfg, tmp_path / "plain", seed=5)
    base, src = load_dir(Path(z["base"])), load_dir(Path(z["m2"]))
    for out in (mk, ours):
        kept = np.zeros(4)
        count = np.zeros(4)
        for n, t in out.items():
            if t.dim() != 2:
                continue
            full = src[n].double() - base[n].double()
            d = t.double() - base[n].double()
            assert torch.equal(d[d != 0], full[d != 0]), n  # kept entries unchanged
            q = rank_quartiles(full)
            for k in range(4):
                kept[k] += float(((d != 0) & (q == k)).sum())
                count[k] += float((q == k).sum())
        for k, p in enumerate((0.35, 0.45, 0.55, 0.65)):
            assert abs(kept[k] / count[k] - p) < 6 * (p * (1 - p) / count[k]) ** 0.5, (k, kept[k] / count[k])

    cfg["parameters"] = {}  # rescale: true, mergekit's default for DELLA
    mk, ours = run_both(cfg, tmp_path / "rescaled", seed=5)
    for out in (mk, ours):
        for n, t in out.items():
            if t.dim() != 2:
                continue
            d, full = t.double() - base[n].double(), src[n].double() - base[n].double()
            assert float((d != 0).double().mean()) == pytest.approx(0.5, abs=6 * (0.25 / d.numel()) ** 0.5), n
            assert float(d.abs().sum()) == pytest.approx(float(full.abs().sum()), rel=1e-4), n


@pytest.mark.parametrize("method", ["breadcrumbs", "breadcrumbs_ties"])
def test_breadcrumbs_l1_rescale_as_mergekit(zoo, tmp_path, method):
    """``rescale: true`` restores each task vector's L1 norm after the trim, in both; mergekit sums
    the norms in float32 while seme sums them exactly, so results agree to a few rounding steps."""
    z = zoo["gemma2"]
    cfg = {"merge_method": method, "base_model": z["base"], "dtype": "float32",
           "parameters": {"rescale": True},
           "models": [{"model": z["m1"], "parameters": {"weight": 1.0, "density": 0.6, "gamma": 0.1}}]}
    mk, ours = run_both(cfg, tmp_path)
    base, src = load_dir(Path(z["base"])), load_dir(Path(z["m1"]))
    for out in (mk, ours):
        for n, t in out.items():
            if t.dim() != 2 or n not in src:
                continue
            d, full = t.double() - base[n].double(), src[n].double() - base[n].double()
            assert float(d.abs().sum()) == pytest.approx(float(full.abs().sum()), rel=1e-4), n
    for n, a in mk.items():
        scale = np.maximum(np.abs(a.double().numpy()), np.abs(base[n].double().numpy()) if n in base else 0)
        assert (np.abs(a.double().numpy() - ours[n].double().numpy()) <= 4 * step(scale, torch.float32)).all(), n


# ---------------------------------------------------------------- the functions themselves


def call(name: str, base, tensors, mps=None, seed: int = 0, **params):
    from seme import methods

    spec = methods.get(name)
    mps = mps or [{}] * len(tensors)
    mp = [{**spec.model_params, **m} for m in mps]
    gp = {**spec.global_params, **params}
    return spec.fn(base, tensors, mp, gp, torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module")
def small():
    g = torch.Generator().manual_seed(0)
    b = torch.randn(48, 40, generator=g)
    return b, [b + 0.1 * torch.randn(48, 40, generator=g) for _ in range(3)]


def test_registry_needs_base_and_mergekit_parameters():
    """Names, which methods need a base (mergekit's input contracts) and parameter defaults."""
    from seme import methods

    needs = {"della": True, "della_linear": True, "breadcrumbs": True, "breadcrumbs_ties": True, "sce": True,
             "arcee_fusion": True, "nearswap": True, "nuslerp": False, "multislerp": False, "karcher": False}
    for name, nb in needs.items():
        assert methods.get(name).needs_base is nb, name
    assert methods.get("della").model_params == {"weight": 1.0, "density": 1.0, "epsilon": 0.15}
    assert methods.get("breadcrumbs_ties").model_params == {"weight": 1.0, "density": 1.0, "gamma": 0.01}
    assert methods.get("della").global_params["normalize"] is True
    assert methods.get("della_linear").global_params["normalize"] is False
    assert all(methods.get(m).global_params["rescale"] is r
               for m, r in (("della", True), ("della_linear", True), ("breadcrumbs", False)))
    assert methods.get("sce").global_params == {"select_topk": 1.0, "int8_mask": False}
    assert methods.get("nuslerp").global_params == {"nuslerp_row_wise": False, "nuslerp_flatten": True}
    assert methods.get("multislerp").global_params == {"normalize_weights": True, "eps": 1e-8}
    assert methods.get("karcher").global_params == {"max_iter": 10, "tol": 1e-5}
    assert methods.get("nearswap").global_params == {"t": None}  # required
    assert methods.get("arcee_fusion").global_params == {} and methods.get("arcee_fusion").model_params == {}


@pytest.mark.parametrize("name,base,n,mps,params,match", [
    ("della", True, 1, [{"density": 0.1, "epsilon": 0.15}], {}, r"della: density ± epsilon .* model 0"),
    ("della_linear", True, 1, [{"density": 0.9, "epsilon": 0.1}], {}, r"density ± epsilon"),
    ("della", True, 1, [{"density": 0.5, "epsilon": -0.1}], {}, r"epsilon ≥ 0"),
    ("della", True, 1, [{"density": 0.0}], {}, r"della: density must be in \(0, 1\]"),
    ("breadcrumbs", True, 1, [{"density": 1.5}], {}, r"breadcrumbs: density must be in \(0, 1\]"),
    ("breadcrumbs_ties", True, 1, [{"density": 0.5, "gamma": 1.5}], {}, r"gamma must be in \[0, 1\]"),
    ("breadcrumbs", False, 1, [{}], {}, r"breadcrumbs needs a base_model"),
    ("sce", True, 2, None, {"select_topk": 0.0}, r"select_topk must be in \(0, 1\]"),
    ("sce", True, 2, None, {"select_topk": "most"}, r"'select_topk' must be a number"),
    ("nuslerp", True, 3, None, {}, r"nuslerp merges exactly 2 models besides base_model, got 3"),
    ("nuslerp", False, 2, [{"weight": "x"}, {}], {}, r"'weight' must be a number for model 0"),
    ("multislerp", False, 2, [{"weight": 1.0}, {"weight": -1.0}], {}, r"weights sum to 0"),
    ("karcher", False, 2, None, {"max_iter": 2.5}, r"max_iter must be a whole number"),
    ("karcher", False, 2, None, {"tol": -1}, r"tol must be ≥ 0"),
    ("nearswap", True, 1, None, {"t": None}, r"nearswap: parameter 't' is required"),
    ("nearswap", True, 1, None, {"t": -0.1}, r"t must be ≥ 0"),
    ("nearswap", True, 2, None, {"t": 0.1}, r"nearswap merges exactly 2 models, base_model and one other; got 2"),
    ("arcee_fusion", True, 2, None, {}, r"arcee_fusion merges exactly 2 models"),
    ("arcee_fusion", False, 1, None, {}, r"arcee_fusion needs a base_model"),
])
def test_bad_parameters_are_one_line_config_errors(small, name, base, n, mps, params, match):
    b, ms = small
    with pytest.raises(ConfigError, match=match) as e:
        call(name, b if base else None, ms[:n], mps, **params)
    assert "\n" not in str(e.value)


def test_multislerp_antipodal_models_are_a_config_error(small):
    b, _ = small
    with pytest.raises(ConfigError, match="weighted mean direction of the models is zero"):
        call("multislerp", None, [b, -b, b.clone(), -b.clone()])


def test_della_draws_follow_the_seed_and_exact_rescale_divides_by_p(small):
    """Same seed, same mask; another seed, another; ``rescale: exact`` divides each kept entry by
    its own keep probability (the DELLA paper's rescale)."""
    from seme.methods.sparse_gta import della_probs

    b, ms = small
    mp = [{"density": 0.4, "epsilon": 0.2}]
    a1, a2 = call("della_linear", b, ms[:1], mp, seed=1), call("della_linear", b, ms[:1], mp, seed=1)
    assert torch.equal(a1, a2) and not torch.equal(a1, call("della_linear", b, ms[:1], mp, seed=2))
    out = call("della_linear", b, ms[:1], mp, seed=1, rescale="exact")
    d, full = out - b, ms[0] - b
    p = della_probs(full, 0.4, 0.2)
    kept = (out - b) != 0
    assert 0.3 < float(kept.float().mean()) < 0.5
    torch.testing.assert_close(d[kept], (full / p)[kept], rtol=1e-6, atol=1e-7)


def test_della_on_the_executor_is_a_cli_error_line(zoo, tmp_path, capsys):
    """A bad epsilon through ``seme merge``: one error line, exit 2, no output left."""
    from seme.cli import main

    z = zoo["llama"]
    cfg = {"merge_method": "della", "base_model": z["base"], "dtype": "float32",
           "models": [{"model": z["m0"], "parameters": {"density": 0.2, "epsilon": 0.3}}]}
    path = tmp_path / "della.yaml"
    path.write_text(yaml.safe_dump(cfg))
    capsys.readouterr()
    rc = main(["-q", "merge", str(path), str(tmp_path / "out")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("seme: error: della: density ± epsilon"), err
    assert not (tmp_path / "out").exists()
