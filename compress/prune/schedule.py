"""Gradual pruning on a cubic sparsity schedule, during (recovery) training.

Zhu & Gupta, 2017, "To prune, or not to prune": starting at step ``t0`` the
sparsity rises every ``Δt`` steps over ``n`` steps as

    s_t = s_f + (s_i - s_f) * (1 - (t - t0) / n)^3,

fast at first (when many weights are redundant) and slowly near the final
sparsity ``s_f``, which it reaches exactly at ``t0 + n``. At each pruning
step the masks are recomputed from the current weights' scores (weights
pruned before may come back if they score higher now); between pruning
steps the current masks are re-applied after every optimizer step, so the
sparsity never drifts.

Limits: unstructured sparsity only (N:M is a fixed pattern, not a ramp);
under FSDP each pruning step gathers the targeted weights in full on every
rank; Wanda scores reuse the activation norms of one pass over the dense
model, gathered before training (not the sequential walk of one-shot Wanda).
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from slimtune.compress.prune.masks import Masks, apply_masks_, full_weight, masks_from_scores

Scorer = Callable[[str, torch.Tensor], torch.Tensor]  # (name, full (out, in) weight) -> scores


def cubic_sparsity(step: int, final: float, steps: int, initial: float = 0.0, start: int = 0) -> float:
    """Sparsity after ``step`` optimizer steps: ``initial`` before ``start``, ``final`` from ``start + steps`` on."""
    if step <= start:
        return initial
    progress = min((step - start) / max(steps, 1), 1.0)
    return final + (initial - final) * (1.0 - progress) ** 3


class GradualPruner:
    """An ``after_step`` hook that prunes on the cubic schedule and keeps masks applied.

    Args:
        names: the module names to prune (of the unwrapped model).
        scorer: ``(name, weight) -> (out, in) scores`` (higher = keep).
        final: target sparsity ``s_f``, reached exactly at ``start + steps``.
        steps: ramp length ``n`` in optimizer steps.
        every: pruning frequency ``Δt`` in optimizer steps.
        initial: starting sparsity ``s_i`` (applied by ``start_(model)``).
        start: ``t0``, the step the ramp starts after.
        scope: comparison group of the scores: ``layer``, ``row`` or ``global``.

    Attributes:
        masks: the current masks (full tensors, keyed by module name).
        history: ``[(step, sparsity)]`` of each pruning step.
    """

    def __init__(self, names: list[str], scorer: Scorer, final: float, steps: int, every: int = 1,
                 initial: float = 0.0, start: int = 0, scope: str = "layer"):
        self.names, self.scorer, self.scope = list(names), scorer, scope
        self.final, self.steps, self.every, self.initial, self.start = final, steps, every, initial, start
        self.step = 0
        self.masks: Masks = {}
        self.history: list[tuple[int, float]] = []

    @property
    def end(self) -> int:
        return self.start + self.steps

    def is_pruning_step(self, step: int) -> bool:
        return self.start <= step <= self.end and ((step - self.start) % self.every == 0 or step == self.end)

    def prune_(self, model: nn.Module, sparsity: float) -> None:
        """Recompute the masks at ``sparsity`` from ``model``'s current weights and apply them."""
        scores = {name: self.scorer(name, full_weight(model.get_submodule(name))).cpu() for name in self.names}
        self.masks = masks_from_scores(scores, sparsity, self.scope)
        self.history.append((self.step, sparsity))
        apply_masks_(model, self.masks)

    def start_(self, model: nn.Module) -> None:
        """Before training: prune to ``initial`` (when the ramp starts at step 0 and ``initial`` > 0)."""
        if self.start == 0 and self.initial > 0:
            self.prune_(model, self.initial)

    @torch.no_grad()
    def __call__(self, model: nn.Module) -> None:
        self.step += 1
        if self.is_pruning_step(self.step):
            self.prune_(model, cubic_sparsity(self.step, self.final, self.steps, self.initial, self.start))
        elif self.masks:
            apply_masks_(model, self.masks)
