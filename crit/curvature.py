r"""Curvature operators of crit's full-data objective besides the Hessian, and their layer blocks.

Every operator here is a symmetric :math:`P\times P` matrix over the raveled parameters
:math:`\theta = \mathrm{ravel}(\text{params})` of a :class:`crit.trained.TrainedModel`, for the
objective of :func:`crit.trained.data_objective`,

.. math::

    L(\theta) = \sum_b \frac{n_b}{N}\,\ell_b(f_\theta(X_b), Y_b)
                + \frac{l_2}{2}\lVert\theta\rVert^2 ,

with the same batches (``batch_size`` rows, 0 for all at once) and exact weights
:math:`n_b/N`. Each is applied matrix-free (:func:`curvature_matvec`), never formed:

``"hessian"``
    :math:`H = \nabla^2 L`, ``jvp`` of ``grad`` (as :func:`crit.hessian.hvp`).
``"ggn"``
    The generalized Gauss-Newton matrix (Schraudolph 2002)
    :math:`G = \sum_b (n_b/N)\, J_b^\top \Lambda_b J_b + l_2 I`, with
    :math:`J_b = \partial f(X_b)/\partial\theta` the Jacobian of the batch's outputs and
    :math:`\Lambda_b = \partial^2 \ell_b / \partial f^2` the loss's Hessian in output space.
``"residual"``
    :math:`R = H - G = \sum_b (n_b/N) \sum_o (\partial\ell_b/\partial f_o)\,\nabla^2_\theta f_o`,
    the part of the Hessian carried by the network's own curvature, weighted by the residuals
    of the fit. It vanishes for a model linear in :math:`\theta` and at an interpolating fit
    of mse; the Hessian's outliers live in G, its bulk and negative directions largely in R
    (Sagun et al. 2017; Papyan 2019, 2020).
``"fisher"``
    The Fisher information of the model's predictive distribution,
    :math:`F = \sum_b (n_b/N)\, J_b^\top \mathbb{E}_{y\sim p(y\mid f)}[\nabla_f \ell\,
    \nabla_f \ell^\top] J_b + l_2 I`. For a loss that is the negative log-likelihood of an
    exponential family in its natural parameter -- mse as a Gaussian, softmax cross-entropy
    as a categorical -- the output-space Fisher equals the output-space Hessian, so
    :math:`F = G` exactly (Martens 2020, sec. 9.2). Only those two losses are accepted: a
    fork's loss carries no likelihood crit could sample from.
``"empirical_fisher"``
    :math:`F_{\mathrm{emp}} = \frac1N\sum_i \nabla\ell_i\,\nabla\ell_i^\top + l_2 I`, outer
    products of per-example gradients at the *observed* labels. It is not the Fisher: the
    expectation over the model's labels is replaced by the data's, so it depends on the fit's
    residuals, vanishes (but for :math:`l_2`) at an interpolating fit of mse whatever the
    curvature, and its preconditioning can distort the geometry badly far from a perfect fit
    (Kunstner, Balles & Hennig 2019; Martens 2020, sec. 11).

Conventions
-----------
- **The penalty.** The curvature of :math:`\tfrac{l_2}{2}\lVert\theta\rVert^2` is
  :math:`l_2 I`, known exactly; it is added to G, F and F_emp alike, so each of them
  approximates the same :math:`\nabla^2 L` and :math:`R = H - G` is exactly the
  network-curvature term above (independent of :math:`l_2`). Pass ``l2=0`` for the data
  term alone.
- **Scales.** crit's losses are means. ``"mse"`` is :math:`\frac{1}{nk}\sum(f-y)^2` (no ½),
  so :math:`\Lambda = \frac{2}{nk} I` over the :math:`nk` entries of a batch's outputs (the
  Gaussian likelihood with variance :math:`k/2` per entry makes it the mean NLL per row).
  ``"xent"`` over m rows of logits (any leading shape) has :math:`\Lambda = \frac1m
  \bigoplus_r (\mathrm{diag}(p_r) - p_r p_r^\top)`, :math:`p_r` the softmax of row r. For a
  fork's loss :math:`\Lambda u` is an exact Hessian-vector product in output space.
- **State.** BatchNorm statistics are fixed at the model's, never differentiated, as in
  :func:`crit.trained.data_objective`. With ``batchnorm="batch"`` a row's output depends on
  its batch, so there are no per-example losses and ``"empirical_fisher"`` is refused.
- **Per-example losses** (``"empirical_fisher"``) are
  :math:`\ell_i = \text{loss}(f(X)[i{:}i{+}1], Y[i{:}i{+}1])`; their mean is the data term
  only for a loss that is the mean of per-row losses (crit's two are).

Cost of one product: G, F and F_emp take one forward pass, its tangent (``jax.linearize``)
and the transpose of that tangent (one backward pass) per batch -- no second-order pass
through the network; H takes forward-over-reverse, about twice that. R costs H plus G.

Blocks (:func:`select_block`, :func:`block_matvec`, :func:`layer_blocks`,
:func:`layer_table`) restrict any of these operators to a set of parameter leaves, the
diagonal block :math:`A_{BB}` (e.g. one layer), by the ``/``-joined leaf paths of
:func:`crit.checkpoints.flat_paths` (``params/Dense_0/kernel`` for a linen model,
``Dense_0/kernel`` for NNX).

References
----------
- N. N. Schraudolph (2002). Fast curvature matrix-vector products for second-order gradient
  descent. Neural Computation 14(7).
- J. Martens (2020). New insights and perspectives on the natural gradient method. JMLR 21.
- F. Kunstner, L. Balles, P. Hennig (2019). Limitations of the empirical Fisher
  approximation for natural gradient descent. NeurIPS.
- L. Sagun, U. Evci, V. U. Guney, Y. Dauphin, L. Bottou (2017). Empirical analysis of the
  Hessian of over-parametrized neural networks. arXiv:1706.04454.
- V. Papyan (2019). Measurements of three-level hierarchical structure in the outliers in
  the spectrum of deepnet Hessians. ICML.
- V. Papyan (2020). Traces of class/cross-class structure pervade deep learning spectra.
  JMLR 21.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from crit.estimators import hutchpp_trace
from crit.problems import batch_slices, mse, softmax_xent
from crit.trained import TrainedModel, data_objective, resolve_loss

Array = jax.Array
Params = Any

CURVATURES = ("hessian", "ggn", "residual", "fisher", "empirical_fisher")
#: Losses with a known likelihood (the Fisher is defined) and convex in the outputs.
LIKELIHOOD_LOSSES = ("mse", "xent")
#: Blocks up to this size are formed densely in :func:`layer_table` (exact eigenvalues, trace).
DENSE_BLOCK_MAX = 2000


class CurvatureError(ValueError):
    """A curvature operator that is not defined for the model or the loss given."""


# --------------------------------------------------------------------------- output space


def loss_family(loss) -> str:
    """``"mse"``, ``"xent"`` (crit's own losses, by identity) or ``"custom"``."""
    fn = resolve_loss(loss)
    if fn is mse:
        return "mse"
    if fn is softmax_xent:
        return "xent"
    return "custom"


def _gaussian_precision(f, y, u):
    r"""Fisher (= Hessian) of the mse in output space: :math:`\frac{2}{\text{size}(f)}\,u`."""
    return (2.0 / f.size) * u


def _softmax_covariance(f, y, u):
    r"""Fisher (= Hessian) of the mean softmax cross-entropy over the rows of the logits:
    :math:`\frac1m(\mathrm{diag}(p) - pp^\top)u` per row, the covariance of the one-hot
    label under the model's categorical distribution."""
    p = jax.nn.softmax(f, axis=-1)
    pu = p * u
    rows = f.size // f.shape[-1]
    return (pu - p * jnp.sum(pu, axis=-1, keepdims=True)) / rows


def _loss_hvp(point_loss):
    """Exact output-space Hessian-vector product of any loss: jvp of its output gradient."""
    def hvp(f, y, u):
        return jax.jvp(jax.grad(lambda g: point_loss(g, y)), (f,), (u,))[1]
    return hvp


# For these two the output-space Fisher *is* the output-space Hessian (natural-parameter
# exponential families), so the GGN and the Fisher share one table.
_OUTPUT_CURVATURE = {"mse": _gaussian_precision, "xent": _softmax_covariance}


def output_hessian(loss) -> Callable[[Array, Array, Array], Array]:
    r"""``(f, y, u) -> Λ u``, the Hessian of ``loss(·, y)`` at outputs ``f`` applied to ``u``:
    closed form for ``"mse"`` and ``"xent"`` (module docstring), an exact HVP otherwise."""
    family = loss_family(loss)
    if family in _OUTPUT_CURVATURE:
        return _OUTPUT_CURVATURE[family]
    return _loss_hvp(resolve_loss(loss))


def output_fisher(loss) -> Callable[[Array, Array, Array], Array]:
    r"""``(f, y, u) -> E_{y~p(y|f)}[∇_f ℓ ∇_f ℓ^T] u``, the Fisher of the predictive
    distribution in output space: the Gaussian precision for ``"mse"``, the softmax
    covariance for ``"xent"``. A fork's loss is refused (no likelihood is known)."""
    family = loss_family(loss)
    if family not in _OUTPUT_CURVATURE:
        raise CurvatureError(
            f"the Fisher needs a loss that is a negative log-likelihood crit knows; allowed "
            f"losses: {list(LIKELIHOOD_LOSSES)} (got {getattr(loss, '__name__', loss)!r}). "
            "Use 'ggn' (the exact output-space Hessian of any loss) or 'empirical_fisher'")
    return _OUTPUT_CURVATURE[family]


def is_psd(kind: str, loss="mse") -> bool:
    r"""Whether the operator ``kind`` is positive semi-definite by construction for ``loss``.

    ``"fisher"`` (a covariance) and ``"empirical_fisher"`` (a sum of outer products) always
    are; ``"ggn"`` is when the loss is convex in the outputs -- ``"mse"`` and ``"xent"`` --
    while a fork's non-convex loss can make :math:`J^\top\Lambda J` indefinite;
    ``"hessian"`` and ``"residual"`` are not in general (``l2 >= 0`` changes none of this).
    """
    _check_kind(kind)
    if kind in ("fisher", "empirical_fisher"):
        return True
    if kind == "ggn":
        return loss_family(loss) in LIKELIHOOD_LOSSES
    return False


def _check_kind(kind: str) -> None:
    if kind not in CURVATURES:
        raise CurvatureError(f"unknown curvature {kind!r}; allowed: {list(CURVATURES)}")


# --------------------------------------------------------------------------- batch products


def _ravel_like(tree) -> Array:
    return ravel_pytree(tree)[0]


def _sandwich(fn, params, out_curvature):
    r"""``v -> J^T Λ(J v)`` for ``fn(params) -> (f, aux)``: one linearization of ``fn`` (a
    forward pass and its tangent) and the tangent's transpose (one backward pass)."""
    f, jvp_fn = jax.linearize(fn, params)
    transpose = jax.linear_transpose(jvp_fn, params)

    def matvec(v_tree):
        (out,) = transpose(out_curvature(f, jvp_fn(v_tree)))
        return _ravel_like(out)

    return matvec


def _batch_products(kind: str, model: TrainedModel, loss):
    """``batch(params, xb, yb) -> (v_tree -> flat)``: the curvature of one batch's *mean* loss
    (no penalty), linearized at ``params``."""
    state = model.state
    if kind in ("ggn", "fisher"):
        curv = output_hessian(loss) if kind == "ggn" else output_fisher(loss)

        def batch(params, xb, yb):
            return _sandwich(lambda p: model.apply_fn(p, xb, state), params,
                             lambda f, u: curv(f, yb, u))
        return batch

    point_loss = resolve_loss(loss)

    def batch(params, xb, yb):  # empirical Fisher: (1/n_b) Σ_i ∇ℓ_i (∇ℓ_i^T v)
        def per_example(p):
            f = model.apply_fn(p, xb, state)
            return jax.vmap(lambda fi, yi: point_loss(fi[None], yi[None]))(f, yb)
        n_b = xb.shape[0]
        return _sandwich(per_example, params, lambda losses, s: s / n_b)
    return batch


def _weighted_over_batches(one, data, batch_size: int, like: Array) -> Array:
    """Σ_b (n_b/N) one(x_b, y_b) over the batches of :func:`crit.trained.data_objective`."""
    x, y = data
    n = x.shape[0]
    full, rest = batch_slices(n, batch_size)
    if full == 1 and rest == 0:
        return one(x, y)
    b = batch_size
    xs = x[:full * b].reshape(full, b, *x.shape[1:])
    ys = y[:full * b].reshape(full, b, *y.shape[1:])

    def accumulate(acc, xy):
        return acc + one(*xy) * (b / n), None

    total, _ = jax.lax.scan(accumulate, jnp.zeros_like(like), (xs, ys))
    if rest:
        total = total + one(x[full * b:], y[full * b:]) * (rest / n)
    return total


def _check_model(kind: str, model: TrainedModel, batch_size: int, l2: float) -> None:
    _check_kind(kind)
    if not isinstance(model, TrainedModel):
        raise CurvatureError(f"need a crit.trained.TrainedModel (from_linen, from_nnx, "
                             f"from_function), got {type(model).__name__}")
    if batch_size < 0:
        raise CurvatureError(f"batch_size must be >= 0, got {batch_size}")
    if l2 < 0:
        raise CurvatureError(f"l2 must be >= 0, got {l2}")
    if kind == "empirical_fisher" and model.batchnorm == "batch":
        raise CurvatureError(
            "the empirical Fisher needs per-example losses, which a model with "
            "batchnorm='batch' does not have (each row's output depends on its batch's "
            "statistics); use batchnorm='eval', or 'ggn' / 'fisher'")


def curvature_matvec(kind: str, model: TrainedModel, loss="mse", batch_size: int = 0,
                     l2: float = 0.0) -> Callable[[Params, Any, Array], Array]:
    r"""A pure ``mv(params, data, v) -> A v`` for the curvature ``kind`` of the full-data loss.

    Parameters
    ----------
    kind
        One of :data:`CURVATURES` (module docstring).
    model
        A :class:`crit.trained.TrainedModel`.
    loss
        ``"mse"``, ``"xent"``, ``"pkg.mod:fn"`` or a callable ``fn(outputs, targets)``, the
        mean loss of a batch (:func:`crit.trained.resolve_loss`).
    batch_size
        Rows per batch (0: all at once); the batches and their exact weights :math:`n_b/N`
        are those of :func:`crit.trained.data_objective`. Changes rounding only.
    l2
        Weight of the penalty :math:`\tfrac{l_2}{2}\lVert\theta\rVert^2`; its curvature
        :math:`l_2 I` is counted in every operator but ``"residual"``.

    Returns
    -------
    callable
        ``mv(params, data, v)`` with ``data = (x, y)`` and ``v`` a flat vector in the
        ``ravel_pytree`` order of ``params``; the result is flat too. Pure, so
        ``jax.jit(mv)`` compiles no data in, and ``vmap`` over ``v`` gives many products.

    Raises
    ------
    CurvatureError
        An unknown ``kind``; ``"fisher"`` with a loss other than ``"mse"``/``"xent"``;
        ``"empirical_fisher"`` with ``batchnorm="batch"``.
    """
    _check_model(kind, model, batch_size, l2)
    resolve_loss(loss)  # an unknown loss is refused here, not at the first product
    if kind == "hessian":
        objective = data_objective(model, loss, batch_size, l2)

        def hessian_mv(params, data, v):
            theta, unravel = ravel_pytree(params)
            grad = jax.grad(lambda t: objective(unravel(t), data))
            return jax.jvp(grad, (theta,), (v,))[1]
        return hessian_mv

    if kind == "residual":
        h_mv = curvature_matvec("hessian", model, loss, batch_size, 0.0)
        g_mv = curvature_matvec("ggn", model, loss, batch_size, 0.0)
        return lambda params, data, v: h_mv(params, data, v) - g_mv(params, data, v)

    if kind == "fisher":
        output_fisher(loss)  # refuse a fork's loss at build time
    batch = _batch_products(kind, model, loss)

    def mv(params, data, v):
        _, unravel = ravel_pytree(params)
        v_tree = unravel(v)
        out = _weighted_over_batches(lambda xb, yb: batch(params, xb, yb)(v_tree), data,
                                     batch_size, v)
        return out + l2 * v if l2 else out

    return mv


def curvature_operator(kind: str, model: TrainedModel, loss, data, batch_size: int = 0,
                       l2: float = 0.0, params: Params = None) -> Callable[[Array], Array]:
    r"""``matvec(v) = A v`` at ``params`` (default ``model.params``) on ``data``, flat vectors.

    With all rows in one batch (``batch_size`` 0 or at least N) the network (or the gradient,
    for the Hessian) is linearized once, so k products cost one linearization plus k tangent
    and transpose passes, as :func:`crit.hessian.hvp_operator`. With smaller batches each
    product runs :func:`curvature_matvec` (keeping one batch's residuals at a time, which is
    what batching is for). Wrap in ``jax.jit`` for many products.
    """
    _check_model(kind, model, batch_size, l2)
    params = model.params if params is None else params
    x, y = data
    mv = curvature_matvec(kind, model, loss, batch_size, l2)
    if batch_size and batch_size < x.shape[0]:
        return lambda v: mv(params, data, v)
    if kind == "hessian":
        objective = data_objective(model, loss, 0, l2)
        theta, unravel = ravel_pytree(params)
        return jax.linearize(jax.grad(lambda t: objective(unravel(t), data)), theta)[1]
    if kind == "residual":
        h_op = curvature_operator("hessian", model, loss, data, 0, 0.0, params)
        g_op = curvature_operator("ggn", model, loss, data, 0, 0.0, params)
        return lambda v: h_op(v) - g_op(v)
    _, unravel = ravel_pytree(params)
    one = _batch_products(kind, model, loss)(params, x, y)
    if l2:
        return lambda v: one(unravel(v)) + l2 * v
    return lambda v: one(unravel(v))


# --------------------------------------------------------------------------- blocks


class Block(NamedTuple):
    """A set of parameter leaves and their coordinates in the ``ravel_pytree`` order."""

    name: str
    """The pattern, or the layer, that chose the leaves."""
    paths: tuple[str, ...]
    """``/``-joined paths of the leaves (:func:`crit.checkpoints.flat_paths`)."""
    indices: np.ndarray
    """(n_B,) int, ascending: where the block's coordinates sit in ravel(params)."""

    @property
    def size(self) -> int:
        return int(self.indices.shape[0])

    def mask(self, dim: int) -> np.ndarray:
        """(dim,) bool, True on the block's coordinates."""
        out = np.zeros(dim, bool)
        out[self.indices] = True
        return out


def leaf_ranges(params: Params) -> dict[str, tuple[int, int]]:
    """``{path: (start, stop)}`` of every leaf in ravel(params), paths as in
    :func:`crit.checkpoints.flat_paths`, in the order ``ravel_pytree`` lays the leaves out."""
    from crit.checkpoints import flat_paths

    flat = flat_paths(params)
    paths, leaves = list(flat), jax.tree.leaves(params)
    if len(paths) != len(leaves) or any(np.shape(a) != np.shape(b) for a, b in
                                        zip(flat.values(), leaves)):
        raise CurvatureError("the parameter paths do not follow the parameters' leaf order; "
                             "pass the parameters as a plain nested dict")
    out, start = {}, 0
    for path, leaf in zip(paths, leaves):
        stop = start + int(np.prod(np.shape(leaf)))
        out[path] = (start, stop)
        start = stop
    return out


def select_block(params: Params, pattern) -> Block:
    """The leaves a regex (``re.search`` on each path) or a list of exact paths selects.

    Raises
    ------
    CurvatureError
        If nothing is selected, or a listed path does not exist; the message lists the
        available paths.
    """
    if isinstance(pattern, Block):
        return pattern
    ranges = leaf_ranges(params)
    available = ", ".join(ranges)
    if isinstance(pattern, str):
        chosen = [p for p in ranges if re.search(pattern, p)]
        if not chosen:
            raise CurvatureError(f"the pattern {pattern!r} matches no parameter; available "
                                 f"paths: {available}")
        name = pattern
    else:
        chosen = list(dict.fromkeys(pattern))
        missing = [p for p in chosen if p not in ranges]
        if missing or not chosen:
            raise CurvatureError(f"no parameter at {missing or 'an empty list'}; available "
                                 f"paths: {available}")
        chosen = [p for p in ranges if p in chosen]  # ravel order
        name = ",".join(chosen)
    indices = np.concatenate([np.arange(*ranges[p]) for p in chosen])
    return Block(name, tuple(chosen), indices)


def layer_blocks(params: Params) -> dict[str, Block]:
    """One block per layer: the leaves that share a parent path (``Dense_0`` holds
    ``Dense_0/kernel`` and ``Dense_0/bias``), in ravel order; a top-level leaf is its own."""
    groups: dict[str, list[str]] = {}
    for path in leaf_ranges(params):
        parent = path.rsplit("/", 1)[0] if "/" in path else path
        groups.setdefault(parent, []).append(path)
    out = {}
    for layer, paths in groups.items():
        block = select_block(params, paths)
        out[layer] = block._replace(name=layer)
    return out


def block_matvec(matvec: Callable[[Array], Array], params: Params, pattern):
    r"""The diagonal block :math:`A_{BB}`: ``v_B -> (A\,\mathrm{embed}(v_B))_B`` on flat
    vectors of the block's size, ``embed`` putting ``v_B`` on the block's coordinates and
    zeros elsewhere. ``pattern`` as in :func:`select_block` (or a :class:`Block`)."""
    block = select_block(params, pattern)
    dim = sum(int(np.prod(np.shape(leaf))) for leaf in jax.tree.leaves(params))
    idx = jnp.asarray(block.indices)

    def restricted(v_block):
        full = jnp.zeros(dim, v_block.dtype).at[idx].set(v_block)
        return matvec(full)[idx]

    return restricted


# --------------------------------------------------------------------------- per-layer table


def _dense_row(bmv, size: int) -> dict:
    @jax.jit
    def run():
        columns = jax.lax.map(bmv, jnp.eye(size, dtype=jnp.float64))
        block = 0.5 * (columns + columns.T)
        return jnp.linalg.eigvalsh(block), jnp.trace(block)

    values, trace = run()
    return {"lambda_max": float(values[-1]), "lambda_min": float(values[0]),
            "trace": float(trace), "trace_lo": float(trace), "trace_hi": float(trace),
            "trace_matvecs": size, "method": "dense"}


def _krylov_row(bmv, size: int, key, num_steps: int, trace_matvecs: int,
                trace_method: str) -> dict:
    from crit.lanczos import extremal_eigenpairs

    start_key, trace_key = jax.random.split(key)
    steps = min(num_steps, size)

    @jax.jit
    def extremes(v0):
        pairs = extremal_eigenpairs(bmv, v0 / jnp.linalg.norm(v0), steps, 1)
        return pairs.largest.values[0], pairs.smallest.values[0]

    lam_max, lam_min = extremes(jax.random.normal(start_key, (size,), jnp.float64))
    row = {"lambda_max": float(lam_max), "lambda_min": float(lam_min)}
    estimator = hutchpp_trace if trace_method in ("auto", "estimate") else None
    if trace_method == "auto" and size <= trace_matvecs:
        estimator = None  # the exact trace costs no more products than the estimate
    if estimator is not None:
        est = jax.jit(lambda k: estimator(bmv, k, size, trace_matvecs))(trace_key)
        row.update(trace=float(est.estimate), trace_lo=float(est.lo), trace_hi=float(est.hi),
                   trace_matvecs=int(est.num_matvecs), method="lanczos+hutch++")
        return row

    @jax.jit
    def exact_trace():  # Σ_i e_i^T A e_i, one product at a time: memory of one vector
        def one(i):
            return bmv(jax.nn.one_hot(i, size, dtype=jnp.float64))[i]
        return jnp.sum(jax.lax.map(one, jnp.arange(size)))

    trace = float(exact_trace())
    row.update(trace=trace, trace_lo=trace, trace_hi=trace, trace_matvecs=size,
               method="lanczos+exact-trace")
    return row


def layer_table(matvec: Callable[[Array], Array], params: Params,
                blocks: dict[str, Block] | Sequence | None = None, *,
                dense_max: int = DENSE_BLOCK_MAX, key: Array | None = None,
                num_steps: int = 80, trace_matvecs: int = 60,
                trace_method: str = "auto") -> list[dict]:
    r"""λ_max, λ_min and the trace of the operator's diagonal block for every layer.

    Parameters
    ----------
    matvec
        A symmetric flat operator ``v -> A v`` at ``params`` (:func:`curvature_operator`).
    params
        The parameters it is taken at (for the paths and the sizes).
    blocks
        ``{name: Block}`` (default :func:`layer_blocks`), or a list of patterns / blocks.
    dense_max
        A block of at most this many coordinates is formed (one product per coordinate) and
        diagonalized: exact extremes, exact trace, ``method="dense"``.
    key, num_steps
        A larger block's extremes come from one Lanczos run of ``num_steps`` steps from a
        Gaussian start (:func:`crit.lanczos.extremal_eigenpairs`): the Ritz values bound the
        spectrum from inside (λ_max from below, λ_min from above).
    trace_matvecs, trace_method
        The larger block's trace: ``"auto"`` estimates it with Hutch++ from
        :mod:`crit.estimators` (``trace_matvecs`` products, with its interval) where that
        module exists and the block has more than ``trace_matvecs`` coordinates, and
        computes it exactly (:math:`\sum_i e_i^\top A e_i`, one product per coordinate,
        memory of one vector) otherwise; ``"exact"`` always does the latter;
        ``"estimate"`` requires the estimator.

    Returns
    -------
    list of dict
        One row per block: ``layer, n_params, lambda_max, lambda_min, trace, trace_lo,
        trace_hi, trace_matvecs, method``. The traces of a partition of the parameters (the
        default layers) sum to the full trace.
    """
    if trace_method not in ("auto", "exact", "estimate"):
        raise CurvatureError(f"trace_method must be 'auto', 'exact' or 'estimate', got "
                             f"{trace_method!r}")
    if blocks is None:
        blocks = layer_blocks(params)
    elif not isinstance(blocks, dict):
        chosen = [select_block(params, b) for b in blocks]
        blocks = {b.name: b for b in chosen}
    key = jax.random.key(0) if key is None else key
    rows = []
    for i, (name, block) in enumerate(blocks.items()):
        bmv = block_matvec(matvec, params, block)
        if block.size <= dense_max:
            row = _dense_row(bmv, block.size)
        else:
            row = _krylov_row(bmv, block.size, jax.random.fold_in(key, i), num_steps,
                              trace_matvecs, trace_method)
        rows.append({"layer": name, "n_params": block.size, **row})
    return rows
