"""The blend search: the objective of any weights from the per-frame statistics (SourceStats,
which mixer.blend.collect_stats gathers), and the search for the best grid point per source.

Modes (`search_mode`: the blend record's option `search`, mixer.blend.BlendOptions). The grid has
C(1/step + M - 1, M - 1) points: 10 626 for 5 models at step 0.05, 8.5e7 for 12, 6.9e10 for 20.
'exhaustive' scores all of them (the exact grid optimum; refused, before allocating, when the grid
would pass GRID_BYTES). 'local' starts from the exact least-squares blend (the convex, uSDR-like
objective sum_t |r - s_hat|^2 / |r|^2 over the tracks, minimised on the simplex by mixer.simplex's
active set, then taken to the nearest grid point), from the uniform blend and from the best single
models, and climbs from each by exchange moves (move any number of steps of weight from one model
to another: K (M - 1) neighbours, scored at once and incrementally), always to the best neighbour
while it gains, keeping the best end point. Its cost is polynomial in M and linear in frames;
every move gains, so the result never scores below the best single model nor the least-squares
grid point on the search split; it is a grid point at which no exchange move gains, not a
certificate of the global grid optimum. 'auto' (the default) is 'exhaustive' up to AUTO_POINTS
points per source, else 'local'. Scoring runs in chunks of at most CELLS (points x frames), so
memory does not depend on the grid.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import Sequence

import numpy as np

from core.errors import PipelineError
from mixer.simplex import (
    exchange_moves,
    grid_divisions,
    grid_size,
    nearest_grid_point,
    simplex_grid,
    simplex_least_squares,
)

OBJECTIVES = ("museval", "usdr")
SEARCH_MODES = ("auto", "exhaustive", "local")
MAX_ROUNDS = 5
AUTO_POINTS = 20_000   # 'auto' is exhaustive up to this grid size: M <= 5 at step 0.05, M <= 8 at 0.1
GRID_BYTES = 512 << 20  # an exhaustive search's grids and objective values, at most
CELLS = 1 << 21        # grid points x frames scored at once (float64 arrays of 16 MiB)
TOLERANCE = 1e-9       # dB: a local move must gain more than float noise
START_SINGLES = 3      # the local search also climbs from this many best single models


# ---- per-frame statistics (mixer.blend.collect_stats gathers them) ------------------------------
@dataclass
class SourceStats:
    """Per-frame inner products for one target source, all tracks' frames concatenated."""

    models: list[int]          # indices into the spec's models of those that output the source
    rr: np.ndarray             # [F] <r, r>
    ref_silent: np.ndarray     # [F] museval-silent reference (L + R == 0 throughout the frame)
    silent: np.ndarray         # [F, M] museval-silent estimate of each model
    b: np.ndarray              # [F, M] <e_m, r>
    G: np.ndarray              # [F, M, M] <e_m, e_n>
    track: np.ndarray          # [F] the track each frame belongs to
    full: np.ndarray           # [F] a whole museval frame (False: a track's trailing partial one)
    n_tracks: int = 0
    totals: dict = field(default_factory=dict)   # per-track sums of rr, b, G (whole tracks)

    def restricted(self, models) -> "SourceStats | None":
        """The statistics of a subset of the models (None when none of them outputs the source)."""
        cols = np.array([i for i, m in enumerate(self.models) if m in set(models)], dtype=int)
        if not len(cols):
            return None
        pick = lambda b, G: (b[:, cols], G[:, cols][:, :, cols])   # noqa: E731
        b, G = pick(self.b, self.G)
        tb, tG = pick(self.totals["b"], self.totals["G"])
        return SourceStats([self.models[i] for i in cols], self.rr, self.ref_silent,
                           self.silent[:, cols], b, G, self.track, self.full, self.n_tracks,
                           {"rr": self.totals["rr"], "b": tb, "G": tG})


# ---- scoring ---------------------------------------------------------------------------------
def _error_energy(rr, b, G, W):
    """<r,r> - 2 w.b + w^T G w for every grid point (rows of W) and frame: [P, F]."""
    WW = (W[:, :, None] * W[:, None, :]).reshape(len(W), -1)
    err = rr[None] - 2.0 * W @ b.T + WW @ G.reshape(len(G), -1).T
    return np.maximum(err, 0.0)


def nanmedian_rows(x: np.ndarray) -> np.ndarray:
    """Median along the last axis ignoring NaN (NaN where all are), without np.nanmedian's slow
    per-row path for long rows: sort (NaN last) and take the middle of the valid prefix."""
    s = np.sort(x, axis=-1)
    k = (~np.isnan(x)).sum(axis=-1)
    lo = np.take_along_axis(s, np.maximum((k - 1) // 2, 0)[..., None], axis=-1)[..., 0]
    hi = np.take_along_axis(s, np.minimum(k // 2, x.shape[-1] - 1)[..., None], axis=-1)[..., 0]
    return np.where(k > 0, (lo + hi) / 2, np.nan)


def blend_sounds(st: SourceStats, W: np.ndarray) -> np.ndarray:
    """[P, F_full]: the blend with weights W is not silent in the frame (some model with
    positive weight is not)."""
    return ((W > 0).astype(np.float64) @ (~st.silent[st.full]).T.astype(np.float64)) > 0


class SourceObjective:
    """The objective of any weights for one source, the other sources' masks fixed.

    context: [F_full] bool, frames not already invalidated by the references or by the other
    sources' estimates (museval only). values(W) scores points (rows of W); moves(...) scores the
    exchange moves from one point, incrementally: with g = b - G w, the error energy of
    w + a (e_j - e_i) is err(w) - 2 a (g_j - g_i) + a^2 (G_ii + G_jj - 2 G_ij), O(frames) per move.
    Both work in chunks of at most CELLS points x frames.
    """

    def __init__(self, st: SourceStats, objective: str, context: np.ndarray | None = None):
        self.objective = objective
        if objective == "usdr":
            self.rr, self.b, self.G = st.totals["rr"], st.totals["b"], st.totals["G"]
        else:
            f = st.full
            self.rr, self.b, self.G = st.rr[f], st.b[f], st.G[f]
            sounds = ~st.silent[f].T                               # [M, F_full]
            # A blend (weights summing to 1) sounds wherever all its models do: only the frames
            # where some model is silent need its support (a small product, no BLAS threads
            # spinning on a tiny matrix).
            self.some_silent = np.flatnonzero(~sounds.all(axis=0))
            self.sounds = sounds[:, self.some_silent].astype(np.float64)
            self.context = context
            tracks = st.track[f]
            frames = [np.flatnonzero(tracks == t) for t in range(st.n_tracks) if np.any(tracks == t)]
            # tracks with as many frames as each other: one median over [points, tracks, frames]
            self.groups = [(np.array([i for i, x in enumerate(frames) if len(x) == n]),
                            np.stack([x for x in frames if len(x) == n]))
                           for n in sorted({len(x) for x in frames})]
            self.n_tracks = len(frames)
        self.rows = max(1, min(512, CELLS // max(1, len(self.rr))))
        self.scored = 0

    def of_error(self, err: np.ndarray, W: np.ndarray) -> np.ndarray:
        """[P] from the error energies [P, rows] of the points W."""
        if self.objective == "usdr":
            return np.mean(10 * np.log10((self.rr[None] + 1e-7) / (err + 1e-7)), axis=1)
        # A perfect frame (+inf) is skipped like a NaN one, as in museval's aggregation.
        valid = self.context[None] & (err > 0)
        if len(self.some_silent):
            valid[:, self.some_silent] &= ((W > 0).astype(np.float64) @ self.sounds) > 0
        with np.errstate(divide="ignore", invalid="ignore"):
            sdr = np.where(valid, 10 * np.log10(self.rr[None] / err), np.nan)
        per_track = np.empty((len(W), self.n_tracks))
        for where, frames in self.groups:
            per_track[:, where] = nanmedian_rows(sdr[:, frames])
        return nanmedian_rows(per_track)

    def values(self, W: np.ndarray) -> np.ndarray:
        out = np.empty(len(W))
        for i in range(0, len(W), self.rows):
            Wc = W[i:i + self.rows]
            out[i:i + self.rows] = self.of_error(_error_energy(self.rr, self.b, self.G, Wc), Wc)
        self.scored += len(W)
        return out

    @cached_property
    def G_by_pair(self) -> np.ndarray:
        """[M * M, rows]: G by model pair, so that a move's terms are contiguous rows."""
        return np.ascontiguousarray(self.G.reshape(len(self.G), -1).T)

    def moves(self, counts: np.ndarray, K: int, src: np.ndarray, dst: np.ndarray,
              steps: np.ndarray) -> np.ndarray:
        """[P]: the point counts / K with steps[p] / K of weight moved from src[p] to dst[p]."""
        M = self.G.shape[1]
        w = counts / K
        Gw = np.einsum("rmn,n->rm", self.G, w)
        g = np.ascontiguousarray((self.b - Gw).T)                  # [M, rows]
        err0 = self.rr - 2.0 * (self.b @ w) + Gw @ w
        diag = self.G_by_pair[np.arange(M) * (M + 1)]              # [M, rows]
        out = np.empty(len(src))
        for i in range(0, len(src), self.rows):
            s, d, n = src[i:i + self.rows], dst[i:i + self.rows], steps[i:i + self.rows]
            a = (n / K)[:, None]
            curvature = diag[s] + diag[d] - 2.0 * self.G_by_pair[s * M + d]
            err = np.maximum(err0[None] - 2.0 * a * (g[d] - g[s]) + a * a * curvature, 0.0)
            moved = np.repeat(counts[None], len(s), axis=0)
            rows = np.arange(len(s))
            moved[rows, s] -= n
            moved[rows, d] += n
            out[i:i + self.rows] = self.of_error(err, moved / K)
        self.scored += len(src)
        return out


def score(st: SourceStats, W: np.ndarray, objective: str, context: np.ndarray | None = None) -> np.ndarray:
    """Objective of every grid point (rows of W) for one source: [P]."""
    return SourceObjective(st, objective, context).values(W)


# ---- the search ------------------------------------------------------------------------------
def frame_contexts(stats: list[SourceStats], objective: str):
    """masks (per source, [F_full] the source's blend sounds) -> per source, the frames valid as
    far as the references and every *other* source's estimate go."""
    full = stats[0].full
    if objective == "museval" and not full.any():
        raise PipelineError("blend: no validation track is long enough for one museval frame")
    ref_ok = ~np.any([st.ref_silent[full] for st in stats], axis=0)

    def contexts(masks: list[np.ndarray]) -> list[np.ndarray]:
        return [ref_ok & np.all([m for k, m in enumerate(masks) if k != j] or [ref_ok], axis=0)
                for j in range(len(stats))]
    return contexts


def check_search(objective: str, search_mode: str, what: str = "blend") -> None:
    if objective not in OBJECTIVES:
        raise PipelineError(f"{what} objective '{objective}': choose one of {', '.join(OBJECTIVES)}")
    if search_mode not in SEARCH_MODES:
        raise PipelineError(f"{what} search mode '{search_mode}': choose one of {', '.join(SEARCH_MODES)}")


def search_modes(sizes: Sequence[int], step: float, search_mode: str, what: str = "blend") -> list[str]:
    """Per source (its number of models), 'exhaustive' or 'local'; an exhaustive search whose
    grids would pass GRID_BYTES is refused here, before anything is allocated."""
    K = grid_divisions(step)
    modes = [search_mode if search_mode != "auto" else
             "exhaustive" if grid_size(M, K) <= AUTO_POINTS else "local" for M in sizes]
    exhaustive = [M for M, mode in zip(sizes, modes) if mode == "exhaustive"]
    # the grid (int64 counts, then float64 weights: twice) once per size, its values per source
    need = sum(16 * M * grid_size(M, K) for M in set(exhaustive)) + sum(8 * grid_size(M, K) for M in exhaustive)
    if need > GRID_BYTES:
        M = max(exhaustive)
        raise PipelineError(f"{what}: an exhaustive search over {M} models at step {step} scores "
                            f"{grid_size(M, K):,} grid points per source ({need / 2**30:.1f} GiB; "
                            f"at most {GRID_BYTES / 2**30:.1f} GiB): use --search local or auto "
                            f"(search = \"local\" in an experiment), or a coarser --step")
    return modes


def least_squares_point(st: SourceStats) -> np.ndarray:
    """[M] the exact minimiser on the simplex of sum_t |r - s_hat|^2 / |r|^2 over the tracks with
    a reference that sounds (every track if none does): uSDR's error, each track made scale-free."""
    rr, b, G = st.totals["rr"], st.totals["b"], st.totals["G"]
    keep = rr > 0 if np.any(rr > 0) else np.ones(len(rr), bool)
    inv = 1.0 / np.where(rr > 0, rr, 1.0)[keep]
    return simplex_least_squares(np.einsum("t,tmn->mn", inv, G[keep]), np.einsum("t,tm->m", inv, b[keep]))


def _finite(value: float) -> float:
    return -np.inf if np.isnan(value) else float(value)


def ascend(obj: SourceObjective, counts: np.ndarray, K: int, cols: np.ndarray | None = None,
           value: float | None = None) -> tuple[np.ndarray, float, int]:
    """Steepest ascent on the grid by exchange moves among `cols` (whose counts sum to K), from
    `counts`: (counts, objective, moves made). A move is taken only when its objective, scored
    directly (not incrementally), gains more than TOLERANCE, so the objective only rises."""
    cols = np.arange(len(counts)) if cols is None else cols
    value = _finite(obj.values(counts[None] / K)[0]) if value is None else value
    moves = 0
    while True:
        src, dst, steps = exchange_moves(counts, cols)
        if not len(src):
            break
        gains = np.nan_to_num(obj.moves(counts, K, src, dst, steps), nan=-np.inf)
        p = int(np.argmax(gains))
        if not gains[p] > value + TOLERANCE:
            break
        new = counts.copy()
        new[src[p]] -= steps[p]
        new[dst[p]] += steps[p]
        new_value = _finite(obj.values(new[None] / K)[0])
        if not new_value > value + TOLERANCE:
            break
        counts, value, moves = new, new_value, moves + 1
    return counts, value, moves


def local_search(obj: SourceObjective, st: SourceStats, K: int,
                 previous: np.ndarray | None = None) -> tuple[np.ndarray, float, dict]:
    """Ascend from the least-squares grid point, the uniform blend, the START_SINGLES best single
    models (and `previous`, a grid point's counts); keep the best end point, the first on a tie:
    (counts, objective, details). The museval objective is a median: rugged, with distant points
    within thousandths of a dB of each other, so several starts find the grid optimum more often
    than one."""
    M = len(st.models)
    ls = least_squares_point(st)
    singles = np.nan_to_num(obj.values(np.eye(M)), nan=-np.inf)
    starts = {"least-squares": nearest_grid_point(ls, K), "uniform": nearest_grid_point(np.ones(M) / M, K)}
    for rank, i in enumerate(np.argsort(-singles, kind="stable")[:START_SINGLES]):
        starts[f"single-{rank + 1}"] = K * np.eye(M, dtype=np.int64)[i]
    if previous is not None:
        starts["previous"] = previous
    best, details = None, {"least_squares_weights": [round(float(x), 6) for x in ls], "starts": {}}
    seen = []
    for name, start in starts.items():
        if any(np.array_equal(start, s) for s in seen):
            continue
        seen.append(start)
        start_value = _finite(obj.values(start[None] / K)[0])
        counts, value, moves = ascend(obj, start, K, value=start_value)
        details["starts"][name] = {"objective": start_value, "reached": value, "moves": moves}
        if best is None or value > best[1]:
            best = (counts, value, name)
    details["from"] = best[2]
    return best[0], best[1], details


@dataclass
class BlendSearch:
    weights: list[np.ndarray]        # per target, [M_j] over SourceStats.models
    best: list[float]                # per target, objective of the chosen weights
    single: list[dict[int, float]]   # per target, {model index: objective of that model alone}
    rounds: int
    converged: bool
    grids: list = field(default_factory=list)    # per target, the grid [P, M_j] (exhaustive) or None
    values: list = field(default_factory=list)   # per target, objective per grid point, the others
                                                 # at their weights (exhaustive) or None
    modes: list[str] = field(default_factory=list)     # per target, exhaustive | local
    details: list[dict] = field(default_factory=list)  # per target: points scored, starts, moves


def search(stats: list[SourceStats], step: float, objective: str, search_mode: str = "auto") -> BlendSearch:
    check_search(objective, search_mode)
    K = grid_divisions(step)
    modes = search_modes([len(st.models) for st in stats], step, search_mode)
    grid_of = {M: simplex_grid(M, step) for M, mode in
               zip([len(st.models) for st in stats], modes) if mode == "exhaustive"}
    grids = [grid_of.get(len(st.models)) for st in stats]
    contexts = frame_contexts(stats, objective)

    def one(j: int, ctx: np.ndarray, previous: np.ndarray | None):
        """(weights, objective values of the grid or None, details) of source j."""
        obj = SourceObjective(stats[j], objective, ctx)
        if modes[j] == "exhaustive":
            values = obj.values(grids[j])
            w = grids[j][int(np.argmax(np.nan_to_num(values, nan=-np.inf)))]
            details = {}
        else:
            counts, _, details = local_search(obj, stats[j], K, previous)
            w, values = counts / K, None
        scored[j] += obj.scored
        return w, values, details

    # Round 0 assumes every other blend sounds wherever any of its models does (true for
    # any interior point of the simplex), then rounds repeat until the masks are self-consistent.
    masks = [blend_sounds(st, np.ones((1, len(st.models))))[0] for st in stats]
    rounds, converged, found, scored = 0, objective == "usdr", [None] * len(stats), [0] * len(stats)
    while True:
        rounds += 1
        ctx = contexts(masks)
        found = [one(j, c, None if f is None else np.round(f[0] * K).astype(np.int64))
                 for j, (c, f) in enumerate(zip(ctx, found))]
        weights = [f[0] for f in found]
        new_masks = [blend_sounds(st, w[None])[0] for st, w in zip(stats, weights)]
        if objective == "usdr" or all(np.array_equal(a, b) for a, b in zip(masks, new_masks)):
            converged = True
            break
        masks = new_masks
        if rounds == MAX_ROUNDS:
            break
    values = [f[1] for f in found]
    if not converged:   # the last round's values assumed other masks: rescore for the record
        values = [None if g is None else score(st, g, objective, c)
                  for st, g, c in zip(stats, grids, contexts(new_masks))]
    ctx = contexts(new_masks)
    best = [float(score(st, w[None], objective, c)[0]) for st, w, c in zip(stats, weights, ctx)]

    # A model alone: its own silence masks where it outputs a source, the blend's elsewhere.
    single = []
    for j, st in enumerate(stats):
        scores = {}
        for col, m in enumerate(st.models):
            own = [blend_sounds(o, np.eye(len(o.models))[o.models.index(m)][None])[0]
                   if m in o.models else new_masks[k] for k, o in enumerate(stats)]
            vertex = np.eye(len(st.models))[col][None]
            scores[m] = float(score(st, vertex, objective, contexts(own)[j])[0])
        single.append(scores)
    details = [{"grid_points": grid_size(len(st.models), K), "points": n, **f[2]}   # points: all rounds
               for st, f, n in zip(stats, found, scored)]
    return BlendSearch(weights, best, single, rounds, converged, grids, values, modes, details)
