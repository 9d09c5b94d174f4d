"""What every family's training recipe shares: the `Recipe` record, option merging, exported
state dicts, versions.

A family module (separators/families/<name>.py) holds a model's loading/inference adapter and, for
the families `pipeline train-base` trains, its `Recipe` side by side (its Family record's
`recipe`), which the loop in `separators.train_base` reads.

This module sits below the family modules; they import it, never the loop.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch import nn

from core.errors import PipelineError
from core.versions import package_versions


@dataclass(frozen=True)
class Recipe:
    name: str                   # the `--family` name
    aliases: tuple[str, ...]    # other spellings accepted for it
    presets: dict               # {preset: {"model": {...}, "train": {...}}} (tiny, small, paper)
    # (preset, model_options) -> the network configuration (validated)
    resolve_model: Callable[[str, dict | None], dict]
    check_training: Callable[[Sequence[str], str], None]   # (targets, amp): refuse what it cannot
    # (run_dir, store, dataset_id, config, rank, split) -> anything build() needs
    prepare: Callable[..., Any]
    # (config, prepared) -> (training network, loss function, the module to export)
    build: Callable[[dict, Any], tuple]
    export: Callable[..., list]   # (bare, out, config, summary) -> files written into `out`
    describe: Callable[[dict], tuple[str, str]]   # -> (architecture, loss) lines for the card
    with_rest: bool = False     # the data also yields "rest of the mixture" (X-UMX's loss)


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
