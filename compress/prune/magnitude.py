"""Magnitude pruning: drop the weights of smallest absolute value.

Layer-wise (each linear pruned to the sparsity on its own) or global (one
threshold over all targeted linears, so layers end up unevenly sparse), and
N:M semi-structured. Han et al., 2015, "Learning both Weights and Connections
for Efficient Neural Networks"; the global variant as in Frankle & Carbin,
2019. One-shot magnitude pruning of large language models degrades fast
beyond ~30-50% sparsity without recovery training; Wanda (``wanda.py``) does
better at the same sparsity.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.compress.prune.masks import Masks, apply_masks_, full_weight, masks_from_scores, target_linears


def magnitude_scores(weight: torch.Tensor) -> torch.Tensor:
    """(out, in) -> (out, in) importance ``|W|`` (float32)."""
    return weight.detach().abs().float()


def magnitude_masks(modules: dict[str, nn.Module], sparsity: float | None = None, scope: str = "layer",
                    pattern: str | None = None) -> Masks:
    """Masks for ``{name: linear}`` keeping the largest ``|W|`` per layer, globally, or per N:M group."""
    scores = {name: magnitude_scores(full_weight(m)).cpu() for name, m in modules.items()}
    return masks_from_scores(scores, sparsity, scope, pattern)


def magnitude_prune_(model: nn.Module, sparsity: float | None = None, scope: str = "layer", pattern: str | None = None,
                     include: list[str] | None = None, exclude: list[str] | tuple = ()) -> Masks:
    """Prune ``model``'s block linears (or ``include``/``exclude`` globs) by magnitude, in place; returns the masks."""
    masks = magnitude_masks(target_linears(model, include, exclude), sparsity, scope, pattern)
    apply_masks_(model, masks)
    return masks
