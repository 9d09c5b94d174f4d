"""What every family's training recipe shares: option merging, exported state dicts, versions.

A family module (separators/families/<name>.py) holds a model's loading/inference adapter and, for
the families `pipeline train-base` trains, its recipe side by side. The recipe is a handful of
module-level names the loop in `separators.train_base` reads:

    TRAIN_NAME                  the `--family` name (aliases: separators.families)
    PRESETS                     {preset: {"model": {...}, "train": {...}}} (tiny, small, paper)
    MODEL_DEFAULTS              the network options when a preset does not set them
    resolve_model(preset, model_options) -> dict   the network configuration (validated)
    check_training(targets, amp)                    refuse what the family cannot train
    prepare(run_dir, store, dataset_id, config, rank, split) -> anything build() needs
    WITH_REST                   the data also yields "rest of the mixture" (X-UMX's loss)
    build(config, prepared) -> (training network, loss function, the module to export)
    export(bare, out, config, summary) -> files written into `out`
    describe(config) -> (architecture line, loss line) for the model card

This module sits below the family modules; they import it, never the loop.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from core.errors import PipelineError
from core.versions import package_versions


def merge_options(family: str, what: str, base: dict, options: dict | None,
                  any_key: bool = False) -> dict:
    """`base` updated with `options` (None values skipped); unknown keys fail unless any_key."""
    out = dict(base)
    for k, v in (options or {}).items():
        if v is None:
            continue
        if k not in out and not any_key:
            raise PipelineError(f"{family}: unknown {what} option '{k}' "
                                f"(known: {', '.join(sorted(out))})")
        out[k] = v
    return out


def resolve_preset_model(family: str, presets: dict, defaults: dict, preset: str,
                         model_options: dict | None) -> dict:
    """The usual recipe: defaults, then the preset's network options, then the user's."""
    return merge_options(family, "model", {**defaults, **presets[preset]["model"]}, model_options)


def cpu_state(module: nn.Module) -> dict:
    """A module's state dict as contiguous CPU copies (what every export saves)."""
    return {k: v.detach().to("cpu", copy=True).contiguous() for k, v in module.state_dict().items()}


def versions() -> dict:
    return package_versions()


def bandwidth_to_max_bin(rate: float, n_fft: int, bandwidth: float | None) -> int:
    """Open-Unmix's: the number of bins up to `bandwidth` Hz (all of them when None)."""
    if not bandwidth:
        return n_fft // 2 + 1
    freqs = np.linspace(0, rate / 2, n_fft // 2 + 1, endpoint=True)
    return int(np.max(np.where(freqs <= bandwidth)[0]) + 1)


def waveform_l1(est: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
    """Demucs's loss: mean absolute error of the waveforms."""
    return (est - refs[:, :est.shape[1]]).abs().mean()
