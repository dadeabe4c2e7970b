"""Spreading the init axis over devices and hosts.

Inits are independent, so crit needs no communication between them. The layout:

* **Devices of one process**: a chunk of inits is one array with a leading init axis, sharded
  over a 1-D :class:`jax.sharding.Mesh` of the process's local devices (axis name ``"inits"``);
  ``jit`` with those shardings lets XLA run each device's slice of the ``vmap`` on that device.
  The chunk size is rounded up to a multiple of the device count.
* **Processes (hosts)**: after ``jax.distributed.initialize()`` (JAX's multi-controller runtime on
  TPU pods and SLURM GPU clusters), process ``p`` of ``q`` owns the units (groups of ``vmap_width``
  consecutive ids) ``p, p + q, p + 2q, ...`` of all init ids (:func:`process_share`: a function
  of the flags alone), computes the ones not yet on disk in chunks sized by its own memory, and
  writes its own chunk files into the shared results directory; process 0 assembles the
  outputs once every chunk is on disk. Start-up goes through the coordinator's key-value store
  (:func:`publish`, :func:`receive`): see ``experiments/cluster.py``.

Init ``i`` always uses key ``fold_in(PRNGKey(seed), i)`` and the same program, so its numbers do
not depend on chunk size, device count or process count (up to the summation order inside XLA's
batched kernels: tests compare to 1e-9 relative).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

INIT_AXIS = "inits"


def maybe_initialize_distributed(coordinator_address: str | None = None,
                                 num_processes: int | None = None,
                                 process_id: int | None = None, auto: bool = False) -> None:
    """Start JAX's multi-controller runtime when asked.

    ``coordinator_address`` (host:port of process 0) with ``num_processes`` and ``process_id``
    starts it by hand (any cluster, or several processes on one machine); ``auto=True`` calls
    ``jax.distributed.initialize()`` with no arguments, which reads the cluster's environment
    (TPU pod metadata, SLURM variables). Neither: a single process, nothing to do.
    """
    if coordinator_address:
        jax.distributed.initialize(coordinator_address=coordinator_address,
                                   num_processes=num_processes, process_id=process_id)
    elif auto:
        jax.distributed.initialize()


def local_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A 1-D mesh over this process's devices with the axis name ``"inits"``."""
    devices = list(devices) if devices is not None else jax.local_devices()
    return Mesh(np.array(devices), (INIT_AXIS,))


def round_to_devices(chunk_size: int, n_devices: int) -> int:
    """The smallest multiple of ``n_devices`` that is at least ``chunk_size``."""
    return int(-(-chunk_size // n_devices) * n_devices)


def shard_inits(fn: Callable, mesh: Mesh) -> Callable:
    """``jit(shard_map(fn))``: each device runs ``fn`` on its own slice of the leading (init)
    axis of the input, and the outputs are stitched back along that axis.

    ``fn`` sees only its device's inits, so what it computes for an init cannot depend on how
    many devices share the chunk (no cross-device collectives are involved).
    """
    spec = PartitionSpec(INIT_AXIS)
    sharding = NamedSharding(mesh, spec)
    mapped = jax.shard_map(fn, mesh=mesh, in_specs=spec, out_specs=spec, check_vma=False)
    return jax.jit(mapped, in_shardings=sharding, out_shardings=sharding)


def process_share(num_inits: int, unit: int, process_index: int = 0,
                  process_count: int = 1) -> np.ndarray:
    """The init ids process ``process_index`` of ``process_count`` owns, ascending.

    Ids are cut into consecutive units of ``unit`` (the vmap width: one group of vmapped inits)
    and unit u goes to process u mod ``process_count``. The split depends on these four numbers
    alone, never on a process's memory, devices or chunk size, so every process computes the
    same partition: no init is computed twice or left out. (The vmap width is part of the run's
    fingerprint, which every process checks at start-up.)
    """
    if unit < 1 or process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need unit >= 1 and 0 <= process_index < process_count, got unit="
                         f"{unit}, process_index={process_index}, process_count={process_count}")
    ids = np.arange(num_inits, dtype=np.int64)
    return ids[(ids // unit) % process_count == process_index]


def process_chunks(todo: np.ndarray, chunk_size: int, process_index: int = 0,
                   process_count: int = 1, unit: int | None = None,
                   num_inits: int | None = None) -> list[np.ndarray]:
    """This process's chunks: its share (:func:`process_share` of all ``num_inits`` ids, in
    units of ``unit``) intersected with ``todo``, cut into chunks of ``chunk_size``.

    ``chunk_size`` may differ between processes (it follows each one's memory) without
    changing who computes what. Defaults: ``unit = chunk_size``, ``num_inits`` = max(todo) + 1.
    """
    todo = np.asarray(todo, dtype=np.int64)
    if num_inits is None:
        num_inits = int(todo.max()) + 1 if todo.size else 0
    share = process_share(num_inits, unit or chunk_size, process_index, process_count)
    mine = share[np.isin(share, todo)]
    return [mine[s:s + chunk_size] for s in range(0, len(mine), chunk_size)]


def publish(key: str, value: str) -> None:
    """Set ``key`` in the coordinator's key-value store (``jax.distributed`` must be running)."""
    _client().key_value_set(key, value)


def receive(key: str, timeout_s: float) -> str | None:
    """Wait up to ``timeout_s`` for ``key`` in the coordinator's key-value store; None if it
    never came."""
    try:
        return _client().blocking_key_value_get(key, int(timeout_s * 1000))
    except Exception as exc:  # the client raises on a deadline (XlaRuntimeError)
        if "DEADLINE_EXCEEDED" in str(exc) or "timed out" in str(exc).lower():
            return None
        raise


def _client():
    from jax._src import distributed  # the coordinator client of jax.distributed.initialize

    client = distributed.global_state.client
    if client is None:
        raise RuntimeError("jax.distributed is not initialized: no coordinator to talk to")
    return client


def wait_for(predicate: Callable[[], bool], timeout_s: float, poll_s: float = 1.0) -> bool:
    """Poll ``predicate`` until it is true or ``timeout_s`` passes; return its last value."""
    deadline = time.time() + timeout_s
    while True:
        if predicate():
            return True
        if time.time() >= deadline:
            return False
        time.sleep(poll_s)


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _device_stats(device: jax.Device | None) -> dict | None:
    device = device or jax.local_devices()[0]
    try:
        stats = device.memory_stats()
    except Exception:  # CPU devices may not implement it
        return None
    return stats if stats and "bytes_limit" in stats else None


def available_memory_bytes(device: jax.Device | None = None) -> int:
    """Memory a chunk may use on ``device`` now: the accelerator's limit less what is in use,
    or the host's free RAM.

    On GPU/TPU this is ``bytes_limit − bytes_in_use`` from ``memory_stats()``; on CPU it is
    ``MemAvailable`` from /proc/meminfo (or, failing that, physical memory / 2).
    """
    stats = _device_stats(device)
    if stats:
        return int(stats["bytes_limit"] - stats.get("bytes_in_use", 0))
    free = _meminfo("MemAvailable")
    if free is not None:
        return free
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError):
        return 4 * 2**30


def memory_capacity_bytes(device: jax.Device | None = None) -> int:
    """All the memory ``device`` has, whatever is in use: ``bytes_limit`` on GPU/TPU, the host's
    physical memory (MemTotal) on CPU. A property of the kind of device, the same on every host
    of a homogeneous cluster: what a plan that must agree across processes may depend on."""
    stats = _device_stats(device)
    if stats:
        return int(stats["bytes_limit"])
    total = _meminfo("MemTotal")
    if total is not None:
        return total
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 8 * 2**30


def all_chunks_present(out_dir: str | Path, num_inits: int) -> bool:
    """True when the chunk files in ``out_dir`` cover inits 0..num_inits−1 (names only)."""
    from crit.store import CHUNK_DIR, CHUNK_RE

    covered = 0
    folder = Path(out_dir) / CHUNK_DIR
    if not folder.is_dir():
        return False
    for p in folder.iterdir():
        m = CHUNK_RE.match(p.name)
        if m:
            covered += int(m.group(2))
    return covered >= num_inits
