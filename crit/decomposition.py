r"""H = G + R at one point: the spectra of the Hessian, the Gauss–Newton part and the residual
side by side, and where the negative curvature comes from.

The Hessian of the full-data loss splits as :math:`H = G + R` (:mod:`crit.curvature`): the
generalized Gauss–Newton :math:`G = J^\top H_\ell J` (positive semi-definite for a convex loss
in the outputs: MSE, softmax cross-entropy) and the residual
:math:`R = \sum_i \partial\ell/\partial f_i\, \nabla^2 f_i`. A negative eigenvalue of H can only
come from R; Papyan (2019, 2020) and Sagun et al. (2017) find that H's outliers come from G
and its bulk (and negative mass) from R. :func:`curvature_summary` gives one operator's
extremal eigenvalues (with true residuals), its trace with an interval, its density and, for
the operators that must be PSD, whether a negative eigenvalue is *proven* (which would mean a
bug or a non-convex loss). :func:`decompose` does it for several operators at the same point
and adds, along the Hessian's escape direction y, the share :math:`y^\top Ry / y^\top Hy` of
the escape curvature that comes from R.

Dense (every eigenvalue, exact trace) up to ``dense_max_params`` parameters; Krylov above
(:func:`crit.krylov.krylov_spectrum` for the extremes and the density, the trace from its SLQ
probes or from Hutch++, :mod:`crit.estimators`). The data are an argument of every compiled
program.

References: V. Papyan (2019), Measurements of three-level hierarchical structure in the
outliers in the spectrum of deepnet Hessians, ICML; V. Papyan (2020), Traces of class/cross-class
structure pervade deep learning spectra, JMLR; L. Sagun, U. Evci, V. U. Güney, Y. Dauphin,
L. Bottou (2017), Empirical analysis of the Hessian of over-parametrized neural networks.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from crit.curvature import CURVATURES, is_psd

Array = jax.Array
EPS64 = float(np.finfo(np.float64).eps)
#: The columns of ``curvature.csv`` (one row per point and operator).
SUMMARY_COLUMNS = ("point", "curvature", "method", "n_params", "lambda_min",
                   "lambda_min_residual", "lambda_max", "lambda_max_residual", "allowance",
                   "psd_expected", "negative_proven", "trace", "trace_lo", "trace_hi",
                   "trace_matvecs", "trace_method", "escape_curvature", "escape_share")


@dataclasses.dataclass(frozen=True)
class CurvatureSummary:
    """One operator's spectrum at one point (module docstring). Floats are Python floats."""

    curvature: str
    """One of :data:`crit.curvature.CURVATURES`."""
    method: str
    """``"dense"`` or ``"krylov"``."""
    n_params: int
    lambda_min: float
    """Dense: the exact λ_min. Krylov: the Rayleigh quotient of the smallest Ritz vector (an
    upper bound on λ_min up to ``allowance``)."""
    lambda_min_residual: float
    lambda_max: float
    """Dense: the exact λ_max. Krylov: the Rayleigh quotient of the largest Ritz vector (a
    lower bound on λ_max up to ``allowance``)."""
    lambda_max_residual: float
    allowance: float
    """Rounding allowance δ = P·ε₆₄·max|λ|."""
    psd_expected: bool
    """The operator is PSD by construction (GGN and Fisher for MSE / cross-entropy)."""
    negative_proven: bool
    """λ_min + δ < 0: the operator certainly has a negative eigenvalue. For a PSD operator
    this is a contradiction (a bug, or a loss that is not convex in the outputs)."""
    trace: float
    trace_lo: float
    trace_hi: float
    """95% interval of the trace (dense: exact, lo = hi)."""
    trace_matvecs: int
    """Products spent on the trace (0 when it came free with the SLQ runs)."""
    trace_method: str
    """``"exact"``, ``"slq"`` or ``"hutch++"``."""
    escape_curvature: float
    """y'Ay along the Hessian's escape direction y (NaN if none was given)."""
    eigenvalues: Optional[np.ndarray] = None
    """All eigenvalues, ascending (dense)."""
    nodes: Optional[np.ndarray] = None
    """(probes, steps) SLQ nodes (Krylov; NaN padding)."""
    weights: Optional[np.ndarray] = None

    def row(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), (bool, int, float, str))}


@functools.partial(jax.jit, static_argnums=(0, 3))
def _dense_stage(mv, params, data, dim, direction):
    columns = jax.lax.map(lambda e: mv(params, data, e), jnp.eye(dim, dtype=jnp.float64))
    matrix = 0.5 * (columns + columns.T)
    lam, vec = jnp.linalg.eigh(matrix)
    return lam, vec, jnp.trace(matrix), direction @ (matrix @ direction)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _krylov_stage(mv, params, data, key, dim, steps, probes, k, trace_matvecs, direction):
    from crit.estimators import hutchpp_trace, slq_trace
    from crit.krylov import krylov_spectrum

    def matvec(v):
        return mv(params, data, v)

    spec_key, trace_key = jax.random.split(key)
    spec = krylov_spectrum(matvec, spec_key, dim, num_steps=steps, num_probes=probes, k=k)
    if trace_matvecs:
        trace = hutchpp_trace(matvec, trace_key, dim, trace_matvecs)
    else:
        trace = slq_trace(spec.slq, num_matvecs=spec.num_matvecs)
    return spec, trace, direction @ matvec(direction)


def curvature_summary(kind: str, mv: Callable, params, data, *, key=None,
                      method: str = "auto", dense_max_params: int = 2000,
                      lanczos_steps: int = 90, slq_probes: int = 8, num_eigs: int = 5,
                      trace_matvecs: int = 0, direction=None, loss="mse") -> CurvatureSummary:
    r"""The spectrum of one curvature operator ``mv(params, data, v)`` (:func:`crit.curvature.
    curvature_matvec`) at ``params``.

    ``method="auto"``: dense (all P products, ``eigh``) up to ``dense_max_params``, Krylov above
    (``lanczos_steps``, ``slq_probes``, ``num_eigs`` as in :func:`crit.krylov.krylov_spectrum`).
    The Krylov trace is the SLQ runs' (free: each probe's quadrature is a Hutchinson sample,
    :func:`crit.estimators.slq_trace`) or, with ``trace_matvecs`` > 0, Hutch++ with that many
    products. ``direction``: a flat vector (the Hessian's escape direction) along which y'Ay is
    reported; ``loss`` only decides ``psd_expected``.
    """
    theta = ravel_pytree(params)[0]
    dim = int(theta.size)
    key = jax.random.key(0) if key is None else key
    y = jnp.full((dim,), jnp.nan) if direction is None else jnp.asarray(direction, jnp.float64)
    y = y / jnp.linalg.norm(y)
    if method == "auto":
        method = "dense" if dim <= dense_max_params else "krylov"
    psd = is_psd(kind, loss)
    if method == "dense":
        lam, vec, trace, along = _dense_stage(mv, params, data, dim, y)
        lam = np.asarray(lam)
        delta = dim * EPS64 * float(np.max(np.abs(lam)))
        tr = float(trace)
        return CurvatureSummary(
            curvature=kind, method="dense", n_params=dim, lambda_min=float(lam[0]),
            lambda_min_residual=0.0, lambda_max=float(lam[-1]), lambda_max_residual=0.0,
            allowance=delta, psd_expected=psd, negative_proven=bool(lam[0] + delta < 0),
            trace=tr, trace_lo=tr, trace_hi=tr, trace_matvecs=dim, trace_method="exact",
            escape_curvature=float(along), eigenvalues=lam)
    spec, trace, along = _krylov_stage(mv, params, data, key, dim, lanczos_steps, slq_probes,
                                       num_eigs, trace_matvecs, y)
    rq, res = np.asarray(spec.extremal_rayleigh), np.asarray(spec.extremal_residuals)
    k = num_eigs
    delta = float(spec.machine_tolerance)
    valid = np.asarray(spec.node_valid)
    return CurvatureSummary(
        curvature=kind, method="krylov", n_params=dim, lambda_min=float(rq[0]),
        lambda_min_residual=float(res[0]), lambda_max=float(rq[k]),
        lambda_max_residual=float(res[k]), allowance=delta, psd_expected=psd,
        negative_proven=bool(rq[0] + delta < 0), trace=float(trace.estimate),
        trace_lo=float(trace.lo), trace_hi=float(trace.hi),
        trace_matvecs=int(trace_matvecs), trace_method="hutch++" if trace_matvecs else "slq",
        escape_curvature=float(along),
        nodes=np.where(valid, np.asarray(spec.nodes), np.nan),
        weights=np.where(valid, np.asarray(spec.weights), 0.0))


def decompose(model, loss, params, data, kinds=("hessian", "ggn", "residual"), *,
              batch_size: int = 0, l2: float = 0.0, direction=None,
              operators: Optional[dict] = None, **kwargs) -> dict[str, Any]:
    """:func:`curvature_summary` of each operator in ``kinds`` at ``params``, and the escape
    shares: ``{"summaries": {kind: CurvatureSummary}, "escape_share": {kind: y'Ay / y'Hy}}``
    (the share needs ``direction`` and the Hessian among ``kinds``; for R it says how much of
    the escape direction's curvature comes from the residual, H = G + R). ``operators`` may
    hold prebuilt ``{kind: mv}`` (the same objects compile once across points)."""
    from crit.curvature import curvature_matvec

    unknown = [k for k in kinds if k not in CURVATURES]
    if unknown:
        raise ValueError(f"unknown curvature {unknown}; allowed: {CURVATURES}")
    operators = {} if operators is None else operators
    summaries = {}
    for kind in kinds:
        if kind not in operators:
            operators[kind] = curvature_matvec(kind, model, loss, batch_size, l2)
        summaries[kind] = curvature_summary(kind, operators[kind], params, data,
                                            direction=direction, loss=loss, **kwargs)
    shares = {}
    if direction is not None and "hessian" in summaries:
        h = summaries["hessian"].escape_curvature
        shares = {k: s.escape_curvature / h for k, s in summaries.items() if h != 0}
    return {"summaries": summaries, "escape_share": shares}
