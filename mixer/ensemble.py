"""What an ensemble method is (a `Method` record, mixer.methods lists them) and what a run
folder becomes once loaded (a `Mixer`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np

from core import options as opts
from core.errors import PipelineError
from core.store import StemStore
from mixer.inputs import InputSpec

CONFIG = "config.json"


@dataclass(frozen=True)
class FitRequest:
    """What `Method.fit` gets: the models (store keys) on a dataset of the store, its options,
    the run folder to write (None: return the config only), and the run's circumstances."""

    store: StemStore
    dataset_id: str
    models: list[str]
    options: Any
    run_dir: Path | None
    progress: bool = True
    device: str = "cpu"
    resume: bool = True


class Mixer:
    """A run folder, loaded: maps a track's mixture [2, n] and each model's stems {key: [S_m, 2, n]}
    to estimates [S, 2, n] float32 of `spec.targets` (the method's `estimate`, then projected
    onto the mixture when the run asks for mixture consistency). Reusable across tracks."""

    time_varying = False          # weights that change along the track (segment_weights)

    def __init__(self, config: dict, run_dir: Path | None = None):
        self.config = config
        self.run_dir = run_dir
        self.method = config["method"]
        self.spec = InputSpec.from_dict(config["inputs"])
        self.consistency = config.get("consistency", "none")   # mixer.consistency.MODES

    def __call__(self, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
        from mixer.consistency import project

        return project(self.estimate(mixture, stems_by_key), mixture, self.consistency)

    def estimate(self, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
        raise NotImplementedError

    def matrix(self) -> np.ndarray | None:
        """The mixing matrix [in, out] over spec.input_names() x spec.output_names() when one
        matrix is the whole ensemble (blend, conv1x1); None otherwise."""
        return None

    def segment_weights(self, mixture, stems_by_key, hop: int | None = None):
        """(W_k [K, in, out], segment starts) of a time-varying mixer on one track."""
        raise PipelineError(f"{self.run_dir}: a {self.method} run has no per-segment weights")


@dataclass(frozen=True)
class Method:
    name: str
    summary: str                                   # one line, for --help and the README
    options: type | None                           # a core.options dataclass (None: no options)
    fit: Callable[[FitRequest], dict]              # writes the run folder; returns its config
    load: Callable[..., Mixer]                     # load(config, run_dir, device=, batch=) -> Mixer
    # what fitting reads, [(what for, split, the option that chose it)]: the checks that keep an
    # evaluation honest refuse a method fitted or selected on the evaluation split
    reads: Callable[[Any], list[tuple[str, str, str]]] = lambda options: []
    learned: bool = False                          # trained by `pipeline train-mixer`
    time_varying: bool = False                     # weights that change along a track


def recorded_options(options) -> dict:
    return {} if options is None else opts.as_dict(options)


def run_config(method: str, spec: InputSpec, dataset_id: str, options, **extra) -> dict:
    """The part of config.json every method's run writes."""
    return {"method": method, "dataset": dataset_id, "inputs": spec.to_dict(),
            "models": [{"key": k, "name": n, "sources": list(s)} for k, n, s in
                       zip(spec.model_keys, spec.model_names, spec.model_sources)],
            "sources": list(spec.targets), "options": recorded_options(options), **extra}
