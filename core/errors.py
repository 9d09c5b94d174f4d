"""One exception type for every user-facing error.

The CLI turns a `PipelineError` into a single line on stderr and exit code 1 (a traceback only
with `--debug`), so every message must stand on its own: name the file and say what is wrong.
"""


class PipelineError(Exception):
    """An error caused by the user's input or environment, not by a bug."""


def fail(path, problem: str) -> "PipelineError":
    """Build the standard '<path>: <problem>' error."""
    return PipelineError(f"{path}: {problem}")
