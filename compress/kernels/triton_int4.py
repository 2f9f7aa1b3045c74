"""Fused INT4 dequant-matmul Triton kernels for packed format v2 (reference.py).

Computes exactly what :func:`reference.dequant_matmul` (``x @ W^T``) and
:func:`reference.dequant_matmul_t` (``dy @ W``) compute, with ``W`` stored as
uint8 ``(N, ceil(K/2))`` (even k in the low nibble), float scales ``(N, G)`` and
optional zero points ``(N, G)`` (absent = 8), uint8 integers (format v1) or
float32 offsets (v2, from an exact QA-LoRA merge):

* ``gemv`` (M <= 16): memory bound, so it is built around reading the packed
  bytes once at full bandwidth. One program owns ``BLOCK_N`` output channels
  for all M rows; each K tile is loaded as ``(BLOCK_N, groups, group/2)``
  contiguous bytes per row (16-byte vector loads), unpacked in registers
  (codes become floats by OR-ing them into the mantissa of 2^23: the
  int-to-float conversion instruction issues at 16 per clock per SM, 1/4 to
  1/8 of the FMA rate, and would cap the kernel below the memory bandwidth), and multiplied on CUDA cores
  against the even/odd activations (no tensor cores: an M=1 dot would waste
  15/16 of them and need a layout shuffle). Zero points and scales are
  applied once per group, using ``sum_k (q - z) x = sum_k q x - z sum_k x``.
  Split-K (fp32 atomics) when N alone would leave SMs idle.
* ``gemm`` (M > 16): tiled ``tl.dot`` with fp32 accumulation. A ``BLOCK_K``
  tile lies inside one group, so the integer codes minus the zero point
  (exact in fp16/bf16: |q - z| <= 255) go into the dot and the group's scale
  multiplies the tile's partial product in fp32: no rounding of W at all.
  Float zero points (``FLOAT_ZEROS``) would make ``q - z`` inexact in
  fp16/bf16, so there the dot takes the bare codes (exact) and the tile
  subtracts ``z sum_k x`` in fp32, as the GEMV does.
* ``gemm_t`` (dX = dY W, the backward of a frozen quantized base): tiled
  over (M, K), reducing over N; here the scale varies along the reduction, so
  the ``(BLOCK_N, BLOCK_K)`` tile is dequantized to the activation dtype.
* ``dequantize``: W in the activation dtype, for the dequant + cuBLAS path.

``gemm_t`` and ``dequantize`` compute each weight as the reference does,
``fl(fl(q - z) * s)`` in fp32 (the subtraction exact for integer zero
points), so ``dequantize`` is bitwise the reference for both zero-point kinds.

fp32 activations use ``input_precision="ieee"`` (no TF32), like torch's
default fp32 matmul. Limits: grouped formats need a power-of-two group size in
[32, 256] (QuantScheme allows 32/64/128), per channel takes any K (odd K's
padding nibble meets a masked zero activation); int32 indexing.

Any K: ``G = cdiv(K, group_size)`` groups, the last one short when the group
does not divide K (SmolLM2's K = 576 in groups of 128). Group ``k //
group_size`` holds input k everywhere; K tiles start at multiples of
``BLOCK_K``, which either divides the group (GEMM, so a tile never straddles
two groups) or is a multiple of it (GEMV, whose per-tile groups past G load
scale 0), and codes past K meet masked zero activations (or, in ``gemm_t``
and ``dequantize``, land in outputs that are never stored). The divisible
case runs the same instructions: the masks were there for ragged N and K
tiles already.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.compress.kernels import triton_common as common
from slimtune.compress.kernels.triton_common import GEMV_MAX_M, configs, store_tile, swizzle  # noqa: F401 - GEMV_MAX_M: module API


_GEMV_CONFIGS = configs(
    [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bn, bk, w, s in [(4, 1024, 4, 2), (8, 512, 4, 2), (8, 1024, 4, 2), (16, 512, 8, 2), (16, 1024, 8, 2),
                          (32, 256, 8, 2)]],
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=1))

_GEMM_CONFIGS = common.GEMM_CONFIGS
_GEMM_T_CONFIGS = common.GEMM_T_CONFIGS

_KEY = ["m_bucket", "N", "K", "GROUP_SIZE", "HAS_ZEROS", "SPLIT_K"]
_GEMM_KEY = _KEY + ["FLOAT_ZEROS"]


@triton.autotune(configs=_GEMV_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])
@triton.jit
def _int4_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, group_size, m_bucket,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
    HAS_ZEROS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """y (M, N) = x (M, K) @ W^T for M <= BLOCK_M; program (pid_n, pid_k) owns BLOCK_N channels and every
    SPLIT_K-th K tile. GROUP_SIZE == 0 means per channel (the whole tile is one group)."""
    GROUP: tl.constexpr = BLOCK_K if GROUP_SIZE == 0 else GROUP_SIZE
    NG: tl.constexpr = BLOCK_K // GROUP  # groups per K tile
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # (BN,)
    offs_m = tl.arange(0, BLOCK_M)
    offs_g = tl.arange(0, NG)
    offs_j = tl.arange(0, GROUP // 2)
    mask_n = offs_n < N
    row_bytes = (K + 1) // 2
    num_groups = tl.cdiv(K, group_size)  # the last group may be short
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        byte = k0 // 2 + offs_g[:, None] * (GROUP // 2) + offs_j[None, :]  # (NG, GROUP/2)
        b = tl.load(q_ptr + offs_n[:, None, None] * stride_qn + byte[None, :, :],
                    mask=mask_n[:, None, None] & (byte < row_bytes)[None, :, :], other=0)  # (BN, NG, GROUP/2)
        # codes to float without the slow int->float conversion: OR the code into the mantissa of
        # 2^23 and subtract 2^23 (exact for integers below 2^23)
        b = b.to(tl.int32)
        lo = ((b & 0xF) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        hi = ((b >> 4) | 0x4B000000).to(tl.float32, bitcast=True) - 8388608.0
        g = k0 // group_size + offs_g  # (NG,)
        g_mask = mask_n[:, None] & (g < num_groups)[None, :]
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :], mask=g_mask, other=0.0).to(tl.float32)  # (BN, NG)
        if HAS_ZEROS:
            z = tl.load(z_ptr + offs_n[:, None] * stride_zn + g[None, :], mask=g_mask, other=0).to(tl.float32)
        else:
            z = 8.0
        k_even = 2 * byte  # (NG, GROUP/2)
        for m in range(M):
            xe = tl.load(x_ptr + m * stride_xm + k_even, mask=k_even < K, other=0.0).to(tl.float32)
            xo = tl.load(x_ptr + m * stride_xm + k_even + 1, mask=k_even + 1 < K, other=0.0).to(tl.float32)
            qx = tl.sum(lo * xe[None, :, :] + hi * xo[None, :, :], axis=2)  # (BN, NG): sum q x per group
            x_sum = tl.sum(xe + xo, axis=1)  # (NG,)
            part = tl.sum((qx - z * x_sum[None, :]) * s, axis=1)  # (BN,)
            acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & mask_n[None, :]
    store_tile(y_ptrs, acc, y_mask, SPLIT_K)


@triton.autotune(configs=_GEMM_CONFIGS, key=_GEMM_KEY, prune_configs_by={"early_config_prune": common.prune_gemm},
                 reset_to_zero=["y_ptr"])
@triton.jit
def _int4_gemm_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    M, N, K, group_size, m_bucket,
    stride_xm, stride_qn, stride_sn, stride_zn, stride_ym,
    HAS_ZEROS: tl.constexpr, FLOAT_ZEROS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y (M, N) = x (M, K) @ W^T, one (BLOCK_M, BLOCK_N) tile per program; BLOCK_K divides the group.
    FLOAT_ZEROS: z is a float32 offset, subtracted after the dot as z * sum_k x."""
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_j = tl.arange(0, BLOCK_K // 2)
    mask_m = offs_m < M
    mask_n = offs_n < N
    row_bytes = (K + 1) // 2
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        k_even = k0 + 2 * offs_j  # (BK/2,)
        x_rows = x_ptr + offs_m[:, None] * stride_xm + k_even[None, :]
        xe = tl.load(x_rows, mask=mask_m[:, None] & (k_even < K)[None, :], other=0.0)  # (BM, BK/2)
        xo = tl.load(x_rows + 1, mask=mask_m[:, None] & (k_even + 1 < K)[None, :], other=0.0)
        byte = k0 // 2 + offs_j
        b = tl.load(q_ptr + offs_n[None, :] * stride_qn + byte[:, None],
                    mask=(byte < row_bytes)[:, None] & mask_n[None, :], other=0)  # (BK/2, BN)
        g = k0 // group_size
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
        if FLOAT_ZEROS:
            z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
            part = tl.dot(xe, (b & 0xF).to(dtype), input_precision="ieee")  # codes 0..15: exact
            part = tl.dot(xo, (b >> 4).to(dtype), part, input_precision="ieee")
            x_sum = tl.sum(xe.to(tl.float32), axis=1) + tl.sum(xo.to(tl.float32), axis=1)  # (BM,)
            acc += (part - x_sum[:, None] * z[None, :]) * s[None, :]
        else:
            if HAS_ZEROS:
                z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.int32)[None, :]
            else:
                z = 8
            lo = ((b & 0xF).to(tl.int32) - z).to(dtype)  # exact small integers
            hi = ((b >> 4).to(tl.int32) - z).to(dtype)
            part = tl.dot(xe, lo, input_precision="ieee")
            part = tl.dot(xo, hi, part, input_precision="ieee")
            acc += part * s[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    store_tile(y_ptrs, acc, y_mask, SPLIT_K)


@triton.autotune(configs=_GEMM_T_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": common.prune_gemm},
                 reset_to_zero=["dx_ptr"])
@triton.jit
def _int4_gemm_t_kernel(
    dy_ptr, q_ptr, s_ptr, z_ptr, dx_ptr,
    M, N, K, group_size, m_bucket,
    stride_dym, stride_qn, stride_sn, stride_zn, stride_dxm,
    HAS_ZEROS: tl.constexpr, GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx (M, K) = dy (M, N) @ W, one (BLOCK_M, BLOCK_K) tile per program, reducing over N
    (every SPLIT_K-th N tile); even and odd k accumulate separately and are stored interleaved."""
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    byte = pid_k * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)  # (BK/2,)
    k_even = 2 * byte
    mask_m = offs_m < M
    row_bytes = (K + 1) // 2
    g = (pid_k * BLOCK_K) // group_size
    dtype = dy_ptr.dtype.element_ty
    acc_even = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    acc_odd = tl.zeros((BLOCK_M, BLOCK_K // 2), dtype=tl.float32)
    for n0 in range(pid_n * BLOCK_N, N, SPLIT_K * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # (BM, BN)
        b = tl.load(q_ptr + offs_n[:, None] * stride_qn + byte[None, :],
                    mask=mask_n[:, None] & (byte < row_bytes)[None, :], other=0)  # (BN, BK/2)
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)[:, None]  # (BN, 1)
        if HAS_ZEROS:
            z = tl.load(z_ptr + offs_n * stride_zn + g, mask=mask_n, other=0).to(tl.float32)[:, None]
        else:
            z = 8.0
        w_even = (((b & 0xF).to(tl.float32) - z) * s).to(dtype)  # (BN, BK/2): W[n, 2j]
        w_odd = (((b >> 4).to(tl.float32) - z) * s).to(dtype)
        acc_even = tl.dot(dy, w_even, acc_even, input_precision="ieee")
        acc_odd = tl.dot(dy, w_odd, acc_odd, input_precision="ieee")
    dx_rows = dx_ptr + offs_m[:, None] * stride_dxm + k_even[None, :]
    mask_even = mask_m[:, None] & (k_even < K)[None, :]
    mask_odd = mask_m[:, None] & (k_even + 1 < K)[None, :]
    store_tile(dx_rows, acc_even, mask_even, SPLIT_K)
    store_tile(dx_rows + 1, acc_odd, mask_odd, SPLIT_K)


@triton.jit
def _int4_dequantize_kernel(
    q_ptr, s_ptr, z_ptr, w_ptr, N, K, group_size,
    stride_qn, stride_sn, stride_zn, stride_wn,
    HAS_ZEROS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W (N, K) in w's dtype; one (BLOCK_N, BLOCK_K) tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    byte = tl.program_id(1) * (BLOCK_K // 2) + tl.arange(0, BLOCK_K // 2)
    k_even = 2 * byte
    mask_n = offs_n < N
    b = tl.load(q_ptr + offs_n[:, None] * stride_qn + byte[None, :],
                mask=mask_n[:, None] & (byte < (K + 1) // 2)[None, :], other=0)  # (BN, BK/2)
    g_even = (k_even // group_size)[None, :]
    g_odd = ((k_even + 1) // group_size)[None, :]
    mask_even = mask_n[:, None] & (k_even < K)[None, :]
    mask_odd = mask_n[:, None] & (k_even + 1 < K)[None, :]
    s_rows = s_ptr + offs_n[:, None] * stride_sn
    s_even = tl.load(s_rows + g_even, mask=mask_even, other=0.0).to(tl.float32)
    s_odd = tl.load(s_rows + g_odd, mask=mask_odd, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z_rows = z_ptr + offs_n[:, None] * stride_zn
        z_even = tl.load(z_rows + g_even, mask=mask_even, other=0).to(tl.float32)
        z_odd = tl.load(z_rows + g_odd, mask=mask_odd, other=0).to(tl.float32)
    else:
        z_even = 8.0
        z_odd = 8.0
    w_rows = w_ptr + offs_n[:, None] * stride_wn + k_even[None, :]
    out = w_ptr.dtype.element_ty
    tl.store(w_rows, (((b & 0xF).to(tl.float32) - z_even) * s_even).to(out), mask=mask_even)
    tl.store(w_rows + 1, (((b >> 4).to(tl.float32) - z_odd) * s_odd).to(out), mask=mask_odd)


# -- host wrappers: validate, then triton_common's launchers ---------------------------------------------------


def _prepare(x, qweight, scales, zeros, group_size, k, width=None):
    n = common.check_packed(qweight, scales, zeros, 4, group_size, k)
    x2 = common.check_activation(x, k if width is None else n, "x", qweight.device)  # (M, width)
    return n, x2, qweight.contiguous(), scales.contiguous(), common.zeros_or_dummy(zeros, scales)


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         group_size: int, k: int, split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` for at most 16 rows (GEMV-style kernel).

    Args:
        x: ``(..., K)`` fp16/bf16/fp32 with at most 16 rows; packed tensors as in reference.py.
        split_k: programs per output slice (default: a heuristic from N, K and the SM count).

    Returns:
        ``(..., N)`` in ``x.dtype``.

    Raises:
        ValueError: more than 16 rows, or inputs the kernels do not implement.
    """
    n, x2, q, s, z = _prepare(x, qweight, scales, zeros, group_size, k)
    return common.launch_gemv(_int4_gemv_kernel, x, x2, (q, s, z), n, k, group_size, split_k, HAS_ZEROS=zeros is not None)


def gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         group_size: int, k: int, split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` for any number of rows (tiled ``tl.dot`` kernel); arguments as :func:`gemv`."""
    n, x2, q, s, z = _prepare(x, qweight, scales, zeros, group_size, k)
    return common.launch_gemm(_int4_gemm_kernel, x, x2, (q, s, z), n, k, group_size, split_k, HAS_ZEROS=zeros is not None,
                              FLOAT_ZEROS=zeros is not None and zeros.is_floating_point())


def gemm_t(dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           group_size: int, k: int, split_k: int | None = None) -> torch.Tensor:
    """``dy @ W`` (the input gradient), tiled over (M, K) and reducing over N.

    Args:
        dy: ``(..., N)``; packed tensors as in reference.py.
        split_k: programs sharing one output tile's N range (default: heuristic).

    Returns:
        ``(..., K)`` in ``dy.dtype``.
    """
    n, dy2, q, s, z = _prepare(dy, qweight, scales, zeros, group_size, k, width=qweight.shape[0])
    return common.launch_gemm_t(_int4_gemm_t_kernel, dy, dy2, (q, s, z), n, k, group_size, split_k,
                                HAS_ZEROS=zeros is not None)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, k: int,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The weight ``(N, K)`` in ``dtype`` (reference.dequantize rounded to ``dtype``), in one pass."""
    n = common.check_packed(qweight, scales, zeros, 4, group_size, k)
    if qweight.device.type != "cuda" and not common.INTERPRET:
        raise ValueError(f"qweight is on {qweight.device}: the Triton kernels need CUDA tensors")
    q, s, z = qweight.contiguous(), scales.contiguous(), common.zeros_or_dummy(zeros, scales)
    w = torch.empty((n, k), dtype=dtype, device=q.device)  # (N, K)
    block_n, block_k = 32, 128
    if n:
        _int4_dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            q, s, z, w, n, k, group_size, q.stride(0), s.stride(0), z.stride(0), w.stride(0),
            HAS_ZEROS=zeros is not None, BLOCK_N=block_n, BLOCK_K=block_k)
    return w
