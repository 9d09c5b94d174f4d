"""Cross-fitted base models (`train-base --folds K`): which fold model separates which track,
resumption after a kill, and the cache key.

A tiny synthetic dataset (5 train tracks: 1 `select`, 4 in two folds; 1 valid; 1 test; 3 s at
8 kHz) and Open-Unmix's `tiny` preset, two folds.
"""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from cache.run import cache_spec, ingest_dataset
from core.errors import PipelineError
from core.store import StemStore
from separators.base import model_key
from separators.crossfit import train
from separators.registry import load_separator

REPO = Path(__file__).resolve().parents[1]
OPTIONS = dict(seed=2, epochs=2, select_split="select", progress=False, device="cpu")


def make_dataset(root: Path):
    from core.datasets import open_dataset
    from core.synth import generate_dataset

    generate_dataset(root, seed=5, n_train=5, n_valid=1, n_test=1, duration=3.0,
                     sample_rate=8000, progress=False)
    return open_dataset(root)


@pytest.fixture(scope="module")
def crossfit(tmp_path_factory):
    torch.set_num_threads(1)
    base = tmp_path_factory.mktemp("crossfit")
    ds = make_dataset(base / "ds")
    store = StemStore(base / "store")
    ingest_dataset(store, ds, progress=False)
    result = train(store, ds.id, "umx", "tiny", base / "runs" / "cf", folds=2, **OPTIONS)
    return store, ds, result


def _fold_lists(run: Path) -> list[set[str]]:
    """Each fold model's training tracks as its own run recorded them (not re-derived)."""
    return [set(json.loads((run / f"fold-{k}" / "config.json").read_text())["splits"]["fit_tracks"])
            for k in (1, 2)]


def _separate(sep, store, ds_id, track) -> np.ndarray:
    from separators.inference import separate_array

    return separate_array(sep, np.asarray(store.mixture(ds_id, track)), 8000)


def test_each_training_track_is_separated_by_the_fold_model_that_never_saw_it(crossfit):
    store, ds, result = crossfit
    run = result.run_dir
    seen = _fold_lists(run)
    train = store.tracks(ds.id, "train")
    select = {t.name for t in store.tracks(ds.id, "select")}
    # the folds split the training tracks outside `select` between them, each model saw the other
    assert len(select) == 1 and not seen[0] & seen[1] and not (seen[0] | seen[1]) & select
    assert seen[0] | seen[1] == {t.name for t in train} - select

    [summary] = cache_spec(store, ds, str(result.model_dir), progress=False)
    assert summary["name"] == "cf" and summary["computed"] == len(ds.tracks)
    folds = [load_separator(str(run / f"fold-{k}" / "model")) for k in (1, 2)]
    for track in store.tracks(ds.id):
        cached = np.asarray(store.stems(summary["key"], ds.id, track), dtype=np.float32)
        outputs = [_separate(f, store, ds.id, track) for f in folds]
        unseen = [i for i in (0, 1) if track.name not in seen[i]]
        if track.split == "train" and track.name not in select:
            assert len(unseen) == 1
            expected, other = outputs[unseen[0]], outputs[1 - unseen[0]]
            # the other fold model's stems are far from what was cached: the check can fail
            assert np.abs(other.astype(np.float16).astype(np.float32) - cached).max() > 1e-2
        else:   # select, valid, test: both fold models are honest, their mean is cached
            assert unseen == [0, 1]
            expected = (torch.from_numpy(outputs[0]) + torch.from_numpy(outputs[1])).numpy() / 2
        np.testing.assert_allclose(cached, expected.astype(np.float16).astype(np.float32),
                                   atol=2e-3 * np.abs(expected).max())

    card = (result.model_dir / "MODEL.md").read_text()
    assert "never saw that track" in card and "mean of the fold models" in card


def test_with_crossfit_unseen_one_other_tracks_get_one_fold_model_picked_by_name(crossfit, tmp_path):
    """crossfit_unseen = "one": a track no fold model trained on is separated by ONE fold model (the
    same one every time, from a hash of its name), a training track as before; another key."""
    import hashlib

    _, ds, result = crossfit
    store = StemStore(tmp_path / "store")
    ingest_dataset(store, ds, progress=False)
    seen = _fold_lists(result.run_dir)
    [mean] = cache_spec(store, ds, str(result.model_dir), progress=False)
    [one] = cache_spec(store, ds, str(result.model_dir), options={"crossfit_unseen": "one"},
                       progress=False)
    assert one["key"] != mean["key"] and one["computed"] == len(ds.tracks)
    assert (mean["name"], one["name"]) == ("cf", "cf+one-fold")
    folds = [load_separator(str(result.run_dir / f"fold-{k}" / "model")) for k in (1, 2)]
    picked = set()
    for track in store.tracks(ds.id):
        cached = np.asarray(store.stems(one["key"], ds.id, track), dtype=np.float32)
        if track.name in seen[0] | seen[1]:   # a training track: the same stems as the mean mode's
            np.testing.assert_array_equal(cached, np.asarray(store.stems(mean["key"], ds.id, track)))
            continue
        k = int.from_bytes(hashlib.sha256(track.name.encode()).digest()[:8], "big") % 2
        picked.add(k)
        expected, other = (_separate(f, store, ds.id, track) for f in (folds[k], folds[1 - k]))
        np.testing.assert_allclose(cached, expected.astype(np.float16).astype(np.float32),
                                   atol=2e-3 * np.abs(expected).max())
        assert np.abs(other.astype(np.float16).astype(np.float32) - cached).max() > 1e-2
    assert picked, "no track outside the folds"
    with pytest.raises(PipelineError, match="crossfit_unseen"):
        cache_spec(store, ds, str(result.model_dir), options={"crossfit_unseen": "median"},
                   progress=False)


def test_the_key_covers_every_folds_weights_and_the_assignment(crossfit, tmp_path):
    import shutil

    store, ds, result = crossfit
    copy = tmp_path / "cf"
    shutil.copytree(result.run_dir, copy)
    key = model_key(load_separator(str(copy / "model")).identity())
    assert key == model_key(load_separator(str(result.model_dir)).identity())   # same files

    weights = sorted((copy / "fold-2" / "model").glob("*.pth"))[0]
    state = torch.load(weights, weights_only=True)
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 1e-3
    torch.save(state, weights)
    changed = model_key(load_separator(str(copy / "model")).identity())
    assert changed != key

    description = json.loads((copy / "model" / "crossfit.json").read_text())
    moved = description["fold_models"][0]["train_tracks"].pop()
    description["fold_models"][1]["train_tracks"].append(moved)
    (copy / "model" / "crossfit.json").write_text(json.dumps(description))
    assert model_key(load_separator(str(copy / "model")).identity()) not in (key, changed)


def test_a_remix_of_tracks_that_every_fold_model_saw_is_refused(crossfit):
    store, ds, result = crossfit
    sep = load_separator(str(result.model_dir))
    seen = _fold_lists(result.run_dir)
    a, b = sorted(seen[0])[0], sorted(seen[1])[0]
    assert sep.honest_folds([(ds.id, a)]) == (1,)
    assert sep.honest_folds([(ds.id, b)]) == (0,)
    assert sep.honest_folds([(ds.id, a), (ds.id, b)]) == ()
    assert sep.honest_folds([("another-dataset", a)]) == (0, 1)


def test_remixes_of_one_fold_are_separated_by_that_folds_model(crossfit, tmp_path):
    """`remix --folds-of`: every remix is cut from the tracks of one fold (as the fold models
    recorded them), and the cross-fitted model separates it with the model that held that fold out."""
    from core.datasets import open_dataset
    from core.remix import RemixParams, remix

    store, ds, result = crossfit
    seen = _fold_lists(result.run_dir)
    params = RemixParams(ds.id, "train", n=4, seed=1, duration=1.0, gain_db=3.0,
                         folds_of=str(result.run_dir))
    manifest = remix(store, params, tmp_path / "remixes", progress=False)
    out = open_dataset(tmp_path / "remixes")
    ingest_dataset(store, out, progress=False)
    [summary] = cache_spec(store, out, str(result.model_dir), progress=False)
    folds = [load_separator(str(result.run_dir / f"fold-{k}" / "model")) for k in (1, 2)]
    assert [r["fold"] for r in manifest["remixes"]] == [1, 2, 1, 2]
    for r in manifest["remixes"]:
        cut_from = {x["track"] for x in r["stems"].values()}
        k = r["fold"] - 1
        assert not cut_from & seen[k] and cut_from <= seen[1 - k]   # one fold's tracks only
        track = next(t for t in store.tracks(out.id) if t.name == r["name"])
        cached = np.asarray(store.stems(summary["key"], out.id, track), dtype=np.float32)
        expected = _separate(folds[k], store, out.id, track)
        np.testing.assert_allclose(cached, expected.astype(np.float16).astype(np.float32),
                                   atol=2e-3 * np.abs(expected).max())
    # the same remixes whatever order the folds' tracks were recorded in, and while the fold
    # models still train (no crossfit.json yet: the folds come from the fold runs)
    import shutil
    for k, edit in enumerate(("reverse", "unlink")):
        early = tmp_path / f"run-{edit}"
        shutil.copytree(result.run_dir, early)
        description = early / "model" / "crossfit.json"
        if edit == "reverse":
            d = json.loads(description.read_text())
            for f in d["fold_models"]:
                f["held_out"].reverse()
            description.write_text(json.dumps(d))
        else:
            description.unlink()
        again = remix(store, RemixParams(ds.id, "train", n=4, seed=1, duration=1.0, gain_db=3.0,
                                         folds_of=str(early)), tmp_path / f"again-{k}", progress=False)
        assert again["remixes"] == manifest["remixes"]
    # without --folds-of a remix mixes the folds, and the cross-fitted model refuses it
    mixed = remix(store, RemixParams(ds.id, "fit", n=6, seed=0, duration=1.0, gain_db=3.0),
                  tmp_path / "mixed", progress=False)
    assert any(len({x["track"] for x in r["stems"].values()} & seen[0]) and
               len({x["track"] for x in r["stems"].values()} & seen[1]) for r in mixed["remixes"])
    other = open_dataset(tmp_path / "mixed")
    ingest_dataset(store, other, progress=False)
    with pytest.raises(PipelineError, match="every fold model trained on some of the audio"):
        cache_spec(store, other, str(result.model_dir), progress=False)


def test_bad_fold_requests_are_one_line_errors(crossfit, tmp_path):
    store, ds, _ = crossfit
    with pytest.raises(PipelineError, match="folds 1: cross-fitting needs at least 2"):
        train(store, ds.id, "umx", "tiny", tmp_path / "a", folds=1, **OPTIONS)
    with pytest.raises(PipelineError, match="folds 5: only 4 training track"):
        train(store, ds.id, "umx", "tiny", tmp_path / "b", folds=5, **OPTIONS)
    with pytest.raises(PipelineError, match="best epoch on 'select'"):
        train(store, ds.id, "umx", "tiny", tmp_path / "c", folds=2,
                   **{**OPTIONS, "select_split": "valid"})


KILLED = """
import sys, torch
torch.set_num_threads(1)
from core.store import StemStore
from separators.crossfit import train
store = StemStore(sys.argv[1])
train(store, sys.argv[2], "umx", "tiny", sys.argv[3], folds=2, seed=2, epochs=4,
           select_split="select", progress=False, device="cpu")
"""


def _states(run: Path) -> dict:
    out = {}
    for k in (1, 2):
        for p in sorted((run / f"fold-{k}" / "model").glob("*.pth")):
            out[f"{k}/{p.name}"] = torch.load(p, weights_only=True)
    return out


def test_a_fold_killed_mid_training_resumes_to_the_same_weights(crossfit, tmp_path):
    store, ds, _ = crossfit
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    subprocess.run([sys.executable, "-c", KILLED, str(store.root), ds.id, str(whole)], env=env,
                   check=True)

    proc = subprocess.Popen([sys.executable, "-c", KILLED, str(store.root), ds.id, str(killed)],
                            env=env)
    last = killed / "fold-2" / "last.pt"
    deadline = time.monotonic() + 600
    while not last.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    # killed inside fold 2: fold 1 finished, fold 2 has a checkpoint but no export
    assert (killed / "fold-1" / "training.json").exists()
    assert last.exists() and not (killed / "fold-2" / "training.json").exists()
    assert not (killed / "model" / "crossfit.json").exists()

    subprocess.run([sys.executable, "-c", KILLED, str(store.root), ds.id, str(killed)], env=env,
                   check=True)
    a, b = _states(whole), _states(killed)
    assert a.keys() == b.keys() and len(a) >= 8
    assert all(torch.equal(a[f][k], b[f][k]) for f in a for k in a[f])
    assert (json.loads((whole / "model" / "crossfit.json").read_text())["fold_models"]
            == json.loads((killed / "model" / "crossfit.json").read_text())["fold_models"])
