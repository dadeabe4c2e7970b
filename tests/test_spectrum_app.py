"""The spectrum app end to end on a tiny network (P = 310): the dense comparison and the
Krylov-only columns, resuming after SIGKILL, refused configurations, bad flags."""

import json

import numpy as np
import pytest

from tests import app_runner
from tests.app_runner import assert_same_results, kill_when, read_rows, run_app

# τ = 1e-2 (about 0.3% of λ_max) keeps the 3-probe SLQ intervals narrower than [0, 1], so the
# exact fractions landing inside them is a real check.
TINY = ["--widths=4", "--n_points=64", "--train_steps=40", "--lanczos_steps=30",
        "--slq_probes=3", "--num_eigs=2", "--snapshots=0,end", "--eig_tol=1e-2"]
P = 64 * 4 + 4 + 4 * 10 + 10
ESTIMATES = ("min_ratio_est", "min_ratio_lo", "min_ratio_hi", "index_est", "index_lo",
             "index_hi", "null_fraction_est", "null_fraction_lo", "null_fraction_hi")
KRYLOV_COLUMNS = ["step", "loss", "grad_norm", "verdict", "negative_proven", "lambda_min_bound",
                  "ritz_min_residual", "negative_excluded_below", "lambda_min", "lambda_max",
                  "lambda_min_converged", "lambda_max_converged", *ESTIMATES, "resolved",
                  "tolerance", "tolerance_rel", "machine_tolerance", "num_deflated",
                  "probe_steps", "num_matvecs"]
CDF = [f"cdf_{name}_{part}" for name in ("min_ratio", "index", "null_fraction")
       for part in ("est", "lo", "hi")]
NPZ_KEYS = ["step", "n_params", "nodes", "weights", "node_residuals", "node_valid",
            "node_coupling", "probe_mass", "deflated", "slack", "ritz_largest", "ritz_largest_residuals",
            "ritz_smallest", "ritz_smallest_residuals", "escape_direction", "tolerance",
            "grid_tolerance", "train_step", "train_loss", "train_grad_norm", "grid", "density",
            "log_grid", "log_density_pos", "log_density_neg", *CDF]
DENSE_COLUMNS = ["n_pos", "n_neg", "n_null", "min_ratio", "index", "null_fraction",
                 "exact_lambda_min", "exact_lambda_max", "dense_verdict"]
GRID = 23  # crit.krylov.REL_TOL_GRID


def spectrum(*args, **kw):
    return run_app("spectrum", *args, env=app_runner.ENV, **kw)


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spectrum") / "dense"  # --compare_dense is on for P <= 3000
    return out, spectrum(*TINY, f"--out_dir={out}")


@pytest.fixture(scope="module")
def krylov_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("spectrum") / "krylov"
    return out, spectrum(*TINY, "--compare_dense=false", f"--out_dir={out}")


def test_dense_run_writes_exact_counts_beside_the_estimates(dense_run):
    out, proc = dense_run
    for name in ("config.json", "spectrum.csv", "spectrum_cdf.csv", "spectrum.npz",
                 "spectrum_density.png", "spectrum_density.pdf", "spectrum_summary.png",
                 "spectrum_summary.pdf", "spectrum_cdf.png", "spectrum_cdf.pdf",
                 "chunks/chunk_0000000_000001.npz", "chunks/chunk_0000001_000001.npz"):
        assert (out / name).stat().st_size > 0, name
    rows = read_rows(out / "spectrum.csv")
    assert list(rows[0]) == KRYLOV_COLUMNS + DENSE_COLUMNS
    assert [int(r["step"]) for r in rows] == [0, 40]
    with np.load(out / "spectrum.npz", allow_pickle=False) as s:
        assert sorted(s.files) == sorted(NPZ_KEYS + ["exact_eigenvalues"] + [
            f"cdf_exact_{n}" for n in ("min_ratio", "index", "null_fraction")])
        eigs = s["exact_eigenvalues"]
        assert eigs.shape == (2, P) and int(s["n_params"]) == P
        assert s["density"].shape == s["grid"].shape == (2, 2000)
        assert s["log_density_pos"].shape == s["log_grid"].shape == (2, 600)
        assert np.all(s["density"] >= 0) and np.all(np.diff(s["grid"], axis=1) > 0)
        np.testing.assert_array_equal(s["tolerance"], [1e-2, 1e-2])
        lambda_max = [float(r["lambda_max"]) for r in rows]
        np.testing.assert_array_equal(s["ritz_largest"][:, 0], lambda_max)
        assert np.all(s["ritz_largest_residuals"] >= 0) and s["node_valid"].dtype == bool
        assert s["nodes"].shape == s["weights"].shape == (2, 3, 30)
        assert s["ritz_largest"].shape == (2, 2)
        np.testing.assert_allclose(s["weights"].sum(axis=2), 1.0, rtol=1e-12)
        # --log_every (10 here, the app's default) thins the recorded training curve
        assert list(s["train_step"]) == [0, 10, 20, 30] and s["train_loss"].shape == (4,)
        assert np.all(np.isfinite(s["train_loss"])) and s["train_loss"][-1] < s["train_loss"][0]
        assert list(s["step"]) == [0, 40]
        assert s["cdf_min_ratio_est"].shape == s["grid_tolerance"].shape == (2, GRID)
        assert s["escape_direction"].shape == (2, P)
        np.testing.assert_allclose(np.linalg.norm(s["escape_direction"], axis=1), 1.0)
        # the exact fractions on the τ grid lie inside the SLQ intervals at every τ
        for name in ("min_ratio", "index", "null_fraction"):
            exact, lo, hi = (s[f"cdf_{k}"] for k in (f"exact_{name}", f"{name}_lo",
                                                     f"{name}_hi"))
            assert np.all((lo <= exact + 1e-12) & (exact <= hi + 1e-12)), name
    assert float(rows[1]["loss"]) < float(rows[0]["loss"])
    for j, r in enumerate(rows):
        assert float(r["grad_norm"]) > 0 and r["lambda_max_converged"] == "True"
        assert r["lambda_min_converged"] in ("True", "False")
        tau = float(r["tolerance"])
        assert tau == 1e-2
        counts = [int(r[k]) for k in ("n_pos", "n_neg", "n_null")]
        assert counts == [int(np.sum(eigs[j] > tau)), int(np.sum(eigs[j] < -tau)),
                          int(np.sum(np.abs(eigs[j]) <= tau))]
        assert sum(counts) == P and float(r["min_ratio"]) == counts[0] / P
        assert float(r["index"]) == counts[1] / P and float(r["null_fraction"]) == counts[2] / P
        for name in ("min_ratio", "index", "null_fraction"):
            lo, est, hi = (float(r[name + end]) for end in ("_lo", "_est", "_hi"))
            assert lo <= est <= hi and hi - lo < 0.95, (name, lo, est, hi)
            assert lo <= float(r[name]) <= hi, (name, r[name], lo, hi)  # exact inside
        assert int(r["num_matvecs"]) == 4 * 30 + 2 * 2  # + Rayleigh checks of 2k Ritz pairs
        # the verdict: dense and Krylov agree on whether a negative eigenvalue is proven
        proven = r["negative_proven"] == "True"
        assert proven == (eigs[j].min() < -float(r["machine_tolerance"]))
        assert float(r["lambda_min_bound"]) >= eigs[j].min() - 1e-12  # a certified bound
        assert r["verdict"] == r["dense_verdict"] == "not_critical"  # ‖g‖ > --grad_tol
        assert float(r["exact_lambda_max"]) == pytest.approx(eigs[j].max(), rel=1e-12)
        assert float(r["lambda_max"]) == pytest.approx(float(r["exact_lambda_max"]), rel=1e-8)
        assert float(r["lambda_min"]) >= float(r["exact_lambda_min"]) - 1e-10  # a Ritz value
    config = json.loads((out / "config.json").read_text())
    assert config["n_params"] == P and config["protocol"]["compare_dense"] is True
    assert config["protocol"]["snapshots"] == [0, 40]
    assert proc.stdout.count("inside the interval") == 2
    cdf = read_rows(out / "spectrum_cdf.csv")
    assert len(cdf) == 2 * GRID and list(cdf[0])[:3] == ["step", "tolerance_rel", "tolerance"]
    assert "exact_min_ratio" in cdf[0]


def test_krylov_run_has_estimates_and_no_counts(krylov_run, dense_run):
    out, proc = krylov_run
    rows = read_rows(out / "spectrum.csv")
    assert list(rows[0]) == KRYLOV_COLUMNS  # no n_pos / n_neg / n_null, no plain min_ratio
    dense = read_rows(dense_run[0] / "spectrum.csv")
    assert len(rows) == 2
    for r, d in zip(rows, dense):  # the same SLQ run with or without the dense comparison
        assert {k: r[k] for k in KRYLOV_COLUMNS} == {k: d[k] for k in KRYLOV_COLUMNS}
    with np.load(out / "spectrum.npz", allow_pickle=False) as s, \
            np.load(dense_run[0] / "spectrum.npz", allow_pickle=False) as d:
        assert sorted(s.files) == sorted(NPZ_KEYS)  # no exact_eigenvalues
        for key in NPZ_KEYS:
            np.testing.assert_array_equal(s[key], d[key], err_msg=key)
    for stem in ("spectrum_density", "spectrum_summary", "spectrum_cdf"):
        assert (out / f"{stem}.png").stat().st_size > 0
    assert "exact:" not in proc.stdout
    assert json.loads((out / "config.json").read_text())["protocol"]["compare_dense"] is False


def test_killed_after_the_first_snapshot_resumes_to_the_same_files(krylov_run, tmp_path):
    out = tmp_path / "killed"
    args = [*TINY, "--compare_dense=false", f"--out_dir={out}"]
    kill_when("spectrum", args, lambda: any((out / "chunks").glob("chunk_*.npz")))
    assert not (out / "spectrum.csv").exists()
    assert [p.name for p in (out / "chunks").glob("chunk_*.npz")] == ["chunk_0000000_000001.npz"]
    proc = spectrum(*args)
    assert "resuming, 1 of 2 snapshots left" in proc.stdout
    assert "step      0:" not in proc.stdout  # the saved snapshot is not recomputed
    names = assert_same_results(krylov_run[0], out)
    assert names == ["config.json", "spectrum.csv", "spectrum.npz", "spectrum_cdf.csv"]


def test_other_configuration_in_the_same_dir_is_refused_before_compute(krylov_run):
    out, _ = krylov_run
    before = (out / "spectrum.csv").read_bytes()
    # --probe_batch changes the vmap width of the Lanczos runs (the last bits of every number),
    # --log_sigma the stored densities: resuming under either would mix two configurations.
    proc = spectrum(*TINY, "--compare_dense=false", f"--out_dir={out}", "--train_steps=41",
                    "--probe_batch=1", "--log_sigma=0.1", check=False)
    assert proc.returncode != 0
    assert "--out_dir" in proc.stderr and "different configuration" in proc.stderr
    for name in ("train_steps", "probe_batch", "log_sigma"):
        assert name in proc.stderr, name
    assert (out / "spectrum.csv").read_bytes() == before


@pytest.mark.parametrize("bad, named", [
    # --finder: a shared flag the app never reads; --tol_scale: ignored beside --eig_tol (TINY
    # sets it)
    (["--snapshots=0,abc", "--lanczos_steps=1", "--slq_probes=0", "--finder=gradnorm",
      "--tol_scale=10"],
     ["--snapshots", "--lanczos_steps", "--slq_probes", "--finder", "--tol_scale"]),
    # a budget below one block, a width outside (0, 1), adaptive runs in probe batches
    (["--hvp_budget=50", "--resolve_width=1.5", "--target_rel_tol=0"],
     ["--hvp_budget", "--resolve_width", "--target_rel_tol"]),
    (["--hvp_budget=1000", "--probe_batch=2"], ["--probe_batch"]),
    (["--snapshots=0,41"], ["--snapshots"]),
    # P = 112,810: too large for a dense Hessian
    (["--compare_dense=true", "--widths=300,300"], ["--compare_dense"]),
])
def test_bad_flags_are_named_and_nothing_is_written(tmp_path, bad, named):
    out = tmp_path / "run"
    proc = spectrum(*TINY, f"--out_dir={out}", *bad, check=False)
    assert proc.returncode != 0
    for flag in named:
        assert flag in proc.stderr, (flag, proc.stderr)
    assert not out.exists()
