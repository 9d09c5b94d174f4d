"""CUDA paths (`@pytest.mark.cuda`: skipped without a GPU; `make gpu-check` runs them), and the
GPU check script's CPU-only dry run, which keeps it working while no GPU is around."""
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from test_mixer import SOURCES, make_store

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.cuda
def test_mixer_trains_with_bf16_autocast_and_applies_like_cpu(tmp_path):
    from mixer.apply import apply_run
    from mixer.train import train_mixer

    store = make_store(tmp_path / "store", {"m0": (SOURCES, np.eye(4)), "m1": (SOURCES, 0.5 * np.eye(4))},
                       splits=(("train", 2), ("valid", 1)), length=8192)
    result = train_mixer(store, "toy", ["m0", "m1"], "mdx-mixer", tmp_path / "run", preset="tiny",
                         epochs=2, batch=2, shift=1024, device="cuda", amp="bf16", progress=False)
    assert all(np.isfinite([m["train_loss"], m["valid_loss"]]).all() for m in result.metrics)
    t = store.tracks("toy", "valid")[0]
    stems = {k: store.stems(k, "toy", t) for k in ("m0", "m1")}
    on_gpu = apply_run(tmp_path / "run", store.mixture("toy", t), stems, device="cuda")
    on_cpu = apply_run(tmp_path / "run", store.mixture("toy", t), stems, device="cpu")
    np.testing.assert_allclose(on_gpu, on_cpu, atol=2e-2)   # bf16 autocast on the GPU side


@pytest.mark.cuda
def test_ranks_share_the_gpus_round_robin(monkeypatch):
    from core.config import default_device, local_cuda_index

    assert default_device() == "cuda"
    monkeypatch.setenv("LOCAL_RANK", str(torch.cuda.device_count()))   # one rank too many
    assert local_cuda_index() == 0 and default_device() == "cuda:0"


def test_gpu_check_dry_run(tmp_path):
    """Every step of benchmarks/gpu_check.py on the CPU at small sizes: tiny models saved in
    their real formats and cached by name, a mixer trained, 2-process gloo DDP with identical
    weights on both ranks, the summary table."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--dry-run",
                           "--work", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    table = proc.stdout[proc.stdout.index("| check |"):]
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert len(rows) == 4 and all("| PASS |" in r for r in rows), table
    assert "weights bit-identical" in table and "steps/s" in table
    # the tiny HTDemucs went through the real `htdemucs` path: <sig>-<sha256[:8]>.th in --repo
    assert list((tmp_path / "weights").glob("955717e8-*.th"))
