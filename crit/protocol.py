"""The minimum-ratio protocol for one initialization, and its vmapped, chunked driver.

For init ``i`` (REFERENCES §3, homework 1-2-3):

1. key_i = fold_in(PRNGKey(seed), i); θ₀ = init_fn(key_i),
2. train with optax for ``train_steps`` full-batch steps (float64, or float32 if asked),
3. refine to a critical point in float64 with the chosen finder,
4. exact Hessian of the full-batch loss, symmetrized, all eigenvalues by ``eigvalsh``,
5. certify (‖g‖ ≤ grad_tol) and classify eigenvalues with tolerance τ,
6. the verdict: proven about H(θ) (``negative_proven``), and about the critical point near θ
   only where λ_min clears τ plus the margin for the distance to it (:mod:`crit.nearby`, an
   estimate from one Newton-MR step of ``minres_iters`` HVPs; ``verdict_margin``, and
   ``curvature_ratio`` = |λ_min| / ‖∇L‖).

:func:`analyze_init` does this for one init id; :func:`make_chunk_fn` runs a chunk of ids as
groups of ``vmap_width`` vmapped inits under ``jit``. Init ``i`` always gets the same key and runs
in a group of the same width, so its results do not depend on the chunk it is in, bit for bit.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from crit.critical import CRITICAL, certify, find_critical_point
from crit.hessian import dense_hessian
from crit.nearby import critical_point_verdict, nearby_margin
from crit.problems import Problem
from crit.spectrum import classify_spectrum
from crit.train import cast_params, make_optimizer, train, train_model
from crit.verdict import dense_verdict, with_criticality


class ProtocolConfig(NamedTuple):
    """Everything in the protocol that changes numbers (hashable: used as a static jit arg)."""

    seed: int = 0
    optimizer: str = "adam"
    learning_rate: float = 1e-2
    momentum: float = 0.9
    train_steps: int = 2000
    log_every: int = 10
    train_dtype: str = "float64"
    finder: str = "newton"
    finder_steps: int = 15
    finder_lr: float = 1e-3
    grad_tol: float = 1e-8
    flat_tol: float = 1e-3
    eig_tol: float | None = None
    hessian: str = "dense"          # "dense" (jax.hessian + eigvalsh) or "lanczos" (HVPs only)
    lanczos_steps: int = 90
    slq_probes: int = 8
    minres_iters: int = 50
    hvp_batch_size: int = 0         # 0: the whole data set in one HVP
    vmap_width: int = 10            # inits vmapped together inside a chunk (see make_chunk_fn)
    spectrum_dtype: str = "float64"  # finder + Hessian + eigvalsh (dense); "float32" for TPUs
    batch_size: int = 0             # training rows per step (0: full batch)
    krylov_tol: str = "resolved"    # τ of Krylov fractions: "resolved" or "machine" (crit.krylov)
    deflate: bool = True            # deflate converged extremal pairs before SLQ (Krylov)
    probe_max_steps: int = 0        # adaptive SLQ up to this many steps per run (0: one block)
    target_rel_tol: float = 1e-4    # adaptive runs stop when sharp at τ = this·max|θ| ...
    resolve_width: float = 0.05     # ... i.e. intervals at most this wide (also: "resolved")
    resolve_ceiling: float = 1e-2   # never "resolved" at τ above this·max|θ| (crit.krylov)
    hvp_dtype: str = "float64"      # Krylov search precision; proofs stay float64 (check_matvec)


class InitRecord(NamedTuple):
    """Per-init result: the row of results.csv plus raw eigenvalues and curves."""

    init_id: jax.Array
    status: jax.Array
    loss: jax.Array
    grad_norm: jax.Array
    flatness: jax.Array
    train_loss: jax.Array          # loss where training stopped, before refinement
    train_grad_norm: jax.Array
    finder_iterations: jax.Array
    n_pos: jax.Array
    n_neg: jax.Array
    n_null: jax.Array
    min_ratio: jax.Array
    index: jax.Array
    null_fraction: jax.Array
    nonnull_ratio: jax.Array
    lambda_min: jax.Array
    lambda_max: jax.Array
    tolerance: jax.Array
    verdict: jax.Array
    negative_proven: jax.Array
    lambda_min_bound: jax.Array
    verdict_margin: jax.Array      # allowance for the distance to ∇L = 0 (crit.nearby)
    curvature_ratio: jax.Array     # |λ_min| / ‖∇L‖ (inf at ‖∇L‖ = 0)
    eigenvalues: jax.Array         # (P,) ascending, raw
    curve_loss: jax.Array          # training loss every log_every steps
    curve_grad_norm: jax.Array     # training gradient norm every log_every steps
    finder_history: jax.Array      # ‖g‖ per finder iteration (NaN after it stopped)


class KrylovInitRecord(NamedTuple):
    """Per-init result when the spectrum comes from HVPs + Lanczos/SLQ (large P).

    Fractions are SLQ estimates with intervals [lo, hi] (crit.krylov), written to results.csv
    as ``*_est`` columns; there are no integer counts (round(f·P) would pass for an exact count
    and need not sum to P). No full eigenvalue list exists: spectra.npz keeps the SLQ nodes and
    weights and the extremal Ritz values instead.
    """

    init_id: jax.Array
    status: jax.Array
    loss: jax.Array
    grad_norm: jax.Array
    flatness: jax.Array
    train_loss: jax.Array
    train_grad_norm: jax.Array
    finder_iterations: jax.Array
    min_ratio: jax.Array
    min_ratio_lo: jax.Array
    min_ratio_hi: jax.Array
    index: jax.Array
    index_lo: jax.Array
    index_hi: jax.Array
    null_fraction: jax.Array
    null_fraction_lo: jax.Array
    null_fraction_hi: jax.Array
    lambda_min: jax.Array
    lambda_max: jax.Array
    lambda_min_converged: jax.Array
    lambda_max_converged: jax.Array
    tolerance: jax.Array
    tolerance_rel: jax.Array
    resolved: jax.Array
    verdict: jax.Array
    negative_proven: jax.Array
    lambda_min_bound: jax.Array
    verdict_margin: jax.Array      # allowance for the distance to ∇L = 0 (crit.nearby)
    curvature_ratio: jax.Array     # |λ_min| / ‖∇L‖ (inf at ‖∇L‖ = 0)
    ritz_min_residual: jax.Array
    negative_excluded_below: jax.Array
    num_deflated: jax.Array
    num_matvecs: jax.Array
    ritz_largest: jax.Array
    ritz_smallest: jax.Array
    slq_nodes: jax.Array
    slq_weights: jax.Array
    grid_min_ratio: jax.Array      # (G,) min ratio at every τ of crit.krylov.REL_TOL_GRID
    grid_min_ratio_lo: jax.Array
    grid_min_ratio_hi: jax.Array
    grid_width: jax.Array          # (G,) the wider of the min-ratio and index intervals
    search_error: jax.Array        # measured bound on ‖H̃v − Hv‖ of a low-precision search (0)
    num_check_matvecs: jax.Array   # float64 products of a low-precision search (0 if float64)
    curve_loss: jax.Array
    curve_grad_norm: jax.Array
    finder_history: jax.Array


def init_key(seed: int, init_id) -> jax.Array:
    """The key of init ``init_id``: fold_in(PRNGKey(seed), init_id), independent of chunking."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), init_id)


def finder_kwargs(cfg: ProtocolConfig) -> dict:
    if cfg.finder == "newton":
        return dict(max_iters=cfg.finder_steps)
    return dict(num_steps=cfg.finder_steps, learning_rate=cfg.finder_lr)


def train_init(problem: Problem, cfg: ProtocolConfig, init_id):
    """Steps 1-2 of the protocol: the trained float64 parameters and the training log.

    For a problem with state (BatchNorm) use :func:`train_init_with_state`, which also returns
    the state the loss is then evaluated with.
    """
    params, _, log = train_init_with_state(problem, cfg, init_id)
    return params, log


def train_init_with_state(problem: Problem, cfg: ProtocolConfig, init_id):
    """Steps 1-2: ``(params, state, log)``, parameters and state in float64.

    A stateless problem trained full batch takes :func:`crit.train.train` (one fused scan);
    a problem with state or ``cfg.batch_size`` takes :func:`crit.train.train_model`, whose
    mini-batches and dropout draw from fold_in(key_i, 2). The state (BatchNorm running
    statistics) is trained alongside, then fixed: every later step uses L(θ; state).
    """
    key = init_key(cfg.seed, init_id)
    params = problem.init_fn(key)
    train_dtype = jnp.float32 if cfg.train_dtype == "float32" else jnp.float64
    optimizer = make_optimizer(cfg.optimizer, cfg.learning_rate, cfg.momentum)
    if not problem.has_state and not cfg.batch_size:
        params, log = train(problem.loss_fn, optimizer, cast_params(params, train_dtype),
                            cfg.train_steps, cfg.log_every)
        return cast_params(params, jnp.float64), {}, log
    state = cast_params(problem.init_state_fn(key), train_dtype)
    params, state, log = train_model(problem, optimizer, cast_params(params, train_dtype), state,
                                     jax.random.fold_in(key, 2), cfg.train_steps, cfg.log_every,
                                     cfg.batch_size)
    return cast_params(params, jnp.float64), cast_params(state, jnp.float64), log


def analyze_init(problem: Problem, cfg: ProtocolConfig, init_id):
    """Run the whole protocol (module docstring) for one init id; vmap-able over ``init_id``.

    Returns an :class:`InitRecord` (``cfg.hessian == "dense"``) or a :class:`KrylovInitRecord`
    (``"lanczos"``).
    """
    if cfg.hessian == "lanczos":
        return analyze_init_krylov(problem, cfg, init_id)
    if cfg.hessian != "dense":
        raise ValueError(f"unknown hessian mode {cfg.hessian!r}; allowed: dense, lanczos")
    params, state, log = train_init_with_state(problem, cfg, init_id)
    spectrum_dtype = jnp.float32 if cfg.spectrum_dtype == "float32" else jnp.float64
    loss_fn = problem.bind_state(cast_params(state, spectrum_dtype))
    found = find_critical_point(loss_fn, cast_params(params, spectrum_dtype), cfg.finder,
                                cfg.grad_tol, **finder_kwargs(cfg))
    eigenvalues, eigenvectors = jnp.linalg.eigh(dense_hessian(loss_fn, found.params))
    # τ from the spectrum's own precision (P·ε₃₂·max|λ| for float32), then stored as float64
    summary = classify_spectrum(eigenvalues, cfg.eig_tol)
    summary = summary._replace(tolerance=summary.tolerance.astype(jnp.float64),
                               lambda_min=summary.lambda_min.astype(jnp.float64),
                               lambda_max=summary.lambda_max.astype(jnp.float64))
    eigenvalues = eigenvalues.astype(jnp.float64)
    # the certificate is always a float64 gradient norm (one gradient: cheap even where float64
    # is emulated), so a float32 run never certifies a point float32 rounding only made look flat
    cert = certify(problem.bind_state(state), cast_params(found.params, jnp.float64),
                   jnp.max(jnp.abs(eigenvalues)), cfg.grad_tol, cfg.flat_tol)
    verdict = dense_verdict(eigenvalues, summary.tolerance, cert.status == CRITICAL)
    # the critical point near θ: the margin is estimated in float64 whatever spectrum_dtype
    margin = nearby_margin(problem.bind_state(state), cast_params(found.params, jnp.float64),
                           eigenvectors[:, 0].astype(jnp.float64),
                           minres_iters=cfg.minres_iters)
    verdict = critical_point_verdict(verdict, margin)
    return InitRecord(
        init_id=jnp.asarray(init_id), status=cert.status, loss=cert.loss,
        grad_norm=cert.grad_norm, flatness=cert.flatness,
        train_loss=log.loss[-1].astype(jnp.float64),
        train_grad_norm=log.grad_norm[-1].astype(jnp.float64),
        finder_iterations=found.iterations, n_pos=summary.n_pos, n_neg=summary.n_neg,
        n_null=summary.n_null, min_ratio=summary.min_ratio.astype(jnp.float64),
        index=summary.index.astype(jnp.float64),
        null_fraction=summary.null_fraction.astype(jnp.float64),
        nonnull_ratio=summary.nonnull_ratio.astype(jnp.float64),
        lambda_min=summary.lambda_min, lambda_max=summary.lambda_max,
        tolerance=summary.tolerance, verdict=verdict.code,
        negative_proven=verdict.negative_proven, lambda_min_bound=verdict.lambda_min_bound,
        verdict_margin=margin.margin, curvature_ratio=margin.ratio,
        eigenvalues=eigenvalues,
        curve_loss=log.loss.astype(jnp.float64),
        curve_grad_norm=log.grad_norm.astype(jnp.float64),
        finder_history=found.history.astype(jnp.float64))


def _bound_batch_loss(problem: Problem, state):
    return lambda params, x, y: problem.batch_loss_fn(params, x, y, state)


def _hvp_batch(problem: Problem, cfg: ProtocolConfig, state=None):
    if not cfg.hvp_batch_size:
        return None
    from crit.newton_mr import BatchedLoss

    return BatchedLoss(_bound_batch_loss(problem, state), jnp.asarray(problem.dataset.x_train),
                       jnp.asarray(problem.dataset.y_train), cfg.hvp_batch_size)


def search_hessian_operator(problem: Problem, cfg: ProtocolConfig, params, state=None):
    r"""The HVP of the full-data loss computed in ``cfg.hvp_dtype`` (parameters, state, data
    and tangent cast down, the product cast back to float64): the cheap operator a
    low-precision Lanczos search runs on (issue 24 point 3). Batches of ``cfg.hvp_batch_size``
    (else ``problem.eval_batch_size``, else all rows), weighted n_b/N as
    :func:`crit.hessian.full_batch_hvp_operator`; ``jax_default_matmul_precision`` is the
    run's (the apps set it). The proofs use :func:`hessian_operator` in float64."""
    from crit.analysis import cast_floats
    from crit.hessian import full_batch_hvp_operator

    dtype = jnp.dtype(cfg.hvp_dtype)
    x = jnp.asarray(problem.dataset.x_train)
    y = jnp.asarray(problem.dataset.y_train)
    low_state = cast_floats(state, dtype) if state is not None else None
    batch = cfg.hvp_batch_size or problem.eval_batch_size or x.shape[0]
    _, low = full_batch_hvp_operator(_bound_batch_loss(problem, low_state),
                                     cast_floats(params, dtype), cast_floats(x, dtype),
                                     cast_floats(y, dtype), batch)
    return lambda v: low(v.astype(dtype)).astype(jnp.float64)


def hessian_operator(problem: Problem, cfg: ProtocolConfig, params, state=None):
    """(grad_flat, matvec) of the full-data Hessian at ``params``, batched if asked."""
    from crit.hessian import full_batch_hvp_operator, hvp_operator

    if cfg.hvp_batch_size:
        return full_batch_hvp_operator(_bound_batch_loss(problem, state), params,
                                       jnp.asarray(problem.dataset.x_train),
                                       jnp.asarray(problem.dataset.y_train), cfg.hvp_batch_size)
    return hvp_operator(problem.bind_state(state), params)


KRYLOV_K = 5  # Ritz pairs per end: reported, Rayleigh-checked, deflated


def krylov_kwargs(cfg: ProtocolConfig) -> dict:
    """The :func:`crit.krylov.krylov_spectrum` options of a protocol."""
    return dict(num_steps=cfg.lanczos_steps, num_probes=cfg.slq_probes,
                k=min(KRYLOV_K, cfg.lanczos_steps), tol=cfg.eig_tol, tol_mode=cfg.krylov_tol,
                deflate=cfg.deflate, resolve_width=cfg.resolve_width,
                resolve_ceiling=cfg.resolve_ceiling, target_width=cfg.resolve_width, target_rel_tol=cfg.target_rel_tol,
                max_steps=cfg.probe_max_steps or None)


def analyze_init_krylov(problem: Problem, cfg: ProtocolConfig, init_id) -> KrylovInitRecord:
    """The protocol with HVPs only: Newton-MR (or gradient-norm descent), then Lanczos + SLQ."""
    from crit.krylov import krylov_spectrum
    from crit.newton_mr import newton_mr_critical_point

    params, state, log = train_init_with_state(problem, cfg, init_id)
    loss_fn = problem.bind_state(state)
    if cfg.finder == "newton":
        found = newton_mr_critical_point(loss_fn, params, max_iters=cfg.finder_steps,
                                         minres_iters=cfg.minres_iters, grad_tol=cfg.grad_tol,
                                         hvp_batch=_hvp_batch(problem, cfg, state))
    else:
        found = find_critical_point(loss_fn, params, cfg.finder, cfg.grad_tol,
                                    **finder_kwargs(cfg))
    _, matvec = hessian_operator(problem, cfg, found.params, state)
    key = jax.random.fold_in(init_key(cfg.seed, init_id), 1)
    search = None
    if cfg.hvp_dtype == "float64":
        spec = krylov_spectrum(matvec, key, problem.n_params, **krylov_kwargs(cfg))
    else:  # search in low precision; Ritz pairs, the verdict's y'Hy and residuals in float64
        search = search_hessian_operator(problem, cfg, found.params, state)
        spec = krylov_spectrum(search, key, problem.n_params, check_matvec=matvec,
                               **krylov_kwargs(cfg))
    norm = jnp.maximum(jnp.abs(spec.lambda_min), jnp.abs(spec.lambda_max))
    cert = certify(loss_fn, found.params, norm, cfg.grad_tol, cfg.flat_tol)
    margin = nearby_margin(loss_fn, found.params, spec.escape_direction,
                           minres_iters=cfg.minres_iters,
                           hvp_batch=_hvp_batch(problem, cfg, state), step_matvec=search)
    verdict = critical_point_verdict(with_criticality(spec.verdict, cert.status == CRITICAL),
                                     margin)
    return KrylovInitRecord(
        init_id=jnp.asarray(init_id), status=cert.status, loss=cert.loss,
        grad_norm=cert.grad_norm, flatness=cert.flatness,
        train_loss=log.loss[-1].astype(jnp.float64),
        train_grad_norm=log.grad_norm[-1].astype(jnp.float64),
        finder_iterations=found.iterations, min_ratio=spec.min_ratio, min_ratio_lo=spec.min_ratio_lo,
        min_ratio_hi=spec.min_ratio_hi, index=spec.index, index_lo=spec.index_lo,
        index_hi=spec.index_hi, null_fraction=spec.null_fraction,
        null_fraction_lo=spec.null_fraction_lo, null_fraction_hi=spec.null_fraction_hi,
        lambda_min=spec.lambda_min, lambda_max=spec.lambda_max,
        lambda_min_converged=spec.lambda_min_converged,
        lambda_max_converged=spec.lambda_max_converged, tolerance=spec.tolerance,
        tolerance_rel=spec.tolerance_rel, resolved=spec.resolved, verdict=verdict.code,
        negative_proven=verdict.negative_proven, lambda_min_bound=verdict.lambda_min_bound,
        verdict_margin=margin.margin, curvature_ratio=margin.ratio,
        ritz_min_residual=verdict.ritz_residual,
        negative_excluded_below=verdict.excluded_below, num_deflated=spec.num_deflated,
        num_matvecs=spec.num_matvecs, ritz_largest=spec.largest, ritz_smallest=spec.smallest,
        slq_nodes=spec.nodes, slq_weights=spec.weights,
        grid_min_ratio=spec.grid_fractions.positive.mean,
        grid_min_ratio_lo=spec.grid_fractions.positive.lo,
        grid_min_ratio_hi=spec.grid_fractions.positive.hi,
        search_error=jnp.asarray(spec.search_error, jnp.float64),
        num_check_matvecs=spec.num_check_matvecs,
        grid_width=jnp.maximum(spec.grid_fractions.positive.hi - spec.grid_fractions.positive.lo,
                               spec.grid_fractions.negative.hi - spec.grid_fractions.negative.lo),
        curve_loss=log.loss.astype(jnp.float64),
        curve_grad_norm=log.grad_norm.astype(jnp.float64), finder_history=found.history)


def make_chunk_fn(problem: Problem, cfg: ProtocolConfig, mesh=None):
    """``ids (c,) -> InitRecord`` with a leading chunk axis.

    Each device runs ``lax.map(analyze_init, ids, batch_size=cfg.vmap_width)`` on its share of
    the chunk: groups of ``vmap_width`` inits are vmapped, groups run one after another. Every
    group is the same XLA program whatever the chunk size or device count, so the results of
    init i are the same **bit for bit** for any chunk size that is a multiple of
    ``vmap_width × devices`` (XLA may round a batched op differently at another batch width,
    and the Newton finder amplifies a last-bit difference into a different end point: measured
    on the homework workload, eigenvalues moved by up to 0.47 between vmap widths 10 and 100).
    A per-device share smaller than ``vmap_width`` is vmapped whole.

    With a ``mesh`` (see :mod:`crit.parallel`) the chunk is split over its devices with
    ``shard_map``; the chunk size must then be a multiple of the mesh size.
    """
    n_dev = 1 if mesh is None else mesh.size

    def local(ids):
        width = max(1, min(cfg.vmap_width, ids.shape[0]))
        return jax.lax.map(lambda i: analyze_init(problem, cfg, i), ids, batch_size=width)

    if n_dev > 1:
        from crit.parallel import shard_inits

        return shard_inits(local, mesh)
    return jax.jit(local)


def run_chunk(chunk_fn, init_ids: np.ndarray, chunk_size: int) -> dict[str, np.ndarray]:
    """Evaluate ``init_ids`` padded to ``chunk_size`` (one compiled shape); drop the padding.

    Padding repeats the last id, so it never adds work of a new kind, and its rows are cut off
    before anything is returned.
    """
    n = len(init_ids)
    if n == 0 or n > chunk_size:
        raise ValueError(f"a chunk holds 1..{chunk_size} inits, got {n}")
    padded = np.concatenate([init_ids, np.full(chunk_size - n, init_ids[-1])]).astype(np.int32)
    record = jax.device_get(chunk_fn(jnp.asarray(padded)))
    return {k: np.asarray(v)[:n] for k, v in record._asdict().items()}


def forward_floats_per_example(problem: Problem) -> int:
    """Numbers the model's forward pass produces for one example: the sum of the sizes of every
    intermediate in its jaxpr (nested ones included). An upper bound on the activations one
    example keeps alive, for any architecture (dense, conv, attention, BatchNorm)."""
    params = jax.eval_shape(problem.init_fn, jax.random.key(0))
    example = jax.ShapeDtypeStruct((1, *problem.dataset.x_train.shape[1:]),
                                   problem.dataset.x_train.dtype)
    closed = jax.make_jaxpr(lambda p, x: problem.apply_fn(p, x))(params, example)

    def count(jaxpr) -> int:
        total = 0
        for eqn in jaxpr.eqns:
            total += sum(int(np.prod(v.aval.shape)) for v in eqn.outvars
                         if hasattr(v.aval, "shape"))
            for value in eqn.params.values():
                inner = getattr(value, "jaxpr", value)
                if hasattr(inner, "eqns"):
                    total += count(inner)
        return total

    return max(count(closed.jaxpr), 16)


def estimate_bytes_per_init(problem: Problem, cfg: ProtocolConfig | None = None) -> int:
    """Rough peak memory of one init in :func:`analyze_init`, dominated by the dense Hessian.

    ``dense_hessian`` pushes t = min(P, default_hessian_block()) tangents through the forward
    and backward pass at once: about t × rows × a × 8 bytes, with a the forward pass's
    intermediates per example (:func:`forward_floats_per_example`) and rows the examples of one
    evaluation batch (``problem.eval_batch_size``, else all n), plus the P×P Hessian and its
    eigendecomposition workspace. (Measured with XLA's memory analysis on the homework net,
    P = 321, n = 256, with blocks of 64 columns: 10.7 MB per init; this estimate says 26 MB.)
    """
    p = problem.n_params
    n = problem.dataset.n_train
    rows = min(n, problem.eval_batch_size) if problem.eval_batch_size else n
    act = forward_floats_per_example(problem)
    if cfg is not None and cfg.hessian == "lanczos":
        # Lanczos bases of all runs plus the activations of a few HVPs
        if cfg.hvp_batch_size:
            rows = min(rows, cfg.hvp_batch_size)
        steps = max(cfg.lanczos_steps, cfg.probe_max_steps)
        return int(8 * ((cfg.slq_probes * steps + 3 * cfg.lanczos_steps) * p
                        + 3 * rows * act + 12 * p))
    from crit.hessian import default_hessian_block

    tangents = min(p, default_hessian_block())  # dense_hessian pushes this many columns at once
    return int(8 * (tangents * rows * act + 6 * p * p))


def estimate_bytes_per_record(problem: Problem, cfg: ProtocolConfig) -> int:
    """Bytes of one init's results as the chunk returns them (raw eigenvalues or SLQ nodes and
    weights and the sign-fraction grid, curves, finder history and ~30 scalars), in float64."""
    curves = 2 * (cfg.train_steps // max(cfg.log_every, 1) + 1) + cfg.finder_steps + 1
    if cfg.hessian == "lanczos":
        steps = max(cfg.lanczos_steps, cfg.probe_max_steps)
        from crit.krylov import REL_TOL_GRID

        spectrum = 2 * cfg.slq_probes * steps + 2 * cfg.lanczos_steps + 4 * len(REL_TOL_GRID)
    else:
        spectrum = problem.n_params
    return int(8 * (spectrum + curves + 32))


class MemoryPlanError(ValueError):
    """The run cannot fit the device's memory as asked; the message names the flag that helps."""


class MemoryPlan(NamedTuple):
    """How a chunked run uses one device's memory (all sizes in bytes, per device).

    Inside a chunk, ``lax.map`` runs groups of ``vmap_width`` vmapped inits one after another,
    so the working set follows the width, not the chunk: peak ≈ width × bytes_per_init +
    (chunk / devices) × bytes_per_record (the chunk's results).
    """

    vmap_width: int
    chunk_size: int
    bytes_per_init: int
    bytes_per_record: int
    peak_bytes: int
    budget_bytes: int


def plan_vmap_width(bytes_per_init: int, capacity_bytes: int, num_inits: int,
                    requested: int = 0, default: int = 10, too_big_hint: str = "") -> int:
    """The vmap width: ``requested`` if given, else the largest width up to ``min(default,
    num_inits)`` whose working set fits half the device's *capacity* (its total memory, not
    what is free now: the width is part of a run's fingerprint, so it must not follow the
    memory other jobs happen to hold; every process of a run on the same kind of device
    resolves the same width). Raises :class:`MemoryPlanError` when not even one init fits,
    naming ``too_big_hint``.
    """
    if requested:
        return int(requested)
    if bytes_per_init > capacity_bytes:
        raise MemoryPlanError(
            f"one init needs about {bytes_per_init / 2**30:.2f} GiB but the device has "
            f"{capacity_bytes / 2**30:.2f} GiB{'; ' + too_big_hint if too_big_hint else ''}")
    fits = max(1, int(capacity_bytes // 2 // max(bytes_per_init, 1)))
    return int(max(1, min(default, num_inits, fits)))


def plan_memory(bytes_per_init: int, bytes_per_record: int, num_inits: int, n_devices: int,
                free_bytes: int, vmap_width: int, chunk_size: int = 0, max_chunk: int = 128,
                min_chunks: int = 4, too_big_hint: str = "") -> MemoryPlan:
    """Check a vmap width against the memory free on a device and choose the chunk size.

    ``chunk_size = 0`` picks the largest chunk (a multiple of width × devices, at most
    ``max_chunk`` per device, and at least ``min_chunks`` chunks when there is enough work,
    so results are saved as they come) whose results fit next to the working set; a given
    ``chunk_size`` is rounded up to that multiple and checked. Raises
    :class:`MemoryPlanError` naming ``--vmap_width`` (the working set), ``--chunk_size`` (the
    results) or ``too_big_hint`` (one init alone does not fit), before any compute.
    """
    budget = int(free_bytes)
    group = vmap_width * n_devices
    working = vmap_width * bytes_per_init
    if bytes_per_init > budget:
        raise MemoryPlanError(
            f"one init needs about {bytes_per_init / 2**30:.2f} GiB but {budget / 2**30:.2f} GiB "
            f"is free on the device{'; ' + too_big_hint if too_big_hint else ''}")
    if working > budget:
        fits = max(1, budget // bytes_per_init)
        raise MemoryPlanError(
            f"--vmap_width={vmap_width}: a group of {vmap_width} inits needs about "
            f"{working / 2**30:.2f} GiB but {budget / 2**30:.2f} GiB is free on the device; "
            f"use --vmap_width={fits} or less (or free memory / raise --memory_gb)")
    room = (budget - working) // max(bytes_per_record, 1) * n_devices  # results that fit
    if chunk_size:
        chunk = -(-chunk_size // group) * group
        if chunk // n_devices * bytes_per_record + working > budget:
            raise MemoryPlanError(
                f"--chunk_size={chunk_size}: the results of a chunk need about "
                f"{chunk // n_devices * bytes_per_record / 2**30:.2f} GiB per device next to "
                f"{working / 2**30:.2f} GiB of working set, {budget / 2**30:.2f} GiB is free; "
                f"lower --chunk_size (0 chooses)")
    else:
        chunk = min(max_chunk * n_devices, room, max(group, -(-num_inits // min_chunks)))
        chunk = balanced_chunk_size(num_inits, max(chunk, group), group)
        if chunk // n_devices * bytes_per_record + working > budget:
            raise MemoryPlanError(
                f"the results of one group of {group} inits do not fit next to the working set "
                f"({budget / 2**30:.2f} GiB free); lower --vmap_width")
    peak = working + chunk // n_devices * bytes_per_record
    return MemoryPlan(int(vmap_width), int(chunk), int(bytes_per_init), int(bytes_per_record),
                      int(peak), budget)


def auto_chunk_size(problem: Problem, num_inits: int, memory_budget: float | None = None,
                    max_chunk: int | None = None, cfg: ProtocolConfig | None = None) -> int:
    """Largest chunk within ``memory_budget`` bytes (default: a quarter of the memory free on the
    first local device, at most 4 GiB), capped by ``num_inits`` and ``max_chunk``, at least 1.

    ``max_chunk`` defaults to 128 on CPU and 1024 on accelerators. On CPU a bigger chunk stops
    paying once its activations leave the cache: on the homework workload (2 cores, 2026-11-24)
    500 Adam steps cost 37, 22, 17, 29 and 38 ms per init at 10, 50, 100, 400 and 1000 inits
    per chunk. A smaller cap also saves results sooner.
    """
    if max_chunk is None:
        max_chunk = 128 if jax.default_backend() == "cpu" else 1024
    if memory_budget is None:
        from crit.parallel import available_memory_bytes

        memory_budget = min(available_memory_bytes() / 4, 4 * 2**30)
    per_init = estimate_bytes_per_init(problem, cfg)
    return int(max(1, min(num_inits, max_chunk, memory_budget // per_init)))


def balanced_chunk_size(num_inits: int, max_chunk: int, multiple: int = 1) -> int:
    """The smallest chunk, a multiple of ``multiple``, that needs as few chunks as ``max_chunk``.

    Every chunk is padded to one compiled shape, so 100 inits with room for 46 per chunk run as
    3 chunks of 34 (102 computed), not 46 + 46 + 8 padded to 3 × 46 (138 computed).
    """
    if num_inits < 1 or max_chunk < 1 or multiple < 1:
        raise ValueError(f"need positive sizes, got num_inits={num_inits}, "
                         f"max_chunk={max_chunk}, multiple={multiple}")
    max_chunk = max(multiple, min(max_chunk // multiple * multiple,
                                  -(-num_inits // multiple) * multiple))
    n_chunks = -(-num_inits // max_chunk)
    per_chunk = -(-num_inits // n_chunks)
    return -(-per_chunk // multiple) * multiple


def common_tolerance_columns(records: dict, resolve_width: float, resolve_ceiling: float,
                             per_point: bool = True) -> dict:
    r"""The min ratio of every init at one common relative :math:`\tau`, for pooled summaries.

    With ``krylov_tol="resolved"`` each init's fractions sit at its own finest resolved
    :math:`\tau`; quantiles, Spearman's :math:`\rho` and figures over inits must not mix
    scales. This reads each init's fractions on the :data:`crit.krylov.REL_TOL_GRID` grid
    (``grid_*`` fields of :class:`KrylovInitRecord`) at
    :func:`crit.krylov.common_tolerance_index` and returns ``tolerance_common_rel`` (the same
    for every row), ``min_ratio_common`` with ``_lo``/``_hi``, and ``resolved_common`` (the
    intervals there at most ``resolve_width`` wide, the τ under ``resolve_ceiling``).
    ``per_point=False`` (a given ``--eig_tol``, or ``krylov_tol="machine"``: τ/max|θ| already
    common) returns the per-point columns under the common names.
    """
    from crit.krylov import REL_TOL_GRID, common_tolerance_index

    n = len(records["min_ratio"])
    if not per_point:
        return {"tolerance_common_rel": np.asarray(records["tolerance_rel"], float),
                "min_ratio_common": records["min_ratio"],
                "min_ratio_common_lo": records["min_ratio_lo"],
                "min_ratio_common_hi": records["min_ratio_hi"],
                "resolved_common": np.asarray(records["resolved"], bool)}
    g = common_tolerance_index(records["tolerance_rel"], records["resolved"], resolve_ceiling)
    rel = REL_TOL_GRID[g]
    width = np.asarray(records["grid_width"])[:, g]
    return {"tolerance_common_rel": np.full(n, rel),
            "min_ratio_common": np.asarray(records["grid_min_ratio"])[:, g],
            "min_ratio_common_lo": np.asarray(records["grid_min_ratio_lo"])[:, g],
            "min_ratio_common_hi": np.asarray(records["grid_min_ratio_hi"])[:, g],
            "resolved_common": (width <= resolve_width) & (rel <= resolve_ceiling * (1 + 1e-9))}
