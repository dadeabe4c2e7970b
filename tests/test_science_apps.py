"""experiments.index_vs_error and experiments.minima_vs_size on tiny configurations: files,
columns, nothing dropped, and bad flags refused before any compute."""

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

# Opt-in (pytest --runslow): written this session, not yet timed and verified in CI.
pytestmark = pytest.mark.slow


ROOT = Path(__file__).resolve().parents[1]
STATUSES = {"critical", "not_converged", "gradient_flat", "diverged"}
TINY_SEARCH = ["--num_inits=3", "--train_steps=60", "--snapshot_every=30", "--prefind_steps=0",
               "--finder_steps=8"]  # no ½‖g‖² stage: one compile less (tested in test_saddles)


def run_app(module, *args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


# ----------------------------------------------------------------------------- index_vs_error

@pytest.fixture(scope="module")
def ive_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ive") / "run"
    proc = run_app("index_vs_error", *TINY_SEARCH, "--datasets=gaussian", "--phis=0.5",
                   "--gaussian_width=2", "--dim_in=2", "--bootstrap=20", f"--out_dir={out}")
    return out, proc


def test_index_vs_error_files_and_columns(ive_run):
    out, proc = ive_run
    for name in ("config.json", "points.csv", "starts.csv", "spectra.npz", "fits.json",
                 "index_vs_error.png", "index_vs_error.pdf", "spectra_histograms.png",
                 "pennington_bahri.png", "pennington_bahri.pdf"):
        assert (out / name).stat().st_size > 0, name
    starts = read_rows(out / "starts.csv")
    assert len(starts) == 3 * 3 * 2  # inits × snapshots (0, 30, 60) × noise scales (0, 0.02)
    assert {r["status"] for r in starts} <= STATUSES
    points = read_rows(out / "points.csv")
    for col in ("dataset", "phi", "loss", "energy", "index", "n_pos", "n_neg", "n_null",
                "multiplicity", "grad_norm"):
        assert col in points[0] if points else True
    certified = [r for r in starts if r["status"] == "critical"]
    assert sum(int(p["multiplicity"]) for p in points) == len(certified)
    assert all(int(r["unique_id"]) >= 0 for r in certified)
    p_count = 2 * 2 + 2 + 2 + 1
    for p in points:
        assert int(p["n_pos"]) + int(p["n_neg"]) + int(p["n_null"]) == p_count
        assert float(p["grad_norm"]) <= 1e-8
        assert float(p["index"]) == pytest.approx(int(p["n_neg"]) / p_count)
    with np.load(out / "spectra.npz") as s:
        assert s["gaussian_phi0.5_eigenvalues"].shape == (len(points), p_count)
    fits = json.loads((out / "fits.json").read_text())
    conf = fits["configurations"][0]
    assert "normalization" in fits and "½" in fits["normalization"]
    pb = conf["pennington_bahri"]
    assert pb["eps_c_theory"] == pytest.approx(0.011271, abs=1e-5)
    assert pb["minimizer_energy_theory"] == pytest.approx(0.125)
    assert sum(conf["status_counts"].values()) == len(starts)
    config = json.loads((out / "config.json").read_text())
    assert config["problems"][0]["n_params"] == p_count
    assert "normalization" in proc.stdout and "status counts" in proc.stdout


def test_index_vs_error_bad_flags_all_named_before_compute(tmp_path):
    out = tmp_path / "bad"
    proc = run_app("index_vs_error", "--phis=0.5,1.5", "--datasets=mnist", "--snapshot_every=7",
                   "--widths=4", "--eig_rtol=-1", f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    for text in ("--phis", "--datasets", "--snapshot_every", "--widths", "--eig_rtol"):
        assert text in proc.stderr, text
    assert not out.exists()


# ----------------------------------------------------------------------------- minima_vs_size

def test_minima_vs_size_files_and_columns(tmp_path):
    out = tmp_path / "mvs"
    proc = run_app("minima_vs_size", *TINY_SEARCH, "--widths_list=2", "--n_points=12",
                   "--noise_scales=0", f"--out_dir={out}")
    for name in ("config.json", "sizes.csv", "points.csv", "starts.csv", "spectra.npz",
                 "minima_vs_size.png", "minima_vs_size.pdf"):
        assert (out / name).stat().st_size > 0, name
    sizes = read_rows(out / "sizes.csv")
    p_count = 2 * 4 + 2 + 2 + 1  # default --dataset=gaussian --dim_in=4, one output
    assert [int(r["width"]) for r in sizes] == [2] and int(sizes[0]["n_params"]) == p_count
    row = sizes[0]
    assert int(row["n_starts"]) == 3 * 3
    assert sum(int(row[s]) for s in STATUSES) == int(row["n_starts"])
    assert float(row["coin_probability"]) == pytest.approx(2.0 ** -p_count)
    starts = read_rows(out / "starts.csv")
    assert len(starts) == 9 and {r["status"] for r in starts} <= STATUSES
    points = read_rows(out / "points.csv")
    assert len(points) == int(row["n_unique"])
    assert sum(int(p["is_minimum"]) for p in points) == int(row["n_minima"])
    if points:
        lo, hi = float(row["wilson_lo"]), float(row["wilson_hi"])
        assert lo <= float(row["share_minima"]) <= hi
    assert "2^-P" in proc.stdout


def test_minima_vs_size_bad_flags_all_named_before_compute(tmp_path):
    out = tmp_path / "bad"
    proc = run_app("minima_vs_size", "--widths_list=4,0", "--widths=4", "--noise_scales=-1",
                   "--num_inits=0", f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    for text in ("--widths_list", "--widths:", "--noise_scales", "--num_inits"):
        assert text in proc.stderr, text
    assert not out.exists()
