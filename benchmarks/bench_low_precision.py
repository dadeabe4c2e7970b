"""Search in low precision, prove in float64 (issue 24, point 3): ``analyze_model`` with
``hvp_dtype`` float32 and bfloat16 against all-float64, on a trained CNN and a trained ResNet-20.

Run from the repository root::

    python -m benchmarks.bench_low_precision                 # ~15 min on 2 cores
    python -m benchmarks.bench_low_precision --models cnn    # the CNN only

1. The networks: crit's registry CNN (N = ``--n_cnn`` CIFAR-shaped synthetic images) and
   ResNet-20 (BatchNorm, eval mode, N = ``--n_resnet``), from init key 0, then ``--train_steps``
   full-batch Adam steps on the eval-mode loss (float64), so the point is a trained one, not an
   init. The model enters as a linen module with its variables (``crit.trained.from_linen``),
   the way a user's would.
2. For each ``hvp_dtype``: ``analyze_point(objective, params, data, method="krylov")`` (the
   call ``analyze_model`` makes, with ``objective = crit.trained.data_objective``) twice with
   the same objective. The first call includes compilation; the second reuses the compiled programs, so
   its time is the run itself. Both are reported; the ratio that the target names is of the
   second (the compile is paid once per model and settings, the run per point).
3. Reported per run: the proven upper bound on λ_min (y'Hy + δ, float64 in every case), λ_max,
   the verdict, the measured search error η, and the products spent (low precision, float64).

Target (issue 24): float32 search + float64 proof ≥ 3× faster than all-float64 on this CPU,
with the proven bound within 1% of the all-float64 one; bfloat16 measured and reported.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

import crit  # noqa: F401  (float64)
from benchmarks.bench_models import HPARAMS, build
from crit.analysis import analyze_point
from crit.models import get_model
from crit.trained import data_objective, from_linen

DTYPES = ("float64", "float32", "bfloat16")


def trained_point(model: str, n: int, batch: int, steps: int):
    """(TrainedModel, (x, y), loss before, loss after) for a registry model after ``steps``
    full-batch Adam steps (learning rate 1e-3) on its eval-mode loss."""
    problem, params, state = build(model, n, batch, "synthetic")
    loss = problem.bind_state(state)
    opt = optax.adam(1e-3)

    @jax.jit
    def step(p, s):
        value, g = jax.value_and_grad(loss)(p)
        updates, s = opt.update(g, s, p)
        return optax.apply_updates(p, updates), s, value

    s = opt.init(params)
    first = None
    for _ in range(steps):
        params, s, value = step(params, s)
        first = float(value) if first is None else first
    d = problem.dataset
    module = get_model(model, d.n_outputs, **HPARAMS[model])
    variables = {**params, **state}
    trained = from_linen(module, variables, d.x_train[:2], "eval")
    return trained, (jnp.asarray(d.x_train), jnp.asarray(d.y_train)), first, float(loss(params))


def analyse(objective, trained, data, dtype, args):
    kw = dict(method="krylov", lanczos_steps=args.lanczos_steps, slq_probes=args.slq_probes,
              hvp_dtype=dtype, key=jax.random.key(0))
    times, report = [], None
    for _ in range(2):  # the same objective object: the second call reuses the compilation
        t = time.perf_counter()
        report = analyze_point(objective, trained.params, data, **kw)
        times.append(time.perf_counter() - t)
    return times, report.points[0]


def hvp_floor(objective, trained, data, reps: int = 5) -> dict:
    """Median time of one HVP of ``objective`` in each dtype (the search's operator, same
    batches): the ratio float64/float32 is the most a low-precision search can gain."""
    from jax.flatten_util import ravel_pytree

    from crit.analysis import search_operator
    from crit.hessian import hvp_operator

    dim = ravel_pytree(trained.params)[0].size
    v = jax.random.normal(jax.random.key(1), (dim,))
    out = {}
    for dtype in DTYPES:
        if dtype == "float64":
            run = jax.jit(lambda p, d, u: hvp_operator(lambda q: objective(q, d), p)[1](u))
        else:
            run = jax.jit(lambda p, d, u, dt=dtype: search_operator(objective, p, d, dt)(u))
        jax.block_until_ready(run(trained.params, data, v))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            jax.block_until_ready(run(trained.params, data, v))
            times.append(time.perf_counter() - t)
        out[dtype] = float(np.median(times))
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", default="cnn,resnet")
    parser.add_argument("--n_cnn", type=int, default=256)
    parser.add_argument("--n_resnet", type=int, default=32)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--train_steps", type=int, default=100)
    parser.add_argument("--lanczos_steps", type=int, default=40)
    parser.add_argument("--slq_probes", type=int, default=2)
    parser.add_argument("--floor_only", action="store_true",
                        help="only the HVP times per dtype (the floor of the speed-up)")
    args = parser.parse_args()
    print(f"bench_low_precision {datetime.date.today()}, {platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__}, backend {jax.default_backend()}; "
          f"Krylov {args.lanczos_steps} steps × {args.slq_probes} SLQ probes, eval batches of "
          f"{args.batch}", flush=True)
    for model in filter(None, args.models.split(",")):
        n = args.n_cnn if model == "cnn" else args.n_resnet
        trained, data, before, after = trained_point(model, n, min(args.batch, n),
                                                     args.train_steps)
        print(f"\n{model}: P = {trained.n_params}, N = {n}, loss {before:.4f} -> {after:.4f} "
              f"after {args.train_steps} Adam steps", flush=True)
        rows = {}
        objective = data_objective(trained, "xent", min(args.batch, n))
        floor = hvp_floor(objective, trained, data)
        print("  one HVP (linearization included, same batches): " + ", ".join(
            f"{k} {v * 1e3:.0f} ms" for k, v in floor.items())
              + f"; float64/float32 = {floor['float64'] / floor['float32']:.2f}x, the most the "
              "float32 search can gain", flush=True)
        if args.floor_only:
            continue
        for dtype in DTYPES:
            (first, second), p = analyse(objective, trained, data, dtype, args)
            rows[dtype] = (second, p)
            print(f"  {dtype:9s} first call {first:7.1f} s (with compile), second {second:7.1f} "
                  f"s; proven λ_min ≤ {p.lambda_min_bound:.6g} ({p.verdict}, negative proven "
                  f"{p.negative_proven}), λ_max {p.lambda_max:.6g}, η {p.search_error:.2g}, "
                  f"products {p.num_matvecs} + {p.num_check_matvecs} float64", flush=True)
        base_t, base = rows["float64"]
        for dtype in DTYPES[1:]:
            t, p = rows[dtype]
            rel = (abs(p.lambda_min_bound - base.lambda_min_bound)
                   / max(abs(base.lambda_min_bound), 1e-300))
            print(f"  {dtype} vs float64: {base_t / t:.2f}x faster (second calls); proven bound "
                  f"differs by {rel:.2e} relative; λ_max by "
                  f"{abs(p.lambda_max - base.lambda_max) / abs(base.lambda_max):.1e}", flush=True)


if __name__ == "__main__":
    main()
