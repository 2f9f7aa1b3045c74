"""Fused INT8 weight-only dequant-matmul Triton kernels for packed format v1 (reference.py).

The INT8 format: int8 codes ``(N, K)`` (-127..127, zero point 0) and float
scales ``(N, G)``, per output channel (``G = 1``) in practice. Same kernel
shapes as triton_int4.py, one byte per weight instead of half a byte:

* ``gemv`` (M <= 16): CUDA-core reduction over ``(BLOCK_N, groups, group)``
  contiguous int8 tiles, the scale applied once per group, split-K if N is
  small.
* ``gemm``: tiled ``tl.dot`` on the exact integer codes (|q| <= 127 is exact
  in fp16 and bf16); the scale multiplies each K tile's partial product.
* ``gemm_t``: ``dy @ W`` with the ``(BLOCK_N, BLOCK_K)`` tile dequantized to
  the activation dtype (the scale varies along the reduction).
* ``dequantize``: W in the activation dtype, for the dequant + cuBLAS path.

Limits: symmetric codes only (zeros=None; the dispatcher falls back to the
reference otherwise); grouped formats need a power-of-two group in [32, 256],
with any K (a short last group, as in triton_int4.py).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from slimtune.compress.kernels import triton_common as common
from slimtune.compress.kernels.triton_common import GEMV_MAX_M, configs, store_tile, swizzle  # noqa: F401 - GEMV_MAX_M: module API


_GEMV_CONFIGS = configs(
    [triton.Config({"BLOCK_N": bn, "BLOCK_K": bk}, num_warps=w, num_stages=s)
     for bn, bk, w, s in [(4, 512, 4, 2), (4, 1024, 4, 2), (8, 512, 4, 2), (16, 256, 4, 2), (16, 512, 8, 2),
                          (32, 256, 8, 2)]],
    triton.Config({"BLOCK_N": 16, "BLOCK_K": 256}, num_warps=4, num_stages=1))

_GEMM_CONFIGS = common.GEMM_CONFIGS
_GEMM_T_CONFIGS = common.GEMM_T_CONFIGS

_KEY = ["m_bucket", "N", "K", "GROUP_SIZE", "SPLIT_K"]


@triton.autotune(configs=_GEMV_CONFIGS, key=_KEY, reset_to_zero=["y_ptr"])
@triton.jit
def _int8_gemv_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr,
    M, N, K, group_size, m_bucket,
    stride_xm, stride_qn, stride_sn, stride_ym,
    GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr,
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
    offs_j = tl.arange(0, GROUP)
    mask_n = offs_n < N
    num_groups = tl.cdiv(K, group_size)  # the last group may be short
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + offs_g[:, None] * GROUP + offs_j[None, :]  # (NG, GROUP)
        q = tl.load(q_ptr + offs_n[:, None, None] * stride_qn + offs_k[None, :, :],
                    mask=mask_n[:, None, None] & (offs_k < K)[None, :, :], other=0)  # (BN, NG, GROUP)
        # codes to float without the slow int->float conversion (see triton_int4): q + 128 in the mantissa of 2^23
        q = (q.to(tl.int32) + 0x4B000080).to(tl.float32, bitcast=True) - 8388736.0
        g = k0 // group_size + offs_g  # (NG,)
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :],
                    mask=mask_n[:, None] & (g < num_groups)[None, :], other=0.0).to(tl.float32)  # (BN, NG)
        for m in range(M):
            x = tl.load(x_ptr + m * stride_xm + offs_k, mask=offs_k < K, other=0.0).to(tl.float32)  # (NG, GROUP)
            part = tl.sum(tl.sum(q * x[None, :, :], axis=2) * s, axis=1)  # (BN,)
            acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = (offs_m[:, None] < M) & mask_n[None, :]
    store_tile(y_ptrs, acc, y_mask, SPLIT_K)


@triton.autotune(configs=_GEMM_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": common.prune_gemm},
                 reset_to_zero=["y_ptr"])
@triton.jit
def _int8_gemm_kernel(
    x_ptr, q_ptr, s_ptr, y_ptr,
    M, N, K, group_size, m_bucket,
    stride_xm, stride_qn, stride_sn, stride_ym,
    GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """y (M, N) = x (M, K) @ W^T, one (BLOCK_M, BLOCK_N) tile per program; BLOCK_K divides the group."""
    pid_m, pid_n = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    pid_k = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_kk = tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_n = offs_n < N
    dtype = x_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
        offs_k = k0 + offs_kk
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k < K)[None, :], other=0.0)  # (BM, BK)
        q = tl.load(q_ptr + offs_n[None, :] * stride_qn + offs_k[:, None],
                    mask=(offs_k < K)[:, None] & mask_n[None, :], other=0)  # (BK, BN)
        s = tl.load(s_ptr + offs_n * stride_sn + k0 // group_size, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
        acc += tl.dot(x, q.to(dtype), input_precision="ieee") * s[None, :]
    y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    y_mask = mask_m[:, None] & mask_n[None, :]
    store_tile(y_ptrs, acc, y_mask, SPLIT_K)


@triton.autotune(configs=_GEMM_T_CONFIGS, key=_KEY, prune_configs_by={"early_config_prune": common.prune_gemm},
                 reset_to_zero=["dx_ptr"])
@triton.jit
def _int8_gemm_t_kernel(
    dy_ptr, q_ptr, s_ptr, dx_ptr,
    M, N, K, group_size, m_bucket,
    stride_dym, stride_qn, stride_sn, stride_dxm,
    GROUP_SIZE: tl.constexpr, SPLIT_K: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """dx (M, K) = dy (M, N) @ W, one (BLOCK_M, BLOCK_K) tile per program, reducing over every SPLIT_K-th N tile."""
    pid_m, pid_k = swizzle(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(K, BLOCK_K), GROUP_M)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_k = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_m = offs_m < M
    mask_k = offs_k < K
    g = (pid_k * BLOCK_K) // group_size
    dtype = dy_ptr.dtype.element_ty
    acc = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for n0 in range(pid_n * BLOCK_N, N, SPLIT_K * BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < N
        dy = tl.load(dy_ptr + offs_m[:, None] * stride_dym + offs_n[None, :],
                     mask=mask_m[:, None] & mask_n[None, :], other=0.0)  # (BM, BN)
        q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :],
                    mask=mask_n[:, None] & mask_k[None, :], other=0)  # (BN, BK)
        s = tl.load(s_ptr + offs_n * stride_sn + g, mask=mask_n, other=0.0).to(tl.float32)  # (BN,)
        acc = tl.dot(dy, (q.to(tl.float32) * s[:, None]).to(dtype), acc, input_precision="ieee")
    dx_ptrs = dx_ptr + offs_m[:, None] * stride_dxm + offs_k[None, :]
    dx_mask = mask_m[:, None] & mask_k[None, :]
    store_tile(dx_ptrs, acc, dx_mask, SPLIT_K)


@triton.jit
def _int8_dequantize_kernel(
    q_ptr, s_ptr, w_ptr, N, K, group_size, stride_qn, stride_sn, stride_wn,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """W (N, K) in w's dtype; one (BLOCK_N, BLOCK_K) tile per program."""
    offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask = (offs_n < N)[:, None] & (offs_k < K)[None, :]
    q = tl.load(q_ptr + offs_n[:, None] * stride_qn + offs_k[None, :], mask=mask, other=0).to(tl.float32)
    s = tl.load(s_ptr + offs_n[:, None] * stride_sn + (offs_k // group_size)[None, :], mask=mask, other=0.0)
    w = q * s.to(tl.float32)
    tl.store(w_ptr + offs_n[:, None] * stride_wn + offs_k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


# -- host wrappers: validate, then triton_common's launchers ---------------------------------------------------


def _prepare(x, qweight, scales, zeros, group_size, k, width=None):
    n = common.check_packed(qweight, scales, zeros, 8, group_size, k)
    x2 = common.check_activation(x, k if width is None else n, "x", qweight.device)  # (M, width)
    return n, x2, qweight.contiguous(), scales.contiguous()


def gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         group_size: int, k: int, split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` for at most 16 rows (GEMV-style kernel).

    Args:
        x: ``(..., K)`` fp16/bf16/fp32 with at most 16 rows; qweight int8 ``(N, K)``, scales ``(N, G)``, zeros None.
        split_k: programs per output slice (default: a heuristic from N, K and the SM count).

    Returns:
        ``(..., N)`` in ``x.dtype``.

    Raises:
        ValueError: more than 16 rows, zero points, or inputs the kernels do not implement.
    """
    n, x2, q, s = _prepare(x, qweight, scales, zeros, group_size, k)
    return common.launch_gemv(_int8_gemv_kernel, x, x2, (q, s), n, k, group_size, split_k)


def gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
         group_size: int, k: int, split_k: int | None = None) -> torch.Tensor:
    """``x @ W^T`` for any number of rows (tiled ``tl.dot`` kernel); arguments as :func:`gemv`."""
    n, x2, q, s = _prepare(x, qweight, scales, zeros, group_size, k)
    return common.launch_gemm(_int8_gemm_kernel, x, x2, (q, s), n, k, group_size, split_k)


def gemm_t(dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
           group_size: int, k: int, split_k: int | None = None) -> torch.Tensor:
    """``dy @ W`` (the input gradient): ``dy`` ``(..., N)`` -> ``(..., K)`` in ``dy.dtype``."""
    n, dy2, q, s = _prepare(dy, qweight, scales, zeros, group_size, k, width=qweight.shape[0])
    return common.launch_gemm_t(_int8_gemm_t_kernel, dy, dy2, (q, s), n, k, group_size, split_k)


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, group_size: int, k: int,
               dtype: torch.dtype = torch.float16) -> torch.Tensor:
    """The weight ``(N, K)`` in ``dtype`` (reference.dequantize rounded to ``dtype``), in one pass."""
    n = common.check_packed(qweight, scales, zeros, 8, group_size, k)
    if qweight.device.type != "cuda" and not common.INTERPRET:
        raise ValueError(f"qweight is on {qweight.device}: the Triton kernels need CUDA tensors")
    q, s = qweight.contiguous(), scales.contiguous()
    w = torch.empty((n, k), dtype=dtype, device=q.device)  # (N, K)
    block_n, block_k = 32, 128
    if n:
        _int8_dequantize_kernel[(triton.cdiv(n, block_n), triton.cdiv(k, block_k))](
            q, s, w, n, k, group_size, q.stride(0), s.stride(0), w.stride(0), BLOCK_N=block_n, BLOCK_K=block_k)
    return w
