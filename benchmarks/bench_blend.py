"""Benchmark: the blend search and `select-models` on pools of 5 to 20 real cached separators.

Side by side in one run, on MUSDB18-7 (benchmarks/blend_pool.py caches the pool of 20 into
--work unless it is there: ~1 h on 2 cores the first time):

(a) `search_blend` (step 0.05, museval objective) over the first M = 5, 8, 12, 20 models of the
    pool on --split (default train: 80 x 7 s), each in a fresh subprocess: wall time (reading
    the stems into per-frame inner products, then the search) and peak RSS, in the default
    search mode ('auto': the exhaustive grid up to 20 000 points, else the local search); the
    exhaustive grid beside it where it is allowed and M <= --exhaustive-up-to (the local search
    too where 'auto' is exhaustive), or the line refusing it. Known answers: the local search
    reaches the exhaustive optimum's objective where both ran, and never scores below the best
    single model or its least-squares start.
(b) `select_models --by blend` (step 0.1, the default) from the pool of 20 on --select-split
    (default select: the fixed tenth of train), in a fresh subprocess: wall time, peak RSS.
(c) Known answers on real stems: the local and the exhaustive search on every 5-model subset of
    the first 7 pool models at step 0.05 and every 8-model subset of the first 10 at step 0.1
    (4 sources each, --split): how often the local search ends on the grid's optimum, and how
    far below it otherwise.

Goals on 2 cores: (a) 20 models x 4 sources <= 30 s and <= 1 GiB; (b) <= 5 min. Exits non-zero
when a goal or a known answer is missed.

    .venv/bin/python benchmarks/bench_blend.py --work work/bench-blend
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from bench_cache import peak_mib  # noqa: E402  (VmHWM: ru_maxrss would include the parent's RSS at the fork)
from blend_pool import POOL, build_pool, label  # noqa: E402
from goals import check, finish  # noqa: E402

GOAL_SECONDS, GOAL_MIB, GOAL_SELECT = 30.0, 1024.0, 300.0
# On real stems the museval objective (a median) is rugged: a local search may stop on a point a
# hair below the grid's optimum. Reported always; a failure beyond this (a regression).
REAL_GAP = 0.05


# ---- children: one measurement each, in a fresh process ----------------------------------------
def child_blend(work: Path, keys: list[str], step: float, split: str, mode: str) -> dict:
    import mixer.blend as mb
    from core.errors import PipelineError
    from core.store import StemStore

    store = StemStore(work / "store")
    phases = {}
    collect = mb.collect_stats

    def timed(*args, **kwargs):   # the two halves of search_blend: reading, then searching
        t0 = time.perf_counter()
        out = collect(*args, **kwargs)
        phases["stats"] = time.perf_counter() - t0
        return out
    mb.collect_stats = timed
    t0 = time.perf_counter()
    try:
        config = mb.search_blend(store, store.datasets()[0], keys, step=step, split=split,
                                 search_mode=mode)
    except PipelineError as e:
        return {"refused": str(e)}
    wall = time.perf_counter() - t0
    return {"wall": wall, "stats": phases["stats"], "search": wall - phases["stats"],
            "peak_mib": peak_mib(),
            "weights": config["weights"], "blend": config["validation"]["blend"],
            "single": config["validation"]["single_models"], "search_record": config["search"]}


def child_select(work: Path, keys: list[str], split: str) -> dict:
    from core.store import StemStore
    from mixer.select import select_models

    store = StemStore(work / "store")
    t0 = time.perf_counter()
    result = select_models(store, store.datasets()[0], keys, by="blend", split=split,
                           progress=False, log=lambda line: None)
    return {"wall": time.perf_counter() - t0,
            "peak_mib": peak_mib(),
            "chosen": [m["key"] for m in result["models"]], "score": result["score"],
            "steps": len(result["path"])}


def subsets_against_exhaustive(work: Path, keys: list[str], split: str, size: int, of: int,
                               step: float) -> dict:
    """(c): one pass of statistics over the first `of` models, then both searches per subset."""
    import itertools

    from core.store import StemStore
    from mixer.blend import collect_stats
    from mixer.blendsearch import search
    from mixer.inputs import InputSpec

    store = StemStore(work / "store")
    ds = store.datasets()[0]
    spec = InputSpec.from_store(store, ds, keys[:of], with_mixture=False)
    stats = collect_stats(((store.references(ds, t), [store.stems(k, ds, t) for k in keys[:of]])
                           for t in store.tracks(ds, split)), spec, int(store.dataset_info(ds)["sample_rate"]))
    cases, equal, gaps, seconds = 0, 0, [], {"exhaustive": 0.0, "local": 0.0}
    for sub in itertools.combinations(range(of), size):
        found = {}
        for mode in seconds:
            t0 = time.perf_counter()
            found[mode] = search([st.restricted(sub) for st in stats], step, "museval", mode)
            seconds[mode] += time.perf_counter() - t0
        for a, b in zip(found["exhaustive"].best, found["local"].best):
            cases += 1
            equal += a - b <= 1e-9
            gaps.append(a - b)
    return {"cases": cases, "equal": equal, "worst": max(gaps), "mean_gap": sum(gaps) / len(gaps),
            "subsets": cases // len(stats), "seconds": seconds}


def in_child(work: Path, args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--work", str(work), "--child", *args],
                         capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"child {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---- the comparison -------------------------------------------------------------------------------
def mean(d: dict) -> float:
    return sum(d.values()) / len(d)


def modes_of(r: dict) -> set[str]:
    return {v["mode"] for v in r["search_record"]["sources"].values()}


def check_known_answers(M: int, auto: dict, other: dict | None, failures: list[str]) -> str:
    """The blend never below the best single model, a local one never below its least-squares
    start; where both ran, the local search's objective equal to the exhaustive optimum's."""
    for r in [auto] + ([other] if other else []):
        for s, rec in r["search_record"]["sources"].items():
            single = max(v[s] for v in r["single"].values() if v.get(s) is not None)
            if r["blend"][s] < single - 1e-9:
                failures.append(f"M={M} {s}: blend {r['blend'][s]:.4f} below the best single model {single:.4f}")
            if rec["mode"] == "local" and r["blend"][s] < rec["starts"]["least-squares"]["objective"] - 1e-9:
                failures.append(f"M={M} {s}: blend below its least-squares start")
    if not other:
        return ""
    local, exhaustive = (other, auto) if modes_of(auto) == {"exhaustive"} else (auto, other)
    gaps = {s: exhaustive["blend"][s] - local["blend"][s] for s in local["blend"]}
    same = sum(local["weights"][s] == exhaustive["weights"][s] for s in gaps)
    worst = max(gaps.values())
    if worst > REAL_GAP:
        failures.append(f"M={M}: the local search ends {worst:.4f} dB below the exhaustive optimum")
    return (f"local vs exhaustive: same weights for {same}/{len(gaps)} sources, objective "
            f"shortfall at most {max(worst, 0):.2g} dB; search {exhaustive['search'] / local['search']:.0f}x "
            f"faster, peak {exhaustive['peak_mib'] - local['peak_mib']:+.0f} MiB")


def row(M: int, mode: str, r: dict) -> str:
    if "refused" in r:
        return f"  {M:>3}  {mode:<10} refused: {r['refused']}"
    modes = {v["mode"] for v in r["search_record"]["sources"].values()}
    points = sum(v["points"] for v in r["search_record"]["sources"].values())
    return (f"  {M:>3}  {mode:<10} {'+'.join(sorted(modes)):<10} {points:>12,} {r['stats']:>8.1f} "
            f"{r['search']:>8.1f} {r['wall']:>8.1f} {r['peak_mib']:>9.0f} {mean(r['blend']):>9.3f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, default=REPO / "work" / "bench-blend",
                    help="work folder holding (or receiving) the pool's stem store")
    ap.add_argument("--sizes", default="5,8,12,20", help="pool sizes M (first M of the pool)")
    ap.add_argument("--step", type=float, default=0.05)
    ap.add_argument("--split", default="train", help="(a) split searched on")
    ap.add_argument("--select-split", default="select", help="(b) split selected on")
    ap.add_argument("--exhaustive-up-to", type=int, default=8,
                    help="run the exhaustive grid beside 'auto' up to this M (default 8)")
    ap.add_argument("--parts", default="abc")
    ap.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    work = args.work.resolve()
    if args.child:
        kind, keys = args.child[0], args.child[1].split(",")
        out = (child_blend(work, keys, float(args.child[2]), args.child[3], args.child[4])
               if kind == "blend" else child_select(work, keys, args.child[2]))
        print(json.dumps(out))
        return

    from core.errors import PipelineError
    from mixer.blendsearch import search_modes

    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs, load average "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}; work folder {work}")
    t0 = time.perf_counter()
    sizes = [int(m) for m in args.sizes.split(",")]
    need = max(sizes * ("a" in args.parts) + [10] * ("c" in args.parts) + [len(POOL)] * ("b" in args.parts))
    _, _, keys = build_pool(work, need)
    print(f"pool: {len(keys)} cached separators ({time.perf_counter() - t0:.0f} s to check / cache):")
    for i, (spec, options) in enumerate(POOL[:need], 1):
        print(f"  {i:>2}. {label(spec, options)}")
    failures = []
    if "a" in args.parts:
        print(f"\n(a) search_blend, step {args.step}, museval, split '{args.split}', 4 sources, "
              f"fresh subprocess each (goal for M = 20: <= {GOAL_SECONDS:.0f} s, <= {GOAL_MIB:.0f} MiB)")
        print(f"  {'M':>3}  {'asked':<10} {'used':<10} {'points':>12} {'stats s':>8} {'search s':>8} "
              f"{'total s':>8} {'peak MiB':>9} {'mean dB':>9}")
        for M in sizes:
            sub = ",".join(keys[:M])
            auto = in_child(work, ["blend", sub, str(args.step), args.split, "auto"])
            print(row(M, "auto", auto), flush=True)
            other = None
            if M <= args.exhaustive_up_to:
                ask = "local" if modes_of(auto) == {"exhaustive"} else "exhaustive"
                other = in_child(work, ["blend", sub, str(args.step), args.split, ask])
                print(row(M, ask, other), flush=True)
            else:   # what asking for it says, before anything is allocated
                try:
                    search_modes([M] * 4, args.step, "exhaustive")
                    print(f"  {M:>3}  exhaustive (not run: M > --exhaustive-up-to)")
                except PipelineError as e:
                    print(f"  {M:>3}  exhaustive refused: {e}")
            note = check_known_answers(M, auto, other, failures)
            if note:
                print(f"       {note}")
            if M == 20:
                ok = auto["wall"] <= GOAL_SECONDS and auto["peak_mib"] <= GOAL_MIB
                print(f"       20 models: {auto['wall']:.1f} s, {auto['peak_mib']:.0f} MiB (goal <= "
                      f"{GOAL_SECONDS:.0f} s, <= {GOAL_MIB:.0f} MiB) -> {check(ok, '20-model blend search')}")
    if "b" in args.parts:
        print(f"\n(b) select_models --by blend (step 0.1) from the pool of {len(keys)} on split "
              f"'{args.select_split}' (goal <= {GOAL_SELECT:.0f} s)")
        r = in_child(work, ["select", ",".join(keys), args.select_split])
        names = {k: f"{i}. {label(*POOL[i - 1])}" for i, k in enumerate(keys, 1)}
        print(f"  {r['wall']:.1f} s, peak {r['peak_mib']:.0f} MiB, {r['steps']} steps; chose "
              f"{len(r['chosen'])}: {'; '.join(names[k] for k in r['chosen'])} (score {r['score']:.3f} dB)")
        print(f"  goal <= {GOAL_SELECT:.0f} s -> {check(r['wall'] <= GOAL_SELECT, 'select-models from 20')}")
    if "c" in args.parts:
        print(f"\n(c) local vs exhaustive search on real stems, museval, split '{args.split}', 4 sources")
        for size, of, step in ((5, 7, 0.05), (8, 10, 0.1)):
            r = subsets_against_exhaustive(work, keys, args.split, size, of, step)
            print(f"  every {size}-model subset of the first {of} ({r['subsets']} subsets x 4 = "
                  f"{r['cases']} cases), step {step}: the local search ends on the grid's optimum in "
                  f"{r['equal']}/{r['cases']}, at most {max(r['worst'], 0):.4f} dB below it (mean "
                  f"{r['mean_gap']:.5f} dB); search time exhaustive {r['seconds']['exhaustive']:.0f} s, "
                  f"local {r['seconds']['local']:.0f} s", flush=True)
            if r["worst"] > REAL_GAP:
                failures.append(f"(c) {size} of {of}: the local search ends {r['worst']:.3f} dB below "
                                f"the grid's optimum (allowed {REAL_GAP} dB)")
    print(f"\ntotal {time.perf_counter() - t0:.0f} s; load average now "
          f"{', '.join(f'{x:.1f}' for x in os.getloadavg())}")
    for failure in failures:   # known answers missed: a regression, reported like a missed goal
        print(f"known answer missed: {failure} -> {check(False, failure)}")
    finish()
    print("every goal and known answer held")


if __name__ == "__main__":
    main()
