"""The learned mixers of the MDX-Mixer paper (Nakano & Goto, IEICE 2024), as torch modules.

Both map a segment X_k [in, T] (the input channels of mixer.inputs) to Y_k = X_k W_k [out, T]:
the output is always a linear combination of the inputs; what differs is where W comes from.

* Conv1x1Mixer (section 3.1): one W for every segment of every track (a 1x1 convolution).
* MDXMixer (section 3.2): W_k predicted from the segment itself by an MLP-Mixer over the folded
  segment, so the mix can follow the music (e.g. trust another model for vocals in a solo).
  The residual form (ours, for small data) learns W_k = W + ΔW_k: W a time-invariant matrix
  started from a trained conv1x1's, the network predicting only the correction ΔW_k, which
  training penalises toward zero (mixer.train's `penalty`), so the mix departs from the
  time-invariant one only where the training music pays for it.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from core.options import option
from core.registry import Registry

# T: segment length, F: folding factor (samples per row of Z), N: number of Mixer layers.
PRESETS = {
    "paper": {"T": 2 ** 18, "F": 2 ** 7, "N": 8},
    "ablation-17": {"T": 2 ** 17, "F": 2 ** 6, "N": 8},
    "ablation-16": {"T": 2 ** 16, "F": 2 ** 5, "N": 8},
    "cpu": {"T": 2 ** 16, "F": 2 ** 5, "N": 2},
    # `pipeline demo`'s: ~0.4 s segments, one layer: trains and runs in about a minute on 2 cores
    "demo": {"T": 2 ** 14, "F": 2 ** 5, "N": 1},
    "tiny": {"T": 2 ** 10, "F": 2 ** 4, "N": 1},
}


def fold(x: torch.Tensor, F: int) -> torch.Tensor:
    """[B, C, T] -> Z [B, T/F, C*F] with Z[b, t, c*F + f] = x[b, c, t*F + f].

    Each row of Z holds F consecutive samples of every channel: a short-time view in which the
    token-mixing MLP sees time and the channel-mixing MLP sees channels and fine time together.
    """
    B, C, T = x.shape
    if T % F:
        raise ValueError(f"segment length {T} is not a multiple of F={F}")
    return x.reshape(B, C, T // F, F).permute(0, 2, 1, 3).reshape(B, T // F, C * F)


def unfold(z: torch.Tensor, C: int) -> torch.Tensor:
    """The inverse of `fold`: Z [B, T/F, C*F] -> [B, C, T]."""
    B, R, CF = z.shape
    F = CF // C
    return z.reshape(B, R, C, F).permute(0, 2, 1, 3).reshape(B, C, R * F)


def apply_mixing(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Y = X W per batch item: x [B, in, T], w [B, in, out] -> [B, out, T].

    Always float32, autocast or not: in bf16 the mix itself would add noise at about -48 dB,
    audible in a separation that aims above 10 dB. Only the prediction of W runs in low precision.
    """
    off = (torch.autocast(x.device.type, enabled=False) if x.device.type in ("cpu", "cuda")
           else contextlib.nullcontext())   # e.g. the 'meta' device, used to check shapes
    with off:
        return torch.bmm(w.float().transpose(1, 2), x.float())   # (X W)^T = W^T X^T


class Conv1x1Mixer(nn.Module):
    """Y_k = X_k W with one W in R^{in x out}, no bias; negative weights allowed."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.in_ch, self.out_ch = in_ch, out_ch
        # nn.Linear's default init scale; the seed set by the caller makes it reproducible.
        bound = 1.0 / in_ch ** 0.5
        self.weight = nn.Parameter(torch.empty(in_ch, out_ch).uniform_(-bound, bound))

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(x.shape[0], -1, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_mixing(x, self.mixing_weights(x))


class MLP(nn.Sequential):
    def __init__(self, dim: int, hidden: int, p: float):
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Dropout(p), nn.Linear(hidden, dim))


class MixerLayer(nn.Module):
    """One MLP-Mixer layer (Tolstikhin et al. 2021) on Z [B, rows, cols]."""

    def __init__(self, rows: int, cols: int, p: float):
        super().__init__()
        self.norm_tokens = nn.LayerNorm(cols)
        self.tokens = MLP(rows, rows, p)      # across the T/F rows, hidden D_T = T/F
        self.norm_channels = nn.LayerNorm(cols)
        self.channels = MLP(cols, cols, p)    # across the in*F columns, hidden D_C = in*F

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        z = z + self.tokens(self.norm_tokens(z).transpose(1, 2)).transpose(1, 2)
        return z + self.channels(self.norm_channels(z))


class MDXMixer(nn.Module):
    """W_k = FC(GAP(Mixer^N(fold(X_k)))) in R^{in x out}; Y_k = X_k W_k.

    residual: W_k = W + FC(...) with a learned time-invariant W (`base`); the last batch's
    corrections ΔW_k stay in `last_delta` for the training loss's penalty."""

    def __init__(self, in_ch: int, out_ch: int, T: int = 2 ** 18, F: int = 2 ** 7, N: int = 8,
                 p: float = 0.0, residual: bool = False):
        super().__init__()
        if T % F:
            raise ValueError(f"T={T} is not a multiple of F={F}")
        self.in_ch, self.out_ch, self.T, self.F = in_ch, out_ch, T, F
        rows, cols = T // F, in_ch * F
        self.layers = nn.Sequential(*[MixerLayer(rows, cols, p) for _ in range(N)])
        self.head = nn.Linear(cols, in_ch * out_ch)
        self.base = nn.Parameter(torch.zeros(in_ch, out_ch)) if residual else None
        self.last_delta = None

    def mixing_weights(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.T:
            raise ValueError(f"MDXMixer takes segments of exactly T={self.T} samples, "
                             f"got {x.shape[-1]}")
        z = self.layers(fold(x, self.F))
        w = self.head(z.mean(dim=1)).view(x.shape[0], self.in_ch, self.out_ch)
        if self.base is None:
            return w
        self.last_delta = w
        return self.base + w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return apply_mixing(x, self.mixing_weights(x))


# ---- the architectures, as the rest of the tool sees them ------------------------------------
@dataclass(frozen=True)
class Arch:
    """A mixer architecture: trained by `pipeline train-mixer --arch NAME` (mixer.train), applied
    by mixer.learned, and an ensemble method of the same name everywhere else.

    build(in_ch, out_ch, hyper, start) -> the untrained module: forward(X [B, in, T]) -> [B, out, T],
    mixing_weights(X) -> W [B, in, out]; `start` [in, out] is the mixing it starts from (the
    models' average, mixer.inputs.average_mixing) or None (PyTorch's initialisation); a residual
    module (one with a `base` parameter) starts from zero corrections.
    hyper(T, options, init) -> config.json's "hyper": everything build() needs.
    """

    name: str
    summary: str
    options: type | None                  # its own options (core.options), beyond mixer.learned's
    build: Callable[[int, int, dict, torch.Tensor | None], nn.Module]
    hyper: Callable[[int, object, str], dict]
    default_epochs: int
    time_varying: bool                    # W_k per segment (else one W: the module's `weight`)


@dataclass(frozen=True)
class MDXMixerOptions:
    F: int | None = option(None, "fold factor (default: the preset's)", flags=("-F",))
    N: int | None = option(None, "MLP-Mixer layers (default: the preset's)", flags=("-N",))
    p: float = option(0.0, "dropout", flags=("-p",))
    base: str | None = option(None, "a finished conv1x1 run (folder or name; in an experiment, a "
                              "conv1x1 system listed before) on the same inputs: the MDX-Mixer then "
                              "learns per-segment corrections of its W (W_k = W + ΔW_k)", refers="run:conv1x1")
    penalty: float = option(0.0, "with base: weight of the penalty on the corrections ΔW_k")
    penalty_norm: str = option("l2", "with base: l2 (mean square) or l1 (mean absolute) penalty",
                               choices=("l2", "l1"))


def _build_conv1x1(in_ch: int, out_ch: int, hyper: dict, start) -> nn.Module:
    model = Conv1x1Mixer(in_ch, out_ch)
    if start is not None:
        with torch.no_grad():
            model.weight.copy_(start)
    return model


def _build_mdx(in_ch: int, out_ch: int, hyper: dict, start) -> nn.Module:
    """`start` becomes the head's bias with zero head weights (residual: the time-invariant W, no
    correction yet), so a short CPU training refines a sensible ensemble instead of first having
    to find one."""
    residual = bool(hyper.get("residual"))
    model = MDXMixer(in_ch, out_ch, T=hyper["T"], F=hyper["F"], N=hyper["N"], p=hyper["p"],
                     residual=residual)
    if start is not None or residual:
        with torch.no_grad():
            model.head.weight.zero_()
            model.head.bias.zero_()
            target = model.base if residual else model.head.bias
            if start is not None:
                target.copy_(start.reshape(target.shape))
    return model


RECORDS = (
    Arch("conv1x1", "time-invariant: one W for every segment (Nakano & Goto, section 3.1)",
         options=None, build=_build_conv1x1, default_epochs=50, time_varying=False,
         # T is only its training segment; F, N, p recorded as runs always have
         hyper=lambda T, o, init: {"T": T, "F": None, "N": None, "p": 0.0, "init": init}),
    Arch("mdx-mixer", "time-varying: W_k predicted per segment by an MLP-Mixer (section 3.2)",
         options=MDXMixerOptions, build=_build_mdx, default_epochs=100, time_varying=True,
         hyper=lambda T, o, init: {"T": T, "F": o.F, "N": o.N, "p": o.p, "init": init}),
)
ARCHS: Registry[Arch] = Registry("mixer architecture", ("mixer.models",),
                                 group="stem_ensemble.mixers")


def build_mixer(arch: str, in_ch: int, out_ch: int, hyper: dict,
                start: torch.Tensor | None = None) -> nn.Module:
    """The untrained module of architecture `arch` (see Arch.build)."""
    return ARCHS.get(arch).build(in_ch, out_ch, hyper, start)
