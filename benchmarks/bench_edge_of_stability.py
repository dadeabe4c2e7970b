"""Curvature tracking during training, many learning rates at once (issue 16).

Run from the repository root::

    python -m benchmarks.bench_edge_of_stability                    # ~1.5 min on 2 idle cores
    python -m benchmarks.bench_edge_of_stability --steps 200 --torch_configs 4   # quick

Workload: MLP 1-16-16-1 tanh on sinc (256 points, P = 321, MSE, float64), full-batch gradient
descent at 8 learning rates × 4 inits, λ_max and λ_min of the full-data Hessian tracked every 10
steps to relative residual 1e-8 (``crit.tracking``). Compared, after compilation:

1. crit, one vmapped program: ``jit(track_sweep)`` over all 32 configurations
   (``make_sweep(..., "vmap")``, the app's ``--sweep=vmap``);
2. crit, one configuration at a time: ``jit(track_training)`` (compiled once) called 32 times
   (``make_sweep(..., "loop")``, the app's ``--sweep=loop``, its default on CPU);
3. a per-configuration PyTorch loop, as the public edge-of-stability code is written: full-batch
   GD in torch (float64), and every 10 steps ``scipy.sparse.linalg.eigsh`` (ARPACK's implicitly
   restarted Lanczos) on a torch Hessian-vector product (double backward through one retained
   gradient graph per track), once for the largest (``which='LA'``) and once for the smallest
   (the largest of λ_max·I − H) eigenvalue. ARPACK's ``tol`` is relative to the eigenvalue it
   computes, so both ends come to about the same absolute accuracy 1e-8·λ_max as crit's. Timed on
   ``--torch_configs`` configurations and extrapolated linearly to 32 (the loop is serial).
   The torch runs start from crit's initial parameters, so their λ_max series can be checked
   against crit's over the first tracks (printed).

The floor (what vmap can give at all on this machine): the bare workload of the same 32
configurations, the GD steps and, every 10 steps, as many Hessian-vector products as crit's
tracks spent on average (chained, no Lanczos, no convergence checks, no control flow), one
vmapped program against one configuration at a time. If that ratio is near 1 the workload is
bound by each configuration's own arithmetic and vmap has no per-call overhead to save.

Targets (issue 16): ≥ 4× over one-at-a-time crit, ≥ 10× over the PyTorch loop on 2 CPU
cores, ≤ 20 HVPs per track after warm-up (tracks after the first, non-diverged runs).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import numpy as np

LEARNING_RATES = (0.02, 0.03, 0.05, 0.07, 0.1, 0.14, 0.2, 0.25)
NUM_INITS = 4
TRACK_EVERY = 10
TOL = 1e-8


def crit_setup(steps: int):
    import jax
    import jax.numpy as jnp
    from jax.flatten_util import ravel_pytree

    import crit  # noqa: F401  (float64)
    from crit.problems import mlp_problem
    from crit.tracking import TrackingConfig

    problem = mlp_problem("sinc", widths=(16, 16))
    root = jax.random.PRNGKey(0)
    params = [problem.init_fn(jax.random.fold_in(root, i)) for i in range(NUM_INITS)]
    _, unravel = ravel_pytree(params[0])
    thetas = jnp.stack([ravel_pytree(p)[0] for p in params])
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(1), i) for i in range(NUM_INITS)])
    config = TrackingConfig(optimizer="gd", num_steps=steps, track_every=TRACK_EVERY,
                            lanczos_tol=TOL)
    loss = lambda t: problem.loss_fn(unravel(t))  # noqa: E731
    return problem, loss, thetas, keys, config, params


def timed(fn, repeats: int = 1) -> tuple[float, float]:
    """(wall, CPU) seconds of ``fn()``, best of ``repeats``. CPU time (all threads of this
    process) is the steadier measure on a machine shared with other jobs."""
    best = (float("inf"), float("inf"))
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        best = min(best, (time.perf_counter() - wall, time.process_time() - cpu))
    return best


def run_crit(steps: int, repeats: int):
    import jax
    import jax.numpy as jnp

    from crit.tracking import make_sweep

    problem, loss, thetas, keys, config, params = crit_setup(steps)
    lrs = jnp.asarray(LEARNING_RATES)
    # the two code paths of the app's --sweep=vmap and --sweep=loop, each compiled once
    sweep, loop = make_sweep(loss, config, "vmap"), make_sweep(loss, config, "loop")
    start = time.perf_counter()
    out = jax.block_until_ready(sweep(thetas, lrs, keys))
    compile_sweep = time.perf_counter() - start
    t_sweep = timed(lambda: jax.block_until_ready(sweep(thetas, lrs, keys)), repeats)

    start = time.perf_counter()
    out_loop = jax.block_until_ready(loop(thetas, lrs, keys))
    first_loop = time.perf_counter() - start
    t_loop = timed(lambda: jax.block_until_ready(loop(thetas, lrs, keys)), repeats)
    # the first loop call compiles track_training once, then runs all 32 configurations
    compile_one = first_loop - t_loop[0]
    # per learning rate: the largest relative difference of the loss and of λ_max over all
    # steps and inits, and whether the HVP counts are the same
    agree = [(float(np.nanmax(np.abs(out_loop.loss[i] - out.loss[i]) / np.abs(out.loss[i]))),
              float(np.nanmax(np.abs(out_loop.lambda_max[i] - out.lambda_max[i])
                              / np.abs(out.lambda_max[i]))),
              bool(np.array_equal(out_loop.hvps[i], out.hvps[i])))
             for i in range(len(LEARNING_RATES))]
    return problem, out, params, dict(sweep=t_sweep, loop=t_loop, compile_sweep=compile_sweep,
                                      compile_one=compile_one, agree=agree)


def run_floor(steps: int, hvps_per_track: int, repeats: int) -> dict:
    """(wall, CPU) of the bare workload (module docstring), vmapped and one at a time: GD
    alone, and GD + ``hvps_per_track`` chained HVPs every ``TRACK_EVERY`` steps."""
    import jax
    import jax.numpy as jnp

    _, loss, thetas, keys, _, _ = crit_setup(steps)
    lrs = jnp.asarray(LEARNING_RATES)
    value_and_grad, grad_fn = jax.value_and_grad(loss), jax.grad(loss)

    def workload(theta, lr, key, n_hvps):
        def gd_step(theta, _):
            loss_value, g = value_and_grad(theta)
            return theta - lr * g, loss_value

        def block(carry, _):
            theta, v = carry
            theta, losses = jax.lax.scan(gd_step, theta, None, length=TRACK_EVERY)
            if n_hvps:
                _, hvp = jax.linearize(grad_fn, theta)

                def power_step(v, _):
                    w = hvp(v)
                    return w / jnp.linalg.norm(w), None

                v, _ = jax.lax.scan(power_step, v, None, length=n_hvps)
            return (theta, v), losses

        v0 = jax.random.normal(key, theta.shape, jnp.float64)
        return jax.lax.scan(block, (theta, v0), None, length=steps // TRACK_EVERY)

    times = {}
    for name, n_hvps in (("gd", 0), ("gd+hvp", hvps_per_track)):
        one = jax.jit(lambda th, lr, k, n=n_hvps: workload(th, lr, k, n))
        sweep = jax.jit(jax.vmap(jax.vmap(one, in_axes=(0, None, 0)), in_axes=(None, 0, None)))
        jax.block_until_ready(sweep(thetas, lrs, keys))
        jax.block_until_ready(one(thetas[0], lrs[0], keys[0]))

        def loop():
            for lr in LEARNING_RATES:
                for j in range(NUM_INITS):
                    jax.block_until_ready(one(thetas[j], lr, keys[j]))

        times[name] = (timed(lambda: jax.block_until_ready(sweep(thetas, lrs, keys)), repeats),
                       timed(loop, repeats))
    return times


def hvp_stats(out) -> dict:
    hvps = np.asarray(out.hvps)[..., 1:]
    live = np.isfinite(np.asarray(out.lambda_max))[..., 1:]
    conv = (np.asarray(out.converged_max) & np.asarray(out.converged_min))[..., 1:]
    first = np.asarray(out.hvps)[..., 0]
    return dict(mean=hvps[live].mean(), median=np.median(hvps[live]), p90=np.percentile(
        hvps[live], 90), max=hvps[live].max(), first=first.mean(), converged=conv[live].mean(),
        tracks=int(live.sum()), diverged=int((np.asarray(out.diverged_step) >= 0).sum()),
        # under vmap every track runs until the batch's slowest member has converged
        batch_max=np.nanmax(np.where(live, hvps, np.nan), axis=(0, 1)).mean())


def torch_loop(problem, params, steps: int, configs: list[tuple[int, int]], threads: int):
    """Per-configuration GD + ARPACK tracking in torch; returns (seconds, λ_max series, HVPs)."""
    import scipy.sparse.linalg as sla
    import torch

    torch.set_num_threads(threads)
    x = torch.tensor(np.asarray(problem.dataset.x_train), dtype=torch.float64)
    y = torch.tensor(np.asarray(problem.dataset.y_train), dtype=torch.float64)

    def to_torch(p):
        layers = [p["params"][k] for k in sorted(p["params"], key=lambda s: int(s.split("_")[1]))]
        return [torch.tensor(np.asarray(layer[name]), dtype=torch.float64)
                for layer in layers for name in ("kernel", "bias")]

    def loss_fn(ws):
        h = x
        for i in range(0, len(ws) - 2, 2):
            h = torch.tanh(h @ ws[i] + ws[i + 1])
        return torch.mean((h @ ws[-2] + ws[-1] - y) ** 2)

    series, hvp_counts = [], []
    start, cpu = time.perf_counter(), time.process_time()
    for i, j in configs:
        lr = LEARNING_RATES[i]
        ws = [w.clone().requires_grad_(True) for w in to_torch(params[j])]
        lam = []
        for step in range(steps + 1):
            if step % TRACK_EVERY == 0:
                grads = torch.autograd.grad(loss_fn(ws), ws, create_graph=True)
                flat_g = torch.cat([g.reshape(-1) for g in grads])
                n = flat_g.numel()
                count = [0]

                def matvec(v, flat_g=flat_g, count=count):
                    count[0] += 1
                    vt = torch.from_numpy(np.ascontiguousarray(v, dtype=np.float64).reshape(-1))
                    hv = torch.autograd.grad(flat_g, ws, vt, retain_graph=True)
                    return torch.cat([h.reshape(-1) for h in hv]).numpy()

                op = sla.LinearOperator((n, n), matvec=matvec, dtype=np.float64)
                top = sla.eigsh(op, k=1, which="LA", tol=TOL, return_eigenvectors=False)[0]
                # λ_min as λ_max − the top eigenvalue of λ_max·I − H: ARPACK's relative tol is
                # then relative to ~λ_max, the same absolute accuracy as crit's criterion
                shifted = sla.LinearOperator((n, n), dtype=np.float64,
                                             matvec=lambda v, top=top: top * v - matvec(v))
                bottom = top - sla.eigsh(shifted, k=1, which="LA", tol=TOL,
                                         return_eigenvectors=False)[0]
                lam.append((top, bottom))
                hvp_counts.append(count[0])
            if step == steps:
                break
            loss = loss_fn(ws)
            if step == 0:
                limit = 1e4 * loss.item()
            if not torch.isfinite(loss) or loss.item() > limit:
                break  # diverged: crit stops such a run too (divergence_factor 1e4)
            grads = torch.autograd.grad(loss, ws)
            with torch.no_grad():
                for w, g in zip(ws, grads):
                    w -= lr * g
        series.append(np.asarray(lam))
    return (time.perf_counter() - start, time.process_time() - cpu), series, hvp_counts


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=500, help="GD steps per configuration.")
    parser.add_argument("--repeats", type=int, default=3,
                        help="Timed repeats of each crit variant (best kept).")
    parser.add_argument("--torch_configs", type=int, default=4,
                        help="PyTorch configurations timed (extrapolated to 32).")
    parser.add_argument("--torch_threads", type=int, default=2)
    parser.add_argument("--skip_torch", action="store_true")
    parser.add_argument("--skip_floor", action="store_true",
                        help="Skip the bare-workload floor (vmapped vs one at a time).")
    args = parser.parse_args()

    import jax

    n_cfg = len(LEARNING_RATES) * NUM_INITS
    now = datetime.datetime.now(datetime.timezone.utc)
    print(f"# bench_edge_of_stability, {now:%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.machine()}, os.cpu_count()={os.cpu_count()}, "
          f"{platform.platform()}, load average {os.getloadavg()[0]:.1f} at the start, jax "
          f"{jax.__version__} on {jax.default_backend()}")
    print(f"workload: MLP 1-16-16-1 tanh on sinc (n = 256, P = 321, float64), full-batch GD, "
          f"{len(LEARNING_RATES)} learning rates {list(LEARNING_RATES)} × {NUM_INITS} inits = "
          f"{n_cfg} configurations, {args.steps} steps, λ_max and λ_min tracked every "
          f"{TRACK_EVERY} steps ({args.steps // TRACK_EVERY + 1} tracks) to relative residual "
          f"{TOL:g}")
    problem, out, params, t = run_crit(args.steps, args.repeats)
    stats = hvp_stats(out)
    print()
    print("| method | wall (s) | CPU (s) | CPU per configuration (s) | vmapped crit faster by "
          "(wall / CPU) |")
    print("|---|---|---|---|---|")
    sw, sc = t["sweep"]
    lw, lc = t["loop"]
    print(f"| crit, one vmapped program ({n_cfg} configs) | {sw:.2f} | {sc:.2f} | "
          f"{sc / n_cfg:.3f} | 1 |")
    print(f"| crit, one configuration at a time | {lw:.2f} | {lc:.2f} | {lc / n_cfg:.3f} | "
          f"**{lw / sw:.2f}× / {lc / sc:.2f}×** |")
    torch_line = "| PyTorch loop + ARPACK eigsh | skipped: torch not installed | | | |"
    agreement = None
    if args.skip_torch:
        torch_line = "| PyTorch loop + ARPACK eigsh | skipped (--skip_torch) | | | |"
    else:
        try:
            import torch  # noqa: F401
        except ImportError:
            pass
        else:
            configs = [(i, j) for i in range(len(LEARNING_RATES)) for j in range(NUM_INITS)]
            # spread the timed subset over the learning rates (cost depends on η)
            pick = np.linspace(0, n_cfg - 1, args.torch_configs).round().astype(int)
            chosen = [configs[k] for k in pick]
            (tw, tc), series, torch_hvps = torch_loop(problem, params, args.steps, chosen,
                                                      args.torch_threads)
            scale = n_cfg / len(chosen)
            torch_line = (f"| PyTorch loop + ARPACK eigsh ({len(chosen)} configs timed, "
                          f"extrapolated to {n_cfg}) | {tw * scale:.1f} | {tc * scale:.1f} | "
                          f"{tc / len(chosen):.3f} | **{tw * scale / sw:.1f}× / "
                          f"{tc * scale / sc:.1f}×** |")
            lam = np.asarray(out.lambda_max)
            diffs = []
            for (i, j), s in zip(chosen, series):
                k = min(len(s), 6)
                diffs.append(np.max(np.abs(s[:k, 0] - lam[i, j, :k]) / np.abs(lam[i, j, :k])))
            agreement = (max(diffs), float(np.mean(torch_hvps)))
    print(torch_line)
    floor_hvps = int(round(stats["mean"]))
    floor = None if args.skip_floor else run_floor(args.steps, floor_hvps, args.repeats)
    if floor is not None:
        print()
        print(f"Floor: the bare workload, no Lanczos ({n_cfg} configurations, {args.steps} GD "
              "steps; with HVPs: "
              f"{floor_hvps} chained HVPs every {TRACK_EVERY} steps, crit's mean per track)")
        print()
        print("| bare workload | vmapped wall (s) | vmapped CPU (s) | one at a time wall (s) | "
              "one at a time CPU (s) | vmapped faster by (wall / CPU) |")
        print("|---|---|---|---|---|---|")
        for name, label in (("gd", "GD steps only"), ("gd+hvp", f"GD + {floor_hvps} HVPs per "
                                                                "track")):
            (vw, vc), (ow, oc) = floor[name]
            print(f"| {label} | {vw:.2f} | {vc:.2f} | {ow:.2f} | {oc:.2f} | "
                  f"**{ow / vw:.2f}× / {oc / vc:.2f}×** |")
    print()
    print(f"compile: vmapped program {t['compile_sweep']:.1f} s, single configuration "
          f"{t['compile_one']:.1f} s (first loop call minus a timed one; not in the times "
          "above)")
    print("one at a time vs vmapped, per η: max relative difference of the loss / of λ_max "
          "over all steps and inits, HVP counts (the two programs round differently from the "
          "first step; at the edge of stability GD amplifies that):")
    print("  " + "; ".join(f"η = {lr:g}: {dl:.1e} / {dm:.1e}, "
                           f"{'same' if same else 'different'}"
                           for lr, (dl, dm, same) in zip(LEARNING_RATES, t["agree"])))
    print(f"crit HVPs per track after warm-up (tracks 2..K of {n_cfg - stats['diverged']} "
          f"non-diverged runs, {stats['tracks']} tracks): mean {stats['mean']:.1f}, median "
          f"{stats['median']:.0f}, 90th percentile {stats['p90']:.0f}, max {stats['max']}; first "
          f"(cold) track {stats['first']:.1f}; both ends converged to {TOL:g} in "
          f"{100 * stats['converged']:.1f}% of tracks; {stats['diverged']} runs diverged")
    print(f"under vmap each track runs until the slowest of the {n_cfg} configurations has "
          f"converged: {stats['batch_max']:.1f} Lanczos steps per track on average (the batch's "
          f"max), {stats['batch_max'] / stats['mean']:.2f}× the mean")
    if agreement is not None:
        print(f"torch vs crit λ_max over the first 6 tracks: max relative difference "
              f"{agreement[0]:.1e}; ARPACK HVPs per track (both ends, cold) {agreement[1]:.1f}")
    print(f"targets: ≥ 4× over one-at-a-time crit ({lw / sw:.1f}× wall, {lc / sc:.1f}× CPU), "
          "≥ 10× over "
          "the PyTorch loop (see table), ≤ 20 HVPs per track after warm-up "
          f"({stats['mean']:.1f} mean)")
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
