"""A trained mixer (any architecture of mixer.models.ARCHS), applied: the inference half of the
learned ensemble methods (mixer.train trains them and declares their records).

A learned mixer processes the normalised track in segments of T samples, hop T/4, cross-faded by
`core.chunking.overlap_add` (periodic Hann, constant sum, zero padding at both ends): any length,
no clicks at segment borders. The inputs are assembled from the stored stems one segment at a
time, so memory is the output plus `batch` segments, whatever the track's length.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np
import torch

from core.chunking import overlap_add, segment_of, segment_offsets
from core.errors import PipelineError
from core.training import amp_dtype, resolve_device
from mixer.ensemble import Mixer
from mixer.inputs import (
    InputSpec,
    NormalisedInputs,
    average_mixing,
    check_inputs,
    denormalise,
    mixture_stats,
    split_outputs,
)
from mixer.models import ARCHS

MIXER = "mixer.pt"
def build_from_config(config: dict) -> torch.nn.Module:
    """The untrained mixer of a run's config (a residual one with W = 0: mixer.train sets it from
    its base run, a trained mixer's state dict holds it)."""
    h = config["hyper"]
    start = None
    if h.get("init", "random") == "average" and not h.get("residual"):
        start = torch.from_numpy(average_mixing(InputSpec.from_dict(config["inputs"])))
    return ARCHS.get(config["method"]).build(config["in_channels"], config["out_channels"], h, start)


class LearnedMixer(Mixer):
    """A trained conv1x1 / MDX-Mixer run (or any registered architecture's)."""

    def __init__(self, config: dict, run_dir: Path, device=None, batch: int = 1,
                 amp: str = "auto"):
        super().__init__(config, run_dir)
        self.arch = ARCHS.get(self.method)
        self.time_varying = self.arch.time_varying
        self.device = resolve_device(device or "cpu")
        self.low = amp_dtype(self.device, amp)
        self.batch = batch
        path = Path(run_dir) / MIXER
        if not path.exists():
            raise PipelineError(f"{path}: missing; training has not finished "
                                f"(run train-mixer again to resume it)")
        self.module = build_from_config(config)
        self.module.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        self.module.to(self.device).eval()

    @property
    def segment(self) -> int:
        return self.config["hyper"]["T"]

    def normalised_inputs(self, mixture, stems_by_key):
        check_inputs(self.spec, mixture, stems_by_key)
        stats = mixture_stats(mixture)
        return NormalisedInputs(self.spec, mixture, stems_by_key, stats), stats

    @torch.inference_mode()
    def _run(self, chunks: torch.Tensor, fn) -> torch.Tensor:
        # The track stays in host memory; only `batch` segments at a time visit the device.
        with torch.autocast(self.device.type, dtype=self.low, enabled=self.low is not None):
            return fn(chunks.to(self.device)).float().to(chunks.device)

    def estimate(self, mixture, stems_by_key: Mapping[str, np.ndarray]) -> np.ndarray:
        x, stats = self.normalised_inputs(mixture, stems_by_key)
        y = overlap_add(lambda c: self._run(c, self.module), x, self.segment,
                        hop=self.segment // 4, batch=self.batch)
        return split_outputs(denormalise(y, stats), len(self.spec.targets)).numpy()

    @torch.inference_mode()
    def matrix(self) -> np.ndarray | None:
        if self.time_varying:
            return None
        # a time-invariant mixer's weights do not depend on its input
        silence = torch.zeros(1, self.spec.in_channels, self.segment)
        return self._run(silence, self.module.mixing_weights)[0].numpy()

    @torch.inference_mode()
    def segment_weights(self, mixture, stems_by_key, hop: int | None = None):
        """W_k [K, in, out] for segments starting every `hop` (default T) samples."""
        if not self.time_varying:
            return super().segment_weights(mixture, stems_by_key, hop)
        x, _ = self.normalised_inputs(mixture, stems_by_key)
        T = self.segment
        starts = np.array(segment_offsets(x.shape[-1], T, hop or T))
        weights = []
        for i in range(0, len(starts), self.batch):   # zero padding after the end, as in training
            chunks = torch.stack([segment_of(x, int(s), T) for s in starts[i:i + self.batch]])
            weights.append(self._run(chunks, self.module.mixing_weights))
        return torch.cat(weights).numpy(), starts
