"""The one entry point for quantized matmuls: ``torch.ops.slimtune.*`` custom ops.

``dequant_matmul(x, qweight, scales, zeros, bits, group_size, k)`` computes
``x @ W^T`` for a weight in the packed format (reference.py). It is a
``torch.library`` custom op with a fake (meta) implementation, so
torch.compile and the ONNX exporter see one op (the exporter lowers it to
``com.microsoft::MatMulNBits``), and with an autograd formula so adapters
trained over a frozen quantized base backpropagate through the transposed
product ``dequant_matmul_t``. The packed tensors never get gradients.
``int8_dynamic_matmul(x, qweight, scales)`` is W8A8: per-token dynamic INT8
activations times per-channel INT8 weights.

Dispatch by device, dtype and shape. Every path is tested against reference.py,
and every path takes both kinds of INT4 zero points: uint8 (format version 1)
and float32 offsets (version 2, written by an exact QA-LoRA merge).

CUDA -> the Triton kernels (triton_int4.py / triton_int8.py, imported on the
first CUDA call, so CPU users never need triton; without triton, or for a
layout they do not implement, the reference):

* M <= ``GEMV_MAX_M`` (16) rows: the GEMV kernel (bandwidth bound: reads the
  packed bytes once).
* M >= ``CUBLAS_MIN_M`` (1024) rows: dequantize once to the activation dtype
  (one Triton pass) and call cuBLAS. Where 1024 comes from: an estimate, not a
  measurement (no GPU was available when this was written). Dequantizing a
  4096x4096 INT4 weight to fp16 moves ~40 MB (~15 us on an H100); a fused
  Triton GEMM reaching ~70% of cuBLAS loses that much once M is about 700, so
  the fused kernel is kept below 1024. ``python -m
  slimtune.compress.kernels.bench`` times the gemv, gemm and dequant+cuBLAS
  paths at every M; revise both thresholds from its table.
* otherwise the tiled GEMM kernel; ``dequant_matmul_t`` always uses the tiled
  transposed kernel below ``CUBLAS_MIN_M``.
* W8A8: ``torch._int_mm`` (exact int32 accumulation; needs K and N multiples
  of 8, M is padded to 17 rows), else an exact float64 matmul of the codes.

CPU -> chosen by measurement on this project's 2-core AMD EPYC (AVX2), torch
2.13, one thread, best of 15 under load from other jobs (so noisy), from
``python -m slimtune.compress.kernels.bench --threads 1 --m 1 2 4 8 16 32 128``
without CUDA. Times in ms, reference / chosen path:

* INT4, bf16 activations, M <= ``CPU_INT4PACK_BF16_MAX_M`` (32): torch's
  ``_weight_int4pack_mm_for_cpu`` with bf16 scales and float zero points
  ``(8 - z) s``. K=576, N=1536, g64: M=1 22 / 0.16, M=32 21 / 1.7;
  2048x2048 g128: M=1 24 / 0.74, M=8 25 / 1.9. Above 32 rows it stops winning
  (M=128, 2048x2048: 81 ms against 51 for the exact path below), so larger M
  takes the exact path. It rounds the scales to bf16, so it matches the
  reference only within :func:`cpu_fast_path_error_bound` (about a bf16
  ulp, 2^-8, of the weights' contribution).
* INT4 with fp32/fp16 activations at M == 1 (decoding): the same kernel in
  fp32, within :func:`cpu_fast_path_error_bound` (float32 roundoff).
  2048x2048 g128: 105 / 13 ms; 576x1536: 17 / 2.0. Its fp32 path is not
  vectorized over M (M=8, 2048x2048: 110 ms against 20), so only M == 1.
* INT8 per channel with fp32/fp16 activations at M == 1: torch's
  ``_weight_int8pack_mm`` (float32 roundoff, :func:`cpu_fast_path_error_bound`): 2048x2048 19 / 7.2 ms;
  576x1536 18 / 1.3. At M=8 it loses (99 against 37 ms).
* Everything else, and every ``dequant_matmul_t``: dequantize with
  broadcasting instead of the reference's ``repeat_interleave`` (bitwise the
  same weight, so bitwise the same result) and one float matmul: INT4 fp32
  M=128 2048x2048 48 / 44 ms, M=8 576x1536 17 / 2.8; INT8 M=128 99 / 46.
* W8A8 from ``CPU_W8A8_FLOAT_MIN_M`` (16) rows: the int8 codes multiplied by
  float32 BLAS in chunks of 1024 inputs, exact (``exact_int8_matmul_fp32``),
  so bitwise the reference's result. Side by side, one thread (2026-12-01,
  idle), reference (an int32 matmul of the codes) / float chunks: 2048x2048
  M=16 11.2 / 10.7 ms, M=64 31 / 18, M=2048 2462 / 332; 576x1536 M=16
  2.1 / 1.1, M=2048 238 / 97. Below 16 rows the reference is as fast or
  faster (M=4, 2048x2048: 4.5 against 7.6) and is kept. ``torch._int_mm`` is
  exact but slower on this CPU (bench: M=8 2048x2048 24.5 against 5.5 ms for
  the reference, M=128 about 10x slower).

The int4pack layout is derived from the stored tensors, never stored: it is
cached per ``qweight`` tensor (a weak-keyed dictionary, so it dies with the
module) and rebuilt when ``qweight``, ``scales`` or ``zeros`` change (their
``_version`` counters and data pointers). It costs ``qweight``'s size again
plus two floats per (group, output channel).
"""

from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from slimtune.compress.kernels import reference

GEMV_MAX_M = 16
CUBLAS_MIN_M = 1024
CPU_INT4PACK_GROUPS = (256, 128, 64, 32)
CPU_INT4PACK_BF16_MAX_M = 32
CPU_W8A8_FLOAT_MIN_M = 16


def _rows(x: Tensor) -> int:
    return x.numel() // x.shape[-1] if x.shape[-1] else 0


# -- CPU ------------------------------------------------------------------------------------------------------


def dequantize_fast(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int, k: int) -> Tensor:
    """:func:`reference.dequantize` without ``repeat_interleave``: the same float32 ``(N, K)``, bit for bit.

    With uint8 zero points ``(code - zero)`` is a small integer, exact in
    float32 either way, and each weight is one rounded product with its scale;
    with float32 zero points (format version 2) both sides round the same
    float32 subtraction, then the same product.
    """
    n = qweight.shape[0]
    codes = reference.unpack_int4(qweight, k) if bits == 4 else qweight  # (N, K)
    zero = zeros.float()[..., None] if zeros is not None else float(reference.symmetric_zero(bits))  # (N, G, 1)
    groups = reference.num_groups(k, group_size)
    codes = torch.nn.functional.pad(codes, (0, groups * group_size - k))  # a short last group: (N, G * gs)
    w = (codes.reshape(n, groups, group_size).float() - zero) * scales.float()[..., None]  # (N, G, gs)
    return w.reshape(n, -1)[:, :k]


def _dequant_then_matmul(x, qweight, scales, zeros, bits, group_size, k):
    w = dequantize_fast(qweight, scales, zeros, bits, group_size, k)  # (N, K)
    return (x.float() @ w.t()).to(x.dtype)


_DERIVED: WeakIdKeyDictionary = WeakIdKeyDictionary()


def _derived(tag: str, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], build):
    """``build()``, cached per ``qweight`` tensor until any of the packed tensors changes."""
    try:
        stamp = tuple((t.data_ptr(), t._version) if t is not None else None for t in (qweight, scales, zeros))
    except RuntimeError:  # inference tensors carry no version counter: do not cache
        return build()
    entries = _DERIVED.setdefault(qweight, {})
    if tag not in entries or entries[tag][0] != stamp:
        entries[tag] = (stamp, build())
    return entries[tag][1]


def _int4pack_group(n: int, group_size: int, k: int) -> int | None:
    """The group the CPU int4pack kernel runs with, or None where it cannot take this weight."""
    if n % 16 or k % 2:
        return None
    # A short last group (K not a multiple of group_size) runs with a smaller group that divides both.
    return next((g for g in CPU_INT4PACK_GROUPS if group_size % g == 0 and k % g == 0), None)


def _int4pack_weight(qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int, k: int,
                     cpu_group: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """int4pack's weight layout and its ``(K / cpu_group, N, 2)`` scales and float zero points ``(8 - z) s``."""
    def build_weight():
        codes = reference.unpack_int4(qweight, k).to(torch.int32)  # (N, K)
        return torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)

    def build_scales():
        repeat = group_size // cpu_group
        s = scales.float().repeat_interleave(repeat, dim=1)[:, : k // cpu_group]  # (N, K / cpu_group)
        z = zeros.float().repeat_interleave(repeat, dim=1)[:, : k // cpu_group] if zeros is not None else 8.0
        return torch.stack([s, (8.0 - z) * s], dim=-1).transpose(0, 1).contiguous().to(dtype)  # (G', N, 2)

    packed = _derived("int4pack", qweight, scales, zeros, build_weight)
    return packed, _derived(f"int4pack-scales-{dtype}-{cpu_group}", qweight, scales, zeros, build_scales)


def int4pack_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], group_size: int, k: int,
                    dtype: torch.dtype = torch.bfloat16) -> Tensor | None:
    """``x @ W^T`` with torch's CPU int4 kernel computing in ``dtype``; None where it does not apply."""
    cpu_group = _int4pack_group(qweight.shape[0], group_size, k)
    if cpu_group is None:
        return None
    packed, scale_zeros = _int4pack_weight(qweight, scales, zeros, group_size, k, cpu_group, dtype)
    x2 = x.reshape(-1, k).to(dtype)  # (M, K)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, packed, cpu_group, scale_zeros)  # (M, N)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def int8pack_matmul(x: Tensor, qweight: Tensor, scales: Tensor) -> Tensor:
    """``x @ W^T`` for per-channel INT8 codes with torch's CPU int8 kernel, in float32."""
    x2 = x.reshape(-1, x.shape[-1]).float()  # (M, K)
    y = torch.ops.aten._weight_int8pack_mm(x2, qweight, scales.float().reshape(-1))  # (M, N)
    return y.to(x.dtype).reshape(*x.shape[:-1], -1)


def unit_roundoff(dtype: torch.dtype) -> float:
    """``u``: half the spacing of ``dtype``'s numbers at 1 (2^-24 for float32, 2^-8 for bfloat16, 2^-11 for float16)."""
    return torch.finfo(dtype).eps / 2


def cpu_fast_path_error_bound(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int,
                              group_size: int, k: int, compute_dtype: torch.dtype = torch.float32) -> Tensor:
    """Elementwise bound ``(M, N)`` (float64) on ``|fast - reference.dequant_matmul|`` for torch's CPU packed kernels.

    What the kernels compute (aten/src/ATen/native/cpu/int4mm_kernel.cpp and
    int8mm_kernel.cpp, every CPU capability): ``_weight_int4pack_mm_for_cpu``
    dequantizes each weight as ``(c - 8) * s' + z'`` in float32 (fused or
    not), with ``s'`` and ``z' = (8 - z) s`` (computed in float32 here) stored
    in ``compute_dtype``, then accumulates ``x_k w'_k`` in float32 in its own
    order, and stores the result in ``compute_dtype``; ``_weight_int8pack_mm``
    sums ``x_k c_k`` in float32 and multiplies by the scale. The reference
    rounds ``w = (c - z) s`` once and sums in float32 in BLAS order. With
    ``u`` float32's unit roundoff, ``u_c`` that of ``compute_dtype`` and
    ``u_o`` that of the output dtype:

    * per weight (int4): ``|w' - w| <= (u_c + u) s (|c - 8| + |8 - z|) + 2 u |w|``
      (the rounded scale and zero term, the kernel's and the reference's
      roundings of the weight); int8 has no weight term (its scale is applied
      once, counted with the sum); float32 zero points (format version 2) add
      one rounding on each side, ``u s (|8 - z| + |c - z|)``: the kernel's
      ``8 - z`` and the reference's ``c - z`` are no longer exact;
    * the two sums of K products, each off by at most ``gamma_{K+2} sum |x| |w|``
      (Higham, Lemma 3.1 and eq. 3.4; ``gamma_n = n u / (1 - n u)``, one
      more rounding for the product and one for the scale or the cast);
    * when the output dtype is not float32, each result rounds once more:
      ``u_o (2 |y| + bound)``.

    So ``|fast - ref| <= |x| dw^T + 2 gamma_{K+2} |x| |w|^T`` (+ the output
    rounding), from the operands alone, whatever CPU and summation order.

    Args:
        x: ``(..., K)`` activations as passed to the op; the bound is ``(M, N)`` over its flattened rows.
        compute_dtype: the dtype the kernel's scales are stored in (bfloat16 on the bf16 int4pack path).
    """
    x2 = x.reshape(-1, k).double().abs()  # (M, K)
    w = reference.dequantize(qweight, scales, zeros, bits, group_size, k).double()  # (N, K)
    u, n_terms = unit_roundoff(torch.float32), k + 2
    gamma = n_terms * u / (1 - n_terms * u)
    bound = 2 * gamma * (x2 @ w.abs().t())  # (M, N)
    if bits == 4:
        codes = reference.unpack(qweight, bits, k).double()  # (N, K)
        zero = zeros.double() if zeros is not None else torch.full_like(scales, 8.0, dtype=torch.float64)
        zero = zero.repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
        scale = scales.double().repeat_interleave(group_size, dim=1)[:, :k]
        dw = (unit_roundoff(compute_dtype) + u) * scale * ((codes - 8).abs() + (8 - zero).abs()) + 2 * u * w.abs()
        if reference.float_zeros(zeros):
            dw = dw + u * scale * ((8 - zero).abs() + (codes - zero).abs())
        bound = bound + x2 @ dw.t()
    if x.dtype != torch.float32:
        y = x.reshape(-1, k).double() @ w.t()  # (M, N)
        bound = bound + unit_roundoff(x.dtype) * (2 * y.abs() + bound)
    return bound


def _cpu_dequant_matmul(x, qweight, scales, zeros, bits, group_size, k):
    m = _rows(x)
    if bits == 4 and (x.dtype == torch.bfloat16 and 0 < m <= CPU_INT4PACK_BF16_MAX_M or m == 1):
        y = int4pack_matmul(x, qweight, scales, zeros, group_size, k, torch.bfloat16 if x.dtype == torch.bfloat16 else torch.float32)
        if y is not None:
            return y
    if bits == 8 and m == 1 and zeros is None and group_size == k and x.dtype != torch.bfloat16:
        return int8pack_matmul(x, qweight, scales)
    return _dequant_then_matmul(x, qweight, scales, zeros, bits, group_size, k)


# int8 x int8 products are at most 127^2 = 16129 in magnitude, so a float32 dot product over 1024 of them stays
# below 2^24 at every partial sum: each chunk's float32 matmul is exact in any summation order.
INT8_EXACT_FP32_CHUNK = 1024


def exact_int8_matmul_fp32(codes: Tensor, qweight: Tensor) -> Tensor:
    """``codes (M, K) @ qweight (N, K)^T`` of int8 matrices in [-127, 127], exactly, as float64 ``(M, N)``.

    float32 BLAS on chunks of ``INT8_EXACT_FP32_CHUNK`` inputs (exact, see above),
    chunks summed in float64 (exact below 2^53).
    """
    total = None
    for start in range(0, codes.shape[1], INT8_EXACT_FP32_CHUNK):
        part = codes[:, start:start + INT8_EXACT_FP32_CHUNK].float() @ qweight[:, start:start + INT8_EXACT_FP32_CHUNK].float().t()
        total = part.double() if total is None else total + part.double()
    return total if total is not None else codes.new_zeros(codes.shape[0], qweight.shape[0], dtype=torch.float64)


def _w8a8(x, qweight, scales, codes_matmul):
    """reference.int8_dynamic_matmul with its integer product computed by ``codes_matmul`` (exactly, so the
    result is the reference's bit for bit)."""
    shape = x.shape
    codes, x_scale = reference.quantize_per_token_int8(x.reshape(-1, shape[-1]))  # (M, K), (M, 1)
    acc = codes_matmul(codes, qweight)  # (M, N) exact integer sums
    y = acc.float() * x_scale * scales.float().reshape(1, -1)
    return y.reshape(*shape[:-1], -1).to(x.dtype)


def _cpu_int8_dynamic_matmul(x, qweight, scales):
    if _rows(x) < CPU_W8A8_FLOAT_MIN_M:
        return reference.int8_dynamic_matmul(x, qweight, scales)
    return _w8a8(x, qweight, scales, exact_int8_matmul_fp32)


def _cpu_dequant_matmul_t(dy, qweight, scales, zeros, bits, group_size, k):
    w = dequantize_fast(qweight, scales, zeros, bits, group_size, k)  # (N, K)
    return (dy.float() @ w).to(dy.dtype)


# -- CUDA -----------------------------------------------------------------------------------------------------

_warned_no_triton = False


def _triton_kernels(bits: int):
    """The Triton kernel module for ``bits`` and triton_common, imported on first use; (None, None) without triton."""
    global _warned_no_triton
    try:
        from slimtune.compress.kernels import triton_common
        if bits == 4:
            from slimtune.compress.kernels import triton_int4 as kernels
        else:
            from slimtune.compress.kernels import triton_int8 as kernels
    except ImportError as err:
        if not _warned_no_triton:
            warnings.warn(f"triton is not importable ({err}); quantized matmuls on CUDA use the slow reference. "
                          "Install it with `pip install slimtune[kernels]`.", stacklevel=3)
            _warned_no_triton = True
        return None, None
    return kernels, triton_common


def _cuda_dequant_matmul(x, qweight, scales, zeros, bits, group_size, k):
    kernels, common = _triton_kernels(bits)
    if kernels is None or not common.supports(x, qweight, scales, zeros, bits, group_size, k):
        return reference.dequant_matmul(x, qweight, scales, zeros, bits, group_size, k)
    m = _rows(x)
    if m <= GEMV_MAX_M:
        return kernels.gemv(x, qweight, scales, zeros, group_size, k)
    if m >= CUBLAS_MIN_M:
        w = kernels.dequantize(qweight, scales, zeros, group_size, k, dtype=x.dtype)  # (N, K)
        return x @ w.t()
    return kernels.gemm(x, qweight, scales, zeros, group_size, k)


def _cuda_dequant_matmul_t(dy, qweight, scales, zeros, bits, group_size, k):
    kernels, common = _triton_kernels(bits)
    if kernels is None or not common.supports(dy, qweight, scales, zeros, bits, group_size, k, width=qweight.shape[0]):
        return reference.dequant_matmul_t(dy, qweight, scales, zeros, bits, group_size, k)
    if _rows(dy) >= CUBLAS_MIN_M:
        return dy @ kernels.dequantize(qweight, scales, zeros, group_size, k, dtype=dy.dtype)
    return kernels.gemm_t(dy, qweight, scales, zeros, group_size, k)


def _int_mm_exact(codes: Tensor, qweight: Tensor) -> Tensor:
    """``codes (M, K) @ qweight (N, K)^T`` of int8 matrices on CUDA, exactly (int32 or float64 values)."""
    m, kk = codes.shape
    n = qweight.shape[0]
    if kk % 8 == 0 and n % 8 == 0 and m:
        padded = torch.cat([codes, codes.new_zeros(max(17 - m, 0), kk)]) if m <= 16 else codes  # _int_mm needs M > 16
        try:
            return torch._int_mm(padded, qweight.t())[:m]  # (M, N) int32
        except RuntimeError:  # a cuBLASLt layout constraint this torch build adds
            pass
    return codes.double() @ qweight.double().t()  # exact: |sum| < 2^53


def _cuda_int8_dynamic_matmul(x, qweight, scales):
    return _w8a8(x, qweight, scales, _int_mm_exact)


# -- the custom ops -------------------------------------------------------------------------------------------


@torch.library.custom_op("slimtune::dequant_matmul", mutates_args=())
def dequant_matmul(x: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int, k: int) -> Tensor:
    if x.is_cuda:
        return _cuda_dequant_matmul(x, qweight, scales, zeros, bits, group_size, k)
    if x.device.type == "cpu":
        return _cpu_dequant_matmul(x, qweight, scales, zeros, bits, group_size, k)
    return reference.dequant_matmul(x, qweight, scales, zeros, bits, group_size, k)


@dequant_matmul.register_fake
def _(x, qweight, scales, zeros, bits, group_size, k):
    return x.new_empty(*x.shape[:-1], qweight.shape[0])


@torch.library.custom_op("slimtune::dequant_matmul_t", mutates_args=())
def dequant_matmul_t(dy: Tensor, qweight: Tensor, scales: Tensor, zeros: Optional[Tensor], bits: int, group_size: int, k: int) -> Tensor:
    if dy.is_cuda:
        return _cuda_dequant_matmul_t(dy, qweight, scales, zeros, bits, group_size, k)
    if dy.device.type == "cpu":
        return _cpu_dequant_matmul_t(dy, qweight, scales, zeros, bits, group_size, k)
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
    if x.is_cuda:
        return _cuda_int8_dynamic_matmul(x, qweight, scales)
    if x.device.type == "cpu":
        return _cpu_int8_dynamic_matmul(x, qweight, scales)
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
