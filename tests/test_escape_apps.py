"""The saddle_escape, loss_distribution and global_optimality apps on tiny configurations:
output files and their contents, the no-saddle exit, chunk invariance, bad flags."""

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


def run_app(name, *args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", f"experiments.{name}", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


def figures_exist(out, *stems):
    for stem in stems:
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"


# --- saddle_escape ------------------------------------------------------------------------------

# Init 0 of the default problem (gaussian 2-4-1 tanh, l2 = 1e-2) refined from its
# initialization lands on a certified saddle of index 4/17.
SADDLE_TINY = ["--num_inits=1", "--snapshots=0", "--num_saddles=1", "--escape_steps=20",
               "--num_random=2", "--line_points=11", "--toy_steps=2"]


def test_saddle_escape_tiny_run_krylov_path(tmp_path):
    out = tmp_path / "se"
    # --dense_max_params=1 forces the Lanczos eigenpair and the Krylov saddle-free Newton step
    proc = run_app("saddle_escape", *SADDLE_TINY, "--dense_max_params=1", "--krylov_dim=5",
                   "--lanczos_steps=17", f"--out_dir={out}")
    for name in ("config.json", "saddles.csv", "escape_line.csv", "restarts.npz",
                 "optimizers.csv", "optimizers.npz", "toys.npz"):
        assert (out / name).stat().st_size > 0, name
    figures_exist(out, "escape_line", "escape_restarts", "escape_optimizers", "toy_saddles")
    cand = rows(out / "saddles.csv")
    assert len(cand) == 1 and cand[0]["status"] == "critical" and int(cand[0]["n_neg"]) > 0
    assert cand[0]["saddle"] == "0"
    line = rows(out / "escape_line.csv")
    assert len(line) == 11
    t = np.array([float(r["t"]) for r in line])
    loss = np.array([float(r["loss"]) for r in line])
    quad = np.array([float(r["quadratic"]) for r in line])
    assert t[5] == pytest.approx(0.0, abs=1e-12) and loss[5] == pytest.approx(quad[5])
    assert np.all(np.delete(quad, 5) < quad[5])  # ½λt² < 0 both ways
    assert loss[4] < loss[5] and loss[6] < loss[5]  # the loss falls both ways near the saddle
    opt = rows(out / "optimizers.csv")
    assert len(opt) == 5 * 2 and {r["method"] for r in opt} == {"gd", "momentum", "adam", "pgd",
                                                              "sfn"}
    with np.load(out / "optimizers.npz") as z:
        assert z["sfn_loss"].shape == (1, 2, 21)
        assert z["sfn_loss"][0, :, -1].max() < z["saddle_loss"][0]  # SFN leaves the saddle
    with np.load(out / "restarts.npz") as z:
        assert z["restart_u"].shape == (1, 2, 21) and z["restart_v"].shape == (1, 2, 21)
        assert z["eigenvalue"][0] < 0
    with np.load(out / "toys.npz") as z:
        assert z["quadratic_newton_path"].shape == (3, 3, 2)
        np.testing.assert_allclose(z["quadratic_newton_path"][:, -1], 0.0, atol=1e-12)
        assert np.all(z["origin_gd_loss"] == 0) and z["origin_pgd_loss"][-1] < 0
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == "saddle_escape" and config["n_params"] == 17
    assert "Krylov, k = 5" in (out / "escape_optimizers.png").name or "saddle 0" in proc.stdout


def test_saddle_escape_says_so_when_no_saddle_is_found(tmp_path):
    out = tmp_path / "none"
    proc = run_app("saddle_escape", *SADDLE_TINY, "--finder_steps=1", f"--out_dir={out}",
                   check=False)
    assert proc.returncode == 3, proc.stderr
    assert "NO CERTIFIED SADDLE" in proc.stderr and "--num_inits" in proc.stderr
    assert rows(out / "saddles.csv")[0]["status"] != "critical"  # the candidate is still listed
    assert not (out / "optimizers.csv").exists()


# --- loss_distribution --------------------------------------------------------------------------

DIST_TINY = ["--num_inits=5", "--epochs=2", "--batch_size=200", "--n_points=600"]


def test_loss_distribution_tiny_run(tmp_path):
    out = tmp_path / "ld"
    proc = run_app("loss_distribution", *DIST_TINY, "--widths_list=3", "--chunk_size=2",
                   f"--out_dir={out}")
    figures_exist(out, "loss_histograms", "train_vs_test")
    res = rows(out / "results.csv")
    assert len(res) == 5 and [int(r["width"]) for r in res] == [3] * 5
    assert int(res[0]["n_params"]) == 16 * 3 + 3 + 3 * 10 + 10
    spread = rows(out / "spread.csv")
    assert [int(r["width"]) for r in spread] == [3]
    for r in spread:
        assert float(r["test_q05"]) <= float(r["test_q50"]) <= float(r["test_q95"])
        assert -1 <= float(r["pearson"]) <= 1 and int(r["n_runs"]) == 5
    assert "Choromanska" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["n_inputs"] == 16 and config["n_test"] == 1797 - 600
    # chunks of 2 with a padded last chunk: the runs are still the 5 distinct inits
    assert len({r["test_loss"] for r in res[:5]}) == 5


# --- global_optimality --------------------------------------------------------------------------


def test_global_optimality_tiny_run(tmp_path):
    out = tmp_path / "go"
    proc = run_app("global_optimality", "--n_points=30", "--r_max=3", "--steps=100",
                   "--polish_steps=0", "--rescale_steps=50", "--polar_starts=8",
                   "--polar_steps=20", "--baseline_restarts=1", f"--out_dir={out}")
    figures_exist(out, "objective_vs_r")
    rounds = rows(out / "rounds.csv")
    assert 1 <= len(rounds) <= 3 and [int(r["r"]) for r in rounds] == list(
        range(1, len(rounds) + 1))
    f = [float(r["objective"]) for r in rounds]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(f, f[1:]))
    base = rows(out / "baseline.csv")
    assert [int(r["r"]) for r in base] == [1, 2, 3]
    with np.load(out / "global_optimality.npz") as z:
        assert z["x"].shape == (30, 2) and z["w1"].shape == (3, 2)
    assert "objective non-increasing across rounds and additions: True" in proc.stdout
    assert json.loads((out / "config.json").read_text())["protocol"]["lam"] == 0.02


# --- bad flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,args,flag_names", [
    ("saddle_escape", ["--num_random=0", "--sfn_damping=-1", "--snapshots=a"],
     ["--num_random", "--sfn_damping", "--snapshots"]),
    ("loss_distribution", ["--widths_list=0,5", "--downsample=3", "--widths=4"],
     ["--widths_list", "--downsample", "--widths"]),
    ("global_optimality", ["--lam=0", "--r0=5", "--r_max=3", "--rtol=-1"],
     ["--lam", "--r0", "--rtol"]),
])
def test_bad_flags_stop_before_any_compute(tmp_path, name, args, flag_names):
    out = tmp_path / "bad"
    proc = run_app(name, *args, f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    for flag in flag_names:
        assert flag in proc.stderr, (flag, proc.stderr)
    assert not out.exists()
