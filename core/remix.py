"""`pipeline remix`: new training mixtures from the stems of a dataset's tracks.

Every source of a remix is cut from a random track of one split (its own draw per source), at a
random start, with a random gain of up to `gain_db` dB either way; the remix's mixture is the sum
of its stems. Demucs and Open-Unmix remix stems like this on the fly to train their own models;
here the remixes are written once as a derived dataset (stem folders, `ROOT/train/remix-NNNN/
<source>.wav` + `mixture.wav`, float32) so that the base models can be cached on them and every
fitting stage can read them like any dataset. `remix.json` at the root records, per remix and
source, the track, gain and start each stem came from, and the draw's parameters; the same
parameters give bit-identical files.

With `folds_of` (a cross-fitted base model, separators.families.crossfit) remix i draws every
source from the tracks of fold 1 + (i mod K) only, so the fold model that never saw that fold is
honest on the remix; `origins` tells the cache which tracks a remix was cut from.
"""
from __future__ import annotations

import functools
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.progress import progress_bar
from core.store import StemStore, TrackEntry, read_json, write_json_atomic
from core.synth import write_wav   # float32 WAV without libsndfile's timestamped PEAK chunk

MANIFEST = "remix.json"
FORMAT = "stem-ensemble remix 1"


@dataclass(frozen=True)
class RemixParams:
    dataset_id: str
    split: str
    n: int
    seed: int
    duration: float        # seconds per remix
    gain_db: float         # each stem's gain is uniform in [-gain_db, +gain_db] dB
    folds_of: str | None = None   # a cross-fit model folder (RUN/model) or None


def _folds(store: StemStore, folds_of: str | None, dataset_id: str,
           split_names: set[str]) -> list[list[str]] | None:
    """Per fold (in order), the split's tracks of that fold: from a cross-fitted run's
    RUN/model/crossfit.json, or, while its fold models still train, from its fold runs' K and
    core.splits' fixed assignment (the same by construction)."""
    from core.splits import fold_assignment, parse_fold

    if folds_of is None:
        return None
    run = Path(folds_of)
    run = run.parent if run.name == "model" else run
    path = run / "model" / "crossfit.json"
    if path.exists():
        d = read_json(path)
        found, lists = d.get("dataset_id"), [f["held_out"] for f in d["fold_models"]]
    else:
        configs = sorted(run.glob("fold-*/config.json"))
        fold = parse_fold(read_json(configs[0])["splits"]["fit"]) if configs else None
        if fold is None:
            raise PipelineError(f"--folds-of {folds_of}: not a cross-fitted run (no {path}, no "
                                f"fold-k/ trainings); train one with `pipeline train-base --folds K`")
        found, folds = read_json(configs[0]).get("dataset_id"), fold[2]
        where = fold_assignment([t.name for t in store.tracks(dataset_id, "train")], folds)
        lists = [[n for n, f in where.items() if f == k] for k in range(1, folds + 1)]
    if found != dataset_id:
        raise PipelineError(f"--folds-of {folds_of}: its folds are tracks of dataset {found}, "
                            f"not of {dataset_id}")
    # sorted: the draw must not depend on the order a list was recorded in (crossfit.json and
    # the fallback above list the same tracks in different orders)
    out = [sorted(n for n in names if n in split_names) for names in lists]
    empty = [str(k) for k, names in enumerate(out, 1) if not names]
    if empty:
        raise PipelineError(f"--folds-of {folds_of}: fold(s) {', '.join(empty)} have no track in "
                            f"this split; remix a split holding the folds (fit or train)")
    return out


def draw(params: RemixParams, tracks: list[TrackEntry], sources: list[str], rate: int,
         folds: list[list[str]] | None) -> list[dict]:
    """Every remix's recipe: name, fold, and per source the track, gain and start."""
    rng = np.random.default_rng(params.seed)
    length = int(round(params.duration * rate))
    by_name = {t.name: t for t in tracks}
    out = []
    for i in range(params.n):
        fold = None if folds is None else 1 + i % len(folds)
        pool = [by_name[n] for n in folds[fold - 1]] if folds is not None else tracks
        stems = {}
        for s in sources:
            t = pool[int(rng.integers(len(pool)))]
            offset = int(rng.integers(0, max(0, t.length - length) + 1))
            gain_db = float(rng.uniform(-params.gain_db, params.gain_db))
            stems[s] = {"track": t.name, "offset": offset, "gain_db": round(gain_db, 6),
                        "gain": float(np.float32(10 ** (round(gain_db, 6) / 20)))}
        out.append({"name": f"remix-{i + 1:04d}", "fold": fold, "stems": stems})
    return out


def render(store: StemStore, dataset_id: str, recipe: dict, tracks: dict[str, TrackEntry],
           sources: list[str], length: int) -> np.ndarray:
    """[S, 2, length] float32 stems of one remix (silence past a source track's end)."""
    stems = np.zeros((len(sources), 2, length), dtype=np.float32)
    for j, s in enumerate(sources):
        r = recipe["stems"][s]
        t = tracks[r["track"]]
        piece = np.asarray(store.references(dataset_id, t)[j, :, r["offset"]:r["offset"] + length],
                           dtype=np.float32)
        stems[j, :, :piece.shape[-1]] = piece * np.float32(r["gain"])
    return stems


def remix(store: StemStore, params: RemixParams, out: Path, *, force: bool = False,
          progress: bool = True) -> dict:
    """Write the remixes of `params` to `out` (see the module doc); returns the manifest.

    An interrupted run resumes (each remix folder is renamed into place when complete, the
    manifest written last); a folder holding other remixes is refused unless `force`."""
    info = store.dataset_info(params.dataset_id)
    sources, rate = list(info["sources"]), int(info["sample_rate"])
    if params.n < 1:
        raise PipelineError(f"remix --n {params.n}: at least one remix")
    if not params.duration > 0 or not 0 <= params.gain_db <= 24:
        raise PipelineError(f"remix: --duration {params.duration} must be > 0 s and --gain-db "
                            f"{params.gain_db} within [0, 24]")
    tracks = store.tracks(params.dataset_id, params.split)
    if not tracks:
        raise PipelineError(f"dataset {params.dataset_id}: no '{params.split}' tracks to remix")
    folds = _folds(store, params.folds_of, params.dataset_id, {t.name for t in tracks})
    length = int(round(params.duration * rate))
    recorded = {**asdict(params), "folds_of": (str(Path(params.folds_of).resolve())
                                               if params.folds_of else None)}
    recipes = draw(params, tracks, sources, rate, folds)
    manifest = {"format": FORMAT, "params": recorded, "sources": sources, "sample_rate": rate,
                "length": length, "source_root": info.get("root"), "remixes": recipes}
    out = Path(out)
    done_path, partial_path = out / MANIFEST, out / f".{MANIFEST}.partial"
    for path in (done_path, partial_path):
        if path.exists() and read_json(path) != manifest:
            if not force:
                raise PipelineError(f"{out}: holds other remixes ({path.name} differs); choose "
                                    f"another --name / --out, or pass --force to replace them")
            shutil.rmtree(out)
            break
    if done_path.exists():
        return manifest
    if out.exists() and not partial_path.exists() and any(out.iterdir()):
        if not force:
            raise PipelineError(f"{out}: exists and is not a remix folder; choose another "
                                f"--name / --out, or pass --force to replace it")
        shutil.rmtree(out)
    write_json_atomic(partial_path, manifest)
    by_name = {t.name: t for t in tracks}
    todo = [r for r in recipes if not (out / "train" / r["name"]).is_dir()]
    with progress_bar(total=len(todo), desc=f"remix {out.name}", unit="remix",
                      disable=not (progress and todo)) as bar:
        for r in todo:
            stems = render(store, params.dataset_id, r, by_name, sources, length)
            tmp = out / "train" / f".{r['name']}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            for s, x in zip(sources, stems):
                write_wav(tmp / f"{s}.wav", x, rate)
            write_wav(tmp / "mixture.wav", stems.sum(0, dtype=np.float32), rate)
            os.replace(tmp, out / "train" / r["name"])
            bar.update(1)
    write_json_atomic(done_path, manifest)
    partial_path.unlink()
    return manifest


@functools.lru_cache(maxsize=16)
def _manifest(path: str, mtime: float) -> dict:
    d = read_json(Path(path))
    return {"dataset_id": d["params"]["dataset_id"],
            "stems": {r["name"]: sorted({s["track"] for s in r["stems"].values()})
                      for r in d["remixes"]}}


def origins(store: StemStore, dataset_id: str, track: TrackEntry) -> list[tuple[str, str]]:
    """(dataset id, track name) of every track the audio of `track` was cut from: the tracks a
    remix's stems came from (its dataset's remix.json), else the track itself."""
    root = store.dataset_info(dataset_id).get("root")
    path = Path(root) / MANIFEST if root else None
    if path is None or not path.exists():
        return [(dataset_id, track.name)]
    m = _manifest(str(path), path.stat().st_mtime)
    if track.name not in m["stems"]:
        raise PipelineError(f"{path}: no remix named '{track.name}' (a track of {dataset_id})")
    return [(m["dataset_id"], name) for name in m["stems"][track.name]]


def describe(manifest: dict) -> str:
    p = manifest["params"]
    folds = f", each from one fold of {p['folds_of']}" if p["folds_of"] else ""
    return (f"{p['n']} remixes of {p['duration']:g} s from the '{p['split']}' tracks of "
            f"{p['dataset_id']} (seed {p['seed']}, gains within ±{p['gain_db']:g} dB{folds})")


