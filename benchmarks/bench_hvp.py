"""Cost of a Hessian-vector product relative to a gradient: crit (JAX) vs PyTorch.

Run from the repository root::

    python -m benchmarks.bench_hvp                 # ~2 min on 2 CPU cores
    python -m benchmarks.bench_hvp --reps 20

Model: MLP 64-256-256-10, tanh, softmax cross-entropy (mean), 2048 samples with digits-like
inputs (uniform in [0, 1]^64) and uniform random labels, float64; P = 85,002 parameters.
All methods run at the same parameters and the same vector v.

Methods (times are medians over ``--reps`` calls after a warm-up; the first call's compile
time is excluded):

- crit gradient: ``jit(grad(L))``.
- crit HVP, fresh: ``jit(jvp(grad(L)))`` -- one forward-over-reverse pass per product, what
  ``crit.hessian.hvp`` costs when called on its own.
- crit HVP, shared linearization: ``crit.hessian.hvp_operator`` (``jax.linearize`` of the
  gradient once, then one tangent pass per product), as inside Lanczos / MINRES. The cost
  per product is the slope of the time of K products in one jitted call, (T(K2) - T(K1)) /
  (K2 - K1), so the one-off linearization is not counted.
- crit HVP, block of ``--block`` vectors: ``vmap`` of the shared-linearization matvec over a
  block of vectors, as crit's SLQ runs it (``krylov_spectrum`` vmaps its ``num_probes + 1``
  Lanczos runs, 9 by default, so every step applies H to 9 vectors at once). Cost per product:
  the slope over the number of blocks in one call, divided by the block size.
- torch gradient: ``torch.autograd.grad(loss, params)`` (forward + backward).
- torch HVP, graph reuse: PyHessian's method -- the gradient once with ``create_graph=True``,
  then ``torch.autograd.grad(g, params, grad_outputs=v, retain_graph=True)`` (= d(g.v)/dθ) per
  product, timed per product. PyHessian's density and trace loops apply it to one probe at a
  time.
- torch HVP, batched: the same graph with ``is_grads_batched=True`` over a block of
  ``--block`` vectors (torch's vmap over the cotangents), per product.

PyTorch is optional (``pip install torch==2.13.0`` to measure; never a requirement); without
it those rows read "skipped". Targets (issue 3): an HVP costs <= 2 gradients, and crit's HVP
is >= 1.5x faster than PyTorch's. Both are reported one vector at a time (crit's Lanczos) and
per vector as each tool's spectral density runs it (crit: blocks; PyHessian: one at a time),
with torch's own batched HVP beside them.
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
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit.hessian import hvp_operator

D_IN, WIDTH, CLASSES, N = 64, 256, 10, 2048


def make_data(seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(0.0, 1.0, size=(N, D_IN))
    y = rng.integers(0, CLASSES, size=N)
    sizes = [D_IN, WIDTH, WIDTH, CLASSES]
    params = []
    for a, b in zip(sizes[:-1], sizes[1:]):
        params.append((rng.standard_normal((a, b)) / np.sqrt(a), 0.1 * rng.standard_normal(b)))
    return x, y, params


def jax_loss(params, x, y):
    h = x
    for w, b in params[:-1]:
        h = jnp.tanh(h @ w + b)
    w, b = params[-1]
    logits = h @ w + b
    logp = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))


def timeit(fn, reps):
    fn()  # warm-up (compilation)
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times)), float(np.min(times))


def bench_jax(x, y, params, v_np, reps, block):
    theta, unravel = ravel_pytree([tuple(map(jnp.asarray, p)) for p in params])
    x, y = jnp.asarray(x), jnp.asarray(y)
    f = lambda t: jax_loss(unravel(t), x, y)  # noqa: E731
    v = jnp.asarray(v_np)
    grad = jax.jit(jax.grad(f))
    fresh = jax.jit(lambda t, u: jax.jvp(jax.grad(f), (t,), (u,))[1])

    def shared(t, vs):
        _, matvec = hvp_operator(f, t)
        return jax.lax.map(matvec, vs)

    shared = jax.jit(shared)
    k1, k2 = 2, 12
    vs1, vs2 = jnp.tile(v, (k1, 1)), jnp.tile(v, (k2, 1))
    out = {"grad": timeit(lambda: grad(theta).block_until_ready(), reps),
           "fresh": timeit(lambda: fresh(theta, v).block_until_ready(), reps)}
    t1 = timeit(lambda: shared(theta, vs1).block_until_ready(), max(reps // 2, 3))
    t2 = timeit(lambda: shared(theta, vs2).block_until_ready(), max(reps // 2, 3))
    out["shared"] = ((t2[0] - t1[0]) / (k2 - k1), (t2[1] - t1[1]) / (k2 - k1))
    out["shared_k"] = (t1[0], k1, t2[0], k2)

    def blocked(t, vss):
        _, matvec = hvp_operator(f, t)
        return jax.lax.map(jax.vmap(matvec), vss)

    blocked = jax.jit(blocked)
    b1, b2 = 1, 3
    vb1 = jnp.tile(v, (b1, block, 1))
    vb2 = jnp.tile(v, (b2, block, 1))
    u1 = timeit(lambda: blocked(theta, vb1).block_until_ready(), max(reps // 2, 3))
    u2 = timeit(lambda: blocked(theta, vb2).block_until_ready(), max(reps // 2, 3))
    per = (b2 - b1) * block
    out["block"] = ((u2[0] - u1[0]) / per, (u2[1] - u1[1]) / per)
    hv = np.asarray(shared(theta, v[None])[0])
    hv_block = np.asarray(blocked(theta, vb1)[0, -1])
    out["block_err"] = float(np.linalg.norm(hv_block - hv) / np.linalg.norm(hv))
    return out, hv, theta.size


def bench_torch(x, y, params, v_np, reps, block):
    try:
        import torch
    except ImportError:
        return None, None, None
    torch.set_num_threads(os.cpu_count() or 1)
    ps = []
    for w, b in params:
        ps += [torch.tensor(w, dtype=torch.float64, requires_grad=True),
               torch.tensor(b, dtype=torch.float64, requires_grad=True)]
    xt = torch.tensor(x, dtype=torch.float64)
    yt = torch.tensor(y, dtype=torch.long)

    def loss_fn():
        h = xt
        for i in range(0, len(ps) - 2, 2):
            h = torch.tanh(h @ ps[i] + ps[i + 1])
        return torch.nn.functional.cross_entropy(h @ ps[-2] + ps[-1], yt)

    def grad():
        return torch.autograd.grad(loss_fn(), ps)

    # Split v like the parameters (same order as ravel_pytree: w1, b1, w2, b2, ...).
    vt, i = [], 0
    for p in ps:
        vt.append(torch.tensor(v_np[i:i + p.numel()].reshape(p.shape)))
        i += p.numel()
    out = {"grad": timeit(grad, reps)}
    t = time.perf_counter()
    g = torch.autograd.grad(loss_fn(), ps, create_graph=True)
    out["graph"] = (time.perf_counter() - t,) * 2

    def hvp():
        return torch.autograd.grad(g, ps, grad_outputs=vt, retain_graph=True)

    out["hvp"] = timeit(hvp, reps)
    vb = [t.unsqueeze(0).repeat(block, *([1] * t.dim())) for t in vt]

    def hvp_batched():
        return torch.autograd.grad(g, ps, grad_outputs=vb, retain_graph=True,
                                   is_grads_batched=True)

    med, best = timeit(hvp_batched, max(reps // 2, 3))
    out["hvp_batched"] = (med / block, best / block)
    hv = torch.cat([h.reshape(-1) for h in hvp()]).numpy()
    return out, hv, torch.__version__


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=10, help="timed calls per method")
    parser.add_argument("--block", type=int, default=9,
                        help="vectors per block HVP (crit's SLQ default: 8 probes + 1 = 9)")
    args = parser.parse_args()
    x, y, params = make_data()
    sizes = sum(w.size + b.size for w, b in params)
    v = np.random.default_rng(1).standard_normal(sizes)
    print(f"# HVP benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"{platform.platform()}, load average {os.getloadavg()[0]:.1f} (shared machine: "
          f"timings are preliminary), jax {jax.__version__} on {jax.default_backend()}")
    jx, hv_jax, p = bench_jax(x, y, params, v, args.reps, args.block)
    tx, hv_torch, torch_version = bench_torch(x, y, params, v, args.reps, args.block)
    print(f"model: MLP {D_IN}-{WIDTH}-{WIDTH}-{CLASSES} tanh, softmax cross-entropy, "
          f"N = {N}, float64, P = {p:,}; torch {torch_version or 'not installed'}\n")
    g = jx["grad"][0]
    rows = [("crit gradient, jit(grad)", jx["grad"], 1.0),
            ("crit HVP, fresh jvp(grad)", jx["fresh"], jx["fresh"][0] / g),
            ("crit HVP, shared linearization (per product)", jx["shared"], jx["shared"][0] / g),
            (f"crit HVP, blocks of {args.block} (per product, as crit's SLQ)", jx["block"],
             jx["block"][0] / g)]
    if tx:
        tg = tx["grad"][0]
        rows += [("torch gradient, autograd.grad", tx["grad"], tx["grad"][0] / g),
                 ("torch gradient with create_graph=True (once)", tx["graph"],
                  tx["graph"][0] / g),
                 ("torch HVP, graph reuse (PyHessian)", tx["hvp"], tx["hvp"][0] / g),
                 (f"torch HVP, graph reuse, is_grads_batched blocks of {args.block} "
                  "(per product)", tx["hvp_batched"], tx["hvp_batched"][0] / g)]
    print("| method | median ms | min ms | / crit gradient | / own gradient |")
    print("|---|---|---|---|---|")
    for name, (med, best), rel in rows:
        own = rel if not name.startswith("torch") else med / tx["grad"][0]
        print(f"| {name} | {1e3 * med:.1f} | {1e3 * best:.1f} | {rel:.2f} | {own:.2f} |")
    if not tx:
        print("| torch rows | skipped: torch not installed | | | |")
    print()
    ratio = jx["shared"][0] / g
    print(f"- crit HVP (shared linearization) / crit gradient = {ratio:.2f} "
          f"(target <= 2: {'met' if ratio <= 2 else 'NOT met'}); fresh jvp(grad) = "
          f"{jx['fresh'][0] / g:.2f} gradients")
    t1, k1, t2, k2 = jx["shared_k"]
    print(f"  ({k1} products in one call {1e3 * t1:.1f} ms, {k2} products {1e3 * t2:.1f} ms)")
    if tx:
        speed = tx["hvp"][0] / jx["shared"][0]
        print(f"- torch HVP / torch gradient = {tx['hvp'][0] / tg:.2f}; crit is {speed:.2f}x "
              f"faster than torch per HVP (target >= 1.5x: {'met' if speed >= 1.5 else 'NOT met'})"
              f"; crit gradient is {tg / g:.2f}x faster than torch's")
        block_speed = tx["hvp"][0] / jx["block"][0]
        print(f"- per vector in each tool's spectral density: crit blocks of {args.block} vs "
              f"PyHessian one at a time: crit is {block_speed:.2f}x faster (target >= 1.5x: "
              f"{'met' if block_speed >= 1.5 else 'NOT met'}); against torch's own batched HVP "
              f"crit is {tx['hvp_batched'][0] / jx['block'][0]:.2f}x faster")
        err = np.linalg.norm(hv_jax - hv_torch) / np.linalg.norm(hv_torch)
        print(f"- agreement: ||Hv_crit - Hv_torch|| / ||Hv_torch|| = {err:.1e}")
    print(f"- crit block HVP vs single HVP: relative difference {jx['block_err']:.1e}")


if __name__ == "__main__":
    main()
