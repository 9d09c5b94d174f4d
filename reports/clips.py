"""Compressed audio excerpts for the listening report: which part of a track, encoded how.

Every clip is Opus in WebM (the one Opus container that Chrome, Firefox and Safari >= 17 all
play; Safari plays no Ogg), encoded by the ffmpeg binary at a constrained bitrate, so a
report's size is known before anything is encoded: at most seconds of audio x
`bytes_per_second(kbps)` (kbit/s x 125, plus 9 % for WebM framing and VBR overshoot; white
noise, the worst case, measures +7.6 %). At the defaults (10 s excerpts, 48 kbit/s: 6.54 kB/s) a
report over 50 tracks x 8 systems x 4 sources holds 50 x (1 mixture + 4 references + 32
estimates) = 1850 clips = 18 500 s of audio = at most 121 MB; whole tracks (shorter than 30 s)
can be up to 3x longer, and then the bitrate is lowered to fit the budget (150 MB by default,
never below 24 kbit/s).

Clips are named by a hash of their samples, so identical clips (the "best per source" copying a
base model's stem, the mixture oracle copying the mixture) are stored once, and indexed by a key
of everything they depend on, so rebuilding a report encodes only what changed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.store import read_json, write_json_atomic

EXCERPT_S = 10.0        # seconds of each track around its loudest part
WHOLE_BELOW_S = 30.0    # tracks shorter than this are played whole
KBPS = 48               # Opus stereo at 48 kbit/s: transparent enough to hear separation artefacts
MIN_KBPS = 24           # the budget never pushes the bitrate below this
MAX_MB = 150.0          # the default size budget of a report's audio
OVERHEAD = 1.09         # WebM blocks and headers, VBR overshoot: measured 1.076 on white noise
EXTENSION = ".webm"
INDEX = "index.json"


def bytes_per_second(kbps: int = KBPS) -> float:
    """The size of one second of one clip, container included (an upper bound for constrained VBR)."""
    return kbps * 125 * OVERHEAD


def codec_args(kbps: int) -> list[str]:
    # compression_level 5 halves the encoding time of the default 10 at no audible cost at 48k
    return ["-c:a", "libopus", "-b:a", f"{kbps}k", "-vbr", "constrained", "-compression_level", "5"]


def excerpt_window(mixture: np.ndarray, rate: int, excerpt: float = EXCERPT_S,
                   whole_below: float = WHOLE_BELOW_S) -> tuple[int, int]:
    """(start, length) in samples: the `excerpt` seconds of highest mixture energy, or the whole
    track when it is shorter than `whole_below` seconds or `excerpt` is 0."""
    n = mixture.shape[-1]
    length = int(round(excerpt * rate))
    if excerpt <= 0 or n < whole_below * rate or length >= n:
        return 0, n
    block = max(1, rate // 10)                       # 0.1 s resolution is plenty for "loudest"
    blocks = n // block
    energy = np.square(np.asarray(mixture[..., :blocks * block], dtype=np.float64))
    energy = energy.reshape(-1, blocks, block).sum(axis=(0, 2))
    width = max(1, length // block)
    sums = np.concatenate([[0.0], np.cumsum(energy)])
    window = sums[width:] - sums[:-width]            # energy of the window starting at each block
    start = int(np.argmax(window)) * block
    return min(start, n - length), length


def fit_kbps(seconds: float, max_mb: float, kbps: int = KBPS) -> int:
    """The bitrate that keeps `seconds` of clips under `max_mb` megabytes (never below MIN_KBPS)."""
    if seconds * bytes_per_second(kbps) <= max_mb * 1e6:
        return kbps
    return min(kbps, max(MIN_KBPS, int(max_mb * 1e6 / (seconds * bytes_per_second(1)))))


def require_ffmpeg(where) -> str:
    exe = shutil.which("ffmpeg")
    if exe is None:
        raise PipelineError(f"{where}: the listening report encodes audio with the 'ffmpeg' binary, "
                            f"which is not on PATH (Debian/Ubuntu: apt-get install ffmpeg; or "
                            f"skip the page with --no-html)")
    return exe


def encode_opus(audio: np.ndarray, rate: int, path: Path, kbps: int = KBPS) -> None:
    """[channels, n] float -> an Opus file in WebM, written atomically."""
    audio = np.ascontiguousarray(np.asarray(audio, dtype="<f4").T)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    cmd = [require_ffmpeg(path), "-nostdin", "-v", "error", "-y", "-f", "f32le", "-ar", str(rate),
           "-ac", str(audio.shape[1]), "-i", "pipe:0", *codec_args(kbps), "-f", "webm", str(tmp)]
    proc = subprocess.run(cmd, input=audio.tobytes(), capture_output=True)
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        reason = proc.stderr.decode(errors="replace").strip().splitlines()
        raise PipelineError(f"{path}: ffmpeg could not encode the clip ({reason[-1] if reason else proc.returncode})")
    os.replace(tmp, path)


class ClipFolder:
    """The report's audio/ folder: clips by content hash, and an index {clip key: file name}."""

    def __init__(self, folder: Path, kbps: int = KBPS, workers: int | None = None):
        self.folder, self.kbps = Path(folder), kbps
        require_ffmpeg(self.folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        index = self.folder / INDEX
        self.index = {k: v for k, v in (read_json(index) if index.exists() else {}).items()
                      if (self.folder / v).exists()}
        self.used: set[str] = set()
        self.encoded = 0
        self._pending: dict[str, object] = {}
        self._pool = ThreadPoolExecutor(max_workers=workers or min(2, os.cpu_count() or 1))

    def key(self, *parts) -> str:
        """A clip key: whatever the samples depend on, plus how they are encoded."""
        text = repr((parts, codec_args(self.kbps)))
        return hashlib.sha256(text.encode()).hexdigest()[:24]

    def get(self, key: str) -> str | None:
        name = self.index.get(key)
        if name:
            self.used.add(name)
        return name

    def add(self, key: str, audio: np.ndarray, rate: int) -> str:
        """Encode `audio` [channels, n] unless the same samples are already there; its file name."""
        audio = np.array(audio, dtype=np.float32)   # a copy: the whole track it came from may go
        digest = hashlib.sha256(repr((audio.shape, rate, codec_args(self.kbps))).encode())
        digest.update(np.ascontiguousarray(audio).tobytes())
        name = f"{digest.hexdigest()[:16]}{EXTENSION}"
        if not (self.folder / name).exists() and name not in self._pending:
            self._pending[name] = self._pool.submit(encode_opus, audio, rate, self.folder / name, self.kbps)
            self.encoded += 1
        self.index[key] = name
        self.used.add(name)
        return name

    def cached_json(self, key: str, compute):
        """A small derived result (e.g. mixing weights) kept beside the clips under its key."""
        name, path = f"{key}.json", self.folder / f"{key}.json"
        self.used.add(name)
        if path.exists():
            return read_json(path)
        value = compute()
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(value, separators=(",", ":")))   # compact: W_k can be large
        os.replace(tmp, path)
        return value

    def save_index(self) -> None:
        """Safe at any time: entries whose file is not (yet) there are dropped when read."""
        write_json_atomic(self.folder / INDEX, self.index)

    def flush(self) -> None:
        """Wait for the encoders (raising their errors) and save the index."""
        for future in self._pending.values():
            future.result()
        self._pending.clear()
        self.save_index()

    def shutdown(self) -> None:
        # an interrupted build finishes the clips under way and drops the queued ones
        self._pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> int:
        """Flush, delete the files this report no longer uses; returns the folder's size in bytes."""
        self.flush()
        self.shutdown()
        for path in self.folder.iterdir():
            if path.is_file() and path.name != INDEX and path.name not in self.used:
                path.unlink()
        self.index = {k: v for k, v in self.index.items() if v in self.used}
        write_json_atomic(self.folder / INDEX, self.index)
        return sum(p.stat().st_size for p in self.folder.iterdir() if p.is_file())
