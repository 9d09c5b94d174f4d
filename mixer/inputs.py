"""What every mixer sees: input channels X, target channels Y, and the per-track normalisation.

X = [mixture.L, mixture.R (optional)] + every output channel of every chosen model, in the order
model -> source -> channel ('umx.vocals.L', 'umx.vocals.R', ...). Y = the dataset's reference
sources, source -> channel ('vocals.L', ...). Left and right are separate channels, so a mixer may
learn different weights per channel (MDX-Mixer paper, section 3).

All waveforms of a track are normalised with the mean and std of its mixture (one scalar each,
over both channels) and outputs are de-normalised with the same two numbers, as Demucs does.
The same affine map for every channel keeps a mixer linear in the original waveforms up to the
(negligible, audio being ~zero-mean) offset mean * (1 - sum of a column of W).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping

import numpy as np

from core.errors import PipelineError
from core.store import StemStore, TrackEntry

CHANNELS = ("L", "R")


@dataclass(frozen=True)
class InputSpec:
    """Which models feed a mixer and which sources it must output; everything JSON-serialisable."""

    model_keys: tuple[str, ...]
    model_names: tuple[str, ...]            # readable names for channel labels (unique)
    model_sources: tuple[tuple[str, ...], ...]
    targets: tuple[str, ...]                # the dataset's sources, in its order
    with_mixture: bool = True

    @classmethod
    def from_store(cls, store: StemStore, dataset_id: str, models: list[str],
                   with_mixture: bool = True) -> "InputSpec":
        """`models` are store keys or model names (a name means its newest cached entry)."""
        if not models:
            raise PipelineError(f"{store.root}: no models chosen for the mixer")
        keys = [store.resolve_model(m) for m in models]
        if len(set(keys)) != len(keys):
            raise PipelineError(f"{store.root}: a model is chosen twice ({', '.join(keys)})")
        infos = [store.model_info(k) for k in keys]
        names = [str(info.get("name", k)) for k, info in zip(keys, infos)]
        # Two cached versions of one model share a name: fall back to keys so labels stay unique.
        if len(set(names)) != len(names):
            names = list(keys)
        return cls(model_keys=tuple(keys), model_names=tuple(names),
                   model_sources=tuple(tuple(info["sources"]) for info in infos),
                   targets=tuple(store.dataset_info(dataset_id)["sources"]),
                   with_mixture=with_mixture)

    def to_dict(self) -> dict:
        return {"model_keys": list(self.model_keys), "model_names": list(self.model_names),
                "model_sources": [list(s) for s in self.model_sources],
                "targets": list(self.targets), "with_mixture": self.with_mixture}

    @classmethod
    def from_dict(cls, d: dict) -> "InputSpec":
        return cls(model_keys=tuple(d["model_keys"]), model_names=tuple(d["model_names"]),
                   model_sources=tuple(tuple(s) for s in d["model_sources"]),
                   targets=tuple(d["targets"]), with_mixture=bool(d["with_mixture"]))

    @property
    def in_channels(self) -> int:
        return 2 * self.with_mixture + 2 * sum(len(s) for s in self.model_sources)

    @property
    def out_channels(self) -> int:
        return 2 * len(self.targets)

    def input_names(self) -> list[str]:
        names = [f"mixture.{c}" for c in CHANNELS] if self.with_mixture else []
        for model, sources in zip(self.model_names, self.model_sources):
            names += [f"{model}.{s}.{c}" for s in sources for c in CHANNELS]
        return names

    def output_names(self) -> list[str]:
        return [f"{s}.{c}" for s in self.targets for c in CHANNELS]


def average_mixing(spec: InputSpec) -> np.ndarray:
    """[in, out]: each output channel the uniform average of the models' estimates of it."""
    names_in, names_out = spec.input_names(), spec.output_names()
    W = np.zeros((len(names_in), len(names_out)), dtype=np.float32)
    for target in spec.targets:
        having = [m for m, sources in zip(spec.model_names, spec.model_sources) if target in sources]
        for model in having:
            for c in CHANNELS:
                W[names_in.index(f"{model}.{target}.{c}"), names_out.index(f"{target}.{c}")] = 1 / len(having)
    return W


# ---- normalisation ---------------------------------------------------------------------------
def mixture_stats(mixture: np.ndarray, chunk: int = 1 << 20) -> tuple[float, float]:
    """Mean and std of a [2, n] mixture over all its samples.

    Chunked float64 sums: exact enough for audio, and a memmapped track is never loaded whole.
    The +1e-8 keeps a digitally silent mixture from dividing by zero (as Demucs does).
    """
    n = mixture.shape[-1]
    s1 = s2 = 0.0
    for i in range(0, n, chunk):
        block = np.asarray(mixture[:, i:i + chunk], dtype=np.float64)
        s1 += block.sum()
        s2 += np.square(block).sum()
    count = max(int(np.prod(mixture.shape)), 1)
    mean = s1 / count
    std = float(np.sqrt(max(s2 / count - mean * mean, 0.0)))
    return float(mean), std + 1e-8


def normalise(x: np.ndarray, stats: tuple[float, float]) -> np.ndarray:
    mean, std = stats
    out = np.subtract(x, np.float32(mean), dtype=np.float32)   # one new float32 array, no more
    out /= np.float32(std)
    return out


def denormalise(y, stats: tuple[float, float]):
    """The inverse of `normalise`, in place on a float tensor (a track's [2S, n] outputs are the
    largest array `separate` holds: no second copy); returns `y`."""
    mean, std = stats
    return y.mul_(std).add_(mean)


# ---- assembly --------------------------------------------------------------------------------
def check_inputs(spec: InputSpec, mixture, stems_by_key: Mapping[str, np.ndarray]) -> int:
    """Validate one track's arrays against the spec; return its length."""
    n = mixture.shape[-1]
    if tuple(mixture.shape) != (2, n):
        raise PipelineError(f"mixture: expected shape [2, n], got {list(mixture.shape)}")
    for key, sources in zip(spec.model_keys, spec.model_sources):
        if key not in stems_by_key:
            raise PipelineError(f"{key}: the mixer needs this model's stems, none were given")
        shape = tuple(stems_by_key[key].shape)
        if shape != (len(sources), 2, n):
            raise PipelineError(f"{key}: stems of shape {list(shape)}, expected "
                                f"[{len(sources)}, 2, {n}] (sources {', '.join(sources)})")
    return n


def assemble_inputs(spec: InputSpec, mixture, stems_by_key: Mapping[str, np.ndarray],
                    start: int = 0, stop: int | None = None) -> np.ndarray:
    """Raw (not normalised) X [in_channels, stop - start] float32 for samples start:stop."""
    n = len(range(*slice(start, stop).indices(mixture.shape[-1])))
    out = np.empty((spec.in_channels, n), dtype=np.float32)
    row = 0
    if spec.with_mixture:
        out[:2] = mixture[:, start:stop]
        row = 2
    for key in spec.model_keys:
        stems = stems_by_key[key][:, :, start:stop]
        rows = 2 * stems.shape[0]
        out[row:row + rows] = stems.reshape(rows, n)   # float16 -> float32 within the one copy
        row += rows
    return out


class NormalisedInputs:
    """X of one track, normalised, assembled only for the samples asked for.

    Quacks like the [in_channels, n] float32 array `normalise(assemble_inputs(...), stats)` (shape,
    `x[..., a:b]`) without ever holding it: for a 10-minute track with three models that array is
    26 x 26.5 M float32 = 2.8 GB, while overlap-add needs one segment at a time.
    """

    def __init__(self, spec: InputSpec, mixture, stems_by_key: Mapping[str, np.ndarray],
                 stats: tuple[float, float]):
        self.spec, self.mixture, self.stems, self.stats = spec, mixture, stems_by_key, stats
        self.shape = (spec.in_channels, check_inputs(spec, mixture, stems_by_key))
        self.dtype = np.dtype(np.float32)

    def __getitem__(self, key) -> np.ndarray:
        if not (isinstance(key, tuple) and len(key) == 2 and key[0] in (Ellipsis, slice(None))
                and isinstance(key[1], slice) and key[1].step in (None, 1)):
            raise TypeError("NormalisedInputs supports x[..., a:b] (or x[:, a:b]) only")
        start, stop, _ = key[1].indices(self.shape[-1])
        return normalise(assemble_inputs(self.spec, self.mixture, self.stems, start,
                                         max(start, stop)), self.stats)

    def __array__(self, dtype=None, copy=None):
        x = self[..., :]
        return x if dtype is None else x.astype(dtype, copy=False)


def assemble_targets(references, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Raw Y [2 * S, stop - start] float32 from references [S, 2, n]."""
    ref = np.asarray(references[:, :, start:stop], dtype=np.float32)
    return ref.reshape(-1, ref.shape[-1])


def split_outputs(y, n_sources: int):
    """[2 * S, n] -> [S, 2, n] (the inverse of the target layout)."""
    return y.reshape(n_sources, 2, y.shape[-1])


def track_inputs(store: StemStore, dataset_id: str, track: TrackEntry | str,
                 spec: InputSpec) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """One track's mixture and the chosen models' stems, as memmaps (nothing read yet)."""
    return (store.mixture(dataset_id, track),
            {k: store.stems(k, dataset_id, track) for k in spec.model_keys})
