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
