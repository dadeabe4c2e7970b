r"""The Hessian spectrum of a large network from Hessian-vector products alone.

:func:`krylov_spectrum` is the matrix-free counterpart of :func:`crit.spectrum.exact_spectrum`:
one call gives what crit reports about a spectrum at large P --

* the **verdict** (:mod:`crit.verdict`): a proof of a negative eigenvalue from the Rayleigh
  quotient of the smallest Ritz vector, or the level below which a negative eigenvalue would
  have been found with 99% probability (Kuczynski & Woźniakowski 1992);
* the extremal eigenvalues with convergence diagnostics;
* the fractions of positive, negative and null eigenvalues (minimum ratio, index, null
  fraction) as point estimates *with intervals*, on a grid of tolerances (the spectral CDF
  near zero) and at the finest tolerance the run resolves;
* the raw stochastic Lanczos quadrature (SLQ) nodes and weights from which densities are
  drawn (:func:`crit.slq.slq_density`, :func:`crit.slq.slq_log_density`).

It runs one Lanczos process from a Gaussian random unit vector (a Gaussian start has a
nonzero component along every eigenvector with probability one; a Rademacher probe can be
exactly orthogonal to structured eigenvectors such as :math:`(e_i - e_j)/\sqrt 2`), checks its
extremal Ritz vectors with one HVP each, optionally deflates the converged ones, then runs
``num_probes`` Lanczos processes from Rademacher probes (Ghorbani, Krishnan & Xiao 2019), all
batched together, in one block of ``num_steps`` steps or continued block by block until the
answer is sharp (``max_steps``). Without deflation the SLQ part equals
``crit.slq.slq(matvec, probe_key, dim, num_probes, num_steps)``.

The function is pure with static sizes, so it composes with ``jit`` and is ``vmap``-ped over
initializations (one Hessian operator per init) like every per-init analysis in crit.

Memory: ``num_steps * dim`` floats for the extremal basis plus ``num_probes * steps * dim``
for the probes' bases (all runs at once), or ``probe_batch * num_steps * dim`` with
``probe_batch`` set (runs in sequential groups).

References
----------
- B. Ghorbani, S. Krishnan, Y. Xiao (2019). An investigation into neural net optimization via
  Hessian eigenvalue density. ICML.
- G. H. Golub, G. Meurant (2010). Matrices, Moments and Quadrature with Applications.
- L. Sagun, L. Bottou, Y. LeCun (2016). Eigenvalues of the Hessian in deep learning.
- J. Kuczynski, H. Wozniakowski (1992). Estimating the largest eigenvalue by the power and
  Lanczos algorithms with a random start. SIAM J. Matrix Anal. Appl. 13(4).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from crit.lanczos import (lanczos_advance, lanczos_start, lanczos_tridiag, tridiag_eigh)
from crit.slq import SLQResult, SpectralFractions, ritz_quadrature, slq_fractions
from crit.verdict import (MISS_PROBABILITY, Verdict, extended_sigma_max, krylov_verdict,
                          kw_norm_bound)

Array = jax.Array
EPS64 = float(np.finfo(np.float64).eps)


#: τ / max|θ| of the grid at which every Krylov run reports its sign fractions (the spectral
#: CDF near zero): half-decades from 1e-12 to 1e-1.
REL_TOL_GRID = tuple(float(10.0 ** e) for e in np.arange(-12.0, -0.99, 0.5))
#: Safety factor on the measured low-precision HVP error (``check_matvec``): the operator-norm
#: error of a random-like error matrix is about twice its error on a random unit vector.
SEARCH_ERROR_FACTOR = 3.0
#: Interval width below which a fraction counts as resolved (``resolved``, ``tol_mode``).
RESOLVE_WIDTH = 0.05
#: No fraction is called resolved at a τ above this fraction of max|θ|: at τ = 0.1·λ_max
#: "null" swallows most of any bulk, and a narrow interval there says nothing about the signs.
RESOLVE_CEILING = 1e-2
TOL_MODES = ("resolved", "machine")


class KrylovSpectrum(NamedTuple):
    r"""What :func:`krylov_spectrum` found about the spectrum of a symmetric operator.

    Fractions are over all ``dim`` eigenvalues with the tolerance ``tolerance``: positive
    :math:`\lambda > \tau`, negative :math:`\lambda < -\tau`, null :math:`|\lambda| \le
    \tau`, as in :func:`crit.spectrum.classify_spectrum`. Intervals ``[lo, hi]`` combine the
    quadrature-bias bracket with ``z`` standard errors over probes (:func:`crit.slq.slq_fractions`).
    """

    min_ratio: Array
    """Fraction of positive eigenvalues (SLQ point estimate, ``fractions.positive.mean``)."""
    min_ratio_lo: Array
    min_ratio_hi: Array
    index: Array
    """Fraction of negative eigenvalues (point estimate)."""
    index_lo: Array
    index_hi: Array
    null_fraction: Array
    """Fraction of eigenvalues in ``[-tolerance, tolerance]`` (point estimate)."""
    null_fraction_lo: Array
    null_fraction_hi: Array
    lambda_min: Array
    """Smallest Ritz value of the extremal run (an upper bound on the true minimum)."""
    lambda_max: Array
    """Largest Ritz value of the extremal run (a lower bound on the true maximum)."""
    lambda_min_converged: Array
    """bool, residual estimate of ``lambda_min`` <= ``conv_tol * max|theta|``."""
    lambda_max_converged: Array
    largest: Array
    """(k,) The k largest Ritz values, descending (NaN where fewer were found)."""
    largest_residuals: Array
    r"""(k,) Residual estimates :math:`|\beta_m s_{m,i}|`: an eigenvalue lies within this."""
    largest_converged: Array
    smallest: Array
    """(k,) The k smallest (most negative) Ritz values, ascending (NaN where fewer)."""
    smallest_residuals: Array
    smallest_converged: Array
    nodes: Array
    """(num_probes, probe steps) SLQ Ritz values per probe (valid ones first, ascending)."""
    weights: Array
    """(num_probes, probe steps) SLQ weights (squared first components); rows sum to 1."""
    node_residuals: Array
    """(num_probes, probe steps) Ritz residual estimates of the SLQ nodes."""
    node_valid: Array
    """(num_probes, probe steps) bool, False for padding (breakdown, or steps not taken)."""
    node_coupling: Array
    """(num_probes, probe steps) Signed couplings of the SLQ nodes (crit.slq.SLQResult)."""
    fractions: SpectralFractions
    """Everything :func:`crit.slq.slq_fractions` returns at ``tolerance``."""
    tolerance: Array
    r"""The :math:`\tau` used for the sign fractions."""
    tolerance_rel: Array
    r""":math:`\tau / \max|\theta|`."""
    machine_tolerance: Array
    r""":math:`n\,\epsilon\,\max|\theta|`, the dense path's default :math:`\tau`; also the
    rounding allowance :math:`\delta` of the verdict."""
    resolved: Array
    """bool, the min-ratio and index intervals at ``tolerance`` are at most ``resolve_width``
    wide and ``tolerance_rel`` is at most ``resolve_ceiling``. An unresolved point estimate
    must not be read as known."""
    grid_tolerance: Array
    """(G,) Tolerances of the sign-fraction grid, :data:`REL_TOL_GRID` times max|θ|."""
    grid_fractions: SpectralFractions
    """Sign fractions with intervals at every ``grid_tolerance`` (leading axis G): the
    spectral CDF near zero, showing at which scale the answer becomes sharp."""
    verdict: Verdict
    """Saddle or minimum (:mod:`crit.verdict`), assuming the point is critical; see
    :func:`crit.verdict.with_criticality`."""
    escape_direction: Array
    """(dim,) Unit smallest Ritz vector y; a direction of negative curvature when the verdict
    proves one (:math:`y^\\top H y < 0`)."""
    lambda_max_bound: Array
    r"""c of the missed-eigenvalue statement: :math:`\lambda_{\max} \le c` with probability at
    least 1 - miss_probability/2 (:func:`crit.verdict.kw_norm_bound`, plus η of a
    low-precision search)."""
    deflated: Array
    """(2k,) Ritz values deflated before the SLQ runs (NaN: not deflated)."""
    num_deflated: Array
    slack: Array
    r"""Weyl slack :math:`e = \lVert HY - Y\Theta\rVert_F` of the deflated pairs."""
    probe_mass: Array
    r"""(num_probes,) :math:`\lVert v_l\rVert^2` of the SLQ probes (1 without deflation)."""
    probe_steps: Array
    """Lanczos steps each SLQ run took (``num_steps`` unless adaptive)."""
    conv_tol: Array
    """Relative residual tolerance of the ``*_converged`` flags."""
    num_matvecs: Array
    """Operator applications spent in all."""
    dim: Array
    """The operator's size n."""
    extremal_rayleigh: Optional[Array] = None
    r"""(2k,) Rayleigh quotients :math:`y^\top H y` of the unit Ritz vectors of the k smallest
    (ascending) then the k largest (descending) Ritz values, recomputed with one HVP each
    (with ``deflate``; without it only the first). NaN where missing."""
    extremal_residuals: Optional[Array] = None
    r"""(2k,) True residuals :math:`\lVert Hy - (y^\top Hy) y\rVert` of the same vectors: an
    eigenvalue lies within each of its Rayleigh quotient (Parlett 1998, Thm 4.5.1)."""
    search_error: Optional[Array] = None
    r"""η: the measured error of a low-precision search operator against float64 times
    :data:`SEARCH_ERROR_FACTOR` (``check_matvec``; 0 without), included in ``slack``,
    ``lambda_max_bound`` and the verdict's ``excluded_below``."""
    num_check_matvecs: Optional[Array] = None
    """float64 products spent on the proof and the error check with ``check_matvec``; the
    low-precision ones, including the error check's, are in ``num_matvecs``."""

    @property
    def slq(self) -> SLQResult:
        """The SLQ part as a :class:`crit.slq.SLQResult` (for densities and fractions); with
        deflation it carries the probe masses, deflated values and slack."""
        return SLQResult(self.nodes, self.weights, self.node_residuals, self.node_valid,
                         self.dim, self.probe_mass, self.deflated, self.node_coupling,
                         self.slack)


def krylov_tolerance(ritz_values: Array, dim: int, scale: float = 1.0) -> Array:
    r""":math:`\tau = \mathrm{scale} \cdot n \cdot \epsilon_{64} \cdot \max|\theta|`.

    The analogue of :func:`crit.spectrum.default_tolerance` with the largest Ritz value in
    magnitude standing in for :math:`\lVert H \rVert_2` (the extremal Ritz values converge
    first, so this is :math:`\lVert H \rVert_2` to many digits after a few dozen steps).
    ``ritz_values`` may hold NaN for missing values; they are ignored.
    """
    return scale * dim * EPS64 * jnp.nanmax(jnp.abs(ritz_values))


def _quadrature(matvec, v, num_steps, reorthogonalize):
    """Ritz values, first-component weights, residual estimates and validity of one run."""
    res = lanczos_tridiag(matvec, v, num_steps, reorthogonalize=reorthogonalize,
                          return_basis=False)
    return ritz_quadrature(res.alphas, res.betas, res.valid)


def _ends(nodes, residuals, valid, k, conv_tol):
    """k largest (descending) and k smallest (ascending) valid Ritz values of one run."""
    m = nodes.shape[0]
    nv = jnp.sum(valid)
    scale = jnp.max(jnp.where(valid, jnp.abs(nodes), 0.0))
    i = jnp.arange(k)

    def pick(idx, ok):
        idx = jnp.clip(idx, 0, m - 1)
        theta = jnp.where(ok, nodes[idx], jnp.nan)
        rho = jnp.where(ok, residuals[idx], jnp.nan)
        return theta, rho, ok & (rho <= conv_tol * scale)

    return pick(nv - 1 - i, nv - 1 - i >= 0), pick(i, i < nv)


def _extremal_vectors(res, vectors, k):
    """Unit Ritz vectors of the k smallest (first, ascending) and k largest (descending)
    Ritz values, and a mask that drops missing ones and repeats (when 2k > valid steps)."""
    m = vectors.shape[0]
    nv = res.num_valid
    i = jnp.arange(k)
    idx = jnp.concatenate([i, nv - 1 - i])
    ok = jnp.concatenate([i < nv, (nv - 1 - i >= 0) & (nv - 1 - i >= k)])
    idx = jnp.clip(idx, 0, m - 1)
    ys = vectors[:, idx].T @ res.basis
    ys = ys / jnp.maximum(jnp.linalg.norm(ys, axis=1, keepdims=True), 1e-300)
    return jnp.where(ok[:, None], ys, 0.0), ok


def _rayleigh(matvec, ys):
    """Rayleigh quotients y'Hy and residual norms ||Hy - (y'Hy) y|| of unit rows ``ys``."""
    hy = jax.vmap(matvec)(ys)
    r = jnp.sum(ys * hy, axis=1)
    return r, jnp.linalg.norm(hy - r[:, None] * ys, axis=1)


def common_tolerance_index(tolerance_rel, resolved, resolve_ceiling: float = RESOLVE_CEILING
                           ) -> int:
    r"""The one relative :math:`\tau` at which a summary pooling many spectra compares them:
    an index into :data:`REL_TOL_GRID`.

    ``tol_mode="resolved"`` picks :math:`\tau` per spectrum, so fractions of different runs
    are counted at different scales (a min ratio at :math:`10^{-8}\max|\theta|` and one at
    :math:`10^{-3}\max|\theta|` are not the same quantity). The common scale is the coarsest
    per-spectrum resolved :math:`\tau` (every resolved spectrum is then resolved there too, up
    to the monotonicity of the interval widths, which the caller checks), over the spectra
    resolved at all; with none resolved, the largest grid value under ``resolve_ceiling``.
    ``tolerance_rel`` and ``resolved`` are per-spectrum arrays (``KrylovSpectrum`` fields).
    """
    grid = np.asarray(REL_TOL_GRID)
    under = grid <= resolve_ceiling * (1 + 1e-9)
    rel = np.asarray(tolerance_rel, dtype=float)[np.asarray(resolved, bool)]
    target = float(np.max(rel)) if rel.size else float(grid[under][-1])
    return int(np.argmin(np.abs(np.log(grid) - np.log(target))))


def _sign_widths(fr: SpectralFractions) -> Array:
    return jnp.maximum(fr.positive.hi - fr.positive.lo, fr.negative.hi - fr.negative.lo)


def krylov_spectrum(matvec: Callable[[Array], Array], key: Array, dim: int, *,
                    num_steps: int = 90, num_probes: int = 8, k: int = 5,
                    tol: Optional[float] = None, z: float = 2.0, tol_scale: float = 1.0,
                    tol_mode: str = "resolved", resolve_width: float = RESOLVE_WIDTH,
                    resolve_ceiling: float = RESOLVE_CEILING,
                    deflate: bool = True, deflate_tol: float = 1e-10,
                    max_steps: Optional[int] = None, target_width: float = RESOLVE_WIDTH,
                    target_tol: Optional[float] = None, target_rel_tol: float = 1e-4,
                    conv_tol: float = 1e-8, probe_batch: Optional[int] = None,
                    miss_probability: float = MISS_PROBABILITY,
                    reorthogonalize: bool = True,
                    check_matvec: Optional[Callable[[Array], Array]] = None,
                    num_checks: int = 4,
                    search_error_factor: float = SEARCH_ERROR_FACTOR) -> KrylovSpectrum:
    r"""Extremal eigenvalues, a saddle verdict and sign fractions (with intervals).

    Parameters
    ----------
    matvec
        Symmetric ``v -> A v`` on flat float64 vectors of length ``dim`` (a Hessian-vector
        product: :func:`crit.hessian.hvp_operator` or
        :func:`crit.hessian.full_batch_hvp_operator`).
    key
        PRNG key. ``jax.random.split(key)`` gives ``(probe_key, start_key)``: the SLQ probes
        are those of ``crit.slq.slq(matvec, probe_key, ...)`` (projected when deflating), the
        extremal run starts at a normalized ``jax.random.normal(start_key, (dim,))``.
    dim
        Static size n of the operator (P, the number of parameters).
    num_steps
        Lanczos steps of the extremal run, and of each SLQ run (per block when adaptive).
    num_probes
        SLQ probes n_v (>= 2 for an empirical standard error).
    k
        Ritz values reported at each end (``1 <= k <= num_steps``); also the most pairs
        deflated at each end.
    tol
        Absolute eigenvalue tolerance :math:`\tau` for the fractions; overrides ``tol_mode``.
    tol_mode
        How :math:`\tau` is chosen when ``tol`` is None. ``"resolved"`` (default): the
        smallest :math:`\tau` of the grid :data:`REL_TOL_GRID` :math:`\cdot \max|\theta|` at
        which the min-ratio and index intervals are at most ``resolve_width`` wide (the
        scale this run can answer at), searched up to ``resolve_ceiling``; if none is, the
        largest grid value at or below the ceiling, marked unresolved. ``"machine"``:
        :math:`\tau` = ``tol_scale`` :math:`\cdot n\epsilon\max|\theta|`, the dense path's
        default, to compare with exact counts (usually unresolved at large P).
    z
        Standard errors added on each side of the bias bracket.
    resolve_ceiling
        ``resolved`` is False at any :math:`\tau > ` ``resolve_ceiling`` :math:`\cdot
        \max|\theta|` (a given ``tol`` included), however narrow the intervals: at
        :math:`\tau = 0.1\max|\theta|` most of a bulk counts as null (default 1e-2).
    deflate
        Take the converged extremal Ritz pairs (residual :math:`\le` ``deflate_tol``
        :math:`\cdot\max|\theta|`, at most k per end) out of the operator before the SLQ runs:
        they run on :math:`\Pi H \Pi` with :math:`\Pi = I - YY^\top`, from probes
        :math:`\Pi z/\sqrt n`. Outliers stretch the spectrum that m nodes must cover; without
        them the quadrature resolves the bulk near zero more finely. The fractions then count
        the deflated Ritz values exactly and the rest by SLQ, with thresholds widened by the
        Weyl slack :math:`e = \lVert HY - Y\Theta\rVert_F` (every eigenvalue of H is within
        e of one of :math:`\mathrm{diag}(\Theta, Y_\perp^\top H Y_\perp)`), so the intervals
        stay rigorous. Costs 2k extra matvecs. The slack floors the resolvable τ, so only
        pairs converged to ``deflate_tol`` (1e-10) are taken: with 1e-6, a bulk-edge Ritz pair
        of residual 5e-4 (of λ_max = 500) was deflated on a planted spectrum and the finest
        resolved τ rose from 3e-11 to 1e-6 of λ_max.
    max_steps
        Adaptive SLQ: continue the runs in blocks of ``num_steps`` (exact continuation, see
        :func:`crit.lanczos.lanczos_advance`) until the min-ratio and index intervals at the
        target :math:`\tau` are at most ``target_width`` wide, or ``max_steps`` steps per run
        (rounded down to a multiple of ``num_steps``). None: one block.
    target_tol, target_rel_tol
        The target :math:`\tau` of the adaptive runs: ``tol`` if given, else ``target_tol``,
        else ``target_rel_tol`` :math:`\cdot\max|\theta|`.
    conv_tol
        A Ritz value is ``converged`` when its residual estimate is at most ``conv_tol`` times
        the largest :math:`|\theta|`.
    probe_batch
        ``None``: all SLQ runs at once (``vmap``). An integer b: sequential groups of b
        (``lax.map``), memory ``b * num_steps * dim`` floats. Not with ``max_steps``.
    miss_probability
        Probability at which the verdict states ``excluded_below`` (:mod:`crit.verdict`).
    reorthogonalize
        Full reorthogonalization in every run (default; without it ghost eigenvalues appear
        and the quadrature brackets are void).
    check_matvec, num_checks, search_error_factor
        *Search in low precision, prove in float64.* With ``check_matvec`` (the float64
        operator H), ``matvec`` is a cheaper approximation :math:`\tilde H` (e.g. the HVP in
        float32 or bfloat16, cast back to float64; the recurrence and reorthogonalization stay
        in float64) on which every Lanczos run goes. Then (a) the Rayleigh quotients and true
        residuals of the extremal Ritz vectors, and hence the verdict, the extremal pairs and
        the deflation, are recomputed with ``check_matvec`` (2k float64 products): the proof
        is a float64 proof whatever ``matvec`` was; (b) the search error
        :math:`\eta = f\,\max_u \lVert \tilde H u - H u\rVert` over unit u (the first
        ``num_checks`` probes and the 2k Ritz vectors; :math:`f` = ``search_error_factor``)
        is added to the Weyl slack of the sign fractions (each eigenvalue of H is within
        :math:`\lVert\tilde H - H\rVert_2` of one of :math:`\tilde H`'s symmetric part) and
        to :math:`c` and the excluded level of the missed-eigenvalue statement. η is a
        *measured estimate* of :math:`\lVert \tilde H - H\rVert_2`, not a bound: for an error
        spread like a random matrix the norm is about twice the error on a random unit vector,
        hence the default :math:`f = 3`. Cost: ``num_checks`` + 2k float64 products and as many
        low-precision ones.

    Returns
    -------
    KrylovSpectrum

    Notes
    -----
    Order of work: one extremal Lanczos run from a Gaussian start (its basis kept), the
    Rayleigh quotients and true residuals of its 2k extremal Ritz vectors (one matvec each;
    only the smallest without deflation), the verdict (:func:`crit.verdict.krylov_verdict`),
    then the SLQ runs. Cost: ``num_steps * (1 + num_probes * blocks) + (2k or 1)`` matvecs.

    What to expect: m Lanczos steps resolve the spectrum only to about
    :math:`\lVert H \rVert / m^2` near its edges and :math:`\lVert H\rVert/m` inside, so the
    sign of the many tiny eigenvalues of a network Hessian's bulk is out of reach at the
    machine :math:`\tau` (about :math:`10^{-11} \lVert H \rVert`): its interval is honestly
    wide. ``tol_mode="resolved"`` reports the fractions at the finest scale that is known,
    ``grid_fractions`` at every scale, and the verdict does not need the bulk at all.
    """
    if not 1 <= k <= num_steps:
        raise ValueError(f"need 1 <= k <= num_steps, got k={k}, num_steps={num_steps}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    if tol_mode not in TOL_MODES:
        raise ValueError(f"tol_mode must be one of {TOL_MODES}, got {tol_mode!r}")
    blocks = 1 if max_steps is None else max(max_steps // num_steps, 1)
    if blocks > 1 and probe_batch is not None:
        raise ValueError("adaptive runs (max_steps > num_steps) take all probes at once; "
                         "drop probe_batch")
    probe_key, start_key = jax.random.split(key)
    probes = jax.random.rademacher(probe_key, (num_probes, dim), dtype=jnp.float64)
    probes = probes / jnp.sqrt(dim)
    start = jax.random.normal(start_key, (dim,), dtype=jnp.float64)

    # 1. The extremal run, its ends, and the Rayleigh quotients of its extremal Ritz vectors.
    ext = lanczos_tridiag(matvec, start / jnp.linalg.norm(start), num_steps,
                          reorthogonalize=reorthogonalize)
    values, vectors = tridiag_eigh(ext.alphas, ext.betas, ext.valid)
    e_nodes, _, e_res, e_valid, _ = ritz_quadrature(ext.alphas, ext.betas, ext.valid)
    (top, top_rho, top_ok), (bot, bot_rho, bot_ok) = _ends(e_nodes, e_res, e_valid, k,
                                                           conv_tol)
    scale = jnp.max(jnp.where(e_valid, jnp.abs(e_nodes), 0.0))
    ys, ys_ok = _extremal_vectors(ext, vectors, k)
    checked = ys if deflate else ys[:1]
    proof = matvec if check_matvec is None else check_matvec
    rq, rq_res = _rayleigh(proof, checked)
    rounding = krylov_tolerance(jnp.where(e_valid, e_nodes, jnp.nan), dim)
    if check_matvec is None:
        search_error, n_checks = jnp.zeros(()), 0
    else:
        n_checks = min(num_checks, num_probes)
        units = jnp.concatenate([probes[:n_checks], jnp.where(ys_ok[:checked.shape[0], None],
                                                              checked, 0.0)])
        search_error = search_error_factor * _search_error(matvec, check_matvec, units)
        n_checks += checked.shape[0]
    # c >= lambda_max with probability 1 - p/2 (KW on H^2), the missed-eigenvalue level at p/2:
    # both hold with probability >= 1 - p. A low-precision search adds its error eta.
    sigma = extended_sigma_max(values, ext.betas, ext.valid)
    c = kw_norm_bound(sigma, dim, ext.num_valid, 0.5 * miss_probability) + search_error
    exhausted = (ext.num_valid < num_steps) & (check_matvec is None)
    verdict = krylov_verdict(rq[0], rq_res[0], rounding, c, dim, ext.num_valid,
                             miss_probability=0.5 * miss_probability, exhausted=exhausted)
    verdict = verdict._replace(excluded_below=verdict.excluded_below + search_error,
                               miss_probability=jnp.where(exhausted, 0.0, miss_probability))

    # 2. Deflation of the converged extremal pairs.
    if deflate:
        use = ys_ok & (rq_res <= jnp.maximum(deflate_tol * scale, search_error))
        basis = jnp.where(use[:, None], ys, 0.0)
        deflated = jnp.where(use, rq, jnp.nan)
        slack = jnp.sqrt(jnp.sum(jnp.where(use, rq_res, 0.0) ** 2)) + search_error

        def project(v):
            v = v - basis.T @ (basis @ v)
            return v - basis.T @ (basis @ v)

        def op(v):
            return project(matvec(project(v)))

        probes = jax.vmap(project)(probes)
    else:
        deflated, slack, op = jnp.full((2 * k,), jnp.nan), search_error, matvec
    mass = jnp.sum(probes**2, axis=1)

    def assemble(quad):
        nodes, weights, residuals, valid, coupling = quad
        return SLQResult(nodes, weights, residuals, valid, jnp.asarray(dim), mass, deflated,
                         coupling, slack)

    # 3. SLQ, in one block or adaptively.
    if tol is not None:
        target = jnp.asarray(tol, jnp.float64)
    elif target_tol is not None:
        target = jnp.asarray(target_tol, jnp.float64)
    else:
        target = target_rel_tol * scale
    if blocks == 1:
        def run(v):
            return _quadrature(op, v, num_steps, reorthogonalize)

        if probe_batch is None:
            quad = jax.vmap(run)(probes)
        else:
            quad = jax.lax.map(run, probes, batch_size=probe_batch)
    else:
        total = blocks * num_steps
        advance = jax.vmap(lambda s: lanczos_advance(op, s, num_steps,
                                                     reorthogonalize=reorthogonalize))
        states = jax.vmap(lambda v: lanczos_start(v, total))(probes)

        def quad_of(st):
            return jax.vmap(ritz_quadrature)(st.alphas, st.betas, st.valid)

        def sharp(st):
            fr = slq_fractions(assemble(quad_of(st)), target, z=z)
            return _sign_widths(fr) <= target_width

        def cond(carry):
            st, done = carry
            return (~done) & (st.steps[0] < total)

        def body(carry):
            st = advance(carry[0])
            return st, sharp(st)

        states, _ = jax.lax.while_loop(cond, body, body((states, False)))
        quad = quad_of(states)
    result = assemble(quad)
    probe_steps = jnp.asarray(num_steps) if blocks == 1 else jnp.max(states.steps)

    # 4. Tolerances: the grid, the chosen τ, and the fractions there.
    grid = jnp.asarray(REL_TOL_GRID) * scale
    grid_fr = jax.vmap(lambda t: slq_fractions(result, t, z=z))(grid)
    machine = krylov_tolerance(jnp.where(e_valid, e_nodes, jnp.nan), dim, tol_scale)
    if tol is not None:
        tau = jnp.asarray(tol, dtype=jnp.float64)
    elif tol_mode == "machine":
        tau = machine
    else:
        under = jnp.asarray(REL_TOL_GRID) <= resolve_ceiling * (1 + 1e-9)
        ok = (_sign_widths(grid_fr) <= resolve_width) & under
        top_under = jnp.maximum(jnp.sum(under) - 1, 0)
        tau = jnp.where(jnp.any(ok), grid[jnp.argmax(ok)], grid[top_under])
    fr = slq_fractions(result, tau, z=z)
    tau_rel = tau / jnp.where(scale > 0, scale, 1.0)
    extra = 2 * k if deflate else 1
    return KrylovSpectrum(
        min_ratio=fr.positive.mean, min_ratio_lo=fr.positive.lo, min_ratio_hi=fr.positive.hi,
        index=fr.negative.mean, index_lo=fr.negative.lo, index_hi=fr.negative.hi,
        null_fraction=fr.null.mean, null_fraction_lo=fr.null.lo, null_fraction_hi=fr.null.hi,
        lambda_min=bot[0], lambda_max=top[0],
        lambda_min_converged=bot_ok[0], lambda_max_converged=top_ok[0],
        largest=top, largest_residuals=top_rho, largest_converged=top_ok,
        smallest=bot, smallest_residuals=bot_rho, smallest_converged=bot_ok,
        nodes=result.nodes, weights=result.weights, node_residuals=result.residuals,
        node_valid=result.valid, node_coupling=result.coupling, fractions=fr, tolerance=tau,
        tolerance_rel=tau_rel, machine_tolerance=machine,
        resolved=(_sign_widths(fr) <= resolve_width) & (tau_rel <= resolve_ceiling * (1 + 1e-9)),
        grid_tolerance=grid,
        grid_fractions=grid_fr, verdict=verdict, escape_direction=ys[0],
        lambda_max_bound=c, deflated=deflated,
        num_deflated=jnp.sum(~jnp.isnan(deflated)), slack=slack, probe_mass=mass,
        probe_steps=probe_steps, conv_tol=jnp.asarray(conv_tol, dtype=jnp.float64),
        num_matvecs=num_steps + num_probes * probe_steps + (
            extra if check_matvec is None else n_checks), dim=jnp.asarray(dim),
        extremal_rayleigh=_pad_checked(rq, ys_ok, 2 * k),
        extremal_residuals=_pad_checked(rq_res, ys_ok, 2 * k),
        search_error=search_error, num_check_matvecs=jnp.asarray(
            0 if check_matvec is None else rq.shape[0] + n_checks))


def _search_error(matvec, check_matvec, units):
    """max over the unit rows u of ``units`` of ‖matvec(u) − check_matvec(u)‖ (zero rows
    give 0): the measured error of a low-precision operator against float64."""
    norms = jnp.linalg.norm(units, axis=1, keepdims=True)
    u = units / jnp.where(norms > 0, norms, 1.0)
    err = jax.vmap(lambda v: jnp.linalg.norm(matvec(v) - check_matvec(v)))(u)
    return jnp.max(jnp.where(norms[:, 0] > 0, err, 0.0))


def _pad_checked(values: Array, ok: Array, size: int) -> Array:
    """``values`` (the first len(values) of ``size`` extremal vectors) where ``ok``, NaN
    elsewhere and beyond."""
    out = jnp.full((size,), jnp.nan, dtype=jnp.float64)
    out = out.at[:values.shape[0]].set(values)
    return jnp.where(ok, out, jnp.nan)


def planted_operator(eigenvalues, seed: int = 0) -> Callable[[Array], Array]:
    r"""``v -> Q^T diag(λ) Q v`` for planted eigenvalues, with a random orthogonal
    :math:`Q = H_2 H_1 D` (D random signs, :math:`H_i = I - 2u_iu_i^\top` Householder
    reflections): eigenvectors spread over every coordinate, at :math:`O(n)` per product, so
    known spectra of size 1e5 and more can check SLQ, deflation and the verdict."""
    lam = jnp.asarray(eigenvalues, jnp.float64)
    rng = np.random.default_rng(seed)
    signs = jnp.asarray(rng.choice([-1.0, 1.0], lam.size))
    u1, u2 = (jnp.asarray(x / np.linalg.norm(x)) for x in rng.standard_normal((2, lam.size)))

    def reflect(u, v):
        return v - 2.0 * u * jnp.dot(u, v)

    def matvec(v):
        w = reflect(u2, reflect(u1, signs * v))
        return signs * reflect(u1, reflect(u2, lam * w))

    return matvec
