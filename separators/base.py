"""What a base separator is, for the cache: named stereo stems out of a stereo mixture.

One module per family (separators/families/: demucs, umx, xumx, msst, uvr, plugin) builds a
`Separator`; `separators.registry` maps user-facing names to adapters.
"""
from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from core.errors import PipelineError
from core.options import option

BLOCK_SECONDS = 60.0     # separators.inference separates a long track in blocks of at most this ...
OVERLAP_SECONDS = 2.0    # ... cross-faded over this much (demucs's own overlap is 0.25 x ~8 s)


class Separator(abc.ABC):
    """A loaded base model ready to separate.

    Subclasses set `name`, `family`, `sources` (output stem names, in output order) and
    `sample_rate`, and implement `separate`.
    """

    name: str
    family: str
    sources: tuple[str, ...]
    sample_rate: int

    @abc.abstractmethod
    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        """mixture [2, n] float32 at `sample_rate`, on `self.device` -> stems [S, 2, n]."""

    def identity(self) -> dict:
        """Everything that determines the output (family, name, weight checksums, options).

        Hashed into the stem store's model key, so a change of weights or of any inference
        option gives a new key and stale stems are never reused.
        """
        # Tracks longer than a block are separated blockwise (separators.inference), which changes
        # their stems slightly: the block settings are part of what the stems depend on.
        return {"family": self.family, "name": self.name, "weights": self.weights_checksum(),
                "options": self.options(),
                "blocks": {"seconds": BLOCK_SECONDS, "overlap": OVERLAP_SECONDS}}

    def options(self) -> dict:
        return {}

    _checksum: str = ""

    def weights_checksum(self) -> str:
        """The adapters set `_checksum` from the weight files they loaded."""
        return self._checksum

    def for_track(self, store, dataset_id: str, track) -> "Separator":
        """The separator to run on one track of a dataset in the stem store (a TrackEntry): itself,
        except for models whose output depends on which audio they were trained on (a
        cross-fitted model picks the fold models that never saw the track,
        separators.families.crossfit). The cache stage asks for every track."""
        return self

    device: torch.device = torch.device("cpu")

    def to(self, device) -> "Separator":
        self.device = torch.device(device)
        return self


def resolve_niter(name: str, niter: int | None, n_stems: int) -> int:
    """Wiener EM iterations for a masking model: None -> 1 (Open-Unmix's default) when there are
    two or more stems to share the mixture, else 0; EM needs at least two stems."""
    if niter is None:
        return 1 if n_stems > 1 else 0
    if niter < 0:
        raise PipelineError(f"{name}: niter must be >= 0, got {niter}")
    if niter > 0 and n_stems < 2:
        raise PipelineError(f"{name}: Wiener EM (niter={niter}) needs at least two stems and this "
                            f"model has one; use niter=0 or residual=true")
    return niter


@dataclass(frozen=True)
class MaskingOptions:
    """The inference options of Open-Unmix's post-processing (Open-Unmix and X-UMX models)."""

    niter: int | None = option(None, "Wiener EM iterations (none given: 1, or 0 for a single "
                               "stem)")
    residual: bool = option(False, "add a 'residual' stem (the mixture minus the estimates)")
    wiener_win_len: int = option(300, "frames per Wiener filtering block")
    segment: float = option(30.0, "chunk length in seconds for long inputs")


class MaskingSeparator(Separator):
    """Spectrogram-masking models with Open-Unmix's post-processing (Open-Unmix, X-UMX): the same
    inference options, and long inputs cut into `segment`-second, half-overlapping chunks.

    Subclasses set `network` (the torch module that moves with `to`), `niter`, `residual`,
    `wiener_win_len`, `segment`, and implement `separate_chunk` [B, 2, T] -> [B, S, 2, T].
    """

    network: torch.nn.Module
    niter: int
    residual: bool
    wiener_win_len: int
    segment: float

    def options(self) -> dict:
        return {"niter": self.niter, "residual": self.residual,
                "wiener_win_len": self.wiener_win_len, "segment": self.segment}

    def to(self, device) -> "MaskingSeparator":
        super().to(device)
        self.network.to(self.device)
        return self

    @abc.abstractmethod
    def separate_chunk(self, x: torch.Tensor) -> torch.Tensor:
        """[B, 2, T] -> [B, S, 2, T], without chunking."""

    def separate(self, mixture: torch.Tensor) -> torch.Tensor:
        from core.chunking import overlap_add

        mixture = mixture.to(self.device, torch.float32)
        seg = int(round(self.segment * self.sample_rate))
        if mixture.shape[-1] <= seg:
            return self.separate_chunk(mixture[None])[0]
        return overlap_add(self.separate_chunk, mixture, seg, hop=seg // 2)


def parse_query(spec: str) -> tuple[str, dict[str, str]]:
    """'BASE?key=value&key=value' -> (BASE, {key: value}): the parameters a model spec carries."""
    base, _, query = spec.partition("?")
    params: dict[str, str] = {}
    for part in filter(None, query.split("&")):
        key, eq, value = part.partition("=")
        if not eq or not key:
            raise PipelineError(f"{spec}: '{part}' is not key=value")
        params[key] = value
    return base, params


def model_key(identity: dict) -> str:
    """`<name>-<12 hex>`: readable, and different whenever the identity differs."""
    blob = json.dumps(identity, sort_keys=True, default=str).encode()
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in str(identity.get("name", "model")))
    return f"{name}-{hashlib.sha256(blob).hexdigest()[:12]}"


def file_checksum(path: str | Path, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
