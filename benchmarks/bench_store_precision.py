"""Benchmark: what the stem store's float16 rounding of base models' stems does to SDR.

Separates the MUSDB18-7 valid previews (14 real tracks x 7 s) with base models, then scores each
model's float32 estimates and the same estimates rounded to float16 (what `pipeline cache`
stores) with the project's exact museval SDR, side by side. Prints per model the largest
|difference| over all frames, over the track medians (museval's per-track number) and over the
final median of track medians per source, plus uSDR.

    .venv/bin/python benchmarks/bench_store_precision.py [--models umx-synth demucs-synth] [--root MUSDB18_7]

Imported estimates (`pipeline cache import`, `pipeline evaluate --estimates`) are stored without
this rounding (float32 or float64, as read), so they score exactly as museval does on the files.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def default_root() -> Path:
    return Path(os.environ.get("MUSDB18_7_ROOT") or REPO.parent / "shared/data/musdb18-7")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--root", type=Path, default=default_root())
    ap.add_argument("--models", nargs="+", default=["umx-synth", "demucs-synth"])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from core.datasets import open_dataset
    from core.metrics import framewise_sdr, median_over_tracks, track_median, usdr
    from separators.inference import separate_array
    from separators.registry import load_separator

    dataset = open_dataset(args.root)
    tracks = dataset.split("valid")
    print(f"{len(tracks)} valid tracks from {args.root}; models {', '.join(args.models)}")
    rows = []
    for spec in args.models:
        sep = load_separator(spec, offline=True, options={"niter": 0} if "umx" in spec else {})
        frames, medians, usdrs, t0 = [], [], [], time.perf_counter()
        for t in tracks:
            mixture, refs = t.audio()
            shared = [s for s in sep.sources if s in dataset.sources]
            refs = refs[[dataset.sources.index(s) for s in shared]]
            est32 = separate_array(sep, mixture, t.sample_rate)[[sep.sources.index(s) for s in shared]]
            est16 = est32.astype(np.float16)
            s32 = framewise_sdr(refs, est32, win=t.sample_rate, hop=t.sample_rate)
            s16 = framewise_sdr(refs, est16, win=t.sample_rate, hop=t.sample_rate)
            frames.append(np.abs(s32 - s16)[np.isfinite(s32) & np.isfinite(s16)])
            medians.append((track_median(s32), track_median(s16)))
            usdrs.append(np.abs(usdr(refs, est32) - usdr(refs, est16)))
        m32 = np.stack([m[0] for m in medians])
        m16 = np.stack([m[1] for m in medians])
        final = np.abs(median_over_tracks(m32) - median_over_tracks(m16))
        rows.append((sep.name, np.concatenate(frames).max(), np.nanmax(np.abs(m32 - m16)),
                     np.nanmax(final), np.max(usdrs), time.perf_counter() - t0,
                     median_over_tracks(m32).mean()))
    print()
    print("| model | SDR avg (float32) | max |ΔSDR| frame | max |ΔSDR| track median | "
          "max |ΔSDR| median of tracks | max |ΔuSDR| | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, frame, track, final, du, sec, avg in rows:
        print(f"| {name} | {avg:.2f} dB | {frame:.2e} dB | {track:.2e} dB | {final:.2e} dB | "
              f"{du:.2e} dB | {sec:.0f} |")


if __name__ == "__main__":
    main()
