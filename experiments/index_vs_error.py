"""Index vs error at certified critical points of every index, beside Bray–Dean and
Pennington–Bahri.

    python -m experiments.index_vs_error                  # digits + gaussian, φ 0.25/0.5/0.75
    python -m experiments.index_vs_error --datasets=gaussian --phis=0.1,0.3,0.5,0.7 \\
        --gaussian_width=8 --dim_in=8 --out_dir=runs/pb

Protocol (REFERENCES §4-5; crit/saddles.py), once per configuration -- the down-sampled digits
set (4×4 pixels = 16 inputs, a subset of --digits_points images, softmax cross-entropy) and, for
each φ in --phis, random Gaussian inputs and targets (Pennington & Bahri 2017) with
n = round(P / (φ·k)) points so that φ = P / (n·k):

1. --num_inits trajectories of --optimizer, θ recorded every --snapshot_every steps, each
   snapshot also copied with Gaussian noise of each --noise_scales standard deviation. With
   --reduced_nets, init i trains only its first (i mod (h+1)) hidden units (the others held at
   zero, crit.saddles.mask_hidden_units): the smaller nets' critical points are saddles of the
   full net, which fills the index-vs-loss plane (Fukumizu & Amari 2000). Zero units stay zero
   only for σ(0) = 0, so --reduced_nets is refused for sigmoid and softplus.
2. From every start, in vmapped groups of --vmap_width: --prefind_steps of Adam on ½‖∇L‖²,
   then damped Newton on ∇L = 0 (Dauphin et al. 2014), exact spectrum and certificate; only
   points with ‖∇L‖ ≤ --grad_tol count, and every start's status is written (starts.csv,
   status table printed).
3. Certified points merged up to the net's symmetries (hidden-unit permutations and tanh sign
   flips): one row per unique point in points.csv, with its multiplicity.
4. Bray–Dean curve α = F(s(ε − ε½)) fitted to each configuration (crit.theory.fit_bray_dean);
   for the Gaussian data the Pennington–Bahri law α = α0((ε − εc)/εc)^k fitted with εc fixed to
   the theory and with εc free, bootstrap interval for k beside 3/2; measured εc (lowest ε with
   α > 0) and minimizer energy (lowest ε with α = 0) beside εc(φ) and ½(1 − φ)².

Normalization (Pennington & Bahri §2): ε = ½·mean((f(x) − y)²)/mean(y²), the data term only (the
L2 penalty excluded), averaged over points and outputs, in units of the targets' mean square.

Writes to --out_dir: config.json, points.csv, starts.csv, spectra.npz, fits.json, timing.txt
(wall seconds per configuration, which vary from run to run) and the figures
index_vs_error, spectra_histograms, pennington_bahri (.png, .pdf).
"""

from __future__ import annotations

import os

# Small dense eigenproblems: a multi-threaded BLAS only adds contention (10-100x slower eigh on a
# busy 2-core machine, measured). Must be set before NumPy / JAX load their BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import json  # noqa: E402
import math  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

from experiments import common  # noqa: E402
from crit import store  # noqa: E402
from crit.critical import STATUSES  # noqa: E402

FLAGS = flags.FLAGS
flags.DEFINE_list("datasets", ["digits", "gaussian"], "Which parts to run: digits, gaussian.")
flags.DEFINE_list("phis", ["0.25", "0.5", "0.75"], "Pennington–Bahri ratios φ = P/(n·k) of the "
                  "Gaussian data, each in (0, 1]; n = round(P/(φ·k)).")
flags.DEFINE_integer("gaussian_width", 8, "Hidden units of the one-hidden-layer net on the "
                     "Gaussian data (inputs --dim_in, outputs --dim_out).")
flags.DEFINE_integer("digits_width", 4, "Hidden units of the one-hidden-layer net on digits.")
flags.DEFINE_integer("digits_points", 300, "Training images of the digits subset (4×4 pixels).")
flags.DEFINE_integer("num_inits", 18, "Training trajectories per configuration.")
flags.DEFINE_integer("seed", 0, "Root seed; init i uses fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("snapshot_every", 600, "Steps between trajectory snapshots (must divide "
                     "--train_steps).")
flags.DEFINE_list("noise_scales", ["0", "0.02"], "Standard deviations of the Gaussian noise added "
                  "to each snapshot (0 keeps the snapshot itself).")
flags.DEFINE_bool("reduced_nets", True, "Init i trains only its first (i mod (h+1)) hidden "
                  "units, the rest held at zero (saddles of the full net). Needs σ(0) = 0 "
                  "(tanh, relu, linear); refused for sigmoid and softplus.")
flags.DEFINE_integer("prefind_steps", 500, "Adam steps on ½‖∇L‖² before Newton (0: Newton only).")
flags.DEFINE_float("prefind_lr", 1e-3, "Learning rate of the ½‖∇L‖² stage.")
flags.DEFINE_float("eig_rtol", 1e-7, "Null band: |λ| ≤ max(τ, eig_rtol·max|λ|) counts as zero.")
flags.DEFINE_float("merge_rtol", 1e-5, "Relative tolerance of loss, spectrum and (aligned) "
                   "parameters below which two certified points are the same point.")
flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples of the exponent fit.")
flags.DEFINE_integer("vmap_width", 8, "Starts vmapped together in the Newton stage "
                     "(crit.saddles.find_critical_points). Part of the protocol: XLA may round a "
                     "batched op differently at another width, and Newton can amplify that.")
flags.DEFINE_integer("chunk_size", 64, "Starts dispatched between progress reports (rounded up "
                     "to a multiple of --vmap_width). Never changes results: every start is "
                     "refined in a vmapped group of exactly --vmap_width starts.")
flags.DEFINE_string("out_dir", "runs/index_vs_error", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

FLAGS.set_default("l2", 1e-3)  # finite minima: without it tanh nets on noise drift to infinity
FLAGS.set_default("train_steps", 6000)  # digits nets need it to get near minima

OUTPUTS = ("points.csv", "starts.csv", "spectra.npz", "fits.json", "timing.txt")
NOT_PROTOCOL = ("out_dir", "overwrite", "chunk_size")
#: Shared flags that describe a single problem; this app builds its own, so they are refused.
NOT_APPLICABLE = {"dataset": "--datasets", "widths": "--digits_width / --gaussian_width",
                  "n_points": "--digits_points / --phis", "loss": None, "log_every": None,
                  "finder": None, "finder_lr": "--prefind_lr", "train_dtype": None}
DATASETS = ("digits", "gaussian")
NEWTON_STEPS = 60
POINT_COLUMNS = ("dataset", "phi", "unique_id", "loss", "energy", "train_error", "index", "n_pos",
                 "n_neg", "n_null", "multiplicity", "grad_norm", "lambda_min", "lambda_max",
                 "tolerance", "active_units", "init_id", "step", "noise_scale")
START_COLUMNS = ("dataset", "phi", "start_id", "init_id", "active_units", "step", "noise_scale",
                 "start_loss", "status", "loss", "grad_norm", "iterations", "index", "unique_id")
NORMALIZATION = ("energy ε = ½·mean((f(x) − y)²) / mean(y²) over points and outputs, data term "
                 "only (L2 penalty excluded) — Pennington & Bahri (2017) §2")


# ----------------------------------------------------------------------------- flags

def parse_floats(name: str, values, low: float, high: float, low_open: bool) -> list[float]:
    """A comma list of finite floats in (low, high] or [low, high]; ValueError naming --name."""
    try:
        out = [float(v) for v in values]
    except ValueError:
        raise ValueError(f"--{name}={','.join(values)!r}: expected comma-separated numbers") \
            from None
    bad = [v for v in out if not math.isfinite(v) or v > high or v < low or
           (low_open and v == low)]
    if not out or bad:
        interval = f"{'(' if low_open else '['}{low:g}, {high:g}]"
        raise ValueError(f"--{name}={','.join(values)!r}: every value must be in {interval}")
    if len(set(out)) != len(out):
        raise ValueError(f"--{name}={','.join(values)!r}: repeated value")
    return out


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors()
    for name, use in NOT_APPLICABLE.items():
        if FLAGS[name].present:
            errors.append(f"--{name}: does not apply to this app" +
                          (f"; use {use}" if use else ""))
    bad = [d for d in FLAGS.datasets if d not in DATASETS]
    if bad or not FLAGS.datasets:
        errors.append(f"--datasets={','.join(FLAGS.datasets)!r}: choose from {list(DATASETS)}")
    for name, low, high, low_open in (("phis", 0.0, 1.0, True), ("noise_scales", 0.0, 1e3, False)):
        try:
            parse_floats(name, getattr(FLAGS, name), low, high, low_open)
        except ValueError as exc:
            errors.append(str(exc))
    for name, low in (("gaussian_width", 1), ("digits_width", 1), ("digits_points", 10),
                      ("num_inits", 1), ("snapshot_every", 1), ("prefind_steps", 0),
                      ("bootstrap", 0), ("chunk_size", 1), ("vmap_width", 1)):
        if getattr(FLAGS, name) < low:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if FLAGS.digits_points > 1796:
        errors.append(f"--digits_points={FLAGS.digits_points}: digits has 1797 images; use at "
                      "most 1796")
    if FLAGS.snapshot_every >= 1 and FLAGS.train_steps % FLAGS.snapshot_every:
        errors.append(f"--snapshot_every={FLAGS.snapshot_every}: must divide --train_steps="
                      f"{FLAGS.train_steps}")
    for name in ("prefind_lr", "eig_rtol", "merge_rtol"):
        v = getattr(FLAGS, name)
        if not (math.isfinite(v) and (v > 0 if name != "eig_rtol" else v >= 0)):
            errors.append(f"--{name}={v}: must be a finite number "
                          f"{'>= 0' if name == 'eig_rtol' else '> 0'}")
    if FLAGS.reduced_nets:
        errors.extend(common.reduced_nets_errors(FLAGS.activation))
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


# ----------------------------------------------------------------------------- configurations

def configurations() -> list[dict]:
    """The problems to search: digits, then one Gaussian problem per φ (n from φ)."""
    from crit.problems import mlp_param_count, mlp_problem

    common_kw = dict(activation=FLAGS.activation, use_bias=FLAGS.use_bias, l2=FLAGS.l2,
                     data_seed=FLAGS.data_seed)
    out = []
    if "digits" in FLAGS.datasets:
        pr = mlp_problem("digits", widths=(FLAGS.digits_width,), n_points=FLAGS.digits_points,
                         downsample=2, **common_kw)
        out.append(dict(tag="digits", dataset="digits", phi=pr.phi, problem=pr,
                        width=FLAGS.digits_width))
    if "gaussian" in FLAGS.datasets:
        k = FLAGS.dim_out
        p = mlp_param_count(FLAGS.dim_in, (FLAGS.gaussian_width,), k, FLAGS.use_bias)
        for phi in parse_floats("phis", FLAGS.phis, 0.0, 1.0, True):
            n = max(int(round(p / (phi * k))), 1)
            pr = mlp_problem("gaussian", widths=(FLAGS.gaussian_width,), n_points=n,
                             dim_in=FLAGS.dim_in, dim_out=k, **common_kw)
            out.append(dict(tag=f"gaussian_phi{phi:g}", dataset="gaussian", phi=pr.phi,
                            phi_requested=phi, problem=pr, width=FLAGS.gaussian_width))
    return out


def point_metrics(problem, params) -> tuple[np.ndarray, np.ndarray]:
    """Normalized energy ε (regression; NaN for classification) and train error (classification;
    NaN for regression) of stacked parameters."""
    import jax
    import jax.numpy as jnp

    x = jnp.asarray(problem.dataset.x_train)
    y = np.asarray(problem.dataset.y_train)
    out = np.asarray(jax.jit(jax.vmap(lambda p: problem.apply_fn(p, x)))(params))
    if problem.dataset.task == "regression":
        from crit.theory import normalized_energy

        mse = np.mean((out - y[None]) ** 2, axis=(1, 2))
        return normalized_energy(mse, float(np.mean(y ** 2))), np.full(len(mse), np.nan)
    err = np.mean(np.argmax(out, axis=-1) != y[None], axis=1)
    return np.full(len(err), np.nan), err


def search(cfg: dict) -> dict:
    """Run the saddle search on one configuration; per-start and per-unique-point arrays."""
    import jax.numpy as jnp
    from crit import saddles
    from crit.train import make_optimizer

    pr = cfg["problem"]
    h = cfg["width"]
    masks = jnp.asarray(saddles.reduced_net_masks(h, FLAGS.num_inits) if FLAGS.reduced_nets
                        else np.ones((FLAGS.num_inits, h)))
    transform = ((lambda i, p: saddles.mask_hidden_units(p, masks[i], FLAGS.activation))
                 if FLAGS.reduced_nets else None)
    scales = parse_floats("noise_scales", FLAGS.noise_scales, 0.0, 1e3, False)
    n_starts = FLAGS.num_inits * (FLAGS.train_steps // FLAGS.snapshot_every + 1) * len(scales)
    progress = common.Progress(n_starts, label="starts")
    t0 = time.time()
    res = saddles.critical_point_search(
        pr.loss_fn, pr.init_fn, seed=FLAGS.seed, num_inits=FLAGS.num_inits,
        optimizer=make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum),
        num_steps=FLAGS.train_steps, snapshot_every=FLAGS.snapshot_every, noise_scales=scales,
        init_transform=transform, chunk_size=FLAGS.chunk_size, vmap_width=FLAGS.vmap_width,
        progress=progress.update,
        odd_activation=FLAGS.activation == "tanh",
        merge_tolerances=dict(loss_rtol=FLAGS.merge_rtol, eig_rtol=FLAGS.merge_rtol,
                              param_rtol=10 * FLAGS.merge_rtol),
        max_iters=common.finder_steps() if FLAGS.finder_steps else NEWTON_STEPS,
        grad_tol=FLAGS.grad_tol, flat_tol=FLAGS.flat_tol, eig_tol=FLAGS.eig_tol,
        eig_rtol=FLAGS.eig_rtol, prefind_steps=FLAGS.prefind_steps, prefind_lr=FLAGS.prefind_lr)
    pts, st = res.points, res.starts
    energy, error = point_metrics(pr, pts.params)
    active = np.asarray(masks).sum(1)[st.init_id].astype(int)
    u = res.unique
    n_s, n_u = len(st.init_id), len(u)
    return dict(
        cfg=cfg, seconds=time.time() - t0, counts=saddles.status_counts(pts.status),
        starts={"dataset": np.array([cfg["dataset"]] * n_s), "phi": np.full(n_s, cfg["phi"]),
                "start_id": np.arange(n_s), "init_id": st.init_id, "active_units": active,
                "step": st.step, "noise_scale": st.noise_scale, "start_loss": st.start_loss,
                "status": np.array([STATUSES[s] for s in pts.status]), "loss": pts.loss,
                "grad_norm": pts.grad_norm, "iterations": pts.iterations, "index": pts.index,
                "unique_id": res.unique_id},
        points={"dataset": np.array([cfg["dataset"]] * n_u), "phi": np.full(n_u, cfg["phi"]),
                "unique_id": np.arange(n_u), "loss": pts.loss[u], "energy": energy[u],
                "train_error": error[u], "index": pts.index[u], "n_pos": pts.n_pos[u],
                "n_neg": pts.n_neg[u], "n_null": pts.n_null[u],
                "multiplicity": res.merged.multiplicity, "grad_norm": pts.grad_norm[u],
                "lambda_min": pts.eigenvalues[u, 0] if n_u else np.zeros(0),
                "lambda_max": pts.eigenvalues[u, -1] if n_u else np.zeros(0),
                "tolerance": pts.tolerance[u], "active_units": active[u],
                "init_id": st.init_id[u], "step": st.step[u], "noise_scale": st.noise_scale[u]},
        eigenvalues=pts.eigenvalues[u])


# ----------------------------------------------------------------------------- fits

def _fit_dict(fit) -> dict:
    d = fit._asdict()
    d.pop("exponent_samples", None)
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in d.items()}


def fits_for(result: dict) -> dict:
    """Bray–Dean fit, and for Gaussian data the Pennington–Bahri comparison, of one config."""
    from crit import theory

    cfg, pts = result["cfg"], result["points"]
    x_name = "energy" if cfg["dataset"] == "gaussian" else "loss"
    x, alpha = pts[x_name], pts["index"]
    out = {"dataset": cfg["dataset"], "phi": cfg["phi"], "n_params": cfg["problem"].n_params,
           "n_train": cfg["problem"].dataset.n_train, "status_counts": result["counts"],
           "n_unique": int(len(alpha)), "n_saddles": int(np.sum(pts["n_neg"] > 0)),
           "n_minima": int(np.sum(pts["n_neg"] == 0))}
    out["bray_dean"] = {"x": x_name}
    if len(alpha) >= 2 and np.ptp(alpha) > 0:
        out["bray_dean"].update(_fit_dict(theory.fit_bray_dean(x, alpha)))
    else:
        out["bray_dean"]["skipped"] = "needs >= 2 unique points with different indices"
    if cfg["dataset"] == "digits" and len(alpha) >= 2 and np.ptp(alpha) > 0:
        out["bray_dean_train_error"] = _fit_dict(theory.fit_bray_dean(pts["train_error"], alpha))
    if cfg["dataset"] != "gaussian":
        return out
    phi = float(cfg["phi"])
    pb = {"normalization": NORMALIZATION, "phi": phi,
          "eps_c_theory": float(theory.critical_energy(min(phi, 1.0))),
          "minimizer_energy_theory": float(theory.minimizer_energy(min(phi, 1.0)))}
    sad, mins = pts["n_neg"] > 0, pts["n_neg"] == 0
    pb["eps_c_measured"] = float(np.min(x[sad])) if sad.any() else None
    pb["minimizer_energy_measured"] = float(np.min(x[mins])) if mins.any() else None
    pb["highest_index0_energy"] = float(np.max(x[mins])) if mins.any() else None
    for label, eps_c in (("fixed_eps_c", pb["eps_c_theory"]), ("free_eps_c", None)):
        if label == "fixed_eps_c" and eps_c <= 0:
            pb[label] = {"skipped": "εc(φ) = 0 at φ = 1: the law is degenerate"}
            continue
        try:
            fit = theory.fit_power_law(x, alpha, eps_c=eps_c, seed=FLAGS.seed,
                                       n_boot=FLAGS.bootstrap)
            pb[label] = _fit_dict(fit)
        except ValueError as exc:
            pb[label] = {"skipped": str(exc)}
    out["pennington_bahri"] = pb
    return out


def disagreements(fits: list[dict]) -> list[str]:
    """Plain statements of where measurement and theory disagree."""
    lines = []
    for f in fits:
        pb = f.get("pennington_bahri")
        if not pb:
            continue
        tag = f"φ = {pb['phi']:.3g}"
        for label in ("fixed_eps_c", "free_eps_c"):
            fit = pb[label]
            if "skipped" in fit:
                lines.append(f"{tag}: power law with {label.replace('_', ' ')} not fitted "
                             f"({fit['skipped']})")
                continue
            lo, hi = fit["exponent_interval"]
            if not (lo <= 1.5 <= hi):
                lines.append(f"{tag}: exponent {fit['exponent']:.2f} [{lo:.2f}, {hi:.2f}] "
                             f"({label.replace('_', ' ')}) excludes 3/2")
        ec_m, ec_t = pb["eps_c_measured"], pb["eps_c_theory"]
        if ec_m is not None and abs(ec_m - ec_t) > 0.25 * max(ec_t, 1e-3):
            lines.append(f"{tag}: lowest saddle energy {ec_m:.4f} vs εc(φ) = {ec_t:.4f}")
        hi0 = pb["highest_index0_energy"]
        if hi0 is not None and hi0 > ec_t:
            lines.append(f"{tag}: index-0 points up to ε = {hi0:.4f}, above εc(φ) = {ec_t:.4f} "
                         "(theory: every critical point above εc has α > 0)")
        em, et = pb["minimizer_energy_measured"], pb["minimizer_energy_theory"]
        if em is None:
            lines.append(f"{tag}: no index-0 point found (no measured minimizer energy)")
        elif abs(em - et) > 0.2 * et:
            lines.append(f"{tag}: minimizer energy {em:.4f} vs ½(1−φ)² = {et:.4f}")
    return lines


# ----------------------------------------------------------------------------- figures

def index_figure(results, fits, out_dir):
    import matplotlib.pyplot as plt
    from crit import plots, theory

    digits = [r for r in results if r["cfg"]["dataset"] == "digits"]
    gauss = [r for r in results if r["cfg"]["dataset"] == "gaussian"]
    panels = (2 if digits else 0) + (1 if gauss else 0)
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 4.2), squeeze=False)
    axes = list(axes[0])
    fit_of = {id(r): f for r, f in zip(results, fits)}

    def draw(ax, r, y_name, fit, color, label):
        p = r["points"]
        if not len(p["index"]):
            return
        ax.scatter(p["index"], p[y_name], s=14 + 4 * np.sqrt(p["multiplicity"]), alpha=0.75,
                   color=color, label=f"{label} ({len(p['index'])} unique)")
        if fit and "slope" in fit and fit["slope"] != 0:
            y = np.linspace(np.nanmin(p[y_name]), np.nanmax(p[y_name]), 200)
            a = theory.bray_dean_index(fit["slope"] * (y - fit["energy_half"]))
            ax.plot(a, y, color=color, lw=1.2, alpha=0.9)

    if digits:
        r = digits[0]
        f = fit_of[id(r)]
        draw(axes[0], r, "loss", f["bray_dean"], "tab:blue", "digits")
        draw(axes[1], r, "train_error", f.get("bray_dean_train_error"), "tab:blue", "digits")
        axes[0].set_ylabel("training loss (cross-entropy + L2)")
        axes[1].set_ylabel("training error (misclassified fraction)")
        pr = r["cfg"]["problem"]
        for ax in axes[:2]:
            ax.set_title(f"{pr.name}, P = {pr.n_params}, n = {pr.dataset.n_train}", fontsize=9)
    if gauss:
        ax = axes[-1]
        colors = plt.cm.viridis(np.linspace(0, 0.85, len(gauss)))
        for r, c in zip(gauss, colors):
            draw(ax, r, "energy", fit_of[id(r)]["bray_dean"], c, f"φ = {r['cfg']['phi']:.3g}")
            ax.axhline(float(theory.critical_energy(min(r["cfg"]["phi"], 1.0))), color=c,
                       ls=":", lw=1)
        pr = gauss[0]["cfg"]["problem"]
        ax.set_ylabel("energy ε = ½ MSE / mean(y²)")
        ax.set_title(f"Gaussian data, {pr.name.split('/')[1]} (dotted: εc(φ))", fontsize=9)
    for ax in axes:
        ax.set_xlabel("index α (fraction of λ < −τ)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best", title="lines: Bray–Dean fit", title_fontsize=7)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, "index_vs_error")


def choose_three(index: np.ndarray) -> list[tuple[str, int]]:
    """Unique points of highest, middle (median) and lowest index."""
    if not len(index):
        return []
    order = np.argsort(index, kind="stable")
    picks = [("high", order[-1]), ("middle", order[len(order) // 2]), ("low", order[0])]
    return [(name, int(i)) for name, i in picks]


def spectra_figure(results, out_dir):
    import matplotlib.pyplot as plt
    from crit import plots

    rows = [r for r in results if len(r["points"]["index"])]
    if not rows:
        return []
    fig, axes = plt.subplots(len(rows), 3, figsize=(11, 2.4 * len(rows)), squeeze=False)
    for row, r in zip(axes, rows):
        for ax, (name, i) in zip(row, choose_three(r["points"]["index"])):
            eig = r["eigenvalues"][i]
            tau = r["points"]["tolerance"][i]
            ax.hist(eig, bins=60, color="tab:gray")
            ax.axvline(0, color="k", lw=0.6)
            neg = eig < -tau
            ax.hist(eig[neg], bins=60, range=(eig.min(), eig.max()), color="tab:red")
            y_name = "energy" if r["cfg"]["dataset"] == "gaussian" else "loss"
            ax.set_title(f"{r['cfg']['tag']}: {name} index α = {r['points']['index'][i]:.3f}, "
                         f"{y_name} {r['points'][y_name][i]:.3f}", fontsize=8)
            ax.set_yscale("log")
            ax.tick_params(labelsize=7)
        row[0].set_ylabel("count", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("Hessian eigenvalue λ (red: λ < −τ)", fontsize=8)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, "spectra_histograms")


def pennington_bahri_figure(results, fits, out_dir):
    import matplotlib.pyplot as plt
    from crit import plots, theory

    gauss = [(r, f) for r, f in zip(results, fits) if r["cfg"]["dataset"] == "gaussian"]
    if not gauss:
        return []
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4.2))
    colors = plt.cm.viridis(np.linspace(0, 0.85, len(gauss)))
    for (r, f), c in zip(gauss, colors):
        pb = f["pennington_bahri"]
        eps, alpha = r["points"]["energy"], r["points"]["index"]
        ec = pb["eps_c_theory"]
        sel = (alpha > 0) & (eps > ec)
        ax.scatter((eps[sel] - ec) / ec, alpha[sel], s=16, color=c,
                   label=f"φ = {pb['phi']:.3g}")
        fit = pb["fixed_eps_c"]
        if "exponent" in fit:
            x = np.geomspace(((eps[sel] - ec) / ec).min(), ((eps[sel] - ec) / ec).max(), 50)
            lo, hi = fit["exponent_interval"]
            ax.plot(x, fit["prefactor"] * x ** fit["exponent"], color=c, lw=1,
                    label=f"fit k = {fit['exponent']:.2f} [{lo:.2f}, {hi:.2f}]")
    if ax.has_data():
        xs, ys = [], []
        for r, f in gauss:
            ec = f["pennington_bahri"]["eps_c_theory"]
            eps, alpha = r["points"]["energy"], r["points"]["index"]
            sel = (alpha > 0) & (eps > ec) & (ec > 0)
            xs.append((eps[sel] - ec) / ec)
            ys.append(alpha[sel])
        xs, ys = np.concatenate(xs), np.concatenate(ys)
        if xs.size:  # a slope-3/2 guide through the median point
            x = np.geomspace(xs.min(), xs.max(), 50)
            anchor = np.median(ys) / np.median(xs) ** 1.5
            ax.plot(x, anchor * x ** 1.5, "k--", lw=1, label="slope 3/2 (theory)")
        ax.set_xscale("log")
        ax.set_yscale("log")
    ax.set_xlabel("(ε − εc(φ)) / εc(φ)   [εc from theory]")
    ax.set_ylabel("index α")
    ax.set_title("Pennington–Bahri: α ≈ α0 ((ε − εc)/εc)^{3/2}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7)
    grid = np.linspace(0, 1, 201)
    bx.plot(grid, theory.critical_energy(grid), "k-", lw=1, label="εc(φ) theory")
    bx.plot(grid, theory.minimizer_energy(grid), "k--", lw=1, label="½(1−φ)² (P&B empirical)")
    for (r, f), c in zip(gauss, colors):
        pb = f["pennington_bahri"]
        if pb["eps_c_measured"] is not None:
            bx.scatter(pb["phi"], pb["eps_c_measured"], marker="^", color=c, s=40)
        if pb["minimizer_energy_measured"] is not None:
            bx.scatter(pb["phi"], pb["minimizer_energy_measured"], marker="o", color=c, s=40)
        bx.scatter(np.full(len(r["points"]["energy"]), pb["phi"]), r["points"]["energy"],
                   marker="_", color=c, s=60, alpha=0.5)
    bx.scatter([], [], marker="^", color="gray", label="lowest saddle ε (measured εc)")
    bx.scatter([], [], marker="o", color="gray", label="lowest index-0 ε (measured)")
    bx.scatter([], [], marker="_", color="gray", label="every unique critical point")
    bx.set_xlabel("φ = P / (n·k)")
    bx.set_ylabel("energy ε")
    bx.set_title(NORMALIZATION.split(" —")[0], fontsize=7)
    bx.grid(alpha=0.3)
    bx.legend(fontsize=7)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, "pennington_bahri")


# ----------------------------------------------------------------------------- main

def run_config(configs) -> dict:
    own = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
    shared = {f.name: f.value for f in FLAGS.get_flags_for_module(common)
              if f.name not in NOT_APPLICABLE}
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol["problems"] = [c["problem"].name for c in configs]
    return {"experiment": "index_vs_error", "protocol": protocol, "flags": shared | own,
            "problems": [{"tag": c["tag"], "name": c["problem"].name,
                          "n_params": c["problem"].n_params,
                          "n_train": c["problem"].dataset.n_train, "phi": c["phi"]}
                         for c in configs],
            "normalization": NORMALIZATION, "environment": common.environment()}


def concat(dicts: list[dict]) -> dict:
    return {k: np.concatenate([np.asarray(d[k]) for d in dicts]) for k in dicts[0]}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    common.set_matmul_precision()
    t_start = time.time()
    configs = configurations()
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(configs), OUTPUTS)
    results = []
    for cfg in configs:
        pr = cfg["problem"]
        print(f"{cfg['tag']}: {pr.name}, P = {pr.n_params}, n = {pr.dataset.n_train}, "
              f"φ = P/(n·k) = {cfg['phi']:.3f}", flush=True)
        r = search(cfg)
        results.append(r)
        counts = ", ".join(f"{k} {v}" for k, v in r["counts"].items())
        p = r["points"]
        print(f"  {sum(r['counts'].values())} starts: {counts}; {len(p['index'])} unique "
              f"certified points ({int(np.sum(p['n_neg'] > 0))} saddles, "
              f"{int(np.sum(p['n_neg'] == 0))} index 0), {r['seconds']:.0f}s", flush=True)
    fits = [fits_for(r) for r in results]

    store.atomic_write_text(out_dir / "timing.txt", "".join(
        f"{r['cfg']['tag']}: {r['seconds']:.1f} s\n" for r in results))
    store.write_csv(out_dir / "starts.csv", concat([r["starts"] for r in results]))
    store.write_csv(out_dir / "points.csv", concat([r["points"] for r in results]))
    store.atomic_save_npz(out_dir / "spectra.npz", {
        **{f"{r['cfg']['tag']}_eigenvalues": r["eigenvalues"] for r in results},
        **{f"{r['cfg']['tag']}_index": r["points"]["index"] for r in results}})
    report = {"normalization": NORMALIZATION, "configurations": fits,
              "disagreements": disagreements(fits)}
    store.atomic_write_text(out_dir / "fits.json",
                            json.dumps(report, indent=2, default=float, allow_nan=True))
    index_figure(results, fits, out_dir)
    spectra_figure(results, out_dir)
    pennington_bahri_figure(results, fits, out_dir)
    print(summary(fits))
    print(f"wrote {out_dir}/points.csv, starts.csv, spectra.npz, fits.json, index_vs_error, "
          f"spectra_histograms, pennington_bahri (.png/.pdf); {time.time() - t_start:.0f}s")


def summary(fits: list[dict]) -> str:
    lines = ["", "status counts per configuration (every start):",
             f"  {'config':<22}" + "".join(f"{s:>15}" for s in STATUSES) + f"{'unique':>8}"]
    for f in fits:
        tag = f"{f['dataset']} φ={f['phi']:.3g}"
        lines.append(f"  {tag:<22}" + "".join(f"{f['status_counts'][s]:>15}" for s in STATUSES)
                     + f"{f['n_unique']:>8}")
    lines.append("")
    for f in fits:
        bd = f["bray_dean"]
        tag = f"{f['dataset']} φ={f['phi']:.3g}"
        if "slope" in bd:
            lines.append(f"{tag}: Bray–Dean α = F(s(x − x½)) on x = {bd['x']}: s = "
                         f"{bd['slope']:.3g}, x½ = {bd['energy_half']:.4g}, "
                         f"rms {bd['residual_rms']:.3f}")
        else:
            lines.append(f"{tag}: Bray–Dean not fitted ({bd['skipped']})")
        pb = f.get("pennington_bahri")
        if not pb:
            continue
        for label in ("fixed_eps_c", "free_eps_c"):
            fit = pb[label]
            if "exponent" in fit:
                lo, hi = fit["exponent_interval"]
                lines.append(f"  power law ({label.replace('_', ' ')}, εc = "
                             f"{fit['critical_energy']:.4f}): k = {fit['exponent']:.2f} "
                             f"[{lo:.2f}, {hi:.2f}] (95% bootstrap) vs 3/2; α0 = "
                             f"{fit['prefactor']:.3g}; {fit['n_points']} points")
            else:
                lines.append(f"  power law ({label.replace('_', ' ')}): {fit['skipped']}")
        fmt = lambda v: "none" if v is None else f"{v:.4f}"  # noqa: E731
        lines.append(f"  εc: measured (lowest saddle) {fmt(pb['eps_c_measured'])} vs theory "
                     f"{pb['eps_c_theory']:.4f}; minimizer energy: measured "
                     f"{fmt(pb['minimizer_energy_measured'])} vs ½(1−φ)² "
                     f"{pb['minimizer_energy_theory']:.4f}")
    lines.append(f"normalization: {NORMALIZATION}")
    dis = disagreements(fits)
    lines.append("measurement vs theory: " + ("no disagreement flagged" if not dis else
                                             "DISAGREE:\n  " + "\n  ".join(dis)))
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
