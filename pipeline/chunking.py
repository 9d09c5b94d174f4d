"""The one implementation of segmenting + weighted overlap-add used by every stage.

Base separators without chunking of their own (Open-Unmix, X-UMX) and the learned mixers both
process a long signal as overlapping segments and cross-fade them back together; the cache stage
processes long tracks in blocks the same way (`cache.inference.separate_array`, flat-top window).
Demucs models use demucs's own `apply_model` chunking inside each block.

Finished output samples can be streamed to a `sink` instead of being collected, so a long signal
costs memory for `batch` segments only, not for the whole output.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

WINDOWS = ("hann", "flattop")


def ola_window(segment: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Periodic Hann: shifted by segment/4 its copies sum to the constant 2 (COLA)."""
    return torch.hann_window(segment, periodic=True, device=device, dtype=dtype)


def flattop_window(segment: int, overlap: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """1 in the middle, Hann ramps of `overlap` samples at both ends (a Tukey-like window).

    Ramp k of `overlap` is sin^2(pi/2 * (k + 0.5) / overlap): never zero, and a falling ramp plus
    the next segment's rising ramp sum to 1, so copies shifted by `segment - overlap` sum to 1.
    """
    if not 0 <= 2 * overlap <= segment:
        raise ValueError(f"flat-top window: overlap must be in [0, segment/2], got overlap={overlap}, "
                         f"segment={segment}")
    w = torch.ones(segment, device=device, dtype=torch.float64)
    if overlap:
        k = torch.arange(overlap, device=device, dtype=torch.float64)
        ramp = torch.sin(0.5 * math.pi * (k + 0.5) / overlap) ** 2
        w[:overlap] = ramp
        w[segment - overlap:] = ramp.flip(0)
    return w.to(dtype)


def segment_of(x, start: int, segment: int) -> torch.Tensor:
    """x[..., start:start + segment] as a new tensor, zeros where that lies outside x.

    x is a tensor, or an array (a read-only np.memmap included) that is read here, one segment at
    a time, and copied into a writable tensor.
    """
    n = x.shape[-1]
    a, b = max(start, 0), min(start + segment, n)
    if isinstance(x, torch.Tensor):
        piece = x[..., a:b] if b > a else x[..., :0]
    else:
        piece = x[..., a:b] if b > a else x[..., :0]
        # a new array (what a lazy reader returns) is used as it is; a view is copied
        fresh = type(piece) is np.ndarray and piece.flags.owndata and piece.flags.writeable
        piece = torch.from_numpy(piece if fresh else np.array(piece))
    left, right = a - start, start + segment - max(b, a)
    if left or right:
        piece = torch.nn.functional.pad(piece, (left, right))
    return piece


def overlap_add(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x,
    segment: int,
    hop: int | None = None,
    batch: int = 1,
    *,
    window: str = "hann",
    overlap: int | None = None,
    context: int = 0,
    sink: Callable[[int, torch.Tensor], None] | None = None,
) -> torch.Tensor | None:
    """Apply `fn` to overlapping segments of `x` and cross-fade the results.

    x: [C, n], a tensor or an array read segment by segment (e.g. a np.memmap).
    fn: [B, C, segment] -> [B, *out_dims, segment]. Returns [*out_dims, n] float32, or, with
    `sink`, None: then `sink(start, block)` receives the finished output samples
    [*out_dims, start:start + m] in order, as soon as no later segment touches them, and the
    whole output is never held (memory: `batch` segments, whatever the length of `x`). `block`
    is a view of an internal buffer, valid during the call: copy what must outlive it.

    window="hann" (default): periodic Hann, hop segment/4 unless given; the signal is zero-padded
    by `segment - hop` at both ends so that every sample is covered by the same number of windows.
    window="flattop": `flattop_window(segment, overlap)`, hop = segment - overlap: long blocks
    cross-faded over a short overlap, so blocks cost only overlap/segment extra; no padding at
    the ends (the window never vanishes), only after the end to fill the last segment.
    Either way the result is divided by the summed window, so identity `fn` gives back `x` up to
    float rounding, the ends included, and segment borders carry no clicks.

    context: `fn` also sees this many samples of `x` on each side of its segment (zeros outside
    `x`): it gets [B, C, context + segment + context] and still returns the `segment` samples in
    the middle. For a computation with a receptive field (an STFT frame straddling a segment
    border), so that each segment's output is exact up to its borders.
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    if window == "flattop":
        if overlap is None:
            raise ValueError("window='flattop' needs `overlap` (samples)")
        if hop is not None and hop != segment - overlap:
            raise ValueError(f"window='flattop': hop is segment - overlap = {segment - overlap}, got {hop}")
        hop = segment - overlap
        w = flattop_window(segment, overlap)
        pad = 0
    else:
        if overlap is not None:
            raise ValueError("`overlap` is for window='flattop'; the Hann window takes `hop`")
        hop = hop or segment // 4
        w = None
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if not 0 < hop <= segment:
        raise ValueError(f"hop must be in (0, segment], got hop={hop}, segment={segment}")
    if w is None:
        pad = segment - hop
        w = ola_window(segment)
    n = x.shape[-1]
    total = n + 2 * pad
    n_seg = max(1, -(-(total - segment) // hop) + 1)
    padded_len = (n_seg - 1) * hop + segment
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    w = w.to(device)

    full = None
    streaming = sink is not None
    if not streaming:
        def sink(start: int, block: torch.Tensor) -> None:
            nonlocal full
            if full is None:
                full = torch.empty(*block.shape[:-1], n, device=block.device, dtype=block.dtype)
            full[..., start:start + block.shape[-1]] = block

    # acc / norm: padded positions [lo, hi) of the segments so far; [lo, done) is then finished.
    # Only the part still open (segment - hop samples) is carried to the next group.
    acc = norm = None
    lo = 0
    starts = [i * hop for i in range(n_seg)]
    for i in range(0, n_seg, batch):
        group = starts[i:i + batch]
        chunks = [segment_of(x, s - pad - context, segment + 2 * context) for s in group]
        chunks = chunks[0][None] if len(chunks) == 1 else torch.stack(chunks)
        y = fn(chunks)
        del chunks
        hi = group[-1] + segment
        carried = 0 if acc is None else acc.shape[-1]
        new_acc = torch.zeros(*y.shape[1:-1], hi - lo, device=device, dtype=torch.float32)
        new_norm = torch.zeros(hi - lo, device=device, dtype=torch.float32)
        if carried:
            new_acc[..., :carried] = acc
            new_norm[:carried] = norm
        acc, norm = new_acc, new_norm
        del new_acc, new_norm
        for j, s in enumerate(group):
            acc[..., s - lo:s - lo + segment] += y[j].float() * w
            norm[s - lo:s - lo + segment] += w
        del y
        done = starts[i + batch] if i + batch < n_seg else padded_len
        a, b = max(lo, pad), min(done, pad + n)   # finished and inside the signal
        if b > a:   # divided in place: these positions are final (the sink gets a view)
            sink(a - pad, acc[..., a - lo:b - lo].div_(norm[a - lo:b - lo]))
        acc, norm, lo = acc[..., done - lo:].clone(), norm[done - lo:].clone(), done
    if streaming:
        return None
    if full is None:  # n == 0: nothing was finished; an empty output of the right shape
        full = acc.new_zeros(*acc.shape[:-1], 0)
    return full
