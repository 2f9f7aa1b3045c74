"""The layer-by-layer calibration driver: walk a transformer's blocks one at a time.

GPTQ and AWQ calibrate block ``i`` on what the *already quantized* blocks
``0..i-1`` feed it (GPTQ's "sequential" mode, Frantar et al., 2022): the
driver captures the inputs of block 0 once (the model runs until its first
block is called, then is stopped), and after each block is processed it runs
the (changed) block on its inputs to get the next block's inputs. Only one
block's inputs are held at a time, so memory stays bounded by one block's
activations for the calibration batches, whatever the depth.

Algorithms are small accumulators (``add_batch(x, token_mask)`` ->
``finalize``, as in :mod:`slimtune.compress.prune.calibrate`); the driver
knows nothing of them. Padding tokens are left out through each batch's
``attention_mask``.

Limits: the positional arguments the model passes its blocks (attention
mask, rotary position embeddings, ...) are captured at block 0 and replayed
unchanged for every block, which holds for the families of
:mod:`slimtune.arch` (no per-layer masks such as sliding windows);
the KV cache is switched off. The stem (embeddings) runs where the model
lives; with ``device`` set, each block is moved there while it is processed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from slimtune.arch import layers
from slimtune.compress.prune.calibrate import Accumulator, real_tokens
from slimtune.tasks import model_inputs

_NO_CACHE = {"cache": None, "past_key_values": None, "past_key_value": None, "use_cache": False}


class _InputsCaptured(Exception):
    """Raised by the pre-hook on block 0 to stop the model once its inputs are recorded."""


class _BlockFed(Exception):
    """Raised by a feeding hook once every accumulator has this batch's input: the rest of the block is not needed."""


@dataclass
class BlockInputs:
    """The captured inputs of one transformer block for every calibration batch.

    Attributes:
        hidden: per batch, the hidden states ``(B, T, H)`` entering the block.
        args: per batch, the remaining positional arguments the model passes its blocks.
        kwargs: per batch, the keyword arguments (attention mask, position embeddings, ...).
        token_masks: per batch, the ``(B, T)`` mask of real (non-padding) tokens, or None.
    """

    hidden: list[torch.Tensor]
    args: list[tuple]
    kwargs: list[dict]
    token_masks: list[torch.Tensor | None]

    @torch.no_grad()
    def run(self, block: nn.Module) -> list[torch.Tensor]:
        """The block's output hidden states ``(B, T, H)`` for every batch."""
        return [_hidden_states(block(h, *a, **kw)) for h, a, kw in zip(self.hidden, self.args, self.kwargs)]

    @torch.no_grad()
    def feed(self, block: nn.Module, accumulators: dict[str, Accumulator]) -> None:
        """Run the block; the input of each named submodule (name relative to the block) goes to its accumulator.

        Each named submodule is called once per block forward (true of the
        linears of :mod:`slimtune.arch`'s families); the forward
        stops as soon as all of them have had their input, so feeding the
        first linears of a block costs only the part of the block before them.
        """
        state: dict = {"mask": None, "pending": set()}
        handles = [block.get_submodule(name).register_forward_hook(_feed(acc, state, name)) for name, acc in accumulators.items()]
        try:
            for h, a, kw, mask in zip(self.hidden, self.args, self.kwargs, self.token_masks):
                state["mask"], state["pending"] = mask, set(accumulators)
                try:
                    block(h, *a, **kw)
                except _BlockFed:
                    pass
        finally:
            for handle in handles:
                handle.remove()

    def replace_hidden(self, hidden: list[torch.Tensor]) -> BlockInputs:
        """The same batches with new hidden states (the next block's inputs)."""
        return BlockInputs(hidden, self.args, self.kwargs, self.token_masks)

    def to(self, device: torch.device | str) -> BlockInputs:
        return BlockInputs(_to(self.hidden, device), _to(self.args, device), _to(self.kwargs, device), _to(self.token_masks, device))

    def real_tokens(self, i: int) -> torch.Tensor:
        """Batch ``i``'s hidden states without padding: ``(N, H)``."""
        return real_tokens(self.hidden[i], self.token_masks[i])


@torch.no_grad()
def capture_inputs(model: nn.Module, batches: list[dict]) -> BlockInputs:
    """Run each batch until the model calls its first block; record that block's inputs.

    Args:
        model: a model of a family :func:`slimtune.arch.layers` knows.
        batches: dicts of model inputs (``input_ids``, ``attention_mask``, ...); other keys (labels) are ignored.
    """
    device = next(model.parameters()).device
    record = BlockInputs([], [], [], [])

    def hook(module, args, kwargs):
        record.hidden.append(args[0].detach())
        record.args.append(tuple(args[1:]))
        record.kwargs.append({k: _NO_CACHE[k] if k in _NO_CACHE else v for k, v in kwargs.items()})
        raise _InputsCaptured

    handle = layers(model)[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in model_inputs(batch).items()}
            try:
                model(**batch)
            except _InputsCaptured:
                record.token_masks.append(batch.get("attention_mask"))
            else:
                raise RuntimeError("the model finished its forward without calling its first block")
    finally:
        handle.remove()
    return record


def walk_blocks(model: nn.Module, batches: list[dict], process_block: Callable[[int, nn.Module, BlockInputs], None],
                device: torch.device | str | None = None) -> None:
    """Process a model's blocks in order, each on the outputs of the already processed ones.

    For block ``i``: ``process_block(i, block, inputs)`` (which may change the
    block in place: swap linears, rescale weights), then ``inputs`` becomes the
    outputs of the changed block. The model is in eval mode meanwhile.

    Args:
        model: a BERT- or Llama-family model (:mod:`slimtune.arch`).
        batches: calibration batches (dicts of model inputs; labels are ignored).
        process_block: called once per block with its index, the block and its inputs.
        device: where blocks are processed; each block is moved there and back in turn
            (default: where it already is).
    """
    was_training = model.training
    model.eval()
    try:
        inputs = capture_inputs(model, batches)
        for i, block in enumerate(layers(model)):
            home = next(block.parameters()).device
            if device is not None:
                block.to(device)
                inputs = inputs.to(device)
            process_block(i, block, inputs)
            inputs = inputs.replace_hidden(inputs.run(block))
            if device is not None:
                block.to(home)
    finally:
        model.train(was_training)


def _hidden_states(output: Any) -> torch.Tensor:
    """A block returns its hidden states, or (in older transformers) a tuple starting with them."""
    return output[0] if isinstance(output, (tuple, list)) else output


def _to(obj: Any, device: torch.device | str) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, list):
        return [_to(o, device) for o in obj]
    if isinstance(obj, tuple):
        return tuple(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


def _feed(acc: Accumulator, state: dict, name: str) -> Callable:
    def hook(module, args, output):
        acc.add_batch(args[0].detach(), state["mask"])
        state["pending"].discard(name)
        if not state["pending"]:
            raise _BlockFed

    return hook
