"""Ensemble methods: every way of combining cached stems into estimates, one record each.

A method is declared once, as a `Method` record in its own module (listed in `BUILTIN`; other
packages add theirs through the `stem_ensemble.methods` entry point group): its name, its
options dataclass (core.options), `fit` (search or train, and write the run folder) and `load`
(a run folder -> the `Mixer` that applies it). The command line (`pipeline blend --method`,
`pipeline train-mixer --arch`), experiment files, the evaluation and `pipeline separate` derive
everything from these records. Each mixer architecture (mixer.models.ARCHS) is also a method, the
one `pipeline train-mixer --arch NAME` trains (mixer.learned).

A run folder holds config.json: "method", "inputs" (mixer.inputs.InputSpec), "options" (the
method's options as fitted) and whatever the method needs to apply it (weights, a mixer.pt).
"""
from __future__ import annotations

import dataclasses
import functools
from pathlib import Path
from typing import Any, Mapping

from core import options as opts
from core.errors import PipelineError
from core.registry import Registry
from core.store import StemStore, read_json, write_json_atomic
from mixer.consistency import ConsistencyOptions, check
from mixer.ensemble import CONFIG, FitRequest, Method, Mixer, recorded_options

BUILTIN = ("mixer.blend", "mixer.bandblend", "mixer.spectral")
METHODS: Registry[Method] = Registry("ensemble method", BUILTIN, group="stem_ensemble.methods")


def get(name: str) -> Method:
    """The method called `name`: a registered one, or the learned method of a mixer architecture."""
    from mixer.models import ARCHS
    from mixer.train import learned_method

    if name in METHODS:
        return _consistent(METHODS.get(name))
    if name in ARCHS:
        return learned_method(ARCHS.get(name))
    raise PipelineError(f"ensemble method '{name}': choose one of {', '.join(names())}")


@functools.lru_cache(maxsize=None)
def _consistent(record: Method) -> Method:
    """The method with mixture consistency among its options (every method's)."""
    if record.options is not None and "consistency" in record.options.__dataclass_fields__:
        return record
    name = (record.options.__name__ if record.options else "Options")
    return dataclasses.replace(record, options=opts.combine(name, record.options, ConsistencyOptions))


def names(learned: bool | None = None) -> list[str]:
    """Every method's name (learned=False: those `pipeline blend` builds; True: the mixers)."""
    from mixer.models import ARCHS

    fixed = [] if learned is True else METHODS.names()
    return fixed + ([] if learned is False else ARCHS.names())


def records(learned: bool | None = None) -> list[Method]:
    return [get(n) for n in names(learned)]


def build_options(method: Method, values: Mapping[str, Any] | None, where: str | None = None):
    """The method's options from `values` (experiment keys or field names; None values take the
    defaults); an option it does not have is a one-line error naming the ones it has."""
    where = where or f"ensemble method '{method.name}'"
    specs = opts.specs(method.options)
    known = {s.experiment_key for s in specs} | {s.name for s in specs}
    unknown = sorted(k for k, v in (values or {}).items() if v is not None and k not in known)
    if unknown:
        raise PipelineError(f"{where} takes no {', '.join(unknown)} (its options: "
                            f"{', '.join(s.experiment_key for s in specs) or 'none'})")
    return opts.build(method.options, values, where)


def load_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise PipelineError(f"{path}: not a mixer run (no config.json); run blend or train-mixer first")
    return read_json(path)


def is_current(run_dir: str | Path, models: list[str], method: str, options) -> bool:
    """Whether run_dir already holds this method over these models (store keys) with these
    options (runs written before options were recorded are not: they are built again)."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        return False
    config = read_json(path)
    return (config.get("method") == method and config.get("inputs", {}).get("model_keys") == models
            and config.get("options") == recorded_options(options))


def fit(store: StemStore, dataset_id: str, models: list[str], method: str,
        run_dir: str | Path | None, options: Mapping[str, Any] | None = None, *,
        progress: bool = True, device: str = "cpu", resume: bool = True) -> dict:
    """Build `method` over `models` (store keys or names) into run_dir; returns its config.

    Mixture consistency, every method's option, is checked against the dataset (the split the
    method fits on) and recorded here for the methods that train nothing; a learned mixer
    trains through it (mixer.train)."""
    record = get(method)
    built = build_options(record, options)
    mode = getattr(built, "consistency", "none")
    found = None
    if mode != "none" and not record.learned:
        splits = [split for _, split, _ in record.reads(built)] or ["train"]
        found = check(store, dataset_id, mode, splits[0])
    config = record.fit(FitRequest(store, dataset_id, list(models), built,
                                   None if run_dir is None else Path(run_dir), progress, device,
                                   resume))
    if not record.learned:
        config = {**config, "options": recorded_options(built)}
        if found:
            config.update(consistency=mode, consistency_check=found)
        if run_dir is not None:
            write_json_atomic(Path(run_dir) / CONFIG, {k: v for k, v in config.items()
                                                       if k != "summary"})
    return config


def load_mixer(run_dir: str | Path, device=None, batch: int = 1,
               consistency: str | None = None) -> Mixer:
    """The run folder as a Mixer (an MDX-Mixer checkpoint can be ~1 GB: load it once per run);
    consistency: another projection onto the mixture than the run's (`pipeline separate`)."""
    run_dir = Path(run_dir)
    config = load_config(run_dir)
    mixer = get(config["method"]).load(config, run_dir, device=device, batch=batch)
    if consistency is not None:
        mixer.consistency = consistency
    return mixer
