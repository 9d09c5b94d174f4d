"""How much can any linear mix of these members gain? Oracle mixing weights fitted on the very
references they are scored against: an upper bound for the blend and conv1x1 (static) and for the
MDX-Mixer (weights that change over time), to tell "the mixer learns badly" from "the members leave
little to gain".

For every track of SPLIT and every source, the least-squares weights (unconstrained, no bias) of
the members' cached stems against the reference, over both channels:
  static/   one set of weights per track and source;
  segment/  one set per track, source and SEGMENT seconds (museval's 1 s windows by default).
Writes DIR/static/<track>/<source>.wav and DIR/segment/<track>/<source>.wav (float32), which
`pipeline evaluate --estimates` scores beside everything else:

  python benchmarks/mixing_ceiling.py --work WORK -d DATASET --split valid -m A -m B --out DIR
  pipeline evaluate --work WORK -d DATASET --split valid -m A -m B \
      --estimates oracle-static=DIR/static --estimates oracle-1s=DIR/segment --no-html --out REPORT

The global static optimum over the split (one set of weights per source for all tracks, in
museval's own metric) is `pipeline blend -m A -m B --split SPLIT`, searched on the split itself.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import soundfile as sf

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from core.store import StemStore  # noqa: E402


def least_squares_mix(members: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """members [M, 2, n], reference [2, n] -> the mix sum_m w_m members[m] closest to the
    reference (float64 normal equations; a tiny ridge keeps silent segments defined)."""
    a = members.reshape(len(members), -1).astype(np.float64)
    b = reference.reshape(-1).astype(np.float64)
    gram = a @ a.T
    gram += 1e-9 * (np.trace(gram) / len(gram) + 1e-12) * np.eye(len(gram))
    w = np.linalg.solve(gram, a @ b)
    return np.tensordot(w, members.astype(np.float64), axes=1).astype(np.float32)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("-d", "--dataset", required=True, help="store dataset id")
    p.add_argument("--split", default="valid")
    p.add_argument("-m", "--model", action="append", required=True)
    p.add_argument("--segment", type=float, default=1.0, help="seconds per segment (default 1)")
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args(argv)

    store = StemStore(args.work / "store")
    keys = [store.resolve_model(m) for m in args.model]
    info = store.dataset_info(args.dataset)
    sources, rate = info["sources"], info["sample_rate"]
    seg = int(round(args.segment * rate))
    for track in store.tracks(args.dataset, args.split):
        refs = np.asarray(store.references(args.dataset, track), dtype=np.float32)
        stems = [np.asarray(store.stems(k, args.dataset, track), dtype=np.float32) for k in keys]
        for j, source in enumerate(sources):
            members = np.stack([s[j] for s in stems])
            static = least_squares_mix(members, refs[j])
            segment = np.concatenate([least_squares_mix(members[..., a:a + seg], refs[j, :, a:a + seg])
                                      for a in range(0, refs.shape[-1], seg)], axis=-1)
            for kind, est in (("static", static), ("segment", segment)):
                d = args.out / kind / track.name
                d.mkdir(parents=True, exist_ok=True)
                sf.write(d / f"{source}.wav", est.T, rate, subtype="FLOAT")
        print(track.name, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
