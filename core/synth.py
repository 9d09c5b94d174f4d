"""Synthetic multitrack dataset: small songs rendered in the MUSDB18-HQ layout.

Why
---
The pipeline needs a dataset that ships with the code (no download, no licence) and that is hard
in the ways real music is hard for separators. Test tones would make every separator look perfect,
so each track here is a short song: the vocals share the mid band with chords and arpeggios, the
bass shares the low end with the kick, instruments enter and drop out at section boundaries
(museval skips frames in which a reference is digitally silent, so that silence must be exact), and
all stems sit in one reverberant room.

Design
------
A track is made in three steps, each a handful of small functions that can be read top to bottom:

1. *Plan* (`plan_track`): every musical decision -- tempo, key, chord progression, song form
   (which stems play in which section), drum kit and groove, bass pattern and timbre, the
   instruments that make up `other`, the singer, the room, the stem levels. It is plain data and is
   what dataset.json records about the track.
2. *Render* (`render_drums`, `render_bass`, `render_other`, `render_vocals`): turn the plan into
   dry stereo stems. Each note is synthesised as one numpy array and added into its stem at its
   onset; recursive structures (Karplus-Strong strings, moving formant filters) run through
   scipy.signal.lfilter/sosfilt a block at a time, never a Python loop per sample. Notes that recur
   (the progression repeats every four bars) are synthesised once per track and reused, and each
   drum is synthesised a few times per track and reused like the round-robin samples of a sampler.
3. *Mix* (`mix_track`): per-stem level, one synthetic room per track (convolution reverb), exact
   zeros wherever a stem has not sounded for longer than the room's decay, and a headroom gain that
   puts the mixture peak below 0 dBFS. Stems are rounded to float32 and the mixture is their
   float32 sum ``((drums + bass) + other) + vocals``, written as 32-bit float WAV, so the identity
   mixture == sum(stems) holds bit-exactly when the files are read back.

Determinism: each track draws from its own generators, seeded from SeedSequence((seed, split,
index)) and split per stem, so a track depends neither on the sizes of the other splits nor on the
order or number of processes that render the tracks. Files are written under a temporary name and
renamed into place; dataset.json is written last and marks the dataset complete.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
from scipy import signal

from core.errors import PipelineError
from core.progress import progress_bar

# the generator's name as recorded in every dataset.json it wrote (kept when the module moved
# from pipeline/ to core/: an existing dataset stays this generator's output)
GENERATOR = "pipeline.synth"
VERSION = 1
SPLITS = ("train", "valid", "test")
STEMS = ("drums", "bass", "other", "vocals")
WORKERS = 2  # the tracks are independent; two processes suit the small machines this runs on

# ------------------------------------------------------------------------------------------------
# Music theory
# ------------------------------------------------------------------------------------------------

# Flats only, so track names never contain '#'.
NOTE_NAMES = ("C", "Db", "D", "Eb", "E", "F", "Gb", "G", "Ab", "A", "Bb", "B")
SCALES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}
ROMAN = ("I", "II", "III", "IV", "V", "VI", "VII")
# Common pop progressions as 0-based scale degrees; a quarter of the tracks draw their own instead.
PROGRESSIONS = {
    "major": ((0, 4, 5, 3), (0, 5, 3, 4), (5, 3, 0, 4), (0, 3, 5, 4), (1, 4, 0, 5), (0, 3, 0, 4),
              (3, 0, 4, 5)),
    "minor": ((0, 5, 2, 6), (0, 3, 6, 2), (0, 6, 5, 6), (0, 3, 4, 0), (0, 5, 3, 4), (0, 2, 6, 3),
              (5, 6, 0, 0)),
}
DIMINISHED_DEGREE = {"major": 6, "minor": 1}  # avoided when drawing a progression at random


def midi_hz(pitch):
    return 440.0 * 2.0 ** ((np.asarray(pitch, dtype=float) - 69.0) / 12.0)


@dataclass(frozen=True)
class Chord:
    degree: int              # 0-based scale degree of the root
    tones: tuple[int, ...]   # pitch classes, root first
    name: str
    roman: str


def diatonic_chord(tonic: int, mode: str, degree: int, seventh: bool) -> Chord:
    scale = SCALES[mode]
    stack = (0, 2, 4, 6) if seventh else (0, 2, 4)
    tones = tuple((tonic + scale[(degree + s) % 7]) % 12 for s in stack)
    third, fifth = (tones[1] - tones[0]) % 12, (tones[2] - tones[0]) % 12
    quality = "dim" if fifth == 6 else ("m" if third == 3 else "")
    roman = ROMAN[degree] if third == 4 else ROMAN[degree].lower()
    roman += "o" if quality == "dim" else ""
    name = NOTE_NAMES[tones[0]]
    if not seventh:
        name += quality
    else:
        sev = (tones[3] - tones[0]) % 12
        name += {"dim": "m7b5", "m": "m7"}.get(quality, "maj7" if sev == 11 else "7")
        roman += "7"
    return Chord(degree, tones, name, roman)


def voice_chord(tones, low: int) -> list[int]:
    """Each chord tone at its first occurrence at or above `low`: a close voicing whose inversion
    follows from the register, which keeps the voice leading smooth without search."""
    return sorted(low + (pc - low) % 12 for pc in tones)


def scale_pitches(tonic: int, mode: str, low: int, high: int) -> np.ndarray:
    pcs = {(tonic + s) % 12 for s in SCALES[mode]}
    return np.array([p for p in range(low, high + 1) if p % 12 in pcs])


# ------------------------------------------------------------------------------------------------
# The plan: every random decision about a track, as plain data
# ------------------------------------------------------------------------------------------------

@dataclass
class Section:
    name: str
    start_bar: int
    bars: int
    stems: tuple[str, ...]   # stems that play in this section
    energy: float            # scales velocities: intros and breaks are softer than choruses


@dataclass
class Grid:
    """Musical time -> seconds. 4/4 throughout; `swing` delays odd 16ths by a fraction of a 16th."""
    tempo: float
    swing: float

    @property
    def beat(self) -> float:
        return 60.0 / self.tempo

    @property
    def bar(self) -> float:
        return 4.0 * self.beat

    def time(self, bar: float, sixteenth: float = 0.0) -> float:
        t = bar * self.bar + sixteenth * self.beat / 4.0
        if float(sixteenth).is_integer() and int(sixteenth) % 2 == 1:
            t += self.swing * self.beat / 4.0
        return t


@dataclass
class DrumKit:
    groove: str
    kick_f0: float       # the kick's resting pitch sits right in the bass register
    kick_sweep: float    # start of the pitch sweep, as a multiple of kick_f0
    kick_decay: float
    snare_f0: float
    snare_decay: float
    snare_band: tuple[float, float]
    hat_cutoff: float
    hat_closed: float
    hat_open: float
    hat_partials: tuple[float, ...]
    tom_f0: tuple[float, float, float]
    crash_decay: float
    timing_ms: float     # humanisation: std of onset jitter
    pans: dict


@dataclass
class BassPart:
    timbre: str          # sine | saw | pluck | fm
    pattern: str
    low: int             # roots are placed in [low, low + 12)
    cutoff: float        # lowpass on the whole part
    pan: float


@dataclass
class OtherPart:
    instrument: str      # piano | pad | organ | pluck
    role: str            # chords | arp
    rhythm: str          # chord rhythm or arpeggio pattern
    low: int             # lowest note of the voicing / figure
    pan: float
    gain_db: float
    sections: tuple[str, ...]
    params: dict = field(default_factory=dict)


@dataclass
class Singer:
    voice: str           # male | female
    low: int
    high: int
    formant_scale: float
    vibrato_hz: float
    vibrato_semitones: float
    glide_s: float
    breathiness: float
    tilt_hz: float       # one-pole lowpass on the source: a softer voice has a steeper tilt
    pan: float


@dataclass
class TrackPlan:
    name: str
    tonic: int
    mode: str
    grid: Grid
    progression: tuple[Chord, ...]
    sections: list[Section]
    bar_chords: list[Chord]
    kit: DrumKit
    bass: BassPart
    other: list[OtherPart]
    singer: Singer
    rt60: float
    sends: dict
    gains_db: dict
    peak_db: float

    def sections_with(self, stem: str):
        return [s for s in self.sections if stem in s.stems]


def plan_track(rng: np.random.Generator, split: str, index: int, duration: float) -> TrackPlan:
    mode = str(rng.choice(["major", "minor"]))
    tonic = int(rng.integers(12))
    tempo = int(rng.integers(80, 151))
    grid = Grid(tempo, float(rng.choice([0.0, 0.0, 0.0, 0.15, 0.3])))
    progression = plan_progression(rng, tonic, mode)
    total_bars = max(1, math.ceil(duration / grid.bar - 1e-9))
    sections = plan_sections(rng, total_bars)
    bar_chords = []
    for s in sections:
        # the chorus starts the loop half way round, so it does not sound like the verse again
        shift = 2 if s.name == "chorus" else 0
        bar_chords += [progression[(b + shift) % len(progression)] for b in range(s.bars)]
    name = f"synth-{split}-{index:03d} ({NOTE_NAMES[tonic]} {mode}, {tempo} bpm)"
    return TrackPlan(
        name=name, tonic=tonic, mode=mode, grid=grid, progression=progression, sections=sections,
        bar_chords=bar_chords, kit=plan_kit(rng), bass=plan_bass(rng), other=plan_other(rng),
        singer=plan_singer(rng), rt60=float(rng.uniform(0.35, 1.4)),
        sends={"drums": rng.uniform(0.08, 0.25), "bass": 0.0,
               "other": rng.uniform(0.2, 0.45), "vocals": rng.uniform(0.2, 0.45)},
        # vocals usually sit on top; every stem moves by a few dB from track to track
        gains_db={"drums": rng.uniform(-3, 3), "bass": rng.uniform(-4, 2),
                  "other": rng.uniform(-4, 2), "vocals": rng.uniform(-1, 4)},
        peak_db=float(rng.uniform(-6.0, -1.0)),
    )


def plan_progression(rng, tonic: int, mode: str) -> tuple[Chord, ...]:
    if rng.random() < 0.75:
        degrees = PROGRESSIONS[mode][rng.integers(len(PROGRESSIONS[mode]))]
    else:
        allowed = [d for d in range(1, 7) if d != DIMINISHED_DEGREE[mode]]
        degrees = (0, *rng.choice(allowed, 3))
    sevenths = rng.random() < 0.3
    return tuple(diatonic_chord(tonic, mode, int(d), sevenths and rng.random() < 0.6)
                 for d in degrees)


SECTION_ENERGY = {"intro": 0.55, "verse": 0.75, "chorus": 1.0, "break": 0.6, "outro": 0.7}
SECTION_BARS = {"verse": (2, 4), "chorus": (2, 4), "break": (1, 2), "outro": (2,)}
FORM = ("verse", "chorus", "break", "verse", "chorus", "outro")


def plan_sections(rng, total_bars: int) -> list[Section]:
    """A song form cut to the track's length. Very short tracks are one chorus, so that every stem
    sounds; longer ones open with an intro without vocals and drop stems in breaks and outros."""
    if total_bars <= 3:
        return [Section("chorus", 0, total_bars, STEMS, 1.0)]
    intro_bars = 1 if total_bars < 8 else 2
    intro = {"other"} | ({"drums"} if rng.random() < 0.5 else set()) \
        | ({"bass"} if rng.random() < 0.3 else set())
    sections = [Section("intro", 0, intro_bars, tuple(s for s in STEMS if s in intro), 0.55)]
    bar, i = intro_bars, 0
    while bar < total_bars:
        name = FORM[i] if i < len(FORM) else "chorus"
        bars = min(int(rng.choice(SECTION_BARS[name])), total_bars - bar)
        if total_bars - bar - bars == 1:   # no one-bar leftover at the end
            bars += 1
        if name == "verse":
            stems = set(STEMS) - ({"other"} if rng.random() < 0.25 else set())
        elif name == "break":
            stems = [{"drums"}, {"other", "vocals"}, {"bass", "drums"}, {"other"}][rng.integers(4)]
        elif name == "outro":
            stems = {"drums", "bass", "other"} if rng.random() < 0.6 else {"other"}
        else:
            stems = set(STEMS)
        sections.append(Section(name, bar, bars, tuple(s for s in STEMS if s in stems),
                                SECTION_ENERGY[name]))
        bar, i = bar + bars, i + 1
    return sections


# Grooves as 16-step strings: kick, snare ('g' = ghost note), hi-hat ('x' closed, 'o' open).
GROOVES = {
    "rock": ("x.......x.x.....", "....x.......x...", "x.x.x.x.x.x.x.x."),
    "pop": ("x.....x.x.......", "....x.......x...", "x.x.x.x.x.x.x.x."),
    "disco": ("x...x...x...x...", "....x.......x...", "x.o.x.o.x.o.x.o."),
    "halftime": ("x.....x...x.....", "........x.......", "x.x.x.x.x.x.x.x."),
    "funk": ("x.x...x..x......", "....x..g.g..x..g", "xxxxxxxxxxxxxxxx"),
    "backbeat": ("x..x..x...x.....", "....x.......x...", "x.xxx.x.x.xxx.x."),
}


def plan_kit(rng) -> DrumKit:
    return DrumKit(
        groove=str(rng.choice(list(GROOVES))),
        kick_f0=rng.uniform(44, 62), kick_sweep=rng.uniform(2.2, 3.5),
        kick_decay=rng.uniform(0.12, 0.3),
        snare_f0=rng.uniform(170, 240), snare_decay=rng.uniform(0.06, 0.12),
        snare_band=(rng.uniform(700, 1500), rng.uniform(6000, 9000)),
        hat_cutoff=rng.uniform(6500, 9000), hat_closed=rng.uniform(0.015, 0.035),
        hat_open=rng.uniform(0.12, 0.25),
        hat_partials=tuple(np.sort(rng.uniform(3000, 9000, 6))),
        tom_f0=tuple(rng.uniform(90, 110) * np.array([2.0, 1.5, 1.0])),
        crash_decay=rng.uniform(0.5, 0.9), timing_ms=rng.uniform(2, 8),
        # drummer's perspective: hats and high tom left, floor tom right, a little randomised
        pans={"kick": 0.0, "snare": rng.uniform(-0.15, 0.15), "hat": rng.uniform(-0.55, -0.25),
              "toms": (-0.4, 0.0, 0.45), "crash": rng.uniform(0.25, 0.6)},
    )


BASS_TIMBRES = ("sine", "saw", "pluck", "fm")


def plan_bass(rng) -> BassPart:
    return BassPart(timbre=str(rng.choice(BASS_TIMBRES)),
                    pattern=str(rng.choice(["eighths", "root_fifth", "syncopated", "octaves"])),
                    low=int(rng.integers(28, 34)),   # roots from E1..A1 up one octave
                    cutoff=rng.uniform(500, 1200), pan=rng.uniform(-0.05, 0.05))


ORGAN_REGISTRATIONS = ("888000000", "868000000", "888800000", "838000000", "808000008",
                       "888600000")


def plan_other(rng) -> list[OtherPart]:
    """A chord instrument that plays whenever `other` does, a mid-register figure (arpeggio or
    riff) in the singer's range, and sometimes a pad under the chorus."""
    side = float(rng.choice([-1.0, 1.0]))
    comp = str(rng.choice(["piano", "piano", "pad", "organ", "pluck"]))
    rhythm = {"pad": "sustain", "organ": str(rng.choice(["sustain", "halves", "anticipation"])),
              "piano": str(rng.choice(["sustain", "quarters", "anticipation", "offbeats"])),
              "pluck": str(rng.choice(["quarters", "offbeats", "anticipation"]))}[comp]
    parts = [OtherPart(comp, "chords", rhythm, int(rng.integers(52, 61)),
                       side * rng.uniform(0.15, 0.5), 0.0,
                       ("intro", "verse", "chorus", "break", "outro"),
                       instrument_params(rng, comp))]
    figure = str(rng.choice(["pluck", "pluck", "piano", "organ"]))
    where = ["chorus"] + [s for s in ("intro", "verse", "break", "outro") if rng.random() < 0.5]
    parts.append(OtherPart(figure, "arp", str(rng.choice(["up", "down", "updown", "motif"])),
                           int(rng.integers(60, 68)), -side * rng.uniform(0.2, 0.6),
                           rng.uniform(-6, -1), tuple(where), instrument_params(rng, figure)))
    if comp != "pad" and rng.random() < 0.5:
        parts.append(OtherPart("pad", "chords", "sustain", int(rng.integers(55, 61)),
                               side * rng.uniform(-0.3, 0.3), rng.uniform(-9, -4), ("chorus",),
                               instrument_params(rng, "pad")))
    return parts


def instrument_params(rng, instrument: str) -> dict:
    if instrument == "piano":
        return {"inharmonicity": rng.uniform(5e-5, 3e-4), "decay": rng.uniform(1.0, 2.5),
                "strike": rng.uniform(1 / 9, 1 / 7), "left_hand": bool(rng.random() < 0.5)}
    if instrument == "pad":
        return {"detune_cents": rng.uniform(6, 15), "attack": rng.uniform(0.15, 0.5),
                "cutoff": rng.uniform(1200, 3000)}
    if instrument == "organ":
        return {"registration": str(rng.choice(ORGAN_REGISTRATIONS)),
                "tremolo_hz": rng.uniform(5.5, 7.0)}
    return {"t60": rng.uniform(0.6, 2.0), "brightness": rng.uniform(2000, 6000)}   # pluck


def plan_singer(rng) -> Singer:
    voice = str(rng.choice(["male", "female"]))
    low, high = (45, 64) if voice == "male" else (57, 72)   # A2-E4, A3-C5
    return Singer(voice=voice, low=low, high=high, formant_scale=rng.uniform(0.95, 1.05),
                  vibrato_hz=rng.uniform(5.0, 6.2), vibrato_semitones=rng.uniform(0.2, 0.6),
                  glide_s=rng.uniform(0.03, 0.08), breathiness=rng.uniform(0.02, 0.1),
                  tilt_hz=rng.uniform(2500, 5000), pan=rng.uniform(-0.08, 0.08))


# ------------------------------------------------------------------------------------------------
# Buffers: mono parts and stereo stems that also remember where they sound
# ------------------------------------------------------------------------------------------------

def pan_gains(pos: float) -> tuple[float, float]:
    """Constant power: the sum of squares is 1 at every position, so panning does not change the
    level of a source."""
    angle = (pos + 1.0) * np.pi / 4.0
    return math.cos(angle), math.sin(angle)


def clip_to_track(start: int, x: np.ndarray, n: int) -> tuple[int, np.ndarray]:
    """The part of a sound placed at `start` that falls inside [0, n): a note humanised to just
    before 0 loses its first samples rather than moving later."""
    if start < 0:
        x, start = x[-start:], 0
    return start, x[: max(0, n - start)]


class Bus:
    """A mono buffer plus the samples where something was placed. The activity mask, not the
    signal, decides where a stem is made exactly silent: IIR filter and reverb tails never reach
    exact zero by themselves."""

    def __init__(self, n: int):
        self.audio = np.zeros(n)
        self.active = np.zeros(n, dtype=bool)

    def add(self, start: int, x: np.ndarray, gain: float = 1.0):
        start, x = clip_to_track(start, x, len(self.audio))
        self.audio[start:start + len(x)] += gain * x
        self.active[start:start + len(x)] = True


class Stem:
    def __init__(self, n: int):
        self.audio = np.zeros((2, n))
        self.active = np.zeros(n, dtype=bool)

    def add(self, start: int, x: np.ndarray, pan: float, gain: float = 1.0):
        start, x = clip_to_track(start, x, self.audio.shape[1])
        left, right = pan_gains(pan)
        self.audio[0, start:start + len(x)] += (gain * left) * x
        self.audio[1, start:start + len(x)] += (gain * right) * x
        self.active[start:start + len(x)] = True

    def add_bus(self, bus: Bus, pan: float, gain: float = 1.0):
        left, right = pan_gains(pan)
        self.audio[0] += (gain * left) * bus.audio
        self.audio[1] += (gain * right) * bus.audio
        self.active |= bus.active


# ------------------------------------------------------------------------------------------------
# Signal building blocks
# ------------------------------------------------------------------------------------------------

@lru_cache(maxsize=256)
def butter(kind: str, cutoff, sr: int, order: int = 2) -> np.ndarray:
    """Cached Butterworth design, cut-offs clipped below Nyquist so any sample rate works."""
    nyq = 0.5 * sr
    if isinstance(cutoff, tuple):
        lo, hi = min(cutoff[0], 0.8 * nyq), min(cutoff[1], 0.9 * nyq)
        return signal.butter(order, (lo, max(hi, 1.05 * lo)), kind, fs=sr, output="sos")
    return signal.butter(order, min(cutoff, 0.9 * nyq), kind, fs=sr, output="sos")


def filtered_noise(rng, n: int, kind: str, cutoff, sr: int, order: int = 2) -> np.ndarray:
    """White noise through a Butterworth filter, normalised to unit RMS so levels mean the same
    whatever the band."""
    x = signal.sosfilt(butter(kind, cutoff, sr, order), rng.standard_normal(n))
    return x / (np.sqrt(np.mean(x * x)) + 1e-12)


def saw(freq: np.ndarray, sr: int, phase0: float = 0.0) -> np.ndarray:
    """Band-limited sawtooth (PolyBLEP) following a per-sample frequency: a naive saw would alias
    audibly at the high pitches of pads and voices."""
    dt = freq / sr
    phase = np.cumsum(dt)
    phase += phase0
    np.mod(phase, 1.0, out=phase)
    y = 2.0 * phase - 1.0
    i = np.flatnonzero(phase < dt)              # just after a wrap
    t = phase[i] / dt[i]
    y[i] -= 2 * t - t * t - 1.0
    i = np.flatnonzero(phase > 1.0 - dt)        # just before a wrap
    t = (phase[i] - 1.0) / dt[i]
    y[i] -= t * t + 2 * t + 1.0
    return y


def hold_release(n_hold: int, n_release: int, n_attack: int = 0) -> np.ndarray:
    """Gate envelope: linear attack, flat while the key is held, then a quarter-cosine release
    (no click when the note ends)."""
    env = np.ones(n_hold + n_release)
    if n_attack:
        n_attack = min(n_attack, len(env))
        env[:n_attack] = np.linspace(0.0, 1.0, n_attack, endpoint=False)
    if n_release:
        env[n_hold:] *= np.cos(np.linspace(0.0, np.pi / 2, n_release))
    return env


def slow_noise(rng, n: int, time_constant: float, sr: int) -> np.ndarray:
    """Smoothed noise with unit standard deviation: the slow, random wander of a human voice."""
    x = one_pole(rng.standard_normal(n), time_constant, sr)
    return x / (np.std(x) + 1e-12)


def one_pole(x: np.ndarray, time_constant: float, rate: float, axis: int = -1) -> np.ndarray:
    """Exponential smoothing started at the first value (no ramp from zero): portamento for pitch,
    glides for formants, gentle edges for amplitude."""
    a = math.exp(-1.0 / max(time_constant * rate, 1e-9))
    first = np.take(x, [0], axis=axis)
    y, _ = signal.lfilter([1.0 - a], [1.0, -a], x, axis=axis, zi=first * a)
    return y


def karplus_strong(rng, f0: float, n: int, sr: int, t60: float, brightness: float) -> np.ndarray:
    """Plucked string: a noise burst circulating in a delay line of one period, with a two-point
    average (the string loses highs each round trip) and an allpass for the fractional part of the
    period (keeps high notes in tune). The loop filter only sees samples at least one period old,
    so a whole period is computed per lfilter call instead of one sample per Python step."""
    period = sr / f0
    delay = int(math.floor(period - 0.6))
    frac = period - delay - 0.5                            # allpass delay, in [0.1, 1.1)
    c = (1.0 - frac) / (1.0 + frac)
    g = 10.0 ** (-3.0 / (t60 * f0))                        # -60 dB after t60 seconds
    b = g * 0.5 * np.convolve([1.0, 1.0], [c, 1.0])
    a = np.array([1.0, c])
    excitation = signal.sosfilt(butter("lowpass", brightness, sr), rng.uniform(-1, 1, delay))
    blocks = -(-n // delay) + 1
    y = np.zeros(blocks * delay)
    y[:delay] = excitation - excitation.mean()
    zi = np.zeros(2)
    for k in range(1, blocks):
        y[k * delay:(k + 1) * delay], zi = signal.lfilter(
            b, a, y[(k - 1) * delay:k * delay], zi=zi)
    return y[:n]


def additive(freqs: np.ndarray, amps: np.ndarray, decays: np.ndarray | None, n: int, sr: int,
             phases: np.ndarray) -> np.ndarray:
    """Sum of exponentially decaying sinusoids (constant ones where `decays` is None). Each partial
    is the impulse response of a two-pole resonator, r^n sin(n theta + phase), which lfilter
    produces about ten times faster than evaluating sin and exp per sample. Partials at or above
    Nyquist are dropped."""
    impulse = np.zeros(n)
    impulse[0] = 1.0
    out = np.zeros(n)
    for k in np.flatnonzero(freqs < 0.48 * sr):
        r = 1.0 if decays is None else math.exp(-1.0 / (decays[k] * sr))
        theta = 2 * np.pi * freqs[k] / sr
        b = [math.sin(phases[k]), r * math.sin(theta - phases[k])]
        out += amps[k] * signal.lfilter(b, [1.0, -2.0 * r * math.cos(theta), r * r], impulse)
    return out


# ------------------------------------------------------------------------------------------------
# Drums
# ------------------------------------------------------------------------------------------------

def kick(kit: DrumKit, rng, sr: int) -> np.ndarray:
    """Sine with a fast downward pitch sweep (the 'punch'), a beater click, and soft clipping."""
    n = int(kit.kick_decay * 5 * sr)
    t = np.arange(n) / sr
    freq = kit.kick_f0 * (1.0 + (kit.kick_sweep - 1.0) * np.exp(-t / 0.03))
    body = np.sin(2 * np.pi * np.cumsum(freq) / sr) * np.exp(-t / kit.kick_decay)
    nc = int(0.008 * sr)
    click = filtered_noise(rng, nc, "highpass", 1500.0, sr) * np.exp(-np.arange(nc) / (0.0015 * sr))
    body[:nc] += 0.25 * click
    return np.tanh(1.5 * body) / np.tanh(1.5)


def snare(kit: DrumKit, rng, sr: int) -> np.ndarray:
    """Two drum-head modes plus band-passed noise for the snare wires."""
    n = int((kit.snare_decay * 5 + 0.02) * sr)
    t = np.arange(n) / sr
    f = kit.snare_f0 * (1.0 + 0.15 * np.exp(-t / 0.01))
    phase = 2 * np.pi * np.cumsum(f) / sr
    tone = (np.sin(phase) + 0.5 * np.sin(1.59 * phase)) * np.exp(-t / 0.045)
    wires = filtered_noise(rng, n, "bandpass", kit.snare_band, sr) * np.exp(-t / kit.snare_decay)
    return 0.6 * tone + 0.5 * wires


def hihat(kit: DrumKit, rng, sr: int, open_: bool = False) -> np.ndarray:
    """High-passed noise plus a few inharmonic partials for the metallic ring."""
    decay = kit.hat_open if open_ else kit.hat_closed
    n = int(decay * 5 * sr)
    t = np.arange(n) / sr
    partials = np.array(kit.hat_partials)
    metal = additive(partials, np.ones(len(partials)), None, n, sr,
                     rng.uniform(0, 2 * np.pi, len(partials)))
    x = signal.sosfilt(butter("highpass", kit.hat_cutoff, sr, 4),
                       rng.standard_normal(n) + 0.3 * metal)
    return 0.5 * x * np.exp(-t / decay) * np.linspace(1.0, 0.0, n) ** 0.25


def tom(kit: DrumKit, rng, sr: int, which: int) -> np.ndarray:
    """Pitched membrane (0 = high tom ... 2 = floor tom) with a small downward bend and a stick
    click; lower toms ring longer."""
    f0 = kit.tom_f0[which]
    decay = 0.18 + 0.08 * which
    n = int(decay * 5 * sr)
    t = np.arange(n) / sr
    freq = f0 * (1.0 + 0.4 * np.exp(-t / 0.04))
    phase = 2 * np.pi * np.cumsum(freq) / sr
    x = (np.sin(phase) + 0.3 * np.sin(1.5 * phase)) * np.exp(-t / decay)
    nc = int(0.01 * sr)
    x[:nc] += 0.2 * filtered_noise(rng, nc, "bandpass", (1000.0, 5000.0), sr) \
        * np.exp(-np.arange(nc) / (0.002 * sr))
    return x


def crash(kit: DrumKit, rng, sr: int) -> np.ndarray:
    """Long noisy decay, band-limited to the cymbal range, with a slow shimmer."""
    n = int(min(4.0, kit.crash_decay * 5) * sr)
    t = np.arange(n) / sr
    noise = filtered_noise(rng, n, "bandpass", (3000.0, 14000.0), sr)
    shimmer = 1.0 + 0.15 * np.sin(2 * np.pi * rng.uniform(3, 7) * t + rng.uniform(0, 6.3))
    env = np.exp(-t / kit.crash_decay) * np.minimum(1.0, t / 0.002)
    env *= np.linspace(1.0, 0.0, n) ** 0.25   # reach zero at the end of the sample
    return 0.45 * noise * shimmer * env


DRUM_VARIANTS = 3


class DrumSamples:
    """Each kit piece synthesised a few times per track and reused, scaled by velocity, like the
    round-robin samples of a drum sampler: hits differ from each other, but a whole drum track
    costs only a handful of syntheses."""

    def __init__(self, kit: DrumKit, rng, sr: int):
        self.kit, self.rng, self.sr, self.bank = kit, rng, sr, {}

    def hit(self, voice: str) -> np.ndarray:
        if voice not in self.bank:
            self.bank[voice] = [self.synth(voice) for _ in range(DRUM_VARIANTS)]
        return self.bank[voice][int(self.rng.integers(DRUM_VARIANTS))]

    def synth(self, voice: str) -> np.ndarray:
        kit, rng, sr = self.kit, self.rng, self.sr
        if voice == "kick":
            return kick(kit, rng, sr)
        if voice == "snare":
            return snare(kit, rng, sr)
        if voice in ("hat", "open"):
            return hihat(kit, rng, sr, open_=voice == "open")
        if voice == "crash":
            return crash(kit, rng, sr)
        return tom(kit, rng, sr, int(voice[3]))


def drum_events(plan: TrackPlan, rng) -> list[tuple[float, str, float]]:
    """(time, voice, velocity) for the whole track: the groove, varied by section, with fills into
    the next section and a crash where a new section starts."""
    kit, grid = plan.kit, plan.grid
    kick_line, snare_line, hat_line = GROOVES[kit.groove]
    events = []
    for si, sec in enumerate(plan.sections):
        if "drums" not in sec.stems:
            continue
        nxt = plan.sections[si + 1] if si + 1 < len(plan.sections) else None
        fill_from = 16
        if nxt is not None and "drums" in nxt.stems and rng.random() < 0.75:
            fill_from = int(rng.choice([8, 12]))
        if sec.name == "chorus" or (sec.name == "verse" and si > 1):
            events.append((grid.time(sec.start_bar), "crash", 0.9 * sec.energy))
        for b in range(sec.bars):
            bar = sec.start_bar + b
            last = b == sec.bars - 1
            for step in range(16):
                accent = 1.0 if step % 4 == 0 else (0.8 if step % 2 == 0 else 0.65)
                vel = sec.energy * accent
                if last and step >= fill_from:
                    # fill: 16ths moving down the toms, louder towards the downbeat
                    k = step - fill_from
                    grow = 0.7 + 0.3 * k / max(1, 15 - fill_from)
                    voice = "snare" if k % 4 == 0 else f"tom{min(2, 3 * k // (16 - fill_from))}"
                    events.append((grid.time(bar, step), voice, sec.energy * grow))
                    continue
                if sec.name == "intro":
                    # intro: hats, and the kick only on the downbeat
                    if hat_line[step] != ".":
                        events.append((grid.time(bar, step), "hat", 0.7 * vel))
                    if step == 0 and rng.random() < 0.5:
                        events.append((grid.time(bar, step), "kick", vel))
                    continue
                if sec.name == "break":
                    # break: half-time feel on toms and kick, no hats
                    if step in (0, 10):
                        events.append((grid.time(bar, step), "kick", vel))
                    if step in (8, 14):
                        events.append((grid.time(bar, step), f"tom{int(rng.integers(3))}", vel))
                    continue
                if kick_line[step] == "x":
                    events.append((grid.time(bar, step), "kick", vel))
                if snare_line[step] in "xg":
                    events.append((grid.time(bar, step), "ghost" if snare_line[step] == "g"
                                   else "snare", vel))
                hat = hat_line[step]
                if sec.name == "chorus" and step % 4 == 2:
                    hat = "o"   # the chorus opens the hats on the off-beats
                if hat != ".":
                    events.append((grid.time(bar, step), "open" if hat == "o" else "hat", vel))
    return events


def render_drums(plan: TrackPlan, n: int, sr: int, rng) -> Stem:
    kit, stem = plan.kit, Stem(n)
    samples = DrumSamples(kit, rng, sr)
    pans = {"kick": kit.pans["kick"], "snare": kit.pans["snare"], "ghost": kit.pans["snare"],
            "hat": kit.pans["hat"], "open": kit.pans["hat"], "crash": kit.pans["crash"],
            "tom0": kit.pans["toms"][0], "tom1": kit.pans["toms"][1], "tom2": kit.pans["toms"][2]}
    for time, voice, vel in drum_events(plan, rng):
        # humanise: onsets scatter by a few ms, velocities by about 10 %
        start = int(round((time + rng.normal(0, kit.timing_ms / 1000)) * sr))
        vel = float(np.clip(vel * rng.normal(1.0, 0.1), 0.05, 1.2))
        if voice == "ghost":
            voice, vel = "snare", 0.3 * vel
        stem.add(start, samples.hit(voice), pans[voice], vel)
    return stem


# ------------------------------------------------------------------------------------------------
# Bass
# ------------------------------------------------------------------------------------------------

# Per bar, in eighths: (start, length, note) with note R root, 5 fifth, 8 octave, A approach (a
# step into the next bar's root, the passing note bass players use to connect chords).
BASS_PATTERNS = {
    "eighths": [(i, 1, "R") for i in range(7)] + [(7, 1, "A")],
    "root_fifth": [(0, 2, "R"), (2, 2, "5"), (4, 2, "R"), (6, 1, "8"), (7, 1, "A")],
    "syncopated": [(0, 3, "R"), (3, 1, "R"), (4, 2, "5"), (6, 1, "8"), (7, 1, "A")],
    "octaves": [(i, 1, "R" if i % 2 == 0 else "8") for i in range(7)] + [(7, 1, "A")],
    "sparse": [(0, 6, "R"), (6, 2, "5")],   # intros, breaks, outros
}


def bass_note(part: BassPart, pitch: int, n_hold: int, sr: int, rng) -> np.ndarray:
    f0 = float(midi_hz(pitch))
    n_release = int(0.03 * sr)
    n = n_hold + n_release
    t = np.arange(n) / sr
    if part.timbre == "sine":
        # round sine with a little saturation for the harmonics that make it audible on small
        # speakers
        x = np.tanh(1.8 * np.sin(2 * np.pi * f0 * t)) / np.tanh(1.8)
    elif part.timbre == "saw":
        # a filter envelope without a time-varying filter: a bright saw that decays fast over a
        # dark fundamental that sustains
        x = saw(np.full(n, f0), sr) * (0.25 + 0.75 * np.exp(-t / 0.12)) \
            + 0.8 * np.sin(2 * np.pi * f0 * t)
    elif part.timbre == "fm":
        index = 2.5 * np.exp(-t / 0.1) + 0.3
        x = np.sin(2 * np.pi * f0 * t + index * np.sin(2 * np.pi * f0 * t))
    else:
        # fingered bass: decaying harmonics, the upper ones dying within a few periods (a
        # Karplus-Strong string keeps its highs far too long at 40-100 Hz)
        k = np.arange(1, 13)
        x = additive(k * f0, 1.0 / k, 1.2 / (1.0 + 1.5 * (k - 1)), n, sr,
                     rng.uniform(0, 2 * np.pi, len(k)))
    return x * hold_release(n_hold, n_release, int(0.004 * sr))


def bass_notes(plan: TrackPlan) -> list[tuple[float, float, int, float]]:
    """(start s, length s, MIDI pitch, velocity) following the chord roots."""
    grid, part = plan.grid, plan.bass
    sections = plan.sections
    root_pitch = [part.low + (c.tones[0] - part.low) % 12 for c in plan.bar_chords]
    notes = []
    for si, sec in enumerate(sections):
        if "bass" not in sec.stems:
            continue
        pattern = BASS_PATTERNS[part.pattern if sec.name in ("verse", "chorus") else "sparse"]
        for b in range(sec.bars):
            bar = sec.start_bar + b
            root = root_pitch[bar]
            nxt = root_pitch[bar + 1] if bar + 1 < len(root_pitch) else root
            for start, length, what in pattern:
                if what == "A":
                    # approach the next root from a semitone below or a whole tone above
                    pitch = nxt - 1 if (bar + start) % 2 == 0 else nxt + 2
                    if nxt == root:
                        pitch = root + 7
                else:
                    pitch = root + {"R": 0, "5": 7, "8": 12}[what]
                notes.append((grid.time(bar, 2 * start), length * grid.beat / 2 * 0.92, pitch,
                              sec.energy))
    return notes


def render_bass(plan: TrackPlan, n: int, sr: int, rng) -> Stem:
    part, bus, cache = plan.bass, Bus(n), {}
    for time, length, pitch, vel in bass_notes(plan):
        n_hold = int(length * sr)
        if (pitch, n_hold) not in cache:
            cache[pitch, n_hold] = bass_note(part, pitch, n_hold, sr, rng)
        start = int(round((time + rng.normal(0, 0.004)) * sr))
        bus.add(start, cache[pitch, n_hold], vel * rng.uniform(0.85, 1.0))
    bus.audio = signal.sosfilt(butter("lowpass", part.cutoff, sr), bus.audio)
    stem = Stem(n)
    stem.add_bus(bus, part.pan)
    return stem


# ------------------------------------------------------------------------------------------------
# Other: piano, pad, organ, plucked strings
# ------------------------------------------------------------------------------------------------

def piano_note(prm: dict, pitch: int, n_hold: int, sr: int, rng) -> np.ndarray:
    """Decaying partials of a stiff string: stretched frequencies (inharmonicity), a hammer that
    strikes near the end of the string (some partials missing), upper partials dying first, a
    damper at key release."""
    f0 = float(midi_hz(pitch))
    k = np.arange(1, 21)
    freqs = k * f0 * np.sqrt(1.0 + prm["inharmonicity"] * k * k)
    amps = np.abs(np.sin(np.pi * k * prm["strike"])) / k ** 1.3
    tau0 = min(6.0, prm["decay"] * math.sqrt(261.6 / f0))   # low strings ring longer
    decays = tau0 / (1.0 + 0.25 * (k - 1))
    n_release = int(0.12 * sr)
    n = n_hold + n_release
    x = additive(freqs, amps, decays, n, sr, rng.uniform(0, 2 * np.pi, len(k)))
    x[n_hold:] *= np.exp(-np.arange(n_release) / (0.025 * sr))
    return x * hold_release(n_hold + n_release, 0, int(0.002 * sr))


def pad_note(prm: dict, pitch: int, n_hold: int, sr: int, rng) -> np.ndarray:
    """Three detuned saws (chorus-like beating) with a slow attack; the part is low-passed."""
    f0 = float(midi_hz(pitch))
    n_release = int(0.4 * sr)
    n = n_hold + n_release
    x = np.zeros(n)
    for cents in (-prm["detune_cents"], 0.0, prm["detune_cents"]):
        x += saw(np.full(n, f0 * 2 ** (cents / 1200)), sr, rng.uniform())
    env = hold_release(n_hold, n_release, int(prm["attack"] * sr))
    return 0.35 * x * env


def organ_note(prm: dict, pitch: int, n_hold: int, sr: int, rng) -> np.ndarray:
    """Tonewheel organ: nine drawbars (16', 8', 5 1/3', 4', 2 2/3', 2', 1 3/5', 1 1/3', 1'), each
    step of a drawbar about 3 dB, and the key click."""
    f0 = float(midi_hz(pitch))
    ratios = np.array([0.5, 1, 1.5, 2, 3, 4, 5, 6, 8])
    levels = np.array([int(c) for c in prm["registration"]])
    amps = np.where(levels > 0, 10 ** ((levels - 8) * 3 / 20), 0.0)
    n_release = int(0.03 * sr)
    n = n_hold + n_release
    x = additive(f0 * ratios, amps, None, n, sr, rng.uniform(0, 2 * np.pi, 9))
    nc = int(0.004 * sr)
    x[:nc] += 0.3 * filtered_noise(rng, nc, "highpass", 2000.0, sr)
    return 0.5 * x * hold_release(n_hold, n_release, int(0.005 * sr))


def pluck_note(prm: dict, pitch: int, n_hold: int, sr: int, rng) -> np.ndarray:
    n_release = int(0.08 * sr)
    x = karplus_strong(rng, float(midi_hz(pitch)), n_hold + n_release, sr, prm["t60"],
                       prm["brightness"])
    return 2.0 * x * hold_release(n_hold, n_release)


INSTRUMENTS = {"piano": piano_note, "pad": pad_note, "organ": organ_note, "pluck": pluck_note}

CHORD_RHYTHMS = {   # (start, length) in 16ths within a bar
    "sustain": [(0, 16)],
    "halves": [(0, 8), (8, 8)],
    "quarters": [(0, 3), (4, 3), (8, 3), (12, 3)],
    "anticipation": [(0, 6), (6, 6), (12, 4)],
    "offbeats": [(2, 2), (6, 2), (10, 2), (14, 2)],
}


def part_notes(plan: TrackPlan, part: OtherPart, rng) -> list[tuple[float, float, int, float]]:
    """(start s, length s, pitch, velocity) of one `other` part."""
    grid = plan.grid
    motif = rng.integers(0, 6, 8)   # a riff: chord-tone indices repeated every bar
    notes = []
    for sec in plan.sections:
        if "other" not in sec.stems or sec.name not in part.sections:
            continue
        for b in range(sec.bars):
            bar = sec.start_bar + b
            chord = plan.bar_chords[bar]
            voicing = voice_chord(chord.tones, part.low)
            if part.role == "chords":
                if part.params.get("left_hand"):
                    voicing = [part.low - 12 + (chord.tones[0] - part.low) % 12] + voicing
                for start, length in CHORD_RHYTHMS[part.rhythm]:
                    for i, pitch in enumerate(voicing):
                        # a piano chord is rolled by a few ms, not struck as one sample
                        roll = 0.006 * i if part.instrument in ("piano", "pluck") else 0.0
                        notes.append((grid.time(bar, start) + roll, length * grid.beat / 4,
                                      pitch, sec.energy * 0.8))
                continue
            tones = voicing + [p + 12 for p in voicing]
            order = {"up": tones, "down": tones[::-1], "updown": tones + tones[-2:0:-1],
                     "motif": [tones[i % len(tones)] for i in motif]}[part.rhythm]
            step = 2 if plan.grid.tempo > 110 else 1   # 8ths when fast, 16ths when slow
            ring = 1.5 if part.instrument == "pluck" else 0.9
            for j, s16 in enumerate(range(0, 16, step)):
                accent = 1.0 if s16 % 4 == 0 else 0.75
                notes.append((grid.time(bar, s16), step * grid.beat / 4 * ring,
                              order[j % len(order)], sec.energy * accent))
    return notes


def render_other(plan: TrackPlan, n: int, sr: int, rng) -> Stem:
    stem = Stem(n)
    for part in plan.other:
        synth, bus, cache = INSTRUMENTS[part.instrument], Bus(n), {}
        gain = 10 ** (part.gain_db / 20)
        for time, length, pitch, vel in part_notes(plan, part, rng):
            n_hold = int(length * sr)
            key = (pitch, n_hold)
            if key not in cache:
                cache[key] = synth(part.params, pitch, n_hold, sr, rng)
            start = int(round((time + rng.normal(0, 0.004)) * sr))
            bus.add(start, cache[key], gain * vel * rng.uniform(0.85, 1.0))
        if part.instrument == "pad":
            bus.audio = signal.sosfilt(butter("lowpass", part.params["cutoff"], sr), bus.audio)
        elif part.instrument == "organ":
            t = np.arange(n) / sr
            bus.audio *= 1.0 + 0.12 * np.sin(2 * np.pi * part.params["tremolo_hz"] * t)
        stem.add_bus(bus, part.pan)
    return stem


# ------------------------------------------------------------------------------------------------
# Vocals
# ------------------------------------------------------------------------------------------------

# Formants F1-F5 and bandwidths (Hz) of sung vowels: tenor for male, soprano for female voices.
VOWELS = {
    "male": {
        "a": ((650, 1080, 2650, 2900, 3250), (80, 90, 120, 130, 140)),
        "e": ((400, 1700, 2600, 3200, 3580), (70, 80, 100, 120, 120)),
        "i": ((290, 1870, 2800, 3250, 3540), (40, 90, 100, 120, 120)),
        "o": ((400, 800, 2600, 2800, 3000), (40, 80, 100, 120, 120)),
        "u": ((350, 600, 2700, 2900, 3300), (40, 60, 100, 120, 120)),
    },
    "female": {
        "a": ((800, 1150, 2900, 3900, 4950), (80, 90, 120, 130, 140)),
        "e": ((350, 2000, 2800, 3600, 4950), (60, 100, 120, 150, 200)),
        "i": ((270, 2140, 2950, 3900, 4950), (60, 90, 100, 120, 120)),
        "o": ((450, 800, 2830, 3800, 4950), (70, 80, 100, 130, 135)),
        "u": ((325, 700, 2700, 3800, 4950), (50, 60, 170, 180, 200)),
    },
}
VOWEL_ORDER = ("a", "e", "i", "o", "u")
VOWEL_WEIGHTS = (0.3, 0.2, 0.2, 0.2, 0.1)
# Consonants as noise bursts before the vowel: band (Hz), length (s), level relative to the vowel.
# Nasals and liquids have no noise; they only dip the level between syllables.
CONSONANTS = {
    "s": ((4500.0, 9500.0), 0.10, 0.25),
    "sh": ((2000.0, 5000.0), 0.10, 0.25),
    "f": ((1500.0, 7000.0), 0.07, 0.10),
    "t": ((3000.0, 8000.0), 0.02, 0.35),
    "k": ((1500.0, 3500.0), 0.025, 0.35),
    "h": ((600.0, 3000.0), 0.06, 0.10),
    "m": (None, 0.05, 0.0),
    "l": (None, 0.04, 0.0),
}
FORMANT_STEP = 0.005   # s between coefficient updates while the formants glide
VOWEL_GLIDE = 0.06     # s for the formants to move from one vowel to the next


@dataclass
class SungNote:
    start: float        # s
    length: float       # s
    pitch: int
    vowel: str
    consonant: str | None
    velocity: float


def compose_melody(plan: TrackPlan, rng) -> list[list[SungNote]]:
    """Phrases of one or two bars with a rest (a breath) after each. Notes walk the scale in
    small steps, land on chord tones on strong beats, and keep to the singer's range; choruses sit
    a few semitones higher."""
    singer, grid = plan.singer, plan.grid
    pitches = scale_pitches(plan.tonic, plan.mode, singer.low, singer.high)
    phrases = []
    for sec in plan.sections_with("vocals"):
        center = singer.low + 0.45 * (singer.high - singer.low) + (3 if sec.name == "chorus" else 0)
        bar = sec.start_bar
        end_bar = sec.start_bar + sec.bars
        while bar < end_bar:
            span = min(2, end_bar - bar)
            beat = float(rng.choice([0.0, 0.0, 0.5, 1.0]))
            stop = span * 4 - float(rng.choice([1.0, 1.5, 2.0]))
            notes, pitch = [], None
            while stop - beat >= 0.5:
                length = min(float(rng.choice([0.5, 0.5, 1.0, 1.0, 1.0, 1.5, 2.0])), stop - beat)
                chord = plan.bar_chords[bar + int(beat // 4)]
                if pitch is None:
                    pitch = float(center)
                else:
                    step = int(rng.choice([-2, -1, -1, 0, 1, 1, 2, 3, -3]))
                    step -= int(np.sign(pitch - center)) * (abs(pitch - center) > 4)
                    i = int(np.clip(np.searchsorted(pitches, pitch) + step, 0, len(pitches) - 1))
                    pitch = float(pitches[i])
                if beat % 2 == 0 or not notes:
                    tones = pitches[np.isin(pitches % 12, chord.tones)]
                    pitch = float(tones[np.argmin(np.abs(tones - pitch))])
                melisma = bool(notes) and rng.random() < 0.15
                vowel = (notes[-1].vowel if melisma
                         else str(rng.choice(VOWEL_ORDER, p=VOWEL_WEIGHTS)))
                consonant = None
                if not melisma and rng.random() < (0.85 if not notes else 0.6):
                    consonant = str(rng.choice(list(CONSONANTS)))
                notes.append(SungNote(grid.time(bar, 4 * beat) + rng.normal(0, 0.012), length *
                                      grid.beat, int(pitch), vowel, consonant,
                                      sec.energy * (1.0 if beat % 2 == 0 else 0.85)))
                beat += length
            if notes:
                notes[-1].length *= 0.9
                phrases.append(notes)
            bar += span
    return phrases


def glottal_source(f0: np.ndarray, singer: Singer, sr: int, rng) -> np.ndarray:
    """Band-limited sawtooth (the -6 dB/octave of glottal flow derivative) with an extra tilt and a
    little aspiration noise: the buzz the vocal tract then shapes."""
    voiced = saw(f0, sr, rng.uniform())
    voiced = one_pole(voiced, 1.0 / (2 * np.pi * singer.tilt_hz), sr) * 3.0
    breath = filtered_noise(rng, len(f0), "highpass", 1500.0, sr)
    return voiced + singer.breathiness * breath


def formant_tracks(phrase: list[SungNote], onsets: list[int], n: int, singer: Singer,
                   block: int) -> np.ndarray:
    """Formant frequencies and bandwidths per block, [blocks, 2, 5]: constant during a vowel, and a
    linear glide over VOWEL_GLIDE when the vowel changes (the tongue moves, it does not jump)."""
    n_blocks = -(-n // block)
    table = VOWELS[singer.voice]
    tracks = np.zeros((n_blocks, 2, 5))
    glide = max(1, round(VOWEL_GLIDE / FORMANT_STEP))
    prev = None
    for note, on in zip(phrase, onsets):
        target = np.array(table[note.vowel], dtype=float)
        target[0] *= singer.formant_scale
        b0 = on // block
        tracks[b0:] = target
        if prev is not None and not np.array_equal(prev, target):
            ramp = tracks[b0:b0 + glide]
            w = (np.arange(1, len(ramp) + 1) / glide)[:, None, None]
            ramp[:] = prev + (target - prev) * w
        prev = target
    return tracks


def formant_filter(x: np.ndarray, tracks: np.ndarray, block: int, sr: int) -> np.ndarray:
    """Cascade of two-pole resonators with unity gain at DC (Klatt's cascade synthesiser), the
    coefficients following `tracks` block by block with the filter state carried across, so the
    formants glide without clicks. Runs of blocks with equal coefficients go through sosfilt in
    one call, which keeps the Python loop to the glides."""
    freqs = np.minimum(tracks[:, 0], 0.45 * sr)
    r = np.exp(-np.pi * tracks[:, 1] / sr)
    a1 = -2.0 * r * np.cos(2 * np.pi * freqs / sr)
    a2 = r * r
    sos = np.zeros(freqs.shape + (6,))
    sos[..., 0] = 1.0 + a1 + a2
    sos[..., 3] = 1.0
    sos[..., 4] = a1
    sos[..., 5] = a2
    changes = np.flatnonzero(np.any(np.diff(tracks, axis=0) != 0, axis=(1, 2))) + 1
    starts = np.concatenate([[0], changes])
    ends = np.concatenate([changes, [len(tracks)]])
    y = np.empty_like(x)
    zi = np.zeros((freqs.shape[1], 2))
    for s0, s1 in zip(starts, ends):
        seg = slice(s0 * block, s1 * block)
        y[seg], zi = signal.sosfilt(sos[s0], x[seg], zi=zi)
    return y


def sing_phrase(phrase: list[SungNote], singer: Singer, sr: int, rng) -> tuple[int, np.ndarray]:
    """One phrase: pitch contour with glides and vibrato, amplitude per syllable, moving vowel
    formants, then consonant noise before the syllables that have one. Returns (start, audio)."""
    lead = 0.15                                    # room for the first consonant and the scoop
    t0 = phrase[0].start - lead
    end = phrase[-1].start + phrase[-1].length + 0.15
    n = int((end - t0) * sr)
    onsets = [int((note.start - t0) * sr) for note in phrase]
    offsets = onsets[1:] + [int((phrase[-1].start + phrase[-1].length - t0) * sr)]

    # pitch: steps smoothed into glides; the first note scoops up from a tone below
    semis = np.full(n, phrase[0].pitch - 2.0)
    vib_depth = np.zeros(n)
    amp = np.zeros(n)
    for note, on, off in zip(phrase, onsets, offsets):
        semis[on:] = note.pitch
        note_len = off - on
        ramp = np.clip((np.arange(note_len) / sr - 0.15) / 0.3, 0.0, 1.0)   # vibrato sets in late
        vib_depth[on:off] = singer.vibrato_semitones * rng.uniform(0.6, 1.0) * ramp
        amp[on:off] = note.velocity * (1.0 + 0.02 * (note.pitch - singer.low))   # high = louder
        if note.consonant is not None and on > 0:
            amp[max(0, on - int(CONSONANTS[note.consonant][1] * sr)):on] *= 0.15
    semis = one_pole(semis, singer.glide_s, sr)
    rate = singer.vibrato_hz * (1.0 + 0.05 * slow_noise(rng, n, 0.3, sr))
    vibrato = one_pole(vib_depth, 0.1, sr) * np.sin(2 * np.pi * np.cumsum(rate) / sr)
    drift = 0.07 * slow_noise(rng, n, 0.15, sr)                     # a few cents of wander
    f0 = midi_hz(semis + vibrato + drift)
    amp = one_pole(amp, 0.02, sr)

    # vowels: the buzz through formants that glide from vowel to vowel
    block = max(1, int(FORMANT_STEP * sr))
    tracks = formant_tracks(phrase, onsets, n, singer, block)
    voiced = formant_filter(glottal_source(f0, singer, sr, rng) * amp, tracks, block, sr)
    level = np.sqrt(np.mean(voiced ** 2)) + 1e-12

    # consonants and the breath before the phrase
    out = voiced
    for note, on in zip(phrase, onsets):
        if note.consonant is None or CONSONANTS[note.consonant][0] is None:
            continue
        band, length, rel = CONSONANTS[note.consonant]
        m = int(length * sr)
        start = max(0, on - int(0.8 * m))
        m = min(m, n - start)
        burst = filtered_noise(rng, m, "bandpass", band, sr) * np.hanning(m)
        out[start:start + m] += rel * level * note.velocity * 2.0 * burst
    return int(round(t0 * sr)), out


def breath(rng, sr: int, level: float) -> np.ndarray:
    m = int(rng.uniform(0.2, 0.35) * sr)
    return 0.06 * level * filtered_noise(rng, m, "bandpass", (500.0, 2500.0), sr) * np.hanning(m)


def render_vocals(plan: TrackPlan, n: int, sr: int, rng) -> Stem:
    stem = Stem(n)
    for phrase in compose_melody(plan, rng):
        start, audio = sing_phrase(phrase, plan.singer, sr, rng)
        if rng.random() < 0.6 and start > int(0.45 * sr):
            b = breath(rng, sr, np.sqrt(np.mean(audio ** 2)))
            stem.add(start - len(b), b, plan.singer.pan)
        stem.add(start, audio, plan.singer.pan)
    return stem


# ------------------------------------------------------------------------------------------------
# Mix
# ------------------------------------------------------------------------------------------------

def room_response(rt60: float, sr: int, rng) -> np.ndarray:
    """Stereo impulse response of a synthetic room: a pre-delay, a few early reflections, then
    independent noise per ear decaying by 60 dB in rt60 seconds below ~3 kHz and twice as fast
    above (air and walls absorb the highs first)."""
    n = int(rt60 * sr)
    t = np.arange(n) / sr
    low = signal.sosfilt(butter("lowpass", 3000.0, sr), rng.standard_normal((2, n)), axis=-1)
    high = signal.sosfilt(butter("highpass", 3000.0, sr), rng.standard_normal((2, n)), axis=-1)
    ir = low * np.exp(-6.91 * t / rt60) + high * np.exp(-2 * 6.91 * t / rt60)
    predelay = int(rng.uniform(0.008, 0.025) * sr)
    ir = np.concatenate([np.zeros((2, predelay)), ir], axis=1)
    for _ in range(4):
        ch, at = int(rng.integers(2)), int(rng.uniform(0.005, 0.04) * sr) + predelay
        ir[ch, at] += rng.uniform(0.2, 0.5) * np.abs(ir).max()
    return ir / np.sqrt(np.sum(ir ** 2, axis=1, keepdims=True))


def dilate(mask: np.ndarray, width: int) -> np.ndarray:
    """True wherever `mask` was True within the last `width` samples (a sound plus its tail)."""
    c = np.cumsum(mask, dtype=np.int64)
    lagged = np.zeros_like(c)
    lagged[width:] = c[:-width] if width < len(c) else lagged[width:]
    return c - lagged > 0


def reverb(dry: np.ndarray, ir: np.ndarray) -> np.ndarray:
    """[stems, 2, n] -> the room's response [stems, 2, n]. Each stem feeds the room in mono (a send,
    as on a mixing desk) and comes back in stereo. FFT convolution in float32: a reverb tail needs
    no more precision, and this is the largest single step of a track."""
    send = dry.mean(axis=1, keepdims=True).astype(np.float32)
    return signal.fftconvolve(send, ir[None].astype(np.float32), axes=-1)[..., :dry.shape[-1]]


REFERENCE_RMS = 0.1


def mix_track(plan: TrackPlan, stems: dict[str, Stem], sr: int, rng) -> dict[str, np.ndarray]:
    """Level, reverb, exact silence, headroom. Returns float32 [2, n] per stem and the mixture.
    (Full-length arrays are updated in place: at 44.1 kHz each pass over the four stems moves
    50 MB, and these passes are a good part of a track's time.)"""
    n = next(iter(stems.values())).audio.shape[1]
    ir = room_response(plan.rt60, sr, rng)
    dry = np.stack([stems[s].audio for s in STEMS])
    for i, s in enumerate(STEMS):
        # equal loudness while playing first, so gains_db means the same in every track
        power = float(np.vdot(dry[i], dry[i])) / max(1, 2 * np.count_nonzero(stems[s].active))
        if power > 0:
            dry[i] *= REFERENCE_RMS / math.sqrt(power) * 10 ** (plan.gains_db[s] / 20)
    # the bass stays dry, as it usually is in a mix (a reverberant low end gets muddy)
    wet_stems = [i for i, s in enumerate(STEMS) if plan.sends[s] > 0]
    wet = dict(zip(wet_stems, reverb(dry[wet_stems], ir)))
    tail = ir.shape[1] + int(0.05 * sr)
    for i, s in enumerate(STEMS):
        if i in wet:
            dry[i] += plan.sends[s] * wet[i]
        # exact zeros once a stem has been quiet for longer than the room rings
        np.multiply(dry[i], dilate(stems[s].active, tail), out=dry[i])
    k_in, k_out = min(n, int(0.005 * sr)), min(n, int(0.02 * sr))   # no click at either end
    dry[..., :k_in] *= np.linspace(0.0, 1.0, k_in)
    dry[..., n - k_out:] *= np.linspace(1.0, 0.0, k_out)
    mix = dry.sum(axis=0)
    peak = max(mix.max(), -mix.min())
    dry *= 10 ** (plan.peak_db / 20) / peak if peak > 0 else 1.0
    out = {s: dry[i].astype(np.float32) for i, s in enumerate(STEMS)}
    out["mixture"] = ((out["drums"] + out["bass"]) + out["other"]) + out["vocals"]
    return out


# ------------------------------------------------------------------------------------------------
# One track, end to end
# ------------------------------------------------------------------------------------------------

def track_rngs(seed: int, split: str, index: int) -> dict[str, np.random.Generator]:
    """Independent generators per purpose, so changing how one stem is drawn leaves the others'
    random streams (and audio) unchanged."""
    children = np.random.SeedSequence([seed, SPLITS.index(split), index]).spawn(6)
    return dict(zip(("plan", "drums", "bass", "other", "vocals", "mix"),
                    (np.random.default_rng(c) for c in children)))


def render_track(seed: int, split: str, index: int, duration: float, sr: int):
    """Returns (plan, {mixture, drums, bass, other, vocals: float32 [2, n]})."""
    rngs = track_rngs(seed, split, index)
    plan = plan_track(rngs["plan"], split, index, duration)
    n = int(round(duration * sr))
    stems = {"drums": render_drums(plan, n, sr, rngs["drums"]),
             "bass": render_bass(plan, n, sr, rngs["bass"]),
             "other": render_other(plan, n, sr, rngs["other"]),
             "vocals": render_vocals(plan, n, sr, rngs["vocals"])}
    return plan, mix_track(plan, stems, sr, rngs["mix"])


def _db(x: float) -> float:
    return round(20 * math.log10(x), 2) if x > 0 else None


def track_metadata(plan: TrackPlan, split: str, index: int, audio: dict, duration: float) -> dict:
    grid = plan.grid

    def levels(s):
        x = audio[s]
        active = np.count_nonzero(np.any(x != 0, axis=0))
        rms = math.sqrt(float(np.vdot(x, x)) / (2 * active)) if active else 0.0
        return {"rms_dbfs": _db(rms), "gain_db": round(float(plan.gains_db[s]), 2),
                "reverb_send": round(float(plan.sends[s]), 3)}

    return {
        "name": plan.name, "split": split, "index": index,
        "tempo": grid.tempo, "swing": grid.swing, "key": NOTE_NAMES[plan.tonic], "mode": plan.mode,
        "progression": [c.name for c in plan.progression],
        "roman": [c.roman for c in plan.progression],
        "sections": [{"name": s.name, "start": round(min(duration, grid.time(s.start_bar)), 3),
                      "end": round(min(duration, grid.time(s.start_bar + s.bars)), 3),
                      "bars": s.bars, "stems": list(s.stems)} for s in plan.sections],
        "drums": {"groove": plan.kit.groove, "kick_hz": round(plan.kit.kick_f0, 1)},
        "bass": {"timbre": plan.bass.timbre, "pattern": plan.bass.pattern},
        "other": [{"instrument": p.instrument, "role": p.role, "rhythm": p.rhythm,
                   "pan": round(p.pan, 2), "sections": list(p.sections)} for p in plan.other],
        "vocals": {"voice": plan.singer.voice, "range": [plan.singer.low, plan.singer.high],
                   "pan": round(plan.singer.pan, 2)},
        "reverb_rt60": round(plan.rt60, 3),
        "levels": {s: levels(s) for s in STEMS},
        "mixture_peak_dbfs": _db(float(np.max(np.abs(audio["mixture"])))),
    }


SFC_SET_ADD_PEAK_CHUNK = 0x1050   # libsndfile command


def write_wav(path: Path, x: np.ndarray, sr: int):
    """32-bit float WAV, atomically. libsndfile's PEAK chunk is turned off: it holds a timestamp,
    which would make two identical generations differ byte for byte."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with sf.SoundFile(tmp, "w", sr, x.shape[0], subtype="FLOAT", format="WAV") as f:
        try:   # soundfile has no public call for this; test_synth checks the bytes are stable
            sf._snd.sf_command(f._file, SFC_SET_ADD_PEAK_CHUNK, sf._ffi.NULL, 0)
        except AttributeError:
            pass
        f.write(x.T)
    os.replace(tmp, path)


def _make_track(job) -> dict:
    out, seed, split, index, duration, sr = job
    plan, audio = render_track(seed, split, index, duration, sr)
    folder = Path(out) / split / plan.name
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("mixture",) + STEMS:
        write_wav(folder / f"{name}.wav", audio[name], sr)
    return track_metadata(plan, split, index, audio, duration)


# ------------------------------------------------------------------------------------------------
# The dataset
# ------------------------------------------------------------------------------------------------

def _params(seed, n_train, n_valid, n_test, duration, sample_rate) -> dict:
    return {"generator": {"name": GENERATOR, "version": VERSION}, "seed": int(seed),
            "sizes": {"train": int(n_train), "valid": int(n_valid), "test": int(n_test)},
            "duration": float(duration), "sample_rate": int(sample_rate)}


def _existing(out: Path, params: dict) -> str | None:
    """None if `out` holds nothing of ours, "" if it holds exactly this dataset, complete;
    otherwise what is there instead, for the error message."""
    if not any((out / p).exists() for p in ("dataset.json",) + SPLITS):
        return None
    try:
        meta = json.loads((out / "dataset.json").read_text())
    except (OSError, ValueError):
        return "split folders without a readable dataset.json (another dataset, or an " \
               "interrupted generation)"
    theirs = {k: meta.get(k) for k in params}
    if theirs != params:
        def describe(p):
            sizes, gen = p.get("sizes") or {}, p.get("generator") or {}
            return (f"seed {p.get('seed')}, {sizes.get('train')}/{sizes.get('valid')}/"
                    f"{sizes.get('test')} tracks of {p.get('duration')} s at "
                    f"{p.get('sample_rate')} Hz, {gen.get('name')} v{gen.get('version')}")
        return f"a different dataset ({describe(theirs)}; asked for {describe(params)})"
    for t in meta.get("tracks", []):
        for name in ("mixture",) + STEMS:
            if not (out / t["split"] / t["name"] / f"{name}.wav").is_file():
                return f"this dataset with files missing ({t['name']}/{name}.wav)"
    return ""


def _worker_count(n_tracks: int, duration: float) -> int:
    """Processes only pay off beyond a few seconds of audio (starting one costs ~1 s)."""
    if n_tracks * duration < 30:
        return 1
    return max(1, min(WORKERS, os.cpu_count() or 1, n_tracks))


@contextmanager
def _pool(workers: int):
    """A process pool, or None for one worker. Fork where the platform has it: it starts at once
    and, unlike spawn, does not re-import the caller's __main__ (which fails for `python -`). The
    pool is created before the progress bar starts its monitor thread."""
    if workers <= 1:
        yield None
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    with context.Pool(workers) as pool:
        yield pool


def generate_dataset(out: Path, seed: int = 0, n_train: int = 28, n_valid: int = 6,
                     n_test: int = 6, duration: float = 20.0, sample_rate: int = 44100,
                     overwrite: bool = False, progress: bool = True) -> Path:
    """Write a synthetic MUSDB18-HQ-layout dataset to `out` and return `out`.

    out/{train,valid,test}/<track>/{mixture,drums,bass,other,vocals}.wav: stereo 32-bit float,
    mixture == ((drums + bass) + other) + vocals exactly in float32; out/dataset.json describes
    the parameters and every track (tempo, key, chords, sections, levels), and is written last.

    The same arguments always give bit-identical files. If `out` already holds the complete dataset
    for these arguments this returns at once; if it holds anything else of ours (another dataset,
    or files from an interrupted run), it raises PipelineError unless `overwrite` is set, in which
    case dataset.json and the split folders are deleted and everything is regenerated.
    """
    out = Path(out)
    if min(n_train, n_valid, n_test) < 0 or duration <= 0 or sample_rate < 8000:
        raise PipelineError(f"{out}: invalid synthetic dataset parameters (sizes must be >= 0, "
                            f"duration > 0, sample rate >= 8000)")
    if out.exists() and not out.is_dir():
        raise PipelineError(f"{out}: exists and is not a directory")
    params = _params(seed, n_train, n_valid, n_test, duration, sample_rate)
    found = _existing(out, params)
    if found == "" and not overwrite:
        return out
    if found is not None:
        if not overwrite:
            raise PipelineError(f"{out}: holds {found}; choose another folder or overwrite it "
                                f"(make-dataset --force)")
        (out / "dataset.json").unlink(missing_ok=True)   # first, so no stale 'complete' marker
        for s in SPLITS:
            if (out / s).exists():
                shutil.rmtree(out / s)
    for s in SPLITS:
        (out / s).mkdir(parents=True, exist_ok=True)

    jobs = [(str(out), int(seed), split, i, float(duration), int(sample_rate))
            for split, count in zip(SPLITS, (n_train, n_valid, n_test)) for i in range(count)]
    workers = _worker_count(len(jobs), duration)
    with _pool(workers) as pool, progress_bar(total=len(jobs), desc="synthetic dataset", unit="track",
                                      disable=not progress) as bar:
        tracks = []
        for meta in (pool.imap(_make_track, jobs) if pool else map(_make_track, jobs)):
            tracks.append(meta)
            bar.update()

    meta = {**params, "layout": "musdb18hq", "stems": list(STEMS),
            "format": "wav float32 stereo; mixture = ((drums + bass) + other) + vocals in float32",
            "tracks": tracks}
    tmp = out / f".dataset.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=1) + "\n")
    os.replace(tmp, out / "dataset.json")
    return out
