"""The Python API: the README's example runs as it is; an Ensemble separates like `pipeline
separate`; `evaluate --save-estimates` writes estimates that score to the report's numbers."""
from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    text = (REPO / "README.md").read_text()
    found = re.search(r"<!-- api-example -->\n```python\n(.*?)```", text, re.S)
    assert found, "README.md: the Python API example (after <!-- api-example -->) is missing"
    return found.group(1)


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    """The README's example, run in an empty folder; its globals."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("api"))
    try:
        scope = {}
        exec(compile(readme_example(), "README.md (api-example)", "exec"), scope)
        scope["cwd"] = Path.cwd()
        yield scope
    finally:
        os.chdir(here)
        torch.set_num_threads(threads)


def test_the_readme_example_runs(example):
    estimates, ensemble = example["estimates"], example["ensemble"]
    assert ensemble.method == "median-spec" and list(estimates) == ensemble.sources
    assert all(e.shape == example["mixture"].shape and e.dtype == np.float32
               for e in estimates.values())
    assert "| median-spec |" in example["report"]["summary"]


def test_an_ensemble_separates_as_pipeline_separate(example, capsys):
    """The array API and the command line give the same stems, through the same stem cache."""
    from conftest import run_cli

    from pipeline import api

    work = example["cwd"] / example["work"]
    rng = np.random.default_rng(3)
    audio = (0.1 * rng.standard_normal((1, 30000))).astype(np.float32)   # mono, another rate
    song = example["cwd"] / "song.wav"
    sf.write(song, audio.T, 22050, subtype="FLOAT")
    code, _, err = run_cli(["separate", song, "-e", "median-spec", "-o", example["cwd"] / "out",
                            "--work", work], capsys)
    assert code == 0, err
    ensemble = api.Ensemble("median-spec", work=work)
    from_array = ensemble.separate(audio, 22050)
    from_file, rate = ensemble.separate_file(song)
    assert rate == 22050
    for source in ensemble.sources:
        written, _ = sf.read(example["cwd"] / "out" / "song" / f"{source}.wav", always_2d=True,
                             dtype="float32")
        np.testing.assert_array_equal(from_array[source], written.T)
        np.testing.assert_array_equal(from_file[source], written.T)
    with pytest.raises(Exception, match="expected \\[n\\] or \\[channels, n\\]"):
        ensemble.separate(np.zeros((3, 100)), 22050)


def test_saved_estimates_score_to_the_report_numbers(example):
    from pipeline import api
    from reports.evaluate import EstimateFolder

    work = example["cwd"] / example["work"]
    saved = example["cwd"] / "estimates"
    first = api.evaluate("synthetic", runs=["median-spec"], split="test", html=False,
                         save_estimates=saved, out=example["cwd"] / "report-1", work=work)
    systems = sorted(first["scores"].system.unique())
    assert "median-spec" in systems and "oracle: IRM" in systems
    folders = {s: EstimateFolder.folder_name(s) for s in systems}
    evaluated = sorted(first["scores"].track.unique())
    for s, folder in folders.items():   # museval's layout, one WAV per source
        assert sorted(p.name for p in (saved / folder / "test").iterdir()) == evaluated, s
    names = {s: f"saved-{i}" for i, s in enumerate(systems)}
    second = api.evaluate("synthetic", estimates=[f"{names[s]}={saved / folders[s]}" for s in systems],
                          split="test", html=False, oracles=False, out=example["cwd"] / "report-2",
                          work=work)

    def table(df: pd.DataFrame, system: str) -> pd.DataFrame:
        rows = df[df.system == system].drop(columns="system")
        return rows.sort_values(list(rows.columns.drop("value"))).reset_index(drop=True)

    for s in systems:
        a, b = table(first["scores"], s), table(second["scores"], names[s])
        assert len(a) and len(a) == len(b), s
        pd.testing.assert_frame_equal(a, b, check_exact=True, obj=s)
    # a folder that holds something else is refused before anything is written
    other = example["cwd"] / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(Exception, match="not a folder of saved estimates"):
        api.evaluate("synthetic", split="test", html=False, save_estimates=other,
                     out=example["cwd"] / "report-3", work=work)
    assert sorted(p.name for p in other.iterdir()) == ["notes.txt"]
