"""UVR MDX-Net ONNX models through separators.families.uvr, against audio-separator's own inference.

The model is a tiny random network exported to ONNX with UVR's interface (input "input",
[1, 4, dim_f, dim_t] -> the same), its parameters in a UVR model-data JSON keyed by UVR's hash.
audio-separator runs it from a local model_file_dir with the network blocked (what the README
says about offline use), and writes float WAVs; our stems equal them to 1e-5 (tolerance: float32
STFT/ONNX/ISTFT rounding, the same operations in another order).
"""
import logging

import numpy as np
import pytest
import soundfile as sf
import torch

from core.errors import PipelineError
from separators.families.uvr import write_offline_tables
from separators.inference import separate_array
from separators.registry import load_separator

pytestmark = pytest.mark.usefixtures("one_thread", "no_network")

DIM_F, DIM_T, N_FFT = 128, 16, 2048     # chunk = 1024 x 15 samples, trim 1024
DATA = {"compensate": 1.035, "mdx_dim_f_set": DIM_F, "mdx_dim_t_set": 4,
        "mdx_n_fft_scale_set": N_FFT, "primary_stem": "Vocals"}




@pytest.fixture(scope="module")
def mdx_dir(tmp_path_factory):
    """A model_file_dir as UVR / audio-separator keep one: the .onnx and the JSON tables."""
    folder = tmp_path_factory.mktemp("uvr")
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(4, 8, 3, padding=1), torch.nn.Tanh(),
                              torch.nn.Conv2d(8, 4, 3, padding=1)).eval()
    path = folder / "UVR-MDX-NET-Tiny.onnx"
    torch.onnx.export(net, torch.zeros(1, 4, DIM_F, DIM_T), str(path), input_names=["input"],
                      output_names=["output"], dynamo=False)
    write_offline_tables(path, DATA, "Tiny")
    return folder, path


def song(folder, sep):
    """3 s of stereo tones and noise at 44.1 kHz with one sample at exactly 1.0, as a float WAV,
    and our stems of it. audio-separator scales stems peaking above its normalization_threshold
    (at most 1.0) down to it, and multiplies the primary stem by the input's peak: a peak of 1.0
    and stems within [-1, 1] make its output the plain separation (the click is moved until ours
    are, and ours equal its unscaled ones)."""
    rng = np.random.default_rng(1)
    n = 3 * 44100 + 5
    t = np.arange(n) / 44100
    x = 0.3 * np.sin(2 * np.pi * np.array([[440.0], [660.0]]) * t) + 0.05 * rng.standard_normal((2, n))
    for k in range(1000, n, 9973):
        y = x.astype(np.float32)
        y[0, k] = 1.0
        ours = separate_array(sep, y, 44100)
        if np.abs(ours).max() <= 1.0:
            path = folder / "song.wav"
            sf.write(path, y.T, 44100, subtype="FLOAT")
            return path, ours
    raise AssertionError("no click position keeps the stems within [-1, 1]")


def test_mdx_onnx_matches_audio_separator(mdx_dir, tmp_path):
    from audio_separator.separator import Separator

    folder, path = mdx_dir
    sep = load_separator(str(path), offline=True)
    assert sep.sources == ("vocals", "instrumental") and sep.family == "uvr-mdx"
    (tmp_path / "in").mkdir()
    wav, ours = song(tmp_path / "in", sep)
    song_path = wav

    upstream = Separator(model_file_dir=str(folder), output_dir=str(tmp_path), output_format="WAV",
                         normalization_threshold=1.0, use_soundfile=True, log_level=logging.ERROR,
                         mdx_params={"hop_length": 1024, "segment_size": DIM_T, "overlap": 0.25,
                                     "batch_size": 1, "enable_denoise": False})
    upstream.load_model(path.name)
    files = upstream.separate(str(song_path))
    stems = {}
    for f in files:
        data, r = sf.read(tmp_path / f if not str(f).startswith("/") else f, dtype="float32")
        assert r == 44100
        stems["vocals" if "(Vocals)" in str(f) else "instrumental"] = data.T
    want = np.stack([stems["vocals"], stems["instrumental"]])
    assert np.abs(want[0]).max() > 1e-3
    np.testing.assert_allclose(ours, want, atol=1e-5, rtol=0)


def test_mdx_parameters_from_the_spec_and_missing_ones(mdx_dir, tmp_path):
    folder, path = mdx_dir
    alone = tmp_path / "alone.onnx"
    alone.write_bytes(path.read_bytes())
    with pytest.raises(PipelineError, match="no MDX-Net parameters .*dim_f="):
        load_separator(str(alone))
    spec = f"{alone}?dim_f={DIM_F}&dim_t={DIM_T}&n_fft={N_FFT}&compensate=1.035&primary_stem=Vocals"
    a, b = load_separator(spec), load_separator(str(path))
    assert a.options() == b.options()
    assert load_separator(spec + "&overlap=0.5").identity() != a.identity()
    with pytest.raises(PipelineError, match="unknown parameter"):
        load_separator(spec + "&dimf=3")


def test_mdx_missing_model_fails_fast_offline(tmp_path):
    missing = tmp_path / "UVR-MDX-NET-Inst_HQ_3.onnx"
    with pytest.raises(PipelineError) as err:   # the module blocks the network
        load_separator(str(missing), offline=True)
    msg = str(err.value)
    assert missing.name in msg and str(missing) in msg and f"put it in {tmp_path}" in msg
