"""train-base: our own Open-Unmix / X-UMX / Demucs separators, trained on the stem store.

Everything runs on a tiny synthetic dataset (8 kHz, 3 s tracks) with the `tiny` presets.
"""
import itertools
import json
import math

import numpy as np
import pytest
import torch

from cache.run import ingest_dataset
from core.errors import PipelineError
from core.store import StemStore
from separators.losses import (
    combinations,
    freq_domain_loss,
    multi_domain_loss,
    time_domain_loss,
    weighted_sdr,
)
from separators.train_base import build, resolve_config, train_base
from separators.train_data import NO_AUGMENT, FixedCrops, RandomMixes

# (family, train_base keyword arguments): the variants worth a training run each
VARIANTS = {"umx": ("umx", {}), "xumx": ("xumx", {}), "danna-sep": ("xumx", {"xumx_loss": "complex"}),
            "hdemucs": ("demucs", {}), "htdemucs": ("demucs", {"arch": "htdemucs"}),
            "bs-roformer": ("roformer", {}), "mel-roformer": ("roformer", {"arch": "mel_band_roformer"})}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from core.datasets import open_dataset
    from core.synth import generate_dataset

    root = tmp_path_factory.mktemp("synth") / "ds"
    generate_dataset(root, seed=3, n_train=2, n_valid=1, n_test=1, duration=3.0,
                     sample_rate=8000, progress=False)
    ds = open_dataset(root)
    store = StemStore(tmp_path_factory.mktemp("work") / "store")
    ingest_dataset(store, ds, progress=False)
    return store, ds.id


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)   # the tiny models gain nothing from threads on a shared machine
    yield
    torch.set_num_threads(n)


# ---- losses ------------------------------------------------------------------------------------
def _direct_wsdr(x, y, y_hat, eps=1e-10):
    """The paper's formula, one signal at a time, with explicit sums."""
    def cos(a, b):
        return float((a * b).sum()) / (math.sqrt(eps + float((a * a).sum()))
                                       * math.sqrt(eps + float((b * b).sum())) + eps)
    y_e, n_e = float((y * y).sum()), float(((x - y) ** 2).sum())
    rho = y_e / (y_e + n_e + eps)
    return rho * cos(y_hat, y) + (1 - rho) * cos(x - y_hat, x - y)


def _direct_multi_domain(spec_hat, spec_ref, time_hat, time_ref, mix, alpha, complex_spec):
    """L = mean over the 14 subsets of MSE(sum spec) + alpha * (1 - mean over subsets, examples
    and channels of wSDR(sum time)), with explicit loops."""
    subsets = [s for k in (1, 2, 3) for s in itertools.combinations(range(4), k)]
    assert len(subsets) == 14
    f_terms, t_terms = [], []
    for s in subsets:
        sh = sum(spec_hat[:, j] for j in s)
        sr = sum(spec_ref[:, j] for j in s)
        d = sh - sr
        f_terms.append(float((d.real ** 2 + d.imag ** 2).mean()) if complex_spec
                       else float((d ** 2).mean()))
        th = sum(time_hat[:, j] for j in s)
        tr = sum(time_ref[:, j] for j in s)
        for b in range(mix.shape[0]):
            for c in range(mix.shape[1]):
                t_terms.append(_direct_wsdr(mix[b, c], tr[b, c], th[b, c]))
    return sum(f_terms) / len(f_terms) + alpha * (1 - sum(t_terms) / len(t_terms))


@pytest.mark.parametrize("complex_spec", [False, True])
def test_multi_domain_and_combination_loss_match_direct_computation(complex_spec):
    g = torch.Generator().manual_seed(0)
    B, J, C, F, T, N = 2, 4, 2, 9, 5, 300
    if complex_spec:
        spec_hat = torch.randn(B, J, C, F, T, 2, generator=g, dtype=torch.float64)
        spec_ref = torch.randn(B, J, C, F, T, 2, generator=g, dtype=torch.float64)
        spec_hat, spec_ref = torch.view_as_complex(spec_hat), torch.view_as_complex(spec_ref)
    else:
        spec_hat = torch.rand(B, J, C, F, T, generator=g, dtype=torch.float64)
        spec_ref = torch.rand(B, J, C, F, T, generator=g, dtype=torch.float64)
    time_ref = torch.randn(B, J, C, N, generator=g, dtype=torch.float64) * torch.tensor(
        [1.0, 0.3, 0.1, 2.0], dtype=torch.float64)[:, None, None]
    mix = time_ref.sum(1)
    time_hat = time_ref + 0.5 * torch.randn(B, J, C, N, generator=g, dtype=torch.float64)

    got = multi_domain_loss(spec_hat, spec_ref, time_hat, time_ref, mix, alpha=10.0)
    want = _direct_multi_domain(spec_hat, spec_ref, time_hat, time_ref, mix, 10.0, complex_spec)
    assert float(got) == pytest.approx(want, rel=1e-9)

    # the parts, and without the combination scheme (the 4 targets only)
    assert len(combinations(4)) == 14 and len(combinations(4, combine=False)) == 4
    single = float(freq_domain_loss(spec_hat, spec_ref, combine=False))
    d = spec_hat - spec_ref
    assert single == pytest.approx(float((d.abs() ** 2).mean()), rel=1e-9)
    w = np.mean([_direct_wsdr(mix[b, c], time_ref[b, j, c], time_hat[b, j, c])
                 for b in range(B) for j in range(J) for c in range(C)])
    assert float(time_domain_loss(mix, time_hat, time_ref, combine=False)) == pytest.approx(1 - w, rel=1e-9)


def test_weighted_sdr_bounds():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(3, 2, 500, generator=g)
    x = y + torch.randn(3, 2, 500, generator=g)
    assert torch.allclose(weighted_sdr(y, y, x), torch.ones(3, 2), atol=1e-5)      # perfect
    assert torch.allclose(weighted_sdr(-y, y, 0 * x), -torch.ones(3, 2), atol=1e-5)  # inverted
    noisy = weighted_sdr(y + 0.5 * torch.randn(3, 2, 500, generator=g), y, x)
    w = weighted_sdr(torch.randn(3, 2, 500, generator=g), y, x)
    assert bool(((w >= -1) & (w <= 1)).all()) and bool((noisy > w).all())


# ---- data --------------------------------------------------------------------------------------
def test_random_mixes_are_reproducible_and_sum_to_the_mixture(tiny):
    store, ds = tiny
    data = RandomMixes(store, ds, targets=["vocals", "bass"], segment=4000, length=6, rest=True)
    torch.manual_seed(7)
    a = [data[i] for i in range(6)]
    torch.manual_seed(7)
    b = [data[i] for i in reversed(range(6))][::-1]   # order of loading does not matter
    for (m1, r1), (m2, r2) in zip(a, b):
        assert torch.equal(m1, m2) and torch.equal(r1, r2)
        assert r1.shape == (3, 2, 4000)   # vocals, bass, rest
        assert torch.allclose(r1.sum(0), m1, atol=1e-6)
    torch.manual_seed(8)
    assert not torch.equal(data[0][0], a[0][0])        # another epoch, other examples

    plain = RandomMixes(store, ds, segment=4000, length=2, augment=NO_AUGMENT)
    mix, refs = plain[0]
    assert refs.shape == (4, 2, 4000) and torch.allclose(refs.sum(0), mix, atol=1e-6)

    valid = FixedCrops(store, ds, segment=8000, split="valid")
    assert len(valid) == 3 and valid[2][0].shape == (2, 8000)   # 3 s track -> 3 crops of 1 s


# ---- training ----------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["umx", "xumx", "danna-sep", "hdemucs", "bs-roformer"])
def test_loss_decreases_on_a_fixed_batch(tiny, variant):
    store, ds = tiny
    family, kw = VARIANTS[variant]
    opts = {"loss": kw["xumx_loss"]} if "xumx_loss" in kw else None
    cfg = resolve_config(family, "tiny", sample_rate=8000, n_train_tracks=2,
                         targets=["drums", "bass", "other", "vocals"], model_options=opts)
    cfg["seed"] = 0
    data = RandomMixes(store, ds, segment=cfg["train"]["segment_samples"], length=4,
                       augment=NO_AUGMENT, rest=family == "xumx")
    torch.manual_seed(0)
    mix, refs = (torch.stack(x) for x in zip(*[data[i] for i in range(4)]))
    net, loss_fn, _ = build(cfg, None)
    opt = torch.optim.Adam(net.parameters(), lr={"demucs": 3e-2}.get(family, 1e-2))
    losses = []
    for _ in range(12):
        loss = loss_fn(net(mix), refs)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(math.isfinite(v) for v in losses)
    # the waveform model starts from near-silent outputs and moves more slowly than the maskers
    assert max(losses[-3:]) < {"demucs": 0.9}.get(family, 0.8) * losses[0], losses


@pytest.mark.parametrize("variant", ["umx", "xumx", "hdemucs", "htdemucs", "bs-roformer",
                                     "mel-roformer"])
def test_train_save_reload_separate(tiny, tmp_path, variant):
    from separators.registry import load_separator

    store, ds = tiny
    family, kw = VARIANTS[variant]
    run = tmp_path / variant
    res = train_base(store, ds, family, "tiny", run, seed=1, progress=False,
                     command=f"pipeline train-base {family} --preset tiny", **kw)
    model = run / "model"
    assert res.model_dir == model and res.best_epoch in (1, 2)
    assert (run / "metrics.csv").read_text().count("\n") == 3     # header + 2 epochs
    card = (model / "MODEL.md").read_text()
    assert f"pipeline train-base {family} --preset tiny" in card and ds in card
    assert '"preset": "tiny"' in card and "Test-split SDR" in card

    # the family's own loader reads the exported format
    if family == "umx":
        from openunmix.utils import load_separator as umx_load

        names = {p.name for p in model.iterdir()}
        assert {"separator.json", "vocals.json", "vocals.pth", "drums.pth"} <= names
        args = json.loads((model / "vocals.json").read_text())["args"]
        assert args["nfft"] == 512 and args["hidden_size"] == 16 and args["nb_channels"] == 2
        sep = umx_load(model_str_or_path=str(model), targets=["vocals", "bass"], niter=1,
                       pretrained=True)
        assert sep(torch.zeros(1, 2, 4000)).shape == (1, 2, 2, 4000)
    elif family == "xumx":
        pkg = torch.load(model / "xumx.pth", weights_only=False)
        assert pkg["model_name"] == "XUMX" and pkg["model_args"]["sample_rate"] == 8000
        assert pkg["model_args"]["sources"] == ["drums", "bass", "other", "vocals"]
    elif family == "roformer":   # MSST's own inference reads the exported pair
        import msst

        assert {p.name for p in model.iterdir()} == {"config.yaml", "model.ckpt", "MODEL.md"}
        arch = kw.get("arch", "bs_roformer")
        up = msst.Separator(config_path=model / "config.yaml", checkpoint_path=model / "model.ckpt",
                            model_type=arch, force_cpu=True, detailed_progress=False)
        assert up.instruments == ("drums", "bass", "other", "vocals") and up.sample_rate == 8000
        assert set(torch.load(model / "model.ckpt")) == set(up._model.state_dict())
    else:
        from demucs.pretrained import get_model

        (th,) = model.glob("*.th")
        m = get_model(th.stem.split("-")[0], repo=model)
        assert m.sources == ["drums", "bass", "other", "vocals"] and m.samplerate == 8000
        assert type(m).__name__ == {"hdemucs": "HDemucs", "htdemucs": "HTDemucs"}[variant]

    # ... and so does the registry, which separates with it
    sep = load_separator(str(model), offline=True)
    assert tuple(sep.sources) == ("drums", "bass", "other", "vocals") and sep.sample_rate == 8000
    assert sep.name == variant   # the run's name, not 'model' or a demucs signature
    track = store.tracks(ds, "test")[0]
    mix = torch.from_numpy(np.array(store.mixture(ds, track)))
    with torch.no_grad():
        out = sep.separate(mix)
    assert out.shape == (4, 2, track.length) and bool(torch.isfinite(out).all())


def _model_state(run):
    return torch.load(run / "last.pt", weights_only=True)["model"]


def test_resume_after_interruption_gives_the_same_weights(tiny, tmp_path, monkeypatch):
    store, ds = tiny
    kw = dict(seed=4, epochs=3, progress=False)
    whole = train_base(store, ds, "umx", "tiny", tmp_path / "whole", **kw)

    calls = {"n": 0}
    original = RandomMixes.__getitem__

    def interrupted(self, i):
        calls["n"] += 1
        if calls["n"] > 12:          # epoch 1 (8 items) done, killed during epoch 2
            raise KeyboardInterrupt
        return original(self, i)

    monkeypatch.setattr(RandomMixes, "__getitem__", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_base(store, ds, "umx", "tiny", tmp_path / "resumed", **kw)
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=True)["epoch"] == 1
    monkeypatch.setattr(RandomMixes, "__getitem__", original)
    resumed = train_base(store, ds, "umx", "tiny", tmp_path / "resumed", **kw)

    a, b = _model_state(tmp_path / "whole"), _model_state(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["train_loss"] for r in whole.metrics] == [r["train_loss"] for r in resumed.metrics]
    for p in (tmp_path / "whole" / "model").glob("*.pth"):
        x = torch.load(p, weights_only=True)
        y = torch.load(tmp_path / "resumed" / "model" / p.name, weights_only=True)
        assert all(torch.equal(x[k], y[k]) for k in x)

    # a finished run resumed with other settings is refused, not silently mixed
    with pytest.raises(PipelineError, match="different configuration.*train.lr"):
        train_base(store, ds, "umx", "tiny", tmp_path / "resumed", lr=0.5, **kw)


def test_warmup_ramps_the_rate_linearly_then_follows_the_schedule_and_resumes_alike(tmp_path):
    from torch.utils.data import TensorDataset

    from core.training import cosine_schedule, train

    def run(run_dir, epochs, seen):
        class Recording(torch.optim.SGD):
            def step(self, closure=None):
                seen.append(self.param_groups[0]["lr"])
                return super().step(closure)

        torch.manual_seed(0)
        data = TensorDataset(torch.randn(8, 3), torch.randn(8, 1))
        return train(torch.nn.Linear(3, 1), torch.nn.functional.mse_loss, data, None,
                     lambda p: Recording(p, lr=0.1), epochs=epochs, batch_size=2, seed=0,
                     run_dir=run_dir, device="cpu", make_scheduler=cosine_schedule(3),
                     warmup_steps=6, progress=False)

    whole = []
    result = run(tmp_path / "whole", 3, whole)
    sched = [r["lr"] for r in result.metrics]          # 4 steps per epoch
    assert sched[0] == pytest.approx(0.1) and sched[2] < sched[1] < sched[0]
    want = ([sched[0] * k / 6 for k in (1, 2, 3, 4)] + [sched[1] * k / 6 for k in (5, 6)]
            + [sched[1]] * 2 + [sched[2]] * 4)
    assert whole == pytest.approx(want)
    part = []
    run(tmp_path / "resumed", 1, part)
    run(tmp_path / "resumed", 3, part)
    assert part == pytest.approx(whole)


def test_warmup_steps_is_a_train_option_recorded_only_when_set(tiny, tmp_path):
    store, ds = tiny
    kw = dict(seed=4, epochs=1, progress=False)
    warm = train_base(store, ds, "umx", "tiny", tmp_path / "warm",
                      train_options={"warmup_steps": 3}, **kw)
    plain = train_base(store, ds, "umx", "tiny", tmp_path / "plain",
                       train_options={"warmup_steps": 0}, **kw)
    assert warm.config["train"]["warmup_steps"] == 3
    assert "warmup_steps" not in plain.config["train"]     # older runs' configurations hold
    a = torch.load(tmp_path / "warm" / "best.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "plain" / "best.pt", weights_only=True)["model"]
    assert any(not torch.equal(a[k], b[k]) for k in a)     # the warm-up changed the steps


def test_bad_requests_are_one_line_errors(tiny, tmp_path):
    store, ds = tiny
    with pytest.raises(PipelineError, match="family 'wavenet'"):
        train_base(store, ds, "wavenet", "tiny", tmp_path)
    with pytest.raises(PipelineError, match="no source.*piano"):
        train_base(store, ds, "umx", "tiny", tmp_path, targets=["piano"])
    with pytest.raises(PipelineError, match="preset 'huge'"):
        train_base(store, ds, "demucs", "huge", tmp_path)
    with pytest.raises(PipelineError, match="not in the store"):
        train_base(store, "nope", "umx", "tiny", tmp_path)


def test_select_split_trains_on_fit_and_never_reads_valid(tiny, tmp_path, monkeypatch):
    """--select-split select: the best epoch is picked on a fixed slice of train, the rest of
    train trains, and no valid track is ever read (its audio never leaves the store)."""
    store, ds_id = tiny
    valid = {t.id for t in store.tracks(ds_id, "valid")}
    read = []
    orig = StemStore._track_audio

    def spy(self, dataset_id, track):
        read.append(track.id if hasattr(track, "id") else track)
        return orig(self, dataset_id, track)

    monkeypatch.setattr(StemStore, "_track_audio", spy)
    res = train_base(store, ds_id, "umx", "tiny", tmp_path / "run", select_split="select",
                     device="cpu", progress=False)
    splits = res.config["splits"]
    assert splits["fit"] == "fit" and splits["select"] == "select"
    assert splits["select_tracks"] == [t.name for t in store.tracks(ds_id, "select")]
    assert read and not valid & set(read)
    assert set(read) == {t.id for t in store.tracks(ds_id, "train")}
    with pytest.raises(PipelineError, match="select split 'bogus'"):
        train_base(store, ds_id, "umx", "tiny", tmp_path / "run2", select_split="bogus",
                   device="cpu", progress=False)
