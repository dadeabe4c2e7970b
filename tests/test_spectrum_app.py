"""The spectrum app end to end on a tiny network (P = 310, dense on): files, bad flags."""

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
TINY = ["--widths=4", "--n_points=64", "--train_steps=40", "--lanczos_steps=30",
        "--slq_probes=3", "--num_eigs=2", "--snapshots=0,end"]
P = 64 * 4 + 4 + 4 * 10 + 10


def run_app(*args):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", "experiments.spectrum", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spectrum") / "run"
    proc = run_app(*TINY, f"--out_dir={out}")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_files_columns_and_exact_ratio_inside_interval(tiny_run):
    out, proc = tiny_run
    for name in ("config.json", "spectrum.csv", "spectrum.npz", "spectrum_density.png",
                 "spectrum_density.pdf", "spectrum_summary.png", "spectrum_summary.pdf"):
        assert (out / name).stat().st_size > 0, name
    with open(out / "spectrum.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert [int(r["step"]) for r in rows] == [0, 40]
    for r in rows:
        lo, mid, hi = (float(r[k]) for k in ("min_ratio_lo", "min_ratio", "min_ratio_hi"))
        assert lo <= float(r["exact_min_ratio"]) <= hi and lo <= mid <= hi
        assert float(r["index_lo"]) <= float(r["exact_index"]) <= float(r["index_hi"])
        assert int(r["num_matvecs"]) == 4 * 30
        assert float(r["lambda_max"]) == pytest.approx(float(r["exact_lambda_max"]), rel=1e-8)
        # Ritz values lie inside the spectrum.
        assert float(r["lambda_min"]) >= float(r["exact_lambda_min"]) - 1e-10
    with np.load(out / "spectrum.npz", allow_pickle=False) as s:
        assert s["nodes"].shape == s["weights"].shape == (2, 3, 30)
        assert s["ritz_largest"].shape == (2, 2) and s["exact_eigenvalues"].shape == (2, P)
        np.testing.assert_allclose(s["weights"].sum(axis=2), 1.0, rtol=1e-12)
        assert s["train_loss"].shape == (40,) and list(s["step"]) == [0, 40]
        assert s["sweep_min_ratio_mean"].shape == (2, len(s["sweep_rel_tol"]))
    config = json.loads((out / "config.json").read_text())
    assert config["n_params"] == P and config["protocol"]["compare_dense"] is True
    assert config["protocol"]["snapshots"] == [0, 40]
    assert "inside the interval" in proc.stdout


def test_other_configuration_in_the_same_dir_is_refused_before_compute(tiny_run):
    out, _ = tiny_run
    before = (out / "spectrum.csv").read_bytes()
    proc = run_app(*TINY, f"--out_dir={out}", "--train_steps=41")
    assert proc.returncode != 0
    assert "--out_dir" in proc.stderr and "different configuration" in proc.stderr
    assert (out / "spectrum.csv").read_bytes() == before


@pytest.mark.parametrize("flag, bad", [("--snapshots", "0,abc"), ("--snapshots", "0,41"),
                                       ("--lanczos_steps", "1"), ("--slq_probes", "0"),
                                       ("--compare_dense", "true")])
def test_bad_flag_is_named_and_nothing_is_written(tmp_path, flag, bad):
    out = tmp_path / "run"
    args = [*TINY, f"--out_dir={out}", f"{flag}={bad}"]
    if flag == "--compare_dense":  # P = 112,810: too large for a dense Hessian
        args.append("--widths=300,300")
    proc = run_app(*args)
    assert proc.returncode != 0
    assert flag in proc.stderr
    assert not out.exists()
