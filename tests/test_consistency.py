"""Mixture consistency (mixer.consistency): the projections sum to the mixture, are idempotent and
leave consistent estimates alone; every method and mixer takes it, `pipeline separate` too, and
a dataset whose sources do not sum to its mixture is refused."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import run_cli, write_stem_track
from test_mixer import SOURCES, make_store

from core.errors import PipelineError
from mixer import consistency as mc
from mixer.stft import HOP


def _track(n=5 * HOP + 321, S=4, seed=0):
    rng = np.random.default_rng(seed)
    est = (0.2 * rng.standard_normal((S, 2, n))).astype(np.float32)
    mixture = (est.sum(0) + 0.1 * rng.standard_normal((2, n))).astype(np.float32)
    return est, mixture


@pytest.mark.parametrize("mode", ["equal", "energy"])
def test_projections_sum_to_the_mixture_are_idempotent_and_keep_consistent_estimates(mode, monkeypatch):
    est, mixture = _track()
    once = mc.project(est, mixture, mode)
    np.testing.assert_allclose(once.sum(0), mixture, atol=2e-6)
    np.testing.assert_allclose(mc.project(once, mixture, mode), once, atol=2e-6)
    consistent = est.copy()
    consistent[0] += mixture - est.sum(0)
    np.testing.assert_allclose(mc.project(consistent, mixture, mode), consistent, atol=2e-6)
    assert np.abs(once - est).max() > 0.01    # it did move the inconsistent estimates
    if mode == "energy":   # blocks of the whole track's frame grid: the block size is invisible
        import mixer.consistency

        monkeypatch.setattr(mixer.consistency, "BLOCK", 2 * HOP)
        np.testing.assert_allclose(mc.project(est, mixture, mode), once, atol=2e-6)


def test_energy_gives_the_residual_to_the_source_that_sounds():
    """In bins where one source is silent it gets nothing of the residual; equal shares it."""
    n = 8 * HOP
    t = np.arange(n) / 44100
    tone = np.stack([np.sin(2 * np.pi * 440 * t)] * 2).astype(np.float32)
    est = np.stack([tone, np.zeros_like(tone)])
    mixture = 1.2 * tone
    energy = mc.project(est, mixture, "energy")
    assert np.abs(energy[1]).max() < 1e-6 and np.allclose(energy[0], mixture, atol=1e-5)
    equal = mc.project(est, mixture, "equal")
    np.testing.assert_allclose(equal[1], 0.1 * tone, atol=1e-6)


@pytest.mark.parametrize("mode", ["equal", "energy"])
def test_the_training_projection_sums_to_the_mixture_and_passes_gradients(mode):
    rng = np.random.default_rng(1)
    y = torch.tensor(0.2 * rng.standard_normal((3, 4, 2, 4096)), dtype=torch.float32,
                     requires_grad=True)
    mixture = torch.tensor(0.5 * rng.standard_normal((3, 2, 4096)), dtype=torch.float32)
    out = mc.project_segments(y, mixture, mode)
    torch.testing.assert_close(out.sum(1), mixture, atol=2e-6, rtol=0)
    out.pow(2).sum().backward()
    assert y.grad is not None and torch.isfinite(y.grad).all() and y.grad.abs().max() > 0


def test_every_method_and_mixer_takes_it_and_separate_too(tmp_path, capsys):
    rng = np.random.default_rng(3)
    models = {f"m{i}": (SOURCES, np.eye(4) + 0.3 * rng.standard_normal((4, 4))) for i in range(2)}
    store = make_store(tmp_path / "work" / "store", models, splits=(("train", 2), ("valid", 1)),
                       length=4096)
    from mixer import methods

    assert all("consistency" in methods.get(m).options.__dataclass_fields__
               for m in methods.names())
    t = store.tracks("toy", "valid")[0]
    mixture = np.asarray(store.mixture("toy", t))
    stems = {k: store.stems(k, "toy", t) for k in models}
    for method, extra in (("median-spec", {}), ("blend", {"split": "train", "step": 0.5}),
                          ("conv1x1", {"preset": "tiny", "epochs": 1, "select": "last"})):
        run = tmp_path / method
        config = methods.fit(store, "toy", list(models), method, run,
                             {"consistency": "energy", **extra}, progress=False)
        assert config["consistency"] == "energy"
        assert config["consistency_check"]["sources_vs_mixture_db"] > 100   # the toy sums exactly
        est = methods.load_mixer(run)(mixture, stems)
        np.testing.assert_allclose(est.sum(0), mixture, atol=2e-5)
        plain = methods.load_mixer(run, consistency="none")(mixture, stems)
        assert np.abs(plain.sum(0) - mixture).max() > 1e-3
    # a run fitted without it, projected at separation time
    methods.fit(store, "toy", list(models), "avg-wave", tmp_path / "avg", {}, progress=False)
    assert json.loads((tmp_path / "avg" / "config.json").read_text())["options"] == \
        {"weights": None, "consistency": "none"}
    np.testing.assert_allclose(
        methods.load_mixer(tmp_path / "avg", consistency="equal")(mixture, stems).sum(0),
        mixture, atol=2e-6)


def test_a_dataset_whose_sources_leave_part_of_the_mixture_out_is_refused(tmp_path, capsys,
                                                                         monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))   # tests/tta_plugins.py
    ds = tmp_path / "ds"
    rng = np.random.default_rng(0)
    for i, subset in enumerate(["train", "train", "valid", "test"]):
        stems = write_stem_track(ds, subset, f"t{i}", sources=("vocals", "drums"), n=8000,
                                 rate=8000, seed=i, mixture=False)
        extra = 0.2 * rng.standard_normal(stems.shape[1:])   # a guitar nobody separated
        sf.write(ds / subset / f"t{i}" / "mixture.wav", (stems.sum(0) + extra).T, 8000,
                 subtype="FLOAT")
    work = tmp_path / "work"
    code, _, err = run_cli(["cache", "-d", ds, "-m", "py:tta_plugins:share", "--work", work], capsys)
    assert code == 0, err
    code, _, err = run_cli(["blend", "-m", "share", "-d", ds, "--method", "avg-wave",
                            "--consistency", "equal", "--work", work], capsys)
    assert code == 1 and "do not sum to its mixture" in err and len(err.splitlines()) == 1, err
    with pytest.raises(PipelineError, match="choose one of none, equal, energy"):
        mc.project(np.zeros((1, 2, 4)), np.zeros((2, 4)), "loud")
