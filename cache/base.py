"""What a base separator is, for the cache: named stereo stems out of a stereo mixture.

One adapter module per family (demucs_adapter, openunmix_adapter, xumx_adapter, ...) builds a
`Separator`; `cache.registry` maps user-facing names to adapters.
"""
from __future__ import annotations

import abc
import hashlib
import json
from pathlib import Path

import torch


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
        from cache.inference import BLOCK_SECONDS, OVERLAP_SECONDS

        # Tracks longer than a block are separated blockwise (cache.inference), which changes
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

    device: torch.device = torch.device("cpu")

    def to(self, device) -> "Separator":
        self.device = torch.device(device)
        return self


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
