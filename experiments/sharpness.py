"""Sharpness, sensitivity and top Hessian eigenvalue against batch size (homework 1-3).

    python -m experiments.sharpness                                # batch 32, 64, 256, 1024
    python -m experiments.sharpness --batch_sizes=16,128,1024 --epsilon=5e-4 --num_runs=3

Protocol. For every batch size b and run i, a model starts from ``init_fn(fold_in(PRNGKey(seed),
i))`` (the same init for every b, so b is the only difference) and is trained ``--epochs`` epochs
of mini-batch ``--optimizer`` steps on batches of b (a fresh permutation every epoch; the runs of
one b are vmapped). A model with BatchNorm trains its running statistics with the weights
(``crit.train.train_model``, ⌊n/b⌋ steps per epoch) and every measurement below is of
L(θ; state) with the trained state fixed, under ``--batchnorm``. At each solution θ:

* ε-sharpness (Keskar et al. 2017): 100·max_{z∈C_ε} [L(θ + z) − L(θ)] / (1 + L(θ)) on the full
  training loss, by ``crit.landscape.epsilon_sharpness`` (random starts + projected ascent: a
  lower bound on the maximum);
* input sensitivity (Novak et al. 2018): the mean over the *test* points of ‖∂f(x)/∂x‖_F, with f
  the class probabilities (softmax of the logits) for classification and the raw output for
  regression (``crit.landscape.input_sensitivity``);
* top Hessian eigenvalue λ_max of the full-batch training loss: exact (``eigvalsh`` of the dense
  symmetrized Hessian, built column by column from Hessian-vector products) when P ≤
  ``--dense_max_params``, else the largest Ritz value of ``--lanczos_steps`` steps of Lanczos on
  HVPs (``crit.lanczos.extremal_eigenpairs``), with its residual estimate ``lambda_max_residual``:
  an eigenvalue lies within it. Lanczos gives the algebraically largest eigenvalue also where
  the most negative one is larger in magnitude (power iteration would return that one). The
  method is stored per row.

Writes to ``--out_dir``: config.json, sharpness.csv (one row per model), sharpness.npz (the same
columns, plus the full spectra when dense), sharpness.png/.pdf.
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from experiments import common, model_flags  # noqa: F401  (--model, --data_file)
from crit import landscape, store
from crit.hessian import hvp_operator, symmetrize
from crit.lanczos import extremal_eigenpairs
from crit.train import cast_params, make_optimizer, minibatch_train, train_model, tree_norm

FLAGS = flags.FLAGS
TRAINS_STATE = True  # trains BatchNorm statistics with the weights (experiments/model_flags)
flags.DEFINE_string("batch_sizes", "32,64,256,1024", "Comma-separated batch sizes to compare.")
flags.DEFINE_integer("epochs", 50, "Training epochs per model (--train_steps does not apply).")
flags.DEFINE_integer("num_runs", 2, "Runs per batch size (vmapped); run i uses init "
                     "fold_in(PRNGKey(seed), i) for every batch size.")
flags.DEFINE_integer("seed", 0, "Root seed.")
flags.DEFINE_float("epsilon", 1e-3, "ε of the ε-sharpness (relative box half-width / ball radius).")
flags.DEFINE_enum("constraint", "box", ["box", "ball"], "ε-sharpness constraint set: Keskar's "
                  "box |z_i| <= ε(|θ_i| + 1), or the scaled ball.")
flags.DEFINE_integer("sharpness_samples", 16, "Random starts of the ε-sharpness search.")
flags.DEFINE_integer("ascent_steps", 20, "Projected ascent steps per start.")
flags.DEFINE_integer("dense_max_params", 5000, "Largest P for the exact dense Hessian; above it "
                     "λ_max comes from Lanczos on Hessian-vector products.")
flags.DEFINE_integer("lanczos_steps", 100, "Lanczos steps (one Hessian-vector product each) for "
                     "λ_max when P > --dense_max_params.")
flags.DEFINE_integer("vmap_width", 256, "Test points / random starts / Hessian columns vmapped "
                     "together (bounds memory). In the fingerprint: XLA rounds a batch of another "
                     "width differently, so another width changes the last bits.")
flags.DEFINE_string("out_dir", "runs/sharpness", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

FLAGS.set_default("dataset", "digits")
FLAGS.set_default("widths", "16")  # P = 1210: the dense Hessian of every model stays cheap
FLAGS.set_default("n_points", 1437)

OUTPUTS = ("sharpness.csv", "sharpness.npz")
# Shared flags (experiments/common.py) this app has no use for: given on the command line they
# are refused rather than silently ignored, and they stay out of the fingerprint.
UNUSED_SHARED = ("train_steps", "log_every", "finder", "finder_steps", "finder_lr", "grad_tol",
                 "flat_tol", "eig_tol")
NOT_PROTOCOL = ("out_dir", "overwrite") + UNUSED_SHARED
COLUMNS = ("batch_size", "run", "steps", "train_loss", "test_loss", "train_acc", "test_acc",
           "grad_norm", "sharpness", "sharpness_increase", "sensitivity", "lambda_max",
           "lambda_max_residual",
           "hessian_method")


def parse_batch_sizes(text: str) -> list[int]:
    """'32,64' -> [32, 64]; raises ValueError naming --batch_sizes."""
    try:
        sizes = [int(v) for v in text.split(",")]
    except ValueError:
        raise ValueError(f"--batch_sizes={text!r}: expected comma-separated positive integers, "
                         "e.g. '32,64,256,1024'") from None
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"--batch_sizes={text!r}: every batch size must be >= 1")
    if len(set(sizes)) != len(sizes):
        raise ValueError(f"--batch_sizes={text!r}: repeated batch size")
    return sorted(sizes)


def unused_flag_errors() -> list[str]:
    """One message per shared flag of :data:`UNUSED_SHARED` given on the command line."""
    hints = {"train_steps": "mini-batch training counts --epochs"}
    return [f"--{name}: does not apply to this app ({hints.get(name, 'it would be ignored')})"
            for name in UNUSED_SHARED if FLAGS[name].present]


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors()
    errors += unused_flag_errors()
    try:
        sizes = parse_batch_sizes(FLAGS.batch_sizes)
        too_big = [s for s in sizes if s > FLAGS.n_points]
        if too_big and FLAGS.n_points >= 1:
            errors.append(f"--batch_sizes={FLAGS.batch_sizes!r}: {too_big} larger than the "
                          f"training set (--n_points={FLAGS.n_points})")
    except ValueError as exc:
        errors.append(str(exc))
    for name, low in (("epochs", 1), ("num_runs", 1), ("sharpness_samples", 1),
                      ("ascent_steps", 0), ("dense_max_params", 1), ("lanczos_steps", 1),
                      ("vmap_width", 1)):
        if getattr(FLAGS, name) < low:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if not (math.isfinite(FLAGS.epsilon) and FLAGS.epsilon > 0):
        errors.append(f"--epsilon={FLAGS.epsilon}: must be a finite number > 0")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))



def hessian_or_lanczos(loss_fn, params, key, dense: bool, width: int, lanczos_steps: int):
    """Dense: ``{"hessian": H}``, the symmetrized Hessian (P, P) (its ``eigvalsh`` is taken in
    NumPy, which on CPU is much faster than XLA's). Otherwise ``{"lambda_max": θ, "lambda_max_
    residual": ρ}``: the largest Ritz value of a Lanczos run on HVPs from a Gaussian start and its
    residual estimate |β s_last| (an eigenvalue of H lies within ρ of θ)."""
    _, matvec = hvp_operator(loss_fn, params)
    p = ravel_pytree(params)[0].size
    if dense:
        eye = jnp.eye(p, dtype=jnp.float64)
        return {"hessian": symmetrize(landscape.chunked_vmap(matvec, eye, width))}  # rows H e_i
    v0 = jax.random.normal(key, (p,), jnp.float64)
    top = extremal_eigenpairs(matvec, v0, lanczos_steps, 1).largest
    return {"lambda_max": top.values[0], "lambda_max_residual": top.residual_estimates[0]}


def analyse(problem, dense: bool):
    """θ -> the per-model measurements (one model; vmapped over runs by the caller)."""
    d = problem.dataset
    xtr, ytr, xte, yte = (jnp.asarray(a) for a in (d.x_train, d.y_train, d.x_test, d.y_test))
    classification = d.task == "classification"

    def one(params, state, key):
        # a model's state (BatchNorm statistics) is fixed at its trained value: every loss
        # below is L(θ; state) under the problem's --batchnorm semantics
        loss_fn = problem.bind_state(state)

        def output(p, xn):
            out = problem.apply_fn(p, xn, state)
            return jax.nn.softmax(out) if classification else out

        loss, grad = jax.value_and_grad(loss_fn)(params)
        sharp = landscape.epsilon_sharpness(
            loss_fn, params, jax.random.fold_in(key, 0), FLAGS.epsilon,
            FLAGS.sharpness_samples, FLAGS.ascent_steps, constraint=FLAGS.constraint,
            chunk_size=FLAGS.vmap_width)
        sens = landscape.input_sensitivity(output, params, xte, FLAGS.vmap_width)
        curvature = hessian_or_lanczos(loss_fn, params, jax.random.fold_in(key, 1),
                                       dense, FLAGS.vmap_width, FLAGS.lanczos_steps)
        acc = lambda x_, y_: (jnp.mean(jnp.argmax(problem.apply_fn(params, x_, state), -1)
                                       == y_) if classification else jnp.nan)
        out = dict(train_loss=loss, test_loss=problem.batch_loss_fn(params, xte, yte, state),
                   train_acc=acc(xtr, ytr), test_acc=acc(xte, yte), grad_norm=tree_norm(grad),
                   sharpness=sharp.relative, sharpness_increase=sharp.increase,
                   sensitivity=sens)
        return out | curvature

    return one


def sharpness_figure(rows: dict, out_dir: Path, title: str):
    """Four panels against batch size: losses, ε-sharpness, sensitivity, λ_max (dots: runs)."""
    from crit import plots  # matplotlib is loaded only when drawing (Agg backend)
    import matplotlib.pyplot as plt

    b = rows["batch_size"]
    sizes = np.unique(b)
    fig, axes = plt.subplots(2, 2, figsize=(9.6, 7.0), sharex=True)
    panels = ((axes[0, 0], ("train_loss", "test_loss"), "loss"),
              (axes[0, 1], ("sharpness",), f"ε-sharpness, % (ε = {FLAGS.epsilon:g}, "
                                          f"{FLAGS.constraint})"),
              (axes[1, 0], ("sensitivity",), "input sensitivity  mean ‖∂f/∂x‖_F (test)"),
              (axes[1, 1], ("lambda_max",), f"top Hessian eigenvalue ({rows['hessian_method'][0]})"))
    for ax, keys, label in panels:
        for key, colour in zip(keys, ("tab:blue", "tab:orange")):
            v = rows[key].astype(float)
            mean = np.array([v[b == s].mean() for s in sizes])
            ax.plot(b, v, "o", color=colour, alpha=0.4, ms=4)
            ax.plot(sizes, mean, "-o", color=colour, label=key.replace("_", " "))
        ax.set_ylabel(label, fontsize=8)
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([str(s) for s in sizes])
        ax.grid(alpha=0.3)
        if len(keys) > 1:
            ax.legend(fontsize=8)
    if np.isfinite(rows["test_acc"].astype(float)).all():
        twin = axes[0, 0].twinx()
        acc = rows["test_acc"].astype(float)
        twin.plot(sizes, [acc[b == s].mean() for s in sizes], "--s", color="tab:green", ms=4)
        twin.set_ylabel("test accuracy (green)", color="tab:green", fontsize=8)
        twin.tick_params(axis="y", colors="tab:green")
    for ax in axes[1]:
        ax.set_xlabel("batch size")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, "sharpness")


def run_config(problem) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol.update(problem=problem.name, loss=problem.loss_name)
    return {"experiment": "sharpness", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "n_train": problem.dataset.n_train,
            "environment": common.environment()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    problem = common.problem_from_flags()
    out_dir = Path(FLAGS.out_dir)
    dense = problem.n_params <= FLAGS.dense_max_params
    if dense and FLAGS["lanczos_steps"].present:
        raise app.UsageError(f"--lanczos_steps: does not apply: P = {problem.n_params} <= "
                             f"--dense_max_params={FLAGS.dense_max_params}, so λ_max is exact "
                             "(it would be ignored)")
    common.prepare_out_dir(out_dir, run_config(problem), OUTPUTS)
    sizes = parse_batch_sizes(FLAGS.batch_sizes)
    method = "dense" if dense else f"lanczos{FLAGS.lanczos_steps}"
    n = problem.dataset.n_train
    print(f"{problem.name}: P = {problem.n_params}, n = {n}; batch sizes {sizes}, "
          f"{FLAGS.num_runs} runs each, {FLAGS.epochs} epochs of {FLAGS.optimizer}; λ_max {method}")

    x, y = jnp.asarray(problem.dataset.x_train), jnp.asarray(problem.dataset.y_train)
    optimizer = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)
    dtype = jnp.float32 if FLAGS.train_dtype == "float32" else jnp.float64
    root = jax.random.PRNGKey(FLAGS.seed)
    measure = jax.jit(jax.vmap(analyse(problem, dense)))
    records: dict[str, list] = {}
    for b in sizes:
        def run(i, b=b):
            init_key = jax.random.fold_in(root, i)
            params = cast_params(problem.init_fn(init_key), dtype)
            order_key = jax.random.fold_in(jax.random.fold_in(init_key, 1), b)
            if problem.has_state:  # BatchNorm: its running statistics train with the weights
                state = problem.init_state_fn(init_key)
                steps = FLAGS.epochs * (n // b)
                trained, state, _ = train_model(problem, optimizer, params, state, order_key,
                                                steps, log_every=steps, batch_size=b)
            else:
                state = {}
                trained = minibatch_train(problem.batch_loss_fn, optimizer, params, x, y,
                                          order_key, b, FLAGS.epochs)
            return (cast_params(trained, jnp.float64), cast_params(state, jnp.float64),
                    jax.random.fold_in(jax.random.fold_in(init_key, 2), b))

        params, states, keys = jax.jit(jax.vmap(run))(jnp.arange(FLAGS.num_runs))
        out = {k: np.asarray(v) for k, v in measure(params, states, keys).items()}
        if dense:
            # one eigvalsh per run (NumPy's stacked call was several times slower here)
            out["eigenvalues"] = np.stack([np.linalg.eigvalsh(h) for h in out.pop("hessian")])
            out["lambda_max"] = out["eigenvalues"][:, -1]
            out["lambda_max_residual"] = np.full(FLAGS.num_runs, np.nan)  # exact: no residual
        out.update(batch_size=np.full(FLAGS.num_runs, b), run=np.arange(FLAGS.num_runs),
                   steps=np.full(FLAGS.num_runs, FLAGS.epochs * (n // b)),
                   hessian_method=np.array([method] * FLAGS.num_runs))
        for k, v in out.items():
            records.setdefault(k, []).append(v)
        print(f"batch {b:5d}: test acc {np.round(out['test_acc'], 4)}, sharpness "
              f"{np.round(out['sharpness'], 4)}, sensitivity {np.round(out['sensitivity'], 3)}, "
              f"λ_max {np.round(out['lambda_max'], 3)}")
    rows = {k: np.concatenate(v) for k, v in records.items()}
    store.write_csv(out_dir / "sharpness.csv", {c: rows[c] for c in COLUMNS})
    store.atomic_save_npz(out_dir / "sharpness.npz", {
        **rows, "epsilon": np.asarray(FLAGS.epsilon), "constraint": np.array(FLAGS.constraint)})
    sharpness_figure(rows, out_dir, f"{problem.name}, P = {problem.n_params}, {FLAGS.epochs} "
                     f"epochs of {FLAGS.optimizer} (lr {FLAGS.learning_rate:g}), "
                     f"{FLAGS.num_runs} runs per batch size")
    print(f"wrote {out_dir}/sharpness.csv, sharpness.npz, sharpness.png/.pdf")


if __name__ == "__main__":
    app.run(main)
