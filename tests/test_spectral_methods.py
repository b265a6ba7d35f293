"""The spectral methods (iso_c, iso_cts, tsv, wudi, cart, svc): cross-checked against FusionBench 0.2.33's
own functions on the same task vectors of tiny real models, plus closed-form properties.

Our merges run through the real executor (YAML config -> run_merge -> safetensors); FusionBench's
functions get the task vectors of the very files we merged. FusionBench has no CART, and its WUDI is
300-400 Adam steps from Σ τ_k rather than the closed form, so those two are checked against
independent computations instead (docs/spectral-methods.md lists every difference).
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tiny_model, perturb_model
from safetensors.torch import load_file, save_file

from seme.config import load_config
from seme.errors import ConfigError
from seme.merge import run_merge
from seme.methods import get, spectral


def _fusion_bench(rel: str):
    """A FusionBench source file, loaded on its own: importing it as ``fusion_bench.method.…`` would
    run the package ``__init__``s, which pull in lightning (about 8 s of CPU) for nothing."""
    path = Path(pytest.importorskip("fusion_bench").__file__).parent / "method" / rel
    spec = importlib.util.spec_from_file_location("fb_" + path.stem, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread here: these tests are many small SVDs, which MKL's OpenMP threads make up to
    30x slower in CPU time when the two cores are shared with other jobs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def fb():
    return {
        "iso": _fusion_bench("isotropic_merging/iso_utils.py"),
        "tsv": _fusion_bench("task_singular_vector/utils/TSVM_utils.py"),
        "svc": _fusion_bench("singular_value_calibration/utils.py"),
    }


def load_dir(d: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        out.update(load_file(f))
    return out


def low_rank_expert(src: Path, dst: Path, rank: int, seed: int) -> Path:
    """A LoRA-like expert: base + B·A (rank ``rank``) on every 2-D tensor, other tensors unchanged."""
    g = torch.Generator().manual_seed(seed)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            (dst / f.name).write_bytes(f.read_bytes())
    for f in src.glob("*.safetensors"):
        sd = load_file(f)
        for k, v in sd.items():
            if v.dim() == 2:
                b = torch.randn(v.shape[0], rank, generator=g) * 0.05
                a = torch.randn(rank, v.shape[1], generator=g) * 0.05
                sd[k] = v + b @ a
        save_file(sd, dst / f.name, metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module")
def zoo(tmp_path_factory) -> dict:
    """A tiny llama base, three full-rank fine-tune-like experts and three rank-2 'LoRA' experts."""
    tmp = tmp_path_factory.mktemp("spectral")
    base = make_tiny_model(tmp / "base", "llama", seed=0)
    experts = [perturb_model(base, tmp / f"e{i}", scale=0.02 * (i + 1), seed=10 + i) for i in range(3)]
    lora = [low_rank_expert(base, tmp / f"l{i}", rank=2, seed=20 + i) for i in range(3)]
    return {"tmp": tmp, "base": base, "experts": experts, "lora": lora}


def merge(zoo: dict, method: str, name: str, params: dict | None = None, models=None, base=True,
          **extra) -> dict[str, torch.Tensor]:
    """Merge with seme's executor from a YAML config; the output tensors."""
    models = models or zoo["experts"]
    cfg = {"merge_method": method, "models": [{"model": str(m)} for m in models], "dtype": "float32",
           "parameters": params or {}, **extra}
    if base:
        cfg["base_model"] = str(zoo["base"])
    out = zoo["tmp"] / name
    path = out.with_suffix(".yaml")
    path.write_text(yaml.safe_dump(cfg))
    run_merge(load_config(path), out, progress=False)
    return load_dir(out)


def task_vectors(zoo: dict, models=None) -> tuple[dict, list[dict]]:
    base = load_dir(zoo["base"])
    return base, [{k: v - base[k] for k, v in load_dir(m).items()} for m in models or zoo["experts"]]


def rel_err(ours: torch.Tensor, ref: torch.Tensor, base: torch.Tensor) -> float:
    """‖ours − ref‖ relative to the size of the reference's update."""
    return float((ours.double() - ref.double()).norm() / (ref.double() - base.double()).norm().clamp_min(1e-30))


def assert_same_merge(ours: dict, base: dict, ref_update: dict, lam: float, tol: float) -> None:
    assert sorted(ours) == sorted(base)
    for k, b in base.items():
        ref = b + lam * ref_update[k]
        assert rel_err(ours[k], ref, b) < tol, (k, rel_err(ours[k], ref, b))


# -- cross-checks against FusionBench ---------------------------------------------------------------
@pytest.mark.parametrize("spectrum", ["nonzero", "full"])
def test_iso_c_matches_fusion_bench(zoo, fb, spectrum):
    """Full-rank task vectors: both spectra are FusionBench's iso_c (every 2-D tensor, incl. the
    embedding and LM head; other tensors the mean task vector, times the scale)."""
    base, tvs = task_vectors(zoo)
    ours = merge(zoo, "iso_c", f"iso_c_{spectrum}", {"lambda": 1.5, "spectrum": spectrum})
    assert_same_merge(ours, base, fb["iso"].iso_c(tvs, accelerator="cpu"), 1.5, 1e-4)


def test_iso_c_nonzero_spectrum_differs_from_fusion_bench_only_by_null_directions(zoo, fb):
    """Rank-6 sums (three rank-2 experts): FusionBench gives all min(m, n) directions the mean σ
    (arbitrary null-space directions included); ours keeps the 6 non-zero ones. Inside M's row and
    column spaces, FusionBench's update is ours scaled by 6/min(m, n)."""
    base, tvs = task_vectors(zoo, zoo["lora"])
    ours = merge(zoo, "iso_c", "iso_c_lora", models=zoo["lora"])
    ref = fb["iso"].iso_c(tvs, accelerator="cpu")
    for k, b in base.items():
        if b.dim() != 2:
            continue
        upd = (ours[k] - b).double()
        s = torch.linalg.svdvals(upd)
        assert int((s > 1e-4 * s[0]).sum()) == 6, k  # flat over exactly the non-zero directions
        torch.testing.assert_close(s[:6], s[:6].mean().expand(6), rtol=1e-4, atol=0)
        s_ref = torch.linalg.svdvals(ref[k].double())
        assert float(s_ref[-1] / s_ref[0]) > 0.999, k  # FusionBench: flat over all min(m, n)
        u, _, vh = torch.linalg.svd(sum(tv[k] for tv in tvs).double(), full_matrices=False)
        pu, pv = u[:, :6] @ u[:, :6].T, vh[:6].T @ vh[:6]
        torch.testing.assert_close(pu @ ref[k].double() @ pv, upd * 6 / min(b.shape), rtol=0, atol=1e-4 * float(s[0]))


@pytest.mark.parametrize("spectrum", ["nonzero", "full"])
def test_iso_cts_matches_fusion_bench(zoo, fb, spectrum):
    base, tvs = task_vectors(zoo)
    ours = merge(zoo, "iso_cts", f"iso_cts_{spectrum}", {"spectrum": spectrum})
    ref = fb["iso"].iso_cts(tvs, common_space_fraction=0.8, accelerator="cpu")
    assert_same_merge(ours, base, ref, 1.0, 1e-4)


def test_tsv_matches_fusion_bench(zoo, fb):
    base, tvs = task_vectors(zoo)
    ours = merge(zoo, "tsv", "tsv", {"lambda": 0.7})
    ref = fb["tsv"].compute_and_sum_svd_mem_reduction(tvs, accelerator="cpu")
    assert_same_merge(ours, base, ref, 0.7, 1e-4)


@pytest.mark.parametrize(("method", "params"), [("task_arithmetic", {"lambda": 0.3}), ("tsv", {"lambda": 1.0})])
def test_svc_matches_fusion_bench(zoo, fb, method, params):
    """FusionBench's configs: SVC (alpha 0.1) after task arithmetic 0.3 and after TSV. FusionBench
    computes in float64, we in float32; non-2-D tensors stay as the method made them. (Not after
    Iso-C: its flat spectrum leaves the left singular basis, so SVC's result, to rounding noise.)"""
    base = load_dir(zoo["base"])
    plain = merge(zoo, method, f"{method}_plain", params)
    ours = merge(zoo, method, f"{method}_svc", {**params, "svc": True, "svc_alpha": 0.1})
    models = [load_dir(m) for m in zoo["experts"]]
    for k, b in base.items():
        if b.dim() != 2:
            assert torch.equal(ours[k], plain[k]), k
            continue
        ref = fb["svc"].subspace_consistency_spectral_calibration_accelerated(
            b, [m[k] for m in models], plain[k], alpha=0.1, accelerator="cpu")
        assert rel_err(ours[k], ref, b) < 1e-4, k
        assert rel_err(ours[k], plain[k], b) > 1e-2, k  # the calibration did something
    manifest = yaml.safe_load((zoo["tmp"] / f"{method}_svc" / "seme_manifest.json").read_text())
    assert manifest["method"] == f"{method}+svc" and manifest["parameters"]["global"]["svc"] is True


# -- WUDI: closed form vs an independent least-squares solve ----------------------------------------
def wudi_lstsq(taus: list[torch.Tensor], eps: float) -> torch.Tensor:
    """min_X Σ_k ‖(X − τ_k)τ_kᵀ‖²/‖τ_k‖² + ε‖X‖² (ε = eps·K/in) as one stacked least-squares problem
    (no normal equations): X·[τ_1ᵀ/‖τ_1‖ … τ_Kᵀ/‖τ_K‖ √ε·I] ≈ [τ_1τ_1ᵀ/‖τ_1‖ … τ_Kτ_Kᵀ/‖τ_K‖ 0]."""
    t = [x.double() for x in taus]
    n_in = t[0].shape[1]
    ridge = eps * len(t) / n_in  # tr(C_k) = 1
    z = torch.cat([x.T / x.norm() for x in t] + [math.sqrt(ridge) * torch.eye(n_in, dtype=torch.float64)], 1)
    y = torch.cat([x @ x.T / x.norm() for x in t] + [torch.zeros(t[0].shape[0], n_in, dtype=torch.float64)], 1)
    return torch.linalg.lstsq(z.T, y.T).solution.T


def test_wudi_is_the_least_squares_solution(zoo):
    """Every 2-D tensor of the real merge equals the stacked lstsq solution; that solution is the
    stationary point of FusionBench's WUDI loss (whose Adam steps only approach it)."""
    base, tvs = task_vectors(zoo)
    ours = merge(zoo, "wudi", "wudi", {"eps": 1e-6})
    for k, b in base.items():
        taus = [tv[k] for tv in tvs]
        if b.dim() != 2:
            torch.testing.assert_close(ours[k], b + sum(taus) / 3)
            continue
        ref = wudi_lstsq(taus, 1e-6)
        assert rel_err(ours[k], b.double() + ref, b) < 1e-5, k
        x = (ours[k].double() - b.double()).requires_grad_(True)
        loss = sum(((x - t.double()) @ t.double().T).square().sum() / t.double().square().sum() for t in taus)
        (grad,) = torch.autograd.grad(loss, x)
        x0 = sum(t.double() for t in taus).requires_grad_(True)  # FusionBench's starting point
        loss0 = sum(((x0 - t.double()) @ t.double().T).square().sum() / t.double().square().sum() for t in taus)
        (grad0,) = torch.autograd.grad(loss0, x0)
        assert float(grad.norm()) < 1e-3 * float(grad0.norm()) and float(loss.detach()) < float(loss0.detach()), k


def test_wudi_needs_float64_for_low_rank_task_vectors():
    """Rank-2 task vectors: Σ C_k has a large null space held only by ε = 1e-6. The same closed form in
    float32 is off by a visible fraction there; the float64 solve matches lstsq."""
    g = torch.Generator().manual_seed(3)
    taus = [torch.randn(96, 2, generator=g) @ torch.randn(2, 160, generator=g) for _ in range(3)]
    ref = wudi_lstsq(taus, 1e-6)
    ours = spectral.wudi_update(taus, 1e-6).double()
    assert float((ours - ref).norm() / ref.norm()) < 1e-6
    gram = sum(t.T @ t / t.square().sum() for t in taus)
    rhs = sum(t @ (t.T @ t) / t.square().sum() for t in taus)
    gram = gram + 1e-6 * gram.trace() / 160 * torch.eye(160)
    f32 = torch.linalg.solve(gram, rhs, left=False).double()
    assert float((f32 - ref).norm() / ref.norm()) > 1e-3


# -- CART: no reference implementation in FusionBench -----------------------------------------------
def test_cart_matches_an_independent_float64_computation(zoo):
    """θ̄ + λ·Σ_k rank-⌈0.08·min(m, n)⌉ truncations of θ_k − θ̄ (numpy SVD in float64); other tensors θ̄;
    no base model needed."""
    import numpy as np

    ours = merge(zoo, "cart", "cart", {"lambda": 1.2}, base=False)
    models = [load_dir(m) for m in zoo["experts"]]
    for k in ours:
        th = [m[k].double().numpy() for m in models]
        mean = sum(th) / 3
        ref = mean.copy()
        if mean.ndim == 2:
            r = math.ceil(0.08 * min(mean.shape))
            for t in th:
                u, s, vh = np.linalg.svd(t - mean, full_matrices=False)
                ref += 1.2 * (u[:, :r] * s[:r]) @ vh[:r]
        np.testing.assert_allclose(ours[k].double().numpy(), ref, rtol=1e-5, atol=1e-6, err_msg=k)


def test_cart_limits():
    g = torch.Generator().manual_seed(4)
    ts = [torch.randn(12, 20, generator=g) for _ in range(3)]
    spec = get("cart")
    mean = torch.stack(ts).mean(0)
    full = spec.fn(None, ts, [{}] * 3, {"lambda": 1.0, "rank_ratio": 1.0}, None)
    torch.testing.assert_close(full, mean, rtol=0, atol=1e-5)  # Σ_k (θ_k − θ̄) = 0
    one = spec.fn(None, ts[:1], [{}], {"lambda": 3.0, "rank_ratio": 0.08}, None)
    torch.testing.assert_close(one, ts[0])
    assert [spectral.cart_rank((100, 300), 0.08), spectral.cart_rank((64, 64), 0.08)] == [8, 6]


# -- closed-form properties ---------------------------------------------------------------------------
def test_tsv_orthonormal_factors_and_spectrum():
    """U⊥ and V⊥ are orthonormal, so U⊥ S V⊥ᵀ is an SVD: its singular values are the kept ones."""
    g = torch.Generator().manual_seed(5)
    taus = [torch.randn(40, 64, generator=g) for _ in range(3)]
    parts = [torch.linalg.svd(t, full_matrices=False) for t in taus]
    q = 40 // 3
    u = spectral.polar(torch.cat([p[0][:, :q] for p in parts], 1))
    vh = spectral.polar(torch.cat([p[2][:q] for p in parts], 0))
    torch.testing.assert_close(u.T @ u, torch.eye(3 * q), rtol=0, atol=1e-5)
    torch.testing.assert_close(vh @ vh.T, torch.eye(3 * q), rtol=0, atol=1e-5)
    kept = torch.cat([p[1][:q] for p in parts]).sort(descending=True).values
    torch.testing.assert_close(torch.linalg.svdvals(spectral.tsv_update(taus))[: 3 * q], kept, rtol=1e-4, atol=0)


def test_iso_cts_flat_spectrum_and_split():
    g = torch.Generator().manual_seed(6)
    taus = [torch.randn(30, 50, generator=g) for _ in range(4)]
    s = torch.linalg.svdvals(spectral.iso_cts_update(taus, 0.8))
    torch.testing.assert_close(s, s.mean().expand(30), rtol=1e-4, atol=0)
    assert spectral.iso_cts_split(30, 4, 0.8) == (22, 2)  # int(24) common; round(6/4) = 2 per task
    assert spectral.iso_cts_split(2, 3, 0.0) == (2, 0)  # FusionBench's rounding would leave -1 common


def test_iso_c_rank_is_found_in_float32_at_smollm_size():
    """576×1536 (SmolLM2-135M's MLP) with a rank-24 sum: float32 SVD finds exactly 24 directions."""
    g = torch.Generator().manual_seed(7)
    taus = [torch.randn(576, 8, generator=g) @ torch.randn(8, 1536, generator=g) * 1e-3 for _ in range(3)]
    s = torch.linalg.svdvals(spectral.iso_c_update(taus).double())
    assert int((s > 1e-5 * s[0]).sum()) == 24
    torch.testing.assert_close(s[:24], s[:24].mean().expand(24), rtol=1e-4, atol=0)


def test_weights_scale_task_vectors():
    g = torch.Generator().manual_seed(8)
    b = torch.randn(16, 24, generator=g)
    ts = [b + 0.1 * torch.randn(16, 24, generator=g) for _ in range(3)]
    for name in ("iso_c", "iso_cts", "tsv"):  # positively homogeneous in the task vectors
        spec = get(name)
        gp = dict(spec.global_params)
        twice = spec.fn(b, ts, [{"weight": 2.0}] * 3, gp, None)
        lam2 = spec.fn(b, ts, [{"weight": 1.0}] * 3, {**gp, "lambda": 2.0}, None)
        torch.testing.assert_close(twice, lam2, rtol=1e-5, atol=1e-5)


def test_svc_with_one_model_undoes_the_scale():
    """K = 1: s_r = λ on every direction, so σ_r ← σ_r/max(α, λ): λ·τ comes back as τ (λ ≥ α) or as
    (λ/α)·τ (λ < α)."""
    g = torch.Generator().manual_seed(9)
    b = torch.randn(20, 30, generator=g)
    tau = torch.randn(20, 30, generator=g)
    spec = get("task_arithmetic")
    wrapped = spectral.with_svc(spec)
    for lam, expect in ((0.5, 1.0), (2.0, 1.0), (0.05, 0.5)):
        params = {**spec.global_params, "lambda": lam, "svc": True, "svc_alpha": 0.1}
        out = wrapped.fn(b, [b + tau], [{"weight": 1.0}], params, None)
        torch.testing.assert_close(out - b, expect * tau, rtol=0, atol=1e-4)


def test_gpt2_conv1d_weights_are_merged_as_out_by_in(tmp_path):
    """GPT-2 stores Conv1D weights (in, out); WUDI's Gram must be the input side, so the executor hands
    the method the transpose (FusionBench would use the stored layout)."""
    base = make_tiny_model(tmp_path / "g", "gpt2", seed=0)
    experts = [perturb_model(base, tmp_path / f"g{i}", scale=0.05, seed=30 + i) for i in range(2)]
    zoo = {"tmp": tmp_path, "base": base}
    ours = merge(zoo, "wudi", "gpt2_wudi", models=experts)
    b = load_dir(base)["transformer.h.0.attn.c_attn.weight"]  # (64, 192): in × out
    taus = [load_dir(e)["transformer.h.0.attn.c_attn.weight"] - b for e in experts]
    out_in = spectral.wudi_update([t.T for t in taus]).T
    stored = spectral.wudi_update(taus)
    got = ours["transformer.h.0.attn.c_attn.weight"]
    assert rel_err(got, b + out_in, b) < 1e-5
    assert rel_err(got, b + stored, b) > 1e-2


# -- errors --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("method", "params", "needle"), [
    ("iso_c", {"spectrum": "half"}, "iso_c: spectrum must be 'nonzero' or 'full'"),
    ("iso_cts", {"common_fraction": 1.5}, "iso_cts: common_fraction must be in [0.0, 1.0]"),
    ("cart", {"rank_ratio": 0}, "cart: rank_ratio must be in (0.0, 1.0]"),
    ("wudi", {"eps": 0}, "wudi: eps must be > 0"),
    ("tsv", {"svc": True, "svc_alpha": -1}, "svc: svc_alpha must be > 0"),
])
def test_bad_parameters_are_one_line_errors(zoo, method, params, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace("[", r"\[").replace(".", r"\.")):
        merge(zoo, method, f"bad_{method}", params, base=method != "cart")
    assert not (zoo["tmp"] / f"bad_{method}").exists()


def test_svc_config_errors(zoo):
    with pytest.raises(ConfigError, match="svc needs base_model"):
        merge(zoo, "linear", "svc_nobase", {"svc": True}, base=False)
    with pytest.raises(ConfigError, match="unknown parameter 'svc' for merge_method seme"):
        merge(zoo, "seme", "svc_seme", {"svc": True})


def test_cli_reports_a_bad_parameter_in_one_line(zoo, capsys):
    from seme.cli import main

    cfg = zoo["tmp"] / "cli_bad.yaml"
    cfg.write_text(yaml.safe_dump({"merge_method": "tsv", "base_model": str(zoo["base"]),
                                   "models": [{"model": str(m)} for m in zoo["experts"]],
                                   "parameters": {"spectrum": "all"}}))
    capsys.readouterr()
    rc = main(["-q", "merge", str(cfg), str(zoo["tmp"] / "cli_bad")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1, err
    assert err[0].startswith("seme: error: tsv: spectrum must be 'nonzero' or 'full', got 'all'"), err
    assert str(cfg) in err[0], err  # the config is named
    assert not (zoo["tmp"] / "cli_bad").exists()


def test_svc_per_filter(zoo):
    """``svc`` as a filter list calibrates only the matching tensors."""
    plain = merge(zoo, "task_arithmetic", "ta_plain_f", {"lambda": 0.5})
    ours = merge(zoo, "task_arithmetic", "ta_svc_f",
                 {"lambda": 0.5, "svc": [{"filter": "mlp", "value": True}, {"value": False}]})
    for k, v in plain.items():
        assert torch.equal(ours[k], v) != (v.dim() == 2 and "mlp" in k), k


def test_registered_with_the_issue_defaults():
    want = {"iso_c": {"lambda": 1.0, "spectrum": "nonzero"},
            "iso_cts": {"lambda": 1.0, "common_fraction": 0.8, "spectrum": "nonzero"},
            "tsv": {"lambda": 1.0, "spectrum": "full"}, "wudi": {"lambda": 1.0, "eps": 1e-6},
            "cart": {"lambda": 1.0, "rank_ratio": 0.08}}
    for name, params in want.items():
        spec = get(name)
        assert spec.global_params == params and spec.out_in and spec.needs_base == (name != "cart"), name
    wrapped = spectral.with_svc(get("ties"))
    assert wrapped.name == "ties+svc" and wrapped.global_params["svc_alpha"] == 0.1 and wrapped.prepare is None
