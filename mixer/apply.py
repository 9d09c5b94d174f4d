"""Applying any mixer run folder (blend, conv1x1, mdx-mixer, the spectral ensembles, band-blend)
to a track, and exporting its weights.

A learned mixer processes the normalised track in segments of T samples, hop T/4, cross-faded by
`core.chunking.overlap_add` (periodic Hann, constant sum, zero padding at both ends): any
length, no clicks at segment borders. The inputs are assembled from the stored stems one segment
at a time, so memory is the output plus `batch` segments, whatever the track's length. A blend
needs no segments: it is the same weighted sum at every sample. Runs without a trained module
(FIXED: blend, mixer.spectral's methods, mixer.bandblend) are applied by their own module from
config.json alone.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from core.chunking import overlap_add, segment_of
from core.errors import PipelineError
from core.store import read_json, write_json_atomic
from core.training import amp_dtype, resolve_device
from mixer import bandblend, spectral
from mixer.blend import apply_blend
from mixer.inputs import (
    InputSpec,
    NormalisedInputs,
    check_inputs,
    denormalise,
    mixture_stats,
    split_outputs,
)
from mixer.train import MIXER, build_from_config, segment_offsets


def _apply_blend(config: dict, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
    spec = InputSpec.from_dict(config["inputs"])
    check_inputs(spec, mixture, stems_by_key)
    return apply_blend(config["weights"], stems_by_key, dict(zip(spec.model_keys, spec.model_sources)),
                       spec.targets)


# methods whose run folder holds no trained module: config.json is the whole ensemble
FIXED = {"blend": _apply_blend, **{m: spectral.apply_config for m in spectral.METHODS},
         bandblend.METHOD: bandblend.apply_config}


def load_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise PipelineError(f"{path}: not a mixer run (no config.json); run blend or train-mixer first")
    return read_json(path)


class Mixer:
    """A loaded run, reusable across tracks (an MDX-Mixer checkpoint is ~1 GB: load it once)."""

    def __init__(self, run_dir: str | Path, device=None, batch: int = 1, amp: str = "auto"):
        self.run_dir = Path(run_dir)
        self.config = load_config(run_dir)
        self.spec = InputSpec.from_dict(self.config["inputs"])
        self.method = self.config["method"]
        self.device = resolve_device(device or "cpu")
        self.low = amp_dtype(self.device, amp)
        self.batch = batch
        self.module = None
        if self.method not in FIXED:
            path = self.run_dir / MIXER
            if not path.exists():
                raise PipelineError(f"{path}: missing; training has not finished "
                                    f"(run train-mixer again to resume it)")
            self.module = build_from_config(self.config)
            self.module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
            self.module.to(self.device).eval()

    @property
    def segment(self) -> int:
        return self.config["hyper"]["T"]

    def normalised_inputs(self, mixture, stems_by_key) -> tuple[NormalisedInputs, tuple[float, float]]:
        check_inputs(self.spec, mixture, stems_by_key)
        stats = mixture_stats(mixture)
        return NormalisedInputs(self.spec, mixture, stems_by_key, stats), stats

    @torch.inference_mode()
    def _run(self, chunks: torch.Tensor, fn) -> torch.Tensor:
        # The track stays in host memory; only `batch` segments at a time visit the device.
        with torch.autocast(self.device.type, dtype=self.low, enabled=self.low is not None):
            return fn(chunks.to(self.device)).float().to(chunks.device)

    def __call__(self, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
        """mixture [2, n], stems {key: [S_m, 2, n]} -> estimates [S, 2, n] float32."""
        if self.method in FIXED:
            return FIXED[self.method](self.config, mixture, stems_by_key)
        x, stats = self.normalised_inputs(mixture, stems_by_key)
        y = overlap_add(lambda c: self._run(c, self.module), x, self.segment,
                        hop=self.segment // 4, batch=self.batch)
        return split_outputs(denormalise(y, stats), len(self.spec.targets)).numpy()

    # ---- weights for figures -----------------------------------------------------------------
    def blend_matrix(self) -> np.ndarray:
        """A blend as the equivalent [in, out] mixing matrix over the same channel layout."""
        names_in, names_out = self.spec.input_names(), self.spec.output_names()
        W = np.zeros((len(names_in), len(names_out)), dtype=np.float32)
        for target, by_model in self.config["weights"].items():
            for key, w in by_model.items():
                model = self.spec.model_names[self.spec.model_keys.index(key)]
                for c in ("L", "R"):
                    W[names_in.index(f"{model}.{target}.{c}"), names_out.index(f"{target}.{c}")] = w
        return W

    @torch.inference_mode()
    def segment_weights(self, mixture, stems_by_key, hop: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """MDX-Mixer: W_k [K, in, out] for segments starting every `hop` (default T) samples."""
        x, _ = self.normalised_inputs(mixture, stems_by_key)
        T = self.segment
        starts = np.array(segment_offsets(x.shape[-1], T, hop or T))
        weights = []
        for i in range(0, len(starts), self.batch):   # zero padding after the end, as in training
            chunks = torch.stack([segment_of(x, int(s), T) for s in starts[i:i + self.batch]])
            weights.append(self._run(chunks, self.module.mixing_weights))
        return torch.cat(weights).numpy(), starts


def apply_run(run_dir: str | Path, mixture, stems_by_key: Mapping[str, np.ndarray], *,
              device=None, batch: int = 1) -> np.ndarray:
    """Estimates [S, 2, n] float32 of one track from its mixture [2, n] and stems {key: [S_m,2,n]}."""
    return Mixer(run_dir, device=device, batch=batch)(mixture, stems_by_key)


def export_weights(run_dir: str | Path, out_dir: str | Path | None = None, *, mixture=None,
                   stems_by_key: Mapping[str, np.ndarray] | None = None, track: str | None = None,
                   hop: int | None = None, device=None, batch: int = 1) -> Path:
    """Write the mixing weights as <out_dir>/weights[-<track>].npz plus a .json of channel names.

    npz keys: 'W' — [in, out] for blend / conv1x1; [K, in, out], one W_k per segment, for
    mdx-mixer (which needs the track's mixture and stems), with 'starts' (samples), 'mean' and
    'std' over the segments. Rows are inputs, columns outputs, as in the paper's Figs. 4-6.
    """
    mixer = Mixer(run_dir, device=device, batch=batch)
    out_dir = Path(out_dir) if out_dir else mixer.run_dir / "weights"
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in track or "")
    stem = f"weights-{safe}" if track else "weights"
    if mixer.method in FIXED and mixer.method != "blend":
        raise PipelineError(f"{run_dir}: a {mixer.method} run has no mixing matrix to export "
                            f"(see its config.json)")
    if mixer.method == "blend":
        arrays = {"W": mixer.blend_matrix()}
    elif mixer.method == "conv1x1":
        arrays = {"W": mixer.module.weight.detach().float().cpu().numpy()}
    else:
        if mixture is None or stems_by_key is None:
            raise PipelineError(f"{run_dir}: an MDX-Mixer's weights depend on the input; "
                                f"give a track (its mixture and stems)")
        W, starts = mixer.segment_weights(mixture, stems_by_key, hop)
        arrays = {"W": W, "starts": starts, "mean": W.mean(0), "std": W.std(0)}
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{stem}.npz"
    np.savez(path, **arrays)
    write_json_atomic(out_dir / f"{stem}.json",
                      {"method": mixer.method, "track": track, "inputs": mixer.spec.input_names(),
                       "outputs": mixer.spec.output_names(), "rate": mixer.config.get("rate"),
                       "segment": mixer.config.get("hyper", {}).get("T"), "hop": hop,
                       "arrays": {k: list(v.shape) for k, v in arrays.items()}})
    return path
