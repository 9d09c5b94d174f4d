"""The synthetic dataset: layout, exact mixtures, determinism, resume/conflict rules, and that the
audio is shaped like music (bass low, hats high, vocals in the voice band, stems that drop out)."""
import json
import re
import shutil

import numpy as np
import pytest
import soundfile as sf

from core import synth
from core.errors import PipelineError
from core.synth import STEMS, generate_dataset

SMALL = dict(seed=3, n_train=2, n_valid=2, n_test=2, duration=3.0, sample_rate=22050,
             progress=False)
FILES = ("mixture",) + STEMS


def track_dirs(root):
    return [p for split in ("train", "valid", "test") for p in sorted((root / split).iterdir())]


def read(track, name):
    x, sr = sf.read(track / f"{name}.wav", dtype="float32", always_2d=True)
    return x.T, sr


def all_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    return generate_dataset(tmp_path_factory.mktemp("synth") / "ds", **SMALL)


def test_layout_and_metadata(small):
    meta = json.loads((small / "dataset.json").read_text())
    assert meta["generator"] == {"name": "pipeline.synth", "version": synth.VERSION}   # kept across moves
    assert meta["seed"] == 3 and meta["sizes"] == {"train": 2, "valid": 2, "test": 2}
    assert meta["duration"] == 3.0 and meta["sample_rate"] == 22050
    assert len(meta["tracks"]) == 6
    for split in ("train", "valid", "test"):
        names = sorted(p.name for p in (small / split).iterdir())
        assert names == sorted(t["name"] for t in meta["tracks"] if t["split"] == split)
        for name in names:
            assert re.fullmatch(r"synth-[a-z]+-\d{3} \([A-G]b? (major|minor), \d+ bpm\)", name)
            assert sorted(p.name for p in (small / split / name).iterdir()) \
                == sorted(f"{f}.wav" for f in FILES)
    t = meta["tracks"][0]
    assert 80 <= t["tempo"] <= 150 and t["mode"] in ("major", "minor")
    assert len(t["progression"]) == 4 and t["sections"] and set(t["levels"]) == set(STEMS)
    assert t["sections"][0]["start"] == 0.0 and t["sections"][-1]["end"] == 3.0
    assert not list(small.rglob("*.tmp"))


def test_audio_is_float32_stereo_and_mixture_is_the_exact_sum(small):
    for track in track_dirs(small):
        info = sf.info(track / "mixture.wav")
        assert (info.format, info.subtype, info.channels, info.samplerate, info.frames) \
            == ("WAV", "FLOAT", 2, 22050, 3 * 22050)
        x = {name: read(track, name)[0] for name in FILES}
        assert all(a.dtype == np.float32 and a.shape == (2, 3 * 22050) for a in x.values())
        total = ((x["drums"] + x["bass"]) + x["other"]) + x["vocals"]
        assert np.array_equal(x["mixture"], total)          # bit-exact, not allclose
        assert 0 < np.abs(x["mixture"]).max() < 1.0
        for stem in STEMS:                                  # a short track is one full section
            assert np.sqrt(np.mean(x[stem] ** 2)) > 1e-3, (track.name, stem)
        assert not np.array_equal(x["other"][0], x["other"][1])   # panned, really stereo


def test_same_seed_same_bytes_other_seed_differs(small, tmp_path):
    again = generate_dataset(tmp_path / "again", **SMALL)
    assert all_bytes(again) == all_bytes(small)
    other = generate_dataset(tmp_path / "other", **{**SMALL, "seed": 4, "n_valid": 0, "n_test": 0})
    a, b = track_dirs(small)[0], track_dirs(other)[0]   # train-000 of both
    assert a.name.startswith("synth-train-000") and b.name.startswith("synth-train-000")
    assert (a / "mixture.wav").read_bytes() != (b / "mixture.wav").read_bytes()


def test_tracks_do_not_depend_on_other_splits_or_workers(small, tmp_path, monkeypatch):
    # a train track is the same whatever the sizes of the other splits ...
    alone = generate_dataset(tmp_path / "alone", **{**SMALL, "n_train": 1, "n_valid": 0,
                                                      "n_test": 0})
    [track] = track_dirs(alone)
    assert all_bytes(track) == all_bytes(small / "train" / track.name)
    # ... and whether tracks are made in one process or two
    monkeypatch.setattr(synth, "_worker_count", lambda n_tracks, duration: 2)
    tiny = {**SMALL, "n_valid": 1, "n_test": 1, "duration": 1.0}
    pooled = generate_dataset(tmp_path / "pooled", **tiny)
    monkeypatch.undo()
    serial = generate_dataset(tmp_path / "serial", **tiny)
    assert all_bytes(pooled) == all_bytes(serial)


def test_second_call_skips(small):
    before = {p: p.stat().st_mtime_ns for p in small.rglob("*")}
    assert generate_dataset(small, **SMALL) == small
    assert {p: p.stat().st_mtime_ns for p in small.rglob("*")} == before


def test_other_or_partial_dataset_raises_unless_overwrite(small, tmp_path):
    ds = tmp_path / "ds"
    shutil.copytree(small, ds)
    with pytest.raises(PipelineError) as err:
        generate_dataset(ds, **{**SMALL, "seed": 4})
    message = str(err.value)
    assert message.startswith(f"{ds}: ") and "\n" not in message and "seed 3" in message

    (ds / "dataset.json").unlink()                       # an interrupted run
    with pytest.raises(PipelineError, match=re.escape(str(ds))):
        generate_dataset(ds, **SMALL)

    small_args = {**SMALL, "seed": 4, "n_train": 1, "n_valid": 0, "n_test": 0, "duration": 1.0}
    generate_dataset(ds, **small_args, overwrite=True)
    meta = json.loads((ds / "dataset.json").read_text())
    assert meta["seed"] == 4 and len(track_dirs(ds)) == 1

    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("x")
    with pytest.raises(PipelineError, match=re.escape(str(not_a_dir))):
        generate_dataset(not_a_dir, **SMALL)


def test_longer_track_has_sections_where_stems_drop_out(tmp_path):
    """Seed 1's 12-s track: an intro, a verse without `other`, a chorus, a break of drums alone.
    A stem a section leaves out is digital silence there (as museval needs) once its last notes
    and the room's reverb (rt60) have died away, until the next section's first notes (which a
    humanised timing may start a little early)."""
    root = generate_dataset(tmp_path / "long", seed=1, n_train=1, n_valid=0, n_test=0,
                            duration=12.0, sample_rate=22050, progress=False)
    [meta] = json.loads((root / "dataset.json").read_text())["tracks"]
    sections = meta["sections"]
    assert sections[0]["name"] == "intro" and "vocals" not in sections[0]["stems"]
    dropped = [(s, stem) for s in sections[1:] for stem in STEMS if stem not in s["stems"]]
    assert {(s["name"], stem) for s, stem in dropped} >= {("verse", "other"), ("break", "vocals")}
    [track] = track_dirs(root)
    audio = {stem: read(track, stem)[0] for stem in STEMS}
    sr = 22050
    ends = [s["start"] for s in sections[1:]] + [12.0]
    for (s, stem), end in ((d, ends[sections.index(d[0])]) for d in dropped):
        quiet = audio[stem][:, int((s["start"] + meta["reverb_rt60"] + 0.6) * sr):int((end - 0.1) * sr)]
        assert quiet.shape[1] >= sr // 2 and np.all(quiet == 0), (s["name"], stem)
    assert np.all(audio["vocals"][:, : int(0.5 * sr)] == 0)   # nobody sings the intro
    for stem in STEMS:
        assert np.any(audio[stem] != 0), stem


def band_fraction(x, sr, lo, hi):
    power = np.abs(np.fft.rfft(x.astype(np.float64).mean(axis=0))) ** 2
    freqs = np.fft.rfftfreq(x.shape[-1], 1 / sr)
    return power[(freqs >= lo) & (freqs < hi)].sum() / power.sum()


def test_stems_sit_in_their_frequency_bands(small):
    for track in track_dirs(small):
        sr = 22050
        assert band_fraction(read(track, "bass")[0], sr, 0, 300) > 0.8, track.name
        assert band_fraction(read(track, "drums")[0], sr, 4000, sr) > 0.02, track.name
        assert band_fraction(read(track, "vocals")[0], sr, 100, 4000) > 0.9, track.name
    rng = np.random.default_rng(0)
    kit = synth.plan_kit(rng)
    assert band_fraction(synth.hihat(kit, rng, 44100)[None], 44100, 5000, 22050) > 0.9
    assert band_fraction(synth.kick(kit, rng, 44100)[None], 44100, 0, 200) > 0.8


def test_instruments_are_in_tune():
    sr, rng = 44100, np.random.default_rng(0)

    def cents_off(x, pitch):
        spectrum = np.abs(np.fft.rfft(x * np.hanning(len(x)), 8 * len(x)))
        freqs = np.fft.rfftfreq(8 * len(x), 1 / sr)
        f0 = synth.midi_hz(pitch)
        near = (freqs > 0.9 * f0) & (freqs < 1.1 * f0)
        return abs(1200 * np.log2(freqs[near][np.argmax(spectrum[near])] / f0))

    params = {"pluck": {"t60": 1.5, "brightness": 4000.0},
              "piano": synth.instrument_params(rng, "piano")}
    for pitch in (48, 60, 72):
        assert cents_off(synth.pluck_note(params["pluck"], pitch, sr, sr, rng)[:sr], pitch) < 5
        assert cents_off(synth.piano_note(params["piano"], pitch, sr, sr, rng)[:sr], pitch) < 5
