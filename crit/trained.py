r"""A network trained by someone else's code, as crit sees it: parameters, state, a forward pass.

A researcher arrives with a model written one of three ways; each becomes a
:class:`TrainedModel` -- a pure ``apply_fn(params, x, state) -> outputs`` in evaluation
semantics, the trainable parameters ``params`` (a pytree, float64) and the model's state
(BatchNorm statistics; never a parameter, never differentiated):

* ``flax.linen``: a module and its variables dict. ``variables["params"]`` are the
  parameters; every other collection (``batch_stats``, ...) is state
  (:func:`from_linen`).
* ``flax.nnx`` (Flax's recommended API): a module instance. It is split into its graph
  definition, its ``nnx.Param`` leaves (the parameters, as a pure nested dict) and the rest
  (``nnx.BatchStat``, RNG counters, ...) as state, and evaluated in eval mode: dropout off,
  BatchNorm on its running averages (:func:`from_nnx`).
* a plain function ``apply(params, x) -> outputs`` and its parameter pytree
  (:func:`from_function`).

Parameters stored in float32 or bfloat16 (Flax's default ``param_dtype`` is float32) are cast
to float64 for the analysis; the cast is recorded (``TrainedModel.cast_from``), so a report
says which precision the weights came in. The forward pass then runs in float64 wherever the
model's layers promote to their inputs' dtype (``dtype=None``, Flax's default); a layer that
pins ``dtype=float32`` still computes in float32, which :mod:`crit.analysis` detects.

A model with state analysed without it is refused (:class:`TrainedModelError`): evaluating it at
its initialization statistics gives another loss (1.242 instead of 1.146 in one measured case)
and another Hessian, silently.

Losses (:func:`resolve_loss`) follow one signature, ``loss(outputs, targets) -> scalar``, the
*mean* over a batch: ``"mse"``, ``"xent"`` (softmax cross-entropy on integer labels) or a
fork's ``"pkg.mod:fn"`` (e.g. a causal next-token cross-entropy). The full-data objective
(:func:`data_objective`) is crit's: :math:`L(\theta) = \sum_b (n_b/N) L_b(\theta) +
\tfrac{l_2}{2}\lVert\theta\rVert^2` with exact weights however unevenly N divides, and the data
enter as *arguments* ``(x, y)`` of the compiled program, never as constants.
"""

from __future__ import annotations

import hashlib
import importlib
import inspect
from pathlib import Path
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crit.problems import LOSSES, batch_slices, l2_penalty

Params = Any
State = Any
Array = jax.Array

MODEL_KINDS = ("linen", "nnx", "function")
BATCHNORM_MODES = ("eval", "batch")


class TrainedModelError(ValueError):
    """A model, its variables or a loss that crit cannot analyse as given (one clear reason)."""


class TrainedModel(NamedTuple):
    """A trained network as pure functions and arrays; see the module docstring."""

    kind: str
    """``"linen"``, ``"nnx"`` or ``"function"``."""
    apply_fn: Callable[..., Array]
    """``apply_fn(params, x, state) -> outputs`` (eval semantics, or ``batchnorm="batch"``)."""
    params: Params
    """Trainable parameters, floating leaves in float64."""
    state: State
    """Everything else the model keeps (BatchNorm statistics), floats in float64; ``{}``."""
    cast_from: tuple[str, ...]
    """Floating dtypes the parameters came in, other than float64 (e.g. ``("float32",)``)."""
    batchnorm: str
    """``"none"`` (stateless), ``"eval"`` (running statistics) or ``"batch"``."""

    @property
    def n_params(self) -> int:
        return int(sum(np.prod(np.shape(leaf)) for leaf in jax.tree.leaves(self.params)))

    @property
    def has_state(self) -> bool:
        return bool(jax.tree.leaves(self.state))


# --------------------------------------------------------------------------- dtypes


def _float_dtypes(tree) -> tuple[str, ...]:
    names = {str(np.dtype(leaf.dtype)) for leaf in jax.tree.leaves(tree)
             if jnp.issubdtype(leaf.dtype, jnp.floating)}
    return tuple(sorted(names - {"float64"}))


def to_float64(tree):
    """Every floating leaf as float64 (integer and key leaves untouched)."""
    def cast(leaf):
        leaf = jnp.asarray(leaf) if isinstance(leaf, np.ndarray) else leaf
        if hasattr(leaf, "dtype") and jnp.issubdtype(leaf.dtype, jnp.floating):
            return jnp.asarray(leaf, jnp.float64)
        return leaf
    return jax.tree.map(cast, tree)


def _cast_state(state, dtype):
    """Floating leaves of the model state in ``dtype`` (a no-op for float64 parameters)."""
    return jax.tree.map(lambda a: a.astype(dtype) if jnp.issubdtype(a.dtype, jnp.floating)
                        else a, state)


def _cast_input(x, params):
    """Floating data follow the parameters' dtype (float64); integer tokens stay integers."""
    if jnp.issubdtype(x.dtype, jnp.floating):
        return x.astype(jax.tree.leaves(params)[0].dtype)
    return x


# --------------------------------------------------------------------------- linen


def _linen_mode_kw(module):
    from crit.models import takes_train_flag

    if takes_train_flag(module):
        return lambda train: {"train": train}
    return lambda train: {}


def linen_state_collections(module, x_sample) -> tuple[str, ...]:
    """The variable collections other than ``params`` that ``module`` creates on ``x_sample``
    (shapes only, no compute): the state it needs to be evaluated."""
    mode_kw = _linen_mode_kw(module)
    shapes = jax.eval_shape(lambda: module.init({"params": jax.random.key(0),
                                                 "dropout": jax.random.key(1)},
                                                jnp.asarray(x_sample[:1]), **mode_kw(False)))
    return tuple(sorted(k for k in shapes if k != "params"))


def from_linen(module, variables, x_sample=None, batchnorm: str = "eval") -> TrainedModel:
    """A ``flax.linen`` module and its trained variables (``{"params": ..., "batch_stats": ...}``).

    ``x_sample`` (a few input rows) lets crit check, on shapes only, which state collections
    the module needs: a missing one is refused rather than run at initialization statistics.
    ``batchnorm="batch"`` normalizes every evaluation batch with its own statistics.
    """
    import flax.linen as nn

    if not isinstance(module, nn.Module):
        raise TrainedModelError(f"from_linen needs a flax.linen.Module, got {type(module).__name__}")
    if batchnorm not in BATCHNORM_MODES:
        raise TrainedModelError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    variables = dict(variables)
    if "params" not in variables:
        raise TrainedModelError("the linen variables hold no 'params' collection; got "
                                f"{sorted(variables)} (pass module.init(...) as it is, or "
                                "{'params': params, ...})")
    params = {"params": variables["params"]}
    state = {k: v for k, v in variables.items() if k != "params"}
    if x_sample is not None:
        needed = linen_state_collections(module, x_sample)
        missing = [c for c in needed if c not in state]
        if missing:
            raise TrainedModelError(
                f"{type(module).__name__} keeps state {missing} but the variables given hold only "
                f"{sorted(variables)}: pass the trained state too (analysed at its "
                "initialization statistics the loss and the Hessian would be another model's)")
    mode_kw = _linen_mode_kw(module)
    stateful = bool(jax.tree.leaves(state))
    mode = batchnorm if stateful else "none"

    def apply_fn(params, x, state):
        variables = {**params, **state}
        x = _cast_input(x, params)
        if mode == "batch":
            out, _ = module.apply(variables, x, mutable=["batch_stats"], **mode_kw(True))
            return out
        return module.apply(variables, x, **mode_kw(False))

    cast_from = _float_dtypes(params)
    return TrainedModel("linen", apply_fn, to_float64(params), to_float64(state), cast_from,
                        mode)


# --------------------------------------------------------------------------- nnx


def _nnx_eval_copy(module, batchnorm: str):
    """A copy of an NNX module in eval mode (dropout off); BatchNorm on running averages, or on
    each batch's statistics with ``batchnorm="batch"``. The caller's module is not touched."""
    from flax import nnx

    model = nnx.clone(module)
    model.eval()
    if batchnorm == "batch":
        for _, sub in nnx.iter_modules(model):
            if hasattr(sub, "use_running_average"):
                sub.use_running_average = False
    return model


def nnx_has_state(module) -> bool:
    from flax import nnx

    return bool(jax.tree.leaves(nnx.state(module, nnx.BatchStat)))


def from_nnx(module, batchnorm: str = "eval") -> TrainedModel:
    """A ``flax.nnx`` module instance, with its trained weights and statistics in it.

    Split as ``graphdef, params, rest = nnx.split(model, nnx.Param, ...)``: the parameters are
    the ``nnx.Param`` leaves (as a pure nested dict, so paths read ``layer/kernel``), the rest
    is state. The forward pass merges them back into a fresh module every call, so it is a
    pure function of ``(params, x, state)`` and composes with ``jit``, ``vmap`` and ``grad``.
    """
    from flax import nnx

    if not isinstance(module, nnx.Module):
        raise TrainedModelError(f"from_nnx needs a flax.nnx.Module instance, got "
                                f"{type(module).__name__}")
    if batchnorm not in BATCHNORM_MODES:
        raise TrainedModelError(f"batchnorm must be one of {BATCHNORM_MODES}, got {batchnorm!r}")
    model = _nnx_eval_copy(module, batchnorm)
    graphdef, param_state, rest = nnx.split(model, nnx.Param, ...)
    params = nnx.to_pure_dict(param_state)
    cast_from = _float_dtypes(params)
    params = to_float64(params)
    rest = to_float64(rest)  # statistics follow the parameters' dtype
    stateful = nnx_has_state(model)
    mode = batchnorm if stateful else "none"

    def apply_fn(params, x, state):
        p = jax.tree.map(lambda v: v, param_state)
        nnx.replace_by_pure_dict(p, params)
        net = nnx.merge(graphdef, p, state)
        return net(_cast_input(x, params))

    return TrainedModel("nnx", apply_fn, params, rest, cast_from, mode)


# --------------------------------------------------------------------------- plain functions


def from_function(apply, params) -> TrainedModel:
    """A plain ``apply(params, x) -> outputs`` and its parameter pytree (no state)."""
    if not callable(apply):
        raise TrainedModelError(f"from_function needs a callable apply(params, x), got "
                                f"{type(apply).__name__}")
    cast_from = _float_dtypes(params)

    def apply_fn(params, x, state):
        return apply(params, _cast_input(x, params))

    return TrainedModel("function", apply_fn, to_float64(params), {}, cast_from, "none")


def as_trained_model(model, variables=None, x_sample=None,
                     batchnorm: str = "eval") -> TrainedModel:
    """Any of the three: a linen module with ``variables``, an NNX module, or a function with
    its parameters as ``variables``; a :class:`TrainedModel` is returned as it is."""
    import flax.linen as nn
    from flax import nnx

    if isinstance(model, TrainedModel):
        return model
    if isinstance(model, nnx.Module):
        if variables is not None:
            raise TrainedModelError("an NNX module carries its own weights; pass it alone (load "
                                    "a checkpoint into it with crit.trained.load_nnx_weights)")
        return from_nnx(model, batchnorm)
    if isinstance(model, nn.Module):
        if variables is None:
            raise TrainedModelError("a linen module needs its trained variables")
        return from_linen(model, variables, x_sample, batchnorm)
    if callable(model):
        if variables is None:
            raise TrainedModelError("a plain apply(params, x) function needs its parameters")
        return from_function(model, variables)
    raise TrainedModelError(f"cannot analyse a {type(model).__name__}: pass a flax.linen module "
                            "with its variables, a flax.nnx module, or apply(params, x) with its "
                            "parameters")


# --------------------------------------------------------------------------- checkpoints


def nnx_template(module) -> dict:
    """The pure nested dict of an NNX module's state (what ``nnx.state(model)`` saves)."""
    from flax import nnx

    return nnx.to_pure_dict(nnx.state(module))


def load_nnx_weights(module, path) -> None:
    """Read a checkpoint of ``nnx.state(module)`` (Orbax, msgpack or npz) into ``module``, every
    leaf matched by path and shape (:func:`crit.checkpoints.load_checkpoint`); RNG counters and
    keys a checkpoint leaves out keep the module's own."""
    from flax import nnx

    from crit.checkpoints import load_checkpoint

    template = nnx_template(module)
    rng_paths = {"/".join(str(k) for k in path) for path, _ in
                 nnx.to_flat_state(nnx.state(module, nnx.RngState))}
    wanted = _drop_paths(template, rng_paths)
    loaded = load_checkpoint(path, wanted, allow_extra=lambda p: p in rng_paths)
    state = nnx.state(module, nnx.Not(nnx.RngState))
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, loaded))
    nnx.update(module, state)


def _drop_paths(tree: dict, paths: set[str], prefix: str = "") -> dict:
    out = {}
    for k, v in tree.items():
        p = f"{prefix}{k}"
        if isinstance(v, dict):
            sub = _drop_paths(v, paths, p + "/")
            if sub:
                out[k] = sub
        elif p not in paths:
            out[k] = v
    return out


def load_linen_variables(module, path, x_sample) -> dict:
    """Trained variables of a linen ``module`` from a checkpoint (Orbax, msgpack or npz of the
    variables dict): the template is ``module.init`` on ``x_sample`` (shapes only), so every
    collection the module keeps (``batch_stats``) must be in the file."""
    from crit.checkpoints import load_checkpoint

    mode_kw = _linen_mode_kw(module)
    template = jax.eval_shape(lambda: module.init({"params": jax.random.key(0),
                                                   "dropout": jax.random.key(1)},
                                                  jnp.asarray(x_sample[:1]), **mode_kw(False)))
    return load_checkpoint(path, jax.tree.map(lambda s: s, dict(template)))


# --------------------------------------------------------------------------- specs and losses


def import_spec(spec: str, what: str = "--model"):
    """The attribute ``attr`` of module ``pkg.mod`` for ``"pkg.mod:attr"`` (one clear error)."""
    from crit.models import ModelError, import_attribute

    try:
        return import_attribute(spec, what)
    except ModelError as exc:
        raise TrainedModelError(str(exc)) from None


def spec_source_sha256(spec: str | None) -> str | None:
    """SHA-256 of the source file of the module a ``"pkg.mod:attr"`` spec names (None for a
    registry name): a fork edited between two runs is another run."""
    if not spec or ":" not in spec:
        return None
    module = importlib.import_module(spec.split(":", 1)[0])
    try:
        source = Path(inspect.getsourcefile(module)).read_bytes()
    except (TypeError, OSError):
        return None
    return hashlib.sha256(source).hexdigest()


def parse_hparams(items) -> dict:
    """['depth=20', 'channels=6,16', 'norm=none'] -> {'depth': 20, 'channels': (6, 16), ...}
    (values read as Python literals where they parse, else kept as strings)."""
    import ast

    out = {}
    for item in items:
        if "=" not in item:
            raise TrainedModelError(f"--model_arg={item!r}: expected key=value")
        key, text = item.split("=", 1)
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        out[key.strip()] = value
    return out


def build_model(spec: str, hparams: dict | None = None, n_outputs: int | None = None,
                seed: int = 0):
    """Build the model a ``"pkg.mod:attr"`` spec names: a ``flax.linen`` module (instance,
    class or factory), an NNX class or factory (called with ``rngs=nnx.Rngs(seed)``), or a
    plain function (returned as it is). ``n_outputs`` is passed only where the callable takes
    it."""
    import flax.linen as nn
    from flax import nnx

    target = import_spec(spec)
    hparams = dict(hparams or {})
    if isinstance(target, (nn.Module, nnx.Module)):
        if hparams:
            raise TrainedModelError(f"--model={spec} is a module instance; it takes no "
                                    f"hyperparameters (got {sorted(hparams)})")
        return target
    if not callable(target):
        raise TrainedModelError(f"--model={spec} is a {type(target).__name__}, not a module, "
                                "class or function")
    is_nnx_class = inspect.isclass(target) and issubclass(target, nnx.Module)
    is_linen_class = inspect.isclass(target) and issubclass(target, nn.Module)
    try:  # a class's own __init__ (NNX's metaclass shows *args, **kwargs for the class)
        params = dict(inspect.signature(target.__init__ if is_nnx_class else target).parameters)
        params.pop("self", None)
    except (TypeError, ValueError):
        params = {}
    takes = lambda name: name in params or any(  # noqa: E731
        p.kind == p.VAR_KEYWORD for p in params.values())
    kwargs = dict(hparams)
    if n_outputs is not None and takes("n_outputs") and "n_outputs" not in kwargs:
        kwargs["n_outputs"] = n_outputs
    if is_nnx_class or (not is_linen_class and "rngs" in params):
        kwargs["rngs"] = nnx.Rngs(seed)
    elif not is_linen_class and not hparams and "n_outputs" not in params:
        return target  # a plain apply(params, x)
    try:
        built = target(**kwargs)
    except TypeError as exc:
        raise TrainedModelError(f"--model={spec}: {exc}") from None
    if not isinstance(built, (nn.Module, nnx.Module)) and not callable(built):
        raise TrainedModelError(f"--model={spec}: the factory returned {type(built).__name__}")
    return built


def resolve_loss(loss) -> Callable[[Array, Array], Array]:
    """``"mse"``, ``"xent"`` (crit.problems.LOSSES), ``"pkg.mod:fn"`` or a callable
    ``fn(outputs, targets) -> scalar`` (the mean loss of a batch)."""
    if callable(loss):
        return loss
    if loss in LOSSES:
        return LOSSES[loss]
    if isinstance(loss, str) and ":" in loss:
        fn = import_spec(loss, "--loss")
        if not callable(fn):
            raise TrainedModelError(f"--loss={loss} is a {type(fn).__name__}, not a function")
        return fn
    raise TrainedModelError(f"unknown loss {loss!r}; allowed: {sorted(LOSSES)} or "
                            "'some.module:fn' with fn(outputs, targets) the mean loss of a batch")


def data_objective(model: TrainedModel, loss="mse", batch_size: int = 0, l2: float = 0.0):
    r"""``objective(params, data) -> L``: the full-data loss of ``model`` on ``data = (x, y)``.

    :math:`L(\theta) = \sum_b (n_b/N)\,\ell_b(\theta) + \tfrac{l_2}{2}\lVert\theta\rVert^2`
    over batches of ``batch_size`` rows (0: all at once), each under ``jax.checkpoint`` so
    reverse mode keeps one batch's activations; the weights are exact for a short last batch.
    ``data`` is an argument, so a jitted caller compiles no data into its program. The state
    (BatchNorm statistics) is fixed at the model's: it is never differentiated.
    """
    point_loss = resolve_loss(loss)
    state = model.state

    def batch(params, xb, yb):
        # the state follows the parameters' precision, as the inputs do (_cast_input): a
        # float32 search (crit.analysis.search_operator) runs BatchNorm in float32 too
        dtype = jax.tree.leaves(params)[0].dtype
        return point_loss(model.apply_fn(params, xb, _cast_state(state, dtype)), yb)

    def objective(params, data):
        x, y = data
        n = x.shape[0]
        full, rest = batch_slices(n, batch_size)
        if full == 1 and rest == 0:
            total = batch(params, x, y)
        else:
            b = batch_size
            xs = x[:full * b].reshape(full, b, *x.shape[1:])
            ys = y[:full * b].reshape(full, b, *y.shape[1:])
            one = jax.checkpoint(batch)

            def accumulate(acc, xy):
                return acc + one(params, *xy) * (b / n), None

            dtype = jax.tree.leaves(params)[0].dtype
            total, _ = jax.lax.scan(accumulate, jnp.zeros((), dtype), (xs, ys))
            if rest:
                total = total + one(params, x[full * b:], y[full * b:]) * (rest / n)
        return total + 0.5 * l2 * l2_penalty(params) if l2 else total

    return objective


def trained_from_checkpoint(model, checkpoint, x_sample, batchnorm: str = "eval") -> TrainedModel:
    """A :class:`TrainedModel` from a model as built (:func:`build_model`) and its checkpoint
    (Orbax directory, msgpack or npz; :mod:`crit.checkpoints`): an NNX module receives the saved
    ``nnx.state``, a linen module's variables are matched to ``module.init`` on ``x_sample``
    (shapes only), a plain function takes the stored parameter tree as it is. Every mismatch is
    one :class:`crit.checkpoints.CheckpointError` naming the paths, before any compute."""
    import flax.linen as nn
    from flax import nnx

    from crit.checkpoints import read_checkpoint

    if isinstance(model, nnx.Module):
        load_nnx_weights(model, checkpoint)
        return from_nnx(model, batchnorm)
    if isinstance(model, nn.Module):
        return from_linen(model, load_linen_variables(model, checkpoint, x_sample), x_sample,
                          batchnorm)
    params = jax.tree.map(jnp.asarray, read_checkpoint(checkpoint))
    return from_function(model, params)
