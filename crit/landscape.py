"""Pictures of the loss landscape: lines, planes, trajectories, sharpness.

Every function is pure and works on parameter pytrees, so each composes with ``jit`` and
``vmap`` (for example one interpolation per pair of models under an outer ``vmap``).
Many-point evaluations (points on a line, grid points of a plane, random starts) go through
:func:`chunked_vmap`: ``chunk_size`` points are vmapped together, which bounds memory. It is
the width of the vmap, and XLA may round a batch of another width differently (measured:
34 of 81 surface points of a digits MLP changed in the last bits between chunk sizes 7 and
16), so results agree across chunk sizes to rounding, not bit for bit; an app that promises
reproducible files keeps it in its fingerprint.

References
----------
Goodfellow, Vinyals & Saxe (2015), "Qualitatively characterizing neural network
optimization problems", ICLR.
Li, Xu, Taylor, Studer & Goldstein (2018), "Visualizing the loss landscape of neural nets",
NeurIPS.
Keskar, Mudigere, Nocedal, Smelyanskiy & Tang (2017), "On large-batch training for deep
learning: generalization gap and sharp minima", ICLR.
Novak, Bahri, Abolafia, Pennington & Sohl-Dickstein (2018), "Sensitivity and generalization
in neural networks: an empirical study", ICLR.
"""

from typing import Any, Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

PyTree = Any
Array = jax.Array


# ----------------------------------------------------------------------------- evaluation


def chunked_vmap(fn: Callable, xs: PyTree, chunk_size: Optional[int] = None) -> PyTree:
    """Map ``fn`` over the leading axis of ``xs``, ``chunk_size`` points at a time.

    ``jax.vmap(fn)(xs)`` up to rounding. With a ``chunk_size`` smaller than the number of
    points n, the points are padded to a multiple of ``chunk_size`` (by repeating the last
    point, so the padding stays finite), split into chunks that ``lax.map`` visits one after
    another with ``vmap`` inside each, and the padding is dropped from the output. Every chunk
    is one vmap of exactly ``chunk_size`` points, so with n > ``chunk_size`` a point's result
    depends only on the point, ``chunk_size`` and its position in its chunk, not on the other
    points or the padding; another ``chunk_size`` is another vmap width and may change the last
    bits.

    Parameters
    ----------
    fn : callable
        Function of one point (one slice of every leaf of ``xs``); returns a pytree.
    xs : pytree
        Leaves share a leading axis of length n.
    chunk_size : int, optional
        Points evaluated at once; ``None`` (or >= n) evaluates all n in one ``vmap``.

    Returns
    -------
    pytree
        ``fn``'s output with a leading axis of length n.
    """
    n = jax.tree_util.tree_leaves(xs)[0].shape[0]
    if chunk_size is None or chunk_size >= n:
        return jax.vmap(fn)(xs)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    n_chunks = -(-n // chunk_size)
    pad = n_chunks * chunk_size - n

    def split(x):
        x = jnp.concatenate([x, jnp.repeat(x[-1:], pad, axis=0)], axis=0)
        return x.reshape((n_chunks, chunk_size) + x.shape[1:])

    out = jax.lax.map(jax.vmap(fn), jax.tree_util.tree_map(split, xs))
    return jax.tree_util.tree_map(lambda y: y.reshape((-1,) + y.shape[2:])[:n], out)


# ----------------------------------------------------------------------------- 1-D: lines


def interpolate_metrics(
    metric_fn: Callable[[PyTree], PyTree],
    theta_a: PyTree,
    theta_b: PyTree,
    alphas: Array,
    chunk_size: Optional[int] = None,
) -> PyTree:
    """Metrics along the line θ(α) = (1 − α) θ_a + α θ_b (Goodfellow et al. 2015).

    Parameters
    ----------
    metric_fn : callable
        ``metric_fn(params)`` returns a pytree of scalars, e.g.
        ``{'train_loss': ..., 'test_loss': ..., 'accuracy': ...}``.
    theta_a, theta_b : pytree
        End points (same structure); α = 0 gives θ_a and α = 1 gives θ_b exactly.
    alphas : array, shape (n,)
        Line coordinates; values outside [0, 1] extrapolate (HW1-3 uses α ∈ [−1, 2]).
    chunk_size : int, optional
        α values evaluated at once (see :func:`chunked_vmap`).

    Returns
    -------
    pytree
        ``metric_fn``'s output with a leading axis of length n.

    Notes
    -----
    The form (1 − α)θ_a + αθ_b (rather than θ_a + α(θ_b − θ_a)) makes both end points exact.
    Works under an outer ``jax.vmap`` over many (θ_a, θ_b) pairs.
    """
    alphas = jnp.asarray(alphas)

    def at(alpha):
        theta = jax.tree_util.tree_map(lambda a, b: (1 - alpha) * a + alpha * b, theta_a, theta_b)
        return metric_fn(theta)

    return chunked_vmap(at, alphas, chunk_size)


def interpolate(
    loss_fn: Callable[[PyTree], Array],
    theta_a: PyTree,
    theta_b: PyTree,
    alphas: Array,
    chunk_size: Optional[int] = None,
) -> Array:
    """Loss along the line θ(α) = (1 − α) θ_a + α θ_b, shape (len(alphas),).

    Goodfellow et al. (2015): from an initialization θ_0 to a solution θ*, or between two
    solutions; HW1-3 between a small-batch and a large-batch solution. See
    :func:`interpolate_metrics` for several metrics at once.
    """
    return interpolate_metrics(loss_fn, theta_a, theta_b, alphas, chunk_size)


class LineProjection(NamedTuple):
    """Coordinates of a trajectory relative to the line from θ_0 to θ*."""

    x: Array  # (T,) progress along u = (θ* − θ0)/‖θ* − θ0‖
    y: Array  # (T,) distance from that line


def trajectory_projection(trajectory: PyTree, theta0: PyTree, theta_star: PyTree) -> LineProjection:
    """Project a training trajectory onto the line θ_0 → θ* (Goodfellow et al. 2015).

    With u = (θ* − θ_0)/‖θ* − θ_0‖ and δ_t = θ_t − θ_0,
    x_t = δ_t · u and y_t = ‖δ_t − x_t u‖ (the residual, computed directly, not as
    sqrt(‖δ‖² − x²), which cancels badly near the line). ``trajectory`` holds the
    snapshots θ_t stacked on a leading time axis of length T; θ* must differ from θ_0.
    Returns ``LineProjection(x, y)``, each of shape (T,); x = ‖θ* − θ_0‖ at θ*.
    """
    flat0, _ = ravel_pytree(theta0)
    u = ravel_pytree(theta_star)[0] - flat0
    u = u / jnp.linalg.norm(u)
    delta = jax.vmap(lambda t: ravel_pytree(t)[0])(trajectory) - flat0
    x = delta @ u
    y = jnp.linalg.norm(delta - x[:, None] * u[None, :], axis=1)
    return LineProjection(x, y)


# ----------------------------------------------------------------------------- 2-D: planes


def random_direction(key: Array, params: PyTree) -> PyTree:
    """A standard Gaussian direction with the structure, shapes and dtypes of ``params``.

    One normal vector of the flattened size is drawn and unflattened (one random-number
    kernel whatever the number of leaves).
    """
    flat, unravel = ravel_pytree(params)
    return unravel(jax.random.normal(key, flat.shape, flat.dtype))


# Leaves that are not filters (Li et al. leave them out of the direction): biases, norm scales,
# and BatchNorm statistics if a state tree is ever passed.
NOT_FILTERS = ("bias", "scale", "mean", "var")
# Flax attention projections (DenseGeneral): kernel (d_in, heads, head_dim), one filter per
# (head, head_dim) output unit, over the input axis only.
HEAD_PROJECTIONS = ("query", "key", "value")


def filter_axes(path, shape) -> tuple[int, ...] | None:
    """The axes one filter spans in a parameter of this path and shape (None: not a filter).

    A filter is the set of weights into one output unit, for every kernel layout crit's models
    use: dense (d_in, d_out) and embedding (vocab, d) tables → over axis 0, per column; conv
    HWIO (h, w, c_in, c_out) → over (h, w, c_in), per output channel; attention query / key /
    value (d, heads, head_dim) → over axis 0, per (head, head_dim) unit; attention output
    (heads, head_dim, d) → over (heads, head_dim), per output feature; position embeddings
    (1, L, d) → over (1, L), per feature. Biases (also the (heads, head_dim) attention biases),
    LayerNorm / BatchNorm scales and anything of rank <= 1 are not filters.
    """
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if len(shape) <= 1 or (names and names[-1] in NOT_FILTERS):
        return None
    if len(shape) == 3 and any(n in HEAD_PROJECTIONS for n in names[:-1]):
        return (0,)
    return tuple(range(len(shape) - 1))


def filter_normalize(direction: PyTree, params: PyTree, eps: float = 1e-10) -> PyTree:
    """Filter normalization of Li et al. (2018).

    For every filter f, d_f ← d_f ‖θ_f‖ / (‖d_f‖ + eps); what a filter is for each kernel
    layout is :func:`filter_axes` (dense and conv kernels: the weights into one output unit or
    channel; attention projections: into one (head, head_dim) unit). Leaves that are not
    filters (biases, norm scales, rank <= 1) are set to zero, as in Li et al.'s default.
    ``direction`` and ``params`` share structure and shapes; ``eps`` guards against a zero
    direction filter (and perturbs the norms by ~eps/‖d_f‖).
    """

    def leaf(path, d, p):
        axes = filter_axes(path, jnp.shape(p))
        if axes is None:
            return jnp.zeros_like(d)
        d_norm = jnp.sqrt(jnp.sum(d**2, axis=axes, keepdims=True))
        p_norm = jnp.sqrt(jnp.sum(p**2, axis=axes, keepdims=True))
        return d * p_norm / (d_norm + eps)

    return jax.tree_util.tree_map_with_path(leaf, direction, params)


def filter_normalized_direction(key: Array, params: PyTree) -> PyTree:
    """A Gaussian direction rescaled by :func:`filter_normalize` (Li et al. 2018)."""
    return filter_normalize(random_direction(key, params), params)


def surface_2d(
    loss_fn: Callable[[PyTree], Array],
    theta_star: PyTree,
    d1: PyTree,
    d2: PyTree,
    alphas: Array,
    betas: Array,
    chunk_size: Optional[int] = None,
) -> Array:
    """Loss on the plane L(θ* + α d1 + β d2), shape (len(alphas), len(betas)).

    Li et al. (2018) use filter-normalized d1, d2 and a 51 × 51 grid over [−1, 1]². All
    grid points are flattened (row-major, ``indexing='ij'``) and evaluated by
    :func:`chunked_vmap`; ``out[i, j]`` is the loss at (alphas[i], betas[j]).
    """
    alphas, betas = jnp.asarray(alphas), jnp.asarray(betas)
    a, b = jnp.meshgrid(alphas, betas, indexing="ij")

    def at(ab):
        theta = jax.tree_util.tree_map(lambda t, u, v: t + ab[0] * u + ab[1] * v, theta_star, d1, d2)
        return loss_fn(theta)

    out = chunked_vmap(at, jnp.stack([a.ravel(), b.ravel()], axis=1), chunk_size)
    return out.reshape(a.shape)


class PlaneCoordinates(NamedTuple):
    """Least-squares coordinates of θ_t − θ* in span(d1, d2)."""

    alpha: Array  # (T,)
    beta: Array  # (T,)


def project_onto_plane(trajectory: PyTree, theta_star: PyTree, d1: PyTree, d2: PyTree) -> PlaneCoordinates:
    """Coordinates (α_t, β_t) = argmin ‖θ_t − θ* − α d1 − β d2‖ for each snapshot.

    Solved with ``lstsq`` on the (P, 2) matrix [d1 d2], so d1 and d2 need not be
    orthogonal or of unit norm (they must be linearly independent). The part of θ_t − θ*
    outside the plane is not drawn; check it with ‖θ_t − θ* − α_t d1 − β_t d2‖ if needed.
    ``trajectory`` holds snapshots θ_t on a leading time axis of length T; θ*, d1 and d2
    have the structure of one snapshot. Returns ``PlaneCoordinates(alpha, beta)``, (T,) each.
    """
    origin, _ = ravel_pytree(theta_star)
    basis = jnp.stack([ravel_pytree(d1)[0], ravel_pytree(d2)[0]], axis=1)  # (P, 2)
    delta = jax.vmap(lambda t: ravel_pytree(t)[0])(trajectory) - origin  # (T, P)
    coef = jnp.linalg.lstsq(basis, delta.T)[0]  # (2, T)
    return PlaneCoordinates(coef[0], coef[1])


# ----------------------------------------------------------------------------- PCA


class TrajectoryPCA(NamedTuple):
    """PCA of parameter snapshots from several runs."""

    coords: Array  # (runs, time, k) projections of the centred snapshots
    components: Array  # (k, P) orthonormal principal directions (flattened selected leaves)
    explained_variance_ratio: Array  # (k,) share of the total variance per component
    mean: Array  # (P,) mean snapshot over all runs and times


def _path_names(path) -> tuple:
    names = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                names.append(str(getattr(k, attr)))
                break
        else:
            names.append(str(k))
    return tuple(names)


def trajectory_pca(
    trajectories: PyTree,
    n_components: int = 2,
    leaf_filter: Union[None, str, Callable[[str], bool]] = None,
) -> TrajectoryPCA:
    """Principal components of training trajectories (HW1-2, 1-2-1).

    Each snapshot (one run, one time) is flattened to a vector of the selected leaves,
    concatenated in tree order; the R·T vectors are centred by their common mean and
    decomposed by a thin SVD, X_c = U S Vᵀ. Components are the first k rows of Vᵀ,
    coords = X_c V_k, and the explained variance ratio is S_i² / Σ S². Each component's
    sign is fixed so that its largest-magnitude entry is positive (reproducible plots).

    Parameters
    ----------
    trajectories : pytree
        Leaves of shape (runs, time, ...). A single run: add a leading axis of length 1.
    n_components : int
        k, at most min(R·T, P).
    leaf_filter : str or callable, optional
        A string keeps the leaves whose path has a component equal to it (``'Dense_1'``
        keeps that layer's kernel and bias, and not ``Dense_10``'s); a callable receives the
        '/'-joined path (e.g. ``'params/Dense_0/kernel'``) and returns whether to keep it.
        ``None`` keeps the whole model.

    Returns
    -------
    TrajectoryPCA
    """
    flat_with_path, _ = jax.tree_util.tree_flatten_with_path(trajectories)
    if leaf_filter is None:
        keep = lambda names: True
    elif isinstance(leaf_filter, str):
        keep = lambda names: leaf_filter in names
    else:
        keep = lambda names: leaf_filter("/".join(names))
    chosen = [x for path, x in flat_with_path if keep(_path_names(path))]
    if not chosen:
        raise ValueError(f"leaf_filter {leaf_filter!r} matches no leaf")
    runs, steps = chosen[0].shape[:2]
    x = jnp.concatenate([jnp.reshape(c, (runs, steps, -1)) for c in chosen], axis=-1)
    x = x.reshape(runs * steps, -1)
    mean = x.mean(axis=0)
    xc = x - mean
    _, s, vt = jnp.linalg.svd(xc, full_matrices=False)
    comps = vt[:n_components]
    pivot = jnp.argmax(jnp.abs(comps), axis=1)
    signs = jnp.sign(comps[jnp.arange(comps.shape[0]), pivot])
    comps = comps * signs[:, None]
    var = s**2
    coords = (xc @ comps.T).reshape(runs, steps, -1)
    return TrajectoryPCA(coords, comps, var[:n_components] / jnp.sum(var), mean)


# ----------------------------------------------------------------------------- sharpness


class Sharpness(NamedTuple):
    """ε-sharpness of Keskar et al. (2017)."""

    increase: Array  # max loss increase found in the constraint set, >= 0
    relative: Array  # 100 · increase / (1 + L(θ))


def epsilon_sharpness(
    loss_fn: Callable[[PyTree], Array],
    params: PyTree,
    key: Array,
    epsilon: float,
    num_samples: int = 32,
    ascent_steps: int = 20,
    step_size: Optional[float] = None,
    constraint: str = "box",
    chunk_size: Optional[int] = None,
) -> Sharpness:
    """Largest loss increase within an ε-neighbourhood, Keskar et al. (2017), Metric 2.1.

    Δ = max_{z ∈ C_ε} L(θ + z) − L(θ), relative sharpness 100 · Δ / (1 + L(θ)), with the
    per-coordinate scale s_i = |θ_i| + 1 and either

    * ``'box'`` (Keskar's, A = I): C_ε = {z : |z_i| ≤ ε s_i}, or
    * ``'ball'``: C_ε = {z : ‖z / s‖₂ ≤ ε} (at θ = 0, the Euclidean ball of radius ε).

    The maximum is searched from ``num_samples`` random starts (uniform in C_ε), each
    followed by ``ascent_steps`` of projected ascent in the scaled variable w = z / s:
    signed-gradient steps of length ``step_size``·ε per coordinate for the box (steepest
    ascent in the ∞-norm; default 0.1), normalized-gradient steps of length ``step_size``·ε
    for the ball (default 0.5: on a quadratic this is a shifted power iteration, which
    small steps slow down). The best value over all iterates is kept, and z = 0 is
    feasible, so Δ ≥ 0.

    Parameters
    ----------
    loss_fn, params : the full-batch loss and the point θ (any pytree).
    key : PRNG key for the random starts.
    epsilon : ε, the relative half-width of the box (radius of the ball).
    num_samples, ascent_steps, step_size : the search described above.
    constraint : ``'box'`` or ``'ball'``.
    chunk_size : random starts searched at once (see :func:`chunked_vmap`).

    Returns
    -------
    Sharpness
        ``(increase, relative)``; ``relative`` is Keskar et al.'s φ_{x,f}(ε).

    Notes
    -----
    Keskar et al. solve the inner maximization with L-BFGS-B; any search gives a lower
    bound on the true maximum. Δ of a quadratic ½ θᵀ diag(λ) θ at θ = 0 is ½ λ_max ε² for
    the ball and ½ Σ_i max(λ_i, 0) ε² for the box.
    """
    theta, unravel = ravel_pytree(params)
    scale = jnp.abs(theta) + 1.0
    base = loss_fn(params)
    objective = lambda w: loss_fn(unravel(theta + w * scale))
    k_dir, k_rad = jax.random.split(key)
    shape = (num_samples, theta.size)
    if step_size is None:
        step_size = 0.1 if constraint == "box" else 0.5
    if constraint == "box":
        project = lambda w: jnp.clip(w, -epsilon, epsilon)
        ascent_dir = jnp.sign
        starts = jax.random.uniform(k_dir, shape, theta.dtype, -epsilon, epsilon)
    elif constraint == "ball":
        tiny = jnp.finfo(theta.dtype).tiny

        def project(w):
            return w * jnp.minimum(1.0, epsilon / (jnp.linalg.norm(w) + tiny))

        ascent_dir = lambda g: g / (jnp.linalg.norm(g) + tiny)
        g0 = jax.random.normal(k_dir, shape, theta.dtype)
        r = epsilon * jax.random.uniform(k_rad, (num_samples, 1), theta.dtype) ** (1.0 / theta.size)
        starts = g0 / jnp.linalg.norm(g0, axis=1, keepdims=True) * r
    else:
        raise ValueError(f"constraint must be 'box' or 'ball', got {constraint!r}")

    def ascend(w):
        def step(carry, _):
            w, best = carry
            val, grad = jax.value_and_grad(objective)(w)
            w = project(w + step_size * epsilon * ascent_dir(grad))
            return (w, jnp.maximum(best, val)), None

        (w, best), _ = jax.lax.scan(step, (w, jnp.asarray(-jnp.inf, base.dtype)), None, length=ascent_steps)
        return jnp.maximum(best, objective(w))

    best = jnp.max(chunked_vmap(ascend, starts, chunk_size))
    increase = jnp.maximum(best - base, 0.0)
    return Sharpness(increase, 100.0 * increase / (1.0 + base))


def input_sensitivity(
    apply_fn: Callable[[PyTree, Array], Array],
    params: PyTree,
    x: Array,
    chunk_size: Optional[int] = None,
) -> Array:
    """Mean Frobenius norm of the input-output Jacobian (Novak et al. 2018; HW1-3).

    S = (1/N) Σ_n ‖∂f(θ, x_n)/∂x_n‖_F, one ``jax.jacrev`` per point, vmapped over the N
    points in chunks of ``chunk_size``.

    Parameters
    ----------
    apply_fn : callable
        ``apply_fn(params, x_batch)`` on a batch (e.g. ``Problem.apply_fn``); each point is
        passed as a batch of one, so convolutional and attention models work too.
    params : pytree
    x : array, shape (N, ...)
        Data points on the leading axis.
    """

    def per_point(xn):
        jac = jax.jacrev(lambda v: apply_fn(params, v[None])[0])(xn)
        return jnp.sqrt(jnp.sum(jac**2))

    return jnp.mean(chunked_vmap(per_point, x, chunk_size))
