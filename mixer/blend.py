"""Danna-Sep linear blending: per source, convex weights over the models' estimates of it.

For target source j and the M_j models that output it, the blend is s_hat = sum_m w_m e_m with
w >= 0, sum w = 1. The weights are chosen on a grid on the simplex (step 0.05 by default) on the
validation split, maximising either

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

The search itself (exhaustive grid, or a local search for many models) is mixer.blendsearch's;
the grid and the least-squares blend on the simplex are mixer.simplex's.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np

from core.errors import PipelineError
from core.options import option
from core.store import StemStore, write_json_atomic
from mixer.blendsearch import (
    AUTO_POINTS,
    OBJECTIVES,
    SEARCH_MODES,
    SourceStats,
    check_search,
    search,
    search_modes,
)
from mixer.data import describe as describe_tracks
from mixer.data import extra_data_option, fitting_tracks
from mixer.ensemble import FitRequest, Method, Mixer, run_config
from mixer.inputs import InputSpec, check_inputs
from mixer.simplex import grid_divisions

FRAMES_PER_BLOCK = 16  # frames converted to float64 at once: bounds memory on long tracks
ROW_FRAMES = 64        # ... and at most this many rows x frames (many models)


# ---- per-frame statistics --------------------------------------------------------------------
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


def silent_frames(a: np.ndarray, count: int, length: int) -> np.ndarray:
    """[count]: museval's silence, L + R == 0 at every sample, of each frame of a [2, count * length].

    The exact sum of two floats is 0 only when L == -R: both zeros, or the same magnitude with
    opposite signs. Testing that on the samples' bits, in their own dtype, is the test museval
    makes in float32, without converting or adding (this pass is memory-bound)."""
    if a.dtype.kind != "f":
        a = a.astype(np.float64)
    u = a.view(f"u{a.itemsize}")
    sign = np.array(1 << (8 * a.itemsize - 1), dtype=u.dtype)
    left, right = u[0].reshape(count, length), u[1].reshape(count, length)
    sounds = ((left ^ right) != sign) & (((left | right) & ~sign) != 0)
    return ~np.any(sounds, axis=-1)


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
    # a frame's Gram matrix does not depend on the block it is computed in; many models, fewer frames
    frames_per_block = max(1, min(frames_per_block, ROW_FRAMES // (1 + max(map(len, table)))))
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
                silent = np.empty((count, len(pairs) + 1), dtype=bool)
                for row, signal in enumerate([refs[j]] + [stems[m][k] for m, k in pairs]):
                    part = np.asarray(signal[:, start:stop])
                    silent[:, row] = silent_frames(part, count, length)
                    x[:, row] = part.reshape(2, count, length).transpose(1, 0, 2)
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


GUARANTEES = {"exhaustive": "the grid's optimum",
              "local": "no exchange move gains; not below the best single model nor the "
                       "least-squares grid point"}


def search_record(found, spec: InputSpec, stats: list[SourceStats], extra: dict | None = None) -> dict:
    """config.json's "search": how each source was searched, what that guarantees, its cost."""
    per_source = {}
    for target, st, mode, d in zip(spec.targets, stats, found.modes, found.details):
        d = dict(d)
        if "least_squares_weights" in d:
            d["least_squares_weights"] = {spec.model_keys[m]: w for m, w in
                                          zip(st.models, d["least_squares_weights"])}
        per_source[target] = {"mode": mode, "guarantee": GUARANTEES[mode], **d}
    return {"rounds": found.rounds, "converged": found.converged, **(extra or {}),
            "sources": per_source}


def search_blend(store: StemStore, dataset_id: str, models: list[str], *, step: float = 0.05,
                 objective: str = "museval", split: str = "valid", search_mode: str = "auto",
                 run_dir: str | Path | None = None, extra_data: Sequence[str] = ()) -> dict:
    """Search blend weights on `split` (and the `extra_data` datasets, mixer.data) with the
    search `search_mode` (mixer.blendsearch); write `run_dir` (config.json, weights.json,
    weights.md) when given; return the config."""
    check_search(objective, search_mode)
    grid_divisions(step)   # a bad step fails before minutes of reading stems
    spec = InputSpec.from_store(store, dataset_id, models, with_mixture=False)
    search_modes([len(p) for p in source_models(spec)], step, search_mode)   # ... a huge grid too
    info = store.dataset_info(dataset_id)
    win = int(info.get("sample_rate", 44100))   # museval's 1-s frames
    tracks = fitting_tracks(store, dataset_id, split, extra_data, spec.model_keys)
    if not tracks:
        raise PipelineError(f"{store.dataset_dir(dataset_id)}: no '{split}' tracks to search on")
    pairs = ((store.references(d, t), [store.stems(k, d, t) for k in spec.model_keys])
             for d, t in tracks)
    stats = collect_stats(pairs, spec, win)
    found = search(stats, step, objective, search_mode)

    weights = {t: {spec.model_keys[m]: round(float(w), 6) for m, w in zip(st.models, found.weights[j])}
               for j, (t, st) in enumerate(zip(spec.targets, stats))}
    table = {k: {t: weights[t].get(k) for t in spec.targets} for k in spec.model_keys}
    best = {t: found.best[j] for j, t in enumerate(spec.targets)}
    single = {k: {t: found.single[j].get(m) for j, t in enumerate(spec.targets)}
              for m, k in enumerate(spec.model_keys)}
    options = BlendOptions(step=step, objective=objective, split=split, search=search_mode,
                           extra_data=tuple(extra_data))
    config = run_config(METHOD, spec, dataset_id, options,
                        split=split, step=step, objective=objective, frame=win, weights=weights,
                        validation={"blend": best, "single_models": single,
                                    "tracks": describe_tracks(tracks, dataset_id)},
                        search=search_record(found, spec, stats))
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
    search: str = option("auto", "how the simplex is searched: exhaustive (every grid point), "
                         "local (exchange moves from the least-squares blend; many models) or "
                         f"auto (exhaustive up to {AUTO_POINTS} grid points per source)",
                         choices=SEARCH_MODES)
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
                        split=o.split, search_mode=o.search, run_dir=r.run_dir,
                        extra_data=o.extra_data)


RECORD = Method(
    name=METHOD,
    summary="Danna-Sep: per source, convex weights over the models, searched on a grid",
    options=BlendOptions, fit=_fit,
    load=lambda config, run_dir, **_: BlendMixer(config, run_dir),
    reads=lambda o: [("search", o.split, "split")])
