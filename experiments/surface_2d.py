"""The loss on a 2-D plane through a critical point, with the training path (Li et al. 2018).

    python -m experiments.surface_2d                              # filter-normalized random plane
    python -m experiments.surface_2d --directions=hessian         # top two Hessian eigenvectors
    python -m experiments.surface_2d --grid=101 --extent=0.5 --out_dir=runs/surface

Protocol: one model from ``init_fn(fold_in(PRNGKey(seed), 0))`` is trained full-batch (common
optimizer flags; a snapshot every ``--record_every`` steps) and its end point is refined by the
critical-point finder (``--finder``) into θ*, certified critical iff ‖∇L(θ*)‖ ≤ ``--grad_tol``.
A model with BatchNorm trains its running statistics alongside (``crit.train.train_model``);
they are then fixed at their final values, and the path, the finder and the plane all use
L(θ; state) in eval mode.
The plane is L(θ* + α δ + β η) on a ``--grid`` × ``--grid`` lattice over [−extent, extent]²,
evaluated in vmapped groups of ``--vmap_width`` points, with

* ``--directions=random``: δ, η Gaussian, filter-normalized (each unit's incoming weights rescaled
  to the norm of θ*'s, biases zeroed; Li et al.), from fold_in(init key, 1) and (…, 2);
* ``--directions=hessian``: the unit eigenvectors of the two largest eigenvalues of the exact
  Hessian at θ* (``numpy.linalg.eigh`` of ``crit.hessian.dense_hessian``; P ≤ 5000 only).

The training snapshots are placed on the plane by least squares (``project_onto_plane``); the
part of θ_t − θ* outside the plane is stored as ``residual`` (random planes are nearly
orthogonal to the path, Li et al. §7, so the drawn path is a shadow, not the path).

Writes to ``--out_dir``: config.json, surface.npz, surface_contour and surface_3d (.png, .pdf).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags
from jax.flatten_util import ravel_pytree

from experiments import common, model_flags  # noqa: F401  (--model, --data_file)
from crit import landscape, store
from crit.critical import find_critical_point
from crit.hessian import dense_hessian
from crit.train import (cast_params, make_optimizer, train_model, train_with_snapshots,
                        tree_norm)

FLAGS = flags.FLAGS
TRAINS_STATE = True  # trains BatchNorm statistics with the weights (experiments/model_flags)
flags.DEFINE_integer("seed", 0, "Root seed; the model uses init fold_in(PRNGKey(seed), 0).")
flags.DEFINE_enum("directions", "random", ["random", "hessian"], "Plane directions: "
                  "filter-normalized Gaussian, or the top two Hessian eigenvectors (P <= "
                  "5000).")
flags.DEFINE_integer("grid", 51, "Grid points per axis.")
flags.DEFINE_float("extent", 1.0, "The grid covers [-extent, extent]² in (α, β).")
flags.DEFINE_integer("vmap_width", 256, "Grid points vmapped together (bounds memory). In the "
                     "fingerprint: XLA rounds a batch of another width differently, so another "
                     "width changes the last bits.")
flags.DEFINE_integer("record_every", 50, "Training snapshot every this many steps.")
flags.DEFINE_string("out_dir", "runs/surface_2d", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

MAX_DENSE_PARAMS = 5000  # a P × P float64 Hessian of 5000 is 200 MB and one eigh of it
OUTPUTS = ("surface.npz",)
# Shared flags (experiments/common.py) this app has no use for: given on the command line they
# are refused rather than silently ignored, and they stay out of the fingerprint.
UNUSED_SHARED = ("log_every", "flat_tol", "eig_tol")
NOT_PROTOCOL = ("out_dir", "overwrite") + UNUSED_SHARED


def unused_flag_errors() -> list[str]:
    """One message per shared flag of :data:`UNUSED_SHARED` given on the command line."""
    return [f"--{name}: does not apply to this app (it would be ignored)"
            for name in UNUSED_SHARED if FLAGS[name].present]


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors()
    errors += unused_flag_errors()
    if FLAGS.grid < 3:
        errors.append(f"--grid={FLAGS.grid}: must be >= 3")
    if not (math.isfinite(FLAGS.extent) and FLAGS.extent > 0):
        errors.append(f"--extent={FLAGS.extent}: must be a finite number > 0")
    if FLAGS.vmap_width < 1:
        errors.append(f"--vmap_width={FLAGS.vmap_width}: must be >= 1")
    if FLAGS.record_every < 1:
        errors.append(f"--record_every={FLAGS.record_every}: must be >= 1")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


def validate_problem(problem) -> None:
    """Checks that need the model's size (still before any compute)."""
    if FLAGS.directions == "hessian" and problem.n_params > MAX_DENSE_PARAMS:
        raise app.UsageError(
            f"--directions=hessian: the model has P = {problem.n_params} parameters and the "
            f"dense Hessian is limited to P <= {MAX_DENSE_PARAMS}; use --directions=random or "
            "smaller --widths")



def find_minimum(problem):
    """Train (with snapshots), then refine with the finder; returns float64 arrays/pytrees."""
    optimizer = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)
    dtype = jnp.float32 if FLAGS.train_dtype == "float32" else jnp.float64
    init_key = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), 0)
    kwargs = dict(max_iters=common.finder_steps()) if FLAGS.finder == "newton" else dict(
        num_steps=common.finder_steps(), learning_rate=FLAGS.finder_lr)

    @jax.jit
    def run():
        params = cast_params(problem.init_fn(init_key), dtype)
        if problem.has_state:
            # BatchNorm: running statistics trained alongside (batch statistics in training),
            # then fixed; the path, the finder and the surface use L(θ; state at the end)
            state = cast_params(problem.init_state_fn(init_key), dtype)
            _, state, _, (snaps, _) = train_model(
                problem, optimizer, params, state, jax.random.fold_in(init_key, 2),
                FLAGS.train_steps, FLAGS.record_every, keep_snapshots=True)
            snaps, state = cast_params(snaps, jnp.float64), cast_params(state, jnp.float64)
        else:
            snaps = cast_params(train_with_snapshots(problem.loss_fn, optimizer, params,
                                                     FLAGS.train_steps, FLAGS.record_every),
                                jnp.float64)
            state = {}
        loss_fn = problem.bind_state(state)
        start = jax.tree.map(lambda s: s[-1], snaps)
        found = find_critical_point(loss_fn, start, FLAGS.finder, FLAGS.grad_tol, **kwargs)
        loss, grad = jax.value_and_grad(loss_fn)(found.params)
        snap_loss = jax.vmap(loss_fn)(snaps)
        return snaps, snap_loss, found.params, loss, tree_norm(grad), state

    *found, state = run()
    return tuple(found), init_key, problem.bind_state(state)


def plane_directions(loss_fn, theta_star, init_key):
    """(d1, d2, info): the two directions as pytrees and what they are."""
    if FLAGS.directions == "random":
        draw = lambda j, t: landscape.filter_normalized_direction(jax.random.fold_in(init_key, j), t)
        d1, d2 = jax.jit(lambda t: (draw(1, t), draw(2, t)))(theta_star)
        return d1, d2, {}
    hess = np.asarray(jax.jit(lambda t: dense_hessian(loss_fn, t))(theta_star))
    lam, vec = np.linalg.eigh(hess)  # ascending; dense_hessian is already symmetrized
    _, unravel = ravel_pytree(theta_star)
    dirs = []
    for j in (-1, -2):
        v = vec[:, j]
        v = v * np.sign(v[np.argmax(np.abs(v))])  # reproducible sign
        dirs.append(unravel(jnp.asarray(v)))
    return dirs[0], dirs[1], {"hessian_eigenvalues": lam}


def on_plane(loss_fn, alphas, theta_star, d1, d2, snaps):
    """The grid of losses and the path's plane coordinates, off-plane residuals and distances
    to θ* (the path is the training snapshots followed by θ* itself)."""
    loss = landscape.surface_2d(loss_fn, theta_star, d1, d2, alphas, alphas,
                                FLAGS.vmap_width)
    path = jax.tree.map(lambda s, t: jnp.concatenate([s, t[None]]), snaps, theta_star)
    coef = landscape.project_onto_plane(path, theta_star, d1, d2)
    flat = lambda t: ravel_pytree(t)[0]
    basis = jnp.stack([flat(d1), flat(d2)], axis=1)
    offsets = jax.vmap(flat)(path) - flat(theta_star)
    fitted = (basis @ jnp.stack([coef.alpha, coef.beta])).T
    return dict(loss=loss, alpha=coef.alpha, beta=coef.beta, theta_star=flat(theta_star),
                d1=basis[:, 0], d2=basis[:, 1],
                residual=jnp.linalg.norm(offsets - fitted, axis=1),
                distance=jnp.linalg.norm(offsets, axis=1))


def surface_figures(alphas, loss, traj_a, traj_b, out_dir, title, axis_names, status):
    """Contour map (with θ* and the projected path) and a 3-D surface of log10 of the loss."""
    from crit import plots  # matplotlib is loaded only when drawing (Agg backend)
    import matplotlib.pyplot as plt

    z = np.log10(np.maximum(loss, np.finfo(float).tiny))
    a, b = np.meshgrid(alphas, alphas, indexing="ij")
    lim = alphas[-1]

    fig, ax = plt.subplots(figsize=(6.4, 5.4))
    cs = ax.contourf(a, b, z, levels=30, cmap="viridis")
    ax.contour(a, b, z, levels=15, colors="k", linewidths=0.4, alpha=0.5)
    fig.colorbar(cs, ax=ax, label="log10 training loss")
    ax.plot(traj_a, traj_b, "-", color="white", lw=1.4, label="training path (projected)")
    ax.plot(traj_a[0], traj_b[0], "o", mfc="none", mec="white", ms=8, label="initialization")
    ax.plot([0], [0], "*", color="red", ms=14, label=f"θ* ({status})")
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_xlabel(axis_names[0])
    ax.set_ylabel(axis_names[1])
    ax.set_aspect("equal")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower left", framealpha=0.7)
    plots.save_figure(fig, out_dir, "surface_contour")

    fig = plt.figure(figsize=(7.0, 5.6))
    ax = fig.add_subplot(projection="3d")
    ax.plot_surface(a, b, z, cmap="viridis", linewidth=0, antialiased=True, rstride=1,
                    cstride=1)
    ax.scatter([0], [0], [z[len(alphas) // 2, len(alphas) // 2]], color="red", s=40)
    ax.set_xlabel("α")
    ax.set_ylabel("β")
    ax.set_zlabel("log10 training loss")
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_locator(plt.MaxNLocator(5))
    ax.set_title(f"{title}\nα: {axis_names[0].split('(')[-1].rstrip(')')}, "
                 f"β: {axis_names[1].split('(')[-1].rstrip(')')}", fontsize=9)
    plots.save_figure(fig, out_dir, "surface_3d")


def run_config(problem) -> dict:
    shared, own = common.flag_values(__name__)
    protocol = {k: v for k, v in (shared | own).items() if k not in NOT_PROTOCOL}
    protocol.update(problem=problem.name, loss=problem.loss_name,
                    finder_steps=common.finder_steps())
    return {"experiment": "surface_2d", "protocol": protocol, "flags": shared | own,
            "n_params": problem.n_params, "environment": common.environment()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    problem = common.problem_from_flags()
    validate_problem(problem)
    out_dir = Path(FLAGS.out_dir)
    common.prepare_out_dir(out_dir, run_config(problem), OUTPUTS)
    print(f"{problem.name}: P = {problem.n_params}; {FLAGS.train_steps} {FLAGS.optimizer} steps, "
          f"{FLAGS.finder} refinement, {FLAGS.grid}×{FLAGS.grid} grid on "
          f"[-{FLAGS.extent:g}, {FLAGS.extent:g}]², {FLAGS.directions} directions")
    (snaps, snap_loss, theta_star, loss_star, gnorm_star), init_key, loss_fn = find_minimum(
        problem)
    critical = bool(gnorm_star <= FLAGS.grad_tol)
    d1, d2, info = plane_directions(loss_fn, theta_star, init_key)

    alphas = np.linspace(-FLAGS.extent, FLAGS.extent, FLAGS.grid)
    out = jax.tree.map(np.asarray, jax.jit(lambda *a: on_plane(loss_fn, alphas, *a))(
        theta_star, d1, d2, snaps))
    loss, residual = out["loss"], out["residual"]
    n_snap = jax.tree.leaves(snaps)[0].shape[0]
    steps = np.concatenate([np.arange(n_snap - 1) * FLAGS.record_every, [FLAGS.train_steps]])

    store.atomic_save_npz(out_dir / "surface.npz", {
        "alpha": alphas, "beta": alphas, "loss": loss, "theta_star": out["theta_star"],
        "d1": out["d1"], "d2": out["d2"],
        "loss_star": np.asarray(loss_star), "grad_norm_star": np.asarray(gnorm_star),
        "critical": np.asarray(critical), "directions": np.array(FLAGS.directions),
        "path_step": steps, "path_loss": np.asarray(snap_loss),
        # the path: training snapshots, then θ* (the finder's point) as the last row
        "path_alpha": out["alpha"], "path_beta": out["beta"],
        "path_residual": residual, **info})

    status = (f"critical, ‖∇L‖ = {float(gnorm_star):.1e}" if critical
              else f"not certified, ‖∇L‖ = {float(gnorm_star):.1e}")
    if FLAGS.directions == "hessian":
        lam = info["hessian_eigenvalues"]
        names = (f"α  (eigenvector of λ1 = {lam[-1]:.3g})", f"β  (eigenvector of λ2 = {lam[-2]:.3g})")
    else:
        names = ("α  (filter-normalized δ)", "β  (filter-normalized η)")
    title = (f"{problem.name}, P = {problem.n_params}: L(θ* + αδ + βη), "
             f"{FLAGS.grid}×{FLAGS.grid}\npath off-plane distance: median "
             f"{np.median(residual[:-1]):.3g} (‖θ0 − θ*‖ = {out['distance'][0]:.3g})")
    surface_figures(alphas, loss, out["alpha"], out["beta"], out_dir, title,
                    names, status)
    print(f"θ*: loss {float(loss_star):.4g}, {status}; surface loss in "
          f"[{loss.min():.3g}, {loss.max():.3g}]")
    print(f"wrote {out_dir}/surface.npz, surface_contour.png/.pdf, surface_3d.png/.pdf")


if __name__ == "__main__":
    app.run(main)
