r"""Certify the top of a minimum energy path: is it a saddle of index one?

The mountain-pass theorem says that the highest point of the lowest path between two strict
minima is a critical point, and of index one when it is non-degenerate. A band
(:mod:`crit.paths`) only approximates that point: its climbing image has a small but nonzero
gradient. :func:`certify_top` turns the climbing image into a claim with evidence:

1. **Refine.** For P ≤ ``dense_max_params``: a few steps of :func:`eigenvector_following`
   (uphill along the softest Hessian mode, downhill along the others, inside a trust radius of
   a tenth of the image spacing), which brings a climbing image that is still far from the
   saddle on a flat loss into Newton's basin, then the existing damped Newton finder on ∇L = 0
   (:func:`crit.critical.newton_critical_point`). Above that P:
   :func:`crit.newton_mr.newton_mr_critical_point` with Hessian-vector products. Newton is
   attracted to critical points of any index; ``displacement`` reports how far the refined
   point is from the climbing image, so a refinement that wandered off the path shows.
2. **Certify** :math:`\lVert\nabla L(\theta_s)\rVert \le` ``grad_tol``
   (:func:`crit.critical.certify`).
3. **Count** negative eigenvalues of the exact Hessian at :math:`\theta_s` with the tolerance
   :math:`\tau` (default :math:`P\epsilon_{64}\max|\lambda|`,
   :func:`crit.spectrum.default_tolerance`):
   negative :math:`\lambda < -\tau`, null :math:`|\lambda| \le \tau`. Dense ``eigvalsh`` of the
   symmetrized float64 Hessian for small P; for large P the ``lanczos_k`` smallest Ritz values of
   one Lanczos run with full reorthogonalization, where a Ritz value :math:`\theta` with true
   residual :math:`\rho` proves an eigenvalue in :math:`[\theta-\rho, \theta+\rho]`
   (Parlett 1998, Thm 4.5.1); the index counted is then those with
   :math:`\theta + \rho < -\tau` (a lower bound, exact when fewer than ``lanczos_k``).
4. **Connect** (optional, :func:`descent_connection`): steepest descent from both sides of the
   saddle along its negative-curvature direction must end at the two minima; otherwise the
   refinement found some other pass.
5. **Label** (:data:`SADDLE_LABELS`), never dropping a path:

   * ``no_barrier`` -- the band's highest image is not above the higher end by more than
     ``barrier_tol``: there is no interior maximum, and no saddle is reported (fields NaN);
   * ``not_converged`` -- no gradient certificate (whatever the curvature);
   * ``index_1_saddle`` -- exactly one eigenvalue < −τ and none within ±τ, and the two that
     decide it clear the margin for the distance to the critical point too:
     :math:`\lambda_0 < -(\tau + m)` and :math:`\lambda_1 > \tau + m` (Lanczos: with their
     residuals added), where m is the larger :func:`crit.nearby.nearby_margins` margin of
     the eigen/Ritz vectors of :math:`\lambda_0` and :math:`\lambda_1` (an estimate: the
     refined point has ∇L ≈ 1e-10, not 0, and near a degenerate pass an eigenvalue of the
     size of the gradient can take either sign);
   * ``higher_index`` -- two or more eigenvalues < −τ;
   * ``degenerate`` -- at most one eigenvalue < −τ and some within ±τ (the second-order test
     is inconclusive), or an index-1 count whose λ_0 or λ_1 is within τ + m of zero;
   * ``drifted_to_minimum`` -- every eigenvalue > τ: Newton slid off the pass into a minimum;
   * ``index_ge_1`` -- Lanczos only: one eigenvalue < −τ proven and the second Ritz value
     clears τ + m, but the run did not span R^P (it broke down on an invariant subspace, or
     took fewer than P steps). Ritz values only bound eigenvalues from above
     (:math:`\theta_j \ge \lambda_j`, Cauchy interlacing), and a residual interval
     :math:`[\theta_1 - \rho_1, \theta_1 + \rho_1]` proves that *an* eigenvalue lies there,
     not that none lies below it: a second negative eigenvalue that the Krylov space missed (a
     repeated one is always missed) is not excluded, so the index is only known to be ≥ 1.
     A run that spans R^P (P steps without breakdown) has the eigenvalues of H as its Ritz
     values, and then ``index_1_saddle`` is exact.

The barrier after refinement is :math:`L(\theta_s) - \max(L(\theta_a), L(\theta_b))`.
Everything is a pure function with static sizes, so many tops are certified under ``vmap``.
Parameters are pytrees, as in :mod:`crit.paths`: ``loss_fn`` takes one parameter pytree, a
point is one (a flat vector is the pytree of one leaf), and a band's images are a stacked
pytree; inside, points are flattened with ``ravel_pytree`` (float64), and the eigenvalues and
Ritz vectors are of the flat Hessian.

References
----------
- A. Ambrosetti, P. H. Rabinowitz (1973). Dual variational methods in critical point theory and
  applications. J. Funct. Anal. 14, 349-381 (the mountain-pass theorem).
- G. Henkelman, B. P. Uberuaga, H. Jónsson (2000). A climbing image nudged elastic band method.
  J. Chem. Phys. 113, 9901.
- B. N. Parlett (1998). The Symmetric Eigenvalue Problem. SIAM.
- C. J. Cerjan, W. H. Miller (1981). On finding transition states. J. Chem. Phys. 75, 2800.
- D. J. Wales (2003). Energy Landscapes. Cambridge University Press.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from crit.critical import CRITICAL, certify, newton_critical_point
from crit.hessian import dense_hessian, hvp_operator
from crit.lanczos import extremal_eigenpairs
from crit.nearby import nearby_margins
from crit.newton_mr import newton_mr_critical_point
from crit.paths import Band, barrier_height, flatten_chain, image, unflatten_chain
from crit.spectrum import default_tolerance

Array = jax.Array
Params = Any

SADDLE_LABELS = ("index_1_saddle", "higher_index", "degenerate", "drifted_to_minimum",
                 "not_converged", "no_barrier", "index_ge_1")
(INDEX_1_SADDLE, HIGHER_INDEX, DEGENERATE, DRIFTED_TO_MINIMUM, NOT_CONVERGED,
 NO_BARRIER, INDEX_GE_1) = range(len(SADDLE_LABELS))


class SaddleCertificate(NamedTuple):
    """What the top of one path turned out to be (see the module docstring).

    ``theta`` the refined point (a pytree like the climbing image); ``loss``, ``grad_norm``; ``status`` a
    :data:`crit.critical.STATUSES` code; ``iterations`` of the finder; ``n_neg``, ``n_null`` at
    tolerance ``tolerance``; ``lambda_min`` and ``lambda_next`` (smallest two eigenvalues or
    Ritz values); ``eigenvalues`` (all P ascending when dense, else the ``lanczos_k`` smallest
    Ritz values, NaN-padded to P); ``barrier`` L(θ_s) − max(L_a, L_b); ``displacement``
    ‖θ_s − θ_climb‖; ``label`` a :data:`SADDLE_LABELS` code; ``dense`` whether the spectrum is
    exact; ``margin`` the allowance for the distance to the critical point that λ_0 and λ_1
    had to clear on top of τ for ``index_1_saddle`` (:mod:`crit.nearby`, an estimate).
    Saddle fields are NaN when ``label`` is ``no_barrier``.
    """

    theta: Array
    loss: Array
    grad_norm: Array
    status: Array
    iterations: Array
    n_neg: Array
    n_null: Array
    tolerance: Array
    lambda_min: Array
    lambda_next: Array
    eigenvalues: Array
    barrier: Array
    displacement: Array
    label: Array
    dense: Array
    margin: Array


def saddle_label(critical, n_neg, n_null, has_barrier, clears_margin=True,
                 second_excluded=True) -> Array:
    """The :data:`SADDLE_LABELS` code from the certificate and the eigenvalue counts;
    ``clears_margin`` False turns an index-1 count into ``degenerate`` (the two eigenvalues
    that decide it are within τ + margin of zero, see the module docstring);
    ``second_excluded`` False (a Lanczos run that did not span R^P) turns it into
    ``index_ge_1``."""
    index_1 = jnp.where(clears_margin, jnp.where(second_excluded, INDEX_1_SADDLE, INDEX_GE_1),
                        DEGENERATE)
    code = jnp.where(n_neg >= 2, HIGHER_INDEX,
                     jnp.where(n_null > 0, DEGENERATE,
                               jnp.where(n_neg == 1, index_1, DRIFTED_TO_MINIMUM)))
    code = jnp.where(critical, code, NOT_CONVERGED)
    return jnp.where(has_barrier, code, NO_BARRIER).astype(jnp.int32)


def _dense_counts(energy_fn, theta, eig_tol):
    lam, vec = jnp.linalg.eigh(dense_hessian(energy_fn, theta))
    tau = default_tolerance(lam) if eig_tol is None else jnp.asarray(eig_tol, lam.dtype)
    n_neg = jnp.sum(lam < -tau)
    n_null = jnp.sum(jnp.abs(lam) <= tau)
    return (lam, tau, n_neg, n_null, jnp.max(jnp.abs(lam)), vec[:, :2].T, jnp.zeros(2),
            jnp.asarray(True))


def _lanczos_counts(energy_fn, theta, eig_tol, key, num_steps, k):
    p = theta.shape[0]
    _, matvec = hvp_operator(energy_fn, theta)
    v0 = jax.random.normal(key, (p,), theta.dtype)
    pairs = extremal_eigenpairs(matvec, v0, num_steps, k, true_residuals=True)
    small, large = pairs.smallest, pairs.largest
    scale = jnp.nanmax(jnp.abs(jnp.concatenate([small.values, large.values])))
    tau = (p * float(np.finfo(np.float64).eps) * scale if eig_tol is None
           else jnp.asarray(eig_tol, theta.dtype))
    ok = small.valid
    n_neg = jnp.sum(ok & (small.values + small.residuals < -tau))
    n_null = jnp.sum(ok & (jnp.abs(small.values) <= tau + small.residuals))
    lam = jnp.full((p,), jnp.nan, theta.dtype).at[:k].set(small.values)
    two = jnp.arange(2) % k  # the vectors and residuals of λ_0, λ_1 (k = 1: λ_0 twice)
    # P steps without breakdown: the Ritz values are the eigenvalues of H, none is missed
    spans = (pairs.num_valid >= p) & (k >= 2 or p == 1)
    return (lam, tau, n_neg, n_null, scale, small.vectors[two], small.residuals[two], spans)


def _flat(loss_fn: Callable, params) -> tuple[Array, Callable, Callable]:
    """(θ float64 (P,), flat energy, unravel) of a parameter pytree."""
    theta, unravel = ravel_pytree(jax.tree.map(lambda x: jnp.asarray(x, jnp.float64), params))
    return theta, (lambda t: loss_fn(unravel(t))), unravel


class FollowResult(NamedTuple):
    """Where :func:`eigenvector_following` stopped: the point, its ‖g‖, iterations taken."""

    theta: Array
    grad_norm: Array
    iterations: Array


def eigenvector_following(loss_fn: Callable[[Params], Array], params: Params, max_step,
                          num_iters: int = 100, grad_tol: float = 1e-8,
                          eig_floor: float = 1e-10) -> FollowResult:
    r"""Walk to an index-1 saddle: uphill along the lowest Hessian mode, downhill along the rest.

    With H = Σ_i λ_i u_i u_iᵀ (ascending) and g = ∇L(θ), the step is

    .. math:: p = \frac{u_0^\top g}{|\lambda_0|}\,u_0
                 - \sum_{i \ge 1} \frac{u_i^\top g}{|\lambda_i|}\,u_i,

    scaled down to ‖p‖ ≤ ``max_step`` (a trust radius), with |λ_i| floored at
    ``eig_floor``·max|λ|. It maximizes along the softest mode and minimizes along every other one
    (eigenvector following: Cerjan & Miller 1981; Wales 2003, ch. 6), so its fixed points of
    non-singular H are the critical points, and it is attracted only to those of index one; next
    to a non-degenerate index-1 saddle it is Newton's step and converges quadratically. crit
    uses it between the band's climbing image -- which on a flat, ill-conditioned loss can have
    a small gradient yet lie far outside Newton's basin -- and the Newton polish. Dense Hessian:
    small P only. Returns the iterate with the smallest ‖g‖ (a pytree like ``params``).
    """
    theta, energy_fn, unravel = _flat(loss_fn, params)
    grad = jax.grad(energy_fn)

    def cond(state):
        i, _, _, best_norm = state[:4]
        return (i < num_iters) & (best_norm > grad_tol / 100.0)

    def body(state):
        i, th, best, best_norm = state
        g = grad(th)
        lam, u = jnp.linalg.eigh(dense_hessian(energy_fn, th))
        floor = eig_floor * jnp.max(jnp.abs(lam))
        sign = jnp.where(jnp.arange(lam.shape[0]) == 0, 1.0, -1.0)
        p = u @ (sign * (u.T @ g) / jnp.maximum(jnp.abs(lam), floor))
        norm = jnp.linalg.norm(p)
        p = p * jnp.minimum(1.0, max_step / jnp.where(norm > 0, norm, 1.0))
        th = th + p
        gn = jnp.linalg.norm(grad(th))
        better = jnp.isfinite(gn) & (gn < best_norm)
        return (i + 1, th, jnp.where(better, th, best), jnp.where(better, gn, best_norm))

    g0 = jnp.linalg.norm(grad(theta))
    i, _, best, best_norm = jax.lax.while_loop(cond, body, (jnp.asarray(0), theta, theta, g0))
    return FollowResult(unravel(best), best_norm, i)


def certify_top(loss_fn: Callable[[Params], Array], theta_top: Params, end_losses: Array,
                has_barrier=True, *, grad_tol: float = 1e-8, eig_tol: Optional[float] = None,
                max_iters: int = 30, dense_max_params: int = 2000, lanczos_steps: int = 90,
                lanczos_k: int = 4, minres_iters: int = 100, follow_iters: int = 1000,
                max_step=None, key: Optional[Array] = None) -> SaddleCertificate:
    """Refine ``theta_top`` to a critical point, certify it, count its index, label it.

    Parameters
    ----------
    loss_fn
        Scalar loss of one parameter pytree.
    theta_top
        Starting point (a pytree): the band's climbing image.
    end_losses
        (2,) losses of the two minima, for the barrier.
    has_barrier
        bool; False labels the path ``no_barrier`` (see :func:`certify_band_top`).
    grad_tol
        Certificate threshold on ‖∇L‖ (the finder aims at grad_tol / 100).
    eig_tol
        Eigenvalue tolerance τ; None: P·ε₆₄·max|λ| (dense) or P·ε₆₄·max|θ| (Lanczos).
    max_iters
        Finder iterations.
    follow_iters, max_step
        Dense path: at most ``follow_iters`` steps of :func:`eigenvector_following` with trust
        radius ``max_step`` (default: ‖θ_top‖·1e-2 + 1e-3; :func:`certify_band_top` passes a
        tenth of the band's mean image spacing) before the Newton polish; 0 skips it. A small
        radius with many steps follows the soft mode carefully; one image spacing per step
        overshot on the networks of experiments.minimum_paths (4 of 4 tops not converged at
        width 8, against 4 of 4 certified with a tenth of it).
    dense_max_params
        Dense Hessian and :func:`crit.critical.newton_critical_point` up to this P; above it,
        Newton-MR (``minres_iters`` HVPs per step) and ``lanczos_steps`` Lanczos steps (k =
        ``lanczos_k`` smallest Ritz values, random start from ``key``); ``index_1_saddle``
        there only when the run spans R^P, else ``index_ge_1`` (module docstring).
    """
    theta_top, energy_fn, unravel = _flat(loss_fn, theta_top)
    p = theta_top.shape[0]
    dense = p <= dense_max_params
    if dense:
        start = theta_top
        if follow_iters:
            radius = (1e-2 * jnp.linalg.norm(theta_top) + 1e-3) if max_step is None else max_step
            start = eigenvector_following(energy_fn, theta_top, radius, follow_iters,
                                          grad_tol).theta
        found = newton_critical_point(energy_fn, start, max_iters=max_iters,
                                      grad_tol=grad_tol)
        lam, tau, n_neg, n_null, hnorm, ys, rho, spans = _dense_counts(
            energy_fn, found.params, eig_tol)
    else:
        found = newton_mr_critical_point(energy_fn, theta_top, max_iters=max_iters,
                                         minres_iters=minres_iters, grad_tol=grad_tol)
        key = jax.random.PRNGKey(0) if key is None else key
        steps = min(lanczos_steps, p)
        lam, tau, n_neg, n_null, hnorm, ys, rho, spans = _lanczos_counts(
            energy_fn, found.params, eig_tol, key, steps, min(lanczos_k, steps))
    cert = certify(energy_fn, found.params, hnorm, grad_tol)
    critical = cert.status == CRITICAL
    has_barrier = jnp.asarray(has_barrier)
    margin = jnp.max(nearby_margins(energy_fn, found.params, ys,
                                    minres_iters=minres_iters).margin)
    clears = ((lam[0] + rho[0] < -(tau + margin))
              & (jnp.nan_to_num(lam[1], nan=jnp.inf) - rho[1] > tau + margin))
    label = saddle_label(critical, n_neg, n_null, has_barrier, clears, spans)
    nan = jnp.asarray(jnp.nan, theta_top.dtype)
    keep = lambda x: jnp.where(has_barrier, x, nan)  # noqa: E731
    return SaddleCertificate(
        theta=jax.tree.map(keep, unravel(found.params)), loss=keep(cert.loss),
        grad_norm=keep(cert.grad_norm), status=cert.status, iterations=found.iterations,
        n_neg=jnp.where(has_barrier, n_neg, -1), n_null=jnp.where(has_barrier, n_null, -1),
        tolerance=keep(tau), lambda_min=keep(lam[0]), lambda_next=keep(lam[1]),
        eigenvalues=jnp.where(has_barrier, lam, nan),
        barrier=keep(cert.loss - jnp.max(end_losses)),
        displacement=keep(jnp.linalg.norm(found.params - theta_top)), label=label,
        dense=jnp.asarray(dense), margin=keep(margin))


class Connection(NamedTuple):
    """Where steepest descent from both sides of a saddle ends (:func:`descent_connection`).

    ``ends`` the two end points (a stacked pytree like the band's images); ``dist_a``, ``dist_b`` (2,) their distances to the
    band's first and last image θ_a, θ_b; ``connects`` True when one side ends within
    ``tol``·‖θ_b − θ_a‖ of θ_a and the other of θ_b (the saddle is the pass between exactly
    these two minima); ``path_dist`` (2,) distances of the ends to the band (as a polyline),
    ``path_arc`` (2,) their arc-length positions along it; ``on_path`` True when both ends lie
    within one mean image spacing of the band, on either side of the climbing image (the saddle
    is a pass *of this path*, possibly between intermediate minima that the path visits).
    """

    ends: Array
    dist_a: Array
    dist_b: Array
    connects: Array
    path_dist: Array
    path_arc: Array
    on_path: Array


def project_on_path(images: Any, x: Params) -> tuple[Array, Array]:
    """(distance, arc position) of the point of the polyline R_0 … R_{N−1} nearest to x
    (a chain as a stacked pytree and a point, flattened)."""
    images = flatten_chain(images)[0]
    x = ravel_pytree(x)[0]
    seg = jnp.diff(images, axis=0)
    length = jnp.linalg.norm(seg, axis=1)
    t = jnp.clip(jnp.sum((x - images[:-1]) * seg, axis=1) / jnp.maximum(length ** 2, 1e-300),
                 0.0, 1.0)
    dist = jnp.linalg.norm(images[:-1] + t[:, None] * seg - x, axis=1)
    i = jnp.argmin(dist)
    arc = jnp.concatenate([jnp.zeros((1,), length.dtype), jnp.cumsum(length)])
    return dist[i], arc[i] + t[i] * length[i]


def _softest_direction(energy_fn, theta, dense_max_params, lanczos_steps, key):
    """Unit vector of the smallest Hessian eigenvalue at θ: eigh of the dense Hessian up to
    ``dense_max_params`` parameters, else the smallest Ritz vector of one Lanczos run of
    ``min(lanczos_steps, P)`` HVPs (full reorthogonalization, random start from ``key``)."""
    p = theta.shape[0]
    if p <= dense_max_params:
        return jnp.linalg.eigh(dense_hessian(energy_fn, theta))[1][:, 0]
    _, matvec = hvp_operator(energy_fn, theta)
    key = jax.random.PRNGKey(0) if key is None else key
    v0 = jax.random.normal(key, (p,), theta.dtype)
    return extremal_eigenpairs(matvec, v0, min(lanczos_steps, p), 1).smallest.vectors[0]


def descent_connection(loss_fn: Callable[[Params], Array], saddle: Params, images: Any,
                       climbing, num_steps: int = 3000, learning_rate: float = 1e-2,
                       displacement: float = 1e-2, tol: float = 0.05,
                       dense_max_params: int = 2000, lanczos_steps: int = 90,
                       key: Optional[Array] = None) -> Connection:
    r"""Which minima does the saddle join? Descend from :math:`\theta_s \pm \delta u_0`.

    :math:`u_0` is the eigenvector of the smallest Hessian eigenvalue: dense ``eigh`` for
    P ≤ ``dense_max_params``, above it the smallest Ritz vector of ``lanczos_steps`` Lanczos
    steps with HVPs (random start from ``key``), so no P × P matrix is formed (the same
    threshold as :func:`certify_top`; the direction only has to point off the ridge, so an
    unconverged Ritz vector with a component along :math:`u_0` still works). :math:`\delta` =
    ``displacement``·‖θ_b − θ_a‖ with θ_a, θ_b the first and last of the band's ``images`` (a
    stacked pytree; ``saddle`` a pytree like one image; ``climbing`` the index of the band's
    climbing image). Each side runs
    ``num_steps`` of Adam with a cosine-decayed step (a discretized steepest-descent path, the
    "intrinsic reaction coordinate" check of chemistry: Fukui 1970). A top found by refinement
    may be an index-1 saddle that is not a pass of this path (refinement can slide along a
    ridge to another pass); ``on_path`` tells them apart, and ``connects`` says whether it is
    the single pass between the two end minima. Non-finite saddles give False for both.
    """
    saddle, energy_fn, unravel = _flat(loss_fn, saddle)
    images = flatten_chain(images)[0].astype(saddle.dtype)
    a, b = images[0], images[-1]
    finite = jnp.all(jnp.isfinite(saddle))
    saddle = jnp.nan_to_num(saddle)
    u0 = _softest_direction(energy_fn, saddle, dense_max_params, lanczos_steps, key)
    step = displacement * jnp.linalg.norm(b - a)
    starts = jnp.stack([saddle + step * u0, saddle - step * u0])
    opt = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, alpha=1e-3))
    grad = jax.grad(energy_fn)

    def descend(theta):
        def body(carry, _):
            th, state = carry
            updates, state = opt.update(grad(th), state, th)
            return (optax.apply_updates(th, updates), state), None

        return jax.lax.scan(body, (theta, opt.init(theta)), None, length=num_steps)[0][0]

    ends = jax.vmap(descend)(starts)
    dist_a = jnp.linalg.norm(ends - a, axis=1)
    dist_b = jnp.linalg.norm(ends - b, axis=1)
    radius = tol * jnp.linalg.norm(b - a)
    connects = (((dist_a[0] <= radius) & (dist_b[1] <= radius))
                | ((dist_b[0] <= radius) & (dist_a[1] <= radius)))
    path_dist, path_arc = jax.vmap(lambda x: project_on_path(images, x))(ends)
    spacing = jnp.mean(jnp.linalg.norm(jnp.diff(images, axis=0), axis=1))
    climb_arc = project_on_path(images, images[climbing])[1]
    on_path = ((jnp.max(path_dist) <= spacing) & (jnp.min(path_arc) < climb_arc)
               & (climb_arc < jnp.max(path_arc)))
    return Connection(unflatten_chain(ends, unravel), dist_a, dist_b, connects & finite,
                      path_dist, path_arc, on_path & finite)


def has_interior_maximum(band: Band, barrier_tol: float = 0.0) -> Array:
    """True when the band's highest image is above both ends by more than ``barrier_tol``."""
    return barrier_height(band.energies) > barrier_tol


def certify_band_top(loss_fn: Callable[[Params], Array], band: Band,
                     barrier_tol: float = 0.0, **kwargs) -> SaddleCertificate:
    """:func:`certify_top` from a band's climbing image; ``no_barrier`` when the band has no
    interior maximum above ``barrier_tol`` (:func:`has_interior_maximum`). ``loss_fn`` takes
    one parameter pytree, as in :func:`crit.paths.relax_band` (the band's images are a stacked
    pytree of that shape). Keywords go to :func:`certify_top`. ``vmap`` it over a batch of
    bands."""
    ends = jnp.stack([band.energies[0], band.energies[-1]])
    flat = flatten_chain(band.images)[0]
    spacing = jnp.mean(jnp.linalg.norm(jnp.diff(flat, axis=0), axis=1))
    kwargs.setdefault("max_step", jnp.where(spacing > 0, 0.1 * spacing, 1e-3))
    return certify_top(loss_fn, image(band.images, band.climbing), ends,
                       has_interior_maximum(band, barrier_tol), **kwargs)


def label_names(codes) -> np.ndarray:
    """Label codes -> names (:data:`SADDLE_LABELS`), for CSV columns."""
    return np.asarray(SADDLE_LABELS)[np.asarray(codes, dtype=int)]
