"""ONNX lowerings of the quantized matmuls, for ``torch.onnx.export(dynamo=True)``.

Importing this module registers (``slimtune.registry.register_onnx_lowering``):

* ``slimtune::dequant_matmul`` with ``bits=4`` -> ONNX Runtime's contrib op
  ``com.microsoft::MatMulNBits`` (``A``, ``B``, ``scales``, ``zero_points``;
  attributes ``K``, ``N``, ``bits=4``, ``block_size``; no ``accuracy_level``,
  so ORT computes in float like the reference). Our ``qweight`` rows already
  are its ``B`` rows (two codes per byte along K, even k in the low nibble), so
  ``B`` is ``qweight`` reshaped to ``(N, k_blocks, block_size / 2)``.
  Symmetric codes omit ``zero_points`` (ORT's default zero point is 8, as
  ours); asymmetric ones pack two per byte along the blocks, ``(N,
  ceil(k_blocks / 2))``; ``scales`` are ``(N, k_blocks)`` in A's dtype.
  Float zero points (packed format v2, an exact QA-LoRA merge) go in
  unpacked, ``(N, k_blocks)`` in A's dtype like the scales: ORT's contrib
  spec types ``zero_points`` as uint8 or A's type, and dequantizes both as
  ``(code - zero_point) * scale`` (checked in ONNX Runtime by the tests).
  Grouped weights use ``block_size = group_size``. Per-channel weights (one
  scale per row, any K) use the largest of 128/64/32/16 that divides K and
  repeat the row's scale and zero point in every block, which is exact (the
  file holds ``k_blocks`` scales per row, 4 bytes per 8..64 bytes of codes); when
  none divides K (ORT wants a power of two >= 16) the block size is 32 and the
  last block is padded with the zero-point code, so padded weights are 0, while
  the ``K`` attribute stays the real K (a float zero point pads with its
  nearest code: a padded weight is then at most half a step, and meets no
  input either way). (ORT 1.32 checks that ``B`` is 3-D;
  it accepts ``scales`` and ``zero_points`` flat or 2-D.)
* ``slimtune::dequant_matmul`` with ``bits=8`` (weight only) -> QDQ:
  ``DequantizeLinear(int8 W^T (K, N), scales (N,), axis=1)`` then ``MatMul``.
  QDQ rather than ``MatMulInteger`` because the activations stay float (they
  are not quantized in this scheme); it is the reference's ``x @ (codes *
  scale)^T``, in the standard form runtimes recognise as weight-only INT8.
  Note that ONNX Runtime (1.32, at its default optimisation level) fuses it
  into ``MatMulNBits(bits=8)`` with the ``accuracy_level`` of the session
  option ``session.qdq_matmulnbits_accuracy_level``, default 4 = INT8
  activations, faster but about 0.5% off; ``slimtune.export.ort_session``
  sets it to "0" (float activations: PyTorch's numbers).
* ``slimtune::int8_dynamic_matmul`` (W8A8) -> per-token scale
  ``max(ReduceMax(|x|, -1), 1e-8) / 127``, ``Round(x / scale)`` (half to even,
  like ``torch.round``), ``Clip`` to +-127, ``Cast`` to int8,
  ``MatMulInteger(codes, int8 W^T)`` -> exact int32, ``Cast`` to float, times
  the token scale, times the weight scales: the reference's operations in the
  reference's order.
* ``aten::bitwise_right_shift`` (``>>``) on uint8 -> ``BitShift``: works
  around onnxscript 0.7's torchlib, which emulates an arithmetic shift and
  returns int8 for uint8 inputs (an invalid graph wherever the result meets
  uint8 again, as in unpacking 4-bit codes for ``QuantEmbedding``). Other
  dtypes keep torchlib's lowering.

The packed tensors are module buffers, which the exporter makes initializers.
The layouts above are computed in NumPy from those initializers, as
``onnx_ir.LazyTensor`` constants evaluated when the exporter optimises and
saves the model (after it has attached the buffers' data), once per tensor
and layout even when several layers share a tensor; the exporter's
optimiser lifts them to initializers and drops the unused originals. So the
saved graph holds the packed bytes once, and ``MatMulNBits``,
``DequantizeLinear`` and ``MatMulInteger`` read initializers directly. (Graph
ops instead — Reshape, Transpose — would be folded by the optimiser only
below its size limit of 8192 elements, i.e. not for real layers.) The
exception is a packed tensor that other nodes read too (an LM head tied to a
quantized word embedding): there ``B`` is a ``Reshape`` (``W^T`` a
``Transpose``) of the shared initializer, so the file stores the table once
and ONNX Runtime folds the reshape when it loads the model; a shared 4-bit
table whose width needs padding is copied instead.

Limits: ``dequant_matmul_t`` (the backward product) has no lowering — export
is for inference. ``MatMulNBits`` is an ONNX Runtime contrib op.
"""

from __future__ import annotations

from typing import Callable

import numpy as np
import onnx
import onnx_ir as ir
import torch
from onnxscript import opset18 as op
from onnxscript.function_libs.torch_lib.ops import core as torchlib
from onnxscript.values import Op, Opset

from slimtune.errors import SlimTuneError
from slimtune.registry import register_onnx_lowering
from slimtune.compress.kernels import dispatch  # noqa: F401 - registers torch.ops.slimtune.*
from slimtune.compress.kernels.reference import symmetric_zero

MSFT = Opset("com.microsoft", 1)
NBITS_BLOCK_SIZES = (128, 64, 32, 16)  # per-channel block sizes, largest first (ORT: powers of two >= 16)
PAD_BLOCK_SIZE = 32


def _contrib_schema(name: str, inputs: list[tuple[str, str, bool]], outputs: list[tuple[str, str]],
                    types: list[tuple[str, list[str]]], attributes: list[str]) -> onnx.defs.OpSchema:
    """An ``OpSchema`` for an ONNX Runtime contrib op: onnx ships none, and the exporter's op recorder needs one."""
    param, option = onnx.defs.OpSchema.FormalParameter, onnx.defs.OpSchema.FormalParameterOption
    return onnx.defs.OpSchema(
        name, MSFT.domain, MSFT.version,
        inputs=[param(n, t, param_option=option.Optional if optional else option.Single) for n, t, optional in inputs],
        outputs=[param(n, t) for n, t in outputs],
        type_constraints=[(t, allowed, "") for t, allowed in types],
        attributes=[onnx.defs.OpSchema.Attribute(a, onnx.defs.OpSchema.AttrType.INT, required=True) for a in attributes],
    )


MatMulNBits = Op(MSFT, "MatMulNBits", _contrib_schema(
    "MatMulNBits",
    inputs=[("A", "T1", False), ("B", "T2", False), ("scales", "T1", False), ("zero_points", "T3", True)],
    outputs=[("Y", "T1")],
    types=[("T1", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"]), ("T2", ["tensor(uint8)"]),
           ("T3", ["tensor(uint8)", "tensor(float)", "tensor(float16)", "tensor(bfloat16)"])],
    attributes=["K", "N", "bits", "block_size"],
))


# -- layout: packed format v1 -> MatMulNBits operands (pure NumPy) -----------------


def nbits_block_size(group_size: int, k: int) -> int:
    """``MatMulNBits``' block size for a weight with ``k`` inputs in groups of ``group_size``."""
    if group_size < k:
        return group_size  # 32/64/128: powers of two dividing K
    return next((b for b in NBITS_BLOCK_SIZES if k % b == 0), PAD_BLOCK_SIZE)


def matmul_nbits_operands(qweight: np.ndarray, scales: np.ndarray, zeros: np.ndarray | None, group_size: int, k: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Packed INT4 tensors -> ``MatMulNBits``' ``B``, ``scales`` and ``zero_points``.

    Args:
        qweight: uint8 ``(N, ceil(K/2))``; scales: ``(N, G)``; zeros: uint8 or float ``(N, G)``, or None.
        group_size: K // G.

    Returns:
        B uint8 ``(N, k_blocks, block_size / 2)``, scales ``(N, k_blocks)`` and
        zero_points uint8 ``(N, ceil(k_blocks / 2))`` (None when symmetric;
        float zeros: unpacked, ``(N, k_blocks)`` of their own dtype),
        with ``block_size = nbits_block_size(group_size, k)``.
    """
    n = qweight.shape[0]
    block = nbits_block_size(group_size, k)
    k_blocks = -(-k // block)
    repeat = k_blocks // scales.shape[1]  # blocks per group: 1, or all of them per channel
    scales = np.repeat(scales, repeat, axis=1)  # (N, k_blocks)
    zero = np.repeat(zeros, repeat, axis=1) if zeros is not None else np.full(scales.shape, symmetric_zero(4), np.uint8)
    float_zeros = zeros is not None and np.issubdtype(zeros.dtype, np.floating)
    if k_blocks * block != k:
        pad = np.clip(np.rint(zero[:, -1]), 0, 15).astype(np.uint8) if float_zeros else zero[:, -1]
        qweight = _pad_codes(qweight, pad, k, k_blocks * block)  # (N, k_blocks * block / 2)
    b = np.ascontiguousarray(qweight).reshape(n, k_blocks, block // 2)
    if zeros is None:
        return b, scales, None
    if float_zeros:
        return b, scales, zero  # (N, k_blocks), unpacked
    if k_blocks % 2:
        zero = np.concatenate([zero, np.zeros((n, 1), np.uint8)], axis=1)
    return b, scales, (zero[:, 0::2] | (zero[:, 1::2] << 4)).astype(np.uint8)  # (N, ceil(k_blocks/2))


def _pad_codes(qweight: np.ndarray, zero: np.ndarray, k: int, padded_k: int) -> np.ndarray:
    """Packed codes ``(N, ceil(K/2))`` extended to ``padded_k`` codes with each row's zero point (weight 0)."""
    codes = np.stack([qweight & 0xF, qweight >> 4], axis=-1).reshape(qweight.shape[0], -1)[:, :k]  # (N, K)
    pad = np.repeat(zero[:, None], padded_k - k, axis=1)  # (N, padded_k - K)
    codes = np.concatenate([codes, pad], axis=1)  # (N, padded_k)
    return (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)


# -- building blocks ------------------------------------------------------------------


def _array(value: ir.Value) -> np.ndarray:
    if value.const_value is None:
        raise SlimTuneError(f"ONNX export: the quantized tensor {value.name!r} is not a constant of the model",
                            "export a model whose QuantLinear packed tensors are its own buffers")
    return value.const_value.numpy()


def _layout(source: ir.Value, key: tuple, build: Callable[[], ir.Value]) -> ir.Value:
    """The ONNX layout ``key`` of an initializer, built once per export even when several layers share it."""
    cache = source.meta.setdefault("slimtune.onnx_layouts", {})
    if key not in cache:
        cache[key] = build()
    return cache[key]


def _constant(name: str, sources: list, fn: Callable[..., np.ndarray], dtype: ir.DataType, shape: tuple[int, ...]) -> ir.Value:
    """A constant computed by ``fn`` from the sources' initializer data, when the model is optimised or saved."""
    def make():
        arrays = [None if s is None else _array(s) for s in sources]
        return ir.tensor(np.ascontiguousarray(fn(*arrays).astype(dtype.numpy())))

    value = op.Constant(value=ir.LazyTensor(make, dtype=dtype, shape=ir.Shape(shape), cache=True))
    value.name = name
    return value


def _shared(value: ir.Value) -> bool:
    """Other nodes read this initializer already (e.g. the embedding of a tied LM head)."""
    return len(value.uses()) > 0


def _suffix(name: str, dtype: ir.DataType) -> str:
    return name if dtype == ir.DataType.FLOAT else f"{name}_{dtype.name.lower()}"


def _int8_weight_t(qweight: ir.Value, n: int, k: int) -> ir.Value:
    """int8 ``W^T`` ``(K, N)``: the codes transposed once, in the file (or by ORT at load when shared)."""
    if _shared(qweight):
        return _layout(qweight, ("transpose",), lambda: op.Transpose(qweight, perm=[1, 0]))
    return _layout(qweight, ("t",), lambda: _constant(f"{qweight.name}_t", [qweight], lambda qw: qw.T, ir.DataType.INT8, (k, n)))


def _flat_scales(scales: ir.Value, n: int, dtype: ir.DataType) -> ir.Value:
    """Per-channel scales ``(N, 1)`` -> ``(N,)`` in ``dtype``."""
    name = _suffix(f"{scales.name}_flat", dtype)
    return _layout(scales, ("flat", dtype), lambda: _constant(name, [scales], lambda s: s.reshape(-1), dtype, (n,)))


# -- lowerings ---------------------------------------------------------------------------


def dequant_matmul_onnx(x, qweight, scales, zeros, bits: int, group_size: int, k: int):
    """Lowering of ``slimtune::dequant_matmul``: MatMulNBits (4 bits), DequantizeLinear + MatMul (8 bits)."""
    n = qweight.shape[0]
    if bits == 8:
        w = op.DequantizeLinear(_int8_weight_t(qweight, n, k), _flat_scales(scales, n, x.dtype), axis=1)  # (K, N)
        return op.MatMul(x, w)
    block = nbits_block_size(group_size, k)
    k_blocks = -(-k // block)
    sources = [qweight, scales, zeros]

    def operand(name: str, i: int, dtype: ir.DataType, shape: tuple[int, ...]) -> Callable[[], ir.Value]:
        def fn(qw, s, z):
            return matmul_nbits_operands(qw, s, z, group_size, k)[i]

        return lambda: _constant(name, sources, fn, dtype, shape)

    if _shared(qweight) and k_blocks * block == k:
        b = _layout(qweight, ("nbits", block), lambda: op.Reshape(qweight, op.Constant(value_ints=[n, k_blocks, block // 2])))
    else:
        b = _layout(qweight, ("nbits", block), operand(f"{qweight.name}_nbits", 0, ir.DataType.UINT8, (n, k_blocks, block // 2)))
    s = _layout(scales, ("nbits", block, x.dtype), operand(_suffix(f"{scales.name}_nbits", x.dtype), 1, x.dtype, (n, k_blocks)))
    zp = None
    if zeros is not None and zeros.dtype != ir.DataType.UINT8:  # float offsets (format v2): A's dtype, unpacked
        zp = _layout(zeros, ("nbits", block, x.dtype), operand(_suffix(f"{zeros.name}_nbits", x.dtype), 2, x.dtype, (n, k_blocks)))
    elif zeros is not None:
        zp = _layout(zeros, ("nbits", block), operand(f"{zeros.name}_nbits", 2, ir.DataType.UINT8, (n, (k_blocks + 1) // 2)))
    return MatMulNBits(x, b, s, zp, K=k, N=n, bits=4, block_size=block)


def int8_dynamic_matmul_onnx(x, qweight, scales):
    """Lowering of ``slimtune::int8_dynamic_matmul`` (W8A8): dynamic per-token INT8 activations, MatMulInteger."""
    n, k = qweight.shape
    xf = x if x.dtype == ir.DataType.FLOAT else op.Cast(x, to=ir.DataType.FLOAT)
    amax = op.ReduceMax(op.Abs(xf), op.Constant(value_ints=[-1]), keepdims=1)  # (..., 1)
    x_scale = op.Div(op.Max(amax, op.Constant(value_float=1e-8)), op.Constant(value_float=127.0))  # (..., 1)
    codes = op.Clip(op.Round(op.Div(xf, x_scale)), op.Constant(value_float=-127.0), op.Constant(value_float=127.0))
    acc = op.MatMulInteger(op.Cast(codes, to=ir.DataType.INT8), _int8_weight_t(qweight, n, k))  # (..., N) int32
    y = op.Mul(op.Mul(op.Cast(acc, to=ir.DataType.FLOAT), x_scale), _flat_scales(scales, n, ir.DataType.FLOAT))  # (..., N)
    return y if x.dtype == ir.DataType.FLOAT else op.Cast(y, to=x.dtype)


def right_shift_scalar_onnx(self, other):
    """``aten::bitwise_right_shift.Tensor_Scalar``: a logical ``BitShift`` for uint8, torchlib's lowering otherwise."""
    if self.dtype != ir.DataType.UINT8:
        return torchlib.aten_bitwise_right_shift_tensor_scalar(self, other)
    return op.BitShift(self, op.Constant(value=ir.tensor(other, dtype=ir.DataType.UINT8)), direction="RIGHT")


def right_shift_onnx(self, other):
    """``aten::bitwise_right_shift.Tensor``: as :func:`right_shift_scalar_onnx`, with a tensor shift."""
    if self.dtype != ir.DataType.UINT8:
        return torchlib.aten_bitwise_right_shift(self, other)
    return op.BitShift(self, op.Cast(other, to=ir.DataType.UINT8), direction="RIGHT")


register_onnx_lowering(torch.ops.slimtune.dequant_matmul.default, dequant_matmul_onnx)
register_onnx_lowering(torch.ops.slimtune.int8_dynamic_matmul.default, int8_dynamic_matmul_onnx)
for _overload, _fn in [(torch.ops.aten.bitwise_right_shift.Tensor_Scalar, right_shift_scalar_onnx),
                       (torch.ops.aten.__rshift__.Scalar, right_shift_scalar_onnx),
                       (torch.ops.aten.bitwise_right_shift.Tensor, right_shift_onnx),
                       (torch.ops.aten.__rshift__.Tensor, right_shift_onnx)]:
    register_onnx_lowering(_overload, _fn)
