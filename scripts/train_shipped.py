#!/usr/bin/env python
"""Train the three shipped base checkpoints on the embedded synthetic dataset.

    .venv/bin/python scripts/train_shipped.py                # all three (~30 min, 3 in parallel)
    .venv/bin/python scripts/train_shipped.py --only umx     # one of them
    .venv/bin/python scripts/train_shipped.py --real ../shared/data/musdb18-7 --only umx

Steps, each resumable (run the same command again after an interruption):

1. generate the synthetic dataset with `pipeline make-dataset`'s defaults (seed 0, 28/6/6 tracks
   of 20 s at 44.1 kHz) in <work>/data/synthetic, and ingest it into the stem store <work>/store;
2. for each family, `separators.train_base.train_base(store, <dataset id>, family, "small", seed=0)`
   into <work>/runs/base/<name> (Open-Unmix, X-UMX, Hybrid Demucs);
3. separate the test split with the exported model and write its SDR into MODEL.md;
4. copy <work>/runs/base/<name>/model to separators/checkpoints/<name>/ (the registry's shipped
   checkpoints: `pipeline cache -m <name>` then loads it).

--real DATASET trains the same recipes (family, preset, epochs, seed) on a real dataset's train
split instead - <work>/runs/<family>-<tag>, the run `pipeline train-base -f <family> -d DATASET
--name <family>-<tag> --epochs E` makes - scores them on its valid split and writes those numbers
into the shipped checkpoint's card (section "<!-- real-sdr -->"). Nothing trained on the real data
is installed or committed. Note the valid split is also the one train_base picks its best epoch on
(MUSDB18 has no third split in the previews), so these numbers are slightly optimistic.
"""
from __future__ import annotations

import argparse
import shlex
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# name -> (family, extra train_base arguments, epochs). The epochs are those the shipped
# checkpoints were trained with: umx and xumx fewer than the `small` preset's (20 / 12), because
# they trained side by side on one 2-core machine (26-29 min each); demucs the preset's 15.
SHIPPED = {
    "umx-synth": ("umx", {}, 10),
    "xumx-synth": ("xumx", {}, 6),
    "demucs-synth": ("demucs", {"arch": "hdemucs"}, 15),
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, default=REPO / "work", help="work folder (default ./work)")
    p.add_argument("--only", default=",".join(SHIPPED),
                   help=f"comma-separated subset of {', '.join(SHIPPED)} (or families umx,xumx,demucs)")
    p.add_argument("--preset", default="small", help="train_base preset (default small)")
    p.add_argument("--seed", type=int, default=0, help="training seed (default 0)")
    p.add_argument("--epochs", type=int, default=None,
                   help="override the recipe's epochs (umx 10, xumx 6, demucs 15)")
    p.add_argument("--real", type=Path, default=None,
                   help="train the same recipes on this dataset's train split, score its valid "
                        "split, write the numbers into the shipped cards (install nothing)")
    p.add_argument("--real-tag", default="musdb7",
                   help="--real: run names <family>-<tag> (default musdb7)")
    p.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: all)")
    p.add_argument("--checkpoints", type=Path, default=REPO / "separators" / "checkpoints",
                   help="where the finished models are installed (default separators/checkpoints)")
    p.add_argument("--no-install", action="store_true", help="train and evaluate only")
    g = p.add_argument_group("synthetic dataset (pipeline make-dataset's defaults)")
    g.add_argument("--data-seed", type=int, default=0)
    g.add_argument("--train", type=int, default=28)
    g.add_argument("--valid", type=int, default=6)
    g.add_argument("--test", type=int, default=6)
    g.add_argument("--duration", type=float, default=20.0)
    g.add_argument("--rate", type=int, default=44100)
    args = p.parse_args(argv)

    import torch

    from cache.run import ingest_dataset
    from core.datasets import open_dataset
    from core.store import StemStore
    from core.synth import generate_dataset
    from separators.train_base import evaluate_trained, train_base, write_test_sdr

    if args.threads:
        torch.set_num_threads(args.threads)
    wanted = [s.strip() for s in args.only.split(",") if s.strip()]
    names = [n for n in SHIPPED if n in wanted or SHIPPED[n][0] in wanted]
    if not names:
        p.error(f"--only {args.only}: nothing to train (choose from {', '.join(SHIPPED)})")

    work = args.work.resolve()
    store = StemStore(work / "store")
    if args.real is not None:
        ds = open_dataset(args.real)
    else:
        data = work / "data" / "synthetic"
        generate_dataset(data, seed=args.data_seed, n_train=args.train, n_valid=args.valid,
                         n_test=args.test, duration=args.duration, sample_rate=args.rate)
        ds = open_dataset(data)
    ingest_dataset(store, ds)
    script = shlex.join([".venv/bin/python", "scripts/train_shipped.py"]
                        + list(argv if argv is not None else sys.argv[1:]))

    for name in names:
        family, extra, recipe_epochs = SHIPPED[name]
        epochs = args.epochs or recipe_epochs
        run_dir = (work / "runs" / f"{family}-{args.real_tag}" if args.real is not None
                   else work / "runs" / "base" / name)
        call = (f"train_base(store, {ds.id!r}, {family!r}, {args.preset!r}, {str(run_dir)!r}, "
                f"seed={args.seed}" + "".join(f", {k}={v!r}" for k, v in extra.items())
                + f", epochs={epochs})")
        print(f"== {name}: {call}", flush=True)
        t0 = time.time()
        res = train_base(store, ds.id, family, args.preset, run_dir, seed=args.seed,
                         epochs=epochs, device=args.device, command=f"{script}\n# = {call}",
                         **extra)
        print(f"   trained in {time.time() - t0:.0f} s (best epoch {res.best_epoch}, "
              f"validation loss {res.best_valid:.4g})", flush=True)
        split = "valid" if args.real is not None else "test"
        scores = evaluate_trained(store, ds.id, res.model_dir, split=split, device=args.device,
                                  write_card=args.real is None)
        print(f"   {split} SDR: " + ", ".join(f"{s} {v:.2f} dB" for s, v in scores.items()),
              flush=True)
        if args.real is not None:
            info = store.dataset_info(ds.id)
            n_train = len(store.tracks(ds.id, "train"))
            cli = (f"pipeline train-base -f {family} -d {args.real} --name {run_dir.name} "
                   f"--epochs {epochs}" + (f" --seed {args.seed}" if args.seed else "")
                   + "".join(f" --{k.replace('_', '-')} {v}" for k, v in extra.items()))
            notes = [f"The same recipe (`{args.preset}` preset, {epochs} epochs, seed {args.seed}) "
                     f"trained on the {n_train} `train` tracks of `{ds.id}` (read from "
                     f"`{info.get('root', args.real)}`) in {res.train_seconds / 60:.1f} min "
                     f"(best epoch {res.best_epoch}); no weights trained on it are shipped. "
                     f"Reproduce with:", "", "```", cli, "```", "",
                     "The best epoch was chosen on this same `valid` split (the previews have "
                     "no third split), so these numbers are slightly optimistic."]
            for dest in (res.model_dir, args.checkpoints / name):
                if (dest / "MODEL.md").exists():
                    write_test_sdr(dest, scores, dataset_id=ds.id, split="valid",
                                   n_tracks=len(store.tracks(ds.id, "valid")), section="real-sdr",
                                   title="Real music: the same recipe on MUSDB18 previews",
                                   notes=notes)
            print(f"   wrote the valid-split SDR into {args.checkpoints / name / 'MODEL.md'}",
                  flush=True)
        elif not args.no_install:
            dest = args.checkpoints / name
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(res.model_dir, dest)
            print(f"   installed {dest}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
