"""Wanda: prune by weight magnitude times input-activation norm.

Sun, Liu, Bair & Kolter, 2023, "A Simple and Effective Pruning Approach for
Large Language Models". Weight ``W_ij`` (output ``i``, input ``j``) scores

    S_ij = |W_ij| * ||X_j||_2

where ``X_j`` is input feature ``j`` over every calibration token. Scores are
compared within each output row (the paper's choice: each output keeps the
same share of its inputs), or within N:M groups of a row. No weight update,
no second-order information: one forward pass over a few calibration batches.

Limits: the activation norms come from the dense model (all layers
calibrated in one pass, not sequentially on the pruned prefix as in the
paper's code); padding tokens are excluded; gradual pruning reuses the norms
gathered once before training.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.compress.prune.calibrate import calibrate, real_tokens
from slimtune.compress.prune.masks import Masks, apply_masks_, full_weight, masks_from_scores, target_linears


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
    """``{name: (in,) input norms}`` of each module over ``batches``."""
    accumulators = {name: InputNorms(m.in_features) for name, m in modules.items()}
    calibrate(model, batches, accumulators)
    return {name: acc.finalize() for name, acc in accumulators.items()}


def wanda_masks(modules: dict[str, nn.Module], norms: dict[str, torch.Tensor], sparsity: float | None = None,
                pattern: str | None = None) -> Masks:
    """Masks keeping the highest-scoring weights of each output row (or of each N:M group)."""
    scores = {name: wanda_scores(full_weight(m), norms[name]).cpu() for name, m in modules.items()}
    return masks_from_scores(scores, sparsity, "row", pattern)


def wanda_prune_(model: nn.Module, batches: list[dict], sparsity: float | None = None, pattern: str | None = None,
                 include: list[str] | None = None, exclude: list[str] | tuple = ()) -> Masks:
    """Calibrate on ``batches``, then prune ``model``'s block linears by Wanda scores, in place; returns the masks.

    Raises:
        ValueError: no calibration batches.
    """
    if not batches:
        raise ValueError("Wanda needs calibration batches (their input-activation norms)")
    modules = target_linears(model, include, exclude)
    masks = wanda_masks(modules, input_norms(model, modules, batches), sparsity, pattern)
    apply_masks_(model, masks)
    return masks
