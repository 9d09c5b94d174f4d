"""Band-wise blend: per target source and per frequency band, convex weights over the models.

The plain blend (mixer.blend) gives a model one weight for a source at every frequency; a
common trick is to trust one model for the low band and another for the highs. Here the STFT
(mixer.spectral's: MSST's 2048-point periodic Hann, hop 1024, perfectly reconstructing) is cut
into K bands of whole bins, mel- or octave-spaced, and the estimate of target j is

    s_hat = ISTFT( sum_m g_m X_m ),   g_m(f) = w[band(f), m],   w[b] >= 0, sum_m w[b, m] = 1,

a linear recombination per band. Equal weights in every band give ISTFT(STFT(sum_m w_m x_m)),
the plain blend up to float rounding.

Search. Being linear, s_hat = sum_b sum_m w[b, m] x_m^(b) with x_m^(b) = ISTFT(P_b X_m) the
band-b part of model m's estimate (P_b the band's bins; the parts of a model sum to it): a plain
blend over M x K "band signals" whose weights are convex within each band. So mixer.blend's
machinery scores any band weights exactly, from per-frame inner products of the band signals
with the reference and with each other (collect_stats, once), with museval's silence rule and the
same objectives. The grid is a product of per-band simplices (231^8 points for 3 models, 8 bands
at step 0.05), so it is searched by coordinate ascent: start from the plain blend's best point
(every band alike), then for one band at a time try its whole simplex grid with the other bands
fixed and keep the best, sweeping the bands until none changes. Every accepted move improves the
objective on the search split, so the result is never below the plain blend there. Silence
masks couple the sources as in mixer.blendsearch.search: rounds repeat until they are consistent.

Where one band's simplex grid is too large to score whole (mixer.blendsearch's modes: 'auto'
goes 'local' above AUTO_POINTS points, e.g. 6 models at step 0.05), the plain blend is
mixer.blendsearch's local search on the models' whole signals (the band signals summed), and each
band's step is an exchange-move ascent within the band instead of its whole grid: the same
guarantee (never below the plain blend), at a cost polynomial in the number of models.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from core.chunking import segment_of
from core.errors import PipelineError
from core.options import option
from core.progress import progress_bar
from core.store import StemStore, write_json_atomic
from mixer.blend import BlendOptions, collect_stats, source_models
from mixer.blendsearch import (
    SourceObjective,
    SourceStats,
    ascend,
    blend_sounds,
    check_search,
    frame_contexts,
    local_search,
    score,
    search_modes,
)
from mixer.data import describe as describe_tracks
from mixer.data import fitting_tracks
from mixer.ensemble import FitRequest, Method, Mixer, run_config
from mixer.inputs import InputSpec
from mixer.simplex import grid_divisions, simplex_grid
from mixer.spectral import blockwise
from mixer.stft import HOP, N_FFT, istft_frames, stft_frames

METHOD = "band-blend"
SCALES = ("mel", "octave")
OCTAVE_FLOOR_HZ = 100.0   # octave scale: log-spaced from here to Nyquist, one band below it
MAX_ROUNDS = 5            # silence-mask rounds, as mixer.blend
MAX_SWEEPS = 20           # sweeps over the bands per round (each must improve the objective)
ROW_FRAMES = 64           # rows x frames of float64 converted at once in collect_stats
TOLERANCE = 1e-9          # dB: a move must gain more than float noise


# ---- bands -----------------------------------------------------------------------------------
def band_edges(count: int, scale: str, rate: int) -> tuple[np.ndarray, np.ndarray]:
    """(first STFT bin of each band and the end [count + 1], the edges in Hz [count + 1]).

    mel: equal widths on the HTK mel scale from 0 Hz to Nyquist. octave: equal widths in octaves
    from OCTAVE_FLOOR_HZ to Nyquist, plus one band for everything below (8 bands at 44.1 kHz are
    ~1.1 octaves each, 16 about half an octave).
    """
    if scale not in SCALES:
        raise PipelineError(f"band scale '{scale}': choose one of {', '.join(SCALES)}")
    if not 2 <= count <= 64:
        raise PipelineError(f"{count} bands: choose 2 to 64 (8-16 is usual)")
    nyquist = rate / 2
    if scale == "mel":
        top = 2595 * np.log10(1 + nyquist / 700)
        hz = 700 * (10 ** (np.linspace(0, top, count + 1) / 2595) - 1)
    else:
        if nyquist <= 2 * OCTAVE_FLOOR_HZ:
            raise PipelineError(f"octave bands need a sample rate above {4 * OCTAVE_FLOOR_HZ:.0f} Hz")
        hz = np.concatenate([[0.0], np.geomspace(OCTAVE_FLOOR_HZ, nyquist, count)])
    bins = np.round(hz * N_FFT / rate).astype(int)
    bins[0], bins[-1] = 0, N_FFT // 2 + 1      # the Nyquist bin belongs to the top band
    if np.any(np.diff(bins) < 1):
        raise PipelineError(f"{count} {scale} bands at {rate} Hz: some band would hold no STFT "
                            f"bin ({N_FFT}-point STFT); use fewer bands")
    hz[-1] = nyquist
    return bins, hz


def band_masks(bins: np.ndarray) -> torch.Tensor:
    """[K, F] 0/1: the bins of each band (every bin in exactly one band)."""
    masks = torch.zeros(len(bins) - 1, N_FFT // 2 + 1)
    for b in range(len(bins) - 1):
        masks[b, bins[b]:bins[b + 1]] = 1
    return masks


# ---- band signals as the "models" collect_stats reads ------------------------------------------
class _SourceRows:
    """Model stems [S_m, 2, n] seen as one source's [2, n], read a range at a time."""

    def __init__(self, stems, k: int):
        self.stems, self.k, self.shape = stems, k, (2, stems.shape[-1])

    def __getitem__(self, key):
        return self.stems[self.k, :, key[-1]]


class _BandCache:
    """The K band signals of one model's source k over samples [a, b), the last range asked for:
    collect_stats asks for every band of a (source, block) in a row, so each is computed once."""

    def __init__(self, stems, masks: torch.Tensor):
        self.stems, self.masks, self.key, self.value = stems, masks, None, None

    def get(self, k: int, start: int, stop: int) -> np.ndarray:
        if self.key != (k, start, stop):
            a, b = start // HOP * HOP, -(-stop // HOP) * HOP      # on the track's frame grid
            x = segment_of(_SourceRows(self.stems, k), a - HOP, b - a + 2 * HOP).float()
            z = stft_frames(x)                                      # [2, frames, F]
            z = torch.view_as_complex(torch.view_as_real(z)[None] * self.masks[:, None, None, :, None])
            self.key, self.value = (k, start, stop), istft_frames(z)[..., start - a:stop - a].numpy()
        return self.value


class _BandSource:
    """Band `band` of a model's source k, quacking like stems[k] for collect_stats: [:, a:b]."""

    def __init__(self, cache: _BandCache, k: int, band: int):
        self.cache, self.k, self.band = cache, k, band

    def __getitem__(self, key) -> np.ndarray:
        start, stop, _ = key[-1].indices(self.cache.stems.shape[-1])
        return self.cache.get(self.k, start, stop)[self.band]


class _BandModel:
    """Band `band` of a model, quacking like its stems for collect_stats: m[k][:, a:b]."""

    def __init__(self, cache: _BandCache, band: int):
        self.cache, self.band = cache, band

    def __getitem__(self, k: int) -> _BandSource:
        return _BandSource(self.cache, k, self.band)


def band_spec(spec: InputSpec, count: int) -> InputSpec:
    """The models of `spec` split into `count` band models each, model-major (m0.b0, m0.b1, ...)."""
    return InputSpec(tuple(f"{k}#b{b}" for k in spec.model_keys for b in range(count)),
                     tuple(f"{n}.b{b}" for n in spec.model_names for b in range(count)),
                     tuple(s for s in spec.model_sources for _ in range(count)),
                     spec.targets, with_mixture=False)


def collect_band_stats(tracks, spec: InputSpec, bins: np.ndarray, win: int) -> list[SourceStats]:
    """mixer.blend.collect_stats over the band signals: tracks yields (references, [stems per
    model]); SourceStats.models index band_spec's models (model i of target j, band b: column
    i * K + b)."""
    masks, count = band_masks(bins), len(bins) - 1
    rows = 1 + count * max(len(p) for p in source_models(spec))
    per_block = max(1, ROW_FRAMES // rows)

    def band_tracks():
        for refs, stems in tracks:
            caches = [_BandCache(s, masks) for s in stems]
            yield refs, [_BandModel(c, b) for c in caches for b in range(count)]
    return collect_stats(band_tracks(), band_spec(spec, count), win, frames_per_block=per_block)


# ---- the search ------------------------------------------------------------------------------
@dataclass
class BandSearch:
    weights: list[np.ndarray]     # per target [K, M_j]
    best: list[float]             # per target, objective of the band weights
    plain: list[np.ndarray]       # per target [M_j], the plain blend's weights (the start)
    plain_best: list[float]       # per target, its objective
    single: list[dict[int, float]]   # per target, {model index in spec: objective alone}
    rounds: int
    sweeps: int                   # band sweeps, all targets and rounds
    points: int                   # grid points scored
    converged: bool
    modes: list[str] | None = None   # per target, exhaustive | local (mixer.blendsearch's modes)


def _flat(w: np.ndarray) -> np.ndarray:
    """[K, M] band weights -> the weights of the band models (column i * K + b)."""
    return w.T.reshape(-1)


def _best(values: np.ndarray) -> int:
    return int(np.argmax(np.nan_to_num(values, nan=-np.inf)))


def _ascend(st: SourceStats, grid: np.ndarray, count: int, objective: str, ctx, counter: dict):
    """Plain blend start, then coordinate ascent over the bands: ([K, M] weights, value, plain
    weights [M], plain value)."""
    values = score(st, np.repeat(grid, count, axis=1), objective, ctx)
    counter["points"] += len(grid)
    p = _best(values)
    plain, plain_value = grid[p], float(values[p])
    w, value = np.tile(plain, (count, 1)), plain_value
    for _ in range(MAX_SWEEPS):
        counter["sweeps"] += 1
        moved = False
        for b in range(count):
            W = np.repeat(_flat(w)[None], len(grid), axis=0)
            W[:, b::count] = grid
            values = score(st, W, objective, ctx)
            counter["points"] += len(grid)
            p = _best(values)
            if values[p] > value + TOLERANCE:
                w, value, moved = w.copy(), float(values[p]), True
                w[b] = grid[p]
        if not moved:
            break
    return w, value, plain, plain_value


def tied(st: SourceStats, count: int) -> SourceStats:
    """The statistics of the models' whole signals (each model's band signals summed): the plain
    blend's, whose weights are the same in every band."""
    F, M = len(st.rr), len(st.models) // count

    def b_(b):
        return b.reshape(len(b), M, count).sum(2)

    def G_(G):
        return G.reshape(len(G), M, count, M, count).sum((2, 4))
    return SourceStats([m // count for m in st.models[::count]], st.rr, st.ref_silent,
                       st.silent.reshape(F, M, count).all(2), b_(st.b), G_(st.G), st.track, st.full,
                       st.n_tracks, {"rr": st.totals["rr"], "b": b_(st.totals["b"]),
                                     "G": G_(st.totals["G"])})


def _ascend_local(st: SourceStats, count: int, K: int, objective: str, ctx, counter: dict):
    """_ascend for a grid too large to score whole: the plain blend by mixer.blendsearch's local search,
    then per band an exchange-move ascent among that band's weights, the other bands fixed."""
    whole = tied(st, count)
    plain_obj = SourceObjective(whole, objective, ctx)
    plain, _, _ = local_search(plain_obj, whole, K)
    obj = SourceObjective(st, objective, ctx)
    M = len(plain)
    flat = np.repeat(plain, count)                       # band model i * count + b
    plain_value = value = float(np.nan_to_num(obj.values(flat[None] / K)[0], nan=-np.inf))
    for _ in range(MAX_SWEEPS):
        counter["sweeps"] += 1
        moved = False
        for b in range(count):
            flat, value, moves = ascend(obj, flat, K, cols=np.arange(M) * count + b, value=value)
            moved = moved or moves > 0
        if not moved:
            break
    counter["points"] += plain_obj.scored + obj.scored
    return flat.reshape(M, count).T / K, value, plain / K, plain_value


def search_bands(stats: list[SourceStats], count: int, step: float, objective: str,
                 search_mode: str = "auto") -> BandSearch:
    check_search(objective, search_mode, "band-blend")
    K = grid_divisions(step)
    modes = search_modes([len(st.models) // count for st in stats], step, search_mode, "band-blend")
    grids = [simplex_grid(len(st.models) // count, step) if mode == "exhaustive" else None
             for st, mode in zip(stats, modes)]
    contexts = frame_contexts(stats, objective)
    counter = {"points": 0, "sweeps": 0}
    masks = [blend_sounds(st, np.ones((1, len(st.models))))[0] for st in stats]
    converged = objective == "usdr"
    for rounds in range(1, MAX_ROUNDS + 1):
        ctx = contexts(masks)
        found = [_ascend(st, g, count, objective, c, counter) if g is not None else
                 _ascend_local(st, count, K, objective, c, counter) for st, g, c in zip(stats, grids, ctx)]
        new_masks = [blend_sounds(st, _flat(f[0])[None])[0] for st, f in zip(stats, found)]
        if objective == "usdr" or all(np.array_equal(a, b) for a, b in zip(masks, new_masks)):
            converged = True
            break
        masks = new_masks
    ctx = contexts(new_masks)
    weights = [f[0] for f in found]
    best = [float(score(st, _flat(w)[None], objective, c)[0]) for st, w, c in zip(stats, weights, ctx)]
    plain = [f[2] for f in found]
    plain_best = [float(score(st, np.repeat(p[None], count, axis=1), objective, c)[0])
                  for st, p, c in zip(stats, plain, ctx)]
    single = []
    for st, c in zip(stats, ctx):
        models = st.models[::count]                     # band 0 of each model: its index * K
        eye = np.eye(len(models))
        single.append({m // count: float(score(st, np.repeat(eye[i][None], count, axis=1),
                                               objective, c)[0]) for i, m in enumerate(models)})
    return BandSearch(weights, best, plain, plain_best, single, rounds, counter["sweeps"],
                      counter["points"], converged, modes)


# ---- applying --------------------------------------------------------------------------------
def apply_config(config: dict, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
    """Estimates [S, 2, n] of a band-blend run: per target, sum_m g_m X_m through the ISTFT."""
    spec = InputSpec.from_dict(config["inputs"])
    bins = np.asarray(config["bands"]["bins"])
    band_of_bin = np.repeat(np.arange(len(bins) - 1), np.diff(bins))
    gains = []
    for target, pairs in zip(spec.targets, source_models(spec)):
        w = np.array([config["weights"][target][spec.model_keys[m]] for m, _ in pairs])  # [M, K]
        gains.append(torch.tensor(w[:, band_of_bin], dtype=torch.float32)[:, None, None, :, None])

    def mix(j: int, z: torch.Tensor) -> torch.Tensor:   # z [M, 2, frames, F] complex
        return torch.view_as_complex((torch.view_as_real(z) * gains[j]).sum(0))
    return blockwise(spec, mixture, stems_by_key, mix, spectral=True)


# ---- the stage -------------------------------------------------------------------------------
def _markdown(spec: InputSpec, config: dict) -> str:
    hz = config["bands"]["edges_hz"]
    lines = [f"## Band-blend weights ({config['bands']['count']} {config['bands']['scale']} bands)", ""]
    for target in spec.targets:
        by_model = config["weights"][target]
        names = [n for k, n in zip(spec.model_keys, spec.model_names) if k in by_model]
        lines += [f"### {target}", "", "| band (Hz) | " + " | ".join(names) + " |",
                  "|---" * (len(names) + 1) + "|"]
        for b in range(config["bands"]["count"]):
            cells = [f"{by_model[k][b]:.2f}" for k in spec.model_keys if k in by_model]
            lines.append(f"| {hz[b]:.0f}-{hz[b + 1]:.0f} | " + " | ".join(cells) + " |")
        lines.append("")
    v = config["validation"]
    lines += [f"## {config['objective']} SDR on the `{config['split']}` split (dB)", "",
              "| system | " + " | ".join(spec.targets) + " |", "|---" * (len(spec.targets) + 1) + "|"]
    for key, name in zip(spec.model_keys, spec.model_names):
        lines.append(f"| {name} | " + " | ".join("-" if v["single_models"][key].get(t) is None
                                                 else f"{v['single_models'][key][t]:.3f}"
                                                 for t in spec.targets) + " |")
    lines.append("| plain blend | " + " | ".join(f"{v['plain_blend'][t]:.3f}" for t in spec.targets) + " |")
    lines.append("| **band-blend** | " + " | ".join(f"**{v['band_blend'][t]:.3f}**" for t in spec.targets) + " |")
    return "\n".join(lines) + "\n"


def search_band_blend(store: StemStore, dataset_id: str, models: list[str], *, bands: int = 8,
                      scale: str = "mel", step: float = 0.05, objective: str = "museval",
                      split: str = "select", search_mode: str = "auto",
                      run_dir: str | Path | None = None, progress: bool = True,
                      extra_data: Sequence[str] = ()) -> dict:
    """Search band weights on `split` (and the `extra_data` datasets, mixer.data) with the
    search `search_mode` (mixer.blendsearch); write `run_dir` (config.json, weights.md) when given."""
    check_search(objective, search_mode, "band-blend")
    spec = InputSpec.from_store(store, dataset_id, models, with_mixture=False)
    search_modes([len(p) for p in source_models(spec)], step, search_mode, "band-blend")
    info = store.dataset_info(dataset_id)
    rate = int(info.get("sample_rate", 44100))
    bins, hz = band_edges(bands, scale, rate)
    tracks = fitting_tracks(store, dataset_id, split, extra_data, spec.model_keys)
    if not tracks:
        raise PipelineError(f"{store.dataset_dir(dataset_id)}: no '{split}' tracks to search on")
    pairs = ((store.references(d, t), [store.stems(k, d, t) for k in spec.model_keys])
             for d, t in progress_bar(tracks, desc="band signals", unit="track", disable=not progress))
    stats = collect_band_stats(pairs, spec, bins, rate)
    found = search_bands(stats, bands, step, objective, search_mode)

    table = source_models(spec)
    weights = {t: {spec.model_keys[m]: [round(float(v), 6) for v in found.weights[j][:, i]]
                   for i, (m, _) in enumerate(table[j])} for j, t in enumerate(spec.targets)}
    config = run_config(
        METHOD, spec, dataset_id, BandBlendOptions(step=step, objective=objective, split=split, search=search_mode,
                                                 bands=bands, band_scale=scale,
                                                 extra_data=tuple(extra_data)),
        rate=rate, split=split, step=step, objective=objective, frame=rate,
        bands={"count": bands, "scale": scale, "bins": [int(b) for b in bins],
               "edges_hz": [round(float(h), 1) for h in hz]},
        stft={"n_fft": N_FFT, "hop": HOP, "window": "hann"}, weights=weights,
        validation={
                  "band_blend": {t: found.best[j] for j, t in enumerate(spec.targets)},
                  "plain_blend": {t: found.plain_best[j] for j, t in enumerate(spec.targets)},
                  "plain_weights": {t: {spec.model_keys[m]: round(float(found.plain[j][i]), 6)
                                        for i, (m, _) in enumerate(table[j])}
                                    for j, t in enumerate(spec.targets)},
                  "single_models": {k: {t: found.single[j].get(m) for j, t in enumerate(spec.targets)}
                                    for m, k in enumerate(spec.model_keys)},
                  "tracks": describe_tracks(tracks, dataset_id)},
        search={"rounds": found.rounds, "sweeps": found.sweeps, "points": found.points,
                "converged": found.converged,
                "modes": {t: found.modes[j] for j, t in enumerate(spec.targets)}})
    if run_dir is not None:
        run_dir = Path(run_dir)
        write_json_atomic(run_dir / "config.json", config)
        (run_dir / "weights.md").write_text(_markdown(spec, config))
    return config


# ---- the method ------------------------------------------------------------------------------
@dataclass(frozen=True)
class BandBlendOptions(BlendOptions):
    split: str = option("select", "split the weights are searched on")
    bands: int = option(8, "number of frequency bands")
    band_scale: str = option("mel", "band spacing: mel (equal mel widths) or octave", choices=SCALES)


class BandBlendMixer(Mixer):
    def estimate(self, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
        return apply_config(self.config, mixture, stems_by_key)


def _fit(r: FitRequest) -> dict:
    o = r.options
    return search_band_blend(r.store, r.dataset_id, r.models, bands=o.bands, scale=o.band_scale,
                             step=o.step, objective=o.objective, split=o.split,
                             search_mode=o.search, run_dir=r.run_dir, progress=r.progress,
                             extra_data=o.extra_data)


RECORD = Method(
    name=METHOD,
    summary="per source and per frequency band, convex weights over the models, searched",
    options=BandBlendOptions, fit=_fit,
    load=lambda config, run_dir, **_: BandBlendMixer(config, run_dir),
    reads=lambda o: [("search", o.split, "split")])
