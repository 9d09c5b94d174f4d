"""A pool of 20 real, distinct cached separators on MUSDB18-7 train, for bench_blend.py.

No pretrained weights can be downloaded here, so the pool is the three shipped checkpoints
(umx-synth, xumx-synth, demucs-synth: trained on synthetic music) each run under several
inference options: Wiener iterations (niter 0/1/2) and Wiener block length (wiener_win_len),
2- or 3-second chunks cross-faded instead of the whole 7-s track (segment), demucs's random
shifts (0/1/2) and chunk overlap. Every entry is a
different model key in the stem store with its own stems, as `pipeline cache -m SPEC --niter N
...` would cache it; many are near-duplicates of each other, as checkpoints of one architecture
in a zoo are. The order interleaves the families, so the first 5, 8 and 12 are smaller pools.

    .venv/bin/python benchmarks/blend_pool.py --work work/bench-blend   # cache what is missing
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
MUSDB18_7 = Path(os.environ.get("MUSDB18_7_ROOT", REPO.parent / "shared" / "data" / "musdb18-7"))

POOL = (
    ("umx-synth", {}), ("xumx-synth", {}), ("demucs-synth", {}),
    ("umx-synth", {"niter": 0}), ("xumx-synth", {"niter": 0}),
    ("demucs-synth", {"shifts": 0}), ("umx-synth", {"niter": 2}), ("xumx-synth", {"niter": 2}),
    ("demucs-synth", {"overlap": 0.5}), ("umx-synth", {"segment": 2.0}),
    ("demucs-synth", {"segment": 2.0}), ("umx-synth", {"wiener_win_len": 100}),
    ("xumx-synth", {"wiener_win_len": 100}), ("demucs-synth", {"shifts": 2}),
    ("umx-synth", {"niter": 0, "segment": 2.0}), ("demucs-synth", {"shifts": 0, "overlap": 0.5}),
    ("demucs-synth", {"shifts": 0, "segment": 2.0}), ("xumx-synth", {"niter": 0, "segment": 3.0}),
    ("umx-synth", {"wiener_win_len": 30}), ("demucs-synth", {"overlap": 0.5, "segment": 2.0}),
)


def label(spec: str, options: dict) -> str:
    return spec + "".join(f" {k}={v}" for k, v in options.items())


def build_pool(work: Path, count: int = len(POOL), log=print):
    """(store, dataset id, [store keys]) with the first `count` pool entries cached on train."""
    from cache.run import cache_model, ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore
    from separators.registry import load_separator

    if not (MUSDB18_7 / "train").is_dir():
        sys.exit(f"MUSDB18-7 not found at {MUSDB18_7}; set MUSDB18_7_ROOT")
    ds = open_dataset(MUSDB18_7)
    store = StemStore(work / "store")
    ingest_dataset(store, ds, progress=False)
    keys = []
    for spec, options in POOL[:count]:
        t0 = time.perf_counter()
        sep = load_separator(spec, device="cpu", offline=True, options=options)
        s = cache_model(store, ds, sep, splits=["train"], progress=False,
                        load={"spec": spec, "repo": None, "options": options})
        keys.append(s["key"])
        if s["computed"]:
            log(f"  cached {label(spec, options)} [{s['key']}]: {s['computed']} tracks, "
                f"{time.perf_counter() - t0:.0f} s")
    if len(set(keys)) != len(keys):
        sys.exit("blend pool: two entries gave the same model key")
    return store, ds.id, keys


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", type=Path, required=True)
    ap.add_argument("--count", type=int, default=len(POOL))
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    build_pool(args.work.resolve(), args.count)
