"""Benchmark: `pipeline cache` of an MSST model and of a UVR MDX-Net ONNX model against the
upstream inference on the same files and settings, and what test-time augmentation costs.

Models: random weights, saved in the real on-disk formats and loaded by both sides from those
files, so this measures inference cost and equality of the stems, not quality.
  msst: a BS-RoFormer with the input side of the zoo's model_bs_roformer_ep_317_sdr_12.9755
        (its config: 8-s chunks, 2048-point STFT at hop 441, the 62 bands, mask estimators of
        depth 2, num_overlap 2, batch 4, vocals as target) and a smaller transformer (--rof-dim,
        --rof-depth, --rof-heads x --rof-dim-head; the zoo's dim 512 x depth 12 x 8 heads of 64
        costs ~280 s of CPU per 7-s track here). MSST's config.yaml + a bare state-dict .ckpt.
  uvr:  UVR's MDX-Net (ConvTDFNet, the class audio-separator ships in uvr_lib_v5) with the
        input side of UVR-MDX-NET-Inst_HQ_3 (dim_f 3072, dim_t 256, n_fft 6144, hop 1024,
        compensate 1.022, primary stem Instrumental; 11 blocks of 3 TFC layers, TDF bottleneck 8)
        and --mdx-g channels per scale (Inst_HQ_3's size is g = 48: 16.7 M parameters), exported
        to ONNX with UVR's interface, its parameters in mdx_model_data.json under UVR's hash.
Tracks: --tracks MUSDB18-7 previews (../shared/data/musdb18-7 or $MUSDB18_7_ROOT; synthetic
tracks when absent), decoded once and written as float WAVs scaled to a peak of exactly 1.0
(audio-separator multiplies its primary stem by the input's peak: at 1.0 the two sides compute
the same thing), with their stems, as a stem-folder dataset that our store ingests.

Per model, per track and round, each variant once, in an order rotated from track to track and
round to round so that drifting load hits all alike:
  ours:          cache_model of that one track (the mixture read from the store, the model's
                 chunked inference, float16 stems written and checksummed): `pipeline cache`'s
                 work per track, the model loaded once;
  upstream:      msst.Separator.separate_file(wav) (decode + MSST's demix, in memory) /
                 audio_separator.separator.Separator.separate(wav) (decode + MDX demix + its
                 STFT-only second demix for the secondary stem + two float WAVs written);
  ours+tta:      ours with --tta flip,polarity (3 passes);
  upstream+tta:  msst with use_tta=True (the same 3 passes);
  and for uvr:   ours with --tta polarity against audio-separator's enable_denoise (the model on
                 the inverted spectrum too: the same 2 passes).
Goals (exit 1 when missed, benchmarks/goals.py): ours / upstream wall time <= 1.10x per model;
equal stems: our float32 stems (separate_array, the first track) within 1e-4 of upstream's, our
stored float16 stems within half a float16 step (+1e-5) of upstream's, with and without TTA.

    .venv/bin/python benchmarks/bench_upstream.py [--tracks 3] [--rounds 2] [--tta-rounds 1]
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
from goals import check, finish  # noqa: E402

RATE = 44100
SOURCES = ("drums", "bass", "other", "vocals")
# model_bs_roformer_ep_317_sdr_12.9755's bands: 62 over 1025 bins
ROFORMER_BANDS = (2,) * 24 + (4,) * 12 + (12,) * 8 + (24,) * 8 + (48,) * 8 + (128, 129)
INST_HQ_3 = {"compensate": 1.022, "mdx_dim_f_set": 3072, "mdx_dim_t_set": 8,
             "mdx_n_fft_scale_set": 6144, "primary_stem": "Instrumental"}


# ---- set-up ------------------------------------------------------------------------------------
def write_tracks(root: Path, count: int, musdb: Path | None) -> Path:
    """root/train/<track>/{mixture + stems}.wav, float, scaled so the mixture peaks at 1.0."""
    import soundfile as sf

    from core.datasets import open_dataset

    if musdb is not None and musdb.is_dir():
        source = open_dataset(musdb)
        tracks = [t for t in source.tracks if t.split == "train"][:count]
        what = f"MUSDB18-7 ({musdb})"
    else:
        from core.synth import generate_dataset

        data = generate_dataset(root.parent / "synth", seed=0, n_train=count, n_valid=0,
                                n_test=0, duration=7.0, sample_rate=RATE, progress=False)
        tracks = open_dataset(data).tracks
        what = "synthetic (MUSDB18-7 not found)"
    for t in tracks:
        mix, refs = (np.asarray(a, dtype=np.float32) for a in t.audio(0, t.length))
        scale = np.float32(1.0) / np.float32(np.abs(mix).max())
        d = root / "train" / t.name
        d.mkdir(parents=True, exist_ok=True)
        scaled = mix * scale
        scaled[np.abs(scaled) > 1] = np.sign(scaled[np.abs(scaled) > 1])   # rounding, if any
        assert np.abs(scaled).max() == 1.0
        sf.write(d / "mixture.wav", scaled.T, RATE, subtype="FLOAT")
        for s, ref in zip(t.sources, refs):
            sf.write(d / f"{s}.wav", (ref * scale).T, RATE, subtype="FLOAT")
    print(f"tracks: {len(tracks)} x {tracks[0].length / RATE:.1f} s from {what}, float WAVs "
          f"scaled to a peak of 1.0")
    return root


def build_roformer(folder: Path, dim: int, depth: int, heads: int, dim_head: int):
    import torch
    import yaml
    from ml_collections import ConfigDict
    from msst.utils.settings import build_model_from_config

    cfg = dict(
        audio=dict(chunk_size=352800, dim_f=1024, dim_t=801, hop_length=441, n_fft=2048,
                   num_channels=2, sample_rate=RATE, min_mean_abs=0.0),
        model=dict(dim=dim, depth=depth, stereo=True, num_stems=1, time_transformer_depth=1,
                   freq_transformer_depth=1, linear_transformer_depth=0,
                   freqs_per_bands=ROFORMER_BANDS, dim_head=dim_head, heads=heads,
                   attn_dropout=0.1, ff_dropout=0.1, flash_attn=True, dim_freqs_in=1025,
                   stft_n_fft=2048, stft_hop_length=441, stft_win_length=2048,
                   stft_normalized=False, mask_estimator_depth=2,
                   multi_stft_resolution_loss_weight=1.0,
                   multi_stft_resolutions_window_sizes=(4096, 2048, 1024, 512, 256),
                   multi_stft_hop_size=147, multi_stft_normalized=False),
        training=dict(batch_size=2, instruments=["vocals", "other"], target_instrument="vocals",
                      use_amp=True),
        inference=dict(batch_size=4, dim_t=801, num_overlap=2))
    torch.manual_seed(0)
    model = build_model_from_config("bs_roformer", ConfigDict(cfg))
    with torch.no_grad():   # a fresh init can output ~0: random weights of a useful size
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    folder.mkdir(parents=True, exist_ok=True)
    config, ckpt = folder / "config_bs_roformer.yaml", folder / "model_bs_roformer.ckpt"
    config.write_text(yaml.dump(cfg, sort_keys=False))   # tuples as !!python/tuple, as the zoo
    torch.save(model.state_dict(), ckpt)
    n = sum(p.numel() for p in model.parameters())
    return config, ckpt, n


def build_mdx(folder: Path, g: int, probe: np.ndarray):
    """The .onnx + model_file_dir tables, the output scaled so the primary stem is about a
    third of the mixture (random weights otherwise give stems far above full scale, which
    audio-separator would then scale down)."""
    import torch
    from audio_separator.separator.uvr_lib_v5.mdxnet import ConvTDFNet

    from separators.families.uvr import write_offline_tables

    d = INST_HQ_3
    dim_t = 2 ** d["mdx_dim_t_set"]
    torch.manual_seed(0)
    net = ConvTDFNet("instrumental", 1e-4, "rmsprop", 4, d["mdx_dim_f_set"], dim_t,
                     d["mdx_n_fft_scale_set"], 1024, 11, 3, g, 3, 8, False, 0.25).eval()
    n = sum(p.numel() for p in net.parameters() if p.requires_grad)
    # scale the last convolution so the output spectrum is ~1/3 of the input's on real music
    n_fft = d["mdx_n_fft_scale_set"]
    x = torch.from_numpy(probe[:, :1024 * (dim_t - 1)].copy())
    z = torch.stft(x, n_fft, 1024, window=torch.hann_window(n_fft), center=True, return_complex=True)
    spec = torch.view_as_real(z).permute(0, 3, 1, 2).reshape(1, 4, -1, dim_t)[:, :, :d["mdx_dim_f_set"]]
    with torch.no_grad():
        ratio = spec.norm() / net(spec).norm()
        net.final_conv[0].weight.mul_(ratio / 3)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "UVR-MDX-NET-Bench.onnx"
    torch.onnx.export(net, torch.zeros(1, 4, d["mdx_dim_f_set"], dim_t), str(path),
                      input_names=["input"], output_names=["output"], dynamo=False)
    write_offline_tables(path, d, "Bench")
    return path, n


# ---- upstream ----------------------------------------------------------------------------------
class Quiet:
    """Upstream prints progress and device lines: out of the report."""

    def __enter__(self):
        self.saved = sys.stdout
        sys.stdout = open(os.devnull, "w")

    def __exit__(self, *exc):
        sys.stdout.close()
        sys.stdout = self.saved


def msst_upstream(config: Path, ckpt: Path, use_tta: bool):
    import msst

    with Quiet():
        sep = msst.Separator(config_path=config, checkpoint_path=ckpt, model_type="bs_roformer",
                             force_cpu=True, use_tta=use_tta, detailed_progress=False)

    def run(wav: Path) -> np.ndarray:
        with Quiet():
            out = sep.separate_file(wav)
        return np.stack([np.asarray(out["vocals"], dtype=np.float32)])
    return run


def uvr_upstream(folder: Path, model: Path, out: Path, denoise: bool, threads: int):
    import onnxruntime as ort
    import soundfile as sf
    from audio_separator.separator import Separator

    up = Separator(model_file_dir=str(folder), output_dir=str(out), output_format="WAV",
                   normalization_threshold=1.0, use_soundfile=True, log_level=logging.ERROR,
                   mdx_params={"hop_length": 1024, "segment_size": 2 ** INST_HQ_3["mdx_dim_t_set"],
                               "overlap": 0.25, "batch_size": 1, "enable_denoise": denoise})
    # the same intra-op threads as ours (which takes torch's): audio-separator leaves
    # onnxruntime's default, so it is set on the options object its session is built from
    real = ort.SessionOptions

    def options():
        o = real()
        o.intra_op_num_threads = threads
        return o
    ort.SessionOptions = options
    try:
        up.load_model(model.name)
    finally:
        ort.SessionOptions = real

    def run(wav: Path) -> np.ndarray:
        files = up.separate(str(wav))
        stems = {}
        for f in files:
            path = Path(f) if Path(f).is_absolute() else out / f
            data, _ = sf.read(path, dtype="float32")
            stems["vocals" if "(Vocals)" in path.name else "instrumental"] = data.T
            path.unlink()
        return np.stack([stems["instrumental"], stems["vocals"]])
    return run


# ---- ours --------------------------------------------------------------------------------------
def ours(spec: str, tta: str | None):
    from separators.registry import load_separator
    from separators.tta import with_tta

    base = load_separator(spec, device="cpu", offline=True)
    (sep, _), = with_tta(base, {"tta": tta} if tta else {})
    return sep


def f16_ok(stored: np.ndarray, want: np.ndarray) -> float:
    """max over samples of |stored - want| / (half a float16 step at |want| + 1e-5): <= 1 when
    the float16 stems are upstream's float32 stems rounded (within float32 noise)."""
    step = np.spacing(np.abs(want).astype(np.float16)).astype(np.float32)
    return float((np.abs(stored.astype(np.float32) - want) / (step / 2 + 1e-5)).max())


# ---- the comparison, one model -----------------------------------------------------------------
def peak_limited(x: np.ndarray) -> np.ndarray:
    """audio-separator's write: a stem peaking above normalization_threshold (1.0 here) is
    scaled down to it (spec_utils.normalize), so ours are compared after the same rule."""
    x = x.astype(np.float32)
    return x / np.maximum(1.0, np.abs(x).max(axis=(1, 2), keepdims=True))


def unlimit_gains(stored: np.ndarray, want: np.ndarray) -> np.ndarray:
    """[S, 1, 1] the gain upstream's peak scaling took from each of its stems, by least squares
    against our stored stems (1 where upstream's stem peaks below 1.0: nothing was scaled). Our
    float16 stems are the unscaled stems rounded; scaling *them* by their rounded peak would move
    every sample by up to half a float16 step of the peak, which is not a difference of stems."""
    num = (stored * want).sum(axis=(1, 2), dtype=np.float64)
    den = np.square(want).sum(axis=(1, 2), dtype=np.float64)
    gain = np.where(den > 0, num / np.maximum(den, 1e-30), 1.0)
    scaled = np.abs(want).max(axis=(1, 2)) >= 1.0 - 1e-6
    return np.where(scaled, gain, 1.0).astype(np.float32)[:, None, None]


def compare(label: str, variants: dict, pairs: list, dataset, store, wavs: dict, rounds: int,
            tta_rounds: int, report: dict, limit=None):
    """variants: name -> (kind "ours"/"upstream", callable or separator); pairs: (ours variant,
    upstream variant or None, what) compared for time and stems; limit: what upstream does to
    stems before it returns them, applied to ours before comparing."""
    from cache.run import cache_model, entry_of
    from core.datasets import Dataset
    from separators.inference import separate_array

    tracks = dataset.tracks
    first = tracks[0]
    mix = np.asarray(store.mixture(dataset.id, entry_of(first)), dtype=np.float32)
    equal = {}
    # untimed warm-up, which also gives the float32 comparison: one-off first-call costs
    # (kernels, onnxruntime's arena, library loading) are paid by each variant here
    outs = {}
    for name, (kind, obj) in variants.items():
        outs[name] = (separate_array(obj, mix, RATE) if kind == "ours" else obj(wavs[first.name]))
    for a, b, _ in pairs:
        if b is not None:
            ours = outs[a] if limit is None else limit(outs[a])
            equal[(a, b)] = {"float32_max_abs": float(np.abs(ours - outs[b]).max()),
                             "scaled_stems": int((np.abs(outs[a]).max(axis=(1, 2)) > 1).sum()),
                             "peak": float(np.abs(outs[b]).max())}
    times = {name: [] for name in variants}
    plain = [n for n in variants if "tta" not in n and "denoise" not in n and "polarity" not in n]
    upstream_last = {}
    for r in range(max(rounds, tta_rounds)):
        for i, t in enumerate(tracks):
            names = [n for n in variants if r < (rounds if n in plain else tta_rounds)]
            k = (r * len(tracks) + i) % len(names)
            order = names[k:] + names[:k]
            if (r + i) % 2:
                order = order[::-1]
            one = Dataset(dataset.root, dataset.kind, [t], dataset.sources)
            for name in order:
                kind, obj = variants[name]
                c0, w0 = time.process_time(), time.perf_counter()
                if kind == "ours":
                    cache_model(store, one, obj, force=True, progress=False)
                else:
                    upstream_last[(name, t.name)] = obj(wavs[t.name])
                times[name].append((r, t.name, time.perf_counter() - w0, time.process_time() - c0))
    # the stored float16 stems (the last round's) against upstream's of the same track
    for a, b, _ in pairs:
        if b is None:
            continue
        worst = 0.0
        key = store_key(variants[a][1])
        for t in tracks:
            if (b, t.name) in upstream_last:
                stored = np.asarray(store.stems(key, dataset.id, entry_of(t))).astype(np.float32)
                want = upstream_last[(b, t.name)]
                if limit is not None:   # undo upstream's peak scaling, not scale our rounded stems
                    want = want * unlimit_gains(stored, want)
                worst = max(worst, f16_ok(stored, want))
        equal[(a, b)]["float16_steps"] = worst
    # ratios over the same (round, track) cells
    print(f"\n{label}: wall / CPU seconds per variant (sum over the cells both ran)")
    report[label] = {"variants": {n: times[n] for n in variants}, "pairs": []}
    for a, b, what in pairs:
        ref = b if b is not None else a.replace("+tta", "")
        cells = {(r, tn) for r, tn, *_ in times[a]} & {(r, tn) for r, tn, *_ in times[ref]}
        wa = sum(w for r, tn, w, _ in times[a] if (r, tn) in cells)
        wb = sum(w for r, tn, w, _ in times[ref] if (r, tn) in cells)
        ca = sum(c for r, tn, _, c in times[a] if (r, tn) in cells)
        cb = sum(c for r, tn, _, c in times[ref] if (r, tn) in cells)
        per = sorted(x[2] / y[2] for x in times[a] for y in times[ref]
                     if (x[0], x[1]) == (y[0], y[1]))
        row = {"a": a, "b": ref, "what": what, "cells": len(cells), "wall_a": wa, "wall_b": wb,
               "cpu_a": ca, "cpu_b": cb, "wall_ratio": wa / wb, "cpu_ratio": ca / cb,
               "median_cell_ratio": per[len(per) // 2]}
        line = (f"  {what:<44} {a} {wa:7.1f} / {ca:6.1f} s vs {ref} {wb:7.1f} / {cb:6.1f} s: "
                f"wall {wa / wb:.3f}x (median cell {row['median_cell_ratio']:.3f}x), "
                f"CPU {ca / cb:.3f}x, {len(cells)} cells")
        if b is not None and "tta" not in a and "polarity" not in a:
            line += f" (goal <= 1.10x) -> {check(wa / wb <= 1.10, f'{label}: {a} / {b} wall time')}"
        print(line)
        if b is not None:
            e = equal[(a, b)]
            row.update(e)
            ok32 = check(e["float32_max_abs"] <= 1e-4, f"{label}: {a} = {b} (float32)")
            ok16 = check(e["float16_steps"] <= 1.0, f"{label}: {a} = {b} (stored float16)")
            print(f"  {'':<44} stems: float32 max |ours - upstream| {e['float32_max_abs']:.2e} "
                  f"(peak {e['peak']:.2f}; goal <= 1e-4) -> {ok32}; stored float16 within "
                  f"{e['float16_steps']:.2f} half-steps (goal <= 1) -> {ok16}")
        report[label]["pairs"].append(row)


def store_key(sep) -> str:
    from separators.base import model_key

    return model_key(sep.identity())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tracks", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2, help="rounds of the plain variants")
    ap.add_argument("--tta-rounds", type=int, default=1, help="rounds of the TTA variants")
    ap.add_argument("--threads", type=int, default=2, help="torch and onnxruntime threads")
    ap.add_argument("--musdb", type=Path, default=Path(os.environ.get(
        "MUSDB18_7_ROOT", REPO.parent / "shared" / "data" / "musdb18-7")))
    ap.add_argument("--models", default="msst,uvr", help="msst, uvr or both")
    ap.add_argument("--rof-dim", type=int, default=128)
    ap.add_argument("--rof-depth", type=int, default=2)
    ap.add_argument("--rof-heads", type=int, default=4)
    ap.add_argument("--rof-dim-head", type=int, default=32)
    ap.add_argument("--mdx-g", type=int, default=32, help="ConvTDFNet channels per scale")
    ap.add_argument("--json", type=Path, help="write the measurements here")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from cache.run import ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore

    t_all, cpu_all = time.perf_counter(), time.process_time()
    print(f"machine: {platform.system()} {platform.machine()}, {os.cpu_count()} CPUs (load "
          f"average {', '.join(f'{x:.1f}' for x in os.getloadavg())}), torch {torch.__version__}, "
          f"{args.threads} thread(s) for torch and onnxruntime, both sides")
    report = {"args": {k: str(v) for k, v in vars(args).items()}}
    with tempfile.TemporaryDirectory(prefix="bench_upstream-") as tmp:
        tmp = Path(tmp)
        root = write_tracks(tmp / "data", args.tracks, args.musdb)
        dataset = open_dataset(root)
        store = StemStore(tmp / "store")
        ingest_dataset(store, dataset, progress=False)
        wavs = {t.name: root / "train" / t.name / "mixture.wav" for t in dataset.tracks}
        wanted = set(args.models.split(","))
        if "msst" in wanted:
            config, ckpt, n = build_roformer(tmp / "msst", args.rof_dim, args.rof_depth,
                                             args.rof_heads, args.rof_dim_head)
            print(f"\nmsst: BS-RoFormer, {n / 1e6:.1f} M parameters (dim {args.rof_dim}, depth "
                  f"{args.rof_depth}, {args.rof_heads} heads of {args.rof_dim_head}; 62 bands, "
                  f"8-s chunks, num_overlap 2, batch 4), random weights, MSST's YAML + .ckpt")
            spec = f"{config}:{ckpt}"
            variants = {"ours": ("ours", ours(spec, None)),
                        "msst": ("upstream", msst_upstream(config, ckpt, False)),
                        "ours+tta": ("ours", ours(spec, "flip,polarity")),
                        "msst+tta": ("upstream", msst_upstream(config, ckpt, True))}
            compare("msst", variants, [("ours", "msst", "cache vs msst separate_file"),
                                       ("ours+tta", "msst+tta", "TTA flip,polarity vs use_tta"),
                                       ("ours+tta", None, "TTA flip,polarity vs plain (ours)")],
                    dataset, store, wavs, args.rounds, args.tta_rounds, report)
        if "uvr" in wanted:
            from cache.run import entry_of

            probe = np.asarray(store.mixture(dataset.id, entry_of(dataset.tracks[0])))
            path, n = build_mdx(tmp / "uvr", args.mdx_g, probe)
            print(f"\nuvr: MDX-Net ConvTDFNet, {n / 1e6:.1f} M parameters (g {args.mdx_g}; "
                  f"dim_f 3072, dim_t 256, n_fft 6144 as Inst_HQ_3), random weights, ONNX + "
                  f"mdx_model_data.json")
            out = tmp / "uvr-out"
            variants = {"ours": ("ours", ours(str(path), None)),
                        "audio-separator": ("upstream", uvr_upstream(path.parent, path, out, False,
                                                                     args.threads)),
                        "ours+polarity": ("ours", ours(str(path), "polarity")),
                        "audio-separator+denoise": ("upstream", uvr_upstream(
                            path.parent, path, out, True, args.threads)),
                        "ours+tta": ("ours", ours(str(path), "flip,polarity"))}
            compare("uvr", variants,
                    [("ours", "audio-separator", "cache vs audio-separator separate"),
                     ("ours+polarity", "audio-separator+denoise", "TTA polarity vs denoise"),
                     ("ours+tta", None, "TTA flip,polarity vs plain (ours)")],
                    dataset, store, wavs, args.rounds, args.tta_rounds, report, peak_limited)
    cpu = time.process_time() - cpu_all
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s wall, {cpu:.0f} s CPU (user + sys of "
          f"this process); load average at the end {os.getloadavg()[0]:.1f}")
    if args.json:
        args.json.write_text(json.dumps(report, indent=1, default=str))
    finish()


if __name__ == "__main__":
    main()
