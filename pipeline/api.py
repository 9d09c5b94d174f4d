"""The Python API: what the command line does, from a notebook or a script.

    from pipeline import api

    api.cache("synthetic", ["umx-synth", "demucs-synth"], niter=0, work="work")   # any stage,
    api.blend(["umx-synth", "demucs-synth"], method="median-spec", work="work")   # the CLI's options
    store = api.open_store("work")                       # the stem store: datasets, models, stems
    ensemble = api.Ensemble("median-spec", work="work")  # any run folder: blend, mixer, ...
    stems = ensemble.separate(audio, 44100)              # {source: [2, n]} at the input's rate

The stages (`cache`, `cache_import`, `train_base`, `blend`, `select_models`, `train_mixer`,
`evaluate`, `report`, `separate`, `run`, `make_dataset`) are pipeline.stages' functions: the
same options as `pipeline COMMAND --help`, as keywords. An `Ensemble` is a run folder with the
base models it was fitted on (as demucs.api.Separator is a model): separating audio runs those
models through the stem cache, exactly as `pipeline separate`, so the same audio gives the same
stems and is never separated twice.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from core.config import work_dir
from core.store import StemStore
from pipeline.separate import EnsembleRun, array_input, probe_input
from pipeline.stages import (
    blend,
    cache,
    cache_import,
    evaluate,
    make_dataset,
    open_store,
    report,
    run,
    select_models,
    separate,
    train_base,
    train_mixer,
)

__all__ = ["Ensemble", "StemStore", "blend", "cache", "cache_import", "evaluate", "make_dataset",
           "open_store", "report", "run", "select_models", "separate", "train_base", "train_mixer"]


class Ensemble:
    """A trained ensemble: a run folder (or a run name under <work>/runs) of any method."""

    def __init__(self, run: str | Path, *, work: str | Path | None = None, device: str = "cpu",
                 offline: bool = True, consistency: str | None = None, log=lambda line: None):
        self._run = EnsembleRun(run, work_dir(work), device=device, offline=offline,
                                consistency=consistency, log=log)

    @property
    def method(self) -> str:
        return self._run.config["method"]

    @property
    def sources(self) -> list[str]:
        """The sources it estimates, in the order of `separate`'s dict."""
        return list(self._run.targets)

    @property
    def models(self) -> list[str]:
        """The store keys of its base models."""
        return list(self._run.keys)

    @property
    def samplerate(self) -> int:
        """The rate its models work at (inputs at other rates are resampled, outputs back)."""
        return self._run.rate

    def separate(self, audio, rate: int, name: str = "audio") -> dict[str, np.ndarray]:
        """audio [n] or [channels, n] (mono or stereo, float) at `rate` ->
        {source: stereo float32 [2, n] at `rate`}."""
        return self._estimates(array_input(audio, rate, name))

    def separate_file(self, path: str | Path) -> tuple[dict[str, np.ndarray], int]:
        """An audio file -> ({source: [2, n]}, the file's sample rate)."""
        item = probe_input(path)
        return self._estimates(item), item.rate

    def _estimates(self, item) -> dict[str, np.ndarray]:
        _, _, found = self._run.separate([item])
        (_, est), = list(found)
        return dict(zip(self._run.targets, est))
