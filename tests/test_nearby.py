"""The verdict about the critical point near θ (crit.nearby): a sign of λ_min that the distance
to ∇L = 0 can flip is not a saddle or a minimum; true saddles and minima keep their verdict."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401  (float64)
from crit import toy
from crit.hessian import dense_hessian, hvp_operator
from crit.krylov import krylov_spectrum
from crit.nearby import critical_point_verdict, nearby_margin
from crit.spectrum import default_tolerance
from crit.verdict import (
    DEGENERATE,
    MINIMUM,
    NO_NEGATIVE_FOUND,
    NOT_CRITICAL,
    SADDLE_PROVEN,
    dense_verdict,
    krylov_verdict,
)

OFF = 3e-9  # distance of the toy points from the valley w1·w2 = 1, relative


def valley_point(t, side):
    """(1 + t, 1/(1 + t)) scaled so that w1·w2 = 1 + side·OFF (outside: +1, inside: −1)."""
    return jnp.array([1.0 + t, 1.0 / (1.0 + t)]) * jnp.sqrt(1.0 + side * OFF)


def dense_case(loss_fn, w):
    lam, vec = jnp.linalg.eigh(dense_hessian(loss_fn, w))
    verdict = dense_verdict(lam, default_tolerance(lam))
    margin = nearby_margin(loss_fn, w, vec[:, 0])
    return lam, verdict, margin, critical_point_verdict(verdict, margin)


@pytest.mark.parametrize("t", [0.0, 0.3])
def test_near_the_valley_neither_side_claims_a_saddle_or_a_minimum(t):
    point = {}
    for side in (+1, -1):
        lam, verdict, m, near = jax.jit(lambda w: dense_case(toy.toy_loss, w))(
            valley_point(t, side))
        point[side] = verdict
        assert float(m.grad_norm) < 1e-8 and float(toy.toy_loss(valley_point(t, side))) < 1e-16
        assert int(near.code) == DEGENERATE, (side, lam, m)
        # the margin covers the eigenvalue the distance produced; the ratio says it is O(‖g‖)
        assert float(m.margin) >= abs(float(lam[0]))
        assert 0.1 < float(m.ratio) < 10.0
        assert float(near.margin) == float(m.margin)
        # the point statements are unchanged
        assert bool(near.negative_proven) == bool(verdict.negative_proven)
        assert float(near.lambda_min_bound) == float(verdict.lambda_min_bound)
    # the old, point-level verdicts are the contradiction of issue 24: both sides decided
    assert int(point[+1].code) == SADDLE_PROVEN and bool(point[+1].negative_proven)
    assert int(point[-1].code) == MINIMUM


def test_the_toy_origin_stays_a_proven_saddle_with_a_tiny_margin():
    w = jnp.array([1e-13, -2e-13])  # ‖∇L‖ ~ 4e-13, as after Newton
    lam, verdict, m, near = dense_case(toy.toy_loss, w)
    np.testing.assert_allclose(lam, toy.TOY_SADDLE_EIGENVALUES, atol=1e-9)
    assert int(verdict.code) == SADDLE_PROVEN and int(near.code) == SADDLE_PROVEN
    assert float(m.margin) < 1e-10 and float(m.ratio) > 1e10


def test_an_exact_critical_point_gets_margin_zero():
    m = nearby_margin(toy.toy_loss, jnp.zeros(2), jnp.array([1.0, 1.0]))
    assert float(m.grad_norm) == 0.0 and float(m.step_norm) == 0.0
    assert float(m.curvature_shift) == 0.0 and float(m.margin) == 0.0
    assert np.isinf(float(m.ratio))


def convex(theta):
    """Strongly convex: Σ c_i (θ_i − 1)² / 2 + (Σ (θ_i − 1)²)² with c_i in [0.5, 5]."""
    c = jnp.linspace(0.5, 5.0, theta.shape[0])
    d = theta - 1.0
    return 0.5 * jnp.sum(c * d ** 2) + jnp.sum(d ** 2) ** 2


def test_a_strongly_convex_minimum_off_by_1e3_stays_a_minimum_after_refinement():
    from crit.critical import newton_critical_point

    theta = 1.0 + 1e-3 * jax.random.normal(jax.random.PRNGKey(3), (12,))
    near0 = dense_case(convex, theta)[3]  # unrefined: still far inside the margin
    assert int(near0.code) == MINIMUM
    found = newton_critical_point(convex, theta, max_iters=20, grad_tol=1e-8)
    assert float(found.grad_norm) < 1e-10
    lam, verdict, m, near = dense_case(convex, found.params)
    assert int(verdict.code) == MINIMUM and int(near.code) == MINIMUM
    assert float(m.margin) < 1e-9 * float(lam[0])


def test_a_degenerate_minimum_along_a_quartic_is_not_called_a_minimum():
    """L = z⁴ + x²: at z = 1e-3 the curvature 12z² is 1.2e-5 > τ, ‖∇L‖ = 4e-9 is certified,
    but the critical point z = 0 is degenerate. Twice the curvature shift catches it (the
    shift alone, 5/9 of λ, would not)."""
    quartic = lambda t: t[0] ** 4 + t[1] ** 2  # noqa: E731
    lam, verdict, m, near = dense_case(quartic, jnp.array([1e-3, 0.0]))
    assert int(verdict.code) == MINIMUM and float(m.grad_norm) < 1e-8
    np.testing.assert_allclose(float(m.curvature_shift), 5.0 / 9.0 * float(lam[0]), rtol=1e-6)
    assert int(near.code) == DEGENERATE


def test_other_codes_are_kept_and_margin_may_be_an_array():
    lam = jnp.array([-1e-3, 1.0])
    v = dense_verdict(lam, 1e-12, critical=False)
    assert int(critical_point_verdict(v, 1.0).code) == NOT_CRITICAL
    deg = dense_verdict(jnp.array([0.0, 1.0]), 1e-12)
    assert int(critical_point_verdict(deg, 0.0).code) == DEGENERATE
    kv = krylov_verdict(0.5, 0.0, 1e-15, 1.0, 100, 10)
    assert int(critical_point_verdict(kv, 10.0).code) == NO_NEGATIVE_FOUND
    assert int(critical_point_verdict(dense_verdict(lam, 1e-12), 1e-4).code) == SADDLE_PROVEN
    assert int(critical_point_verdict(dense_verdict(lam, 1e-12), 1e-2).code) == DEGENERATE


P_EMBED = 300


def embedded(theta):
    """The toy in (θ_0, θ_1) plus Σ c_i z_i² with c_i spread in [0.5, 50]: P = 300. The
    bottom gap (1 against a spread of 100) needs ~80 Lanczos steps before the smallest Ritz
    value reaches −6e-9 (measured: 7e-5 after 40 steps, 9e-10 after 60)."""
    c = jnp.linspace(0.5, 50.0, P_EMBED - 2)
    return toy.toy_loss(theta[:2]) + jnp.sum(c * theta[2:] ** 2)


def test_krylov_near_the_valley_is_not_a_proven_saddle():
    z = 1e-12 * jax.random.normal(jax.random.PRNGKey(0), (P_EMBED - 2,))
    theta = jnp.concatenate([valley_point(0.0, +1), z])

    @jax.jit
    def run(theta):
        _, matvec = hvp_operator(embedded, theta)
        spec = krylov_spectrum(matvec, jax.random.PRNGKey(1), P_EMBED, num_steps=80,
                               num_probes=2, k=2, deflate=False)
        m = nearby_margin(embedded, theta, spec.escape_direction)
        return spec, m, critical_point_verdict(spec.verdict, m)

    spec, m, near = run(theta)
    # 80 of 300 steps: not exhausted (an exhausted run would state miss_probability 0)
    assert float(spec.verdict.miss_probability) > 0 and float(m.grad_norm) < 1e-8
    # the point statement: Lanczos (not exhausted) proves a negative eigenvalue of H(θ) ...
    assert bool(spec.verdict.negative_proven) and int(spec.verdict.code) == SADDLE_PROVEN
    # ... which the distance to the valley explains: no saddle claimed for the critical point
    assert int(near.code) == DEGENERATE and bool(near.negative_proven)
    assert float(m.margin) >= abs(float(spec.verdict.ritz_value))
    assert 0.1 < float(m.ratio) < 10.0


def test_nearby_margin_vmaps_like_a_loop():
    ws = jnp.stack([valley_point(t, s) for t in (0.0, 0.2) for s in (+1, -1)])
    ys = jnp.stack([jnp.linalg.eigh(toy.toy_hessian(w))[1][:, 0] for w in ws])
    batched = jax.vmap(lambda w, y: nearby_margin(toy.toy_loss, w, y))(ws, ys)
    for i in range(len(ws)):
        one = nearby_margin(toy.toy_loss, ws[i], ys[i])
        np.testing.assert_allclose(batched.margin[i], one.margin, rtol=1e-9)


def test_mountain_pass_with_a_quartic_direction_is_degenerate_not_index_1():
    """f = −x² + y⁴: the pass at the origin is degenerate along y. Newton stops at y ~ 3e-4
    (‖∇f‖ ≤ 1e-10), where f_yy = 12y² ~ 1e-6 ≫ τ: the counts alone say index 1; the margin
    for the distance to the critical point does not. The toy's pass stays index 1."""
    from crit.mountain_pass import certify_top, label_names

    f = lambda t: -t[0] ** 2 + t[1] ** 4  # noqa: E731
    cert = jax.jit(lambda t: certify_top(f, t, jnp.full(2, -1.0), follow_iters=0))(
        jnp.array([0.1, 0.1]))
    assert int(cert.n_neg) == 1 and int(cert.n_null) == 0 and float(cert.grad_norm) <= 1e-8
    assert label_names(cert.label) == "degenerate"
    assert float(cert.margin) > float(cert.lambda_next) > float(cert.tolerance)
    saddle = jax.jit(lambda t: certify_top(toy.toy_loss, t, jnp.zeros(2)))(
        jnp.array([0.05, -0.03]))
    assert label_names(saddle.label) == "index_1_saddle" and float(saddle.margin) < 1e-8
