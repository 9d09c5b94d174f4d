"""A separator as Python code (README, "Any separator as a plugin"): centre-channel extraction,
the classic karaoke trick. Vocals are usually panned to the centre, so the time-frequency bins
where left and right agree are masked as vocals; everything else is the instrumental.

    pipeline cache -d DATASET -m "py:plugin_example:center_separator?sharpness=4"
"""
import torch


class CenterSeparator(torch.nn.Module):
    sources = ("vocals", "instrumental")   # mapped onto the dataset's: instrumental = the rest
    sample_rate = 44100
    segment = 10.0                          # seconds; longer inputs are overlap-added

    def __init__(self, n_fft: int = 2048, sharpness: float = 4.0):
        super().__init__()
        self.n_fft, self.sharpness = n_fft, sharpness
        self.register_buffer("window", torch.hann_window(n_fft))

    def forward(self, mix: torch.Tensor) -> torch.Tensor:   # [B, 2, n] -> [B, 2 stems, 2, n]
        b, c, n = mix.shape
        spec = torch.stft(mix.reshape(b * c, n), self.n_fft, self.n_fft // 4, window=self.window,
                          return_complex=True)                            # [B*2, F, T]
        left, right = spec[0::2], spec[1::2]
        similarity = 2 * (left * right.conj()).real / (left.abs() ** 2 + right.abs() ** 2 + 1e-8)
        mask = similarity.clamp(min=0) ** self.sharpness                  # 1 where L == R
        vocals = torch.istft(spec * mask.repeat_interleave(c, 0), self.n_fft, self.n_fft // 4,
                             window=self.window, length=n).reshape(b, c, n)
        return torch.stack([vocals, mix - vocals], 1)


def center_separator(n_fft: int = 2048, sharpness: float = 4.0) -> CenterSeparator:
    return CenterSeparator(n_fft, sharpness)
