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
from torch.utils.data import DataLoader, Sampler


class LengthGroupedBatches(Sampler[list[int]]):
    """Shuffled batches of similar length (less padding, same examples per epoch).

    Each epoch: shuffle, cut into mega-batches of ``50 * batch_size``, sort each
    by length, cut into batches, shuffle the batch order. Seeded per epoch.
    """

    def __init__(self, lengths: list[int], batch_size: int, seed: int):
        self.lengths, self.batch_size, self.seed, self.epoch = lengths, batch_size, seed, 0

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        self.epoch += 1
        order = torch.randperm(len(self.lengths), generator=g).tolist()
        mega = 50 * self.batch_size
        batches = []
        for i in range(0, len(order), mega):
            chunk = sorted(order[i : i + mega], key=lambda j: -self.lengths[j])
            batches += [chunk[k : k + self.batch_size] for k in range(0, len(chunk), self.batch_size)]
        return iter([batches[i] for i in torch.randperm(len(batches), generator=g).tolist()])

    def __len__(self) -> int:
        return -(-len(self.lengths) // self.batch_size)


@dataclass
class SingleDevice:
    device: torch.device = torch.device("cpu")
    is_main: bool = True

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def loader(self, examples: list, batch_size: int, collate, shuffle: bool, seed: int, group_by_length: bool = False) -> DataLoader:
        if group_by_length and shuffle:
            lengths = [len(e["text"]) + len(e.get("text_pair", "")) for e in examples]  # characters: a cheap proxy
            return DataLoader(examples, batch_sampler=LengthGroupedBatches(lengths, batch_size, seed), collate_fn=collate)
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
