"""The curvature toolbox (issue 25): GGN matvec cost in gradients, and trace estimators at equal
matvecs against the exact trace and against PyHessian's Hutchinson.

Run from the repository root::

    python -m benchmarks.bench_curvature            # ~5 min on 2 cores

1. Cost: on crit's registry CNN (N = ``--n``, CIFAR-shaped synthetic images, eval batches of
   ``--batch``), the median time of a gradient, a Hessian-vector product and a GGN product
   (:func:`crit.curvature.curvature_matvec`, jitted with the data as arguments), each as a
   multiple of the gradient. Target: GGN ≤ 1.5 gradients.
2. Trace: a tanh MLP on the digits data (P about 2,500, so the exact trace is the dense
   Hessian's) and ``--seeds`` seeds: Hutchinson, Hutch++ and XTrace
   (:mod:`crit.estimators`) at 100 and 300 products: mean |relative error|, the fraction of
   seeds whose 95% interval covers the exact trace, and time per product. PyHessian's
   ``trace(maxIter=m)`` (Hutchinson, Rademacher) on the same network ported to PyTorch in
   float64, where it is installed (``pip install torch==2.13.0``, then
   ``pip install --no-deps pyhessian``): its error and time per product. curvlinops is not on
   this machine's package index; it is reported as skipped.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np

import crit  # noqa: F401  (float64)
from benchmarks.bench_models import HPARAMS, build
from crit.curvature import curvature_matvec
from crit.estimators import hutchinson_trace, hutchpp_trace, xtrace
from crit.hessian import dense_hessian
from crit.models import get_model
from crit.trained import data_objective, from_linen


def median_time(fn, *args, reps: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def cost(n: int, batch: int, reps: int) -> None:
    problem, params, state = build("cnn", n, batch, "synthetic")
    d = problem.dataset
    module = get_model("cnn", d.n_outputs, **HPARAMS["cnn"])
    trained = from_linen(module, {**params, **state}, d.x_train[:2], "eval")
    data = (jnp.asarray(d.x_train), jnp.asarray(d.y_train))
    objective = data_objective(trained, "xent", batch)
    theta, unravel = jax.flatten_util.ravel_pytree(trained.params)
    v = jax.random.normal(jax.random.key(1), theta.shape)
    grad = jax.jit(lambda p, dd: jax.grad(objective)(p, dd))
    hvp = jax.jit(curvature_matvec("hessian", trained, "xent", batch))
    ggn = jax.jit(curvature_matvec("ggn", trained, "xent", batch))
    # the floor of J^T Λ J v: one forward pass with its tangent (jvp) and one backward pass;
    # measured as jvp + gradient - forward (the two share the forward pass)
    apply = lambda p, x: trained.apply_fn(p, x, trained.state)  # noqa: E731
    v_tree = unravel(v)

    def batched(fn):
        def run(p, dd):
            xs = dd[0].reshape(-1, batch, *dd[0].shape[1:])
            return jax.lax.map(lambda xb: fn(p, xb), xs)
        return jax.jit(run)

    fwd = batched(lambda p, xb: apply(p, xb))
    tangent = batched(lambda p, xb: jax.jvp(lambda q: apply(q, xb), (p,), (v_tree,)))
    t_g = median_time(grad, trained.params, data, reps=reps)
    t_h = median_time(hvp, trained.params, data, v, reps=reps)
    t_G = median_time(ggn, trained.params, data, v, reps=reps)
    t_f = median_time(fwd, trained.params, data, reps=reps)
    t_j = median_time(tangent, trained.params, data, reps=reps)
    floor = t_j + t_g - t_f
    print(f"cost (CNN, P = {theta.size}, N = {n}, batches of {batch}): gradient "
          f"{t_g * 1e3:.0f} ms; forward {t_f * 1e3:.0f} ms; forward + tangent (jvp) "
          f"{t_j * 1e3:.0f} ms; HVP {t_h * 1e3:.0f} ms = {t_h / t_g:.2f} gradients; GGN "
          f"product {t_G * 1e3:.0f} ms = {t_G / t_g:.2f} gradients (target ≤ 1.5); its floor "
          f"jvp + gradient - forward = {floor * 1e3:.0f} ms = {floor / t_g:.2f} gradients, "
          f"GGN / floor = {t_G / floor:.2f}", flush=True)


def mlp_problem():
    from crit.problems import model_problem

    problem = model_problem("mlp", "digits", widths=(32, 32), n_points=256)
    params = problem.init_fn(jax.random.PRNGKey(0))
    return problem, params


def trace_errors(seeds: int, budgets) -> None:
    problem, params = mlp_problem()
    loss = problem.bind_state({})
    theta, unravel = jax.flatten_util.ravel_pytree(params)
    dim = int(theta.size)
    exact = float(jnp.trace(dense_hessian(loss, params)))
    _, matvec = jax.linearize(jax.grad(lambda t: loss(unravel(t))), theta)
    print(f"\ntrace (MLP on digits, P = {dim}, exact tr H = {exact:.6g}; {seeds} seeds)",
          flush=True)
    keys = jax.random.split(jax.random.key(0), seeds)
    for m in budgets:
        for name, est in (("hutchinson", hutchinson_trace), ("hutch++", hutchpp_trace),
                          ("xtrace", xtrace)):
            run = jax.jit(jax.vmap(lambda k: est(matvec, k, dim, m)))
            t = time.perf_counter()
            out = jax.block_until_ready(run(keys))
            first = time.perf_counter() - t
            t = time.perf_counter()
            out = jax.block_until_ready(run(keys))
            per = (time.perf_counter() - t) / (seeds * m)
            err = np.abs(np.asarray(out.estimate) - exact) / abs(exact)
            cover = np.mean((np.asarray(out.lo) <= exact) & (exact <= np.asarray(out.hi)))
            print(f"  crit {name:10s} m = {m:3d}: mean |rel error| {err.mean():.2e}, 95% "
                  f"interval covers {cover:.0%}, {per * 1e6:.0f} µs per product (compile + "
                  f"first run {first:.1f} s)", flush=True)
        pyhessian_trace(problem, params, m, exact, min(seeds, 5))
    print("  curvlinops: skipped (not installed; not on this machine's package index)")


def pyhessian_trace(problem, params, m, exact, seeds) -> None:
    try:
        import torch
        from pyhessian import hessian as pyh
    except ImportError:
        print("  PyHessian: skipped (not installed)")
        return
    from benchmarks.bench_models import pyhessian_shims

    pyhessian_shims(torch)
    torch.set_default_dtype(torch.float64)
    p = params["params"]
    names = sorted(p)  # Dense_0, Dense_1, Dense_2
    layers = []
    for name in names:
        lin = torch.nn.Linear(*p[name]["kernel"].shape)
        lin.weight.data = torch.tensor(np.asarray(p[name]["kernel"]).T.copy())
        lin.bias.data = torch.tensor(np.asarray(p[name]["bias"]).copy())
        layers += [lin, torch.nn.Tanh()]
    net = torch.nn.Sequential(*layers[:-1])
    d = problem.dataset
    x = torch.tensor(np.asarray(d.x_train).reshape(len(d.x_train), -1))
    y = torch.tensor(np.asarray(d.y_train), dtype=torch.long)
    crit_loss = float(problem.bind_state({})(params))
    with torch.no_grad():
        torch_loss = float(torch.nn.functional.cross_entropy(net(x), y))
    if abs(torch_loss - crit_loss) > 1e-10 * abs(crit_loss):
        print(f"  PyHessian: skipped (ported loss {torch_loss} != crit's {crit_loss})")
        return
    errs, per = [], []
    for seed in range(seeds):
        torch.manual_seed(seed)
        h = pyh(net, torch.nn.CrossEntropyLoss(), data=(x, y), cuda=False)
        t = time.perf_counter()
        samples = h.trace(maxIter=m, tol=0.0)
        per.append((time.perf_counter() - t) / len(samples))
        errs.append(abs(float(np.mean(samples)) - exact) / abs(exact))
    print(f"  PyHessian trace(maxIter={m}) (Hutchinson, {seeds} seeds): mean |rel error| "
          f"{np.mean(errs):.2e}, no interval, {np.median(per) * 1e6:.0f} µs per product",
          flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--seeds", type=int, default=50)
    args = parser.parse_args()
    print(f"bench_curvature {datetime.date.today()}, {platform.machine()}, {os.cpu_count()} "
          f"cores, jax {jax.__version__}", flush=True)
    cost(args.n, args.batch, args.reps)
    trace_errors(args.seeds, (100, 300))


if __name__ == "__main__":
    main()
