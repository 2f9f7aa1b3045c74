"""The packed weight format and its dequant-matmul, in plain PyTorch: the specification.

Every fast path (Triton on CUDA, the CPU fast path, ONNX ``MatMulNBits``)
must compute what these functions compute, and is tested against them.

Packed format, version 2 (``FORMAT_VERSION``), for a linear ``y = x W^T + b``
with ``W`` of shape ``(N, K)`` = ``(out_features, in_features)``:

* ``bits=4``: ``qweight`` uint8 ``(N, ceil(K / 2))``, two 4-bit codes per byte
  packed along K, even k in the low nibble, odd k in the high nibble (an odd K
  pads one zero nibble). Codes are unsigned 0..15.
* ``bits=8``: ``qweight`` int8 ``(N, K)``, signed codes -127..127 (zero point 0).
* ``scales``: float32 ``(N, G)`` with ``G = ceil(K / group_size)`` groups
  along K; the last group is shorter when ``group_size`` does not divide K
  (SmolLM2's K = 576 with groups of 128). Per-output-channel quantization is
  one group (``group_size == K``).
* ``zeros``: zero points ``(N, G)`` (4-bit only), or absent. Absent means the
  symmetric zero point: 8 for 4 bits, 0 for 8 bits. Either uint8 integers
  (version 1, what RTN, GPTQ and AWQ write) or, new in version 2, float32
  offsets (what an exact QA-LoRA merge writes: a per-group constant added to
  ``W`` moves the zero point by a fraction of a step). A module records the
  float variant as ``"zero_dtype": "float32"`` in its config; absent means
  uint8, so every version-1 file and config reads unchanged.

Dequantization: ``W[n, k] = (code[n, k] - zero[n, k // group_size]) * scale[n, k // group_size]``,
in float32. With integer zero points ``code - zero`` is a small integer (exact)
and each weight is one rounded product; with float zero points the
subtraction rounds too (``fl(fl(code - zero) * scale)``, two roundings), and
every path that dequantizes must round in that order to be bitwise the
reference (the fused matmuls are instead bounded against it).

The layout is device independent (plain integer and float tensors, stored
with safetensors) and matches ONNX Runtime's ``MatMulNBits`` B tensor row by
row, so INT4 export only reshapes it.
"""

from __future__ import annotations

import torch

FORMAT_VERSION = 2  # 1: uint8 zero points only; 2 adds float32 zero points (a superset)
SUPPORTED_BITS = (4, 8)


def symmetric_zero(bits: int) -> int:
    """The implicit zero point of symmetric codes: 8 for unsigned 4-bit, 0 for signed 8-bit."""
    return 8 if bits == 4 else 0


def code_range(bits: int) -> tuple[int, int]:
    """Smallest and largest stored code."""
    return (0, 15) if bits == 4 else (-127, 127)


def num_groups(k: int, group_size: int) -> int:
    """``G``: groups of ``group_size`` along K, the last one possibly shorter."""
    return -(-k // group_size)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """Pack 4-bit codes along the last dimension.

    Args:
        codes: integer tensor ``(N, K)`` with values in 0..15.

    Returns:
        uint8 ``(N, ceil(K / 2))``; even k in the low nibble.
    """
    n, k = codes.shape
    codes = codes.to(torch.uint8)
    if k % 2:
        codes = torch.cat([codes, codes.new_zeros(n, 1)], dim=1)  # (N, K + 1)
    return codes[:, 0::2] | (codes[:, 1::2] << 4)  # (N, ceil(K/2))


def unpack_int4(packed: torch.Tensor, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_int4`: uint8 ``(N, ceil(K/2))`` -> uint8 codes ``(N, K)``."""
    low, high = packed & 0xF, packed >> 4  # (N, K/2) each
    return torch.stack([low, high], dim=-1).reshape(packed.shape[0], -1)[:, :k]


def unpack(qweight: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Stored ``qweight`` -> integer codes ``(N, K)`` as int16 (room for code - zero)."""
    codes = unpack_int4(qweight, k) if bits == 4 else qweight
    return codes.to(torch.int16)


def float_zeros(zeros: torch.Tensor | None) -> bool:
    """Whether ``zeros`` are float offsets (format version 2) rather than uint8 integers (or absent)."""
    return zeros is not None and zeros.is_floating_point()


def dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int, k: int) -> torch.Tensor:
    """The float32 weight ``(N, K)`` the packed tensors stand for."""
    codes = unpack(qweight, bits, k)  # (N, K)
    if float_zeros(zeros):
        zero = zeros.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
        scale = scales.float().repeat_interleave(group_size, dim=1)[:, :k]
        return (codes.float() - zero) * scale  # two roundings: the subtraction, then the product
    zero = zeros.to(torch.int16) if zeros is not None else torch.full_like(scales, symmetric_zero(bits), dtype=torch.int16)
    zero = zero.repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    scale = scales.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    return (codes - zero).float() * scale


def dequant_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                   bits: int, group_size: int, k: int) -> torch.Tensor:
    """``x @ W^T`` with ``W`` dequantized; fp32 accumulation, result in ``x.dtype``.

    Args:
        x: ``(..., K)`` activations.

    Returns:
        ``(..., N)``.
    """
    w = dequantize(qweight, scales, zeros, bits, group_size, k)  # (N, K)
    return (x.float() @ w.t()).to(x.dtype)


def dequant_matmul_t(dy: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                     bits: int, group_size: int, k: int) -> torch.Tensor:
    """The transposed product ``dy @ W`` (the input gradient of :func:`dequant_matmul`).

    Args:
        dy: ``(..., N)``.

    Returns:
        ``(..., K)`` in ``dy.dtype``.
    """
    w = dequantize(qweight, scales, zeros, bits, group_size, k)  # (N, K)
    return (dy.float() @ w).to(dy.dtype)


def quantize_per_token_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic symmetric INT8 activations, one scale per row (token).

    Args:
        x: ``(M, K)`` float.

    Returns:
        codes int8 ``(M, K)`` and scales float32 ``(M, 1)``.
    """
    scale = x.float().abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127.0  # (M, 1)
    codes = torch.clamp(torch.round(x.float() / scale), -127, 127).to(torch.int8)
    return codes, scale


def int8_dynamic_matmul(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """W8A8: per-token INT8 activations times per-channel INT8 weights, integer accumulation.

    Args:
        x: ``(..., K)`` float activations.
        qweight: int8 ``(N, K)``; scales: float32 ``(N, 1)``.

    Returns:
        ``(..., N)`` in ``x.dtype``.
    """
    shape = x.shape
    codes, x_scale = quantize_per_token_int8(x.reshape(-1, shape[-1]))  # (M, K), (M, 1)
    acc = codes.to(torch.int32) @ qweight.to(torch.int32).t()  # (M, N) exact integer products
    y = acc.float() * x_scale * scales.float().reshape(1, -1)
    return y.reshape(*shape[:-1], -1).to(x.dtype)
