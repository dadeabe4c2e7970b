"""crit.curvature: every operator against a dense matrix built independently (jax.jacobian of
the network, jax.hessian of the loss in output space and of the network), closed forms of
linear models, batching, blocks and the refusals."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit import curvature as C
from crit.problems import mse, softmax_xent
from crit.trained import from_function, from_linen, from_nnx
from tests.fork_models import LinenMLP, NNXBatchNormNet

N, K, BATCH, L2 = 7, 3, 3, 0.05   # 7 rows in batches of 3: two full batches and one row
LOSS_FNS = {"mse": mse, "xent": softmax_xent}
OPERATORS = ("ggn", "residual", "fisher", "empirical_fisher")


class TinyCNN(nn.Module):
    n_outputs: int = K

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Conv(3, (3, 3), padding="VALID", name="Conv_0")(x))
        return nn.Dense(self.n_outputs, name="Dense_0")(h.reshape(h.shape[0], -1))


def rel_err(a, b):
    a, b = np.asarray(a), np.asarray(b)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def targets(loss, key):
    if loss == "xent":
        return jax.random.randint(key, (N,), 0, K)
    return jax.random.normal(key, (N, K))


@functools.cache
def trained(name):
    kx, kp = jax.random.split(jax.random.key({"mlp": 0, "cnn": 1, "bn": 2}[name]))
    if name == "mlp":
        x = jax.random.normal(kx, (N, 4))
        module = LinenMLP(hidden=6, n_outputs=K)
        return from_linen(module, module.init(kp, x), x[:2]), x
    if name == "cnn":
        x = jax.random.normal(kx, (N, 5, 5, 1))
        module = TinyCNN()
        return from_linen(module, module.init(kp, x), x[:2]), x
    x = jax.random.normal(kx, (N, 2))
    net = NNXBatchNormNet(din=2, hidden=5, dout=K, rngs=nnx.Rngs(1))
    net.train()
    net((3.0 * x + 1.0).astype(jnp.float32))  # running statistics away from (0, 1)
    return from_nnx(net), x


def dense_references(model, loss_fn, x, y, l2):
    """G, R, H and F_emp from jax.jacobian / jax.hessian alone (no crit.curvature code)."""
    theta, unravel = ravel_pytree(model.params)

    @jax.jit
    def build(theta):
        def net(t):
            return model.apply_fn(unravel(t), x, model.state)

        f = net(theta)
        m = f.size
        jac = jax.jacobian(net)(theta).reshape(m, -1)
        out_hess = jax.hessian(lambda g: loss_fn(g, y))(f).reshape(m, m)
        out_grad = jax.grad(lambda g: loss_fn(g, y))(f).reshape(m)
        net_hess = jax.hessian(net)(theta).reshape(m, theta.size, theta.size)
        eye = jnp.eye(theta.size)
        ggn = jac.T @ out_hess @ jac + l2 * eye
        residual = jnp.einsum("m,mpq->pq", out_grad, net_hess)
        hess = jax.hessian(lambda t: loss_fn(net(t), y) + 0.5 * l2 * jnp.sum(t ** 2))(theta)

        def per_example(t):
            return jax.vmap(lambda fi, yi: loss_fn(fi[None], yi[None]))(net(t), y)
        jac_e = jax.jacobian(per_example)(theta)
        emp = jac_e.T @ jac_e / x.shape[0] + l2 * eye
        return {"ggn": ggn, "residual": residual, "hessian": hess, "empirical_fisher": emp}

    return build(theta)


def operator_matrix(kind, model, loss, data, batch_size, l2=L2):
    mv = C.curvature_matvec(kind, model, loss, batch_size, l2)
    theta = ravel_pytree(model.params)[0]
    columns = jax.jit(jax.vmap(mv, in_axes=(None, None, 0)))(model.params, data,
                                                             jnp.eye(theta.size))
    return np.asarray(columns).T


#: The products checked on every case; the MLP on xent adds the rest (compiling is the cost).
PRODUCTS = (("ggn", BATCH), ("residual", 0), ("fisher", 0), ("empirical_fisher", BATCH))
MLP_PRODUCTS = (("ggn", 0), ("residual", BATCH), ("fisher", BATCH), ("empirical_fisher", 0))


@functools.cache
def case(name, loss):
    model, x = trained(name)
    y = targets(loss, jax.random.key(7))
    refs = dense_references(model, LOSS_FNS[loss], x, y, L2)
    products = PRODUCTS + (MLP_PRODUCTS if (name, loss) == ("mlp", "xent") else ())
    ops = {(kind, b): operator_matrix(kind, model, loss, (x, y), b) for kind, b in products}
    return model, (x, y), refs, ops


CASES = [(name, loss) for name in ("mlp", "cnn", "bn") for loss in ("mse", "xent")]


@pytest.mark.parametrize("name,loss", CASES)
def test_operators_equal_their_dense_counterparts(name, loss):
    model, _, refs, ops = case(name, loss)
    assert model.n_params <= 150
    if name == "bn":
        assert model.batchnorm == "eval" and model.has_state
    reference = {"ggn": refs["ggn"], "fisher": refs["ggn"], "residual": refs["residual"],
                 "empirical_fisher": refs["empirical_fisher"]}
    for (kind, b), matrix in ops.items():
        assert rel_err(matrix, reference[kind]) < 1e-12, (kind, b)
        if b and (kind, 0) in ops:  # uneven batches (3 + 3 + 1): summation order only
            assert rel_err(matrix, ops[kind, 0]) < 1e-12, kind


@pytest.mark.parametrize("name,loss", CASES)
def test_gauss_newton_decomposition_and_psd(name, loss):
    _, _, refs, ops = case(name, loss)
    h, g, r = (np.asarray(refs[k]) for k in ("hessian", "ggn", "residual"))
    assert rel_err(g + r, h) < 1e-12          # H = G + R, all three built independently
    assert rel_err(ops["ggn", BATCH] + ops["residual", 0], h) < 1e-12
    for kind, b in (("ggn", BATCH), ("fisher", 0), ("empirical_fisher", BATCH)):
        assert C.is_psd(kind, loss)
        values = np.linalg.eigvalsh(0.5 * (ops[kind, b] + ops[kind, b].T))
        assert values[0] >= -1e-12 * values[-1], kind
    assert rel_err(ops["fisher", 0], ops["ggn", BATCH]) < 1e-12


def test_hessian_operator_agrees_with_crit_hessian_and_jax():
    model, data, refs, _ = case("mlp", "xent")
    h = operator_matrix("hessian", model, "xent", data, BATCH)
    assert rel_err(h, refs["hessian"]) < 1e-12
    from crit.hessian import hvp
    from crit.trained import data_objective

    objective = data_objective(model, "xent", 0, L2)
    v = jax.random.normal(jax.random.key(4), (model.n_params,))
    unravel = ravel_pytree(model.params)[1]
    hv = jax.jit(lambda p, v: hvp(lambda q: objective(q, data), p, unravel(v)))(model.params, v)
    assert rel_err(h @ v, ravel_pytree(hv)[0]) < 1e-12


def test_curvature_operator_linearized_once_matches_the_dense_matrices():
    model, data, refs, _ = case("mlp", "mse")
    v = jax.random.normal(jax.random.key(3), (model.n_params,))
    dense = dict(refs, fisher=refs["ggn"])
    for kind in C.CURVATURES:
        got = C.curvature_operator(kind, model, "mse", data, 0, L2)(v)
        assert rel_err(got, dense[kind] @ v) < 1e-12, kind


def test_linear_least_squares_closed_form():
    kx, kw, ky = jax.random.split(jax.random.key(11), 3)
    x, y, k = jax.random.normal(kx, (N, 3)), jax.random.normal(ky, (N, 2)), 2
    model = from_function(lambda p, x: x @ p["w"], {"w": jax.random.normal(kw, (3, k))})
    exact = 2.0 / (N * k) * np.kron(np.asarray(x.T @ x), np.eye(k))  # w raveled row-major
    g = operator_matrix("ggn", model, "mse", (x, y), BATCH, l2=0.0)
    h = operator_matrix("hessian", model, "mse", (x, y), 0, l2=0.0)
    r = operator_matrix("residual", model, "mse", (x, y), BATCH, l2=0.0)
    f = operator_matrix("fisher", model, "mse", (x, y), 0, l2=0.0)
    assert rel_err(g, exact) < 1e-12 and rel_err(h, exact) < 1e-12
    assert rel_err(f, g) < 1e-12
    assert np.max(np.abs(r)) < 1e-12 * np.max(np.abs(exact))
    # the penalty's curvature is counted in G, never in R
    g2 = operator_matrix("ggn", model, "mse", (x, y), 0, l2=0.5)
    r2 = operator_matrix("residual", model, "mse", (x, y), 0, l2=0.5)
    assert rel_err(g2, exact + 0.5 * np.eye(exact.shape[0])) < 1e-12
    assert np.max(np.abs(r2)) < 1e-12 * np.max(np.abs(exact))


def test_softmax_regression_gauss_newton_is_the_hessian():
    kx, kw, ky = jax.random.split(jax.random.key(12), 3)
    x, y = jax.random.normal(kx, (N, 3)), jax.random.randint(ky, (N,), 0, K)
    params = {"w": jax.random.normal(kw, (3, K)), "b": jnp.arange(K, dtype=float) / 10}
    model = from_function(lambda p, x: x @ p["w"] + p["b"], params)
    h = operator_matrix("hessian", model, "xent", (x, y), 0)
    g = operator_matrix("ggn", model, "xent", (x, y), 0)
    r = operator_matrix("residual", model, "xent", (x, y), 0)
    f = operator_matrix("fisher", model, "xent", (x, y), 0)
    assert rel_err(g, h) < 1e-12 and rel_err(f, g) < 1e-12
    assert np.max(np.abs(r)) < 1e-12 * np.max(np.abs(h))
    # the empirical Fisher is not the Fisher (Kunstner et al. 2019)
    e = operator_matrix("empirical_fisher", model, "xent", (x, y), 0)
    assert rel_err(e, f) > 1e-2


def cauchy_loss(outputs, targets):
    """log(1 + r²): not convex in the outputs (curvature < 0 where |r| > 1)."""
    return jnp.mean(jnp.log1p((outputs - targets) ** 2))


def test_custom_loss_gauss_newton_and_refused_fisher():
    model, x = trained("mlp")
    y = 5.0 * targets("mse", jax.random.key(8))  # residuals beyond 1: Λ has negative entries
    refs = dense_references(model, cauchy_loss, x, y, 0.0)
    g = operator_matrix("ggn", model, cauchy_loss, (x, y), BATCH, l2=0.0)
    assert rel_err(g, refs["ggn"]) < 1e-12
    r = operator_matrix("residual", model, cauchy_loss, (x, y), 0, l2=0.0)
    assert rel_err(r, refs["residual"]) < 1e-12
    assert not C.is_psd("ggn", cauchy_loss) and C.is_psd("ggn", "xent")
    values = np.linalg.eigvalsh(0.5 * (g + g.T))
    assert values[0] < -1e-3 * values[-1]  # a non-convex loss makes the GGN indefinite
    with pytest.raises(C.CurvatureError, match=r"allowed losses: \['mse', 'xent'\]"):
        C.curvature_matvec("fisher", model, cauchy_loss)
    with pytest.raises(C.CurvatureError, match="unknown curvature 'gn'"):
        C.curvature_matvec("gn", model, "mse")


def test_empirical_fisher_refused_with_batch_statistics():
    net = NNXBatchNormNet(din=2, hidden=5, dout=K, rngs=nnx.Rngs(1))
    model = from_nnx(net, batchnorm="batch")
    assert model.batchnorm == "batch"
    with pytest.raises(C.CurvatureError, match="per-example losses"):
        C.curvature_matvec("empirical_fisher", model, "mse")
    C.curvature_matvec("ggn", model, "mse")  # the GGN is defined on batch statistics


def leaf_indices(params, chosen):
    """Coordinates of the chosen leaves, by raveling a tree that marks them."""
    marks = jax.tree_util.tree_map_with_path(
        lambda path, leaf: jnp.full(leaf.shape, any(
            "/".join(str(k.key) for k in path) == c for c in chosen), float), params)
    return np.flatnonzero(np.asarray(ravel_pytree(marks)[0]))


def test_block_matvec_is_the_dense_diagonal_block():
    model, _, refs, _ = case("mlp", "xent")
    h = np.asarray(refs["hessian"])
    op = functools.partial(jnp.dot, jnp.asarray(h))  # blocks of any operator: here H itself
    for pattern, chosen in ((r"Dense_0/", ["params/Dense_0/kernel", "params/Dense_0/bias"]),
                            (["params/Dense_1/kernel", "params/Dense_1/bias"],
                             ["params/Dense_1/kernel", "params/Dense_1/bias"]),
                            (r"kernel$", ["params/Dense_0/kernel", "params/Dense_1/kernel"])):
        idx = leaf_indices(model.params, chosen)
        block = C.select_block(model.params, pattern)
        assert np.array_equal(block.indices, idx) and set(block.paths) == set(chosen)
        bmv = jax.vmap(C.block_matvec(op, model.params, pattern))
        assert rel_err(np.asarray(bmv(jnp.eye(idx.size))).T, h[np.ix_(idx, idx)]) < 1e-12
    with pytest.raises(C.CurvatureError, match="available paths: params/Dense_0/bias"):
        C.select_block(model.params, "Conv")
    with pytest.raises(C.CurvatureError, match="available paths"):
        C.select_block(model.params, ["params/Dense_0/w"])


def test_layer_table_dense_and_lanczos():
    model, data, refs, _ = case("mlp", "xent")
    h = np.asarray(refs["hessian"])
    blocks = C.layer_blocks(model.params)
    assert list(blocks) == ["params/Dense_0", "params/Dense_1"]
    dense = C.layer_table(C.curvature_operator("hessian", model, "xent", data, 0, L2),
                          model.params)
    lanczos = C.layer_table(functools.partial(jnp.dot, jnp.asarray(h)), model.params,
                            dense_max=25, num_steps=30, trace_method="exact")
    assert [r["method"] for r in dense] == ["dense", "dense"]
    assert [r["method"] for r in lanczos] == ["lanczos+exact-trace", "dense"]
    for row, row_l in zip(dense, lanczos):
        idx = blocks[row["layer"]].indices
        values = np.linalg.eigvalsh(h[np.ix_(idx, idx)])
        assert row["n_params"] == idx.size
        assert abs(row["lambda_max"] - values[-1]) < 1e-12 * abs(values).max()
        assert abs(row["lambda_min"] - values[0]) < 1e-12 * abs(values).max()
        assert abs(row["trace"] - np.trace(h[np.ix_(idx, idx)])) < 1e-12 * abs(values).max()
        for key in ("lambda_max", "lambda_min", "trace"):  # a full Krylov space is exact
            assert abs(row_l[key] - row[key]) < 1e-9 * abs(values).max(), key
    # the layers partition the parameters: their traces add up to the full trace
    assert abs(sum(r["trace"] for r in dense) - np.trace(h)) < 1e-12 * np.abs(h).max()
