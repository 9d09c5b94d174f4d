"""`pipeline run CONFIG`: one experiment file drives every stage in order.

The file (TOML or YAML) names the dataset, the base models and their inference options, the
systems to build and the evaluation. Each stage skips what the stem store and earlier runs
already hold, so running an unchanged experiment again only re-reads and re-prints the report.
"""
from __future__ import annotations

import time
from pathlib import Path

from pipeline.config import check_name
from pipeline.errors import PipelineError

MIXERS = ("conv1x1", "mdx-mixer")   # trained by train-mixer; the rest: mixer.methods.METHODS
MODEL_OPTIONS = ("shifts", "overlap", "segment", "niter", "residual", "wiener_win_len")


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


# [[systems]] keys: every system's, a learned mixer's (train_mixer's arguments); an ensemble
# that trains nothing takes its options in mixer.methods.OPTIONS. `models_from` names a
# selection file (`pipeline select-models`) instead of listing `models`.
COMMON_KEYS = ("name", "method", "models", "models_from")
MIXER_KEYS = ("preset", "T", "F", "N", "p", "epochs", "batch", "lr", "shift", "seed",
              "max_segments_per_epoch", "num_workers", "init", "select", "with_mixture")


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
    for m in config["models"]:
        if "spec" not in m:
            raise PipelineError(f"{path}: every [[models]] needs a 'spec' (pretrained name, shipped name or path)")
    from mixer.methods import OPTIONS

    names = set()
    for s in config.get("systems", []):
        if s.get("method") not in tuple(OPTIONS) + MIXERS:
            raise PipelineError(f"{path}: system '{s.get('name')}' has method {s.get('method')!r}; "
                                f"choose one of {', '.join(tuple(OPTIONS) + MIXERS)}")
        if not s.get("name") or s["name"] in names:
            raise PipelineError(f"{path}: every [[systems]] needs a unique 'name'")
        check_name(s["name"], f"{path}: system name")
        if "models" in s and "models_from" in s:
            raise PipelineError(f"{path}: system '{s['name']}' has both 'models' and "
                                f"'models_from'; give one")
        allowed = COMMON_KEYS + (tuple(OPTIONS[s["method"]]) if s["method"] in OPTIONS else MIXER_KEYS)
        unknown = sorted(set(s) - set(allowed))
        if unknown:   # a typo would otherwise silently fall back to a default
            raise PipelineError(f"{path}: system '{s['name']}' ({s['method']}) has unknown "
                                f"key(s) {', '.join(unknown)}; allowed: {', '.join(allowed)}")
        names.add(s["name"])
    return config


def _model_ref(ref: str, keys: dict[str, str]) -> str:
    if ref not in keys:
        raise PipelineError(f"system refers to model '{ref}', which is not among the experiment's "
                            f"models ({', '.join(keys)})")
    return keys[ref]


def _system_models(system: dict, keys: dict[str, str], all_keys: list[str]) -> list[str]:
    """The store keys of a system's models: `models`, a `models_from` selection file, or all."""
    if "models_from" in system:
        from mixer.select import read_selection

        chosen = read_selection(system["models_from"])
        for key in chosen:
            if key not in all_keys:
                raise PipelineError(f"{system['models_from']}: chose model {key}, which is not "
                                    f"among the experiment's models ({', '.join(all_keys)})")
        return chosen
    return [_model_ref(r, keys) for r in system.get("models", [])] or all_keys


def run_experiment(config: dict, work: Path, *, device: str | None = None, progress: bool = True,
                   log=print) -> dict:
    """Execute the stages; returns the evaluation result (summary text, report folder)."""
    from cache.registry import load_separator
    from cache.run import cache_model, ingest_dataset
    from cache.store import StemStore
    from mixer import methods
    from mixer.train import train_mixer
    from pipeline.config import check_device, default_device, reports_dir, runs_dir, store_dir
    from pipeline.datasets import open_dataset_spec
    from reports.evaluate import evaluate

    t_start = time.perf_counter()
    device = check_device(device or config.get("device") or default_device())   # before any work
    name = config["name"]
    ds_conf = config["dataset"]
    spec = ds_conf["path"]
    if spec == "synthetic" and "generate" in ds_conf:
        from pipeline.synth import generate_dataset

        g = ds_conf["generate"]
        generate_dataset(work / "data" / "synthetic", seed=g.get("seed", 0), n_train=g.get("train", 28),
                         n_valid=g.get("valid", 6), n_test=g.get("test", 6),
                         duration=g.get("duration", 20.0), sample_rate=g.get("rate", 44100),
                         progress=progress)
    dataset = open_dataset_spec(spec, work)
    store = StemStore(store_dir(work))
    ingest_dataset(store, dataset, progress=progress)
    log(f"[dataset] {dataset}")

    splits = None
    if config.get("cache_splits"):
        splits = list(config["cache_splits"])
    keys: dict[str, str] = {}
    for m in config["models"]:
        options = {k: m[k] for k in MODEL_OPTIONS if k in m}
        sep = load_separator(m["spec"], device=device, offline=config.get("offline", True),
                             repo=m.get("repo"), options=options)
        spec = str(Path(m["spec"]).resolve()) if Path(m["spec"]).exists() else m["spec"]
        s = cache_model(store, dataset, sep, splits=splits, progress=progress,
                        load={"spec": spec, "repo": m.get("repo"), "options": options})
        keys[m["spec"]] = keys[m.get("name", sep.name)] = s["key"]
        log(f"[cache] {sep.name}: {s['computed']} tracks separated, {s['skipped']} cached "
            f"({s['seconds']:.1f} s)")
    all_keys = list(dict.fromkeys(keys[m["spec"]] for m in config["models"]))

    runs = []
    for system in config.get("systems", []):
        run_dir = runs_dir(work) / f"{name}-{system['name']}"
        chosen = _system_models(system, keys, all_keys)
        t0 = time.perf_counter()
        method = system["method"]
        if method in methods.OPTIONS:
            wanted = methods.with_defaults(method, system)
            if methods.is_current(run_dir, chosen, method, wanted):
                log(f"[{method}] {system['name']}: unchanged, kept {run_dir}")
            else:
                methods.build(store, dataset.id, chosen, method, run_dir, wanted, progress=progress)
                log(f"[{method}] {system['name']}: built in {time.perf_counter() - t0:.1f} s")
        else:
            hyper = {k: system[k] for k in MIXER_KEYS if k in system and k != "with_mixture"}
            train_mixer(store, dataset.id, chosen, system["method"], run_dir,
                        with_mixture=system.get("with_mixture", True), device=device,
                        progress=progress, **hyper)
            log(f"[train-mixer] {system['name']}: {time.perf_counter() - t0:.1f} s")
        runs.append((system["name"], run_dir))

    ev = config.get("evaluate", {})
    split = ev.get("split", "test")
    out = Path(ev["out"]) if ev.get("out") else reports_dir(work) / name
    result = evaluate(store, dataset.id, models=all_keys, runs=runs, split=split, out=out,
                      cache_root=work / "evalcache", selection_split=ev.get("selection_split", "valid"),
                      oracles=ev.get("oracles", True), full_metrics=ev.get("full_metrics", False),
                      device=device, progress=progress)
    result["seconds"] = time.perf_counter() - t_start
    return result
