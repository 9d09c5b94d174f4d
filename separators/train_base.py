"""`pipeline train-base`: train our own base separators on any dataset in the stem store.

Four families, four genuinely different separators (the point of ensembling them), each with its
recipe in its family module (separators/families/<family>.py, beside its loading adapter):

* ``umx``: Open-Unmix, one spectrogram-masking BLSTM per target (magnitude MSE); saved in
  Open-Unmix's folder format (``<target>.pth`` + ``<target>.json`` + ``separator.json``).
* ``xumx``: X-UMX (asteroid), bridged networks, the multi-domain loss (or Danna-Sep's
  complex variant); saved as asteroid's serialized dict in ``xumx.pth``.
* ``demucs``: HDemucs / HTDemucs, a waveform + spectrogram U-Net (L1 on waveforms); saved as
  demucs's ``<sig>-<checksum>.th`` package.
* ``roformer``: BS-RoFormer or Mel-RoFormer (Music-Source-Separation-Training's own classes,
  the `msst` package), transformers over band-split spectrograms (L1 + multi-resolution STFT
  loss); saved in MSST's format, ``config.yaml`` + ``model.ckpt``.

The loop itself is `core.training.train` (seeded, resumable per epoch, best checkpoint on the
validation loss, metrics.csv, progress bar, CUDA autocast, torchrun DDP). This module resolves the
configuration, builds the data (`separators.train_data`), asks the family's recipe for the network, the
loss and, at the end, the export of the best checkpoint to ``run_dir/model/`` with a ``MODEL.md``
card (separators.families.card); `separators.registry.load_separator(run_dir / "model")` loads the result,
and copying the folder to ``separators/checkpoints/<name>/`` ships it.

Run folder::

    run_dir/config.json     the resolved configuration (a resumed run must match it)
    run_dir/last.pt, best.pt, metrics.csv     core.training's checkpoints and log
    run_dir/input_stats.npz  Open-Unmix / X-UMX input normalisation (computed once)
    run_dir/model/          the exported model + MODEL.md
"""
from __future__ import annotations

import copy
import json
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from core.errors import PipelineError
from core.store import StemStore, write_json_atomic
from separators.families import canonical_family as family_of
from separators.families import recipe
from separators.families.card import CARD, model_card, synthetic_info, write_test_sdr
from separators.families.common import versions
from separators.train_data import Augment, FixedCrops, RandomMixes

__all__ = ["PRESET_NAMES", "BaseTrainResult", "build", "evaluate_trained",
           "family_of", "fit_and_select_splits", "resolve_config", "train_base", "write_test_sdr"]

PRESET_NAMES = ("tiny", "small", "paper")

# The loop's options, for every family; a preset's `train` section overrides them. An epoch is
# `samples_per_epoch` random examples, or `samples_per_track` x the number of training tracks
# (Open-Unmix's and asteroid's definition) when samples_per_epoch is None.
_COMMON_TRAIN = dict(segment=6.0, batch_size=16, epochs=100, samples_per_epoch=None,
                     samples_per_track=64, lr=1e-3, weight_decay=1e-5, lr_schedule="cosine",
                     lr_min_ratio=0.1, grad_clip=None, valid_segment=None, valid_max_items=None,
                     augment=Augment().to_dict())
# Loop options recorded only when set, so that runs which never used them keep their
# configuration (a resume or a kept run compares it).
_OPTIONAL_TRAIN = dict(warmup_steps=0)


def resolve_config(family: str, preset: str, *, sample_rate: int, n_train_tracks: int,
                   targets: Sequence[str], model_options: dict | None = None,
                   train_options: dict | None = None) -> dict:
    """The full configuration of a run: preset, then the explicit options on top."""
    from separators.families.common import merge_options

    family = family_of(family)
    fam = recipe(family)
    if preset not in fam.presets:
        raise PipelineError(f"preset '{preset}': choose one of {', '.join(fam.presets)}")
    model = fam.resolve_model(preset, model_options)
    options = dict(train_options or {})
    optional = {k: options.pop(k) for k in _OPTIONAL_TRAIN if k in options}
    train = merge_options(family, "train", {**_COMMON_TRAIN, **fam.presets[preset]["train"]},
                          options)
    train.update({k: v for k, v in optional.items() if v})
    train["augment"] = Augment(**{**Augment().to_dict(), **dict(train["augment"])}).to_dict()
    train["augment"]["gain"] = list(train["augment"]["gain"])
    seg = int(round(train["segment"] * sample_rate))
    if seg < 256:
        raise PipelineError(f"segment {train['segment']} s is too short at {sample_rate} Hz")
    spe = train["samples_per_epoch"] or train["samples_per_track"] * n_train_tracks
    return {"family": family, "preset": preset, "sample_rate": int(sample_rate),
            "targets": list(targets), "model": model,
            "train": {**train, "segment_samples": seg, "examples_per_epoch": int(spe)}}


def build(config: dict, prepared=None):
    """(training network, loss function, the bare model to export) for a configuration."""
    return recipe(config["family"]).build(config, prepared)


def evaluate_trained(store: StemStore, dataset_id: str, model_dir: str | Path, *,
                     split: str = "test", device: str = "cpu", write_card: bool = True) -> dict:
    """Separate a split with the exported model (through separators.registry, as the cache stage
    would) and score it with museval-exact framewise SDR; fills MODEL.md when `write_card`.
    Returns {source: median over tracks of the per-track median SDR}."""
    from core.metrics import framewise_sdr, median_over_tracks, track_median
    from separators.registry import load_separator

    sep = load_separator(str(model_dir), device=device, offline=True)
    sources = list(store.dataset_info(dataset_id)["sources"])
    names = [s for s in sep.sources if s in sources]
    tracks = store.tracks(dataset_id, split)
    if not tracks:
        raise PipelineError(f"dataset {dataset_id}: no '{split}' tracks to evaluate on")
    per_track = []
    for t in tracks:
        mix = torch.from_numpy(np.array(store.mixture(dataset_id, t), np.float32)).to(device)
        with torch.no_grad():
            est = sep.separate(mix).float().cpu().numpy()
        refs = np.asarray(store.references(dataset_id, t), np.float32)
        est = est[[list(sep.sources).index(s) for s in names]]
        refs = refs[[sources.index(s) for s in names]]
        per_track.append(track_median(framewise_sdr(refs, est, win=sep.sample_rate,
                                                    hop=sep.sample_rate)))
    scores = median_over_tracks(np.stack(per_track))
    out = {s: float(v) for s, v in zip(names, scores)}
    if write_card:
        write_test_sdr(model_dir, out, dataset_id=dataset_id, split=split, n_tracks=len(tracks))
    return out


# ------------------------------------------------------------------------------------------------
# The entry point
# ------------------------------------------------------------------------------------------------
@dataclass
class BaseTrainResult:
    model_dir: Path
    run_dir: Path
    config: dict
    best_epoch: int
    best_valid: float
    train_seconds: float
    metrics: list[dict] = field(default_factory=list)
    kept: bool = False      # a finished run with this configuration, left as it was


_RESUME_FREE = ("epochs",)   # train options that may change between a run and its resumption


def _check_resumable(run_dir: Path, config: dict) -> None:
    path = run_dir / "config.json"
    if not path.exists():
        return
    old = json.loads(path.read_text())

    def ident(c):
        c = copy.deepcopy(c)
        for k in _RESUME_FREE:
            c.get("train", {}).pop(k, None)
        return json.loads(json.dumps(c, sort_keys=True, default=str))

    a, b = ident(old), ident(config)
    if a != b:
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        sub = []
        for k in ("model", "train"):
            if k in diff:
                sub += [f"{k}.{j}" for j in sorted(set(a[k]) | set(b[k]))
                        if a[k].get(j) != b[k].get(j)]
        what = ", ".join(sub or diff)
        raise PipelineError(f"{run_dir}: holds a run with a different configuration ({what}); "
                            f"resume it with the same options, use another run folder, or "
                            f"start over with resume=False (`train-base --fresh`)")


def finished_run(run_dir: Path, config: dict) -> BaseTrainResult | None:
    """The run in `run_dir` when it finished with exactly `config` (its epochs included) and
    exported its model; None otherwise. Such a run is neither retrained nor re-exported, so the
    model's files, and the stems cached from them, stay valid."""
    try:
        old = json.loads((run_dir / "config.json").read_text())
        done = json.loads((run_dir / "training.json").read_text())
    except (OSError, ValueError):
        return None
    same = json.dumps(old, sort_keys=True) == json.dumps(config, sort_keys=True, default=str)
    if not (same and done.get("epochs") == config["train"]["epochs"]
            and (run_dir / "model" / CARD).exists()):
        return None
    return BaseTrainResult(run_dir / "model", run_dir, config, done["best_epoch"],
                           done["best_valid"], done.get("train_seconds_total", 0.0), kept=True)


def fit_and_select_splits(store: StemStore, dataset_id: str,
                          select_split: str | None) -> tuple[str, str]:
    """(split trained on, split whose loss picks the best epoch) for train-base."""
    from core.splits import SELECT, fit_split

    if select_split is None:
        select_split = "valid" if store.tracks(dataset_id, "valid") else "train"
    if select_split not in ("valid", "test", "train", SELECT):
        raise PipelineError(f"select split '{select_split}': choose valid, {SELECT} (a fixed "
                            f"tenth of train, the rest trains) or train")
    if not store.tracks(dataset_id, select_split):
        raise PipelineError(f"dataset {dataset_id}: no tracks in the '{select_split}' split to "
                            f"select the best epoch on")
    return fit_split(select_split), select_split


def train_base(store: StemStore, dataset_id: str, family: str, preset: str = "small",
               run_dir: str | Path = "runs/base", *, targets: Sequence[str] | None = None,
               seed: int = 0, epochs: int | None = None, batch_size: int | None = None,
               segment: float | None = None, samples_per_epoch: int | None = None,
               lr: float | None = None, arch: str | None = None, xumx_loss: str | None = None,
               model_options: dict | None = None, train_options: dict | None = None,
               device: str | None = None, resume: bool = True, amp: str = "off",
               num_workers: int = 0, progress: bool = True, select_split: str | None = None,
               command: str | None = None,
               fold: tuple[int, int] | None = None) -> BaseTrainResult:
    """Train a base separator of one family on a dataset of the stem store; export it.

    Args:
        store: the stem store holding the dataset (`pipeline cache --dataset ...` ingests it).
        dataset_id: the dataset's id in the store; its `train` split trains, its `valid` split
            validates (the train split's fixed crops when it has no valid tracks), unless
            `select_split` says otherwise.
        family: 'umx' (Open-Unmix), 'xumx' (X-UMX) or 'demucs' (HDemucs / HTDemucs).
        preset: 'tiny' (tests), 'small' (~15 min per model on 2 CPU cores at 44.1 kHz) or
            'paper' (the published configurations, for GPUs). See PRESETS.
        run_dir: the run folder: checkpoints, metrics.csv, config.json and, at the end,
            `run_dir/model/` (the model in its family's format + MODEL.md).
        targets: sources to separate, a subset of the dataset's (default: all, in its order).
        seed: seeds the initial weights, the data order and every augmentation.
        epochs: total number of epochs (a resumed run may raise it to train longer).
        batch_size, segment (seconds per training crop), samples_per_epoch (examples per epoch),
            lr: override the preset's values.
        arch: demucs only: 'hdemucs' or 'htdemucs'.
        xumx_loss: X-UMX only: 'magnitude' (X-UMX paper) or 'complex' (Danna-Sep: complex MSE
            after one Wiener EM step).
        model_options: further network options (umx/xumx: hidden_size, nfft, nhop, bandwidth;
            xumx: alpha, combine, wiener_iters; demucs: any HDemucs/HTDemucs argument, e.g.
            channels, depth, t_layers).
        train_options: further loop options (weight_decay, lr_schedule 'cosine'|'constant',
            lr_min_ratio, grad_clip, samples_per_track, valid_segment, valid_max_items, augment
            as a dict of `separators.train_data.Augment` fields, warmup_steps: a linear warm-up
            over the first optimizer steps, as MSST trains its RoFormers).
        device: 'cpu', 'cuda', 'cuda:1' (default: cuda when available); under torchrun each rank
            uses cuda:LOCAL_RANK and the data is split over ranks (DDP).
        resume: continue from run_dir/last.pt when present (the configuration must match; only
            `epochs` may change); False starts over in run_dir. A run that finished with exactly
            this configuration is returned as it is (`kept`), neither retrained nor re-exported.
        amp: CUDA autocast 'off' (default), 'auto', 'bf16' or 'fp16'. Demucs models cannot run
            under autocast (their complex spectrogram branch needs float32).
        num_workers: DataLoader worker processes.
        progress: show the progress bar.
        select_split: the split whose loss picks the best epoch: 'valid' (default when the
            dataset has one), 'select' (a fixed tenth of train, see core.splits; training
            then uses the rest of train, 'fit': for data whose valid split is the evaluation
            split) or 'train'. Recorded in config.json with the held-out track names.
        command: the command line recorded in MODEL.md (default: this process's argv).
        fold: (k, K): train only fold model k of K (on core.splits' `fit-except-k-of-K`),
            recording its training tracks in config.json; what `folds` does K times.

    Returns a BaseTrainResult (model_dir, run_dir, config, best epoch / loss, training seconds).
    """
    from core.training import (
        BEST,
        LAST,
        METRICS,
        _distributed,
        cosine_schedule,
        load_checkpoint,
        train,
    )

    family = family_of(family)
    run_dir = Path(run_dir)
    info = store.dataset_info(dataset_id)
    sources = list(info["sources"])
    targets = list(targets or sources)
    if len(set(targets)) != len(targets):
        raise PipelineError(f"targets {targets}: listed twice")
    unknown = [t for t in targets if t not in sources]
    if unknown:
        raise PipelineError(f"dataset {dataset_id}: no source(s) {', '.join(unknown)} "
                            f"(it has {', '.join(sources)})")
    fam = recipe(family)
    fam.check_training(targets, amp)
    train_split, valid_split = fit_and_select_splits(store, dataset_id, select_split)
    if fold is not None:
        from core.splits import fold_split

        train_split = fold_split(*fold)
    train_tracks = store.tracks(dataset_id, train_split)
    if not train_tracks:
        raise PipelineError(f"dataset {dataset_id}: no tracks in the '{train_split}' split")

    model_opts = dict(model_options or {})
    if arch is not None:
        if family not in ("demucs", "roformer"):
            raise PipelineError(f"arch is a demucs or roformer option (family {family})")
        model_opts["arch"] = arch
    if xumx_loss is not None:
        if family != "xumx":
            raise PipelineError(f"xumx_loss is an xumx option (family {family})")
        model_opts["loss"] = xumx_loss
    train_opts = {**(train_options or {}), "epochs": epochs, "batch_size": batch_size,
                  "segment": segment, "samples_per_epoch": samples_per_epoch, "lr": lr}
    config = resolve_config(family, preset, sample_rate=int(info["sample_rate"]),
                            n_train_tracks=len(train_tracks), targets=targets,
                            model_options=model_opts, train_options=train_opts)
    config.update(seed=int(seed), dataset_id=dataset_id,
                  splits={"fit": train_split, "select": valid_split,
                          "select_tracks": [x.name for x in store.tracks(dataset_id, valid_split)]})
    if fold is not None:   # what the cross-fitted model's honesty rests on, as trained
        config["splits"]["fit_tracks"] = [x.name for x in train_tracks]
    t = config["train"]

    if resume and (kept := finished_run(run_dir, config)) is not None:
        return kept
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if resume and (run_dir / LAST).exists():
        _check_resumable(run_dir, config)   # every rank, before anything is written
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not resume:
            for name in (LAST, BEST, METRICS, "input_stats.npz"):
                (run_dir / name).unlink(missing_ok=True)
        write_json_atomic(run_dir / "config.json", config)
    if world > 1:
        _distributed()
        torch.distributed.barrier()

    # data
    with_rest = fam.with_rest
    train_data = RandomMixes(store, dataset_id, targets=targets, segment=t["segment_samples"],
                             split=train_split, length=t["examples_per_epoch"], augment=Augment(
                                 **{**t["augment"], "gain": tuple(t["augment"]["gain"])}),
                             rest=with_rest)
    vseg = int(round((t["valid_segment"] or t["segment"]) * config["sample_rate"]))
    valid_data = FixedCrops(store, dataset_id, targets=targets, segment=vseg, split=valid_split,
                            max_items=t["valid_max_items"], rest=with_rest)

    # network
    prepared = fam.prepare(run_dir, store, dataset_id, config, rank, split=train_split)
    torch.manual_seed(seed)
    net, loss_fn, bare = fam.build(config, prepared)

    def make_optimizer(params):
        return torch.optim.Adam([p for p in params if p.requires_grad], lr=t["lr"],
                                weight_decay=t["weight_decay"])

    def make_scheduler(opt):
        if t["lr_schedule"] == "constant":
            return None
        if t["lr_schedule"] != "cosine":
            raise PipelineError(f"lr_schedule '{t['lr_schedule']}': choose cosine or constant")
        return cosine_schedule(t["epochs"], t["lr_min_ratio"])(opt)

    if torch.cuda.is_available() and (device in (None, "auto") or str(device).startswith("cuda")):
        # TF32 matmuls on Ampere+ GPUs: the usual speed-up for these networks (the losses that
        # need the precision compute in float64)
        torch.backends.cuda.matmul.allow_tf32 = True

    result = train(net, loss_fn, train_data, valid_data, make_optimizer, epochs=t["epochs"],
                   batch_size=t["batch_size"], seed=int(seed), run_dir=run_dir, device=device,
                   make_scheduler=make_scheduler if t["lr_schedule"] != "constant" else None,
                   num_workers=num_workers, amp=amp, resume=resume, progress=progress,
                   grad_clip=t["grad_clip"], warmup_steps=int(t.get("warmup_steps", _OPTIONAL_TRAIN["warmup_steps"])))

    model_dir = run_dir / "model"
    seconds = float(sum(r["seconds"] for r in result.metrics))
    if rank == 0:
        best = load_checkpoint(run_dir / BEST, "cpu")
        net.to("cpu").load_state_dict(best["model"])
        summary = {
            "dataset_id": dataset_id, "dataset_root": info.get("root"),
            "dataset_kind": info.get("kind"), "sources": sources,
            "synthetic": synthetic_info(info.get("root")),
            "n_train": len(train_tracks),
            "train_seconds": sum(x.length for x in train_tracks) / config["sample_rate"],
            "n_valid": len(valid_data.tracks), "valid_split": valid_split,
            "n_valid_items": len(valid_data),
            "epochs": len(result.metrics), "best_epoch": result.best_epoch,
            "best_valid": result.best_valid, "metrics": result.metrics,
            "train_seconds_total": seconds, "world_size": world,
            "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
            "parameters": sum(p.numel() for p in bare.parameters()),
            "versions": versions(),
            "command": command or shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "model_dir": str(model_dir.resolve()),
        }
        tmp = run_dir / f".model.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        files = fam.export(bare, tmp, config, summary)
        (tmp / CARD).write_text(model_card(config, summary, files, *fam.describe(config)))
        write_json_atomic(run_dir / "training.json",
                          {k: v for k, v in summary.items() if k != "metrics"})
        if model_dir.exists():
            shutil.rmtree(model_dir)
        os.replace(tmp, model_dir)
        _tensorboard(run_dir, result.metrics)
    if world > 1:
        torch.distributed.barrier()
    return BaseTrainResult(model_dir, run_dir, config, result.best_epoch, result.best_valid,
                           seconds, result.metrics)


def _tensorboard(run_dir: Path, metrics: list[dict]) -> None:
    """Mirror metrics.csv as TensorBoard scalars when tensorboard happens to be installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:
        return
    tb = run_dir / "tensorboard"
    shutil.rmtree(tb, ignore_errors=True)
    with SummaryWriter(str(tb)) as w:
        for r in metrics:
            for k in ("train_loss", "valid_loss", "lr"):
                w.add_scalar(k, r[k], r["epoch"])
