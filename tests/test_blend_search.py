"""Known answers for the blend search at scale: the grid, the least-squares blend on the simplex,
the local search against the exhaustive grid and against analytic optima, the search modes."""
import itertools
import tracemalloc

import numpy as np
import pytest
from test_mixer import SOURCES, make_store

from core.errors import PipelineError
from mixer.blend import collect_stats, search_blend, silent_frames
from mixer.blendsearch import (
    AUTO_POINTS,
    least_squares_point,
    score,
    search,
    search_modes,
)
from mixer.inputs import InputSpec
from mixer.simplex import (
    exchange_moves,
    grid_size,
    nearest_grid_point,
    simplex_grid,
    simplex_least_squares,
)


# ---- the grid --------------------------------------------------------------------------------
def stars_and_bars(n_models: int, K: int) -> np.ndarray:
    """The grid as the blend built it before (itertools): the exhaustive search's reference."""
    if n_models == 1:
        return np.ones((1, 1))
    bars = np.array(list(itertools.combinations(range(K + n_models - 1), n_models - 1)))
    edges = np.concatenate([np.full((len(bars), 1), -1), bars, np.full((len(bars), 1), K + n_models - 1)],
                           axis=1)
    return (np.diff(edges, axis=1) - 1) / K


@pytest.mark.parametrize("n_models,step", [(1, 0.1), (2, 0.5), (3, 0.01), (4, 0.05), (5, 0.05), (7, 0.1)])
def test_grid_is_the_stars_and_bars_grid_bit_for_bit(n_models, step):
    """Same points, same order, same floats: the exhaustive search picks the same first maximum."""
    want = stars_and_bars(n_models, round(1 / step))
    got = simplex_grid(n_models, step)
    assert got.dtype == want.dtype and np.array_equal(got, want)
    assert len(got) == grid_size(n_models, round(1 / step))


def test_grid_points_and_moves():
    assert grid_size(5, 20) == 10626 <= AUTO_POINTS < grid_size(6, 20)
    assert grid_size(20, 20) == 68923264410
    counts = np.array([3, 0, 5, 2])
    src, dst, steps = exchange_moves(counts, np.arange(4))
    assert len(src) == 10 * 3                    # K (M - 1)
    moved = np.tile(counts, (len(src), 1))
    moved[np.arange(len(src)), src] -= steps
    moved[np.arange(len(src)), dst] += steps
    assert moved.min() >= 0 and np.all(moved.sum(1) == 10)
    assert len({tuple(m) for m in moved}) == len(moved)   # every move a different point
    for w in np.random.default_rng(0).dirichlet(np.ones(7), 200):
        c = nearest_grid_point(w, 20)
        assert c.sum() == 20 and c.min() >= 0 and np.abs(c / 20 - w).max() < 1 / 20


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_silence_on_the_bits_is_museval_silence(dtype):
    """L + R == 0 at every sample, tested on the bits, equals the test in float64 arithmetic:
    opposite samples, +0/-0 pairs, subnormals, one sample off."""
    rng = np.random.default_rng(0)
    frames, length = 12, 50
    a = rng.standard_normal((2, frames, length)).astype(dtype)
    a[1, :6] = -a[0, :6]                                  # frames 0-5 silent ...
    a[:, 1] = 0
    a[0, 2], a[1, 2] = 0.0, -0.0                          # signed zeros
    a[0, 3] = np.finfo(dtype).smallest_subnormal
    a[1, 3] = -a[0, 3]
    a[1, 4, 7] = np.nextafter(-a[0, 4, 7], dtype(1))      # ... but frame 4: one sample off
    a[0, 5, 3] = np.finfo(dtype).smallest_subnormal       # ... and frame 5 too
    want = ~np.any(a[0].astype(np.float64) + a[1].astype(np.float64) != 0, axis=-1)
    got = silent_frames(a.reshape(2, -1), frames, length)
    assert np.array_equal(got, want) and list(np.flatnonzero(got)) == [0, 1, 2, 3]


# ---- least squares on the simplex ------------------------------------------------------------
def kkt_holds(A, c, w, tol=1e-8):
    """Optimality certificate of a convex QP on the simplex: on the support the gradient
    2 (A w - c) is one constant -nu, elsewhere it is >= -nu."""
    grad = A @ w - c
    on = w > 1e-9
    nu = -grad[on].mean()
    scale = np.abs(A).max()
    return (w.min() >= 0 and abs(w.sum() - 1) < 1e-12 and np.ptp(grad[on]) <= tol * scale
            and np.all(grad[~on] + nu >= -tol * scale))


def test_least_squares_known_answers():
    # unbiased models r + n_m, noise energies v: G = R 11^T + diag(v), b = R 1 -> w ~ 1 / v
    v = np.array([1.0, 2.0, 4.0, 0.5, 8.0])
    R = 10.0
    w = simplex_least_squares(R + np.diag(v), R * np.ones(5))
    np.testing.assert_allclose(w, (1 / v) / np.sum(1 / v), atol=1e-10)
    # a perfect model takes everything
    v[2] = 0
    np.testing.assert_allclose(simplex_least_squares(R + np.diag(v), R * np.ones(5)), np.eye(5)[2], atol=1e-9)
    # an identical copy of a model: the pair's total weight is the optimum's
    X = np.random.default_rng(1).standard_normal((3, 50))
    y = 0.3 * X[0] + 0.7 * X[1]
    w = simplex_least_squares(X @ X.T, X @ y)
    np.testing.assert_allclose(w, [0.3, 0.7, 0], atol=1e-9)
    X = np.vstack([X, X[1]])
    w = simplex_least_squares(X @ X.T, X @ y)
    np.testing.assert_allclose([w[0], w[1] + w[3], w[2]], [0.3, 0.7, 0], atol=1e-9)
    assert kkt_holds(X @ X.T, X @ y, w)


@pytest.mark.parametrize("seed", range(40))
def test_least_squares_satisfies_the_kkt_conditions(seed):
    rng = np.random.default_rng(seed)
    M = int(rng.integers(2, 25))
    X = rng.standard_normal((M, int(rng.integers(1, 40))))   # rank-deficient when fewer columns
    X *= rng.uniform(0.1, 3, (M, 1))
    A, c = X @ X.T, X @ rng.standard_normal(X.shape[1])
    w = simplex_least_squares(A, c)
    assert kkt_holds(A, c, w, tol=1e-7)
    if M == 3:   # and no grid point does better
        g = simplex_grid(3, 0.002)
        f = np.einsum("pm,mn,pn->p", g, A, g) - 2 * g @ c
        assert w @ A @ w - 2 * c @ w <= f.min() + 1e-9 * np.abs(A).max()


# ---- constructed blends ----------------------------------------------------------------------
WIN = 2000


def constructed(M: int, seed: int, tracks: int = 3, frames: int = 8, partly: int | None = None):
    """A target and M noisy, partly-correct models: model m = a_m r + sigma_m e(t) n_m, with
    n_m independent white noise and e(t) the reference's level in the frame, so every frame has
    the same SDR as a function of the weights and the museval, uSDR and least-squares optima
    coincide (up to the sampling noise) with the analytic one: the minimiser of
    (1 - w.a)^2 + sum w_m^2 sigma_m^2 on the simplex. Returns (stats, analytic weights)."""
    rng = np.random.default_rng(seed)
    sigma = np.geomspace(0.25, 1.2, M)
    rng.shuffle(sigma)
    a = np.ones(M)
    partly = M // 4 if partly is None else partly
    a[:partly] = rng.uniform(0.75, 0.95, partly)                 # they got part of the target
    data = []
    for _ in range(tracks):
        level = np.repeat(rng.uniform(0.2, 2.0, frames), WIN)    # loud and quiet frames
        r = level * rng.standard_normal((1, 2, frames * WIN))
        stems = [(a[m] * r + sigma[m] * level * rng.standard_normal(r.shape)).astype(np.float32)
                 for m in range(M)]
        data.append((r.astype(np.float32), stems))
    spec = InputSpec(tuple(f"m{i}" for i in range(M)), tuple(f"m{i}" for i in range(M)),
                     (("vocals",),) * M, ("vocals",), with_mixture=False)
    # Analytic: per unit of reference energy, |r - s|^2 = (1 - w.a)^2 + sum w^2 sigma^2, i.e.
    # G = a a^T + diag(sigma^2), b = a. With every weight positive the minimiser solves the
    # KKT equations [G 1; 1^T 0][w; nu] = [b; 1] (checked positive below).
    kkt = np.block([[np.outer(a, a) + np.diag(sigma ** 2), np.ones((M, 1))], [np.ones((1, M)), 0]])
    w = np.linalg.solve(kkt, np.concatenate([a, [1.0]]))[:M]
    assert w.min() > 0
    return collect_stats(data, spec, WIN), w


@pytest.mark.parametrize("M,step,objective", [(8, 0.1, "museval"), (8, 0.1, "usdr"), (8, 0.05, "usdr"),
                                              (12, 0.1, "museval"), (12, 0.1, "usdr")])
def test_local_search_reaches_the_exhaustive_optimum(M, step, objective):
    for seed in range(2):
        stats, _ = constructed(M, seed, *((2, 6) if M > 8 else ()))   # 352 716 points: fewer frames
        exhaustive = search(stats, step, objective, "exhaustive")
        local = search(stats, step, objective, "local")
        assert exhaustive.modes == ["exhaustive"] and local.modes == ["local"]
        np.testing.assert_allclose(local.weights[0], exhaustive.weights[0], atol=1e-12)
        assert local.best[0] == pytest.approx(exhaustive.best[0], abs=1e-9)
        # a few thousand points scored instead of the grid
        assert local.details[0]["points"] < exhaustive.details[0]["points"] / 10


@pytest.mark.parametrize("M", [8, 12, 20])
@pytest.mark.parametrize("objective", ["museval", "usdr"])
def test_local_search_finds_the_analytic_optimum_within_a_step(M, objective):
    """And never scores below the best single model or the least-squares grid point."""
    step = 0.05
    for seed in range(2):
        stats, analytic = constructed(M, seed, tracks=4, frames=10)
        found = search(stats, step, objective, "auto")
        assert found.modes == ["local"]
        w = found.weights[0]
        assert np.abs(w - analytic).max() <= step + 1e-12, (w, analytic)
        # the least-squares point is the analytic optimum up to the sampling noise
        assert np.abs(least_squares_point(stats[0]) - analytic).max() < 0.02
        ctx = np.ones(int(stats[0].full.sum()), bool)
        ls = nearest_grid_point(least_squares_point(stats[0]), 20) / 20
        assert found.best[0] >= score(stats[0], ls[None], objective, ctx)[0] - 1e-9
        assert found.best[0] >= max(found.single[0].values())
        start = found.details[0]["starts"]["least-squares"]
        assert start["reached"] >= start["objective"]


def test_a_source_silent_in_every_track_still_searches():
    """No reference energy anywhere (vocals absent from the split): the least-squares weights
    fall back to unweighted tracks instead of dividing by zero."""
    stats, _ = constructed(6, 0, tracks=2, frames=3)
    st = stats[0]
    st.totals["rr"][:] = 0
    w = least_squares_point(st)
    assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-12
    found = search(stats, 0.05, "usdr", "local")
    assert np.isfinite(found.best[0]) and abs(found.weights[0].sum() - 1) < 1e-12


def test_auto_keeps_the_exhaustive_grid_where_affordable_and_refuses_a_huge_one():
    assert search_modes([5, 5, 3, 1], 0.05, "auto") == ["exhaustive"] * 4
    assert search_modes([8, 9], 0.1, "auto") == ["exhaustive", "local"]
    assert search_modes([6], 0.05, "auto") == ["local"]
    assert search_modes([20], 0.05, "local") == ["local"]
    tracemalloc.start()   # numpy reports its allocations: nothing is allocated before refusing
    with pytest.raises(PipelineError, match=r"exhaustive search over 12 models at step 0.05 scores "
                                            r"84,672,315 grid points.*--search local") as e:
        search_modes([12, 12, 12, 12], 0.05, "exhaustive")
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert "\n" not in str(e.value) and peak < 2**20
    stats, _ = constructed(12, 0, tracks=1, frames=2)
    with pytest.raises(PipelineError, match="exhaustive search over 12 models"):
        search(stats, 0.05, "museval", "exhaustive")
    with pytest.raises(PipelineError, match="search mode 'greedy': choose one of auto, exhaustive, local"):
        search(stats, 0.05, "museval", "greedy")


def test_search_blend_records_the_mode_and_fails_early(tmp_path):
    models = {f"m{i}": (SOURCES, np.eye(4)) for i in range(6)}
    store = make_store(tmp_path / "store", models, splits=(("valid", 2),), length=3000, noise=0.05)
    config = search_blend(store, "toy", list(models), step=0.05, run_dir=tmp_path / "run")
    assert config["options"]["search"] == "auto"
    for s in SOURCES:   # 6 models at step 0.05: 53 130 points, above AUTO_POINTS
        rec = config["search"]["sources"][s]
        assert rec["mode"] == "local" and rec["grid_points"] == 53130 and rec["points"] < 53130 / 10
        assert set(rec["least_squares_weights"]) == set(models)
        # six equally good models: the least-squares blend is near the average
        assert max(abs(w - 1 / 6) for w in rec["least_squares_weights"].values()) < 0.05
    five = search_blend(store, "toy", list(models)[:5], step=0.05)
    assert {r["mode"] for r in five["search"]["sources"].values()} == {"exhaustive"}
    with pytest.raises(PipelineError, match="search mode 'fast'"):
        search_blend(store, "toy", list(models), search_mode="fast")
    with pytest.raises(PipelineError, match="exhaustive search over 6 models at step 0.01"):
        search_blend(store, "toy", list(models), step=0.01, search_mode="exhaustive")


# ---- band-blend and select-models on the local search ------------------------------------------
def test_band_blend_local_search_finds_the_split_among_six_models(tmp_path):
    """A perfect below 1 kHz, B above, four more models reference + broadband noise: 6 models at
    step 0.05 is past AUTO_POINTS, so the plain blend and every band step are local searches."""
    from test_ensembles import RATE, _split_at_1khz

    from mixer.bandblend import band_edges, search_band_blend

    rng = np.random.default_rng(0)
    others = ["C", "D", "E", "F"]

    def edit(split, i, refs, stems):
        noise = 0.1 * rng.standard_normal((6,) + refs.shape)
        stems["A"][:] = refs + _split_at_1khz(noise[0], keep_low=False)
        stems["B"][:] = refs + _split_at_1khz(noise[1], keep_low=True)
        for k, n in zip(others, noise[2:]):
            stems[k][:] = refs + n

    models = {k: (SOURCES, np.eye(4)) for k in ["A", "B"] + others}
    store = make_store(tmp_path / "store", models, splits=(("valid", 2),), length=3 * RATE + 700,
                       rate=RATE, edit=edit)
    band = search_band_blend(store, "toy", list(models), bands=8, split="valid", progress=False)
    assert band["search"]["modes"] == {s: "local" for s in SOURCES}
    _, hz = band_edges(8, "mel", RATE)
    for target in SOURCES:
        w = band["weights"][target]
        for b in range(8):
            if hz[b + 1] <= 1000:
                assert w["A"][b] == 1.0, (target, b, w)
            elif hz[b] >= 1000:
                assert w["B"][b] == 1.0, (target, b, w)
        assert band["validation"]["band_blend"][target] > band["validation"]["plain_blend"][target] + 5


@pytest.mark.parametrize("search_mode", ["auto", "local"])
def test_select_models_from_a_larger_pool(tmp_path, search_mode):
    """Four models with independent noise (each adds: inverse-variance weights), two exact copies
    of them and two pure-noise models louder than the mixture: the four are chosen, never a copy
    beside its original nor a noise model (a quieter one can gain a little: mixer.select); the
    local search chooses as the exhaustive grid does."""
    from mixer.select import select_models

    rng = np.random.default_rng(5)
    levels = {"g1": 0.05, "g2": 0.07, "g3": 0.1, "g4": 0.14}

    def edit(split, i, refs, stems):
        for k, s in levels.items():
            stems[k][:] = refs + s * rng.standard_normal(refs.shape)
        stems["g1copy"][:], stems["g2copy"][:] = stems["g1"], stems["g2"]
        for k in ("noise1", "noise2"):
            stems[k][:] = 0.5 * rng.standard_normal(refs.shape)

    keys = ["noise1", "g4", "g1copy", "g3", "g1", "noise2", "g2", "g2copy"]
    store = make_store(tmp_path / "store", {k: (SOURCES, np.eye(4)) for k in keys},
                       splits=(("valid", 3),), length=6000, edit=edit)
    result = select_models(store, "toy", keys, by="blend", split="valid", step=0.05,
                           search_mode=search_mode, progress=False, log=lambda line: None)
    chosen = {m["name"] for m in result["models"]}
    assert len(chosen) == 4 and {"g3", "g4"} <= chosen and result["search"] == search_mode
    assert len(chosen & {"g1", "g1copy"}) == 1 and len(chosen & {"g2", "g2copy"}) == 1
    # inverse-variance weighting gains 10 log10(sum of precisions / g1's) over g1 alone
    precision = {k: 1 / s ** 2 for k, s in levels.items()}
    gain = 10 * np.log10(sum(precision.values()) / precision["g1"])
    assert result["score"] - result["path"][0]["score"] == pytest.approx(gain, abs=0.3)


# ---- the `search` option, declared once in the blend's record ---------------------------------
def test_the_search_option_reaches_the_search(tmp_path):
    """`search` (BlendOptions; BandBlendOptions inherits it) goes from the options the command
    line, experiment files and the API give to the search itself, and into config.json."""
    import json

    from mixer import methods

    models = {f"m{i}": (SOURCES, np.eye(4)) for i in range(6)}
    store = make_store(tmp_path / "store", models, splits=(("valid", 2),), length=3000, noise=0.05)
    run = tmp_path / "local"   # 3 models: 'auto' would be the exhaustive grid
    methods.fit(store, "toy", ["m0", "m1", "m2"], "blend", run, {"search": "local"}, progress=False)
    config = json.loads((run / "config.json").read_text())
    assert config["options"]["search"] == "local"
    assert {r["mode"] for r in config["search"]["sources"].values()} == {"local"}
    auto = methods.fit(store, "toy", ["m0", "m1", "m2"], "blend", None, {}, progress=False)
    assert auto["options"]["search"] == "auto"
    assert {r["mode"] for r in auto["search"]["sources"].values()} == {"exhaustive"}

    big = tmp_path / "big"     # 6 models at step 0.01: 9.7e7 points per source, refused
    with pytest.raises(PipelineError, match="exhaustive search over 6 models at step 0.01") as e:
        methods.fit(store, "toy", list(models), "blend", big, {"search": "exhaustive", "step": 0.01},
                    progress=False)
    assert "\n" not in str(e.value) and not big.exists()
    for method in ("blend", "band-blend"):
        with pytest.raises(PipelineError, match="search 'fast': choose one of auto, exhaustive, "
                                                "local") as e:
            methods.fit(store, "toy", list(models), method, None, {"search": "fast"}, progress=False)
        assert "\n" not in str(e.value)

    band = methods.fit(store, "toy", ["m0", "m1", "m2"], "band-blend", None,
                       {"search": "local", "split": "valid", "bands": 2}, progress=False)
    assert band["options"]["search"] == "local"
    assert band["search"]["modes"] == {s: "local" for s in SOURCES}
