"""`pipeline run`: an experiment file drives every stage; a second run reuses everything."""

import pytest
from conftest import REPO, run_cli

from core.errors import PipelineError
from pipeline.experiment import load_experiment

CONFIGS = REPO / "pipeline" / "configs"
SHIPPED = ("umx-synth", "xumx-synth", "demucs-synth")

TINY = """
name = "tiny"
offline = true
device = "cpu"

[dataset]
path = "synthetic"
[dataset.generate]
seed = 1
train = 2
valid = 1
test = 1
duration = 4.0

[[models]]
spec = "umx-synth"
[[models]]
spec = "xumx-synth"
[[models]]
spec = "demucs-synth"

[[systems]]
name = "blend"
method = "blend"
step = 0.1

[[systems]]
name = "conv1x1"
method = "conv1x1"
preset = "tiny"
epochs = 2
shift = 16384

[[systems]]
name = "mdx"
method = "mdx-mixer"
preset = "tiny"
epochs = 1
shift = 16384
models = ["umx-synth", "demucs-synth"]
with_mixture = false

[evaluate]
split = "test"
"""


def test_shipped_configs_are_valid():
    for path in sorted(CONFIGS.glob("*.toml")):
        config = load_experiment(path)
        assert config["models"] and config.get("systems")
    demo = load_experiment(CONFIGS / "demo.toml")
    assert [m["spec"] for m in demo["models"]] == list(SHIPPED)
    from mixer.methods import names  # every ensemble method, side by side
    for name in ("demo", "musdb18-7"):
        config = load_experiment(CONFIGS / f"{name}.toml")
        assert {s["method"] for s in config["systems"]} == set(names()), name


def test_bad_experiment_files(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[dataset]\npath = "synthetic"\n')
    with pytest.raises(PipelineError, match="missing 'models'"):
        load_experiment(bad)
    bad.write_text(TINY.replace('method = "blend"', 'method = "magic"'))
    with pytest.raises(PipelineError, match="method 'magic'"):
        load_experiment(bad)
    bad.write_text(TINY.replace('method = "blend"', 'method = "blend"\nstpe = 0.1'))
    with pytest.raises(PipelineError, match="unknown key.*stpe"):
        load_experiment(bad)
    bad.write_text("name = [")
    with pytest.raises(PipelineError, match="not a valid experiment file"):
        load_experiment(bad)
    # the blend's `search` option is an experiment key, checked against its choices
    bad.write_text(TINY.replace("step = 0.1", 'step = 0.1\nsearch = "local"'))
    assert next(s for s in load_experiment(bad)["systems"] if s["name"] == "blend")["search"] == "local"
    bad.write_text(TINY.replace("step = 0.1", 'step = 0.1\nsearch = "fast"'))
    with pytest.raises(PipelineError, match="search 'fast': choose one of auto, exhaustive, local") as e:
        load_experiment(bad)
    assert "\n" not in str(e.value)


@pytest.mark.skipif(not all((REPO / "separators" / "checkpoints" / n).is_dir() for n in SHIPPED),
                    reason="shipped checkpoints not present")
def test_run_end_to_end_then_reuse(tmp_path, capsys):
    config, work = tmp_path / "tiny.toml", tmp_path / "work"
    config.write_text(TINY)
    code, out, err = run_cli(["run", config, "--work", work], capsys)
    assert code == 0, err
    report = work / "reports" / "tiny"
    summary = (report / "summary.md").read_text()
    for system in ("umx-synth", "xumx-synth", "demucs-synth", "best per source", "average", "blend",
                   "conv1x1", "mdx", "oracle: IRM"):
        assert f"| {system} |" in summary, system
    assert "Best system:" in summary and "Best system:" in out
    for png in ("sdr_boxplot.png", "weights-blend.png", "weights-conv1x1.png", "weights-mdx.png"):
        assert (report / png).exists(), png
    mixer = work / "runs" / "tiny-conv1x1" / "mixer.pt"
    stamp = {p: p.stat().st_mtime_ns for p in (work / "store").rglob("*.npy")}
    stamp[mixer] = mixer.stat().st_mtime_ns
    code, out2, err = run_cli(["run", config, "--work", work], capsys)   # timed: bench_fast_paths.py
    assert code == 0, err
    assert "0 tracks separated" in err
    assert {p: p.stat().st_mtime_ns for p in stamp} == stamp  # nothing recomputed
    assert (report / "summary.md").read_text() == summary


def test_one_spec_with_and_without_tta_gives_two_members(monkeypatch):
    """Two [[models]] entries of the same spec, one with `tta`: both are members, the spec names
    the plain one (its own name), the TTA one is named by its own name or the entry's `name`."""
    import cache.run
    from pipeline.experiment import _system_models, cache_stage

    def fake_cache_spec(store, dataset, spec, options=None, **_):
        tta = (options or {}).get("tta")
        name = f"{spec}+tta" if tta else spec
        return [{"key": f"{name}-key", "name": name, "computed": 0, "skipped": 1, "seconds": 0.0}]

    monkeypatch.setattr(cache.run, "cache_spec", fake_cache_spec)
    config = {"models": [{"spec": "umx-synth"}, {"spec": "umx-synth", "tta": "flip,polarity"},
                         {"spec": "demucs-synth", "name": "hd", "tta": "flip"},
                         {"spec": "demucs-synth", "name": "hd-plain"}]}
    keys, all_keys = cache_stage(config, None, None, {}, splits=None, device="cpu",
                                 progress=False, log=lambda *_: None)
    assert all_keys == ["umx-synth-key", "umx-synth+tta-key", "demucs-synth+tta-key",
                        "demucs-synth-key"]
    assert keys["umx-synth"] == ["umx-synth-key"] and keys["umx-synth+tta"] == ["umx-synth+tta-key"]
    assert keys["hd"] == ["demucs-synth+tta-key"] and keys["demucs-synth"] == ["demucs-synth-key"]
    assert _system_models({"models": ["umx-synth+tta", "hd-plain"]}, keys, all_keys) == \
        ["umx-synth+tta-key", "demucs-synth-key"]
    assert _system_models({}, keys, all_keys) == all_keys
    config["models"] = [{"spec": "a.th", "niter": 0}, {"spec": "a.th", "niter": 1}]
    monkeypatch.setattr(cache.run, "cache_spec", lambda store, dataset, spec, options=None, **_: [
        {"key": f"k{options['niter']}", "name": f"m{options['niter']}", "computed": 0,
         "skipped": 1, "seconds": 0.0}])
    keys, _ = cache_stage(config, None, None, {}, splits=None, device="cpu", progress=False,
                          log=lambda *_: None)
    with pytest.raises(PipelineError, match="several \\[\\[models\\]\\] entries share"):
        _system_models({"models": ["a.th"]}, keys, ["k0", "k1"])


def test_remixes_are_cached_only_for_the_entries_fitted_on_them():
    """A trained name two [[models]] entries share (the model, and the model with other options
    under its own name) names the plain entry: only it is cached on the remixes a system fits on."""
    from pipeline.experiment import remix_models

    config = {"models": [{"trained": "a"}, {"trained": "a", "name": "a+one-fold", "crossfit_unseen": "one"},
                         {"trained": "b"}],
              "systems": [{"name": "s1", "models": ["a", "b"], "extra_data": ["r"]},
                          {"name": "s2", "models": ["a+one-fold", "b"]}]}
    assert remix_models(config, {"r": None, "q": None}) == {"r": [0, 2], "q": []}
    config["systems"].append({"name": "s3", "models": ["a+one-fold"], "extra_data": ["q"]})
    assert remix_models(config, {"r": None, "q": None}) == {"r": [0, 2], "q": [1]}
    del config["systems"][0]["models"]   # no models: every entry
    assert remix_models(config, {"r": None, "q": None}) == {"r": [0, 1, 2], "q": [1]}
