"""The min_ratio app end to end on a tiny configuration: files, columns, resume, faults, bad flags."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest

from tests.app_runner import ENV, ROOT, assert_same_results, kill_when, read_rows
from tests.app_runner import run_app as _run

# vmap width 2 > 1: the chunk-size tests then really compare groups of several vmapped inits
TINY = ["--widths=3", "--n_points=16", "--train_steps=60", "--log_every=20",
        "--finder_steps=4", "--progress=false", "--vmap_width=2"]
COLUMNS = ["init_id", "status", "loss", "grad_norm", "n_params", "n_pos", "n_neg", "n_null",
           "min_ratio", "index", "lambda_min", "lambda_max", "tolerance", "finder_iterations"]
DATA_FILES = ["config.json", "curves.npz", "results.csv", "spectra.npz"]


def run_app(*args, check=True):
    return _run("min_ratio", *args, check=check, timeout=300)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mr") / "run"
    proc = run_app(*TINY, "--num_inits=6", "--chunk_size=2", f"--out_dir={out}")
    return out, proc


def copy_run(src, dst):
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns(".lock"))
    return dst


def test_every_output_file_and_column(tiny_run):
    out, proc = tiny_run
    for name in ("config.json", "results.csv", "spectra.npz", "curves.npz", "min_ratio.png",
                 "min_ratio.pdf"):
        assert (out / name).stat().st_size > 0, name
    rows = read_rows(out / "results.csv")
    assert [int(r["init_id"]) for r in rows] == list(range(6))
    assert set(COLUMNS) <= set(rows[0])
    p = int(rows[0]["n_params"])
    assert p == 3 + 3 + 3 + 1
    for r in rows:
        assert r["status"] in {"critical", "not_converged", "gradient_flat", "diverged"}
        assert int(r["n_pos"]) + int(r["n_neg"]) + int(r["n_null"]) == p
        assert float(r["min_ratio"]) == pytest.approx(int(r["n_pos"]) / p)
    with np.load(out / "spectra.npz", allow_pickle=False) as s:
        assert s["eigenvalues"].shape == (6, p)
        np.testing.assert_allclose(s["eigenvalues"].min(axis=1),
                                   [float(r["lambda_min"]) for r in rows], rtol=1e-12)
    with np.load(out / "curves.npz", allow_pickle=False) as c:
        assert c["train_loss"].shape == (6, 4) and list(c["train_step"]) == [0, 20, 40, 60]
    config = json.loads((out / "config.json").read_text())
    assert config["n_params"] == p and config["protocol"]["num_inits"] == 6
    assert config["protocol"]["vmap_width"] == 2
    assert "jax" in config["environment"]["packages"] and config["environment"]["devices"]
    assert "6 inits: critical" in proc.stdout
    assert "all (n=6): min ratio quantiles" in proc.stdout
    assert len(list((out / "chunks").glob("chunk_*.npz"))) == 3


def test_chunk_size_does_not_change_results(tiny_run, tmp_path):
    """Chunks of 2 (three chunks) and of 4 (the second one padded) give the same bits in every
    file, with groups of 2 vmapped inits."""
    out, _ = tiny_run
    run_app(*TINY, "--num_inits=6", "--chunk_size=4", f"--out_dir={tmp_path / 'c4'}")
    assert len(list((tmp_path / "c4" / "chunks").glob("chunk_*.npz"))) == 2
    assert assert_same_results(out, tmp_path / "c4") == DATA_FILES


def test_resume_after_lost_chunk_and_stray_temp_file(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = copy_run(out, tmp_path / "copy")
    config_before = (copy / "config.json").read_bytes()
    chunks = sorted((copy / "chunks").glob("chunk_*.npz"))
    chunks[1].unlink()                                   # inits 2-3 lost
    (copy / "chunks" / ".tmp_partial").write_bytes(b"half a chunk")  # an interrupted write
    (copy / "results.csv").unlink()
    proc = run_app(*TINY, "--num_inits=6", "--chunk_size=2", f"--out_dir={copy}")
    assert "resuming, 2 inits left" in proc.stdout
    assert assert_same_results(out, copy) == DATA_FILES
    # a resume keeps the config.json of the run it continues
    assert (copy / "config.json").read_bytes() == config_before


def test_chunk_size_and_resume_identity_in_the_default_compile_mode(tmp_path):
    """The bit-identity claims (any --chunk_size, a resumed run) also hold in the compile mode
    users run: every other app test sets JAX_DISABLE_MOST_OPTIMIZATIONS=1 to compile faster,
    and XLA's optimizations (fusion, reassociation) could differ between programs."""
    env = {k: v for k, v in ENV.items() if k != "JAX_DISABLE_MOST_OPTIMIZATIONS"}
    a, b = tmp_path / "c2", tmp_path / "c4"
    _run("min_ratio", *TINY, "--num_inits=4", "--chunk_size=2", f"--out_dir={a}", env=env,
         timeout=300)
    _run("min_ratio", *TINY, "--num_inits=4", "--chunk_size=4", f"--out_dir={b}", env=env,
         timeout=300)
    assert assert_same_results(a, b) == DATA_FILES
    resumed = copy_run(a, tmp_path / "resumed")
    sorted((resumed / "chunks").glob("chunk_*.npz"))[1].unlink()
    (resumed / "results.csv").unlink()
    proc = _run("min_ratio", *TINY, "--num_inits=4", "--chunk_size=2", f"--out_dir={resumed}",
                env=env, timeout=300)
    assert "resuming, 2 inits left" in proc.stdout
    assert assert_same_results(a, resumed) == DATA_FILES


def test_sigkill_mid_run_then_rerun_gives_identical_results(tiny_run, tmp_path):
    out, _ = tiny_run
    target = tmp_path / "killed"
    args = [*TINY, "--num_inits=6", "--chunk_size=2", f"--out_dir={target}"]
    kill_when("min_ratio", args, lambda: any((target / "chunks").glob("chunk_*.npz")))
    done = sorted(p.name for p in (target / "chunks").glob("chunk_*.npz"))
    assert 1 <= len(done) and not (target / "results.csv").exists()
    proc = run_app(*args)
    assert "resuming" in proc.stdout
    assert assert_same_results(out, target) == DATA_FILES


def test_other_config_refused_unless_overwrite(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = copy_run(out, tmp_path / "copy2")
    proc = run_app(*TINY, "--num_inits=6", "--seed=7", f"--out_dir={copy}", check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and "seed" in proc.stderr
    run_app(*TINY, "--num_inits=2", "--seed=7", f"--out_dir={copy}", "--overwrite")
    assert len(read_rows(copy / "results.csv")) == 2


def test_version_change_is_refused_on_resume(tiny_run, tmp_path):
    """Old chunks from other package versions are never mixed with new ones."""
    out, _ = tiny_run
    copy = copy_run(out, tmp_path / "copy_v")
    config = json.loads((copy / "config.json").read_text())
    config["environment"]["packages"]["jax"] = "0.0.1"
    (copy / "config.json").write_text(json.dumps(config))
    sorted((copy / "chunks").glob("chunk_*.npz"))[0].unlink()
    proc = run_app(*TINY, "--num_inits=6", "--chunk_size=2", f"--out_dir={copy}", check=False)
    assert proc.returncode != 0
    assert "other versions" in proc.stderr and "jax 0.0.1 ->" in proc.stderr
    assert len(list((copy / "chunks").glob("chunk_*.npz"))) == 2  # nothing computed


@pytest.mark.parametrize("damage", ["garbage", "truncated", "short_field"])
def test_damaged_chunk_is_named_and_never_loaded(tiny_run, tmp_path, damage):
    out, _ = tiny_run
    copy = copy_run(out, tmp_path / f"copy_{damage}")
    victim = sorted((copy / "chunks").glob("chunk_*.npz"))[0]
    if damage == "garbage":
        victim.write_bytes(b"not an npz")
    elif damage == "truncated":
        data = victim.read_bytes()
        victim.write_bytes(data[:len(data) // 2])
    else:  # a well-formed file whose curves hold one row for two inits
        with np.load(victim, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
        arrays["curve_loss"] = arrays["curve_loss"][:1]
        with open(victim, "wb") as fh:
            np.savez(fh, **arrays)
    (copy / "results.csv").unlink()
    proc = run_app(*TINY, "--num_inits=6", "--chunk_size=2", f"--out_dir={copy}", check=False)
    assert proc.returncode != 0 and victim.name in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (copy / "results.csv").exists()


def test_second_run_into_a_directory_in_use_is_refused(tiny_run, tmp_path):
    """While one run holds the results directory (its lock), another is refused before it
    reads or writes anything; once the holder ends (here: a process killed by SIGKILL, which
    cannot clean up) the directory is usable again."""
    out, _ = tiny_run
    copy = copy_run(out, tmp_path / "busy")
    (copy / "results.csv").unlink()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from crit import store; "
         f"store.lock_out_dir({str(copy)!r}); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        proc = run_app(*TINY, "--num_inits=6", "--chunk_size=2", f"--out_dir={copy}",
                       check=False)
        assert proc.returncode != 0 and "in use by another run" in proc.stderr
        assert f"pid {holder.pid}" in proc.stderr
        assert not (copy / "results.csv").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    run_app(*TINY, "--num_inits=6", "--chunk_size=2", f"--out_dir={copy}")
    assert assert_same_results(out, copy) == DATA_FILES


def test_memory_plan_is_checked_before_compute(tmp_path):
    """The width, not the chunk, sets peak memory: a width that does not fit is refused naming
    --vmap_width; when one init does not fit, the message names --hessian=lanczos."""
    from crit.problems import mlp_problem
    from crit.protocol import ProtocolConfig, estimate_bytes_per_init

    problem = mlp_problem("sinc", widths=(3,), n_points=16)
    per_init = estimate_bytes_per_init(problem, ProtocolConfig(hessian="dense"))
    gib = 3.5 * per_init / 2**30                  # room for 3 inits, not 6
    proc = run_app(*TINY, "--vmap_width=6", f"--memory_gb={gib}", "--num_inits=6",
                   f"--out_dir={tmp_path / 'w'}", check=False)
    assert proc.returncode != 0 and "--vmap_width=3 or less" in proc.stderr
    assert not (tmp_path / "w").exists()
    proc = run_app(*TINY, f"--memory_gb={0.5 * per_init / 2**30}",
                   f"--out_dir={tmp_path / 'one'}", check=False)
    assert proc.returncode != 0 and "--hessian=lanczos" in proc.stderr
    assert not (tmp_path / "one").exists()
    # automatic width under the same budget: chosen to fit, and the run goes through
    proc = run_app(*[a for a in TINY if not a.startswith("--vmap_width")], f"--memory_gb={gib}",
                   "--num_inits=3", f"--out_dir={tmp_path / 'auto'}")
    assert json.loads((tmp_path / "auto" / "config.json").read_text()
                      )["protocol"]["vmap_width"] == 1
    assert "groups of 1" in proc.stdout


@pytest.mark.parametrize("flag, needle", [
    ("--num_inits=0", "--num_inits"),
    ("--widths=4,x", "--widths"),
    ("--widths=4,-2", "--widths"),
    ("--activation=swish", "activation"),
    ("--eig_tol=-1", "--eig_tol"),
    ("--grad_tol=nan", "--grad_tol"),
    ("--loss=xent", "--loss=xent"),
    ("--learning_rate=0", "--learning_rate"),
    ("--chunk_size=-3", "--chunk_size"),
    ("--memory_gb=-1", "--memory_gb"),
    ("--vmap_width=-1", "--vmap_width"),
    ("--spectrum_dtype=float16", "spectrum_dtype"),
])
def test_bad_flags_fail_before_compute(flag, needle, tmp_path):
    out = tmp_path / "never"
    proc = run_app(*TINY, flag, f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not out.exists()


def test_float32_spectrum_with_lanczos_is_refused_before_compute(tmp_path):
    for extra in (["--hessian=lanczos"], ["--hessian=auto", "--dense_max_params=5"]):
        out = tmp_path / "never"
        proc = run_app(*TINY, "--spectrum_dtype=float32", *extra, f"--out_dir={out}",
                       check=False)
        assert proc.returncode != 0 and "--spectrum_dtype=float32" in proc.stderr
        assert not out.exists()


def test_matmul_precision_is_set_recorded_and_in_the_fingerprint(tiny_run, tmp_path):
    """JAX's default matmul precision (TF32 / bfloat16 passes for float32 dots on GPU / TPU) is
    never left implicit: config.json records the value set, and a resume under another is
    refused before any compute."""
    out, _ = tiny_run
    config = json.loads((out / "config.json").read_text())
    assert config["environment"]["matmul_precision"] == "highest"
    assert config["protocol"]["matmul_precision"] == "highest"
    copy = copy_run(out, tmp_path / "copy_mp")
    proc = run_app(*TINY, "--num_inits=6", "--chunk_size=2", "--matmul_precision=default",
                   f"--out_dir={copy}", check=False)
    assert proc.returncode != 0 and "matmul_precision" in proc.stderr


@pytest.mark.parametrize("app", ["min_ratio", "spectrum"])
def test_model_that_computes_in_float32_is_refused_before_compute(app, tmp_path):
    """A fork's float32 layer under float64 parameters rounds at 1e-7, not at the float64
    allowance every tolerance here assumes: refused, naming the dtype, nothing written."""
    out = tmp_path / "never"
    proc = _run(app, "--model=tests.fork_models:Float32LayerMLP", "--n_points=16",
                "--train_steps=5", f"--out_dir={out}", check=False, timeout=300)
    assert proc.returncode != 0, proc.stdout
    assert "float32" in proc.stderr and "experiments.analyze" in proc.stderr
    assert not out.exists()


def test_lanczos_summaries_pool_inits_at_one_tolerance(tmp_path):
    """--krylov_tol=resolved picks τ per init; the pooled columns read every init at one τ,
    the coarsest per-init resolved one, never above --resolve_ceiling (issue 24 point 6)."""
    out = tmp_path / "k"
    proc = run_app("--widths=8", "--n_points=16", "--train_steps=40", "--log_every=20",
                   "--finder_steps=3", "--progress=false", "--num_inits=3", "--hessian=lanczos",
                   "--lanczos_steps=12", "--slq_probes=3", "--krylov_tol=resolved",
                   f"--out_dir={out}")
    rows = read_rows(out / "results.csv")
    common = {float(r["tolerance_common_rel"]) for r in rows}
    assert len(common) == 1
    (tau,) = common
    assert tau <= 1e-2 * (1 + 1e-9)
    resolved = [float(r["tolerance_rel"]) for r in rows if r["resolved"] == "True"]
    if resolved:
        assert tau == pytest.approx(max(resolved), rel=1e-9)
    for r in rows:
        assert float(r["min_ratio_common_lo"]) <= float(r["min_ratio_common"]) <= float(
            r["min_ratio_common_hi"])
        if float(r["tolerance_rel"]) == pytest.approx(tau, rel=1e-9):
            assert float(r["min_ratio_common"]) == pytest.approx(float(r["min_ratio_est"]))
    assert f"one τ = {tau:.0e}" in proc.stdout


def test_float32_search_reproduces_the_float64_proof(tmp_path):
    """--hvp_dtype=float32 (issue 24 point 3): the same points, searched in float32, proved in
    float64: the verdicts and λ_max agree, the proven λ_min bounds agree to the float32 search
    error, and the float64 products are counted."""
    args = ["--widths=8", "--n_points=16", "--train_steps=40", "--log_every=20",
            "--finder=gradnorm", "--finder_steps=5", "--progress=false", "--num_inits=2",
            "--hessian=lanczos", "--lanczos_steps=16", "--slq_probes=2"]
    run_app(*args, f"--out_dir={tmp_path / 'f64'}")
    run_app(*args, "--hvp_dtype=float32", f"--out_dir={tmp_path / 'f32'}")
    f64, f32 = read_rows(tmp_path / "f64" / "results.csv"), read_rows(tmp_path / "f32" / "results.csv")
    for a, b in zip(f64, f32):
        assert a["verdict"] == b["verdict"] and a["negative_proven"] == b["negative_proven"]
        assert float(a["search_error"]) == 0 and int(a["num_check_matvecs"]) == 0
        assert 0 < float(b["search_error"]) < 1e-4 * float(a["lambda_max"])
        assert int(b["num_check_matvecs"]) > 0
        assert float(b["lambda_max"]) == pytest.approx(float(a["lambda_max"]), rel=1e-5)
        assert abs(float(b["lambda_min_bound"]) - float(a["lambda_min_bound"])) <= 1e-5 * float(
            a["lambda_max"])
    dense = run_app(*args[:-3], "--hessian=dense", "--hvp_dtype=float32",
                    f"--out_dir={tmp_path / 'never'}", check=False)
    assert dense.returncode != 0 and "--hvp_dtype" in dense.stderr


def test_out_dir_that_is_a_file(tmp_path):
    f = tmp_path / "a_file"
    f.write_text("x")
    proc = run_app(*TINY, f"--out_dir={f}", check=False)
    assert proc.returncode != 0 and "is a file" in proc.stderr


def test_foreign_directory_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    proc = run_app(*TINY, f"--out_dir={tmp_path}", "--overwrite", check=False)
    assert proc.returncode != 0 and "notes.txt" in proc.stderr
    assert (tmp_path / "notes.txt").exists()


def test_lanczos_mode_agrees_with_dense(tmp_path):
    """Same points (gradnorm finder) analysed both ways at P = 321 with 40 Lanczos steps
    (P >> steps: no breakdown makes Lanczos exact): the exact fractions lie in the SLQ
    intervals, and converged extremal Ritz values match eigvalsh. Krylov estimates sit in *_est
    columns, never in the exact-count columns."""
    common = ["--widths=16,16", "--n_points=24", "--train_steps=60", "--log_every=20",
              "--finder=gradnorm", "--finder_steps=10", "--progress=false", "--num_inits=2"]
    run_app(*common, "--hessian=dense", f"--out_dir={tmp_path / 'dense'}")
    run_app(*common, "--hessian=lanczos", "--lanczos_steps=40", "--slq_probes=6",
            "--hvp_batch_size=7", "--krylov_tol=machine", f"--out_dir={tmp_path / 'lanczos'}")
    dense = read_rows(tmp_path / "dense" / "results.csv")
    krylov = read_rows(tmp_path / "lanczos" / "results.csv")
    assert int(dense[0]["n_params"]) == 321 and len(krylov) == 2
    assert not {"n_pos", "n_neg", "n_null", "min_ratio", "index"} & set(krylov[0])
    for d, k in zip(dense, krylov):
        assert d["status"] == k["status"]
        for f in ("min_ratio", "index", "null_fraction"):
            assert float(k[f + "_lo"]) <= float(d[f]) <= float(k[f + "_hi"]), f
            assert float(k[f + "_lo"]) <= float(k[f + "_est"]) <= float(k[f + "_hi"]), f
        assert k["lambda_max_converged"] == "True"
        assert float(k["lambda_max"]) == pytest.approx(float(d["lambda_max"]), rel=1e-8)
        if k["lambda_min_converged"] == "True":
            assert float(k["lambda_min"]) == pytest.approx(float(d["lambda_min"]), rel=1e-6,
                                                           abs=1e-9 * float(d["lambda_max"]))
            assert k["negative_proven"] == d["negative_proven"]
        assert float(k["lambda_min_bound"]) >= float(d["lambda_min"]) - 1e-12
    with np.load(tmp_path / "lanczos" / "spectra.npz", allow_pickle=False) as s:
        assert s["slq_nodes"].shape == (2, 6, 40) and "eigenvalues" not in s.files


def test_krylov_and_dense_verdicts_agree_at_certified_points(tmp_path):
    """A P = 9 net with L2 0.05 where gradient-norm descent certifies every point (the same
    finder, so the same points in both modes): the dense verdict (exact eigenvalues) and the
    Krylov one (HVPs only) agree at each, and the summary counts them."""
    common = ["--dataset=gaussian", "--widths=2", "--n_points=16", "--dim_in=2", "--l2=0.05",
              "--num_inits=4", "--train_steps=300", "--learning_rate=0.05",
              "--finder=gradnorm", "--finder_steps=2000", "--finder_lr=0.01",
              "--progress=false"]
    dense = run_app(*common, "--hessian=dense", f"--out_dir={tmp_path / 'dense'}")
    krylov = run_app(*common, "--hessian=lanczos", "--lanczos_steps=12", "--slq_probes=2",
                     f"--out_dir={tmp_path / 'lanczos'}")
    d_rows = read_rows(tmp_path / "dense" / "results.csv")
    k_rows = read_rows(tmp_path / "lanczos" / "results.csv")
    for d, k in zip(d_rows, k_rows):
        assert d["status"] == k["status"] == "critical"
        assert d["verdict"] == "minimum" and k["verdict"] == "no_negative_found"
        assert d["negative_proven"] == k["negative_proven"] == "False"
        assert 0 <= float(k["negative_excluded_below"]) < 1e-6 * float(k["lambda_max"])
    assert "verdicts: minimum (all eigenvalues > τ) 4" in dense.stdout
    assert "verdicts: no negative eigenvalue found 4" in krylov.stdout


KRYLOV_ONLY_GIVEN = ["--hvp_batch_size=7", "--lanczos_steps=40", "--slq_probes=3",
                     "--krylov_tol=machine", "--nodeflate", "--hvp_budget=1000",
                     "--target_rel_tol=1e-3", "--resolve_width=0.1"]


def test_krylov_flags_with_dense_hessian_are_refused_before_compute(tmp_path):
    """--hessian=dense never reads the Krylov flags: set to other values they are refused, all
    named in one message, before anything is computed. The same flags at their defaults, and
    --minres_iters (the verdict margin's Newton step uses it in both modes), are accepted: the
    second run fails only on --num_inits=0, which keeps it from computing."""
    out = tmp_path / "never"
    proc = run_app(*TINY, "--hessian=dense", *KRYLOV_ONLY_GIVEN, f"--out_dir={out}",
                   check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    for flag in KRYLOV_ONLY_GIVEN:
        name = flag.removeprefix("--no").removeprefix("--").split("=")[0]
        assert f"--{name}=" in proc.stderr and "applies to --hessian=lanczos only" in proc.stderr
    assert not out.exists()
    proc = run_app(*TINY, "--hessian=dense", "--lanczos_steps=90", "--deflate",
                   "--krylov_tol=resolved", "--minres_iters=7", "--num_inits=0",
                   f"--out_dir={out}", check=False)
    assert proc.returncode != 0 and "--num_inits=0" in proc.stderr
    assert "applies to --hessian=lanczos only" not in proc.stderr
    assert not out.exists()


BATCH_STATS = ["--model=resnet", "--dataset=digits_images", "--model_arg=depth=8",
               "--model_arg=width=1", "--n_points=16", "--batchnorm=batch",
               "--hessian=lanczos", "--eval_batch_size=8", "--progress=false"]


def test_hvp_batches_other_than_eval_batches_under_batch_statistics_are_refused(tmp_path):
    """With --batchnorm=batch the loss depends on the batching: HVP batches of 4 rows against
    eval batches of 8 would be another function, refused before compute, naming both flags.
    HVP batches equal to the eval batches (the same function) pass this check: that run fails
    only on --num_inits=0."""
    out = tmp_path / "never"
    proc = run_app(*BATCH_STATS, "--hvp_batch_size=4", f"--out_dir={out}", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--hvp_batch_size=4 with --batchnorm=batch" in proc.stderr
    assert "--eval_batch_size=8" in proc.stderr
    assert not out.exists()
    proc = run_app(*BATCH_STATS, "--hvp_batch_size=8", "--num_inits=0", f"--out_dir={out}",
                   check=False)
    assert proc.returncode != 0 and "--num_inits=0" in proc.stderr
    assert "--batchnorm=batch:" not in proc.stderr and not out.exists()


def test_hvp_batches_equal_to_eval_batches_are_the_same_function_under_batch_statistics():
    """Why the refusal above: under batch statistics the gradient and HVPs summed over HVP
    batches are those of the reported loss (eval batches of 8, the last one short) only when
    the batches coincide; batches of 4 give another function."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from crit.data import DATASETS
    from crit.hessian import full_batch_hvp_operator, hvp_operator
    from crit.problems import make_problem

    class NormNet(nn.Module):  # BatchNorm: in batch mode each batch its own statistics
        @nn.compact
        def __call__(self, x, train: bool = False):
            x = nn.Dense(3, param_dtype=jnp.float64)(x)
            x = nn.BatchNorm(use_running_average=not train, param_dtype=jnp.float64)(x)
            return nn.Dense(1, param_dtype=jnp.float64)(jnp.tanh(x))

    data = DATASETS["gaussian"](n_points=20, seed=0, dim_in=2, dim_out=1)
    problem = make_problem(NormNet(), data, "mse", batchnorm="batch", eval_batch_size=8)
    assert problem.batchnorm == "batch"
    params = problem.init_fn(jax.random.PRNGKey(0))
    v = jax.random.normal(jax.random.PRNGKey(1), (problem.n_params,), jnp.float64)
    x, y = jnp.asarray(data.x_train), jnp.asarray(data.y_train)

    @jax.jit
    def both(params, v):  # (g, Hv) of the reported loss, then summed over batches of 8 and 4
        g, matvec = hvp_operator(problem.loss_fn, params)
        out = [(g, matvec(v))]
        for rows in (8, 4):
            gb, mb = full_batch_hvp_operator(problem.batch_loss_fn, params, x, y, rows)
            out.append((gb, mb(v)))
        return out

    (g, hv), (same_g, same_hv), (other_g, other_hv) = both(params, v)
    np.testing.assert_allclose(same_g, g, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(same_hv, hv, rtol=1e-9, atol=1e-12)
    assert jnp.linalg.norm(other_g - g) > 1e-2 * jnp.linalg.norm(g)
    assert jnp.linalg.norm(other_hv - hv) > 1e-2 * jnp.linalg.norm(hv)
