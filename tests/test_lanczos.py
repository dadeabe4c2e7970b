"""Tests for crit.lanczos on planted spectra and on the Hessian of a small MLP."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit.lanczos import extremal_eigenpairs, lanczos_tridiag, tridiag_eigh

# Planted spectrum: an exact-zero cluster, two bulks, negative and positive outliers.
SPECTRUM = np.concatenate(
    [
        np.zeros(40),
        np.linspace(0.1, 2.0, 120),
        np.linspace(-1.0, -0.1, 34),
        [-6.0, -4.0],
        [5.0, 10.0, 20.0, 50.0],
    ]
)


def planted(eigenvalues, seed=0):
    """A = Q diag(eigenvalues) Q^T with a random orthogonal Q."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return jnp.asarray((q * eigenvalues) @ q.T)


def dense_matvec(a):
    return lambda v: a @ v


@pytest.fixture(scope="module")
def problem():
    a = planted(SPECTRUM)
    v0 = jnp.asarray(np.random.default_rng(1).standard_normal(len(SPECTRUM)))
    return a, v0


def test_lanczos_relation_and_orthonormal_basis(problem):
    a, v0 = problem
    m = 50
    res = lanczos_tridiag(dense_matvec(a), v0, m)
    assert int(res.num_valid) == m and bool(res.valid.all())
    q = res.basis.T  # (n, m)
    t = jnp.diag(res.alphas) + jnp.diag(res.betas[:-1], 1) + jnp.diag(res.betas[:-1], -1)
    e_m = jnp.zeros(m).at[-1].set(1.0)
    relation = a @ q - q @ t - jnp.outer(res.residual, e_m)
    assert float(jnp.max(jnp.abs(relation))) < 1e-12 * 50
    assert float(jnp.max(jnp.abs(q.T @ q - jnp.eye(m)))) < 1e-12
    assert float(jnp.max(jnp.abs(q.T @ res.residual))) < 1e-12
    np.testing.assert_allclose(res.betas[-1], jnp.linalg.norm(res.residual), rtol=1e-12)
    np.testing.assert_allclose(res.basis[0], v0 / jnp.linalg.norm(v0), atol=1e-15)


def test_extremal_eigenpairs_both_ends_one_run(problem):
    a, v0 = problem
    out = extremal_eigenpairs(dense_matvec(a), v0, 60, 2, true_residuals=True)
    exact = np.linalg.eigvalsh(np.asarray(a))
    np.testing.assert_allclose(out.largest.values, exact[::-1][:2], rtol=1e-8)
    np.testing.assert_allclose(out.smallest.values, exact[:2], rtol=1e-8)
    for pairs in (out.largest, out.smallest):
        assert bool(pairs.converged.all()) and bool(pairs.valid.all())
        # Estimate |beta s_last| agrees with the true residual ||A y - theta y||.
        np.testing.assert_allclose(pairs.residual_estimates, pairs.residuals, atol=1e-11)
        # Ritz vectors are unit eigenvectors: A y = theta y.
        ay = pairs.vectors @ a
        np.testing.assert_allclose(ay, pairs.values[:, None] * pairs.vectors, atol=1e-8)
    assert out.num_matvecs == 60 + 4


def _count_copies(ritz, eigenvalue, scale):
    return int(np.sum(np.abs(np.asarray(ritz) - eigenvalue) < 1e-8 * scale))


def test_no_ghosts_with_reorthogonalization_ghosts_without(problem):
    a, v0 = problem
    m = 120  # far more steps than needed for the outliers to converge
    distinct = np.unique(SPECTRUM)
    with_re = lanczos_tridiag(dense_matvec(a), v0, m)
    ritz, s = tridiag_eigh(with_re.alphas, with_re.betas, with_re.valid)
    residual = np.abs(np.asarray(with_re.betas[-1] * s[-1]))
    converged = np.asarray(ritz)[residual < 1e-10 * 50]
    assert len(converged) >= 8
    # Every converged Ritz value is an eigenvalue, and no eigenvalue is matched twice.
    nearest = np.argmin(np.abs(converged[:, None] - distinct[None]), axis=1)
    np.testing.assert_allclose(converged, distinct[nearest], atol=1e-9 * 50)
    assert len(set(nearest.tolist())) == len(nearest)
    for outlier in (50.0, 20.0, -6.0):
        assert _count_copies(ritz, outlier, 50) == 1

    without = lanczos_tridiag(dense_matvec(a), v0, m, reorthogonalize=False)
    ghosts, _ = tridiag_eigh(without.alphas, without.betas, without.valid)
    assert _count_copies(ghosts, 50.0, 50) >= 2  # spurious copies of the top outlier


def test_breakdown_masked_and_ritz_values_exact():
    distinct = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 7.0])
    a = planted(np.repeat(distinct, 25), seed=2)
    v0 = jnp.asarray(np.random.default_rng(3).standard_normal(200))
    m = 30
    res = lanczos_tridiag(dense_matvec(a), v0, m)
    k = int(res.num_valid)
    assert k == len(distinct)  # the Krylov space is invariant after 8 steps
    assert bool(jnp.all(jnp.isfinite(res.alphas))) and bool(jnp.all(jnp.isfinite(res.basis)))
    assert bool(jnp.all(res.valid[:k])) and not bool(jnp.any(res.valid[k:]))
    assert float(jnp.max(jnp.abs(res.alphas[k:]))) == 0.0
    assert float(jnp.max(jnp.abs(res.betas[k:]))) == 0.0
    assert float(jnp.max(jnp.abs(res.basis[k:]))) == 0.0
    assert float(res.betas[k - 1]) < 1e-10 * 7  # the tiny final residual, kept
    # Lanczos relation with the valid part.
    q = res.basis[:k].T
    off = res.betas[: k - 1]
    t = jnp.diag(res.alphas[:k]) + jnp.diag(off, 1) + jnp.diag(off, -1)
    relation = a @ q - q @ t - jnp.outer(res.residual, jnp.eye(k)[-1])
    assert float(jnp.max(jnp.abs(relation))) < 1e-12 * 7
    # Each distinct eigenvalue exactly once; the padding is recognisable.
    values, vectors = tridiag_eigh(res.alphas, res.betas, res.valid)
    np.testing.assert_allclose(values[:k], distinct, atol=1e-12)
    assert float(jnp.max(jnp.abs(values[k:]))) == 0.0
    assert float(jnp.max(jnp.abs(vectors[0, k:]))) == 0.0  # zero quadrature weight
    np.testing.assert_allclose(jnp.sum(vectors[0, :k] ** 2), 1.0, atol=1e-13)

    out = extremal_eigenpairs(dense_matvec(a), v0, m, 10)
    assert out.largest.valid.tolist() == [True] * 8 + [False] * 2
    np.testing.assert_allclose(out.largest.values[:8], distinct[::-1], atol=1e-12)
    np.testing.assert_allclose(out.smallest.values[:8], distinct, atol=1e-12)
    assert bool(jnp.all(jnp.isnan(out.smallest.values[8:])))
    assert bool(out.largest.converged[:8].all()) and not bool(out.largest.converged[8:].any())


def test_exact_breakdown_at_first_step():
    a = 3.0 * jnp.eye(50)  # every vector is an eigenvector
    res = lanczos_tridiag(dense_matvec(a), jnp.ones(50), 10)
    assert int(res.num_valid) == 1
    values, _ = tridiag_eigh(res.alphas, res.betas, res.valid)
    np.testing.assert_allclose(values[0], 3.0, rtol=1e-15)
    assert bool(jnp.all(jnp.isfinite(res.basis)))


def test_jit_and_vmap_over_matrices_equal_loop():
    mats = jnp.stack([planted(SPECTRUM * s, seed=s) for s in (1, 2, 3)])
    v0s = jnp.asarray(np.random.default_rng(4).standard_normal((3, len(SPECTRUM))))

    def top_and_bottom(a, v0):
        out = extremal_eigenpairs(dense_matvec(a), v0, 40, 1)
        return out.largest.values[0], out.smallest.values[0]

    batched = jax.jit(jax.vmap(top_and_bottom))(mats, v0s)
    single = jax.jit(top_and_bottom)
    looped = [single(a, v) for a, v in zip(mats, v0s)]
    np.testing.assert_allclose(batched[0], [x[0] for x in looped], rtol=1e-12)
    np.testing.assert_allclose(batched[1], [x[1] for x in looped], rtol=1e-12)
    np.testing.assert_allclose(batched[0], [50.0, 100.0, 150.0], rtol=1e-8)


def test_extremal_eigenvalues_of_mlp_hessian():
    """1-hidden-layer tanh MLP, 20-80-4 (2004 parameters), MSE on 64 random points."""
    k1, k2, k3, k4, k5 = jax.random.split(jax.random.key(0), 5)
    d_in, width, d_out, num_data = 20, 80, 4, 64
    params = {
        "w1": jax.random.normal(k1, (d_in, width)) / np.sqrt(d_in),
        "b1": 0.1 * jax.random.normal(k2, (width,)),
        "w2": jax.random.normal(k3, (width, d_out)) / np.sqrt(width),
        "b2": jnp.zeros(d_out),
    }
    x_data = jax.random.normal(k4, (num_data, d_in))
    y_data = jax.random.normal(k5, (num_data, d_out))
    flat, unravel = ravel_pytree(params)
    assert flat.shape == (2004,)

    def loss(theta):
        p = unravel(theta)
        out = jnp.tanh(x_data @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        return 0.5 * jnp.mean(jnp.sum((out - y_data) ** 2, axis=-1))

    def hvp(v):
        return jax.jvp(jax.grad(loss), (flat,), (v,))[1]

    exact = np.linalg.eigvalsh(np.asarray(jax.jit(jax.hessian(loss))(flat)))
    assert exact[0] < 0 < exact[-1]  # a saddle-like point: both ends matter
    v0 = jax.random.normal(jax.random.key(1), flat.shape)
    out = jax.jit(lambda v: extremal_eigenpairs(hvp, v, 100, 1))(v0)
    np.testing.assert_allclose(out.largest.values[0], exact[-1], rtol=1e-8)
    np.testing.assert_allclose(out.smallest.values[0], exact[0], rtol=1e-8)
    assert bool(out.largest.converged[0]) and bool(out.smallest.converged[0])


def _mlp_hessian_operator():
    """Hessian of a 8-16-16-1 tanh MLP (P = 433) at its initialization, MSE on 128 points."""
    from crit.hessian import dense_hessian, flat_loss, hvp_operator
    from crit.problems import mlp_problem

    problem = mlp_problem("gaussian", widths=(16, 16), n_points=128, dim_in=8)
    f, theta, _ = flat_loss(problem.loss_fn, problem.init_fn(jax.random.PRNGKey(0)))
    dense = np.asarray(jax.jit(lambda t: dense_hessian(f, t))(theta))
    return dense, lambda v: hvp_operator(f, theta)[1](v)


def _planted_negative_dominant():
    """P = 400: a bulk in [-1, 1], top eigenvalues 3 and 2.5, bottom ones -8 and -6 (larger in
    magnitude than the top: power iteration would return -8 as the 'largest')."""
    lam = np.concatenate([np.linspace(-1.0, 1.0, 396), [2.5, 3.0, -6.0, -8.0]])
    a = np.asarray(planted(lam, seed=7))
    return a, dense_matvec(jnp.asarray(a))


@pytest.mark.parametrize("operator", [_mlp_hessian_operator, _planted_negative_dominant],
                         ids=["mlp_hessian_P433", "planted_P400"])
def test_many_more_parameters_than_steps(operator):
    """P ≫ steps (40 Lanczos steps, P = 433 / 400): no breakdown, so nothing is exact. Only the
    extremal Ritz values converge; each lies within its true residual ρ of an eigvalsh
    eigenvalue (and within ρ²/δ, Kato-Temple, δ the distance to the other eigenvalues), the
    largest is the algebraically largest eigenvalue, and the Lanczos relation and the
    orthonormality of the basis hold to rounding."""
    a, matvec = operator()
    m, k = 40, 3
    exact = np.linalg.eigvalsh(a)
    norm = np.abs(exact).max()
    v0 = jax.random.normal(jax.random.PRNGKey(1), (a.shape[0],), dtype=jnp.float64)

    @jax.jit
    def run(v0):
        return (lanczos_tridiag(matvec, v0, m),
                extremal_eigenpairs(matvec, v0, m, k, true_residuals=True))

    res, out = run(v0)
    assert int(res.num_valid) == m  # no invariant subspace: the P >> steps regime
    q = np.asarray(res.basis).T
    off = np.asarray(res.betas[:-1])
    t = np.diag(np.asarray(res.alphas)) + np.diag(off, 1) + np.diag(off, -1)
    relation = a @ q - q @ t - np.outer(np.asarray(res.residual), np.eye(m)[-1])
    assert np.abs(relation).max() <= 1e-14 * norm
    assert np.abs(q.T @ q - np.eye(m)).max() <= 1e-13
    # Interior Ritz values are far from converged (residuals of order ‖A‖/m)...
    ritz, s = tridiag_eigh(res.alphas, res.betas, res.valid)
    rho_all = np.abs(np.asarray(res.betas[-1] * s[-1]))
    assert np.median(rho_all) > 1e-3 * norm
    # ... the extremal ones are not, and the bounds hold with the true residuals. The slack is
    # eigvalsh's own rounding, a few ε‖A‖.
    slack = 64 * np.finfo(float).eps * norm
    for pairs, reference in ((out.largest, exact[::-1][:k]), (out.smallest, exact[:k])):
        theta, rho = np.asarray(pairs.values), np.asarray(pairs.residuals)
        assert bool(pairs.converged[0]) and rho[0] <= 1e-8 * norm
        np.testing.assert_allclose(pairs.residual_estimates, rho, rtol=1e-3, atol=slack)
        for i in range(k):
            err = abs(theta[i] - reference[i])
            delta = np.min(np.abs(np.delete(exact, np.argmin(np.abs(exact - theta[i]))) - theta[i]))
            assert err <= min(rho[i], rho[i] ** 2 / delta) + slack, (i, err, rho[i], delta)
    assert float(out.largest.values[0]) == pytest.approx(exact[-1], abs=slack)
    assert float(out.smallest.values[0]) == pytest.approx(exact[0], abs=slack)
