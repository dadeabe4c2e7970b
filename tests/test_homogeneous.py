"""Tests for crit.homogeneous (Haeffele & Vidal 2017): homogeneity, the polar problem on cases
with a known answer, the certificate, the optimal rescaling and the meta-algorithm."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401  (float64)
from crit import homogeneous as hv



def tiny_data(n=30, d=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    v = rng.standard_normal((3, d))
    y = np.maximum(x @ v.T, 0) @ np.array([1.0, -1.0, 1.0]) + 0.05 * rng.standard_normal(n)
    return jnp.asarray(x), jnp.asarray(y)


def test_subnetworks_and_regularizers_are_positively_homogeneous_of_degree_two():
    x, _ = tiny_data()
    params, mask = hv.init_subnetworks(jax.random.PRNGKey(0), 4, 2, 4, scale=1.0)
    for alpha in (0.3, 2.0):
        scaled = hv.Subnetworks(alpha * params.w1, alpha * params.w2)
        np.testing.assert_allclose(hv.subnetwork_outputs(scaled, x),
                                   alpha ** 2 * hv.subnetwork_outputs(params, x), rtol=1e-12)
        for kind in hv.REGULARIZERS:
            np.testing.assert_allclose(hv.unit_regularizer(scaled, kind),
                                       alpha ** 2 * hv.unit_regularizer(params, kind), rtol=1e-12)
    # ‖w1‖|w2| ≤ ½(‖w1‖² + w2²), with equality for balanced units
    assert np.all(hv.unit_regularizer(params, "product")
                  <= hv.unit_regularizer(params, "squared") + 1e-15)
    with pytest.raises(ValueError, match="regularizer"):
        hv.unit_regularizer(params, "l1")


def test_polar_known_answer_on_the_coordinate_axes():
    # X = I: ⟨z, relu(w)⟩ over the unit sphere is maximal at w = z₊/‖z₊‖ with value ‖z₊‖, and
    # with w2 = −1 at z₋: the polar is max(‖z₊‖, ‖z₋‖).
    z = jnp.array([0.3, -0.5, 0.2, -0.1])
    res = jax.jit(hv.polar, static_argnums=(3, 4))(z, jnp.eye(4), jax.random.PRNGKey(0), 64, 100)
    assert float(res.value) == pytest.approx(np.sqrt(0.25 + 0.01), rel=1e-9)
    assert float(res.w2) == -1.0
    np.testing.assert_allclose(res.w1, np.array([0.0, 0.5, 0.0, 0.1]) / np.sqrt(0.26), atol=1e-6)


def test_polar_matches_a_brute_force_angle_search_in_two_dimensions():
    x, _ = tiny_data(n=25, seed=3)
    z = jnp.asarray(np.random.default_rng(4).standard_normal(25)) / 25
    res = jax.jit(hv.polar, static_argnums=(3, 4))(z, x, jax.random.PRNGKey(1), 32, 200)
    angles = np.linspace(0, 2 * np.pi, 200001)
    w = np.stack([np.cos(angles), np.sin(angles)], axis=1)
    brute = np.max(np.abs(np.maximum(np.asarray(x) @ w.T, 0).T @ np.asarray(z)))
    # both are lower bounds of the max (the grid's error is O(Δφ) at a kink)
    assert float(res.value) == pytest.approx(brute, rel=1e-6)
    assert float(res.value) >= brute - 1e-12


def test_certificate_detects_a_zero_subnetwork():
    x, y = tiny_data()
    params = hv.Subnetworks(jnp.array([[1.0, 0.5], [0.0, 0.0], [-0.3, 0.8], [0.0, 0.0]]),
                            jnp.array([0.7, 0.0, -0.4, 0.0]))
    mask = jnp.array([True, True, True, False])  # slot 3 is unused, slot 1 active but zero
    check = jax.jit(lambda p, m: hv.certificate(p, m, x, y, 0.05, jax.random.PRNGKey(0),
                                                num_starts=16, steps=50))
    cert = check(params, mask)
    assert int(cert.n_active) == 3
    assert int(cert.n_zero) == 1 and bool(cert.global_by_zero)
    # this point is not a minimum at all, and the polar test says so
    assert float(cert.polar) > 0.05 and not bool(cert.certified)
    params2 = hv.Subnetworks(params.w1.at[1].set(jnp.array([0.2, 0.1])), params.w2.at[1].set(0.3))
    cert2 = check(params2, mask)
    assert int(cert2.n_zero) == 0 and not bool(cert2.global_by_zero)


def test_adding_the_polar_maximizer_lowers_the_objective_and_rescaling_is_stationary():
    x, y = tiny_data()
    lam = 0.02
    params, mask = hv.init_subnetworks(jax.random.PRNGKey(1), 4, 2, 1, scale=0.5)

    @jax.jit
    def go(params, mask):
        before = hv.objective(params, x, y, lam)
        z = -hv.output_gradient(params, x, y)
        pol = hv.polar(z, x, jax.random.PRNGKey(2), 32, 100)
        new, new_mask, tau, after = hv.add_subnetwork(params, mask, pol.w1, pol.w2, x, y, lam)
        scaled = hv.rescale_subnetworks(new, new_mask, x, y, lam, steps=2000)
        return before, pol.value, new_mask, tau, after, scaled

    before, polar, new_mask, tau, after, scaled = go(params, mask)
    assert float(polar) > lam  # one random unit is far from optimal
    assert list(np.asarray(new_mask)) == [True, True, False, False] and float(tau) > 0
    assert float(after) < float(before)
    f_scaled = float(hv.objective(scaled, x, y, lam))
    assert f_scaled <= float(after) + 1e-12
    # stationarity along rescalings: ⟨z, φ(ŵ_j)⟩ = λ for every unit kept (s_j > 0), ≤ λ else
    z = -hv.output_gradient(scaled, x, y)
    theta = np.asarray(hv.unit_regularizer(scaled))
    phi = np.asarray(hv.subnetwork_outputs(scaled, x))
    for j in range(2):
        if theta[j] > 1e-10:
            assert float(z @ phi[:, j]) / theta[j] == pytest.approx(lam, rel=1e-5)
    assert np.all(np.abs(scaled.w1[2:]) == 0) and np.all(scaled.w2[2:] == 0)


def test_meta_algorithm_objective_never_increases():
    x, y = tiny_data()
    rounds, params, mask = hv.meta_algorithm(x, y, 0.05, jax.random.PRNGKey(0), r_max=4,
                                             steps=300, polish_steps=30, rescale_steps=200,
                                             num_starts=16, polar_steps=40)
    assert 1 <= len(rounds) <= 4
    sequence = [rounds[0].objective_start]
    for rd in rounds:
        sequence.append(rd.objective)
        if np.isfinite(rd.objective_after_add):
            sequence.append(rd.objective_after_add)
            assert rd.tau_added > 0 and not rd.certified
    assert np.all(np.diff(sequence) <= 1e-12 * np.abs(sequence[:-1])), sequence
    assert [rd.r for rd in rounds] == list(range(1, len(rounds) + 1))
    assert int(np.sum(mask)) == rounds[-1].r
    for rd in rounds:  # the bound on F − F* is consistent with the certificate
        assert rd.gap_bound >= 0 and (rd.gap_bound < rd.objective or not rd.certified)
    last = rounds[-1]
    assert last.certified or last.r == 4
    final = float(hv.objective(params, x, y, 0.05))
    assert final == pytest.approx(last.objective, rel=1e-12)
