"""Search in low precision, prove in float64 (issue 24, point 3): crit.krylov's ``check_matvec``
and ``analyze_point(hvp_dtype=...)``."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401
from crit.analysis import AnalysisError, analyze_model, search_operator
from crit.hessian import hvp_operator
from crit.krylov import krylov_spectrum, planted_operator


def _rounded(matvec, dtype):
    """The planted operator evaluated in ``dtype`` (input and output rounded)."""
    return lambda v: matvec(v.astype(dtype).astype(jnp.float64)).astype(dtype).astype(
        jnp.float64)


def test_low_precision_search_keeps_a_float64_proof_and_honest_fractions():
    """On a planted spectrum (300 eigenvalues: 12 at -1e-3 .. -1e-1, 60 exact zeros, the rest
    in [1e-3, 10]), a float32 search gives Rayleigh quotients that equal the float64 Rayleigh
    quotients of its own Ritz vectors, a proven negative eigenvalue, and sign-fraction intervals
    that still contain the planted fractions at every grid τ; bfloat16 (ε = 2^-8) is coarser but
    stays honest."""
    rng = np.random.default_rng(3)
    lam = np.concatenate([-np.geomspace(1e-3, 1e-1, 12), np.zeros(60),
                          np.geomspace(1e-3, 10.0, 228)])
    rng.shuffle(lam)
    exact = planted_operator(lam, seed=1)
    key = jax.random.key(0)
    ref = jax.jit(lambda: krylov_spectrum(exact, key, lam.size, num_steps=60))()
    for dtype in (jnp.float32, jnp.bfloat16):
        search = _rounded(exact, dtype)
        spec = jax.jit(lambda: krylov_spectrum(search, key, lam.size, num_steps=60,
                                               check_matvec=exact))()
        y = spec.escape_direction
        assert float(spec.verdict.ritz_value) == pytest.approx(float(y @ exact(y)), abs=1e-15)
        assert bool(spec.verdict.negative_proven)
        assert float(spec.verdict.lambda_min_bound) >= lam.min() - 1e-12
        eta = float(spec.search_error)
        # the measured error covers the rounding on fresh random unit vectors
        us = jax.random.normal(jax.random.key(7), (8, lam.size))
        us = us / jnp.linalg.norm(us, axis=1, keepdims=True)
        fresh = max(float(jnp.linalg.norm(search(u) - exact(u))) for u in us)
        assert fresh <= eta
        assert float(spec.slack) >= eta
        for g, t in enumerate(np.asarray(spec.grid_tolerance)):
            truth = {"positive": np.mean(lam > t), "negative": np.mean(lam < -t)}
            for name, est in (("positive", spec.grid_fractions.positive),
                              ("negative", spec.grid_fractions.negative)):
                assert float(est.lo[g]) - 1e-12 <= truth[name] <= float(est.hi[g]) + 1e-12, (
                    dtype, t, name)
        assert int(spec.num_check_matvecs) > 0
    assert float(ref.search_error) == 0.0 and int(ref.num_check_matvecs) == 0


def _misses(spec, lam):
    """Grid points where an interval misses the planted positive or negative fraction."""
    out = 0
    for g, t in enumerate(np.asarray(spec.grid_tolerance)):
        for truth, est in ((np.mean(lam > t), spec.grid_fractions.positive),
                           (np.mean(lam < -t), spec.grid_fractions.negative)):
            out += not float(est.lo[g]) - 1e-12 <= truth <= float(est.hi[g]) + 1e-12
    return out


def test_a_biased_search_is_covered_by_the_measured_error_and_not_without_it():
    """A search operator with a systematic error (H + 2e-3·I: every eigenvalue moved, the 60
    zeros become positive) must not make the fraction intervals lie: with the measured error
    added to the slack they contain the planted fractions at every τ; with the widening
    switched off (factor 0) they miss, so the widening is what keeps them honest. (Three
    distinct eigenvalues: the runs break down and their brackets are sharp.)"""
    lam = np.concatenate([np.full(10, -0.1), np.zeros(60), np.ones(130)])
    exact = planted_operator(lam, seed=1)
    biased = lambda v: exact(v) + 2e-3 * v  # noqa: E731
    key = jax.random.key(0)
    run = jax.jit(lambda f: krylov_spectrum(biased, key, lam.size, num_steps=60,
                                            check_matvec=exact, search_error_factor=f))
    honest, naive = run(3.0), run(0.0)
    assert float(honest.search_error) == pytest.approx(6e-3, rel=1e-6)
    assert _misses(honest, lam) == 0
    assert _misses(naive, lam) > 0
    assert bool(honest.verdict.negative_proven)


class Wide(nn.Module):
    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(24)(x))
        h = jnp.tanh(nn.Dense(24)(h))
        return nn.Dense(1)(h)


def _net():
    x = jax.random.normal(jax.random.key(1), (96, 3))
    y = jnp.sin(x[:, :1])
    model = Wide()
    return model, model.init(jax.random.key(0), x), x, y


def test_float32_search_on_a_network_matches_float64_to_its_error():
    """A 721-parameter tanh net at its init (a saddle-free point has no proof; an init is far
    from critical and has negative curvature): the float32 search proves the same negative
    eigenvalue as the all-float64 run to within the float32 error, the float64 δ of the proof
    is unchanged, and the search error is measured (float32's ε·‖H‖ scale, far above
    float64's)."""
    model, variables, x, y = _net()
    kw = dict(variables=variables, method="krylov", lanczos_steps=40, slq_probes=4)
    r64 = analyze_model(model, (x, y), "mse", **kw).points[0]
    r32 = analyze_model(model, (x, y), "mse", hvp_dtype="float32", **kw).points[0]
    assert r64.negative_proven and r32.negative_proven
    assert r32.hvp_dtype == "float32" and r32.num_check_matvecs > 0
    assert r32.lambda_min_bound == pytest.approx(r64.lambda_min_bound, rel=1e-5)
    assert r32.allowance == pytest.approx(r64.allowance, rel=1e-6)
    assert r64.search_error == 0.0
    scale = max(abs(r64.lambda_max), abs(r64.lambda_min))
    assert 1e-10 * scale < r32.search_error < 1e-3 * scale

    # the search operator's error on a random vector is what the report widened by
    data = (jnp.asarray(x), jnp.asarray(y))
    params = jax.tree.map(lambda a: a.astype(jnp.float64), variables)

    def loss2(p, d):
        return jnp.mean((model.apply(p, d[0]) - d[1]) ** 2)

    _, exact = hvp_operator(lambda p: loss2(p, data), params)
    low = search_operator(loss2, params, data, "float32")
    u = jax.random.normal(jax.random.key(3), (r32.n_params,))
    u = u / jnp.linalg.norm(u)
    assert float(jnp.linalg.norm(low(u) - exact(u))) <= r32.search_error


def test_hvp_dtype_refused_where_it_means_nothing():
    model, variables, x, y = _net()
    with pytest.raises(AnalysisError, match="dense path"):
        analyze_model(model, (x, y), "mse", variables=variables, method="dense",
                      hvp_dtype="float32")
    with pytest.raises(AnalysisError, match="hvp_dtype must be one of"):
        analyze_model(model, (x, y), "mse", variables=variables, hvp_dtype="float16")
    with pytest.raises(AnalysisError, match="matmul_precision"):
        analyze_model(model, (x, y), "mse", variables=variables, method="krylov",
                      hvp_dtype="float32", matmul_precision="fast")
