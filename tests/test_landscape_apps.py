"""CLI tests of the landscape apps: tiny runs write every file with the right shapes; bad flags stop
before any compute.

Each app runs in its own process (absl flags are global). All tiny runs are started together by
one module fixture and waited on by the tests, so the JAX start-up and compile times overlap.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# Tests check the plumbing, not speed: skipping most XLA optimizations halves compile time.
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
       "JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}
SMALL_SINC = ["--dataset=sinc", "--widths=4", "--n_points=32"]
P_SINC = 1 * 4 + 4 + 4 * 1 + 1  # 1-4-1 MLP

TINY = {
    "trajectory_pca": SMALL_SINC + ["--num_runs=2", "--train_steps=20", "--record_every=5",
                                    "--annotate_every=2"],
    "training_curves": SMALL_SINC + ["--num_runs=2", "--train_steps=20", "--log_every=5",
                                     "--finder_steps=3"],
    "interpolation": ["--widths=4", "--n_points=200", "--epochs=2", "--small_batch=16",
                      "--large_batch=64", "--num_runs=2", "--num_alphas=7", "--zoom_points=5",
                      "--record_every=4", "--chunk_size=3"],
    "surface_2d": SMALL_SINC + ["--train_steps=20", "--record_every=5", "--finder_steps=2",
                                "--grid=5", "--chunk_size=7", "--directions=hessian"],
    "sharpness": ["--widths=4", "--n_points=128", "--batch_sizes=64,16", "--epochs=1",
                  "--num_runs=2", "--sharpness_samples=2", "--ascent_steps=2",
                  "--chunk_size=16"],
}

FIGURES = {
    "trajectory_pca": ["trajectory_pca"],
    "training_curves": ["training_curves"],
    "interpolation": ["interpolation", "interpolation_zoom", "trajectory_projection"],
    "surface_2d": ["surface_contour", "surface_3d"],
    "sharpness": ["sharpness"],
}
DATA = {
    "trajectory_pca": ["trajectories.npz", "runs.csv"],
    "training_curves": ["curves.npz", "runs.csv"],
    "interpolation": ["lines.npz", "lines.csv", "models.csv", "projection.npz"],
    "surface_2d": ["surface.npz"],
    "sharpness": ["sharpness.npz", "sharpness.csv"],
}

# (app, arguments, text the error must contain)
BAD = [
    ("trajectory_pca", ["--layer=Dense_7"], "--layer"),
    ("training_curves", ["--num_runs=0"], "--num_runs"),
    ("interpolation", ["--zoom=1.1,0.9", "--train_steps=10"], "--zoom"),
    ("surface_2d", ["--grid=2"], "--grid"),
    ("surface_2d", ["--directions=hessian", "--widths=80,80"], "--directions=hessian"),
    ("sharpness", ["--batch_sizes=32,0"], "--batch_sizes"),
]


def start(app: str, args: list[str], out_dir: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"experiments.{app}", f"--out_dir={out_dir}",
                             *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Start every tiny run and every bad-flag run at once; return {key: (out_dir, rc, out, err)}."""
    base = tmp_path_factory.mktemp("apps")
    procs = {app: (base / app, start(app, args, base / app)) for app, args in TINY.items()}
    for j, (app, args, _) in enumerate(BAD):
        procs[f"bad{j}"] = (base / f"bad{j}", start(app, args, base / f"bad{j}"))
    done = {}
    for key, (out_dir, proc) in procs.items():
        out, err = proc.communicate(timeout=300)
        done[key] = (out_dir, proc.returncode, out, err)
    return done


def finished(runs, app):
    out_dir, rc, out, err = runs[app]
    assert rc == 0, f"{app} failed:\n{err[-3000:]}"
    expected = {"config.json", *DATA[app], *(f"{s}.{e}" for s in FIGURES[app] for e in ("png", "pdf"))}
    assert {p.name for p in out_dir.iterdir()} == expected
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
    # --directions=hessian: unit, orthogonal eigenvectors of the two largest eigenvalues
    np.testing.assert_allclose([d["d1"] @ d["d1"], d["d2"] @ d["d2"], d["d1"] @ d["d2"]],
                               [1, 1, 0], atol=1e-10)
    assert lam[-1] >= lam[-2]
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
    assert np.all(d["sharpness_increase"] >= 0) and np.all(d["sensitivity"] > 0)
    np.testing.assert_array_equal(d["steps"], [128 // 16] * 2 + [128 // 64] * 2)


@pytest.mark.parametrize("j", range(len(BAD)), ids=[f"{a}:{t}" for a, _, t in BAD])
def test_bad_flags_stop_before_compute(runs, j):
    app, _, text = BAD[j]
    out_dir, rc, out, err = runs[f"bad{j}"]
    assert rc != 0
    assert text in err, err[-2000:]
    assert not out_dir.exists(), "a rejected run must not create its output directory"
