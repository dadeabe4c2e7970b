"""Throughput of the homework workload and its efficiency against the machine's matmul peak.

Run from the repository root::

    python -m benchmarks.bench_throughput [--num_inits 100,300,1000] [--devices 1,2] [--device_inits 200]
    python -m benchmarks.bench_throughput --num_inits 10000 --devices '' --processes 2

Workload: the homework workload of ``bench_min_ratio`` (MLP 1-16-16-1 tanh, sinc, 256 points,
2000 Adam steps, 1000 gradient-norm Adam steps, exact Hessian + eigvalsh, float64), run through
crit's protocol (``jit(vmap(analyze_init))`` over chunks of ``auto_chunk_size``).

Efficiency = FLOPs / wall time / peak, all measured in the same run on the same machine:

* FLOPs come from XLA's cost analysis of the compiled chunk function. XLA counts the body of a
  ``scan``/``while`` loop once, whatever its trip count, and does not look inside LAPACK custom
  calls, so the count is completed by hand: (train_steps − 1) more Adam steps and
  (finder_steps − 1) more gradient-norm steps, each costed by XLA on the same vmapped step, the
  columns of the dense Hessian's column loop beyond the one XLA counts (costed as the whole
  ``jax.hessian`` minus the loop as counted), plus (4/3)·P³ per ``eigvalsh`` (LAPACK's
  tridiagonal reduction, which dominates values-only ``syevd``). Padding rows of the last chunk are work the machine did but are not counted.
* Peak is the best float64 FLOP/s of a square ``jnp.dot`` (n = 1024, 2048, 3072) on all
  cores, i.e. what XLA's matmul reaches here, the usual yardstick for "% of peak".

"Time vs N" runs the workload at each ``--num_inits`` and fits the slope of log(time) against
log(N) (1 means linear: throughput independent of N). "Time vs device count" reruns
``--device_inits`` inits in a fresh process per count with
``XLA_FLAGS=--xla_force_host_platform_device_count=d`` (the init axis sharded over d host
devices, as on a real multi-device machine).

``--processes k`` also runs the largest N as k processes, each pinned to its own core with one
CPU device and single-threaded Eigen, each on its own share of the init ids (the
one-process-per-core layout of BUILD.md); its wall time runs from the moment every process has
compiled to the last one's end. ``--only_processes`` skips the in-process runs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import crit  # noqa: F401  (float64)
from crit.hessian import flat_loss
from crit.problems import mlp_problem
from crit.protocol import auto_chunk_size, balanced_chunk_size, make_chunk_fn, run_chunk

from benchmarks.bench_min_ratio import GRADNORM_CFG, WIDTHS

CFG = GRADNORM_CFG


def log(msg: str) -> None:
    print(msg, flush=True)


def _flops(compiled) -> float:
    cost = compiled.cost_analysis()
    if isinstance(cost, (list, tuple)):
        cost = cost[0]
    return float(cost.get("flops", 0.0)) if cost else 0.0


def matmul_peak(sizes=(1024, 2048, 3072), repeats: int = 5) -> dict:
    """Best float64 FLOP/s of ``a @ b`` (square, n in ``sizes``) through XLA on this machine."""
    best = {}
    for n in sizes:
        a = jax.random.normal(jax.random.PRNGKey(0), (n, n), jnp.float64)
        b = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float64)
        mm = jax.jit(jnp.dot)
        mm(a, b).block_until_ready()
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            mm(a, b).block_until_ready()
            times.append(time.perf_counter() - t)
        best[n] = 2.0 * n ** 3 / min(times)
    return dict(per_size=best, peak=max(best.values()))


def step_flops(problem, chunk: int) -> tuple[float, float]:
    """XLA FLOPs of one vmapped Adam training step and one gradient-norm step, per init.

    Each is the body of the corresponding ``scan`` in ``crit.train.train`` and
    ``crit.critical.gradient_norm_descent``, written out and costed on its own.
    """
    params = jax.vmap(problem.init_fn)(jax.random.split(jax.random.PRNGKey(0), chunk))
    adam = optax.adam(CFG.learning_rate)
    vg = jax.value_and_grad(problem.loss_fn)

    def train_step(p):
        state = adam.init(p)
        loss, g = vg(p)
        updates, state = adam.update(g, state, p)
        return optax.apply_updates(p, updates), loss

    gn_opt = optax.adam(CFG.finder_lr)

    def gradnorm_step(p):
        f, theta, _ = flat_loss(problem.loss_fn, p)
        state = gn_opt.init(theta)
        g, hvp_lin = jax.linearize(jax.grad(f), theta)
        updates, state = gn_opt.update(hvp_lin(g), state, theta)
        return theta + updates, jnp.linalg.norm(g)

    out = []
    for fn in (train_step, gradnorm_step):
        compiled = jax.jit(jax.vmap(fn)).lower(params).compile()
        out.append(_flops(compiled) / chunk)
    return out[0], out[1]


def hessian_loop_flops(problem, chunk: int) -> float:
    """FLOPs per init that XLA misses in the column loop of ``dense_hessian``.

    ``dense_hessian`` builds H in a ``lax.map`` over blocks of columns (one column at a time on
    CPU), and XLA costs that loop's body once. The difference between the whole
    ``jax.hessian`` (no loop, ``block_size=None``: the same arithmetic) and the blocked version
    as XLA counts it is added back.
    """
    from crit.hessian import dense_hessian

    params = jax.vmap(problem.init_fn)(jax.random.split(jax.random.PRNGKey(0), chunk))
    counted = []
    for block in (None, "auto"):
        fn = jax.jit(jax.vmap(lambda p, b=block: dense_hessian(problem.loss_fn, p, b)))
        counted.append(_flops(fn.lower(params).compile()) / chunk)
    return max(counted[0] - counted[1], 0.0)


def workload_flops(problem) -> dict:
    """FLOPs of one init of the workload (see the module docstring for how they are counted).

    Costed on one device for a chunk of one group (``vmap_width`` inits); the FLOPs of an init
    do not depend on how many devices share the work.
    """
    p = problem.n_params
    width = CFG.vmap_width
    compiled = make_chunk_fn(problem, CFG).lower(
        jax.ShapeDtypeStruct((width,), jnp.int32)).compile()
    xla_chunk = _flops(compiled) / width
    train_step, gn_step = step_flops(problem, width)
    hessian_missed = hessian_loop_flops(problem, width)
    eigh = 4.0 / 3.0 * p ** 3
    total = (xla_chunk + (CFG.train_steps - 1) * train_step
             + (CFG.finder_steps - 1) * gn_step + hessian_missed + eigh)
    return dict(per_init=total, xla_chunk_per_init=xla_chunk, train_step=train_step,
                gradnorm_step=gn_step, hessian_loop=hessian_missed, eigvalsh=eigh,
                share=dict(train=CFG.train_steps * train_step / total,
                           gradnorm=CFG.finder_steps * gn_step / total,
                           hessian_and_rest=(xla_chunk - train_step - gn_step
                                             + hessian_missed) / total,
                           eigvalsh=eigh / total))


def run(problem, n: int, mesh=None) -> dict:
    """All ``n`` inits in chunks; compile time measured apart (ahead-of-time compile)."""
    devices = 1 if mesh is None else mesh.size
    chunk = balanced_chunk_size(n, auto_chunk_size(problem, n) * devices,
                                min(CFG.vmap_width, n) * devices)
    t0 = time.perf_counter()
    compiled = make_chunk_fn(problem, CFG, mesh).lower(
        jax.ShapeDtypeStruct((chunk,), jnp.int32)).compile()
    compile_s = time.perf_counter() - t0
    ids = np.arange(n)
    t1 = time.perf_counter()
    for lo in range(0, n, chunk):
        run_chunk(compiled, ids[lo:lo + chunk], chunk)
    steady = time.perf_counter() - t1
    return dict(n=n, chunk=chunk, n_chunks=-(-n // chunk), compile=compile_s, steady=steady,
                compiled=compiled)


def device_child(n: int) -> None:
    """Child process for one device count: time ``n`` inits over all (forced) host devices."""
    from crit.parallel import local_mesh

    problem = mlp_problem("sinc", WIDTHS, "tanh", n_points=256)
    mesh = local_mesh()
    r = run(problem, n, mesh)
    print(json.dumps(dict(devices=mesh.size, n=n, chunk=r["chunk"], compile=r["compile"],
                          steady=r["steady"])), flush=True)


def process_child(lo: int, hi: int, sync_dir: str) -> None:
    """Child of ``--processes``: inits lo..hi-1 on this process's one (pinned) CPU device.

    Compiles, writes ``ready_<lo>`` into ``sync_dir``, waits for the parent's ``go`` file so all
    children start computing together, then prints its timings as JSON.
    """
    import pathlib

    problem = mlp_problem("sinc", WIDTHS, "tanh", n_points=256)
    n = hi - lo
    chunk = balanced_chunk_size(n, auto_chunk_size(problem, n), min(CFG.vmap_width, n))
    t0 = time.perf_counter()
    compiled = make_chunk_fn(problem, CFG).lower(
        jax.ShapeDtypeStruct((chunk,), jnp.int32)).compile()
    compile_s = time.perf_counter() - t0
    sync = pathlib.Path(sync_dir)
    (sync / f"ready_{lo}").write_text("ready")
    while not (sync / "go").exists():
        time.sleep(0.01)
    start = time.time()
    ids = np.arange(lo, hi)
    for c in range(0, n, chunk):
        run_chunk(compiled, ids[c:c + chunk], chunk)
    end = time.time()
    print(json.dumps(dict(lo=lo, hi=hi, chunk=chunk, compile=compile_s, start=start, end=end,
                          steady=end - start)), flush=True)


def run_processes(n: int, k: int) -> dict:
    """``n`` inits split over ``k`` child processes, child i pinned to core i (one CPU device
    each, single-threaded Eigen): the one-process-per-core layout of BUILD.md.

    Wall time runs from the moment all children have compiled (the ``go`` file) to the last
    child's end; compile time is reported apart, as the slowest child's.
    """
    import pathlib
    import tempfile

    cores = sorted(os.sched_getaffinity(0))
    if k > len(cores):
        raise SystemExit(f"--processes={k}: only {len(cores)} cores are available")
    bounds = [round(i * n / k) for i in range(k + 1)]
    env = dict(os.environ)
    env["XLA_FLAGS"] = " ".join(
        f for f in env.get("XLA_FLAGS", "").split()
        if not f.startswith("--xla_force_host_platform_device_count")
        and not f.startswith("--xla_cpu_multi_thread_eigen")) + " --xla_cpu_multi_thread_eigen=false"
    env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
    env["OPENBLAS_NUM_THREADS"] = "1"
    with tempfile.TemporaryDirectory() as sync:
        procs = []
        for i in range(k):
            cmd = ["taskset", "-c", str(cores[i]), sys.executable, "-m",
                   "benchmarks.bench_throughput", "--child_range",
                   f"{bounds[i]},{bounds[i + 1]}", "--sync_dir", sync]
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True))
        while len(list(pathlib.Path(sync).glob("ready_*"))) < k:
            if any(p.poll() not in (None, 0) for p in procs):
                raise SystemExit("a --processes child failed before it was ready")
            time.sleep(0.05)
        go = time.time()
        pathlib.Path(sync, "go").write_text("go")
        rows = []
        for p in procs:
            out, _ = p.communicate()
            if p.returncode:
                raise SystemExit(f"a --processes child exited with {p.returncode}")
            rows.append(json.loads(out.strip().splitlines()[-1]))
    wall = max(r["end"] for r in rows) - go
    return dict(n=n, processes=k, wall=wall, compile=max(r["compile"] for r in rows),
                children=rows)


def time_vs_devices(counts, n: int) -> list[dict]:
    rows = []
    for d in counts:
        env = dict(os.environ)
        env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "")
                            + f" --xla_force_host_platform_device_count={d}").strip()
        env["PYTHONPATH"] = os.getcwd() + os.pathsep + env.get("PYTHONPATH", "")
        out = subprocess.run([sys.executable, "-m", "benchmarks.bench_throughput",
                              "--child_inits", str(n)], env=env, capture_output=True,
                             text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(row)
        log(f"  {d} device(s): {n} inits in {row['steady']:.1f} s steady "
            f"(+{row['compile']:.1f} s compile), chunk {row['chunk']}")
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--num_inits", default="100,300,1000",
                    help="comma-separated N for time vs N (the largest also gives throughput)")
    ap.add_argument("--devices", default="1,2", help="forced host device counts ('' to skip)")
    ap.add_argument("--device_inits", type=int, default=200, help="inits per device-count run")
    ap.add_argument("--processes", type=int, default=0,
                    help="also time the largest N as this many processes, one pinned to each "
                         "core (0: skip)")
    ap.add_argument("--only_processes", action="store_true",
                    help="with --processes: skip the in-process runs (time vs N)")
    ap.add_argument("--child_inits", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--child_range", default="", help=argparse.SUPPRESS)
    ap.add_argument("--sync_dir", default="", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child_inits:
        device_child(args.child_inits)
        return
    if args.child_range:
        lo, hi = (int(v) for v in args.child_range.split(","))
        process_child(lo, hi, args.sync_dir)
        return
    if args.processes < 0:
        ap.error(f"--processes must be >= 0, got {args.processes}")
    ns = sorted(int(s) for s in args.num_inits.split(",") if s)
    if not ns or min(ns) < 1:
        ap.error(f"--num_inits must list positive integers, got {args.num_inits!r}")
    counts = [int(s) for s in args.devices.split(",") if s]
    if any(c < 1 for c in counts):
        ap.error(f"--devices must list positive integers, got {args.devices!r}")

    log(f"bench_throughput {datetime.date.today()} on {platform.machine()} "
        f"{os.cpu_count()} cores, jax {jax.__version__}, devices {jax.devices()}")
    problem = mlp_problem("sinc", WIDTHS, "tanh", n_points=256)
    log(f"workload: {problem.name}, P = {problem.n_params}, {CFG.train_steps} Adam + "
        f"{CFG.finder_steps} gradient-norm steps + dense Hessian + eigvalsh, float64")

    peak = matmul_peak()
    log("float64 matmul peak (XLA): " + ", ".join(
        f"n={n}: {f / 1e9:.1f} GFLOP/s" for n, f in peak["per_size"].items()))

    from crit.parallel import local_mesh

    mesh = local_mesh()
    log(f"devices: {mesh.size} (XLA_FLAGS=--xla_force_host_platform_device_count=d splits a CPU)")
    rows = []
    flops = workload_flops(problem)
    log(f"FLOPs per init: {flops['per_init'] / 1e9:.3f} GFLOP (train step "
        f"{flops['train_step'] / 1e6:.3f} MFLOP, gradient-norm step "
        f"{flops['gradnorm_step'] / 1e6:.3f} MFLOP, eigvalsh {flops['eigvalsh'] / 1e6:.1f} "
        f"MFLOP); shares " + ", ".join(f"{k} {v:.1%}" for k, v in flops["share"].items()))
    for n in ([] if args.only_processes and args.processes else ns):
        r = run(problem, n, mesh)
        achieved = flops["per_init"] * n / r["steady"]
        rows.append(dict(n=n, chunk=r["chunk"], compile=r["compile"], steady=r["steady"],
                         inits_per_s=n / r["steady"], gflops=achieved / 1e9,
                         efficiency=achieved / peak["peak"]))
        log(f"N = {n}: {r['steady']:.1f} s steady + {r['compile']:.1f} s compile "
            f"(chunk {r['chunk']}), {n / r['steady']:.2f} inits/s, {achieved / 1e9:.2f} GFLOP/s "
            f"= {achieved / peak['peak']:.1%} of the matmul peak")
    if args.processes:
        n = ns[-1]
        r = run_processes(n, args.processes)
        achieved = flops["per_init"] * n / r["wall"]
        log(f"N = {n} as {args.processes} processes, one pinned per core: {r['wall']:.1f} s "
            f"from all compiled to the last end (+{r['compile']:.1f} s compile), "
            f"{n / r['wall']:.2f} inits/s, {achieved / 1e9:.2f} GFLOP/s = "
            f"{achieved / peak['peak']:.1%} of the matmul peak; per process "
            + ", ".join(f"inits {c['lo']}..{c['hi'] - 1}: {c['steady']:.1f} s"
                        for c in r["children"]))
    if len(rows) > 1:
        slope = np.polyfit(np.log([r["n"] for r in rows]), np.log([r["steady"] for r in rows]), 1)[0]
        log(f"time vs N: log-log slope {slope:.3f} (1 = linear)")

    if counts:
        log(f"time vs device count ({args.device_inits} inits, forced host devices):")
        dev_rows = time_vs_devices(counts, args.device_inits)
        base = dev_rows[0]["steady"]
        for row in dev_rows:
            log(f"  {row['devices']} device(s): speed-up {base / row['steady']:.2f}x "
                f"over {dev_rows[0]['devices']}")


if __name__ == "__main__":
    main()
