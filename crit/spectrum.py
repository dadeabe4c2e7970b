"""Classify Hessian eigenvalues as positive, negative or null, with a stated tolerance.

For eigenvalues λ_1..λ_P and tolerance τ ≥ 0 (REFERENCES §1):

* positive: λ > τ,   negative: λ < −τ,   null: |λ| ≤ τ,
* minimum ratio  = #pos / P   (the lecture's "fraction of positive eigenvalues"),
* index          = #neg / P   (Dauphin et al. 2014's α),
* null fraction  = #null / P,
* non-null ratio = #pos / (#pos + #neg).

A bare ``λ > 0`` count is wrong at degenerate points: at the minima of the lecture's toy
L = (1 − w1 w2)², H has eigenvalues {0, 2(w1² + w2²)}, and the rounding of the 0 decides
whether the "ratio" is 0.5 or 1. With a tolerance the null direction is reported as null.
The raw eigenvalues are always kept by callers, so any other τ can be applied later.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import numpy as np

from crit.hessian import dense_hessian

EPS64 = float(np.finfo(np.float64).eps)


class SpectrumSummary(NamedTuple):
    """Counts and fractions of one spectrum under tolerance ``tolerance``."""

    n_pos: jnp.ndarray
    n_neg: jnp.ndarray
    n_null: jnp.ndarray
    min_ratio: jnp.ndarray
    index: jnp.ndarray
    null_fraction: jnp.ndarray
    nonnull_ratio: jnp.ndarray
    lambda_min: jnp.ndarray
    lambda_max: jnp.ndarray
    tolerance: jnp.ndarray


def default_tolerance(eigenvalues: jnp.ndarray, scale: float = 1.0) -> jnp.ndarray:
    """τ = scale · P · ε · max|λ|, the numerical-rank tolerance of a symmetric P×P matrix, with
    ε the machine epsilon of the eigenvalues' dtype (ε₆₄ ≈ 2.2e-16; ε₃₂ ≈ 1.2e-7 for a float32
    spectrum, e.g. on TPU: a float32 Hessian classified at the float64 tolerance would call
    rounding noise positive or negative).

    An eigenvalue below τ in magnitude cannot be told from zero by ``eigvalsh`` in that
    precision (backward error ~ε‖H‖ per entry, summed over P). It does not cover the error from
    the point being only approximately critical (null directions of a symmetry move by
    O(‖g‖)); pass a larger τ (``--eig_tol``) to absorb that, or re-classify the stored raw
    eigenvalues.
    """
    p = eigenvalues.shape[-1]
    eps = float(jnp.finfo(eigenvalues.dtype).eps)
    return scale * p * eps * jnp.max(jnp.abs(eigenvalues), axis=-1)


def classify_spectrum(eigenvalues: jnp.ndarray, tolerance=None) -> SpectrumSummary:
    """Counts and fractions of positive / negative / null eigenvalues (see module docstring).

    Works on one spectrum of shape (P,) or a batch (..., P). ``tolerance=None`` uses
    :func:`default_tolerance`; a float (or an array broadcasting over the batch) overrides.
    """
    eigenvalues = jnp.asarray(eigenvalues)
    if tolerance is None:
        tol = default_tolerance(eigenvalues)
    else:
        tol = jnp.broadcast_to(jnp.asarray(tolerance, eigenvalues.dtype),
                               eigenvalues.shape[:-1])
    p = eigenvalues.shape[-1]
    t = tol[..., None]
    n_pos = jnp.sum(eigenvalues > t, axis=-1)
    n_neg = jnp.sum(eigenvalues < -t, axis=-1)
    n_null = p - n_pos - n_neg
    nonnull = n_pos + n_neg
    return SpectrumSummary(
        n_pos=n_pos, n_neg=n_neg, n_null=n_null,
        min_ratio=n_pos / p, index=n_neg / p, null_fraction=n_null / p,
        nonnull_ratio=jnp.where(nonnull > 0, n_pos / jnp.maximum(nonnull, 1), jnp.nan),
        lambda_min=jnp.min(eigenvalues, axis=-1), lambda_max=jnp.max(eigenvalues, axis=-1),
        tolerance=tol)


def hessian_spectrum(loss_fn, params) -> jnp.ndarray:
    """All P eigenvalues (ascending) of the exact, symmetrized Hessian of ``loss_fn``."""
    return jnp.linalg.eigvalsh(dense_hessian(loss_fn, params))


def exact_spectrum(loss_fn, params, tolerance=None) -> tuple[jnp.ndarray, SpectrumSummary]:
    """Eigenvalues of the exact Hessian of any scalar loss over a pytree, and their summary.

    The library's one-call answer to "is this point a minimum or a saddle?" (given that it is
    critical: check :func:`crit.hessian.grad_norm`).
    """
    eigenvalues = hessian_spectrum(loss_fn, params)
    return eigenvalues, classify_spectrum(eigenvalues, tolerance)
