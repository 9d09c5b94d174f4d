"""Training data for the base separators, read from the stem store.

* `RandomMixes`: random crops of the training split, remixed and augmented the way demucs and
  Open-Unmix do it: every source may come from a different track and offset ("random track mix" /
  demucs's remix), gets a random gain, a random channel swap and a random sign, and the mixture is
  the sum of the augmented stems, so mixture == sum(references) holds for every example.
* `FixedCrops`: deterministic, unaugmented crops of the validation split (its stored mixture and
  references), for a validation loss that is comparable from epoch to epoch.

An item is `(mixture [2, n], references [T (+1), 2, n])`, float32 tensors: the chosen targets in
their order, plus (with `rest=True`, when the targets are not all the sources) the mixture minus
the targets, so that the sum of the reference stack is the mixture (the X-UMX loss needs it).

Reproducibility: an item's randomness comes from `numpy.random.default_rng([base, index])`, where
`base` is the seed of the loading process's torch generator: the training loop re-seeds torch at
every epoch (and the DataLoader seeds its workers from a seeded generator), so an epoch's items are
the same in a resumed run as in an uninterrupted one, whatever order they are drawn in.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset, get_worker_info

from core.errors import PipelineError
from core.store import StemStore, TrackEntry


@dataclass(frozen=True)
class Augment:
    """Source-level augmentation of `RandomMixes` (set a probability to 0 to disable it).

    remix: probability that an example is a remix, each source taken from an independently drawn
        track and offset (demucs's remix / Open-Unmix's random_track_mix); otherwise all sources
        come from the same excerpt of one track.
    gain: each source is scaled by a factor drawn uniformly in this range (Open-Unmix, demucs).
    channel_swap: probability of swapping a source's left and right channels.
    sign_flip: probability of inverting a source's polarity (demucs's FlipSign).
    """

    remix: float = 0.5
    gain: tuple[float, float] = (0.25, 1.25)
    channel_swap: float = 0.5
    sign_flip: float = 0.5

    def to_dict(self) -> dict:
        return asdict(self)


NO_AUGMENT = Augment(remix=0.0, gain=(1.0, 1.0), channel_swap=0.0, sign_flip=0.0)


def item_rng(index: int) -> np.random.Generator:
    """The generator of one item: a function of the loading process's torch seed and the index.

    In a DataLoader worker torch's seed is `base_seed + worker_id`; subtracting the id gives the
    same base for every worker, so the item does not depend on which worker loads it.
    """
    info = get_worker_info()
    base = info.seed - info.id if info is not None else torch.initial_seed()
    return np.random.default_rng([int(base) % (2 ** 63), int(index)])


class _StoreAudio:
    """Lazily opened memmaps of a dataset's tracks; dropped when pickled (spawned workers)."""

    def __init__(self, store: StemStore, dataset_id: str, tracks: Sequence[TrackEntry]):
        self.store, self.dataset_id, self.tracks = store, dataset_id, list(tracks)
        self._open: dict[int, np.ndarray] = {}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_open"] = {}
        return state

    def audio(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(mixture [2, n], references [S, 2, n]) memmaps, references in the dataset's order."""
        if i not in self._open:
            track = self.tracks[i]
            self._open[i] = (self.store.mixture(self.dataset_id, track),
                             self.store.references(self.dataset_id, track))
        return self._open[i]


def _crop(a: np.ndarray, start: int, length: int) -> np.ndarray:
    """a[..., start:start+length], zero-padded at the end when the track is too short."""
    out = np.asarray(a[..., start:start + length], dtype=np.float32)
    if out.shape[-1] < length:
        out = np.pad(out, [(0, 0)] * (out.ndim - 1) + [(0, length - out.shape[-1])])
    return out


class _StemDataset(Dataset):
    def __init__(self, store: StemStore, dataset_id: str, split: str, targets: Sequence[str] | None,
                 segment: int, rest: bool):
        info = store.dataset_info(dataset_id)
        self.sources = list(info["sources"])
        self.sample_rate = int(info["sample_rate"])
        self.targets = list(targets or self.sources)
        unknown = [t for t in self.targets if t not in self.sources]
        if unknown:
            raise PipelineError(f"dataset {dataset_id}: no source(s) {', '.join(unknown)} "
                                f"(it has {', '.join(self.sources)})")
        self.target_idx = [self.sources.index(t) for t in self.targets]
        self.rest = rest and len(self.targets) < len(self.sources)
        self.segment = int(segment)
        tracks = store.tracks(dataset_id, split)
        if not tracks:
            raise PipelineError(f"dataset {dataset_id}: no tracks in the '{split}' split")
        missing = [t.name for t in tracks if not store.has_track(dataset_id, t)]
        if missing:
            raise PipelineError(f"{store.dataset_dir(dataset_id)}: {len(missing)} {split} track(s) "
                                f"not in the store (e.g. '{missing[0]}'); run "
                                f"`pipeline cache --dataset ...` to finish ingesting it")
        self.split = split
        self._audio = _StoreAudio(store, dataset_id, tracks)
        self.tracks = self._audio.tracks

    def _pack(self, stems: np.ndarray, mixture: np.ndarray | None = None):
        """stems [S, 2, n] (all sources) -> (mixture, references [T (+1), 2, n]) tensors."""
        refs = stems[self.target_idx]
        mix = stems.sum(0) if mixture is None else mixture
        if self.rest:
            refs = np.concatenate([refs, (mix - refs.sum(0))[None]])
        return torch.from_numpy(np.ascontiguousarray(mix, dtype=np.float32)), \
            torch.from_numpy(np.ascontiguousarray(refs, dtype=np.float32))


class RandomMixes(_StemDataset):
    """`length` random, augmented examples of `segment` samples from a split (see the module doc).

    Tracks are drawn with probability proportional to their length (every second of audio is
    equally likely), offsets uniformly.
    """

    def __init__(self, store: StemStore, dataset_id: str, *, targets: Sequence[str] | None = None,
                 segment: int, length: int, augment: Augment = Augment(), split: str = "train",
                 rest: bool = False):
        super().__init__(store, dataset_id, split, targets, segment, rest)
        self.length = int(length)
        self.augment = augment
        lengths = np.array([t.length for t in self.tracks], dtype=np.float64)
        self._p = lengths / lengths.sum()

    def __len__(self) -> int:
        return self.length

    def _excerpt(self, rng) -> tuple[int, int]:
        t = int(rng.choice(len(self.tracks), p=self._p))
        start = int(rng.integers(0, max(1, self.tracks[t].length - self.segment + 1)))
        return t, start

    def __getitem__(self, index: int):
        rng = item_rng(index)
        aug = self.augment
        n_src = len(self.sources)
        stems = np.empty((n_src, 2, self.segment), dtype=np.float32)
        remix = rng.random() < aug.remix
        t, start = self._excerpt(rng)
        for s in range(n_src):
            if remix and s > 0:
                t, start = self._excerpt(rng)
            x = _crop(self._audio.audio(t)[1][s], start, self.segment)
            gain = rng.uniform(*aug.gain)
            if rng.random() < aug.sign_flip:
                gain = -gain
            if rng.random() < aug.channel_swap:
                x = x[::-1]
            stems[s] = x * np.float32(gain)
        return self._pack(stems)


class FixedCrops(_StemDataset):
    """Consecutive `segment`-sample crops of every track of a split (the last one aligned with the
    track's end; a shorter track is one zero-padded crop); at most `max_items`, evenly spaced
    over the whole list when there are more. No augmentation; the stored mixture is used."""

    def __init__(self, store: StemStore, dataset_id: str, *, targets: Sequence[str] | None = None,
                 segment: int, split: str = "valid", max_items: int | None = None,
                 rest: bool = False):
        super().__init__(store, dataset_id, split, targets, segment, rest)
        items = []
        for i, t in enumerate(self.tracks):
            starts = list(range(0, max(1, t.length - segment + 1), segment))
            if t.length > segment and starts[-1] + segment < t.length:
                starts.append(t.length - segment)
            items += [(i, s) for s in starts]
        if max_items and len(items) > max_items:
            pick = np.linspace(0, len(items) - 1, max_items).round().astype(int)
            items = [items[k] for k in pick]
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int):
        t, start = self.items[index]
        mix, refs = self._audio.audio(t)
        return self._pack(_crop(refs, start, self.segment), _crop(mix, start, self.segment))


def training_mixtures(store: StemStore, dataset_id: str, split: str = "train"):
    """Yield the stored mixture [2, n] memmap of every track of a split (input statistics)."""
    for t in store.tracks(dataset_id, split):
        yield store.mixture(dataset_id, t)
