"""Wanda: prune by weight magnitude times input-activation norm.

Sun, Liu, Bair & Kolter, 2023, "A Simple and Effective Pruning Approach for
Large Language Models". Weight ``W_ij`` (output ``i``, input ``j``) scores

    S_ij = |W_ij| * ||X_j||_2

where ``X_j`` is input feature ``j`` over every calibration token. Scores are
compared within each output row (the paper's choice: each output keeps the
same share of its inputs), or within N:M groups of a row. No weight update,
no second-order information.

Sequential, as the paper's code (``prune_wanda``) does: block ``i`` is scored
on what the *already pruned* blocks ``0..i-1`` feed it. The calibration
inputs of block 0 are captured once; for each block the norms of every
targeted linear's inputs are gathered in one pass through the (still dense)
block, the block is pruned, and the pruned block's outputs become the next
block's inputs (:func:`slimtune.compress.quant.calibrate.walk_blocks`), so
only one block's activations are held at a time.

Limits: padding tokens are excluded. Targeted linears outside the blocks
(``include`` globs such as ``classifier``) are scored after every block is
pruned, in one pass over the pruned model. A weight shared by several blocks
is scored on all its uses and pruned at its last block (the earlier blocks
run it dense). Models whose layout :mod:`slimtune.arch` does not
know are scored in one pass over the dense model. Gradual pruning
(``schedule``) reuses the norms of one pass over the dense model, gathered
before training (:func:`input_norms`).
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune import arch
from slimtune.compress.prune.calibrate import calibrate, real_tokens
from slimtune.compress.prune.masks import Masks, apply_masks_, full_weight, masks_from_scores, target_linears
from slimtune.compress.quant.calibrate import BlockInputs, walk_blocks


class InputNorms:
    """Accumulates ``||X_j||_2`` of a linear's input features over calibration tokens."""

    def __init__(self, features: int):
        self.sum_squares = torch.zeros(features, dtype=torch.float64)  # (in,)
        self.tokens = 0

    def add_batch(self, x: torch.Tensor, token_mask: torch.Tensor | None = None) -> None:
        rows = real_tokens(x, token_mask).double()  # (N, in)
        self.sum_squares += rows.square().sum(0).cpu()
        self.tokens += rows.shape[0]

    def finalize(self) -> torch.Tensor:
        """(in,) float32 L2 norms."""
        return self.sum_squares.sqrt().float()


def wanda_scores(weight: torch.Tensor, norms: torch.Tensor) -> torch.Tensor:
    """(out, in) weight, (in,) input norms -> (out, in) scores ``|W| * ||X||``."""
    return weight.detach().abs().float() * norms.to(weight.device, torch.float32)[None, :]


def input_norms(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict]) -> dict[str, torch.Tensor]:
    """``{name: (in,) input norms}`` of each module over ``batches``, all in one pass over ``model`` as it is."""
    accumulators = {name: InputNorms(m.in_features) for name, m in modules.items()}
    calibrate(model, batches, accumulators)
    return {name: acc.finalize() for name, acc in accumulators.items()}


def wanda_masks(modules: dict[str, nn.Module], norms: dict[str, torch.Tensor], sparsity: float | None = None,
                pattern: str | None = None) -> Masks:
    """Masks keeping the highest-scoring weights of each output row (or of each N:M group)."""
    scores = {name: wanda_scores(full_weight(m), norms[name]).cpu() for name, m in modules.items()}
    return masks_from_scores(scores, sparsity, "row", pattern)


def _prune_with_norms_(model: nn.Module, modules: dict[str, nn.Module], norms: dict[str, torch.Tensor],
                       sparsity: float | None, pattern: str | None) -> Masks:
    masks = wanda_masks(modules, norms, sparsity, pattern)
    apply_masks_(model, masks)
    return masks


def _uses_per_block(blocks: nn.ModuleList, modules: dict[str, nn.Module]) -> list[dict[str, str]]:
    """Per block, ``{module path inside the block: target name}`` of every module holding a targeted weight."""
    owner = {id(m.weight): name for name, m in modules.items()}
    return [{path: owner[id(m.weight)] for path, m in block.named_modules() if id(getattr(m, "weight", None)) in owner}
            for block in blocks]


def wanda_sequential_(model: nn.Module, modules: dict[str, nn.Module], batches: list[dict], sparsity: float | None = None,
                      pattern: str | None = None) -> Masks:
    """Prune ``modules`` of ``model`` in place, block by block on the pruned prefix's outputs; returns the masks.

    Args:
        model: the model ``modules`` belong to (names are its module names).
        modules: ``{name: linear}`` to prune (:func:`target_linears`).
        batches: calibration batches (Collator output; labels are ignored).
        sparsity: fraction of each output row to prune, or
        pattern: ``"N:M"`` instead.
    """
    try:
        blocks = arch.layers(model)
    except arch.UnknownArchitecture:
        return _prune_with_norms_(model, modules, input_norms(model, modules, batches), sparsity, pattern)
    uses = _uses_per_block(blocks, modules)
    last = {name: i for i, block_uses in enumerate(uses) for name in block_uses.values()}  # the last block using each
    accumulators = {name: InputNorms(modules[name].in_features) for name in last}
    masks: Masks = {}

    def process_block(i: int, block: nn.Module, inputs: BlockInputs) -> None:
        if uses[i]:
            inputs.feed(block, {path: accumulators[name] for path, name in uses[i].items()})
        done = {name: modules[name] for name in dict.fromkeys(uses[i].values()) if last[name] == i}
        masks.update(_prune_with_norms_(model, done, {n: accumulators[n].finalize() for n in done}, sparsity, pattern))

    walk_blocks(model, batches, process_block)
    rest = {name: m for name, m in modules.items() if name not in last}  # outside the blocks: after all of them
    if rest:
        masks.update(_prune_with_norms_(model, rest, input_norms(model, rest, batches), sparsity, pattern))
    return {name: masks[name] for name in modules}


def wanda_prune_(model: nn.Module, batches: list[dict], sparsity: float | None = None, pattern: str | None = None,
                 include: list[str] | None = None, exclude: list[str] | tuple = ()) -> Masks:
    """Prune ``model``'s block linears (or ``include``/``exclude`` globs) by Wanda scores, sequentially, in place.

    Returns:
        The masks, ``{module name: (out, in) bool, True = kept}``.

    Raises:
        ValueError: no calibration batches.
    """
    if not batches:
        raise ValueError("Wanda needs calibration batches (their input-activation norms)")
    return wanda_sequential_(model, target_linears(model, include, exclude), batches, sparsity, pattern)
