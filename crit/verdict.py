r"""Saddle or minimum: a verdict with a proof, from exact eigenvalues or from Lanczos.

At a certified critical point (:math:`\lVert\nabla L\rVert \le` ``grad_tol``) the lecture's
question is decided by the sign of :math:`\lambda_{\min}(H)`. A whole spectrum is not needed:
one eigenvalue that is certainly negative proves the point is not a minimum.

**The proof (any symmetric H, any P).** For every unit vector :math:`y`,
:math:`\lambda_{\min}(H) \le y^\top H y` (Courant-Fischer). crit takes the smallest Ritz
vector :math:`y` of one Lanczos run, recomputes :math:`r = y^\top H y` and the residual
:math:`\rho = \lVert Hy - r y\rVert` with one more Hessian-vector product, and adds a rounding
allowance :math:`\delta = P\,\epsilon\,\max|\theta|` (the float64 numerical-rank tolerance, the
same :math:`\tau` the dense path classifies with). Then

* :math:`\lambda_{\min} \le r + \delta` always (``lambda_min_bound``), and
* some eigenvalue lies in :math:`[r - \rho, r + \rho]` (Parlett 1998, Thm 4.5.1).

If :math:`r + \delta < 0` the Hessian certainly has a negative eigenvalue: ``saddle (proven)``,
and :math:`y` is a direction of negative curvature (escape direction). This is stronger than
asking :math:`r + \rho < 0`: the Rayleigh bound needs no convergence, only a negative value.

**When nothing negative is found** crit says what is known: the smallest Ritz value and its
residual, and how unlikely it is that an eigenvalue below a level :math:`-\eta` was missed.
Kuczynski & Wozniakowski (1992, Thm 4.2) bound, for a positive semidefinite :math:`B` of size
:math:`n` and Lanczos from a start uniform on the sphere with Krylov information
:math:`[b, Bb, \dots, B^k b]`, the probability that the largest Ritz value has relative error
at least :math:`\varepsilon`:

.. math:: \Pr\Big[\frac{\lambda_1(B) - \xi_k}{\lambda_1(B)} \ge \varepsilon\Big]
          \le 1.648\,\sqrt{n}\; e^{-(2k-1)\sqrt{\varepsilon}}.

Applied to :math:`B = cI - H` with :math:`c \ge \lambda_{\max}(H)` (Lanczos is shift
invariant: the Ritz values of B are :math:`c - \theta`), if H had an eigenvalue
:math:`\le -\eta` then :math:`\theta_{\min} \ge` the observed value would need relative error
:math:`\varepsilon \ge (\theta_{\min} + \eta)/(c + \eta)`. crit reports the level
:math:`\eta` at which that probability is ``miss_probability`` (1% by default):
"an eigenvalue below :math:`-\eta` would have been found with probability at least 99%".
An m-step run (m matvecs) spans :math:`[b, \dots, H^{m-1} b]`, so :math:`k = m - 1`. The
statement needs :math:`c \ge \lambda_{\max}`; the largest Ritz value plus its residual does not
guarantee it (its interval holds *an* eigenvalue, not necessarily the largest), so c is KW's own
upper bound on :math:`\lVert H\rVert` from the same run (:func:`kw_norm_bound`, the theorem
applied to the PSD :math:`H^2`). Each of the two statements is made at half of
``miss_probability``, so both hold together with probability at least
:math:`1 -` ``miss_probability`` (a union bound); a larger c only weakens the statement.

**Dense spectra** give the same verdict from exact eigenvalues at tolerance :math:`\tau`:
``saddle (proven)`` if :math:`\lambda_{\min} < -\tau`, ``minimum`` if every eigenvalue is
:math:`> \tau` (positive definite: a strict local minimum), ``degenerate`` otherwise (no
eigenvalue below :math:`-\tau`, some within :math:`\pm\tau`: the second-order test cannot
decide). Krylov runs never claim ``minimum``: they cannot see every eigenvalue.

A point without a gradient certificate gets ``not critical`` whatever its curvature
(``negative_proven`` still says whether H has a certainly negative eigenvalue there).

**What is proven, and about which point.** Everything above is about H(θ) at the computed
point θ, and those statements are proofs: ``negative_proven`` (:math:`r + \delta < 0`),
``lambda_min_bound``, and, dense, the exact eigenvalues at τ. The question, though, is about the
critical point :math:`\theta^*` (∇L = 0) near θ, where :math:`\lVert\nabla L(\theta)\rVert
\le` 1e-8, not 0; near a manifold of critical points (a valley of minima, a symmetry) the
eigenvalue that vanishes at :math:`\theta^*` is :math:`O(\lVert\nabla L\rVert)` at θ, of either
sign, far above τ ≈ 1e-15 (issue 24: the lecture toy 3e-9 off its valley reads
``saddle_proven`` on one side and ``minimum`` on the other). :func:`crit.nearby.critical_point_verdict`
therefore keeps ``saddle_proven`` / ``minimum`` only where :math:`|\lambda| > \delta` +
``margin``, with a margin for the distance to :math:`\theta^*` from one Newton-MR step
(:func:`crit.nearby.nearby_margin`), and says ``degenerate`` otherwise; the protocol and the
apps report that code. The margin is an ESTIMATE (first-order perturbation along the Newton
step, with a factor 2 of safety), not a bound: a verdict about the critical point is as strong
as that estimate, while ``negative_proven`` stays a proof about H(θ). ``Verdict.margin``
records the margin used (0: a verdict about H(θ) alone).

References
----------
- J. Kuczynski, H. Wozniakowski (1992). Estimating the largest eigenvalue by the power and
  Lanczos algorithms with a random start. SIAM J. Matrix Anal. Appl. 13(4), 1094-1122.
- B. N. Parlett (1998). The Symmetric Eigenvalue Problem. SIAM (Rayleigh quotient and
  residual bounds, ch. 4 and 11).
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

EPS64 = float(np.finfo(np.float64).eps)

#: Verdict codes (``Verdict.code``) and their names, as written to CSV files.
VERDICTS = ("saddle_proven", "minimum", "degenerate", "no_negative_found", "not_critical")
SADDLE_PROVEN, MINIMUM, DEGENERATE, NO_NEGATIVE_FOUND, NOT_CRITICAL = range(len(VERDICTS))
#: How the verdicts read in summaries.
VERDICT_TEXT = {
    "saddle_proven": "saddle (proven)",
    "minimum": "minimum (all eigenvalues > τ)",
    "degenerate": "degenerate (none < −τ − margin, some |λ| ≤ τ + margin)",
    "no_negative_found": "no negative eigenvalue found",
    "not_critical": "not critical (no gradient certificate)",
}
#: Default probability of a missed negative eigenvalue for ``excluded_below``.
MISS_PROBABILITY = 0.01
KW_CONSTANT = 1.648


class Verdict(NamedTuple):
    """Saddle or minimum, with what proves it (see module docstring). Arrays, so vmappable."""

    code: jnp.ndarray
    """int, index into :data:`VERDICTS`."""
    negative_proven: jnp.ndarray
    r"""bool, H has an eigenvalue that is certainly < 0 (:math:`r + \delta < 0`)."""
    lambda_min_bound: jnp.ndarray
    r"""Certified upper bound on :math:`\lambda_{\min}`: :math:`r + \delta`."""
    ritz_value: jnp.ndarray
    r""":math:`r = y^\top H y` of the smallest Ritz vector (dense: the exact
    :math:`\lambda_{\min}`)."""
    ritz_residual: jnp.ndarray
    r""":math:`\rho = \lVert Hy - ry\rVert`: an eigenvalue lies in :math:`[r-\rho, r+\rho]`
    (dense: 0)."""
    excluded_below: jnp.ndarray
    r""":math:`\eta`: an eigenvalue below :math:`-\eta` would have been found with probability
    at least ``1 - miss_probability`` (dense: :math:`\tau`, with certainty; NaN when a
    negative eigenvalue is proven, or when the run is too short for any statement)."""
    miss_probability: jnp.ndarray
    """The probability ``excluded_below`` is stated at (dense: 0)."""
    allowance: jnp.ndarray
    r"""Rounding allowance :math:`\delta` (dense: :math:`\tau`)."""
    margin: jnp.ndarray = 0.0
    r"""Allowance for the distance to the nearby critical point
    (:func:`crit.nearby.critical_point_verdict`; an estimate): the code's sign claim holds
    only if :math:`|\lambda| > \delta +` ``margin``. 0: the verdict is about H(θ) itself."""


def kw_failure_probability(dim: int, krylov_degree, rel_error) -> jnp.ndarray:
    r"""Kuczynski-Wozniakowski: :math:`\min(1, 1.648\sqrt{n}\,e^{-(2k-1)\sqrt\varepsilon})`,
    the chance that Lanczos with Krylov information of degree k, from a uniform random start,
    leaves relative error :math:`\ge \varepsilon` in the largest eigenvalue of a PSD matrix."""
    eps = jnp.maximum(jnp.asarray(rel_error, jnp.float64), 0.0)
    p = KW_CONSTANT * jnp.sqrt(dim) * jnp.exp(-(2.0 * krylov_degree - 1.0) * jnp.sqrt(eps))
    return jnp.minimum(p, 1.0)


def kw_relative_error(dim: int, krylov_degree, probability) -> jnp.ndarray:
    r"""Inverse of :func:`kw_failure_probability`: the :math:`\varepsilon` whose failure
    probability is ``probability``, :math:`\big(\ln(1.648\sqrt n/p)/(2k-1)\big)^2` (clipped
    at 0 when the bound is below p already)."""
    s = jnp.log(KW_CONSTANT * jnp.sqrt(dim) / probability) / (2.0 * krylov_degree - 1.0)
    return jnp.maximum(s, 0.0) ** 2


def excluded_level(ritz_min, lambda_max_bound, dim: int, num_steps,
                   miss_probability: float = MISS_PROBABILITY) -> jnp.ndarray:
    r""":math:`\eta` with :math:`\Pr[\text{an eigenvalue} \le -\eta \text{ missed}] \le p`.

    With :math:`\varepsilon_p` from :func:`kw_relative_error` (k = ``num_steps`` - 1) and
    :math:`c` = ``lambda_max_bound``: solving :math:`(\theta_{\min} + \eta)/(c + \eta) =
    \varepsilon_p` gives :math:`\eta = (\varepsilon_p c - \theta_{\min})/(1 - \varepsilon_p)`.
    NaN when :math:`\varepsilon_p \ge 1` (too few steps for any statement at that p).
    """
    eps = kw_relative_error(dim, jnp.asarray(num_steps, jnp.float64) - 1.0, miss_probability)
    eta = (eps * lambda_max_bound - ritz_min) / jnp.where(eps < 1.0, 1.0 - eps, 1.0)
    return jnp.where(eps < 1.0, jnp.maximum(eta, 0.0), jnp.nan)


def extended_sigma_max(ritz_values, betas, valid) -> jnp.ndarray:
    r"""An upper bound on :math:`\max_{y \in K_k,\,\lVert y\rVert=1} \lVert Hy\rVert =
    \sigma_{\max}(\bar T_k)`: :math:`\sqrt{\max_i\theta_i^2 + \beta_k^2}`.

    Lanczos gives :math:`HQ_k = Q_{k+1}\bar T_k` with :math:`\bar T_k` the
    :math:`(k+1)\times k` tridiagonal extended by the row :math:`\beta_k e_k^\top`, so
    :math:`\bar T_k^\top\bar T_k = T_k^2 + \beta_k^2 e_ke_k^\top` and Weyl's inequality bounds
    its largest eigenvalue by :math:`\max\theta^2 + \beta_k^2`. A bound, not the value, on
    purpose: no extra eigensolver under ``vmap`` (batched LAPACK calls side by side have
    deadlocked jaxlib's CPU thread pool), and a larger value only weakens what uses it. Steps
    after a breakdown (``valid`` False) are ignored (``betas[k-1]`` is the final residual
    norm; ``ritz_values`` are :func:`crit.lanczos.tridiag_eigh`'s, valid ones first)."""
    k = jnp.sum(jnp.asarray(valid, bool))
    final = jnp.asarray(betas)[jnp.maximum(k - 1, 0)]
    top = jnp.max(jnp.abs(jnp.asarray(ritz_values)))  # invalid entries are exact zeros
    return jnp.sqrt(top**2 + final**2)


def kw_norm_bound(sigma_max, dim: int, num_steps,
                  probability: float = 0.5 * MISS_PROBABILITY) -> jnp.ndarray:
    r"""An upper bound on :math:`\lVert H\rVert \ge \lambda_{\max}` that holds with probability
    at least ``1 - probability`` over the Lanczos start (Kuczynski & Woźniakowski 1992).

    :math:`H^2` is PSD and a Krylov space :math:`K_m(H, v)` contains
    :math:`K_{\lceil m/2\rceil}(H^2, v)`, so the largest Ritz value of :math:`H^2` on it,
    :math:`\bar\sigma^2` (:func:`extended_sigma_max`), is at least the Lanczos estimate of
    degree :math:`k_2 = \lfloor (m-1)/2\rfloor` for :math:`H^2` from the same uniformly random
    start. KW's Lanczos theorem for PSD matrices gives
    :math:`\bar\sigma^2 \ge (1-\varepsilon)\lVert H\rVert^2` except with probability
    :math:`p` when :math:`\varepsilon = \varepsilon_p` (:func:`kw_relative_error`), hence

    .. math:: \lambda_{\max} \le \lVert H\rVert \le \bar\sigma / \sqrt{1-\varepsilon_p}.

    It needs no convergence of the top Ritz pair (the largest Ritz value plus its residual
    estimate does not bound :math:`\lambda_{\max}`: its interval contains *an* eigenvalue,
    not necessarily the largest). ``inf`` when :math:`\varepsilon_p \ge 1` (too few steps)."""
    k2 = jnp.floor((jnp.asarray(num_steps, jnp.float64) - 1.0) / 2.0)
    eps = kw_relative_error(dim, jnp.maximum(k2, 1.0), probability)
    return jnp.where((eps < 1.0) & (k2 >= 1.0),
                     sigma_max / jnp.sqrt(jnp.where(eps < 1.0, 1.0 - eps, 1.0)), jnp.inf)


def miss_probability_at(level, ritz_min, lambda_max_bound, dim: int, num_steps) -> jnp.ndarray:
    r"""Upper bound on the probability that an eigenvalue :math:`\le -` ``level`` (> 0) was
    missed, given the observed smallest Ritz value (1 if no statement can be made)."""
    rel = (ritz_min + level) / (lambda_max_bound + level)
    return kw_failure_probability(dim, jnp.asarray(num_steps, jnp.float64) - 1.0, rel)


def krylov_verdict(rayleigh_min, residual, allowance, ritz_max_bound, dim: int, num_steps,
                   critical=True, miss_probability: float = MISS_PROBABILITY,
                   exhausted=False) -> Verdict:
    r"""The verdict from the smallest Ritz pair of a Lanczos run of ``num_steps`` steps.

    Parameters
    ----------
    rayleigh_min, residual
        :math:`r = y^\top H y` and :math:`\lVert Hy - ry\rVert` of the smallest unit Ritz
        vector, recomputed with one HVP (``KrylovSpectrum.rayleigh_min`` and
        ``rayleigh_residual``).
    allowance
        Rounding allowance :math:`\delta` (:func:`crit.krylov.krylov_tolerance`).
    ritz_max_bound
        :math:`c \ge \lambda_{\max}`, e.g. :func:`kw_norm_bound`.
    critical
        bool, the point has a gradient certificate.
    exhausted
        bool, the run broke down (its Krylov space is invariant): its Ritz values are then
        eigenvalues, and from a Gaussian start every eigenvalue is seen (with probability
        one), so ``excluded_below`` is :math:`\max(-r, 0) + \rho + \delta` with
        ``miss_probability`` 0.
    """
    negative = rayleigh_min + allowance < 0.0
    eta = excluded_level(rayleigh_min, ritz_max_bound, dim, num_steps, miss_probability)
    eta = jnp.where(exhausted, jnp.maximum(-rayleigh_min, 0.0) + residual + allowance, eta)
    code = jnp.where(critical, jnp.where(negative, SADDLE_PROVEN, NO_NEGATIVE_FOUND),
                     NOT_CRITICAL)
    return Verdict(code=code.astype(jnp.int32), negative_proven=negative,
                   lambda_min_bound=rayleigh_min + allowance, ritz_value=rayleigh_min,
                   ritz_residual=residual, excluded_below=jnp.where(negative, jnp.nan, eta),
                   miss_probability=jnp.where(exhausted, 0.0, miss_probability),
                   allowance=jnp.asarray(allowance, jnp.float64),
                   margin=jnp.zeros_like(jnp.asarray(rayleigh_min, jnp.float64)))


def dense_verdict(eigenvalues, tolerance, critical=True) -> Verdict:
    r"""The same verdict from all P exact eigenvalues (ascending or not) at tolerance
    :math:`\tau`: saddle (proven) if :math:`\lambda_{\min} < -\tau`, minimum if
    :math:`\lambda_{\min} > \tau`, degenerate otherwise."""
    eigenvalues = jnp.asarray(eigenvalues)
    lam = jnp.min(eigenvalues, axis=-1).astype(jnp.float64)
    tau = jnp.asarray(tolerance, jnp.float64)
    negative = lam < -tau
    code = jnp.where(negative, SADDLE_PROVEN, jnp.where(lam > tau, MINIMUM, DEGENERATE))
    code = jnp.where(critical, code, NOT_CRITICAL)
    return Verdict(code=code.astype(jnp.int32), negative_proven=negative,
                   lambda_min_bound=lam + tau, ritz_value=lam, ritz_residual=jnp.zeros_like(lam),
                   excluded_below=jnp.where(negative, jnp.nan, tau),
                   miss_probability=jnp.zeros_like(lam), allowance=tau,
                   margin=jnp.zeros_like(lam))


def with_criticality(verdict: Verdict, critical) -> Verdict:
    """``verdict`` with its code set to ``not_critical`` where ``critical`` is False (the
    curvature evidence is kept)."""
    return verdict._replace(code=jnp.where(critical, verdict.code, NOT_CRITICAL).astype(
        jnp.int32))


def verdict_names(codes) -> np.ndarray:
    """Verdict codes -> their names (:data:`VERDICTS`), for CSV columns."""
    return np.asarray(VERDICTS)[np.asarray(codes, dtype=int)]
