r"""Lanczos tridiagonalization and extremal eigenpairs of symmetric operators, matrix-free.

Everything here takes a ``matvec``: a pure function mapping a flat float64 vector of
length :math:`n` to :math:`Av` for a symmetric :math:`A` (for crit, a Hessian-vector
product). The step count is a static integer and the iteration runs in
:func:`jax.lax.scan`, so every function composes with :func:`jax.jit` and
:func:`jax.vmap` (one analysis per model, per probe, per initialization).

Defaults and why
----------------
- Full reorthogonalization is on. Plain Lanczos loses orthogonality as soon as a Ritz value
  converges and then produces spurious copies ("ghosts") of converged eigenvalues (Paige
  1971; Parlett 1998, ch. 13). Classical Gram-Schmidt against the stored basis, done twice
  ("twice is enough", Giraud et al. 2005), keeps the basis orthonormal to machine precision
  for :math:`O(mn)` extra flops per step, cheap next to a Hessian-vector product.
- All coefficients are float64: Ritz values near zero (the Hessian's null directions) are
  only meaningful to :math:`\epsilon \lVert A \rVert`.
- Breakdown (an invariant subspace is found, :math:`\beta_j \approx 0`) is handled by
  masking, not by Python control flow; see :func:`lanczos_tridiag`.

References
----------
- C. Lanczos (1950). An iteration method for the solution of the eigenvalue problem of
  linear differential and integral operators. J. Res. Nat. Bur. Standards 45.
- B. N. Parlett (1998). The Symmetric Eigenvalue Problem. SIAM.
- G. H. Golub and C. F. Van Loan (2013). Matrix Computations, 4th ed., sec. 10.1-10.3.
- L. Giraud, J. Langou, M. Rozloznik (2005). The loss of orthogonality in the Gram-Schmidt
  orthogonalization process. Comput. Math. Appl. 50.
"""

from typing import Callable, NamedTuple, Optional, Tuple

import jax
import jax.numpy as jnp

Array = jax.Array
Matvec = Callable[[Array], Array]

#: Default relative breakdown tolerance: step j breaks down when
#: ``beta_j <= BREAKDOWN_TOL * max_{i<=j} ||A q_i||``.
BREAKDOWN_TOL = 1e-10


class LanczosResult(NamedTuple):
    """Output of :func:`lanczos_tridiag` for ``m = num_steps`` and vectors of length ``n``."""

    alphas: Array
    """(m,) Diagonal of the tridiagonal :math:`T`; zero after breakdown."""
    betas: Array
    r"""(m,) ``betas[j]`` is :math:`\beta_j = \lVert r_j \rVert`, the norm of the residual
    after step j. ``betas[:k-1]`` are the off-diagonal of :math:`T_k`, ``betas[k-1]`` is the
    final residual norm (``k = num_valid``); zero after breakdown."""
    basis: Optional[Array]
    """(m, n) Lanczos vectors as rows (``Q_m^T``); zero rows after breakdown. ``None`` if not
    requested and not needed."""
    residual: Array
    """(n,) Residual :math:`r` of the last valid step (``betas[num_valid-1] = |r|``)."""
    valid: Array
    """(m,) bool, True for steps taken before breakdown (a prefix)."""
    num_valid: Array
    """() int, number of valid steps ``k``; ``k < m`` means an invariant subspace was found."""


def lanczos_tridiag(
    matvec: Matvec,
    v0: Array,
    num_steps: int,
    *,
    reorthogonalize: bool = True,
    return_basis: bool = True,
    breakdown_tol: float = BREAKDOWN_TOL,
) -> LanczosResult:
    r"""Run ``num_steps`` steps of symmetric Lanczos from ``v0``.

    Builds an orthonormal basis :math:`Q_k = [q_0, \dots, q_{k-1}]` of the Krylov space
    :math:`\mathcal{K}_k(A, v_0)` and the tridiagonal :math:`T_k = Q_k^\top A Q_k` with
    diagonal :math:`\alpha` and off-diagonal :math:`\beta_0, \dots, \beta_{k-2}`, such that

    .. math:: A Q_k = Q_k T_k + r\, e_k^\top, \qquad \lVert r \rVert = \beta_{k-1},
              \qquad Q_k^\top r = 0.

    Step j computes :math:`w = A q_j - \alpha_j q_j - \beta_{j-1} q_{j-1}` with
    :math:`\alpha_j = q_j^\top A q_j`, removes :math:`Q_{j+1} Q_{j+1}^\top w` twice (classical
    Gram-Schmidt, twice) if ``reorthogonalize``, sets :math:`\beta_j = \lVert w \rVert` and
    :math:`q_{j+1} = w / \beta_j`.

    Parameters
    ----------
    matvec
        Symmetric linear map ``v -> A v`` on flat float64 vectors. Must map zero to zero (any
        linear map does): it is still called, on zeros, after breakdown.
    v0
        (n,) Nonzero starting vector; normalized internally. Use a random vector: Lanczos
        never sees eigenvectors orthogonal to ``v0``.
    num_steps
        Static number of steps ``m`` (= number of matvecs). At most ``n`` is meaningful.
    reorthogonalize
        Full reorthogonalization (default). Off reproduces textbook Lanczos, with ghosts.
    return_basis
        Return the (m, n) basis. With ``reorthogonalize`` the basis is kept internally either
        way; set False to save the output copy (e.g. under ``vmap`` for SLQ).
    breakdown_tol
        Step j is a breakdown if :math:`\beta_j \le` ``breakdown_tol`` :math:`\cdot
        \max_{i \le j} \lVert A q_i \rVert` (a running estimate of :math:`\lVert A \rVert`).

    Returns
    -------
    LanczosResult
        With ``k = num_valid``. No breakdown: ``k = m``. Breakdown at step j (``k = j + 1``):
        ``alphas[:k]``, ``betas[:k]`` (``betas[k-1]`` is the tiny final residual norm, kept
        as a diagnostic), ``basis[:k]`` and ``residual`` are as above; for every later step
        ``alphas = betas = 0``, the basis rows are zero and ``valid`` is False. The padded
        :math:`T_m` is then block-diagonal, :math:`\mathrm{diag}(T_k, 0)`, so its extra
        eigenvalues are exact zeros with eigenvectors supported on the invalid steps (first
        component 0, hence zero quadrature weight). Use :func:`tridiag_eigh` with ``valid``
        to separate them; the Ritz values of :math:`T_k` are then eigenvalues of :math:`A`
        to within :math:`\beta_{k-1}`, each distinct eigenvalue seen by ``v0`` once.

    Notes
    -----
    In floating point an exact breakdown shows up as a small but nonzero
    :math:`\beta`: measured here with ``d`` well-separated distinct eigenvalues,
    :math:`\beta_{d-1}/\lVert A \rVert` grows from ~1e-14 (d = 8) to ~1e-9 (d = 24),
    because rounding errors are amplified by the Krylov polynomial; the default tolerance
    masks such cases up to d of about 20. A :math:`\beta` above ``breakdown_tol`` is not
    masked: :math:`q_{j+1}` is then the normalized rounding noise,
    orthogonal to the basis after reorthogonalization, and the iteration continues as a
    restart in the orthogonal complement. Nothing breaks: the basis stays orthonormal, the
    Lanczos relation holds, Ritz values stay Rayleigh-Ritz values of :math:`A` (new copies
    of an eigenvalue appear only if it is multiple), and the restarted block enters the
    quadrature weights only through the coupling :math:`\beta`. Without
    reorthogonalization that noise is not removed and ghosts follow.
    """
    state = lanczos_start(v0, num_steps, keep_basis=reorthogonalize or return_basis)
    state = lanczos_advance(matvec, state, num_steps, reorthogonalize=reorthogonalize,
                            breakdown_tol=breakdown_tol)
    return lanczos_result(state, return_basis=return_basis)


class LanczosState(NamedTuple):
    """A Lanczos run that can be continued: :func:`lanczos_start`, then
    :func:`lanczos_advance` as often as wanted (up to ``max_steps`` in all), then
    :func:`lanczos_result` or :func:`lanczos_prefix` for the tridiagonal so far."""

    q: Array
    """(n,) The next Lanczos vector q_j."""
    q_prev: Array
    beta_prev: Array
    basis: Optional[Array]
    """(max_steps, n) Lanczos vectors as rows; zero past ``steps`` (None without a basis)."""
    residual: Array
    active: Array
    """bool, no breakdown yet."""
    scale: Array
    """Running max of ||A q_i||."""
    alphas: Array
    """(max_steps,) zero past ``steps`` and after a breakdown."""
    betas: Array
    valid: Array
    """(max_steps,) bool, steps taken before breakdown."""
    steps: Array
    """() int, steps taken so far (matvecs spent)."""


def lanczos_start(v0: Array, max_steps: int, *, keep_basis: bool = True) -> LanczosState:
    """The state before the first step from ``v0`` (normalized here), room for ``max_steps``."""
    v0 = jnp.asarray(v0, dtype=jnp.float64)
    (n,) = v0.shape
    zeros = jnp.zeros_like(v0)
    return LanczosState(
        q=v0 / jnp.linalg.norm(v0), q_prev=zeros, beta_prev=jnp.zeros(()),
        basis=jnp.zeros((max_steps, n)) if keep_basis else None, residual=zeros,
        active=jnp.ones((), dtype=bool), scale=jnp.zeros(()),
        alphas=jnp.zeros(max_steps), betas=jnp.zeros(max_steps),
        valid=jnp.zeros(max_steps, dtype=bool), steps=jnp.zeros((), dtype=jnp.int32))


def lanczos_advance(matvec: Matvec, state: LanczosState, num_steps: int, *,
                    reorthogonalize: bool = True,
                    breakdown_tol: float = BREAKDOWN_TOL) -> LanczosState:
    """``num_steps`` (static) more Lanczos steps; see :func:`lanczos_tridiag` for one step.

    Continuing is exact: ``advance(advance(start, a), b)`` equals ``advance(start, a + b)``
    (same operations in the same order), so a run can stop once an answer is sharp enough
    and resume otherwise. Steps past the state's ``max_steps`` are refused by shape.
    """
    keep_basis = state.basis is not None
    if reorthogonalize and not keep_basis:
        raise ValueError("reorthogonalization needs the basis: lanczos_start(keep_basis=True)")

    def step(carry, _):
        (q, q_prev, beta_prev, basis, residual, active, scale, alphas, betas, valid,
         j) = carry
        if keep_basis:
            basis = basis.at[j].set(q)
        aq = matvec(q)
        alpha = jnp.dot(q, aq)
        w = aq - alpha * q - beta_prev * q_prev
        if reorthogonalize:
            # Rows of basis past j are zero, so this projects onto span(q_0..q_j).
            w = w - basis.T @ (basis @ w)
            w = w - basis.T @ (basis @ w)
        beta = jnp.linalg.norm(w)
        scale = jnp.maximum(scale, jnp.linalg.norm(aq))
        go_on = active & (beta > breakdown_tol * scale)
        q_next = jnp.where(go_on, w / jnp.where(go_on, beta, 1.0), 0.0)
        residual = jnp.where(active, w, residual)
        alphas = alphas.at[j].set(jnp.where(active, alpha, 0.0))
        betas = betas.at[j].set(jnp.where(active, beta, 0.0))
        valid = valid.at[j].set(active)
        return (q_next, q, jnp.where(go_on, beta, 0.0), basis, residual, go_on, scale,
                alphas, betas, valid, j + 1), None

    carry, _ = jax.lax.scan(step, tuple(state), None, length=num_steps)
    return LanczosState(*carry)


def lanczos_result(state: LanczosState, *, return_basis: bool = True) -> LanczosResult:
    """The :class:`LanczosResult` of a (possibly continued) run of ``max_steps`` steps."""
    return LanczosResult(state.alphas, state.betas, state.basis if return_basis else None,
                         state.residual, state.valid, jnp.sum(state.valid))


def tridiag_eigh(
    alphas: Array, betas: Array, valid: Optional[Array] = None
) -> Tuple[Array, Array]:
    r"""Eigen-decomposition of the Lanczos tridiagonal, ignoring steps after breakdown.

    Forms the dense :math:`m \times m` matrix with diagonal ``alphas`` and off-diagonal
    ``betas[:-1]`` (``betas[-1]`` is the residual norm, not part of :math:`T`) and calls
    :func:`jax.numpy.linalg.eigh` (cheap for :math:`m \lesssim 10^3`).

    Parameters
    ----------
    alphas, betas
        (m,) As in :class:`LanczosResult`.
    valid
        (m,) bool prefix mask (``LanczosResult.valid``); default all True.

    Returns
    -------
    values
        (m,) The ``k = sum(valid)`` Ritz values of :math:`T_k`, ascending, in ``values[:k]``;
        ``values[k:] = 0``.
    vectors
        (m, m) Orthonormal eigenvectors as columns, ``vectors[:, i]`` for ``values[i]``; for
        ``i < k`` they vanish on the invalid steps, for ``i >= k`` they are supported there.

    Notes
    -----
    Invalid steps are decoupled and their diagonal set to :math:`2 g + \text{tiny}`, with
    :math:`g = \max|\alpha| + 2\max|\beta|` a Gershgorin bound, so they sort after every
    valid Ritz value and never mix with a valid eigenvalue (a valid Ritz value at 0 would
    otherwise be degenerate with the padding).
    """
    m = alphas.shape[-1]
    valid = jnp.ones(m, dtype=bool) if valid is None else valid
    alphas = jnp.where(valid, alphas, 0.0)
    off = jnp.where(valid[1:], betas[:-1], 0.0)
    bound = jnp.max(jnp.abs(alphas)) + 2.0 * jnp.max(jnp.abs(off), initial=0.0)
    sentinel = 2.0 * bound + jnp.finfo(alphas.dtype).tiny
    dense = jnp.diag(jnp.where(valid, alphas, sentinel)) + jnp.diag(off, 1) + jnp.diag(off, -1)
    values, vectors = jnp.linalg.eigh(dense)
    return jnp.where(valid, values, 0.0), vectors


class RitzPairs(NamedTuple):
    """``k`` Ritz pairs from one end of the spectrum (see :func:`extremal_eigenpairs`)."""

    values: Array
    """(k,) Ritz values, outermost first (largest-first or smallest-first). NaN if invalid."""
    vectors: Array
    """(k, n) Unit Ritz vectors :math:`y = Q_k s` as rows; zero if invalid."""
    residual_estimates: Array
    r"""(k,) :math:`|\beta_{k-1} s_{k-1}|` = :math:`\lVert A y - \theta y \rVert` in exact
    arithmetic, free of matvecs."""
    residuals: Array
    r"""(k,) True :math:`\lVert A y - \theta y \rVert` if requested, else NaN."""
    converged: Array
    """(k,) bool, residual (true if computed, else estimate) <= ``tol * max|theta|``."""
    valid: Array
    """(k,) bool, False where the Krylov space had fewer than k Ritz values (breakdown)."""


class ExtremalEigenpairs(NamedTuple):
    """Output of :func:`extremal_eigenpairs`."""

    largest: RitzPairs
    """The k algebraically largest Ritz pairs, descending."""
    smallest: RitzPairs
    """The k algebraically smallest (most negative) Ritz pairs, ascending."""
    tol: Array
    """Relative convergence tolerance used for ``converged``."""
    num_matvecs: int
    """Matvecs spent: ``num_steps`` (+ ``2 k`` with ``true_residuals``)."""
    num_valid: Array
    """Lanczos steps before breakdown (``num_steps`` if none)."""


def extremal_eigenpairs(
    matvec: Matvec,
    v0: Array,
    num_steps: int,
    k: int,
    *,
    tol: float = 1e-8,
    true_residuals: bool = False,
    reorthogonalize: bool = True,
) -> ExtremalEigenpairs:
    r"""Both ends of the spectrum from one Lanczos run: k largest and k smallest Ritz pairs.

    Parameters
    ----------
    matvec, v0, num_steps, reorthogonalize
        As in :func:`lanczos_tridiag`.
    k
        Static number of Ritz pairs per end, ``k <= num_steps``. The two ends overlap when
        ``2 k`` exceeds the number of valid Ritz values.
    tol
        A pair is ``converged`` when its residual is at most ``tol`` times the largest
        :math:`|\theta|` (an estimate of :math:`\lVert A \rVert`).
    true_residuals
        Also compute :math:`\lVert A y - \theta y \rVert` with ``2 k`` extra matvecs; this
        checks the estimate, which can be optimistic if orthogonality was lost.

    Returns
    -------
    ExtremalEigenpairs

    Notes
    -----
    For a Ritz pair :math:`(\theta, y)` with residual :math:`\rho = \lVert Ay - \theta y
    \rVert`, :math:`A` has an eigenvalue within :math:`\rho` of :math:`\theta`, and within
    :math:`\rho^2/\delta` if no other eigenvalue lies within :math:`\delta` (Kato-Temple;
    Parlett 1998, ch. 11). In exact arithmetic :math:`\rho = |\beta_{k-1} s_{k-1}|`, the
    last component of the eigenvector :math:`s` of :math:`T_k` (Paige 1971). Extremal Ritz
    values are monotone in the step count (Cauchy interlacing) and converge first, at a rate
    set by the gap to the rest of the spectrum relative to its width (Kaniel-Paige-Saad).
    The most negative eigenvalues come out of the same run as the largest; power iteration
    only finds the one of largest magnitude.
    """
    if not 1 <= k <= num_steps:
        raise ValueError(f"need 1 <= k <= num_steps, got k={k}, num_steps={num_steps}")
    res = lanczos_tridiag(matvec, v0, num_steps, reorthogonalize=reorthogonalize)
    values, vectors = tridiag_eigh(res.alphas, res.betas, res.valid)
    nv = res.num_valid
    estimates = jnp.abs(res.betas[nv - 1] * vectors[nv - 1, :])
    scale = jnp.max(jnp.abs(values))

    def pick(idx, ok):
        idx = jnp.clip(idx, 0, num_steps - 1)
        theta = jnp.where(ok, values[idx], jnp.nan)
        ys = jnp.where(ok[:, None], vectors[:, idx].T @ res.basis, 0.0)
        est = jnp.where(ok, estimates[idx], jnp.nan)
        if true_residuals:
            ay = jax.vmap(matvec)(ys)
            resid = jnp.linalg.norm(ay - jnp.nan_to_num(theta)[:, None] * ys, axis=1)
            resid = jnp.where(ok, resid, jnp.nan)
        else:
            resid = jnp.full((k,), jnp.nan)
        check = resid if true_residuals else est
        converged = ok & (check <= tol * scale)
        return RitzPairs(theta, ys, est, resid, converged, ok)

    i = jnp.arange(k)
    largest = pick(nv - 1 - i, nv - 1 - i >= 0)
    smallest = pick(i, i < nv)
    num_matvecs = num_steps + (2 * k if true_residuals else 0)
    return ExtremalEigenpairs(largest, smallest, jnp.asarray(tol), num_matvecs, nv)
