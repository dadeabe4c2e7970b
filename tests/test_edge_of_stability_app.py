"""experiments.edge_of_stability on a tiny configuration: every file and column, the summary
consistent with the stored series, --sweep=loop (the CPU default) and --sweep=vmap giving the
same results, and bad flags refused before any compute."""

import json
import math

import numpy as np
import pytest

from tests.app_runner import read_rows, run_app

# MLP 1-4-1 on 16 sinc points (P = 13), a stable and a diverging learning rate, 2 inits,
# SLQ on
TINY = ["--widths=4", "--n_points=16", "--learning_rates=0.1,0.9", "--num_inits=2",
        "--train_steps=30", "--track_every=10", "--lanczos_steps=16",
        "--cold_lanczos_steps=16", "--slq_every=2",
        "--slq_probes=2", "--slq_steps=8", "--grad_tol=5e-2"]
COLUMNS = ["learning_rate", "init_id", "optimizer", "sharpness_kind", "threshold",
           "sharpness_init", "reached_step", "sharpness_after_mean", "sharpness_after_std",
           "sharpness_after_ratio", "max_sharpness", "lambda_max_final_track",
           "lambda_min_init", "max_abs_negative_lambda_min", "step_max_abs_negative_lambda_min",
           "max_abs_negative_lambda_min_after_init", "hvps_per_track_mean", "hvps_first_track",
           "unconverged_tracks", "diverged_step", "final_loss", "final_grad_norm", "end_status",
           "end_certified", "end_index", "end_negative_fraction", "end_negative_fraction_lo",
           "end_negative_fraction_hi", "end_lambda_min", "end_lambda_max", "end_tolerance",
           "end_index_method"]
SERIES = ["loss", "track_loss", "grad_norm", "lambda_max", "lambda_min", "residual_max",
          "residual_min", "converged_max", "converged_min", "hvps", "precond_lambda_max",
          "precond_residual", "precond_converged", "precond_hvps", "slq_index", "slq_index_lo",
          "slq_index_hi", "slq_tol", "diverged_step", "final_loss", "final_grad_norm",
          "eigenvalues_end", "steps", "learning_rates", "thresholds", "sharpness_kind",
          "optimizer"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("eos") / "run"
    return out, run_app("edge_of_stability", *TINY, f"--out_dir={out}")


@pytest.fixture(scope="module")
def run_vmap(tmp_path_factory):
    out = tmp_path_factory.mktemp("eos_vmap") / "run"
    return out, run_app("edge_of_stability", *TINY, "--sweep=vmap", f"--out_dir={out}")


def test_files_columns_and_series(run):
    out, proc = run
    for name in ("config.json", "summary.csv", "series.npz", "edge_of_stability.png",
                 "edge_of_stability.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert (out / "summary.csv").read_text().splitlines()[0].split(",") == COLUMNS
    rows = read_rows(out / "summary.csv")
    assert [(float(r["learning_rate"]), int(r["init_id"])) for r in rows] == [
        (0.1, 0), (0.1, 1), (0.9, 0), (0.9, 1)]
    with np.load(out / "series.npz", allow_pickle=False) as data:
        series = {k: data[k] for k in data.files}
    assert sorted(series) == sorted(SERIES)
    np.testing.assert_array_equal(series["steps"], [0, 10, 20, 30])
    assert series["lambda_max"].shape == (2, 2, 4) and series["loss"].shape == (2, 2, 31)
    assert series["eigenvalues_end"].shape == (2, 2, 13)
    np.testing.assert_allclose(series["thresholds"], [20.0, 2 / 0.9])
    # SLQ every 2nd track, NaN elsewhere; Adam-only preconditioned series NaN for GD
    assert np.isfinite(series["slq_index"][0, :, ::2]).all()
    assert np.isnan(series["slq_index"][..., 1::2]).all()
    assert np.isnan(series["precond_lambda_max"]).all()
    for r, (i, j) in zip(rows, [(0, 0), (0, 1), (1, 0), (1, 1)]):
        lam_max, lam_min = series["lambda_max"][i, j], series["lambda_min"][i, j]
        thr = series["thresholds"][i]
        assert float(r["threshold"]) == pytest.approx(thr)
        assert float(r["sharpness_init"]) == pytest.approx(lam_max[0])
        assert float(r["max_sharpness"]) == pytest.approx(np.nanmax(lam_max))
        hit = np.flatnonzero(np.nan_to_num(lam_max, nan=-np.inf) >= thr)
        assert int(r["reached_step"]) == (int(series["steps"][hit[0]]) if hit.size else -1)
        worst = max(0.0, -np.nanmin(lam_min))
        assert float(r["max_abs_negative_lambda_min"]) == pytest.approx(worst)
        assert r["end_status"] in {"critical", "not_converged", "gradient_flat", "diverged"}
        assert r["end_certified"] == str(r["end_status"] == "critical")
        if r["end_status"] == "critical":
            assert float(r["final_grad_norm"]) <= 5e-2
            assert float(r["end_index"]) == pytest.approx(float(r["end_negative_fraction"]))
        else:
            assert math.isnan(float(r["end_index"]))
        if r["end_status"] != "diverged":
            eig = series["eigenvalues_end"][i, j]
            assert float(r["end_lambda_min"]) == pytest.approx(eig[0])
            assert float(r["end_negative_fraction"]) == pytest.approx(
                np.mean(eig < -float(r["end_tolerance"])))
    # the stable learning rate trains without diverging, the large one diverges; one end is
    # certified at this loose --grad_tol, so both branches of the certificate are exercised
    assert all(int(r["diverged_step"]) == -1 for r in rows[:2])
    assert all(r["end_status"] == "diverged" and int(r["diverged_step"]) > 0 for r in rows[2:])
    assert any(r["end_status"] == "critical" for r in rows)
    assert "tracked 4 runs one at a time" in proc.stdout


def test_sweep_loop_and_vmap_give_the_same_results(run, run_vmap):
    """--sweep=auto is the loop on CPU; on this short tiny run the vmapped program gives the same
    series (bit for bit here, where the tests run XLA with most optimizations off; with them on,
    λ_max and λ_min differed by ≤ 2e-14 relative, everything else identical). Longer runs at
    the edge of stability part (crit.tracking.make_sweep), so the resolved mode is the resume
    fingerprint: a loop run is not mixed into a vmap run's directory."""
    (out, proc), (out_v, proc_v) = run, run_vmap
    assert "sweep: loop (--sweep=auto, backend cpu)" in proc.stdout
    assert "sweep: vmap (--sweep=vmap, backend cpu)" in proc_v.stdout
    assert "tracked 4 runs in one program" in proc_v.stdout
    for path, flag, mode in ((out, "auto", "loop"), (out_v, "vmap", "vmap")):
        config = json.loads((path / "config.json").read_text())
        assert (config["flags"]["sweep"], config["protocol"]["sweep"]) == (flag, mode)
    with np.load(out / "series.npz") as a, np.load(out_v / "series.npz") as b:
        assert sorted(a.files) == sorted(b.files)
        for name in a.files:
            x, y = a[name], b[name]
            if x.dtype.kind == "f":
                scale = np.nanmax(np.abs(y)) if np.isfinite(y).any() else 1.0
                np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12 * scale, err_msg=name)
            else:
                np.testing.assert_array_equal(x, y, err_msg=name)
    loop_rows, vmap_rows = read_rows(out / "summary.csv"), read_rows(out_v / "summary.csv")
    for r, rv in zip(loop_rows, vmap_rows, strict=True):
        for column in ("reached_step", "hvps_per_track_mean", "hvps_first_track",
                       "unconverged_tracks", "diverged_step", "end_status", "end_certified"):
            assert r[column] == rv[column], column
    refused = run_app("edge_of_stability", *TINY, "--sweep=loop", f"--out_dir={out_v}",
                      check=False)
    assert refused.returncode != 0 and "(sweep: 'vmap' -> 'loop')" in refused.stderr


@pytest.mark.parametrize("args, messages", [
    (["--learning_rates=0.1,-0.2", "--train_steps=20", "--track_every=50",
      "--lanczos_steps=10", "--learning_rate=0.1", "--num_inits=0", "--slq_probes=3"],
     ["--learning_rates='0.1,-0.2': every learning rate must be a finite number > 0",
      "--track_every=50: longer than the run (--train_steps=20)",
      "--lanczos_steps=10: must be a multiple of --lanczos_block=4",
      "--learning_rate: does not apply to this app", "--num_inits=0: must be >= 1",
      "need --slq_every >= 1"]),
    (["--learning_rates=a", "--lanczos_tol=2", "--divergence_factor=1"],
     ["--learning_rates='a': expected comma-separated numbers",
      "--lanczos_tol=2.0: must be in (0, 1)", "--divergence_factor=1.0: must be"]),
    (["--sweep=both"], ["--sweep=both: value should be one of <auto|vmap|loop>"]),
])
def test_bad_flags_refused_before_compute(tmp_path, args, messages):
    out = tmp_path / "never"
    proc = run_app("edge_of_stability", *args, f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    for message in messages:
        assert message in proc.stderr, (message, proc.stderr)
    assert not out.exists()  # refused before the results directory or any compute
