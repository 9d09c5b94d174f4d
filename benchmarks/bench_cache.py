"""Benchmark: what the cache stage costs over running the base model bare.

(a) Time. A small HDemucs (random weights, exported in demucs's own `.th` package format with
    separators.families.demucs.export_model and loaded back through separators.registry.load_separator, as a
    user's model folder is) separates a synthetic dataset (core.synth, default 6 tracks x 20 s)
    that is already ingested into a StemStore. Per track, in one process, we time
      bare:  separate_array(separator, mixture, rate) on the mixture already in memory;
      cache: cache_model(store, <that one track>, separator, force=True) - reading the mixture from
             the store, the same separation, float16 stems, fsync'ed atomic writes, checksum,
             manifest;
    alternating which goes first from track to track and round to round, so drifting machine
    load hits both alike. Goal: cache / bare <= 1.10.
(b) Memory. A LONG-minute stereo track (default 10; a synthetic track tiled) goes through the
    cache stage in fresh subprocesses, each reporting its peak RSS (Linux VmHWM, reset after
    set-up when /proc/self/clear_refs allows, else ru_maxrss) minus its RSS after set-up:
      working: the model alone on one segment-long chunk (its own working memory);
      block:   separate_array on one cache block (separators.inference.BLOCK_SECONDS of audio, the
               most the cache stage hands the model at once; for information);
      ingest:  ingest_dataset of the long track (mixture + references into the store, read and
               written in chunks);
      cache:   cache_model of the long track (the mixture read a block at a time, blocks
               cross-faded and written to the store's float16 file as they are finished).
    Check: cache's peak - baseline <= working + 1 GiB (ingest, which runs no model: <= 1 GiB).
    `working` is the model on one segment-long chunk, smaller than on a whole block: the
    stricter reading of "the model's own working memory + 1 GiB".

    .venv/bin/python benchmarks/bench_cache.py [--tracks 6] [--seconds 20] [--rounds 2] [--long 10]

Sizes default to about 3-4 minutes on 2 busy cores; everything lives in a temporary folder.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
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

RATE = 44100
GiB = 1024.0  # MiB


# ---- memory probes -----------------------------------------------------------------------------
def status_mib(key: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM to the current RSS (Linux >= 4.0)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def peak_mib() -> float:
    try:
        return status_mib("VmHWM")
    except (OSError, KeyError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: KiB


def rss_mib() -> float:
    try:
        return status_mib("VmRSS")
    except (OSError, KeyError):
        return peak_mib()


def machine_line(threads: int) -> str:
    import torch

    return (f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (load "
            f"average {', '.join(f'{x:.1f}' for x in os.getloadavg())}), torch {torch.__version__}, "
            f"{threads} torch thread(s)")


# ---- set-up ------------------------------------------------------------------------------------
def build_model(folder: Path, channels: int, depth: int, nfft: int, segment: float) -> Path:
    import torch
    from demucs.hdemucs import HDemucs

    from separators.families.demucs import export_model

    torch.manual_seed(0)
    model = HDemucs(["drums", "bass", "other", "vocals"], channels=channels, depth=depth, nfft=nfft,
                    segment=segment, samplerate=RATE)
    export_model(model, folder, "benchhd", training_args={"model": "hdemucs", "seed": 0})
    return folder


def load_model(folder: Path, threads: int):
    import torch

    from separators.registry import load_separator

    torch.set_num_threads(threads)
    return load_separator(str(folder), device="cpu", offline=True)


def build_long_track(src_track: Path, root: Path, minutes: float) -> Path:
    """root/train/long/{drums,bass,other,vocals,mixture}.wav: src_track's stems tiled (16-bit)."""
    import soundfile as sf

    d = root / "train" / "long"
    d.mkdir(parents=True, exist_ok=True)
    n = int(minutes * 60 * RATE)
    mix = np.zeros((n, 2), dtype=np.float32)
    for s in ("drums", "bass", "other", "vocals"):
        x, _ = sf.read(src_track / f"{s}.wav", dtype="float32", always_2d=True)
        y = np.tile(x, (-(-n // len(x)), 1))[:n]
        mix += y
        sf.write(d / f"{s}.wav", y, RATE, subtype="PCM_16")
        del x, y
    sf.write(d / "mixture.wav", np.clip(mix, -1, 1), RATE, subtype="PCM_16")
    return root


# ---- (b) in a child process -------------------------------------------------------------------
def child(what: str, model_dir: Path, data: Path, store_root: Path, threads: int, segment: float) -> dict:
    from cache.run import cache_model, ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore
    from separators.inference import separate_array

    sep = load_model(model_dir, threads)
    store = StemStore(store_root)
    ds = open_dataset(data)
    if what in ("working", "block"):
        from separators.inference import BLOCK_SECONDS

        mix = ds.tracks[0].mixture(0, int((segment if what == "working" else BLOCK_SECONDS) * RATE))
        separate_array(sep, mix[:, :RATE], RATE)   # first-call allocations are not the model's
        fn = lambda: separate_array(sep, mix, RATE)   # noqa: E731
    elif what == "ingest":
        fn = lambda: ingest_dataset(store, ds, progress=False)   # noqa: E731
    else:
        ingest_dataset(store, ds, progress=False)   # already there: only reads dataset.json
        fn = lambda: cache_model(store, ds, sep, progress=False)   # noqa: E731
    import gc

    gc.collect()
    baseline = rss_mib()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    peak = peak_mib()
    return {"baseline_mib": baseline, "peak_mib": peak, "extra_mib": peak - baseline,
            "reset": reset, "seconds": seconds}


def run_child(what: str, args, model_dir: Path, data: Path, store_root: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", what, "--model-dir", str(model_dir),
                          "--data", str(data), "--store", str(store_root),
                          "--threads", str(args.threads), "--segment", str(args.segment)],
                         check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- (a) in this process ----------------------------------------------------------------------
def time_ratio(args, model_dir: Path, data: Path, store_root: Path):
    from cache.run import cache_model, entry_of, ingest_dataset
    from core.datasets import Dataset, open_dataset
    from core.store import StemStore
    from separators.inference import separate_array

    sep = load_model(model_dir, args.threads)
    store = StemStore(store_root)
    ds = open_dataset(data)
    t0 = time.perf_counter()
    ingest_dataset(store, ds, progress=False)
    ingest_s = time.perf_counter() - t0
    mixtures = {t.name: np.array(store.mixture(ds.id, entry_of(t))) for t in ds.tracks}
    # warm-up, untimed: first-call allocations, model.json, package metadata
    first = Dataset(ds.root, ds.kind, ds.tracks[:1], ds.sources)
    separate_array(sep, mixtures[ds.tracks[0].name], RATE)
    cache_model(store, first, sep, force=True, progress=False)
    rows = []
    for r in range(args.rounds):
        for i, t in enumerate(ds.tracks):
            one = Dataset(ds.root, ds.kind, [t], ds.sources)
            assert one.id == ds.id
            times = {}
            order = ("bare", "cache") if (r + i) % 2 == 0 else ("cache", "bare")
            for what in order:
                t0 = time.perf_counter()
                if what == "bare":
                    separate_array(sep, mixtures[t.name], t.sample_rate)
                else:
                    cache_model(store, one, sep, force=True, progress=False)
                times[what] = time.perf_counter() - t0
            rows.append((r, t.name, order[0], times["bare"], times["cache"]))
    return rows, ingest_s


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracks", type=int, default=6, help="(a) synthetic tracks")
    ap.add_argument("--seconds", type=float, default=20.0, help="(a) seconds per track")
    ap.add_argument("--rounds", type=int, default=2, help="(a) passes over the tracks")
    ap.add_argument("--long", type=float, default=10.0, help="(b) minutes of the long track")
    ap.add_argument("--channels", type=int, default=4, help="HDemucs channels")
    ap.add_argument("--depth", type=int, default=4, help="HDemucs depth")
    ap.add_argument("--nfft", type=int, default=1024, help="HDemucs nfft")
    ap.add_argument("--segment", type=float, default=10.0, help="HDemucs segment (s): apply_model's chunk")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared 2-core machine more threads only contend)")
    ap.add_argument("--skip-memory", action="store_true", help="only (a)")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model_dir, args.data, args.store, args.threads,
                               args.segment)))
        return

    from core.synth import generate_dataset

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_cache-") as tmp:
        tmp = Path(tmp)
        model_dir = build_model(tmp / "model", args.channels, args.depth, args.nfft, args.segment)
        n_params = sum(p.numel() for p in load_model(model_dir, args.threads).model.parameters())
        data = generate_dataset(tmp / "synth", seed=0, n_train=args.tracks, n_valid=0, n_test=0,
                                duration=args.seconds, sample_rate=RATE, progress=False)
        print(machine_line(args.threads))
        print(f"model: HDemucs channels={args.channels} depth={args.depth} nfft={args.nfft} "
              f"segment={args.segment:g} s, {n_params / 1e6:.3f} M params, random weights, demucs "
              f".th package (export_model), shifts=1 overlap=0.25 (adapter defaults)")
        print(f"(a) {args.tracks} synthetic tracks x {args.seconds:g} s at {RATE} Hz, "
              f"{args.rounds} round(s), order alternating per track")

        rows, ingest_s = time_ratio(args, model_dir, data, tmp / "store-a")
        print(f"\n{'round':>5} {'track':<36} {'first':>6} {'bare s':>8} {'cache s':>8} {'ratio':>6}")
        for r, name, first, bare, cached in rows:
            print(f"{r:>5} {name[:36]:<36} {first:>6} {bare:>8.2f} {cached:>8.2f} {cached / bare:>6.3f}")
        bare_total = sum(r[3] for r in rows)
        cache_total = sum(r[4] for r in rows)
        ratios = sorted(r[4] / r[3] for r in rows)
        ratio = cache_total / bare_total
        audio = args.tracks * args.seconds * args.rounds
        print(f"{'total':>5} {'':<36} {'':>6} {bare_total:>8.2f} {cache_total:>8.2f} {ratio:>6.3f}")
        print(f"\n(a) cache_model / bare inference: {ratio:.3f}x (median per track "
              f"{ratios[len(ratios) // 2]:.3f}x; goal <= 1.10x) -> "
              f"{check(ratio <= 1.10, 'cache_model within 1.10x bare inference')};"
              f" bare runs at {audio / bare_total:.1f}x real time")
        print(f"    ingest (once per dataset, shared by all models): {ingest_s:.2f} s = "
              f"{ingest_s / (bare_total / args.rounds):.3f}x one bare pass over the tracks")
        t_a = time.perf_counter() - t_all

        if not args.skip_memory:
            long_root = build_long_track(sorted((data / "train").iterdir())[0], tmp / "long", args.long)
            print(f"\n(b) one {args.long:g}-minute stereo track at {RATE} Hz "
                  f"({args.long * 60 * RATE * 2 * 4 / 2**20:.0f} MiB as float32 stereo), each stage "
                  f"in a fresh subprocess")
            store_b = tmp / "store-b"
            from separators.inference import BLOCK_SECONDS, OVERLAP_SECONDS

            res = {what: run_child(what, args, model_dir, long_root, store_b)
                   for what in ("working", "block", "ingest", "cache")}
            working = res["working"]["extra_mib"]
            limits = {"working": None, "block": None, "ingest": GiB, "cache": working + GiB}
            labels = {"working": f"model on one {args.segment:g} s chunk",
                      "block": f"model on one {BLOCK_SECONDS:g} s block",
                      "ingest": "ingest_dataset (long track)",
                      "cache": "cache_model (long track)"}
            print(f"\n{'stage':<30} {'time s':>7} {'baseline':>9} {'peak':>8} {'peak-base':>10} "
                  f"{'allowed':>8}  check")
            for what, r in res.items():
                lim = limits[what]
                ok = "" if lim is None else check(r["extra_mib"] <= lim, f"{what} memory")
                print(f"{labels[what]:<30} {r['seconds']:>7.1f} {r['baseline_mib']:>8.0f}M "
                      f"{r['peak_mib']:>7.0f}M {r['extra_mib']:>9.0f}M "
                      f"{'' if lim is None else f'{lim:.0f}M':>8}  {ok}")
            if not all(r["reset"] for r in res.values()):
                print("note: VmHWM could not be reset; peaks include set-up")
            print(f"(MiB; baseline = RSS after imports, model load and opening the data; "
                  f"allowed = working + 1 GiB for cache_model, working being the model's own memory "
                  f"on one {args.segment:g} s chunk (less than on a {BLOCK_SECONDS:g} s block: the "
                  f"stricter limit); 1 GiB for ingest, which runs no model. cache_model separates "
                  f"blocks of <= {BLOCK_SECONDS:g} s cross-faded over {OVERLAP_SECONDS:g} s)")
        print(f"\nsizes: (a) {args.tracks} x {args.seconds:g} s x {args.rounds} rounds took "
              f"{t_a:.0f} s; total {time.perf_counter() - t_all:.0f} s")
    finish()


if __name__ == "__main__":
    main()
