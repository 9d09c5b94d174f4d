"""The listening report: report.html beside summary.md, with every system's estimates playable.

This module gathers what the page plays and plots, from the stem store and an evaluation's
systems: one excerpt window per track (the same for every clip of the track, so an A/B switch
keeps the position), the compressed clips (reports.clips) and the MDX-Mixers' W_k over the
excerpt; reports.html then writes the page. The folder opens from disk (file://): no server,
no network.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from core.errors import PipelineError
from core.progress import progress_bar
from core.store import StemStore, TrackEntry, read_json
from mixer.inputs import CHANNELS
from reports.clips import (
    EXCERPT_S,
    EXTENSION,
    KBPS,
    MAX_MB,
    WHOLE_BELOW_S,
    ClipFolder,
    excerpt_window,
    fit_kbps,
)
from reports.html import write_page


@dataclass(frozen=True)
class ListeningOptions:
    tracks: tuple[str, ...] = ()        # empty: every evaluated track
    systems: tuple[str, ...] = ()       # empty: every evaluated system
    excerpt: float = EXCERPT_S          # seconds around the loudest part; 0: whole tracks
    whole_below: float = WHOLE_BELOW_S  # tracks shorter than this are played whole
    kbps: int = KBPS
    max_mb: float = MAX_MB              # the bitrate is lowered (down to clips.MIN_KBPS) to fit


def _choose(items: list, wanted, what: str, where: Path) -> list:
    if not wanted:
        return list(items)
    by_name = {i.name: i for i in items}
    unknown = [w for w in wanted if w not in by_name]
    if unknown:
        raise PipelineError(f"{where}: no {what} named {', '.join(map(repr, unknown))} in this "
                            f"evaluation (choose from {', '.join(map(repr, by_name))})")
    return [by_name[w] for w in dict.fromkeys(wanted)]


def _time_varying(method: str | None) -> bool:
    from mixer import methods

    return method in methods.names() and methods.get(method).time_varying


def track_weights(mixer, name: str, store: StemStore, dataset_id: str, track: TrackEntry,
                  start: int, length: int, rate: int) -> dict:
    """An MDX-Mixer's W_k for the segments overlapping the excerpt, for the page.

    'W' holds the full [in, out] matrices; 'lines' [[target, [[input, weights]...]]...]: per
    target, per input feeding it (each model's estimate of that target, and the mixture), its
    weight averaged over L and R, which the page draws over time under the player.
    """
    spec = mixer.spec
    stems = {k: store.stems(k, dataset_id, track) for k in spec.model_keys}
    W, starts = mixer.segment_weights(np.asarray(store.mixture(dataset_id, track)), stems)
    T = mixer.segment
    keep = (starts + T > start) & (starts < start + length)
    W, starts = W[keep], starts[keep]
    ins, outs = spec.input_names(), spec.output_names()
    lines = []     # lists, not dicts: the page draws them in this order
    for target in spec.targets:
        feeds = [("mixture", "mixture")] if spec.with_mixture else []
        feeds += [(m, f"{m}.{target}") for m, srcs in zip(spec.model_names, spec.model_sources)
                  if target in srcs]
        lines.append([target, [[label, np.round(np.mean([W[:, ins.index(f"{prefix}.{c}"),
                                                            outs.index(f"{target}.{c}")]
                                                         for c in CHANNELS], axis=0), 3).tolist()]
                               for label, prefix in feeds]])
    return {"system": name, "inputs": ins, "outputs": outs, "segment": T / rate,
            "starts": ((starts - start) / rate).round(4).tolist(),
            "W": np.round(W, 3).tolist(), "lines": lines}


class ListeningBuild:
    """One report.html in the making.

    Made before the evaluation scores anything, so that every estimate rendered for the scores
    is cut and encoded then (`estimate`, score_systems' on_render) instead of rendered twice;
    `finish` renders only what is still missing (the scores were cached, or the build is a
    `pipeline report`), computes the MDX-Mixers' weights and writes the page.
    `systems` are reports.evaluate.System objects (name, kind, targets, key, render, detail).
    """

    def __init__(self, out: Path, store: StemStore, dataset_id: str, systems: list,
                 tracks: list[TrackEntry], options: ListeningOptions = ListeningOptions()):
        self.out, self.store, self.dataset_id, self.systems = Path(out), store, dataset_id, systems
        info = store.dataset_info(dataset_id)
        self.rate, self.targets = info["sample_rate"], list(info["sources"])
        self.listened = _choose(systems, options.systems, "system", self.out)
        self.tracks = _choose(tracks, options.tracks, "track", self.out)
        self.windows = {t.name: excerpt_window(np.asarray(store.mixture(dataset_id, t)), self.rate,
                                               options.excerpt, options.whole_below) for t in self.tracks}
        clips_per_track = 1 + len(self.targets) + sum(len(s.targets) for s in self.listened)
        self.seconds = sum(n for _, n in self.windows.values()) / self.rate * clips_per_track
        self.max_mb = options.max_mb
        self.clips = ClipFolder(self.out / "audio", fit_kbps(self.seconds, options.max_mb, options.kbps))

    def _keys(self, system, track: TrackEntry) -> dict[str, str]:
        start, length = self.windows[track.name]
        return {target: self.clips.key(system.key(track), target, start, length) for target in system.targets}

    def estimate(self, system, track: TrackEntry, est: np.ndarray) -> dict[str, str] | None:
        """Encode the excerpt of a rendered estimate [targets, 2, n], if the page plays it."""
        if track.name not in self.windows or all(s is not system for s in self.listened):
            return None
        start, length = self.windows[track.name]
        names = {target: self.clips.add(key, est[i][:, start:start + length], self.rate)
                 for i, (target, key) in enumerate(self._keys(system, track).items())}
        self.clips.save_index()    # an interrupted evaluation keeps what was encoded so far
        return names

    def _weights(self, system, t: TrackEntry, mixers: dict, device) -> dict:
        start, length = self.windows[t.name]

        def compute():
            if system.name not in mixers:       # loaded only when a track's weights are missing
                from mixer.methods import load_mixer

                mixers[system.name] = load_mixer(Path(system.detail["run"]), device=device)
            return track_weights(mixers[system.name], system.name, self.store, self.dataset_id, t,
                                 start, length, self.rate)

        return self.clips.cached_json(self.clips.key("weights", system.key(t), start, length), compute)

    def _track(self, t: TrackEntry, mixers: dict, device) -> dict:
        store, ds, rate, clips = self.store, self.dataset_id, self.rate, self.clips
        start, length = self.windows[t.name]
        span = slice(start, start + length)
        track_sha = read_json(store.track_dir(ds, t) / "manifest.json")["sha256"]
        files = {"mixture": clips.add(clips.key("mixture", track_sha, start, length),
                                      store.mixture(ds, t)[:, span], rate)}
        refs = store.references(ds, t)
        files["reference"] = {s: clips.add(clips.key("reference", track_sha, s, start, length),
                                           refs[i][:, span], rate) for i, s in enumerate(self.targets)}
        files["systems"] = {}
        for s in self.listened:
            names = {target: clips.get(key) for target, key in self._keys(s, t).items()}
            files["systems"][s.name] = names if None not in names.values() else self.estimate(s, t, s.render(t))
        return {"name": t.name, "start": start / rate, "duration": length / rate,
                "track_duration": t.length / rate, "files": files,
                "weights": [self._weights(s, t, mixers, device) for s in self.listened
                            if s.kind == "run" and _time_varying(s.detail.get("method"))]}

    def finish(self, *, split: str, device=None, progress: bool = True) -> dict:
        """Encode what is missing, write out/report.html; returns what was written."""
        page_tracks, mixers = [], {}
        try:
            for t in progress_bar(self.tracks, desc="listening report", unit="track", disable=not progress):
                page_tracks.append(self._track(t, mixers, device))
                self.clips.flush()
            audio_bytes = self.clips.close()
        finally:
            self.clips.shutdown()
        page = write_page(self.out, self.store.dataset_info(self.dataset_id), split=split,
                          kinds={s.name: s.kind for s in self.systems},
                          listened=[(s.name, list(s.targets)) for s in self.listened],
                          tracks=page_tracks, kbps=self.clips.kbps)
        return {"path": page, "bytes": audio_bytes + page.stat().st_size, "kbps": self.clips.kbps,
                "clips": sum(n.endswith(EXTENSION) for n in self.clips.used), "encoded": self.clips.encoded,
                "tracks": len(self.tracks), "systems": len(self.listened), "seconds": self.seconds,
                "max_mb": self.max_mb}
