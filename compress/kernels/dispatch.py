"""The one entry point for quantized matmuls: ``torch.ops.slimtune.*`` custom ops.

``dequant_matmul(x, qweight, scales, zeros, bits, group_size, k)`` computes
``x @ W^T`` for a weight in the packed format (reference.py). It is a
``torch.library`` custom op with a fake (meta) implementation, so
torch.compile and the ONNX exporter see one op (the exporter lowers it to
``com.microsoft::MatMulNBits``), and with an autograd formula so adapters
trained over a frozen quantized base backpropagate through the transposed
product ``dequant_matmul_t``. The packed tensors never get gradients.

Dispatch by device: CUDA -> the Triton kernels; CPU -> the reference
(dequantize, then one float matmul).

``int8_dynamic_matmul(x, qweight, scales)`` is W8A8: per-token dynamic INT8
activations times per-channel INT8 weights.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from slimtune.compress.kernels import reference


@torch.library.custom_op("slimtune::dequant_matmul", mutates_args=())
def dequant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int, k: int) -> Tensor:
    return reference.dequant_matmul(x, qweight, scales, zeros, bits, group_size, k)


@dequant_matmul.register_fake
def _(x, qweight, scales, zeros, bits, group_size, k):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("slimtune::dequant_matmul_t", mutates_args=())
def dequant_matmul_t(dy: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int, k: int) -> Tensor:
    return reference.dequant_matmul_t(dy, qweight, scales, zeros, bits, group_size, k)


@dequant_matmul_t.register_fake
def _(dy, qweight, scales, zeros, bits, group_size, k):
    return dy.new_empty(*dy.shape[:-1], k)


def _setup(ctx, inputs, output):
    x, qweight, scales, zeros, bits, group_size, k = inputs
    ctx.save_for_backward(qweight, scales, zeros)
    ctx.bits, ctx.group_size, ctx.k = bits, group_size, k


def _backward(ctx, dy):
    qweight, scales, zeros = ctx.saved_tensors
    dx = dequant_matmul_t(dy.contiguous(), qweight, scales, zeros, ctx.bits, ctx.group_size, ctx.k)
    return dx, None, None, None, None, None, None


torch.library.register_autograd("slimtune::dequant_matmul", _backward, setup_context=_setup)


@torch.library.custom_op("slimtune::int8_dynamic_matmul", mutates_args=())
def int8_dynamic_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    return reference.int8_dynamic_matmul(x, qweight, scales)


@int8_dynamic_matmul.register_fake
def _(x, qweight, scales):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


def _setup_w8a8(ctx, inputs, output):
    x, qweight, scales = inputs
    ctx.save_for_backward(qweight, scales)
    ctx.k = x.shape[-1]


def _backward_w8a8(ctx, dy):
    qweight, scales = ctx.saved_tensors  # straight-through for the activation rounding
    return dequant_matmul_t(dy.contiguous(), qweight, scales, None, 8, ctx.k, ctx.k), None, None


torch.library.register_autograd("slimtune::int8_dynamic_matmul", _backward_w8a8, setup_context=_setup_w8a8)
