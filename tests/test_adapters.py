"""Base-model adapters, registry and inference wrapper, on tiny randomly-initialised models.

No pretrained weights can be downloaded here, so every family is exercised with a tiny random
model saved in that family's real on-disk format and loaded back through the same offline path a
user's folder takes (`load_separator(path_or_name, offline=True, repo=...)`). Where the package
has its own separation entry point, our output must equal it (known answer). The network is
blocked for the whole module: any download attempt fails the test.
"""
from __future__ import annotations

import inspect
import json
import random
from pathlib import Path

import julius
import numpy as np
import pytest
import torch
import yaml

from core.errors import PipelineError
from separators.base import model_key
from separators.inference import separate_array
from separators.registry import load_separator

# tiny models trip harmless UserWarnings (LSTM dropout with few layers, demucs's init, torch.stft
# deprecations inside asteroid); scoped to this module
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

MUSDB = ["drums", "bass", "other", "vocals"]


# --------------------------------------------------------------------------------------------
# Environment: one thread (2 shared cores), no network, offline state restored afterwards
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # oversubscribing 2 shared cores makes small convs 10x slower
    yield
    torch.set_num_threads(n)


@pytest.fixture(autouse=True)
def _no_network(no_network):
    yield


@pytest.fixture(autouse=True)
def _restore_offline_state(monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", constants.HF_HUB_OFFLINE)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")


@pytest.fixture
def empty_caches(tmp_path, monkeypatch):
    """Empty torch hub and Hugging Face caches; returns the hub checkpoints folder."""
    import huggingface_hub.constants as constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    return tmp_path / "torch" / "hub" / "checkpoints"


def noise(channels=2, seconds=2.5, rate=22050, seed=0):
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal((channels, int(seconds * rate)))).astype(np.float32)


def through_model_rate(fn, x: np.ndarray, rate: int, model_rate: int) -> np.ndarray:
    """Reference pipeline: julius to the model's rate, fn, julius back, exact length."""
    xm = julius.resample_frac(torch.from_numpy(x), rate, model_rate)
    with torch.inference_mode():
        y = fn(xm)
    y = julius.resample_frac(y.float(), model_rate, rate)[..., : x.shape[-1]]
    return y.numpy()


# --------------------------------------------------------------------------------------------
# Demucs: tiny HTDemucs / HDemucs in demucs's own package format
# --------------------------------------------------------------------------------------------

def tiny_htdemucs(sources=MUSDB, seed=0):
    from demucs.htdemucs import HTDemucs

    torch.manual_seed(seed)
    return HTDemucs(list(sources), channels=4, depth=4, nfft=1024, t_layers=1, t_heads=2,
                    dconv_comp=4, segment=2, samplerate=44100)


def tiny_hdemucs(seed=0):
    from demucs.hdemucs import HDemucs

    torch.manual_seed(seed)
    return HDemucs(MUSDB, channels=4, depth=4, nfft=1024, segment=2, samplerate=44100)


def save_demucs(model, path: Path):
    """demucs.states.serialize_model's package + torch.save, as demucs's solver exports it."""
    from separators.families.demucs import package_model

    pkg = package_model(model, {"model": type(model).__name__.lower(), "seed": 0})
    assert set(pkg) == {"klass", "args", "kwargs", "state", "training_args"}
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(pkg, path)
    return path


@pytest.fixture(scope="module")
def demucs_dirs(tmp_path_factory):
    from separators.families.demucs import export_model

    root = tmp_path_factory.mktemp("demucs")
    save_demucs(tiny_htdemucs(), root / "single" / "tinyht.th")
    save_demucs(tiny_htdemucs(MUSDB + ["guitar", "piano"], seed=1), root / "six" / "tiny6s.th")
    # a bag: two models saved with demucs's save_with_checksum (<sig>-<sha[:8]>.th) + <name>.yaml
    export_model(tiny_hdemucs(seed=2), root / "bag", "tinyha")
    export_model(tiny_hdemucs(seed=3), root / "bag", "tinyhb")
    (root / "bag" / "tinybag.yaml").write_text(yaml.safe_dump(
        {"models": ["tinyha", "tinyhb"], "weights": [[1.0, 1.0, 0.0, 1.0], [1.0, 0.0, 1.0, 1.0]],
         "segment": 1.5}))
    return root


def test_demucs_single_matches_demucs_api(demucs_dirs):
    import demucs.api

    folder = demucs_dirs / "single"
    sep = load_separator(str(folder), offline=True)
    assert (sep.family, sep.name, sep.sources, sep.sample_rate) == ("demucs", "tinyht", tuple(MUSDB), 44100)
    assert sep.options()["shifts"] == 1

    x = noise(rate=22050)
    y = separate_array(sep, x, 22050)
    assert y.shape == (4, 2, x.shape[1]) and y.dtype == np.float32 and np.isfinite(y).all()
    assert np.array_equal(y, separate_array(sep, x, 22050)), "same input must give the same stems"

    # known answer: demucs's own Separator (get_model + normalisation + apply_model, shifts=1)
    ref = demucs.api.Separator(model="tinyht", repo=folder, device="cpu", shifts=1, overlap=0.25,
                               progress=False)

    def run(xm):
        random.seed(0)
        _, stems = ref.separate_tensor(xm, ref.samplerate)
        return torch.stack([stems[s] for s in ref.model.sources])

    expected = through_model_rate(run, x, 22050, 44100)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_demucs_bag_from_repo_matches_apply_model(demucs_dirs):
    from demucs.apply import apply_model
    from demucs.pretrained import get_model

    repo = demucs_dirs / "bag"
    sep = load_separator("tinybag", repo=repo, offline=True, options={"shifts": 0})
    same = load_separator(f"{repo}:tinybag", offline=True, options={"shifts": 0})
    assert sep.sources == tuple(MUSDB) and sep.options()["shifts"] == 0
    assert model_key(sep.identity()) == model_key(same.identity())

    x = noise(seconds=2.0, rate=44100, seed=1)
    y = separate_array(sep, x, 44100)
    assert y.shape == (4, 2, x.shape[1])

    bag = get_model("tinybag", repo=repo)
    mix = torch.from_numpy(x)
    ref = mix.mean(0)
    mean, std = ref.mean(), ref.std() + 1e-8
    with torch.no_grad():
        expected = apply_model(bag, ((mix - mean) / std)[None], shifts=0, overlap=0.25)[0] * std + mean
    np.testing.assert_allclose(y, expected.numpy(), atol=1e-5)

    # options and weights are part of the model key
    shifted = load_separator("tinybag", repo=repo, offline=True, options={"shifts": 2})
    assert model_key(shifted.identity()) != model_key(sep.identity())
    # the folder alone: its single bag yaml is the model
    assert load_separator(str(repo), offline=True).name == "tinybag"


def test_demucs_torch_hub_cache_path(demucs_dirs, empty_caches, monkeypatch):
    """A model listed in demucs's remote files.txt and already in $TORCH_HOME/hub/checkpoints
    loads offline through get_model -> RemoteRepo -> the cached file, without a download.

    The remote list is extended with our tiny model under its own name (the real pretrained
    weights cannot be had here, and a random model must never pose as one of them).
    """
    import shutil

    import demucs.pretrained

    url = "https://example.invalid/demucs/tinyhub-0123abcd.th"
    real = demucs.pretrained._parse_remote_files
    monkeypatch.setattr(demucs.pretrained, "_parse_remote_files",
                        lambda path: {**real(path), "tinyhub": url})
    with pytest.raises(PipelineError, match="tinyhub-0123abcd.th"):
        load_separator("tinyhub", offline=True)
    empty_caches.mkdir(parents=True)
    shutil.copy(demucs_dirs / "single" / "tinyht.th", empty_caches / "tinyhub-0123abcd.th")
    sep = load_separator("tinyhub", offline=True, options={"shifts": 0})
    local = load_separator(str(demucs_dirs / "single"), offline=True, options={"shifts": 0})
    assert sep.name == "tinyhub" and sep.sources == tuple(MUSDB)
    x = noise(seconds=1.0, rate=44100, seed=10)
    np.testing.assert_array_equal(separate_array(sep, x, 44100), separate_array(local, x, 44100))


def test_demucs_weights_checksum_changes_model_key(demucs_dirs, tmp_path):
    a = load_separator(str(demucs_dirs / "single"), offline=True)
    m = tiny_htdemucs()
    with torch.no_grad():
        next(iter(m.parameters())).add_(0.01)
    save_demucs(m, tmp_path / "tinyht.th")  # same signature, other weights
    b = load_separator(str(tmp_path), offline=True)
    assert a.name == b.name == "tinyht"
    assert a.weights_checksum() and a.weights_checksum() != b.weights_checksum()
    assert model_key(a.identity()) != model_key(b.identity())
    assert model_key(a.identity()) == model_key(load_separator(str(demucs_dirs / "single" / "tinyht.th"),
                                                               offline=True).identity())


def test_demucs_six_sources(demucs_dirs):
    sep = load_separator(str(demucs_dirs / "six"), offline=True, options={"shifts": 0})
    assert sep.sources == ("drums", "bass", "other", "vocals", "guitar", "piano")
    x = noise(seconds=1.5, rate=48000, seed=2)
    y = separate_array(sep, x, 48000)
    assert y.shape == (6, 2, x.shape[1]) and np.isfinite(y).all()


def test_demucs_segment_longer_than_training_is_refused(demucs_dirs):
    with pytest.raises(PipelineError, match="at most 2 s"):
        load_separator(str(demucs_dirs / "single"), offline=True, options={"segment": 5})


def test_demucs_missing_pretrained_offline_fails_fast(empty_caches, no_network):
    """Offline, nothing is fetched, not even tried (how fast that is: benchmarks/bench_fast_paths.py)."""
    import os

    with pytest.raises(PipelineError) as err:
        load_separator("htdemucs", offline=True)
    msg = str(err.value)
    assert "955717e8-8726e21a.th" in msg and str(empty_caches) in msg and "--repo" in msg
    assert "https://dl.fbaipublicfiles.com/demucs/hybrid_transformer/955717e8-8726e21a.th" in msg
    assert "\n" not in msg
    assert os.environ["HF_HUB_OFFLINE"] == "1"

    with pytest.raises(PipelineError) as err:  # a bag: every missing file is named
        load_separator("htdemucs_ft", offline=True)
    assert all(s in str(err.value) for s in ("f7e0c4bc", "d12395a8", "92cfc3b6", "04573f0d"))


def test_demucs_pretrained_bag_missing_from_repo(tmp_path):
    with pytest.raises(PipelineError) as err:
        load_separator("mdx_extra", repo=tmp_path, offline=True)
    assert "e51eebcc-c1b80bdd.th" in str(err.value) and str(tmp_path) in str(err.value)


def test_demucs_folder_with_several_models_asks_for_one(demucs_dirs, tmp_path):
    for sig in ("one", "two"):
        save_demucs(tiny_hdemucs(), tmp_path / f"{sig}.th")
    with pytest.raises(PipelineError, match=":NAME"):
        load_separator(str(tmp_path), offline=True)
    assert load_separator(f"{tmp_path}:two", offline=True).name == "two"


# --------------------------------------------------------------------------------------------
# Open-Unmix: tiny OpenUnmix saved as scripts/train.py saves it
# --------------------------------------------------------------------------------------------

def save_umx_folder(folder: Path, targets, seed=0, hidden=8, max_bin=48, rate=44100):
    """separator.json + per target <target>.json, <target>.pth (state dict), <target>.chkpnt."""
    from openunmix.model import OpenUnmix

    folder.mkdir(parents=True, exist_ok=True)
    nfft, nhop = 2048, 512  # train.py's --nfft/--nhop (defaults 4096/1024), halved for speed
    (folder / "separator.json").write_text(json.dumps(
        {"nfft": nfft, "nhop": nhop, "sample_rate": rate, "nb_channels": 2}, indent=4, sort_keys=True))
    for i, target in enumerate(targets):
        torch.manual_seed(seed * 100 + i)
        unmix = OpenUnmix(nb_bins=nfft // 2 + 1, nb_channels=2, hidden_size=hidden, max_bin=max_bin,
                          input_mean=np.random.default_rng(i).standard_normal(nfft // 2 + 1) * 0.1,
                          input_scale=np.ones(nfft // 2 + 1))
        with torch.no_grad():  # non-trivial output scaling, as after training
            unmix.output_scale.uniform_(0.5, 1.5)
        state = {"epoch": 1, "state_dict": unmix.state_dict(), "best_loss": 1.0}
        torch.save(state, folder / f"{target}.chkpnt")           # utils.save_checkpoint
        torch.save(state["state_dict"], folder / f"{target}.pth")  # is_best: weights only
        args = {"target": target, "nfft": nfft, "nhop": nhop, "hidden_size": hidden, "nb_channels": 2,
                "bandwidth": 16000, "seq_dur": 6.0, "unidirectional": False, "seed": 42}
        (folder / f"{target}.json").write_text(json.dumps(
            {"epochs_trained": 1, "args": args, "best_loss": 1.0, "best_epoch": 1,
             "train_loss_history": [1.0], "valid_loss_history": [1.0], "train_time_history": [1.0],
             "num_bad_epochs": 0, "commit": "0000000"}, indent=4, sort_keys=True))
    return folder


@pytest.fixture(scope="module")
def umx_dir(tmp_path_factory):
    return save_umx_folder(tmp_path_factory.mktemp("umx") / "tinyumx", ["vocals", "drums", "bass"])


def test_openunmix_folder_matches_openunmix_separator(umx_dir):
    from openunmix.utils import load_separator as umx_load

    sep = load_separator(str(umx_dir), offline=True)
    assert (sep.family, sep.name, sep.sample_rate) == ("openunmix", "tinyumx", 44100)
    assert sep.sources == ("drums", "bass", "vocals")
    assert sep.options()["niter"] == 1 and sep.options()["residual"] is False

    x = noise(seconds=2.0, rate=22050, seed=3)
    y = separate_array(sep, x, 22050)
    assert y.shape == (3, 2, x.shape[1]) and y.dtype == np.float32 and np.isfinite(y).all()
    assert np.array_equal(y, separate_array(sep, x, 22050))

    ref = umx_load(str(umx_dir), targets=list(sep.sources), niter=1, device="cpu")
    ref.freeze()
    expected = through_model_rate(lambda xm: ref(xm[None])[0], x, 22050, 44100)
    np.testing.assert_allclose(y, expected, atol=1e-5)


def test_openunmix_chunked_long_input(umx_dir):
    sep = load_separator(str(umx_dir), offline=True, options={"segment": 2.0, "niter": 0})
    whole = load_separator(str(umx_dir), offline=True, options={"segment": 60.0, "niter": 0})
    assert model_key(sep.identity()) != model_key(whole.identity())
    x = torch.from_numpy(noise(seconds=5.0, rate=44100, seed=4))
    with torch.inference_mode():
        a, b = sep.separate(x), whole.separate(x)
    assert a.shape == b.shape == (3, 2, x.shape[1]) and torch.isfinite(a).all()
    mid = slice(44100, 4 * 44100)
    err = (a[..., mid] - b[..., mid]).norm() / b[..., mid].norm()
    assert err < 0.05, err


def test_openunmix_vocals_only_and_residual(tmp_path):
    folder = save_umx_folder(tmp_path / "vox", ["vocals"])
    sep = load_separator(str(folder), offline=True)
    assert sep.sources == ("vocals",) and sep.options()["niter"] == 0  # EM needs two stems
    x = noise(channels=1, seconds=2.0, rate=44100, seed=5)  # mono in
    y = separate_array(sep, x, 44100)
    assert y.shape == (1, 2, x.shape[1]) and np.isfinite(y).all()

    res = load_separator(str(folder), offline=True, options={"residual": True})
    assert res.sources == ("vocals", "residual") and res.options()["niter"] == 1
    yr = separate_array(res, noise(seconds=2.0, rate=44100, seed=5), 44100)
    assert yr.shape == (2, 2, 88200) and np.isfinite(yr).all()

    with pytest.raises(PipelineError, match="two stems"):
        load_separator(str(folder), offline=True, options={"niter": 2})


def test_openunmix_weights_checksum_changes_model_key(umx_dir, tmp_path):
    other = save_umx_folder(tmp_path / "tinyumx", ["vocals", "drums", "bass"], seed=1)
    a, b = load_separator(str(umx_dir), offline=True), load_separator(str(other), offline=True)
    assert a.name == b.name
    assert model_key(a.identity()) != model_key(b.identity())
    assert model_key(a.identity()) == model_key(load_separator(str(umx_dir), offline=True).identity())


def test_openunmix_missing_pretrained_offline_fails_fast(empty_caches, no_network):
    with pytest.raises(PipelineError) as err:
        load_separator("umxhq", offline=True)
    msg = str(err.value)
    assert "vocals-b62c91ce.pth" in msg and str(empty_caches) in msg
    assert "https://zenodo.org/records/3370489/files/vocals-b62c91ce.pth" in msg


def test_openunmix_urls_match_the_package():
    import openunmix

    from separators.families.umx import PRETRAINED_URLS

    for name, urls in PRETRAINED_URLS.items():
        src = inspect.getsource(getattr(openunmix, f"{name}_spec"))
        for target, url in urls.items():
            assert f'"{target}": "{url}"' in src, (name, target)


def test_openunmix_rejects_pickled_objects(umx_dir, tmp_path):
    import shutil

    folder = tmp_path / "evil"
    shutil.copytree(umx_dir, folder)
    torch.save({"input_mean": torch.zeros(3), "x": Path("/")}, folder / "vocals.pth")  # not a plain state dict
    with pytest.raises(PipelineError, match="vocals.pth"):
        load_separator(str(folder), offline=True)


# --------------------------------------------------------------------------------------------
# X-UMX: tiny BrokenXUMX saved as asteroid's serialized dict
# --------------------------------------------------------------------------------------------

XUMX_RATE = 8000


def save_xumx(path: Path, seed=0, sources=MUSDB):
    """What asteroid's BaseModel.serialize() + the recipe's train.py write (model_name 'XUMX').

    serialize() itself imports pytorch_lightning (9 s) for a version string, so the same dict is
    built here; max_bin is a numpy integer as bandwidth_to_max_bin returns it in the recipe.
    """
    import asteroid
    from asteroid.models.x_umx import BrokenXUMX
    from openunmix.utils import bandwidth_to_max_bin

    torch.manual_seed(seed)
    max_bin = bandwidth_to_max_bin(XUMX_RATE, 512, 2000)
    assert isinstance(max_bin, np.integer)
    net = BrokenXUMX(list(sources), window_length=512, in_chan=512, n_hop=256, hidden_size=16,
                     nb_channels=2, sample_rate=XUMX_RATE, nb_layers=2, max_bin=max_bin,
                     input_mean=np.random.default_rng(seed).standard_normal(257).astype(np.float32) * 0.1,
                     input_scale=np.ones(257, dtype=np.float32))
    conf = {"model_name": "XUMX", "state_dict": net.get_state_dict(), "model_args": net.get_model_args(),
            "infos": {"software_versions": {"torch_version": torch.__version__,
                                            "pytorch_lightning_version": "2.6.6",
                                            "asteroid_version": asteroid.__version__}}}
    conf.update({"dataset": "MUSDB18", "licenses": []})  # train_dataset.get_infos()
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(conf, path)
    return path, net.eval()


@pytest.fixture(scope="module")
def xumx_file(tmp_path_factory):
    return save_xumx(tmp_path_factory.mktemp("xumx") / "tiny_xumx.pth")


def test_xumx_separates_and_matches_asteroid_spectrograms(xumx_file):
    path, net = xumx_file
    sep = load_separator(str(path), offline=True, options={"niter": 0})
    assert (sep.family, sep.name, sep.sources, sep.sample_rate) == ("xumx", "tiny_xumx", tuple(MUSDB), XUMX_RATE)

    x = noise(seconds=3.0, rate=16000, seed=6)
    y = separate_array(sep, x, 16000)
    assert y.shape == (4, 2, x.shape[1]) and y.dtype == np.float32 and np.isfinite(y).all()
    assert np.array_equal(y, separate_array(sep, x, 16000))

    # known answer with niter=0: asteroid's own forward (STFT, masks) gives the magnitudes, the
    # mixture phase completes them, torch.istft inverts - what the recipe's eval.py does
    xm = torch.from_numpy(noise(seconds=2.0, rate=XUMX_RATE, seed=7))
    with torch.no_grad():
        mags, _ = net(xm[None])                                # [S, frames, 1, C, F]
        stft = net.encoder[0](xm[None])                        # [1, C, F, frames, 2]
        phase = torch.atan2(stft[..., 1], stft[..., 0])[0]     # [C, F, frames]
        spec = mags[:, :, 0].permute(0, 2, 3, 1) * torch.exp(1j * phase)
        expected = torch.istft(spec.reshape(-1, *spec.shape[2:]), 512, 256,
                               window=torch.hann_window(512), length=xm.shape[1]).reshape(4, 2, -1)
        got = sep.separate(xm)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_xumx_long_input_chunked(xumx_file):
    path, _ = xumx_file
    # niter=0 keeps this test fast; the chunking is the same whatever the Wiener step does
    chunked = load_separator(str(path), offline=True, options={"segment": 30.0, "niter": 0})
    whole = load_separator(str(path), offline=True, options={"segment": 100.0, "niter": 0})
    n = 70 * XUMX_RATE + 123
    x = noise(seconds=n / XUMX_RATE, rate=XUMX_RATE, seed=8)[:, :n]
    y = separate_array(chunked, x, XUMX_RATE)
    assert y.shape == (4, 2, n) and np.isfinite(y).all()
    with torch.inference_mode():
        ref = whole.separate(torch.from_numpy(x)).numpy()
    inner = slice(2 * XUMX_RATE, n - 2 * XUMX_RATE)
    err = np.linalg.norm(y[..., inner] - ref[..., inner]) / np.linalg.norm(ref[..., inner])
    assert err < 0.05, err


def test_xumx_checksum_and_residual(xumx_file, tmp_path):
    path, _ = xumx_file
    other, _ = save_xumx(tmp_path / "tiny_xumx.pth", seed=1)
    a, b = load_separator(str(path), offline=True), load_separator(str(other), offline=True)
    assert model_key(a.identity()) != model_key(b.identity())
    assert model_key(a.identity()) == model_key(load_separator(str(path), offline=True).identity())
    res = load_separator(str(path), offline=True, options={"residual": True})
    assert res.sources == tuple(MUSDB) + ("residual",)
    y = separate_array(res, noise(seconds=1.0, rate=XUMX_RATE), XUMX_RATE)
    assert y.shape == (5, 2, XUMX_RATE)


def test_xumx_official_name_needs_a_local_file(empty_caches, tmp_path, no_network):
    with pytest.raises(PipelineError) as err:
        load_separator("xumx", offline=True)
    assert "pretrained_xumx_musdb18HQ.pth" in str(err.value) and str(empty_caches) in str(err.value)


def test_xumx_refuses_other_pickles(tmp_path):
    bad = tmp_path / "bad.pth"
    torch.save({"model_name": "XUMX", "state_dict": {}, "model_args": {}, "x": Path("/")}, bad)
    with pytest.raises(PipelineError, match="bad.pth"):
        load_separator(str(bad), offline=True)


# --------------------------------------------------------------------------------------------
# Registry and inference wrapper
# --------------------------------------------------------------------------------------------

def test_unknown_name_lists_known_names():
    with pytest.raises(PipelineError) as err:
        load_separator("no_such_model", offline=True)
    msg = str(err.value)
    for name in ("htdemucs", "htdemucs_6s", "mdx_extra_q", "umxhq", "umxl", "xumx"):
        assert name in msg


def test_unknown_option_and_other_families_options(umx_dir):
    with pytest.raises(PipelineError, match="unknown model option"):
        load_separator(str(umx_dir), offline=True, options={"shiftz": 1})
    # one options dict is shared by every model of a CLI run: demucs's shifts is ignored here
    sep = load_separator(str(umx_dir), offline=True, options={"shifts": 2, "niter": "0"})
    assert sep.options()["niter"] == 0


def test_shipped_checkpoint_folders(umx_dir, demucs_dirs, xumx_file, tmp_path, monkeypatch):
    """separators/checkpoints/<name>/: the family's own files + MODEL.md (+ unrelated YAML is fine)."""
    import shutil

    from separators import registry

    shipped = tmp_path / "checkpoints"
    shutil.copytree(umx_dir, shipped / "umx_tiny")
    shutil.copytree(demucs_dirs / "single", shipped / "demucs_tiny")
    (shipped / "xumx_tiny").mkdir()
    shutil.copy(xumx_file[0], shipped / "xumx_tiny" / "xumx.pth")
    for name in ("umx_tiny", "demucs_tiny", "xumx_tiny"):
        (shipped / name / "MODEL.md").write_text(f"# {name}\n")
        (shipped / name / "train_config.yaml").write_text("lr: 0.001\nseed: 0\n")
    monkeypatch.setattr(registry, "CHECKPOINTS_DIR", shipped)
    for name, family in (("umx_tiny", "openunmix"), ("demucs_tiny", "demucs"), ("xumx_tiny", "xumx")):
        sep = load_separator(name, offline=True)
        assert (sep.family, sep.name) == (family, name)
    assert registry.known_names()["shipped"] == ["demucs_tiny", "umx_tiny", "xumx_tiny"]


class _Echo:
    """A minimal Separator stand-in: returns the mixture as its one stem (tests the wrapper only)."""

    name, family, sources, sample_rate = "echo", "test", ("mix",), 44100
    device = torch.device("cpu")

    def separate(self, mixture):
        assert mixture.shape[0] == 2 and not torch.is_grad_enabled()
        return mixture[None].clone()


def test_separate_array_channels_rates_and_length():
    t = np.arange(22049) / 22050  # odd length
    x = np.stack([np.sin(2 * np.pi * 440 * t), 0.5 * np.cos(2 * np.pi * 1000 * t)]).astype(np.float32)
    y = separate_array(_Echo(), x, 22050)
    assert y.shape == (1, 2, 22049) and y.dtype == np.float32
    inner = slice(200, -200)  # julius's round trip is near-transparent well below Nyquist
    assert np.abs(y[0][:, inner] - x[:, inner]).max() < 1e-2
    mono = separate_array(_Echo(), x[:1], 22050)
    assert mono.shape == (1, 2, 22049) and np.array_equal(mono[0, 0], mono[0, 1])
    assert np.array_equal(separate_array(_Echo(), x, 44100)[0], x)  # same rate: untouched
    with pytest.raises(PipelineError, match="3-channel"):
        separate_array(_Echo(), np.zeros((3, 100), np.float32), 44100)
    assert separate_array(_Echo(), np.zeros((2, 0), np.float32), 44100).shape == (1, 2, 0)
    with pytest.raises(PipelineError, match="NaN"):
        separate_array(_Echo(), np.full((2, 10), np.nan, np.float32), 44100)


@pytest.mark.cuda
def test_cuda_matches_cpu(demucs_dirs, umx_dir, xumx_file):
    x = noise(seconds=2.0, rate=22050, seed=11)
    for spec, opts in ((str(demucs_dirs / "single"), {"shifts": 0}), (str(umx_dir), {}),
                       (str(xumx_file[0]), {})):
        cpu = separate_array(load_separator(spec, offline=True, options=opts), x, 22050)
        gpu_sep = load_separator(spec, device="cuda", offline=True, options=opts)
        assert gpu_sep.device.type == "cuda"
        gpu = separate_array(gpu_sep, x, 22050)
        np.testing.assert_allclose(gpu, cpu, atol=1e-3)
