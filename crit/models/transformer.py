"""A small pre-LayerNorm Transformer encoder (Vaswani et al. 2017; pre-LN as in Xiong et al.
2020) for classification or regression of a whole sequence, ViT-style on images (Dosovitskiy
et al. 2021).

Embedding: integer tokens (n, L) → learned embedding (``vocab_size`` must be given);
sequences (n, L, C) → a dense map of each position; images (n, H, W, C) → non-overlapping
``patch``×``patch`` patches, each flattened and mapped by a dense layer. Plus a learned
position embedding. Then ``depth`` blocks x ← x + MHA(LN(x)); x ← x + MLP(LN(x)) with
``heads`` heads and a GELU MLP of width ``mlp_dim``; a final LN, the mean over positions, and
a dense layer to the outputs. Attention kernels have head axes: query/key/value kernels are
(dim, heads, dim/heads), the output kernel (heads, dim/heads, dim).
"""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class _EncoderBlock(nn.Module):
    dim: int
    heads: int
    mlp_dim: int
    dropout: float

    @nn.compact
    def __call__(self, x, train: bool):
        f64 = dict(param_dtype=jnp.float64)
        y = nn.LayerNorm(**f64)(x)
        y = nn.MultiHeadDotProductAttention(num_heads=self.heads, qkv_features=self.dim,
                                            deterministic=True, **f64)(y, y)
        x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
        y = nn.LayerNorm(**f64)(x)
        y = nn.Dense(self.dim, **f64)(nn.gelu(nn.Dense(self.mlp_dim, **f64)(y)))
        return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class Transformer(nn.Module):
    n_outputs: int
    dim: int = 32
    depth: int = 2
    heads: int = 4
    mlp_dim: int = 64
    patch: int = 4
    vocab_size: int = 0
    dropout: float = 0.0

    @nn.compact
    def __call__(self, x, train: bool = False):
        if self.dim % self.heads:
            raise ValueError(f"transformer dim ({self.dim}) must be a multiple of heads "
                             f"({self.heads})")
        f64 = dict(param_dtype=jnp.float64)
        if x.ndim == 2 and jnp.issubdtype(x.dtype, jnp.integer):
            if self.vocab_size < 1:
                raise ValueError("transformer on integer tokens needs vocab_size >= 1")
            h = nn.Embed(self.vocab_size, self.dim, **f64)(x)
        elif x.ndim == 3:
            h = nn.Dense(self.dim, **f64)(x)
        elif x.ndim == 4:
            n, hh, ww, c = x.shape
            p = self.patch
            if hh % p or ww % p:
                raise ValueError(f"transformer patch {p} must divide the image size {hh}×{ww}")
            x = x.reshape(n, hh // p, p, ww // p, p, c).transpose(0, 1, 3, 2, 4, 5)
            h = nn.Dense(self.dim, **f64)(x.reshape(n, (hh // p) * (ww // p), p * p * c))
        else:
            raise ValueError(f"transformer needs tokens (n, L), sequences (n, L, C) or images "
                             f"(n, H, W, C); got input of shape {x.shape}")
        pos = self.param("position", nn.initializers.normal(0.02), (1, *h.shape[1:]),
                         jnp.float64)
        h = h + pos.astype(h.dtype)
        for _ in range(self.depth):
            h = _EncoderBlock(self.dim, self.heads, self.mlp_dim, self.dropout)(h, train)
        h = nn.LayerNorm(**f64)(h)
        return nn.Dense(self.n_outputs, **f64)(jnp.mean(h, axis=1))
