r"""Stochastic estimators of the trace and the diagonal of a symmetric operator, with error bars.

Everything here takes a flat ``matvec`` :math:`v \mapsto Av` on :math:`\mathbb{R}^n` (for crit
a Hessian-vector product, :func:`crit.hessian.hvp_operator`) and never forms an
:math:`n \times n` matrix: the largest objects are :math:`n \times m` blocks of probes and
:math:`m \times m` Gram matrices, with :math:`m` the number of matvecs. Sizes (``dim``,
``num_matvecs``, ``batch_size``) and the confidence ``level`` are static, so each estimator
composes with :func:`jax.jit` and :func:`jax.vmap` (one estimate per seed or per init).

Estimators
----------
=========================  ==============================================  ==================
function                   estimate                                        error bar from
=========================  ==============================================  ==================
:func:`hutchinson_trace`   mean of :math:`z^\top A z`                       the m samples
:func:`hutchpp_trace`      :math:`\mathrm{tr}(Q^\top AQ)` + Hutchinson on  the m/3 remainder
                           the deflated remainder                          samples
:func:`xtrace`             mean of m/2 leave-one-out Hutch++ estimates     their spread
:func:`hutchinson_diagonal` mean of :math:`z \odot Az`                      the m samples
:func:`xdiag`              mean of m/2 leave-one-out Diag++ estimates      their spread
:func:`slq_trace`          an SLQ run's quadratures (no extra matvec)      the probes
=========================  ==============================================  ==================

:func:`trace_to_width` repeats any trace estimator with a doubled budget until the
confidence interval is narrow enough, and counts every product it spent.

Intervals
---------
Every error bar is the standard error of a mean of :math:`k` (approximately) independent,
identically distributed samples, :math:`\mathrm{SE} = s_k/\sqrt k` with :math:`s_k` the sample
standard deviation (``ddof=1``), and the interval is
:math:`\hat t \pm t_{k-1,(1+\ell)/2}\,\mathrm{SE}`, the Student-t quantile with :math:`k-1`
degrees of freedom at level :math:`\ell` (default 0.95; 2.045 for :math:`k = 30`, 1.96 as
:math:`k \to \infty`). It is exact for normal samples and asymptotically right otherwise;
it under-covers when the samples are heavy-tailed and :math:`k` small (a spectrum with one
dominant eigenvector aligned with few coordinates is the bad case for Rademacher probes).
What each estimator's samples are, and any further assumption, is in its docstring.

Defaults and why
----------------
- Hutchinson probes are Rademacher: among probes with :math:`E[zz^\top]=I` they minimize
  the variance, :math:`\mathrm{Var}\,z^\top Az = 2(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)`
  (Gaussian: :math:`2\lVert A\rVert_F^2`). Sketches that only span a range (Hutch++'s
  :math:`S`) are Gaussian.
- ``batch_size=None`` pushes all probes of a stage through ``jax.vmap(matvec)`` at once;
  an integer runs them through :func:`jax.lax.map` in groups of that size, so peak memory is
  ``batch_size`` matvecs' worth of activations (a network's HVP), at the price of a loop.

References
----------
- M. F. Hutchinson (1989). A stochastic estimator of the trace of the influence matrix for
  Laplacian smoothing splines. Commun. Stat. Simul. Comput. 18(3).
- R. A. Meyer, C. Musco, C. Musco, D. P. Woodruff (2021). Hutch++: optimal stochastic trace
  estimation. SOSA.
- E. N. Epperly, J. A. Tropp, R. J. Webber (2024). XTrace: making the most of every sample
  in stochastic trace estimation. SIAM J. Matrix Anal. Appl. 45(1).
- C. Bekas, E. Kokiopoulou, Y. Saad (2007). An estimator for the diagonal of a matrix.
  Appl. Numer. Math. 57.
- R. A. Baston, Y. Nakatsukasa (2022). Stochastic diagonal estimation: probabilistic bounds
  and an improved algorithm (Diag++). arXiv:2201.10684.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
from scipy import stats

from crit.slq import SLQResult

Array = jax.Array
Matvec = Callable[[Array], Array]


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["estimate", "std_error", "lo", "hi", "num_matvecs", "samples"],
    meta_fields=["num_samples", "level", "method"],
)
@dataclasses.dataclass(frozen=True)
class TraceEstimate:
    """A trace estimate with its error bar (a pytree: jit / vmap return it batched)."""

    estimate: Array
    r"""The estimate of :math:`\mathrm{tr}(A)`."""
    std_error: Array
    """Standard error of ``estimate`` (sample std of ``samples`` over sqrt(num_samples))."""
    lo: Array
    """Lower end of the ``level`` confidence interval (Student-t, ``num_samples - 1`` dof)."""
    hi: Array
    """Upper end of the interval."""
    num_matvecs: Array
    """int, operator products spent on this estimate."""
    samples: Array
    """(num_samples,) The values whose spread gives ``std_error``: Hutchinson samples
    (``hutchinson``), remainder samples before the exact part is added (``hutch++``), or the
    leave-one-out estimates (``xtrace``), per-probe quadratures (``slq``)."""
    num_samples: int
    """Static: how many samples the standard error rests on."""
    level: float
    """Static: the confidence level of ``[lo, hi]``."""
    method: str
    """Static: which estimator produced it."""

    @property
    def rel_width(self) -> Array:
        """(hi - lo) / |estimate|: the interval's width relative to the estimate."""
        return (self.hi - self.lo) / jnp.abs(self.estimate)


@functools.partial(
    jax.tree_util.register_dataclass,
    data_fields=["estimate", "std_error", "lo", "hi", "num_matvecs"],
    meta_fields=["num_samples", "level", "method"],
)
@dataclasses.dataclass(frozen=True)
class DiagonalEstimate:
    """An estimate of diag(A) with elementwise error bars (a pytree)."""

    estimate: Array
    """(n,) The estimate of the diagonal."""
    std_error: Array
    """(n,) Elementwise standard error."""
    lo: Array
    """(n,) Lower ends of the elementwise ``level`` intervals (Student-t)."""
    hi: Array
    """(n,) Upper ends."""
    num_matvecs: Array
    """int, operator products spent."""
    num_samples: int
    level: float
    method: str


def t_quantile(level: float, num_samples: int) -> float:
    r"""The two-sided Student-t multiplier :math:`t_{k-1,(1+\ell)/2}` for :math:`k` samples.

    A Python float (``level`` and ``num_samples`` are static), so it costs nothing under jit.
    """
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be in (0, 1), got {level}")
    if num_samples < 2:
        raise ValueError(f"an error bar needs at least 2 samples, got {num_samples}")
    return float(stats.t.ppf(0.5 * (1.0 + level), num_samples - 1))


def _static_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be a static Python int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be at least {minimum}, got {value}")
    return value


def _apply(matvec: Matvec, vectors: Array, batch_size: Optional[int]) -> Array:
    """Rows A v of a (k, n) block of vectors: all at once (vmap) or in lax.map groups."""
    if batch_size is None or batch_size >= vectors.shape[0]:
        return jax.vmap(matvec)(vectors)
    return jax.lax.map(matvec, vectors, batch_size=_static_int("batch_size", batch_size, 1))


def _mean_and_error(samples: Array, axis: int = 0):
    k = samples.shape[axis]
    return jnp.mean(samples, axis=axis), jnp.std(samples, axis=axis, ddof=1) / math.sqrt(k)


def _trace_record(samples, offset, num_matvecs, level, method,
                  std_error=None) -> TraceEstimate:
    mean, se = _mean_and_error(samples)
    se = se if std_error is None else std_error
    estimate = offset + mean
    half = t_quantile(level, samples.shape[0]) * se
    return TraceEstimate(estimate, se, estimate - half, estimate + half,
                         jnp.asarray(num_matvecs), samples, samples.shape[0], level, method)


def _diagonal_record(samples, num_matvecs, level, method,
                     std_error=None) -> DiagonalEstimate:
    estimate, se = _mean_and_error(samples)
    se = se if std_error is None else std_error
    half = t_quantile(level, samples.shape[0]) * se
    return DiagonalEstimate(estimate, se, estimate - half, estimate + half,
                            jnp.asarray(num_matvecs), samples.shape[0], level, method)


def hutchinson_trace(matvec: Matvec, key: Array, dim: int, num_matvecs: int, *,
                     dtype=jnp.float64, level: float = 0.95,
                     batch_size: Optional[int] = None) -> TraceEstimate:
    r"""Hutchinson's estimator :math:`\hat t = \frac1m \sum_{j=1}^m z_j^\top A z_j`.

    With i.i.d. Rademacher :math:`z_j \in \{\pm1\}^n`, each sample is unbiased,
    :math:`E\,z^\top Az = \mathrm{tr}(A)`, with variance
    :math:`2(\lVert A\rVert_F^2 - \sum_i A_{ii}^2)` (Hutchinson 1989). The relative error
    therefore falls like :math:`m^{-1/2}` whatever the spectrum.

    Parameters
    ----------
    matvec
        Symmetric ``v -> A v`` on flat vectors of length ``dim`` and dtype ``dtype``.
    key
        PRNG key for the probes.
    dim, num_matvecs
        Static :math:`n` and :math:`m \ge 2` (one matvec per probe).
    dtype
        Dtype of the probes (the operator's).
    level
        Static confidence level of ``[lo, hi]``.
    batch_size
        Probes per :func:`jax.lax.map` step (None: all at once under vmap).

    Returns
    -------
    TraceEstimate
        ``samples`` are the :math:`m` values :math:`z_j^\top Az_j`; the interval is the
        Student-t interval of their mean (i.i.d. samples, exactly; normality, approximately).
    """
    m = _static_int("num_matvecs", num_matvecs, 2)
    z = jax.random.rademacher(key, (m, dim), dtype=dtype)
    samples = jnp.sum(z * _apply(matvec, z, batch_size), axis=1)
    return _trace_record(samples, 0.0, m, level, "hutchinson")


def hutchpp_split(num_matvecs: int) -> tuple[int, int]:
    """Hutch++'s budget split ``(k, l)``: k sketch columns (2k products) and l = m - 2k
    remainder probes, k = m // 3, so every one of the m products is used."""
    m = _static_int("num_matvecs", num_matvecs, 4)
    k = m // 3
    return k, m - 2 * k


def hutchpp_trace(matvec: Matvec, key: Array, dim: int, num_matvecs: int, *,
                  dtype=jnp.float64, level: float = 0.95,
                  batch_size: Optional[int] = None) -> TraceEstimate:
    r"""Hutch++ (Meyer, Musco, Musco & Woodruff 2021): deflate a sketched range, then Hutchinson.

    With :math:`k = \lfloor m/3 \rfloor` and :math:`l = m - 2k` (:func:`hutchpp_split`):
    a Gaussian sketch :math:`S \in \mathbb{R}^{n\times k}`, :math:`Q = \mathrm{orth}(AS)`
    (k products), the exact part :math:`\mathrm{tr}(Q^\top AQ)` (k products), and Hutchinson
    with l Rademacher probes on the deflated remainder :math:`(I-QQ^\top)A(I-QQ^\top)`,
    whose trace is :math:`\mathrm{tr}(A) - \mathrm{tr}(Q^\top AQ)`:

    .. math:: \hat t = \mathrm{tr}(Q^\top AQ) + \frac1l \sum_{j=1}^l g_j^\top
              (I-QQ^\top)A(I-QQ^\top) g_j \qquad (l \text{ products}).

    It is unbiased, and when the spectrum decays the remainder's Frobenius norm, hence the
    error, is far smaller than Hutchinson's: :math:`O(1/m)` relative error for PSD
    :math:`A` against Hutchinson's :math:`O(m^{-1/2})`.

    Given :math:`Q` the remainder samples are i.i.d. and the exact part has no variance, so
    ``std_error`` is the remainder samples' standard error and the interval the Student-t
    interval with :math:`l-1` degrees of freedom, valid conditionally on the sketch (and so
    unconditionally). Exactly ``num_matvecs`` products are spent (:math:`m \ge 4`).
    Parameters as :func:`hutchinson_trace`.
    """
    k, l = hutchpp_split(num_matvecs)
    if k > dim:
        raise ValueError(f"hutchpp_trace: sketch size {k} exceeds dim {dim}")
    key_s, key_g = jax.random.split(key)
    sketch = jax.random.normal(key_s, (k, dim), dtype=dtype)
    q, _ = jnp.linalg.qr(_apply(matvec, sketch, batch_size).T)       # (n, k)
    exact = jnp.sum(q.T * _apply(matvec, q.T, batch_size))           # tr(Q^T A Q)
    g = jax.random.rademacher(key_g, (l, dim), dtype=dtype)
    g = g - (g @ q) @ q.T                                            # (I - QQ^T) g_j
    samples = jnp.sum(g * _apply(matvec, g, batch_size), axis=1)
    return _trace_record(samples, exact, 2 * k + l, level, "hutch++")


class _Exchangeable(NamedTuple):
    """What XTrace and XDiag share: one QR of A Omega and the leave-out directions."""

    omega: Array   # (n, s) probes, columns
    q: Array       # (n, s) orthonormal basis of range(A Omega)
    r: Array       # (s, s) A Omega = Q R
    z: Array       # (n, s) A Q
    c: Array       # (s, s) C = R^{-T}: column i is orthogonal to R e_j for every j != i
    gram: Array    # (s, s) G = C^T C


def _upper_inverse(r: Array) -> Array:
    r""":math:`R^{-1}` of an upper-triangular :math:`R` by back substitution, in plain jnp.

    Row i of :math:`X = R^{-1}` is :math:`(e_i - \sum_{j>i} R_{ij}X_j)/R_{ii}`, filled from the
    last row up (rows not yet filled are zero, so ``r[i] @ x`` is that sum). Not a LAPACK call
    on purpose: under ``vmap`` (a batch of seeds or inits) jaxlib's CPU LAPACK kernels split
    the batch over the intra-op thread pool and block on it, and two of them running at once
    (the QR's ``orgqr`` beside a ``getrf`` or ``trsm`` here) deadlocked a 2-core machine
    (jax 0.10.2, batch >= ~150).
    """
    s = r.shape[0]
    eye = jnp.eye(s, dtype=r.dtype)

    def row(k, x):
        i = s - 1 - k
        return x.at[i].set((eye[i] - r[i] @ x) / r[i, i])

    return jax.lax.fori_loop(0, s, row, jnp.zeros_like(r))


def _exchangeable(matvec, key, dim, num_matvecs, dtype, batch_size, name):
    m = _static_int("num_matvecs", num_matvecs, 4)
    s = m // 2
    if s > dim:
        raise ValueError(f"{name}: {s} probes exceed dim {dim}")
    omega = jax.random.rademacher(key, (s, dim), dtype=dtype)
    q, r = jnp.linalg.qr(_apply(matvec, omega, batch_size).T)
    z = _apply(matvec, q.T, batch_size).T
    c = _upper_inverse(r).T
    return _Exchangeable(omega.T, q, r, z, c, c.T @ c), 2 * s


def _pair_inverse(gram: Array):
    r"""Entries of :math:`g^{-1}` for every pair, :math:`g = [[G_{ii}, G_{ik}], [G_{ik},
    G_{kk}]]`: ``(a_ii, a_ik, a_kk)``, each (s, s) indexed [i, k]; zero on the diagonal."""
    gd = jnp.diag(gram)
    off = ~jnp.eye(gram.shape[0], dtype=bool)
    det = jnp.where(off, gd[:, None] * gd[None, :] - gram**2, 1.0)
    keep = lambda x: jnp.where(off, x / det, 0.0)  # noqa: E731
    return keep(gd[None, :]), keep(-gram), keep(gd[:, None])


def _pair_covariance(delta: Array, axis_i: int, axis_k: int) -> Array:
    r""":math:`\hat\kappa = \frac{1}{s(s-1)}\sum_{i\ne k}\Delta_{ik}\Delta_{ki}` (the diagonal
    of ``delta`` is zero)."""
    s = delta.shape[axis_i]
    return jnp.sum(delta * jnp.swapaxes(delta, axis_i, axis_k), axis=(axis_i, axis_k)) / (
        s * (s - 1))


def _xtrace_replicates(ex: _Exchangeable):
    r"""Leave-one-out estimates :math:`\hat t_i` (s,) and leave-two-out :math:`\hat t_{i,-k}`
    (s, s) of :func:`xtrace`, all in :math:`s\times s` algebra (diagonal of the second: 0)."""
    h = ex.q.T @ ex.z
    h = 0.5 * (h + h.T)
    w = ex.q.T @ ex.omega
    x = ex.c.T @ w                       # x[a, i] = c_a^T w_i
    y = ex.c.T @ (h @ w)                 # y[a, i] = c_a^T H w_i
    mm = ex.c.T @ h @ ex.c               # M = C^T H C
    quad = jnp.sum(ex.omega * (ex.q @ ex.r), axis=0)   # omega_i^T A omega_i (A omega_i = Q r_i)
    wr = jnp.sum(w * ex.r, axis=0)                     # w_i^T r_i
    whw = jnp.sum(w * (h @ w), axis=0)                 # w_i^T H w_i
    base = jnp.trace(h) + quad - 2.0 * wr + whw
    gd, xd, yd, md = (jnp.diag(a) for a in (ex.gram, x, y, mm))
    # One left out: g = G_ii, beta = x_ii / G_ii.
    beta = xd / gd
    loo = base - md / gd + 2.0 * beta - 2.0 * beta * yd + beta**2 * md
    # Two left out (i, k): g 2x2, x = (x_ii, x_ki), y = (y_ii, y_ki), beta = g^{-1} x.
    a_ii, a_ik, a_kk = _pair_inverse(ex.gram)
    x0, x1, y0, y1 = xd[:, None], x.T, yd[:, None], y.T
    m_ii, m_ik, m_kk = md[:, None], mm, md[None, :]
    b0, b1 = a_ii * x0 + a_ik * x1, a_ik * x0 + a_kk * x1
    lto = (base[:, None] - (a_ii * m_ii + 2.0 * a_ik * m_ik + a_kk * m_kk) + 2.0 * b0
           - 2.0 * (b0 * y0 + b1 * y1) + b0**2 * m_ii + 2.0 * b0 * b1 * m_ik + b1**2 * m_kk)
    return loo, jnp.where(jnp.eye(loo.shape[0], dtype=bool), 0.0, lto)


def xtrace(matvec: Matvec, key: Array, dim: int, num_matvecs: int, *, dtype=jnp.float64,
           level: float = 0.95, batch_size: Optional[int] = None) -> TraceEstimate:
    r"""XTrace (Epperly, Tropp & Webber 2024): the exchangeable, leave-one-out Hutch++.

    With :math:`s = \lfloor m/2 \rfloor` Rademacher probes :math:`\Omega = [\omega_1, \dots,
    \omega_s]` every probe is used both to sketch and to test. Let :math:`P_i` be the
    orthogonal projector on :math:`A\Omega_{-i}` (the sketch without column i). Because
    :math:`\omega_i` is independent of :math:`P_i`,

    .. math:: \hat t_i = \mathrm{tr}(P_i A) + \omega_i^\top (I-P_i)A(I-P_i)\,\omega_i

    is an unbiased Hutch++ estimate with sketch :math:`s-1` and one test probe, and XTrace
    is :math:`\hat t = \frac1s\sum_i \hat t_i` (:math:`2s` products: :math:`A\Omega` and
    :math:`AQ`).

    Efficient form. One QR :math:`A\Omega = QR` serves every leave-out set: with
    :math:`C = R^{-\top}` (column :math:`c_i \perp Re_j` for all :math:`j \ne i`),
    :math:`\mathrm{range}(A\Omega_{-J}) = Q\,\{c_j : j \in J\}^\perp`, so
    :math:`P_{-J} = Q(I - \Pi_J)Q^\top` with :math:`\Pi_J = C_J(C_J^\top C_J)^{-1}C_J^\top`.
    With :math:`H = Q^\top AQ`, :math:`w_i = Q^\top\omega_i`, :math:`r_i = Re_i =
    Q^\top A\omega_i` (so :math:`C^\top r_i = e_i`), :math:`a = (I-\Pi_J)w_i` and symmetric
    :math:`A`, :math:`(I-P_{-J})\omega_i = \omega_i - Qa` and

    .. math:: \hat t_{i,-J} = \mathrm{tr}H - \mathrm{tr}(\Pi_J H) + \omega_i^\top A\omega_i
              - 2a^\top r_i + a^\top H a ,

    which needs only :math:`C^\top C`, :math:`C^\top HC`, :math:`C^\top W`, :math:`C^\top HW`
    restricted to the :math:`|J| \le 2` indices of J: :math:`s\times s` algebra after the
    two blocks of products. Requires :math:`A\Omega` of full column rank (rank
    :math:`A \ge s`); otherwise R is singular and the result is not finite.

    Error bar (derived here; it is not the paper's). :math:`\hat t_i = \mathrm{tr}A +
    \varepsilon_i` with :math:`\varepsilon_i` the Hutchinson error of :math:`\omega_i` on
    :math:`(I-P_i)A(I-P_i)`, :math:`E[\varepsilon_i\mid\Omega_{-i}] = 0`. Exchangeability
    gives :math:`\mathrm{Var}\,\hat t = \sigma^2/s + \frac{s-1}{s}\kappa` with
    :math:`\sigma^2 = \mathrm{Var}\,\varepsilon_i`, :math:`\kappa =
    \mathrm{Cov}(\varepsilon_i, \varepsilon_k)`, and the sample variance :math:`v` of the
    :math:`\hat t_i` has mean :math:`\sigma^2 - \kappa`, so

    .. math:: \mathrm{Var}\,\hat t = \frac{E v}{s} + \kappa .

    The paper's estimate :math:`v/s` drops :math:`\kappa`, which is not small: :math:`\varepsilon_i`
    depends on :math:`\omega_k` through :math:`P_i`, and for :math:`A = cI` (Rademacher,
    :math:`n \gg s`) :math:`\varepsilon_i \approx c\sum_{k\ne i}(1 - g_{ik}^2)` with
    :math:`g_{ik} = \omega_i^\top\omega_k/\sqrt n` shared by :math:`\varepsilon_i` and
    :math:`\varepsilon_k`, so the variance is twice :math:`E v/s` (measured: 0.43-0.5 of the
    true variance on flat and decaying spectra, 81-84% coverage of a nominal 95% interval).
    Only the components of :math:`\varepsilon_i` that involve :math:`\omega_k` are shared
    (Hoeffding decomposition), and they are what leaving :math:`\omega_k` out of the sketch
    removes: :math:`\Delta_{ik} = \hat t_i - \hat t_{i,-k}` (the estimate from probe i with
    sketch :math:`\Omega_{-\{i,k\}}`, mean zero). Hence

    .. math:: \hat\kappa = \frac{1}{s(s-1)}\sum_{i\ne k}\Delta_{ik}\Delta_{ki}, \qquad
              \mathrm{SE}^2 = \frac{v}{s} + \hat\kappa

    (exact in the :math:`A = cI` model, and :math:`\hat\kappa \approx 0` when the remainder
    noise is per-probe, the Hutchinson regime), floored at 0. The interval is Student-t with
    :math:`s-1` degrees of freedom; it assumes :math:`\hat t` near normal and that
    interactions of three or more probes are negligible.

    The paper's "improved" variant (probes on the sphere of radius :math:`\sqrt n`, with a
    rescaled remainder) is not implemented; with Rademacher probes each :math:`\hat t_i` is
    exactly unbiased. ``samples`` are the :math:`\hat t_i`. Parameters as
    :func:`hutchinson_trace` (:math:`m \ge 4`; an odd m spends :math:`m-1`, reported in
    ``num_matvecs``).
    """
    ex, spent = _exchangeable(matvec, key, dim, num_matvecs, dtype, batch_size, "xtrace")
    loo, lto = _xtrace_replicates(ex)
    s = loo.shape[0]
    delta = jnp.where(jnp.eye(s, dtype=bool), 0.0, loo[:, None] - lto)
    variance = jnp.var(loo, ddof=1) / s + _pair_covariance(delta, 0, 1)
    return _trace_record(loo, 0.0, spent, level, "xtrace",
                         std_error=jnp.sqrt(jnp.maximum(variance, 0.0)))


def hutchinson_diagonal(matvec: Matvec, key: Array, dim: int, num_matvecs: int, *,
                        dtype=jnp.float64, level: float = 0.95,
                        batch_size: Optional[int] = None) -> DiagonalEstimate:
    r"""Stochastic diagonal :math:`\hat d = \frac1m\sum_j z_j \odot Az_j` (Bekas et al. 2007).

    For Rademacher :math:`z` (where :math:`z\odot z = 1`, so Bekas et al.'s normalization by
    :math:`\sum_j z_j\odot z_j` is the constant m), :math:`(z\odot Az)_k = A_{kk} +
    \sum_{l\ne k} z_kz_l A_{kl}` is unbiased with variance :math:`\sum_{l\ne k}A_{kl}^2`.
    Each coordinate's standard error is the sample standard error over the m probes, and its
    interval the Student-t interval (m - 1 dof). Parameters as :func:`hutchinson_trace`.
    """
    m = _static_int("num_matvecs", num_matvecs, 2)
    z = jax.random.rademacher(key, (m, dim), dtype=dtype)
    return _diagonal_record(z * _apply(matvec, z, batch_size), m, level, "hutchinson")


def _xdiag_pair(ex: _Exchangeable, qc, zc, base, i, k, coef):
    r""":math:`\hat d_{i,-k}` (n,) of :func:`xdiag` for one pair, given ``coef`` = the entries
    ``(a_ii, a_ik, a_kk)`` of :math:`g^{-1}` for it."""
    a_ii, a_ik, a_kk = coef
    qi, qk, zi, zk = qc[:, i], qc[:, k], zc[:, i], zc[:, k]
    low_rank = a_ii * qi * zi + a_ik * (qi * zk + qk * zi) + a_kk * qk * zk
    return base - low_rank + ex.omega[:, i] * (a_ii * qi + a_ik * qk)


def xdiag(matvec: Matvec, key: Array, dim: int, num_matvecs: int, *, dtype=jnp.float64,
          level: float = 0.95, batch_size: Optional[int] = None) -> DiagonalEstimate:
    r"""XDiag (Epperly, Tropp & Webber 2024): the exchangeable, leave-one-out Diag++.

    Diag++ (Baston & Nakatsukasa 2022) splits :math:`\mathrm{diag}(A) = \mathrm{diag}(PA) +
    \mathrm{diag}((I-P)A)` for a projector :math:`P` on a sketched range and estimates the
    second part with Bekas' estimator. XDiag does it leave-one-out, as :func:`xtrace`: with
    :math:`s = \lfloor m/2\rfloor` Rademacher probes and :math:`P_i` the projector on
    :math:`A\Omega_{-i}`,

    .. math:: \hat d_i = \mathrm{diag}(P_iA) + \omega_i \odot (I-P_i)A\omega_i, \qquad
              \hat d = \frac1s\sum_i \hat d_i,

    each unbiased since :math:`\omega_i` is independent of :math:`P_i`. With the notation of
    :func:`xtrace` (:math:`A\Omega = QR`, :math:`Z = AQ`, :math:`C = R^{-\top}`,
    :math:`P_{-J} = Q(I-\Pi_J)Q^\top`), symmetry gives :math:`\mathrm{diag}(P_{-J}A) =
    \mathrm{diag}(QZ^\top) - \mathrm{diag}(QC_J g^{-1} C_J^\top Z^\top)` with
    :math:`g = C_J^\top C_J`, and :math:`A\omega_i = Qr_i` lies in :math:`\mathrm{range}(Q)`,
    so :math:`(I-P_{-J})A\omega_i = QC_J g^{-1}C_J^\top r_i = QC_Jg^{-1}e_1`. For
    :math:`J = \{i\}`:

    .. math:: \hat d_i = \mathrm{diag}(QZ^\top) - \frac{(Qc_i)\odot(Zc_i) - \omega_i \odot
              Qc_i}{\lVert c_i\rVert^2},

    :math:`n\times s` work after the 2s products.

    Error bar: per coordinate, as for :func:`xtrace`,
    :math:`\mathrm{SE}^2 = v/s + \hat\kappa` with :math:`v` the sample variance of the
    :math:`(\hat d_i)_p` and :math:`\hat\kappa = \frac{1}{s(s-1)}\sum_{i\ne k}
    \Delta_{ik}\Delta_{ki}`, :math:`\Delta_{ik} = \hat d_i - \hat d_{i,-k}` (the
    leave-two-out estimates, :math:`J = \{i, k\}`); :math:`O(ns^2)` flops in a loop over k,
    :math:`O(ns)` memory. Student-t interval with :math:`s-1` dof, elementwise (no
    simultaneous coverage). Requires rank :math:`A \ge s`. Parameters as
    :func:`hutchinson_trace` (:math:`m \ge 4`, an odd m spends m - 1).
    """
    ex, spent = _exchangeable(matvec, key, dim, num_matvecs, dtype, batch_size, "xdiag")
    s = ex.q.shape[1]
    qc, zc = ex.q @ ex.c, ex.z @ ex.c
    gd = jnp.diag(ex.gram)
    base = jnp.sum(ex.q * ex.z, axis=1)                                # diag(Q Z^T)
    loo = base[:, None] - (qc * zc - ex.omega * qc) / gd               # (n, s)
    coef = _pair_inverse(ex.gram)
    idx = jnp.arange(s)
    # d_{i,-k} for all i (fixed k) and d_{k,-i} for all i: vmap over the varying index.
    pairs = jax.vmap(_xdiag_pair, in_axes=(None, None, None, None, 0, 0, 0), out_axes=1)

    def add_pair_products(k, total):
        kk = jnp.full((s,), k)
        d_ik = pairs(ex, qc, zc, base, idx, kk, tuple(a[:, k] for a in coef))
        d_ki = pairs(ex, qc, zc, base, kk, idx, tuple(a[k, :] for a in coef))
        delta_ik = loo - d_ik                       # Delta_{ik}, columns i
        delta_ki = loo[:, k][:, None] - d_ki        # Delta_{ki}, columns i
        prod = jnp.where(idx == k, 0.0, delta_ik * delta_ki)
        return total + jnp.sum(prod, axis=1)

    kappa = jax.lax.fori_loop(0, s, add_pair_products, jnp.zeros_like(base)) / (s * (s - 1))
    variance = jnp.var(loo, axis=1, ddof=1) / s + kappa
    return _diagonal_record(loo.T, spent, level, "xdiag",
                            std_error=jnp.sqrt(jnp.maximum(variance, 0.0)))


def slq_trace(result: SLQResult, *, level: float = 0.95,
              num_matvecs: Optional[int | Array] = None) -> TraceEstimate:
    r"""The trace from a stochastic Lanczos quadrature run, at no extra matvec.

    For a unit probe :math:`v_l = z_l/\sqrt n`, the Gauss quadrature integrates polynomials
    of degree :math:`\le 2m-1` exactly, in particular :math:`\sum_k w_k^{(l)}\theta_k^{(l)} =
    v_l^\top Av_l`, so :math:`n\sum_k w_k^{(l)}\theta_k^{(l)} = z_l^\top Az_l` is exactly a
    Hutchinson sample (no quadrature bias, also after a breakdown). For a deflated run
    (:func:`crit.krylov.krylov_spectrum`: probes :math:`\Pi z_l/\sqrt n` of mass
    :math:`\lVert\Pi z_l\rVert^2/n`, deflated Rayleigh quotients :math:`\theta_d`), the
    samples are :math:`n\,\mathrm{mass}_l\sum_k w_k\theta_k = z_l^\top\Pi A\Pi z_l` and the
    estimate adds :math:`\sum_d \theta_d \approx \mathrm{tr}(Y^\top AY)`, exact to the
    deflated pairs' residuals; it is :math:`\mathrm{tr}(A)` because
    :math:`\mathrm{tr}(A) = \mathrm{tr}(YY^\top A) + \mathrm{tr}(\Pi A\Pi)`.

    The error bar is Hutchinson's over the :math:`n_v` probes (Student-t, :math:`n_v - 1`
    dof). ``num_matvecs`` defaults to :math:`n_v m` (a plain :func:`crit.slq.slq` run); pass
    the total for a deflated run (``KrylovSpectrum.num_matvecs``), which is required.
    """
    mass = 1.0 if result.mass is None else result.mass
    weights = jnp.where(result.valid, result.weights, 0.0)
    samples = result.dim * mass * jnp.sum(weights * result.nodes, axis=1)
    offset = 0.0
    if result.deflated is not None:
        if num_matvecs is None:
            raise ValueError("slq_trace: pass num_matvecs for a deflated (Krylov) run")
        offset = jnp.sum(jnp.where(jnp.isnan(result.deflated), 0.0, result.deflated))
    if num_matvecs is None:
        num_matvecs = result.nodes.shape[0] * result.nodes.shape[1]
    return _trace_record(samples, offset, num_matvecs, level, "slq")


class WidthSearch(NamedTuple):
    """What :func:`trace_to_width` found and spent (host values; the loop is in Python)."""

    estimate: TraceEstimate
    """The last round's estimate (earlier rounds are not pooled into it)."""
    reached: bool
    """Whether the last round's relative width is at most the requested one."""
    num_matvecs: int
    """Products spent over all rounds (each round's ``num_matvecs`` summed)."""
    rounds: tuple
    """((num_matvecs, rel_width), ...) per round, in order."""


def trace_to_width(estimator: Callable[..., TraceEstimate], matvec: Matvec, key: Array,
                   dim: int, *, rel_width: float, start: int, max_matvecs: int,
                   growth: int = 2, **kwargs) -> WidthSearch:
    r"""Run a trace estimator with a growing budget until its interval is narrow enough.

    Round r runs ``estimator(matvec, fold_in(key, r), dim, m_r, **kwargs)`` with
    :math:`m_0 =` ``start`` and :math:`m_{r+1} = ` ``growth`` :math:`\cdot m_r`, the last
    round capped at what is left of ``max_matvecs`` (skipped if that is below ``start``),
    and stops at the first round with :math:`(hi - lo)/|\hat t| \le` ``rel_width``.
    Rounds are independent (fresh probes) and the answer is the last round's estimate;
    ``num_matvecs`` counts every round, so with doubling at most about half the spend is
    discarded. Each new budget compiles the estimator once (a Python loop over jitted
    calls). Stopping at the first narrow interval slightly favours rounds whose spread was
    underestimated, so the final interval covers a little less often than ``level``.
    """
    start = _static_int("start", start, 1)
    max_matvecs = _static_int("max_matvecs", max_matvecs, 1)
    growth = _static_int("growth", growth, 2)
    if start > max_matvecs:
        raise ValueError(f"start={start} exceeds max_matvecs={max_matvecs}")
    run = jax.jit(lambda k, m: estimator(matvec, k, dim, m, **kwargs), static_argnums=1)
    spent, m, rounds, est = 0, start, [], None
    while True:
        m = min(m, max_matvecs - spent)
        if m < start:
            break
        est = run(jax.random.fold_in(key, len(rounds)), m)
        spent += int(est.num_matvecs)
        width = float(est.rel_width)
        rounds.append((int(est.num_matvecs), width))
        if width <= rel_width:
            return WidthSearch(est, True, spent, tuple(rounds))
        m *= growth
    return WidthSearch(est, False, spent, tuple(rounds))
