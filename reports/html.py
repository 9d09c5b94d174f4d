"""report.html: the summary table, the figures and a player per track, in one static page.

The page is plain HTML that reads without JavaScript (tables, figures, links to every clip);
reports/static/report.js, written for this project and inlined like report.css, adds sorting,
the A/B player and the weight plots. Nothing refers outside the report folder: it opens from
disk (file://) with no server and no network.
"""
from __future__ import annotations

import html
import json
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from core.errors import PipelineError
from core.store import read_json
from reports.report import AVERAGE, best_single, summary_tables

PAIRED = "paired.csv"   # written by the evaluation when it has paired statistics
PAIRED_COLUMNS = ("system", "target", "reference", "n_tracks", "delta_mean", "ci_low", "ci_high",
                  "share_improved", "delta_median")


def _static(name: str) -> str:
    return resources.files("reports").joinpath("static", name).read_text(encoding="utf-8")


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(v) -> str:
    """A cell's sort value: the number, or empty for a missing one (sorted last)."""
    return "" if v is None or pd.isna(v) else f"{float(v):.6g}"


def _fmt(v, spec="{:.2f}") -> str:
    return "—" if v is None or pd.isna(v) else spec.format(v)


def _attr(name: str, value) -> str:
    return f' {name}="{_e(value)}"' if value else ""


def _table(table_id: str, header: list[str], rows: list[list[tuple[str, str, str]]], caption="") -> str:
    """A sortable table; each cell (text, sort value, css class)."""
    head = "".join(f'<th scope="col" tabindex="0">{_e(h)}</th>' for h in header)
    body = "\n".join("<tr>" + "".join(f'<td data-v="{_e(v)}"{_attr("class", c)}>{_e(t)}</td>'
                                       for t, v, c in row) + "</tr>" for row in rows)
    cap = f"<caption>{caption}</caption>" if caption else ""
    return (f'<table class="sortable" id="{table_id}">{cap}<thead><tr>{head}</tr></thead>'
            f"<tbody>\n{body}\n</tbody></table>")


def read_paired(out: Path) -> pd.DataFrame | None:
    path = out / PAIRED
    if not path.exists():
        return None
    df = pd.read_csv(path)
    missing = [c for c in PAIRED_COLUMNS if c not in df.columns]
    if missing:
        raise PipelineError(f"{path}: missing column(s) {', '.join(missing)}")
    return df


def summary_table(out: Path, targets: list[str], kinds: dict[str, str]) -> str:
    df = pd.read_csv(out / "scores.csv")
    bases = [s for s, k in kinds.items() if k == "base"]
    sdr, usdr_t = summary_tables(df, targets, bases)
    ref = best_single(sdr, bases)
    delta = sdr[AVERAGE] - (sdr.loc[ref, AVERAGE] if ref is not None else np.nan)
    paired = read_paired(out)
    pavg = paired[paired.target == AVERAGE].set_index("system") if paired is not None else None
    cols = [*sdr.columns]
    header = ["system", *cols, "Δ avg vs best single", "uSDR avg"]
    if pavg is not None:
        header += ["paired Δ avg [95 % CI]", "tracks improved", "median Δ"]
    ranked = [s for s in sdr.index if kinds.get(s) != "oracle"]
    best = {c: sdr.loc[ranked, c].max() for c in cols}
    rows = []
    for system in sdr.index:
        row = [(system, system, kinds.get(system, ""))]
        for c in cols:
            v = sdr.loc[system, c]
            is_best = kinds.get(system) != "oracle" and not pd.isna(v) and np.isclose(v, best[c])
            row.append((_fmt(v), _num(v), "best" if is_best else ""))
        row.append((_fmt(delta[system], "{:+.2f}"), _num(delta[system]), ""))
        u = usdr_t.loc[system, AVERAGE] if system in usdr_t.index else np.nan
        row.append((_fmt(u), _num(u), ""))
        if pavg is not None:
            p = pavg.loc[system] if system in pavg.index else None
            if p is None:
                row += [("—", "", "")] * 3
            else:
                row += [(f"{p.delta_mean:+.2f} [{p.ci_low:+.2f}, {p.ci_high:+.2f}]", _num(p.delta_mean),
                         "up" if p.ci_low > 0 else ("down" if p.ci_high < 0 else "")),
                        (_fmt(p.share_improved, "{:.0%}"), _num(p.share_improved), ""),
                        (_fmt(p.delta_median, "{:+.2f}"), _num(p.delta_median), "")]
        rows.append(row)
    caption = ("museval SDR in dB (median over 1 s frames, then over tracks); Δ: average SDR minus "
               f"the best single base model's ({_e(ref)}); uSDR: whole-track SDR, mean over tracks")
    if pavg is not None:
        caption += ("; paired: mean per-track Δ of the average SDR against the same reference, "
                    "95 % bootstrap interval, share of tracks improved, median Δ")
    html_ = _table("summary", header, rows, caption)
    if paired is not None:
        rows = [[(r.system, r.system, ""), (r.target, r.target, ""), (r.reference, r.reference, ""),
                 (str(r.n_tracks), _num(r.n_tracks), ""), (_fmt(r.delta_mean, "{:+.2f}"), _num(r.delta_mean), ""),
                 (_fmt(r.ci_low, "{:+.2f}"), _num(r.ci_low), ""), (_fmt(r.ci_high, "{:+.2f}"), _num(r.ci_high), ""),
                 (_fmt(r.share_improved, "{:.0%}"), _num(r.share_improved), ""),
                 (_fmt(r.delta_median, "{:+.2f}"), _num(r.delta_median), "")]
                for r in paired.itertuples()]
        # folded: one row per (system, target) would push the players a page down
        html_ += ("\n<details id=\"paired-details\"><summary><h3>Paired statistics per target</h3></summary>\n"
                  + _table("paired", ["system", "target", "reference", "tracks", "Δ mean", "95 % CI low",
                                      "95 % CI high", "improved", "Δ median"], rows,
                           "per-track SDR differences against the reference, 95 % bootstrap confidence interval of the mean")
                  + "\n</details>")
    return html_


def _clock(seconds: float) -> str:
    return f"{int(seconds // 60)}:{seconds % 60:04.1f}"


def track_section(i: int, track: dict, targets: list[str], listened: list[tuple[str, list[str]]],
                  sdr: dict) -> str:
    files = track["files"]
    name, dur = track["name"], track["duration"]

    def clip(href, label, text, title=""):
        return (f'<a class="clip" href="audio/{_e(href)}" data-label="{_e(label)}"'
                f'{_attr("title", title)}>{_e(text)}</a>')

    head = "".join(f"<th>{_e(t)}</th>" for t in targets)
    rows = [f'<tr><th>mixture</th><td colspan="{len(targets)}">'
            f'{clip(files["mixture"], "mixture", "mixture")}</td></tr>',
            "<tr><th>reference</th>" + "".join(
                f'<td>{clip(files["reference"][t], f"reference · {t}", t)}</td>' for t in targets) + "</tr>"]
    for system, have in listened:
        cells = []
        for t in targets:
            if t not in have:
                cells.append('<td class="none">—</td>')
                continue
            v = sdr.get((system, name, t))
            text = "▶" if v is None or pd.isna(v) else f"{v:.2f} dB"
            cells.append(f'<td>{clip(files["systems"][system][t], f"{system} · {t}", text, "SDR of the whole track (median over frames)")}</td>')
        rows.append(f"<tr><th>{_e(system)}</th>{''.join(cells)}</tr>")
    span = ("whole track" if dur >= track["track_duration"] - 1e-6 else
            f"excerpt {_clock(track['start'])}–{_clock(track['start'] + dur)} of {_clock(track['track_duration'])}")
    weights = "".join(f'<figure class="weights" data-w="{k}"><figcaption>{_e(w["system"])}: W_k over '
                      f'the excerpt (lines: weight of each input for its own target, mean of L and R; '
                      f'matrix: W_k at the play position, rows inputs, columns outputs)</figcaption>'
                      f'<div class="plots"><canvas class="lines"></canvas><canvas class="matrix"></canvas></div></figure>'
                      for k, w in enumerate(track["weights"]))
    return f"""<details class="track" data-index="{i}" data-duration="{dur:.6f}"{" open" if i == 0 else ""}>
<summary><span class="name">{_e(name)}</span> <span class="span">{span}</span></summary>
<div class="player"><button class="play" type="button" aria-label="play">▶</button>
<input class="seek" type="range" min="0" max="{dur:.3f}" step="0.01" value="0" aria-label="position">
<span class="time">{_clock(0)} / {_clock(dur)}</span> <span class="now">mixture</span></div>
<table class="clips"><thead><tr><th></th>{head}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table>{weights}
</details>"""


def write_page(out: Path, info: dict, *, split: str, kinds: dict[str, str],
               listened: list[tuple[str, list[str]]], tracks: list[dict], kbps: int) -> Path:
    """Write out/report.html from the report folder's files and the prepared tracks."""
    targets = list(info["sources"])
    per_track = pd.read_csv(out / "per_track.csv")
    sdr = {(r.system, r.track, r.target): r.SDR_median for r in per_track.itertuples()}
    evaluation = read_json(out / "evaluation.json") if (out / "evaluation.json").exists() else {}
    figures = [f for f in evaluation.get("figures", []) if (out / f).exists()]
    figs = "\n".join(f'<figure><img src="{_e(f)}" alt="{_e(f)}"><figcaption>{_e(f)}</figcaption></figure>'
                     for f in figures)
    data = {"tracks": [{"weights": t["weights"]} for t in tracks]}
    script_data = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = f"{info['id']} — {split} split"
    n_eval = len(evaluation.get("tracks", [])) or len(tracks)
    page = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>Listening report: {_e(title)}</title>
<style>{_static("report.css")}</style>
</head><body>
<header><h1>Listening report: {_e(title)}</h1>
<p>{_e(info.get('root', ''))} ({_e(info.get('kind', ''))}), {n_eval} tracks evaluated, {len(tracks)} to listen to,
{info['sample_rate']} Hz; audio: Opus {kbps} kbit/s in WebM.</p></header>
<section id="scores"><h2>Scores</h2>
<p class="hint">Click a column heading to sort.</p>
{summary_table(out, targets, kinds)}
</section>
<section id="tracks"><h2>Listen</h2>
<p class="hint">Click a cell to play that clip; clicking another switches at the same position
(A/B listening); the number is the system's SDR on the whole track. Space: play / pause the open track.</p>
{chr(10).join(track_section(i, t, targets, listened, sdr) for i, t in enumerate(tracks))}
</section>
<section id="figures"><h2>Figures</h2>{figs}</section>
<script type="application/json" id="report-data">{script_data}</script>
<script>{_static("report.js")}</script>
</body></html>
"""
    path = out / "report.html"
    tmp = out / ".report.html.tmp"
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path
