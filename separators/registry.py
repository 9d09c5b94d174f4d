"""From a user-facing model spec to a loaded `Separator`.

Two questions are kept apart, as in demucs's pretrained.py / repo.py:

* where weights come from (this module's "weight locations" helpers, plus each adapter's
  `locate_*` functions): a local folder (`--repo DIR`), the torch hub cache
  (`$TORCH_HOME/hub/checkpoints`), the Hugging Face cache, a shipped checkpoint folder under
  `separators/checkpoints/<name>/`, or (online only) a download;
* what a model is (each adapter's Separator class): how it is built and how it separates.

`load_separator(spec, ...)` accepts
  - a pretrained name: demucs's (htdemucs, htdemucs_ft, htdemucs_6s, hdemucs_mmi, mdx, mdx_extra,
    mdx_q, mdx_extra_q, ... or a single demucs signature), Open-Unmix's (umxhq, umxl, umx), or
    `xumx` (official X-UMX weights; never downloaded, must be a local file);
  - a path: a demucs repo folder (`<sig>.th` files, bag `<name>.yaml`; pick one with `DIR:NAME`
    when it holds several), a `<sig>.th` / `<name>.yaml` file, an Open-Unmix model folder
    (`separator.json`, `<target>.json`, `<target>.pth`), an X-UMX `.pth` file (or a folder
    holding exactly one);
  - an MSST model (separators.families.msst): `CONFIG.yaml:MODEL.ckpt` (optionally
    `?model_type=TYPE&name=NAME`), or a folder holding one config .yaml and one .ckpt (what
    `train-base --family roformer` writes);
  - a UVR MDX-Net `.onnx` file (separators.families.uvr; parameters from UVR's model-data JSON next
    to it, audio-separator's table, or `?dim_f=..&dim_t=..&n_fft=..&compensate=..&primary_stem=..`);
  - a plugin (separators.families.plugin): `py:package.module:factory[?key=value...]` or
    `entry:NAME` (a `pipeline.separators` entry point);
  - the name of a shipped checkpoint folder `separators/checkpoints/<name>/` (family detected from
    the files present; `MODEL.md` is the model card and is ignored here).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from core.config import check_device
from core.errors import PipelineError
from separators.base import parse_query
from separators.weights import LOAD_ERRORS, enable_offline, why_unloadable

CHECKPOINTS_DIR = Path(__file__).resolve().parent / "checkpoints"

OPENUNMIX_NAMES = ("umxhq", "umxl", "umx")
XUMX_NAMES = ("xumx",)


# --------------------------------------------------------------------------------------------
# Spec -> family + locator
# --------------------------------------------------------------------------------------------

def demucs_names() -> list[str]:
    from separators.families.demucs import pretrained_names

    return pretrained_names()


def shipped_checkpoints() -> list[str]:
    if not CHECKPOINTS_DIR.is_dir():
        return []
    return sorted(p.name for p in CHECKPOINTS_DIR.iterdir()
                  if p.is_dir() and not p.name.startswith((".", "_")))


def known_names() -> dict[str, list[str]]:
    return {"demucs": demucs_names(), "openunmix": list(OPENUNMIX_NAMES), "xumx": list(XUMX_NAMES),
            "shipped": shipped_checkpoints()}


def detect_family(folder: Path) -> str:
    """Which family a model folder holds, from the files present."""
    files = [p for p in folder.iterdir() if p.is_file()]
    names = {p.name for p in files}
    if "separator.json" in names:
        return "openunmix"
    from separators.families.msst import folder_files

    if folder_files(folder) is not None:
        return "msst"
    if any(p.suffix == ".th" for p in files):
        return "demucs"
    if any(p.suffix == ".yaml" for p in files):
        from separators.families.demucs import is_bag_yaml

        if any(is_bag_yaml(p) for p in files if p.suffix == ".yaml"):
            return "demucs"
    pths = [p for p in files if p.suffix == ".pth"]
    if len(pths) == 1:
        return "xumx"
    if pths:
        raise PipelineError(f"{folder}: several .pth files and no separator.json; pass the X-UMX "
                            f".pth file itself, or add separator.json for an Open-Unmix model")
    raise PipelineError(f"{folder}: no model files found (expected demucs <sig>.th / <name>.yaml, "
                        f"Open-Unmix separator.json + <target>.json + <target>.pth, an X-UMX .pth, "
                        f"or an MSST config .yaml + checkpoint .ckpt)")


def _load_folder(folder: Path, name: str | None, *, device, offline, options, label=None):
    family = detect_family(folder)
    if family == "demucs":
        from separators.families.demucs import load_demucs, pick_local_name

        return load_demucs(name or pick_local_name(folder), repo=folder, offline=offline,
                           device=device, options=options, label=label)
    if name is not None:
        raise PipelineError(f"{folder}:{name}: DIR:NAME is only for demucs repositories")
    if family == "msst":
        from separators.families.msst import folder_files, load_msst

        config, ckpt = folder_files(folder)
        return load_msst(config, ckpt, device=device, label=label)
    if family == "openunmix":
        from separators.families.umx import load_openunmix

        return load_openunmix(str(folder), device=device, offline=offline, options=options,
                              label=label)
    from separators.families.xumx import load_xumx

    pth = next(p for p in folder.iterdir() if p.is_file() and p.suffix == ".pth")
    return load_xumx(pth, device=device, options=options, label=label)


def run_label(folder: Path) -> str | None:
    """`pipeline train-base` writes RUN/model/: such a model is called by its run's name
    (umx-musdb7), not 'model' (or a demucs signature), in the store and in every report."""
    folder = folder.resolve()
    return folder.parent.name if folder.name == "model" and folder.parent.name else None


def _split_dir_name(spec: str) -> tuple[Path, str] | None:
    """'DIR:NAME' where DIR is an existing folder (a demucs repo and one of its models)."""
    if ":" not in spec:
        return None
    head, name = spec.rsplit(":", 1)
    folder = Path(head).expanduser()
    if head and name and folder.is_dir():
        return folder, name
    return None


def _load_special(spec: str, *, device, offline, options):
    """The specs that name their format: py:... plugins, CONFIG.yaml:MODEL.ckpt (MSST), UVR
    files (.onnx); None for everything else."""
    from separators.families.msst import is_msst_spec

    if spec.startswith("py:") or spec.startswith("entry:"):
        from separators.families.plugin import load_plugin

        return load_plugin(spec, device=device)
    if is_msst_spec(spec):
        from separators.families.msst import load_msst

        base, params = parse_query(spec)
        unknown = sorted(set(params) - {"model_type", "name"})
        if unknown:
            raise PipelineError(f"{spec}: unknown parameter(s) {', '.join(unknown)} "
                                f"(known: model_type, name)")
        config, ckpt = base.rsplit(":", 1)
        return load_msst(Path(config).expanduser(), Path(ckpt).expanduser(), device=device,
                         model_type=params.get("model_type"), label=params.get("name"))
    base = spec.partition("?")[0]
    if Path(base).suffix.lower() == ".onnx":
        from separators.families.uvr import load_mdx_onnx

        path, params = parse_query(spec)
        return load_mdx_onnx(Path(path).expanduser(), params, device=device)
    return None


def _check_device(device) -> "Any":
    import torch

    return torch.device(check_device(device))


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
    spec = str(spec).strip()
    if not spec:
        raise PipelineError("empty model name")
    dev = _check_device(device)
    if offline:
        enable_offline()
    repo_path = Path(repo).expanduser() if repo is not None else None
    if repo_path is not None and not repo_path.is_dir():
        raise PipelineError(f"--repo {repo}: not a folder")

    special = _load_special(spec, device=dev, offline=offline, options=options)
    if special is not None:
        return special
    dir_name = _split_dir_name(spec)
    if dir_name is not None:
        folder, name = dir_name
        return _load_folder(folder, name, device=dev, offline=offline, options=options)

    path = Path(spec).expanduser()
    looks_like_path = os.sep in spec or spec.startswith(".") or path.suffix in (".th", ".yaml", ".pth")
    if path.exists():
        if path.is_dir():
            return _load_folder(path, None, device=dev, offline=offline, options=options,
                                label=run_label(path))
        if path.suffix == ".pth":
            from separators.families.xumx import load_xumx

            return load_xumx(path, device=dev, options=options)
        if path.suffix in (".th", ".yaml"):
            from separators.families.demucs import is_bag_yaml, load_demucs, sig_of

            if path.suffix == ".yaml" and not is_bag_yaml(path):
                raise PipelineError(f"{path}: not a demucs bag definition (YAML with a 'models' "
                                    f"list of signatures)")

            name = sig_of(path.name) if path.suffix == ".th" else path.stem
            return load_demucs(name, repo=path.parent, offline=offline, device=dev, options=options)
        raise PipelineError(f"{path}: not a model file (expected a demucs .th/.yaml or an X-UMX .pth)")
    if looks_like_path:
        raise PipelineError(f"{spec}: no such file or folder")

    if spec in OPENUNMIX_NAMES:
        from separators.families.umx import load_openunmix

        return load_openunmix(spec, device=dev, offline=offline, repo=repo_path, options=options)
    if spec in XUMX_NAMES:
        from separators.families.xumx import load_xumx, locate_official_xumx

        return load_xumx(locate_official_xumx(repo_path), device=dev, options=options, label=spec)
    from separators.families.demucs import is_pretrained, load_demucs, local_has

    if is_pretrained(spec) or (repo_path is not None and local_has(repo_path, spec)):
        return load_demucs(spec, repo=repo_path, offline=offline, device=dev, options=options)
    shipped = CHECKPOINTS_DIR / spec
    if shipped.is_dir():
        return _load_folder(shipped, None, device=dev, offline=offline, options=options, label=spec)

    from separators.families.plugin import entry_point

    if entry_point(spec) is not None:
        from separators.families.plugin import load_plugin

        return load_plugin(f"entry:{spec}", device=dev)
    known = known_names()
    listing = "; ".join(f"{fam}: {', '.join(names) if names else '(none)'}"
                        for fam, names in known.items())
    where = f" (nor a model in --repo {repo_path})" if repo_path is not None else ""
    raise PipelineError(f"unknown model '{spec}'{where}. Known names - {listing}; "
                        f"or give a path to a model file or folder")
