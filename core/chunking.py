"""The one implementation of segmenting + weighted overlap-add used by every stage.

Base separators without chunking of their own (Open-Unmix, X-UMX) and the learned mixers both
process a long signal as overlapping segments and cross-fade them back together; the cache stage
processes long tracks in blocks the same way (`separators.inference.separate_array`, flat-top window).
Demucs models use demucs's own `apply_model` chunking inside each block.

Finished output samples can be streamed to a `sink` instead of being collected, so a long signal
costs memory for `batch` segments only, not for the whole output.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import torch

WINDOWS = ("hann", "flattop", "msst", "msst-demucs", "uvr-mdx")


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


def segment_offsets(length: int, segment: int, shift: int) -> list[int]:
    """Starts of the segments covering a track; the last may run past the end (padded)."""
    count = 1 if length <= segment else math.ceil((length - segment) / shift) + 1
    # With shift > segment the count overshoots; a segment must start inside the track.
    return [i * shift for i in range(count) if i * shift < length]


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


def _reflect_index(idx: np.ndarray, n: int) -> np.ndarray:
    """Positions of a reflect-padded signal (torch's 'reflect': the edge sample not repeated) in
    the signal itself."""
    period = 2 * (n - 1)
    idx = np.abs(idx) % period if period else np.zeros_like(idx)
    return np.where(idx >= n, period - idx, idx)


def reflect_segment_of(x, start: int, length: int, pad: int) -> torch.Tensor:
    """Samples [start, start + length) of x reflect-padded by `pad` at both ends (clipped to that
    padded signal), read from x (a tensor or an array) without padding the whole signal."""
    n = x.shape[-1]
    stop = min(start + length, n + 2 * pad)
    idx = _reflect_index(np.arange(start, stop) - pad, n)
    if len(idx) == 0:
        return segment_of(x, 0, 0)
    lo, hi = int(idx.min()), int(idx.max()) + 1
    piece = segment_of(x, lo, hi - lo)
    return piece[..., torch.from_numpy(idx - lo)]


def linear_fade_window(segment: int, fade: int, device=None) -> torch.Tensor:
    """MSST's `_getWindowingArray`: linear ramps 0 -> 1 and 1 -> 0 of `fade` samples."""
    w = torch.ones(segment, device=device)
    if fade > 0:
        w[-fade:] = torch.linspace(1, 0, fade, device=device)
        w[:fade] = torch.linspace(0, 1, fade, device=device)
    return w


class _Plan:
    """Where segments start, what each one reads and how much each output sample weighs."""

    def __init__(self, n: int, segment: int, hop: int, pad: int, starts: list[int],
                 padded_len: int):
        self.n, self.segment, self.hop, self.pad = n, segment, hop, pad
        self.starts, self.padded_len = starts, padded_len

    def read(self, x, start: int) -> torch.Tensor:
        return segment_of(x, start - self.pad, self.segment)

    def weights(self, group: list[int]) -> list[torch.Tensor]:
        raise NotImplementedError


class _WindowPlan(_Plan):
    """Hann / flat-top: one fixed window, zero padding; each segment read with `context` samples
    more on both sides."""

    def __init__(self, window: torch.Tensor, context: int = 0, **kw):
        super().__init__(**kw)
        self.window, self.context = window, context

    def read(self, x, start: int) -> torch.Tensor:
        return segment_of(x, start - self.pad - self.context, self.segment + 2 * self.context)

    def weights(self, group):
        return [self.window] * len(group)


class _MSSTPlan(_Plan):
    """Music-Source-Separation-Training's `demix` (utils/model_utils.py, generic mode), sample
    for sample: hop = segment // num_overlap; linear fades of segment // 10; the signal
    reflect-padded by `segment - hop` at both ends when longer than twice that; segments start
    every hop while inside the padded signal, a short last one reflect-padded when longer than
    half a segment (else zero-padded), each contributing only its real samples; the fade-in
    dropped for a batch made of the first segment alone and the fade-out for the whole last batch
    (MSST decides per batch). Samples no window covers are 0 (MSST's nan_to_num).
    fades=False is MSST's "demucs" mode (htdemucs): a plain average, no padding but zeros."""

    def __init__(self, n: int, segment: int, hop: int, fades: bool = True):
        border = segment - hop
        pad = border if (fades and n > 2 * border and border > 0) else 0
        self.fades = fades
        padded_len = n + 2 * pad
        super().__init__(n=n, segment=segment, hop=hop, pad=pad,
                         starts=list(range(0, padded_len, hop)), padded_len=padded_len)
        self.fade = segment // 10
        self.window = linear_fade_window(segment, self.fade)

    def read(self, x, start: int) -> torch.Tensor:
        part = reflect_segment_of(x, start, self.segment, self.pad) if self.pad else \
            segment_of(x, start, min(self.segment, self.n - start))
        m = part.shape[-1]
        if m < self.segment:
            mode = "reflect" if self.fades and m > self.segment // 2 else "constant"
            part = torch.nn.functional.pad(part, (0, self.segment - m), mode=mode)
        return part

    def weights(self, group):
        w = self.window.clone()
        after = group[-1] + self.hop          # MSST's `i` once the batch is full
        if not self.fades:
            w = torch.ones(self.segment)
        elif after - self.hop == 0:
            w[:self.fade] = 1
        elif after >= self.padded_len and self.fade:
            w[-self.fade:] = 1
        out = []
        for s in group:
            real = min(self.segment, self.padded_len - s)
            out.append(w if real == self.segment else torch.cat([w[:real], w.new_zeros(self.segment - real)]))
        return out


class _UVRMDXPlan(_Plan):
    """UVR's MDX-Net chunking as audio-separator's MDXSeparator.demix runs it: `trim` zeros in
    front, zeros after the end up to a whole number of `segment - 2 * trim` plus `trim`, chunks
    every hop; each chunk weighted by a symmetric Hann window as long as its part inside that
    padded signal (np.hanning), the rest of a short last chunk zeros."""

    def __init__(self, n: int, segment: int, hop: int, trim: int):
        gen = segment - 2 * trim
        if gen <= 0:
            raise ValueError(f"uvr-mdx: segment {segment} must exceed 2 x trim ({trim})")
        padded_len = n + trim + gen + trim - n % gen
        super().__init__(n=n, segment=segment, hop=hop, pad=trim,
                         starts=list(range(0, padded_len, hop)), padded_len=padded_len)

    def weights(self, group):
        out = []
        for s in group:
            real = min(self.segment, self.padded_len - s)
            w = torch.hann_window(real, periodic=False, dtype=torch.float64).float()
            out.append(torch.cat([w, w.new_zeros(self.segment - real)]))
        return out


def overlap_add(
    fn: Callable[[torch.Tensor], torch.Tensor],
    x,
    segment: int,
    hop: int | None = None,
    batch: int = 1,
    *,
    window: str = "hann",
    overlap: int | None = None,
    trim: int = 0,
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
    window="msst": Music-Source-Separation-Training's chunked inference (see `_MSSTPlan`) with
    hop = segment // num_overlap (`hop` required); `batch` is MSST's inference.batch_size, which
    changes which windows lose their fades. window="msst-demucs": MSST's htdemucs mode (a plain
    average of the segments' outputs, zero padding). window="uvr-mdx": UVR's MDX-Net chunking
    (see `_UVRMDXPlan`; `trim` = n_fft // 2).
    Either way the result is divided by the summed window, so identity `fn` gives back `x` up to
    float rounding, the ends included, and segment borders carry no clicks.

    context: `fn` also sees this many samples of `x` on each side of its segment (zeros outside
    `x`): it gets [B, C, context + segment + context] and still returns the `segment` samples in
    the middle. For a computation with a receptive field (an STFT frame straddling a segment
    border), so that each segment's output is exact up to its borders.
    """
    if window not in WINDOWS:
        raise ValueError(f"window must be one of {WINDOWS}, got {window!r}")
    n = x.shape[-1]
    if window == "flattop":
        if overlap is None:
            raise ValueError("window='flattop' needs `overlap` (samples)")
        if hop is not None and hop != segment - overlap:
            raise ValueError(f"window='flattop': hop is segment - overlap = {segment - overlap}, got {hop}")
        hop = segment - overlap
        w, pad = flattop_window(segment, overlap), 0
    elif overlap is not None:
        raise ValueError("`overlap` is for window='flattop'; the other windows take `hop`")
    elif window in ("msst", "msst-demucs", "uvr-mdx"):
        if hop is None:
            raise ValueError(f"window='{window}' needs `hop`")
    else:
        hop = hop or segment // 4
        w, pad = ola_window(segment), segment - hop
    if context < 0:
        raise ValueError(f"context must be >= 0, got {context}")
    if context and window not in ("hann", "flattop"):
        raise ValueError(f"context is for window='hann' or 'flattop', not {window!r}")
    if not 0 < hop <= segment:
        raise ValueError(f"hop must be in (0, segment], got hop={hop}, segment={segment}")
    if window in ("msst", "msst-demucs"):
        plan: _Plan = _MSSTPlan(n, segment, hop, fades=window == "msst")
    elif window == "uvr-mdx":
        plan = _UVRMDXPlan(n, segment, hop, trim=trim)
    else:
        total = n + 2 * pad
        n_seg = max(1, -(-(total - segment) // hop) + 1)
        plan = _WindowPlan(w, n=n, segment=segment, hop=hop, pad=pad,
                           starts=[i * hop for i in range(n_seg)],
                           padded_len=(n_seg - 1) * hop + segment, context=context)
    return _accumulate(fn, x, plan, batch, sink)


def _accumulate(fn, x, plan: _Plan, batch: int, sink) -> torch.Tensor | None:
    """The shared loop: run `fn` on `batch` segments at a time, add the weighted outputs, hand on
    the samples no later segment touches, divided by their summed weights."""
    n, segment, pad, starts = plan.n, plan.segment, plan.pad, plan.starts
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")

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
    n_seg = len(starts)
    for i in range(0, n_seg, batch):
        group = starts[i:i + batch]
        chunks = [plan.read(x, s) for s in group]
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
        for j, (s, w) in enumerate(zip(group, plan.weights(group))):
            w = w.to(device)
            acc[..., s - lo:s - lo + segment] += y[j].float() * w
            norm[s - lo:s - lo + segment] += w
        del y
        done = starts[i + batch] if i + batch < n_seg else max(plan.padded_len, hi)
        a, b = max(lo, pad), min(done, pad + n)   # finished and inside the signal
        if b > a:   # divided in place: these positions are final (the sink gets a view)
            block = acc[..., a - lo:b - lo].div_(norm[a - lo:b - lo])
            sink(a - pad, block.nan_to_num_(0.0))
        acc, norm, lo = acc[..., done - lo:].clone(), norm[done - lo:].clone(), done
    if streaming:
        return None
    if full is None:  # n == 0: nothing was finished; an empty output of the right shape
        full = acc.new_zeros(*acc.shape[:-1], 0)
    return full
