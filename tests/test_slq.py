"""Tests for crit.slq: quadrature identities, fraction intervals, densities, batching."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401  (float64)
from crit.slq import slq, slq_density, slq_fractions, slq_log_density

# Exact zeros, a gap, two bulks and outliers of both signs (n = 200).
SPECTRUM = np.concatenate(
    [
        np.zeros(40),
        np.linspace(0.5, 2.0, 100),
        np.linspace(-1.5, -0.5, 50),
        [-4.0, -3.0, 3.0, 4.0, 6.0, 8.0, 10.0, 12.0, 15.0, 20.0],
    ]
)
N = len(SPECTRUM)
TOL = 0.1


def planted(eigenvalues, seed=0):
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    return jnp.asarray((q * eigenvalues) @ q.T), q


def exact_fractions(eigenvalues, tol):
    lam = np.asarray(eigenvalues)
    return np.mean(lam > tol), np.mean(lam < -tol), np.mean(np.abs(lam) <= tol)


# Compiled once per shape and shared by the tests below (keeps the file fast).
fractions = jax.jit(slq_fractions)


@pytest.fixture(scope="module")
def problem():
    a, q = planted(SPECTRUM)
    run = jax.jit(
        lambda key, m, nv: slq(lambda v: a @ v, key, N, nv, m), static_argnums=(1, 2)
    )
    return a, q, run


def test_weights_sum_to_one_and_nodes_inside_spectrum(problem):
    _, _, run = problem
    res = run(jax.random.key(0), 30, 4)
    assert res.nodes.shape == res.weights.shape == (4, 30)
    np.testing.assert_allclose(res.weights.sum(axis=1), 1.0, atol=1e-13)
    assert bool(jnp.all(res.weights >= 0))
    assert float(res.nodes.min()) >= -4.0 - 1e-10 and float(res.nodes.max()) <= 20.0 + 1e-10
    # Gauss quadrature reproduces moments v^T A^j v exactly for j <= 2m - 1.
    probes = jax.random.rademacher(jax.random.key(0), (4, N), dtype=jnp.float64) / np.sqrt(N)
    for j in (1, 2, 5):
        exact = jnp.einsum("pi,pi->p", probes, probes @ jnp.linalg.matrix_power(problem[0], j))
        quad = jnp.sum(res.weights * res.nodes**j, axis=1)
        np.testing.assert_allclose(quad, exact, rtol=1e-10)


@pytest.mark.parametrize("m", [8, 30, 80])
@pytest.mark.parametrize("tol", [1e-8, TOL, 0.7])
def test_per_probe_bounds_contain_exact_probe_masses(problem, m, tol):
    """No sampling error here: each probe's bracket must hold its own exact mass."""
    _, q, run = problem
    key = jax.random.key(1)
    res = run(key, m, 4)
    probes = np.asarray(jax.random.rademacher(key, (4, N), dtype=jnp.float64)) / np.sqrt(N)
    mass = (probes @ q) ** 2  # mu_v on each eigenvalue
    lam = SPECTRUM
    exact = [mass[:, lam > tol].sum(1), mass[:, lam < -tol].sum(1), mass[:, abs(lam) <= tol].sum(1)]
    fr = fractions(res, tol)
    for est, ex in zip((fr.positive, fr.negative, fr.null), exact):
        assert np.all(np.asarray(est.probe_lo) <= ex + 1e-12)
        assert np.all(ex <= np.asarray(est.probe_hi) + 1e-12)


def test_fraction_intervals_contain_exact_and_shrink(problem):
    _, _, run = problem
    exact = exact_fractions(SPECTRUM, TOL)
    shapes = [(8, 4), (30, 4), (30, 32)]
    configs = {(m, nv): fractions(run(jax.random.key(2), m, nv), TOL) for m, nv in shapes}
    for fr in configs.values():
        for est, ex in zip((fr.positive, fr.negative, fr.null), exact):
            assert float(est.lo) <= ex <= float(est.hi)
            assert float(est.lo) <= float(est.bias_lo) <= float(est.bias_hi) <= float(est.hi)
    for i in range(3):
        coarse, more_steps, more_probes = (configs[c][i] for c in shapes)
        # More Lanczos steps: smaller quadrature-bias bracket.
        assert float(more_steps.bias_hi - more_steps.bias_lo) < 0.5 * float(
            coarse.bias_hi - coarse.bias_lo
        )
        # More probes: smaller sampling part, hence a narrower interval.
        assert float(more_probes.hi - more_probes.lo) < float(more_steps.hi - more_steps.lo)
        assert float(more_probes.stderr_bound) < 0.4 * float(more_steps.stderr_bound)


def test_breakdown_gives_exact_quadrature_and_collapsed_bracket():
    distinct = np.array([-3.0, -1.0, 0.0, 0.5, 1.0, 2.0, 4.0, 7.0])
    lam = np.repeat(distinct, 20)
    a, q = planted(lam, seed=5)
    key = jax.random.key(3)
    res = slq(lambda v: a @ v, key, len(lam), 4, 20)
    assert bool(jnp.all(res.valid.sum(axis=1) == 8))
    assert bool(jnp.all(jnp.isfinite(res.nodes))) and bool(jnp.all(jnp.isfinite(res.weights)))
    np.testing.assert_allclose(res.nodes[:, :8], np.tile(distinct, (4, 1)), atol=1e-12)
    assert float(jnp.max(jnp.abs(res.weights[:, 8:]))) == 0.0
    probes = np.asarray(jax.random.rademacher(key, (4, len(lam)), dtype=jnp.float64))
    mass = (probes / np.sqrt(len(lam)) @ q) ** 2
    per_value = np.stack([mass[:, lam == d].sum(1) for d in distinct], axis=1)
    np.testing.assert_allclose(res.weights[:, :8], per_value, atol=1e-12)
    fr = fractions(res, 0.2)
    for est in (fr.positive, fr.negative, fr.null):
        assert float(jnp.max(est.probe_hi - est.probe_lo)) < 1e-8


def test_density_and_log_density_masses(problem):
    _, _, run = problem
    res = run(jax.random.key(0), 30, 4)
    grid = jnp.linspace(-6.0, 22.0, 20001)
    phi = slq_density(res, grid, sigma=0.05)
    np.testing.assert_allclose(jnp.trapezoid(phi, grid), 1.0, atol=1e-6)
    phi_default = slq_density(res, grid)  # sigma = sqrt(1e-5) * span / 2, resolves outliers
    assert float(phi_default.max()) > float(phi.max())
    log_grid = jnp.linspace(-3.0, 2.5, 5001)
    fr = fractions(res, TOL)
    for sign, est in ((1, fr.positive), (-1, fr.negative)):
        psi = slq_log_density(res, log_grid, sign=sign, tol=TOL)
        np.testing.assert_allclose(jnp.trapezoid(psi, log_grid), est.mean, atol=1e-6)


def test_vmap_over_matrices_equals_loop():
    mats = jnp.stack([planted(SPECTRUM * s, seed=s)[0] for s in (1, 2, 3)])

    def summary(a):
        fr = slq_fractions(slq(lambda v: a @ v, jax.random.key(4), N, 3, 20), TOL)
        return fr.positive.mean, fr.positive.lo, fr.null.hi

    batched = jax.jit(jax.vmap(summary))(mats)
    single = jax.jit(summary)
    looped = np.array([single(a) for a in mats]).T
    np.testing.assert_allclose(np.array(batched), looped, atol=1e-12)


def test_a_cluster_holding_several_ritz_values_is_localized_as_a_whole():
    """150 eigenvalues within ±1e-7 and a bulk in [1, 2]: 80 steps put 8 Ritz values inside the
    cluster, too close together for one-pair bounds (their residuals, ~5e-5, exceed their
    spacing). The group bound (crit.slq._block_localized: the residuals cancel across the
    cluster) brackets the null mass at τ = 1e-3 to within 0.003 per probe, around the exact
    probe mass; with the unsigned fallback (no couplings) it stays valid but is looser."""
    rng = np.random.default_rng(0)
    lam = np.concatenate([rng.uniform(-1e-7, 1e-7, 150), rng.uniform(1.0, 2.0, 250)])
    a, q = planted(lam, seed=1)
    key = jax.random.key(0)
    res = slq(lambda v: a @ v, key, lam.size, 4, 80)
    inside = (np.abs(np.asarray(res.nodes)) < 1e-3) & np.asarray(res.valid)
    assert np.all(inside.sum(axis=1) >= 4)
    probes = np.asarray(jax.random.rademacher(key, (4, lam.size), dtype=jnp.float64))
    exact = ((probes / np.sqrt(lam.size) @ q) ** 2)[:, np.abs(lam) <= 1e-3].sum(axis=1)
    fr = fractions(res, 1e-3)
    lo, hi = np.asarray(fr.null.probe_lo), np.asarray(fr.null.probe_hi)
    assert np.all((lo <= exact + 1e-12) & (exact <= hi + 1e-12))
    assert np.max(hi - lo) < 0.003
    unsigned = fractions(res._replace(coupling=None), 1e-3)
    width = np.asarray(unsigned.null.probe_hi - unsigned.null.probe_lo)
    assert np.all(np.asarray(unsigned.null.probe_lo) <= exact + 1e-12)
    assert np.max(width) > np.max(hi - lo)
