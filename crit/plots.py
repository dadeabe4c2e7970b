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
                     stem: str = "min_ratio") -> list[Path]:
    """Minimum ratio (#λ>τ / P) against the loss, one marker and colour per status.

    Every run is drawn; the legend counts each status, so nothing is hidden. Non-finite losses
    (diverged runs) are listed in the legend but cannot be placed on the axes.
    """
    loss = np.asarray(loss, dtype=float)
    min_ratio = np.asarray(min_ratio, dtype=float)
    status = np.asarray(status)
    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for name in STATUSES:
        sel = status == name
        if not sel.any():
            continue
        finite = sel & np.isfinite(loss) & np.isfinite(min_ratio)
        label = f"{name} ({int(sel.sum())})"
        if finite.sum() < sel.sum():
            label += f", {int(sel.sum() - finite.sum())} off-axis"
        ax.scatter(loss[finite], min_ratio[finite], s=22, alpha=0.8, label=label,
                   **STATUS_STYLE[name])
    if wants_log_axis(loss):
        ax.set_xscale("log")
    ax.set_xlabel("training loss at the point")
    ax.set_ylabel("minimum ratio  (#λ > τ) / P")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(title=tolerance_note or None, fontsize=8, title_fontsize=8, loc="best")
    return save_figure(fig, out_dir, stem)


def toy_surface_figure(w1, w2, loss_grid, path_w1, path_w2, escape_dir, out_dir,
                       stem="toy_saddle_surface") -> list[Path]:
    """Contours of L(w1, w2) with the saddle, the valley of minima w1·w2 = 1, a GD path and the
    escape direction."""
    fig, ax = plt.subplots(figsize=(5.6, 5.0))
    levels = np.quantile(loss_grid, np.linspace(0, 1, 30) ** 2)
    cs = ax.contourf(w1, w2, loss_grid, levels=np.unique(levels), cmap="viridis")
    fig.colorbar(cs, ax=ax, label="L = (1 − w1·w2)²")
    t = np.linspace(0.5, 2.0, 100)
    for sgn in (1, -1):
        ax.plot(sgn * t, sgn / t, "w--", lw=1.2, label="minima w1·w2 = 1" if sgn == 1 else None)
    ax.plot([0], [0], "r*", ms=14, label="saddle (0, 0)")
    ax.arrow(0, 0, 0.8 * escape_dir[0], 0.8 * escape_dir[1], color="r", width=0.02,
             length_includes_head=True, label="escape direction (1,1)/√2")
    ax.plot(path_w1, path_w2, "-", color="orange", lw=1.5, label="gradient descent")
    ax.plot(path_w1[0], path_w2[0], "o", color="orange")
    ax.set_xlim(w1.min(), w1.max())
    ax.set_ylim(w2.min(), w2.max())
    ax.set_xlabel("w1")
    ax.set_ylabel("w2")
    ax.set_aspect("equal")
    ax.legend(fontsize=7, loc="lower left")
    ax.set_title("y = w1·w2·x, one pair (1, 1)", fontsize=10)
    return save_figure(fig, out_dir, stem)


def toy_escape_figure(t, loss_along, quadratic, loss_path, out_dir,
                      stem="toy_saddle_escape") -> list[Path]:
    """Left: L along the escape direction with ½λt²; right: the GD loss curve from near the saddle."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.6, 3.8))
    a.plot(t, loss_along, label="L(θ' + t·u)")
    a.plot(t, quadratic, "--", label="L(θ') + ½λt², λ = −2")
    a.set_xlabel("t")
    a.set_ylabel("loss")
    a.legend(fontsize=8)
    a.set_title("along the eigenvector of λ = −2", fontsize=10)
    b.semilogy(np.maximum(loss_path, 1e-300))
    b.set_xlabel("gradient-descent step")
    b.set_ylabel("loss")
    b.set_title("escape from a start near the saddle", fontsize=10)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    return save_figure(fig, out_dir, stem)
