"""A plugin separator (tests/plugin_example.py, the README's example) and a two-stem model among
four-stem ones, end to end through the CLI.

The plugin outputs (vocals, instrumental); an Open-Unmix model in its real folder format outputs
the four MUSDB sources. Both are cached on a four-source dataset, blended, mixed by a conv1x1,
evaluated and applied to a new file: the two-stem model's every channel is a mixer input, the
blend and the evaluation use it for vocals only, the ensemble outputs all four sources.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pandas as pd
import pytest
import soundfile as sf
import torch
from conftest import assert_separate_is_apply, write_four_tracks
from test_adapters import MUSDB, save_umx_folder
from test_separate import cli

from core.errors import PipelineError
from separators.registry import load_separator

pytestmark = [pytest.mark.usefixtures("one_thread"), pytest.mark.filterwarnings("ignore::UserWarning")]

RATE = 22050
PLUGIN = "py:plugin_example:center_separator?n_fft=512&sharpness=2&name=center"


def test_plugin_loads_with_declared_sources_and_options():
    sep = load_separator(PLUGIN)
    assert (sep.name, sep.family, sep.sources, sep.sample_rate) == \
        ("center", "plugin", ("vocals", "instrumental"), 44100)
    x = torch.randn(2, 44100 * 12, generator=torch.Generator().manual_seed(0))   # > segment
    y = sep.separate(x)
    assert y.shape == (2, 2, x.shape[-1])
    assert torch.allclose(y.sum(0), x, atol=1e-5)        # vocals + instrumental = the mixture
    centred = torch.stack([x[0], x[0]])                   # a centre-panned signal is all vocals
    assert torch.allclose(sep.separate(centred)[0], centred, atol=1e-4)
    other = load_separator(PLUGIN.replace("sharpness=2", "sharpness=3"))
    assert other.identity() != sep.identity()             # the keywords are in the model key
    with pytest.raises(PipelineError, match="has no 'nope'"):
        load_separator("py:plugin_example:nope")
    with pytest.raises(PipelineError, match="cannot import"):
        load_separator("py:no_such_module:f")
    with pytest.raises(PipelineError, match="factory failed"):
        load_separator("py:plugin_example:center_separator?bogus=1")


def test_plugin_from_an_entry_point(tmp_path, monkeypatch):
    dist = tmp_path / "center_plugin-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: center-plugin\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text(
        "[pipeline.separators]\ncentre = plugin_example:center_separator\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    a, b = load_separator("entry:centre"), load_separator("centre")
    assert a.sources == b.sources == ("vocals", "instrumental")
    with pytest.raises(PipelineError, match="no 'pipeline.separators' entry point"):
        load_separator("entry:absent")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("twostem")
    ds = write_four_tracks(root / "ds", n=RATE, rate=RATE)
    umx = save_umx_folder(root / "models" / "umx4", MUSDB, seed=0)
    work = root / "work"
    assert cli("cache", "--dataset", ds, "-m", umx, "-m", PLUGIN, "--device", "cpu",
               "--niter", 0, "--offline", "--work", work) == 0
    return {"root": root, "ds": ds, "work": work}


def test_two_and_four_stem_models_are_blended_mixed_and_evaluated(env, tmp_path):
    from core.store import StemStore
    from mixer.inputs import InputSpec

    ds, work = env["ds"], env["work"]
    store = StemStore(work / "store")
    ds_id = store.datasets()[0]
    spec = InputSpec.from_store(store, ds_id, ["umx4", "center"])
    assert spec.model_sources == (tuple(MUSDB), ("vocals", "instrumental"))
    assert "center.instrumental.L" in spec.input_names() and spec.in_channels == 2 + 8 + 4

    assert cli("blend", "-m", "umx4", "-m", "center", "--dataset", ds, "--step", 0.25,
               "--split", "train", "--work", work) == 0
    blend = json.loads((work / "runs" / "blend" / "weights.json").read_text())
    weights = {m: dict(zip(blend["sources"], w)) for m, w in zip(blend["models"], blend["weights"])}
    assert weights["center"]["vocals"] is not None            # both models have vocals ...
    assert weights["umx4"]["vocals"] + weights["center"]["vocals"] == pytest.approx(1.0)
    assert [weights["center"][s] for s in ("drums", "bass", "other")] == [None] * 3
    assert [weights["umx4"][s] for s in ("drums", "bass", "other")] == [1.0] * 3   # ... only it

    assert cli("train-mixer", "-m", "umx4", "-m", "center", "--arch", "conv1x1", "--preset",
               "tiny", "--epochs", 1, "--shift", 1024, "--dataset", ds, "--device", "cpu",
               "--work", work) == 0
    out = tmp_path / "report"
    assert cli("evaluate", "--dataset", ds, "--split", "test", "--all-runs", "--out", out,
               "--work", work) == 0
    scores = pd.read_csv(out / "scores.csv")
    center = scores[scores["system"] == "center"]
    assert set(center["target"]) == {"vocals"}                # scored on what it outputs
    for system in ("blend", "conv1x1-tiny"):
        assert set(scores[scores["system"] == system]["target"]) == set(MUSDB)

    song = tmp_path / "song.wav"
    sf.write(song, (0.1 * np.random.default_rng(5).standard_normal((RATE, 2))).astype(np.float32),
             RATE, subtype="FLOAT")
    sep_out = tmp_path / "sep"
    assert cli("separate", song, "-e", "conv1x1-tiny", "-o", sep_out, "--device", "cpu",
               "--work", work) == 0
    assert sorted(p.stem for p in (sep_out / "song").iterdir()) == sorted(MUSDB)
    assert_separate_is_apply(work, work / "runs" / "conv1x1-tiny", song, sep_out)
    assert "plugin_example" in sys.modules
