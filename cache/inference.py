"""The one call the cache stage makes per track: a mixture array in, stems out, same length.

Everything a separator should not have to care about happens here: channel layout (mono is
duplicated to stereo), resampling to the model's rate and back (julius, the resampler demucs
uses), exact output length, no autograd, and the device.
"""
from __future__ import annotations

import numpy as np
import torch

from cache.base import Separator
from pipeline.errors import PipelineError


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


def separate_array(separator: Separator, mixture: np.ndarray, rate: int) -> np.ndarray:
    """mixture [C, n] float32 at `rate` -> stems [S, 2, n] float32 at `rate`, S = len(sources).

    C == 1 is duplicated to stereo; C > 2 is an error (no silent downmix). The mixture is
    resampled to `separator.sample_rate` and the stems back to `rate` with julius, then trimmed or
    zero-padded to exactly n samples. Runs under torch.inference_mode on separator.device.
    """
    name = getattr(separator, "name", type(separator).__name__)
    mixture = np.asarray(mixture)
    if mixture.ndim != 2:
        raise PipelineError(f"{name}: mixture must be [channels, samples], got shape {mixture.shape}")
    channels, n = mixture.shape
    if channels == 1:
        mixture = np.concatenate([mixture, mixture], axis=0)
    elif channels != 2:
        raise PipelineError(f"{name}: {channels}-channel audio is not supported (mono or stereo only)")
    if int(rate) != rate or rate <= 0:
        raise PipelineError(f"{name}: invalid sample rate {rate}")
    rate = int(rate)
    n_src = len(separator.sources)
    if n == 0:
        return np.zeros((n_src, 2, 0), dtype=np.float32)
    if not np.isfinite(mixture).all():
        raise PipelineError(f"{name}: the mixture contains NaN or infinite samples")

    model_rate = int(separator.sample_rate)
    device = getattr(separator, "device", torch.device("cpu"))
    with torch.inference_mode():
        x = torch.from_numpy(np.ascontiguousarray(mixture, dtype=np.float32)).to(device)
        x = _resample(x, rate, model_rate)
        y = separator.separate(x)
        if y.dim() != 3 or y.shape[0] != n_src or y.shape[1] != 2:
            raise PipelineError(f"{name}: separate() returned shape {tuple(y.shape)}, expected "
                                f"({n_src}, 2, {x.shape[-1]})")
        y = _resample(y.float(), model_rate, rate)
        y = _fit(y, n)
        return y.cpu().numpy().astype(np.float32, copy=False)
