"""How the Trainer places a model and its data.

The Trainer only talks to a strategy: ``prepare`` wraps the model,
``loader`` yields this process's batches, ``grad_divisor`` turns summed
per-unit gradients into the global mean, ``reduce`` averages a number over
processes, ``is_main`` says who writes files. ``SingleDevice`` is the one
process case; ``DataParallel`` is DDP over an initialised process group.

Batches are drawn the same way under every strategy: one sequence of *global*
batches (``train.batch_size`` examples each) from a seeded sampler; under data
parallelism each rank takes every ``world_size``-th example of each global
batch. Training with N processes therefore sees the same batches, and takes
the same steps, as one process - up to floating-point reduction order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, Sampler


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


class ShardedBatches(Sampler[list[int]]):
    """This rank's share (every ``world_size``-th index) of each global batch.

    A final global batch with fewer examples than ranks is dropped, so every
    rank takes the same number of steps.
    """

    def __init__(self, batches: Sampler[list[int]], rank: int, world_size: int):
        self.batches, self.rank, self.world_size = batches, rank, world_size

    def __iter__(self):
        for batch in self.batches:
            if len(batch) >= self.world_size:
                yield batch[self.rank :: self.world_size]

    def __len__(self) -> int:
        return len(self.batches)


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def global_batches(examples: list, batch_size: int, shuffle: bool, seed: int, group_by_length: bool) -> Sampler[list[int]]:
    """The seeded sequence of global batches (lists of example indices)."""
    if group_by_length and shuffle:
        lengths = [len(e["text"]) + len(e.get("text_pair", "")) for e in examples]  # characters: a cheap proxy
        return LengthGroupedBatches(lengths, batch_size, seed)
    order = RandomSampler(examples, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(examples)
    return BatchSampler(order, batch_size, drop_last=False)


@dataclass
class SingleDevice:
    device: torch.device = torch.device("cpu")
    is_main: bool = True

    def prepare(self, model: nn.Module) -> nn.Module:
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    def loader(self, examples: list, batch_size: int, collate, shuffle: bool, seed: int, group_by_length: bool = False) -> DataLoader:
        return DataLoader(examples, batch_sampler=global_batches(examples, batch_size, shuffle, seed, group_by_length), collate_fn=collate)

    def to_device(self, batch: dict) -> dict:
        return batch_to(batch, self.device)

    def grad_divisor(self, units: int) -> float:
        return max(units, 1)

    def reduce(self, value: float) -> float:
        return value


@dataclass
class DataParallel:
    """DistributedDataParallel: every rank holds the model and trains on its shard.

    Needs an initialised default process group (gloo on CPU, NCCL on GPU).
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_process_group(cls, device: torch.device) -> "DataParallel":
        if not dist.is_initialized():
            raise RuntimeError("DataParallel needs torch.distributed.init_process_group() first")
        return cls(device, dist.get_rank(), dist.get_world_size())

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def loader(self, examples: list, batch_size: int, collate, shuffle: bool, seed: int, group_by_length: bool = False) -> DataLoader:
        batches = global_batches(examples, batch_size, shuffle, seed, group_by_length)
        return DataLoader(examples, batch_sampler=ShardedBatches(batches, self.rank, self.world_size), collate_fn=collate)

    def to_device(self, batch: dict) -> dict:
        return batch_to(batch, self.device)

    def grad_divisor(self, units: int) -> float:
        """DDP already averaged gradients over ranks; finish the global per-unit mean."""
        total = torch.tensor([float(units)], device=self.device)
        dist.all_reduce(total)
        return max(total.item(), 1.0) / self.world_size

    def reduce(self, value: float) -> float:
        total = torch.tensor([value], device=self.device, dtype=torch.float64)
        dist.all_reduce(total)
        return total.item() / self.world_size


def build_strategy(name: str, device: torch.device):
    if name == "single":
        return SingleDevice(device)
    if name == "ddp":
        return DataParallel.from_process_group(device)
    raise ValueError(f"strategy {name!r} is not available")
