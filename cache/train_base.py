"""`pipeline train-base`: train our own base separators on any dataset in the stem store.

Three families, three genuinely different separators (the point of ensembling them):

* ``umx``: Open-Unmix (`openunmix.model.OpenUnmix`), one independent spectrogram-masking network
  per target, trained with the MSE between magnitude spectrograms (Open-Unmix's scripts/train.py:
  input mean/scale from the training mixtures, bandwidth-limited input, Adam + weight decay).
  Saved in Open-Unmix's folder format: ``<target>.pth`` + ``<target>.json`` + ``separator.json``.
* ``xumx``: CrossNet-Open-Unmix (asteroid's `BrokenXUMX`), the four networks bridged by averaged
  hidden states, trained with the combinational multi-domain loss of the X-UMX paper
  (`cache.losses`); ``xumx_loss="complex"`` gives the Danna-Sep variant (complex-domain MSE after
  a differentiable multichannel Wiener filter). Saved as asteroid's serialized dict
  (``model_name="XUMX"``) in ``xumx.pth``.
* ``demucs``: Hybrid Demucs (`demucs.hdemucs.HDemucs`) or Hybrid Transformer Demucs
  (`demucs.htdemucs.HTDemucs`), a waveform + spectrogram U-Net, trained with the L1 loss on
  waveforms. Saved in demucs's own package format as ``<sig>-<checksum>.th`` (what demucs's
  solver / export writes), loadable with ``demucs.pretrained.get_model(sig, repo=model_dir)``.

The loop itself is `pipeline.training.train` (seeded, resumable per epoch, best checkpoint on the
validation loss, metrics.csv, progress bar, CUDA autocast, torchrun DDP). This module builds the data
(`cache.train_data`), the network, the loss and, at the end, exports the best checkpoint to
``run_dir/model/`` with a ``MODEL.md`` card; `cache.registry.load_separator(run_dir / "model")`
loads the result, and copying the folder to ``cache/checkpoints/<name>/`` ships it.

Run folder::

    run_dir/config.json     the resolved configuration (a resumed run must match it)
    run_dir/last.pt, best.pt, metrics.csv     pipeline.training's checkpoints and log
    run_dir/input_stats.npz  Open-Unmix / X-UMX input normalisation (computed once)
    run_dir/model/          the exported model + MODEL.md
"""
from __future__ import annotations

import copy
import hashlib
import io
import json
import math
import os
import shlex
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import nn

from cache.losses import istft, multichannel_wiener, stft
from cache.store import StemStore, write_json_atomic
from cache.train_data import Augment, FixedCrops, RandomMixes
from pipeline.errors import PipelineError

FAMILIES = ("umx", "xumx", "demucs")
FAMILY_ALIASES = {"openunmix": "umx", "open-unmix": "umx", "x-umx": "xumx", "hdemucs": "demucs",
                  "htdemucs": "demucs"}
PRESET_NAMES = ("tiny", "small", "paper")
CARD = "MODEL.md"
SDR_BEGIN, SDR_END = "<!-- test-sdr -->", "<!-- /test-sdr -->"

# ------------------------------------------------------------------------------------------------
# Presets
# ------------------------------------------------------------------------------------------------
# model: the family's network arguments. train: the loop's. An epoch is `samples_per_epoch`
# random examples, or `samples_per_track` x the number of training tracks (Open-Unmix's and
# asteroid's definition) when samples_per_epoch is None.
#
# tiny  - for tests: a few seconds on a CPU at 8-16 kHz.
# small - ~15 minutes per model on 2 CPU cores at 44.1 kHz on the synthetic dataset (speeds
#         measured on 2 shared cores, torch 2.11, in the comments), for a useful quality there.
# paper - the published configurations, for GPUs: Open-Unmix (hidden 512, 6 s, batch 16, lr 1e-3,
#         64 samples per track per epoch), X-UMX (asteroid's conf.yml: hidden 512, batch 14,
#         alpha 10, combination loss), HTDemucs (demucs defaults, 10 s segments, batch 32,
#         lr 3e-4, 800 batches per epoch, 360 epochs).
_COMMON_TRAIN = dict(segment=6.0, batch_size=16, epochs=100, samples_per_epoch=None,
                     samples_per_track=64, lr=1e-3, weight_decay=1e-5, lr_schedule="cosine",
                     lr_min_ratio=0.1, grad_clip=None, valid_segment=None, valid_max_items=None,
                     augment=Augment().to_dict())

PRESETS: dict[str, dict[str, dict]] = {
    "umx": {
        "tiny": dict(model=dict(hidden_size=16, nfft=512, nhop=128, bandwidth=16000),
                     train=dict(segment=1.0, batch_size=4, epochs=2, samples_per_epoch=8,
                                valid_max_items=4, lr_schedule="constant")),
        # 4 x hidden 128: 0.9 steps/s -> 20 x 36 steps ~ 13 min, + ~1.5 min validation
        "small": dict(model=dict(hidden_size=128, nfft=4096, nhop=1024, bandwidth=16000),
                      train=dict(segment=3.0, batch_size=8, epochs=20, samples_per_epoch=288,
                                 valid_segment=6.0, valid_max_items=24)),
        "paper": dict(model=dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000),
                      train=dict(segment=6.0, batch_size=16, epochs=1000, samples_per_track=64)),
    },
    "xumx": {
        "tiny": dict(model=dict(hidden_size=16, nfft=512, nhop=128, bandwidth=16000,
                                loss="magnitude", alpha=10.0, combine=True, wiener_iters=0),
                     train=dict(segment=1.0, batch_size=4, epochs=2, samples_per_epoch=8,
                                valid_max_items=4, lr_schedule="constant")),
        # hidden 128: 0.23-0.31 steps/s (the spectrogram-domain losses of 14 subsets, ISTFT)
        # -> 12 x 20 steps ~ 13-17 min, + ~2 min validation
        "small": dict(model=dict(hidden_size=128, nfft=4096, nhop=1024, bandwidth=16000,
                                 loss="magnitude", alpha=10.0, combine=True, wiener_iters=0),
                      train=dict(segment=3.0, batch_size=8, epochs=12, samples_per_epoch=160,
                                 valid_segment=6.0, valid_max_items=24)),
        "paper": dict(model=dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000,
                                 loss="magnitude", alpha=10.0, combine=True, wiener_iters=0),
                      train=dict(segment=6.0, batch_size=14, epochs=1000, samples_per_track=64)),
    },
    "demucs": {
        "tiny": dict(model=dict(arch="hdemucs"),
                     train=dict(segment=1.0, batch_size=4, epochs=2, samples_per_epoch=8,
                                lr=3e-4, weight_decay=0.0, valid_max_items=4,
                                lr_schedule="constant")),
        # HDemucs, 8 channels: 0.57 steps/s -> 15 x 30 steps ~ 13 min, + ~2 min validation.
        # lr 1e-3, not demucs's 3e-4 (meant for batch 32 and hundreds of epochs): on the synthetic
        # set 15 epochs reach 2.22 dB test SDR (valid L1 0.0221), where 3e-4 had 0.60 dB after 8
        # (valid L1 0.0282) and 1e-3 passes that after 3 epochs.
        "small": dict(model=dict(arch="hdemucs"),
                      train=dict(segment=3.0, batch_size=4, epochs=15, samples_per_epoch=120,
                                 lr=1e-3, weight_decay=0.0, valid_segment=6.0,
                                 valid_max_items=24)),
        "paper": dict(model=dict(arch="htdemucs"),
                      train=dict(segment=10.0, batch_size=32, epochs=360,
                                 samples_per_epoch=800 * 32, lr=3e-4, weight_decay=0.0,
                                 lr_schedule="constant")),
    },
}

# Demucs network arguments per architecture and preset (anything not given: the class's
# defaults). small: HDemucs with 8 channels trains at ~0.57 steps/s (batch 4 x 3 s, 44.1 kHz) on
# 2 cores; HTDemucs is ~4x slower there, so the shipped small model is an HDemucs.
DEMUCS_ARCH = {
    "hdemucs": {"tiny": dict(channels=4, nfft=256), "small": dict(channels=8, nfft=4096),
                "paper": {}},
    "htdemucs": {"tiny": dict(channels=8, nfft=512, depth=2, t_layers=1, t_heads=2),
                 "small": dict(channels=8, t_layers=2, t_heads=4), "paper": {}},
}

# When a family option is not in a preset, these hold.
_MODEL_DEFAULTS = {
    "umx": dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000),
    "xumx": dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000, loss="magnitude",
                 alpha=10.0, combine=True, wiener_iters=0),
    "demucs": dict(arch="hdemucs"),
}


def family_of(name: str) -> str:
    f = FAMILY_ALIASES.get(name.lower(), name.lower())
    if f not in FAMILIES:
        raise PipelineError(f"family '{name}': choose one of {', '.join(FAMILIES)}")
    return f


def resolve_config(family: str, preset: str, *, sample_rate: int, n_train_tracks: int,
                   targets: Sequence[str], model_options: dict | None = None,
                   train_options: dict | None = None) -> dict:
    """The full configuration of a run: preset, then the explicit options on top."""
    family = family_of(family)
    if preset not in PRESETS[family]:
        raise PipelineError(f"preset '{preset}': choose one of {', '.join(PRESETS[family])}")
    p = PRESETS[family][preset]
    model = {**_MODEL_DEFAULTS[family], **p["model"]}
    if family == "demucs":
        arch = (model_options or {}).get("arch") or model["arch"]
        if arch not in DEMUCS_ARCH:
            raise PipelineError(f"demucs arch '{arch}': choose {' or '.join(DEMUCS_ARCH)}")
        model = {"arch": arch, **DEMUCS_ARCH[arch][preset]}
    train = {**_COMMON_TRAIN, **p["train"]}
    for name, opts, base in (("model", model_options, model), ("train", train_options, train)):
        for k, v in (opts or {}).items():
            if v is None:
                continue
            if family == "demucs" and name == "model":
                base[k] = v          # any HDemucs / HTDemucs constructor argument
            elif k not in base:
                raise PipelineError(f"{family}: unknown {name} option '{k}' "
                                    f"(known: {', '.join(sorted(base))})")
            else:
                base[k] = v
    if family == "xumx":
        if model["loss"] not in ("magnitude", "complex"):
            raise PipelineError(f"xumx loss '{model['loss']}': choose magnitude (X-UMX) or "
                                f"complex (Danna-Sep)")
        if model["loss"] == "complex" and "wiener_iters" not in (model_options or {}):
            model["wiener_iters"] = 1    # Danna-Sep: the loss is taken after one EM step
        if model["loss"] == "magnitude" and model["wiener_iters"]:
            raise PipelineError("xumx: the magnitude loss (X-UMX) is taken on the masked "
                                "magnitudes, before any Wiener filtering; wiener_iters needs "
                                "loss='complex' (Danna-Sep)")
    train["augment"] = Augment(**{**Augment().to_dict(), **dict(train["augment"])}).to_dict()
    train["augment"]["gain"] = list(train["augment"]["gain"])
    seg = int(round(train["segment"] * sample_rate))
    if seg < 256:
        raise PipelineError(f"segment {train['segment']} s is too short at {sample_rate} Hz")
    spe = train["samples_per_epoch"] or train["samples_per_track"] * n_train_tracks
    return {"family": family, "preset": preset, "sample_rate": int(sample_rate),
            "targets": list(targets), "model": model,
            "train": {**train, "segment_samples": seg, "examples_per_epoch": int(spe)}}


# ------------------------------------------------------------------------------------------------
# Input statistics (Open-Unmix / X-UMX)
# ------------------------------------------------------------------------------------------------
def input_statistics(store: StemStore, dataset_id: str, nfft: int, nhop: int,
                     split: str = "train", block_frames: int = 2048) -> tuple[np.ndarray, np.ndarray]:
    """Per-bin mean and standard deviation of the mono-downmixed magnitude spectrogram of every
    training mixture (Open-Unmix's get_statistics: StandardScaler over all frames, std floored at
    1e-4 of its maximum). Uncentred frames, computed in blocks, in float64."""
    total = np.zeros(nfft // 2 + 1)
    total_sq = np.zeros(nfft // 2 + 1)
    count = 0
    for track in store.tracks(dataset_id, split):
        mix = store.mixture(dataset_id, track)
        n = mix.shape[-1]
        n_frames = 1 + (n - nfft) // nhop if n >= nfft else 0
        for f0 in range(0, n_frames, block_frames):
            f1 = min(n_frames, f0 + block_frames)
            seg = torch.from_numpy(np.array(mix[:, f0 * nhop:(f1 - 1) * nhop + nfft], np.float32))
            mag = stft(seg, nfft, nhop, center=False).abs().mean(0).double()   # [F, frames]
            total += mag.sum(1).numpy()
            total_sq += (mag ** 2).sum(1).numpy()
            count += mag.shape[1]
    if count == 0:
        raise PipelineError(f"dataset {dataset_id}: training tracks are shorter than one STFT "
                            f"frame ({nfft} samples)")
    mean = total / count
    std = np.sqrt(np.maximum(total_sq / count - mean ** 2, 0.0))
    std = np.maximum(std, 1e-4 * std.max())
    return mean, std


def _cached_statistics(run_dir: Path, store, dataset_id, nfft, nhop, rank,
                       split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    path = run_dir / "input_stats.npz"
    if path.exists():
        with np.load(path) as z:
            if int(z["nfft"]) == nfft and int(z["nhop"]) == nhop:
                return z["mean"], z["std"]
    mean, std = input_statistics(store, dataset_id, nfft, nhop, split=split)
    if rank == 0:
        tmp = run_dir / f".input_stats.{os.getpid()}.npz"
        np.savez(tmp, mean=mean, std=std, nfft=nfft, nhop=nhop)
        os.replace(tmp, path)
    return mean, std


def bandwidth_to_max_bin(rate: float, n_fft: int, bandwidth: float | None) -> int:
    """Open-Unmix's: the number of bins up to `bandwidth` Hz (all of them when None)."""
    if not bandwidth:
        return n_fft // 2 + 1
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1, endpoint=True)
    return int(np.max(np.where(freqs <= bandwidth)[0]) + 1)


# ------------------------------------------------------------------------------------------------
# Networks as the training loop sees them: mixture [B, 2, n] -> one tensor
# ------------------------------------------------------------------------------------------------
class UMXTrainNet(nn.Module):
    """One `OpenUnmix` per target; output: magnitude estimates [B, T, 2, F, frames].

    The targets' networks share nothing, so training them in one loop with the sum of their losses
    gives each the gradients of its own Open-Unmix training run."""

    def __init__(self, targets, nfft, nhop, hidden_size, max_bin, mean=None, std=None):
        super().__init__()
        from openunmix.model import OpenUnmix

        self.nfft, self.nhop = nfft, nhop
        self.targets = nn.ModuleDict({
            t: OpenUnmix(nb_bins=nfft // 2 + 1, nb_channels=2, hidden_size=hidden_size,
                         nb_layers=3, max_bin=max_bin, input_mean=mean, input_scale=std)
            for t in targets})

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        x = stft(mix, self.nfft, self.nhop, center=False).abs()
        return torch.stack([m(x) for m in self.targets.values()], 1)


class SpectrogramMSE:
    """Open-Unmix's loss, summed over targets: MSE(|STFT| estimate, |STFT(reference)|)."""

    def __init__(self, nfft: int, nhop: int):
        self.nfft, self.nhop = nfft, nhop

    def __call__(self, est: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        y = stft(refs[:, :est.shape[1]], self.nfft, self.nhop, center=False).abs()
        return ((est - y) ** 2).mean(dim=(0, 2, 3, 4)).sum()


class XUMXTrainNet(nn.Module):
    """asteroid's X-UMX network with a complex STFT/ISTFT that works on torch 2 (asteroid's own
    encoder/decoder use the removed real-valued STFT API, hence its `BrokenXUMX` name).

    Output: the masked magnitudes [B, T, 2, F, frames] (X-UMX: the loss gives them the mixture's
    phase), or with `wiener_iters` > 0 the complex estimates after that many multichannel Wiener
    EM steps, as real pairs [B, T, 2, F, frames, 2] (Danna-Sep)."""

    def __init__(self, xumx, wiener_iters: int = 0):
        super().__init__()
        self.xumx = xumx
        self.wiener_iters = int(wiener_iters)

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        m = self.xumx
        z = stft(mix, m.in_chan, m.n_hop, center=True)                   # [B, C, F, T]
        mag = z.abs()
        masks = m.forward_masker(mag.permute(3, 0, 1, 2).clone())       # [J, T, B, C, F]
        with torch.autocast(mix.device.type, enabled=False):
            est = masks.float().permute(2, 0, 3, 4, 1) * mag[:, None]   # [B, J, C, F, T]
            if self.wiener_iters > 0:
                return torch.view_as_real(multichannel_wiener(est, z, self.wiener_iters))
            return est


class XUMXLoss:
    """X-UMX's combinational multi-domain loss on `XUMXTrainNet`'s output (see cache.losses).

    refs: [B, T (+1), 2, n]: the targets, then possibly the rest of the mixture; the mixture is
    the sum of all of them. loss='magnitude': the frequency term compares the masked magnitudes
    with |STFT(reference)|; 'complex': complex spectrograms (the masked magnitudes with the
    mixture's phase, or the network's Wiener-filtered output). The time-domain estimates are the
    ISTFT of the complex estimates."""

    def __init__(self, nfft: int, nhop: int, n_targets: int, alpha: float = 10.0,
                 combine: bool = True, loss: str = "magnitude", wiener_iters: int = 0):
        self.nfft, self.nhop, self.n_targets = nfft, nhop, n_targets
        self.alpha, self.combine, self.loss = alpha, combine, loss
        self.wiener = wiener_iters > 0

    def __call__(self, out: torch.Tensor, refs_all: torch.Tensor) -> torch.Tensor:
        from cache.losses import multi_domain_loss

        n = refs_all.shape[-1]
        mix = refs_all.sum(1)
        refs = refs_all[:, :self.n_targets]
        spec_ref = stft(refs, self.nfft, self.nhop, center=True)
        if self.wiener:
            est = torch.view_as_complex(out.contiguous())
        else:
            phase = stft(mix, self.nfft, self.nhop, center=True).angle()
            est = torch.polar(out, phase[:, None].expand_as(out))
        if self.loss == "complex":
            spec_hat = est
        else:
            spec_hat, spec_ref = out, spec_ref.abs()
        time_hat = istft(est, self.nfft, self.nhop, length=n, center=True)
        return multi_domain_loss(spec_hat, spec_ref, time_hat, refs, mix, self.alpha, self.combine)


def waveform_l1(est: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Demucs's loss: mean absolute error of the waveforms."""
    return (est - refs[:, :est.shape[1]]).abs().mean()


def _demucs_kwargs(model: dict, targets, sample_rate: int, segment_s: float) -> tuple[type, dict]:
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    kw = {k: v for k, v in model.items() if k != "arch"}
    kw.update(sources=list(targets), audio_channels=2, samplerate=int(sample_rate),
              segment=segment_s)
    if model["arch"] == "hdemucs":
        nfft = int(kw.get("nfft", 4096))
        depth = math.log(nfft, 4)
        if abs(depth - round(depth)) > 1e-9:
            raise PipelineError(f"hdemucs nfft {nfft}: must be a power of 4 (256, 1024, 4096) so "
                                f"that the time and frequency branches meet")
        kw.setdefault("depth", int(round(depth)))
        return HDemucs, kw
    return HTDemucs, kw


def build(config: dict, stats: tuple[np.ndarray, np.ndarray] | None):
    """(training network, loss function, the bare model to export) for a configuration."""
    family, m, targets = config["family"], config["model"], config["targets"]
    sr = config["sample_rate"]
    if family == "umx":
        max_bin = bandwidth_to_max_bin(sr, m["nfft"], m["bandwidth"])
        mean, std = stats if stats is not None else (None, None)
        net = UMXTrainNet(targets, m["nfft"], m["nhop"], m["hidden_size"], max_bin, mean, std)
        return net, SpectrogramMSE(m["nfft"], m["nhop"]), net
    if family == "xumx":
        from asteroid.models.x_umx import BrokenXUMX

        max_bin = bandwidth_to_max_bin(sr, m["nfft"], m["bandwidth"])
        mean, std = stats if stats is not None else (None, None)
        xumx = BrokenXUMX(sources=list(targets), window_length=m["nfft"], in_chan=m["nfft"],
                          n_hop=m["nhop"], hidden_size=m["hidden_size"], nb_channels=2,
                          sample_rate=sr, nb_layers=3, input_mean=mean, input_scale=std,
                          max_bin=max_bin, bidirectional=True, spec_power=1)
        net = XUMXTrainNet(xumx, m["wiener_iters"])
        loss = XUMXLoss(m["nfft"], m["nhop"], len(targets), m["alpha"], m["combine"], m["loss"],
                        m["wiener_iters"])
        return net, loss, xumx
    import inspect

    klass, kw = _demucs_kwargs(m, targets, sr, config["train"]["segment_samples"] / sr)
    unknown = sorted(set(kw) - set(inspect.signature(klass.__init__).parameters))
    if unknown:
        raise PipelineError(f"demucs {m['arch']}: unknown model option(s) {', '.join(unknown)}")
    try:
        net = klass(**kw)
        # some shape constraints only show in a forward pass (eval mode: no randomness used)
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 2, min(config["train"]["segment_samples"], sr)))
        net.train()
    except (AssertionError, RuntimeError, ValueError, ZeroDivisionError) as e:
        raise PipelineError(f"demucs {m['arch']} {kw}: not a valid configuration "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    return net, waveform_l1, net


# ------------------------------------------------------------------------------------------------
# Export in each family's own format
# ------------------------------------------------------------------------------------------------
def _versions() -> dict:
    from cache.run import package_versions

    return package_versions()


def _cpu_state(module: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def export_umx(net: UMXTrainNet, out: Path, config: dict, summary: dict) -> list[Path]:
    """Open-Unmix's folder: what its scripts/train.py writes (per target), plus separator.json."""
    m, t = config["model"], config["train"]
    files = []
    for target, model in net.targets.items():
        torch.save(_cpu_state(model), out / f"{target}.pth")
        args = {  # scripts/train.py's argparse namespace (+ the musdb dataset options)
            "target": target, "dataset": "musdb", "root": summary["dataset_root"],
            "output": str(summary.get("model_dir", out)), "model": None, "checkpoint": None, "audio_backend": "soundfile",
            "epochs": t["epochs"], "batch_size": t["batch_size"], "lr": t["lr"],
            "patience": t["epochs"], "lr_decay_patience": 80, "lr_decay_gamma": 0.3,
            "weight_decay": t["weight_decay"], "seed": config["seed"], "seq_dur": t["segment"],
            "unidirectional": False, "nfft": m["nfft"], "nhop": m["nhop"],
            "hidden_size": m["hidden_size"], "bandwidth": m["bandwidth"], "nb_channels": 2,
            "nb_workers": 0, "debug": False, "quiet": False, "no_cuda": False, "is_wav": True,
            "samples_per_track": t["samples_per_track"],
            "source_augmentations": ["gain", "channelswap"],
        }
        params = {
            "epochs_trained": summary["epochs"], "args": args, "best_loss": summary["best_valid"],
            "best_epoch": summary["best_epoch"],
            "train_loss_history": [r["train_loss"] for r in summary["metrics"]],
            "valid_loss_history": [r["valid_loss"] for r in summary["metrics"]],
            "train_time_history": [r["seconds"] for r in summary["metrics"]],
            "num_bad_epochs": summary["epochs"] - summary["best_epoch"], "commit": None,
        }
        (out / f"{target}.json").write_text(json.dumps(params, indent=4, sort_keys=True))
        files += [out / f"{target}.pth", out / f"{target}.json"]
    sep = {"nfft": m["nfft"], "nhop": m["nhop"], "sample_rate": config["sample_rate"],
           "nb_channels": 2}
    (out / "separator.json").write_text(json.dumps(sep, indent=4, sort_keys=True))
    return files + [out / "separator.json"]


def export_xumx(xumx, out: Path, config: dict, summary: dict) -> list[Path]:
    """asteroid's `BaseModel.serialize()` dict (model_name 'XUMX'), as the official X-UMX file."""
    import asteroid

    model_args = xumx.get_model_args()
    model_args["sample_rate"] = config["sample_rate"]
    package = {
        "model_name": "XUMX",
        "state_dict": _cpu_state(xumx),
        "model_args": model_args,
        "infos": {"software_versions": {"torch_version": torch.__version__,
                                        "asteroid_version": asteroid.__version__},
                  "training": {"loss": config["model"]["loss"],
                               "wiener_iters": config["model"]["wiener_iters"],
                               "alpha": config["model"]["alpha"],
                               "combine": config["model"]["combine"],
                               "best_epoch": summary["best_epoch"],
                               "dataset": summary["dataset_id"], "seed": config["seed"]}},
    }
    path = out / "xumx.pth"
    torch.save(package, path)
    return [path]


def demucs_signature(config: dict) -> str:
    """8 hex digits naming the experiment, like a dora signature (no '-': demucs's LocalRepo
    reads `<sig>-<checksum>.th`)."""
    ident = {k: config[k] for k in ("family", "model", "targets", "sample_rate", "seed")}
    ident["train"] = {k: v for k, v in config["train"].items()}
    ident["dataset_id"] = config.get("dataset_id")
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def export_demucs(model, out: Path, config: dict, summary: dict) -> list[Path]:
    """demucs's package (states.serialize_model's fields, full precision) saved as
    `<sig>-<sha256[:8]>.th`, like demucs's `save_with_checksum` export."""
    args, kwargs = model._init_args_kwargs
    package = {"klass": model.__class__, "args": args, "kwargs": kwargs,
               "state": _cpu_state(model),
               "training_args": {"config": config, "dataset": summary["dataset_id"],
                                 "best_epoch": summary["best_epoch"]}}
    buf = io.BytesIO()
    torch.save(package, buf)
    sig = demucs_signature(config)
    path = out / f"{sig}-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.th"
    path.write_bytes(buf.getvalue())
    return [path]


# ------------------------------------------------------------------------------------------------
# The model card
# ------------------------------------------------------------------------------------------------
def _synthetic_info(root: str | None) -> dict | None:
    if not root:
        return None
    try:
        meta = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "generator" not in meta:
        return None
    return {k: meta.get(k) for k in ("generator", "seed", "sizes", "duration", "sample_rate")}


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def model_card(config: dict, summary: dict, files: list[Path]) -> str:
    fam = {"umx": "Open-Unmix (spectrogram masking, one BLSTM network per target)",
           "xumx": "X-UMX / CrossNet-Open-Unmix (spectrogram masking, bridged networks)"
                   + (" - Danna-Sep complex-domain loss" if config["model"].get("loss") == "complex" else ""),
           "demucs": f"{config['model'].get('arch', 'hdemucs').upper().replace('DEMUCS', 'Demucs')} "
                     f"(hybrid waveform/spectrogram U-Net)"}[config["family"]]
    if config["family"] == "xumx":
        m = config["model"]
        loss = ("multi-domain loss: " + ("complex-spectrogram MSE after multichannel Wiener "
                                         "filtering" if m["loss"] == "complex" else "magnitude MSE")
                + f" + {m['alpha']:g} x (1 - weighted SDR)"
                + (", over all sums of 1..J-1 targets (combination loss)" if m["combine"] else ""))
    else:
        loss = {"umx": "MSE on magnitude spectrograms", "demucs": "L1 on waveforms"}[config["family"]]
    d = summary
    lines = [
        f"# {config['family']}-{config['preset']}: {fam}",
        "",
        f"Trained with stem-ensemble's `train-base` on dataset `{d['dataset_id']}`.",
        "",
        "## Command",
        "",
        "```",
        d["command"],
        "```",
        "",
        "## Data",
        "",
        f"- dataset id: `{d['dataset_id']}` ({d['dataset_kind']}), root `{d['dataset_root']}`",
        f"- sample rate: {config['sample_rate']} Hz; sources {', '.join(d['sources'])}; "
        f"targets {', '.join(config['targets'])}",
        f"- train: {d['n_train']} tracks ({d['train_seconds']:.0f} s); validation: "
        f"{d['n_valid']} tracks ({d['valid_split']} split, {d['n_valid_items']} crops)",
    ]
    if d.get("synthetic"):
        s = d["synthetic"]
        lines.append(f"- synthetic dataset: {s['generator']}, seed {s['seed']}, sizes {s['sizes']}, "
                     f"{s['duration']} s per track at {s['sample_rate']} Hz")
    lines += [
        "",
        "## Training",
        "",
        f"- loss: {loss}",
        f"- seed {config['seed']}; {d['epochs']} epochs of {config['train']['examples_per_epoch']} "
        f"examples ({config['train']['segment']} s crops, batch {config['train']['batch_size']}); "
        f"best epoch {d['best_epoch']} (validation loss {d['best_valid']:.6g})",
        f"- training time: {_fmt_seconds(d['train_seconds_total'])} on {d['device']} "
        f"(world size {d['world_size']})",
        f"- parameters: {d['parameters']:,}",
        f"- files: {', '.join(p.name for p in files)}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in d['versions'].items())}",
        "",
        "Configuration:",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Test-split SDR",
        "",
        SDR_BEGIN,
        "Not evaluated yet: the evaluation step fills this section "
        "(`cache.train_base.evaluate_trained`).",
        SDR_END,
        "",
    ]
    return "\n".join(lines)


def write_test_sdr(model_dir: str | Path, scores: dict[str, float], *, dataset_id: str,
                   split: str = "test", n_tracks: int | None = None,
                   metric: str = "SDR (museval v4, median over frames, median over tracks)",
                   section: str = "test-sdr", title: str | None = None,
                   notes: list[str] | None = None) -> None:
    """Fill one SDR section of MODEL.md (between `<!-- section -->` markers) with per-source
    scores (dB). The test-SDR section is part of every card; another section is appended under
    `title` the first time and replaced afterwards."""
    card = Path(model_dir) / CARD
    text = card.read_text()
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    if begin not in text or end not in text:
        if title is None:
            raise PipelineError(f"{card}: no {section} section to fill")
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{begin}\n{end}\n"
    rows = ["| source | SDR (dB) |", "|---|---|"]
    rows += [f"| {s} | {v:.2f} |" for s, v in scores.items()]
    mean = float(np.nanmean(list(scores.values()))) if scores else float("nan")
    rows.append(f"| **mean** | **{mean:.2f}** |")
    body = [f"{metric} on the `{split}` split of `{dataset_id}`"
            + (f" ({n_tracks} tracks)" if n_tracks else "") + ":", ""] + rows
    if notes:
        body += [""] + list(notes)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = card.with_name(f".{card.name}.{os.getpid()}")
    tmp.write_text(head + begin + "\n" + "\n".join(body) + "\n" + end + tail)
    os.replace(tmp, card)


def evaluate_trained(store: StemStore, dataset_id: str, model_dir: str | Path, *,
                     split: str = "test", device: str = "cpu", write_card: bool = True) -> dict:
    """Separate a split with the exported model (through cache.registry, as the cache stage
    would) and score it with museval-exact framewise SDR; fills MODEL.md when `write_card`.
    Returns {source: median over tracks of the per-track median SDR}."""
    from cache.registry import load_separator
    from reports.metrics import framewise_sdr, median_over_tracks, track_median

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
    from pipeline.splits import SELECT, fit_split

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
               command: str | None = None) -> BaseTrainResult:
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
            as a dict of `cache.train_data.Augment` fields).
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
            dataset has one), 'select' (a fixed tenth of train, see pipeline.splits; training
            then uses the rest of train, 'fit': for data whose valid split is the evaluation
            split) or 'train'. Recorded in config.json with the held-out track names.
        command: the command line recorded in MODEL.md (default: this process's argv).

    Returns a BaseTrainResult (model_dir, run_dir, config, best epoch / loss, training seconds).
    """
    from pipeline.training import (BEST, LAST, METRICS, _distributed, cosine_schedule,
                                   load_checkpoint, train)

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
    if family == "xumx" and len(targets) < 2:
        raise PipelineError("xumx: X-UMX bridges several targets; give at least two")
    if family == "demucs" and amp != "off":
        raise PipelineError("demucs: train with amp='off' (HDemucs/HTDemucs build complex "
                            "spectrograms from their outputs, which autocast's half types break)")
    train_split, valid_split = fit_and_select_splits(store, dataset_id, select_split)
    train_tracks = store.tracks(dataset_id, train_split)
    if not train_tracks:
        raise PipelineError(f"dataset {dataset_id}: no tracks in the '{train_split}' split")

    model_opts = dict(model_options or {})
    if arch is not None:
        if family != "demucs":
            raise PipelineError(f"arch is a demucs option (family {family})")
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
    with_rest = family == "xumx"
    train_data = RandomMixes(store, dataset_id, targets=targets, segment=t["segment_samples"],
                             split=train_split, length=t["examples_per_epoch"], augment=Augment(
                                 **{**t["augment"], "gain": tuple(t["augment"]["gain"])}),
                             rest=with_rest)
    vseg = int(round((t["valid_segment"] or t["segment"]) * config["sample_rate"]))
    valid_data = FixedCrops(store, dataset_id, targets=targets, segment=vseg, split=valid_split,
                            max_items=t["valid_max_items"], rest=with_rest)

    # network
    stats = None
    if family in ("umx", "xumx"):
        stats = _cached_statistics(run_dir, store, dataset_id, config["model"]["nfft"],
                                   config["model"]["nhop"], rank, split=train_split)
    torch.manual_seed(seed)
    net, loss_fn, bare = build(config, stats)

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
                   grad_clip=t["grad_clip"])

    model_dir = run_dir / "model"
    seconds = float(sum(r["seconds"] for r in result.metrics))
    if rank == 0:
        best = load_checkpoint(run_dir / BEST, "cpu")
        net.to("cpu").load_state_dict(best["model"])
        summary = {
            "dataset_id": dataset_id, "dataset_root": info.get("root"),
            "dataset_kind": info.get("kind"), "sources": sources,
            "synthetic": _synthetic_info(info.get("root")),
            "n_train": len(train_tracks),
            "train_seconds": sum(x.length for x in train_tracks) / config["sample_rate"],
            "n_valid": len(valid_data.tracks), "valid_split": valid_split,
            "n_valid_items": len(valid_data),
            "epochs": len(result.metrics), "best_epoch": result.best_epoch,
            "best_valid": result.best_valid, "metrics": result.metrics,
            "train_seconds_total": seconds, "world_size": world,
            "device": str(device or ("cuda" if torch.cuda.is_available() else "cpu")),
            "parameters": sum(p.numel() for p in bare.parameters()),
            "versions": _versions(),
            "command": command or shlex.join([Path(sys.argv[0]).name] + sys.argv[1:]),
            "model_dir": str(model_dir.resolve()),
        }
        tmp = run_dir / f".model.{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        exporter = {"umx": export_umx, "xumx": export_xumx, "demucs": export_demucs}[family]
        files = exporter(bare, tmp, config, summary)
        (tmp / CARD).write_text(model_card(config, summary, files))
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
