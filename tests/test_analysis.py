"""crit.analysis and crit.trained: any trained model, one call, the whole report."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import crit  # noqa: F401
from crit.analysis import AnalysisError, _dense_stage, _krylov_stage, analyze_model, analyze_point
from crit.trained import (TrainedModelError, as_trained_model, data_objective, from_linen,
                          resolve_loss, spec_source_sha256)
from tests.fork_models import LinenMLP, NNXBatchNormNet, NNXMLP, TinyLM, mlp_apply


def _data(n=24, seed=0):
    rng = np.random.default_rng(seed)
    x = np.linspace(-1.0, 1.0, n)[:, None]
    return x, np.sin(3.0 * x) + 0.1 * rng.standard_normal((n, 1))


def _weights(seed=1, hidden=6):
    rng = np.random.default_rng(seed)
    return {"Dense_0": {"kernel": rng.standard_normal((1, hidden)),
                        "bias": 0.1 * rng.standard_normal(hidden)},
            "Dense_1": {"kernel": rng.standard_normal((hidden, 1)) / 3,
                        "bias": 0.1 * rng.standard_normal(1)}}


def _nnx_with(weights):
    model = NNXMLP(rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, weights))
    nnx.update(model, state)
    return model


FIELDS = ("loss", "grad_norm", "lambda_max", "lambda_min_bound", "lambda_min")


def test_linen_nnx_and_function_give_the_same_report():
    x, y = _data()
    w = _weights()
    reports = [analyze_model(LinenMLP(), (x, y), "mse", variables={"params": w}),
               analyze_model(_nnx_with(w), (x, y), "mse"),
               analyze_model(mlp_apply, (x, y), "mse", variables=w)]
    kinds = [r.model["kind"] for r in reports]
    assert kinds == ["linen", "nnx", "function"]
    ref = reports[0].given
    assert ref.method == "dense" and ref.n_params == 19
    for r in reports[1:]:
        p = r.given
        assert p.verdict == ref.verdict
        for f in FIELDS:
            a, b = getattr(p, f), getattr(ref, f)
            assert abs(a - b) <= 1e-12 * max(1.0, abs(b)), (f, a, b)
        np.testing.assert_allclose(p.eigenvalues, ref.eigenvalues, rtol=0, atol=1e-12)


def test_the_same_report_on_the_krylov_path():
    x, y = _data()
    w = _weights()
    kw = dict(method="krylov", lanczos_steps=12, slq_probes=2, num_eigs=2)
    a = analyze_model(LinenMLP(), (x, y), "mse", variables={"params": w}, **kw).given
    b = analyze_model(mlp_apply, (x, y), "mse", variables=w, **kw).given
    assert a.verdict == b.verdict
    for f in FIELDS:
        assert abs(getattr(a, f) - getattr(b, f)) <= 1e-12 * max(1.0, abs(getattr(a, f)))
    # the Krylov λ_max is the dense one (the top converges first)
    dense = analyze_model(mlp_apply, (x, y), "mse", variables=w).given
    assert abs(a.lambda_max - dense.lambda_max) <= 1e-8 * dense.lambda_max


def test_refinement_from_near_the_toy_saddle_reaches_the_origin():
    def toy(p):
        return (1.0 - p["w1"] * p["w2"]) ** 2

    start = {"w1": jnp.asarray(1e-3), "w2": jnp.asarray(-0.6e-3)}
    report = analyze_point(toy, start, refine=True)
    given, refined = report.points
    assert not given.certified and given.verdict == "not_critical"
    assert refined.certified and refined.grad_norm <= 1e-10
    np.testing.assert_allclose(refined.eigenvalues, [-2.0, 2.0], atol=1e-9)
    assert refined.verdict == "saddle_proven" and refined.negative_proven
    w = report.refined_params
    assert abs(float(w["w1"])) < 1e-9 and abs(float(w["w2"])) < 1e-9
    assert report.refinement.distance == pytest.approx(np.hypot(1e-3, 0.6e-3), rel=1e-6)
    assert report.refinement.loss_change == pytest.approx(1.0 - (1 - 1e-3 * -0.6e-3) ** 2,
                                                          abs=1e-15)
    # the escape direction (1, -1)/√2 at the origin... the loss falls along it as ½λt²
    assert refined.escape_t is not None
    mid = len(refined.escape_t) // 2 + 3
    assert refined.escape_loss[mid] < refined.loss
    assert "proven" in report.summary() and "moved" in report.summary()


def test_float32_parameters_are_cast_and_recorded():
    x, y = _data()
    w32 = jax.tree.map(lambda a: np.asarray(a, np.float32), _weights())
    report = analyze_model(mlp_apply, (x, y), "mse", variables=w32)
    assert report.model["cast_from"] == ["float32"]
    assert "cast from float32" in report.summary()
    w64 = jax.tree.map(lambda a: np.asarray(a, np.float64), w32)
    ref = analyze_model(mlp_apply, (x, y), "mse", variables=w64)
    assert ref.model["cast_from"] == []
    assert report.given.loss == ref.given.loss  # the same float64 numbers after the cast


def test_a_stateful_model_without_its_state_is_refused():
    import flax.linen as nn

    class BN(nn.Module):
        @nn.compact
        def __call__(self, x, train=False):
            return nn.Dense(1)(nn.BatchNorm(use_running_average=not train)(nn.Dense(3)(x)))

    x, y = _data()
    variables = BN().init(jax.random.key(0), x[:2])
    with pytest.raises(TrainedModelError, match="batch_stats"):
        from_linen(BN(), {"params": variables["params"]}, x[:2])
    with pytest.raises(TrainedModelError, match="batch_stats"):
        analyze_model(BN(), (x, y), "mse", variables={"params": variables["params"]})
    trained = from_linen(BN(), variables, x[:2])
    assert trained.has_state and trained.batchnorm == "eval"


def test_nnx_batchnorm_state_is_used_in_eval_mode():
    x = np.random.default_rng(0).standard_normal((16, 2))
    y = x[:, :1] ** 2
    model = NNXBatchNormNet(rngs=nnx.Rngs(0))
    model.bn.mean[...] = jnp.full((5,), 0.3, jnp.float32)  # "trained" running statistics
    model.bn.var[...] = jnp.full((5,), 2.0, jnp.float32)
    trained = as_trained_model(model)
    assert trained.kind == "nnx" and trained.batchnorm == "eval" and trained.has_state
    loss = data_objective(trained, "mse")(trained.params, (x, y))
    model.eval()
    expected = jnp.mean((model(jnp.asarray(x, jnp.float32)).astype(jnp.float64) - y) ** 2)
    assert float(loss) == pytest.approx(float(expected), rel=1e-5)
    # P counts nnx.Param leaves only: the statistics are state
    assert trained.n_params == 2 * 5 + 5 + 5 + 5 + 5 * 1 + 1


def test_custom_causal_next_token_loss_end_to_end():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 5, size=(12, 6)).astype(np.int32)
    model = TinyLM(rngs=nnx.Rngs(0))
    report = analyze_model(model, (tokens, tokens), "tests.fork_models:next_token_xent",
                           refine=True, refine_iters=5)
    p = report.given
    assert p.n_params == 5 * 3 + 3 * 5 + 5 and p.method == "dense"
    fn = resolve_loss("tests.fork_models:next_token_xent")
    trained = as_trained_model(model)
    manual = fn(trained.apply_fn(trained.params, jnp.asarray(tokens), trained.state), tokens)
    assert p.loss == pytest.approx(float(manual), rel=1e-12)
    assert np.isfinite(p.lambda_max) and p.eigenvalues.size == p.n_params
    assert len(report.points) == 2


def test_exact_batch_weights_any_batch_size():
    x, y = _data(n=23)
    trained = as_trained_model(mlp_apply, _weights())
    full = data_objective(trained, "mse")(trained.params, (x, y))
    for b in (1, 5, 7, 23, 40):
        assert float(data_objective(trained, "mse", b)(trained.params, (x, y))) == \
            pytest.approx(float(full), rel=1e-13)


def test_bad_input_refused_before_compute():
    x, y = _data()
    with pytest.raises(AnalysisError, match="rows"):
        analyze_model(mlp_apply, (x, y[:-1]), "mse", variables=_weights())
    with pytest.raises(AnalysisError, match="NaN"):
        analyze_model(mlp_apply, (np.full_like(x, np.nan), y), "mse", variables=_weights())
    with pytest.raises(TrainedModelError, match="unknown loss"):
        analyze_model(mlp_apply, (x, y), "hinge", variables=_weights())
    with pytest.raises(AnalysisError, match="method"):
        analyze_model(mlp_apply, (x, y), "mse", variables=_weights(), method="exact")
    with pytest.raises(AnalysisError, match="do not accept the data"):
        analyze_model(mlp_apply, (np.ones((24, 3)), y), "mse", variables=_weights())


def _largest_constant(text: str) -> int:
    sizes = [1]
    for dims in re.findall(r"constant dense<[^>]*>\s*:\s*tensor<([0-9x]+)x[a-z]", text):
        sizes.append(int(np.prod([int(d) for d in dims.split("x")])))
    return max(sizes)


def test_programs_hold_no_data_constant():
    """The data are arguments: the lowered programs hold no constant as large as a batch."""
    x = np.random.default_rng(0).standard_normal((512, 1))
    y = np.sin(x)
    trained = as_trained_model(mlp_apply, _weights())
    objective = data_objective(trained, "mse", batch_size=128)
    data = (jnp.asarray(x), jnp.asarray(y))
    dense = _dense_stage.lower(objective, trained.params, data).as_text()
    krylov = _krylov_stage.lower(objective, trained.params, data, jax.random.key(0), 19, None,
                                 (("num_steps", 6), ("num_probes", 2), ("k", 2))).as_text()
    for text in (dense, krylov):
        assert _largest_constant(text) < 128, _largest_constant(text)
    # a closure over the data, for contrast, does compile them in (the check can fail)
    closed = jax.jit(lambda p: objective(p, data)).lower(trained.params).as_text()
    assert _largest_constant(closed) >= 512


def test_source_hash_follows_the_module(tmp_path, monkeypatch):
    pkg = tmp_path / "forkpkg_hash"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "net.py").write_text("def apply(params, x):\n    return x\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    first = spec_source_sha256("forkpkg_hash.net:apply")
    (pkg / "net.py").write_text("def apply(params, x):\n    return 2 * x\n")
    assert spec_source_sha256("forkpkg_hash.net:apply") != first
    assert spec_source_sha256("mlp") is None


def test_krylov_extremal_pairs_carry_true_residuals():
    """Every reported extremal value lies within its residual of a true eigenvalue (dense)."""
    x, y = _data()
    w = _weights()
    kry = analyze_model(mlp_apply, (x, y), "mse", variables=w, method="krylov",
                        lanczos_steps=10, slq_probes=2, num_eigs=3).given
    eigs = analyze_model(mlp_apply, (x, y), "mse", variables=w).given.eigenvalues
    for values, residuals in ((kry.smallest, kry.smallest_residuals),
                              (kry.largest, kry.largest_residuals)):
        for v, r in zip(values, residuals):
            assert np.min(np.abs(eigs - v)) <= r * (1 + 1e-8) + 1e-12
    # 10 steps at P = 19: the inner values have not converged, so the check has teeth
    assert np.max(kry.smallest_residuals) > 1e-6


def test_no_fraction_is_resolved_at_a_coarse_tolerance():
    """On a tiny Krylov run the finest sharp grid τ is a large share of λ_max: not 'resolved'."""
    x, y = _data()
    p = analyze_model(mlp_apply, (x, y), "mse", variables=_weights(), method="krylov",
                      lanczos_steps=6, slq_probes=2, num_eigs=2).given
    scale = max(abs(p.lambda_min), abs(p.lambda_max))
    # 6 steps resolve nothing under the 1e-2 ceiling: τ is the ceiling's grid value, unresolved
    assert p.tolerance >= 1e-2 * scale * (1 - 1e-6)
    assert not p.resolved and "unresolved" in p.statement()
    fine = analyze_model(mlp_apply, (x, y), "mse", variables=_weights(), method="krylov",
                         lanczos_steps=6, slq_probes=2, num_eigs=2, eig_tol=1e-3 * scale).given
    assert fine.tolerance <= 1e-2 * scale
