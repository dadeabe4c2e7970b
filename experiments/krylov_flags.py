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
flags.DEFINE_enum("hvp_dtype", "float64", ["float64", "float32", "bfloat16"],
                  "Precision of the Lanczos search's HVPs. float32/bfloat16: the search runs on "
                  "cast parameters and data (fast on GPUs/TPUs), its error against float64 is "
                  "measured on the probes and widens every interval, and the extremal Ritz "
                  "pairs, the verdict's y'Hy and residuals are recomputed in float64 (a proof "
                  "stays a float64 proof). Dots follow --matmul_precision.")
flags.DEFINE_float("resolve_ceiling", 1e-2, "No fraction is resolved at τ above this·max|θ| "
                   "(at τ = 0.1·λ_max most of a bulk counts as null, however narrow the "
                   "interval); --krylov_tol=resolved searches the grid up to it.")

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
    for name in ("target_rel_tol", "resolve_width", "resolve_ceiling"):
        value = getattr(FLAGS, name)
        if not (math.isfinite(value) and 0 < value < 1):
            errors.append(f"--{name}={value}: must be in (0, 1)")
    return errors + batch_statistics_errors()


def batch_statistics_errors() -> list[str]:
    """--hvp_batch_size with --batchnorm=batch on a model with BatchNorm, unless its batches
    are the evaluation batches.

    Under batch statistics each batch is normalized with its own mean and variance, so the loss
    depends on how the rows are batched: L is defined by the batches of --eval_batch_size
    (crit.problems). HVP batches of another size would differentiate another function (the
    gradient, the HVPs, Newton-MR and Lanczos) while the loss, the certificate and
    --compare_dense use the eval batches.
    The same size gives the same row partition (consecutive rows, a short last batch) and so
    the same function; that is accepted.
    """
    rows = getattr(FLAGS, "hvp_batch_size", 0)
    if not rows or "batchnorm" not in FLAGS or FLAGS.batchnorm != "batch":
        return []
    from experiments import model_flags

    try:  # built (and cached) by model_flags.model_errors; its own errors are reported there
        problem = model_flags.problem_from_model_flags()
    except Exception:  # noqa: BLE001
        return []
    if problem.batchnorm != "batch":  # a model without BatchNorm ignores --batchnorm
        return []
    n = problem.dataset.n_train
    if min(rows, n) == min(problem.eval_batch_size or n, n):
        return []
    return [f"--hvp_batch_size={rows} with --batchnorm=batch: each batch normalizes with its "
            "own statistics, so the loss depends on the batching, and the loss, certificate "
            f"and spectra are those of batches of --eval_batch_size={problem.eval_batch_size} "
            f"(0 = all {n} rows); HVP batches of {min(rows, n)} rows would differentiate "
            "another function. Drop --hvp_batch_size (--eval_batch_size already bounds the "
            "memory of the gradient and HVPs by one batch), set it equal to "
            "--eval_batch_size, or use --batchnorm=eval"]


flags.DEFINE_enum("shard_axis", "auto", ["auto", "inits", "data"],
                  "What is spread over the devices (and processes): 'inits' (many small models, "
                  "each on one device, no communication), 'data' (one large model: the "
                  "full-data loss, gradient and HVPs summed over data shards, crit.data_parallel) "
                  "or 'auto' (data when there are fewer inits than devices or P·N >= 1e8, else "
                  "inits; printed at start). The local batch of the data axis is "
                  "--eval_batch_size.")


def shard_axis(num_inits: int, problem) -> tuple[str, str]:
    """(axis, reason): --shard_axis resolved for ``num_inits`` models of ``problem`` over every
    device of every process. Under 'auto', --hvp_batch_size (a one-device batch sum) keeps
    the inits axis."""
    import jax

    from crit.data_parallel import choose_shard_axis

    if FLAGS.shard_axis == "auto" and getattr(FLAGS, "hvp_batch_size", 0):
        return "inits", "--hvp_batch_size sums HVP batches on one device"
    return choose_shard_axis(FLAGS.shard_axis, jax.device_count(), num_inits, problem.n_params,
                             problem.dataset.n_train)


def shard_axis_errors(axis: str) -> list[str]:
    """Flags that do not combine with the resolved axis, each named."""
    errors = []
    if axis == "data" and getattr(FLAGS, "hvp_batch_size", 0):
        errors.append(f"--hvp_batch_size={FLAGS.hvp_batch_size}: sums HVP batches on one "
                      "device; with --shard_axis=data the full-data HVP is already summed over "
                      "data shards in batches of --eval_batch_size (set that instead)")
    if axis == "data" and FLAGS.hvp_dtype != "float64":
        errors.append(f"--hvp_dtype={FLAGS.hvp_dtype}: a low-precision search runs on the "
                      "inits axis only (its cast copy of the data sits on one device); use "
                      "--shard_axis=inits or --hvp_dtype=float64")
    return errors


def shard_line(axis: str, reason: str, problem) -> str:
    """The start-up line that says which axis is spread and why."""
    import jax

    line = f"shard axis: {axis} ({reason}) over {jax.device_count()} device(s)"
    if axis == "data":
        from crit.data_parallel import data_layout

        lay = data_layout(problem.dataset.n_train, jax.device_count(), problem.eval_batch_size,
                          whole_batches=problem.batchnorm == "batch")
        line += (f", {lay.local_batches} local batch(es) of {lay.batch_rows} rows per device"
                 + (f" + a shared last batch of {lay.tail.size}" if lay.tail.size else ""))
    return line


def data_parallel_memory_errors(problem, krylov_vectors: int) -> list[str]:
    """The data axis's memory plan checked before compute (crit.data_parallel)."""
    from crit.data_parallel import check_memory, device_memory_bytes
    from crit.parallel import available_memory_bytes
    from crit.protocol import forward_floats_per_example
    import jax

    need = device_memory_bytes(problem, jax.device_count(), krylov_vectors,
                               forward_floats_per_example(problem))
    try:
        check_memory(need, available_memory_bytes())
    except MemoryError as exc:
        return [str(exc)]
    return []
