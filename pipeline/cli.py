"""The `pipeline` command line: one command per stage (pipeline.stages), which this module parses
and prints around; stages talk only through the work folder.

The options of the ensemble methods (`blend`), the mixer architectures (`train-mixer`) and the
base-model families (`cache`) are not written here: each command offers the options its records
declare (core.options), so a registered method, mixer or family appears with its options without
a change to this file. The app is therefore built when the command runs (`build_app`).
"""
from __future__ import annotations

import inspect
import sys
from pathlib import Path
from typing import Callable, List, Optional

import typer
from rich.console import Console

from core import options as opts
from core.errors import PipelineError
from pipeline import stages
from reports.clips import EXCERPT_S, KBPS, MAX_MB, WHOLE_BELOW_S

console = Console(stderr=True)
_state = {"debug": False}
CONFIGS = Path(__file__).resolve().parent / "configs"

WorkOpt = typer.Option(None, "--work", envvar="PIPELINE_WORK",
                       help="Work folder for all outputs (default ./work).")
ModelsOpt = typer.Option(..., "--model", "-m", help="Cached base model (name or store key). Repeatable.")
DatasetOpt = typer.Option("synthetic", "--dataset", "-d", help="Dataset (store id, folder, or 'synthetic').")
DeviceOpt = typer.Option(None, help="cpu or cuda (default: cuda when available).")


def _log(line: str) -> None:
    console.print(line, markup=False, highlight=False, soft_wrap=True)


# ---- options declared by records ---------------------------------------------------------------
_TYPES = {bool: Optional[bool], int: Optional[int], float: Optional[float], str: Optional[str],
          tuple: Optional[str], list: Optional[List[str]]}


def _shown(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


def _help(spec: opts.Spec, defaults: dict, owners: list[str]) -> str:
    """The option's help and default; when only some records have it, which ones."""
    mine = list(defaults)
    known = {o: _shown(d) for o, d in defaults.items() if d is not None and d != ()}
    if len(set(known.values())) == 1 and len(known) == len(mine):
        default = f"default {next(iter(known.values()))}"
    else:
        default = "; ".join(f"{o} {d}" for o, d in known.items())
        default = f"default: {default}" if default else ""
    text = spec.help if len(mine) == len(owners) else f"{', '.join(mine)}: {spec.help}"
    return f"{text[:1].upper()}{text[1:]}" + (f" ({default})." if default else ".")


def record_options(owners: list[tuple[str, type | None]],
                   only: tuple[str, ...] | None = None) -> list[inspect.Parameter]:
    """One command-line option per option the records declare (their union; `only`: just these)."""
    names = [o for o, _ in owners]
    params = []
    for spec, defaults in opts.union(owners):
        if not spec.cli or (only is not None and spec.name not in only):
            continue
        flag = spec.flag if spec.flags else "--" + spec.name.replace("_", "-")
        if spec.kind is bool and "/" not in flag:
            flag = f"{flag}/--no-{flag[2:]}"
        option = typer.Option(None, flag, help=_help(spec, defaults, names), show_default=False)
        params.append(inspect.Parameter(spec.name, inspect.Parameter.KEYWORD_ONLY, default=option,
                                        annotation=_TYPES[spec.kind]))
    return params


def with_record_options(command: Callable, extra: list[inspect.Parameter]) -> Callable:
    """`command` (which takes **options) with `extra` as typer options in its signature."""
    sig = inspect.signature(command)
    fixed = [p for p in sig.parameters.values() if p.kind != inspect.Parameter.VAR_KEYWORD]

    def wrapper(**kwargs):
        return command(**kwargs)

    wrapper.__signature__ = sig.replace(parameters=fixed + extra)
    wrapper.__annotations__ = {**command.__annotations__,
                               **{p.name: p.annotation for p in extra}}
    wrapper.__doc__, wrapper.__name__ = command.__doc__, command.__name__
    return wrapper


# ---- the commands ------------------------------------------------------------------------------
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
    out = stages.make_dataset(out, seed=seed, train=train, valid=valid, test=test,
                              duration=duration, rate=rate, force=force, work=work)
    console.print(f"dataset ready: {out}")


def remix_cmd(
    dataset: str = typer.Option(..., "--dataset", "-d", help="Dataset whose stems are remixed (store id, folder, or 'synthetic')."),
    split: str = typer.Option("train", help="Split the stems are drawn from (train, fit, a fold's, ...); never your evaluation split."),
    n: int = typer.Option(80, "--n", help="Number of remixes."),
    seed: int = typer.Option(0, help="Random seed: the same seed gives bit-identical remixes."),
    folds_of: Optional[str] = typer.Option(None, "--folds-of", help="A cross-fitted model's run (`train-base --folds K`): each remix draws from one of its folds, so the fold model that never saw that fold is honest on it."),
    duration: float = typer.Option(6.0, help="Seconds per remix (each stem starts at a random point of its track)."),
    gain_db: float = typer.Option(3.0, "--gain-db", help="Each stem's gain is drawn uniformly within +-this many dB."),
    name: Optional[str] = typer.Option(None, help="Dataset name (default remix-SPLIT-nN-sSEED[-RUN]): <work>/data/NAME."),
    out: Optional[Path] = typer.Option(None, help="Output folder (default <work>/data/NAME)."),
    force: bool = typer.Option(False, "--force", help="Replace a folder holding other remixes."),
    work: Optional[Path] = WorkOpt,
):
    """Remixed training mixtures: every source from a random track of the split, at a random start and gain; written as a dataset of stem folders (+ remix.json) and stored."""
    from core.remix import describe

    result = stages.remix(dataset, split=split, n=n, seed=seed, folds_of=folds_of,
                          duration=duration, gain_db=gain_db, name=name, out=out, force=force,
                          work=work)
    console.print(f"{describe(result)}: {result['root']} (dataset {result['dataset']}); cache "
                  f"the base models on it (`pipeline cache -d {result['root']} -m ...`), then fit "
                  f"with --extra-data {result['dataset']}", markup=False, highlight=False,
                  soft_wrap=True)


def cache(
    ctx: typer.Context,
    dataset: Optional[str] = typer.Option(None, "--dataset", "-d",
                                          help="Dataset folder, or 'synthetic'."),
    model: List[str] = typer.Option([], "--model", "-m",
                                    help="Base model: a pretrained name (htdemucs, umxl, ...), a "
                                         "shipped checkpoint name, or a local path. Repeatable."),
    split: List[str] = typer.Option([], "--split", help="Only these splits (train/valid/test)."),
    device: Optional[str] = DeviceOpt,
    offline: bool = typer.Option(False, "--offline", help="Never download; fail fast on missing weights."),
    repo: Optional[Path] = typer.Option(None, help="Local folder with model weights (demucs --repo)."),
    shard: Optional[str] = typer.Option(None, help="I/N: this process's share of the tracks "
                                                   "(default from torchrun's RANK/WORLD_SIZE)."),
    force: bool = typer.Option(False, "--force", help="Recompute complete entries."),
    work: Optional[Path] = WorkOpt,
    **model_options,
):
    """Cache base models' stems for a dataset (also stores the dataset's mixture and references)."""
    if ctx.invoked_subcommand is not None:
        return
    stages.cache(dataset, model, splits=split, device=device, offline=offline, repo=repo,
                 shard=shard, force=force, work=work, log=_log, **model_options)


def cache_import(
    folder: Path = typer.Argument(..., help="Estimates: DIR/<subset>/<track>/<target>.wav or DIR/<track>/<target>.wav"),
    name: str = typer.Option(..., "--name", help="Name of the imported system."),
    dataset: str = typer.Option(..., "--dataset", "-d", help="The dataset the estimates belong to."),
    split: List[str] = typer.Option([], "--split", help="Only these splits."),
    work: Optional[Path] = WorkOpt,
):
    """Register separations made elsewhere as a base model in the stem store."""
    s = stages.cache_import(folder, name, dataset, splits=split, work=work)
    console.print(f"{name} [{s['key']}]: {s['computed']} tracks imported "
                  f"({', '.join(s['sources'])}), {s['skipped']} already there")


def cache_ls(work: Optional[Path] = WorkOpt):
    """List the datasets and models in the stem store, with track counts and sizes."""
    from rich.table import Table

    store = stages.open_store(work)
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


def cache_verify(work: Optional[Path] = WorkOpt):
    """Check every store entry (array readable, shape, length, checksum); non-zero exit on damage."""
    store = stages.open_store(work)
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


def run_cmd(
    config: Path = typer.Argument(..., help="Experiment file (TOML or YAML); see pipeline/configs/."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: the file's, else cuda when available)."),
    work: Optional[Path] = WorkOpt,
):
    """Run an experiment: dataset -> cache -> blend / mixers -> evaluation report, skipping done work."""
    result = stages.run(config, device=device, work=work,
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


def demo(device: Optional[str] = DeviceOpt, work: Optional[Path] = WorkOpt):
    """The whole pipeline offline on the embedded synthetic dataset with the shipped base models."""
    run_cmd(CONFIGS / "demo.toml", device=device, work=work)


def separate_cmd(
    files: List[Path] = typer.Argument(..., help="Audio files to separate (wav, flac, ...; mono or stereo, any rate)."),
    ensemble: str = typer.Option(..., "--ensemble", "-e", help="Run folder (any ensemble method) or a run name under <work>/runs."),
    out: Path = typer.Option(..., "--out", "-o", help="Output folder: OUT/<file stem>/<target>.<format>."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing output files."),
    device: Optional[str] = DeviceOpt,
    offline: bool = typer.Option(False, "--offline", help="Never download; fail fast on missing weights."),
    fmt: str = typer.Option("wav", "--format", help="wav (32-bit float) or flac (24-bit)."),
    consistency: Optional[str] = typer.Option(None, help="Project the estimates onto the mixture: none, equal or energy (default: as the run was fitted)."),
    work: Optional[Path] = WorkOpt,
):
    """Separate new songs with a trained ensemble; base models run through the stem cache."""
    stages.separate(files, ensemble, out, force=force, device=device, offline=offline, fmt=fmt,
                    consistency=consistency, work=work, log=_log)


def train_base_cmd(
    family: str = typer.Option(..., "--family", "-f", help="The family to train: its recipe's name (see the README's family table)."),
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
    device: Optional[str] = DeviceOpt,
    out: Optional[Path] = typer.Option(None, help="Run folder (default <work>/runs/NAME)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming an existing run."),
    folds: Optional[int] = typer.Option(None, "--folds", help="Cross-fit: K fold models (RUN/fold-k/), the k-th trained on the training tracks outside fold k, cached as one model that separates each training track with the fold model that never saw it (other audio: their mean). Needs --select-split select."),
    work: Optional[Path] = WorkOpt,
):
    """Train a base separator of one family on a cached dataset; the model lands in RUN/model/."""
    result = stages.train_base(family, dataset, name=name, preset=preset, arch=arch,
                               xumx_loss=xumx_loss, targets=target, epochs=epochs, batch=batch,
                               segment=segment, lr=lr, seed=seed, select_split=select_split,
                               workers=workers, amp=amp, device=device, out=out, fresh=fresh,
                               folds=folds, work=work)
    console.print(f"model written to {result.model_dir} (best epoch {result.best_epoch}, "
                  f"valid loss {result.best_valid:.4g}); use it with `pipeline cache -m {result.model_dir}`")


def blend(
    model: List[str] = ModelsOpt,
    dataset: str = DatasetOpt,
    method: str = typer.Option("blend", help="The ensemble method (see above)."),
    name: Optional[str] = typer.Option(None, help="Run name (default: the method): the run folder is <work>/runs/NAME."),
    out: Optional[Path] = typer.Option(None, help="Run folder (default <work>/runs/NAME)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing run folder."),
    work: Optional[Path] = WorkOpt,
    **options,
):
    """Ensembles that train nothing."""
    config = stages.blend(model, dataset, method=method, name=name, out=out, force=force,
                          work=work, **options)
    run = Path(config["run"])
    if (run / "weights.md").exists():
        Console().print((run / "weights.md").read_text())
    console.print(f"{config['method']} run written to {run}")


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
    extra_data: List[str] = typer.Option([], "--extra-data", help="More data to score the sets on, DATASET[:SPLIT] each (a store id or dataset folder; SPLIT default train), e.g. remixes (`pipeline remix`). Repeatable."),
    work: Optional[Path] = WorkOpt,
    **options,
):
    """Choose base models by greedy forward selection on the selection split; write the list."""
    given = {k: v for k, v in options.items() if v is not None}   # --search: the blend's option
    result = stages.select_models(model, dataset, by=by, split=split, objective=objective,
                                  step=step, min_gain=min_gain, backward=backward, name=name,
                                  out=out, force=force, extra_data=extra_data, work=work,
                                  log=lambda line: console.print(line, markup=False, highlight=False),
                                  **given)
    path = result["file"]
    console.print(f"chose {', '.join(m['name'] for m in result['models'])} "
                  f"({objective} SDR {result['score']:.3f} dB); written to {path}\n"
                  f"use it in an experiment file: models_from = \"{path}\"", markup=False, highlight=False)


def train_mixer_cmd(
    model: List[str] = ModelsOpt,
    arch: str = typer.Option("mdx-mixer", help="The mixer architecture (see above)."),
    dataset: str = DatasetOpt,
    name: Optional[str] = typer.Option(None, help="Run name (default: the architecture and preset)."),
    device: Optional[str] = DeviceOpt,
    out: Optional[Path] = typer.Option(None, help="Run folder (default <work>/runs/NAME)."),
    fresh: bool = typer.Option(False, "--fresh", help="Start over instead of resuming an existing run."),
    work: Optional[Path] = WorkOpt,
    **options,
):
    """Train a mixing-weight estimator on cached stems (resumes when re-run)."""
    config = stages.train_mixer(model, arch, dataset, name=name, out=out, fresh=fresh,
                                device=device, work=work, **options)
    console.print(f"mixer run written: {config['summary']}")


def evaluate_cmd(
    dataset: str = DatasetOpt,
    model: List[str] = typer.Option([], "--model", "-m", help="Base models (default: every cached model with stems for the split)."),
    run: List[Path] = typer.Option([], "--run", "-r", help="Run folder (any ensemble method) or name under <work>/runs. Repeatable."),
    all_runs: bool = typer.Option(False, "--all-runs", help="Every run folder in <work>/runs for this dataset."),
    estimates: List[str] = typer.Option([], "--estimates", help="NAME=DIR: score a folder of estimates (museval layout) too."),
    split: str = typer.Option("test", help="Split to evaluate."),
    selection_split: str = typer.Option("valid", help="Split used to pick the best base model per source (valid, train, select, ...)."),
    oracles: bool = typer.Option(True, "--oracles/--no-oracles", help="Add oracle references (mixture, IRM)."),
    full_metrics: bool = typer.Option(False, "--full-metrics", help="Also ISR/SIR/SAR through museval (slow)."),
    out: Optional[Path] = typer.Option(None, help="Report folder (default <work>/reports/<dataset>-<split>)."),
    html: bool = typer.Option(True, "--html/--no-html", help="Write report.html with every estimate playable (see `pipeline report`)."),
    save_estimates: Optional[Path] = typer.Option(None, "--save-estimates", help="Also write every system's estimates as WAV, DIR/<system>/<split>/<track>/<source>.wav (museval layout), from the pass that scores them."),
    device: Optional[str] = typer.Option(None, help="Device for mixers."),
    work: Optional[Path] = WorkOpt,
):
    """Score every system (base models, selections, ensembles, oracles) side by side."""
    result = stages.evaluate(dataset, models=model, runs=run, all_runs=all_runs,
                             estimates=estimates, split=split, selection_split=selection_split,
                             oracles=oracles, full_metrics=full_metrics, out=out, html=html,
                             save_estimates=save_estimates, device=device, work=work)
    Console().print(result["summary"])
    console.print(f"report written to {result['out']}")
    if save_estimates is not None:
        console.print(f"estimates written to {save_estimates}")
    _print_listening(result.get("listening"))


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
    _print_listening(stages.report(target, tracks=track, systems=system, excerpt=excerpt,
                                   whole_below=whole_below, kbps=kbps, max_mb=max_mb,
                                   device=device, work=work))


# ---- the app ---------------------------------------------------------------------------------
def _listing(records, what: str) -> str:
    return f"\n\n{what}:\n\n" + "\n\n".join(f"[bold]{r.name}[/]: {r.summary}" for r in records)


def build_app() -> typer.Typer:
    """The command line, with the options of every registered method, mixer and family."""
    from mixer import methods
    from mixer.models import ARCHS
    from separators.families import FAMILIES, common_options

    app = typer.Typer(add_completion=False, rich_markup_mode="rich", no_args_is_help=True,
                      help="Ensemble music source separators: cache base models' stems, blend / "
                           "learn mixing weights, evaluate with museval-exact SDR, separate new "
                           "songs.")
    app.callback()(_main)
    cache_app = typer.Typer(rich_markup_mode="rich", invoke_without_command=True,
                            help="Run base separators once over a dataset and keep their stems in "
                                 "the stem store ([bold]ls[/], [bold]verify[/], [bold]import[/] "
                                 "manage it)." + _listing(FAMILIES.records(), "Families"))
    families = [(f.name, f.options) for f in FAMILIES.records()] + [("every family", common_options())]
    cache_app.callback()(with_record_options(cache, record_options(families)))
    cache_app.command("import")(cache_import)
    cache_app.command("ls")(cache_ls)
    cache_app.command("verify")(cache_verify)
    app.add_typer(cache_app, name="cache")

    fixed, learned = methods.records(learned=False), methods.records(learned=True)
    app.command("make-dataset")(make_dataset)
    app.command("remix")(remix_cmd)
    app.command("run")(run_cmd)
    app.command("demo")(demo)
    app.command("separate")(separate_cmd)
    trainable = ", ".join(f"[bold]{f.recipe.name}[/] ({f.name})" for f in FAMILIES.records()
                          if f.recipe is not None)
    app.command("train-base", help=f"{train_base_cmd.__doc__}\n\nFamilies (--family): "
                                   f"{trainable}.")(train_base_cmd)
    app.command("blend", help=blend.__doc__ + _listing(fixed, "Methods (--method)"))(
        with_record_options(blend, record_options([(m.name, m.options) for m in fixed])))
    blend_record = methods.get("blend")
    app.command("select-models")(with_record_options(
        select_models_cmd, record_options([("--by blend", blend_record.options)], only=("search",))))
    app.command("train-mixer", help=train_mixer_cmd.__doc__ + _listing(
        [ARCHS.get(m.name) for m in learned], "Architectures (--arch)"))(
        with_record_options(train_mixer_cmd, record_options([(m.name, m.options) for m in learned])))
    app.command("evaluate")(evaluate_cmd)
    app.command("report")(report_cmd)
    return app


def _main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")):
    _state["debug"] = debug


# ---- errors as one line ------------------------------------------------------------------------
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
        code = build_app()(args=argv, prog_name="pipeline", standalone_mode=False)
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
