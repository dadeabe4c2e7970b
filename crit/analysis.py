r"""Is *this* point a saddle or a minimum? One call, the whole report, for any trained model.

:func:`analyze_point` takes a loss over a parameter pytree and the point to look at;
:func:`analyze_model` takes a model as its author wrote it (a ``flax.linen`` module with its
variables, a ``flax.nnx`` module, or a plain ``apply(params, x)``; :mod:`crit.trained`), its data
and its loss. Both return an :class:`AnalysisReport`:

1. **The certificate.** The full-data loss and :math:`\lVert\nabla L(\theta)\rVert`; the point is
   *critical* only if the norm is at most ``grad_tol`` (1e-8).
2. **Refinement** (``refine=True``): from the given point to a nearby critical point within a
   budget of iterations: damped Newton on the exact Hessian where the spectrum is dense
   (:func:`crit.critical.newton_critical_point`), Newton-MR on HVPs above
   (:func:`crit.newton_mr.newton_mr_critical_point`). The report
   gives the distance moved :math:`\lVert\theta_\star - \theta\rVert` and the loss change, and
   analyses both points.
3. **The verdict with its proof** (:mod:`crit.verdict`). Two statements are kept apart: "H(θ) has
   a negative eigenvalue" (``negative_proven``: :math:`y^\top H y + \delta < 0` for a unit
   :math:`y`, a proof about the computed point, Courant–Fischer) and "the critical point near θ
   is a saddle / a minimum" (``verdict``), which also needs the sign to clear the estimated
   shift of the curvature between θ and that critical point (``margin``,
   :mod:`crit.nearby`); otherwise it reads ``degenerate``.
4. **Extremal eigenpairs**: the k smallest and k largest eigenvalues with residuals (dense: exact
   eigenpairs, residuals :math:`\lVert Hv - \lambda v\rVert` from the matrix; Krylov: Ritz pairs
   with their Rayleigh quotients and true residuals, one HVP each).
5. **Sign fractions** (minimum ratio, index, null fraction) at the tolerance τ and on the grid
   :data:`crit.krylov.REL_TOL_GRID` of τ, with intervals (dense: exact counts).
6. **The density**: all eigenvalues (dense) or the SLQ nodes and weights (Krylov).
7. **The escape direction** y and, where H(θ) has a proven negative eigenvalue, the loss along
   :math:`\theta + t y` beside the quadratic model :math:`L + \tfrac12\lambda t^2`.

Dense below ``dense_max_params`` parameters (``jax.hessian``, symmetrized, float64 ``eigh``), Krylov
above (:func:`crit.krylov.krylov_spectrum`). The data are an *argument* of every compiled
program (``data``), never a constant in it. Every number is float64; parameters that came in
float32 or bfloat16 are cast and the cast is recorded.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from crit.hessian import dense_hessian, hvp_operator
from crit.krylov import REL_TOL_GRID, RESOLVE_CEILING, krylov_spectrum  # noqa: F401
from crit.nearby import critical_point_verdict, nearby_margin
from crit.precision import precision_record
from crit.spectrum import classify_spectrum, default_tolerance
from crit.verdict import (NO_NEGATIVE_FOUND, SADDLE_PROVEN, VERDICT_TEXT, VERDICTS,
                          dense_verdict, with_criticality)

Params = Any
Array = jax.Array

DENSE_MAX_PARAMS = 2000
METHODS = ("auto", "dense", "krylov")
#: Precisions of the Lanczos search's HVPs (``hvp_dtype``); the proof is float64 in every case.
HVP_DTYPES = ("float64", "float32", "bfloat16")
MATMUL_PRECISIONS = (None, "highest", "high", "default", "float32", "tensorfloat32",
                     "bfloat16", "bfloat16_3x")
ESCAPE_POINTS = 41
DENSITY_POINTS = 2000
EPS64 = float(np.finfo(np.float64).eps)
MARGIN_STEP_MATVECS = 50  # crit.nearby.nearby_margin: the MINRES step (search precision)
MARGIN_MATVECS = MARGIN_STEP_MATVECS + 3  # ... then y'H(θ+s)y and y'H(θ)y (float64)
LOG_DENSITY_POINTS = 600

#: What ``experiments.analyze`` writes: the files, and the columns of analysis.csv (one row per
#: analysed point; ``distance_moved`` and ``loss_change`` are 0 for the given point).
REPORT_OUTPUTS = ("report.json", "analysis.csv", "spectrum.npz")
REPORT_COLUMNS = ("point", "method", "n_params", "loss", "grad_norm", "grad_tol", "certified",
                  "verdict", "negative_proven", "lambda_min_bound", "lambda_min",
                  "lambda_min_residual", "lambda_max", "lambda_max_residual", "allowance", "margin",
                  "curvature_ratio", "excluded_below", "miss_probability", "tolerance",
                  "min_ratio", "min_ratio_lo", "min_ratio_hi", "index", "index_lo", "index_hi",
                  "null_fraction", "null_fraction_lo", "null_fraction_hi", "resolved",
                  "num_matvecs", "hvp_dtype", "search_error", "num_check_matvecs", "trace",
                  "trace_lo", "trace_hi", "trace_matvecs", "trace_method",
                  "distance_moved", "loss_change")


class AnalysisError(ValueError):
    """Input that cannot be analysed (shapes, NaN, flags); raised before any compute."""


@dataclasses.dataclass(frozen=True)
class PointReport:
    """What is known about one point θ (see the module docstring). Floats are Python floats,
    arrays numpy float64."""

    label: str
    """``"given"`` or ``"refined"``."""
    method: str
    """``"dense"`` or ``"krylov"``."""
    n_params: int
    loss: float
    grad_norm: float
    grad_tol: float
    certified: bool
    """‖∇L‖ ≤ grad_tol: the point is critical to that tolerance."""
    verdict: str
    """About the critical point near θ (:data:`crit.verdict.VERDICTS`)."""
    negative_proven: bool
    """About θ itself: H(θ) has an eigenvalue certainly below 0 (y'Hy + δ < 0)."""
    lambda_min_bound: float
    """Proven upper bound on λ_min(H(θ)): y'Hy + δ."""
    lambda_min: float
    """y'Hy of the smallest Ritz vector (dense: the exact λ_min)."""
    lambda_min_residual: float
    lambda_max: float
    lambda_max_residual: float
    allowance: float
    """Rounding allowance δ (dense: τ)."""
    margin: float
    """Estimated shift of the curvature between θ and the nearby critical point (crit.nearby)."""
    curvature_ratio: float
    """|λ_min| / ‖∇L‖: small means the sign is within reach of the distance to ∇L = 0."""
    excluded_below: float
    """An eigenvalue below −excluded_below would have been found with probability at least
    1 − miss_probability (dense: τ with certainty; NaN when a negative one is proven)."""
    miss_probability: float
    smallest: np.ndarray
    smallest_residuals: np.ndarray
    largest: np.ndarray
    largest_residuals: np.ndarray
    tolerance: float
    """τ of the sign fractions."""
    min_ratio: float
    min_ratio_lo: float
    min_ratio_hi: float
    index: float
    index_lo: float
    index_hi: float
    null_fraction: float
    null_fraction_lo: float
    null_fraction_hi: float
    resolved: bool
    """The min-ratio and index intervals at τ are at most 0.05 wide and τ ≤
    :data:`RESOLVE_CEILING`·max|λ| (dense: always)."""
    grid_tolerance: np.ndarray
    grid_fractions: dict
    """``{"min_ratio": (G, 3), "index": (G, 3), "null_fraction": (G, 3)}``: est, lo, hi."""
    eigenvalues: Optional[np.ndarray]
    """All P eigenvalues, ascending (dense only)."""
    nodes: Optional[np.ndarray]
    """(probes, steps) SLQ nodes (Krylov only; NaN padding)."""
    weights: Optional[np.ndarray]
    escape_direction: np.ndarray
    """Unit vector y (flat, ``ravel_pytree`` order) of the smallest Ritz value / eigenvalue."""
    escape_t: Optional[np.ndarray]
    escape_loss: Optional[np.ndarray]
    escape_quadratic: Optional[np.ndarray]
    num_matvecs: int
    """Operator products spent on this point: with a low-precision search (``hvp_dtype``),
    the low-precision ones; the float64 ones are in ``num_check_matvecs``."""
    density: dict = dataclasses.field(default_factory=dict)
    """Krylov: ``grid``, ``density``, ``log_grid``, ``log_density_pos``, ``log_density_neg``
    (:func:`slq_densities`); dense: empty (the eigenvalues are the density)."""
    hvp_dtype: str = "float64"
    """Precision of the HVPs the Lanczos search ran on; the proof is float64 either way."""
    search_error: float = 0.0
    """η, the measured low-precision HVP error (times the safety factor) by which the sign
    fractions' thresholds, λ_max's bound and the excluded level were widened; 0 in float64."""
    num_check_matvecs: int = 0
    """float64 HVPs of the proof when the search was in low precision (0 otherwise: all
    products are float64 and counted in ``num_matvecs``)."""
    trace: float = float("nan")
    """tr H: exact (dense) or the SLQ probes' Hutchinson estimate (Krylov, no extra products)."""
    trace_lo: float = float("nan")
    trace_hi: float = float("nan")
    """95% interval of the trace (dense: lo = hi = trace)."""
    trace_method: str = ""
    trace_matvecs: int = 0
    """Products spent on the trace beyond the spectrum's (0 for both: dense reads it off the
    matrix, SLQ off its probes)."""

    @property
    def verdict_text(self) -> str:
        return VERDICT_TEXT[self.verdict]

    def scalars(self) -> dict:
        """Every scalar field (CSV row / JSON), arrays left out."""
        out = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, (bool, int, float, str)):
                out[f.name] = v
        return out

    def statement(self) -> str:
        """In words: what is proven, what is estimated."""
        parts = [f"loss {self.loss:.6g}, ‖∇L‖ {self.grad_norm:.3g} "
                 + ("≤" if self.certified else ">") + f" {self.grad_tol:g} "
                 + ("(critical: certified)" if self.certified else "(not critical)")]
        if self.negative_proven:
            parts.append(f"proven: H has an eigenvalue ≤ {self.lambda_min_bound:.4g} < 0 here "
                         f"(y'Hy = {self.lambda_min:.4g}, rounding allowance {self.allowance:.2g})")
        elif self.method == "dense":
            parts.append(f"computed: λ_min = {self.lambda_min:.4g} (τ = {self.tolerance:.2g})")
        else:
            eb = self.excluded_below
            parts.append("no negative eigenvalue found; "
                         + (f"one below −{eb:.3g} would have been found with probability ≥ "
                            f"{1 - self.miss_probability:.0%}" if np.isfinite(eb) else
                            "too few steps for a probability statement"))
        parts.append(f"verdict about the nearby critical point: {self.verdict_text}"
                     f" (estimated margin {self.margin:.2g}, |λ|/‖∇L‖ = "
                     f"{self.curvature_ratio:.3g})")
        parts.append(("" if self.resolved or self.method == "dense" else "unresolved, ")
                     + f"estimated: min ratio {self.min_ratio:.3f} "
                     f"[{self.min_ratio_lo:.3f}, {self.min_ratio_hi:.3f}], index {self.index:.3f} "
                     f"[{self.index_lo:.3f}, {self.index_hi:.3f}] at τ = {self.tolerance:.2g}"
                     if self.method == "krylov" else
                     f"exact: min ratio {self.min_ratio:.3f}, index {self.index:.3f}, null "
                     f"fraction {self.null_fraction:.3f} at τ = {self.tolerance:.2g}")
        parts.append(f"λ_max = {self.lambda_max:.6g}")
        return "; ".join(parts)


@dataclasses.dataclass(frozen=True)
class Refinement:
    """The move from the given point to the refined one (Newton-MR)."""

    distance: float
    """‖θ_refined − θ_given‖."""
    loss_change: float
    """L(θ_refined) − L(θ_given)."""
    iterations: int
    finder: str
    """``"damped Newton"`` (dense) or ``"Newton-MR"`` (Krylov)."""
    grad_norm_before: float
    grad_norm_after: float


@dataclasses.dataclass(frozen=True)
class AnalysisReport:
    """The report of :func:`analyze_point` / :func:`analyze_model`."""

    points: tuple
    """(PointReport, ...): the given point, then the refined one (with ``refine``)."""
    refinement: Optional[Refinement]
    refined_params: Any
    """The refined parameters (pytree), or None."""
    model: dict
    """What the model was: kind, parameter count, cast, BatchNorm semantics (analyze_model)."""
    curvature: dict = dataclasses.field(default_factory=dict)
    """``{point label: {"summaries": {kind: CurvatureSummary}, "escape_share": {kind: y'Ay/y'Hy}}}``
    with ``curvatures`` (:func:`crit.decomposition.decompose`): H = G + R side by side."""
    layers: dict = dataclasses.field(default_factory=dict)
    """``{point label: [row, ...]}`` with ``per_layer``: λ_max, λ_min and trace of every layer's
    diagonal block for each operator (:func:`crit.curvature.layer_table`)."""

    @property
    def given(self) -> PointReport:
        return self.points[0]

    @property
    def final(self) -> PointReport:
        return self.points[-1]

    def summary(self) -> str:
        """The lines an app prints: one per point, and the move between them."""
        lines = []
        for p in self.points:
            lines.append(f"[{p.label}, {p.method}, P = {p.n_params}] {p.statement()}")
        if self.refinement is not None:
            r = self.refinement
            lines.append(f"refinement: moved {r.distance:.3g} in {r.iterations} {r.finder} "
                         f"iterations, loss change {r.loss_change:+.3g}, ‖∇L‖ "
                         f"{r.grad_norm_before:.3g} -> {r.grad_norm_after:.3g}")
        for label, c in self.curvature.items():
            for kind, sm in c["summaries"].items():
                share = c["escape_share"].get(kind)
                lines.append(f"[{label}] {kind}: λ ∈ [{sm.lambda_min:.4g}, {sm.lambda_max:.4g}], "
                             f"trace {sm.trace:.4g} [{sm.trace_lo:.4g}, {sm.trace_hi:.4g}] "
                             f"({sm.trace_method})"
                             + (f", negative eigenvalue proven (PSD expected!)" if
                                sm.psd_expected and sm.negative_proven else "")
                             + (f", share of the escape curvature {share:.3g}"
                                if share is not None and kind != "hessian" else ""))
        prec = self.model.get("precision") or {}
        if prec.get("coarsest_dtype", "float64") != "float64":
            lines.append(f"the loss is computed partly in {prec['coarsest_dtype']} "
                         f"({', '.join(prec['compute_dtypes'])}): rounding allowances use ε = "
                         f"{prec['unit_roundoff']:.2g}")
        if self.model.get("cast_from"):
            lines.append(f"parameters cast from {', '.join(self.model['cast_from'])} to float64")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """JSON-safe: every point's scalars and extremal values, the refinement, the model."""
        def clean(v):
            if isinstance(v, float) and not math.isfinite(v):
                return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
            return v

        points = []
        for p in self.points:
            d = {k: clean(v) for k, v in p.scalars().items()}
            d["statement"] = p.statement()
            for name in ("smallest", "smallest_residuals", "largest", "largest_residuals"):
                d[name] = [clean(float(v)) for v in getattr(p, name)]
            points.append(d)
        curvature = {label: {"summaries": {k: {n: clean(v) for n, v in s.row().items()}
                                           for k, s in c["summaries"].items()},
                             "escape_share": {k: clean(v) for k, v in c["escape_share"].items()}}
                     for label, c in self.curvature.items()}
        layers = {label: [{n: clean(v) for n, v in r.items()} for r in rows]
                  for label, rows in self.layers.items()}
        return {"points": points, "model": self.model, "curvature": curvature, "layers": layers,
                "refinement": None if self.refinement is None else
                {k: clean(v) for k, v in dataclasses.asdict(self.refinement).items()},
                "summary": self.summary()}


# --------------------------------------------------------------------------- checks


def check_data(data) -> tuple:
    """``(x, y)`` as host arrays, checked: same rows, at least one, finite floats."""
    if hasattr(data, "x_train") and hasattr(data, "y_train"):
        data = (data.x_train, data.y_train)
    if not isinstance(data, (tuple, list)) or len(data) != 2:
        raise AnalysisError("data must be (x, y) arrays or a crit.data.Dataset")
    x, y = (np.asarray(a) for a in data)
    if x.shape[0] != y.shape[0] or x.shape[0] == 0:
        raise AnalysisError(f"data: x has {x.shape[0]} rows and y {y.shape[0]}; need the same, "
                            "at least one")
    for name, a in (("x", x), ("y", y)):
        if np.issubdtype(a.dtype, np.floating) and not np.all(np.isfinite(a)):
            raise AnalysisError(f"data: {name} holds NaN or inf")
    return x, y


def resolve_method(method: str, n_params: int, dense_max_params: int) -> str:
    if method not in METHODS:
        raise AnalysisError(f"method must be one of {METHODS}, got {method!r}")
    if method == "auto":
        return "dense" if n_params <= dense_max_params else "krylov"
    return method


# --------------------------------------------------------------------------- one point


def _bind(loss_fn, data):
    """A loss of params only, and whether data are an argument."""
    return (lambda p, d: loss_fn(p)) if data is None else loss_fn


# Compiled stages. The loss is a static argument (hashed by identity), the data an argument:
# the given and the refined point share one compilation and no data are compiled in.
_static_loss = functools.partial(jax.jit, static_argnums=(0,))


@_static_loss
def _dense_stage(loss2, params, data):
    loss, grad = jax.value_and_grad(lambda p: loss2(p, data))(params)
    return loss, jnp.linalg.norm(ravel_pytree(grad)[0]), dense_hessian(
        lambda p: loss2(p, data), params, block_size=None)


@_static_loss
def _margin_stage(loss2, params, data, y):
    return nearby_margin(lambda q: loss2(q, data), params, y)


def cast_floats(tree, dtype):
    """Every floating leaf of ``tree`` in ``dtype`` (integer leaves, e.g. tokens, untouched)."""
    def cast(leaf):
        leaf = jnp.asarray(leaf)
        return leaf.astype(dtype) if jnp.issubdtype(leaf.dtype, jnp.floating) else leaf
    return jax.tree.map(cast, tree)


def search_operator(loss2, params, data, hvp_dtype: str):
    r"""The HVP :math:`\tilde H v` of ``loss2`` computed in ``hvp_dtype`` (parameters, data and
    tangent cast down, the product cast back to float64): the cheap operator the Lanczos search
    runs on when ``hvp_dtype`` is not float64 (issue 24, point 3)."""
    dtype = jnp.dtype(hvp_dtype)
    low_params, low_data = cast_floats(params, dtype), cast_floats(data, dtype)
    _, low_matvec = hvp_operator(lambda p: loss2(p, low_data), low_params)
    return lambda v: low_matvec(v.astype(dtype)).astype(jnp.float64)


@functools.partial(jax.jit, static_argnums=(0, 4, 5, 6, 7, 8))
def _krylov_stage(loss2, params, data, key, dim, eig_tol, krylov_items, hvp_dtype="float64",
                  matmul_precision=None):
    loss_fn = lambda p: loss2(p, data)  # noqa: E731
    loss = loss_fn(params)
    grad, matvec = hvp_operator(loss_fn, params)
    if hvp_dtype == "float64":
        search = None
        spec = krylov_spectrum(matvec, key, dim, tol=eig_tol, **dict(krylov_items))
    else:
        with jax.default_matmul_precision(matmul_precision or "highest"):
            search = search_operator(loss2, params, data, hvp_dtype)
        spec = krylov_spectrum(search, key, dim, tol=eig_tol, check_matvec=matvec,
                               **dict(krylov_items))
    # the margin's MINRES step is an estimate: in the search precision; its curvatures float64
    margin = nearby_margin(loss_fn, params, spec.escape_direction, step_matvec=search)
    return loss, jnp.linalg.norm(grad), spec, margin, slq_densities(spec)


def slq_densities(spec) -> dict:
    """The SLQ density on a linear grid over [λ_min, λ_max] (5% padding) and the densities of
    log10|λ| for the positive and the negative eigenvalues above τ (as ``spectrum`` draws them)."""
    from crit.slq import slq_density, slq_log_density

    lo, hi = spec.lambda_min, spec.lambda_max
    pad = 0.05 * (hi - lo)
    out = {"grid": jnp.linspace(lo - pad, hi + pad, DENSITY_POINTS)}
    out["density"] = slq_density(spec.slq, out["grid"])
    tau = spec.tolerance
    top = jnp.log10(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
    start = jnp.where(tau > 0, jnp.log10(jnp.where(tau > 0, tau, 1.0)), top - 14.0)
    out["log_grid"] = jnp.linspace(start, top + 0.5, LOG_DENSITY_POINTS)
    for sign, name in ((1, "pos"), (-1, "neg")):
        out["log_density_" + name] = slq_log_density(spec.slq, out["log_grid"], sign=sign,
                                                     tol=tau)
    return out


@_static_loss
def _profile_stage(loss2, params, data, direction, ts):
    from crit.escape import loss_along

    return loss_along(lambda p: loss2(p, data), params, direction, ts)


@functools.partial(jax.jit, static_argnums=(0, 3, 4, 5, 6))
def _refine_stage(loss2, params, data, grad_tol, max_iters, minres_iters, dense):
    from crit.critical import newton_critical_point
    from crit.newton_mr import newton_mr_critical_point

    if dense:  # damped Newton on the exact Hessian (the finder min_ratio certifies with)
        return newton_critical_point(lambda p: loss2(p, data), params, max_iters=max_iters,
                                     grad_tol=grad_tol)
    return newton_mr_critical_point(lambda p: loss2(p, data), params, max_iters=max_iters,
                                    minres_iters=minres_iters, grad_tol=grad_tol)


def _grid_dict(est, lo, hi) -> np.ndarray:
    return np.stack([np.asarray(est), np.asarray(lo), np.asarray(hi)], axis=-1)


def _escape_profile(loss2, params, data, y, lam, loss0, n_points=ESCAPE_POINTS):
    """Loss along θ + t y with ½λt²: t up to where the quadratic model falls by max(|L|, 1e-12)."""
    span = math.sqrt(2.0 * max(abs(loss0), 1e-12) / max(abs(lam), 1e-300))
    ts = np.linspace(-span, span, n_points)
    unravel = ravel_pytree(params)[1]

    prof = _profile_stage(loss2, params, data, unravel(jnp.asarray(y)), jnp.asarray(ts))
    return ts, np.asarray(prof.loss), np.asarray(prof.quadratic)


def _dense_point(loss2, params, data, grad_tol, eig_tol, label, roundoff_scale=1.0):
    theta, unravel = ravel_pytree(params)

    loss, gnorm, hess = _dense_stage(loss2, params, data)
    hess = np.asarray(hess, np.float64)
    lam, vec = np.linalg.eigh(hess)
    tau = (float(default_tolerance(jnp.asarray(lam), roundoff_scale)) if eig_tol is None
           else float(eig_tol))
    certified = bool(gnorm <= grad_tol)
    verdict = dense_verdict(lam, tau, certified)
    y = vec[:, 0]
    margin = _margin_stage(loss2, params, data, jnp.asarray(y))
    verdict = with_criticality(critical_point_verdict(verdict, margin.margin), certified)
    summary = classify_spectrum(jnp.asarray(lam), tau)
    grid = np.asarray(REL_TOL_GRID) * float(np.max(np.abs(lam)))
    on_grid = classify_spectrum(jnp.broadcast_to(jnp.asarray(lam), (grid.size, lam.size)),
                                jnp.asarray(grid))
    k = min(5, lam.size)
    res = np.linalg.norm(hess @ vec - vec * lam, axis=0)
    fr = lambda name: _grid_dict(*(getattr(on_grid, name),) * 3)  # noqa: E731
    return PointReport(
        label=label, method="dense", n_params=int(theta.size), loss=float(loss),
        grad_norm=float(gnorm), grad_tol=float(grad_tol), certified=certified,
        verdict=VERDICTS[int(verdict.code)], negative_proven=bool(verdict.negative_proven),
        lambda_min_bound=float(verdict.lambda_min_bound), lambda_min=float(lam[0]),
        lambda_min_residual=float(res[0]), lambda_max=float(lam[-1]),
        lambda_max_residual=float(res[-1]), allowance=float(verdict.allowance),
        margin=float(margin.margin), curvature_ratio=float(margin.ratio),
        excluded_below=float(verdict.excluded_below), miss_probability=0.0,
        smallest=lam[:k].copy(), smallest_residuals=res[:k].copy(),
        largest=lam[::-1][:k].copy(), largest_residuals=res[::-1][:k].copy(), tolerance=tau,
        min_ratio=float(summary.min_ratio), min_ratio_lo=float(summary.min_ratio),
        min_ratio_hi=float(summary.min_ratio), index=float(summary.index),
        index_lo=float(summary.index), index_hi=float(summary.index),
        null_fraction=float(summary.null_fraction), null_fraction_lo=float(summary.null_fraction),
        null_fraction_hi=float(summary.null_fraction), resolved=True, grid_tolerance=grid,
        trace=float(np.trace(hess)), trace_lo=float(np.trace(hess)),
        trace_hi=float(np.trace(hess)), trace_method="exact",
        grid_fractions={"min_ratio": fr("min_ratio"), "index": fr("index"),
                        "null_fraction": fr("null_fraction")},
        eigenvalues=lam, nodes=None, weights=None, escape_direction=y, escape_t=None,
        escape_loss=None, escape_quadratic=None,
        num_matvecs=int(theta.size) + MARGIN_MATVECS, density={})


def _with_roundoff(verdict, scale):
    """The Krylov verdict with its allowance δ for the precision actually used (δ·scale): a
    negative Rayleigh quotient within the wider δ is no longer a proof."""
    if scale <= 1.0:
        return verdict
    allowance = verdict.allowance * scale
    negative = verdict.ritz_value + allowance < 0.0
    code = jnp.where((verdict.code == SADDLE_PROVEN) & ~negative, NO_NEGATIVE_FOUND,
                     verdict.code)
    return verdict._replace(code=code.astype(jnp.int32), negative_proven=negative,
                            lambda_min_bound=verdict.ritz_value + allowance, allowance=allowance)


def _krylov_point(loss2, params, data, key, grad_tol, eig_tol, label, krylov_kw,
                  roundoff_scale=1.0):
    theta, _ = ravel_pytree(params)
    dim = int(theta.size)

    krylov_kw = dict(krylov_kw)
    search = (krylov_kw.pop("hvp_dtype", "float64"), krylov_kw.pop("matmul_precision", None))
    loss, gnorm, spec, margin, density = _krylov_stage(loss2, params, data, key, dim, eig_tol,
                                                       tuple(sorted(krylov_kw.items())),
                                                       *search)
    certified = bool(gnorm <= grad_tol)
    verdict = _with_roundoff(spec.verdict, roundoff_scale)
    verdict = with_criticality(critical_point_verdict(verdict, margin.margin), certified)
    gf = spec.grid_fractions
    small, small_res, large, large_res = _extremal_pairs(spec)
    return PointReport(
        label=label, method="krylov", n_params=dim, loss=float(loss), grad_norm=float(gnorm),
        grad_tol=float(grad_tol), certified=certified, verdict=VERDICTS[int(verdict.code)],
        negative_proven=bool(verdict.negative_proven),
        lambda_min_bound=float(verdict.lambda_min_bound), lambda_min=float(verdict.ritz_value),
        lambda_min_residual=float(verdict.ritz_residual), lambda_max=float(spec.lambda_max),
        lambda_max_residual=float(large_res[0]),
        allowance=float(verdict.allowance), margin=float(margin.margin),
        curvature_ratio=float(margin.ratio), excluded_below=float(verdict.excluded_below),
        miss_probability=float(verdict.miss_probability),
        smallest=small, smallest_residuals=small_res, largest=large,
        largest_residuals=large_res,
        tolerance=float(spec.tolerance), min_ratio=float(spec.min_ratio),
        min_ratio_lo=float(spec.min_ratio_lo), min_ratio_hi=float(spec.min_ratio_hi),
        index=float(spec.index), index_lo=float(spec.index_lo), index_hi=float(spec.index_hi),
        null_fraction=float(spec.null_fraction), null_fraction_lo=float(spec.null_fraction_lo),
        null_fraction_hi=float(spec.null_fraction_hi),
        resolved=bool(spec.resolved) and float(spec.tolerance) <= RESOLVE_CEILING * max(
            abs(float(spec.lambda_min)), abs(float(spec.lambda_max))),
        grid_tolerance=np.asarray(spec.grid_tolerance),
        grid_fractions={"min_ratio": _grid_dict(gf.positive.mean, gf.positive.lo,
                                                gf.positive.hi),
                        "index": _grid_dict(gf.negative.mean, gf.negative.lo, gf.negative.hi),
                        "null_fraction": _grid_dict(gf.null.mean, gf.null.lo, gf.null.hi)},
        eigenvalues=None, nodes=np.where(np.asarray(spec.node_valid), np.asarray(spec.nodes),
                                         np.nan),
        weights=np.where(np.asarray(spec.node_valid), np.asarray(spec.weights), 0.0),
        escape_direction=np.asarray(spec.escape_direction), escape_t=None, escape_loss=None,
        escape_quadratic=None, num_matvecs=int(spec.num_matvecs) + (
            MARGIN_MATVECS if search[0] == "float64" else MARGIN_STEP_MATVECS),
        density={k: np.asarray(v) for k, v in density.items()}, hvp_dtype=search[0],
        **_slq_trace_fields(spec),
        search_error=float(spec.search_error),
        num_check_matvecs=int(spec.num_check_matvecs) + (
            0 if search[0] == "float64" else MARGIN_MATVECS - MARGIN_STEP_MATVECS))


def _slq_trace_fields(spec) -> dict:
    """The Hessian's trace from the SLQ probes (:func:`crit.estimators.slq_trace`, no extra
    products), 95% Student-t interval; a low-precision search widens it by P·η (each probe's
    z'Hz may be off by ‖z‖²·‖H̃ − H‖ = P·η)."""
    from crit.estimators import slq_trace

    est = slq_trace(spec.slq, num_matvecs=spec.num_matvecs)
    widen = float(spec.dim) * float(spec.search_error)
    return dict(trace=float(est.estimate), trace_lo=float(est.lo) - widen,
                trace_hi=float(est.hi) + widen, trace_method="slq")


def _extremal_pairs(spec):
    """k smallest and k largest values with residuals: the Rayleigh quotients of the Ritz
    vectors and their true residuals (one HVP each) where krylov_spectrum computed them
    (``deflate``), the Ritz values and residual estimates |β s| elsewhere."""
    k = spec.smallest.shape[0]
    rq, res = np.asarray(spec.extremal_rayleigh), np.asarray(spec.extremal_residuals)
    out = []
    for ritz, est, part in ((spec.smallest, spec.smallest_residuals, slice(0, k)),
                            (spec.largest, spec.largest_residuals, slice(k, 2 * k))):
        true = np.isfinite(rq[part])
        out.append(np.where(true, rq[part], np.asarray(ritz)))
        out.append(np.where(true, res[part], np.asarray(est)))
    return tuple(out)


def _analyze_one(loss2, params, data, key, label, method, grad_tol, eig_tol, krylov_kw,
                 roundoff_scale):
    if method == "dense":
        point = _dense_point(loss2, params, data, grad_tol, eig_tol, label, roundoff_scale)
    else:
        point = _krylov_point(loss2, params, data, key, grad_tol, eig_tol, label, krylov_kw,
                              roundoff_scale)
    if point.negative_proven:
        ts, losses, quad = _escape_profile(loss2, params, data, point.escape_direction,
                                           point.lambda_min, point.loss)
        point = dataclasses.replace(point, escape_t=ts, escape_loss=losses,
                                    escape_quadratic=quad)
    return point


def _refine(loss2, params, data, grad_tol, max_iters, minres_iters, dense):
    return _refine_stage(loss2, params, data, grad_tol, max_iters, minres_iters, dense)


def analyze_point(loss_fn: Callable, params: Params, data=None, *, key=None,
                  grad_tol: float = 1e-8, refine: bool = False, refine_iters: int = 30,
                  minres_iters: Optional[int] = None, method: str = "auto",
                  dense_max_params: int = DENSE_MAX_PARAMS, eig_tol: Optional[float] = None,
                  lanczos_steps: int = 90, slq_probes: int = 8, num_eigs: int = 5,
                  krylov_tol: str = "resolved", deflate: bool = True,
                  hvp_dtype: str = "float64", matmul_precision: Optional[str] = None,
                  progress: Optional[Callable[[str], None]] = None,
                  model_info: Optional[dict] = None) -> AnalysisReport:
    r"""Certificate, optional refinement, verdict with proof, extremal pairs, sign fractions,
    density and escape direction of the loss at ``params`` (module docstring).

    Parameters
    ----------
    loss_fn
        ``loss_fn(params) -> scalar`` (the full-data loss over a parameter pytree), or
        ``loss_fn(params, data)`` when ``data`` is given: then the data are an argument of
        every compiled program, not a constant in it.
    params
        The point (pytree); floating leaves are cast to float64.
    key
        PRNG key of the Krylov runs (default ``jax.random.key(0)``); same key, same report.
    grad_tol
        Gradient-norm certificate: critical iff ‖∇L‖ ≤ grad_tol.
    refine, refine_iters, minres_iters
        Newton-MR to a nearby critical point, at most ``refine_iters`` iterations of
        ``minres_iters`` HVPs (default min(P, 200)).
    method, dense_max_params
        ``"auto"``: dense Hessian when P ≤ ``dense_max_params``, Krylov above.
    eig_tol
        τ of the sign fractions (default: dense P·ε·max|λ|; Krylov ``krylov_tol``).
    lanczos_steps, slq_probes, num_eigs, krylov_tol, deflate
        Passed to :func:`crit.krylov.krylov_spectrum` (``num_steps``, ``num_probes``, ``k``,
        ``tol_mode``, ``deflate``).
    hvp_dtype, matmul_precision
        Precision of the HVPs of the Lanczos search (Krylov only): ``"float64"`` (default),
        ``"float32"`` or ``"bfloat16"``. In low precision, parameters, data and tangents are
        cast down for the search, and the proof is float64: the Rayleigh quotients and true
        residuals of the extremal Ritz vectors (hence the verdict), the margin and the
        escape profile are float64, and the sign fractions are widened by the measured HVP
        error (:func:`crit.krylov.krylov_spectrum`, ``check_matvec``). ``matmul_precision``
        (``jax.default_matmul_precision`` for the search's float32 dots; default
        ``"highest"``, i.e. no TF32/bfloat16 passes on GPU/TPU) is recorded in the report.
    progress
        Called with a line of text before each stage (compile and run can take minutes).
    """
    from crit.trained import to_float64

    say = progress or (lambda text: None)
    params = to_float64(params)
    n_params = int(ravel_pytree(params)[0].size)
    method = resolve_method(method, n_params, dense_max_params)
    if grad_tol <= 0:
        raise AnalysisError(f"grad_tol must be > 0, got {grad_tol}")
    if not 1 <= num_eigs <= lanczos_steps:
        raise AnalysisError(f"need 1 <= num_eigs <= lanczos_steps, got {num_eigs}, "
                            f"{lanczos_steps}")
    if method == "dense" and n_params > 20000:
        raise AnalysisError(f"method='dense' at P = {n_params}: a {n_params}² float64 Hessian "
                            f"is {8 * n_params**2 / 1e9:.1f} GB; use method='krylov'")
    loss2 = _bind(loss_fn, data)
    if data is not None:
        data = jax.tree.map(jnp.asarray, data)
    key = jax.random.key(0) if key is None else key
    if hvp_dtype not in HVP_DTYPES:
        raise AnalysisError(f"hvp_dtype must be one of {HVP_DTYPES}, got {hvp_dtype!r}")
    if hvp_dtype != "float64" and method == "dense":
        raise AnalysisError(f"hvp_dtype={hvp_dtype!r} is for the Krylov search; the dense "
                            f"path (P = {n_params}) is float64 throughout: use "
                            "method='krylov' or hvp_dtype='float64'")
    if matmul_precision not in MATMUL_PRECISIONS:
        raise AnalysisError(f"matmul_precision must be one of {MATMUL_PRECISIONS}, got "
                            f"{matmul_precision!r}")
    krylov_kw = dict(num_steps=lanczos_steps, num_probes=slq_probes, k=num_eigs,
                     tol_mode=krylov_tol, deflate=deflate, hvp_dtype=hvp_dtype,
                     matmul_precision=matmul_precision)
    precision = precision_record(loss2, params, data)
    precision["hvp_dtype"] = hvp_dtype
    precision["search_matmul_precision"] = (matmul_precision or "highest") if (
        hvp_dtype != "float64") else None
    scale = precision["unit_roundoff"] / EPS64
    say(f"analysing the given point ({method}, P = {n_params})"
        + (f"; the loss rounds in {precision['coarsest_dtype']}: allowance for ε = "
           f"{precision['unit_roundoff']:.2g}" if scale > 1 else ""))
    points = [_analyze_one(loss2, params, data, key, "given", method, grad_tol, eig_tol,
                           krylov_kw, scale)]
    refinement, refined = None, None
    if refine:
        iters = minres_iters or min(n_params, 200)
        finder = ("damped Newton (exact Hessian)" if method == "dense" else
                  f"Newton-MR ({iters} HVPs per step)")
        say(f"refining with {finder}, at most {refine_iters} iterations")
        found = _refine(loss2, params, data, grad_tol, refine_iters, iters, method == "dense")
        refined = found.params
        moved = float(jnp.linalg.norm(ravel_pytree(refined)[0] - ravel_pytree(params)[0]))
        say(f"analysing the refined point (moved {moved:.3g})")
        point = _analyze_one(loss2, refined, data, key, "refined", method, grad_tol, eig_tol,
                             krylov_kw, scale)
        points.append(point)
        refinement = Refinement(distance=moved, loss_change=point.loss - points[0].loss,
                                iterations=int(found.iterations),
                                finder="damped Newton" if method == "dense" else "Newton-MR",
                                grad_norm_before=points[0].grad_norm,
                                grad_norm_after=point.grad_norm)
    info = dict(model_info or {})
    info.setdefault("n_params", n_params)
    info["precision"] = precision
    return AnalysisReport(tuple(points), refinement, refined, info)


def analyze_model(model, data, loss="mse", *, variables=None, batchnorm: str = "eval",
                  batch_size: int = 0, l2: float = 0.0, curvatures=(), per_layer: bool = False,
                  blocks=None, trace_matvecs: int = 0, **kwargs) -> AnalysisReport:
    """:func:`analyze_point` for a model as its author wrote it (:mod:`crit.trained`): a
    ``flax.linen`` module with ``variables``, an NNX module, a plain ``apply(params, x)`` with its
    parameters as ``variables``, or a :class:`crit.trained.TrainedModel`; ``data = (x, y)`` or a
    :class:`crit.data.Dataset`; ``loss`` ``"mse"``, ``"xent"``, ``"pkg.mod:fn"`` or a callable
    ``fn(outputs, targets)`` (the mean over a batch). ``batch_size`` rows per batch of the
    full-data loss (0: all at once; exact n_b/N weights).

    The curvature toolbox (:mod:`crit.curvature`, :mod:`crit.decomposition`):

    curvatures
        Operators to report beside the Hessian at every point, e.g. ``("ggn", "residual")``
        for H = G + R side by side (extremal eigenvalues, trace with interval, density, the
        share of the escape direction's curvature) in ``report.curvature``. The verdict is
        always the Hessian's.
    per_layer
        The table of every layer's diagonal block (λ_max, λ_min, trace) for the Hessian and
        each of ``curvatures``, in ``report.layers``.
    blocks
        A regex over parameter paths (or a list of paths): the whole analysis of the loss as a
        function of that block only, the other parameters held at the given point (the
        diagonal block H_BB; the certificate is then the block's gradient).
    trace_matvecs
        > 0: the traces in ``report.curvature`` by Hutch++ with that many products (float64);
        0: from the SLQ probes (no extra products; dense: exact).
    """
    from crit.curvature import CURVATURES, CurvatureError, select_block
    from crit.trained import as_trained_model, data_objective

    x, y = check_data(data)
    if batch_size < 0:
        raise AnalysisError(f"batch_size must be >= 0, got {batch_size}")
    if l2 < 0:
        raise AnalysisError(f"l2 must be >= 0, got {l2}")
    curvatures = tuple(c for c in curvatures if c != "hessian")
    unknown = [c for c in curvatures if c not in CURVATURES]
    if unknown:
        raise AnalysisError(f"unknown curvature {unknown}; allowed: {CURVATURES}")
    if per_layer and blocks is not None:
        raise AnalysisError("per_layer and blocks: choose one (per_layer tabulates every "
                            "layer's block of the full analysis; blocks analyses one block)")
    if trace_matvecs < 0 or 0 < trace_matvecs < 4:
        raise AnalysisError(f"trace_matvecs must be 0 (SLQ trace) or >= 4 (Hutch++), got "
                            f"{trace_matvecs}")
    trained = as_trained_model(model, variables, x[:2], batchnorm)
    objective = data_objective(trained, loss, batch_size, l2)
    try:  # the model must accept the data and return a scalar loss: shapes only, no compute
        out = jax.eval_shape(objective, trained.params, (x, y))
    except Exception as exc:
        raise AnalysisError(f"the model and loss do not accept the data (x {x.shape} "
                            f"{x.dtype}, y {y.shape} {y.dtype}): {exc}") from None
    if out.shape != ():
        raise AnalysisError(f"the loss returns shape {out.shape}; it must be a scalar (the "
                            "mean over the batch)")
    try:
        operators = {kind: _curvature_mv(kind, trained, loss, batch_size, l2)
                     for kind in (("hessian",) + curvatures if curvatures else ())}
        block = None if blocks is None else select_block(trained.params, blocks)
    except CurvatureError as exc:
        raise AnalysisError(str(exc)) from None
    info = {"kind": trained.kind, "n_params": trained.n_params,
            "cast_from": list(trained.cast_from), "batchnorm": trained.batchnorm,
            "has_state": trained.has_state, "n_train": int(x.shape[0]),
            "batch_size": int(batch_size), "l2": float(l2),
            "curvatures": ["hessian", *curvatures] if curvatures else []}
    params = trained.params
    embed = None
    if block is not None:
        theta0, unravel = ravel_pytree(trained.params)
        idx = jnp.asarray(block.indices)

        def embed(pb, t0=theta0, unravel=unravel, idx=idx):
            return unravel(t0.at[idx].set(pb))

        full = objective

        def objective(pb, d):  # noqa: F811  (the loss of the block alone)
            return full(embed(pb), d)

        operators = {k: _block_mv(mv, embed, idx, theta0.size) for k, mv in operators.items()}
        params = theta0[idx]
        info["block"] = {"name": block.name, "paths": list(block.paths),
                         "n_params": int(block.size)}
    report = analyze_point(objective, params, (x, y), model_info=info, **kwargs)
    data_args = (jnp.asarray(x), jnp.asarray(y))
    at = {"given": params, "refined": report.refined_params}
    curvature, layers = {}, {}
    say = kwargs.get("progress") or (lambda text: None)
    spectral = {k: kwargs[k] for k in ("lanczos_steps", "slq_probes", "num_eigs",
                                       "dense_max_params", "key") if k in kwargs}
    if kwargs.get("method", "auto") in ("dense", "krylov"):
        spectral["method"] = kwargs["method"]
    from crit.decomposition import decompose

    for point in report.points:
        p = at[point.label]
        if curvatures:
            say(f"{point.label}: spectra of {', '.join(operators)}")
            curvature[point.label] = decompose(
                trained, loss, p, data_args, tuple(operators), operators=operators,
                direction=point.escape_direction, trace_matvecs=trace_matvecs, **spectral)
        if per_layer:
            say(f"{point.label}: per-layer blocks")
            layers[point.label] = _layer_rows(trained, loss, p, data_args, batch_size, l2,
                                              ("hessian",) + curvatures, kwargs.get("key"))
    refined = report.refined_params
    if block is not None and refined is not None:
        refined = embed(refined)
    return dataclasses.replace(report, curvature=curvature, layers=layers,
                               refined_params=refined)


def _curvature_mv(kind, trained, loss, batch_size, l2):
    from crit.curvature import curvature_matvec

    return curvature_matvec(kind, trained, loss, batch_size, l2)


def _block_mv(mv, embed, idx, dim):
    """``mv`` restricted to the block ``idx``: v_B ↦ (A (0, v_B))_B at the embedded point."""
    def block(pb, data, vb):
        return mv(embed(pb), data, jnp.zeros(dim, vb.dtype).at[idx].set(vb))[idx]
    return block


def _layer_rows(trained, loss, params, data, batch_size, l2, kinds, key) -> list[dict]:
    from crit.curvature import curvature_operator, layer_table

    rows = []
    for kind in kinds:
        op = curvature_operator(kind, trained, loss, data, batch_size, l2, params=params)
        for row in layer_table(op, params, key=key):
            rows.append({"curvature": kind, **row})
    return rows
