"""The calibration driver: run batches through a model and feed each linear's inputs to accumulators.

Calibration algorithms (Wanda here; GPTQ/AWQ-style methods later) are small
accumulators with ``add_batch(x, token_mask)`` -> ``finalize()``; this driver
registers forward hooks on the named modules, runs the batches (eval mode,
no grad) and removes the hooks again. It knows nothing of any algorithm.

Padding tokens are left out: before each forward the driver hands the hooks
the batch's ``attention_mask``, and an input whose leading dims are
``(batch, tokens)`` keeps only the real tokens.

Limits: the whole model runs at once (no layer-by-layer offloading), so it
must fit on its device; every accumulator sees the inputs of the model as it
is (one-shot Wanda instead walks the blocks and scores each on the pruned
blocks before it, see wanda.py; gradual Wanda uses this one dense pass).
"""

from __future__ import annotations

from typing import Callable, Protocol

import torch
from torch import nn

from slimtune.tasks import model_inputs


class Accumulator(Protocol):
    def add_batch(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None: ...


def real_tokens(x: torch.Tensor, token_mask: torch.Tensor | None) -> torch.Tensor:
    """(B, T, F) inputs and a (B, T) mask -> (N, F) rows of real tokens; any other shape -> (rows, F)."""
    if token_mask is not None and x.dim() == 3 and x.shape[:2] == token_mask.shape:
        return x[token_mask.bool()]  # (N, F)
    return x.reshape(-1, x.shape[-1])


@torch.no_grad()
def calibrate(model: nn.Module, batches: list[dict], accumulators: dict[str, Accumulator]) -> None:
    """Run ``batches`` through ``model``; each named module's inputs go to its accumulator.

    A module whose weight another module shares (cross-layer sharing) feeds
    the same accumulator, so both uses count.
    """
    device = next(model.parameters()).device
    state: dict[str, torch.Tensor | None] = {"mask": None}
    owners = {id(model.get_submodule(name).weight): acc for name, acc in accumulators.items()}
    handles = []
    for module in model.modules():
        acc = owners.get(id(getattr(module, "weight", None)))
        if acc is not None:
            handles.append(module.register_forward_hook(_feed(acc, state)))
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            state["mask"] = batch.get("attention_mask")
            model(**model_inputs(batch))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)


def _feed(acc: Accumulator, state: dict) -> Callable:
    def hook(module, args, output):
        acc.add_batch(args[0].detach(), state["mask"])

    return hook
