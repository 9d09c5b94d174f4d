"""Split names: the dataset's own (train / valid / test) and two derived from train.

Data whose evaluation split is `valid` (the MUSDB18 previews: 80 train / 14 valid) has no third
split on which to choose a base model's best epoch, a blend's weights or the models of an
ensemble without looking at the evaluation split. So every dataset also has

* ``select``: a deterministic tenth of its train tracks (at least one), the *selection split*;
* ``fit``: the rest of train, what a model is fitted on when it selects on ``select``.

Membership depends only on the track names (the sha256 of each name orders them), so it is the
same on every machine, in every stage and whatever order the dataset lists its tracks in; adding
tracks to a dataset moves at most the new ones into or out of ``select``.
"""
from __future__ import annotations

import hashlib
from typing import Sequence, TypeVar

SELECT, FIT = "select", "fit"
DERIVED = (SELECT, FIT)
SELECT_FRACTION = 0.1

T = TypeVar("T")


def _rank_key(name: str) -> str:
    return hashlib.sha256(name.encode("utf-8")).hexdigest()


def selection_names(train_names: Sequence[str], fraction: float = SELECT_FRACTION) -> set[str]:
    """The names of the `select` tracks among the train tracks: round(fraction x n), at least one
    (none when train has a single track: it cannot be both fitted on and held out)."""
    names = sorted(set(train_names), key=_rank_key)
    if len(names) < 2:
        return set()
    k = min(len(names) - 1, max(1, int(round(fraction * len(names)))))
    return set(names[:k])


def fit_split(select_split: str | None) -> str:
    """The split a model is fitted on when `select_split` picks its best epoch: `fit` when that is
    `select` (held out of training), else the whole of train."""
    return FIT if select_split == SELECT else "train"


def resolve(split: str | None, tracks: Sequence[T], name=lambda t: t.name,
            split_of=lambda t: t.split) -> list[T]:
    """The tracks of `split` (None: all) among `tracks`, the derived splits included."""
    if split is None:
        return list(tracks)
    if split not in DERIVED:
        return [t for t in tracks if split_of(t) == split]
    train = [t for t in tracks if split_of(t) == "train"]
    chosen = selection_names([name(t) for t in train])
    keep = (lambda t: name(t) in chosen) if split == SELECT else (lambda t: name(t) not in chosen)
    return [t for t in train if keep(t)]
