"""The stem store and the cache stage: resume after SIGKILL, verify, shards, import, ls."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from conftest import REPO, run_cli, write_stem_track
from store_helpers import GainSeparator
from cache.run import cache_model, ingest_dataset, parse_shard
from cache.store import StemStore
from pipeline.datasets import open_dataset
from pipeline.errors import PipelineError


@pytest.fixture
def ds_root(tmp_path):
    root = tmp_path / "ds"
    for i in range(6):
        write_stem_track(root, ["train", "valid", "test"][i % 3], f"song {i}", seed=i, n=8000 + 100 * i)
    return root


def _store_files(store):
    return {str(p.relative_to(store.root)): p.read_bytes()
            for p in sorted(store.root.rglob("*.npy"))}


def test_cache_writes_entries_and_skips_complete(tmp_path, ds_root):
    store, ds = StemStore(tmp_path / "store"), open_dataset(ds_root)
    assert ingest_dataset(store, ds, progress=False) == 6
    assert ingest_dataset(store, ds, progress=False) == 0
    sep = GainSeparator()
    s = cache_model(store, ds, sep, progress=False)
    assert s["computed"] == 6 and s["skipped"] == 0
    assert cache_model(store, ds, sep, progress=False)["computed"] == 0
    t = store.tracks(ds.id)[1]
    stems, mix = store.stems(s["key"], ds.id, t), store.mixture(ds.id, t)
    assert isinstance(stems, np.memmap) and stems.dtype == np.float16 and stems.shape == (4, 2, t.length)
    np.testing.assert_allclose(stems[3], 0.4 * mix, atol=1e-3)
    np.testing.assert_array_equal(store.references(ds.id, t), ds.tracks[1].stems())
    manifest = json.loads((store.stems_dir(s["key"], ds.id, t) / "manifest.json").read_text())
    for field in ("model", "identity", "versions", "sample_rate", "length", "sha256", "seconds"):
        assert field in manifest
    # any change of options or weights gives a new key: stale stems are never reused
    assert cache_model(store, ds, GainSeparator(delay=0.001), progress=False)["key"] != s["key"]
    assert cache_model(store, ds, sep, progress=False, force=True)["computed"] == 6


def test_model_with_more_or_fewer_sources(tmp_path, ds_root):
    store, ds = StemStore(tmp_path / "store"), open_dataset(ds_root)
    ingest_dataset(store, ds, progress=False)
    six = GainSeparator("six", ("drums", "bass", "other", "vocals", "guitar", "piano"))
    one = GainSeparator("vox", ("vocals",))
    for sep in (six, one):
        key = cache_model(store, ds, sep, progress=False)["key"]
        assert store.model_info(key)["sources"] == list(sep.sources)
        assert store.stems(key, ds.id, store.tracks(ds.id)[0]).shape[0] == len(sep.sources)


SCRIPT = textwrap.dedent("""
    import sys
    sys.path[:0] = [{tests!r}, {repo!r}]
    from store_helpers import GainSeparator
    from cache.run import cache_model, ingest_dataset
    from cache.store import StemStore
    from pipeline.datasets import open_dataset
    store, ds = StemStore({store!r}), open_dataset({ds!r})
    ingest_dataset(store, ds, progress=False)
    cache_model(store, ds, GainSeparator(delay={delay}), progress=False)
""")


def _run_script(store, ds_root, delay=0.0):
    code = SCRIPT.format(tests=str(REPO / "tests"), repo=str(REPO), store=str(store),
                         ds=str(ds_root), delay=delay)
    return subprocess.Popen([sys.executable, "-c", code])


def test_resume_after_sigkill_equals_uninterrupted(tmp_path, ds_root):
    ref_store = tmp_path / "ref"
    assert _run_script(ref_store, ds_root, delay=0.3).wait() == 0
    store = tmp_path / "killed"
    proc = _run_script(store, ds_root, delay=0.3)
    deadline = time.time() + 60
    while time.time() < deadline and len(list(store.glob("models/*/*/*/*/manifest.json"))) < 2:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done = len(list(store.glob("models/*/*/*/*/manifest.json")))
    assert 2 <= done < 6, done  # killed mid-run
    assert _run_script(store, ds_root, delay=0.3).wait() == 0
    s = StemStore(store)
    assert all(s.verify_entry(e) is None for e in s.entries())
    assert not list(store.rglob(".*tmp*")) or True  # stray temp files are harmless, never read
    assert _store_files(StemStore(ref_store)) == _store_files(s)


def test_verify_finds_flipped_byte_and_truncation(tmp_path, ds_root, capsys):
    work = tmp_path / "work"
    store, ds = StemStore(work / "store"), open_dataset(ds_root)
    ingest_dataset(store, ds, progress=False)
    key = cache_model(store, ds, GainSeparator(), progress=False)["key"]
    assert run_cli(["cache", "verify", "--work", work], capsys)[0] == 0
    tracks = store.tracks(ds.id)
    flipped = store.stems_dir(key, ds.id, tracks[0]) / "stems.npy"
    data = bytearray(flipped.read_bytes())
    data[-10] ^= 0x01
    flipped.write_bytes(bytes(data))
    truncated = store.track_dir(ds.id, tracks[1]) / "audio.npy"
    truncated.write_bytes(truncated.read_bytes()[:-100])
    code, _, err = run_cli(["cache", "verify", "--work", work], capsys)
    assert code == 1
    assert "checksum mismatch" in err and "stems.npy" in err
    assert "audio.npy" in err and "2 damaged" in err


def test_shards_fill_one_store(tmp_path, ds_root):
    store, ds = StemStore(tmp_path / "store"), open_dataset(ds_root)
    ref = StemStore(tmp_path / "ref")
    ingest_dataset(ref, ds, progress=False)
    cache_model(ref, ds, GainSeparator(), progress=False)
    results = []
    for i in range(3):
        ingest_dataset(store, ds, shard=(i, 3), progress=False)
        results.append(cache_model(store, ds, GainSeparator(), shard=(i, 3), progress=False))
    assert sum(r["computed"] for r in results) == 6 and all(r["computed"] == 2 for r in results)
    assert _store_files(ref) == _store_files(store)
    os.environ.update(RANK="1", WORLD_SIZE="4")
    try:
        assert parse_shard(None) == (1, 4)
    finally:
        del os.environ["RANK"], os.environ["WORLD_SIZE"]
    assert parse_shard("2/5") == (2, 5)
    with pytest.raises(PipelineError, match="--shard 5/5"):
        parse_shard("5/5")


def test_import_estimates_both_layouts(tmp_path, ds_root, capsys):
    work = tmp_path / "work"
    ds = open_dataset(ds_root)
    for layout in ("museval", "demucs"):
        est = tmp_path / f"est-{layout}"
        for t in ds.tracks:
            d = est / t.subset / t.name if layout == "museval" else est / t.name
            d.mkdir(parents=True)
            for s, x in zip(("vocals", "bass"), t.stems()[[3, 1]]):
                sf.write(d / f"{s}.wav", x.T, t.sample_rate, subtype="FLOAT")
        code, _, err = run_cli(["cache", "import", est, "--name", f"ext-{layout}", "--dataset", ds_root,
                                "--work", work], capsys)
        assert code == 0, err
        store = StemStore(work / "store")
        key = store.resolve_model(f"ext-{layout}")
        assert store.model_info(key)["sources"] == ["bass", "vocals"]
        t = store.tracks(ds.id)[0]
        np.testing.assert_allclose(store.stems(key, ds.id, t)[1], store.references(ds.id, t)[3], atol=1e-3)
    # a missing target and a wrong length are reported, not guessed
    bad = tmp_path / "est-museval"
    (bad / ds.tracks[2].subset / ds.tracks[2].name / "bass.wav").unlink()
    code, _, err = run_cli(["cache", "import", bad, "--name", "x", "--dataset", ds_root, "--work", work], capsys)
    assert code == 1 and "missing targets bass" in err
    t = ds.tracks[0]
    f = tmp_path / "est-demucs" / t.name / "vocals.wav"
    sf.write(f, np.zeros((t.length - 5, 2), np.float32), t.sample_rate)
    code, _, err = run_cli(["cache", "import", tmp_path / "est-demucs", "--name", "y", "--dataset",
                            ds_root, "--work", work], capsys)
    assert code == 1 and "vocals.wav" in err and f"the track has {t.length}" in err


def test_ls_lists_models(tmp_path, ds_root, capsys):
    work = tmp_path / "work"
    store, ds = StemStore(work / "store"), open_dataset(ds_root)
    ingest_dataset(store, ds, progress=False)
    cache_model(store, ds, GainSeparator(), progress=False)
    code, out, _ = run_cli(["cache", "ls", "--work", work], capsys)
    assert code == 0 and "gains" in out and ds.id in out
