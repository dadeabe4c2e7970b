"""Exact Hessians and HVPs against closed forms and finite differences."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401
from crit.hessian import (dense_hessian, flat_loss, full_batch_hvp_operator, grad_norm, hvp,
                          hvp_operator)
from crit.problems import mlp_problem


@pytest.fixture(scope="module")
def small_net():
    problem = mlp_problem("gaussian", widths=(3,), n_points=20, dim_in=3, dim_out=2)
    params = problem.init_fn(jax.random.PRNGKey(1))
    return problem, params


def test_dense_hessian_matches_finite_differences(small_net):
    """dense_hessian == central differences of the gradient, column by column, without
    symmetrizing the reference (so an antisymmetric error in H would show)."""
    problem, params = small_net
    f, theta, _ = flat_loss(problem.loss_fn, params)
    grad = jax.jit(jax.grad(f))
    eye = np.eye(theta.size)

    def central(h):  # column j: (∇L(θ + h e_j) − ∇L(θ − h e_j)) / 2h = H e_j + O(h²)
        return np.stack([(grad(theta + h * e) - grad(theta - h * e)) / (2 * h) for e in eye], 1)

    # Richardson extrapolation cancels the h² term: error O(h⁴) ≈ 1e-12 here (measured 9e-13
    # for h = 1e-3; plain central differences with h = 1e-5 are off by 1e-10).
    fd = (4 * central(5e-4) - central(1e-3)) / 3
    H = np.asarray(dense_hessian(problem.loss_fn, params))
    assert H.shape == (problem.n_params, problem.n_params)
    scale = np.abs(H).max()
    np.testing.assert_allclose(H, fd, rtol=0, atol=1e-11 * scale)
    # Forward-over-reverse is symmetric only to rounding before dense_hessian symmetrizes it:
    # the raw jax.hessian is checked here, not the (trivially symmetric) symmetrized one.
    raw = np.asarray(jax.jit(jax.hessian(f))(theta))
    assert np.abs(raw - raw.T).max() <= 8 * np.finfo(float).eps * scale
    np.testing.assert_allclose(H, raw, rtol=0, atol=8 * np.finfo(float).eps * scale)


def test_hessian_is_not_block_diagonal_nor_psd(small_net):
    """The full Hessian couples layers and (away from a minimum) has negative eigenvalues."""
    problem, params = small_net
    H = np.asarray(dense_hessian(problem.loss_fn, params))
    n_first = params["params"]["Dense_0"]["kernel"].size + params["params"]["Dense_0"]["bias"].size
    # flat order of ravel_pytree: leaves sorted by key: Dense_0/bias, Dense_0/kernel, Dense_1/...
    assert np.abs(H[:n_first, n_first:]).max() > 1e-6
    assert np.linalg.eigvalsh(H).min() < 0


def test_hvp_matches_dense(small_net):
    problem, params = small_net
    H = np.asarray(dense_hessian(problem.loss_fn, params))
    f, theta, unravel = flat_loss(problem.loss_fn, params)
    v = np.random.default_rng(0).standard_normal(theta.size)
    hv_tree = hvp(problem.loss_fn, params, unravel(jnp.asarray(v)))
    hv = jax.flatten_util.ravel_pytree(hv_tree)[0]
    np.testing.assert_allclose(hv, H @ v, rtol=1e-10, atol=1e-12)
    g, matvec = hvp_operator(problem.loss_fn, params)
    np.testing.assert_allclose(matvec(jnp.asarray(v)), H @ v, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(jnp.linalg.norm(g), grad_norm(problem.loss_fn, params), rtol=1e-12)


def test_linear_regression_hessian_is_two_over_n_xtx():
    """MSE of a bias-free linear model: H = (2/N) XᵀX exactly."""
    problem = mlp_problem("gaussian", widths=(), use_bias=False, n_points=50, dim_in=5)
    params = problem.init_fn(jax.random.PRNGKey(0))
    X = problem.dataset.x_train
    H = np.asarray(dense_hessian(problem.loss_fn, params))
    np.testing.assert_allclose(H, 2.0 / len(X) * X.T @ X, rtol=1e-12, atol=1e-14)


def test_l2_adds_identity():
    base = mlp_problem("gaussian", widths=(2,), n_points=10, dim_in=2)
    reg = mlp_problem("gaussian", widths=(2,), n_points=10, dim_in=2, l2=0.3)
    params = base.init_fn(jax.random.PRNGKey(3))
    diff = dense_hessian(reg.loss_fn, params) - dense_hessian(base.loss_fn, params)
    np.testing.assert_allclose(diff, 0.3 * np.eye(base.n_params), atol=1e-12)


@pytest.mark.parametrize("batch_size", [1, 7, 20, 64])
def test_batched_hvp_equals_full_batch(batch_size):
    """Σ_b (n_b/N)·HVP_b is the full-data HVP, also with a short last batch and an L2 term."""
    problem = mlp_problem("gaussian", widths=(4,), n_points=20, dim_in=3, l2=0.05)
    params = problem.init_fn(jax.random.PRNGKey(2))
    x, y = jnp.asarray(problem.dataset.x_train), jnp.asarray(problem.dataset.y_train)
    g_ref, mv_ref = hvp_operator(problem.loss_fn, params)
    g, mv = full_batch_hvp_operator(problem.batch_loss_fn, params, x, y, batch_size)
    v = jnp.asarray(np.random.default_rng(1).standard_normal(problem.n_params))
    np.testing.assert_allclose(g, g_ref, atol=1e-14)
    np.testing.assert_allclose(mv(v), mv_ref(v), atol=1e-13)


@pytest.mark.parametrize("block_size", [1, 5, 7, "auto"])
def test_blocked_dense_hessian_equals_jax_hessian(small_net, block_size):
    """Columns pushed through in blocks (any block size, remainder included) == jax.hessian,
    computed here directly (unsymmetrized), to a few ulp."""
    problem, params = small_net
    f, theta, _ = flat_loss(problem.loss_fn, params)
    reference = np.asarray(jax.jit(jax.hessian(f))(theta))
    blocked = np.asarray(dense_hessian(problem.loss_fn, params, block_size=block_size))
    assert problem.n_params % 7 != 0 and problem.n_params % 5 == 0  # ragged and even blocks
    np.testing.assert_allclose(blocked, reference, rtol=0,
                               atol=8 * np.finfo(float).eps * np.abs(reference).max())


def test_default_hessian_block_follows_backend():
    """One column at a time on CPU (fastest there: wide tangent blocks leave the cache)."""
    import jax

    from crit.hessian import (HESSIAN_BLOCK_ACCELERATOR, HESSIAN_BLOCK_CPU,
                              default_hessian_block)

    expected = HESSIAN_BLOCK_CPU if jax.default_backend() == "cpu" else HESSIAN_BLOCK_ACCELERATOR
    assert default_hessian_block() == expected


@pytest.mark.parametrize("bad", [0, -3, "wide", 2.5])
def test_dense_hessian_rejects_bad_block_size(small_net, bad):
    """A block size that is not a positive int, None or 'auto' stops before any compute."""
    problem, params = small_net
    with pytest.raises(ValueError, match="block_size"):
        dense_hessian(problem.loss_fn, params, block_size=bad)
