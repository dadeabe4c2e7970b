"""Critical points of every index: many starts, Newton on ∇L = 0, certificates, duplicates merged.

Dauphin et al. (2014) map the index of critical points against their loss by running Newton's
method on g(θ) = ∇L(θ) = 0 -- which converges to critical points of *any* index, saddles
included -- from many points of the landscape. This module is that protocol, written for one
start and lifted with ``vmap``:

1. **Starts** (:func:`training_snapshots`, :func:`make_starts`). Each init i (key
   ``fold_in(PRNGKey(seed), i)``) is trained with an optax optimizer and θ is recorded every
   ``snapshot_every`` steps: early snapshots sit high on the landscape (near high-index
   saddles), late ones near minima. Each snapshot is also copied with isotropic Gaussian
   noise θ + s·ξ, ξ ~ N(0, I_P), for each chosen scale s, to reach points off the trajectory.
   Optionally (``init_transform`` = :func:`mask_hidden_units`, masks from
   :func:`reduced_net_masks`) an init trains only some of its hidden units, the others held at
   exactly zero: the smaller net's critical points are saddles of the full net whose index grows
   with the number of zero units (Fukumizu & Amari 2000) -- without them, starts near training
   trajectories mostly refine to minima.
2. **Refinement** (:func:`refine_and_certify`). Optionally a few Adam steps on ½‖g‖² (cheap: one
   HVP each), then Levenberg–Marquardt on g = 0 with the exact Hessian and a per-step damping
   grid (:func:`crit.critical.newton_critical_point`), then the exact spectrum (``eigvalsh`` of
   the dense Hessian) and the certificate
   (:func:`crit.critical.certify`): *critical* iff ‖g‖ ≤ grad_tol. Every start keeps its row
   and its status; :func:`status_counts` tallies them (nothing is dropped silently).
   :func:`find_critical_points` runs the starts in vmapped groups of a fixed width through one
   compiled program, so the chunk size never changes a result.
3. **Duplicates** (:func:`merge_duplicates`). Certified points that are the same critical point
   -- same loss and same sorted spectrum within relative tolerances and, for MLPs, the same
   parameters up to the network's discrete symmetries -- are merged into one point with a
   multiplicity.

:func:`critical_point_search` chains the three steps and returns every start with its status.

Symmetries of an MLP (Chen, Lu & Hecht-Nielsen 1993): permuting the units of a hidden layer
(columns of its kernel and bias, rows of the next kernel) leaves the function unchanged; for an
odd activation (tanh) so does flipping the sign of a unit's incoming weights, bias and outgoing
weights. :func:`canonicalize_mlp` picks one representative per orbit (signs fixed, then units
sorted lexicographically); :func:`align_mlp` matches the units of one net to another's with the
Hungarian algorithm, which is what :func:`merge_duplicates` compares (robust to near-ties that
can reorder a lexicographic sort).

References
----------
Y. Dauphin, R. Pascanu, C. Gulcehre, K. Cho, S. Ganguli, Y. Bengio, "Identifying and attacking
the saddle point problem in high-dimensional non-convex optimization", NeurIPS 2014 (§3, Fig. 1).
A. M. Chen, H. Lu, R. Hecht-Nielsen, "On the geometry of feedforward neural network error
surfaces", Neural Computation 5 (1993) (the permutation / sign-flip group).
C. G. Frye, J. Simon, N. S. Wadia, A. Ligeralde, M. R. DeWeese, K. E. Bouchard, "Critical point-
finding methods reveal gradient-flat regions of deep network losses", Neural Computation (2021).
K. Fukumizu and S. Amari, "Local minima and plateaus in hierarchical structures of multilayer
perceptrons", Neural Networks 13 (2000) (critical points of smaller nets embedded in larger ones).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from crit.critical import (DAMPING_GRID, STATUSES, certify, gradient_norm_descent,
                           newton_critical_point)
from crit.hessian import dense_hessian
from crit.spectrum import classify_spectrum
from crit.train import tree_norm

Params = Any

#: Starts vmapped together by :func:`find_critical_points` (part of a search's protocol).
DEFAULT_VMAP_WIDTH = 8


# --------------------------------------------------------------------------- starts

def training_snapshots(loss_fn: Callable[[Params], jax.Array], optimizer, params: Params,
                       num_steps: int, snapshot_every: int) -> tuple[Params, jax.Array]:
    """Train from ``params`` and record θ every ``snapshot_every`` full-batch steps.

    Parameters
    ----------
    loss_fn : full-batch loss over a parameter pytree.
    optimizer : ``optax.GradientTransformation`` (e.g. :func:`crit.train.make_optimizer`).
    params : the initialization (one init; ``vmap`` this function over many).
    num_steps : training steps; must be a multiple of ``snapshot_every``.
    snapshot_every : steps between snapshots.

    Returns
    -------
    snapshots : pytree with a leading axis of length S = num_steps / snapshot_every + 1,
        θ at steps 0, k, 2k, ..., num_steps (step 0 is the initialization).
    losses : (S,) the loss at each snapshot.
    """
    if snapshot_every < 1 or num_steps < 0 or num_steps % snapshot_every:
        raise ValueError(f"num_steps={num_steps} must be a non-negative multiple of "
                         f"snapshot_every={snapshot_every} >= 1")
    grad_fn = jax.grad(loss_fn)

    def step(carry, _):
        p, state = carry
        updates, state = optimizer.update(grad_fn(p), state, p)
        return (jax.tree.map(lambda a, u: a + u, p, updates), state), None

    def block(carry, _):
        carry, _ = jax.lax.scan(step, carry, None, length=snapshot_every)
        return carry, carry[0]

    carry = (params, optimizer.init(params))
    _, later = jax.lax.scan(block, carry, None, length=num_steps // snapshot_every)
    snaps = jax.tree.map(lambda p0, ps: jnp.concatenate([p0[None], ps]), params, later)
    return snaps, jax.vmap(loss_fn)(snaps)


def noisy_copies(key: jax.Array, params: Params, scales: Sequence[float]) -> Params:
    """θ + s_j·ξ_j for each scale s_j, ξ_j ~ N(0, I_P) independent; leading axis len(scales).

    The noise is isotropic and absolute (standard deviation s_j per parameter entry); s = 0
    returns θ itself.
    """
    theta, unravel = ravel_pytree(params)
    scales = jnp.asarray(scales, dtype=theta.dtype)
    xi = jax.random.normal(key, (scales.shape[0], theta.shape[0]), dtype=theta.dtype)
    return jax.vmap(unravel)(theta[None, :] + scales[:, None] * xi)


def zero_preserving(activation) -> bool:
    """Whether σ(0) = 0 exactly, so a hidden unit with zero weights stays zero under training.

    ``activation`` is a name of :data:`crit.problems.ACTIVATIONS` or a callable.
    """
    return _at_zero(activation) == 0.0


def _at_zero(activation) -> float:
    """σ(0), evaluated eagerly even inside a trace (the check runs within ``jit(vmap(...))``)."""
    from crit.problems import ACTIVATIONS

    fn = ACTIVATIONS[activation] if isinstance(activation, str) else activation
    with jax.core.eval_context():  # outside any trace: fn may be a custom_jvp (relu)
        return float(fn(np.zeros((), np.float64)))


def check_maskable(activation) -> None:
    """Raise ValueError unless :func:`mask_hidden_units` embeds a smaller net for ``activation``.

    One message, for the library and the apps' flag checks alike.
    """
    from crit.problems import ACTIVATIONS

    if isinstance(activation, str) and activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; allowed: {sorted(ACTIVATIONS)}")
    if not zero_preserving(activation):
        ok = sorted(a for a in ACTIVATIONS if zero_preserving(a))
        raise ValueError(
            f"reduced nets (zeroed hidden units) need σ(0) = 0, but activation {activation!r} "
            f"has σ(0) = {_at_zero(activation):g}: a zeroed unit outputs a "
            "nonzero constant, its outgoing weights get a gradient and it leaves zero during "
            f"training, so it does not embed a smaller net; use one of {ok}")


def mask_hidden_units(params: Params, mask, activation) -> Params:
    r"""Zero the incoming weights, bias and outgoing weights of the hidden units where mask = 0.

    ``mask`` has one entry per hidden unit of a :class:`crit.problems.MLP`, the hidden layers'
    units concatenated from the input side (length Σ widths); traceable, so it can depend on a
    vmapped init id. ``activation`` (a name of :data:`crit.problems.ACTIVATIONS` or a callable)
    must have σ(0) = 0 (tanh, relu, linear); sigmoid and softplus are refused with a
    ValueError (:func:`check_maskable`), see the notes.

    Notes
    -----
    For an activation with σ(0) = 0, a unit whose incoming weights and bias a and
    outgoing weights v are all zero has zero gradient (∂L/∂v carries the factor σ(0), ∂L/∂a the
    factor v), and the Hessian does not couple it to the other parameters (every mixed second
    derivative carries a factor σ(0) or v). Gradient training therefore stays in that subspace
    exactly (every update of the unit is a product with an exact zero), and Newton steps stay in
    it up to rounding (the eigendecomposition of the whole Hessian mixes near-degenerate blocks:
    masked weights up to about 3e-13 measured after refinement): a masked net trains as
    the smaller net embedded in the larger one, and its critical points are critical points of
    the larger net. With σ(0) ≠ 0 (sigmoid, softplus) the zeroed unit outputs the constant σ(0) and
    ∂L/∂v = σ(0)·E[r] is nonzero whenever the mean residual is (during training; with an L2
    penalty on the output bias c, E[r] = −λ₂c even at the smaller net's critical points): the
    unit leaves zero (measured: 0.24 after 50 Adam steps), the subspace is not invariant and
    the search would label points with a smaller net they do not belong to, hence the refusal. The
    unit's own Hessian block is

    .. math:: \begin{pmatrix} \lambda_2 I & C \\ C^\top & \lambda_2 I \end{pmatrix},
              \qquad C = \sigma'(0)\,\mathbb{E}_x[\tilde x\, r(x)^\top],

    with x̃ = (x, 1), r = ∂ℓ/∂f the residual and λ₂ the L2 weight: eigenvalues λ₂ ± s_i(C), so
    each zero unit adds one negative eigenvalue per singular value of C above λ₂ (at most
    min(d_in + 1, k); k − 1 for softmax cross-entropy). Such points are saddles whose index grows
    with the number of zero units while their loss is that of the smaller net (Fukumizu &
    Amari, Neural Networks 13, 2000): this populates the index-vs-loss plane.
    """
    check_maskable(activation)
    tree = params["params"] if "params" in params else params
    names = sorted(tree, key=lambda k: int(k.split("_")[1]))
    mask = jnp.asarray(mask)
    new, offset = {}, 0
    out_scale = None
    for name in names:
        layer = dict(tree[name])
        if out_scale is not None:  # rows of this kernel = outgoing weights of masked units
            layer["kernel"] = layer["kernel"] * out_scale[:, None].astype(layer["kernel"].dtype)
        if name != names[-1]:
            width = layer["kernel"].shape[1]
            m = mask[offset:offset + width].astype(layer["kernel"].dtype)
            offset += width
            layer["kernel"] = layer["kernel"] * m
            if "bias" in layer:
                layer["bias"] = layer["bias"] * m
            out_scale = m
        new[name] = layer
    if offset != mask.shape[0]:
        raise ValueError(f"mask has {mask.shape[0]} entries; the net has {offset} hidden units")
    return {"params": new} if "params" in params else new


class StartSet(NamedTuple):
    """Starting points of the critical-point search and where each came from (leading axis S)."""

    params: Params              # stacked parameter pytrees
    init_id: np.ndarray         # init the trajectory started from
    step: np.ndarray            # training step of the snapshot
    noise_scale: np.ndarray     # standard deviation of the added noise (0: the snapshot itself)
    start_loss: np.ndarray      # loss at the start


def make_starts(loss_fn: Callable[[Params], jax.Array], init_fn: Callable[[jax.Array], Params],
                seed: int, num_inits: int, optimizer, num_steps: int, snapshot_every: int,
                noise_scales: Sequence[float] = (0.0,),
                init_transform: Optional[Callable[[jax.Array, Params], Params]] = None
                ) -> StartSet:
    """Snapshots along ``num_inits`` training trajectories, each with noisy copies.

    Init i uses ``fold_in(PRNGKey(seed), i)``; the noise of snapshot s of init i uses
    ``fold_in(fold_in(fold_in(PRNGKey(seed), i), 1 + s), 7)``, so a start never depends on how
    many other inits there are. All trajectories train in one ``jit(vmap(...))``.

    Parameters
    ----------
    loss_fn, init_fn : the problem's full-batch loss and initializer.
    seed, num_inits : root seed and number of trajectories.
    optimizer, num_steps, snapshot_every : see :func:`training_snapshots`.
    noise_scales : standard deviations s ≥ 0; one start per (snapshot, scale). Include 0 to keep
        the snapshot itself.
    init_transform : optional ``(i, params) -> params`` applied to init i before training
        (traced: i is a JAX integer), e.g. :func:`mask_hidden_units` to train a smaller network
        embedded in the larger one.

    Returns
    -------
    StartSet with num_inits · (num_steps / snapshot_every + 1) · len(noise_scales) starts,
    ordered by init, then snapshot, then scale.
    """
    scales = tuple(float(s) for s in noise_scales)
    if not scales or any(not np.isfinite(s) or s < 0 for s in scales):
        raise ValueError(f"noise_scales must be finite and >= 0, got {scales}")
    if num_inits < 1:
        raise ValueError(f"num_inits must be >= 1, got {num_inits}")

    def one_init(i):
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        params = init_fn(key)
        if init_transform is not None:
            params = init_transform(i, params)
        snaps, _ = training_snapshots(loss_fn, optimizer, params, num_steps, snapshot_every)
        n_snap = jax.tree.leaves(snaps)[0].shape[0]
        keys = jax.vmap(lambda s: jax.random.fold_in(jax.random.fold_in(key, 1 + s), 7))(
            jnp.arange(n_snap))
        starts = jax.vmap(lambda k, p: noisy_copies(k, p, scales))(keys, snaps)  # (S, J, ...)
        return starts, jax.vmap(jax.vmap(loss_fn))(starts)

    starts, losses = jax.jit(jax.vmap(one_init))(jnp.arange(num_inits))
    n_snap = num_steps // snapshot_every + 1
    flat = jax.tree.map(lambda x: x.reshape((-1,) + x.shape[3:]), starts)
    grid = np.meshgrid(np.arange(num_inits), np.arange(n_snap) * snapshot_every,
                       np.asarray(scales), indexing="ij")
    return StartSet(flat, grid[0].ravel(), grid[1].ravel(), grid[2].ravel(),
                    np.asarray(losses).reshape(-1))


# --------------------------------------------------------------------------- refinement

class CriticalPoints(NamedTuple):
    """Refined point of each start with its certificate and exact spectrum.

    Fields have a leading start axis when returned by :func:`find_critical_points`.
    ``status`` indexes :data:`crit.critical.STATUSES`; ``index`` = n_neg / P (Dauphin's α).
    """

    params: Params
    status: jax.Array
    loss: jax.Array
    grad_norm: jax.Array
    flatness: jax.Array
    iterations: jax.Array
    eigenvalues: jax.Array      # (P,) ascending
    n_pos: jax.Array
    n_neg: jax.Array
    n_null: jax.Array
    index: jax.Array
    tolerance: jax.Array        # τ used to classify the eigenvalues
    start_loss: jax.Array
    start_grad_norm: jax.Array


def refine_and_certify(loss_fn: Callable[[Params], jax.Array], params: Params,
                       max_iters: int = 50, grad_tol: float = 1e-8, flat_tol: float = 1e-3,
                       eig_tol: Optional[float] = None, eig_rtol: float = 0.0,
                       damping_grid=DAMPING_GRID, patience: int = 10,
                       min_progress: float = 0.5, prefind_steps: int = 0,
                       prefind_lr: float = 1e-3) -> CriticalPoints:
    """Newton (Levenberg–Marquardt) on ∇L = 0 from one start, then spectrum and certificate.

    Parameters
    ----------
    loss_fn, params : full-batch loss and one starting point (float64).
    max_iters, grad_tol, damping_grid, patience, min_progress : of
        :func:`crit.critical.newton_critical_point` (it stops early once ‖g‖ has not halved in
        ``patience`` iterations).
    flat_tol : gradient-flat threshold of :func:`crit.critical.certify`.
    eig_tol : absolute eigenvalue tolerance τ; None uses the numerical-rank default
        τ = P·ε·max|λ| (:func:`crit.spectrum.default_tolerance`).
    eig_rtol : if > 0, τ is raised to at least eig_rtol·max|λ| (a relative null band that
        absorbs eigenvalues moved by the O(‖g‖) distance to the exact critical point).
    prefind_steps, prefind_lr : if ``prefind_steps`` > 0, first run that many Adam steps on
        ½‖g‖² (:func:`crit.critical.gradient_norm_descent`, one HVP each) to bring the start
        closer to a critical point; Newton then polishes. Far from critical points Newton's
        merit ‖g‖ decreases slowly, and this cheap first stage raises the certified share.

    Returns
    -------
    CriticalPoints for this start (no leading axis).

    Notes
    -----
    Newton's step p = −H⁻¹g is invariant to the sign of H's eigenvalues, so the iteration is
    attracted to the nearest critical point of any index (Dauphin et al. 2014, §3); the damping
    picked from a grid by the smallest ‖g(θ + p)‖ keeps it stable far from one.
    """
    params = jax.tree.map(lambda x: x.astype(jnp.float64), params)
    start_loss, g0 = jax.value_and_grad(loss_fn)(params)
    if prefind_steps > 0:
        params = gradient_norm_descent(loss_fn, params, prefind_steps, prefind_lr,
                                       grad_tol=grad_tol).params
    found = newton_critical_point(loss_fn, params, max_iters=max_iters, grad_tol=grad_tol,
                                  damping_grid=damping_grid, patience=patience,
                                  min_progress=min_progress)
    eigs = jnp.linalg.eigvalsh(dense_hessian(loss_fn, found.params))
    hnorm = jnp.max(jnp.abs(eigs))
    if eig_tol is None:
        tol = eigs.shape[-1] * jnp.finfo(eigs.dtype).eps * hnorm
    else:
        tol = jnp.asarray(eig_tol, eigs.dtype)
    tol = jnp.maximum(tol, eig_rtol * hnorm)
    summary = classify_spectrum(eigs, tol)
    cert = certify(loss_fn, found.params, hnorm, grad_tol, flat_tol)
    return CriticalPoints(found.params, cert.status, cert.loss, cert.grad_norm, cert.flatness,
                          found.iterations, eigs, summary.n_pos, summary.n_neg, summary.n_null,
                          summary.index, summary.tolerance, start_loss, tree_norm(g0))


def find_critical_points(loss_fn: Callable[[Params], jax.Array], starts: Params,
                         chunk_size: int = 64, progress: Optional[Callable[[int], None]] = None,
                         vmap_width: int = DEFAULT_VMAP_WIDTH, **kwargs) -> CriticalPoints:
    """:func:`refine_and_certify` from every start, in vmapped groups of ``vmap_width`` starts.

    One program is compiled, ``jit(vmap(refine_and_certify))`` over exactly ``vmap_width``
    starts, and every group of starts runs through it (the last group padded by repeating the
    last start; the padding is dropped). A start's result depends on ``vmap_width`` -- XLA may
    round a batched operation differently at another batch width, and Newton amplifies a
    last-bit difference into another end point (measured: eigenvalues 3e-14 apart between
    widths 1 and 6) -- so ``vmap_width`` is part of an experiment's protocol. ``chunk_size``
    only sets how many starts are dispatched before their results are fetched and ``progress``
    is called (rounded up to a multiple of ``vmap_width``); for a fixed ``vmap_width`` the
    results are the same bit for bit for any chunk size.

    Parameters
    ----------
    loss_fn : full-batch loss.
    starts : stacked parameter pytrees (leading axis S), e.g. ``StartSet.params``.
    chunk_size : starts per fetch and progress report (>= 1).
    progress : optional callback, called with the number of starts finished after each chunk.
    vmap_width : starts vmapped together (>= 1); changes results in the last bits.
    **kwargs : forwarded to :func:`refine_and_certify` (max_iters, grad_tol, flat_tol, eig_tol,
        eig_rtol, damping_grid, patience, min_progress, prefind_steps, prefind_lr).

    Returns
    -------
    CriticalPoints with a leading axis S, as NumPy arrays.

    Notes
    -----
    Why not ``lax.map(..., batch_size=vmap_width)`` over a chunk under one ``jit``, as
    :func:`crit.protocol.make_chunk_fn` does: the scan over groups has a trip count that follows
    the chunk size, and XLA compiles a one-group scan differently (it inlines the loop) --
    measured: ``start_grad_norm`` differed in the last bit between chunks of one and of two
    groups. One compiled group program, dispatched asynchronously group after group, is the
    same computation for every chunk size.
    """
    n = jax.tree.leaves(starts)[0].shape[0]
    for name, value in (("chunk_size", chunk_size), ("vmap_width", vmap_width)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    width = int(vmap_width)
    groups_per_chunk = -(-int(chunk_size) // width)
    fn = jax.jit(jax.vmap(functools.partial(refine_and_certify, loss_fn, **kwargs)))
    group_starts = list(range(0, n, width))
    parts = []
    for c in range(0, len(group_starts), groups_per_chunk):
        outs = []
        for lo in group_starts[c:c + groups_per_chunk]:  # dispatched asynchronously
            idx = np.minimum(np.arange(lo, lo + width), n - 1)
            outs.append((fn(jax.tree.map(lambda x: x[idx], starts)), min(width, n - lo)))
        done = 0
        for out, m in outs:
            parts.append(jax.tree.map(lambda x: np.asarray(x)[:m], jax.device_get(out)))
            done += m
        if progress is not None:
            progress(done)
    return jax.tree.map(lambda *xs: np.concatenate(xs), *parts)


def status_counts(status) -> dict[str, int]:
    """Number of starts per certificate status, every status of STATUSES listed (zeros too)."""
    status = np.asarray(status)
    return {name: int(np.sum(status == code)) for code, name in enumerate(STATUSES)}


# --------------------------------------------------------------------------- MLP symmetries

def mlp_layers(params: Params) -> list[tuple[np.ndarray, Optional[np.ndarray]]]:
    """(kernel, bias) of each Dense layer of a :class:`crit.problems.MLP`, input to output.

    Accepts the Flax dict ``{'params': {'Dense_0': {'kernel', 'bias'}, ...}}`` (or without the
    outer ``'params'``); the kernel of layer l has shape (d_l, d_{l+1}).
    """
    tree = params.get("params", params) if isinstance(params, dict) else None
    if not isinstance(tree, dict) or not all(k.startswith("Dense_") for k in tree):
        raise ValueError("expected MLP params {'params': {'Dense_0': {'kernel', 'bias'}, ...}}")
    names = sorted(tree, key=lambda k: int(k.split("_")[1]))
    return [(np.asarray(tree[k]["kernel"], dtype=np.float64),
             None if "bias" not in tree[k] else np.asarray(tree[k]["bias"], dtype=np.float64))
            for k in names]


def _rebuild(params: Params, layers) -> Params:
    tree = params.get("params", params)
    names = sorted(tree, key=lambda k: int(k.split("_")[1]))
    new = {k: ({"kernel": K} if b is None else {"kernel": K, "bias": b})
           for k, (K, b) in zip(names, layers)}
    return {"params": new} if "params" in params else new


def _unit_rows(K, b, K_next, with_out: bool):
    """Rows [incoming weights, bias, (outgoing weights)] of each unit of a hidden layer."""
    cols = [K.T] + ([] if b is None else [b[:, None]]) + ([K_next] if with_out else [])
    return np.concatenate(cols, axis=1)


def _apply_units(layers, l, perm, signs):
    """Permute / flip the units of hidden layer l (kernel cols, bias, next kernel rows)."""
    K, b = layers[l]
    K_next, b_next = layers[l + 1]
    K = K[:, perm] * signs
    b = None if b is None else b[perm] * signs
    K_next = K_next[perm, :] * signs[:, None]
    layers[l], layers[l + 1] = (K, b), (K_next, b_next)


def canonicalize_mlp(params: Params, odd_activation: bool = False) -> Params:
    """One representative of an MLP's orbit under unit permutations (and sign flips).

    Hidden layers are processed from the input side. For an odd activation (σ(−z) = −σ(z),
    e.g. tanh) each unit's sign is chosen so that the entry of largest magnitude among its
    incoming weights and bias -- and, in the last hidden layer, its outgoing weights -- is
    positive (flipping negates the incoming weights, the bias and the outgoing weights, which
    leaves the function unchanged). Then the units are sorted lexicographically by
    [incoming weights, bias, outgoing weights]. Two parameter vectors related by the symmetry
    group have the same canonical form, except at near-ties of the sort keys; for comparisons use
    :func:`align_mlp`.

    Parameters
    ----------
    params : MLP parameters (:func:`mlp_layers`).
    odd_activation : also remove the sign-flip symmetry.

    Returns
    -------
    Parameters of the same structure (NumPy arrays).

    References
    ----------
    Chen, Lu & Hecht-Nielsen (1993).
    """
    layers = mlp_layers(params)
    for l in range(len(layers) - 1):
        K, b = layers[l]
        last = l == len(layers) - 2
        width = K.shape[1]
        signs = np.ones(width)
        if odd_activation:
            key = _unit_rows(K, b, layers[l + 1][0], with_out=last)
            big = key[np.arange(width), np.argmax(np.abs(key), axis=1)]
            signs = np.where(big < 0, -1.0, 1.0)
            _apply_units(layers, l, np.arange(width), signs)
            signs = np.ones(width)
        rows = _unit_rows(*layers[l], layers[l + 1][0], with_out=True)
        perm = np.lexsort(rows.T[::-1])
        _apply_units(layers, l, perm, signs)
    return _rebuild(params, layers)


def align_mlp(reference: Params, other: Params, odd_activation: bool = False) -> Params:
    """``other`` with its hidden units permuted (and sign-flipped) to best match ``reference``.

    Layer by layer from the input side, the units of ``other`` are assigned to those of
    ``reference`` by the Hungarian algorithm (``scipy.optimize.linear_sum_assignment``) on the
    squared distance between unit rows [incoming weights, bias] -- plus outgoing weights in the
    last hidden layer, whose next layer is not permuted. For an odd activation the cost of a
    pair is min(‖u − v‖², ‖u + v‖²) and the better sign is applied. Exact for nets related by the
    symmetry group; otherwise a good (not always optimal) alignment.

    Parameters
    ----------
    reference, other : MLP parameters of the same architecture.
    odd_activation : allow sign flips.

    Returns
    -------
    The aligned copy of ``other`` (NumPy arrays, same structure).
    """
    from scipy.optimize import linear_sum_assignment

    ref, oth = mlp_layers(reference), mlp_layers(other)
    if [K.shape for K, _ in ref] != [K.shape for K, _ in oth]:
        raise ValueError("align_mlp: the two nets have different architectures")
    for l in range(len(ref) - 1):
        last = l == len(ref) - 2
        u = _unit_rows(*ref[l], ref[l + 1][0], with_out=last)
        v = _unit_rows(*oth[l], oth[l + 1][0], with_out=last)
        d_plus = ((u[:, None, :] - v[None, :, :]) ** 2).sum(-1)
        cost, flip = d_plus, np.zeros_like(d_plus, dtype=bool)
        if odd_activation:
            d_minus = ((u[:, None, :] + v[None, :, :]) ** 2).sum(-1)
            flip = d_minus < d_plus
            cost = np.minimum(d_plus, d_minus)
        rows, cols = linear_sum_assignment(cost)
        perm = cols[np.argsort(rows)]
        signs = np.where(flip[np.arange(len(perm)), perm], -1.0, 1.0)
        _apply_units(oth, l, perm, signs)
    return _rebuild(other, oth)


def mlp_distance(a: Params, b: Params, odd_activation: bool = False) -> float:
    """‖θ_a − θ_{g·b}‖₂ after aligning ``b`` to ``a`` with :func:`align_mlp`."""
    ta = ravel_pytree(jax.tree.map(np.asarray, a))[0]
    tb = ravel_pytree(align_mlp(a, b, odd_activation))[0]
    return float(np.linalg.norm(np.asarray(ta) - np.asarray(tb)))


# --------------------------------------------------------------------------- duplicates

class MergedPoints(NamedTuple):
    """Result of :func:`merge_duplicates`: unique points and how often each was found."""

    representative: np.ndarray  # (U,) index into the input of each unique point's first copy
    multiplicity: np.ndarray    # (U,) number of input points merged into it
    label: np.ndarray           # (N,) unique-point number of every input point


def _stack_index(params, i):
    return jax.tree.map(lambda x: np.asarray(x[i]), params)


def merge_duplicates(loss, eigenvalues, params: Params = None, *, odd_activation: bool = False,
                     loss_rtol: float = 1e-6, loss_atol: float = 1e-12,
                     eig_rtol: float = 1e-5, param_rtol: float = 1e-4,
                     distance: Optional[Callable[[Params, Params], float]] = None
                     ) -> MergedPoints:
    """Merge critical points that are the same point up to tolerance and the net's symmetries.

    Points a and b are the same critical point iff

    * |L_a − L_b| ≤ loss_rtol·max(|L_a|, |L_b|) + loss_atol,
    * max_i |λ_i(a) − λ_i(b)| ≤ eig_rtol·max(‖H_a‖, ‖H_b‖) on the ascending spectra, and
    * if ``params`` is given: d(a, b) ≤ param_rtol·max(‖θ_a‖, ‖θ_b‖), with d the
      symmetry-aware distance (default :func:`mlp_distance`, units permuted and, for an odd
      activation, sign-flipped; any ``distance(a, b)`` may be passed for other models).

    Loss and spectrum are invariant under the symmetry group, so they are a cheap filter; the
    parameter test separates distinct points that happen to share both. Points are visited in
    order of increasing loss and each joins the first earlier unique point it matches (greedy
    clustering against representatives).

    Parameters
    ----------
    loss : (N,) losses of certified critical points.
    eigenvalues : (N, P) ascending Hessian spectra.
    params : stacked parameter pytrees (leading axis N), optional.
    odd_activation : sign flips are symmetries too (tanh).
    loss_rtol, loss_atol, eig_rtol, param_rtol : tolerances above.
    distance : symmetry-aware distance between two parameter pytrees.

    Returns
    -------
    MergedPoints; ``multiplicity.sum() == N``.

    References
    ----------
    Dauphin et al. (2014); Chen, Lu & Hecht-Nielsen (1993).
    """
    loss = np.asarray(loss, dtype=np.float64).ravel()
    eigs = np.asarray(eigenvalues, dtype=np.float64)
    n = loss.size
    if eigs.ndim != 2 or eigs.shape[0] != n:
        raise ValueError(f"eigenvalues must have shape (N, P) with N = {n}, got {eigs.shape}")
    if distance is None:
        distance = functools.partial(mlp_distance, odd_activation=odd_activation)
    eigs = np.sort(eigs, axis=1)
    hnorm = np.max(np.abs(eigs), axis=1) if eigs.shape[1] else np.zeros(n)
    pnorm = None
    if params is not None:
        pnorm = np.linalg.norm(np.asarray(jax.vmap(lambda p: ravel_pytree(p)[0])(params)),
                               axis=1)
    label = np.full(n, -1, dtype=np.int64)
    reps: list[int] = []
    for i in np.argsort(loss, kind="stable"):
        for u, r in enumerate(reps):
            if abs(loss[i] - loss[r]) > loss_rtol * max(abs(loss[i]), abs(loss[r])) + loss_atol:
                continue
            if np.max(np.abs(eigs[i] - eigs[r]), initial=0.0) > eig_rtol * max(hnorm[i],
                                                                              hnorm[r]):
                continue
            if params is not None:
                d = distance(_stack_index(params, r), _stack_index(params, i))
                if d > param_rtol * max(pnorm[i], pnorm[r]):
                    continue
            label[i] = u
            break
        else:
            label[i] = len(reps)
            reps.append(int(i))
    mult = np.bincount(label, minlength=len(reps))
    return MergedPoints(np.asarray(reps, dtype=np.int64), mult, label)


# --------------------------------------------------------------------------- the whole search

def reduced_net_masks(hidden_units: int, num_inits: int) -> np.ndarray:
    """Masks for :func:`mask_hidden_units`: init i keeps its first ``i mod (hidden_units + 1)``
    hidden units (0, 1, ..., all, 0, 1, ...), so the inits train every smaller net in turn.

    Returns
    -------
    (num_inits, hidden_units) float array of 0/1.
    """
    active = np.arange(num_inits) % (hidden_units + 1)
    return (np.arange(hidden_units)[None, :] < active[:, None]).astype(np.float64)


class SearchResult(NamedTuple):
    """Everything :func:`critical_point_search` did: every start and what became of it."""

    starts: StartSet
    points: CriticalPoints      # one row per start (all statuses)
    certified: np.ndarray       # (S,) bool: status == critical
    merged: MergedPoints        # over the certified rows, in their order
    unique: np.ndarray          # (U,) start index of each unique certified point
    unique_id: np.ndarray       # (S,) unique-point number of each start, −1 if not certified


def critical_point_search(loss_fn: Callable[[Params], jax.Array],
                          init_fn: Callable[[jax.Array], Params], *, seed: int, num_inits: int,
                          optimizer, num_steps: int, snapshot_every: int,
                          noise_scales: Sequence[float] = (0.0,),
                          init_transform: Optional[Callable] = None, chunk_size: int = 64,
                          vmap_width: int = DEFAULT_VMAP_WIDTH,
                          progress: Optional[Callable[[int], None]] = None,
                          odd_activation: bool = False, compare_params: bool = True,
                          merge_tolerances: Optional[dict] = None,
                          **refine_kwargs) -> SearchResult:
    """Starts along trajectories (:func:`make_starts`) → Newton + certificate from each
    (:func:`find_critical_points`) → certified points merged (:func:`merge_duplicates`).

    Parameters
    ----------
    loss_fn, init_fn : the problem's full-batch loss and initializer.
    seed, num_inits, optimizer, num_steps, snapshot_every, noise_scales, init_transform :
        of :func:`make_starts`.
    chunk_size, vmap_width, progress : of :func:`find_critical_points` (``vmap_width`` changes
        results in the last bits, ``chunk_size`` never does).
    odd_activation, compare_params, merge_tolerances : of :func:`merge_duplicates`
        (``compare_params=False`` compares loss and spectrum only, for non-MLP models).
    **refine_kwargs : of :func:`refine_and_certify`.

    Returns
    -------
    SearchResult. Nothing is dropped: ``points.status`` holds every start's certificate.
    """
    starts = make_starts(loss_fn, init_fn, seed, num_inits, optimizer, num_steps,
                         snapshot_every, noise_scales, init_transform)
    points = find_critical_points(loss_fn, starts.params, chunk_size, progress,
                                  vmap_width=vmap_width, **refine_kwargs)
    certified = np.asarray(points.status) == STATUSES.index("critical")
    rows = np.flatnonzero(certified)
    unique_id = np.full(certified.shape, -1, dtype=np.int64)
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return SearchResult(starts, points, certified, MergedPoints(empty, empty, empty), empty,
                            unique_id)
    merged = merge_duplicates(
        points.loss[rows], points.eigenvalues[rows],
        jax.tree.map(lambda x: x[rows], points.params) if compare_params else None,
        odd_activation=odd_activation, **(merge_tolerances or {}))
    unique_id[rows] = merged.label
    return SearchResult(starts, points, certified, merged, rows[merged.representative],
                        unique_id)
