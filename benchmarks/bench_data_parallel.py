"""Full-data HVP of one ResNet-sized model on 1 vs 2 devices: the data axis's parallel efficiency.

Run from the repository root (it needs both cores; nothing else should run)::

    python -m benchmarks.bench_data_parallel                # ResNet-20, N = 64, batches of 8
    python -m benchmarks.bench_data_parallel --n 32 --reps 3

Model: crit's ResNet-20 (depth 20, width 16, BatchNorm in eval mode, P = 272,474) on
CIFAR-shaped synthetic images (32×32×3 standard normal pixels, 10 classes), softmax
cross-entropy, float64, the full-data loss in eval batches of ``--batch`` rows. Timed: one
full-data Hessian-vector product ``jvp(grad(L))`` at fixed θ and v, jitted, compile excluded,
the best and the median of ``--reps`` calls. ``crit.data_parallel.shard_data`` spreads the N
rows over the devices; every device holds θ and v, and the partial sums meet in one psum.

Two layouts, each as its own subprocess:

* **devices**: one process with ``--xla_force_host_platform_device_count=2``; the HVP over a
  mesh of device 0 alone and over both devices, alternated call by call so both see the same
  load. XLA's default threading: the one-device program may itself use both cores for its
  matrix products, so this ratio is what a user of one process gets, not a per-core scaling.
* **processes**: one process per core (``taskset``, single-threaded Eigen, one CPU device
  each), the layout BUILD.md recommends on a multi-core CPU: 1 process on core 0, then 2
  processes on cores 0 and 1 coordinated by ``jax.distributed`` on localhost.
* **ceiling**: what the machine allows a 2-way split at all: two independent processes (no
  ``jax.distributed``, no collectives), one per core, each the HVP of its own N/2 rows; their
  slower one against the 1-process time above. The gap between this row and the processes
  row is crit's (and the collectives') overhead; the gap between this row and 2× is the
  machine's (two cores sharing caches and memory bandwidth).

Speed-up = T(1) / T(2); parallel efficiency = speed-up / 2. Target (issue 14): ≥ 1.7× on 2
cores with one process per core. The 1-device and 2-device HVPs are checked to agree (1e-12).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def build(n: int, batch: int, depth: int, width: int):
    import jax
    import numpy as np

    from crit.data import Dataset
    from crit.problems import model_problem

    jax.config.update("jax_enable_x64", True)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, 32, 32, 3))
    y = rng.integers(0, 10, size=n)
    data = Dataset("synthetic32x32x3", x, y, x[:0], y[:0], "classification", 10)
    problem = model_problem("resnet", data, eval_batch_size=batch, depth=depth, width=width)
    params = problem.init_fn(jax.random.PRNGKey(0))
    state = problem.init_state_fn(jax.random.PRNGKey(0))
    return problem, params, state


def hvp_fn(problem, params, state, mesh):
    """(jitted θ, v ↦ H v on ``mesh``, θ, v): replicated in, replicated out; the data rows
    enter as sharded arguments (crit.data_parallel.jit_with_data), as in the apps."""
    import jax
    from jax.flatten_util import ravel_pytree
    from jax.sharding import NamedSharding, PartitionSpec

    from crit.data_parallel import jit_with_data, shard_data

    theta, unravel = ravel_pytree(params)
    sharded = shard_data(problem, mesh)

    def make_hvp(pr):  # the rows are arguments of the program (each device holds its share)
        loss = lambda t: pr.loss_fn(unravel(t), state)  # noqa: E731
        return lambda t, v: jax.jvp(jax.grad(loss), (t,), (v,))[1]

    everywhere = NamedSharding(mesh, PartitionSpec())
    fn = jit_with_data(make_hvp, sharded, in_shardings=everywhere, out_shardings=everywhere)
    v = jax.random.normal(jax.random.PRNGKey(1), theta.shape, theta.dtype)
    return fn, np_(theta), np_(v)


def np_(a):
    import numpy as np

    return np.asarray(a)


def timed(fn, *args):
    import jax

    t = time.perf_counter()
    out = jax.block_until_ready(fn(*args))
    return time.perf_counter() - t, out


def worker_devices(args) -> dict:
    import jax
    import numpy as np

    from crit.data_parallel import data_mesh

    problem, params, state = build(args.n, args.batch, args.depth, args.width)
    fns = {}
    compile_s = {}
    for d in (1, 2):
        fn, theta, v = hvp_fn(problem, params, state, data_mesh(jax.devices()[:d]))
        t = time.perf_counter()
        fn = fn.compile(theta, v)
        compile_s[d] = time.perf_counter() - t
        fns[d] = fn
    outs, times = {}, {1: [], 2: []}
    for d in (1, 2):  # warm-up
        outs[d] = np.asarray(timed(fns[d], theta, v)[1])
    for _ in range(args.reps):
        for d in (1, 2):
            times[d].append(timed(fns[d], theta, v)[0])
    diff = float(np.max(np.abs(outs[2] - outs[1])) / np.max(np.abs(outs[1])))
    return dict(P=problem.n_params, times=times, compile_s=compile_s, rel_diff=diff,
                hv_norm=float(np.linalg.norm(outs[1])))


def worker_processes(args) -> dict | None:
    import jax
    import numpy as np

    if args.num_processes > 1:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    from crit.data_parallel import data_mesh

    problem, params, state = build(args.n, args.batch, args.depth, args.width)
    fn, theta, v = hvp_fn(problem, params, state, data_mesh())
    t = time.perf_counter()
    fn = fn.compile(theta, v)
    compile_s = time.perf_counter() - t
    out = timed(fn, theta, v)[1]
    times = [timed(fn, theta, v)[0] for _ in range(args.reps)]
    if jax.process_index() != 0:
        return None
    hv = np.asarray(out.addressable_data(0))
    return dict(P=problem.n_params, times=times, compile_s=compile_s,
                hv_norm=float(np.linalg.norm(hv)), devices=jax.device_count())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(args, extra: list[str], env_extra: dict, cores: list[int] | None = None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu", **env_extra}
    cmd = [sys.executable, "-m", "benchmarks.bench_data_parallel", "--n", str(args.n),
           "--batch", str(args.batch), "--depth", str(args.depth), "--width", str(args.width),
           "--reps", str(args.reps), *extra]
    if cores is not None:
        cmd = ["taskset", "-c", ",".join(map(str, cores)), *cmd]
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def result_of(proc) -> dict | None:
    out, err = proc.communicate(timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(f"worker failed ({proc.returncode}):\n{out}\n{err}")
    lines = [ln for ln in out.splitlines() if ln.startswith("RESULT ")]
    return json.loads(lines[-1][7:]) if lines else None


def summary(times) -> tuple[float, float]:
    import numpy as np

    return float(np.min(times)), float(np.median(times))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=64, help="training rows N")
    parser.add_argument("--batch", type=int, default=8, help="eval batch size (local batch)")
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--width", type=int, default=16)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--modes", default="devices,processes,ceiling")
    parser.add_argument("--worker", choices=["devices", "processes"], default=None)
    parser.add_argument("--coordinator", default=None)
    parser.add_argument("--num_processes", type=int, default=1)
    parser.add_argument("--process_id", type=int, default=0)
    args = parser.parse_args()
    if args.worker:
        res = worker_devices(args) if args.worker == "devices" else worker_processes(args)
        if res is not None:
            print("RESULT " + json.dumps(res), flush=True)
        return

    import jax

    print(f"# bench_data_parallel {datetime.date.today()} — {platform.machine()}, "
          f"{os.cpu_count()} CPUs, jax {jax.__version__}, load {os.getloadavg()}")
    print(f"ResNet-{args.depth} width {args.width}, N = {args.n} synthetic 32×32×3 images, "
          f"eval batches of {args.batch}, float64; full-data HVP jvp(grad(L)), best / median "
          f"of {args.reps} calls, compile excluded\n")
    rows = []
    modes = args.modes.split(",")
    if "devices" in modes:
        r = result_of(launch(args, ["--worker", "devices"],
                             {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}))
        (b1, m1), (b2, m2) = summary(r["times"]["1"]), summary(r["times"]["2"])
        rows.append(("2 forced host devices, one process", r["P"], b1, m1, b2, m2,
                     f"compile {r['compile_s']['1']:.1f} s / {r['compile_s']['2']:.1f} s; "
                     f"‖H v (2) − H v (1)‖∞ / ‖H v (1)‖∞ = {r['rel_diff']:.1e}"))
        print(f"devices done, load {os.getloadavg()}", flush=True)
    if "processes" in modes:
        single = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
        one = result_of(launch(args, ["--worker", "processes"], single, cores=[0]))
        port = free_port()
        procs = [launch(args, ["--worker", "processes", "--coordinator", f"127.0.0.1:{port}",
                               "--num_processes", "2", "--process_id", str(i)], single,
                        cores=[i]) for i in range(2)]
        two = [result_of(p) for p in procs][0]
        (b1, m1), (b2, m2) = summary(one["times"]), summary(two["times"])
        agree = abs(two["hv_norm"] - one["hv_norm"]) / one["hv_norm"]
        rows.append(("one process per core (taskset, 1 device each, jax.distributed)", one["P"],
                     b1, m1, b2, m2, f"compile {one['compile_s']:.1f} s / "
                     f"{two['compile_s']:.1f} s; ‖H v‖ agrees to {agree:.1e}"))
        print(f"processes done, load {os.getloadavg()}", flush=True)
    if "ceiling" in modes:
        # no crit, no collectives: two independent processes, one per core, each the HVP of
        # its own N/2 rows at once; the best a 2-process data split could do on this machine
        single = {"XLA_FLAGS": "--xla_cpu_multi_thread_eigen=false"}
        half = argparse.Namespace(**{**vars(args), "n": args.n // 2})
        one = result_of(launch(half, ["--worker", "processes"], single, cores=[0]))
        pair = [launch(half, ["--worker", "processes"], single, cores=[i]) for i in range(2)]
        both = [result_of(p) for p in pair]
        ref = rows[-1] if rows and rows[-1][0].startswith("one process per core") else None
        b1 = ref[2] if ref else float("nan")
        m1 = ref[3] if ref else float("nan")
        b2 = max(min(r["times"]) for r in both)
        m2 = max(float(sorted(r["times"])[len(r["times"]) // 2]) for r in both)
        rows.append(("ceiling: 2 independent processes, one per core, N/2 rows each (no "
                     "communication)", one["P"], b1, m1, b2, m2,
                     f"N/2 rows alone on one core: {min(one['times']) * 1e3:.0f} ms, so two "
                     f"processes at once run {b2 / min(one['times']):.2f}× slower than one"))
        print(f"ceiling done, load {os.getloadavg()}", flush=True)
    print("| layout | P | 1 device: best / median | 2 devices: best / median | speed-up "
          "(best, median) | efficiency (best) | notes |")
    print("|---|---|---|---|---|---|---|")
    for name, p, b1, m1, b2, m2, note in rows:
        print(f"| {name} | {p:,} | {b1 * 1e3:.0f} / {m1 * 1e3:.0f} ms | {b2 * 1e3:.0f} / "
              f"{m2 * 1e3:.0f} ms | {b1 / b2:.2f}× / {m1 / m2:.2f}× | {b1 / b2 / 2:.0%} | "
              f"{note} |")
    print("\ntarget: ≥ 1.7× on 2 cores with one process per core")


if __name__ == "__main__":
    main()
