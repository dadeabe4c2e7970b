"""Theoretical index-vs-loss laws and small statistics for reporting (NumPy/SciPy, float64).

Bray & Dean (2007) and Pennington & Bahri (2017) curves, the coin-flip null model, loss-spread
summaries after Choromanska et al. (2015), and the Wilson interval for a share of minima.
The *index* α is the fraction of negative Hessian eigenvalues (REFERENCES §1).
"""

from typing import NamedTuple, Optional

import numpy as np
from scipy import optimize, stats


def bray_dean_index(x):
    r"""CDF of the unit semicircle law, F(x) = ½ + (x√(1−x²) + arcsin x)/π on [−1, 1].

    x is clipped to [−1, 1], so F = 0 for x ≤ −1 and F = 1 for x ≥ 1; F' = (2/π)√(1−x²).
    A semicircle spectrum of centre μ and radius R has index α = F(−μ/R)
    (:func:`semicircle_index`). Near the edge, the δ^{3/2} law (derived by integrating F'):

    .. math:: F(-1+\delta) = \tfrac{2}{3\pi}(2\delta)^{3/2}\bigl(1 - \tfrac{3}{20}\delta
              + O(\delta^2)\bigr) = \tfrac{4\sqrt2}{3\pi}\delta^{3/2} + \dots

    Parameters
    ----------
    x : array_like

    Returns
    -------
    ndarray of float64 in [0, 1]

    References
    ----------
    A. J. Bray and D. S. Dean, Phys. Rev. Lett. 98, 150201 (2007).
    """
    x = np.clip(np.asarray(x, dtype=np.float64), -1.0, 1.0)
    return 0.5 + (x * np.sqrt(1.0 - x * x) + np.arcsin(x)) / np.pi


def semicircle_index(mu, radius):
    r"""Fraction of negative eigenvalues of a semicircle of centre μ and radius R: α = F(−μ/R).

    Eigenvalues λ = μ + R t, t ~ semicircle on [−1, 1], are negative iff t < −μ/R. So μ ≥ R
    gives α = 0 (a minimum) and μ ≤ −R gives α = 1.

    Parameters
    ----------
    mu : array_like
        Centre of the spectrum.
    radius : array_like
        R > 0; the support is [μ − R, μ + R].

    Returns
    -------
    ndarray of float64
        Index α in [0, 1].

    References
    ----------
    Bray & Dean (2007); Dauphin et al., NeurIPS 2014, §3.
    """
    radius = np.asarray(radius, dtype=np.float64)
    if np.any(radius <= 0):
        raise ValueError("radius must be positive")
    return bray_dean_index(-np.asarray(mu, dtype=np.float64) / radius)


def _semicircle_quantile(p, n_iter=60):
    """Inverse of :func:`bray_dean_index` by vectorized bisection."""
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    lo, hi = np.full(p.shape, -1.0), np.full(p.shape, 1.0)
    for _ in range(n_iter):
        mid = 0.5 * (lo + hi)
        below = bray_dean_index(mid) < p
        lo, hi = np.where(below, mid, lo), np.where(below, hi, mid)
    return 0.5 * (lo + hi)


class BrayDeanFit(NamedTuple):
    """Fit of α(ε) = F(s(ε − ε_half)) (:func:`fit_bray_dean`); ``predict(loss)`` evaluates it."""

    slope: float  # s = −a/R; s > 0: index grows with the loss
    energy_half: float  # ε where α = ½; α = 0 below ε_half − 1/s
    residual_rms: float  # RMS of α − model
    n_points: int
    success: bool  # the optimizer's flag

    def predict(self, loss):
        """Model index F(s(ε − ε_half))."""
        return bray_dean_index(self.slope * (np.asarray(loss, dtype=np.float64) - self.energy_half))


def fit_bray_dean(loss, index):
    r"""Least-squares fit of the Bray–Dean index-vs-loss curve.

    The spectrum is a semicircle of fixed radius R whose centre moves linearly with the loss,
    μ(ε) = a(ε − ε_half), so α(ε) = F(−μ(ε)/R) = F(s(ε − ε_half)) with s = −a/R. Only s and
    ε_half are identifiable, and only if some 0 < α < 1. ``scipy.optimize.least_squares`` on
    α − model, started from a line fitted to F⁻¹(α) on the points with 0.02 < α < 0.98.

    Parameters
    ----------
    loss, index : array_like, shape (n,)
        Loss ε and observed index α of each critical point.

    Returns
    -------
    BrayDeanFit

    References
    ----------
    Bray & Dean (2007); Dauphin et al. (2014), Fig. 1.
    """
    eps = np.asarray(loss, dtype=np.float64).ravel()
    alpha = np.asarray(index, dtype=np.float64).ravel()
    if eps.shape != alpha.shape or eps.size < 2:
        raise ValueError("loss and index need the same length, at least 2")
    inner = (alpha > 0.02) & (alpha < 0.98)  # where F⁻¹ is informative
    x0 = [1.0 / max(np.ptp(eps), 1e-12), float(np.median(eps))]
    if inner.sum() >= 2 and np.ptp(eps[inner]) > 0:
        b, c = np.polyfit(eps[inner], _semicircle_quantile(alpha[inner]), 1)
        x0 = [b, -c / b] if b != 0 else x0
    sol = optimize.least_squares(
        lambda th: bray_dean_index(th[0] * (eps - th[1])) - alpha, x0=x0,
        method="lm" if eps.size > 2 else "trf")
    rms = float(np.sqrt(np.mean(sol.fun**2)))
    return BrayDeanFit(float(sol.x[0]), float(sol.x[1]), rms, int(eps.size), bool(sol.success))


def critical_energy(phi):
    r"""Pennington–Bahri energy εc(φ) below which the Hessian has no negative eigenvalues.

    .. math:: \varepsilon_c = \frac{1 - 20\varphi - 8\varphi^2 + (1+8\varphi)^{3/2}}{16}
              = \frac{4(1-\varphi)^3(1+t)}{(3+t)^3},\qquad t = \sqrt{1+8\varphi}.

    The factored form (the numerator equals (3−t)³(1+t)/8) is evaluated: no cancellation near
    φ = 1, where εc ≈ (1−φ)³/4.

    Parameters
    ----------
    phi : array_like
        φ = #parameters / (#data points × #outputs), in [0, 1].

    Returns
    -------
    ndarray of float64
        εc; 1/8 at φ = 0, 0 at φ = 1.

    References
    ----------
    J. Pennington and Y. Bahri, "Geometry of neural network loss surfaces via random matrix
    theory", ICML 2017.
    """
    phi = np.asarray(phi, dtype=np.float64)
    if np.any((phi < 0) | (phi > 1)):
        raise ValueError("critical_energy is defined for 0 <= phi <= 1")
    t = np.sqrt(1.0 + 8.0 * phi)
    return 4.0 * (1.0 - phi) ** 3 * (1.0 + t) / (3.0 + t) ** 3


def minimizer_energy(phi):
    r"""Observed minimizer energy ε_min = ½(1 − φ)² (an empirical fit, not a derivation).

    Parameters
    ----------
    phi : array_like

    Returns
    -------
    ndarray of float64

    References
    ----------
    Pennington & Bahri (2017), abstract and §5 (memorization of random targets).
    """
    return 0.5 * (1.0 - np.asarray(phi, dtype=np.float64)) ** 2


def pennington_bahri_index(eps, phi, alpha0):
    r"""Small-index law α ≈ α0 |(ε − εc)/εc|^{3/2} for ε > εc(φ), and 0 for ε ≤ εc.

    Parameters
    ----------
    eps : array_like
        Normalized energy ε (:func:`normalized_energy`).
    phi : float
        φ in [0, 1) (εc(1) = 0 makes the law degenerate).
    alpha0 : float
        Prefactor α0(φ) (≈ 0.033 at φ = 0.5 per REFERENCES §5, to verify).

    Returns
    -------
    ndarray of float64
        Predicted index; only meaningful while small (not clipped at 1).

    References
    ----------
    Pennington & Bahri (2017): the exponent is 3/2 (the lecture's "2/3" is a slip).
    """
    eps_c = critical_energy(phi)
    if np.any(eps_c <= 0):
        raise ValueError("need phi < 1 so that eps_c > 0")
    excess = np.maximum(np.asarray(eps, dtype=np.float64) - eps_c, 0.0) / eps_c
    return alpha0 * excess**1.5


def normalized_energy(raw_mse_loss, target_variance, half_factor_included=False):
    r"""Pennington & Bahri's energy ε from a mean-squared-error loss.

    .. math:: \varepsilon = \frac{1}{2\sigma_y^2}\,\frac{1}{mn}\sum_{\mu=1}^{m}\sum_{i=1}^{n}
              (\hat y_{i\mu} - y_{i\mu})^2

    ε carries the ½ and averages over all m·n residuals (m samples, n outputs) in units of unit
    target variance, so the zero predictor has ε = ½ = ε_min(φ = 0).

    Parameters
    ----------
    raw_mse_loss : array_like
        Mean over samples *and* outputs of the squared residual, without the ½ (divide a
        per-sample sum over outputs by n first).
    target_variance : float
        σ_y² per output. Their targets are centred Gaussians, where this is also the mean
        square; for non-centred targets and a model without biases pass E[y²] instead.
    half_factor_included : bool
        True if ``raw_mse_loss`` already carries the ½.

    Returns
    -------
    ndarray of float64

    References
    ----------
    Pennington & Bahri (2017), §2 (loss) and §5 (random Gaussian data).
    """
    if np.any(np.asarray(target_variance) <= 0):
        raise ValueError("target_variance must be positive")
    factor = 1.0 if half_factor_included else 0.5
    return factor * np.asarray(raw_mse_loss, dtype=np.float64) / target_variance


class PowerLawFit(NamedTuple):
    """Result of :func:`fit_power_law`; ``residual_rms`` is in log α."""

    exponent: float
    prefactor: float
    critical_energy: float
    exponent_interval: tuple  # bootstrap percentile interval for k at `confidence`
    confidence: float
    residual_rms: float
    n_points: int
    eps_c_fitted: bool
    exponent_samples: np.ndarray  # bootstrap replicates of k (NaN if degenerate)


def _ols(x, y, w):
    """Weighted OLS of y on x along the last axis (w = multiplicities): slope, intercept, SSE."""
    sw = w.sum(-1)
    xm, ym = (w * x).sum(-1) / sw, (w * y).sum(-1) / sw
    dx, dy = x - xm[..., None], y - ym[..., None]
    sxx = (w * dx * dx).sum(-1)
    with np.errstate(invalid="ignore", divide="ignore"):
        slope = np.where(sxx > 1e-300, (w * dx * dy).sum(-1) / sxx, np.nan)
    return slope, ym - slope * xm, (w * (dy - slope[..., None] * dx) ** 2).sum(-1)


def _log_excess(eps, eps_c):
    return np.log(np.maximum(eps - eps_c, 1e-300) / eps_c)


def _power_law_rows(eps, log_alpha, w, eps_c, n_grid):
    """(k, log α0, SSE, εc) for each row of multiplicities w, shape (B, n)."""
    if eps_c is not None:
        ec = np.full(w.shape[0], float(eps_c))
    else:  # εc = u·min(sampled ε), u on a grid in (0, 1) dense near 1, then a parabolic step
        u = 1.0 - np.geomspace(1.0, 1e-4, n_grid)[1:]
        u = np.concatenate([np.linspace(1e-3, u[0], 16, endpoint=False), u])
        eps_min = np.where(w > 0, eps, np.inf).min(-1)
        ec_grid = u[None, :, None] * eps_min[:, None, None]  # (B, G, 1)
        sse = _ols(_log_excess(eps, ec_grid), log_alpha, w[:, None, :])[2]
        sse = np.where(np.isfinite(sse), sse, np.inf)
        j = np.clip(np.argmin(sse, -1), 1, u.size - 2)
        s0, s1, s2 = (sse[np.arange(j.size), j + d] for d in (-1, 0, 1))
        u0, u1, u2 = u[j - 1], u[j], u[j + 1]
        num = (u1 - u0) ** 2 * (s1 - s2) - (u1 - u2) ** 2 * (s1 - s0)
        den = (u1 - u0) * (s1 - s2) - (u1 - u2) * (s1 - s0)
        with np.errstate(invalid="ignore", divide="ignore"):
            u_star = u1 - 0.5 * num / den
        ec = np.where(np.isfinite(u_star) & (u_star > u0) & (u_star < u2), u_star, u1) * eps_min
    return (*_ols(_log_excess(eps, ec[:, None]), log_alpha, w), ec)


def fit_power_law(eps, alpha, eps_c: Optional[float] = None, seed=0, n_boot=1000,
                  confidence=0.95, n_grid=200):
    r"""Fit α = α0((ε − εc)/εc)^k in log-log space, with a bootstrap interval for k.

    Least squares of log α = log α0 + k log((ε − εc)/εc) on the points with α > 0 and ε > εc
    (α = 0 carries no information on a log scale). If ``eps_c`` is None, εc is fitted too by a
    1-D search over (0, min ε) minimizing the residual sum of squares. The interval for k is a
    percentile bootstrap: points resampled with replacement, the whole fit (εc included)
    redone per resample; deterministic for a given ``seed``.

    Parameters
    ----------
    eps, alpha : array_like, shape (n,)
        Normalized energies and indices of the critical points.
    eps_c : float, optional
        Known critical energy (e.g. :func:`critical_energy`); fitted if None.
    seed : int
        Seed of ``numpy.random.default_rng`` for the resampling.
    n_boot : int
        Bootstrap resamples (0: NaN interval).
    confidence : float
        Coverage of the percentile interval.
    n_grid : int
        Grid size of the εc search.

    Returns
    -------
    PowerLawFit

    References
    ----------
    Pennington & Bahri (2017) (predicted k = 3/2); B. Efron and R. Tibshirani, *An
    Introduction to the Bootstrap* (1993), ch. 13.
    """
    eps = np.asarray(eps, dtype=np.float64).ravel()
    alpha = np.asarray(alpha, dtype=np.float64).ravel()
    keep = (alpha > 0) & np.isfinite(alpha) & np.isfinite(eps)
    if eps_c is not None:
        if eps_c <= 0:
            raise ValueError("eps_c must be positive")
        keep &= eps > eps_c
    eps, log_alpha, n = eps[keep], np.log(alpha[keep]), int(keep.sum())
    if n < 3:
        raise ValueError(f"need at least 3 points with alpha > 0 (and eps > eps_c), got {n}")
    k, c, sse, ec = _power_law_rows(eps, log_alpha, np.ones((1, n)), eps_c, n_grid)
    samples, interval = np.full(0, np.nan), (np.nan, np.nan)
    if n_boot > 0:
        idx = np.random.default_rng(seed).integers(0, n, size=(n_boot, n))
        w = np.zeros((n_boot, n))
        np.add.at(w, (np.arange(n_boot)[:, None], idx), 1.0)
        samples = np.concatenate([  # chunks bound the (B, grid, n) memory
            _power_law_rows(eps, log_alpha, w[i:i + 100], eps_c, n_grid)[0]
            for i in range(0, n_boot, 100)])
        tail = 50.0 * (1.0 - confidence)
        interval = tuple(float(v) for v in np.nanpercentile(samples, [tail, 100.0 - tail]))
    return PowerLawFit(float(k[0]), float(np.exp(c[0])), float(ec[0]), interval, confidence,
                       float(np.sqrt(sse[0] / n)), n, eps_c is None, samples)


def coin_flip_minimum_probability(P):
    r"""Pr[minimum] = 2^{−P} if the signs of P eigenvalues were independent fair coins.

    Parameters
    ----------
    P : int or array_like of int
        Number of parameters, P ≥ 0.

    Returns
    -------
    ndarray of float64
        2^{−P} (underflows to 0 beyond P ≈ 1074).

    References
    ----------
    The lecture's "local minima vs saddle point" heuristic; Dauphin et al. (2014), §2.
    """
    return np.ldexp(1.0, -np.asarray(P, dtype=np.int64))


def coin_flip_index_distribution(P):
    r"""Index α = K/P with K ~ Binomial(P, ½): Pr[α = k/P] = C(P, k) 2^{−P}.

    Mean ½ and standard deviation 1/(2√P): the null model concentrates at α = ½.

    Parameters
    ----------
    P : int
        Number of parameters, P ≥ 1.

    Returns
    -------
    index, pmf : ndarray, shape (P + 1,)
        The values k/P and their probabilities.

    References
    ----------
    As :func:`coin_flip_minimum_probability`.
    """
    if P < 1:
        raise ValueError("P must be >= 1")
    k = np.arange(P + 1)
    return k / P, stats.binom.pmf(k, P, 0.5)


QUANTILE_LEVELS = (0.05, 0.25, 0.5, 0.75, 0.95)


class LossSpread(NamedTuple):
    """Final-loss summary of the runs at one width (:func:`loss_spread_table`)."""

    width: int
    n_runs: int  # finite losses used
    n_diverged: int  # non-finite losses excluded
    mean: float
    std: float  # ddof = 1
    q05: float
    q25: float
    q50: float
    q75: float
    q95: float


def loss_spread_table(losses_by_width):
    r"""Mean, sample std (ddof = 1) and 5/25/50/75/95 % quantiles of final losses, per width.

    Quantiles by ``numpy.quantile`` (linear interpolation). Non-finite losses count as diverged
    runs and are excluded.

    Parameters
    ----------
    losses_by_width : dict[int, array_like]
        Final loss of each run, keyed by hidden width.

    Returns
    -------
    dict[int, LossSpread]
        In increasing width order.

    References
    ----------
    A. Choromanska, M. Henaff, M. Mathieu, G. Ben Arous, Y. LeCun, "The loss surfaces of
    multilayer networks", AISTATS 2015 (losses move down and narrow as width grows).
    """
    table = {}
    for width in sorted(losses_by_width):
        x = np.asarray(losses_by_width[width], dtype=np.float64).ravel()
        ok = x[np.isfinite(x)]
        if ok.size == 0:
            raise ValueError(f"width {width}: no finite losses")
        std = float(np.std(ok, ddof=1)) if ok.size > 1 else np.nan
        table[int(width)] = LossSpread(int(width), int(ok.size), int(x.size - ok.size),
                                       float(ok.mean()), std,
                                       *map(float, np.quantile(ok, QUANTILE_LEVELS)))
    return table


class Correlation(NamedTuple):
    """Pearson and Spearman correlations with two-sided p-values."""

    pearson: float
    pearson_pvalue: float
    spearman: float
    spearman_pvalue: float
    n: int


def train_test_correlation(train, test):
    r"""Pearson r = cov(x, y)/(σ_x σ_y) and Spearman ρ (Pearson of ranks) of paired losses.

    Pairs with a non-finite value are dropped; uses ``scipy.stats.pearsonr`` / ``spearmanr``.

    Parameters
    ----------
    train, test : array_like, shape (n,)
        Final train and test loss of each run.

    Returns
    -------
    Correlation

    References
    ----------
    Choromanska et al. (2015): the train/test correlation falls as the width grows.
    """
    x = np.asarray(train, dtype=np.float64).ravel()
    y = np.asarray(test, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError("train and test must be paired (same length)")
    ok = np.isfinite(x) & np.isfinite(y)
    if ok.sum() < 3:
        raise ValueError("need at least 3 finite pairs")
    pr, sr = stats.pearsonr(x[ok], y[ok]), stats.spearmanr(x[ok], y[ok])
    return Correlation(float(pr[0]), float(pr[1]), float(sr[0]), float(sr[1]), int(ok.sum()))


def wilson_interval(k, n, z=1.96):
    r"""Wilson score interval for a binomial proportion p̂ = k/n.

    .. math:: \Bigl(\hat p + \tfrac{z^2}{2n} \pm z\sqrt{\tfrac{\hat p(1-\hat p)}{n}
              + \tfrac{z^2}{4n^2}}\Bigr) \Big/ \bigl(1 + z^2/n\bigr)

    The p solving (p̂ − p)² = z² p(1 − p)/n; unlike Wald it is non-degenerate at k = 0 or n.

    Parameters
    ----------
    k : int or array_like
        Successes (e.g. minima among critical points), 0 ≤ k ≤ n.
    n : int or array_like
        Trials, n ≥ 1.
    z : float
        Standard-normal quantile (1.96 for 95 %).

    Returns
    -------
    (lower, upper) : floats, or arrays for array input

    References
    ----------
    E. B. Wilson, JASA 22, 209 (1927); A. Agresti and B. Coull, Am. Stat. 52, 119 (1998).
    """
    k, n = np.asarray(k, dtype=np.float64), np.asarray(n, dtype=np.float64)
    if np.any(n < 1) or np.any(k < 0) or np.any(k > n):
        raise ValueError("need n >= 1 and 0 <= k <= n")
    p, z2 = k / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    lo, hi = np.clip(centre - half, 0.0, 1.0), np.clip(centre + half, 0.0, 1.0)
    return (float(lo), float(hi)) if lo.ndim == 0 else (lo, hi)


def cluster_bootstrap_ratio(numerator, denominator, n_boot: int = 2000, seed: int = 0,
                            level: float = 0.95):
    r"""Percentile interval of a ratio R = Σ_i a_i / Σ_i b_i, resampling whole clusters i.

    Observations that share a cluster (critical points reached from snapshots of one training
    trajectory) are not independent, so a binomial interval over them (:func:`wilson_interval`)
    is too narrow. The cluster bootstrap draws m clusters with replacement, with counts
    c ~ Multinomial(m, 1/m), and recomputes

    .. math:: R^* = \frac{\sum_i c_i a_i}{\sum_i c_i b_i};

    the interval is the (1 ∓ level)/2 quantiles of R*. Resamples with Σ c_i b_i = 0 (only
    clusters without observations drawn) have no ratio and are left out. All of a cluster's
    observations enter or leave together, so the interval reflects how much the share moves
    from trajectory to trajectory.

    Parameters
    ----------
    numerator, denominator : (m,) per-cluster sums a_i (e.g. minima) and b_i ≥ 0 (e.g.
        certified points); fractional values are allowed (a point shared by clusters can be
        split between them).
    n_boot : resamples.
    seed : seed of ``numpy.random.default_rng``; the same inputs and seed give the same interval.
    level : coverage of the interval.

    Returns
    -------
    (lower, upper, n_valid) : the interval and the number of resamples with a ratio; (NaN, NaN,
    0) if no cluster has an observation.

    Notes
    -----
    With every a_i / b_i equal (all clusters agree) the interval collapses to that value, and
    with one observation per cluster it is the ordinary (percentile) bootstrap of a proportion.
    A share of 0 or 1 gives a zero-width interval: report a bound that counts each cluster once
    (``wilson_interval(0, m_observed)``) instead.

    References
    ----------
    A. C. Davison and D. V. Hinkley, *Bootstrap Methods and their Application* (1997), §3.8
    (resampling clusters); B. Field and A. H. Welsh, JRSS B 69, 369 (2007).
    """
    a = np.asarray(numerator, dtype=np.float64).ravel()
    b = np.asarray(denominator, dtype=np.float64).ravel()
    if a.shape != b.shape or a.size == 0:
        raise ValueError(f"numerator and denominator need the same non-empty shape, got "
                         f"{a.shape} and {b.shape}")
    if np.any(b < 0) or np.any(a < 0) or np.any(a > b * (1 + 1e-12) + 1e-12):
        raise ValueError("need 0 <= numerator <= denominator for every cluster")
    if not (0 < level < 1) or n_boot < 1:
        raise ValueError(f"need 0 < level < 1 and n_boot >= 1, got {level}, {n_boot}")
    if b.sum() == 0:
        return float("nan"), float("nan"), 0
    m = a.size
    counts = np.random.default_rng(seed).multinomial(m, np.full(m, 1.0 / m), size=n_boot)
    den = counts @ b
    ok = den > 0
    ratio = (counts[ok] @ a) / den[ok]
    lo, hi = np.quantile(ratio, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi), int(ok.sum())
