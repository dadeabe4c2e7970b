"""The lecture's toy saddle: y = w1·w2·x on the one pair (1, 1), L = (1 − w1·w2)².

    python -m experiments.toy_saddle                               # runs/toy_saddle
    python -m experiments.toy_saddle --start=0.3,-0.2 --lr=0.1 --out_dir=runs/toy_other

Protocol (REFERENCES §1-2): exact gradient and Hessian at the origin by autodiff
(crit.hessian.dense_hessian), checked against the closed forms in crit/toy.py; eigenpairs
±2 and the escape direction (1, 1)/√2; the loss along it against L(0) + ½λt²; the
tolerance-aware classification of the saddle and of two valley minima next to a bare λ > 0
count; gradient descent from a start near the saddle. Prints the numbers, writes them to
toy_saddle.json, and draws toy_saddle_surface.png/.pdf and toy_saddle_escape.png/.pdf.

The results directory is handled like every app's (``crit.store.prepare_out_dir``): config.json
with the fingerprint first, a rerun of the same command recomputes into it, another
configuration is refused unless ``--overwrite``, and files are replaced atomically.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from experiments.provenance import environment  # noqa: F401  (config.json)

import crit  # noqa: F401  (float64 on)
from crit import plots, store, toy
from crit.hessian import dense_hessian
from crit.spectrum import classify_spectrum, default_tolerance

FLAGS = flags.FLAGS
flags.DEFINE_string("out_dir", "runs/toy_saddle", "Results directory.")
flags.DEFINE_float("lr", 0.05, "Gradient-descent learning rate.")
flags.DEFINE_integer("steps", 200, "Gradient-descent steps.")
flags.DEFINE_string("start", "0.01,0.012", "Gradient-descent start 'w1,w2' (default: near the "
                    "saddle, off the diagonal w1 = w2).")
flags.DEFINE_integer("grid_size", 201, "Points per axis of the error-surface grid.")
flags.DEFINE_float("extent", 2.0, "The surface is drawn over [-extent, extent]².")
flags.DEFINE_bool("overwrite", False, "Replace results of a different configuration in "
                  "--out_dir.")

MAX_GRID = 4001
#: Closed forms and autodiff must agree to this (absolute) accuracy, or the app stops.
CHECK_TOL = 1e-12
#: Points classified: the saddle and two minima on the valley w1·w2 = 1.
CLASSIFY_POINTS = {"origin": (0.0, 0.0), "valley_1_1": (1.0, 1.0), "valley_2_0.5": (2.0, 0.5)}
#: Distances t printed along the escape direction.
ESCAPE_TS = (0.05, 0.1, 0.2, 0.5, 1.0)
OUTPUTS = ("toy_saddle.json",)
NOT_PROTOCOL = ("out_dir", "overwrite")


def parse_start(text: str) -> tuple[float, float]:
    """'0.01,0.012' -> (0.01, 0.012). Raises ValueError naming --start."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--start={text!r}: expected two comma-separated numbers, "
                         "e.g. '0.01,0.012'") from None
    if len(values) != 2:
        raise ValueError(f"--start={text!r}: expected exactly two numbers (w1,w2), "
                         f"got {len(values)}")
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"--start={text!r}: both numbers must be finite")
    return values


def validate() -> None:
    """Every flag checked before any compute; raises app.UsageError listing all problems."""
    errors = []
    try:
        parse_start(FLAGS.start)
    except ValueError as exc:
        errors.append(str(exc))
    if not (math.isfinite(FLAGS.lr) and FLAGS.lr > 0):
        errors.append(f"--lr={FLAGS.lr}: must be a finite number > 0")
    if FLAGS.steps < 1:
        errors.append(f"--steps={FLAGS.steps}: must be >= 1")
    if not 2 <= FLAGS.grid_size <= MAX_GRID:
        errors.append(f"--grid_size={FLAGS.grid_size}: must be in [2, {MAX_GRID}]")
    if not (math.isfinite(FLAGS.extent) and FLAGS.extent > 0):
        errors.append(f"--extent={FLAGS.extent}: must be a finite number > 0")
    out = Path(FLAGS.out_dir)
    if out.exists() and not out.is_dir():
        errors.append(f"--out_dir={out}: is a file, not a directory")
    if errors:
        raise app.UsageError("\n".join(errors))


def check_close(name: str, got, want, tol: float = CHECK_TOL) -> float:
    """max |got − want|; raises RuntimeError above tol·max(1, max|want|) (autodiff vs closed
    form)."""
    want = np.asarray(want)
    err = float(np.max(np.abs(np.asarray(got) - want)))
    if not err <= tol * max(1.0, float(np.max(np.abs(want)))):
        raise RuntimeError(f"{name}: autodiff and closed form disagree by {err:.3e} > {tol:g}\n"
                           f"  autodiff:    {np.asarray(got).tolist()}\n"
                           f"  closed form: {np.asarray(want).tolist()}")
    return err


def sign_normalized(vector: np.ndarray) -> np.ndarray:
    """The eigenvector's sign is arbitrary: flip it so its largest-magnitude entry is positive."""
    vector = np.asarray(vector)
    return vector if vector[np.argmax(np.abs(vector))] >= 0 else -vector


def verdict(summary) -> str:
    """The second-order test in words, from tolerance-aware counts."""
    n_pos, n_neg, n_null = int(summary.n_pos), int(summary.n_neg), int(summary.n_null)
    if n_neg and n_pos:
        return "saddle"
    if n_null == 0:
        return "strict local minimum" if n_pos else "strict local maximum"
    if n_neg == 0:
        return f"degenerate, no negative curvature ({n_null} null)"
    return f"degenerate, no positive curvature ({n_null} null)"


@jax.jit
def local_analysis(w: jax.Array, tol_floor: jax.Array) -> dict:
    """Autodiff and closed-form derivatives at ``w``, the eigenpairs and their classification.

    The classification uses τ = max(default_tolerance(λ), tol_floor). One compiled function
    serves every point (the app's runtime is dominated by compilation, not arithmetic).
    """
    hess = dense_hessian(toy.toy_loss, w)
    lam, vecs = jnp.linalg.eigh(hess)
    tol = jnp.maximum(default_tolerance(lam), tol_floor)
    return {"loss": toy.toy_loss(w), "gradient": jax.grad(toy.toy_loss)(w), "hessian": hess,
            "closed_gradient": toy.toy_gradient(w), "closed_hessian": toy.toy_hessian(w),
            "eigenvalues": lam, "eigenvectors": vecs, "summary": classify_spectrum(lam, tol),
            "bare_positive_ratio": jnp.mean(lam > 0)}


@jax.jit
def line_losses(ts: jax.Array, direction: jax.Array):
    """L(t·u) by autodiff's loss function and by the closed form (1 − t²/2)²."""
    return jax.vmap(toy.toy_loss)(ts[:, None] * direction), toy.toy_escape_loss(ts)


def checked_analysis(point, tol_floor: float = 0.0) -> dict:
    """:func:`local_analysis` after checking autodiff against the closed forms at ``point``."""
    a = jax.tree.map(np.asarray, local_analysis(jnp.asarray(point, dtype=float),
                                                jnp.asarray(tol_floor, dtype=float)))
    a["closed_form_error"] = max(
        check_close(f"gradient at {tuple(point)}", a["gradient"], a["closed_gradient"]),
        check_close(f"Hessian at {tuple(point)}", a["hessian"], a["closed_hessian"]))
    return a


def analyze_origin() -> dict:
    """Gradient, Hessian and eigenpairs at the saddle, autodiff checked against closed forms."""
    a = checked_analysis((0.0, 0.0))
    lam = a["eigenvalues"]
    escape = sign_normalized(a["eigenvectors"][:, 0])
    err = max(a["closed_form_error"],
              check_close("eigenvalues at the origin", lam, toy.TOY_SADDLE_EIGENVALUES),
              check_close("escape direction", escape, toy.TOY_ESCAPE_DIRECTION))
    return {"gradient": a["gradient"].tolist(), "hessian": a["hessian"].tolist(),
            "eigenvalues": lam.tolist(), "escape_eigenvalue": float(lam[0]),
            "escape_direction": escape.tolist(), "closed_form_max_abs_error": err}


def escape_line(escape: np.ndarray, lam: float, ts) -> dict:
    """L(t·u), checked against the exact (1 − t²/2)², and the quadratic model L(0) + ½λt²."""
    ts = np.asarray(ts, dtype=float)
    loss, exact = map(np.asarray, line_losses(jnp.asarray(ts), jnp.asarray(escape)))
    check_close("loss along the escape direction", loss, exact)
    loss0 = float(toy.toy_loss(np.zeros(2)))
    return {"t": ts.tolist(), "loss": loss.tolist(),
            "quadratic": (loss0 + 0.5 * lam * ts ** 2).tolist(), "loss_at_origin": loss0}


def classify_point(point, tol_floor: float = 0.0) -> dict:
    """Tolerance-aware classification (τ = max(P·ε·max|λ|, tol_floor)) and a bare λ > 0 count."""
    a = checked_analysis(point, tol_floor)
    s = a["summary"]
    loss = float(a["loss"])
    # L ≥ 0 everywhere, so a point with L = 0 is a global minimum whatever H says.
    note = "; L = 0: a global minimum" if loss == 0 else ""
    return {"point": list(map(float, point)), "loss": loss,
            "grad_norm": float(np.linalg.norm(a["gradient"])),
            "eigenvalues": a["eigenvalues"].tolist(),
            "tolerance": float(s.tolerance), "n_pos": int(s.n_pos), "n_neg": int(s.n_neg),
            "n_null": int(s.n_null), "min_ratio": float(s.min_ratio), "index": float(s.index),
            "null_fraction": float(s.null_fraction), "nonnull_ratio": float(s.nonnull_ratio),
            "bare_positive_ratio": float(a["bare_positive_ratio"]),
            "verdict": verdict(s) + note}


def json_ready(value):
    """Non-finite floats -> None (strict JSON), recursively."""
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_ready(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def run_config() -> dict:
    own = {f.name: f.value for f in FLAGS.get_flags_for_module(sys.modules[__name__])}
    protocol = {k: v for k, v in own.items() if k not in NOT_PROTOCOL}
    return {"experiment": "toy_saddle", "protocol": protocol, "flags": own,
            "environment": environment()}


def fmt(values) -> str:
    return "(" + ", ".join(f"{v:+.6g}" for v in np.ravel(values)) + ")"


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    validate()
    start = parse_start(FLAGS.start)
    out_dir = Path(FLAGS.out_dir)
    try:
        store.prepare_out_dir(out_dir, run_config(), FLAGS.overwrite, outputs=OUTPUTS,
                              chunked=False)
    except store.ResultsDirError as exc:
        raise app.UsageError(str(exc)) from None

    origin = analyze_origin()
    escape = np.asarray(origin["escape_direction"])
    lam_escape = origin["escape_eigenvalue"]
    h = origin["hessian"]
    print("Toy network y = w1·w2·x, pair (1, 1): L = (1 − w1·w2)²")
    print(f"origin: gradient {fmt(origin['gradient'])}, Hessian [[{h[0][0]:+g}, {h[0][1]:+g}], "
          f"[{h[1][0]:+g}, {h[1][1]:+g}]]  (autodiff = closed form to "
          f"{origin['closed_form_max_abs_error']:.1e})")
    print(f"  eigenvalues {fmt(origin['eigenvalues'])}; escape eigenpair λ = {lam_escape:+g}, "
          f"u = {fmt(escape)} = (1, 1)/√2")

    t_plot = np.linspace(-FLAGS.extent, FLAGS.extent, 401)
    both = escape_line(escape, lam_escape, np.concatenate([ESCAPE_TS, t_plot]))  # one compile
    k = len(ESCAPE_TS)
    line = {key: v[:k] if isinstance(v, list) else v for key, v in both.items()}
    curve = {key: v[k:] if isinstance(v, list) else v for key, v in both.items()}
    print("  along u:   t     L(t·u)    (1 − t²/2)²   L(0) + ½λt²")
    for t, loss, quad in zip(line["t"], line["loss"], line["quadratic"]):
        print(f"        {t:6.2f}  {loss:9.6f}  {(1 - t * t / 2) ** 2:11.6f}  {quad:11.6f}")
    decreasing = bool(np.all(np.diff([line["loss_at_origin"], *line["loss"]]) < 0))
    print(f"  loss strictly decreasing along u for t in (0, {ESCAPE_TS[-1]}]: {decreasing}")

    classes = {}
    print("classification, τ = P·ε₆₄·max|λ| (null iff |λ| ≤ τ), vs a bare λ > 0 count:")
    for name, point in CLASSIFY_POINTS.items():
        c = classes[name] = classify_point(point)
        print(f"  {name} {fmt(point)}: L = {c['loss']:g}, ‖g‖ = {c['grad_norm']:.1e}, "
              f"λ = {fmt(c['eigenvalues'])}, τ = {c['tolerance']:.1e} -> {c['verdict']}\n"
              f"      n_pos {c['n_pos']}, n_neg {c['n_neg']}, n_null {c['n_null']}; "
              f"min ratio {c['min_ratio']:.2f}, index {c['index']:.2f}, non-null ratio "
              f"{c['nonnull_ratio']:.2f}; bare λ > 0 ratio {c['bare_positive_ratio']:.2f}")
    print("  A bare λ > 0 count gives ratio 0.5 at the saddle and at the minima alike (the "
          "valley's 0 is not > 0, and in float its rounding decides); with τ they separate: "
          "index 0.5 vs 0, n_null 0 vs 1.")

    gd_path, gd_losses = toy.gradient_descent_path(toy.toy_loss, jnp.asarray(start), FLAGS.lr,
                                                   FLAGS.steps)
    gd_path, gd_losses = np.asarray(gd_path), np.asarray(gd_losses)
    end = gd_path[-1]
    finite = bool(np.all(np.isfinite(gd_path)) and np.all(np.isfinite(gd_losses)))
    gd = {"start": list(start), "lr": FLAGS.lr, "steps": FLAGS.steps, "end": end.tolist(),
          "final_loss": float(gd_losses[-1]), "end_w1w2": float(end[0] * end[1]),
          "balance_start": float(toy.toy_balance(gd_path[0])),
          "balance_end": float(toy.toy_balance(end)), "finite": finite}
    print(f"gradient descent from {fmt(start)}, lr {FLAGS.lr:g}, {FLAGS.steps} steps: end "
          f"{fmt(end)}, w1·w2 = {gd['end_w1w2']:.6g}, loss {gd['final_loss']:.3e}; "
          f"w1² − w2² {gd['balance_start']:+.3e} -> {gd['balance_end']:+.3e}")
    if finite:
        # The end is only approximately critical: its null eigenvalue is O(‖g‖) (on this toy
        # |λ_null| ≈ 2‖g‖/‖w‖³, ‖g‖/√2 near (1, 1)), not covered by the default τ ~ ε·max|λ|.
        gd["end_classification"] = c = classify_point(tuple(end))
        gd["end_classification_tau_grad"] = c2 = classify_point(tuple(end), c["grad_norm"])
        print(f"  end point: ‖g‖ = {c['grad_norm']:.1e}, λ = {fmt(c['eigenvalues'])}")
        for label, x in (("default τ", c), ("τ = max(default, ‖g‖)", c2)):
            print(f"      {label} = {x['tolerance']:.1e}: n_pos {x['n_pos']}, n_neg {x['n_neg']}, "
                  f"n_null {x['n_null']} -> {x['verdict']}")
    else:
        print("  warning: gradient descent diverged (non-finite iterates); lower --lr")

    axis = np.linspace(-FLAGS.extent, FLAGS.extent, FLAGS.grid_size)
    w1, w2 = np.meshgrid(axis, axis)
    grid = jnp.stack([w1.ravel(), w2.ravel()], axis=1)
    loss_grid = np.asarray(jax.jit(jax.vmap(toy.toy_loss))(grid)).reshape(w1.shape)
    plots.toy_surface_figure(w1, w2, loss_grid, gd_path, escape, out_dir)
    plots.toy_escape_figure(t_plot, np.asarray(curve["loss"]), np.asarray(curve["quadratic"]),
                            gd_losses, out_dir, lam=lam_escape, lr=FLAGS.lr)
    record = {"experiment": "toy_saddle",
              "flags": {"lr": FLAGS.lr, "steps": FLAGS.steps, "start": list(start),
                        "grid_size": FLAGS.grid_size, "extent": FLAGS.extent},
              "origin": origin, "escape_line": line | {"decreasing": decreasing},
              "classification": classes, "gradient_descent": gd}
    store.atomic_write_text(out_dir / "toy_saddle.json",
                            json.dumps(json_ready(record), indent=2, allow_nan=False) + "\n")
    print(f"wrote {out_dir}/toy_saddle.json, toy_saddle_surface.png/.pdf, "
          "toy_saddle_escape.png/.pdf")


if __name__ == "__main__":
    app.run(main)
