"""The separate stage: new songs through a trained ensemble (blend, conv1x1 or MDX-Mixer run).

The base models run through the stem cache, exactly as in the cache stage, so a file that was
separated before is not separated again:

* every input file becomes a track of the store dataset `files-<rate>` (the run's sample rate):
  its track name is `<sha256 of the file's bytes, 16 hex>-<file stem>`, so the same bytes map to
  the same entry whatever folder the file is in; its mixture (stereo, resampled to the run's
  rate) is stored by `cache.run.ingest_dataset`, with the usual atomic writes;
* for every model of the run whose stems are missing for some of these tracks, the model is
  re-loaded from the `load` record `cache_model` kept in its model.json (spec, repo, options),
  checked to have the very model key the run was trained on, and `cache.run.cache_model` stores
  its stems; models whose stems are all there are not even loaded;
* the run's mixer (`mixer.methods.load_mixer`) combines the stored stems, and each target is resampled
  back to the input's rate, trimmed to its length and written as DIR/<file stem>/<target>.<fmt>.

Memory: a file is held once at the run's rate (plus the memmapped stems); the base models use
their own chunking and learned mixers overlap-add segments, so any length works. Every output
path is checked before anything is written: without `force` an existing output stops the run
before any work, naming the file.
"""
from __future__ import annotations

import contextlib
import hashlib
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from core.audio import (
    audio_info,
    check_finite,
    read_audio,
    resample,
    to_stereo,
    write_audio,
)
from core.errors import PipelineError, fail
from core.store import StemStore, TrackEntry

FORMATS = ("wav", "flac")
FILES_SUBSET = "files"          # subset and split of the input files' tracks in the store
HASH_CHARS = 16


def files_dataset_id(rate: int) -> str:
    """The store dataset holding separated files at `rate` Hz (one per rate: one rate per dataset)."""
    return f"files-{int(rate)}"


# ---- the run ---------------------------------------------------------------------------------
def run_rate(config: dict, store: StemStore, run_dir: Path) -> int:
    """The sample rate the run's models and mixer work at: its dataset's rate."""
    if config.get("rate"):
        return int(config["rate"])
    dataset = config.get("dataset")
    if dataset and dataset in store.datasets():
        return int(store.dataset_info(dataset)["sample_rate"])
    if config.get("frame"):
        return int(config["frame"])    # a searched blend's museval frame: one second of its dataset
    raise PipelineError(f"{run_dir / 'config.json'}: no sample rate recorded and its dataset "
                        f"'{dataset}' is not in {store.root}")


def check_loadable(store: StemStore, key: str) -> dict:
    """model.json of a run's model, which must say how to load the model again."""
    info = store.model_info(key)
    name = info.get("name", key)
    if info.get("family") == "imported":
        raise PipelineError(f"model '{name}' [{key}]: imported estimates (separations made "
                            f"elsewhere for one dataset's tracks) cannot separate new audio; use a "
                            f"run whose models are all base models cached with `pipeline cache -m`")
    if not info.get("load") or not info["load"].get("spec"):
        raise PipelineError(f"model '{name}' [{key}]: model.json has no 'load' record (cached by an "
                            f"older version), so the model cannot be loaded again; run `pipeline "
                            f"cache -m SPEC` once more with the same model to record it")
    return info


# ---- the inputs ------------------------------------------------------------------------------
@dataclass
class InputFile:
    path: Path           # the file (for an array: a name to call it by)
    rate: int
    length: int          # samples at `rate`
    channels: int
    sha256: str
    samples: np.ndarray | None = None   # [channels, length] for audio given as an array

    @property
    def out_name(self) -> str:
        return self.path.stem

    def track_name(self) -> str:
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in self.path.stem)[:80]
        return f"{self.sha256[:HASH_CHARS]}-{stem.lstrip('.') or 'audio'}"

    def length_at(self, rate: int) -> int:
        # julius's resample_frac: floor(length * new / old)
        return self.length if rate == self.rate else (self.length * int(rate)) // self.rate

    def read(self) -> np.ndarray:
        """[channels, n] float32 at `rate`."""
        return self.samples if self.samples is not None else read_audio(self.path)[0]


def array_input(audio, rate: int, name: str = "audio") -> InputFile:
    """Audio given as an array: [n] (mono), [channels, n] with 1 or 2 channels, float."""
    x = np.asarray(audio, dtype=np.float32)
    x = x[None] if x.ndim == 1 else x
    where = f"audio array '{name}'"
    if x.ndim != 2 or x.shape[0] not in (1, 2):
        raise PipelineError(f"{where}: shape {tuple(np.shape(audio))}; expected [n] or [channels, n] "
                            f"with 1 or 2 channels")
    if x.shape[-1] == 0:
        raise PipelineError(f"{where}: empty audio (0 samples)")
    if not int(rate) > 0:
        raise PipelineError(f"{where}: sample rate {rate} must be a positive number of Hz")
    check_finite(x, where)
    h = hashlib.sha256(f"{int(rate)}:{x.shape}".encode())
    h.update(np.ascontiguousarray(x).tobytes())
    return InputFile(Path(name), int(rate), x.shape[-1], x.shape[0], h.hexdigest(), x)


def probe_input(path: str | Path, block: int = 1 << 18) -> InputFile:
    """Header, content hash and a streamed NaN / decode check; bad input fails naming the file."""
    import soundfile as sf

    path = Path(path)
    if path.is_dir():
        raise fail(path, "is a folder, not an audio file")
    rate, _, channels = audio_info(path)            # not found / unreadable / empty / truncated
    if channels > 2:
        raise fail(path, f"has {channels} channels; only mono and stereo are supported")
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    length = 0
    try:
        for data in sf.blocks(str(path), blocksize=block, dtype="float32", always_2d=True):
            check_finite(data.T, path)
            length += data.shape[0]
    except PipelineError:
        raise
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise fail(path, f"cannot decode audio ({reason})") from None
    if length == 0:
        raise fail(path, "empty audio (0 samples)")
    return InputFile(path, int(rate), length, int(channels), h.hexdigest())


def _fit(x: np.ndarray, n: int) -> np.ndarray:
    if x.shape[-1] >= n:
        return x[..., :n]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n - x.shape[-1])])


def load_for_run(item: InputFile, rate: int) -> np.ndarray:
    """The file as stereo float32 [2, n'] at the run's rate (n' = item.length_at(rate))."""
    x = to_stereo(item.read(), item.path)
    if x.shape[-1] != item.length:
        x = _fit(x, item.length)
    return _fit(resample(x, item.rate, rate), item.length_at(rate))


def output_paths(inputs: Sequence[InputFile], targets: Sequence[str], out: Path,
                 fmt: str) -> list[list[Path]]:
    folders: dict[Path, Path] = {}
    paths = []
    for item in inputs:
        folder = out / item.out_name
        if folder in folders:
            raise fail(item.path, f"writes to the same folder {folder} as {folders[folder]}; "
                                  f"give files with different names")
        folders[folder] = item.path
        paths.append([folder / f"{t}.{fmt}" for t in targets])
    return paths


# ---- the store -------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path):
    """An exclusive lock (flock) for dataset.json's read-modify-write by concurrent runs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        try:
            import fcntl
        except ImportError:   # not POSIX: concurrent separations may drop a listing entry
            yield
            return
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def files_dataset(store: StemStore, inputs: Sequence[InputFile], rate: int):
    """A `Dataset` of the input files at the run's rate, stored like any dataset.

    dataset.json keeps listing the files separated before (tracks still in the store) plus these;
    the mixture of a track not yet stored is read, resampled and written by ingest_dataset.
    Returns the Dataset of these inputs' tracks (in input order, without repeats).
    """
    from cache.run import ingest_dataset
    from core.datasets import Dataset, Track

    ds_id = files_dataset_id(rate)
    root = store.dataset_dir(ds_id)

    def track(name, length, reader):
        return Track(name, FILES_SUBSET, FILES_SUBSET, (), reader, lambda: (rate, length))

    def reader_of(item: InputFile):
        def read(start: int = 0, frames: int | None = None):
            mix = load_for_run(item, rate)
            mix = mix[:, start:None if frames is None else start + frames]
            return mix, np.zeros((0,) + mix.shape, dtype=np.float32)
        return read

    def stored_only(name):
        def read(start=0, frames=None):   # never called: only stored tracks are listed
            raise PipelineError(f"{root}: track {name} is not stored")
        return read

    mine: dict[str, Track] = {}
    for item in inputs:
        name = item.track_name()
        if name not in mine:
            if item.length_at(rate) < 1:
                raise fail(item.path, f"too short: {item.length} samples at {item.rate} Hz is no "
                                      f"sample at the run's {rate} Hz")
            mine[name] = track(name, item.length_at(rate), reader_of(item))
    with _locked(root / ".lock"):
        listed = []
        if (root / "dataset.json").exists():
            listed = [track(t.name, t.length, stored_only(t.name)) for t in store.tracks(ds_id)
                      if t.name not in mine and store.has_track(ds_id, TrackEntry(
                          t.name, t.subset, t.split, t.length))]
        everything = Dataset(root, "files", listed + list(mine.values()), ())
        everything.id = ds_id
        ingest_dataset(store, everything, progress=False)
    ours = Dataset(root, "files", list(mine.values()), ())
    ours.id = ds_id
    return ours


def cache_run_models(store: StemStore, dataset, model_keys: Sequence[str], *, device="cpu",
                     offline: bool = False, log: Callable[[str], None] = print) -> list[dict]:
    """Make sure every model of the run has stems for the dataset's tracks; re-run only those
    missing. Returns cache_model's summary per model (computed / skipped tracks)."""
    from cache.run import cache_spec, entry_of

    summaries = []
    for key in model_keys:
        info = store.model_info(key)
        missing = [t for t in dataset.tracks if not store.has_stems(key, dataset.id, entry_of(t))]
        if not missing:
            summaries.append({"key": key, "name": info.get("name", key), "computed": 0,
                              "skipped": len(dataset.tracks), "seconds": 0.0})
            continue
        info = check_loadable(store, key)
        load = info["load"]
        name = info.get("name", key)
        log(f"  {name}: separating {len(missing)} new file(s) "
            f"({_duration(sum(t.duration for t in missing))} of audio) ...")
        try:
            s, = cache_spec(store, dataset, load["spec"], device=device, offline=offline,
                            repo=load.get("repo"), options=load.get("options") or {},
                            progress=False, expect_key=key)
        except PipelineError as e:
            raise PipelineError(f"model '{name}' [{key}] (cached from '{load['spec']}'): cannot "
                                f"load it again: {e}") from None
        summaries.append(s)
        log(f"  {name}: separated {s['computed']} file(s), {s['skipped']} already cached "
            f"({s['seconds']:.1f} s)")
        _free(device)
    return summaries


def _free(device) -> None:
    import torch

    if str(device).startswith("cuda") and torch.cuda.is_available():
        torch.cuda.empty_cache()


# ---- the stage -------------------------------------------------------------------------------
def _duration(seconds: float) -> str:
    m, s = divmod(seconds, 60)
    return f"{int(m)}:{s:04.1f}"


class EnsembleRun:
    """A run folder with the stem store it was fitted on: separates inputs (files or arrays)
    through the base models' stem cache and the run's mixer."""

    def __init__(self, run: str | Path, work: Path, *, device="cpu", offline: bool = False,
                 consistency: str | None = None, log: Callable[[str], None] = print):
        from core.config import find_run, store_dir
        from mixer.methods import load_config

        self.store = StemStore(store_dir(work))
        self.run_dir = find_run(run, work)
        self.config = load_config(self.run_dir)
        self.keys = list(self.config["inputs"]["model_keys"])
        self.targets = list(self.config["inputs"]["targets"])
        for key in self.keys:
            info = self.store.model_info(key)   # a run fitted against another store fails here
            if info.get("family") == "imported":
                check_loadable(self.store, key)
        self.rate = run_rate(self.config, self.store, self.run_dir)
        self.device, self.offline, self.log = device, offline, log
        self.consistency = consistency
        if consistency not in (None, "none"):   # the run's dataset tells whether it makes sense
            from mixer.consistency import check

            found = check(self.store, self.config["dataset"], consistency)
            log(f"consistency {consistency}: the estimates are projected onto each mixture (the "
                f"sources of {self.config['dataset']} sum to its mixture within "
                f"{found['sources_vs_mixture_db']} dB)")
        self._mixer = None

    @property
    def mixer(self):
        from mixer.methods import load_mixer

        if self._mixer is None:
            self._mixer = load_mixer(self.run_dir, device=self.device,
                                     consistency=self.consistency)
        return self._mixer

    def separate(self, inputs: Sequence[InputFile]):
        """(summaries of the base models' caching, then per input: (item, estimates [S, 2, n]
        float32 at the input's rate and length)) - the estimates one input at a time."""
        from cache.run import entry_of

        dataset = files_dataset(self.store, inputs, self.rate)
        by_name = {t.name: t for t in dataset.tracks}
        summaries = cache_run_models(self.store, dataset, self.keys, device=self.device,
                                     offline=self.offline, log=self.log)

        def estimates():
            for item in inputs:
                entry = entry_of(by_name[item.track_name()])
                # positional reads, no memory maps: the mixer reads one segment at a time, and
                # memory stays at the estimates plus a few segments however long the file is
                with contextlib.ExitStack() as files:
                    mixture = files.enter_context(self.store.mixture_file(dataset.id, entry))
                    stems = {k: files.enter_context(self.store.stems_file(k, dataset.id, entry))
                             for k in self.keys}
                    y = self.mixer(mixture, stems)
                yield item, np.stack([_fit(resample(np.ascontiguousarray(e), self.rate, item.rate),
                                           item.length) for e in y])

        return summaries, dataset, estimates()


def separate_files(files: Sequence[str | Path], run: str | Path, out: str | Path, *,
                   work: Path, force: bool = False, device="cpu", offline: bool = False,
                   fmt: str = "wav", consistency: str | None = None,
                   log: Callable[[str], None] = print) -> dict:
    """Separate audio files with a run; write out/<file stem>/<target>.<fmt>. Returns a summary."""
    t_start = time.perf_counter()
    fmt = fmt.lower().lstrip(".")
    if fmt not in FORMATS:
        raise PipelineError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if not files:
        raise PipelineError("pipeline separate: no input files given")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise fail(out, "exists and is not a folder")
    ensemble = EnsembleRun(run, work, device=device, offline=offline, consistency=consistency,
                           log=log)
    targets = ensemble.targets

    inputs = [probe_input(f) for f in files]
    paths = output_paths(inputs, targets, out, fmt)
    if not force:
        existing = [p for group in paths for p in group if p.exists()]
        if existing:
            more = f" (and {len(existing) - 1} more)" if len(existing) > 1 else ""
            raise fail(existing[0], f"already exists{more}; pass --force to overwrite (nothing "
                                    f"was written)")

    summaries, dataset, estimates = ensemble.separate(inputs)
    total_audio = 0.0
    t0 = time.perf_counter()
    for i, ((item, est), group) in enumerate(zip(estimates, paths), 1):
        for path, y in zip(group, est):
            if fmt == "flac":
                y = np.clip(y, -1.0, 1.0)   # 24-bit PCM: clip rather than wrap around
            write_audio(path, y, item.rate, overwrite=force)
        seconds = item.length / item.rate
        total_audio += seconds
        kind = "mono" if item.channels == 1 else "stereo"
        log(f"[{i}/{len(inputs)}] {item.path} ({_duration(seconds)}, {item.rate} Hz {kind}) -> "
            f"{group[0].parent}/{{{','.join(targets)}}}.{fmt} ({time.perf_counter() - t0:.1f} s)")
        t0 = time.perf_counter()
    ran = sum(s["computed"] for s in summaries)
    pairs = len(ensemble.keys) * len(dataset.tracks)
    wall = time.perf_counter() - t_start
    method, run_dir = ensemble.config["method"], ensemble.run_dir
    log(f"separated {len(inputs)} file(s) ({_duration(total_audio)} of audio) with "
        f"{method} run {run_dir} in {wall:.1f} s: base models ran on {ran} of {pairs} "
        f"(model, file) pairs, {pairs - ran} came from the stem cache; outputs in {out}")
    return {"run": str(run_dir), "method": method, "rate": ensemble.rate, "files": len(inputs),
            "dataset": dataset.id, "tracks": [t.name for t in dataset.tracks],
            "outputs": [[str(p) for p in g] for g in paths], "models": summaries,
            "computed": ran, "cached": pairs - ran, "seconds": wall}
