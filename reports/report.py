"""Evaluation outputs: scores.csv, per_track.csv, museval JSON, summary.md and figures."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from core.metrics import aggregate, museval_json, per_track, write_museval_json
from reports.paired import paired_markdown

AVERAGE = "average"


def summary_tables(df: pd.DataFrame, targets: list[str], base_systems: list[str]):
    """(museval median/median SDR table, mean uSDR table), systems x (targets + average)."""
    agg = aggregate(df)
    tables = {}
    for metric, column in (("SDR", "median_median"), ("uSDR", "mean_median")):
        t = agg.xs(metric, level="metric")[column].unstack("target")
        t = t.reindex(columns=[c for c in targets if c in t.columns])
        # The average over targets is only meaningful for systems that output all of them.
        t[AVERAGE] = t[targets].mean(axis=1, skipna=False) if set(targets) <= set(t.columns) else np.nan
        order = [s for s in df["system"].drop_duplicates()]
        tables[metric] = t.reindex(order)
    return tables["SDR"], tables["uSDR"]


def best_single(table: pd.DataFrame, base_systems: list[str]) -> str | None:
    bases = table.loc[[s for s in base_systems if s in table.index], AVERAGE].dropna()
    return bases.idxmax() if len(bases) else None


def _markdown_table(table: pd.DataFrame, reference: str | None, exclude_from_best: set[str]) -> str:
    cols = list(table.columns)
    header = "| system | " + " | ".join(cols) + " | Δ avg vs best single |"
    lines = [header, "|" + "---|" * (len(cols) + 2)]
    ranked = table.drop(index=[s for s in table.index if s in exclude_from_best], errors="ignore")
    best = {c: ranked[c].max() for c in cols}
    ref = table.loc[reference, AVERAGE] if reference is not None else np.nan
    for system, row in table.iterrows():
        cells = []
        for c in cols:
            v = row[c]
            text = "—" if pd.isna(v) else f"{v:.2f}"
            if not pd.isna(v) and system not in exclude_from_best and np.isclose(v, best[c]):
                text = f"**{text}**"
            cells.append(text)
        delta = row[AVERAGE] - ref
        cells.append("—" if pd.isna(delta) else f"{delta:+.2f}")
        lines.append(f"| {system} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def summary_markdown(df: pd.DataFrame, *, dataset: dict, split: str, base_systems: list[str],
                     oracle_systems: list[str], notes: list[str] = (),
                     paired: pd.DataFrame | None = None) -> str:
    targets = list(dataset["sources"])
    sdr, usdr_t = summary_tables(df, targets, base_systems)
    tracks = df["track"].nunique()
    ref = best_single(sdr, base_systems)
    ranked = sdr.drop(index=oracle_systems, errors="ignore")[AVERAGE].dropna()
    lines = [f"# Evaluation: {dataset['id']} — {split} split", "",
             f"- dataset: `{dataset['root']}` ({dataset['kind']}), split **{split}**, {tracks} tracks, "
             f"{dataset['sample_rate']} Hz",
             f"- base models: {', '.join(base_systems) or 'none'}",
             "- SDR: museval BSSEval v4 framewise SDR (1 s windows), median over frames, then median "
             "over tracks; uSDR: whole-track SDR (MDX21), mean over tracks.",
             "- **bold**: best per column (oracles excluded); Δ: average SDR minus the best single base "
             "model's.", ""]
    if len(ranked):
        best = ranked.idxmax()
        if ref is not None and best != ref:
            lines.append(f"**Best system: {best}** with {ranked[best]:.2f} dB average SDR, "
                         f"{ranked[best] - sdr.loc[ref, AVERAGE]:+.2f} dB over the best single base "
                         f"model ({ref}, {sdr.loc[ref, AVERAGE]:.2f} dB).")
        elif ref is not None:
            lines.append(f"**Best system: {best}**, the best single base model ({ranked[best]:.2f} dB "
                         f"average SDR); no ensemble beats it on this split.")
        else:
            lines.append(f"**Best system: {best}** ({ranked[best]:.2f} dB average SDR).")
        lines.append("")
    lines += ["## museval SDR (median over frames, median over tracks), dB", "",
              _markdown_table(sdr, ref, set(oracle_systems)), "",
              "## uSDR (whole-track SDR, mean over tracks), dB", "",
              _markdown_table(usdr_t, best_single(usdr_t, base_systems), set(oracle_systems)), ""]
    if paired is not None and not paired.empty:
        lines += [paired_markdown(paired, targets)]
    lines += [f"- {n}" for n in notes]
    return "\n".join(lines).rstrip() + "\n"


def write_scores(df: pd.DataFrame, out: Path, *, rate: int, subset_of: dict[str, str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "scores.csv", index=False)
    med = per_track(df).rename("value").reset_index()
    wide = med.pivot_table(index=["system", "track", "target"], columns="metric", values="value",
                           dropna=False).reset_index()
    wide.columns.name = None
    wide.rename(columns={"SDR": "SDR_median"}).to_csv(out / "per_track.csv", index=False)
    # museval-compatible JSON: <out>/museval/<system>/<subset>/<track>.json
    for (system, track), g in df[df.metric != "uSDR"].groupby(["system", "track"], sort=False):
        targets = {target: {m: gm.sort_values("frame")["value"].tolist()
                            for m, gm in gt.groupby("metric")}
                   for target, gt in g.groupby("target", sort=False)}
        safe = "".join(c if c.isalnum() or c in "-_. " else "_" for c in system)
        write_museval_json(out / "museval" / safe, track, museval_json(targets, win=rate, hop=rate, rate=rate),
                           subset=subset_of.get(track, "test"))


# ---- figures -------------------------------------------------------------------------------
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def boxplot_figure(df: pd.DataFrame, targets: list[str], path: Path) -> Path:
    plt = _plt()
    med = per_track(df[df.metric == "SDR"]).rename("value").reset_index()
    systems = list(df["system"].drop_duplicates())
    fig, axes = plt.subplots(1, len(targets), figsize=(3.2 * len(targets), 0.35 * len(systems) + 2.5),
                             sharey=True, squeeze=False)
    for ax, target in zip(axes[0], targets):
        data = [med[(med.system == s) & (med.target == target)]["value"].dropna().to_numpy() for s in systems]
        ax.boxplot([d if len(d) else [np.nan] for d in data], orientation="horizontal", showfliers=True)
        ax.set_title(target)
        ax.set_xlabel("SDR per track (dB)")
        ax.grid(axis="x", alpha=0.3)
    axes[0][0].set_yticks(range(1, len(systems) + 1), systems)
    axes[0][0].invert_yaxis()  # systems read top-down in the order of the summary table
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def heatmap_figure(matrices: list[tuple[str, np.ndarray]], inputs: list[str], outputs: list[str],
                   path: Path, symmetric: bool = True) -> Path:
    """Mixing weights with rows = input channels and columns = output channels."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(2.2 + 0.42 * len(outputs) * len(matrices),
                                                          1.5 + 0.2 * len(inputs)), squeeze=False)
    for ax, (title, W) in zip(axes[0], matrices):
        lim = float(np.nanmax(np.abs(W))) or 1.0
        im = ax.imshow(W, cmap="RdBu_r" if symmetric else "viridis", aspect="auto",
                       vmin=-lim if symmetric else 0, vmax=lim)
        ax.set_title(title, fontsize=9)
        ax.set_xticks(range(len(outputs)), outputs, rotation=90, fontsize=7)
        ax.set_yticks(range(len(inputs)), inputs if ax is axes[0][0] else [""] * len(inputs), fontsize=7)
        fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
