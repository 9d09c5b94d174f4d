"""The shipped checkpoints load offline and reproduce the test SDRs their model cards state."""
import re

import pytest
import torch
from conftest import REPO

from cache.run import cache_model, ingest_dataset
from core.datasets import open_dataset
from core.store import StemStore
from core.synth import generate_dataset
from reports.evaluate import evaluate
from reports.report import summary_tables
from separators.registry import load_separator

CHECKPOINTS = REPO / "separators" / "checkpoints"
SHIPPED = ("umx-synth", "xumx-synth", "demucs-synth")


@pytest.fixture(scope="module")
def pipeline_scores(tmp_path_factory):
    """The shipped models scored by the pipeline's own stages: the cache stage separates the
    test split into the stem store (cache_model), the evaluate stage scores it (reports.evaluate,
    museval-exact framewise SDR, median over frames then over tracks: the report's table). Not
    through train_base.evaluate_trained, which wrote the cards: a bug there would have gone
    into the cards and come back out of a re-run unnoticed.

    Tracks depend only on (seed, split, index), so the default dataset's test split can be
    generated alone: the same 6 x 20 s tracks the cards were measured on."""
    root = generate_dataset(tmp_path_factory.mktemp("synth") / "synthetic", seed=0, n_train=0,
                            n_valid=0, n_test=6, duration=20.0, progress=False)
    store = StemStore(tmp_path_factory.mktemp("store"))
    ds = open_dataset(root)
    ingest_dataset(store, ds, progress=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        keys = [cache_model(store, ds, load_separator(str(CHECKPOINTS / name), offline=True),
                            progress=False)["key"] for name in SHIPPED]
    torch.set_num_threads(threads)
    names = [store.model_info(k)["name"] for k in keys]
    out = tmp_path_factory.mktemp("report")
    result = evaluate(store, ds.id, models=keys, runs=[], split="test", out=out,
                      cache_root=out / "scores", oracles=False, average=False, listening=False,
                      progress=False)
    table = summary_tables(result["scores"], list(ds.sources), names)[0]
    return {name: table.loc[shown] for name, shown in zip(SHIPPED, names)}


def card_scores(name: str) -> dict[str, float]:
    card = (CHECKPOINTS / name / "MODEL.md").read_text()
    section = card.split("<!-- test-sdr -->", 1)[1].split("<!-- /test-sdr -->", 1)[0]
    assert "synthetic" in section and "(6 tracks)" in section
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^\| (drums|bass|other|vocals) \| (-?[\d.]+) \|$", section, re.M)}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_matches_its_card(name, pipeline_scores):
    stated = card_scores(name)
    assert set(stated) == {"drums", "bass", "other", "vocals"}
    measured = pipeline_scores[name]
    for source, value in stated.items():
        assert abs(measured[source] - value) <= 0.1, (source, measured[source], value)


def test_shipped_checkpoints_are_small_and_documented():
    for name in SHIPPED:
        folder = CHECKPOINTS / name
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        assert size <= 20 * 2 ** 20, (name, size)
        card = (folder / "MODEL.md").read_text()
        for needle in ("train_base", "seed", "SDR"):
            assert needle in card, (name, needle)
