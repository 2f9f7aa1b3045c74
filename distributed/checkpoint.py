"""Resumable training checkpoints with ``torch.distributed.checkpoint`` (DCP).

A checkpoint is a directory ``step-NNNNNNN/`` holding

* the DCP shards of ``{"model", "optim", ["best"]}`` - sharded under FSDP
  (each rank writes its own shard), saved once when replicated;
* ``rank-R.safetensors`` per rank: that rank's RNG states (torch CPU and
  CUDA, Python, NumPy) and the losses of the unfinished epoch (dropout masks
  and data shards differ per rank);
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
import random
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
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
    per_rank = {**rng_states(), "epoch_losses": torch.tensor(state.epoch_losses, dtype=torch.float64)}
    save_file(per_rank, str(tmp / f"rank-{rank}.safetensors"))
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
    restore_rng_states(per_rank)
    return TrainerState(**meta, epoch_losses=per_rank["epoch_losses"].tolist())


def rng_states() -> dict[str, torch.Tensor]:
    """Every generator training draws from, as tensors: torch CPU, every CUDA device, Python ``random``, NumPy.

    The data order comes from generators seeded per epoch (see strategy.py),
    so these global ones are all that dropout (or any random op) consumes.
    """
    version, keys, gauss = random.getstate()
    _, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    states = {
        "cpu_rng": torch.get_rng_state(),
        "py_rng": torch.tensor([version, *keys], dtype=torch.int64),
        "py_gauss": torch.tensor([gauss is not None, gauss or 0.0], dtype=torch.float64),
        "np_rng": torch.from_numpy(np_keys.astype(np.int64)),
        "np_meta": torch.tensor([np_pos, np_has_gauss, np_gauss], dtype=torch.float64),
    }
    if torch.cuda.is_available():
        states["cuda_rng"] = torch.stack(torch.cuda.get_rng_state_all())
    return states


def restore_rng_states(states: dict[str, torch.Tensor]) -> None:
    """Set the generators :func:`rng_states` saved (CUDA only where this process sees the same devices)."""
    torch.set_rng_state(states["cpu_rng"])
    if "py_rng" in states:  # checkpoints before these were added hold only torch's
        version, *keys = states["py_rng"].tolist()
        has_gauss, gauss = states["py_gauss"].tolist()
        random.setstate((version, tuple(keys), gauss if has_gauss else None))
        pos, has_np_gauss, np_gauss = states["np_meta"].tolist()
        np.random.set_state(("MT19937", states["np_rng"].numpy().astype(np.uint32), int(pos), int(has_np_gauss), np_gauss))
    cuda = states.get("cuda_rng")
    if cuda is not None and torch.cuda.is_available():
        if cuda.dim() == 1:  # one device's state (older checkpoints)
            torch.cuda.set_rng_state(cuda)
        elif len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(list(cuda))
