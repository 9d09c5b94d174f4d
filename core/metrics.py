"""Separation metrics: museval-exact framewise SDR, MDX uSDR, museval's aggregation and JSON,
and full BSSEval v4 through museval itself.

Array conventions: ``[S, C, N]`` = (sources, channels, samples); float32 or float64 in, float64
math. Long score tables have the columns ``system, track, target, metric, frame, value``.

Why framewise SDR needs no BSSEval: in museval's v4 ``images`` mode (``museval.evaluate``,
``bss_eval(..., bsseval_sources_version=False)``) the estimate is split into
``s_true + e_spat + e_interf + e_artif`` with ``e_artif`` defined as the remainder
(``metrics._bss_decomp_mtifilt``), so ``e_spat + e_interf + e_artif == s_hat - s`` whatever the
distortion filters are, and ``_bss_crit`` gives ``SDR = 10 log10(sum s^2 / sum (s_hat - s)^2)``.
The filters only matter for ISR/SIR/SAR; they cost museval minutes and gigabytes per track.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import warnings
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from numpy.lib.stride_tricks import sliding_window_view

from core.config import SOURCES

LONG_COLUMNS = ["system", "track", "target", "metric", "frame", "value"]
BSSEVAL_METRICS = ("SDR", "ISR", "SIR", "SAR")  # the order museval.evaluate returns them in
USDR_EPS = 1e-7  # MDX21 / SDX23 (and demucs' new_sdr) add it to both energies


# --------------------------------------------------------------------------- framewise SDR


def _as_scn(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 3:
        raise ValueError(f"{name} must be [sources, channels, samples], got shape {x.shape}")
    return x


def _n_frames(n: int, win: float, hop: float) -> int:
    """museval ``metrics.Framing.nwin``: one frame of the whole track when the window does not
    fit, else ``floor((n - win + hop) / hop)``, which drops a trailing partial window."""
    if win >= n:
        return 1
    return int(np.floor((n - win + hop) / hop))


def _frames(x: np.ndarray, win: int, hop: int, n_frames: int) -> np.ndarray:
    """A strided view ``[..., n_frames, win]`` of the last axis (no copy)."""
    return sliding_window_view(x, win, axis=-1)[..., ::hop, :][..., :n_frames, :]


def _silent_frames(x: np.ndarray, win: int, hop: int, n_frames: int) -> np.ndarray:
    """museval's ``_any_source_silent`` per window for one source ``[C, N]``: every sample's sum
    over channels is 0 (sums in the input dtype, in museval's channel order)."""
    # The first few samples settle almost every window (music is rarely exactly 0), so only the
    # undecided windows get the full pass, a gather of their samples.
    starts = np.arange(n_frames) * hop
    head = x[:, starts[:, None] + np.arange(min(16, win))].sum(axis=0)
    undecided = ~(head != 0).any(-1)
    silent = np.zeros(n_frames, dtype=bool)
    if undecided.any():
        idx = starts[undecided, None] + np.arange(win)
        silent[undecided] = ~(x[:, idx].sum(axis=0) != 0).any(-1)
    return silent


def _pad_or_truncate(estimates: np.ndarray, n: int) -> np.ndarray:
    """museval.evaluate's ``pad_or_truncate``: estimates are cut or zero-padded at the end to the
    references' length (so padded zeros can make a frame silent, as in museval)."""
    m = estimates.shape[-1]
    if m > n:
        return estimates[..., :n]
    if m < n:
        return np.pad(estimates, [(0, 0), (0, 0), (0, n - m)])
    return estimates


def framewise_sdr(references, estimates, win: int = 44100, hop: int = 44100) -> np.ndarray:
    """museval's BSSEval v4 SDR per window, without BSSEval: ``[S, C, N]`` x2 -> ``[S, n_frames]``.

    For each source and window: ``SDR = 10 log10(sum s^2 / sum (s_hat - s)^2)``, sums over the
    window's samples and all channels. Equal to ``museval.evaluate(refs, ests, win, hop)[0]``
    (refs/ests as ``[S, N, C]``) to rounding (measured <= 4e-15 dB on MUSDB18 audio), including
    museval's special cases:

    * framing (``metrics.Framing``): frame t is ``[t*hop, t*hop + win)``; ``floor((N - win + hop)
      / hop)`` frames, a trailing partial window is dropped; a track no longer than ``win`` is
      one frame of the whole track (``win=np.inf`` gives the whole-track SDR);
    * silence: a window is NaN for *every* source when any reference or any estimate source is
      silent in it. museval's test (``_any_source_silent``) is "the sum over channels is 0 at
      every sample", so a window whose left channel is exactly minus the right counts as silent;
    * zero distortion gives ``+inf`` (``_safe_db``: ``den == 0 -> inf``), there is no eps.
      museval gives +inf too for a perfect estimate, but for a perfect window inside an imperfect
      estimate its decomposition leaves rounding residue and it returns ~350 dB: the one place
      the two differ;
    * estimates are zero-padded or cut to the references' length (``pad_or_truncate``).

    museval raises when a source is silent over the whole track; here its frames are just NaN.
    Loops over sources only (extra memory: about one ``[C, N]`` float64 buffer).
    """
    refs = _as_scn(references, "references")
    ests = _as_scn(estimates, "estimates")
    if refs.shape[:2] != ests.shape[:2]:
        raise ValueError(f"references {refs.shape} and estimates {ests.shape} differ in sources/channels")
    n_src, _, n = refs.shape
    if n == 0:
        return np.empty((n_src, 0))
    ests = _pad_or_truncate(ests, n)
    if win < n:
        if not (float(win).is_integer() and float(hop).is_integer() and hop > 0):
            raise ValueError(f"win and hop must be whole sample counts, got win={win}, hop={hop}")
        win, hop = int(win), int(hop)
    n_frames = _n_frames(n, win, hop)
    win = int(min(win, n))  # whole track when the window does not fit
    hop = int(hop) if n_frames > 1 else win

    num = np.empty((n_src, n_frames))
    den = np.empty((n_src, n_frames))
    silent = np.zeros(n_frames, dtype=bool)
    f64 = np.float64
    for j in range(n_src):
        r, d = refs[j], np.subtract(ests[j], refs[j], dtype=f64)  # float64, like museval's buffers
        num[j] = _frames(np.einsum("cn,cn->n", r, r, dtype=f64), win, hop, n_frames).sum(-1)
        den[j] = _frames(np.einsum("cn,cn->n", d, d), win, hop, n_frames).sum(-1)
        silent |= _silent_frames(refs[j], win, hop, n_frames)
        silent |= _silent_frames(ests[j], win, hop, n_frames)

    with np.errstate(divide="ignore", invalid="ignore"):
        sdr = np.where(den == 0, np.inf, 10 * np.log10(num / den))
    sdr[:, silent] = np.nan
    return sdr


def usdr(references, estimates, eps: float = USDR_EPS) -> np.ndarray:
    """MDX21 / SDX23 "utterance" SDR per source over the whole track: ``[S, C, N]`` x2 -> ``[S]``.

    ``10 log10((sum s^2 + eps) / (sum (s - s_hat)^2 + eps))``, sums over all samples and
    channels, ``eps = 1e-7`` (the challenges' and demucs' ``new_sdr``): finite for silent or
    perfect estimates, and one number per track rather than a median of frames.
    """
    refs = _as_scn(references, "references")
    ests = _as_scn(estimates, "estimates")
    if refs.shape != ests.shape:
        raise ValueError(f"references {refs.shape} and estimates {ests.shape} differ in shape")
    num = np.empty(len(refs))
    den = np.empty(len(refs))
    for j in range(len(refs)):
        d = np.subtract(refs[j], ests[j], dtype=np.float64)
        num[j] = np.einsum("cn,cn->", refs[j], refs[j], dtype=np.float64)
        den[j] = np.einsum("cn,cn->", d, d)
    return 10 * np.log10((num + eps) / (den + eps))


# --------------------------------------------------------------------------- aggregation


def _finite_or_nan(a):
    # museval's TrackStore stores +-inf as NaN (TrackStore._q) before EvalStore ever sees a
    # score, so in museval's numbers a perfect frame is skipped, not counted as +inf.
    return np.where(np.isinf(a), np.nan, a)


def _quiet_nan(fn, a, axis):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices -> NaN is what we want
        return fn(a, axis=axis)


def track_median(frames) -> np.ndarray:
    """Per-track score from framewise scores ``[..., n_frames] -> [...]``: the median over
    frames ignoring NaN (museval: ``np.nanmedian`` / ``EvalStore.agg_frames_scores``, pandas'
    NaN-skipping median), with +-inf treated as NaN like museval's TrackStore. All-NaN -> NaN."""
    return _quiet_nan(np.nanmedian, _finite_or_nan(np.asarray(frames, dtype=np.float64)), -1)


def median_over_tracks(track_medians, axis: int = 0) -> np.ndarray:
    """museval's headline number: median over tracks of the per-track medians, skipping NaN
    tracks (``EvalStore.agg_frames_tracks_scores``, pandas median)."""
    return _quiet_nan(np.nanmedian, np.asarray(track_medians, dtype=np.float64), axis)


def mean_over_tracks(track_medians, axis: int = 0) -> np.ndarray:
    """Mean over tracks of the per-track medians, skipping NaN tracks (what demucs reports as
    "SDR"; ``EvalStore(tracks_agg='mean')``)."""
    return _quiet_nan(np.nanmean, np.asarray(track_medians, dtype=np.float64), axis)


def to_long(scores: Mapping[str, np.ndarray], *, track: str, targets: Sequence[str] = SOURCES,
            system: str = "") -> pd.DataFrame:
    """Long table from ``{metric: [S, n_frames] or [S]}`` (``[S]``, e.g. uSDR, is frame 0)."""
    parts = []
    for metric, values in scores.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[:, None] if v.ndim == 1 else v
        if v.shape[0] != len(targets):
            raise ValueError(f"{metric}: {v.shape[0]} sources but {len(targets)} target names")
        parts.append(pd.DataFrame({
            "system": system, "track": track,
            "target": np.repeat(np.asarray(targets, dtype=object), v.shape[1]),
            "metric": metric, "frame": np.tile(np.arange(v.shape[1]), v.shape[0]),
            "value": v.ravel()}))
    if not parts:
        return pd.DataFrame(columns=LONG_COLUMNS)
    return pd.concat(parts, ignore_index=True)[LONG_COLUMNS]


def per_track(df: pd.DataFrame) -> pd.Series:
    """Per-track medians over frames, indexed by (system, track, target, metric): museval's
    ``agg_frames_scores`` (pandas groupby median, which skips NaN), +-inf as NaN."""
    values = _finite_or_nan(df["value"].to_numpy(dtype=np.float64))
    return (df.assign(value=values)
              .groupby(["system", "track", "target", "metric"], sort=True)["value"].median())


def aggregate(df: pd.DataFrame) -> pd.DataFrame:
    """Summary over tracks, indexed by (system, target, metric).

    Columns: ``median_median`` (museval's ``EvalStore.agg_frames_tracks_scores`` with the
    default median/median), ``mean_median`` (``tracks_agg='mean'``, demucs' number) and
    ``n_tracks`` (tracks with a non-NaN median). NaN frames and NaN tracks are skipped, as pandas
    does in museval. For one-value-per-track metrics (uSDR, frame 0) the per-track median is the
    value, so these are plainly the median and mean over tracks.
    """
    tracks = per_track(df).groupby(level=["system", "target", "metric"])
    return pd.DataFrame({"median_median": tracks.median(), "mean_median": tracks.mean(),
                         "n_tracks": tracks.count()})


# --------------------------------------------------------------------------- museval JSON

_JSON_METRICS = ("SDR", "SIR", "SAR", "ISR")  # TrackStore.add_target's order in each frame


def _q(number) -> Decimal | float:
    """museval ``TrackStore._q``: 5-decimal Decimal; +-inf becomes NaN (JSON has no inf)."""
    number = float(number)
    if np.isinf(number):
        return np.nan
    return Decimal(Decimal(number).quantize(Decimal(".00001")))


def museval_json(targets: Mapping[str, Mapping[str, Sequence[float]]], *, win: int = 44100,
                 hop: int = 44100, rate: int = 44100) -> dict:
    """One track's scores as museval's per-track JSON document (``TrackStore.scores``).

    ``targets`` is ``{target: {metric: frame values}}``. The result is what ``TrackStore``
    builds: ``{"targets": [{"name", "frames": [{"time": i*hop/rate, "duration": win/rate,
    "metrics": {"SDR", "SIR", "SAR", "ISR"}}]}], "museval_version"}``, values as 5-decimal
    ``Decimal`` and +-inf as NaN. The four BSSEval metrics are always written (NaN when not
    given) because ``museval.json2df`` melts all four; other framewise metrics are appended.
    museval keeps the track name only in the file name (see :func:`write_museval_json`).
    Serialise with :func:`dumps_museval_json` (``Decimal`` needs simplejson).
    """
    from museval.version import _version

    hop_s, win_s = hop / rate, win / rate
    doc = {"targets": [], "museval_version": _version}
    for name, metrics in targets.items():
        lengths = {len(v) for v in metrics.values()}
        if len(lengths) > 1:
            raise ValueError(f"{name}: metrics have different frame counts {sorted(lengths)}")
        n = lengths.pop() if lengths else 0
        order = list(_JSON_METRICS) + [m for m in metrics if m not in _JSON_METRICS]
        columns = {m: metrics.get(m, [np.nan] * n) for m in order}
        frames = [{"time": i * hop_s, "duration": win_s,
                   "metrics": {m: _q(columns[m][i]) for m in order}} for i in range(n)]
        doc["targets"].append({"name": name, "frames": frames})
    return doc


def dumps_museval_json(doc: dict) -> str:
    """The JSON text museval writes (``TrackStore.json``)."""
    import simplejson

    return simplejson.dumps(doc, indent=2, allow_nan=True, use_decimal=True)


def write_museval_json(root: str | Path, track: str, doc: dict, subset: str = "test") -> Path:
    """Write ``root/subset/track.json`` like ``museval.eval_mus_track(output_dir=root)``; sigsep
    tools (``EvalStore.add_eval_dir``) read ``root/test/**/*.json`` and take the track name
    from the file name."""
    path = Path(root) / subset / f"{track}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps_museval_json(doc))
    return path


def read_museval_json(source: str | Path | Mapping, *, track: str | None = None,
                      system: str = "") -> pd.DataFrame:
    """museval per-track JSON (a path, or the document) -> long table. ``frame`` is the frame's
    position; ``track`` defaults to the file name's stem, as museval does."""
    if isinstance(source, Mapping):
        if track is None:
            raise ValueError("track is needed when reading a document rather than a file")
        doc = source
    else:
        path = Path(source)
        doc = json.loads(path.read_text())  # json accepts museval's NaN tokens
        track = path.stem if track is None else track
    rows = [(system, track, t["name"], metric, i, float(value))
            for t in doc["targets"]
            for i, frame in enumerate(t["frames"])
            for metric, value in frame["metrics"].items()]
    return pd.DataFrame(rows, columns=LONG_COLUMNS)


# --------------------------------------------------------------------------- full BSSEval

# museval's measured peak for a 240 s stereo 4-source track at 44.1 kHz, over the loaded audio
# (benchmarks/bench_sdr.py measured 1700 MiB at 60 s; this scaled gives 1621 MiB)
MUSEVAL_PEAK_BYTES = 6.8e9
_PEAK_SAMPLES, _PEAK_SOURCE_CHANNELS = 240 * 44100, 4 * 2
WORKER_BASE_BYTES = 300 * 2**20  # a worker's interpreter with numpy, scipy, pandas, museval


def _museval_nfft(n: int) -> int:
    return 1 << int(np.ceil(np.log2(n + 512 - 1)))  # museval's FFT size (filters_len = 512)


def bsseval_peak_bytes(n_samples: int, n_sources: int = 4, n_channels: int = 2) -> float:
    """Estimated peak memory of a :func:`full_bsseval` worker on one track.

    museval's part scales the 6.8 GB measured at 240 s x 4 sources x stereo by length and by
    sources*channels (never below the 4x2 figure, as part of it is per-call overhead). Length
    scales by the larger of the sample ratio and the FFT-size ratio, because museval's big
    buffers are FFTs padded to the next power of two of ``N + 511``, so memory steps up just
    after each power of two. Added: the worker's own float64 references and estimates and
    ``WORKER_BASE_BYTES`` (at 60 s this totals 2244 MiB; the benchmark's process peaked at 2184).
    """
    length = max(n_samples / _PEAK_SAMPLES, _museval_nfft(n_samples) / _museval_nfft(_PEAK_SAMPLES))
    museval_part = MUSEVAL_PEAK_BYTES * length * max(1.0, n_sources * n_channels / _PEAK_SOURCE_CHANNELS)
    return museval_part + 2 * n_sources * n_channels * n_samples * 8 + WORKER_BASE_BYTES


def available_memory_bytes() -> int:
    """Memory we can still use: psutil's ``available`` if psutil is installed, else
    ``MemAvailable`` from /proc/meminfo; capped by a cgroup (container) limit if there is one,
    as MemAvailable there reports the host's."""
    try:
        import psutil

        avail = int(psutil.virtual_memory().available)
    except ImportError:
        avail = None
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    avail = int(line.split()[1]) * 1024
        except OSError:
            pass
        if avail is None:
            avail = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            room = int(Path(limit).read_text()) - int(Path(usage).read_text())
        except (OSError, ValueError):  # missing, or "max" (no limit)
            continue
        avail = min(avail, max(room, 0))
    return avail


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def bsseval_workers(peak_bytes: float, n_tracks: int, max_workers: int | None = None) -> int:
    """``min(cpus, available memory // peak per track, tracks, max_workers)``, at least 1."""
    by_memory = int(available_memory_bytes() // max(peak_bytes, 1))
    limits = [_cpu_count(), by_memory, n_tracks] + ([max_workers] if max_workers else [])
    return max(1, min(limits))


@dataclass(frozen=True)
class TrackJob:
    """One track for :func:`full_bsseval`. ``load`` (picklable: a module-level function or a
    ``functools.partial`` of one) returns ``(references, estimates)`` as ``[S, C, N]`` and runs
    in the worker, so the parent never holds the audio. ``n_samples`` (an upper bound is fine)
    sizes the memory estimate before anything is loaded."""

    name: str
    load: Callable[[], tuple[np.ndarray, np.ndarray]]
    n_samples: int
    n_sources: int = 4
    n_channels: int = 2


class _Arrays:
    """A loader around arrays already in memory (picklable, unlike a lambda)."""

    def __init__(self, references, estimates):
        self.references, self.estimates = references, estimates

    def __call__(self):
        return self.references, self.estimates


def _as_job(item) -> TrackJob:
    if isinstance(item, TrackJob):
        return item
    name, references, estimates = item
    s, c, n = _as_scn(references, "references").shape
    return TrackJob(name, _Arrays(references, estimates), n, s, c)


def _bsseval_one(job: TrackJob, win: int, hop: int) -> dict[str, np.ndarray]:
    import museval

    references, estimates = job.load()
    # museval wants [S, N, C]; views, as museval.evaluate copies its inputs anyway
    as_snc = lambda x: np.moveaxis(np.asarray(x), 1, 2)  # noqa: E731
    scores = museval.evaluate(as_snc(references), as_snc(estimates), win=win, hop=hop)
    return dict(zip(BSSEVAL_METRICS, scores))


def full_bsseval(tracks: Iterable[TrackJob | tuple[str, np.ndarray, np.ndarray]], *,
                 targets: Sequence[str] = SOURCES, system: str = "", win: int = 44100,
                 hop: int = 44100, max_workers: int | None = None,
                 start_method: str | None = None) -> pd.DataFrame:
    """Full BSSEval v4 (SDR, ISR, SIR, SAR) through ``museval.evaluate`` -> long table.

    ``tracks``: :class:`TrackJob` (preferred: the audio is loaded inside the worker) or
    ``(name, references [S, C, N], estimates [S, C, N])``; ``targets`` names axis 0. Each worker
    process evaluates one track at a time; the number of workers is ``min(cpus, available memory
    // bsseval_peak_bytes(longest track), tracks, max_workers)``, and at most that many tracks
    are in flight, so memory stays bounded. One worker runs in this process.

    ``start_method`` defaults to "forkserver" (else "spawn"): a plain fork of a parent running
    torch/OpenMP threads can deadlock. Either way each worker imports museval once (seconds) and
    ``load`` must be importable by the child; "fork" skips that where it is known to be safe.
    """
    jobs = [_as_job(t) for t in tracks]
    if not jobs:
        return pd.DataFrame(columns=LONG_COLUMNS)
    peak = max(bsseval_peak_bytes(j.n_samples, j.n_sources, j.n_channels) for j in jobs)
    n_workers = bsseval_workers(peak, len(jobs), max_workers)

    results: dict[int, dict[str, np.ndarray]] = {}
    if n_workers == 1:
        for i, job in enumerate(jobs):
            results[i] = _bsseval_one(job, win, hop)
    else:
        if start_method is None:
            start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
        with ProcessPoolExecutor(n_workers, mp_context=mp.get_context(start_method)) as pool:
            pending, todo = {}, iter(enumerate(jobs))
            while True:
                for i, job in todo:  # top up to n_workers tracks in flight
                    pending[pool.submit(_bsseval_one, job, win, hop)] = i
                    if len(pending) >= n_workers:
                        break
                if not pending:
                    break
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    results[pending.pop(future)] = future.result()
    return pd.concat([to_long(results[i], track=job.name, targets=targets, system=system)
                      for i, job in enumerate(jobs)], ignore_index=True)
