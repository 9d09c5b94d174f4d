"""Benchmark: the ensembles that train nothing - spectral ensembles' speed, band-wise blend search.

(a) Spectral and order-statistic ensembles (mixer.spectral) of 4 models x 4 sources on a LONG_S-
    second stereo track (default 60 s), applied through mixer.methods.load_mixer on a run folder with
    the stems read from a stem store by positional reads, as `pipeline separate` does: seconds of
    audio per second of compute (x real time) for each method. The track is MUSDB18-7 music (the
    train split's references, concatenated); the 4 "models" are leaky mixtures of those
    references plus noise, stored as float16 like cached stems (the speed depends only on the
    shapes). Goal: >= 50x real time on 2 cores.
(b) Band-wise blend search (mixer.bandblend) for 3 models x 8 mel bands x 4 sources at step 0.05
    on MUSDB18-7's train split (80 x 7 s), the models the three shipped checkpoints (umx-synth,
    xumx-synth with niter=0 as in the demo, demucs-synth; cached here unless --work already holds
    them): wall time (goal < 60 s) against rendering and scoring each grid point the search
    scores (the run folder applied to every track by Mixer, scored by core.metrics' exact
    framewise SDR, ~350x faster than museval): a few points are timed and multiplied by the
    number of points. Also checks that the searched objective equals the rendered one.

    .venv/bin/python benchmarks/bench_ensembles.py --threads 2 [--work DIR] [--parts ab]

About 10 minutes on 2 cores from nothing (most of it caching the three models on MUSDB18-7
train, done once per --work folder); (a) alone about a minute.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_cache import machine_line  # noqa: E402
from goals import check, finish  # noqa: E402

MUSDB18_7 = Path(os.environ.get("MUSDB18_7_ROOT", REPO.parent / "shared" / "data" / "musdb18-7"))
MODELS = (("umx-synth", {"niter": 0}), ("xumx-synth", {"niter": 0}), ("demucs-synth", {}))


def musdb_store(work: Path):
    from cache.run import ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore

    if not (MUSDB18_7 / "train").is_dir():
        sys.exit(f"MUSDB18-7 not found at {MUSDB18_7}; set MUSDB18_7_ROOT")
    ds = open_dataset(MUSDB18_7)
    store = StemStore(work / "store")
    ingest_dataset(store, ds, progress=False)
    return store, ds


# ---- (a) ---------------------------------------------------------------------------------------
def bench_spectral(work: Path, store, ds, seconds: float) -> list[dict]:
    from core.store import StemStore, TrackEntry
    from mixer.methods import load_mixer
    from mixer.spectral import METHODS, make_run

    rate = 44100
    n = int(seconds * rate)
    refs, have = [], 0
    for t in store.tracks(ds.id, "train"):
        refs.append(np.asarray(store.references(ds.id, t), np.float32))
        have += refs[-1].shape[-1]
        if have >= n:
            break
    refs = np.concatenate(refs, axis=-1)[..., :n]
    bench = StemStore(work / "bench-store")
    track = TrackEntry("long", "train", "train", n)
    sources = ["drums", "bass", "other", "vocals"]
    bench.write_dataset_info("long", {"id": "long", "sources": sources, "sample_rate": rate,
                                      "tracks": [{"name": "long", "subset": "train", "split": "train",
                                                  "length": n}]})
    bench.write_track("long", track, refs.sum(0), refs, {})
    rng = np.random.default_rng(0)
    keys = []
    for m in range(4):
        key = f"model{m}"
        bench.write_model_info(key, {"key": key, "name": key, "sources": sources})
        A = np.eye(4) * 0.8 + 0.2 * rng.random((4, 4)) / 4
        stems = np.einsum("ij,jcn->icn", A, refs) + 0.01 * rng.standard_normal(refs.shape)
        bench.write_stems(key, "long", track, stems.astype(np.float16), {})
        keys.append(key)
    rows = []
    for method in METHODS:
        run = work / "runs" / f"bench-{method}"
        make_run(bench, "long", keys, method, run_dir=run)
        mixer = load_mixer(run)
        best = np.inf
        for _ in range(2):   # the better of two: the machine is shared
            with bench.mixture_file("long", track) as mixture:
                files = [bench.stems_file(k, "long", track) for k in keys]
                t0 = time.perf_counter()
                est = mixer(mixture, dict(zip(keys, files)))
                best = min(best, time.perf_counter() - t0)
                for f in files:
                    f.close()
        assert est.shape == (4, 2, n) and np.isfinite(est).all()
        rows.append({"method": method, "seconds": best, "realtime": seconds / best})
    return rows


# ---- (b) ---------------------------------------------------------------------------------------
def cache_models(store, ds) -> list[str]:
    from cache.run import cache_model
    from separators.registry import load_separator

    keys = []
    for spec, options in MODELS:
        sep = load_separator(spec, offline=True, options=options)
        s = cache_model(store, ds, sep, splits=["train"], progress=False,
                        load={"spec": spec, "repo": None, "options": options})
        keys.append(s["key"])
    return keys


def rendered_objective(store, ds_id, run: Path, tracks) -> np.ndarray:
    """museval median over frames and tracks per source of the run applied to every track."""
    from core.metrics import framewise_sdr, median_over_tracks, track_median
    from mixer.methods import load_mixer

    mixer = load_mixer(run)
    rate = store.dataset_info(ds_id)["sample_rate"]
    scores = []
    for t in tracks:
        stems = {k: store.stems(k, ds_id, t) for k in mixer.spec.model_keys}
        est = mixer(store.mixture(ds_id, t), stems)
        scores.append(track_median(framewise_sdr(np.asarray(store.references(ds_id, t)), est, rate, rate)))
    return median_over_tracks(scores)


def bench_band_search(work: Path, store, ds, keys: list[str], bands: int, step: float) -> dict:
    from core.store import write_json_atomic
    from mixer import bandblend
    from mixer.inputs import InputSpec

    tracks = store.tracks(ds.id, "train")
    run = work / "runs" / "bench-band-blend"
    t0 = time.perf_counter()
    config = bandblend.search_band_blend(store, ds.id, keys, bands=bands, step=step, split="train",
                                         run_dir=run, progress=False)
    t_search = time.perf_counter() - t0
    # the same search, its two halves timed apart: band signals + inner products, then the search
    spec = InputSpec.from_store(store, ds.id, keys, with_mixture=False)
    bins, _ = bandblend.band_edges(bands, "mel", 44100)
    t0 = time.perf_counter()
    stats = bandblend.collect_band_stats(
        ((store.references(ds.id, t), [store.stems(k, ds.id, t) for k in keys]) for t in tracks),
        spec, bins, 44100)
    t_stats = time.perf_counter() - t0
    t0 = time.perf_counter()
    bandblend.search_bands(stats, bands, step, "museval")
    t_ascent = time.perf_counter() - t0

    # rendering: the found weights, the plain blend's, and one random point, each on every track
    rng = np.random.default_rng(0)
    points = {"found": config["weights"],
              "plain": {s: {k: [w] * bands for k, w in config["validation"]["plain_weights"][s].items()}
                        for s in config["sources"]},
              "random": {s: {k: list(v) for k, v in zip(config["weights"][s],
                                                        rng.dirichlet(np.ones(len(keys)), bands).T)}
                         for s in config["sources"]}}
    times, objective = [], {}
    for name, weights in points.items():
        folder = work / "runs" / f"bench-band-point-{name}"
        write_json_atomic(folder / "config.json", dict(config, weights=weights))
        t0 = time.perf_counter()
        objective[name] = rendered_objective(store, ds.id, folder, tracks)
        times.append(time.perf_counter() - t0)
    per_point = float(np.mean(times))
    reported = np.array([config["validation"]["band_blend"][s] for s in config["sources"]])
    plain = np.array([config["validation"]["plain_blend"][s] for s in config["sources"]])
    return {"tracks": len(tracks), "t_search": t_search, "t_stats": t_stats, "t_ascent": t_ascent,
            "points": config["search"]["points"], "sweeps": config["search"]["sweeps"],
            "per_point": per_point, "t_render": per_point * config["search"]["points"],
            "diff_found": float(np.max(np.abs(objective["found"] - reported))),
            "diff_plain": float(np.max(np.abs(objective["plain"] - plain))),
            "band": reported, "plain": plain, "sources": config["sources"]}


# ---- output ------------------------------------------------------------------------------------
def print_spectral(rows: list[dict], seconds: float) -> None:
    print(f"\n(a) spectral / order-statistic ensembles, 4 models x 4 sources, {seconds:g} s stereo "
          f"track (goal >= 50x real time)")
    for r in rows:
        ok = check(r["realtime"] >= 50, f"{r['method']} >= 50x real time")
        print(f"  {r['method']:<12} {r['seconds']:6.2f} s  {r['realtime']:6.1f}x real time  {ok}")


def print_band(b: dict, bands: int, step: float) -> None:
    print(f"\n(b) band-blend search, 3 models x {bands} bands x 4 sources, step {step}, "
          f"{b['tracks']} MUSDB18-7 train tracks (goal < 60 s)")
    print(f"  search {b['t_search']:.1f} s ({check(b['t_search'] < 60, 'band-blend search < 60 s')}): band "
          f"signals + inner products {b['t_stats']:.1f} s, coordinate ascent {b['t_ascent']:.1f} s "
          f"({b['sweeps']} sweeps, {b['points']} grid points scored)")
    print(f"  rendering + scoring one point on every track: {b['per_point']:.1f} s; the search's "
          f"{b['points']} points: {b['t_render']:.0f} s = {b['t_render'] / b['t_search']:.0f}x the search")
    print(f"  searched vs rendered objective: found weights {b['diff_found']:.2g} dB, plain blend "
          f"{b['diff_plain']:.2g} dB")
    print("  train-split museval SDR, plain blend -> band-blend: " + ", ".join(
        f"{s} {p:.2f} -> {q:.2f}" for s, p, q in zip(b["sources"], b["plain"], b["band"])))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, help="work folder to (re)use (default: a temporary one)")
    ap.add_argument("--long", type=float, default=60.0, help="(a) seconds of audio")
    ap.add_argument("--bands", type=int, default=8, help="(b) bands")
    ap.add_argument("--step", type=float, default=0.05, help="(b) grid step")
    ap.add_argument("--parts", default="ab", help="which of (a), (b) to run (default ab)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_ensembles-") as tmp:
        work = (args.work or Path(tmp)).resolve()
        print(f"{machine_line(args.threads)}; work folder {work}")
        store, ds = musdb_store(work)
        if "a" in args.parts:
            print_spectral(bench_spectral(work, store, ds, args.long), args.long)
        if "b" in args.parts:
            t0 = time.perf_counter()
            keys = cache_models(store, ds)
            print(f"\nset-up: {', '.join(m for m, _ in MODELS)} cached on MUSDB18-7 train "
                  f"({time.perf_counter() - t0:.0f} s)")
            print_band(bench_band_search(work, store, ds, keys, args.bands, args.step), args.bands, args.step)
        print(f"\ntotal {time.perf_counter() - t_all:.0f} s")
    finish()


if __name__ == "__main__":
    main()
