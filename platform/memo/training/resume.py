"""Continuing an interrupted training run, on any number of workers.

A run's Ray Train folder is named by the training's resume key (same reflections, base model and
output settings: the same run), plus a suffix per attempt. `memo train` with the settings of a run that
was interrupted (the job stopped, the cluster lost, every restart used up) continues that run from its
last checkpoint: Ray Train finds the run's checkpoint snapshot under the same name and storage path and
hands the checkpoint to the workers, which read its shards for whatever number of workers they are now
(torch.distributed.checkpoint reshards). A run that finished is never continued: the same command again
trains a new version.

The number of micro-batches per optimizer step is part of the run: a run resumed on another number of
workers keeps it (each worker accumulates micro_per_step / workers micro-batches), so it trains the same
steps as it would have on the first number of workers.
"""

from __future__ import annotations

import fcntl
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from memo.errors import MemoError


@dataclass
class Interrupted:
    """An interrupted run this process now holds (its lock is released when `lock` is closed)."""
    name: str  # the Ray Train run name (its folder under the storage path)
    step: int  # the optimizer step of its last checkpoint
    world: int  # the number of workers that wrote it
    micro_per_step: int
    accum: int  # micro-batches each of this invocation's workers accumulates to keep the run's steps
    lock: IO
    mlflow_run_id: str = ""  # the MLflow run of the attempt that wrote the checkpoint (its steps so far)


def run_prefix(domain: str, key: str) -> str:
    return f"memo-{domain}-{key}"


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The run's newest checkpoint folder (Ray Train names them by time), or None."""
    found = sorted(p for p in run_dir.glob("checkpoint_*") if p.is_dir())
    return found[-1] if found else None


def hold(run_dir: Path) -> IO | None:
    """An exclusive lock on the run's folder for as long as the returned file stays open, or None when
    another `memo train` holds it (two drivers must never write one run)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    f = open(run_dir / ".memo-train.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def find_interrupted(storage: Path, prefix: str, workers: int) -> Interrupted | None:
    """The newest run of these settings whose last checkpoint is a training state (not the final model)
    and that no other driver is running, locked for this process; None when there is none. An error when
    `workers` cannot share its steps."""
    import torch

    for run_dir in sorted(storage.glob(f"{prefix}-*"), key=lambda p: p.stat().st_mtime, reverse=True):
        ckpt = latest_checkpoint(run_dir)
        if ckpt is None or not (ckpt / "train_state.pt").exists():
            continue  # finished (its last checkpoint is the export), or stopped before its first checkpoint
        lock = hold(run_dir)
        if lock is None:
            continue
        try:
            meta = torch.load(ckpt / "train_state.pt", map_location="cpu", weights_only=False)
        except Exception as e:  # a checkpoint cut short by the interruption: start over rather than guess
            lock.close()
            raise MemoError(f"{ckpt / 'train_state.pt'}: unreadable ({type(e).__name__}: {e}); remove {run_dir} "
                            "or pass --set train.resume=false to start over") from None
        if "micro_per_step" not in meta:
            lock.close()
            continue  # written before runs could change their number of workers
        micro = int(meta["micro_per_step"])
        if micro % workers:
            lock.close()
            raise MemoError(f"--workers {workers}: the interrupted run {run_dir.name} trains {micro} micro-batch(es) "
                            f"per step, which {workers} workers cannot share evenly; use a divisor of {micro}, or "
                            "--set train.resume=false to start over")
        return Interrupted(run_dir.name, int(meta["step"]), int(meta.get("world", 0)), micro, micro // workers, lock,
                           str(meta.get("mlflow_run_id", "")))
    return None
