"""Data sets, models and losses, bundled into a :class:`Problem`.

A :class:`Problem` is everything the rest of crit needs to know about a learning task:

* ``init_fn(key) -> params`` draws one random initialization (a parameter pytree),
* ``loss_fn(params) -> scalar`` is the *full-batch* training loss (it closes over the data),
* ``batch_loss_fn(params, x, y) -> scalar`` is the same loss on any batch (mean over its rows),
* ``apply_fn(params, x) -> outputs`` runs the model.

Everything is a pure function, so a problem composes with ``jit``, ``vmap`` and ``grad``.
A fork adds a data set to :data:`DATASETS` or builds a :class:`Problem` directly with
:func:`make_problem` from its own ``flax.linen`` module.

Data sets (all generated or shipped with a package; nothing is downloaded):

* ``sinc``  -- y = sin(5πx)/(5πx) on x ∈ [1e-4, 1] (MLDS 2018 homework 1-1 / 1-2),
* ``sign``  -- y = sgn(sin(5πx)) on the same grid,
* ``gaussian`` -- x ~ N(0, I_d), y ~ N(0, I_k) independent (Pennington & Bahri 2017),
* ``digits`` -- scikit-learn's 8×8 handwritten digits (1797 images, 10 classes), pixels / 16.
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

Params = Any
Array = jax.Array


class Dataset(NamedTuple):
    """A full-batch data set: train and test arrays plus what kind of task it is.

    ``y`` holds float targets of shape (n, k) for regression, or integer labels of shape (n,)
    for classification.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    task: str  # "regression" | "classification"
    n_outputs: int  # output width the model needs

    @property
    def n_train(self) -> int:
        return int(self.x_train.shape[0])


class Problem(NamedTuple):
    """A learning task as pure functions; see the module docstring."""

    name: str
    init_fn: Callable[[Array], Params]
    apply_fn: Callable[[Params, Array], Array]
    loss_fn: Callable[[Params], Array]
    batch_loss_fn: Callable[[Params, Array, Array], Array]
    dataset: Dataset
    n_params: int
    loss_name: str

    @property
    def phi(self) -> float:
        """Parameters per training target, φ = P / (n · k) (Pennington & Bahri's ratio)."""
        k = self.dataset.n_outputs if self.dataset.task == "regression" else 1
        return self.n_params / (self.dataset.n_train * k)


# --------------------------------------------------------------------------- data sets

X_MIN, X_MAX = 1e-4, 1.0


def _grid_and_test(n_points: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Train inputs on an even grid of [1e-4, 1]; test inputs drawn uniformly at random."""
    x_train = np.linspace(X_MIN, X_MAX, n_points)[:, None]
    rng = np.random.default_rng(seed + 7919)
    x_test = np.sort(rng.uniform(X_MIN, X_MAX, size=(max(n_points // 4, 1), 1)), axis=0)
    return x_train, x_test


def sinc_dataset(n_points: int = 256, seed: int = 0) -> Dataset:
    """y = sin(5πx) / (5πx) = ``np.sinc(5x)`` on an even grid of ``n_points`` in [1e-4, 1]."""
    x_train, x_test = _grid_and_test(n_points, seed)
    return Dataset("sinc", x_train, np.sinc(5 * x_train), x_test, np.sinc(5 * x_test),
                   "regression", 1)


def sign_dataset(n_points: int = 256, seed: int = 0) -> Dataset:
    """y = sgn(sin(5πx)) on an even grid of ``n_points`` in [1e-4, 1]."""
    x_train, x_test = _grid_and_test(n_points, seed)
    f = lambda x: np.sign(np.sin(5 * np.pi * x))
    return Dataset("sign", x_train, f(x_train), x_test, f(x_test), "regression", 1)


def gaussian_dataset(n_points: int = 256, seed: int = 0, dim_in: int = 8,
                     dim_out: int = 1) -> Dataset:
    """Independent standard Gaussian inputs and targets (Pennington & Bahri 2017, §5).

    Targets carry no signal: the loss surface is that of fitting noise, which is the setting
    of their random-matrix prediction for the index.
    """
    rng = np.random.default_rng(seed)
    n_test = max(n_points // 4, 1)
    x = rng.standard_normal((n_points + n_test, dim_in))
    y = rng.standard_normal((n_points + n_test, dim_out))
    return Dataset("gaussian", x[:n_points], y[:n_points], x[n_points:], y[n_points:],
                   "regression", dim_out)


def digits_dataset(n_points: int = 1437, seed: int = 0, downsample: int = 1) -> Dataset:
    """scikit-learn's 8×8 digits, pixels scaled to [0, 1], shuffled with ``seed``.

    ``n_points`` training images (at most 1797 − 1); the rest are the test set.
    ``downsample=2`` averages 2×2 pixel blocks (4×4 images, 16 inputs).
    """
    from sklearn.datasets import load_digits  # shipped with scikit-learn; no download

    bunch = load_digits()
    images = bunch.images.astype(np.float64) / 16.0
    if downsample > 1:
        s = downsample
        images = images.reshape(-1, 8 // s, s, 8 // s, s).mean(axis=(2, 4))
    x = images.reshape(len(images), -1)
    y = bunch.target.astype(np.int32)
    order = np.random.default_rng(seed).permutation(len(x))
    x, y = x[order], y[order]
    n = min(n_points, len(x) - 1)
    return Dataset("digits", x[:n], y[:n], x[n:], y[n:], "classification", 10)


DATASETS: dict[str, Callable[..., Dataset]] = {
    "sinc": sinc_dataset,
    "sign": sign_dataset,
    "gaussian": gaussian_dataset,
    "digits": digits_dataset,
}


def check_dataset(data: Dataset) -> None:
    """Raise ``ValueError`` naming the array if a data set holds NaN/inf or mismatched shapes."""
    for field in ("x_train", "y_train", "x_test", "y_test"):
        arr = np.asarray(getattr(data, field))
        if arr.dtype.kind == "f" and not np.all(np.isfinite(arr)):
            raise ValueError(f"data set {data.name!r}: {field} contains NaN or inf values")
    if data.x_train.shape[0] != data.y_train.shape[0]:
        raise ValueError(f"data set {data.name!r}: x_train has {data.x_train.shape[0]} rows but "
                         f"y_train has {data.y_train.shape[0]}")
    if data.x_train.shape[0] == 0:
        raise ValueError(f"data set {data.name!r} has no training points")


# --------------------------------------------------------------------------- models

ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
}


class MLP(nn.Module):
    """Fully connected network: Dense → activation, repeated, then a linear output layer.

    ``widths`` are the hidden widths; ``n_outputs`` the output width. Parameters are float64.
    """

    widths: Sequence[int]
    n_outputs: int
    activation: str = "tanh"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x):
        act = ACTIVATIONS[self.activation]
        # one input feature (sinc, sign): x·W is an outer product; a broadcast multiply computes
        # the same numbers and spares XLA a K = 1 matmul (about 20% of a training step on CPU)
        dot = _outer_product_dot if x.shape[-1] == 1 else jax.lax.dot_general
        for w in self.widths:
            x = act(nn.Dense(w, use_bias=self.use_bias, param_dtype=jnp.float64,
                             dot_general=dot)(x))
            dot = jax.lax.dot_general
        return nn.Dense(self.n_outputs, use_bias=self.use_bias, param_dtype=jnp.float64,
                        dot_general=dot)(x)


def _outer_product_dot(lhs, rhs, dimension_numbers, precision=None,
                       preferred_element_type=None):
    """``lax.dot_general`` for a Dense layer with one input feature: (..., 1) · (1, m) → (..., m)."""
    (lhs_contract, rhs_contract), batch = dimension_numbers
    if (lhs.shape[-1] != 1 or tuple(lhs_contract) != (lhs.ndim - 1,)
            or tuple(rhs_contract) != (0,) or any(batch)):
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision,
                                   preferred_element_type=preferred_element_type)
    out = lhs * rhs[0]
    return out if preferred_element_type is None else out.astype(preferred_element_type)


def mlp_param_count(n_inputs: int, widths: Sequence[int], n_outputs: int,
                    use_bias: bool = True) -> int:
    """P = Σ_l (d_l · d_{l+1} + d_{l+1}·[bias]) over the layers of an MLP."""
    dims = [n_inputs, *widths, n_outputs]
    return sum(a * b + (b if use_bias else 0) for a, b in zip(dims[:-1], dims[1:]))


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


def make_problem(module: nn.Module, data: Dataset, loss: str = "mse", l2: float = 0.0,
                 name: str | None = None) -> Problem:
    """Bundle a Flax module, a data set and a loss into a :class:`Problem`.

    The loss is L(θ) = (1/n) Σ_i ℓ(f_θ(x_i), y_i) + (l2/2)·‖θ‖², over the full training set.
    The data are cast to the dtype of the parameters, so float32 training works unchanged.
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
    check_dataset(data)
    point_loss = LOSSES[loss]
    x_train = jnp.asarray(data.x_train)
    y_train = jnp.asarray(data.y_train)

    def init_fn(key):
        return module.init(key, x_train[:1])

    def apply_fn(params, x):
        dtype = jax.tree.leaves(params)[0].dtype
        return module.apply(params, x.astype(dtype))

    def batch_loss_fn(params, x, y):
        value = point_loss(apply_fn(params, x), y)
        if l2:
            value = value + 0.5 * l2 * l2_penalty(params)
        return value

    def loss_fn(params):
        return batch_loss_fn(params, x_train, y_train)

    shapes = jax.eval_shape(init_fn, jax.random.key(0))
    n_params = sum(math.prod(s.shape) for s in jax.tree.leaves(shapes))
    return Problem(name or data.name, init_fn, apply_fn, loss_fn, batch_loss_fn, data,
                   n_params, loss)


def mlp_problem(dataset: str = "sinc", widths: Sequence[int] = (16, 16),
                activation: str = "tanh", use_bias: bool = True, loss: str | None = None,
                l2: float = 0.0, n_points: int = 256, data_seed: int = 0,
                **data_kwargs) -> Problem:
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
    data = DATASETS[dataset](n_points=n_points, seed=data_seed, **data_kwargs)
    if loss is None:
        loss = "xent" if data.task == "classification" else "mse"
    module = MLP(tuple(int(w) for w in widths), data.n_outputs, activation, use_bias)
    arch = "-".join(str(d) for d in [data.x_train.shape[1], *widths, data.n_outputs])
    return make_problem(module, data, loss, l2, name=f"{dataset}/mlp{arch}/{activation}")


def flatten(params: Params) -> tuple[Array, Callable[[Array], Params]]:
    """``ravel_pytree``: the flat parameter vector θ ∈ R^P and the function that undoes it."""
    return ravel_pytree(params)
