"""Open-Unmix family: the pretrained umxhq / umxl / umx, and local Open-Unmix model folders.

Where weights come from:
  * pretrained names: one `<target>-<hash>.pth` per target, e.g. `vocals-b62c91ce.pth`, looked
    up in `--repo DIR` and in the torch hub cache `$TORCH_HOME/hub/checkpoints` (where
    `openunmix.umxhq()` caches them). Offline, a missing file is a PipelineError naming it.
  * a local folder as written by openunmix's scripts/train.py: `separator.json` (nfft, nhop,
    sample_rate, nb_channels), and per target `<target>.json` (its "args": nfft, nb_channels,
    hidden_size, ...) and `<target>.pth` (a plain state dict; `<target>.chkpnt` is the training
    checkpoint and is not needed). Loaded through `openunmix.utils.load_separator`.

Open-Unmix checkpoints are plain state dicts, so they are always read with
`torch.load(weights_only=True)` (no arbitrary code from the file). openunmix's own hub loader
(`torch.hub.load_state_dict_from_url`) would unpickle fully, so for pretrained names we build the
architecture with `openunmix.<name>(pretrained=False)` and load the state dicts ourselves.

Sources are the targets the model has (a vocals-only model separates only vocals). The
`residual` option (off by default) adds openunmix's "residual" stem: mixture minus the other
estimates before Wiener filtering. Wiener EM needs at least two stems, so for a single-target
model without residual the default niter is 0 (openunmix raises otherwise).

Long tracks: the whole-track STFT, BiLSTM and Wiener filtering cost GBs on a 10-minute track, so
the signal is cut into `segment`-second pieces (default 30 s, half-overlapping) and cross-faded
with pipeline.chunking.overlap_add. Inputs no longer than one segment are processed whole.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from cache.base import MaskingSeparator, pick_options, resolve_niter
from cache.weights import (cached_checksum, combined_checksum, hub_checkpoints_dir,
                           load_checkpoint_file, missing_weights_error)
from pipeline.config import SOURCES
from pipeline.errors import PipelineError

FAMILY = "openunmix"

# Mirrors the URL tables inside openunmix/__init__.py (umxhq_spec, umx_spec, umxl_spec), which
# keeps them in function bodies; tests/test_adapters.py checks that they still match.
PRETRAINED_URLS = {
    "umxhq": {
        "bass": "https://zenodo.org/records/3370489/files/bass-8d85a5bd.pth",
        "drums": "https://zenodo.org/records/3370489/files/drums-9619578f.pth",
        "other": "https://zenodo.org/records/3370489/files/other-b52fbbf7.pth",
        "vocals": "https://zenodo.org/records/3370489/files/vocals-b62c91ce.pth",
    },
    "umx": {
        "bass": "https://zenodo.org/records/3370486/files/bass-646024d3.pth",
        "drums": "https://zenodo.org/records/3370486/files/drums-5a48008b.pth",
        "other": "https://zenodo.org/records/3370486/files/other-f8e132cc.pth",
        "vocals": "https://zenodo.org/records/3370486/files/vocals-c8df74a5.pth",
    },
    "umxl": {
        "bass": "https://zenodo.org/records/5069601/files/bass-2ca1ce51.pth",
        "drums": "https://zenodo.org/records/5069601/files/drums-69e0ebd4.pth",
        "other": "https://zenodo.org/records/5069601/files/other-c8c5b3e6.pth",
        "vocals": "https://zenodo.org/records/5069601/files/vocals-bccbd9aa.pth",
    },
}

OPTIONS = {
    "niter": (int, None, True),           # Wiener EM iterations; None: 1, or 0 with a single stem
    "residual": (bool, False, False),     # add openunmix's "residual" stem
    "wiener_win_len": (int, 300, False),  # frames per Wiener filtering block (openunmix default)
    "segment": (float, 30.0, False),      # seconds per chunk for long inputs
}


def order_targets(targets) -> list[str]:
    """MUSDB's order (drums, bass, other, vocals) first, then any other target alphabetically."""
    targets = set(targets)
    return [s for s in SOURCES if s in targets] + sorted(targets - set(SOURCES))


def load_state(path: Path) -> dict:
    """A plain state dict, read without arbitrary unpickling."""
    state = load_checkpoint_file(path, "an Open-Unmix state dict")
    if not isinstance(state, dict) or "input_mean" not in state:
        raise PipelineError(f"{path}: not an Open-Unmix state dict (no input_mean)")
    return state


# --------------------------------------------------------------------------------------------
# Where weights come from
# --------------------------------------------------------------------------------------------

def locate_pretrained(name: str, repo: Path | None = None, offline: bool = False) -> dict[str, Path | str]:
    """target -> local file; with offline=False a missing target maps to its URL instead."""
    urls = PRETRAINED_URLS[name]
    folders = ([Path(repo)] if repo is not None else []) + [hub_checkpoints_dir()]
    found: dict[str, Path | str] = {}
    missing = []
    for target, url in urls.items():
        fname = url.rsplit("/", 1)[-1]
        hit = next((f / fname for f in folders if (f / fname).is_file()), None)
        if hit is not None:
            found[target] = hit
        elif offline:
            missing.append((fname, url))
        else:
            found[target] = url
    if missing:
        raise missing_weights_error(name, missing, [str(hub_checkpoints_dir()), "--repo DIR"])
    return found


def local_targets(folder: Path) -> dict[str, Path]:
    """target -> its .pth in an Open-Unmix model folder (the file openunmix's loader will pick)."""
    targets = {}
    for js in sorted(folder.glob("*.json")):
        if js.name == "separator.json":
            continue
        target = js.stem
        pths = sorted(folder.glob(f"{target}*.pth"))  # the same glob as openunmix.utils
        if not pths:
            raise PipelineError(f"{folder}: {js.name} has no {target}.pth next to it")
        if len(pths) > 1:
            raise PipelineError(f"{folder}: several weight files for target {target} "
                                f"({', '.join(p.name for p in pths)}); keep one")
        targets[target] = pths[0]
    if not targets:
        raise PipelineError(f"{folder}: an Open-Unmix folder needs <target>.json + <target>.pth files "
                            f"next to separator.json; found none")
    return targets


def _read_json(path: Path, keys) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise PipelineError(f"{path}: unreadable JSON ({e})") from None
    args = data.get("args", data) if path.name != "separator.json" else data
    miss = [k for k in keys if k not in args]
    if miss:
        raise PipelineError(f"{path}: missing {', '.join(miss)}")
    return data


# --------------------------------------------------------------------------------------------
# What an Open-Unmix model is
# --------------------------------------------------------------------------------------------

class OpenUnmixSeparator(MaskingSeparator):
    family = FAMILY

    def __init__(self, model, name: str, weights_checksum: str, *, niter: int, residual: bool,
                 wiener_win_len: int, segment: float):
        self.model = self.network = model
        self.model.freeze()  # eval() (BatchNorm!) + no grads; openunmix's loaders leave train mode on
        self.name = name
        targets = tuple(model.target_models.keys())
        self.sources = targets + (("residual",) if residual else ())
        rate = float(model.sample_rate)
        if not rate.is_integer():
            raise PipelineError(f"{name}: non-integer sample rate {rate}")
        self.sample_rate = int(rate)
        if segment <= 0:
            raise PipelineError(f"{name}: segment must be > 0 s, got {segment}")
        self.niter, self.residual = niter, residual
        self.wiener_win_len, self.segment = wiener_win_len, segment
        self._checksum = weights_checksum

    def separate_chunk(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def _build_pretrained(name: str, files: dict, opts: dict):
    import openunmix

    niter = resolve_niter(name, opts["niter"], len(files) + int(opts["residual"]))
    targets = order_targets(files)
    sep = getattr(openunmix, name)(targets=targets, residual=opts["residual"], niter=niter,
                                   device="cpu", pretrained=False,
                                   wiener_win_len=opts["wiener_win_len"], filterbank="torch")
    sums = {}
    for target in targets:
        src = files[target]
        if isinstance(src, Path):
            state = load_state(src)
            sums[src.name] = cached_checksum(src)
        else:  # online: torch.hub downloads into its cache; still a weights-only load
            try:
                state = torch.hub.load_state_dict_from_url(src, map_location="cpu", weights_only=True)
            except Exception as e:
                raise PipelineError(f"{name}: could not download {src} ({e}); for offline use put "
                                    f"the file in {hub_checkpoints_dir()} or --repo DIR") from None
            cached = hub_checkpoints_dir() / src.rsplit("/", 1)[-1]
            sums[cached.name] = cached_checksum(cached) if cached.is_file() else src
        result = sep.target_models[target].load_state_dict(state, strict=False)
        if result.missing_keys:
            raise PipelineError(f"{name}: {target} weights lack {', '.join(result.missing_keys[:5])}")
    return sep, niter, combined_checksum({"files": sums})


def _build_local(folder: Path, opts: dict):
    from openunmix.utils import load_separator

    files = local_targets(folder)
    _read_json(folder / "separator.json", ("nfft", "nhop", "sample_rate", "nb_channels"))
    for target in files:
        _read_json(folder / f"{target}.json", ("nfft", "nb_channels", "hidden_size"))
    niter = resolve_niter(str(folder), opts["niter"], len(files) + int(opts["residual"]))
    targets = order_targets(files)
    sums = {"separator.json": cached_checksum(folder / "separator.json")}
    states = {}
    for target in targets:
        states[target] = load_state(files[target])  # weights-only check before openunmix loads it
        sums[files[target].name] = cached_checksum(files[target])
    try:
        sep = load_separator(str(folder), targets=targets, niter=niter, residual=opts["residual"],
                             wiener_win_len=opts["wiener_win_len"], device="cpu",
                             pretrained=True, filterbank="torch")
    except (RuntimeError, KeyError, ValueError) as e:
        raise PipelineError(f"{folder}: openunmix could not load this model ({e})") from None
    for target in targets:  # openunmix loads with strict=False: make sure nothing was left random
        own = set(sep.target_models[target].state_dict())
        lacking = sorted(own - set(states[target]))
        if lacking:
            raise PipelineError(f"{files[target]}: lacks {', '.join(lacking[:5])}")
    return sep, niter, combined_checksum({"files": sums})


def load_openunmix(name_or_path: str, *, device="cpu", offline: bool = False, repo: Path | None = None,
                   options: dict | None = None, label: str | None = None) -> OpenUnmixSeparator:
    """'umxhq' / 'umxl' / 'umx', or an Open-Unmix model folder -> OpenUnmixSeparator on `device`."""
    opts = pick_options(FAMILY, options, OPTIONS)
    if name_or_path in PRETRAINED_URLS:
        files = locate_pretrained(name_or_path, repo, offline)
        model, niter, checksum = _build_pretrained(name_or_path, files, opts)
        name = label or name_or_path
    else:
        folder = Path(name_or_path)
        if not (folder / "separator.json").is_file():
            raise PipelineError(f"{folder}: not an Open-Unmix model folder (no separator.json)")
        model, niter, checksum = _build_local(folder, opts)
        name = label or folder.resolve().name
    sep = OpenUnmixSeparator(model, name, checksum, niter=niter, residual=opts["residual"],
                             wiener_win_len=opts["wiener_win_len"], segment=opts["segment"])
    return sep.to(device)
