"""`pipeline separate`: new files through a blend and a conv1x1 run, base models via the stem cache.

Setup (once per module, all through the CLI): a 4-track stem-folder dataset at 22.05 kHz, two
tiny random Open-Unmix models saved in openunmix's real folder format (at 44.1 kHz, so the cache
resamples), both cached, a blend run and a one-epoch tiny conv1x1 run.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import assert_separate_is_apply, write_four_tracks
from test_adapters import MUSDB, save_umx_folder

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

RATE = 22050   # the dataset's (and so the runs') rate


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # 2 shared cores: a second thread only adds contention here
    yield
    torch.set_num_threads(threads)


def cli(*args) -> int:
    from pipeline.cli import main

    try:
        main([str(a) for a in args])
        return 0
    except SystemExit as e:
        return e.code or 0


def noise(channels, n, seed):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((channels, n))).astype(np.float32)


def write_wav(path, x, rate):
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(path, x.T, rate, subtype="FLOAT")
    return path


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("separate")
    ds = write_four_tracks(root / "ds", n=RATE, rate=RATE)
    models = [save_umx_folder(root / "models" / name, MUSDB, seed=seed)
              for name, seed in (("umxa", 0), ("umxb", 1))]
    work = root / "work"
    assert cli("cache", "--dataset", ds, "-m", models[0], "-m", models[1], "--device", "cpu",
               "--niter", 0, "--offline", "--work", work) == 0
    assert cli("blend", "-m", "umxa", "-m", "umxb", "--dataset", ds, "--step", 0.25, "--work", work) == 0
    assert cli("train-mixer", "-m", "umxa", "-m", "umxb", "--arch", "conv1x1", "--preset", "tiny",
               "--epochs", 1, "--shift", 1024, "--dataset", ds, "--device", "cpu", "--work", work) == 0
    inputs = root / "inputs"
    return {"root": root, "ds": ds, "work": work, "models": models,
            "mono": write_wav(inputs / "mono song.wav", noise(1, int(1.3 * RATE), 10), RATE),
            "stereo": write_wav(inputs / "stereo.wav", noise(2, int(0.9 * 44100), 11), 44100)}


def store_of(env):
    from core.store import StemStore

    return StemStore(env["work"] / "store")


def manifests(env):
    """Every model-stem manifest of the separated files, with its content."""
    base = env["work"] / "store" / "models"
    return {str(p.relative_to(base)): p.read_text() for p in base.glob("*/files-*/*/*/manifest.json")}


class Counter:
    """Counts base-model loads and separations inside the CLI."""

    def __init__(self, monkeypatch):
        import separators.inference
        import separators.registry

        self.loads = self.separations = 0
        load, separate = separators.registry.load_separator, separators.inference.separate_array

        def counting_load(*a, **k):
            self.loads += 1
            return load(*a, **k)

        def counting_separate(*a, **k):
            self.separations += 1
            return separate(*a, **k)

        monkeypatch.setattr(separators.registry, "load_separator", counting_load)
        monkeypatch.setattr(separators.inference, "separate_array", counting_separate)


@pytest.mark.parametrize("run,fmt", [("blend", "wav"), ("conv1x1-tiny", "flac")])
def test_outputs_per_target_at_the_input_rate(env, run, fmt, tmp_path, capsys):
    run_arg = run if run == "blend" else env["work"] / "runs" / run   # a name, and a folder
    out = tmp_path / "out"
    assert cli("separate", env["mono"], env["stereo"], "--ensemble", run_arg, "--out", out,
               "--format", fmt, "--device", "cpu", "--work", env["work"]) == 0
    err = capsys.readouterr().err
    assert "[1/2]" in err and "[2/2]" in err and "separated 2 file(s)" in err
    for src in (env["mono"], env["stereo"]):
        info_in = sf.info(src)
        files = sorted((out / src.stem).iterdir())
        assert [p.name for p in files] == sorted(f"{t}.{fmt}" for t in MUSDB)
        for p in files:
            info = sf.info(p)
            assert (info.samplerate, info.frames, info.channels) == (info_in.samplerate, info_in.frames, 2)
            assert info.subtype == ("FLOAT" if fmt == "wav" else "PCM_24")
            y, _ = sf.read(p, dtype="float32")
            assert np.isfinite(y).all() and np.abs(y).max() > 1e-4
        # the run's own apply on the stems the stage stored for this file, at its rate
        assert_separate_is_apply(env["work"], env["work"] / "runs" / run, src, out, fmt)


def test_blend_equals_weighted_sum_of_the_models_separations(env, tmp_path):
    """Known answer: with weights 0.25 / 0.75 the output is that sum of the two models' stems."""
    from core.audio import resample
    from separators.inference import separate_array
    from separators.registry import load_separator

    run = tmp_path / "blend-quarter"
    shutil.copytree(env["work"] / "runs" / "blend", run)
    config = json.loads((run / "config.json").read_text())
    ka, kb = config["inputs"]["model_keys"]
    config["weights"] = {t: {ka: 0.25, kb: 0.75} for t in MUSDB}
    (run / "config.json").write_text(json.dumps(config))
    out = tmp_path / "out"
    assert cli("separate", env["mono"], env["stereo"], "-e", run, "-o", out, "--device", "cpu",
               "--work", env["work"]) == 0

    seps = [load_separator(str(m), offline=True, options={"niter": 0}) for m in env["models"]]
    for src in (env["mono"], env["stereo"]):
        x, rate = sf.read(src, dtype="float32", always_2d=True)
        x = x.T if x.shape[1] == 2 else np.repeat(x.T, 2, axis=0)
        x_run = resample(x, rate, RATE)
        # the stem store keeps stems as float16: the blend mixes those
        a, b = (separate_array(s, x_run, RATE).astype(np.float16).astype(np.float32) for s in seps)
        expected = resample(0.25 * a + 0.75 * b, RATE, rate)
        expected = np.pad(expected, ((0, 0), (0, 0), (0, x.shape[1] - expected.shape[-1])))
        for j, t in enumerate(MUSDB):
            y, r = sf.read(out / src.stem / f"{t}.wav", dtype="float32", always_2d=True)
            assert r == rate
            np.testing.assert_allclose(y.T, expected[j], atol=2e-6, rtol=0)
        assert np.abs(a - b).max() > 0.01   # the two models really differ


def test_second_separation_reuses_the_stem_cache_and_force(env, tmp_path, monkeypatch, capsys):
    fresh = write_wav(tmp_path / "fresh.wav", noise(2, RATE // 2, 12), RATE)
    out = tmp_path / "out"
    count = Counter(monkeypatch)
    args = ["separate", fresh, "-e", "blend", "-o", out, "--device", "cpu", "--work", env["work"]]
    assert cli(*args) == 0
    assert (count.loads, count.separations) == (2, 2)   # a new file: both models run once
    before = manifests(env)
    outputs = {p: p.stat().st_mtime_ns for p in (out / "fresh").iterdir()}
    capsys.readouterr()

    # no --force: refused before anything is written, even when only some outputs exist
    (out / "fresh" / "vocals.wav").unlink()
    assert cli(*args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already exists" in err and "--force" in err
    assert str(out / "fresh" / "drums.wav") in err.replace("\n", "")
    assert not (out / "fresh" / "vocals.wav").exists()
    assert all(p.stat().st_mtime_ns == t for p, t in outputs.items() if p.exists())

    # --force: rewritten, and the base models are neither loaded nor run again
    assert cli(*args, "--force") == 0
    assert (count.loads, count.separations) == (2, 2)
    assert (out / "fresh" / "vocals.wav").exists()
    assert manifests(env) == before
    assert "ran on 0 of 2" in capsys.readouterr().err

    # another run over the same models: the same cached stems, again no model run
    assert cli("separate", fresh, "-e", "conv1x1-tiny", "-o", tmp_path / "out2", "--device", "cpu",
               "--work", env["work"]) == 0
    assert (count.loads, count.separations) == (2, 2)
    assert manifests(env) == before
    # the file's track (keyed by content) lists in the store's files dataset
    tracks = [t.name for t in store_of(env).tracks(f"files-{RATE}")]
    assert any(name.endswith("-fresh") for name in tracks)


def bad_inputs(folder):
    folder.mkdir()
    nan = noise(2, 1000, 0)
    nan[1, 500] = np.nan
    write_wav(folder / "nan.wav", nan, RATE)
    sf.write(folder / "empty.wav", np.zeros((0, 2), np.float32), RATE, subtype="FLOAT")
    (folder / "text.wav").write_text("not audio at all")
    return {"nan.wav": "NaN", "empty.wav": "empty", "text.wav": "not a readable audio file",
            "missing.wav": "not found"}


def test_bad_input_is_a_one_line_error_naming_the_file(env, tmp_path, capsys):
    cases = bad_inputs(tmp_path / "bad")
    out = tmp_path / "out"
    for name, problem in cases.items():
        path = tmp_path / "bad" / name
        # the good file first: nothing is written when any input is bad
        code = cli("separate", env["mono"], path, "-e", "blend", "-o", out, "--device", "cpu",
                   "--work", env["work"])
        err = capsys.readouterr().err.strip()
        assert code == 1, name
        assert len(err.splitlines()) == 1 and str(path) in err and problem in err, err
        assert not out.exists()


def test_imported_model_cannot_separate_new_audio(env, tmp_path, capsys):
    est = tmp_path / "est"
    for track in env["ds"].glob("*/*"):
        for t in MUSDB:
            dest = est / track.parent.name / track.name / f"{t}.wav"
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(track / f"{t}.wav", dest)
    assert cli("cache", "import", est, "--name", "outside", "--dataset", env["ds"], "--work", env["work"]) == 0
    assert cli("blend", "-m", "umxa", "-m", "outside", "--dataset", env["ds"], "--step", 0.5,
               "--name", "with-imported", "--work", env["work"]) == 0
    capsys.readouterr()
    out = tmp_path / "out"
    assert cli("separate", env["mono"], "-e", "with-imported", "-o", out, "--work", env["work"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "'outside'" in err and "imported" in err, err
    assert not out.exists()


def test_unknown_run_and_format(env, tmp_path, capsys):
    assert cli("separate", env["mono"], "-e", "nope", "-o", tmp_path / "o", "--work", env["work"]) == 1
    assert "nope: not a run folder" in capsys.readouterr().err
    assert cli("separate", env["mono"], "-e", "blend", "-o", tmp_path / "o", "--format", "mp3",
               "--work", env["work"]) == 1
    assert "--format mp3" in capsys.readouterr().err
