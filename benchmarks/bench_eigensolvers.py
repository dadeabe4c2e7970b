"""Matvecs (HVPs) needed for extremal Hessian eigenvalues: crit Lanczos vs ARPACK vs power.

Run from the repository root::

    python -m benchmarks.bench_eigensolvers

Problems
--------
(a) planted: A = Q diag(lam) Q^T, n = 1000, a Hessian-like spectrum (300 exact zeros, a
    positive bulk 0.02*Exp(1), a negative bulk -0.005*Exp(1), negative outliers -0.1, -0.05,
    positive outliers 1, 2, 3, 5, 8, 10).
(b) mlp: Hessian of the mean softmax cross-entropy of a 20-150-10 tanh MLP (4,660 parameters,
    LeCun-normal init, zero biases) on 256 standard-normal inputs with uniform random labels,
    at initialization; HVP = jvp of grad (forward-over-reverse).

Targets: lambda_max to 1e-10 relative, lambda_min (most negative) to 1e-6 relative, against
numpy.linalg.eigvalsh of the dense matrix. Methods:
- crit: ``crit.lanczos`` with full reorthogonalization, one run from a random start; the
  smallest m meeting each target is found from the leading m x m blocks of one long run
  (identical to an m-step run) and then re-checked by an actual m-step run. Both ends come
  from the same run, so "both" costs max(m_max, m_min).
- ARPACK: ``scipy.sparse.linalg.eigsh(k=1, which='LA' / 'SA')`` through a counting
  LinearOperator, same start vector; over ncv in {5, 10, 20 (default), 40} and tol in
  {1e-1, ..., 1e-14, 0}, the fewest matvecs among runs that meet the target is reported.
- power: power iteration as PyHessian runs it (stop when the relative change of the
  Rayleigh quotient is < 1e-3, at most 100 iterations; it returns the previous estimate);
  it finds only the eigenvalue of largest magnitude.
"""

import datetime
import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg
import scipy.sparse.linalg
from jax.flatten_util import ravel_pytree

import crit  # noqa: F401  (float64)
from crit.lanczos import extremal_eigenpairs, lanczos_tridiag

TARGET_MAX, TARGET_MIN = 1e-10, 1e-6
M_MAX = 400
ARPACK_TOLS = [10.0**-e for e in range(1, 15)] + [0.0]
ARPACK_NCV = [5, 10, 20, 40]


def planted_problem():
    rng = np.random.default_rng(0)
    lam = np.concatenate(
        [
            np.zeros(300),
            0.02 * rng.exponential(size=542),
            -0.005 * rng.exponential(size=150),
            [-0.1, -0.05, 1.0, 2.0, 3.0, 5.0, 8.0, 10.0],
        ]
    )
    q, _ = np.linalg.qr(rng.standard_normal((lam.size, lam.size)))
    a = jnp.asarray((q * lam) @ q.T)
    return jax.jit(lambda v: a @ v), np.sort(lam), lam.size


def mlp_problem():
    keys = jax.random.split(jax.random.key(0), 4)
    d_in, width, classes, num_data = 20, 150, 10, 256
    params = {
        "w1": jax.random.normal(keys[0], (d_in, width)) / np.sqrt(d_in),
        "b1": jnp.zeros(width),
        "w2": jax.random.normal(keys[1], (width, classes)) / np.sqrt(width),
        "b2": jnp.zeros(classes),
    }
    x = jax.random.normal(keys[2], (num_data, d_in))
    y = jax.random.randint(keys[3], (num_data,), 0, classes)
    flat, unravel = ravel_pytree(params)

    def loss(theta):
        p = unravel(theta)
        logits = jnp.tanh(x @ p["w1"] + p["b1"]) @ p["w2"] + p["b2"]
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, y[:, None], axis=1))

    hvp = jax.jit(lambda v: jax.jvp(jax.grad(loss), (flat,), (v,))[1])
    eye = jnp.eye(flat.size)
    dense = jax.jit(lambda e: jax.lax.map(hvp, e, batch_size=128))(eye)
    dense = np.asarray(dense)
    exact = np.linalg.eigvalsh(0.5 * (dense + dense.T))
    return hvp, exact, flat.size


def rel(x, ref):
    return abs(x - ref) / abs(ref)


def crit_counts(matvec, exact, n, v0):
    steps = min(M_MAX, n)
    res = jax.jit(lambda v: lanczos_tridiag(matvec, v, steps, return_basis=False))(v0)
    alphas, betas = np.asarray(res.alphas), np.asarray(res.betas)
    need = {}
    for m in range(2, steps + 1):
        ritz = scipy.linalg.eigvalsh_tridiagonal(alphas[:m], betas[: m - 1])
        if "max" not in need and rel(ritz[-1], exact[-1]) <= TARGET_MAX:
            need["max"] = m
        if "min" not in need and rel(ritz[0], exact[0]) <= TARGET_MIN:
            need["min"] = m
        if len(need) == 2:
            break
    both = max(need.get("max", np.inf), need.get("min", np.inf))
    errs = {}
    for end, m in list(need.items()) + [("both", both)]:
        if np.isfinite(m):  # re-check with a genuine m-step run
            out = extremal_eigenpairs(matvec, v0, int(m), 1)
            errs[end] = (rel(float(out.largest.values[0]), exact[-1]),
                         rel(float(out.smallest.values[0]), exact[0]))
    return need, both, errs


def arpack_counts(matvec, exact, n, v0, which):
    ref, target = (exact[-1], TARGET_MAX) if which == "LA" else (exact[0], TARGET_MIN)
    best = None
    for ncv, tol in [(ncv, tol) for ncv in ARPACK_NCV for tol in ARPACK_TOLS]:
        count = [0]

        def mv(x):
            count[0] += 1
            return np.asarray(matvec(jnp.asarray(np.ravel(x))))

        op = scipy.sparse.linalg.LinearOperator((n, n), matvec=mv, dtype=np.float64)
        try:
            val = scipy.sparse.linalg.eigsh(
                op, k=1, which=which, tol=tol, ncv=ncv, v0=np.asarray(v0)
            )[0][0]
        except scipy.sparse.linalg.ArpackNoConvergence:
            continue
        if rel(val, ref) <= target and (best is None or count[0] < best[0]):
            best = (count[0], rel(val, ref), f"tol={tol:g}, ncv={ncv}")
    return best


def power_iteration(matvec, exact, v0, max_iter=100, tol=1e-3):
    """PyHessian's hessian.eigenvalues(top_n=1) loop."""
    v = v0 / jnp.linalg.norm(v0)
    eigenvalue, count = None, 0
    for _ in range(max_iter):
        hv = matvec(v)
        count += 1
        tmp = float(jnp.dot(hv, v))
        v = hv / jnp.linalg.norm(hv)
        if eigenvalue is not None and abs(eigenvalue - tmp) / (abs(eigenvalue) + 1e-6) < tol:
            break
        eigenvalue = tmp
    dominant = exact[np.argmax(np.abs(exact))]
    return count, eigenvalue, rel(eigenvalue, dominant)


def main():
    print(f"# Eigen-solver benchmark, {datetime.datetime.now().isoformat(timespec='seconds')}")
    print(f"machine: processor={platform.processor()!r} ({platform.machine()}), "
          f"os.cpu_count()={os.cpu_count()}, {platform.platform()}, jax {jax.__version__} "
          f"on {jax.default_backend()}\n")
    rows = []
    problems = [("planted n=1000", planted_problem), ("MLP 20-150-10, n=4660", mlp_problem)]
    for name, build in problems:
        t0 = time.time()
        matvec, exact, n = build()
        print(f"{name}: lambda_max={exact[-1]:.10g}, lambda_min={exact[0]:.10g}, "
              f"lambda_2={exact[-2]:.6g}, setup+dense eigvalsh {time.time() - t0:.0f}s")
        v0 = jax.random.normal(jax.random.key(1), (n,))
        need, both, errs = crit_counts(matvec, exact, n, v0)
        for end, target in (("max", TARGET_MAX), ("min", TARGET_MIN)):
            m = need.get(end)
            err = errs[end][0 if end == "max" else 1] if m else float("nan")
            rows.append((name, "crit Lanczos", f"lambda_{end} {target:.0e}", m or f">{M_MAX}",
                         f"{err:.1e}", "full reorth., one run"))
        rows.append((name, "crit Lanczos", "both ends", both,
                     "{:.1e} / {:.1e}".format(*errs["both"]) if "both" in errs else "-",
                     "same run gives both"))
        total = 0
        for which, target in (("LA", TARGET_MAX), ("SA", TARGET_MIN)):
            best = arpack_counts(matvec, exact, n, v0, which)
            if best is None:
                rows.append((name, f"ARPACK eigsh {which}", f"{target:.0e}", "fail", "-", ""))
                total = None
                continue
            total = None if total is None else total + best[0]
            end = "max" if which == "LA" else "min"
            rows.append((name, f"ARPACK eigsh {which}", f"lambda_{end} {target:.0e}", best[0],
                         f"{best[1]:.1e}", best[2]))
        rows.append((name, "ARPACK eigsh LA+SA", "both ends", total if total else "-", "-",
                     "two separate runs"))
        count, value, err = power_iteration(matvec, exact, v0)
        rows.append((name, "power (PyHessian)", "largest-magnitude, rel. change < 1e-3", count,
                     f"{err:.1e}", f"returns {value:.6g}; no lambda_min"))
    print("\n| problem | method | target | matvecs | rel. error | notes |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(str(c) for c in row) + " |")


if __name__ == "__main__":
    main()
