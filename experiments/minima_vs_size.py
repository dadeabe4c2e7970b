"""The coin-flip argument tested: share of certified critical points that are minima vs size.

    python -m experiments.minima_vs_size                  # Gaussian data, 4 inputs, widths 1..32
    python -m experiments.minima_vs_size --widths_list=1,4,16,64,128,500 --num_inits=8 \\
        --out_dir=runs/minima_big          # P from 7 to 3001; each Newton step costs O(P³)

The lecture's heuristic (REFERENCES §1; Dauphin et al. 2014 §2): if the signs of the P Hessian
eigenvalues at a critical point were independent fair coins, a critical point would be a minimum
with probability 2^-P and its index would be Binomial(P, ½)/P. Protocol, per hidden width h of a
one-hidden-layer net on a small regression set (crit/saddles.py):

1. --num_inits inits (fold_in(PRNGKey(seed), i)), trained with --optimizer; θ recorded every
   --snapshot_every steps (step 0, the init itself, included), each snapshot also copied with
   Gaussian noise of each --noise_scales standard deviation;
2. from every start, in vmapped groups of --vmap_width: --prefind_steps of Adam on ½‖∇L‖²,
   then damped Newton on ∇L = 0, exact spectrum, certificate (critical iff ‖∇L‖ ≤ --grad_tol);
   every start keeps its status;
3. certified points merged up to hidden-unit permutations (and tanh sign flips);
4. a unique point is a minimum iff it has no eigenvalue below −τ (index 0 within tolerance,
   τ = max(P·ε·max|λ|, --eig_rtol·max|λ|)); minima with null eigenvalues (|λ| ≤ τ, where the
   second-order test is inconclusive) are counted separately.

The share of minima, over unique points and over certified starts, is drawn beside 2^-P on a log
axis with the index distribution per size beside the coin model's Binomial(P, ½)/P. Points are
not independent: every start comes from a snapshot of one of --num_inits trajectories, and
starts of one trajectory often refine to the same or related points. The 95% interval
(``cluster_lo``/``cluster_hi``) is therefore a cluster bootstrap over inits
(crit.theory.cluster_bootstrap_ratio, --bootstrap resamples, seeded by --seed): whole
trajectories are resampled, a unique point found from several inits split between them by its
starts. The Wilson interval (``wilson_iid_lo``/``wilson_iid_hi``) is kept beside it for
comparison; it assumes independent points and is too narrow when trajectories share points. A
share of 0 (or 1) gives a zero-width bootstrap interval; the figure then marks the Wilson bound
that counts each init with certified points once (``n_inits_certified``).

Writes to --out_dir: config.json, sizes.csv (one row per width), points.csv (one row per unique
certified point), starts.csv (one row per start, every status), spectra.npz, timing.txt
(wall seconds per width, which vary from run to run), and the figure
minima_vs_size (.png, .pdf).
"""

from __future__ import annotations

import os

# Small dense eigenproblems: a multi-threaded BLAS only adds contention (10-100x slower eigh on a
# busy 2-core machine, measured). Must be set before NumPy / JAX load their BLAS.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

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
flags.DEFINE_string("widths_list", "1,2,4,8,16,32", "Hidden widths h of the one-hidden-layer "
                    "nets, comma separated (P = h·(d_in + 1 + k) + k with biases).")
flags.DEFINE_integer("num_inits", 24, "Initializations per width.")
flags.DEFINE_integer("seed", 0, "Root seed; init i uses fold_in(PRNGKey(seed), i).")
flags.DEFINE_integer("snapshot_every", 2500, "Steps between trajectory snapshots (must divide "
                     "--train_steps); step 0 is the init.")
flags.DEFINE_string("noise_scales", "0", "Standard deviations of the Gaussian noise added to "
                    "each snapshot, comma separated (0 keeps the snapshot itself).")
flags.DEFINE_bool("reduced_nets", False, "Init i trains only its first (i mod (h+1)) hidden "
                  "units, the rest held at zero (adds the smaller nets' critical points). Needs "
                  "σ(0) = 0 (tanh, relu, linear); refused for sigmoid and softplus.")
flags.DEFINE_integer("prefind_steps", 200, "Adam steps on ½‖∇L‖² before Newton (0: Newton only).")
flags.DEFINE_float("prefind_lr", 1e-3, "Learning rate of the ½‖∇L‖² stage.")
flags.DEFINE_float("eig_rtol", 1e-7, "Null band: |λ| ≤ max(τ, eig_rtol·max|λ|) counts as zero.")
flags.DEFINE_integer("bootstrap", 2000, "Cluster-bootstrap resamples (over inits) of the "
                     "share of minima.")
flags.DEFINE_float("merge_rtol", 1e-5, "Relative tolerance of loss, spectrum and (aligned) "
                   "parameters below which two certified points are the same point.")
flags.DEFINE_integer("vmap_width", 8, "Starts vmapped together in the Newton stage "
                     "(crit.saddles.find_critical_points). Part of the protocol: XLA may round a "
                     "batched op differently at another width, and Newton can amplify that.")
flags.DEFINE_integer("chunk_size", 64, "Starts dispatched between progress reports (rounded up "
                     "to a multiple of --vmap_width). Never changes results: every start is "
                     "refined in a vmapped group of exactly --vmap_width starts.")
flags.DEFINE_string("out_dir", "runs/minima_vs_size", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

# Random regression data (Pennington & Bahri's setting): with 4 inputs the hidden units are not
# redundant, so trained nets sit near isolated critical points Newton can certify (on sinc, and
# on 2-D inputs, wide tanh nets train into long near-flat valleys and few starts certify).
FLAGS.set_default("dataset", "gaussian")
FLAGS.set_default("dim_in", 4)
FLAGS.set_default("n_points", 256)
FLAGS.set_default("l2", 1e-3)  # finite, non-degenerate critical points
FLAGS.set_default("train_steps", 10000)

OUTPUTS = ("sizes.csv", "points.csv", "starts.csv", "spectra.npz", "timing.txt")
NOT_PROTOCOL = ("out_dir", "overwrite", "chunk_size")
NOT_APPLICABLE = {"widths": "--widths_list", "log_every": None, "finder": None,
                  "finder_lr": "--prefind_lr", "train_dtype": None}
NEWTON_STEPS = 60
SIZE_COLUMNS = ("width", "n_params", "n_train", "phi", "n_starts", *STATUSES, "n_unique",
                "n_minima", "share_minima", "cluster_lo", "cluster_hi", "wilson_iid_lo",
                "wilson_iid_hi", "n_inits_certified", "n_minima_with_null", "n_strict_minima",
                "n_certified_minima_starts", "share_minima_starts", "cluster_starts_lo",
                "cluster_starts_hi", "wilson_starts_iid_lo", "wilson_starts_iid_hi",
                "coin_probability", "mean_index", "coin_index_sd")
POINT_COLUMNS = ("width", "n_params", "unique_id", "loss", "index", "n_pos", "n_neg", "n_null",
                 "is_minimum", "multiplicity", "grad_norm", "lambda_min", "lambda_max",
                 "tolerance", "init_id", "step", "noise_scale")
START_COLUMNS = ("width", "n_params", "start_id", "init_id", "step", "noise_scale", "start_loss",
                 "status", "loss", "grad_norm", "iterations", "index", "unique_id")


def parse_widths(text: str) -> list[int]:
    """'1,2,4' -> [1, 2, 4]; ValueError naming --widths_list."""
    try:
        widths = [int(w) for w in text.split(",")]
    except ValueError:
        raise ValueError(f"--widths_list={text!r}: expected comma-separated positive integers, "
                         "e.g. '1,2,4,8'") from None
    if not widths or any(w < 1 for w in widths):
        raise ValueError(f"--widths_list={text!r}: every width must be >= 1")
    if len(set(widths)) != len(widths):
        raise ValueError(f"--widths_list={text!r}: repeated width")
    return sorted(widths)


def parse_scales(text: str) -> list[float]:
    """'0,0.02' -> [0.0, 0.02]; ValueError naming --noise_scales."""
    try:
        scales = [float(s) for s in text.split(",")]
    except ValueError:
        raise ValueError(f"--noise_scales={text!r}: expected comma-separated numbers") from None
    if not scales or any(not math.isfinite(s) or s < 0 for s in scales):
        raise ValueError(f"--noise_scales={text!r}: every scale must be a finite number >= 0")
    return scales


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors()
    for name, use in NOT_APPLICABLE.items():
        if FLAGS[name].present:
            errors.append(f"--{name}: does not apply to this app" +
                          (f"; use {use}" if use else ""))
    for parse, text in ((parse_widths, FLAGS.widths_list), (parse_scales, FLAGS.noise_scales)):
        try:
            parse(text)
        except ValueError as exc:
            errors.append(str(exc))
    for name, low in (("num_inits", 1), ("snapshot_every", 1), ("prefind_steps", 0),
                      ("bootstrap", 1),
                      ("chunk_size", 1), ("vmap_width", 1)):
        if getattr(FLAGS, name) < low:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if FLAGS.snapshot_every >= 1 and FLAGS.train_steps % FLAGS.snapshot_every:
        errors.append(f"--snapshot_every={FLAGS.snapshot_every}: must divide --train_steps="
                      f"{FLAGS.train_steps}")
    if not (math.isfinite(FLAGS.prefind_lr) and FLAGS.prefind_lr > 0):
        errors.append(f"--prefind_lr={FLAGS.prefind_lr}: must be a finite number > 0")
    if not (math.isfinite(FLAGS.eig_rtol) and FLAGS.eig_rtol >= 0):
        errors.append(f"--eig_rtol={FLAGS.eig_rtol}: must be a finite number >= 0")
    if not (math.isfinite(FLAGS.merge_rtol) and FLAGS.merge_rtol > 0):
        errors.append(f"--merge_rtol={FLAGS.merge_rtol}: must be a finite number > 0")
    if FLAGS.reduced_nets:
        errors.extend(common.reduced_nets_errors(FLAGS.activation))
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


def problem_for(width: int):
    from crit.problems import mlp_problem

    extra = {}
    if FLAGS.dataset == "gaussian":
        extra = dict(dim_in=FLAGS.dim_in, dim_out=FLAGS.dim_out)
    elif FLAGS.dataset == "digits":
        extra = dict(downsample=2)
    return mlp_problem(dataset=FLAGS.dataset, widths=(width,), activation=FLAGS.activation,
                       use_bias=FLAGS.use_bias, loss=None if FLAGS.loss == "auto" else FLAGS.loss,
                       l2=FLAGS.l2, n_points=FLAGS.n_points, data_seed=FLAGS.data_seed, **extra)


def minima_by_init(num_inits: int, init_id, unique_id, multiplicity, is_minimum_unique,
                   is_minimum_start) -> dict[str, np.ndarray]:
    """Per-init numerators and denominators of the two shares of minima (clusters = inits).

    Unique points: a point with multiplicity m counts 1/m for the init of each of its certified
    starts, so the per-init denominators sum to the number of unique points. Certified starts:
    each counts 1 for its init.
    """
    init_id, unique_id = np.asarray(init_id), np.asarray(unique_id)
    rows = np.flatnonzero(unique_id >= 0)
    ids, uid = init_id[rows], unique_id[rows]
    w = 1.0 / np.asarray(multiplicity, dtype=np.float64)[uid]
    is_min_u = np.asarray(is_minimum_unique, dtype=np.float64)[uid]
    is_min_s = np.asarray(is_minimum_start, dtype=np.float64)[rows]
    count = lambda weights: np.bincount(ids, weights=weights, minlength=num_inits)  # noqa: E731
    return {"unique_min": count(w * is_min_u), "unique": count(w),
            "starts_min": count(is_min_s), "starts": count(np.ones(len(rows)))}


def run_width(width: int) -> dict:
    """Search one width; per-width summary row, unique points and every start."""
    import jax.numpy as jnp
    from crit import saddles, theory
    from crit.train import make_optimizer

    pr = problem_for(width)
    masks = jnp.asarray(saddles.reduced_net_masks(width, FLAGS.num_inits))
    transform = ((lambda i, p: saddles.mask_hidden_units(p, masks[i], FLAGS.activation))
                 if FLAGS.reduced_nets else None)
    scales = parse_scales(FLAGS.noise_scales)
    n_starts = FLAGS.num_inits * (FLAGS.train_steps // FLAGS.snapshot_every + 1) * len(scales)
    progress = common.Progress(n_starts, label=f"starts (h = {width}, P = {pr.n_params})")
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
        max_iters=FLAGS.finder_steps or NEWTON_STEPS, grad_tol=FLAGS.grad_tol,
        flat_tol=FLAGS.flat_tol, eig_tol=FLAGS.eig_tol, eig_rtol=FLAGS.eig_rtol,
        prefind_steps=FLAGS.prefind_steps, prefind_lr=FLAGS.prefind_lr)
    seconds = time.time() - t0
    pts, st, u = res.points, res.starts, res.unique
    p = pr.n_params
    is_min = pts.n_neg[u] == 0
    counts = saddles.status_counts(pts.status)
    n_u, k = len(u), int(is_min.sum())
    cert_rows = np.flatnonzero(res.certified)
    k_starts = int(np.sum(pts.n_neg[cert_rows] == 0))
    lo, hi = theory.wilson_interval(k, n_u) if n_u else (np.nan, np.nan)
    lo_s, hi_s = (theory.wilson_interval(k_starts, len(cert_rows)) if len(cert_rows)
                  else (np.nan, np.nan))
    by_init = minima_by_init(FLAGS.num_inits, st.init_id, res.unique_id, res.merged.multiplicity,
                             is_min, pts.n_neg == 0)
    c_lo, c_hi, _ = theory.cluster_bootstrap_ratio(by_init["unique_min"], by_init["unique"],
                                                   FLAGS.bootstrap, FLAGS.seed)
    cs_lo, cs_hi, _ = theory.cluster_bootstrap_ratio(by_init["starts_min"], by_init["starts"],
                                                     FLAGS.bootstrap, FLAGS.seed)
    row = {"width": width, "n_params": p, "n_train": pr.dataset.n_train, "phi": pr.phi,
           "n_starts": len(st.init_id), **counts, "n_unique": n_u, "n_minima": k,
           "share_minima": k / n_u if n_u else np.nan, "cluster_lo": c_lo, "cluster_hi": c_hi,
           "wilson_iid_lo": lo, "wilson_iid_hi": hi,
           "n_inits_certified": int(np.sum(by_init["starts"] > 0)),
           "n_minima_with_null": int(np.sum(is_min & (pts.n_null[u] > 0))),
           "n_strict_minima": int(np.sum(is_min & (pts.n_null[u] == 0))),
           "n_certified_minima_starts": k_starts,
           "share_minima_starts": k_starts / len(cert_rows) if len(cert_rows) else np.nan,
           "cluster_starts_lo": cs_lo, "cluster_starts_hi": cs_hi,
           "wilson_starts_iid_lo": lo_s, "wilson_starts_iid_hi": hi_s,
           "coin_probability": float(theory.coin_flip_minimum_probability(p)),
           "mean_index": float(np.mean(pts.index[u])) if n_u else np.nan,
           "coin_index_sd": 0.5 / math.sqrt(p)}
    n_s = len(st.init_id)
    points = {"width": np.full(n_u, width), "n_params": np.full(n_u, p),
              "unique_id": np.arange(n_u), "loss": pts.loss[u], "index": pts.index[u],
              "n_pos": pts.n_pos[u], "n_neg": pts.n_neg[u], "n_null": pts.n_null[u],
              "is_minimum": is_min.astype(int), "multiplicity": res.merged.multiplicity,
              "grad_norm": pts.grad_norm[u],
              "lambda_min": pts.eigenvalues[u, 0] if n_u else np.zeros(0),
              "lambda_max": pts.eigenvalues[u, -1] if n_u else np.zeros(0),
              "tolerance": pts.tolerance[u], "init_id": st.init_id[u], "step": st.step[u],
              "noise_scale": st.noise_scale[u]}
    starts = {"width": np.full(n_s, width), "n_params": np.full(n_s, p),
              "start_id": np.arange(n_s), "init_id": st.init_id, "step": st.step,
              "noise_scale": st.noise_scale, "start_loss": st.start_loss,
              "status": np.array([STATUSES[s] for s in pts.status]), "loss": pts.loss,
              "grad_norm": pts.grad_norm, "iterations": pts.iterations, "index": pts.index,
              "unique_id": res.unique_id}
    return dict(row=row, points=points, starts=starts, eigenvalues=pts.eigenvalues[u],
                problem=pr, seconds=seconds)


def figure(rows: list[dict], results: list[dict], out_dir: Path, title: str):
    import matplotlib.pyplot as plt
    from crit import plots, theory

    P = np.array([r["n_params"] for r in rows], dtype=float)
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.4))
    grid = np.unique(np.round(np.geomspace(max(P.min() / 1.5, 1), P.max() * 1.5, 200)))
    ax.plot(grid, theory.coin_flip_minimum_probability(grid.astype(int)), "k--", lw=1,
            label="coin flips: 2^-P")
    floor = 1e-6
    n_inits = np.array([r["n_inits_certified"] for r in rows])
    for key, lo_k, hi_k, color, label, shift in (
            ("share_minima", "cluster_lo", "cluster_hi", "tab:blue", "unique certified points",
             1.0),
            ("share_minima_starts", "cluster_starts_lo", "cluster_starts_hi", "tab:orange",
             "certified starts (with multiplicity)", 1.08)):
        share = np.array([r[key] for r in rows], dtype=float)
        lo = np.array([r[lo_k] for r in rows], dtype=float)
        hi = np.array([r[hi_k] for r in rows], dtype=float)
        ok = np.isfinite(share)
        pos = ok & (share > 0)
        ax.errorbar(P[pos] * shift, share[pos],
                    yerr=[np.maximum(share[pos] - np.maximum(lo[pos], floor), 0),
                          np.maximum(hi[pos] - share[pos], 0)],
                    fmt="o", color=color, capsize=3,
                    label=f"{label} (95% bootstrap over inits)")
        zero = ok & (share == 0)
        if zero.any():  # share 0: the bootstrap interval is [0, 0]; bound counting inits once
            bound = [theory.wilson_interval(0, max(m, 1))[1] for m in n_inits[zero]]
            ax.scatter(P[zero] * shift, bound, marker="v", color=color, s=40,
                       label=f"{label}: 0 minima, Wilson bound with n = inits")
    ax.set_xscale("log")
    ax.set_yscale("log")
    coin_min = float(theory.coin_flip_minimum_probability(int(P.max())))
    ax.set_ylim(max(min(1e-6, 0.1 * coin_min), 1e-300), 2)  # the whole coin curve stays in view
    ax.set_xlabel("number of parameters P")
    ax.set_ylabel("share of critical points that are minima")
    ax.set_title("minima among certified critical points vs the coin model", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, loc="lower left")
    for r, res in zip(rows, results):
        idx = res["points"]["index"]
        if len(idx):
            jitter = np.exp(np.random.default_rng(0).uniform(-0.08, 0.08, len(idx)))
            size = 10 + 4 * np.sqrt(res["points"]["multiplicity"])
            bx.scatter(r["n_params"] * jitter, idx, s=size, alpha=0.6, color="tab:blue")
    pp = np.geomspace(P.min(), P.max(), 100)
    bx.plot(pp, np.full_like(pp, 0.5), "k--", lw=1, label="coin model: mean ½")
    bx.fill_between(pp, 0.5 - 1 / np.sqrt(pp), 0.5 + 1 / np.sqrt(pp), color="k", alpha=0.1,
                    label="coin model: ±2 sd, 1/√P")
    bx.scatter([], [], color="tab:blue", s=14, label="unique certified points")
    bx.set_xscale("log")
    bx.set_ylim(-0.03, 1.0)
    bx.set_xlabel("number of parameters P")
    bx.set_ylabel("index α (fraction of λ < −τ)")
    bx.set_title("index distribution per size", fontsize=9)
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, "minima_vs_size")


def run_config() -> dict:
    own = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
    shared = {f.name: f.value for f in FLAGS.get_flags_for_module(common)
              if f.name not in NOT_APPLICABLE}
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    sizes = []
    for w in parse_widths(FLAGS.widths_list):
        from crit.problems import mlp_param_count

        d_in = {"gaussian": FLAGS.dim_in, "digits": 16}.get(FLAGS.dataset, 1)
        k = {"gaussian": FLAGS.dim_out, "digits": 10}.get(FLAGS.dataset, 1)
        sizes.append({"width": w, "n_params": mlp_param_count(d_in, (w,), k, FLAGS.use_bias)})
    return {"experiment": "minima_vs_size", "protocol": protocol, "flags": shared | own,
            "sizes": sizes, "environment": common.environment()}


def concat(dicts: list[dict]) -> dict:
    return {k: np.concatenate([np.asarray(d[k]) for d in dicts]) for k in dicts[0]}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    common.set_matmul_precision()
    t_start = time.time()
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(), OUTPUTS)
    results = []
    for w in parse_widths(FLAGS.widths_list):
        res = run_width(w)
        results.append(res)
        r = res["row"]
        print(f"h = {w:4d}, P = {r['n_params']:5d}: {r['n_starts']} starts, "
              + ", ".join(f"{s} {r[s]}" for s in STATUSES)
              + f"; {r['n_unique']} unique, {r['n_minima']} minima "
              f"({r['n_minima_with_null']} with null λ) = {r['share_minima']:.3f} "
              f"[{r['cluster_lo']:.3f}, {r['cluster_hi']:.3f}] (bootstrap over "
              f"{r['n_inits_certified']} inits) vs 2^-P = {r['coin_probability']:.2e}; "
              f"{res['seconds']:.0f}s", flush=True)
    rows = [res["row"] for res in results]
    store.atomic_write_text(out_dir / "timing.txt", "".join(
        f"width {r['width']}: {res['seconds']:.1f} s\n" for r, res in zip(rows, results)))
    store.write_csv(out_dir / "sizes.csv", {c: np.asarray([r[c] for r in rows])
                                            for c in SIZE_COLUMNS})
    store.write_csv(out_dir / "points.csv", concat([res["points"] for res in results]))
    store.write_csv(out_dir / "starts.csv", concat([res["starts"] for res in results]))
    store.atomic_save_npz(out_dir / "spectra.npz", {
        **{f"h{res['row']['width']}_eigenvalues": res["eigenvalues"] for res in results},
        "widths": np.asarray([r["width"] for r in rows]),
        "n_params": np.asarray([r["n_params"] for r in rows])})
    name = results[0]["problem"].name.split("/")
    figure(rows, results, out_dir,
           f"{name[0]} (n = {rows[0]['n_train']}), one hidden layer of h {name[2]} units, "
           f"l2 = {FLAGS.l2:g}; {FLAGS.num_inits} inits per size, snapshots every "
           f"{FLAGS.snapshot_every} of {FLAGS.train_steps} steps; minimum iff no λ < −τ")
    print("coin model 2^-P vs measured share of minima among unique certified points: "
          + "; ".join(f"P = {r['n_params']}: {r['share_minima']:.3f} vs {r['coin_probability']:.1e}"
                      for r in rows))
    print(f"wrote {out_dir}/sizes.csv, points.csv, starts.csv, spectra.npz, "
          f"minima_vs_size.png/.pdf; {time.time() - t_start:.0f}s")


if __name__ == "__main__":
    app.run(main)
