"""The tracks an ensemble is fitted on: a split of its dataset, plus more data.

Blend, band-blend, select-models and the learned mixers fit on their dataset's split and on any
`extra_data`: further datasets of the stem store, each `DATASET[:SPLIT]` (a store id or a dataset
folder; SPLIT default `train`), e.g. the remixes of `pipeline remix`. Every extra dataset must have
the same sources and sample rate, and the chosen models' stems on its tracks (`pipeline cache`).
Fitting statistics and training segments are then gathered over all those tracks alike; the
selection split (a mixer's `select`) stays on the dataset itself.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

from core.errors import PipelineError
from core.options import option
from core.store import StemStore, TrackEntry

DEFAULT_SPLIT = "train"


def extra_data_option():
    """The `extra_data` field of the fitting methods' options dataclasses."""
    return option((), "more data to fit on, DATASET[:SPLIT] each (a store id or dataset folder; "
                  "SPLIT default train), e.g. the remixes written by `pipeline remix`; the "
                  "models must be cached on it", flags=("--extra-data",))


def parse(item: str) -> tuple[str, str]:
    """'DATASET[:SPLIT]' -> (dataset, split)."""
    from core.splits import DERIVED, parse_fold

    head, sep, tail = str(item).rpartition(":")
    if sep and head and (tail in ("train", "valid", "test") + DERIVED or parse_fold(tail)):
        return head, tail
    return str(item), DEFAULT_SPLIT


def dataset_id(store: StemStore, spec: str) -> str:
    """A store id from a store id or a dataset folder (which must be in the store)."""
    if spec in store.datasets():
        return spec
    if Path(spec).is_dir():
        from core.datasets import open_dataset

        found = open_dataset(spec).id
        if found in store.datasets():
            return found
        raise PipelineError(f"extra data {spec}: not in the stem store yet (dataset {found}); "
                            f"cache the models on it first (`pipeline cache -d {spec} -m ...`)")
    raise PipelineError(f"extra data '{spec}': neither a dataset of the store (known: "
                        f"{', '.join(store.datasets()) or 'none'}) nor a dataset folder")


def fitting_tracks(store: StemStore, dataset: str, split: str, extra: Sequence[str] = (),
                   model_keys: Sequence[str] = ()) -> list[tuple[str, TrackEntry]]:
    """(dataset id, track) of every track fitted on: `split` of `dataset`, then each extra
    dataset's split. Extra datasets must match the dataset's sources and rate; every model must
    have stems on every track."""
    info = store.dataset_info(dataset)
    out = [(dataset, t) for t in store.tracks(dataset, split)]
    seen = {(dataset, split)}
    for item in extra:
        spec, part = parse(item)
        ds = dataset_id(store, spec)
        if (ds, part) in seen:
            raise PipelineError(f"extra data {item}: {ds}'s '{part}' tracks are already fitted on")
        seen.add((ds, part))
        other = store.dataset_info(ds)
        if list(other["sources"]) != list(info["sources"]) or other.get("sample_rate") != info.get("sample_rate"):
            raise PipelineError(f"extra data {item}: sources {other['sources']} at "
                                f"{other.get('sample_rate')} Hz, but {dataset} has "
                                f"{info['sources']} at {info.get('sample_rate')} Hz")
        tracks = store.tracks(ds, part)
        if not tracks:
            raise PipelineError(f"extra data {item}: no '{part}' tracks in {ds}")
        out += [(ds, t) for t in tracks]
    for key in model_keys:
        missing = [(d, t) for d, t in out if not store.has_stems(key, d, t)]
        if missing:
            d, t = missing[0]
            raise PipelineError(f"{store.model_dir(key) / d}: {len(missing)} track(s) without "
                                f"stems of model {key} (first: '{t.name}'); run `pipeline cache "
                                f"-d {store.dataset_info(d).get('root', d)}` for it first")
    return out


def describe(tracks: list[tuple[str, TrackEntry]], dataset: str) -> list[str]:
    """Track names for a run's config: the dataset's as they are, others as DATASET/name."""
    return [t.name if d == dataset else f"{d}/{t.name}" for d, t in tracks]
