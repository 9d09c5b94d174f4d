"""Progress off a terminal: whole lines at most every PLAIN_INTERVAL seconds, no '\\r' frames."""
import io
import time

import core.progress as progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal(monkeypatch):
    out = io.StringIO()
    with progress.progress_bar(total=2000, desc="cache", unit="s audio", file=out,
                               mininterval=0.05) as bar:
        for i in range(20):
            bar.set_postfix_str(f"track {i}")   # forces a redraw on a terminal
            bar.update(100)
            time.sleep(0.01)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("cache:") for line in lines)
    assert "2000/2000" in lines[-1] and "100%" in lines[-1]
    # timed: 20 updates over ~0.2 s at one line per 0.05 s give a handful of lines, not 20
    assert 2 <= len(lines) <= 12


def test_default_interval_keeps_logs_short():
    out = io.StringIO()
    with progress.progress_bar(total=10000, desc="x", file=out) as bar:
        for _ in range(10000):
            bar.update(1)
    lines = out.getvalue().splitlines()
    assert len(lines) <= 3 and "10000/10000" in lines[-1]


def test_live_bar_on_a_terminal():
    out = _Tty()
    with progress.progress_bar(total=10, desc="x", file=out, mininterval=0) as bar:
        for _ in range(10):
            bar.update(1)
    assert "\r" in out.getvalue()
