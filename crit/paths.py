r"""Minimum energy paths between two minima: the nudged elastic band with a climbing image.

A straight line between two minima θ_a, θ_b (Goodfellow et al. 2015) only bounds the barrier
from above: the line can climb a wall that a bent path walks around. The *minimum energy path*
(MEP) is a curve from θ_a to θ_b along which the force is parallel to the path,

.. math:: \nabla L(\theta)^{\perp} = \nabla L - (\nabla L\cdot\hat\tau)\hat\tau = 0,

and its highest point is a critical point of index one when it is non-degenerate (the
mountain-pass theorem). Its height above the higher end is the barrier,

.. math:: \Delta L = \max_{s} L(\theta(s)) - \max(L(\theta_a), L(\theta_b)).

**The band** (Henkelman, Uberuaga & Jónsson 2000; tangent of Henkelman & Jónsson 2000). The
path is a chain of N images :math:`R_0 = \theta_a, R_1, \dots, R_{N-1} = \theta_b` (ends
fixed). At interior image i with energy :math:`V_i` the *improved tangent* is

.. math:: \tau_i = \begin{cases} R_{i+1} - R_i & V_{i+1} > V_i > V_{i-1} \\
                                 R_i - R_{i-1} & V_{i+1} < V_i < V_{i-1} \\
          (R_{i+1}-R_i)\,\Delta V^{\max} + (R_i-R_{i-1})\,\Delta V^{\min} & \text{else, } V_{i+1} > V_{i-1} \\
          (R_{i+1}-R_i)\,\Delta V^{\min} + (R_i-R_{i-1})\,\Delta V^{\max} & \text{else}
          \end{cases}

with :math:`\Delta V^{\max/\min} = \max/\min(|V_{i+1}-V_i|, |V_{i-1}-V_i|)`, normalized to
:math:`\hat\tau_i`. The force on image i is the perpendicular true force plus a parallel spring,

.. math:: F_i = -\nabla V(R_i)^{\perp} + k\,(\lVert R_{i+1}-R_i\rVert - \lVert R_i-R_{i-1}\rVert)\,\hat\tau_i,

and the *climbing image* (the highest interior image, once ``climb_after`` steps have run)
feels no spring and the true force with its parallel component inverted,
:math:`F_{\max} = -\nabla V + 2(\nabla V\cdot\hat\tau)\hat\tau`: it walks uphill along the path
and downhill across it, to the saddle. The images move along F with an ``optax`` optimizer
(Adam with a cosine-decayed step by default: scale-free, so the same defaults serve the
Müller-Brown surface, whose gradients reach 10³, and a network's loss, whose gradients are
10⁻³). The band is converged when the largest perpendicular force of the ordinary images and
the full force of the climbing image are at most a tolerance: by default ``rel_force_tol`` =
10⁻³ times the largest gradient norm of the starting chain's interior images (a relative
residual, scale-free like the optimizer), or an absolute ``force_tol`` when one is given.
Adam with a decaying step does not reach an absolute 10⁻⁴ on Müller-Brown (gradients 10²-10³)
in any step budget tried (5000 steps: 4e-4 to 5e-3), although its climbing image reaches the
saddle to 10⁻⁷ within 500 steps; see :func:`relax_band`.

**Parameters are pytrees.** Every function that takes a loss takes ``loss_fn(params)`` of one
parameter pytree (a flat vector is the pytree of one leaf), and a chain of images is a
*stacked* pytree: the pytree of one image with a leading axis of length N on every leaf
(``jax.tree.map(lambda x: x[i], images)`` is image i). Inside, images are flattened with
``ravel_pytree``; the geometry (tangents, forces, arc length) is that of the flat vectors.

**Poorly resolved paths** (the AutoNEB idea of Kolsbjerg, Groves & Hammer 2016, used on
networks by Draxler et al. 2018): :func:`insert_images` puts new images at the midpoints of the
segments with the largest energy jumps, and :func:`autoneb` alternates band relaxation with
insertion.

Everything is a pure function with static sizes (``lax.while_loop`` with a step bound), so one
band, the images of a band and many bands compose with ``jit`` and ``vmap``
(:func:`many_bands`). Certification of the top of a band is in
:mod:`crit.mountain_pass`.

References
----------
- G. Henkelman, B. P. Uberuaga, H. Jónsson (2000). A climbing image nudged elastic band method
  for finding saddle points and minimum energy paths. J. Chem. Phys. 113, 9901.
- G. Henkelman, H. Jónsson (2000). Improved tangent estimate in the nudged elastic band method
  for finding minimum energy paths and saddle points. J. Chem. Phys. 113, 9978.
- E. L. Kolsbjerg, M. N. Groves, B. Hammer (2016). An automated nudged elastic band method.
  J. Chem. Phys. 145, 094107.
- F. Draxler, K. Veschgini, M. Salmhofer, F. A. Hamprecht (2018). Essentially no barriers in
  neural network energy landscape. ICML.
- K. Müller, L. D. Brown (1979). Location of saddle points and minimum energy paths by a
  constrained simplex optimization procedure. Theor. Chim. Acta 53, 75-93.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import optax
from jax.flatten_util import ravel_pytree

from crit.landscape import chunked_vmap

Array = jax.Array
Params = Any


class Band(NamedTuple):
    """A relaxed elastic band: the path, its energies and whether it converged.

    ``images`` the chain as a stacked pytree (module docstring; (N, P) for flat parameters)
    with the fixed ends first and last; ``energies`` (N,) the loss at each image; ``climbing``
    the index of the highest interior image (the climbing image once climbing is on);
    ``perp_force`` max_i ‖∇V(R_i)^⊥‖ over the other interior images; ``climb_force`` ‖∇V‖ at
    the climbing image; ``converged`` both ≤ ``force_tol`` with climbing on; ``steps``
    optimizer steps taken; ``num_images`` N; ``force_tol`` the absolute force threshold that
    ``converged`` was tested against (``rel_force_tol`` times the starting forces unless an
    absolute one was given, :func:`relax_band`).
    """

    images: Any
    energies: Array
    climbing: Array
    perp_force: Array
    climb_force: Array
    converged: Array
    steps: Array
    num_images: Array
    force_tol: Array = float("nan")


def image(images: Any, i) -> Any:
    """Image ``i`` (a parameter pytree) of a chain stored as a stacked pytree."""
    return jax.tree.map(lambda x: x[i], images)


def flatten_chain(images: Any) -> tuple[Array, Callable[[Array], Any]]:
    """((N, P) flat images, unravel of one flat image) of a chain stored as a stacked pytree."""
    _, unravel = ravel_pytree(image(images, 0))
    return jax.vmap(lambda one: ravel_pytree(one)[0])(images), unravel


def unflatten_chain(flat: Array, unravel: Callable[[Array], Any]) -> Any:
    """The stacked pytree of (N, P) flat images (inverse of :func:`flatten_chain`)."""
    return jax.vmap(unravel)(flat)


# ----------------------------------------------------------------------------- geometry


def linear_path(start: Params, end: Params, num_images: int) -> Any:
    """Images R_i = (1 − i/(N−1)) θ_a + i/(N−1) θ_b, ends included, as a stacked pytree
    ((num_images, P) for flat vectors)."""
    if num_images < 3:
        raise ValueError(f"a band needs at least 3 images (2 ends + 1), got {num_images}")

    def leaf(a, b):
        a, b = jnp.asarray(a), jnp.asarray(b)
        t = jnp.linspace(0.0, 1.0, num_images, dtype=jnp.result_type(a, float))
        t = t.reshape((num_images,) + (1,) * a.ndim)
        return (1.0 - t) * a[None] + t * b[None]

    return jax.tree.map(leaf, start, end)


def arc_length(images: Any) -> Array:
    """(N,) cumulative arc length s_i = Σ_{j<i} ‖R_{j+1} − R_j‖ along a chain of images."""
    seg = jnp.linalg.norm(jnp.diff(flatten_chain(images)[0], axis=0), axis=1)
    return jnp.concatenate([jnp.zeros((1,), seg.dtype), jnp.cumsum(seg)])


def barrier_height(energies: Array) -> Array:
    """ΔL = max_i L_i − max(L_0, L_{N−1}): the climb from the higher end (≥ 0 by definition)."""
    return jnp.max(energies) - jnp.maximum(energies[0], energies[-1])


def improved_tangents(images: Array, energies: Array) -> Array:
    """(N−2, P) unit tangents τ̂_i at the interior images (Henkelman & Jónsson 2000, eqs. 8-11).

    Uphill neighbour's segment on a monotone stretch; at an extremum of V a mix of both
    segments weighted by the energy differences, which removes the kinks of the bisector
    tangent where the energy changes fast along the path.
    """
    plus = images[2:] - images[1:-1]
    minus = images[1:-1] - images[:-2]
    v_prev, v, v_next = energies[:-2], energies[1:-1], energies[2:]
    up = (v_next > v) & (v > v_prev)
    down = (v_next < v) & (v < v_prev)
    d_next, d_prev = jnp.abs(v_next - v), jnp.abs(v_prev - v)
    d_max, d_min = jnp.maximum(d_next, d_prev), jnp.minimum(d_next, d_prev)
    towards_next = (v_next > v_prev)[:, None]
    mixed = jnp.where(towards_next, plus * d_max[:, None] + minus * d_min[:, None],
                      plus * d_min[:, None] + minus * d_max[:, None])
    # equal energies on both sides (a flat stretch): the bisector of the two segments
    flat = (d_max == 0)[:, None]
    mixed = jnp.where(flat, plus + minus, mixed)
    tau = jnp.where(up[:, None], plus, jnp.where(down[:, None], minus, mixed))
    norm = jnp.linalg.norm(tau, axis=1, keepdims=True)
    return tau / jnp.where(norm > 0, norm, 1.0)


def neb_forces(images: Array, energies: Array, grads: Array, spring: float,
               climbing: Array, climb: Array) -> tuple[Array, Array, Array]:
    """NEB forces on the interior images, and the two convergence measures.

    Returns ``(forces, perp_force, climb_force)``: forces (N−2, P) as in the module docstring
    (the image with interior index ``climbing`` gets the climbing force when ``climb``);
    ``perp_force`` max ‖∇V^⊥‖ over the other interior images; ``climb_force`` ‖∇V‖ at the
    climbing image when ``climb`` (else its ‖∇V^⊥‖).
    """
    tau = improved_tangents(images, energies)
    g = grads[1:-1]
    g_par = jnp.sum(g * tau, axis=1, keepdims=True)
    g_perp = g - g_par * tau
    seg = jnp.linalg.norm(jnp.diff(images, axis=0), axis=1)
    f_spring = spring * (seg[1:] - seg[:-1])[:, None] * tau
    f_neb = -g_perp + f_spring
    f_climb = -g + 2.0 * g_par * tau
    is_climber = (jnp.arange(tau.shape[0]) == climbing)[:, None] & climb
    forces = jnp.where(is_climber, f_climb, f_neb)
    perp = jnp.linalg.norm(g_perp, axis=1)
    perp_force = jnp.max(jnp.where(is_climber[:, 0], 0.0, perp))
    climb_force = jnp.where(climb, jnp.linalg.norm(g[climbing]), perp[climbing])
    return forces, perp_force, climb_force


# ----------------------------------------------------------------------------- the band


class FireState(NamedTuple):
    """State of :func:`fire`: velocity, time step, mixing α and steps since the last restart."""

    velocity: Any
    dt: Array
    alpha: Array
    n_positive: Array


def fire(dt_max: float = 0.1, dt_start: Optional[float] = None, max_step: Optional[float] = None,
         n_min: int = 5, f_inc: float = 1.1, f_dec: float = 0.5, alpha_start: float = 0.1,
         f_alpha: float = 0.99) -> optax.GradientTransformation:
    r"""FIRE, the fast inertial relaxation engine (Bitzek et al. 2006), as an ``optax`` transform.

    It receives the negative force −F (like a gradient) and, with unit mass, does

    .. math:: v \leftarrow (1-\alpha) v + \alpha \lVert v\rVert \hat F, \qquad
              v \leftarrow v + \Delta t\, F, \qquad \Delta\theta = \Delta t\, v,

    growing Δt by ``f_inc`` (up to ``dt_max``) and shrinking α by ``f_alpha`` after ``n_min``
    steps with power P = F·v > 0; when P ≤ 0 it stops (v = 0), halves Δt and resets α. The
    restarts make it robust to a Δt that is too large for the stiffest direction, and the
    inertia crosses flat stretches quickly: Sheppard, Terrell & Henkelman (2008) found it among
    the best optimizers for elastic bands. ``max_step`` caps the displacement of each row
    (image) per step. All quantities are global over the band (one system).

    Measured here: on Müller-Brown (A→C, C→B, 11 images) ``fire(0.01)`` converged the bands to
    force 1e-3 in 280-640 steps, where the default Adam had not after 2000; on the tanh networks
    of experiments.minimum_paths (P = 17, 33) it diverged (energies beyond 1e10) for every
    ``dt_max`` in {0.02, 0.05, 0.1}, with or without ``max_step = 0.1``, so it is not the default.

    References: E. Bitzek, P. Koskinen, F. Gähler, M. Moseler, P. Gumbsch (2006). Structural
    relaxation made simple. Phys. Rev. Lett. 97, 170201. D. Sheppard, R. Terrell, G. Henkelman
    (2008). Optimization methods for finding minimum energy paths. J. Chem. Phys. 128, 134106.
    """
    dt0 = dt_max / 10.0 if dt_start is None else dt_start

    def init(params):
        return FireState(jnp.zeros_like(params), jnp.asarray(dt0, params.dtype),
                         jnp.asarray(alpha_start, params.dtype), jnp.asarray(0))

    def update(neg_force, state, params=None):
        del params
        f = -neg_force
        v, dt, alpha, n_pos = state
        power = jnp.sum(f * v)
        f_norm = jnp.linalg.norm(f)
        v_mixed = (1 - alpha) * v + alpha * jnp.linalg.norm(v) * f / jnp.where(f_norm > 0,
                                                                             f_norm, 1.0)
        positive = power > 0
        n_pos = jnp.where(positive, n_pos + 1, 0)
        grow = positive & (n_pos > n_min)
        dt = jnp.where(positive, jnp.where(grow, jnp.minimum(dt * f_inc, dt_max), dt),
                       dt * f_dec)
        alpha = jnp.where(positive, jnp.where(grow, alpha * f_alpha, alpha), alpha_start)
        v = jnp.where(positive, v_mixed, 0.0) + dt * f
        step = dt * v
        if max_step is not None:
            norms = jnp.linalg.norm(step.reshape(step.shape[0], -1), axis=1)
            scale = jnp.minimum(1.0, max_step / jnp.where(norms > 0, norms, 1.0))
            step = step * scale.reshape((-1,) + (1,) * (step.ndim - 1))
        return step, FireState(v, dt, alpha, n_pos)

    return optax.GradientTransformation(init, update)


def default_band_optimizer(learning_rate: float, num_steps: int) -> optax.GradientTransformation:
    """Adam with the step decayed from ``learning_rate`` to 10⁻³ of it (cosine) over the run."""
    return optax.adam(optax.cosine_decay_schedule(learning_rate, max(num_steps, 1), alpha=1e-3))


def relax_band(loss_fn: Callable[[Params], Array], images: Any, *, num_steps: int = 500,
               spring: float = 1.0, learning_rate: float = 1e-2, climb_after: int = 100,
               force_tol: Optional[float] = None, rel_force_tol: float = 1e-3,
               optimizer: Optional[optax.GradientTransformation] = None) -> Band:
    r"""Relax a chain of images (ends fixed) to the minimum energy path, climbing image on top.

    Parameters
    ----------
    loss_fn
        Scalar energy (loss) of one parameter pytree θ (a flat vector θ ∈ R^P is one too).
        Images are evaluated under ``vmap``.
    images
        Starting chain, ends included, as a stacked pytree (e.g. :func:`linear_path`).
    num_steps
        Step bound; the loop stops early once converged (:class:`Band`).
    spring
        Spring constant k. Only spacing depends on it (the MEP does not): larger k keeps the
        images evenly spread, at the price of stiffer dynamics.
    learning_rate, optimizer
        The images move along F with ``optimizer`` (default :func:`default_band_optimizer`).
    climb_after
        Steps before the highest image starts to climb (Henkelman et al. 2000 let the band
        settle first so the climber is the right one); 0 climbs from the start.
    force_tol, rel_force_tol
        Convergence threshold on the perpendicular forces and on the climber's full force:
        ``force_tol`` when given (absolute), else ``rel_force_tol`` · F₀ with F₀ the largest
        ‖∇V‖ over the interior images of the starting chain (a relative residual).

    Returns
    -------
    Band
        Images as a stacked pytree shaped like ``images``.

    Notes
    -----
    Why relative by default: with the default Adam (its step does not shrink with the force)
    the climbing image converges fast, to ‖∇V‖ ≈ 1e-7 on Müller-Brown within the default 500
    steps and to 1e-14 by 1500, but the perpendicular forces of the other images stall at a
    few ten-thousandths to thousandths of F₀ (A→C, F₀ = 494: 0.31 after the default 500
    steps, 0.07 after 1500, 5e-3 after 5000; with a constant step instead the C→B band blew
    up within 4000 steps), so the
    earlier absolute default 1e-4 was met on none of the Müller-Brown bands, whose tops
    certify as the published saddles. 10⁻³ · F₀ is met there within 500 steps, and
    ``converged`` then says what a caller filtering on it needs: the band lies on the path
    to a thousandth of its starting forces and the climbing image is within Newton's reach
    of the saddle. It is no certificate: :func:`crit.mountain_pass.certify_band_top` gives
    that.
    """
    flat, unravel = flatten_chain(images)
    energy_fn = lambda theta: loss_fn(unravel(theta))  # noqa: E731
    n = flat.shape[0]
    if n < 3:
        raise ValueError(f"a band needs at least 3 images (2 ends + 1), got {n}")
    opt = optimizer or default_band_optimizer(learning_rate, num_steps)
    value_and_grad = jax.vmap(jax.value_and_grad(energy_fn))
    ends = jnp.stack([energy_fn(flat[0]), energy_fn(flat[-1])])

    def measure(inner, step, tol):
        full = jnp.concatenate([flat[:1], inner, flat[-1:]])
        e, g = value_and_grad(inner)
        energies = jnp.concatenate([ends[:1], e, ends[1:]])
        grads = jnp.concatenate([jnp.zeros_like(flat[:1]), g, jnp.zeros_like(flat[:1])])
        climbing = jnp.argmax(e)
        climb = step >= climb_after
        forces, perp, cf = neb_forces(full, energies, grads, spring, climbing, climb)
        done = climb & (perp <= tol) & (cf <= tol)
        return forces, energies, climbing, perp, cf, done, jnp.max(jnp.linalg.norm(g, axis=1))

    def cond(state):
        step, _, _, _, done = state
        return (step < num_steps) & ~done

    inner0 = flat[1:-1]
    forces0, _, _, perp0, cf0, _, f0 = measure(inner0, jnp.asarray(0), 0.0)
    # F₀ = the largest ‖∇V‖ of the starting chain's interior images, before any step
    tol = rel_force_tol * f0 if force_tol is None else jnp.asarray(force_tol, flat.dtype)
    done0 = (climb_after <= 0) & (perp0 <= tol) & (cf0 <= tol)

    def body(state):
        step, inner, opt_state, forces, _ = state
        updates, opt_state = opt.update(-forces, opt_state, inner)
        inner = optax.apply_updates(inner, updates)
        forces, *_, done, _ = measure(inner, step + 1, tol)
        return step + 1, inner, opt_state, forces, done

    state = (jnp.asarray(0), inner0, opt.init(inner0), forces0, done0)
    step, inner, _, _, _ = jax.lax.while_loop(cond, body, state)
    _, energies, climbing, perp, cf, done, _ = measure(inner, step, tol)
    full = jnp.concatenate([flat[:1], inner, flat[-1:]])
    return Band(unflatten_chain(full, unravel), energies, climbing + 1, perp, cf, done, step,
                jnp.asarray(n), tol)


def nudged_elastic_band(loss_fn: Callable[[Params], Array], start: Params, end: Params,
                        num_images: int = 11, **kwargs) -> Band:
    """Climbing-image NEB between two parameter pytrees, from the straight line.

    ``loss_fn`` takes a pytree shaped like ``start``; the band's images are a stacked pytree of
    that shape (module docstring). ``num_images`` counts the two ends. Other keywords go to
    :func:`relax_band` (whose defaults converge on the surfaces of tests/test_paths.py).
    """
    return relax_band(loss_fn, linear_path(start, end, num_images), **kwargs)


def many_bands(loss_fn: Callable[[Params], Array], starts: Any, ends: Any,
               num_images: int = 11, chunk_size: Optional[int] = None, **kwargs) -> Band:
    """Bands between ``starts[j]`` and ``ends[j]`` (stacked pytrees of M points), all relaxed
    under ``vmap``.

    ``chunk_size`` bounds how many bands run at once (:func:`crit.landscape.chunked_vmap`);
    each band's loop stops with its own convergence test, so a band's result does not depend on
    the others. Returns a :class:`Band` with a leading axis of length M.
    """
    def one(ab):
        return relax_band(loss_fn, linear_path(ab[0], ab[1], num_images), **kwargs)

    return chunked_vmap(one, (starts, ends), chunk_size)


# ----------------------------------------------------------------------------- resolution


def insert_images(images: Any, energies: Array, num_new: int) -> Any:
    """Insert ``num_new`` midpoint images in the segments with the largest |V_{i+1} − V_i|.

    A segment over which the energy jumps is where the chain resolves the path worst (AutoNEB,
    Kolsbjerg et al. 2016). Returns the N + num_new images in path order (a stacked pytree like
    ``images``); static shapes, so it runs under ``vmap``. Ties go to the earlier segment.
    """
    n = energies.shape[0]
    if not 0 <= num_new <= n - 1:
        raise ValueError(f"num_new must be in [0, {n - 1}] for {n} images, got {num_new}")
    jumps = jnp.abs(jnp.diff(energies))
    segments = jnp.argsort(-jumps, stable=True)[:num_new]
    keys = jnp.concatenate([jnp.arange(n, dtype=jnp.float64), segments + 0.5])
    order = jnp.argsort(keys)

    def leaf(x):
        mids = 0.5 * (x[segments] + x[segments + 1])
        return jnp.concatenate([x, mids])[order]

    return jax.tree.map(leaf, images)


def autoneb(loss_fn: Callable[[Params], Array], start: Params, end: Params,
            num_images: int = 7, insertions: Sequence[int] = (4,), **kwargs) -> Band:
    """Relax a band of ``num_images``, then insert images and relax again, once per entry of
    ``insertions`` (how many to add each round). Keywords go to :func:`relax_band`; climbing is
    on in every round. Without an absolute ``force_tol`` every round is tested against the
    first round's threshold (the later rounds start from a relaxed band, whose own forces
    would make a relative one ever tighter). Returns the last round's :class:`Band`."""
    band = relax_band(loss_fn, linear_path(start, end, num_images), **kwargs)
    if kwargs.get("force_tol") is None:
        kwargs["force_tol"] = band.force_tol
    for num_new in insertions:
        images = insert_images(band.images, band.energies, int(num_new))
        band = relax_band(loss_fn, images, **kwargs)
    return band


def line_energies(loss_fn: Callable[[Params], Array], start: Params, end: Params,
                  num_points: int) -> Array:
    """(num_points,) L((1 − α) θ_a + α θ_b) at α evenly spaced on [0, 1] (Goodfellow's line),
    for parameter pytrees θ_a, θ_b."""
    return jax.vmap(loss_fn)(linear_path(start, end, num_points))


# ----------------------------------------------------------------------------- test surfaces

#: Müller & Brown (1979) potential:
#: V = Σ_k A_k exp(a_k(x−x0_k)² + b_k(x−x0_k)(y−y0_k) + c_k(y−y0_k)²).
MULLER_BROWN = dict(A=(-200.0, -100.0, -170.0, 15.0), a=(-1.0, -1.0, -6.5, 0.7),
                    b=(0.0, 0.0, 11.0, 0.6), c=(-10.0, -10.0, -6.5, 0.7),
                    x0=(1.0, 0.0, -0.5, -1.0), y0=(0.0, 0.5, 1.5, 1.0))
#: Approximate minima (A, C, B: deepest first along the path) and saddles of the surface.
MULLER_BROWN_MINIMA = ((-0.558, 1.442), (-0.050, 0.467), (0.623, 0.028))
MULLER_BROWN_SADDLES = ((-0.822, 0.624), (0.212, 0.293))


def muller_brown(theta: Array) -> Array:
    """The Müller-Brown potential at θ = (x, y): three minima, two first-order saddles."""
    p = {k: jnp.asarray(v) for k, v in MULLER_BROWN.items()}
    dx, dy = theta[0] - p["x0"], theta[1] - p["y0"]
    return jnp.sum(p["A"] * jnp.exp(p["a"] * dx ** 2 + p["b"] * dx * dy + p["c"] * dy ** 2))
