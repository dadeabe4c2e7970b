"""Escaping certified saddles: negative curvature, restarts, optimizers, Dauphin's toys.

    python -m experiments.saddle_escape                      # gaussian data, 2-4-1 tanh, l2 1e-2
    python -m experiments.saddle_escape --dataset=sinc --widths=4 --num_inits=32

Protocol (REFERENCES §1, §4; crit/escape.py).

1. Saddles. Init i (key fold_in(PRNGKey(seed), i)) is trained with --optimizer; at every step of
   --snapshots the point is refined by --finder (damped Newton on ∇L = 0, which is attracted to
   critical points of any index, Dauphin et al. 2014; --finder_steps iterations, stalled when
   ‖g‖ does not halve within 10 iterations), then certified (‖∇L‖ ≤ --grad_tol) and
   classified from the exact Hessian (tolerance τ = P·ε·max|λ| or --eig_tol). Certified points
   with index > 0 are saddles; copies with the same loss and index (to 1e-9 relative) are merged,
   and up to --num_saddles of them, spread over the loss range, are studied. Every candidate
   keeps its row in saddles.csv. If no saddle is found the app says so and exits with status 3.
   Trajectories and candidates run in vmapped groups of --vmap_width, so the candidate of
   (init i, step s) is the same bits whatever --num_inits and --snapshots are.
2. At each saddle θ* with most negative eigenpair (λ, u): L(θ* + t·u) for t ∈ [−T, T] beside
   L* + ½λt².
3. Restarts: gradient descent (lr --escape_lr) from θ* ± εu and from θ* + εv_k for --num_random
   random unit directions v_k; loss vs step, with the linear-regime prediction
   L* − ½|λ|ε²(1 + lr·|λ|)^{2t} for the ±u starts.
4. Optimizers from the same starts θ* + εv_k: gradient descent, momentum, Adam, perturbed gradient
   descent (Jin et al. 2017) and saddle-free Newton (Dauphin et al. 2014; dense when
   P ≤ --dense_max_params, else in the --krylov_dim-dimensional Krylov subspace). A run has
   escaped at the first step with L < L* − f·(L* − L_low), L_low the lowest loss any run from
   that saddle reached and f = --escape_fraction (0.5: half way down).
5. Dauphin's toys: f = 5x² − y² and the monkey saddle x³ − 3xy²: Newton, saddle-free Newton and
   gradient-descent trajectories on contour plots; from exactly the origin of 5x² − y², gradient
   descent never moves while perturbed gradient descent escapes.

Writes to ``--out_dir``: config.json, saddles.csv (one row per candidate), escape_line.csv,
restarts.npz, optimizers.csv (one row per saddle × method × start), optimizers.npz, toys.npz, and
the figures escape_line, escape_restarts, escape_optimizers, toy_saddles (.png, .pdf).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import common
from crit import store

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_inits", 16, "Random initializations (each gives one candidate per "
                     "snapshot).")
flags.DEFINE_integer("seed", 0, "Root seed; init i uses fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("vmap_width", 16, "Trajectories, and candidates (init × snapshot) in the "
                     "finder, run in vmapped groups of this many, one group after another. Part "
                     "of the fingerprint: with a fixed width the candidate of init i does not "
                     "depend on --num_inits or --snapshots (XLA may round a batched op "
                     "differently at another width).")
flags.DEFINE_string("snapshots", "0,50,200", "Training steps at which the finder starts "
                    "(comma separated, >= 0).")
flags.DEFINE_integer("num_saddles", 3, "Saddles studied (spread over the loss range).")
flags.DEFINE_float("line_extent", 1.5, "L(θ* + t·u) is drawn for t in [-T, T].")
flags.DEFINE_integer("line_points", 201, "Points on the line.")
flags.DEFINE_float("epsilon", 1e-3, "Distance ε of the restart points from the saddle.")
flags.DEFINE_integer("num_random", 8, "Random unit directions v_k (restarts and optimizers).")
flags.DEFINE_integer("escape_steps", 1000, "Steps of every restart and optimizer run.")
flags.DEFINE_float("escape_lr", 0.1, "Learning rate of gradient descent, momentum and PGD.")
flags.DEFINE_float("adam_lr", 1e-2, "Learning rate of Adam.")
flags.DEFINE_float("pgd_radius", 1e-3, "Perturbed GD: radius r of the uniform-ball noise.")
flags.DEFINE_float("pgd_threshold", 1e-3, "Perturbed GD: add noise when ‖∇L‖ ≤ this (g_thres).")
flags.DEFINE_integer("pgd_interval", 20, "Perturbed GD: at most one perturbation per this many "
                     "steps (t_thres).")
flags.DEFINE_string("sfn_damping", "1e-3,1e-2,1e-1,1", "Saddle-free Newton damping δ (in "
                    "eigenvalue units): one value, or a comma-separated grid (each step takes "
                    "the candidate with the lowest loss).")
flags.DEFINE_integer("dense_max_params", 500, "Largest P for dense saddle-free Newton and the "
                     "dense eigenpair; above it Krylov / Lanczos versions are used.")
flags.DEFINE_integer("krylov_dim", 20, "Lanczos vectors of the Krylov saddle-free Newton step.")
flags.DEFINE_integer("lanczos_steps", 60, "Lanczos steps for λ_min when P > --dense_max_params.")
flags.DEFINE_float("escape_fraction", 0.5, "A run has escaped once L < L* − f·(L* − L_low), "
                   "L_low the lowest loss any run from that saddle reached (f = this).")
flags.DEFINE_integer("toy_steps", 8, "Newton / saddle-free Newton steps on the toy saddles.")
flags.DEFINE_string("out_dir", "runs/saddle_escape", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

FLAGS.set_default("dataset", "gaussian")
FLAGS.set_default("dim_in", 2)
FLAGS.set_default("n_points", 64)
FLAGS.set_default("widths", "4")
FLAGS.set_default("l2", 1e-2)
FLAGS.set_default("finder_steps", 50)

OUTPUTS = ("saddles.csv", "escape_line.csv", "restarts.npz", "optimizers.csv",
           "optimizers.npz", "toys.npz")
# Flags of experiments.common that this app replaces or never reads.
NOT_APPLICABLE = {"train_steps": "training runs to the last step of --snapshots",
                  "log_every": "no training curve is recorded",
                  "train_dtype": "training, finder and spectra are all float64 here"}
NOT_PROTOCOL = ("out_dir", "overwrite", *NOT_APPLICABLE)
METHODS = ("gd", "momentum", "adam", "pgd", "sfn")
METHOD_LABEL = {"gd": "gradient descent", "momentum": "momentum 0.9", "adam": "Adam",
                "pgd": "perturbed GD", "sfn": "saddle-free Newton"}
METHOD_COLOUR = {"gd": "tab:blue", "momentum": "tab:orange", "adam": "tab:green",
                 "pgd": "tab:purple", "sfn": "tab:red"}
NO_SADDLE_EXIT = 3
#: Stall rule of the Newton finder here (crit.critical.newton_critical_point): stop when ‖g‖ has
#: not fallen below FINDER_MIN_PROGRESS times its value FINDER_PATIENCE iterations earlier.
FINDER_PATIENCE, FINDER_MIN_PROGRESS = 10, 0.5


def parse_ints(name: str, text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--{name}={text!r}: expected comma-separated integers") from None
    if any(v < 0 for v in values):
        raise ValueError(f"--{name}={text!r}: every value must be >= 0")
    return sorted(set(values))


def parse_damping(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--sfn_damping={text!r}: expected comma-separated numbers") from None
    if not values or any(not (math.isfinite(v) and v >= 0) for v in values):
        raise ValueError(f"--sfn_damping={text!r}: every damping must be a finite number >= 0")
    return values


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    e = common.problem_errors()
    for name, why in NOT_APPLICABLE.items():
        if FLAGS[name].present:
            e.append(f"--{name}: does not apply to this app ({why})")
    for parse in (lambda: parse_ints("snapshots", FLAGS.snapshots),
                  lambda: parse_damping(FLAGS.sfn_damping)):
        try:
            parse()
        except ValueError as exc:
            e.append(str(exc))
    for name, low in (("num_inits", 1), ("vmap_width", 1), ("num_saddles", 1), ("line_points", 3),
                      ("num_random", 1), ("escape_steps", 1), ("pgd_interval", 1),
                      ("dense_max_params", 1), ("krylov_dim", 1), ("lanczos_steps", 2),
                      ("toy_steps", 1)):
        if getattr(FLAGS, name) < low:
            e.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    for name in ("line_extent", "epsilon", "escape_lr", "adam_lr", "pgd_radius",
                 "pgd_threshold"):
        v = getattr(FLAGS, name)
        if not (math.isfinite(v) and v > 0):
            e.append(f"--{name}={v}: must be a finite number > 0")
    if not 0 < FLAGS.escape_fraction < 1:
        e.append(f"--escape_fraction={FLAGS.escape_fraction}: must be in (0, 1)")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        e.append(f"--out_dir={out}: is a file, not a directory")
    if e:
        raise app.UsageError("\n".join(e))


def run_config(problem) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol.update(problem=problem.name, loss=problem.loss_name)
    return {"experiment": "saddle_escape", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "n_train": problem.dataset.n_train,
            "environment": common.environment()}


# ----------------------------------------------------------------------------- 1. saddles


def find_candidates(problem, snapshots: list[int]) -> dict:
    """Train every init, run the finder from each snapshot, certify and classify (vmapped)."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.flatten_util import ravel_pytree
    from crit.critical import certify, find_critical_point
    from crit.hessian import dense_hessian
    from crit.spectrum import classify_spectrum
    from crit.train import make_optimizer

    template = problem.init_fn(jax.random.PRNGKey(0))
    _, unravel = ravel_pytree(template)
    opt = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)
    last = max(snapshots)
    # Newton from points along a trajectory is slow to enter the quadratic basin of a saddle:
    # a patient stall rule (no halving of ‖g‖ within 10 iterations) finds many more of them.
    finder_kw = (dict(max_iters=common.finder_steps(), patience=FINDER_PATIENCE,
                      min_progress=FINDER_MIN_PROGRESS) if FLAGS.finder == "newton" else
                 dict(num_steps=common.finder_steps(), learning_rate=FLAGS.finder_lr))

    def trajectory(i):
        theta, _ = ravel_pytree(problem.init_fn(jax.random.fold_in(
            jax.random.PRNGKey(FLAGS.seed), i)))
        grad = jax.grad(lambda t: problem.loss_fn(unravel(t)))

        def step(carry, _):
            t, s = carry
            u, s = opt.update(grad(t), s, t)
            return (optax.apply_updates(t, u), s), t

        (t_last, _), ts = jax.lax.scan(step, (theta, opt.init(theta)), None, length=last)
        ts = jnp.concatenate([ts, t_last[None]])
        return ts[jnp.asarray(snapshots)]

    def refine(theta):
        found = find_critical_point(problem.loss_fn, unravel(theta), FLAGS.finder,
                                    FLAGS.grad_tol, **finder_kw)
        th, _ = ravel_pytree(found.params)
        eig = jnp.linalg.eigvalsh(dense_hessian(problem.loss_fn, found.params))
        s = classify_spectrum(eig, FLAGS.eig_tol)
        cert = certify(problem.loss_fn, found.params, jnp.max(jnp.abs(eig)), FLAGS.grad_tol,
                       FLAGS.flat_tol)
        return dict(theta=th, status=cert.status, loss=cert.loss, grad_norm=cert.grad_norm,
                    n_pos=s.n_pos, n_neg=s.n_neg, n_null=s.n_null, index=s.index,
                    lambda_min=s.lambda_min, lambda_max=s.lambda_max, tolerance=s.tolerance,
                    finder_iterations=found.iterations)

    width = FLAGS.vmap_width

    def fixed_width_map(fn, xs):
        # Groups of exactly `width` rows (the last padded with repeats, then cut off): every
        # group is the same XLA program, so a row's numbers do not depend on how many rows
        # there are. A vmap over all of them would round differently for another
        # --num_inits or --snapshots, and Newton amplifies a last-bit difference.
        n = xs.shape[0]
        pad = -n % width
        xs = jnp.concatenate([xs, jnp.repeat(xs[-1:], pad, axis=0)])
        out = jax.lax.map(fn, xs, batch_size=width)
        return jax.tree.map(lambda a: a[:n], out)

    @jax.jit
    def run(ids):
        starts = fixed_width_map(trajectory, ids)  # (inits, snapshots, P)
        return fixed_width_map(refine, starts.reshape(-1, starts.shape[-1]))

    n_s = len(snapshots)
    rec = {k: np.asarray(v) for k, v in jax.device_get(run(jnp.arange(FLAGS.num_inits))).items()}
    rec["init_id"] = np.repeat(np.arange(FLAGS.num_inits), n_s)
    rec["start_step"] = np.tile(np.asarray(snapshots), FLAGS.num_inits)
    return rec


def select_saddles(rec: dict) -> tuple[np.ndarray, np.ndarray, int]:
    """Indices of distinct certified saddles to study (spread over the loss range), a
    per-candidate column (the saddle number it is studied as; −2 for a copy of an earlier
    saddle, same loss and index; −1 otherwise), and the number of distinct saddles."""
    from crit.critical import CRITICAL

    is_saddle = (rec["status"] == CRITICAL) & (rec["n_neg"] > 0)
    idx = np.flatnonzero(is_saddle)
    idx = idx[np.argsort(rec["loss"][idx], kind="stable")]
    unique: list[int] = []
    duplicate = np.zeros(len(rec["loss"]), bool)
    for j in idx:
        same = [k for k in unique if rec["n_neg"][k] == rec["n_neg"][j] and
                abs(rec["loss"][k] - rec["loss"][j]) <= 1e-9 * max(1.0, abs(rec["loss"][j]))]
        if same:
            duplicate[j] = True
        else:
            unique.append(int(j))
    if len(unique) > FLAGS.num_saddles:
        picks = np.unique(np.round(np.linspace(0, len(unique) - 1, FLAGS.num_saddles)).astype(int))
        chosen = [unique[p] for p in picks]
    else:
        chosen = unique
    chosen = np.asarray(chosen, dtype=int)
    column = np.full(len(rec["loss"]), -1)
    column[duplicate] = -2
    column[chosen] = np.arange(len(chosen))
    return chosen, column, len(unique)


# ----------------------------------------------------------------------------- 2-4. escapes


def make_study(problem, damping, krylov: bool):
    """One jitted function ``(θ*, key) -> dict`` (compiled once, reused for every saddle): the
    escape eigenpair, the line, GD restarts and the optimizer runs at one saddle."""
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree
    from crit import escape

    _, unravel = ravel_pytree(problem.init_fn(jax.random.PRNGKey(0)))
    loss = lambda t: problem.loss_fn(unravel(t))
    p = problem.n_params
    lanczos = None if p <= FLAGS.dense_max_params else min(FLAGS.lanczos_steps, p)
    krylov_dim = min(FLAGS.krylov_dim, p) if krylov else None
    steps, lr, eps = FLAGS.escape_steps, FLAGS.escape_lr, FLAGS.epsilon
    runs = {  # gradient descent is run with the restarts (the same starts θ* + εv)
        "momentum": lambda t0, k: escape.run_optimizer(loss, t0, "momentum", steps, lr,
                                                       FLAGS.momentum),
        "adam": lambda t0, k: escape.run_optimizer(loss, t0, "adam", steps, FLAGS.adam_lr),
        "pgd": lambda t0, k: escape.perturbed_gradient_descent(
            loss, t0, k, lr, steps, FLAGS.pgd_radius, FLAGS.pgd_threshold, FLAGS.pgd_interval),
        "sfn": lambda t0, k: escape.saddle_free_newton(loss, t0, steps, damping,
                                                       krylov_dim=krylov_dim),
    }

    def study(theta_star, aux):
        nc = escape.negative_curvature_direction(loss, theta_star, lanczos_steps=lanczos,
                                                 key=jax.random.fold_in(aux, 0))
        u = nc.direction
        ts = jnp.linspace(-FLAGS.line_extent, FLAGS.line_extent, FLAGS.line_points)
        line = escape.loss_along(loss, theta_star, u, ts)
        v = jax.random.normal(jax.random.fold_in(aux, 1), (FLAGS.num_random, p))
        v = v / jnp.linalg.norm(v, axis=1, keepdims=True)
        starts_v = theta_star + eps * v
        starts_gd = jnp.concatenate([theta_star + eps * jnp.stack([u, -u]), starts_v])
        gd = jax.vmap(lambda t0: escape.gradient_descent(loss, t0, lr, steps))(starts_gd)
        keys = jax.vmap(lambda k: jax.random.fold_in(jax.random.fold_in(aux, 2), k))(
            jnp.arange(FLAGS.num_random))
        out = dict(eigenvalue=nc.eigenvalue, residual=nc.residual, converged=nc.converged,
                   direction=u, t=line.t, line_loss=line.loss, line_quadratic=line.quadratic,
                   loss_star=line.loss0, curvature=line.curvature,
                   restart_u=gd.loss[:2], restart_v=gd.loss[2:], gd_loss=gd.loss[2:],
                   gd_grad_norm=gd.grad_norm[2:], gd_perturbations=gd.perturbations[2:])
        for name in METHODS[1:]:
            run = jax.vmap(runs[name])(starts_v, keys)
            out[f"{name}_loss"] = run.loss
            out[f"{name}_grad_norm"] = run.grad_norm
            out[f"{name}_perturbations"] = run.perturbations
        return out

    return jax.jit(study)


def study_saddle(study, theta_star, s: int) -> dict:
    """Run the compiled study at saddle ``s``; host arrays, optimizer curves under "curves"."""
    import jax

    aux = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), 2**31 - 1), s)
    out = {k: np.asarray(v) for k, v in jax.device_get(study(theta_star, aux)).items()}
    curves = {name: dict(loss=out.pop(f"{name}_loss"), grad_norm=out.pop(f"{name}_grad_norm"),
                         perturbations=out.pop(f"{name}_perturbations")) for name in METHODS}
    for k in ("eigenvalue", "residual", "loss_star", "curvature"):
        out[k] = float(out[k])
    out["converged"] = bool(out["converged"])
    out["curves"] = curves
    lows = [np.min(c["loss"]) for c in curves.values()] + [np.min(out["restart_u"]),
                                                           np.min(out["restart_v"])]
    out["loss_low"] = float(min(lows))
    return out


def escape_threshold(st: dict) -> float:
    """Escaped once L < L* − f·(L* − L_low): L_low is the lowest loss any run from this saddle
    reached, f = --escape_fraction. NaN (nobody escapes) if no run got below L* by more than
    1e-12·max(1, |L*|)."""
    gap = st["loss_star"] - st["loss_low"]
    if gap <= 1e-12 * max(1.0, abs(st["loss_star"])):
        return float("nan")
    return st["loss_star"] - FLAGS.escape_fraction * gap


def escape_steps_of(curves: np.ndarray, st: dict) -> np.ndarray:
    """First step below :func:`escape_threshold` per curve (−1: never)."""
    from crit import escape

    level = escape_threshold(st)
    if not np.isfinite(level):
        return np.full(len(curves), -1)
    return escape.escape_step(curves, np.full(len(curves), st["loss_star"]),
                              st["loss_star"] - level)


# ----------------------------------------------------------------------------- 5. toys


TOY_STARTS = {"quadratic": ((1.5, 0.15), (-1.2, -0.1), (0.6, 0.35)),
              "monkey": ((0.9, 0.15), (-0.6, 0.6), (0.2, -0.9))}


def toys() -> dict:
    """Trajectories of Newton, saddle-free Newton and GD on Dauphin's two toy saddles; GD and
    PGD started exactly at the origin of 5x² − y² (one compiled function)."""
    import jax
    import jax.numpy as jnp
    from crit import escape, toy

    steps = FLAGS.toy_steps

    def all_runs(starts_q, starts_m, key):
        out = {}
        for name, f, starts in (("quadratic", toy.quadratic_saddle, starts_q),
                                ("monkey", toy.monkey_saddle, starts_m)):
            for method, fn in (
                    ("newton", lambda t0: escape.newton(f, t0, steps, record_path=True)),
                    ("sfn", lambda t0: escape.saddle_free_newton(f, t0, steps, record_path=True)),
                    ("gd", lambda t0: escape.gradient_descent(f, t0, 0.05, 10 * steps,
                                                              record_path=True))):
                run = jax.vmap(fn)(starts)
                out[f"{name}_{method}_path"] = run.path
                out[f"{name}_{method}_loss"] = run.loss
        origin = jnp.zeros(2)
        gd = escape.gradient_descent(toy.quadratic_saddle, origin, 0.05, 100)
        pgd = escape.perturbed_gradient_descent(toy.quadratic_saddle, origin, key, 0.05, 100,
                                                1e-3, 1e-3, 10)
        out.update(origin_gd_loss=gd.loss, origin_pgd_loss=pgd.loss,
                   origin_pgd_perturbations=pgd.perturbations)
        return out

    out = jax.jit(all_runs)(jnp.asarray(TOY_STARTS["quadratic"]),
                            jnp.asarray(TOY_STARTS["monkey"]), jax.random.PRNGKey(FLAGS.seed))
    return {k: np.asarray(v) for k, v in jax.device_get(out).items()}


# ----------------------------------------------------------------------------- figures


def line_figure(studies, saddles, out_dir):
    """Top: L(θ* + t·u) − L* and ½λt²; bottom: their ratio, → 1 as t → 0 (leading order)."""
    import matplotlib.pyplot as plt
    from crit import plots

    n = len(studies)
    fig, axes = plt.subplots(2, n, figsize=(4.2 * n, 6.0), squeeze=False, sharex="col",
                             gridspec_kw=dict(height_ratios=(1.6, 1)))
    for a, b, st, sd in zip(axes[0], axes[1], studies, saddles):
        dl = st["line_loss"] - st["loss_star"]
        dq = st["line_quadratic"] - st["loss_star"]
        a.plot(st["t"], dl, lw=1.8, label="L(θ* + t·u) − L*")
        a.plot(st["t"], dq, "--", lw=1.4,
               label=f"½λt², λ = {st['eigenvalue']:.3g}".replace("-", "−"))
        lo, hi = min(dl.min(), dq.min()), dl.max()
        a.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.1 * (hi - lo + 1e-12))
        a.set_title(f"saddle {sd['saddle']}: L* = {sd['loss']:.4g}, index {sd['index']:.3f} "
                    f"({sd['n_neg']} neg)", fontsize=9)
        a.legend(fontsize=7)
        ok = np.abs(st["t"]) > 1e-12
        b.plot(st["t"][ok], dl[ok] / dq[ok], color="k", lw=1.4)
        b.axhline(1.0, color="tab:orange", ls="--", lw=1)
        b.set_ylim(-1.0, 1.5)
        b.set_xlabel("t  (unit eigenvector u of λ_min)")
        for ax in (a, b):
            ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("loss − L*")
    axes[1, 0].set_ylabel("(L − L*) / (½λt²)")
    return plots.save_figure(fig, out_dir, "escape_line")


def _symlog(ax, studies):
    """Symmetric log y axis, linear within ½|λ|ε²; ticks at ±decades clear of the linear band
    (the default ticks crowd around 0)."""
    from matplotlib.ticker import FixedLocator, NullFormatter

    th = max(min(0.5 * abs(st["eigenvalue"]) * FLAGS.epsilon ** 2 for st in studies), 1e-14)
    ax.set_yscale("symlog", linthresh=th, linscale=0.3)
    lo, hi = ax.get_ylim()
    top = int(np.ceil(np.log10(max(abs(lo), abs(hi), 10 * th))))
    decades = [10.0 ** k for k in range(int(np.floor(np.log10(th))) + 2, top + 1)]
    every = max(1, len(decades) // 5)
    decades = decades[::-1][::every]
    ticks = sorted([d for d in decades if d <= hi] + [0.0] + [-d for d in decades if -d >= lo])
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_formatter(NullFormatter())


def restarts_figure(studies, saddles, out_dir):
    import matplotlib.pyplot as plt
    from crit import plots

    n = len(studies)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.6), squeeze=False)
    steps = np.arange(FLAGS.escape_steps + 1)
    for ax, st, sd in zip(axes[0], studies, saddles):
        lam = abs(st["eigenvalue"])
        for k, c in enumerate(st["restart_v"]):
            ax.plot(steps, c - st["loss_star"], color="gray", lw=0.8, alpha=0.7,
                    label="θ* + ε·v (random unit v)" if k == 0 else None)
        for c, sign, col, ls in zip(st["restart_u"], ("+", "−"), ("tab:red", "tab:orange"),
                                    ("-", "--")):
            ax.plot(steps, c - st["loss_star"], color=col, lw=1.6, ls=ls, label=f"θ* {sign} ε·u")
        pred = -0.5 * lam * FLAGS.epsilon ** 2 * (1 + FLAGS.escape_lr * lam) ** (2.0 * steps)
        ok = -pred < 10 * np.max(np.abs(st["restart_u"] - st["loss_star"]))
        ax.plot(steps[ok], pred[ok], "k:", lw=1.2, label="−½|λ|ε²(1 + lr|λ|)^{2t}")
        _symlog(ax, studies)
        ax.set_xlabel(f"gradient-descent step (lr {FLAGS.escape_lr:g})")
        ax.set_title(f"saddle {sd['saddle']}: λ = {st['eigenvalue']:.3g}, ε = "
                     f"{FLAGS.epsilon:g}".replace("-", "−"), fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    axes[0, 0].set_ylabel("loss − L*  (symlog)")
    return plots.save_figure(fig, out_dir, "escape_restarts")


def optimizers_figure(studies, saddles, out_dir, sfn_label):
    import matplotlib.pyplot as plt
    from crit import plots

    n = len(studies)
    fig, axes = plt.subplots(1, n, figsize=(4.2 * n, 3.8), squeeze=False)
    steps = np.arange(FLAGS.escape_steps + 1) + 1
    for ax, st, sd in zip(axes[0], studies, saddles):
        for name in METHODS:
            c = st["curves"][name]["loss"] - st["loss_star"]
            label = sfn_label if name == "sfn" else METHOD_LABEL[name]
            ax.plot(steps, np.median(c, axis=0), color=METHOD_COLOUR[name], lw=1.6, label=label)
            ax.fill_between(steps, np.min(c, axis=0), np.max(c, axis=0),
                            color=METHOD_COLOUR[name], alpha=0.12)
        level = escape_threshold(st)
        if np.isfinite(level):
            ax.axhline(level - st["loss_star"], color="k", ls=":", lw=1,
                       label=f"escaped: {FLAGS.escape_fraction:g} of the way to L_low")
        ax.set_xscale("log")
        _symlog(ax, studies)
        ax.set_xlabel("step + 1")
        ax.set_title(f"saddle {sd['saddle']}: L* = {sd['loss']:.4g}, λ = "
                     f"{st['eigenvalue']:.3g}".replace("-", "−"), fontsize=9)
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel(f"loss − L*  (median, band min–max over {FLAGS.num_random} starts)",
                          fontsize=8)
    axes[0, -1].legend(fontsize=7, loc="lower left")
    fig.suptitle(f"from θ* + ε·v, ε = {FLAGS.epsilon:g}, the same {FLAGS.num_random} random "
                 "unit directions for every method", fontsize=9)
    return plots.save_figure(fig, out_dir, "escape_optimizers")


def toys_figure(t: dict, out_dir):
    import matplotlib.pyplot as plt
    from crit import plots, toy

    fig, axes = plt.subplots(1, 3, figsize=(14.5, 4.4),
                             gridspec_kw=dict(width_ratios=(1, 1, 0.9), wspace=0.45))
    grid = np.linspace(-2, 2, 121)
    xx, yy = np.meshgrid(grid, grid)
    styles = {"newton": dict(color="tab:blue", marker="o", label="Newton −H⁻¹g"),
              "sfn": dict(color="tab:red", marker="s", label="saddle-free Newton −|H|⁻¹g"),
              "gd": dict(color="w", marker="", label="gradient descent (lr 0.05)")}
    for ax, name, f, title in ((axes[0], "quadratic", toy.quadratic_saddle, "f = 5x² − y²"),
                               (axes[1], "monkey", toy.monkey_saddle, "f = x³ − 3xy²")):
        zz = np.asarray(f(np.stack([xx, yy])))
        cs = ax.contourf(xx, yy, zz, levels=24, cmap="viridis")
        fig.colorbar(cs, ax=ax, fraction=0.046)
        for method, style in styles.items():
            paths = t[f"{name}_{method}_path"]
            for j, path in enumerate(paths):
                ax.plot(path[:, 0], path[:, 1], "-", ms=3.5, lw=1.3, color=style["color"],
                        marker=style["marker"], label=style["label"] if j == 0 else None)
                ax.plot(*path[0], "k^", ms=6)
        ax.plot(0, 0, "*", color="gold", ms=14, mec="k", label="saddle (0, 0)")
        ax.set_xlim(-2, 2)
        ax.set_ylim(-2, 2)
        ax.set_aspect("equal")
        ax.set_title(f"{title}: {FLAGS.toy_steps} (saddle-free) Newton steps, ▲ starts",
                     fontsize=9)
        ax.legend(fontsize=6, loc="lower right", framealpha=0.8)
    ax = axes[2]
    steps = np.arange(len(t["origin_gd_loss"]))
    ax.plot(steps, t["origin_gd_loss"], lw=2, label="gradient descent: g = 0, never moves")
    ax.plot(steps, t["origin_pgd_loss"], lw=1.6,
            label=f"perturbed GD ({int(t['origin_pgd_perturbations'])} perturbation(s), r = 1e-3)")
    ax.set_yscale("symlog", linthresh=1e-6)
    ax.set_xlabel("step (lr 0.05)")
    ax.set_ylabel("f = 5x² − y²")
    ax.set_title("started exactly at the saddle (0, 0)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return plots.save_figure(fig, out_dir, "toy_saddles")


# ----------------------------------------------------------------------------- app


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    problem = common.problem_from_flags()
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(problem), OUTPUTS)
    from crit.critical import STATUSES

    snapshots = parse_ints("snapshots", FLAGS.snapshots)
    damping = parse_damping(FLAGS.sfn_damping)
    damping = damping[0] if len(damping) == 1 else damping
    p = problem.n_params
    krylov = p > FLAGS.dense_max_params
    sfn_label = (f"saddle-free Newton (Krylov, k = {min(FLAGS.krylov_dim, p)})" if krylov
                 else "saddle-free Newton (dense)")

    print(f"{problem.name}: P = {p}, n = {problem.dataset.n_train}; {FLAGS.num_inits} inits × "
          f"snapshots {snapshots} -> finder {FLAGS.finder}", flush=True)
    rec = find_candidates(problem, snapshots)
    chosen, column, n_unique = select_saddles(rec)
    status = np.array([STATUSES[s] for s in rec["status"]])
    cols = ("init_id", "start_step", "status", "loss", "grad_norm", "n_pos", "n_neg", "n_null",
            "index", "lambda_min", "lambda_max", "tolerance", "finder_iterations")
    rec_out = dict(rec, status=status)
    store.write_csv(out_dir / "saddles.csv", {**{c: rec_out[c] for c in cols},
                                               "saddle": column})
    counts = ", ".join(f"{s} {int((status == s).sum())}" for s in STATUSES)
    n_saddle = int(((status == "critical") & (rec["n_neg"] > 0)).sum())
    print(f"{len(status)} candidates: {counts}; certified saddles (index > 0): {n_saddle}, "
          f"{n_unique} distinct after merging copies; studying {len(chosen)}", flush=True)
    if len(chosen) == 0:
        print(f"NO CERTIFIED SADDLE FOUND among {len(status)} candidates (statuses: {counts}). "
              "Try more --num_inits, other --snapshots (e.g. 0,20,50), more --finder_steps, a "
              "larger --l2 (better-conditioned critical points), or a looser --grad_tol. Every "
              f"candidate is listed in {out_dir}/saddles.csv.", file=sys.stderr)
        sys.exit(NO_SADDLE_EXIT)

    saddles, studies = [], []
    study = make_study(problem, damping, krylov)
    for s, j in enumerate(chosen):
        saddles.append(dict(saddle=s, loss=float(rec["loss"][j]), index=float(rec["index"][j]),
                            n_neg=int(rec["n_neg"][j]), init_id=int(rec["init_id"][j]),
                            start_step=int(rec["start_step"][j])))
        studies.append(study_saddle(study, rec["theta"][j], s))

    # --- data
    rows = {k: [] for k in ("saddle", "t", "loss", "quadratic")}
    for sd, st in zip(saddles, studies):
        rows["saddle"] += [sd["saddle"]] * len(st["t"])
        rows["t"] += list(st["t"])
        rows["loss"] += list(st["line_loss"])
        rows["quadratic"] += list(st["line_quadratic"])
    store.write_csv(out_dir / "escape_line.csv", {k: np.asarray(v) for k, v in rows.items()})
    store.atomic_save_npz(out_dir / "restarts.npz", {
        "saddle_loss": np.array([st["loss_star"] for st in studies]),
        # λ_min of the dense Hessian, or with P > --dense_max_params the smallest Ritz value of
        # --lanczos_steps Lanczos steps; its residual ‖Hu − λu‖ and converged flag beside it
        "eigenvalue": np.array([st["eigenvalue"] for st in studies]),
        "eigenvalue_residual": np.array([st["residual"] for st in studies]),
        "eigenvalue_converged": np.array([st["converged"] for st in studies]),
        "eigenvalue_method": np.asarray("lanczos" if p > FLAGS.dense_max_params else "dense"),
        "restart_u": np.stack([st["restart_u"] for st in studies]),  # (S, 2, T+1): +u, −u
        "restart_v": np.stack([st["restart_v"] for st in studies]),  # (S, K, T+1)
        "direction": np.stack([st["direction"] for st in studies]),
        "epsilon": np.asarray(FLAGS.epsilon), "lr": np.asarray(FLAGS.escape_lr)})
    opt_rows = {k: [] for k in ("saddle", "method", "start", "escape_step", "final_loss",
                                "final_grad_norm", "perturbations")}
    for sd, st in zip(saddles, studies):
        for name in METHODS:
            c = st["curves"][name]
            esc = escape_steps_of(c["loss"], st)
            for k in range(FLAGS.num_random):
                opt_rows["saddle"].append(sd["saddle"])
                opt_rows["method"].append(name)
                opt_rows["start"].append(k)
                opt_rows["escape_step"].append(int(esc[k]))
                opt_rows["final_loss"].append(float(c["loss"][k, -1]))
                opt_rows["final_grad_norm"].append(float(c["grad_norm"][k, -1]))
                opt_rows["perturbations"].append(int(c["perturbations"][k]))
    store.write_csv(out_dir / "optimizers.csv", {k: np.asarray(v) for k, v in opt_rows.items()})
    store.atomic_save_npz(out_dir / "optimizers.npz", {
        f"{name}_{field}": np.stack([st["curves"][name][field] for st in studies])
        for name in METHODS for field in ("loss", "grad_norm")} | {
        "saddle_loss": np.array([st["loss_star"] for st in studies]),
        "loss_low": np.array([st["loss_low"] for st in studies]),
        "escape_level": np.array([escape_threshold(st) for st in studies]),
        "methods": np.array(METHODS)})

    t = toys()
    store.atomic_save_npz(out_dir / "toys.npz", t)
    qn, qs = t["quadratic_newton_path"], t["quadratic_sfn_path"]
    print("toys: 5x² − y², distance to the saddle after 1 and after "
          f"{FLAGS.toy_steps} steps: Newton {np.linalg.norm(qn[:, 1], axis=1).round(3).tolist()}"
          f", {np.linalg.norm(qn[:, -1], axis=1).round(3).tolist()}; saddle-free Newton "
          f"{np.linalg.norm(qs[:, 1], axis=1).round(3).tolist()}, "
          f"{np.linalg.norm(qs[:, -1], axis=1).round(3).tolist()} (starts "
          f"{np.linalg.norm(qn[:, 0], axis=1).round(3).tolist()}); from the exact saddle GD "
          f"ends at f = {t['origin_gd_loss'][-1]:.3g}, PGD at {t['origin_pgd_loss'][-1]:.3g}",
          flush=True)

    # --- figures
    toys_figure(t, out_dir)
    line_figure(studies, saddles, out_dir)
    restarts_figure(studies, saddles, out_dir)
    optimizers_figure(studies, saddles, out_dir, sfn_label)

    # --- summary
    esc_arr = np.asarray(opt_rows["escape_step"])
    meth_arr = np.asarray(opt_rows["method"])
    sad_arr = np.asarray(opt_rows["saddle"])
    fmt = lambda e: "never" if e < 0 else str(int(e))
    for sd, st in zip(saddles, studies):
        s = sd["saddle"]
        print(f"saddle {s}: L* = {sd['loss']:.6g}, index {sd['index']:.3f} ({sd['n_neg']} "
              f"negative), λ_min = {st['eigenvalue']:.4g} (residual {st['residual']:.1e}); from "
              f"init {sd['init_id']} at step {sd['start_step']}; lowest loss reached "
              f"{st['loss_low']:.6g}")
        ratios = []
        for frac in (0.01, 0.1, 0.5):
            k = np.argmin(np.abs(st["t"] - frac * FLAGS.line_extent))
            ratios.append(f"t = {st['t'][k]:.3g}: "
                          f"{(st['line_loss'][k] - st['loss_star']) / (st['line_quadratic'][k] - st['loss_star']):.3f}")
        print("  (L(θ* + t·u) − L*) / (½λt²) at " + ", ".join(ratios))
        eu, ev = escape_steps_of(st["restart_u"], st), escape_steps_of(st["restart_v"], st)
        print(f"  GD restarts (lr {FLAGS.escape_lr:g}), steps to escape: +εu {fmt(eu[0])}, −εu "
              f"{fmt(eu[1])}; random v: " + " ".join(fmt(e) for e in ev))
        parts = []
        for name in METHODS:
            e = esc_arr[(sad_arr == s) & (meth_arr == name)]
            med = np.median(np.where(e < 0, np.inf, e))
            final = np.median(st["curves"][name]["loss"][:, -1])
            parts.append(f"{name} {'never' if not np.isfinite(med) else int(med)}"
                         f"{'' if (e >= 0).all() else f' ({int((e < 0).sum())} never)'} / "
                         f"{final:.6g}")
        print("  optimizers, median escape step / median final loss: " + "; ".join(parts))
    print(f"wrote {out_dir}/saddles.csv, escape_line.csv, restarts.npz, optimizers.csv, "
          "optimizers.npz, toys.npz and figures escape_line, escape_restarts, "
          "escape_optimizers, toy_saddles")


if __name__ == "__main__":
    app.run(main)
