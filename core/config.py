"""Where generated data goes: the work directory (never inside the code folders), and the names
that become folders in it."""
from __future__ import annotations

import os
import unicodedata
from pathlib import Path

from core.errors import PipelineError

WORK_ENV = "PIPELINE_WORK"
DEFAULT_WORK = "work"

SOURCES = ("drums", "bass", "other", "vocals")  # MUSDB18's targets, in MUSDB's order


def work_dir(option: str | Path | None = None) -> Path:
    """The work directory: the --work option, else $PIPELINE_WORK, else ./work.

    It need not exist yet, but nothing on its path may be a file: every stage would otherwise
    fail deep inside with NotADirectoryError.
    """
    given = option or os.environ.get(WORK_ENV) or DEFAULT_WORK
    path = Path(given).expanduser().resolve()
    where = "--work" if option else (f"${WORK_ENV}" if os.environ.get(WORK_ENV) else "the default")
    for p in (path, *path.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == path else f"lies under {p}, which is a file"
                raise PipelineError(f"{given}: the work folder ({where}) {what}, not a folder; "
                                    f"choose a folder with --work")
            break
    return path


def check_name(name: str, what: str = "run name") -> str:
    """`name` if it can be one folder name under the work folder, else a PipelineError.

    Run, system, experiment and imported-model names become paths (<work>/runs/NAME, ...): a
    '/', '..' or a control character would write outside the folder meant for it or hide it.
    """
    problem = None
    if not isinstance(name, str):
        problem = "is not text"
    elif not name.strip():
        problem = "is empty"
    elif "/" in name or "\\" in name or os.sep in name:
        problem = "contains a path separator"
    elif name in (".", ".."):
        problem = "is a relative path"
    elif any(unicodedata.category(c) == "Cc" for c in name):
        problem = "contains control characters"
    if problem:
        raise PipelineError(f"{what} {name!r} {problem}; it must be a single folder name "
                            f"(letters, digits, '-', '_', '.'), e.g. my-run")
    return name


def store_dir(work: Path) -> Path:
    return work / "store"


def runs_dir(work: Path) -> Path:
    return work / "runs"


def reports_dir(work: Path) -> Path:
    return work / "reports"


def run_folder(work: Path, name: str, out: str | Path | None = None) -> Path:
    """`out`, else <work>/runs/NAME (NAME a single folder name)."""
    return Path(out) if out else runs_dir(work) / check_name(name, "--name")


def find_run(run: str | Path, work: Path) -> Path:
    """A run folder given as a path or as a name under <work>/runs."""
    path = Path(run).expanduser()
    for candidate in (path, runs_dir(work) / str(run)):
        if (candidate / "config.json").is_file():
            return candidate
    raise PipelineError(f"{run}: not a run folder (no config.json there nor in "
                        f"{runs_dir(work) / str(run)}); run `pipeline blend` or `pipeline "
                        f"train-mixer` first")


def check_device(device: str) -> str:
    """`device` if torch knows it and this machine has it, else a PipelineError."""
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise PipelineError(f"device {device!r}: not a torch device (cpu, cuda, cuda:1, mps)") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device {device}: CUDA is not available on this machine")
    return device


def local_cuda_index() -> int:
    """This torchrun rank's GPU: LOCAL_RANK, wrapped round when ranks outnumber the GPUs (two
    ranks on one GPU is how DDP is checked on a single-GPU machine)."""
    import torch

    return int(os.environ.get("LOCAL_RANK", "0")) % max(1, torch.cuda.device_count())


def default_device() -> str:
    """cuda when available (this rank's GPU under torchrun), else cpu."""
    import torch

    if not torch.cuda.is_available():
        return "cpu"
    return f"cuda:{local_cuda_index()}" if os.environ.get("LOCAL_RANK") is not None else "cuda"
