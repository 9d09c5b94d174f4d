"""The evaluate stage: score every system on one split of a dataset in the stem store.

Systems: each cached base model; the per-source best base model chosen on the validation split
(the MDX-Mixer paper's "manual selection"); the uniform average of the chosen models; every mixer
run folder (blend, conv1x1, mdx-mixer); oracle references (mixture as estimate, ideal ratio
mask). A system is scored only on the targets it outputs.

Scores are cached per (system estimate, track) under `<work>/evalcache`, keyed by everything the
estimate depends on (model keys and stem checksums, a run's config and weights), so re-running
an evaluation only scores what changed.

Besides the museval tables, every report has paired per-track statistics against the best single
base model (reports.paired): paired.csv, a summary.md section and "paired" in evaluation.json.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from core.errors import PipelineError
from core.metrics import framewise_sdr, median_over_tracks, to_long, track_median, usdr
from core.progress import progress_bar
from core.store import StemStore, TrackEntry, read_json, sha256_file, write_json_atomic

ORACLE_MIX, ORACLE_IRM = "oracle: mixture", "oracle: IRM"
PAIRED_CSV = "paired.csv"   # reports.paired.COLUMNS, one row per (system, target)


@dataclass
class System:
    """Something that produces estimates for a track, scored by the same code as all others."""

    name: str
    kind: str                                    # base | selection | average | run | oracle
    targets: tuple[str, ...]                     # the dataset targets it outputs
    key: Callable[[TrackEntry], str]             # changes whenever the estimate would change
    render: Callable[[TrackEntry], np.ndarray]   # estimates [len(targets), 2, n]
    detail: dict | None = None


def _digest(*parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stems_sha(store: StemStore, key: str, dataset_id: str, track: TrackEntry) -> str:
    return read_json(store.stems_dir(key, dataset_id, track) / "manifest.json")["sha256"]


def _track_sha(store: StemStore, dataset_id: str, track: TrackEntry) -> str:
    return read_json(store.track_dir(dataset_id, track) / "manifest.json")["sha256"]


def base_system(store: StemStore, dataset_id: str, key: str, name: str) -> System:
    info, targets = store.model_info(key), store.dataset_info(dataset_id)["sources"]
    have = [s for s in targets if s in info["sources"]]
    index = [info["sources"].index(s) for s in have]
    def render(t):
        # float16 stems are widened to float32; imported estimates stored in float64 stay so
        stems = store.stems(key, dataset_id, t)
        return np.asarray(stems[index], dtype=np.promote_types(stems.dtype, np.float32))

    return System(
        name, "base", tuple(have),
        key=lambda t: _digest("base", key, _stems_sha(store, key, dataset_id, t)),
        render=render, detail={"key": key})


def combined_system(store: StemStore, dataset_id: str, name: str, kind: str,
                    choice: dict[str, list[tuple[str, float]]]) -> System:
    """Per target, a weighted sum of base models' estimates of it: {target: [(key, weight)]}."""
    targets = tuple(s for s in store.dataset_info(dataset_id)["sources"] if choice.get(s))
    sources = {k: store.model_info(k)["sources"] for c in choice.values() for k, _ in c}

    def render(t):
        out = []
        for s in targets:
            acc = None
            for k, w in choice[s]:
                x = w * np.asarray(store.stems(k, dataset_id, t)[sources[k].index(s)], dtype=np.float32)
                acc = x if acc is None else acc + x
            out.append(acc)
        return np.stack(out)

    def key(t):
        return _digest(kind, {s: [(k, w, _stems_sha(store, k, dataset_id, t)) for k, w in c]
                              for s, c in choice.items()})

    return System(name, kind, targets, key, render, detail={"choice": choice})


def run_system(store: StemStore, dataset_id: str, run_dir: Path, device=None,
               name: str | None = None) -> System:
    from mixer.methods import load_config, load_mixer

    config = load_config(run_dir)
    weights = [p for p in (run_dir / "mixer.pt",) if p.exists()]
    signature = [sha256_file(p) for p in weights] or [config.get("weights")]
    mixer_cache = {}

    def mixer():
        if "m" not in mixer_cache:
            mixer_cache["m"] = load_mixer(run_dir, device=device)
        return mixer_cache["m"]

    keys = config["inputs"]["model_keys"]

    def key(t):
        return _digest("run", config, signature, [_stems_sha(store, k, dataset_id, t) for k in keys])

    def render(t):
        stems = {k: store.stems(k, dataset_id, t) for k in keys}
        return mixer()(np.asarray(store.mixture(dataset_id, t)), stems)

    return System(name or run_dir.name, "run", tuple(config["inputs"]["targets"]), key, render,
                  detail={"run": str(run_dir), "method": config["method"]})


def oracle_systems(store: StemStore, dataset_id: str) -> list[System]:
    targets = tuple(store.dataset_info(dataset_id)["sources"])

    def mix(t):
        m = np.asarray(store.mixture(dataset_id, t), dtype=np.float32)
        return np.repeat(m[None], len(targets), axis=0)

    def irm(t):
        return ideal_ratio_mask(np.asarray(store.mixture(dataset_id, t)),
                                np.asarray(store.references(dataset_id, t)))

    return [System(ORACLE_MIX, "oracle", targets, lambda t: _digest("mix", _track_sha(store, dataset_id, t)), mix),
            System(ORACLE_IRM, "oracle", targets, lambda t: _digest("irm2", _track_sha(store, dataset_id, t)), irm)]


def ideal_ratio_mask(mixture: np.ndarray, references: np.ndarray, n_fft=4096, hop=1024,
                     power=2.0) -> np.ndarray:
    """sigsep's IRM2 oracle: masks |S_j|^2 / sum_k |S_k|^2 applied to the mixture's STFT."""
    import torch

    win = torch.hann_window(n_fft)
    spec = lambda x: torch.stft(torch.tensor(np.asarray(x, dtype=np.float32)), n_fft,
                                hop, window=win, return_complex=True)
    ref = spec(references.reshape(-1, references.shape[-1])).abs() ** power
    ref = ref.reshape(references.shape[0], references.shape[1], *ref.shape[-2:])
    mask = ref / (ref.sum(0, keepdim=True) + 1e-10)
    est = mask * spec(mixture)[None]
    n = mixture.shape[-1]
    out = torch.istft(est.reshape(-1, *est.shape[-2:]), n_fft, hop, window=win, length=n)
    return out.reshape(references.shape).numpy()


# ---- scoring with a cache ------------------------------------------------------------------
class ScoreCache:
    """{estimate key -> framewise SDR and uSDR per target} as small JSON files."""

    def __init__(self, root: Path):
        self.root = root

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str):
        p = self.path(key)
        return read_json(p) if p.exists() else None

    def put(self, key: str, value: dict) -> None:
        write_json_atomic(self.path(key), value)


def score_track(refs: np.ndarray, est: np.ndarray, win: int) -> dict:
    sdr = framewise_sdr(refs, est, win=win, hop=win)
    return {"SDR": [[None if np.isnan(v) else float(v) for v in row] for row in sdr],
            "uSDR": [float(v) for v in usdr(refs, est)]}


def score_systems(store: StemStore, dataset_id: str, systems: list[System], tracks: list[TrackEntry],
                  cache: ScoreCache, progress=True, on_render=None,
                  render_all: bool = False) -> pd.DataFrame:
    """on_render(system, track, estimates): sees each estimate rendered (the listening report's
    clips are cut from them, so nothing is rendered twice); render_all: render (and score) the
    estimates whose scores are cached too, for an on_render that needs every one."""
    info = store.dataset_info(dataset_id)
    targets, rate = info["sources"], info["sample_rate"]
    frames, todo = [], [(s, t) for s in systems for t in tracks]
    with progress_bar(total=len(todo), desc="evaluate", unit="track", disable=not progress) as bar:
        for system, t in todo:
            key = system.key(t)
            scores = None if render_all else cache.get(key)
            if scores is None:
                est = system.render(t)
                refs = np.asarray(store.references(dataset_id, t))[[targets.index(s) for s in system.targets]]
                if est.shape != refs.shape:
                    raise PipelineError(f"{system.name}: estimates of shape {est.shape} for '{t.name}', "
                                        f"expected {refs.shape}")
                scores = score_track(refs, est, win=rate)
                cache.put(key, scores)
                if on_render:
                    on_render(system, t, est)
            sdr = np.array([[np.nan if v is None else v for v in row] for row in scores["SDR"]],
                           dtype=np.float64).reshape(len(system.targets), -1)
            frames.append(to_long({"SDR": sdr, "uSDR": np.asarray(scores["uSDR"])}, track=t.name,
                                  targets=system.targets, system=system.name))
            bar.update(1)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()


def select_best_per_source(store: StemStore, dataset_id: str, bases: list[System], split: str,
                           cache: ScoreCache, progress=True) -> dict[str, list[tuple[str, float]]]:
    """Per target, the base model with the best museval median/median SDR on `split`."""
    tracks = store.tracks(dataset_id, split)
    usable = [b for b in bases if all(store.has_stems(b.detail["key"], dataset_id, t) for t in tracks)]
    if not tracks or not usable:
        return {}
    df = score_systems(store, dataset_id, usable, tracks, cache, progress=progress)
    sdr = df[df.metric == "SDR"]
    med = sdr.groupby(["system", "target", "track"])["value"].apply(lambda v: track_median(v.to_numpy()))
    score = med.groupby(["system", "target"]).apply(lambda v: median_over_tracks(v.to_numpy()))
    by_name = {b.name: b.detail["key"] for b in usable}
    choice = {}
    for target in store.dataset_info(dataset_id)["sources"]:
        cand = score.xs(target, level="target") if target in score.index.get_level_values("target") else None
        if cand is not None and cand.notna().any():
            choice[target] = [(by_name[cand.idxmax()], 1.0)]
    return choice


class EstimateFolder:
    """Every system's estimates as float WAV in museval's layout,
    ROOT/<system>/<split>/<track>/<source>.wav, with ROOT/estimates.json naming each system's
    folder. `pipeline evaluate --estimates NAME=ROOT/<folder>` scores them to the same numbers.

    A folder that holds anything but what an earlier `--save-estimates` wrote is refused before
    anything is written; what an earlier one wrote is replaced file by file (atomically).
    """

    INDEX = "estimates.json"

    def __init__(self, root: Path, split: str, rate: int):
        self.root, self.split, self.rate = Path(root), split, rate
        self.index = read_json(self.root / self.INDEX) if (self.root / self.INDEX).exists() else {}
        if self.root.exists() and not self.index and any(self.root.iterdir()):
            raise PipelineError(f"{self.root}: not empty and not a folder of saved estimates "
                                f"(no {self.INDEX}); choose an empty or new folder")
        if self.root.exists() and not self.root.is_dir():
            raise PipelineError(f"{self.root}: exists and is not a folder")

    @staticmethod
    def folder_name(system: str) -> str:
        return "".join(c if c.isalnum() or c in "-_." else "_" for c in system).lstrip(".") or "_"

    def __call__(self, system: System, track: TrackEntry, est: np.ndarray) -> None:
        from core.audio import write_audio

        folder = self.folder_name(system.name)
        owner = self.index.setdefault(folder, system.name)
        if owner != system.name:
            raise PipelineError(f"{self.root / folder}: holds the estimates of '{owner}'; systems "
                                f"'{owner}' and '{system.name}' share a folder name")
        where = self.root / folder / self.split / track.name.replace("/", "_")
        for target, x in zip(system.targets, est):
            write_audio(where / f"{target}.wav", x, self.rate, overwrite=True)

    def finish(self) -> None:
        write_json_atomic(self.root / self.INDEX, self.index)


# ---- the stage -----------------------------------------------------------------------------
def _full_metrics(store, dataset_id, systems, tracks) -> pd.DataFrame:
    """ISR/SIR/SAR (and museval's own SDR) through museval itself, in bounded parallel workers."""
    from core.metrics import full_bsseval

    info = store.dataset_info(dataset_id)
    parts = []
    for system in systems:
        idx = [info["sources"].index(s) for s in system.targets]
        jobs = [(t.name, np.asarray(store.references(dataset_id, t))[idx], system.render(t)) for t in tracks]
        df = full_bsseval(jobs, targets=system.targets, system=system.name, win=info["sample_rate"],
                          hop=info["sample_rate"])
        parts.append(df[df.metric != "SDR"])  # our exact SDR is already there
    return pd.concat(parts, ignore_index=True)


def weight_figures(store: StemStore, dataset_id: str, run_systems: list[System], track: TrackEntry,
                   out: Path, device=None) -> list[Path]:
    """A time-invariant mixer (blend, conv1x1): W as a heatmap; a time-varying one (mdx-mixer):
    W_k at two segments, their mean and std over a track; the others have no mixing matrix."""
    from mixer.methods import load_mixer
    from reports.report import heatmap_figure

    paths = []
    for system in run_systems:
        mixer = load_mixer(Path(system.detail["run"]), device=device)
        ins, outs = mixer.spec.input_names(), mixer.spec.output_names()
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in system.name)
        if mixer.time_varying:
            stems = {k: store.stems(k, dataset_id, track) for k in mixer.spec.model_keys}
            W, starts = mixer.segment_weights(np.asarray(store.mixture(dataset_id, track)), stems)
            rate = store.dataset_info(dataset_id)["sample_rate"]
            picks = sorted({0, len(W) // 2})
            mats = [(f"W_k at {starts[k] / rate:.1f} s", W[k]) for k in picks]
            mats += [("mean of W_k", W.mean(0)), ("std of W_k", W.std(0))]
            np.savez(out / f"weights-{safe}.npz", W=W, starts=starts, inputs=ins, outputs=outs)
        elif (W := mixer.matrix()) is not None:
            mats = [(f"{mixer.method} W", W)]
        else:
            continue
        paths.append(heatmap_figure(mats, ins, outs, out / f"weights-{safe}.png"))
    return paths


def evaluate(store: StemStore, dataset_id: str, *, models: list[str],
             runs: list[Path | tuple[str, Path]], split: str,
             out: Path, cache_root: Path, selection_split: str = "valid", oracles: bool = True,
             average: bool = True, full_metrics: bool = False, device=None, progress=True,
             listening=True, save_estimates: Path | None = None) -> dict:
    """Score every system; write the report folder. listening: True (the default page), False,
    or a reports.listening.ListeningOptions for report.html; save_estimates: a folder for every
    system's estimates (EstimateFolder), written from the pass that scores them."""
    from reports.paired import paired_statistics
    from reports.report import (
        best_single,
        boxplot_figure,
        summary_markdown,
        summary_tables,
        write_scores,
    )

    info = store.dataset_info(dataset_id)
    tracks = store.tracks(dataset_id, split)
    if not tracks:
        raise PipelineError(f"{store.dataset_dir(dataset_id)}: no tracks in the '{split}' split")
    keys = [store.resolve_model(m) for m in models] if models else \
        [k for k in store.models() if all(store.has_stems(k, dataset_id, t) for t in tracks)]
    names = [store.model_info(k)["name"] for k in keys]
    names = names if len(set(names)) == len(names) else keys
    for k, n in zip(keys, names):
        missing = [t.name for t in tracks if not store.has_stems(k, dataset_id, t)]
        if missing:
            raise PipelineError(f"{store.model_dir(k)}: model '{n}' has no stems for {len(missing)} "
                                f"'{split}' tracks (e.g. '{missing[0]}'); run `pipeline cache` for it")
    cache = ScoreCache(cache_root / dataset_id)
    bases = [base_system(store, dataset_id, k, n) for k, n in zip(keys, names)]
    systems, notes = list(bases), []
    for k, n in zip(keys, names):
        identity = store.model_info(k).get("identity", {})
        folds = identity.get("folds")
        if store.model_info(k).get("family") == "crossfit" and folds:
            here = ("this split's tracks held out by a fold by that fold's model, the others"
                    if split == "train" or split.startswith(("fit", "fold")) else
                    f"the '{split}' tracks")
            how = (f"one of the {len(folds)} (picked by a hash of the track's name)"
                   if identity.get("unseen") == "one" else f"the mean of the {len(folds)}")
            notes.append(f"{n}: cross-fitted, {len(folds)} fold models; each training track is "
                         f"separated by the fold model that never saw it, {here} by {how}")
    if len(bases) > 1:
        choice = select_best_per_source(store, dataset_id, bases, selection_split, cache, progress)
        if choice:
            systems.append(combined_system(store, dataset_id, "best per source", "selection", choice))
            picks = ", ".join(f"{s}: {names[keys.index(c[0][0])]}" for s, c in choice.items())
            notes.append(f"best per source (chosen on the {selection_split} split): {picks}")
        else:
            notes.append(f"best per source: skipped (base models lack stems for the "
                         f"{selection_split} split)")
        if average:
            avg = {}
            for s in info["sources"]:
                having = [b.detail["key"] for b in bases if s in b.targets]
                avg[s] = [(k, 1.0 / len(having)) for k in having]
            systems.append(combined_system(store, dataset_id, "average", "average", avg))
    run_sys = [run_system(store, dataset_id, Path(r[1]), device=device, name=r[0])
               if isinstance(r, tuple) else run_system(store, dataset_id, Path(r), device=device)
               for r in runs]
    seen = {s.name for s in systems}
    for r in run_sys:
        if r.name in seen:
            r.name = f"{r.name} ({Path(r.detail['run']).name})"
        seen.add(r.name)
    systems += run_sys
    oracle = oracle_systems(store, dataset_id) if oracles else []
    systems += oracle
    listen = None
    if listening:
        from reports.listening import ListeningBuild, ListeningOptions

        listen = ListeningBuild(out, store, dataset_id, systems, tracks,
                                listening if isinstance(listening, ListeningOptions) else ListeningOptions())
    saver = None if save_estimates is None else EstimateFolder(save_estimates, split,
                                                                 info["sample_rate"])
    watchers = [w for w in (listen.estimate if listen else None, saver) if w is not None]
    df = score_systems(store, dataset_id, systems, tracks, cache, progress=progress,
                       on_render=(lambda *a: [w(*a) for w in watchers]) if watchers else None,
                       render_all=saver is not None)
    if saver is not None:
        saver.finish()
    if full_metrics:
        df = pd.concat([df, _full_metrics(store, dataset_id, systems, tracks)], ignore_index=True)
    out.mkdir(parents=True, exist_ok=True)
    write_scores(df, out, rate=info["sample_rate"], subset_of={t.name: t.subset for t in tracks})
    base_names = [b.name for b in bases]
    reference = best_single(summary_tables(df, info["sources"], base_names)[0], base_names)
    paired = paired_statistics(df, reference, info["sources"])
    paired.to_csv(out / PAIRED_CSV, index=False)
    md = summary_markdown(df, dataset=info, split=split, base_systems=base_names,
                          oracle_systems=[o.name for o in oracle], notes=notes, paired=paired)
    (out / "summary.md").write_text(md)
    figures = [boxplot_figure(df, [s for s in info["sources"]], out / "sdr_boxplot.png")]
    if run_sys:
        figures += weight_figures(store, dataset_id, run_sys, tracks[0], out, device=device)
    write_json_atomic(out / "evaluation.json", {
        "dataset": dataset_id, "split": split, "tracks": [t.name for t in tracks],
        "store": str(store.root.resolve()),
        "systems": [{"name": s.name, "kind": s.kind, "targets": list(s.targets), **(s.detail or {})}
                    for s in systems], "figures": [p.name for p in figures],
        "paired": paired.to_dict("records")})
    result = {"summary": md, "out": out, "scores": df, "figures": figures,
              "paired": paired.to_dict("records")}
    if listen:
        result["listening"] = listen.finish(split=split, device=device, progress=progress)
    return result


# ---- rebuilding the listening report from a report folder ---------------------------------
def systems_from_record(store: StemStore, record: dict, device=None,
                        where="evaluation.json") -> list[System]:
    """The systems an evaluation.json lists, rebuilt over the same store."""
    dataset_id = record["dataset"]
    oracles = {o.name: o for o in oracle_systems(store, dataset_id)}
    systems = []
    for s in record["systems"]:
        if s["kind"] == "base":
            systems.append(base_system(store, dataset_id, s["key"], s["name"]))
        elif s["kind"] in ("selection", "average"):
            choice = {t: [(k, w) for k, w in c] for t, c in s["choice"].items()}
            systems.append(combined_system(store, dataset_id, s["name"], s["kind"], choice))
        elif s["kind"] == "run":
            systems.append(run_system(store, dataset_id, Path(s["run"]), device=device, name=s["name"]))
        elif s["name"] in oracles:
            systems.append(oracles[s["name"]])
        else:
            raise PipelineError(f"{where}: unknown system '{s['name']}' of kind '{s['kind']}'")
    return systems


def listening_report(report_dir: Path, store: StemStore, options=None, device=None,
                     progress=True) -> dict:
    """`pipeline report`: write report_dir/report.html again from its evaluation.json."""
    from reports.listening import ListeningBuild, ListeningOptions

    path = report_dir / "evaluation.json"
    record = read_json(path)
    wanted = set(record["tracks"])
    tracks = [t for t in store.tracks(record["dataset"]) if t.name in wanted]
    if len(tracks) != len(wanted):
        raise PipelineError(f"{store.root}: the store lacks {len(wanted) - len(tracks)} of the "
                            f"tracks evaluated in {report_dir}")
    tracks.sort(key=lambda t: record["tracks"].index(t.name))
    build = ListeningBuild(report_dir, store, record["dataset"], systems_from_record(store, record, device, path),
                           tracks, options or ListeningOptions())
    return build.finish(split=record["split"], device=device, progress=progress)
