"""Models: one registry, lazily imported, plus ``module:factory`` for a fork's own Flax module.

Every model is a ``flax.linen.Module`` called as ``model(x, train=False)`` with parameters in
float64 (data are cast to the parameters' dtype, so float32 training works unchanged).
``train=True`` is training mode: BatchNorm normalizes with the batch's statistics and updates
its running averages (collection ``batch_stats``), dropout is on. Parameters live in the
collection ``params``; everything else a model keeps (``batch_stats``) is *state*, never a
parameter: crit takes gradients, Hessians and P over ``params`` only (crit.problems).

=============  =========================================================  =================
name           model                                                      input
=============  =========================================================  =================
mlp            fully connected, tanh/relu/..., any hidden widths           (n, ...) flattened
cnn            LeNet-style: [conv 5 → act → avg-pool 2] × 2 → dense → out  (n, H, W, C), (n, L, C)
resnet         CIFAR ResNet (He et al. 2016) with BatchNorm, depth 6k+2    (n, H, W, C)
transformer    pre-LayerNorm encoder, multi-head attention, mean pool     (n, L) tokens, (n, L, C),
                                                                          (n, H, W, C) patches
=============  =========================================================  =================

``get_model("some.module:factory", n_outputs, **hparams)`` imports ``some.module`` and calls
``factory(n_outputs=..., **hparams)`` (a function returning a module, or a Module class); a
module *instance* is used as it is. Its ``__call__`` should take ``train`` if it has BatchNorm
or dropout; without it, the model is evaluated as it is.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Callable

import flax.linen as nn

# name -> (module path, factory name, default hyperparameters)
MODELS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "mlp": ("crit.models.mlp", "MLP", {"widths": (16, 16), "activation": "tanh",
                                       "use_bias": True}),
    "cnn": ("crit.models.cnn", "CNN", {"channels": (6, 16), "hidden": (64,),
                                       "activation": "relu", "kernel": 5, "conv": "auto"}),
    "resnet": ("crit.models.resnet", "ResNet", {"depth": 20, "width": 16, "norm": "batch",
                                             "conv": "auto"}),
    "transformer": ("crit.models.transformer", "Transformer",
                    {"dim": 32, "depth": 2, "heads": 4, "mlp_dim": 64, "patch": 4,
                     "vocab_size": 0, "dropout": 0.0}),
}


class ModelError(ValueError):
    """An unknown model name, a bad import spec, or hyperparameters the model does not take."""


def model_names() -> list[str]:
    return sorted(MODELS)


def resolve_factory(spec: str) -> tuple[Callable[..., nn.Module], dict[str, Any]]:
    """(factory, default hyperparameters) for a registry name or ``module:attribute``."""
    if spec in MODELS:
        path, attr, defaults = MODELS[spec]
        return getattr(importlib.import_module(path), attr), dict(defaults)
    if ":" not in spec:
        raise ModelError(f"unknown model {spec!r}; known: {', '.join(model_names())}, or "
                         "'some.module:factory' for your own Flax module")
    return import_attribute(spec), {}


def import_attribute(spec: str, what: str = "--model"):
    """The attribute ``attr`` of module ``pkg.mod`` for ``"pkg.mod:attr"``; one
    :class:`ModelError` naming ``what`` for a bad spec, a failed import or a missing name."""
    if ":" not in spec:
        raise ModelError(f"{what}={spec}: expected 'some.module:attribute'")
    path, attr = spec.split(":", 1)
    try:
        module = importlib.import_module(path)
    except Exception as exc:
        raise ModelError(f"{what}={spec}: cannot import {path!r} ({exc})") from None
    if not hasattr(module, attr):
        raise ModelError(f"{what}={spec}: module {path!r} has no attribute {attr!r}")
    return getattr(module, attr)


def get_model(spec: str, n_outputs: int, **hparams) -> nn.Module:
    """The Flax module for registry name or import spec ``spec`` with ``n_outputs`` outputs.

    Registry models take their defaults (``MODELS``) overridden by ``hparams``; an unknown
    hyperparameter raises :class:`ModelError` listing the ones the model takes.
    """
    factory, defaults = resolve_factory(spec)
    if isinstance(factory, nn.Module):
        if hparams:
            raise ModelError(f"--model={spec} is a module instance; it takes no hyperparameters "
                             f"(got {sorted(hparams)})")
        return factory
    params = dict(defaults, **hparams)
    if defaults:
        unknown = sorted(set(hparams) - set(defaults))
        if unknown:
            raise ModelError(f"model {spec!r} does not take {unknown}; it takes "
                             f"{sorted(defaults)}")
    try:
        model = factory(n_outputs=n_outputs, **params)
    except TypeError as exc:
        raise ModelError(f"--model={spec}: {exc}") from None
    if not isinstance(model, nn.Module):
        raise ModelError(f"--model={spec}: the factory returned {type(model).__name__}, not a "
                         "flax.linen.Module")
    return model


def takes_train_flag(model: nn.Module) -> bool:
    """Whether ``model.__call__`` accepts ``train=`` (BatchNorm / dropout switch)."""
    try:
        return "train" in inspect.signature(type(model).__call__).parameters
    except (TypeError, ValueError):
        return False
