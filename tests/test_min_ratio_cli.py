"""The min_ratio app end to end on a tiny configuration: files, columns, resume, bad flags."""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--widths=3", "--n_points=16", "--train_steps=60", "--log_every=20",
        "--finder_steps=4", "--progress=false", "--vmap_width=1"]
COLUMNS = ["init_id", "status", "loss", "grad_norm", "n_params", "n_pos", "n_neg", "n_null",
           "min_ratio", "index", "lambda_min", "lambda_max", "tolerance", "finder_iterations"]


def run_app(*args, check=True):
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "experiments.min_ratio", *args], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def read_rows(path):
    with open(path) as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mr") / "run"
    proc = run_app(*TINY, "--num_inits=5", "--chunk_size=2", f"--out_dir={out}")
    return out, proc


def test_every_output_file_and_column(tiny_run):
    out, proc = tiny_run
    for name in ("config.json", "results.csv", "spectra.npz", "curves.npz", "min_ratio.png",
                 "min_ratio.pdf"):
        assert (out / name).stat().st_size > 0, name
    rows = read_rows(out / "results.csv")
    assert [int(r["init_id"]) for r in rows] == list(range(5))
    assert set(COLUMNS) <= set(rows[0])
    p = int(rows[0]["n_params"])
    assert p == 3 + 3 + 3 + 1
    for r in rows:
        assert r["status"] in {"critical", "not_converged", "gradient_flat", "diverged"}
        assert int(r["n_pos"]) + int(r["n_neg"]) + int(r["n_null"]) == p
        assert float(r["min_ratio"]) == pytest.approx(int(r["n_pos"]) / p)
    with np.load(out / "spectra.npz", allow_pickle=False) as s:
        assert s["eigenvalues"].shape == (5, p)
        np.testing.assert_allclose(s["eigenvalues"].min(axis=1),
                                   [float(r["lambda_min"]) for r in rows], rtol=1e-12)
    with np.load(out / "curves.npz", allow_pickle=False) as c:
        assert c["train_loss"].shape == (5, 4) and list(c["train_step"]) == [0, 20, 40, 60]
    config = json.loads((out / "config.json").read_text())
    assert config["n_params"] == p and config["protocol"]["num_inits"] == 5
    assert "jax" in config["environment"]["packages"] and config["environment"]["devices"]
    assert "5 inits:" in proc.stdout and "Spearman" in proc.stdout or "critical" in proc.stdout
    assert len(list((out / "chunks").glob("chunk_*.npz"))) == 3


def test_chunk_size_does_not_change_results(tiny_run, tmp_path):
    out, _ = tiny_run
    run_app(*TINY, "--num_inits=5", "--chunk_size=5", f"--out_dir={tmp_path / 'c5'}")
    a, b = read_rows(out / "results.csv"), read_rows(tmp_path / "c5" / "results.csv")
    assert a == b  # every column, bit for bit (the CSV keeps full float64 precision)


def test_resume_after_lost_chunk_and_stray_temp_file(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    chunks = sorted((copy / "chunks").glob("chunk_*.npz"))
    chunks[1].unlink()                                   # inits 2-3 lost
    (copy / "chunks" / ".tmp_partial").write_bytes(b"half a chunk")  # an interrupted write
    (copy / "results.csv").unlink()
    proc = run_app(*TINY, "--num_inits=5", "--chunk_size=2", f"--out_dir={copy}")
    assert "resuming, 2 inits left" in proc.stdout
    assert (copy / "results.csv").read_text() == (out / "results.csv").read_text()


def test_sigkill_mid_run_then_rerun_gives_identical_results(tiny_run, tmp_path):
    out, _ = tiny_run
    target = tmp_path / "killed"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    args = [sys.executable, "-m", "experiments.min_ratio", *TINY, "--num_inits=5",
            "--chunk_size=1", f"--out_dir={target}"]
    proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if len(list((target / "chunks").glob("chunk_*.npz"))) >= 2:
            break
        time.sleep(0.05)
    if proc.poll() is None:
        proc.send_signal(signal.SIGKILL)
    proc.wait()
    run_app(*TINY, "--num_inits=5", "--chunk_size=1", f"--out_dir={target}")
    a, b = read_rows(out / "results.csv"), read_rows(target / "results.csv")
    assert len(b) == 5
    for ra, rb in zip(a, b):
        assert ra["init_id"] == rb["init_id"] and ra["status"] == rb["status"]
        assert float(ra["loss"]) == pytest.approx(float(rb["loss"]), rel=1e-9)


def test_other_config_refused_unless_overwrite(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy2"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    proc = run_app(*TINY, "--num_inits=5", "--seed=7", f"--out_dir={copy}", check=False)
    assert proc.returncode != 0 and "--overwrite" in proc.stderr and "seed" in proc.stderr
    run_app(*TINY, "--num_inits=2", "--seed=7", f"--out_dir={copy}", "--overwrite")
    assert len(read_rows(copy / "results.csv")) == 2


def test_damaged_chunk_is_reported_by_name(tiny_run, tmp_path):
    out, _ = tiny_run
    copy = tmp_path / "copy3"
    subprocess.run(["cp", "-r", str(out), str(copy)], check=True)
    victim = sorted((copy / "chunks").glob("chunk_*.npz"))[0]
    victim.write_bytes(b"not an npz")
    proc = run_app(*TINY, "--num_inits=5", "--chunk_size=2", f"--out_dir={copy}", check=False)
    assert proc.returncode != 0 and victim.name in proc.stderr


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
])
def test_bad_flags_fail_before_compute(flag, needle, tmp_path):
    out = tmp_path / "never"
    proc = run_app(*TINY, flag, f"--out_dir={out}", check=False)
    assert proc.returncode != 0
    assert needle in proc.stderr
    assert not out.exists()


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
    """Same point (gradnorm finder) analysed both ways: the exact ratio lies in the SLQ interval
    and the extremal Ritz values match eigvalsh."""
    common = ["--widths=4", "--n_points=24", "--train_steps=60", "--log_every=20",
              "--finder=gradnorm", "--finder_steps=10", "--progress=false", "--num_inits=2"]
    run_app(*common, "--hessian=dense", f"--out_dir={tmp_path / 'dense'}")
    run_app(*common, "--hessian=lanczos", "--lanczos_steps=30", "--slq_probes=6",
            "--hvp_batch_size=7", f"--out_dir={tmp_path / 'lanczos'}")
    dense = read_rows(tmp_path / "dense" / "results.csv")
    krylov = read_rows(tmp_path / "lanczos" / "results.csv")
    for d, k in zip(dense, krylov):
        assert d["status"] == k["status"]
        assert float(k["min_ratio_lo"]) <= float(d["min_ratio"]) <= float(k["min_ratio_hi"])
        assert float(k["index_lo"]) <= float(d["index"]) <= float(k["index_hi"])
        for col in ("lambda_min", "lambda_max"):
            assert float(k[col]) == pytest.approx(float(d[col]), rel=1e-8)
    with np.load(tmp_path / "lanczos" / "spectra.npz", allow_pickle=False) as s:
        assert s["slq_nodes"].shape == (2, 6, 30) and "eigenvalues" not in s.files
