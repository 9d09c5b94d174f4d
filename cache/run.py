"""The cache stage: put a dataset's audio and each base model's stems into the stem store once.

Work is per track and idempotent: a complete entry is skipped, so an interrupted run resumes
where it stopped, and `--shard I/N` (or RANK/WORLD_SIZE under torchrun) splits the tracks so
several processes fill one store without writing the same entry.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

from core.datasets import Dataset, Track
from core.errors import PipelineError
from core.progress import progress_bar
from core.store import StemStore, TrackEntry
from core.versions import package_versions
from separators.base import Separator, model_key


def parse_shard(shard: str | None) -> tuple[int, int]:
    """'I/N' -> (I, N); None -> torchrun's RANK/WORLD_SIZE, else (0, 1)."""
    if shard is None:
        return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    try:
        i, n = (int(v) for v in shard.split("/"))
    except ValueError:
        raise PipelineError(f"--shard {shard}: expected I/N, e.g. 0/4") from None
    if not 0 <= i < n:
        raise PipelineError(f"--shard {shard}: I must be in [0, N)")
    return i, n


def entry_of(track: Track) -> TrackEntry:
    return TrackEntry(track.name, track.subset, track.split, track.length)


def _progress(tracks: list[Track], desc: str, enabled: bool):
    # exact durations, added in the same order as the updates: rounding each one could carry
    # the count past the total
    total = sum(t.duration for t in tracks)
    return progress_bar(total=total, desc=desc, unit="s audio", disable=not enabled,
                bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s audio "
                           "[{elapsed}<{remaining}, {rate_fmt}] {postfix}")


def dataset_info(dataset: Dataset) -> dict:
    return {"id": dataset.id, "root": str(dataset.root.resolve()), "kind": dataset.kind,
            "sources": list(dataset.sources), "sample_rate": dataset.tracks[0].sample_rate,
            "tracks": [{"name": t.name, "subset": t.subset, "split": t.split, "length": t.length}
                       for t in dataset.tracks]}


def _reuse_known_lengths(store: StemStore, dataset: Dataset) -> None:
    """Probing every track's header (ffprobe per .stem.mp4) costs seconds; the store knows them."""
    try:
        info = store.dataset_info(dataset.id)
    except PipelineError:
        return
    known = {(t["subset"], t["name"]): t["length"] for t in info["tracks"]}
    if len(known) == len(dataset.tracks) and all((t.subset, t.name) in known for t in dataset.tracks):
        for t in dataset.tracks:
            t.set_header(info["sample_rate"], known[(t.subset, t.name)])


# Stem folders (MUSDB18-HQ, generic, synthetic) are read a piece at a time by seeking in each
# file; other readers (MUSDB18 .stem.mp4, `pipeline separate`'s input files) decode the whole file
# on every call, so they are read once.
SEEKABLE_KINDS = ("stems", "musdb18hq")
INGEST_CHUNK_SECONDS = 30.0


def _ingest_track(store: StemStore, dataset: Dataset, t: Track) -> None:
    """Write the track's [1 + S, 2, n] float32 array chunk by chunk: memory is one chunk."""
    n_src, entry = len(dataset.sources), entry_of(t)
    size = (max(1, int(INGEST_CHUNK_SECONDS * t.sample_rate)) if dataset.kind in SEEKABLE_KINDS
            else max(1, t.length))
    with store.open_track_writer(dataset.id, entry, n_src) as w:
        done = 0
        for start, mixture, stems in t.chunks(size):
            m = mixture.shape[-1]
            if start != done or mixture.shape != (2, m) or stems.shape != (n_src, 2, m) or m == 0:
                raise PipelineError(f"{t.name}: read mixture {mixture.shape} / stems {stems.shape} at "
                                    f"sample {start}, expected [2, m] / [{n_src}, 2, m] at {done}")
            w[0, :, start:start + m] = mixture
            w[1:, :, start:start + m] = stems
            done = start + m
        if done != t.length:
            raise PipelineError(f"{t.name}: read {done} samples, the track has {t.length}")
        w.commit({"dataset": dataset.id, "sources": list(dataset.sources),
                  "sample_rate": t.sample_rate})


def ingest_dataset(store: StemStore, dataset: Dataset, shard=(0, 1), force=False,
                   progress=True) -> int:
    """Store every track's mixture and references; returns the number of tracks written."""
    if not dataset.tracks:
        raise PipelineError(f"{dataset.root}: dataset has no tracks")
    _reuse_known_lengths(store, dataset)
    rates = {t.sample_rate for t in dataset.tracks}
    if len(rates) > 1:
        raise PipelineError(f"{dataset.root}: tracks have different sample rates {sorted(rates)}")
    store.write_dataset_info(dataset.id, dataset_info(dataset))
    mine = dataset.tracks[shard[0]::shard[1]]
    todo = [t for t in mine if force or not store.has_track(dataset.id, entry_of(t))]
    with _progress(todo, f"store {dataset.id}", progress and bool(todo)) as bar:
        for t in todo:
            _ingest_track(store, dataset, t)
            bar.set_postfix_str(t.name[:30])
            bar.update(t.duration)
    return len(todo)


def cache_model(store: StemStore, dataset: Dataset, separator: Separator, shard=(0, 1),
                force=False, splits=None, progress=True, load: dict | None = None) -> dict:
    """Separate every (selected) track with `separator` unless its stems are already stored.

    `load` ({"spec", "repo", "options"}: how `separators.registry.load_separator` built it) is kept in
    model.json so `pipeline separate` can run the same model on new audio.
    """
    from separators.inference import separate_array

    identity = separator.identity()
    key = model_key(identity)
    store.write_model_info(key, {"key": key, "name": separator.name, "family": separator.family,
                                 "sources": list(separator.sources),
                                 "sample_rate": separator.sample_rate, "identity": identity,
                                 "load": load, "versions": package_versions()})
    tracks = [t for t in dataset.tracks if splits is None or t.split in splits][shard[0]::shard[1]]
    todo = [t for t in tracks if force or not store.has_stems(key, dataset.id, entry_of(t))]
    t_start, done = time.perf_counter(), 0
    with _progress(todo, separator.name, progress and bool(todo)) as bar:
        for t in todo:
            entry = entry_of(t)
            # read and written a block at a time (positional I/O, no memory maps): memory is the
            # model's on one block, whatever the track's length
            mixture = store.mixture_file(dataset.id, entry)
            shape = (len(separator.sources), 2, t.length)
            try:
                if mixture.shape != shape[1:]:
                    raise PipelineError(f"{store.track_dir(dataset.id, entry)}: stored mixture "
                                        f"{mixture.shape}, expected {shape[1:]}")
                with store.open_stems_writer(key, dataset.id, entry, shape) as w:
                    t0 = time.perf_counter()
                    # a cross-fitted model answers with the fold models that never saw the track
                    separate_array(separator.for_track(store, dataset.id, entry), mixture,
                                   t.sample_rate, out=w)
                    seconds = time.perf_counter() - t0
                    w.commit({"model": separator.name, "key": key, "identity": identity,
                              "sources": list(separator.sources), "sample_rate": t.sample_rate,
                              "seconds": round(seconds, 3), "versions": package_versions()})
            finally:
                mixture.close()
            done += 1
            bar.set_postfix_str(t.name[:30])
            bar.update(t.duration)
    wall = time.perf_counter() - t_start
    audio = sum(t.duration for t in todo)
    return {"key": key, "name": separator.name, "tracks": len(tracks), "computed": done,
            "skipped": len(tracks) - done, "seconds": wall,
            "realtime": audio / wall if wall > 0 else float("inf")}


def cache_spec(store: StemStore, dataset: Dataset, spec: str, *, device="cpu",
               offline: bool = False, repo: str | Path | None = None, options: dict | None = None,
               splits=None, shard=(0, 1), force: bool = False, progress: bool = True,
               expect_key: str | None = None) -> list[dict]:
    """Load the base model `spec` (separators.registry) and cache its stems for `dataset`: what
    `pipeline cache -m SPEC`, an experiment's [[models]] and `pipeline separate` all do. Under
    test-time augmentation with `tta_members` it becomes several models (separators.tta), each
    cached as its own. Returns cache_model's summary per model.

    How each was loaded (spec, repo, options) goes into its model.json, so that it can be loaded
    again for new audio; expect_key: the store key it must have (a model loaded again must be
    the one cached before: same weights, same options).
    """
    from separators.registry import load_separator
    from separators.tta import split_options, with_tta

    own, tta = split_options(options)
    base = load_separator(spec, device=device, offline=offline, repo=repo, options=own)
    summaries = []
    for sep, recorded in with_tta(base, tta):
        key = model_key(sep.identity())
        if expect_key is not None and key != expect_key:
            raise PipelineError(f"'{spec}' now loads a different model ({key}: its weights or "
                                f"options changed since it was cached as {expect_key})")
        # An existing path is kept absolute so the model can be loaded again from any folder.
        load = {"spec": str(Path(spec).resolve()) if Path(spec).exists() else spec,
                "repo": str(Path(repo).resolve()) if repo else None,
                "options": {**{k: v for k, v in own.items() if v is not None}, **recorded}}
        summaries.append(cache_model(store, dataset, sep, shard=shard, force=force,
                                     splits=splits, progress=progress, load=load))
    return summaries
