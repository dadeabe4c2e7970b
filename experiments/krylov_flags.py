"""Flags of the large-P (Krylov) spectrum shared by `min_ratio --hessian=lanczos` and `spectrum`.

    --krylov_tol=resolved|machine   τ of the sign fractions (crit.krylov.krylov_spectrum):
                                    the finest scale whose intervals are at most
                                    --resolve_width wide, or P·ε·max|θ| (the dense default)
    --deflate                       take converged outlier eigenpairs out before SLQ
    --hvp_budget=N                  adaptive SLQ: continue the runs in blocks of
                                    --lanczos_steps until the min-ratio and index intervals at
                                    τ = --target_rel_tol·max|θ| are at most --resolve_width
                                    wide, spending at most N HVPs in all (0: one block)
"""

from __future__ import annotations

import math

from absl import flags

from crit.protocol import KRYLOV_K

FLAGS = flags.FLAGS

flags.DEFINE_enum("krylov_tol", "resolved", ["resolved", "machine"],
                  "τ of the SLQ sign fractions when --eig_tol is not set: 'resolved' = the "
                  "smallest τ = r·max|θ| (r on a half-decade grid 1e-12..1e-1) whose min-ratio "
                  "and index intervals are at most --resolve_width wide; 'machine' = "
                  "P·ε·max|θ|, the dense path's τ (usually unresolved at large P).")
flags.DEFINE_bool("deflate", True, "Deflate converged extremal Ritz pairs (at most 5 per end) "
                  "before the SLQ runs; the fractions stay rigorous (Weyl slack).")
flags.DEFINE_integer("hvp_budget", 0, "Adaptive SLQ: most HVPs per spectrum in all (extremal "
                     "run + Rayleigh checks + probes); the runs stop earlier once sharp at "
                     "--target_rel_tol. 0: every run takes --lanczos_steps steps.")
flags.DEFINE_float("target_rel_tol", 1e-4, "τ / max|θ| at which adaptive runs must be sharp.")
flags.DEFINE_float("resolve_width", 0.05, "Interval width at or below which a fraction is "
                   "resolved; wider point estimates are marked unresolved.")

EXTREMAL_K = KRYLOV_K  # Ritz pairs per end in min_ratio: reported, Rayleigh-checked, deflated


def extra_matvecs(k: int, deflate: bool) -> int:
    """HVPs spent besides the runs: the Rayleigh checks of the 2k extremal Ritz vectors."""
    return 2 * k if deflate else 1


def probe_max_steps(lanczos_steps: int, slq_probes: int, k: int = EXTREMAL_K) -> int:
    """Steps per SLQ run that --hvp_budget allows (0 without a budget), a multiple of
    --lanczos_steps; k Ritz pairs per end."""
    if not FLAGS.hvp_budget:
        return 0
    left = FLAGS.hvp_budget - lanczos_steps - extra_matvecs(k, FLAGS.deflate)
    return max(left // max(slq_probes, 1), 0) // lanczos_steps * lanczos_steps


def krylov_errors(lanczos_steps: int, slq_probes: int, k: int = EXTREMAL_K) -> list[str]:
    """Problems with the Krylov flags, each naming its flag."""
    errors = []
    if FLAGS.hvp_budget < 0:
        errors.append(f"--hvp_budget={FLAGS.hvp_budget}: must be >= 0 (0 = no adaptive runs)")
    elif FLAGS.hvp_budget and lanczos_steps >= 1 and slq_probes >= 1:
        need = (1 + slq_probes) * lanczos_steps + extra_matvecs(k, FLAGS.deflate)
        if FLAGS.hvp_budget < need:
            errors.append(f"--hvp_budget={FLAGS.hvp_budget}: one block of --lanczos_steps="
                          f"{lanczos_steps} for the extremal run and --slq_probes="
                          f"{slq_probes} probes already costs {need} HVPs")
    for name in ("target_rel_tol", "resolve_width"):
        value = getattr(FLAGS, name)
        if not (math.isfinite(value) and 0 < value < 1):
            errors.append(f"--{name}={value}: must be in (0, 1)")
    return errors


def krylov_options() -> dict:
    """The flags' values, for the protocol config and config.json."""
    return dict(krylov_tol=FLAGS.krylov_tol, deflate=FLAGS.deflate,
                hvp_budget=FLAGS.hvp_budget, target_rel_tol=FLAGS.target_rel_tol,
                resolve_width=FLAGS.resolve_width)
