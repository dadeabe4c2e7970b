r"""Curvature along the training path: sharpness, negative curvature and the edge of stability.

:func:`track_training` trains one network from one initialization with full-batch gradient
descent, heavy-ball momentum or Adam (optax) and, every ``track_every`` steps, measures the two
ends of the full-data Hessian's spectrum, :math:`\lambda_{\max}(H)` (the *sharpness*) and
:math:`\lambda_{\min}(H)` (negative when the path passes near a saddle), from Hessian-vector
products. It is pure and static-shaped, so :func:`track_sweep` lifts it with ``jax.vmap`` over
learning rates and initializations: a whole sweep is one compiled program. :func:`make_sweep`
runs a sweep either that way or one configuration at a time (one compiled
:func:`track_training` called per configuration), with the same algorithm and output shapes
(the values agree up to rounding, which chaotic training can amplify: see :func:`make_sweep`); on
a CPU the second is the faster (``benchmarks/bench_edge_of_stability.py``).

Tracking both ends with warm-started Lanczos
--------------------------------------------
Between two tracks the Hessian moves little, so its extremal eigenvectors do too. A track runs
Lanczos (full reorthogonalization, :mod:`crit.lanczos`) from

.. math:: v_0 = y_{\max}^{\mathrm{prev}} + y_{\min}^{\mathrm{prev}} + \mu z, \qquad
          z \sim \mathcal N(0, I)/\lVert\cdot\rVert,

the previous top and bottom Ritz vectors plus a small fresh random part (``warm_mix`` =
:math:`\mu`; it keeps every direction in the Krylov space, so an eigenvalue that overtakes the
old top one is still found). The Krylov space of :math:`v_0` then holds both old vectors after
two steps, and both ends converge in a few more. The run is continued ``lanczos_block`` steps at
a time (:func:`crit.lanczos.lanczos_advance`, exact continuation) until the residual estimates
:math:`\rho = |\beta_{k-1} s_{k-1}|` of *both* extremal Ritz pairs are at most
``lanczos_tol`` :math:`\cdot \max|\theta|`, or ``lanczos_steps`` (``cold_lanczos_steps`` for a
cold start) is reached (then the
``converged`` flag is False). An eigenvalue of H lies within :math:`\rho` of each Ritz value, and
within :math:`\rho^2/\delta` if the gap to the next is :math:`\delta`. The HVPs spent are
recorded per track (under ``vmap`` the batch runs until its slowest member converges; the count
is per configuration, what it would cost alone). The first track, and every track with
``warm_start=False``, starts cold from :math:`z`.

Stability thresholds
--------------------
On a quadratic with curvature :math:`\lambda` along an eigenvector, an optimizer with learning
rate :math:`\eta` is stable along it iff :math:`\lambda` is below (:func:`stability_threshold`):

* gradient descent: :math:`2/\eta`;
* heavy-ball momentum :math:`v \leftarrow \beta v + g,\ \theta \leftarrow \theta - \eta v`
  (optax ``sgd(momentum=β)``): :math:`(2 + 2\beta)/\eta`;
* Adam, for the *preconditioned* sharpness :math:`\lambda_{\max}(P_t^{-1} H)` with frozen
  preconditioner (Cohen et al. 2022): :math:`(2 + 2\beta_1)/((1 - \beta_1)\eta)`, i.e.
  :math:`38/\eta` for :math:`\beta_1 = 0.9`.

Cohen et al. (2021) find that full-batch GD on neural networks *progressively sharpens* until
:math:`\lambda_{\max}` reaches :math:`2/\eta` and then hovers at or just above it, while the loss
keeps decreasing non-monotonically (the *edge of stability*); Cohen et al. (2022) find the same
for the preconditioned sharpness of adaptive methods against their threshold.

Preconditioned sharpness (Adam)
-------------------------------
With optax's Adam state after :math:`t` steps (first and second moments :math:`m_t, v_t`), the
next update is :math:`\theta \leftarrow \theta - \eta P_t^{-1} \hat m` with

.. math:: P_t = (1 - \beta_1^{t})\,\mathrm{diag}\big(\sqrt{v_t/(1 - \beta_2^{t})} + \epsilon\big),

the bias corrections folded into :math:`P_t` as in Cohen et al. (2022, eq. 2). Its eigenvalues
are those of the symmetric :math:`D H D` with :math:`D = P_t^{-1/2}`, tracked by the same
warm-started Lanczos (top end only). At step 0 (:math:`v_0 = 0`) it is undefined (NaN).

SLQ index
---------
Every ``slq_every`` tracks (0: never) the fraction of negative eigenvalues is estimated by
stochastic Lanczos quadrature (:func:`crit.slq.slq`, :func:`crit.slq.slq_fractions`) with its
interval, at sign tolerance :math:`\tau = ` ``slq_rel_tol`` :math:`\cdot\max(|\lambda_{\max}|,
|\lambda_{\min}|)`; other tracks hold NaN.

Divergence
----------
A run whose loss is non-finite or exceeds ``divergence_factor`` times its initial loss is
*diverged*: from then on its parameters are frozen, its series hold NaN and its tracks cost no
HVPs (so one diverged learning rate does not keep the whole vmapped batch iterating).

References
----------
- J. Cohen, S. Kaur, Y. Li, J. Z. Kolter, A. Talwalkar (2021). Gradient descent on neural
  networks typically occurs at the edge of stability. ICLR.
- J. Cohen, B. Ghorbani, S. Krishnan, N. Agarwal, S. Medapati, M. Badura, D. Suo, D. Cardoze,
  Z. Nado, G. Dahl, J. Gilmer (2022). Adaptive gradient methods at the edge of stability.
  arXiv:2207.14484.
- B. N. Parlett (1998). The Symmetric Eigenvalue Problem. SIAM (Ritz residual bounds, ch. 11).
"""

from __future__ import annotations

from typing import Callable, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from crit.lanczos import LanczosState, lanczos_advance, lanczos_start, tridiag_eigh
from crit.slq import slq, slq_fractions

Array = jax.Array
TRACKING_OPTIMIZERS = ("gd", "momentum", "adam")
SWEEP_MODES = ("vmap", "loop")


class TrackingConfig(NamedTuple):
    """Static settings of :func:`track_training` (hashable: one compile per config)."""

    optimizer: str = "gd"
    """``gd`` (full-batch gradient descent), ``momentum`` (heavy ball) or ``adam``."""
    num_steps: int = 1000
    track_every: int = 10
    momentum: float = 0.9
    """β of heavy-ball momentum."""
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    lanczos_steps: int = 48
    """Most HVPs of one warm-started track (the Lanczos basis holds this many vectors). Keep
    it at most 64: XLA:CPU's ``eigh`` of the tridiagonal (the convergence checks past 48
    steps) is ~40x slower above 64 (measured 2026-12-02). With 32 about 2% of
    the tracks of the default sweep ended unconverged (the fast first steps); with 48 none."""
    cold_lanczos_steps: int = 64
    """Most HVPs of a cold track (the first one; every one without ``warm_start``; the first
    preconditioned one for Adam, whose runs all use this basis)."""
    lanczos_block: int = 4
    """Steps between convergence checks; both step budgets must be multiples of it."""
    lanczos_tol: float = 1e-8
    """Relative residual at which a Ritz pair counts as converged."""
    warm_start: bool = True
    warm_mix: float = 1e-2
    """Weight μ of the fresh random part of a warm start."""
    slq_every: int = 0
    """SLQ index every this many tracks (0: never)."""
    slq_probes: int = 4
    slq_steps: int = 40
    slq_rel_tol: float = 1e-6
    preconditioned: bool = True
    """Also track λ_max(P⁻¹H) (Adam only)."""
    divergence_factor: float = 1e4
    keep_params: bool = False
    """Also return θ (and Adam's preconditioner) at every track (checks against dense
    Hessians)."""


class ExtremalTrack(NamedTuple):
    """Both ends of a symmetric operator's spectrum from one adaptive Lanczos run."""

    lambda_max: Array
    lambda_min: Array
    residual_max: Array
    """Residual estimate |β s| of the top Ritz pair: an eigenvalue lies within it."""
    residual_min: Array
    converged_max: Array
    converged_min: Array
    vector_max: Array
    vector_min: Array
    hvps: Array
    """Operator applications spent."""


class TrainingTrack(NamedTuple):
    """Per-configuration series of :func:`track_training`; K = num_steps // track_every."""

    loss: Array
    """(num_steps + 1,) Full-data loss at every step (NaN once diverged)."""
    track_loss: Array
    """(K + 1,) The loss at the tracked steps 0, T, ..., K T (see :func:`track_steps`)."""
    grad_norm: Array
    """(K + 1,) ‖∇L‖ at the tracked steps."""
    lambda_max: Array
    lambda_min: Array
    residual_max: Array
    residual_min: Array
    converged_max: Array
    converged_min: Array
    hvps: Array
    """(K + 1,) int, HVPs of the two-ended Lanczos run of each track."""
    precond_lambda_max: Array
    """(K + 1,) λ_max(P⁻¹H) for Adam (NaN otherwise and at step 0)."""
    precond_residual: Array
    precond_converged: Array
    precond_hvps: Array
    slq_index: Array
    """(K + 1,) SLQ fraction of eigenvalues < −τ (NaN on tracks without SLQ)."""
    slq_index_lo: Array
    slq_index_hi: Array
    slq_tol: Array
    diverged_step: Array
    """First step whose loss was non-finite or above divergence_factor · L(θ₀) (−1: never)."""
    final_loss: Array
    final_grad_norm: Array
    final_params: Array
    """(P,) θ after num_steps (frozen where it diverged)."""
    params: Array | None
    """(K + 1, P) θ at the tracked steps if ``keep_params``, else None."""
    preconditioner: Array | None
    """(K + 1, P) Adam's diagonal P_t at the tracked steps if ``keep_params`` (NaN for other
    optimizers and at step 0), else None."""


def stability_threshold(optimizer: str, learning_rate, momentum: float = 0.9,
                        b1: float = 0.9):
    r"""Largest stable curvature of ``optimizer`` at ``learning_rate`` η on a quadratic.

    GD: :math:`2/\eta`. Heavy ball (:math:`v \leftarrow \beta v + g`): :math:`(2+2\beta)/\eta`.
    Adam (for :math:`\lambda_{\max}(P^{-1}H)`, Cohen et al. 2022): :math:`(2+2\beta_1)/
    ((1-\beta_1)\eta)`. Works on floats and arrays.
    """
    if optimizer == "gd":
        return 2.0 / learning_rate
    if optimizer == "momentum":
        return (2.0 + 2.0 * momentum) / learning_rate
    if optimizer == "adam":
        return (2.0 + 2.0 * b1) / ((1.0 - b1) * learning_rate)
    raise ValueError(f"unknown optimizer {optimizer!r}; allowed: {list(TRACKING_OPTIMIZERS)}")


def tracking_optimizer(config: TrackingConfig, learning_rate) -> optax.GradientTransformation:
    """The optax optimizer of ``config`` (``learning_rate`` may be traced, e.g. under vmap)."""
    if config.optimizer == "gd":
        return optax.sgd(learning_rate)
    if config.optimizer == "momentum":
        return optax.sgd(learning_rate, momentum=config.momentum)
    if config.optimizer == "adam":
        return optax.adam(learning_rate, b1=config.b1, b2=config.b2, eps=config.eps)
    raise ValueError(f"unknown optimizer {config.optimizer!r}; "
                     f"allowed: {list(TRACKING_OPTIMIZERS)}")


def track_steps(num_steps: int, track_every: int) -> np.ndarray:
    """The tracked steps 0, T, 2T, ..., ⌊N/T⌋ T."""
    return np.arange(num_steps // track_every + 1) * track_every


def adam_preconditioner(opt_state, b1: float, b2: float, eps: float) -> Array:
    r""":math:`P_t = (1-\beta_1^t)(\sqrt{v_t/(1-\beta_2^t)} + \epsilon)` (diagonal, flat) from
    optax's Adam state after t steps; NaN at t = 0."""
    adam_state = opt_state[0]
    t = adam_state.count.astype(jnp.float64)
    v_hat = adam_state.nu / (1.0 - b2 ** t)
    p = (1.0 - b1 ** t) * (jnp.sqrt(v_hat) + eps)
    return jnp.where(t > 0, p, jnp.nan)


#: Sizes of the leading block of T on which convergence is checked, phase by phase (see
#: :func:`extremal_track`): a check costs one ``eigh`` of that size, not of the whole basis.
CHECK_SIZES = (16, 32, 48, 64)


def check_sizes(max_steps: int, block: int) -> tuple[int, ...]:
    """Phase bounds of :func:`extremal_track`: :data:`CHECK_SIZES` rounded up to multiples of
    ``block``, below ``max_steps``, then ``max_steps`` itself."""
    up = sorted({-(-s // block) * block for s in CHECK_SIZES})
    return tuple(s for s in up if s < max_steps) + (max_steps,)


def resize_state(state: LanczosState, size: int) -> LanczosState:
    """``state`` with room for ``size`` steps (``size`` at least the steps taken): the basis
    and coefficient arrays cut or padded with zeros, which is what their unused rows hold."""
    def fit(a):
        if a.shape[0] >= size:
            return a[:size]
        return jnp.concatenate([a, jnp.zeros((size - a.shape[0],) + a.shape[1:], a.dtype)])

    return state._replace(basis=fit(state.basis), alphas=fit(state.alphas),
                          betas=fit(state.betas), valid=fit(state.valid))


def extremal_track(matvec: Callable[[Array], Array], v0: Array, max_steps: int, block: int,
                   tol: float, *, both_ends: bool = True, skip=False) -> ExtremalTrack:
    r"""Lanczos from ``v0``, ``block`` steps at a time, until the top (and, with
    ``both_ends``, the bottom) Ritz pair has residual estimate :math:`\le` ``tol``
    :math:`\cdot\max|\theta|`, or ``max_steps`` steps. ``skip`` (may be traced) spends nothing
    and returns NaN. Pure; vmappable (the loop runs until every batch member is done).

    The loop runs in phases (:func:`check_sizes`): while at most 16 steps are taken, the check
    diagonalizes the leading 16 × 16 block of the padded tridiagonal (the steps past the
    current one are invalid and masked), then 32, and so on; the Lanczos state (basis and
    coefficients) is enlarged phase by phase too, so reorthogonalization projects on 16 rows,
    then 32, not on ``max_steps``. Under ``vmap`` a batch whose members all converge early
    never pays for a large ``eigh`` or a large basis. The returned pairs are those of the last
    check (each member's own, frozen when it stopped); only the two Ritz vectors
    :math:`y = Q s` touch the basis. Every member takes the same steps and checks as it would
    alone, so the results under ``vmap`` equal those of one configuration at a time, up to the
    rounding of batched against unbatched kernels (:func:`make_sweep`).
    """
    if max_steps % block:
        raise ValueError(f"max_steps={max_steps} must be a multiple of block={block}")

    def ritz(state, size):
        """The extremal Ritz pairs of the leading ``size`` block (steps past the current one
        masked), padded to ``max_steps``: (θ_top, θ_bottom, ρ_top, ρ_bottom, converged top,
        converged bottom, s_top, s_bottom)."""
        values, vectors = tridiag_eigh(state.alphas[:size], state.betas[:size],
                                       state.valid[:size])
        k = jnp.sum(state.valid[:size])
        top, bottom = jnp.maximum(k - 1, 0), 0
        estimates = jnp.abs(state.betas[top] * vectors[top])
        scale = jnp.maximum(jnp.abs(values[top]), jnp.abs(values[bottom]))
        ok = (k > 0) & jnp.isfinite(scale)
        pad = lambda s: jnp.zeros(max_steps, s.dtype).at[:size].set(s)  # noqa: E731
        return (values[top], values[bottom], estimates[top], estimates[bottom],
                ok & (estimates[top] <= tol * scale), ok & (estimates[bottom] <= tol * scale),
                pad(vectors[:, top]), pad(vectors[:, bottom]))

    def phase(carry, size):
        def cond(carry):
            state, finished, _ = carry
            return (state.steps < size) & ~finished

        def body(carry):
            state = lanczos_advance(matvec, carry[0], block)
            pairs = ritz(state, size)
            return state, pairs[4] & (pairs[5] if both_ends else True), pairs

        # the state holds room for this phase's steps only: reorthogonalization then works on
        # `size` rows, not max_steps (the rows past the current step are zero either way)
        state, finished, pairs = carry
        return jax.lax.while_loop(cond, body, (resize_state(state, size), finished, pairs))

    # The Ritz pairs of the last check are the result: no final eigh of the whole basis (under
    # vmap that one would cost a max_steps-sized eigh per member on every track).
    nan, zero = jnp.asarray(jnp.nan), jnp.zeros(max_steps)
    no_pairs = (nan, nan, nan, nan, jnp.asarray(False), jnp.asarray(False), zero, zero)
    sizes = check_sizes(max_steps, block)
    carry = (lanczos_start(v0, sizes[0]), jnp.asarray(skip), no_pairs)
    for size in sizes:
        carry = phase(carry, size)
    state, _, (top, bottom, rho_top, rho_bottom, conv_top, conv_bottom, s_top, s_bottom) = carry

    def ritz_vector(s):
        y = state.basis.T @ s
        return y / jnp.linalg.norm(y)

    pick = lambda x: jnp.where(skip, nan, x)  # noqa: E731
    return ExtremalTrack(pick(top), pick(bottom), pick(rho_top), pick(rho_bottom),
                         conv_top & ~skip, conv_bottom & ~skip, ritz_vector(s_top),
                         ritz_vector(s_bottom), state.steps)


def warm_start_vector(previous: tuple[Array, ...], key: Array, mix: float, cold) -> Array:
    r""":math:`\sum_i y_i/\lVert y_i\rVert + \mu z` (module docstring), or :math:`z` when
    ``cold``; z is a unit Gaussian vector from ``key``."""
    z = jax.random.normal(key, previous[0].shape, jnp.float64)
    z = z / jnp.linalg.norm(z)
    warm = sum(y / jnp.linalg.norm(y) for y in previous) + mix * z
    ok = jnp.all(jnp.isfinite(warm)) & (jnp.linalg.norm(warm) > 0)
    return jnp.where(cold | ~ok, z, warm)


def track_training(loss_fn: Callable[[Array], Array], theta0: Array, learning_rate,
                   key: Array, config: TrackingConfig) -> TrainingTrack:
    """Train from flat ``theta0`` with ``config.optimizer`` at ``learning_rate`` and track the
    curvature every ``config.track_every`` steps (module docstring). One configuration; lift
    with ``vmap`` (or use :func:`track_sweep`). ``loss_fn`` maps a flat float64 vector to the
    full-data loss; ``key`` draws the Lanczos and SLQ starts."""
    c = config
    if c.num_steps < c.track_every or c.track_every < 1:
        raise ValueError(f"need 1 <= track_every <= num_steps, got track_every={c.track_every}, "
                         f"num_steps={c.num_steps}")
    theta0 = jnp.asarray(theta0, jnp.float64)
    optimizer = tracking_optimizer(c, learning_rate)
    value_and_grad = jax.value_and_grad(loss_fn)
    grad_fn = jax.grad(loss_fn)
    n_tracks = c.num_steps // c.track_every + 1
    track_precond = c.preconditioned and c.optimizer == "adam"
    limit = c.divergence_factor * loss_fn(theta0)

    def step(carry, step_index):
        theta, opt_state, diverged, diverged_step = carry
        loss, g = value_and_grad(theta)
        bad = ~jnp.isfinite(loss) | (loss > limit)
        newly = bad & ~diverged
        diverged = diverged | bad
        diverged_step = jnp.where(newly, step_index, diverged_step)
        updates, new_state = optimizer.update(g, opt_state, theta)
        theta = jnp.where(diverged, theta, optax.apply_updates(theta, updates))
        opt_state = jax.tree.map(lambda a, b: jnp.where(diverged, b, a), new_state, opt_state)
        return (theta, opt_state, diverged, diverged_step), jnp.where(diverged, jnp.nan, loss)

    def measure(theta, opt_state, vectors, k, diverged, max_steps):
        grad, hvp = jax.linearize(grad_fn, theta)
        track_key = jax.random.fold_in(key, k)
        cold = (k == 0) | (not c.warm_start)
        v0 = warm_start_vector(vectors[:2], jax.random.fold_in(track_key, 0), c.warm_mix, cold)
        ends = extremal_track(hvp, v0, max_steps, c.lanczos_block, c.lanczos_tol,
                              skip=diverged)
        nan = jnp.asarray(jnp.nan)
        if track_precond:
            d = 1.0 / jnp.sqrt(adam_preconditioner(opt_state, c.b1, c.b2, c.eps))
            v0p = warm_start_vector(vectors[2:], jax.random.fold_in(track_key, 1), c.warm_mix,
                                    cold | (k == 1))
            # its first run (k = 1) is cold: the larger basis every time
            pre = extremal_track(lambda v: d * hvp(d * v), v0p, c.cold_lanczos_steps,
                                 c.lanczos_block, c.lanczos_tol, both_ends=False,
                                 skip=diverged | (k == 0))
            precond = (pre.lambda_max, pre.residual_max, pre.converged_max, pre.hvps)
            new_vectors = (ends.vector_max, ends.vector_min,
                           jnp.where(diverged | (k == 0), vectors[2], pre.vector_max))
        else:
            precond = (nan, nan, jnp.asarray(False), jnp.zeros((), jnp.int32))
            new_vectors = (ends.vector_max, ends.vector_min, vectors[2])
        new_vectors = tuple(jnp.where(diverged, old, new) for old, new in zip(vectors,
                                                                               new_vectors))
        if c.slq_every:
            def run_slq(_):
                result = slq(hvp, jax.random.fold_in(track_key, 2), theta.shape[0],
                             c.slq_probes, c.slq_steps)
                tol = c.slq_rel_tol * jnp.maximum(jnp.abs(ends.lambda_max),
                                                  jnp.abs(ends.lambda_min))
                neg = slq_fractions(result, tol).negative
                return neg.mean, neg.lo, neg.hi, tol

            # the predicate is the unbatched track counter: a real branch even under vmap
            index = jax.lax.cond(k % c.slq_every == 0, run_slq, lambda _: (nan,) * 4, None)
            index = tuple(jnp.where(diverged, nan, x) for x in index)
        else:
            index = (nan,) * 4
        loss = jnp.where(diverged, nan, loss_fn(theta))
        gnorm = jnp.where(diverged, nan, jnp.linalg.norm(grad))
        record = (loss, gnorm, ends.lambda_max, ends.lambda_min, ends.residual_max,
                  ends.residual_min, ends.converged_max, ends.converged_min, ends.hvps,
                  *precond, *index)
        return new_vectors, record

    def measure_and_keep(theta, opt_state, vectors, k, diverged, max_steps):
        vectors, record = measure(theta, opt_state, vectors, k, diverged, max_steps)
        if c.keep_params:
            precond_diag = (adam_preconditioner(opt_state, c.b1, c.b2, c.eps)
                            if c.optimizer == "adam" else jnp.full_like(theta, jnp.nan))
            record = record + (theta, precond_diag)
        return vectors, record

    def block(carry, k):
        """``track_every`` steps, then track k (k = 1..K)."""
        theta, opt_state, diverged, diverged_step, vectors = carry
        steps = (k - 1) * c.track_every + jnp.arange(c.track_every)
        (theta, opt_state, diverged, diverged_step), losses = jax.lax.scan(
            step, (theta, opt_state, diverged, diverged_step), steps)
        vectors, record = measure_and_keep(
            theta, opt_state, vectors, k, diverged,
            c.lanczos_steps if c.warm_start else c.cold_lanczos_steps)
        return (theta, opt_state, diverged, diverged_step, vectors), (record, losses)

    # the first track starts cold: its own, larger Lanczos basis (a static shape)
    zeros = jnp.zeros_like(theta0)
    opt_state0 = optimizer.init(theta0)
    vectors, first = measure_and_keep(theta0, opt_state0, (zeros, zeros, zeros),
                                      jnp.asarray(0), jnp.asarray(False), c.cold_lanczos_steps)
    carry = (theta0, opt_state0, jnp.asarray(False), jnp.asarray(-1), vectors)
    carry, (records, losses) = jax.lax.scan(block, carry, jnp.arange(1, n_tracks))
    records = jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, records)
    theta, opt_state, diverged, diverged_step, _ = carry
    losses = losses.reshape(-1)
    tail = c.num_steps - (n_tracks - 1) * c.track_every
    if tail:
        steps = (n_tracks - 1) * c.track_every + jnp.arange(tail)
        (theta, opt_state, diverged, diverged_step), tail_losses = jax.lax.scan(
            step, (theta, opt_state, diverged, diverged_step), steps)
        losses = jnp.concatenate([losses, tail_losses])
    final_loss, final_grad = value_and_grad(theta)
    final_bad = ~jnp.isfinite(final_loss) | (final_loss > limit)
    diverged_step = jnp.where(final_bad & ~diverged, c.num_steps, diverged_step)
    diverged = diverged | final_bad
    final_loss = jnp.where(diverged, jnp.nan, final_loss)
    final_gnorm = jnp.where(diverged, jnp.nan, jnp.linalg.norm(final_grad))
    losses = jnp.concatenate([losses, final_loss[None]])
    kept = records[-2:] if c.keep_params else (None, None)
    records = records[:-2] if c.keep_params else records
    return TrainingTrack(losses, *records, diverged_step, final_loss, final_gnorm, theta, *kept)


def track_sweep(loss_fn: Callable[[Array], Array], thetas0: Array, learning_rates: Array,
                keys: Array, config: TrackingConfig) -> TrainingTrack:
    """:func:`track_training` for every learning rate × initialization, vmapped (jit it).

    ``thetas0`` (I, P) flat initial parameters, ``learning_rates`` (L,), ``keys`` (I,) one key
    per initialization (the same for every learning rate). Every output gets leading axes
    (L, I).
    """
    one = lambda theta, lr, key: track_training(loss_fn, theta, lr, key, config)  # noqa: E731
    over_inits = jax.vmap(one, in_axes=(0, None, 0))
    return jax.vmap(over_inits, in_axes=(None, 0, None))(thetas0, learning_rates, keys)


def make_sweep(loss_fn: Callable[[Array], Array], config: TrackingConfig,
               mode: Literal["vmap", "loop"] = "vmap", jit: Callable | None = None
               ) -> Callable[[Array, Array, Array], TrainingTrack]:
    """A function ``(thetas0, learning_rates, keys) -> TrainingTrack`` that runs
    :func:`track_training` for every learning rate × initialization, compiled once.

    Arguments and outputs are those of :func:`track_sweep`: ``thetas0`` (I, P), ``learning_rates``
    (L,), ``keys`` (I,); every output has leading axes (L, I).

    ``mode="vmap"``: ``jit(track_sweep)``, one program for the whole sweep. ``mode="loop"``:
    ``jit(track_training)``, compiled for the first configuration and called once per (learning
    rate, init), each call waited for, the results stacked.

    ``jit`` (optional) compiles the program: it is called with ``build``, a function from a loss
    (flat θ -> full-data loss) to the function to compile, and returns the compiled function.
    Default: ``jax.jit(build(loss_fn))``. A caller whose loss reads data sharded over devices
    passes the data as arguments of the program this way, e.g. ``lambda build:
    crit.data_parallel.jit_with_data(lambda pr: build(flat_loss(pr)), problem)``, instead of
    having them compiled in as constants.

    Both run the same algorithm, but the batched and unbatched XLA programs may round
    differently in the last bits, from the loss and gradient of the first step on; training
    at the edge of stability (sharpness at 2/η) is chaotic and amplifies that. Measured on CPU
    (XLA optimizations on; 2026-12-03): a 4-configuration P = 13 MLP, 30 steps: losses, HVP
    counts and final parameters identical, λ_max within 4e-16 and λ_min within 2e-14
    relative; the P = 321 MLP of the benchmark, 500 GD steps: losses within 9e-16 relative
    and identical HVP counts at η ≤ 0.1, but at η ≥ 0.14 (the edge of stability) the
    trajectories part (loss up to 27× apart at a step, different HVP counts). With most XLA
    optimizations off (the tests) the small case is identical bit for bit. Do not mix the two
    modes' results in one comparison that needs bit-for-bit trajectories.

    Notes
    -----
    Use ``loop`` on a CPU: one configuration of a small network already keeps XLA:CPU busy, and
    under ``vmap`` every Lanczos loop runs until the batch's slowest member has converged
    (measured 2026-12-03, 32 configurations of a P = 321 MLP on 2 cores: 2.68 s one at a time,
    4.70 s vmapped). ``vmap`` is for an accelerator, which one small configuration cannot fill.
    """
    compile_ = jit if jit is not None else (lambda build: jax.jit(build(loss_fn)))
    if mode == "vmap":
        sweep = compile_(lambda loss: lambda th, lr, ks: track_sweep(loss, th, lr, ks, config))
        return lambda thetas0, learning_rates, keys: sweep(  # noqa: E731
            thetas0, jnp.asarray(learning_rates, jnp.float64), keys)
    if mode != "loop":
        raise ValueError(f"unknown sweep mode {mode!r}; allowed: {list(SWEEP_MODES)}")
    one = compile_(lambda loss: lambda theta, lr, key: track_training(loss, theta, lr, key,
                                                                       config))

    def loop(thetas0, learning_rates, keys):
        # the same argument types at every call: one compile
        rates = jnp.asarray(learning_rates, jnp.float64)
        thetas0 = jnp.asarray(thetas0)
        runs = [[jax.block_until_ready(one(thetas0[j], rates[i], keys[j]))
                 for j in range(thetas0.shape[0])] for i in range(rates.shape[0])]
        stack = lambda *xs: jnp.stack(xs)  # noqa: E731
        return jax.tree.map(stack, *[jax.tree.map(stack, *row) for row in runs])

    return loop
