"""Models and losses written as a researcher's own code would be (for the analysis tests):
the same two-layer tanh network as flax.linen, as flax.nnx and as a plain function, an NNX net
with BatchNorm, and a tiny causal language model with its next-token loss."""

import flax.linen as nn
import jax.numpy as jnp
import optax
from flax import nnx


class LinenMLP(nn.Module):
    hidden: int = 6
    n_outputs: int = 1

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, name="Dense_0")(x))
        return nn.Dense(self.n_outputs, name="Dense_1")(h)


class NNXMLP(nnx.Module):
    def __init__(self, din: int = 1, hidden: int = 6, dout: int = 1, *, rngs: nnx.Rngs):
        self.Dense_0 = nnx.Linear(din, hidden, rngs=rngs)
        self.Dense_1 = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.Dense_1(jnp.tanh(self.Dense_0(x)))


def mlp_apply(params, x):
    """The same network as a plain function of {'Dense_0': {'kernel', 'bias'}, 'Dense_1': ...}."""
    h = jnp.tanh(x @ params["Dense_0"]["kernel"] + params["Dense_0"]["bias"])
    return h @ params["Dense_1"]["kernel"] + params["Dense_1"]["bias"]


class NNXBatchNormNet(nnx.Module):
    def __init__(self, din: int = 2, hidden: int = 5, dout: int = 1, *, rngs: nnx.Rngs):
        self.lin = nnx.Linear(din, hidden, rngs=rngs)
        self.bn = nnx.BatchNorm(hidden, rngs=rngs)
        self.out = nnx.Linear(hidden, dout, rngs=rngs)

    def __call__(self, x):
        return self.out(jnp.tanh(self.bn(self.lin(x))))


class TinyLM(nnx.Module):
    """Embedding -> causal mean of the prefix -> logits over the vocabulary."""

    def __init__(self, vocab: int = 5, dim: int = 3, *, rngs: nnx.Rngs):
        self.embed = nnx.Embed(vocab, dim, rngs=rngs)
        self.head = nnx.Linear(dim, vocab, rngs=rngs)

    def __call__(self, tokens):
        h = self.embed(tokens)                                   # (n, L, d)
        counts = jnp.arange(1, tokens.shape[1] + 1)[None, :, None]
        return self.head(jnp.cumsum(h, axis=1) / counts)         # (n, L, V)


def next_token_xent(logits, tokens):
    """Causal next-token cross-entropy: position t predicts token t + 1 (mean over positions)."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1],
                                                                    tokens[:, 1:]))


class Float32LayerMLP(nn.Module):
    """The mixed-precision idiom: float64 parameters, a hidden layer that computes in float32."""
    hidden: int = 4
    n_outputs: int = 1

    @nn.compact
    def __call__(self, x):
        h = jnp.tanh(nn.Dense(self.hidden, dtype=jnp.float32, param_dtype=jnp.float64)(x))
        return nn.Dense(self.n_outputs, param_dtype=jnp.float64)(h)
