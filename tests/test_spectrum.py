"""Tolerance-aware classification of eigenvalues."""

import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401
from crit.problems import DATASETS, check_dataset, mlp_param_count, mlp_problem
from crit.spectrum import EPS64, classify_spectrum, default_tolerance, exact_spectrum


def test_counts_and_fractions_with_tolerance():
    eig = jnp.array([-3.0, -1e-9, 0.0, 1e-12, 2e-6, 5.0])
    s = classify_spectrum(eig, tolerance=1e-6)
    assert (int(s.n_neg), int(s.n_null), int(s.n_pos)) == (1, 3, 2)
    assert float(s.min_ratio) == pytest.approx(2 / 6)
    assert float(s.index) == pytest.approx(1 / 6)
    assert float(s.null_fraction) == pytest.approx(3 / 6)
    assert float(s.nonnull_ratio) == pytest.approx(2 / 3)
    assert float(s.lambda_min) == -3.0 and float(s.lambda_max) == 5.0


def test_default_tolerance_scales_with_norm_and_size():
    eig = jnp.array([-2.0, 1e-15, 4.0])
    assert float(default_tolerance(eig)) == pytest.approx(3 * EPS64 * 4.0)
    s = classify_spectrum(eig)
    assert (int(s.n_neg), int(s.n_null), int(s.n_pos)) == (1, 1, 1)


def test_batched_classification_matches_single():
    rng = np.random.default_rng(0)
    eig = np.sort(rng.standard_normal((4, 10)), axis=1)
    batched = classify_spectrum(jnp.asarray(eig), tolerance=0.1)
    for i in range(4):
        single = classify_spectrum(jnp.asarray(eig[i]), tolerance=0.1)
        lam = eig[i]
        counts = (np.sum(lam > 0.1), np.sum(lam < -0.1), np.sum(np.abs(lam) <= 0.1))
        assert (int(single.n_pos), int(single.n_neg), int(single.n_null)) == counts
        for field in single._fields:  # fractions are means: batched, they may differ by an ulp
            np.testing.assert_allclose(getattr(batched, field)[i], getattr(single, field),
                                       rtol=4 * np.finfo(float).eps, atol=0, err_msg=field)
        np.testing.assert_allclose(single.min_ratio, counts[0] / 10, rtol=4 * np.finfo(float).eps)


def test_all_null_gives_nan_nonnull_ratio():
    s = classify_spectrum(jnp.zeros(4), tolerance=1e-3)
    assert int(s.n_null) == 4 and np.isnan(float(s.nonnull_ratio))


def test_exact_spectrum_of_quadratic_with_planted_eigenvalues():
    lam = np.array([-1.0, 0.0, 0.5, 2.0])
    q, _ = np.linalg.qr(np.random.default_rng(1).standard_normal((4, 4)))
    A = jnp.asarray(q @ np.diag(lam) @ q.T)
    eig, s = exact_spectrum(lambda p: 0.5 * p["w"] @ A @ p["w"], {"w": jnp.ones(4)})
    np.testing.assert_allclose(eig, lam, atol=1e-12)
    assert (int(s.n_neg), int(s.n_null), int(s.n_pos)) == (1, 1, 2)


def test_param_count_matches_problem():
    p = mlp_problem("sinc", widths=(16, 16))
    assert p.n_params == mlp_param_count(1, (16, 16), 1) == 321
    p = mlp_problem("digits", widths=(8,), n_points=100)
    assert p.n_params == mlp_param_count(64, (8,), 10)
    assert p.loss_name == "xent"


def test_nan_data_is_rejected():
    data = DATASETS["sinc"](n_points=8)
    bad = data._replace(y_train=np.where(np.arange(8)[:, None] == 3, np.nan, data.y_train))
    with pytest.raises(ValueError, match="y_train contains NaN"):
        check_dataset(bad)


def test_homework_targets():
    x = DATASETS["sinc"](n_points=101).x_train[:, 0]
    assert x[0] == pytest.approx(1e-4) and x[-1] == pytest.approx(1.0)
    y = DATASETS["sinc"](n_points=101).y_train[:, 0]
    np.testing.assert_allclose(y, np.sin(5 * np.pi * x) / (5 * np.pi * x), rtol=1e-9, atol=1e-15)
    s = DATASETS["sign"](n_points=101).y_train[:, 0]
    np.testing.assert_array_equal(s, np.sign(np.sin(5 * np.pi * x)))
