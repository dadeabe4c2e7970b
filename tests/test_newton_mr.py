"""Tests for crit.newton_mr: MINRES on planted systems, Newton-MR on a small net and a saddle."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit.critical import newton_critical_point
from crit.newton_mr import BatchedLoss, minres, newton_mr_critical_point
from crit.problems import mlp_problem
from crit.toy import quadratic_saddle
from crit.train import make_optimizer, train


N = 60
# Indefinite and nonsingular; the same with 10 exact zeros (singular).
NONSINGULAR = np.concatenate([np.linspace(-3.0, -0.1, 25), np.linspace(0.2, 5.0, 35)])
SINGULAR = np.concatenate([np.linspace(-3.0, -0.1, 20), np.linspace(0.2, 5.0, 30), np.zeros(10)])


def planted(eigenvalues, seed=0):
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((N, N)))
    return (q * eigenvalues) @ q.T


@jax.jit
def solve(a, b):
    return minres(lambda v: a @ v, b, 3 * N, 1e-12)


def test_minres_solves_indefinite_system():
    a = planted(NONSINGULAR)
    b = np.random.default_rng(1).standard_normal(N)
    out = solve(a, b)
    x = np.linalg.solve(a, b)
    assert bool(out.converged) and int(out.iterations) < 3 * N
    np.testing.assert_allclose(out.solution, x, rtol=0, atol=1e-10 * np.linalg.norm(x))
    assert float(out.residual_norm) == pytest.approx(np.linalg.norm(b - a @ out.solution),
                                                     abs=1e-12)


def test_minres_singular_compatible_gives_minimum_norm_solution():
    a = planted(SINGULAR)
    b = a @ np.random.default_rng(2).standard_normal(N)  # b in range(A)
    out = solve(a, b)
    x = np.linalg.lstsq(a, b, rcond=1e-10)[0]  # minimum-norm solution
    assert bool(out.converged)
    np.testing.assert_allclose(out.solution, x, rtol=0, atol=1e-9 * np.linalg.norm(x))


def test_minres_singular_incompatible_gives_least_squares_solution():
    a = planted(SINGULAR)
    b = np.random.default_rng(3).standard_normal(N)  # has a null-space component
    out = solve(a, b)
    x_ls = np.linalg.lstsq(a, b, rcond=1e-10)[0]
    r, r_ls = b - a @ np.asarray(out.solution), b - a @ x_ls
    # Least-squares residual reached to rounding; since ||r||² = ||r_ls||² + ||A e||², that
    # pins A e (and A r) only to about sqrt(eps). The difference to lstsq's minimum-norm
    # solution lies in the null space (plain MINRES is not minimum-norm there).
    assert np.linalg.norm(r) == pytest.approx(np.linalg.norm(r_ls), rel=1e-10)
    assert np.linalg.norm(a @ r) < 1e-5 * 5.0 * np.linalg.norm(b)
    assert np.linalg.norm(a @ (np.asarray(out.solution) - x_ls)) < 1e-5 * np.linalg.norm(b)
    assert float(out.residual_norm) == pytest.approx(np.linalg.norm(r), rel=1e-10)
    assert np.linalg.norm(out.solution) < 10 * np.linalg.norm(x_ls)  # no blow-up


def test_minres_zero_rhs_and_vmap_equals_loop():
    a = planted(NONSINGULAR)
    zero = solve(a, np.zeros(N))
    assert int(zero.iterations) == 0 and not np.any(np.asarray(zero.solution))
    bs = np.random.default_rng(4).standard_normal((3, N))
    batched = jax.vmap(solve, in_axes=(None, 0))(a, bs)
    for i in range(3):
        one = solve(a, bs[i])
        np.testing.assert_allclose(batched.solution[i], one.solution, rtol=0,
                                   atol=1e-10 * np.linalg.norm(one.solution))


# --- Newton-MR

PROBLEM = mlp_problem("gaussian", widths=(4,), n_points=64, dim_in=4, l2=1e-3)
INITS = 3


@pytest.fixture(scope="module")
def trained():
    """Adam-trained parameters of inits 0..2 (2000 steps, lr 1e-2), trained in one vmap."""
    keys = jax.vmap(lambda i: jax.random.fold_in(jax.random.PRNGKey(0), i))(jnp.arange(INITS))
    params0 = jax.vmap(PROBLEM.init_fn)(keys)
    opt = make_optimizer("adam", 1e-2)
    params, _ = jax.jit(jax.vmap(lambda p: train(PROBLEM.loss_fn, opt, p, 2000, 100)))(params0)
    return params


def take(tree, i):
    return jax.tree.map(lambda x: x[i], tree)


finder = jax.jit(lambda p: newton_mr_critical_point(PROBLEM.loss_fn, p))


def test_newton_mr_certifies_where_exact_newton_does(trained):
    start = take(trained, 0)
    exact = jax.jit(lambda p: newton_critical_point(PROBLEM.loss_fn, p))(start)
    assert float(exact.grad_norm) <= 1e-8
    out = finder(start)
    assert float(out.grad_norm) <= 1e-8
    assert int(out.iterations) <= int(exact.iterations)
    hist = np.asarray(out.history)[: int(out.iterations)]
    assert np.all(np.diff(hist) < 0)  # only accepted (improving) steps
    dist = ravel_pytree(out.params)[0] - ravel_pytree(exact.params)[0]
    assert float(jnp.linalg.norm(dist)) < 1e-6  # the same critical point


def test_batched_hvps_give_the_same_path(trained):
    start = take(trained, 0)
    data = BatchedLoss(PROBLEM.batch_loss_fn, jnp.asarray(PROBLEM.dataset.x_train),
                       jnp.asarray(PROBLEM.dataset.y_train), 20)  # batches 20, 20, 20, 4
    out = jax.jit(lambda p: newton_mr_critical_point(PROBLEM.loss_fn, p, hvp_batch=data))(start)
    ref = finder(start)
    assert float(out.grad_norm) <= 1e-8 and int(out.iterations) == int(ref.iterations)
    np.testing.assert_allclose(ravel_pytree(out.params)[0], ravel_pytree(ref.params)[0],
                               atol=1e-9)


def test_newton_mr_vmap_over_inits_equals_loop(trained):
    batched = jax.jit(jax.vmap(lambda p: newton_mr_critical_point(PROBLEM.loss_fn, p)))(trained)
    for i in range(INITS):
        one = finder(take(trained, i))
        assert int(batched.iterations[i]) == int(one.iterations)
        np.testing.assert_allclose(batched.grad_norm[i], one.grad_norm, rtol=1e-6, atol=1e-14)
        np.testing.assert_allclose(ravel_pytree(take(batched.params, i))[0],
                                   ravel_pytree(one.params)[0], rtol=1e-9, atol=1e-12)


def test_newton_mr_lands_on_the_saddle_of_a_quadratic():
    # f = 5x² − y²: H = diag(10, −2) is indefinite; the Newton step lands on the saddle.
    out = newton_mr_critical_point(quadratic_saddle, jnp.array([0.7, -1.3]), max_iters=5)
    assert int(out.iterations) == 1
    np.testing.assert_allclose(out.params, [0.0, 0.0], atol=1e-12)
    assert float(out.grad_norm) <= 1e-10


def test_stops_when_no_step_helps():
    # At an exact critical point nothing lowers ‖g‖ = 0: zero iterations, point unchanged.
    out = newton_mr_critical_point(quadratic_saddle, jnp.zeros(2))
    assert int(out.iterations) == 0 and float(out.grad_norm) == 0.0
