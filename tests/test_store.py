"""The stem store and the cache stage: resume after SIGKILL, verify, shards, import, ls."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import soundfile as sf
from conftest import REPO, run_cli, write_stem_track
from store_helpers import GainSeparator

from cache.run import cache_model, entry_of, ingest_dataset, parse_shard
from core.datasets import open_dataset
from core.errors import PipelineError
from core.store import StemStore


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
    from core.store import StemStore
    from core.datasets import open_dataset
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
    # a killed writer leaves at most the one temporary file it was writing (its pid in the name);
    # every other run removes its own, and the entries never read them
    stray = [p.name for p in store.rglob(".*tmp*")]
    assert len(stray) <= 1 and all(f"-{proc.pid}" in name for name in stray), stray
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


# ---- streaming writers: long tracks a piece at a time ----------------------------------------
def test_npy_file_ranges_read_and_write_like_numpy(tmp_path):
    from core.store import NpyFile

    ref = np.random.default_rng(0).standard_normal((5, 2, 1000)).astype(np.float32)
    np.save(tmp_path / "a.npy", ref)
    with NpyFile(tmp_path / "a.npy") as f:
        assert f.shape == (5, 2, 1000) and f.dtype == np.float32
        for key in [(Ellipsis, slice(10, 500)), 0, (slice(1, None), slice(None), slice(3, 7)), (3, 1),
                    (Ellipsis,), (slice(None), slice(None), slice(990, 2000)), (Ellipsis, slice(5, 5))]:
            np.testing.assert_array_equal(f[key], ref[key])
        with pytest.raises(IndexError):
            f[..., 3]
    with NpyFile(tmp_path / "a.npy", select=0) as mix:   # what cache_model reads
        assert mix.shape == (2, 1000)
        np.testing.assert_array_equal(mix[:, 100:200], ref[0, :, 100:200])
    f = NpyFile.create(tmp_path / "b.npy", (4, 2, 1000), np.float16)
    f[..., :600] = ref[:4, :, :600]
    f[:, :, 600:] = ref[:4, :, 600:]
    f.close()
    # the very bytes np.save writes
    np.save(tmp_path / "c.npy", ref[:4].astype(np.float16))
    assert (tmp_path / "b.npy").read_bytes() == (tmp_path / "c.npy").read_bytes()


def _entry(store, ds_root):
    ds = open_dataset(ds_root)
    ingest_dataset(store, ds, progress=False)
    return ds, store.tracks(ds.id)[0]


def test_stems_writer_commits_atomically(tmp_path, ds_root):
    store = StemStore(tmp_path / "store")
    ds, t = _entry(store, ds_root)
    d = store.stems_dir("m-1", ds.id, t)
    x = np.random.default_rng(1).standard_normal((4, 2, t.length)).astype(np.float32)
    # never committed: an exception, or leaving the block: no manifest, no array, no temp file
    with pytest.raises(RuntimeError):
        with store.open_stems_writer("m-1", ds.id, t, x.shape) as w:
            w[..., :100] = x[..., :100]
            raise RuntimeError("model crashed")
    with store.open_stems_writer("m-1", ds.id, t, x.shape) as w:
        w[..., :100] = x[..., :100]
    assert not store.has_stems("m-1", ds.id, t) and list(d.iterdir()) == []
    # committed: complete, verified, as write_stems writes it
    with store.open_stems_writer("m-1", ds.id, t, x.shape) as w:
        for a in range(0, t.length, 1000):
            w[:, :, a:a + 1000] = x[:, :, a:a + 1000]
        w.commit({"model": "m"})
    assert sorted(p.name for p in d.iterdir()) == ["manifest.json", "stems.npy"]
    assert store.verify_entry(d) is None
    np.testing.assert_array_equal(store.stems("m-1", ds.id, t), x.astype(np.float16))
    manifest = json.loads((d / "manifest.json").read_text())
    store.write_stems("m-2", ds.id, t, x, {"model": "m"})
    other = json.loads((store.stems_dir("m-2", ds.id, t) / "manifest.json").read_text())
    assert set(manifest) == set(other) and manifest["sha256"] == other["sha256"]
    assert manifest["shape"] == [4, 2, t.length] and manifest["dtype"] == "float16"
    # replacing a complete entry (force)
    with store.open_stems_writer("m-1", ds.id, t, x.shape) as w:
        w[...] = 2 * x
        w.commit({"model": "m"})
    assert store.verify_entry(d) is None
    np.testing.assert_array_equal(store.stems("m-1", ds.id, t), (2 * x).astype(np.float16))


KILLED = textwrap.dedent("""
    import os, signal, sys
    sys.path[:0] = [{repo!r}]
    import numpy as np
    from core.store import StemStore, TrackEntry
    store = StemStore({store!r})
    t = TrackEntry("song", "train", "train", 100000)
    w = store.open_stems_writer("m-1", "ds", t, (4, 2, 100000))
    w[..., :50000] = np.ones((4, 2, 50000), np.float32)
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_stems_writer_killed_midway_leaves_no_entry(tmp_path):
    from core.store import TrackEntry

    store = StemStore(tmp_path / "store")
    proc = subprocess.run([sys.executable, "-c", KILLED.format(repo=str(REPO), store=str(store.root))])
    assert proc.returncode == -signal.SIGKILL
    t = TrackEntry("song", "train", "train", 100000)
    d = store.stems_dir("m-1", "ds", t)
    assert not store.has_stems("m-1", "ds", t) and list(store.entries()) == []
    assert [p.name for p in d.iterdir()] != [] and not (d / "stems.npy").exists()  # a stray temp file
    with store.open_stems_writer("m-1", "ds", t, (4, 2, 100000)) as w:   # redone
        w[...] = np.zeros((4, 2, 100000), np.float32)
        w.commit({})
    assert [store.verify_entry(e) for e in store.entries()] == [None]


def test_ingest_in_chunks_equals_whole_tracks(tmp_path, ds_root, monkeypatch):
    import cache.run

    ds = open_dataset(ds_root)
    whole, chunked = StemStore(tmp_path / "whole"), StemStore(tmp_path / "chunked")
    monkeypatch.setattr(cache.run, "INGEST_CHUNK_SECONDS", 1000.0)
    ingest_dataset(whole, ds, progress=False)
    monkeypatch.setattr(cache.run, "INGEST_CHUNK_SECONDS", 0.07)   # 560 samples: 15 chunks, ragged
    ingest_dataset(chunked, ds, progress=False)
    assert _store_files(whole) == _store_files(chunked)
    for t in ds.tracks:
        mix, stems = t.audio()
        np.testing.assert_array_equal(chunked.mixture(ds.id, entry_of(t)), mix)
        np.testing.assert_array_equal(chunked.references(ds.id, entry_of(t)), stems)
    assert all(chunked.verify_entry(e) is None for e in chunked.entries())


def test_cache_model_long_track_in_blocks(tmp_path, ds_root, monkeypatch):
    import functools

    import separators.inference

    store, ds = StemStore(tmp_path / "store"), open_dataset(ds_root)
    ingest_dataset(store, ds, progress=False)
    ref = StemStore(tmp_path / "ref")
    ingest_dataset(ref, ds, progress=False)
    key = cache_model(ref, ds, GainSeparator(), progress=False)["key"]
    # blocks of 0.25 s (2000 samples at 8 kHz) over 0.05 s: every track takes 5 blocks
    monkeypatch.setattr(separators.inference, "separate_array", functools.partial(
        separators.inference.separate_array, block_seconds=0.25, overlap_seconds=0.05))
    assert cache_model(store, ds, GainSeparator(), progress=False)["key"] == key
    for t in store.tracks(ds.id):
        blocks, one = store.stems(key, ds.id, t), ref.stems(key, ds.id, t)
        assert blocks.shape == one.shape == (4, 2, t.length)
        # a linear model: blocks cross-faded give the same stems, up to float16 rounding
        np.testing.assert_allclose(blocks.astype(np.float32), one.astype(np.float32), atol=1e-3, rtol=0)
    assert all(store.verify_entry(e) is None for e in store.entries())
