"""UVR's MDX-Net models: one `.onnx` file plus its parameters, run with onnxruntime.

A UVR MDX-Net model (UVR-MDX-NET-Inst_HQ_3.onnx, Kim_Vocal_2.onnx, ...) maps a spectrogram chunk
[1, 4 (L/R x re/im), dim_f, dim_t] of an n_fft-point STFT (hop 1024) to the primary stem's; its
parameters are not in the file. UVR and audio-separator look them up by the file's hash (MD5 of
its last 10,000 KiB, or of the whole file when smaller) in UVR's model-data JSON:
`{hash: {"compensate": 1.022, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8 (2^8 frames),
"mdx_n_fft_scale_set": 6144, "primary_stem": "Instrumental"}}`. We read, in this order: the
spec's `?dim_f=&dim_t=&n_fft=&compensate=&primary_stem=` (dim_t in frames), then
`model_data.json` / `mdx_model_data.json` next to the model or in a `model_data/` folder beside it
(UVR's models/MDX_Net_Models/model_data/model_data.json; audio-separator's model_file_dir), then
the table audio-separator ships (its model-data.json).

Inference follows audio-separator's MDXSeparator (0.47): chunks of hop x (dim_t - 1) samples
(the model's own dim_t: audio-separator's segment_size, whose default 256 is the usual models'
dim_t; for another it converts the ONNX graph to torch) with trim = n_fft / 2, overlap 0.25,
Hann-weighted (core.chunking's "uvr-mdx" window); STFT
with the first 3 bins zeroed, ONNX, ISTFT; primary = the model's output, secondary = mixture -
compensate x primary. audio-separator additionally scales its input to a peak of 0.9 when louder
and multiplies the primary stem by the input's original peak (its change #203); we do neither
(stems keep the mixture's scale), so our stems equal audio-separator's for inputs that peak at
1.0 with its normalization_threshold at 1.0 (tests/test_uvr.py).
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from core.errors import PipelineError
from separators.base import Separator, parse_query
from separators.families import Family, Request
from separators.weights import (
    cached_checksum,
    combined_checksum,
    model_file_errors,
    why_unloadable,
)

FAMILY = "uvr-mdx"
HASH_BYTES = 10000 * 1024
DATA_FILES = ("model_data.json", "mdx_model_data.json")
# UVR's stem pairs (audio-separator's CommonSeparator.STEM_PAIR_MAPPER); otherwise see secondary_stem
_PAIRS = {"Vocals": "Instrumental", "Instrumental": "Vocals", "lead_only": "backing_only",
          "backing_only": "lead_only", "Primary Stem": "Secondary Stem"}
_PARAMS = ("dim_f", "dim_t", "n_fft", "compensate", "primary_stem", "overlap", "hop_length",
           "name")


def secondary_stem(primary: str) -> str:
    """audio-separator's CommonSeparator.secondary_stem: the pair, else "No X" <-> "X" (UVR's
    "No Crowd" model's secondary stem is "Crowd", not "No No Crowd")."""
    if primary in _PAIRS:
        return _PAIRS[primary]
    return primary.replace("No ", "") if "No " in primary else f"No {primary}"


def uvr_hash(path: Path) -> str:
    """UVR's model hash: MD5 of the last 10,000 KiB (the whole file when smaller)."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        f.seek(max(0, size - HASH_BYTES))
        return hashlib.md5(f.read()).hexdigest()


def write_offline_tables(model: Path, data: dict, label: str) -> None:
    """Next to an MDX-Net `.onnx`, the three JSON files audio-separator downloads on its first
    online run (its parameters `data` under UVR's hash, in mdx_model_data.json; the model listed
    as "MDX-Net Model: <label>" in download_checks.json; an empty vr_model_data.json): with them
    its `model_file_dir` runs offline, and ours reads the parameters from the same table."""
    folder = model.parent
    (folder / "mdx_model_data.json").write_text(json.dumps({uvr_hash(model): data}))
    (folder / "vr_model_data.json").write_text("{}")
    lists = {k: {} for k in ("vr_download_list", "mdx_download_vip_list", "demucs_download_list",
                             "mdx23c_download_list", "mdx23c_download_vip_list",
                             "roformer_download_list")}
    lists["mdx_download_list"] = {f"MDX-Net Model: {label}": model.name}
    (folder / "download_checks.json").write_text(json.dumps(lists))


def _data_files(model: Path) -> list[Path]:
    here = [model.parent / n for n in DATA_FILES] + [model.parent / "model_data" / n for n in DATA_FILES]
    try:
        from importlib import resources

        here.append(Path(str(resources.files("audio_separator") / "model-data.json")))
    except (ImportError, ModuleNotFoundError, TypeError):
        pass
    return here


def model_data(model: Path, params: dict) -> dict:
    """The model's parameters: from the spec, else from UVR's model-data JSON by hash."""
    if {"dim_f", "dim_t", "n_fft"} <= set(params):
        return {"mdx_dim_f_set": int(params["dim_f"]), "dim_t": int(params["dim_t"]),
                "mdx_n_fft_scale_set": int(params["n_fft"]),
                "compensate": float(params.get("compensate", 1.0)),
                "primary_stem": params.get("primary_stem", "Vocals")}
    key = uvr_hash(model)
    looked = []
    for path in _data_files(model):
        looked.append(str(path))
        if not path.is_file():
            continue
        with model_file_errors(path, "UVR model-data JSON"):
            table = json.loads(path.read_text())
        table = table.get("mdx_model_data", table) if isinstance(table, dict) else {}
        if key in table:
            return dict(table[key])
    raise PipelineError(
        f"{model}: no MDX-Net parameters for its hash {key} (looked in {', '.join(looked)}); "
        f"put UVR's model_data.json next to the model, or give them: "
        f"{model}?dim_f=3072&dim_t=256&n_fft=6144&compensate=1.035&primary_stem=Vocals")


class MDXNetSeparator(Separator):
    family = FAMILY

    def __init__(self, session, data: dict, name: str, checksum: str, *, overlap: float,
                 hop_length: int):
        from core.sources import canonical_sources

        self.session, self.name, self._checksum = session, name, checksum
        self.dim_f = int(data["mdx_dim_f_set"])
        self.dim_t = int(data["dim_t"]) if "dim_t" in data else 2 ** int(data["mdx_dim_t_set"])
        self.n_fft = int(data["mdx_n_fft_scale_set"])
        self.compensate = float(data["compensate"])
        primary = str(data["primary_stem"])
        self.stems = (primary, secondary_stem(primary))
        self.sources = canonical_sources(self.stems)
        self.sample_rate = 44100
        self.overlap, self.hop = float(overlap), int(hop_length)
        if not 0 <= self.overlap < 1:
            raise PipelineError(f"{name}: overlap must be in [0, 1), got {overlap}")
        self.chunk = self.hop * (self.dim_t - 1)
        self.trim = self.n_fft // 2
        self.window = torch.hann_window(self.n_fft, periodic=True)

    def options(self) -> dict:
        return {"dim_f": self.dim_f, "dim_t": self.dim_t, "n_fft": self.n_fft,
                "compensate": self.compensate, "stems": list(self.stems),
                "overlap": self.overlap, "hop_length": self.hop}

    def _stft(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2, L] -> [B, 4, dim_f, T] (L re, L im, R re, R im), audio-separator's STFT."""
        z = torch.stft(x.reshape(-1, x.shape[-1]), n_fft=self.n_fft, hop_length=self.hop,
                       window=self.window, center=True, return_complex=True)
        z = torch.view_as_real(z).permute(0, 3, 1, 2)               # [B*2, 2, F, T]
        return z.reshape(x.shape[0], 4, z.shape[-2], z.shape[-1])[:, :, :self.dim_f]

    def _istft(self, spec: torch.Tensor) -> torch.Tensor:
        b, _, f, t = spec.shape
        spec = torch.cat([spec, spec.new_zeros(b, 4, self.n_fft // 2 + 1 - f, t)], 2)
        spec = spec.reshape(b * 2, 2, -1, t).permute(0, 2, 3, 1)
        z = torch.complex(spec[..., 0].contiguous(), spec[..., 1].contiguous())
        return torch.istft(z, n_fft=self.n_fft, hop_length=self.hop, window=self.window,
                           center=True).reshape(b, 2, -1)

    def _chunk(self, chunks: torch.Tensor) -> torch.Tensor:
        """[B, 2, chunk] -> [B, 1, 2, chunk]: the primary stem of each chunk."""
        spec = self._stft(chunks.cpu().float())
        spec[:, :, :3] = 0
        out = [self.session.run(None, {"input": s[None].numpy()})[0][0] for s in spec]
        return self._istft(torch.from_numpy(np.stack(out)))[:, None].to(chunks.device)

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        from core.chunking import overlap_add

        mix = mixture.float()
        step = int((1 - self.overlap) * self.chunk)
        primary = overlap_add(self._chunk, mix.cpu(), self.chunk, hop=step, window="uvr-mdx",
                              trim=self.trim)[0].to(mix.device)
        return torch.stack([primary, mix - self.compensate * primary])


def load_mdx_onnx(path: Path, params: dict, *, device="cpu") -> MDXNetSeparator:
    unknown = sorted(set(params) - set(_PARAMS))
    if unknown:
        raise PipelineError(f"{path}: unknown parameter(s) {', '.join(unknown)} "
                            f"(known: {', '.join(_PARAMS)})")
    if not path.is_file():
        raise PipelineError(
            f"{path.name}: MDX-Net model not found (looked for {path.resolve()}); download it on "
            f"a machine with internet (UVR's model list) and put it in {path.parent.resolve()}")
    data = model_data(path, params)
    try:
        import onnxruntime as ort
    except ImportError:
        raise PipelineError(f"{path}: MDX-Net models need onnxruntime (pip install onnxruntime)") from None
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = torch.get_num_threads()
    try:
        with model_file_errors(path, "an ONNX model"):
            session = ort.InferenceSession(str(path), sess_options=options,
                                           providers=["CPUExecutionProvider"])
    except Exception as e:   # onnxruntime's own exception types
        raise PipelineError(f"{path}: not an ONNX model ({why_unloadable(e)})") from None
    checksum = combined_checksum({"model": cached_checksum(path), "data": data})
    sep = MDXNetSeparator(session, data, params.get("name") or path.stem, checksum,
                          overlap=float(params.get("overlap", 0.25)),
                          hop_length=int(params.get("hop_length", 1024)))
    return sep.to(device)


def _load(r: Request) -> MDXNetSeparator:
    path, params = parse_query(r.spec)
    return load_mdx_onnx(Path(path).expanduser(), params, device=r.device)


RECORD = Family(
    name=FAMILY,
    summary="UVR MDX-Net: a .onnx file (optionally ?dim_f=..&dim_t=..&n_fft=..&compensate=..&"
            "primary_stem=..&overlap=..; else UVR's / audio-separator's model data)",
    load=_load, owns=lambda spec: Path(spec.partition("?")[0]).suffix.lower() == ".onnx")
