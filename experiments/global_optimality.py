"""Global optimality certificates for sums of homogeneous subnetworks (Haeffele & Vidal 2017).

    python -m experiments.global_optimality                       # d = 2, n = 100, λ = 0.02
    python -m experiments.global_optimality --dim=3 --lam=0.05 --regularizer=product

Protocol (REFERENCES §8; crit/homogeneous.py). Data: x ~ N(0, I_d), targets from a bias-free
ReLU teacher with ``--teacher_units`` units (weights N(0, I), output signs ±1) plus Gaussian
noise. Model: f(x) = Σ_j w2_j·relu(w1_jᵀx), r subnetworks of degree 2, regularizer Θ (squared
½Σ(‖w1_j‖² + w2_j²) or product Σ‖w1_j‖|w2_j|, both degree 2), objective
F = (1/2n)‖f − y‖² + λΘ.

Meta-algorithm from r = ``--r0``: local descent (Adam, then L-BFGS polishing, then the optimal
rescaling of the subnetworks with their directions fixed, a non-negative lasso; best point kept);
certificate: (a) a zero subnetwork, (b) the polar Ω°(−∇_f ℓ) = max_{‖w1‖=1} |⟨z, relu(Xw1)⟩|,
z = (y − f)/n, found by projected ascent from ``--polar_starts`` random starts plus every data
direction; certified iff polar ≤ λ(1 + ``--rtol``). If not, a subnetwork τ·(ŵ1, ±1) at the polar
maximizer is added (τ from a grid, lowest F) and descent restarts, up to ``--r_max``.
Baseline: for every r = 1..r_max, ``--baseline_restarts`` plain random-init descents, certified
the same way (one vmapped call).

Writes to ``--out_dir``: config.json, rounds.csv (one row per meta round), baseline.csv (one row
per random-init descent), global_optimality.npz (data, final subnetworks, all rows),
objective_vs_r.png/.pdf.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments.provenance import environment  # noqa: F401  (config.json)

import crit  # noqa: F401  (float64 on)
from crit import store
from crit.homogeneous import REGULARIZERS

FLAGS = flags.FLAGS
flags.DEFINE_integer("dim", 2, "Input dimension d of the Gaussian data.")
flags.DEFINE_integer("n_points", 100, "Training points.")
flags.DEFINE_integer("teacher_units", 4, "ReLU units of the bias-free teacher that makes y.")
flags.DEFINE_float("noise", 0.1, "Standard deviation of the Gaussian noise added to y.")
flags.DEFINE_integer("data_seed", 0, "Seed of the data (numpy).")
flags.DEFINE_float("lam", 0.02, "Regularization weight λ (> 0).")
flags.DEFINE_enum("regularizer", "squared", list(REGULARIZERS), "Θ: squared = ½Σ(‖w1_j‖² + "
                  "w2_j²) (smooth), product = Σ‖w1_j‖·|w2_j|; both degree 2 like the subnetworks.")
flags.DEFINE_integer("r0", 1, "Subnetworks the meta-algorithm starts with.")
flags.DEFINE_integer("r_max", 10, "Most subnetworks (meta-algorithm and baseline).")
flags.DEFINE_integer("steps", 2000, "Adam steps per local descent.")
flags.DEFINE_integer("polish_steps", 300, "L-BFGS steps after Adam per local descent.")
flags.DEFINE_integer("rescale_steps", 500, "FISTA steps of the optimal rescaling after each "
                     "descent (directions fixed: a non-negative lasso; 0 skips it).")
flags.DEFINE_float("lr", 1e-2, "Adam learning rate (decays exponentially to lr/1000).")
flags.DEFINE_float("init_scale", 0.1, "Standard deviation of the random initial weights.")
flags.DEFINE_float("zero_tol", 1e-6, "A subnetwork is zero when θ(W_j) ≤ zero_tol.")
flags.DEFINE_float("rtol", 1e-2, "Certified iff polar ≤ λ·(1 + rtol).")
flags.DEFINE_integer("polar_starts", 256, "Random starts of the polar search (plus ±x_i/‖x_i‖).")
flags.DEFINE_integer("polar_steps", 200, "Projected-ascent steps per start.")
flags.DEFINE_integer("baseline_restarts", 4, "Random-init descents per r for the baseline "
                     "(0: none).")
flags.DEFINE_integer("seed", 0, "Root seed: meta-algorithm fold_in(PRNGKey(seed), 1), baseline "
                     "fold_in(PRNGKey(seed), 2).")
flags.DEFINE_string("out_dir", "runs/global_optimality", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

OUTPUTS = ("rounds.csv", "baseline.csv", "global_optimality.npz")
NOT_PROTOCOL = ("out_dir", "overwrite")
ROUND_COLUMNS = ("round", "r", "objective_start", "objective", "loss", "regularizer", "polar",
                 "polar_over_lam", "certified", "gap_bound", "n_zero", "n_kinks", "grad_norm",
                 "tau_added", "objective_after_add")
BASELINE_COLUMNS = ("r", "restart", "objective", "loss", "regularizer", "polar",
                    "polar_over_lam", "certified", "gap_bound", "n_zero", "n_kinks", "grad_norm")


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    e = []
    for name, low in (("dim", 1), ("n_points", 1), ("teacher_units", 1), ("r0", 1),
                      ("r_max", 1), ("steps", 0), ("polish_steps", 0), ("rescale_steps", 0), ("polar_starts", 1),
                      ("polar_steps", 1), ("baseline_restarts", 0)):
        if getattr(FLAGS, name) < low:
            e.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if FLAGS.r0 > FLAGS.r_max >= 1:
        e.append(f"--r0={FLAGS.r0}: must be <= --r_max={FLAGS.r_max}")
    if FLAGS.r_max > 200:
        e.append(f"--r_max={FLAGS.r_max}: at most 200")
    for name in ("lam", "lr", "init_scale"):
        v = getattr(FLAGS, name)
        if not (math.isfinite(v) and v > 0):
            e.append(f"--{name}={v}: must be a finite number > 0")
    for name in ("noise", "zero_tol", "rtol"):
        v = getattr(FLAGS, name)
        if not (math.isfinite(v) and v >= 0):
            e.append(f"--{name}={v}: must be a finite number >= 0")
    if FLAGS.steps + FLAGS.polish_steps < 1:
        e.append("--steps and --polish_steps: at least one descent step is needed")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        e.append(f"--out_dir={out}: is a file, not a directory")
    if e:
        raise app.UsageError("\n".join(e))


def make_data():
    """x ~ N(0, I_d); y = Σ_k a_k relu(v_kᵀx) + noise·N(0, 1), v_k ~ N(0, I_d), a_k = ±1."""
    rng = np.random.default_rng(FLAGS.data_seed)
    x = rng.standard_normal((FLAGS.n_points, FLAGS.dim))
    v = rng.standard_normal((FLAGS.teacher_units, FLAGS.dim))
    a = rng.choice([-1.0, 1.0], FLAGS.teacher_units)
    y = np.maximum(x @ v.T, 0.0) @ a + FLAGS.noise * rng.standard_normal(FLAGS.n_points)
    return x, y


def run_config() -> dict:
    own = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
    protocol = {k: v for k, v in own.items() if k not in NOT_PROTOCOL}
    return {"experiment": "global_optimality", "protocol": protocol, "flags": own,
            "model": "f(x) = sum_j w2_j relu(w1_j^T x), bias-free, degree 2",
            "loss": "(1/2n)||f - y||^2", "environment": environment()}


def baseline(x, y, root):
    """Random-init local descents for every r = 1..r_max (vmapped over (r, restart))."""
    import jax
    import jax.numpy as jnp
    from crit import homogeneous as hv

    rs = np.repeat(np.arange(1, FLAGS.r_max + 1), FLAGS.baseline_restarts)
    restarts = np.tile(np.arange(FLAGS.baseline_restarts), FLAGS.r_max)
    x, y = jnp.asarray(x), jnp.asarray(y)

    def one(r, i):
        key = jax.random.fold_in(jax.random.fold_in(root, r), i)
        params, mask = hv.init_subnetworks(jax.random.fold_in(key, 0), FLAGS.r_max, x.shape[1],
                                           r, FLAGS.init_scale)
        params = hv.Subnetworks(params.w1.astype(x.dtype), params.w2.astype(x.dtype))
        params = hv.local_descent(params, mask, x, y, FLAGS.lam, FLAGS.regularizer, FLAGS.steps,
                                  FLAGS.lr, FLAGS.polish_steps, FLAGS.rescale_steps).params
        return hv.certificate(params, mask, x, y, FLAGS.lam, jax.random.fold_in(key, 1),
                              FLAGS.regularizer, FLAGS.zero_tol, FLAGS.rtol, FLAGS.polar_starts,
                              FLAGS.polar_steps)

    cert = jax.device_get(jax.jit(jax.vmap(one))(jnp.asarray(rs), jnp.asarray(restarts)))
    return {"r": rs, "restart": restarts, "objective": cert.objective, "loss": cert.loss,
            "regularizer": cert.regularizer, "polar": cert.polar,
            "polar_over_lam": cert.polar / FLAGS.lam, "certified": cert.certified,
            "gap_bound": cert.gap_bound, "n_zero": cert.n_zero, "n_kinks": cert.n_kinks, "grad_norm": cert.grad_norm}


FLOOR = 1e-9  # log-axis floor for excesses that are zero to rounding


def figure(rounds: dict, base: dict | None, out_dir: Path, title: str):
    """Left: excess objective F − F_best vs r (F_best: lowest F of every run), with the meta
    rounds' bound on F − F*; right: polar/λ − 1 vs r with the threshold rtol (log axes)."""
    import matplotlib.pyplot as plt
    from crit import plots

    f_best = np.min(np.concatenate([rounds["objective"]]
                                   + ([base["objective"]] if base is not None else [])))
    excess = lambda f: np.maximum(np.asarray(f) - f_best, FLOOR)
    slack = lambda p: np.maximum(np.asarray(p) - 1.0, FLOOR)
    fig, (a, b) = plt.subplots(1, 2, figsize=(11.0, 4.2), gridspec_kw=dict(wspace=0.3))
    r = rounds["r"]
    cert = rounds["certified"].astype(bool)
    panels = ((a, "objective", excess), (b, "polar_over_lam", slack))
    if base is not None:
        jitter = (base["restart"] - (FLAGS.baseline_restarts - 1) / 2) * 0.06
        bc = base["certified"].astype(bool)
        for ax, key, tf in panels:
            ax.plot(base["r"][~bc] + jitter[~bc], tf(base[key][~bc]), "x", color="gray", ms=5,
                    label=f"random init, not certified ({int((~bc).sum())})")
            ax.plot(base["r"][bc] + jitter[bc], tf(base[key][bc]), "o", mfc="none",
                    color="tab:green", ms=6, label=f"random init, certified ({int(bc.sum())})")
    for ax, key, tf in panels:
        ax.plot(r, tf(rounds[key]), "-o", color="tab:blue", ms=5,
                label="meta-algorithm (after descent)")
        if cert.any():
            ax.plot(r[cert], tf(rounds[key][cert]), "*", color="tab:red", ms=15, zorder=5,
                    label="certified global minimum")
        ax.set_xlabel("number of subnetworks r")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    a.plot(r, np.maximum(rounds["gap_bound"], FLOOR), "v--", color="tab:purple", ms=4, lw=1,
           label="meta: certified bound on F − F*")
    a.set_ylabel(f"F − F_best  (F_best = {f_best:.6g}, lowest of all runs; floor {FLOOR:g})",
                 fontsize=8)
    b.axhline(FLAGS.rtol, color="tab:red", ls="--", lw=1,
              label=f"certified below rtol = {FLAGS.rtol:g}")
    b.set_ylabel(f"polar Ω°(−∇ℓ)/λ − 1  (floor {FLOOR:g})", fontsize=8)
    a.legend(fontsize=7)
    b.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return plots.save_figure(fig, out_dir, "objective_vs_r")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    out_dir = Path(FLAGS.out_dir)
    try:
        store.prepare_out_dir(out_dir, run_config(), FLAGS.overwrite,
                              outputs=OUTPUTS, chunked=False)
    except store.ResultsDirError as exc:
        raise app.UsageError(str(exc)) from None
    import jax
    from crit import homogeneous as hv

    x, y = make_data()
    root = jax.random.PRNGKey(FLAGS.seed)
    print(f"data: n = {FLAGS.n_points}, d = {FLAGS.dim}, teacher {FLAGS.teacher_units} ReLU units, "
          f"noise {FLAGS.noise:g}; λ = {FLAGS.lam:g}, regularizer {FLAGS.regularizer}; certified "
          f"iff polar ≤ λ(1 + {FLAGS.rtol:g})", flush=True)
    rounds, params, mask = hv.meta_algorithm(
        x, y, FLAGS.lam, jax.random.fold_in(root, 1), FLAGS.r_max, FLAGS.r0, FLAGS.regularizer,
        FLAGS.steps, FLAGS.lr, FLAGS.polish_steps, FLAGS.rescale_steps, FLAGS.init_scale,
        FLAGS.zero_tol, FLAGS.rtol, FLAGS.polar_starts, FLAGS.polar_steps)
    rows = {k: np.array([getattr(rd, k) for rd in rounds]) for k in hv.MetaRound._fields}
    rows["round"] = np.arange(len(rounds))
    rows["polar_over_lam"] = rows["polar"] / FLAGS.lam
    print("meta-algorithm (F after descent; polar/λ; bound on F − F*; zero subnetworks; ReLU "
          "kinks; ‖∇F‖):")
    for k in range(len(rounds)):
        print(f"  r = {rows['r'][k]:3d}: F = {rows['objective'][k]:.6f} (from "
              f"{rows['objective_start'][k]:.6f}), polar/λ = {rows['polar_over_lam'][k]:.4f}, "
              f"F − F* ≤ {rows['gap_bound'][k]:.2e}, "
              f"zero {rows['n_zero'][k]}, kinks {rows['n_kinks'][k]}, ‖∇F‖ = "
              f"{rows['grad_norm'][k]:.1e}" + ("  CERTIFIED" if rows["certified"][k] else
                                               f"  -> add τ = {rows['tau_added'][k]:.3g}"))
    objectives = np.concatenate([[rows["objective_start"][0]],
                                 np.ravel(np.column_stack([rows["objective"],
                                                           rows["objective_after_add"]]))])
    objectives = objectives[np.isfinite(objectives)]
    monotone = bool(np.all(np.diff(objectives) <= 1e-12 * np.abs(objectives[:-1])))
    last = rounds[-1]
    if last.certified:
        print(f"certified global minimum at r = {last.r} (to within polar ≤ λ(1 + rtol)): F = "
              f"{last.objective:.6f}, polar/λ = {last.polar / FLAGS.lam:.4f}, F − F* ≤ "
              f"{last.gap_bound:.2e} (zero subnetwork: {last.n_zero > 0})")
    else:
        print(f"NOT certified by r_max = {FLAGS.r_max}: polar/λ = {last.polar / FLAGS.lam:.4f} > "
              f"1 + rtol. Raise --r_max, --steps/--polish_steps, or --rtol (ReLU kinks keep "
              "‖∇F‖ from vanishing).")
    print(f"objective non-increasing across rounds and additions: {monotone}")
    store.write_csv(out_dir / "rounds.csv", {c: rows[c] for c in ROUND_COLUMNS})
    base = None
    if FLAGS.baseline_restarts:
        base = baseline(x, y, jax.random.fold_in(root, 2))
        store.write_csv(out_dir / "baseline.csv", {c: base[c] for c in BASELINE_COLUMNS})
        print(f"random-init baseline ({FLAGS.baseline_restarts} restarts per r): best / median F "
              "and certified count per r:")
        for r in range(1, FLAGS.r_max + 1):
            sel = base["r"] == r
            print(f"  r = {r:3d}: {np.min(base['objective'][sel]):.6f} / "
                  f"{np.median(base['objective'][sel]):.6f}, certified "
                  f"{int(base['certified'][sel].sum())}/{int(sel.sum())}")
        best = float(np.min(base["objective"]))
        print(f"  lowest baseline F = {best:.6f}; meta-algorithm final F = {last.objective:.6f} "
              f"(difference {last.objective - best:+.2e}; its bound F − F* ≤ "
              f"{last.gap_bound:.2e})")
    params = jax.device_get(params)
    store.atomic_save_npz(out_dir / "global_optimality.npz", {
        "x": x, "y": y, "w1": params.w1, "w2": params.w2, "mask": np.asarray(mask),
        **{f"round_{k}": v for k, v in rows.items()},
        **({f"baseline_{k}": np.asarray(v) for k, v in base.items()} if base else {})})
    figure(rows, base, out_dir,
           f"Haeffele–Vidal meta-algorithm: n = {FLAGS.n_points}, d = {FLAGS.dim}, λ = "
           f"{FLAGS.lam:g}, Θ {FLAGS.regularizer}; "
           + (f"certified at r = {last.r}" if last.certified else "not certified"))
    print(f"wrote {out_dir}/rounds.csv, " + ("baseline.csv, " if base else "")
          + "global_optimality.npz, objective_vs_r.png/.pdf")


if __name__ == "__main__":
    app.run(main)
