"""Split names: the dataset's own (train / valid / test) and two derived from train.

Data whose evaluation split is `valid` (the MUSDB18 previews: 80 train / 14 valid) has no third
split on which to choose a base model's best epoch, a blend's weights or the models of an
ensemble without looking at the evaluation split. So every dataset also has

* ``select``: a deterministic tenth of its train tracks (at least one), the *selection split*;
* ``fit``: the rest of train, what a model is fitted on when it selects on ``select``.

Membership depends only on the track names (the sha256 of each name orders them), so it is the
same on every machine, in every stage and whatever order the dataset lists its tracks in; adding
tracks to a dataset moves at most the new ones into or out of ``select``.

Cross-fitting (`train-base --folds K`, separators.crossfit) partitions ``fit`` into K folds, in
the same name-hashed order, dealt round-robin so that fold sizes differ by at most one:

* ``fold-k-of-K`` (k = 1..K): the tracks of fold k;
* ``fit-except-k-of-K``: ``fit`` less fold k, what the k-th fold model trains on.

The folds never hold a ``select`` track, so every fold model can pick its epoch on ``select``.
"""
from __future__ import annotations

import hashlib
import re
from typing import Sequence, TypeVar

from core.errors import PipelineError

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


_FOLD = re.compile(r"^(fold|fit-except)-(\d+)-of-(\d+)$")


def fold_split(k: int, folds: int, held_out: bool = False) -> str:
    """The name of fold k's tracks (held_out=True) or of what its model trains on."""
    return f"{'fold' if held_out else 'fit-except'}-{k}-of-{folds}"


def parse_fold(split: str | None) -> tuple[str, int, int] | None:
    """('fold' | 'fit-except', k, K) of a fold split's name; None for any other name."""
    m = _FOLD.match(split or "")
    return None if m is None else (m.group(1), int(m.group(2)), int(m.group(3)))


def fold_assignment(train_names: Sequence[str], folds: int) -> dict[str, int]:
    """{name: its fold, 1..folds} for the `fit` tracks among `train_names`."""
    held = selection_names(train_names)
    fit = sorted(set(train_names) - held, key=_rank_key)
    if folds < 2:
        raise PipelineError(f"folds {folds}: cross-fitting needs at least 2 folds")
    if folds > len(fit):
        raise PipelineError(f"folds {folds}: only {len(fit)} training track(s) outside 'select' "
                            f"to share among them")
    return {name: 1 + i % folds for i, name in enumerate(fit)}


def is_part_of_train(split: str) -> bool:
    """Whether a split is train itself or a part of it (select, fit, a fold's)."""
    return split == "train" or split in DERIVED or parse_fold(split) is not None


def fit_split(select_split: str | None) -> str:
    """The split a model is fitted on when `select_split` picks its best epoch: `fit` when that is
    `select` (held out of training), else the whole of train."""
    return FIT if select_split == SELECT else "train"


def resolve(split: str | None, tracks: Sequence[T], name=lambda t: t.name,
            split_of=lambda t: t.split) -> list[T]:
    """The tracks of `split` (None: all) among `tracks`, the derived splits included."""
    if split is None:
        return list(tracks)
    fold = parse_fold(split)
    if split not in DERIVED and fold is None:
        return [t for t in tracks if split_of(t) == split]
    train = [t for t in tracks if split_of(t) == "train"]
    if fold is not None:
        kind, k, folds = fold
        if not 1 <= k <= folds:
            raise PipelineError(f"split '{split}': fold {k} is not one of 1..{folds}")
        where = fold_assignment([name(t) for t in train], folds)
        if kind == "fold":
            return [t for t in train if where.get(name(t)) == k]
        return [t for t in train if where.get(name(t), k) != k]
    chosen = selection_names([name(t) for t in train])
    keep = (lambda t: name(t) in chosen) if split == SELECT else (lambda t: name(t) not in chosen)
    return [t for t in train if keep(t)]
