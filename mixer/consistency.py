"""Mixture consistency: estimates projected so that they sum to the mixture (Wisdom et al.,
ICASSP 2019, "Differentiable consistency constraints for improved deep speech enhancement";
MVSEP-MDX23 re-estimates its stems from the residual likewise).

With r = x - sum_j s_j the residual of the estimates s_j of the J sources of a mixture x:

* equal: s_j + r / J, the residual shared equally;
* energy: per STFT bin, S_j + |S_j|^2 / sum_k |S_k|^2 R, in proportion to each source's energy
  (equally where every source is silent); the STFT of mixer.stft (2048-point periodic Hann,
  hop 1024) on the whole track's frame grid, a block at a time.

Both are linear in r with shares summing to one, so the result sums to the mixture (to float
rounding), a second projection changes nothing, and consistent estimates are left as they are.
A projection only makes sense when the sources sum to the mixture: `check` measures it on the
dataset's references and refuses below MIN_DB (MUSDB18's separately compressed stems sum to
their mixture within 25-30 dB; MUSDB18-HQ's and the synthetic set's exactly).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from core.chunking import overlap_add
from core.errors import PipelineError
from core.options import option
from core.store import StemStore
from mixer.stft import BLOCK, HOP, N_FFT, istft_frames, stft_frames, window

MODES = ("none", "equal", "energy")
MIN_DB = 20.0       # the references' sum must match the mixture at least this well
EPS = 1e-12


@dataclass(frozen=True)
class ConsistencyOptions:
    """Every ensemble method's and mixer's (mixer.methods adds it to their own options)."""

    consistency: str = option("none", "project the estimates onto the mixture: none, equal (the "
                              "residual shared equally) or energy (per STFT bin, in proportion "
                              "to each source's energy)", choices=MODES)


def _energy_shares(z: torch.Tensor) -> torch.Tensor:
    """z [S, ...] complex -> shares [S, ...] >= 0 summing to one over S."""
    power = z.real ** 2 + z.imag ** 2
    total = power.sum(0, keepdim=True)
    return torch.where(total > EPS, power / total.clamp_min(EPS), 1.0 / len(z))


def project_block(est: torch.Tensor, mixture: torch.Tensor, mode: str,
                  spectral_context: bool = False) -> torch.Tensor:
    """est [S, 2, L], mixture [2, L] -> [S, 2, L] (energy: with spectral_context, both carry
    mixer.spectral.HOP samples of context on each side, and the middle L - 2 HOP come back)."""
    if mode == "equal":
        return est + (mixture - est.sum(0)) / len(est)
    Z, X = stft_frames(est), stft_frames(mixture)
    residual = X - Z.sum(0)
    return istft_frames(Z + _energy_shares(Z) * residual)


def project(estimates: np.ndarray, mixture, mode: str) -> np.ndarray:
    """A track's estimates [S, 2, n] projected onto sum = mixture [2, n] (float32)."""
    if mode not in MODES:
        raise PipelineError(f"consistency '{mode}': choose one of {', '.join(MODES)}")
    if mode == "none":
        return estimates
    est = np.asarray(estimates, dtype=np.float32)
    S, _, n = est.shape
    if mode == "equal":
        mix = np.asarray(mixture[:, :n], dtype=np.float32)
        return est + (mix - est.sum(0)) / np.float32(S)
    rows = np.concatenate([est.reshape(2 * S, n), np.asarray(mixture[:, :n], np.float32)])

    def run(chunks: torch.Tensor) -> torch.Tensor:
        out = [project_block(c[:-2].reshape(S, 2, -1), c[-2:], mode)
               for c in chunks]
        return torch.stack(out).reshape(len(chunks), 2 * S, -1)

    count = -(-n // BLOCK)                               # as mixer.spectral.blockwise
    size = max(HOP, -(-n // (count * HOP)) * HOP)
    out = overlap_add(run, rows, size, window="flattop", overlap=0, context=HOP)
    return out.numpy().reshape(S, 2, n)


def project_segments(y: torch.Tensor, mixture: torch.Tensor, mode: str) -> torch.Tensor:
    """Differentiable, for training: y [B, S, 2, T] onto sum = mixture [B, 2, T], each segment
    on its own (energy: torch.stft with the same window and hop, centred frames)."""
    if mode == "none":
        return y
    if mode == "equal":
        return y + ((mixture - y.sum(1)) / y.shape[1]).unsqueeze(1)
    B, S, C, T = y.shape
    w = window(str(y.device))

    def spec(x):
        return torch.stft(x.reshape(-1, T), N_FFT, HOP, window=w, center=True, pad_mode="constant",
                          return_complex=True)

    X = spec(mixture)
    X = X.reshape(B, 1, C, *X.shape[-2:])
    Z = spec(y).reshape(B, S, C, *X.shape[-2:])
    shares = _energy_shares(Z.movedim(1, 0)).movedim(0, 1)
    Z = Z + shares * (X - Z.sum(1, keepdim=True))
    return torch.istft(Z.reshape(-1, *Z.shape[-2:]), N_FFT, HOP, window=w, center=True,
                       length=T).reshape(B, S, C, T)


def check(store: StemStore, dataset_id: str, mode: str, split: str | None = None) -> dict:
    """That a projection is meaningful for the dataset: its references sum to its mixture (the
    worst track of `split`, else every stored track, at least MIN_DB); what was found."""
    if mode not in MODES:
        raise PipelineError(f"consistency '{mode}': choose one of {', '.join(MODES)}")
    tracks = [t for t in store.tracks(dataset_id, split) if store.has_track(dataset_id, t)]
    if not tracks:
        raise PipelineError(f"{store.dataset_dir(dataset_id)}: no stored tracks to check that "
                            f"its sources sum to its mixture (needed for consistency '{mode}')")
    worst = np.inf
    for t in tracks:
        mix = np.asarray(store.mixture(dataset_id, t), np.float64)
        residual = mix - np.asarray(store.references(dataset_id, t), np.float64).sum(0)
        worst = min(worst, 10 * np.log10(((mix ** 2).sum() + EPS) / ((residual ** 2).sum() + EPS)))
    if worst < MIN_DB:
        raise PipelineError(f"consistency '{mode}': the sources of {dataset_id} do not sum to its "
                            f"mixture (worst track {worst:.1f} dB, below {MIN_DB:g} dB: its stems "
                            f"leave part of the mixture out), so estimates cannot be projected "
                            f"onto it; use consistency 'none'")
    return {"mode": mode, "sources_vs_mixture_db": round(float(worst), 1),
            "tracks": len(tracks)}
