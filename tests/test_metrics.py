"""core.metrics against museval itself: framewise SDR (real MUSDB18-7 tracks and edge cases),
uSDR known answers, EvalStore/MethodStore aggregation, the per-track JSON, full BSSEval.

museval costs ~20 s per 7 s 4-source track here, so each real track is evaluated once (module
fixtures) with a different perturbation per source, and edge cases use small synthetic tracks."""
import functools
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import MUSDB18_7, musdb18_7_present, needs_musdb18_7

from core import metrics as M

W = 44100


def museval_sdr(refs, ests, win=W, hop=W):
    """museval.evaluate's SDR on our [S, C, N] layout."""
    import museval

    return museval.evaluate(np.moveaxis(refs, 1, 2), np.moveaxis(ests, 1, 2), win=win, hop=hop)[0]


def assert_same_sdr(ours, theirs, tol=1e-6, some_finite=True):
    assert ours.shape == theirs.shape
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(theirs))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    ok = np.isfinite(theirs)
    assert ok.any() or not some_finite
    np.testing.assert_allclose(ours[ok], theirs[ok], rtol=0, atol=tol)


def load_track(i):
    import musdb

    track = musdb.DB(root=str(MUSDB18_7), subsets="train", split="valid").tracks[i]
    stems = np.stack([track.targets[s].audio.T for s in M.SOURCES])  # [4, 2, N]
    return track.name, stems, track.audio.T


# ------------------------------------------------------------------------ real tracks


@pytest.fixture(scope="module")
def real4():
    """Track 0, 4 sources, float32, museval.evaluate's defaults (1 s windows, 1 s hop); cut to
    5 s + 1000 samples (museval's FFTs halve below 2^18 samples; a partial window remains)."""
    name, refs, mix = load_track(0)
    refs, mix = refs[..., :5 * W + 1000].astype(np.float32), mix[..., :5 * W + 1000].astype(np.float32)
    refs[1, :, 4 * W:5 * W] = 0  # silent bass reference in window 4
    rng = np.random.default_rng(0)
    ests = np.stack([
        refs[0] + 0.3 * refs[0].std() * rng.standard_normal(refs[0].shape).astype(np.float32),
        refs[2],  # bass and other swapped
        refs[1],
        mix / 4,
    ])
    ests[0, :, 2 * W:3 * W] = 0  # silent drums estimate in window 2
    return name, refs, ests, museval_sdr(refs, ests)


@needs_musdb18_7
def test_framewise_sdr_matches_museval_on_real_4_sources(real4):
    _, refs, ests, theirs = real4
    ours = M.framewise_sdr(refs, ests)
    assert_same_sdr(ours, theirs)
    assert ours.shape == (4, refs.shape[-1] // W)  # trailing partial second dropped
    assert np.isnan(ours[:, [2, 4]]).all() and not np.isnan(ours[:, [0, 1, 3]]).any()


@needs_musdb18_7
def test_framewise_sdr_matches_museval_on_real_vocals_accompaniment_overlapping():
    """museval's vocals/accompaniment scenario on track 1 (first 5 s), float64, 1 s windows with
    0.5 s hop."""
    _, stems, mix = load_track(1)
    stems, mix = stems[..., :5 * W], mix[..., :5 * W]
    refs = np.stack([stems[3], stems[:3].sum(0)])
    ests = np.stack([refs[0] + 0.4 * refs[1], mix - refs[0] - 0.4 * refs[1] + 0.01])
    ests[0, :, -3 * W // 2:] = 0  # silent vocals estimate over the last 1.5 s: last window NaN
    theirs = museval_sdr(refs, ests, W, W // 2)
    assert_same_sdr(M.framewise_sdr(refs, ests, W, W // 2), theirs)
    assert np.isnan(theirs[:, -1]).all()


# ------------------------------------------------------------------------ edge cases


def noise(shape, seed=1, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_edge_frames_match_museval(dtype):
    win = 2000
    refs = noise((2, 2, 5 * win + 777), 1, dtype)
    ests = refs + 0.3 * noise(refs.shape, 2, dtype)
    refs[0, :, win:2 * win] = 0  # silent reference in one window
    ests[1, :, 3 * win:4 * win] = 0  # silent estimate in one window
    refs[1, 1, 2 * win:3 * win] = -refs[1, 0, 2 * win:3 * win]  # channels cancel: museval says silent
    ests[0, 0, 4 * win + 5] = 0  # a few zero samples do not make a window silent
    theirs = museval_sdr(refs, ests, win, win)
    ours = M.framewise_sdr(refs, ests, win, win)
    assert_same_sdr(ours, theirs)
    assert np.isnan(ours[:, 1:4]).all() and not np.isnan(ours[:, [0, 4]]).any()


@pytest.mark.parametrize("n", [1500, 2000, 2001, 3999])
def test_short_tracks_are_one_whole_track_frame(n):
    """Shorter than (or equal to) a window: museval's Framing makes one frame of the whole
    track; a little longer: one full window, the rest dropped."""
    refs = noise((2, 2, n), 3)
    ests = refs + noise(refs.shape, 4)
    ours = M.framewise_sdr(refs, ests, 2000, 2000)
    assert_same_sdr(ours, museval_sdr(refs, ests, 2000, 2000))
    m = min(n, 2000)
    d = ests[..., :m] - refs[..., :m]
    np.testing.assert_allclose(ours[:, 0], 10 * np.log10((refs[..., :m] ** 2).sum((1, 2)) / (d ** 2).sum((1, 2))))
    assert M.framewise_sdr(refs, ests, np.inf, np.inf).shape == (2, 1)


def test_window_hop_framing_matches_museval():
    refs = noise((2, 2, 6000), 5)
    ests = refs + noise(refs.shape, 6)
    for win, hop in [(2000, 700), (1500, 2500)]:
        ours = M.framewise_sdr(refs, ests, win, hop)
        assert ours.shape[1] == int(np.floor((6000 - win) / hop + 1))
        assert_same_sdr(ours, museval_sdr(refs, ests, win, hop))


def test_estimates_are_padded_or_cut_like_museval():
    refs = noise((2, 2, 6000), 7)
    ests = refs + noise(refs.shape, 8)
    for m in (4500, 7000):
        e = ests[..., :m] if m < 6000 else np.pad(ests, [(0, 0), (0, 0), (0, m - 6000)], constant_values=1)
        assert_same_sdr(M.framewise_sdr(refs, e, 2000, 2000), museval_sdr(refs, e, 2000, 2000))


def test_perfect_estimate_is_inf():
    """Zero distortion: museval's _safe_db gives +inf (no eps) for a perfect estimate. A perfect
    window inside an imperfect estimate is +inf here too, while museval returns a rounding
    artefact there (> 300 dB): its decomposition does not cancel to exactly zero."""
    refs = noise((2, 2, 6000), 9)
    assert_same_sdr(M.framewise_sdr(refs, refs.copy(), 2000, 2000),
                    museval_sdr(refs, refs.copy(), 2000, 2000), some_finite=False)
    assert np.isposinf(M.framewise_sdr(refs, refs.copy(), 2000, 2000)).all()
    ests = refs + noise(refs.shape, 10)
    ests[0, :, 2000:4000] = refs[0, :, 2000:4000]
    ours, theirs = M.framewise_sdr(refs, ests, 2000, 2000), museval_sdr(refs, ests, 2000, 2000)
    assert np.isposinf(ours[0, 1]) and theirs[0, 1] > 300
    ours[0, 1] = theirs[0, 1] = 0
    assert_same_sdr(ours, theirs)


def test_whole_track_silent_source_is_all_nan():
    """museval refuses it (ValueError); we return NaN frames."""
    refs = noise((2, 2, 6000), 11)
    ests = refs + noise(refs.shape, 12)
    ests[1] = 0
    assert np.isnan(M.framewise_sdr(refs, ests, 2000, 2000)).all()


# ------------------------------------------------------------------------ uSDR


def test_usdr_known_answers():
    refs = noise((3, 2, 5000), 13)
    e = refs.copy()
    e[0] *= 0.5  # 10 log10(1 / 0.25)
    e[1] = 0  # (E + eps) / (E + eps)
    out = M.usdr(refs, e)
    np.testing.assert_allclose(out[:2], [10 * np.log10(4), 0], atol=1e-9)
    energy = (refs[2] ** 2).sum()
    np.testing.assert_allclose(out[2], 10 * np.log10((energy + 1e-7) / 1e-7))  # finite
    assert abs(M.usdr(np.zeros((1, 2, 10)), np.zeros((1, 2, 10)))[0]) < 1e-12


# ------------------------------------------------------------------------ aggregation & JSON


def fake_scores(seed, n_frames):
    """{target: {metric: frames}} with NaN windows, +-inf, an all-NaN target/metric."""
    rng = np.random.default_rng(seed)
    scores = {}
    for t in M.SOURCES:
        values = {m: rng.normal(5, 4, n_frames) for m in M.BSSEVAL_METRICS}
        values["SDR"][rng.random(n_frames) < 0.2] = np.nan
        values["SIR"][0] = np.inf
        values["SAR"][1] = -np.inf
        scores[t] = values
    if seed % 3 == 0:
        scores["vocals"]["SDR"][:] = np.nan  # a track without a vocals SDR
    return scores


def long_from(system, track, scores):
    return M.to_long({m: np.stack([scores[t][m] for t in M.SOURCES]) for m in M.BSSEVAL_METRICS},
                     track=track, targets=M.SOURCES, system=system)


@pytest.fixture
def stores(request):
    """Two systems x four tracks as museval TrackStores and as our long table; sysA's first
    track carries museval's real SDR frames when MUSDB18-7 is there."""
    import museval

    real = request.getfixturevalue("real4") if musdb18_7_present() else None
    tracks, frames = {}, []
    for k, system in enumerate(["sysA", "sysB"]):
        for i in range(4):
            track = f"track {i}"
            scores = fake_scores(10 * k + i, 5 + i)  # odd and even frame counts
            if (k, i) == (0, 0) and real is not None:  # museval's SDR frames, NaN windows too
                track = real[0]
                for j, t in enumerate(M.SOURCES):
                    scores[t]["SDR"] = real[3][j]
                assert real[3].shape[1] == 5
            store = museval.TrackStore(track_name=track)
            for t, values in scores.items():
                store.add_target(t, {m: list(v) for m, v in values.items()})
            tracks[system, track] = (store, scores)
            frames.append(long_from(system, track, scores))
    return tracks, pd.concat(frames, ignore_index=True)


def museval_aggregate(tracks, tracks_agg):
    import museval

    methods = museval.MethodStore(tracks_agg=tracks_agg)
    for system in ["sysA", "sysB"]:
        store = museval.EvalStore(tracks_agg=tracks_agg)
        for (s, _), (track_store, _) in tracks.items():
            if s == system:
                store.add_track(track_store)
        methods.add_evalstore(store, system)
    return methods.agg_frames_tracks_scores().rename_axis(["system", "target", "metric"])


def test_aggregate_matches_museval_evalstore(stores, tmp_path):
    tracks, df = stores
    ours = M.aggregate(df)
    med, mean = museval_aggregate(tracks, "median"), museval_aggregate(tracks, "mean")
    assert med.isna().sum() == 0 and ours.n_tracks.min() < 4  # all-NaN vocals SDR tracks skipped
    # museval stores 5 decimals; raw values agree to that
    pd.testing.assert_series_equal(ours.median_median, med, check_names=False, atol=1e-5, rtol=0)
    pd.testing.assert_series_equal(ours.mean_median, mean, check_names=False, atol=1e-5, rtol=0)

    # through museval's JSON files the numbers are identical
    for system in ["sysA", "sysB"]:
        for (s, track), (_, scores) in tracks.items():
            if s == system:
                M.write_museval_json(tmp_path / system, track, M.museval_json(scores))
    loaded = pd.concat([M.read_museval_json(p, system=system)
                        for system in ["sysA", "sysB"]
                        for p in sorted((tmp_path / system / "test").glob("*.json"))])
    ours = M.aggregate(loaded)
    pd.testing.assert_series_equal(ours.median_median, med, check_names=False, rtol=0, atol=1e-12)
    pd.testing.assert_series_equal(ours.mean_median, mean, check_names=False, rtol=0, atol=1e-12)
    import museval

    store = museval.EvalStore()
    store.add_eval_dir(tmp_path / "sysA")  # sigsep's reader takes our files
    theirs = store.agg_frames_tracks_scores()
    np.testing.assert_allclose(ours.loc["sysA"].median_median.sort_index(), theirs.sort_index(), atol=1e-12)


def test_array_aggregation_and_usdr_rows():
    frames = np.array([[1.0, np.nan, 3.0, np.inf], [np.nan, np.nan, np.nan, np.nan]])
    np.testing.assert_array_equal(M.track_median(frames), [2.0, np.nan])
    per_track = np.array([[1.0, 2.0], [3.0, np.nan], [8.0, 4.0]])
    np.testing.assert_array_equal(M.median_over_tracks(per_track), [3.0, 3.0])
    np.testing.assert_array_equal(M.mean_over_tracks(per_track), [4.0, 3.0])
    df = pd.concat([M.to_long({"uSDR": np.array([v, 2 * v])}, track=f"t{i}", targets=["a", "b"], system="s")
                    for i, v in enumerate([1.0, 2.0, 6.0])])
    agg = M.aggregate(df)
    assert agg.loc[("s", "a", "uSDR")].tolist() == [2.0, 3.0, 3]
    assert agg.loc[("s", "b", "uSDR")].tolist() == [4.0, 6.0, 3]


def test_museval_json_is_trackstore_json_and_round_trips(tmp_path):
    import jsonschema
    import museval

    scores = fake_scores(1, 5)
    store = museval.TrackStore(track_name="x", win=1.0, hop=1.0)  # as eval_mus_track makes it
    for t, values in scores.items():
        store.add_target(t, values)
    doc = M.museval_json(scores, win=W, hop=W, rate=W)
    assert M.dumps_museval_json(doc) == store.json  # byte for byte what museval writes
    schema = json.loads((Path(museval.__file__).parent / "musdb.schema.json").read_text())
    jsonschema.validate(doc, schema)
    path = M.write_museval_json(tmp_path, "My Track - 1", doc)
    jsonschema.validate(json.loads(path.read_text()), schema)

    back = M.read_museval_json(path, system="s")
    assert set(back.track) == {"My Track - 1"}
    expect = long_from("s", "My Track - 1", scores)
    expect["value"] = np.where(np.isinf(expect.value), np.nan, expect.value.round(5))
    key = ["target", "metric", "frame"]
    back, expect = (d.sort_values(key).reset_index(drop=True) for d in (back, expect))
    pd.testing.assert_frame_equal(back, expect, check_dtype=False, atol=1e-12)
    # museval's own reader sees the same frames
    theirs = museval.json2df(json.loads(path.read_text()), "My Track - 1")
    assert len(theirs) == len(back) and np.isnan(theirs.score).sum() == np.isnan(back.value).sum()


def test_museval_json_fills_missing_bsseval_metrics():
    doc = M.museval_json({"vocals": {"SDR": [1.0, np.inf]}}, win=W, hop=W // 2, rate=W)
    frames = doc["targets"][0]["frames"]
    assert [f["time"] for f in frames] == [0.0, 0.5] and frames[0]["duration"] == 1.0
    assert list(frames[0]["metrics"]) == ["SDR", "SIR", "SAR", "ISR"]
    assert float(frames[0]["metrics"]["SDR"]) == 1.0 and np.isnan(float(frames[1]["metrics"]["SDR"]))
    assert np.isnan(float(frames[0]["metrics"]["ISR"]))


# ------------------------------------------------------------------------ full BSSEval


def _tiny(seed):
    """A picklable loader for TrackJob (module level so spawned workers can import it)."""
    refs = noise((2, 2, 3 * 2000), seed)
    return refs, refs + 0.5 * noise(refs.shape, seed + 100)


def test_full_bsseval_equals_museval(monkeypatch):
    import museval

    jobs = [("one", *_tiny(1)), M.TrackJob("two", functools.partial(_tiny, 2), n_samples=6000, n_sources=2)]
    # "fork": the default forkserver would import museval afresh per worker, ~10 s on busy cores
    df = M.full_bsseval(jobs, targets=["vocals", "accompaniment"], system="sys", win=2000, hop=2000,
                        max_workers=2, start_method="fork")
    assert list(df.columns) == M.LONG_COLUMNS and set(df.system) == {"sys"}
    for name, seed in [("one", 1), ("two", 2)]:
        refs, ests = _tiny(seed)
        theirs = museval.evaluate(np.moveaxis(refs, 1, 2), np.moveaxis(ests, 1, 2), win=2000, hop=2000)
        for metric, values in zip(M.BSSEVAL_METRICS, theirs):
            for j, target in enumerate(["vocals", "accompaniment"]):
                got = df[(df.track == name) & (df.target == target) & (df.metric == metric)]
                np.testing.assert_allclose(got.sort_values("frame").value, values[j], rtol=0, atol=1e-9)
    # one worker runs in-process and gives the same table
    monkeypatch.setattr(M, "available_memory_bytes", lambda: 1)
    inline = M.full_bsseval(jobs[1:], targets=["vocals", "accompaniment"], system="sys", win=2000, hop=2000)
    pd.testing.assert_frame_equal(inline, df[df.track == "two"].reset_index(drop=True))


def test_worker_count_is_bounded_by_memory(monkeypatch):
    def museval_part(seconds):  # less the worker's float64 audio and interpreter
        n = int(seconds * 44100)
        return M.bsseval_peak_bytes(n) - 2 * 4 * 2 * n * 8 - M.WORKER_BASE_BYTES

    assert museval_part(240) == pytest.approx(6.8e9)
    assert museval_part(60) == pytest.approx(6.8e9 / 4, rel=0.01)
    assert museval_part(260) == pytest.approx(6.8e9 * 260 / 240)
    assert museval_part(200) == pytest.approx(6.8e9)  # same FFT size as 240 s
    monkeypatch.setattr(M, "_cpu_count", lambda: 16)
    monkeypatch.setattr(M, "available_memory_bytes", lambda: 20e9)
    assert M.bsseval_workers(M.bsseval_peak_bytes(240 * 44100), 100) == 2
    assert M.bsseval_workers(M.bsseval_peak_bytes(7 * 44100), 100) == 16
    assert M.bsseval_workers(M.bsseval_peak_bytes(7 * 44100), 3) == 3
    assert M.bsseval_workers(1e12, 100) == 1
    monkeypatch.undo()
    assert 0 < M.available_memory_bytes() < 1 << 50
