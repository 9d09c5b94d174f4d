"""The ensembles that train nothing, as `pipeline blend --method` and experiment files see them.

Danna-Sep's blend (mixer.blend), the band-wise blend (mixer.bandblend) and MSST's / UVR's
spectral and order-statistic ensembles (mixer.spectral): each is searched or written straight
into a run folder (config.json, no mixer.pt) that mixer.apply.Mixer applies.
"""
from __future__ import annotations

from pathlib import Path

from core.errors import PipelineError
from core.store import StemStore, read_json
from mixer import bandblend, spectral
from mixer.blend import search_blend

BLEND = "blend"
# method -> its options (the [[systems]] keys beyond name / method / models) and their defaults
OPTIONS = {
    BLEND: {"step": 0.05, "objective": "museval", "split": "valid"},
    bandblend.METHOD: {"step": 0.05, "objective": "museval", "split": "select", "bands": 8,
                       "band_scale": "mel"},
    **{m: {"weights": None} for m in spectral.METHODS},
}
METHODS = tuple(OPTIONS)


def with_defaults(method: str, given: dict) -> dict:
    """The method's options: `given` (keys beyond the method's ignored) over the defaults."""
    if method not in OPTIONS:
        raise PipelineError(f"ensemble method '{method}': choose one of {', '.join(METHODS)}")
    return {k: given.get(k) if given.get(k) is not None else v for k, v in OPTIONS[method].items()}


def recorded(config: dict) -> dict:
    """The options a run folder's config.json was built with."""
    method = config.get("method")
    if method == BLEND:
        return {k: config.get(k) for k in ("step", "objective", "split")}
    if method == bandblend.METHOD:
        return {"step": config["step"], "objective": config["objective"], "split": config["split"],
                "bands": config["bands"]["count"], "band_scale": config["bands"]["scale"]}
    weights = config.get("weights")
    return {"weights": None if weights is None else
            [weights[k] for k in config["inputs"]["model_keys"]]}


def is_current(run_dir: str | Path, models: list[str], method: str, options: dict) -> bool:
    """Whether run_dir already holds this ensemble of these models (store keys)."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        return False
    config = read_json(path)
    if config.get("method") != method or config.get("inputs", {}).get("model_keys") != models:
        return False
    wanted = dict(options)
    if wanted.get("weights") is not None:
        wanted["weights"] = [float(w) for w in wanted["weights"]]
    return recorded(config) == wanted


def build(store: StemStore, dataset_id: str, models: list[str], method: str,
          run_dir: str | Path | None, options: dict, progress: bool = True) -> dict:
    """Search or write the ensemble into run_dir; returns its config."""
    o = with_defaults(method, options)
    if method == BLEND:
        return search_blend(store, dataset_id, models, step=o["step"], objective=o["objective"],
                            split=o["split"], run_dir=run_dir)
    if method == bandblend.METHOD:
        return bandblend.search_band_blend(store, dataset_id, models, bands=o["bands"],
                                           scale=o["band_scale"], step=o["step"],
                                           objective=o["objective"], split=o["split"],
                                           run_dir=run_dir, progress=progress)
    return spectral.make_run(store, dataset_id, models, method, weights=o["weights"], run_dir=run_dir)
