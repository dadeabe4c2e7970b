"""The saddle_escape, loss_distribution and global_optimality apps on tiny configurations:
every output file and column, the no-saddle exit, chunk invariance, resuming after SIGKILL,
bad and inapplicable flags."""

import json

import numpy as np
import pytest

from tests import app_runner
from tests.app_runner import assert_same_results, kill_when, read_rows


def run_app(name, *args, check=True):
    return app_runner.run_app(name, *args, check=check, env=app_runner.ENV)


def figures_exist(out, *stems):
    for stem in stems:
        for ext in ("png", "pdf"):
            assert (out / f"{stem}.{ext}").stat().st_size > 0, f"{stem}.{ext}"


def killed_then_rerun(name, args, out, reference, expected):
    """SIGKILL the app once its config.json exists (mid-compute: nothing else is written yet),
    rerun the same command, and check its data files equal the uninterrupted ``reference``."""
    kill_when(name, [*args, f"--out_dir={out}"], lambda: (out / "config.json").exists())
    left = sorted(p.name for p in out.iterdir() if p.name != ".lock")
    assert left == ["config.json"], left  # killed during the compute, before any output
    run_app(name, *args, f"--out_dir={out}")
    assert assert_same_results(reference, out) == sorted(expected)


# --- saddle_escape ------------------------------------------------------------------------------

# Init 0 of the default problem (gaussian 2-4-1 tanh, l2 = 1e-2, P = 17) refined from its
# initialization lands on a certified saddle of index 4/17. --dense_max_params=1 forces the
# Lanczos eigenpair and the Krylov saddle-free Newton step.
SADDLE_TINY = ["--num_inits=1", "--snapshots=0", "--num_saddles=1", "--escape_steps=20",
               "--num_random=2", "--line_points=11", "--toy_steps=2"]
SADDLE_KRYLOV = [*SADDLE_TINY, "--dense_max_params=1", "--krylov_dim=5", "--lanczos_steps=17"]
SADDLE_FILES = ("config.json", "saddles.csv", "escape_line.csv", "restarts.npz",
                "optimizers.csv", "optimizers.npz", "toys.npz")
METHODS = ("gd", "momentum", "adam", "pgd", "sfn")


@pytest.fixture(scope="module")
def saddle_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("se") / "run"
    return out, run_app("saddle_escape", *SADDLE_KRYLOV, f"--out_dir={out}")


def test_saddle_escape_tiny_run_krylov_path(saddle_run):
    out, proc = saddle_run
    for name in SADDLE_FILES:
        assert (out / name).stat().st_size > 0, name
    figures_exist(out, "escape_line", "escape_restarts", "escape_optimizers", "toy_saddles")
    cand = read_rows(out / "saddles.csv")
    assert list(cand[0]) == ["init_id", "start_step", "status", "loss", "grad_norm", "n_pos",
                             "n_neg", "n_null", "index", "lambda_min", "lambda_max",
                             "tolerance", "finder_iterations", "saddle"]
    assert len(cand) == 1
    c = cand[0]
    assert (c["init_id"], c["start_step"], c["status"], c["saddle"]) == ("0", "0", "critical", "0")
    counts = [int(c[k]) for k in ("n_pos", "n_neg", "n_null")]
    assert sum(counts) == 17 and counts[1] > 0 and float(c["index"]) == counts[1] / 17
    assert float(c["grad_norm"]) <= 1e-8 and float(c["lambda_min"]) < 0 < float(c["lambda_max"])
    assert 1 <= int(c["finder_iterations"]) <= 50 and float(c["tolerance"]) > 0
    line = read_rows(out / "escape_line.csv")
    assert list(line[0]) == ["saddle", "t", "loss", "quadratic"] and len(line) == 11
    t, loss, quad = (np.array([float(r[k]) for r in line]) for k in ("t", "loss", "quadratic"))
    np.testing.assert_allclose(t, np.linspace(-1.5, 1.5, 11), atol=1e-15)
    assert loss[5] == pytest.approx(float(c["loss"]), rel=1e-12)
    assert loss[5] == pytest.approx(quad[5], rel=1e-12)
    assert np.all(np.delete(quad, 5) < quad[5])  # ½λt² < 0 both ways
    assert loss[4] < loss[5] and loss[6] < loss[5]  # the loss falls both ways near the saddle
    with np.load(out / "restarts.npz") as z:
        assert z["restart_u"].shape == (1, 2, 21) and z["restart_v"].shape == (1, 2, 21)
        assert str(z["eigenvalue_method"]) == "lanczos"
        # 17 Lanczos steps on P = 17: the Ritz value is λ_min of the exact Hessian
        assert z["eigenvalue"][0] == pytest.approx(float(c["lambda_min"]), rel=1e-8)
        assert z["eigenvalue_residual"][0] < 1e-8 and bool(z["eigenvalue_converged"][0])
        assert np.linalg.norm(z["direction"][0]) == pytest.approx(1.0, rel=1e-12)
        assert z["saddle_loss"][0] == pytest.approx(float(c["loss"]), rel=1e-12)
        np.testing.assert_allclose(z["restart_u"][0, :, 0], z["saddle_loss"][0], rtol=1e-5)
        assert float(z["epsilon"]) == 1e-3 and float(z["lr"]) == 0.1
    opt = read_rows(out / "optimizers.csv")
    assert list(opt[0]) == ["saddle", "method", "start", "escape_step", "final_loss",
                            "final_grad_norm", "perturbations"]
    assert [(r["method"], r["start"]) for r in opt] == [(m, s) for m in METHODS for s in "01"]
    with np.load(out / "optimizers.npz") as z:
        assert list(z["methods"]) == list(METHODS)
        for r in opt:
            k = int(r["start"])
            curve, grad = z[f"{r['method']}_loss"][0, k], z[f"{r['method']}_grad_norm"][0, k]
            assert curve.shape == (21,) and float(r["final_loss"]) == curve[-1]
            assert float(r["final_grad_norm"]) == grad[-1]
        assert z["sfn_loss"][0, :, -1].max() < z["saddle_loss"][0]  # SFN leaves the saddle
        assert z["loss_low"][0] <= z["sfn_loss"].min()
        assert z["saddle_loss"][0] > z["escape_level"][0] > z["loss_low"][0]
    sfn = [r for r in opt if r["method"] == "sfn"]
    assert all(0 <= int(r["escape_step"]) <= 20 for r in sfn)  # SFN escapes within 20 steps
    assert all(int(r["perturbations"]) == 0 for r in opt if r["method"] != "pgd")
    with np.load(out / "toys.npz") as z:
        assert z["quadratic_newton_path"].shape == (3, 3, 2)
        np.testing.assert_allclose(z["quadratic_newton_path"][:, -1], 0.0, atol=1e-12)
        assert np.all(z["origin_gd_loss"] == 0) and z["origin_pgd_loss"][-1] < 0
    config = json.loads((out / "config.json").read_text())
    assert config["experiment"] == "saddle_escape" and config["n_params"] == 17
    assert "train_steps" not in config["protocol"]  # not read by this app (--snapshots is)
    assert "saddle 0: L* = " in proc.stdout and "distinct after merging copies" in proc.stdout


def test_saddle_escape_killed_and_rerun_writes_the_same_files(saddle_run, tmp_path):
    killed_then_rerun("saddle_escape", SADDLE_KRYLOV, tmp_path / "killed", saddle_run[0],
                      SADDLE_FILES)


def test_saddle_escape_says_so_when_no_saddle_is_found(tmp_path):
    rows = {}
    # the second run has more inits and snapshots: init 0's candidate at step 0 must be the
    # same bits (fixed vmap width), not whatever a vmap over all candidates rounds to
    for n, extra in ((1, []), (2, ["--num_inits=2", "--snapshots=0,5"])):
        out = tmp_path / f"none{n}"
        proc = run_app("saddle_escape", *SADDLE_TINY, "--finder_steps=1", *extra,
                       f"--out_dir={out}", check=False)
        assert proc.returncode == 3, proc.stderr
        assert "NO CERTIFIED SADDLE" in proc.stderr and "--num_inits" in proc.stderr
        rows[n] = read_rows(out / "saddles.csv")  # every candidate is still listed
        assert all(r["status"] != "critical" for r in rows[n])
        assert all(r["saddle"] == "-1" for r in rows[n])
        assert not (out / "optimizers.csv").exists()
    assert [(r["init_id"], r["start_step"]) for r in rows[1]] == [("0", "0")]
    assert [(r["init_id"], r["start_step"]) for r in rows[2]] == [("0", "0"), ("0", "5"),
                                                                  ("1", "0"), ("1", "5")]
    assert rows[2][0] == rows[1][0]


# --- loss_distribution --------------------------------------------------------------------------

DIST_TINY = ["--num_inits=5", "--epochs=2", "--batch_size=200", "--n_points=600",
             "--widths_list=3", "--vmap_width=2"]
DIST_FILES = ("config.json", "results.csv", "spread.csv")


@pytest.fixture(scope="module")
def dist_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ld") / "run"
    # chunks of 2 with a padded last chunk
    return out, run_app("loss_distribution", *DIST_TINY, "--chunk_size=2", f"--out_dir={out}")


def test_loss_distribution_tiny_run(dist_run):
    out, proc = dist_run
    figures_exist(out, "loss_histograms", "train_vs_test")
    res = read_rows(out / "results.csv")
    assert list(res[0]) == ["width", "init_id", "n_params", "train_loss", "test_loss",
                            "train_acc", "test_acc"]
    assert [(r["width"], r["init_id"]) for r in res] == [("3", str(i)) for i in range(5)]
    assert {int(r["n_params"]) for r in res} == {16 * 3 + 3 + 3 * 10 + 10}
    train, test = (np.array([float(r[k]) for r in res]) for k in ("train_loss", "test_loss"))
    assert len(set(test)) == 5 and np.all(np.isfinite(train)) and np.all(train > 0)
    for key, n in (("train_acc", 600), ("test_acc", 1797 - 600)):
        for r in res:  # a count over n, correctly rounded
            acc = float(r[key])
            assert acc == round(acc * n) / n, (key, r[key])
    spread = read_rows(out / "spread.csv")
    assert list(spread[0]) == ["width", "n_params", "n_runs", "n_diverged", "test_mean",
                               "test_std", "test_q05", "test_q25", "test_q50", "test_q75",
                               "test_q95", "train_mean", "train_std", "pearson",
                               "pearson_pvalue", "spearman", "spearman_pvalue"]
    (s,) = spread
    assert (s["width"], s["n_params"], s["n_runs"], s["n_diverged"]) == ("3", "91", "5", "0")
    assert float(s["test_mean"]) == pytest.approx(test.mean(), rel=1e-12)
    assert float(s["train_mean"]) == pytest.approx(train.mean(), rel=1e-12)
    assert float(s["test_q50"]) == pytest.approx(np.median(test), rel=1e-12)
    assert float(s["test_q05"]) <= float(s["test_q50"]) <= float(s["test_q95"])
    assert float(s["pearson"]) == pytest.approx(np.corrcoef(train, test)[0, 1], rel=1e-9)
    assert "Choromanska" in proc.stdout
    config = json.loads((out / "config.json").read_text())
    assert config["n_inputs"] == 16 and config["n_test"] == 1797 - 600
    assert config["protocol"]["vmap_width"] == 2 and "chunk_size" not in config["protocol"]


def test_loss_distribution_chunk_size_never_changes_results(dist_run, tmp_path):
    # one call of 5 inits (padded to 6) instead of three of 2: the same groups of --vmap_width,
    # so the same bits (a vmap as wide as the chunk rounds float32 training differently)
    out = tmp_path / "one_chunk"
    run_app("loss_distribution", *DIST_TINY, "--chunk_size=0", f"--out_dir={out}")
    assert assert_same_results(dist_run[0], out) == sorted(DIST_FILES)


def test_loss_distribution_killed_and_rerun_writes_the_same_files(dist_run, tmp_path):
    killed_then_rerun("loss_distribution", [*DIST_TINY, "--chunk_size=2"], tmp_path / "killed",
                      dist_run[0], DIST_FILES)


# --- global_optimality --------------------------------------------------------------------------

GO_TINY = ["--n_points=30", "--r_max=3", "--steps=100", "--polish_steps=0",
           "--rescale_steps=50", "--polar_starts=8", "--polar_steps=20",
           "--baseline_restarts=1"]
GO_FILES = ("config.json", "rounds.csv", "baseline.csv", "global_optimality.npz")


@pytest.fixture(scope="module")
def go_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("go") / "run"
    return out, run_app("global_optimality", *GO_TINY, f"--out_dir={out}")


def test_global_optimality_tiny_run(go_run):
    out, proc = go_run
    figures_exist(out, "objective_vs_r")
    rounds = read_rows(out / "rounds.csv")
    assert list(rounds[0]) == ["round", "r", "objective_start", "objective", "loss",
                               "regularizer", "polar", "polar_over_lam", "certified",
                               "gap_bound", "n_zero", "n_kinks", "grad_norm", "tau_added",
                               "objective_after_add"]
    n = len(rounds)
    assert 1 <= n <= 3 and [int(r["r"]) for r in rounds] == list(range(1, n + 1))
    assert [int(r["round"]) for r in rounds] == list(range(n))
    num = lambda r, k: float(r[k])  # noqa: E731
    for r in rounds:
        assert num(r, "objective") <= num(r, "objective_start") * (1 + 1e-12)
        assert num(r, "objective") == pytest.approx(num(r, "loss") + 0.02 * num(r, "regularizer"),
                                                    rel=1e-12)
        assert num(r, "polar_over_lam") == pytest.approx(num(r, "polar") / 0.02, rel=1e-12)
        assert (r["certified"] == "True") == (num(r, "polar_over_lam") <= 1 + 1e-2)
        assert num(r, "gap_bound") >= 0
    for a, b in zip(rounds, rounds[1:]):  # each round starts where the previous added a unit
        assert a["certified"] == "False"
        assert num(b, "objective_start") == num(a, "objective_after_add")
        assert num(a, "objective_after_add") <= num(a, "objective") * (1 + 1e-12)
    base = read_rows(out / "baseline.csv")
    assert list(base[0]) == ["r", "restart", "objective", "loss", "regularizer", "polar",
                             "polar_over_lam", "certified", "gap_bound", "n_zero", "n_kinks",
                             "grad_norm"]
    assert [(int(r["r"]), int(r["restart"])) for r in base] == [(1, 0), (2, 0), (3, 0)]
    for r in base:
        assert num(r, "objective") == pytest.approx(num(r, "loss") + 0.02 * num(r, "regularizer"),
                                                    rel=1e-12)
    with np.load(out / "global_optimality.npz") as z:
        assert z["x"].shape == (30, 2) and z["y"].shape == (30,)
        assert z["w1"].shape == (3, 2) and z["w2"].shape == (3,) and z["mask"].sum() == n
        np.testing.assert_array_equal(z["round_objective"], [num(r, "objective") for r in rounds])
        np.testing.assert_array_equal(z["baseline_objective"],
                                      [num(r, "objective") for r in base])
    assert "objective non-increasing across rounds and additions: True" in proc.stdout
    assert json.loads((out / "config.json").read_text())["protocol"]["lam"] == 0.02


def test_global_optimality_killed_and_rerun_writes_the_same_files(go_run, tmp_path):
    killed_then_rerun("global_optimality", GO_TINY, tmp_path / "killed", go_run[0], GO_FILES)


# --- bad flags ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name,args,flag_names", [
    # --train_steps, --log_every: shared flags these apps accept but never read
    ("saddle_escape", ["--num_random=0", "--sfn_damping=-1", "--snapshots=a", "--train_steps=5"],
     ["--num_random", "--sfn_damping", "--snapshots", "--train_steps"]),
    ("loss_distribution", ["--widths_list=0,5", "--downsample=3", "--widths=4", "--log_every=5",
                           "--finder=gradnorm", "--vmap_width=-1"],
     ["--widths_list", "--downsample", "--widths", "--log_every", "--finder", "--vmap_width"]),
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
