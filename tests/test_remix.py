"""`pipeline remix` (core.remix) and fitting on several datasets at once (mixer.data).

Remixes: bit-identical from the seed, each stem the recorded gain times the recorded piece of
the recorded track, stems summing to the mixture. Fitting on two datasets: a known answer where
the best weights differ between the datasets and the fit on both lands between them.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import write_stem_track

from cache.run import ingest_dataset
from core.datasets import open_dataset
from core.errors import PipelineError
from core.remix import RemixParams, origins, remix
from core.store import StemStore, TrackEntry

SOURCES = ("drums", "bass", "other", "vocals")


@pytest.fixture
def source(tmp_path):
    root = tmp_path / "ds"
    for i in range(6):
        write_stem_track(root, "train", f"song{i}", n=8000 + 500 * i, rate=8000, seed=i)
    write_stem_track(root, "valid", "held", n=8000, rate=8000, seed=9)
    store = StemStore(tmp_path / "store")
    ds = open_dataset(root)
    ingest_dataset(store, ds, progress=False)
    return store, ds


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_remixes_are_bit_identical_from_their_seed_and_their_stems_are_what_they_record(source, tmp_path):
    store, ds = source
    params = RemixParams(ds.id, "train", n=5, seed=3, duration=0.75, gain_db=3.0)
    manifest = remix(store, params, tmp_path / "a", progress=False)
    remix(store, params, tmp_path / "b", progress=False)
    assert _files(tmp_path / "a") == _files(tmp_path / "b") and len(_files(tmp_path / "a")) == 1 + 5 * 5
    other = remix(store, RemixParams(ds.id, "train", 5, 4, 0.75, 3.0), tmp_path / "c", progress=False)
    assert other["remixes"] != manifest["remixes"]

    valid = {t.name for t in store.tracks(ds.id, "valid")}
    tracks = {t.name: t for t in store.tracks(ds.id)}
    used = set()
    for r in manifest["remixes"]:
        d = tmp_path / "a" / "train" / r["name"]
        stems = np.stack([sf.read(d / f"{s}.wav", dtype="float32")[0].T for s in SOURCES])
        mixture = sf.read(d / "mixture.wav", dtype="float32")[0].T
        assert stems.shape == (4, 2, 6000)
        np.testing.assert_array_equal(stems.sum(0, dtype=np.float32), mixture)
        for j, s in enumerate(SOURCES):
            rec = r["stems"][s]
            assert rec["track"] not in valid and abs(rec["gain_db"]) <= 3.0
            refs = np.asarray(store.references(ds.id, tracks[rec["track"]]))
            piece = refs[j, :, rec["offset"]:rec["offset"] + 6000]
            np.testing.assert_array_equal(stems[j], piece * np.float32(rec["gain"]))
            used.add((rec["track"], rec["offset"]))
    assert len({t for t, _ in used}) > 2 and len({o for _, o in used}) > 2   # random tracks, starts

    # stored, a remix says which tracks its audio came from
    out = open_dataset(tmp_path / "a")
    ingest_dataset(store, out, progress=False)
    first = manifest["remixes"][0]
    entry = next(t for t in store.tracks(out.id) if t.name == first["name"])
    assert sorted(origins(store, out.id, entry)) == sorted(
        {(ds.id, x["track"]) for x in first["stems"].values()})
    assert origins(store, ds.id, store.tracks(ds.id)[0]) == [(ds.id, store.tracks(ds.id)[0].name)]


def test_a_folder_holding_other_remixes_is_not_overwritten(source, tmp_path):
    store, ds = source
    remix(store, RemixParams(ds.id, "train", 2, 0, 0.5, 3.0), tmp_path / "r", progress=False)
    before = _files(tmp_path / "r")
    with pytest.raises(PipelineError, match="holds other remixes.*--force"):
        remix(store, RemixParams(ds.id, "train", 2, 1, 0.5, 3.0), tmp_path / "r", progress=False)
    assert _files(tmp_path / "r") == before
    (tmp_path / "x").mkdir()
    (tmp_path / "x" / "notes.txt").write_text("mine")
    with pytest.raises(PipelineError, match="not a remix folder"):
        remix(store, RemixParams(ds.id, "train", 2, 1, 0.5, 3.0), tmp_path / "x", progress=False)
    with pytest.raises(PipelineError, match="no 'test' tracks"):
        remix(store, RemixParams(ds.id, "test", 2, 1, 0.5, 3.0), tmp_path / "y", progress=False)


# ---- fitting on two datasets -----------------------------------------------------------------
RATE, LENGTH = 1000, 8000


def two_datasets(root: Path, noise: dict[str, tuple[float, float]], n_tracks=2, seed=0) -> StemStore:
    """Datasets named as `noise`'s keys, each with two models m0, m1 whose stems are the
    references plus white noise of the given standard deviations (references: std 0.1)."""
    rng = np.random.default_rng(seed)
    store = StemStore(root)
    for key in ("m0", "m1"):
        store.write_model_info(key, {"key": key, "name": key, "sources": list(SOURCES)})
    for ds, sigmas in noise.items():
        tracks = [TrackEntry(f"{ds}{i}", "train", "train", LENGTH) for i in range(n_tracks)]
        store.write_dataset_info(ds, {"id": ds, "sources": list(SOURCES), "sample_rate": RATE,
                                      "tracks": [{"name": t.name, "subset": t.subset,
                                                  "split": t.split, "length": t.length}
                                                 for t in tracks]})
        for t in tracks:
            refs = (0.1 * rng.standard_normal((4, 2, LENGTH))).astype(np.float32)
            store.write_track(ds, t, refs.sum(0), refs, {})
            for key, sigma in zip(("m0", "m1"), sigmas):
                store.write_stems(key, ds, t, refs + sigma * rng.standard_normal(refs.shape), {})
    return store


# In A model m0 is twice as accurate as m1 (noise 0.05 vs 0.1): the best blend gives m0
# 0.1^2 / (0.05^2 + 0.1^2) = 0.8; in B the other way round, 0.2; pooled, 0.5 by symmetry. (SDR of
# w0 = 0.5 on every track: 5.1 dB; w0 = 0.8: 7.0 dB on A, 1.9 dB on B, so the pooled fit
# really is between the two.)
NOISE = {"A": (0.05, 0.1), "B": (0.1, 0.05)}


def test_the_blend_fitted_on_two_datasets_lands_between_their_optima(tmp_path):
    from mixer import methods

    store = two_datasets(tmp_path / "store", NOISE)
    w = {}
    for name, ds, extra in (("A", "A", []), ("B", "B", []), ("AB", "A", ["B"]), ("BA", "B", ["A:train"])):
        for method in ("blend", "band-blend"):
            options = {"split": "train", "step": 0.05, "extra_data": extra}
            if method == "band-blend":
                options["bands"] = 2
            config = methods.fit(store, ds, ["m0", "m1"], method, tmp_path / f"{method}-{name}",
                                 options, progress=False)
            weights = config["weights"]["vocals"]["m0"]
            w[method, name] = float(np.mean(weights))
        assert len(config["validation"]["tracks"]) == (4 if extra else 2)
    for method in ("blend", "band-blend"):
        assert abs(w[method, "A"] - 0.8) <= 0.05 and abs(w[method, "B"] - 0.2) <= 0.05
        assert abs(w[method, "AB"] - 0.5) <= 0.05 and w[method, "BA"] == w[method, "AB"]


def wiener(noise: list[tuple[float, float]], ref: float = 0.1) -> np.ndarray:
    """The linear (unconstrained) least-squares weights of (m0, m1) for one source over data
    whose halves have these noise levels: sigma_r^2 (sigma_r^2 11^T + diag(mean noise power))^-1 1.
    The conv1x1 learns a free matrix, so this is its optimum (L1 and L2 agree for Gaussian
    errors), not the blend's convex one."""
    power = np.mean(np.square(noise), axis=0)
    cov = ref ** 2 * np.ones((2, 2)) + np.diag(power)
    return ref ** 2 * np.linalg.solve(cov, np.ones(2))


def test_the_conv1x1_trained_on_two_datasets_learns_from_both(tmp_path):
    from mixer.train import train_mixer

    torch.manual_seed(0)
    store = two_datasets(tmp_path / "store", NOISE)
    want = {"A": wiener([NOISE["A"]]), "B": wiener([NOISE["B"]]), "AB": wiener(list(NOISE.values()))}
    # A: (0.67, 0.17), B: (0.17, 0.67), both: (0.38, 0.38)
    assert want["A"][0] > want["AB"][0] + 0.25 and want["B"][0] < want["AB"][0] - 0.2
    w = {}
    for name, ds, extra in (("A", "A", ()), ("B", "B", ()), ("AB", "A", ("B",))):
        run = tmp_path / name
        train_mixer(store, ds, ["m0", "m1"], "conv1x1", run, with_mixture=False, T=1024,
                    shift=128, epochs=20, batch=4, lr=1e-2, select="last", device="cpu",
                    progress=False, extra_data=extra)
        W = torch.load(run / "mixer.pt", weights_only=True)["weight"].numpy()   # [16, 8]
        # m0's and m1's weight on each output channel (input rows 0-7 are m0's, 8-15 m1's)
        w[name] = np.array([np.mean([W[i, i] for i in range(8)]),
                            np.mean([W[8 + i, i] for i in range(8)])])
        config = json.loads((run / "config.json").read_text())
        assert config["training"].get("extra_data", []) == list(extra)
    for name in want:
        np.testing.assert_allclose(w[name], want[name], atol=0.05, err_msg=name)


def test_extra_data_must_match_and_be_cached(tmp_path):
    from mixer import methods

    store = two_datasets(tmp_path / "store", NOISE)
    with pytest.raises(PipelineError, match="extra data 'C': neither a dataset"):
        methods.fit(store, "A", ["m0", "m1"], "blend", None, {"split": "train", "extra_data": ["C"]})
    with pytest.raises(PipelineError, match="already fitted on"):
        methods.fit(store, "A", ["m0", "m1"], "blend", None, {"split": "train", "extra_data": ["A"]})
    other = two_datasets(tmp_path / "store2", {"C": (0.1, 0.1)})
    info = other.dataset_info("C")
    store.write_dataset_info("C", {**info, "sources": ["vocals", "accompaniment"]})
    with pytest.raises(PipelineError, match="extra data C: sources"):
        methods.fit(store, "A", ["m0", "m1"], "blend", None, {"split": "train", "extra_data": ["C"]})
    store.write_dataset_info("C", info)
    with pytest.raises(PipelineError, match="without stems of model m0"):
        methods.fit(store, "A", ["m0", "m1"], "blend", None, {"split": "train", "extra_data": ["C"]})
