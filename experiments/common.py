"""Flags and helpers shared by the experiment apps (the library below never reads flags).

Importing this module defines the problem and training flags; an app adds its own. Every value
is checked by :func:`validate` before any compute, with one message naming the flag.
"""

from __future__ import annotations

import math
import sys
import time

from absl import app, flags

from experiments.provenance import environment  # noqa: F401  (config.json)

import crit  # noqa: F401  (float64 on)
from crit import store
from crit.critical import FINDERS
from crit.data import TASKS
from crit.problems import ACTIVATIONS, DATASETS, LOSSES, mlp_problem
from crit.train import OPTIMIZERS

FLAGS = flags.FLAGS

# --- problem
flags.DEFINE_enum("dataset", "sinc", sorted(DATASETS), "Training data (see crit/problems.py).")
flags.DEFINE_integer("n_points", 256, "Training points (sinc/sign grid, gaussian, digits).")
flags.DEFINE_integer("data_seed", 0, "Seed of the data (gaussian draws, digits shuffle).")
flags.DEFINE_integer("dim_in", 8, "Input dimension of --dataset=gaussian.")
flags.DEFINE_integer("dim_out", 1, "Target dimension of --dataset=gaussian.")
flags.DEFINE_string("widths", "16,16", "Hidden widths, comma separated (e.g. '16,16'; '' for "
                    "a linear model).")
flags.DEFINE_enum("activation", "tanh", sorted(ACTIVATIONS), "Hidden activation.")
flags.DEFINE_bool("use_bias", True, "Dense layers with biases.")
flags.DEFINE_enum("loss", "auto", ["auto", *sorted(LOSSES)],
                  "Loss: mse, xent (softmax cross-entropy) or auto (mse for regression, xent "
                  "for classification).")
flags.DEFINE_float("l2", 0.0, "L2 penalty (l2/2)·‖θ‖² added to the loss.")
# --- training
flags.DEFINE_enum("optimizer", "adam", list(OPTIMIZERS), "Training optimizer (optax).")
flags.DEFINE_float("learning_rate", 1e-2, "Training learning rate.")
flags.DEFINE_float("momentum", 0.9, "Momentum of --optimizer=momentum.")
flags.DEFINE_integer("train_steps", 2000, "Full-batch training steps.")
flags.DEFINE_integer("log_every", 10, "Record loss and gradient norm every this many steps.")
flags.DEFINE_enum("train_dtype", "float64", ["float64", "float32"],
                  "Precision of the training phase (refinement and spectra are always float64).")
flags.DEFINE_enum("matmul_precision", "highest", ["highest", "high", "default"],
                  "jax_default_matmul_precision for every dot of the run, set before any compute "
                  "and recorded in config.json and the fingerprint. 'highest' keeps float32 dots "
                  "(--train_dtype=float32, a fork's float32 layers) in float32 on GPU (no TF32) "
                  "and TPU (no bfloat16 passes); 'default' is JAX's backend-dependent choice.")
# --- critical points
flags.DEFINE_enum("finder", "newton", list(FINDERS),
                  "Critical-point finder: newton (damped Newton on ∇L = 0, exact Hessian) or "
                  "gradnorm (Adam on ½‖∇L‖², the homework method).")
flags.DEFINE_integer("finder_steps", None, "Finder iterations (default: 15 for newton, 1000 for "
                     "gradnorm).")
flags.DEFINE_float("finder_lr", 1e-3, "Adam learning rate of --finder=gradnorm.")
flags.DEFINE_float("grad_tol", 1e-8, "Certificate: a point is critical iff ‖∇L‖ ≤ grad_tol.")
flags.DEFINE_float("flat_tol", 1e-3, "Gradient-flat label (Frye et al. 2021) when "
                   "‖Hg‖ ≤ flat_tol·‖H‖‖g‖ at a non-critical point.")
flags.DEFINE_float("eig_tol", None, "Eigenvalue tolerance τ (null iff |λ| ≤ τ). Default: "
                   "P·ε₆₄·max|λ| per point.")


def parse_widths(text: str) -> tuple[int, ...]:
    """'16,16' -> (16, 16); '' -> (). Raises ValueError naming --widths."""
    text = text.strip()
    if not text:
        return ()
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"--widths={text!r}: expected comma-separated positive integers, "
                         "e.g. '16,16'") from None
    if any(w <= 0 for w in widths):
        raise ValueError(f"--widths={text!r}: every width must be a positive integer")
    return widths


def _check(cond: bool, message: str, errors: list[str]) -> None:
    if not cond:
        errors.append(message)


def problem_errors() -> list[str]:
    """Messages for every invalid problem/training/finder flag (empty when all are fine)."""
    e: list[str] = []
    try:
        parse_widths(FLAGS.widths)
    except ValueError as exc:
        e.append(str(exc))
    _check(FLAGS.n_points >= 1, f"--n_points={FLAGS.n_points}: must be >= 1", e)
    if FLAGS.dataset in ("digits", "digits_images"):
        _check(FLAGS.n_points <= 1796, f"--n_points={FLAGS.n_points}: digits has 1797 images; "
               "use at most 1796 for training", e)
    _check(FLAGS.dim_in >= 1, f"--dim_in={FLAGS.dim_in}: must be >= 1", e)
    _check(FLAGS.dim_out >= 1, f"--dim_out={FLAGS.dim_out}: must be >= 1", e)
    classification = TASKS.get(FLAGS.dataset) == "classification"
    with_file = "data_file" in FLAGS and FLAGS.data_file  # its task is checked with the model
    if FLAGS.loss == "xent" and not classification and not with_file:
        e.append(f"--loss=xent needs class labels; --dataset={FLAGS.dataset} is regression "
                 "(use --loss=mse or --dataset=digits)")
    if FLAGS.loss == "mse" and classification and not with_file:
        e.append(f"--loss=mse needs real targets; --dataset={FLAGS.dataset} has class labels "
                 "(use --loss=xent)")
    for name in ("l2", "grad_tol", "flat_tol"):
        value = getattr(FLAGS, name)
        _check(math.isfinite(value) and value >= 0, f"--{name}={value}: must be a finite "
               "number >= 0", e)
    if FLAGS.eig_tol is not None:
        _check(math.isfinite(FLAGS.eig_tol) and FLAGS.eig_tol >= 0,
               f"--eig_tol={FLAGS.eig_tol}: must be a finite number >= 0", e)
    for name in ("learning_rate", "finder_lr"):
        value = getattr(FLAGS, name)
        _check(math.isfinite(value) and value > 0, f"--{name}={value}: must be > 0", e)
    _check(0 <= FLAGS.momentum < 1, f"--momentum={FLAGS.momentum}: must be in [0, 1)", e)
    _check(FLAGS.train_steps >= 0, f"--train_steps={FLAGS.train_steps}: must be >= 0", e)
    _check(FLAGS.log_every >= 1, f"--log_every={FLAGS.log_every}: must be >= 1", e)
    if FLAGS.finder_steps is not None:
        _check(FLAGS.finder_steps >= 1, f"--finder_steps={FLAGS.finder_steps}: must be >= 1", e)
    if "model" in FLAGS and not e:  # apps that take any model (experiments/model_flags.py)
        from experiments import model_flags

        e.extend(model_flags.model_errors())
    return e


def reduced_nets_errors(activation: str) -> list[str]:
    """Why --reduced_nets cannot embed a smaller net with this activation (empty if it can)."""
    from crit.saddles import check_maskable

    try:
        check_maskable(activation)
    except ValueError as exc:
        return [f"--reduced_nets with --activation={activation}: {exc} (or pass "
                "--noreduced_nets)"]
    return []


def finder_steps() -> int:
    if FLAGS.finder_steps is not None:
        return FLAGS.finder_steps
    return 15 if FLAGS.finder == "newton" else 1000


def set_matmul_precision() -> str:
    """Set ``jax_default_matmul_precision`` from ``--matmul_precision`` (before any compute):
    the value config.json's environment and the fingerprint then record."""
    import jax

    jax.config.update("jax_default_matmul_precision", FLAGS.matmul_precision)
    return FLAGS.matmul_precision


def problem_from_flags():
    """The :class:`crit.problems.Problem` the flags describe (flags already validated); sets
    the run's matmul precision first (:func:`set_matmul_precision`)."""
    set_matmul_precision()
    if "model" in FLAGS:
        from experiments import model_flags

        if FLAGS.model != "mlp" or FLAGS.data_file:
            return model_flags.problem_from_model_flags()
    extra = {}
    if "eval_batch_size" in FLAGS:  # apps that take any model: their MLP batches the loss too
        extra["eval_batch_size"] = FLAGS.eval_batch_size
    if FLAGS.dataset == "gaussian":
        extra.update(dim_in=FLAGS.dim_in, dim_out=FLAGS.dim_out)
    return mlp_problem(dataset=FLAGS.dataset, widths=parse_widths(FLAGS.widths),
                       activation=FLAGS.activation, use_bias=FLAGS.use_bias,
                       loss=None if FLAGS.loss == "auto" else FLAGS.loss, l2=FLAGS.l2,
                       n_points=FLAGS.n_points, data_seed=FLAGS.data_seed, **extra)


class Progress:
    """A one-line text progress bar on stderr: chunks done, inits done, elapsed, ETA."""

    def __init__(self, total: int, label: str = "inits", stream=sys.stderr):
        self.total, self.label, self.stream = total, label, stream
        self.done = 0
        self.start = time.time()

    def update(self, n: int) -> None:
        self.done += n
        elapsed = time.time() - self.start
        frac = self.done / max(self.total, 1)
        eta = elapsed / frac - elapsed if frac > 0 else float("nan")
        bar = "#" * int(30 * frac)
        self.stream.write(f"\r[{bar:<30}] {self.done}/{self.total} {self.label}  "
                          f"{elapsed:6.1f}s elapsed, ETA {eta:6.1f}s")
        if self.done >= self.total:
            self.stream.write("\n")
        self.stream.flush()


def flag_values(module_name: str) -> tuple[dict, dict]:
    """(shared, own): the values of this module's shared flags and of app ``module_name``'s flags."""
    own = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[module_name])}
    shared = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
    if "model" in FLAGS:  # the app takes any model: its flags and the data file's hash count
        from experiments import model_flags

        shared |= {f.name: f.value for f in FLAGS.get_flags_for_module(model_flags)}
        shared["data_sha256"] = model_flags.data_digest()
    return shared, own


def prepare_out_dir(out_dir, config: dict, outputs, chunked: bool = False):
    """``store.prepare_out_dir`` with the app's ``--overwrite``; a refused results directory
    (foreign files, another configuration) stops the app with a usage error naming the problem."""
    try:
        return store.prepare_out_dir(out_dir, config, FLAGS.overwrite, outputs=outputs,
                                     chunked=chunked)
    except store.ResultsDirError as exc:
        raise app.UsageError(str(exc)) from None
