"""Known-answer tests for the mixers: blend search, conv1x1 / MDX-Mixer, training loop, apply."""
import csv
import itertools
import json

import numpy as np
import pytest
import torch

from core.metrics import framewise_sdr, median_over_tracks, track_median, usdr
from core.store import StemStore, TrackEntry, write_json_atomic
from mixer.apply import apply_run, export_weights
from mixer.blend import apply_blend, collect_stats, search_blend
from mixer.blendsearch import search
from mixer.inputs import (
    InputSpec,
    NormalisedInputs,
    assemble_inputs,
    mixture_stats,
    normalise,
)
from mixer.learned import MIXER
from mixer.models import PRESETS, Conv1x1Mixer, MDXMixer, fold, unfold
from mixer.simplex import simplex_grid
from mixer.train import mixer_config, train_mixer

SOURCES = ("drums", "bass", "other", "vocals")


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # These tensors are tiny: on a busy 2-core machine a second intra-op thread only adds
    # contention (several times slower per step).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---- a toy stem store ------------------------------------------------------------------------
def make_store(root, models, *, splits=(("train", 3), ("valid", 1), ("test", 1)), length=8192,
               rate=1000, noise=1e-3, seed=0, edit=None):
    """Noise-like references; model m's stems = A_m @ references + noise.

    models: {key: (sources, A [S_m, S])}. edit(split, i, refs, stems) may change arrays in place.
    """
    rng = np.random.default_rng(seed)
    store = StemStore(root)
    tracks = [TrackEntry(f"{split}{i}", "test" if split == "test" else "train", split, length)
              for split, count in splits for i in range(count)]
    store.write_dataset_info("toy", {"id": "toy", "sources": list(SOURCES), "sample_rate": rate,
                                     "tracks": [{"name": t.name, "subset": t.subset, "split": t.split,
                                                 "length": t.length} for t in tracks]})
    for key, (sources, _) in models.items():
        store.write_model_info(key, {"key": key, "name": key, "sources": list(sources)})
    for t in tracks:
        refs = (0.1 * rng.standard_normal((len(SOURCES), 2, length))).astype(np.float32)
        stems = {k: np.einsum("ms,scn->mcn", A, refs) + noise * rng.standard_normal((len(s), 2, length))
                 for k, (s, A) in models.items()}
        if edit:
            edit(t.split, int(t.name[-1]), refs, stems)
        store.write_track("toy", t, refs.sum(0), refs, {})
        for k, x in stems.items():
            store.write_stems(k, "toy", t, x, {})
    return store


def sdr(ref, est):
    return 10 * np.log10(np.sum(ref.astype(np.float64) ** 2) / np.sum((ref - est.astype(np.float64)) ** 2))


# ---- models ----------------------------------------------------------------------------------
def test_fold_layout_and_roundtrip():
    x = torch.randn(2, 3, 64)
    z = fold(x, 8)
    assert z.shape == (2, 8, 24)
    for t, c, f in [(0, 0, 0), (3, 2, 5), (7, 1, 7)]:
        assert z[1, t, c * 8 + f] == x[1, c, t * 8 + f]
    assert torch.equal(unfold(z, 3), x)


def test_paper_preset_shapes():
    # 3 four-source models (C = 24) + mixture: in = 26 channels, out = 4 stereo sources.
    # Built on the meta device (no memory for its 245 M parameters). A meta forward would work
    # too, but the first meta-kernel call costs 10-15 s of one-time setup, so the layers are
    # checked by their sizes and the head, materialised alone on the CPU, by a forward of Z.
    with torch.device("meta"):
        m = MDXMixer(26, 8, **PRESETS["paper"])
    z = fold(torch.zeros(1, 26, 2 ** 18), 2 ** 7)
    assert z.shape == (1, 2048, 3328)
    assert len(m.layers) == 8
    for layer in m.layers:
        assert [l.in_features for l in (layer.tokens[0], layer.tokens[3])] == [2048, 2048]
        assert [l.in_features for l in (layer.channels[0], layer.channels[3])] == [3328, 3328]
        assert layer.norm_tokens.normalized_shape == (3328,)
    for name, param in m.head.named_parameters():   # (to_empty() would cost seconds of imports)
        setattr(m.head, name, torch.nn.Parameter(torch.zeros(param.shape)))
    w = m.head(z.mean(dim=1)).view(1, 26, 8)   # W_k = FC(GAP(Z)), as in mixing_weights
    assert w.shape == (1, 26, 8)


def test_conv1x1_is_a_plain_matrix():
    m = Conv1x1Mixer(5, 3)
    x = torch.randn(2, 5, 100)
    assert torch.allclose(m(x), torch.einsum("bit,io->bot", x, m.weight), atol=1e-6)
    assert m.mixing_weights(x).shape == (2, 5, 3)


def test_channel_names():
    spec = InputSpec(("k1", "k2", "k3"), ("umx", "demucs", "xumx"), (SOURCES,) * 3, SOURCES, True)
    names = spec.input_names()
    assert (spec.in_channels, spec.out_channels, len(names)) == (26, 8, 26)
    assert names[:4] == ["mixture.L", "mixture.R", "umx.drums.L", "umx.drums.R"]
    assert "umx.vocals.R" in names and names[-1] == "xumx.vocals.R"
    assert spec.output_names() == [f"{s}.{c}" for s in SOURCES for c in "LR"]
    assert InputSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec


# ---- apply: identity mixing through overlap-add ----------------------------------------------
def _identity_run(tmp_path, arch):
    """A run folder whose mixer outputs model 'm0''s stems unchanged (inputs 2.. -> outputs)."""
    spec = InputSpec(("m0",), ("m0",), (SOURCES,), SOURCES, True)
    T, F, N = PRESETS["tiny"].values()
    hyper = {"T": T, "F": F, "N": N, "p": 0.0, "init": "average"}
    config = mixer_config(spec, "toy", arch, hyper=hyper, epochs=1, batch=1, lr=0.0, shift=T,
                          seed=0, max_segments_per_epoch=None)
    select = torch.zeros(spec.in_channels, spec.out_channels)
    select[2:, :] = torch.eye(8)
    if arch == "conv1x1":
        module = Conv1x1Mixer(10, 8)
        module.weight.data.copy_(select)
    else:  # an MDX-Mixer forced to a constant W_k: zero head weights, W in the bias
        module = MDXMixer(10, 8, T=T, F=F, N=N)
        module.head.weight.data.zero_()
        module.head.bias.data.copy_(select.reshape(-1))
    run = tmp_path / arch
    write_json_atomic(run / "config.json", config)
    torch.save(module.state_dict(), run / MIXER)
    return run


@pytest.mark.parametrize("arch", ["conv1x1", "mdx-mixer"])
@pytest.mark.parametrize("n", [300, 3 * 1024 + 77])
def test_identity_mixing_reproduces_input(tmp_path, arch, n):
    run = _identity_run(tmp_path, arch)
    rng = np.random.default_rng(n)
    stems = (0.3 * rng.standard_normal((4, 2, n)) + 0.05).astype(np.float32)   # not zero-mean
    mixture = stems.sum(0)
    out = apply_run(run, mixture, {"m0": stems}, batch=2)
    assert out.shape == (4, 2, n) and out.dtype == np.float32
    np.testing.assert_allclose(out, stems, atol=2e-6, rtol=1e-5)


def test_lazy_inputs_equal_the_assembled_array(tmp_path):
    """The mixer reads X a segment at a time from float16 memmaps; every slice must be the same
    numbers as normalising the whole assembled array, and so must the mixer's output."""
    n = 5000
    spec = InputSpec(("a", "b"), ("a", "b"), (SOURCES, SOURCES[:2]), SOURCES, True)
    rng = np.random.default_rng(1)
    mixture = (0.3 * rng.standard_normal((2, n)) + 0.02).astype(np.float32)
    stems = {}
    for key, srcs in zip(spec.model_keys, spec.model_sources):
        mm = np.lib.format.open_memmap(tmp_path / f"{key}.npy", "w+", np.float16, (len(srcs), 2, n))
        mm[:] = 0.2 * rng.standard_normal(mm.shape)
        mm.flush()
        stems[key] = np.load(tmp_path / f"{key}.npy", mmap_mode="r")
    stats = mixture_stats(mixture)
    eager = normalise(assemble_inputs(spec, mixture, stems), stats)
    lazy = NormalisedInputs(spec, mixture, stems, stats)
    assert lazy.shape == eager.shape == (spec.in_channels, n)
    for a, b in [(0, n), (0, 1), (123, 4567), (4999, 5000), (4000, 9000), (10, 10)]:
        np.testing.assert_array_equal(lazy[..., a:b], eager[..., a:b])
    np.testing.assert_array_equal(np.asarray(lazy), eager)
    with pytest.raises(TypeError):
        lazy[0]

    # an untrained (random) MDX-Mixer through Mixer == overlap-add over the eager tensor
    from core.chunking import overlap_add
    from mixer.methods import load_mixer
    T, F, N = PRESETS["tiny"].values()
    config = mixer_config(spec, "toy", "mdx-mixer", hyper={"T": T, "F": F, "N": N, "p": 0.0,
                                                           "init": "random"},
                          epochs=1, batch=1, lr=0.0, shift=T, seed=0, max_segments_per_epoch=None)
    torch.manual_seed(0)
    module = MDXMixer(spec.in_channels, spec.out_channels, T=T, F=F, N=N).eval()
    run = tmp_path / "run"
    write_json_atomic(run / "config.json", config)
    torch.save(module.state_dict(), run / MIXER)
    with torch.no_grad():
        want = overlap_add(module, torch.from_numpy(eager), T, hop=T // 4, batch=3)
    want = (want * stats[1] + stats[0]).reshape(len(SOURCES), 2, n).numpy()
    got = load_mixer(run, batch=3)(mixture, stems)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(got).max() > 0.01


# ---- blend search vs brute force -------------------------------------------------------------
def _blend_store(tmp_path):
    """Three models (m2 lacks 'other'), estimates = reference + noise of per-model levels, and
    the corner cases of museval's silence rule on the valid tracks."""
    rng = np.random.default_rng(1)
    # m2's vocals are so much better that the blend takes them alone, silent frames included:
    # those frames then drop out of every source's score and the search needs a second round.
    levels = {"m0": [0.05, 0.08, 0.06, 0.2], "m1": [0.07, 0.05, 0.06, 0.2], "m2": [0.09, 0.07, 0.01]}
    srcs = {"m0": SOURCES, "m1": SOURCES, "m2": ("drums", "bass", "vocals")}

    def edit(split, i, refs, stems):
        for k, x in stems.items():
            idx = [SOURCES.index(s) for s in srcs[k]]
            x[:] = refs[idx] + np.array(levels[k])[:, None, None] * rng.standard_normal(x.shape)
        # Every track is affected (a median over three tracks would hide a change in one).
        f = lambda frame: slice(1000 * frame, 1000 * (frame + 1))   # noqa: E731
        refs[1, :, f(i)] = 0                               # silent bass reference
        stems["m2"][2, :, 1000 * (2 + i):1000 * (4 + i)] = 0   # m2's vocals silent for 2 frames
        x = stems["m1"][0, :, f(5 - i)]                    # m1's drums L == -R: museval-silent
        x[1] = -x[0]

    models = {k: (srcs[k], np.eye(len(SOURCES))[[SOURCES.index(s) for s in srcs[k]]]) for k in srcs}
    return make_store(tmp_path / "store", models, splits=(("valid", 3),), length=6500, edit=edit), srcs


def _brute_force(store, srcs, weights, objective):
    """For each source, every grid point (step 0.1) rendered with apply_blend and scored with
    core.metrics, the other sources at `weights`: {source: {weights in tenths: value}}."""
    tracks = store.tracks("toy", "valid")
    data = [(np.asarray(store.references("toy", t)), {k: np.asarray(store.stems(k, "toy", t)) for k in srcs})
            for t in tracks]

    def value(w_all, j):
        per_track = []
        for refs, stems in data:
            est = apply_blend(w_all, stems, srcs, SOURCES)
            per_track.append(track_median(framewise_sdr(refs, est, 1000, 1000)[j])
                             if objective == "museval" else usdr(refs, est)[j])
        return median_over_tracks(per_track) if objective == "museval" else np.mean(per_track)

    out = {}
    for j, s in enumerate(SOURCES):
        keys = [k for k in srcs if s in srcs[k]]
        grid = [c for c in itertools.product(range(11), repeat=len(keys)) if sum(c) == 10]
        out[s] = {c: value({**weights, s: {k: x / 10 for k, x in zip(keys, c)}}, j) for c in grid}
    return out


@pytest.mark.parametrize("objective", ["museval", "usdr"])
def test_blend_search_matches_brute_force(tmp_path, objective):
    store, srcs = _blend_store(tmp_path)
    config = search_blend(store, "toy", list(srcs), step=0.1, objective=objective,
                          run_dir=tmp_path / "run")
    weights = config["weights"]
    for s in SOURCES:
        assert abs(sum(weights[s].values()) - 1) < 1e-9 and min(weights[s].values()) >= 0
    assert set(weights["other"]) == {"m0", "m1"}

    # Every grid point scored from inner products == rendered and scored by core.metrics,
    # including the vertices at which museval's silence rule removes frames.
    brute = _brute_force(store, srcs, weights, objective)
    spec = InputSpec.from_store(store, "toy", list(srcs), with_mixture=False)
    data = [(store.references("toy", t), [store.stems(k, "toy", t) for k in srcs])
            for t in store.tracks("toy", "valid")]
    found = search(collect_stats(data, spec, 1000), 0.1, objective)
    if objective == "museval":   # (uSDR counts m2's silent frames against it: it mixes)
        assert weights["vocals"] == {"m0": 0.0, "m1": 0.0, "m2": 1.0}
    assert config["search"]["rounds"] == (2 if objective == "museval" else 1)
    assert config["search"]["converged"] and config["options"]["search"] == "auto"
    assert {s["mode"] for s in config["search"]["sources"].values()} == {"exhaustive"}
    for j, s in enumerate(SOURCES):
        mine = {tuple(np.round(w * 10).astype(int)): v for w, v in zip(found.grids[j], found.values[j])}
        assert mine.keys() == brute[s].keys()
        np.testing.assert_allclose([mine[c] for c in brute[s]], list(brute[s].values()), atol=1e-5)
        best = max(brute[s], key=lambda c: np.nan_to_num(brute[s][c], nan=-np.inf))
        keys = [k for k in srcs if s in srcs[k]]
        assert weights[s] == {k: c / 10 for k, c in zip(keys, best)}, s
        assert config["validation"]["blend"][s] == pytest.approx(brute[s][best], abs=1e-5), s

    # a model alone (m0 has every source): its estimates rendered as they are
    m0_alone = {s: {"m0": 1.0} for s in SOURCES}
    refs_est = [(np.asarray(store.references("toy", t)),
                 apply_blend(m0_alone, {"m0": store.stems("m0", "toy", t)}, srcs, SOURCES))
                for t in store.tracks("toy", "valid")]
    for j, s in enumerate(SOURCES):
        if objective == "museval":
            want = median_over_tracks([track_median(framewise_sdr(r, e, 1000, 1000)[j]) for r, e in refs_est])
        else:
            want = np.mean([usdr(r, e)[j] for r, e in refs_est])
        assert config["validation"]["single_models"]["m0"][s] == pytest.approx(want, abs=1e-5)

    saved = json.loads((tmp_path / "run" / "config.json").read_text())
    assert saved["method"] == "blend" and saved["weights"] == weights
    table = json.loads((tmp_path / "run" / "weights.json").read_text())
    assert table["sources"] == list(SOURCES) and table["weights"][2][2] is None   # m2 x other
    assert "| m2 |" in (tmp_path / "run" / "weights.md").read_text()
    # the run folder applies like any mixer
    t = store.tracks("toy", "valid")[0]
    est = apply_run(tmp_path / "run", store.mixture("toy", t), {k: store.stems(k, "toy", t) for k in srcs})
    assert est.shape == (4, 2, 6500)
    np.testing.assert_array_equal(est, apply_blend(weights, {k: store.stems(k, "toy", t) for k in srcs},
                                                   srcs, SOURCES))

def test_simplex_grid():
    g = simplex_grid(3, 0.01)
    assert g.shape == (5151, 3) and np.allclose(g.sum(1), 1) and g.min() >= 0
    assert len({tuple(np.round(r * 100).astype(int)) for r in g}) == 5151


# ---- training --------------------------------------------------------------------------------
def test_conv1x1_learns_the_inverse_mixing(tmp_path):
    # One model whose stems are a fixed, invertible mix of the sources (plus -60 dB noise): the
    # only good conv1x1 is the inverse mix, per channel, with no L/R cross terms.
    A = np.eye(4) + 0.3 * np.random.default_rng(5).standard_normal((4, 4))
    store = make_store(tmp_path / "store", {"m0": (SOURCES, A)},
                       splits=(("train", 2), ("valid", 1), ("test", 1)))
    run = tmp_path / "run"
    train_mixer(store, "toy", ["m0"], "conv1x1", run, with_mixture=False, T=1024, shift=256,
                epochs=12, batch=4, lr=1e-2, device="cpu", progress=False)
    W = torch.load(run / MIXER, weights_only=True)["weight"].numpy()     # [in=8, out=8]
    want = np.zeros((8, 8))
    inv = np.linalg.inv(A)
    for c in range(2):
        want[c::2, c::2] = inv.T      # y[(s, c)] = sum_k inv[s, k] x[(k, c)]
    np.testing.assert_allclose(W, want, atol=0.02)

    t = store.tracks("toy", "test")[0]
    est = apply_run(run, store.mixture("toy", t), {"m0": store.stems("m0", "toy", t)})
    refs = np.asarray(store.references("toy", t))
    assert min(sdr(refs[j], est[j]) for j in range(4)) > 30


def test_conv1x1_recovers_sources_from_three_models_and_mixture(tmp_path):
    rng = np.random.default_rng(6)
    models = {f"m{i}": (SOURCES, np.eye(4) + 0.4 * rng.standard_normal((4, 4))) for i in range(3)}
    store = make_store(tmp_path / "store", models, splits=(("train", 2), ("valid", 1), ("test", 1)))
    run = tmp_path / "run"
    result = train_mixer(store, "toy", list(models), "conv1x1", run, T=1024, shift=256, epochs=12,
                         batch=4, lr=1e-2, device="cpu", progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["in_channels"] == 26 and config["input_names"][2] == "m0.drums.L"
    t = store.tracks("toy", "test")[0]
    est = apply_run(run, store.mixture("toy", t), {k: store.stems(k, "toy", t) for k in models})
    refs = np.asarray(store.references("toy", t))
    assert min(sdr(refs[j], est[j]) for j in range(4)) > 30
    rows = list(csv.DictReader(open(run / "metrics.csv")))
    assert len(rows) == 12 and list(rows[0]) == ["epoch", "train_loss", "valid_loss", "seconds", "lr"]
    assert result.best_valid == min(float(r["valid_loss"]) for r in rows)
    ck = torch.load(run / "best.pt", weights_only=True)
    assert ck["epoch"] == result.best_epoch

    path = export_weights(run)
    names = json.loads(path.with_suffix(".json").read_text())
    assert np.load(path)["W"].shape == (26, 8) and len(names["inputs"]) == 26


KILLED_RUN = """
import sys, time
sys.path[:0] = [{tests!r}, {repo!r}]
import torch
import mixer.train as mt
from core.store import StemStore

torch.set_num_threads(1)
read = mt.SegmentDataset.__getitem__


def slow(self, idx):   # every segment read is logged and slowed, so the kill lands mid-epoch
    with open({log!r}, "a") as f:
        f.write("read\\n")
    time.sleep(0.1)
    return read(self, idx)


mt.SegmentDataset.__getitem__ = slow
mt.train_mixer(StemStore({store!r}), "toy", ["m0"], "mdx-mixer", {run!r}, epochs=4, **{kw!r})
"""


def _kill_mid_epoch_3(tmp_path, store, run, kw):
    """Run train_mixer(epochs=4) in a subprocess and SIGKILL it two segments into epoch 3."""
    import signal
    import subprocess
    import sys
    import time

    from conftest import REPO

    log = tmp_path / "reads.log"
    code = KILLED_RUN.format(tests=str(REPO / "tests"), repo=str(REPO), log=str(log),
                             store=str(store.root), run=str(run), kw=kw)
    proc = subprocess.Popen([sys.executable, "-c", code])
    reads = lambda: len(log.read_text().splitlines()) if log.exists() else 0   # noqa: E731
    deadline, mark = time.time() + 120, None
    while time.time() < deadline and proc.poll() is None:
        if mark is None and (run / "metrics.csv").exists() and \
                len((run / "metrics.csv").read_text().splitlines()) == 3:    # 2 epochs done
            mark = reads()
        if mark is not None and reads() >= mark + 2:
            break
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert mark is not None and proc.returncode == -signal.SIGKILL, "not killed in epoch 3"


def test_resumed_training_is_bit_identical(tmp_path):
    """A run SIGKILLed in the middle of its third epoch, resumed, ends with the weights, losses
    and exported mixer of a run never interrupted."""
    store = make_store(tmp_path / "store", {"m0": (SOURCES, np.eye(4))},
                       splits=(("train", 2), ("valid", 1)), length=4096)
    kw = dict(preset="tiny", p=0.1, batch=2, lr=1e-3, shift=512, seed=3, device="cpu",
              max_segments_per_epoch=6, progress=False)
    _kill_mid_epoch_3(tmp_path, store, tmp_path / "a", kw)
    killed = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    assert killed["epoch"] == 2 and not (tmp_path / "a" / MIXER).exists()
    train_mixer(store, "toy", ["m0"], "mdx-mixer", tmp_path / "a", epochs=4, **kw)   # resumed
    train_mixer(store, "toy", ["m0"], "mdx-mixer", tmp_path / "b", epochs=4, **kw)
    a = torch.load(tmp_path / "a" / "last.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "last.pt", weights_only=True)
    assert a["epoch"] == b["epoch"] == 4
    for k in b["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert a["metrics"][:2] == killed["metrics"]    # epochs 1-2 kept, not trained again
    assert [m["train_loss"] for m in a["metrics"]] == [m["train_loss"] for m in b["metrics"]]
    assert [m["valid_loss"] for m in a["metrics"]] == [m["valid_loss"] for m in b["metrics"]]
    ma = torch.load(tmp_path / "a" / MIXER, weights_only=True)
    mb = torch.load(tmp_path / "b" / MIXER, weights_only=True)
    assert all(torch.equal(ma[k], mb[k]) for k in mb)

    # W_k per segment for one track (2 segments of T = 1024 with hop T... 4096 samples -> 4)
    t = store.tracks("toy", "train")[0]
    path = export_weights(tmp_path / "b", mixture=store.mixture("toy", t),
                          stems_by_key={"m0": store.stems("m0", "toy", t)}, track=t.name)
    w = np.load(path)
    assert w["W"].shape == (4, 10, 8) and w["mean"].shape == w["std"].shape == (10, 8)
    assert list(w["starts"]) == [0, 1024, 2048, 3072]


def test_select_last_keeps_the_last_epoch_without_a_valid_split(tmp_path):
    """select='last' never reads the valid split (there is none here) and keeps the last epoch;
    the default, selection on the valid split, needs one and says so."""
    from core.errors import PipelineError

    store = make_store(tmp_path / "store", {"m0": (SOURCES, np.eye(4))},
                       splits=(("train", 2), ("test", 1)), length=4096)
    kw = dict(preset="tiny", batch=2, lr=1e-3, shift=512, seed=0, device="cpu",
              max_segments_per_epoch=4, progress=False, epochs=3)
    with pytest.raises(PipelineError, match="no 'valid' tracks"):
        train_mixer(store, "toy", ["m0"], "conv1x1", tmp_path / "v", **kw)
    result = train_mixer(store, "toy", ["m0"], "conv1x1", tmp_path / "a", select="last", **kw)
    assert result.best_epoch == 3 and all(np.isnan(m["valid_loss"]) for m in result.metrics)
    last = torch.load(tmp_path / "a" / "last.pt", weights_only=True)["model"]
    kept = torch.load(tmp_path / "a" / MIXER, weights_only=True)
    assert all(torch.equal(kept[k], last[k]) for k in last)
    assert json.loads((tmp_path / "a" / "config.json").read_text())["training"]["valid_split"] is None
    with pytest.raises(PipelineError, match="select"):
        train_mixer(store, "toy", ["m0"], "conv1x1", tmp_path / "b", select="best", **kw)


def test_select_on_the_selection_split_trains_on_the_rest_of_train(tmp_path, monkeypatch):
    """select='select': the epoch is chosen on a fixed tenth of train (its loss recorded), the
    mixer is fitted on the rest ('fit'), and no valid track is read."""
    store = make_store(tmp_path / "store", {"m0": (SOURCES, np.eye(4))},
                       splits=(("train", 4), ("valid", 1)), length=2048)
    select = {t.id for t in store.tracks("toy", "select")}
    fit = {t.id for t in store.tracks("toy", "fit")}
    assert len(select) == 1 and len(fit) == 3
    read = []
    for method in ("_track_audio", "stems", "track_file", "stems_file", "mixture_file"):
        original = getattr(StemStore, method)

        def spy(self, *args, _original=original):
            read.append(args[-1].id)
            return _original(self, *args)

        monkeypatch.setattr(StemStore, method, spy)
    result = train_mixer(store, "toy", ["m0"], "conv1x1", tmp_path / "s", select="select",
                         preset="tiny", batch=2, lr=1e-2, shift=512, device="cpu", epochs=3,
                         progress=False)
    assert set(read) == select | fit
    assert all(np.isfinite(m["valid_loss"]) for m in result.metrics)
    best = min(result.metrics, key=lambda m: m["valid_loss"])
    assert result.best_epoch == best["epoch"]
    training = json.loads((tmp_path / "s" / "config.json").read_text())["training"]
    assert training["split"] == "fit" and training["valid_split"] == "select"


def test_resume_refuses_a_different_configuration(tmp_path):
    from core.errors import PipelineError

    store = make_store(tmp_path / "store", {"m0": (SOURCES, np.eye(4))},
                       splits=(("train", 1), ("valid", 1)), length=2048)
    kw = dict(T=1024, shift=1024, device="cpu", progress=False, epochs=1)
    train_mixer(store, "toy", ["m0"], "conv1x1", tmp_path / "r", lr=1e-3, **kw)
    with pytest.raises(PipelineError, match="different configuration"):
        train_mixer(store, "toy", ["m0"], "conv1x1", tmp_path / "r", lr=1e-2, **kw)


def test_mixture_stats_match_numpy():
    x = np.random.default_rng(0).standard_normal((2, 5000)).astype(np.float32) * 0.2 + 0.01
    mean, std = mixture_stats(x, chunk=777)
    assert mean == pytest.approx(x.astype(np.float64).mean(), abs=1e-12)
    assert std == pytest.approx(x.astype(np.float64).std() + 1e-8, rel=1e-9)   # + division guard


def test_average_init_starts_from_the_uniform_average():
    """Untrained mixers with init='average' apply exactly the uniform average of the models."""
    from mixer.inputs import InputSpec, average_mixing
    from mixer.models import build_mixer

    spec = InputSpec(model_keys=("a", "b"), model_names=("a", "b"),
                     model_sources=(("drums", "bass", "other", "vocals"), ("vocals",)),
                     targets=("drums", "bass", "other", "vocals"), with_mixture=True)
    A = torch.from_numpy(average_mixing(spec))
    assert A.shape == (spec.in_channels, spec.out_channels)
    names_in, names_out = spec.input_names(), spec.output_names()
    assert A[names_in.index("a.vocals.L"), names_out.index("vocals.L")] == 0.5
    assert A[names_in.index("b.vocals.R"), names_out.index("vocals.R")] == 0.5
    assert A[names_in.index("a.drums.L"), names_out.index("drums.L")] == 1.0
    assert A[names_in.index("mixture.L")].abs().sum() == 0 and A.sum() == spec.out_channels
    x = torch.randn(3, spec.in_channels, 256)
    for arch in ("conv1x1", "mdx-mixer"):
        torch.manual_seed(0)
        model = build_mixer(arch, spec.in_channels, spec.out_channels,
                            {"T": 256, "F": 16, "N": 1, "p": 0.0}, start=A)
        torch.testing.assert_close(model.mixing_weights(x), A.expand(3, -1, -1))
        torch.testing.assert_close(model(x), torch.einsum("io,bit->bot", A, x))


def test_mdx_mixer_learns_weights_that_switch_over_time(tmp_path):
    """Known answer for time-varying weights. Two models: in blocks of 4 segments (T = 1024,
    the tiny preset's), chosen at random, one is right (the reference plus a -20 dB noise floor)
    and the other wrong: an offset of +-0.1 per source (+ for drums and other, - for bass and
    vocals) plus noise twice the reference's level. The wrong model shows in the segment means
    of its channels, which the MDX-Mixer's pooled features carry. The per-segment oracle takes
    the right model in each block (20.0 dB). Scored on each block's middle two segments, where
    every Hann window of Mixer's overlap-add lies inside the block: the MDX-Mixer comes within
    1.5 dB of the oracle (19.2 dB measured; 19.8 and 19.9 with data seeds 1 and 2), and at least
    10 dB above the best any conv1x1 can do, the least-squares static mixing of the same inputs
    fitted on the scored samples themselves (4.4 dB measured). About 20 s on 2 busy cores."""
    T, block = 1024, 4096
    rng = np.random.default_rng(0)
    right = {}

    def edit(split, i, refs, stems):
        n = refs.shape[-1]
        a_right = np.repeat(rng.integers(0, 2, -(-n // block)), block)[:n].astype(bool)
        right[split, i] = a_right
        sign = np.array([1.0, -1.0, 1.0, -1.0])[:, None, None]
        wrong = lambda: 0.1 * sign + 0.2 * rng.standard_normal(refs.shape)   # noqa: E731
        stems["A"][:] += np.where(a_right, 0.0, wrong())
        stems["B"][:] += np.where(a_right, wrong(), 0.0)

    store = make_store(tmp_path / "store", {k: (SOURCES, np.eye(4)) for k in "AB"}, noise=0.01,
                       splits=(("train", 3), ("test", 1)), length=8 * block, edit=edit)
    train_mixer(store, "toy", ["A", "B"], "mdx-mixer", tmp_path / "mdx", preset="tiny", epochs=12,
                batch=8, lr=1e-2, lr_schedule="cosine", shift=T // 2, select="last",
                device="cpu", progress=False)
    t = store.tracks("toy", "test")[0]
    refs = np.asarray(store.references("toy", t), np.float64)
    stems = {k: np.asarray(store.stems(k, "toy", t), np.float64) for k in "AB"}
    mixture = np.asarray(store.mixture("toy", t), np.float64)
    pos = np.arange(refs.shape[-1]) % block
    inner = (pos >= T) & (pos < block - T)

    def score(est):
        return np.mean([sdr(refs[j][:, inner], est[j][:, inner]) for j in range(4)])

    oracle = score(np.where(right["test", 0], stems["A"], stems["B"]))
    mdx = score(apply_run(tmp_path / "mdx", mixture.astype(np.float32), stems))
    # the best static affine mixing of every input channel (what a conv1x1 on normalised inputs
    # is), least squares on the scored samples: an upper bound for any trained conv1x1
    x = np.concatenate([stems["A"].reshape(8, -1), stems["B"].reshape(8, -1), mixture,
                        np.ones((1, refs.shape[-1]))])[:, inner]
    W = np.linalg.lstsq(x.T, refs.reshape(8, -1)[:, inner].T, rcond=None)[0]
    static = np.full(refs.shape, np.nan)
    static.reshape(8, -1)[:, inner] = (x.T @ W).T
    conv = score(static)
    assert abs(oracle - 20.0) < 0.2, oracle
    assert mdx > oracle - 1.5 and mdx > conv + 10.0, (mdx, oracle, conv)


def test_residual_mdx_mixer_starts_from_the_conv1x1_and_its_penalty_holds_it_there(tmp_path):
    """base = a conv1x1 run: W_k = W + ΔW_k with W the conv1x1's and ΔW_k = 0 before training;
    the training loss is L1 + penalty x mean(ΔW_k^2); a large penalty keeps ΔW_k near zero."""
    from core.errors import PipelineError
    from mixer.methods import load_mixer
    from mixer.models import build_mixer
    from mixer.train import penalised

    rng = np.random.default_rng(7)
    models = {f"m{i}": (SOURCES, np.eye(4) + 0.3 * rng.standard_normal((4, 4))) for i in range(2)}

    def louder_later(split, i, refs, stems):   # a mix that changes halfway through each track
        stems["m0"][..., 2048:] *= 2.0

    store = make_store(tmp_path / "store", models, splits=(("train", 2), ("valid", 1)),
                       length=4096, edit=louder_later)
    kw = dict(preset="tiny", batch=2, lr=1e-2, shift=512, device="cpu", progress=False)
    conv = tmp_path / "conv"
    train_mixer(store, "toy", list(models), "conv1x1", conv, epochs=2, **kw)
    W = torch.load(conv / MIXER, weights_only=True)["weight"]

    # untrained: exactly the conv1x1
    spec_in, spec_out = W.shape
    model = build_mixer("mdx-mixer", spec_in, spec_out,
                        {"T": 1024, "F": 16, "N": 1, "p": 0.0, "residual": {"base": "conv"}}, start=W)
    x = torch.randn(3, spec_in, 1024)
    torch.testing.assert_close(model.mixing_weights(x), W.expand(3, -1, -1))
    # the penalised loss, by hand
    with torch.no_grad():
        model.head.bias.normal_()
    y = torch.randn(3, spec_out, 1024)
    out = model(x)
    delta = model.mixing_weights(x) - W
    for norm, size in (("l2", delta ** 2), ("l1", delta.abs())):
        want = torch.nn.functional.l1_loss(out, y) + 0.5 * size.mean()
        torch.testing.assert_close(penalised(model, 0.5, norm)(out, y), want)
    model.eval()
    torch.testing.assert_close(penalised(model, 0.5, "l2")(out, y), torch.nn.functional.l1_loss(out, y))

    def corrections(run):
        t = store.tracks("toy", "valid")[0]
        mixer = load_mixer(run)
        Wk, _ = mixer.segment_weights(np.asarray(store.mixture("toy", t)),
                                      {k: store.stems(k, "toy", t) for k in models})
        return Wk - mixer.module.base.detach().numpy(), mixer    # ΔW_k [segments, in, out]

    # (Adam moves every weight by about lr a step whatever the penalty, so a penalty holds the
    # corrections only down to a floor set by lr: a small lr and a few epochs show it here)
    free, held = tmp_path / "free", tmp_path / "held"
    slow = {**kw, "lr": 1e-3, "shift": 256, "epochs": 4}
    train_mixer(store, "toy", list(models), "mdx-mixer", free, base=conv, **slow)
    train_mixer(store, "toy", list(models), "mdx-mixer", held, base=conv, penalty=1e3, **slow)
    free_delta, _ = corrections(free)
    held_delta, mixer = corrections(held)
    assert np.abs(held_delta).mean() < 0.5 * np.abs(free_delta).mean()
    # and what the penalty holds back is a correction per segment, not one more constant W (a
    # head that ignored its input would give the same ΔW_k in every segment): 0.43 measured
    assert np.std(free_delta, axis=0).mean() > 0.2 * np.abs(free_delta).mean()
    config = json.loads((held / "config.json").read_text())
    assert config["hyper"]["residual"]["penalty"] == 1e3
    assert config["hyper"]["residual"]["base"] == str(conv.resolve())
    # the residual run applies like any mixer (its W travels in mixer.pt)
    t = store.tracks("toy", "valid")[0]
    est = apply_run(held, store.mixture("toy", t), {k: store.stems(k, "toy", t) for k in models})
    assert est.shape == (4, 2, 4096) and np.isfinite(est).all()

    with pytest.raises(PipelineError, match="penalty: it weighs"):
        train_mixer(store, "toy", list(models), "mdx-mixer", tmp_path / "x", penalty=1.0, **kw)
    with pytest.raises(PipelineError, match="a mdx-mixer run"):
        train_mixer(store, "toy", list(models), "mdx-mixer", tmp_path / "x", base=free, **kw)
    with pytest.raises(PipelineError, match="other inputs"):
        train_mixer(store, "toy", ["m0"], "mdx-mixer", tmp_path / "x", base=conv, **kw)
    with pytest.raises(PipelineError, match="arch conv1x1: unknown option.s. base"):
        train_mixer(store, "toy", list(models), "conv1x1", tmp_path / "x", base=conv, **kw)


def test_jitter_moves_training_segments_reproducibly(tmp_path):
    """jitter: each item is its grid segment moved by a random 0..shift-1 samples (within the
    track), the same for the same torch seed, different for another epoch's seed."""
    from mixer.train import SegmentDataset

    store = make_store(tmp_path / "store", {"m0": (SOURCES, np.eye(4))},
                       splits=(("train", 1),), length=4096)
    spec = InputSpec.from_store(store, "toy", ["m0"], with_mixture=True)
    fixed = SegmentDataset(store, "toy", spec, "train", 1024, 1024)
    moved = SegmentDataset(store, "toy", spec, "train", 1024, 1024, jitter=True)
    x_full = normalise(assemble_inputs(spec, *[store.mixture("toy", "train/train0"),
                                               {"m0": store.stems("m0", "toy", "train/train0")}],
                                       0, 4096), fixed.stats[0])
    starts = []
    for seed in (0, 0, 1):
        torch.manual_seed(seed)
        x, _ = moved[1]
        found = [s for s in range(1024, 2048) if np.array_equal(x.numpy(), x_full[:, s:s + 1024])]
        assert len(found) == 1
        starts.append(found[0])
    assert starts[0] == starts[1] != starts[2]
    assert torch.equal(fixed[1][0], torch.from_numpy(x_full[:, 1024:2048]))
