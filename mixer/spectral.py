"""Spectral and order-statistic ensembles: MSST's `ensemble.py` and UVR's Ensemble mode.

Per target source, over the models that output it (a model counts only for the targets it has),
with x_m a model's waveform and X_m its STFT:

| method      | MSST `--type` | UVR               | the ensemble, per sample (wave) or per bin (spec)  |
|-------------|---------------|-------------------|----------------------------------------------------|
| avg-wave    | avg_wave      | Average (w = 1)   | sum_m w_m x_m / sum_m w_m                          |
| median-wave | median_wave   |                   | np.median over the models                          |
| min-wave    | min_wave      |                   | the x_m of smallest abs (the first model on a tie)  |
| max-wave    | max_wave      |                   | the x_m of largest abs (the first model on a tie)   |
| avg-spec    | avg_fft       |                   | sum_m w_m X_m / sum_m w_m                          |
| median-spec | median_fft    |                   | np.median of the complex X_m                       |
| min-spec    | min_fft       | Min Spec          | the X_m of smallest magnitude, its phase with it   |
| max-spec    | max_fft       | Max Spec          | the X_m of largest magnitude, its phase with it    |

The spectral ones then go back through the inverse STFT. These are MSST's definitions, numpy's
rules included: np.median of an even count is the mean of the two middle values, and numpy orders
complex numbers by real part, then imaginary part, so median-spec is that lexicographic median,
not a median of magnitudes (MSST calls np.median on the complex spectrogram). min/max pick one
model's complex value per bin (magnitude and phase from the same model: the "rule for the
phase" of both MSST's lambda_min/absmax and UVR's np.where(|a| >= |b|, a, b)).

STFT (MSST's and UVR's): librosa.stft(n_fft=2048, hop_length=1024) per channel: periodic Hann,
frames centred on multiples of the hop with zeros beyond the ends; the inverse is librosa.istft:
Hann synthesis window, overlap-add, divided by the summed squared windows. The spectra that
median/min/max decide on are computed as librosa computes them for float32 audio (float64
window and FFT, stored as complex64), so every bin picks the model MSST picks; a float32 FFT
rounds differently and flips near-ties, which music has plenty of (`stft_frames_as_librosa`).

Where ours differs:
* Weights count for the averages only. MSST silently ignores `--weights` for median/min/max; we
  refuse them there rather than pretend they did something.
* The end of a track: librosa's last frame is centred on the last multiple of the hop, so its
  last n mod 1024 samples rest on one frame's fading tail; we also take the next frame, so every
  sample lies under two frames. Equal to librosa when n is a multiple of 1024, and for the
  averages (linear, so any perfectly reconstructing STFT gives the same waveform) always.
* Ties: on an exact magnitude tie of two different complex values UVR keeps the later model,
  MSST (and we) the first; outside silence (where both are 0) such ties have probability zero.
* avg-spec is computed as avg-wave: the STFT being linear and perfectly reconstructing, the
  inverse of the averaged spectra is the averaged waveform (MSST's two differ by float rounding).
* Memory: a long track is processed in blocks of at most BLOCK samples through
  `core.chunking.overlap_add`, each block seeing HOP samples of context on both sides, and
  blocks start on multiples of the hop, so every frame is the whole-track STFT's frame: the
  result does not depend on the block size (tests check it).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch

from core.chunking import overlap_add
from core.errors import PipelineError
from core.options import option
from core.store import StemStore, write_json_atomic
from mixer.blend import source_models
from mixer.ensemble import FitRequest, Method, Mixer, run_config
from mixer.inputs import InputSpec, check_inputs
from mixer.stft import (
    BLOCK,
    HOP,
    N_FFT,
    istft_frames,
    stft_frames,
    stft_frames_as_librosa,
)

WAVE = ("avg-wave", "median-wave", "min-wave", "max-wave")
SPEC = ("avg-spec", "median-spec", "min-spec", "max-spec")
METHODS = WAVE + SPEC
WEIGHTED = ("avg-wave", "avg-spec")


# ---- the ensembles ---------------------------------------------------------------------------
def combine(method: str, x: torch.Tensor, weights: Sequence[float] | None = None) -> torch.Tensor:
    """x [M, ...]: the models' waveforms (real) or spectra (complex) -> the ensemble [...].

    Written as M - 1 elementwise passes (or a sort along a contiguous axis) rather than reductions
    over the short model axis, which torch runs several times slower; complex values are handled
    as (re, im) pairs or through numpy, whose complex abs is several times faster than torch's.
    """
    kind = method.split("-")[0]
    if kind == "avg":
        w = [1.0] * len(x) if weights is None else [float(v) for v in weights]
        xr = torch.view_as_real(x) if x.is_complex() else x
        acc = xr[0] * w[0]
        for m in range(1, len(x)):
            acc.add_(xr[m], alpha=w[m])
        acc /= sum(w)
        return torch.view_as_complex(acc) if x.is_complex() else acc
    if kind == "median":
        return median(x)
    if kind in ("min", "max"):
        z = x.numpy()
        best, best_mag = z[0].copy(), np.abs(z[0])
        for m in range(1, len(z)):
            mag = np.abs(z[m])
            # strict: on a tie the first model stays (np.argmax / np.argmin, as MSST)
            take = mag > best_mag if kind == "max" else mag < best_mag
            np.copyto(best, z[m], where=take)
            np.copyto(best_mag, mag, where=take)
        return torch.from_numpy(best)
    raise PipelineError(f"ensemble method '{method}': choose one of {', '.join(METHODS)}")


def median(x: torch.Tensor) -> torch.Tensor:
    """np.median over axis 0: the middle value, or the mean of the two middle ones.

    Complex values in numpy's order (real part, then imaginary part), which np.minimum and
    np.maximum follow too, so one selection network serves both: for 2, 3 and 4 models the few
    elementwise minima and maxima that single out the middle (4: max(min(a, b), min(c, d)) and
    min(max(a, b), max(c, d))); more models through numpy's sort along a contiguous last axis
    (along axis 0, as np.median does it, is several times slower). Bit-equal to np.median.
    """
    z = x.numpy()
    if len(z) == 1:
        return torch.from_numpy(z[0].copy())
    if len(z) == 2:
        lo, hi = np.minimum(z[0], z[1]), np.maximum(z[0], z[1])
    elif len(z) == 3:
        lo = hi = np.maximum(np.minimum(z[0], z[1]), np.minimum(np.maximum(z[0], z[1]), z[2]))
    elif len(z) == 4:
        lo = np.maximum(np.minimum(z[0], z[1]), np.minimum(z[2], z[3]))
        hi = np.minimum(np.maximum(z[0], z[1]), np.maximum(z[2], z[3]))
    else:
        rows = np.moveaxis(z, 0, -1).copy()
        rows.sort(axis=-1)
        mid = len(z) // 2
        hi = rows[..., mid]
        lo = hi if len(z) % 2 else rows[..., mid - 1]
    return torch.from_numpy(np.ascontiguousarray(lo) if lo is hi else (lo + hi) / 2)


class TargetRows:
    """The stems of a track as rows [target, model that outputs it, channel] x samples, read
    lazily a range at a time (`x[..., a:b]`), float32: each target's rows contiguous, so a block
    hands every target its [M_j, 2, L] without another copy."""

    def __init__(self, table: list[list[tuple[int, int]]], stems: list, n: int):
        self.reads = [(stems[m], k) for pairs in table for m, k in pairs]
        self.shape, self.dtype = (2 * len(self.reads), n), np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        start, stop, _ = key[-1].indices(self.shape[-1])
        out = np.empty((self.shape[0], max(0, stop - start)), dtype=np.float32)
        for i, (stems, k) in enumerate(self.reads):
            out[2 * i:2 * i + 2] = stems[k, :, start:stop]     # float16 -> float32 in the copy
        return out


def blockwise(spec: InputSpec, mixture, stems_by_key: Mapping[str, np.ndarray],
              per_target: Callable[[int, torch.Tensor], torch.Tensor], spectral: bool,
              block: int = BLOCK, stft: Callable[[torch.Tensor], torch.Tensor] = stft_frames
              ) -> np.ndarray:
    """Estimates [S, 2, n] of a track, target j being per_target(j, x) over the models that output
    it (mixer.blend.source_models), x their STFT frames [M_j, 2, frames, F] (`spectral`; the
    result is frames [2, frames, F]) or waveforms [M_j, 2, L] (the result [2, L]).

    `stft` computes the frames (`stft_frames`; `stft_frames_as_librosa` where a per-bin
    choice must be MSST's). Blocks of at most `block` samples through `core.chunking.overlap_add`, starting on
    multiples of HOP with HOP samples of context: every frame is the whole track's, so the result
    does not depend on the block size; memory is the estimates plus one block. The targets of a
    block run in torch.get_num_threads() threads (numpy's elementwise work is single-threaded
    but releases the GIL).
    """
    n = check_inputs(spec, mixture, stems_by_key)
    table = source_models(spec)
    x = TargetRows(table, [stems_by_key[k] for k in spec.model_keys], n)
    context = HOP if spectral else 0
    first = np.cumsum([0] + [2 * len(pairs) for pairs in table])
    outer = torch.get_num_threads()

    def run(chunks: torch.Tensor) -> torch.Tensor:
        out = torch.empty(len(chunks), len(table), 2, chunks.shape[-1] - 2 * context)

        def target(b: int, j: int) -> None:
            models = chunks[b, first[j]:first[j + 1]].reshape(len(table[j]), 2, -1)
            out[b, j] = (istft_frames(per_target(j, stft(models))) if spectral
                         else per_target(j, models))
        jobs = [(b, j) for b in range(len(chunks)) for j in range(len(table))]
        threads = max(1, min(outer, len(jobs)))
        # one thread per job: torch's own intra-op threads inside each would only oversubscribe
        torch.set_num_threads(1)
        try:
            with ThreadPoolExecutor(threads) as pool:
                list(pool.map(lambda job: target(*job), jobs))
        finally:
            torch.set_num_threads(outer)
        return out

    count = -(-n // block)                               # equal blocks, multiples of HOP
    size = max(HOP, -(-n // (count * HOP)) * HOP)
    return overlap_add(run, x, size, window="flattop", overlap=0, context=context).numpy()


class SpectralEnsemble:
    """One of METHODS over the models of `spec`, applied to a track's stems block by block."""

    def __init__(self, method: str, spec: InputSpec, weights: Mapping[str, float] | None = None):
        if method not in METHODS:
            raise PipelineError(f"ensemble method '{method}': choose one of {', '.join(METHODS)}")
        self.method, self.spec = method, spec
        self.weights = [None if weights is None else [weights[spec.model_keys[m]] for m, _ in pairs]
                        for pairs in source_models(spec)]

    def __call__(self, mixture, stems_by_key: Mapping[str, np.ndarray],
                 block: int = BLOCK) -> np.ndarray:
        """mixture [2, n] (for its length), stems {key: [S_m, 2, n]} -> estimates [S, 2, n]."""
        # avg-spec is avg-wave: the STFT is linear and perfectly reconstructing, so averaging
        # spectra and inverting gives the average waveform (MSST's avg_fft and avg_wave differ by
        # float rounding); computed without the M + 1 transforms
        spectral = self.method in SPEC and self.method != "avg-spec"
        return blockwise(self.spec, mixture, stems_by_key,
                         lambda j, x: combine(self.method, x, self.weights[j]),
                         spectral=spectral, block=block, stft=stft_frames_as_librosa)


# ---- runs ------------------------------------------------------------------------------------
def check_weights(method: str, weights: Sequence[float] | None, spec: InputSpec) -> dict | None:
    """{model key: weight} for the averages (None: equal weights); an error for the others."""
    if weights is None or len(weights) == 0:
        return None
    if method not in WEIGHTED:
        raise PipelineError(f"ensemble method '{method}' takes no weights (only "
                            f"{' and '.join(WEIGHTED)} do; MSST ignores them for the others)")
    if len(weights) != len(spec.model_keys):
        raise PipelineError(f"{len(weights)} weight(s) for {len(spec.model_keys)} models "
                            f"({', '.join(spec.model_names)}): give one per model, in order")
    w = [float(v) for v in weights]
    if any(not np.isfinite(v) or v < 0 for v in w):
        raise PipelineError(f"ensemble weights {w}: each must be a finite number >= 0")
    for target, pairs in zip(spec.targets, source_models(spec)):
        if sum(w[m] for m, _ in pairs) == 0:
            raise PipelineError(f"ensemble weights {w}: every model that outputs '{target}' has "
                                f"weight 0")
    return dict(zip(spec.model_keys, w))


def make_run(store: StemStore, dataset_id: str, models: list[str], method: str, *,
             weights: Sequence[float] | None = None, run_dir: str | Path | None = None) -> dict:
    """A run folder for one of METHODS (nothing to fit: the config is the ensemble)."""
    if method not in METHODS:
        raise PipelineError(f"ensemble method '{method}': choose one of {', '.join(METHODS)}")
    spec = InputSpec.from_store(store, dataset_id, models, with_mixture=False)
    source_models(spec)   # every target needs a model that outputs it
    info = store.dataset_info(dataset_id)
    given = check_weights(method, weights, spec)
    options = (AverageOptions(None if given is None else tuple(given.values()))
               if method in WEIGHTED else None)
    config = run_config(method, spec, dataset_id, options, rate=int(info.get("sample_rate", 44100)),
                        weights=given)
    if method in SPEC:
        config["stft"] = {"n_fft": N_FFT, "hop": HOP, "window": "hann"}
    if run_dir is not None:
        write_json_atomic(Path(run_dir) / "config.json", config)
    return config


def apply_config(config: dict, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
    return SpectralEnsemble(config["method"], InputSpec.from_dict(config["inputs"]),
                            config.get("weights"))(mixture, stems_by_key)


# ---- the methods -----------------------------------------------------------------------------
@dataclass(frozen=True)
class AverageOptions:
    weights: tuple[float, ...] | None = option(
        None, "one weight per model, in -m order, e.g. 2,1,1 (default equal)")


class SpectralMixer(Mixer):
    def estimate(self, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
        return apply_config(self.config, mixture, stems_by_key)


def _record(method: str, summary: str) -> Method:
    def fit(r: FitRequest) -> dict:
        weights = getattr(r.options, "weights", None)
        return make_run(r.store, r.dataset_id, r.models, method, weights=weights, run_dir=r.run_dir)

    return Method(name=method, summary=summary,
                  options=AverageOptions if method in WEIGHTED else None, fit=fit,
                  load=lambda config, run_dir, **_: SpectralMixer(config, run_dir))


RECORDS = (
    _record("avg-wave", "MSST's avg_wave (weighted) / UVR's Average: per sample"),
    _record("median-wave", "MSST's median_wave: the median of the models, per sample"),
    _record("min-wave", "MSST's min_wave: per sample, the value of smallest magnitude"),
    _record("max-wave", "MSST's max_wave: per sample, the value of largest magnitude"),
    _record("avg-spec", "MSST's avg_fft (weighted), per time-frequency bin"),
    _record("median-spec", "MSST's median_fft: the (complex) median per time-frequency bin"),
    _record("min-spec", "MSST's min_fft / UVR's Min Spec: per bin, the smallest magnitude"),
    _record("max-spec", "MSST's max_fft / UVR's Max Spec: per bin, the largest magnitude"),
)
