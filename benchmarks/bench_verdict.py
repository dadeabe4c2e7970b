"""How sharp is the large-P answer for a given number of HVPs? (issue 13)

Run from the repository root::

    python -m benchmarks.bench_verdict                 # both parts (~15 min on 2 cores)
    python -m benchmarks.bench_verdict --part planted  # part A only (~3 min)

Sharpness = the smallest τ/λ_max of the grid crit.krylov.REL_TOL_GRID (half decades) at which
the min-ratio interval is at most 0.05 wide (lower is better; a coarse τ does not count).

Part A (planted, P = 100,000, crit.krylov.planted_operator): 60% of the eigenvalues in a null
cluster |λ| <= 1e-9, a positive bulk in [1e-2, 1], 10 outliers up to 500 (so λ_max = 500 and
the bulk edge is 2e-5·λ_max). Sharpness and the width at τ = 1e-4·λ_max against HVPs spent,
for: no deflation, fixed steps (the pre-issue-13 method); deflation, fixed steps; deflation +
adaptive steps up to a budget. Then the saddle proof: λ_min planted at −1e-3·λ_max (and
−1e-4) inside that spectrum; HVPs until `saddle (proven)`, i.e. until the Rayleigh quotient of
the smallest Ritz vector is below −P·ε·max|θ| (extremal run of s steps + 1 check).

Part B (the spectrum app's default network after training: MLP 64-300-300-10 tanh on 1,024
digits, P = 112,810, 500 Adam steps at 1e-3, float64): the same sharpness against HVPs for
the app's old default (4 probes + 1 extremal run × 90 steps, no deflation, τ chosen as before
at the machine τ), deflation at the same budget, and deflation + adaptive steps within 1,000
HVPs; and the HVPs needed to prove the saddle. Targets: sharpness <= 1e-4 within 1,000 HVPs
after training; saddle proven within 100 HVPs whenever λ_min < −1e-3·λ_max.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import time

import numpy as np

WIDTH = 0.05


def sharpness(spec) -> float:
    """Smallest grid τ/λ_max whose min-ratio interval is at most WIDTH wide (inf if none)."""
    from crit.krylov import REL_TOL_GRID

    fr = spec.grid_fractions.positive
    width = np.asarray(fr.hi) - np.asarray(fr.lo)
    ok = np.flatnonzero(width <= WIDTH)
    return float(REL_TOL_GRID[ok[0]]) if ok.size else float("inf")


def width_at(spec, rel: float) -> float:
    from crit.krylov import REL_TOL_GRID

    g = int(np.argmin(np.abs(np.log10(np.asarray(REL_TOL_GRID) / rel))))
    fr = spec.grid_fractions.positive
    return float(fr.hi[g] - fr.lo[g])


def run(matvec, dim, label, key=0, **kw):
    import jax

    from crit.krylov import krylov_spectrum

    fn = jax.jit(lambda k: krylov_spectrum(matvec, k, dim, **kw))
    t0 = time.perf_counter()
    spec = jax.block_until_ready(fn(jax.random.PRNGKey(key)))
    seconds = time.perf_counter() - t0
    print(f"  {label:<52} HVPs {int(spec.num_matvecs):>5}  sharpness "
          f"{sharpness(spec):8.1e}  width@1e-4 {width_at(spec, 1e-4):.3f}  deflated "
          f"{int(spec.num_deflated):>2}  steps/probe {int(spec.probe_steps):>4}  "
          f"{seconds:6.1f}s (compile incl.)", flush=True)
    return spec


def configs(matvec, dim):
    """The three methods at about 250, 500 and 1,000 HVPs."""
    out = []
    for probes, steps in ((2, 80), (2, 160), (4, 200)):
        out.append(run(matvec, dim, f"no deflation, {probes} probes x {steps} steps",
                       num_steps=steps, num_probes=probes, deflate=False))
        out.append(run(matvec, dim, f"deflation, {probes} probes x {steps} steps",
                       num_steps=steps, num_probes=probes, deflate=True))
    for budget in (250, 500, 1000):
        steps, probes = 50, 2
        max_steps = (budget - steps - 10) // probes // steps * steps
        out.append(run(matvec, dim, f"deflation + adaptive, budget {budget} (target 1e-7)",
                       num_steps=steps, num_probes=probes, deflate=True, max_steps=max_steps,
                       target_rel_tol=1e-7))
    return out


def proof_hvps(matvec, dim, steps_grid=(10, 20, 30, 40, 60, 80, 100)):
    """Smallest extremal-run length (+1 Rayleigh check) that proves a saddle, or None."""
    import jax

    from crit.krylov import krylov_spectrum

    for s in steps_grid:
        spec = jax.jit(lambda k, s=s: krylov_spectrum(matvec, k, dim, num_steps=s,
                                                      num_probes=1, k=1, deflate=False))(
            jax.random.PRNGKey(0))
        if bool(spec.verdict.negative_proven):
            return s + 1, float(spec.verdict.lambda_min_bound)
    return None, None


def part_planted():
    from crit.krylov import planted_operator

    n = 100_000
    rng = np.random.default_rng(0)
    k = int(0.6 * n)
    lam = np.concatenate([rng.uniform(0.0, 1e-9, k), rng.uniform(1e-2, 1.0, n - k - 10),
                          np.geomspace(50.0, 500.0, 10)])
    print(f"Part A: planted spectrum, P = {n:,}: 60% in |λ| <= 1e-9, bulk [1e-2, 1], 10 "
          f"outliers to 500 (bulk edge = {1.0 / 500:.0e}·λ_max; exact min ratio at τ = "
          f"1e-4·λ_max: {np.mean(lam > 0.05):.4f})")
    configs(planted_operator(lam), n)
    for rel in (1e-3, 1e-4):
        neg = lam.copy()
        neg[0] = -rel * 500.0
        hvps, bound = proof_hvps(planted_operator(neg), n)
        print(f"  saddle proof, λ_min = −{rel:g}·λ_max: "
              + (f"proven with {hvps} HVPs (λ_min <= {bound:.4g})" if hvps else
                 "not proven within 101 HVPs"), flush=True)


def part_network():
    import jax
    from jax.flatten_util import ravel_pytree

    from crit.hessian import hvp_operator
    from crit.krylov import REL_TOL_GRID
    from crit.problems import mlp_problem
    from crit.protocol import init_key
    from crit.train import make_optimizer, train

    problem = mlp_problem("digits", widths=(300, 300), n_points=1024)
    params = problem.init_fn(init_key(0, 0))
    t0 = time.perf_counter()
    params, _ = jax.jit(lambda p: train(problem.loss_fn, make_optimizer("adam", 1e-3), p, 500,
                                        100))(params)
    theta, unravel = ravel_pytree(params)
    loss = lambda t: problem.loss_fn(unravel(t))  # noqa: E731
    _, matvec = hvp_operator(loss, theta)
    print(f"\nPart B: {problem.name}, P = {theta.size:,}, trained 500 Adam steps in "
          f"{time.perf_counter() - t0:.1f}s, loss {float(loss(theta)):.4g}")
    old = run(matvec, theta.size, "old default: 4 probes x 90, no deflation, machine τ",
              num_steps=90, num_probes=4, deflate=False, tol_mode="machine")
    print(f"    its reported min ratio {float(old.min_ratio):.3f} [{float(old.min_ratio_lo):.3f}"
          f", {float(old.min_ratio_hi):.3f}] at τ = {float(old.tolerance_rel):.1e}·max|θ|")
    run(matvec, theta.size, "deflation, 4 probes x 90", num_steps=90, num_probes=4)
    for probes in (2, 4):
        budget, steps = 1000, 90
        max_steps = (budget - steps - 10) // probes // steps * steps
        spec = run(matvec, theta.size, f"deflation + adaptive, {probes} probes, budget 1000 "
                   "(target 1e-7)", num_steps=steps, num_probes=probes, max_steps=max_steps,
                   target_rel_tol=1e-7)
    fr = spec.grid_fractions  # of the last run above (4 probes)
    print("    τ/λ_max   min ratio [interval]        index [interval]")
    for g, rel in enumerate(REL_TOL_GRID):
        if rel >= 1e-7:
            print(f"    {rel:8.1e}  {float(fr.positive.mean[g]):.4f} "
                  f"[{float(fr.positive.lo[g]):.4f}"
                  f", {float(fr.positive.hi[g]):.4f}]  {float(fr.negative.mean[g]):.4f} "
                  f"[{float(fr.negative.lo[g]):.4f}, {float(fr.negative.hi[g]):.4f}]")
    v = spec.verdict
    lam_max = float(spec.lambda_max)
    print(f"    verdict evidence: λ_min <= {float(v.lambda_min_bound):.4g} "
          f"({float(v.lambda_min_bound) / lam_max:.2e}·λ_max), proven: "
          f"{bool(v.negative_proven)}")
    hvps, bound = proof_hvps(matvec, theta.size)
    print("  saddle proof after training: "
          + (f"proven with {hvps} HVPs (λ_min <= {bound:.4g} = {bound / lam_max:.2e}·λ_max)"
             if hvps else "not proven within 101 HVPs"), flush=True)


def main():
    import crit  # noqa: F401  (float64)
    import jax

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["planted", "network", "both"], default="both")
    args = parser.parse_args()
    print(f"bench_verdict {datetime.date.today()}, {platform.machine()}, jax {jax.__version__},"
          f" {jax.device_count()} {jax.default_backend()} device(s); interval width target "
          f"{WIDTH}")
    if args.part in ("planted", "both"):
        part_planted()
    if args.part in ("network", "both"):
        part_network()


if __name__ == "__main__":
    main()
