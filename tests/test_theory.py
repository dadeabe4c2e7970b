"""Tests for crit.theory: closed forms, asymptotics, and fits on planted synthetic data."""

import numpy as np
import pytest
from scipy import integrate

from crit import theory


# --- Bray & Dean ------------------------------------------------------------------------------


def test_bray_dean_is_the_semicircle_cdf():
    x = np.linspace(-1, 1, 9)
    density = lambda t: 2 / np.pi * np.sqrt(1 - t * t)
    expected = [integrate.quad(density, -1, xi)[0] for xi in x]
    np.testing.assert_allclose(theory.bray_dean_index(x), expected, atol=1e-10)
    np.testing.assert_allclose(theory.bray_dean_index(x) + theory.bray_dean_index(-x), 1.0)


def test_bray_dean_clipped_outside():
    np.testing.assert_array_equal(theory.bray_dean_index([-3.0, -1.0, 1.0, 2.5]), [0, 0, 1, 1])
    assert theory.bray_dean_index(0.0) == pytest.approx(0.5)


def test_semicircle_index_sign_convention():
    # Centre well above zero: all eigenvalues positive, a minimum (index 0).
    assert theory.semicircle_index(2.0, 1.0) == 0.0
    assert theory.semicircle_index(-2.0, 1.0) == 1.0
    assert theory.semicircle_index(0.0, 3.0) == pytest.approx(0.5)
    # Monte-Carlo check against a sampled GOE-like semicircle: fraction below zero.
    rng = np.random.default_rng(0)
    n = 200
    a = rng.standard_normal((n, n))
    h = (a + a.T) / np.sqrt(2 * n)  # GOE, semicircle of radius 2
    mu = 0.7
    lam = np.linalg.eigvalsh(h + mu * np.eye(n))
    assert np.mean(lam < 0) == pytest.approx(theory.semicircle_index(mu, 2.0), abs=0.03)


def test_bray_dean_edge_three_halves_law():
    # F(-1 + δ) = (2 / (3π)) (2δ)^{3/2} (1 − 3δ/20 + O(δ²)).
    delta = np.geomspace(1e-6, 1e-2, 9)
    f = theory.bray_dean_index(-1 + delta)
    lead = 2 / (3 * np.pi) * (2 * delta) ** 1.5
    np.testing.assert_allclose(f / lead, 1 - 0.15 * delta, rtol=1e-5)
    slope = np.polyfit(np.log(delta), np.log(f), 1)[0]
    assert slope == pytest.approx(1.5, abs=1e-3)


def test_fit_bray_dean_recovers_planted_curve():
    rng = np.random.default_rng(1)
    eps = rng.uniform(0.0, 1.0, 80)
    slope, half = 3.0, 0.55
    alpha = theory.bray_dean_index(slope * (eps - half)) + 0.005 * rng.standard_normal(80)
    fit = theory.fit_bray_dean(eps, alpha)
    assert fit.success
    assert fit.slope == pytest.approx(slope, rel=0.05)
    assert fit.energy_half == pytest.approx(half, abs=0.01)
    assert fit.residual_rms == pytest.approx(0.005, rel=0.3)
    np.testing.assert_allclose(fit.predict([half]), [0.5], atol=0.01)


# --- Pennington & Bahri -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "phi, eps_c",
    [(0.0, 0.125), (0.1, 0.083435), (0.25, 0.04351), (0.5, 0.011271), (0.75, 0.001266), (1, 0)],
)
def test_critical_energy_reference_values(phi, eps_c):
    assert theory.critical_energy(phi) == pytest.approx(eps_c, abs=5e-7)


def test_critical_energy_factored_form_matches_paper_formula():
    phi = np.linspace(0, 1, 101)
    paper = (1 - 20 * phi - 8 * phi**2 + (1 + 8 * phi) ** 1.5) / 16
    np.testing.assert_allclose(theory.critical_energy(phi), paper, atol=1e-14)
    with pytest.raises(ValueError):
        theory.critical_energy(1.5)


def test_minimizer_energy_and_index_law():
    assert theory.minimizer_energy(0.0) == 0.5
    assert theory.minimizer_energy(0.5) == pytest.approx(0.125)
    eps_c = theory.critical_energy(0.5)
    eps = np.array([0.0, eps_c, 2 * eps_c, 5 * eps_c])
    np.testing.assert_allclose(
        theory.pennington_bahri_index(eps, 0.5, 0.033), [0, 0, 0.033, 0.033 * 8], rtol=1e-12
    )


def test_normalized_energy():
    # Zero predictor on targets of variance 4: raw MSE = 4, so ε = ½.
    assert theory.normalized_energy(4.0, 4.0) == pytest.approx(0.5)
    assert theory.normalized_energy(2.0, 4.0, half_factor_included=True) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        theory.normalized_energy(1.0, 0.0)


def _planted_power_law(k, eps_c=0.02, alpha0=0.05, n=40, noise=0.05, seed=3):
    rng = np.random.default_rng(seed)
    eps = eps_c * (1 + np.geomspace(0.05, 3.0, n))
    alpha = alpha0 * ((eps - eps_c) / eps_c) ** k * np.exp(noise * rng.standard_normal(n))
    return eps, alpha


@pytest.mark.parametrize("k", [1.5, 1.0])
def test_fit_power_law_known_eps_c(k):
    eps, alpha = _planted_power_law(k)
    # Below-threshold points with α = 0 are ignored.
    eps, alpha = np.append(eps, [0.01, 0.015]), np.append(alpha, [0.0, 0.0])
    fit = theory.fit_power_law(eps, alpha, eps_c=0.02, seed=0, n_boot=500)
    lo, hi = fit.exponent_interval
    assert lo < k < hi
    assert abs(fit.exponent - k) < 0.1
    assert fit.prefactor == pytest.approx(0.05, rel=0.1)
    assert fit.n_points == 40 and not fit.eps_c_fitted
    assert hi - lo < 0.1


@pytest.mark.parametrize("k", [1.5, 1.0])
def test_fit_power_law_fitted_eps_c(k):
    eps, alpha = _planted_power_law(k)
    fit = theory.fit_power_law(eps, alpha, seed=0, n_boot=200)
    lo, hi = fit.exponent_interval
    assert lo < k < hi
    assert abs(fit.exponent - k) < 0.1
    assert fit.critical_energy == pytest.approx(0.02, rel=0.05)
    assert fit.eps_c_fitted


def test_fit_power_law_deterministic_and_distinguishes_exponents():
    eps, alpha = _planted_power_law(1.5)
    a = theory.fit_power_law(eps, alpha, eps_c=0.02, seed=7, n_boot=300)
    b = theory.fit_power_law(eps, alpha, eps_c=0.02, seed=7, n_boot=300)
    assert a.exponent_interval == b.exponent_interval
    np.testing.assert_array_equal(a.exponent_samples, b.exponent_samples)
    lo, hi = a.exponent_interval
    assert not lo < 1.0 < hi  # a k = 1 law is rejected on k = 3/2 data
    with pytest.raises(ValueError):
        theory.fit_power_law([0.1, 0.2], [0.1, 0.2], eps_c=0.05)


# --- Coin-flip model --------------------------------------------------------------------------


def test_coin_flip_minimum_probability():
    assert theory.coin_flip_minimum_probability(1) == 0.5
    assert theory.coin_flip_minimum_probability(10) == 1 / 1024
    np.testing.assert_allclose(
        theory.coin_flip_minimum_probability([0, 2, 141]), [1, 0.25, 2.0**-141]
    )


def test_coin_flip_index_distribution():
    index, pmf = theory.coin_flip_index_distribution(4)
    np.testing.assert_allclose(index, [0, 0.25, 0.5, 0.75, 1])
    np.testing.assert_allclose(pmf, np.array([1, 4, 6, 4, 1]) / 16)
    index, pmf = theory.coin_flip_index_distribution(141)
    assert pmf.sum() == pytest.approx(1.0)
    assert pmf[0] == pytest.approx(theory.coin_flip_minimum_probability(141))
    assert np.sum(index * pmf) == pytest.approx(0.5)
    assert np.sqrt(np.sum((index - 0.5) ** 2 * pmf)) == pytest.approx(0.5 / np.sqrt(141))


# --- Choromanska et al. -----------------------------------------------------------------------


def test_loss_spread_table():
    table = theory.loss_spread_table({50: np.arange(101.0), 25: [1.0, 3.0, np.nan, np.inf]})
    assert list(table) == [25, 50]
    row = table[50]
    summary = (row.n_runs, row.n_diverged, row.mean, row.q05, row.q50, row.q95)
    assert summary == (101, 0, 50, 5, 50, 95)
    assert row.std == pytest.approx(np.std(np.arange(101.0), ddof=1))
    small = table[25]
    assert (small.n_runs, small.n_diverged, small.mean, small.q50) == (2, 2, 2.0, 2.0)
    assert small.std == pytest.approx(np.sqrt(2))


def test_train_test_correlation():
    train = np.arange(1.0, 11.0)
    c = theory.train_test_correlation(train, np.exp(train))  # monotone, not linear
    assert c.spearman == pytest.approx(1.0)
    assert 0.5 < c.pearson < 1.0
    c = theory.train_test_correlation(train, -2 * train + 1)
    assert c.pearson == pytest.approx(-1.0) and c.spearman == pytest.approx(-1.0)
    assert c.n == 10


# --- Wilson interval --------------------------------------------------------------------------


def test_wilson_interval_known_values():
    z2 = 1.96**2
    # Closed forms at the ends: k = 0 gives (0, z²/(n + z²)); k = n mirrors it.
    assert theory.wilson_interval(0, 10) == pytest.approx((0.0, z2 / (10 + z2)), abs=1e-12)
    assert theory.wilson_interval(10, 10) == pytest.approx((10 / (10 + z2), 1.0), abs=1e-12)
    assert theory.wilson_interval(5, 10) == pytest.approx((0.23659, 0.76341), abs=1e-5)
    with pytest.raises(ValueError):
        theory.wilson_interval(3, 2)


@pytest.mark.parametrize("k, n", [(1, 100), (50, 100), (7, 23), (141, 500)])
def test_wilson_interval_inverts_the_score_test(k, n):
    # The Wilson bounds are the p solving (k/n − p)² = z² p (1 − p) / n.
    z2, ph = 1.96**2, k / n
    roots = np.sort(np.roots([1 + z2 / n, -(2 * ph + z2 / n), ph * ph]).real)
    np.testing.assert_allclose(theory.wilson_interval(k, n), roots, atol=1e-12)
    lo, hi = theory.wilson_interval(np.array([k, 0]), np.array([n, n]))
    np.testing.assert_allclose([lo[0], hi[0]], roots, atol=1e-12)
