"""Running experiment apps from tests: a subprocess per run, a certain SIGKILL, result comparison.

Shared by the CLI tests of every app (absl flags are global, so each run is its own process).
"""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
# Tests check the plumbing, not speed: skipping most XLA optimizations halves compile time.
# Every app run shares a persistent compilation cache: a program compiled by one run (the same
# configuration resumed, killed or rerun) is loaded, not compiled again, by the next. A cached
# executable is the same executable, so bit-identity checks between runs are unaffected.
CACHE = ROOT / ".jax_cache"
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu",
       "JAX_DISABLE_MOST_OPTIMIZATIONS": "1", "JAX_COMPILATION_CACHE_DIR": str(CACHE),
       "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0.5"}


def run_app(module: str, *args: str, check: bool = True, timeout: float = 600,
            env: dict | None = None) -> subprocess.CompletedProcess:
    """``python -m experiments.<module> *args``; raises with stdout/stderr when ``check`` fails."""
    proc = subprocess.run([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                          env=env or ENV, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
    return proc


def start_app(module: str, *args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", f"experiments.{module}", *args], cwd=ROOT,
                            env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)


def kill_when(module: str, args: Iterable[str], ready: Callable[[], bool],
              timeout: float = 300, poll: float = 0.01) -> None:
    """Start the app, wait until ``ready()`` (e.g. its first chunk or config.json exists), then
    SIGKILL it. Raises AssertionError unless the process was still running when killed, so a
    test built on this cannot pass because the run finished before the kill."""
    proc = start_app(module, *args)
    deadline = time.time() + timeout
    try:
        while not ready():
            if proc.poll() is not None:
                out, err = proc.communicate()
                raise AssertionError(f"{module} ended (exit {proc.returncode}) before the kill "
                                     f"point was reached\n{out}\n{err}")
            if time.time() > deadline:
                raise AssertionError(f"{module}: kill point not reached in {timeout} s")
            time.sleep(poll)
        assert proc.poll() is None, f"{module} finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"{module} was not killed: {proc.returncode}"
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def run_processes(module: str, args: Iterable[str], count: int = 2, port: int | None = None,
                  env_of: Callable[[int], dict] | None = None, check: bool = True,
                  timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """``count`` processes of ``python -m experiments.<module> *args`` started at once and
    waited for. With ``port``, process i also gets ``--coordinator_address=127.0.0.1:<port>
    --num_processes=<count> --process_id=i``; ``env_of(i)`` is its environment (default ENV).
    ``check``: every process must exit 0 (else raises with its output)."""
    args = list(args)
    procs = []
    for i in range(count):
        cluster = ([f"--coordinator_address=127.0.0.1:{port}", f"--num_processes={count}",
                    f"--process_id={i}"] if port is not None else [])
        procs.append(subprocess.Popen(
            [sys.executable, "-m", f"experiments.{module}", *args, *cluster], cwd=ROOT,
            env=env_of(i) if env_of else ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            text=True))
    done = []
    for i, proc in enumerate(procs):
        out, err = proc.communicate(timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{module} process {i} exit {proc.returncode}\n{out}\n{err}")
        done.append(subprocess.CompletedProcess(proc.args, proc.returncode, out, err))
    return done


def read_rows(path) -> list[dict]:
    with open(path) as fh:
        return list(csv.DictReader(fh))


def _npz(path) -> dict:
    with np.load(path, allow_pickle=False) as data:
        return {k: data[k] for k in data.files}


def assert_same_results(a: Path, b: Path, skip: Iterable[str] = ()) -> list[str]:
    """Every CSV, NPZ and JSON data file of results directory ``a`` equals ``b``'s: CSV text
    byte for byte, NPZ arrays exactly (NaN == NaN), JSON files equal except config.json's
    ``flags``/``environment`` (which may name another --out_dir). Figures are not compared
    (PDFs carry a creation date). Returns the names compared, so a caller can check they are
    the files it expects."""
    skip = set(skip)
    names = sorted(p.name for p in Path(a).iterdir()
                   if p.is_file() and p.suffix in (".csv", ".npz", ".json") and p.name not in skip)
    assert names, f"no data files in {a}"
    other = sorted(p.name for p in Path(b).iterdir()
                   if p.is_file() and p.suffix in (".csv", ".npz", ".json") and p.name not in skip)
    assert names == other, f"{a}: {names} vs {b}: {other}"
    for name in names:
        pa, pb = Path(a) / name, Path(b) / name
        if pa.suffix == ".csv":
            assert pa.read_text() == pb.read_text(), f"{name} differs"
        elif pa.suffix == ".npz":
            da, db = _npz(pa), _npz(pb)
            assert sorted(da) == sorted(db), f"{name}: keys {sorted(da)} vs {sorted(db)}"
            for key in da:
                assert da[key].shape == db[key].shape, f"{name}[{key}] shape"
                if da[key].dtype.kind in "fc":
                    np.testing.assert_array_equal(da[key], db[key], err_msg=f"{name}[{key}]")
                else:
                    assert np.array_equal(da[key], db[key]), f"{name}[{key}] differs"
        else:
            ja, jb = json.loads(pa.read_text()), json.loads(pb.read_text())
            if name == "config.json":
                for key in ("flags", "environment"):
                    ja.pop(key, None)
                    jb.pop(key, None)
            assert ja == jb, f"{name} differs"
    return names
