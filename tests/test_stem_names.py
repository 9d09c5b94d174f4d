"""Stem names: every family names a model's stems by their place in the whole list the model was
trained on (core.sources), each checked on that family's real layout: MSST's instrumental RoFormer
(`instruments: [other, vocals]`, `target_instrument: other`), UVR's model-data entries (primary
stem and its secondary), Demucs packages with two sources, plugins, and our own RoFormer / Demucs
trained on a subset of MUSDB's sources."""
import copy

import numpy as np
import pytest
import torch

from core.errors import PipelineError
from core.sources import canonical_sources

MUSDB = ["drums", "bass", "other", "vocals"]


def test_a_target_is_named_by_its_place_in_the_whole_list():
    assert canonical_sources(["vocals", "other"]) == ("vocals", "instrumental")
    assert canonical_sources(["other"]) == ("other",)          # alone: nothing says otherwise
    assert canonical_sources(["other"], within=["other", "vocals"]) == ("instrumental",)
    assert canonical_sources(["vocals"], within=["other", "vocals"]) == ("vocals",)
    assert canonical_sources(["Other"], within=["Vocals", "Other"]) == ("instrumental",)
    assert canonical_sources(["other"], within=MUSDB) == ("other",)
    assert canonical_sources(["vocals", "other"], within=MUSDB) == ("vocals", "other")
    # the rest next to any one stem is "no <stem>", never MUSDB's other
    assert canonical_sources(["drums", "other"]) == ("drums", "no drums")
    assert canonical_sources(["No Crowd", "Crowd"]) == ("no crowd", "crowd")
    assert canonical_sources(["karaoke", "other"]) == ("instrumental", "vocals")
    assert canonical_sources(["Vocals", "No Vocals"]) == ("vocals", "instrumental")
    with pytest.raises(PipelineError, match=r"model stem\(s\) \['piano'\]: not among"):
        canonical_sources(["piano"], within=MUSDB)
    with pytest.raises(PipelineError, match="names must be distinct"):
        canonical_sources(["vocal", "vocals"])


# ---- MSST: the zoo's instrumental RoFormer ---------------------------------------------------
def _msst_cfg(instruments, target):
    from test_msst import ZOO

    cfg = copy.deepcopy(ZOO["mel_band_roformer"][0])
    cfg["training"] = dict(instruments=instruments, target_instrument=target)
    cfg["model"]["num_stems"] = 1 if target else len(instruments)
    return cfg


@pytest.mark.parametrize("instruments, target, want", [
    (["other", "vocals"], "other", ("instrumental",)),      # inst_v1e, Mel-RoFormer Instrumental
    (["vocals", "other"], "other", ("instrumental",)),
    (["vocals", "other"], "vocals", ("vocals",)),
    (["other", "vocals"], None, ("instrumental", "vocals")),
    (["karaoke", "other"], "karaoke", ("instrumental",)),   # the karaoke RoFormer's layout
    (MUSDB, "other", ("other",)),                            # a four-stem model's other is other
])
def test_msst_target_named_in_its_instrument_list(tmp_path, instruments, target, want):
    from test_msst import save_msst

    from separators.registry import load_separator

    config, ckpt = save_msst(tmp_path, "mel_band_roformer", _msst_cfg(instruments, target))
    assert load_separator(f"{config}:{ckpt}").sources == want


def test_msst_instrumental_model_is_stored_as_instrumental(tmp_path, one_thread):
    """The cache stage's model.json, what the blend and the evaluation read."""
    from conftest import write_stem_track
    from test_msst import SR, save_msst

    from cache.run import cache_model, ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore
    from separators.registry import load_separator

    config, ckpt = save_msst(tmp_path / "m", "mel_band_roformer",
                             _msst_cfg(["other", "vocals"], "other"))
    sep = load_separator(f"{config}:{ckpt}")
    write_stem_track(tmp_path / "ds", "test", "song", n=SR, rate=SR)
    ds = open_dataset(tmp_path / "ds")
    store = StemStore(tmp_path / "store")
    ingest_dataset(store, ds, progress=False)
    key = cache_model(store, ds, sep, progress=False)["key"]
    assert store.model_info(key)["sources"] == ["instrumental"]


# ---- UVR MDX-Net: primary stem and its secondary ----------------------------------------------
# entries of UVR's models/MDX_Net_Models/model_data/model_data.json (primary stems seen there)
UVR_DATA = {"compensate": 1.035, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8,
            "mdx_n_fft_scale_set": 7680}


@pytest.mark.parametrize("primary, stems, want", [
    ("Vocals", ("Vocals", "Instrumental"), ("vocals", "instrumental")),
    ("Instrumental", ("Instrumental", "Vocals"), ("instrumental", "vocals")),
    ("Other", ("Other", "No Other"), ("other", "no other")),
    ("Drums", ("Drums", "No Drums"), ("drums", "no drums")),
    ("Reverb", ("Reverb", "No Reverb"), ("reverb", "no reverb")),
    ("No Crowd", ("No Crowd", "Crowd"), ("no crowd", "crowd")),   # audio-separator: not "No No Crowd"
])
def test_uvr_primary_and_secondary_stems(primary, stems, want):
    from separators.families.uvr import MDXNetSeparator

    sep = MDXNetSeparator(None, dict(UVR_DATA, primary_stem=primary), "m", "x", overlap=0.25,
                          hop_length=1024)
    assert sep.stems == stems and sep.sources == want


def test_uvr_secondary_stem_is_audio_separators():
    from audio_separator.separator.common_separator import CommonSeparator

    from separators.families.uvr import secondary_stem

    for primary in ("Vocals", "Instrumental", "Other", "Bass", "Drums", "Reverb", "No Crowd",
                    "Primary Stem", "lead_only", "Guitar"):
        assert secondary_stem(primary) == CommonSeparator.secondary_stem(CommonSeparator, primary), primary


# ---- Demucs: packages with two sources ---------------------------------------------------------
@pytest.mark.parametrize("sources, want", [
    (["vocals", "other"], ("vocals", "instrumental")),
    (["instrumental", "vocals"], ("instrumental", "vocals")),    # UVR's two-stem Demucs order
    (["vocals", "no_vocals"], ("vocals", "instrumental")),       # demucs --two-stems' names
    (MUSDB, tuple(MUSDB)),
])
def test_demucs_two_source_package(tmp_path, sources, want):
    from test_adapters import save_demucs, tiny_htdemucs

    from separators.registry import load_separator

    save_demucs(tiny_htdemucs(sources), tmp_path / "two" / "tinytwo.th")
    assert load_separator(str(tmp_path / "two"), offline=True).sources == want


# ---- plugins -------------------------------------------------------------------------------------
class _Declared(torch.nn.Module):
    sample_rate = 44100

    def __init__(self, sources):
        super().__init__()
        self.sources = tuple(sources)


@pytest.mark.parametrize("declared, want", [
    (("vocals", "other"), ("vocals", "instrumental")),
    (("vocals", "accompaniment"), ("vocals", "instrumental")),
    (("drums", "other"), ("drums", "no drums")),
    (("other",), ("other",)),
    (tuple(MUSDB), tuple(MUSDB)),
])
def test_plugin_declared_sources(declared, want):
    from separators.families.plugin import PluginSeparator

    assert PluginSeparator(_Declared(declared), "p", {}, "x").sources == want


# ---- our own: targets chosen among the dataset's sources --------------------------------------
@pytest.mark.parametrize("family", ["roformer", "demucs"])
@pytest.mark.parametrize("targets", [["vocals", "other"], ["other"], ["drums", "other"]])
def test_our_own_model_keeps_the_dataset_names_of_its_targets(tmp_path, family, targets):
    """A model trained for MUSDB's vocals and other outputs MUSDB's other (not the instrumental):
    the export notes the dataset's sources, the loader names the targets among them."""
    import importlib

    from separators.registry import load_separator
    from separators.train_base import build, resolve_config

    config = resolve_config(family, "tiny", sample_rate=8000, n_train_tracks=2, targets=targets)
    config.update(seed=0, dataset_id="toy")
    _, _, bare = build(config)
    summary = {"best_epoch": 1, "dataset_id": "toy", "sources": list(MUSDB)}
    out = tmp_path / "run" / "model"
    out.mkdir(parents=True)
    module = {"roformer": "separators.families.msst", "demucs": "separators.families.demucs"}[family]
    importlib.import_module(module).export(bare, out, config, summary)
    sep = load_separator(str(out), offline=True)
    assert sep.sources == tuple(targets)
    if family == "roformer":   # MSST's own inference still reads the config
        import msst

        up = msst.Separator(config_path=out / "config.yaml", checkpoint_path=out / "model.ckpt",
                            model_type="bs_roformer", force_cpu=True, detailed_progress=False)
        assert up.instruments == tuple(targets)
    mix = torch.from_numpy(np.random.default_rng(0).standard_normal((2, 8000)).astype(np.float32))
    with torch.no_grad():
        assert sep.separate(mix).shape == (len(targets), 2, 8000)
