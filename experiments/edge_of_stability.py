"""Curvature during training: sharpness and negative curvature along the path, many learning
rates at once (the edge of stability, Cohen et al. 2021; 2022 for Adam).

    python -m experiments.edge_of_stability                       # GD, 4 learning rates × 4 inits
    python -m experiments.edge_of_stability --learning_rates=0.05,0.1 --num_inits=2 \\
        --train_steps=500 --track_every=5 --slq_every=10
    python -m experiments.edge_of_stability --optimizer=adam --learning_rates=1e-3,3e-3,1e-2
    python -m experiments.edge_of_stability --sweep=vmap             # one vmapped program
    python -m experiments.edge_of_stability --shard_axis=data --eval_batch_size=64  # data axis

Protocol. Init i is ``init_fn(fold_in(PRNGKey(seed), i))``, the same for every learning rate.
Every (learning rate, init) pair is trained ``--train_steps`` full-batch steps of
``--optimizer`` (sgd = gradient descent, momentum = heavy ball, adam), by
``crit.tracking.make_sweep``: with ``--sweep=vmap`` all pairs in one vmapped program
(``track_sweep``), with ``--sweep=loop`` one compiled ``track_training`` called per pair;
``--sweep=auto`` (default) is ``loop`` on a CPU backend (faster there: one configuration already
keeps XLA:CPU busy) and ``vmap`` on GPU/TPU. Both run the same algorithm, but their rounding
differs in the last bits from the first step, which training at the edge of stability amplifies
(``make_sweep``), so the mode used is part of the resume fingerprint (config.json
``protocol.sweep``; ``flags.sweep`` is the flag as given). Every ``--track_every`` steps: the loss,
‖∇L‖, λ_max and λ_min of the full-data Hessian by warm-started Lanczos on HVPs (until both
relative residuals are ≤ ``--lanczos_tol``), and for Adam the preconditioned sharpness
λ_max(P⁻¹H); every ``--slq_every`` tracks the SLQ index with its interval. A run whose loss
leaves ``--divergence_factor`` × L(θ₀) (or is not finite) is labelled diverged and stopped.
At the end each run is certified (critical iff ‖∇L‖ ≤ ``--grad_tol``, ``crit.critical.certify``)
and the fraction of negative Hessian eigenvalues at the end point is computed (dense
``eigvalsh`` at tolerance ``--eig_tol`` when P ≤ ``--dense_max_params``, else SLQ with its
interval): ``end_negative_fraction`` for every finite end, ``end_index`` only where the end is a
certified critical point (NaN otherwise).

The stability threshold of each run is 2/η (sgd), (2+2β)/η (momentum) or (2+2β₁)/((1−β₁)η)
(Adam, for λ_max(P⁻¹H)). "Reached" means the tracked sharpness is at or above it.

Devices. ``--shard_axis=inits`` runs every configuration on one device, as a single process.
``--shard_axis=data`` runs each configuration's full-data loss, gradient and HVPs over every
device of every process (``crit.data_parallel.shard_data``): the training rows are dealt to the
devices, each sums its rows in batches of ``--eval_batch_size``, the sums meet in a ``psum``,
and θ, the optimizer state and the Lanczos vectors are replicated. The sweep (both modes) and
the end-point spectra are compiled with the rows as arguments
(``crit.data_parallel.jit_with_data``). ``--shard_axis=auto`` (default) takes ``data`` when
there is more than one device and fewer configurations than devices or P·N ≥ 1e8, else
``inits``; the choice is printed at start. The data axis changes the order of the sums (values
agree to ~1e-15 relative per step, which the edge of stability can amplify), so the resolved
axis is in the fingerprint (config.json ``protocol.shard_axis``). Many processes
(``--coordinator_address``/``--num_processes``/``--process_id`` or ``--distributed_auto``)
need the data axis: every process computes every configuration with the others, and process 0
alone writes the files.

Writes to ``--out_dir``: config.json; series.npz (every tracked series, axes learning rate ×
init × track, the loss at every step, the end spectra); summary.csv (one row per learning rate
× init); edge_of_stability.png/.pdf (sharpness with threshold lines, λ_min, loss, against step).
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from experiments import cluster, common, model_flags  # noqa: F401  (--model, --data_file)
from crit import store
from crit.critical import STATUSES, certify
from crit.data_parallel import (SHARD_AXES, choose_shard_axis, jit_with_data,
                                 summation_fingerprint)
from crit.spectrum import classify_spectrum
from crit.tracking import TrackingConfig, make_sweep, stability_threshold, track_steps

FLAGS = flags.FLAGS
flags.DEFINE_string("learning_rates", "0.05,0.1,0.2,0.3", "Comma-separated learning rates η "
                    "of the sweep.")
flags.DEFINE_integer("num_inits", 4, "Initializations per learning rate; init i uses "
                     "fold_in(PRNGKey(seed), i) for every learning rate.")
flags.DEFINE_enum("sweep", "auto", ["auto", "vmap", "loop"], "How the learning rates × inits "
                  "run: vmap = one vmapped program; loop = one compiled track_training called "
                  "per configuration (faster on CPU); auto = loop on a CPU backend, vmap on "
                  "GPU/TPU.")
# Defined here, not imported from experiments/krylov_flags (which would also bring the Krylov
# spectrum flags this app does not use), with the same name and values: "inits" means here
# that every configuration runs on one device.
flags.DEFINE_enum("shard_axis", "auto", list(SHARD_AXES),
                  "What is spread over the devices (and processes): 'inits' = every (learning "
                  "rate, init) configuration on one device, as one process (the sweep is not "
                  "split over devices); 'data' = each configuration's full-data loss, gradient "
                  "and HVPs summed over data shards on every device of every process "
                  "(crit.data_parallel; the local batch is --eval_batch_size); 'auto' = data "
                  "when there is more than one device and fewer configurations than devices or "
                  "P·N >= 1e8, else inits (printed at start).")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_integer("track_every", 10, "Steps between curvature tracks (λ_max, λ_min).")
flags.DEFINE_integer("lanczos_steps", 48, "Most HVPs of one warm-started track (Lanczos basis "
                     "size). Above 64, XLA:CPU's eigh of the tridiagonal is ~40x slower.")
flags.DEFINE_integer("cold_lanczos_steps", 64, "Most HVPs of a cold track (the first; every "
                     "track with --nowarm_start; Adam's preconditioned runs).")
flags.DEFINE_integer("lanczos_block", 4, "Lanczos steps between convergence checks; "
                     "--lanczos_steps must be a multiple of it.")
flags.DEFINE_float("lanczos_tol", 1e-8, "Relative residual |β s|/max|θ| at which both ends "
                   "count as converged.")
flags.DEFINE_bool("warm_start", True, "Start each track's Lanczos from the previous top and "
                  "bottom Ritz vectors (plus --warm_mix of a random vector).")
flags.DEFINE_float("warm_mix", 1e-2, "Weight of the fresh random part of a warm start.")
flags.DEFINE_integer("slq_every", 0, "SLQ index (fraction of λ < −τ, with interval) every this "
                     "many tracks; 0: never.")
flags.DEFINE_integer("slq_probes", 4, "SLQ probes.")
flags.DEFINE_integer("slq_steps", 40, "Lanczos steps per SLQ probe.")
flags.DEFINE_float("slq_rel_tol", 1e-6, "SLQ sign tolerance τ relative to max(|λ_max|, "
                   "|λ_min|) of the same track.")
flags.DEFINE_float("divergence_factor", 1e4, "A run whose loss exceeds this × L(θ₀) (or is "
                   "not finite) is diverged and stopped.")
flags.DEFINE_integer("dense_max_params", 2000, "Largest P for the end point's index by dense "
                     "eigvalsh; above it the index comes from SLQ with an interval.")
flags.DEFINE_string("out_dir", "runs/edge_of_stability", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

FLAGS.set_default("optimizer", "sgd")
FLAGS.set_default("train_steps", 1000)

OUTPUTS = ("summary.csv", "series.npz")
OPTIMIZER_NAMES = {"sgd": "gd", "momentum": "momentum", "adam": "adam"}
# Shared flags (experiments/common.py) this app has no use for: refused when given.
UNUSED_SHARED = ("learning_rate", "log_every", "train_dtype", "finder", "finder_steps",
                 "finder_lr")
# --sweep and --shard_axis are replaced in the protocol by what they resolve to (sweep_mode,
# shard_axis): auto and loop on a CPU are the same computation
NOT_PROTOCOL = ("out_dir", "overwrite", "sweep", "shard_axis") + UNUSED_SHARED
COLUMNS = ("learning_rate", "init_id", "optimizer", "sharpness_kind", "threshold",
           "sharpness_init", "reached_step", "sharpness_after_mean", "sharpness_after_std",
           "sharpness_after_ratio", "max_sharpness", "lambda_max_final_track",
           "lambda_min_init", "max_abs_negative_lambda_min", "step_max_abs_negative_lambda_min",
           "max_abs_negative_lambda_min_after_init", "hvps_per_track_mean", "hvps_first_track",
           "unconverged_tracks", "diverged_step",
           "final_loss", "final_grad_norm", "end_status", "end_certified", "end_index",
           "end_negative_fraction", "end_negative_fraction_lo", "end_negative_fraction_hi",
           "end_lambda_min", "end_lambda_max", "end_tolerance", "end_index_method")


def parse_learning_rates(text: str) -> list[float]:
    """'0.1,0.2' -> [0.1, 0.2]; raises ValueError naming --learning_rates."""
    try:
        rates = [float(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--learning_rates={text!r}: expected comma-separated numbers > 0, "
                         "e.g. '0.05,0.1,0.2'") from None
    bad = [r for r in rates if not (math.isfinite(r) and r > 0)]
    if bad:
        raise ValueError(f"--learning_rates={text!r}: every learning rate must be a finite "
                         f"number > 0 (got {bad})")
    if len(set(rates)) != len(rates):
        raise ValueError(f"--learning_rates={text!r}: repeated learning rate")
    return rates


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors() + cluster.cluster_errors()
    if FLAGS["assemble_timeout"].present:
        errors.append("--assemble_timeout: does not apply to this app (it writes no chunks; "
                      "it would be ignored)")
    errors += [f"--{name}: does not apply to this app (it would be ignored"
               + ("; use --learning_rates" if name == "learning_rate" else "") + ")"
               for name in UNUSED_SHARED if FLAGS[name].present]
    try:
        parse_learning_rates(FLAGS.learning_rates)
    except ValueError as exc:
        errors.append(str(exc))
    for name, low in (("num_inits", 1), ("train_steps", 1), ("track_every", 1),
                      ("lanczos_steps", 2), ("cold_lanczos_steps", 2), ("lanczos_block", 1),
                      ("slq_every", 0),
                      ("slq_probes", 1), ("slq_steps", 2), ("dense_max_params", 0)):
        if getattr(FLAGS, name) < low:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if FLAGS.track_every >= 1 and FLAGS.track_every > FLAGS.train_steps >= 1:
        errors.append(f"--track_every={FLAGS.track_every}: longer than the run "
                      f"(--train_steps={FLAGS.train_steps}); nothing after step 0 would be "
                      "tracked")
    for name in ("lanczos_steps", "cold_lanczos_steps"):
        if FLAGS.lanczos_block >= 1 and getattr(FLAGS, name) % FLAGS.lanczos_block:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be a multiple of "
                          f"--lanczos_block={FLAGS.lanczos_block}")
    if not (0 < FLAGS.lanczos_tol < 1):
        errors.append(f"--lanczos_tol={FLAGS.lanczos_tol}: must be in (0, 1)")
    for name in ("warm_mix", "slq_rel_tol"):
        value = getattr(FLAGS, name)
        if not (math.isfinite(value) and value >= 0):
            errors.append(f"--{name}={value}: must be a finite number >= 0")
    if not (math.isfinite(FLAGS.divergence_factor) and FLAGS.divergence_factor > 1):
        errors.append(f"--divergence_factor={FLAGS.divergence_factor}: must be a finite "
                      "number > 1")
    if FLAGS.slq_every == 0 and any(FLAGS[n].present for n in ("slq_probes", "slq_steps",
                                                                "slq_rel_tol")):
        errors.append("--slq_probes/--slq_steps/--slq_rel_tol: need --slq_every >= 1 (they "
                      "would be ignored)")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


def sweep_mode() -> str:
    """``--sweep`` resolved: ``auto`` is ``loop`` on a CPU backend, ``vmap`` otherwise."""
    if FLAGS.sweep != "auto":
        return FLAGS.sweep
    return "loop" if jax.default_backend() == "cpu" else "vmap"


def shard_axis(num_configs: int, problem) -> tuple[str, str]:
    """(axis, reason): --shard_axis resolved for ``num_configs`` (learning rate, init)
    configurations of ``problem`` over every device of every process."""
    axis, reason = choose_shard_axis(FLAGS.shard_axis, jax.device_count(), num_configs,
                                     problem.n_params, problem.dataset.n_train)
    # choose_shard_axis counts models as "inits"; here each configuration is one model
    return axis, reason.replace("init(s)", "configuration(s)").replace("inits",
                                                                       "configurations")


def shard_line(axis: str, reason: str, problem) -> str:
    """The start-up line that says which axis is spread and why (as min_ratio and spectrum)."""
    if axis != "data":
        return (f"shard axis: {axis} ({reason}): every configuration on one device of "
                f"{jax.device_count()}")
    from crit.data_parallel import data_layout

    lay = data_layout(problem.dataset.n_train, jax.device_count(), problem.eval_batch_size,
                      whole_batches=problem.batchnorm == "batch")
    return (f"shard axis: data ({reason}) over {jax.device_count()} device(s), "
            f"{lay.local_batches} local batch(es) of {lay.batch_rows} rows per device"
            + (f" + a shared last batch of {lay.tail.size}" if lay.tail.size else ""))


def compiler(problem, unravel, shardings):
    """The ``jit`` of crit.tracking.make_sweep: the sweep compiled by
    crit.data_parallel.jit_with_data (on the data axis the rows are arguments of the program;
    ``shardings`` places θ, the keys and the results on every device). Arguments go in as
    host arrays and results come back as host arrays, so on many processes no process hands a
    device array of its own to a program over all of them."""
    def jit(build):
        bound = jit_with_data(lambda pr: build(lambda t: pr.loss_fn(unravel(t))), problem,
                              in_shardings=shardings, out_shardings=shardings)
        return lambda *args: jax.tree.map(np.asarray, bound(*map(np.asarray, args)))

    return jit


def tracking_config() -> TrackingConfig:
    return TrackingConfig(
        optimizer=OPTIMIZER_NAMES[FLAGS.optimizer], num_steps=FLAGS.train_steps,
        track_every=FLAGS.track_every, momentum=FLAGS.momentum,
        lanczos_steps=FLAGS.lanczos_steps, cold_lanczos_steps=FLAGS.cold_lanczos_steps,
        lanczos_block=FLAGS.lanczos_block,
        lanczos_tol=FLAGS.lanczos_tol, warm_start=FLAGS.warm_start, warm_mix=FLAGS.warm_mix,
        slq_every=FLAGS.slq_every, slq_probes=FLAGS.slq_probes, slq_steps=FLAGS.slq_steps,
        slq_rel_tol=FLAGS.slq_rel_tol, divergence_factor=FLAGS.divergence_factor)


def run_config(problem, sweep: str, axis: str) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    # vmap and loop round differently in the last bits, amplified at the edge of stability
    # (crit.tracking.make_sweep): their results are not mixed
    # the data axis sums the loss in another order: the last bits differ, and the edge of
    # stability amplifies them, so runs on the two axes are not mixed either
    protocol.update(problem=problem.name, loss=problem.loss_name, sweep=sweep,
                    **summation_fingerprint(axis, jax.device_count()))
    return {"experiment": "edge_of_stability", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "n_train": problem.dataset.n_train,
            "environment": common.environment()}


def first_reached(sharpness: np.ndarray, threshold: float, steps: np.ndarray) -> int:
    """The first tracked step with sharpness ≥ threshold (−1: never)."""
    hit = np.flatnonzero(np.nan_to_num(sharpness, nan=-np.inf) >= threshold)
    return int(steps[hit[0]]) if hit.size else -1


def summarize(series: dict, steps: np.ndarray, rates, thresholds, kind: str) -> dict:
    """One row per (learning rate, init) of the tracked series (module docstring)."""
    edge = series["precond_lambda_max" if kind == "preconditioned" else "lambda_max"]
    rows: dict[str, list] = {c: [] for c in COLUMNS[:COLUMNS.index("final_loss")]}
    n_lr, n_init = edge.shape[:2]
    for i in range(n_lr):
        for j in range(n_init):
            s, thr = edge[i, j], thresholds[i]
            reached = first_reached(s, thr, steps)
            after = s[steps >= reached] if reached >= 0 else np.array([])
            after = after[np.isfinite(after)]
            lam_min = series["lambda_min"][i, j]
            neg = np.where(np.nan_to_num(lam_min, nan=0.0) < 0, -lam_min, 0.0)
            k_neg = int(np.argmax(neg))
            finite = s[np.isfinite(s)]
            hvps = series["hvps"][i, j] + series["precond_hvps"][i, j]
            live = np.isfinite(series["lambda_max"][i, j])
            conv = series["converged_max"][i, j] & series["converged_min"][i, j]
            if kind == "preconditioned":
                conv = conv & (series["precond_converged"][i, j] | (steps == 0))
            rows["learning_rate"].append(rates[i])
            rows["init_id"].append(j)
            rows["optimizer"].append(FLAGS.optimizer)
            rows["sharpness_kind"].append(kind)
            rows["threshold"].append(thr)
            rows["sharpness_init"].append(s[0])
            rows["reached_step"].append(reached)
            rows["sharpness_after_mean"].append(after.mean() if after.size else np.nan)
            rows["sharpness_after_std"].append(after.std() if after.size else np.nan)
            rows["sharpness_after_ratio"].append(after.mean() / thr if after.size else np.nan)
            rows["max_sharpness"].append(finite.max() if finite.size else np.nan)
            rows["lambda_max_final_track"].append(series["lambda_max"][i, j, -1])
            rows["lambda_min_init"].append(lam_min[0])
            rows["max_abs_negative_lambda_min"].append(neg[k_neg])
            rows["step_max_abs_negative_lambda_min"].append(int(steps[k_neg]) if neg[k_neg] > 0
                                                            else -1)
            rows["max_abs_negative_lambda_min_after_init"].append(neg[1:].max())
            rows["hvps_per_track_mean"].append(hvps[1:][live[1:]].mean() if live[1:].any()
                                               else np.nan)
            rows["hvps_first_track"].append(int(hvps[0]))
            rows["unconverged_tracks"].append(int(np.sum(live & ~conv)))
            rows["diverged_step"].append(int(series["diverged_step"][i, j]))
    return {k: np.asarray(v) for k, v in rows.items()}


def end_point_spectra(problem, unravel, finals: np.ndarray, diverged: np.ndarray, key,
                      shardings=None) -> dict:
    """Certificate and Hessian negative fraction of every end point (dense or SLQ; module
    docstring); ``end_index`` is that fraction where the point is certified critical, else NaN.
    Diverged runs (frozen where they left the loss bound) get NaN and status diverged. Both
    programs are compiled by crit.data_parallel.jit_with_data (on the data axis the rows are
    arguments; ``shardings`` places the inputs and results on every device)."""
    from crit.krylov import krylov_tolerance
    from crit.slq import slq, slq_fractions

    p = finals.shape[-1]
    dense = p <= FLAGS.dense_max_params
    flat = finals.reshape(-1, p)

    def flat_loss(pr):
        return lambda t: pr.loss_fn(unravel(t))

    def one(loss, theta, k):
        _, hvp = jax.linearize(jax.grad(loss), theta)
        if dense:
            h = jax.vmap(hvp)(jnp.eye(p))
            return {"hessian": 0.5 * (h + h.T)}
        res = slq(hvp, k, p, FLAGS.slq_probes, FLAGS.slq_steps)
        tol = krylov_tolerance(res.nodes, p) if FLAGS.eig_tol is None else FLAGS.eig_tol
        neg = slq_fractions(res, tol).negative
        nodes = jnp.where(res.valid, res.nodes, jnp.nan)
        return {"end_negative_fraction": neg.mean, "end_negative_fraction_lo": neg.lo,
                "end_negative_fraction_hi": neg.hi,
                "end_lambda_min": jnp.nanmin(nodes), "end_lambda_max": jnp.nanmax(nodes),
                "end_tolerance": tol}

    def compile_(make):
        return jit_with_data(make, problem, in_shardings=shardings, out_shardings=shardings)

    keys = np.asarray(jax.random.split(key, flat.shape[0]))
    finite = np.isfinite(flat).all(axis=1) & ~diverged.reshape(-1)
    safe = np.where(finite[:, None], flat, 0.0)
    spectra = compile_(lambda pr: jax.vmap(lambda t, k: one(flat_loss(pr), t, k)))
    out = {k: np.asarray(v) for k, v in spectra(safe, keys).items()}
    if dense:
        eig = np.stack([np.linalg.eigvalsh(h) for h in out.pop("hessian")])
        summary = classify_spectrum(jnp.asarray(eig), FLAGS.eig_tol)
        out = {"end_negative_fraction": np.asarray(summary.index), "end_lambda_min": eig[:, 0],
               "end_lambda_max": eig[:, -1], "end_tolerance": np.asarray(summary.tolerance),
               "eigenvalues": eig}
        out["end_negative_fraction_lo"] = out["end_negative_fraction"]
        out["end_negative_fraction_hi"] = out["end_negative_fraction"]
    scale = np.maximum(np.abs(out["end_lambda_min"]), np.abs(out["end_lambda_max"]))
    cert = compile_(lambda pr: jax.vmap(lambda t, s: certify(flat_loss(pr), t, s, FLAGS.grad_tol,
                                                             FLAGS.flat_tol)))(safe, scale)
    status = np.asarray(cert.status)
    status = np.where(finite, status, STATUSES.index("diverged"))
    for k, v in list(out.items()):
        v = v.astype(float)
        out[k] = np.where(finite.reshape((-1,) + (1,) * (v.ndim - 1)), v, np.nan)
    out["end_status"] = np.asarray(STATUSES)[status]
    out["end_certified"] = status == STATUSES.index("critical")
    out["end_index"] = np.where(out["end_certified"], out["end_negative_fraction"], np.nan)
    out["end_index_method"] = np.array(["dense" if dense else f"slq{FLAGS.slq_probes}x"
                                        f"{FLAGS.slq_steps}"] * flat.shape[0])
    return out


def edge_figure(series, steps, rates, thresholds, kind, out_dir: Path, title: str):
    """Three panels against step: sharpness with threshold lines, λ_min, loss."""
    from crit import plots  # matplotlib is loaded only when drawing (Agg backend)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14.0, 4.2))
    colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(rates)))
    edge = series["precond_lambda_max" if kind == "preconditioned" else "lambda_max"]
    all_steps = np.arange(series["loss"].shape[-1])
    for i, (rate, colour) in enumerate(zip(rates, colours)):
        for j in range(edge.shape[1]):
            label = f"η = {rate:g}" if j == 0 else None
            axes[0].plot(steps, edge[i, j], color=colour, lw=1.0, alpha=0.8, label=label)
            axes[1].plot(steps, series["lambda_min"][i, j], color=colour, lw=1.0, alpha=0.8)
            axes[2].plot(all_steps, series["loss"][i, j], color=colour, lw=0.8, alpha=0.8)
        axes[0].axhline(thresholds[i], color=colour, ls="--", lw=1.0)
    names = {"sgd": "2/η", "momentum": "(2+2β)/η", "adam": "(2+2β₁)/((1−β₁)η)"}
    axes[0].set_ylabel(("λ_max(P⁻¹H)" if kind == "preconditioned" else "sharpness λ_max(H)")
                       + f";  dashed: {names[FLAGS.optimizer]}")
    top = np.nanmax(np.concatenate([edge[np.isfinite(edge)], thresholds]))
    axes[0].set_ylim(0, 1.15 * top)
    axes[0].legend(fontsize=8)
    axes[1].set_ylabel("λ_min(H)")
    axes[1].axhline(0.0, color="k", lw=0.6)
    axes[1].set_yscale("symlog", linthresh=1e-3)
    lam_min = series["lambda_min"][np.isfinite(series["lambda_min"])]
    if lam_min.size:  # no room for positive values no run has
        axes[1].set_ylim(top=max(2e-3, 2.0 * lam_min.max()))
    axes[2].set_ylabel("training loss")
    axes[2].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, "edge_of_stability")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # JAX's multi-controller runtime starts before anything touches a device (validate() builds
    # the model on shapes): cluster flags first, then the cluster, then the rest
    cluster_problems = cluster.cluster_errors()
    if cluster_problems:
        raise app.UsageError("\n".join(cluster_problems))
    cluster.start_cluster()
    validate()
    problem = common.problem_from_flags()
    rates = parse_learning_rates(FLAGS.learning_rates)
    axis, why = shard_axis(len(rates) * FLAGS.num_inits, problem)
    if jax.process_count() > 1 and axis != "data":
        raise app.UsageError(
            f"{jax.process_count()} processes share the work only over the data axis: "
            f"--shard_axis={FLAGS.shard_axis} resolved to {axis} ({why}); use "
            "--shard_axis=data (or auto with fewer configurations than devices)")
    print(shard_line(axis, why, problem), flush=True)
    shardings = None
    if axis == "data":  # shardings: θ, keys and results on every device
        from crit.data_parallel import shard_over_every_device

        problem, _, shardings = shard_over_every_device(problem)
    out_dir = Path(FLAGS.out_dir)
    sweep = sweep_mode()
    lead = jax.process_index() == 0
    cluster.agree_on_out_dir(out_dir, run_config(problem, sweep, axis), OUTPUTS, chunked=False)
    config = tracking_config()
    thresholds = np.asarray([stability_threshold(config.optimizer, r, config.momentum, config.b1)
                             for r in rates])
    kind = "preconditioned" if config.optimizer == "adam" else "lambda_max"
    steps = track_steps(FLAGS.train_steps, FLAGS.track_every)
    print(f"{problem.name}: P = {problem.n_params}, n = {problem.dataset.n_train}; "
          f"{FLAGS.optimizer} at η = {rates} × {FLAGS.num_inits} inits, {FLAGS.train_steps} "
          f"steps, tracked every {FLAGS.track_every} ({len(steps)} tracks), float64")
    print(f"sweep: {sweep} (--sweep={FLAGS.sweep}, backend {jax.default_backend()}): "
          + ("one vmapped program" if sweep == "vmap" else
             "one compiled track_training called per configuration"))

    root = jax.random.PRNGKey(FLAGS.seed)
    init_keys = [jax.random.fold_in(root, i) for i in range(FLAGS.num_inits)]
    params0 = [problem.init_fn(k) for k in init_keys]
    _, unravel = ravel_pytree(params0[0])
    thetas = jnp.stack([ravel_pytree(p)[0].astype(jnp.float64) for p in params0])
    lanczos_keys = jnp.stack([jax.random.fold_in(k, 1) for k in init_keys])
    loss = lambda t: problem.loss_fn(unravel(t))  # noqa: E731
    start = time.time()
    # compiler() rebuilds this loss inside the program, on the rows passed as arguments
    run = make_sweep(loss, config, sweep, jit=compiler(problem, unravel, shardings))
    out = jax.block_until_ready(run(thetas, jnp.asarray(rates), lanczos_keys))
    print(f"tracked {len(rates) * FLAGS.num_inits} runs "
          + ("in one program" if sweep == "vmap" else "one at a time")
          + f": {time.time() - start:.1f} s (compile included)")
    series = {k: np.asarray(v) for k, v in out._asdict().items()
              if v is not None and k != "final_params"}
    rows = summarize(series, steps, rates, thresholds, kind)
    ends = end_point_spectra(problem, unravel, np.asarray(out.final_params),
                             series["diverged_step"] >= 0, jax.random.fold_in(root, 2 ** 20),
                             shardings)
    rows.update(final_loss=series["final_loss"].reshape(-1),
                final_grad_norm=series["final_grad_norm"].reshape(-1),
                **{k: v for k, v in ends.items() if k != "eigenvalues"})
    if not lead:
        print(f"process {jax.process_index()} computed every configuration with the others and "
              "leaves the files to process 0", flush=True)
        return
    store.write_csv(out_dir / "summary.csv", {c: rows[c] for c in COLUMNS})
    extra = {"eigenvalues_end": ends["eigenvalues"].reshape(len(rates), FLAGS.num_inits, -1)
             } if "eigenvalues" in ends else {}
    store.atomic_save_npz(out_dir / "series.npz", {
        **series, **extra, "steps": steps, "learning_rates": np.asarray(rates),
        "thresholds": thresholds, "sharpness_kind": np.array(kind),
        "optimizer": np.array(FLAGS.optimizer)})
    for i, rate in enumerate(rates):
        sel = rows["learning_rate"] == rate
        reached = rows["reached_step"][sel]
        print(f"η = {rate:g}: threshold {thresholds[i]:.4g}, reached by "
              f"{int(np.sum(reached >= 0))}/{sel.sum()} runs (first at step "
              f"{reached[reached >= 0].min() if (reached >= 0).any() else '-'}), sharpness "
              f"after / threshold {np.round(rows['sharpness_after_ratio'][sel], 3)}, max |λ_min| "
              f"{np.round(rows['max_abs_negative_lambda_min'][sel], 4)}, HVPs/track "
              f"{np.round(rows['hvps_per_track_mean'][sel], 1)}, end: "
              f"{', '.join(str(x) for x in rows['end_status'][sel])}")
    edge_figure(series, steps, rates, thresholds, kind, out_dir,
                f"{problem.name}, P = {problem.n_params}, full-batch {FLAGS.optimizer}, "
                f"{FLAGS.num_inits} inits per η")
    print(f"wrote {out_dir}/summary.csv, series.npz, edge_of_stability.png/.pdf")


if __name__ == "__main__":
    app.run(main)
