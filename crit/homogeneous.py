r"""Global optimality of sums of positively homogeneous subnetworks (Haeffele & Vidal 2017).

Model. r parallel subnetworks, each one bias-free ReLU unit with a scalar output,

.. math:: f(x) = \sum_{j=1}^r \phi(x; W_j), \qquad \phi(x; w_1, w_2) = w_2\,\mathrm{relu}(w_1^\top x),

so φ(x; αW) = α²φ(x; W) for α ≥ 0: positively homogeneous of degree p = 2. The regularizer
must be positively homogeneous of the same degree:

* ``"squared"`` (default): Θ(W) = ½ Σ_j (‖w1_j‖² + w2_j²), i.e. weight decay; smooth, so plain
  first-order descent works,
* ``"product"``: Θ(W) = Σ_j ‖w1_j‖·|w2_j|.

Both are degree 2; ‖w1‖|w2| ≤ ½(‖w1‖² + w2²) with equality for balanced units (‖w1‖ = |w2|),
and every local minimum of the squared form is balanced, so the two define the same problem
at its minima. The training objective, with the squared loss ℓ and weight λ > 0, is

.. math:: F(W) = \ell(f(X)) + \lambda\,\Theta(W), \qquad
          \ell(f) = \frac{1}{2n}\sum_i (f(x_i) - y_i)^2 .

Certificate (Haeffele & Vidal 2017, Theorems 1-2 and the meta-algorithm). At a local minimum:

(a) if some subnetwork is entirely zero, the point is a global minimum;
(b) in general it is a global minimum iff the polar of the negative output gradient satisfies

.. math:: \Omega^\circ(-\nabla_f \ell) = \sup_{\theta(w) \le 1}
          \langle -\nabla_f \ell, \phi(X; w)\rangle
          = \sup_{\lVert w_1\rVert = 1} \bigl|\langle z, \mathrm{relu}(X w_1)\rangle\bigr|
          \;\le\; \lambda, \qquad z = -\nabla_f \ell = (y - f)/n .

For both regularizers the sup over the unit ball is attained at ‖w1‖ = |w2| = 1 (the objective
is degree 2, the constraint too), and the optimal w2 is the sign of ⟨z, relu(Xw1)⟩.
:func:`polar` maximizes over the sphere by projected ascent from many random starts (and from
every data direction ±x_i/‖x_i‖), keeping the best feasible point seen: the result is a lower
bound of the sup, so "polar > λ" certainly proves a point is not globally optimal (it comes with
a descent direction: adding a small multiple of the maximizer lowers F by ≈ τ²(polar − λ)),
while "polar ≤ λ" is a certificate up to the search missing the global maximizer.

Meta-algorithm (:func:`meta_algorithm`): local descent; if the certificate fails, append a
subnetwork τ·(ŵ1, sign) at the polar maximizer, with τ chosen on a grid to lower F, and descend
again. Descent keeps its best iterate, so the objective never increases from one round to the
next.

Shapes are fixed at ``r_max`` slots with a boolean ``mask`` of active subnetworks (inactive slots
are zero and receive no updates), so every round runs the same compiled function.

Reference
---------
B. D. Haeffele, R. Vidal (2017). Global optimality in neural network training. CVPR.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

Array = jax.Array
REGULARIZERS = ("squared", "product")


class Subnetworks(NamedTuple):
    """r_max slots: ``w1`` (r_max, d) input weights, ``w2`` (r_max,) output weights."""

    w1: Array
    w2: Array


def init_subnetworks(key: Array, r_max: int, dim: int, r: int, scale: float = 0.1) -> tuple:
    """``(params, mask)``: the first r slots drawn N(0, scale²), the rest zero and inactive."""
    k1, k2 = jax.random.split(key)
    mask = jnp.arange(r_max) < r
    w1 = scale * jax.random.normal(k1, (r_max, dim)) * mask[:, None]
    w2 = scale * jax.random.normal(k2, (r_max,)) * mask
    return Subnetworks(w1, w2), mask


def subnetwork_outputs(params: Subnetworks, x: Array) -> Array:
    """φ(x_i; W_j) = w2_j·relu(w1_jᵀx_i), shape (n, r_max)."""
    return jax.nn.relu(x @ params.w1.T) * params.w2


def network_output(params: Subnetworks, x: Array) -> Array:
    """f(x_i) = Σ_j φ(x_i; W_j), shape (n,)."""
    return jnp.sum(subnetwork_outputs(params, x), axis=1)


def unit_regularizer(params: Subnetworks, kind: str = "squared") -> Array:
    """θ(W_j) per slot, shape (r_max,): ½(‖w1_j‖² + w2_j²) or ‖w1_j‖·|w2_j|."""
    if kind == "squared":
        return 0.5 * (jnp.sum(params.w1 ** 2, axis=1) + params.w2 ** 2)
    if kind == "product":
        return jnp.linalg.norm(params.w1, axis=1) * jnp.abs(params.w2)
    raise ValueError(f"unknown regularizer {kind!r}; allowed: {list(REGULARIZERS)}")


def squared_loss(f: Array, y: Array) -> Array:
    """ℓ(f) = (1/2n) Σ_i (f_i − y_i)² (convex in f, as the theory requires)."""
    return 0.5 * jnp.mean((f - y) ** 2)


def objective(params: Subnetworks, x: Array, y: Array, lam: float,
              kind: str = "squared") -> Array:
    """F(W) = ℓ(f(X)) + λ Σ_j θ(W_j)."""
    return squared_loss(network_output(params, x), y) + lam * jnp.sum(unit_regularizer(params,
                                                                                        kind))


def output_gradient(params: Subnetworks, x: Array, y: Array) -> Array:
    """∇_f ℓ at the current outputs, shape (n,) (= (f − y)/n for the squared loss)."""
    return jax.grad(squared_loss)(network_output(params, x), y)


class PolarResult(NamedTuple):
    """Best point found for sup_{‖w1‖=1, |w2|=1} ⟨z, w2·relu(X w1)⟩ (a lower bound of the sup)."""

    value: Array  # the polar estimate
    w1: Array  # (d,) unit maximizer
    w2: Array  # ±1, the sign of ⟨z, relu(X w1)⟩
    start_values: Array  # best value per start (diagnostic: how many starts found the max)


def polar(z: Array, x: Array, key: Array, num_starts: int = 256, steps: int = 200,
          lr: float = 0.5) -> PolarResult:
    r"""Ω°(z) for one ReLU unit: max over the unit sphere of |⟨z, relu(X w)⟩|.

    The two signs of w2 are handled as two problems, max ±⟨z, relu(Xw)⟩. Each is solved by
    projected (sub)gradient ascent on the sphere, w ← (w + η_t d/‖d‖)/‖·‖ with
    d = ±Xᵀ(z ⊙ 1[Xw > 0]) and η_t decaying geometrically from ``lr`` to lr/1000, started from
    ``num_starts`` Gaussian directions and from every ±x_i/‖x_i‖, then 5 fixed-point steps
    w ← c/‖c‖ with c = ±Xᵀ(z ⊙ 1[Xw > 0]) (inside one cone of activation patterns the
    objective is linear, c·w, and c/‖c‖ is its exact maximizer on the sphere). Every iterate
    is feasible; the best value seen is returned. Cost: (num_starts + 2n)·2·(steps + 5)
    products with X.
    """
    n, d = x.shape
    starts = jax.random.normal(key, (num_starts, d), dtype=x.dtype)
    norms = jnp.linalg.norm(x, axis=1, keepdims=True)
    data_dirs = x / jnp.where(norms > 0, norms, 1.0)
    starts = jnp.concatenate([starts, data_dirs, -data_dirs])
    starts = starts / jnp.linalg.norm(starts, axis=1, keepdims=True)
    etas = lr * jnp.geomspace(1.0, 1e-3, steps)

    def value(w, s):
        return s * jnp.dot(z, jax.nn.relu(x @ w))

    def ascend(w, s):
        def step(carry, eta):
            w, best, best_w = carry
            v = value(w, s)
            better = v > best
            best, best_w = jnp.where(better, v, best), jnp.where(better, w, best_w)
            d = s * (x.T @ (z * (x @ w > 0)))
            dn = jnp.linalg.norm(d)
            w = w + eta * d / jnp.where(dn > 0, dn, 1.0)
            return (w / jnp.linalg.norm(w), best, best_w), None

        (w, best, best_w), _ = jax.lax.scan(step, (w, -jnp.inf, w), etas)

        def fixed_point(carry, _):
            # Within the cone of the current activation pattern the objective is c·w, whose
            # maximum on the sphere is c/‖c‖: exact when that stays in the cone.
            w, best, best_w = carry
            v = value(w, s)
            better = v > best
            best, best_w = jnp.where(better, v, best), jnp.where(better, w, best_w)
            c = s * (x.T @ (z * (x @ w > 0)))
            cn = jnp.linalg.norm(c)
            return (jnp.where(cn > 0, c / jnp.where(cn > 0, cn, 1.0), w), best, best_w), None

        (w, best, best_w), _ = jax.lax.scan(fixed_point, (w, best, best_w), None, length=5)
        last = value(w, s)
        return jnp.where(last > best, last, best), jnp.where(last > best, w, best_w)

    signs = jnp.array([1.0, -1.0], dtype=x.dtype)
    vals, ws = jax.vmap(lambda s: jax.vmap(lambda w: ascend(w, s))(starts))(signs)
    flat = vals.reshape(-1)
    best = jnp.argmax(flat)
    sign_idx, start_idx = best // starts.shape[0], best % starts.shape[0]
    return PolarResult(flat[best], ws[sign_idx, start_idx], signs[sign_idx],
                       jnp.max(vals, axis=0))


class Certificate(NamedTuple):
    """The Haeffele-Vidal check at a point (see the module docstring)."""

    objective: Array
    loss: Array
    regularizer: Array
    polar: Array  # Ω°(−∇_f ℓ), a lower bound (search)
    lam: Array
    n_active: Array
    n_zero: Array  # active subnetworks with θ(W_j) ≤ zero_tol
    global_by_zero: Array  # (a)
    global_by_polar: Array  # (b): polar ≤ λ(1 + rtol)
    certified: Array  # = (b); (a) alone proves nothing away from a true local minimum
    grad_norm: Array  # ‖∇F‖ over the active slots: how close to stationary the point is
    n_kinks: Array  # (data point, active unit) pairs on the unit's ReLU hinge (see notes)
    gap_bound: Array  # F − F* ≤ this (see notes), F* the optimum over every r
    w1: Array  # polar maximizer
    w2: Array


def certificate(params: Subnetworks, mask: Array, x: Array, y: Array, lam: float, key: Array,
                kind: str = "squared", zero_tol: float = 1e-6, rtol: float = 1e-2,
                num_starts: int = 256, steps: int = 200) -> Certificate:
    r"""Certify (or refute) global optimality of a point reached by local descent.

    (a) ``n_zero`` counts active subnetworks with θ(W_j) ≤ ``zero_tol``. Haeffele & Vidal's
    statement needs a local minimum, and the descent only approximates one: a zero subnetwork
    at a saddle (which gradient descent cannot leave, φ being degree 2) proves nothing, and
    there the polar test fails. So ``certified`` requires (b), and (a) is reported beside it.
    (b) ``polar`` = Ω°(−∇_f ℓ) by :func:`polar`, compared with λ with relative slack ``rtol``
    (at a stationary point each active balanced unit attains ⟨z, φ(ŵ_j)⟩ = λ, so the polar is
    ≥ λ up to the stationarity error).

    ReLU makes F non-smooth where a data point lies on a unit's hinge w1_jᵀx_i = 0; local
    minima often sit there (the hinge is pinned to a data point), and then the one-sided
    gradient ``grad_norm`` does not vanish at a minimum. ``n_kinks`` counts the pairs with
    |w1_jᵀx_i| ≤ 1e-9·‖w1_j‖‖x_i‖, so a large ``grad_norm`` can be told apart from a
    descent that did not converge.

    ``gap_bound``: with ε = polar/λ − 1 and z = −∇_f ℓ, convexity of ℓ and
    ⟨z, Φ*⟩ ≤ Ω°(z)Ω(Φ*) give, for the global optimum Φ* of ℓ(Φ) + λΩ(Φ),

    .. math:: F(W) - F^* \le \max(\varepsilon, 0)\,\lambda\Omega(\Phi^*)
              + \bigl(\lambda\Theta(W) - \langle z, f(X)\rangle\bigr)
              \le \max(\varepsilon, 0)\,F(W) + \bigl(\lambda\Theta(W) - \langle z, f\rangle\bigr).

    The bracket vanishes at any point stationary along the rescalings W_j → αW_j (degree 2 on
    both sides), which kinks do not affect. The bound holds up to the polar search finding
    the maximum (it is computed with the value found).
    """
    loss = squared_loss(network_output(params, x), y)
    reg = jnp.sum(unit_regularizer(params, kind))
    z = -output_gradient(params, x, y)
    pol = polar(z, x, key, num_starts, steps)
    theta = unit_regularizer(params, kind)
    n_zero = jnp.sum(mask & (theta <= zero_tol))
    grads = jax.grad(objective)(params, x, y, lam, kind)
    gnorm = jnp.sqrt(jnp.sum((grads.w1 * mask[:, None]) ** 2) + jnp.sum((grads.w2 * mask) ** 2))
    by_polar = pol.value <= lam * (1.0 + rtol)
    pre = jnp.abs(x @ params.w1.T)
    scale = jnp.linalg.norm(x, axis=1)[:, None] * jnp.linalg.norm(params.w1, axis=1)[None, :]
    kinks = jnp.sum((pre <= 1e-9 * scale) & (scale > 0) & mask[None, :])
    f_value = loss + lam * reg
    radial = lam * reg - jnp.dot(z, network_output(params, x))
    gap = jnp.maximum(jnp.maximum(pol.value / lam - 1.0, 0.0) * f_value + radial, 0.0)
    return Certificate(f_value, loss, reg, pol.value, jnp.asarray(lam), jnp.sum(mask), n_zero,
                       n_zero > 0, by_polar, by_polar, gnorm, kinks, gap, pol.w1, pol.w2)


class Descent(NamedTuple):
    """Local descent: the best iterate, its objective, and F at every iterate (steps + 1,)."""

    params: Subnetworks
    objective: Array
    curve: Array


def rescale_subnetworks(params: Subnetworks, mask: Array, x: Array, y: Array, lam: float,
                        kind: str = "squared", steps: int = 500) -> Subnetworks:
    r"""Optimal scales of the subnetworks with their directions fixed: a convex problem.

    With ŵ_j = w1_j/‖w1_j‖, σ_j = sign(w2_j) and features c_j = σ_j relu(Xŵ_j), the balanced
    point W_j = √s_j (ŵ_j, σ_j) has f = Σ_j s_j c_j and θ(W_j) = s_j for both regularizers, so

    .. math:: \min_{s \ge 0}\; 	frac{1}{2n}\lVert C s - y
Vert^2 + \lambda 	extstyle\sum_j s_j

    (a non-negative lasso; rescaling never moves a ReLU hinge, so it is smooth). Solved by
    FISTA with step n/‖C‖₂², started from the current s_j = ‖w1_j‖|w2_j| (balancing alone never
    raises F), keeping the best iterate. At its optimum every unit with s_j > 0 has
    ⟨z, c_j⟩ = λ (z = (y − f)/n), so the point is stationary along every rescaling, and units
    with s_j = 0 become exactly zero subnetworks.
    """
    norms = jnp.linalg.norm(params.w1, axis=1)
    active = mask & (norms > 0)
    w_hat = params.w1 / jnp.where(active, norms, 1.0)[:, None]
    sigma = jnp.where(params.w2 < 0, -1.0, 1.0)
    c = jax.nn.relu(x @ w_hat.T) * sigma * active  # (n, r_max)
    n = x.shape[0]
    step = n / jnp.maximum(jnp.linalg.norm(c, ord=2) ** 2, 1e-300)

    def g_obj(s):
        return 0.5 * jnp.mean((c @ s - y) ** 2) + lam * jnp.sum(s)

    def body(carry, _):
        s, v, t, best, best_g = carry
        grad = c.T @ (c @ v - y) / n + lam
        s_new = jnp.maximum(v - step * grad, 0.0) * active
        t_new = 0.5 * (1.0 + jnp.sqrt(1.0 + 4.0 * t ** 2))
        v_new = s_new + ((t - 1.0) / t_new) * (s_new - s)
        g_new = g_obj(s_new)
        better = g_new < best_g
        return (s_new, v_new, t_new, jnp.where(better, s_new, best),
                jnp.where(better, g_new, best_g)), None

    s0 = norms * jnp.abs(params.w2) * active
    init = (s0, s0, jnp.asarray(1.0, x.dtype), s0, g_obj(s0))
    (_, _, _, s, _), _ = jax.lax.scan(body, init, None, length=steps)
    root = jnp.sqrt(s)
    return Subnetworks(root[:, None] * w_hat * active[:, None], root * sigma * active)


def local_descent(params: Subnetworks, mask: Array, x: Array, y: Array, lam: float,
                  kind: str = "squared", steps: int = 2000, lr: float = 1e-2,
                  polish_steps: int = 300, rescale_steps: int = 500) -> Descent:
    """Local descent on F over the active slots: ``steps`` of Adam (learning rate decaying
    exponentially from ``lr`` to lr/1000), then ``polish_steps`` of L-BFGS with a zoom line
    search (``optax.lbfgs``), then the optimal rescaling of :func:`rescale_subnetworks`
    (``rescale_steps`` FISTA steps; 0 skips it). Inactive slots are multiplied by the mask
    inside F, so they get zero gradients and stay zero. Returns the point with the lowest F
    seen (the start included), so F never exceeds its starting value.

    ReLU hinges pinned to data points stop gradient methods short of ‖∇F‖ = 0 (see
    :func:`certificate`); the rescaling step is exact along the directions the hinges do not
    affect.
    """
    def fun(p):
        return objective(Subnetworks(p.w1 * mask[:, None], p.w2 * mask), x, y, lam, kind)

    def keep_best(p, f, best, best_f):
        better = f < best_f
        best = jax.tree.map(lambda a, b: jnp.where(better, a, b), p, best)
        return best, jnp.where(better, f, best_f)

    adam = optax.adam(optax.exponential_decay(lr, max(steps, 1), 1e-3))
    vg = jax.value_and_grad(fun)

    def adam_step(carry, _):
        p, state, best, best_f = carry
        f, g = vg(p)
        best, best_f = keep_best(p, f, best, best_f)
        updates, state = adam.update(g, state, p)
        return (optax.apply_updates(p, updates), state, best, best_f), f

    init = (params, adam.init(params), params, jnp.asarray(jnp.inf, x.dtype))
    (p, _, best, best_f), curve_a = jax.lax.scan(adam_step, init, None, length=steps)

    curve = [curve_a]
    if polish_steps:  # static: no L-BFGS graph to compile when it is off
        lbfgs = optax.lbfgs()
        vg_state = optax.value_and_grad_from_state(fun)

        def lbfgs_step(carry, _):
            p, state, best, best_f = carry
            f, g = vg_state(p, state=state)
            best, best_f = keep_best(p, f, best, best_f)
            updates, state = lbfgs.update(g, state, p, value=f, grad=g, value_fn=fun)
            return (optax.apply_updates(p, updates), state, best, best_f), f

        (p, _, best, best_f), curve_l = jax.lax.scan(
            lbfgs_step, (p, lbfgs.init(p), best, best_f), None, length=polish_steps)
        curve.append(curve_l)
    f_last = fun(p)
    best, best_f = keep_best(p, f_last, best, best_f)
    best = Subnetworks(best.w1 * mask[:, None], best.w2 * mask)
    curve.append(f_last[None])
    if rescale_steps:
        scaled = rescale_subnetworks(best, mask, x, y, lam, kind, rescale_steps)
        f_scaled = fun(scaled)
        best, best_f = keep_best(scaled, f_scaled, best, best_f)
        curve.append(f_scaled[None])
    return Descent(best, best_f, jnp.concatenate(curve))


def add_subnetwork(params: Subnetworks, mask: Array, w1: Array, w2: Array, x: Array, y: Array,
                   lam: float, kind: str = "squared",
                   scales=tuple(np.geomspace(1e-3, 10.0, 41))) -> tuple:
    """Fill the first inactive slot with τ·(ŵ1, w2) (balanced: ‖τŵ1‖ = |τw2| = τ), with τ the
    grid value of lowest F. Adding it changes F by −τ²(⟨z, φ(ŵ)⟩ − λ) + O(τ⁴), a decrease for
    small τ whenever the polar exceeds λ. Returns ``(params, mask, tau, objective)``; with no
    free slot it returns the input unchanged and τ = 0."""
    free = ~mask
    slot = jnp.argmax(free)
    has_slot = jnp.any(free)
    scales = jnp.asarray(scales, dtype=x.dtype)

    def with_scale(tau):
        return Subnetworks(params.w1.at[slot].set(tau * w1), params.w2.at[slot].set(tau * w2))

    values = jax.vmap(lambda t: objective(with_scale(t), x, y, lam, kind))(scales)
    tau = jnp.where(has_slot, scales[jnp.argmin(values)], 0.0)
    new = with_scale(tau)
    return new, mask.at[slot].set(mask[slot] | has_slot), tau, objective(new, x, y, lam, kind)


class MetaRound(NamedTuple):
    """One round of the meta-algorithm (host values)."""

    r: int  # active subnetworks during the round's descent
    objective_start: float  # F when the round's descent starts
    objective: float  # F after descent
    loss: float
    regularizer: float
    polar: float  # Ω°(−∇_f ℓ) at the descended point
    n_zero: int
    n_kinks: int
    certified: bool
    grad_norm: float
    gap_bound: float  # F − F* ≤ gap_bound (Certificate.gap_bound)
    tau_added: float  # scale of the subnetwork added after this round (nan if none)
    objective_after_add: float  # F right after adding it (nan if none)


def meta_algorithm(x, y, lam: float, key: Array, r_max: int = 10, r0: int = 1,
                   kind: str = "squared", steps: int = 2000, lr: float = 1e-2,
                   polish_steps: int = 300, rescale_steps: int = 500, init_scale: float = 0.1, zero_tol: float = 1e-6,
                   rtol: float = 1e-2, num_starts: int = 256,
                   polar_steps: int = 200) -> tuple[list[MetaRound], Subnetworks, Array]:
    """Haeffele & Vidal's meta-algorithm: descend; certify; if not certified, add a subnetwork
    at the polar maximizer and repeat, until certified or r = ``r_max``.

    Keys: the init uses ``fold_in(key, 0)``, the polar search of round k ``fold_in(key, k + 1)``.
    Returns ``(rounds, params, mask)``; ``rounds[-1].certified`` says whether it ended certified.
    """
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    descend = jax.jit(lambda p, m: local_descent(p, m, x, y, lam, kind, steps, lr,
                                                 polish_steps, rescale_steps))
    check = jax.jit(lambda p, m, k: certificate(p, m, x, y, lam, k, kind, zero_tol, rtol,
                                                num_starts, polar_steps))
    grow = jax.jit(lambda p, m, w1, w2: add_subnetwork(p, m, w1, w2, x, y, lam, kind))
    params, mask = init_subnetworks(jax.random.fold_in(key, 0), r_max, x.shape[1], r0,
                                    init_scale)
    params = Subnetworks(params.w1.astype(x.dtype), params.w2.astype(x.dtype))
    start = float(objective(params, x, y, lam, kind))
    rounds = []
    for k in range(r_max - r0 + 1):
        params = descend(params, mask).params
        cert = jax.device_get(check(params, mask, jax.random.fold_in(key, k + 1)))
        r = int(cert.n_active)
        tau, after = float("nan"), float("nan")
        done = bool(cert.certified) or r >= r_max
        if not done:
            params, mask, tau, after = grow(params, mask, cert.w1, cert.w2)
            tau, after = float(tau), float(after)
        rounds.append(MetaRound(r, start, float(cert.objective), float(cert.loss),
                                float(cert.regularizer), float(cert.polar), int(cert.n_zero),
                                int(cert.n_kinks), bool(cert.certified), float(cert.grad_norm),
                                float(cert.gap_bound), tau, after))
        if done:
            break
        start = after
    return rounds, params, mask
