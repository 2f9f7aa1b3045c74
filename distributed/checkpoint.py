"""Resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``step-NNNNNNN/`` holding

* the DCP shards of ``{"model", "optim", ["best"]}`` - sharded under FSDP
  (each rank writes its own shard), saved once when replicated;
* ``rank-R.safetensors`` per rank: that rank's RNG states and the losses of
  the unfinished epoch (dropout masks and data shards differ per rank);
* ``trainer.json``: step, epoch, history, best epoch, scheduler and scaler
  state (written by rank 0).

It is written to ``step-NNNNNNN.tmp`` and renamed once every rank has
finished, so a rank that dies mid-save leaves only a temporary directory.
Under several machines the checkpoint directory must be on a shared file
system.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import load_file, save_file

STEP_DIR = re.compile(r"^step-(\d+)$")


@dataclass
class TrainerState:
    """Where training stands: enough to continue exactly."""

    steps: int = 0
    epoch: int = 0
    epoch_steps: int = 0
    history: list[dict] = field(default_factory=list)
    best_epoch: int | None = None
    best: dict = field(default_factory=dict)
    epoch_losses: list[float] = field(default_factory=list)
    schedule: dict = field(default_factory=dict)
    scaler: dict = field(default_factory=dict)
    has_best: bool = False


def _barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def latest(directory: Path) -> Path | None:
    """The newest complete checkpoint in ``directory``, if any."""
    if not directory.is_dir():
        return None
    done = [(int(m.group(1)), p) for p in directory.iterdir() if (m := STEP_DIR.match(p.name)) and (p / "trainer.json").is_file()]
    return max(done)[1] if done else None


def save(directory: Path, tensors: dict, state: TrainerState) -> Path:
    """Write a checkpoint of ``tensors`` (a DCP state dict) and ``state``; keep only the newest."""
    rank = _rank()
    final = directory / f"step-{state.steps:07d}"
    tmp = directory / f"step-{state.steps:07d}.tmp"
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    dcp.save(tensors, checkpoint_id=str(tmp))
    rng = {"cpu_rng": torch.get_rng_state(), "epoch_losses": torch.tensor(state.epoch_losses, dtype=torch.float64)}
    if torch.cuda.is_available():
        rng["cuda_rng"] = torch.cuda.get_rng_state()
    save_file(rng, str(tmp / f"rank-{rank}.safetensors"))
    _barrier()
    if rank == 0:
        meta = {k: v for k, v in state.__dict__.items() if k != "epoch_losses"}
        (tmp / "trainer.json").write_text(json.dumps(meta))
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        for old in directory.iterdir():
            if old != final and (STEP_DIR.match(old.name) or old.name.endswith(".tmp")):
                shutil.rmtree(old, ignore_errors=True)
    _barrier()
    return final


def has_best(path: Path) -> bool:
    return json.loads((path / "trainer.json").read_text()).get("has_best", False)


def load(path: Path, tensors: dict) -> TrainerState:
    """Load ``path`` into ``tensors`` (in place) and restore this rank's RNG; return the trainer state."""
    dcp.load(tensors, checkpoint_id=str(path))
    meta = json.loads((path / "trainer.json").read_text())
    per_rank = load_file(str(path / f"rank-{_rank()}.safetensors"))
    torch.set_rng_state(per_rank["cpu_rng"])
    if "cuda_rng" in per_rank and torch.cuda.is_available():
        torch.cuda.set_rng_state(per_rank["cuda_rng"])
    return TrainerState(**meta, epoch_losses=per_rank["epoch_losses"].tolist())
