"""Benchmark: the ensemble stage - blend search, mixer training input, mixer inference, separate.

Set-up (once, in a temporary work folder unless --work is given): a synthetic dataset
(core.synth; default 4 train + 2 valid tracks x 20 s), ingested into a stem store and cached by
the three shipped base models (umx-synth, xumx-synth with niter=0 as in the demo, demucs-synth).

(a) Blend search vs rendering. mixer.blend.search_blend (per-frame inner products once, then every
    grid point as a few multiply-adds per frame) against the direct way: for every point of the
    same simplex grid, render the blend of every source from the stems and score it with
    core.metrics.framewise_sdr (itself ~350x faster than museval, see bench_sdr.py), then take
    the best point per source. Prints both times, the ratio, and whether both pick the same
    weights with the same objective.
(b) Mixer training input. Segments per second that mixer.train.SegmentDataset delivers from the
    store through a DataLoader (what train_mixer reads, batch 4), against the segments per second
    each model consumes (forward + L1 loss + backward + Adam step on a batch of 4) - for conv1x1 and
    the MDX-Mixer presets. Ratio > 1: the store keeps the model fed.
(c) Mixer inference real-time factor. mixer.methods.load_mixer (normalise, segments of T with hop T/4,
    Hann overlap-add, de-normalise) on a LONG_S-second track (default 60 s; stems tiled from the
    store): seconds of compute per second of audio, for blend, conv1x1 and MDX-Mixer presets.
(d) Peak memory of `pipeline separate` on a 10-minute stereo track, each in a fresh subprocess:
      first:  separate_files with the conv1x1 run - the three base models run on the new file
              (cache stage, blockwise) and the mixer is applied;
      mixer:  separate_files with the MDX-Mixer (demo preset) run on the same file: stems come
              from the store, only the mixer runs and the four outputs are written.
    Peak RSS (VmHWM, reset after imports) minus RSS after imports, against the float32 estimates of
    the track (4 sources x stereo) that separate keeps to write them, and the whole input array X
    ([26 channels, n] float32) a naive implementation would build.

    .venv/bin/python benchmarks/bench_mixer.py --threads 2 [--skip-memory] [--paper] [--step 0.05]

About 15 minutes on 2 cores with --threads 2 (most of it (d): three base models and a mixer on
10 minutes of audio); --skip-memory leaves (d) out (~5 minutes).
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
from bench_cache import machine_line, peak_mib, reset_peak_rss, rss_mib  # noqa: E402
from goals import check, finish  # noqa: E402

RATE = 44100
MODELS = (("umx-synth", {"niter": 0}), ("xumx-synth", {"niter": 0}), ("demucs-synth", {}))
MIXERS = (("conv1x1", "cpu"), ("mdx-mixer", "demo"), ("mdx-mixer", "cpu"))


# ---- set-up ------------------------------------------------------------------------------------
def setup(work: Path, n_train: int, n_valid: int, seconds: float):
    from cache.run import cache_model, ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore
    from core.synth import generate_dataset
    from separators.registry import load_separator

    data = generate_dataset(work / "data" / "synthetic", seed=0, n_train=n_train, n_valid=n_valid,
                            n_test=0, duration=seconds, sample_rate=RATE, progress=False)
    ds = open_dataset(data)
    store = StemStore(work / "store")
    ingest_dataset(store, ds, progress=False)
    keys = []
    for spec, options in MODELS:
        sep = load_separator(spec, offline=True, options=options)
        s = cache_model(store, ds, sep, progress=False,
                        load={"spec": spec, "repo": None, "options": options})
        keys.append(s["key"])
    return store, ds, keys


# ---- (a) ---------------------------------------------------------------------------------------
def bench_blend(store, ds_id, keys, step: float, split: str):
    from core.metrics import framewise_sdr, median_over_tracks, track_median
    from mixer.blend import search_blend
    from mixer.simplex import simplex_grid
    from mixer.inputs import InputSpec

    t0 = time.perf_counter()
    found = search_blend(store, ds_id, keys, step=step, objective="museval", split=split)
    t_search = time.perf_counter() - t0

    spec = InputSpec.from_store(store, ds_id, keys, with_mixture=False)
    tracks = store.tracks(ds_id, split)
    grid = simplex_grid(len(keys), step)
    t0 = time.perf_counter()
    # scores[p, track, source]: render every source's blend at grid point p, score all sources
    # together (museval's silent-frame rule spans the sources of a track)
    scores = np.empty((len(grid), len(tracks), len(spec.targets)))
    for i, t in enumerate(tracks):
        refs = np.asarray(store.references(ds_id, t), np.float32)
        stems = [np.asarray(store.stems(k, ds_id, t), np.float32) for k in keys]
        for p, w in enumerate(grid):
            est = sum(np.float32(wm) * s for wm, s in zip(w, stems))
            scores[p, i] = track_median(framewise_sdr(refs, est, win=RATE, hop=RATE))
    objective = np.stack([median_over_tracks(scores[p]) for p in range(len(grid))])  # [P, S]
    t_render = time.perf_counter() - t0

    same = True
    worst = 0.0
    for j, target in enumerate(spec.targets):
        p = int(np.nanargmax(objective[:, j]))
        rendered = {k: float(w) for k, w in zip(keys, grid[p])}
        searched = found["weights"][target]
        if any(abs(rendered[k] - searched.get(k, 0.0)) > 1e-6 for k in keys):
            # equal objectives may tie-break differently: compare the objective values instead
            q = int(np.argmin([sum(abs(g[m] - searched.get(k, 0.0)) for m, k in enumerate(keys))
                               for g in grid]))
            same = same and abs(objective[q, j] - objective[p, j]) < 1e-9
        worst = max(worst, abs(objective[p, j] - found["validation"]["blend"][target]))
    return dict(points=len(grid), tracks=len(tracks), t_search=t_search, t_render=t_render,
                same=same, max_objective_diff=worst)


# ---- (b) ---------------------------------------------------------------------------------------
def bench_training_input(store, ds_id, keys, seconds: float):
    import torch

    from mixer.inputs import InputSpec
    from mixer.models import PRESETS, build_mixer
    from mixer.train import SegmentDataset, l1_loss

    spec = InputSpec.from_store(store, ds_id, keys, with_mixture=True)
    rows = []
    for arch, preset in MIXERS:
        T, F, N = (PRESETS[preset][k] for k in ("T", "F", "N"))
        data = SegmentDataset(store, ds_id, spec, "train", T, 2 ** 15)
        loader = torch.utils.data.DataLoader(data, batch_size=4, shuffle=True, num_workers=0,
                                             generator=torch.Generator().manual_seed(0))
        it, got, t0 = iter(loader), 0, time.perf_counter()
        x0 = y0 = None
        while time.perf_counter() - t0 < seconds:
            try:
                x, y = next(it)
            except StopIteration:
                it = iter(loader)
                continue
            x0, y0 = (x, y) if x0 is None else (x0, y0)
            got += x.shape[0]
        loader_rate = got / (time.perf_counter() - t0)

        torch.manual_seed(0)
        model = build_mixer(arch, spec.in_channels, spec.out_channels,
                            {"T": T, "F": F, "N": N, "p": 0.0})
        opt = torch.optim.Adam(model.parameters(), lr=3e-4)
        used, t0, steps = 0, None, 0
        while True:
            opt.zero_grad(set_to_none=True)
            l1_loss(model(x0), y0).backward()
            opt.step()
            steps += 1
            if steps == 1:           # the first step allocates; not counted
                t0 = time.perf_counter()
                continue
            used += x0.shape[0]
            if time.perf_counter() - t0 >= seconds and steps >= 3:
                break
        model_rate = used / (time.perf_counter() - t0)
        params = sum(p.numel() for p in model.parameters())
        rows.append(dict(arch=arch, preset=preset, T=T, params=params, loader=loader_rate,
                         model=model_rate))
    return rows


# ---- (c) ---------------------------------------------------------------------------------------
def make_run(store, ds_id, keys, arch: str, preset: str, run_dir: Path) -> Path:
    """A real run folder: blend search, or train_mixer for one short epoch (the weights do not
    change what inference costs)."""
    from mixer.blend import search_blend
    from mixer.train import train_mixer

    if arch == "blend":
        search_blend(store, ds_id, keys, step=0.1, split="valid", run_dir=run_dir)
    else:
        train_mixer(store, ds_id, keys, arch, run_dir, preset=preset, epochs=1,
                    max_segments_per_epoch=8, progress=False)
    return run_dir


def bench_inference(store, ds_id, keys, runs: dict, long_s: float):
    from mixer.methods import load_mixer

    t = store.tracks(ds_id, "train")[0]
    n = int(long_s * RATE)
    tile = lambda a: np.ascontiguousarray(np.tile(np.asarray(a), (1,) * (a.ndim - 1) + (-(-n // a.shape[-1]),))[..., :n])  # noqa: E731
    mixture = tile(store.mixture(ds_id, t))
    stems = {k: tile(store.stems(k, ds_id, t)) for k in keys}   # float16, as in the store
    rows = []
    for name, run_dir in runs.items():
        m = load_mixer(run_dir)
        m(mixture[:, :RATE], {k: s[..., :RATE] for k, s in stems.items()})   # warm-up
        t0 = time.perf_counter()
        out = m(mixture, stems)
        dt = time.perf_counter() - t0
        assert out.shape == (4, 2, n) and np.isfinite(out).all()
        rows.append(dict(system=name, seconds=dt, rtf=dt / long_s))
    return rows


# ---- (d) in a child process -------------------------------------------------------------------
def child(work: Path, run: Path, wav: Path, out: Path, threads: int) -> dict:
    import gc

    import torch

    from pipeline.separate import separate_files

    torch.set_num_threads(threads)
    gc.collect()
    baseline = rss_mib()
    reset = reset_peak_rss()
    t0 = time.perf_counter()
    separate_files([wav], run, out, work=work, offline=True, log=lambda s: None)
    return {"baseline_mib": baseline, "peak_mib": peak_mib(), "reset": reset,
            "seconds": time.perf_counter() - t0}


def run_child(work: Path, run: Path, wav: Path, out: Path, threads: int) -> dict:
    res = subprocess.run([sys.executable, __file__, "--child", str(run), "--work", str(work),
                          "--wav", str(wav), "--out", str(out), "--threads", str(threads)],
                         check=True, capture_output=True, text=True)
    r = json.loads(res.stdout.strip().splitlines()[-1])
    r["extra_mib"] = r["peak_mib"] - r["baseline_mib"]
    return r


def long_wav(store, ds_id, path: Path, minutes: float) -> Path:
    import soundfile as sf

    n = int(minutes * 60 * RATE)
    with sf.SoundFile(path, "w", RATE, 2, subtype="PCM_16") as f:
        tracks = store.tracks(ds_id)
        done = i = 0
        while done < n:   # the dataset's mixtures one after another, written as they are read
            x = np.asarray(store.mixture(ds_id, tracks[i % len(tracks)]), np.float32)[:, :n - done]
            f.write(np.clip(x.T, -1, 1))
            done += x.shape[-1]
            i += 1
    return path


# ---- reports -----------------------------------------------------------------------------------
def print_blend(a: dict, step: float) -> None:
    print(f"\n(a) blend search over {a['tracks']} train tracks, 3 models, step {step:g} "
          f"({a['points']} grid points per source, museval objective)")
    print(f"    search_blend: {a['t_search']:.2f} s; rendering + framewise SDR at every point: "
          f"{a['t_render']:.1f} s -> {a['t_render'] / a['t_search']:.0f}x faster; same weights "
          f"(or equal objective): {'yes' if a['same'] else 'NO'}; max objective difference "
          f"{a['max_objective_diff']:.2e} dB")


def print_training_input(rows: list[dict]) -> None:
    print("\n(b) mixer training input: segments/s (batch 4, 26 input channels, DataLoader "
          "num_workers=0)")
    print(f"    {'mixer':<22} {'T':>7} {'params':>10} {'store loader':>13} {'model consumes':>15} {'ratio':>7}")
    for r in rows:
        print(f"    {r['arch'] + ' (' + r['preset'] + ')':<22} {r['T']:>7} {r['params']:>10,} "
              f"{r['loader']:>13.1f} {r['model']:>15.2f} {r['loader'] / r['model']:>7.1f}")


def print_inference(rows: list[dict], long_s: float) -> None:
    print(f"\n(c) mixer inference on {long_s:g} s of stereo audio (Mixer: Hann overlap-add, "
          f"hop T/4, batch 1)")
    print(f"    {'system':<22} {'seconds':>8} {'RTF':>7} {'x real time':>12}")
    for r in rows:
        print(f"    {r['system']:<22} {r['seconds']:>8.2f} {r['rtf']:>7.4f} {1 / r['rtf']:>12.1f}")


def bench_separate_memory(store, ds_id, work: Path, runs: dict, minutes: float, threads: int):
    wav = long_wav(store, ds_id, work / "long.wav", minutes)
    n = int(minutes * 60 * RATE)
    out_mib = 4 * 2 * n * 4 / 2 ** 20
    x_mib = 26 * n * 4 / 2 ** 20
    print(f"\n(d) pipeline separate on one {minutes:g}-minute stereo WAV, fresh subprocess each "
          f"({threads} torch thread(s))")
    res = {"first (3 base models + conv1x1)": run_child(work, runs["conv1x1 (cpu)"], wav,
                                                        work / "sep-first", threads),
           "mixer only (mdx-mixer demo)": run_child(work, runs["mdx-mixer (demo)"], wav,
                                                    work / "sep-mdx", threads)}
    print(f"    {'run':<34} {'time s':>7} {'baseline':>9} {'peak':>8} {'peak-base':>10}")
    for name, r in res.items():
        print(f"    {name:<34} {r['seconds']:>7.1f} {r['baseline_mib']:>8.0f}M "
              f"{r['peak_mib']:>7.0f}M {r['extra_mib']:>9.0f}M")
    if not all(r["reset"] for r in res.values()):
        print("    note: VmHWM could not be reset; peaks include imports")
    worst = max(r["extra_mib"] for r in res.values())
    print(f"    largest peak-base {worst:.0f} MiB = {worst / out_mib:.2f}x the float32 estimates "
          f"({out_mib:.0f} MiB), {worst / x_mib:.2f}x the whole input array X ({x_mib:.0f} MiB); "
          f"check peak-base <= estimates + 1 GiB -> "
          f"{check(worst <= out_mib + 1024, 'separate memory <= estimates + 1 GiB')}")


# ---- main --------------------------------------------------------------------------------------
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="work folder to (re)use (default: a temporary one)")
    ap.add_argument("--train", type=int, default=4, help="synthetic train tracks")
    ap.add_argument("--valid", type=int, default=2, help="synthetic valid tracks")
    ap.add_argument("--seconds", type=float, default=20.0, help="seconds per synthetic track")
    ap.add_argument("--step", type=float, default=0.05, help="(a) blend grid step")
    ap.add_argument("--measure", type=float, default=15.0, help="(b) seconds per measurement")
    ap.add_argument("--long", type=float, default=60.0, help="(c) seconds of audio")
    ap.add_argument("--paper", action="store_true", help="(b, c) also the paper-size MDX-Mixer (~1 GB)")
    ap.add_argument("--minutes", type=float, default=10.0, help="(d) minutes of the long track")
    ap.add_argument("--skip-memory", action="store_true", help="leave (d) out")
    ap.add_argument("--parts", default="abcd", help="which of (a)-(d) to run (default abcd)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--wav", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(args.work, args.child, args.wav, args.out, args.threads)))
        return

    import torch

    torch.set_num_threads(args.threads)
    if args.paper:
        global MIXERS
        MIXERS = MIXERS + (("mdx-mixer", "paper"),)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_mixer-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        print(f"{machine_line(args.threads)}; work folder {work}")
        t0 = time.perf_counter()
        store, ds, keys = setup(work, args.train, args.valid, args.seconds)
        print(f"set-up: {args.train} + {args.valid} synthetic tracks x {args.seconds:g} s, cached by "
              f"{', '.join(m for m, _ in MODELS)} ({time.perf_counter() - t0:.0f} s)")

        parts = set(args.parts) - ({"d"} if args.skip_memory else set())
        if "a" in parts:
            print_blend(bench_blend(store, ds.id, keys, args.step, "train"), args.step)
        if "b" in parts:
            print_training_input(bench_training_input(store, ds.id, keys, args.measure))
        if parts & {"c", "d"}:
            runs = {"blend": make_run(store, ds.id, keys, "blend", "", work / "runs" / "bench-blend")}
            for arch, preset in MIXERS:
                runs[f"{arch} ({preset})"] = make_run(store, ds.id, keys, arch, preset,
                                                      work / "runs" / f"bench-{arch}-{preset}")
        if "c" in parts:
            print_inference(bench_inference(store, ds.id, keys, runs, args.long), args.long)
        if "d" in parts:
            bench_separate_memory(store, ds.id, work, runs, args.minutes, args.threads)
        print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    finish()


if __name__ == "__main__":
    main()
