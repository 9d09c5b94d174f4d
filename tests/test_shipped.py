"""The shipped checkpoints load offline and reproduce the test SDRs their model cards state."""
import re

import pytest
import torch
from conftest import REPO

from cache.run import ingest_dataset
from core.datasets import open_dataset
from core.store import StemStore
from core.synth import generate_dataset
from separators.train_base import evaluate_trained

CHECKPOINTS = REPO / "separators" / "checkpoints"
SHIPPED = ("umx-synth", "xumx-synth", "demucs-synth")


@pytest.fixture(scope="module")
def synthetic_test_split(tmp_path_factory):
    # Tracks depend only on (seed, split, index), so the default dataset's test split can be
    # generated alone: the same 6 x 20 s tracks the cards were measured on.
    root = generate_dataset(tmp_path_factory.mktemp("synth") / "synthetic", seed=0, n_train=0,
                            n_valid=0, n_test=6, duration=20.0, progress=False)
    store = StemStore(tmp_path_factory.mktemp("store"))
    ds = open_dataset(root)
    ingest_dataset(store, ds, progress=False)
    return store, ds.id


def card_scores(name: str) -> dict[str, float]:
    card = (CHECKPOINTS / name / "MODEL.md").read_text()
    section = card.split("<!-- test-sdr -->", 1)[1].split("<!-- /test-sdr -->", 1)[0]
    assert "synthetic" in section and "(6 tracks)" in section
    return {m.group(1): float(m.group(2))
            for m in re.finditer(r"^\| (drums|bass|other|vocals) \| (-?[\d.]+) \|$", section, re.M)}


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_checkpoint_matches_its_card(name, synthetic_test_split, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    store, ds_id = synthetic_test_split
    stated = card_scores(name)
    assert set(stated) == {"drums", "bass", "other", "vocals"}
    torch.set_num_threads(2)
    measured = evaluate_trained(store, ds_id, CHECKPOINTS / name, split="test", write_card=False)
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
