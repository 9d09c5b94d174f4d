"""Stem names as models spell them, mapped onto the dataset's vocabulary.

MUSDB's four sources are drums, bass, other and vocals. Models trained for vocal removal output
two stems, the vocals and everything else, under many names (UVR: "Vocals" / "Instrumental";
MSST configs: vocals / other, with "other_fix" meaning the accompaniment; Spleeter:
accompaniment). Everything else is `instrumental` here: drums + bass + other on a four-source
dataset. Only the names change; a model keeps every stem it outputs (each is a mixer input), and
the blend and the evaluation use a model for the dataset sources it has.

A stem is named by its place in the whole list of stems its model was trained on, not alone: an
MSST instrumental RoFormer (`instruments: [other, vocals]`, `target_instrument: other`) outputs
one stem, and that `other` is the rest of a two-stem pair, the instrumental, not MUSDB's other.
"""
from __future__ import annotations

from typing import Iterable

from core.errors import PipelineError

INSTRUMENTAL = "instrumental"
_SYNONYMS = {"vocal": "vocals", "voice": "vocals", "drum": "drums", "instrument": INSTRUMENTAL,
             "inst": INSTRUMENTAL, "accompaniment": INSTRUMENTAL, "no_vocals": INSTRUMENTAL,
             "no vocals": INSTRUMENTAL, "music": INSTRUMENTAL, "karaoke": INSTRUMENTAL}
_PAIRS = {"vocals": INSTRUMENTAL, INSTRUMENTAL: "vocals"}
NO = "no "


def _word(name) -> str:
    n = str(name).strip().lower()
    return _SYNONYMS.get(n, n)


def complement(name: str) -> str:
    """What the rest of the mix is called next to `name` (a canonical name): vocals <->
    instrumental, X <-> "no X" (UVR's rule for a model's secondary stem)."""
    if name in _PAIRS:
        return _PAIRS[name]
    return name[len(NO):] if name.startswith(NO) else NO + name


def canonical_sources(names: Iterable[str], within: Iterable[str] | None = None) -> tuple[str, ...]:
    """Lower-case names with synonyms resolved, each named by its place in `within`, the whole
    list of stems the model was trained on (default: `names` themselves; a single-target MSST
    model's target is one of its `training.instruments`). In a two-stem list, `other` is the rest
    of the mix: the complement of the other stem (vocals + other is vocals + instrumental; drums
    + other is drums + "no drums", not MUSDB's other)."""
    names = list(names)
    whole = list(names if within is None else within)
    out = [_word(n) for n in whole]
    if len(out) == 2 and out.count("other") == 1:
        partner = out[1 - out.index("other")]
        out = [complement(partner) if n == "other" else n for n in out]
    if len(set(out)) != len(out) or not all(out):
        raise PipelineError(f"model stems {whole}: names must be distinct and non-empty")
    place = {_word(n): o for n, o in zip(whole, out)}
    missing = [n for n in names if _word(n) not in place]
    if missing:
        raise PipelineError(f"model stem(s) {missing}: not among the model's stems {whole}")
    return tuple(place[_word(n)] for n in names)
