"""The probability simplex {w >= 0, sum w = 1} and its grid of multiples of 1/K: the geometry the
blend searches (mixer.blend, mixer.bandblend) share.

* the whole grid, in lexicographic order (the exhaustive search), built a coordinate at a time in
  numpy: memory is the grid itself, not millions of Python tuples;
* the exact minimiser of a convex quadratic on the simplex (the least-squares blend), by an
  active-set method: a few linear solves of at most M + 1 unknowns;
* the grid point nearest a point (largest remainders: every weight within one step), and the
  exchange moves of a grid point (move any number of steps of weight from one model to another:
  K (M - 1) neighbours), which the local search climbs.
"""
from __future__ import annotations

import math

import numpy as np

from core.errors import PipelineError


def grid_divisions(step: float) -> int:
    """K = 1 / step, the number of steps from 0 to 1; a step that does not divide 1 is an error."""
    if not 0 < step <= 1:   # 0 would divide by zero, NaN compares false
        raise PipelineError(f"blend step {step}: must be in (0, 1] and divide 1 (e.g. 0.1, 0.05, 0.01)")
    K = round(1.0 / step)
    if K < 1 or abs(K * step - 1.0) > 1e-9:
        raise PipelineError(f"blend step {step}: must divide 1 (e.g. 0.1, 0.05, 0.01)")
    return K


def grid_size(n_models: int, K: int) -> int:
    """Points of the grid: the compositions of K into n_models parts, C(K + M - 1, M - 1)."""
    return math.comb(K + n_models - 1, n_models - 1)


def grid_counts(n_models: int, K: int) -> np.ndarray:
    """Every composition of K into n_models non-negative parts, [P, n_models] int64, in
    lexicographic order: for v = 0..K, v followed by the compositions of K - v into one part
    fewer, built from the last coordinate up."""
    dtype = np.uint8 if K < 256 else np.int32
    tails = {k: np.array([[k]], dtype=dtype) for k in range(K + 1)}   # one part: k itself
    for m in range(2, n_models + 1):
        need = range(K + 1) if m < n_models else (K,)
        tails = {k: np.concatenate([np.hstack([np.full((len(tails[k - v]), 1), v, dtype=dtype),
                                               tails[k - v]]) for v in range(k + 1)])
                 for k in need}
    return tails[K].astype(np.int64)


def simplex_grid(n_models: int, step: float) -> np.ndarray:
    """Every w >= 0 with sum 1 whose entries are multiples of `step`: [P, n_models] float64, in
    lexicographic order (the first maximum of an objective over it is the same point whatever
    the search's chunking)."""
    K = grid_divisions(step)
    return grid_counts(n_models, K) / K


# ---- least squares on the simplex ------------------------------------------------------------
def simplex_least_squares(A: np.ndarray, c: np.ndarray) -> np.ndarray:
    """argmin_w w^T A w - 2 c^T w subject to w >= 0, sum w = 1, for symmetric PSD A.

    Active set (Lawson-Hanson with the sum constraint): keep a support S; solve the equality-
    constrained problem on S (A_SS z + nu 1 = c_S, sum z = 1); if some z is not positive, step
    from w towards z until a weight reaches 0 and drop it; else w = z, and add the model whose
    gradient most violates optimality (c_j - (A w)_j > nu), until none does: then the KKT
    conditions hold and w is the minimum. A ridge of 1e-12 of the mean diagonal keeps the solves
    regular when A is singular (identical models: one of them takes the pair's weight).
    """
    M = len(c)
    scale = max(float(np.trace(A)) / M, 1e-300)
    A = A + 1e-12 * scale * np.eye(M)
    w = np.zeros(M)
    w[int(np.argmin(np.diag(A) - 2 * c))] = 1.0   # the best vertex
    support, added = w > 0, None
    for _ in range(10 * M + 10):   # each pass lowers the objective; about M passes in practice
        while True:
            S = np.flatnonzero(support)
            kkt = np.block([[A[np.ix_(S, S)], np.ones((len(S), 1))], [np.ones((1, len(S))), 0]])
            sol = np.linalg.solve(kkt, np.concatenate([c[S], [1.0]]))
            z, nu = sol[:-1], sol[-1]
            if np.all(z > 0):
                w = np.zeros(M)
                w[S] = z
                break
            neg = np.flatnonzero(z <= 0)
            ratio = w[S[neg]] / (w[S[neg]] - z[neg])
            first = int(np.argmin(ratio))
            if ratio[first] <= 0 and S[neg[first]] == added:   # rounding: the new model cannot enter
                return w / w.sum()
            w[S] += ratio[first] * (z - w[S])
            w[S[neg[first]]] = 0.0
            support = w > 0
        violation = c - A @ w - nu
        violation[support] = -np.inf
        added = int(np.argmax(violation))
        if violation[added] <= 1e-10 * scale:
            return w / w.sum()
        support[added] = True
    return w / w.sum()


# ---- grid points and moves -------------------------------------------------------------------
def nearest_grid_point(w: np.ndarray, K: int) -> np.ndarray:
    """Counts (summing to K) of a grid point within one step of w in every weight: floor(K w),
    then one more step to the largest remainders (ties: the first model)."""
    x = np.clip(np.asarray(w, dtype=np.float64), 0, None) * K / max(np.sum(w), 1e-300)
    counts = np.floor(x + 1e-9).astype(np.int64)
    short = K - int(counts.sum())
    if short > 0:
        order = np.argsort(-(x - counts), kind="stable")
        counts[order[:short]] += 1
    elif short < 0:
        for i in np.argsort(x - counts, kind="stable"):   # float excess: take from the smallest
            if short == 0:
                break
            take = min(int(counts[i]), -short)
            counts[i] -= take
            short += take
    return counts


def exchange_moves(counts: np.ndarray, cols: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Every move of 1..counts[i] steps from column i to column j (i != j, both in cols):
    (source columns, destination columns, steps), K (len(cols) - 1) moves when cols hold K."""
    cols = np.asarray(cols)
    i, j = np.meshgrid(cols, cols, indexing="ij")
    keep = (i != j) & (counts[i] > 0)
    i, j = i[keep], j[keep]
    n = counts[i]
    first = np.repeat(np.cumsum(n) - n, n)
    return np.repeat(i, n), np.repeat(j, n), np.arange(int(n.sum())) - first + 1
