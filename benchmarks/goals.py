"""A benchmark's goals: each check prints PASS or FAIL, and the script exits 1 when any goal was
missed, so a missed goal shows in the exit status (a CI job, `make`, a shell `&&`), not only in
the text of a long report.

    from goals import check, finish
    print(f"ratio {ratio:.2f}x (goal <= 1.10x) -> {check(ratio <= 1.10, 'cache overhead')}")
    ...
    finish()   # last line of main(): exit 1 naming the missed goals, if any
"""
from __future__ import annotations

import sys

MISSED: list[str] = []


def check(ok: bool, goal: str) -> str:
    """'PASS' or 'FAIL'; a FAIL is remembered for finish()."""
    if not ok:
        MISSED.append(goal)
    return "PASS" if ok else "FAIL"


def finish() -> None:
    if MISSED:
        print(f"\nmissed goal(s): {'; '.join(MISSED)}", file=sys.stderr)
        sys.exit(1)
