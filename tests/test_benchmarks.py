"""The benchmark scripts' goals: a missed goal makes the script exit non-zero (benchmarks/goals.py),
not only print FAIL; and every script that states a goal checks it that way."""
import re
import subprocess
import sys

from conftest import REPO

BENCHMARKS = REPO / "benchmarks"


def test_a_missed_goal_exits_non_zero():
    code = ("import sys; sys.path.insert(0, {path!r}); from goals import check, finish; "
            "print(check({a}, 'speed'), check({b}, 'memory')); finish()")
    for a, b, rc, out in ((True, True, 0, "PASS PASS"), (True, False, 1, "PASS FAIL")):
        run = subprocess.run([sys.executable, "-c", code.format(path=str(BENCHMARKS), a=a, b=b)],
                             capture_output=True, text=True)
        assert (run.returncode, run.stdout.strip()) == (rc, out), run.stderr
        assert ("missed goal(s): memory" in run.stderr) == (rc == 1)


def test_every_stated_goal_is_checked():
    """A script that states a goal ("goal >= 50x", "goal < 60 s") prints PASS/FAIL through
    goals.check and ends main() with goals.finish(); none prints a verdict of its own."""
    stated = []
    for path in sorted(BENCHMARKS.glob("bench_*.py")):
        text = path.read_text()
        if not re.search(r"goal", text):
            continue
        stated.append(path.name)
        assert "from goals import check, finish" in text and "    finish()\n" in text, path.name
        assert not re.search(r"""['"](PASS|FAIL|below goal|over goal)['"]""", text), path.name
    assert {"bench_cache.py", "bench_ensembles.py", "bench_mixer.py", "bench_sdr.py",
            "bench_fast_paths.py"} <= set(stated)


def test_upstream_and_tta_scripts_parse_their_arguments():
    """bench_upstream.py / bench_tta_consistency.py start (imports, argument parsing) without
    running anything; their runtime is not tested here."""
    for name in ("bench_upstream.py", "bench_tta_consistency.py"):
        run = subprocess.run([sys.executable, str(BENCHMARKS / name), "--help"],
                             capture_output=True, text=True, cwd=REPO)
        assert run.returncode == 0 and "usage:" in run.stdout, run.stderr


def test_tta_experiments_pair_every_member_and_system():
    """The shipped TTA / consistency experiments load, every TTA member has exactly one plain
    twin and every system with consistency one twin without; nothing is fitted on the
    evaluation split, so the cost is timed on the tracks the experiment separates anyway."""
    sys.path.insert(0, str(BENCHMARKS))
    from bench_tta_consistency import cost_splits, member_pairs, system_pairs

    from pipeline.experiment import load_experiment

    for name, evaluated, members in (("demo-tta.toml", "test", 3), ("musdb18-7-tta.toml", "valid", 3)):
        config = load_experiment(BENCHMARKS / "configs" / name)
        assert config["evaluate"]["split"] == evaluated and config["cache_splits"] == [evaluated]
        pairs = member_pairs(config)
        assert len(pairs) == members and all(not p.get("tta") and m["tta"] == "flip,polarity"
                                             for p, m in pairs)
        with_consistency = [s for s in config["systems"] if s.get("consistency")]
        assert len(system_pairs(config)) == len(with_consistency) == 16
        assert cost_splits(config) == [evaluated]
    fitted = {"cache_splits": ["test"], "evaluate": {"split": "test"},
              "systems": [{"name": "b", "method": "blend"}]}
    import pytest

    with pytest.raises(SystemExit, match="fit"):
        cost_splits(fitted)
    assert cost_splits({"evaluate": {"split": "valid"}}) == ["train", "test"]


def test_the_mixing_ceiling_recovers_known_weights():
    """benchmarks/mixing_ceiling.py's oracle: a reference that IS a mix of the members comes
    back exactly, and one whose weights change from segment to segment comes back only from the
    per-segment fit, not from the static one."""
    import numpy as np

    sys.path.insert(0, str(BENCHMARKS))
    from mixing_ceiling import least_squares_mix

    rng = np.random.default_rng(0)
    members = rng.standard_normal((3, 2, 2000)).astype(np.float32)
    ref = np.tensordot(np.array([0.3, 0.7, -0.2]), members, axes=1).astype(np.float32)
    np.testing.assert_allclose(least_squares_mix(members, ref), ref, atol=1e-5)
    switching = np.concatenate([members[0, :, :1000], members[1, :, 1000:]], axis=-1)
    per_segment = np.concatenate([least_squares_mix(members[..., a:a + 1000], switching[:, a:a + 1000])
                                  for a in (0, 1000)], axis=-1)
    np.testing.assert_allclose(per_segment, switching, atol=1e-5)
    assert np.abs(least_squares_mix(members, switching) - switching).max() > 0.1
