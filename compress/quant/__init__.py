"""Quantization: packed INT8/INT4 weights behind ``QuantLinear`` module swaps.

    from slimtune.compress import quantize_
    report = quantize_(model, method="gptq", bits=4, group_size=128, batches=batches)

The ``quantize`` recipe stage (stage.py) wraps the same function and adds
quantization-aware training. The packed format and its reference matmul are
in :mod:`slimtune.compress.kernels.reference`.
"""

from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme, quantize_rtn
from slimtune.compress.quant.stage import Quantize, QuantizeConfig, quantize_, select_schemes

__all__ = ["QuantLinear", "QuantScheme", "Quantize", "QuantizeConfig", "quantize_", "quantize_rtn", "select_schemes"]
