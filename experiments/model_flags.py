"""Flags that bring your own network and data (crit.models, crit.data), for the apps that take
any model: ``--model``, ``--model_arg``, ``--data_file``, ``--batchnorm``, ``--eval_batch_size``.

Only apps that import this module accept these flags; every other app refuses them as unknown
before any compute (they build their own MLPs). With the module imported,
:func:`experiments.common.problem_from_flags` builds ``--model`` on ``--data_file`` or
``--dataset``, and :func:`model_errors` checks every value (including that the model accepts
the data's shape) before any compute.
"""

from __future__ import annotations

import sys

from absl import flags

from crit.models import MODELS, model_names
from crit.trained import parse_hparams as parse_model_args  # noqa: F401

FLAGS = flags.FLAGS

flags.DEFINE_string("model", "mlp", f"Network: {', '.join(model_names())} (crit/models), or "
                    "'some.module:factory' for your own Flax module. --widths, --activation and "
                    "--use_bias shape the mlp; other models take --model_arg.")
flags.DEFINE_multi_string("model_arg", [], "Hyperparameter of --model as key=value, repeatable "
                          "(e.g. --model_arg=depth=20 --model_arg=width=16; tuples as 6,16).")
flags.DEFINE_string("data_file", None, "An .npz with x_train, y_train (optional x_test, y_test, "
                    "n_classes): see crit.data.load_data_file. Replaces --dataset.")
flags.DEFINE_enum("batchnorm", "eval", ["eval", "batch"],
                  "BatchNorm semantics of every loss whose derivatives are taken: eval (running "
                  "statistics fixed after training; the loss is a function of θ alone) or batch "
                  "(each evaluation batch normalizes with its own statistics; the loss then "
                  "depends on --eval_batch_size). Ignored by models without BatchNorm.")
flags.DEFINE_integer("eval_batch_size", 0, "Rows per batch of the full-data loss, gradient, "
                     "HVP and Hessian (0: all rows at once). Bounds memory by the batch; exact "
                     "n_b/N weights.")

MLP_FLAGS = ("widths", "activation", "use_bias")


def model_errors() -> list[str]:
    """Messages for every invalid model/data flag, with the data loaded and the model shaped."""
    e: list[str] = []
    try:
        hparams = parse_model_args(FLAGS.model_arg)
    except ValueError as exc:
        return [str(exc)]
    if FLAGS.model != "mlp":
        given = [f"--{n}" for n in MLP_FLAGS if FLAGS[n].present]
        if given:
            e.append(f"{', '.join(given)} shape(s) --model=mlp only; for --model={FLAGS.model} "
                     f"use --model_arg (it takes {sorted(MODELS.get(FLAGS.model, ('', '', {}))[2])})")
    elif hparams:
        e.append("--model=mlp takes --widths/--activation/--use_bias, not --model_arg")
    if FLAGS.eval_batch_size < 0:
        e.append(f"--eval_batch_size={FLAGS.eval_batch_size}: must be >= 0 (0 = all rows)")
    if FLAGS.data_file and FLAGS["dataset"].present:
        e.append("--data_file and --dataset exclude each other")
    if e:
        return e
    try:
        problem = problem_from_model_flags()
    except Exception as exc:  # model, data file, loss, shapes: one message naming the cause
        e.append(f"--model={FLAGS.model}" + (f" with --data_file={FLAGS.data_file}"
                                             if FLAGS.data_file else
                                             f" with --dataset={FLAGS.dataset}") + f": {exc}")
        return e
    rounding = compute_precision_error(problem)
    if rounding:
        e.append(f"--model={FLAGS.model}: {rounding}")
    app = sys.modules.get("__main__")
    if problem.has_state and not getattr(app, "TRAINS_STATE", False):
        e.append(f"--model={FLAGS.model} keeps BatchNorm statistics; this app does not train "
                 "them yet (min_ratio and spectrum do): use a model without BatchNorm (e.g. "
                 "--model_arg=norm=none)")
    return e


def compute_precision_error(problem) -> str | None:
    """A message if the model's loss rounds in less than float64 (a layer pinned to
    ``dtype=jnp.float32``, an internal bfloat16 cast): the apps that train their own inits
    allow float64 rounding in every tolerance and proof (δ = P·ε₆₄·max|λ|), so such a model is
    refused before any compute; ``experiments.analyze`` scales δ to the real unit roundoff
    (crit.precision). Traced to a jaxpr only, nothing runs."""
    import jax

    from crit.precision import compute_dtypes

    key = jax.random.key(0)
    params = jax.eval_shape(problem.init_fn, key)
    if problem.has_state:
        state = jax.eval_shape(problem.init_state_fn, key)
        dtypes = compute_dtypes(problem.loss_fn, params, state)
    else:
        dtypes = compute_dtypes(problem.loss_fn, params)
    if not dtypes or dtypes[-1] == "float64":
        return None
    return (f"its loss rounds in {', '.join(dtypes)} (a layer's dtype= or a cast inside the "
            "model), but this app's tolerances and proofs assume float64 throughout. Make the "
            "model compute in float64 (e.g. dtype=jnp.float64 on its layers), or analyse the "
            "trained model with python -m experiments.analyze, whose rounding allowance uses "
            f"the coarsest unit roundoff ({dtypes[-1]})")


def data_from_flags():
    from crit.data import DATASETS, load_data_file

    if FLAGS.data_file:
        return load_data_file(FLAGS.data_file, n_points=FLAGS.n_points
                              if FLAGS["n_points"].present else None)
    kwargs = {}
    if FLAGS.dataset == "gaussian":
        kwargs = dict(dim_in=FLAGS.dim_in, dim_out=FLAGS.dim_out)
    return DATASETS[FLAGS.dataset](n_points=FLAGS.n_points, seed=FLAGS.data_seed, **kwargs)


def problem_from_model_flags():
    """The problem of --model on --data_file / --dataset (cached: validation builds it once)."""
    global _CACHED
    key = (FLAGS.model, tuple(FLAGS.model_arg), FLAGS.data_file, FLAGS.dataset, FLAGS.n_points,
           FLAGS.data_seed, FLAGS.dim_in, FLAGS.dim_out, FLAGS.widths, FLAGS.activation,
           FLAGS.use_bias, FLAGS.loss, FLAGS.l2, FLAGS.batchnorm, FLAGS.eval_batch_size)
    if _CACHED is not None and _CACHED[0] == key:
        return _CACHED[1]
    import jax

    from crit.problems import model_problem
    from experiments.common import parse_widths

    hparams = parse_model_args(FLAGS.model_arg)
    if FLAGS.model == "mlp":
        hparams = dict(widths=parse_widths(FLAGS.widths), activation=FLAGS.activation,
                       use_bias=FLAGS.use_bias)
    problem = model_problem(FLAGS.model, data_from_flags(),
                            loss=None if FLAGS.loss == "auto" else FLAGS.loss, l2=FLAGS.l2,
                            batchnorm=FLAGS.batchnorm, eval_batch_size=FLAGS.eval_batch_size,
                            **hparams)
    # the model must accept the data: one forward pass on shapes only, no compute
    jax.eval_shape(problem.loss_fn, jax.eval_shape(problem.init_fn, jax.random.key(0)))
    _CACHED = (key, problem)
    return problem


_CACHED = None


def data_digest() -> str | None:
    """SHA-256 of the --data_file bytes (None without one): a file changed in place is
    another run."""
    import hashlib

    if not FLAGS.data_file:
        return None
    h = hashlib.sha256()
    with open(FLAGS.data_file, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint(problem) -> dict:
    """What the model and data flags put in a run's fingerprint: the model and its
    hyperparameters, the data file and the SHA-256 of its bytes (a file changed in place is
    another run), the SHA-256 of the source of a fork's ``module:factory`` module (an edited
    fork is another run, not a resume), the BatchNorm semantics the numbers were computed with ("none" for a model
    without state) and the evaluation batch size."""
    from crit.trained import spec_source_sha256

    digest = data_digest()
    return {"model": FLAGS.model, "model_args": sorted(FLAGS.model_arg),
            "model_source_sha256": spec_source_sha256(FLAGS.model),
            "data_file": FLAGS.data_file, "data_sha256": digest,
            "batchnorm": problem.batchnorm, "eval_batch_size": problem.eval_batch_size}
