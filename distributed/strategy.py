"""How the Trainer places a model and its data.

The Trainer only talks to a strategy: ``prepare`` wraps the model,
``loader`` yields this process's batches, ``reduce`` averages a number over
processes, ``is_main`` says who writes files. ``SingleDevice`` is the one
process case; DDP, FSDP2 and pipeline strategies implement the same methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.data import DataLoader


@dataclass
class SingleDevice:
    device: torch.device = torch.device("cpu")
    is_main: bool = True

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def loader(self, examples: list, batch_size: int, collate, shuffle: bool, seed: int) -> DataLoader:
        generator = torch.Generator().manual_seed(seed)
        return DataLoader(examples, batch_size=batch_size, shuffle=shuffle, collate_fn=collate, generator=generator)

    def to_device(self, batch: dict) -> dict:
        return {k: v.to(self.device, non_blocking=True) for k, v in batch.items()}

    def reduce(self, value: float) -> float:
        return value


def build_strategy(name: str, device: torch.device):
    if name == "single":
        return SingleDevice(device)
    raise ValueError(f"strategy {name!r} is not available")
