"""The one implementation of segmenting + weighted overlap-add used by every stage.

Base separators without chunking of their own (Open-Unmix, X-UMX) and the learned mixers both
process a long signal as overlapping segments and cross-fade them back together. Demucs models use
demucs's own `apply_model` chunking instead.
"""
from __future__ import annotations

from typing import Callable

import torch


def ola_window(segment: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Periodic Hann: shifted by segment/4 its copies sum to the constant 2 (COLA)."""
    return torch.hann_window(segment, periodic=True, device=device, dtype=dtype)


def overlap_add(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    segment: int,
    hop: int | None = None,
    batch: int = 1,
) -> torch.Tensor:
    """Apply `fn` to overlapping segments of `x` and cross-fade the results.

    x: [C, n]. fn: [B, C, segment] -> [B, *out_dims, segment]. Returns [*out_dims, n].
    The signal is zero-padded by `segment - hop` at both ends so that every sample is covered
    by the same number of windows; the result is divided by the summed window, so identity `fn`
    gives back `x` up to float rounding and segment borders carry no clicks. Memory is the
    output plus `batch` segments, whatever the length of `x`.
    """
    hop = hop or segment // 4
    if not 0 < hop <= segment:
        raise ValueError(f"hop must be in (0, segment], got hop={hop}, segment={segment}")
    n = x.shape[-1]
    pad = segment - hop
    total = n + 2 * pad
    n_seg = max(1, -(-(total - segment) // hop) + 1)
    padded_len = (n_seg - 1) * hop + segment
    xp = torch.nn.functional.pad(x, (pad, padded_len - n - pad))
    window = ola_window(segment, device=x.device, dtype=torch.float32)
    out = None
    norm = torch.zeros(padded_len, device=x.device, dtype=torch.float32)
    starts = list(range(0, padded_len - segment + 1, hop))
    for i in range(0, len(starts), batch):
        group = starts[i : i + batch]
        chunks = torch.stack([xp[..., s : s + segment] for s in group])
        y = fn(chunks)
        if out is None:
            out = torch.zeros(*y.shape[1:-1], padded_len, device=x.device, dtype=torch.float32)
        for j, s in enumerate(group):
            out[..., s : s + segment] += y[j].float() * window
            norm[s : s + segment] += window
    return out[..., pad : pad + n] / norm[pad : pad + n]
