"""A ResNet-20 checkpoint analysed end to end by ``experiments.analyze`` against PyHessian's three
calls on the same weights and data (issue 23).

Run from the repository root::

    python -m benchmarks.bench_analyze                      # N = 32 rows, ~10 min on 2 cores
    python -m benchmarks.bench_analyze --n 256 --batch 32   # the issue's size (much longer)

1. The "trained" model: crit's ResNet-20 (crit.models.resnet, BatchNorm, float64) at init key 0
   with running statistics from one training-mode pass (as ``bench_models``), on CIFAR-shaped
   synthetic images; its linen variables saved with Orbax, the rows as an ``.npz``.
2. crit: ``python -m experiments.analyze --method=krylov`` in a subprocess, wall time of the
   whole command (Python start, imports, checkpoint, compile, HVPs, writing, figures). The HVP
   floor is the number of matvecs the report spent times one HVP, timed in this process on the
   same loss (median of ``--reps``). Overhead = 1 − floor / wall.
3. PyHessian (optional: ``pip install torch==2.13.0`` then ``pip install --no-deps pyhessian``):
   the same network ported to PyTorch (``bench_models.torch_resnet``, float64, eval mode), then
   ``eigenvalues(top_n=1)``, ``trace()`` and ``density()`` with their defaults except the
   density's size, which is crit's (``--lanczos_steps`` steps × ``--slq_probes`` probes).
   λ_max is compared with crit's, PyHessian's 1e-6 normalization bias noted.

Targets: crit's whole report at least as fast as PyHessian's three calls; crit's overhead
outside the HVPs under 20% of the run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import crit  # noqa: F401
from benchmarks.bench_models import HPARAMS, build, torch_resnet, pyhessian_shims
from crit.hessian import hvp_operator

ROOT = Path(__file__).resolve().parents[1]


def save_inputs(folder: Path, problem, params, state):
    import orbax.checkpoint as ocp

    variables = {"params": jax.tree.map(np.asarray, params["params"]),
                 "batch_stats": jax.tree.map(np.asarray, state["batch_stats"])}
    ckpt = ocp.StandardCheckpointer()
    ckpt.save((folder / "ckpt").absolute(), variables)
    ckpt.wait_until_finished()
    d = problem.dataset
    np.savez(folder / "data.npz", x_train=d.x_train, y_train=d.y_train)


def time_hvp(problem, params, state, reps: int) -> float:
    from jax.flatten_util import ravel_pytree

    loss = problem.bind_state(state)
    _, matvec = jax.jit(lambda p: hvp_operator(loss, p))(params)
    apply = jax.jit(lambda mv, v: mv(v))
    v = jax.random.normal(jax.random.key(1), ravel_pytree(params)[0].shape)
    jax.block_until_ready(apply(matvec, v))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(apply(matvec, v))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def run_crit(folder: Path, args) -> dict:
    model_args = [f"--model_arg={k}={v}" for k, v in HPARAMS["resnet"].items()]
    cmd = [sys.executable, "-m", "experiments.analyze", "--model=crit.models.resnet:ResNet",
           *model_args, f"--checkpoint={folder / 'ckpt'}", f"--data_file={folder / 'data.npz'}",
           f"--eval_batch_size={args.batch}", "--method=krylov",
           f"--lanczos_steps={args.lanczos_steps}", f"--slq_probes={args.slq_probes}",
           f"--out_dir={folder / 'run'}"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t
    if proc.returncode:
        raise SystemExit(f"experiments.analyze failed:\n{proc.stdout}\n{proc.stderr}")
    report = json.loads((folder / "run" / "report.json").read_text())
    point = report["points"][0]
    return {"wall": wall, "matvecs": point["num_matvecs"], "lambda_max": point["lambda_max"],
            "verdict": point["verdict"], "stdout": proc.stdout}


def run_pyhessian(problem, params, state, args) -> dict | str:
    try:
        import torch
    except ImportError as exc:
        return f"skipped: torch not installed ({exc}); `pip install torch==2.13.0`"
    try:
        from pyhessian import hessian as pyhessian_hessian
    except ImportError as exc:
        return f"skipped: pyhessian not installed ({exc}); `pip install --no-deps pyhessian`"
    import warnings

    torch.set_num_threads(os.cpu_count() or 1)
    pyhessian_shims(torch)
    d = problem.dataset
    net, _ = torch_resnet(torch, params, state, HPARAMS["resnet"]["depth"],
                          HPARAMS["resnet"]["width"], d.n_outputs)
    x = torch.from_numpy(np.asarray(d.x_train, dtype=np.float64))
    y = torch.from_numpy(np.asarray(d.y_train, dtype=np.int64))
    out = {"torch": torch.__version__}
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph")
        hc = pyhessian_hessian(net, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
    torch.manual_seed(0)
    t = time.perf_counter()
    top, _ = hc.eigenvalues(top_n=1)
    out["top_s"], out["lambda_max"] = time.perf_counter() - t, float(top[0])
    t = time.perf_counter()
    trace = hc.trace()
    out["trace_s"], out["trace"], out["trace_samples"] = (time.perf_counter() - t,
                                                          float(np.mean(trace)), len(trace))
    t = time.perf_counter()
    hc.density(iter=args.lanczos_steps, n_v=args.slq_probes)
    out["density_s"] = time.perf_counter() - t
    out["total"] = time.perf_counter() - t0
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=32, help="training rows")
    parser.add_argument("--batch", type=int, default=8, help="eval batch size")
    parser.add_argument("--lanczos_steps", type=int, default=30)
    parser.add_argument("--slq_probes", type=int, default=2)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--skip_torch", action="store_true")
    args = parser.parse_args()
    print(f"bench_analyze {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} cores, "
          f"jax {jax.__version__}; ResNet-20 (BatchNorm, eval), N = {args.n}, eval batches of "
          f"{args.batch}, float64; crit Krylov {args.lanczos_steps} steps × {args.slq_probes} "
          "SLQ probes", flush=True)
    problem, params, state = build("resnet", args.n, args.batch, "synthetic",
                                   **HPARAMS["resnet"])
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        save_inputs(folder, problem, params, state)
        crit_out = run_crit(folder, args)
    hvp = time_hvp(problem, params, state, args.reps)
    floor = crit_out["matvecs"] * hvp
    print(f"crit: experiments.analyze end to end {crit_out['wall']:.1f} s, {crit_out['matvecs']} "
          f"matvecs × HVP {hvp * 1e3:.0f} ms = {floor:.1f} s of HVPs; overhead outside the HVPs "
          f"{1 - floor / crit_out['wall']:.0%}; λ_max {crit_out['lambda_max']:.9g}, verdict "
          f"{crit_out['verdict']}", flush=True)
    if args.skip_torch:
        print("PyHessian: skipped (--skip_torch)")
        return
    pyh = run_pyhessian(problem, params, state, args)
    if isinstance(pyh, str):
        print("PyHessian:", pyh)
        return
    print(f"PyHessian (torch {pyh['torch']}): eigenvalues(top_n=1) {pyh['top_s']:.1f} s, "
          f"trace() {pyh['trace_s']:.1f} s ({pyh['trace_samples']} samples), density("
          f"{args.lanczos_steps}, {args.slq_probes}) {pyh['density_s']:.1f} s; total "
          f"{pyh['total']:.1f} s; λ_max {pyh['lambda_max']:.9g} (relative to crit "
          f"{(pyh['lambda_max'] - crit_out['lambda_max']) / crit_out['lambda_max']:+.1e}; "
          "PyHessian divides by ‖v‖ + 1e-6)")
    print(f"ratio PyHessian / crit wall time: {pyh['total'] / crit_out['wall']:.2f}x "
          "(crit's includes Python start, imports, checkpoint, compile and writing)")


if __name__ == "__main__":
    main()
