"""Benchmark: museval's SDR vs core.metrics.framewise_sdr on a long real track.

Concatenates MUSDB18-7 valid previews into one SECONDS-long 4-source stereo track (estimates =
references + noise at about 10 dB SNR), then runs each method in its own fresh subprocess so its
peak memory (VmHWM, reset after loading) is its own: museval.evaluate with its defaults (1 s windows and hop) once,
framewise_sdr best of --repeat. Prints times, speed ratio, max |difference| in dB, NaN agreement,
and peak memory (whole process, and the increase over the process after loading the data).

    .venv/bin/python benchmarks/bench_sdr.py [--seconds 60] [--repeat 5] [--root MUSDB18_7]

The audio only lives in a temporary directory while the benchmark runs.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from goals import check, finish  # noqa: E402

SOURCES = ("drums", "bass", "other", "vocals")
RATE = 44100


def default_root() -> Path:
    return Path(os.environ.get("MUSDB18_7_ROOT") or REPO.parent / "shared/data/musdb18-7")


def build_track(root: Path, seconds: float, seed: int = 0):
    import musdb

    n, parts, names = int(seconds * RATE), [], []
    for track in musdb.DB(root=str(root), subsets="train", split="valid"):
        parts.append(np.stack([track.targets[s].audio.T for s in SOURCES]))
        names.append(track.name)
        if sum(p.shape[-1] for p in parts) >= n:
            break
    refs = np.concatenate(parts, axis=-1)[..., :n]
    if refs.shape[-1] < n:
        sys.exit(f"only {refs.shape[-1] / RATE:.1f} s of audio under {root}")
    rng = np.random.default_rng(seed)
    std = refs.std(axis=(1, 2), keepdims=True)
    ests = refs + 0.3 * std * rng.standard_normal(refs.shape)
    return refs, ests, names


def status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Linux: writing 5 to clear_refs resets the peak RSS (VmHWM), so the peak we read later is
    the call's, not the loading's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def measure(method: str, data: Path, repeat: int) -> dict:
    """Runs in the child: load, time, report peak memory."""
    refs, ests = np.load(data / "refs.npy"), np.load(data / "ests.npy")
    if method == "museval":
        import museval

        fn = lambda: museval.evaluate(np.moveaxis(refs, 1, 2), np.moveaxis(ests, 1, 2),  # noqa: E731
                                      win=RATE, hop=RATE)[0]
        repeat = 1
    else:
        from core.metrics import framewise_sdr

        fn = lambda: framewise_sdr(refs, ests, RATE, RATE)  # noqa: E731
    before = status_mib("VmRSS")
    if not reset_peak_rss():
        print("warning: cannot reset VmHWM; the peak includes loading the data", file=sys.stderr)
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        sdr = fn()
        times.append(time.perf_counter() - t0)
    peak = status_mib("VmHWM")
    np.save(data / f"{method}.npy", sdr)
    return {"seconds": min(times), "peak_rss_mib": peak, "extra_rss_mib": peak - before}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--root", type=Path, default=default_root())
    ap.add_argument("--measure", help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.data, args.repeat)))
        return

    from core.metrics import bsseval_peak_bytes

    refs, ests, names = build_track(args.root, args.seconds)
    print(f"track: {refs.shape[-1] / RATE:.1f} s, {refs.shape[0]} sources x {refs.shape[1]} channels, "
          f"{refs.dtype}, from {len(names)} MUSDB18-7 previews; estimates = refs + noise")
    n = refs.shape[-1]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        np.save(data / "refs.npy", refs)
        np.save(data / "ests.npy", ests)
        del refs, ests
        results = {}
        for method in ("framewise_sdr", "museval"):
            out = subprocess.run([sys.executable, __file__, "--measure", method, "--data", str(data),
                                  "--repeat", str(args.repeat)], check=True, capture_output=True, text=True)
            results[method] = json.loads(out.stdout.strip().splitlines()[-1])
        theirs, ours = np.load(data / "museval.npy"), np.load(data / "framewise_sdr.npy")

    same_nan = ours.shape == theirs.shape and np.array_equal(np.isnan(ours), np.isnan(theirs))
    finite = np.isfinite(theirs) & np.isfinite(ours)
    max_diff = float(np.abs(ours[finite] - theirs[finite]).max())
    m, f = results["museval"], results["framewise_sdr"]
    print(f"\n{'':24}{'museval.evaluate':>18}{'framewise_sdr':>16}")
    print(f"{'time (s)':24}{m['seconds']:>18.3f}{f['seconds']:>16.4f}")
    print(f"{'peak RSS (MiB)':24}{m['peak_rss_mib']:>18.0f}{f['peak_rss_mib']:>16.0f}")
    print(f"{'peak over loaded (MiB)':24}{m['extra_rss_mib']:>18.0f}{f['extra_rss_mib']:>16.0f}")
    ratio = m['seconds'] / f['seconds']
    print(f"\nspeed ratio: {ratio:.0f}x   (goal >= 50x) -> {check(ratio >= 50, 'framewise_sdr >= 50x museval')}")
    print(f"max |SDR difference|: {max_diff:.2e} dB over {int(finite.sum())} frames; "
          f"shape {ours.shape}, same NaN frames: {same_nan} (goal: same NaN frames, <= 1e-6 dB) -> "
          f"{check(same_nan and max_diff <= 1e-6, 'framewise_sdr equals museval')}")
    print(f"full_bsseval's per-worker memory estimate for this track: {bsseval_peak_bytes(n) / 2**20:.0f} MiB "
          f"(core.metrics.bsseval_peak_bytes; compare museval's peak RSS)")
    finish()


if __name__ == "__main__":
    main()
