"""Applying any run folder (any ensemble method, mixer.methods) to a track, and exporting its
mixing weights."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from core.errors import PipelineError
from core.store import write_json_atomic
from mixer.methods import load_mixer


def apply_run(run_dir: str | Path, mixture, stems_by_key: Mapping[str, np.ndarray], *,
              device=None, batch: int = 1) -> np.ndarray:
    """Estimates [S, 2, n] float32 of one track from its mixture [2, n] and stems {key: [S_m,2,n]}."""
    return load_mixer(run_dir, device=device, batch=batch)(mixture, stems_by_key)


def export_weights(run_dir: str | Path, out_dir: str | Path | None = None, *, mixture=None,
                   stems_by_key: Mapping[str, np.ndarray] | None = None, track: str | None = None,
                   hop: int | None = None, device=None, batch: int = 1) -> Path:
    """Write the mixing weights as <out_dir>/weights[-<track>].npz plus a .json of channel names.

    npz keys: 'W' — [in, out] for a time-invariant mixer (blend, conv1x1); [K, in, out], one W_k
    per segment, for a time-varying one (mdx-mixer, which needs the track's mixture and stems),
    with 'starts' (samples), 'mean' and 'std' over the segments. Rows are inputs, columns
    outputs, as in the paper's Figs. 4-6.
    """
    mixer = load_mixer(run_dir, device=device, batch=batch)
    out_dir = Path(out_dir) if out_dir else mixer.run_dir / "weights"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in track or "")
    stem = f"weights-{safe}" if track else "weights"
    if mixer.time_varying:
        if mixture is None or stems_by_key is None:
            raise PipelineError(f"{run_dir}: a {mixer.method} run's weights depend on the input; "
                                f"give a track (its mixture and stems)")
        W, starts = mixer.segment_weights(mixture, stems_by_key, hop)
        arrays = {"W": W, "starts": starts, "mean": W.mean(0), "std": W.std(0)}
    else:
        W = mixer.matrix()
        if W is None:
            raise PipelineError(f"{run_dir}: a {mixer.method} run has no mixing matrix to export "
                                f"(see its config.json)")
        arrays = {"W": W}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.npz"
    np.savez(path, **arrays)
    write_json_atomic(out_dir / f"{stem}.json",
                      {"method": mixer.method, "track": track, "inputs": mixer.spec.input_names(),
                       "outputs": mixer.spec.output_names(), "rate": mixer.config.get("rate"),
                       "segment": mixer.config.get("hyper", {}).get("T"), "hop": hop,
                       "arrays": {k: list(v.shape) for k, v in arrays.items()}})
    return path
