"""Known answers for the ensembles that train nothing: MSST's / UVR's spectral and order-statistic
ensembles (mixer.spectral), the band-wise blend (mixer.bandblend), the greedy choice of base
models (mixer.select), and their CLI / experiment-file / separate plumbing."""
from __future__ import annotations

import json

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import MUSDB18_7, needs_musdb18_7, run_cli, write_stem_track
from test_mixer import SOURCES, make_store

from core.errors import PipelineError
from core.metrics import framewise_sdr, median_over_tracks, track_median
from mixer.bandblend import band_edges, search_band_blend
from mixer.blend import apply_blend, search_blend
from mixer.inputs import InputSpec
from mixer.methods import load_mixer
from mixer.select import select_models
from mixer.spectral import METHODS, SpectralEnsemble, make_run
from mixer.stft import HOP, N_FFT


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # small tensors on 2 shared cores
    yield
    torch.set_num_threads(threads)


# ---- spectral ensembles against numpy --------------------------------------------------------
def np_stft(x: np.ndarray, frames: int) -> np.ndarray:
    """librosa.stft(n_fft=2048, hop_length=1024) written out: periodic Hann, frames centred on
    multiples of the hop, zeros beyond the ends; `frames` frames. [..., n] -> [..., F, frames]."""
    w = np.hanning(N_FFT + 1)[:-1]
    xp = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(N_FFT // 2, N_FFT // 2 + frames * HOP)])
    fr = np.stack([xp[..., i * HOP:i * HOP + N_FFT] for i in range(frames)], -1)
    return np.fft.rfft(fr * w[:, None], axis=-2)


def np_istft(Z: np.ndarray, n: int) -> np.ndarray:
    """librosa.istft: Hann synthesis, overlap-add, divided by the summed squared windows."""
    w = np.hanning(N_FFT + 1)[:-1]
    fr = np.fft.irfft(Z, n=N_FFT, axis=-2) * w[:, None]
    T = Z.shape[-1]
    y, ws = np.zeros(Z.shape[:-2] + (N_FFT + HOP * (T - 1),)), np.zeros(N_FFT + HOP * (T - 1))
    for i in range(T):
        y[..., i * HOP:i * HOP + N_FFT] += fr[..., i]
        ws[i * HOP:i * HOP + N_FFT] += w ** 2
    return (y / np.where(ws > 1e-10, ws, 1))[..., N_FFT // 2:N_FFT // 2 + n]


def np_ensemble(method: str, x: np.ndarray, weights) -> np.ndarray:
    """MSST's ensemble.average_waveforms, for x [M, 2, n] (float64)."""
    kind, domain = method.split("-")
    n = x.shape[-1]
    # librosa's frame count is 1 + n // hop; ours covers every sample by two frames (the same
    # when n is a multiple of the hop)
    z = x if domain == "wave" else np_stft(x, -(-n // HOP) + 1)
    if kind == "avg":
        w = np.asarray(weights, dtype=np.float64).reshape(-1, *[1] * (z.ndim - 1))
        y = (z * w).sum(0) / w.sum()
    elif kind == "median":
        y = np.median(z, axis=0)              # complex: numpy's real-then-imaginary order
    else:
        pick = np.abs(z).argmax(0) if kind == "max" else np.abs(z).argmin(0)
        y = np.take_along_axis(z, pick[None], 0)[0]
    return y if domain == "wave" else np_istft(y, n)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("n", [7 * HOP, 7 * HOP + 333])
def test_spectral_ensembles_equal_numpy(method, n):
    """Four models output vocals, three drums (a 2-stem model has none): each target over its
    own models (even and odd counts), any block size, equal to MSST's definitions in numpy."""
    rng = np.random.default_rng(0)
    sources = [("drums", "vocals")] * 3 + [("vocals", "accompaniment")]
    spec = InputSpec(("a", "b", "c", "d"), ("a", "b", "c", "d"), tuple(sources), ("drums", "vocals"),
                     with_mixture=False)
    stems = {k: (0.3 * rng.standard_normal((2, 2, n))).astype(np.float32) for k in spec.model_keys}
    stems["b"][0, :, 1000:2000] = 0            # silence in one model: ties at 0
    weights = {"a": 2.0, "b": 1.0, "c": 0.5, "d": 3.0} if method.startswith("avg") else None
    mixture = np.zeros((2, n), np.float32)
    got = SpectralEnsemble(method, spec, weights)(mixture, stems)
    assert got.shape == (2, 2, n) and got.dtype == np.float32
    drums = np.stack([stems[k][0] for k in "abc"]).astype(np.float64)
    vocals = np.stack([stems[k][1] for k in "abc"] + [stems["d"][0]]).astype(np.float64)
    w = [weights[k] for k in "abcd"] if weights else [1.0] * 4
    np.testing.assert_allclose(got[0], np_ensemble(method, drums, w[:3]), atol=2e-6, rtol=0)
    np.testing.assert_allclose(got[1], np_ensemble(method, vocals, w), atol=2e-6, rtol=0)
    small = SpectralEnsemble(method, spec, weights)(mixture, stems, block=2 * HOP)
    np.testing.assert_allclose(small, got, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def msst_average_waveforms():
    """msst's own ensemble (msst._ensemble.average_waveforms, what `msst ensemble` runs), its
    max_fft's absmax patched for numpy 2 (np.ogrid returns a tuple there: list() it)."""
    import msst._ensemble as upstream

    def absmax(a, *, axis):
        dims = list(a.shape)
        dims.pop(axis)
        indices = list(np.ogrid[tuple(slice(0, d) for d in dims)])
        indices.insert((len(a.shape) + axis) % len(a.shape), np.abs(a).argmax(axis=axis))
        return a[tuple(indices)]

    original = upstream.absmax
    upstream.absmax = absmax
    yield upstream.average_waveforms
    upstream.absmax = original


@needs_musdb18_7
@pytest.mark.parametrize("whole_hops", [False, True])
def test_spectral_ensembles_equal_msst_on_music(msst_average_waveforms, whole_hops):
    """median/min/max-spec pick, per bin, the model MSST's ensemble picks: on music, near-ties
    are common enough (thousands of bins per track, quiet ones mostly) that a float32 STFT's
    rounding picked other models than MSST's float64-computed, complex64-stored librosa STFT,
    moving the estimates by up to 1.1e-4 of the peak here. Our estimates equal msst's to float32 ISTFT rounding (< 1e-6 of
    the peak; 3e-7 measured), at MUSDB's length (299880 samples, not a multiple of the hop:
    compared before the last n mod 1024 samples, which we cover by one more frame, see
    mixer/spectral.py) and at a multiple of the hop (compared whole). Drums: 4 models (an even
    median), vocals: 3."""
    from core.datasets import open_dataset

    algorithm = {"median-spec": "median_fft", "min-spec": "min_fft", "max-spec": "max_fft"}
    spec = InputSpec(("a", "b", "c", "d"), ("a", "b", "c", "d"),
                     (("drums", "vocals"),) * 3 + (("drums",),), ("drums", "vocals"), with_mixture=False)
    for track in open_dataset(MUSDB18_7).split("valid")[:2]:
        _, refs = track.audio()                                   # drums, bass, other, vocals
        n = refs.shape[-1] // HOP * HOP if whole_hops else refs.shape[-1]
        assert whole_hops or n % HOP, n
        d, b, o, v = refs[..., :n]
        # estimates that leak other sources, as real models do: real music's near-ties
        drums = np.stack([d + 0.4 * b, d + 0.3 * o, 0.9 * d + 0.2 * v, d + 0.2 * (b + o)])
        vocals = np.stack([v + 0.5 * o, v + 0.5 * d, 0.9 * v + 0.3 * b])
        stems = {k: np.stack([drums[i], vocals[i]]).astype(np.float32) for i, k in enumerate("abc")}
        stems["d"] = drums[3:].astype(np.float32)
        end = n // HOP * HOP
        for method, alg in algorithm.items():
            got = SpectralEnsemble(method, spec)(np.zeros((2, n), np.float32), stems)
            for j, models in enumerate((drums, vocals)):
                want = msst_average_waveforms(models.astype(np.float32), np.ones(len(models)), alg)
                err = np.abs(got[j, :, :end] - want[:, :end]).max() / np.abs(want).max()
                assert err < 1e-6, (track.name, method, j, err)


def test_averages_in_both_domains_agree_and_weights_are_checked(tmp_path):
    """avg-spec is avg-wave through a perfectly reconstructing STFT; weights only for averages."""
    store = make_store(tmp_path / "store", {k: (SOURCES, np.eye(4)) for k in ("m0", "m1")},
                       splits=(("valid", 1),), length=5000, rate=8000, noise=0.05)
    t = store.tracks("toy", "valid")[0]
    stems = {k: store.stems(k, "toy", t) for k in ("m0", "m1")}
    outs = []
    for method in ("avg-wave", "avg-spec"):
        make_run(store, "toy", ["m0", "m1"], method, weights=[3, 1], run_dir=tmp_path / method)
        outs.append(load_mixer(tmp_path / method)(store.mixture("toy", t), stems))
    np.testing.assert_allclose(outs[1], outs[0], atol=1e-6)
    want = apply_blend({s: {"m0": 0.75, "m1": 0.25} for s in SOURCES}, stems,
                       {k: SOURCES for k in stems}, SOURCES)
    np.testing.assert_allclose(outs[0], want, atol=1e-7)
    with pytest.raises(PipelineError, match="takes no weights"):
        make_run(store, "toy", ["m0", "m1"], "max-spec", weights=[1, 1])
    with pytest.raises(PipelineError, match="one per model"):
        make_run(store, "toy", ["m0", "m1"], "avg-wave", weights=[1])
    with pytest.raises(PipelineError, match="choose one of"):
        make_run(store, "toy", ["m0", "m1"], "max-fft")


# ---- band-wise blend -------------------------------------------------------------------------
RATE = 8000


def _split_at_1khz(x: np.ndarray, keep_low: bool) -> np.ndarray:
    X = np.fft.rfft(x, axis=-1)
    f = np.fft.rfftfreq(x.shape[-1], 1 / RATE)
    X[..., (f >= 1000) if keep_low else (f < 1000)] = 0
    return np.fft.irfft(X, n=x.shape[-1], axis=-1)


@pytest.fixture(scope="module")
def two_halves(tmp_path_factory):
    """A perfect below 1 kHz (its error all above), B perfect above (its error all below)."""
    root = tmp_path_factory.mktemp("bands")
    rng = np.random.default_rng(0)

    def edit(split, i, refs, stems):
        noise = 0.1 * rng.standard_normal((2,) + refs.shape)
        stems["A"][:] = refs + _split_at_1khz(noise[0], keep_low=False)
        stems["B"][:] = refs + _split_at_1khz(noise[1], keep_low=True)

    store = make_store(root / "store", {k: (SOURCES, np.eye(4)) for k in "AB"},
                       splits=(("valid", 3), ("test", 1)), length=4 * RATE + 700, rate=RATE, edit=edit)
    band = search_band_blend(store, "toy", ["A", "B"], bands=8, split="valid",
                             run_dir=root / "band", progress=False)
    search_blend(store, "toy", ["A", "B"], split="valid", run_dir=root / "blend")
    return root, store, band


def _rendered(store, run, split):
    """museval median over frames, median over tracks per source, of a run rendered by Mixer."""
    scores = []
    for t in store.tracks("toy", split):
        est = load_mixer(run)(store.mixture("toy", t), {k: store.stems(k, "toy", t) for k in "AB"})
        scores.append(track_median(framewise_sdr(np.asarray(store.references("toy", t)), est, RATE, RATE)))
    return median_over_tracks(scores)


def test_band_blend_finds_the_split_and_beats_everything(two_halves):
    root, store, band = two_halves
    bins, hz = band_edges(8, "mel", RATE)
    for target in SOURCES:
        w = band["weights"][target]
        for b in range(8):
            if hz[b + 1] <= 1000:
                assert (w["A"][b], w["B"][b]) == (1.0, 0.0), (target, b)
            elif hz[b] >= 1000:
                assert (w["A"][b], w["B"][b]) == (0.0, 1.0), (target, b)
    # held-out track, rendered by the run folder and scored by core.metrics
    test = _rendered(store, root / "band", "test")
    blend = _rendered(store, root / "blend", "test")
    t = store.tracks("toy", "test")[0]
    refs = np.asarray(store.references("toy", t))
    alone = [track_median(framewise_sdr(refs, np.asarray(store.stems(k, "toy", t), np.float32), RATE, RATE))
             for k in "AB"]
    assert np.all(test > blend + 5) and np.all(test > alone[0] + 5) and np.all(test > alone[1] + 5)
    # the search's objective (inner products of band signals, float64) is the rendered one: equal
    # to 6e-8 dB (float32 inner products would be 3e-5 dB off)
    valid = _rendered(store, root / "band", "valid")
    np.testing.assert_allclose([band["validation"]["band_blend"][s] for s in SOURCES], valid, atol=1e-6)
    assert all(band["validation"]["band_blend"][s] > band["validation"]["plain_blend"][s] + 5
               for s in SOURCES)
    assert "| 0-" in (root / "band" / "weights.md").read_text()


def test_equal_band_weights_reproduce_the_plain_blend(two_halves, tmp_path):
    root, store, band = two_halves
    blend = json.loads((root / "blend" / "config.json").read_text())
    config = dict(band, weights={s: {k: [w] * 8 for k, w in blend["weights"][s].items()} for s in SOURCES})
    (tmp_path / "equal").mkdir()
    (tmp_path / "equal" / "config.json").write_text(json.dumps(config))
    t = store.tracks("toy", "test")[0]
    stems = {k: store.stems(k, "toy", t) for k in "AB"}
    got = load_mixer(tmp_path / "equal")(store.mixture("toy", t), stems)
    want = load_mixer(root / "blend")(store.mixture("toy", t), stems)
    assert np.abs(got - want).max() <= 1e-6 * np.abs(want).max()


def test_band_edges():
    bins, hz = band_edges(16, "mel", 44100)
    assert bins[0] == 0 and bins[-1] == N_FFT // 2 + 1 and np.all(np.diff(bins) >= 1) and len(bins) == 17
    bins, hz = band_edges(8, "octave", 44100)
    assert hz[1] == 100 and np.allclose(np.diff(np.log2(hz[1:])), np.log2(22050 / 100) / 7)
    with pytest.raises(PipelineError, match="no STFT bin"):
        band_edges(64, "octave", 44100)
    with pytest.raises(PipelineError, match="choose one of mel, octave"):
        band_edges(8, "bark", 8000)


# ---- select-models ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def candidates(tmp_path_factory):
    """good and other: reference + independent noise (together better); copy: good exactly;
    noise: pure noise as loud as the mixture."""
    root = tmp_path_factory.mktemp("select")
    rng = np.random.default_rng(3)

    def edit(split, i, refs, stems):
        stems["copy"][:] = stems["good"]
        stems["noise"][:] = 0.2 * rng.standard_normal(refs.shape)

    models = {"noise": (SOURCES, np.zeros((4, 4))), "good": (SOURCES, np.eye(4)),
              "copy": (SOURCES, np.eye(4)), "other": (SOURCES, np.eye(4))}
    store = make_store(root / "store", models, splits=(("valid", 3),), length=3 * RATE, rate=RATE,
                       noise=0.05, edit=edit)
    return root, store


@pytest.mark.parametrize("by", ["blend", "conv1x1"])
def test_select_models_skips_noise_and_duplicates(candidates, by):
    root, store = candidates
    lines = []
    result = select_models(store, "toy", ["noise", "good", "copy", "other"], by=by, split="valid",
                           backward=True, out=root / f"{by}.json", progress=False, log=lines.append)
    chosen = [m["name"] for m in result["models"]]
    assert sorted(chosen) in (["good", "other"], ["copy", "other"]) and "noise" not in chosen
    assert result["path"][0]["gain"] is None and result["path"][1]["gain"] > 1.0
    assert [s["action"] for s in result["path"]] == ["add", "add"]
    assert any("add good" in line or "add copy" in line for line in lines)
    # an exact duplicate gains nothing, to float rounding
    from mixer.blend import collect_stats
    from mixer.select import BlendScore, Conv1x1Score, collect_conv1x1_stats

    keys = ["noise", "good", "copy", "other"]
    tracks = store.tracks("toy", "valid")
    spec = InputSpec.from_store(store, "toy", keys, with_mixture=by == "conv1x1")
    if by == "blend":
        pairs = [(store.references("toy", t), [store.stems(k, "toy", t) for k in keys]) for t in tracks]
        score = BlendScore(collect_stats(pairs, spec, RATE), 0.1, "museval")
    else:
        score = Conv1x1Score(collect_conv1x1_stats(store, "toy", spec, tracks, RATE), "museval")
    assert abs(score([1, 2]) - score([1])) < 1e-6
    assert score([1, 0]) - score([1]) < 0.01
    assert json.loads((root / f"{by}.json").read_text())["models"] == result["models"]


@pytest.mark.parametrize("by", ["blend", "conv1x1"])
def test_backward_drops_a_model_the_later_ones_make_redundant(tmp_path, by):
    """Y and Z: the references plus independent noise, Y's the smaller on drums and bass
    (variance 1 against 1.5), Z's on other and vocals; X outputs Y's drums and bass and Z's other
    and vocals, the best of both. X alone is the best single model; Y, then Z (or Z, then Y) each
    gain ~1 dB (an independent estimate to blend with X's on two sources); once both are in, X
    holds nothing they do not: backward elimination removes it, whichever the scorer."""
    rng = np.random.default_rng(4)
    scale = np.array([1.0, 1.0, 1.5, 1.5])[:, None, None] ** 0.5 * 0.05

    def edit(split, i, refs, stems):
        n1, n2 = rng.standard_normal((2,) + refs.shape)
        stems["Y"][:] = refs + scale * n1
        stems["Z"][:] = refs + scale[::-1] * n2
        stems["X"][:] = np.concatenate([stems["Y"][:2], stems["Z"][2:]])

    store = make_store(tmp_path / "store", {k: (SOURCES, np.eye(4)) for k in "XYZ"},
                       splits=(("valid", 3),), length=4 * RATE, rate=RATE, edit=edit)
    result = select_models(store, "toy", ["X", "Y", "Z"], by=by, split="valid", backward=True,
                           progress=False, log=lambda line: None)
    path = [(s["action"], s["name"]) for s in result["path"]]
    assert path[0] == ("add", "X") and sorted(path[1:3]) == [("add", "Y"), ("add", "Z")], path
    assert path[3:] == [("remove", "X")], path
    assert sorted(m["name"] for m in result["models"]) == ["Y", "Z"]
    assert all(s["gain"] > 0.5 for s in result["path"][1:3])
    assert abs(result["path"][3]["gain"]) < 1e-3     # X's removal costs nothing


def test_conv1x1_score_is_the_rendered_least_squares_mixer(candidates):
    """The conv1x1 score from Gram matrices equals the fitted matrix applied and scored."""
    from mixer.inputs import assemble_inputs, mixture_stats, normalise
    from mixer.select import Conv1x1Score, collect_conv1x1_stats

    root, store = candidates
    keys = ["good", "other"]
    tracks = store.tracks("toy", "valid")
    spec = InputSpec.from_store(store, "toy", keys, with_mixture=True)
    score = Conv1x1Score(collect_conv1x1_stats(store, "toy", spec, tracks, RATE), "museval")
    rows, W = score.fit([0, 1])
    assert rows == list(range(spec.in_channels))
    per_track = []
    for t in tracks:
        mixture = store.mixture("toy", t)
        stats = mixture_stats(mixture)
        x = normalise(assemble_inputs(spec, mixture, {k: store.stems(k, "toy", t) for k in keys}), stats)
        est = (W.T @ x.astype(np.float64)) * stats[1] + stats[0]
        per_track.append(track_median(framewise_sdr(np.asarray(store.references("toy", t)),
                                                    est.reshape(4, 2, -1), RATE, RATE)))
    assert score([0, 1]) == pytest.approx(float(np.mean(median_over_tracks(per_track))), abs=1e-4)


# ---- the CLI, experiment files and separate ---------------------------------------------------
EXPERIMENT = """
name = "ens"
offline = true
device = "cpu"

[dataset]
path = "{ds}"

[[models]]
spec = "{a}"
name = "umxa"
niter = 0

[[models]]
spec = "{b}"
name = "umxb"
niter = 0

[[systems]]
name = "median"
method = "median-spec"

[[systems]]
name = "avg"
method = "avg-wave"
weights = [3, 1]

[[systems]]
name = "bands"
method = "band-blend"
bands = 4
step = 0.25
split = "train"

[[systems]]
name = "chosen"
method = "max-spec"
models_from = "{selection}"

[evaluate]
split = "test"
oracles = false
"""


def test_cli_experiment_and_separate(tmp_path, capsys):
    from test_adapters import MUSDB, save_umx_folder

    ds, work = tmp_path / "ds", tmp_path / "work"
    for i, subset in enumerate(["train", "train", "valid", "test"]):
        write_stem_track(ds, subset, f"track{i}", n=22050, rate=22050, seed=i)
    a, b = (save_umx_folder(tmp_path / name, MUSDB, seed=s) for name, s in (("umxa", 0), ("umxb", 1)))
    code, _, err = run_cli(["cache", "-d", ds, "-m", a, "-m", b, "--niter", 0, "--device", "cpu",
                            "--offline", "--work", work], capsys)
    assert code == 0, err

    code, out, err = run_cli(["blend", "-m", "umxa", "-m", "umxb", "-d", ds, "--method", "min-spec",
                              "--work", work], capsys)
    assert code == 0 and (work / "runs" / "min-spec" / "config.json").exists(), err
    code, _, err = run_cli(["blend", "-m", "umxa", "-m", "umxb", "-d", ds, "--method", "median-wave",
                            "--weights", "1,2", "--work", work], capsys)
    assert code == 1 and "error: ensemble method 'median-wave' takes no weights" in err
    code, _, err = run_cli(["blend", "-m", "umxa", "-m", "umxb", "-d", ds, "--method", "band-blend",
                            "--bands", 4, "--split", "train", "--step", 0.5, "--work", work], capsys)
    assert code == 0 and "band-blend run written" in err, err
    code, out, err = run_cli(["evaluate", "-d", ds, "--split", "test", "-r", "min-spec", "-r",
                              "band-blend", "--no-oracles", "--work", work], capsys)
    assert code == 0 and "| min-spec |" in out and "| band-blend |" in out, err

    selection = work / "selections" / "pick.json"
    code, out, err = run_cli(["select-models", "-m", "umxa", "-m", "umxb", "-d", ds, "--split",
                              "train", "--name", "pick", "--min-gain", -1e9, "--work", work], capsys)
    assert code == 0 and selection.exists() and "add umx" in err and "models_from" in err, err
    code, _, err = run_cli(["select-models", "-m", "umxa", "-m", "umxb", "-d", ds, "--name", "pick",
                            "--work", work], capsys)
    assert code == 1 and "selection file exists" in err

    config = tmp_path / "ens.toml"
    config.write_text(EXPERIMENT.format(ds=ds, a=a, b=b, selection=selection))
    code, out, err = run_cli(["run", config, "--work", work], capsys)
    assert code == 0, err
    for system in ("median", "avg", "bands", "chosen"):
        assert f"| {system} |" in out, system
    chosen = json.loads((work / "runs" / "ens-chosen" / "config.json").read_text())
    assert chosen["inputs"]["model_keys"] == [m["key"] for m in json.loads(selection.read_text())["models"]]
    code, out, err = run_cli(["run", config, "--work", work], capsys)
    assert code == 0 and err.count("unchanged, kept") == 4, err

    bad = tmp_path / "bad.toml"
    bad.write_text(EXPERIMENT.format(ds=ds, a=a, b=b, selection=selection).replace(
        'method = "median-spec"', 'method = "median-spec"\nstep = 0.1'))
    code, _, err = run_cli(["run", bad, "--work", work], capsys)
    assert code == 1 and "unknown key(s) step; allowed: name, method, models, models_from, consistency\n" in err

    # separate applies a spectral run: the max-spec of the two models' stems of the new file
    song = tmp_path / "song.wav"
    rng = np.random.default_rng(5)
    sf.write(song, (0.1 * rng.standard_normal((30000, 2))).astype(np.float32), 22050, subtype="FLOAT")
    code, _, err = run_cli(["separate", song, "-e", "ens-median", "-o", tmp_path / "out", "--device",
                            "cpu", "--work", work], capsys)
    assert code == 0, err
    from core.store import StemStore

    store = StemStore(work / "store")
    files = [d for d in store.datasets() if d.startswith("files-")][0]
    track = store.tracks(files)[0]
    keys = json.loads((work / "runs" / "ens-median" / "config.json").read_text())["inputs"]["model_keys"]
    stems = np.stack([np.asarray(store.stems(k, files, track), np.float64) for k in keys])
    for j, target in enumerate(MUSDB):
        y, _ = sf.read(tmp_path / "out" / "song" / f"{target}.wav", dtype="float32", always_2d=True)
        want = np_ensemble("median-spec", stems[:, j], None)
        np.testing.assert_allclose(y.T, want, atol=2e-6)


def test_models_from_names_a_selection_of_the_experiments_models(tmp_path):
    from pipeline.experiment import _system_models, validate

    selection = tmp_path / "pick.json"
    selection.write_text(json.dumps({"models": [{"key": "k2", "name": "b"}]}))
    keys, all_keys = {"a": "k1", "b": "k2"}, ["k1", "k2"]
    assert _system_models({"models_from": str(selection)}, keys, all_keys) == ["k2"]
    assert _system_models({}, keys, all_keys) == all_keys
    with pytest.raises(PipelineError, match="chose model k2, which is not among"):
        _system_models({"models_from": str(selection)}, {"a": "k1"}, ["k1"])
    with pytest.raises(PipelineError, match="selection file not found"):
        _system_models({"models_from": str(tmp_path / "none.json")}, keys, all_keys)
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(PipelineError, match="not a selection file"):
        _system_models({"models_from": str(tmp_path / "bad.json")}, keys, all_keys)
    base = {"name": "x", "dataset": {"path": "synthetic"}, "models": [{"spec": "umx-synth"}]}
    with pytest.raises(PipelineError, match="both 'models' and 'models_from'"):
        validate(dict(base, systems=[{"name": "s", "method": "blend", "models": ["a"],
                                      "models_from": "f.json"}]), "x.toml")
    with pytest.raises(PipelineError, match="choose one of blend, band-blend, avg-wave"):
        validate(dict(base, systems=[{"name": "s", "method": "max_fft"}]), "x.toml")
    validate(dict(base, systems=[{"name": "s", "method": "band-blend", "bands": 12,
                                  "band_scale": "octave", "split": "train"}]), "x.toml")


def test_overlap_add_context_makes_block_borders_exact():
    """fn sees `context` samples beyond its segment: a one-sample delay is exact across borders."""
    from core.chunking import overlap_add

    x = torch.randn(3, 1000)
    c = 4

    def delay(chunks):   # [B, 3, c + seg + c] -> the segment delayed by one sample
        return chunks[..., c - 1:-c - 1]
    for segment, overlap in ((100, 0), (128, 16)):
        y = overlap_add(delay, x, segment, window="flattop", overlap=overlap, context=c)
        torch.testing.assert_close(y[:, 1:], x[:, :-1])
        assert torch.all(y[:, 0] == 0)
