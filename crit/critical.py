"""Critical-point finders and the certificate that decides what a point is.

Two finders, each written for one initialization (``vmap`` them over many):

* :func:`newton_critical_point` -- Levenberg-Marquardt on the equation g(θ) = ∇L(θ) = 0 with the
  exact Hessian as its Jacobian. With H = U diag(λ) Uᵀ, the step for damping μ ≥ 0 is

      p(μ) = −U diag(λ / (λ² + μ)) Uᵀ g          (μ = 0: the pseudo-inverse Newton step),

  the Gauss-Newton step for ½‖g‖². As in Dauphin et al. (2014) the damping is chosen at every
  iteration from a grid, keeping the candidate with the smallest ‖g(θ + p(μ))‖; a step is taken
  only if it lowers ‖g‖ (a line search on the merit ‖g‖). Newton on g = 0 is attracted to critical
  points of any index -- saddles included -- and converges quadratically near a non-degenerate one.
* :func:`gradient_norm_descent` -- the course homework's method: minimize ½‖g(θ)‖² with Adam; its
  gradient is H·g, one Hessian-vector product per step. Frye et al. (2021, Neural Computation)
  show it often stalls at *gradient-flat* points where g is near the kernel of H but g ≠ 0.

:func:`certify` labels a point. It is ``critical`` only if the full-batch gradient norm is at most
``grad_tol``; otherwise ``diverged`` (non-finite), ``gradient_flat`` (‖Hg‖ ≤ flat_tol·‖H‖‖g‖) or
``not_converged``. Labels are never used to drop a point: callers keep every row.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from crit.hessian import dense_hessian, flat_loss
from crit.train import tree_norm

Params = Any

STATUSES = ("critical", "not_converged", "gradient_flat", "diverged")
CRITICAL, NOT_CONVERGED, GRADIENT_FLAT, DIVERGED = range(4)
FINDERS = ("newton", "gradnorm")

# Levenberg-Marquardt damping grid, in units of λ_max²; 0 is the pseudo-inverse Newton step.
DAMPING_GRID = (0.0, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)


class FinderResult(NamedTuple):
    """Where a finder stopped: the point, its gradient norm, and how it got there.

    ``history`` holds ‖g‖ after each iteration (NaN after the finder stopped); ``iterations`` is
    the number of iterations (Newton) or optimizer steps (gradient-norm descent) taken.
    """

    params: Params
    grad_norm: jax.Array
    iterations: jax.Array
    history: jax.Array


class Certificate(NamedTuple):
    """The verdict on a point: status code (index into :data:`STATUSES`) and its evidence."""

    status: jax.Array
    loss: jax.Array
    grad_norm: jax.Array
    flatness: jax.Array  # ‖Hg‖ / (‖H‖ ‖g‖): small means g lies near the kernel of H


def _flat_grad_norm(grad_f, theta):
    g = grad_f(theta)
    return jnp.linalg.norm(g)


def newton_critical_point(loss_fn: Callable[[Params], jax.Array], params: Params,
                          max_iters: int = 30, grad_tol: float = 1e-8,
                          damping_grid=DAMPING_GRID, rcond: float = 1e-13,
                          patience: int = 6, min_progress: float = 0.6) -> FinderResult:
    """Drive ``params`` to a critical point of ``loss_fn`` by damped Newton on ∇L = 0.

    Parameters
    ----------
    loss_fn, params : scalar loss over a parameter pytree and the starting point.
    max_iters : iteration cap; each iteration costs one dense Hessian (P HVPs), one ``eigh``
        and ``len(damping_grid)`` gradients.
    grad_tol : stop once ‖g‖ ≤ grad_tol / 100 (a margin under the certificate's threshold).
    damping_grid : damping values μ in units of λ_max(H)²; the best one is taken each step.
    rcond : eigenvalues with |λ| ≤ rcond·max|λ| are treated as zero by the μ = 0 step.
    patience, min_progress : stop as stalled when ‖g‖ has not fallen below
        ``min_progress`` times its value ``patience`` iterations earlier. Near a non-degenerate
        critical point Newton squares the error every step, so slow progress means there is no
        critical point within reach (typically a long, ill-conditioned valley).

    Returns
    -------
    FinderResult. The loop also stops when no candidate lowers ‖g‖ (stalled).
    """
    f, theta0, unravel = flat_loss(loss_fn, params)
    grad_f = jax.grad(f)
    mus = jnp.asarray(damping_grid, dtype=theta0.dtype)
    target = grad_tol / 100.0

    def candidate(theta, g):
        lam, u = jnp.linalg.eigh(dense_hessian(f, theta))
        scale = jnp.max(jnp.abs(lam))
        gt = u.T @ g
        big = jnp.abs(lam) > rcond * scale

        def step(mu):
            pinv = jnp.where(big, 1.0 / jnp.where(big, lam, 1.0), 0.0)
            damped = lam / (lam ** 2 + mu * scale ** 2)
            coef = jnp.where(mu == 0, pinv, damped)
            new = theta - u @ (coef * gt)
            return new, _flat_grad_norm(grad_f, new)

        news, norms = jax.vmap(step)(mus)
        norms = jnp.where(jnp.isfinite(norms), norms, jnp.inf)
        best = jnp.argmin(norms)
        return news[best], norms[best]

    def cond(state):
        i, _, gnorm, stalled, _ = state
        return (i < max_iters) & (gnorm > target) & ~stalled & jnp.isfinite(gnorm)

    def body(state):
        i, theta, gnorm, _, hist = state
        new, new_norm = candidate(theta, grad_f(theta))
        accept = new_norm < gnorm
        theta = jnp.where(accept, new, theta)
        gnorm = jnp.where(accept, new_norm, gnorm)
        hist = hist.at[i].set(gnorm)
        before = jnp.where(i >= patience, hist[jnp.maximum(i - patience, 0)], jnp.inf)
        slow = gnorm > min_progress * before
        return i + 1, theta, gnorm, ~accept | slow, hist

    g0 = _flat_grad_norm(grad_f, theta0)
    hist = jnp.full((max_iters,), jnp.nan, dtype=theta0.dtype)
    state = (jnp.asarray(0), theta0, g0, jnp.asarray(False), hist)
    i, theta, gnorm, _, hist = jax.lax.while_loop(cond, body, state)
    return FinderResult(unravel(theta), gnorm, i, hist)


def gradient_norm_descent(loss_fn: Callable[[Params], jax.Array], params: Params,
                          num_steps: int = 1000, learning_rate: float = 1e-3,
                          grad_tol: float = 1e-8, log_every: int = 1) -> FinderResult:
    """Minimize ½‖∇L(θ)‖² with Adam (the homework method); returns the best iterate.

    The gradient of ½‖g‖² is H·g, computed as one ``jvp`` through the linearized gradient.
    Iterates stop moving once ‖g‖ ≤ grad_tol / 100. The returned point is the iterate with the
    smallest ‖g‖ seen, and ``history`` is ‖g‖ every ``log_every`` steps.
    """
    f, theta0, unravel = flat_loss(loss_fn, params)
    grad_f = jax.grad(f)
    opt = optax.adam(learning_rate)
    target = grad_tol / 100.0

    def step(carry, _):
        theta, state, best, best_norm, n_taken = carry
        g, hvp_lin = jax.linearize(grad_f, theta)
        gnorm = jnp.linalg.norm(g)
        better = gnorm < best_norm
        best = jnp.where(better, theta, best)
        best_norm = jnp.where(better, gnorm, best_norm)
        active = (gnorm > target) & jnp.isfinite(gnorm)
        updates, new_state = opt.update(hvp_lin(g), state, theta)
        theta = jnp.where(active, theta + updates, theta)
        state = jax.tree.map(lambda a, b: jnp.where(active, a, b), new_state, state)
        return (theta, state, best, best_norm, n_taken + active), gnorm

    carry = (theta0, opt.init(theta0), theta0, jnp.asarray(jnp.inf, theta0.dtype),
             jnp.asarray(0))
    (theta, _, best, best_norm, n_taken), norms = jax.lax.scan(step, carry, None,
                                                                length=num_steps)
    last = _flat_grad_norm(grad_f, theta)
    take_last = last < best_norm
    best = jnp.where(take_last, theta, best)
    best_norm = jnp.where(take_last, last, best_norm)
    return FinderResult(unravel(best), best_norm, n_taken, norms[::log_every])


def certify(loss_fn: Callable[[Params], jax.Array], params: Params, hessian_norm: jax.Array,
            grad_tol: float, flat_tol: float = 1e-3) -> Certificate:
    """Label a point: critical iff ‖∇L‖ ≤ grad_tol (and everything is finite).

    ``hessian_norm`` is ‖H‖₂ = max|λ| at the point (from its spectrum). The gradient-flat test of
    Frye et al. (2021) is ‖H g‖ ≤ flat_tol · ‖H‖ ‖g‖, applied only to points that are not critical.
    """
    loss, g = jax.value_and_grad(loss_fn)(params)
    gnorm = tree_norm(g)
    hg = jax.jvp(jax.grad(loss_fn), (params,), (g,))[1]
    flatness = tree_norm(hg) / (hessian_norm * gnorm)
    finite = (jnp.isfinite(loss) & jnp.isfinite(gnorm) & jnp.isfinite(hessian_norm)
              & jnp.all(jnp.asarray([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(params)])))
    status = jnp.where(~finite, DIVERGED,
                       jnp.where(gnorm <= grad_tol, CRITICAL,
                                 jnp.where(flatness <= flat_tol, GRADIENT_FLAT, NOT_CONVERGED)))
    return Certificate(status, loss, gnorm, flatness)


def find_critical_point(loss_fn: Callable[[Params], jax.Array], params: Params,
                        finder: str = "newton", grad_tol: float = 1e-8, **kwargs) -> FinderResult:
    """Run the named finder (``"newton"`` or ``"gradnorm"``) from ``params`` on any loss."""
    if finder == "newton":
        return newton_critical_point(loss_fn, params, grad_tol=grad_tol, **kwargs)
    if finder == "gradnorm":
        return gradient_norm_descent(loss_fn, params, grad_tol=grad_tol, **kwargs)
    raise ValueError(f"unknown finder {finder!r}; allowed: {list(FINDERS)}")
