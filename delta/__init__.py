"""Delta tuning: LoRA, adapters, prefix-tuning, BitFit, ladder side-tuning.

Stages land here with the Delta-tuning issue; the package fixes the
``slimtune.delta`` namespace.
"""
