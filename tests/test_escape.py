"""Tests for crit.escape: negative curvature, saddle-free Newton (dense and Krylov), PGD, runs.

Known answers: f = 5x² − y² (H = diag(10, −2)), where Newton's step lands on the saddle and the
saddle-free step doubles the y coordinate; the lecture's toy L = (1 − w1·w2)², whose origin has
the escape pair (−2, (1, 1)/√2) and L(t·u) = 1 − t² + t⁴/4 exactly.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401  (float64)
from crit import escape, toy
from crit.hessian import dense_hessian
from crit.problems import mlp_problem


STARTS = np.array([[1.5, 0.15], [-1.2, -0.1], [0.6, 0.35], [0.01, -0.02]])


def planted_quadratic(eigenvalues, seed=0):
    """f(θ) = ½ θᵀ A θ + bᵀθ with A = Q diag(λ) Qᵀ for a random orthogonal Q."""
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((len(eigenvalues), len(eigenvalues))))
    a = jnp.asarray(q @ np.diag(eigenvalues) @ q.T)
    b = jnp.asarray(rng.standard_normal(len(eigenvalues)))
    return (lambda t: 0.5 * t @ a @ t + b @ t), a, b


# --- saddle-free Newton vs Newton on 5x² − y² --------------------------------------------------


@functools.lru_cache(maxsize=None)
def toy_runs(steps=6):
    sfn = jax.jit(jax.vmap(lambda p: escape.saddle_free_newton(
        toy.quadratic_saddle, p, steps, record_path=True).path))(jnp.asarray(STARTS))
    newton = jax.jit(jax.vmap(lambda p: escape.newton(
        toy.quadratic_saddle, p, steps, record_path=True).path))(jnp.asarray(STARTS))
    return np.asarray(sfn), np.asarray(newton)


def test_saddle_free_newton_is_repelled_and_newton_lands_on_the_saddle():
    sfn, newton = toy_runs()
    d_sfn = np.linalg.norm(sfn, axis=-1)  # distance from the saddle (0, 0), (starts, steps + 1)
    d_newton = np.linalg.norm(newton, axis=-1)
    # Newton: −H⁻¹g = −θ, so one step lands exactly on the saddle and stays there.
    assert np.all(d_newton[:, 1:] <= 1e-12)
    # Saddle-free Newton: x is zeroed by the positive direction, y doubles every step.
    np.testing.assert_allclose(sfn[:, 1:, 0], 0.0, atol=1e-12)
    np.testing.assert_allclose(sfn[:, 1:, 1], STARTS[:, 1:2] * 2.0 ** np.arange(1, 7), rtol=1e-12)
    assert np.all(np.diff(d_sfn[:, 1:], axis=1) > 0)  # moves away from the saddle every step
    assert np.all(d_sfn[:, -1] > d_sfn[:, 0])  # and ends farther than it started
    assert np.all(d_sfn[:, -1] > 100 * d_newton[:, -1])


def test_saddle_free_newton_damping_factors_on_a_quadratic():
    # Along an eigenvector of λ the step maps the coordinate c to c·(1 − λ/(|λ| + δ)).
    step, grid = jax.jit(lambda t: (
        escape.saddle_free_newton_step(toy.quadratic_saddle, t, 0.5),
        escape.saddle_free_newton_step(toy.quadratic_saddle, t, (0.0, 10.0))))(
        jnp.array([0.3, 0.2]))
    np.testing.assert_allclose(step.params, [0.3 * (1 - 10 / 10.5), 0.2 * (1 + 2 / 2.5)],
                               rtol=1e-12)
    # with a grid the step of lower loss is taken: δ = 0
    assert float(grid.damping) == 0.0
    np.testing.assert_allclose(grid.params, [0.0, 0.4], atol=1e-12)


# --- Krylov == dense ---------------------------------------------------------------------------


def test_small_mlp_krylov_equals_dense_at_k_equals_p_and_lanczos_finds_lambda_min():
    problem = mlp_problem("sinc", widths=(3,), n_points=16, activation="tanh")
    params = problem.init_fn(jax.random.PRNGKey(3))
    p = problem.n_params

    @jax.jit
    def analyse(params):
        return (escape.saddle_free_newton_step(problem.loss_fn, params, 1e-3).delta,
                escape.saddle_free_newton_krylov_step(problem.loss_fn, params, p, 1e-3).delta,
                escape.negative_curvature_direction(problem.loss_fn, params),
                escape.negative_curvature_direction(problem.loss_fn, params, lanczos_steps=p),
                dense_hessian(problem.loss_fn, params))

    dense, krylov, nc_dense, nc_lanczos, hess = analyse(params)
    lam = np.linalg.eigvalsh(np.asarray(hess))
    assert lam[0] < 0 < lam[-1]  # an indefinite Hessian: the |H| construction matters
    d = jax.flatten_util.ravel_pytree(dense)[0]
    k = jax.flatten_util.ravel_pytree(krylov)[0]
    np.testing.assert_allclose(k, d, rtol=1e-6, atol=1e-8 * float(jnp.linalg.norm(d)))
    # the escape eigenpair: dense eigh and Lanczos with k = P agree with eigvalsh
    assert float(nc_dense.eigenvalue) == pytest.approx(lam[0], rel=1e-10)
    assert float(nc_lanczos.eigenvalue) == pytest.approx(lam[0], rel=1e-8)
    assert float(nc_dense.residual) < 1e-10 and bool(nc_lanczos.converged)
    u = jax.flatten_util.ravel_pytree(nc_dense.direction)[0]
    w = jax.flatten_util.ravel_pytree(nc_lanczos.direction)[0]
    assert abs(float(u @ w)) == pytest.approx(1.0, abs=1e-8)


def test_krylov_step_exact_after_breakdown_and_matches_planted_spectrum():
    # g lies in a 2-dimensional invariant subspace: Lanczos breaks down after 2 steps; the
    # masked step must still equal the dense one, −Σ (uᵢᵀg / |λᵢ|) uᵢ.
    lam = jnp.array([1.0, -2.0, 3.0, 4.0, 5.0])
    f = lambda t: 0.5 * jnp.sum(lam * t ** 2) - (t[0] + t[1])  # g(0) = −(e₀ + e₁)
    k, d = jax.jit(lambda t: (escape.saddle_free_newton_krylov_step(f, t, 4, 0.0).delta,
                              escape.saddle_free_newton_step(f, t, 0.0).delta))(jnp.zeros(5))
    np.testing.assert_allclose(k, [1.0, 0.5, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(d, [1.0, 0.5, 0, 0, 0], atol=1e-12)
    # generic planted indefinite quadratic, k = P
    f2, a, b = planted_quadratic([-3.0, -0.5, 0.2, 1.0, 2.5, 7.0])
    theta = jnp.asarray(np.random.default_rng(1).standard_normal(6))
    g = a @ theta + b
    w, v = np.linalg.eigh(np.asarray(a))
    want = np.asarray(theta) - v @ ((v.T @ np.asarray(g)) / np.abs(w))
    k, d = jax.jit(lambda t: (escape.saddle_free_newton_krylov_step(f2, t, 6).params,
                              escape.saddle_free_newton_step(f2, t).params))(theta)
    np.testing.assert_allclose(k, want, rtol=1e-9)
    np.testing.assert_allclose(d, want, rtol=1e-9)


# --- negative curvature and the line ------------------------------------------------------------


def test_loss_along_the_escape_direction_of_the_toy_saddle_is_half_lambda_t_squared():
    ts = jnp.array([-0.2, -0.1, -0.05, -0.01, 0.01, 0.05, 0.1, 0.2])

    @jax.jit
    def analyse(origin):
        nc = escape.negative_curvature_direction(toy.toy_loss, origin)
        return nc, escape.loss_along(toy.toy_loss, origin, nc.direction, ts)

    nc, line = analyse(jnp.zeros(2))
    assert float(nc.eigenvalue) == pytest.approx(-2.0, abs=1e-14)
    np.testing.assert_allclose(nc.direction, toy.TOY_ESCAPE_DIRECTION, atol=1e-14)
    np.testing.assert_allclose(line.loss, toy.toy_escape_loss(ts), rtol=1e-14)
    np.testing.assert_allclose(line.quadratic, 1.0 - ts ** 2, rtol=1e-14)  # L + ½λt², λ = −2
    assert float(line.curvature) == pytest.approx(-2.0) and float(line.slope) == 0.0
    # leading order: the error is exactly t⁴/4, so the ratio → 1 as t → 0
    np.testing.assert_allclose(line.loss - line.quadratic, ts ** 4 / 4, atol=1e-15)
    ratio = (line.loss - 1.0) / (line.quadratic - 1.0)
    assert np.all(np.abs(ratio - 1) <= np.asarray(ts) ** 2 / 4 + 1e-12)
    assert np.all(line.loss < 1.0)  # the loss falls both ways along ±u


# --- perturbed gradient descent ----------------------------------------------------------------


def test_pgd_escapes_the_exact_saddle_where_gradient_descent_stays():
    gd, pgd = jax.jit(lambda origin, key: (
        escape.gradient_descent(toy.quadratic_saddle, origin, 0.05, 150),
        escape.perturbed_gradient_descent(toy.quadratic_saddle, origin, key, 0.05, 150,
                                          radius=1e-3, threshold=1e-3, interval=10)))(
        jnp.zeros(2), jax.random.PRNGKey(0))
    np.testing.assert_array_equal(np.asarray(gd.params), [0.0, 0.0])  # g = 0: never moves
    np.testing.assert_array_equal(np.asarray(gd.loss), 0.0)
    assert int(pgd.perturbations) >= 1
    assert float(pgd.loss[-1]) < -1.0  # escaped down the −y² direction
    assert abs(float(pgd.params[1])) > 0.5 and abs(float(pgd.params[0])) < 1e-3


def test_uniform_ball_radius_and_runs_record_every_step():
    pts = jax.jit(jax.vmap(lambda k: escape.uniform_ball(k, 3, 0.5)))(
        jax.random.split(jax.random.PRNGKey(0), 2000))
    r = np.linalg.norm(np.asarray(pts), axis=1)
    assert r.max() <= 0.5 + 1e-15
    assert np.mean(r <= 0.5 * 0.5 ** (1 / 3)) == pytest.approx(0.5, abs=0.05)  # half the volume
    run = jax.jit(lambda t: escape.run_optimizer(toy.quadratic_saddle, t, "adam", 20, 1e-2,
                                                 record_path=True))(jnp.array([0.1, 0.01]))
    assert run.loss.shape == (21,) and run.grad_norm.shape == (21,) and run.path.shape == (21, 2)
    assert float(run.loss[0]) == pytest.approx(float(toy.quadratic_saddle(jnp.array([0.1, 0.01]))))
    np.testing.assert_allclose(run.path[-1], run.params)
    assert list(escape.escape_step(np.array([[1.0, 0.95, 0.5], [1.0, 1.0, 1.0]]), [1.0, 1.0],
                                   0.1)) == [2, -1]
