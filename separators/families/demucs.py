"""Demucs family: every pretrained name demucs knows, and local demucs repositories.

Loading goes through demucs's own code (`demucs.pretrained.get_model`, `demucs.repo`,
`demucs.hf`), separation through `demucs.apply.apply_model` (its chunking, overlap and shift
trick; we do not chunk Demucs ourselves).

Where weights come from (`locate_demucs`), in this order:
  1. `--repo DIR`: `<sig>.th` or `<sig>-<sha256[:8]>.th` files (the checksum suffix is verified
     by demucs's LocalRepo) and bag definitions `<name>.yaml`. A pretrained bag name whose yaml is
     not in DIR uses the yaml shipped inside the demucs package, so downloading only the `.th`
     files of e.g. htdemucs_ft into DIR is enough.
  2. The Hugging Face cache (`adefossez/HTDemucs-ft` ... : `<name>.yaml` + `<sig>.safetensors`),
     as demucs >= 4.1 downloads there first. Safetensors: no pickle involved.
  3. The torch hub cache `$TORCH_HOME/hub/checkpoints/<sig>-<hash>.th` (the legacy
     dl.fbaipublicfiles.com files, cached by torch.hub.load_state_dict_from_url).
  4. Online only: a download by `get_model(name)`.
With offline=True nothing is downloaded: every expected file is checked to exist first, and a
missing one is a PipelineError naming it, the folders searched and the URL to fetch it from.

Pickle note: a demucs `.th` package stores the model class itself (`klass`) and its constructor
arguments, so it can only be read with full unpickling (`torch.load(weights_only=False)`, which
`demucs.states.load_model` does). That can run arbitrary code from the file, so it is only ever
done for files the user put there (`--repo DIR`, a path given on the command line, a shipped
checkpoint, the user's own torch hub cache) - never for anything fetched implicitly by us.

Sources: the model's `sources` through `core.sources.canonical_sources` (a two-source package's
vocals + other or vocals + no_vocals is vocals + instrumental); a package we exported names them
among the dataset's sources noted in its `training_args` (`dataset_sources`), so targets vocals,
other of MUSDB stay MUSDB's. A single local `.th` is read as demucs's LocalRepo reads it (the
checksum suffix verified), keeping those `training_args`.

Training recipe (`train-base --family demucs`, at the end of this file): Hybrid Demucs
(`demucs.hdemucs.HDemucs`) or Hybrid Transformer Demucs (`demucs.htdemucs.HTDemucs`), trained
with the L1 loss on waveforms, exported in demucs's package format as `<sig>-<checksum>.th`
(what demucs's solver / export writes), loadable with `get_model(sig, repo=model_dir)`.
"""
from __future__ import annotations

import hashlib
import inspect
import io
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from core.errors import PipelineError
from core.options import option
from separators.base import Separator
from separators.families import Family, Request, pick
from separators.families.common import Recipe, cpu_state, merge_options, waveform_l1
from separators.weights import (
    cached_checksum,
    check_torch_file,
    combined_checksum,
    hf_cached,
    hf_offline,
    hub_checkpoints_dir,
    missing_weights_error,
    model_file_errors,
)

FAMILY = "demucs"

@dataclass(frozen=True)
class DemucsOptions:
    shifts: int = option(1, "random shifts averaged (seeded: the same input gives the same stems)")
    overlap: float = option(0.25, "overlap between chunks")
    segment: float | None = option(None, "chunk length in seconds (none given: the model's own)")


# apply_model draws the shift offsets from Python's global `random`; we seed it for every call so
# that the same input always gives the same stems (the stem store relies on that), and restore
# the global state afterwards.
SHIFT_SEED = 0


# --------------------------------------------------------------------------------------------
# Where weights come from
# --------------------------------------------------------------------------------------------

def _remote_root() -> Path:
    from demucs.pretrained import REMOTE_ROOT

    return Path(REMOTE_ROOT)


def remote_urls() -> dict[str, str]:
    """signature -> download URL of every model in demucs's remote repo (demucs/remote/files.txt)."""
    from demucs.pretrained import _parse_remote_files

    return _parse_remote_files(_remote_root() / "files.txt")


def pretrained_names() -> list[str]:
    """Bag names demucs ships a definition for (htdemucs, htdemucs_ft, mdx_extra_q, ...)."""
    return sorted(p.stem for p in _remote_root().glob("*.yaml"))


def packaged_bag(name: str) -> dict | None:
    path = _remote_root() / f"{name}.yaml"
    if not path.is_file():
        return None
    with open(path) as f:
        return yaml.safe_load(f)


def is_pretrained(name: str) -> bool:
    return name in pretrained_names() or name in remote_urls()


def sig_of(filename: str) -> str:
    """The signature demucs's LocalRepo gives a file: `<sig>.th` or `<sig>-<checksum>.th`.

    Careful: LocalRepo treats everything after the last '-' as a sha256 prefix and verifies it,
    so a custom signature must not contain '-' unless followed by the real checksum.
    """
    stem = Path(filename).stem
    return stem.rsplit("-", 1)[0] if "-" in stem else stem


def _local_repo(folder: Path):
    from demucs.repo import BagOnlyRepo, LocalRepo, ModelLoadingError

    try:
        local = LocalRepo(folder)
    except ModelLoadingError as e:
        raise PipelineError(f"{folder}: {e}") from None
    return local, BagOnlyRepo(folder, local)


def local_has(folder: Path, name: str) -> bool:
    """Whether a local demucs repo defines `name` (a signature or a bag yaml)."""
    if not Path(folder).is_dir():
        return False
    local, bags = _local_repo(Path(folder))
    return local.has_model(name) or bags.has_model(name)


def is_bag_yaml(path: Path) -> bool:
    """A demucs bag definition (`models: [sigs]`), not some other YAML lying in the folder."""
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(data, dict) and isinstance(data.get("models"), list)


def pick_local_name(folder: Path) -> str:
    """The one model of a demucs repo folder: its single bag yaml, else its single .th file."""
    local, bags = _local_repo(folder)
    bag_names = sorted(n for n, p in bags.list_model().items() if is_bag_yaml(Path(p)))
    if len(bag_names) == 1:
        return bag_names[0]
    sigs = sorted(local.list_model())
    if not bag_names and len(sigs) == 1:
        return sigs[0]
    choices = bag_names or sigs
    raise PipelineError(f"{folder}: holds several demucs models ({', '.join(choices)}); "
                        f"choose one with {folder}:NAME")


def _hf_repo_id(name: str) -> str:
    from demucs.hf import DEFAULT_NAMESPACE, hf_repo_name

    return f"{DEFAULT_NAMESPACE}/{hf_repo_name(name)}"


@dataclass
class DemucsWeights:
    """Where one demucs model (a single signature or a bag) is read from."""

    name: str
    where: str                       # "repo" | "hf" | "hub" | "download"
    bag: dict                        # {"models": [sigs], "weights": ..., "segment": ...}
    files: list[Path] = field(default_factory=list)
    repo: Path | None = None
    packaged_bag: bool = False       # repo holds the .th files, the yaml comes from demucs

    def checksum(self) -> str:
        # contents only (a renamed or moved file keeps its key); the bag's signatures, per-source
        # weights and segment are part of the digest too
        files = [cached_checksum(p) for p in self.files if p.is_file()]
        if not files:  # a download that landed somewhere we do not know: fall back to the sigs
            files = ["signatures"] + list(self.bag.get("models", []))
        return combined_checksum({"bag": {k: self.bag.get(k) for k in ("models", "weights", "segment")},
                                  "files": files})


def _bag_of(name: str) -> dict:
    bag = packaged_bag(name)
    return bag if bag is not None else {"models": [name]}


def _url_file(url: str) -> str:
    return url.rsplit("/", 1)[-1]


def locate_demucs(name: str, repo: Path | None = None, offline: bool = False) -> DemucsWeights:
    """Find the weight files of `name` without downloading anything (see module docstring)."""
    urls = remote_urls()
    if repo is not None:
        repo = Path(repo)
        if not repo.is_dir():
            raise PipelineError(f"--repo {repo}: not a folder")
        local, bags = _local_repo(repo)
        if local.has_model(name):
            return DemucsWeights(name, "repo", {"models": [name]}, [Path(local.list_model()[name])], repo)
        if bags.has_model(name):
            with open(bags.list_model()[name]) as f:
                bag, packaged = yaml.safe_load(f), False
        elif packaged_bag(name) is not None:
            bag, packaged = packaged_bag(name), True
        else:
            held = sorted(set(local.list_model()) | set(bags.list_model()))
            raise PipelineError(f"{name}: not found in {repo} (it holds: {', '.join(held) or 'no demucs models'})")
        sigs = list(bag["models"])
        missing = [s for s in sigs if not local.has_model(s)]
        if missing:
            files = [(_url_file(urls[s]), urls[s]) if s in urls else (f"{s}.th", None) for s in missing]
            raise missing_weights_error(name, files, [str(repo)])
        return DemucsWeights(name, "repo", bag, [Path(local.list_model()[s]) for s in sigs], repo, packaged)

    if not is_pretrained(name):
        raise PipelineError(f"{name}: not a pretrained demucs model (known: {', '.join(pretrained_names())})")
    bag = _bag_of(name)
    sigs = list(bag["models"])

    hf_id = None
    if packaged_bag(name) is not None:  # named bags are on the HF hub, single signatures are not
        hf_id = _hf_repo_id(name)
        hf_yaml = hf_cached(hf_id, f"{name}.yaml")
        if hf_yaml is not None:
            with open(hf_yaml) as f:
                hf_bag = yaml.safe_load(f)
            st = [hf_cached(hf_id, f"{s}.safetensors") for s in hf_bag["models"]]
            if all(p is not None for p in st):
                return DemucsWeights(name, "hf", hf_bag, [hf_yaml, *st])

    hub = hub_checkpoints_dir()
    unknown = [s for s in sigs if s not in urls]
    if unknown:  # cannot happen with demucs's own files; guard against a broken install
        raise PipelineError(f"{name}: signatures {', '.join(unknown)} missing from demucs's files.txt")
    wanted = [(s, _url_file(urls[s])) for s in sigs]
    missing = [(f, urls[s]) for s, f in wanted if not (hub / f).is_file()]
    if not missing:
        return DemucsWeights(name, "hub", bag, [hub / f for _, f in wanted])
    if offline:
        extra = "or pass --repo DIR holding them"
        if hf_id:
            extra += f"; a Hugging Face cache of {hf_id} also works"
        raise missing_weights_error(name, missing, [str(hub), "--repo DIR"], extra)
    return DemucsWeights(name, "download", bag)


# --------------------------------------------------------------------------------------------
# What a demucs model is
# --------------------------------------------------------------------------------------------

def _single_file(w: DemucsWeights) -> bool:
    return (w.where == "repo" and not w.packaged_bag and w.bag == {"models": [w.name]}
            and len(w.files) == 1 and w.files[0].suffix == ".th")


def _load_package(path: Path):
    """One local `.th` as demucs's LocalRepo.get_model reads it (checksum suffix verified), the
    package's `training_args` kept on the model as `_training_args`: our exports note there the
    dataset sources their targets were chosen from, which name the stems (DemucsSeparator)."""
    import warnings

    from demucs.repo import check_checksum
    from demucs.states import load_model

    if "-" in path.stem:
        check_checksum(path, path.stem.rsplit("-", 1)[1])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        package = torch.load(path, "cpu", weights_only=False)
    model = load_model(package)
    args = package.get("training_args")
    model._training_args = dict(args) if isinstance(args, dict) else {}
    return model


def _load_model(w: DemucsWeights):
    """The demucs model (or BagOfModels) from located weights, through demucs's own loaders."""
    from demucs.pretrained import get_model
    from demucs.repo import ModelLoadingError

    try:
        if _single_file(w):
            model = _load_package(w.files[0])
        elif w.where == "repo" and not w.packaged_bag:
            model = get_model(w.name, repo=w.repo)
        elif w.where == "repo":
            from demucs.repo import BagOnlyRepo, LocalRepo

            model = BagOnlyRepo(_remote_root(), LocalRepo(w.repo)).get_model(w.name)
        elif w.where == "hf":
            from demucs.hf import get_hf_model

            with hf_offline():  # every file is cached: read them, never ask the hub
                model = get_hf_model(w.name)
        elif w.where == "hub":
            # The HF attempt inside get_model fails fast (cache-only, not cached), then demucs's
            # RemoteRepo finds the files in the torch hub cache and does not download.
            with hf_offline():
                model = get_model(w.name)
        else:
            model = get_model(w.name)
    except ImportError as e:
        if "diffq" in str(e):
            raise PipelineError(f"{w.name}: a quantized model; it needs diffq (pip install diffq)") from None
        raise
    except ModelLoadingError as e:
        raise PipelineError(f"{w.name}: {e}") from None
    except OSError as e:  # network failures of a download, unreadable files
        raise PipelineError(f"{w.name}: could not load the weights ({e}); for offline use see "
                            f"--offline and --repo") from None
    except SystemExit:  # demucs.utils.fatal
        raise PipelineError(f"{w.name}: demucs could not load this model") from None
    model.eval()
    return model


class DemucsSeparator(Separator):
    family = FAMILY

    def __init__(self, model, name: str, weights_checksum: str, shifts: int = 1,
                 overlap: float = 0.25, segment: float | None = None):
        from demucs.apply import BagOfModels
        from demucs.htdemucs import HTDemucs

        from core.sources import canonical_sources

        self.model = model
        self.name = name
        # a two-stem model's names mapped like every family's (vocals + other, vocals +
        # no_vocals: vocals + instrumental); a model we trained is named among the dataset's
        # sources it was trained on (targets [vocals, other] of MUSDB stay MUSDB's other)
        within = getattr(model, "_training_args", {}).get("dataset_sources")
        self.sources = canonical_sources(model.sources, within=within or None)
        self.sample_rate = int(model.samplerate)
        if int(model.audio_channels) != 2:
            raise PipelineError(f"{name}: a {model.audio_channels}-channel demucs model; only stereo models are supported")
        if shifts < 0:
            raise PipelineError(f"{name}: shifts must be >= 0, got {shifts}")
        if not 0 <= overlap < 1:
            raise PipelineError(f"{name}: overlap must be in [0, 1), got {overlap}")
        if isinstance(model, BagOfModels):
            max_segment = model.max_allowed_segment
        elif isinstance(model, HTDemucs):
            max_segment = float(model.segment)
        else:
            max_segment = float("inf")
        if segment is not None and not 0 < segment <= max_segment:
            raise PipelineError(f"{name}: segment {segment} s must be > 0 and at most {max_segment:g} s, "
                                f"the length this transformer model was trained on")
        self.shifts, self.overlap, self.segment = shifts, overlap, segment
        self._checksum = weights_checksum

    def options(self) -> dict:
        return {"shifts": self.shifts, "overlap": self.overlap, "segment": self.segment,
                "shift_seed": SHIFT_SEED if self.shifts else None}

    def to(self, device) -> "DemucsSeparator":
        super().to(device)
        self.model.to(self.device)
        return self

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        """[2, n] at sample_rate -> [S, 2, n]; normalised like demucs.api.Separator.separate_tensor."""
        from demucs.apply import apply_model

        mixture = mixture.to(self.device, torch.float32)
        ref = mixture.mean(0)
        mean = ref.mean()
        std = ref.std() + 1e-8 if ref.numel() > 1 else torch.ones((), device=mixture.device)
        state = random.getstate()
        random.seed(SHIFT_SEED)
        try:
            out = apply_model(self.model, ((mixture - mean) / std)[None], shifts=self.shifts,
                              split=True, overlap=self.overlap, segment=self.segment,
                              device=self.device, progress=False, num_workers=0)
        finally:
            random.setstate(state)
        return out[0] * std + mean


def load_demucs(name: str, *, repo: Path | None = None, offline: bool = False, device="cpu",
                options: dict | None = None, label: str | None = None) -> DemucsSeparator:
    """A pretrained name or a model of a local repo -> DemucsSeparator on `device`."""
    opts = pick(DemucsOptions, options, f"{FAMILY} options")
    weights = locate_demucs(name, repo, offline)
    for f in weights.files:   # demucs unpickles .th files fully: look at them first
        if f.suffix == ".th":
            check_torch_file(f, "a demucs model package")
    with model_file_errors(", ".join(map(str, weights.files)) or name, "a loadable demucs model"):
        model = _load_model(weights)
    if weights.where == "download":  # now cached: find the files to checksum them
        try:
            weights = locate_demucs(name, None, offline=True)
        except PipelineError:
            pass
    sep = DemucsSeparator(model, label or name, weights.checksum(), **opts)
    return sep.to(device)


# --------------------------------------------------------------------------------------------
# Writing demucs models (tiny test models, checkpoints we ship)
# --------------------------------------------------------------------------------------------

def package_model(model, training_args: dict | None = None, half: bool = True) -> dict:
    """demucs.states.serialize_model's package: {klass, args, kwargs, state, training_args}.

    serialize_model itself needs omegaconf (a demucs[train] extra, not installed here) only to turn
    the Hydra training config into a plain dict; without it the identical dict is built with
    demucs's own get_state.
    """
    from demucs import states

    try:
        from omegaconf import OmegaConf  # noqa: F401
    except ImportError:
        args, kwargs = model._init_args_kwargs
        return {"klass": model.__class__, "args": args, "kwargs": kwargs,
                "state": states.get_state(model, None, half), "training_args": dict(training_args or {})}
    return states.serialize_model(model, OmegaConf.create(dict(training_args or {})), half=half)


def export_model(model, folder: str | Path, sig: str, training_args: dict | None = None,
                 half: bool = True, with_checksum: bool = True) -> Path:
    """Save a demucs model so that `get_model(sig, repo=folder)` loads it.

    with_checksum: `<sig>-<sha256[:8]>.th` via demucs.states.save_with_checksum (as demucs's
    export tool does; LocalRepo verifies it on load), else `<sig>.th`.
    """
    from demucs.states import save_with_checksum

    if "-" in sig:
        raise PipelineError(f"demucs signature '{sig}' must not contain '-' (demucs reads what follows as a checksum)")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pkg = package_model(model, training_args, half)
    if with_checksum:
        save_with_checksum(pkg, folder / f"{sig}.th")
        return next(folder.glob(f"{sig}-*.th"))
    path = folder / f"{sig}.th"
    torch.save(pkg, path)
    return path


# --------------------------------------------------------------------------------------------
# Training recipe (separators.train_base; see separators.families.common for the interface)
# --------------------------------------------------------------------------------------------
TRAIN_NAME = "demucs"

# small: HDemucs, 8 channels: 0.57 steps/s -> 15 x 30 steps ~ 13 min, + ~2 min validation.
# lr 1e-3, not demucs's 3e-4 (meant for batch 32 and hundreds of epochs): on the synthetic set 15
# epochs reach 2.22 dB test SDR (valid L1 0.0221), where 3e-4 had 0.60 dB after 8 (valid L1
# 0.0282) and 1e-3 passes that after 3 epochs. paper: HTDemucs (demucs defaults, 10 s segments,
# batch 32, lr 3e-4, 800 batches per epoch, 360 epochs).
PRESETS = {
    "tiny": dict(model=dict(arch="hdemucs"),
                 train=dict(segment=1.0, batch_size=4, epochs=2, samples_per_epoch=8,
                            lr=3e-4, weight_decay=0.0, valid_max_items=4,
                            lr_schedule="constant")),
    "small": dict(model=dict(arch="hdemucs"),
                  train=dict(segment=3.0, batch_size=4, epochs=15, samples_per_epoch=120,
                             lr=1e-3, weight_decay=0.0, valid_segment=6.0,
                             valid_max_items=24)),
    "paper": dict(model=dict(arch="htdemucs"),
                  train=dict(segment=10.0, batch_size=32, epochs=360,
                             samples_per_epoch=800 * 32, lr=3e-4, weight_decay=0.0,
                             lr_schedule="constant")),
}
MODEL_DEFAULTS = dict(arch="hdemucs")

# Network arguments per architecture and preset (anything not given: the class's defaults).
# small: HDemucs with 8 channels trains at ~0.57 steps/s (batch 4 x 3 s, 44.1 kHz) on 2 cores;
# HTDemucs is ~4x slower there, so the shipped small model is an HDemucs.
DEMUCS_ARCH = {
    "hdemucs": {"tiny": dict(channels=4, nfft=256), "small": dict(channels=8, nfft=4096),
                "paper": {}},
    "htdemucs": {"tiny": dict(channels=8, nfft=512, depth=2, t_layers=1, t_heads=2),
                 "small": dict(channels=8, t_layers=2, t_heads=4), "paper": {}},
}


def resolve_model(preset: str, model_options: dict | None) -> dict:
    arch = (model_options or {}).get("arch") or PRESETS[preset]["model"]["arch"]
    if arch not in DEMUCS_ARCH:
        raise PipelineError(f"demucs arch '{arch}': choose {' or '.join(DEMUCS_ARCH)}")
    # any HDemucs / HTDemucs constructor argument; build() checks them against the class
    return merge_options(TRAIN_NAME, "model", {"arch": arch, **DEMUCS_ARCH[arch][preset]},
                         model_options, any_key=True)


def check_training(targets, amp: str) -> None:
    if amp != "off":
        raise PipelineError("demucs: train with amp='off' (HDemucs/HTDemucs build complex "
                            "spectrograms from their outputs, which autocast's half types break)")


def prepare(run_dir, store, dataset_id, config, rank, split="train"):
    return None


def _demucs_kwargs(model: dict, targets, sample_rate: int, segment_s: float) -> tuple[type, dict]:
    from demucs.hdemucs import HDemucs
    from demucs.htdemucs import HTDemucs

    kw = {k: v for k, v in model.items() if k != "arch"}
    kw.update(sources=list(targets), audio_channels=2, samplerate=int(sample_rate),
              segment=segment_s)
    if model["arch"] == "hdemucs":
        nfft = int(kw.get("nfft", 4096))
        depth = math.log(nfft, 4)
        if abs(depth - round(depth)) > 1e-9:
            raise PipelineError(f"hdemucs nfft {nfft}: must be a power of 4 (256, 1024, 4096) so "
                                f"that the time and frequency branches meet")
        kw.setdefault("depth", int(round(depth)))
        return HDemucs, kw
    return HTDemucs, kw


def build(config: dict, prepared):
    m, sr = config["model"], config["sample_rate"]
    klass, kw = _demucs_kwargs(m, config["targets"], sr, config["train"]["segment_samples"] / sr)
    unknown = sorted(set(kw) - set(inspect.signature(klass.__init__).parameters))
    if unknown:
        raise PipelineError(f"demucs {m['arch']}: unknown model option(s) {', '.join(unknown)}")
    try:
        net = klass(**kw)
        # some shape constraints only show in a forward pass (eval mode: no randomness used)
        net.eval()
        with torch.no_grad():
            net(torch.zeros(1, 2, min(config["train"]["segment_samples"], sr)))
        net.train()
    except (AssertionError, RuntimeError, ValueError, ZeroDivisionError) as e:
        raise PipelineError(f"demucs {m['arch']} {kw}: not a valid configuration "
                            f"({type(e).__name__}: {str(e)[:200]})") from None
    return net, waveform_l1, net


def demucs_signature(config: dict) -> str:
    """8 hex digits naming the experiment, like a dora signature (no '-': demucs's LocalRepo
    reads `<sig>-<checksum>.th`)."""
    ident = {k: config[k] for k in ("family", "model", "targets", "sample_rate", "seed")}
    ident["train"] = {k: v for k, v in config["train"].items()}
    ident["dataset_id"] = config.get("dataset_id")
    return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:8]


def export(model, out: Path, config: dict, summary: dict) -> list[Path]:
    """demucs's package (states.serialize_model's fields, full precision) saved as
    `<sig>-<sha256[:8]>.th`, like demucs's `save_with_checksum` export."""
    args, kwargs = model._init_args_kwargs
    package = {"klass": model.__class__, "args": args, "kwargs": kwargs,
               "state": cpu_state(model),
               "training_args": {"config": config, "dataset": summary["dataset_id"],
                                 "dataset_sources": list(summary["sources"]),
                                 "best_epoch": summary["best_epoch"]}}
    buf = io.BytesIO()
    torch.save(package, buf)
    sig = demucs_signature(config)
    path = out / f"{sig}-{hashlib.sha256(buf.getvalue()).hexdigest()[:8]}.th"
    path.write_bytes(buf.getvalue())
    return [path]


def describe(config: dict) -> tuple[str, str]:
    arch = config["model"].get("arch", "hdemucs").upper().replace("DEMUCS", "Demucs")
    return f"{arch} (hybrid waveform/spectrogram U-Net)", "L1 on waveforms"


# --------------------------------------------------------------------------------------------
# The family, as separators.registry sees it
# --------------------------------------------------------------------------------------------
def _is_model_folder(folder: Path) -> bool:
    files = [p for p in folder.iterdir() if p.is_file()]
    return (any(p.suffix == ".th" for p in files)
            or any(is_bag_yaml(p) for p in files if p.suffix == ".yaml"))


def _load(r: Request) -> DemucsSeparator:
    if r.path is None:          # a pretrained name, or a model of --repo
        return load_demucs(r.spec, repo=r.repo, offline=r.offline, device=r.device,
                           options=r.options, label=r.label)
    if r.path.is_dir():
        return load_demucs(r.member or pick_local_name(r.path), repo=r.path, offline=r.offline,
                           device=r.device, options=r.options, label=r.label)
    if r.path.suffix == ".yaml" and not is_bag_yaml(r.path):
        raise PipelineError(f"{r.path}: not a demucs bag definition (YAML with a 'models' list of "
                            f"signatures)")
    name = sig_of(r.path.name) if r.path.suffix == ".th" else r.path.stem
    return load_demucs(name, repo=r.path.parent, offline=r.offline, device=r.device,
                       options=r.options, label=r.label)


RECORD = Family(
    name=FAMILY,
    summary="Demucs (htdemucs, htdemucs_ft, htdemucs_6s, hdemucs_mmi, mdx, mdx_extra, ..., bags "
            "included): a name, a <sig>.th / <name>.yaml, a folder (DIR:NAME for one of several)",
    load=_load, options=DemucsOptions, folder=_is_model_folder,
    file=lambda path: path.suffix in (".th", ".yaml"),
    knows=lambda name, repo: is_pretrained(name) or (repo is not None and local_has(repo, name)),
    names=pretrained_names, members=True,
    recipe=Recipe(TRAIN_NAME, ("hdemucs", "htdemucs"), PRESETS, resolve_model, check_training,
                  prepare, build, export, describe))
