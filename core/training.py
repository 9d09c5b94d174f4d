"""A small, generic training loop: mixers now, base separators later.

Guarantees, in order of importance:

* Reproducible and resumable. The data order of epoch e comes from a sampler seeded with
  (seed, e), and the global torch RNG (dropout, augmentation) is re-seeded from (seed, e, rank) at
  the start of every epoch, so nothing random has to be checkpointed: a run killed after epoch e
  and resumed sees exactly the batches and dropout masks of an uninterrupted run, and on CPU
  reaches bit-identical weights.
* Crash-safe. After every epoch `last.pt` (model, optimizer, scheduler, scaler, epoch, metrics)
  is replaced atomically; `best.pt` is the checkpoint with the lowest validation loss. Both hold
  only tensors, numbers, strings and containers, so `torch.load(weights_only=True)` reads them.
* Scales without custom code: CUDA autocast (bf16 where supported, else fp16 with GradScaler),
  and under torchrun (WORLD_SIZE > 1) DistributedDataParallel with a DistributedSampler; only
  rank 0 writes files.

A batch is `(inputs, targets)`; the loss is `loss_fn(model(inputs), targets)`.
"""
from __future__ import annotations

import csv
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from core.config import local_cuda_index
from core.errors import PipelineError
from core.progress import progress_bar

LAST, BEST, METRICS = "last.pt", "best.pt", "metrics.csv"
METRIC_FIELDS = ("epoch", "train_loss", "valid_loss", "seconds", "lr")


@dataclass
class TrainResult:
    best_valid: float
    best_epoch: int
    metrics: list[dict]
    run_dir: Path

    @property
    def best_path(self) -> Path:
        return self.run_dir / BEST

    def summary(self) -> str:
        """One line for people: the epoch kept, its validation loss, where the run is."""
        epochs = len(self.metrics)
        if math.isnan(self.best_valid):   # no validation split was read: the last epoch is kept
            kept = f"last epoch kept ({self.best_epoch} of {epochs}, no validation)"
        else:
            kept = f"best epoch {self.best_epoch} of {epochs}, valid loss {self.best_valid:.4g}"
        return f"{kept}; run in {self.run_dir} (per-epoch losses in {METRICS})"


# ---- environment -----------------------------------------------------------------------------
def _distributed() -> tuple[int, int]:
    """(rank, world size); joins the torchrun process group when WORLD_SIZE > 1."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1
    if not dist.is_initialized():
        backend = "gloo"
        if torch.cuda.is_available():   # before NCCL starts, or every rank talks through GPU 0
            torch.cuda.set_device(local_cuda_index())
            # NCCL refuses two ranks on one GPU; gloo all-reduces CUDA tensors too
            shared = int(os.environ.get("LOCAL_WORLD_SIZE", "1")) > torch.cuda.device_count()
            backend = "gloo" if shared else "nccl"
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def resolve_device(device: str | torch.device | None, world: int = 1) -> torch.device:
    if world > 1 and torch.cuda.is_available():
        return torch.device("cuda", local_cuda_index())
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"device '{device}': CUDA is not available on this machine")
    return device


def amp_dtype(device: torch.device, amp: str) -> torch.dtype | None:
    """The autocast dtype: None (full precision) on CPU or with amp='off'."""
    if device.type != "cuda" or amp == "off":
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    if amp in ("fp16", "auto"):
        return torch.float16
    raise PipelineError(f"amp '{amp}': choose auto, bf16, fp16 or off")


def epoch_seed(seed: int, epoch: int, rank: int = 0) -> int:
    # Distinct, fixed streams per (seed, epoch, rank); 2**31 - 1 is prime, so no collisions for
    # any realistic epoch / rank counts.
    return (seed * 1_000_003 + epoch * 7_919 + rank) % (2 ** 31 - 1)


# ---- files -----------------------------------------------------------------------------------
def save_atomic(obj, path: Path) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, device="cpu") -> dict:
    return torch.load(path, map_location=device, weights_only=True)


def write_metrics(path: Path, rows: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=METRIC_FIELDS)
    writer.writeheader()
    writer.writerows({k: row[k] for k in METRIC_FIELDS} for row in rows)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(buf.getvalue())
    os.replace(tmp, path)


def cosine_schedule(epochs: int, floor: float = 0.1):
    """optimizer -> a per-epoch scheduler: half a cosine from lr down to floor x lr."""
    def make(optimizer):
        total = max(1, epochs)
        return torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda e: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(e, total) / total)))

    return make


# ---- the loop --------------------------------------------------------------------------------
def _to(batch, device):
    return [x.to(device, non_blocking=True) for x in batch]


def _mean_over_ranks(total: float, count: int, device, world: int) -> float:
    if world > 1:
        t = torch.tensor([total, count], dtype=torch.float64, device=device)
        dist.all_reduce(t)
        total, count = t.tolist()
    return total / max(count, 1)


def train(model: nn.Module, loss_fn: Callable, train_data: Dataset,
          valid: Dataset | Callable[[nn.Module], float] | None,
          make_optimizer: Callable[[list], torch.optim.Optimizer], *, epochs: int,
          batch_size: int, seed: int, run_dir: str | Path, device=None,
          make_scheduler: Callable | None = None, num_workers: int = 0, amp: str = "auto",
          max_batches_per_epoch: int | None = None, resume: bool = True,
          progress: bool = True, grad_clip: float | None = None,
          warmup_steps: int = 0) -> TrainResult:
    """Train `model` for `epochs` epochs in total (resuming from `run_dir/last.pt` if present).

    valid: a Dataset (mean `loss_fn` over it) or a function model -> validation loss; `best.pt`
        is the epoch with the lowest. None: no validation, `best.pt` is the last epoch (for data
        whose only held-out split is the one the result will be evaluated on).
    make_scheduler: optimizer -> scheduler stepped once per epoch, or None.
    warmup_steps: the first `warmup_steps` optimizer steps of the run scale the scheduled learning
        rate by step / warmup_steps (the linear warm-up of MSST's and transformers' schedulers):
        a transformer from random weights stalls or diverges at its full rate.
    The caller seeds torch before building the model so its initial weights are reproducible.
    """
    rank, world = _distributed()
    device = resolve_device(device, world)
    run_dir = Path(run_dir)
    if rank == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
    low = amp_dtype(device, amp)

    model.to(device)
    core = model
    optimizer = make_optimizer(list(core.parameters()))
    scheduler = make_scheduler(optimizer) if make_scheduler else None
    scaler = torch.amp.GradScaler("cuda", enabled=low == torch.float16)

    start, best, best_epoch, metrics = 0, math.inf, 0, []
    if resume and (run_dir / LAST).exists():
        ck = load_checkpoint(run_dir / LAST, device)
        core.load_state_dict(ck["model"])
        optimizer.load_state_dict(ck["optimizer"])
        if scheduler is not None and "scheduler" in ck:
            scheduler.load_state_dict(ck["scheduler"])
        if ck["scaler"] and scaler.is_enabled():   # a CPU/bf16 run has no scale to restore
            scaler.load_state_dict(ck["scaler"])
        start, best, best_epoch, metrics = ck["epoch"], ck["best_valid"], ck["best_epoch"], ck["metrics"]
    if world > 1:
        model = DistributedDataParallel(core, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = DistributedSampler(train_data, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    per_epoch = math.ceil(len(sampler) / batch_size)
    if max_batches_per_epoch:
        per_epoch = min(per_epoch, max_batches_per_epoch)
    bar = progress_bar(total=per_epoch * (epochs - start), disable=not progress or rank != 0,
               desc=f"{run_dir.name}", unit="batch", dynamic_ncols=True)

    for epoch in range(start, epochs):
        t0 = time.time()
        sampler.set_epoch(epoch)                       # data order from (seed, epoch)
        torch.manual_seed(epoch_seed(seed, epoch, rank))
        loader_rng = torch.Generator().manual_seed(epoch_seed(seed, epoch, rank))
        loader = DataLoader(train_data, batch_size=batch_size, sampler=sampler,
                            num_workers=num_workers, generator=loader_rng,
                            pin_memory=device.type == "cuda", drop_last=False)
        model.train()
        total, count = 0.0, 0
        scheduled = [g["lr"] for g in optimizer.param_groups]
        for i, batch in enumerate(loader):
            if i == per_epoch:
                break
            step = epoch * per_epoch + i   # a function of (epoch, i): a resumed run warms alike
            if step < warmup_steps:
                for g, lr in zip(optimizer.param_groups, scheduled):
                    g["lr"] = lr * (step + 1) / warmup_steps
            elif step == warmup_steps and warmup_steps:
                for g, lr in zip(optimizer.param_groups, scheduled):
                    g["lr"] = lr
            inputs, targets = _to(batch, device)
            with torch.autocast(device.type, dtype=low, enabled=low is not None):
                outputs = model(inputs)
            loss = loss_fn(outputs.float(), targets)   # the loss in float32 whatever autocast did
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                nn.utils.clip_grad_norm_(core.parameters(), grad_clip)
            scaler.step(optimizer)
            scaler.update()
            total += loss.item() * len(targets)
            count += len(targets)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{total / count:.4g}")
        train_loss = _mean_over_ranks(total, count, device, world)
        for g, lr in zip(optimizer.param_groups, scheduled):   # the scheduler steps from these
            g["lr"] = lr
        lr = optimizer.param_groups[0]["lr"]
        if scheduler is not None:
            scheduler.step()

        valid_loss = (math.nan if valid is None else
                      evaluate(core, loss_fn, valid, batch_size, device, low, num_workers, rank, world))
        metrics.append({"epoch": epoch + 1, "train_loss": train_loss, "valid_loss": valid_loss,
                        "seconds": time.time() - t0, "lr": lr})
        if valid is None or valid_loss < best:
            best, best_epoch = valid_loss, epoch + 1
        if rank == 0:
            ck = {"model": core.state_dict(), "optimizer": optimizer.state_dict(),
                  "scaler": scaler.state_dict(), "epoch": epoch + 1, "best_valid": best,
                  "best_epoch": best_epoch, "metrics": metrics, "seed": seed}
            if scheduler is not None:
                ck["scheduler"] = scheduler.state_dict()
            save_atomic(ck, run_dir / LAST)
            if best_epoch == epoch + 1:
                save_atomic(ck, run_dir / BEST)
            write_metrics(run_dir / METRICS, metrics)
        if world > 1:
            dist.barrier()   # nobody starts the next epoch (or returns) before the files exist
    bar.close()
    return TrainResult(best, best_epoch, metrics, run_dir)


@torch.no_grad()
def evaluate(model: nn.Module, loss_fn: Callable, valid, batch_size: int, device,
             low: torch.dtype | None = None, num_workers: int = 0, rank: int = 0,
             world: int = 1) -> float:
    """Mean loss over a Dataset (sharded over ranks), or the value of a validation function."""
    model.eval()
    if callable(valid) and not isinstance(valid, Dataset):
        return float(valid(model))
    sampler = DistributedSampler(valid, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(valid, batch_size=batch_size, sampler=sampler, num_workers=num_workers)
    total, count = 0.0, 0
    for batch in loader:
        inputs, targets = _to(batch, device)
        with torch.autocast(device.type, dtype=low, enabled=low is not None):
            outputs = model(inputs)
        total += loss_fn(outputs.float(), targets).item() * len(targets)
        count += len(targets)
    return _mean_over_ranks(total, count, device, world)
