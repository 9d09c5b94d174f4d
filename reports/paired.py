"""Paired statistics: is a system's gain over the best single base model real, track by track?

museval's headline number (median over tracks of the per-track median SDR) says nothing about how
a gain is spread: +0.3 dB can be every track a little better or two tracks much better. Every
system is scored on the same tracks as the reference, so the per-track differences are paired:

    Δ_t = (system's median SDR over the frames of track t) - (the reference's, same track)

per target, and for the target average (the mean over targets of the per-track medians, for
systems that output every target). Per (system, target): the number of tracks with both scores,
the mean Δ, its 95 % percentile bootstrap confidence interval (resampling the tracks with
replacement, a fixed seed: the same resamples for every row, so rows compare like with like), the
share of tracks with Δ > 0 and the median Δ. The reference is the best single base model by
average museval SDR, the one the summary table's Δ column is relative to.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from core.metrics import per_track

COLUMNS = ("system", "target", "reference", "n_tracks", "delta_mean", "ci_low", "ci_high",
           "share_improved", "delta_median")
AVERAGE = "average"
RESAMPLES = 10_000
SEED = 0
LEVEL = 0.95


def track_scores(df: pd.DataFrame, targets: list[str]) -> pd.DataFrame:
    """Per-track median SDR, indexed by (system, track), one column per target plus `average`
    (NaN for a system lacking a target)."""
    sdr = per_track(df[df.metric == "SDR"]).droplevel("metric").unstack("target")
    sdr = sdr.reindex(columns=list(targets))
    having = df[df.metric == "SDR"].groupby("system")["target"].agg(set)
    complete = np.array([set(targets) <= having[s] for s in sdr.index.get_level_values("system")],
                        dtype=bool)
    with np.errstate(all="ignore"):
        # a track's silent target is NaN for every system alike (museval skips silent frames)
        average = np.nanmean(sdr[list(targets)].to_numpy(dtype=np.float64), axis=1)
    sdr[AVERAGE] = np.where(complete, average, np.nan)
    return sdr


def bootstrap_ci(deltas: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                 level: float = LEVEL) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean of `deltas` (one value per track)."""
    d = np.asarray(deltas, dtype=np.float64)
    idx = np.random.default_rng(seed).integers(0, len(d), size=(resamples, len(d)))
    means = d[idx].mean(axis=1)
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(means, [tail, 100 - tail])
    return float(low), float(high)


def paired_statistics(df: pd.DataFrame, reference: str | None, targets: list[str], *,
                      resamples: int = RESAMPLES, seed: int = SEED) -> pd.DataFrame:
    """One row per (system other than the reference, target or `average`), columns COLUMNS, in
    the order of the systems in `df`; empty without a reference."""
    rows = []
    if reference is not None:
        scores = track_scores(df, targets)
        ref = scores.xs(reference, level="system")
        for system in df["system"].drop_duplicates():
            if system == reference:
                continue
            own = scores.xs(system, level="system").reindex(ref.index)
            for target in list(targets) + [AVERAGE]:
                d = (own[target] - ref[target]).to_numpy(dtype=np.float64)
                d = d[np.isfinite(d)]
                if not len(d):
                    continue
                low, high = bootstrap_ci(d, resamples, seed)
                rows.append({"system": system, "target": target, "reference": reference,
                             "n_tracks": len(d), "delta_mean": float(d.mean()), "ci_low": low,
                             "ci_high": high, "share_improved": float((d > 0).mean()),
                             "delta_median": float(np.median(d))})
    return pd.DataFrame(rows, columns=list(COLUMNS))


def paired_markdown(paired: pd.DataFrame, targets: list[str]) -> str:
    """The summary's section: the target average in full, each target's mean and interval."""
    if paired.empty:
        return ""
    reference = paired["reference"].iloc[0]
    cols = [AVERAGE] + list(targets)
    lines = [f"## Paired per-track differences vs the best single model ({reference}), dB", "",
             f"Δ per track = the system's median SDR over the track's frames minus {reference}'s; "
             f"mean Δ with its {LEVEL:.0%} bootstrap confidence interval ({RESAMPLES:,} "
             f"resamples of the tracks), tracks improved (Δ > 0), median Δ. An interval above 0 "
             f"is a gain that the choice of tracks does not explain.", "",
             "| system | average Δ mean [95 % CI] | tracks improved | median Δ | "
             + " | ".join(f"{t} Δ mean [95 % CI]" for t in targets) + " |",
             "|" + "---|" * (len(targets) + 4)]
    by = paired.set_index(["system", "target"])
    for system in paired["system"].drop_duplicates():
        cells = []
        for target in cols:
            if (system, target) not in by.index:
                cells += ["—", "—", "—"] if target == AVERAGE else ["—"]
                continue
            r = by.loc[(system, target)]
            interval = f"{r.delta_mean:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}]"
            if target == AVERAGE:
                improved = round(r.share_improved * r.n_tracks)
                cells += [interval, f"{improved}/{r.n_tracks} ({r.share_improved:.0%})",
                          f"{r.delta_median:+.2f}"]
            else:
                cells.append(interval)
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
