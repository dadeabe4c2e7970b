"""Two-parameter toy losses with closed-form gradients and Hessians (REFERENCES §2, §4).

The lecture's toy network is y = w1·w2·x trained on the single pair (x, ŷ) = (1, 1) with the
squared error, so with θ = (w1, w2) and residual r = 1 − w1·w2

    L(θ) = (1 − w1·w2)² = r²,
    ∇L   = (−2·w2·r, −2·w1·r),
    H    = [[2·w2²,        4·w1·w2 − 2],
            [4·w1·w2 − 2,  2·w1²      ]].

Its critical points are

* the origin, a strict saddle: H = [[0, −2], [−2, 0]] with eigenpairs (−2, (1, 1)/√2) and
  (+2, (1, −1)/√2). Along the escape direction u = (1, 1)/√2 the loss is exactly
  L(t·u) = (1 − t²/2)² = 1 − t² + t⁴/4, whose quadratic part is L(0) + ½·λ·t² with λ = −2;
* the valley w1·w2 = 1, a one-dimensional family of global minima with L = 0. There
  H = 2·(w2, w1)ᵀ(w2, w1) has eigenvalues {0, 2(w1² + w2²)}: the null direction is tangent to
  the hyperbola, (w1, −w2) up to scale.

So a bare ``λ > 0`` count gives the minimum ratio 1/2 at the saddle and at every minimum
(the null eigenvalue is not > 0), and only a tolerance-aware classification
(:func:`crit.spectrum.classify_spectrum`) separates them: (n_neg, n_pos) = (1, 1) at the saddle
against (n_pos, n_null) = (1, 1) in the valley.

Gradient flow θ' = −∇L conserves the balance w1² − w2² (d/dt (w1² − w2²) = −2w1·∂₁L + 2w2·∂₂L
= 4w1w2r − 4w1w2r = 0), the two-layer case of the layer balancing of homogeneous networks. One
gradient-descent step with learning rate η multiplies it by (1 − 4η²r²), so gradient descent
conserves it to O(η²) per step.

Dauphin et al. (2014) also use two classic saddles, kept here for the saddle-free Newton work:
:func:`quadratic_saddle` f = 5x² − y² (non-degenerate, H = diag(10, −2); Newton's method jumps
onto it from anywhere) and :func:`monkey_saddle` f = x³ − 3xy² (H = 0 at the origin, a
degenerate saddle that the second-order test cannot classify).

All functions take a length-2 array θ = (w1, w2) (or (x, y)) and are pure: ``jit``/``vmap``/
``grad`` compose with them.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

Array = jax.Array

#: The lecture's single training pair (x, ŷ).
TOY_X, TOY_TARGET = 1.0, 1.0
#: Escape direction at the toy's saddle: the eigenvector of λ = −2 (sign-normalized).
TOY_ESCAPE_DIRECTION = (2.0 ** -0.5, 2.0 ** -0.5)
#: Eigenvalues of the toy Hessian at the origin, ascending.
TOY_SADDLE_EIGENVALUES = (-2.0, 2.0)


def toy_loss(params: Array) -> Array:
    """L(w1, w2) = (ŷ − w1·w2·x)² = (1 − w1·w2)² for ``params = [w1, w2]``."""
    w1, w2 = params[0], params[1]
    return (TOY_TARGET - w1 * w2 * TOY_X) ** 2


def toy_gradient(params: Array) -> Array:
    """Closed-form ∇L = (−2·w2·r, −2·w1·r) with r = 1 − w1·w2."""
    w1, w2 = params[0], params[1]
    r = 1.0 - w1 * w2
    return jnp.stack([-2.0 * w2 * r, -2.0 * w1 * r])


def toy_hessian(params: Array) -> Array:
    """Closed-form H = [[2w2², 4w1w2 − 2], [4w1w2 − 2, 2w1²]]."""
    w1, w2 = params[0], params[1]
    off = 4.0 * w1 * w2 - 2.0
    return jnp.stack([jnp.stack([2.0 * w2 ** 2, off]), jnp.stack([off, 2.0 * w1 ** 2])])


def toy_valley_eigenvalues(params: Array) -> Array:
    """Eigenvalues {0, 2(w1² + w2²)} of H on the valley w1·w2 = 1 (ascending).

    Only valid on the valley: there H = 2·v vᵀ with v = (w2, w1), rank one.
    """
    w1, w2 = params[0], params[1]
    return jnp.stack([jnp.zeros_like(w1), 2.0 * (w1 ** 2 + w2 ** 2)])


def toy_escape_loss(t: Array) -> Array:
    """L(t·u) = (1 − t²/2)² along the escape direction u = (1, 1)/√2 from the origin (exact)."""
    return (1.0 - 0.5 * jnp.asarray(t) ** 2) ** 2


def toy_balance(params: Array) -> Array:
    """w1² − w2², the quantity conserved by gradient flow on the toy loss.

    A gradient-descent step with learning rate η multiplies it by exactly (1 − 4η²r²),
    r = 1 − w1·w2 at the step's starting point.
    """
    return params[0] ** 2 - params[1] ** 2


def quadratic_saddle(params: Array) -> Array:
    """f(x, y) = 5x² − y² (Dauphin et al. 2014): a non-degenerate saddle at the origin.

    ∇f = (10x, −2y), H = diag(10, −2). Newton's step −H⁻¹∇f = −(x, y) lands exactly on the
    saddle from any start; saddle-free Newton (−|H|⁻¹∇f) moves away from it along y.
    """
    x, y = params[0], params[1]
    return 5.0 * x ** 2 - y ** 2


def monkey_saddle(params: Array) -> Array:
    """f(x, y) = x³ − 3xy² (Dauphin et al. 2014): a degenerate saddle with H = 0 at the origin.

    ∇f = (3x² − 3y², −6xy), H = [[6x, −6y], [−6y, −6x]] (eigenvalues ±6‖(x, y)‖): the
    second-order test says nothing at the origin, yet f decreases along three directions.
    """
    x, y = params[0], params[1]
    return x ** 3 - 3.0 * x * y ** 2


class GradientDescentPath(NamedTuple):
    """Iterates θ_0..θ_T of gradient descent (shape (T+1, 2)) and the losses L(θ_t), (T+1,)."""

    path: Array
    losses: Array


@functools.partial(jax.jit, static_argnames=("loss_fn", "steps"))
def gradient_descent_path(loss_fn: Callable[[Array], Array], w0: Array, lr: float,
                          steps: int) -> GradientDescentPath:
    """Full-batch gradient descent θ_{t+1} = θ_t − lr·∇L(θ_t), all iterates kept.

    Runs in one ``lax.scan``; ``loss_fn`` and ``steps`` are static (hashable function, int).
    Returns :class:`GradientDescentPath` (unpacks as ``path, losses``) with the start included,
    so ``path[0] == w0`` and ``path.shape == (steps + 1, 2)``. Nothing stops a diverging run:
    non-finite iterates are returned as they are, for the caller to report.
    """
    w0 = jnp.asarray(w0, dtype=jnp.result_type(float))
    value_and_grad = jax.value_and_grad(loss_fn)

    def step(w, _):
        loss, g = value_and_grad(w)
        return w - lr * g, (w, loss)

    w_last, (path, losses) = jax.lax.scan(step, w0, None, length=steps)
    path = jnp.concatenate([path, w_last[None]], axis=0)
    losses = jnp.concatenate([losses, loss_fn(w_last)[None]], axis=0)
    return GradientDescentPath(path, losses)
