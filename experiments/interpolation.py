"""Loss along straight lines in parameter space (Goodfellow et al. 2015; homework 1-3).

    python -m experiments.interpolation                       # 64-32-10 tanh MLP on digits
    python -m experiments.interpolation --zoom=0.95,1.05 --zoom_points=801 --out_dir=runs/interp

Protocol. Runs i = 0 .. num_runs−1 start from ``init_fn(fold_in(PRNGKey(seed), i))`` and are
trained with mini-batch ``--optimizer`` steps on batches of ``--small_batch`` drawn by a fresh
permutation of the training set every epoch (``lax.scan`` over the batches, all runs vmapped;
a snapshot of θ every ``--record_every`` steps). A large-batch model starts from run 0's
initialization and is trained the same number of epochs with ``--large_batch``. Lines
θ(α) = (1 − α) θ_a + α θ_b are then evaluated, all in one vmapped call, for

* init → solution (θ_a = θ0_i, θ_b = θ*_i), α over ``--alpha_range``,
* solution 0 → solution i (different inits), α over ``--alpha_range``,
* small-batch → large-batch solution (θ_a = θ*_0, θ_b = θ*_large), α over ``--batch_alpha_range``,

with train and test loss (and accuracy on classification data), plus a high-resolution view of
every line on ``--zoom``. A model with BatchNorm trains its running statistics with the weights
(``crit.train.train_model``), and a line moves both: (θ(α), s(α)) with s(α) = (1 − α) s_a + α s_b
the running statistics at the same α (an init's are the initial mean 0 and variance 1), so the
loss along it is L(θ(α); s(α)) under ``--batchnorm=eval``; with ``--batchnorm=batch`` every
evaluation batch uses its own statistics and s plays no part. The trajectory view projects each run's snapshots on the line θ0 → θ*:
x = (θ_t − θ0)·u, y = ‖θ_t − θ0 − x u‖, u = (θ* − θ0)/‖θ* − θ0‖.

Writes to ``--out_dir``: config.json, lines.npz, lines.csv (one row per line: end points and the
barrier max_{α∈[0,1]} L(θ(α)) − [(1 − α) L(θ_a) + α L(θ_b)]), models.csv (one row per trained
model), projection.npz, and the figures interpolation, interpolation_zoom and
trajectory_projection (.png and .pdf).
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common, model_flags  # noqa: F401  (--model, --data_file)
from crit import landscape, store
from crit.train import (cast_params, log_steps, make_optimizer, minibatch_train, snapshot_steps,
                        train_model)

FLAGS = flags.FLAGS
TRAINS_STATE = True  # trains BatchNorm statistics with the weights (experiments/model_flags)
flags.DEFINE_integer("num_runs", 3, "Small-batch runs from different inits (>= 2: lines between "
                     "solutions need two); run i uses init fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("seed", 0, "Root seed of the initializations and batch orders.")
flags.DEFINE_integer("epochs", 50, "Training epochs for every model (mini-batch training counts "
                     "epochs; --train_steps does not apply here).")
flags.DEFINE_integer("small_batch", 64, "Batch size of the runs.")
flags.DEFINE_integer("large_batch", 1024, "Batch size of the large-batch model (init of run 0).")
flags.DEFINE_integer("record_every", 10, "Snapshot θ every this many steps of the small-batch "
                     "runs, for the trajectory view.")
flags.DEFINE_string("alpha_range", "-0.5,2", "α range 'lo,hi' of the init→solution and "
                    "solution→solution lines.")
flags.DEFINE_string("batch_alpha_range", "-1,2", "α range 'lo,hi' of the small→large-batch line.")
flags.DEFINE_integer("num_alphas", 151, "α values per line.")
flags.DEFINE_string("zoom", "0.9,1.1", "α range 'lo,hi' of the high-resolution view.")
flags.DEFINE_integer("zoom_points", 401, "α values of the high-resolution view.")
flags.DEFINE_integer("vmap_width", 0, "α values of a line vmapped together (0: all; bounds "
                     "memory). In the fingerprint: XLA rounds a batch of another width "
                     "differently, so another width changes the last bits.")
flags.DEFINE_string("out_dir", "runs/interpolation", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

# Homework 1-3 setting: a small MLP on the digits set (batches of 1024 need >= 1024 points).
FLAGS.set_default("dataset", "digits")
FLAGS.set_default("widths", "32")
FLAGS.set_default("n_points", 1437)

OUTPUTS = ("lines.npz", "lines.csv", "models.csv", "projection.npz")
# Shared flags (experiments/common.py) this app has no use for: given on the command line they
# are refused rather than silently ignored, and they stay out of the fingerprint.
UNUSED_SHARED = ("train_steps", "log_every", "finder", "finder_steps", "finder_lr", "grad_tol",
                 "flat_tol", "eig_tol")
NOT_PROTOCOL = ("out_dir", "overwrite") + UNUSED_SHARED


def parse_range(name: str, errors: list[str]) -> tuple[float, float] | None:
    """'lo,hi' -> (lo, hi) with lo < hi, both finite; appends a message naming --name if not."""
    text = getattr(FLAGS, name)
    try:
        lo, hi = (float(v) for v in text.split(","))
    except ValueError:
        errors.append(f"--{name}={text!r}: expected two numbers 'lo,hi', e.g. '-0.5,2'")
        return None
    if not (np.isfinite(lo) and np.isfinite(hi) and lo < hi):
        errors.append(f"--{name}={text!r}: need finite lo < hi")
        return None
    return lo, hi


def unused_flag_errors() -> list[str]:
    """One message per shared flag of :data:`UNUSED_SHARED` given on the command line."""
    hints = {"train_steps": "mini-batch training counts --epochs"}
    return [f"--{name}: does not apply to this app ({hints.get(name, 'it would be ignored')})"
            for name in UNUSED_SHARED if FLAGS[name].present]


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors()
    errors += unused_flag_errors()
    for name in ("alpha_range", "batch_alpha_range", "zoom"):
        parse_range(name, errors)
    for name, low in (("num_runs", 2), ("epochs", 1), ("small_batch", 1), ("large_batch", 1),
                      ("record_every", 1), ("num_alphas", 2), ("zoom_points", 2),
                      ("vmap_width", 0)):
        if getattr(FLAGS, name) < low:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    for name in ("small_batch", "large_batch"):
        if getattr(FLAGS, name) > FLAGS.n_points >= 1:
            errors.append(f"--{name}={getattr(FLAGS, name)}: larger than the training set "
                          f"(--n_points={FLAGS.n_points})")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


# ----------------------------------------------------------------------------- training



def train_models(problem):
    """Inits, small-batch solutions (with snapshots) and the large-batch solution, float64."""
    data = problem.dataset
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)
    optimizer = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)
    dtype = jnp.float32 if FLAGS.train_dtype == "float32" else jnp.float64
    root = jax.random.PRNGKey(FLAGS.seed)
    to64 = lambda t: cast_params(t, jnp.float64)

    def run(i, batch_size, record_every):
        """(init, trained) models, each a pair (params, state); with ``record_every`` the
        trained one comes with its snapshots, (model, (params, state) stacked)."""
        init_key = jax.random.fold_in(root, i)
        theta0 = problem.init_fn(init_key)
        order_key = jax.random.fold_in(jax.random.fold_in(init_key, 1), batch_size)
        start = cast_params(theta0, dtype)
        if not problem.has_state:
            out = minibatch_train(problem.batch_loss_fn, optimizer, start, x, y, order_key,
                                  batch_size, FLAGS.epochs, record_every)
            out = (to64(out), {}) if not record_every else ((to64(out[0]), {}),
                                                             (to64(out[1]), {}))
            return (theta0, {}), out
        # BatchNorm: the running statistics train with the weights, in the same batches
        state0 = problem.init_state_fn(init_key)
        steps = FLAGS.epochs * (x.shape[0] // batch_size)
        trained = train_model(problem, optimizer, start, state0, order_key, steps,
                              log_every=record_every or steps, batch_size=batch_size,
                              keep_snapshots=True)
        model = (to64(trained[0]), to64(trained[1]))
        snaps = jax.tree.map(to64, trained[3])
        return (theta0, state0), (model, snaps) if record_every else model

    @jax.jit
    def all_models():
        small = jax.vmap(lambda i: run(i, FLAGS.small_batch, FLAGS.record_every))
        theta0, (theta_star, snaps) = small(jnp.arange(FLAGS.num_runs))
        return theta0, theta_star, snaps, run(0, FLAGS.large_batch, 0)[1]

    return all_models()


# ----------------------------------------------------------------------------- lines


def metric_fn(problem):
    """(θ, state) -> {train_loss, test_loss[, train_acc, test_acc]} on the full train and test
    sets (state: BatchNorm statistics, ``{}`` for a model without)."""
    d = problem.dataset
    xtr, ytr, xte, yte = (jnp.asarray(a) for a in (d.x_train, d.y_train, d.x_test, d.y_test))

    def metrics(model):
        params, state = model
        out = {"train_loss": problem.batch_loss_fn(params, xtr, ytr, state),
               "test_loss": problem.batch_loss_fn(params, xte, yte, state)}
        if d.task == "classification":
            acc = lambda x_, y_: jnp.mean(jnp.argmax(problem.apply_fn(params, x_, state), -1)
                                          == y_)
            out["train_acc"] = acc(xtr, ytr)
            out["test_acc"] = acc(xte, yte)
        return out

    return metrics


def take(tree, i):
    return jax.tree.map(lambda a: a[i], tree)


def stack(trees):
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def line_labels() -> list[tuple[str, str, tuple, tuple]]:
    """(name, kind, end a, end b) of every line in storage order; an end is (model, index) with
    model 'init', 'solution' (small-batch runs) or 'large' (the large-batch model)."""
    runs = FLAGS.num_runs
    labels = [(f"init {i} -> solution {i}", "init_to_solution", ("init", i), ("solution", i))
              for i in range(runs)]
    labels += [(f"solution 0 -> solution {i}", "solution_to_solution", ("solution", 0),
                ("solution", i)) for i in range(1, runs)]
    labels.append((f"batch {FLAGS.small_batch} -> batch {FLAGS.large_batch}",
                   "small_to_large_batch", ("solution", 0), ("large", 0)))
    return labels


def line_ends(theta0, theta_star, theta_large):
    """The end points of :func:`line_labels`' lines, stacked: (θ_a of every line, θ_b of every
    line), each a pytree with a leading axis of length L."""
    models = {"init": theta0, "solution": theta_star,
              "large": jax.tree.map(lambda x: x[None], theta_large)}
    pick = lambda end: take(models[end[0]], end[1])
    labels = line_labels()
    return stack([pick(a) for _, _, a, _ in labels]), stack([pick(b) for _, _, _, b in labels])


def analyse(problem, theta0, theta_star, snaps, theta_large, alphas, zoom):
    """Everything after training, in one jitted call: the lines (each on its own α row of
    ``alphas`` (L, A), then on the common ``zoom`` grid), the metrics of the models and of the
    lines' end points, and the trajectory projections and snapshot losses of the runs."""
    metrics = metric_fn(problem)
    width = FLAGS.vmap_width or None
    theta_a, theta_b = line_ends(theta0, theta_star, theta_large)
    grid = jnp.concatenate([alphas, jnp.broadcast_to(zoom, (alphas.shape[0], zoom.size))], 1)
    line = lambda a, b, al: landscape.interpolate_metrics(metrics, a, b, al, width)
    both = jax.vmap(line)(theta_a, theta_b, grid)
    width = alphas.shape[1]
    models = jax.tree.map(lambda s, l: jnp.concatenate([s, l[None]]), theta_star, theta_large)
    ends = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), theta_a, theta_b)
    proj = jax.vmap(landscape.trajectory_projection)(snaps[0], theta0[0], theta_star[0])
    return dict(lines=jax.tree.map(lambda v: v[:, :width], both),
                zoom=jax.tree.map(lambda v: v[:, width:], both),
                models=jax.vmap(metrics)(models), ends=jax.vmap(metrics)(ends),
                proj_x=proj.x, proj_y=proj.y,
                snap_loss=jax.vmap(jax.vmap(problem.loss_fn))(*snaps))


def barrier(alpha: np.ndarray, loss: np.ndarray, loss_a: float, loss_b: float) -> float:
    """max over the grid's α ∈ [0, 1] of L(θ(α)) − [(1 − α) L(θ_a) + α L(θ_b)] (>= 0 at α = 0, 1)."""
    sel = (alpha >= 0) & (alpha <= 1)
    chord = (1 - alpha[sel]) * loss_a + alpha[sel] * loss_b
    return float(np.max(loss[sel] - chord)) if sel.any() else float("nan")


# ----------------------------------------------------------------------------- figures

KIND_TITLES = {"init_to_solution": "init θ0 → solution θ* (α = 0: init, 1: solution)",
               "solution_to_solution": "solution 0 → solution i (different inits)",
               "small_to_large_batch": "small-batch (α = 0) → large-batch (α = 1) solution"}


def lines_figure(names, kinds, alphas, res, out_dir, stem, title, log_loss=True):
    """One panel per kind of line: train (solid) and test (dashed) loss; accuracy on a twin axis
    for the batch line."""
    from crit import plots  # matplotlib is loaded only when drawing (Agg backend)
    import matplotlib.pyplot as plt

    order = [k for k in KIND_TITLES if k in set(kinds)]
    fig, axes = plt.subplots(1, len(order), figsize=(5.2 * len(order), 4.3))
    axes = np.atleast_1d(axes)
    for ax, kind in zip(axes, order):
        rows = [j for j, k in enumerate(kinds) if k == kind]
        for c, j in enumerate(rows):
            colour = plt.get_cmap("tab10")(c % 10)
            a = alphas[j] if alphas.ndim == 2 else alphas
            ax.plot(a, res["train_loss"][j], "-", color=colour, lw=1.3,
                    label=f"{names[j]}: train" if kind != "small_to_large_batch" else "train loss")
            ax.plot(a, res["test_loss"][j], "--", color=colour, lw=1.1,
                    label=f"{names[j]}: test" if kind != "small_to_large_batch" else "test loss")
            if kind == "small_to_large_batch" and "train_acc" in res:
                twin = ax.twinx()
                twin.plot(a, res["train_acc"][j], "-", color="tab:red", lw=1.1, label="train acc")
                twin.plot(a, res["test_acc"][j], "--", color="tab:red", lw=1.1, label="test acc")
                twin.set_ylabel("accuracy", color="tab:red")
                twin.tick_params(axis="y", colors="tab:red")
                twin.set_ylim(-0.02, 1.02)
                h1, l1 = ax.get_legend_handles_labels()
                h2, l2 = twin.get_legend_handles_labels()
                ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="center left")
        if log_loss and np.all(np.concatenate([res["train_loss"][rows].ravel(),
                                               res["test_loss"][rows].ravel()]) > 0):
            ax.set_yscale("log")
        if kind != "small_to_large_batch" or "train_acc" not in res:
            ax.legend(fontsize=6.5, loc="best")
        lo, hi = ax.get_xlim()
        for ref in (0.0, 1.0):
            if lo <= ref <= hi:
                ax.axvline(ref, color="gray", lw=0.7, ls=":")
        ax.set_xlabel("α in θ(α) = (1 − α) θ_a + α θ_b")
        ax.set_ylabel("loss")
        ax.set_title(KIND_TITLES[kind], fontsize=9)
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, stem)


def projection_figure(proj_x, proj_y, distance, snap_loss, out_dir, title):
    """Goodfellow's trajectory view: progress along θ0 → θ* against distance from that line."""
    from crit import plots  # matplotlib is loaded only when drawing (Agg backend)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.6))
    for i in range(proj_x.shape[0]):
        colour = plt.get_cmap("tab10")(i % 10)
        ax.plot(proj_x[i], proj_y[i], "-", color=colour, lw=1.2,
                label=f"run {i}: ‖θ* − θ0‖ = {distance[i]:.2f}, final loss {snap_loss[i, -1]:.2g}")
        ax.plot(proj_x[i, 0], proj_y[i, 0], "o", color=colour, mfc="none")
        ax.plot(proj_x[i, -1], proj_y[i, -1], "*", color=colour, ms=10)
        ax.plot([0, distance[i]], [0, 0], ":", color=colour, lw=1)
    ax.set_xlabel("x = (θ_t − θ0)·u,   u = (θ* − θ0)/‖θ* − θ0‖")
    ax.set_ylabel("y = ‖(θ_t − θ0) − x u‖  (distance from the line)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", title="○ init, ★ solution, dotted: straight line",
              title_fontsize=7)
    return plots.save_figure(fig, out_dir, "trajectory_projection")


# ----------------------------------------------------------------------------- app


def run_config(problem) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol.update(problem=problem.name, loss=problem.loss_name)
    return {"experiment": "interpolation", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "n_train": problem.dataset.n_train,
            "environment": common.environment()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    problem = common.problem_from_flags()
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(problem), OUTPUTS)
    n = problem.dataset.n_train
    small_steps = FLAGS.epochs * (n // FLAGS.small_batch)
    large_steps = FLAGS.epochs * (n // FLAGS.large_batch)
    print(f"{problem.name}: P = {problem.n_params}, n = {n}; {FLAGS.num_runs} runs with batch "
          f"{FLAGS.small_batch} ({small_steps} steps) and one with batch {FLAGS.large_batch} "
          f"({large_steps} steps), {FLAGS.epochs} epochs of {FLAGS.optimizer}")
    theta0, theta_star, snaps, theta_large = train_models(problem)

    labels = line_labels()
    names = [label[0] for label in labels]
    kinds = [label[1] for label in labels]
    ranges = {"init_to_solution": parse_range("alpha_range", []),
              "solution_to_solution": parse_range("alpha_range", []),
              "small_to_large_batch": parse_range("batch_alpha_range", [])}
    alphas = np.stack([np.linspace(*ranges[k], FLAGS.num_alphas) for k in kinds])
    zoom = np.linspace(*parse_range("zoom", []), FLAGS.zoom_points)
    out = jax.jit(lambda *a: analyse(problem, *a))(theta0, theta_star, snaps, theta_large,
                                                   alphas, zoom)
    out = jax.tree.map(np.asarray, out)
    res, zres, mres, ends = out["lines"], out["zoom"], out["models"], out["ends"]
    n_lines = len(labels)
    proj_x, proj_y, snap_loss = out["proj_x"], out["proj_y"], out["snap_loss"]
    steps = (np.asarray(log_steps(small_steps, FLAGS.record_every)) if problem.has_state
             else snapshot_steps(small_steps, FLAGS.record_every))
    distance = proj_x[:, -1]

    store.atomic_save_npz(out_dir / "lines.npz", {
        "name": np.array(names), "kind": np.array(kinds), "alpha": alphas,
        **{k: v for k, v in res.items()}, "zoom_alpha": zoom,
        **{f"zoom_{k}": v for k, v in zres.items()}})
    store.atomic_save_npz(out_dir / "projection.npz", {
        "step": steps, "x": proj_x, "y": proj_y, "distance": distance, "train_loss": snap_loss})
    line_rows = {"line": np.array(names), "kind": np.array(kinds),
                 "train_loss_a": ends["train_loss"][:n_lines],
                 "train_loss_b": ends["train_loss"][n_lines:],
                 "train_barrier": np.array([barrier(alphas[j], res["train_loss"][j],
                                                    ends["train_loss"][j],
                                                    ends["train_loss"][n_lines + j])
                                            for j in range(n_lines)]),
                 "test_loss_a": ends["test_loss"][:n_lines],
                 "test_loss_b": ends["test_loss"][n_lines:]}
    store.write_csv(out_dir / "lines.csv", line_rows)
    model_names = [f"run {i}" for i in range(FLAGS.num_runs)] + ["large batch"]
    store.write_csv(out_dir / "models.csv", {
        "model": np.array(model_names),
        "batch_size": np.array([FLAGS.small_batch] * FLAGS.num_runs + [FLAGS.large_batch]),
        "steps": np.array([small_steps] * FLAGS.num_runs + [large_steps]),
        **{k: v for k, v in mres.items()}})

    head = f"{problem.name}, P = {problem.n_params}, {FLAGS.epochs} epochs of {FLAGS.optimizer}"
    lines_figure(names, kinds, alphas, res, out_dir, "interpolation", head)
    lines_figure(names, kinds, zoom, zres, out_dir, "interpolation_zoom",
                 f"{head}: zoom on α ∈ [{zoom[0]:g}, {zoom[-1]:g}], {zoom.size} points",
                 log_loss=False)
    projection_figure(proj_x, proj_y, distance, snap_loss, out_dir,
                      f"{head}, batch {FLAGS.small_batch}: trajectory relative to the line θ0 → θ*")
    for name, row in zip(model_names, zip(*[mres[k] for k in mres])):
        print(f"{name}: " + ", ".join(f"{k} {v:.4g}" for k, v in zip(mres, row)))
    for j in range(n_lines):
        print(f"{names[j]}: train-loss barrier on [0, 1] = {line_rows['train_barrier'][j]:.3g}")
    print(f"wrote {out_dir}/lines.npz, lines.csv, models.csv, projection.npz and figures")


if __name__ == "__main__":
    app.run(main)
