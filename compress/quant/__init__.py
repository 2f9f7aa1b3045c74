"""Quantization: packed INT8/INT4 weights behind ``QuantLinear`` module swaps.

    from slimtune.compress import quantize_
    report = quantize_(model, method="gptq", bits=4, group_size=128, batches=batches)

The ``quantize`` recipe stage (stage.py) wraps the same function and adds
quantization-aware training. The packed format and its reference matmul are
in :mod:`slimtune.compress.kernels.reference`.
"""

from slimtune.compress.quant.awq import awq_quantize_
from slimtune.compress.quant.embedding import QuantEmbedding, quantize_embedding_
from slimtune.compress.quant.gptq import GPTQ, gptq_quantize_
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.qat import FakeQuantLinear, convert_qat_, prepare_qat_
from slimtune.compress.quant.rtn import QuantScheme, quantize_rtn
from slimtune.compress.quant import onnx as _onnx  # noqa: F401 - registers the ONNX lowerings of the quantized ops
from slimtune.compress.quant.stage import Quantize, QuantizeConfig, quantize_, select_schemes

__all__ = ["awq_quantize_", "GPTQ", "gptq_quantize_", "FakeQuantLinear", "QuantEmbedding", "QuantLinear", "QuantScheme", "Quantize", "QuantizeConfig", "convert_qat_",
           "prepare_qat_", "quantize_", "quantize_embedding_", "quantize_rtn", "select_schemes"]
