"""Is there a critical point near where the homework training stops? Keep optimizing and see.

Run from the repository root::

    python -m benchmarks.probe_valley [--widths 16,16] [--num_inits 8] [--iters 200]

After the homework training (2000 Adam steps, lr 1e-2) no init of ``min_ratio``'s default
reaches ‖∇L‖ ≤ 1e-8, with damped Newton on ∇L = 0 or with gradient-norm descent. Two readings
are possible: a critical point is near and the finders are too weak, or there is no critical
point within reach and the loss is still falling along a flat valley. This probe tells them
apart with a second-order *descent* method that cannot stall on a non-critical point:
saddle-free Newton, θ ← θ − U diag(1/(|λ| + μ·λmax)) Uᵀ g with the exact Hessian
H = U diag(λ) Uᵀ, the damping μ picked each step from a grid to minimize the loss (Dauphin et al.
2014). Near a non-degenerate minimum it converges quadratically and ‖∇L‖ collapses; in a valley
the loss keeps going down slowly and ‖∇L‖ stays put. It prints loss and ‖∇L‖ per init at a few
iteration counts.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

import crit  # noqa: F401  (float64)
from crit.hessian import dense_hessian, flat_loss
from crit.problems import mlp_problem
from crit.protocol import ProtocolConfig, train_init

DAMPING = (0.0, 1e-14, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4, 1e-3, 1e-2, 1e-1, 1.0)


def saddle_free_descent(loss_fn, params, iters: int):
    """``iters`` damped saddle-free Newton steps; returns (loss, ‖g‖) after each step."""
    f, theta, _ = flat_loss(loss_fn, params)
    grad_f = jax.grad(f)
    mus = jnp.asarray(DAMPING)

    def step(theta, _):
        g = grad_f(theta)
        lam, u = jnp.linalg.eigh(dense_hessian(f, theta))
        scale = jnp.max(jnp.abs(lam))
        gt = u.T @ g

        def candidate(mu):
            new = theta - u @ (gt / (jnp.abs(lam) + mu * scale + 1e-300))
            return new, f(new)

        news, losses = jax.vmap(candidate)(mus)
        losses = jnp.where(jnp.isfinite(losses), losses, jnp.inf)
        best = jnp.argmin(losses)
        theta = jnp.where(losses[best] < f(theta), news[best], theta)
        return theta, (f(theta), jnp.linalg.norm(grad_f(theta)))

    return jax.lax.scan(step, theta, None, length=iters)[1]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default="16,16")
    ap.add_argument("--num_inits", type=int, default=8)
    ap.add_argument("--iters", type=int, default=200)
    args = ap.parse_args(argv)
    widths = tuple(int(w) for w in args.widths.split(","))
    problem = mlp_problem("sinc", widths, "tanh", n_points=256)
    cfg = ProtocolConfig()
    ids = jnp.arange(args.num_inits)
    params = jax.jit(jax.vmap(lambda i: train_init(problem, cfg, i)[0]))(ids)
    loss, gnorm = jax.jit(jax.vmap(
        lambda p: saddle_free_descent(problem.loss_fn, p, args.iters)))(params)
    loss, gnorm = np.asarray(loss), np.asarray(gnorm)
    marks = sorted({1, 10, args.iters // 4, args.iters // 2, args.iters})
    print(f"{problem.name}, P = {problem.n_params}: after {cfg.train_steps} Adam steps, "
          f"{args.iters} saddle-free Newton steps (loss / ‖∇L‖ after k steps)")
    print("init | " + " | ".join(f"k={k}" for k in marks))
    for i in range(args.num_inits):
        print(f"{i} | " + " | ".join(f"{loss[i, k - 1]:.2e} / {gnorm[i, k - 1]:.1e}"
                                     for k in marks))
    ratio = loss[:, -1] / loss[:, 0]
    print(f"loss(k={args.iters}) / loss(k=1): median {np.median(ratio):.3f}; inits with "
          f"‖∇L‖ ≤ 1e-8 at the end: {(gnorm[:, -1] <= 1e-8).sum()} of {args.num_inits}")


if __name__ == "__main__":
    main()
