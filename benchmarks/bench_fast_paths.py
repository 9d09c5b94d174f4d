"""Benchmark: the paths that must be immediate, timed here rather than in tests (wall-clock asserts
flake on a busy shared machine; the tests check what happens, this checks how fast).

(a) Offline, a model whose files are missing fails at once with its one-line error: htdemucs,
    umxhq and xumx with empty torch hub / Hugging Face caches, an MSST config without its
    checkpoint, a missing UVR MDX-Net .onnx. Goal: < 1 s each (the family's import excluded).
(b) `pipeline run` of an experiment that has already run (tests/test_experiment.py's TINY: the
    shipped checkpoints on a 4-track synthetic dataset, a blend, a conv1x1, an MDX-Mixer, the
    evaluation) reuses every stage. Goal: the second run < 60 s. The first run is set-up
    (a few minutes on 2 cores).

    .venv/bin/python benchmarks/bench_fast_paths.py [--parts ab]

Exits 1 when a goal is missed.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))
sys.path.insert(0, str(REPO / "tests"))
from bench_cache import machine_line  # noqa: E402
from goals import check, finish  # noqa: E402


def offline_failures(tmp: Path) -> list[tuple[str, float, str]]:
    """(what, seconds, the error's first 80 characters) per missing model."""
    import huggingface_hub.constants as constants
    import yaml
    from test_msst import ZOO

    import separators.families.demucs  # noqa: F401  (imports are not what is measured)
    import separators.families.msst  # noqa: F401
    import separators.families.umx  # noqa: F401
    import separators.families.uvr  # noqa: F401
    import separators.families.xumx  # noqa: F401
    from core.errors import PipelineError
    from separators.registry import load_separator

    tmp.mkdir(parents=True, exist_ok=True)
    os.environ["TORCH_HOME"] = str(tmp / "torch")
    constants.HF_HUB_CACHE = str(tmp / "hf")
    config = tmp / "config_bs_roformer.yaml"
    config.write_text(yaml.dump(ZOO["bs_roformer"][0], sort_keys=False))
    specs = {"demucs htdemucs": "htdemucs", "Open-Unmix umxhq": "umxhq", "X-UMX xumx": "xumx",
             "MSST checkpoint": f"{config}:{tmp / 'model_bs_roformer.ckpt'}",
             "UVR MDX-Net .onnx": str(tmp / "UVR-MDX-NET-Inst_HQ_3.onnx")}
    rows = []
    for what, spec in specs.items():
        t0 = time.perf_counter()
        try:
            load_separator(spec, offline=True)
            message = "loaded (expected a PipelineError)"
        except PipelineError as e:
            message = str(e)
        rows.append((what, time.perf_counter() - t0, message))
    return rows


def rerun_experiment(tmp: Path) -> tuple[float, float, bool]:
    """(first run s, second run s, second run recomputed nothing)."""
    from test_experiment import TINY

    from pipeline.cli import main

    config, work = tmp / "tiny.toml", tmp / "work"
    config.write_text(TINY)

    def run() -> tuple[float, str]:
        err = io.StringIO()
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["run", str(config), "--work", str(work)])
            except SystemExit as e:
                if e.code:
                    sys.exit(f"pipeline run failed: {err.getvalue()[-2000:]}")
        return time.perf_counter() - t0, err.getvalue()

    first, _ = run()
    stamps = {p: p.stat().st_mtime_ns for p in (work / "store").rglob("*.npy")}
    second, log = run()
    same = {p: p.stat().st_mtime_ns for p in stamps} == stamps and "0 tracks separated" in log
    return first, second, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--parts", default="ab", help="which of (a), (b) to run (default ab)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    print(machine_line(args.threads))
    with tempfile.TemporaryDirectory(prefix="bench_fast_paths-") as tmp:
        tmp = Path(tmp)
        if "a" in args.parts:
            print("\n(a) offline, a missing model's error (goal < 1 s each)")
            for what, seconds, message in offline_failures(tmp / "a"):
                ok = check(seconds < 1.0 and "loaded" not in message, f"offline {what} < 1 s")
                print(f"  {what:<20} {seconds:6.3f} s  {ok}  {message[:80]}")
        if "b" in args.parts:
            (tmp / "b").mkdir()
            first, second, same = rerun_experiment(tmp / "b")
            print(f"\n(b) pipeline run of tests/test_experiment.py's TINY experiment: first run "
                  f"{first:.0f} s; again {second:.1f} s (goal < 60 s, nothing recomputed) -> "
                  f"{check(second < 60 and same, 'finished experiment re-run < 60 s')}")
    finish()


if __name__ == "__main__":
    main()
