r"""Saddle or minimum *of the critical point near θ*: a margin for the distance to it.

crit certifies a point θ as critical when :math:`\lVert\nabla L(\theta)\rVert \le` ``grad_tol``
(1e-8), and :mod:`crit.verdict` proves statements about the Hessian **at θ**: "H(θ) has a
negative eigenvalue" follows from :math:`y^\top H(\theta) y + \delta < 0` for a unit y
(Courant–Fischer), with the rounding allowance :math:`\delta = P\epsilon\max|\lambda|`
(≈ 1e-15). That is a proof, and it stays one (``Verdict.negative_proven``).

The scientific question is about the critical point :math:`\theta^*` (∇L = 0) that θ
approximates, and :math:`H(\theta^*) \ne H(\theta)`. Weyl's inequality (Courant–Fischer
applied to :math:`H(\theta^*) = H(\theta) + E`) gives, for every i,

.. math:: |\lambda_i(H(\theta^*)) - \lambda_i(H(\theta))| \le \lVert E \rVert_2,
          \qquad E = H(\theta^*) - H(\theta) = \nabla^3 L(\theta)[\theta^* - \theta]
          + O(\lVert\theta^* - \theta\rVert^2).

Near a manifold of critical points (a valley of minima, any symmetry) the eigenvalue that is
zero at :math:`\theta^*` is :math:`O(\lVert\nabla L\rVert)` at θ, of either sign, and a
τ ≈ 1e-15 classifies the noise of the distance. The lecture toy :math:`(1 - w_1 w_2)^2`
(:mod:`crit.toy`) 3e-9 outside its valley of global minima (loss 9e-18, ‖∇L‖ = 8.5e-9) has
eigenvalues −6.0e-9 and 4: "saddle (proven)" at τ = 1.8e-15 -- a true statement about H(θ), a
false one about the point it approximates, which is a degenerate minimum.

**The estimate.** The Newton step :math:`s \approx -H(\theta)^{+} g` (:func:`crit.newton_mr.minres`
on :math:`H s = -g`: the minimum-residual step, from :math:`x_0 = 0` in the Krylov space of g,
so it has no component in the null space of H that g does not excite) reaches ∇L = 0 to first
order, :math:`\theta^* \approx \theta + s`. For the eigenvalue λ of interest with unit
(Ritz or eigen) vector y, first-order perturbation theory gives
:math:`\lambda(\theta^*) - \lambda(\theta) \approx y^\top E y`, and one more Hessian-vector
product measures

.. math:: \Delta = y^\top H(\theta + s) y - y^\top H(\theta) y, \qquad
          \texttt{curvature\_shift} = |\Delta|.

**The rule.** ``margin`` :math:`m = 2|\Delta|`, and a sign counts for the critical point only
when :math:`|\lambda| > \delta + m` (:func:`critical_point_verdict`). Why twice the shift:
then the extrapolated eigenvalue :math:`\lambda^* \approx \lambda + \Delta` keeps the sign of
λ and clears δ by more than the size of the correction itself,
:math:`|\lambda + \Delta| \ge |\lambda| - |\Delta| > \delta + |\Delta|` -- a 100% allowance for
what the first-order estimate leaves out (the :math:`O(\lVert s\rVert^2)` terms, an inexact
MINRES step, θ + s itself not exactly critical). A margin of :math:`|\Delta|` alone is not
enough exactly where it matters: at a degenerate :math:`\theta^*`,
:math:`\lambda(\theta) = -\Delta` to first order, and the comparison
:math:`\lambda + |\Delta| + \delta < 0` is decided by rounding at the level of δ. On
:math:`L = z^4 + x^2` at z = 1e-3 (λ_z = 1.2e-5 > 0, a degenerate minimum at z = 0), the
Newton step lands at 2z/3 and :math:`|\Delta| = \tfrac59\lambda_z`: the shift alone would
keep "minimum", twice the shift says ``degenerate``. For :math:`z^{2k}` the ratio
:math:`|\Delta|/\lambda` tends to :math:`1 - e^{-1} > 1/2`, so the rule holds for every order
of degeneracy along y.

A point with :math:`\nabla L = 0` exactly gets s = 0 and margin 0: the verdict at θ is then the
verdict at the critical point. At a non-degenerate critical point the margin is
:math:`O(\lVert\nabla L\rVert)` and vanishes with refinement (the toy's saddle at the origin:
eigenvalues ±2, margin ~ 1e-13 after Newton), so true saddles and minima keep their verdict.

``ratio`` :math:`|y^\top H(\theta) y| / \lVert\nabla L\rVert` is the same question asked
without a model: an eigenvalue of the size of the gradient (ratio O(1), as on the toy's
valley) is what a nearby degenerate point produces; a true saddle or minimum refined to
‖∇L‖ = 1e-12 has ratio ~1e12.

**What is proven and what is estimated.** The margin is an ESTIMATE, not a bound: the true
:math:`\theta^*` is unknown, the Taylor remainder is not bounded, and only the eigenvalue of y
is tracked (an eigenvalue close to it that moves more, or the full :math:`\lVert E\rVert` of
Weyl's bound, is not measured). Only the statement about H(θ) -- ``negative_proven``,
``lambda_min_bound`` -- is a proof. A verdict about the critical point that clears the margin
is as strong as the estimate; one that does not is reported as ``degenerate``: the
second-order test at this precision cannot decide.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from crit.newton_mr import BatchedLoss, _operators, minres
from crit.verdict import DEGENERATE, MINIMUM, SADDLE_PROVEN, Verdict

Array = jax.Array
Params = Any

#: margin = MARGIN_FACTOR · curvature_shift (module docstring: why 2).
MARGIN_FACTOR = 2.0


class NearbyMargin(NamedTuple):
    """How far the critical point near θ may move the curvature along y (module docstring)."""

    step_norm: Array
    r""":math:`\lVert s\rVert`, :math:`s \approx -H^{+}g` from MINRES (the minimum-residual step
    toward ∇L = 0)."""
    curvature_shift: Array
    r""":math:`|y^\top H(\theta+s) y - y^\top H(\theta) y|` (y unit)."""
    margin: Array
    r"""The allowance a sign must clear on top of δ: ``MARGIN_FACTOR * curvature_shift``
    (0 where ∇L = 0). An estimate, not a bound."""
    grad_norm: Array
    r""":math:`\lVert\nabla L(\theta)\rVert`."""
    ratio: Array
    r""":math:`|y^\top H(\theta) y| / \lVert\nabla L\rVert` (inf where ∇L = 0)."""


def _unit(v: Array) -> Array:
    n = jnp.linalg.norm(v)
    return v / jnp.where(n > 0, n, 1.0)


def nearby_margins(loss_fn: Callable[[Params], Array], params: Params, directions: Array, *,
                   minres_iters: int = 50, minres_tol: float = 1e-12,
                   hvp_batch: Optional[BatchedLoss] = None,
                   step_matvec: Optional[Callable[[Array], Array]] = None) -> NearbyMargin:
    """:func:`nearby_margin` for the rows of ``directions`` (k, P) at once: one Newton step,
    2k Hessian-vector products. Fields ``curvature_shift``, ``margin``, ``ratio`` have shape
    (k,); ``step_norm`` and ``grad_norm`` are scalars."""
    params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params)
    theta, unravel = ravel_pytree(params)
    _, point = _operators(loss_fn, unravel, hvp_batch)
    g, matvec = point(theta)
    gnorm = jnp.linalg.norm(g)
    s = minres(matvec if step_matvec is None else step_matvec, -g, minres_iters,
               minres_tol).solution
    s = jnp.where(jnp.all(jnp.isfinite(s)), s, jnp.full_like(s, jnp.inf))
    _, matvec_s = point(theta + jnp.where(jnp.isfinite(s), s, 0.0))
    ys = jax.vmap(_unit)(jnp.asarray(directions, jnp.float64).reshape(-1, theta.shape[0]))
    r0 = jnp.sum(ys * jax.vmap(matvec)(ys), axis=1)
    r1 = jnp.sum(ys * jax.vmap(matvec_s)(ys), axis=1)
    step = jnp.linalg.norm(s)
    zero = gnorm == 0  # then s = 0 (MINRES with b = 0) and the point is its own critical point
    shift = jnp.where(zero, 0.0, jnp.abs(r1 - r0))
    shift = jnp.where(jnp.isfinite(step), shift, jnp.inf)
    ratio = jnp.where(zero, jnp.inf, jnp.abs(r0) / jnp.where(zero, 1.0, gnorm))
    return NearbyMargin(step_norm=jnp.where(zero, 0.0, step), curvature_shift=shift,
                        margin=MARGIN_FACTOR * shift, grad_norm=gnorm, ratio=ratio)


def nearby_margin(loss_fn: Callable[[Params], Array], params: Params, direction: Array, *,
                  minres_iters: int = 50, minres_tol: float = 1e-12,
                  hvp_batch: Optional[BatchedLoss] = None,
                  step_matvec: Optional[Callable[[Array], Array]] = None) -> NearbyMargin:
    r"""The margin for the curvature along ``direction`` at the critical point near ``params``.

    Parameters
    ----------
    loss_fn
        ``params -> scalar``, a loss over a parameter pytree (crit's convention); evaluated in
        float64.
    params
        The (approximately) critical point θ.
    direction
        Flat vector y of length P in ``ravel_pytree`` order (normalized here): the eigenvector
        of :math:`\lambda_{\min}` (dense) or the smallest Ritz vector
        (``KrylovSpectrum.escape_direction``).
    minres_iters, minres_tol
        MINRES iterations (HVPs) and relative tolerance of the Newton step
        :math:`H s = -g`; ``minres_iters >= P`` makes it exact up to rounding.
    hvp_batch
        Optional :class:`crit.newton_mr.BatchedLoss`: gradients and HVPs summed over data
        batches (memory of one batch), as in Newton-MR.
    step_matvec
        Optional cheaper operator for the MINRES step only (e.g. the float32 HVP of a
        low-precision search, :func:`crit.analysis.search_operator`): the step is part of an
        estimate, while both curvatures :math:`y^\top H y` stay float64.

    Returns
    -------
    NearbyMargin
        Pure with static sizes: ``jit`` and ``vmap`` compose with it. Cost: one
        linearization and ``minres_iters`` HVPs at θ, one linearization and one HVP at θ + s,
        one more HVP at θ.
    """
    m = nearby_margins(loss_fn, params, jnp.reshape(direction, (1, -1)),
                       minres_iters=minres_iters, minres_tol=minres_tol, hvp_batch=hvp_batch,
                       step_matvec=step_matvec)
    return m._replace(curvature_shift=m.curvature_shift[0], margin=m.margin[0],
                      ratio=m.ratio[0])


def critical_point_verdict(verdict: Verdict, margin) -> Verdict:
    r"""The verdict about the critical point near θ, from the verdict about H(θ).

    ``margin`` is a :class:`NearbyMargin` or the margin itself (an array or float). With r the
    smallest Ritz value (dense: :math:`\lambda_{\min}`), δ the allowance and m the margin:

    * ``saddle_proven`` stays only if :math:`r + \delta + m < 0`, else ``degenerate``;
    * ``minimum`` (dense) stays only if :math:`r - \delta - m > 0`, else ``degenerate``;
    * every other code (``degenerate``, ``no_negative_found``, ``not_critical``) as it was.

    For a Krylov verdict ``degenerate`` means: the smallest Ritz value is negative at θ, but
    within δ + m of zero, so the sign at the critical point is not decided (and, as for every
    Krylov verdict, an eigenvalue that Lanczos did not find is not excluded).
    ``negative_proven``, ``lambda_min_bound`` and the other fields -- the statements about
    H(θ) -- are unchanged; ``margin`` is recorded in the verdict.
    """
    m = jnp.asarray(getattr(margin, "margin", margin), jnp.float64)
    r, delta = verdict.ritz_value, verdict.allowance
    code = verdict.code
    code = jnp.where((code == SADDLE_PROVEN) & ~(r + delta + m < 0.0), DEGENERATE, code)
    code = jnp.where((code == MINIMUM) & ~(r - delta - m > 0.0), DEGENERATE, code)
    return verdict._replace(code=code.astype(jnp.int32), margin=m)
