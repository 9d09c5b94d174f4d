"""The stem store: every array the later stages read, as memmap-able `.npy` files on disk.

Layout (under `<work>/store`):

    datasets/<dataset_id>/dataset.json                       which tracks, splits, sources, rate
    datasets/<dataset_id>/<subset>/<track>/audio.npy         [1 + S, 2, n] float32: mixture, references
    datasets/<dataset_id>/<subset>/<track>/manifest.json
    models/<model_key>/model.json                            the model's identity and sources
    models/<model_key>/<dataset_id>/<subset>/<track>/stems.npy       [S, 2, n] float16
    models/<model_key>/<dataset_id>/<subset>/<track>/manifest.json

An entry is complete when its manifest exists: arrays are written to a temporary name, flushed
and renamed, and the manifest (holding the array's checksum) is renamed into place last. A
process killed at any moment therefore leaves either a complete entry or one that is redone.
Concurrent writers (shards, torchrun ranks) only ever write different entries.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import PipelineError

MANIFEST = "manifest.json"


def _safe(name: str) -> str:
    # Track names are kept readable (MUSDB names have spaces, '&', apostrophes); only the path
    # separator and leading dots could escape or hide an entry.
    return name.replace("/", "_").replace("\\", "_").lstrip(".") or "_"


def _fsync_write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def write_json_atomic(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    _fsync_write(tmp, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())
    os.replace(tmp, path)


def write_npy_atomic(path: Path, array: np.ndarray) -> str:
    """Write `array` to `path` atomically; return the sha256 of the file written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.save(f, np.ascontiguousarray(array))
        f.flush()
        os.fsync(f.fileno())
    digest = sha256_file(tmp)
    os.replace(tmp, path)
    return digest


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def read_json(path: Path):
    try:
        return json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: unreadable JSON ({e})") from None


@dataclass(frozen=True)
class TrackEntry:
    """A dataset track as the store knows it."""

    name: str
    subset: str
    split: str
    length: int

    @property
    def id(self) -> str:
        return f"{self.subset}/{_safe(self.name)}"


class StemStore:
    def __init__(self, root: str | Path):
        self.root = Path(root)

    # ---- paths -------------------------------------------------------------------------------
    def dataset_dir(self, dataset_id: str) -> Path:
        return self.root / "datasets" / dataset_id

    def track_dir(self, dataset_id: str, track: TrackEntry | str) -> Path:
        tid = track.id if isinstance(track, TrackEntry) else track
        return self.dataset_dir(dataset_id) / tid

    def model_dir(self, model_key: str) -> Path:
        return self.root / "models" / model_key

    def stems_dir(self, model_key: str, dataset_id: str, track: TrackEntry | str) -> Path:
        tid = track.id if isinstance(track, TrackEntry) else track
        return self.model_dir(model_key) / dataset_id / tid

    # ---- datasets ----------------------------------------------------------------------------
    def write_dataset_info(self, dataset_id: str, info: dict) -> None:
        write_json_atomic(self.dataset_dir(dataset_id) / "dataset.json", info)

    def dataset_info(self, dataset_id: str) -> dict:
        path = self.dataset_dir(dataset_id) / "dataset.json"
        if not path.exists():
            known = ", ".join(self.datasets()) or "none"
            raise PipelineError(f"{path}: dataset '{dataset_id}' is not in the store "
                                f"(known: {known}); run `pipeline cache --dataset ...` first")
        return read_json(path)

    def datasets(self) -> list[str]:
        base = self.root / "datasets"
        return sorted(p.name for p in base.iterdir() if (p / "dataset.json").exists()) if base.exists() else []

    def tracks(self, dataset_id: str, split: str | None = None) -> list[TrackEntry]:
        info = self.dataset_info(dataset_id)
        entries = [TrackEntry(t["name"], t["subset"], t["split"], t["length"]) for t in info["tracks"]]
        return [t for t in entries if split is None or t.split == split]

    def has_track(self, dataset_id: str, track: TrackEntry) -> bool:
        return (self.track_dir(dataset_id, track) / MANIFEST).exists()

    def write_track(self, dataset_id: str, track: TrackEntry, mixture: np.ndarray,
                    references: np.ndarray, meta: dict) -> None:
        """Store mixture [2, n] and references [S, 2, n] as one float32 array [1 + S, 2, n]."""
        audio = np.concatenate([mixture[None], references], axis=0).astype(np.float32)
        d = self.track_dir(dataset_id, track)
        digest = write_npy_atomic(d / "audio.npy", audio)
        write_json_atomic(d / MANIFEST, {**meta, "name": track.name, "subset": track.subset,
                                         "split": track.split, "length": track.length,
                                         "shape": list(audio.shape), "dtype": "float32",
                                         "sha256": digest, "created": time.time()})

    def _track_audio(self, dataset_id: str, track: TrackEntry | str) -> np.ndarray:
        d = self.track_dir(dataset_id, track)
        if not (d / MANIFEST).exists():
            raise PipelineError(f"{d}: track not in the store; run `pipeline cache --dataset ...`")
        return np.load(d / "audio.npy", mmap_mode="r")

    def mixture(self, dataset_id: str, track: TrackEntry | str) -> np.ndarray:
        """[2, n] float32 memmap."""
        return self._track_audio(dataset_id, track)[0]

    def references(self, dataset_id: str, track: TrackEntry | str) -> np.ndarray:
        """[S, 2, n] float32 memmap, in the order of the dataset's `sources`."""
        return self._track_audio(dataset_id, track)[1:]

    # ---- model stems -------------------------------------------------------------------------
    def write_model_info(self, model_key: str, info: dict) -> None:
        path = self.model_dir(model_key) / "model.json"
        if not path.exists():
            write_json_atomic(path, info)

    def model_info(self, model_key: str) -> dict:
        path = self.model_dir(model_key) / "model.json"
        if not path.exists():
            known = ", ".join(self.models()) or "none"
            raise PipelineError(f"{path}: model '{model_key}' is not in the store (known: {known})")
        return read_json(path)

    def models(self) -> list[str]:
        base = self.root / "models"
        return sorted(p.name for p in base.iterdir() if (p / "model.json").exists()) if base.exists() else []

    def resolve_model(self, name_or_key: str) -> str:
        """A model key from a key or a model's name (the newest entry of that name)."""
        keys = self.models()
        if name_or_key in keys:
            return name_or_key
        named = [k for k in keys if self.model_info(k).get("name") == name_or_key]
        if not named:
            raise PipelineError(f"{self.root}: no cached model named '{name_or_key}' "
                                f"(cached: {', '.join(keys) or 'none'})")
        return max(named, key=lambda k: (self.model_dir(k) / "model.json").stat().st_mtime)

    def has_stems(self, model_key: str, dataset_id: str, track: TrackEntry) -> bool:
        return (self.stems_dir(model_key, dataset_id, track) / MANIFEST).exists()

    def write_stems(self, model_key: str, dataset_id: str, track: TrackEntry, stems: np.ndarray,
                    meta: dict, dtype=np.float16) -> None:
        d = self.stems_dir(model_key, dataset_id, track)
        arr = stems.astype(dtype)
        digest = write_npy_atomic(d / "stems.npy", arr)
        write_json_atomic(d / MANIFEST, {**meta, "track": track.name, "subset": track.subset,
                                         "length": track.length, "shape": list(arr.shape),
                                         "dtype": np.dtype(dtype).name, "sha256": digest,
                                         "created": time.time()})

    def stems(self, model_key: str, dataset_id: str, track: TrackEntry | str) -> np.ndarray:
        """[S, 2, n] memmap (float16 by default), in the order of the model's `sources`."""
        d = self.stems_dir(model_key, dataset_id, track)
        if not (d / MANIFEST).exists():
            raise PipelineError(f"{d}: no stems of model '{model_key}' for this track; "
                                f"run `pipeline cache` for it first")
        return np.load(d / "stems.npy", mmap_mode="r")

    # ---- integrity ---------------------------------------------------------------------------
    def entries(self):
        """Every manifest-bearing entry directory (dataset tracks and model stems)."""
        for manifest in sorted(self.root.glob("**/" + MANIFEST)):
            yield manifest.parent

    def verify_entry(self, entry: Path) -> str | None:
        """None when the entry is intact, else a one-line description of what is wrong."""
        try:
            meta = read_json(entry / MANIFEST)
        except PipelineError as e:
            return str(e)
        arrays = [p for p in ("audio.npy", "stems.npy") if (entry / p).exists()]
        if not arrays:
            return f"{entry}: manifest without its array"
        path = entry / arrays[0]
        try:
            arr = np.load(path, mmap_mode="r")
        except Exception as e:  # a truncated or garbled header
            return f"{path}: unreadable array ({type(e).__name__}: {e})"
        if list(arr.shape) != meta.get("shape") or arr.dtype.name != meta.get("dtype"):
            return f"{path}: shape/dtype {list(arr.shape)} {arr.dtype} != manifest {meta.get('shape')} {meta.get('dtype')}"
        if arr.shape[-1] != meta.get("length"):
            return f"{path}: {arr.shape[-1]} samples != track length {meta.get('length')}"
        if sha256_file(path) != meta.get("sha256"):
            return f"{path}: checksum mismatch (corrupted or modified after writing)"
        return None
