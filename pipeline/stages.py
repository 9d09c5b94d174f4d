"""Every stage as a Python function taking the command line's options: `pipeline.cli` parses and
prints around these, and the Python API (pipeline.api) calls them as they are.

Each function opens the work folder (`work`, else $PIPELINE_WORK, else ./work), resolves datasets
and run names as the command line does, and returns what it wrote (summaries, configs, paths);
`log` receives the lines the command prints while it works.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Callable, Iterable, Sequence

from core.config import (
    check_name,
    default_device,
    reports_dir,
    run_folder,
    runs_dir,
    store_dir,
    work_dir,
)
from core.datasets import SYNTHETIC, open_dataset_spec
from core.errors import PipelineError
from core.store import StemStore, read_json

Log = Callable[[str], None]


def _quiet(line: str) -> None:
    pass


def open_store(work: str | Path | None = None) -> StemStore:
    return StemStore(store_dir(work_dir(work)))


def store_dataset_id(spec: str, work: Path, ingest: bool = False) -> str:
    """A dataset id in the store, from an id or from the dataset's folder / 'synthetic'.

    ingest: a dataset not yet in the store is stored first (as `pipeline cache -d` does), for
    stages that read only the dataset's own audio; else that is an error saying so.
    """
    store = StemStore(store_dir(work))
    if spec in store.datasets():
        return spec
    ds = open_dataset_spec(spec, work)
    if ingest:
        from cache.run import ingest_dataset

        ingest_dataset(store, ds)
    else:
        store.dataset_info(ds.id)  # a clear error when it was never cached
    return ds.id


# ---- data ------------------------------------------------------------------------------------
def make_dataset(out: str | Path | None = None, *, seed: int = 0, train: int = 28, valid: int = 6,
                 test: int = 6, duration: float = 20.0, rate: int = 44100, force: bool = False,
                 work: str | Path | None = None) -> Path:
    from core.synth import generate_dataset

    out = Path(out) if out else work_dir(work) / "data" / SYNTHETIC
    generate_dataset(out, seed=seed, n_train=train, n_valid=valid, n_test=test,
                     duration=duration, sample_rate=rate, overwrite=force)
    return out


def remix(dataset: str, *, split: str = "train", n: int = 80, seed: int = 0,
          folds_of: str | Path | None = None, duration: float = 6.0, gain_db: float = 3.0,
          name: str | None = None, out: str | Path | None = None, force: bool = False,
          work: str | Path | None = None, progress: bool = True) -> dict:
    """New training mixtures from the stems of `split`'s tracks (core.remix), written as a
    dataset (<work>/data/NAME, or OUT) and stored; returns its manifest, "dataset" (its store
    id) and "root". folds_of: a cross-fitted model's run (a name under <work>/runs or a folder):
    each remix then draws from one of its folds."""
    from cache.run import ingest_dataset
    from core.datasets import open_dataset
    from core.remix import RemixParams
    from core.remix import remix as write_remixes

    w = work_dir(work)
    store = StemStore(store_dir(w))
    ds_id = store_dataset_id(dataset, w, ingest=True)
    run = None
    if folds_of is not None:
        run = Path(folds_of) if Path(folds_of).exists() else runs_dir(w) / str(folds_of)
    if name is None:
        name = f"remix-{split}-n{n}-s{seed}" + (f"-{run.name}" if run is not None else "")
    root = Path(out) if out else w / "data" / check_name(name, "--name")
    params = RemixParams(ds_id, split, int(n), int(seed), float(duration), float(gain_db),
                         None if run is None else str(run))
    manifest = write_remixes(store, params, root, force=force, progress=progress)
    ds = open_dataset(root)
    ingest_dataset(store, ds, progress=progress)
    return {**manifest, "dataset": ds.id, "root": str(root)}


# ---- cache -----------------------------------------------------------------------------------
def cache(dataset: str, models: Sequence[str] = (), *, splits: Sequence[str] = (),
          device: str | None = None, offline: bool = False, repo: str | Path | None = None,
          shard: str | None = None, force: bool = False, work: str | Path | None = None,
          progress: bool = True, log: Log = _quiet, **model_options) -> dict:
    """Store the dataset's audio, then cache each base model's stems; model_options: the
    families' inference options (`pipeline cache --help`), shared by all the models."""
    from cache.run import cache_spec, ingest_dataset, parse_shard

    if dataset is None:
        raise PipelineError("pipeline cache: --dataset is required (a folder, or 'synthetic')")
    from separators.tta import check

    options = {k: v for k, v in model_options.items() if v is not None}
    check(options)   # before anything is read or written
    w = work_dir(work)
    store = StemStore(store_dir(w))
    ds = open_dataset_spec(dataset, w)
    shard_ = parse_shard(shard)
    n = ingest_dataset(store, ds, shard=shard_, force=force, progress=progress)
    log(f"{ds.id}: {len(ds)} tracks in the store ({n} written now)")
    summaries = []
    for spec in models:
        for s in cache_spec(store, ds, spec, device=device or default_device(), offline=offline,
                            repo=repo, options=options, splits=list(splits) or None,
                            shard=shard_, force=force, progress=progress):
            log(f"{s['name']} [{s['key']}]: {s['computed']} tracks separated, {s['skipped']} "
                f"already cached, {s['seconds']:.1f} s ({s['realtime']:.2f}x real time)")
            summaries.append(s)
    return {"dataset": ds.id, "ingested": n, "models": summaries}


def cache_import(folder: str | Path, name: str, dataset: str, *, splits: Sequence[str] = (),
                 work: str | Path | None = None) -> dict:
    """Register separations made elsewhere (museval layout) as a base model in the store."""
    from cache.imported import import_estimates
    from cache.run import ingest_dataset

    w = work_dir(work)
    store = StemStore(store_dir(w))
    ds = open_dataset_spec(dataset, w)
    ingest_dataset(store, ds, progress=False)
    return import_estimates(store, ds, name, Path(folder), splits=list(splits) or None)


# ---- base models -----------------------------------------------------------------------------
def train_base(family: str, dataset: str = SYNTHETIC, *, name: str | None = None,
               preset: str = "small", arch: str | None = None, xumx_loss: str | None = None,
               targets: Sequence[str] = (), epochs: int | None = None, batch: int | None = None,
               segment: float | None = None, lr: float | None = None, seed: int = 0,
               select_split: str | None = None, workers: int = 0, amp: str = "off",
               device: str | None = None, out: str | Path | None = None, fresh: bool = False,
               folds: int | None = None, work: str | Path | None = None, progress: bool = True,
               command: str | None = None):
    """Train a base separator of one family; the model lands in RUN/model/."""
    from separators.crossfit import train
    from separators.train_base import family_of

    w = work_dir(work)
    family_of(family)   # a typo fails before the dataset is ingested
    run = run_folder(w, name or f"{family}-{preset}", out)
    if fresh and run.exists() and ((run / "config.json").exists() or any(run.glob("fold-*/config.json"))):
        raise PipelineError(f"{run}: run folder exists; remove it or choose another --name to start over")
    ds_id = store_dataset_id(dataset, w, ingest=True)
    return train(StemStore(store_dir(w)), ds_id, family, preset, run, targets=list(targets) or None,
                 seed=seed, epochs=epochs, batch_size=batch, segment=segment, lr=lr, arch=arch,
                 xumx_loss=xumx_loss, device=device or default_device(), resume=not fresh,
                 amp=amp, num_workers=workers, select_split=select_split, progress=progress,
                 command=command or "pipeline " + " ".join(sys.argv[1:]), folds=folds)


# ---- ensembles -------------------------------------------------------------------------------
def blend(models: Sequence[str], dataset: str = SYNTHETIC, *, method: str = "blend",
          name: str | None = None, out: str | Path | None = None, force: bool = False,
          work: str | Path | None = None, progress: bool = True, **options) -> dict:
    """An ensemble that trains nothing (`pipeline blend --method`: the blend, the band-blend, the
    spectral ensembles, ...); options: the method's (`pipeline blend --help`). Returns the run's
    config, with "run" its folder."""
    from mixer import methods

    record = methods.get(method)
    if record.learned:
        raise PipelineError(f"ensemble method '{method}' is a learned mixer: train it with "
                            f"`pipeline train-mixer --arch {method}`")
    w = work_dir(work)
    run = run_folder(w, name or method, out)
    if (run / "config.json").exists() and not force:
        raise PipelineError(f"{run}: run folder exists; pass --force to overwrite or choose another --name")
    config = methods.fit(StemStore(store_dir(w)), store_dataset_id(dataset, w), list(models),
                         method, run, options, progress=progress)
    return {**config, "run": str(run)}


def select_models(models: Sequence[str], dataset: str = SYNTHETIC, *, by: str = "blend",
                  split: str = "select", objective: str = "museval", step: float = 0.1,
                  min_gain: float = 0.01, backward: bool = False, name: str | None = None,
                  out: str | Path | None = None, force: bool = False,
                  extra_data: Sequence[str] = (), search: str = "auto",
                  work: str | Path | None = None, log: Log = _quiet) -> dict:
    """Greedy forward selection of base models on the selection split; writes the selection file.
    search: how each set's blend is searched (--by blend; the blend's `search` option)."""
    from core import options as opts
    from mixer.blend import BlendOptions
    from mixer.select import select_models as select

    opts.build(BlendOptions, {"search": search}, "select-models")   # checked as the blend checks it
    w = work_dir(work)
    path = Path(out) if out else w / "selections" / f"{check_name(name or by, '--name')}.json"
    if path.exists() and not force:
        raise PipelineError(f"{path}: selection file exists; pass --force to overwrite or choose another --name")
    result = select(StemStore(store_dir(w)), store_dataset_id(dataset, w), list(models), by=by,
                    split=split, objective=objective, step=step, min_gain=min_gain,
                    backward=backward, search_mode=search, out=path, log=log,
                    extra_data=list(extra_data))
    return {**result, "file": str(path)}


def train_mixer(models: Sequence[str], arch: str = "mdx-mixer", dataset: str = SYNTHETIC, *,
                name: str | None = None, out: str | Path | None = None, fresh: bool = False,
                device: str | None = None, work: str | Path | None = None, progress: bool = True,
                **options) -> dict:
    """Train a learned mixer (`pipeline train-mixer --arch`); options: the architecture's
    learned method's (`pipeline train-mixer --help`). Returns the run's config, with "run" its
    folder and "summary" a line for people."""
    from mixer import methods

    record = methods.get(arch)
    if not record.learned:
        raise PipelineError(f"mixer architecture '{arch}': choose one of "
                            f"{', '.join(methods.names(learned=True))}")
    w = work_dir(work)
    options = {k: _run_ref(w, v) if _refers_to_run(record, k) and v is not None else v
               for k, v in options.items()}
    preset = methods.build_options(record, options).preset
    run = run_folder(w, name or f"{arch}-{preset}", out)
    config = methods.fit(StemStore(store_dir(w)), store_dataset_id(dataset, w), list(models),
                         arch, run, options, progress=progress, device=device or default_device(),
                         resume=not fresh)
    return {**config, "run": str(run)}


def _refers_to_run(record, key: str) -> bool:
    from core.options import specs

    return any(s.name == key and s.refers for s in specs(record.options))


def _run_ref(work: Path, value) -> str:
    """An option naming a run: a folder as it is, else a run name under <work>/runs."""
    path = Path(value)
    return str(path if path.exists() else run_folder(work, str(value)))


# ---- evaluation ------------------------------------------------------------------------------
def evaluate(dataset: str = SYNTHETIC, *, models: Sequence[str] = (),
             runs: Sequence[str | Path] = (), all_runs: bool = False,
             estimates: Sequence[str] = (), split: str = "test", selection_split: str = "valid",
             oracles: bool = True, full_metrics: bool = False, out: str | Path | None = None,
             html: bool = True, save_estimates: str | Path | None = None,
             device: str | None = None, work: str | Path | None = None,
             progress: bool = True) -> dict:
    """Score every system side by side; the report folder's summary, tables and figures."""
    from reports.evaluate import evaluate as score

    w = work_dir(work)
    store = StemStore(store_dir(w))
    ds_id = store_dataset_id(dataset, w, ingest=True)   # scoring estimates needs only the dataset
    models = list(models)
    for item in estimates:
        if "=" not in item:
            raise PipelineError(f"--estimates {item}: expected NAME=DIR")
        est_name, folder = item.split("=", 1)
        from cache.imported import import_estimates
        from core.datasets import open_dataset

        ds = open_dataset(store.dataset_info(ds_id)["root"])
        import_estimates(store, ds, est_name, Path(folder), splits=[split])
        models = models or [k for k in store.models() if store.model_info(k)["family"] != "imported"]
        models.append(est_name)
    found = [Path(r) if Path(r).exists() else runs_dir(w) / r for r in runs]
    if all_runs and runs_dir(w).exists():
        found += [d for d in sorted(runs_dir(w).iterdir()) if (d / "config.json").exists()
                  and read_json(d / "config.json").get("dataset") == ds_id and d not in found]
    for r in found:
        if not (r / "config.json").exists():
            raise PipelineError(f"{r}: not a run folder (no config.json)")
    out = Path(out) if out else reports_dir(w) / check_name(f"{ds_id}-{split}",
                                                             "report name (from --split)")
    result = score(store, ds_id, models=models, runs=found, split=split, out=out,
                   cache_root=w / "evalcache", selection_split=selection_split, oracles=oracles,
                   full_metrics=full_metrics, device=device, listening=html,
                   save_estimates=None if save_estimates is None else Path(save_estimates),
                   progress=progress)
    return {**result, "out": out}


def report_folder(target: str, work: Path) -> Path:
    """A report folder; a name under <work>/reports; or a mixer run, whose one report it is."""
    for d in (Path(target), reports_dir(work) / target):
        if (d / "evaluation.json").exists():
            return d
    run = next((d for d in (Path(target), runs_dir(work) / target) if (d / "config.json").exists()), None)
    if run is None:
        raise PipelineError(f"{target}: neither a report folder (with evaluation.json), nor a report "
                            f"or run name under {work}")
    found = [p.parent for p in sorted(reports_dir(work).glob("*/evaluation.json"))
             if any(s.get("run") and Path(s["run"]).resolve() == run.resolve()
                    for s in read_json(p)["systems"])]
    if len(found) != 1:
        raise PipelineError(f"{run}: " + (f"evaluated in {len(found)} reports ({', '.join(map(str, found))}); "
                                          f"give the report folder" if found else
                                          f"no report under {reports_dir(work)} evaluates this run; "
                                          f"run `pipeline evaluate --run {run}` first"))
    return found[0]


def report(target: str, *, tracks: Iterable[str] = (), systems: Iterable[str] = (),
           excerpt: float | None = None, whole_below: float | None = None, kbps: int | None = None,
           max_mb: float | None = None, device: str | None = None,
           work: str | Path | None = None) -> dict:
    """Rebuild report.html (the listening report) of an evaluation."""
    from reports.evaluate import listening_report
    from reports.listening import ListeningOptions

    w = work_dir(work)
    out = report_folder(target, w)
    recorded = Path(read_json(out / "evaluation.json").get("store", store_dir(w)))
    store = StemStore(recorded if recorded.exists() else store_dir(w))
    given = {k: v for k, v in dict(excerpt=excerpt, whole_below=whole_below, kbps=kbps,
                                   max_mb=max_mb).items() if v is not None}
    options = ListeningOptions(tracks=tuple(tracks), systems=tuple(systems), **given)
    return listening_report(out, store, options, device=device)


# ---- applying an ensemble, whole experiments ---------------------------------------------------
def separate(files: Sequence[str | Path], ensemble: str | Path, out: str | Path, *,
             force: bool = False, device: str | None = None, offline: bool = False,
             fmt: str = "wav", consistency: str | None = None, work: str | Path | None = None,
             log: Log = _quiet) -> dict:
    """Separate audio files with a trained ensemble: OUT/<file stem>/<target>.<fmt>;
    consistency: another projection onto the mixture than the run's (mixer.consistency)."""
    from pipeline.separate import separate_files

    return separate_files(files, ensemble, out, work=work_dir(work), force=force,
                          device=device or default_device(), offline=offline, fmt=fmt,
                          consistency=consistency, log=log)


def run(config: str | Path, *, device: str | None = None, work: str | Path | None = None,
        progress: bool = True, log: Log = _quiet) -> dict:
    """An experiment file, every stage in order, skipping done work."""
    from pipeline.experiment import load_experiment, run_experiment

    return run_experiment(load_experiment(config), work_dir(work), device=device,
                          progress=progress, log=log)
