"""Wall time of the minimum-ratio workload: crit (jit + vmap) vs PyTorch (torch.func, per-seed loop).

Run from the repository root::

    python -m benchmarks.bench_min_ratio [--num_inits 100,1000] [--loop_inits 10] [--check]

Workload (course homework 1-2-3, identical in every implementation), per initialization:
MLP 1-16-16-1 tanh (P = 321) on y = np.sinc(5x) at 256 points on an even grid of [1e-4, 1],
float64 throughout, MSE loss (mean, no 1/2);
1. 2000 full-batch Adam steps, lr 1e-2 (beta1 0.9, beta2 0.999, eps 1e-8, as optax.adam),
2. 1000 Adam steps (lr 1e-3) on 1/2 ||grad L||^2 (its gradient is H g); the iterate with the
   smallest ||g|| is kept (as crit's ``gradient_norm_descent`` does),
3. the exact full 321 x 321 Hessian of L at that point, symmetrized, all eigenvalues (eigvalsh).

Implementations:
- crit: ``crit.protocol`` (``make_chunk_fn``: groups of ``vmap_width`` inits vmapped) over
  balanced chunks, on every local device (``XLA_FLAGS=--xla_force_host_platform_device_count=2``
  splits a 2-core CPU into two devices);
  the compile time (measured ahead of time) is reported apart from steady state. crit
  also certifies each point and classifies its spectrum (cheap next to the rest).
- torch.func: the N models stacked (``stack_module_state``), ``vmap(grad(functional_call))``,
  Adam written by hand on the stacked tensors, ``vmap(hessian(...))`` in chunks, ``eigvalsh``.
- loop: one seed at a time as homework solutions write it (``nn.Sequential``,
  ``torch.optim.Adam``, ``create_graph=True`` for the gradient-norm phase,
  ``torch.autograd.functional.hessian`` over the flat parameters); ``--loop_inits`` seeds are
  timed and the time is extrapolated linearly to N.
Torch runs use ``torch.set_num_threads(2)`` (``--torch_threads``; on a busy machine its
OpenMP threads wait on each other and torch slows down many times over, so time on an idle
machine). Torch timings start from PyTorch's default init (step counts are fixed, so the time
does not depend on the starting point); ``--check`` feeds
crit's init of seed 0 (and 0..3 for torch.func) to both torch versions and compares the loss
curve, the final gradient norm and the eigenvalues with crit's.

``--newton`` (on by default at N = 100) also times crit's Newton finder (``ProtocolConfig()``
defaults) against the gradient-norm finder, with the share of runs reaching ||g|| <= 1e-8.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import sys
import time

import jax
import numpy as np

import crit  # noqa: F401  (float64)
from crit.problems import mlp_problem
from crit.protocol import (ProtocolConfig, auto_chunk_size, balanced_chunk_size, init_key,
                           make_chunk_fn, run_chunk)

TRAIN_STEPS, TRAIN_LR = 2000, 1e-2
FINDER_STEPS, FINDER_LR = 1000, 1e-3
BETA1, BETA2, EPS = 0.9, 0.999, 1e-8  # optax.adam defaults (eps_root = 0)
WIDTHS = (16, 16)
GRAD_TOL = 1e-8

GRADNORM_CFG = ProtocolConfig(train_steps=TRAIN_STEPS, learning_rate=TRAIN_LR, finder="gradnorm",
                              finder_steps=FINDER_STEPS, finder_lr=FINDER_LR)
NEWTON_CFG = ProtocolConfig()  # finder="newton", 30 iterations, 2000 Adam steps


def log(msg: str) -> None:
    print(msg, flush=True)


# --------------------------------------------------------------------------- crit

def run_crit(problem, cfg: ProtocolConfig, n: int) -> dict:
    """All ``n`` inits through crit in chunks; wall time with and without compilation.

    The chunk function is compiled ahead of time (``lower(...).compile()``, exactly what its
    first call would do) so the compile time is measured on its own rather than estimated.
    """
    import jax.numpy as jnp

    from crit.parallel import local_mesh

    mesh = local_mesh()  # several devices with XLA_FLAGS=--xla_force_host_platform_device_count
    chunk = balanced_chunk_size(n, auto_chunk_size(problem, n) * mesh.size,
                                min(cfg.vmap_width, n) * mesh.size)
    ids = np.arange(n)
    t_start = time.perf_counter()
    chunk_fn = make_chunk_fn(problem, cfg, mesh)
    compiled = chunk_fn.lower(jax.ShapeDtypeStruct((chunk,), jnp.int32)).compile()
    compile_s = time.perf_counter() - t_start
    parts = []
    for lo in range(0, n, chunk):
        parts.append(run_chunk(compiled, ids[lo:lo + chunk], chunk))
    total = time.perf_counter() - t_start
    records = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    return dict(total=total, steady=total - compile_s, compile=compile_s, chunk=chunk,
                n_chunks=len(parts), padded=len(parts) * chunk, records=records)


def crit_init_params(problem, seeds) -> list[dict]:
    """crit's initial parameters for ``seeds`` (the exact ones its protocol starts from)."""
    return [jax.device_get(problem.init_fn(init_key(GRADNORM_CFG.seed, int(s)))) for s in seeds]


# --------------------------------------------------------------------------- torch

def torch_available():
    try:
        import torch  # noqa: F401
    except ImportError:
        return None
    return torch


def torch_setup(threads: int = 2):
    import torch
    torch.set_num_threads(threads)
    torch.set_default_dtype(torch.float64)
    return torch


def torch_data(problem):
    import torch
    x = torch.tensor(np.asarray(problem.dataset.x_train, dtype=np.float64))
    y = torch.tensor(np.asarray(problem.dataset.y_train, dtype=np.float64))
    return x, y


def make_model():
    from torch import nn
    dims = [1, *WIDTHS, 1]
    layers = []
    for i, (a, b) in enumerate(zip(dims[:-1], dims[1:])):
        layers.append(nn.Linear(a, b, dtype=__import__("torch").float64))
        if i < len(dims) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


def load_crit_params(model, crit_params: dict) -> None:
    """Copy a crit (Flax) parameter dict into the nn.Sequential: weight = kernel^T."""
    import torch
    dense = crit_params["params"]
    linears = [m for m in model if isinstance(m, torch.nn.Linear)]
    with torch.no_grad():
        for i, lin in enumerate(linears):
            lin.weight.copy_(torch.tensor(np.asarray(dense[f"Dense_{i}"]["kernel"]).T))
            lin.bias.copy_(torch.tensor(np.asarray(dense[f"Dense_{i}"]["bias"])))


def flat_spec(model):
    """Names and shapes of the parameters, in the order of ``parameters_to_vector``."""
    return [(name, tuple(p.shape)) for name, p in model.named_parameters()]


def unflatten(theta, spec) -> dict:
    out, off = {}, 0
    for name, shape in spec:
        size = int(np.prod(shape))
        out[name] = theta[off:off + size].view(shape)
        off += size
    return out


def loop_one(model, x, y, record_every: int = 0, train_steps: int = TRAIN_STEPS,
             finder_steps: int = FINDER_STEPS) -> dict:
    """One seed, the homework way: optim.Adam, create_graph, autograd.functional.hessian."""
    import torch
    from torch.func import functional_call
    params = list(model.parameters())
    curve = []
    opt = torch.optim.Adam(params, lr=TRAIN_LR, betas=(BETA1, BETA2), eps=EPS)
    for step in range(train_steps):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        loss.backward()
        if record_every and step % record_every == 0:
            curve.append(loss.item())
        opt.step()
    with torch.no_grad():
        train_loss = torch.mean((model(x) - y) ** 2).item()
    curve.append(train_loss)

    opt = torch.optim.Adam(params, lr=FINDER_LR, betas=(BETA1, BETA2), eps=EPS)
    best, best_norm = torch.nn.utils.parameters_to_vector(params).detach().clone(), np.inf
    finder_curve = []
    for _ in range(finder_steps):
        opt.zero_grad()
        loss = torch.mean((model(x) - y) ** 2)
        grads = torch.autograd.grad(loss, params, create_graph=True)
        loss_g = 0.5 * sum((g ** 2).sum() for g in grads)
        gnorm = float(torch.sqrt(2 * loss_g.detach()))
        finder_curve.append(gnorm)
        if gnorm < best_norm:
            best_norm = gnorm
            best = torch.nn.utils.parameters_to_vector(params).detach().clone()
        loss_g.backward()
        opt.step()
    theta = torch.nn.utils.parameters_to_vector(params).detach()
    loss = torch.mean((model(x) - y) ** 2)
    gnorm = float(torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss, params))))
    if gnorm < best_norm:
        best, best_norm = theta.clone(), gnorm

    spec = flat_spec(model)

    def flat_loss(t):
        out = functional_call(model, unflatten(t, spec), (x,))
        return torch.mean((out - y) ** 2)

    hess = torch.autograd.functional.hessian(flat_loss, best)
    eig = torch.linalg.eigvalsh(0.5 * (hess + hess.T))
    return dict(curve=np.asarray(curve), finder_curve=np.asarray(finder_curve),
                train_loss=train_loss, theta=best, grad_norm=best_norm,
                loss=float(flat_loss(best)), eigenvalues=eig.numpy())


def run_loop(x, y, seeds, crit_params=None, record_every: int = 0,
             steps=(TRAIN_STEPS, FINDER_STEPS)) -> tuple[float, list]:
    import torch
    out = []
    t0 = time.perf_counter()
    for k, s in enumerate(seeds):
        torch.manual_seed(int(s))
        model = make_model()
        if crit_params is not None:
            load_crit_params(model, crit_params[k])
        out.append(loop_one(model, x, y, record_every, *steps))
    return time.perf_counter() - t0, out


def run_func(x, y, n: int, hess_chunk: int, crit_params=None, record_every: int = 0,
             steps=(TRAIN_STEPS, FINDER_STEPS)) -> dict:
    """All ``n`` seeds at once with torch.func; Adam by hand on the stacked tensors."""
    import torch
    from torch.func import (functional_call, grad, grad_and_value, hessian,
                            stack_module_state, vmap)
    t0 = time.perf_counter()
    models = []
    for s in range(n):
        torch.manual_seed(s)
        m = make_model()
        if crit_params is not None:
            load_crit_params(m, crit_params[s])
        models.append(m)
    params, _ = stack_module_state(models)
    params = {k: v.detach().clone() for k, v in params.items()}
    base = copy.deepcopy(models[0]).to("meta")
    names = list(params)

    def loss_one(p):
        return torch.mean((functional_call(base, p, (x,)) - y) ** 2)

    def gradnorm_one(p):
        g = grad(loss_one)(p)
        return 0.5 * sum((v ** 2).sum() for v in g.values())

    train_step = vmap(grad_and_value(loss_one))
    finder_step = vmap(grad_and_value(gradnorm_one))

    def adam(step_fn, p, steps, lr, track_best):
        m = {k: torch.zeros_like(v) for k, v in p.items()}
        v2 = {k: torch.zeros_like(v) for k, v in p.items()}
        curve, norms = [], []
        best = {k: v.clone() for k, v in p.items()}
        best_norm = torch.full((n,), float("inf"))
        for t in range(1, steps + 1):
            g, value = step_fn(p)
            if record_every and (t - 1) % record_every == 0:
                curve.append(value.detach().clone())
            if track_best:  # value = 1/2 ||g||^2 at p, before the step
                gnorm = torch.sqrt(2 * value)
                norms.append(gnorm.detach().clone())
                better = gnorm < best_norm
                best_norm = torch.where(better, gnorm, best_norm)
                for k in names:
                    mask = better.view(-1, *[1] * (p[k].dim() - 1))
                    best[k] = torch.where(mask, p[k], best[k])
            c1, c2 = 1 - BETA1 ** t, 1 - BETA2 ** t
            with torch.no_grad():
                for k in names:
                    m[k].mul_(BETA1).add_(g[k], alpha=1 - BETA1)
                    v2[k].mul_(BETA2).addcmul_(g[k], g[k], value=1 - BETA2)
                    denom = (v2[k] / c2).sqrt_().add_(EPS)
                    p[k] = p[k] - lr * (m[k] / c1) / denom
        return p, best, best_norm, curve, norms

    p, _, _, curve, _ = adam(train_step, params, steps[0], TRAIN_LR, False)
    g, value = train_step(p)
    curve.append(value.detach().clone())
    train_loss = value.detach().clone()
    p, best, best_norm, _, norms = adam(finder_step, p, steps[1], FINDER_LR, True)
    g, value = finder_step(p)
    last = torch.sqrt(2 * value)
    better = last < best_norm
    best_norm = torch.where(better, last, best_norm)
    for k in names:
        best[k] = torch.where(better.view(-1, *[1] * (p[k].dim() - 1)), p[k], best[k])

    theta = torch.cat([best[k].reshape(n, -1) for k in names], dim=1)
    spec = [(k, tuple(best[k].shape[1:])) for k in names]

    def flat_loss(t):
        return loss_one(unflatten(t, spec))

    hess_fn = vmap(hessian(flat_loss))
    eigs, losses = [], []
    for lo in range(0, n, hess_chunk):
        h = hess_fn(theta[lo:lo + hess_chunk])
        eigs.append(torch.linalg.eigvalsh(0.5 * (h + h.transpose(1, 2))))
        losses.append(vmap(flat_loss)(theta[lo:lo + hess_chunk]))
    elapsed = time.perf_counter() - t0
    return dict(time=elapsed, eigenvalues=torch.cat(eigs).numpy(), loss=torch.cat(losses).numpy(),
                grad_norm=best_norm.numpy(), theta=theta, train_loss=train_loss.numpy(),
                curve=torch.stack(curve, 1).numpy() if curve else None,
                finder_curve=torch.stack(norms, 1).numpy() if norms else None)


# --------------------------------------------------------------------------- reports

def machine_line(torch) -> str:
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as fh:
            names = [l.split(":", 1)[1].strip() for l in fh if l.startswith("model name")]
        if names:
            cpu = f"{cpu} {names[0]}".strip()
    except OSError:
        pass
    if torch is not None:
        tv = torch.__version__
    else:
        try:
            from importlib.metadata import version
            tv = f"{version('torch')} (not used)"
        except Exception:  # noqa: BLE001
            tv = "not installed"
    threads = f" ({torch.get_num_threads()} threads)" if torch is not None else ""
    load = "load avg %.1f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else ""
    return (f"{datetime.datetime.now().isoformat(timespec='seconds')} | {platform.machine()} "
            f"{cpu or '?'} | os.cpu_count()={os.cpu_count()} | {load} | jax {jax.__version__} | "
            f"torch {tv}{threads} | python {platform.python_version()}")


def fmt_s(s) -> str:
    return "—" if s is None else f"{s:.1f} s"


def fmt_r(a, b) -> str:
    return "—" if a is None or b is None else f"{a / b:.2f}×"


CHECK_STEPS = (300, 100)  # short horizon: rounding differences have not been amplified yet


def first_divergence(a, b, tol: float = 1e-6):
    """Index of the first entry where a and b differ by more than ``tol`` relative, or None."""
    bad = np.nonzero(np.abs(a - b) > tol * np.abs(b))[0]
    return int(bad[0]) if bad.size else None


def theta_to_crit(theta, model) -> dict:
    """The inverse of :func:`load_crit_params`: a flat torch vector as a crit (Flax) pytree."""
    p = {k: v.detach().numpy() for k, v in unflatten(theta, flat_spec(model)).items()}
    idx = sorted({int(k.split(".")[0]) for k in p})
    return {"params": {f"Dense_{i}": {"kernel": p[f"{j}.weight"].T, "bias": p[f"{j}.bias"]}
                       for i, j in enumerate(idx)}}


def check(problem, torch) -> bool:
    """Same starting params (crit's init) in crit, the torch loop and torch.func; compare.

    A. the whole pipeline over a short horizon (CHECK_STEPS), where both sides must agree to
       1e-6 relative: training-loss curve, grad-norm history, final ||g||, eigenvalues;
    B. the Hessian spectrum at one common point (the torch loop's final full-length point):
       crit's ``dense_hessian`` vs ``autograd.functional.hessian``;
    C. full length (2000 + 1000 steps), seed 0: where the curves first part by > 1e-6, next to
       the same for a plain jitted optax loop in JAX (rounding differences alone).
    """
    from crit.hessian import dense_hessian
    from crit.train import make_optimizer
    import jax.numpy as jnp
    import optax

    tol = 1e-6
    ok = True
    x, y = torch_data(problem)
    seeds = np.arange(4)
    crit_params = crit_init_params(problem, seeds)
    every = GRADNORM_CFG.log_every

    def rel(a, b):
        return float(np.max(np.abs(np.asarray(a) - b) / np.abs(b)))

    def eig_err(a, b):
        return float(np.max(np.abs(np.sort(a) - np.sort(b))) / np.max(np.abs(b)))

    def report(name, err):
        nonlocal ok
        ok &= err <= tol
        log(f"  {name}: {err:.1e} ({'OK' if err <= tol else 'FAIL'})")

    short = GRADNORM_CFG._replace(train_steps=CHECK_STEPS[0], finder_steps=CHECK_STEPS[1])
    log(f"== check A: crit's init for seeds 0-3, {CHECK_STEPS[0]} Adam + {CHECK_STEPS[1]} "
        f"grad-norm steps, crit vs torch (max relative error, tolerance {tol:g}) ==")
    rec = run_chunk(make_chunk_fn(problem, short), seeds, len(seeds))
    _, loop = run_loop(x, y, seeds[:1], crit_params[:1], every, CHECK_STEPS)
    func = run_func(x, y, len(seeds), len(seeds), crit_params, every, CHECK_STEPS)
    report("seed 0 training-loss curve, loop vs crit", rel(loop[0]["curve"], rec["curve_loss"][0]))
    report("seeds 0-3 training-loss curves, torch.func vs crit", rel(func["curve"],
                                                                    rec["curve_loss"]))
    report("seed 0 grad-norm-phase ||g|| history, loop vs crit",
           rel(loop[0]["finder_curve"], rec["finder_history"][0]))
    report("seeds 0-3 grad-norm-phase ||g|| history, torch.func vs crit",
           rel(func["finder_curve"], rec["finder_history"]))
    report("seeds 0-3 final ||g||, torch.func vs crit", rel(func["grad_norm"], rec["grad_norm"]))
    report("seed 0 eigenvalues, loop vs crit (max |dλ| / max|λ|)",
           eig_err(loop[0]["eigenvalues"], rec["eigenvalues"][0]))
    report("seeds 0-3 eigenvalues, torch.func vs crit (max |dλ| / max|λ|)",
           max(eig_err(func["eigenvalues"][i], rec["eigenvalues"][i]) for i in seeds))

    log("== check B: one common point (the torch loop's final point after 2000 + 1000 steps, "
        "seed 0, crit's init) ==")
    rec = run_chunk(make_chunk_fn(problem, GRADNORM_CFG), seeds[:1], 1)
    _, loop = run_loop(x, y, seeds[:1], crit_params[:1], every)
    model = make_model()
    common = theta_to_crit(loop[0]["theta"], model)
    crit_eigs = np.asarray(jnp.linalg.eigvalsh(dense_hessian(problem.loss_fn, common)))
    report("eigenvalues at the loop's final point, crit dense_hessian vs torch (max |dλ| / "
           "max|λ|)", eig_err(loop[0]["eigenvalues"], crit_eigs))

    log("== check C (informational): full length, seed 0, crit's init ==")
    opt = make_optimizer("adam", TRAIN_LR)
    value_and_grad = jax.jit(jax.value_and_grad(problem.loss_fn))
    update = jax.jit(opt.update)
    params, state, ref = crit_params[0], opt.init(crit_params[0]), []
    for _ in range(TRAIN_STEPS):
        loss, g = value_and_grad(params)
        ref.append(float(loss))
        updates, state = update(g, state, params)
        params = optax.apply_updates(params, updates)
    ref.append(float(value_and_grad(params)[0]))
    c_curve, l_curve = rec["curve_loss"][0], loop[0]["curve"]
    j_curve = np.asarray(ref)[list(range(0, TRAIN_STEPS, every)) + [TRAIN_STEPS]]
    for name, a in (("torch loop", l_curve), ("plain JAX optax loop", j_curve)):
        k = first_divergence(a, c_curve, tol)
        where = "never" if k is None else f"at step {k * every}"
        log(f"  {name} vs crit: training-loss curves first differ by > {tol:g} {where}")
    for name, r in (("crit", dict(train_loss=rec["train_loss"][0], grad_norm=rec["grad_norm"][0],
                                  eigenvalues=rec["eigenvalues"][0])),
                    ("torch loop", loop[0])):
        e = np.sort(r["eigenvalues"])
        log(f"  {name:10s}: loss after training {r['train_loss']:.4e}, final ||g|| "
            f"{r['grad_norm']:.2e}, λ_min {e[0]:.3e}, λ_max {e[-1]:.3e}")
    log(f"  check {'PASSED' if ok else 'FAILED'} (A and B; C is informational: past the step "
        "where the curves part, the runs are different runs)")
    return ok


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--num_inits", default="100,1000",
                    help="comma-separated N values (default 100,1000)")
    ap.add_argument("--loop_inits", type=int, default=10,
                    help="seeds timed in the per-seed torch loop, extrapolated to N (default 10)")
    ap.add_argument("--check", action="store_true",
                    help="only run the crit-vs-torch agreement check")
    ap.add_argument("--newton", choices=("auto", "yes", "no"), default="auto",
                    help="time crit's Newton finder vs gradnorm at N=100 (auto: if 100 in N)")
    ap.add_argument("--skip_torch", action="store_true", help="time crit only")
    ap.add_argument("--torch_hess_chunk", type=int, default=50,
                    help="models per vmap(hessian) call in torch.func (250 at once needed more "
                         "than 24 GiB and was killed)")
    ap.add_argument("--torch_threads", type=int, default=2,
                    help="torch.set_num_threads (default 2; on a busy machine 1 avoids "
                         "OpenMP threads waiting on each other)")
    args = ap.parse_args(argv)
    num_inits = [int(s) for s in args.num_inits.split(",") if s.strip()]
    if any(n < 1 for n in num_inits) or args.loop_inits < 1:
        ap.error("--num_inits and --loop_inits must be positive")

    problem = mlp_problem("sinc", widths=WIDTHS)
    torch = None if args.skip_torch else torch_available()
    if torch is not None:
        torch_setup(args.torch_threads)
    log(f"# bench_min_ratio: {problem.name}, P = {problem.n_params}, "
        f"n = {problem.dataset.n_train}, float64, {TRAIN_STEPS} Adam + {FINDER_STEPS} "
        f"grad-norm Adam steps + exact Hessian/eigvalsh per init")
    log(f"machine: {machine_line(torch)}")
    if torch is None and not args.skip_torch:
        log("torch: skipped: torch not installed")

    if args.check:
        if torch is None:
            log("check: skipped: torch not installed")
            return 0
        return 0 if check(problem, torch) else 1

    rows, crit_at = [], {}
    loop_per_seed = None
    if torch is not None:
        x, y = torch_data(problem)
        log(f"torch loop: timing {args.loop_inits} seeds ...")
        t, _ = run_loop(x, y, range(args.loop_inits))
        loop_per_seed = t / args.loop_inits
        log(f"  {t:.1f} s, {loop_per_seed:.2f} s/seed")
    for n in num_inits:
        log(f"crit N={n} ...")
        c = run_crit(problem, GRADNORM_CFG, n)
        crit_at[n] = c
        log(f"  total {c['total']:.1f} s (compile {c['compile']:.1f} s, steady {c['steady']:.1f} s;"
            f" {c['n_chunks']} chunks of {c['chunk']}, {c['padded']} inits computed, "
            f"{len(jax.devices())} device(s))")
        f_time = l_time = None
        if torch is not None:
            log(f"torch.func N={n} ...")
            f = run_func(x, y, n, min(c["chunk"], args.torch_hess_chunk))
            f_time = f["time"]
            log(f"  {f_time:.1f} s")
            l_time = loop_per_seed * n
        rows.append((n, c, f_time, l_time))

    log("")
    log(f"## crit vs PyTorch, {problem.name} (P = {problem.n_params}), gradient-norm finder")
    log("")
    log(f"{machine_line(torch)}")
    log("")
    log("| N | crit total (steady) | torch.func | torch loop | torch.func / crit | "
        "loop / crit |")
    log("|---|---|---|---|---|---|")
    for n, c, f_time, l_time in rows:
        measured = "measured" if args.loop_inits >= n else f"extrap. from {args.loop_inits}"
        loop_cell = "—" if l_time is None else f"{l_time:.1f} s ({measured})"
        log(f"| {n} | {c['total']:.1f} s ({c['steady']:.1f} s) | {fmt_s(f_time)} | {loop_cell} | "
            f"{fmt_r(f_time, c['total'])} | {fmt_r(l_time, c['total'])} |")
    log("")
    log("Ratios use crit's total time (compile included). Targets at N=1000: torch.func/crit "
        ">= 10, loop/crit >= 50.")
    for n, c, f_time, l_time in rows:
        if n == 1000 and f_time is not None:
            log(f"  torch.func/crit = {f_time / c['total']:.2f} "
                f"({'met' if f_time / c['total'] >= 10 else 'NOT met'}); "
                f"loop/crit = {l_time / c['total']:.2f} "
                f"({'met' if l_time / c['total'] >= 50 else 'NOT met'})")

    if args.newton == "yes" or (args.newton == "auto" and 100 in num_inits):
        n = 100
        g = crit_at.get(n) or run_crit(problem, GRADNORM_CFG, n)
        log(f"crit N={n}, Newton finder ...")
        nw = run_crit(problem, NEWTON_CFG, n)
        log("")
        log(f"## crit finders at N={n} (2000 Adam steps first in both)")
        log("")
        log("| finder | total (steady) | share ‖g‖ ≤ 1e-8 | median ‖g‖ |")
        log("|---|---|---|---|")
        for name, r in (("gradnorm (1000 Adam steps on ½‖g‖²)", g),
                        (f"newton ({NEWTON_CFG.finder_steps} iterations max)", nw)):
            gn = r["records"]["grad_norm"]
            log(f"| {name} | {r['total']:.1f} s ({r['steady']:.1f} s) | "
                f"{np.mean(gn <= GRAD_TOL):.0%} | {np.median(gn):.2e} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
