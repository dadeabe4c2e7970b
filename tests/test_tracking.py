"""Tests for crit.tracking: planted quadratics (stability thresholds, exact ends), a tiny network
against dense ``eigvalsh`` at every track (λ_max, λ_min, Adam's preconditioned sharpness, the SLQ
index), warm vs cold starts, and vmap over learning rates against a loop.

The tiny network's sweep is compiled once per configuration (module fixtures) to keep the file
within the suite's time budget."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit.hessian import dense_hessian
from crit.problems import mlp_problem
from crit.spectrum import classify_spectrum
from crit.lanczos import lanczos_tridiag, tridiag_eigh
from crit.tracking import (TrackingConfig, adam_preconditioner, extremal_track,
                           make_sweep, stability_threshold,
                           track_steps, track_sweep, tracking_optimizer)

@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """These tests check values, not speed: most XLA optimizations off halves compile time."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


# two phases of checks per run (crit.tracking.check_sizes): fewer loops to compile
SMALL_BASIS = dict(lanczos_steps=32, cold_lanczos_steps=32)
PLANTED = np.concatenate([[0.5], np.linspace(1.0, 3.0, 18), [4.0]])  # λ_min 0.5, λ_max 4


def planted_quadratic(eigenvalues, seed=0):
    """L(θ) = ½ θᵀAθ with A = Q diag(λ) Qᵀ, Q random orthogonal."""
    n = len(eigenvalues)
    q, _ = np.linalg.qr(np.random.default_rng(seed).standard_normal((n, n)))
    a = jnp.asarray((q * eigenvalues) @ q.T)
    return lambda theta: 0.5 * theta @ a @ theta


@pytest.mark.parametrize("optimizer", ["gd"])
def test_quadratic_stable_iff_below_threshold_and_ends_exact(optimizer):
    loss = planted_quadratic(PLANTED)
    config = TrackingConfig(optimizer=optimizer, num_steps=120, track_every=20, **SMALL_BASIS)
    edge = stability_threshold(optimizer, 1.0, config.momentum) / PLANTED.max()  # η at the edge
    lrs = jnp.asarray([0.95 * edge, 1.05 * edge])
    theta0 = jnp.asarray(np.random.default_rng(1).standard_normal((1, PLANTED.size)))
    out = jax.jit(lambda lr: track_sweep(loss, theta0, lr, jax.random.PRNGKey(0)[None],
                                         config))(lrs)
    stable, unstable = 0, 1
    assert int(out.diverged_step[stable, 0]) == -1
    assert float(out.final_loss[stable, 0]) < 1e-2 * float(out.loss[stable, 0, 0])
    assert int(out.diverged_step[unstable, 0]) > 0  # grew past 1e4 × L(θ₀)
    assert np.isnan(float(out.final_loss[unstable, 0]))
    # the Hessian is A everywhere: every track of the stable run finds the planted ends
    for name, planted in (("lambda_max", PLANTED.max()), ("lambda_min", PLANTED.min())):
        values = np.asarray(getattr(out, name)[stable, 0])
        np.testing.assert_allclose(values, planted, rtol=0, atol=1e-10, err_msg=name)
    assert np.asarray(out.converged_max[stable]).all()
    assert np.asarray(out.converged_min[stable]).all()
    # the unstable run is tracked until it diverges, then costs nothing
    first_bad = int(out.diverged_step[unstable, 0]) // config.track_every + 1
    hvps = np.asarray(out.hvps[unstable, 0])
    assert (hvps[first_bad:] == 0).all() and (hvps[:first_bad - 1] > 0).all()


def test_extremal_track_equals_one_plain_lanczos_run_of_its_length():
    """The phased run (state enlarged 16 -> 32 rows, checks on leading blocks, the last
    check's Ritz pairs returned) is the plain Lanczos run of the same number of steps."""
    planted = np.concatenate([[-1.0], np.linspace(0.0, 1.0, 58), [1.3]])
    q, _ = np.linalg.qr(np.random.default_rng(3).standard_normal((60, 60)))
    a = jnp.asarray((q * planted) @ q.T)
    matvec = lambda v: a @ v  # noqa: E731
    v0 = jnp.asarray(np.random.default_rng(4).standard_normal(60))
    track = jax.jit(lambda v: extremal_track(matvec, v, 32, 4, 1e-10))(v0)
    steps = int(track.hvps)
    assert 16 < steps <= 32  # went on past the first phase
    res = lanczos_tridiag(matvec, v0, steps)
    values, vectors = tridiag_eigh(res.alphas, res.betas, res.valid)
    np.testing.assert_allclose([track.lambda_max, track.lambda_min], [values[-1], values[0]],
                               rtol=1e-13)
    estimates = np.abs(float(res.betas[-1]) * np.asarray(vectors[-1]))
    np.testing.assert_allclose([track.residual_max, track.residual_min],
                               [estimates[-1], estimates[0]], rtol=1e-6, atol=1e-15)
    for y, s in ((track.vector_max, vectors[:, -1]), (track.vector_min, vectors[:, 0])):
        plain = res.basis.T @ s
        assert abs(float(jnp.dot(y, plain / jnp.linalg.norm(plain)))) == pytest.approx(1, abs=1e-12)
    assert bool(track.converged_max) and bool(track.converged_min)
    np.testing.assert_allclose([track.lambda_max, track.lambda_min], [1.3, -1.0], atol=1e-9)


def test_stability_thresholds():
    assert stability_threshold("gd", 0.1) == pytest.approx(20.0)
    assert stability_threshold("momentum", 0.1, momentum=0.9) == pytest.approx(38.0)
    assert stability_threshold("adam", 0.1, b1=0.9) == pytest.approx(380.0)
    with pytest.raises(ValueError, match="unknown optimizer"):
        stability_threshold("sgd", 0.1)


def test_adam_preconditioner_matches_hand_written_adam():
    config = TrackingConfig(optimizer="adam", b1=0.8, b2=0.95, eps=1e-3)
    opt = tracking_optimizer(config, 0.1)
    loss = planted_quadratic(PLANTED)
    theta = jnp.asarray(np.random.default_rng(2).standard_normal(PLANTED.size))
    state, v = opt.init(theta), jnp.zeros_like(theta)
    assert np.isnan(np.asarray(adam_preconditioner(state, 0.8, 0.95, 1e-3))).all()
    for t in range(1, 4):
        g = jax.grad(loss)(theta)
        v = 0.95 * v + 0.05 * g ** 2
        updates, state = opt.update(g, state, theta)
        theta = theta + updates
        expected = (1 - 0.8 ** t) * (jnp.sqrt(v / (1 - 0.95 ** t)) + 1e-3)
        np.testing.assert_allclose(adam_preconditioner(state, 0.8, 0.95, 1e-3), expected,
                                   rtol=1e-13)


# ------------------------------------------------------------------ a tiny network, dense checks

TINY = TrackingConfig(optimizer="gd", num_steps=40, track_every=10, slq_every=2,
                      slq_probes=6, slq_steps=24, slq_rel_tol=1e-6, keep_params=True,
                      **SMALL_BASIS)
LRS = (0.1, 0.19)  # 2/η = 20 and 10.5; λ_max starts near 10


@pytest.fixture(scope="module")
def tiny():
    problem = mlp_problem("sinc", widths=(6, 4), n_points=24)  # P = 45
    params0 = problem.init_fn(jax.random.PRNGKey(0))
    _, unravel = ravel_pytree(params0)
    loss = lambda t: problem.loss_fn(unravel(t))  # noqa: E731
    thetas = jnp.stack([ravel_pytree(problem.init_fn(jax.random.PRNGKey(i)))[0]
                        for i in range(2)])
    keys = jnp.stack([jax.random.PRNGKey(10 + i) for i in range(2)])
    return loss, thetas, keys


def sweep(tiny, config, lrs=LRS):
    loss, thetas, keys = tiny
    return jax.jit(lambda lr: track_sweep(loss, thetas, lr, keys, config))(jnp.asarray(lrs))


@pytest.fixture(scope="module")
def warm(tiny):
    return sweep(tiny, TINY)


def dense_eigenvalues(loss, theta, scale=None):
    """eigvalsh of the dense Hessian (of D H D with D = diag(scale) if given)."""
    h = np.asarray(jax.jit(dense_hessian, static_argnums=(0, 2))(loss, theta, None))
    if scale is not None:
        h = scale[:, None] * h * scale[None, :]
    return np.linalg.eigvalsh(h)


def test_tracked_ends_equal_dense_eigvalsh_at_every_track(tiny, warm):
    loss = tiny[0]
    assert warm.lambda_max.shape == (2, 2, len(track_steps(40, 10)))
    for i in range(2):
        for j in range(2):
            for k, theta in enumerate(warm.params[i, j]):
                lam = dense_eigenvalues(loss, theta)
                scale = np.abs(lam).max()
                assert abs(float(warm.lambda_max[i, j, k]) - lam[-1]) <= 1e-9 * scale
                assert abs(float(warm.lambda_min[i, j, k]) - lam[0]) <= 1e-9 * scale
                # an eigenvalue lies within the residual of each Ritz value
                assert abs(float(warm.lambda_max[i, j, k]) - lam[-1]) <= (
                    float(warm.residual_max[i, j, k]) + 1e-12 * scale)
                assert lam[0] < 0  # the tiny net's path does see negative curvature
    assert np.asarray(warm.converged_max).all() and np.asarray(warm.converged_min).all()
    # the loss series and the tracked losses agree
    np.testing.assert_allclose(warm.loss[..., ::10], warm.track_loss, rtol=1e-13)


def test_slq_index_interval_contains_dense_index(tiny, warm):
    loss = tiny[0]
    hit = 0
    for i in range(2):
        for j in range(2):
            for k, theta in enumerate(warm.params[i, j]):
                if k % TINY.slq_every:
                    assert np.isnan(float(warm.slq_index[i, j, k]))
                    continue
                lam = dense_eigenvalues(loss, theta)
                tol = float(warm.slq_tol[i, j, k])
                exact = float(classify_spectrum(jnp.asarray(lam), tol).index)
                lo, hi = float(warm.slq_index_lo[i, j, k]), float(warm.slq_index_hi[i, j, k])
                assert lo <= exact <= hi, (i, j, k, lo, exact, hi)
                assert lo <= float(warm.slq_index[i, j, k]) <= hi
                hit += 1
    assert hit == 2 * 2 * 3


def test_warm_start_changes_hvps_not_values(tiny, warm):
    cold = sweep(tiny, TINY._replace(warm_start=False, slq_every=0, keep_params=False))
    for name in ("lambda_max", "lambda_min", "loss", "grad_norm"):
        np.testing.assert_allclose(getattr(cold, name), getattr(warm, name), rtol=1e-9,
                                   atol=1e-10, err_msg=name)
    # the first track is cold in both; afterwards warm starts spend fewer HVPs
    np.testing.assert_array_equal(cold.hvps[..., 0], warm.hvps[..., 0])
    assert np.asarray(warm.hvps[..., 1:]).sum() < np.asarray(cold.hvps[..., 1:]).sum()


def test_vmap_over_learning_rates_equals_loop(tiny, warm):
    """make_sweep's loop (one compiled track_training per configuration) against the vmapped
    sweep: the same steps, checks and HVP counts; values to the last bits (bit for bit with
    most XLA optimizations off, as here)."""
    loss, thetas, keys = tiny
    with pytest.raises(ValueError, match="unknown sweep mode"):
        make_sweep(loss, TINY, "pmap")
    loop = make_sweep(loss, TINY, "loop")(thetas, LRS, keys)
    for name, vmapped in warm._asdict().items():
        looped = getattr(loop, name)
        assert np.shape(looped) == np.shape(vmapped), name
        if name in ("hvps", "precond_hvps", "converged_max", "converged_min", "diverged_step"):
            np.testing.assert_array_equal(looped, vmapped, err_msg=name)
        else:
            np.testing.assert_allclose(looped, vmapped, rtol=1e-12, atol=1e-14, err_msg=name)


def test_adam_preconditioned_sharpness_equals_dense():
    loss = planted_quadratic(PLANTED)
    config = TrackingConfig(optimizer="adam", num_steps=30, track_every=10, keep_params=True,
                            **SMALL_BASIS)
    theta0 = jnp.asarray(np.random.default_rng(1).standard_normal((1, PLANTED.size)))
    out = jax.jit(lambda lr: track_sweep(loss, theta0, lr, jax.random.PRNGKey(0)[None],
                                         config))(jnp.asarray([0.05]))
    assert np.isnan(float(out.precond_lambda_max[0, 0, 0]))  # undefined at step 0
    for k in range(1, out.params.shape[2]):
        d = 1.0 / np.sqrt(np.asarray(out.preconditioner[0, 0, k]))
        lam = dense_eigenvalues(loss, out.params[0, 0, k], d)
        assert abs(float(out.precond_lambda_max[0, 0, k]) - lam[-1]) <= 1e-9 * lam[-1]
    # the unpreconditioned ends are still those of A
    np.testing.assert_allclose(out.lambda_max[0, 0], PLANTED.max(), atol=1e-10, rtol=0)
    assert np.asarray(out.precond_converged[..., 1:]).all()
    assert (np.asarray(out.precond_hvps[..., 1:]) > 0).all()
