"""GPU check: CUDA, mixed precision and DDP through the project's own code, in under 5 minutes.

No GPU was available while this project was written, so this script is what to run the first
time one is (`make gpu-check`). On a CUDA machine it

  1. runs the CUDA-marked tests (`pytest -m cuda`);
  2. caches a few synthetic tracks with full-size HTDemucs and UMXL networks holding random
     weights, saved in their real formats (`955717e8-<sha256[:8]>.th`, demucs's package for
     `htdemucs`; `<target>-<hash>.pth` state dicts for `umxl`) and loaded by name from `--repo`
     through the same loaders as the real weights (`pipeline cache -m htdemucs -m umxl --repo`);
  3. trains the MDX-Mixer `paper` preset (T = 2^18, F = 2^7, N = 8) on those stems for a few
     hundred steps with bf16 autocast, and reports steps/s and peak GPU memory;
  4. trains a mixer with 2-process DDP (`torchrun --nproc_per_node 2`; both ranks share the GPU
     when there is only one) and checks that both ranks end with bit-identical weights;

then prints one summary table; the exit status is non-zero when a check failed.

    .venv/bin/python benchmarks/gpu_check.py             # on a CUDA machine
    .venv/bin/python benchmarks/gpu_check.py --dry-run   # CPU only, small sizes (run by the tests)

--dry-run runs the same steps on the CPU with small networks (a tiny HTDemucs under the htdemucs
signature, a tiny Open-Unmix folder), the `tiny` mixer preset and gloo DDP, and only counts
the CUDA-marked tests; the test suite runs it so the script keeps working while no GPU is around.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

MUSDB = ["drums", "bass", "other", "vocals"]
HTDEMUCS_SIG = "955717e8"   # the signature demucs's packaged htdemucs.yaml names
# demucs's htdemucs configuration (conf/config.yaml `htdemucs:`; segment: the trained 7.8 s);
# everything else is HTDemucs's default. 42.0 M parameters, as the released model.
HTDEMUCS_FULL = dict(dconv_mode=3, bottom_channels=512, t_sparse_attn_window=400, segment=7.8)
HTDEMUCS_TINY = dict(channels=4, depth=4, nfft=1024, t_layers=1, t_heads=2, dconv_comp=4, segment=2)


class Checks:
    """Runs named checks, keeps going after a failure, prints the summary table."""

    def __init__(self):
        self.rows: list[tuple[str, str, str, float]] = []

    def run(self, name: str, fn, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            status, detail, value = "PASS", *fn(*args, **kwargs)
        except Skip as e:
            status, detail, value = "SKIP", str(e), None
        except Exception as e:   # a failed check is reported, the next one still runs
            traceback.print_exc()
            first = str(e).splitlines()[0][:150] if str(e) else ""
            status, detail, value = "FAIL", f"{type(e).__name__}: {first}", None
        self.rows.append((name, status, detail, time.perf_counter() - t0))
        print(f"[{status}] {name}: {detail}", flush=True)
        return value

    def table(self) -> str:
        lines = ["| check | result | detail | seconds |", "|---|---|---|---|"]
        lines += [f"| {n} | {s} | {d} | {t:.1f} |" for n, s, d, t in self.rows]
        return "\n".join(lines)

    @property
    def failed(self) -> bool:
        return any(s == "FAIL" for _, s, _, _ in self.rows)


class Skip(Exception):
    pass


# ---- 1. the CUDA-marked tests -------------------------------------------------------------------
def cuda_tests(dry_run: bool):
    if dry_run:   # no CUDA: only make sure there are CUDA-marked tests for the real run to select
        marked = {p.name: len(re.findall(r"^@pytest\.mark\.cuda$", p.read_text(), re.M))
                  for p in sorted((REPO / "tests").glob("test_*.py"))}
        marked = {k: v for k, v in marked.items() if v}
        if not marked:
            raise RuntimeError("no @pytest.mark.cuda tests under tests/")
        return (f"{sum(marked.values())} CUDA-marked tests in {', '.join(marked)} "
                f"(not run: no GPU)"), None
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "cuda", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
    last = (proc.stdout.strip().splitlines() or ["(no output)"])[-1]
    if proc.returncode != 0:
        raise RuntimeError(f"pytest -m cuda exited {proc.returncode}: {last}")
    if "skipped" in last:
        raise RuntimeError(f"CUDA tests were skipped: {last}")
    return last, None


# ---- 2. full-size base models with random weights, in their real formats -------------------------
def save_models(repo: Path, full: bool) -> list[str]:
    """Write the networks where the real weights would be; returns the `-m` specs to cache."""
    import torch
    from demucs.htdemucs import HTDemucs

    from separators.families.demucs import export_model

    repo.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    htdemucs = HTDemucs(MUSDB, **(HTDEMUCS_FULL if full else HTDEMUCS_TINY))
    export_model(htdemucs, repo, HTDEMUCS_SIG)   # <sig>-<sha256[:8]>.th, verified on load
    if full:
        import openunmix

        from separators.families.umx import PRETRAINED_URLS

        umxl = openunmix.umxl(targets=MUSDB, pretrained=False, device="cpu")
        for target, url in PRETRAINED_URLS["umxl"].items():   # vocals-bccbd9aa.pth, ...
            torch.save(umxl.target_models[target].state_dict(), repo / url.rsplit("/", 1)[-1])
        return ["htdemucs", "umxl"]
    return ["htdemucs", str(save_tiny_umx(repo.parent / "tiny-umx"))]


def save_tiny_umx(folder: Path) -> Path:
    """An Open-Unmix model folder as openunmix's scripts/train.py writes it, tiny."""
    import numpy as np
    import torch
    from openunmix.model import OpenUnmix

    folder.mkdir(parents=True, exist_ok=True)
    nfft, nhop = 1024, 256
    (folder / "separator.json").write_text(json.dumps(
        {"nfft": nfft, "nhop": nhop, "sample_rate": 44100, "nb_channels": 2}))
    for i, target in enumerate(MUSDB):
        torch.manual_seed(i)
        net = OpenUnmix(nb_bins=nfft // 2 + 1, nb_channels=2, hidden_size=8, max_bin=64,
                        input_mean=np.zeros(nfft // 2 + 1), input_scale=np.ones(nfft // 2 + 1))
        torch.save(net.state_dict(), folder / f"{target}.pth")
        (folder / f"{target}.json").write_text(json.dumps(
            {"args": {"target": target, "nfft": nfft, "nhop": nhop, "hidden_size": 8,
                      "nb_channels": 2, "bandwidth": 16000}}))
    return folder


def cache_models(work: Path, dataset: Path, device: str, full: bool):
    import numpy as np

    from cache.run import cache_model, ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore
    from separators.registry import load_separator

    repo = work / "weights"
    specs = save_models(repo, full)
    store, ds = StemStore(work / "store"), open_dataset(dataset)
    ingest_dataset(store, ds, progress=False)
    keys, parts = [], []
    for spec in specs:
        sep = load_separator(spec, device=device, offline=True, repo=repo)
        s = cache_model(store, ds, sep, progress=False)
        t = store.tracks(ds.id)[0]
        stems = np.asarray(store.stems(s["key"], ds.id, t), dtype=np.float32)
        if not np.isfinite(stems).all() or stems.shape != (len(sep.sources), 2, t.length):
            raise RuntimeError(f"{sep.name}: stems {stems.shape} with non-finite values")
        params = sum(p.numel() for p in _network(sep).parameters()) / 1e6
        keys.append(s["key"])
        parts.append(f"{spec if not full else sep.name} {params:.1f} M params "
                     f"{s['realtime']:.1f}x real time")
    return f"{len(ds)} tracks; " + "; ".join(parts), (store, ds.id, keys)


def _network(sep):
    return getattr(sep, "network", None) or sep.model


# ---- 3. MDX-Mixer `paper` with bf16 autocast ------------------------------------------------------
def train_paper_mixer(cached, work: Path, device: str, full: bool, steps: int):
    import torch

    from core.training import METRICS
    from mixer.train import train_mixer

    store, ds_id, keys = cached
    cuda = device.startswith("cuda")
    if cuda:   # the base models of the previous step are gone: measure the mixer alone
        import gc

        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    from mixer.models import PRESETS
    from core.chunking import segment_offsets

    preset = "paper" if full else "tiny"
    batch, epochs = 4, 3
    shift = 2 ** 11 if full else 2 ** 8
    segments = sum(len(segment_offsets(t.length, PRESETS[preset]["T"], shift))
                   for t in store.tracks(ds_id, "train"))
    per_epoch = min(-(-steps // epochs), segments // batch)
    result = train_mixer(store, ds_id, keys, "mdx-mixer", work / "runs" / "paper-bf16",
                         preset=preset, epochs=epochs, batch=batch,
                         shift=shift, max_segments_per_epoch=per_epoch * batch, device=device,
                         amp="bf16", select="last", num_workers=4 if full else 0,
                         progress=False, resume=False)
    rows = result.metrics
    losses = [r["train_loss"] for r in rows]
    if not all(map(_finite, losses)):
        raise RuntimeError(f"non-finite training loss {losses}")
    done = per_epoch * (epochs - 1)   # the first epoch warms up (cuDNN autotuning, allocator)
    rate = done / sum(r["seconds"] for r in rows[1:])
    peak = (f"peak GPU memory {torch.cuda.max_memory_allocated() / 2 ** 30:.2f} GiB" if cuda
            else "no GPU memory on CPU")
    detail = (f"{preset}, {per_epoch * epochs} steps of batch {batch}: {rate:.2f} steps/s, "
              f"{peak}, loss {losses[0]:.4f} -> {losses[-1]:.4f} ({METRICS} in {result.run_dir})")
    return detail, None


def _finite(x) -> bool:
    import math

    return math.isfinite(x)


# ---- 4. two-process DDP -------------------------------------------------------------------------
def ddp_identical(cached, work: Path, full: bool):
    import torch

    store, ds_id, keys = cached
    out = work / "ddp"
    out.mkdir(parents=True, exist_ok=True)
    job = {"store": str(store.root), "dataset": ds_id, "keys": keys, "out": str(out),
           "preset": "demo" if full else "tiny", "amp": "bf16" if full else "off"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), "--ddp-worker", json.dumps(job)]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
        raise RuntimeError(f"torchrun exited {proc.returncode}: {tail}")
    ranks = [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]
    written = torch.load(out / "run" / "mixer.pt", weights_only=True)   # rank 0's file
    info = json.loads((out / "rank0.json").read_text())
    if set(ranks[0]) != set(ranks[1]):
        raise RuntimeError("the ranks' models have different parameters")
    worst = max((ranks[0][k].double() - ranks[1][k].double()).abs().max().item() for k in ranks[0])
    same = all(torch.equal(ranks[0][k], ranks[1][k]) for k in ranks[0])
    if not same:
        raise RuntimeError(f"rank 0 and rank 1 weights differ (max |diff| {worst:.3g})")
    if not all(torch.equal(written[k], ranks[0][k]) for k in written):
        raise RuntimeError("mixer.pt differs from rank 0's weights")
    return (f"2 ranks ({info['backend']} on {info['device']}), {info['steps']} steps each: "
            f"weights bit-identical ({len(ranks[0])} tensors)"), None


def ddp_worker(job: dict) -> None:
    """One torchrun rank: train_mixer (DDP from WORLD_SIZE), then keep this rank's weights."""
    import torch
    import torch.distributed as dist

    import mixer.train as mixer_train
    from core.config import default_device
    from core.store import StemStore

    out, rank = Path(job["out"]), int(os.environ["RANK"])
    real_train, seen = mixer_train.train, {}

    def train_and_keep(model, *args, **kwargs):   # the model is trained in place
        result = real_train(model, *args, **kwargs)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()},
                   out / f"rank{rank}.pt")
        seen["steps"] = kwargs.get("max_batches_per_epoch") * kwargs["epochs"]
        return result

    mixer_train.train = train_and_keep
    device = default_device()
    mixer_train.train_mixer(StemStore(job["store"]), job["dataset"], job["keys"], "mdx-mixer",
                            out / "run", preset=job["preset"], epochs=2, batch=2,
                            shift=2 ** 13 if job["preset"] == "demo" else 2 ** 8,
                            max_segments_per_epoch=16, device=device, amp=job["amp"],
                            select="last", progress=False, resume=False)
    (out / f"rank{rank}.json").write_text(json.dumps(
        {"backend": dist.get_backend(), "device": device, "steps": seen["steps"]}))
    dist.destroy_process_group()


# ---- the whole check ----------------------------------------------------------------------------
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true", help="CPU only, small sizes (no GPU needed)")
    ap.add_argument("--steps", type=int, default=300, help="MDX-Mixer training steps")
    ap.add_argument("--work", type=Path, help="Keep the files here (default: a temporary folder)")
    ap.add_argument("--ddp-worker", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.ddp_worker:
        ddp_worker(json.loads(args.ddp_worker))
        return 0

    import torch

    full = not args.dry_run
    if full and not torch.cuda.is_available():
        print("error: no CUDA device; use --dry-run to check the CPU parts", file=sys.stderr)
        return 2
    device = "cuda" if full else "cpu"
    if args.dry_run:
        torch.set_num_threads(1)
    steps = args.steps if full else min(args.steps, 6)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        work = args.work or Path(tmp)
        checks = Checks()
        where = torch.cuda.get_device_name(0) if full else "CPU (dry run)"
        print(f"gpu check on {where}, torch {torch.__version__}, work folder {work}", flush=True)
        checks.run("CUDA-marked tests", cuda_tests, args.dry_run)

        from core.synth import generate_dataset

        # paper's T = 2^18 samples (5.9 s): 15-s tracks give ~200 segments each at shift 2^11
        data = generate_dataset(work / "data", n_train=3 if full else 2, n_valid=1, n_test=1,
                                duration=15.0 if full else 1.0, progress=False)
        cached = checks.run("cache htdemucs + umxl" if full else "cache (tiny htdemucs + umx)",
                            cache_models, work, data, device, full)
        if cached is None:
            checks.rows.append(("MDX-Mixer bf16", "SKIP", "no cached stems", 0.0))
            checks.rows.append(("DDP 2 ranks", "SKIP", "no cached stems", 0.0))
        else:
            checks.run("MDX-Mixer paper, bf16" if full else "MDX-Mixer tiny (CPU)",
                       train_paper_mixer, cached, work, device, full, steps)
            checks.run("DDP 2 ranks, identical weights", ddp_identical, cached, work, full)
    print()
    print(checks.table())
    print(f"\n{'FAILED' if checks.failed else 'all checks passed'} in {time.perf_counter() - t0:.0f} s")
    return 1 if checks.failed else 0


if __name__ == "__main__":
    sys.exit(main())
