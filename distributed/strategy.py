"""How the Trainer places a model and its data.

The Trainer only talks to a strategy: ``prepare`` wraps the model,
``loader`` yields this process's batches, ``grad_divisor`` turns summed
per-unit gradients into the global mean, ``reduce`` averages a number over
processes, ``is_main`` says who writes files. ``SingleDevice`` is the one
process case; ``DataParallel`` is DDP and ``FullyShardedDataParallel`` FSDP2
over an initialised process group; ``Pipeline`` (pipeline.py) splits the
blocks over ranks.

Batches are drawn the same way under every strategy: one sequence of *global*
batches (``train.batch_size`` examples each) from a seeded sampler; under data
parallelism each rank takes every ``world_size``-th example of each global
batch. Training with N processes therefore sees the same batches, and takes
the same steps, as one process - up to floating-point reduction order, and
up to dropout: each rank draws masks for its own examples, so a model with
dropout trains statistically, not bitwise, like one process.
"""

from __future__ import annotations

import contextlib
import copy
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.data import DataLoader

from slimtune.distributed.modules import blocks_share_parameters, release_parameters, restore_parameters, transformer_blocks


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar length (less padding, same examples per epoch).

    Shuffle, cut into mega-batches of ``50 * batch_size``, sort each by
    length, cut into batches, shuffle the batch order.
    """
    g = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(lengths), generator=g).tolist()
    mega = 50 * batch_size
    batches = []
    for i in range(0, len(order), mega):
        chunk = sorted(order[i : i + mega], key=lambda j: -lengths[j])
        batches += [chunk[k : k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in torch.randperm(len(batches), generator=g).tolist()]


def shard_batches(batches: list[list[int]], rank: int, world_size: int) -> list[list[int]]:
    """This rank's share (every ``world_size``-th index) of each global batch.

    A final global batch with fewer examples than ranks is dropped, so every
    rank takes the same number of steps.
    """
    return [batch[rank::world_size] for batch in batches if len(batch) >= world_size]


def batch_to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def global_batches(examples: list, batch_size: int, shuffle: bool, seed: int, group_by_length: bool, epoch: int = 0) -> list[list[int]]:
    """Epoch ``epoch``'s sequence of global batches (lists of example indices), seeded by ``seed + epoch``."""
    if not shuffle:
        return [list(range(i, min(i + batch_size, len(examples)))) for i in range(0, len(examples), batch_size)]
    if group_by_length:
        lengths = [len(e["text"]) + len(e.get("text_pair", "")) for e in examples]  # characters: a cheap proxy
        return length_grouped_batches(lengths, batch_size, seed + epoch)
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + epoch)).tolist()
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


class Strategy:
    """Placement, data sharding and collectives for the Trainer.

    Subclasses override what differs; the defaults are the one-process case.
    Every method a rank calls inside the Trainer is called on all ranks in
    the same order, so collectives line up.
    """

    name = "single"
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def prepare(self, model: nn.Module) -> nn.Module:
        """Place (and wrap or shard) ``model`` for training."""
        return model.to(self.device)

    def unwrap(self, model: nn.Module) -> nn.Module:
        """A module every rank can call forward on (collectively), e.g. to evaluate."""
        return model

    def finalize(self, model: nn.Module) -> nn.Module:
        """The trained model as a plain CPU module with full tensors, on every rank."""
        return self.unwrap(model).cpu()

    def full_state_dict(self, model: nn.Module, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """Full (unsharded) CPU tensors of the parameters/buffers ``keep`` selects, on every rank."""
        state = self.unwrap(model).state_dict()
        return {k: v.detach().cpu() for k, v in state.items() if keep is None or keep(k)}

    def loader(self, examples: list, batch_size: int, collate, shuffle: bool, seed: int, group_by_length: bool = False,
               epoch: int = 0, skip: int = 0) -> DataLoader:
        """This rank's batches of epoch ``epoch``, the first ``skip`` left out (to resume mid-epoch)."""
        batches = self.batches(examples, batch_size, shuffle, seed, group_by_length, epoch)[skip:]
        # Its own generator: iter(DataLoader) draws a worker base seed, from the
        # global generator by default, which would shift every later dropout
        # mask and make a resumed epoch (restored RNG, then a new loader) differ.
        generator = torch.Generator().manual_seed(seed + epoch)
        return DataLoader(examples, batch_sampler=batches, collate_fn=collate, generator=generator)

    def batches(self, examples: list, batch_size: int, shuffle: bool, seed: int, group_by_length: bool, epoch: int = 0) -> list[list[int]]:
        """This rank's batches (lists of example indices) of epoch ``epoch``."""
        return global_batches(examples, batch_size, shuffle, seed, group_by_length, epoch)

    def to_device(self, batch: dict) -> dict:
        return batch_to(batch, self.device)

    def forward_backward(self, model: nn.Module, window: list[dict], loss_fn, scale) -> tuple[float, int]:
        """Forward and backward every micro-batch of ``window``.

        ``loss_fn(model, batch) -> (mean loss, units)`` (autocast applied by the
        caller); ``scale(loss)`` applies the gradient scaler. Gradients are left
        as sums over units; returns (summed loss, units) of this rank.
        """
        units, weighted = 0, 0.0
        for i, batch in enumerate(window):
            # Backward each micro-batch at once (bounded memory); the Trainer
            # divides the summed gradients by the global unit count. Ranks
            # exchange gradients once per window, at its last micro-batch.
            with self.gradient_sync(model, i == len(window) - 1):
                loss, n = loss_fn(model, self.to_device(batch))
                scale(loss * n).backward()
            units += n
            weighted += loss.item() * n
        return weighted, units

    def gradient_sync(self, model: nn.Module, enabled: bool):
        """Context of one micro-batch's backward; ``enabled=False`` keeps its gradients local (accumulation)."""
        return contextlib.nullcontext()

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        """The fp16 loss scaler (a no-op when ``enabled`` is false)."""
        return torch.amp.GradScaler(self.device.type, enabled=enabled)

    def grad_divisor(self, units: int) -> float:
        """What turns this rank's summed gradients into the global per-unit mean."""
        return max(units, 1)

    def clip_grad_norm(self, params: list[torch.Tensor], max_norm: float) -> torch.Tensor:
        return torch.nn.utils.clip_grad_norm_(params, max_norm)

    def reduce(self, value: float) -> float:
        """The mean of ``value`` over ranks."""
        return value

    def gather(self, value) -> list:
        """``value`` of every rank, in rank order (a picklable object)."""
        if not dist.is_initialized():
            return [value]
        out = [None] * dist.get_world_size()
        dist.all_gather_object(out, value)
        return out

    def checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
        """Model and optimizer state for ``torch.distributed.checkpoint`` (sharded where the model is)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optim_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optim": optim_state}

    def load_checkpoint_state(self, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])

    def snapshot(self, model: nn.Module) -> dict:
        """A copy of the training state of ``model`` (to restore the best epoch)."""
        return {k: v.detach().clone() for k, v in self.unwrap(model).state_dict().items()}

    def restore(self, model: nn.Module, snapshot: dict) -> None:
        self.unwrap(model).load_state_dict(snapshot)


@dataclass
class SingleDevice(Strategy):
    device: torch.device = torch.device("cpu")


@dataclass
class DataParallel(Strategy):
    """DistributedDataParallel: every rank holds the model and trains on its shard.

    Needs an initialised default process group (gloo on CPU, NCCL on GPU).
    """

    name = "ddp"
    device: torch.device = torch.device("cpu")
    rank: int = 0
    world_size: int = 1

    @classmethod
    def from_process_group(cls, device: torch.device, **options) -> "DataParallel":
        if not dist.is_initialized():
            raise RuntimeError(f"{cls.__name__} needs torch.distributed.init_process_group() first")
        return cls(device, dist.get_rank(), dist.get_world_size(), **options)

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.nn.parallel import DistributedDataParallel

        model = model.to(self.device)
        return DistributedDataParallel(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def unwrap(self, model: nn.Module) -> nn.Module:
        return getattr(model, "module", model)

    def gradient_sync(self, model: nn.Module, enabled: bool):
        return contextlib.nullcontext() if enabled else model.no_sync()

    def batches(self, examples: list, batch_size: int, shuffle: bool, seed: int, group_by_length: bool, epoch: int = 0) -> list[list[int]]:
        return shard_batches(global_batches(examples, batch_size, shuffle, seed, group_by_length, epoch), self.rank, self.world_size)

    def grad_divisor(self, units: int) -> float:
        """DDP already averaged gradients over ranks; finish the global per-unit mean."""
        return max(all_reduce_sum(units, self.device), 1.0) / self.world_size

    def reduce(self, value: float) -> float:
        return all_reduce_sum(value, self.device) / self.world_size


@dataclass
class FullyShardedDataParallel(DataParallel):
    """FSDP2 (``fully_shard``): parameters, gradients and optimizer state sharded over ranks.

    Each transformer block is one FSDP unit and the root holds the rest
    (embeddings, head), so at most one block's full weights are gathered at
    a time; the next block is prefetched while the current one computes.
    ``reshard_after_forward=True`` is ZeRO-3, ``False`` keeps gathered
    weights until backward (ZeRO-2-like: more memory, fewer all-gathers).
    ``param_dtype`` casts gathered weights for compute (``MixedPrecisionPolicy``;
    gradients are reduced in fp32); ``cpu_offload`` keeps the shards and the
    optimizer step on the CPU. Gradients are averaged over ranks like DDP.

    The caller's module keeps its buffers but its parameter storage is
    released while the sharded copy trains; ``finalize`` gathers the full
    trained tensors back into it.
    """

    name = "fsdp"
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    param_dtype: torch.dtype | None = None

    def prepare(self, model: nn.Module) -> nn.Module:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

        self._original = model
        sharded = copy.deepcopy(model)
        release_parameters(model)
        if not self.cpu_offload:
            sharded.to(self.device)
        mesh = init_device_mesh(self.device.type, (self.world_size,))
        options = dict(mesh=mesh, reshard_after_forward=self.reshard_after_forward,
                       mp_policy=MixedPrecisionPolicy(param_dtype=self.param_dtype, reduce_dtype=torch.float32),
                       offload_policy=CPUOffloadPolicy(pin_memory=False) if self.cpu_offload else OffloadPolicy())
        blocks = transformer_blocks(sharded)
        if not blocks_share_parameters(blocks):  # shared weights must live in one unit: the root
            for block in blocks:
                fully_shard(block, **options)
            for before, after in zip(blocks, list(blocks)[1:]):
                before.set_modules_to_forward_prefetch([after])
                after.set_modules_to_backward_prefetch([before])
        fully_shard(sharded, **options)
        return sharded

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model

    @contextlib.contextmanager
    def gradient_sync(self, model: nn.Module, enabled: bool):
        """Without sync, gradients accumulate unsharded on each rank until the window's last backward reduce-scatters them."""
        model.set_requires_gradient_sync(enabled)
        try:
            yield
        finally:
            model.set_requires_gradient_sync(True)

    def full_state_dict(self, model: nn.Module, keep: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
        """Gather full tensors (never local shards) of the selected keys, on every rank.

        One path for the whole model and for subsets (e.g. only trained
        parameters); ``keep`` must select the same keys on every rank.
        """
        from torch.distributed.tensor import DTensor

        out = {}
        for name, value in model.state_dict().items():
            if keep is None or keep(name):
                full = value.full_tensor() if isinstance(value, DTensor) else value
                out[name] = full.detach().cpu()
        return out

    def finalize(self, model: nn.Module) -> nn.Module:
        original = self._original
        restore_parameters(original, self.full_state_dict(model))
        return original.cpu()

    def grad_scaler(self, enabled: bool) -> torch.amp.GradScaler:
        return AgreedGradScaler(self.device.type, enabled=enabled)


class AgreedGradScaler(torch.amp.GradScaler):
    """A loss scaler whose found-inf is summed over all ranks: every stage skips (and backs off) together.

    Needed wherever ranks hold different gradients (FSDP shards, pipeline
    stages). ``ShardedGradScaler`` does the same but keeps found-inf as a
    (1,) tensor, which the fused AdamW the Trainer uses cannot take. Gradients must be
    unscaled with ``unscale_`` before ``step`` (the Trainer does).
    """

    def unscale_(self, optimizer: torch.optim.Optimizer) -> None:
        super().unscale_(optimizer)
        if not self._enabled:
            return
        per_device = self._per_optimizer_states[id(optimizer)]["found_inf_per_device"]
        found = sum(per_device.values(), torch.zeros((), device=self._scale.device))
        dist.all_reduce(found)
        for value in per_device.values():
            value.copy_(found)
        per_device.setdefault(self._scale.device, found)  # a rank without gradients still votes

    def step(self, optimizer: torch.optim.Optimizer, *args, **kwargs):
        """Skip the step on every rank when any rank found inf/NaN; otherwise a plain step.

        The gradients are already unscaled and checked, so the optimizer is
        not handed ``found_inf`` (which fused AdamW ignores for DTensors).
        """
        if not self._enabled:
            return optimizer.step(*args, **kwargs)
        from torch.amp.grad_scaler import OptState

        state = self._per_optimizer_states[id(optimizer)]
        if state["stage"] is OptState.READY:
            self.unscale_(optimizer)
        skip = sum(v.item() for v in state["found_inf_per_device"].values()) > 0
        result = None if skip else optimizer.step(*args, **kwargs)
        state["stage"] = OptState.STEPPED
        return result

    def _unscale_grads_(self, optimizer, inv_scale: torch.Tensor, found_inf: torch.Tensor, allow_fp16: bool) -> dict:
        """Unscale each rank's *local* gradients (FSDP's are DTensor shards), checking them for inf/NaN."""
        from torch.distributed.tensor import DTensor

        grads: dict[tuple, list[torch.Tensor]] = {}
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad  # a view: unscaled in place
                    grads.setdefault((g.device, g.dtype), []).append(g)
        found: dict[torch.device, torch.Tensor] = {}
        with torch.no_grad():
            for (device, _), same in grads.items():
                flag = found.setdefault(device, found_inf.to(device))
                torch._amp_foreach_non_finite_check_and_unscale_(same, flag, inv_scale.to(device))
        return found


def all_reduce_sum(value: float, device: torch.device) -> float:
    total = torch.tensor([float(value)], device=device, dtype=torch.float64)
    dist.all_reduce(total)
    return total.item()


def build_strategy(config, device: torch.device, precision: str = "fp32") -> Strategy:
    """The strategy a recipe's ``distributed`` block names (the process group must be up for all but single)."""
    if config.strategy == "single":
        return SingleDevice(device)
    if config.strategy == "ddp":
        return DataParallel.from_process_group(device)
    if config.strategy == "fsdp":
        # bf16 gathers weights in bf16 (MixedPrecisionPolicy); fp16 keeps fp32
        # weights under autocast, since pure-fp16 weights overflow (NaN losses).
        dtype = torch.bfloat16 if precision == "bf16" else None
        return FullyShardedDataParallel.from_process_group(device, reshard_after_forward=config.fsdp.reshard_after_forward,
                                                          cpu_offload=config.fsdp.cpu_offload, param_dtype=dtype)
    if config.strategy == "pipeline":
        from slimtune.distributed.pipeline import Pipeline

        return Pipeline.from_process_group(device, schedule=config.pipeline.schedule, microbatches=config.pipeline.microbatches)
    raise ValueError(f"unknown strategy {config.strategy!r}")
