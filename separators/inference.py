"""The one call the cache stage makes per track: a mixture array in, stems out, same length.

Everything a separator should not have to care about happens here: channel layout (mono is
duplicated to stereo), resampling to the model's rate and back (julius, the resampler demucs
uses), exact output length, no autograd, and the device.
"""
from __future__ import annotations

import numpy as np
import torch

from core.chunking import overlap_add
from core.errors import PipelineError
from separators.base import BLOCK_SECONDS, OVERLAP_SECONDS, Separator


def _resample(x: torch.Tensor, old: int, new: int) -> torch.Tensor:
    if old == new:
        return x
    import julius

    return julius.resample_frac(x, int(old), int(new))


def _fit(x: torch.Tensor, n: int) -> torch.Tensor:
    """Trim or zero-pad the last axis to exactly n samples."""
    m = x.shape[-1]
    if m > n:
        return x[..., :n]
    if m < n:
        return torch.nn.functional.pad(x, (0, n - m))
    return x




def block_layout(n: int, block: int, overlap: int) -> tuple[int, int]:
    """(segment, number of blocks) to cover n samples with equal blocks of at most `block`
    samples overlapping by `overlap`: the fewest blocks, shortened so the last one ends at n
    (up to k - 1 samples of padding), so the extra compute is (k - 1) * overlap."""
    k = -(-(n - overlap) // (block - overlap))
    return -(-(n + (k - 1) * overlap) // k), k


def separate_array(separator: Separator, mixture, rate: int, out=None,
                   block_seconds: float | None = BLOCK_SECONDS,
                   overlap_seconds: float = OVERLAP_SECONDS):
    """mixture [C, n] at `rate` -> stems [S, 2, n] float32 at `rate`, S = len(sources).

    C == 1 is duplicated to stereo; C > 2 is an error (no silent downmix). The mixture is
    resampled to `separator.sample_rate` and the stems back to `rate` with julius, then trimmed or
    zero-padded to exactly n samples. Runs under torch.inference_mode on separator.device.

    `mixture` is an array or anything sliced like one along time (a np.memmap, core.store's
    NpyFile); it is read a block at a time and copied, never modified. A mixture longer than
    `block_seconds` (None: never) is separated in blocks of at most that length, each through the
    same resample -> model -> resample path, cross-faded over `overlap_seconds` with
    core.chunking's flat-top window; memory is then a block's, whatever the track's length.
    A mixture no longer than one block is separated whole.

    out: an array-like [S, 2, n] to write the stems into (a float16 np.memmap, a store
    EntryWriter: values are cast by it), as they are finished; it is returned. Default: a new
    float32 array.
    """
    name = getattr(separator, "name", type(separator).__name__)
    if not hasattr(mixture, "shape") or not hasattr(mixture, "__getitem__"):
        mixture = np.asarray(mixture)
    if len(mixture.shape) != 2:
        raise PipelineError(f"{name}: mixture must be [channels, samples], got shape {tuple(mixture.shape)}")
    channels, n = mixture.shape
    if channels not in (1, 2):
        raise PipelineError(f"{name}: {channels}-channel audio is not supported (mono or stereo only)")
    if int(rate) != rate or rate <= 0:
        raise PipelineError(f"{name}: invalid sample rate {rate}")
    rate = int(rate)
    n_src = len(separator.sources)
    if out is not None and tuple(out.shape) != (n_src, 2, n):
        raise PipelineError(f"{name}: output array of shape {tuple(out.shape)}, expected {(n_src, 2, n)}")
    if n == 0:
        return np.zeros((n_src, 2, 0), dtype=np.float32) if out is None else out
    if block_seconds is not None and not block_seconds > 0:
        raise PipelineError(f"{name}: block_seconds must be > 0, got {block_seconds}")
    block = n if block_seconds is None else max(1, int(round(block_seconds * rate)))
    overlap = int(round(overlap_seconds * rate))
    if block < n and not 0 <= 3 * overlap <= block:
        raise PipelineError(f"{name}: overlap_seconds={overlap_seconds} must be in [0, block_seconds/3]")
    step = max(block, 1 << 16)
    for a in range(0, n, step):   # all of it before any work, a block at a time
        if not np.isfinite(mixture[:, a:a + step]).all():
            raise PipelineError(f"{name}: the mixture contains NaN or infinite samples")

    model_rate = int(separator.sample_rate)
    device = getattr(separator, "device", torch.device("cpu"))

    def run(x: torch.Tensor) -> torch.Tensor:
        """[C, m] -> [S, 2, m] float32 on the CPU: the whole path for one block."""
        m = x.shape[-1]
        x = x.to(device=device, dtype=torch.float32)
        if x.shape[0] == 1:
            x = torch.cat([x, x], dim=0)
        x = _resample(x, rate, model_rate)
        y = separator.separate(x)
        if y.dim() != 3 or y.shape[0] != n_src or y.shape[1] != 2:
            raise PipelineError(f"{name}: separate() returned shape {tuple(y.shape)}, expected "
                                f"({n_src}, 2, {x.shape[-1]})")
        y = _resample(y.float(), model_rate, rate)
        return _fit(y, m).cpu()

    # float16 outputs (the store's stems) are cast by torch: the same rounding as numpy's
    # astype, several times faster
    half = np.dtype(getattr(out, "dtype", np.float32)) == np.float16

    def put(start: int, y: torch.Tensor) -> None:
        out[:, :, start:start + y.shape[-1]] = (y.half() if half else y).numpy()

    with torch.inference_mode():
        if n <= block:
            # a copy: writable (torch refuses to share a read-only memmap), and the caller's
            # array is never touched
            x = torch.from_numpy(np.array(mixture[:, :n], dtype=np.float32, order="C"))
            y = run(x)
            if out is None:
                return y.numpy()
            put(0, y)
            return out

        if out is None:
            out = np.empty((n_src, 2, n), dtype=np.float32)
        segment, _ = block_layout(n, block, overlap)
        overlap_add(lambda c: run(c[0])[None], mixture, segment, window="flattop", overlap=overlap,
                    sink=put)
    return out

