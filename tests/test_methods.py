"""Classic merge methods (seme/methods/): each checked against its closed form, computed here
independently in float64 with numpy on small tensors, plus parameter validation, DARE statistics,
determinism and the registry's lazy loading."""

from __future__ import annotations

import sys
import textwrap

import numpy as np
import pytest
import torch

from seme import methods
from seme.errors import ConfigError

CLASSIC = ["dare_linear", "dare_ties", "linear", "model_stock", "slerp", "task_arithmetic", "ties"]


def call(name, base, tensors, model_params=None, rng_seed=0, **params):
    """Run method ``name`` with its defaults filled in, as the executor does."""
    spec = methods.get(name)
    mp = [{**spec.model_params, **(p or {})} for p in (model_params or [{}] * len(tensors))]
    gp = {**spec.global_params, **params}
    return spec.fn(base, tensors, mp, gp, torch.Generator().manual_seed(rng_seed))


def step(x: np.ndarray, dtype: torch.dtype) -> np.ndarray:
    """One rounding step (spacing between neighbours) of ``dtype`` at the magnitude of ``x``."""
    eps = torch.finfo(dtype).eps
    tiny = torch.finfo(dtype).tiny
    mag = np.maximum(np.abs(x), tiny)
    return eps * 2.0 ** np.floor(np.log2(mag))


def assert_close(ours: torch.Tensor, oracle: np.ndarray, dtype: torch.dtype) -> None:
    got = ours.double().numpy()
    if dtype == torch.float32:
        np.testing.assert_allclose(got, oracle, rtol=0, atol=1e-6)
    else:  # within one rounding step of the dtype
        err = np.abs(got - oracle)
        assert np.all(err <= step(oracle, dtype)), f"max err {err.max()} > one {dtype} step"


@pytest.fixture
def data():
    """A base and three fine-tune-like variants (float64 numpy originals)."""
    rng = np.random.default_rng(0)
    base = rng.normal(size=(24, 16))
    models = [base + 0.1 * rng.normal(size=base.shape) for _ in range(3)]
    return base, models


def as_t(arrs, dtype):
    return [torch.tensor(a, dtype=dtype) for a in arrs]


def np_of(t: torch.Tensor) -> np.ndarray:
    return t.double().numpy()


def assert_close_stepwise(ours: torch.Tensor, oracle: np.ndarray, inputs, steps: int = 4) -> np.ndarray:
    """For methods that round every intermediate step in the compute dtype (as mergekit does):
    error within a few rounding steps at the scale of the largest input entry. Returns the mask
    of entries outside that bound."""
    scale = np.max(np.abs(np.stack([np_of(x) for x in inputs])), axis=0)
    return np.abs(np_of(ours) - oracle) > steps * step(scale, ours.dtype)


# ---------------------------------------------------------------- registry


def test_registry_lists_all_classic_methods():
    assert set(CLASSIC) <= set(methods.names())
    for n in CLASSIC:
        spec = methods.get(n)
        assert spec.name == n and callable(spec.fn)
    assert methods.get("linear").needs_base is False
    assert all(methods.get(n).needs_base for n in CLASSIC if n != "linear")


def test_mergekit_parameter_names_and_defaults():
    ta, ties, dt, dl = (methods.get(n) for n in ("task_arithmetic", "ties", "dare_ties", "dare_linear"))
    assert ta.global_params["normalize"] is False and ties.global_params["normalize"] is True
    assert dt.global_params["rescale"] is True and dl.global_params["rescale"] is True
    assert ties.global_params["rescale"] is False
    for s in (ta, ties, dt, dl):
        assert s.global_params["lambda"] == 1.0 and "int8_mask" in s.global_params
        assert s.model_params == {"weight": 1.0, "density": 1.0}
    assert methods.get("linear").global_params == {"normalize": True}
    assert methods.get("slerp").global_params == {"t": None}  # required, as in mergekit
    assert methods.get("model_stock").global_params == {"filter_wise": False}


def test_unknown_method_lists_valid_names():
    with pytest.raises(ConfigError, match="unknown merge_method 'nope'.*linear.*ties"):
        methods.get("nope")


def test_optional_module_registers_lazily(tmp_path, monkeypatch):
    """get() imports an optional module (like seme.semantic.merger) that registers itself on import."""
    pkg = tmp_path / "seme_fake_method.py"
    pkg.write_text(
        textwrap.dedent(
            """
            from seme.methods import MethodSpec, register
            def fn(base, tensors, model_params, params, rng):
                return tensors[0]
            register(MethodSpec(name="fake_x", fn=fn, needs_base=False))
            """
        )
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods, "_OPTIONAL_MODULES", ("seme_fake_method", "seme_absent_module_xyz"))
    monkeypatch.setitem(methods._loaded, "optional", False)
    monkeypatch.setattr(methods, "_REGISTRY", dict(methods._REGISTRY))
    assert methods.get("fake_x").name == "fake_x"  # the absent module is tolerated
    assert "fake_x" in methods.names()
    sys.modules.pop("seme_fake_method", None)


def test_optional_module_with_missing_dependency_is_an_error(tmp_path, monkeypatch):
    (tmp_path / "seme_broken_method.py").write_text("import seme_dependency_not_installed_xyz\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(methods, "_OPTIONAL_MODULES", ("seme_broken_method",))
    monkeypatch.setitem(methods._loaded, "optional", False)
    with pytest.raises(ModuleNotFoundError, match="seme_dependency_not_installed_xyz"):
        methods.get("nope")


def test_register_refuses_a_different_function_under_a_taken_name():
    spec = methods.get("linear")
    methods.register(spec)  # same function: no-op
    with pytest.raises(ValueError, match="already registered"):
        methods.register(methods.MethodSpec(name="linear", fn=lambda *a: None, needs_base=False))


# ---------------------------------------------------------------- linear


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_closed_form(data, dtype, normalize):
    _, models = data
    ts = as_t(models, dtype)
    w = [0.2, 0.5, 1.3]
    ours = call("linear", None, ts, [{"weight": x} for x in w], normalize=normalize)
    xs = [np_of(t) for t in ts]
    oracle = sum(wi * x for wi, x in zip(w, xs)) / (sum(w) if normalize else 1.0)
    assert ours.dtype == dtype
    assert_close(ours, oracle, dtype)


def test_linear_of_identical_models_is_the_model(data):
    base, _ = data
    m = torch.tensor(base, dtype=torch.float32)
    out = call("linear", None, [m, m.clone(), m.clone()], [{"weight": 0.3}, {"weight": 0.5}, {"weight": 0.2}])
    torch.testing.assert_close(out, m, rtol=0, atol=1e-6)


def test_linear_zero_weight_sum_is_a_config_error(data):
    _, models = data
    with pytest.raises(ConfigError, match="sum to 0"):
        call("linear", None, as_t(models[:2], torch.float32), [{"weight": 1.0}, {"weight": -1.0}])


# ---------------------------------------------------------------- task arithmetic


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize,lam", [(False, 1.0), (True, 0.7), (False, 0.5)])
def test_task_arithmetic_closed_form(data, dtype, normalize, lam):
    base, models = data
    b, *ts = as_t([base, *models], dtype)
    w = [0.4, 0.9, -0.3]
    ours = call("task_arithmetic", b, ts, [{"weight": x} for x in w], normalize=normalize, **{"lambda": lam})
    bb = np_of(b)
    delta = sum(wi * (np_of(t) - bb) for wi, t in zip(w, ts))
    if normalize:
        delta = delta / sum(w)
    oracle = bb + lam * delta
    if dtype == torch.float32:
        assert_close(ours, oracle, dtype)
    else:  # bf16 rounds every intermediate step as mergekit does
        assert not assert_close_stepwise(ours, oracle, [b, *ts]).any()


def test_task_arithmetic_leaves_out_a_listed_base(data):
    """As mergekit 0.1.5: the base, also listed under models, neither adds a vector nor a weight."""
    base, models = data
    b, m = as_t([base, models[0]], torch.float32)
    with_base = call("task_arithmetic", b, [b, m], [{"weight": 5.0}, {"weight": 0.5}], normalize=True)
    alone = call("task_arithmetic", b, [m], [{"weight": 0.5}], normalize=True)
    assert torch.equal(with_base, alone)
    torch.testing.assert_close(alone, m, rtol=0, atol=1e-6)  # normalized single model: itself


def test_methods_with_only_the_base_return_the_base(data):
    base, _ = data
    b = torch.tensor(base, dtype=torch.float32)
    for n in ("task_arithmetic", "ties", "dare_ties", "dare_linear"):
        assert torch.equal(call(n, b, [b]), b)


# ---------------------------------------------------------------- TIES


def ties_oracle(base, models, weights, densities, normalize=True, lam=1.0):
    """TIES from the paper, written independently: trim by full sort, elect by sum, disjoint mean."""
    deltas = []
    for m, d in zip(models, densities):
        delta = (m - base).ravel()
        k = max(1, int(d * delta.size))
        keep = np.zeros(delta.size, bool)
        keep[np.argsort(-np.abs(delta), kind="stable")[:k]] = True
        deltas.append(np.where(keep, delta, 0.0).reshape(base.shape))
    wd = np.stack([w * d for w, d in zip(weights, deltas)])
    sign = np.where(wd.sum(0) >= 0, 1.0, -1.0)
    agree = np.sign(wd) == sign
    num = (wd * agree).sum(0)
    den = (np.array(weights)[:, None, None] * agree).sum(0)
    den[den == 0] = 1
    return base + lam * (num / den if normalize else num)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("normalize,lam", [(True, 1.0), (False, 0.8)])
def test_ties_closed_form(data, dtype, normalize, lam):
    base, models = data
    b, *ts = as_t([base, *models], dtype)
    w, dens = [0.5, 1.0, 0.7], [0.3, 0.5, 0.9]
    ours = call("ties", b, ts, [{"weight": x, "density": d} for x, d in zip(w, dens)],
                normalize=normalize, **{"lambda": lam})
    oracle = ties_oracle(np_of(b), [np_of(t) for t in ts], w, dens, normalize, lam)
    if dtype == torch.float32:
        assert_close(ours, oracle, dtype)
    else:  # intermediate rounding in bf16 (as mergekit), and magnitude ties at the cut may differ
        assert assert_close_stepwise(ours, oracle, [b, *ts]).mean() < 0.02


def test_ties_trim_keeps_exactly_k_even_with_ties():
    from seme.methods.gta import topk_mask

    x = torch.tensor([1.0, -3.0, 2.0, 2.0, -2.0, 0.5, 2.0])
    m = topk_mask(x, 3)
    assert m.tolist() == [False, True, True, True, False, False, False]  # -3, then first two 2s
    assert int(topk_mask(torch.ones(10, 10), 37).sum()) == 37
    assert int(topk_mask(torch.randn(50, 7, dtype=torch.bfloat16), 100).sum()) == 100


def test_ties_sign_election_is_by_sum_not_count():
    """Two small positive updates lose to one large negative one ('sum' election)."""
    b = torch.zeros(1)
    ts = [torch.tensor([0.1]), torch.tensor([0.1]), torch.tensor([-1.0])]
    out = call("ties", b, ts, [{"weight": 1.0, "density": 1.0}] * 3)
    assert out.tolist() == [-1.0]
    tie = call("ties", b, [torch.tensor([1.0]), torch.tensor([-1.0])], [{"weight": 1.0}] * 2)
    assert tie.tolist() == [1.0]  # a zero sum elects +


def test_ties_rescale_keeps_l1_norm(data):
    base, models = data
    b, m = as_t([base, models[0]], torch.float32)
    out = call("ties", b, [m], [{"weight": 1.0, "density": 0.25}], rescale=True, normalize=False)
    delta, merged = (m - b), (out - b)
    assert int((merged != 0).sum()) == int(0.25 * merged.numel())
    torch.testing.assert_close(merged.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


# ---------------------------------------------------------------- DARE


def test_dare_mask_density_and_rescale_statistics():
    n = 200_000
    b = torch.zeros(n)
    m = torch.randn(n, generator=torch.Generator().manual_seed(3))
    for p in (0.1, 0.5, 0.9):
        sigma = (p * (1 - p) / n) ** 0.5
        # default (mergekit's rescale: true): the L1 norm of the task vector is kept
        out = call("dare_linear", b, [m], [{"weight": 1.0, "density": p}])
        kept = out != 0
        assert abs(kept.float().mean().item() - p) < 5 * sigma
        torch.testing.assert_close(out.abs().sum(), m.abs().sum(), rtol=1e-4, atol=0)
        # exact: kept entries are divided by p, so E[δ'] = δ
        exact = call("dare_linear", b, [m], [{"weight": 1.0, "density": p}], rescale="exact")
        assert torch.equal(exact[exact != 0], m[exact != 0] / p)
        # no rescale: kept entries unchanged
        raw = call("dare_linear", b, [m], [{"weight": 1.0, "density": p}], rescale=False)
        assert torch.equal(raw[raw != 0], m[raw != 0])
    ones = torch.ones(n)
    mean = call("dare_linear", b, [ones], [{"weight": 1.0, "density": 0.3}], rescale="exact").mean().item()
    assert abs(mean - 1.0) < 5 * (0.7 / 0.3 / n) ** 0.5


def test_dare_is_deterministic_in_the_rng_and_thread_count():
    b = torch.zeros(300, 200)
    ts = [torch.randn(300, 200, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    mp = [{"weight": 1.0, "density": 0.4}] * 3
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = call("dare_ties", b, ts, mp, rng_seed=7)
        torch.set_num_threads(2)
        two = call("dare_ties", b, ts, mp, rng_seed=7)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)
    assert not torch.equal(one, call("dare_ties", b, ts, mp, rng_seed=8))
    # the masks do not depend on the dtype either
    lin32 = call("dare_linear", b, ts[:1], mp[:1], rng_seed=5, rescale=False)
    lin16 = call("dare_linear", b.bfloat16(), [ts[0].bfloat16()], mp[:1], rng_seed=5, rescale=False)
    assert torch.equal(lin32 != 0, lin16 != 0)


def test_dare_ties_density_one_is_ties_without_trim(data):
    base, models = data
    b, *ts = as_t([base, *models], torch.float32)
    w = [0.5, 1.0, 0.7]
    out = call("dare_ties", b, ts, [{"weight": x, "density": 1.0} for x in w], normalize=True)
    oracle = ties_oracle(np_of(b), [np_of(t) for t in ts], w, [1.0] * 3, normalize=True)
    assert_close(out, oracle, torch.float32)


def test_dare_ties_elects_signs_on_the_dropped_vectors():
    """Where all kept entries agree in sign the result is their sum (normalize off)."""
    n = 50_000
    b = torch.zeros(n)
    pos = [torch.rand(n, generator=torch.Generator().manual_seed(i)) + 0.1 for i in range(2)]
    out = call("dare_ties", b, pos, [{"weight": 1.0, "density": 0.5}] * 2, rescale="exact")
    assert bool((out >= 0).all())
    frac = (out != 0).float().mean().item()
    assert abs(frac - 0.75) < 0.02  # 1 - (1 - p)^2
    # every entry is the sum of the kept (÷ p) entries: 0, 2a, 2b or 2a + 2b
    cand = torch.stack([torch.zeros(n), 2 * pos[0], 2 * pos[1], 2 * (pos[0] + pos[1])])
    assert float((cand - out).abs().min(dim=0).values.max()) < 1e-6
    assert int((out == 2 * (pos[0] + pos[1])).sum()) > 0.2 * n  # both kept: ~p^2


# ---------------------------------------------------------------- SLERP


def slerp_oracle(t, a, b):
    x, y = a.ravel(), b.ravel()
    cos = np.dot(x / np.linalg.norm(x), y / np.linalg.norm(y))
    if abs(cos) > 0.9995:
        return ((1 - t) * x + t * y).reshape(a.shape)
    om = np.arccos(np.clip(cos, -1, 1))
    return ((np.sin((1 - t) * om) * x + np.sin(t * om) * y) / np.sin(om)).reshape(a.shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_closed_form(data, dtype, t):
    rng = np.random.default_rng(1)
    a, c = rng.normal(size=(24, 16)), rng.normal(size=(24, 16))  # far apart: true spherical branch
    ta, tc = as_t([a, c], dtype)
    out = call("slerp", ta, [ta, tc], t=t)
    assert_close(out, slerp_oracle(t, np_of(ta), np_of(tc)), dtype)
    if t == 0.0:
        assert torch.equal(out, ta)  # base_model is t = 0
    # the base may also be given only as base_model, with the other model alone in models
    assert torch.equal(call("slerp", ta, [tc], t=t), out)


def test_slerp_collinear_falls_back_to_lerp(data):
    base, _ = data
    a = torch.tensor(base, dtype=torch.float32)
    b = 2.0 * a
    torch.testing.assert_close(call("slerp", a, [a, b], t=0.25), 1.25 * a, rtol=0, atol=1e-6)
    torch.testing.assert_close(call("slerp", a, [a, a.clone()], t=0.4), a, rtol=0, atol=1e-6)


def test_slerp_validation(data):
    base, models = data
    a, b, c = as_t([base, *models[:2]], torch.float32)
    with pytest.raises(ConfigError, match="exactly 2 models"):
        call("slerp", a, [a, b, c], t=0.5)
    with pytest.raises(ConfigError, match="is base_model one of the models"):
        call("slerp", a, [b, c], t=0.5)
    with pytest.raises(ConfigError, match="slerp needs a base_model"):
        call("slerp", None, [b, c], t=0.5)
    with pytest.raises(ConfigError, match="parameter 't' is required"):
        call("slerp", a, [a, b])


# ---------------------------------------------------------------- Model Stock


def model_stock_oracle(w0, ws, filter_wise=False):
    shape = w0.shape
    if filter_wise:
        w0, ws = np.atleast_2d(w0), [np.atleast_2d(w) for w in ws]
    else:
        w0, ws = w0.reshape(1, -1), [w.reshape(1, -1) for w in ws]
    offs = [w - w0 for w in ws]
    cos = []
    for i in range(len(offs)):
        for j in range(i + 1, len(offs)):
            nn = np.linalg.norm(offs[i], axis=-1) * np.linalg.norm(offs[j], axis=-1)
            cos.append(np.clip((offs[i] * offs[j]).sum(-1) / np.maximum(nn, 1e-6), -1, 1))
    c = np.mean(cos, axis=0)[:, None]
    n = len(ws)
    t = n * c / (1 + (n - 1) * c)
    return (t * np.mean(ws, axis=0) + (1 - t) * w0).reshape(shape)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("filter_wise", [False, True])
def test_model_stock_closed_form(dtype, filter_wise):
    rng = np.random.default_rng(2)
    base = rng.normal(size=(24, 16))
    shared = 0.1 * rng.normal(size=base.shape)  # correlated task vectors: 0 < cos < 1
    models = [base + shared + 0.1 * rng.normal(size=base.shape) for _ in range(3)]
    b, *ts = as_t([base, *models], dtype)
    out = call("model_stock", b, ts, filter_wise=filter_wise)
    oracle = model_stock_oracle(np_of(b), [np_of(t) for t in ts], filter_wise)
    if dtype == torch.float32:
        assert_close(out, oracle, dtype)
    else:  # computed in bf16 throughout (as mergekit)
        assert not assert_close_stepwise(out, oracle, [b, *ts]).any()


def test_model_stock_of_identical_models_is_the_model(data):
    base, _ = data
    m = torch.tensor(base, dtype=torch.float32)
    assert torch.equal(call("model_stock", m, [m.clone(), m.clone(), m.clone()]), m)


def test_model_stock_needs_two_models_besides_the_base(data):
    base, models = data
    b, m = as_t([base, models[0]], torch.float32)
    with pytest.raises(ConfigError, match="at least 2 models besides base_model, got 1"):
        call("model_stock", b, [b, m])


# ---------------------------------------------------------------- shared checks


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "dare_linear"])
def test_identical_models_merge_to_the_model(data, name):
    base, _ = data
    m = torch.tensor(base, dtype=torch.float32)
    out = call(name, m, [m.clone(), m.clone()], [{"weight": 0.6, "density": 0.5}] * 2)
    assert torch.equal(out, m)


@pytest.mark.parametrize("name", ["ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("bad", [0.0, -0.1, 1.5, "half", None])
def test_density_outside_unit_interval_is_a_config_error(data, name, bad):
    base, models = data
    b, m = as_t([base, models[0]], torch.float32)
    with pytest.raises(ConfigError, match=f"{name}: .*density"):
        call(name, b, [m], [{"weight": 1.0, "density": bad}])


@pytest.mark.parametrize("name", ["task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp", "model_stock"])
def test_missing_base_is_a_config_error(data, name):
    _, models = data
    ts = as_t(models, torch.float32)
    with pytest.raises(ConfigError, match=f"{name} needs a base_model"):
        call(name, None, ts, t=0.5)


def test_bad_parameter_types_are_config_errors(data):
    base, models = data
    b, m = as_t([base, models[0]], torch.float32)
    with pytest.raises(ConfigError, match="normalize.*true or false"):
        call("ties", b, [m], normalize="maybe")
    with pytest.raises(ConfigError, match="rescale must be true, false or 'exact'"):
        call("dare_ties", b, [m], rescale="sometimes")
    with pytest.raises(ConfigError, match="'weight' must be a number for model 0"):
        call("task_arithmetic", b, [m], [{"weight": "heavy"}])
    with pytest.raises(ConfigError, match="'weight' is required for model 0"):
        call("linear", None, [m], [{"weight": None}])
    with pytest.raises(ConfigError, match="'lambda' must be finite"):
        call("task_arithmetic", b, [m], **{"lambda": float("nan")})
    with pytest.raises(ConfigError, match="shape"):
        call("ties", b, [m[:3]])
    # mergekit's int8_mask is accepted and changes nothing
    assert torch.equal(call("ties", b, [m], [{"density": 0.5}], int8_mask=True),
                       call("ties", b, [m], [{"density": 0.5}]))


@pytest.mark.parametrize("name", CLASSIC)
def test_inputs_are_never_modified(data, name):
    base, models = data
    b, *ts = as_t([base, *models], torch.float32)
    copies = [x.clone() for x in (b, *ts)]
    tensors = [b, ts[0]] if name == "slerp" else ts
    call(name, b, tensors, [{"weight": 0.7, "density": 0.5}] * len(tensors), t=0.3, rescale=True)
    for x, c in zip((b, *ts), copies):
        assert torch.equal(x, c)
