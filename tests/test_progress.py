"""Progress off a terminal: whole lines at most every PLAIN_INTERVAL seconds, no '\\r' frames."""
import io
import types

import core.progress as progress


class _Tty(io.StringIO):
    def isatty(self):
        return True


def test_plain_lines_off_a_terminal(monkeypatch):
    """20 redraws 1/64 s apart on the line clock, one line per 1/16 s at most: the first line,
    one at redraws 4, 8, 12, 16, 20, and the last. The clock is a fake (steps exact in binary):
    no sleeps, no timing on a shared machine."""
    now = [0.0]
    monkeypatch.setattr(progress, "time", types.SimpleNamespace(monotonic=lambda: now[0]))
    out = io.StringIO()
    with progress.progress_bar(total=2000, desc="cache", unit="s audio", file=out,
                               mininterval=1 / 16) as bar:
        for i in range(1, 21):
            now[0] = i / 64
            bar.set_postfix_str(f"track {i}")   # forces a redraw on a terminal
            bar.update(100)
    text = out.getvalue()
    assert "\r" not in text
    lines = text.splitlines()
    assert lines and all(line.startswith("cache:") for line in lines)
    assert "2000/2000" in lines[-1] and "100%" in lines[-1]
    assert [line.split("track ")[-1].rstrip("]") for line in lines[1:6]] == ["4", "8", "12", "16", "20"]
    assert len(lines) == 7


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
