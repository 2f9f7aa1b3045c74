"""Delta tuning: LoRA (and DoRA, and over quantized weights), adapters, prefix-tuning, BitFit, ladder side-tuning.

Each method is a recipe stage and a Python function on a plain transformers
model or a SlimTune artifact's model::

    from slimtune.delta import add_lora_, merge_and_unload_, save_delta, load_delta_
    add_lora_(model, targets=["query", "value"], rank=8)

Targeting and wrapping (roles, globs, regexes; attach, switch, disable,
detach) live in :mod:`slimtune.delta.inject`; saving in :mod:`slimtune.delta.io`.
"""

from slimtune.delta.inject import (DeltaLayer, TrainedCopy, delta_names, deltas, detach_, detached, disabled,  # noqa: F401
                                   freeze_backbone_, select_modules, set_active, trainable_summary)
from slimtune.delta.lora import LoraLinear, add_lora_, merge_, merge_and_unload_, unmerge_  # noqa: F401 - registers "lora"
from slimtune.delta.io import load_delta_, save_delta  # noqa: F401 - registers the "deltas" attachment
from slimtune.delta.peft import load_peft_, save_peft  # noqa: F401,E402 - PEFT interoperability
from slimtune.delta.prefix import PrefixTuning, add_prefix_, finalize_  # noqa: F401,E402 - registers "prefix"
from slimtune.delta.qalora import QALoraLinear  # noqa: F401,E402 - registers the "QALoraLinear" module type (quant_aware LoRA)
from slimtune.delta.adapter import HoulsbyAdapter, ParallelAdapter, ResidualParallelAdapter, add_adapters_  # noqa: F401,E402 - registers "adapter"
from slimtune.delta.bitfit import BiasDelta, add_bitfit_, merge_and_unload_bitfit_, merge_bitfit_, unmerge_bitfit_  # noqa: F401,E402 - registers "bitfit"
from slimtune.delta.ladder import LadderSideNetwork, add_ladder_  # noqa: F401,E402 - registers "ladder"
