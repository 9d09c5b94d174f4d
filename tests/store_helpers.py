"""A deterministic stand-in separator for testing the cache machinery (not a model)."""
import time

import torch

from separators.base import Separator


class GainSeparator(Separator):
    """Splits the mixture into fixed fractions, optionally slowly: enough to exercise the store."""

    family = "test"

    def __init__(self, name="gains", sources=("drums", "bass", "other", "vocals"), rate=8000,
                 delay=0.0):
        self.name, self.sources, self.sample_rate, self.delay = name, tuple(sources), rate, delay
        self.gains = torch.linspace(0.1, 0.4, len(self.sources))

    def options(self):
        return {"delay": self.delay}

    def weights_checksum(self):
        return "gains-" + ",".join(f"{g:.3f}" for g in self.gains.tolist())

    def separate(self, mixture):
        if self.delay:
            time.sleep(self.delay)
        return self.gains[:, None, None] * mixture[None]
