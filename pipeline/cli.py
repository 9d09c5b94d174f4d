"""The `pipeline` command line: one command per stage; stages talk only through the work folder."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from core.config import default_device, store_dir, work_dir
from core.datasets import SYNTHETIC, open_dataset_spec
from core.errors import PipelineError
from reports.clips import EXCERPT_S, KBPS, MAX_MB, WHOLE_BELOW_S

app = typer.Typer(add_completion=False, rich_markup_mode="rich", no_args_is_help=True,
                  help="Ensemble music source separators: cache base models' stems, blend / learn "
                       "mixing weights, evaluate with museval-exact SDR, separate new songs.")
cache_app = typer.Typer(rich_markup_mode="rich", invoke_without_command=True,
                        help="Run base separators once over a dataset and keep their stems in the "
                             "stem store ([bold]ls[/], [bold]verify[/], [bold]import[/] manage it).")
app.add_typer(cache_app, name="cache")
console = Console(stderr=True)
_state = {"debug": False}

WorkOpt = typer.Option(None, "--work", envvar="PIPELINE_WORK",
                       help="Work folder for all outputs (default ./work).")


@app.callback()
def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


@app.command("make-dataset")
def make_dataset(
    out: Optional[Path] = typer.Argument(None, help="Output folder (default <work>/data/synthetic)."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives bit-identical files."),
    train: int = typer.Option(28, help="Tracks in the train split."),
    valid: int = typer.Option(6, help="Tracks in the valid split."),
    test: int = typer.Option(6, help="Tracks in the test split."),
    duration: float = typer.Option(20.0, help="Seconds per track."),
    rate: int = typer.Option(44100, help="Sample rate in Hz."),
    force: bool = typer.Option(False, "--force", help="Regenerate over an existing dataset."),
    work: Optional[Path] = WorkOpt,
):
    """Generate the embedded synthetic multitrack dataset (MUSDB18-HQ layout, train/valid/test)."""
    from core.synth import generate_dataset

    out = out or work_dir(work) / "data" / SYNTHETIC
    generate_dataset(out, seed=seed, n_train=train, n_valid=valid, n_test=test,
                     duration=duration, sample_rate=rate, overwrite=force)
    console.print(f"dataset ready: {out}")


@cache_app.callback()
def cache(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d",
                                          help="Dataset folder, or 'synthetic'."),
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="Base model: a pretrained name (htdemucs, umxl, ...), a "
                                         "shipped checkpoint name, or a local path. Repeatable."),
    split: List[str] = typer.Option([], "--split", help="Only these splits (train/valid/test)."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    offline: bool = typer.Option(False, "--offline", help="Never download; fail fast on missing weights."),
    repo: Optional[Path] = typer.Option(None, help="Local folder with model weights (demucs --repo)."),
    shifts: Optional[int] = typer.Option(None, help="Demucs: random shifts."),
    overlap: Optional[float] = typer.Option(None, help="Demucs: chunk overlap."),
    segment: Optional[float] = typer.Option(None, help="Chunk length in seconds."),
    niter: Optional[int] = typer.Option(None, help="Open-Unmix / X-UMX: Wiener iterations."),
    shard: Optional[str] = typer.Option(None, help="I/N: this process's share of the tracks "
                                                   "(default from torchrun's RANK/WORLD_SIZE)."),
    force: bool = typer.Option(False, "--force", help="Recompute complete entries."),
    work: Optional[Path] = WorkOpt,
):
    """Cache base models' stems for a dataset (also stores the dataset's mixture and references)."""
    if ctx.invoked_subcommand is not None:
        return
    if dataset is None:
        raise PipelineError("pipeline cache: --dataset is required (a folder, or 'synthetic')")
    from cache.run import cache_model, ingest_dataset, parse_shard
    from core.store import StemStore

    w = work_dir(work)
    store = StemStore(store_dir(w))
    ds = open_dataset_spec(dataset, w)
    shard_ = parse_shard(shard)
    n = ingest_dataset(store, ds, shard=shard_, force=force)
    console.print(f"{ds.id}: {len(ds)} tracks in the store ({n} written now)")
    if model:
        from separators.registry import load_separator

        dev = device or default_device()
        options = {k: v for k, v in dict(shifts=shifts, overlap=overlap, segment=segment,
                                          niter=niter).items() if v is not None}
        for spec in model:
            sep = load_separator(spec, device=dev, offline=offline, repo=repo, options=options)
            # An existing path is kept absolute so `separate` can re-load it from any folder.
            spec_ = str(Path(spec).resolve()) if Path(spec).exists() else spec
            load = {"spec": spec_, "repo": str(repo.resolve()) if repo else None, "options": options}
            s = cache_model(store, ds, sep, shard=shard_, force=force, splits=split or None, load=load)
            console.print(f"{s['name']} [{s['key']}]: {s['computed']} tracks separated, "
                          f"{s['skipped']} already cached, {s['seconds']:.1f} s "
                          f"({s['realtime']:.2f}x real time)")


@cache_app.command("import")
def cache_import(
    folder: Path = typer.Argument(..., help="Estimates: DIR/<subset>/<track>/<target>.wav or DIR/<track>/<target>.wav"),
    name: str = typer.Option(..., "--name", help="Name of the imported system."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="The dataset the estimates belong to."),
    split: List[str] = typer.Option([], "--split", help="Only these splits."),
    work: Optional[Path] = WorkOpt,
):
    """Register separations made elsewhere as a base model in the stem store."""
    from cache.imported import import_estimates
    from cache.run import ingest_dataset
    from core.store import StemStore

    w = work_dir(work)
    store = StemStore(store_dir(w))
    ds = open_dataset_spec(dataset, w)
    ingest_dataset(store, ds, progress=False)
    s = import_estimates(store, ds, name, folder, splits=split or None)
    console.print(f"{name} [{s['key']}]: {s['computed']} tracks imported "
                  f"({', '.join(s['sources'])}), {s['skipped']} already there")


@cache_app.command("ls")
def cache_ls(work: Optional[Path] = WorkOpt):
    """List the datasets and models in the stem store, with track counts and sizes."""
    from rich.table import Table

    from core.store import StemStore

    store = StemStore(store_dir(work_dir(work)))
    table = Table(title=f"stem store {store.root}")
    for col in ("kind", "key", "name / sources", "dataset", "tracks", "size"):
        table.add_column(col)
    for d in store.datasets():
        info = store.dataset_info(d)
        stored = sum(store.has_track(d, t) for t in store.tracks(d))
        table.add_row("dataset", d, ", ".join(info["sources"]), info["root"],
                      f"{stored}/{len(info['tracks'])}", _size(store.dataset_dir(d)))
    for k in store.models():
        info = store.model_info(k)
        for d in sorted(p.name for p in store.model_dir(k).iterdir() if p.is_dir()):
            n = sum(1 for _ in (store.model_dir(k) / d).glob("*/*/manifest.json"))
            table.add_row("model", k, f"{info['name']}: {', '.join(info['sources'])}", d, str(n),
                          _size(store.model_dir(k) / d))
    Console().print(table)


def _size(path: Path) -> str:
    total = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1024 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024


@cache_app.command("verify")
def cache_verify(work: Optional[Path] = WorkOpt):
    """Check every store entry (array readable, shape, length, checksum); non-zero exit on damage."""
    from core.store import StemStore

    store = StemStore(store_dir(work_dir(work)))
    problems, n = [], 0
    for entry in store.entries():
        n += 1
        problem = store.verify_entry(entry)
        if problem:
            problems.append(problem)
            console.print(f"[red]BAD[/] {problem}")
    console.print(f"{n} entries checked, {len(problems)} damaged")
    if problems:
        raise typer.Exit(1)


CONFIGS = Path(__file__).resolve().parent / "configs"


@app.command("run")
def run_cmd(
    config: Path = typer.Argument(..., help="Experiment file (TOML or YAML); see pipeline/configs/."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the file's, else cuda when available)."),
    work: Optional[Path] = WorkOpt,
):
    """Run an experiment: dataset -> cache -> blend / mixers -> evaluation report, skipping done work."""
    from pipeline.experiment import load_experiment, run_experiment

    result = run_experiment(load_experiment(config), work_dir(work), device=device,
                            log=lambda m: console.print(m, highlight=False, markup=False))
    Console().print(result["summary"])
    console.print(f"report: {result['out']} ({result['seconds']:.0f} s)")
    _print_listening(result.get("listening"))


def _print_listening(listening: Optional[dict]) -> None:
    if listening:
        console.print(f"listening report ({listening['bytes'] / 1e6:.1f} MB, {listening['clips']} clips "
                      f"at {listening['kbps']} kbit/s, {listening['encoded']} newly encoded; open it "
                      f"in a browser): {listening['path']}",
                      highlight=False, soft_wrap=True)
        if listening["bytes"] > listening["max_mb"] * 1e6:
            console.print(f"note: over the {listening['max_mb']:g} MB budget even at the lowest bitrate; "
                          f"`pipeline report` can choose fewer tracks (--track), systems (--system) or a "
                          f"shorter --excerpt", highlight=False, soft_wrap=True)


@app.command("demo")
def demo(
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    work: Optional[Path] = WorkOpt,
):
    """The whole pipeline offline on the embedded synthetic dataset with the shipped base models."""
    run_cmd(CONFIGS / "demo.toml", device=device, work=work)


@app.command("separate")
def separate_cmd(
    files: List[Path] = typer.Argument(..., help="Audio files to separate (wav, flac, ...; mono or stereo, any rate)."),
    ensemble: str = typer.Option(..., "--ensemble", "-e", help="Run folder (blend, conv1x1, mdx-mixer) or a run name under <work>/runs."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/<file stem>/<target>.<format>."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    offline: bool = typer.Option(False, "--offline", help="Never download; fail fast on missing weights."),
    fmt: str = typer.Option("wav", "--format", help="wav (32-bit float) or flac (24-bit)."),
    work: Optional[Path] = WorkOpt,
):
    """Separate new songs with a trained ensemble; base models run through the stem cache."""
    from pipeline.separate import separate_files

    separate_files(files, ensemble, out, work=work_dir(work), force=force,
                   device=device or default_device(), offline=offline, fmt=fmt,
                   log=lambda line: console.print(line, markup=False, highlight=False, soft_wrap=True))


def store_dataset_id(spec: str, work: Path, ingest: bool = False) -> str:
    """A dataset id in the store, from an id or from the dataset's folder / 'synthetic'.

    ingest: a dataset not yet in the store is stored first (as `pipeline cache -d` does), for
    stages that read only the dataset's own audio; else that is an error saying so.
    """
    from core.store import StemStore

    store = StemStore(store_dir(work))
    if spec in store.datasets():
        return spec
    ds = open_dataset_spec(spec, work)
    if ingest:
        from cache.run import ingest_dataset

        ingest_dataset(store, ds)
    else:
        store.dataset_info(ds.id)  # a clear error when it was never cached
    return ds.id


def _run_dir(work: Path, name: str, out: Optional[Path]) -> Path:
    from core.config import check_name, runs_dir

    return out or runs_dir(work) / check_name(name, "--name")


ModelsOpt = typer.Option(..., "--model", "-m", help="Cached base model (name or store key). Repeatable.")
DatasetOpt = typer.Option("synthetic", "--dataset", "-d", help="Dataset (store id, folder, or 'synthetic').")


@app.command("train-base")
def train_base_cmd(
    family: str = typer.Option(..., "--family", "-f", help="umx (Open-Unmix), xumx (X-UMX), demucs (HDemucs / HTDemucs) or roformer (BS-/Mel-RoFormer, saved in MSST format)."),
    dataset: str = DatasetOpt,
    name: Optional[str] = typer.Option(None, help="Run name (default <family>-<preset>): <work>/runs/NAME."),
    preset: str = typer.Option("small", help="tiny (tests), small (~15-30 min on 2 CPU cores), paper (GPU)."),
    arch: Optional[str] = typer.Option(None, help="Demucs: hdemucs or htdemucs; roformer: bs_roformer or mel_band_roformer."),
    xumx_loss: Optional[str] = typer.Option(None, help="X-UMX: magnitude (paper) or complex (Danna-Sep)."),
    target: List[str] = typer.Option([], "--target", help="Only these sources (default all)."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (override the preset; raise it to train a finished run longer)."),
    batch: Optional[int] = typer.Option(None, help="Batch size (override the preset)."),
    segment: Optional[float] = typer.Option(None, help="Training crop, seconds (override the preset)."),
    lr: Optional[float] = typer.Option(None, help="Learning rate (override the preset)."),
    seed: int = typer.Option(0, help="Random seed (weights, data order, augmentation)."),
    select_split: Optional[str] = typer.Option(None, "--select-split", help="Split whose loss picks the best epoch: valid (default when the dataset has one), select (a fixed tenth of train; the rest trains) or train."),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    amp: str = typer.Option("off", help="Mixed precision on GPU: off, auto, bf16, fp16."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default <work>/runs/NAME)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming an existing run."),
    work: Optional[Path] = WorkOpt,
):
    """Train a base separator of one family on a cached dataset; the model lands in RUN/model/."""
    from core.store import StemStore
    from separators.train_base import family_of, train_base

    w = work_dir(work)
    family_of(family)   # a typo fails before the dataset is ingested
    run = _run_dir(w, name or f"{family}-{preset}", out)
    if fresh and run.exists() and (run / "config.json").exists():
        raise PipelineError(f"{run}: run folder exists; remove it or choose another --name to start over")
    ds_id = store_dataset_id(dataset, w, ingest=True)
    result = train_base(StemStore(store_dir(w)), ds_id, family, preset, run,
                        targets=target or None, seed=seed, epochs=epochs, batch_size=batch,
                        segment=segment, lr=lr, arch=arch, xumx_loss=xumx_loss,
                        device=device or default_device(), resume=not fresh, amp=amp,
                        num_workers=workers, select_split=select_split,
                        command="pipeline " + " ".join(sys.argv[1:]))
    console.print(f"model written to {result.model_dir} (best epoch {result.best_epoch}, "
                  f"valid loss {result.best_valid:.4g}); use it with `pipeline cache -m {result.model_dir}`")


@app.command("blend")
def blend(
    model: List[str] = ModelsOpt,
    dataset: str = DatasetOpt,
    method: str = typer.Option("blend", help="blend (Danna-Sep: per-source weights searched), band-blend (per-source, per-band weights searched), or MSST's / UVR's avg-wave, median-wave, min-wave, max-wave, avg-spec, median-spec, min-spec (UVR Min Spec), max-spec (UVR Max Spec)."),
    name: Optional[str] = typer.Option(None, help="Run name (default: the method): the run folder is <work>/runs/NAME."),
    step: float = typer.Option(0.05, help="blend, band-blend: grid step on the weight simplex."),
    objective: str = typer.Option("museval", help="blend, band-blend: museval (median/median framewise SDR) or usdr (mean whole-track SDR)."),
    split: Optional[str] = typer.Option(None, help="blend, band-blend: split to search on (default valid for blend, select for band-blend)."),
    bands: int = typer.Option(8, help="band-blend: number of frequency bands."),
    band_scale: str = typer.Option("mel", help="band-blend: mel or octave band spacing."),
    weights: Optional[str] = typer.Option(None, help="avg-wave, avg-spec: one weight per model, in -m order, e.g. 2,1,1 (default equal)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default <work>/runs/NAME)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing run folder."),
    work: Optional[Path] = WorkOpt,
):
    """Ensembles that train nothing: the Danna-Sep blend, the band-wise blend, spectral ensembles."""
    from core.store import StemStore
    from mixer.methods import build

    w = work_dir(work)
    run = _run_dir(w, name or method, out)
    if (run / "config.json").exists() and not force:
        raise PipelineError(f"{run}: run folder exists; pass --force to overwrite or choose another --name")
    try:
        parsed = None if weights is None else [float(v) for v in weights.split(",")]
    except ValueError:
        raise PipelineError(f"--weights {weights}: expected numbers separated by commas, e.g. 2,1,1") from None
    config = build(StemStore(store_dir(w)), store_dataset_id(dataset, w), model, method, run,
                   {"step": step, "objective": objective, "split": split, "bands": bands,
                    "band_scale": band_scale, "weights": parsed})
    if (run / "weights.md").exists():
        Console().print((run / "weights.md").read_text())
    console.print(f"{config['method']} run written to {run}")


@app.command("select-models")
def select_models_cmd(
    model: List[str] = ModelsOpt,
    dataset: str = DatasetOpt,
    by: str = typer.Option("blend", help="blend (the best Danna-Sep blend of the set) or conv1x1 (a least-squares conv1x1 over the set and the mixture)."),
    split: str = typer.Option("select", help="Split the sets are scored on (select: a fixed tenth of train)."),
    objective: str = typer.Option("museval", help="museval (median/median framewise SDR) or usdr."),
    step: float = typer.Option(0.1, help="--by blend: grid step of each blend search."),
    min_gain: float = typer.Option(0.01, help="Add a model only if it gains more than this (dB); backward elimination drops one that costs no more."),
    backward: bool = typer.Option(False, "--backward", help="After adding, drop models whose removal costs at most --min-gain."),
    name: Optional[str] = typer.Option(None, help="Selection name (default: the --by scorer): the file is <work>/selections/NAME.json."),
    out: Optional[Path] = typer.Option(None, help="Selection file (default <work>/selections/NAME.json)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing selection file."),
    work: Optional[Path] = WorkOpt,
):
    """Choose base models by greedy forward selection on the selection split; write the list."""
    from core.config import check_name
    from core.store import StemStore
    from mixer.select import select_models

    w = work_dir(work)
    path = out or w / "selections" / f"{check_name(name or by, '--name')}.json"
    if path.exists() and not force:
        raise PipelineError(f"{path}: selection file exists; pass --force to overwrite or choose another --name")
    result = select_models(StemStore(store_dir(w)), store_dataset_id(dataset, w), model, by=by,
                           split=split, objective=objective, step=step, min_gain=min_gain,
                           backward=backward, out=path,
                           log=lambda line: console.print(line, markup=False, highlight=False))
    console.print(f"chose {', '.join(m['name'] for m in result['models'])} "
                  f"({objective} SDR {result['score']:.3f} dB); written to {path}\n"
                  f"use it in an experiment file: models_from = \"{path}\"", markup=False, highlight=False)


@app.command("train-mixer")
def train_mixer_cmd(
    model: List[str] = ModelsOpt,
    arch: str = typer.Option("mdx-mixer", help="conv1x1 (time-invariant) or mdx-mixer (time-varying)."),
    dataset: str = DatasetOpt,
    name: Optional[str] = typer.Option(None, help="Run name (default: the architecture and preset)."),
    preset: str = typer.Option("cpu", help="paper (T=2^18,F=2^7,N=8), ablation-17, ablation-16, cpu (T=2^16,F=2^5,N=2), demo (T=2^14,F=2^5,N=1), tiny."),
    T: Optional[int] = typer.Option(None, "-T", help="Segment length in samples (overrides the preset)."),
    F: Optional[int] = typer.Option(None, "-F", help="Fold factor (overrides the preset)."),
    N: Optional[int] = typer.Option(None, "-N", help="MLP-Mixer layers (overrides the preset)."),
    p: float = typer.Option(0.0, "-p", help="Dropout."),
    with_mixture: bool = typer.Option(True, "--with-mixture/--without-mixture", help="Feed the mixture as input channels."),
    epochs: Optional[int] = typer.Option(None, help="Epochs (default 50 conv1x1, 100 mdx-mixer)."),
    batch: int = typer.Option(4, help="Batch size per device."),
    lr: float = typer.Option(3e-4, help="Adam learning rate."),
    shift: int = typer.Option(2 ** 15, help="Shift between training segments, samples."),
    max_segments: Optional[int] = typer.Option(None, help="Cap on training segments per epoch."),
    workers: int = typer.Option(0, help="DataLoader worker processes."),
    seed: int = typer.Option(0, help="Random seed."),
    init: str = typer.Option("average", help="average: start from the models' uniform average; random: PyTorch's init (the paper's)."),
    select: str = typer.Option("valid", help="Keep the epoch with the lowest loss on this split: valid, select (a fixed tenth of train; the mixer trains on the rest), test or train; or 'last' (no held-out split is read). Use select or last when valid is your evaluation split."),
    base: Optional[str] = typer.Option(None, help="mdx-mixer: a finished conv1x1 run (folder or name) on the same inputs; the MDX-Mixer then learns per-segment corrections of its W (W_k = W + ΔW_k)."),
    penalty: float = typer.Option(0.0, help="With --base: weight of the penalty on the corrections ΔW_k."),
    penalty_norm: str = typer.Option("l2", help="With --base: l2 (mean square) or l1 (mean absolute) penalty."),
    lr_schedule: str = typer.Option("constant", help="constant, or cosine (per epoch, down to lr/10)."),
    weight_decay: float = typer.Option(0.0, help="Adam weight decay."),
    jitter: bool = typer.Option(False, "--jitter", help="Start each training segment at a random offset (0..shift-1) drawn anew every epoch."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default <work>/runs/NAME)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming an existing run."),
    work: Optional[Path] = WorkOpt,
):
    """Train a conv1x1 or MDX-Mixer mixing-weight estimator on cached stems (resumes when re-run)."""
    from core.store import StemStore
    from mixer.train import train_mixer

    w = work_dir(work)
    run = _run_dir(w, name or f"{arch}-{preset}", out)
    result = train_mixer(StemStore(store_dir(w)), store_dataset_id(dataset, w), model, arch, run,
                         with_mixture=with_mixture, preset=preset, T=T, F=F, N=N, p=p, epochs=epochs,
                         batch=batch, lr=lr, shift=shift, seed=seed, device=device or default_device(),
                         resume=not fresh, max_segments_per_epoch=max_segments, num_workers=workers,
                         init=init, select=select, penalty=penalty, penalty_norm=penalty_norm,
                         base=None if base is None else _run_dir(w, base, Path(base) if Path(base).exists() else None),
                         lr_schedule=lr_schedule, weight_decay=weight_decay, jitter=jitter)
    console.print(f"mixer run written: {result.summary()}")


@app.command("evaluate")
def evaluate_cmd(
    dataset: str = DatasetOpt,
    model: List[str] = typer.Option([], "--model", "-m", help="Base models (default: every cached model with stems for the split)."),
    run: List[Path] = typer.Option([], "--run", "-r", help="Mixer run folder or name under <work>/runs. Repeatable."),
    all_runs: bool = typer.Option(False, "--all-runs", help="Every run folder in <work>/runs for this dataset."),
    estimates: List[str] = typer.Option([], "--estimates", help="NAME=DIR: score a folder of estimates (museval layout) too."),
    split: str = typer.Option("test", help="Split to evaluate."),
    selection_split: str = typer.Option("valid", help="Split used to pick the best base model per source (valid, train, select, ...)."),
    oracles: bool = typer.Option(True, "--oracles/--no-oracles", help="Add oracle references (mixture, IRM)."),
    full_metrics: bool = typer.Option(False, "--full-metrics", help="Also ISR/SIR/SAR through museval (slow)."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default <work>/reports/<dataset>-<split>)."),
    html: bool = typer.Option(True, "--html/--no-html", help="Write report.html with every estimate playable (see `pipeline report`)."),
    device: Optional[str] = typer.Option(None, help="Device for mixers."),
    work: Optional[Path] = WorkOpt,
):
    """Score every system (base models, selections, blends, mixers, oracles) side by side."""
    from core.config import reports_dir, runs_dir
    from core.store import StemStore
    from reports.evaluate import evaluate

    w = work_dir(work)
    store = StemStore(store_dir(w))
    ds_id = store_dataset_id(dataset, w, ingest=True)   # scoring estimates needs only the dataset
    models = list(model)
    for item in estimates:
        if "=" not in item:
            raise PipelineError(f"--estimates {item}: expected NAME=DIR")
        est_name, folder = item.split("=", 1)
        from cache.imported import import_estimates
        from core.datasets import open_dataset

        ds = open_dataset(store.dataset_info(ds_id)["root"])
        import_estimates(store, ds, est_name, Path(folder), splits=[split])
        models = models or [k for k in store.models() if store.model_info(k)["family"] != "imported"]
        models.append(est_name)
    runs = [r if r.exists() else runs_dir(w) / r for r in run]
    if all_runs and runs_dir(w).exists():
        from core.store import read_json

        runs += [d for d in sorted(runs_dir(w).iterdir()) if (d / "config.json").exists()
                 and read_json(d / "config.json").get("dataset") == ds_id and d not in runs]
    for r in runs:
        if not (r / "config.json").exists():
            raise PipelineError(f"{r}: not a run folder (no config.json)")
    if out is None:
        from core.config import check_name

        out = reports_dir(w) / check_name(f"{ds_id}-{split}", "report name (from --split)")
    result = evaluate(store, ds_id, models=models, runs=runs, split=split, out=out,
                      cache_root=w / "evalcache", selection_split=selection_split, oracles=oracles,
                      full_metrics=full_metrics, device=device, listening=html)
    Console().print(result["summary"])
    console.print(f"report written to {out}")
    _print_listening(result.get("listening"))


def _report_dir(target: str, work: Path) -> Path:
    """A report folder; a name under <work>/reports; or a mixer run, whose one report it is."""
    from core.config import reports_dir, runs_dir
    from core.store import read_json

    for d in (Path(target), reports_dir(work) / target):
        if (d / "evaluation.json").exists():
            return d
    run = next((d for d in (Path(target), runs_dir(work) / target) if (d / "config.json").exists()), None)
    if run is None:
        raise PipelineError(f"{target}: neither a report folder (with evaluation.json), nor a report "
                            f"or run name under {work}")
    found = [p.parent for p in sorted(reports_dir(work).glob("*/evaluation.json"))
             if any(s.get("run") and Path(s["run"]).resolve() == run.resolve()
                    for s in read_json(p)["systems"])]
    if len(found) != 1:
        raise PipelineError(f"{run}: " + (f"evaluated in {len(found)} reports ({', '.join(map(str, found))}); "
                                          f"give the report folder" if found else
                                          f"no report under {reports_dir(work)} evaluates this run; "
                                          f"run `pipeline evaluate --run {run}` first"))
    return found[0]


@app.command("report")
def report_cmd(
    target: str = typer.Argument(..., help="Report folder, report name under <work>/reports, or a mixer run that one report evaluates."),
    track: List[str] = typer.Option([], "--track", "-t", help="Tracks to listen to (default: every evaluated track). Repeatable."),
    system: List[str] = typer.Option([], "--system", "-s", help="Systems to listen to (default: all). Repeatable."),
    excerpt: float = typer.Option(EXCERPT_S, min=0, help="Seconds of each track around its loudest part; 0: whole tracks."),
    whole_below: float = typer.Option(WHOLE_BELOW_S, min=0, help="Tracks shorter than this many seconds are played whole."),
    kbps: int = typer.Option(KBPS, min=6, max=256, help="Opus bitrate in kbit/s (lowered to fit --max-mb)."),
    max_mb: float = typer.Option(MAX_MB, min=0.001, help="Size budget of the audio in MB."),
    device: Optional[str] = typer.Option(None, help="Device for mixers."),
    work: Optional[Path] = WorkOpt,
):
    """Rebuild report.html (the listening report) of an evaluation, choosing tracks, systems, excerpts."""
    from core.store import StemStore, read_json
    from reports.evaluate import listening_report
    from reports.listening import ListeningOptions

    w = work_dir(work)
    out = _report_dir(target, w)
    recorded = Path(read_json(out / "evaluation.json").get("store", store_dir(w)))
    store = StemStore(recorded if recorded.exists() else store_dir(w))
    options = ListeningOptions(tracks=tuple(track), systems=tuple(system), excerpt=excerpt,
                               whole_below=whole_below, kbps=kbps, max_mb=max_mb)
    _print_listening(listening_report(out, store, options, device=device))


def _print_error(message: str) -> None:
    """`error: ...` as one line on stderr, whatever the message holds."""
    from rich.markup import escape

    line = " ".join(str(message).split("\n")).strip()
    console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)


def _click_exceptions() -> tuple[tuple, tuple, tuple]:
    """(usage errors, aborts, exits) of click and of the copy of click that typer >= 0.20
    vendors (typer._click): typer raises the latter, standalone click the former."""
    import click

    errors = click.exceptions
    usage, aborts, exits = [errors.ClickException], [errors.Abort], [errors.Exit]
    try:
        from typer.exceptions import Abort, Exit, TyperException

        usage.append(TyperException)
        aborts.append(Abort)
        exits.append(Exit)
    except ImportError:  # older typer: its exceptions are click's
        pass
    return tuple(usage), tuple(aborts), tuple(exits)


def _usage_error_line(e) -> str:
    """A click usage error (missing option, bad value, unknown option) as one line, instead of
    click's usage box; `COMMAND --help` still prints the full help."""
    ctx = getattr(e, "ctx", None)
    message = e.format_message()
    if ctx is None:
        return message
    return f"{ctx.command_path}: {message} (see `{ctx.command_path} --help`)"


def main(argv=None) -> None:
    usage_errors, aborts, exits = _click_exceptions()
    try:
        # standalone_mode=False returns typer.Exit's code instead of exiting
        code = app(args=argv, prog_name="pipeline", standalone_mode=False)
        if isinstance(code, int) and code:
            sys.exit(code)
    except PipelineError as e:
        if _state["debug"]:
            raise
        _print_error(str(e))
        sys.exit(1)
    except exits as e:
        sys.exit(e.exit_code)
    except aborts:
        sys.exit(1)
    except KeyboardInterrupt:
        console.print("interrupted; run the same command again to resume")
        sys.exit(130)
    except usage_errors as e:
        if type(e).__name__ == "NoArgsIsHelpError":   # a bare `pipeline`: the help is the answer
            e.show()
            sys.exit(e.exit_code)
        if _state["debug"]:
            raise
        _print_error(_usage_error_line(e))
        sys.exit(getattr(e, "exit_code", 2))
    except OSError as e:   # the file system said no (permissions, disk full, ...): not a bug
        if _state["debug"]:
            raise
        _print_error(f"{e.filename}: {e.strerror}" if e.filename and e.strerror else str(e))
        sys.exit(1)


if __name__ == "__main__":
    main()
