r"""Is *my* network at a saddle? Analyse a model trained by your own code, from its checkpoint.

    python -m experiments.analyze --model=mypkg.net:Net --checkpoint=ckpt/ \
        --data_file=train.npz [--loss=mse|xent|pkg.mod:fn] [--refine] [--batchnorm=eval|batch]

``--model=pkg.mod:attr`` names a ``flax.linen`` module (class, factory or instance), a
``flax.nnx`` class or factory (built with ``rngs=nnx.Rngs(--seed)`` and ``--model_arg``
hyperparameters; ``n_outputs`` only if it takes it), or a plain ``apply(params, x)``.
``--checkpoint`` is an Orbax directory, a Flax msgpack file or an ``.npz`` of parameter paths
(crit.checkpoints); every leaf is matched to the model by its path before any compute. The
library call behind the app is :func:`crit.analysis.analyze_model`.

Writes to ``--out_dir``: config.json (flags, versions, SHA-256 of the checkpoint, the data
file and the source of the fork's model and loss modules), report.json, analysis.csv (one row
per analysed point: the given one and, with ``--refine``, the refined one), spectrum.npz (raw
eigenvalues or SLQ nodes/weights, extremal values, grid fractions, escape directions), and
figures: density.png (linear and log|λ|, extremal Ritz values), sign_fractions.png (against
τ), escape.png (loss along the escape direction beside ½λt², where H has a proven negative
eigenvalue). A rerun with the same configuration finds the finished report and prints it.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

from absl import app, flags

import crit  # noqa: F401  (float64 on)
from crit import store
from experiments.provenance import environment

FLAGS = flags.FLAGS

flags.DEFINE_string("model", None, "Your network as 'some.module:attr': a flax.linen module "
                    "(class, factory or instance), a flax.nnx class or factory, or a plain "
                    "apply(params, x) function.")
flags.DEFINE_multi_string("model_arg", [], "Hyperparameter of --model as key=value, repeatable.")
flags.DEFINE_string("checkpoint", None, "Trained weights: an Orbax checkpoint directory, a Flax "
                    "msgpack file (flax.serialization.to_bytes) or an .npz of parameter paths.")
flags.DEFINE_string("data_file", None, "An .npz with x_train, y_train (crit.data.load_data_file; "
                    "with a custom --loss the targets are taken as they are).")
flags.DEFINE_string("loss", "auto", "mse, xent (softmax cross-entropy on integer labels), auto "
                    "(xent for integer labels, else mse) or 'pkg.mod:fn' with fn(outputs, "
                    "targets) the mean loss of a batch.")
flags.DEFINE_float("l2", 0.0, "L2 penalty (l2/2)·‖θ‖² added to the loss.")
flags.DEFINE_enum("batchnorm", "eval", ["eval", "batch"], "BatchNorm semantics: eval (running "
                  "statistics of the checkpoint) or batch (each evaluation batch normalizes with "
                  "its own statistics; the loss then depends on --eval_batch_size).")
flags.DEFINE_integer("eval_batch_size", 0, "Rows per batch of the full-data loss (0: all at "
                     "once); exact n_b/N weights.")
flags.DEFINE_integer("n_points", None, "Use the first n rows of x_train (default: all).")
flags.DEFINE_bool("refine", False, "From the checkpoint's point to a nearby critical point "
                  "(damped Newton when dense, Newton-MR on HVPs above); both points are analysed.")
flags.DEFINE_integer("refine_iters", 30, "Refinement iterations at most.")
flags.DEFINE_integer("minres_iters", 0, "HVPs per Newton-MR step (0: min(P, 200)).")
flags.DEFINE_float("grad_tol", 1e-8, "Certificate: critical iff ‖∇L‖ ≤ grad_tol.")
flags.DEFINE_enum("method", "auto", ["auto", "dense", "krylov"], "Spectrum: dense Hessian (P ≤ "
                  "--dense_max_params under auto) or Lanczos/SLQ on HVPs.")
flags.DEFINE_integer("dense_max_params", 2000, "Largest P for the dense Hessian under auto.")
flags.DEFINE_integer("lanczos_steps", 90, "Lanczos steps per run (Krylov).")
flags.DEFINE_integer("slq_probes", 8, "SLQ probes (Krylov).")
flags.DEFINE_integer("num_eigs", 5, "Eigenvalues reported at each end.")
flags.DEFINE_enum("krylov_tol", "resolved", ["resolved", "machine"], "τ of the Krylov sign "
                  "fractions: the finest resolved grid value, or P·ε·max|θ|.")
flags.DEFINE_enum("hvp_dtype", "float64", ["float64", "float32", "bfloat16"], "Precision of "
                  "the Lanczos search's HVPs (Krylov). The proof stays float64: the Ritz pairs, "
                  "verdict and margin are recomputed in float64 and the sign fractions widened by "
                  "the measured HVP error.")
flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"],
                  "jax.default_matmul_precision of the low-precision search's dots (GPU: "
                  "'default' allows TF32; TPU: bfloat16 passes). Recorded in config.json.")
flags.DEFINE_list("curvature", ["hessian"], "Operators to report beside the Hessian (the "
                  "verdict is always the Hessian's), comma-separated: hessian, ggn, residual, "
                  "fisher, empirical_fisher; e.g. ggn,residual for H = G + R side by side "
                  "(curvature.csv, curvature_density figure).")
flags.DEFINE_bool("per_layer", False, "Every layer's diagonal block (λ_max, λ_min, trace) for "
                  "each --curvature operator, as layers.csv.")
flags.DEFINE_string("blocks", None, "Analyse one block: a regex over parameter paths (e.g. "
                    "'Dense_1/'); the other parameters stay at the checkpoint's values.")
flags.DEFINE_integer("trace_matvecs", 0, "Traces in curvature.csv by Hutch++ with this many "
                     "products (>= 4); 0: from the SLQ probes (dense: exact).")
flags.DEFINE_float("eig_tol", None, "Eigenvalue tolerance τ (overrides the default).")
flags.DEFINE_integer("seed", 0, "Seed of the Krylov probes and of an NNX model's Rngs.")
flags.DEFINE_string("out_dir", "runs/analyze", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration.")

from crit.analysis import REPORT_OUTPUTS as OUTPUTS  # noqa: E402
NOT_PROTOCOL = ("out_dir", "overwrite")
KRYLOV_ONLY = ("lanczos_steps", "slq_probes", "krylov_tol", "hvp_dtype", "matmul_precision")
from crit.analysis import REPORT_COLUMNS as CSV_COLUMNS  # noqa: E402



def validate() -> list[str]:
    """Every flag checked before any compute: one message per problem."""
    e = []
    for name in ("model", "checkpoint", "data_file"):
        if not getattr(FLAGS, name):
            e.append(f"--{name} is required")
    if FLAGS.checkpoint and not Path(FLAGS.checkpoint).exists():
        e.append(f"--checkpoint={FLAGS.checkpoint}: no such file or directory")
    if FLAGS.data_file and not Path(FLAGS.data_file).is_file():
        e.append(f"--data_file={FLAGS.data_file}: no such file")
    for name, low in (("eval_batch_size", 0), ("refine_iters", 1), ("minres_iters", 0),
                      ("dense_max_params", 1), ("lanczos_steps", 2), ("slq_probes", 1),
                      ("num_eigs", 1)):
        if getattr(FLAGS, name) < low:
            e.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if FLAGS.n_points is not None and FLAGS.n_points < 1:
        e.append(f"--n_points={FLAGS.n_points}: must be >= 1")
    if FLAGS.num_eigs > FLAGS.lanczos_steps:
        e.append(f"--num_eigs={FLAGS.num_eigs}: must be <= --lanczos_steps={FLAGS.lanczos_steps}")
    if not (math.isfinite(FLAGS.grad_tol) and FLAGS.grad_tol > 0):
        e.append(f"--grad_tol={FLAGS.grad_tol}: must be a finite number > 0")
    if FLAGS.l2 < 0:
        e.append(f"--l2={FLAGS.l2}: must be >= 0")
    if FLAGS.method == "dense":
        e += [f"--{n}: does not apply to --method=dense (it would be ignored)"
              for n in KRYLOV_ONLY if FLAGS[n].present]
    from crit.curvature import CURVATURES

    bad = [c for c in FLAGS.curvature if c not in CURVATURES]
    if bad:
        e.append(f"--curvature={','.join(FLAGS.curvature)}: unknown {bad}; allowed: "
                 f"{', '.join(CURVATURES)}")
    if FLAGS.per_layer and FLAGS.blocks:
        e.append("--per_layer and --blocks: choose one")
    if FLAGS.trace_matvecs < 0 or 0 < FLAGS.trace_matvecs < 4:
        e.append(f"--trace_matvecs={FLAGS.trace_matvecs}: 0 (SLQ trace) or >= 4 (Hutch++)")
    if FLAGS["matmul_precision"].present and FLAGS.hvp_dtype == "float64":
        e.append("--matmul_precision: applies to a low-precision search (--hvp_dtype=float32 "
                 "or bfloat16); float64 dots are not affected")
    if FLAGS["refine_iters"].present and not FLAGS.refine:
        e.append("--refine_iters: applies only with --refine")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        e.append(f"--out_dir={out}: is a file, not a directory")
    return e


def load_inputs():
    """(trained model, (x, y), loss spec): model built, checkpoint matched, data read, the
    model run on shapes only. Raises ValueError with one message naming the flag."""
    import numpy as np

    from crit.analysis import check_data
    from crit.data import load_data_file, load_xy_file
    from crit.trained import build_model, parse_hparams, trained_from_checkpoint

    custom_loss = FLAGS.loss not in ("auto", "mse", "xent")
    if custom_loss:
        x, y = load_xy_file(FLAGS.data_file)
        n_outputs = None
    else:
        data = load_data_file(FLAGS.data_file)
        x, y, n_outputs = data.x_train, data.y_train, data.n_outputs
    if FLAGS.n_points is not None:
        x, y = x[:FLAGS.n_points], y[:FLAGS.n_points]
    loss = FLAGS.loss
    if loss == "auto":
        loss = "xent" if np.issubdtype(np.asarray(y).dtype, np.integer) else "mse"
    model = build_model(FLAGS.model, parse_hparams(FLAGS.model_arg), n_outputs, FLAGS.seed)
    trained = trained_from_checkpoint(model, FLAGS.checkpoint, x[:2], FLAGS.batchnorm)
    return trained, check_data((x, y)), loss


def run_config(loss: str, trained) -> dict:
    from crit.checkpoints import checkpoint_sha256
    from crit.trained import spec_source_sha256

    flag_values = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
    protocol = {k: v for k, v in flag_values.items() if k not in NOT_PROTOCOL}
    protocol.update(checkpoint_sha256=checkpoint_sha256(FLAGS.checkpoint),
                    data_sha256=checkpoint_sha256(FLAGS.data_file), model_source_sha256=spec_source_sha256(FLAGS.model),
                    loss_resolved=loss,
                    loss_source_sha256=spec_source_sha256(loss) if ":" in loss else None,
                    model_kind=trained.kind, cast_from=list(trained.cast_from),
                    batchnorm_used=trained.batchnorm)
    return {"experiment": "analyze", "protocol": protocol, "flags": flag_values,
            "n_params": trained.n_params, "environment": environment()}


def csv_columns(report) -> dict:
    import numpy as np

    rows = [p.scalars() for p in report.points]
    ref = report.refinement
    for i, row in enumerate(rows):
        row["point"] = row.pop("label")
        row["distance_moved"] = 0.0 if i == 0 else ref.distance
        row["loss_change"] = 0.0 if i == 0 else ref.loss_change
    return {c: np.asarray([r[c] for r in rows]) for c in CSV_COLUMNS}


def curvature_columns(report) -> dict:
    """curvature.csv: one row per analysed point and operator (crit.decomposition)."""
    import numpy as np

    from crit.decomposition import SUMMARY_COLUMNS

    rows = []
    for label, c in report.curvature.items():
        for kind, s in c["summaries"].items():
            rows.append({**s.row(), "point": label,
                         "escape_share": c["escape_share"].get(kind, float("nan"))})
    return {k: np.asarray([r[k] for r in rows]) for k in SUMMARY_COLUMNS}


def layer_columns(report) -> dict:
    """layers.csv: one row per point, operator and layer (crit.curvature.layer_table)."""
    import numpy as np

    rows = [{"point": label, **r} for label, rs in report.layers.items() for r in rs]
    return {k: np.asarray([r[k] for r in rows]) for k in rows[0]}


def spectrum_arrays(report) -> dict:
    import numpy as np

    out = {}
    for p in report.points:
        pre = p.label + "_"
        for name in ("smallest", "smallest_residuals", "largest", "largest_residuals",
                     "grid_tolerance", "escape_direction"):
            out[pre + name] = np.asarray(getattr(p, name))
        for name, arr in p.grid_fractions.items():
            out[pre + "grid_" + name] = np.asarray(arr)  # (G, 3): est, lo, hi
        for name in ("eigenvalues", "nodes", "weights", "escape_t", "escape_loss",
                     "escape_quadratic"):
            if getattr(p, name) is not None:
                out[pre + name] = np.asarray(getattr(p, name))
        for name, arr in p.density.items():
            out[pre + "density_" + name] = np.asarray(arr)
    return out


def write_figures(out_dir: Path, report, title: str) -> None:
    from crit import plots

    plots.report_density_figure(report.points, out_dir, title)
    plots.report_fractions_figure(report.points, out_dir, title)
    plots.escape_profile_figure(report.points, out_dir, title)
    if report.curvature:
        plots.curvature_density_figure(report.curvature, out_dir, title)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    from absl import logging

    logging.set_verbosity(logging.WARNING)  # orbax logs every read at INFO
    errors = validate()
    if errors:
        raise app.UsageError("\n".join(errors))
    from crit.analysis import analyze_model
    from crit.checkpoints import CheckpointError
    from crit.trained import TrainedModelError

    try:
        trained, (x, y), loss = load_inputs()
        from crit.analysis import AnalysisError, resolve_method

        method = resolve_method(FLAGS.method, trained.n_params, FLAGS.dense_max_params)
    except (CheckpointError, TrainedModelError, ValueError) as exc:
        raise app.UsageError(str(exc)) from None
    if method == "dense":
        given = [f"--{n}" for n in KRYLOV_ONLY if FLAGS[n].present]
        if given:
            raise app.UsageError(f"{', '.join(given)}: does not apply: P = {trained.n_params} "
                                 f"<= --dense_max_params={FLAGS.dense_max_params}, so the "
                                 "Hessian is dense (it would be ignored)")
    out_dir = Path(FLAGS.out_dir)
    try:
        resuming = store.prepare_out_dir(out_dir, run_config(loss, trained), FLAGS.overwrite,
                                         outputs=OUTPUTS + ("curvature.csv", "layers.csv"),
                                         chunked=False)
    except store.ResultsDirError as exc:
        raise app.UsageError(str(exc)) from None
    if resuming and (out_dir / "report.json").exists():
        print(f"{out_dir}: finished run with this configuration found; its report:")
        print(json.loads((out_dir / "report.json").read_text())["summary"])
        return
    print(f"{FLAGS.model} ({trained.kind}), P = {trained.n_params}, n = {x.shape[0]}, loss "
          f"{loss}, BatchNorm {trained.batchnorm}"
          + (f"; parameters cast from {', '.join(trained.cast_from)} to float64"
             if trained.cast_from else ""), flush=True)
    start = time.time()

    def progress(text):
        print(f"[{time.time() - start:7.1f}s] {text}", flush=True)

    import jax

    try:
        report = analyze_model(
            trained, (x, y), loss, batch_size=FLAGS.eval_batch_size, l2=FLAGS.l2,
            key=jax.random.key(FLAGS.seed), grad_tol=FLAGS.grad_tol, refine=FLAGS.refine,
            refine_iters=FLAGS.refine_iters, minres_iters=FLAGS.minres_iters or None,
            method=method, dense_max_params=FLAGS.dense_max_params, eig_tol=FLAGS.eig_tol,
            lanczos_steps=FLAGS.lanczos_steps, slq_probes=FLAGS.slq_probes,
            num_eigs=FLAGS.num_eigs, krylov_tol=FLAGS.krylov_tol, hvp_dtype=FLAGS.hvp_dtype,
            matmul_precision=FLAGS.matmul_precision if FLAGS.hvp_dtype != "float64" else None,
            curvatures=tuple(FLAGS.curvature), per_layer=FLAGS.per_layer, blocks=FLAGS.blocks,
            trace_matvecs=FLAGS.trace_matvecs, progress=progress)
    except AnalysisError as exc:
        raise app.UsageError(str(exc)) from None
    store.write_csv(out_dir / "analysis.csv", csv_columns(report))
    if report.curvature:
        store.write_csv(out_dir / "curvature.csv", curvature_columns(report))
    if report.layers:
        store.write_csv(out_dir / "layers.csv", layer_columns(report))
    store.atomic_save_npz(out_dir / "spectrum.npz", spectrum_arrays(report))
    title = f"{FLAGS.model}, P = {trained.n_params}, n = {x.shape[0]}, loss {loss}"
    write_figures(out_dir, report, title)
    store.atomic_write_text(out_dir / "report.json", json.dumps(report.to_dict(), indent=2))
    print(report.summary())
    print(f"wrote {out_dir}/report.json, analysis.csv, spectrum.npz, figures "
          f"({time.time() - start:.1f} s)")


if __name__ == "__main__":
    app.run(main)
