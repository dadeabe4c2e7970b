"""CLI tests of the landscape apps: tiny runs write every file with the right shapes; bad flags stop
before any compute; a run killed by SIGKILL and rerun with the same command writes the same data.

Each app runs in its own process (absl flags are global). All runs (the tiny runs, the bad-flag
runs, and for every app a run killed as soon as its config.json exists followed by the same
command again) are started together by one module fixture and waited on by the tests, so the
JAX start-up and compile times overlap. The uninterrupted tiny runs are the references of the
killed-and-rerun ones.
"""

from __future__ import annotations

import csv
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import crit  # noqa: F401  (float64)
from crit.hessian import flat_loss
from crit.problems import mlp_problem
from tests.app_runner import assert_same_results, kill_when, run_app, start_app

SMALL_SINC = ["--dataset=sinc", "--widths=4", "--n_points=32"]
P_SINC = 1 * 4 + 4 + 4 * 1 + 1  # 1-4-1 MLP

TINY = {
    "trajectory_pca": SMALL_SINC + ["--num_runs=2", "--train_steps=20", "--record_every=5",
                                    "--annotate_every=2"],
    "training_curves": SMALL_SINC + ["--num_runs=2", "--train_steps=20", "--log_every=5",
                                     "--finder_steps=3"],
    "interpolation": ["--widths=4", "--n_points=200", "--epochs=2", "--small_batch=16",
                      "--large_batch=64", "--num_runs=2", "--num_alphas=7", "--zoom_points=5",
                      "--record_every=4", "--vmap_width=3"],
    "surface_2d": SMALL_SINC + ["--train_steps=20", "--record_every=5", "--finder_steps=2",
                                "--grid=5", "--vmap_width=7", "--directions=hessian"],
    "sharpness": ["--widths=4", "--n_points=128", "--batch_sizes=64,16", "--epochs=1",
                  "--num_runs=2", "--sharpness_samples=2", "--ascent_steps=2",
                  "--vmap_width=16"],
    "toy_saddle": ["--grid_size=21", "--steps=20"],
}
# More tiny runs: λ_max from Lanczos on the sharpness models of the dense reference run.
EXTRA = {"sharpness_lanczos": ("sharpness", TINY["sharpness"] + ["--dense_max_params=1",
                                                                  "--lanczos_steps=40"])}

FIGURES = {
    "trajectory_pca": ["trajectory_pca"],
    "training_curves": ["training_curves"],
    "interpolation": ["interpolation", "interpolation_zoom", "trajectory_projection"],
    "surface_2d": ["surface_contour", "surface_3d"],
    "sharpness": ["sharpness"],
    "toy_saddle": ["toy_saddle_surface", "toy_saddle_escape"],
}
DATA = {
    "trajectory_pca": ["trajectories.npz", "runs.csv"],
    "training_curves": ["curves.npz", "runs.csv"],
    "interpolation": ["lines.npz", "lines.csv", "models.csv", "projection.npz"],
    "surface_2d": ["surface.npz"],
    "sharpness": ["sharpness.npz", "sharpness.csv"],
    "toy_saddle": ["toy_saddle.json"],
}

# (app, arguments, texts the error must contain). Shared flags an app has no use for are refused
# (they used to be accepted and ignored).
BAD = [
    ("trajectory_pca", ["--layer=Dense_7", "--grad_tol=1e-3", "--log_every=3"],
     ("--layer", "--grad_tol: does not apply", "--log_every: does not apply")),
    ("training_curves", ["--num_runs=0", "--eig_tol=1e-3"],
     ("--num_runs", "--eig_tol: does not apply")),
    ("interpolation", ["--zoom=1.1,0.9", "--train_steps=10", "--finder=gradnorm"],
     ("--zoom", "--train_steps: does not apply", "--finder: does not apply")),
    ("surface_2d", ["--grid=2", "--flat_tol=0.5"], ("--grid", "--flat_tol: does not apply")),
    ("surface_2d", ["--directions=hessian", "--widths=80,80"], ("--directions=hessian",)),
    ("sharpness", ["--batch_sizes=32,0", "--grad_tol=1e-3"],
     ("--batch_sizes", "--grad_tol: does not apply")),
    ("sharpness", ["--widths=4", "--n_points=128", "--batch_sizes=64,16", "--lanczos_steps=5"],
     ("--lanczos_steps: does not apply",)),
]


def kill_and_rerun(app: str, out_dir: Path):
    """SIGKILL the app's tiny run once its config.json exists (compute has begun), then run the
    same command to the end. Returns (None, finished process) or (the kill's error, None)."""
    args = [f"--out_dir={out_dir}", *TINY[app]]
    try:
        kill_when(app, args, ready=lambda: (out_dir / "config.json").exists())
    except AssertionError as exc:
        return exc, None
    return None, run_app(app, *args, check=False)


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """Start every run at once. Returns {"runs": {key: (out_dir, rc, out, err)},
    "resumed": {app: (out_dir, kill error or None, rerun process or None)}}."""
    base = tmp_path_factory.mktemp("apps")
    with ThreadPoolExecutor(len(TINY)) as pool:
        resumed = {app: pool.submit(kill_and_rerun, app, base / "killed" / app) for app in TINY}
        procs = {app: (base / app, start_app(app, f"--out_dir={base / app}", *args))
                 for app, args in TINY.items()}
        procs |= {key: (base / key, start_app(app, f"--out_dir={base / key}", *args))
                  for key, (app, args) in EXTRA.items()}
        for j, (app, args, _) in enumerate(BAD):
            procs[f"bad{j}"] = (base / f"bad{j}", start_app(app, f"--out_dir={base / f'bad{j}'}",
                                                            *args))
        runs = {}
        for key, (out_dir, proc) in procs.items():
            out, err = proc.communicate(timeout=300)
            runs[key] = (out_dir, proc.returncode, out, err)
        resumed = {app: (base / "killed" / app, *f.result()) for app, f in resumed.items()}
    return {"runs": runs, "resumed": resumed}


@pytest.fixture(scope="module")
def runs(batch):
    return batch["runs"]


def finished(runs, app, key=None):
    out_dir, rc, out, err = runs[key or app]
    assert rc == 0, f"{app} failed:\n{err[-3000:]}"
    expected = {"config.json", *DATA[app], *(f"{s}.{e}" for s in FIGURES[app] for e in ("png", "pdf"))}
    # .lock: the results directory's lock file (crit.store.lock_out_dir)
    assert {p.name for p in out_dir.iterdir()} - {".lock"} == expected
    for name in expected:
        assert (out_dir / name).stat().st_size > 0, name
    config = json.loads((out_dir / "config.json").read_text())
    assert config["experiment"] == app and "protocol" in config and "environment" in config
    return out_dir


def npz(path):
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def csv_rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_trajectory_pca(runs):
    out = finished(runs, "trajectory_pca")
    d = npz(out / "trajectories.npz")
    np.testing.assert_array_equal(d["step"], [0, 5, 10, 15, 20])
    assert d["loss"].shape == d["grad_norm"].shape == (2, 5)
    assert d["params"].shape == (2, 5, P_SINC)
    assert d["coords_model"].shape == d["coords_layer"].shape == (2, 5, 2)
    assert d["components_model"].shape == (2, P_SINC)
    assert d["components_layer"].shape == (2, 1 * 4 + 4)  # Dense_0: kernel (1, 4) + bias (4,)
    assert np.all(np.isfinite(d["loss"])) and d["loss"][:, -1].max() < d["loss"][:, 0].max()
    # Independent PCA of the stored snapshots: centred, SVD, projections (signs may differ).
    x = d["params"].reshape(-1, P_SINC)
    _, sv, vt = np.linalg.svd(x - x.mean(axis=0), full_matrices=False)
    np.testing.assert_allclose(d["explained_variance_ratio_model"], sv[:2] ** 2 / np.sum(sv ** 2),
                               rtol=1e-10)
    np.testing.assert_allclose(np.abs(d["components_model"] @ vt[:2].T), np.eye(2), atol=1e-8)
    np.testing.assert_allclose(d["coords_model"].reshape(-1, 2),
                               (x - x.mean(axis=0)) @ d["components_model"].T, atol=1e-10)
    for part in ("model", "layer"):  # shares of the total variance, first two components
        ratio = d[f"explained_variance_ratio_{part}"]
        assert ratio.shape == (2,) and np.all(ratio >= 0) and ratio.sum() <= 1 + 1e-12
        assert ratio[0] >= ratio[1]
    assert len(csv_rows(out / "runs.csv")) == 2


def test_training_curves(runs):
    out = finished(runs, "training_curves")
    d = npz(out / "curves.npz")
    np.testing.assert_array_equal(d["train_step"], [0, 5, 10, 15, 20])
    assert d["train_loss"].shape == d["train_grad_norm"].shape == (2, 5)
    np.testing.assert_array_equal(d["finder_iteration"], [0, 1, 2, 3])
    assert d["finder_grad_norm"].shape == (2, 4)
    # the finder starts where training stopped, and Newton never increases ‖∇L‖
    np.testing.assert_allclose(d["finder_grad_norm"][:, 0], d["start_grad_norm"])
    assert np.all(d["final_grad_norm"] <= d["start_grad_norm"])
    rows = csv_rows(out / "runs.csv")
    assert [r["finder"] for r in rows] == ["newton", "newton"]


def test_interpolation(runs):
    out = finished(runs, "interpolation")
    d = npz(out / "lines.npz")
    n_lines = 2 + 1 + 1  # init->solution ×2, solution 0->1, small->large batch
    assert list(d["kind"]) == ["init_to_solution"] * 2 + ["solution_to_solution",
                                                          "small_to_large_batch"]
    assert d["alpha"].shape == (n_lines, 7)
    np.testing.assert_allclose(d["alpha"][0, [0, -1]], [-0.5, 2.0])
    np.testing.assert_allclose(d["alpha"][-1, [0, -1]], [-1.0, 2.0])
    for key in ("train_loss", "test_loss", "train_acc", "test_acc"):
        assert d[key].shape == (n_lines, 7)
        assert d[f"zoom_{key}"].shape == (n_lines, 5)
    assert np.all((d["train_acc"] >= 0) & (d["train_acc"] <= 1))
    p = npz(out / "projection.npz")
    steps = 2 * (200 // 16)
    np.testing.assert_array_equal(p["step"], np.arange(0, steps + 1, 4))
    assert p["x"].shape == p["y"].shape == p["train_loss"].shape == (2, len(p["step"]))
    np.testing.assert_allclose(p["x"][:, 0], 0, atol=1e-12)  # starts at θ0
    np.testing.assert_allclose(p["y"][:, -1], 0, atol=1e-8)  # ends on the line, at θ*
    np.testing.assert_allclose(p["x"][:, -1], p["distance"])
    assert len(csv_rows(out / "lines.csv")) == n_lines
    models = csv_rows(out / "models.csv")
    assert [int(r["batch_size"]) for r in models] == [16, 16, 64]


def test_surface_2d(runs):
    out = finished(runs, "surface_2d")
    d = npz(out / "surface.npz")
    assert d["loss"].shape == (5, 5) and np.all(np.isfinite(d["loss"]))
    np.testing.assert_allclose(d["alpha"], np.linspace(-1, 1, 5))
    np.testing.assert_allclose(d["loss"][2, 2], d["loss_star"], rtol=1e-12)  # centre is θ*
    assert d["theta_star"].shape == d["d1"].shape == d["d2"].shape == (P_SINC,)
    lam = d["hessian_eigenvalues"]
    assert lam.shape == (P_SINC,)
    # --directions=hessian: unit eigenvectors of the two largest eigenvalues of the Hessian at
    # θ*, checked against a Hessian computed here (jax.hessian of the same problem).
    problem = mlp_problem("sinc", widths=(4,), n_points=32)
    f, _, _ = flat_loss(problem.loss_fn, problem.init_fn(jax.random.PRNGKey(0)))
    hess = np.asarray(jax.hessian(f)(jnp.asarray(d["theta_star"])))
    np.testing.assert_allclose(lam, np.linalg.eigvalsh(hess), atol=1e-12 * np.abs(lam).max())
    for v, value in ((d["d1"], lam[-1]), (d["d2"], lam[-2])):
        np.testing.assert_allclose(v @ v, 1.0, rtol=1e-12)
        np.testing.assert_allclose(hess @ v, value * v, atol=1e-10 * np.abs(lam).max())
    assert lam[-1] > lam[-2]
    # a grid point: L(θ* + α d1 + β d2) at the corner α = β = −1, evaluated here
    np.testing.assert_allclose(d["loss"][0, 0], f(jnp.asarray(d["theta_star"] - d["d1"] - d["d2"])),
                               rtol=1e-12)
    n_path = 5 + 1  # snapshots at steps 0, 5, ..., 20, then θ*
    assert d["path_alpha"].shape == d["path_beta"].shape == d["path_residual"].shape == (n_path,)
    np.testing.assert_allclose([d["path_alpha"][-1], d["path_beta"][-1]], 0, atol=1e-10)


def test_sharpness(runs):
    out = finished(runs, "sharpness")
    rows = csv_rows(out / "sharpness.csv")
    assert [int(r["batch_size"]) for r in rows] == [16, 16, 64, 64]
    assert [r["hessian_method"] for r in rows] == ["dense"] * 4
    d = npz(out / "sharpness.npz")
    p = 64 * 4 + 4 + 4 * 10 + 10
    assert d["eigenvalues"].shape == (4, p)
    np.testing.assert_allclose(d["lambda_max"], d["eigenvalues"][:, -1])
    assert np.all(np.isnan(d["lambda_max_residual"]))  # exact eigenvalues: no residual
    assert np.all(d["sharpness_increase"] >= 0) and np.all(d["sensitivity"] > 0)
    np.testing.assert_array_equal(d["steps"], [128 // 16] * 2 + [128 // 64] * 2)


def test_sharpness_lanczos_lambda_max_is_the_largest_eigenvalue(runs):
    """P > --dense_max_params: λ_max is the largest Ritz value of Lanczos (power iteration used
    to give the eigenvalue of largest magnitude), within its residual of eigvalsh's largest."""
    out = finished(runs, "sharpness", "sharpness_lanczos")
    dense = npz(runs["sharpness"][0] / "sharpness.npz")
    d = npz(out / "sharpness.npz")
    assert [r["hessian_method"] for r in csv_rows(out / "sharpness.csv")] == ["lanczos40"] * 4
    assert "eigenvalues" not in d
    exact, rho = dense["eigenvalues"][:, -1], d["lambda_max_residual"]
    assert np.all(rho <= 1e-8 * np.abs(exact))  # converged
    # the same models (training does not depend on how λ_max is computed)
    np.testing.assert_allclose(d["train_loss"], dense["train_loss"], rtol=1e-13)
    assert np.all(np.abs(d["lambda_max"] - exact) <= rho + 1e-12 * np.abs(exact))


def test_toy_saddle(runs):
    out = finished(runs, "toy_saddle")
    escape = np.array([1.0, 1.0]) / np.sqrt(2.0)
    rec = json.loads((out / "toy_saddle.json").read_text())
    o = rec["origin"]
    np.testing.assert_allclose(o["gradient"], [0.0, 0.0], atol=1e-15)
    np.testing.assert_allclose(o["hessian"], [[0.0, -2.0], [-2.0, 0.0]], atol=1e-15)
    np.testing.assert_allclose(o["eigenvalues"], [-2.0, 2.0], atol=1e-14)
    np.testing.assert_allclose(o["escape_direction"], escape, atol=1e-14)
    assert rec["escape_line"]["decreasing"] is True
    c = rec["classification"]
    assert (c["origin"]["n_pos"], c["origin"]["n_neg"], c["origin"]["n_null"]) == (1, 1, 0)
    assert c["origin"]["verdict"] == "saddle"
    for key in ("valley_1_1", "valley_2_0.5"):
        assert (c[key]["n_pos"], c[key]["n_neg"], c[key]["n_null"]) == (1, 0, 1)
    for v in c.values():
        assert v["bare_positive_ratio"] == 0.5 and v["min_ratio"] == 0.5
    gd = rec["gradient_descent"]
    assert gd["steps"] == 20 and gd["start"] == [0.01, 0.012] and gd["finite"] is True
    # 20 steps of w <- w - lr·∇L by hand, with the closed-form gradient of (1 - w1·w2)²
    w = np.array([0.01, 0.012])
    for _ in range(20):
        r = 1.0 - w[0] * w[1]
        w = w - 0.05 * (-2.0 * r * w[::-1])
    np.testing.assert_allclose(gd["end"], w, rtol=1e-12)
    np.testing.assert_allclose(gd["final_loss"], (1.0 - w[0] * w[1]) ** 2, rtol=1e-10)
    config = json.loads((out / "config.json").read_text())
    assert config["protocol"] == {"lr": 0.05, "steps": 20, "start": "0.01,0.012",
                                  "grid_size": 21, "extent": 2.0}


@pytest.mark.parametrize("j", range(len(BAD)), ids=[f"{a}:{t[0]}" for a, _, t in BAD])
def test_bad_flags_stop_before_compute(runs, j):
    app, _, texts = BAD[j]
    out_dir, rc, out, err = runs[f"bad{j}"]
    assert rc != 0
    for text in texts:
        assert text in err, err[-2000:]
    assert not out_dir.exists(), "a rejected run must not create its output directory"


@pytest.mark.parametrize("app", list(TINY))
def test_killed_run_rerun_gives_the_same_files(batch, app):
    """SIGKILL once config.json exists (during compute), then the same command: the rerun is
    accepted and writes data files identical to the uninterrupted run's."""
    out_dir, kill_error, proc = batch["resumed"][app]
    assert kill_error is None, str(kill_error)
    assert proc.returncode == 0, f"{app} rerun failed:\n{proc.stderr[-3000:]}"
    reference = finished(batch["runs"], app)
    compared = assert_same_results(reference, out_dir)
    assert compared == sorted(["config.json", *DATA[app]])


@pytest.mark.parametrize("app", ["interpolation", "surface_2d", "sharpness"])
def test_vmap_width_is_in_the_fingerprint(runs, app):
    """--vmap_width (it was --chunk_size, "never changes results", kept out of the fingerprint)
    is the width of the evaluations' vmap, and XLA rounds another width differently: it must
    be in the fingerprint, or a rerun with another value would resume and mix numbers."""
    protocol = json.loads((finished(runs, app) / "config.json").read_text())["protocol"]
    assert "vmap_width" in protocol and "chunk_size" not in protocol


def test_rerun_with_another_vmap_width_is_refused(runs):
    out = finished(runs, "surface_2d")
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".npz", ".json")}
    args = [a for a in TINY["surface_2d"] if not a.startswith("--vmap_width")]
    proc = run_app("surface_2d", f"--out_dir={out}", *args, "--vmap_width=5", check=False)
    assert proc.returncode != 0 and "different configuration" in proc.stderr
    assert "vmap_width" in proc.stderr
    assert before == {p.name: p.read_bytes() for p in out.iterdir()
                      if p.suffix in (".npz", ".json")}


@pytest.mark.parametrize("app", ["trajectory_pca", "training_curves", "interpolation",
                                 "surface_2d", "sharpness"])
def test_fingerprint_holds_no_unused_flag(runs, app):
    """Shared flags an app refuses are not part of what changes its numbers."""
    protocol = json.loads((finished(runs, app) / "config.json").read_text())["protocol"]
    unused = {"trajectory_pca": {"log_every", "finder", "grad_tol", "flat_tol", "eig_tol"},
              "training_curves": {"flat_tol", "eig_tol"},
              "interpolation": {"train_steps", "log_every", "finder", "grad_tol", "eig_tol"},
              "surface_2d": {"log_every", "flat_tol", "eig_tol"},
              "sharpness": {"train_steps", "log_every", "finder", "grad_tol", "eig_tol"}}[app]
    assert not unused & set(protocol)
