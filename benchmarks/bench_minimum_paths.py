"""Minimum energy paths between many pairs of minima at once (issue 15).

Run from the repository root::

    python -m benchmarks.bench_minimum_paths                      # ~2.5 min on 2 cores
    python -m benchmarks.bench_minimum_paths --band_steps 1000 --torch_pairs 2   # quick

Workload: the ``minimum_paths`` app's networks (48 Gaussian points in 2 dimensions, a scalar
Gaussian target, tanh MLP 2-w-1, L2 1e-2, MSE, float64; default w = 8, P = 33). Inits
``fold_in(fold_in(PRNGKey(0), w), i)`` are trained with 5000 Adam steps (lr 1e-2), refined by
damped Newton and certified as strict minima (‖∇L‖ ≤ 1e-8, every Hessian eigenvalue > τ, the
default tolerance); the first 64 certified ones make 32 pairs (2k, 2k + 1). That is setup, not
timed. Every band has the app's 15 images and relaxes with the app's defaults (Adam, lr 1e-2
cosine-decayed, spring 1, climbing after 1000 steps) for exactly ``--band_steps`` steps:
``force_tol = 0`` switches the early stop off, so every method does the same work. Compared,
after compilation:

1. crit, all 32 bands in one program: ``jit(crit.paths.many_bands)``;
2. crit, one pair at a time: ``jit(crit.paths.relax_band)`` (compiled once) called 32 times;
2'. crit, the same ``many_bands`` with the 32 pairs split over 2 host devices
   (``XLA_FLAGS=--xla_force_host_platform_device_count=2``, ``shard_map``, 16 bands per device),
   in a subprocess (``--skip_devices`` leaves it out);
3. a per-pair PyTorch band loop (float64): the same improved tangent, spring, climbing image and
   Adam with the same cosine schedule, written out in torch, the images of a band in one batch
   and their gradients by ``torch.autograd.grad``. Timed on ``--torch_pairs`` pairs and
   extrapolated linearly to 32 (the loop is serial). It starts from the same lines as crit.

Agreement is checked on bands of ``--check_steps`` steps (default 1200 and 1500: 200 and 500
of them with a climbing image): final energies of crit vmapped vs one at a time over all 32
bands, and of torch vs crit on the timed pairs. Over the full 5000 steps the differences of
rounding (a 32-wide vmap vs one band, torch vs XLA) grow to visible differences in some bands,
as the homework training does in ``bench_min_ratio``; the script prints them too.

Then the floor: the time per band step of the 32 × 13 interior gradients in one ``vmap``
against 13 at a time (both inside a ``fori_loop``, so no dispatch is counted), and what the
vmapped program could reach if everything but the gradients were free.

Target (issue 15): ≥ 5× over the one-pair-at-a-time loop at 32 pairs on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time

import numpy as np

NUM_PAIRS = 32
NUM_IMAGES = 15
N_POINTS, DIM_IN, L2 = 48, 2, 1e-2
BAND = dict(spring=1.0, learning_rate=1e-2, climb_after=1000, force_tol=0.0)


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, best of ``repeats`` (CPU: all threads of this process)."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def certified_pairs(width: int):
    """(problem, energy, starts, ends, inits tried): 32 pairs of certified strict minima."""
    import jax
    import jax.numpy as jnp

    import crit  # noqa: F401  (float64)
    from crit.critical import newton_critical_point
    from crit.hessian import dense_hessian
    from crit.problems import flatten, mlp_problem
    from crit.spectrum import default_tolerance
    from crit.train import make_optimizer, train

    problem = mlp_problem(dataset="gaussian", widths=(width,), l2=L2, n_points=N_POINTS,
                          dim_in=DIM_IN, dim_out=1)
    _, unravel = flatten(problem.init_fn(jax.random.PRNGKey(0)))
    energy = lambda t: problem.loss_fn(unravel(t))  # noqa: E731
    optimizer = make_optimizer("adam", 1e-2)

    @jax.jit
    def minima(keys):
        def one(key):
            params, _ = train(problem.loss_fn, optimizer, problem.init_fn(key), 5000, 5000)
            theta = newton_critical_point(energy, flatten(params)[0], max_iters=30).params
            lam = jnp.linalg.eigvalsh(dense_hessian(energy, theta))
            strict = ((jnp.linalg.norm(jax.grad(energy)(theta)) <= 1e-8)
                      & (lam[0] > default_tolerance(lam)))
            return theta, strict
        return jax.vmap(one)(keys)

    root = jax.random.fold_in(jax.random.PRNGKey(0), width)
    n_try = 3 * NUM_PAIRS
    keys = jax.vmap(lambda i: jax.random.fold_in(root, i))(jnp.arange(n_try))
    thetas, strict = (np.asarray(x) for x in minima(keys))
    good = thetas[strict]
    if len(good) < 2 * NUM_PAIRS:
        raise SystemExit(f"only {len(good)} of {n_try} inits certified; need {2 * NUM_PAIRS}")
    good = good[:2 * NUM_PAIRS]
    return problem, energy, jnp.asarray(good[0::2]), jnp.asarray(good[1::2]), n_try, \
        int(strict.sum())


def run_crit(energy, starts, ends, steps: int, repeats: int):
    import jax

    from crit import paths

    kw = dict(BAND, num_steps=steps)
    many = jax.jit(lambda s, e: paths.many_bands(energy, s, e, num_images=NUM_IMAGES, **kw))
    one = jax.jit(lambda a, b: paths.relax_band(energy, paths.linear_path(a, b, NUM_IMAGES),
                                                **kw))
    start = time.perf_counter()
    bands = jax.block_until_ready(many(starts, ends))
    compile_many = time.perf_counter() - start
    t_many = timed(lambda: jax.block_until_ready(many(starts, ends)), repeats)
    start = time.perf_counter()
    jax.block_until_ready(one(starts[0], ends[0]))
    compile_one = time.perf_counter() - start
    singles = []

    def loop():
        singles.clear()
        for j in range(NUM_PAIRS):
            singles.append(jax.block_until_ready(one(starts[j], ends[j])))

    t_loop = timed(loop, repeats)
    single_energies = np.stack([np.asarray(b.energies) for b in singles])
    return bands, single_energies, dict(many=t_many, loop=t_loop, compile_many=compile_many,
                                        compile_one=compile_one)


def run_sharded(width: int, steps: int, repeats: int) -> dict:
    """In a process with 2 host devices: ``many_bands`` with the pair axis split over them
    (``shard_map``: each device relaxes 16 bands in its own loop). Returns times and energies."""
    import jax
    from jax.sharding import Mesh, PartitionSpec

    from crit import paths

    _, energy, starts, ends, _, _ = certified_pairs(width)
    kw = dict(BAND, num_steps=steps, num_images=NUM_IMAGES)
    mesh = Mesh(np.array(jax.devices()), ("pairs",))
    spec = PartitionSpec("pairs")
    sharded = jax.jit(jax.shard_map(lambda s, e: paths.many_bands(energy, s, e, **kw),
                                    mesh=mesh, in_specs=spec, out_specs=spec))
    start = time.perf_counter()
    bands = jax.block_until_ready(sharded(starts, ends))
    compile_time = time.perf_counter() - start
    wall, cpu = timed(lambda: jax.block_until_ready(sharded(starts, ends)), repeats)
    return dict(devices=jax.device_count(), wall=wall, cpu=cpu, compile=compile_time,
                energies=np.asarray(bands.energies).tolist())


def sharded_in_subprocess(args) -> dict:
    env = dict(os.environ, XLA_FLAGS=(os.environ.get("XLA_FLAGS", "") +
                                      " --xla_force_host_platform_device_count=2").strip())
    cmd = [sys.executable, "-m", "benchmarks.bench_minimum_paths", "--sharded_json",
           "--width", str(args.width), "--band_steps", str(args.band_steps),
           "--repeats", str(args.repeats)]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def torch_bands(problem, width: int, starts, ends, steps: int, pairs: list[int], threads: int):
    """The band of crit.paths.relax_band (default Adam) in torch, one pair after another.

    Returns ((wall, CPU) seconds, final energies per pair)."""
    import torch

    torch.set_num_threads(threads)
    x = torch.tensor(np.asarray(problem.dataset.x_train), dtype=torch.float64)
    y = torch.tensor(np.asarray(problem.dataset.y_train), dtype=torch.float64)
    w, d = width, DIM_IN
    # ravel_pytree order: Dense_0 bias, Dense_0 kernel, Dense_1 bias, Dense_1 kernel
    cuts = np.cumsum([0, w, d * w, 1, w])

    def energy(theta):  # (M, P) -> (M,)
        m = theta.shape[0]
        b1, k1 = theta[:, cuts[0]:cuts[1]], theta[:, cuts[1]:cuts[2]].reshape(m, d, w)
        b2, k2 = theta[:, cuts[2]:cuts[3]], theta[:, cuts[3]:cuts[4]].reshape(m, w, 1)
        h = torch.tanh(x @ k1 + b1[:, None, :])
        out = h @ k2 + b2[:, None, :]
        return torch.mean((out - y) ** 2, dim=(1, 2)) + 0.5 * L2 * torch.sum(theta ** 2, dim=1)

    def tangents(images, energies):
        plus, minus = images[2:] - images[1:-1], images[1:-1] - images[:-2]
        v_prev, v, v_next = energies[:-2], energies[1:-1], energies[2:]
        up, down = (v_next > v) & (v > v_prev), (v_next < v) & (v < v_prev)
        d_next, d_prev = (v_next - v).abs(), (v_prev - v).abs()
        d_max, d_min = torch.maximum(d_next, d_prev), torch.minimum(d_next, d_prev)
        mixed = torch.where((v_next > v_prev)[:, None],
                            plus * d_max[:, None] + minus * d_min[:, None],
                            plus * d_min[:, None] + minus * d_max[:, None])
        mixed = torch.where((d_max == 0)[:, None], plus + minus, mixed)
        tau = torch.where(up[:, None], plus, torch.where(down[:, None], minus, mixed))
        norm = torch.linalg.norm(tau, dim=1, keepdim=True)
        return tau / torch.where(norm > 0, norm, torch.ones_like(norm))

    lr, b1, b2, eps, alpha = BAND["learning_rate"], 0.9, 0.999, 1e-8, 1e-3

    def schedule(count):  # optax.cosine_decay_schedule(lr, steps, alpha=1e-3)
        c = min(float(count), float(steps))
        return lr * ((1 - alpha) * (0.5 * (1 + math.cos(math.pi * c / steps))) + alpha)

    finals = []
    wall, cpu = time.perf_counter(), time.process_time()
    for j in pairs:
        a = torch.tensor(np.asarray(starts[j]), dtype=torch.float64)
        b = torch.tensor(np.asarray(ends[j]), dtype=torch.float64)
        t = torch.linspace(0.0, 1.0, NUM_IMAGES, dtype=torch.float64)
        line = (1.0 - t)[:, None] * a[None, :] + t[:, None] * b[None, :]
        inner = line[1:-1].clone()
        with torch.no_grad():
            ends_e = energy(torch.stack([a, b]))

        def forces_at(inner, step):
            th = inner.detach().requires_grad_(True)
            e = energy(th)
            (g,) = torch.autograd.grad(e.sum(), th)
            with torch.no_grad():
                e = e.detach()
                full = torch.cat([a[None], inner, b[None]])
                tau = tangents(full, torch.cat([ends_e[:1], e, ends_e[1:]]))
                g_par = (g * tau).sum(dim=1, keepdim=True)
                seg = torch.linalg.norm(full[1:] - full[:-1], dim=1)
                f_neb = -(g - g_par * tau) + BAND["spring"] * (seg[1:] - seg[:-1])[:, None] * tau
                if step >= BAND["climb_after"]:
                    c = int(torch.argmax(e))
                    f_neb[c] = -g[c] + 2.0 * g_par[c] * tau[c]
            return f_neb, e

        mu, nu = torch.zeros_like(inner), torch.zeros_like(inner)
        forces, e = forces_at(inner, 0)
        for step in range(steps):
            with torch.no_grad():
                grad = -forces
                mu = (1 - b1) * grad + b1 * mu
                nu = (1 - b2) * grad ** 2 + b2 * nu
                count = step + 1
                mu_hat, nu_hat = mu / (1 - b1 ** count), nu / (1 - b2 ** count)
                inner = inner + (-schedule(step)) * (mu_hat / (torch.sqrt(nu_hat) + eps))
            forces, e = forces_at(inner, step + 1)
        finals.append(torch.cat([ends_e[:1], e, ends_e[1:]]).numpy())
    return (time.perf_counter() - wall, time.process_time() - cpu), np.stack(finals)


def short_horizon_check(problem, width, energy, starts, ends, steps: int, chosen, threads,
                        with_torch: bool) -> dict:
    """Max |ΔL| between the methods' final energies for bands of ``steps`` steps (no timing)."""
    import jax

    from crit import paths

    kw = dict(BAND, num_steps=steps)
    many = jax.jit(lambda s, e: paths.many_bands(energy, s, e, num_images=NUM_IMAGES, **kw))
    one = jax.jit(lambda a, b: paths.relax_band(energy, paths.linear_path(a, b, NUM_IMAGES),
                                                **kw))
    e_many = np.asarray(many(starts, ends).energies)
    e_one = np.stack([np.asarray(one(starts[j], ends[j]).energies) for j in range(NUM_PAIRS)])
    out = dict(single=np.abs(e_many - e_one).max())
    if with_torch:
        _, finals = torch_bands(problem, width, starts, ends, steps, chosen, threads)
        out["torch"] = np.abs(finals - e_many[chosen]).max()
    return out


def gradient_floor(energy, starts, ends, reps: int = 200):
    """Seconds per band step of the interior gradients: 32 × 13 images in one vmap, and 13."""
    import jax
    import jax.numpy as jnp

    from crit import paths

    images = jax.vmap(lambda a, b: paths.linear_path(a, b, NUM_IMAGES))(starts, ends)[:, 1:-1]
    value_and_grad = jax.vmap(jax.value_and_grad(energy))

    def repeated(fn):
        def run(x):
            def body(_, acc):  # the carry feeds back, so XLA cannot hoist the gradient
                e, g = fn(x + acc * 1e-300)
                return acc + 0.0 * (jnp.sum(e) + jnp.sum(g))
            return jax.lax.fori_loop(0, reps, body, jnp.zeros((), x.dtype))
        return jax.jit(run)

    batched, single = repeated(jax.vmap(value_and_grad)), repeated(value_and_grad)
    jax.block_until_ready(batched(images))
    jax.block_until_ready(single(images[0]))
    t_batched = timed(lambda: jax.block_until_ready(batched(images)), 3)
    t_single = timed(lambda: jax.block_until_ready(single(images[0])), 3)
    return tuple(t / reps for t in t_batched), tuple(t / reps for t in t_single)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=8, help="Hidden width w (P = 4w + 1).")
    parser.add_argument("--band_steps", type=int, default=5000,
                        help="Band steps, the same for every method (the app's default).")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed repeats of each crit variant (best kept).")
    parser.add_argument("--torch_pairs", type=int, default=4,
                        help="PyTorch pairs timed (extrapolated to 32).")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--check_steps", default="1200,1500",
                        help="Band steps of the agreement checks, comma separated (climbing from "
                        "step 1000): over the full run rounding differences grow, see the "
                        "module docstring.")
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--skip_devices", action="store_true",
                        help="Skip the row with the pairs split over 2 host devices.")
    parser.add_argument("--sharded_json", action="store_true",
                        help="Internal: time the 2-device program and print one JSON line.")
    args = parser.parse_args()

    if args.sharded_json:
        print(json.dumps(run_sharded(args.width, args.band_steps, args.repeats)))
        return

    import jax

    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# bench_minimum_paths, {now:%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"{platform.platform()}, load average {os.getloadavg()[0]:.1f} at start, jax "
          f"{jax.__version__} on {jax.default_backend()} ({jax.device_count()} device)")
    start = time.perf_counter()
    problem, energy, starts, ends, n_try, n_good = certified_pairs(args.width)
    setup = time.perf_counter() - start
    steps = args.band_steps
    print(f"workload: {problem.name}, P = {problem.n_params}; {n_good} of {n_try} inits "
          f"certified strict minima (setup {setup:.1f} s, not timed), the first "
          f"{2 * NUM_PAIRS} paired into {NUM_PAIRS} bands of {NUM_IMAGES} images; Adam lr "
          f"{BAND['learning_rate']:g} cosine-decayed, spring {BAND['spring']:g}, climbing after "
          f"{BAND['climb_after']} steps, exactly {steps} steps per band (force_tol = 0: no early "
          "stop, equal work for every method)")

    bands, single_energies, t = run_crit(energy, starts, ends, steps, args.repeats)
    mw, mc = t["many"]
    lw, lc = t["loop"]
    rows = [f"| crit, all {NUM_PAIRS} bands in one vmapped program | {mw:.2f} | {mc:.2f} | "
            f"{1e3 * mc / NUM_PAIRS:.1f} | 1 |",
            f"| crit, one pair at a time (compiled once, {NUM_PAIRS} calls) | {lw:.2f} | "
            f"{lc:.2f} | {1e3 * lc / NUM_PAIRS:.1f} | **{lw / mw:.1f}× / {lc / mc:.1f}×** |"]
    e_many = np.asarray(bands.energies)
    sharded = None
    if not args.skip_devices:
        sharded = sharded_in_subprocess(args)
        sw, sc = sharded["wall"], sharded["cpu"]
        rows.insert(1, f"| crit, the {NUM_PAIRS} bands split over 2 host devices (shard_map, "
                       f"16 per device; own process) | {sw:.2f} | {sc:.2f} | "
                       f"{1e3 * sc / NUM_PAIRS:.1f} | {mw / sw:.1f}× faster than 1 device; "
                       f"loop / this: **{lw / sw:.1f}× / {lc / sc:.1f}×** |")
    agreement = None
    if args.skip_torch:
        rows.append("| PyTorch per-pair band loop | skipped (--skip_torch) | | | |")
    else:
        try:
            import torch  # noqa: F401
        except ImportError:
            rows.append("| PyTorch per-pair band loop | skipped: torch not installed | | | |")
        else:
            chosen = list(np.linspace(0, NUM_PAIRS - 1, args.torch_pairs).round().astype(int))
            (tw, tc), finals = torch_bands(problem, args.width, starts, ends, steps, chosen,
                                           args.torch_threads)
            scale = NUM_PAIRS / len(chosen)
            rows.append(f"| PyTorch per-pair band loop ({len(chosen)} pairs timed, extrapolated "
                        f"to {NUM_PAIRS}) | {tw * scale:.1f} | {tc * scale:.1f} | "
                        f"{1e3 * tc / len(chosen):.1f} | **{tw * scale / mw:.1f}× / "
                        f"{tc * scale / mc:.1f}×** |")
            crit_e = np.asarray(bands.energies)[chosen]
            agreement = (np.abs(finals[0] - crit_e[0]).max(), np.abs(finals - crit_e).max(),
                         chosen)
    has_torch = agreement is not None
    checks = {n: short_horizon_check(problem, args.width, energy, starts, ends, n,
                                     agreement[2] if has_torch else [], args.torch_threads,
                                     has_torch)
              for n in (int(v) for v in args.check_steps.split(","))}
    print()
    print("| method | wall (s) | CPU (s) | CPU per pair (ms) | vmapped crit faster by "
          "(wall / CPU) |")
    print("|---|---|---|---|---|")
    print("\n".join(rows))
    print()
    print(f"compile: vmapped program {t['compile_many']:.1f} s, one pair {t['compile_one']:.1f} s"
          + (f", 2 devices {sharded['compile']:.1f} s" if sharded else "")
          + " (not in the times above)")
    for n, check in checks.items():
        print(f"agreement over {n} steps (same lines, same steps, climbing from step "
              f"{BAND['climb_after']}): crit vmapped vs one at a time, final energies of all "
              f"{NUM_PAIRS} bands: max |ΔL| {check['single']:.1e}"
              + (f"; torch vs crit on pairs {[int(j) for j in agreement[2]]}: "
                 f"{check['torch']:.1e}" if has_torch else ""))
    d_dev = (f"; 2 devices vs 1 device {np.abs(np.asarray(sharded['energies']) - e_many).max():.1e}"
             if sharded else "")
    d_torch = (f"; torch vs crit: pair {agreement[2][0]} {agreement[0]:.1e}, all "
               f"{len(agreement[2])} timed pairs {agreement[1]:.1e}" if has_torch else "")
    print(f"agreement over the timed {steps}-step runs (rounding differences grow once the "
          f"images climb; not a correctness measure): crit vmapped vs one at a time, max |ΔL| "
          f"{np.abs(e_many - single_energies).max():.1e}{d_dev}{d_torch}")
    barrier = e_many.max(axis=1) - np.maximum(e_many[:, 0], e_many[:, -1])
    print(f"bands: path barrier median {np.median(barrier):.3g} (range {barrier.min():.3g} to "
          f"{barrier.max():.3g}); perpendicular force median "
          f"{np.median(np.asarray(bands.perp_force)):.1e}, climbing-image force median "
          f"{np.median(np.asarray(bands.climb_force)):.1e} after {steps} steps")

    (gbw, gbc), (gsw, gsc) = gradient_floor(energy, starts, ends)
    step_loop, step_many = lw / steps, mw / steps
    n_inner = NUM_IMAGES - 2
    print(f"floor, per band step (inside a fori_loop, no dispatch): value_and_grad of "
          f"{NUM_PAIRS} × {n_inner} images in one vmap {1e6 * gbw:.0f} µs wall "
          f"({1e6 * gbc:.0f} µs CPU); of {n_inner} images {1e6 * gsw:.1f} µs wall "
          f"({1e6 * gsc:.1f} µs CPU), × {NUM_PAIRS} = {1e6 * NUM_PAIRS * gsw:.0f} µs. Whole step: "
          f"vmapped {1e6 * step_many:.0f} µs, one pair at a time {1e6 * step_loop / NUM_PAIRS:.1f}"
          f" µs × {NUM_PAIRS} = {1e6 * step_loop:.0f} µs. With everything but the vmapped "
          f"gradients free, the vmapped program could be at most {step_loop / gbw:.1f}× faster "
          f"than the loop (wall)")
    print(f"floor on 2 cores: the 13-image gradients alone are "
          f"{100 * NUM_PAIRS * gsw / lw * steps:.0f}% of a whole step of the one-pair loop, and "
          f"in one vmap they cost {gbw / (NUM_PAIRS * gsw):.2f} as much per image as 13 at a "
          f"time, so even split perfectly over 2 cores with the rest of the step free the ratio "
          f"is at most {2 * step_loop / (NUM_PAIRS * gsw):.1f}×")
    ratio = max(lw / mw, lw / sharded["wall"] if sharded else 0.0)
    print(f"targets: ≥ 5× over the one-pair-at-a-time loop at {NUM_PAIRS} pairs on 2 CPU cores: "
          f"{lw / mw:.1f}× wall one device"
          + (f", {lw / sharded['wall']:.1f}× wall 2 devices" if sharded else "")
          + f" — {'met' if ratio >= 5 else 'not met'}")


if __name__ == "__main__":
    main()
