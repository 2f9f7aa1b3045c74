"""Pruning: unstructured (magnitude, Wanda, N:M) and structured (heads, FFN neurons, layers) with physical removal.

    from slimtune.compress import prune_
    report = prune_(model, method="wanda", sparsity=0.5, batches=batches)
    report["modules"]  # {module name: measured sparsity}

The ``prune`` recipe stage (stage.py) wraps the same functions and adds
recovery training and gradual (cubic) schedules.
"""

from slimtune.compress.prune.magnitude import magnitude_masks, magnitude_prune_
from slimtune.compress.prune.masks import apply_masks_, measure_sparsity, target_linears
from slimtune.compress.prune.schedule import GradualPruner, cubic_sparsity
from slimtune.compress.prune.stage import Prune, PruneConfig, prune_
from slimtune.compress.prune.structured import prune_structured_
from slimtune.compress.prune.wanda import wanda_masks, wanda_prune_

__all__ = ["GradualPruner", "Prune", "PruneConfig", "apply_masks_", "cubic_sparsity", "magnitude_masks", "magnitude_prune_",
           "measure_sparsity", "prune_", "prune_structured_", "target_linears", "wanda_masks", "wanda_prune_"]
