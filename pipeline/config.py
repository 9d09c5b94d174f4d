"""Where generated data goes: the work directory (never inside the code folders)."""
from __future__ import annotations

import os
from pathlib import Path

WORK_ENV = "PIPELINE_WORK"
DEFAULT_WORK = "work"

SOURCES = ("drums", "bass", "other", "vocals")  # MUSDB18's targets, in MUSDB's order


def work_dir(option: str | Path | None = None) -> Path:
    """The work directory: the --work option, else $PIPELINE_WORK, else ./work."""
    return Path(option or os.environ.get(WORK_ENV) or DEFAULT_WORK).resolve()


def store_dir(work: Path) -> Path:
    return work / "store"


def runs_dir(work: Path) -> Path:
    return work / "runs"


def reports_dir(work: Path) -> Path:
    return work / "reports"


def default_device() -> str:
    """cuda when available (cuda:LOCAL_RANK under torchrun), else cpu."""
    import torch

    if os.environ.get("LOCAL_RANK") is not None and torch.cuda.is_available():
        return f"cuda:{os.environ['LOCAL_RANK']}"
    return "cuda" if torch.cuda.is_available() else "cpu"
