r"""Stochastic Lanczos quadrature (SLQ): spectral densities and sign fractions, matrix-free.

For symmetric :math:`A = \sum_i \lambda_i u_i u_i^\top` of size :math:`n` and a unit probe
:math:`v`, the spectral measure :math:`\mu_v = \sum_i (u_i^\top v)^2 \delta_{\lambda_i}` has
total mass 1, and for Rademacher :math:`v = z/\sqrt{n}` its mean is the empirical spectral
measure :math:`\frac1n \sum_i \delta_{\lambda_i}`. Lanczos run from :math:`v` for :math:`m`
steps gives the :math:`m`-node Gauss quadrature of :math:`\mu_v`: nodes = Ritz values
:math:`\theta_k` (eigenvalues of :math:`T_m`), weights = :math:`w_k = (e_1^\top s_k)^2`
(squared first components of its eigenvectors), exact for polynomials of degree
:math:`\le 2m-1` (Golub & Meurant 2010). Averaging over probes estimates the density.

References
----------
- B. Ghorbani, S. Krishnan, Y. Xiao (2019). An investigation into neural net optimization
  via Hessian eigenvalue density. ICML.
- S. Ubaru, J. Chen, Y. Saad (2017). Fast estimation of tr(f(A)) via stochastic Lanczos
  quadrature. SIAM J. Matrix Anal. Appl. 38(4).
- G. H. Golub, G. Meurant (2010). Matrices, Moments and Quadrature with Applications.
  Princeton; sec. 6.2 for the Chebyshev-Markov-Stieltjes inequalities.
- G. Szego (1975). Orthogonal Polynomials, 4th ed., sec. 3.41 (Chebyshev-Markov-Stieltjes).
"""

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from crit.lanczos import lanczos_tridiag, tridiag_eigh

Array = jax.Array


class SLQResult(NamedTuple):
    """Gauss quadratures of the probes' spectral measures, ``(num_probes, num_steps)`` each."""

    nodes: Array
    """Ritz values; per probe the valid ones come first, ascending; 0 where invalid."""
    weights: Array
    """Squared first eigenvector components; each row sums to 1; 0 where invalid."""
    residuals: Array
    r"""Ritz residuals :math:`|\beta_{k-1} s_{k-1,i}|` (exact arithmetic: true residual)."""
    valid: Array
    """bool, False for the padding after a Lanczos breakdown (see ``lanczos_tridiag``)."""
    dim: Array
    """() The operator's size :math:`n` (for the sampling-variance bound)."""
    mass: Optional[Array] = None
    r"""(n_v,) Probe masses :math:`\lVert v_l\rVert^2` (None: unit probes). A deflated run
    (:func:`crit.krylov.krylov_spectrum`) uses :math:`v_l = \Pi z_l/\sqrt n`, whose mass is
    :math:`\lVert \Pi z_l\rVert^2/n < 1`; its normalized quadrature is scaled by it."""
    deflated: Optional[Array] = None
    """(k,) Eigenvalue estimates taken out before the runs (deflated Ritz values; NaN: none)."""
    coupling: Optional[Array] = None
    r"""(n_v, m) Signed :math:`\beta_m s_{1i} s_{mi}` per node (first times last eigenvector
    component of :math:`T_m`): the residual of the probe's projection on a group of Ritz
    vectors is :math:`|\sum_i \beta_m s_{1i}s_{mi}|`, which cancels across a cluster. None:
    bounded by :math:`\sum_i \rho_i\sqrt{w_i}`."""
    slack: Optional[Array] = None
    r"""Weyl slack :math:`e`: every eigenvalue of the operator is within :math:`e` of one of
    ``deflated`` or of the deflated operator's (``None``: 0)."""


def slq(
    matvec: Callable[[Array], Array],
    key: Array,
    dim: int,
    num_probes: int,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
) -> SLQResult:
    r"""Stochastic Lanczos quadrature with unit-norm Rademacher probes.

    Parameters
    ----------
    matvec
        Symmetric ``v -> A v`` on flat float64 vectors of length ``dim``.
    key
        PRNG key for the probes :math:`v_l = z_l / \sqrt{n}`, :math:`z_l \in \{\pm1\}^n`.
    dim, num_probes, num_steps
        Static: :math:`n`, :math:`n_v`, :math:`m`. Ghorbani et al. use :math:`m \approx 90`.

    Returns
    -------
    SLQResult
        One Lanczos run per probe, vmapped (memory :math:`n_v m n` floats for the bases).
    """
    probes = jax.random.rademacher(key, (num_probes, dim), dtype=jnp.float64)
    probes = probes / jnp.sqrt(dim)

    def one_probe(v):
        res = lanczos_tridiag(
            matvec, v, num_steps, reorthogonalize=reorthogonalize, return_basis=False
        )
        return ritz_quadrature(res.alphas, res.betas, res.valid)

    nodes, weights, residuals, valid, coupling = jax.vmap(one_probe)(probes)
    return SLQResult(nodes, weights, residuals, valid, jnp.asarray(dim), coupling=coupling)


def ritz_quadrature(alphas: Array, betas: Array, valid: Array):
    r"""The Gauss quadrature of one Lanczos run's valid prefix: Ritz values (nodes), weights
    :math:`s_{1i}^2`, residual estimates :math:`|\beta s_{mi}|`, validity, and signed
    couplings :math:`\beta s_{1i} s_{mi}` (:attr:`SLQResult.coupling`)."""
    nodes, vectors = tridiag_eigh(alphas, betas, valid)
    last_step = jnp.maximum(jnp.sum(valid) - 1, 0)
    last, beta = vectors[last_step], betas[last_step]
    weights = jnp.where(valid, vectors[0] ** 2, 0.0)
    residuals = jnp.where(valid, jnp.abs(beta * last), 0.0)
    return nodes, weights, residuals, valid, jnp.where(valid, beta * last * vectors[0], 0.0)


def _valid_span(result: SLQResult) -> Array:
    nodes = result.nodes
    hi = jnp.max(jnp.where(result.valid, nodes, -jnp.inf))
    lo = jnp.min(jnp.where(result.valid, nodes, jnp.inf))
    span = jnp.maximum(hi - lo, jnp.maximum(jnp.abs(hi), jnp.abs(lo)))
    return jnp.where(span > 0, span, 1.0)


def default_sigma(result: SLQResult) -> Array:
    r"""Default kernel width: :math:`\sigma = \sqrt{10^{-5}}\,(\theta_{\max}-\theta_{\min})/2`.

    That is :math:`\sigma^2 = 10^{-5}` on the spectrum rescaled to :math:`[-1, 1]`, the choice
    of Ghorbani et al. (2019); google/spectral-density instead uses variance
    :math:`10^{-5}\max(1, \theta_{\max}-\theta_{\min})`, which is not scale-equivariant. It
    resolves outliers; widen it (try up to :math:`10^{-1}` in those units) for the bulk.
    """
    return jnp.sqrt(1e-5) * _valid_span(result) / 2.0


def _smooth(points: Array, weights: Array, grid: Array, sigma) -> Array:
    diff = (grid[:, None, None] - points[None]) / sigma
    kernel = jnp.exp(-0.5 * diff**2) / (sigma * jnp.sqrt(2.0 * jnp.pi))
    return jnp.einsum("gpm,pm->g", kernel, weights) / points.shape[0]


def slq_density(result: SLQResult, grid: Array, sigma: Optional[float] = None) -> Array:
    r"""Gaussian-smoothed spectral density on ``grid``.

    .. math:: \phi(t) = \frac{1}{n_v} \sum_{l=1}^{n_v} \sum_{k=1}^m w_k^{(l)}
              g_\sigma(t - \theta_k^{(l)}), \qquad
              g_\sigma(x) = \frac{e^{-x^2/(2\sigma^2)}}{\sigma\sqrt{2\pi}},

    which integrates to 1 over the real line. ``sigma=None`` uses :func:`default_sigma`.
    For sign fractions use :func:`slq_fractions`, not this: smoothing leaks mass across 0.
    """
    sigma = default_sigma(result) if sigma is None else sigma
    return _smooth(result.nodes, result.weights, grid, sigma)


def slq_log_density(
    result: SLQResult, log_grid: Array, *, sign: int = 1, tol: float = 0.0, sigma: float = 0.05
) -> Array:
    r"""Smoothed density of :math:`u = \log_{10}|\lambda|` over eigenvalues of one sign.

    .. math:: \psi_s(u) = \frac{1}{n_v} \sum_l \sum_k w_k^{(l)}\,
              \mathbb{1}[s\theta_k^{(l)} > \tau]\, g_\sigma(u - \log_{10}|\theta_k^{(l)}|)

    for ``sign`` :math:`s = \pm 1` and ``tol`` :math:`\tau \ge 0`. It integrates to the
    estimated fraction of eigenvalues with :math:`s\lambda > \tau`, so the two signs can be
    drawn on one axis. ``sigma`` is in decades (default 0.05, i.e. about 12% in
    :math:`|\lambda|`). This view resolves the bulk near zero that the linear density
    squeezes into a spike.
    """
    x = sign * result.nodes
    keep = result.valid & (x > tol)
    u = jnp.log10(jnp.where(keep, x, 1.0))
    return _smooth(u, jnp.where(keep, result.weights, 0.0), log_grid, sigma)


class FractionEstimate(NamedTuple):
    """Estimate of one spectral fraction, with its error budget."""

    per_probe: Array
    r"""(n_v,) :math:`p_l = \sum_k w_k^{(l)} \mathbb{1}[\theta_k^{(l)} \in S]` (raw quadrature)."""
    mean: Array
    """Mean of ``per_probe``: the point estimate."""
    stderr: Array
    """Standard error of the mean over probes (``std(ddof=1)/sqrt(n_v)``; NaN if n_v = 1)."""
    stderr_bound: Array
    r"""Rademacher bound :math:`\sqrt{2 \min(f, 1-f) / (n\, n_v)}` on the SE, with :math:`f`
    replaced by the bias bracket (see :func:`slq_fractions`)."""
    probe_lo: Array
    r"""(n_v,) Per-probe lower bound :math:`a_l \le \mu_{v_l}(S)` (quadrature bias only)."""
    probe_hi: Array
    r"""(n_v,) Per-probe upper bound :math:`b_l \ge \mu_{v_l}(S)`."""
    bias_lo: Array
    """Mean of ``probe_lo``."""
    bias_hi: Array
    """Mean of ``probe_hi``."""
    lo: Array
    """``clip(bias_lo - z * max(stderr, stderr_bound), 0, 1)``."""
    hi: Array
    """``clip(bias_hi + z * max(stderr, stderr_bound), 0, 1)``."""


class SpectralFractions(NamedTuple):
    """Fractions of eigenvalues above ``tol``, below ``-tol`` and in ``[-tol, tol]``."""

    positive: FractionEstimate
    negative: FractionEstimate
    null: FractionEstimate
    tol: Array
    z: Array


def _localized(theta, w, rho, ok, delta):
    """mu(theta_k - delta, theta_k + delta) >= (sqrt(w_k) - rho_k / delta)_+^2 where ok."""
    ok = ok & (delta > 0)
    root = jnp.sqrt(w) - rho / jnp.where(ok, delta, 1.0)
    return jnp.where(ok, jnp.maximum(root, 0.0) ** 2, 0.0)


def _neighbours(theta):
    prev = jnp.concatenate([jnp.array([-jnp.inf]), theta[:-1]])
    return prev, jnp.concatenate([theta[1:], jnp.array([jnp.inf])])


def _mass_below(theta, w, rho, valid, t, coupling, floor):
    """Lower bound on mu(-inf, t) from ascending nodes (invalid ones at +-inf, weight 0)."""
    m = theta.shape[0]
    below2 = jnp.concatenate([jnp.zeros(2), jnp.cumsum(w)[:-2]])[:m]  # sum_{i <= k-2} w_i
    prev, nxt = _neighbours(theta)
    inside = valid & (theta < t)
    n_le = jnp.sum(theta <= t)
    cms = jnp.sum(jnp.where(theta <= t, w, 0.0)) - jnp.where(n_le > 0, w[n_le - 1], 0.0)
    # Node k localized up to its left neighbour, plus CMS below that neighbour.
    reach = jnp.minimum(t - theta, theta - prev)
    single = below2 + _localized(theta, w, rho, inside, reach)
    # Same, plus every node above k (and below t) localized in disjoint half-gap intervals.
    gap = jnp.minimum(theta - prev, nxt - theta) / 2
    half = _localized(theta, w, rho, inside, jnp.minimum(t - theta, gap))
    first = _localized(theta, w, rho, inside, jnp.minimum(reach, (nxt - theta) / 2))
    chain = below2 + first + (jnp.sum(half) - jnp.cumsum(half))
    # Nodes k..j (j the last node below t) localized together (see _block_localized).
    j = jnp.max(jnp.where(inside, jnp.arange(m), 0))  # valid nodes are contiguous
    block = below2 + _block_localized(theta, w, coupling, valid, floor, jnp.arange(m), j,
                                      jnp.minimum(t - theta[j], theta - prev), inside)
    best = jnp.max(jnp.where(inside, jnp.maximum(jnp.maximum(single, chain), block), 0.0))
    return jnp.maximum(cms, best)


def _prefix(x):
    """Exclusive prefix sums: out[k] = sum_{i<k} x_i."""
    return jnp.concatenate([jnp.zeros(1), jnp.cumsum(x)])


def _block_localized(theta, w, coupling, valid, floor, k, j, delta, ok):
    r"""Lower bound on :math:`\mu_v(I)`, :math:`I = (\theta_k - \delta, \theta_j + \delta)`,
    from the Ritz pairs k..j together (vectorized over k, for one j).

    With :math:`Y` their Ritz vectors, :math:`W = \sum_{i=k}^j w_i` and the unit vector
    :math:`x = YY^\top v/\sqrt W` (:math:`x^\top v = \sqrt W`): about the centre
    :math:`\sigma` of I, :math:`(H - \sigma)x = Y(\Theta - \sigma)Y^\top v/\sqrt W +
    q_{m+1}\sum_i \beta_m s_{1i}s_{mi}/\sqrt W`, two orthogonal parts, so
    :math:`\lVert(H-\sigma)x\rVert^2 = (\sum_i (\theta_i-\sigma)^2 w_i + c^2)/W` with
    :math:`c = \sum_i \beta_m s_{1i}s_{mi}`. Every eigenvector outside I is at least
    :math:`h = (\theta_j - \theta_k)/2 + \delta` from :math:`\sigma`, so
    :math:`\lVert(1-P_I)x\rVert \le \lVert(H-\sigma)x\rVert/h` and
    :math:`\mu_v(I) = \lVert P_I v\rVert^2 \ge (\sqrt W - \lVert(H-\sigma)x\rVert/h)_+^2`.
    One node is the single-pair bound; a cluster of close Ritz values, which single pairs
    cannot separate, is localized as a whole, and its residuals partly cancel in c.
    """
    ok = ok & (delta > 0) & (k <= j)
    t_safe = jnp.where(valid, theta, 0.0)
    cw, c1, c2, cc = (_prefix(x) for x in (w, w * t_safe, w * t_safe**2, coupling))
    mass = cw[j + 1] - cw[k]
    sigma = (t_safe[k] + t_safe[j]) / 2
    spread2 = (c2[j + 1] - c2[k]) - 2 * sigma * (c1[j + 1] - c1[k]) + sigma**2 * mass
    c = jnp.abs(cc[j + 1] - cc[k])
    safe_mass = jnp.where(mass > 0, mass, 1.0)
    num = jnp.sqrt(jnp.maximum(spread2 + c**2, 0.0) / safe_mass) + floor
    h = jnp.where(ok, (t_safe[j] - t_safe[k]) / 2 + delta, 1.0)
    root = jnp.sqrt(jnp.maximum(mass, 0.0)) - num / h
    return jnp.where(ok & (mass > 0), jnp.maximum(root, 0.0) ** 2, 0.0)


def _probe_bounds(nodes, weights, residuals, valid, tol, slack=0.0, coupling=None):
    """Per-probe (lo, hi) for the positive, negative, null masses; see ``slq_fractions``.

    With ``slack`` e > 0 the lower bounds are taken at thresholds moved outwards by e and the
    upper bounds at thresholds moved inwards (Weyl: each eigenvalue may move by e).
    """
    m = nodes.shape[0]
    theta = jnp.where(valid, nodes, jnp.inf)  # ascending over all m slots
    w = jnp.where(valid, weights, 0.0)
    scale = jnp.max(jnp.where(valid, jnp.abs(nodes), 0.0))
    floor = m * jnp.finfo(theta.dtype).eps * scale  # rounding floor
    rho = residuals + floor
    # without the signed couplings, |sum beta s_1i s_mi| <= sum rho_i sqrt(w_i)
    cpl = jnp.where(valid, rho * jnp.sqrt(w) if coupling is None else coupling, 0.0)
    total = jnp.sum(w)
    below = lambda t: _mass_below(theta, w, rho, valid, t, cpl, floor)  # noqa: E731
    # mu(t, inf) for A is mu(-inf, -t) for -A, whose nodes are -theta reversed.
    above = lambda t: _mass_below(-theta[::-1], w[::-1], rho[::-1], valid[::-1],  # noqa: E731
                                  -t, cpl[::-1], floor)
    pos_lo, neg_lo = above(tol + slack), below(-tol - slack)
    pos_hi, neg_hi = total - below(tol - slack), total - above(-tol + slack)
    inner = tol - slack
    prev, nxt = _neighbours(theta)
    gap = jnp.minimum(theta - prev, nxt - theta) / 2
    delta = jnp.minimum(jnp.minimum(theta + inner, inner - theta), gap)
    between = valid & (jnp.abs(theta) < inner)
    direct = jnp.sum(_localized(theta, w, rho, between, delta))
    # all nodes inside (-inner, inner) localized together
    idx = jnp.arange(m)
    k = jnp.min(jnp.where(between, idx, m - 1))
    j = jnp.max(jnp.where(between, idx, 0))
    t_safe = jnp.where(valid, theta, 0.0)
    block = _block_localized(theta, w, cpl, valid, floor, k, j,
                             jnp.minimum(t_safe[k] + inner, inner - t_safe[j]), jnp.any(between))
    null_lo = jnp.maximum(total - pos_hi - neg_hi, jnp.maximum(direct, block))
    null_hi = total - pos_lo - neg_lo
    clip = lambda x: jnp.clip(x, 0.0, 1.0)  # noqa: E731
    return tuple(map(clip, (pos_lo, pos_hi, neg_lo, neg_hi, null_lo, null_hi)))


def _deflated_counts(deflated, tol, slack):
    """(point, lo, hi) counts of the deflated values that are positive, negative, null."""
    if deflated is None:
        zero = jnp.zeros((), jnp.int32)
        return ((zero,) * 3,) * 3
    d = jnp.where(jnp.isnan(deflated), 0.0, deflated)
    used = ~jnp.isnan(deflated)
    count = lambda sel: jnp.sum(used & sel)  # noqa: E731
    k = jnp.sum(used)
    pos = (count(d > tol), count(d > tol + slack), count(d > tol - slack))
    neg = (count(d < -tol), count(d < -tol - slack), count(d < -tol + slack))
    null = (k - pos[0] - neg[0], k - pos[2] - neg[2], k - pos[1] - neg[1])
    return pos, neg, null


def slq_fractions(result: SLQResult, tol: float, *, z: float = 2.0) -> SpectralFractions:
    r"""Fractions of positive, negative and null eigenvalues, with intervals.

    Point estimates come from the raw nodes and weights, per probe
    :math:`p_l = \sum_k w_k^{(l)} \mathbb{1}[\theta_k^{(l)} > \tau]` (positive),
    :math:`\mathbb{1}[\theta < -\tau]` (negative), :math:`\mathbb{1}[|\theta| \le \tau]`
    (null), averaged over probes. ``tol`` :math:`\tau` is absolute; pick it relative to
    :math:`\lambda_{\max}` and the float64 noise of the matvec.

    Each probe's true mass :math:`\mu_v(S)` differs from :math:`p_l` by quadrature bias, which
    is bracketed rigorously (exact arithmetic) by two bounds, intersected:

    1. Chebyshev-Markov-Stieltjes (CMS). With distinct nodes
       :math:`\theta_1 < \dots < \theta_m`, :math:`F(t) = \mu_v(-\infty, t]` and
       :math:`F(t-0) = \mu_v(-\infty, t)`, for every node :math:`\theta_j`:
       :math:`\sum_{i<j} w_i \le F(\theta_j - 0) \le F(\theta_j) \le \sum_{i \le j} w_i`.
       Hence, for any :math:`t`, with :math:`L(t) = \sum_{\theta_i < t} w_i` and
       :math:`U(t) = \sum_{\theta_i \le t} w_i` (the quadrature CDFs excluding and including
       a node at :math:`t`),

       .. math:: U(t) - w_{\lfloor t \rfloor} \le F(t-0) \le F(t) \le L(t) + w_{\lceil t \rceil},

       where :math:`w_{\lfloor t \rfloor}` is the weight of the largest node :math:`\le t`
       and :math:`w_{\lceil t \rceil}` of the smallest node :math:`\ge t` (0 if none). At a
       node this is :math:`[L, U]`; between :math:`\theta_j` and :math:`\theta_{j+1}` it is
       :math:`[U - w_j, U + w_{j+1}]`: the mass of the two nodes bracketing :math:`t` may lie
       on either side of it.
    2. Ritz localization. CMS alone never resolves a converged node sitting inside
       :math:`[-\tau, \tau]` (e.g. the exact-zero cluster): its whole weight stays
       uncertain. But if :math:`y_k` is the Ritz vector, :math:`\rho_k` its residual and
       :math:`P` the spectral projector of :math:`A` on :math:`I = (\theta_k - \delta,
       \theta_k + \delta)`, then :math:`\lVert (1-P) y_k \rVert \le \rho_k/\delta` and
       :math:`y_k^\top v = s_{1k}`, so :math:`\mu_v(I) = \lVert P v \rVert^2 \ge
       (\sqrt{w_k} - \rho_k/\delta)_+^2`. With :math:`\delta = \min(t - \theta_k,
       \theta_k - \theta_{k-1})` for a node below :math:`t`, adding the CMS bound for
       :math:`\mu_v(-\infty, \theta_k - \delta)` gives
       :math:`F(t-0) \ge \sum_{i \le k-2} w_i + (\sqrt{w_k} - \rho_k/\delta)_+^2`. A
       second family also adds, for every node between :math:`\theta_k` and :math:`t`, its
       localized mass in disjoint intervals (half the gaps to its neighbours, not past
       :math:`t`), with :math:`\delta` for node :math:`k` capped at half its right gap;
       after a breakdown (all :math:`\rho \approx 0`) this makes the bracket collapse to
       the exact mass. The best :math:`k` of both families is used; the mirror image
       (nodes of :math:`-A`) bounds the mass above :math:`t`. For the null mass, disjoint
       intervals around the nodes inside :math:`(-\tau, \tau)` give a direct lower bound.
       A third family localizes consecutive nodes k..j (j the last node below t) as one group
       (:func:`_block_localized`): their Ritz residuals share one direction
       :math:`q_{m+1}` and partly cancel, so a cluster whose Ritz values are closer together
       than their residuals (the null cluster of a network Hessian, seen by several nodes)
       is still resolved; the nodes inside :math:`(-\tau, \tau)` are also bounded as one
       group for the null mass.
       :math:`\rho_k` is floored at :math:`m\epsilon \max|\theta|` for rounding.

    Positive :math:`= 1 - F(\tau)`, negative :math:`= F(-\tau - 0)`, null = the rest; each
    gets per-probe :math:`[a_l, b_l]`. Since :math:`\mathbb{E}_v \mu_v(S)` is the exact
    fraction :math:`f`, the reported interval is
    :math:`[\bar a - z\,\mathrm{SE},\ \bar b + z\,\mathrm{SE}]`, clipped to [0, 1].

    The SE must be that of :math:`\mu_v(S)`, which is unobserved. The empirical SE of the raw
    :math:`p_l` stands in for it but can badly underestimate it (e.g. 0 when no node falls
    in :math:`S` yet). For :math:`v = z/\sqrt n` with Rademacher :math:`z` and the
    spectral projector :math:`P` on :math:`S`, exactly
    :math:`\mathrm{Var}\,\mu_v(S) = \frac{2}{n^2}(\lVert P\rVert_F^2 - \sum_i P_{ii}^2)
    \le 2\,\mathrm{rank}(P)/n^2 = 2f/n`, and also :math:`\le 2(1-f)/n` (complement);
    so SE :math:`\le \sqrt{2\min(f, 1-f)/(n\,n_v)}`, evaluated with :math:`\min(\bar b,
    1 - \bar a)` for :math:`\min(f, 1-f)`. The interval uses the larger of the two SEs.
    For large :math:`n` sampling error is negligible and the bias bracket dominates.
    ``z = 2`` (default) is about 95% coverage of the sampling error if it is near normal
    (Chebyshev guarantees 75%); the bias part is a bound, not a confidence statement. The
    bias bracket shrinks with :math:`m` (nodes near :math:`\pm\tau` carry less weight, the
    null node converges) and is exact after a breakdown; the SE shrinks like
    :math:`n_v^{-1/2}`. Near-duplicate nodes (no reorthogonalization) void CMS.

    Deflated runs (``result.mass``, ``result.deflated``, ``result.slack`` set by
    :func:`crit.krylov.krylov_spectrum`): the probes :math:`v_l = \Pi z_l/\sqrt n` have mass
    :math:`s_l = \lVert v_l\rVert^2`, and :math:`\mathbb{E}\, s_l \hat\mu_{l}(S)` is the
    number of eigenvalues of the compression :math:`Y_\perp^\top H Y_\perp` in S over n, so
    per-probe values and brackets are scaled by :math:`s_l`; the deflated Ritz values are
    counted directly. Every eigenvalue of H lies within the Weyl slack e of one of
    :math:`\mathrm{diag}(\Theta, Y_\perp^\top H Y_\perp)`, so lower bounds are taken at the
    thresholds :math:`\pm(\tau + e)` and upper bounds at :math:`\pm(\tau - e)`.
    """
    slack = 0.0 if result.slack is None else result.slack
    bounds = jax.vmap(_probe_bounds, in_axes=(0, 0, 0, 0, None, None, 0))(
        result.nodes, result.weights, result.residuals, result.valid, tol, slack,
        result.coupling
    )
    w, theta = result.weights, result.nodes
    mass = jnp.ones(theta.shape[0]) if result.mass is None else result.mass
    raws = (
        jnp.sum(jnp.where(theta > tol, w, 0.0), axis=1),
        jnp.sum(jnp.where(theta < -tol, w, 0.0), axis=1),
        jnp.sum(jnp.where(jnp.abs(theta) <= tol, w, 0.0), axis=1),
    )
    counts = _deflated_counts(result.deflated, tol, slack)
    num_probes = result.nodes.shape[0]
    estimates = []
    for i, p in enumerate(raws):
        p = mass * p
        se = jnp.std(p, ddof=1) / jnp.sqrt(num_probes) if num_probes > 1 else jnp.nan
        a, b = mass * bounds[2 * i], mass * bounds[2 * i + 1]
        b_lo, b_hi = jnp.mean(a), jnp.mean(b)
        f_max = jnp.clip(jnp.minimum(b_hi, 1.0 - b_lo), 0.0, 0.5)
        se_bound = jnp.sqrt(2.0 * f_max / (result.dim * num_probes))
        se_used = jnp.fmax(se, se_bound)  # fmax ignores the NaN of a single probe
        (c_mid, c_lo, c_hi), n = counts[i], result.dim
        b_lo, b_hi = b_lo + c_lo / n, b_hi + c_hi / n
        lo = jnp.clip(b_lo - z * se_used, 0.0, 1.0)
        hi = jnp.clip(b_hi + z * se_used, 0.0, 1.0)
        estimates.append(FractionEstimate(p, jnp.mean(p) + c_mid / n, se, se_bound, a, b, b_lo,
                                          b_hi, lo, hi))
    return SpectralFractions(*estimates, jnp.asarray(tol), jnp.asarray(z))
