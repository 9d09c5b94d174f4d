"""Base-model families: one module per family, holding how its models are found, loaded and run
(the `Separator` adapter `separators.registry` builds) and, for the families `pipeline train-base`
trains, its training recipe side by side (see separators.families.common for the recipe interface).

    umx      Open-Unmix: pretrained umxhq/umxl/umx, model folders; trains `--family umx`
    xumx     X-UMX (asteroid): .pth files; trains `--family xumx`
    demucs   Demucs: pretrained names, repos, .th/.yaml; trains `--family demucs`
    msst     Music-Source-Separation-Training checkpoints (YAML config + .ckpt): BS-/Mel-RoFormer,
             MDX23C, SCNet, HTDemucs, Bandit, Apollo; trains `--family roformer`
    uvr      UVR models: MDX-Net ONNX (onnxruntime), VR-arch .pth (audio-separator)
    plugin   any separator given as Python code (`py:module:factory`, entry points)

A new family is a new module here, plus its names in `TRAINABLE` (when it trains) and its spec
syntax in separators.registry (when it loads).
"""
from __future__ import annotations

from types import ModuleType

from core.errors import PipelineError

TRAINABLE = ("umx", "xumx", "demucs", "roformer")


def recipe(family: str) -> ModuleType:
    """The module holding `family`'s training recipe (aliases accepted)."""
    name = canonical_family(family)
    if name == "umx":
        from separators.families import umx as module
    elif name == "xumx":
        from separators.families import xumx as module
    elif name == "demucs":
        from separators.families import demucs as module
    else:
        from separators.families import msst as module
    return module


_ALIASES = {"openunmix": "umx", "open-unmix": "umx", "x-umx": "xumx", "hdemucs": "demucs",
            "htdemucs": "demucs", "bs_roformer": "roformer", "bs-roformer": "roformer",
            "mel_band_roformer": "roformer", "mel-band-roformer": "roformer"}


def canonical_family(name: str) -> str:
    f = _ALIASES.get(name.lower(), name.lower())
    if f not in TRAINABLE:
        raise PipelineError(f"family '{name}': choose one of {', '.join(TRAINABLE)}")
    return f
