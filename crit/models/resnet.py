"""The CIFAR ResNet of He et al. (2016, §4.2): depth 6k + 2, three stages of k basic blocks.

conv 3×3 (``width``) → BN → ReLU, then stages of ``width``, 2·``width``, 4·``width`` channels
(stride 2 at the start of stages 2 and 3), each block conv 3×3 → BN → ReLU → conv 3×3 → BN,
plus the shortcut (identity, or 1×1 conv → BN where the shape changes: option B), → ReLU;
global average pool, dense to the outputs. ``depth=20, width=16`` is ResNet-20 (0.27 M
parameters on CIFAR-10). ``norm="none"`` drops BatchNorm (a stateless ResNet). ``conv`` picks
the convolution's implementation (``crit.models.conv``: "auto", "xla", "shifted"; the same
function up to rounding).

BatchNorm keeps running statistics in the ``batch_stats`` collection: state, not parameters.
``train=True`` normalizes with the batch's statistics and updates the running averages
(momentum 0.9); ``train=False`` uses the running averages.
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from crit.models.conv import conv_function


class _Norm(nn.Module):
    kind: str

    @nn.compact
    def __call__(self, x, train: bool):
        if self.kind == "none":
            return x
        return nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5,
                            param_dtype=jnp.float64)(x)


class _Block(nn.Module):
    channels: int
    stride: int
    norm: str
    conv: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool):
        conv = lambda c, k, s: nn.Conv(c, (k, k), strides=(s, s), padding="SAME",  # noqa: E731
                                       use_bias=self.norm == "none", param_dtype=jnp.float64,
                                       conv_general_dilated=conv_function(self.conv))
        y = nn.relu(_Norm(self.norm)(conv(self.channels, 3, self.stride)(x), train))
        y = _Norm(self.norm)(conv(self.channels, 3, 1)(y), train)
        if self.stride != 1 or x.shape[-1] != self.channels:
            x = _Norm(self.norm)(conv(self.channels, 1, self.stride)(x), train)
        return nn.relu(x + y)


class ResNet(nn.Module):
    n_outputs: int
    depth: int = 20
    width: int = 16
    norm: str = "batch"
    conv: str = "auto"

    @nn.compact
    def __call__(self, x, train: bool = False):
        if (self.depth - 2) % 6 or self.depth < 8:
            raise ValueError(f"resnet depth must be 6k + 2 with k >= 1 (8, 14, 20, 32, ...), got "
                             f"{self.depth}")
        if self.norm not in ("batch", "none"):
            raise ValueError(f"resnet norm must be 'batch' or 'none', got {self.norm!r}")
        if x.ndim != 4:
            raise ValueError(f"resnet needs images (n, H, W, C); got input of shape {x.shape}")
        blocks = (self.depth - 2) // 6
        x = nn.Conv(self.width, (3, 3), padding="SAME", use_bias=self.norm == "none",
                    param_dtype=jnp.float64, conv_general_dilated=conv_function(self.conv))(x)
        x = nn.relu(_Norm(self.norm)(x, train))
        for stage in range(3):
            for b in range(blocks):
                stride = 2 if stage > 0 and b == 0 else 1
                x = _Block(self.width * 2 ** stage, stride, self.norm, self.conv)(x, train)
        x = jnp.mean(x, axis=(1, 2))
        return nn.Dense(self.n_outputs, param_dtype=jnp.float64)(x)


def resnet_param_count(depth: int, width: int, channels_in: int, n_outputs: int,
                       norm: str = "batch") -> int:
    """P of :class:`ResNet`, counted from the architecture (for tests and the README)."""
    bn = 2 if norm == "batch" else 0          # scale and bias per channel
    bias = 0 if norm == "batch" else 1        # convs carry a bias only without BatchNorm
    conv = lambda cin, cout, k: k * k * cin * cout + bias * cout + bn * cout  # noqa: E731
    p = conv(channels_in, width, 3)
    cin = width
    for stage in range(3):
        c = width * 2 ** stage
        for b in range((depth - 2) // 6):
            p += conv(cin, c, 3) + conv(c, c, 3)
            if cin != c or (stage > 0 and b == 0):
                p += conv(cin, c, 1)
            cin = c
    return p + cin * n_outputs + n_outputs
