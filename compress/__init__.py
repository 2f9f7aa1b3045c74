"""Compression algorithms: distillation, pruning, parameter sharing, quantization.

Each is a recipe stage and a Python function on a plain transformers model::

    from slimtune.compress import distill, prune_, quantize_, share_layers_
"""

from slimtune.compress.share import share_layers_  # noqa: E402,F401 - registers the "share" stage
from slimtune.compress.prune import apply_masks_, prune_, prune_structured_  # noqa: E402,F401 - registers the "prune" stage
from slimtune.compress.distill import distill  # noqa: E402,F401 - registers the "distill" stage
from slimtune.compress.quant import QuantLinear, QuantScheme, quantize_  # noqa: E402,F401 - registers the "quantize" stage
from slimtune.compress import invariants  # noqa: E402,F401 - keeps and re-checks compression records
