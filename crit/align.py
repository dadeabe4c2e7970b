r"""Permutation alignment of MLPs by weight matching (Ainsworth, Hayase & Srinivasa 2023).

Permuting the hidden units of a layer -- columns of its kernel and entries of its bias, and the
matching rows of the next layer's kernel -- leaves the network's function unchanged. Two
solutions from different inits may be the "same" minimum up to such a permutation, and the
barrier on the straight line between them is then an artefact (Entezari et al. 2022).

**Weight matching.** With layers y_l = σ(y_{l−1} K_l + b_l) (Flax ``Dense``: kernel (in, out)),
permutations π_l of the hidden layers l = 1..L−1 of network B are chosen to maximize
:math:`\sum_l \langle K_l^A, K_l^{B'}\rangle + \langle b_l^A, b_l^{B'}\rangle`, where
:math:`K_l^{B'} = K_l^B[\pi_{l-1}, \pi_l]` and :math:`b_l^{B'} = b_l^B[\pi_l]`. Since
‖θ_{B'}‖ = ‖θ_B‖, this is the same as minimizing ‖θ_A − θ_{B'}‖². Holding the other layers'
permutations fixed, π_l solves the linear assignment problem

.. math:: \max_{\pi} \sum_j S_l[j, \pi(j)], \qquad
          S_l = K_l^{A\top} K_l^B[\pi_{l-1}, :] + b_l^A b_l^{B\top}
                + K_{l+1}^A K_{l+1}^B[:, \pi_{l+1}]^\top,

solved exactly (``scipy.optimize.linear_sum_assignment`` when SciPy is installed, else
:func:`hungarian`). Layers are visited in a seeded random order and the sweep repeats until no
layer's objective improves (coordinate ascent; Ainsworth et al. 2023, Alg. 1). Every step keeps
the current permutation feasible, so the objective never decreases. The ascent runs from the
identity and from a forward layer-by-layer matching of incoming weights, and the better result is
kept, so **the weight distance never increases** from the unaligned one, and a permuted copy is
recovered exactly.

Works on host NumPy arrays (the assignment is combinatorial): call it once per pair, outside
``jit``.

References
----------
- S. K. Ainsworth, J. Hayase, S. Srinivasa (2023). Git Re-Basin: merging models modulo
  permutation symmetries. ICLR.
- R. Entezari, H. Sedghi, O. Saukh, B. Neyshabur (2022). The role of permutation invariance in
  linear mode connectivity of neural networks. ICLR.
- H. W. Kuhn (1955). The Hungarian method for the assignment problem. Naval Res. Logist. Q. 2.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import numpy as np

Params = Any

try:  # SciPy ships with scikit-learn, a crit dependency; the fallback keeps crit importable
    from scipy.optimize import linear_sum_assignment as _scipy_lsa
except ImportError:  # pragma: no cover
    _scipy_lsa = None


class Alignment(NamedTuple):
    """Network B permuted to match A, with the evidence.

    ``params`` B's parameters after permutation (same pytree as B); ``permutations`` one index
    array per hidden layer (new unit j of B is old unit ``perm[j]``); ``distance_before``,
    ``distance_after`` ‖θ_A − θ_B‖ and ‖θ_A − θ_{B'}‖; ``sweeps`` passes over the layers.
    """

    params: Params
    permutations: tuple
    distance_before: float
    distance_after: float
    sweeps: int


def hungarian(score: np.ndarray) -> np.ndarray:
    """Maximum-weight perfect matching of a square matrix: ``perm`` maximizing Σ_j S[j, perm[j]].

    Kuhn-Munkres with potentials (shortest augmenting paths), O(n³); a fallback for
    ``scipy.optimize.linear_sum_assignment``.
    """
    cost = -np.asarray(score, dtype=np.float64)
    n = cost.shape[0]
    if cost.shape != (n, n):
        raise ValueError(f"need a square matrix, got {cost.shape}")
    inf = np.inf
    u, v = np.zeros(n + 1), np.zeros(n + 1)
    match = np.zeros(n + 1, dtype=int)  # match[col] = row (1-based; 0: free)
    way = np.zeros(n + 1, dtype=int)
    for row in range(1, n + 1):
        match[0] = row
        col0 = 0
        minv = np.full(n + 1, inf)
        used = np.zeros(n + 1, dtype=bool)
        while True:
            used[col0] = True
            r0 = match[col0]
            delta, col1 = inf, 0
            for col in range(1, n + 1):
                if not used[col]:
                    cur = cost[r0 - 1, col - 1] - u[r0] - v[col]
                    if cur < minv[col]:
                        minv[col], way[col] = cur, col0
                    if minv[col] < delta:
                        delta, col1 = minv[col], col
            for col in range(n + 1):
                if used[col]:
                    u[match[col]] += delta
                    v[col] -= delta
                else:
                    minv[col] -= delta
            col0 = col1
            if match[col0] == 0:
                break
        while col0:
            col1 = way[col0]
            match[col0] = match[col1]
            col0 = col1
    perm = np.zeros(n, dtype=int)
    for col in range(1, n + 1):
        perm[match[col] - 1] = col - 1
    return perm


def linear_assignment(score: np.ndarray) -> np.ndarray:
    """``perm`` maximizing Σ_j S[j, perm[j]] (SciPy when installed, else :func:`hungarian`)."""
    if _scipy_lsa is None:
        return hungarian(score)
    rows, cols = _scipy_lsa(np.asarray(score), maximize=True)
    return cols[np.argsort(rows)]


def _dense_names(layer_dict) -> list[str]:
    names = [k for k in layer_dict if re.fullmatch(r"Dense_\d+", k)]
    if len(names) != len(layer_dict):
        raise ValueError(f"weight matching handles Flax MLPs of Dense layers only; got layers "
                         f"{sorted(layer_dict)}")
    return sorted(names, key=lambda k: int(k.split("_")[1]))


def mlp_layers(params: Params) -> list[tuple[np.ndarray, np.ndarray | None]]:
    """[(kernel (in, out), bias (out,) or None), ...] in order, from
    ``{"params": {"Dense_i": ...}}`` (a :class:`crit.models.mlp.MLP`'s parameters; the outer ``params`` key is optional)."""
    tree = params.get("params", params)
    return [(np.asarray(tree[k]["kernel"]),
             None if "bias" not in tree[k] else np.asarray(tree[k]["bias"]))
            for k in _dense_names(tree)]


def with_layers(params: Params, layers: Sequence[tuple]) -> Params:
    """``params`` with its Dense layers replaced by ``layers`` (same structure)."""
    outer = "params" in params
    tree = dict(params["params"] if outer else params)
    for name, (kernel, bias) in zip(_dense_names(tree), layers):
        tree[name] = {"kernel": kernel} if bias is None else {"kernel": kernel, "bias": bias}
    return {"params": tree} if outer else tree


def permute_mlp(params: Params, permutations: Sequence[np.ndarray]) -> Params:
    """Apply one permutation per hidden layer (new unit j = old unit perm[j]); the network's
    function is unchanged."""
    layers = mlp_layers(params)
    if len(permutations) != len(layers) - 1:
        raise ValueError(f"need {len(layers) - 1} permutations (one per hidden layer), got "
                         f"{len(permutations)}")
    out = []
    for i, (kernel, bias) in enumerate(layers):
        if i > 0:
            kernel = kernel[np.asarray(permutations[i - 1]), :]
        if i < len(layers) - 1:
            perm = np.asarray(permutations[i])
            kernel = kernel[:, perm]
            bias = None if bias is None else bias[perm]
        out.append((kernel, bias))
    return with_layers(params, out)


def weight_distance(a: Params, b: Params) -> float:
    """‖θ_A − θ_B‖ over the Dense layers (kernels and biases)."""
    total = 0.0
    for (ka, ba), (kb, bb) in zip(mlp_layers(a), mlp_layers(b)):
        total += float(np.sum((ka - kb) ** 2))
        if ba is not None:
            total += float(np.sum((ba - bb) ** 2))
    return float(np.sqrt(total))


def _score(la, lb, perms, layer):
    """S_l of the module docstring for hidden layer ``layer`` (0-based)."""
    (ka, ba), (kb, bb) = la[layer], lb[layer]
    kb = kb if layer == 0 else kb[perms[layer - 1], :]
    score = ka.T @ kb
    if ba is not None:
        score = score + np.outer(ba, bb)
    (ka_next, _), (kb_next, _) = la[layer + 1], lb[layer + 1]
    if layer + 1 < len(perms):
        kb_next = kb_next[:, perms[layer + 1]]
    return score + ka_next @ kb_next.T


def _objective(la, lb, perms) -> float:
    """Σ_l ⟨K_l^A, K_l^{B'}⟩ + ⟨b_l^A, b_l^{B'}⟩ for permutations ``perms`` of B."""
    total = 0.0
    for i, ((ka, ba), (kb, bb)) in enumerate(zip(la, lb)):
        if i > 0:
            kb = kb[perms[i - 1], :]
        if i < len(perms):
            kb = kb[:, perms[i]]
            bb = None if bb is None else bb[perms[i]]
        total += float(np.sum(ka * kb)) + (0.0 if ba is None else float(np.dot(ba, bb)))
    return total


def _forward_start(la, lb, widths):
    """Permutations matched layer by layer on incoming weights and biases only (layer l uses
    π_{l−1}); exact for a permuted copy with distinct units, whatever the other layers."""
    perms = []
    for layer in range(len(widths)):
        (ka, ba), (kb, bb) = la[layer], lb[layer]
        kb = kb if layer == 0 else kb[perms[layer - 1], :]
        score = ka.T @ kb + (0.0 if ba is None else np.outer(ba, bb))
        perms.append(linear_assignment(score))
    return perms


def _coordinate_ascent(la, lb, perms, max_sweeps, rng):
    perms = list(perms)
    sweeps = 0
    for sweeps in range(1, max_sweeps + 1):
        improved = False
        for layer in rng.permutation(len(perms)):
            score = _score(la, lb, perms, layer)
            new = linear_assignment(score)
            rows = np.arange(len(new))
            old_value, new_value = score[rows, perms[layer]].sum(), score[rows, new].sum()
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[layer] = new
                improved = True
        if not improved:
            break
    return perms, sweeps


def weight_matching(a: Params, b: Params, max_sweeps: int = 100, seed: int = 0) -> Alignment:
    """Permute the hidden units of MLP ``b`` to match ``a`` (module docstring).

    Coordinate ascent runs twice, from the identity and from a forward layer-by-layer matching
    of incoming weights (which recovers a permuted copy exactly), and the better end point is
    kept: ``distance_after <= distance_before`` always, and 0 when ``b`` is a permuted copy of
    ``a`` with distinct units. Returns an :class:`Alignment` (``sweeps`` of the kept run).
    """
    la, lb = mlp_layers(a), mlp_layers(b)
    if [k.shape for k, _ in la] != [k.shape for k, _ in lb]:
        raise ValueError("the two networks have different layer shapes")
    widths = [k.shape[1] for k, _ in la[:-1]]
    rng = np.random.default_rng(seed)
    runs = [_coordinate_ascent(la, lb, start, max_sweeps, rng)
            for start in ([np.arange(w) for w in widths], _forward_start(la, lb, widths))]
    perms, sweeps = max(runs, key=lambda run: _objective(la, lb, run[0]))
    aligned = permute_mlp(b, perms)
    return Alignment(aligned, tuple(perms), weight_distance(a, b), weight_distance(a, aligned),
                     sweeps)
