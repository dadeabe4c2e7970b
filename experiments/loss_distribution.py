"""Distribution of final losses vs width (Choromanska et al. 2015): one hidden layer on digits.

    python -m experiments.loss_distribution                     # 25..500 units, 200 inits each
    python -m experiments.loss_distribution --optimizer=adam --learning_rate=1e-2 --epochs=30

Protocol (REFERENCES §6). Data: scikit-learn's 8×8 digits averaged over ``--downsample``² pixel
blocks (default 2: 4×4 images, 16 inputs), shuffled with --data_seed; the first --n_points images
train, the rest test (1437 / 360 by default). Model: 16-w-10 MLP (--activation, default relu),
softmax cross-entropy. For every width w of --widths_list, --num_inits inits (init i: key
fold_in(PRNGKey(seed), i), the same keys for every width) are trained by --optimizer on
mini-batches of --batch_size (a fresh permutation per epoch and init; 0 = full batch) for
--epochs epochs, in --train_dtype; final losses are then evaluated in float64 on the full train
and test sets. Inits run in groups of --vmap_width vmapped inits (``lax.map``), --chunk_size
inits per compiled call: every group is the same XLA program, so init i's numbers do not depend
on --chunk_size or --num_inits (a vmap as wide as the chunk would round them differently).

Reported per width: mean, std and quantiles of the final test loss
(crit.theory.loss_spread_table), the train–test loss correlation (Pearson and Spearman,
crit.theory.train_test_correlation), beside the trend Choromanska et al. report: as the width
grows the test losses move down and concentrate (the spread shrinks, poor runs vanish) and the
train–test correlation falls.

Writes to ``--out_dir``: config.json, results.csv (one row per width × init), spread.csv (one row
per width), loss_histograms.png/.pdf (overlaid histograms + trends), train_vs_test.png/.pdf.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from absl import app, flags

from experiments import common
from crit import store

FLAGS = flags.FLAGS
flags.DEFINE_string("widths_list", "25,50,100,250,500", "Hidden widths compared (comma "
                    "separated).")
flags.DEFINE_integer("num_inits", 200, "Random initializations per width.")
flags.DEFINE_integer("seed", 0, "Root seed; init i uses fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("downsample", 2, "Average digits over s×s pixel blocks (1, 2, 4 or 8).")
flags.DEFINE_integer("batch_size", 100, "Mini-batch size (0: full batch).")
flags.DEFINE_integer("epochs", 40, "Training epochs (passes over the training set).")
flags.DEFINE_integer("chunk_size", 0, "Inits per compiled call (0: all at once), rounded up to "
                     "a multiple of --vmap_width. Never changes results.")
flags.DEFINE_integer("vmap_width", 0, "Inits vmapped together; groups of this many run one "
                     "after another (0: min(--num_inits, 10)). Part of the fingerprint: XLA may "
                     "round a batched op differently at another width.")
flags.DEFINE_integer("bins", 40, "Histogram bins.")
flags.DEFINE_string("out_dir", "runs/loss_distribution", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

FLAGS.set_default("dataset", "digits")
FLAGS.set_default("n_points", 1437)
FLAGS.set_default("activation", "relu")
FLAGS.set_default("optimizer", "momentum")
FLAGS.set_default("learning_rate", 0.1)
FLAGS.set_default("train_dtype", "float32")

OUTPUTS = ("results.csv", "spread.csv")
# Flags of experiments.common that this app fixes, replaces or never reads.
NOT_APPLICABLE = {"widths": "use --widths_list", "train_steps": "use --epochs",
                  "dim_in": "digits has 16 (downsample 2) inputs",
                  "dim_out": "digits has 10 classes",
                  "log_every": "only final losses are recorded",
                  **{name: "no critical point is sought; final losses after training are "
                     "compared" for name in ("finder", "finder_steps", "finder_lr", "grad_tol",
                                             "flat_tol", "eig_tol")}}
NOT_PROTOCOL = ("out_dir", "overwrite", "chunk_size", "bins", *NOT_APPLICABLE)
CHOROMANSKA = ("Choromanska et al. (2015), 1 hidden layer of 25-500 units on 10×10 MNIST, SGD: "
               "the test-loss histogram moves down and narrows as the width grows (small nets "
               "have a tail of poor runs), and the train–test loss correlation falls.")


def parse_widths_list(text: str) -> list[int]:
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--widths_list={text!r}: expected comma-separated positive integers, "
                         "e.g. '25,50,100,250,500'") from None
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"--widths_list={text!r}: every width must be >= 1")
    if len(set(widths)) != len(widths):
        raise ValueError(f"--widths_list={text!r}: repeated width")
    return sorted(widths)


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    e = common.problem_errors()
    if FLAGS.dataset != "digits":
        e.append(f"--dataset={FLAGS.dataset}: this app uses the digits set (Choromanska et al. "
                 "use down-sampled MNIST)")
    if FLAGS.loss == "mse":
        e.append("--loss=mse: the digits set has class labels; use xent (or auto)")
    for name, why in NOT_APPLICABLE.items():
        if FLAGS[name].present:
            e.append(f"--{name}: does not apply to this app ({why})")
    try:
        parse_widths_list(FLAGS.widths_list)
    except ValueError as exc:
        e.append(str(exc))
    if FLAGS.downsample not in (1, 2, 4, 8):
        e.append(f"--downsample={FLAGS.downsample}: must be 1, 2, 4 or 8 (divides 8)")
    if FLAGS.num_inits < 3:
        e.append(f"--num_inits={FLAGS.num_inits}: must be >= 3 (a correlation needs 3 runs)")
    for name, low in (("epochs", 1), ("batch_size", 0), ("chunk_size", 0), ("vmap_width", 0),
                      ("bins", 2)):
        if getattr(FLAGS, name) < low:
            e.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if FLAGS.batch_size > FLAGS.n_points >= 1:
        e.append(f"--batch_size={FLAGS.batch_size}: larger than the training set "
                 f"(--n_points={FLAGS.n_points})")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        e.append(f"--out_dir={out}: is a file, not a directory")
    if e:
        raise app.UsageError("\n".join(e))


def vmap_width() -> int:
    """--vmap_width resolved; 0 means min(num_inits, 10): on CPU groups of 10 keep a group's
    activations in cache (crit.protocol makes the same choice for min_ratio)."""
    return FLAGS.vmap_width or min(FLAGS.num_inits, 10)


def problem_for(width: int):
    from crit.problems import mlp_problem

    return mlp_problem(dataset="digits", widths=(width,), activation=FLAGS.activation,
                       use_bias=FLAGS.use_bias, loss=None if FLAGS.loss == "auto" else FLAGS.loss,
                       l2=FLAGS.l2, n_points=FLAGS.n_points, data_seed=FLAGS.data_seed,
                       downsample=FLAGS.downsample)


def run_config(problems) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    first = next(iter(problems.values()))
    protocol.update(loss=first.loss_name, vmap_width=vmap_width())
    return {"experiment": "loss_distribution", "protocol": protocol, "flags": shared | own,
            "n_params": {str(w): p.n_params for w, p in problems.items()},
            "n_train": first.dataset.n_train, "n_test": int(first.dataset.x_test.shape[0]),
            "n_inputs": int(first.dataset.x_train.shape[1]),
            "environment": common.environment()}


def make_trainer(problem, width: int):
    """``init_ids -> dict of per-init final metrics`` with :func:`crit.train.minibatch_train`
    (batch order key: fold_in(init key, 1)): jit(lax.map(train one init, batch_size=width)),
    for a number of ids that is a multiple of ``width`` (every group the same program)."""
    import jax
    import jax.numpy as jnp
    from crit.train import cast_params, make_optimizer, minibatch_train

    d = problem.dataset
    dtype = jnp.float32 if FLAGS.train_dtype == "float32" else jnp.float64
    x = jnp.asarray(d.x_train, dtype)
    y = jnp.asarray(d.y_train)
    x_test, y_test = jnp.asarray(d.x_test), jnp.asarray(d.y_test)
    batch = FLAGS.batch_size or x.shape[0]
    opt = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)

    def one(i):
        key = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), i)
        params = cast_params(problem.init_fn(key), dtype)
        params = minibatch_train(problem.batch_loss_fn, opt, params, x, y,
                                 jax.random.fold_in(key, 1), batch, FLAGS.epochs)
        params = cast_params(params, jnp.float64)
        correct = lambda xs, ys: jnp.sum(jnp.argmax(problem.apply_fn(params, xs), -1) == ys)
        return dict(train_loss=problem.loss_fn(params),
                    test_loss=problem.batch_loss_fn(params, x_test, y_test),
                    train_correct=correct(jnp.asarray(d.x_train), jnp.asarray(d.y_train)),
                    test_correct=correct(x_test, y_test))

    return jax.jit(lambda ids: jax.lax.map(one, ids, batch_size=width))


def train_width(problem) -> dict:
    """All inits of one width, chunk by chunk (padding the last chunk with repeats)."""
    import jax
    import jax.numpy as jnp

    width = vmap_width()
    fn = make_trainer(problem, width)
    ids = np.arange(FLAGS.num_inits)
    chunk = FLAGS.chunk_size or FLAGS.num_inits
    chunk = -(-chunk // width) * width  # whole groups only: a short group is another program
    parts = []
    for start in range(0, FLAGS.num_inits, chunk):
        part = ids[start:start + chunk]
        padded = np.concatenate([part, np.full(chunk - len(part), part[-1])])
        out = jax.device_get(fn(jnp.asarray(padded)))
        parts.append({k: np.asarray(v)[:len(part)] for k, v in out.items()})
    out = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    # accuracies as count / n in numpy, correctly rounded (a float32 mean on the device stored
    # 51/600 as 0.0850000009, and XLA may divide by multiplying with 1/n)
    d = problem.dataset
    out["train_acc"] = out.pop("train_correct") / d.n_train
    out["test_acc"] = out.pop("test_correct") / len(d.y_test)
    return out


def figures(widths, results, table, corr, out_dir: Path, title: str):
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter, NullLocator
    from crit import plots

    colours = plt.cm.viridis(np.linspace(0.0, 0.9, len(widths)))
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(15.0, 4.2),
                                  gridspec_kw=dict(width_ratios=(1.6, 1, 1), wspace=0.3))
    finite = np.concatenate([r["test_loss"][np.isfinite(r["test_loss"])] for r in results])
    lo, hi = np.quantile(finite, [0.0, 0.995])
    bins = np.linspace(lo, hi, FLAGS.bins + 1)
    for w, r, col in zip(widths, results, colours):
        ok = np.isfinite(r["test_loss"])
        label = f"{w} units (n = {int(ok.sum())}"
        label += f", {int((~ok).sum())} diverged)" if (~ok).any() else ")"
        a.hist(np.clip(r["test_loss"][ok], lo, hi), bins=bins, histtype="stepfilled", alpha=0.35,
               color=col, label=label)
        a.hist(np.clip(r["test_loss"][ok], lo, hi), bins=bins, histtype="step", color=col, lw=1.2)
    a.set_xlabel("final test loss (cross-entropy; the top 0.5 % clipped into the last bin)")
    a.set_ylabel("runs")
    a.legend(fontsize=8)
    a.set_title("test-loss histograms per width", fontsize=10)
    m = np.array([table[w].mean for w in widths])
    q = {k: np.array([getattr(table[w], k) for w in widths]) for k in ("q05", "q25", "q50",
                                                                       "q75", "q95")}
    b.fill_between(widths, q["q05"], q["q95"], alpha=0.2, color="tab:blue", label="5–95 %")
    b.fill_between(widths, q["q25"], q["q75"], alpha=0.35, color="tab:blue", label="25–75 %")
    b.plot(widths, m, "o-", color="k", label="mean")
    b.plot(widths, q["q50"], "s--", color="tab:blue", ms=4, label="median")
    b.set_xlabel("hidden units")
    b.set_ylabel("final test loss")
    b.legend(fontsize=8)
    b.set_title("mean and spread vs width", fontsize=10)
    c.plot(widths, [corr[w].pearson for w in widths], "o-", label="Pearson r")
    c.plot(widths, [corr[w].spearman for w in widths], "s--", label="Spearman ρ")
    c.axhline(0, color="gray", lw=0.8)
    c.set_xlabel("hidden units")
    c.set_ylabel("corr(train loss, test loss) over inits")
    c.legend(fontsize=8)
    c.set_title("train–test correlation vs width", fontsize=10)
    for ax in (b, c):
        ax.set_xscale("log")
        ax.xaxis.set_minor_locator(NullLocator())
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xticks(widths, [str(w) for w in widths])
    for ax in (a, b, c):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=10)
    plots.save_figure(fig, out_dir, "loss_histograms")

    n = len(widths)
    fig, axes = plt.subplots(1, n, figsize=(3.2 * n, 3.2), squeeze=False)
    for ax, w, r, col in zip(axes[0], widths, results, colours):
        ax.plot(r["train_loss"], r["test_loss"], "o", ms=3, alpha=0.6, color=col)
        ax.set_title(f"{w} units: r = {corr[w].pearson:.2f}, ρ = {corr[w].spearman:.2f}",
                     fontsize=9)
        ax.set_xlabel("final train loss")
        ax.grid(alpha=0.3)
    axes[0, 0].set_ylabel("final test loss")
    fig.tight_layout()
    plots.save_figure(fig, out_dir, "train_vs_test")


def trend(values, widths) -> str:
    """'falls' / 'rises' / 'flat' from the sign of Spearman's ρ(width, value) (|ρ| ≥ 0.8)."""
    from scipy.stats import spearmanr

    rho = spearmanr(widths, values).statistic
    word = "falls" if rho <= -0.8 else "rises" if rho >= 0.8 else "no monotone trend"
    return f"{word} (Spearman ρ over widths {rho:+.2f})"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    common.set_matmul_precision()
    widths = parse_widths_list(FLAGS.widths_list)
    problems = {w: problem_for(w) for w in widths}
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(problems), OUTPUTS)
    from crit.theory import loss_spread_table, train_test_correlation

    d = problems[widths[0]].dataset
    batch = FLAGS.batch_size or d.n_train
    steps = FLAGS.epochs * (d.n_train // batch)
    print(f"digits {8 // FLAGS.downsample}×{8 // FLAGS.downsample} ({d.x_train.shape[1]} inputs), "
          f"{d.n_train} train / {d.x_test.shape[0]} test; widths {widths} (P = "
          f"{[problems[w].n_params for w in widths]}); {FLAGS.num_inits} inits each; "
          f"{FLAGS.optimizer} lr {FLAGS.learning_rate:g}, batch {batch}, {FLAGS.epochs} epochs "
          f"= {steps} steps, {FLAGS.train_dtype}", flush=True)
    results = []
    for w in widths:
        t0 = time.time()
        results.append(train_width(problems[w]))
        r = results[-1]
        print(f"  width {w:4d}: {time.time() - t0:6.1f} s; test loss median "
              f"{np.nanmedian(r['test_loss']):.4f}, test accuracy median "
              f"{np.nanmedian(r['test_acc']):.3f}", flush=True)

    table = loss_spread_table({w: r["test_loss"] for w, r in zip(widths, results)})
    train_table = loss_spread_table({w: r["train_loss"] for w, r in zip(widths, results)})
    corr = {w: train_test_correlation(r["train_loss"], r["test_loss"])
            for w, r in zip(widths, results)}
    n = FLAGS.num_inits
    store.write_csv(out_dir / "results.csv", {
        "width": np.repeat(widths, n), "init_id": np.tile(np.arange(n), len(widths)),
        "n_params": np.repeat([problems[w].n_params for w in widths], n),
        **{k: np.concatenate([r[k] for r in results])
           for k in ("train_loss", "test_loss", "train_acc", "test_acc")}})
    spread = {"width": np.array(widths),
              "n_params": np.array([problems[w].n_params for w in widths])}
    for field in ("n_runs", "n_diverged", "mean", "std", "q05", "q25", "q50", "q75", "q95"):
        spread[f"test_{field}" if field not in ("n_runs", "n_diverged") else field] = np.array(
            [getattr(table[w], field) for w in widths])
    spread["train_mean"] = np.array([train_table[w].mean for w in widths])
    spread["train_std"] = np.array([train_table[w].std for w in widths])
    for field in ("pearson", "pearson_pvalue", "spearman", "spearman_pvalue"):
        spread[field] = np.array([getattr(corr[w], field) for w in widths])
    store.write_csv(out_dir / "spread.csv", spread)
    figures(widths, results, table, corr, out_dir,
            f"digits {8 // FLAGS.downsample}×{8 // FLAGS.downsample}, one hidden "
            f"{FLAGS.activation} layer, {n} inits per width, {FLAGS.optimizer} lr "
            f"{FLAGS.learning_rate:g}, batch {batch}, {FLAGS.epochs} epochs")

    print(f"\n{'width':>6} {'P':>6} {'mean':>8} {'std':>8} {'q05':>8} {'q50':>8} {'q95':>8} "
          f"{'train':>8} {'Pearson':>8} {'Spearman':>8}   (final test loss; train = mean train "
          "loss)")
    for w in widths:
        t = table[w]
        print(f"{w:6d} {problems[w].n_params:6d} {t.mean:8.4f} {t.std:8.4f} {t.q05:8.4f} "
              f"{t.q50:8.4f} {t.q95:8.4f} {train_table[w].mean:8.4f} {corr[w].pearson:8.3f} "
              f"{corr[w].spearman:8.3f}" + (f"  ({t.n_diverged} diverged)" if t.n_diverged
                                            else ""))
    if len(widths) >= 3:
        print("measured, as the width grows:")
        print(f"  mean test loss      {trend([table[w].mean for w in widths], widths)}")
        print(f"  std of test loss    {trend([table[w].std for w in widths], widths)}")
        print(f"  5–95 % range        {trend([table[w].q95 - table[w].q05 for w in widths], widths)}")
        print(f"  Pearson(train,test) {trend([corr[w].pearson for w in widths], widths)}")
    print("reported: " + CHOROMANSKA)
    print(f"wrote {out_dir}/results.csv, spread.csv, loss_histograms.png/.pdf, "
          "train_vs_test.png/.pdf")


if __name__ == "__main__":
    app.run(main)
