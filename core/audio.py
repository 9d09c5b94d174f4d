"""Audio I/O: soundfile for WAV/FLAC, julius for resampling, and the checks that turn bad files
into one-line errors naming the file."""
from __future__ import annotations

import os
import struct
from pathlib import Path

import numpy as np
import soundfile as sf

from core.errors import fail

AUDIO_EXTENSIONS = (".wav", ".flac")


def _check_wav_truncated(path: Path) -> None:
    """libsndfile quietly reads a WAV whose data chunk is cut short; we refuse it."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(12)
        if len(head) < 12 or head[:4] not in (b"RIFF", b"RF64") or head[8:12] != b"WAVE":
            return  # not a RIFF WAV; soundfile decides
        if head[:4] == b"RF64":
            return  # 64-bit sizes live in the ds64 chunk; trust libsndfile
        pos = 12
        while pos + 8 <= size:
            f.seek(pos)
            cid, csize = struct.unpack("<4sI", f.read(8))
            if cid == b"data":
                if pos + 8 + csize > size:
                    raise fail(path, f"truncated WAV file (data chunk declares {csize} bytes, "
                                     f"{size - pos - 8} present)")
                return
            pos += 8 + csize + (csize & 1)
        raise fail(path, "WAV file has no data chunk (truncated or not audio)")


def audio_info(path: str | Path) -> tuple[int, int, int]:
    """(sample_rate, frames, channels) from the header, with the file named on any error."""
    path = Path(path)
    if not path.exists():
        raise fail(path, "file not found")
    if path.suffix.lower() == ".wav":
        _check_wav_truncated(path)
    try:
        info = sf.info(str(path))
    except Exception as e:
        raise fail(path, f"not a readable audio file ({_reason(e)})") from None
    if info.frames <= 0:
        raise fail(path, "empty audio (0 samples)")
    return int(info.samplerate), int(info.frames), int(info.channels)


def _reason(e: Exception) -> str:
    return str(e).splitlines()[0].strip() or type(e).__name__


def read_audio(path: str | Path, start: int = 0, frames: int | None = None,
               dtype: str = "float32") -> tuple[np.ndarray, int]:
    """Read [channels, samples] (float32, or `dtype`) and the sample rate; `start`/`frames` read
    a chunk."""
    path = Path(path)
    rate, total, _ = audio_info(path)
    try:
        data, rate = sf.read(str(path), start=start, frames=-1 if frames is None else frames,
                             dtype=dtype, always_2d=True)
    except Exception as e:
        raise fail(path, f"cannot decode audio ({_reason(e)})") from None
    if data.shape[0] == 0:
        raise fail(path, "empty audio (0 samples)" if total == 0 else f"no samples at offset {start}")
    check_finite(data, path)
    return np.ascontiguousarray(data.T), int(rate)


def check_finite(x: np.ndarray, where) -> None:
    finite = np.isfinite(x)
    if not finite.all():
        idx = np.unravel_index(np.flatnonzero(~finite.reshape(-1))[0], x.shape)
        at = f"channel {idx[-2]}, sample {idx[-1]}" if x.ndim >= 2 else f"sample {idx[-1]}"
        raise fail(where, f"contains NaN or infinite samples (first at {at})")


def to_stereo(x: np.ndarray, where="audio") -> np.ndarray:
    """[C, n] -> [2, n]: mono is duplicated; more than two channels is an error, not a guess."""
    if x.ndim != 2:
        raise fail(where, f"expected [channels, samples], got shape {x.shape}")
    if x.shape[0] == 1:
        return np.repeat(x, 2, axis=0)
    if x.shape[0] != 2:
        raise fail(where, f"has {x.shape[0]} channels; only mono and stereo are supported")
    return x


def resample(x: np.ndarray, rate_from: int, rate_to: int) -> np.ndarray:
    """Band-limited resampling along the last axis (julius, as demucs uses)."""
    if rate_from == rate_to:
        return x
    import julius
    import torch

    y = julius.resample_frac(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)),
                             int(rate_from), int(rate_to))
    return y.numpy()


def write_audio(path: str | Path, x: np.ndarray, rate: int, overwrite: bool = False,
                subtype: str | None = None) -> None:
    """Write [channels, samples] atomically; an existing file is kept unless `overwrite`."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise fail(path, "already exists; pass --force to overwrite")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.tmp-{os.getpid()}{path.suffix}")
    if subtype is None:
        subtype = "FLOAT" if path.suffix.lower() == ".wav" else "PCM_24"
    sf.write(str(tmp), np.ascontiguousarray(np.asarray(x, dtype=np.float32).T), int(rate),
             subtype=subtype)
    os.replace(tmp, path)
