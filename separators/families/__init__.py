"""Base-model families: one module per family, ending with its `RECORD` (a `Family`): how its
models are recognised from a user's spec, loaded and run (the `Separator` adapter), its inference
options, and, for the families `pipeline train-base` trains, its training recipe
(separators.families.common.Recipe).

    umx      Open-Unmix: pretrained umxhq/umxl/umx, model folders; trains `--family umx`
    msst     Music-Source-Separation-Training checkpoints (YAML config + .ckpt): BS-/Mel-RoFormer,
             MDX23C, SCNet, HTDemucs, Bandit, Apollo; trains `--family roformer`
    demucs   Demucs: pretrained names, repos, .th/.yaml; trains `--family demucs`
    xumx     X-UMX (asteroid): .pth files; trains `--family xumx`
    uvr      UVR models: MDX-Net ONNX (onnxruntime)
    plugin   any separator given as Python code (`py:module:factory`, entry points)
    crossfit K fold models of one recipe as one model (`train-base --folds K`): each training
             track separated by the fold model that never saw it

A new family is a new module here and one line in BUILTIN (another package's: an entry point in
the `stem_ensemble.families` group). Its options become `pipeline cache` flags and [[models]]
keys; its recipe, a `train-base --family` choice. The order of BUILTIN is the order in which
folders and names are recognised (separators.registry).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from core import options as opts
from core.errors import PipelineError
from core.registry import Registry


@dataclass(frozen=True)
class Request:
    """A model to load, as separators.registry resolved the user's spec."""

    spec: str                       # as given (query parameters included)
    device: Any                     # a torch.device
    offline: bool = False
    repo: Path | None = None        # --repo DIR: where pretrained weights are looked for first
    options: dict | None = None     # inference options shared by every model of the command
    path: Path | None = None        # the file or folder the spec names, when it names one
    member: str | None = None       # DIR:NAME: one model of a folder holding several
    label: str | None = None        # the model's name in the store (default: the family's choice)


@dataclass(frozen=True)
class Family:
    name: str                                          # model.json's "family", part of model keys
    summary: str                                       # what it loads (help, README family table)
    load: Callable[[Request], Any]                     # -> a separators.base.Separator on device
    options: type | None = None                        # inference options (core.options dataclass)
    owns: Callable[[str], bool] | None = None          # a spec in the family's own syntax
    folder: Callable[[Path], bool] | None = None       # a model folder of the family
    file: Callable[[Path], bool] | None = None         # a model file of the family
    knows: Callable[[str, Path | None], bool] | None = None   # a name it loads (repo given or None)
    names: Callable[[], list[str]] = lambda: []        # the names it knows, for help and errors
    members: bool = False                              # its folders may hold several models (DIR:NAME)
    recipe: Any = None                                 # separators.families.common.Recipe


BUILTIN = tuple(f"separators.families.{m}" for m in ("crossfit", "umx", "msst", "demucs", "xumx", "uvr",
                                                             "plugin"))
FAMILIES: Registry[Family] = Registry("base-model family", BUILTIN, group="stem_ensemble.families")


def common_options() -> type:
    """The inference options every family takes (separators.tta)."""
    from separators.tta import TTAOptions

    return TTAOptions


def option_names() -> set[str]:
    """Every inference option some family understands, and those every family does."""
    return ({s.name for f in FAMILIES.records() for s in opts.specs(f.options)}
            | {s.name for s in opts.specs(common_options())})


def pick(options_class: type | None, options: dict | None, where: str) -> dict:
    """A family's inference options (its `options_class`), typed and with defaults, from the
    options of a command, which all its models share (`--shifts` with `-m htdemucs -m umxl` is
    demucs's alone). A name no family knows is an error."""
    options = {k: v for k, v in (options or {}).items() if v is not None}
    unknown = sorted(set(options) - option_names())
    if unknown:
        raise PipelineError(f"unknown model option(s) {', '.join(unknown)}; known: "
                            f"{', '.join(sorted(option_names()))}")
    if options_class is None:
        return {}
    mine = {s.name for s in opts.specs(options_class)}
    return opts.as_dict(opts.build(options_class, {k: v for k, v in options.items() if k in mine},
                                   where))


def recipes() -> dict[str, Any]:
    """{`train-base --family` name: recipe} of every family that trains."""
    return {f.recipe.name: f.recipe for f in FAMILIES.records() if f.recipe is not None}


def canonical_family(name: str) -> str:
    """The recipe name of a `--family` value (aliases such as open-unmix, htdemucs accepted)."""
    low = name.lower()
    for r in recipes().values():
        if low == r.name or low in r.aliases:
            return r.name
    raise PipelineError(f"family '{name}': choose one of {', '.join(recipes())}")


def recipe(name: str):
    return recipes()[canonical_family(name)]
