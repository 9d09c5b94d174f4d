"""`pipeline run CONFIG`: one experiment file drives every stage in order.

The file (TOML or YAML) names the dataset, the base models to train (`[[train]]`, each a
`separators.train_base.train_base` run in <work>/runs/<name>), the base models to cache and their
inference options (`[[models]]`: a pretrained name, a path, or `trained = "<a [[train]] name>"`),
the systems to build and the evaluation. Each stage skips what the stem store and earlier runs
already hold and resumes what was interrupted, so running an unchanged experiment again only
re-reads and re-prints the report.

Stage order keeps the evaluation split unread until the evaluation: ingest, train base models,
cache every split but the evaluation split, blend / mixers, cache the evaluation split, evaluate.
`validate` refuses a stage that would fit or select on the evaluation split.
"""
from __future__ import annotations

import time
from pathlib import Path

from core import options as opts
from core.config import check_name
from core.errors import PipelineError


def load_experiment(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise PipelineError(f"{path}: experiment file not found")
    text = path.read_text()
    try:
        if path.suffix.lower() in (".yaml", ".yml"):
            import yaml

            config = yaml.safe_load(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            config = tomllib.loads(text)
    except Exception as e:
        raise PipelineError(f"{path}: not a valid experiment file ({str(e).splitlines()[0]})") from None
    return validate(config, path)


# [[systems]] keys: these, and the method's options (mixer.methods: each method's record; a
# learned mixer's are train-mixer's). `models_from` names a selection file (`pipeline
# select-models`) instead of listing `models`.
COMMON_KEYS = ("name", "method", "models", "models_from")
# [[models]] keys: these, and the base-model families' inference options; [[train]] keys:
# train_base's arguments ("model" / "train": its model_options / train_options tables, "batch":
# batch_size)
MODELS_KEYS = ("spec", "trained", "name", "repo")
TRAIN_KEYS = ("name", "family", "preset", "epochs", "lr", "seed", "select_split", "batch",
              "segment", "samples_per_epoch", "arch", "xumx_loss", "targets", "model", "train",
              "amp", "num_workers", "folds")
# [[remix]] keys: `pipeline remix`'s options; `folds_of` names a [[train]] stage with `folds`
REMIX_KEYS = ("name", "split", "n", "seed", "folds_of", "duration", "gain_db")
EVALUATE_KEYS = ("split", "selection_split", "oracles", "full_metrics", "out")


def model_options() -> tuple[str, ...]:
    from separators.families import option_names

    return tuple(sorted(option_names()))


def _check_keys(path, what: str, table: dict, allowed) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:   # a typo would otherwise silently fall back to a default
        raise PipelineError(f"{path}: {what} has unknown key(s) {', '.join(unknown)}; "
                            f"allowed: {', '.join(allowed)}")


def _overlap(a: str, b: str) -> bool:
    """Whether two splits share tracks (select, fit and the folds are parts of train)."""
    from core.splits import is_part_of_train

    parent = lambda s: "train" if is_part_of_train(s) else s   # noqa: E731
    return a == b or parent(a) == b or parent(b) == a


def _honest(path, evaluated: str, what: str, split: str, key: str) -> None:
    if _overlap(split, evaluated):
        raise PipelineError(f"{path}: {what} would use the '{split}' split, which overlaps the "
                            f"evaluation split '{evaluated}'; set {key} to another split (e.g. "
                            f"'select', a fixed tenth of train)")


def _validate_train(stages: list, path) -> dict[str, dict]:
    from separators.train_base import PRESET_NAMES, resolve_config

    if not isinstance(stages, list):
        raise PipelineError(f"{path}: 'train' must be a list of [[train]] tables")
    by_name = {}
    for t in stages:
        name = t.get("name")
        if not name or not isinstance(name, str) or name in by_name:
            raise PipelineError(f"{path}: every [[train]] needs a unique 'name' (its run folder "
                                f"<work>/runs/<name>), got {name!r}")
        check_name(name, f"{path}: [[train]] name")
        _check_keys(path, f"[[train]] '{name}'", t, TRAIN_KEYS)
        if "family" not in t:
            raise PipelineError(f"{path}: [[train]] '{name}' needs a 'family' (umx, xumx, demucs, roformer)")
        preset = t.get("preset", "small")
        if preset not in PRESET_NAMES:
            raise PipelineError(f"{path}: [[train]] '{name}' has preset {preset!r}; choose one of "
                                f"{', '.join(PRESET_NAMES)}")
        if "folds" in t and (not isinstance(t["folds"], int) or isinstance(t["folds"], bool)
                             or t["folds"] < 2 or t.get("select_split") != "select"):
            raise PipelineError(f"{path}: [[train]] '{name}': folds = {t['folds']!r} needs an "
                                f"integer >= 2 and select_split = \"select\" (the folds share "
                                f"the training tracks outside it)")
        for sub in ("model", "train"):
            if not isinstance(t.get(sub, {}), dict):
                raise PipelineError(f"{path}: [[train]] '{name}': '{sub}' must be a table of options")
        try:   # the family's own check of its options, before hours of other stages
            resolve_config(t["family"], preset, sample_rate=44100, n_train_tracks=1,
                           targets=["x"], model_options=t.get("model"),
                           train_options=t.get("train"))
        except PipelineError as e:
            raise PipelineError(f"{path}: [[train]] '{name}': {e}") from None
        by_name[name] = t
    return by_name


def validate(config: dict, path) -> dict:
    if not isinstance(config, dict):
        raise PipelineError(f"{path}: expected a table at the top level")
    for key in ("name", "dataset", "models"):
        if key not in config:
            raise PipelineError(f"{path}: missing '{key}'")
    # the names become folders: reports/<name>, runs/<name>-<system>
    check_name(config["name"], f"{path}: experiment name")
    if not isinstance(config["models"], list) or not config["models"]:
        raise PipelineError(f"{path}: 'models' must be a non-empty list of [[models]] tables")
    trained = _validate_train(config.get("train", []), path)
    for m in config["models"]:
        what = f"[[models]] '{m.get('name') or m.get('spec') or m.get('trained')}'"
        _check_keys(path, what, m, MODELS_KEYS + model_options())
        if ("spec" in m) == ("trained" in m):
            raise PipelineError(f"{path}: every [[models]] needs either a 'spec' (pretrained name, "
                                f"shipped name or path) or 'trained' (the name of a [[train]] stage)")
        try:
            from separators.tta import check

            check({k: m[k] for k in model_options() if k in m})
        except PipelineError as e:
            raise PipelineError(f"{path}: {what}: {e}") from None
        if "trained" in m and m["trained"] not in trained:
            raise PipelineError(f"{path}: {what} refers to trained = {m['trained']!r}, which is "
                                f"not a [[train]] stage ({', '.join(trained) or 'none declared'})")
    ev = config.get("evaluate", {})
    _check_keys(path, "[evaluate]", ev, EVALUATE_KEYS)
    evaluated = ev.get("split", "test")
    remixes = _validate_remix(config.get("remix", []), trained, evaluated, path)
    _honest(path, evaluated, "[evaluate] selection_split (best per source)",
            ev.get("selection_split", "valid"), "selection_split")
    for name, t in trained.items():
        # train_base's default: the valid split when the dataset has one
        _honest(path, evaluated, f"[[train]] '{name}' (best epoch)",
                t.get("select_split", "valid"), "select_split")
        _honest(path, evaluated, f"[[train]] '{name}' (training data)",
                "fit" if t.get("select_split") == "select" else "train", "select_split")
    from mixer import methods

    names = {}
    for s in config.get("systems", []):
        if s.get("method") not in methods.names():
            raise PipelineError(f"{path}: system '{s.get('name')}' has method {s.get('method')!r}; "
                                f"choose one of {', '.join(methods.names())}")
        if not s.get("name") or s["name"] in names:
            raise PipelineError(f"{path}: every [[systems]] needs a unique 'name'")
        check_name(s["name"], f"{path}: system name")
        if "models" in s and "models_from" in s:
            raise PipelineError(f"{path}: system '{s['name']}' has both 'models' and "
                                f"'models_from'; give one")
        method = methods.get(s["method"])
        what = f"system '{s['name']}'"
        specs = opts.specs(method.options)
        _check_keys(path, f"{what} ({method.name})", s,
                    COMMON_KEYS + tuple(x.experiment_key for x in specs))
        try:
            options = methods.build_options(method, _options_of(s, specs), f"{path}: {what}")
        except PipelineError as e:
            raise PipelineError(str(e)) from None
        for reading, split, key in method.reads(options):
            _honest(path, evaluated, f"{what} ({method.name} {reading})", split, key)
        unknown = [r for r in getattr(options, "extra_data", ()) if r not in remixes]
        if unknown:   # a dataset named here could be anything, the evaluation split included
            raise PipelineError(f"{path}: {what} has extra_data {', '.join(map(repr, unknown))}; "
                                f"name [[remix]] stages ({', '.join(remixes) or 'none declared'})")
        for x in specs:   # an option naming another system's run: one listed before
            if x.refers and x.experiment_key in s:
                kind = x.refers.partition(":")[2]   # "run:conv1x1": a conv1x1 system's
                fits = [n for n, m in names.items() if not kind or m == kind]
                if s[x.experiment_key] not in fits:
                    raise PipelineError(f"{path}: {what} has {x.experiment_key} = "
                                        f"{s[x.experiment_key]!r}: name a {kind or 'system'}"
                                        f"{' system' if kind else ''} listed before it "
                                        f"({', '.join(fits) or 'none'})")
        names[s["name"]] = method.name
    return config


def _validate_remix(stages: list, trained: dict[str, dict], evaluated: str, path) -> dict[str, dict]:
    if not isinstance(stages, list):
        raise PipelineError(f"{path}: 'remix' must be a list of [[remix]] tables")
    by_name = {}
    for r in stages:
        name = r.get("name")
        if not name or not isinstance(name, str) or name in by_name or name in trained:
            raise PipelineError(f"{path}: every [[remix]] needs a unique 'name' (its dataset "
                                f"<work>/data/<name>), got {name!r}")
        check_name(name, f"{path}: [[remix]] name")
        _check_keys(path, f"[[remix]] '{name}'", r, REMIX_KEYS)
        _honest(path, evaluated, f"[[remix]] '{name}' (its stems)", r.get("split", "train"), "split")
        ref = r.get("folds_of")
        if ref is not None and not trained.get(ref, {}).get("folds"):
            raise PipelineError(f"{path}: [[remix]] '{name}' has folds_of = {ref!r}; name a "
                                f"[[train]] stage with folds")
        by_name[name] = r
    return by_name


def _options_of(system: dict, specs) -> dict:
    return {x.experiment_key: system[x.experiment_key] for x in specs if x.experiment_key in system}


def _model_ref(ref: str, keys: dict[str, list[str] | None]) -> list[str]:
    if ref not in keys:
        raise PipelineError(f"system refers to model '{ref}', which is not among the experiment's "
                            f"models ({', '.join(k for k, v in keys.items() if v)})")
    if keys[ref] is None:
        raise PipelineError(f"system refers to model '{ref}', which several [[models]] entries "
                            f"share (the same spec with other options); give each a 'name' and "
                            f"refer to that")
    return keys[ref]


def _system_models(system: dict, keys: dict[str, list[str]], all_keys: list[str]) -> list[str]:
    """The store keys of a system's models: `models`, a `models_from` selection file, or all."""
    if "models_from" in system:
        from mixer.select import read_selection

        chosen = read_selection(system["models_from"])
        for key in chosen:
            if key not in all_keys:
                raise PipelineError(f"{system['models_from']}: chose model {key}, which is not "
                                    f"among the experiment's models ({', '.join(all_keys)})")
        return chosen
    return [k for r in system.get("models", []) for k in _model_ref(r, keys)] or all_keys


def train_stages(config: dict, store, dataset_id: str, work: Path, *, device: str,
                 progress: bool, log) -> dict[str, Path]:
    """Train (or resume, or keep as finished) every [[train]] stage; {name: its model folder}."""
    from core.config import runs_dir
    from separators.crossfit import train

    models = {}
    for t in config.get("train", []):
        t0 = time.perf_counter()
        run_dir = runs_dir(work) / t["name"]
        result = train(
            store, dataset_id, t["family"], t.get("preset", "small"), run_dir,
            targets=t.get("targets"), seed=t.get("seed", 0), epochs=t.get("epochs"),
            batch_size=t.get("batch"), segment=t.get("segment"),
            samples_per_epoch=t.get("samples_per_epoch"), lr=t.get("lr"), arch=t.get("arch"),
            xumx_loss=t.get("xumx_loss"), model_options=t.get("model"),
            train_options=t.get("train"), device=device, amp=t.get("amp", "off"),
            num_workers=t.get("num_workers", 0), progress=progress,
            select_split=t.get("select_split"), folds=t.get("folds"),
            command=f"pipeline run ({config['name']}, [[train]] {t['name']})")
        state = ("finished earlier, kept" if result.kept else
                 f"trained in {time.perf_counter() - t0:.0f} s")
        if t.get("folds"):
            state += f", cross-fitted: {t['folds']} fold models"
        log(f"[train] {t['name']}: {state} (best epoch {result.best_epoch} of "
            f"{result.config['train']['epochs']}, {result.config['splits']['select']} loss "
            f"{result.best_valid:.4g})")
        models[t["name"]] = result.model_dir
    return models


def remix_stages(config: dict, store, dataset_id: str, work: Path, *, progress: bool,
                 log) -> dict[str, object]:
    """Write (or keep) every [[remix]] dataset and store it; {name: its core.datasets.Dataset}."""
    from cache.run import ingest_dataset
    from core.config import runs_dir
    from core.datasets import open_dataset
    from core.remix import RemixParams, describe, remix

    out = {}
    for r in config.get("remix", []):
        ref = r.get("folds_of")
        params = RemixParams(dataset_id, r.get("split", "train"), int(r.get("n", 80)),
                             int(r.get("seed", 0)), float(r.get("duration", 6.0)),
                             float(r.get("gain_db", 3.0)),
                             None if ref is None else str(runs_dir(work) / ref))
        root = work / "data" / r["name"]
        manifest = remix(store, params, root, progress=progress)
        ds = open_dataset(root)
        ingest_dataset(store, ds, progress=progress)
        log(f"[remix] {r['name']}: {describe(manifest)} ({ds.id})")
        out[r["name"]] = ds
    return out


def remix_models(config: dict, remixes: dict) -> dict[str, list[int]]:
    """{remix name: the [[models]] entries (indices) some system fits on it}: a model is cached
    on a remix only when a system needs it there."""
    wanted: dict[str, set[int]] = {name: set() for name in remixes}
    refs: dict[str, set[int]] = {}
    for i, m in enumerate(config["models"]):
        for ref in (m.get("spec"), m.get("trained"), m.get("name")):
            if ref:
                refs.setdefault(ref, set()).add(i)
    # A spec or trained name several entries share names the entry that has no name of its own
    # (an entry with one, e.g. the same model with other options, is referred to by it), as
    # cache_stage resolves it; where that does not decide, every entry is cached there.
    for ref, entries in refs.items():
        named = {i for i in entries if config["models"][i].get("name") == ref}
        plain = {i for i in entries if not config["models"][i].get("name")}
        refs[ref] = named or plain or entries
    for s in config.get("systems", []):
        chosen = (set().union(*(refs[r] for r in s["models"] if r in refs)) if "models" in s
                  else set(range(len(config["models"]))))
        for name in s.get("extra_data", []):
            wanted[name] |= set(chosen)
    return {name: sorted(v) for name, v in wanted.items()}


def cache_stage(config: dict, store, dataset, trained: dict[str, Path], *, splits, device: str,
                progress: bool, log, only: list[int] | None = None
                ) -> tuple[dict[str, list[str] | None], list[str]]:
    """Cache every [[models]] entry (only: those of these indices) on `splits` (None: all).
    Returns ({its spec, name or trained name, and each model's own name: the store keys}, every
    entry's keys in order): an entry under `tta_members` is several models. A spec two entries
    share (a model with and without `tta`) names the model whose own name it is (the plain
    one), else no model (None)."""
    from cache.run import cache_spec

    keys: dict[str, list[str] | None] = {}
    shared, own, ordered = set(), {}, []
    for i, m in enumerate(config["models"]):
        if only is not None and i not in only:
            continue
        options = {k: m[k] for k in model_options() if k in m}
        spec = str(trained[m["trained"]]) if "trained" in m else m["spec"]
        cached = cache_spec(store, dataset, spec, device=device, offline=config.get("offline", True),
                            repo=m.get("repo"), options=options, splits=splits, progress=progress)
        mine = [s["key"] for s in cached]
        ordered += mine
        for ref in (m.get("spec"), m.get("trained"), m.get("name")):
            if ref:
                if keys.get(ref, mine) != mine:
                    shared.add(ref)
                keys.setdefault(ref, mine)
        for s in cached:
            own.setdefault(s["name"], [s["key"]])
            log(f"[cache] {s['name']}{'' if only is None else ' on ' + dataset.root.name}: "
                f"{s['computed']} tracks separated, {s['skipped']} cached ({s['seconds']:.1f} s)")
    for ref in shared:
        keys[ref] = own.get(ref)
    for name, k in own.items():
        keys.setdefault(name, k)
    return keys, list(dict.fromkeys(ordered))


def _cache_phases(config: dict, evaluated: str) -> tuple[list[str] | None, list[str]]:
    """(splits cached before fitting anything, splits cached just before the evaluation)."""
    wanted = list(config["cache_splits"]) if config.get("cache_splits") else None
    if evaluated not in ("train", "valid", "test"):
        return wanted, []   # a derived split shares its tracks' split with fitting: no phases
    first = [s for s in (wanted or ("train", "valid", "test")) if s != evaluated]
    return first, ([evaluated] if wanted is None or evaluated in wanted else [])


def run_experiment(config: dict, work: Path, *, device: str | None = None, progress: bool = True,
                   log=print) -> dict:
    """Execute the stages; returns the evaluation result (summary text, report folder)."""
    from cache.run import ingest_dataset
    from core.config import (
        check_device,
        default_device,
        reports_dir,
        runs_dir,
        store_dir,
    )
    from core.datasets import open_dataset_spec
    from core.store import StemStore
    from mixer import methods
    from reports.evaluate import evaluate

    t_start = time.perf_counter()
    device = check_device(device or config.get("device") or default_device())   # before any work
    name = config["name"]
    ds_conf = config["dataset"]
    spec = ds_conf["path"]
    if spec == "synthetic" and "generate" in ds_conf:
        from core.synth import generate_dataset

        g = ds_conf["generate"]
        generate_dataset(work / "data" / "synthetic", seed=g.get("seed", 0), n_train=g.get("train", 28),
                         n_valid=g.get("valid", 6), n_test=g.get("test", 6),
                         duration=g.get("duration", 20.0), sample_rate=g.get("rate", 44100),
                         progress=progress)
    dataset = open_dataset_spec(spec, work)
    store = StemStore(store_dir(work))
    ingest_dataset(store, dataset, progress=progress)
    log(f"[dataset] {dataset}")

    trained = train_stages(config, store, dataset.id, work, device=device, progress=progress,
                           log=log)
    ev = config.get("evaluate", {})
    split = ev.get("split", "test")
    before, after = _cache_phases(config, split)
    remixes = remix_stages(config, store, dataset.id, work, progress=progress, log=log)
    keys, all_keys = cache_stage(config, store, dataset, trained, splits=before, device=device,
                                 progress=progress, log=log)
    for rname, needed in remix_models(config, remixes).items():
        cache_stage(config, store, remixes[rname], trained, splits=None, device=device,
                    progress=progress, log=log, only=needed)

    runs = []
    for system in config.get("systems", []):
        run_dir = runs_dir(work) / f"{name}-{system['name']}"
        chosen = _system_models(system, keys, all_keys)
        t0 = time.perf_counter()
        record = methods.get(system["method"])
        specs = opts.specs(record.options)
        given = {x.name: (runs_dir(work) / f"{name}-{system[x.experiment_key]}"
                          if x.refers else system[x.experiment_key])
                 for x in specs if x.experiment_key in system}
        if "extra_data" in given:   # [[remix]] names -> their store ids
            given["extra_data"] = [remixes[r].id for r in given["extra_data"]]
        options = methods.build_options(record, given)
        if not record.learned and methods.is_current(run_dir, chosen, record.name, options):
            log(f"[{record.name}] {system['name']}: unchanged, kept {run_dir}")
        else:   # a learned mixer resumes, or keeps a finished run with these options, itself
            methods.fit(store, dataset.id, chosen, record.name, run_dir, given,
                        progress=progress, device=device)
            log(f"[{record.name}] {system['name']}: {time.perf_counter() - t0:.1f} s")
        runs.append((system["name"], run_dir))

    if after:   # everything is fitted: only now are the evaluation tracks separated
        cache_stage(config, store, dataset, trained, splits=after, device=device,
                    progress=progress, log=log)
    out = Path(ev["out"]) if ev.get("out") else reports_dir(work) / name
    result = evaluate(store, dataset.id, models=all_keys, runs=runs, split=split, out=out,
                      cache_root=work / "evalcache", selection_split=ev.get("selection_split", "valid"),
                      oracles=ev.get("oracles", True), full_metrics=ev.get("full_metrics", False),
                      device=device, progress=progress)
    result["seconds"] = time.perf_counter() - t_start
    return result
