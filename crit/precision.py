r"""The precision a loss is actually computed in, read from its jaxpr, and the rounding it allows.

A proof such as :math:`y^\top H y + \delta < 0` is only as good as its rounding allowance
:math:`\delta`. crit's default :math:`\delta = P\,\epsilon\,\max|\theta|` assumes float64
throughout, but a fork's layer may pin ``dtype=jnp.float32`` (a common mixed-precision idiom:
``nn.Dense(dtype=jnp.float32, param_dtype=jnp.float64)``) or a model may cast to bfloat16
internally. Then the loss, its gradient and every HVP carry float32 or bfloat16 rounding
(unit roundoff :math:`2^{-24}` or :math:`2^{-8}`), whatever dtype the parameters are stored in.
On GPUs and TPUs, JAX's default matmul precision also makes float32 dots coarser (TF32:
:math:`2^{-11}`; bfloat16 passes on TPU), unless ``jax_default_matmul_precision`` says
otherwise.

:func:`compute_dtypes` traces a function to its jaxpr (no compute) and collects the floating
dtypes of the operands of every arithmetic primitive that rounds (dots, convolutions,
reductions, elementwise arithmetic), descending into nested jaxprs (``jit``, ``scan``,
``while``, ``cond``, ``checkpoint``, custom derivatives). :func:`unit_roundoff` turns the
coarsest of them into :math:`\epsilon` for the allowance, and :func:`precision_record` says
all of it in one dict for a report.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

#: Primitives whose floating operands fix the precision of the result (data movement such as
#: reshape, slicing, broadcast and converts to a *wider* type do not round).
ROUNDING_PRIMITIVES = frozenset({
    "dot_general", "conv_general_dilated", "add", "sub", "mul", "div", "reduce_sum",
    "reduce_max", "exp", "log", "log1p", "tanh", "logistic", "sqrt", "rsqrt", "pow",
    "integer_pow", "cumsum", "erf", "sin", "cos", "max", "min", "add_any", "square",
})
LOW_PRECISION_MATMUL = {"gpu": "tf32 for float32 dots unless jax_default_matmul_precision is "
                        "'highest'", "tpu": "bfloat16 passes for float32 dots unless "
                        "jax_default_matmul_precision is 'highest'"}


def _sub_jaxprs(eqn):
    for value in eqn.params.values():
        items = value if isinstance(value, (tuple, list)) else (value,)
        for item in items:
            if hasattr(item, "jaxpr") and hasattr(item, "consts"):   # ClosedJaxpr
                yield item.jaxpr
            elif hasattr(item, "eqns"):                               # Jaxpr
                yield item


def _walk(jaxpr, found: set) -> None:
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in ROUNDING_PRIMITIVES:
            for var in eqn.invars:
                aval = getattr(var, "aval", None)
                dtype = getattr(aval, "dtype", None)
                if dtype is not None and jnp.issubdtype(dtype, jnp.floating):
                    found.add(np.dtype(dtype).name if dtype != jnp.bfloat16 else "bfloat16")
        for sub in _sub_jaxprs(eqn):
            _walk(sub, found)


def compute_dtypes(fn: Callable, *args: Any) -> tuple[str, ...]:
    """The floating dtypes in which ``fn(*args)`` rounds (traced to a jaxpr, nothing run),
    widest first, e.g. ``("float64", "float32")`` for a float64 loss with a float32 layer."""
    closed = jax.make_jaxpr(fn)(*args)
    found: set = set()
    _walk(closed.jaxpr, found)
    return tuple(sorted(found, key=lambda name: -float(jnp.finfo(name).bits)))


def unit_roundoff(dtypes) -> float:
    """Machine epsilon of the coarsest dtype in ``dtypes`` (float64's when empty)."""
    eps = [float(jnp.finfo(d).eps) for d in dtypes] or [float(np.finfo(np.float64).eps)]
    return max(eps)


def precision_record(fn: Callable, *args: Any) -> dict:
    """What a report says about the precision used: the dtypes the loss rounds in, the
    coarsest one and its ε, the backend and ``jax_default_matmul_precision`` (None: JAX's
    default, which on GPU/TPU lowers float32 dots below float32, see the module docstring)."""
    dtypes = compute_dtypes(fn, *args)
    coarsest = dtypes[-1] if dtypes else "float64"
    backend = jax.default_backend()
    return {"compute_dtypes": list(dtypes), "coarsest_dtype": coarsest,
            "unit_roundoff": unit_roundoff(dtypes), "backend": backend,
            "matmul_precision": jax.config.jax_default_matmul_precision,
            "matmul_note": (LOW_PRECISION_MATMUL.get(backend) if "float32" in dtypes
                            and jax.config.jax_default_matmul_precision != "highest" else None)}
