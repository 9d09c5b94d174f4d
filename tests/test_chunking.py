"""core.chunking.overlap_add (streaming, flat-top blocks) and the cache stage's blockwise
separation of long tracks (separators.inference.separate_array)."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch

from core.chunking import flattop_window, ola_window, overlap_add


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def fn(chunks: torch.Tensor) -> torch.Tensor:
    """[B, C, T] -> [B, 2, C, T]: not the identity, not linear in the window, channel-mixing."""
    return torch.stack([2.0 * chunks + 0.1, torch.tanh(chunks.flip(-2))], dim=1)


def reference_hann(f, x: torch.Tensor, segment: int, hop: int, batch: int) -> torch.Tensor:
    """The accumulate-everything implementation the mixers were built on (before streaming)."""
    n, pad = x.shape[-1], segment - hop
    n_seg = max(1, -(-(n + 2 * pad - segment) // hop) + 1)
    padded_len = (n_seg - 1) * hop + segment
    xp = torch.nn.functional.pad(x, (pad, padded_len - n - pad))
    window = ola_window(segment)
    out, norm = None, torch.zeros(padded_len)
    starts = list(range(0, padded_len - segment + 1, hop))
    for i in range(0, len(starts), batch):
        group = starts[i:i + batch]
        y = f(torch.stack([xp[..., s:s + segment] for s in group]))
        if out is None:
            out = torch.zeros(*y.shape[1:-1], padded_len)
        for j, s in enumerate(group):
            out[..., s:s + segment] += y[j].float() * window
            norm[s:s + segment] += window
    return out[..., pad:pad + n] / norm[pad:pad + n]


def collect(f, x, segment, **kw):
    """overlap_add with a sink: the pieces, checked to be in order and contiguous, joined."""
    pieces = []
    assert overlap_add(f, x, segment, sink=lambda s, b: pieces.append((s, b.clone())), **kw) is None
    pos = 0
    for s, b in pieces:
        assert s == pos, "pieces must arrive in order, without gaps"
        pos += b.shape[-1]
    assert pos == x.shape[-1]
    return pieces, torch.cat([b for _, b in pieces], dim=-1) if pieces else None


# ---- Hann (the mixers' and Open-Unmix/X-UMX's window): unchanged results ---------------------
@pytest.mark.parametrize("n", [1, 37, 64, 100, 3 * 1024 + 77])
@pytest.mark.parametrize("hop", [None, 32])
@pytest.mark.parametrize("batch", [1, 3])
def test_hann_equals_accumulating_reference_and_streams(n, hop, batch):
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n))
    expected = reference_hann(fn, x, 64, hop or 16, batch)
    y = overlap_add(fn, x, 64, hop=hop, batch=batch)
    assert y.shape == (2, 2, n) and y.dtype == torch.float32
    assert torch.equal(y, expected)                      # bit for bit: the mixers see no change
    pieces, joined = collect(fn, x, 64, hop=hop, batch=batch)
    assert torch.equal(joined, y)
    assert max(b.shape[-1] for _, b in pieces) <= 64 * batch   # never the whole output at once


def test_hann_identity_with_arrays_and_read_only_memmaps(tmp_path):
    x = np.random.default_rng(0).standard_normal((2, 5000)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")
    with warnings.catch_warnings():
        warnings.simplefilter("error")   # torch's "not writable" warning included
        y = overlap_add(lambda c: c, mm, 256)
    assert torch.equal(y, overlap_add(lambda c: c, torch.from_numpy(x), 256))
    np.testing.assert_allclose(y.numpy(), x, rtol=1e-6, atol=1e-7)


def test_empty_input():
    assert overlap_add(fn, torch.zeros(2, 0), 64).shape == (2, 2, 0)
    assert overlap_add(fn, torch.zeros(2, 0), 64, window="flattop", overlap=8).shape == (2, 2, 0)
    assert collect(fn, torch.zeros(2, 0), 64)[0] == []


# ---- flat-top blocks ---------------------------------------------------------------------------
@pytest.mark.parametrize("segment,overlap", [(64, 8), (100, 50), (64, 0), (1000, 17)])
def test_flattop_window_sums_to_one(segment, overlap):
    w = flattop_window(segment, overlap, dtype=torch.float64)
    assert (w > 0).all() and torch.equal(w, w.flip(0))
    assert (w[overlap:segment - overlap] == 1).all()
    hop = segment - overlap
    total = torch.zeros(4 * hop + segment, dtype=torch.float64)
    for k in range(5):
        total[k * hop:k * hop + segment] += w
    torch.testing.assert_close(total[segment:4 * hop], torch.ones(4 * hop - segment, dtype=torch.float64),
                               rtol=0, atol=1e-12)
    with pytest.raises(ValueError):
        flattop_window(segment, segment // 2 + 1)


@pytest.mark.parametrize("n", [1, 5, 63, 64, 65, 56 * 3 + 8, 56 * 3 + 9, 1000, 4099])
@pytest.mark.parametrize("batch", [1, 2])
def test_flattop_blocks_reproduce_identity(n, batch):
    segment, overlap = 64, 8                      # hop 56: n not a multiple of it, shorter than it
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(n)) + 0.3
    seen = []

    def identity(c):
        seen.append(c.shape)
        return c

    y = overlap_add(identity, x, segment, batch=batch, window="flattop", overlap=overlap)
    assert y.shape == x.shape
    # every segment is whole; no padding before the start: ceil((n - overlap) / hop) segments
    assert all(s[-1] == segment for s in seen)
    assert sum(s[0] for s in seen) == max(1, math.ceil((n - overlap) / (segment - overlap)))
    torch.testing.assert_close(y, x, rtol=5e-7, atol=0)   # the ends too (divided by the window)
    hop = segment - overlap
    flat = torch.ones(n, dtype=torch.bool)
    for k in range(1, len(seen) * batch + 1):   # samples where two blocks cross-fade
        flat[max(0, k * hop):min(n, k * hop + overlap)] = False
    flat[:overlap] = flat[-overlap:] = False      # a single ramp at the ends, divided out
    assert torch.equal(y[..., flat], x[..., flat])   # elsewhere one block alone: exact
    pieces, joined = collect(identity, x, segment, batch=batch, window="flattop", overlap=overlap)
    assert torch.equal(joined, y)


def test_flattop_equals_explicit_crossfade():
    """Block outputs cross-faded by hand: sum_k w(t - s_k) y_k(t) / sum_k w(t - s_k)."""
    segment, overlap, n = 50, 10, 177
    hop = segment - overlap
    x = torch.randn(2, n, generator=torch.Generator().manual_seed(1))
    y = overlap_add(fn, x, segment, window="flattop", overlap=overlap)
    k = math.ceil((n - overlap) / hop)
    w = flattop_window(segment, overlap, dtype=torch.float64)
    num = torch.zeros(2, 2, k * hop + overlap, dtype=torch.float64)
    den = torch.zeros(k * hop + overlap, dtype=torch.float64)
    xp = torch.nn.functional.pad(x, (0, k * hop + overlap - n))
    for i in range(k):
        s = i * hop
        num[..., s:s + segment] += fn(xp[None, :, s:s + segment])[0].double() * w
        den[s:s + segment] += w
    torch.testing.assert_close(y.double(), (num / den)[..., :n], rtol=1e-6, atol=1e-7)


def test_argument_checks():
    x = torch.zeros(2, 100)
    with pytest.raises(ValueError, match="overlap"):
        overlap_add(fn, x, 64, window="flattop")
    with pytest.raises(ValueError, match="hop"):
        overlap_add(fn, x, 64, hop=10, window="flattop", overlap=8)
    with pytest.raises(ValueError, match="window"):
        overlap_add(fn, x, 64, window="hamming")
    with pytest.raises(ValueError, match="hop"):
        overlap_add(fn, x, 64, hop=65)


# ---- separate_array on long inputs ---------------------------------------------------------------
@pytest.fixture(scope="module")
def umx(tmp_path_factory):
    """A tiny Open-Unmix in its real on-disk format (tests/test_adapters.py's builder), at 44.1 kHz."""
    from test_adapters import save_umx_folder

    from separators.registry import load_separator

    folder = save_umx_folder(tmp_path_factory.mktemp("umx") / "tinyumx", ["vocals", "drums", "bass"])
    return load_separator(str(folder), offline=True, options={"niter": 0})


def blockwise_expectation(sep, x: np.ndarray, rate: int, block: int, overlap: int) -> np.ndarray:
    """Equal blocks of at most `block` samples, the fewest that cover x with `overlap`, each
    resampled -> separated -> resampled like a short input, cross-faded with the flat-top window."""
    from test_adapters import through_model_rate

    n = x.shape[-1]
    k = math.ceil((n - overlap) / (block - overlap))
    segment = math.ceil((n + (k - 1) * overlap) / k)
    assert segment <= block and n <= k * segment - (k - 1) * overlap < n + k
    hop = segment - overlap
    w = flattop_window(segment, overlap, dtype=torch.float64).numpy()
    xp = np.pad(x, ((0, 0), (0, k * segment - (k - 1) * overlap - n)))
    num = np.zeros((len(sep.sources), 2, xp.shape[-1]))
    den = np.zeros(xp.shape[-1])
    for i in range(k):
        s = i * hop
        y = through_model_rate(sep.separate, xp[:, s:s + segment], rate, sep.sample_rate)
        num[..., s:s + segment] += y * w
        den[s:s + segment] += w
    return (num / den)[..., :n]


def test_separate_array_long_input_in_blocks(umx, tmp_path):
    from separators.inference import separate_array

    rate = 22050                                    # != the model's 44.1 kHz: both resamplings
    x = (0.1 * np.random.default_rng(7).standard_normal((2, int(3.3 * rate)))).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    mm = np.load(tmp_path / "x.npy", mmap_mode="r")   # read-only, as the store hands it out
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        y = separate_array(umx, mm, rate, block_seconds=1.0, overlap_seconds=0.2)
    assert y.shape == (3, 2, x.shape[1]) and y.dtype == np.float32 and np.isfinite(y).all()
    expected = blockwise_expectation(umx, x, rate, rate, int(0.2 * rate))
    np.testing.assert_allclose(y, expected, rtol=1e-4, atol=2e-6)
    # blocks really differ from one pass over the whole input (else this test proves nothing) ...
    whole = separate_array(umx, x, rate, block_seconds=None)
    assert np.abs(whole - y).max() > 1e-4
    # ... but only a little: cross-fading hides the borders
    assert np.linalg.norm(whole - y) < 0.1 * np.linalg.norm(whole)
    # streaming into a float16 array gives the float32 result rounded
    out = np.lib.format.open_memmap(tmp_path / "out.npy", mode="w+", dtype=np.float16, shape=y.shape)
    assert separate_array(umx, x, rate, out=out, block_seconds=1.0, overlap_seconds=0.2) is out
    assert np.array_equal(out, y.astype(np.float16))
    # mono is duplicated block by block
    mono = separate_array(umx, x[:1], rate, block_seconds=1.0, overlap_seconds=0.2)
    assert np.array_equal(mono, separate_array(umx, np.repeat(x[:1], 2, 0), rate, block_seconds=1.0,
                                               overlap_seconds=0.2))


def test_separate_array_short_input_is_one_pass(umx):
    from separators.inference import separate_array

    x = (0.1 * np.random.default_rng(8).standard_normal((2, 30000))).astype(np.float32)
    one = separate_array(umx, x, 44100)   # default blocks of 60 s: this is one
    assert np.array_equal(one, separate_array(umx, x, 44100, block_seconds=None))
    out = np.zeros((3, 2, 30000), np.float32)
    assert separate_array(umx, x, 44100, out=out, block_seconds=30000 / 44100) is out
    assert np.array_equal(out, one)
    from core.errors import PipelineError

    with pytest.raises(PipelineError, match="output array"):
        separate_array(umx, x, 44100, out=np.zeros((3, 2, 5), np.float32))
    with pytest.raises(PipelineError, match="overlap_seconds"):
        separate_array(umx, x, 44100, block_seconds=0.1, overlap_seconds=0.05)
    bad = x.copy()
    bad[1, -1] = np.nan   # found before any block is separated
    with pytest.raises(PipelineError, match="NaN"):
        separate_array(umx, bad, 44100, block_seconds=0.1, overlap_seconds=0.01)
