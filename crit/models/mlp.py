"""The fully connected network of crit's homework workload (moved here from crit.problems)."""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

ACTIVATIONS = {
    "tanh": jnp.tanh,
    "relu": jax.nn.relu,
    "softplus": jax.nn.softplus,
    "sigmoid": jax.nn.sigmoid,
    "linear": lambda x: x,
    "gelu": jax.nn.gelu,
}


class MLP(nn.Module):
    """Fully connected network: Dense → activation, repeated, then a linear output layer.

    ``widths`` are the hidden widths; ``n_outputs`` the output width. Parameters are float64.
    Inputs of rank > 2 (images, sequences) are flattened per example.
    """

    widths: Sequence[int]
    n_outputs: int
    activation: str = "tanh"
    use_bias: bool = True

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train  # no BatchNorm, no dropout
        if x.ndim > 2:
            x = x.reshape(x.shape[0], -1)
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
