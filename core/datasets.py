"""Datasets: one small `Track` abstraction over MUSDB18 (.stem.mp4), MUSDB18-HQ and generic stem
folders (which is also what the embedded synthetic generator writes).

Every reader yields `Track`s whose audio is loaded lazily, as float32 [2, n] (mixture) and
[S, 2, n] (stems, in the dataset's `sources` order). Splits: a `valid` folder is the valid split;
in a `train` folder, tracks named in musdb's bundled validation list form the valid split (the
official MUSDB18 train/valid split), the rest train; `test` is test.
"""
from __future__ import annotations

import hashlib
import shutil
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from core.audio import AUDIO_EXTENSIONS, audio_info, check_finite, read_audio, to_stereo
from core.config import SOURCES
from core.errors import PipelineError, fail

SUBSETS = ("train", "valid", "test")
SPLITS = ("train", "valid", "test")


@lru_cache(maxsize=1)
def musdb_validation_tracks() -> frozenset[str]:
    """The official MUSDB18 validation track names, as bundled with the musdb package."""
    import importlib.util

    import yaml

    spec = importlib.util.find_spec("musdb")
    path = Path(spec.origin).parent / "configs" / "mus.yaml"
    return frozenset(yaml.safe_load(path.read_text())["validation_tracks"])


def split_of(subset: str, name: str) -> str:
    if subset == "train" and name in musdb_validation_tracks():
        return "valid"
    return subset


@dataclass
class Track:
    name: str
    subset: str
    split: str
    sources: tuple[str, ...]
    # reader(start, frames) -> (mixture [2, n], stems [S, 2, n]); frames=None reads to the end
    reader: Callable[[int, int | None], tuple[np.ndarray, np.ndarray]] = field(repr=False)
    # header() -> (sample_rate, length): called once, on first use, since probing is not free
    header: Callable[[], tuple[int, int]] = field(repr=False)

    @cached_property
    def _header(self) -> tuple[int, int]:
        return self.header()

    def set_header(self, sample_rate: int, length: int) -> None:
        """Use a header known from elsewhere (the stem store) instead of probing the file."""
        self.__dict__["_header"] = (int(sample_rate), int(length))

    @property
    def sample_rate(self) -> int:
        return self._header[0]

    @property
    def length(self) -> int:
        return self._header[1]

    @property
    def duration(self) -> float:
        return self.length / self.sample_rate

    def audio(self, start: int = 0, frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        return self.reader(start, frames)

    def mixture(self, start: int = 0, frames: int | None = None) -> np.ndarray:
        return self.reader(start, frames)[0]

    def stems(self, start: int = 0, frames: int | None = None) -> np.ndarray:
        return self.reader(start, frames)[1]

    def chunks(self, size: int) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """(start, mixture, stems) in consecutive chunks of `size` samples: bounded memory."""
        for start in range(0, self.length, size):
            mix, stems = self.reader(start, min(size, self.length - start))
            yield start, mix, stems


class Dataset:
    """A list of tracks plus an id that keys the dataset in the stem store."""

    def __init__(self, root: Path, kind: str, tracks: list[Track], sources: tuple[str, ...]):
        self.root, self.kind, self.tracks, self.sources = root, kind, tracks, sources
        digest = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:8]
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in root.resolve().name)
        self.id = f"{stem}-{digest}"

    def split(self, split: str) -> list[Track]:
        return [t for t in self.tracks if t.split == split]

    def __len__(self) -> int:
        return len(self.tracks)

    def __repr__(self) -> str:
        counts = {s: len(self.split(s)) for s in SPLITS}
        return f"Dataset({self.kind}, {self.root}, sources={list(self.sources)}, splits={counts})"


def _order_sources(names) -> tuple[str, ...]:
    known = [s for s in SOURCES if s in names]
    return tuple(known + sorted(set(names) - set(known)))


# ---- generic stem folders (also MUSDB18-HQ and the synthetic dataset) ------------------------
def _stem_folder_track(track_dir: Path, subset: str, sources: tuple[str, ...]) -> Track:
    files = {p.stem: p for p in track_dir.iterdir()
             if p.is_file() and p.suffix.lower() in AUDIO_EXTENSIONS}
    missing = [s for s in sources if s not in files]
    if missing:
        raise fail(track_dir, f"missing stems: {', '.join(missing)} (expected {', '.join(sources)})")
    stem_files = [files[s] for s in sources]
    mix_file = files.get("mixture")
    header = {p: audio_info(p) for p in stem_files + ([mix_file] if mix_file else [])}
    rate, length, _ = header[stem_files[0]]
    for p, (r, n, c) in header.items():
        if r != rate:
            raise fail(p, f"sample rate {r} Hz differs from {stem_files[0].name} ({rate} Hz)")
        if n != length:
            raise fail(p, f"length {n} samples differs from {stem_files[0].name} ({length} samples)")
        if c > 2:
            raise fail(p, f"has {c} channels; only mono and stereo are supported")

    def reader(start: int = 0, frames: int | None = None):
        stems = np.stack([to_stereo(read_audio(p, start, frames)[0], p) for p in stem_files])
        mix = to_stereo(read_audio(mix_file, start, frames)[0], mix_file) if mix_file else stems.sum(0)
        return mix, stems

    return Track(track_dir.name, subset, split_of(subset, track_dir.name), sources, reader,
                 lambda: (rate, length))


def _is_stem_folder(root: Path) -> bool:
    return any((root / s).is_dir() and any(
        p.suffix.lower() in AUDIO_EXTENSIONS for d in (root / s).iterdir() if d.is_dir() for p in d.iterdir())
        for s in SUBSETS)


def open_stem_folder(root: Path) -> Dataset:
    track_dirs = [(s, d) for s in SUBSETS if (root / s).is_dir()
                  for d in sorted((root / s).iterdir()) if d.is_dir()]
    names = set()
    for _, d in track_dirs:
        names |= {p.stem for p in d.iterdir() if p.suffix.lower() in AUDIO_EXTENSIONS} - {"mixture"}
    if not names:
        raise fail(root, "no stems found (expected ROOT/{train,valid,test}/<track>/<source>.wav|.flac)")
    sources = _order_sources(names)
    kind = "musdb18hq" if set(sources) == set(SOURCES) and not (root / "valid").is_dir() else "stems"
    return Dataset(root, kind, [_stem_folder_track(d, s, sources) for s, d in track_dirs], sources)


# ---- MUSDB18 .stem.mp4 ---------------------------------------------------------------------
def _require_ffmpeg(where: Path) -> None:
    for tool in ("ffmpeg", "ffprobe"):
        if shutil.which(tool) is None:
            raise fail(where, f"reading .stem.mp4 needs the '{tool}' binary on PATH "
                              f"(Debian/Ubuntu: apt-get install ffmpeg)")


def _musdb_track(path: Path, subset: str) -> Track:
    import stempeg

    name = path.name[: -len(".stem.mp4")]

    def header() -> tuple[int, int]:
        try:
            info = stempeg.Info(str(path))
            n_streams = info.nb_audio_streams
            rate, length = int(info.rate(0)), int(info.samples(0))
        except Exception as e:
            raise fail(path, f"not a readable stem file ({_first_line(e)})") from None
        if n_streams != 5:
            raise fail(path, f"has {n_streams} audio streams; MUSDB18 stems have 5 (mixture + 4 sources)")
        return rate, length

    track = None

    def reader(start: int = 0, frames: int | None = None):
        length = track.length
        # AAC cannot be cut sample-exactly by seeking, so the file is decoded whole and sliced.
        try:
            audio, _ = stempeg.read_stems(str(path), dtype=np.float32, sample_rate=None)
        except Exception as e:
            raise fail(path, f"cannot decode ({_first_line(e)})") from None
        audio = np.transpose(audio, (0, 2, 1))  # [streams, channels, samples]
        if audio.shape[-1] < length:
            audio = np.pad(audio, ((0, 0), (0, 0), (0, length - audio.shape[-1])))
        end = length if frames is None else min(length, start + frames)
        audio = np.ascontiguousarray(audio[..., start:end])
        check_finite(audio, path)
        # Stream order in MUSDB18 stems: mixture, drums, bass, other, vocals.
        return to_stereo(audio[0], path), np.stack([to_stereo(a, path) for a in audio[1:5]])

    track = Track(name, subset, split_of(subset, name), SOURCES, reader, header)
    return track


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def _is_musdb(root: Path) -> bool:
    return any((root / s).is_dir() and any((root / s).glob("*.stem.mp4")) for s in SUBSETS)


def open_musdb(root: Path) -> Dataset:
    _require_ffmpeg(root)
    tracks = [_musdb_track(p, s) for s in SUBSETS if (root / s).is_dir()
              for p in sorted((root / s).glob("*.stem.mp4"))]
    return Dataset(root, "musdb18", tracks, SOURCES)


def open_dataset(root: str | Path) -> Dataset:
    """Open MUSDB18 (.stem.mp4), MUSDB18-HQ or a generic stem folder; the layout is detected."""
    root = Path(root).expanduser()
    if not root.exists():
        raise fail(root, "dataset folder not found")
    if not root.is_dir():
        raise fail(root, "dataset must be a folder")
    if _is_musdb(root):
        return open_musdb(root)
    if _is_stem_folder(root):
        return open_stem_folder(root)
    raise fail(root, "unknown dataset layout: expected MUSDB18 (ROOT/{train,test}/*.stem.mp4) or "
                     "stem folders (ROOT/{train,valid,test}/<track>/<source>.wav|.flac)")


SYNTHETIC = "synthetic"   # the embedded generated dataset, in <work>/data/synthetic


def open_dataset_spec(spec: str, work: Path) -> Dataset:
    """A dataset path, or 'synthetic' for the embedded dataset in the work folder."""
    if spec == SYNTHETIC:
        root = work / "data" / SYNTHETIC
        if not (root / "dataset.json").exists():
            raise PipelineError(f"{root}: the synthetic dataset is not generated yet; "
                                f"run `pipeline make-dataset` first")
        return open_dataset(root)
    return open_dataset(spec)
