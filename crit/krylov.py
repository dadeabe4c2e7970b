r"""The Hessian spectrum of a large network from Hessian-vector products alone.

:func:`krylov_spectrum` is the matrix-free counterpart of :func:`crit.spectrum.exact_spectrum`:
one call gives what crit reports about a spectrum -- the extremal eigenvalues with convergence
diagnostics, and the fractions of positive, negative and null eigenvalues (minimum ratio,
index, null fraction) as point estimates *with intervals* -- plus the raw stochastic Lanczos
quadrature (SLQ) nodes and weights from which densities are drawn
(:func:`crit.slq.slq_density`, :func:`crit.slq.slq_log_density`).

It runs ``num_probes + 1`` Lanczos processes of ``num_steps`` steps each
(:func:`crit.lanczos.lanczos_tridiag`, full reorthogonalization, float64), all batched
together:

* one from a Gaussian random unit vector, whose Ritz values give the ``k`` largest and ``k``
  most negative eigenvalues (a Gaussian start has a nonzero component along every
  eigenvector with probability one; a Rademacher probe can be exactly orthogonal to
  structured eigenvectors such as :math:`(e_i - e_j)/\sqrt 2`);
* ``num_probes`` from Rademacher unit probes, the SLQ of Ghorbani, Krishnan & Xiao (2019),
  drawn exactly as :func:`crit.slq.slq` draws them from the same key, so the SLQ part equals
  ``slq(matvec, probe_key, dim, num_probes, num_steps)``.

The function is pure with static sizes, so it composes with ``jit`` and is ``vmap``-ped over
initializations (one Hessian operator per init) like every per-init analysis in crit.

Cost: ``(num_probes + 1) * num_steps`` matvecs; memory ``(num_probes + 1) * num_steps * dim``
floats for the Lanczos bases (all runs at once), or ``probe_batch * num_steps * dim`` with
``probe_batch`` set (runs in sequential groups).

References
----------
- B. Ghorbani, S. Krishnan, Y. Xiao (2019). An investigation into neural net optimization via
  Hessian eigenvalue density. ICML.
- G. H. Golub, G. Meurant (2010). Matrices, Moments and Quadrature with Applications.
- L. Sagun, L. Bottou, Y. LeCun (2016). Eigenvalues of the Hessian in deep learning.
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from crit.lanczos import lanczos_tridiag, tridiag_eigh
from crit.slq import SLQResult, SpectralFractions, slq_fractions

Array = jax.Array
EPS64 = float(np.finfo(np.float64).eps)


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
    """(num_probes, num_steps) SLQ Ritz values per probe (valid ones first, ascending)."""
    weights: Array
    """(num_probes, num_steps) SLQ weights (squared first components); rows sum to 1."""
    node_residuals: Array
    """(num_probes, num_steps) Ritz residual estimates of the SLQ nodes."""
    node_valid: Array
    """(num_probes, num_steps) bool, False for padding after a Lanczos breakdown."""
    fractions: SpectralFractions
    """Everything :func:`crit.slq.slq_fractions` returns (per-probe values, SEs, brackets)."""
    tolerance: Array
    r"""The :math:`\tau` used for the sign fractions."""
    conv_tol: Array
    """Relative residual tolerance of the ``*_converged`` flags."""
    num_matvecs: Array
    """Operator applications spent, ``(num_probes + 1) * num_steps``."""
    dim: Array
    """The operator's size n."""

    @property
    def slq(self) -> SLQResult:
        """The SLQ part as a :class:`crit.slq.SLQResult` (for densities and fractions)."""
        return SLQResult(self.nodes, self.weights, self.node_residuals, self.node_valid,
                         self.dim)


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
    nodes, vectors = tridiag_eigh(res.alphas, res.betas, res.valid)
    last = vectors[res.num_valid - 1]
    weights = jnp.where(res.valid, vectors[0] ** 2, 0.0)
    residuals = jnp.where(res.valid, jnp.abs(res.betas[res.num_valid - 1] * last), 0.0)
    return nodes, weights, residuals, res.valid


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


def krylov_spectrum(matvec: Callable[[Array], Array], key: Array, dim: int, *,
                    num_steps: int = 90, num_probes: int = 8, k: int = 5,
                    tol: Optional[float] = None, z: float = 2.0, tol_scale: float = 1.0,
                    conv_tol: float = 1e-8, probe_batch: Optional[int] = None,
                    reorthogonalize: bool = True) -> KrylovSpectrum:
    r"""Extremal eigenvalues and sign fractions (with intervals) of a symmetric operator.

    Parameters
    ----------
    matvec
        Symmetric ``v -> A v`` on flat float64 vectors of length ``dim`` (a Hessian-vector
        product: :func:`crit.hessian.hvp_operator` or
        :func:`crit.hessian.full_batch_hvp_operator`).
    key
        PRNG key. ``jax.random.split(key)`` gives ``(probe_key, start_key)``: the SLQ probes
        are those of ``crit.slq.slq(matvec, probe_key, ...)``, the extremal run starts at a
        normalized ``jax.random.normal(start_key, (dim,))``.
    dim
        Static size n of the operator (P, the number of parameters).
    num_steps
        Lanczos steps per run, m (Ghorbani et al. use ~90). Extremal eigenvalues converge at
        a rate set by their gap relative to the spectral width; SLQ brackets shrink with m.
    num_probes
        SLQ probes n_v (>= 2 for an empirical standard error).
    k
        Ritz values reported at each end (``1 <= k <= num_steps``).
    tol
        Absolute eigenvalue tolerance :math:`\tau` for the fractions. ``None``:
        :func:`krylov_tolerance`, :math:`\tau` = ``tol_scale`` :math:`\cdot n \epsilon
        \max|\theta|`, the float64 numerical-rank tolerance that
        :func:`crit.spectrum.default_tolerance` applies to exact eigenvalues, so that dense and
        Krylov results are comparable.
    z
        Standard errors added on each side of the bias bracket (see
        :func:`crit.slq.slq_fractions`).
    tol_scale
        Multiplier of the default tolerance (ignored when ``tol`` is given).
    conv_tol
        A Ritz value is ``converged`` when its residual estimate is at most ``conv_tol`` times
        the largest :math:`|\theta|`; the eigenvalue then lies within that distance (and
        within residual²/gap when isolated).
    probe_batch
        ``None``: all ``num_probes + 1`` runs at once (``vmap``; fastest). An integer b: runs
        in sequential groups of b (``lax.map``), memory ``b * num_steps * dim`` floats --
        for large ``dim``.
    reorthogonalize
        Full reorthogonalization in every run (default; without it ghost eigenvalues appear
        and the quadrature brackets are void).

    Returns
    -------
    KrylovSpectrum

    Notes
    -----
    The point estimate of the minimum ratio is the raw quadrature mass above :math:`\tau`
    averaged over probes, :math:`\hat p = n_v^{-1} \sum_l \sum_i w_i^{(l)}
    \mathbb{1}[\theta_i^{(l)} > \tau]`; :math:`\mathbb{E}_v \mu_v((\tau, \infty))` is the exact
    fraction. The interval holds the exact value unless the sampling error exceeds ``z``
    standard errors; its width is dominated by the weights of the Ritz values that bracket
    :math:`\pm\tau` (which a bulk near zero makes large) and shrinks with ``num_steps``.

    What to expect: m Lanczos steps resolve the spectrum only to about
    :math:`\lVert H \rVert / m^2` near its middle, so the *sign* of the many tiny eigenvalues
    of a network Hessian's bulk is out of reach at the default :math:`\tau` (about
    :math:`10^{-11} \lVert H \rVert`). Measured on an MLP with P = 5,260 (benchmarks/
    bench_slq.py): at :math:`\tau = P \epsilon \lVert H \rVert` the point estimate was off by
    0.2-0.35 and the interval was about [0.05, 0.95] (it did contain the exact value); at
    :math:`\tau = 10^{-3} \lVert H \rVert` after training the error was below 0.01 and the
    interval [0.06, 0.13]. Read the interval, not the point estimate, and pass a coarser
    ``tol`` to ask a question SLQ can answer. The extremal eigenvalues, in contrast, are
    exact to ~1e-15 relative once converged.
    """
    if not 1 <= k <= num_steps:
        raise ValueError(f"need 1 <= k <= num_steps, got k={k}, num_steps={num_steps}")
    if num_probes < 1:
        raise ValueError(f"num_probes must be >= 1, got {num_probes}")
    probe_key, start_key = jax.random.split(key)
    probes = jax.random.rademacher(probe_key, (num_probes, dim), dtype=jnp.float64)
    probes = probes / jnp.sqrt(dim)
    start = jax.random.normal(start_key, (dim,), dtype=jnp.float64)
    starts = jnp.concatenate([(start / jnp.linalg.norm(start))[None], probes])

    def run(v):
        return _quadrature(matvec, v, num_steps, reorthogonalize)

    if probe_batch is None:
        nodes, weights, residuals, valid = jax.vmap(run)(starts)
    else:
        nodes, weights, residuals, valid = jax.lax.map(run, starts, batch_size=probe_batch)

    (top, top_rho, top_ok), (bot, bot_rho, bot_ok) = _ends(
        nodes[0], residuals[0], valid[0], k, conv_tol)
    if tol is None:
        tau = krylov_tolerance(jnp.where(valid, nodes, jnp.nan), dim, tol_scale)
    else:
        tau = jnp.asarray(tol, dtype=jnp.float64)
    result = SLQResult(nodes[1:], weights[1:], residuals[1:], valid[1:], jnp.asarray(dim))
    fr = slq_fractions(result, tau, z=z)
    return KrylovSpectrum(
        min_ratio=fr.positive.mean, min_ratio_lo=fr.positive.lo, min_ratio_hi=fr.positive.hi,
        index=fr.negative.mean, index_lo=fr.negative.lo, index_hi=fr.negative.hi,
        null_fraction=fr.null.mean, null_fraction_lo=fr.null.lo, null_fraction_hi=fr.null.hi,
        lambda_min=bot[0], lambda_max=top[0],
        lambda_min_converged=bot_ok[0], lambda_max_converged=top_ok[0],
        largest=top, largest_residuals=top_rho, largest_converged=top_ok,
        smallest=bot, smallest_residuals=bot_rho, smallest_converged=bot_ok,
        nodes=result.nodes, weights=result.weights, node_residuals=result.residuals,
        node_valid=result.valid, fractions=fr, tolerance=tau,
        conv_tol=jnp.asarray(conv_tol, dtype=jnp.float64),
        num_matvecs=jnp.asarray((num_probes + 1) * num_steps), dim=jnp.asarray(dim))
