"""The results directory: durable renames, the lock, version changes, damaged chunks; the memory
plan that sizes vmap groups and chunks."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from crit import store
from crit.protocol import MemoryPlanError, plan_memory, plan_vmap_width
from tests.app_runner import ROOT

CONFIG = {"protocol": {"seed": 0, "num_inits": 4},
          "environment": {"crit": "0.2.0", "python": "3.11.7",
                          "packages": {"jax": "0.10.2", "numpy": "2.4.6"},
                          "devices": ["cpu:0"], "process_count": 1}}


def test_atomic_write_fsyncs_the_file_and_its_directory(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def spy(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(os, "fsync", spy)
    store.atomic_write_text(tmp_path / "a.txt", "x")
    assert (tmp_path / "a.txt").read_text() == "x"
    assert synced[-1] == str(tmp_path)          # the directory, after the rename
    assert synced[0].startswith(str(tmp_path / ".tmp_"))  # the file, before it
    assert oct((tmp_path / "a.txt").stat().st_mode & 0o777) != oct(0o600)  # readable by others


def test_resume_keeps_config_and_refuses_a_version_change(tmp_path):
    out = tmp_path / "run"
    assert store.prepare_out_dir(out, CONFIG) is False
    written = (out / "config.json").read_text()
    later = json.loads(json.dumps(CONFIG))
    later["environment"]["devices"] = ["cpu:0", "cpu:1"]      # devices may change
    assert store.prepare_out_dir(out, later) is True
    assert (out / "config.json").read_text() == written       # kept as it was
    newer = json.loads(json.dumps(CONFIG))
    newer["environment"]["packages"]["jax"] = "0.11.0"
    with pytest.raises(store.ResultsDirError, match="jax 0.10.2 -> 0.11.0"):
        store.prepare_out_dir(out, newer)
    with pytest.raises(store.ResultsDirError, match="jax 0.10.2 -> 0.11.0"):
        store.check_config(out, newer)
    store.check_config(out, later)
    assert store.prepare_out_dir(out, newer, overwrite=True) is False
    assert json.loads((out / "config.json").read_text())["environment"]["packages"]["jax"] == "0.11.0"


def test_lock_refuses_a_second_holder_and_dies_with_its_process(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import time; from crit import store; "
         f"store.lock_out_dir({str(out)!r}); print('locked', flush=True); time.sleep(600)"],
        stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(store.ResultsDirError, match=f"pid {holder.pid}"):
            store.prepare_out_dir(out, CONFIG)
        assert not (out / "config.json").exists()
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
    assert store.prepare_out_dir(out, CONFIG) is False  # a killed holder leaves no stale lock
    store.lock_out_dir(out)                             # re-entrant in the holding process


def test_overwrite_keeps_the_lock_file_and_foreign_check_ignores_it(tmp_path):
    out = tmp_path / "run"
    store.prepare_out_dir(out, CONFIG)
    other = dict(CONFIG, protocol={"seed": 1, "num_inits": 4})
    store.prepare_out_dir(out, other, overwrite=True)
    assert (out / store.LOCK).exists()


def test_chunk_with_a_field_of_the_wrong_length_is_named(tmp_path):
    out = tmp_path / "run"
    store.prepare_out_dir(out, CONFIG)
    path = store.write_chunk(out, {"init_id": np.arange(2), "loss": np.zeros(2)})
    store.write_chunk(out, {"init_id": np.arange(2, 4), "loss": np.zeros(1)})
    with pytest.raises(store.ResultsDirError, match="chunk_0000002_000002.npz is damaged"):
        store.load_chunks(out)
    path.write_bytes(path.read_bytes()[:40])
    with pytest.raises(store.ResultsDirError, match=path.name):
        store.load_chunks(out)


# ------------------------------------------------------------------------------- memory plan

GIB = 2**30


def test_automatic_width_bounds_peak_memory_by_the_device():
    """The review's case: a dense-Newton run near --dense_max_params needs ~0.53 GiB per init;
    the old plan vmapped 512 of them (~270 GiB). Now the width fits half an 80 GiB device."""
    per_init = int(0.53 * GIB)
    width = plan_vmap_width(per_init, 80 * GIB, 1000, requested=0, default=512)
    assert 1 <= width <= 75 and width * per_init <= 40 * GIB
    plan = plan_memory(per_init, 30_000, 1000, 1, free_bytes=78 * GIB, vmap_width=width)
    assert plan.peak_bytes <= plan.budget_bytes
    assert plan.chunk_size % width == 0
    # the width follows the device's capacity, not what is free: the same on every process
    assert plan_vmap_width(per_init, 80 * GIB, 1000, default=512) == width


def test_requested_width_that_does_not_fit_names_vmap_width():
    with pytest.raises(MemoryPlanError, match="--vmap_width=512: .* use --vmap_width=37 or less"):
        plan_memory(int(2 * GIB), 1000, 1000, 1, free_bytes=75 * GIB, vmap_width=512)


def test_one_init_too_big_names_the_hint():
    with pytest.raises(MemoryPlanError, match="--hessian=lanczos"):
        plan_vmap_width(100 * GIB, 80 * GIB, 10, too_big_hint="use --hessian=lanczos")
    with pytest.raises(MemoryPlanError, match="--hessian=lanczos"):
        plan_memory(100 * GIB, 1000, 10, 1, free_bytes=80 * GIB, vmap_width=1,
                    too_big_hint="use --hessian=lanczos")


def test_chunk_results_are_part_of_the_plan():
    # a chunk's results alone exceed what is left next to the working set
    with pytest.raises(MemoryPlanError, match="--chunk_size=1000"):
        plan_memory(GIB, GIB // 10, 1000, 1, free_bytes=20 * GIB, vmap_width=10,
                    chunk_size=1000)
    plan = plan_memory(GIB, GIB // 10, 1000, 2, free_bytes=20 * GIB, vmap_width=10)
    assert plan.chunk_size % 20 == 0 and plan.peak_bytes <= 20 * GIB
