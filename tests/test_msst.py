"""MSST checkpoints (YAML config + .ckpt) through separators.families.msst, checked against the msst
package's own inference on the same file.

Each model is tiny, with random weights, saved as MSST's zoo saves them: the config's fields and
sections as upstream writes them (tuples as !!python/tuple) and the architecture's own state-dict
keys (the network is msst's class). Known answer: our stems, through the cache stage's
`separate_array`, equal `msst.Separator(...).separate_file(wav)` to 1e-5 (float32 rounding: the
same operations, summed in another order), several chunks, batches and the padded ends included.
"""
import time

import numpy as np
import pytest
import soundfile as sf
import torch
import yaml

from core.errors import PipelineError
from separators.inference import separate_array
from separators.registry import load_separator

SR = 16000
MUSDB = ["drums", "bass", "other", "vocals"]
TOL = 1e-5

# model_type -> (config, how the checkpoint wraps its state dict)
ZOO = {
    "bs_roformer": (dict(
        audio=dict(chunk_size=8192, num_channels=2, sample_rate=SR, min_mean_abs=0.0),
        model=dict(dim=16, depth=1, stereo=True, num_stems=2, time_transformer_depth=1,
                   freq_transformer_depth=1, linear_transformer_depth=0,
                   freqs_per_bands=(8,) * 8 + (65,), dim_head=8, heads=2, attn_dropout=0.0,
                   ff_dropout=0.0, flash_attn=False, dim_freqs_in=129, stft_n_fft=256,
                   stft_hop_length=128, stft_win_length=256, stft_normalized=False,
                   mask_estimator_depth=1, multi_stft_resolution_loss_weight=1.0,
                   multi_stft_resolutions_window_sizes=(256, 128), multi_stft_hop_size=64,
                   multi_stft_normalized=False),
        training=dict(instruments=["vocals", "other"], target_instrument=None, use_amp=True),
        inference=dict(batch_size=2, num_overlap=4)), None),
    "mel_band_roformer": (dict(
        audio=dict(chunk_size=8192, num_channels=2, sample_rate=SR, min_mean_abs=0.0),
        model=dict(dim=16, depth=1, stereo=True, num_stems=1, time_transformer_depth=1,
                   freq_transformer_depth=1, num_bands=8, dim_head=8, heads=2, flash_attn=False,
                   dim_freqs_in=129, sample_rate=SR, stft_n_fft=256, stft_hop_length=128,
                   stft_win_length=256, mask_estimator_depth=1),
        training=dict(instruments=["vocals", "other"], target_instrument="vocals"),
        inference=dict(batch_size=1, num_overlap=2, normalize=True)), "state_dict"),
    "mdx23c": (dict(
        audio=dict(chunk_size=7936, dim_f=64, dim_t=32, hop_length=256, n_fft=512,
                   num_channels=2, sample_rate=SR, min_mean_abs=0.0),
        model=dict(act="gelu", bottleneck_factor=2, growth=8, norm="InstanceNorm",
                   num_blocks_per_scale=1, num_channels=8, num_scales=2, num_subbands=2,
                   scale=[2, 2]),
        training=dict(instruments=MUSDB, target_instrument=None),
        inference=dict(batch_size=3, num_overlap=3)), "state"),
    "scnet": (dict(
        audio=dict(chunk_size=16384, num_channels=2, sample_rate=SR, min_mean_abs=0.0),
        model=dict(sources=MUSDB, audio_channels=2, dims=[4, 8, 8, 8], nfft=4096, hop_size=1024,
                   win_size=4096, normalized=True, band_SR=[0.175, 0.392, 0.433],
                   band_stride=[1, 4, 16], band_kernel=[3, 4, 16], conv_depths=[1, 1, 1],
                   compress=4, conv_kernel=3, num_dplayer=2, expand=1),
        training=dict(instruments=MUSDB, target_instrument=None),
        inference=dict(batch_size=1, num_overlap=2)), "model_state_dict"),
}


pytestmark = pytest.mark.usefixtures("one_thread")


def save_msst(folder, model_type, cfg, wrap=None, seed=0):
    """config.yaml + model.ckpt as MSST's zoo has them; returns (config path, ckpt path)."""
    from ml_collections import ConfigDict
    from msst.utils.settings import build_model_from_config

    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = build_model_from_config(model_type, ConfigDict(cfg))
    with torch.no_grad():   # random weights of a useful size (a fresh init can output ~0)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    state = model.state_dict()
    config, ckpt = folder / f"config_{model_type}.yaml", folder / f"model_{model_type}.ckpt"
    config.write_text(yaml.dump(cfg, sort_keys=False))
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, ckpt)
    return config, ckpt


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("zoo")
    return {t: save_msst(root / t, t, cfg, wrap) for t, (cfg, wrap) in ZOO.items()}


@pytest.fixture(scope="module")
def song(tmp_path_factory):
    """2.3 s of stereo noise-and-tones at the models' rate, as a float WAV file."""
    rng = np.random.default_rng(0)
    n = int(2.3 * SR) + 17
    t = np.arange(n) / SR
    x = 0.3 * np.sin(2 * np.pi * np.array([[220.0], [330.0]]) * t) + 0.05 * rng.standard_normal((2, n))
    path = tmp_path_factory.mktemp("song") / "song.wav"
    sf.write(path, x.T.astype(np.float32), SR, subtype="FLOAT")
    return path


def upstream(config, ckpt, model_type, wav) -> dict:
    import msst

    sep = msst.Separator(config_path=config, checkpoint_path=ckpt, model_type=model_type,
                         force_cpu=True, detailed_progress=False)
    return sep.separate_file(wav)


@pytest.mark.parametrize("model_type", list(ZOO))
def test_msst_model_matches_msst_inference(zoo, song, model_type):
    config, ckpt = zoo[model_type]
    sep = load_separator(f"{config}:{ckpt}", offline=True)
    mix, rate = sf.read(song, dtype="float32", always_2d=True)
    ours = separate_array(sep, mix.T, rate)
    ref = upstream(config, ckpt, model_type, song)
    cfg = ZOO[model_type][0]["training"]
    names = [cfg["target_instrument"]] if cfg["target_instrument"] else cfg["instruments"]
    want = np.stack([ref[s] for s in names])
    assert ours.shape == want.shape == (len(names), 2, mix.shape[0])
    assert np.abs(want).max() > 1e-3   # the models do output something
    np.testing.assert_allclose(ours, want, atol=TOL, rtol=0)
    assert sep.family == "msst" and sep.sample_rate == SR
    assert sep.options()["model_type"] == model_type


def test_msst_sources_named_in_the_dataset_vocabulary(zoo):
    assert load_separator("{}:{}".format(*zoo["bs_roformer"])).sources == ("vocals", "instrumental")
    assert load_separator("{}:{}".format(*zoo["mel_band_roformer"])).sources == ("vocals",)
    assert load_separator("{}:{}".format(*zoo["scnet"])).sources == tuple(MUSDB)


def test_msst_folder_and_explicit_model_type(zoo, tmp_path):
    config, ckpt = zoo["mdx23c"]
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "config.yaml").write_bytes(config.read_bytes())
    (folder / "weights.ckpt").write_bytes(ckpt.read_bytes())
    a = load_separator(str(folder))
    b = load_separator(f"{config}:{ckpt}?model_type=mdx23c&name=mdx-tiny")
    assert a.name == "weights" and b.name == "mdx-tiny"
    assert a.identity()["weights"] == b.identity()["weights"]
    with pytest.raises(PipelineError, match="cannot build model_type scnet"):
        load_separator(f"{config}:{ckpt}?model_type=scnet")


def test_msst_missing_checkpoint_fails_fast_offline(zoo, tmp_path, no_network):
    config, _ = zoo["bs_roformer"]
    missing = tmp_path / "model_bs_roformer_ep_317_sdr_12.9755.ckpt"
    with pytest.raises(PipelineError) as err:
        load_separator(f"{config}:{missing}", offline=True)
    msg = str(err.value)
    assert missing.name in msg and str(missing) in msg and f"put it in {tmp_path}" in msg
    assert "\n" not in msg
    folder = tmp_path / "only-config"   # a folder with the config and no checkpoint
    folder.mkdir()
    (folder / "config.yaml").write_bytes(config.read_bytes())
    with pytest.raises(PipelineError, match="no checkpoint .*put it in that folder"):
        load_separator(str(folder), offline=True)


def test_msst_bad_checkpoints_are_one_line_errors(zoo, tmp_path):
    config, ckpt = zoo["bs_roformer"]
    other_config, other_ckpt = zoo["mel_band_roformer"]
    with pytest.raises(PipelineError, match=r"does not fit .*lacks \d+ key"):
        load_separator(f"{config}:{other_ckpt}")
    pickled = tmp_path / "pickled.ckpt"
    torch.save({"state_dict": torch.load(ckpt), "when": time.localtime()}, pickled)
    with pytest.raises(PipelineError, match="pickled.ckpt: not an MSST checkpoint .*weights-only"):
        load_separator(f"{config}:{pickled}")
    broken = tmp_path / "broken.yaml"
    broken.write_text("audio: {chunk_size: 8192}\nmodel: {dim: 4}\n")
    with pytest.raises(PipelineError, match="no 'training' section"):
        load_separator(f"{broken}:{ckpt}")


def test_msst_cache_key_covers_config_weights_and_inference(zoo, tmp_path):
    config, ckpt = zoo["scnet"]
    base = load_separator(f"{config}:{ckpt}").identity()
    cfg = yaml.load(config.read_text(), Loader=yaml.FullLoader)
    cfg["inference"]["num_overlap"] = 4
    other = tmp_path / "overlap4.yaml"
    other.write_text(yaml.dump(cfg))
    changed = load_separator(f"{other}:{ckpt}").identity()
    assert changed["options"]["num_overlap"] == 4 and changed != base
    state = torch.load(ckpt)["model_state_dict"]
    next(iter(state.values())).add_(1.0)
    moved = tmp_path / "moved.ckpt"
    torch.save(state, moved)
    assert load_separator(f"{config}:{moved}").identity()["weights"] != base["weights"]


@pytest.mark.parametrize("n,chunk,overlap,batch", [
    (1000, 160, 4, 1), (1000, 160, 4, 3), (1003, 160, 2, 2), (250, 160, 4, 2), (100, 160, 2, 1),
    (159, 64, 1, 2), (3001, 320, 8, 5)])
def test_msst_window_equals_msst_demix(n, chunk, overlap, batch):
    """core.chunking's 'msst' window against MSST's demix itself, on a model whose output
    depends on the chunk (so every weighting rule shows), for lengths around the padding rules."""
    from ml_collections import ConfigDict
    from msst.utils.model_utils import demix

    from core.chunking import overlap_add

    class Model(torch.nn.Module):
        def forward(self, x):   # [B, 2, T] -> [B, 2 stems, 2, T], chunk-dependent
            return torch.stack([x * (1 + x.mean(-1, keepdim=True)), x.flip(-1) * 0.5], 1)

    cfg = ConfigDict(dict(audio=dict(chunk_size=chunk), inference=dict(num_overlap=overlap,
                          batch_size=batch), training=dict(instruments=["a", "b"])))
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n))
    ref = demix(cfg, Model(), x.numpy(), "cpu", "generic")
    ours = overlap_add(Model(), x, chunk, hop=chunk // overlap, batch=batch, window="msst")
    np.testing.assert_allclose(ours.numpy(), np.stack([ref["a"], ref["b"]]), atol=1e-6, rtol=0)
