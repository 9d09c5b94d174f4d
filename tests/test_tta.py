"""Test-time augmentation (separators.tta) for any base model: known answers.

* a model that commutes with every pass (linear, channel-symmetric, pointwise) gives its plain
  output back, to float rounding;
* a model that does not: the TTA output is the mean of the transformed passes, each computed
  here directly from the definitions (channels swapped, sign inverted, rotated, delayed);
* shifts come from their seed; members are models of their own, the plain one included;
* a cache killed (SIGKILL) in the middle of a TTA run resumes to byte-identical stems.
"""
from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import run_cli, write_four_tracks

from core.store import StemStore
from separators.registry import load_separator
from separators.tta import MAX_SHIFT_SECONDS, plan, with_tta

REPO = Path(__file__).resolve().parents[1]
RATE = 8000
SHARE, LOPSIDED = "py:tta_plugins:share", "py:tta_plugins:lopsided"


@pytest.fixture(autouse=True)
def plugins_importable(monkeypatch):
    monkeypatch.syspath_prepend(str(REPO / "tests"))


def _tta(spec: str, **tta):
    (sep, _), = with_tta(load_separator(spec), tta)
    return sep


def _mixture(n=3001, seed=0):
    return torch.from_numpy((0.3 * np.random.default_rng(seed).standard_normal((2, n))).astype(np.float32))


def test_a_model_that_commutes_with_the_passes_gives_its_plain_output():
    x = _mixture()
    plain = load_separator(SHARE).separate(x)
    tta = _tta(SHARE, tta="flip,polarity,shifts=3,bigshifts=3", tta_seed=1)
    assert len(tta.passes) == 3 * 3 * 3
    torch.testing.assert_close(tta.separate(x), plain, rtol=0, atol=1e-7)


def _lopsided(x: np.ndarray) -> np.ndarray:
    """tta_plugins.Lopsided, in numpy: [2, m] -> [S, 2, m]."""
    left, right = x[0].astype(np.float64), x[1].astype(np.float64)
    ramp = np.linspace(0.5, 1.5, x.shape[-1])
    return np.stack([np.stack([np.tanh(2 * left) * ramp, right ** 2]),
                     np.stack([left * right, -left]),
                     np.stack([right * ramp, 0.5 * left + right ** 3]),
                     np.stack([np.maximum(left, 0), np.sin(right) * ramp])])


def test_tta_is_the_mean_of_the_transformed_passes():
    x = _mixture(n=2999, seed=1)
    seed, n = 4, x.shape[-1]
    tta = _tta(LOPSIDED, tta="flip,polarity,shifts=2,bigshifts=2", tta_seed=seed)
    # the passes, from their definitions: MSST's three (plain, channels swapped, sign inverted)
    # x demucs's seeded delays (zero-padded, up to 0.5 s) x MSST's BigShifts (rotations by n // 2)
    delays = np.random.default_rng(seed).integers(0, int(MAX_SHIFT_SECONDS * RATE) + 1, 2)
    a = x.numpy().astype(np.float64)
    outs = []
    for flip, sign in ((False, 1), (False, -1), (True, 1)):
        for delay in delays:
            for k in range(2):
                y = a[::-1] if flip else a
                y = sign * y
                roll = k * (n // 2)
                y = np.roll(y, roll, axis=-1)
                y = np.pad(y, ((0, 0), (delay, 0)))
                s = _lopsided(y)[..., delay:delay + n]
                s = np.roll(s, -roll, axis=-1)
                s = sign * s
                outs.append(s[:, ::-1] if flip else s)
    want = np.mean(outs, axis=0)
    assert len(outs) == len(tta.passes) == 12
    np.testing.assert_allclose(tta.separate(x).numpy(), want, rtol=0, atol=2e-5)
    # and it is not the plain output: every pass mattered
    assert np.abs(want - _lopsided(a)).max() > 0.05


def test_shifts_come_from_their_seed():
    assert plan("shifts=4", 7, RATE) == plan("shifts=4", 7, RATE)
    assert plan("shifts=4", 7, RATE) != plan("shifts=4", 8, RATE)
    assert all(0 <= p.shift <= MAX_SHIFT_SECONDS * RATE for p in plan("shifts=9", 0, RATE))
    x = _mixture()
    a, b = _tta(LOPSIDED, tta="shifts=3", tta_seed=2), _tta(LOPSIDED, tta="shifts=3", tta_seed=2)
    assert torch.equal(a.separate(x), b.separate(x))
    c = _tta(LOPSIDED, tta="shifts=3", tta_seed=3)
    assert a.identity() != c.identity() and not torch.equal(a.separate(x), c.separate(x))


def test_bad_tta_values_are_one_line_errors(tmp_path, capsys):
    ds = write_four_tracks(tmp_path / "ds", n=RATE, rate=RATE)
    for value, words in (("flop", "'flop' is not flip"), ("shifts=0", "'shifts=0'")):
        code, _, err = run_cli(["cache", "-d", ds, "-m", SHARE, "--tta", value, "--work",
                                tmp_path / "w"], capsys)
        assert code == 1 and words in err and len(err.splitlines()) == 1, err
    code, _, err = run_cli(["cache", "-d", ds, "-m", SHARE, "--tta-members", "--work",
                            tmp_path / "w"], capsys)
    assert code == 1 and "give the passes with --tta" in err


def test_members_are_models_of_their_own_and_load_again(tmp_path, capsys):
    ds = write_four_tracks(tmp_path / "ds", n=RATE, rate=RATE)
    work = tmp_path / "work"
    code, _, err = run_cli(["cache", "-d", ds, "-m", LOPSIDED, "--work", work], capsys)
    assert code == 0, err
    plain = set(StemStore(work / "store").models())
    code, _, err = run_cli(["cache", "-d", ds, "-m", LOPSIDED, "--tta", "flip,polarity",
                            "--tta-members", "--work", work], capsys)
    assert code == 0, err
    store = StemStore(work / "store")
    names = sorted(store.model_info(k)["name"] for k in store.models())
    assert names == ["lopsided", "lopsided+flip", "lopsided+polarity"]
    assert plain <= set(store.models()) and "0 tracks separated, 4 already cached" in err
    code, _, err = run_cli(["cache", "-d", ds, "-m", LOPSIDED, "--tta", "flip,polarity",
                            "--work", work], capsys)
    assert code == 0, err
    t = store.tracks(store.datasets()[0])[0]
    stems = {store.model_info(k)["name"]: np.asarray(store.stems(k, store.datasets()[0], t),
                                                     np.float32) for k in store.models()}
    # the average of the members is the TTA model (each stored in float16)
    mean = np.mean([stems[n] for n in ("lopsided", "lopsided+flip", "lopsided+polarity")], axis=0)
    np.testing.assert_allclose(stems["lopsided+tta"], mean, atol=2e-3)
    # a member loads again from its record, as `pipeline separate` does
    from cache.run import cache_spec

    flip = next(k for k in store.models() if store.model_info(k)["name"] == "lopsided+flip")
    load = store.model_info(flip)["load"]
    assert load["options"] == {"tta_pass": "flip"}
    from core.datasets import open_dataset

    (again,) = cache_spec(store, open_dataset(ds), load["spec"], options=load["options"],
                          progress=False, expect_key=flip)
    assert again["key"] == flip and again["computed"] == 0


CACHE = [sys.executable, "-m", "pipeline.cli", "cache", "-m", f"{LOPSIDED}?delay=0.4",
         "--tta", "flip,polarity"]


def _cache(ds, work):
    env = {"PYTHONPATH": f"{REPO / 'tests'}:{REPO}", "PATH": "/usr/bin:/bin"}
    return subprocess.Popen(CACHE + ["-d", str(ds), "--work", str(work)], env=env, cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def test_a_killed_tta_cache_resumes_to_identical_stems(tmp_path):
    ds = write_four_tracks(tmp_path / "ds", n=RATE, rate=RATE)
    assert _cache(ds, tmp_path / "ref").wait() == 0
    work = tmp_path / "killed"
    proc = _cache(ds, work)
    deadline = time.time() + 120
    while time.time() < deadline and not list(work.glob("store/models/*/*/*/*/manifest.json")):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(work.glob("store/models/*/*/*/*/manifest.json")))
    assert 1 <= done < 4, done   # killed mid-run
    assert _cache(ds, work).wait() == 0

    def stems(root):
        return {p.relative_to(root).as_posix(): p.read_bytes()
                for p in sorted((root / "store" / "models").rglob("stems.npy"))}

    assert stems(tmp_path / "ref") == stems(work) and len(stems(work)) == 4
