"""A Li et al. (2018) loss surface of a 1e5-parameter MLP: crit's chunked vmapped grid vs a
per-point PyTorch loop.

    python -m benchmarks.bench_surface                    # 51 × 51, float64, digits, P = 100,250
    python -m benchmarks.bench_surface --grid=11 --dtype=float32

Workload: scikit-learn digits (1437 training images, 64 inputs, 10 classes), tanh MLP
64-320-240-10 (P = 100,250), softmax cross-entropy over the full training set at every grid
point, L(θ + α δ + β η) on a ``--grid`` × ``--grid`` lattice over [−1, 1]², δ and η
filter-normalized Gaussian directions (``crit.landscape``). θ is the initialization (the loss
values do not change the cost).

* crit: ``crit.landscape.surface_2d`` under ``jax.jit``, ``--chunk_size`` grid points per
  vmapped chunk (compile time reported apart from run time).
* PyTorch: the same weights, directions and data as tensors; a Python loop over the grid points
  forming θ + α δ + β η and running the forward pass under ``torch.no_grad()`` -- the loop the
  reference loss-landscape code runs (there with ``load_state_dict`` per point). Skipped with a
  note when torch is not installed (it is not a crit requirement).

XLA uses its default thread pool (every core); PyTorch runs with 1 thread or every core,
whichever a short calibration finds faster (``--torch_threads`` to fix it). The surfaces are
compared (max relative difference) before a markdown row with the ratio is printed.
"""

from __future__ import annotations

import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

import crit  # noqa: F401  (float64)
from crit import landscape
from crit.problems import mlp_problem

FLAGS = flags.FLAGS
flags.DEFINE_integer("grid", 51, "Grid points per axis.")
flags.DEFINE_integer("chunk_size", 32, "Grid points per vmapped chunk in crit.")
flags.DEFINE_enum("dtype", "float64", ["float64", "float32"], "Precision of both sides.")
flags.DEFINE_string("widths", "320,240", "Hidden widths of the MLP (64-320-240-10: P = 100,250).")
flags.DEFINE_bool("torch", True, "Also time the PyTorch per-point loop (if torch imports).")
flags.DEFINE_integer("torch_threads", 0, "PyTorch threads (0: 1 or os.cpu_count(), whichever a "
                     "short calibration finds faster).")


def crit_surface(problem, params, d1, d2, alphas):
    fn = jax.jit(lambda t, u, v: landscape.surface_2d(problem.loss_fn, t, u, v, alphas, alphas,
                                                      FLAGS.chunk_size))
    t0 = time.perf_counter()
    compiled = fn.lower(params, d1, d2).compile()
    t1 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(compiled(params, d1, d2)))
    t2 = time.perf_counter()
    return out, t1 - t0, t2 - t1


def fastest_thread_count(torch, loss_at, points: int = 8) -> int:
    """1 or all cores, whichever evaluates ``points`` grid points faster. On a busy machine,
    OpenMP's spinning threads can make the multi-threaded loop several times slower."""
    best = None
    for threads in sorted({1, os.cpu_count()}):
        torch.set_num_threads(threads)
        loss_at(0.0, 0.0)
        t0 = time.perf_counter()
        for k in range(points):
            loss_at(0.1 * k, -0.1 * k)
        elapsed = time.perf_counter() - t0
        if best is None or elapsed < best[0]:
            best = (elapsed, threads)
    return best[1]


def torch_surface(problem, params, d1, d2, alphas):
    import torch
    import torch.nn.functional as F

    dtype = torch.float64 if FLAGS.dtype == "float64" else torch.float32
    layers = sorted(params["params"])  # Dense_0, Dense_1, ... (fewer than 10 layers)
    as_t = lambda tree: [(torch.tensor(np.asarray(tree["params"][k]["kernel"]), dtype=dtype),
                          torch.tensor(np.asarray(tree["params"][k]["bias"]), dtype=dtype))
                         for k in layers]
    theta, u, v = as_t(params), as_t(d1), as_t(d2)
    x = torch.tensor(problem.dataset.x_train, dtype=dtype)
    y = torch.tensor(problem.dataset.y_train, dtype=torch.long)

    def loss_at(a, b):
        h = x
        for k, ((w, c), (uw, uc), (vw, vc)) in enumerate(zip(theta, u, v)):
            h = h @ (w + a * uw + b * vw) + (c + a * uc + b * vc)
            if k < len(theta) - 1:
                h = torch.tanh(h)
        return F.cross_entropy(h, y).item()

    out = np.empty((len(alphas), len(alphas)))
    with torch.no_grad():
        threads = FLAGS.torch_threads or fastest_thread_count(torch, loss_at)
        torch.set_num_threads(threads)
        loss_at(0.0, 0.0)  # warm-up (thread pool, allocator), not timed
        t0 = time.perf_counter()
        for i, a in enumerate(alphas):
            for j, b in enumerate(alphas):
                out[i, j] = loss_at(float(a), float(b))
    return out, time.perf_counter() - t0, f"{torch.__version__}, {threads} thread(s)"


def main(argv):
    del argv
    widths = tuple(int(w) for w in FLAGS.widths.split(","))
    problem = mlp_problem("digits", widths=widths, n_points=1437)
    dtype = jnp.float64 if FLAGS.dtype == "float64" else jnp.float32
    params = jax.tree.map(lambda p: p.astype(dtype), problem.init_fn(jax.random.PRNGKey(0)))
    d1 = landscape.filter_normalized_direction(jax.random.PRNGKey(1), params)
    d2 = landscape.filter_normalized_direction(jax.random.PRNGKey(2), params)
    alphas = np.linspace(-1.0, 1.0, FLAGS.grid).astype(FLAGS.dtype)
    n_points = FLAGS.grid ** 2
    flops = 2 * n_points * problem.dataset.n_train * (problem.n_params - sum(widths) - 10)
    print(f"{problem.name}: P = {problem.n_params:,}, n = {problem.dataset.n_train}, "
          f"{FLAGS.grid}×{FLAGS.grid} grid, {FLAGS.dtype}, ≈{flops / 1e9:.0f} GFLOP of matmuls")

    ours, compile_s, crit_s = crit_surface(problem, params, d1, d2, alphas)
    print(f"crit: {crit_s:.2f} s ({n_points / crit_s:.1f} points/s, {flops / crit_s / 1e9:.1f} "
          f"GFLOP/s), compile {compile_s:.2f} s, chunk {FLAGS.chunk_size}")
    torch_s, note, diff = None, "", None
    if FLAGS.torch:
        try:
            theirs, torch_s, version = torch_surface(problem, params, d1, d2, alphas)
            diff = float(np.max(np.abs(theirs - ours) / np.abs(ours)))
            note = f"torch {version}"
            print(f"PyTorch {version}: {torch_s:.2f} s ({n_points / torch_s:.1f} points/s); "
                  f"max relative difference of the surfaces {diff:.1e}")
        except ImportError:
            note = "torch not installed: PyTorch side skipped"
            print(f"note: {note}")
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cpus"
    date = datetime.date.today().isoformat()
    ratio = f"{torch_s / crit_s:.2f}×" if torch_s else "n/a"
    print()
    print("| date | machine | model, P | grid, dtype | crit s (compile) | PyTorch loop s | "
          "PyTorch / crit | max rel diff |")
    print("|---|---|---|---|---|---|---|---|")
    print(f"| {date} | {machine} | {problem.name}, {problem.n_params:,} | {FLAGS.grid}², "
          f"{FLAGS.dtype} | {crit_s:.2f} ({compile_s:.2f}) | "
          f"{f'{torch_s:.2f}' if torch_s else 'n/a'} | {ratio} | "
          f"{f'{diff:.1e}' if diff is not None else note} |")


if __name__ == "__main__":
    app.run(main)
