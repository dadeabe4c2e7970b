"""Sharding the init axis: results equal across device counts, processes and chunk sizes; every
process checks the configuration; the split of the work is a function of the flags alone."""

import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from crit.parallel import process_chunks, process_share, round_to_devices
from tests.app_runner import ENV, ROOT, read_rows, run_app

TINY = ["--widths=3", "--n_points=16", "--train_steps=60", "--log_every=20",
        "--finder_steps=4", "--progress=false", "--vmap_width=2", "--num_inits=6"]
ALL_APPS = {p.stem: p.read_text() for p in (ROOT / "experiments").glob("*.py")
            if "app.run(main)" in p.read_text()}
# apps that run on many processes import the cluster flags (experiments/cluster.py)
MULTI_PROCESS = sorted(a for a, text in ALL_APPS.items()
                       if "import cluster" in text or "cluster," in text)
APPS = sorted(set(ALL_APPS) - set(MULTI_PROCESS))


def test_the_apps_that_run_on_many_processes_are_the_documented_ones():
    assert MULTI_PROCESS == ["edge_of_stability", "min_ratio", "spectrum"]


def launch(args, extra_env=None):
    env = dict(os.environ, PYTHONPATH=str(ROOT), **(extra_env or {}))
    return subprocess.Popen([sys.executable, "-m", "experiments.min_ratio", *TINY, *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def finish(proc, ok=True):
    out, err = proc.communicate(timeout=300)
    if ok:
        assert proc.returncode == 0, out + err
    return out, err


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_processes(out, per_process_args=((), ()), shared=()):
    port = free_port()
    common = [f"--out_dir={out}", f"--coordinator_address=127.0.0.1:{port}",
              "--num_processes=2", "--assemble_timeout=240", "--startup_timeout=120", *shared]
    return [launch(common + [f"--process_id={i}", *per_process_args[i]], {"JAX_PLATFORMS": "cpu"})
            for i in range(2)]


def chunk_ids(out):
    """{chunk file name: its init ids} of a results directory."""
    ids = {}
    for p in sorted((Path(out) / "chunks").glob("chunk_*.npz")):
        with np.load(p, allow_pickle=False) as z:
            ids[p.name] = z["init_id"].tolist()
    return ids


def assert_same_results(a, b):
    ra, rb = read_rows(Path(a) / "results.csv"), read_rows(Path(b) / "results.csv")
    assert [r["init_id"] for r in ra] == [r["init_id"] for r in rb] == [str(i) for i in range(6)]
    for x, y in zip(ra, rb):
        assert x["status"] == y["status"] and x["n_pos"] == y["n_pos"] and x["n_neg"] == y["n_neg"]
        for col in ("loss", "grad_norm", "lambda_min", "lambda_max"):
            assert float(x[col]) == pytest.approx(float(y[col]), rel=1e-9, abs=1e-14), col
    sa, sb = (np.load(Path(d) / "spectra.npz", allow_pickle=False)["eigenvalues"] for d in (a, b))
    # Not bit for bit across device counts: with 4 host devices XLA's CPU kernels split their
    # work over fewer threads per device and sum in another order (measured: 2e-12 relative).
    # Across chunk sizes on one device the results are bit-identical (test_min_ratio_cli).
    np.testing.assert_allclose(sa, sb, rtol=1e-9, atol=1e-12)


@pytest.fixture(scope="module")
def one_device(tmp_path_factory):
    out = tmp_path_factory.mktemp("par") / "one"
    finish(launch([f"--out_dir={out}", "--chunk_size=2"]))
    return out


def test_four_forced_host_devices_match_one_device(one_device, tmp_path):
    out = tmp_path / "four"
    text, _ = finish(launch([f"--out_dir={out}", "--chunk_size=8"],
                            {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}))
    assert "over 4 device(s)" in text
    assert_same_results(one_device, out)


def test_two_processes_match_one_process(one_device, tmp_path):
    out = tmp_path / "two"
    texts = [finish(p)[0] for p in two_processes(out, shared=["--chunk_size=2"])]
    assert "process 0/2" in texts[0] and "process 1/2" in texts[1]
    # units of 2 ids (the vmap width), round robin: process 0 owns 0,1,4,5 and process 1 owns 2,3
    assert chunk_ids(out) == {"chunk_0000000_000002.npz": [0, 1],
                              "chunk_0000002_000002.npz": [2, 3],
                              "chunk_0000004_000002.npz": [4, 5]}
    assert_same_results(one_device, out)


def test_processes_with_different_memory_split_the_work_identically(tmp_path):
    """Process 0 has 8 GiB and takes chunks of 3; process 1 has room for one init and the
    results of two, so it plans chunks of 1. The chunk sizes differ; who computes which init
    does not (before, the split followed each process's chunk size: overlaps and holes)."""
    from crit.problems import mlp_problem
    from crit.protocol import ProtocolConfig, estimate_bytes_per_init

    per_init = estimate_bytes_per_init(mlp_problem("sinc", widths=(3,), n_points=16),
                                       ProtocolConfig(hessian="dense"))
    tight = (per_init + 1000) / 2**30
    out = tmp_path / "mem"
    procs = two_processes(out, (("--memory_gb=8", "--chunk_size=3"), (f"--memory_gb={tight}",)),
                          shared=["--vmap_width=1"])
    texts = [finish(p)[0] for p in procs]
    assert "3 inits in 1 chunks of 3" in texts[0]
    assert "3 inits in 3 chunks of 1" in texts[1]
    assert chunk_ids(out) == {"chunk_0000000_000003.npz": [0, 2, 4],
                              "chunk_0000001_000001.npz": [1],
                              "chunk_0000003_000001.npz": [3],
                              "chunk_0000005_000001.npz": [5]}
    assert [r["init_id"] for r in read_rows(out / "results.csv")] == [str(i) for i in range(6)]


def test_non_lead_process_refuses_a_directory_of_another_configuration(one_device, tmp_path):
    """Every process refuses the same way; none computes into the old run's directory."""
    copy = tmp_path / "other"
    shutil.copytree(one_device, copy, ignore=shutil.ignore_patterns(".lock"))
    (copy / "results.csv").unlink()
    for p in (copy / "chunks").glob("chunk_0000002*"):
        p.unlink()  # something left to compute, were a process to go ahead
    before = {p.name: p.stat().st_mtime_ns for p in (copy / "chunks").iterdir()}
    procs = two_processes(copy, shared=["--seed=7"])
    (_, err0), (_, err1) = (finish(p, ok=False) for p in procs)
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert "different configuration" in err0 and "seed" in err0
    assert "different configuration" in err1 and "seed" in err1
    assert {p.name: p.stat().st_mtime_ns for p in (copy / "chunks").iterdir()} == before


def test_processes_started_with_different_flags_all_stop(tmp_path):
    out = tmp_path / "mixed"
    procs = two_processes(out, ((), ("--seed=7",)))
    (_, err0), (_, err1) = (finish(p, ok=False) for p in procs)
    assert procs[0].returncode != 0 and procs[1].returncode != 0
    assert "process 1: " in err1 and "seed: 0 -> 7" in err1
    assert "other processes refused" in err0
    assert not list((out / "chunks").glob("chunk_*.npz"))


def test_overwrite_on_many_processes_recomputes_everything(one_device, tmp_path):
    """With --overwrite a non-lead never loads chunks the lead is about to delete: it waits for
    the lead's verdict, so the run ends with the new configuration's results only."""
    copy = tmp_path / "over"
    shutil.copytree(one_device, copy, ignore=shutil.ignore_patterns(".lock"))
    procs = two_processes(copy, shared=["--seed=7", "--overwrite"])
    for p in procs:
        finish(p)
    rows = read_rows(copy / "results.csv")
    old = read_rows(one_device / "results.csv")
    assert [r["init_id"] for r in rows] == [str(i) for i in range(6)]
    assert all(a["loss"] != b["loss"] for a, b in zip(rows, old))


def test_process_share_partitions_all_ids_whatever_the_chunk_size():
    for n, unit, q in ((10, 3, 3), (100, 10, 2), (7, 2, 4), (5, 10, 2)):
        shares = [process_share(n, unit, p, q) for p in range(q)]
        np.testing.assert_array_equal(np.sort(np.concatenate(shares)), np.arange(n))
        for p in range(q):
            for chunk in (unit, 2 * unit, 5 * unit):
                got = np.concatenate(process_chunks(np.arange(n), chunk, p, q, unit=unit,
                                                    num_inits=n) or [np.zeros(0, int)])
                np.testing.assert_array_equal(got, shares[p])
    # what is already on disk never moves an id to another process
    todo = np.array([1, 2, 7, 8, 9])
    mine = process_chunks(todo, 2, 1, 2, unit=3, num_inits=10)
    assert [c.tolist() for c in mine] == [[9]]  # process 1 owns 3, 4, 5 and 9
    mine = process_chunks(todo, 2, 0, 2, unit=3, num_inits=10)
    assert [c.tolist() for c in mine] == [[1, 2], [7, 8]]  # process 0 owns 0-2 and 6-8
    assert round_to_devices(5, 4) == 8 and round_to_devices(8, 4) == 8


def test_no_recompilation_between_chunks():
    from crit.problems import mlp_problem
    from crit.protocol import ProtocolConfig, make_chunk_fn, run_chunk

    problem = mlp_problem("sinc", widths=(2,), n_points=8)
    fn = make_chunk_fn(problem, ProtocolConfig(train_steps=10, finder_steps=2))
    for ids in (np.arange(3), np.arange(3, 6), np.arange(6, 7)):  # the last one padded
        run_chunk(fn, ids, 3)
    assert fn._cache_size() == 1


def test_cluster_flags_are_checked(tmp_path):
    proc = launch([f"--out_dir={tmp_path / 'x'}", "--coordinator_address=localhost:1",
                   "--num_processes=2", "--process_id=2"])
    out, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "--process_id" in err


@pytest.mark.parametrize("app", APPS)
def test_single_process_apps_refuse_cluster_flags(app, tmp_path):
    """Only min_ratio, spectrum and edge_of_stability split their work over processes; every
    other app refuses the cluster flags before any compute instead of running the whole job
    once per process."""
    out = tmp_path / "never"
    proc = run_app(app, "--coordinator_address=127.0.0.1:1", "--num_processes=2",
                   "--process_id=1", f"--out_dir={out}", check=False, timeout=120)
    assert proc.returncode != 0
    assert "coordinator_address" in proc.stderr
    assert not out.exists()
