"""`pipeline run` with [[train]] stages: from nothing to the report in one command, finished
trainings kept as they are, interrupted ones resumed, and the evaluation split never read before
the evaluation."""
import csv
import json

import pytest
import torch
from conftest import run_cli

from core.errors import PipelineError
from pipeline.experiment import load_experiment

EXPERIMENT = """
name = "honest"
offline = true
device = "cpu"

[dataset]
path = "synthetic"
[dataset.generate]
seed = 4
train = 4
valid = 2
test = 1
duration = 3.0
rate = 8000

[[train]]
name = "tiny-umx"
family = "umx"
preset = "tiny"
epochs = 1
select_split = "select"

[[train]]
name = "tiny-demucs"
family = "demucs"
preset = "tiny"
epochs = 1
select_split = "select"
seed = 1
model = { channels = 4 }
train = { lr_schedule = "constant" }

[[models]]
trained = "tiny-umx"

[[models]]
trained = "tiny-demucs"
name = "demucs"

[[systems]]
name = "blend"
method = "blend"
step = 0.25
split = "select"

[[systems]]
name = "conv1x1"
method = "conv1x1"
preset = "tiny"
epochs = 2
shift = 4096
select = "select"
models = ["tiny-umx", "demucs"]

[[systems]]
name = "mdx"
method = "mdx-mixer"
preset = "tiny"
epochs = 1
shift = 4096
select = "last"
base = "conv1x1"                  # residual: W_k = W + ΔW_k from the conv1x1's W
penalty = 0.1

[evaluate]
split = "valid"
selection_split = "select"
"""

READS = ("_track_audio", "mixture_file", "track_file", "stems", "stems_file")


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _config(tmp_path, text=EXPERIMENT, name="honest.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def _spy(monkeypatch):
    """Record, in order, every read of a track's audio or stems from the store (method, track
    id) and the start and end of every fitting stage and of the evaluation."""
    import mixer.blend
    import mixer.train
    import reports.evaluate
    import separators.train_base
    from core.store import StemStore

    events = []
    for method in READS:
        original = getattr(StemStore, method)

        def spy(self, dataset_id, *args, _original=original, _method=method):
            track = args[-1]
            events.append(("read", _method, track.id if hasattr(track, "id") else track))
            return _original(self, dataset_id, *args)

        monkeypatch.setattr(StemStore, method, spy)

    def mark(module, name):
        original = getattr(module, name)

        def marked(*args, **kwargs):
            events.append(("start", name))
            try:
                return original(*args, **kwargs)
            finally:
                events.append(("end", name))

        monkeypatch.setattr(module, name, marked)

    mark(separators.train_base, "train_base")
    mark(mixer.blend, "search_blend")   # what the blend method's record calls
    mark(mixer.train, "train_mixer")
    mark(reports.evaluate, "evaluate")
    return events


def test_nothing_reads_the_evaluation_split_before_the_evaluation(tmp_path, monkeypatch, capsys):
    events = _spy(monkeypatch)
    work = tmp_path / "work"
    code, out, err = run_cli(["run", _config(tmp_path), "--work", work], capsys)
    assert code == 0, err
    from core.store import StemStore

    store = StemStore(work / "store")
    ds = store.datasets()[0]
    valid = {t.id for t in store.tracks(ds, "valid")}
    select = {t.id for t in store.tracks(ds, "select")}
    assert len(valid) == 2 and len(select) == 1

    evaluation = events.index(("start", "evaluate"))
    last_fit = max(i for i, e in enumerate(events) if e[0] == "end" and e[1] != "evaluate")
    fits = [e[1] for e in events if e[0] == "start"]
    assert fits == ["train_base", "train_base", "search_blend", "train_mixer", "train_mixer",
                    "evaluate"]
    before = [e for e in events[:evaluation] if e[0] == "read" and e[2] in valid]
    # Before the evaluation a valid track's mixture is read only to separate it with the base
    # models, and only once everything is fitted; its references and stems are never read.
    assert {e[1] for e in before} == {"mixture_file"}
    assert all(i > last_fit for i, e in enumerate(events[:evaluation])
               if e[0] == "read" and e[2] in valid)
    # the selection split was read while fitting (the spy sees reads), the valid split after
    assert any(e[0] == "read" and e[2] in select for e in events[:last_fit])
    after = {(e[1], e[2]) for e in events[evaluation:] if e[0] == "read"}
    assert {("_track_audio", t) for t in valid} <= after

    # what the report says was chosen where
    summary = (work / "reports" / "honest" / "summary.md").read_text()
    assert "chosen on the select split" in summary
    for system in ("tiny-umx", "tiny-demucs", "blend", "conv1x1", "mdx"):
        assert f"| {system} |" in summary, system
    conv = json.loads((work / "runs" / "honest-conv1x1" / "config.json").read_text())
    assert conv["training"]["split"] == "fit" and conv["training"]["valid_split"] == "select"
    mdx = json.loads((work / "runs" / "honest-mdx" / "config.json").read_text())
    assert mdx["hyper"]["residual"]["base"] == str(work / "runs" / "honest-conv1x1")
    blend = json.loads((work / "runs" / "honest-blend" / "config.json").read_text())
    assert sorted(blend["validation"]["tracks"]) == sorted(t.name for t in store.tracks(ds, "select"))
    trained = json.loads((work / "runs" / "tiny-umx" / "config.json").read_text())
    assert trained["splits"]["fit"] == "fit" and trained["splits"]["select"] == "select"
    assert "[train] tiny-umx: trained in" in err


def _mtimes(folder, pattern="*"):
    return {p: p.stat().st_mtime_ns for p in folder.rglob(pattern) if p.is_file()}


def test_trainings_are_kept_when_finished_and_resumed_when_interrupted(tmp_path, capsys):
    work = tmp_path / "work"
    # the first base model trained by hand, as `pipeline train-base` would, before the experiment
    code, _, err = run_cli(["make-dataset", "--work", work, "--seed", "4", "--train", "4",
                            "--valid", "2", "--test", "1", "--duration", "3", "--rate", "8000"],
                           capsys)
    assert code == 0, err
    code, _, err = run_cli(["cache", "-d", "synthetic", "--work", work], capsys)
    assert code == 0, err
    code, _, err = run_cli(["train-base", "-f", "umx", "--preset", "tiny", "-d", "synthetic",
                            "--name", "tiny-umx", "--epochs", "1", "--select-split", "select",
                            "--device", "cpu", "--work", work], capsys)
    assert code == 0, err
    by_hand = _mtimes(work / "runs" / "tiny-umx")
    # the second one interrupted after its first of two epochs
    two_epochs = EXPERIMENT.replace('family = "demucs"\npreset = "tiny"\nepochs = 1',
                                    'family = "demucs"\npreset = "tiny"\nepochs = 2')
    assert two_epochs != EXPERIMENT
    config = _config(tmp_path, two_epochs)
    import separators.train_base as tb
    from core.config import store_dir
    from core.store import StemStore

    store = StemStore(store_dir(work))
    tb.train_base(store, store.datasets()[0], "demucs", "tiny", work / "runs" / "tiny-demucs",
                  seed=1, epochs=1, select_split="select", model_options={"channels": 4},
                  train_options={"lr_schedule": "constant"}, device="cpu", progress=False)
    first_epoch = (work / "runs" / "tiny-demucs" / "metrics.csv").read_text().splitlines()[1]

    code, out, err = run_cli(["run", config, "--work", work], capsys)
    assert code == 0, err
    assert "[train] tiny-umx: finished earlier, kept" in err
    assert "[train] tiny-demucs: trained in" in err
    assert _mtimes(work / "runs" / "tiny-umx") == by_hand   # not retrained, not re-exported
    rows = list(csv.DictReader((work / "runs" / "tiny-demucs" / "metrics.csv").open()))
    assert [r["epoch"] for r in rows] == ["1", "2"]      # resumed: epoch 1 is the earlier one
    assert (work / "runs" / "tiny-demucs" / "metrics.csv").read_text().splitlines()[1] == first_epoch

    # models, checkpoints, mixers and stems stay as they are
    everything = (_mtimes(work / "runs", "*.pt") | _mtimes(work / "runs", "model/*")
                  | _mtimes(work / "store", "*.npy"))
    code, out2, err = run_cli(["run", config, "--work", work], capsys)
    assert code == 0, err
    assert "[train] tiny-demucs: finished earlier, kept" in err
    assert "0 tracks separated" in err and "tracks separated, 0 cached" not in err
    assert (_mtimes(work / "runs", "*.pt") | _mtimes(work / "runs", "model/*")
            | _mtimes(work / "store", "*.npy")) == everything


def test_bad_train_and_models_tables(tmp_path):
    cases = [
        (EXPERIMENT.replace('select_split = "select"\n', 'select_split = "select"\nepocs = 3\n', 1),
         r"\[\[train\]\] 'tiny-umx' has unknown key\(s\) epocs"),
        (EXPERIMENT.replace('family = "umx"', 'family = "wavenet"'), "family 'wavenet'"),
        (EXPERIMENT.replace('preset = "tiny"', 'preset = "huge"', 1), "preset 'huge'"),
        (EXPERIMENT.replace('model = { channels = 4 }', 'model = { channels = 4 }').replace(
            'train = { lr_schedule = "constant" }', 'train = { lr_shedule = "constant" }'),
         "'tiny-demucs': demucs: unknown train option 'lr_shedule'"),
        (EXPERIMENT.replace('trained = "tiny-umx"', 'trained = "tiny-unmix"'),
         "trained = 'tiny-unmix', which is not a \\[\\[train\\]\\] stage"),
        (EXPERIMENT.replace('trained = "tiny-umx"', 'trained = "tiny-umx"\nspec = "umx-synth"'),
         "either a 'spec'"),
        (EXPERIMENT.replace('trained = "tiny-umx"', 'trained = "tiny-umx"\nnitr = 1'),
         "unknown key\\(s\\) nitr"),
        (EXPERIMENT.replace('name = "tiny-demucs"', 'name = "tiny-umx"'), "unique 'name'"),
        (EXPERIMENT.replace('selection_split = "select"', 'selection-split = "select"'),
         r"\[evaluate\] has unknown key\(s\) selection-split"),
        # anything fitted or selected on the evaluation split is refused
        (EXPERIMENT.replace('select_split = "select"\n', '', 1),
         "'tiny-umx' \\(best epoch\\) would use the 'valid' split"),
        (EXPERIMENT.replace('step = 0.25\nsplit = "select"', 'step = 0.25\nsplit = "valid"'),
         "'blend' \\(blend search\\) would use the 'valid' split"),
        (EXPERIMENT.replace('select = "last"', 'select = "valid"'),
         "'mdx' \\(mdx-mixer best epoch\\) would use the 'valid' split"),
        (EXPERIMENT.replace('base = "conv1x1"', 'base = "blend"'),
         "has base = 'blend': name a conv1x1 system listed before it \\(conv1x1\\)"),
        (EXPERIMENT.replace('selection_split = "select"', 'selection_split = "valid"'),
         "selection_split \\(best per source\\) would use the 'valid' split"),
        (EXPERIMENT.replace('split = "valid"\nselection_split', 'split = "train"\nselection_split'),
         "would use the 'select' split, which overlaps the evaluation split 'train'"),
    ]
    for i, (text, message) in enumerate(cases):
        with pytest.raises(PipelineError, match=message):
            load_experiment(_config(tmp_path, text, f"bad{i}.toml"))
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    import yaml as pyyaml

    yaml = tmp_path / "good.yaml"   # the YAML form of the same experiment validates the same way
    yaml.write_text(pyyaml.safe_dump(tomllib.loads(EXPERIMENT)))
    assert load_experiment(yaml)["train"][1]["model"] == {"channels": 4}


CROSSFIT = """
name = "crossfit"
offline = true
device = "cpu"

[dataset]
path = "synthetic"
[dataset.generate]
seed = 4
train = 5
valid = 1
test = 1
duration = 3.0
rate = 8000

[[train]]
name = "cf-umx"
family = "umx"
preset = "tiny"
epochs = 1
select_split = "select"
folds = 2

[[train]]
name = "umx"
family = "umx"
preset = "tiny"
epochs = 1
select_split = "select"
seed = 1

[[remix]]
name = "remixes"
split = "fit"
n = 4
seed = 0
duration = 1.0
folds_of = "cf-umx"

[[models]]
trained = "cf-umx"

[[models]]
trained = "umx"

[[systems]]
name = "blend"
method = "blend"
step = 0.25
split = "train"
extra_data = ["remixes"]

[[systems]]
name = "conv1x1"
method = "conv1x1"
preset = "tiny"
epochs = 1
shift = 4096
select = "last"
models = ["cf-umx"]
extra_data = ["remixes"]

[evaluate]
split = "valid"
selection_split = "train"
"""


def test_an_experiment_cross_fits_remixes_and_fits_on_both(tmp_path, capsys):
    """[[train]] folds, a [[remix]] stage drawing per fold, systems fitting on train plus the
    remixes: from nothing in one `pipeline run`; models are cached on the remixes only where a
    system fits on them."""
    work = tmp_path / "work"
    code, out, err = run_cli(["run", _config(tmp_path, CROSSFIT), "--work", work], capsys)
    assert code == 0, err
    assert "[train] cf-umx: trained in" in err and "cross-fitted: 2 fold models" in err
    assert "[remix] remixes: 4 remixes of 1 s from the 'fit' tracks" in err
    from core.config import store_dir
    from core.datasets import open_dataset
    from core.store import StemStore

    store = StemStore(store_dir(work))
    remixes = open_dataset(work / "data" / "remixes").id
    cf, plain = store.resolve_model("cf-umx"), store.resolve_model("umx")
    assert store.model_info(cf)["family"] == "crossfit"
    on_remixes = lambda key: sum(store.has_stems(key, remixes, t) for t in store.tracks(remixes))  # noqa: E731
    assert on_remixes(cf) == 4 and on_remixes(plain) == 4   # the blend fits both on them
    conv = json.loads((work / "runs" / "crossfit-conv1x1" / "config.json").read_text())
    assert conv["training"]["extra_data"] == [remixes]
    blend = json.loads((work / "runs" / "crossfit-blend" / "config.json").read_text())
    assert blend["options"]["extra_data"] == [remixes]
    assert sum(n.startswith(remixes + "/") for n in blend["validation"]["tracks"]) == 4
    assert "conv1x1" in out and "blend" in out

    bad = [
        (CROSSFIT.replace('extra_data = ["remixes"]', 'extra_data = ["musdb"]', 1),
         "extra_data 'musdb'; name \\[\\[remix\\]\\] stages \\(remixes\\)"),
        (CROSSFIT.replace('split = "fit"\nn = 4', 'split = "valid"\nn = 4'),
         "\\[\\[remix\\]\\] 'remixes' \\(its stems\\) would use the 'valid' split"),
        (CROSSFIT.replace('folds_of = "cf-umx"', 'folds_of = "umx"'),
         "folds_of = 'umx'; name a \\[\\[train\\]\\] stage with folds"),
        (CROSSFIT.replace('folds = 2', 'folds = 1'), "folds = 1 needs an integer >= 2"),
        (CROSSFIT.replace('seed = 0\nduration', 'seeds = 0\nduration'),
         "\\[\\[remix\\]\\] 'remixes' has unknown key\\(s\\) seeds"),
    ]
    for i, (text, message) in enumerate(bad):
        with pytest.raises(PipelineError, match=message):
            load_experiment(_config(tmp_path, text, f"bad-cf{i}.toml"))
