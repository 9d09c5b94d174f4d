import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
MUSDB18_7 = Path(os.environ.get("MUSDB18_7_ROOT", REPO.parent / "shared" / "data" / "musdb18-7"))

def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests run only where CUDA is (`make gpu-check` selects them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


def musdb18_7_present() -> bool:
    """Whether the MUSDB18-7 previews are there. Missing, a test that needs them is skipped on a
    laptop but fails in CI (`CI` set: .ci/run), which always has them: a moved or unmounted data
    folder must not turn the real-music checks into silent skips."""
    if (MUSDB18_7 / "train").is_dir():
        return True
    message = f"MUSDB18-7 previews not found at {MUSDB18_7} (set MUSDB18_7_ROOT)"
    if os.environ.get("CI"):
        pytest.fail(message)
    return False


@pytest.fixture
def musdb18_7():
    if not musdb18_7_present():
        pytest.skip(f"MUSDB18-7 previews not found at {MUSDB18_7} (set MUSDB18_7_ROOT)")
    return MUSDB18_7


needs_musdb18_7 = pytest.mark.usefixtures("musdb18_7")


def write_stem_track(root: Path, subset: str, name: str, sources=("drums", "bass", "other", "vocals"),
                     n=8000, rate=8000, seed=0, mixture=True, channels=2):
    """A small stem-folder track with noise stems; returns the stems array [S, C, n]."""
    rng = np.random.default_rng(seed)
    d = root / subset / name
    d.mkdir(parents=True, exist_ok=True)
    stems = (0.1 * rng.standard_normal((len(sources), channels, n))).astype(np.float32)
    for s, x in zip(sources, stems):
        sf.write(d / f"{s}.wav", x.T, rate, subtype="FLOAT")
    if mixture:
        sf.write(d / "mixture.wav", stems.sum(0).T, rate, subtype="FLOAT")
    return stems


def write_four_tracks(root: Path, n=8000, rate=8000) -> Path:
    """Two train tracks, one valid, one test (noise stems); returns root."""
    for i, subset in enumerate(["train", "train", "valid", "test"]):
        write_stem_track(root, subset, f"track{i}", n=n, rate=rate, seed=i)
    return root


@pytest.fixture
def stem_dataset(tmp_path):
    return write_four_tracks(tmp_path / "ds")


def assert_separate_is_apply(work: Path, run_dir: Path, song: Path, out_dir: Path, fmt="wav"):
    """What `pipeline separate` wrote for `song` (out_dir/<song>/<target>.<fmt>) is the run's
    mixer (mixer.methods.load_mixer) applied to the stems the separate stage stored for the song,
    resampled to the song's rate: float32 rounding for WAV, 24-bit steps for FLAC."""
    import json

    from core.audio import resample
    from core.store import StemStore
    from mixer.methods import load_mixer
    from pipeline.separate import files_dataset_id, probe_input, run_rate

    config = json.loads((run_dir / "config.json").read_text())
    store, keys = StemStore(work / "store"), config["inputs"]["model_keys"]
    rate = run_rate(config, store, run_dir)
    ds_id, item = files_dataset_id(rate), probe_input(song)
    [track] = [t for t in store.tracks(ds_id) if t.name == item.track_name()]
    est = load_mixer(run_dir)(store.mixture(ds_id, track), {k: store.stems(k, ds_id, track) for k in keys})
    est = resample(est, rate, item.rate)
    assert est.shape[-1] >= item.length
    for j, target in enumerate(config["sources"]):
        y, got_rate = sf.read(out_dir / song.stem / f"{target}.{fmt}", dtype="float32", always_2d=True)
        assert got_rate == item.rate and y.shape == (item.length, 2)
        np.testing.assert_allclose(y.T, est[j, :, :item.length], rtol=0,
                                   atol=1e-6 if fmt == "wav" else 2 ** -22, err_msg=target)


def run_cli(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from pipeline.cli import main

    try:
        main(list(map(str, args)))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models gain nothing from threads on a shared 2-core machine (opt in per module with
    `pytestmark = pytest.mark.usefixtures("one_thread")`)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture
def no_network(monkeypatch):
    """Any attempt to open a connection fails the test (offline loading is what is tested)."""
    import socket

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args[:2]}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
