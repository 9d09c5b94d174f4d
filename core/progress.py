"""Progress bars for long stages: tqdm's live bar on a terminal, plain lines in a log.

On a terminal a bar redraws itself with carriage returns. Written to a file, a pipe or a CI log,
those frames pile up into one enormous line, so off a terminal the same bar prints a complete
line (the same text: percentage, counts, elapsed < remaining, rate) at most every
`PLAIN_INTERVAL` seconds, and a last one when it finishes.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

PLAIN_INTERVAL = float(os.environ.get("PIPELINE_PROGRESS_INTERVAL", "10"))


def _isatty(f) -> bool:
    try:
        return bool(f.isatty())
    except (AttributeError, ValueError):
        return False


class _Lines:
    """tqdm writes '\\r' / '\\n' on its own to move the cursor; a log only wants whole lines."""

    def __init__(self, f):
        self.f = f

    def write(self, s: str) -> None:
        if s.strip("\r\n"):
            self.f.write(s)

    def flush(self) -> None:
        getattr(self.f, "flush", lambda: None)()


class progress_bar(tqdm):
    """`tqdm(...)` with the same arguments; plain timed lines when the output is no terminal."""

    def __init__(self, *args, **kwargs):
        file = kwargs.get("file") or sys.stderr
        self._plain = not _isatty(file)
        if self._plain:
            kwargs["file"] = _Lines(file)
            kwargs.setdefault("mininterval", PLAIN_INTERVAL)
            kwargs["dynamic_ncols"] = False
            kwargs.setdefault("ncols", 100)
        super().__init__(*args, **kwargs)

    _printed_at = None
    _closing = False

    def display(self, msg=None, pos=None):
        if not self._plain:
            return super().display(msg, pos)
        now = time.monotonic()
        # set_postfix / refresh force a redraw; a log line still waits for the interval
        if (not self._closing and self._printed_at is not None
                and now - self._printed_at < self.mininterval):
            return True
        text = self.__str__() if msg is None else msg
        if text.strip():
            self._printed_at = now
            self.fp.write(text.strip() + "\n")
            self.fp.flush()
        return True

    def close(self):
        self._closing = True
        super().close()
