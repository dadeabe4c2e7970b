"""Tests for crit.landscape: exact identities on quadratics and small Flax MLPs."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit import landscape as ls


class MLP(nn.Module):
    widths: tuple = (10, 10, 1)

    @nn.compact
    def __call__(self, x):
        for i, w in enumerate(self.widths):
            x = nn.Dense(w)(x)
            if i < len(self.widths) - 1:
                x = jnp.tanh(x)
        return x


# Test data and parameters live in NumPy and library calls run under jit: on a shared CPU,
# hundreds of eager one-op compilations would dominate the test time.
MODEL = MLP()
X = np.linspace(1e-4, 1.0, 64)[:, None]
Y = np.sinc(5 * X)
tmap = jax.tree_util.tree_map


@functools.lru_cache(maxsize=None)
def init(seed):
    return tmap(np.asarray, _init(jax.random.PRNGKey(seed)))


@jax.jit
def _init(key):
    return tmap(lambda p: p.astype(jnp.float64), MODEL.init(key, X[:1]))


def mse(params):
    return jnp.mean((MODEL.apply(params, X) - Y) ** 2)


def flat(tree):
    return np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(tree)])


def np_direction(seed, like):
    rng = np.random.default_rng(seed)
    return tmap(lambda x: rng.normal(size=np.shape(x)), like)


def quadratic(params0, seed=0):
    """L(θ) = ½ (θ − c)ᵀ A (θ − c) over the flattened pytree; returns (loss, A)."""
    c = flat(params0)
    m = np.random.default_rng(seed).normal(size=(c.size, c.size))
    a = m @ m.T / c.size + np.eye(c.size)

    def loss(p):
        d = ravel_pytree(p)[0] - c
        return 0.5 * d @ a @ d

    return loss, a


def test_chunked_vmap_matches_vmap():
    xs = {"a": np.arange(11.0), "b": np.arange(22.0).reshape(11, 2)}
    fn = lambda t: {"s": t["a"] + jnp.sum(t["b"] ** 2), "v": t["b"] * t["a"]}
    run = jax.jit(ls.chunked_vmap, static_argnums=(0, 2))
    ref = jax.vmap(fn)(xs)
    for cs in (1, 4, 11, 50):
        out = run(fn, xs, cs)
        for k in ref:
            np.testing.assert_array_equal(out[k], ref[k])


def test_interpolate_endpoints_and_chunks():
    pa, pb = init(0), init(1)
    alphas = np.linspace(-1.0, 2.0, 13)
    alphas[4], alphas[8] = 0.0, 1.0
    run = jax.jit(ls.interpolate, static_argnums=(0, 4))
    full = run(mse, pa, pb, alphas, None)
    assert full.shape == (13,)
    ends = jax.jit(jax.vmap(mse))(tmap(lambda a, b: np.stack([a, b]), pa, pb))
    np.testing.assert_allclose(np.asarray(full)[[4, 8]], ends, rtol=1e-14)
    np.testing.assert_allclose(run(mse, pa, pb, alphas, 5), full, rtol=1e-13)


def test_interpolate_quadratic_is_parabola():
    pa = init(0)
    loss, _ = quadratic(pa)
    pb = tmap(lambda x: x + 0.3, init(2))
    alphas = np.linspace(-1.0, 2.0, 31)
    vals = np.asarray(jax.jit(ls.interpolate, static_argnums=(0, 4))(loss, pa, pb, alphas, 7))
    resid = vals - np.polyval(np.polyfit(alphas, vals, 2), alphas)
    assert np.max(np.abs(resid)) < 1e-12 * max(1.0, np.max(np.abs(vals)))


def test_interpolate_metrics_pytree():
    x_test = np.linspace(0.05, 0.95, 16)[:, None]
    y_test = np.sinc(5 * x_test)

    def metrics(p):
        pred_test = MODEL.apply(p, x_test)
        return {
            "train_loss": mse(p),
            "test_loss": jnp.mean((pred_test - y_test) ** 2),
            "sign_accuracy": jnp.mean(jnp.sign(pred_test) == jnp.sign(y_test)),
        }

    pa, pb = init(0), init(1)
    alphas = np.linspace(-1.0, 2.0, 6)
    out = jax.jit(lambda a, b: ls.interpolate_metrics(metrics, a, b, alphas, chunk_size=4))(pa, pb)
    assert set(out) == {"train_loss", "test_loss", "sign_accuracy"}
    assert all(v.shape == (6,) for v in out.values())
    # Reference: every metric at θ(α) = (1 − α)θ_a + αθ_b, the point built here in NumPy.
    one = jax.jit(metrics)
    for j, alpha in enumerate(alphas):
        ref = one(tmap(lambda a, b: (1 - alpha) * a + alpha * b, pa, pb))
        for key in out:
            np.testing.assert_allclose(out[key][j], ref[key], rtol=1e-12, err_msg=key)
    assert len(set(np.asarray(out["sign_accuracy"]).tolist())) > 1  # not a constant metric


def test_interpolate_under_vmap_over_pairs():
    stack = lambda ps: tmap(lambda *x: np.stack(x), *ps)
    seeds_a, seeds_b = (0, 1, 2), (3, 4, 5)
    pa, pb = stack([init(s) for s in seeds_a]), stack([init(s) for s in seeds_b])
    alphas = np.linspace(-0.5, 1.5, 7)
    batched = jax.jit(jax.vmap(lambda a, b: ls.interpolate(mse, a, b, alphas, chunk_size=3)))(pa, pb)
    one = jax.jit(lambda a, b: ls.interpolate(mse, a, b, alphas))
    loop = np.stack([one(init(a), init(b)) for a, b in zip(seeds_a, seeds_b)])
    np.testing.assert_allclose(batched, loop, rtol=1e-12)


def test_trajectory_projection():
    theta0 = {"w": np.zeros((2, 2)), "b": np.zeros(2)}
    theta_star = {"w": np.array([[2.0, 0.0], [0.0, 0.0]]), "b": np.zeros(2)}
    # θ_t = θ0 + t·(θ*−θ0) + sin(πt)·e_b0, i.e. x_t = 2t, y_t = |sin πt|
    ts = np.linspace(0.0, 1.0, 9)
    traj = {
        "w": ts[:, None, None] * theta_star["w"],
        "b": np.stack([np.sin(np.pi * ts), np.zeros_like(ts)], axis=1),
    }
    x, y = jax.jit(ls.trajectory_projection)(traj, theta0, theta_star)
    np.testing.assert_allclose(x, 2 * ts, atol=1e-14)
    np.testing.assert_allclose(y, np.abs(np.sin(np.pi * ts)), atol=1e-14)


def test_filter_normalize():
    rng = np.random.default_rng(0)
    params = {
        "params": {
            "Dense_0": {"kernel": rng.normal(size=(3, 5)), "bias": np.ones(5)},
            "Conv_0": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": np.ones(4)},
            "LayerNorm_0": {"scale": np.ones(5)},
        }
    }
    key = jax.random.PRNGKey(2)
    raw, d = jax.jit(lambda k, p: (ls.random_direction(k, p), ls.filter_normalized_direction(k, p)))(key, params)
    assert jax.tree_util.tree_structure(d) == jax.tree_util.tree_structure(params)
    p, q, r = params["params"], d["params"], raw["params"]
    filter_norm = lambda w: np.sqrt(np.sum(np.asarray(w) ** 2, axis=tuple(range(w.ndim - 1))))
    # dense: column j = weights into output unit j; conv: kernel[..., j]; rtol for the 1e-10 guard
    for name in ("Dense_0", "Conv_0"):
        np.testing.assert_allclose(filter_norm(q[name]["kernel"]), filter_norm(p[name]["kernel"]), rtol=1e-9)
        # each filter keeps the random direction's orientation
        cos = np.sum(np.reshape(r[name]["kernel"] * q[name]["kernel"], (-1, q[name]["kernel"].shape[-1])), 0)
        cos /= filter_norm(r[name]["kernel"]) * filter_norm(q[name]["kernel"])
        np.testing.assert_allclose(cos, 1.0, rtol=1e-12)
    for leaf in (q["Dense_0"]["bias"], q["Conv_0"]["bias"], q["LayerNorm_0"]["scale"]):
        np.testing.assert_array_equal(leaf, 0.0)


def shifted(theta, d1, d2, a, b):
    return tmap(lambda t, u, v: t + a * u + b * v, theta, d1, d2)


def test_surface_2d_chunks_match_loop():
    theta = init(0)
    d1 = ls.filter_normalize(np_direction(1, theta), theta)
    d2 = ls.filter_normalize(np_direction(2, theta), theta)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-1, 1, 4)
    at = jax.jit(lambda a, b: mse(shifted(theta, d1, d2, a, b)))
    loop = np.array([[at(a, b) for b in betas] for a in alphas])
    run = jax.jit(ls.surface_2d, static_argnums=(0, 6))
    for cs in (None, 3, 7):
        grid = run(mse, theta, d1, d2, alphas, betas, cs)
        assert grid.shape == (5, 4)
        np.testing.assert_allclose(grid, loop, rtol=1e-12)


def test_surface_2d_quadratic_closed_form():
    theta = init(0)
    loss, a = quadratic(theta)
    d1, d2 = np_direction(1, theta), np_direction(2, theta)
    u, v = flat(d1), flat(d2)
    alphas, betas = np.linspace(-1, 1, 7), np.linspace(-2, 2, 6)
    grid = jax.jit(ls.surface_2d, static_argnums=(0, 6))(loss, theta, d1, d2, alphas, betas, 8)
    aa, bb = np.meshgrid(alphas, betas, indexing="ij")
    exact = 0.5 * (aa**2 * (u @ a @ u) + 2 * aa * bb * (u @ a @ v) + bb**2 * (v @ a @ v))
    np.testing.assert_allclose(grid, exact, rtol=1e-12, atol=1e-12)


def test_project_onto_plane_non_orthogonal():
    theta = init(0)
    d1 = np_direction(1, theta)
    d2 = tmap(lambda x, y: 0.7 * x + y, d1, np_direction(2, theta))
    al, be = np.array([0.0, 0.5, -1.0, 2.0]), np.array([1.0, -0.3, 0.2, 0.0])
    traj = tmap(lambda *x: np.stack(x), *[shifted(theta, d1, d2, a, b) for a, b in zip(al, be)])
    alpha, beta = jax.jit(ls.project_onto_plane)(traj, theta, d1, d2)
    np.testing.assert_allclose(alpha, al, atol=1e-12)
    np.testing.assert_allclose(beta, be, atol=1e-12)


def test_trajectory_pca_straight_line():
    theta, v = init(0), np_direction(1, init(0))
    s = np.add.outer(np.array([0.0, 0.5, -2.0]), np.linspace(0.0, 1.0, 10))  # 3 runs on one line
    traj = tmap(lambda p, d: p + s.reshape(s.shape + (1,) * p.ndim) * d, theta, v)
    res = jax.jit(ls.trajectory_pca, static_argnums=(1, 2))(traj, 2, None)
    assert res.coords.shape == (3, 10, 2) and res.components.shape == (2, flat(v).size)
    np.testing.assert_allclose(res.explained_variance_ratio, [1.0, 0.0], atol=1e-12)
    np.testing.assert_allclose(res.coords[..., 1], 0.0, atol=1e-10)
    # first component is ±v/‖v‖ and coords are positions along it, up to that sign
    vnorm = np.linalg.norm(flat(v))
    np.testing.assert_allclose(np.abs(res.components[0] @ flat(v)), vnorm, rtol=1e-12)
    sign = np.sign(res.components[0] @ flat(v))
    np.testing.assert_allclose(res.coords[..., 0], sign * (s - s.mean()) * vnorm, atol=1e-10)


def test_trajectory_pca_leaf_filter_and_reconstruction():
    rng = np.random.default_rng(3)
    traj = tmap(lambda x: rng.normal(size=(2, 4) + x.shape), init(0))
    p0 = traj["params"]["Dense_0"]
    n0 = p0["kernel"][0, 0].size + p0["bias"][0, 0].size
    pca = jax.jit(ls.trajectory_pca, static_argnums=(1, 2))
    res = pca(traj, 7, "Dense_0")
    assert res.components.shape == (7, n0) and res.mean.shape == (n0,)
    snapshots = np.concatenate([p0["bias"].reshape(2, 4, -1), p0["kernel"].reshape(2, 4, -1)], -1)
    np.testing.assert_allclose(res.coords @ res.components + res.mean, snapshots, atol=1e-12)
    np.testing.assert_allclose(np.sum(res.explained_variance_ratio), 1.0, rtol=1e-12)
    by_fn = ls.trajectory_pca(traj, 2, leaf_filter=lambda path: path.endswith("Dense_0/kernel"))
    assert by_fn.components.shape == (2, p0["kernel"][0, 0].size)
    with pytest.raises(ValueError):
        ls.trajectory_pca(traj, 2, leaf_filter="Dense_9")


def test_sharpness_quadratic():
    lam = np.array([3.0, 1.0, -0.5, 2.0])
    loss = lambda p: 0.5 * jnp.sum(lam * p["w"] ** 2)
    params = {"w": np.zeros(4)}
    eps = 1e-2
    run = jax.jit(ls.epsilon_sharpness, static_argnums=(0, 4, 5), static_argnames=("constraint",))
    key = jax.random.PRNGKey(0)
    # ball of radius ε at θ = 0: ½ λ_max ε²; box: ½ Σ max(λ_i, 0) ε²
    ball = run(loss, params, key, eps, 8, 30, constraint="ball")
    # a search gives a lower bound: never above the true maximum (but for rounding), and close
    assert float(ball.increase) <= 0.5 * 3.0 * eps**2 * (1 + 1e-12)
    np.testing.assert_allclose(ball.increase, 0.5 * 3.0 * eps**2, rtol=1e-3)
    np.testing.assert_allclose(ball.relative, 100 * ball.increase, rtol=1e-12)
    box = run(loss, params, key, eps, 8, 30, constraint="box")
    assert float(box.increase) <= 0.5 * (3.0 + 1.0 + 2.0) * eps**2 * (1 + 1e-12)
    np.testing.assert_allclose(box.increase, 0.5 * (3.0 + 1.0 + 2.0) * eps**2, rtol=1e-3)
    # Keskar's scale |θ|+1: 1-D ½λ(θ−2)² + 1 at θ=2 has box half-width 3ε
    loss1 = lambda p: 0.5 * 4.0 * (p - 2.0) ** 2 + 1.0
    s1 = run(loss1, np.array(2.0), key, eps, 4, 20, constraint="box")
    np.testing.assert_allclose(s1.increase, 0.5 * 4.0 * (3 * eps) ** 2, rtol=1e-6)
    np.testing.assert_allclose(s1.relative, 100 * s1.increase / 2.0, rtol=1e-12)


def test_input_sensitivity_linear():
    rng = np.random.default_rng(0)
    w, x = rng.normal(size=(3, 4)), rng.normal(size=(10, 4))
    run = jax.jit(ls.input_sensitivity, static_argnums=(0, 3))
    # apply_fn takes a batch: each point arrives as a batch of one
    np.testing.assert_allclose(run(lambda p, xb: xb @ p.T, w, x, 3), np.linalg.norm(w),
                               rtol=1e-12)
    dense = nn.Dense(2)  # Flax kernel (d_in, d_out): y = xK, Jacobian Kᵀ
    p = {"params": {"kernel": rng.normal(size=(4, 2)), "bias": rng.normal(size=2)}}
    np.testing.assert_allclose(run(dense.apply, p, x, None), np.linalg.norm(p["params"]["kernel"]), rtol=1e-12)
