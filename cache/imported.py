"""Separations made elsewhere, registered in the stem store as a base model.

Systems whose code cannot run here (or that users ran long ago) can still be ensembled: point
`pipeline cache import --name NAME DIR` at museval's estimates layout (`DIR/<subset>/<track>/
<target>.wav`) or the demucs CLI's (`DIR/<track>/<target>.wav`). Nothing is guessed: every track
must be there with every target, at the dataset's rate and length, or the import stops and says
what is missing. The estimates are stored as read, without the float16 rounding of base
models' stems (see `exact_dtype`).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np

from cache.run import entry_of
from core.audio import AUDIO_EXTENSIONS, audio_info, read_audio, to_stereo
from core.config import SOURCES, check_name
from core.datasets import Dataset
from core.errors import PipelineError
from core.store import StemStore
from core.versions import package_versions
from separators.base import model_key


def _track_dir(root: Path, subset: str, split: str, name: str) -> Path | None:
    # museval's layout names the subset (MUSDB's valid tracks are in train); `pipeline evaluate
    # --save-estimates` names the split
    for d in (root / subset / name, root / split / name, root / name):
        if d.is_dir():
            return d
    return None


def _targets(d: Path) -> dict[str, Path]:
    return {p.stem: p for p in sorted(d.iterdir()) if p.suffix.lower() in AUDIO_EXTENSIONS}


def exact_dtype(x: np.ndarray) -> np.dtype:
    """float32 when it holds every sample of `x` exactly (16/24-bit PCM, float WAV), else float64.

    A base model's own stems are stored in float16 (its rounding moves SDR by far less than
    models differ), but estimates made elsewhere are stored as read, so that scoring them here
    gives museval's numbers on the same files.
    """
    return np.dtype(np.float32) if np.array_equal(x.astype(np.float32), x) else np.dtype(np.float64)


def import_estimates(store: StemStore, dataset: Dataset, name: str, root: Path,
                     splits=None, progress=True) -> dict:
    check_name(name, "imported model name")   # the system's name in every report and run
    root = Path(root)
    if not root.is_dir():
        raise PipelineError(f"{root}: estimates folder not found")
    tracks = [t for t in dataset.tracks if splits is None or t.split in splits]
    found = {t.name: _track_dir(root, t.subset, t.split, t.name) for t in tracks}
    missing_tracks = [n for n, d in found.items() if d is None]
    if len(missing_tracks) == len(tracks):
        raise PipelineError(f"{root}: no estimates for any track of {dataset.id} (expected "
                            f"{root}/<subset>/<track>/<target>.wav or {root}/<track>/<target>.wav)")
    if missing_tracks:
        shown = "; ".join(missing_tracks[:5]) + (" ..." if len(missing_tracks) > 5 else "")
        raise PipelineError(f"{root}: estimates missing for {len(missing_tracks)} of {len(tracks)} "
                            f"tracks: {shown} (use --split to import a subset)")
    names = set().union(*(_targets(d) for d in found.values()))
    sources = tuple([s for s in SOURCES if s in names] + sorted(names - set(SOURCES)))
    digest = hashlib.sha256()
    for t in tracks:
        files = _targets(found[t.name])
        lacking = [s for s in sources if s not in files]
        if lacking:
            raise PipelineError(f"{found[t.name]}: missing targets {', '.join(lacking)} "
                                f"(other tracks have {', '.join(sources)})")
        for s in sources:
            rate, frames, _ = audio_info(files[s])
            if rate != t.sample_rate:
                raise PipelineError(f"{files[s]}: sample rate {rate} Hz, the dataset's is {t.sample_rate} Hz")
            if frames != t.length:
                raise PipelineError(f"{files[s]}: {frames} samples, the track has {t.length}")
            stat = files[s].stat()
            digest.update(f"{t.name}/{s}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    identity = {"family": "imported", "name": name, "root": str(root.resolve()),
                "files": digest.hexdigest(), "storage": "exact"}
    key = model_key(identity)
    store.write_model_info(key, {"key": key, "name": name, "family": "imported",
                                 "sources": list(sources), "sample_rate": dataset.tracks[0].sample_rate,
                                 "identity": identity, "versions": package_versions()})
    written = 0
    for t in tracks:
        if store.has_stems(key, dataset.id, entry_of(t)):
            continue
        files = _targets(found[t.name])
        stems = np.stack([to_stereo(read_audio(files[s], dtype="float64")[0], files[s])
                          for s in sources])
        store.write_stems(key, dataset.id, entry_of(t), stems,
                          {"model": name, "key": key, "identity": identity, "sources": list(sources),
                           "sample_rate": t.sample_rate, "source_dir": str(found[t.name])},
                          dtype=exact_dtype(stems))
        written += 1
    return {"key": key, "name": name, "tracks": len(tracks), "computed": written,
            "skipped": len(tracks) - written, "sources": list(sources)}
