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


def snapshot_steps(num_steps: int, record_every: int):
    """The steps at which :func:`train_with_snapshots` keeps θ: 0, r, 2r, ... (< num_steps), num_steps."""
    import numpy as np

    return np.concatenate([np.arange(num_steps // record_every) * record_every, [num_steps]])


def train_with_snapshots(loss_fn: Callable[[Params], jax.Array],
                         optimizer: optax.GradientTransformation, params: Params,
                         num_steps: int, record_every: int) -> Params:
    """Full-batch training like :func:`train`, keeping the parameters every ``record_every`` steps.

    Returns θ at :func:`snapshot_steps` stacked on a leading axis of length S (a pytree like
    ``params`` with an extra first axis). One initialization; ``vmap`` it over many.
    """
    grad_fn = jax.grad(loss_fn)

    def step(carry, _):
        p, state = carry
        updates, state = optimizer.update(grad_fn(p), state, p)
        return (optax.apply_updates(p, updates), state), None

    def block(carry, _):
        snapshot = carry[0]
        carry, _ = jax.lax.scan(step, carry, None, length=record_every)
        return carry, snapshot

    n_blocks, tail = divmod(num_steps, record_every)
    carry, snaps = jax.lax.scan(block, (params, optimizer.init(params)), None, length=n_blocks)
    if tail:
        carry, _ = jax.lax.scan(step, carry, None, length=tail)
    return jax.tree.map(lambda s, last: jnp.concatenate([s, last[None]]), snaps, carry[0])


def minibatch_train(batch_loss_fn: Callable, optimizer: optax.GradientTransformation,
                    params: Params, x: jax.Array, y: jax.Array, key: jax.Array,
                    batch_size: int, epochs: int, record_every: int = 0):
    """Mini-batch training in ``lax.scan``: a fresh permutation of the n points every epoch.

    Each epoch visits ⌊n / batch_size⌋ disjoint batches (the remainder of the permutation is
    skipped that epoch). Returns the final parameters; with ``record_every > 0`` also θ at steps
    0, r, 2r, ... and the last step, stacked on a leading axis. One initialization; vmap it.
    """
    n = x.shape[0]
    per_epoch = n // batch_size
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, epochs))
    batches = perms[:, :per_epoch * batch_size].reshape(epochs * per_epoch, batch_size)
    grad_fn = jax.grad(batch_loss_fn)

    def step(carry, idx):
        p, state = carry
        updates, state = optimizer.update(grad_fn(p, x[idx], y[idx]), state, p)
        return (optax.apply_updates(p, updates), state), None

    carry = (params, optimizer.init(params))
    if not record_every:
        return jax.lax.scan(step, carry, batches)[0][0]

    def block(carry, idx_block):
        snapshot = carry[0]
        return jax.lax.scan(step, carry, idx_block)[0], snapshot

    n_blocks = batches.shape[0] // record_every
    body = batches[:n_blocks * record_every].reshape(n_blocks, record_every, batch_size)
    carry, snaps = jax.lax.scan(block, carry, body)
    carry, _ = jax.lax.scan(step, carry, batches[n_blocks * record_every:])
    snaps = jax.tree.map(lambda s, last: jnp.concatenate([s, last[None]]), snaps, carry[0])
    return carry[0], snaps


def train_model(problem, optimizer: optax.GradientTransformation, params: Params, state,
                key: jax.Array, num_steps: int, log_every: int = 10, batch_size: int = 0,
                keep_snapshots: bool = False):
    """Train a problem that has state (BatchNorm) or uses mini-batches; one init, vmap-able.

    Each step takes ``problem.train_loss_fn`` on a batch of ``batch_size`` rows (0: all rows),
    drawn without replacement from a fresh permutation every epoch, in training mode: BatchNorm
    normalizes with the batch's statistics and updates its running averages in ``state``,
    dropout draws from ``key``. The optimizer sees the trainable parameters only. The log
    records the *full-data* loss and gradient norm of ``problem.loss_fn`` (evaluation mode,
    the current state) at steps 0, log_every, ... and the end, like :func:`train`.

    Returns ``(params, state, TrainLog)``; with ``keep_snapshots`` also ``(params, state)``
    at every logged step, stacked on a leading axis (the training path). For a stateless
    problem trained full batch, :func:`train` computes the same in one pass and is what the
    protocol uses.
    """
    n = problem.dataset.n_train
    x = jnp.asarray(problem.dataset.x_train)
    y = jnp.asarray(problem.dataset.y_train)
    batch = n if not batch_size or batch_size >= n else batch_size
    per_epoch = n // batch
    grad_fn = jax.grad(problem.train_loss_fn, has_aux=True)
    full = jax.value_and_grad(problem.loss_fn)

    def rows(step):
        epoch, within = jnp.divmod(step, per_epoch)
        perm = (jnp.arange(n) if batch == n
                else jax.random.permutation(jax.random.fold_in(key, epoch), n))
        return jax.lax.dynamic_slice_in_dim(perm, within * batch, batch)

    def step(carry, i):
        p, s, opt = carry
        idx = rows(i)
        g, new = grad_fn(p, s, x[idx], y[idx], jax.random.fold_in(jax.random.fold_in(key, 1), i))
        s = jax.tree.map(lambda a, b: a.astype(b.dtype), new, s)  # statistics keep their dtype
        updates, opt = optimizer.update(g, opt, p)
        return (optax.apply_updates(p, updates), s, opt), None

    def record(carry):
        loss, g = full(carry[0], carry[1])
        return (loss, tree_norm(g)) + ((carry[0], carry[1]) if keep_snapshots else ())

    def block(carry, start):
        logged = record(carry)
        carry, _ = jax.lax.scan(step, carry, start + jnp.arange(log_every))
        return carry, logged

    def append(stacked, one):
        return jax.tree.map(lambda a, b: jnp.concatenate([a, b[None]]), stacked, one)

    carry = (params, state, optimizer.init(params))
    n_blocks, tail = divmod(num_steps, log_every)
    carry, logged = jax.lax.scan(block, carry, jnp.arange(n_blocks) * log_every)
    if tail:
        logged = append(logged, record(carry))
        carry, _ = jax.lax.scan(step, carry, n_blocks * log_every + jnp.arange(tail))
    logged = append(logged, record(carry))
    log = TrainLog(log_steps(num_steps, log_every), logged[0], logged[1])
    if keep_snapshots:
        return carry[0], carry[1], log, (logged[2], logged[3])
    return carry[0], carry[1], log
