"""experiments.index_vs_error and experiments.minima_vs_size on tiny configurations: every file
and column, at least one certified point, nothing dropped, a SIGKILL mid-run then a rerun gives
the same data files as an uninterrupted run, and bad flags refused before any compute.

Each app run is a subprocess of a few seconds (tiny nets, JAX_DISABLE_MOST_OPTIMIZATIONS=1 from
tests.app_runner.ENV); one uninterrupted run per app is shared by the tests of that app."""

import json

import numpy as np
import pytest

from crit import theory
from tests.app_runner import assert_same_results, kill_when, read_rows, run_app

STATUSES = {"critical", "not_converged", "gradient_flat", "diverged"}
# no ½‖g‖² stage: one compile less (that stage is tested in test_saddles)
TINY_SEARCH = ["--num_inits=3", "--train_steps=60", "--snapshot_every=30", "--prefind_steps=0",
               "--finder_steps=8", "--vmap_width=4", "--chunk_size=5"]


def header(path) -> list[str]:
    return path.read_text().splitlines()[0].split(",")


def killed_then_rerun(module: str, args: list[str], out) -> None:
    """SIGKILL the app once its config.json exists (compute under way), then rerun it."""
    kill_when(module, [*args, f"--out_dir={out}"], ready=lambda: (out / "config.json").exists())
    data = [p.name for p in out.iterdir() if p.suffix in (".csv", ".npz") or p.name == "fits.json"]
    assert not data, f"killed after writing results {data}: the kill did not land mid-run"
    run_app(module, *args, f"--out_dir={out}")


# ----------------------------------------------------------------------------- index_vs_error

IVE_ARGS = [*TINY_SEARCH, "--datasets=gaussian", "--phis=0.5", "--gaussian_width=2",
            "--dim_in=2", "--bootstrap=20"]
IVE_P = 2 * 2 + 2 + 2 + 1
IVE_POINTS = ["dataset", "phi", "unique_id", "loss", "energy", "train_error", "index", "n_pos",
              "n_neg", "n_null", "multiplicity", "grad_norm", "lambda_min", "lambda_max",
              "tolerance", "active_units", "init_id", "step", "noise_scale"]
IVE_STARTS = ["dataset", "phi", "start_id", "init_id", "active_units", "step", "noise_scale",
              "start_loss", "status", "loss", "grad_norm", "iterations", "index", "unique_id"]


@pytest.fixture(scope="module")
def ive_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ive") / "run"
    return out, run_app("index_vs_error", *IVE_ARGS, f"--out_dir={out}")


def test_index_vs_error_files_and_columns(ive_run):
    out, proc = ive_run
    for name in ("config.json", "points.csv", "starts.csv", "spectra.npz", "fits.json",
                 "timing.txt", "index_vs_error.png", "index_vs_error.pdf",
                 "spectra_histograms.png", "spectra_histograms.pdf", "pennington_bahri.png",
                 "pennington_bahri.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert header(out / "points.csv") == IVE_POINTS
    assert header(out / "starts.csv") == IVE_STARTS
    starts = read_rows(out / "starts.csv")
    assert len(starts) == 3 * 3 * 2  # inits × snapshots (0, 30, 60) × noise scales (0, 0.02)
    assert [int(r["start_id"]) for r in starts] == list(range(18))
    assert {r["status"] for r in starts} <= STATUSES
    # --reduced_nets (default): init i keeps its first i mod (h + 1) of h = 2 hidden units
    assert all(int(r["active_units"]) == int(r["init_id"]) % 3 for r in starts)
    certified = [r for r in starts if r["status"] == "critical"]
    assert certified, "the tiny configuration must certify at least one point"
    assert all(float(r["grad_norm"]) <= 1e-8 and int(r["unique_id"]) >= 0 for r in certified)
    assert all(int(r["unique_id"]) == -1 for r in starts if r["status"] != "critical")
    points = read_rows(out / "points.csv")
    assert len(points) >= 1
    assert sum(int(p["multiplicity"]) for p in points) == len(certified)
    assert sorted({int(r["unique_id"]) for r in certified}) == list(range(len(points)))
    for p in points:
        assert p["dataset"] == "gaussian" and float(p["phi"]) == pytest.approx(0.5, rel=0.1)
        assert int(p["n_pos"]) + int(p["n_neg"]) + int(p["n_null"]) == IVE_P
        assert float(p["grad_norm"]) <= 1e-8
        assert float(p["index"]) == pytest.approx(int(p["n_neg"]) / IVE_P)
        assert 0 <= float(p["energy"]) and np.isnan(float(p["train_error"]))
        assert float(p["lambda_min"]) <= float(p["lambda_max"]) and float(p["tolerance"]) > 0
        # the row describes one of the point's own starts (its representative)
        cols = ("init_id", "active_units", "step", "noise_scale", "loss", "grad_norm", "index")
        assert any(all(p[c] == r[c] for c in cols) for r in certified
                   if r["unique_id"] == p["unique_id"])
    with np.load(out / "spectra.npz") as s:
        assert sorted(s.files) == ["gaussian_phi0.5_eigenvalues", "gaussian_phi0.5_index"]
        eig = s["gaussian_phi0.5_eigenvalues"]
        assert eig.shape == (len(points), IVE_P) and np.all(np.diff(eig, axis=1) >= 0)
        np.testing.assert_array_equal(s["gaussian_phi0.5_index"],
                                      [float(p["index"]) for p in points])
        np.testing.assert_array_equal(eig[:, 0], [float(p["lambda_min"]) for p in points])
    fits = json.loads((out / "fits.json").read_text())
    assert sorted(fits) == ["configurations", "disagreements", "normalization"]
    assert "½" in fits["normalization"]
    conf, = fits["configurations"]
    assert conf["n_unique"] == len(points) and conf["n_params"] == IVE_P
    assert conf["n_saddles"] + conf["n_minima"] == len(points)
    assert conf["status_counts"] == {s: sum(r["status"] == s for r in starts)
                                     for s in conf["status_counts"]}
    assert set(conf["status_counts"]) == STATUSES
    pb = conf["pennington_bahri"]
    assert pb["eps_c_theory"] == pytest.approx(0.011271, abs=1e-5)
    assert pb["minimizer_energy_theory"] == pytest.approx(0.125)
    config = json.loads((out / "config.json").read_text())
    assert config["problems"][0]["n_params"] == IVE_P
    assert config["protocol"]["vmap_width"] == 4 and "chunk_size" not in config["protocol"]
    assert "normalization" in proc.stdout and "status counts" in proc.stdout


def test_index_vs_error_killed_mid_run_then_rerun_gives_the_same_files(ive_run, tmp_path):
    ref, _ = ive_run
    out = tmp_path / "killed"
    killed_then_rerun("index_vs_error", IVE_ARGS, out)
    names = assert_same_results(ref, out)
    assert names == ["config.json", "fits.json", "points.csv", "spectra.npz", "starts.csv"]


def test_index_vs_error_bad_flags_all_named_before_compute(tmp_path):
    out = tmp_path / "bad"
    proc = run_app("index_vs_error", "--phis=0.5,1.5", "--datasets=mnist", "--snapshot_every=7",
                   "--widths=4", "--eig_rtol=-1", "--vmap_width=0", "--activation=sigmoid",
                   f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    for text in ("--phis", "--datasets", "--snapshot_every", "--widths", "--eig_rtol",
                 "--vmap_width", "--reduced_nets with --activation=sigmoid", "σ(0) = 0.5"):
        assert text in proc.stderr, text
    assert not out.exists()


# ----------------------------------------------------------------------------- minima_vs_size

# width 1 on 12 points, longer training and Newton: 3 unique certified points, one a minimum
MVS_ARGS = [*TINY_SEARCH, "--num_inits=4", "--train_steps=400", "--snapshot_every=200",
            "--finder_steps=40", "--widths_list=1", "--n_points=12", "--noise_scales=0,0.05",
            "--bootstrap=200"]
MVS_P = 1 * 4 + 1 + 1 + 1  # default --dataset=gaussian --dim_in=4, one output
MVS_SIZES = ["width", "n_params", "n_train", "phi", "n_starts", "critical", "not_converged",
             "gradient_flat", "diverged", "n_unique", "n_minima", "share_minima", "cluster_lo",
             "cluster_hi", "wilson_iid_lo", "wilson_iid_hi", "n_inits_certified",
             "n_minima_with_null", "n_strict_minima", "n_certified_minima_starts",
             "share_minima_starts", "cluster_starts_lo", "cluster_starts_hi",
             "wilson_starts_iid_lo", "wilson_starts_iid_hi", "coin_probability", "mean_index",
             "coin_index_sd"]
MVS_POINTS = ["width", "n_params", "unique_id", "loss", "index", "n_pos", "n_neg", "n_null",
              "is_minimum", "multiplicity", "grad_norm", "lambda_min", "lambda_max", "tolerance",
              "init_id", "step", "noise_scale"]
MVS_STARTS = ["width", "n_params", "start_id", "init_id", "step", "noise_scale", "start_loss",
              "status", "loss", "grad_norm", "iterations", "index", "unique_id"]


@pytest.fixture(scope="module")
def mvs_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mvs") / "run"
    return out, run_app("minima_vs_size", *MVS_ARGS, f"--out_dir={out}")


def test_minima_vs_size_files_and_columns(mvs_run):
    out, proc = mvs_run
    for name in ("config.json", "sizes.csv", "points.csv", "starts.csv", "spectra.npz",
                 "timing.txt", "minima_vs_size.png", "minima_vs_size.pdf"):
        assert (out / name).stat().st_size > 0, name
    assert header(out / "sizes.csv") == MVS_SIZES
    assert header(out / "points.csv") == MVS_POINTS
    assert header(out / "starts.csv") == MVS_STARTS
    row, = read_rows(out / "sizes.csv")
    assert int(row["width"]) == 1 and int(row["n_params"]) == MVS_P
    assert int(row["n_train"]) == 12 and float(row["phi"]) == pytest.approx(MVS_P / 12)
    assert int(row["n_starts"]) == 4 * 3 * 2  # inits × snapshots × noise scales
    assert sum(int(row[s]) for s in STATUSES) == int(row["n_starts"])
    assert float(row["coin_probability"]) == pytest.approx(2.0 ** -MVS_P)
    assert float(row["coin_index_sd"]) == pytest.approx(0.5 / np.sqrt(MVS_P))
    starts = read_rows(out / "starts.csv")
    assert len(starts) == 24 and {r["status"] for r in starts} <= STATUSES
    certified = [r for r in starts if r["status"] == "critical"]
    assert len(certified) == int(row["critical"]) >= 1, "tiny run must certify a point"
    points = read_rows(out / "points.csv")
    assert len(points) == int(row["n_unique"]) >= 1
    assert sum(int(p["multiplicity"]) for p in points) == len(certified)
    is_min = np.array([int(p["is_minimum"]) for p in points])
    n_neg = np.array([int(p["n_neg"]) for p in points])
    np.testing.assert_array_equal(is_min, n_neg == 0)
    assert is_min.sum() == int(row["n_minima"])
    assert int(row["n_minima_with_null"]) + int(row["n_strict_minima"]) == is_min.sum()
    assert float(row["share_minima"]) == pytest.approx(is_min.mean())
    assert float(row["mean_index"]) == pytest.approx(np.mean([float(p["index"]) for p in points]))
    for p in points:
        assert int(p["n_pos"]) + int(p["n_neg"]) + int(p["n_null"]) == MVS_P
        assert float(p["grad_norm"]) <= 1e-8 and int(p["width"]) == 1
        assert float(p["lambda_min"]) <= float(p["lambda_max"]) and float(p["tolerance"]) > 0
    cert_min = [float(r["index"]) == 0 for r in certified]  # starts' own spectra (n_neg = 0)
    assert int(row["n_certified_minima_starts"]) == sum(cert_min)
    assert float(row["share_minima_starts"]) == pytest.approx(np.mean(cert_min))
    for lo, hi, share in (("cluster_lo", "cluster_hi", "share_minima"),
                          ("wilson_iid_lo", "wilson_iid_hi", "share_minima"),
                          ("cluster_starts_lo", "cluster_starts_hi", "share_minima_starts"),
                          ("wilson_starts_iid_lo", "wilson_starts_iid_hi",
                           "share_minima_starts")):
        assert 0 <= float(row[lo]) <= float(row[share]) + 1e-12, lo
        assert float(row[share]) <= float(row[hi]) + 1e-12 <= 1 + 1e-12, hi
    # the intervals are the cluster bootstrap over inits of the points written (--bootstrap=200,
    # --seed=0): recomputed here from points.csv and starts.csv
    mult = {int(p["unique_id"]): int(p["multiplicity"]) for p in points}
    minimum = {int(p["unique_id"]): int(p["is_minimum"]) for p in points}
    num, den = np.zeros(4), np.zeros(4)
    num_s, den_s = np.zeros(4), np.zeros(4)
    for r in certified:
        i, u = int(r["init_id"]), int(r["unique_id"])
        num[i] += minimum[u] / mult[u]
        den[i] += 1 / mult[u]
        num_s[i] += float(r["index"]) == 0
        den_s[i] += 1
    assert int(row["n_inits_certified"]) == int(np.sum(den_s > 0))
    lo, hi, _ = theory.cluster_bootstrap_ratio(num, den, 200, 0)
    assert (float(row["cluster_lo"]), float(row["cluster_hi"])) == pytest.approx((lo, hi))
    lo, hi, _ = theory.cluster_bootstrap_ratio(num_s, den_s, 200, 0)
    assert (float(row["cluster_starts_lo"]), float(row["cluster_starts_hi"])) == \
        pytest.approx((lo, hi))
    with np.load(out / "spectra.npz") as s:
        assert sorted(s.files) == ["h1_eigenvalues", "n_params", "widths"]
        assert s["h1_eigenvalues"].shape == (len(points), MVS_P)
        np.testing.assert_array_equal(s["widths"], [1])
        np.testing.assert_array_equal(s["n_params"], [MVS_P])
    config = json.loads((out / "config.json").read_text())
    assert config["sizes"] == [{"width": 1, "n_params": MVS_P}]
    assert config["protocol"]["vmap_width"] == 4 and config["protocol"]["bootstrap"] == 200
    assert "chunk_size" not in config["protocol"]
    assert "2^-P" in proc.stdout and "bootstrap over" in proc.stdout


def test_minima_vs_size_killed_mid_run_then_rerun_gives_the_same_files(mvs_run, tmp_path):
    ref, _ = mvs_run
    out = tmp_path / "killed"
    killed_then_rerun("minima_vs_size", MVS_ARGS, out)
    names = assert_same_results(ref, out)
    assert names == ["config.json", "points.csv", "sizes.csv", "spectra.npz", "starts.csv"]


def test_minima_vs_size_bad_flags_all_named_before_compute(tmp_path):
    out = tmp_path / "bad"
    proc = run_app("minima_vs_size", "--widths_list=4,0", "--widths=4", "--noise_scales=-1",
                   "--num_inits=0", "--bootstrap=0", "--vmap_width=0", "--reduced_nets",
                   "--activation=softplus", f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    for text in ("--widths_list", "--widths:", "--noise_scales", "--num_inits", "--bootstrap",
                 "--vmap_width", "--reduced_nets with --activation=softplus", "σ(0) = 0.693"):
        assert text in proc.stderr, text
    assert not out.exists()


# ----------------------------------------------------------------------------- statistics

def test_cluster_bootstrap_is_wider_than_wilson_when_points_share_a_trajectory():
    """10 inits: init 0 reaches the same minimum from 20 starts, the 9 others one saddle each.
    Wilson over 29 'independent' points says the share is at least 0.51; resampling whole
    inits, the share is 0 whenever init 0 is not drawn (probability 0.9^10 = 0.35), so the
    cluster interval reaches 0."""
    num, den = [20] + [0] * 9, [20] + [1] * 9
    w_lo, w_hi = theory.wilson_interval(20, 29)
    lo, hi, n_valid = theory.cluster_bootstrap_ratio(num, den, n_boot=2000, seed=0)
    assert w_lo > 0.5 and lo == 0.0 and hi > w_hi and n_valid == 2000
    assert theory.cluster_bootstrap_ratio(num, den, n_boot=2000, seed=0)[:2] == (lo, hi)
    # one point per init: the ordinary bootstrap of a proportion, close to Wilson
    k = np.r_[np.ones(30), np.zeros(70)]
    lo, hi, _ = theory.cluster_bootstrap_ratio(k, np.ones(100), n_boot=4000, seed=1)
    np.testing.assert_allclose((lo, hi), theory.wilson_interval(30, 100), atol=0.03)
    # inits without points: resamples that draw none of the others have no ratio
    lo, hi, n_valid = theory.cluster_bootstrap_ratio([1, 0, 0], [1, 0, 0], n_boot=500, seed=0)
    assert (lo, hi) == (1.0, 1.0) and 0 < n_valid < 500
    assert np.isnan(theory.cluster_bootstrap_ratio([0, 0], [0, 0])[0])
    with pytest.raises(ValueError, match="numerator"):
        theory.cluster_bootstrap_ratio([2], [1])
