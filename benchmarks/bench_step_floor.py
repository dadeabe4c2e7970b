"""How far the homework workload's steps are from the cost of their own kernels, on one core.

Run from the repository root (pin it to one core for clean numbers)::

    XLA_FLAGS=--xla_cpu_multi_thread_eigen=false taskset -c 0 python -m benchmarks.bench_step_floor

Per init of the homework workload (MLP 1-16-16-1 tanh, 256 points, float64; ``bench_min_ratio``)
crit spends its time in 2000 Adam steps, 1000 gradient-norm steps, P = 321 Hessian columns and
one ``eigvalsh``. This script times, per init and per step, with ``--width`` inits vmapped as in
crit's protocol:

* the pieces of the protocol: a training step (value_and_grad + Adam), a gradient-norm step
  (gradient + H·g through one linearization + Adam), one Hessian column (a tangent through the
  linearized gradient), ``eigvalsh`` of the 321×321 Hessian;
* the kernels a training step cannot avoid, each alone in a ``scan`` of the same length: the
  batched 256×16 by 16×16 matmul (the step has three of that size: one forward, two backward),
  a float64 ``tanh`` over the 256×16 activations (two per step) and one elementwise pass over
  them (a multiply, memory-bound; a step has about ten).

It prints the per-step times, the kernel floor of a training step (3 matmuls + 2 tanh + 10
passes) and the per-init time of the whole workload on one core, which bounds what two cores
can do: (2000·train + 1000·gradnorm + 321·column + eigvalsh) / 2.
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
from crit.hessian import flat_loss
from crit.problems import mlp_problem
from crit.protocol import init_key

STEPS = 400


def per_step_us(fn, arg, width: int, steps: int = STEPS, reps: int = 3) -> float:
    """Best per-init, per-step time (µs) of ``steps`` iterations of ``fn`` in one ``scan``."""
    run = jax.jit(lambda a: jax.lax.scan(lambda c, _: (fn(c), None), a, None, length=steps)[0])
    jax.block_until_ready(run(arg))
    best = np.inf
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(run(arg))
        best = min(best, time.perf_counter() - t)
    return 1e6 * best / steps / width


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--width", type=int, default=10, help="inits vmapped together (crit: 10)")
    args = ap.parse_args(argv)
    w = args.width
    problem = mlp_problem("sinc", widths=(16, 16), n_points=256)
    params = jax.vmap(lambda i: problem.init_fn(init_key(0, i)))(jnp.arange(w))
    f, _, _ = flat_loss(problem.loss_fn, jax.tree.map(lambda a: a[0], params))
    theta = jax.vmap(lambda p: flat_loss(problem.loss_fn, p)[1])(params)
    grad_f = jax.grad(f)
    adam = optax.adam(1e-2)

    def train_step(c):
        t, s = c
        g = grad_f(t)
        u, s = adam.update(g, s, t)
        return t + u, s

    def gradnorm_step(c):
        t, s = c
        g, lin = jax.linearize(grad_f, t)
        u, s = adam.update(lin(g), s, t)
        return t + u, s

    basis = jnp.zeros_like(theta).at[:, 0].set(1.0)

    def column(c):
        t, v = c
        _, lin = jax.linearize(grad_f, t)
        return t, lin(v) * 1e-30 + v

    state = jax.vmap(adam.init)(theta)
    vm = jax.vmap
    pieces = {
        "training step (grad + Adam)": per_step_us(vm(train_step), (theta, state), w),
        "gradient-norm step (grad + H·g + Adam)": per_step_us(vm(gradnorm_step), (theta, state), w),
        "Hessian column (tangent through the linearized gradient)":
            per_step_us(vm(column), (theta, basis), w),
    }
    hess = jax.vmap(jax.hessian(f))(theta)
    eigh = jax.jit(jax.vmap(jnp.linalg.eigvalsh))
    jax.block_until_ready(eigh(hess))
    t0 = time.perf_counter()
    jax.block_until_ready(eigh(hess))
    eigh_us = 1e6 * (time.perf_counter() - t0) / w

    key = jax.random.PRNGKey(0)
    act = jax.random.normal(key, (w, 256, 16), jnp.float64)
    wmat = jax.random.normal(jax.random.PRNGKey(1), (w, 16, 16), jnp.float64) * 0.25
    kernels = {
        "batched matmul 256x16 @ 16x16": per_step_us(
            lambda a: jnp.einsum("bni,bij->bnj", a, wmat), act, w),
        "tanh over 256x16 (float64)": per_step_us(jnp.tanh, act, w),
        "elementwise pass over 256x16 (multiply)": per_step_us(lambda a: a * 0.999, act, w),
    }
    floor = (3 * kernels["batched matmul 256x16 @ 16x16"]
             + 2 * kernels["tanh over 256x16 (float64)"]
             + 10 * kernels["elementwise pass over 256x16 (multiply)"])

    print(f"# bench_step_floor {datetime.datetime.now().isoformat(timespec='seconds')}, "
          f"{platform.machine()}, os.cpu_count()={os.cpu_count()}, affinity "
          f"{sorted(os.sched_getaffinity(0))}, jax {jax.__version__}, {w} inits vmapped\n")
    print("| piece | µs per init per step |")
    print("|---|---|")
    for name, us in {**pieces, **kernels}.items():
        print(f"| {name} | {us:.2f} |")
    print(f"| eigvalsh 321x321 (per init, once) | {eigh_us:.0f} |")
    print(f"| kernel floor of a training step (3 matmuls + 2 tanh + 10 passes) | {floor:.2f} |")
    per_init = (2000 * pieces["training step (grad + Adam)"]
                + 1000 * pieces["gradient-norm step (grad + H·g + Adam)"]
                + 321 * pieces["Hessian column (tangent through the linearized gradient)"]
                + eigh_us) / 1e3
    print(f"\ntraining step / kernel floor = {pieces['training step (grad + Adam)'] / floor:.2f}")
    print(f"one init of the workload on this core: {per_init:.0f} ms; N = 1000 on two such "
          f"cores with perfect scaling: {per_init:.0f} ms x 1000 / 2 = {per_init / 2:.0f} s")


if __name__ == "__main__":
    main()
