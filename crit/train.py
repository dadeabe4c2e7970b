"""Full-batch training with optax, written for one initialization and lifted with ``vmap``.

:func:`train` runs ``num_steps`` optimizer steps inside ``lax.scan`` and records the loss and the
gradient norm ‖∇L‖ every ``log_every`` steps (the homework's "loss and gradient norm vs
iteration"). It holds no state and draws no randomness, so ``jax.vmap(train, ...)`` over a batch
of initial parameters trains many networks in one compiled call.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

Params = Any

OPTIMIZERS = ("adam", "sgd", "momentum")


class TrainLog(NamedTuple):
    """Loss and gradient norm at steps ``0, log_every, 2·log_every, ...`` and at the end."""

    step: jax.Array
    loss: jax.Array
    grad_norm: jax.Array


def make_optimizer(name: str, learning_rate: float, momentum: float = 0.9):
    """``adam`` (β = 0.9, 0.999), plain ``sgd``, or heavy-ball ``momentum`` SGD."""
    if name == "adam":
        return optax.adam(learning_rate)
    if name == "sgd":
        return optax.sgd(learning_rate)
    if name == "momentum":
        return optax.sgd(learning_rate, momentum=momentum)
    raise ValueError(f"unknown optimizer {name!r}; allowed: {list(OPTIMIZERS)}")


def tree_norm(tree) -> jax.Array:
    """Euclidean norm of all leaves of a pytree taken together."""
    return jnp.sqrt(sum(jnp.sum(jnp.square(leaf)) for leaf in jax.tree.leaves(tree)))


def log_steps(num_steps: int, log_every: int) -> jax.Array:
    """The step numbers at which :func:`train` records: 0, k, 2k, ... (< num_steps), num_steps."""
    return jnp.concatenate([jnp.arange(0, num_steps, log_every), jnp.array([num_steps])])


def train(loss_fn: Callable[[Params], jax.Array], optimizer: optax.GradientTransformation,
          params: Params, num_steps: int, log_every: int = 10) -> tuple[Params, TrainLog]:
    """Minimize ``loss_fn`` from ``params`` with ``optimizer`` for ``num_steps`` full-batch steps.

    Returns the final parameters and a :class:`TrainLog` sampled every ``log_every`` steps
    (step 0 is the initialization; the last entry is the returned point).
    """
    value_and_grad = jax.value_and_grad(loss_fn)

    def step(carry, _):
        p, state = carry
        loss, g = value_and_grad(p)
        updates, state = optimizer.update(g, state, p)
        return (optax.apply_updates(p, updates), state), (loss, tree_norm(g))

    def block(carry, _):
        carry, (losses, norms) = jax.lax.scan(step, carry, None, length=log_every)
        return carry, (losses[0], norms[0])

    carry = (params, optimizer.init(params))
    n_blocks, tail = divmod(num_steps, log_every)
    carry, (losses, norms) = jax.lax.scan(block, carry, None, length=n_blocks)
    if tail:
        carry, (tail_losses, tail_norms) = jax.lax.scan(step, carry, None, length=tail)
        losses = jnp.concatenate([losses, tail_losses[:1]])
        norms = jnp.concatenate([norms, tail_norms[:1]])
    params = carry[0]
    final_loss, final_grad = value_and_grad(params)
    losses = jnp.concatenate([losses, final_loss[None]])
    norms = jnp.concatenate([norms, tree_norm(final_grad)[None]])
    return params, TrainLog(log_steps(num_steps, log_every), losses, norms)


def cast_params(params: Params, dtype) -> Params:
    """Cast every floating leaf to ``dtype`` (float32 training, float64 refinement)."""
    return jax.tree.map(lambda x: x.astype(dtype), params)
