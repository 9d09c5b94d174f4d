import os
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

REPO = Path(__file__).resolve().parents[1]
MUSDB18_7 = Path(os.environ.get("MUSDB18_7_ROOT", REPO.parent / "shared" / "data" / "musdb18-7"))

def pytest_collection_modifyitems(config, items):
    """`@pytest.mark.cuda` tests run only where CUDA is (`make gpu-check` selects them)."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


needs_musdb18_7 = pytest.mark.skipif(not (MUSDB18_7 / "train").is_dir(),
                                     reason=f"MUSDB18-7 previews not found at {MUSDB18_7}")


def write_stem_track(root: Path, subset: str, name: str, sources=("drums", "bass", "other", "vocals"),
                     n=8000, rate=8000, seed=0, mixture=True, channels=2):
    """A small stem-folder track with noise stems; returns the stems array [S, C, n]."""
    rng = np.random.default_rng(seed)
    d = root / subset / name
    d.mkdir(parents=True, exist_ok=True)
    stems = (0.1 * rng.standard_normal((len(sources), channels, n))).astype(np.float32)
    for s, x in zip(sources, stems):
        sf.write(d / f"{s}.wav", x.T, rate, subtype="FLOAT")
    if mixture:
        sf.write(d / "mixture.wav", stems.sum(0).T, rate, subtype="FLOAT")
    return stems


@pytest.fixture
def stem_dataset(tmp_path):
    root = tmp_path / "ds"
    for i, subset in enumerate(["train", "train", "valid", "test"]):
        write_stem_track(root, subset, f"track{i}", seed=i)
    return root


def run_cli(args, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    from pipeline.cli import main

    try:
        main(list(map(str, args)))
        code = 0
    except SystemExit as e:
        code = e.code or 0
    out = capsys.readouterr()
    return code, out.out, out.err
