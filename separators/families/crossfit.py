"""Cross-fitted base models: K fold models of one recipe, cached as ONE base model.

`pipeline train-base --folds K` (separators.crossfit) trains fold model k on the training tracks
outside fold k and writes RUN/model/crossfit.json, the description this family loads: each fold
model's folder and the training tracks it saw. Loaded, it is one `Separator` whose stems for a
track come from the fold models that never trained on any of that track's audio, averaged:

* a training track of fold k: fold model k alone (the only one that did not see it);
* every other track (select, valid, test, a new song): the mean of the K fold models, or with
  `crossfit_unseen = "one"` one fold model, picked by a hash of the track's name, so that these
  tracks get the same kind of estimate as the training tracks (a mixer fitted on single fold
  models' errors then meets single fold models' errors again, not their smoother mean; on
  MUSDB18-7 it scored worse than the mean for the members and every fit, see README);
* a remix (`pipeline remix`, core.remix) of the training tracks: the fold models that saw none
  of the tracks its stems were cut from (with `--folds-of`, one fold's model);
* a remix whose stems come from tracks every fold model saw: refused.

So a mixer fitted on the cached training stems sees each member as it behaves on music it was
not trained on (stacking's out-of-fold predictions: Wolpert 1992, Breiman 1996). The cache asks
for the separator of each track through `Separator.for_track`; the model key covers every fold
model's identity (weights, options) and the training-track lists.
"""
from __future__ import annotations

import copy
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import PipelineError
from core.options import option
from separators.base import Separator
from separators.families import Family, Request, pick

FAMILY = "crossfit"
DESCRIPTION = "crossfit.json"


@dataclass(frozen=True)
class CrossFitOptions:
    crossfit_unseen: str = option(
        "mean", "how a cross-fitted model separates audio no fold model trained on (valid, test, "
        "new songs): the mean of its fold models, or one fold model picked by a hash of the "
        "track's name (the kind of estimate its training tracks get)", choices=("mean", "one"))


def read_description(folder: Path) -> dict:
    path = Path(folder) / DESCRIPTION
    try:
        d = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: unreadable cross-fit description ({e})") from None
    if d.get("format") != FAMILY or not isinstance(d.get("fold_models"), list) or len(d["fold_models"]) < 2:
        raise PipelineError(f"{path}: not a cross-fit description (format 'crossfit' with at "
                            f"least two fold_models)")
    return d


def assignment_digest(description: dict) -> str:
    """sha256 over what decides which fold model separates which track."""
    what = {"dataset_id": description["dataset_id"],
            "train_tracks": [sorted(f["train_tracks"]) for f in description["fold_models"]]}
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


class CrossFitSeparator(Separator):
    family = FAMILY

    def __init__(self, name: str, description: dict, folds: list[Separator], unseen: str = "mean"):
        self.name, self.description, self.folds, self.unseen = name, description, folds, unseen
        first = folds[0]
        for f in folds[1:]:
            if tuple(f.sources) != tuple(first.sources) or f.sample_rate != first.sample_rate:
                raise PipelineError(f"{name}: fold models differ in sources or sample rate "
                                    f"({first.sources} at {first.sample_rate} Hz vs {f.sources} "
                                    f"at {f.sample_rate} Hz)")
        self.sources, self.sample_rate, self.device = tuple(first.sources), first.sample_rate, first.device
        self.dataset_id = description["dataset_id"]
        self.seen = [set(f["train_tracks"]) for f in description["fold_models"]]
        self.used = tuple(range(len(folds)))   # the fold models averaged (for_track narrows it)

    def identity(self) -> dict:
        identity = {"family": FAMILY, "name": self.name,
                    "folds": [f.identity() for f in self.folds],
                    "assignment": assignment_digest(self.description)}
        if self.unseen != "mean":   # the default leaves the keys of earlier caches as they were
            identity["unseen"] = self.unseen
        return identity

    def to(self, device) -> "CrossFitSeparator":
        for f in self.folds:
            f.to(device)
        self.device = self.folds[0].device
        return self

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        total = None
        for i in self.used:
            y = self.folds[i].separate(mixture).float()
            total = y if total is None else total.add_(y)
        return total / len(self.used)

    def honest_folds(self, origins) -> tuple[int, ...]:
        """The fold models (0-based) that trained on none of `origins` ((dataset id, track name)
        pairs: the tracks a piece of audio was cut from)."""
        return tuple(i for i, seen in enumerate(self.seen)
                     if not any(d == self.dataset_id and n in seen for d, n in origins))

    def for_track(self, store, dataset_id: str, track) -> "CrossFitSeparator":
        from core.remix import origins

        found = origins(store, dataset_id, track)
        used = self.honest_folds(found)
        if not used:
            raise PipelineError(
                f"{self.name}: every fold model trained on some of the audio of track "
                f"'{track.name}' of {dataset_id} (cut from {', '.join(sorted(n for _, n in found))}); "
                f"remix with --folds-of so that each remix comes from one fold")
        if self.unseen == "one" and len(used) > 1:
            digest = hashlib.sha256(track.name.encode()).digest()
            used = (used[int.from_bytes(digest[:8], "big") % len(used)],)
        view = copy.copy(self)
        view.used = used
        return view


def _load(request: Request) -> CrossFitSeparator:
    from separators.registry import load_separator, run_label

    folder = request.path
    d = read_description(folder)
    folds = []
    for f in d["fold_models"]:
        path = (folder / f["model"]).resolve()
        if not path.is_dir():
            raise PipelineError(f"{folder / DESCRIPTION}: fold model {f['fold']} missing ({path}); "
                                f"train it with the same `train-base --folds` command")
        folds.append(load_separator(str(path), device=request.device, offline=request.offline,
                                    repo=request.repo, options=request.options))
    unseen = pick(CrossFitOptions, request.options, f"{FAMILY} options")["crossfit_unseen"]
    # the mode is in the name as in the key, so that a report listing both variants can tell them apart
    name = (request.label or run_label(folder) or folder.name) + ("+one-fold" if unseen == "one" else "")
    return CrossFitSeparator(name, d, folds, unseen)


RECORD = Family(
    name=FAMILY,
    summary="cross-fitted models (`train-base --folds K`): a folder holding crossfit.json; each "
            "training track separated by the fold model that never saw it, other audio by their mean",
    load=_load, options=CrossFitOptions,
    folder=lambda folder: (folder / DESCRIPTION).is_file(),
)
