r"""Newton-MR: a critical-point finder that needs only Hessian-vector products.

:func:`crit.critical.newton_critical_point` forms and diagonalizes the dense Hessian every
iteration, which stops at a few thousand parameters. Newton-MR (Roosta, Liu, Wright & Xu
2022) replaces the eigendecomposition by a Krylov solve: at iterate :math:`\theta_k` with
gradient :math:`g_k` and Hessian :math:`H_k` (only ever applied to vectors),

.. math:: p_k \approx \arg\min_p \lVert H_k p + g_k \rVert, \qquad
          \theta_{k+1} = \theta_k + t_k p_k,

where the least-squares sub-problem is solved inexactly by MINRES (:func:`minres`, Paige &
Saunders 1975), which works for symmetric *indefinite* and *singular* :math:`H_k`, and the
step size :math:`t_k` is a line search on the merit :math:`\lVert g(\theta) \rVert`, not on
the loss. Because the merit is the gradient norm, Newton-MR is attracted to critical points of
any index -- saddles included -- like the exact finder, and converges quadratically near a
non-degenerate one (and superlinearly near degenerate ones whose null space does not meet the
gradient, Roosta et al. 2022, sec. 3).

Cost per iteration: one linearization of the gradient (:func:`crit.hessian.hvp_operator`,
about one gradient), at most ``minres_iters`` products through it, and one gradient per
trial step size. Memory: a few vectors of length P (no P x P matrix). Everything runs in
``lax.while_loop`` with a fixed trip bound, so the finder is ``jit``- and ``vmap``-able over
initializations, like the exact one.

References
----------
- F. Roosta, Y. Liu, P. Xu, M. W. Mahoney (2022). Newton-MR: inexact Newton method with
  minimum residual sub-problem solver. EURO J. Comput. Optim. 10, 100035 (arXiv:1810.00303).
- C. C. Paige, M. A. Saunders (1975). Solution of sparse indefinite systems of linear
  equations. SIAM J. Numer. Anal. 12(4).
- S.-C. T. Choi, C. C. Paige, M. A. Saunders (2011). MINRES-QLP: a Krylov subspace method for
  indefinite or singular symmetric systems. SIAM J. Sci. Comput. 33(4).
- Y. N. Dauphin et al. (2014). Identifying and attacking the saddle point problem in
  high-dimensional non-convex optimization. NeurIPS (the merit-based line search).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from crit.critical import FinderResult
from crit.hessian import full_batch_hvp_operator, hvp_operator

Array = jax.Array
Params = Any

#: Trial step sizes t, all evaluated at once; the one with the smallest ‖g(θ + t p)‖ wins.
STEP_GRID = (1.0, 0.5, 0.25, 0.1, 0.03, 0.01, 1e-3)


class MinresResult(NamedTuple):
    """Output of :func:`minres` for ``A x = b``."""

    solution: Array
    """(n,) The MINRES iterate with the smallest residual norm (see :func:`minres`)."""
    residual_norm: Array
    r"""() Its residual :math:`\lVert b - A x \rVert`, with :math:`A x` carried along by the
    recurrence (no extra matvec; accurate to rounding while :math:`\lVert x \rVert` stays
    moderate)."""
    normal_residual_norm: Array
    r"""() Recurrence estimate of :math:`\lVert A (b - A x_{k-1}) \rVert` at the last
    iteration, the least-squares optimality measure (zero at any least-squares solution, also
    of an incompatible system)."""
    iterations: Array
    """() Matvecs used (``<= num_iters``)."""
    converged: Array
    """() bool, a stopping test below was met (else ``num_iters`` ran out)."""


def minres(matvec: Callable[[Array], Array], b: Array, num_iters: int,
           rtol: float = 1e-10) -> MinresResult:
    r"""Minimum-residual solve of the symmetric system :math:`A x = b` from :math:`x_0 = 0`.

    Iterate k returns

    .. math:: x_k = \arg\min_{x \in \mathcal{K}_k(A, b)} \lVert b - A x \rVert_2, \qquad
              \mathcal{K}_k(A, b) = \mathrm{span}\{b, Ab, \dots, A^{k-1} b\},

    by the Lanczos process on :math:`(A, b)` and Givens QR of its tridiagonal (Paige &
    Saunders 1975; the recurrences of SciPy's ``minres`` without preconditioner or shift).
    :math:`A` may be indefinite and singular: the residual norm is non-increasing in k for
    any symmetric :math:`A`, and if :math:`b` is not in the range of :math:`A` the iterates
    approach a least-squares solution (:math:`A r = 0`).

    Parameters
    ----------
    matvec
        Symmetric linear map ``v -> A v`` on flat float64 vectors (e.g. a Hessian-vector
        product from :func:`crit.hessian.hvp_operator`).
    b
        (n,) Right-hand side.
    num_iters
        Static bound on iterations (= matvecs). The loop is a ``lax.while_loop`` that stops at
        convergence; under ``vmap`` finished systems are masked until all are done.
    rtol
        Stop when :math:`\lVert r_k \rVert \le` ``rtol`` :math:`\lVert b \rVert` (compatible
        system) or :math:`\lVert A r_{k-1} \rVert \le` ``rtol`` :math:`\lVert A \rVert_F
        \lVert r_{k-1} \rVert` (least-squares solution of an incompatible one;
        :math:`\lVert A \rVert_F` is estimated from the Lanczos coefficients).

    Returns
    -------
    MinresResult
        The iterate with the smallest *true* residual norm, not necessarily the last one.
        Without reorthogonalization the recurrence residual :math:`\bar\phi_k` can drift
        below the true one; for an incompatible singular system the iterates then grow without
        bound (measured here: :math:`\lVert x \rVert \sim 10^{14}` after ~70 iterations on a
        60 x 60 system) while :math:`\bar\phi_k` still decreases. :math:`A x_k` is therefore
        updated alongside :math:`x_k` (:math:`A w_k` from the same recurrence as
        :math:`w_k`, using :math:`A v_k`, which Lanczos computes anyway), the true residual
        is tracked, and an iterate replaces the best one only if it improves on it by more
        than the rounding bound :math:`10 k \epsilon (\lVert A \rVert_F \max_j \lVert x_j
        \rVert + \lVert b \rVert)`; once that bound exceeds the best residual the loop stops.

    Notes
    -----
    Lanczos breakdown (:math:`\beta_{k+1} \approx 0`: :math:`\mathcal{K}_k` is invariant) ends
    the iteration: then :math:`x_k` solves the system, or, if the projected tridiagonal is
    singular (incompatible :math:`b`), the Givens pivot :math:`\gamma_k` vanishes and the
    last update is skipped, so the returned :math:`x_{k-1}` is a least-squares solution
    (Choi, Paige & Saunders 2011, sec. 2). No reorthogonalization is done (memory stays a few
    vectors of length n): convergence can be delayed on clustered spectra (Greenbaum 1997,
    ch. 4). For an incompatible system the returned least-squares solution has
    :math:`\lVert r \rVert` at the optimum to rounding, which pins :math:`A r` only to about
    :math:`\sqrt{\epsilon}`, and it is not the *minimum-norm* solution (it keeps the
    null-space component of :math:`b`; MINRES-QLP would remove it); Newton-MR's line search
    absorbs both.
    """
    b = jnp.asarray(b, dtype=jnp.float64)
    beta1 = jnp.linalg.norm(b)
    safe = lambda x: jnp.where(x > 0, x, 1.0)  # noqa: E731
    tiny = jnp.finfo(b.dtype).eps
    zeros = jnp.zeros_like(b)
    f64 = lambda x: jnp.asarray(x, dtype=b.dtype)  # noqa: E731
    lanczos0 = (zeros, b / safe(beta1), beta1)  # v_prev, v, beta_k
    search0 = (zeros, zeros, zeros, zeros)  # w_prev, w and their images A w_prev, A w
    rotation0 = (f64(-1.0), f64(0.0), f64(0.0), f64(0.0), beta1)  # cs, sn, dbar, epsln, phibar
    best0 = (zeros, beta1, f64(0.0))  # best iterate, its true residual, max ||x|| so far
    init = (jnp.asarray(0), beta1 == 0, lanczos0, search0, rotation0, zeros, zeros, best0,
            f64(0.0), f64(0.0))

    def cond(s):
        return (s[0] < num_iters) & ~s[1]

    def body(s):
        k, _, (v_prev, v, beta), (w_prev, w, aw_prev, aw), rot, x, ax, best, _, tnorm2 = s
        cs, sn, dbar, epsln, phibar = rot
        # Lanczos step: beta_next v_next = A v - alpha v - beta v_prev.
        av = matvec(v)
        alpha = jnp.dot(v, av)
        y = av - alpha * v - beta * v_prev
        beta_next = jnp.linalg.norm(y)
        tnorm2 = tnorm2 + alpha**2 + beta**2 + beta_next**2
        anorm = jnp.sqrt(tnorm2)
        # Apply the previous rotation to the new column of T, then make the next one.
        oldeps = epsln
        delta = cs * dbar + sn * alpha
        gbar = sn * dbar - cs * alpha
        epsln = sn * beta_next
        dbar = -cs * beta_next
        arnorm = phibar * jnp.hypot(gbar, dbar)  # ||A r_{k-1}||
        gamma = jnp.hypot(gbar, beta_next)
        singular = gamma <= tiny * anorm  # T_k singular: x_{k-1} is already least-squares
        gamma = jnp.where(singular, 1.0, gamma)
        cs, sn = gbar / gamma, beta_next / gamma
        phi = cs * phibar
        w_new = (v - oldeps * w_prev - delta * w) / gamma
        aw_new = (av - oldeps * aw_prev - delta * aw) / gamma  # = A w_new, no extra matvec
        x = jnp.where(singular, x, x + phi * w_new)
        ax = jnp.where(singular, ax, ax + phi * aw_new)
        phibar = jnp.where(singular, phibar, sn * phibar)
        # Once Lanczos loses orthogonality the recurrence residual phibar drifts from the
        # true one (for incompatible systems x can then grow without bound), so the iterate
        # with the smallest true residual ||b - A x|| is kept. A x is carried along (exact in
        # exact arithmetic); `noise` bounds its rounding error, and an iterate counts as
        # better only by more than that. When noise exceeds the best residual, no further
        # improvement can be certified and the loop stops.
        true_res = jnp.linalg.norm(b - ax)
        xmax = jnp.maximum(best[2], jnp.linalg.norm(x))
        noise = 10.0 * (k + 1) * tiny * (anorm * xmax + beta1)
        better = true_res + noise < best[1]
        best = (jnp.where(better, x, best[0]), jnp.where(better, true_res, best[1]), xmax)
        breakdown = beta_next <= tiny * anorm
        v_next = y / safe(beta_next)
        done = (singular | breakdown | (phibar <= rtol * beta1)
                | (arnorm <= rtol * anorm * phibar) | (noise > best[1]))
        return (k + 1, done, (v, v_next, beta_next), (w, w_new, aw, aw_new),
                (cs, sn, dbar, epsln, phibar), x, ax, best, arnorm, tnorm2)

    s = jax.lax.while_loop(cond, body, init)
    (x_best, res_best, _), arnorm = s[7], s[8]
    return MinresResult(x_best, res_best, arnorm, s[0], s[1])


class BatchedLoss(NamedTuple):
    """The loss as a mean over data batches, for HVPs whose memory must not grow with N.

    ``batch_loss_fn(params, xb, yb)`` is the mean loss over a batch (plus any data-independent
    penalty), as :attr:`crit.problems.Problem.batch_loss_fn`; gradients and HVPs are summed
    over batches of ``batch_size`` rows of ``(x, y)`` with exact weights n_b/N (HVPs by
    :func:`crit.hessian.full_batch_hvp_operator`, gradients by a scan over the batches).
    """

    batch_loss_fn: Callable
    x: Array
    y: Array
    batch_size: int


def _batched_grad(bl: BatchedLoss, unravel):
    """theta -> full-data gradient, accumulated over batches with weights n_b / N."""
    n = bl.x.shape[0]
    size = min(bl.batch_size, n)
    n_full = n // size
    xs = bl.x[: n_full * size].reshape(n_full, size, *bl.x.shape[1:])
    ys = bl.y[: n_full * size].reshape(n_full, size, *bl.y.shape[1:])
    x_tail, y_tail = bl.x[n_full * size:], bl.y[n_full * size:]

    def grad_f(theta):
        def batch(xb, yb):
            return jax.grad(lambda t: bl.batch_loss_fn(unravel(t), xb, yb))(theta)

        def add(total, xy):
            return total + batch(*xy), None

        g = jax.lax.scan(add, jnp.zeros_like(theta), (xs, ys))[0] * (size / n)
        if x_tail.shape[0]:
            g = g + batch(x_tail, y_tail) * (x_tail.shape[0] / n)
        return g

    return grad_f


def _operators(loss_fn, unravel, hvp_batch: Optional[BatchedLoss]):
    """(grad_f, point): the flat gradient, and theta -> (g, matvec) at one point."""
    if hvp_batch is None:
        f = lambda t: loss_fn(unravel(t))  # noqa: E731
        return jax.grad(f), lambda t: hvp_operator(f, t)
    bl = hvp_batch

    def point(theta):
        return full_batch_hvp_operator(bl.batch_loss_fn, unravel(theta), bl.x, bl.y,
                                       bl.batch_size)

    return _batched_grad(bl, unravel), point


def newton_mr_critical_point(loss_fn: Callable[[Params], Array], params: Params,
                             max_iters: int = 30, minres_iters: int = 50,
                             grad_tol: float = 1e-8, patience: int = 10,
                             min_progress: float = 0.5,
                             hvp_batch: Optional[BatchedLoss] = None, *,
                             minres_rtol: float = 1e-10,
                             step_grid=STEP_GRID) -> FinderResult:
    r"""Drive ``params`` to a critical point of ``loss_fn`` with Newton-MR, HVPs only.

    Iteration k (Roosta et al. 2022, Alg. 1 with the merit :math:`\lVert g \rVert`):

    1. linearize the gradient once at :math:`\theta_k`: :math:`g_k` and :math:`v \mapsto H_k v`;
    2. :math:`p_k` = ``minres(H_k, -g_k)`` (:func:`minres`, ``minres_iters`` products);
    3. evaluate :math:`\lVert g(\theta_k + t p_k) \rVert` for every :math:`t` in
       ``step_grid`` at once and keep the smallest; accept the step only if it lowers
       :math:`\lVert g \rVert` (otherwise stop: stalled).

    Parameters
    ----------
    loss_fn, params
        Scalar full-batch loss over a parameter pytree, and the starting point.
    max_iters
        Newton iterations at most; each costs one linearization, at most ``minres_iters``
        HVPs and ``len(step_grid)`` gradients.
    minres_iters
        MINRES iterations (HVPs) per Newton step. Near a critical point the step needs
        :math:`H^\dagger g` accurately on the eigen-directions that ``g`` excites; for a
        P-parameter net, ``minres_iters >= P`` makes the solve exact up to rounding.
    grad_tol
        Stop once :math:`\lVert g \rVert \le` ``grad_tol / 100`` (a margin under the
        certificate's threshold, as in :func:`crit.critical.newton_critical_point`).
    patience, min_progress
        Stop as stalled when :math:`\lVert g \rVert` has not fallen below ``min_progress``
        times its value ``patience`` iterations earlier.
    hvp_batch
        ``None``: gradients and HVPs of ``loss_fn`` itself, all products sharing one
        linearization per iteration (fastest). A :class:`BatchedLoss`: gradients and HVPs
        summed over data batches instead (memory bounded by one batch; each HVP is then a
        fresh forward-over-reverse pass per batch, about twice the cost). ``loss_fn`` is
        then not evaluated at all, so both must describe the same loss.
    minres_rtol
        MINRES relative tolerance (inexactness of the Newton step).
    step_grid
        Trial step sizes, evaluated in one ``vmap``.

    Returns
    -------
    crit.critical.FinderResult
        ``params`` (the last accepted iterate), ``grad_norm``, ``iterations`` (Newton
        iterations run) and ``history`` (``(max_iters,)`` gradient norm after each iteration,
        NaN after the stop).

    Notes
    -----
    The step solves :math:`\min_p \lVert H p + g \rVert`. Where :math:`H` is singular and
    :math:`g` has a component in its null space (no exact Newton step exists, e.g. away from
    a critical point along a symmetry), MINRES returns a least-squares step whose norm can be
    large; the line search on :math:`\lVert g \rVert` then picks a small ``t`` or rejects it.
    """
    theta0, unravel = ravel_pytree(params)
    theta0 = jnp.asarray(theta0, dtype=jnp.float64)
    grad_f, point = _operators(loss_fn, unravel, hvp_batch)
    ts = jnp.asarray(step_grid, dtype=theta0.dtype)
    target = grad_tol / 100.0

    def cond(state):
        i, _, gnorm, stalled, _ = state
        return (i < max_iters) & (gnorm > target) & ~stalled & jnp.isfinite(gnorm)

    def body(state):
        i, theta, gnorm, _, hist = state
        g, matvec = point(theta)
        p = minres(matvec, -g, minres_iters, minres_rtol).solution
        news = theta[None, :] + ts[:, None] * p[None, :]
        norms = jax.vmap(lambda t: jnp.linalg.norm(grad_f(t)))(news)
        norms = jnp.where(jnp.isfinite(norms), norms, jnp.inf)
        best = jnp.argmin(norms)
        accept = norms[best] < gnorm
        theta = jnp.where(accept, news[best], theta)
        gnorm = jnp.where(accept, norms[best], gnorm)
        hist = hist.at[i].set(gnorm)
        before = jnp.where(i >= patience, hist[jnp.maximum(i - patience, 0)], jnp.inf)
        slow = gnorm > min_progress * before
        return i + 1, theta, gnorm, ~accept | slow, hist

    g0 = jnp.linalg.norm(grad_f(theta0))
    hist = jnp.full((max_iters,), jnp.nan, dtype=theta0.dtype)
    state = (jnp.asarray(0), theta0, g0, jnp.asarray(False), hist)
    i, theta, gnorm, _, hist = jax.lax.while_loop(cond, body, state)
    return FinderResult(unravel(theta), gnorm, i, hist)
