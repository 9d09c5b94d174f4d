"""The model card (MODEL.md) every trained base model carries, and its SDR sections.

`model_card` writes the card at export (architecture and loss lines come from the family's
recipe, `describe(config)`); `write_test_sdr` fills a museval-SDR section afterwards
(`separators.train_base.evaluate_trained`, scripts/train_shipped.py).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np

from core.errors import PipelineError

CARD = "MODEL.md"
SDR_BEGIN, SDR_END = "<!-- test-sdr -->", "<!-- /test-sdr -->"


def synthetic_info(root: str | None) -> dict | None:
    if not root:
        return None
    try:
        meta = json.loads((Path(root) / "dataset.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or "generator" not in meta:
        return None
    return {k: meta.get(k) for k in ("generator", "seed", "sizes", "duration", "sample_rate")}


def _fmt_seconds(s: float) -> str:
    return f"{s:.0f} s" if s < 120 else f"{s / 60:.1f} min"


def model_card(config: dict, summary: dict, files: list[Path], fam: str, loss: str) -> str:
    """The card's text; `fam` and `loss` are the family recipe's describe(config)."""
    d = summary
    lines = [
        f"# {config['family']}-{config['preset']}: {fam}",
        "",
        f"Trained with stem-ensemble's `train-base` on dataset `{d['dataset_id']}`.",
        "",
        "## Command",
        "",
        "```",
        d["command"],
        "```",
        "",
        "## Data",
        "",
        f"- dataset id: `{d['dataset_id']}` ({d['dataset_kind']}), root `{d['dataset_root']}`",
        f"- sample rate: {config['sample_rate']} Hz; sources {', '.join(d['sources'])}; "
        f"targets {', '.join(config['targets'])}",
        f"- train: {d['n_train']} tracks ({d['train_seconds']:.0f} s); validation: "
        f"{d['n_valid']} tracks ({d['valid_split']} split, {d['n_valid_items']} crops)",
    ]
    if d.get("synthetic"):
        s = d["synthetic"]
        lines.append(f"- synthetic dataset: {s['generator']}, seed {s['seed']}, sizes {s['sizes']}, "
                     f"{s['duration']} s per track at {s['sample_rate']} Hz")
    lines += [
        "",
        "## Training",
        "",
        f"- loss: {loss}",
        f"- seed {config['seed']}; {d['epochs']} epochs of {config['train']['examples_per_epoch']} "
        f"examples ({config['train']['segment']} s crops, batch {config['train']['batch_size']}); "
        f"best epoch {d['best_epoch']} (validation loss {d['best_valid']:.6g})",
        f"- training time: {_fmt_seconds(d['train_seconds_total'])} on {d['device']} "
        f"(world size {d['world_size']})",
        f"- parameters: {d['parameters']:,}",
        f"- files: {', '.join(p.name for p in files)}",
        f"- versions: {', '.join(f'{k} {v}' for k, v in d['versions'].items())}",
        "",
        "Configuration:",
        "",
        "```json",
        json.dumps(config, indent=2, sort_keys=True),
        "```",
        "",
        "## Test-split SDR",
        "",
        SDR_BEGIN,
        "Not evaluated yet: the evaluation step fills this section "
        "(`separators.train_base.evaluate_trained`).",
        SDR_END,
        "",
    ]
    return "\n".join(lines)


def write_test_sdr(model_dir: str | Path, scores: dict[str, float], *, dataset_id: str,
                   split: str = "test", n_tracks: int | None = None,
                   metric: str = "SDR (museval v4, median over frames, median over tracks)",
                   section: str = "test-sdr", title: str | None = None,
                   notes: list[str] | None = None) -> None:
    """Fill one SDR section of MODEL.md (between `<!-- section -->` markers) with per-source
    scores (dB). The test-SDR section is part of every card; another section is appended under
    `title` the first time and replaced afterwards."""
    card = Path(model_dir) / CARD
    text = card.read_text()
    begin, end = f"<!-- {section} -->", f"<!-- /{section} -->"
    if begin not in text or end not in text:
        if title is None:
            raise PipelineError(f"{card}: no {section} section to fill")
        text = text.rstrip("\n") + f"\n\n## {title}\n\n{begin}\n{end}\n"
    rows = ["| source | SDR (dB) |", "|---|---|"]
    rows += [f"| {s} | {v:.2f} |" for s, v in scores.items()]
    mean = float(np.nanmean(list(scores.values()))) if scores else float("nan")
    rows.append(f"| **mean** | **{mean:.2f}** |")
    body = [f"{metric} on the `{split}` split of `{dataset_id}`"
            + (f" ({n_tracks} tracks)" if n_tracks else "") + ":", ""] + rows
    if notes:
        body += [""] + list(notes)
    head, rest = text.split(begin, 1)
    _, tail = rest.split(end, 1)
    tmp = card.with_name(f".{card.name}.{os.getpid()}")
    tmp.write_text(head + begin + "\n" + "\n".join(body) + "\n" + end + tail)
    os.replace(tmp, card)


