"""Loss and gradient norm vs iteration: training, then the critical-point finder (homework 1-2-2).

    python -m experiments.training_curves                      # 3 runs, Adam then damped Newton
    python -m experiments.training_curves --finder=gradnorm    # the homework's ½‖∇L‖² descent

Protocol: run i starts from ``init_fn(fold_in(PRNGKey(seed), i))``; ``--train_steps`` full-batch
optimizer steps (``crit.train.train``, vmapped over the runs; ``crit.train.train_model`` for a
model with BatchNorm, whose running statistics are trained alongside and then fixed: the log and
the finder use L(θ; state)) log the loss and the full-batch
gradient norm ‖∇L‖ = sqrt(Σ_p ‖∂L/∂p‖²) every ``--log_every`` steps. The end point (cast to
float64) is then handed to the finder (``--finder``): damped Newton records ‖∇L‖ after every
iteration, gradient-norm descent every ``--log_every`` steps. A run is called critical only if
its final ‖∇L‖ ≤ ``--grad_tol``. The finders do not record the loss along the way, so the loss
panel of the finder phase shows its value where the finder started and where it stopped.

Writes to ``--out_dir``: config.json, curves.npz, runs.csv, training_curves.png/.pdf.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common, model_flags  # noqa: F401  (--model, --data_file)
from crit import store
from crit.critical import gradient_norm_descent, newton_critical_point
from crit.train import cast_params, log_steps, make_optimizer, train, train_model, tree_norm

FLAGS = flags.FLAGS
TRAINS_STATE = True  # trains BatchNorm statistics with the weights (experiments/model_flags)
flags.DEFINE_integer("num_runs", 3, "Independent runs (vmapped), overlaid in the figure; run i "
                     "uses init fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("seed", 0, "Root seed of the initializations.")
flags.DEFINE_string("out_dir", "runs/training_curves", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

OUTPUTS = ("curves.npz", "runs.csv")
# Shared flags (experiments/common.py) this app has no use for: given on the command line they
# are refused rather than silently ignored, and they stay out of the fingerprint.
UNUSED_SHARED = ("flat_tol", "eig_tol")
NOT_PROTOCOL = ("out_dir", "overwrite") + UNUSED_SHARED


def unused_flag_errors() -> list[str]:
    """One message per shared flag of :data:`UNUSED_SHARED` given on the command line."""
    return [f"--{name}: does not apply to this app (it would be ignored)"
            for name in UNUSED_SHARED if FLAGS[name].present]


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors()
    errors += unused_flag_errors()
    if FLAGS.num_runs < 1:
        errors.append(f"--num_runs={FLAGS.num_runs}: must be >= 1")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


def run_all(problem) -> dict:
    """Training then finder for every run, one vmapped call; returns NumPy arrays."""
    optimizer = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)
    dtype = jnp.float32 if FLAGS.train_dtype == "float32" else jnp.float64
    steps = common.finder_steps()
    root = jax.random.PRNGKey(FLAGS.seed)

    def one_run(i):
        key = jax.random.fold_in(root, i)
        params = cast_params(problem.init_fn(key), dtype)
        if problem.has_state:
            # BatchNorm: batch statistics in training, running ones updated alongside; the
            # log, the finder and the certificate then use L(θ; state) with the state fixed
            state = cast_params(problem.init_state_fn(key), dtype)
            params, state, log = train_model(problem, optimizer, params, state,
                                             jax.random.fold_in(key, 2), FLAGS.train_steps,
                                             FLAGS.log_every)
            loss_fn = problem.bind_state(cast_params(state, jnp.float64))
        else:
            params, log = train(problem.loss_fn, optimizer, params, FLAGS.train_steps,
                                FLAGS.log_every)
            loss_fn = problem.loss_fn
        loss_and_grad = jax.value_and_grad(loss_fn)
        params = cast_params(params, jnp.float64)
        start_loss, start_grad = loss_and_grad(params)
        if FLAGS.finder == "newton":
            found = newton_critical_point(loss_fn, params, max_iters=steps,
                                          grad_tol=FLAGS.grad_tol)
            # history[k] is ‖∇L‖ after iteration k + 1; iteration 0 is the finder's start.
            history = jnp.concatenate([tree_norm(start_grad)[None], found.history])
        else:
            found = gradient_norm_descent(loss_fn, params, num_steps=steps,
                                          learning_rate=FLAGS.finder_lr,
                                          grad_tol=FLAGS.grad_tol, log_every=FLAGS.log_every)
            history = found.history  # ‖∇L‖ at steps 0, log_every, ... (before each update)
        end_loss, end_grad = loss_and_grad(found.params)
        return dict(train_loss=log.loss, train_grad_norm=log.grad_norm, start_loss=start_loss,
                    start_grad_norm=tree_norm(start_grad), finder_grad_norm=history,
                    finder_iterations=found.iterations, final_loss=end_loss,
                    final_grad_norm=tree_norm(end_grad))

    out = jax.jit(jax.vmap(one_run))(jnp.arange(FLAGS.num_runs))
    out = {k: np.asarray(v) for k, v in out.items()}

    out["train_step"] = np.asarray(log_steps(FLAGS.train_steps, FLAGS.log_every))
    width = out["finder_grad_norm"].shape[1]
    every = 1 if FLAGS.finder == "newton" else FLAGS.log_every
    out["finder_iteration"] = np.arange(width) * every
    out["critical"] = out["final_grad_norm"] <= FLAGS.grad_tol
    return out


def curves_figure(r: dict, out_dir: Path, title: str):
    """Rows: loss, ‖∇L‖. Columns: training (optimizer steps), finder (its iterations)."""
    from crit import plots  # matplotlib is loaded only when drawing (Agg backend)
    import matplotlib.pyplot as plt

    runs = r["final_loss"].shape[0]
    colours = [plt.get_cmap("tab10")(i % 10) for i in range(runs)]
    fig, axes = plt.subplots(2, 2, figsize=(11, 6.4), sharex="col", sharey="row",
                             gridspec_kw=dict(width_ratios=(3, 1.4), wspace=0.05, hspace=0.08))
    finder_unit = "Newton iteration" if FLAGS.finder == "newton" else "½‖∇L‖² Adam step"
    for i in range(runs):
        c = colours[i]
        label = (f"run {i}: " + ("critical" if r["critical"][i] else "not certified")
                 + f", ‖∇L‖ = {r['final_grad_norm'][i]:.1e}")
        axes[0, 0].plot(r["train_step"], r["train_loss"][i], color=c, lw=1.2, label=label)
        axes[1, 0].plot(r["train_step"], r["train_grad_norm"][i], color=c, lw=1.2)
        it = int(r["finder_iterations"][i])
        axes[0, 1].plot([0, it], [r["start_loss"][i], r["final_loss"][i]], ":", color=c,
                        marker="o", ms=4)
        g = r["finder_grad_norm"][i]
        keep = np.isfinite(g)
        axes[1, 1].plot(r["finder_iteration"][keep], g[keep], "-", color=c, lw=1.2, marker=".",
                        ms=4 if FLAGS.finder == "newton" else 0)
    axes[1, 1].axhline(FLAGS.grad_tol, color="k", ls="--", lw=0.8,
                       label=f"certificate ‖∇L‖ ≤ {FLAGS.grad_tol:g}")
    for ax in axes.ravel():
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
    axes[0, 0].set_ylabel("training loss")
    axes[1, 0].set_ylabel("‖∇L‖ (full batch)")
    axes[1, 0].set_xlabel(f"{FLAGS.optimizer} step (lr {FLAGS.learning_rate:g})")
    axes[1, 1].set_xlabel(finder_unit)
    axes[0, 0].set_title("training", fontsize=10)
    axes[0, 1].set_title(f"finder: {FLAGS.finder}", fontsize=10)
    axes[0, 1].text(0.5, 0.95, "loss at start and end only", transform=axes[0, 1].transAxes,
                    ha="center", va="top", fontsize=7)
    axes[0, 0].legend(fontsize=7, loc="upper right")
    axes[1, 1].legend(fontsize=7, loc="upper right")
    fig.suptitle(title, fontsize=10)
    return plots.save_figure(fig, out_dir, "training_curves")


def run_config(problem) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol.update(problem=problem.name, loss=problem.loss_name,
                    finder_steps=common.finder_steps())
    return {"experiment": "training_curves", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "environment": common.environment()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    problem = common.problem_from_flags()
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(problem), OUTPUTS)
    print(f"{problem.name}: P = {problem.n_params}; {FLAGS.num_runs} runs: {FLAGS.train_steps} "
          f"{FLAGS.optimizer} steps, then {common.finder_steps()} {FLAGS.finder} iterations")
    r = run_all(problem)
    store.atomic_save_npz(out_dir / "curves.npz", {k: r[k] for k in (
        "train_step", "train_loss", "train_grad_norm", "finder_iteration", "finder_grad_norm",
        "start_loss", "start_grad_norm", "final_loss", "final_grad_norm", "finder_iterations",
        "critical")})
    store.write_csv(out_dir / "runs.csv", {
        "run": np.arange(FLAGS.num_runs), "train_loss": r["start_loss"],
        "train_grad_norm": r["start_grad_norm"], "finder": np.array([FLAGS.finder] * FLAGS.num_runs),
        "finder_iterations": r["finder_iterations"], "final_loss": r["final_loss"],
        "final_grad_norm": r["final_grad_norm"], "critical": r["critical"],
        "grad_tol": np.full(FLAGS.num_runs, FLAGS.grad_tol)})
    n_crit = int(r["critical"].sum())
    curves_figure(r, out_dir, f"{problem.name}, P = {problem.n_params}: {n_crit}/{FLAGS.num_runs} "
                  f"runs certified critical (‖∇L‖ ≤ {FLAGS.grad_tol:g})")
    for i in range(FLAGS.num_runs):
        print(f"run {i}: after training loss {r['start_loss'][i]:.3e} ‖∇L‖ "
              f"{r['start_grad_norm'][i]:.2e}; after {int(r['finder_iterations'][i])} "
              f"{FLAGS.finder} iterations loss {r['final_loss'][i]:.3e} ‖∇L‖ "
              f"{r['final_grad_norm'][i]:.2e} ({'critical' if r['critical'][i] else 'not certified'})")
    print(f"wrote {out_dir}/curves.npz, runs.csv, training_curves.png/.pdf")


if __name__ == "__main__":
    app.run(main)
