"""Tests for crit.krylov against dense eigenvalues of a small MLP's Hessian (P = 433)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401  (float64)
from crit.hessian import dense_hessian, flat_loss, hvp_operator
from crit.krylov import krylov_spectrum
from crit.problems import mlp_problem
from crit.slq import slq
from crit.spectrum import classify_spectrum, default_tolerance
from crit.train import make_optimizer, train


PROBLEM = mlp_problem("gaussian", widths=(16, 16), n_points=128, dim_in=8)
STEPS, PROBES, K = 150, 8, 3


def flat_params(i):
    return flat_loss(PROBLEM.loss_fn, PROBLEM.init_fn(jax.random.fold_in(jax.random.PRNGKey(0), i)))


F, THETA0, UNRAVEL = flat_params(0)


@jax.jit
def spectrum_at(theta, key):
    # machine τ = P·ε·max|θ|, the dense default, so exact counts can be compared
    return krylov_spectrum(hvp_operator(F, theta)[1], key, theta.size, num_steps=STEPS,
                           num_probes=PROBES, k=K, tol_mode="machine")


hessian = jax.jit(lambda theta: dense_hessian(F, theta))


@pytest.fixture(scope="module")
def points():
    """The initialization and the point after 1000 Adam steps, each with its exact spectrum."""
    opt = make_optimizer("adam", 1e-2)
    trained = jax.jit(lambda t: train(F, opt, t, 1000, 100)[0])(THETA0)
    out = []
    for theta in (THETA0, trained):
        eigs = np.linalg.eigvalsh(np.asarray(hessian(theta)))
        out.append((theta, eigs, spectrum_at(theta, jax.random.PRNGKey(1))))
    return out


def test_extremal_eigenvalues_match_eigvalsh(points):
    for _, eigs, ks in points:
        assert bool(ks.lambda_max_converged) and bool(ks.lambda_min_converged)
        assert float(ks.lambda_max) == pytest.approx(eigs[-1], rel=1e-8)
        assert float(ks.lambda_min) == pytest.approx(eigs[0], rel=1e-8)
        # Every converged Ritz value lies within its residual estimate of an eigenvalue, and
        # the k extremal ones are the k extremal eigenvalues (they are well separated here).
        for values, rho, ok, exact in ((ks.largest, ks.largest_residuals, ks.largest_converged,
                                        eigs[::-1][:K]),
                                       (ks.smallest, ks.smallest_residuals,
                                        ks.smallest_converged, eigs[:K])):
            ok = np.asarray(ok)
            assert ok[0]  # the bound below is checked on at least the extremal value
            err = np.abs(np.asarray(values) - exact)
            assert np.all(err[ok] <= np.asarray(rho)[ok] + 1e-12 * abs(eigs).max())
        # Rayleigh-Ritz values never leave the spectrum (up to rounding).
        slack = 1e-12 * abs(eigs).max()
        assert eigs[0] - slack <= float(ks.lambda_min)
        assert float(ks.lambda_max) <= eigs[-1] + slack


def test_exact_fractions_inside_intervals(points):
    for _, eigs, ks in points:
        tau = float(ks.tolerance)
        assert tau == pytest.approx(float(default_tolerance(jnp.asarray(eigs))), rel=1e-8)
        exact = classify_spectrum(jnp.asarray(eigs), tau)
        for name, value in (("min_ratio", exact.min_ratio), ("index", exact.index),
                            ("null_fraction", exact.null_fraction)):
            lo, hi = float(getattr(ks, name + "_lo")), float(getattr(ks, name + "_hi"))
            assert lo <= float(value) <= hi, (name, lo, float(value), hi)
            assert lo <= float(getattr(ks, name)) <= hi
        # deflated values are counted exactly; the rest is SLQ over probes Πz/√n of mass
        # ‖Πz‖²/n (unbiased, but 1 - k/n only on average)
        mass = float(jnp.mean(ks.probe_mass)) + float(ks.num_deflated) / float(ks.dim)
        assert float(ks.min_ratio + ks.index + ks.null_fraction) == pytest.approx(mass)
        assert mass == pytest.approx(1.0, abs=0.02)
        assert int(ks.num_matvecs) == (PROBES + 1) * STEPS + 2 * K  # + Rayleigh checks
        assert ks.nodes.shape == ks.weights.shape == (PROBES, STEPS)
        np.testing.assert_allclose(ks.weights.sum(axis=1), 1.0, rtol=1e-12)


def test_vmap_over_inits_equals_loop():
    thetas = jnp.stack([THETA0, flat_params(1)[1]])
    keys = jax.random.split(jax.random.PRNGKey(2), 2)
    batched = jax.jit(jax.vmap(spectrum_at))(thetas, keys)
    for i in range(2):
        one = spectrum_at(thetas[i], keys[i])
        for name in ("lambda_min", "lambda_max", "min_ratio", "min_ratio_lo", "min_ratio_hi",
                     "index", "null_fraction", "tolerance"):
            np.testing.assert_allclose(getattr(batched, name)[i], getattr(one, name),
                                       rtol=1e-7, atol=1e-12, err_msg=name)
        np.testing.assert_allclose(batched.nodes[i], one.nodes, rtol=1e-6,
                                   atol=1e-9 * abs(float(one.lambda_max)))


def test_slq_part_equals_crit_slq_with_probe_batches():
    # A planted 120 x 120 spectrum keeps this cheap: the equalities do not depend on it.
    # Runs in sequential groups of 2 (lax.map) must give what crit.slq.slq gives (vmap).
    rng = np.random.default_rng(0)
    lam = np.concatenate([np.zeros(30), np.linspace(-1.0, -0.1, 30), np.linspace(0.1, 3.0, 60)])
    q, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    a = jnp.asarray((q * lam) @ q.T)
    key = jax.random.PRNGKey(3)
    out = jax.jit(lambda: krylov_spectrum(lambda v: a @ v, key, lam.size, num_steps=20,
                                          num_probes=4, k=2, probe_batch=2, deflate=False,
                                          tol_mode="machine"))()  # 5 runs
    ref = slq(lambda v: a @ v, jax.random.split(key)[0], lam.size, 4, 20)
    np.testing.assert_allclose(out.nodes, ref.nodes, atol=1e-12)
    np.testing.assert_allclose(out.weights, ref.weights, atol=1e-12)
    np.testing.assert_allclose(out.node_residuals, ref.residuals, atol=1e-12)
    # Default τ = n·ε·max|θ| over the Ritz values, bracketed without recomputing it: Ritz values
    # lie inside the spectrum [-1, 3] (so max|θ| <= 3), and the extremal run's largest is one.
    eps = np.finfo(np.float64).eps
    assert lam.size * eps * float(out.lambda_max) <= float(out.tolerance)
    assert float(out.tolerance) <= lam.size * eps * 3.0 * (1 + 1e-12)
    assert lam.min() <= float(out.lambda_min) and float(out.lambda_max) <= lam.max() + 1e-12


def _bulk_and_outliers():
    """Three outliers (1, 0.5, -0.3) over a bulk of 300 eigenvalues in ±1e-3: at τ ≥ 1e-2 the
    whole bulk counts as null and the intervals are sharp whatever the signs in it."""
    rng = np.random.default_rng(0)
    d = jnp.asarray(np.concatenate([[1.0, 0.5, -0.3], rng.uniform(-1e-3, 1e-3, 300)]))
    return (lambda v: d * v), d.size


def test_nothing_is_resolved_above_the_ceiling():
    """Issue 24 point 6: a narrow interval at τ = 0.05·λ_max says nothing about the bulk's
    signs; above --resolve_ceiling no fraction is called resolved, and the resolved τ search
    stays under it."""
    from crit.krylov import REL_TOL_GRID

    matvec, n = _bulk_and_outliers()
    key = jax.random.key(3)
    opts = dict(num_steps=30, num_probes=4, k=3)
    coarse = krylov_spectrum(matvec, key, n, tol=0.05, resolve_ceiling=1.0, **opts)
    assert bool(coarse.resolved)  # sharp there: only the ceiling can make it unresolved
    capped = krylov_spectrum(matvec, key, n, tol=0.05, **opts)  # default ceiling 1e-2
    assert not bool(capped.resolved)
    for ceiling in (1e-2, 1e-6):
        spec = krylov_spectrum(matvec, key, n, resolve_ceiling=ceiling, **opts)
        assert float(spec.tolerance_rel) <= ceiling * (1 + 1e-9)
        assert np.min(np.abs(np.asarray(REL_TOL_GRID) / float(spec.tolerance_rel) - 1)) < 1e-9


def test_common_tolerance_is_the_coarsest_resolved_one():
    from crit.krylov import REL_TOL_GRID, common_tolerance_index
    from crit.protocol import common_tolerance_columns

    grid = np.asarray(REL_TOL_GRID)
    rel = np.array([grid[2], grid[9], grid[5], grid[20]])
    resolved = np.array([True, True, True, False])  # the last one is never counted
    assert common_tolerance_index(rel, resolved) == 9
    assert common_tolerance_index(rel, np.zeros(4, bool), 1e-2) == int(
        np.flatnonzero(grid <= 1e-2)[-1])
    G = grid.size
    ratio = np.tile(np.linspace(0, 1, G), (4, 1)) + np.arange(4)[:, None] * 1e-3
    width = np.full((4, G), 0.01)
    width[1, 9] = 0.2   # widths need not shrink monotonically: checked at the common τ
    records = dict(min_ratio=ratio[:, 0], tolerance_rel=rel, resolved=resolved,
                   grid_min_ratio=ratio, grid_min_ratio_lo=ratio - 0.005,
                   grid_min_ratio_hi=ratio + 0.005, grid_width=width)
    cols = common_tolerance_columns(records, 0.05, 1e-2)
    assert np.all(cols["tolerance_common_rel"] == grid[9])
    np.testing.assert_array_equal(cols["min_ratio_common"], ratio[:, 9])
    np.testing.assert_array_equal(cols["resolved_common"], [True, False, True, True])
