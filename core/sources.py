"""Stem names as models spell them, mapped onto the dataset's vocabulary.

MUSDB's four sources are drums, bass, other and vocals. Models trained for vocal removal output
two stems, the vocals and everything else, under many names (UVR: "Vocals" / "Instrumental";
MSST configs: vocals / other, with "other_fix" meaning the accompaniment; Spleeter:
accompaniment). Everything else is `instrumental` here: drums + bass + other on a four-source
dataset. Only the names change; a model keeps every stem it outputs (each is a mixer input), and
the blend and the evaluation use a model for the dataset sources it has.
"""
from __future__ import annotations

from typing import Iterable

from core.errors import PipelineError

INSTRUMENTAL = "instrumental"
_SYNONYMS = {"vocal": "vocals", "voice": "vocals", "drum": "drums", "instrument": INSTRUMENTAL,
             "inst": INSTRUMENTAL, "accompaniment": INSTRUMENTAL, "no_vocals": INSTRUMENTAL,
             "no vocals": INSTRUMENTAL, "music": INSTRUMENTAL, "karaoke": INSTRUMENTAL}


def canonical_sources(names: Iterable[str]) -> tuple[str, ...]:
    """Lower-case names with synonyms resolved; a two-stem (vocals, other) model's 'other' is
    the instrumental (it holds drums and bass too)."""
    out = [_SYNONYMS.get(str(n).strip().lower(), str(n).strip().lower()) for n in names]
    if sorted(out) == ["other", "vocals"]:
        out = [INSTRUMENTAL if n == "other" else n for n in out]
    if len(set(out)) != len(out) or not all(out):
        raise PipelineError(f"model stems {list(names)}: names must be distinct and non-empty")
    return tuple(out)
