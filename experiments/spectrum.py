"""The Hessian spectrum of a larger network, from Hessian-vector products only.

    python -m experiments.spectrum         # MLP 64-300-300-10 on digits, P = 112,810
    python -m experiments.spectrum --snapshots=0,100,500 --hvp_batch_size=256
    python -m experiments.spectrum --widths=16 --n_points=256 --out_dir=runs/spectrum_small
        # P = 1,210: --compare_dense is on by default (P <= 3000) and draws the exact
        # eigenvalues over the SLQ density

Protocol: one init (fold_in(PRNGKey(seed), init_id)), full-batch training with the flags of
experiments/common.py, and at each snapshot step (initialization, mid-training, end by default)
the full-data Hessian H of the training loss as an HVP operator (forward-over-reverse, float64;
one shared linearization, or summed over data batches with --hvp_batch_size), analysed by
crit.krylov.krylov_spectrum: the extremal eigenvalues from one Lanczos run with convergence
flags, and stochastic Lanczos quadrature (SLQ; Ghorbani et al. 2019) with --slq_probes
Rademacher probes of --lanczos_steps steps: spectral densities (linear and log|λ|) and the
fractions of positive / negative / null eigenvalues with intervals (crit.slq.slq_fractions).

Outputs in --out_dir: spectrum.csv (one row per snapshot), spectrum.npz (SLQ nodes, weights,
Ritz values, the training curve every --log_every steps, a tolerance sweep, exact eigenvalues
when dense), spectrum_density.png/.pdf, spectrum_summary.png/.pdf, config.json, and
chunks/chunk_<snapshot>_000001.npz: each snapshot's analysis is saved as soon as it is done, so
a killed run, rerun with the same command, analyses only the snapshots still missing and writes
the same files as an uninterrupted run.

Devices and processes (crit.data_parallel, BUILD.md): one init on several devices takes the data
axis (``--shard_axis=auto``): every full-data loss, gradient and HVP is summed over the devices'
shares of the rows, which enter the compiled programs as sharded arguments. On many processes
(the cluster flags, e.g. ``--distributed_auto`` under SLURM) every process computes every
snapshot and only process 0 writes; training with state (BatchNorm) or ``--batch_size`` runs on
one device of each process and every process takes process 0's snapshots.

Column names say what a number is. SLQ estimates end in ``_est`` (``min_ratio_est``,
``index_est``, ``null_fraction_est``) next to their intervals ``_lo``/``_hi``; ``lambda_min``
and ``lambda_max`` are the extremal Ritz values of one Lanczos run (with ``*_converged``
flags). There are no estimated integer counts (f·P need not be an integer, nor sum to P).
Exact values exist only with --compare_dense (dense Hessian + eigvalsh): ``n_pos``, ``n_neg``,
``n_null``, ``min_ratio``, ``index``, ``null_fraction`` under the same τ, and
``exact_lambda_min``/``exact_lambda_max``; without it these columns are absent.

The minimum ratio at the default tolerance τ = P·ε·max|λ| asks for the sign of eigenvalues
down to ~1e-11·‖H‖, far below what m Lanczos steps resolve (~‖H‖/m²) when a bulk sits near
zero, so its interval is honestly wide; the tolerance sweep in spectrum.npz (and printed)
shows the fractions at coarser τ, where SLQ does resolve them.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import cluster, common, krylov_flags, model_flags
from crit import store

FLAGS = flags.FLAGS
TRAINS_STATE = True  # trains BatchNorm statistics with the weights (experiments/model_flags)

flags.DEFINE_string("out_dir", "runs/spectrum", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")
flags.DEFINE_integer("seed", 0, "Root seed; the init is fold_in(PRNGKey(seed), init_id).")
flags.DEFINE_integer("init_id", 0, "Which initialization to follow.")
flags.DEFINE_string("snapshots", "0,mid,end", "Training steps at which to take the spectrum: "
                    "comma-separated integers in [0, --train_steps] and/or 'mid' "
                    "(train_steps // 2) and 'end' (train_steps).")
flags.DEFINE_integer("batch_size", 0, "Training rows per optimizer step (0: full batch); the "
                     "spectra are always of the full-data loss.")
flags.DEFINE_integer("lanczos_steps", 90, "Lanczos steps per run (m; Ghorbani et al. use 90).")
flags.DEFINE_integer("slq_probes", 4, "SLQ Rademacher probes (n_v >= 2 for a standard error).")
flags.DEFINE_integer("num_eigs", 5, "Extremal Ritz values reported at each end (k).")
flags.DEFINE_integer("hvp_batch_size", 0, "Data rows per HVP batch (exact n_b/N weights); 0: "
                     "all data at once through one shared linearization (fastest).")
flags.DEFINE_integer("probe_batch", 0, "Lanczos runs at once (0: all --slq_probes + 1); lower "
                     "it to bound memory, (runs at once)·m·P floats, for very large P. Part of "
                     "the fingerprint: another vmap width may round the last bits differently.")
flags.DEFINE_bool("compare_dense", None, "Also compute the exact eigenvalues (dense Hessian + "
                  "eigvalsh) and draw them over the SLQ density. Default: on iff P <= 3000.")
flags.DEFINE_float("tol_scale", 1.0, "τ = tol_scale·P·ε·max|θ| when --eig_tol is not set.")
flags.DEFINE_float("z", 2.0, "Standard errors added to each side of the fraction intervals.")
flags.DEFINE_float("density_sigma", 0.0, "Gaussian kernel width of the linear density, "
                   "absolute (0: sqrt(1e-5)·(θmax − θmin)/2, Ghorbani et al.).")
flags.DEFINE_float("log_sigma", 0.05, "Kernel width of the log10|λ| density, in decades.")

# Defaults of the shared flags for this app: a P >= 1e5 network that runs in minutes.
for _name, _value in (("dataset", "digits"), ("widths", "300,300"), ("n_points", 1024),
                      ("train_steps", 500), ("learning_rate", 1e-3), ("log_every", 10)):
    FLAGS.set_default(_name, _value)

# Flags of experiments.common that do not apply here: no critical point is sought.
NOT_APPLICABLE = {name: "this app takes spectra along the training trajectory; no critical "
                  "point is sought" for name in ("finder", "finder_steps", "finder_lr",
                                                  "flat_tol")}
# --grad_tol applies: a snapshot gets a saddle/minimum verdict only if ‖∇L‖ <= --grad_tol.
NOT_PROTOCOL = ("out_dir", "overwrite", *NOT_APPLICABLE)
AUTO_DENSE_MAX_P = 3000
DENSE_LIMIT_P = 20000  # a P x P float64 Hessian of 3.2 GB; eigvalsh takes many minutes
TABLE_REL_TOLS = (1e-10, 1e-8, 1e-6, 1e-4, 1e-2)  # τ / max|θ| printed from the grid
OUTPUTS = ("spectrum.csv", "spectrum_cdf.csv", "spectrum.npz")
# SLQ estimates (suffix _est, intervals _lo/_hi) and extremal Ritz values: every run.
ESTIMATED = ("min_ratio", "index", "null_fraction")
CSV_COLUMNS = ("step", "loss", "grad_norm", "verdict", "negative_proven", "lambda_min_bound",
               "ritz_min_residual", "negative_excluded_below", "lambda_min", "lambda_max",
               "lambda_min_converged", "lambda_max_converged", "min_ratio_est",
               "min_ratio_lo", "min_ratio_hi", "index_est", "index_lo", "index_hi",
               "null_fraction_est", "null_fraction_lo", "null_fraction_hi", "resolved",
               "tolerance", "tolerance_rel", "machine_tolerance", "num_deflated",
               "probe_steps", "num_matvecs")
# spectrum_cdf.csv: the sign fractions on the τ grid (crit.krylov.REL_TOL_GRID), every snapshot.
CDF_COLUMNS = ("step", "tolerance_rel", "tolerance", "min_ratio_est", "min_ratio_lo",
               "min_ratio_hi", "index_est", "index_lo", "index_hi", "null_fraction_est",
               "null_fraction_lo", "null_fraction_hi", "resolved")
# Exact counts and fractions (same τ) and extremal eigenvalues: only with --compare_dense.
DENSE_COLUMNS = ("n_pos", "n_neg", "n_null", "min_ratio", "index", "null_fraction",
                 "exact_lambda_min", "exact_lambda_max", "dense_verdict")
# Fields of crit.krylov.KrylovSpectrum kept per snapshot (prefixed "spec_" in the chunks).
SPEC_FIELDS = ("lambda_min", "lambda_max", "lambda_min_converged", "lambda_max_converged",
               "min_ratio", "min_ratio_lo", "min_ratio_hi", "index", "index_lo", "index_hi",
               "null_fraction", "null_fraction_lo", "null_fraction_hi", "tolerance",
               "tolerance_rel", "machine_tolerance", "resolved", "num_deflated", "slack",
               "deflated", "probe_mass", "probe_steps", "lambda_max_bound", "escape_direction",
               "grid_tolerance", "num_matvecs", "nodes", "weights", "node_residuals",
               "node_valid", "node_coupling", "largest", "largest_residuals", "smallest",
               "smallest_residuals")
# Fields of crit.verdict.Verdict kept per snapshot (prefixed "verdict_").
VERDICT_FIELDS = ("code", "negative_proven", "lambda_min_bound", "ritz_value", "ritz_residual",
                  "excluded_below", "miss_probability", "allowance")


def parse_snapshots(text: str, train_steps: int) -> list[int]:
    """'0,mid,end' -> sorted unique steps; raises ValueError naming --snapshots."""
    steps = []
    for token in (t.strip() for t in text.split(",")):
        if token == "mid":
            steps.append(train_steps // 2)
        elif token == "end":
            steps.append(train_steps)
        else:
            try:
                step = int(token)
            except ValueError:
                raise ValueError(f"--snapshots={text!r}: {token!r} is not an integer, 'mid' "
                                 "or 'end'") from None
            if not 0 <= step <= train_steps:
                raise ValueError(f"--snapshots={text!r}: step {step} is outside [0, "
                                 f"--train_steps={train_steps}]")
            steps.append(step)
    return sorted(set(steps))


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = (common.problem_errors() + cluster.cluster_errors()
              + krylov_flags.krylov_errors(FLAGS.lanczos_steps, FLAGS.slq_probes,
                                           FLAGS.num_eigs))
    if FLAGS.hvp_budget and FLAGS.probe_batch:
        errors.append(f"--probe_batch={FLAGS.probe_batch}: adaptive runs (--hvp_budget) take "
                      "all probes at once; drop one of them")
    for name, why in NOT_APPLICABLE.items():
        if FLAGS[name].present:
            errors.append(f"--{name}: does not apply to this app ({why})")
    try:
        parse_snapshots(FLAGS.snapshots, max(FLAGS.train_steps, 0))
    except ValueError as exc:
        errors.append(str(exc))
    if FLAGS.lanczos_steps < 2:
        errors.append(f"--lanczos_steps={FLAGS.lanczos_steps}: must be >= 2")
    if FLAGS.slq_probes < 1:
        errors.append(f"--slq_probes={FLAGS.slq_probes}: must be >= 1")
    if not 1 <= FLAGS.num_eigs <= max(FLAGS.lanczos_steps, 1):
        errors.append(f"--num_eigs={FLAGS.num_eigs}: must be in [1, --lanczos_steps]")
    for name in ("hvp_batch_size", "probe_batch", "init_id", "batch_size"):
        if getattr(FLAGS, name) < 0:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be >= 0")
    if FLAGS.eig_tol is not None and FLAGS["tol_scale"].present:
        errors.append(f"--tol_scale={FLAGS.tol_scale}: scales the default τ only; --eig_tol="
                      f"{FLAGS.eig_tol} sets τ itself (drop one of them)")
    for name in ("tol_scale", "log_sigma"):
        value = getattr(FLAGS, name)
        if not (math.isfinite(value) and value > 0):
            errors.append(f"--{name}={value}: must be a finite number > 0")
    for name in ("z", "density_sigma"):
        value = getattr(FLAGS, name)
        if not (math.isfinite(value) and value >= 0):
            errors.append(f"--{name}={value}: must be a finite number >= 0")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


def compare_dense(n_params: int) -> bool:
    """--compare_dense resolved against P; refuses a dense Hessian that cannot fit."""
    want = FLAGS.compare_dense if FLAGS.compare_dense is not None else n_params <= AUTO_DENSE_MAX_P
    if want and n_params > DENSE_LIMIT_P:
        raise app.UsageError(f"--compare_dense: P = {n_params} parameters is too many for a "
                             f"dense Hessian (limit {DENSE_LIMIT_P}); drop the flag")
    return want


def run_config(problem, snapshots, dense: bool, axis: str = "inits") -> dict:
    """config.json: the fingerprint (every flag that can change a number: all of them but the
    output options and the inapplicable ones, with --snapshots and --compare_dense resolved,
    and the axis with the number of data devices) and the rest."""
    import jax

    from crit.data_parallel import summation_fingerprint

    shared, own = common.flag_values(__name__)
    shared |= {f.name: f.value for f in FLAGS.get_flags_for_module(model_flags)}
    shared |= {f.name: f.value for f in FLAGS.get_flags_for_module(krylov_flags)}
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol.update(problem=problem.name, loss=problem.loss_name, snapshots=snapshots,
                    compare_dense=dense, **model_flags.fingerprint(problem),
                    **summation_fingerprint(axis, jax.device_count()))
    return {"experiment": "spectrum", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "n_train": problem.dataset.n_train,
            "environment": common.environment()}


def train_with_snapshots(problem, snapshots: list[int], shardings=None):
    """Train once; return flat float64 parameters at each snapshot step and per-step curves.

    One ``lax.scan`` over all steps (one compilation); the optimizer state carries over, so
    the snapshots lie on the same trajectory as an uninterrupted run. On the data axis
    (``problem`` from crit.data_parallel.shard_data) the rows are arguments of the program
    and ``shardings`` (replicated over the mesh) places θ and the outputs on every device.
    """
    import jax
    import jax.numpy as jnp
    import optax
    from jax.flatten_util import ravel_pytree

    from crit.protocol import init_key
    from crit.train import cast_params, make_optimizer, tree_norm

    dtype = jnp.float32 if FLAGS.train_dtype == "float32" else jnp.float64
    params = cast_params(problem.init_fn(init_key(FLAGS.seed, FLAGS.init_id)), dtype)
    theta0, unravel = ravel_pytree(params)
    opt = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)
    steps = jnp.asarray(snapshots)

    def make_run(pr):
        value_and_grad = jax.value_and_grad(pr.loss_fn)
        return lambda p: run(p, value_and_grad)

    def run(p, value_and_grad):
        def step(carry, i):
            p, state, buf = carry
            flat = ravel_pytree(p)[0]
            buf = jnp.where((steps == i)[:, None], flat[None].astype(buf.dtype), buf)
            loss, g = value_and_grad(p)
            updates, state = opt.update(g, state, p)
            return (optax.apply_updates(p, updates), state, buf), (loss, tree_norm(g))

        buf = jnp.zeros((len(snapshots), theta0.size), jnp.float64)
        (p, _, buf), (loss, gnorm) = jax.lax.scan(step, (p, opt.init(p), buf),
                                                  jnp.arange(FLAGS.train_steps))
        flat = ravel_pytree(p)[0].astype(jnp.float64)
        buf = jnp.where((steps == FLAGS.train_steps)[:, None], flat[None], buf)
        return buf, loss, gnorm

    if problem.has_state or FLAGS.batch_size:
        trained = train_model_with_snapshots(problem, snapshots, params, dtype, opt)
        if jax.process_count() == 1:
            return trained
        # each process trained on its own first device (this path is not data-parallel);
        # all analyse process 0's trajectory, so no last-bit difference between processes
        # can make their replicated θ disagree
        from jax.experimental import multihost_utils

        print("training with state / mini-batches ran on one device of each process; every "
              "process takes process 0's snapshots", flush=True)
        return tuple(np.asarray(a) for a in multihost_utils.broadcast_one_to_all(trained))
    from crit.data_parallel import jit_with_data

    compiled = jit_with_data(make_run, problem, in_shardings=shardings, out_shardings=shardings)
    buf, loss, gnorm = compiled(jax.tree.map(np.asarray, params))
    return np.asarray(buf), None, np.asarray(loss, np.float64), np.asarray(gnorm, np.float64)


def train_model_with_snapshots(problem, snapshots, params, dtype, opt):
    """Training with state (BatchNorm) or mini-batches: ``problem.train_loss_fn`` in training
    mode on batches of --batch_size rows (a fresh permutation each epoch), the running
    statistics updated as it goes. Returns flat θ and flat state at each snapshot, and the
    training-mode loss and gradient norm of each step's batch."""
    import jax
    import jax.numpy as jnp
    import optax
    from jax.flatten_util import ravel_pytree

    from crit.protocol import init_key
    from crit.train import cast_params, tree_norm

    key = init_key(FLAGS.seed, FLAGS.init_id)
    state = cast_params(problem.init_state_fn(key), dtype)
    n = problem.dataset.n_train
    batch = n if not FLAGS.batch_size or FLAGS.batch_size >= n else FLAGS.batch_size
    per_epoch = n // batch
    x, y = jnp.asarray(problem.dataset.x_train), jnp.asarray(problem.dataset.y_train)
    value_and_grad = jax.value_and_grad(problem.train_loss_fn, has_aux=True)
    steps = jnp.asarray(snapshots)
    flat_state = lambda st: ravel_pytree(st)[0].astype(jnp.float64)  # noqa: E731
    batch_key = jax.random.fold_in(key, 2)

    @jax.jit
    def run(p, st):
        def step(carry, i):
            p, st, opt_state, buf, sbuf = carry
            take = (steps == i)[:, None]
            buf = jnp.where(take, ravel_pytree(p)[0][None].astype(buf.dtype), buf)
            sbuf = jnp.where(take, flat_state(st)[None], sbuf)
            epoch, within = jnp.divmod(i, per_epoch)
            perm = (jnp.arange(n) if batch == n
                    else jax.random.permutation(jax.random.fold_in(batch_key, epoch), n))
            idx = jax.lax.dynamic_slice_in_dim(perm, within * batch, batch)
            (loss, new), g = value_and_grad(p, st, x[idx], y[idx],
                                            jax.random.fold_in(jax.random.fold_in(key, 3), i))
            st = jax.tree.map(lambda a, b: a.astype(b.dtype), new, st)
            updates, opt_state = opt.update(g, opt_state, p)
            return (optax.apply_updates(p, updates), st, opt_state, buf, sbuf), (loss,
                                                                                 tree_norm(g))

        buf = jnp.zeros((len(snapshots), ravel_pytree(p)[0].size), jnp.float64)
        sbuf = jnp.zeros((len(snapshots), flat_state(st).size), jnp.float64)
        (p, st, _, buf, sbuf), (loss, gnorm) = jax.lax.scan(
            step, (p, st, opt.init(p), buf, sbuf), jnp.arange(FLAGS.train_steps))
        last = (steps == FLAGS.train_steps)[:, None]
        buf = jnp.where(last, ravel_pytree(p)[0].astype(jnp.float64)[None], buf)
        sbuf = jnp.where(last, flat_state(st)[None], sbuf)
        return buf, sbuf, loss, gnorm

    buf, sbuf, loss, gnorm = run(params, state)
    return (np.asarray(buf), np.asarray(sbuf), np.asarray(loss, np.float64),
            np.asarray(gnorm, np.float64))


GRID_POINTS = 2000
LOG_GRID_POINTS = 600


def make_analysis(problem, shardings=None):
    """theta -> dict of results at one snapshot, compiled once for all snapshots
    (crit.data_parallel.jit_with_data: on the data axis the rows are arguments of the program,
    ``shardings`` places θ and the results on every device of the mesh).

    Keys: loss, grad_norm, spec (KrylovSpectrum, with its verdict and the sign fractions on
    the τ grid), the densities (``grid``, ``density``; ``log_grid``, ``log_density_pos``,
    ``log_density_neg``).
    """
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    from crit.hessian import full_batch_hvp_operator, hvp_operator
    from crit.krylov import krylov_spectrum
    from crit.protocol import init_key
    from crit.slq import slq_density, slq_log_density
    from crit.train import cast_params
    from crit.verdict import with_criticality

    template = cast_params(problem.init_fn(jax.random.PRNGKey(0)), jnp.float64)
    unravel = ravel_pytree(template)[1]
    unravel_state = ravel_pytree(cast_params(problem.init_state_fn(jax.random.PRNGKey(0)),
                                             jnp.float64))[1]
    key = jax.random.fold_in(init_key(FLAGS.seed, FLAGS.init_id), 1)
    x, y = jnp.asarray(problem.dataset.x_train), jnp.asarray(problem.dataset.y_train)
    max_steps = krylov_flags.probe_max_steps(FLAGS.lanczos_steps, FLAGS.slq_probes,
                                             FLAGS.num_eigs) or None

    def analyse(problem, theta, state_flat):
        params, state = unravel(theta), unravel_state(state_flat)
        loss_fn = problem.bind_state(state)   # L(θ; state): the state is fixed, never varied
        loss = loss_fn(params)
        if FLAGS.hvp_batch_size:
            grad, matvec = full_batch_hvp_operator(
                lambda p, xb, yb: problem.batch_loss_fn(p, xb, yb, state), params, x, y,
                FLAGS.hvp_batch_size)
        else:
            grad, matvec = hvp_operator(loss_fn, params)
        search = None
        if FLAGS.hvp_dtype != "float64":  # low-precision search, float64 proof (check_matvec)
            from types import SimpleNamespace

            from crit.protocol import search_hessian_operator

            search = search_hessian_operator(
                problem, SimpleNamespace(hvp_dtype=FLAGS.hvp_dtype,
                                         hvp_batch_size=FLAGS.hvp_batch_size), params, state)
        spec = krylov_spectrum(search or matvec, key, theta.size,
                               check_matvec=matvec if search is not None else None,
                               num_steps=FLAGS.lanczos_steps,
                               num_probes=FLAGS.slq_probes, k=FLAGS.num_eigs,
                               tol=FLAGS.eig_tol, z=FLAGS.z, tol_scale=FLAGS.tol_scale,
                               tol_mode=FLAGS.krylov_tol, deflate=FLAGS.deflate,
                               resolve_width=FLAGS.resolve_width,
                               resolve_ceiling=FLAGS.resolve_ceiling,
                               target_width=FLAGS.resolve_width,
                               target_rel_tol=FLAGS.target_rel_tol, max_steps=max_steps,
                               probe_batch=FLAGS.probe_batch or None)
        grad_norm = jnp.linalg.norm(grad)
        spec = spec._replace(verdict=with_criticality(spec.verdict, grad_norm <= FLAGS.grad_tol))
        out = dict(loss=loss, grad_norm=grad_norm, spec=spec)
        lo, hi = spec.lambda_min, spec.lambda_max
        pad = 0.05 * (hi - lo)
        out["grid"] = jnp.linspace(lo - pad, hi + pad, GRID_POINTS)
        out["density"] = slq_density(spec.slq, out["grid"], FLAGS.density_sigma or None)
        tau = spec.tolerance
        top = jnp.log10(jnp.maximum(jnp.abs(lo), jnp.abs(hi)))
        start = jnp.where(tau > 0, jnp.log10(jnp.where(tau > 0, tau, 1.0)), top - 14.0)
        out["log_grid"] = jnp.linspace(start, top + 0.5, LOG_GRID_POINTS)
        for sign, name in ((1, "pos"), (-1, "neg")):
            out["log_density_" + name] = slq_log_density(
                spec.slq, out["log_grid"], sign=sign, tol=tau, sigma=FLAGS.log_sigma)
        return out

    from crit.data_parallel import jit_with_data

    compiled = jit_with_data(lambda pr: lambda t, s: analyse(pr, t, s), problem,
                             in_shardings=shardings, out_shardings=shardings)
    return compiled, (unravel, unravel_state)


def make_dense(problem, unravels, shardings=None):
    """(theta, state) -> all P exact eigenvalues (dense Hessian, compiled once; numpy eigvalsh)."""
    from crit.data_parallel import jit_with_data
    from crit.hessian import dense_hessian

    unravel, unravel_state = unravels
    hessian = jit_with_data(
        lambda pr: lambda t, s: dense_hessian(pr.bind_state(unravel_state(s)), unravel(t)),
        problem, in_shardings=shardings, out_shardings=shardings)
    return lambda theta, state: np.linalg.eigvalsh(np.asarray(hessian(theta, state)))


def analyse_snapshot(analyse, dense_eigs, theta, state) -> dict:
    """One snapshot's results as flat host arrays: the keys of :func:`make_analysis` (``spec``
    flattened to ``spec_<field>``, its verdict to ``verdict_<field>``, its grid fractions to
    ``cdf_<fraction>_<est|lo|hi>``) and, with a dense comparison, ``eigs``, the exact
    ``exact_<count or fraction>`` under the SLQ tolerance τ, the exact fractions on the grid
    (``cdf_exact_<fraction>``) and the dense verdict (``dense_verdict``)."""
    import jax

    from crit.spectrum import classify_spectrum
    from crit.verdict import dense_verdict

    out = jax.tree.map(np.asarray, analyse(theta, state))
    spec = out.pop("spec")
    out.update({f"spec_{f}": np.asarray(getattr(spec, f)) for f in SPEC_FIELDS})
    out.update({f"verdict_{f}": np.asarray(getattr(spec.verdict, f)) for f in VERDICT_FIELDS})
    for name, est in (("min_ratio", spec.grid_fractions.positive),
                      ("index", spec.grid_fractions.negative),
                      ("null_fraction", spec.grid_fractions.null)):
        for part, attr in (("est", "mean"), ("lo", "lo"), ("hi", "hi")):
            out[f"cdf_{name}_{part}"] = np.asarray(getattr(est, attr))
    if dense_eigs is not None:
        out["eigs"] = dense_eigs(theta, state)
        exact = classify_spectrum(out["eigs"], float(spec.tolerance))
        for f in ("n_pos", "n_neg", "n_null", "min_ratio", "index", "null_fraction",
                  "lambda_min", "lambda_max"):
            out[f"exact_{f}"] = np.asarray(getattr(exact, f))
        on_grid = classify_spectrum(np.broadcast_to(out["eigs"], (len(spec.grid_tolerance),
                                                                  out["eigs"].size)),
                                    np.asarray(spec.grid_tolerance))
        for f in ("min_ratio", "index", "null_fraction"):
            out[f"cdf_exact_{f}"] = np.asarray(getattr(on_grid, f))
        critical = float(out["grad_norm"]) <= FLAGS.grad_tol
        dense = dense_verdict(out["eigs"], float(spec.machine_tolerance), critical)
        out["dense_verdict"] = np.asarray(dense.code)
    return out


def snapshot_line(step: int, row: dict, seconds: float) -> str:
    """What the app prints for one analysed snapshot."""
    from crit.verdict import VERDICT_TEXT, VERDICTS

    f = lambda name: float(row["spec_" + name])  # noqa: E731
    verdict = VERDICTS[int(row["verdict_code"])]
    if bool(row["verdict_negative_proven"]):
        curvature = (f"λ_min ≤ {float(row['verdict_lambda_min_bound']):.4g} (proven: yᵀHy, "
                     f"residual {float(row['verdict_ritz_residual']):.1e})")
    else:
        curvature = (f"no λ < −{float(row['verdict_excluded_below']):.3g} (missed with "
                     f"probability ≤ {float(row['verdict_miss_probability']):.0%}; smallest "
                     f"Ritz value {float(row['verdict_ritz_value']):.3g})")
    resolved = "" if bool(row["spec_resolved"]) else " UNRESOLVED"
    line = (f"step {step:>6}: loss {float(row['loss']):.4g}, "
            f"‖g‖ {float(row['grad_norm']):.2e}: {VERDICT_TEXT[verdict]}, {curvature}\n"
            f"        λ_max {f('lambda_max'):.6g}{'' if row['spec_lambda_max_converged'] else '?'}"
            f", min ratio (SLQ) {f('min_ratio'):.4f} [{f('min_ratio_lo'):.4f}, "
            f"{f('min_ratio_hi'):.4f}], index {f('index'):.4f} [{f('index_lo'):.4f}, "
            f"{f('index_hi'):.4f}]{resolved} at τ = {f('tolerance'):.2e} "
            f"({f('tolerance_rel'):.0e}·max|θ|); {int(row['spec_num_deflated'])} deflated, "
            f"{int(row['spec_num_matvecs'])} HVPs, {seconds:.1f}s")
    if "eigs" in row:
        exact = float(row["exact_min_ratio"])
        inside = f("min_ratio_lo") <= exact <= f("min_ratio_hi")
        line += (f"\n        exact: min ratio {exact:.4f} "
                 f"({'inside' if inside else 'OUTSIDE'} the interval), λ ∈ "
                 f"[{float(row['exact_lambda_min']):.6g}, {float(row['exact_lambda_max']):.6g}]"
                 f", dense verdict {VERDICTS[int(row['dense_verdict'])]}")
    return line


def extremal_ritz_values(row, rel_residual: float = 1e-6) -> np.ndarray:
    """Ritz values of the extremal run whose residual bound is ≤ rel_residual·max|Ritz value|.

    Each such value lies within its residual of a true eigenvalue (Parlett 1998, §11.5),
    so the rug drawn from them shows the isolated outliers that the SLQ density smooths away.
    """
    values = np.concatenate([np.asarray(row["spec_largest"]), np.asarray(row["spec_smallest"])])
    residuals = np.concatenate([np.asarray(row["spec_largest_residuals"]),
                                np.asarray(row["spec_smallest_residuals"])])
    scale = float(np.max(np.abs(values))) if values.size else 0.0
    return np.unique(values[residuals <= rel_residual * scale])


def density_figure(out_dir, rows, n_params, title) -> None:
    """Per snapshot: the SLQ density (linear λ, log-scaled axis) and the log10|λ| density."""
    import matplotlib.pyplot as plt

    from crit.plots import save_figure

    fig, axes = plt.subplots(len(rows), 2, figsize=(11, 2.9 * len(rows)), squeeze=False)
    for (ax_lin, ax_log), row in zip(axes, rows):
        eigs = row.get("eigs")
        f = lambda name: float(row["spec_" + name])  # noqa: E731
        lo, hi = f("lambda_min"), f("lambda_max")
        grid, dens = row["grid"], row["density"]
        ax_lin.semilogy(grid, np.maximum(dens, 1e-12), color="tab:blue", lw=1.0,
                        label=f"SLQ ({FLAGS.slq_probes} probes × {FLAGS.lanczos_steps} steps)")
        if eigs is not None:
            ax_lin.hist(eigs, bins=120, density=True, color="tab:gray", alpha=0.5,
                        label=f"exact eigenvalues (P = {n_params})", log=True)
        ax_lin.axvline(0.0, color="k", lw=0.5)
        ritz = extremal_ritz_values(row)
        bottom = max(1e-8, float(np.max(dens)) * 1e-9)
        ax_lin.set_ylim(bottom=bottom)
        if ritz.size:  # the outliers SLQ deflates: a rug of converged Ritz values at each end
            ax_lin.plot(ritz, np.full(ritz.size, bottom * 10), "|", color="tab:orange", ms=12,
                        mew=1.2, label=f"Lanczos Ritz values ({ritz.size}, converged)")
        ax_lin.set_xlabel("λ")
        ax_lin.set_ylabel("density")
        ax_lin.legend(fontsize=7, loc="upper right")
        ax_lin.set_title(
            f"step {row['step']}: loss {float(row['loss']):.3g}, Ritz λ ∈ [{lo:.3g}, {hi:.3g}], "
            f"min ratio (SLQ) {f('min_ratio'):.3f} [{f('min_ratio_lo'):.3f}, "
            f"{f('min_ratio_hi'):.3f}]", fontsize=8)
        tau = f("tolerance")
        log_grid = row["log_grid"]
        for sign, color in ((1, "tab:red"), (-1, "tab:green")):
            d = row["log_density_pos" if sign > 0 else "log_density_neg"]
            label = f"SLQ, λ {'>' if sign > 0 else '<'} {'' if sign > 0 else '−'}τ"
            ax_log.plot(log_grid, d, color=color, lw=1.0, label=label)
            if eigs is not None:
                sel = sign * eigs > tau
                if sel.any():
                    ax_log.hist(np.log10(sign * eigs[sel]), bins=60, range=(log_grid[0],
                                log_grid[-1]), weights=np.full(sel.sum(), 1.0 / eigs.size)
                                / ((log_grid[-1] - log_grid[0]) / 60), color=color,
                                alpha=0.25,
                                label=f"exact, {'positive' if sign > 0 else 'negative'}")
        for sign, color in ((1, "tab:red"), (-1, "tab:green")):
            top = sign * ritz[sign * ritz > tau]
            if top.size:
                ax_log.plot(np.log10(top), np.zeros(top.size), "|", color=color, ms=12, mew=1.2,
                            label=f"Ritz, {'λ > τ' if sign > 0 else 'λ < −τ'} ({top.size})")
        ax_log.set_xlabel("log10 |λ|   (left edge: τ)")
        ax_log.set_ylabel("fraction per decade")
        ax_log.legend(fontsize=7, loc="upper left")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_dir, "spectrum_density")


def summary_figure(out_dir, table, title) -> None:
    """SLQ fractions with their intervals (and the exact fractions when dense), and the extremal
    Ritz values (and exact eigenvalues), against the step; ``table`` holds spectrum.csv's
    columns."""
    import matplotlib.pyplot as plt

    from crit.plots import save_figure

    step = np.asarray(table["step"], float)
    fig, (ax_r, ax_l) = plt.subplots(1, 2, figsize=(10, 3.6))
    shift = 0.012 * max(np.ptp(step), 1.0)  # side by side, so the intervals do not overlap
    for j, (name, color) in enumerate(zip(ESTIMATED, ("tab:blue", "tab:red", "tab:gray"))):
        x = step + (j - 1) * shift
        mid = np.asarray(table[name + "_est"])
        err = [mid - np.asarray(table[name + "_lo"]), np.asarray(table[name + "_hi"]) - mid]
        known = np.asarray(table["resolved"], bool)
        ax_r.errorbar(x, mid, yerr=err, fmt="none", color=color, capsize=3)
        ax_r.plot(x, np.where(known, mid, np.nan), "o-", color=color, ms=4,
                  label=f"{name} (SLQ estimate, interval)")
        if (~known).any():  # an unresolved estimate is not drawn as if it were known
            ax_r.plot(x[~known], mid[~known], "o", mfc="none", color=color, ms=5,
                      label=f"{name}, unresolved (interval > {FLAGS.resolve_width:g})")
        if name in table:
            ax_r.plot(x, table[name], "x", color=color, ms=8, label=f"{name} (exact)")
    ax_r.set_ylim(-0.02, 1.02)
    rels = sorted(set(float(r) for r in table["tolerance_rel"]))
    ax_r.set_title("at τ = " + ", ".join(f"{r:.0e}" for r in rels) + " × max|θ|", fontsize=8)
    ax_r.set_xlabel("training step")
    ax_r.set_ylabel("fraction of eigenvalues")
    ax_r.legend(fontsize=7)
    ax_r.grid(alpha=0.3)
    for name, color in (("lambda_max", "tab:blue"), ("lambda_min", "tab:red")):
        ax_l.plot(step, table[name], "o-", color=color, label=f"{name} (Ritz value)")
    proven = np.asarray(table["negative_proven"], bool)
    if proven.any():
        ax_l.plot(step[proven], np.asarray(table["lambda_min_bound"])[proven], "v", color="k",
                  ms=7, mfc="none", label="λ_min ≤ this (proven: saddle if critical)")
        if "exact_" + name in table:
            ax_l.plot(step, table["exact_" + name], "x", color="k", ms=8,
                      label=f"{name} (exact)")
    ax_l.set_yscale("symlog", linthresh=1e-3)
    ax_l.set_xlabel("training step")
    ax_l.set_ylabel("extremal eigenvalue")
    ax_l.legend(fontsize=7)
    ax_l.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    save_figure(fig, out_dir, "spectrum_summary")


def load_snapshots(out_dir: Path, n_snapshots: int) -> dict:
    """The finished snapshots of ``out_dir/chunks``, keyed by position in the snapshot list."""
    try:
        done = store.load_chunks(out_dir)
    except store.ResultsDirError as exc:
        raise app.UsageError(str(exc)) from None
    if not done:
        return {}
    pos = done.pop("init_id")  # the store's row key; here the snapshot's position
    if pos.max() >= n_snapshots:
        raise app.UsageError(f"{out_dir}/chunks holds snapshot {int(pos.max())} of a run with "
                             f"more snapshots than {n_snapshots}; pass --overwrite")
    return {int(p): {k: v[j] for k, v in done.items()} for j, p in enumerate(pos)}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # JAX's multi-controller runtime starts before anything touches a device (as in min_ratio)
    cluster_problems = cluster.cluster_errors()
    if cluster_problems:
        raise app.UsageError("\n".join(cluster_problems))
    cluster.start_cluster()
    validate()
    import jax

    problem = common.problem_from_flags()
    axis, why = krylov_flags.shard_axis(1, problem)
    problems = krylov_flags.shard_axis_errors(axis)
    if jax.process_count() > 1 and axis != "data":
        problems.append(f"{jax.process_count()} processes follow one init only by sharing its "
                        f"data: --shard_axis={FLAGS.shard_axis} resolved to {axis}; use "
                        "--shard_axis=data (or auto)")
    if axis == "data":
        problems += krylov_flags.data_parallel_memory_errors(
            problem, (FLAGS.slq_probes + 1) * FLAGS.lanczos_steps)
    if problems:
        raise app.UsageError("\n".join(problems))
    print(krylov_flags.shard_line(axis, why, problem), flush=True)
    shardings = None
    if axis == "data":  # shardings: θ, state and results on every device
        from crit.data_parallel import shard_over_every_device

        problem, _, shardings = shard_over_every_device(problem)
    dense = compare_dense(problem.n_params)
    snapshots = parse_snapshots(FLAGS.snapshots, FLAGS.train_steps)
    out_dir = Path(FLAGS.out_dir)
    lead = jax.process_index() == 0
    resuming = cluster.agree_on_out_dir(out_dir, run_config(problem, snapshots, dense, axis),
                                        OUTPUTS)
    done = load_snapshots(out_dir, len(snapshots))
    todo = [j for j in range(len(snapshots)) if j not in done]
    print(f"{problem.name}: P = {problem.n_params} parameters, n = {problem.dataset.n_train} "
          f"points; snapshots at steps {snapshots}; {FLAGS.slq_probes} SLQ probes + 1 extremal "
          f"run × {FLAGS.lanczos_steps} Lanczos steps; dense comparison "
          f"{'on' if dense else 'off'}"
          + (f"; BatchNorm {problem.batchnorm} mode" if problem.has_state else "")
          + (f"; eval batches of {problem.eval_batch_size}" if problem.eval_batch_size else "")
          + (f"; resuming, {len(todo)} of {len(snapshots)} snapshots left" if resuming else ""),
          flush=True)
    t0 = time.time()
    thetas, states, curve_loss, curve_grad = train_with_snapshots(problem, snapshots,
                                                                  shardings)
    if states is None:
        states = np.zeros((len(snapshots), 0))
    print(f"trained {FLAGS.train_steps} steps in {time.time() - t0:.1f}s", flush=True)
    if todo:
        analyse, unravel = make_analysis(problem, shardings)
        t1 = time.time()
        analyse = analyse.compile(thetas[0], states[0])
        print(f"compiled the analysis in {time.time() - t1:.1f}s", flush=True)
        dense_eigs = make_dense(problem, unravel, shardings) if dense else None
    for j in todo:
        t1 = time.time()
        row = analyse_snapshot(analyse, dense_eigs, thetas[j], states[j])
        # saved before the next snapshot starts: a killed run loses at most the one in progress
        if lead:  # every process computed the snapshot; one writes it
            store.write_chunk(out_dir, {"init_id": np.asarray([j])}
                              | {k: np.asarray(v)[None] for k, v in row.items()})
        print(snapshot_line(snapshots[j], row, time.time() - t1), flush=True)
    if not lead:
        print(f"process {jax.process_index()} computed every snapshot with the others and "
              "leaves the files to process 0", flush=True)
        return
    # Outputs come from the saved chunks whether this run computed them or an earlier one did.
    done = load_snapshots(out_dir, len(snapshots))
    rows = [dict(done[j], step=step) for j, step in enumerate(snapshots)]
    write_outputs(out_dir, problem, rows, snapshots, curve_loss, curve_grad)
    print(tolerance_table(rows))
    print(f"wrote {out_dir}/spectrum.csv, spectrum_cdf.csv, spectrum.npz, "
          f"spectrum_density.png/.pdf, spectrum_summary.png/.pdf, spectrum_cdf.png/.pdf, "
          f"config.json ({time.time() - t0:.0f}s)")


def csv_row(row: dict) -> dict:
    """One snapshot's spectrum.csv values."""
    from crit.verdict import VERDICTS

    values = dict(step=row["step"], loss=float(row["loss"]), grad_norm=float(row["grad_norm"]),
                  verdict=VERDICTS[int(row["verdict_code"])],
                  negative_proven=bool(row["verdict_negative_proven"]),
                  lambda_min_bound=float(row["verdict_lambda_min_bound"]),
                  ritz_min_residual=float(row["verdict_ritz_residual"]),
                  negative_excluded_below=float(row["verdict_excluded_below"]),
                  num_matvecs=int(row["spec_num_matvecs"]),
                  num_deflated=int(row["spec_num_deflated"]),
                  probe_steps=int(row["spec_probe_steps"]),
                  resolved=bool(row["spec_resolved"]),
                  lambda_min_converged=bool(row["spec_lambda_min_converged"]),
                  lambda_max_converged=bool(row["spec_lambda_max_converged"]))
    for name in ("lambda_min", "lambda_max", "tolerance", "tolerance_rel", "machine_tolerance"):
        values[name] = float(row["spec_" + name])
    for name in ESTIMATED:
        values[name + "_est"] = float(row["spec_" + name])
        for end in ("_lo", "_hi"):
            values[name + end] = float(row["spec_" + name + end])
    if "eigs" in row:
        for name in ("n_pos", "n_neg", "n_null"):
            values[name] = int(row["exact_" + name])
        for name in ESTIMATED:
            values[name] = float(row["exact_" + name])
        for name in ("exact_lambda_min", "exact_lambda_max"):
            values[name] = float(row[name])
        values["dense_verdict"] = VERDICTS[int(row["dense_verdict"])]
    return values


def cdf_table(rows) -> dict:
    """spectrum_cdf.csv: every snapshot × every grid τ, with exact fractions when dense."""
    from crit.krylov import REL_TOL_GRID

    dense = "eigs" in rows[0]
    names = CDF_COLUMNS + (tuple(f"exact_{n}" for n in ESTIMATED) if dense else ())
    table = {c: [] for c in names}
    for row in rows:
        est = {n: row[f"cdf_{n}_est"] for n in ESTIMATED}
        width = np.maximum(row["cdf_min_ratio_hi"] - row["cdf_min_ratio_lo"],
                           row["cdf_index_hi"] - row["cdf_index_lo"])
        for g, rel in enumerate(REL_TOL_GRID):
            table["step"].append(row["step"])
            table["tolerance_rel"].append(rel)
            table["tolerance"].append(float(row["spec_grid_tolerance"][g]))
            for n in ESTIMATED:
                table[f"{n}_est"].append(float(est[n][g]))
                for end in ("lo", "hi"):
                    table[f"{n}_{end}"].append(float(row[f"cdf_{n}_{end}"][g]))
                if dense:
                    table[f"exact_{n}"].append(float(row[f"cdf_exact_{n}"][g]))
            table["resolved"].append(bool(width[g] <= FLAGS.resolve_width
                                          and rel <= FLAGS.resolve_ceiling * (1 + 1e-9)))
    return {c: np.asarray(v) for c, v in table.items()}


def write_outputs(out_dir, problem, rows, snapshots, curve_loss, curve_grad) -> None:
    dense = "eigs" in rows[0]
    names = CSV_COLUMNS + (DENSE_COLUMNS if dense else ())
    values = [csv_row(row) for row in rows]
    table = {c: np.asarray([v[c] for v in values]) for c in names}
    store.write_csv(out_dir / "spectrum.csv", table)
    cdf = cdf_table(rows)
    store.write_csv(out_dir / "spectrum_cdf.csv", cdf)
    stack = lambda key: np.stack([np.asarray(r[key]) for r in rows])  # noqa: E731
    logged = np.arange(0, len(curve_loss), FLAGS.log_every)
    arrays = {
        "step": np.asarray(snapshots), "n_params": np.asarray(problem.n_params),
        "nodes": stack("spec_nodes"), "weights": stack("spec_weights"),
        "node_residuals": stack("spec_node_residuals"), "node_valid": stack("spec_node_valid"),
        "node_coupling": stack("spec_node_coupling"), "probe_mass": stack("spec_probe_mass"),
        "deflated": stack("spec_deflated"),
        "slack": stack("spec_slack"),
        "ritz_largest": stack("spec_largest"),
        "ritz_largest_residuals": stack("spec_largest_residuals"),
        "ritz_smallest": stack("spec_smallest"),
        "ritz_smallest_residuals": stack("spec_smallest_residuals"),
        "escape_direction": stack("spec_escape_direction"),
        "tolerance": stack("spec_tolerance"), "grid_tolerance": stack("spec_grid_tolerance"),
        "train_step": logged, "train_loss": curve_loss[logged],
        "train_grad_norm": curve_grad[logged]}
    for key in [k for k in rows[0] if k.startswith(("cdf_", "grid", "density", "log_"))]:
        arrays[key] = stack(key)
    if dense:
        arrays["exact_eigenvalues"] = stack("eigs")
    store.atomic_save_npz(out_dir / "spectrum.npz", arrays)
    title = (f"{problem.name}, P = {problem.n_params:,}, Hessian of the full-data loss by HVPs; "
             + (f"τ = {FLAGS.eig_tol}" if FLAGS.eig_tol is not None else
                "τ = P·ε·max|θ|" if FLAGS.krylov_tol == "machine" else
                f"τ = finest resolved (intervals ≤ {FLAGS.resolve_width:g})"))
    density_figure(out_dir, rows, problem.n_params, title)
    if FLAGS.eig_tol is None and FLAGS.krylov_tol == "resolved":
        table, common = at_common_tolerance(rows, table)
        title = title.replace(f"τ = finest resolved (intervals ≤ {FLAGS.resolve_width:g})",
                              f"one τ = {common:.0e}·max|θ| for all snapshots (the coarsest "
                              f"per-snapshot resolved τ)")
    summary_figure(out_dir, table, title)
    cdf_figure(out_dir, rows, title)


def at_common_tolerance(rows, table) -> tuple[dict, float]:
    """spectrum.csv's columns with every snapshot's fractions read at one relative τ from its
    grid (crit.krylov.common_tolerance_index): what the summary figure draws, so snapshots are
    compared at one scale. spectrum.csv keeps each snapshot's own τ."""
    from crit.krylov import REL_TOL_GRID, common_tolerance_index

    g = common_tolerance_index([float(r["spec_tolerance_rel"]) for r in rows],
                               [bool(r["spec_resolved"]) for r in rows], FLAGS.resolve_ceiling)
    pooled = dict(table)
    for n in ESTIMATED:
        pooled[n + "_est"] = np.asarray([float(r[f"cdf_{n}_est"][g]) for r in rows])
        for end in ("lo", "hi"):
            pooled[f"{n}_{end}"] = np.asarray([float(r[f"cdf_{n}_{end}"][g]) for r in rows])
        if n in table:
            pooled[n] = np.asarray([float(r[f"cdf_exact_{n}"][g]) for r in rows])
    width = np.maximum(pooled["min_ratio_hi"] - pooled["min_ratio_lo"],
                       pooled["index_hi"] - pooled["index_lo"])
    pooled["resolved"] = (width <= FLAGS.resolve_width) & (
        REL_TOL_GRID[g] <= FLAGS.resolve_ceiling * (1 + 1e-9))
    pooled["tolerance_rel"] = np.full(len(rows), REL_TOL_GRID[g])
    return pooled, REL_TOL_GRID[g]


def cdf_figure(out_dir, rows, title) -> None:
    """Per snapshot: the fractions of eigenvalues above τ, below −τ and within ±τ against
    τ/max|θ| on the grid, as bands (SLQ intervals) around the estimates; the exact fractions
    when dense; the chosen τ marked. Where a band is wider than --resolve_width the estimate
    is dashed: unresolved at that scale."""
    import matplotlib.pyplot as plt

    from crit.krylov import REL_TOL_GRID
    from crit.plots import save_figure

    rel = np.asarray(REL_TOL_GRID)
    fig, axes = plt.subplots(1, len(rows), figsize=(4.2 * len(rows), 3.6), squeeze=False)
    for ax, row in zip(axes[0], rows):
        for name, color, label in (("min_ratio", "tab:blue", "λ > τ (min ratio)"),
                                   ("index", "tab:red", "λ < −τ (index)"),
                                   ("null_fraction", "tab:gray", "|λ| ≤ τ (null)")):
            lo, hi = row[f"cdf_{name}_lo"], row[f"cdf_{name}_hi"]
            est = row[f"cdf_{name}_est"]
            ax.fill_between(rel, lo, hi, color=color, alpha=0.25, lw=0)
            sharp = (hi - lo) <= FLAGS.resolve_width
            ax.plot(rel, np.where(sharp, est, np.nan), "-", color=color, lw=1.2, label=label)
            ax.plot(rel, np.where(sharp, np.nan, est), ":", color=color, lw=1.0)
            if f"cdf_exact_{name}" in row:
                ax.plot(rel, row[f"cdf_exact_{name}"], "x", color=color, ms=4)
        ax.axvline(float(row["spec_tolerance_rel"]), color="k", lw=0.6, ls="--")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("τ / max|θ|   (dashed line: τ reported)")
        ax.set_ylabel("fraction of eigenvalues")
        ax.set_title(f"step {row['step']}" + (", x: exact" if "eigs" in row else "")
                     + "; dotted: unresolved", fontsize=8)
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="center left")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, out_dir, "spectrum_cdf")


def tolerance_table(rows) -> str:
    from crit.krylov import REL_TOL_GRID

    cols = [REL_TOL_GRID.index(min(REL_TOL_GRID, key=lambda g: abs(np.log10(g / r))))
            for r in TABLE_REL_TOLS]
    lines = ["minimum ratio (SLQ estimate) [interval] at τ = r·max|θ| (all in spectrum_cdf.csv; "
             "'?' marks intervals wider than --resolve_width):",
             "| step | " + " | ".join(f"r = {r:g}" for r in TABLE_REL_TOLS) + " |",
             "|---|" + "---|" * len(TABLE_REL_TOLS)]
    for row in rows:
        cells = []
        for g in cols:
            m, lo, hi = (row[f"cdf_min_ratio_{p}"][g] for p in ("est", "lo", "hi"))
            width = max(hi - lo, row["cdf_index_hi"][g] - row["cdf_index_lo"][g])
            cells.append(f"{m:.3f} [{lo:.3f}, {hi:.3f}]"
                         + ("" if width <= FLAGS.resolve_width else "?"))
        lines.append(f"| {row['step']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    app.run(main)
