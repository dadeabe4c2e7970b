"""Training trajectories projected to 2-D by PCA (MLDS homework 1-2-1).

    python -m experiments.trajectory_pca                          # 8 runs, 1-16-16-1 on sinc
    python -m experiments.trajectory_pca --layer=Dense_1 --record_every=50 --out_dir=runs/pca

Protocol: run i starts from ``init_fn(fold_in(PRNGKey(seed), i))`` and is trained full-batch with
the common optimizer flags; all runs are one vmapped ``lax.scan`` that keeps a parameter snapshot
every ``--record_every`` steps (the optimizer state runs on between snapshots). The R·S snapshots
(R runs, S snapshots each) are centred together and projected on their first two principal
directions (``crit.landscape.trajectory_pca``), once for the whole model and once for the leaves of
one layer (``--layer``). One colour per run; the loss is written at each run's last point (and every
``--annotate_every`` snapshots if asked).

Writes to ``--out_dir``: config.json, trajectories.npz (snapshots, losses, coordinates, explained
variance ratios), runs.csv (one row per run), trajectory_pca.png/.pdf.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from experiments import common
from crit import landscape, store
from crit.train import cast_params, make_optimizer, snapshot_steps, train_with_snapshots, tree_norm

FLAGS = flags.FLAGS
flags.DEFINE_integer("num_runs", 8, "Independent trainings (vmapped); run i uses init "
                     "fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("seed", 0, "Root seed of the initializations.")
flags.DEFINE_integer("record_every", 100, "Keep a parameter snapshot every this many training "
                     "steps (plus the initialization and the last step).")
flags.DEFINE_string("layer", "Dense_0", "Layer whose parameters get their own PCA panel "
                    "(Dense_0 is the first layer, Dense_<len(widths)> the output layer).")
flags.DEFINE_integer("annotate_every", 0, "Also write the loss every this many snapshots "
                     "(0: only at each run's last point).")
flags.DEFINE_string("out_dir", "runs/trajectory_pca", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

OUTPUTS = ("trajectories.npz", "runs.csv")
# Shared flags (experiments/common.py) this app has no use for: given on the command line they
# are refused rather than silently ignored, and they stay out of the fingerprint.
UNUSED_SHARED = ("log_every", "finder", "finder_steps", "finder_lr", "grad_tol", "flat_tol",
                 "eig_tol")
NOT_PROTOCOL = ("out_dir", "overwrite", "annotate_every") + UNUSED_SHARED


def layer_names(widths: tuple[int, ...]) -> list[str]:
    """Flax names of the MLP's dense layers: Dense_0 ... Dense_<len(widths)>."""
    return [f"Dense_{i}" for i in range(len(widths) + 1)]


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
    if FLAGS.train_steps == 0:
        errors.append("--train_steps=0: a trajectory needs at least one training step")
    if FLAGS.record_every < 1:
        errors.append(f"--record_every={FLAGS.record_every}: must be >= 1")
    elif FLAGS.train_steps >= 1 and FLAGS.record_every > FLAGS.train_steps:
        errors.append(f"--record_every={FLAGS.record_every}: must be <= --train_steps="
                      f"{FLAGS.train_steps} (otherwise only the end points are recorded)")
    if FLAGS.annotate_every < 0:
        errors.append(f"--annotate_every={FLAGS.annotate_every}: must be >= 0")
    try:
        names = layer_names(common.parse_widths(FLAGS.widths))
        if FLAGS.layer not in names:
            errors.append(f"--layer={FLAGS.layer!r}: not a layer of this MLP; allowed: "
                          f"{', '.join(names)}")
    except ValueError:
        pass  # already reported for --widths
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))



def run_trainings(problem):
    """All runs at once: snapshots (R, S, ...) in float64, steps (S,), loss and ‖∇L‖ (R, S)."""
    optimizer = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)
    dtype = jnp.float32 if FLAGS.train_dtype == "float32" else jnp.float64
    root = jax.random.PRNGKey(FLAGS.seed)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(FLAGS.num_runs))

    def one_run(key):
        params = cast_params(problem.init_fn(key), dtype)
        snaps = train_with_snapshots(problem.loss_fn, optimizer, params, FLAGS.train_steps,
                                     FLAGS.record_every)
        snaps = cast_params(snaps, jnp.float64)
        loss, grad = jax.vmap(jax.value_and_grad(problem.loss_fn))(snaps)
        return snaps, loss, jax.vmap(tree_norm)(grad)

    snaps, loss, gnorm = jax.jit(jax.vmap(one_run))(keys)
    steps = snapshot_steps(FLAGS.train_steps, FLAGS.record_every)
    return snaps, steps, np.asarray(loss), np.asarray(gnorm)


def pca_figure(model, layer, loss, steps, out_dir, title, layer_label):
    """Two panels (whole model, one layer): each run's PCA path, its start, end and loss."""
    from crit import plots  # matplotlib is loaded only when drawing (Agg backend)
    import matplotlib.pyplot as plt

    runs = loss.shape[0]
    cmap = plt.get_cmap("tab10" if runs <= 10 else "viridis")
    colours = [cmap(i if runs <= 10 else i / max(runs - 1, 1)) for i in range(runs)]
    fig, axes = plt.subplots(1, 2, figsize=(11.5, 4.8))
    for ax, pca, label in ((axes[0], model, "whole model"), (axes[1], layer, layer_label)):
        coords = np.asarray(pca.coords)
        evr = np.asarray(pca.explained_variance_ratio)
        for i in range(runs):
            xy = coords[i]
            ax.plot(xy[:, 0], xy[:, 1], "-", color=colours[i], lw=1.0, alpha=0.8)
            ax.plot(xy[:, 0], xy[:, 1], ".", color=colours[i], ms=4)
            ax.plot(xy[0, 0], xy[0, 1], "o", mfc="none", color=colours[i], ms=7)
            ax.plot(xy[-1, 0], xy[-1, 1], "*", color=colours[i], ms=11,
                    label=f"run {i}: final loss {loss[i, -1]:.2g}")
            marks = [len(steps) - 1]
            if FLAGS.annotate_every:
                marks = sorted(set(range(0, len(steps), FLAGS.annotate_every)) | set(marks))
            for s in marks:
                ax.annotate(f"{loss[i, s]:.2g}", xy[s], xytext=(4, 4), textcoords="offset points",
                            fontsize=7, color=colours[i])
        ax.set_xlabel(f"PC1 ({100 * evr[0]:.1f}% of variance)")
        ax.set_ylabel(f"PC2 ({100 * evr[1]:.1f}% of variance)" if evr.size > 1 else "PC2")
        ax.set_title(f"{label}: {coords.shape[0]} runs × {coords.shape[1]} snapshots", fontsize=10)
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(runs, 4), fontsize=7,
               title="○ start, ★ end (loss written at the end)", title_fontsize=7,
               bbox_to_anchor=(0.5, -0.02 - 0.035 * ((runs - 1) // 4)))
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.08 + 0.035 * ((runs - 1) // 4), 1, 1))
    return plots.save_figure(fig, out_dir, "trajectory_pca")


def run_config(problem) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol.update(problem=problem.name, loss=problem.loss_name)
    return {"experiment": "trajectory_pca", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "environment": common.environment()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    problem = common.problem_from_flags()
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(problem), OUTPUTS)
    print(f"{problem.name}: P = {problem.n_params}; {FLAGS.num_runs} runs × "
          f"{FLAGS.train_steps} {FLAGS.optimizer} steps, snapshot every {FLAGS.record_every}")
    snaps, steps, loss, gnorm = run_trainings(problem)
    whole, layer, flat = jax.tree.map(np.asarray, jax.jit(lambda s: (
        landscape.trajectory_pca(s, 2), landscape.trajectory_pca(s, 2, leaf_filter=FLAGS.layer),
        jax.vmap(jax.vmap(lambda t: ravel_pytree(t)[0]))(s)))(snaps))
    layer_size = int(np.asarray(layer.mean).size)
    store.atomic_save_npz(out_dir / "trajectories.npz", {
        "step": steps, "loss": loss, "grad_norm": gnorm, "params": flat,
        "coords_model": np.asarray(whole.coords), "coords_layer": np.asarray(layer.coords),
        "explained_variance_ratio_model": np.asarray(whole.explained_variance_ratio),
        "explained_variance_ratio_layer": np.asarray(layer.explained_variance_ratio),
        "components_model": np.asarray(whole.components),
        "components_layer": np.asarray(layer.components), "layer": np.array(FLAGS.layer)})
    store.write_csv(out_dir / "runs.csv", {
        "run": np.arange(FLAGS.num_runs), "initial_loss": loss[:, 0], "final_loss": loss[:, -1],
        "final_grad_norm": gnorm[:, -1]})
    pca_figure(whole, layer, loss, steps, out_dir,
               f"{problem.name}, P = {problem.n_params}: PCA of parameter snapshots "
               f"(every {FLAGS.record_every} {FLAGS.optimizer} steps)",
               f"layer {FLAGS.layer} ({layer_size} parameters)")
    print(f"final loss: median {np.median(loss[:, -1]):.3g}, range [{loss[:, -1].min():.3g}, "
          f"{loss[:, -1].max():.3g}]; explained variance (PC1, PC2): model "
          f"{np.round(np.asarray(whole.explained_variance_ratio), 3)}, {FLAGS.layer} "
          f"{np.round(np.asarray(layer.explained_variance_ratio), 3)}")
    print(f"wrote {out_dir}/trajectories.npz, runs.csv, trajectory_pca.png/.pdf")




if __name__ == "__main__":
    app.run(main)
