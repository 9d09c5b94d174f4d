"""Training losses of the base separators, X-UMX's in particular.

X-UMX (Sawata et al., "All for One and One for All: Improving Music Separation by Bridging
Networks", ICASSP 2021) trains with

    L = L_freq + alpha * L_time,            alpha = 10

* L_freq: MSE between estimated and reference magnitude spectrograms,
* L_time: 1 - wSDR, the weighted SDR (Choi et al., "Phase-aware speech enhancement with deep
  complex U-Net", 2019) between the time-domain estimates (masked magnitude + mixture phase,
  through a differentiable ISTFT) and the references:

      wSDR(x, y, y_hat) = rho * SDR'(y, y_hat) + (1 - rho) * SDR'(x - y, x - y_hat)
      SDR'(a, b)        = <a, b> / (||a|| ||b||)                in [-1, 1]
      rho               = ||y||^2 / (||y||^2 + ||x - y||^2)

  computed per (example, channel) signal; x is the mixture,

and the *combination scheme*: both terms are averaged not only over the J targets but over every
sum of 1 to J-1 targets (4 + 6 + 4 = 14 terms for J = 4): the sum of the estimates of a subset is
compared with the sum of its references. As in asteroid's X-UMX recipe (egs/musdb18/X-UMX), the
frequency-domain term of a subset compares *sums of magnitudes*, and every term has equal weight.

The Danna-Sep variant (Chen et al., MDX 2021) replaces the magnitude MSE by an MSE on complex
spectrograms, taken after a differentiable multichannel Wiener filter (`multichannel_wiener`):
mean |S_hat - S|^2 over time-frequency bins, again over all 14 subsets.

Array conventions: time signals [B, J, C, N]; spectrograms [B, J, C, F, T] (complex or magnitude).
"""
from __future__ import annotations

import itertools

import torch

EPS = 1e-10


def combinations(n: int, combine: bool = True) -> list[tuple[int, ...]]:
    """Index subsets the combination scheme averages over: sizes 1 .. n-1 (all n singletons
    first); only the singletons when `combine` is False. 14 subsets for n = 4."""
    if not combine or n < 3:
        return [(i,) for i in range(n)]
    return [c for k in range(1, n) for c in itertools.combinations(range(n), k)]


def subset_matrix(n: int, combine: bool = True, device=None, dtype=torch.float32) -> torch.Tensor:
    """[K, n] 0/1 matrix whose row k selects the k-th subset of `combinations(n, combine)`."""
    subsets = combinations(n, combine)
    a = torch.zeros(len(subsets), n, dtype=dtype, device=device)
    for k, s in enumerate(subsets):
        a[k, list(s)] = 1.0
    return a


def subset_sums(x: torch.Tensor, combine: bool = True) -> torch.Tensor:
    """[B, J, ...] -> [B, K, ...]: the sum of x over each subset of the J entries."""
    a = subset_matrix(x.shape[1], combine, x.device, x.real.dtype if x.is_complex() else x.dtype)
    if x.is_complex():
        a = a.to(x.dtype)
    return torch.einsum("kj,bj...->bk...", a, x)


def _wsdr(est_e, ref_e, est_ref, noise_e, noise_hat_e, noise_cross, eps: float = EPS):
    """Weighted SDR from the energies and inner products of its signals."""
    rho = ref_e / (ref_e + noise_e + eps)
    sdr_target = est_ref / (torch.sqrt(eps + est_e) * torch.sqrt(eps + ref_e) + eps)
    sdr_noise = noise_cross / (torch.sqrt(eps + noise_hat_e) * torch.sqrt(eps + noise_e) + eps)
    return rho * sdr_target + (1.0 - rho) * sdr_noise


def weighted_sdr(est: torch.Tensor, ref: torch.Tensor, mix: torch.Tensor,
                 eps: float = EPS) -> torch.Tensor:
    """Weighted SDR of each signal along the last axis, in [-1, 1] (1 = perfect).

    est, ref, mix: [..., N] (the same shape). Returns [...].
    """
    noise, noise_hat = mix - ref, mix - est
    return _wsdr((est * est).sum(-1), (ref * ref).sum(-1), (est * ref).sum(-1),
                 (noise * noise).sum(-1), (noise_hat * noise_hat).sum(-1),
                 (noise_hat * noise).sum(-1), eps)


def freq_domain_loss(spec_hat: torch.Tensor, spec_ref: torch.Tensor, combine: bool = True) -> torch.Tensor:
    """Mean over subsets of the MSE between summed estimates and summed references.

    spec_*: [B, J, ...], real (magnitudes) or complex; for complex tensors the squared error of a
    bin is |difference|^2 (real^2 + imag^2), averaged over bins.

    Computed without forming the 14 summed spectrograms: with d_j = est_j - ref_j, the squared
    error of a subset S is sum_{j,k in S} <d_j, d_k>, so one J x J Gram matrix of the differences
    gives every subset's error (a fraction of the memory and time of the direct sums).
    """
    d = spec_hat - spec_ref
    if d.is_complex():
        d = torch.view_as_real(d)
    # float64: a subset's error can be a small difference of large Gram entries (and CUDA
    # matmuls may otherwise run in TF32)
    d = d.transpose(0, 1).reshape(d.shape[1], -1).double()        # [J, B * elements]
    gram = d @ d.T                                                 # [J, J]
    a = subset_matrix(gram.shape[0], combine, gram.device, gram.dtype)
    sse = torch.einsum("kj,jl,kl->k", a, gram, a)                  # per-subset squared error
    per_bin = spec_hat[:, 0].numel()                               # complex bins count once
    return (sse.mean() / per_bin).to(spec_hat.real.dtype)


def time_domain_loss(mix: torch.Tensor, time_hat: torch.Tensor, time_ref: torch.Tensor,
                     combine: bool = True) -> torch.Tensor:
    """1 - mean weighted SDR over subsets, examples and channels; in [0, 2].

    mix [B, C, N]; time_hat, time_ref [B, J, C, N].

    Every energy and inner product wSDR needs for a subset's summed signals is a sum of entries
    of the (2J + 1) x (2J + 1) Gram matrix of [estimates, references, mixture] per example and
    channel, so that matrix (in float64) replaces the 14 summed signals.
    """
    n = min(time_hat.shape[-1], time_ref.shape[-1], mix.shape[-1])
    j = time_hat.shape[1]
    v = torch.cat([time_hat[..., :n], time_ref[..., :n], mix[:, None, :, :n]], 1)  # [B, 2J+1, C, N]
    v = v.transpose(1, 2).double()                                                 # [B, C, 2J+1, N]
    g = v @ v.transpose(-1, -2)                                                    # [B, C, 2J+1, 2J+1]
    a = subset_matrix(j, combine, g.device, g.dtype)                               # [K, J]
    g_ee, g_rr, g_er = g[..., :j, :j], g[..., j:2 * j, j:2 * j], g[..., :j, j:2 * j]
    g_em, g_rm, mm = g[..., :j, -1], g[..., j:2 * j, -1], g[..., -1, -1]

    def quad(m):   # a_k^T m a_k for every subset k: [B, C, K]
        return torch.einsum("kj,bcjl,kl->bck", a, m, a)

    ee, rr, er = quad(g_ee), quad(g_rr), quad(g_er)
    em, rm = g_em @ a.T, g_rm @ a.T                                                # [B, C, K]
    mm = mm[..., None]
    # energies are >= 0; the expansions can round to tiny negatives when a signal is silent
    nn, hh = (mm - 2 * rm + rr).clamp_min(0), (mm - 2 * em + ee).clamp_min(0)
    wsdr = _wsdr(ee.clamp_min(0), rr.clamp_min(0), er, nn, hh, mm - rm - em + er)
    return (1.0 - wsdr.mean()).to(time_hat.dtype)


def multi_domain_loss(spec_hat: torch.Tensor, spec_ref: torch.Tensor, time_hat: torch.Tensor,
                      time_ref: torch.Tensor, mix: torch.Tensor, alpha: float = 10.0,
                      combine: bool = True) -> torch.Tensor:
    """X-UMX's combinational multi-domain loss: L_freq + alpha * (1 - wSDR)."""
    return (freq_domain_loss(spec_hat, spec_ref, combine)
            + alpha * time_domain_loss(mix, time_hat, time_ref, combine))


# ---- STFT helpers (float32, outside autocast) ---------------------------------------------------
def stft(x: torch.Tensor, n_fft: int, hop: int, center: bool = True) -> torch.Tensor:
    """Complex STFT with a periodic Hann window of every signal: [..., N] -> [..., F, T]."""
    shape = x.shape
    with torch.autocast(x.device.type, enabled=False):
        window = torch.hann_window(n_fft, device=x.device, dtype=torch.float32)
        z = torch.stft(x.reshape(-1, shape[-1]).float(), n_fft=n_fft, hop_length=hop,
                       window=window, center=center, pad_mode="reflect", normalized=False,
                       onesided=True, return_complex=True)
    return z.reshape(*shape[:-1], *z.shape[-2:])


def istft(z: torch.Tensor, n_fft: int, hop: int, length: int, center: bool = True) -> torch.Tensor:
    """Inverse of `stft`: [..., F, T] complex -> [..., length]."""
    shape = z.shape
    with torch.autocast(z.device.type, enabled=False):
        window = torch.hann_window(n_fft, device=z.device, dtype=torch.float32)
        x = torch.istft(z.reshape(-1, *shape[-2:]), n_fft=n_fft, hop_length=hop, window=window,
                        center=center, normalized=False, onesided=True, length=length)
    return x.reshape(*shape[:-2], length)


def multichannel_wiener(mag: torch.Tensor, mix_stft: torch.Tensor, iterations: int = 1,
                        eps: float = 1e-10) -> torch.Tensor:
    """Differentiable multichannel Wiener filter (Nugraha et al. 2016; norbert / Open-Unmix's
    `wiener` with softmask=False), batched.

    mag: source magnitude estimates [B, J, C, F, T]; mix_stft: complex [B, C, F, T].
    Starts from the magnitudes with the mixture's phase and refines them with `iterations` EM
    steps (spatial covariance per source and frequency, power spectral density per bin).
    Returns complex [B, J, C, F, T].
    """
    with torch.autocast(mag.device.type, enabled=False):
        mag = mag.float()
        # scale to ~unit range like open-unmix does, for the conditioning of the inverses
        scale = mix_stft.abs().flatten(1).amax(1).clamp_min(1e-8).reshape(-1, 1, 1, 1) / 10.0
        x = mix_stft / scale
        y = torch.polar(mag / scale[:, None], torch.angle(x)[:, None].expand_as(mag))
        n_channels = x.shape[1]
        eye = torch.eye(n_channels, dtype=x.dtype, device=x.device)
        xv = x.permute(0, 2, 3, 1)                                           # [B, F, T, C]
        for _ in range(iterations):
            yv = y.permute(0, 1, 3, 4, 2)                                    # [B, J, F, T, C]
            v = (yv.real ** 2 + yv.imag ** 2).mean(-1)                       # [B, J, F, T]
            # spatial covariance per source and frequency: sum_t y y^H / sum_t v
            r = torch.einsum("bjftc,bjftd->bjfcd", yv, yv.conj())
            r = r / (v.sum(-1)[..., None, None] + eps)                       # [B, J, F, C, C]
            cxx = torch.einsum("bjft,bjfcd->bftcd", v.to(r.dtype), r) + eps * eye
            inv = torch.linalg.inv(cxx)                                      # [B, F, T, C, C]
            gain = torch.einsum("bjft,bjfcd,bftde->bjftce", v.to(r.dtype), r, inv)
            yv = torch.einsum("bjftce,bfte->bjftc", gain, xv)
            y = yv.permute(0, 1, 4, 2, 3)
        return y * scale[:, None]
