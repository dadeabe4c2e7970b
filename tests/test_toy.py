"""Tests for crit.toy and experiments/toy_saddle: the lecture's toy L = (1 − w1·w2)².

Autodiff (crit.hessian) is checked against the closed forms and finite differences; the
spectrum classification against the known saddle / valley structure; the app end to end.
"""

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

import crit  # noqa: F401  (float64)
from crit import toy
from crit.critical import newton_critical_point
from crit.hessian import dense_hessian, hvp
from crit.spectrum import classify_spectrum

REPO_ROOT = Path(__file__).resolve().parents[1]
ESCAPE = np.array([1.0, 1.0]) / np.sqrt(2.0)
VALLEY = [(1.0, 1.0), (2.0, 0.5), (0.5, 2.0), (-1.0, -1.0), (4.0, 0.25), (1.7, 1 / 1.7),
          (-3.0, -1 / 3)]

# One compiled function per quantity, vmapped over points: eager per-point calls would
# recompile on a shared CPU.
batched_hessian = jax.jit(jax.vmap(lambda w: dense_hessian(toy.toy_loss, w)))
batched_eigvalsh = jax.jit(jax.vmap(lambda w: jnp.linalg.eigvalsh(dense_hessian(toy.toy_loss, w))))
batched_loss = jax.jit(jax.vmap(toy.toy_loss))
classify = jax.jit(classify_spectrum)


def random_points(n, seed=0, scale=2.0):
    return np.random.default_rng(seed).uniform(-scale, scale, size=(n, 2))


# --- closed forms vs autodiff -----------------------------------------------------------------


def test_origin_hessian_and_escape_eigenpair():
    h = np.asarray(dense_hessian(toy.toy_loss, jnp.zeros(2)))
    np.testing.assert_allclose(h, [[0.0, -2.0], [-2.0, 0.0]], atol=1e-15)
    np.testing.assert_allclose(jax.grad(toy.toy_loss)(jnp.zeros(2)), [0.0, 0.0], atol=0)
    lam, vecs = np.linalg.eigh(h)
    np.testing.assert_allclose(lam, [-2.0, 2.0], atol=1e-14)
    u = vecs[:, 0] * np.sign(vecs[0, 0])
    np.testing.assert_allclose(u, ESCAPE, atol=1e-14)
    np.testing.assert_allclose(h @ u, -2.0 * u, atol=1e-14)
    np.testing.assert_allclose(toy.TOY_ESCAPE_DIRECTION, ESCAPE, atol=1e-16)


def test_dense_hessian_and_gradient_match_closed_forms():
    w = random_points(12)
    np.testing.assert_allclose(batched_hessian(w), jax.jit(jax.vmap(toy.toy_hessian))(w),
                               atol=1e-12)
    np.testing.assert_allclose(jax.jit(jax.vmap(jax.grad(toy.toy_loss)))(w),
                               jax.jit(jax.vmap(toy.toy_gradient))(w), atol=1e-12)


def test_dense_hessian_matches_central_differences_of_the_gradient():
    # ∇L is quadratic in each coordinate separately (∂L/∂w1 = −2 w2 (1 − w1·w2)), so central
    # differences along a coordinate are exact but for rounding, about ε·|∇L|/h = 1e-13 here.
    grad = jax.jit(jax.grad(toy.toy_loss))
    h = 1e-3
    for w in random_points(3, seed=1):
        fd = np.stack([(grad(w + h * e) - grad(w - h * e)) / (2 * h) for e in np.eye(2)], 1)
        hess = np.asarray(dense_hessian(toy.toy_loss, jnp.asarray(w)))
        np.testing.assert_allclose(hess, fd, rtol=0, atol=1e-11 * np.abs(hess).max())


def test_hvp_equals_hessian_times_vector():
    rng = np.random.default_rng(2)
    points, vectors = random_points(5, seed=2), rng.standard_normal((5, 2))
    hv = jax.jit(jax.vmap(lambda w, v: hvp(toy.toy_loss, w, v)))(points, vectors)
    np.testing.assert_allclose(hv, np.einsum("nij,nj->ni", batched_hessian(points), vectors),
                               atol=1e-12)


def test_valley_eigenvalues_are_zero_and_twice_the_squared_norm():
    w = np.array(VALLEY)
    lam = np.asarray(batched_eigvalsh(w))
    expected = np.asarray(jax.vmap(toy.toy_valley_eigenvalues)(w))
    scale = expected[:, 1:]
    np.testing.assert_allclose(lam / scale, expected / scale, atol=1e-13)
    np.testing.assert_allclose(expected[:, 1], 2 * (w[:, 0] ** 2 + w[:, 1] ** 2))
    np.testing.assert_allclose(batched_loss(w), 0.0, atol=1e-15)


def test_toy_saddles_of_dauphin():
    np.testing.assert_allclose(dense_hessian(toy.quadratic_saddle, jnp.array([0.7, -0.3])),
                               np.diag([10.0, -2.0]), atol=1e-14)
    np.testing.assert_allclose(dense_hessian(toy.monkey_saddle, jnp.zeros(2)), 0.0, atol=0)
    w = jnp.array([0.4, -0.3])
    lam = jnp.linalg.eigvalsh(dense_hessian(toy.monkey_saddle, w))
    np.testing.assert_allclose(lam, [-3.0, 3.0], atol=1e-14)  # ±6‖(x, y)‖ = ±6·0.5


# --- classification -----------------------------------------------------------------------------


def test_tolerance_separates_saddle_from_minimum_but_bare_count_does_not():
    lam = batched_eigvalsh(np.array([(0.0, 0.0), (1.0, 1.0), (2.0, 0.5)]))
    s = classify(lam)  # default τ = P·ε·max|λ| per point
    np.testing.assert_array_equal(s.n_neg, [1, 0, 0])
    np.testing.assert_array_equal(s.n_pos, [1, 1, 1])
    np.testing.assert_array_equal(s.n_null, [0, 1, 1])
    np.testing.assert_allclose(s.index, [0.5, 0.0, 0.0])
    np.testing.assert_allclose(s.nonnull_ratio, [0.5, 1.0, 1.0])
    # The "minimum ratio" under a bare λ > 0 count: 0.5 at the saddle and at both minima.
    np.testing.assert_allclose(np.mean(np.asarray(lam) > 0, axis=-1), [0.5, 0.5, 0.5])
    np.testing.assert_allclose(s.min_ratio, [0.5, 0.5, 0.5])


def test_bare_count_flips_with_rounding_of_the_null_eigenvalue():
    exact = np.asarray(toy.toy_valley_eigenvalues(np.array([1.0, 1.0])))  # {0, 4}
    np.testing.assert_array_equal(exact, [0.0, 4.0])
    lam = np.stack([exact + [null, 0.0] for null in (0.0, 1e-16, -1e-16)])
    s = classify(lam)
    np.testing.assert_array_equal(np.stack([s.n_pos, s.n_null, s.n_neg], 1), [[1, 1, 0]] * 3)
    np.testing.assert_allclose(np.mean(lam > 0, axis=1), [0.5, 1.0, 0.5])


# --- escape and gradient descent ----------------------------------------------------------------


def test_loss_decreases_along_the_escape_direction():
    t = np.linspace(0.0, np.sqrt(2.0), 50)
    loss = np.asarray(batched_loss(t[:, None] * ESCAPE))
    assert np.all(np.diff(loss) < 0)
    np.testing.assert_allclose(loss, toy.toy_escape_loss(t), atol=1e-15)
    # L(t·u) = L(0) + ½λt² + t⁴/4 with λ = −2: the quadratic model is exact up to t⁴/4.
    np.testing.assert_allclose(loss - (1.0 - t ** 2), t ** 4 / 4, atol=1e-15)
    # Along the other eigenvector (λ = +2) the loss does not go down.
    v = np.array([1.0, -1.0]) / np.sqrt(2.0)
    assert np.all(np.asarray(batched_loss(t[1:, None] * v)) > 1.0)


def test_gradient_descent_path_shapes_and_escape():
    w0 = jnp.array([0.01, 0.012])
    path, losses = toy.gradient_descent_path(toy.toy_loss, w0, 0.05, 200)
    assert path.shape == (201, 2) and losses.shape == (201,)
    np.testing.assert_array_equal(path[0], w0)
    np.testing.assert_allclose(losses, batched_loss(path), rtol=1e-9, atol=1e-20)
    assert abs(float(path[-1, 0] * path[-1, 1]) - 1.0) < 1e-10 and losses[-1] < 1e-20
    # One step by hand.
    np.testing.assert_allclose(path[1], w0 - 0.05 * toy.toy_gradient(w0), atol=1e-16)


def test_gradient_flow_conserves_the_balance():
    w0 = jnp.array([0.6, -0.2])
    lr, steps = 1e-3, 1500
    path, _ = toy.gradient_descent_path(toy.toy_loss, w0, lr, steps)
    path = np.asarray(path)
    balance = toy.toy_balance(path.T)  # NumPy in, NumPy out
    r = 1.0 - path[:, 0] * path[:, 1]
    # Each GD step multiplies w1² − w2² by exactly (1 − 4·lr²·r²) ...
    np.testing.assert_allclose(balance[1:], balance[:-1] * (1 - 4 * lr ** 2 * r[:-1] ** 2),
                               rtol=1e-12)
    # ... so the drift is O(lr²) per step: small for small lr although the path moves far.
    drift = abs(balance[-1] / balance[0] - 1)
    assert drift <= 4 * lr ** 2 * np.sum(r[:-1] ** 2) + 1e-12
    assert drift < 5e-3
    assert np.linalg.norm(path[-1] - path[0]) > 0.5


# --- Newton finds critical points of any index --------------------------------------------------


def test_newton_from_near_the_origin_lands_on_the_saddle():
    res = newton_critical_point(toy.toy_loss, jnp.array([0.1, -0.05]))
    assert float(res.grad_norm) <= 1e-10
    np.testing.assert_allclose(res.params, [0.0, 0.0], atol=1e-10)
    s = classify(batched_eigvalsh(res.params[None])[0])
    assert (int(s.n_neg), int(s.n_pos)) == (1, 1)


def test_newton_from_the_valley_side_lands_on_a_minimum():
    res = newton_critical_point(toy.toy_loss, jnp.array([1.2, 0.9]))
    w1, w2 = np.asarray(res.params)
    assert abs(w1 * w2 - 1.0) < 1e-8 and float(res.grad_norm) <= 1e-10
    s = classify(batched_eigvalsh(res.params[None])[0])
    assert (int(s.n_neg), int(s.n_pos), int(s.n_null)) == (0, 1, 1)


def test_newton_lands_on_the_quadratic_saddle():
    res = newton_critical_point(toy.quadratic_saddle, jnp.array([0.3, 0.2]))
    np.testing.assert_allclose(res.params, [0.0, 0.0], atol=1e-12)
    assert float(res.grad_norm) <= 1e-10


# --- the app (its tiny run, files and kill-and-rerun test are in test_landscape_apps.py) ----------


def run_app(*args, timeout=120):
    env = dict(os.environ, PYTHONPATH=str(REPO_ROOT) + os.pathsep + os.environ.get("PYTHONPATH",
                                                                                   ""))
    return subprocess.run([sys.executable, "-m", "experiments.toy_saddle", *args],
                          cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_app_rejects_bad_flags_before_writing(tmp_path):
    # One run (each costs a JAX import): validate() lists every bad flag, then exits non-zero.
    out = tmp_path / "toy"
    proc = run_app("--out_dir", str(out), "--steps=0", "--start=1,2,3", "--lr=-0.1",
                   "--grid_size=1", "--extent=nan")
    assert proc.returncode != 0
    for message in ("--steps=0: must be >= 1", "--start='1,2,3': expected exactly two numbers",
                    "--lr=-0.1: must be", "--grid_size=1: must be in", "--extent=nan: must be"):
        assert message in proc.stderr, message
    assert not out.exists() and not list(tmp_path.iterdir())
    assert "Hessian" not in proc.stdout  # nothing computed


def test_app_rejects_a_non_finite_start_and_an_out_dir_that_is_a_file(tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = run_app("--out_dir", str(target), "--start=nan,1")
    assert proc.returncode != 0
    for message in (f"--out_dir={target}: is a file",
                    "--start='nan,1': both numbers must be finite"):
        assert message in proc.stderr, message
    assert target.read_text() == "x" and [p.name for p in tmp_path.iterdir()] == ["a_file"]
