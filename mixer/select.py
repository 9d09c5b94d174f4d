"""Automatic choice of base models: greedy forward selection (and backward elimination) by gain.

`pipeline select-models -m A -m B -m C ... --by blend|conv1x1` scores sets of models on the
selection split (default `select`, a fixed tenth of train) and adds, one at a time, the model
whose addition scores best, while the gain exceeds `min_gain` dB; optionally it then removes,
one at a time, any model whose removal costs at most `min_gain`. The score of a set is the mean
over the dataset's sources of

* --by blend: the objective of the best Danna-Sep blend of the set (mixer.blendsearch's search, in
  its `search_mode`, the blend's option `search` (`--search`): the exhaustive grid while it is
  small, else the local search, so pools of 20 and more stay affordable; from one pass of
  per-frame inner products over all candidates; a set in which no model outputs some source is
  not a system and is never chosen);
* --by conv1x1: the objective of the conv1x1 mixer over the set (inputs: the mixture and every
  output of the set's models, normalised per track as mixer.inputs does), its matrix fitted in
  closed form by least squares on the same split, i.e. the conv1x1 trained to convergence under
  an L2 loss (train-mixer uses L1 and Adam). Per-frame Gram matrices of all channels are
  collected once, so every fit and score is a small linear solve and a few products.

Both score in-sample, as the blend's own search does. A model that adds nothing (pure noise, an
exact duplicate of one already chosen) gains ~0 dB (the blend gives it weight 0 or splits a
weight between identical estimates; least squares gains ~channels/samples), below any sensible
`min_gain`, so it is never chosen. (One exception, by design of the convex blend: a *quiet*
noise model, far below the music, can gain a little under --by blend, because giving it some
weight is the only way the blend can shrink the other estimates, weights summing to 1; a noise
model as loud as the music never helps.)

The chosen list is written as JSON (the selection file), which experiment files name in a
[[systems]] table as `models_from = "PATH"` instead of `models = [...]`.
"""
from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core.errors import PipelineError
from core.progress import progress_bar
from core.store import StemStore, read_json, write_json_atomic
from mixer.blend import ROW_FRAMES, collect_stats, frame_blocks, grams, silent_frames
from mixer.blendsearch import check_search, nanmedian_rows, search, search_modes
from mixer.data import fitting_tracks
from mixer.inputs import (
    InputSpec,
    assemble_inputs,
    assemble_targets,
    mixture_stats,
    normalise,
)

BY = ("blend", "conv1x1")
SCORE_FRAMES = 1024      # frames scored at once: the temporaries stay a few MiB at any length


# ---- scores of a set of models ---------------------------------------------------------------
class BlendScore:
    """Mean over sources of the best blend's objective for a set of model indices."""

    def __init__(self, stats, step: float, objective: str, search_mode: str = "auto"):
        self.stats, self.step, self.objective, self.search_mode = stats, step, objective, search_mode

    def __call__(self, models: list[int]) -> float:
        sub = [st.restricted(models) for st in self.stats]
        if any(st is None for st in sub):
            return -np.inf
        return float(np.mean(search(sub, self.step, self.objective, self.search_mode).best))


@dataclass
class Conv1x1Stats:
    """Per museval frame (all tracks' frames concatenated): the Gram matrix of the normalised
    input channels X and target channels Y, and what museval's rules need."""

    G: np.ndarray            # [F, C + O, C + O], rows X (mixture first) then Y, normalised units
    scale: np.ndarray        # [F] std^2 of the frame's track mixture: normalised -> real energy
    rr: np.ndarray           # [F, S] reference energy per source (both channels)
    ref_silent: np.ndarray   # [F, S] museval-silent reference
    zero: np.ndarray         # [F, C] input channel all zero in the frame (and track mean 0)
    track: np.ndarray        # [F]
    full: np.ndarray         # [F] a museval frame (not a trailing partial one)
    channels: list           # per model, its input channels' rows in X
    n_inputs: int


def collect_conv1x1_stats(store: StemStore, dataset_id: str, spec: InputSpec, tracks,
                          win: int, progress: bool = False) -> Conv1x1Stats:
    """tracks: TrackEntry of `dataset_id`, or (dataset id, TrackEntry) pairs (mixer.data)."""
    C, O = spec.in_channels, spec.out_channels
    per_block = max(1, ROW_FRAMES // (C + O))
    acc = {k: [] for k in ("scale", "rr", "ref_silent", "zero", "track", "full")}
    # The Gram matrices are the bulk ((C + O)^2 float64 per frame, growing with the training audio):
    # they go to an unlinked temporary file, read back as a memory map, whose pages the kernel
    # may evict, instead of anonymous memory that every remix would add to.
    spill, frames = tempfile.TemporaryFile(prefix="conv1x1-grams-"), 0
    for t, item in enumerate(progress_bar(tracks, desc="conv1x1 statistics", unit="track",
                                          disable=not progress)):
        ds, track = item if isinstance(item, tuple) else (dataset_id, item)
        mixture = store.mixture(ds, track)
        stems = {k: store.stems(k, ds, track) for k in spec.model_keys}
        refs = store.references(ds, track)
        stats = mixture_stats(mixture)
        for start, length, count, full in frame_blocks(mixture.shape[-1], win, per_block):
            stop = start + length * count
            raw = assemble_inputs(spec, mixture, stems, start, stop)
            # the mixer's output is sigma * (W x') + mean: exactly silent only where every input
            # is and the track's mean is 0
            zero = ~np.any(raw.reshape(C, count, length) != 0, axis=-1).T & (stats[0] == 0)
            x = normalise(raw, stats)
            y = normalise(assemble_targets(refs, start, stop), stats)
            z = np.concatenate([x, y]).astype(np.float64).reshape(C + O, count, length).transpose(1, 0, 2)
            ref = np.asarray(refs[:, :, start:stop])
            grams(z).tofile(spill)
            frames += count
            acc["zero"].append(zero)
            acc["rr"].append(np.square(ref, dtype=np.float64).reshape(-1, 2, count, length)
                             .sum(axis=(1, 3)).T)
            acc["ref_silent"].append(np.stack([silent_frames(r, count, length) for r in ref], axis=1))
            acc["scale"].append(np.full(count, stats[1] ** 2))
            acc["track"].append(np.full(count, t))
            acc["full"].append(np.full(count, full))
    first = 2 * spec.with_mixture + np.cumsum([0] + [2 * len(s) for s in spec.model_sources])
    channels = [list(range(first[m], first[m + 1])) for m in range(len(spec.model_keys))]
    spill.flush()
    shape = (frames, C + O, C + O)
    G = np.memmap(spill, dtype=np.float64, mode="r", shape=shape) if frames else np.zeros(shape)
    spill.close()   # the map keeps its own reference to the file
    return Conv1x1Stats(G=G, **{k: np.concatenate(v) for k, v in acc.items()}, channels=channels,
                        n_inputs=C)


class Conv1x1Score:
    """Mean over sources of the least-squares conv1x1's objective for a set of model indices."""

    def __init__(self, stats: Conv1x1Stats, objective: str, with_mixture: bool = True):
        self.st, self.objective, self.with_mixture = stats, objective, with_mixture
        G = stats.G
        self.total = sum((G[a:a + SCORE_FRAMES].sum(0) for a in range(0, len(G), SCORE_FRAMES)),
                         np.zeros(G.shape[1:]))     # every sample's Gram matrix: what W fits

    def fit(self, models: list[int]) -> tuple[list[int], np.ndarray]:
        """(input rows, W [rows, O]) minimising the squared error over every sample of the split."""
        st = self.st
        rows = [0, 1] * self.with_mixture + [c for m in models for c in st.channels[m]]
        ys = list(range(st.n_inputs, st.G.shape[1]))
        A, B = self.total[np.ix_(rows, rows)], self.total[np.ix_(rows, ys)]
        return rows, np.linalg.lstsq(A, B, rcond=None)[0]   # min-norm when rows are collinear

    def __call__(self, models: list[int]) -> float:
        st = self.st
        rows, W = self.fit(models)
        ys = list(range(st.n_inputs, st.G.shape[1]))

        def residual(G):   # [f, O]: |y - W x|^2 per frame and output channel, normalised units
            gxx, gxy = G[:, rows][:, :, rows], G[:, rows][:, :, ys]
            gyy = np.einsum("foo->fo", G[:, ys][:, :, ys])
            return gyy - 2 * np.einsum("fco,co->fo", gxy, W) + np.einsum("co,fcd,do->fo", W, gxx, W)

        err = np.concatenate([residual(st.G[a:a + SCORE_FRAMES])
                              for a in range(0, len(st.G), SCORE_FRAMES)] or [np.zeros((0, len(ys)))])
        err = np.maximum(st.scale[:, None] * (err[:, 0::2] + err[:, 1::2]), 0.0)   # [F, S]
        if self.objective == "usdr":
            tracks = np.unique(st.track)
            rr = np.stack([st.rr[st.track == t].sum(0) for t in tracks])
            e = np.stack([err[st.track == t].sum(0) for t in tracks])
            return float(np.mean(10 * np.log10((rr + 1e-7) / (e + 1e-7))))
        f = st.full
        # museval: a frame counts for no source when any reference or any estimate is silent
        # (an estimate is silent when every input it mixes is); a perfect frame is skipped
        valid = (~st.ref_silent[f].any(1) & ~st.zero[f][:, rows].all(1))[:, None] & (err[f] > 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            sdr = np.where(valid, 10 * np.log10(st.rr[f] / err[f]), np.nan)      # [F_full, S]
        tracks = st.track[f]
        per_track = np.stack([nanmedian_rows(sdr[tracks == t].T) for t in np.unique(tracks)], axis=1)
        scores = nanmedian_rows(per_track)                                      # [S]
        return float(np.mean(np.nan_to_num(scores, nan=-np.inf)))


# ---- greedy selection ------------------------------------------------------------------------
@dataclass
class Step:
    action: str              # add | remove
    model: int
    score: float
    gain: float | None       # None for the first model


def greedy(n_models: int, score: Callable[[list[int]], float], min_gain: float,
           backward: bool = False, log=None) -> tuple[list[int], list[Step], dict | None]:
    """Forward selection (then backward elimination): (chosen, path, why it stopped adding)."""
    chosen, path, current, stopped = [], [], None, None
    while len(chosen) < n_models:
        trials = {m: score(chosen + [m]) for m in range(n_models) if m not in chosen}
        best = max(trials, key=lambda m: (trials[m], -m))     # the first candidate on a tie
        if not np.isfinite(trials[best]):
            if not chosen:
                raise PipelineError("select-models: no candidate alone outputs every source of "
                                    "the dataset, so no set can be scored; add such a model")
            break
        gain = None if current is None else trials[best] - current
        if gain is not None and gain <= min_gain:
            stopped = {"model": best, "score": trials[best], "gain": gain}
            break
        chosen.append(best)
        current = trials[best]
        path.append(Step("add", best, current, gain))
        if log:
            log(path[-1])
    while backward and len(chosen) > 1:
        trials = {m: score([c for c in chosen if c != m]) for m in chosen}
        best = max(trials, key=lambda m: (trials[m], -m))
        if trials[best] < current - min_gain:
            break
        chosen.remove(best)
        path.append(Step("remove", best, trials[best], trials[best] - current))
        current = trials[best]
        if log:
            log(path[-1])
    return chosen, path, stopped


def select_models(store: StemStore, dataset_id: str, models: list[str], *, by: str = "blend",
                  split: str = "select", objective: str = "museval", step: float = 0.1,
                  min_gain: float = 0.01, backward: bool = False, search_mode: str = "auto",
                  out: str | Path | None = None, progress: bool = True, log=print,
                  extra_data: Sequence[str] = ()) -> dict:
    """Choose among `models` on `split` (and the `extra_data` datasets, mixer.data), scoring
    blends with the search `search_mode` (mixer.blendsearch); write the selection file to `out`
    when given."""
    if by not in BY:
        raise PipelineError(f"select-models --by {by}: choose one of {', '.join(BY)}")
    check_search(objective, search_mode, "select-models")
    if len(models) < 2:
        raise PipelineError("select-models: give at least two candidate models (-m A -m B ...)")
    spec = InputSpec.from_store(store, dataset_id, models, with_mixture=by == "conv1x1")
    if len(set(spec.model_keys)) != len(spec.model_keys):
        raise PipelineError("select-models: a model is named twice among the candidates")
    if by == "blend":   # the largest set's grid: a refused exhaustive search fails before any work
        search_modes([sum(t in s for s in spec.model_sources) for t in spec.targets], step,
                     search_mode, "select-models")
    tracks = fitting_tracks(store, dataset_id, split, extra_data, spec.model_keys)
    if not tracks:
        raise PipelineError(f"{store.dataset_dir(dataset_id)}: no '{split}' tracks to select on")
    win = int(store.dataset_info(dataset_id).get("sample_rate", 44100))
    if by == "blend":
        pairs = ((store.references(d, t), [store.stems(k, d, t) for k in spec.model_keys])
                 for d, t in progress_bar(tracks, desc="blend statistics", unit="track",
                                          disable=not progress))
        score = BlendScore(collect_stats(pairs, spec, win), step, objective, search_mode)
    else:
        score = Conv1x1Score(collect_conv1x1_stats(store, dataset_id, spec, tracks, win, progress),
                             objective)
    names = spec.model_names

    def show(s: Step):
        gain = "" if s.gain is None else f" ({s.gain:+.3f} dB)"
        log(f"  {s.action} {names[s.model]}: {objective} SDR {s.score:.3f} dB{gain}")

    log(f"select-models by {by} on the '{split}' split ({len(tracks)} tracks), min gain {min_gain} dB:")
    chosen, path, stopped = greedy(len(names), score, min_gain, backward, log=show)
    if stopped:
        log(f"  stop: adding {names[stopped['model']]} would gain {stopped['gain']:+.3f} dB "
            f"(<= {min_gain})")
    result = {"by": by, "dataset": dataset_id, "split": split, "extra_data": list(extra_data),
              "objective": objective, "step": step if by == "blend" else None,
              "search": search_mode if by == "blend" else None,
              "min_gain": min_gain, "backward": backward,
              "candidates": [{"key": k, "name": n} for k, n in zip(spec.model_keys, names)],
              "models": [{"key": spec.model_keys[m], "name": names[m]} for m in chosen],
              "score": path[-1].score,
              "path": [{"action": s.action, "key": spec.model_keys[s.model], "name": names[s.model],
                        "score": s.score, "gain": s.gain} for s in path],
              "stopped": None if not stopped else {"key": spec.model_keys[stopped["model"]],
                                                   "name": names[stopped["model"]],
                                                   "score": stopped["score"], "gain": stopped["gain"]}}
    if out is not None:
        write_json_atomic(Path(out), result)
    return result


def read_selection(path: str | Path) -> list[str]:
    """The model keys a selection file chose (what `models_from` in an experiment file reads)."""
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: selection file not found (write it with `pipeline select-models`)")
    try:
        data = read_json(path)
        keys = [m["key"] for m in data["models"]]
    except Exception:
        raise PipelineError(f"{path}: not a selection file written by `pipeline select-models`") from None
    if not keys:
        raise PipelineError(f"{path}: the selection chose no model")
    return keys
