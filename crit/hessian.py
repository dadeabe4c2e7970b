"""Exact Hessians and Hessian-vector products of a scalar loss over a parameter pytree.

The Hessian is taken with respect to *all* parameters at once, H_ij = ∂²L/∂θ_i∂θ_j over the
raveled vector θ = ravel(params) ∈ R^P: not per-layer blocks, not the Gauss-Newton matrix JᵀJ
(which is positive semi-definite by construction and so can never show a saddle).

* :func:`dense_hessian` -- ``jax.hessian`` (forward-over-reverse), symmetrized, for P up to a few
  thousand: P Hessian-vector products at once.
* :func:`hvp` -- one product H·v as ``jvp(grad(L))``, the same pytree shape as the parameters.
* :func:`hvp_operator` -- the gradient and a flat matvec v ↦ H v sharing one linearization of
  the gradient (``jax.linearize``), for the many products of Lanczos or MINRES at one point.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

Params = Any


def flat_loss(loss_fn: Callable[[Params], jax.Array], params: Params):
    """Return ``(f, theta, unravel)`` with f(θ) = loss_fn(unravel(θ)) on the flat vector θ."""
    theta, unravel = ravel_pytree(params)
    return (lambda t: loss_fn(unravel(t))), theta, unravel


def symmetrize(matrix: jax.Array) -> jax.Array:
    """(A + Aᵀ) / 2: removes the rounding asymmetry of an autodiff Hessian before ``eigvalsh``."""
    return 0.5 * (matrix + matrix.T)


def dense_hessian(loss_fn: Callable[[Params], jax.Array], params: Params) -> jax.Array:
    """The full P×P Hessian ∂²L/∂θ∂θᵀ of ``loss_fn`` at ``params``, symmetrized.

    Computed as ``jax.hessian`` = ``jacfwd(jacrev)`` on the raveled parameters: P forward-mode
    tangents through the gradient, evaluated together. Memory ~P × (cost of one gradient).
    """
    f, theta, _ = flat_loss(loss_fn, params)
    return symmetrize(jax.hessian(f)(theta))


def hvp(loss_fn: Callable[[Params], jax.Array], params: Params, vector: Params) -> Params:
    """H·v = d/dt ∇L(θ + t v) at t = 0, forward-over-reverse (``jvp`` of ``grad``).

    ``vector`` has the structure of ``params``; so does the result. Costs about one gradient
    plus one forward-mode pass; never forms H.
    """
    return jax.jvp(jax.grad(loss_fn), (params,), (vector,))[1]


def hvp_operator(loss_fn: Callable[[Params], jax.Array], params: Params):
    """Linearize ∇L once at ``params``; return ``(grad_flat, matvec)`` on flat vectors.

    ``matvec(v) = H v`` for v ∈ R^P reuses the linearization (the forward pass and its
    residuals are computed once), so k products cost one linearization plus k tangent passes.
    """
    f, theta, _ = flat_loss(loss_fn, params)
    grad_flat, matvec = jax.linearize(jax.grad(f), theta)
    return grad_flat, matvec


def grad_norm(loss_fn: Callable[[Params], jax.Array], params: Params) -> jax.Array:
    """‖∇L(θ)‖₂ = sqrt(Σ_leaves ‖∂L/∂p‖²): the full-batch gradient norm, the criticality test."""
    g = jax.grad(loss_fn)(params)
    return jnp.sqrt(sum(jnp.sum(leaf ** 2) for leaf in jax.tree.leaves(g)))
