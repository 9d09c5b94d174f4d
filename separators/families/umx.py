"""Open-Unmix family: the pretrained umxhq / umxl / umx, and local Open-Unmix model folders.

Where weights come from:
  * pretrained names: one `<target>-<hash>.pth` per target, e.g. `vocals-b62c91ce.pth`, looked
    up in `--repo DIR` and in the torch hub cache `$TORCH_HOME/hub/checkpoints` (where
    `openunmix.umxhq()` caches them). Offline, a missing file is a PipelineError naming it.
  * a local folder as written by openunmix's scripts/train.py: `separator.json` (nfft, nhop,
    sample_rate, nb_channels), and per target `<target>.json` (its "args": nfft, nb_channels,
    hidden_size, ...) and `<target>.pth` (a plain state dict; `<target>.chkpnt` is the training
    checkpoint and is not needed). Loaded through `openunmix.utils.load_separator`.

Open-Unmix checkpoints are plain state dicts, so they are always read with
`torch.load(weights_only=True)` (no arbitrary code from the file). openunmix's own hub loader
(`torch.hub.load_state_dict_from_url`) would unpickle fully, so for pretrained names we build the
architecture with `openunmix.<name>(pretrained=False)` and load the state dicts ourselves.

Sources are the targets the model has (a vocals-only model separates only vocals). The
`residual` option (off by default) adds openunmix's "residual" stem: mixture minus the other
estimates before Wiener filtering. Wiener EM needs at least two stems, so for a single-target
model without residual the default niter is 0 (openunmix raises otherwise).

Long tracks: the whole-track STFT, BiLSTM and Wiener filtering cost GBs on a 10-minute track, so
the signal is cut into `segment`-second pieces (default 30 s, half-overlapping) and cross-faded
with core.chunking.overlap_add. Inputs no longer than one segment are processed whole.

Training recipe (`train-base --family umx`, at the end of this file): one `OpenUnmix` per target,
trained with the MSE between magnitude spectrograms (Open-Unmix's scripts/train.py: input
mean/scale from the training mixtures, bandwidth-limited input, Adam + weight decay), exported in
the folder format above.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

from core.config import SOURCES
from core.errors import PipelineError
from separators.base import MaskingOptions, MaskingSeparator, resolve_niter
from separators.families import Family, Request, pick
from separators.families.common import (
    Recipe,
    bandwidth_to_max_bin,
    cpu_state,
    resolve_preset_model,
)
from separators.losses import stft
from separators.weights import (
    cached_checksum,
    combined_checksum,
    hub_checkpoints_dir,
    load_checkpoint_file,
    missing_weights_error,
)

FAMILY = "openunmix"

# Mirrors the URL tables inside openunmix/__init__.py (umxhq_spec, umx_spec, umxl_spec), which
# keeps them in function bodies; tests/test_adapters.py checks that they still match.
PRETRAINED_URLS = {
    "umxhq": {
        "bass": "https://zenodo.org/records/3370489/files/bass-8d85a5bd.pth",
        "drums": "https://zenodo.org/records/3370489/files/drums-9619578f.pth",
        "other": "https://zenodo.org/records/3370489/files/other-b52fbbf7.pth",
        "vocals": "https://zenodo.org/records/3370489/files/vocals-b62c91ce.pth",
    },
    "umx": {
        "bass": "https://zenodo.org/records/3370486/files/bass-646024d3.pth",
        "drums": "https://zenodo.org/records/3370486/files/drums-5a48008b.pth",
        "other": "https://zenodo.org/records/3370486/files/other-f8e132cc.pth",
        "vocals": "https://zenodo.org/records/3370486/files/vocals-c8df74a5.pth",
    },
    "umxl": {
        "bass": "https://zenodo.org/records/5069601/files/bass-2ca1ce51.pth",
        "drums": "https://zenodo.org/records/5069601/files/drums-69e0ebd4.pth",
        "other": "https://zenodo.org/records/5069601/files/other-c8c5b3e6.pth",
        "vocals": "https://zenodo.org/records/5069601/files/vocals-bccbd9aa.pth",
    },
}



def order_targets(targets) -> list[str]:
    """MUSDB's order (drums, bass, other, vocals) first, then any other target alphabetically."""
    targets = set(targets)
    return [s for s in SOURCES if s in targets] + sorted(targets - set(SOURCES))


def load_state(path: Path) -> dict:
    """A plain state dict, read without arbitrary unpickling."""
    state = load_checkpoint_file(path, "an Open-Unmix state dict")
    if not isinstance(state, dict) or "input_mean" not in state:
        raise PipelineError(f"{path}: not an Open-Unmix state dict (no input_mean)")
    return state


# --------------------------------------------------------------------------------------------
# Where weights come from
# --------------------------------------------------------------------------------------------

def locate_pretrained(name: str, repo: Path | None = None, offline: bool = False) -> dict[str, Path | str]:
    """target -> local file; with offline=False a missing target maps to its URL instead."""
    urls = PRETRAINED_URLS[name]
    folders = ([Path(repo)] if repo is not None else []) + [hub_checkpoints_dir()]
    found: dict[str, Path | str] = {}
    missing = []
    for target, url in urls.items():
        fname = url.rsplit("/", 1)[-1]
        hit = next((f / fname for f in folders if (f / fname).is_file()), None)
        if hit is not None:
            found[target] = hit
        elif offline:
            missing.append((fname, url))
        else:
            found[target] = url
    if missing:
        raise missing_weights_error(name, missing, [str(hub_checkpoints_dir()), "--repo DIR"])
    return found


def local_targets(folder: Path) -> dict[str, Path]:
    """target -> its .pth in an Open-Unmix model folder (the file openunmix's loader will pick)."""
    targets = {}
    for js in sorted(folder.glob("*.json")):
        if js.name == "separator.json":
            continue
        target = js.stem
        pths = sorted(folder.glob(f"{target}*.pth"))  # the same glob as openunmix.utils
        if not pths:
            raise PipelineError(f"{folder}: {js.name} has no {target}.pth next to it")
        if len(pths) > 1:
            raise PipelineError(f"{folder}: several weight files for target {target} "
                                f"({', '.join(p.name for p in pths)}); keep one")
        targets[target] = pths[0]
    if not targets:
        raise PipelineError(f"{folder}: an Open-Unmix folder needs <target>.json + <target>.pth files "
                            f"next to separator.json; found none")
    return targets


def _read_json(path: Path, keys) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: unreadable JSON ({e})") from None
    args = data.get("args", data) if path.name != "separator.json" else data
    miss = [k for k in keys if k not in args]
    if miss:
        raise PipelineError(f"{path}: missing {', '.join(miss)}")
    return data


# --------------------------------------------------------------------------------------------
# What an Open-Unmix model is
# --------------------------------------------------------------------------------------------

class OpenUnmixSeparator(MaskingSeparator):
    family = FAMILY

    def __init__(self, model, name: str, weights_checksum: str, *, niter: int, residual: bool,
                 wiener_win_len: int, segment: float):
        self.model = self.network = model
        self.model.freeze()  # eval() (BatchNorm!) + no grads; openunmix's loaders leave train mode on
        self.name = name
        targets = tuple(model.target_models.keys())
        self.sources = targets + (("residual",) if residual else ())
        rate = float(model.sample_rate)
        if not rate.is_integer():
            raise PipelineError(f"{name}: non-integer sample rate {rate}")
        self.sample_rate = int(rate)
        if segment <= 0:
            raise PipelineError(f"{name}: segment must be > 0 s, got {segment}")
        self.niter, self.residual = niter, residual
        self.wiener_win_len, self.segment = wiener_win_len, segment
        self._checksum = weights_checksum

    def separate_chunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _build_pretrained(name: str, files: dict, opts: dict):
    import openunmix

    niter = resolve_niter(name, opts["niter"], len(files) + int(opts["residual"]))
    targets = order_targets(files)
    sep = getattr(openunmix, name)(targets=targets, residual=opts["residual"], niter=niter,
                                   device="cpu", pretrained=False,
                                   wiener_win_len=opts["wiener_win_len"], filterbank="torch")
    sums = {}
    for target in targets:
        src = files[target]
        if isinstance(src, Path):
            state = load_state(src)
            sums[src.name] = cached_checksum(src)
        else:  # online: torch.hub downloads into its cache; still a weights-only load
            try:
                state = torch.hub.load_state_dict_from_url(src, map_location="cpu", weights_only=True)
            except Exception as e:
                raise PipelineError(f"{name}: could not download {src} ({e}); for offline use put "
                                    f"the file in {hub_checkpoints_dir()} or --repo DIR") from None
            cached = hub_checkpoints_dir() / src.rsplit("/", 1)[-1]
            sums[cached.name] = cached_checksum(cached) if cached.is_file() else src
        result = sep.target_models[target].load_state_dict(state, strict=False)
        if result.missing_keys:
            raise PipelineError(f"{name}: {target} weights lack {', '.join(result.missing_keys[:5])}")
    return sep, niter, combined_checksum({"files": sums})


def _build_local(folder: Path, opts: dict):
    from openunmix.utils import load_separator

    files = local_targets(folder)
    _read_json(folder / "separator.json", ("nfft", "nhop", "sample_rate", "nb_channels"))
    for target in files:
        _read_json(folder / f"{target}.json", ("nfft", "nb_channels", "hidden_size"))
    niter = resolve_niter(str(folder), opts["niter"], len(files) + int(opts["residual"]))
    targets = order_targets(files)
    sums = {"separator.json": cached_checksum(folder / "separator.json")}
    states = {}
    for target in targets:
        states[target] = load_state(files[target])  # weights-only check before openunmix loads it
        sums[files[target].name] = cached_checksum(files[target])
    try:
        sep = load_separator(str(folder), targets=targets, niter=niter, residual=opts["residual"],
                             wiener_win_len=opts["wiener_win_len"], device="cpu",
                             pretrained=True, filterbank="torch")
    except (RuntimeError, KeyError, ValueError) as e:
        raise PipelineError(f"{folder}: openunmix could not load this model ({e})") from None
    for target in targets:  # openunmix loads with strict=False: make sure nothing was left random
        own = set(sep.target_models[target].state_dict())
        lacking = sorted(own - set(states[target]))
        if lacking:
            raise PipelineError(f"{files[target]}: lacks {', '.join(lacking[:5])}")
    return sep, niter, combined_checksum({"files": sums})


def load_openunmix(name_or_path: str, *, device="cpu", offline: bool = False, repo: Path | None = None,
                   options: dict | None = None, label: str | None = None) -> OpenUnmixSeparator:
    """'umxhq' / 'umxl' / 'umx', or an Open-Unmix model folder -> OpenUnmixSeparator on `device`."""
    opts = pick(MaskingOptions, options, f"{FAMILY} options")
    if name_or_path in PRETRAINED_URLS:
        files = locate_pretrained(name_or_path, repo, offline)
        model, niter, checksum = _build_pretrained(name_or_path, files, opts)
        name = label or name_or_path
    else:
        folder = Path(name_or_path)
        if not (folder / "separator.json").is_file():
            raise PipelineError(f"{folder}: not an Open-Unmix model folder (no separator.json)")
        model, niter, checksum = _build_local(folder, opts)
        name = label or folder.resolve().name
    sep = OpenUnmixSeparator(model, name, checksum, niter=niter, residual=opts["residual"],
                             wiener_win_len=opts["wiener_win_len"], segment=opts["segment"])
    return sep.to(device)


# --------------------------------------------------------------------------------------------
# Training recipe (separators.train_base; see separators.families.common for the interface)
# --------------------------------------------------------------------------------------------
TRAIN_NAME = "umx"

# tiny: tests, seconds on a CPU at 8-16 kHz. small: 4 x hidden 128 at 0.9 steps/s on 2 shared
# cores -> 20 x 36 steps ~ 13 min, + ~1.5 min validation. paper: Open-Unmix (hidden 512, 6 s,
# batch 16, lr 1e-3, 64 samples per track per epoch).
PRESETS = {
    "tiny": dict(model=dict(hidden_size=16, nfft=512, nhop=128, bandwidth=16000),
                 train=dict(segment=1.0, batch_size=4, epochs=2, samples_per_epoch=8,
                            valid_max_items=4, lr_schedule="constant")),
    "small": dict(model=dict(hidden_size=128, nfft=4096, nhop=1024, bandwidth=16000),
                  train=dict(segment=3.0, batch_size=8, epochs=20, samples_per_epoch=288,
                             valid_segment=6.0, valid_max_items=24)),
    "paper": dict(model=dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000),
                  train=dict(segment=6.0, batch_size=16, epochs=1000, samples_per_track=64)),
}
MODEL_DEFAULTS = dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000)


def resolve_model(preset: str, model_options: dict | None) -> dict:
    return resolve_preset_model(TRAIN_NAME, PRESETS, MODEL_DEFAULTS, preset, model_options)


def check_training(targets, amp: str) -> None:
    pass


def input_statistics(store, dataset_id: str, nfft: int, nhop: int, split: str = "train",
                     block_frames: int = 2048) -> tuple[np.ndarray, np.ndarray]:
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


def prepare(run_dir: Path, store, dataset_id: str, config: dict, rank: int,
            split: str = "train") -> tuple[np.ndarray, np.ndarray]:
    """The input statistics, computed once per run folder (run_dir/input_stats.npz)."""
    nfft, nhop = config["model"]["nfft"], config["model"]["nhop"]
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


def build(config: dict, stats):
    m, sr = config["model"], config["sample_rate"]
    max_bin = bandwidth_to_max_bin(sr, m["nfft"], m["bandwidth"])
    mean, std = stats if stats is not None else (None, None)
    net = UMXTrainNet(config["targets"], m["nfft"], m["nhop"], m["hidden_size"], max_bin, mean, std)
    return net, SpectrogramMSE(m["nfft"], m["nhop"]), net


def export(net: UMXTrainNet, out: Path, config: dict, summary: dict) -> list[Path]:
    """Open-Unmix's folder: what its scripts/train.py writes (per target), plus separator.json."""
    m, t = config["model"], config["train"]
    files = []
    for target, model in net.targets.items():
        torch.save(cpu_state(model), out / f"{target}.pth")
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


def describe(config: dict) -> tuple[str, str]:
    return ("Open-Unmix (spectrogram masking, one BLSTM network per target)",
            "MSE on magnitude spectrograms")


# --------------------------------------------------------------------------------------------
# The family, as separators.registry sees it
# --------------------------------------------------------------------------------------------
def _load(r: Request) -> OpenUnmixSeparator:
    if r.path is None:
        return load_openunmix(r.spec, device=r.device, offline=r.offline, repo=r.repo,
                              options=r.options, label=r.label)
    return load_openunmix(str(r.path), device=r.device, offline=r.offline, options=r.options,
                          label=r.label)


RECORD = Family(
    name=FAMILY,
    summary="Open-Unmix (umxhq, umxl, umx): a name, or a model folder (separator.json, "
            "<target>.json, <target>.pth)",
    load=_load, options=MaskingOptions,
    folder=lambda folder: (folder / "separator.json").is_file(),
    knows=lambda name, repo: name in PRETRAINED_URLS, names=lambda: list(PRETRAINED_URLS),
    recipe=Recipe(TRAIN_NAME, ("openunmix", "open-unmix"), PRESETS, resolve_model, check_training,
                  prepare, build, export, describe))
