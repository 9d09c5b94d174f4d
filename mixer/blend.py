"""Danna-Sep linear blending: per source, convex weights over the models' estimates of it.

For target source j and the M_j models that output it, the blend is s_hat = sum_m w_m e_m with
w >= 0, sum w = 1. The weights are chosen by exhaustive search over a grid on the simplex
(step 0.05 by default) on the validation split, maximising either

* 'museval': the median over tracks of each track's median framewise SDR (1-s frames, the
  number museval / SiSEC report), or
* 'usdr': the mean over tracks of the whole-track SDR 10 log10((|s|^2 + 1e-7) / (|s - s_hat|^2 + 1e-7)).

The blend being linear, nothing is rendered per grid point: per frame we keep <r, r>, the inner
products b_m = <e_m, r> and the Gram matrix G_mn = <e_m, e_n> (float64, both channels), so the
error energy of any w is <r, r> - 2 w.b + w^T G w: a few multiply-adds per frame and grid point.

The numbers are those of `core.metrics` (museval's): frames of `rate` samples, a trailing
partial frame dropped (a track no longer than one frame is one frame), a perfect frame (+inf)
skipped like a NaN one, and a frame invalid (NaN) for every source when any reference or any
estimated source is silent in it, museval's "silent" being "L + R == 0 at every sample".

With w >= 0 a blend is silent in a frame exactly when every model with positive weight is, so
each grid point gets its own exact mask for the source being searched. (Float rounding is
sign-symmetric, so a model with R == -L still blends to R == -L; exact cancellation between two
*different* models' waveforms is ignored.) The mask also depends on the *other* sources' blends,
which couples the sources' searches; they are solved coordinate-wise: search every source with
the others' masks fixed, then again with the masks of the weights found, until those masks stop
changing (usually at once: a mask only moves when a blend drops every model that sounds in some
frame). The reported objective is exact for the final weights.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from core.errors import PipelineError
from core.options import option
from core.store import StemStore, write_json_atomic
from mixer.data import describe as describe_tracks
from mixer.data import extra_data_option, fitting_tracks
from mixer.ensemble import FitRequest, Method, Mixer, run_config
from mixer.inputs import InputSpec, check_inputs

OBJECTIVES = ("museval", "usdr")
MAX_ROUNDS = 5
FRAMES_PER_BLOCK = 16  # frames converted to float64 at once: bounds memory on long tracks


# ---- the grid --------------------------------------------------------------------------------
def grid_divisions(step: float) -> int:
    """K = 1 / step, the number of steps from 0 to 1; a step that does not divide 1 is an error."""
    if not 0 < step <= 1:   # 0 would divide by zero, NaN compares false
        raise PipelineError(f"blend step {step}: must be in (0, 1] and divide 1 (e.g. 0.1, 0.05, 0.01)")
    K = round(1.0 / step)
    if K < 1 or abs(K * step - 1.0) > 1e-9:
        raise PipelineError(f"blend step {step}: must divide 1 (e.g. 0.1, 0.05, 0.01)")
    return K


def simplex_grid(n_models: int, step: float) -> np.ndarray:
    """Every w >= 0 with sum 1 whose entries are multiples of `step`: [P, n_models] float64.

    Stars and bars: choosing the positions of n_models - 1 bars among K + n_models - 1 slots
    enumerates each composition of K = 1/step exactly once, in lexicographic order.
    """
    K = grid_divisions(step)
    if n_models == 1:
        return np.ones((1, 1))
    bars = np.array(list(itertools.combinations(range(K + n_models - 1), n_models - 1)))
    edges = np.concatenate([np.full((len(bars), 1), -1), bars,
                            np.full((len(bars), 1), K + n_models - 1)], axis=1)
    return (np.diff(edges, axis=1) - 1) / K


# ---- per-frame statistics --------------------------------------------------------------------
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


def source_models(spec: InputSpec) -> list[list[tuple[int, int]]]:
    """For each target: the (model index, index in that model's sources) that output it."""
    table = []
    for target in spec.targets:
        found = [(m, list(srcs).index(target)) for m, srcs in enumerate(spec.model_sources)
                 if target in srcs]
        if not found:
            raise PipelineError(f"blend: no chosen model outputs source '{target}' "
                                f"(models: {', '.join(spec.model_names)})")
        table.append(found)
    return table


def frame_blocks(n: int, win: int, per_block: int = FRAMES_PER_BLOCK) -> list[tuple[int, int, int, bool]]:
    """(start, frame length, number of frames, museval frame?): blocks of whole frames, then the
    partial tail (counted by uSDR only). museval makes a track no longer than `win` one frame."""
    if n <= win:
        return [(0, n, 1, True)]
    n_full = n // win
    blocks = [(i * win, win, min(per_block, n_full - i), True)
              for i in range(0, n_full, per_block)]
    return blocks + ([(n_full * win, n - n_full * win, 1, False)] if n % win else [])


def grams(x: np.ndarray) -> np.ndarray:
    """[f, rows, n] -> the Gram matrix of each [f, rows, rows]. One 2-D product per item: numpy's
    stacked matmul with a transposed operand can miss BLAS (0.5 s instead of 1 ms for a stack of
    one 42 x 8000 matrix)."""
    return np.stack([a @ a.T for a in x])


def collect_stats(tracks: Iterable[tuple[np.ndarray, Sequence[np.ndarray]]], spec: InputSpec,
                  win: int, frames_per_block: int = FRAMES_PER_BLOCK) -> list[SourceStats]:
    """Statistics for every target from (references [S,2,n], [stems [S_m,2,n] per model]) per track.

    A model's stems need only `stems[k][:, a:b]` (mixer.bandblend passes band signals that way).
    """
    table = source_models(spec)
    keys = ("rr", "ref_silent", "silent", "b", "G", "track", "full")
    acc = [{k: [] for k in keys} for _ in table]
    n_tracks = 0
    for t, (refs, stems) in enumerate(tracks):
        n_tracks += 1
        for start, length, count, full in frame_blocks(refs.shape[-1], win, frames_per_block):
            stop = start + length * count
            for j, pairs in enumerate(table):
                # Rows: the reference, then each model's estimate, as float64 [f, 1 + M, 2, L]
                # (one converting copy per signal; this loop is memory-bound).
                x = np.empty((count, len(pairs) + 1, 2, length))
                for row, signal in enumerate([refs[j]] + [stems[m][k] for m, k in pairs]):
                    x[:, row] = np.asarray(signal[:, start:stop]).reshape(2, count, length).transpose(1, 0, 2)
                # museval's silence: L + R == 0 at every sample. Float sums are 0 only for a == -b,
                # so testing in float64 equals museval's test in float32.
                silent = ~np.any(x[:, :, 0] + x[:, :, 1] != 0, axis=-1)           # [f, 1 + M]
                gram = grams(x.reshape(count, len(pairs) + 1, 2 * length))          # [f, 1+M, 1+M]
                a = acc[j]
                a["rr"].append(gram[:, 0, 0])
                a["b"].append(gram[:, 1:, 0])
                a["G"].append(gram[:, 1:, 1:])
                a["ref_silent"].append(silent[:, 0])
                a["silent"].append(silent[:, 1:])
                a["track"].append(np.full(count, t))
                a["full"].append(np.full(count, full))
    out = []
    for pairs, a in zip(table, acc):
        st = SourceStats(models=[m for m, _ in pairs], n_tracks=n_tracks,
                         **{k: np.concatenate(a[k]) for k in keys})
        st.totals = {k: np.stack([getattr(st, k)[st.track == i].sum(0) for i in range(n_tracks)])
                     for k in ("rr", "b", "G")}
        out.append(st)
    return out


# ---- scoring ---------------------------------------------------------------------------------
def _error_energy(rr, b, G, W):
    """<r,r> - 2 w.b + w^T G w for every grid point (rows of W) and frame: [P, F]."""
    WW = (W[:, :, None] * W[:, None, :]).reshape(len(W), -1)
    err = rr[None] - 2.0 * W @ b.T + WW @ G.reshape(len(G), -1).T
    return np.maximum(err, 0.0)


def nanmedian_rows(x: np.ndarray) -> np.ndarray:
    """Median of each row ignoring NaN (NaN for an all-NaN row), without np.nanmedian's slow
    per-row path for long rows: sort (NaN last) and take the middle of the valid prefix."""
    s = np.sort(x, axis=1)
    k = (~np.isnan(x)).sum(axis=1)
    lo = np.take_along_axis(s, np.maximum((k - 1) // 2, 0)[:, None], axis=1)[:, 0]
    hi = np.take_along_axis(s, np.minimum(k // 2, x.shape[1] - 1)[:, None], axis=1)[:, 0]
    return np.where(k > 0, (lo + hi) / 2, np.nan)


def blend_sounds(st: SourceStats, W: np.ndarray) -> np.ndarray:
    """[P, F_full]: the blend with weights W is not silent in the frame (some model with
    positive weight is not)."""
    return ((W > 0).astype(np.float64) @ (~st.silent[st.full]).T.astype(np.float64)) > 0


def score(st: SourceStats, W: np.ndarray, objective: str, context: np.ndarray | None = None,
          chunk: int = 512) -> np.ndarray:
    """Objective of every grid point (rows of W) for one source: [P].

    context: [F_full] bool, frames not already invalidated by the references or by the other
    sources' estimates (museval only).
    """
    out = np.empty(len(W))
    for i in range(0, len(W), chunk):
        Wc = W[i:i + chunk]
        if objective == "usdr":
            tot = st.totals
            err = _error_energy(tot["rr"], tot["b"], tot["G"], Wc)
            out[i:i + chunk] = np.mean(10 * np.log10((tot["rr"][None] + 1e-7) / (err + 1e-7)), axis=1)
            continue
        f = st.full
        rr = st.rr[f]
        err = _error_energy(rr, st.b[f], st.G[f], Wc)
        # A perfect frame (+inf) is skipped like a NaN one, as in museval's aggregation.
        valid = blend_sounds(st, Wc) & context[None] & (err > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            sdr = np.where(valid, 10 * np.log10(rr[None] / err), np.nan)
        tracks = st.track[f]
        per_track = np.stack([nanmedian_rows(sdr[:, tracks == t]) for t in range(st.n_tracks)
                              if np.any(tracks == t)], axis=1)
        out[i:i + chunk] = nanmedian_rows(per_track)
    return out


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


@dataclass
class BlendSearch:
    weights: list[np.ndarray]        # per target, [M_j] over SourceStats.models
    best: list[float]                # per target, objective of the chosen weights
    single: list[dict[int, float]]   # per target, {model index: objective of that model alone}
    rounds: int
    converged: bool
    grids: list[np.ndarray] = field(default_factory=list)    # per target, the grid [P, M_j]
    values: list[np.ndarray] = field(default_factory=list)   # per target, objective per grid
                                                             # point, the others at their weights


def search(stats: list[SourceStats], step: float, objective: str) -> BlendSearch:
    if objective not in OBJECTIVES:
        raise PipelineError(f"blend objective '{objective}': choose one of {', '.join(OBJECTIVES)}")
    grids = [simplex_grid(len(st.models), step) for st in stats]
    contexts = frame_contexts(stats, objective)

    # Round 0 assumes every other blend sounds wherever any of its models does (true for
    # any interior point of the simplex), then rounds repeat until the masks are self-consistent.
    masks = [blend_sounds(st, np.ones((1, len(st.models))))[0] for st in stats]
    rounds, converged = 0, objective == "usdr"
    while True:
        rounds += 1
        ctx = contexts(masks)
        values = [score(st, g, objective, c) for st, g, c in zip(stats, grids, ctx)]
        picks = [int(np.argmax(np.nan_to_num(v, nan=-np.inf))) for v in values]
        weights = [g[p] for g, p in zip(grids, picks)]
        new_masks = [blend_sounds(st, w[None])[0] for st, w in zip(stats, weights)]
        if objective == "usdr" or all(np.array_equal(a, b) for a, b in zip(masks, new_masks)):
            converged = True
            break
        masks = new_masks
        if rounds == MAX_ROUNDS:
            break
    if not converged:   # the last round's values assumed other masks: rescore for the record
        values = [score(st, g, objective, c) for st, g, c in zip(stats, grids, contexts(new_masks))]
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
    return BlendSearch(weights, best, single, rounds, converged, grids, values)


# ---- applying --------------------------------------------------------------------------------
def apply_blend(weights: Mapping[str, Mapping[str, float]], stems_per_model: Mapping[str, np.ndarray],
                model_sources: Mapping[str, Sequence[str]],
                targets: Sequence[str] | None = None) -> np.ndarray:
    """Estimates [S, 2, n] float32 from weights {target: {model key: w}} and each model's stems
    [S_m, 2, n] (sources named by model_sources[key]); targets fixes the output order."""
    targets = list(targets or weights)
    out = None
    for j, target in enumerate(targets):
        for key, w in weights[target].items():
            if w == 0:
                continue
            stem = np.asarray(stems_per_model[key][list(model_sources[key]).index(target)],
                              dtype=np.float32)
            if out is None:
                out = np.zeros((len(targets),) + stem.shape, dtype=np.float32)
            out[j] += np.float32(w) * stem
    if out is None:
        raise PipelineError("blend: every weight is zero")
    return out


# ---- the stage -------------------------------------------------------------------------------
def _markdown(spec: InputSpec, table: dict, best: dict, single: dict, objective: str,
              split: str) -> str:
    def row(cells):
        return "| " + " | ".join(cells) + " |"

    head = [row(["model"] + list(spec.targets)), row(["---"] * (len(spec.targets) + 1))]
    weights = [row([name] + ["-" if table[key].get(t) is None else f"{table[key][t]:.2f}"
                             for t in spec.targets])
               for key, name in zip(spec.model_keys, spec.model_names)]
    scores = [row([name] + ["-" if single[key].get(t) is None else f"{single[key][t]:.3f}"
                            for t in spec.targets])
              for key, name in zip(spec.model_keys, spec.model_names)]
    scores.append(row(["**blend**"] + [f"**{best[t]:.3f}**" for t in spec.targets]))
    return "\n".join(["## Blend weights", "", *head, *weights, "",
                      f"## {objective} SDR on the `{split}` split the weights were searched on "
                      f"(dB)", "", *head, *scores, ""])


def search_blend(store: StemStore, dataset_id: str, models: list[str], *, step: float = 0.05,
                 objective: str = "museval", split: str = "valid",
                 run_dir: str | Path | None = None, extra_data: Sequence[str] = ()) -> dict:
    """Search blend weights on `split` (and the `extra_data` datasets, mixer.data); write
    `run_dir` (config.json, weights.json, weights.md) when given; return the config."""
    if objective not in OBJECTIVES:
        raise PipelineError(f"blend objective '{objective}': choose one of {', '.join(OBJECTIVES)}")
    grid_divisions(step)   # a bad step fails before minutes of reading stems
    spec = InputSpec.from_store(store, dataset_id, models, with_mixture=False)
    info = store.dataset_info(dataset_id)
    win = int(info.get("sample_rate", 44100))   # museval's 1-s frames
    tracks = fitting_tracks(store, dataset_id, split, extra_data, spec.model_keys)
    if not tracks:
        raise PipelineError(f"{store.dataset_dir(dataset_id)}: no '{split}' tracks to search on")
    pairs = ((store.references(d, t), [store.stems(k, d, t) for k in spec.model_keys])
             for d, t in tracks)
    stats = collect_stats(pairs, spec, win)
    found = search(stats, step, objective)

    weights = {t: {spec.model_keys[m]: round(float(w), 6) for m, w in zip(st.models, found.weights[j])}
               for j, (t, st) in enumerate(zip(spec.targets, stats))}
    table = {k: {t: weights[t].get(k) for t in spec.targets} for k in spec.model_keys}
    best = {t: found.best[j] for j, t in enumerate(spec.targets)}
    single = {k: {t: found.single[j].get(m) for j, t in enumerate(spec.targets)}
              for m, k in enumerate(spec.model_keys)}
    config = run_config(METHOD, spec, dataset_id,
                        BlendOptions(step, objective, split, tuple(extra_data)),
                        split=split, step=step, objective=objective, frame=win, weights=weights,
                        validation={"blend": best, "single_models": single,
                                    "tracks": describe_tracks(tracks, dataset_id)},
                        search={"rounds": found.rounds, "converged": found.converged})
    if run_dir is not None:
        run_dir = Path(run_dir)
        write_json_atomic(run_dir / "config.json", config)
        write_json_atomic(run_dir / "weights.json",
                          {"models": list(spec.model_names), "keys": list(spec.model_keys),
                           "sources": list(spec.targets),
                           "weights": [[table[k][t] for t in spec.targets] for k in spec.model_keys]})
        (run_dir / "weights.md").write_text(_markdown(spec, table, best, single, objective, split))
    return config


# ---- the method ------------------------------------------------------------------------------
METHOD = "blend"


@dataclass(frozen=True)
class BlendOptions:
    step: float = option(0.05, "grid step on the weight simplex (must divide 1)")
    objective: str = option("museval", "museval (median/median framewise SDR) or usdr (mean "
                            "whole-track SDR)", choices=OBJECTIVES)
    split: str = option("valid", "split the weights are searched on")
    extra_data: tuple[str, ...] = extra_data_option()


class BlendMixer(Mixer):
    def estimate(self, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
        check_inputs(self.spec, mixture, stems_by_key)
        return apply_blend(self.config["weights"], stems_by_key,
                           dict(zip(self.spec.model_keys, self.spec.model_sources)), self.spec.targets)

    def matrix(self) -> np.ndarray:
        """The blend as the [in, out] mixing matrix over the channel layout of a mixer."""
        names_in, names_out = self.spec.input_names(), self.spec.output_names()
        W = np.zeros((len(names_in), len(names_out)), dtype=np.float32)
        for target, by_model in self.config["weights"].items():
            for key, w in by_model.items():
                model = self.spec.model_names[self.spec.model_keys.index(key)]
                for c in ("L", "R"):
                    W[names_in.index(f"{model}.{target}.{c}"), names_out.index(f"{target}.{c}")] = w
        return W


def _fit(r: FitRequest) -> dict:
    o = r.options
    return search_blend(r.store, r.dataset_id, r.models, step=o.step, objective=o.objective,
                        split=o.split, run_dir=r.run_dir, extra_data=o.extra_data)


RECORD = Method(
    name=METHOD,
    summary="Danna-Sep: per source, convex weights over the models, searched on a grid",
    options=BlendOptions, fit=_fit,
    load=lambda config, run_dir, **_: BlendMixer(config, run_dir),
    reads=lambda o: [("search", o.split, "split")])
