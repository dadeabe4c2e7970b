"""Models of the registry and bring-your-own modules: HVP == dense Hessian · v, the dense
Hessian == finite differences, P counts trainable parameters only, BatchNorm semantics, full-data
losses over uneven batches, module:factory."""

import math
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401
from crit.data import DATASETS, Dataset
from crit.hessian import dense_hessian, hvp
from crit.models import ModelError, get_model, model_names
from crit.models.resnet import resnet_param_count
from crit.problems import model_problem

KEY = jax.random.PRNGKey(0)


@pytest.fixture(scope="module", autouse=True)
def fast_compiles():
    """These checks are about derivatives, not speed: most XLA optimizations off cuts the
    compile time of the conv and attention models by about half."""
    before = jax.config.values["jax_disable_most_optimizations"]
    jax.config.update("jax_disable_most_optimizations", True)
    yield
    jax.config.update("jax_disable_most_optimizations", before)


def tiny(data, n=16):
    if data == "sequences":  # 8 sequences of length 6 with one channel, 10 classes
        rng = np.random.default_rng(0)
        x = rng.standard_normal((n, 6, 1))
        y = rng.integers(0, 10, n).astype(np.int32)
        return Dataset("sequences", x, y, x[:0], y[:0], "classification", 10)
    d = DATASETS[data](seed=0)
    return d._replace(x_train=d.x_train[:n], y_train=d.y_train[:n])


def transformer_param_count(d_in, dim, depth, heads, mlp, n_out, length):
    """Counted by hand from the architecture (Dense = kernel + bias)."""
    dense = lambda a, b: a * b + b  # noqa: E731
    block = (2 * dim                       # LayerNorm
             + 3 * (dim * dim + dim)       # query, key, value kernels (dim, heads, dim/heads)
             + dim * dim + dim             # output projection (heads, dim/heads, dim)
             + 2 * dim                     # LayerNorm
             + dense(dim, mlp) + dense(mlp, dim))
    return dense(d_in, dim) + length * dim + depth * block + 2 * dim + dense(dim, n_out)


CASES = {
    "mlp": dict(data="gaussian", hp=dict(widths=(4, 3), activation="tanh"),
                count=lambda d: 8 * 4 + 4 + 4 * 3 + 3 + 3 * 1 + 1),
    "cnn": dict(data="digits_images", hp=dict(channels=(2, 3), hidden=(6,), kernel=3,
                                              activation="tanh"),
                count=lambda d: (9 * 1 * 2 + 2) + (9 * 2 * 3 + 3) + (2 * 2 * 3 * 6 + 6) + (6 * 10 + 10)),
    "cnn1d": dict(model="cnn", data="mnist1d", hp=dict(channels=(2,), hidden=(), kernel=5,
                                                      activation="tanh"),
                  count=lambda d: (5 * 1 * 2 + 2) + (20 * 2 * 10 + 10)),
    "resnet": dict(data="digits_images", hp=dict(depth=8, width=2),
                   count=lambda d: resnet_param_count(8, 2, 1, 10)),
    "transformer": dict(data="digits_images", hp=dict(dim=8, depth=1, heads=2, mlp_dim=12,
                                                      patch=4),
                        count=lambda d: transformer_param_count(16, 8, 1, 2, 12, 10, 4)),
    "transformer_seq": dict(model="transformer", data="sequences",
                            hp=dict(dim=4, depth=1, heads=2, mlp_dim=6),
                            count=lambda d: transformer_param_count(1, 4, 1, 2, 6, 10, 6)),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    spec = CASES[request.param]
    problem = model_problem(spec.get("model", request.param), tiny(spec["data"], 6),
                            **spec["hp"])
    return request.param, spec, problem


def flat(problem, params):
    theta, unravel = ravel_pytree(params)
    return theta, unravel, lambda t: problem.loss_fn(unravel(t))


def test_registry_lists_every_model_and_refuses_unknown_names():
    assert model_names() == ["cnn", "mlp", "resnet", "transformer"]
    with pytest.raises(ModelError, match="known: cnn, mlp, resnet, transformer"):
        get_model("lenet", 10)
    with pytest.raises(ModelError, match="does not take \\['depht'\\]"):
        get_model("resnet", 10, depht=20)


def test_parameter_count_is_trainable_parameters_only(case):
    name, spec, problem = case
    params = problem.init_fn(KEY)
    assert set(params) == {"params"}
    assert problem.n_params == spec["count"](problem.dataset) == ravel_pytree(params)[0].size
    state = problem.init_state_fn(KEY)
    if name == "resnet":  # BatchNorm statistics exist and are not counted
        stats = sum(x.size for x in jax.tree.leaves(state))
        assert set(state) == {"batch_stats"} and stats == 2 * (2 + 2 * 2 + 3 * 4 + 3 * 8)  # stem, 3 stages
        assert problem.batchnorm == "eval"
    else:
        assert state == {} and problem.batchnorm == "none"


def test_hvp_equals_dense_hessian_times_v_and_hessian_matches_finite_differences(case):
    """crit's HVP (forward over reverse) against reverse over reverse; crit's dense Hessian
    times v against the HVP; Hessian columns against central differences of the gradient."""
    name, _, problem = case
    params = problem.init_fn(KEY)
    theta, unravel, f = flat(problem, params)
    v = jax.random.normal(jax.random.PRNGKey(1), theta.shape)
    hv = np.asarray(jax.jit(lambda t, u: ravel_pytree(
        hvp(problem.loss_fn, unravel(t), unravel(u)))[0])(theta, v))
    grad = jax.jit(jax.grad(f))
    reverse = np.asarray(jax.jit(jax.grad(lambda t: jnp.vdot(jax.grad(f)(t), v)))(theta))
    scale = np.abs(reverse).max()
    np.testing.assert_allclose(hv, reverse, rtol=1e-9, atol=1e-11 * scale)
    H = np.asarray(jax.jit(lambda p: dense_hessian(problem.loss_fn, p))(params))
    assert H.shape == (problem.n_params, problem.n_params)
    np.testing.assert_allclose(H @ np.asarray(v), hv, rtol=1e-9, atol=1e-10 * scale)
    h = 1e-5
    for j in np.random.default_rng(0).choice(theta.size, 3, replace=False):
        e = jnp.zeros_like(theta).at[j].set(h)
        column = (grad(theta + e) - grad(theta - e)) / (2 * h)
        np.testing.assert_allclose(column, H[:, j], atol=2e-6 * max(1.0, np.abs(H).max()))


def test_gradient_reaches_parameters_only(case):
    _, _, problem = case
    params = problem.init_fn(KEY)
    g = jax.grad(problem.loss_fn)(params, problem.init_state_fn(KEY))
    assert jax.tree.structure(g) == jax.tree.structure(params)


@pytest.mark.parametrize("name", ["mlp", "cnn", "resnet", "transformer"])
def test_uneven_data_batches_equal_one_batch(name):
    """loss, gradient, HVP (and, for the MLP, the dense Hessian) over batches of 4 + 4 + 2 rows
    equal one batch of 10 to ~1e-12 (exact n_b/N weights)."""
    spec = CASES[name]
    data = tiny(spec["data"], 10)
    one = model_problem(name, data, **spec["hp"])
    many = model_problem(name, data, eval_batch_size=4, **spec["hp"])
    params = one.init_fn(KEY)
    theta, unravel, f1 = flat(one, params)
    _, _, f7 = flat(many, params)
    np.testing.assert_allclose(f7(theta), f1(theta), rtol=1e-13)
    np.testing.assert_allclose(jax.grad(f7)(theta), jax.grad(f1)(theta), rtol=1e-11,
                               atol=1e-14)
    v = jax.random.normal(jax.random.PRNGKey(2), theta.shape)
    hv1 = jax.jvp(jax.grad(f1), (theta,), (v,))[1]
    hv7 = jax.jvp(jax.grad(f7), (theta,), (v,))[1]
    np.testing.assert_allclose(hv7, hv1, rtol=1e-10, atol=1e-12 * np.abs(hv1).max())
    if name == "mlp":
        np.testing.assert_allclose(dense_hessian(many.loss_fn, params),
                                   dense_hessian(one.loss_fn, params), rtol=1e-10,
                                   atol=1e-12)


def test_batchnorm_eval_mode_does_not_depend_on_the_evaluation_batch_size():
    data = tiny("digits_images", 8)
    hp = CASES["resnet"]["hp"]
    p0 = model_problem("resnet", data, **hp)
    params, state = p0.init_fn(KEY), p0.init_state_fn(KEY)
    # running statistics that are not the initial ones, as after training
    state = jax.tree.map(lambda s: s + 0.1 * jax.random.normal(KEY, s.shape) ** 2, state)
    values = []
    for b in (0, 3):
        p = model_problem("resnet", data, eval_batch_size=b, **hp)
        theta, unravel = ravel_pytree(params)
        f = lambda t: p.loss_fn(unravel(t), state)  # noqa: E731
        values.append((f(theta), jax.grad(f)(theta)))
    for v, g in values[1:]:
        np.testing.assert_allclose(v, values[0][0], rtol=1e-13)
        np.testing.assert_allclose(g, values[0][1], rtol=1e-10, atol=1e-13)


def test_batchnorm_batch_mode_depends_on_the_evaluation_batch_size_and_ignores_state():
    data = tiny("digits_images", 16)
    hp = CASES["resnet"]["hp"]
    full = model_problem("resnet", data, batchnorm="batch", **hp)
    halves = model_problem("resnet", data, batchnorm="batch", eval_batch_size=8, **hp)
    params, state = full.init_fn(KEY), full.init_state_fn(KEY)
    a, b = full.loss_fn(params), halves.loss_fn(params)
    assert abs(a - b) > 1e-6 * abs(a)   # batch statistics of 16 rows vs two groups of 8
    moved = jax.tree.map(lambda s: s + 3.0, state)
    assert full.loss_fn(params, moved) == full.loss_fn(params, state)  # running stats unused
    evalp = model_problem("resnet", data, **hp)
    assert evalp.loss_fn(params, moved) != evalp.loss_fn(params, state)


def test_training_moves_running_statistics_not_through_gradients():
    from crit.train import make_optimizer, train_model

    problem = model_problem("resnet", tiny("digits_images", 16), **CASES["resnet"]["hp"])
    params, state = problem.init_fn(KEY), problem.init_state_fn(KEY)
    new_params, new_state, log = jax.jit(lambda p, s: train_model(
        problem, make_optimizer("adam", 1e-2), p, s, KEY, 6, 3, batch_size=8))(params, state)
    moved = [float(jnp.abs(a - b).max()) for a, b in
             zip(jax.tree.leaves(new_state), jax.tree.leaves(state))]
    assert min(moved) > 0                         # every running statistic was updated
    assert set(new_params) == {"params"} and log.loss.shape == (3,)
    np.testing.assert_allclose(log.loss[-1], problem.loss_fn(new_params, new_state), rtol=1e-12)


def test_dropout_only_in_training():
    problem = model_problem("transformer", tiny("sequences", 4),
                            **dict(CASES["transformer_seq"]["hp"], dropout=0.5))
    params = problem.init_fn(KEY)
    assert problem.loss_fn(params) == problem.loss_fn(params)
    x, y = problem.dataset.x_train, problem.dataset.y_train
    a = problem.train_loss_fn(params, {}, x, y, jax.random.PRNGKey(1))[0]
    b = problem.train_loss_fn(params, {}, x, y, jax.random.PRNGKey(2))[0]
    assert a != b and a != problem.loss_fn(params)


def test_transformer_on_integer_tokens_infers_the_vocabulary():
    rng = np.random.default_rng(0)
    x = rng.integers(0, 7, size=(10, 5)).astype(np.int32)
    data = Dataset("tokens", x, (x.sum(1) % 2).astype(np.int32), x[:0], np.zeros(0, np.int32),
                   "classification", 2)
    problem = model_problem("transformer", data, dim=4, depth=1, heads=2, mlp_dim=4)
    params = problem.init_fn(KEY)
    assert params["params"]["Embed_0"]["embedding"].shape == (7, 4)
    assert np.isfinite(problem.loss_fn(params))


def test_a_forks_module_through_module_factory(tmp_path, monkeypatch):
    (tmp_path / "my_fork_model.py").write_text(textwrap.dedent('''
        import flax.linen as nn
        import jax.numpy as jnp

        class TwoLayer(nn.Module):
            n_outputs: int
            hidden: int = 3

            @nn.compact
            def __call__(self, x):
                x = x.reshape(x.shape[0], -1)
                h = jnp.tanh(nn.Dense(self.hidden, param_dtype=jnp.float64)(x))
                return nn.Dense(self.n_outputs, param_dtype=jnp.float64)(h)

        def make(n_outputs, hidden=5):
            return TwoLayer(n_outputs, hidden)
    '''))
    monkeypatch.syspath_prepend(str(tmp_path))
    problem = model_problem("my_fork_model:make", tiny("iris", 20), hidden=2)
    assert problem.n_params == 4 * 2 + 2 + 2 * 3 + 3
    klass = model_problem("my_fork_model:TwoLayer", tiny("iris", 20))
    assert klass.n_params == 4 * 3 + 3 + 3 * 3 + 3
    with pytest.raises(ModelError, match="no attribute 'nope'"):
        model_problem("my_fork_model:nope", tiny("iris", 20))
    with pytest.raises(ModelError, match="cannot import"):
        model_problem("no_such_module_anywhere:make", tiny("iris", 20))
    sys.modules.pop("my_fork_model", None)


def test_filter_normalization_for_every_kernel_layout():
    """Li et al.'s filters for conv HWIO, attention projections with head axes, embeddings and
    norm parameters: each filter of the direction gets its parameter filter's norm."""
    from crit.landscape import filter_normalize, random_direction

    conv = model_problem("cnn", tiny("digits_images", 4), **CASES["cnn"]["hp"])
    attn = model_problem("transformer", tiny("digits_images", 4), **CASES["transformer"]["hp"])
    rng = np.random.default_rng(0)
    x = rng.integers(0, 5, size=(4, 3)).astype(np.int32)
    tokens = model_problem("transformer", Dataset("t", x, np.array([0, 1, 0, 1], np.int32),
                                                  x[:0], np.zeros(0, np.int32),
                                                  "classification", 2),
                           dim=4, depth=1, heads=2, mlp_dim=4)
    bn = model_problem("resnet", tiny("digits_images", 4), **CASES["resnet"]["hp"])
    for problem, checks in (
            (conv, {("Conv_0", "kernel"): (0, 1, 2)}),
            (attn, {("_EncoderBlock_0", "MultiHeadDotProductAttention_0", "query", "kernel"): (0,),
                    ("_EncoderBlock_0", "MultiHeadDotProductAttention_0", "out", "kernel"): (0, 1),
                    ("Dense_0", "kernel"): (0,)}),
            (tokens, {("Embed_0", "embedding"): (0,)}),
            (bn, {("Conv_0", "kernel"): (0, 1, 2)})):
        params = problem.init_fn(KEY)
        d = filter_normalize(random_direction(jax.random.PRNGKey(3), params), params)
        flat_d = {tuple(str(getattr(k, "key", k)) for k in path): v
                  for path, v in jax.tree_util.tree_leaves_with_path(d["params"])}
        flat_p = {tuple(str(getattr(k, "key", k)) for k in path): v
                  for path, v in jax.tree_util.tree_leaves_with_path(params["params"])}
        for name, axes in checks.items():
            np.testing.assert_allclose(np.sqrt((flat_d[name] ** 2).sum(axis=axes)),
                                       np.sqrt((flat_p[name] ** 2).sum(axis=axes)), rtol=1e-8,
                                       err_msg=str(name))
        for name, value in flat_d.items():
            if name[-1] in ("bias", "scale") or value.ndim <= 1:
                assert not np.any(value), name  # biases (attention's are 2-D), norm scales


@pytest.mark.parametrize("shape,kernel,strides,padding", [
    ((2, 7, 6, 3), (3, 3), (1, 1), "SAME"),
    ((2, 8, 8, 4), (3, 3), (2, 2), "SAME"),
    ((2, 8, 7, 3), (5, 5), (1, 1), "VALID"),
    ((2, 9, 9, 2), (1, 1), (2, 2), "SAME"),
    ((2, 6, 5, 2), (2, 3), (1, 2), ((1, 0), (2, 1))),
    ((3, 11, 4), (5,), (1,), "SAME"),
])
def test_shifted_conv_equals_xla_convolution_and_its_gradient(shape, kernel, strides, padding):
    from jax import lax

    from crit.models.conv import shifted_conv
    x = jax.random.normal(jax.random.PRNGKey(0), shape, jnp.float64)
    w = jax.random.normal(jax.random.PRNGKey(1), (*kernel, shape[-1], 5), jnp.float64)
    nd = len(shape)
    dn = lax.ConvDimensionNumbers((0, nd - 1, *range(1, nd - 1)),
                                  (nd - 1, nd - 2, *range(nd - 2)), (0, nd - 1, *range(1, nd - 1)))

    def loss(conv, x, w):
        return jnp.sum(jnp.tanh(conv(x, w, strides, padding, dimension_numbers=dn)) ** 2)

    ref = lax.conv_general_dilated(x, w, strides, padding, dimension_numbers=dn)
    got = shifted_conv(x, w, strides, padding, dimension_numbers=dn)
    assert got.shape == ref.shape
    np.testing.assert_allclose(got, ref, rtol=0, atol=1e-13 * float(jnp.max(jnp.abs(ref))))
    g_ref = jax.grad(lambda *a: loss(lax.conv_general_dilated, *a), argnums=(0, 1))(x, w)
    g_got = jax.grad(lambda *a: loss(shifted_conv, *a), argnums=(0, 1))(x, w)
    for a, b in zip(g_got, g_ref):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12)
    # dilated kernels are not a plain shift-and-multiply: handed to XLA unchanged
    dil = shifted_conv(x, w, strides, "VALID" if len(kernel) else padding,
                       rhs_dilation=(2,) * len(kernel), dimension_numbers=dn)
    np.testing.assert_array_equal(dil, lax.conv_general_dilated(
        x, w, strides, "VALID", rhs_dilation=(2,) * len(kernel), dimension_numbers=dn))


@pytest.mark.parametrize("name", ["cnn", "resnet"])
def test_conv_implementations_give_the_same_model(name):
    data, hp = tiny(CASES[name]["data"], 6), CASES[name]["hp"]
    losses = {}
    for impl in ("xla", "shifted"):  # the default "auto" picks one of them from the shapes
        problem = model_problem(name, data, **hp, conv=impl)
        params = problem.init_fn(jax.random.PRNGKey(0))
        losses[impl] = (problem.n_params, float(problem.loss_fn(params)),
                        ravel_pytree(jax.grad(problem.loss_fn)(params))[0])
    assert losses["xla"][0] == losses["shifted"][0]
    assert abs(losses["shifted"][1] - losses["xla"][1]) <= 1e-13 * abs(losses["xla"][1])
    np.testing.assert_allclose(losses["shifted"][2], losses["xla"][2], rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="conv must be one of"):
        model_problem(name, data, **hp, conv="fft")


def test_auto_conv_picks_shifted_products_for_large_float64_inputs_on_cpu():
    from crit.models.conv import AUTO_MIN_ELEMENTS, auto_conv
    w = jnp.ones((3, 3, 4, 4), jnp.float64)
    dn = ("NHWC", "HWIO", "NHWC")

    def primitives(n, dtype):
        x = jnp.ones((n, 8, 8, 4), dtype)
        jaxpr = jax.make_jaxpr(lambda a, b: auto_conv(a, b, (1, 1), "SAME",
                                                      dimension_numbers=dn))(x, w.astype(dtype))
        return {e.primitive.name for e in jaxpr.eqns}

    big = -(-AUTO_MIN_ELEMENTS // 256)
    assert "conv_general_dilated" not in primitives(big, jnp.float64)
    assert "dot_general" in primitives(big, jnp.float64)
    assert "conv_general_dilated" in primitives(big - 1, jnp.float64)
    assert "conv_general_dilated" in primitives(big, jnp.float32)
