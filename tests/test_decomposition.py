"""H = G + R side by side, per-layer tables and block analyses through crit.analysis.analyze_model
(issue 25, points 2 and 4)."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401
from crit.analysis import AnalysisError, analyze_model
from crit.hessian import dense_hessian


class Net(nn.Module):
    @nn.compact
    def __call__(self, x):
        return nn.Dense(3)(jnp.tanh(nn.Dense(5)(x)))


@pytest.fixture(scope="module")
def problem():
    x = jax.random.normal(jax.random.key(1), (20, 2))
    y = jax.random.randint(jax.random.key(2), (20,), 0, 3)
    model = Net()
    variables = jax.tree.map(lambda a: a.astype(jnp.float64), model.init(jax.random.key(0), x))
    return model, variables, x, y


def _hessian(model, variables, x, y):
    import optax

    def loss(v):
        return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(model.apply(v, x), y))
    return np.asarray(dense_hessian(loss, variables, block_size=None))


def test_dense_decomposition_adds_up_and_matches_the_dense_hessian(problem):
    model, variables, x, y = problem
    r = analyze_model(model, (x, y), "xent", variables=variables, method="dense",
                      curvatures=("ggn", "residual"), per_layer=True)
    c = r.curvature["given"]
    h, g, res = (c["summaries"][k] for k in ("hessian", "ggn", "residual"))
    hess = _hessian(model, variables, x, y)
    lam = np.linalg.eigvalsh(hess)
    assert h.lambda_min == pytest.approx(lam[0], abs=1e-12)
    assert h.lambda_max == pytest.approx(lam[-1], abs=1e-12)
    assert h.trace == pytest.approx(np.trace(hess), abs=1e-12)
    assert r.points[0].trace == pytest.approx(np.trace(hess), abs=1e-12)
    assert h.trace == pytest.approx(g.trace + res.trace, abs=1e-12)           # tr H = tr G + tr R
    share = c["escape_share"]
    assert share["ggn"] + share["residual"] == pytest.approx(1.0, abs=1e-10)  # y'Hy = y'Gy + y'Ry
    assert g.psd_expected and not g.negative_proven and g.lambda_min > -g.allowance
    assert h.negative_proven and res.lambda_min < h.lambda_min < 0            # R carries it
    # per-layer: every layer's Hessian block is the dense block; traces sum to the total
    rows = [row for row in r.layers["given"] if row["curvature"] == "hessian"]
    assert sum(row["trace"] for row in rows) == pytest.approx(np.trace(hess), abs=1e-12)
    assert sum(row["n_params"] for row in rows) == hess.shape[0]
    assert {row["curvature"] for row in r.layers["given"]} == {"hessian", "ggn", "residual"}
    text = r.summary()
    assert "ggn" in text and "share of the escape curvature" in text
    d = r.to_dict()
    assert d["curvature"]["given"]["summaries"]["ggn"]["trace"] == pytest.approx(g.trace)


def test_krylov_decomposition_agrees_with_dense_within_residuals(problem):
    model, variables, x, y = problem
    r = analyze_model(model, (x, y), "xent", variables=variables, method="krylov",
                      curvatures=("ggn",), lanczos_steps=33, slq_probes=4, trace_matvecs=30)
    dense = analyze_model(model, (x, y), "xent", variables=variables, method="dense",
                          curvatures=("ggn",))
    for kind in ("hessian", "ggn"):
        k = r.curvature["given"]["summaries"][kind]
        ref = dense.curvature["given"]["summaries"][kind]
        assert k.method == "krylov" and k.trace_method == "hutch++" and k.trace_matvecs == 30
        assert abs(k.lambda_max - ref.lambda_max) <= k.lambda_max_residual + 1e-9
        assert abs(k.lambda_min - ref.lambda_min) <= k.lambda_min_residual + 1e-9
        assert k.trace_lo <= ref.trace <= k.trace_hi


def test_block_analysis_is_the_diagonal_block(problem):
    model, variables, x, y = problem
    r = analyze_model(model, (x, y), "xent", variables=variables, blocks=r"Dense_1/",
                      method="dense")
    hess = _hessian(model, variables, x, y)
    # ravel_pytree order: Dense_0/{bias, kernel}, Dense_1/{bias, kernel}: Dense_1 is the last 15
    block = hess[-15:, -15:]
    assert r.model["block"]["n_params"] == 15
    assert r.points[0].n_params == 15
    assert r.points[0].lambda_min == pytest.approx(np.linalg.eigvalsh(block)[0], abs=1e-12)
    assert r.points[0].trace == pytest.approx(np.trace(block), abs=1e-12)


def test_toolbox_arguments_are_checked_before_compute(problem):
    model, variables, x, y = problem
    with pytest.raises(AnalysisError, match="unknown curvature"):
        analyze_model(model, (x, y), "xent", variables=variables, curvatures=("gnn",))
    with pytest.raises(AnalysisError, match="choose one"):
        analyze_model(model, (x, y), "xent", variables=variables, per_layer=True,
                      blocks="Dense_1")
    with pytest.raises(AnalysisError, match="available"):
        analyze_model(model, (x, y), "xent", variables=variables, blocks="conv")
    with pytest.raises(AnalysisError, match="Fisher|fisher"):
        analyze_model(model, (x, y), lambda f, t: jnp.mean((f - 1.0) ** 2),
                      variables=variables, curvatures=("fisher",))
