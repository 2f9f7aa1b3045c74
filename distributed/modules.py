"""What the strategies need to know about a model's structure.

``transformer_blocks`` finds the repeated blocks (the unit FSDP shards, the
pipeline splits and activation checkpointing recomputes) without naming any
architecture: the ``nn.ModuleList`` of same-class children holding the most
parameters.
"""

from __future__ import annotations

import torch
from torch import nn


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's list of repeated blocks (e.g. ``bert.encoder.layer``, ``model.layers``)."""
    best, best_size = None, -1
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) and len({type(m) for m in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if size > best_size:
                best, best_size = module, size
    if best is None:
        raise ValueError(f"{type(model).__name__} has no list of repeated blocks to shard, split or checkpoint")
    return best


def blocks_share_parameters(blocks: nn.ModuleList) -> bool:
    """True when one parameter belongs to two blocks (cross-layer sharing)."""
    seen: set[int] = set()
    for block in blocks:
        ids = {id(p) for p in block.parameters()}
        if ids & seen:
            return True
        seen |= ids
    return False


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute each block's activations during backward instead of storing them.

    Uses transformers' own support where the model has it, otherwise wraps
    every block with ``torch.utils.checkpoint`` (non-reentrant; RNG state is
    preserved, so dropout masks and gradients are the same as without it).
    """
    if getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, apply_activation_checkpointing, checkpoint_wrapper

    blocks = set(transformer_blocks(model))
    apply_activation_checkpointing(model, checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
                                   check_fn=lambda m: m in blocks)


def release_parameters(model: nn.Module) -> None:
    """Free the storage of ``model``'s parameters (buffers stay); see ``restore_parameters``."""
    for p in model.parameters():
        p.data = torch.empty(0, dtype=p.dtype, device="cpu")


def restore_parameters(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Give every parameter (and persistent buffer) of ``model`` the tensor ``state`` names."""
    for name, p in model.named_parameters():
        p.data = state[name].to(p.dtype)
    for name, b in model.named_buffers():
        if name in state:
            b.data = state[name].to(b.dtype)
