"""A method, a mixer architecture and a base-model family are each one record, registered in one
place; the command line, experiment files, the evaluation and `pipeline separate` find them there.

Each toy below is registered once (a `registered(...)` block) and then used only through the
command line: its name and its option appear in `--help`, an experiment file names it and sets
its option, the evaluation scores it, and `pipeline separate` applies it to a new file - with
the numbers each toy must give, computed here by hand.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import run_cli, write_four_tracks

from core.options import option
from mixer import methods
from mixer.ensemble import FitRequest, Method, Mixer, run_config
from mixer.inputs import InputSpec
from mixer.models import ARCHS, Arch
from separators.base import Separator
from separators.families import FAMILIES, Family, Request, pick

RATE = 8000
SOURCES = ("drums", "bass", "other", "vocals")


# ---- a toy family: every source is the mixture times a share (an option) ---------------------
@dataclass(frozen=True)
class ShareOptions:
    share: float = option(0.25, "the part of the mixture each source gets")


class ShareSeparator(Separator):
    family = "toy-share"
    sample_rate = RATE
    sources = SOURCES

    def __init__(self, name: str, share: float):
        self.name, self.share = name, share

    def options(self) -> dict:
        return {"share": self.share}

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        return self.share * mixture.float()[None].repeat(len(SOURCES), 1, 1)


def _load_share(r: Request) -> ShareSeparator:
    return ShareSeparator(r.spec.partition(":")[2] or "share",
                          **pick(ShareOptions, r.options, "toy-share options"))


TOY_FAMILY = Family(name="toy-share", summary="toy:NAME, each source a share of the mixture",
                    load=_load_share, options=ShareOptions, owns=lambda s: s.startswith("toy:"))


# ---- a toy method: one model's stems times a gain ------------------------------------------
@dataclass(frozen=True)
class GainOptions:
    gain: float = option(1.0, "the factor applied to the first model's stems")


class GainMixer(Mixer):
    def estimate(self, mixture, stems_by_key):
        key = self.spec.model_keys[0]
        return (self.config["options"]["gain"] * np.asarray(stems_by_key[key], np.float32))


def _fit_gain(r: FitRequest) -> dict:
    spec = InputSpec.from_store(r.store, r.dataset_id, r.models, with_mixture=False)
    config = run_config("toy-gain", spec, r.dataset_id, r.options,
                        rate=r.store.dataset_info(r.dataset_id)["sample_rate"])
    if r.run_dir is not None:
        r.run_dir.mkdir(parents=True, exist_ok=True)
        (r.run_dir / "config.json").write_text(json.dumps(config))
    return config


TOY_METHOD = Method(name="toy-gain", summary="the first model's stems times a gain",
                    options=GainOptions, fit=_fit_gain,
                    load=lambda config, run_dir, **_: GainMixer(config, run_dir))


# ---- a toy mixer architecture: one learned scale of the models' average ---------------------
@dataclass(frozen=True)
class ScaleOptions:
    scale_init: float = option(0.5, "the scale the mixer starts from")


class ScaleMixer(torch.nn.Module):
    def __init__(self, start: torch.Tensor, scale: float):
        super().__init__()
        self.register_buffer("average", start)
        self.scale = torch.nn.Parameter(torch.tensor(float(scale)))

    def mixing_weights(self, x):
        return (self.scale * self.average).expand(x.shape[0], -1, -1)

    def forward(self, x):
        return torch.bmm(self.mixing_weights(x).transpose(1, 2), x)


TOY_ARCH = Arch(name="toy-scale", summary="a learned scale of the models' average",
                options=ScaleOptions, default_epochs=1, time_varying=False,
                build=lambda i, o, hyper, start: ScaleMixer(start, hyper["scale_init"]),
                hyper=lambda T, o, init: {"T": T, "init": init, "scale_init": o.scale_init})


@pytest.fixture
def toys():
    with FAMILIES.registered(TOY_FAMILY), methods.METHODS.registered(TOY_METHOD), \
            ARCHS.registered(TOY_ARCH):
        yield
    assert "toy-gain" not in methods.names() and "toy-share" not in FAMILIES.names()


def test_toys_appear_in_the_help(toys, capsys):
    code, out, _ = run_cli(["blend", "--help"], capsys)
    assert code == 0 and "toy-gain" in out and "--gain" in out
    code, out, _ = run_cli(["train-mixer", "--help"], capsys)
    assert code == 0 and "toy-scale" in out and "--scale-init" in out
    code, out, _ = run_cli(["cache", "--help"], capsys)
    assert code == 0 and "toy-share" in out and "--share" in out


def test_toys_run_through_an_experiment_evaluate_and_separate(toys, tmp_path, capsys):
    ds = write_four_tracks(tmp_path / "ds", n=2 * RATE, rate=RATE)
    work = tmp_path / "work"
    experiment = tmp_path / "toys.toml"
    experiment.write_text(f'''name = "toys"
[dataset]
path = "{ds}"
[[models]]
spec = "toy:quarter"
[[models]]
spec = "toy:half"
name = "half"
share = 0.5
[[systems]]
name = "gain"
method = "toy-gain"
models = ["half"]
gain = 0.25
[[systems]]
name = "scale"
method = "toy-scale"
scale_init = 0.8
T = 1024
epochs = 1
batch = 2
select = "last"
[evaluate]
split = "test"
selection_split = "valid"
''')
    code, out, err = run_cli(["run", experiment, "--work", work], capsys)
    assert code == 0, err
    # the family's option reached its model: two models, two keys
    keys = {json.loads(p.read_text())["name"]: json.loads(p.read_text())["identity"]["options"]
            for p in (work / "store" / "models").glob("*/model.json")}
    assert keys == {"quarter": {"share": 0.25}, "half": {"share": 0.5}}
    # the evaluation scored both toys; the toy method's estimate is exactly 0.25 x 0.5 x mixture
    summary = (work / "reports" / "toys" / "summary.md").read_text()
    assert "| gain |" in summary and "| scale |" in summary
    gain = json.loads((work / "runs" / "toys-gain" / "config.json").read_text())
    assert gain["method"] == "toy-gain" and gain["options"] == {"gain": 0.25, "consistency": "none"}
    scale = json.loads((work / "runs" / "toys-scale" / "config.json").read_text())
    assert scale["method"] == "toy-scale" and scale["hyper"]["scale_init"] == 0.8

    # separate a new file with both runs: the toy family is loaded again from its spec
    song = tmp_path / "song.wav"
    audio = (0.1 * np.random.default_rng(5).standard_normal((2, 3000))).astype(np.float32)
    sf.write(song, audio.T, RATE, subtype="FLOAT")
    for run in ("toys-gain", "toys-scale"):
        code, _, err = run_cli(["separate", song, "-e", run, "-o", tmp_path / run, "--work", work],
                               capsys)
        assert code == 0, err
    vocals, _ = sf.read(tmp_path / "toys-gain" / "song" / "vocals.wav", always_2d=True)
    # the stems are stored in float16: 0.5 x the mixture rounded, then x 0.25
    want = 0.25 * (0.5 * audio).astype(np.float16).astype(np.float32)
    np.testing.assert_allclose(vocals.T, want, atol=1e-7)
    scaled, _ = sf.read(tmp_path / "toys-scale" / "song" / "vocals.wav", always_2d=True)
    assert np.isfinite(scaled).all() and np.abs(scaled).max() > 0


def test_a_toy_option_is_refused_where_it_does_not_belong(toys, tmp_path, capsys):
    ds = write_four_tracks(tmp_path / "ds", n=RATE, rate=RATE)
    work = tmp_path / "work"
    assert run_cli(["cache", "-d", ds, "-m", "toy:q", "--work", work], capsys)[0] == 0
    code, _, err = run_cli(["blend", "-m", "q", "-d", ds, "--method", "median-wave", "--gain", "2",
                            "--work", work], capsys)
    assert code == 1 and "median-wave' takes no gain" in err
    code, _, err = run_cli(["blend", "-m", "q", "-d", ds, "--method", "toy-gain", "--gain", "x",
                            "--work", work], capsys)
    assert code == 2 and "Invalid value for '--gain'" in err and len(err.splitlines()) == 1
