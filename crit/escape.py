r"""Escaping saddle points: negative curvature, saddle-free Newton, perturbed gradient descent.

At a critical point θ* (g = ∇L(θ*) = 0) with a Hessian eigenpair (λ < 0, u), the second-order
model says L(θ* + t·u) ≈ L(θ*) + ½λt² < L(θ*) (REFERENCES §1): a saddle is escapable along u.
This module measures that and compares methods that use it.

* :func:`negative_curvature_direction` -- the most negative eigenpair (λ_min, u) of the exact
  Hessian: dense ``eigh`` for small P, or Lanczos on Hessian-vector products
  (:func:`crit.lanczos.extremal_eigenpairs` on :func:`crit.hessian.hvp_operator`) for large P.
* :func:`loss_along` -- L(θ + t·u) over many t (``vmap``), with the quadratic prediction
  L + (g·u)t + ½(uᵀHu)t²; for a unit eigenvector at a critical point that is L + ½λt².
* :func:`saddle_free_newton_step` -- Dauphin et al. (2014): Δθ = −|H|⁻¹g with
  |H| = Σ_i |λ_i| u_i u_iᵀ (dense). Newton's −H⁻¹g multiplies the component of θ − θ* along a
  negative direction by 0 (it jumps *onto* the saddle); the saddle-free step multiplies it by
  1 + |λ|/(|λ| + δ) ≈ 2 (it is repelled), while it contracts positive directions like Newton.
* :func:`saddle_free_newton_krylov_step` -- the same step restricted to the Krylov subspace
  K_k(H, g) (Dauphin et al. 2014, Algorithm 1, "k Lanczos vectors"); see its docstring.
* :func:`saddle_free_newton`, :func:`newton` -- iterated steps in ``lax.scan``.
* :func:`perturbed_gradient_descent` -- Jin et al. (2017): gradient descent that adds noise
  drawn uniformly from a ball of radius r whenever ‖g‖ ≤ g_thres (at most once per
  ``interval`` steps); plain gradient descent started exactly at a saddle never moves.
* :func:`run_optimizer` -- any optax optimizer (GD, momentum, Adam via
  :func:`crit.train.make_optimizer`) with its loss curve.

Every run returns an :class:`OptimizerRun` with the loss and gradient norm at steps 0..T (and
optionally the iterates), so curves of different methods line up step for step. All functions
are pure and written for one starting point: ``jax.vmap`` them over many.

Damping. Second-order steps take ``damping`` δ ≥ 0 in the units of the eigenvalues:
1/(|λ| + δ) for saddle-free Newton. A tuple of dampings is a grid: every step takes the
candidate with the lowest loss (the damping line search of Dauphin et al. 2014). With δ = 0,
eigenvalues with |λ| ≤ ``rcond``·max|λ| are dropped (pseudo-inverse), so null directions of the
net's symmetries do not produce infinite steps.

References
----------
- Y. Dauphin, R. Pascanu, C. Gulcehre, K. Cho, S. Ganguli, Y. Bengio (2014). Identifying and
  attacking the saddle point problem in high-dimensional non-convex optimization. NeurIPS.
- C. Jin, R. Ge, P. Netrapalli, S. Kakade, M. Jordan (2017). How to escape saddle points
  efficiently. ICML.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from crit.hessian import dense_hessian, flat_loss, hvp_operator
from crit.lanczos import extremal_eigenpairs, lanczos_tridiag, tridiag_eigh
from crit.train import make_optimizer

Params = Any
Array = jax.Array
LossFn = Callable[[Params], Array]

#: Eigenvalues with |λ| ≤ RCOND·max|λ| are treated as zero by undamped (δ = 0) steps.
RCOND = 1e-12


# --------------------------------------------------------------------------- curvature


class NegativeCurvature(NamedTuple):
    """The most negative eigenpair of the Hessian at a point.

    ``direction`` is a unit vector (‖u‖ = 1 over all leaves) with the structure of the
    parameters, its sign fixed so that its largest-magnitude entry is positive.
    ``residual`` = ‖Hu − λu‖ (one extra HVP): small means (λ, u) is a true eigenpair.
    ``converged`` is True for the dense method, and for Lanczos when the residual is at most
    ``tol``·max|θ| (see :func:`crit.lanczos.extremal_eigenpairs`).
    """

    eigenvalue: Array
    direction: Params
    residual: Array
    grad_norm: Array
    converged: Array


def _sign_fixed(v: Array) -> Array:
    return v * jnp.where(v[jnp.argmax(jnp.abs(v))] < 0, -1.0, 1.0)


def negative_curvature_direction(loss_fn: LossFn, params: Params, *,
                                 lanczos_steps: int | None = None, key: Array | None = None,
                                 tol: float = 1e-8) -> NegativeCurvature:
    r"""λ_min(H) and its unit eigenvector u at ``params``: the escape direction of a saddle.

    Parameters
    ----------
    loss_fn, params : scalar loss over a parameter pytree, and the point.
    lanczos_steps : ``None`` (default) uses the exact dense Hessian and ``eigh`` (P up to a few
        thousand). An integer m runs m Lanczos steps with full reorthogonalization on the
        Hessian-vector product :math:`v \mapsto Hv` instead (large P); the smallest Ritz pair is
        returned. The most negative eigenvalue comes from the same run as the largest
        (REFERENCES §10); it converges at a rate set by its gap to the rest of the spectrum.
    key : PRNG key of the random Lanczos start vector (default ``PRNGKey(0)``).
    tol : relative residual of a converged Lanczos pair.

    Returns
    -------
    NegativeCurvature. If λ_min ≥ 0 the point has no negative curvature and u is simply the
    eigenvector of the smallest eigenvalue: check the sign of ``eigenvalue``.
    """
    f, theta, unravel = flat_loss(loss_fn, params)
    grad, matvec = hvp_operator(loss_fn, params)
    if lanczos_steps is None:
        lam, vecs = jnp.linalg.eigh(dense_hessian(f, theta))
        value, u = lam[0], vecs[:, 0]
        converged = jnp.asarray(True)
    else:
        key = jax.random.PRNGKey(0) if key is None else key
        v0 = jax.random.normal(key, theta.shape, dtype=theta.dtype)
        pairs = extremal_eigenpairs(matvec, v0, lanczos_steps, 1, tol=tol).smallest
        value, u, converged = pairs.values[0], pairs.vectors[0], pairs.converged[0]
    u = _sign_fixed(u / jnp.linalg.norm(u))
    residual = jnp.linalg.norm(matvec(u) - value * u)
    return NegativeCurvature(value, unravel(u), residual, jnp.linalg.norm(grad), converged)


class LineProfile(NamedTuple):
    """L(θ + t·u) along a line and its second-order Taylor predictions (all shape (n_t,)
    except the scalars ``loss0``, ``slope`` = g·u and ``curvature`` = uᵀHu)."""

    t: Array
    loss: Array
    quadratic: Array  # L + ½(uᵀHu)t²: the saddle prediction (g = 0)
    taylor: Array  # L + (g·u)t + ½(uᵀHu)t²: the full second-order model
    loss0: Array
    slope: Array
    curvature: Array


def loss_along(loss_fn: LossFn, params: Params, direction: Params, ts: Array) -> LineProfile:
    r"""Loss along θ + t·u for every t in ``ts`` (one ``vmap``), beside the quadratic model.

    .. math:: L(\theta + t u) \approx L(\theta) + t\, g^\top u + \tfrac12 t^2\, u^\top H u

    ``direction`` u is used as given (t is in units of ‖u‖); for a unit eigenvector of λ at a
    critical point the model is L + ½λt², whose error is O(t³). uᵀHu is one HVP.
    """
    f, theta, _ = flat_loss(loss_fn, params)
    u, _ = ravel_pytree(direction)
    u = u.astype(theta.dtype)
    ts = jnp.asarray(ts, dtype=theta.dtype)
    loss0, grad = jax.value_and_grad(f)(theta)
    curvature = jnp.dot(u, jax.jvp(jax.grad(f), (theta,), (u,))[1])
    slope = jnp.dot(grad, u)
    losses = jax.vmap(lambda t: f(theta + t * u))(ts)
    quadratic = loss0 + 0.5 * curvature * ts ** 2
    return LineProfile(ts, losses, quadratic, quadratic + slope * ts, loss0, slope, curvature)


# --------------------------------------------------------------------------- second-order steps


class SecondOrderStep(NamedTuple):
    """One Newton-type step: the new point θ + Δθ, the step Δθ (pytrees), the gradient norm
    and loss at the old point, and the damping used (from the grid, if one was given)."""

    params: Params
    delta: Params
    grad_norm: Array
    loss: Array
    damping: Array


def _inverse(values: Array, damping: Array, absolute: bool, keep: Array) -> Array:
    """1/(|λ| + δ) (saddle-free) or 1/(λ + δ·sign λ) (Newton), zero where not ``keep`` or where
    δ = 0 and |λ| ≤ RCOND·max|λ| (pseudo-inverse)."""
    scale = jnp.max(jnp.where(keep, jnp.abs(values), 0.0))
    small = (damping == 0) & (jnp.abs(values) <= RCOND * scale)
    ok = keep & ~small
    denom = jnp.abs(values) + damping if absolute else values + damping * jnp.sign(values)
    return jnp.where(ok, 1.0 / jnp.where(ok, denom, 1.0), 0.0)


def _grid(damping) -> Array:
    return jnp.atleast_1d(jnp.asarray(damping, dtype=jnp.result_type(float)))


def _spectral_step(f, theta, basis, values, coords, damping, absolute, keep) -> tuple:
    """Try every damping of the grid: Δθ = −B diag(1/(|λ|+δ)) c; keep the lowest loss."""
    dampings = _grid(damping)

    def candidate(mu):
        delta = -basis @ (_inverse(values, mu, absolute, keep) * coords)
        return delta, f(theta + delta)

    deltas, losses = jax.vmap(candidate)(dampings)
    if dampings.shape[0] == 1:
        return deltas[0], dampings[0]
    best = jnp.argmin(jnp.where(jnp.isfinite(losses), losses, jnp.inf))
    return deltas[best], dampings[best]


def _dense_step(loss_fn, params, damping, absolute) -> SecondOrderStep:
    f, theta, unravel = flat_loss(loss_fn, params)
    loss, g = jax.value_and_grad(f)(theta)
    lam, vecs = jnp.linalg.eigh(dense_hessian(f, theta))
    keep = jnp.ones_like(lam, dtype=bool)
    delta, mu = _spectral_step(f, theta, vecs, lam, vecs.T @ g, damping, absolute, keep)
    return SecondOrderStep(unravel(theta + delta), unravel(delta), jnp.linalg.norm(g), loss, mu)


def saddle_free_newton_step(loss_fn: LossFn, params: Params,
                            damping: float | Sequence[float] = 0.0) -> SecondOrderStep:
    r"""One dense saddle-free Newton step (Dauphin et al. 2014):

    .. math:: \Delta\theta = -|H|^{-1} g, \qquad |H| = \sum_i |\lambda_i|\, u_i u_i^\top
              \;(+\,\delta I),

    from the exact Hessian's ``eigh``. Unlike Newton's −H⁻¹g it moves *down* along negative
    curvature: on a quadratic it maps the component along a negative eigenvector to
    (1 + |λ|/(|λ| + δ)) times itself, and along a positive one to δ/(λ + δ) times itself.
    ``damping`` δ ≥ 0, or a tuple of candidates (the step with the lowest loss is taken).
    """
    return _dense_step(loss_fn, params, damping, absolute=True)


def newton_step(loss_fn: LossFn, params: Params,
                damping: float | Sequence[float] = 0.0) -> SecondOrderStep:
    r"""One dense Newton step Δθ = −H⁻¹g (pseudo-inverse; with δ > 0, 1/(λ + δ·sign λ)).

    Newton's method is attracted to critical points of any index: on f = 5x² − y² it lands on
    the saddle in one step from anywhere (the point Dauphin et al. 2014 make against it).
    """
    return _dense_step(loss_fn, params, damping, absolute=False)


def saddle_free_newton_krylov_step(loss_fn: LossFn, params: Params, k: int,
                                   damping: float | Sequence[float] = 0.0) -> SecondOrderStep:
    r"""Saddle-free Newton restricted to the k-dimensional Krylov subspace of H and g.

    Construction (Dauphin et al. 2014, Algorithm 1, with the gradient as the Lanczos start):

    1. k Lanczos steps with full reorthogonalization from q₀ = g/‖g‖ on v ↦ Hv give an
       orthonormal basis Q_k (k×P, rows) of K_k(H, g) = span{g, Hg, …, H^{k−1}g} and the
       tridiagonal T_k = Q_k H Q_kᵀ, the Hessian of α ↦ L(θ + Q_kᵀα) at α = 0.
    2. T_k = S diag(θ_i) Sᵀ (``eigh`` of a k×k matrix); |T_k| = S diag(|θ_i|) Sᵀ.
    3. The subspace gradient is Q_k g = ‖g‖e₁ (g lies in the subspace); the step is

       .. math:: \Delta\theta = -Q_k^\top S\,\mathrm{diag}\bigl(1/(|\theta_i| + \delta)\bigr)
                 S^\top Q_k g .

    Cost: k Hessian-vector products sharing one linearization, plus O(k²P). The extremal
    eigenvalues of H (the strongly negative ones included) are the first Ritz values to
    converge, so a modest k captures the directions that matter for escaping. When k = P and
    g has a component along every eigenvector (the generic case), Q_k is orthogonal and the
    step equals the dense :func:`saddle_free_newton_step`. If the Krylov space is exhausted
    before k steps (breakdown), the invalid steps are masked and the step is still exact on
    the invariant subspace containing g. At g = 0 the step is 0.
    """
    theta, unravel = ravel_pytree(params)
    f = lambda t: loss_fn(unravel(t))
    loss = f(theta)
    g, matvec = hvp_operator(loss_fn, params)
    gnorm = jnp.linalg.norm(g)
    e0 = jnp.zeros_like(g).at[0].set(1.0)
    v0 = jnp.where(gnorm > 0, g, e0)
    res = lanczos_tridiag(matvec, v0, k)
    values, vecs = tridiag_eigh(res.alphas, res.betas, res.valid)
    keep = jnp.arange(k) < res.num_valid
    basis = res.basis.T @ vecs  # P×k: Ritz vectors
    coords = vecs.T @ (res.basis @ g)
    delta, mu = _spectral_step(f, theta, basis, values, coords, damping, True, keep)
    return SecondOrderStep(unravel(theta + delta), unravel(delta), gnorm, loss, mu)


# --------------------------------------------------------------------------- runs


class OptimizerRun(NamedTuple):
    """A run of T steps: final params, loss and gradient norm at steps 0..T (shape (T+1,)),
    the flat iterates (T+1, P) when ``record_path`` (else None), and the number of noise
    injections (perturbed gradient descent; 0 for the other methods)."""

    params: Params
    loss: Array
    grad_norm: Array
    path: Array | None
    perturbations: Array


def _finish(loss_fn, theta_last, unravel, losses, norms, thetas, record_path, n_pert):
    loss, g = jax.value_and_grad(lambda t: loss_fn(unravel(t)))(theta_last)
    losses = jnp.concatenate([losses, loss[None]])
    norms = jnp.concatenate([norms, jnp.linalg.norm(g)[None]])
    path = jnp.concatenate([thetas, theta_last[None]]) if record_path else None
    return OptimizerRun(unravel(theta_last), losses, norms, path, jnp.asarray(n_pert))


def run_optimizer(loss_fn: LossFn, params: Params, optimizer: str | optax.GradientTransformation,
                  steps: int, learning_rate: float = 1e-2, momentum: float = 0.9,
                  record_path: bool = False) -> OptimizerRun:
    """``steps`` full-batch steps of an optax optimizer, recording every step.

    ``optimizer`` is an optax transformation or a name for :func:`crit.train.make_optimizer`
    (``"sgd"`` = gradient descent, ``"momentum"`` = heavy ball, ``"adam"``).
    """
    if isinstance(optimizer, str):
        optimizer = make_optimizer(optimizer, learning_rate, momentum)
    theta0, unravel = ravel_pytree(params)
    f = lambda t: loss_fn(unravel(t))
    vg = jax.value_and_grad(f)

    def step(carry, _):
        theta, state = carry
        loss, g = vg(theta)
        updates, state = optimizer.update(g, state, theta)
        return (optax.apply_updates(theta, updates), state), (loss, jnp.linalg.norm(g), theta)

    (theta, _), (losses, norms, thetas) = jax.lax.scan(
        step, (theta0, optimizer.init(theta0)), None, length=steps)
    return _finish(loss_fn, theta, unravel, losses, norms, thetas, record_path, 0)


def gradient_descent(loss_fn: LossFn, params: Params, lr: float, steps: int,
                     record_path: bool = False) -> OptimizerRun:
    """Plain gradient descent θ ← θ − lr·∇L (at an exact critical point it never moves)."""
    return run_optimizer(loss_fn, params, optax.sgd(lr), steps, record_path=record_path)


def uniform_ball(key: Array, dim: int, radius: float, dtype=None) -> Array:
    """A point drawn uniformly from the ball {‖ξ‖ ≤ radius} in R^dim: direction z/‖z‖ with
    z ~ N(0, I), length radius·U^{1/dim} with U ~ Uniform(0, 1)."""
    dtype = dtype or jnp.result_type(float)
    kz, ku = jax.random.split(key)
    z = jax.random.normal(kz, (dim,), dtype=dtype)
    length = radius * jax.random.uniform(ku, (), dtype=dtype) ** (1.0 / dim)
    return length * z / jnp.linalg.norm(z)


def perturbed_gradient_descent(loss_fn: LossFn, params: Params, key: Array, lr: float,
                               steps: int, radius: float, threshold: float, interval: int = 10,
                               record_path: bool = False) -> OptimizerRun:
    r"""Perturbed gradient descent (Jin et al. 2017, Algorithm 2, without the stopping test).

    At step t, if ‖∇L(θ_t)‖ ≤ ``threshold`` (g_thres) and no perturbation happened in the last
    ``interval`` steps (t_thres), θ_t ← θ_t + ξ with ξ uniform in the ball of radius ``radius``
    (r); then θ_{t+1} = θ_t − lr·∇L(θ_t). Near a strict saddle the noise gives the iterate a
    component along the negative-curvature directions, which gradient descent then amplifies by
    (1 + lr·|λ|) per step. The loss curve records L at the (perturbed) point each step uses.
    The noise of step t uses ``fold_in(key, t)``.
    """
    theta0, unravel = ravel_pytree(params)
    f = lambda t: loss_fn(unravel(t))
    vg = jax.value_and_grad(f)
    dim = theta0.shape[0]

    def step(carry, t):
        theta, last, count = carry
        g = jax.grad(f)(theta)
        kick = (jnp.linalg.norm(g) <= threshold) & (t - last > interval)
        xi = uniform_ball(jax.random.fold_in(key, t), dim, radius, theta.dtype)
        theta = jnp.where(kick, theta + xi, theta)
        loss, g = vg(theta)
        new = (theta - lr * g, jnp.where(kick, t, last), count + kick)
        return new, (loss, jnp.linalg.norm(g), theta)

    init = (theta0, jnp.asarray(-interval - 1), jnp.asarray(0))
    (theta, _, count), (losses, norms, thetas) = jax.lax.scan(step, init, jnp.arange(steps))
    return _finish(loss_fn, theta, unravel, losses, norms, thetas, record_path, count)


def _second_order_run(step_fn, loss_fn, params, steps, record_path) -> OptimizerRun:
    theta0, unravel = ravel_pytree(params)

    def step(theta, _):
        out = step_fn(unravel(theta))
        new, _ = ravel_pytree(out.params)
        return new, (out.loss, out.grad_norm, theta)

    theta, (losses, norms, thetas) = jax.lax.scan(step, theta0, None, length=steps)
    return _finish(loss_fn, theta, unravel, losses, norms, thetas, record_path, 0)


def saddle_free_newton(loss_fn: LossFn, params: Params, steps: int,
                       damping: float | Sequence[float] = 0.0, krylov_dim: int | None = None,
                       record_path: bool = False) -> OptimizerRun:
    """``steps`` saddle-free Newton steps in ``lax.scan``: dense (:func:`saddle_free_newton_step`)
    or, with ``krylov_dim`` k, in the Krylov subspace (:func:`saddle_free_newton_krylov_step`).

    ``damping`` is a float or a tuple (per-step choice of the lowest loss); it must be hashable
    when this is jitted with static arguments, so pass tuples, not lists.
    """
    if krylov_dim is None:
        step_fn = lambda p: saddle_free_newton_step(loss_fn, p, damping)
    else:
        step_fn = lambda p: saddle_free_newton_krylov_step(loss_fn, p, krylov_dim, damping)
    return _second_order_run(step_fn, loss_fn, params, steps, record_path)


def newton(loss_fn: LossFn, params: Params, steps: int, damping: float | Sequence[float] = 0.0,
           record_path: bool = False) -> OptimizerRun:
    """``steps`` dense Newton steps (:func:`newton_step`) in ``lax.scan``."""
    return _second_order_run(lambda p: newton_step(loss_fn, p, damping), loss_fn, params, steps,
                             record_path)


# --------------------------------------------------------------------------- summaries


def escape_step(losses, reference, drop) -> np.ndarray:
    """First step at which the loss is below ``reference − drop`` (−1 if it never is).

    Works on a curve (T+1,) or a batch (..., T+1) with a matching ``reference``; the usual
    choice is the loss of the saddle and a ``drop`` of a small fraction of it.
    """
    losses = np.asarray(losses, dtype=float)
    below = losses < (np.asarray(reference, dtype=float)[..., None] - drop)
    first = np.argmax(below, axis=-1)
    return np.where(below.any(axis=-1), first, -1)
