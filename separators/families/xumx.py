"""X-UMX (CrossNet-Open-Unmix) through asteroid, with our own time-domain wrapper.

Why a workaround, and why all of it lives in this one file: in asteroid 0.7.0
`asteroid.models.XUMX` is a stub that raises ("broken in torch 2.0"); the network survives as
`asteroid.models.x_umx.BrokenXUMX`. Its forward still returns the masked magnitude spectrograms,
but its `return_time_signals=True` path calls `torch.istft` on a real tensor, which torch 2
rejects, and its STFT uses the deprecated `return_complex=False`. So we use only the network
(`forward_masker` + `apply_masks`) and do the rest as asteroid's X-UMX recipe (egs/musdb18/
X-UMX/eval.py) does: STFT of the mixture with the model's parameters (window_length, in_chan =
n_fft, n_hop, centred, reflect padding, Hann window) -> magnitude (`spec_power`) -> masked
magnitude estimates -> multichannel Wiener filtering (`openunmix.filtering.wiener`, the torch
port of the norbert filter the recipe uses; `niter` option) -> complex spectrograms -> ISTFT,
trimmed/padded to the input length. Long inputs are cut into `segment`-second pieces and
cross-faded with core.chunking.overlap_add (the BiLSTMs and the Wiener step otherwise cost
GBs on a full track). When asteroid fixes XUMX, only this file changes.

Checkpoints: asteroid's serialized dict (`BaseModel.serialize()`, as the recipe's train.py saves
it and as the official `pretrained_xumx_musdb18HQ.pth` is): `model_name` ('XUMX'; 'BrokenXUMX' if
serialized with asteroid 0.7), `state_dict`, `model_args` (window_length, in_chan, n_hop,
sample_rate, sources, hidden_size, nb_channels, max_bin, nb_layers, bidirectional, spec_power,
...), and `infos`. It is read with `torch.load(weights_only=True)`; the only non-tensor objects
such files carry are `torch.__version__` (a TorchVersion, a str subclass, in infos) and numeric
numpy scalars (max_bin from `bandwidth_to_max_bin` is a numpy int: np.dtype, the numeric
numpy.dtypes classes and multiarray.scalar), which are allow-listed explicitly - nothing else is
ever unpickled. Never downloaded: `xumx` must be a local file.

Training recipe (`train-base --family xumx`, at the end of this file): asteroid's `BrokenXUMX`,
the four networks bridged by averaged hidden states, trained with the combinational multi-domain
loss of the X-UMX paper (`separators.losses`); `xumx_loss="complex"` gives the Danna-Sep variant
(complex-domain MSE after a differentiable multichannel Wiener filter). Exported as asteroid's
serialized dict (model_name "XUMX") in `xumx.pth`.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from core.errors import PipelineError
from separators.base import MaskingOptions, MaskingSeparator, resolve_niter
from separators.families import Family, Request, pick
from separators.families.common import (
    Recipe,
    bandwidth_to_max_bin,
    cpu_state,
    resolve_preset_model,
)
from separators.losses import istft, multichannel_wiener, stft
from separators.weights import (
    cached_checksum,
    hub_checkpoints_dir,
    load_checkpoint_file,
    missing_weights_error,
)

FAMILY = "xumx"

OFFICIAL_FILES = {
    "pretrained_xumx_musdb18HQ.pth": "https://zenodo.org/record/4740378/files/pretrained_xumx_musdb18HQ.pth",
}



# --------------------------------------------------------------------------------------------
# Where weights come from
# --------------------------------------------------------------------------------------------

def locate_official_xumx(repo: Path | None = None) -> Path:
    """The official X-UMX file in --repo DIR or the torch hub cache; never downloads."""
    folders = ([Path(repo)] if repo is not None else []) + [hub_checkpoints_dir()]
    for fname in OFFICIAL_FILES:
        for folder in folders:
            if (folder / fname).is_file():
                return folder / fname
    raise missing_weights_error("xumx", list(OFFICIAL_FILES.items()),
                                [str(hub_checkpoints_dir()), "--repo DIR"],
                                "or pass the path of any X-UMX .pth file")


def _safe_globals() -> list:
    """The non-tensor globals an asteroid-serialized X-UMX file legitimately contains."""
    import numpy as np
    from torch.torch_version import TorchVersion

    try:
        scalar = np._core.multiarray.scalar  # numpy >= 2
    except AttributeError:  # pragma: no cover - numpy 1.x
        scalar = np.core.multiarray.scalar
    numeric = ("Bool", "Int8", "Int16", "Int32", "Int64", "UInt8", "UInt16", "UInt32", "UInt64",
               "Byte", "UByte", "Short", "UShort", "Int", "UInt", "Long", "ULong", "LongLong",
               "ULongLong", "Float16", "Float32", "Float64", "LongDouble", "Complex64",
               "Complex128", "CLongDouble")
    dtypes = getattr(np, "dtypes", None)
    dtype_classes = [getattr(dtypes, f"{n}DType") for n in numeric if hasattr(dtypes, f"{n}DType")]
    return [TorchVersion, np.dtype, *dtype_classes, (scalar, "numpy.core.multiarray.scalar"),
            (scalar, "numpy._core.multiarray.scalar")]


def read_checkpoint(path: Path) -> dict:
    conf = load_checkpoint_file(path, "an asteroid X-UMX checkpoint", safe_globals=_safe_globals())
    if not isinstance(conf, dict) or not {"model_name", "state_dict", "model_args"} <= set(conf):
        keys = ", ".join(map(str, conf)) if isinstance(conf, dict) else type(conf).__name__
        raise PipelineError(f"{path}: not an asteroid serialized model (needs model_name, state_dict, "
                            f"model_args; found {keys})")
    if conf["model_name"] not in ("XUMX", "BrokenXUMX"):
        raise PipelineError(f"{path}: an asteroid {conf['model_name']} model, not X-UMX")
    return conf


# --------------------------------------------------------------------------------------------
# What an X-UMX model is
# --------------------------------------------------------------------------------------------

def build_network(conf: dict, path: Path):
    """BrokenXUMX from a serialized dict, all weights loaded (strict)."""
    import inspect

    from asteroid.models.x_umx import BrokenXUMX

    args = {k: (v.item() if hasattr(v, "item") else v) for k, v in conf["model_args"].items()}
    accepted = set(inspect.signature(BrokenXUMX.__init__).parameters) - {"self"}
    unknown = sorted(set(args) - accepted)
    if unknown:
        raise PipelineError(f"{path}: unknown X-UMX model_args {', '.join(unknown)}")
    args["return_time_signals"] = False
    if args.get("window_length", 4096) != args.get("in_chan", 4096):
        # BrokenXUMX's own STFT passes a window of window_length with n_fft=in_chan
        raise PipelineError(f"{path}: window_length != in_chan is not supported by X-UMX")
    try:
        net = BrokenXUMX(**args)
        net.load_state_dict(conf["state_dict"], strict=True)
    except (RuntimeError, TypeError, ValueError) as e:
        raise PipelineError(f"{path}: weights do not fit the X-UMX model_args "
                            f"({str(e).splitlines()[0][:200]})") from None
    return net.eval()


class XUMXSeparator(MaskingSeparator):
    family = FAMILY

    def __init__(self, net, name: str, weights_checksum: str, *, niter: int | None = None,
                 residual: bool = False, wiener_win_len: int = 300, segment: float = 30.0):
        self.net = self.network = net
        for p in self.net.parameters():
            p.requires_grad_(False)
        self.name = name
        self.sources = tuple(net.sources) + (("residual",) if residual else ())
        rate = float(net.sample_rate)
        if not rate.is_integer():
            raise PipelineError(f"{name}: non-integer sample rate {rate}")
        self.sample_rate = int(rate)
        self.niter = resolve_niter(name, niter, len(self.sources))
        self.residual = residual
        if wiener_win_len <= 0 or segment <= 0:
            raise PipelineError(f"{name}: wiener_win_len and segment must be > 0")
        if segment * self.sample_rate < 2 * net.in_chan:
            raise PipelineError(f"{name}: segment {segment} s is shorter than two STFT windows")
        self.wiener_win_len, self.segment = wiener_win_len, segment
        self._checksum = weights_checksum

    def _window(self, device) -> torch.Tensor:
        # the model's own STFT window (a Hann of window_length, stored in the checkpoint)
        return self.net.encoder[0].window.detach().to(device)

    def separate_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2, T] -> [B, S, 2, T], without chunking."""
        from openunmix.filtering import wiener

        net = self.net
        B, C, T = x.shape
        window = self._window(x.device)
        X = torch.stft(x.reshape(B * C, T), n_fft=net.in_chan, hop_length=net.n_hop, window=window,
                       center=True, pad_mode="reflect", normalized=False, onesided=True,
                       return_complex=True)
        X = X.reshape(B, C, X.shape[-2], X.shape[-1])                 # [B, C, F, frames]
        mag = X.abs().pow(net.spec_power)
        if net.nb_channels == 1:
            mag = mag.mean(1, keepdim=True)
        spec = mag.permute(3, 0, 1, 2)                                # [frames, B, C', F]
        masks = net.forward_masker(spec.clone())
        V = net.apply_masks(spec, masks)                              # [S, frames, B, C', F]
        frames, F = X.shape[-1], X.shape[-2]
        n_out = len(self.sources)
        out = torch.empty(B, n_out, C, T, device=x.device)
        for b in range(B):
            v = V[:, :, b].permute(1, 3, 2, 0)                        # [frames, F, C', S]
            mix = torch.view_as_real(X[b]).permute(2, 1, 0, 3)        # [frames, F, C, 2]
            Y = torch.zeros(frames, F, C, 2, n_out, device=x.device)
            for start in range(0, frames, self.wiener_win_len):
                sl = slice(start, min(frames, start + self.wiener_win_len))
                Y[sl] = wiener(v[sl], mix[sl], self.niter, softmask=False, residual=self.residual)
            Yc = torch.view_as_complex(Y.permute(4, 2, 1, 0, 3).contiguous())  # [S, C, F, frames]
            y = torch.istft(Yc.reshape(n_out * C, F, frames), n_fft=net.in_chan,
                            hop_length=net.n_hop, window=window, center=True, length=T)
            out[b] = y.reshape(n_out, C, T)
        return out


def load_xumx(path: str | Path, *, device="cpu", options: dict | None = None,
              label: str | None = None) -> XUMXSeparator:
    """An asteroid X-UMX .pth file -> XUMXSeparator on `device`."""
    opts = pick(MaskingOptions, options, f"{FAMILY} options")
    path = Path(path)
    if not path.is_file():
        raise PipelineError(f"{path}: no such X-UMX file")
    conf = read_checkpoint(path)
    net = build_network(conf, path)
    sep = XUMXSeparator(net, label or path.stem, cached_checksum(path), **opts)
    return sep.to(device)


# --------------------------------------------------------------------------------------------
# Training recipe (separators.train_base; see separators.families.common for the interface)
# --------------------------------------------------------------------------------------------
TRAIN_NAME = "xumx"

# small: hidden 128 at 0.23-0.31 steps/s on 2 shared cores (the spectrogram-domain losses of 14
# subsets, ISTFT) -> 12 x 20 steps ~ 13-17 min, + ~2 min validation. paper: asteroid's conf.yml
# (hidden 512, batch 14, alpha 10, combination loss).
_XUMX = dict(loss="magnitude", alpha=10.0, combine=True, wiener_iters=0)
PRESETS = {
    "tiny": dict(model=dict(hidden_size=16, nfft=512, nhop=128, bandwidth=16000, **_XUMX),
                 train=dict(segment=1.0, batch_size=4, epochs=2, samples_per_epoch=8,
                            valid_max_items=4, lr_schedule="constant")),
    "small": dict(model=dict(hidden_size=128, nfft=4096, nhop=1024, bandwidth=16000, **_XUMX),
                  train=dict(segment=3.0, batch_size=8, epochs=12, samples_per_epoch=160,
                             valid_segment=6.0, valid_max_items=24)),
    "paper": dict(model=dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000, **_XUMX),
                  train=dict(segment=6.0, batch_size=14, epochs=1000, samples_per_track=64)),
}
MODEL_DEFAULTS = dict(hidden_size=512, nfft=4096, nhop=1024, bandwidth=16000, **_XUMX)


def resolve_model(preset: str, model_options: dict | None) -> dict:
    model = resolve_preset_model(TRAIN_NAME, PRESETS, MODEL_DEFAULTS, preset, model_options)
    if model["loss"] not in ("magnitude", "complex"):
        raise PipelineError(f"xumx loss '{model['loss']}': choose magnitude (X-UMX) or "
                            f"complex (Danna-Sep)")
    if model["loss"] == "complex" and "wiener_iters" not in (model_options or {}):
        model["wiener_iters"] = 1    # Danna-Sep: the loss is taken after one EM step
    if model["loss"] == "magnitude" and model["wiener_iters"]:
        raise PipelineError("xumx: the magnitude loss (X-UMX) is taken on the masked "
                            "magnitudes, before any Wiener filtering; wiener_iters needs "
                            "loss='complex' (Danna-Sep)")
    return model


def check_training(targets, amp: str) -> None:
    if len(targets) < 2:
        raise PipelineError("xumx: X-UMX bridges several targets; give at least two")


def prepare(run_dir: Path, store, dataset_id: str, config: dict, rank: int, split: str = "train"):
    from separators.families.umx import (
        prepare as umx_prepare,  # the same Open-Unmix statistics
    )

    return umx_prepare(run_dir, store, dataset_id, config, rank, split)


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
    """X-UMX's combinational multi-domain loss on `XUMXTrainNet`'s output (see separators.losses).

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
        from separators.losses import multi_domain_loss

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


def build(config: dict, stats):
    from asteroid.models.x_umx import BrokenXUMX

    m, sr, targets = config["model"], config["sample_rate"], config["targets"]
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


def export(xumx, out: Path, config: dict, summary: dict) -> list[Path]:
    """asteroid's `BaseModel.serialize()` dict (model_name 'XUMX'), as the official X-UMX file."""
    import asteroid

    model_args = xumx.get_model_args()
    model_args["sample_rate"] = config["sample_rate"]
    package = {
        "model_name": "XUMX",
        "state_dict": cpu_state(xumx),
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


def describe(config: dict) -> tuple[str, str]:
    m = config["model"]
    arch = ("X-UMX / CrossNet-Open-Unmix (spectrogram masking, bridged networks)"
            + (" - Danna-Sep complex-domain loss" if m.get("loss") == "complex" else ""))
    loss = ("multi-domain loss: " + ("complex-spectrogram MSE after multichannel Wiener "
                                     "filtering" if m["loss"] == "complex" else "magnitude MSE")
            + f" + {m['alpha']:g} x (1 - weighted SDR)"
            + (", over all sums of 1..J-1 targets (combination loss)" if m["combine"] else ""))
    return arch, loss


# --------------------------------------------------------------------------------------------
# The family, as separators.registry sees it
# --------------------------------------------------------------------------------------------
def _model_file(folder: Path) -> Path | None:
    """The X-UMX file of a folder holding exactly one .pth (several, and no other family's
    files: ambiguous)."""
    pths = [p for p in folder.iterdir() if p.is_file() and p.suffix == ".pth"]
    if len(pths) > 1:
        raise PipelineError(f"{folder}: several .pth files and no separator.json; pass the X-UMX "
                            f".pth file itself, or add separator.json for an Open-Unmix model")
    return pths[0] if pths else None


def _load(r: Request) -> XUMXSeparator:
    if r.path is None:          # "xumx": the official weights, never downloaded
        return load_xumx(locate_official_xumx(r.repo), device=r.device, options=r.options,
                         label=r.label or r.spec)
    path = _model_file(r.path) if r.path.is_dir() else r.path
    return load_xumx(path, device=r.device, options=r.options, label=r.label)


RECORD = Family(
    name=FAMILY,
    summary="X-UMX (asteroid): a .pth file (or xumx, the official weights, in --repo / the hub "
            "cache)",
    load=_load, options=MaskingOptions,
    folder=lambda folder: _model_file(folder) is not None,
    file=lambda path: path.suffix == ".pth",
    knows=lambda name, repo: name == "xumx", names=lambda: ["xumx"],
    recipe=Recipe(TRAIN_NAME, ("x-umx",), PRESETS, resolve_model, check_training, prepare, build,
                  export, describe, with_rest=True))
