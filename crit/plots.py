"""Matplotlib figures. Each function takes arrays, draws one figure and saves ``.png`` + ``.pdf``."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from crit.critical import STATUSES  # noqa: E402

STATUS_STYLE = {
    "critical": dict(color="tab:blue", marker="o"),
    "not_converged": dict(color="tab:gray", marker="x"),
    "gradient_flat": dict(color="tab:orange", marker="^"),
    "diverged": dict(color="tab:red", marker="s"),
}


def save_figure(fig, out_dir: str | Path, stem: str) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (150 dpi) and ``<stem>.pdf`` in ``out_dir``; close it."""
    paths = []
    for ext in ("png", "pdf"):
        path = Path(out_dir) / f"{stem}.{ext}"
        fig.savefig(path, dpi=150, bbox_inches="tight")
        paths.append(path)
    plt.close(fig)
    return paths


def wants_log_axis(values: np.ndarray) -> bool:
    """Log scale when all values are positive and they span more than two decades."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    return v.size > 1 and np.all(v > 0) and v.max() / v.min() > 100


def min_ratio_figure(loss: np.ndarray, min_ratio: np.ndarray, status: Sequence[str],
                     out_dir: str | Path, title: str = "", tolerance_note: str = "",
                     stem: str = "min_ratio", ratio_lo=None, ratio_hi=None,
                     resolved=None) -> list[Path]:
    """Minimum ratio (#λ>τ / P) against the loss, one marker and colour per status.

    Every run is drawn; the legend counts each status, so nothing is hidden. Non-finite losses
    (diverged runs) are listed in the legend but cannot be placed on the axes. With
    ``ratio_lo``/``ratio_hi`` (SLQ intervals) each point gets a vertical error bar. With
    ``resolved`` (bool per point) an unresolved point (interval too wide to read its estimate)
    is drawn as a hollow marker, its bar kept, and counted in the legend.
    """
    loss = np.asarray(loss, dtype=float)
    min_ratio = np.asarray(min_ratio, dtype=float)
    status = np.asarray(status)
    known = np.ones(len(status), bool) if resolved is None else np.asarray(resolved, bool)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in STATUSES:
        sel = status == name
        if not sel.any():
            continue
        finite = sel & np.isfinite(loss) & np.isfinite(min_ratio)
        label = f"{name} ({int(sel.sum())})"
        if finite.sum() < sel.sum():
            label += f", {int(sel.sum() - finite.sum())} off-axis"
        if (sel & ~known).any():
            label += f", {int((sel & ~known).sum())} unresolved (hollow)"
        style = STATUS_STYLE[name]
        ax.scatter(loss[finite & known], min_ratio[finite & known], s=22, alpha=0.8,
                   label=label, **style)
        if (finite & ~known).any():
            hollow = {k: v for k, v in style.items() if k != "color"}
            ax.scatter(loss[finite & ~known], min_ratio[finite & ~known], s=22, alpha=0.6,
                       facecolors="none", edgecolors=style["color"], **hollow)
        if ratio_lo is not None and ratio_hi is not None:
            lo, hi = np.asarray(ratio_lo)[finite], np.asarray(ratio_hi)[finite]
            ax.errorbar(loss[finite], min_ratio[finite],
                        yerr=[min_ratio[finite] - lo, hi - min_ratio[finite]], fmt="none",
                        ecolor=style["color"], alpha=0.5, lw=0.8)
    if wants_log_axis(loss):
        ax.set_xscale("log")
    ax.set_xlabel("training loss at the point")
    ax.set_ylabel("minimum ratio  (#λ > τ) / P")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title=tolerance_note or None, fontsize=8, title_fontsize=8, loc="best")
    return save_figure(fig, out_dir, stem)


def toy_surface_figure(w1, w2, loss_grid, path, escape_dir, out_dir,
                       stem="toy_saddle_surface") -> list[Path]:
    """Filled contours of the toy loss L(w1, w2) = (1 − w1·w2)² on a grid.

    Marks the saddle at the origin, the valley of minima w1·w2 = 1 (both branches), the level
    set L = 1 of the saddle (the axes and w1·w2 = 2), the escape direction ``escape_dir`` (the
    eigenvector of λ = −2) and the gradient-descent ``path`` (shape (T+1, 2), start and end
    marked; parts outside the grid are clipped).
    """
    from matplotlib.colors import BoundaryNorm
    from matplotlib.lines import Line2D  # legend proxies for the annotations

    path = np.asarray(path, dtype=float)
    extent = float(max(np.abs(w1).max(), np.abs(w2).max()))
    fig, ax = plt.subplots(figsize=(5.8, 5.0))
    # Geometric bands (plus one band down to 0) so the valley and the saddle both show detail.
    top = float(np.nanmax(loss_grid))
    levels = np.unique(np.concatenate([[0.0], np.geomspace(1e-3, max(top, 2e-3), 24)]))
    cs = ax.contourf(w1, w2, loss_grid, levels=levels, cmap="viridis",
                     norm=BoundaryNorm(levels, 256), extend="max")
    fig.colorbar(cs, ax=ax, label="L = (1 − w1·w2)²", format="%.3g")
    ax.contour(w1, w2, loss_grid, levels=[1.0], colors="w", linewidths=0.6, alpha=0.6)
    handles = [Line2D([], [], color="w", lw=0.6, label="L = 1 (saddle level)")]
    if extent > 1.0:
        t = np.geomspace(1.0 / extent, extent, 200)
        for sgn in (1, -1):
            ax.plot(sgn * t, sgn / t, "--", color="tab:red", lw=1.6)
        handles.append(Line2D([], [], color="tab:red", ls="--", lw=1.6,
                              label="minima w1·w2 = 1"))
    u = 0.45 * extent * np.asarray(escape_dir, dtype=float)
    for sgn in (1, -1):  # ±u: both ways down from the saddle; drawn above the path
        ax.annotate("", xy=(sgn * u[0], sgn * u[1]), xytext=(0, 0), zorder=6,
                    arrowprops=dict(arrowstyle="-|>", color="w", lw=1.6, mutation_scale=14))
    handles.append(Line2D([], [], color="w", lw=1.6, marker=">",
                          label="escape directions ±(1, 1)/√2, λ = −2"))
    ax.plot(path[:, 0], path[:, 1], "-", color="orange", lw=1.6, zorder=3)
    ax.plot(*path[0], "o", color="orange", ms=5, mec="k", mew=0.5, zorder=4)
    ax.plot(*path[-1], "s", color="orange", ms=6, mec="k", mew=0.5, zorder=4)
    handles.append(Line2D([], [], color="orange", lw=1.6, marker="o", mec="k", mew=0.5,
                          label=f"gradient descent ({len(path) - 1} steps; ■ end)"))
    ax.plot([0], [0], "*", color="tab:red", ms=15, mec="w", mew=0.8, zorder=5)
    handles.append(Line2D([], [], color="tab:red", marker="*", ls="", ms=12, mec="w",
                          label="saddle (0, 0)"))
    ax.set_xlim(w1.min(), w1.max())
    ax.set_ylim(w2.min(), w2.max())
    ax.set_xlabel("w1")
    ax.set_ylabel("w2")
    ax.set_aspect("equal")
    ax.legend(handles=handles, fontsize=7, loc="lower right", framealpha=0.85)
    ax.set_title("error surface of y = w1·w2·x on the pair (1, 1)", fontsize=10)
    return save_figure(fig, out_dir, stem)


def toy_escape_figure(t, loss_along, quadratic, loss_path, out_dir, lam=-2.0, lr=None,
                      stem="toy_saddle_escape") -> list[Path]:
    """Left: L(t·u) along the escape eigenvector u with its quadratic model L(0) + ½λt²;
    right: the gradient-descent loss per step from the start near the saddle (log scale)."""
    t = np.asarray(t, dtype=float)
    loss_path = np.asarray(loss_path, dtype=float)
    from matplotlib.ticker import FuncFormatter

    fig, (a, b) = plt.subplots(1, 2, figsize=(10.4, 3.9), gridspec_kw=dict(wspace=0.28))
    a.plot(t, loss_along, lw=1.8, label="L(t·u) = (1 − t²/2)²")
    a.plot(t, quadratic, "--", lw=1.4, label=f"L(0) + ½λt², λ = {lam:g}".replace("-", "−"))
    valley = np.sqrt(2.0)
    if t.min() <= valley <= t.max():
        a.axvline(valley, color="gray", ls=":", lw=1)
        a.axvline(-valley, color="gray", ls=":", lw=1)
        a.text(valley, 0.97, "t = √2: w1·w2 = 1 ", transform=a.get_xaxis_transform(),
               fontsize=7, va="top", ha="right", color="gray")
    finite = loss_along[np.isfinite(loss_along)]
    if finite.size:
        a.set_ylim(-0.25 * max(finite.max(), 1.0), 1.1 * max(finite.max(), 1.0))
    a.set_xlabel("t  (distance from the saddle along u)")
    a.set_ylabel("loss")
    a.legend(fontsize=8, loc="lower center")
    a.set_title("along the eigenvector u = (1, 1)/√2 of λ = −2", fontsize=10)
    steps = np.arange(len(loss_path))
    ok = np.isfinite(loss_path)
    b.semilogy(steps[ok], np.maximum(loss_path[ok], 1e-300))
    b.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:.0e}"))  # no mathtext: fast
    b.set_xlabel("gradient-descent step")
    b.set_ylabel("loss")
    b.set_title("escape from a start near the saddle"
                + (f" (lr = {lr:g})" if lr is not None else ""), fontsize=10)
    if not ok.all():
        b.text(0.5, 0.5, f"diverged: {int((~ok).sum())} non-finite steps not drawn",
               transform=b.transAxes, ha="center", color="tab:red")
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return save_figure(fig, out_dir, stem)


# --------------------------------------------------------------------------- analysis reports
# Figures of crit.analysis.PointReport records (experiments.analyze): one row or panel per point.


def _ritz_rug(point, rel_residual: float = 1e-6) -> np.ndarray:
    """Extremal eigenvalues / Ritz values whose residual is ≤ rel_residual·max|λ|: each lies
    within its residual of a true eigenvalue (Parlett 1998, §11.5)."""
    values = np.concatenate([point.largest, point.smallest])
    residuals = np.concatenate([point.largest_residuals, point.smallest_residuals])
    ok = np.isfinite(values)
    values, residuals = values[ok], residuals[ok]
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    return np.unique(values[residuals <= rel_residual * scale])


def report_density_figure(points, out_dir, title: str, stem: str = "density") -> list[Path]:
    """Per point: the eigenvalue density on a linear λ axis (log-scaled density) and the
    density of log10|λ| for λ > τ and λ < −τ; exact eigenvalues as histograms (dense), SLQ
    curves (Krylov); converged extremal Ritz values as a rug."""
    fig, axes = plt.subplots(len(points), 2, figsize=(11, 3.0 * len(points)), squeeze=False)
    for (ax_lin, ax_log), p in zip(axes, points):
        rug = _ritz_rug(p)
        tau = p.tolerance
        if p.eigenvalues is not None:
            eigs = p.eigenvalues
            ax_lin.hist(eigs, bins=min(120, max(10, eigs.size // 2)), density=True,
                        color="tab:gray", alpha=0.6, log=True,
                        label=f"exact eigenvalues (P = {p.n_params})")
            lo_edge, hi_edge = float(np.log10(max(tau, 1e-300))), float(
                np.log10(max(np.max(np.abs(eigs)), 1e-300))) + 0.5
            for sign, color in ((1, "tab:red"), (-1, "tab:green")):
                sel = sign * eigs > tau
                if sel.any():
                    ax_log.hist(np.log10(sign * eigs[sel]), bins=60, range=(lo_edge, hi_edge),
                                weights=np.full(sel.sum(), 1.0 / eigs.size)
                                / ((hi_edge - lo_edge) / 60), color=color, alpha=0.4,
                                label=f"{'λ > τ' if sign > 0 else 'λ < −τ'}: {sel.sum()}")
        else:
            d = p.density
            ax_lin.semilogy(d["grid"], np.maximum(d["density"], 1e-12), color="tab:blue",
                            lw=1.0, label="SLQ density (estimate)")
            for sign, color in ((1, "tab:red"), (-1, "tab:green")):
                ax_log.plot(d["log_grid"], d["log_density_pos" if sign > 0 else
                                              "log_density_neg"], color=color, lw=1.0,
                            label=f"SLQ, {'λ > τ' if sign > 0 else 'λ < −τ'}")
        ax_lin.axvline(0.0, color="k", lw=0.5)
        bottom = ax_lin.get_ylim()[0]
        if rug.size:
            ax_lin.plot(rug, np.full(rug.size, bottom * 3), "|", color="tab:orange", ms=12,
                        mew=1.2, label=f"extremal eigenvalues ({rug.size}, converged)")
        for sign, color in ((1, "tab:red"), (-1, "tab:green")):
            top = sign * rug[sign * rug > tau]
            if top.size:
                ax_log.plot(np.log10(top), np.zeros(top.size), "|", color=color, ms=12, mew=1.2)
        ax_lin.set_xlabel("λ")
        ax_lin.set_ylabel("density")
        ax_lin.legend(fontsize=7, loc="upper right")
        ax_lin.set_title(f"{p.label}: loss {p.loss:.4g}, ‖∇L‖ {p.grad_norm:.2g}, "
                         f"λ ∈ [{p.lambda_min:.3g}, {p.lambda_max:.3g}], {p.verdict}", fontsize=8)
        ax_log.set_xlabel("log10 |λ|   (left edge: τ)")
        ax_log.set_ylabel("fraction per decade")
        ax_log.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)


def report_fractions_figure(points, out_dir, title: str, stem: str = "sign_fractions",
                            resolve_width: float = 0.05) -> list[Path]:
    """Per point: fractions of eigenvalues above τ, below −τ and within ±τ against τ/max|λ|
    (bands: the intervals; dotted where wider than ``resolve_width``, i.e. unresolved)."""
    fig, axes = plt.subplots(1, len(points), figsize=(4.4 * len(points), 3.6), squeeze=False)
    for ax, p in zip(axes[0], points):
        scale = max(abs(p.lambda_min), abs(p.lambda_max), 1e-300)
        rel = np.asarray(p.grid_tolerance) / scale
        for name, color, label in (("min_ratio", "tab:blue", "λ > τ (min ratio)"),
                                   ("index", "tab:red", "λ < −τ (index)"),
                                   ("null_fraction", "tab:gray", "|λ| ≤ τ (null)")):
            est, lo, hi = np.moveaxis(np.asarray(p.grid_fractions[name]), -1, 0)
            ax.fill_between(rel, lo, hi, color=color, alpha=0.25, lw=0)
            sharp = (hi - lo) <= resolve_width
            ax.plot(rel, np.where(sharp, est, np.nan), "-", color=color, lw=1.2, label=label)
            ax.plot(rel, np.where(sharp, np.nan, est), ":", color=color, lw=1.0)
        ax.axvline(p.tolerance / scale, color="k", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("τ / max|λ|   (dashed: τ reported)")
        ax.set_ylabel("fraction of eigenvalues")
        ax.set_title(f"{p.label} ({'exact' if p.method == 'dense' else 'SLQ, dotted: unresolved'})",
                     fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="center left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)


def escape_profile_figure(points, out_dir, title: str, stem: str = "escape") -> list[Path]:
    """At each point where H has a proven negative eigenvalue λ with unit vector y: the loss
    along θ + t·y beside the quadratic model L + ½λt²."""
    points = [p for p in points if p.escape_t is not None]
    if not points:
        return []
    fig, axes = plt.subplots(1, len(points), figsize=(4.6 * len(points), 3.6), squeeze=False)
    for ax, p in zip(axes[0], points):
        ax.plot(p.escape_t, p.escape_loss, "-", color="tab:blue", lw=1.4, label="L(θ + t·y)")
        ax.plot(p.escape_t, p.escape_quadratic, "--", color="tab:red", lw=1.0,
                label=f"L + ½λt², λ = {p.lambda_min:.3g}")
        ax.set_xlabel("t (along the escape direction y)")
        ax.set_ylabel("loss")
        ax.set_title(f"{p.label}: {p.verdict}", fontsize=8)
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)


def _summary_density(summary, grid: np.ndarray) -> np.ndarray:
    """Density of one :class:`crit.decomposition.CurvatureSummary` on ``grid``: Gaussian-smoothed
    eigenvalues (dense) or SLQ nodes and weights (Krylov), width 1% of the grid's span."""
    sigma = 0.01 * (grid[-1] - grid[0]) or 1e-12
    if summary.eigenvalues is not None:
        points = summary.eigenvalues[None, :]
        weights = np.full_like(points, 1.0 / points.size)
    else:
        points, weights = np.nan_to_num(summary.nodes), summary.weights / summary.nodes.shape[0]
    kernel = np.exp(-0.5 * ((grid[:, None, None] - points[None]) / sigma) ** 2)
    return np.sum(kernel * weights[None], axis=(1, 2)) / (sigma * np.sqrt(2 * np.pi))


def curvature_density_figure(curvature: dict, out_dir, title: str,
                             stem: str = "curvature_density") -> list[Path]:
    """H = G + R side by side: per analysed point, the densities of every reported operator on a
    common λ axis (log-scaled density), with each operator's λ_min and λ_max marked; the legend
    gives each trace with its interval and the share of the escape curvature."""
    labels = list(curvature)
    fig, axes = plt.subplots(len(labels), 1, figsize=(9, 3.2 * len(labels)), squeeze=False)
    colors = {"hessian": "k", "ggn": "tab:blue", "residual": "tab:red", "fisher": "tab:green",
              "empirical_fisher": "tab:purple"}
    for ax, label in zip(axes[:, 0], labels):
        summaries = curvature[label]["summaries"]
        share = curvature[label]["escape_share"]
        lo = min(s.lambda_min for s in summaries.values())
        hi = max(s.lambda_max for s in summaries.values())
        pad = 0.05 * (hi - lo or 1.0)
        grid = np.linspace(lo - pad, hi + pad, 1200)
        for kind, s in summaries.items():
            c = colors.get(kind, None)
            text = (f"{kind} ({s.method}): trace {s.trace:.3g} [{s.trace_lo:.3g}, "
                    f"{s.trace_hi:.3g}]" + (f", y'Ay/y'Hy {share[kind]:.2f}"
                                            if kind in share and kind != "hessian" else ""))
            ax.semilogy(grid, np.maximum(_summary_density(s, grid), 1e-8), color=c, lw=1.1,
                        label=text)
            ax.plot([s.lambda_min, s.lambda_max], [2e-8, 2e-8], "|", color=c, ms=12, mew=1.2)
        ax.axvline(0.0, color="k", lw=0.5)
        ax.set_xlabel("λ")
        ax.set_ylabel("density")
        ax.set_title(f"{label} point: H = G + R", fontsize=9)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return save_figure(fig, out_dir, stem)
