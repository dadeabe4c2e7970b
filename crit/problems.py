"""A learning task as pure functions: a model (crit.models), data (crit.data) and a loss.

A :class:`Problem` is everything the rest of crit needs to know about a task:

* ``init_fn(key) -> params``: one random initialization of the *trainable* parameters
  (the Flax ``params`` collection, as ``{"params": ...}``). P counts these and nothing else.
* ``init_state_fn(key) -> state``: the model's state (BatchNorm running statistics,
  ``{"batch_stats": ...}``; ``{}`` for a stateless model). State is never a parameter: it gets
  no gradient, is not trained by the optimizer, and does not enter the Hessian.
* ``loss_fn(params, state=None) -> scalar``: the *full-data* training loss
  L(θ) = Σ_b (n_b / N) · L_b(θ) + (l2/2)·‖θ‖², accumulated over data batches of
  ``eval_batch_size`` rows (all rows at once when 0), with exact weights n_b / N however
  unevenly N divides. Each batch runs under ``jax.checkpoint``, so the gradient and the
  Hessian-vector products of this one function keep the activations of one batch at a time,
  not of all N rows: the trainer, the finders, the dense Hessian and Lanczos all differentiate
  this function, one code path. ``state=None`` means the state at initialization.
* ``batch_loss_fn(params, x, y, state=None) -> scalar``: the same loss on any batch.
* ``train_loss_fn(params, state, x, y, key) -> (loss, new_state)``: the loss in training mode
  (BatchNorm on batch statistics, running averages updated; dropout on with ``key``).
* ``apply_fn(params, x, state=None) -> outputs``: the model in evaluation mode.

BatchNorm semantics of every loss whose derivatives crit takes (``batchnorm``):

* ``"eval"`` (default): running statistics, fixed after training. The loss is an ordinary
  function of θ, the same for any ``eval_batch_size``.
* ``"batch"``: each evaluation batch is normalized with its own mean and variance, and the
  Hessian includes the dependence of the loss through those statistics. The loss then depends
  on ``eval_batch_size`` (record it).
* ``"none"``: the model has no state (no BatchNorm).

Dropout is used in training only; every loss crit differentiates is deterministic.

Everything is a pure function, so a problem composes with ``jit``, ``vmap`` and ``grad``.
Build one with :func:`make_problem` from any ``flax.linen`` module, :func:`model_problem` from
the model registry, or :func:`mlp_problem` for the homework's MLPs.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from crit.data import (DATASETS, Dataset, check_dataset, digits_dataset,  # noqa: F401
                       gaussian_dataset, load_data_file, sign_dataset, sinc_dataset)
from crit.models import get_model, takes_train_flag
from crit.models.mlp import ACTIVATIONS, MLP, mlp_param_count  # noqa: F401

Params = Any
State = Any
Array = jax.Array

BATCHNORM_MODES = ("eval", "batch")


class Problem(NamedTuple):
    """A learning task as pure functions; see the module docstring."""

    name: str
    init_fn: Callable[[Array], Params]
    apply_fn: Callable[..., Array]
    loss_fn: Callable[..., Array]
    batch_loss_fn: Callable[..., Array]
    dataset: Dataset
    n_params: int
    loss_name: str
    init_state_fn: Callable[[Array], State] = lambda key: {}
    train_loss_fn: Callable[..., tuple[Array, State]] | None = None
    batchnorm: str = "none"         # "none" (stateless), "eval" or "batch"
    eval_batch_size: int = 0        # rows per batch of the full-data loss (0: all at once)
    l2: float = 0.0                 # the penalty (l2/2)·‖θ‖² inside loss_fn and batch_loss_fn
    # Data passed as arguments (crit.data_parallel.shard_data): ``with_data(data_args)`` is
    # ``loss_fn`` reading ``data_args`` (arrays, possibly traced) instead of compiled-in
    # constants; None for a problem whose data are constants. See crit.data_parallel.jit_with_data.
    data_args: Any = None
    with_data: Callable[[Any], Callable[..., Array]] | None = None

    @property
    def phi(self) -> float:
        """Parameters per training target, φ = P / (n · k) (Pennington & Bahri's ratio)."""
        k = self.dataset.n_outputs if self.dataset.task == "regression" else 1
        return self.n_params / (self.dataset.n_train * k)

    @property
    def has_state(self) -> bool:
        return self.batchnorm != "none"

    def bind_state(self, state: State) -> Callable[[Params], Array]:
        """θ ↦ L(θ; state): the full-data loss with the state fixed (e.g. after training)."""
        return lambda params: self.loss_fn(params, state)


# --------------------------------------------------------------------------- losses

def mse(outputs: Array, targets: Array) -> Array:
    """Mean squared error, (1/(n·k)) Σ_i Σ_j (f_j(x_i) − y_ij)², no ½ factor."""
    return jnp.mean((outputs - targets.astype(outputs.dtype)) ** 2)


def softmax_xent(logits: Array, labels: Array) -> Array:
    """Mean softmax cross-entropy, −(1/n) Σ_i log softmax(f(x_i))_{y_i}."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


LOSSES: dict[str, Callable[[Array, Array], Array]] = {"mse": mse, "xent": softmax_xent}


def l2_penalty(params: Params) -> Array:
    """‖θ‖² summed over every leaf."""
    return sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(params))


def count_params(params: Params) -> int:
    return int(sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(params)))


def batch_slices(n: int, batch_size: int) -> tuple[int, int]:
    """(full batches, rows left over) of n rows in batches of ``batch_size`` (0: one batch)."""
    if not batch_size or batch_size >= n:
        return 1, 0
    return n // batch_size, n % batch_size


def make_problem(module: nn.Module, data: Dataset, loss: str = "mse", l2: float = 0.0,
                 name: str | None = None, batchnorm: str = "eval",
                 eval_batch_size: int = 0) -> Problem:
    """Bundle a Flax module, a data set and a loss into a :class:`Problem` (module docstring).

    The loss is L(θ) = (1/n) Σ_i ℓ(f_θ(x_i), y_i) + (l2/2)·‖θ‖² over the full training set;
    the L2 term covers trainable parameters only. Floating data are cast to the parameters'
    dtype, so float32 training works unchanged; integer tokens are passed as they are.
    ``batchnorm`` ("eval" or "batch") matters only for a model with state; ``--batchnorm=batch``
    is refused for a model that draws dropout randomness in training mode, since its loss
    would not be deterministic.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown loss {loss!r}; allowed: {sorted(LOSSES)}")
    if loss == "xent" and data.task != "classification":
        raise ValueError(f"loss 'xent' needs a classification data set; {data.name!r} is "
                         f"{data.task}")
    if loss == "mse" and data.task == "classification":
        raise ValueError(f"loss 'mse' needs real-valued targets; {data.name!r} has class labels "
                         "(use loss 'xent')")
    if l2 < 0:
        raise ValueError(f"l2 must be >= 0, got {l2}")
    if batchnorm not in BATCHNORM_MODES:
        raise ValueError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    if eval_batch_size < 0:
        raise ValueError(f"eval_batch_size must be >= 0, got {eval_batch_size}")
    check_dataset(data)
    point_loss = LOSSES[loss]
    # host arrays: they enter a jitted loss as constants and are never copied to a device up
    # front (with crit.data_parallel.shard_data each device receives only its share)
    x_train = np.asarray(data.x_train)
    y_train = np.asarray(data.y_train)
    n_train = int(x_train.shape[0])
    train_flag = takes_train_flag(module)
    mode_kw = (lambda train: {"train": train}) if train_flag else (lambda train: {})

    def cast(x, params):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return x
        return x.astype(jax.tree.leaves(params)[0].dtype)

    def init_variables(key):
        # the params stream is ``key`` itself, as in module.init(key, ...): same draws as before
        rngs = {"params": key, "dropout": jax.random.fold_in(key, 1)}
        return module.init(rngs, x_train[:1], **mode_kw(False))

    def init_fn(key):
        return {"params": init_variables(key)["params"]}

    def init_state_fn(key):
        # Flax keeps BatchNorm statistics in float32 whatever param_dtype says; crit's state
        # follows the parameters' dtype (float64), so a float64 loss is float64 throughout
        variables = init_variables(key)
        dtype = jax.tree.leaves(variables["params"])[0].dtype
        return jax.tree.map(lambda v: v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating)
                            else v, {k: v for k, v in variables.items() if k != "params"})

    state_shapes = jax.eval_shape(init_state_fn, jax.random.key(0))
    stateful = bool(jax.tree.leaves(state_shapes))
    mode = batchnorm if stateful else "none"
    default_state = init_state_fn(jax.random.PRNGKey(0)) if stateful else {}

    def forward(params, state, x):
        variables = {**params, **(default_state if state is None else state)}
        x = cast(x, params)
        if mode == "batch":  # the batch's own statistics; running averages left untouched
            out, _ = module.apply(variables, x, mutable=["batch_stats"], **mode_kw(True))
            return out
        return module.apply(variables, x, **mode_kw(False))

    def regularized(value, params):
        return value + 0.5 * l2 * l2_penalty(params) if l2 else value

    def apply_fn(params, x, state=None):
        return forward(params, state, x)

    def batch_loss_fn(params, x, y, state=None):
        return regularized(point_loss(forward(params, state, x), y), params)

    full_batches, rest = batch_slices(n_train, eval_batch_size)

    def loss_fn(params, state=None):
        if full_batches == 1 and rest == 0:
            return batch_loss_fn(params, x_train, y_train, state)
        b = eval_batch_size
        xs = x_train[:full_batches * b].reshape(full_batches, b, *x_train.shape[1:])
        ys = y_train[:full_batches * b].reshape(full_batches, b, *y_train.shape[1:])
        # checkpoint: reverse mode keeps each batch's inputs, not its activations
        one = jax.checkpoint(lambda p, xb, yb: point_loss(forward(p, state, xb), yb))

        def accumulate(total, batch):
            return total + one(params, *batch) * (b / n_train), None

        dtype = jax.tree.leaves(params)[0].dtype
        total, _ = jax.lax.scan(accumulate, jnp.zeros((), dtype), (xs, ys))
        if rest:
            tail = slice(full_batches * b, n_train)
            total = total + one(params, x_train[tail], y_train[tail]) * (rest / n_train)
        return regularized(total, params)

    def train_loss_fn(params, state, x, y, key):
        variables = {**params, **state}
        x = cast(x, params)
        if stateful:
            out, updates = module.apply(variables, x, mutable=["batch_stats"],
                                        rngs={"dropout": key}, **mode_kw(True))
            state = {**state, **updates}
        else:
            out = module.apply(variables, x, rngs={"dropout": key}, **mode_kw(True))
        return regularized(point_loss(out, y), params), state

    if mode == "batch":
        try:
            jax.eval_shape(lambda p: forward(p, None, x_train[:2]),
                           jax.eval_shape(init_fn, jax.random.key(0)))
        except Exception as exc:
            if "dropout" in str(exc).lower() or "rng" in str(exc).lower():
                raise ValueError("batchnorm 'batch' needs a model without dropout in training "
                                 "mode: its loss would not be deterministic; use 'eval'"
                                 ) from None
            raise
    n_params = count_params(jax.eval_shape(init_fn, jax.random.key(0)))
    return Problem(name or data.name, init_fn, apply_fn, loss_fn, batch_loss_fn, data,
                   n_params, loss, init_state_fn, train_loss_fn, mode, int(eval_batch_size),
                   float(l2))


def model_problem(model: str = "mlp", dataset: str | Dataset = "sinc", loss: str | None = None,
                  l2: float = 0.0, batchnorm: str = "eval", eval_batch_size: int = 0,
                  n_points: int = 256, data_seed: int = 0, data_kwargs: dict | None = None,
                  **hparams) -> Problem:
    """A registry model (crit.models, or ``module:factory``) on a registry data set or a
    :class:`Dataset` (e.g. from :func:`crit.data.load_data_file`); shapes from the data.

    ``loss=None`` picks MSE for regression and softmax cross-entropy for classification. A
    transformer on integer tokens gets ``vocab_size`` = max token + 1 unless given.
    """
    if isinstance(dataset, str):
        if dataset not in DATASETS:
            raise ValueError(f"unknown dataset {dataset!r}; allowed: {sorted(DATASETS)}")
        data = DATASETS[dataset](n_points=n_points, seed=data_seed, **(data_kwargs or {}))
    else:
        data = dataset
    if loss is None:
        loss = "xent" if data.task == "classification" else "mse"
    if (model == "transformer" and np.issubdtype(data.x_train.dtype, np.integer)
            and not hparams.get("vocab_size")):
        tokens = np.concatenate([data.x_train.ravel(), data.x_test.ravel()])
        hparams["vocab_size"] = int(tokens.max()) + 1
    module = get_model(model, data.n_outputs, **hparams)
    name = f"{data.name}/{model}"
    if model == "mlp":
        widths = tuple(module.widths)
        arch = "-".join(str(d) for d in [int(np.prod(data.x_train.shape[1:])), *widths,
                                         data.n_outputs])
        name = f"{data.name}/mlp{arch}/{module.activation}"
    return make_problem(module, data, loss, l2, name=name, batchnorm=batchnorm,
                        eval_batch_size=eval_batch_size)


def mlp_problem(dataset: str = "sinc", widths: Sequence[int] = (16, 16),
                activation: str = "tanh", use_bias: bool = True, loss: str | None = None,
                l2: float = 0.0, n_points: int = 256, data_seed: int = 0,
                eval_batch_size: int = 0, **data_kwargs) -> Problem:
    """The standard crit problem: an :class:`MLP` on one of :data:`DATASETS`.

    ``loss=None`` picks MSE for regression and softmax cross-entropy for classification.
    The default (1-16-16-1 tanh on sinc, 256 points) is the course's homework workload, P = 321.
    """
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; allowed: {sorted(DATASETS)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {sorted(ACTIVATIONS)}")
    if any(int(w) <= 0 for w in widths):
        raise ValueError(f"widths must be positive integers, got {list(widths)}")
    return model_problem("mlp", dataset, loss, l2, eval_batch_size=eval_batch_size,
                         n_points=n_points, data_seed=data_seed, data_kwargs=data_kwargs,
                         widths=tuple(int(w) for w in widths), activation=activation,
                         use_bias=use_bias)


def flatten(params: Params) -> tuple[Array, Callable[[Array], Params]]:
    """``ravel_pytree``: the flat parameter vector θ ∈ R^P and the function that undoes it."""
    return ravel_pytree(params)
