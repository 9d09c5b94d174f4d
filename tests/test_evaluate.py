"""The evaluate stage on a small synthetic case: systems, numbers, report files, score cache."""
import json

import numpy as np
import pandas as pd
import pytest
from conftest import write_stem_track

from cache.run import entry_of, ingest_dataset
from core.datasets import open_dataset
from core.metrics import framewise_sdr, track_median, usdr
from core.store import StemStore
from mixer.blend import search_blend
from reports import evaluate as ev

SOURCES = ["drums", "bass", "other", "vocals"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("eval")
    for i, sub in enumerate(["train"] * 2 + ["valid"] * 2 + ["test"] * 3):
        write_stem_track(tmp / "ds", sub, f"song{i}", seed=i, n=8000 * 3 + 500 * i)
    ds = open_dataset(tmp / "ds")
    store = StemStore(tmp / "work" / "store")
    ingest_dataset(store, ds, progress=False)
    rng = np.random.default_rng(0)
    keys = []
    # two "separators" whose stems are leaky linear mixtures of the truth, and a vocals-only one
    for m, (sources, leak) in enumerate([(SOURCES, 0.15), (SOURCES, 0.25), (["vocals"], 0.05)]):
        key = f"model{m}-0000"
        store.write_model_info(key, {"key": key, "name": f"model{m}", "family": "test",
                                     "sources": sources, "sample_rate": 8000, "identity": {}})
        M = np.eye(4) * (1 - leak) + leak * rng.random((4, 4))
        for t in ds.tracks:
            refs = np.asarray(store.references(ds.id, entry_of(t)))
            stems = np.einsum("ij,jcn->icn", M, refs) + 0.02 * rng.standard_normal(refs.shape)
            store.write_stems(key, ds.id, entry_of(t), stems[[SOURCES.index(s) for s in sources]], {})
        keys.append(key)
    search_blend(store, ds.id, keys[:2], step=0.1, run_dir=tmp / "work" / "runs" / "blend")
    return tmp, store, ds, keys


def test_report_files_and_numbers(setup):
    tmp, store, ds, keys = setup
    out = tmp / "report"
    res = ev.evaluate(store, ds.id, models=keys, runs=[tmp / "work" / "runs" / "blend"], split="test",
                      out=out, cache_root=tmp / "work" / "evalcache", progress=False)
    df = pd.read_csv(out / "scores.csv")
    assert list(df.columns) == ["system", "track", "target", "metric", "frame", "value"]
    systems = set(df.system)
    assert {"model0", "model1", "model2", "best per source", "average", "blend",
            "oracle: mixture", "oracle: IRM"} == systems
    # the vocals-only model is scored on vocals only
    assert set(df[df.system == "model2"].target) == {"vocals"}
    # the numbers are the metrics' numbers, recomputed here
    tests = store.tracks(ds.id, "test")
    meds, usdrs = [], []
    for t in tests:
        refs = np.asarray(store.references(ds.id, t))
        est = np.asarray(store.stems(keys[0], ds.id, t), dtype=np.float32)
        meds.append(track_median(framewise_sdr(refs, est, win=8000, hop=8000)))
        usdrs.append(usdr(refs, est))
    expected = np.median(np.stack(meds), axis=0)
    per_track = pd.read_csv(out / "per_track.csv")
    got = per_track[(per_track.system == "model0") & (per_track.track == tests[0].name)]
    np.testing.assert_allclose(got.set_index("target").loc[SOURCES, "SDR_median"], meds[0], atol=1e-9)
    np.testing.assert_allclose(got.set_index("target").loc[SOURCES, "uSDR"], usdrs[0], atol=1e-9)
    md = (out / "summary.md").read_text()
    row = [l for l in md.splitlines() if l.startswith("| model0 |")][0]
    cells = [c.strip().strip("*") for c in row.strip("|").split("|")]
    np.testing.assert_allclose([float(c) for c in cells[1:5]], expected, atol=0.006)
    assert f"{np.mean(expected):.2f}" in cells[5]
    for needle in (ds.id, "test split", "3 tracks", "model0, model1, model2", "Δ avg vs best single",
                   "Best system:", "**"):
        assert needle in md, needle
    # the vocals-only model has no average, so the best single model is model0 or model1
    assert "model2 | — | — | — |" in md
    # museval-compatible JSON that museval itself can read
    import museval

    js = sorted((out / "museval").glob("model0/*/*.json"))
    assert len(js) == 3
    store_ = museval.EvalStore()
    store_.add_eval_dir(out / "museval" / "model0")
    assert set(store_.df.target) == set(SOURCES)
    for png in ("sdr_boxplot.png", "weights-blend.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert json.loads((out / "evaluation.json").read_text())["split"] == "test"


def test_best_per_source_uses_validation(setup):
    tmp, store, ds, keys = setup
    cache = ev.ScoreCache(tmp / "cache-sel")
    bases = [ev.base_system(store, ds.id, k, f"model{i}") for i, k in enumerate(keys)]
    choice = ev.select_best_per_source(store, ds.id, bases, "valid", cache, progress=False)
    for target, [(key, w)] in choice.items():
        assert w == 1.0
        scores = {}
        for b in bases:
            if target in b.targets:
                meds = []
                for t in store.tracks(ds.id, "valid"):
                    refs = np.asarray(store.references(ds.id, t))[[SOURCES.index(target)]]
                    est = b.render(t)[[list(b.targets).index(target)]]
                    meds.append(track_median(framewise_sdr(refs, est, win=8000, hop=8000))[0])
                scores[b.detail["key"]] = np.median(meds)
        assert key == max(scores, key=scores.get)


def test_scores_are_cached_until_the_estimate_changes(setup, monkeypatch):
    tmp, store, ds, keys = setup
    cache = ev.ScoreCache(tmp / "cache-2")
    tracks = store.tracks(ds.id, "test")
    calls = []
    system = ev.base_system(store, ds.id, keys[0], "model0")
    render = system.render
    system.render = lambda t: calls.append(t.name) or render(t)
    a = ev.score_systems(store, ds.id, [system], tracks, cache, progress=False)
    assert len(calls) == 3
    b = ev.score_systems(store, ds.id, [system], tracks, cache, progress=False)
    assert len(calls) == 3
    pd.testing.assert_frame_equal(a, b)
    # new stems for one track -> only that track is scored again
    t = tracks[1]
    stems = np.asarray(store.stems(keys[0], ds.id, t), dtype=np.float32) * 0.5
    store.write_stems(keys[0], ds.id, t, stems, {})
    ev.score_systems(store, ds.id, [system], tracks, cache, progress=False)
    assert calls[3:] == [t.name]


def test_ideal_ratio_mask_beats_mixture(setup):
    tmp, store, ds, keys = setup
    t = store.tracks(ds.id, "test")[0]
    mix, refs = np.asarray(store.mixture(ds.id, t)), np.asarray(store.references(ds.id, t))
    irm = ev.ideal_ratio_mask(mix, refs)
    assert irm.shape == refs.shape
    np.testing.assert_allclose(irm.sum(0), mix, atol=1e-4)  # masks sum to one
    assert usdr(refs, irm).mean() > usdr(refs, np.repeat(mix[None], 4, 0)).mean() + 3


def test_paired_statistics_match_a_direct_computation(setup):
    """paired.csv, evaluation.json and the result: per-track Δ against the best single model,
    recomputed here from the stems with the metrics' own functions."""
    from reports.paired import COLUMNS, RESAMPLES

    tmp, store, ds, keys = setup
    out = tmp / "report-paired"
    res = ev.evaluate(store, ds.id, models=keys, runs=[tmp / "work" / "runs" / "blend"],
                      split="test", out=out, cache_root=tmp / "work" / "evalcache", progress=False)
    tests = store.tracks(ds.id, "test")
    per_track = {}   # model index -> [tracks, its targets] per-track median SDR
    for m, key in enumerate(keys):
        sources = store.model_info(key)["sources"]
        rows = []
        for t in tests:
            refs = np.asarray(store.references(ds.id, t))[[SOURCES.index(s) for s in sources]]
            est = np.asarray(store.stems(key, ds.id, t), dtype=np.float32)
            rows.append(track_median(framewise_sdr(refs, est, win=8000, hop=8000)))
        per_track[m] = np.stack(rows)
    # the best single model: the best average over targets of the median over tracks
    best = max((0, 1), key=lambda m: np.median(per_track[m], axis=0).mean())
    other = 1 - best

    paired = pd.read_csv(out / "paired.csv")
    assert list(paired.columns) == list(COLUMNS)
    assert set(paired.reference) == {f"model{best}"}
    assert f"model{best}" not in set(paired.system)
    assert {"blend", "average", "best per source", "oracle: IRM"} <= set(paired.system)
    assert set(paired[paired.system == "model2"].target) == {"vocals"}   # no average without all

    def expected(deltas):
        d = np.asarray(deltas, dtype=np.float64)
        rng = np.random.default_rng(0)
        means = [d[rng_idx].mean() for rng_idx in rng.integers(0, len(d), size=(RESAMPLES, len(d)))]
        low, high = np.percentile(means, [2.5, 97.5])
        return [len(d), d.mean(), low, high, np.mean(d > 0), np.median(d)]

    numbers = ["n_tracks", "delta_mean", "ci_low", "ci_high", "share_improved", "delta_median"]
    rows = paired.set_index(["system", "target"])
    for j, target in enumerate(SOURCES):
        got = rows.loc[(f"model{other}", target), numbers].to_numpy(dtype=float)
        np.testing.assert_allclose(got, expected(per_track[other][:, j] - per_track[best][:, j]),
                                   atol=1e-9)
    got = rows.loc[(f"model{other}", "average"), numbers].to_numpy(dtype=float)
    np.testing.assert_allclose(
        got, expected(per_track[other].mean(1) - per_track[best].mean(1)), atol=1e-9)
    got = rows.loc[("model2", "vocals"), numbers].to_numpy(dtype=float)
    np.testing.assert_allclose(got, expected(per_track[2][:, 0] - per_track[best][:, 3]), atol=1e-9)

    # the same numbers in evaluation.json, the result and summary.md
    from_json = pd.DataFrame(json.loads((out / "evaluation.json").read_text())["paired"])
    assert from_json[list(COLUMNS)].equals(pd.DataFrame(res["paired"]))
    np.testing.assert_allclose(pd.DataFrame(res["paired"])[numbers].to_numpy(dtype=float),
                               paired[numbers].to_numpy(dtype=float), atol=1e-12)
    md = (out / "summary.md").read_text()
    assert f"vs the best single model (model{best})" in md
    r = rows.loc[(f"model{other}", "average")]
    line = [l for l in md.splitlines() if l.startswith(f"| model{other} |") and "[" in l][0]
    assert f"{r.delta_mean:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]" in line
    assert f"{round(r.share_improved * 3)}/3" in line


def test_bootstrap_interval_known_answers():
    from reports.paired import bootstrap_ci

    assert bootstrap_ci(np.full(5, 0.3)) == pytest.approx((0.3, 0.3))
    # two tracks: resampled means are 0, 1/2, 1 with probabilities 1/4, 1/2, 1/4
    assert bootstrap_ci(np.array([0.0, 1.0])) == (0.0, 1.0)
    # many tracks: close to the normal interval mean +- 1.96 s / sqrt(n)
    d = np.random.default_rng(5).normal(0.4, 1.0, 400)
    half = 1.96 * d.std(ddof=1) / np.sqrt(len(d))
    low, high = bootstrap_ci(d)
    assert low == pytest.approx(d.mean() - half, abs=0.02)
    assert high == pytest.approx(d.mean() + half, abs=0.02)
    assert bootstrap_ci(d) == (low, high)   # a fixed seed
