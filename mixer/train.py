"""Training a learned mixer (conv1x1, MDX-Mixer, any architecture of mixer.models.ARCHS) on
cached stems: the `train-mixer` stage, and the learned ensemble methods' records (their options
are `TrainingOptions`, every architecture's, followed by the architecture's own).

Training examples are segments of T samples taken every `shift` samples from the train split
(`fit`, the train split less the selection split, when the epoch is selected on `select`; the
last segment of a track zero-padded) and from any `extra_data` (e.g. remixes, mixer.data), read
straight from the stem store a segment at a time; the loss is
L1 between the mixer's output and the references, on normalised waveforms; the optimizer is
Adam. Validation uses non-overlapping segments of the selection split (`valid` by default;
overlap would only repeat the same audio). The run folder holds everything `mixer.learned` needs:
config.json and mixer.pt.
"""
from __future__ import annotations

import functools
import math
import os
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from core.chunking import segment_offsets
from core.errors import PipelineError
from core.options import as_dict, build, combine, option
from core.splits import fit_split
from core.store import StemStore, read_json, sha256_file, write_json_atomic
from core.training import (
    BEST,
    LAST,
    TrainResult,
    cosine_schedule,
    load_checkpoint,
    save_atomic,
    train,
)
from mixer.consistency import ConsistencyOptions, check, project_segments
from mixer.data import extra_data_option, fitting_tracks
from mixer.ensemble import FitRequest, Method
from mixer.inputs import (
    InputSpec,
    assemble_inputs,
    assemble_targets,
    mixture_stats,
    normalise,
)
from mixer.learned import MIXER, LearnedMixer, build_from_config
from mixer.models import ARCHS, PRESETS, Arch

INITS = ("average", "random")
# which epoch's weights a run keeps: the best on one of these splits, or the last
SELECT_SPLITS = ("valid", "select", "test", "train")
SELECTS = SELECT_SPLITS + ("last",)
LR_SCHEDULES = ("constant", "cosine")


@dataclass(frozen=True)
class TrainingOptions:
    preset: str = option("cpu", "T, F, N of a preset: paper (T=2^18, F=2^7, N=8), ablation-17, "
                         "ablation-16, cpu (T=2^16, F=2^5, N=2), demo (T=2^14, F=2^5, N=1), tiny",
                         choices=tuple(PRESETS))
    T: int | None = option(None, "segment length in samples (default: the preset's)", flags=("-T",))
    epochs: int | None = option(None, "epochs (default: the architecture's, 50 conv1x1, 100 "
                                "mdx-mixer; raise it to train a finished run longer)")
    batch: int = option(4, "batch size per device")
    lr: float = option(3e-4, "Adam learning rate")
    shift: int = option(2 ** 15, "shift between training segments, samples")
    max_segments_per_epoch: int | None = option(None, "cap on training segments per epoch",
                                                flags=("--max-segments",))
    num_workers: int = option(0, "DataLoader worker processes", flags=("--workers",))
    seed: int = option(0, "random seed")
    init: str = option("average", "average: start from the models' uniform average; random: "
                       "PyTorch's init (the paper's)", choices=INITS)
    select: str = option("valid", "keep the epoch with the lowest loss on this split: valid, "
                         "select (a fixed tenth of train; the mixer trains on the rest), test or "
                         "train; or last (no held-out split is read). Use select or last when valid "
                         "is your evaluation split", choices=SELECTS)
    lr_schedule: str = option("constant", "constant, or cosine (per epoch, down to lr/10)",
                              choices=LR_SCHEDULES)
    weight_decay: float = option(0.0, "Adam weight decay")
    jitter: bool = option(False, "start each training segment at a random offset (0..shift-1) "
                          "drawn anew every epoch")
    with_mixture: bool = option(True, "feed the mixture as input channels",
                                flags=("--with-mixture/--without-mixture",))
    extra_data: tuple[str, ...] = extra_data_option()


@functools.lru_cache(maxsize=None)
def options_class(arch: Arch) -> type:
    """TrainingOptions, mixture consistency (which training goes through), then the
    architecture's own options, as one dataclass."""
    name = "".join(p.capitalize() for p in arch.name.replace("_", "-").split("-")) + "Options"
    return combine(name, TrainingOptions, ConsistencyOptions, arch.options)


def reads(options) -> list[tuple[str, str, str]]:
    out = [] if options.select == "last" else [("best epoch", options.select, "select")]
    return out + [("training data", fit_split(options.select), "select")]


@functools.lru_cache(maxsize=None)
def learned_method(arch: Arch) -> Method:
    """The ensemble method of a mixer architecture: trained here, applied by mixer.learned."""
    def fit(r: FitRequest):
        result = train_mixer(r.store, r.dataset_id, r.models, arch.name, r.run_dir,
                             device=r.device, resume=r.resume, progress=r.progress,
                             **as_dict(r.options))
        return {**read_json(r.run_dir / "config.json"), "summary": result.summary()}

    return Method(name=arch.name, summary=arch.summary, options=options_class(arch), fit=fit,
                  load=lambda config, run_dir, **kw: LearnedMixer(config, run_dir, **kw),
                  reads=reads, learned=True, time_varying=arch.time_varying)


class SegmentDataset(Dataset):
    """(X, Y) = (normalised inputs [in, T], normalised targets [2S, T]) for every segment of the
    tracks of `split` (and of the `extra` datasets, mixer.data).

    Each item is read from the stem store with positional reads (core.store.NpyFile), nothing
    kept open or mapped between items: memory is one segment's arrays whatever the number of
    tracks (remixes multiply them), and only a few numbers per track are held."""

    def __init__(self, store: StemStore, dataset_id: str, spec: InputSpec, split: str,
                 segment: int, shift: int, jitter: bool = False, extra=()):
        self.store, self.dataset_id, self.spec, self.segment = store, dataset_id, spec, segment
        # jitter: each segment starts a random 0..shift-1 samples later than its grid position
        # (drawn from torch's RNG, which the training loop seeds per epoch): other crops of
        # the same music every epoch, against over-fitting small data
        self.shift, self.jitter = shift, jitter
        # Fail now, in the main process, rather than in a DataLoader worker mid-epoch.
        self.items = fitting_tracks(store, dataset_id, split, extra, spec.model_keys)
        if not self.items:
            raise PipelineError(f"{store.dataset_dir(dataset_id)}: no '{split}' tracks to train a mixer on")
        self.tracks = [t for _, t in self.items]
        # One pass over each mixture now, so that reading a segment is a slice and nothing more.
        self.stats = []
        for d, t in self.items:
            with store.mixture_file(d, t) as mixture:
                self.stats.append(mixture_stats(mixture))
        self.index = [(i, off) for i, t in enumerate(self.tracks)
                      for off in segment_offsets(t.length, segment, shift)]

    def __len__(self) -> int:
        return len(self.index)

    def read(self, i: int, start: int, stop: int):
        """(mixture [2, m], {key: stems [S_m, 2, m]}, references [S, 2, m]) of samples start:stop."""
        d, t = self.items[i]
        with self.store.track_file(d, t) as f:
            audio = f[:, :, start:stop]
        stems = {}
        for k in self.spec.model_keys:
            with self.store.stems_file(k, d, t) as f:
                stems[k] = f[:, :, start:stop]
        return audio[0], stems, audio[1:]

    def __getitem__(self, idx: int):
        i, start = self.index[idx]
        if self.jitter:
            moved = start + int(torch.randint(self.shift, ()).item())
            start = moved if moved < self.tracks[i].length else start
        mixture, stems, refs = self.read(i, start, start + self.segment)
        x = normalise(assemble_inputs(self.spec, mixture, stems), self.stats[i])
        y = normalise(assemble_targets(refs), self.stats[i])
        pad = self.segment - x.shape[-1]   # zeros in the normalised domain: silence in, silence out
        if pad:
            x, y = np.pad(x, ((0, 0), (0, pad))), np.pad(y, ((0, 0), (0, pad)))
        return torch.from_numpy(x), torch.from_numpy(y)


def mixer_config(spec: InputSpec, dataset_id: str, arch: str, *, hyper: dict, epochs: int,
                 batch: int, lr: float, shift: int, seed: int,
                 max_segments_per_epoch: int | None, rate: int = 44100, select: str = "valid",
                 lr_schedule: str = "constant", weight_decay: float = 0.0,
                 jitter: bool = False, consistency: dict | None = None,
                 extra_data=()) -> dict:
    """Everything needed to rebuild, retrain or apply the mixer.

    Options added later are recorded only when they differ from their defaults, so the runs made
    before them keep their configuration (and stay resumable and finished)."""
    config = {"method": arch, "dataset": dataset_id, "rate": rate, "inputs": spec.to_dict(),
            "models": [{"key": k, "name": n, "sources": list(s)} for k, n, s in
                       zip(spec.model_keys, spec.model_names, spec.model_sources)],
            "sources": list(spec.targets), "with_mixture": spec.with_mixture,
            "in_channels": spec.in_channels, "out_channels": spec.out_channels,
            "input_names": spec.input_names(), "output_names": spec.output_names(),
            "hyper": hyper,
            "training": {"epochs": epochs, "batch": batch, "lr": lr, "shift": shift, "seed": seed,
                         "max_segments_per_epoch": max_segments_per_epoch, "loss": "l1",
                         "optimizer": "adam", "split": fit_split(select),
                         # the split the kept epoch was chosen on; None: the last epoch was kept
                         "valid_split": None if select == "last" else select}}
    if lr_schedule != "constant":
        config["training"]["lr_schedule"] = lr_schedule
    if weight_decay:
        config["training"]["weight_decay"] = weight_decay
    if jitter:
        config["training"]["jitter"] = True
    if extra_data:
        config["training"]["extra_data"] = list(extra_data)
    if consistency:   # mixer.consistency.check's finding; the mode applies and trains
        config["consistency"], config["consistency_check"] = consistency["mode"], consistency
    return config


def residual_base(base: str | Path, spec: InputSpec, penalty: float,
                  penalty_norm: str) -> tuple[dict, torch.Tensor]:
    """(the config's `residual` entry, the W [in, out]) of a finished conv1x1 run folder."""
    base = Path(base)
    path = base / MIXER
    if not path.exists():
        raise PipelineError(f"{path}: missing; the residual MDX-Mixer starts from a finished "
                            f"conv1x1 run (train it first)")
    config = read_json(base / "config.json")
    if config.get("method") != "conv1x1":
        raise PipelineError(f"{base}: a {config.get('method')} run; the residual MDX-Mixer starts "
                            f"from a conv1x1 run")
    if config["inputs"] != spec.to_dict():
        raise PipelineError(f"{base}: the conv1x1 run mixes other inputs (models or mixture) "
                            f"than this mixer; train both on the same ones")
    if penalty < 0:
        raise PipelineError(f"penalty {penalty}: a weight >= 0")
    weight = torch.load(path, map_location="cpu", weights_only=True)["weight"]
    entry = {"base": str(base.resolve()), "base_sha256": sha256_file(path),
             "penalty": penalty, "penalty_norm": penalty_norm}
    return entry, weight


def penalised(model: torch.nn.Module, penalty: float, norm: str):
    """The training loss: L1, plus `penalty` x the mean square (l2) or mean absolute value (l1)
    of the residual MDX-Mixer's corrections ΔW_k while training (validation: L1 alone)."""
    def loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        value = l1_loss(outputs, targets)
        delta = getattr(model, "last_delta", None)
        if penalty and model.training and delta is not None:
            size = delta.float().abs() if norm == "l1" else delta.float() ** 2
            value = value + penalty * size.mean()
        return value

    return loss


def _check_resumable(run_dir: Path, config: dict) -> None:
    old = read_json(run_dir / "config.json")
    strip = lambda c: {**c, "training": {k: v for k, v in c["training"].items() if k != "epochs"}}
    if strip(old) != strip(config):
        changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise PipelineError(f"{run_dir}: holds a run with a different configuration "
                            f"({', '.join(changed)} differ); use another run name, or start "
                            f"over with `train-mixer --fresh` (or remove the folder)")


def project_outputs(model: torch.nn.Module, mode: str, n_sources: int) -> None:
    """Train through mixture consistency: the module's outputs [B, 2S, T] projected onto its
    mixture inputs (channels 0-1) by a forward hook (not part of its state, so mixer.pt is the
    plain module; applying a run projects the whole track, mixer.ensemble.Mixer). In the
    normalised domain the sources then sum to the mixture up to (S - 1) x mean / std, the
    mixture's mean being ~0 for audio."""
    def hook(module, inputs, out):
        x = inputs[0]
        B, _, T = out.shape
        y = project_segments(out.float().reshape(B, n_sources, 2, T), x[:, :2].float(), mode)
        return y.reshape(B, 2 * n_sources, T).to(out.dtype)

    model.register_forward_hook(hook)


def l1_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.l1_loss(outputs, targets)


def train_mixer(store: StemStore, dataset_id: str, model_keys: list[str], arch: str,
                run_dir: str | Path, *, device=None, resume: bool = True, amp: str = "auto",
                progress: bool = True, **options) -> TrainResult:
    """Train a mixer of architecture `arch` (mixer.models.ARCHS) on `dataset_id`'s train split;
    write run_dir/mixer.pt. `options` are the learned method's (mixer.learned.TrainingOptions
    and the architecture's own: `pipeline train-mixer --help` lists them), among which:

    preset, T (and the architecture's F, N, ...): the segment length and network size; what is
    not given comes from the preset ('paper': 2^18, 2^7, 8).
    init: 'average' starts from the uniform average of the models' estimates (see
    mixer.models.Arch.build), 'random' from PyTorch's default initialisation.
    select: 'valid' keeps the epoch with the lowest L1 loss on the valid split (the paper's
    model selection); 'select' the lowest on the selection split (a fixed tenth of train, see
    core.splits; the mixer is then trained on the rest of train, 'fit'), 'test' / 'train' on
    those; 'last' keeps the last epoch and reads no held-out split. 'select' and 'last' never
    read the valid split - for datasets whose valid split is the evaluation split (MUSDB18
    previews).
    base (mdx-mixer): a finished conv1x1 run folder on the same inputs; the MDX-Mixer is then
    residual, W_k = W + ΔW_k, W started from the conv1x1's and ΔW_k from zero (the network's
    head zeroed), so training starts from the conv1x1's result.
    penalty, penalty_norm: with `base`, adds penalty x mean(ΔW_k^2) ('l2') or mean|ΔW_k| ('l1')
    to the training loss, pulling the per-segment corrections toward the time-invariant W.
    lr_schedule: 'constant' or 'cosine' (per epoch, down to a tenth of lr); weight_decay: Adam's.
    jitter: start each training segment a random 0..shift-1 samples after its grid position,
    drawn anew every epoch (reproducibly): other crops of the same tracks each epoch.

    Re-running with the same arguments resumes an interrupted run; a larger `epochs` continues it.
    """
    record = ARCHS.get(arch)
    o = build(options_class(record), options, f"train-mixer --arch {arch}")
    preset = PRESETS[o.preset]
    # the architecture's options named like a preset's entries (F, N) default to the preset's
    o = replace(o, **{k: v for k, v in preset.items()
                      if k != "T" and getattr(o, k, 0) is None})
    T = o.T or preset["T"]
    epochs = record.default_epochs if o.epochs is None else o.epochs
    if epochs < 1:
        raise PipelineError(f"train-mixer: epochs must be at least 1, got {epochs}")
    run_dir = Path(run_dir)

    spec = InputSpec.from_store(store, dataset_id, model_keys, with_mixture=o.with_mixture)
    consistent = None
    if o.consistency != "none":
        if not o.with_mixture:
            raise PipelineError(f"consistency {o.consistency}: training projects the outputs "
                                f"onto the mixture, so the mixture must be among the inputs "
                                f"(drop --without-mixture)")
        consistent = check(store, dataset_id, o.consistency, fit_split(o.select))
    hyper = record.hyper(T, o, o.init)
    base, penalty = getattr(o, "base", None), getattr(o, "penalty", 0.0)
    base_weight = None
    if base is not None:
        hyper["residual"], base_weight = residual_base(base, spec, penalty, o.penalty_norm)
    elif penalty:
        raise PipelineError("penalty: it weighs the residual MDX-Mixer's corrections; give the "
                            "conv1x1 run it starts from (base)")
    config = mixer_config(spec, dataset_id, arch, hyper=hyper, epochs=epochs, batch=o.batch,
                          select=o.select, lr_schedule=o.lr_schedule,
                          weight_decay=o.weight_decay, jitter=o.jitter, lr=o.lr, shift=o.shift,
                          seed=o.seed, max_segments_per_epoch=o.max_segments_per_epoch,
                          rate=int(store.dataset_info(dataset_id).get("sample_rate", 44100)),
                          consistency=consistent, extra_data=o.extra_data)
    writer = int(os.environ.get("RANK", "0")) == 0   # under torchrun only rank 0 writes
    if resume and (run_dir / "config.json").exists():
        _check_resumable(run_dir, config)
    elif writer and (run_dir / MIXER).exists():
        (run_dir / MIXER).unlink()   # a fresh run: never leave the previous run's result behind
    if writer:
        write_json_atomic(run_dir / "config.json", config)

    if resume and (run_dir / MIXER).exists() and (run_dir / LAST).exists():
        last = load_checkpoint(run_dir / LAST)
        if last["epoch"] >= epochs:   # finished: leave mixer.pt (and what depends on it) alone
            return TrainResult(last["best_valid"], last["best_epoch"], last["metrics"], run_dir)

    torch.manual_seed(o.seed)   # the initial weights
    model = build_from_config(config)
    if base_weight is not None:
        with torch.no_grad():
            model.base.copy_(base_weight)
    if consistent:
        project_outputs(model, o.consistency, len(spec.targets))
    train_set = SegmentDataset(store, dataset_id, spec, fit_split(o.select), T, o.shift, o.jitter,
                               extra=o.extra_data)
    valid_set = None if o.select == "last" else SegmentDataset(store, dataset_id, spec, o.select, T, T)
    world = int(os.environ.get("WORLD_SIZE", "1"))   # segments per epoch, all ranks together
    max_batches = (math.ceil(o.max_segments_per_epoch / (o.batch * world))
                   if o.max_segments_per_epoch else None)
    loss = penalised(model, penalty, getattr(o, "penalty_norm", "l2"))
    result = train(model, loss, train_set, valid_set,
                   lambda params: torch.optim.Adam(params, lr=o.lr, weight_decay=o.weight_decay),
                   epochs=epochs, batch_size=o.batch, seed=o.seed, run_dir=run_dir, device=device,
                   make_scheduler=(cosine_schedule(epochs) if o.lr_schedule == "cosine" else None),
                   num_workers=o.num_workers, amp=amp, max_batches_per_epoch=max_batches,
                   resume=resume, progress=progress)
    if writer:
        save_atomic(load_checkpoint(run_dir / BEST)["model"], run_dir / MIXER)
    return result
