"""Measurement: what test-time augmentation and mixture consistency buy on an experiment, and
what TTA costs.

Given an experiment file whose [[models]] hold each member twice, plain and with `tta = ...`
(the same spec and options otherwise), and whose [[systems]] hold each method with
`consistency = "equal"` / `"energy"` beside the same system without (every other key equal):

1. cost: every TTA member and its plain twin cache the tracks of the splits fitting reads (every
   split but `[evaluate] split` or `cache_splits` less it; the evaluation split when nothing is
   fitted and nothing else is cached), at most --cost-tracks of them, track by track, alternating
   which goes first from track to track, so drifting machine load hits both alike; wall and CPU
   time (user + sys of this process, all threads) per track. These are the stems the experiment
   uses (`force`: separated again on every run of this stage; --skip-cost reuses them);
2. run: `pipeline run` of the experiment (everything cached above is reused; the evaluation
   split is separated only after everything is fitted, as `pipeline run` always does);
3. tables: per TTA member, per system with consistency: museval SDR (median over frames, then
   over tracks) and the paired statistics of reports.paired against its twin (the plain member,
   the system without consistency): mean Δ of the per-track medians with its 95 % bootstrap
   interval and the tracks improved; the cost ratios. Printed and written to
   `<report folder>/tta_consistency.md` (+ `tta_costs.json`).

    python benchmarks/bench_tta_consistency.py benchmarks/configs/demo-tta.toml --work work-tta
    python benchmarks/bench_tta_consistency.py EXPERIMENT --work DIR --skip-cost   # tables again

Nothing here passes or fails: TTA and consistency are reported where they pay and where they do
not.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TTA_KEYS = ("tta", "tta_members", "tta_seed")


def _without(table: dict, keys) -> dict:
    return {k: v for k, v in table.items() if k not in keys}


def member_pairs(config: dict) -> list[tuple[dict, dict]]:
    """(plain entry, TTA entry) for every [[models]] entry with `tta` (not `tta_members`)."""
    pairs = []
    for m in config["models"]:
        if not m.get("tta") or m.get("tta_members"):
            continue
        if "trained" in m:
            raise SystemExit(f"[[models]] trained = {m['trained']!r}: give the model folder as "
                             f"`spec` (this measurement loads members itself)")
        want = _without(m, TTA_KEYS + ("name",))
        twins = [p for p in config["models"] if not p.get("tta")
                 and _without(p, ("name",)) == want]
        if len(twins) != 1:
            raise SystemExit(f"[[models]] {m.get('name') or m['spec']}: expected one plain twin "
                             f"(the same spec and options without tta), found {len(twins)}")
        pairs.append((twins[0], m))
    return pairs


def system_pairs(config: dict) -> list[tuple[str, str]]:
    """(system without consistency, system with) for every system with consistency."""
    systems = config.get("systems", [])
    pairs = []
    for s in systems:
        if s.get("consistency", "none") == "none":
            continue
        want = _without(s, ("name", "consistency"))
        twins = [t["name"] for t in systems if t.get("consistency", "none") == "none"
                 and _without(t, ("name", "consistency")) == want]
        if len(twins) == 1:
            pairs.append((twins[0], s["name"]))
    return pairs


FIT_FREE = ("avg-wave", "median-wave", "min-wave", "max-wave", "avg-spec", "median-spec",
            "min-spec", "max-spec")


def cost_splits(config: dict) -> list[str]:
    """The splits the cost is measured on: those the experiment separates before fitting (every
    split but the evaluation split, or its `cache_splits` less that one); the evaluation split
    itself only when `cache_splits` names nothing else and no system fits anything (then the
    experiment reads no other split, and timing its tracks first changes nothing)."""
    evaluated = config.get("evaluate", {}).get("split", "test")
    wanted = config.get("cache_splits") or ["train", "valid", "test"]
    before = [s for s in wanted if s != evaluated]
    if before:
        return before
    fitted = [s["name"] for s in config.get("systems", []) if s["method"] not in FIT_FREE]
    if fitted:
        raise SystemExit(f"cache_splits holds only the evaluation split '{evaluated}', but "
                         f"{', '.join(fitted)} fit(s) something: the cost would separate the "
                         f"evaluation tracks before fitting")
    return [evaluated]


def _load(entry: dict, offline: bool):
    from separators.registry import load_separator
    from separators.tta import split_options, with_tta

    options = {k: v for k, v in entry.items() if k not in ("spec", "name", "repo")}
    own, tta = split_options(options)
    base = load_separator(entry["spec"], device="cpu", offline=offline, repo=entry.get("repo"),
                          options=own)
    (sep, recorded), = with_tta(base, tta)
    # what cache_spec records in model.json, so these entries load again like its own
    spec = entry["spec"]
    load = {"spec": str(Path(spec).resolve()) if Path(spec).exists() else spec,
            "repo": str(Path(entry["repo"]).resolve()) if entry.get("repo") else None,
            "options": {**{k: v for k, v in own.items() if v is not None}, **recorded}}
    return sep, load


def measure_costs(config: dict, work: Path, max_tracks: int | None) -> dict:
    from cache.run import cache_model, entry_of, ingest_dataset
    from core.config import store_dir
    from core.datasets import Dataset, open_dataset_spec
    from core.store import StemStore
    from separators.inference import separate_array

    ds_conf = config["dataset"]
    if ds_conf["path"] == "synthetic" and "generate" in ds_conf:   # as run_experiment does
        from core.synth import generate_dataset

        g = ds_conf["generate"]
        generate_dataset(work / "data" / "synthetic", seed=g.get("seed", 0), n_train=g.get("train", 28),
                         n_valid=g.get("valid", 6), n_test=g.get("test", 6),
                         duration=g.get("duration", 20.0), sample_rate=g.get("rate", 44100),
                         progress=False)
    dataset = open_dataset_spec(ds_conf["path"], work)
    store = StemStore(store_dir(work))
    ingest_dataset(store, dataset, progress=False)
    tracks = [t for t in dataset.tracks if t.split in cost_splits(config)][:max_tracks]
    offline = config.get("offline", True)
    result = {"tracks": [t.name for t in tracks], "audio_seconds": sum(t.duration for t in tracks),
              "splits": sorted({t.split for t in tracks}), "pairs": []}
    for plain_entry, tta_entry in member_pairs(config):
        plain, plain_load = _load(plain_entry, offline)
        tta, tta_load = _load(tta_entry, offline)
        # untimed, on the whole first track: a process's first call into a model, and its first
        # call at an input length, pay one-off costs (oneDNN primitives for that shape, lazily
        # loaded kernels: up to 30 s of CPU for umx-synth's LSTMs on this machine)
        first = store.mixture(dataset.id, entry_of(tracks[0]))
        for sep in (plain, tta):
            separate_array(sep, np.array(first), tracks[0].sample_rate)
        rows = []
        print(f"cost: {plain.name} vs {tta.name} on {len(tracks)} {'/'.join(result['splits'])} "
              f"tracks ({result['audio_seconds']:.0f} s of audio), load average "
              f"{os.getloadavg()[0]:.1f}", flush=True)
        for i, t in enumerate(tracks):
            one = Dataset(dataset.root, dataset.kind, [t], dataset.sources)
            order = ((plain, plain_load), (tta, tta_load))
            times = {}
            for sep, load in (order if i % 2 == 0 else order[::-1]):
                c0, w0 = time.process_time(), time.perf_counter()
                cache_model(store, one, sep, force=True, progress=False, load=load)
                times[sep.name] = (time.perf_counter() - w0, time.process_time() - c0)
            rows.append({"track": t.name, "seconds": t.duration,
                         "first": (plain if i % 2 == 0 else tta).name,
                         "plain_wall": times[plain.name][0], "plain_cpu": times[plain.name][1],
                         "tta_wall": times[tta.name][0], "tta_cpu": times[tta.name][1]})
        total = {k: float(sum(r[k] for r in rows)) for k in ("plain_wall", "plain_cpu",
                                                             "tta_wall", "tta_cpu")}
        per = sorted(r["tta_cpu"] / r["plain_cpu"] for r in rows)
        total["median_track_cpu_ratio"] = float(per[len(per) // 2])
        passes = len(getattr(tta, "passes", [None]))
        result["pairs"].append({"plain": plain.name, "tta": tta.name, "tta_option": tta_entry["tta"],
                                "passes": passes, "rows": rows, **total,
                                "cpu_ratio": total["tta_cpu"] / total["plain_cpu"],
                                "wall_ratio": total["tta_wall"] / total["plain_wall"]})
        print(f"  {tta.name}: CPU {total['tta_cpu']:.1f} s vs {total['plain_cpu']:.1f} s "
              f"({total['tta_cpu'] / total['plain_cpu']:.2f}x, median track "
              f"{total['median_track_cpu_ratio']:.2f}x, {passes} passes), wall "
              f"{total['tta_wall']:.1f} vs {total['plain_wall']:.1f} s "
              f"({total['tta_wall'] / total['plain_wall']:.2f}x)", flush=True)
    result["load_average_end"] = os.getloadavg()[0]
    return result


def _fmt_ci(row) -> str:
    return f"{row.delta_mean:+.2f} [{row.ci_low:+.2f}, {row.ci_high:+.2f}]"


def tables(df, targets: list[str], config: dict, names: dict[str, str], costs: dict | None) -> str:
    """names: each [[models]] entry's reference -> the model's name in the report."""
    from reports.paired import AVERAGE, paired_statistics
    from reports.report import summary_tables

    sdr, _ = summary_tables(df, targets, [])

    def paired(reference: str, system: str):
        sub = df[df.system.isin([reference, system])]
        p = paired_statistics(sub, reference, targets)
        return p.set_index("target")

    def row(reference: str, system: str, extra: str = "") -> str:
        p = paired(reference, system)
        a = p.loc[AVERAGE]
        per = " / ".join(f"{p.loc[t].delta_mean:+.2f}" for t in targets if t in p.index)
        return (f"| {system} | {sdr.loc[reference, AVERAGE]:.2f} | {sdr.loc[system, AVERAGE]:.2f} | "
                f"{sdr.loc[system, AVERAGE] - sdr.loc[reference, AVERAGE]:+.2f} | {_fmt_ci(a)} | "
                f"{round(a.share_improved * a.n_tracks):.0f}/{a.n_tracks:.0f} | {per} |{extra}")

    lines = []
    costs_by = {c["tta"]: c for c in (costs or {}).get("pairs", [])}
    members = [(names[p.get("name") or p["spec"]], names[m.get("name") or m["spec"]])
               for p, m in member_pairs(config)]
    if members:
        lines += [("Members with TTA vs the same member without (paired: per track, the TTA "
                   "member's median SDR minus the plain one's):"), "",
                  (f"| member | SDR avg plain | SDR avg TTA | Δ | paired Δ avg [95 % CI] | tracks "
                   f"improved | paired Δ {' / '.join(targets)} | CPU time TTA / plain | wall "
                   f"TTA / plain |"), "|" + "---|" * 9]
        for plain, tta in members:
            c = costs_by.get(tta)
            extra = (f" {c['tta_cpu']:.0f} / {c['plain_cpu']:.0f} s = **{c['cpu_ratio']:.2f}x** "
                     f"(median track {c.get('median_track_cpu_ratio', float('nan')):.2f}x) | "
                     f"{c['wall_ratio']:.2f}x |" if c else " | |")
            lines.append(row(plain, tta, extra))
        lines.append("")
    pairs = system_pairs(config)
    if pairs:
        lines += ["Systems with mixture consistency vs the same system without:", "",
                  (f"| system | SDR avg without | SDR avg with | Δ | paired Δ avg [95 % CI] | "
                   f"tracks improved | paired Δ {' / '.join(targets)} |"), "|" + "---|" * 7]
        lines += [row(a, b) for a, b in pairs]
        lines.append("")
    if costs and costs.get("pairs"):
        lines.append(f"(Cost: {len(costs['tracks'])} tracks of the {'/'.join(costs['splits'])} "
                     f"split(s), {costs['audio_seconds']:.0f} s of audio, each cached by the TTA "
                     f"member and its plain twin in turn; CPU = user + sys of the process.)")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("experiment", type=Path)
    ap.add_argument("--work", type=Path, default=Path("work"))
    ap.add_argument("--cost-tracks", type=int, default=None,
                    help="at most this many tracks for the cost (default: every fitting track)")
    ap.add_argument("--skip-cost", action="store_true", help="reuse tta_costs.json")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default torch's)")
    args = ap.parse_args()

    import torch

    from core.config import reports_dir
    from pipeline.experiment import load_experiment, run_experiment

    if args.threads:
        torch.set_num_threads(args.threads)
    config = load_experiment(args.experiment)
    out = Path(config.get("evaluate", {}).get("out") or reports_dir(args.work) / config["name"])
    out.mkdir(parents=True, exist_ok=True)
    costs_file = out / "tta_costs.json"
    t0 = time.perf_counter()
    if args.skip_cost:
        costs = json.loads(costs_file.read_text()) if costs_file.exists() else None
    else:
        costs = measure_costs(config, args.work, args.cost_tracks)
        costs_file.write_text(json.dumps(costs, indent=1))
    t_cost = time.perf_counter() - t0
    result = run_experiment(config, args.work, progress=False, log=print)
    df = result["scores"]
    from core.config import store_dir
    from core.store import StemStore

    store = StemStore(store_dir(args.work))
    targets = store.dataset_info(result_dataset(result))["sources"]
    names = {}
    for m in config["models"]:
        ref = m.get("name") or m["spec"]
        sep_name = _load(m, config.get("offline", True))[0].name   # cheap: a model's name
        names[ref] = sep_name
    text = tables(df, targets, config, names, costs)
    (out / "tta_consistency.md").write_text(text)
    print("\n" + text)
    cpu = os.times()
    print(f"cost stage {t_cost:.0f} s, experiment {result['seconds']:.0f} s wall; this process "
          f"user + sys {cpu.user + cpu.system:.0f} s; load average {os.getloadavg()[0]:.1f}; "
          f"tables in {out / 'tta_consistency.md'}")


def result_dataset(result: dict) -> str:
    return json.loads((Path(result["out"]) / "evaluation.json").read_text())["dataset"]


if __name__ == "__main__":
    main()
