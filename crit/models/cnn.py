"""A LeNet-style convolutional network (LeCun et al. 1998), for images or 1-D signals.

[conv k×k (``channels[i]`` filters, 'SAME') → activation → 2×2 average pool] for each entry of
``channels``, flatten, [dense → activation] for each entry of ``hidden``, dense to the outputs.
Images are NHWC (n, H, W, C); sequences (n, L, C) get 1-D convolutions of width k. Average
pooling (LeNet's subsampling) keeps the loss twice differentiable almost everywhere, unlike max
pooling, whose Hessian jumps where the arg-max changes. ``conv`` picks the convolution's
implementation (``crit.models.conv``: "auto", "xla", "shifted"; the same function up to rounding).
"""

from __future__ import annotations

from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from crit.models.conv import conv_function
from crit.models.mlp import ACTIVATIONS


class CNN(nn.Module):
    n_outputs: int
    channels: Sequence[int] = (6, 16)
    hidden: Sequence[int] = (64,)
    activation: str = "relu"
    kernel: int = 5
    conv: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        del train
        if x.ndim not in (3, 4):
            raise ValueError(f"cnn needs images (n, H, W, C) or sequences (n, L, C); got input "
                             f"of shape {x.shape}")
        act = ACTIVATIONS[self.activation]
        spatial = x.ndim - 2
        for c in self.channels:
            x = nn.Conv(c, (self.kernel,) * spatial, padding="SAME", param_dtype=jnp.float64,
                        conv_general_dilated=conv_function(self.conv))(x)
            x = act(x)
            if min(x.shape[1:-1]) >= 2:
                x = nn.avg_pool(x, (2,) * spatial, strides=(2,) * spatial)
        x = x.reshape(x.shape[0], -1)
        for h in self.hidden:
            x = act(nn.Dense(h, param_dtype=jnp.float64)(x))
        return nn.Dense(self.n_outputs, param_dtype=jnp.float64)(x)
