"""Benchmark: more training audio (remixes) is streamed by the fitting stages - peak anonymous
memory does not grow with the number of training tracks.

Set-up (a temporary store unless --work): dataset `base`, --tracks tracks (80) x --seconds (6.8)
s of stereo audio at 44.1 kHz with --models (3) members' stems (references + noise, float16 as the
cache stores them), and dataset `more`, (--scale - 1) x as many tracks (560 at 8x), each a
complete store entry of its own (manifest, audio, stems) whose arrays are hard links to the base
tracks' files: what is held in memory depends on the number and length of the tracks read, not on
the samples, and the links keep the disk cost at that of the base tracks. Only --distinct (8)
tracks have distinct audio.

Each measurement runs in a fresh subprocess, which the parent samples every 20 ms in
/proc/PID/status for RssAnon, the anonymous resident memory (heap: numpy and torch arrays,
Python objects), not the file-backed pages of memory maps or the page cache, and keeps the peak:

    conv1x1     train-mixer --arch conv1x1 --preset cpu, 1 epoch over every segment (26 input
                channels: mixture + 3 members x 4 sources x stereo), the last epoch kept
    mdx-mixer   train-mixer --arch mdx-mixer --preset demo, 1 epoch capped at --mdx-segments
                segments (its index still covers every track)
    blend       the blend search (step 0.05, museval objective) on every track
    select      select-models --by conv1x1 (per-frame Gram matrices of all 26 + 8 channels)
    band-blend  the band-blend search (8 mel bands, step 0.05); --band-blend, it takes longest

at 1x (`base` alone) and at --scale x (`base` plus `more` as extra_data; with --layout one, a
single dataset of all the tracks, which code without extra_data can run too: --code DIR runs the
children on another checkout). Goal: the peak at --scale x is at most 10 % (+ 32 MiB) above 1x.

    .venv/bin/python benchmarks/bench_stream.py [--scale 8] [--band-blend] [--layout extra|one]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from goals import check, finish  # noqa: E402

RATE = 44100
SOURCES = ("drums", "bass", "other", "vocals")
MIB = 1 << 20


def build_store(root: Path, tracks: int, seconds: float, models: int, scale: int, distinct: int,
                layout: str) -> dict:
    """The datasets of the set-up; returns {"base": id, "more": id or None, "all": id or None}."""
    from core.store import MANIFEST, StemStore, TrackEntry

    store = StemStore(root)
    n = int(round(seconds * RATE))
    keys = [f"member{m}" for m in range(models)]
    for k in keys:
        store.write_model_info(k, {"key": k, "name": k, "sources": list(SOURCES)})
    rng = np.random.default_rng(0)
    originals = []
    for i in range(distinct):
        t = TrackEntry(f"orig{i:03d}", "train", "train", n)
        refs = (0.1 * rng.standard_normal((4, 2, n))).astype(np.float32)
        store.write_track("orig", t, refs.sum(0), refs, {})
        for k in keys:
            store.write_stems(k, "orig", t, (refs + 0.05 * rng.standard_normal(refs.shape)), {})
        originals.append(t)

    def dataset(ds: str, count: int, prefix: str) -> None:
        entries = [TrackEntry(f"{prefix}{i:04d}", "train", "train", n) for i in range(count)]
        store.write_dataset_info(ds, {"id": ds, "sources": list(SOURCES), "sample_rate": RATE,
                                      "tracks": [{"name": t.name, "subset": "train",
                                                  "split": "train", "length": n} for t in entries]})
        for i, t in enumerate(entries):
            src = originals[i % distinct]
            pairs = [(store.track_dir("orig", src), store.track_dir(ds, t), "audio.npy")]
            pairs += [(store.stems_dir(k, "orig", src), store.stems_dir(k, ds, t), "stems.npy")
                      for k in keys]
            for a, b, array in pairs:
                if (b / MANIFEST).exists():
                    continue
                b.mkdir(parents=True, exist_ok=True)
                os.link(a / array, b / array)
                manifest = json.loads((a / MANIFEST).read_text())
                (b / MANIFEST).write_text(json.dumps({**manifest, "name": t.name, "track": t.name}))

    if layout == "one":
        dataset("base", tracks, "t")
        dataset("all", tracks * scale, "t")
        return {"base": "base", "more": None, "all": "all", "keys": keys}
    dataset("base", tracks, "t")
    dataset("more", tracks * (scale - 1), "r")
    return {"base": "base", "more": "more", "all": None, "keys": keys}


CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from core.store import StemStore
what, store_root, job = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
store = StemStore(store_root)
extra = {"extra_data": job["extra"]} if job["extra"] else {}
t0 = time.perf_counter()
if what in ("conv1x1", "mdx-mixer"):
    from mixer.train import train_mixer
    options = dict(preset="cpu", epochs=1, select="last") if what == "conv1x1" else dict(
        preset="demo", epochs=1, select="last", max_segments_per_epoch=job["mdx_segments"])
    train_mixer(store, job["dataset"], job["keys"], what, job["run"], device="cpu",
                progress=False, **options, **extra)
elif what in ("blend", "band-blend"):
    from mixer import methods
    methods.fit(store, job["dataset"], job["keys"], what, None,
                {"split": "train", "step": 0.05, **extra}, progress=False)
else:
    from mixer.select import select_models
    select_models(store, job["dataset"], job["keys"], by="conv1x1", split="train",
                  progress=False, log=lambda s: None, **extra)
print(json.dumps({"seconds": time.perf_counter() - t0}))
"""


def anon_kib(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def measure(what: str, store: Path, job: dict, code: Path, threads: int) -> dict:
    """Run one fit in a child; (peak RssAnon MiB, seconds, CPU seconds of the child)."""
    env = {**os.environ, "PYTHONPATH": str(code), "OMP_NUM_THREADS": str(threads)}
    t0 = time.perf_counter()
    before = os.times()
    proc = subprocess.Popen([sys.executable, "-c", CHILD, what, str(store), json.dumps(job),
                             str(threads)], env=env, stdout=subprocess.PIPE, text=True)
    peak = [0]

    def sample():
        while proc.poll() is None:
            v = anon_kib(proc.pid)
            if v:
                peak[0] = max(peak[0], v)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    out, _ = proc.communicate()
    sampler.join()
    after = os.times()
    if proc.returncode:
        raise SystemExit(f"{what} failed (exit {proc.returncode})")
    cpu = (after.children_user - before.children_user) + (after.children_system - before.children_system)
    return {"peak_mib": peak[0] / 1024, "wall": time.perf_counter() - t0, "cpu": cpu,
            "inner": json.loads(out.strip().splitlines()[-1])["seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, help="keep the store here (default: a temporary folder)")
    ap.add_argument("--tracks", type=int, default=80)
    ap.add_argument("--seconds", type=float, default=299880 / RATE)
    ap.add_argument("--models", type=int, default=3)
    ap.add_argument("--scale", type=int, default=8)
    ap.add_argument("--distinct", type=int, default=8)
    ap.add_argument("--mdx-segments", type=int, default=400)
    ap.add_argument("--layout", choices=("extra", "one"), default="extra")
    ap.add_argument("--band-blend", action="store_true")
    ap.add_argument("--only", nargs="*", help="measure only these (conv1x1 mdx-mixer blend select band-blend)")
    ap.add_argument("--code", type=Path, default=REPO, help="checkout the children import")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    tmp = None
    if args.work is None:
        tmp = tempfile.TemporaryDirectory(prefix="bench-stream-")
        args.work = Path(tmp.name)
    t0 = time.perf_counter()
    d = build_store(args.work / "store", args.tracks, args.seconds, args.models, args.scale,
                    args.distinct, args.layout)
    print(f"set-up: {args.tracks} + {args.tracks * (args.scale - 1)} tracks x {args.seconds:.2f} s, "
          f"{args.models} members ({time.perf_counter() - t0:.0f} s); children import {args.code}; "
          f"load average {os.getloadavg()[0]:.1f}", flush=True)
    whats = args.only or (["conv1x1", "mdx-mixer", "blend", "select"]
                          + (["band-blend"] if args.band_blend else []))
    rows = []
    for what in whats:
        results = {}
        for scale in (1, args.scale):
            if scale == 1:
                job = {"dataset": d["base"], "extra": []}
            elif args.layout == "one":
                job = {"dataset": d["all"], "extra": []}
            else:
                job = {"dataset": d["base"], "extra": [d["more"]]}
            job.update(keys=d["keys"], run=str(args.work / "runs" / f"{what}-{scale}x"),
                       mdx_segments=args.mdx_segments)
            r = measure(what, args.work / "store", job, args.code, args.threads)
            results[scale] = r
            print(f"  {what:<10} {scale}x: peak anonymous {r['peak_mib']:7.0f} MiB, "
                  f"{r['wall']:6.1f} s wall, {r['cpu']:6.1f} s CPU (load {os.getloadavg()[0]:.1f})",
                  flush=True)
        small, big = results[1]["peak_mib"], results[args.scale]["peak_mib"]
        ok = big <= 1.10 * small + 32
        rows.append((what, small, big))
        print(f"  {what:<10} {args.scale}x / 1x = {big / small:.3f} (goal <= 1.10 + 32 MiB) -> "
              f"{check(ok, f'{what} memory at {args.scale}x')}", flush=True)
    print("\n| fit | peak anonymous, 1x | peak anonymous, " + f"{args.scale}x | ratio |")
    print("|---|---|---|---|")
    for what, small, big in rows:
        print(f"| {what} | {small:.0f} MiB | {big:.0f} MiB | {big / small:.2f} |")
    if tmp is not None:
        tmp.cleanup()
    finish()


if __name__ == "__main__":
    main()
