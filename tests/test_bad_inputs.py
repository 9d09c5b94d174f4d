"""Bad input never ends in a traceback: every CLI command, given a bad argument, exits non-zero
with one `error:` line on stderr; and the cases of issue 14 one by one (model files that are not
models, a work folder that is a file, a blend step of 0, run names that would escape their
folder, train-mixer's summary, train-base on a dataset never cached, museval-exact scoring of
estimates made elsewhere)."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import soundfile as sf
import torch
from conftest import run_cli, write_stem_track
from test_mixer import SOURCES, make_store, one_thread  # noqa: F401  (an autouse fixture)

from core.errors import PipelineError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def assert_one_error_line(code, err, *expected):
    """Non-zero exit, one line on stderr, `error: ...` holding `expected`, no traceback."""
    lines = err.strip().splitlines()
    assert code not in (0, None), err
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for text in expected:
        assert text in lines[0], (text, lines[0])
    return lines[0]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    """A work folder whose store holds a toy dataset 'toy' with two models' stems, and a small
    stem-folder dataset on disk (never ingested)."""
    root = tmp_path_factory.mktemp("bad")
    work = root / "work"
    make_store(work / "store", {"m0": (SOURCES, np.eye(4)), "m1": (SOURCES, 0.5 * np.eye(4))},
               splits=(("train", 2), ("valid", 1), ("test", 1)), length=4096)
    ds = root / "ds"
    for i, subset in enumerate(["train", "train", "valid", "test"]):
        write_stem_track(ds, subset, f"track{i}", seed=i)
    (root / "file.wav").write_bytes(b"RIFF")
    return {"root": root, "work": work, "ds": ds, "file": root / "file.wav"}


# ---- every command --------------------------------------------------------------------------
def cli_commands() -> list[tuple[str, ...]]:
    """Every command and subcommand `pipeline --help` lists, as argument paths."""
    import typer.main

    from pipeline.cli import build_app

    def walk(group, path):
        for name, cmd in sorted(group.commands.items()):
            yield path + (name,)
            if getattr(cmd, "commands", None):
                yield from walk(cmd, path + (name,))

    return list(walk(typer.main.get_command(build_app()), ()))


def test_the_command_list_is_complete():
    found = set(cli_commands())
    assert {("make-dataset",), ("cache",), ("cache", "ls"), ("cache", "verify"), ("cache", "import"),
            ("run",), ("demo",), ("separate",), ("train-base",), ("blend",), ("train-mixer",),
            ("evaluate",)} <= found


@pytest.mark.parametrize("command", cli_commands(), ids=" ".join)
def test_every_command_refuses_an_unknown_option(command, capsys):
    code, _, err = run_cli([*command, "--no-such-option"], capsys)
    line = assert_one_error_line(code, err, "No such option: --no-such-option")
    assert f"pipeline {' '.join(command)}" in line   # says which command, and where its help is


# the least each command needs before it reads --work (a command missing here gets its own
# usage error instead, which must be one line too)
REQUIRED = {
    ("cache",): ["-d", "synthetic"], ("cache", "import"): ["DIR", "--name", "x", "-d", "synthetic"],
    ("run",): ["EXP"], ("separate",): ["song.wav", "-e", "x", "-o", "out"],
    ("train-base",): ["-f", "umx"], ("blend",): ["-m", "a"], ("train-mixer",): ["-m", "a"],
    ("report",): ["demo"], ("select-models",): ["-m", "a"], ("remix",): ["-d", "synthetic"],
}


@pytest.mark.parametrize("command", cli_commands(), ids=" ".join)
def test_every_command_refuses_a_work_folder_that_is_a_file(command, env, capsys):
    """Issue 14, item 2: `--work some/file.wav`; also a work folder below a file."""
    from pipeline.experiment import load_experiment  # noqa: F401  (imported before timing)

    args = [a.replace("EXP", str(env["root"] / "x.toml")) for a in REQUIRED.get(command, [])]
    for work in (env["file"], env["file"] / "sub"):
        code, _, err = run_cli([*command, *args, "--work", work], capsys)
        known = command in REQUIRED or not args
        line = assert_one_error_line(code, err)
        if known and command != ("run",):   # `run` reads the experiment file first
            assert "work folder" in line and "file.wav" in line, line


def bad_arguments(env) -> dict[tuple[str, ...], tuple[list, str]]:
    """One bad argument per command (its own, not a parsing error) and the words expected."""
    w, ds, root = env["work"], env["ds"], env["root"]
    return {
        ("make-dataset",): (["--train", "-1", "--work", root / "w-make"], "invalid synthetic dataset"),
        ("cache",): (["-d", root / "no-dataset", "--work", w], "no-dataset"),
        ("cache", "ls"): (["--work", env["file"]], "work folder"),
        ("cache", "verify"): (["--work", env["file"]], "work folder"),
        ("cache", "import"): ([root / "no-dir", "--name", "../x", "-d", ds, "--work", w], "'../x'"),
        ("run",): ([root / "missing.toml", "--work", w], "experiment file not found"),
        ("demo",): (["--device", "nonsense", "--work", root / "w-demo"], "not a torch device"),
        ("separate",): ([root / "no.wav", "-e", "nope", "-o", root / "out", "--work", w], "not a run folder"),
        ("train-base",): (["-f", "wavenet", "-d", "toy", "--work", w], "family 'wavenet'"),
        ("blend",): (["-m", "m0", "-m", "m1", "-d", "toy", "--step", "0", "--work", w], "blend step 0"),
        ("train-mixer",): (["-m", "m0", "-d", "toy", "--name", "../../escaped", "--work", w], "'../../escaped'"),
        ("evaluate",): (["-d", "toy", "--estimates", "no-equals-sign", "--work", w], "expected NAME=DIR"),
        ("report",): ([root / "no-report", "--work", w], "neither a report folder"),
        ("select-models",): (["-m", "m0", "-m", "m1", "-d", "toy", "--by", "nonsense", "--work", w], "nonsense"),
        ("remix",): (["-d", "toy", "--n", "0", "--work", w], "remix --n 0"),
    }


@pytest.mark.parametrize("command", cli_commands(), ids=" ".join)
def test_every_command_gives_one_line_for_a_bad_argument(command, env, capsys):
    cases = bad_arguments(env)
    assert command in cases, f"pipeline {' '.join(command)}: add a bad argument for it to this table"
    args, expected = cases[command]
    code, _, err = run_cli([*command, *args], capsys)
    assert_one_error_line(code, err, expected)


def test_debug_shows_the_traceback_and_help_is_untouched(env, capsys):
    with pytest.raises(PipelineError, match="escaped"):
        run_cli(["--debug", "train-mixer", "-m", "m0", "--name", "../escaped", "--work", env["work"]], capsys)
    code, out, err = run_cli(["blend", "--help"], capsys)
    assert code == 0 and "Usage: pipeline blend" in out and "--step" in out and not err


def test_a_bad_search_mode_is_one_line(env, capsys):
    """--search is the blend record's option: blend, band-blend and select-models check it alike."""
    w = env["work"]
    for command in (["blend"], ["blend", "--method", "band-blend"], ["select-models"]):
        code, _, err = run_cli([*command, "-m", "m0", "-m", "m1", "-d", "toy", "--search", "fast",
                                "--work", w], capsys)
        assert_one_error_line(code, err, "search 'fast': choose one of auto, exhaustive, local")
    for command in ("blend", "select-models"):
        code, out, _ = run_cli([command, "--help"], capsys)
        assert code == 0 and "--search" in out, command


# ---- item 1: model files that are not models ---------------------------------------------------
def _bad_model_files(root):
    """(spec to load, file the error must name) for damaged / foreign files of every format."""
    from test_adapters import save_demucs, save_umx_folder, save_xumx, tiny_htdemucs

    rng = np.random.default_rng(0)
    noise = rng.bytes(3000)
    good_th = save_demucs(tiny_htdemucs(), root / "good" / "tinyht.th")
    good_xumx, _ = save_xumx(root / "good" / "xumx.pth")
    good_umx = save_umx_folder(root / "good" / "umx", ["vocals", "drums"], hidden=4)

    def write(name, data):
        p = root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data) if isinstance(data, bytes) else p.write_text(data)
        return p

    cases = {
        "demucs .th noise": write("noise.th", noise),
        "demucs .th truncated": write("cut.th", good_th.read_bytes()[:5000]),
        "demucs .th empty": write("empty.th", b""),
        "demucs .th text": write("text.th", "hello\n"),
        "demucs .yaml not a bag": write("notbag.yaml", "hello: [1, 2\n"),
        "demucs .yaml noise": write("noise.yaml", noise),
        "X-UMX .pth noise": write("noise.pth", noise),
        "X-UMX .pth truncated": write("cut.pth", good_xumx.read_bytes()[:5000]),
        "X-UMX .pth empty": write("empty.pth", b""),
    }
    torch.save({"a": 1}, root / "dict.th")
    cases["demucs .th without a model"] = root / "dict.th"
    torch.save([1, 2], root / "list.pth")
    cases["X-UMX .pth a list"] = root / "list.pth"
    specs = {k: (str(p), p) for k, p in cases.items()}
    folder = write("repo/noise.th", noise).parent   # a demucs repo folder holding a damaged file
    specs["demucs folder"] = (str(folder), folder / "noise.th")
    for what, target, data in [("state dict noise", "vocals.pth", noise),
                               ("state dict truncated", "vocals.pth", (good_umx / "vocals.pth").read_bytes()[:3000]),
                               ("state dict empty", "vocals.pth", b""),
                               ("separator.json noise", "separator.json", noise),
                               ("target json noise", "drums.json", "{not json")]:
        d = root / f"umx-{what.replace(' ', '-')}"
        shutil.copytree(good_umx, d)
        write(d.relative_to(root) / target, data)
        specs[f"Open-Unmix {what}"] = (str(d), d / target)
    return specs


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory):
    return _bad_model_files(tmp_path_factory.mktemp("models"))


BAD_MODEL_CASES = ["demucs .th noise", "demucs .th truncated", "demucs .th empty", "demucs .th text",
                   "demucs .yaml not a bag", "demucs .yaml noise", "demucs .th without a model",
                   "demucs folder", "X-UMX .pth noise", "X-UMX .pth truncated", "X-UMX .pth empty",
                   "X-UMX .pth a list", "Open-Unmix state dict noise", "Open-Unmix state dict truncated",
                   "Open-Unmix state dict empty", "Open-Unmix separator.json noise",
                   "Open-Unmix target json noise"]


@pytest.mark.parametrize("case", BAD_MODEL_CASES)
def test_a_file_that_is_not_a_model_is_one_line_naming_it(case, bad_models):
    from separators.registry import load_separator

    spec, bad_file = bad_models[case]
    with pytest.raises(PipelineError) as info:
        load_separator(spec, offline=True)
    message = str(info.value)
    assert str(bad_file) in message and "\n" not in message, message
    assert " not " in message or "unreadable" in message, message


def test_cache_with_a_garbage_model_file(bad_models, env, capsys):
    """The issue's command: `pipeline cache -d DS -m garbage.th` -> one error line, no traceback."""
    for case in ("demucs .th noise", "X-UMX .pth truncated", "Open-Unmix state dict noise"):
        spec, bad_file = bad_models[case]
        code, _, err = run_cli(["cache", "-d", env["ds"], "-m", spec, "--work", env["root"] / "w-cache"],
                               capsys)
        assert code == 1 and "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and err.strip().splitlines()[-1] == errors[0], err
        assert str(bad_file) in errors[0]


def test_load_checkpoint_file_reasons(tmp_path):
    from separators.weights import load_checkpoint_file

    torch.save({"x": torch.zeros(2)}, tmp_path / "ok.pt")
    assert torch.equal(load_checkpoint_file(tmp_path / "ok.pt", "a state dict")["x"], torch.zeros(2))
    torch.save({"p": tmp_path}, tmp_path / "obj.pt")
    (tmp_path / "noise.pt").write_bytes(np.random.default_rng(1).bytes(100))
    (tmp_path / "cut.pt").write_bytes((tmp_path / "ok.pt").read_bytes()[:300])
    for name, reason in [("obj.pt", "PosixPath object, which a weights-only load refuses"),
                         ("noise.pt", "not a PyTorch file"), ("cut.pt", "truncated or damaged"),
                         ("missing.pt", "not a file")]:
        with pytest.raises(PipelineError, match=reason) as info:
            load_checkpoint_file(tmp_path / name, "a state dict")
        assert str(info.value).startswith(f"{tmp_path / name}: not a state dict (")


def test_registry_names_the_file_a_future_loader_let_through(tmp_path, monkeypatch):
    """The safety net: a loader that raises a raw unpickling error still gives one line."""
    import pickle

    import separators.families.xumx as xumx
    from separators.registry import load_separator

    def broken(path, **kwargs):
        raise pickle.UnpicklingError("invalid load key, '\\x07'.")

    monkeypatch.setattr(xumx, "load_xumx", broken)
    (tmp_path / "m.pth").write_bytes(b"\x07" * 10)
    with pytest.raises(PipelineError, match=r"m\.pth: could not load this model \(not a PyTorch file\)"):
        load_separator(str(tmp_path / "m.pth"))


# ---- item 2: the work folder is a file ---------------------------------------------------------
def test_work_dir_refuses_files_on_its_path(tmp_path, monkeypatch):
    from core.config import work_dir

    (tmp_path / "f.wav").write_bytes(b"")
    assert work_dir(tmp_path / "new" / "work") == (tmp_path / "new" / "work").resolve()
    with pytest.raises(PipelineError, match=r"f\.wav: the work folder \(--work\) is a file"):
        work_dir(tmp_path / "f.wav")
    with pytest.raises(PipelineError, match=r"lies under .*f\.wav, which is a file"):
        work_dir(tmp_path / "f.wav" / "a" / "b")
    monkeypatch.setenv("PIPELINE_WORK", str(tmp_path / "f.wav"))
    with pytest.raises(PipelineError, match=r"\$PIPELINE_WORK"):
        work_dir(None)


# ---- item 3: blend step 0 ----------------------------------------------------------------------
def test_blend_steps_outside_0_1_are_refused_before_reading(env, capsys):
    from mixer.blend import grid_divisions

    for step in (0, 0.0, -0.1, 1.5, float("nan"), 0.3):
        with pytest.raises(PipelineError, match="blend step"):
            grid_divisions(step)
    assert grid_divisions(0.05) == 20 and grid_divisions(1) == 1
    code, _, err = run_cli(["blend", "-m", "m0", "-m", "m1", "-d", "toy", "--step", "0", "--name",
                            "b0", "--work", env["work"]], capsys)
    assert_one_error_line(code, err, "blend step 0")
    assert not (env["work"] / "runs" / "b0").exists()


# ---- item 4: run names are one path component ------------------------------------------------
BAD_NAMES = ["", "  ", "a/b", "../../escaped", "..", ".", "a\\b", "tab\there", "nl\nx", "nul\x00x"]


def test_check_name():
    from core.config import check_name

    for good in ("blend", "umx-musdb7", "my.run", "a..b", "MDX Mixer (T=2^16)"):
        assert check_name(good) == good
    for bad in BAD_NAMES + [3]:
        with pytest.raises(PipelineError, match="single folder name"):
            check_name(bad)


@pytest.mark.parametrize("argv", [
    ["train-mixer", "-m", "m0", "-d", "toy", "--name", "../../escaped"],
    ["blend", "-m", "m0", "-m", "m1", "-d", "toy", "--name", "a/b"],
    ["train-base", "-f", "umx", "-d", "toy", "--name", ".."],
    ["cache", "import", "DS", "--name", "../x", "-d", "DS"],
    ["evaluate", "-d", "toy", "--split", "../../x"],
    ["select-models", "-m", "m0", "-m", "m1", "-d", "toy", "--name", "../../escaped"],
], ids=lambda a: a[0] if a[0] != "cache" else "cache import")
def test_names_that_would_escape_are_refused(argv, env, capsys):
    argv = [str(env["ds"]) if a == "DS" else a for a in argv]
    code, _, err = run_cli([*argv, "--work", env["work"]], capsys)
    assert_one_error_line(code, err, "single folder name")
    assert not (env["root"] / "escaped").exists() and not (env["work"] / "escaped").exists()


def test_experiment_names_are_folder_names(tmp_path):
    from pipeline.experiment import load_experiment

    base = 'dataset = {path = "synthetic"}\nmodels = [{spec = "umx-synth"}]\n'
    for text, what in [('name = "../x"\n' + base, "experiment name"),
                       ('name = "ok"\n' + base + '[[systems]]\nname = "a/b"\nmethod = "blend"\n', "system name")]:
        (tmp_path / "e.toml").write_text(text)
        with pytest.raises(PipelineError, match=f"{what} .* single folder name"):
            load_experiment(tmp_path / "e.toml")


# ---- item 5: train-mixer's summary -------------------------------------------------------------
def test_train_mixer_prints_a_short_summary(env, capsys):
    base = ["train-mixer", "-m", "m0", "-m", "m1", "-d", "toy", "--arch", "conv1x1", "--preset", "tiny",
            "--epochs", "2", "--max-segments", "4", "--shift", "1024", "--device", "cpu", "--work", env["work"]]
    code, out, err = run_cli([*base, "--name", "sum-valid"], capsys)
    assert code == 0, err
    text = out + err
    assert "best epoch" in text and " of 2, valid loss " in text and "sum-valid" in text
    assert "TrainResult" not in text and "metrics=" not in text and "train_loss" not in text
    code, out, err = run_cli([*base, "--name", "sum-last", "--select", "last"], capsys)
    assert code == 0 and "last epoch kept (2 of 2, no validation)" in out + err
    code, out, err = run_cli([*base, "--name", "sum-last", "--select", "last"], capsys)   # finished: same line
    assert code == 0 and "last epoch kept (2 of 2, no validation)" in out + err


# ---- item 7: train-base ingests a dataset folder itself ------------------------------------------
def test_train_base_ingests_a_dataset_folder(env, capsys):
    from core.datasets import open_dataset
    from core.store import StemStore

    work = env["root"] / "w-train-base"
    code, out, err = run_cli(["train-base", "-f", "umx", "--preset", "tiny", "-d", env["ds"], "--epochs", "1",
                              "--device", "cpu", "--work", work], capsys)
    assert code == 0, err
    assert "model written to" in out + err
    ds_id = open_dataset(env["ds"]).id
    store = StemStore(work / "store")
    assert all(store.has_track(ds_id, t) for t in store.tracks(ds_id))
    assert (work / "runs" / "umx-tiny" / "model" / "separator.json").exists()


# ---- item 8: estimates made elsewhere score exactly as museval on the files ----------------------
def test_evaluate_estimates_are_museval_exact(tmp_path, capsys):
    """`evaluate --estimates NAME=DIR` scores the files' samples (16-bit PCM: float32-exact;
    float64 WAV: kept in float64), not float16-rounded ones: museval's SDR on the same files.
    Two sources keep museval itself fast (its cost grows steeply with the source count)."""
    import museval
    import pandas as pd

    from core.metrics import framewise_sdr

    rate, sources = 8000, ("bass", "vocals")
    ds, est = tmp_path / "ds", tmp_path / "est"
    write_stem_track(ds, "train", "t0", sources=sources, n=rate, rate=rate, seed=0)
    refs = write_stem_track(ds, "test", "t1", sources=sources, n=2 * rate + 300, rate=rate, seed=1)
    rng = np.random.default_rng(5)
    (est / "test" / "t1").mkdir(parents=True)
    for j, (s, subtype) in enumerate(zip(sources, ("PCM_16", "DOUBLE"))):
        x = refs[j] + 0.05 * rng.standard_normal(refs[j].shape)
        sf.write(est / "test" / "t1" / f"{s}.wav", x.T, rate, subtype=subtype)
    code, _, err = run_cli(["evaluate", "-d", ds, "--split", "test", "--estimates", f"ext={est}",
                            "--no-oracles", "--out", tmp_path / "report", "--work", tmp_path / "work"],
                           capsys)
    assert code == 0, err
    scores = pd.read_csv(tmp_path / "report" / "scores.csv")
    ours = scores[(scores.system == "ext") & (scores.metric == "SDR")]
    r = np.stack([sf.read(ds / "test" / "t1" / f"{s}.wav", dtype="float64")[0].T for s in sources])
    e = np.stack([sf.read(est / "test" / "t1" / f"{s}.wav", dtype="float64")[0].T for s in sources])
    sdr, *_ = museval.evaluate(np.moveaxis(r, 1, 2), np.moveaxis(e, 1, 2), win=rate, hop=rate)
    got = np.stack([ours[ours.target == s].sort_values("frame")["value"].to_numpy() for s in sources])
    assert got.shape == sdr.shape and sdr.shape[1] >= 2
    assert np.nanmax(np.abs(got - sdr)) < 1e-9, got - sdr
    # what the float16 stem store would have scored: measurably off, unlike the above
    f16 = framewise_sdr(r, e.astype(np.float16), win=rate, hop=rate)
    assert np.nanmax(np.abs(f16 - sdr)) > 1e-7
