"""The saddle between two minima: minimum energy paths, certified index-1 saddles, alignment.

    python -m experiments.minimum_paths                          # Gaussian data, widths 2,4,8
    python -m experiments.minimum_paths --mode=toy               # the lecture's y = w1·w2·x
    python -m experiments.minimum_paths --mode=muller_brown      # the standard test surface
    python -m experiments.minimum_paths --width_sweep=4,8,16 --num_pairs=4 --align=weights

Protocol (``--mode=networks``). For every width w of ``--width_sweep`` an MLP with ``--depth``
hidden layers of width w is built on the data flags (default: 48 Gaussian points, 2 inputs,
φ = P/n < 1, L2 1e-2, so that strict minima exist). Inits i = 0 .. 2·num_pairs − 1 use
``fold_in(fold_in(PRNGKey(seed), w), i)``, are trained with ``--optimizer`` for
``--train_steps`` full-batch steps (vmapped), refined by damped Newton (crit.critical) and
certified: ‖∇L‖ ≤ ``--grad_tol`` and the dense float64 Hessian's verdict at tolerance τ
(crit.verdict.dense_verdict), about the critical point near the refined one: ``minimum`` only
where λ_min > τ + the margin for the distance to ∇L = 0 (crit.nearby, an estimate). Pair k joins inits 2k and 2k + 1. With ``--align=weights`` the
second network is also permuted to match the first by weight matching (crit.align), and both
versions are kept. For every pair (and alignment) the app evaluates the loss on the straight
line (Goodfellow et al. 2015), relaxes a climbing-image nudged elastic band from that line
(crit.paths; ``--insert_images`` adds AutoNEB images where the energy jumps most and relaxes
again), refines the climbing image (eigenvector following, then Newton) and labels it
(crit.mountain_pass: index_1_saddle, higher_index, degenerate, drifted_to_minimum, not_converged,
no_barrier), and follows steepest descent from both sides of the saddle (``--connect_steps``):
column on_path says both sides end on the band, on either side of its top (the saddle is a pass
of this path), connects that they end at the two minima themselves. All bands of a width run
in one vmapped call. Barriers are max L − max(L_a, L_b).

``--mode=toy`` runs the band between the lecture toy's minima (1, 1) and (−1, −1), which finds
the saddle at the origin (loss 1, eigenvalues ±2); ``--mode=muller_brown`` runs bands A→C,
C→B and A→B between the Müller-Brown minima.

Writes to ``--out_dir``: config.json, pairs.csv (one row per pair and alignment), minima.csv
(one row per trained minimum; networks only), paths.npz (losses along the lines and the bands,
arc lengths, plane projection), one ``group_<name>.npz`` per width (or mode) with the images,
saddles and eigenvalues (a killed run resumes from these), and the figures minimum_paths
(loss vs arc length, both paths), minimum_paths_plane (the plane through the two minima and
the saddle) and, for networks, barrier_vs_width (.png and .pdf).
"""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments import common
from crit import paths, store, toy
from crit.align import weight_matching
from crit.critical import CRITICAL, STATUSES, certify, newton_critical_point
from crit.hessian import dense_hessian
from crit.mountain_pass import (INDEX_1_SADDLE, SADDLE_LABELS, certify_band_top,
                                descent_connection, label_names)
from crit.problems import flatten
from crit.spectrum import default_tolerance
from crit.train import make_optimizer, train
from crit.nearby import critical_point_verdict, nearby_margin
from crit.verdict import dense_verdict, verdict_names

FLAGS = flags.FLAGS
MODES = ("networks", "toy", "muller_brown")
flags.DEFINE_enum("mode", "networks", list(MODES), "networks: pairs of trained minima of MLPs; "
                  "toy: the lecture's y = w1·w2·x between (1, 1) and (−1, −1); muller_brown: the "
                  "Müller-Brown surface between its three minima.")
flags.DEFINE_string("width_sweep", "2,4,8", "Hidden widths w compared (comma separated); each "
                    "net has --depth hidden layers of width w.")
flags.DEFINE_integer("depth", 1, "Hidden layers per network.")
flags.DEFINE_integer("num_pairs", 2, "Pairs of minima per width (inits 2k and 2k + 1).")
flags.DEFINE_integer("seed", 0, "Root seed of the initializations.")
flags.DEFINE_enum("align", "weights", ["none", "weights"], "none: paths between the minima as "
                  "trained; weights: also after permuting the second network's hidden units to "
                  "match the first (weight matching, Ainsworth et al. 2023).")
flags.DEFINE_integer("num_images", 15, "Images per band, the two minima included.")
flags.DEFINE_integer("band_steps", 5000, "Optimizer steps of the band at most (stops earlier "
                     "when converged).")
flags.DEFINE_float("band_lr", 1e-2, "Adam step of the band (cosine-decayed to 1e-3 of it).")
flags.DEFINE_float("spring", 1.0, "Spring constant of the band (spacing only; not the path).")
flags.DEFINE_integer("climb_after", 1000, "Band steps before the highest image climbs.")
flags.DEFINE_float("force_tol", 1e-4, "The band is converged when its perpendicular forces and "
                   "the climbing image's force are at most this.")
flags.DEFINE_integer("insert_images", 0, "AutoNEB: after relaxing, insert this many images where "
                     "the energy jumps most and relax again (0: off).")
flags.DEFINE_float("barrier_tol", 1e-9, "A band whose highest image is not above the higher "
                   "minimum by more than this has no barrier (label no_barrier, no saddle).")
flags.DEFINE_integer("connect_steps", 2000, "Steepest-descent (Adam) steps from both sides of "
                     "each certified top along its negative-curvature direction: columns on_path "
                     "(both ends on the band, either side of its top) and connects (the ends are "
                     "the two minima); 0 skips.")
flags.DEFINE_integer("line_points", 51, "Points on the straight line between the minima.")
flags.DEFINE_integer("plane_grid", 31, "Points per axis of the plane figure's loss grid.")
flags.DEFINE_string("out_dir", "runs/minimum_paths", "Results directory.")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

# Defaults: Gaussian data with φ = P/n < 1 and a little L2, where strict minima exist.
FLAGS.set_default("dataset", "gaussian")
FLAGS.set_default("n_points", 48)
FLAGS.set_default("dim_in", 2)
FLAGS.set_default("l2", 1e-2)
FLAGS.set_default("train_steps", 5000)

# Shared flags this app has no use for: refused when given, kept out of the fingerprint.
UNUSED_SHARED = ("widths", "log_every", "finder", "finder_lr", "flat_tol", "train_dtype")
# Flags that describe the networks; refused in the toy modes.
NETWORK_FLAGS = ("dataset", "n_points", "data_seed", "dim_in", "dim_out", "activation",
                 "use_bias", "loss", "l2", "optimizer", "learning_rate", "momentum",
                 "train_steps", "width_sweep", "depth", "num_pairs", "seed", "align")
NOT_PROTOCOL = ("out_dir", "overwrite") + UNUSED_SHARED
MAX_PLANE_GRID = 401
FINDER_STEPS = 30


def parse_sweep(text: str) -> tuple[int, ...]:
    """'2,4,8' -> (2, 4, 8): distinct positive integers. Raises ValueError naming the flag."""
    try:
        widths = tuple(int(w) for w in text.split(","))
    except ValueError:
        raise ValueError(f"--width_sweep={text!r}: expected comma-separated positive integers, "
                         "e.g. '2,4,8'") from None
    if not widths or any(w <= 0 for w in widths) or len(set(widths)) != len(widths):
        raise ValueError(f"--width_sweep={text!r}: need distinct positive integers")
    return widths


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = common.problem_errors()
    errors += [f"--{name}: does not apply to this app"
               + (" (use --width_sweep and --depth)" if name == "widths" else "")
               for name in UNUSED_SHARED if FLAGS[name].present]
    if FLAGS.mode == "networks":
        try:
            parse_sweep(FLAGS.width_sweep)
        except ValueError as exc:
            errors.append(str(exc))
        if FLAGS.dataset not in ("gaussian", "sinc", "sign", "digits"):
            errors.append(f"--dataset={FLAGS.dataset}: weight matching needs an MLP on flat "
                          "inputs; use gaussian, sinc, sign or digits")
    else:
        errors += [f"--{name}: does not apply to --mode={FLAGS.mode}" for name in NETWORK_FLAGS
                   if FLAGS[name].present]
    for name, low in (("depth", 1), ("num_pairs", 1), ("num_images", 3), ("band_steps", 1),
                      ("climb_after", 0), ("insert_images", 0), ("line_points", 3),
                      ("connect_steps", 0),
                      ("plane_grid", 3)):
        if getattr(FLAGS, name) < low:
            errors.append(f"--{name}={getattr(FLAGS, name)}: must be >= {low}")
    if FLAGS.plane_grid > MAX_PLANE_GRID:
        errors.append(f"--plane_grid={FLAGS.plane_grid}: must be <= {MAX_PLANE_GRID}")
    if FLAGS.insert_images > FLAGS.num_images - 1:
        errors.append(f"--insert_images={FLAGS.insert_images}: at most --num_images - 1 = "
                      f"{FLAGS.num_images - 1} (one per segment)")
    for name, strict in (("band_lr", True), ("spring", False), ("force_tol", False),
                         ("barrier_tol", False)):
        value = getattr(FLAGS, name)
        if not (math.isfinite(value) and (value > 0 if strict else value >= 0)):
            errors.append(f"--{name}={value}: must be a finite number {'>' if strict else '>='} 0")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


# ----------------------------------------------------------------------------- groups


def groups() -> list[str]:
    """Names of the units of work (one per width, or the mode), in order."""
    if FLAGS.mode == "networks":
        return [f"width_{w}" for w in parse_sweep(FLAGS.width_sweep)]
    return [FLAGS.mode]


def group_file(name: str) -> str:
    return f"group_{name}.npz"


def band_kwargs() -> dict:
    return dict(num_steps=FLAGS.band_steps, spring=FLAGS.spring, learning_rate=FLAGS.band_lr,
                climb_after=FLAGS.climb_after, force_tol=FLAGS.force_tol)


def paths_between(energy_fn, starts, ends) -> dict:
    """Lines, bands and certified tops for rows ``starts[j] → ends[j]`` (flat, (R, P)), in one
    jitted, vmapped call. Returns host arrays, one row per path."""
    kw = band_kwargs()

    def one(a, b):
        band = paths.relax_band(energy_fn, paths.linear_path(a, b, FLAGS.num_images), **kw)
        if FLAGS.insert_images:
            images = paths.insert_images(band.images, band.energies, FLAGS.insert_images)
            band = paths.relax_band(energy_fn, images, **kw)
        cert = certify_band_top(energy_fn, band, FLAGS.barrier_tol, grad_tol=FLAGS.grad_tol,
                                eig_tol=FLAGS.eig_tol, max_iters=FLAGS.finder_steps or FINDER_STEPS)
        line = paths.line_energies(energy_fn, a, b, FLAGS.line_points)
        if FLAGS.connect_steps:
            conn = descent_connection(energy_fn, cert.theta, band.images, band.climbing,
                                      FLAGS.connect_steps)
            saddle = cert.label == INDEX_1_SADDLE
            links = dict(on_path=conn.on_path & saddle, connects=conn.connects & saddle,
                         descent_path_dist=jnp.max(conn.path_dist))
        else:
            links = dict(on_path=jnp.asarray(False), connects=jnp.asarray(False),
                         descent_path_dist=jnp.asarray(jnp.nan))
        return dict(**links,
            line_loss=line, line_barrier=paths.barrier_height(line),
            path_images=band.images, path_loss=band.energies,
            path_arc=paths.arc_length(band.images),
            path_barrier=paths.barrier_height(band.energies), climbing=band.climbing,
            band_converged=band.converged, band_perp_force=band.perp_force,
            band_climb_force=band.climb_force, band_steps=band.steps,
            distance=jnp.linalg.norm(b - a),
            saddle_theta=cert.theta, saddle_loss=cert.loss, saddle_grad_norm=cert.grad_norm,
            saddle_status=cert.status, saddle_iterations=cert.iterations,
            saddle_index=cert.n_neg, saddle_null=cert.n_null, eig_tol=cert.tolerance,
            saddle_lambda_min=cert.lambda_min, saddle_lambda_next=cert.lambda_next,
            saddle_eigenvalues=cert.eigenvalues, saddle_barrier=cert.barrier,
            saddle_displacement=cert.displacement, saddle_label=cert.label)

    out = jax.jit(jax.vmap(one))(jnp.asarray(starts), jnp.asarray(ends))
    return {k: np.asarray(v) for k, v in out.items()}


def certify_minima(energy_fn, thetas):
    """Newton-refined, certified minima (flat (M, P)) and their dense verdicts, vmapped."""
    eig_tol = FLAGS.eig_tol

    def one(theta):
        found = newton_critical_point(energy_fn, theta, max_iters=FLAGS.finder_steps or
                                      FINDER_STEPS, grad_tol=FLAGS.grad_tol)
        lam, vec = jnp.linalg.eigh(dense_hessian(energy_fn, found.params))
        tau = default_tolerance(lam) if eig_tol is None else jnp.asarray(eig_tol, lam.dtype)
        cert = certify(energy_fn, found.params, jnp.max(jnp.abs(lam)), FLAGS.grad_tol)
        # a minimum of the critical point near θ, not only of H(θ): λ_min must clear τ plus
        # the margin for the distance to ∇L = 0 (crit.nearby), else "degenerate"
        margin = nearby_margin(energy_fn, found.params, vec[:, 0],
                               minres_iters=min(lam.shape[0], 200))
        verdict = critical_point_verdict(dense_verdict(lam, tau, cert.status == CRITICAL),
                                         margin)
        return dict(theta=found.params, loss=cert.loss, grad_norm=cert.grad_norm,
                    status=cert.status, verdict=verdict.code, n_neg=jnp.sum(lam < -tau),
                    n_null=jnp.sum(jnp.abs(lam) <= tau), lambda_min=lam[0], lambda_max=lam[-1],
                    eigenvalues=lam, verdict_margin=margin.margin,
                    curvature_ratio=margin.ratio)

    out = jax.jit(jax.vmap(one))(thetas)
    return {k: np.asarray(v) for k, v in out.items()}


def network_problem(width: int):
    from crit.problems import mlp_problem

    extra = {}
    if FLAGS.dataset == "gaussian":
        extra = dict(dim_in=FLAGS.dim_in, dim_out=FLAGS.dim_out)
    return mlp_problem(dataset=FLAGS.dataset, widths=(width,) * FLAGS.depth,
                       activation=FLAGS.activation, use_bias=FLAGS.use_bias,
                       loss=None if FLAGS.loss == "auto" else FLAGS.loss, l2=FLAGS.l2,
                       n_points=FLAGS.n_points, data_seed=FLAGS.data_seed, **extra)


def energy_of(group: str):
    """(flat energy θ ↦ L, unravel or None, problem name, P) of a group."""
    if group == "toy":
        return toy.toy_loss, None, "toy y = w1·w2·x", 2
    if group == "muller_brown":
        return paths.muller_brown, None, "Müller-Brown", 2
    problem = network_problem(int(group.split("_")[1]))
    theta, unravel = flatten(problem.init_fn(jax.random.PRNGKey(0)))
    return (lambda t: problem.loss_fn(unravel(t))), unravel, problem.name, problem.n_params


def run_network_group(group: str) -> dict:
    width = int(group.split("_")[1])
    problem = network_problem(width)
    energy, unravel, _, p = energy_of(group)
    n_inits = 2 * FLAGS.num_pairs
    root = jax.random.fold_in(jax.random.PRNGKey(FLAGS.seed), width)
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(n_inits))
    optimizer = make_optimizer(FLAGS.optimizer, FLAGS.learning_rate, FLAGS.momentum)

    @jax.jit
    def trained(keys):
        def one(key):
            params, _ = train(problem.loss_fn, optimizer, problem.init_fn(key),
                              FLAGS.train_steps, max(FLAGS.train_steps, 1))
            return flatten(params)[0]
        return jax.vmap(one)(keys)

    minima = certify_minima(energy, trained(keys))
    print(f"  {group}: {problem.name}, P = {p}, φ = {problem.phi:.3f}; minima: "
          + ", ".join(f"{n} {int((verdict_names(minima['verdict']) == n).sum())}"
                      for n in np.unique(verdict_names(minima["verdict"]))), flush=True)
    pair = np.repeat(np.arange(FLAGS.num_pairs), 1 if FLAGS.align == "none" else 2)
    alignments = np.array(["none", "weights"][:1 if FLAGS.align == "none" else 2] *
                          FLAGS.num_pairs)
    starts, ends, before = [], [], []
    for k, how in zip(pair, alignments):
        a, b = minima["theta"][2 * k], minima["theta"][2 * k + 1]
        before.append(np.linalg.norm(b - a))
        if how == "weights":
            b = flatten(weight_matching(unravel(a), unravel(b)).params)[0]
        starts.append(a)
        ends.append(np.asarray(b))
    rows = paths_between(energy, np.stack(starts), np.stack(ends))
    rows.update(pair=pair, alignment=alignments, init_a=2 * pair, init_b=2 * pair + 1,
                distance_unaligned=np.asarray(before))
    rows.update({f"min_{k}": v for k, v in minima.items()})
    return rows


def run_surface_group(group: str) -> dict:
    energy = toy.toy_loss if group == "toy" else paths.muller_brown
    if group == "toy":
        minima = np.array([[1.0, 1.0], [-1.0, -1.0]])
        pairs = [(0, 1)]
    else:
        minima = np.stack([np.asarray(newton_critical_point(energy, jnp.asarray(m)).params)
                           for m in paths.MULLER_BROWN_MINIMA])
        pairs = [(0, 1), (1, 2), (0, 2)]
    certified = certify_minima(energy, jnp.asarray(minima))
    rows = paths_between(energy, minima[[i for i, _ in pairs]], minima[[j for _, j in pairs]])
    rows.update(pair=np.arange(len(pairs)), alignment=np.array(["none"] * len(pairs)),
                init_a=np.array([i for i, _ in pairs]), init_b=np.array([j for _, j in pairs]),
                distance_unaligned=rows["distance"])
    rows.update({f"min_{k}": v for k, v in certified.items()})
    return rows


def run_group(group: str) -> dict:
    rows = run_network_group(group) if FLAGS.mode == "networks" else run_surface_group(group)
    return {k: np.asarray(v) for k, v in rows.items()}


# ----------------------------------------------------------------------------- outputs


def pair_columns(results: dict[str, dict]) -> dict[str, np.ndarray]:
    """pairs.csv: one row per path (group, pair, alignment)."""
    cols: dict[str, list] = {}

    def add(name, values):
        cols.setdefault(name, []).extend(list(values))

    for group, r in results.items():
        n = len(r["pair"])
        _, _, pname, p = energy_of(group)
        width = int(group.split("_")[1]) if group.startswith("width_") else 0
        ia, ib = r["init_a"], r["init_b"]
        add("problem", [pname] * n)
        add("width", [width] * n)
        add("n_params", [p] * n)
        add("pair", r["pair"])
        add("alignment", r["alignment"])
        add("init_a", ia)
        add("init_b", ib)
        add("distance_unaligned", r["distance_unaligned"])
        add("distance", r["distance"])
        for end, idx in (("a", ia), ("b", ib)):
            add(f"min_{end}_loss", r["min_loss"][idx])
            add(f"min_{end}_grad_norm", r["min_grad_norm"][idx])
            add(f"min_{end}_verdict", verdict_names(r["min_verdict"][idx]))
        for name in ("line_barrier", "path_barrier", "band_converged", "band_perp_force",
                     "band_climb_force", "band_steps"):
            add(name, r[name])
        add("num_images", [r["path_loss"].shape[1]] * n)
        add("path_length", r["path_arc"][:, -1])
        add("saddle_label", label_names(r["saddle_label"]))
        for name in ("saddle_loss", "saddle_grad_norm", "saddle_index", "saddle_null",
                     "saddle_lambda_min", "saddle_lambda_next", "eig_tol", "saddle_barrier",
                     "saddle_displacement"):
            add(name, r[name])
        add("saddle_status", np.asarray(STATUSES)[r["saddle_status"]])
        for name in ("on_path", "connects", "descent_path_dist"):
            add(name, r[name])
        add("finder_iterations", r["saddle_iterations"])
    return {k: np.asarray(v) for k, v in cols.items()}


def minima_columns(results: dict[str, dict]) -> dict[str, np.ndarray]:
    """minima.csv: one row per trained and refined minimum."""
    cols: dict[str, list] = {}
    for group, r in results.items():
        n = len(r["min_loss"])
        width = int(group.split("_")[1]) if group.startswith("width_") else 0
        for name, values in (("width", [width] * n), ("init_id", np.arange(n)),
                             ("loss", r["min_loss"]), ("grad_norm", r["min_grad_norm"]),
                             ("status", np.asarray(STATUSES)[r["min_status"]]),
                             ("verdict", verdict_names(r["min_verdict"])),
                             ("n_neg", r["min_n_neg"]), ("n_null", r["min_n_null"]),
                             ("lambda_min", r["min_lambda_min"]),
                             ("lambda_max", r["min_lambda_max"])):
            cols.setdefault(name, []).extend(list(values))
    return {k: np.asarray(v) for k, v in cols.items()}


def plane_coordinates(a, b, s, key=0):
    """Orthonormal e1 ∥ b − a and e2 ⟂ e1 in the plane of a, b and the saddle s (a seeded
    random direction orthogonalized when s lies on the line a–b)."""
    e1 = (b - a) / np.linalg.norm(b - a)
    w = s - a - np.dot(s - a, e1) * e1 if np.all(np.isfinite(s)) else np.zeros_like(a)
    if np.linalg.norm(w) <= 1e-9 * np.linalg.norm(b - a):
        w = np.random.default_rng(key).standard_normal(a.shape)
        w = w - np.dot(w, e1) * e1
    return e1, w / np.linalg.norm(w)


def plane_view(group: str, r: dict, row: int) -> dict:
    """Loss on a grid over the plane through minima a, b and the certified saddle of ``row``,
    with the band and the line projected onto it."""
    energy, *_ = energy_of(group)
    images = r["path_images"][row]
    a, b = images[0], images[-1]
    s = r["saddle_theta"][row]
    e1, e2 = plane_coordinates(a, b, s)
    proj = lambda x: np.stack([(x - a) @ e1, (x - a) @ e2], axis=-1)  # noqa: E731
    band_xy = proj(images)
    pts = np.concatenate([band_xy, proj(np.stack([a, b])),
                          proj(s[None]) if np.all(np.isfinite(s)) else band_xy[:1]])
    span = max(np.ptp(pts[:, 0]), np.ptp(pts[:, 1]), 1e-3)
    lo, hi = pts.min(0) - 0.25 * span, pts.max(0) + 0.25 * span
    xs = np.linspace(lo[0], hi[0], FLAGS.plane_grid)
    ys = np.linspace(lo[1], hi[1], FLAGS.plane_grid)
    gx, gy = np.meshgrid(xs, ys)
    grid = a[None] + gx.reshape(-1, 1) * e1[None] + gy.reshape(-1, 1) * e2[None]
    loss = np.asarray(jax.jit(jax.vmap(energy))(jnp.asarray(grid))).reshape(gx.shape)
    return dict(plane_x=xs, plane_y=ys, plane_loss=loss, plane_band=band_xy,
                plane_saddle=proj(s[None])[0], plane_row=np.asarray(row))


def figure_paths(results, out_dir, title):
    from crit import plots
    import matplotlib.pyplot as plt

    aligns = ["none", "weights"] if FLAGS.mode == "networks" and FLAGS.align == "weights" \
        else ["none"]
    names = list(results)
    fig, axes = plt.subplots(len(aligns), len(names), figsize=(4.4 * len(names),
                                                                3.6 * len(aligns)),
                             squeeze=False)
    for col, group in enumerate(names):
        r = results[group]
        for row_i, how in enumerate(aligns):
            ax = axes[row_i, col]
            for j in np.flatnonzero(r["alignment"] == how):
                c = plt.get_cmap("tab10")(int(r["pair"][j]) % 10)
                arc = r["path_arc"][j] / max(r["path_arc"][j, -1], 1e-300)
                alpha = np.linspace(0, 1, r["line_loss"].shape[1])
                tag = f"{r['init_a'][j]}→{r['init_b'][j]}"
                ax.plot(alpha, r["line_loss"][j], "--", color=c, lw=1.1, label=f"{tag} line")
                ax.plot(arc, r["path_loss"][j], "o-", color=c, ms=3, lw=1.4,
                        label=f"{tag} MEP ({label_names(r['saddle_label'][j])})")
                if np.isfinite(r["saddle_loss"][j]):
                    ax.plot(arc[r["climbing"][j]], r["saddle_loss"][j], "*", color=c, ms=12,
                            mec="k")
            ax.set_xlabel("arc length / path length (line: α)")
            ax.set_ylabel("loss")
            head = group.replace("_", " ")
            ax.set_title(head + (f", align={how}" if len(aligns) > 1 else ""), fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(title + "  (dashed: straight line, solid: minimum energy path, ★ certified top)",
                 fontsize=9)
    fig.tight_layout()
    return plots.save_figure(fig, out_dir, "minimum_paths")


def figure_plane(view, group, r, out_dir):
    from crit import plots
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 4.6))
    loss = view["plane_loss"]
    levels = np.quantile(loss[np.isfinite(loss)], np.linspace(0, 1, 30))
    cs = ax.contourf(view["plane_x"], view["plane_y"], loss, levels=np.unique(levels),
                     cmap="viridis")
    fig.colorbar(cs, ax=ax, label="loss")
    band = view["plane_band"]
    ax.plot(band[:, 0], band[:, 1], "o-", color="w", ms=3, lw=1.3, label="minimum energy path")
    ax.plot([band[0, 0], band[-1, 0]], [band[0, 1], band[-1, 1]], "--", color="orange", lw=1.2,
            label="straight line")
    ax.plot(band[[0, -1], 0], band[[0, -1], 1], "s", color="red", ms=7, label="minima")
    if np.all(np.isfinite(view["plane_saddle"])):
        ax.plot(*view["plane_saddle"], "*", color="red", ms=14, mec="k",
                label=f"saddle ({label_names(r['saddle_label'][int(view['plane_row'])])})")
    ax.set_xlabel("along θ_b − θ_a")
    ax.set_ylabel("perpendicular, towards the saddle")
    j = int(view["plane_row"])
    ax.set_title(f"{group.replace('_', ' ')}: pair {r['init_a'][j]}→{r['init_b'][j]}, "
                 f"align={r['alignment'][j]}", fontsize=9)
    ax.legend(fontsize=7)
    return plots.save_figure(fig, out_dir, "minimum_paths_plane")


def figure_barriers(cols, out_dir, title):
    from crit import plots
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.8, 4.2))
    styles = {("line", "none"): ("tab:orange", "--", "s"),
              ("path", "none"): ("tab:blue", "-", "o"),
              ("line", "weights"): ("tab:red", "--", "^"),
              ("path", "weights"): ("tab:green", "-", "D")}
    widths = np.unique(cols["width"])
    for (kind, how), (c, ls, m) in styles.items():
        sel = cols["alignment"] == how
        if not sel.any():
            continue
        vals = cols[f"{kind}_barrier"].astype(float)
        ax.plot(cols["width"][sel], vals[sel], m, color=c, alpha=0.45, ms=5)
        means = [np.mean(vals[sel & (cols["width"] == w)]) for w in widths]
        ax.plot(widths, means, ls, color=c, marker=m, label=f"{kind} barrier, align={how}")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("hidden width")
    ax.set_ylabel("barrier  max L − max(L_a, L_b)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return plots.save_figure(fig, out_dir, "barrier_vs_width")


# ----------------------------------------------------------------------------- app


def outputs() -> tuple[str, ...]:
    return ("pairs.csv", "minima.csv", "paths.npz") + tuple(group_file(g) for g in groups())


def run_config() -> dict:
    shared, own = common.flag_values(__name__)
    values = shared | own
    protocol = {k: v for k, v in values.items() if k not in NOT_PROTOCOL}
    if FLAGS.mode != "networks":
        protocol = {k: v for k, v in protocol.items() if k not in NETWORK_FLAGS}
    return {"experiment": "minimum_paths", "protocol": protocol, "flags": values,
            "environment": common.environment()}


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    common.set_matmul_precision()
    out_dir = Path(FLAGS.out_dir)
    resuming = common.prepare_out_dir(out_dir, run_config(), outputs())
    names = groups()
    results = {}
    progress = common.Progress(len(names), "groups")
    for group in names:
        path = out_dir / group_file(group)
        if resuming and path.exists():
            results[group] = store.load_npz(path)
            print(f"  {group}: resumed from {path.name}", flush=True)
        else:
            results[group] = run_group(group)
            store.atomic_save_npz(path, results[group])
        progress.update(1)

    cols = pair_columns(results)
    store.write_csv(out_dir / "pairs.csv", cols)
    store.write_csv(out_dir / "minima.csv", minima_columns(results))
    # the plane: the path with the highest certified barrier (else the highest path barrier)
    keys = [(g, j) for g in names for j in range(len(results[g]["pair"]))]
    score = [(results[g]["saddle_barrier"][j] if np.isfinite(results[g]["saddle_barrier"][j])
              else -np.inf, results[g]["path_barrier"][j]) for g, j in keys]
    group, row = keys[max(range(len(keys)), key=lambda i: score[i])]
    view = plane_view(group, results[group], row)
    n_img = results[names[0]]["path_loss"].shape[1]
    store.atomic_save_npz(out_dir / "paths.npz", {
        "group": np.repeat(np.array(names), [len(results[g]["pair"]) for g in names]),
        "pair": cols["pair"], "alignment": cols["alignment"],
        "alpha": np.linspace(0.0, 1.0, FLAGS.line_points),
        "line_loss": np.concatenate([results[g]["line_loss"] for g in names]),
        "path_loss": np.concatenate([results[g]["path_loss"] for g in names]).reshape(-1, n_img),
        "path_arc": np.concatenate([results[g]["path_arc"] for g in names]).reshape(-1, n_img),
        "climbing": np.concatenate([results[g]["climbing"] for g in names]),
        "plane_group": np.array(group), **view})

    title = {"networks": f"{FLAGS.dataset}, depth {FLAGS.depth}, l2 {FLAGS.l2:g}",
             "toy": "lecture toy y = w1·w2·x", "muller_brown": "Müller-Brown"}[FLAGS.mode]
    figure_paths(results, out_dir, title)
    figure_plane(view, group, results[group], out_dir)
    if FLAGS.mode == "networks":
        figure_barriers(cols, out_dir, title)

    for i in range(len(cols["pair"])):
        print(f"{cols['problem'][i]} [w={cols['width'][i]}] pair {cols['init_a'][i]}→"
              f"{cols['init_b'][i]} align={cols['alignment'][i]}: distance "
              f"{cols['distance'][i]:.3g}, line barrier {cols['line_barrier'][i]:.4g}, path "
              f"barrier {cols['path_barrier'][i]:.4g}, top: {cols['saddle_label'][i]} (loss "
              f"{cols['saddle_loss'][i]:.6g}, ‖g‖ {cols['saddle_grad_norm'][i]:.2g}, index "
              f"{cols['saddle_index'][i]})")
    labels = ", ".join(f"{n} {int((cols['saddle_label'] == n).sum())}" for n in SADDLE_LABELS
                       if (cols["saddle_label"] == n).any())
    print(f"tops: {labels}; on the path (descent from both sides ends on the band): "
          f"{int(cols['on_path'].astype(bool).sum())}, joining the two minima themselves: "
          f"{int(cols['connects'].astype(bool).sum())} of {len(cols['pair'])}")
    print(f"wrote {out_dir}/pairs.csv, minima.csv, paths.npz, group files and figures")


if __name__ == "__main__":
    app.run(main)
