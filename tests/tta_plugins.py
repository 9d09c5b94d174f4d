"""Plugin separators with known behaviour under test-time augmentation (tests/test_tta.py)."""
import time

import torch

SOURCES = ("drums", "bass", "other", "vocals")


class Share(torch.nn.Module):
    """Every source is the same share of the mixture: linear, channel-symmetric, pointwise -
    it commutes with every TTA pass."""

    sources, sample_rate = SOURCES, 8000

    def __init__(self, share: float = 0.25):
        super().__init__()
        self.share = share

    def forward(self, mix):
        return self.share * mix[:, None].repeat(1, len(SOURCES), 1, 1)


class Lopsided(torch.nn.Module):
    """Nonlinear, left and right treated differently, and the position in its input matters
    (a ramp), so no TTA pass gives its plain output back."""

    sources, sample_rate = SOURCES, 8000

    def __init__(self, delay: float = 0.0):
        super().__init__()
        self.delay = delay

    def forward(self, mix):
        time.sleep(self.delay)
        left, right = mix[:, 0], mix[:, 1]
        ramp = torch.linspace(0.5, 1.5, mix.shape[-1])
        out = [torch.stack([torch.tanh(2 * left) * ramp, right ** 2]),
               torch.stack([left * right, -left]),
               torch.stack([right * ramp, 0.5 * left + right ** 3]),
               torch.stack([torch.relu(left), torch.sin(right) * ramp])]
        return torch.stack(out).permute(2, 0, 1, 3)   # [B, S, 2, n]


def share(share: float = 0.25) -> Share:
    return Share(share)


def lopsided(delay: float = 0.0) -> Lopsided:
    return Lopsided(delay)
