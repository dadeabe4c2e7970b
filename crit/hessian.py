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


# Columns of the dense Hessian pushed through the gradient at once (see dense_hessian), by backend.
# On CPU one column at a time is fastest: for the homework net (P = 321, n = 256, 25 inits
# vmapped, one core, 2026-12-01) blocks of 64 / 16 / 4 / 1 columns cost 68 / 58 / 21 / 15 ms per
# init, because wide batched tangents leave the cache. Accelerators want wide blocks.
HESSIAN_BLOCK_CPU = 1
HESSIAN_BLOCK_ACCELERATOR = 64


def default_hessian_block() -> int:
    """Columns per block of :func:`dense_hessian` on the default backend (1 on CPU, else 64)."""
    return HESSIAN_BLOCK_CPU if jax.default_backend() == "cpu" else HESSIAN_BLOCK_ACCELERATOR


def dense_hessian(loss_fn: Callable[[Params], jax.Array], params: Params,
                  block_size: int | None | str = "auto") -> jax.Array:
    """The full P×P Hessian ∂²L/∂θ∂θᵀ of ``loss_fn`` at ``params``, symmetrized.

    Column j is H e_j, a forward-mode tangent pushed through the gradient (``jvp`` of ``grad``,
    i.e. ``jacfwd(jacrev)`` as ``jax.hessian`` does). ``block_size`` columns go through together
    (``lax.map(..., batch_size=block_size)`` over the basis vectors), so peak memory is about
    ``min(P, block_size)`` gradients rather than P; ``None`` (or P ≤ block_size) pushes all P
    tangents at once, exactly ``jax.hessian``; ``"auto"`` takes :func:`default_hessian_block`.
    The block size changes only the summation order (columns agree to a few ulp).
    """
    if isinstance(block_size, str) and block_size == "auto":
        block_size = default_hessian_block()
    elif block_size is not None and (isinstance(block_size, (str, bool))
                                     or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, None or 'auto'; got {block_size!r}")
    f, theta, _ = flat_loss(loss_fn, params)
    p = theta.shape[0]
    if block_size is None or p <= block_size:
        return symmetrize(jax.hessian(f)(theta))
    _, matvec = jax.linearize(jax.grad(f), theta)
    columns = jax.lax.map(matvec, jnp.eye(p, dtype=theta.dtype), batch_size=block_size)
    return symmetrize(columns.T)


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


def batch_slices(n: int, batch_size: int) -> list[tuple[int, int]]:
    """[(start, stop), ...] covering range(n) in batches of ``batch_size`` (the last may be short)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    return [(s, min(s + batch_size, n)) for s in range(0, n, batch_size)]


def full_batch_hvp_operator(batch_loss_fn: Callable, params: Params, x, y,
                            batch_size: int | None = None):
    """Flat matvec v ↦ H v of the full-data loss L = (1/N) Σ_i ℓ_i, summed over data batches.

    ``batch_loss_fn(params, xb, yb)`` is the *mean* loss over a batch (plus any penalty that does
    not depend on the data). Each batch's HVP is weighted by n_b / N, so the result is the exact
    full-data HVP whatever the batch sizes (not an equal-weight average of batch HVPs, which is
    wrong when the last batch is short). Penalty terms enter with total weight Σ n_b/N = 1.
    Full batches run in one ``lax.map``; a short last batch is one extra call.

    Returns ``(grad_flat, matvec)``: the full-data gradient and the HVP operator on flat vectors.
    """
    theta, unravel = ravel_pytree(params)
    n = x.shape[0]
    batch_size = n if batch_size is None else min(batch_size, n)
    n_full = n // batch_size
    xs = x[: n_full * batch_size].reshape(n_full, batch_size, *x.shape[1:])
    ys = y[: n_full * batch_size].reshape(n_full, batch_size, *y.shape[1:])
    x_tail, y_tail = x[n_full * batch_size:], y[n_full * batch_size:]

    def batch_grad(t, xb, yb):
        return jax.grad(lambda u: batch_loss_fn(unravel(u), xb, yb))(t)

    def grad_and_hvp(t, v):
        def one(args):
            xb, yb = args
            g, hv = jax.jvp(lambda u: batch_grad(u, xb, yb), (t,), (v,))
            return g, hv

        g, hv = jax.lax.map(one, (xs, ys))
        g = jnp.sum(g, axis=0) * (batch_size / n)
        hv = jnp.sum(hv, axis=0) * (batch_size / n)
        if x_tail.shape[0]:
            gt, hvt = one((x_tail, y_tail))
            w = x_tail.shape[0] / n
            g, hv = g + w * gt, hv + w * hvt
        return g, hv

    grad_flat = grad_and_hvp(theta, jnp.zeros_like(theta))[0]
    return grad_flat, lambda v: grad_and_hvp(theta, v)[1]
