"""From a user-facing model spec to a loaded `Separator`.

Two questions are kept apart, as in demucs's pretrained.py / repo.py:

* where weights come from (each family's `locate_*` functions and separators.weights): a local
  folder (`--repo DIR`), the torch hub cache (`$TORCH_HOME/hub/checkpoints`), the Hugging Face
  cache, a shipped checkpoint folder under `separators/checkpoints/<name>/`, or (online only) a
  download;
* what a model is (each family's Separator class): how it is built and how it separates.

`load_separator(spec, ...)` asks the registered families (separators.families, in their order)
who the spec belongs to:

1. a spec in a family's own syntax (`py:...` / `entry:...` plugins, MSST's
   `CONFIG.yaml:MODEL.ckpt`, UVR's `.onnx`);
2. `DIR:NAME`, one model of a folder holding several (demucs repositories);
3. an existing folder (the first family that recognises its files) or file (by its kind);
4. the name of a shipped checkpoint folder `separators/checkpoints/<name>/` (`MODEL.md` there is
   the model card), then a name some family knows (pretrained names, models of `--repo`,
   installed entry points).

A folder `RUN/model` written by `pipeline train-base` is called by its run's name.
"""
from __future__ import annotations

import os
from pathlib import Path

from core.config import check_device
from core.errors import PipelineError
from separators.families import FAMILIES, Family, Request
from separators.weights import LOAD_ERRORS, enable_offline, why_unloadable

CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"
MODEL_SUFFIXES = (".th", ".yaml", ".yml", ".pth", ".ckpt")   # a spec ending so means a file


def shipped_checkpoints() -> list[str]:
    if not CHECKPOINTS_DIR.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINTS_DIR.iterdir()
                  if p.is_dir() and not p.name.startswith((".", "_")))


def known_names() -> dict[str, list[str]]:
    """{family: the names it knows} and the shipped checkpoints, for help and errors."""
    known = {f.name: f.names() for f in FAMILIES.records() if f.knows is not None}
    return {**known, "shipped": shipped_checkpoints()}


def run_label(folder: Path) -> str | None:
    """`pipeline train-base` writes RUN/model/: such a model is called by its run's name
    (umx-musdb7), not 'model' (or a demucs signature), in the store and in every report."""
    folder = folder.resolve()
    return folder.parent.name if folder.name == "model" and folder.parent.name else None


def folder_family(folder: Path) -> Family:
    """The family whose model files a folder holds."""
    for family in FAMILIES.records():
        if family.folder is not None and family.folder(folder):
            return family
    kinds = "; ".join(f"{f.name}: {f.summary}" for f in FAMILIES.records() if f.folder)
    raise PipelineError(f"{folder}: no model files found (expected the files of one of: {kinds})")


def _split_dir_name(spec: str) -> tuple[Path, str] | None:
    """'DIR:NAME' where DIR is an existing folder (a repository and one of its models)."""
    if ":" not in spec:
        return None
    head, name = spec.rsplit(":", 1)
    folder = Path(head).expanduser()
    if head and name and folder.is_dir():
        return folder, name
    return None


def load_separator(spec: str, *, device="cpu", offline: bool = False, repo: str | Path | None = None,
                   options: dict | None = None):
    """Load a base separator from a name or path (see the module docstring); on `device`.

    offline=True never downloads: HF_HUB_OFFLINE=1 is set, and a missing weight file is a
    PipelineError naming the file, where it was looked for and how to place it.
    """
    try:
        return _load_separator(spec, device=device, offline=offline, repo=repo, options=options)
    except PipelineError:
        raise
    except LOAD_ERRORS as e:   # a loader that let a file's error through: still one line
        where = getattr(e, "filename", None) or spec
        raise PipelineError(f"{where}: could not load this model ({why_unloadable(e)})") from e


def _load_separator(spec: str, *, device, offline: bool, repo, options):
    import torch

    spec = str(spec).strip()
    if not spec:
        raise PipelineError("empty model name")
    dev = torch.device(check_device(device))
    if offline:
        enable_offline()
    repo_path = Path(repo).expanduser() if repo is not None else None
    if repo_path is not None and not repo_path.is_dir():
        raise PipelineError(f"--repo {repo}: not a folder")
    request = Request(spec, dev, offline, repo_path, dict(options or {}))
    families = FAMILIES.records()

    for family in families:
        if family.owns is not None and family.owns(spec):
            return family.load(request)
    dir_name = _split_dir_name(spec)
    if dir_name is not None:
        folder, name = dir_name
        family = folder_family(folder)
        if not family.members:
            raise PipelineError(f"{folder}:{name}: DIR:NAME picks one model of a folder holding "
                                f"several, which a {family.name} folder does not")
        return family.load(_at(request, folder, member=name))

    path = Path(spec).expanduser()
    if path.is_dir():
        return folder_family(path).load(_at(request, path, label=run_label(path)))
    if path.exists():
        for family in families:
            if family.file is not None and family.file(path):
                return family.load(_at(request, path))
        raise PipelineError(f"{path}: not a model file of any family ({_families()})")
    if os.sep in spec or spec.startswith(".") or path.suffix in MODEL_SUFFIXES:
        raise PipelineError(f"{spec}: no such file or folder")

    shipped = CHECKPOINTS_DIR / spec
    if shipped.is_dir():
        return folder_family(shipped).load(_at(request, shipped, label=spec))
    for family in families:
        if family.knows is not None and family.knows(spec, repo_path):
            return family.load(request)
    listing = "; ".join(f"{fam}: {', '.join(names) if names else '(none)'}"
                        for fam, names in known_names().items())
    where = f" (nor a model in --repo {repo_path})" if repo_path is not None else ""
    raise PipelineError(f"unknown model '{spec}'{where}. Known names - {listing}; "
                        f"or give a path to a model file or folder")


def _at(request: Request, path: Path, member: str | None = None, label: str | None = None) -> Request:
    return Request(request.spec, request.device, request.offline, request.repo, request.options,
                   path=path, member=member, label=label)


def _families() -> str:
    return "; ".join(f"{f.name}: {f.summary}" for f in FAMILIES.records())
