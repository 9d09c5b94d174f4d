"""Music-Source-Separation-Training (MSST, ZFTurbo) checkpoints, and the RoFormer we train.

A model is two files, as MSST's model zoo distributes them and as `inference.py --config_path
CONFIG --start_check_point CKPT --model_type TYPE` reads them:

* `CONFIG.yaml`: `audio` (chunk_size, sample_rate, num_channels), `training` (instruments,
  target_instrument, optionally model_type, use_amp), `inference` (num_overlap, batch_size,
  optionally chunk_size and normalize) and the architecture's section (`model`; `kwargs` for
  bandit_v2; an HTDemucs config has its own sections and is read with OmegaConf, as MSST does).
  Read with PyYAML's FullLoader like MSST, since the zoo's configs carry `!!python/tuple`.
* `MODEL.ckpt`: a state dict, bare (the zoo's files) or wrapped under `state_dict`, `state` or
  `model_state_dict` (Lightning/Apollo, HTDemucs, MSST's training checkpoints), read with
  `torch.load(weights_only=True)` and loaded strictly.

The networks are MSST's own classes from the `msst` package (ZFTurbo's repository on PyPI),
built by its `build_model_from_config`, so state-dict keys are upstream's by construction. The
model type comes from `training.model_type`, the checkpoint's `meta.model_type`, `?model_type=`
on the spec, or the architecture section's fields (`_detect_model_type`).

Inference is MSST's `demix` (utils/model_utils.py), run through the project's one overlap-add
(`core.chunking.overlap_add`, window "msst"): chunk_size from `inference.chunk_size` or
`audio.chunk_size`, hop chunk_size // num_overlap, MSST's linear fades, reflect padding and
per-batch window rules, `inference.batch_size` chunks per forward; a single-target model runs with
`active_stem_ids` where the class supports it; `inference.normalize` normalises by the mixture's
mean/std and back; mono models get MSST's duplicated-channel input; CUDA runs under autocast
when `training.use_amp` (MSST's default) is on. Tracks longer than separators.base.BLOCK_SECONDS are
separated per block (the cache stage's rule), so only there can stems differ from MSST's
whole-track pass.

Sources: `training.target_instrument` alone, else `training.instruments`; names go through
`core.sources.canonical_sources`, each named by its place in `training.instruments` (a vocals +
other pair is vocals + instrumental, MSST's "other_fix" meaning, so the lone target `other` of
an instrumental RoFormer with `instruments: [other, vocals]` is the instrumental). Our own
RoFormers also write `training.dataset_sources`, the dataset's sources their targets were chosen
from, which then stands for the whole list (targets [vocals, other] of MUSDB stay MUSDB's
vocals and other).

Training recipe (`train-base --family roformer`, at the end of this file): BS-RoFormer (default)
or Mel-RoFormer (`arch=mel_band_roformer`) with MSST's loss (L1 on waveforms + the
multi-resolution STFT L1 of its forward), exported as `config.yaml` + `model.ckpt` (a bare state
dict) that MSST's inference.py and this loader read.
"""
from __future__ import annotations

import inspect
import warnings
from pathlib import Path

import torch
import yaml

from core.errors import PipelineError
from separators.base import Separator, parse_query
from separators.families import Family, Request
from separators.families.common import Recipe, cpu_state, merge_options
from separators.weights import (
    cached_checksum,
    combined_checksum,
    load_checkpoint_file,
    model_file_errors,
)

FAMILY = "msst"
CONFIG_SUFFIXES = (".yaml", ".yml")
CKPT_SUFFIXES = (".ckpt", ".pth", ".pt", ".bin")
STATE_KEYS = ("state_dict", "state", "model_state_dict")   # MSST's load_start_checkpoint order

# model type -> fields of its architecture section that only it has (first match wins; the
# order puts the more specific signatures first)
_SIGNATURES = [
    ("bs_roformer", ("freqs_per_bands",)),
    ("mel_band_roformer", ("num_bands", "dim", "depth")),
    ("mdx23c", ("num_subbands", "num_scales", "bottleneck_factor")),
    ("scnet", ("band_SR", "conv_depths", "num_dplayer")),
    ("apollo", ("feature_dim", "layer", "win")),
]


# --------------------------------------------------------------------------------------------
# Files
# --------------------------------------------------------------------------------------------
def is_msst_spec(spec: str) -> bool:
    """`CONFIG.yaml:MODEL.ckpt` (either may be missing: that is reported when loading)."""
    head, sep, tail = spec.partition("?")[0].rpartition(":")
    return bool(sep) and Path(head).suffix in CONFIG_SUFFIXES and Path(tail).suffix in CKPT_SUFFIXES


def folder_files(folder: Path) -> tuple[Path, Path] | None:
    """(config, checkpoint) when `folder` holds exactly one of each (else None)."""
    files = [p for p in folder.iterdir() if p.is_file()]
    configs = [p for p in files if p.suffix in CONFIG_SUFFIXES]
    ckpts = [p for p in files if p.suffix in CKPT_SUFFIXES]
    if len(configs) != 1 or not _looks_like_msst_config(configs[0]):
        return None
    if not ckpts:
        raise PipelineError(
            f"{folder}: holds the MSST config {configs[0].name} but no checkpoint "
            f"(looked for *{', *'.join(CKPT_SUFFIXES)} in {folder.resolve()}); download the "
            f"model's .ckpt on a machine with internet and put it in that folder")
    if len(ckpts) > 1:
        raise PipelineError(f"{folder}: several checkpoints ({', '.join(p.name for p in ckpts)}) "
                            f"next to {configs[0].name}; give CONFIG.yaml:MODEL.ckpt")
    return configs[0], ckpts[0]


def _looks_like_msst_config(path: Path) -> bool:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return False
    return "training:" in text and ("instruments" in text or "target_instrument" in text)


def read_config(path: Path) -> dict:
    """The YAML as MSST reads it (FullLoader: plain data plus python/tuple, no code)."""
    with model_file_errors(path, "an MSST config"), open(path) as f:
        cfg = yaml.load(f, Loader=yaml.FullLoader)
    if not isinstance(cfg, dict) or not isinstance(cfg.get("training"), dict):
        raise PipelineError(f"{path}: not an MSST config (no 'training' section)")
    tr = cfg["training"]
    if not tr.get("instruments"):
        raise PipelineError(f"{path}: training.instruments is missing")
    target = tr.get("target_instrument")
    if target and target not in tr["instruments"]:
        raise PipelineError(f"{path}: training.target_instrument '{target}' is not in "
                            f"training.instruments {list(tr['instruments'])}")
    if not isinstance(cfg.get("inference"), dict) or "num_overlap" not in cfg["inference"]:
        raise PipelineError(f"{path}: inference.num_overlap is missing")
    return cfg


def _detect_model_type(cfg: dict, config_path: Path, meta_type: str | None,
                       asked: str | None) -> str:
    if asked:
        return asked
    if cfg["training"].get("model_type"):
        return str(cfg["training"]["model_type"])
    if meta_type:
        return str(meta_type)
    if "htdemucs" in cfg:
        return "htdemucs"
    if isinstance(cfg.get("kwargs"), dict) and "in_channels" in cfg["kwargs"]:
        return "bandit_v2"
    model = cfg.get("model") or {}
    for name, fields in _SIGNATURES:
        if all(f in model for f in fields):
            return name
    raise PipelineError(f"{config_path}: cannot tell the MSST model_type from the config; add "
                        f"training.model_type or give it as CONFIG:CKPT?model_type=TYPE")


def missing_checkpoint_error(ckpt: Path, config: Path | None) -> PipelineError:
    where = ckpt.parent.resolve()
    return PipelineError(
        f"{ckpt.name}: MSST checkpoint not found (looked for {ckpt.resolve()}"
        + (f", next to its config {config.name}" if config is not None else "")
        + f"); download it from the model's page on a machine with internet and put it in {where}")


def load_state(ckpt: Path) -> tuple[dict, dict]:
    """(state dict, meta) of an MSST checkpoint, bare or wrapped, read weights-only."""
    obj = load_checkpoint_file(ckpt, "an MSST checkpoint (a state dict)")
    if not isinstance(obj, dict):
        raise PipelineError(f"{ckpt}: holds a {type(obj).__name__}, not a state dict")
    meta = obj.get("meta") if isinstance(obj.get("meta"), dict) else {}
    for key in STATE_KEYS:
        if isinstance(obj.get(key), dict):
            obj = obj[key]
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise PipelineError(f"{ckpt}: no tensors found (expected a state dict, bare or under "
                            f"{', '.join(STATE_KEYS)})")
    return tensors, meta


def build_network(model_type: str, cfg: dict, config_path: Path):
    """MSST's own class for `model_type`, built from the config as MSST builds it."""
    try:
        with warnings.catch_warnings():   # rotary-embedding-torch's deprecated autocast decorators
            warnings.filterwarnings("ignore", category=FutureWarning, module="rotary_embedding_torch")
            import rotary_embedding_torch  # noqa: F401
            from msst.utils.settings import build_model_from_config
    except ImportError as e:
        raise PipelineError(f"{config_path}: MSST models need the msst package "
                            f"(pip install 'msst[bs-roformer]'; {e})") from None
    if model_type == "htdemucs":
        from omegaconf import OmegaConf
        config = OmegaConf.create(cfg)
    else:
        from ml_collections import ConfigDict
        config = ConfigDict(cfg)
    try:
        return build_model_from_config(model_type, config), config
    except ImportError as e:
        raise PipelineError(f"{config_path}: model_type {model_type} needs a package that is "
                            f"not installed ({e}); pip install 'msst[{model_type.replace('_', '-')}]'") from None
    except Exception as e:
        raise PipelineError(f"{config_path}: MSST cannot build model_type {model_type} from this "
                            f"config ({type(e).__name__}: {str(e)[:200]})") from None


# --------------------------------------------------------------------------------------------
# What an MSST model is
# --------------------------------------------------------------------------------------------
class MSSTSeparator(Separator):
    family = FAMILY

    def __init__(self, network, cfg: dict, model_type: str, name: str, checksum: str):
        from core.sources import canonical_sources

        self.network = network.eval()
        for p in self.network.parameters():
            p.requires_grad_(False)
        self.cfg, self.model_type, self.name = cfg, model_type, name
        tr, inf, audio = cfg["training"], cfg["inference"], cfg.get("audio") or {}
        self.instruments = list(tr["instruments"])
        self.target = tr.get("target_instrument") or None
        # a target is named by its place in the whole list: an instrumental RoFormer's lone
        # `other` (instruments [other, vocals]) is the instrumental, not MUSDB's other; our own
        # RoFormers record the dataset's sources they were trained among (a [vocals, other]
        # subset of MUSDB is MUSDB's other)
        self.sources = canonical_sources([self.target] if self.target else self.instruments,
                                         within=tr.get("dataset_sources") or self.instruments)
        self.sample_rate = int(audio.get("sample_rate", 44100))
        self.demucs_mode = model_type == "htdemucs"
        if self.demucs_mode:
            self.chunk = int(round(float(tr["samplerate"]) * float(tr["segment"])))
        else:
            self.chunk = int(inf.get("chunk_size") or audio["chunk_size"])
        self.num_overlap = int(inf["num_overlap"])
        self.batch_size = int(inf.get("batch_size", 1))
        self.normalize = bool(inf.get("normalize", False))
        self.use_amp = bool(tr.get("use_amp", True))
        self.mono = audio.get("num_channels") == 1
        if not 1 <= self.num_overlap <= self.chunk:
            raise PipelineError(f"{name}: inference.num_overlap={self.num_overlap} must be in "
                                f"[1, chunk_size={self.chunk}]")
        self.target_index = self.instruments.index(self.target) if self.target else None
        try:
            params = inspect.signature(self.network.forward).parameters
        except (TypeError, ValueError):
            params = {}
        heads = getattr(self.network, "mask_estimators", None)
        self.active_stem_ids = ([self.target_index] if self.target and "active_stem_ids" in params
                                and heads is not None and len(heads) == len(self.instruments)
                                else None)
        self._checksum = checksum

    def options(self) -> dict:
        return {"model_type": self.model_type, "chunk_size": self.chunk,
                "num_overlap": self.num_overlap, "batch_size": self.batch_size,
                "normalize": self.normalize, "use_amp": self.use_amp}

    def to(self, device) -> "MSSTSeparator":
        super().to(device)
        self.network.to(self.device)
        return self

    def _forward(self, chunks: torch.Tensor) -> torch.Tensor:
        """[B, 2, chunk] -> [B, S, 2, chunk], as MSST's demix reads the model's output."""
        if self.active_stem_ids is None:
            y = self.network(chunks)
        else:
            y = self.network(chunks, active_stem_ids=self.active_stem_ids)
        if self.target_index is not None and y.ndim >= 4 and y.shape[1] == len(self.instruments):
            y = y[:, self.target_index:self.target_index + 1]
        if y.ndim == 3:
            y = y[:, None]
        return y.float()

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        from core.chunking import overlap_add

        mix = mixture.to(self.device, torch.float32)
        if self.mono:   # MSST averages to mono, then its demix feeds the channel twice
            mix = mix.mean(0, keepdim=True).repeat(2, 1)
        if self.normalize:   # MSST's normalize_audio: the mono mix's mean and std
            mono = mix.mean(0)
            mean, std = mono.mean(), mono.std(unbiased=False)
            if not torch.isfinite(std) or std <= torch.finfo(torch.float32).eps:
                std = torch.ones((), device=mix.device)
            mix = (mix - mean) / std
        amp = self.use_amp and self.device.type == "cuda"
        with torch.autocast(self.device.type, enabled=amp):
            y = overlap_add(self._forward, mix, self.chunk, hop=self.chunk // self.num_overlap,
                            batch=self.batch_size,
                            window="msst-demucs" if self.demucs_mode else "msst")
        if self.normalize:
            y = y * std + mean
        if self.mono:
            y = y[:, :1].repeat(1, 2, 1)
        return y


def load_msst(config_path: Path, ckpt_path: Path, *, device="cpu", model_type: str | None = None,
              label: str | None = None) -> MSSTSeparator:
    """An MSST model from its YAML config and checkpoint."""
    config_path, ckpt_path = Path(config_path), Path(ckpt_path)
    if not config_path.is_file():
        raise PipelineError(f"{config_path}: MSST config not found")
    if not ckpt_path.is_file():
        raise missing_checkpoint_error(ckpt_path, config_path)
    cfg = read_config(config_path)
    state, meta = load_state(ckpt_path)
    mtype = _detect_model_type(cfg, config_path, meta.get("model_type"), model_type)
    network, _ = build_network(mtype, cfg, config_path)
    own = network.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    resized = [k for k in own if k in state and own[k].shape != state[k].shape]
    if missing or unexpected or resized:
        what = []
        if missing:
            what.append(f"lacks {len(missing)} key(s) of {mtype} ({', '.join(missing[:3])})")
        if unexpected:
            what.append(f"has {len(unexpected)} key(s) {mtype} does not ({', '.join(unexpected[:3])})")
        if resized:
            k = resized[0]
            what.append(f"{len(resized)} tensor(s) of another shape ({k}: "
                        f"{tuple(state[k].shape)} vs {tuple(own[k].shape)})")
        raise PipelineError(f"{ckpt_path}: does not fit {config_path.name}: {'; '.join(what)}")
    network.load_state_dict(state)
    checksum = combined_checksum({"config": cached_checksum(config_path),
                                  "checkpoint": cached_checksum(ckpt_path)})
    name = label or ckpt_path.stem
    return MSSTSeparator(network, cfg, mtype, name, checksum).to(device)


# --------------------------------------------------------------------------------------------
# Training recipe: a RoFormer of our own (separators.train_base; interface in separators.families.common)
# --------------------------------------------------------------------------------------------
TRAIN_NAME = "roformer"
ARCHS = ("bs_roformer", "mel_band_roformer")


def _bands(spec: list[tuple[int, int]]) -> tuple[int, ...]:
    return tuple(w for w, count in spec for _ in range(count))


# The band layout of the small preset: 21 bands over the 1025 bins of a 2048-point STFT (8-bin
# bands at the bottom, 128-bin ones at the top): the transformers' cost is frames x bands.
SMALL_BANDS = _bands([(8, 4), (16, 4), (32, 4), (64, 4), (128, 4), (33, 1)])

_ROFORMER = dict(arch="bs_roformer", dim=64, depth=2, time_transformer_depth=1,
                 freq_transformer_depth=1, linear_transformer_depth=0, dim_head=16, heads=4,
                 attn_dropout=0.0, ff_dropout=0.0, flash_attn=False, stft_n_fft=2048,
                 stft_hop_length=1024, stft_win_length=2048, stft_normalized=False,
                 mask_estimator_depth=1, mlp_expansion_factor=1,
                 multi_stft_resolution_loss_weight=1.0,
                 multi_stft_resolutions_window_sizes=(4096, 2048, 1024, 512, 256),
                 multi_stft_hop_size=147, multi_stft_normalized=False,
                 freqs_per_bands=SMALL_BANDS, num_bands=24)

# tiny: tests (8-16 kHz, 1 s). small: 2 CPU cores, ~30 min on MUSDB18-7 (see README: BS-RoFormer
# dim 64, 2 x (time + frequency) layers, 21 bands, hop 1024). paper: BS-RoFormer as in MSST's
# config_musdb18_bs_roformer.yaml (dim 384, depth 6 ... for GPUs).
PRESETS = {
    "tiny": dict(model=dict(_ROFORMER, dim=16, depth=1, heads=2, dim_head=8, stft_n_fft=256,
                            stft_win_length=256, stft_hop_length=128,
                            freqs_per_bands=_bands([(8, 8), (65, 1)]), num_bands=8,
                            multi_stft_resolutions_window_sizes=(256, 128)),
                 train=dict(segment=1.0, batch_size=4, epochs=2, samples_per_epoch=8,
                            valid_max_items=4, lr_schedule="constant", weight_decay=0.0)),
    # MSST's multi-resolution loss at its defaults (5 resolutions, hop 147) costs 15x the
    # network's own step on a CPU (46 s vs 3 s, batch 4 x 3 s); one resolution at the model's hop
    # keeps the loss's spectral term at about +40 %.
    "small": dict(model=dict(_ROFORMER, multi_stft_resolutions_window_sizes=(2048,),
                             multi_stft_hop_size=1024),
                  train=dict(segment=3.0, batch_size=4, epochs=12, samples_per_epoch=128,
                             lr=1e-3, weight_decay=0.0, grad_clip=5.0, valid_segment=6.0,
                             valid_max_items=16)),
    "paper": dict(model=dict(_ROFORMER, dim=384, depth=6, dim_head=64, heads=8,
                             attn_dropout=0.1, ff_dropout=0.1, flash_attn=True,
                             stft_hop_length=441, mask_estimator_depth=2, mlp_expansion_factor=4,
                             freqs_per_bands=_bands([(2, 24), (4, 12), (12, 8), (24, 8), (48, 8),
                                                     (128, 1), (129, 1)])),
                  train=dict(segment=8.0, batch_size=8, epochs=1000, samples_per_epoch=1000 * 8,
                             lr=5e-5, weight_decay=0.0, lr_schedule="constant")),
}
MODEL_DEFAULTS = dict(_ROFORMER)
_BS_ONLY, _MEL_ONLY = ("freqs_per_bands",), ("num_bands",)


def resolve_model(preset: str, model_options: dict | None) -> dict:
    model = merge_options(TRAIN_NAME, "model", {**MODEL_DEFAULTS, **PRESETS[preset]["model"]},
                          model_options)
    if model["arch"] not in ARCHS:
        raise PipelineError(f"roformer arch '{model['arch']}': choose {' or '.join(ARCHS)}")
    for k in ("freqs_per_bands", "multi_stft_resolutions_window_sizes"):
        model[k] = tuple(int(v) for v in model[k])
    if sum(model["freqs_per_bands"]) != model["stft_n_fft"] // 2 + 1:
        raise PipelineError(f"roformer: freqs_per_bands sum to {sum(model['freqs_per_bands'])}, "
                            f"the STFT has {model['stft_n_fft'] // 2 + 1} bins")
    return model


def check_training(targets, amp: str) -> None:
    pass


def prepare(run_dir, store, dataset_id, config, rank, split="train"):
    return None


def msst_config(config: dict) -> dict:
    """The MSST YAML for a train-base configuration (what export writes as config.yaml)."""
    m, t, sr = dict(config["model"]), config["train"], config["sample_rate"]
    arch = m.pop("arch")
    m.pop("num_bands" if arch == "bs_roformer" else "freqs_per_bands")
    m.update(stereo=True, num_stems=len(config["targets"]), dim_freqs_in=m["stft_n_fft"] // 2 + 1)
    if arch == "mel_band_roformer":
        m.update(sample_rate=sr, match_input_audio_length=True)
    hop = m["stft_hop_length"]
    # MSST chunks of ~8 s (a whole number of hops), half overlapping, as its configs do
    chunk = hop * max(1, int(round(8.0 * sr / hop)))
    return {
        "audio": {"chunk_size": chunk, "num_channels": 2, "sample_rate": sr,
                  "n_fft": m["stft_n_fft"], "hop_length": hop, "min_mean_abs": 0.0},
        "model": m,
        "training": {"model_type": arch, "instruments": list(config["targets"]),
                     "target_instrument": None, "batch_size": t["batch_size"],
                     "lr": t["lr"], "num_epochs": t["epochs"], "optimizer": "adam",
                     "use_amp": True, "segment_seconds": t["segment"]},
        "inference": {"batch_size": 1, "num_overlap": 2},
    }


class RoformerLoss:
    """MSST's BS-/Mel-RoFormer training loss (its forward with a target): L1 on the waveforms +
    weight x the sum over resolutions of the L1 between complex STFTs."""

    def __init__(self, m: dict):
        self.weight = float(m["multi_stft_resolution_loss_weight"])
        self.sizes = tuple(m["multi_stft_resolutions_window_sizes"])
        self.n_fft, self.hop = int(m["stft_n_fft"]), int(m["multi_stft_hop_size"])
        self.normalized = bool(m["multi_stft_normalized"])

    def __call__(self, est: torch.Tensor, refs: torch.Tensor) -> torch.Tensor:
        import torch.nn.functional as F

        refs = refs[:, :est.shape[1], ..., :est.shape[-1]]
        loss = F.l1_loss(est, refs)
        a, b = est.reshape(-1, est.shape[-1]), refs.reshape(-1, refs.shape[-1])
        multi = 0.0
        for size in self.sizes:
            kw = dict(n_fft=max(size, self.n_fft), win_length=size, return_complex=True,
                      window=torch.hann_window(size, device=est.device), hop_length=self.hop,
                      normalized=self.normalized)
            multi = multi + F.l1_loss(torch.stft(a, **kw), torch.stft(b, **kw))
        return loss + self.weight * multi


class RoformerTrainNet(torch.nn.Module):
    """mixture [B, 2, n] -> estimates [B, S, 2, n'] (n' = n for BS-RoFormer)."""

    def __init__(self, network):
        super().__init__()
        self.network = network

    def forward(self, mix: torch.Tensor) -> torch.Tensor:
        y = self.network(mix)
        return y[:, None] if y.ndim == 3 else y


def build(config: dict, prepared):
    cfg = msst_config(config)
    network, _ = build_network(cfg["training"]["model_type"], cfg, Path("config.yaml"))
    return RoformerTrainNet(network), RoformerLoss(cfg["model"]), network


def export(network, out: Path, config: dict, summary: dict) -> list[Path]:
    """MSST's pair: config.yaml (tuples as !!python/tuple, like the zoo's configs) and
    model.ckpt, a bare state dict (the zoo's inference format)."""
    cfg = msst_config(config)
    cfg["training"]["best_epoch"] = summary["best_epoch"]
    # the names' context (MSST ignores the key): targets are a subset of these sources
    cfg["training"]["dataset_sources"] = list(summary["sources"])
    (out / "config.yaml").write_text(yaml.dump(cfg, sort_keys=False))
    torch.save(cpu_state(network), out / "model.ckpt")
    return [out / "config.yaml", out / "model.ckpt"]


def describe(config: dict) -> tuple[str, str]:
    m = config["model"]
    arch = {"bs_roformer": "BS-RoFormer", "mel_band_roformer": "Mel-RoFormer"}[m["arch"]]
    bands = (f"{len(m['freqs_per_bands'])} bands" if m["arch"] == "bs_roformer"
             else f"{m['num_bands']} mel bands")
    return (f"{arch} (band-split transformer over time and frequency; dim {m['dim']}, depth "
            f"{m['depth']}, {bands}; MSST's implementation)",
            f"L1 on waveforms + {m['multi_stft_resolution_loss_weight']:g} x multi-resolution "
            f"STFT L1 ({', '.join(map(str, m['multi_stft_resolutions_window_sizes']))})")


# --------------------------------------------------------------------------------------------
# The family, as separators.registry sees it
# --------------------------------------------------------------------------------------------
def _load(r: Request) -> MSSTSeparator:
    if r.path is not None:      # a folder holding one config and one checkpoint
        config, ckpt = folder_files(r.path)
        return load_msst(config, ckpt, device=r.device, label=r.label)
    base, params = parse_query(r.spec)
    unknown = sorted(set(params) - {"model_type", "name"})
    if unknown:
        raise PipelineError(f"{r.spec}: unknown parameter(s) {', '.join(unknown)} "
                            f"(known: model_type, name)")
    config, ckpt = base.rsplit(":", 1)
    return load_msst(Path(config).expanduser(), Path(ckpt).expanduser(), device=r.device,
                     model_type=params.get("model_type"), label=params.get("name"))


RECORD = Family(
    name=FAMILY,
    summary="Music-Source-Separation-Training (bs_roformer, mel_band_roformer, mdx23c, scnet, "
            "htdemucs, apollo, ...): CONFIG.yaml:MODEL.ckpt[?model_type=..&name=..], or a folder "
            "with one config .yaml and one .ckpt",
    load=_load, owns=is_msst_spec, folder=lambda folder: folder_files(folder) is not None,
    recipe=Recipe(TRAIN_NAME, ("bs_roformer", "bs-roformer", "mel_band_roformer",
                               "mel-band-roformer"), PRESETS, resolve_model, check_training,
                  prepare, build, export, describe))
