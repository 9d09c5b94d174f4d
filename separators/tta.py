"""Test-time augmentation (TTA) for any base model: the input transformed, separated, the output
transformed back, and the passes averaged (or kept apart, as models of their own).

The passes are what the tools people ensemble with use:

* flip: the channels swapped (MSST's `--use_tta`, with polarity);
* polarity: the mixture inverted, the stems inverted back (MSST; UVR's and audio-separator's
  MDX-Net "denoise");
* shifts=N: N delays of the input by up to 0.5 s, zero-padded, the offsets drawn from a seeded
  generator (demucs's `--shifts`, for every family);
* bigshifts=N: the input rotated by k n/N samples, k = 0..N-1 (MSST's BigShifts).

`--tta flip,polarity,bigshifts=2` averages every combination: the plain pass, flip and polarity,
each at both rotations (6 passes), as MSST does with `--use_tta --bigshifts 2`. A model whose
output commutes with a transform (a channel-symmetric or a linear one) gives its plain output
back, to float rounding.

The passes run on each block the cache stage hands the model (separators.inference: tracks of
up to 60 s whole); a rotation is of that block. A TTA model is a model of its own: its key covers
the passes, its name says them (`umx+tta`, `umx+flip`), and `--tta-members` caches each pass as
its own model (the plain one included) so that the mixers can weigh them.
"""
from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass

import numpy as np
import torch

from core.errors import PipelineError
from core.options import option
from separators.base import Separator

MAX_SHIFT_SECONDS = 0.5    # demucs's apply_model


@dataclass(frozen=True)
class TTAOptions:
    tta: str | None = option(None, "test-time augmentation: flip, polarity, shifts=N, bigshifts=N "
                             "(comma-separated); every combination of the passes is averaged "
                             "with the plain one (MSST's --use_tta: flip,polarity)")
    tta_members: bool = option(False, "with tta: cache each pass as its own model (the plain one "
                               "too) instead of their average, for the mixers to weigh")
    tta_seed: int = option(0, "with tta shifts=N: the seed of the shifts' offsets")
    tta_pass: str | None = option(None, "one pass alone, e.g. flip+shift=1234 (how a "
                                  "--tta-members model is loaded again)", cli=False)


@dataclass(frozen=True)
class Pass:
    flip: bool = False
    polarity: bool = False
    shift: int = 0                    # samples of delay (zero-padded)
    roll: tuple[int, int] = (0, 1)    # (k, N): rotated by k x (n // N) samples

    def _words(self, shift: str, roll: str) -> str:
        parts = [p for p, on in (("flip", self.flip), ("polarity", self.polarity)) if on]
        parts += [shift.format(self.shift)] if self.shift else []
        parts += [roll.format(*self.roll)] if self.roll[0] else []
        return "+".join(parts)

    @property
    def spec(self) -> str:
        """The pass as `tta_pass` gives it ("" for the plain pass)."""
        return self._words("shift={}", "roll={}/{}")

    @property
    def label(self) -> str:
        """The pass in a model's name: umx+flip, umx+shift11025, umx+roll1of2."""
        return self._words("shift{}", "roll{}of{}")

    @classmethod
    def parse(cls, text: str) -> "Pass":
        fields = {}
        for part in filter(None, text.split("+")):
            key, _, value = part.partition("=")
            try:
                if key in ("flip", "polarity") and not value:
                    fields[key] = True
                elif key == "shift":
                    fields["shift"] = int(value)
                elif key == "roll":
                    k, n = (int(v) for v in value.split("/"))
                    if not 0 <= k < n:
                        raise ValueError(value)
                    fields["roll"] = (k, n)
                else:
                    raise ValueError(part)
            except ValueError:
                raise PipelineError(f"tta_pass {text!r}: '{part}' is not flip, polarity, "
                                    f"shift=SAMPLES or roll=K/N") from None
        return cls(**fields)

    def run(self, separate, x: torch.Tensor) -> torch.Tensor:
        """separate(transformed x [2, m]) -> stems [S, 2, m], transformed back."""
        m = x.shape[-1]
        if self.flip:
            x = x.flip(0)
        if self.polarity:
            x = -x
        rolled = (self.roll[0] * (m // self.roll[1])) % m if m else 0
        if rolled:   # MSST: concatenate(mix[:, -s:], mix[:, :-s])
            x = torch.roll(x, rolled, dims=-1)
        if self.shift:   # demucs: the input delayed, zeros before; the output read back in place
            x = torch.nn.functional.pad(x, (self.shift, 0))
        y = separate(x)
        if self.shift:
            y = y[..., self.shift:self.shift + m]
        if rolled:
            y = torch.roll(y, -rolled, dims=-1)
        if self.polarity:
            y = -y
        if self.flip:
            y = y.flip(1)
        return y


def plan(text: str, seed: int, rate: int) -> list[Pass]:
    """Every pass of a `--tta` value, the plain one first."""
    flips, polarities, shifts, rolls = [False], [False], [0], [(0, 1)]
    for part in filter(None, (p.strip() for p in str(text).split(","))):
        key, _, value = part.partition("=")
        try:
            if key == "flip" and not value:
                flips = [False, True]
            elif key == "polarity" and not value:
                polarities = [False, True]
            elif key in ("shifts", "bigshifts") and int(value) >= 1:
                count = int(value)
                if key == "bigshifts":
                    rolls = [(k, count) for k in range(count)]
                else:
                    most = int(MAX_SHIFT_SECONDS * rate)
                    shifts = [int(s) for s in np.random.default_rng(seed).integers(0, most + 1, count)]
            else:
                raise ValueError(part)
        except ValueError:
            raise PipelineError(f"--tta {text}: '{part}' is not flip, polarity, shifts=N or "
                                f"bigshifts=N (N >= 1)") from None
    # flip and polarity are passes beside the plain one (MSST); shifts replace it (demucs)
    transforms = [(f, p) for f, p in itertools.product(flips, polarities) if not (f and p)]
    return [Pass(f, p, s, r) for (f, p), s, r in itertools.product(transforms, shifts, rolls)]


class TTASeparator(Separator):
    """A base model run through TTA passes, averaged."""

    def __init__(self, base: Separator, passes: list[Pass], name: str):
        self.base, self.passes, self.name = base, passes, name
        self.family, self.sources, self.sample_rate = base.family, base.sources, base.sample_rate
        self.device = base.device

    def identity(self) -> dict:
        return {**self.base.identity(), "name": self.name,
                "tta": {"passes": [p.spec for p in self.passes]}}

    def for_track(self, store, dataset_id: str, track) -> "TTASeparator":
        base = self.base.for_track(store, dataset_id, track)
        if base is self.base:
            return self
        view = copy.copy(self)
        view.base = base
        return view

    def to(self, device) -> "TTASeparator":
        self.base.to(device)
        self.device = self.base.device
        return self

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        total = None
        for p in self.passes:
            y = p.run(self.base.separate, mixture).float()
            total = y if total is None else total.add_(y)
        return total / len(self.passes)


def split_options(options: dict | None) -> tuple[dict, dict]:
    """(the family's inference options, the TTA options) of a command's model options."""
    names = set(TTAOptions.__dataclass_fields__)
    options = dict(options or {})
    return ({k: v for k, v in options.items() if k not in names},
            {k: v for k, v in options.items() if k in names and v is not None})


def check(options: dict | None) -> None:
    """Refuse bad TTA options of a command's model options before any work is done."""
    _, tta = split_options(options)
    with_tta(None, tta, dry=True)


def with_tta(base: Separator | None, tta: dict, dry: bool = False) -> list[tuple[Separator, dict]]:
    """The models a base model becomes under the TTA options `tta` (TTAOptions' fields), each
    with the TTA options that load it again: itself, its TTA average, or one model per pass."""
    from core.options import as_dict, build

    o = build(TTAOptions, tta, "TTA options")
    if o.tta is None and o.tta_members:
        raise PipelineError("--tta-members: give the passes with --tta (e.g. flip,polarity)")
    if dry:   # the values only
        Pass.parse(o.tta_pass or "")
        plan(o.tta or "", o.tta_seed, 44100)
        return []
    if o.tta_pass is not None:
        p = Pass.parse(o.tta_pass)
        return [(TTASeparator(base, [p], f"{base.name}+{p.label}") if p.spec else base,
                 {"tta_pass": p.spec} if p.spec else {})]
    if o.tta is None:
        return [(base, {})]
    passes = plan(o.tta, o.tta_seed, int(base.sample_rate))
    if o.tta_members:
        return [(TTASeparator(base, [p], f"{base.name}+{p.label}") if p.spec else base,
                 {"tta_pass": p.spec} if p.spec else {}) for p in passes]
    recorded = {k: v for k, v in as_dict(o).items() if k in ("tta", "tta_seed")}
    return [(TTASeparator(base, passes, f"{base.name}+tta"), recorded)]
