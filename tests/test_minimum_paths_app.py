"""CLI test of experiments.minimum_paths: a tiny run writes every file and column; the lecture
toy's mode finds the saddle at the origin; a rerun resumes from the per-width group files and
writes the same data; bad flags stop before any compute with messages naming them.

All first runs start together (one process each; absl flags are global) so that their JAX
start-up and compile times overlap.
"""

from __future__ import annotations

import json
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from crit.mountain_pass import SADDLE_LABELS
from crit.verdict import VERDICTS
from tests.app_runner import assert_same_results, read_rows, run_app

TINY = ["--width_sweep=2,3", "--num_pairs=1", "--n_points=16", "--train_steps=100",
        "--band_steps=100", "--climb_after=20", "--num_images=5",
        "--line_points=5", "--plane_grid=5", "--finder_steps=5", "--align=weights",
        "--connect_steps=20"]
PAIR_COLUMNS = [
    "problem", "width", "n_params", "pair", "alignment", "init_a", "init_b",
    "distance_unaligned", "distance", "min_a_loss", "min_a_grad_norm", "min_a_verdict",
    "min_b_loss", "min_b_grad_norm", "min_b_verdict", "line_barrier", "path_barrier",
    "band_converged", "band_perp_force", "band_climb_force", "band_steps", "num_images",
    "path_length", "saddle_label", "saddle_loss", "saddle_grad_norm", "saddle_index",
    "saddle_null", "saddle_lambda_min", "saddle_lambda_next", "eig_tol", "saddle_barrier",
    "saddle_displacement", "saddle_status", "on_path", "connects", "descent_path_dist",
    "finder_iterations"]
MINIMA_COLUMNS = ["width", "init_id", "loss", "grad_norm", "status", "verdict", "n_neg",
                  "n_null", "lambda_min", "lambda_max"]
FIGURES = ["minimum_paths", "minimum_paths_plane", "barrier_vs_width"]
BAD = {
    "networks": (["--width_sweep=2,x", "--num_images=2", "--band_lr=0", "--widths=4",
                  "--insert_images=-1"],
                 ["--width_sweep", "--num_images", "--band_lr", "--widths: does not apply",
                  "--insert_images"]),
    "toy": (["--mode=toy", "--l2=0.1", "--width_sweep=4"],
            ["--l2: does not apply to --mode=toy", "--width_sweep: does not apply"]),
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("minimum_paths")
    jobs = {"tiny": TINY + [f"--out_dir={root / 'tiny'}"],
            "toy": ["--mode=toy", "--line_points=21", "--plane_grid=9", "--connect_steps=300",
                    f"--out_dir={root / 'toy'}"]}
    jobs.update({f"bad_{k}": args + [f"--out_dir={root / ('bad_' + k)}"]
                 for k, (args, _) in BAD.items()})
    with ThreadPoolExecutor(len(jobs)) as pool:
        futures = {k: pool.submit(run_app, "minimum_paths", *a, check=not k.startswith("bad"))
                   for k, a in jobs.items()}
        procs = {k: f.result() for k, f in futures.items()}
    return root, procs


def test_tiny_run_writes_every_file_and_column(runs):
    root, procs = runs
    out = root / "tiny"
    for stem in FIGURES:
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == "minimum_paths" and config["protocol"]["align"] == "weights"
    rows = read_rows(out / "pairs.csv")
    assert list(rows[0]) == PAIR_COLUMNS
    assert len(rows) == 4  # 2 widths x 1 pair x (none, weights)
    assert [r["alignment"] for r in rows] == ["none", "weights"] * 2
    assert [int(r["width"]) for r in rows] == [2, 2, 3, 3]
    assert [int(r["num_images"]) for r in rows] == [5] * 4
    for r in rows:
        assert r["saddle_label"] in SADDLE_LABELS
        assert r["min_a_verdict"] in VERDICTS
        assert float(r["distance"]) <= float(r["distance_unaligned"]) + 1e-12
        assert float(r["path_barrier"]) >= 0 and float(r["line_barrier"]) >= 0
        if r["saddle_label"] == "index_1_saddle":
            assert float(r["saddle_grad_norm"]) <= 1e-8 and int(r["saddle_index"]) == 1
        if r["saddle_label"] == "no_barrier":
            assert r["saddle_loss"] == "nan" and int(r["saddle_index"]) == -1
    minima = read_rows(out / "minima.csv")
    assert list(minima[0]) == MINIMA_COLUMNS and len(minima) == 4
    with np.load(out / "paths.npz") as data:
        assert data["line_loss"].shape == (4, 5)
        assert data["path_loss"].shape == data["path_arc"].shape == (4, 5)
        assert data["plane_loss"].shape == (5, 5)
        np.testing.assert_allclose(data["path_arc"][:, 0], 0.0)
    for width, p in ((2, 9), (3, 13)):  # 2-w-1 MLPs
        with np.load(out / f"group_width_{width}.npz") as group:
            assert group["path_images"].shape == (2, 5, p)
            assert group["saddle_eigenvalues"].shape == (2, p)
    assert "tops:" in procs["tiny"].stdout


def test_toy_mode_finds_the_saddle_at_the_origin(runs):
    root, _ = runs
    (row,) = read_rows(root / "toy" / "pairs.csv")
    assert row["saddle_label"] == "index_1_saddle" and int(row["saddle_index"]) == 1
    assert abs(float(row["saddle_loss"]) - 1.0) <= 1e-8
    assert abs(float(row["saddle_barrier"]) - 1.0) <= 1e-8
    assert float(row["saddle_lambda_min"]) == pytest.approx(-2.0, abs=1e-8)
    assert float(row["saddle_lambda_next"]) == pytest.approx(2.0, abs=1e-8)
    # steepest descent from the origin ends at (1, 1) and (−1, −1)
    assert row["connects"] == "True" and row["on_path"] == "True"
    with np.load(root / "toy" / "group_toy.npz") as group:
        np.testing.assert_allclose(group["saddle_theta"][0], [0.0, 0.0], atol=1e-8)
    assert not (root / "toy" / "barrier_vs_width.png").exists()


def test_a_rerun_resumes_from_the_group_files_with_the_same_results(runs):
    root, _ = runs
    ref, out = root / "tiny", root / "resumed"
    shutil.copytree(ref, out)
    for name in ("pairs.csv", "minima.csv", "paths.npz"):
        (out / name).unlink()
    proc = run_app("minimum_paths", *TINY, f"--out_dir={out}")
    assert "width_2: resumed" in proc.stdout and "width_3: resumed" in proc.stdout
    names = assert_same_results(ref, out)
    assert {"pairs.csv", "minima.csv", "paths.npz", "group_width_3.npz"} <= set(names)


@pytest.mark.parametrize("mode", sorted(BAD))
def test_bad_flags_are_refused_before_compute(runs, mode):
    root, procs = runs
    proc = procs[f"bad_{mode}"]
    assert proc.returncode != 0
    for text in BAD[mode][1]:
        assert text in proc.stderr, (text, proc.stderr)
    assert not Path(root / f"bad_{mode}").exists()  # nothing written
