"""`pipeline train-base --folds K`: cross-fitted base models.

The training tracks outside `select` (`fit`) are split into K folds (core.splits: name-hashed,
dealt round-robin). Fold model k is an ordinary `train_base` run in RUN/fold-k/, trained on
`fit-except-k-of-K` and picking its best epoch on the selection split; its config.json records the
tracks it trained on. RUN/model/ then holds `crossfit.json` (each fold model's folder, its
training tracks, the tracks it held out) and a MODEL.md: the one base model that
separators.families.crossfit loads and the cache stores under one key.

Each fold is resumable like any training (an interrupted fold continues from its last epoch, a
finished one is kept), so the whole command resumes where it stopped.
"""
from __future__ import annotations

import os
from pathlib import Path

from core.errors import PipelineError
from core.splits import fold_assignment, fold_split
from core.store import StemStore, read_json, write_json_atomic
from separators.families.card import CARD
from separators.families.crossfit import DESCRIPTION, FAMILY, assignment_digest


def fold_dir(run_dir: Path, k: int) -> Path:
    return Path(run_dir) / f"fold-{k}"


def describe(store: StemStore, dataset_id: str, family: str, folds: int, results) -> dict:
    """crossfit.json's content, from the fold runs' own records."""
    names = [t.name for t in store.tracks(dataset_id, "train")]
    where = fold_assignment(names, folds)
    models = []
    for k, r in enumerate(results, 1):
        trained = r.config["splits"]["fit_tracks"]
        models.append({"fold": k, "model": f"../fold-{k}/model", "train_tracks": trained,
                       "held_out": sorted(n for n, f in where.items() if f == k),
                       "best_epoch": r.best_epoch, "best_valid": r.best_valid,
                       "select_split": r.config["splits"]["select"]})
    return {"format": FAMILY, "family": family, "dataset_id": dataset_id, "folds": folds,
            "dataset_root": store.dataset_info(dataset_id).get("root"),
            "select_tracks": results[0].config["splits"]["select_tracks"],
            "fold_models": models}


def card(description: dict, results, command: str | None) -> str:
    d = description
    rows = ["| fold | trained on | held out | best epoch | selection loss |", "|---|---|---|---|---|"]
    rows += [f"| {m['fold']} | {len(m['train_tracks'])} tracks | {len(m['held_out'])} tracks | "
             f"{m['best_epoch']} | {m['best_valid']:.4g} |" for m in d["fold_models"]]
    first = results[0].config
    return "\n".join([
        f"# Cross-fitted {d['family']}-{first['preset']}: {d['folds']} fold models as one",
        "",
        f"Trained with stem-ensemble's `train-base --folds {d['folds']}` on dataset "
        f"`{d['dataset_id']}`" + (f" (`{command}`)." if command else "."),
        "",
        "**How it separates.** On a training track of this dataset, its stems come from the fold "
        "model that never saw that track; on every other track (the selection split, valid, "
        "test, new songs) from the mean of the fold models; on a remix (`pipeline remix`) from "
        "the fold models that saw none of the tracks it was cut from. A mixer fitted on its "
        "cached training stems therefore sees how it behaves on unseen music.",
        "",
        f"Folds: a fixed, name-hashed partition of the training tracks outside `select` "
        f"(core.splits); every fold model picks its best epoch on "
        f"`{d['fold_models'][0]['select_split']}` ({len(d['select_tracks'])} tracks). The fold "
        f"models are ordinary models in `../fold-k/model/`, each with its own card.",
        "",
        *rows,
        "",
        f"The store key covers every fold model's weights and options and the training-track "
        f"lists (sha256 {assignment_digest(d)[:12]}).",
        "",
    ])


def _write_if_changed(path: Path, text: str) -> None:
    # unchanged files keep their mtime: nothing downstream sees a new model
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def train(store: StemStore, dataset_id: str, family: str, preset: str, run_dir: str | Path, *,
          folds: int | None = None, **options):
    """`separators.train_base.train_base`, or with `folds` K >= 2 a cross-fitted run: K fold
    models in run_dir/fold-k/, the k-th trained on the training tracks outside fold k, and
    run_dir/model/ the one base model they make (each training track separated by the fold model
    that never saw it, any other audio by their mean)."""
    from separators.train_base import train_base

    if folds is None:
        return train_base(store, dataset_id, family, preset, run_dir, **options)
    return train_crossfit(store, dataset_id, family, preset, Path(run_dir), folds, **options)


def train_crossfit(store: StemStore, dataset_id: str, family: str, preset: str, run_dir: Path,
                   folds: int, *, command: str | None = None, **options):
    """Train (or resume, or keep) the K fold models, then write RUN/model/; returns a
    BaseTrainResult for the whole (best_epoch: the folds' list, best_valid: their mean)."""
    from separators.train_base import BaseTrainResult, train_base

    run_dir = Path(run_dir)
    if (run_dir / "config.json").exists():
        raise PipelineError(f"{run_dir}: holds a single model's training; cross-fit into another "
                            f"run folder (--name)")
    if options.get("select_split") not in (None, "select"):
        raise PipelineError(f"--folds: the fold models pick their best epoch on 'select' (a fixed "
                            f"tenth of train that no fold holds); got select split "
                            f"'{options['select_split']}'")
    options["select_split"] = "select"
    fold_assignment([t.name for t in store.tracks(dataset_id, "train")], folds)   # fails early
    results = []
    for k in range(1, folds + 1):
        results.append(train_base(store, dataset_id, family, preset, fold_dir(run_dir, k),
                                  fold=(k, folds), command=command, **options))
    for k, r in enumerate(results, 1):
        if r.config["splits"]["fit"] != fold_split(k, folds):
            raise PipelineError(f"{fold_dir(run_dir, k)}: trained on '{r.config['splits']['fit']}'")
    description = describe(store, dataset_id, family, folds, results)
    model_dir = run_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    path = model_dir / DESCRIPTION
    old = read_json(path) if path.exists() else None
    if old != description:
        write_json_atomic(path, description)
    _write_if_changed(model_dir / CARD, card(description, results, command))
    config = {**results[0].config, "crossfit": {"folds": folds}}
    config["splits"] = {k: v for k, v in config["splits"].items() if k != "fit_tracks"}
    return BaseTrainResult(model_dir, run_dir, config, [r.best_epoch for r in results],
                           sum(r.best_valid for r in results) / folds,
                           sum(r.train_seconds for r in results), kept=all(r.kept for r in results))
