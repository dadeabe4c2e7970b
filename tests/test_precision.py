"""crit.precision: the dtypes a loss really rounds in, and an allowance that covers them."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

import crit  # noqa: F401
from crit.analysis import analyze_model
from crit.hessian import hvp_operator
from crit.precision import compute_dtypes, precision_record, unit_roundoff

EPS32 = float(np.finfo(np.float32).eps)
EPS64 = float(np.finfo(np.float64).eps)


class Mixed(nn.Module):
    """float64 parameters, optionally a float32 compute dtype in every layer (a fork's idiom)."""

    dtype: object = None

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(16, dtype=self.dtype, param_dtype=jnp.float64)(x))
        return nn.Dense(1, dtype=self.dtype, param_dtype=jnp.float64)(h).astype(jnp.float64)


def _problem(dtype, n=64):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 3))
    y = np.sin(x[:, :1]) + 0.1 * rng.standard_normal((n, 1))
    model = Mixed(dtype)
    variables = Mixed().init(jax.random.key(0), x[:1])
    return model, variables, x, y


def test_compute_dtypes_sees_float32_and_bfloat16_layers():
    for dtype, coarsest in ((None, "float64"), (jnp.float32, "float32"),
                            (jnp.bfloat16, "bfloat16")):
        model, variables, x, y = _problem(dtype)

        def loss(v):
            return jnp.mean((model.apply(v, x) - y) ** 2)

        found = compute_dtypes(jax.grad(loss), variables)
        assert found[-1] == coarsest and found[0] == "float64"
        assert unit_roundoff(found) == float(jnp.finfo(coarsest).eps)
        assert precision_record(loss, variables)["coarsest_dtype"] == coarsest


def test_allowance_covers_the_measured_float32_hvp_error():
    """On the same float64 weights, y'Hy with float32 layers differs from float64 by far more than
    the float64 allowance P·ε₆₄·‖H‖, and by less than the float32 one P·ε₃₂·‖H‖."""
    rayleigh = {}
    for dtype in (None, jnp.float32):
        model, variables, x, y = _problem(dtype)

        def loss(v):
            return jnp.mean((model.apply(v, x) - y) ** 2)

        _, matvec = hvp_operator(loss, variables)
        p = jax.flatten_util.ravel_pytree(variables)[0].size
        u = jax.random.normal(jax.random.key(3), (p,))
        u = u / jnp.linalg.norm(u)
        rayleigh[dtype] = float(u @ matvec(u))
        hess = jax.vmap(matvec)(jnp.eye(p))
        norm = float(np.max(np.abs(np.linalg.eigvalsh(np.asarray(0.5 * (hess + hess.T),
                                                                 np.float64)))))
    diff = abs(rayleigh[jnp.float32] - rayleigh[None])
    assert diff > p * EPS64 * norm          # the float64 allowance would not cover it
    assert diff < p * EPS32 * norm          # the allowance for the precision used does


def test_analysis_uses_the_coarsest_precision_for_its_allowance():
    model, variables, x, y = _problem(jnp.float32)
    report = analyze_model(model, (x, y), "mse", variables=variables)
    p = report.given
    assert report.model["precision"]["coarsest_dtype"] == "float32"
    lam_max = max(abs(p.lambda_min), abs(p.lambda_max))
    assert p.allowance >= 0.99 * p.n_params * EPS32 * lam_max
    assert p.tolerance >= 0.99 * p.n_params * EPS32 * lam_max
    assert "float32" in report.summary()
    ref = analyze_model(Mixed(), (x, y), "mse", variables=variables)
    assert ref.model["precision"]["coarsest_dtype"] == "float64"
    assert ref.given.allowance <= 1.01 * ref.given.n_params * EPS64 * lam_max
