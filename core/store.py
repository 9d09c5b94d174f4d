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

Long tracks are written piece by piece (`open_track_writer`, `open_stems_writer`: an
`EntryWriter` filled along the time axis, then `commit`ted) and can be read piece by piece
(`NpyFile`), with positional file I/O rather than a memory map: a memory-mapped array counts in
the process's resident memory for every page touched, so a 10-minute track would cost its full
size again. With NpyFile, memory is the piece being read or written.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import operator
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from core.errors import PipelineError
from core.splits import resolve as resolve_split

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


_tmp_ids = itertools.count()


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{next(_tmp_ids)}")


class NpyFile:
    """A C-ordered `.npy` file read and written in ranges of its last (time) axis.

    `f[..., a:b]`, `f[0]`, `f[1:, :, a:b]` ... read those samples with positional reads;
    `f[key] = value` writes them (mode "r+"). Any index of the leading axes works; the last axis
    takes a slice of step 1 (or nothing: all of it). No memory map: only the samples asked for
    are ever in memory. `select` fixes the first axis to one index (`NpyFile(p, select=0)` reads
    like `np.load(p)[0]`).
    """

    def __init__(self, path: str | Path, mode: str = "r", select: int | None = None):
        if mode not in ("r", "r+"):
            raise ValueError(f"mode must be 'r' or 'r+', got {mode!r}")
        self.path = Path(path)
        self._f = open(self.path, "rb" if mode == "r" else "r+b", buffering=0)
        try:
            version = np.lib.format.read_magic(self._f)
            read = {(1, 0): np.lib.format.read_array_header_1_0,
                    (2, 0): np.lib.format.read_array_header_2_0}.get(version)
            if read is None:
                raise PipelineError(f"{self.path}: .npy format version {version} is not supported")
            shape, fortran, dtype = read(self._f)
            if fortran or dtype.hasobject or not shape:
                raise PipelineError(f"{self.path}: not a C-ordered numeric array with a time axis")
        except BaseException:
            self._f.close()
            raise
        self.offset = self._f.tell()
        self.dtype = np.dtype(dtype)
        self._rows = np.arange(int(np.prod(shape[:-1]))).reshape(shape[:-1])
        self._n = shape[-1]
        if select is not None:
            self._rows = self._rows[operator.index(select)]
        self.shape = tuple(self._rows.shape) + (self._n,)
        self.ndim = len(self.shape)

    @classmethod
    def create(cls, path: str | Path, shape, dtype) -> "NpyFile":
        """A new file of `shape` and `dtype` (header written, data zero until written), open r+."""
        shape, dtype = tuple(int(d) for d in shape), np.dtype(dtype)
        with open(path, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": np.lib.format.dtype_to_descr(dtype),
                                                     "fortran_order": False, "shape": shape})
            f.truncate(f.tell() + int(np.prod(shape)) * dtype.itemsize)
        return cls(path, "r+")

    def __len__(self) -> int:
        return self.shape[0]

    def _where(self, key):
        """(flat row numbers [*lead], first sample, last sample + 1) of an index."""
        key = key if isinstance(key, tuple) else (key,)
        if any(k is Ellipsis for k in key):
            i = next(i for i, k in enumerate(key) if k is Ellipsis)
            key = key[:i] + (slice(None),) * (self.ndim - len(key) + 1) + key[i + 1:]
        if len(key) > self.ndim:
            raise IndexError(f"too many indices for an array of shape {self.shape}")
        key = key + (slice(None),) * (self.ndim - len(key))
        time = key[-1]
        if not isinstance(time, slice):
            raise IndexError("the last (time) axis takes a slice")
        a, b, step = time.indices(self._n)
        if step != 1:
            raise IndexError("the last (time) axis takes a slice of step 1")
        return self._rows[key[:-1]], a, max(a, b)

    def _at(self, row, a: int) -> int:
        return self.offset + (int(row) * self._n + a) * self.dtype.itemsize

    def __getitem__(self, key) -> np.ndarray:
        rows, a, b = self._where(key)
        out = np.empty(rows.shape + (b - a,), dtype=self.dtype)
        if out.size:
            for r, dst in zip(rows.reshape(-1), out.reshape(-1, b - a)):
                buf, pos = memoryview(dst).cast("B"), self._at(r, a)
                while len(buf):
                    self._f.seek(pos)
                    got = self._f.readinto(buf)
                    if not got:
                        raise PipelineError(f"{self.path}: truncated array")
                    buf, pos = buf[got:], pos + got
        return out

    def __setitem__(self, key, value) -> None:
        rows, a, b = self._where(key)
        value = np.broadcast_to(np.asarray(value), rows.shape + (b - a,))
        if not value.size:
            return
        for r, src in zip(rows.reshape(-1), value.reshape(-1, b - a)):
            buf, pos = np.ascontiguousarray(src, dtype=self.dtype).data.cast("B"), self._at(r, a)
            while len(buf):
                self._f.seek(pos)
                done = self._f.write(buf)
                buf, pos = buf[done:], pos + done

    def __array__(self, dtype=None, copy=None):
        return self[...] if dtype is None else self[...].astype(dtype)

    def sync(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class EntryWriter:
    """One store entry's array, written piece by piece, published by `commit`.

    Write with `w[..., a:b] = block` (see NpyFile) into a temporary file next to the entry;
    `commit(meta)` fsyncs it, checksums it, renames it into place and writes the manifest last.
    A writer that is never committed (an exception, `abort()`, leaving its `with` block
    uncommitted) deletes its temporary file; a killed process leaves only a stray temporary
    file, never read. Either way no manifest: the entry is redone.
    """

    def __init__(self, path: Path, shape, dtype, manifest: Callable[[dict, str], dict]):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._tmp = _tmp_name(self.path)
        self._manifest = manifest
        self.file = NpyFile.create(self._tmp, shape, dtype)
        self.shape, self.dtype, self.ndim = self.file.shape, self.file.dtype, self.file.ndim
        self.committed = False

    def __setitem__(self, key, value) -> None:
        self.file[key] = value

    def __getitem__(self, key) -> np.ndarray:
        return self.file[key]

    def commit(self, meta: dict | None = None) -> str:
        """Publish the array and its manifest ({**meta, shape, dtype, sha256, ...}); returns sha256."""
        if self.committed:
            raise PipelineError(f"{self.path}: already committed")
        self.file.sync()
        self.file.close()
        digest = sha256_file(self._tmp)
        manifest_path = self.path.parent / MANIFEST
        # an older complete entry (force=True) stops being complete before its array is replaced
        manifest_path.unlink(missing_ok=True)
        os.replace(self._tmp, self.path)
        write_json_atomic(manifest_path, self._manifest(dict(meta or {}), digest))
        self.committed = True
        return digest

    def abort(self) -> None:
        if not self.committed:
            self.file.close()
            self._tmp.unlink(missing_ok=True)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.abort()


def sha256_file(path: Path, chunk: int = 1 << 20) -> str:
    h, buf = hashlib.sha256(), memoryview(bytearray(chunk))
    with open(path, "rb", buffering=0) as f:
        while got := f.readinto(buf):
            h.update(buf[:got])
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
        """The dataset's tracks in `split` (None: all): train / valid / test, or the derived
        `select` (a fixed tenth of train) and `fit` (the rest of train), see core.splits."""
        info = self.dataset_info(dataset_id)
        entries = [TrackEntry(t["name"], t["subset"], t["split"], t["length"]) for t in info["tracks"]]
        return resolve_split(split, entries)

    def has_track(self, dataset_id: str, track: TrackEntry) -> bool:
        return (self.track_dir(dataset_id, track) / MANIFEST).exists()

    def open_track_writer(self, dataset_id: str, track: TrackEntry, n_sources: int) -> EntryWriter:
        """A writer of the track's float32 [1 + S, 2, n] array: row 0 the mixture, then the
        references; fill it along time (`w[:, :, a:b] = ...`) and `commit(meta)` it."""
        shape = (1 + n_sources, 2, track.length)

        def manifest(meta: dict, digest: str) -> dict:
            return {**meta, "name": track.name, "subset": track.subset, "split": track.split,
                    "length": track.length, "shape": list(shape), "dtype": "float32",
                    "sha256": digest, "created": time.time()}

        return EntryWriter(self.track_dir(dataset_id, track) / "audio.npy", shape, np.float32, manifest)

    def write_track(self, dataset_id: str, track: TrackEntry, mixture: np.ndarray,
                    references: np.ndarray, meta: dict) -> None:
        """Store mixture [2, n] and references [S, 2, n] as one float32 array [1 + S, 2, n]."""
        if mixture.shape != (2, track.length) or references.shape[1:] != (2, track.length):
            raise PipelineError(f"{track.name}: mixture {mixture.shape} / references "
                                f"{references.shape} do not match [2, {track.length}]")
        with self.open_track_writer(dataset_id, track, references.shape[0]) as w:
            w[0] = mixture
            w[1:] = references
            w.commit(meta)

    def _track_audio(self, dataset_id: str, track: TrackEntry | str) -> np.ndarray:
        d = self.track_dir(dataset_id, track)
        if not (d / MANIFEST).exists():
            raise PipelineError(f"{d}: track not in the store; run `pipeline cache --dataset ...`")
        return np.load(d / "audio.npy", mmap_mode="r")

    def mixture(self, dataset_id: str, track: TrackEntry | str) -> np.ndarray:
        """[2, n] float32 memmap."""
        return self._track_audio(dataset_id, track)[0]

    def mixture_file(self, dataset_id: str, track: TrackEntry | str) -> NpyFile:
        """[2, n] float32 read a piece at a time (`f[:, a:b]`), no memory map; close() it."""
        d = self.track_dir(dataset_id, track)
        if not (d / MANIFEST).exists():
            raise PipelineError(f"{d}: track not in the store; run `pipeline cache --dataset ...`")
        return NpyFile(d / "audio.npy", select=0)

    def track_file(self, dataset_id: str, track: TrackEntry | str) -> NpyFile:
        """[1 + S, 2, n] float32 (mixture, then references) read a piece at a time, no memory
        map; close() it."""
        d = self.track_dir(dataset_id, track)
        if not (d / MANIFEST).exists():
            raise PipelineError(f"{d}: track not in the store; run `pipeline cache --dataset ...`")
        return NpyFile(d / "audio.npy")

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

    def open_stems_writer(self, model_key: str, dataset_id: str, track: TrackEntry, shape,
                          dtype=np.float16) -> EntryWriter:
        """A writer of a model's stems [S, 2, n] (stored as `dtype`); values written are cast
        piece by piece. Fill it along time and `commit(meta)` it."""
        shape = tuple(int(d) for d in shape)

        def manifest(meta: dict, digest: str) -> dict:
            return {**meta, "track": track.name, "subset": track.subset, "length": track.length,
                    "shape": list(shape), "dtype": np.dtype(dtype).name, "sha256": digest,
                    "created": time.time()}

        return EntryWriter(self.stems_dir(model_key, dataset_id, track) / "stems.npy", shape, dtype,
                           manifest)

    def write_stems(self, model_key: str, dataset_id: str, track: TrackEntry, stems: np.ndarray,
                    meta: dict, dtype=np.float16) -> None:
        with self.open_stems_writer(model_key, dataset_id, track, stems.shape, dtype) as w:
            w[...] = stems
            w.commit(meta)

    def stems(self, model_key: str, dataset_id: str, track: TrackEntry | str) -> np.ndarray:
        """[S, 2, n] memmap (float16 by default), in the order of the model's `sources`."""
        d = self.stems_dir(model_key, dataset_id, track)
        if not (d / MANIFEST).exists():
            raise PipelineError(f"{d}: no stems of model '{model_key}' for this track; "
                                f"run `pipeline cache` for it first")
        return np.load(d / "stems.npy", mmap_mode="r")

    def stems_file(self, model_key: str, dataset_id: str, track: TrackEntry | str) -> NpyFile:
        """[S, 2, n] read a piece at a time (`f[:, :, a:b]`), no memory map; close() it.

        A memory map's pages count in the process's memory once touched: reading a 10-minute
        track's stems of three models through memmaps adds ~1.3 GB to the peak of `separate`."""
        d = self.stems_dir(model_key, dataset_id, track)
        if not (d / MANIFEST).exists():
            raise PipelineError(f"{d}: no stems of model '{model_key}' for this track; "
                                f"run `pipeline cache` for it first")
        return NpyFile(d / "stems.npy")

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
