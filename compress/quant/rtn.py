"""Round-to-nearest (RTN) weight quantization into the packed format of
:mod:`slimtune.compress.kernels.reference`.

The scheme (``QuantScheme``): ``bits`` 4 or 8; ``group_size`` (a divisor of K)
or ``None`` for one group per output channel (a group size that does not
divide K leaves a shorter last group); asymmetric codes (scale = (max - min)
/ (2^bits - 1) over a range that includes 0, rounded integer zero point; the
4-bit default, as in GPTQ's and AWQ's reference code) or symmetric ones
(implicit zero point). Symmetric 4-bit uses the full grid of GPTQ's reference
quantizer: scale = 2 max|w| / 15 and signed codes -8..7 (stored as 0..15 with
zero point 8), so all 16 levels are used; ``max|w| / 7`` would leave code -8
unused and make every step 15/14 wider (the squared error (15/14)^2 = 1.15x
larger). The most positive weight of a group, 7.5 steps, lands on code 7,
half a step away, like any other weight. 8-bit is symmetric per channel with
codes -127..127 (scale = max|w| / 127; the format and W8A8's exactness
argument use that range).

These pure tensor functions are shared by RTN itself, GPTQ and AWQ (which
choose the values being rounded and the scales differently) and by QAT's fake
quantization. Error bound: a weight inside its group's range is off by at most
half a step (``scale / 2``); with an asymmetric zero point that was rounded, the
group's extreme values may be off by up to one step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from slimtune.errors import SlimTuneError
from slimtune.compress.kernels.reference import SUPPORTED_BITS, code_range, num_groups, pack_int4, symmetric_zero

GROUP_SIZES = (32, 64, 128)


@dataclass(frozen=True)
class QuantScheme:
    """How one linear's weight is quantized.

    Attributes:
        bits: 4 or 8.
        group_size: 32, 64 or 128 (a divisor of in_features), or None for per output channel.
        symmetric: symmetric codes (no stored zero points); None takes the default
            of ``bits``: asymmetric for 4 bits, symmetric for 8.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool | None = None

    def __post_init__(self):
        if self.symmetric is None:
            object.__setattr__(self, "symmetric", default_symmetric(self.bits))
        if self.bits not in SUPPORTED_BITS:
            raise SlimTuneError(f"bits={self.bits} is not supported", f"use one of {SUPPORTED_BITS}")
        if self.group_size is not None and self.group_size not in GROUP_SIZES:
            raise SlimTuneError(f"group_size={self.group_size} is not supported", f"use one of {GROUP_SIZES}, or per-channel quantization (group_size: channel)")
        if self.bits == 8 and (self.group_size is not None or not self.symmetric):
            raise SlimTuneError("8-bit weights are symmetric and per output channel",
                                "use per-channel symmetric 8-bit (group_size: channel, symmetric: true)")

    def groups_of(self, k: int, where: str = "") -> int:
        """The group size used for a weight with ``k`` input features (K itself when per-channel).

        A group size that does not divide ``k`` leaves a shorter last group (the format allows it).
        """
        return k if self.group_size is None else self.group_size


def default_symmetric(bits: int) -> bool:
    """Symmetric codes by default only for 8 bits (4 bits: asymmetric, with zero points)."""
    return bits == 8


def symmetric_steps(bits: int) -> float:
    """Steps from 0 to the largest magnitude of a symmetric group: 7.5 for 4 bits (full grid), 127 for 8 bits."""
    return 7.5 if bits == 4 else 127.0


def group_params(w: torch.Tensor, scheme: QuantScheme, group_size: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points from each group's range.

    Args:
        w: ``(N, K)`` float weight.
        group_size: a divisor of K (K for per-channel).

    Returns:
        scales float32 ``(N, G)`` and zeros uint8 ``(N, G)`` (None when symmetric).
    """
    n, k = w.shape
    g = num_groups(k, group_size)
    # Zero padding of a short last group changes neither max |w| nor a range that includes 0.
    wg = torch.nn.functional.pad(w.float(), (0, g * group_size - k)).reshape(n, g, group_size)  # (N, G, g)
    if scheme.symmetric:
        scales = wg.abs().amax(-1).clamp(min=1e-8) / symmetric_steps(scheme.bits)  # (N, G)
        return scales, None
    lo, hi = wg.amin(-1).clamp(max=0), wg.amax(-1).clamp(min=0)  # the range includes 0
    levels = 2 ** scheme.bits - 1
    scales = ((hi - lo) / levels).clamp(min=1e-8)  # (N, G)
    zeros = torch.clamp(torch.round(-lo / scales), 0, levels).to(torch.uint8)
    return scales, zeros


def quantize_codes(w: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Round ``w`` ``(N, K)`` (or a column block of it) to integer codes with the given group parameters.

    ``scales``/``zeros`` are per group ``(N, G)``, or per column ``(N, K)`` when
    ``group_size == 1`` (GPTQ quantizes one column at a time).

    Returns:
        int16 codes ``(N, K)`` in :func:`code_range`.
    """
    zero = zeros.float() if zeros is not None else torch.full_like(scales, float(symmetric_zero(bits)))
    k = w.shape[1]
    scale = scales.float().repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    zero = zero.repeat_interleave(group_size, dim=1)[:, :k]
    lo, hi = code_range(bits)
    return torch.clamp(torch.round(w.float() / scale) + zero, lo, hi).to(torch.int16)


def dequantize_codes(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int, group_size: int) -> torch.Tensor:
    """Codes back to float32 values (same grouping rules as :func:`quantize_codes`)."""
    zero = zeros.float() if zeros is not None else torch.full_like(scales, float(symmetric_zero(bits)))
    k = codes.shape[1]
    zero = zero.repeat_interleave(group_size, dim=1)[:, :k]  # (N, K)
    return (codes.float() - zero) * scales.float().repeat_interleave(group_size, dim=1)[:, :k]


def fake_quantize(w: torch.Tensor, scheme: QuantScheme, group_size: int) -> torch.Tensor:
    """Quantize then dequantize ``w`` ``(N, K)`` with RTN; float32 result."""
    scales, zeros = group_params(w, scheme, group_size)
    return dequantize_codes(quantize_codes(w, scales, zeros, scheme.bits, group_size), scales, zeros, scheme.bits, group_size)


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """int16 codes ``(N, K)`` -> the stored ``qweight`` (uint8 nibbles or int8)."""
    return pack_int4(codes) if bits == 4 else codes.to(torch.int8)


def quantize_rtn(w: torch.Tensor, scheme: QuantScheme, where: str = "") -> dict[str, torch.Tensor | None]:
    """Round-to-nearest quantization of one weight.

    Args:
        w: ``(N, K)`` float weight.

    Returns:
        ``{"qweight", "scales", "zeros"}`` in the packed format.
    """
    group_size = scheme.groups_of(w.shape[1], where)
    scales, zeros = group_params(w, scheme, group_size)
    codes = quantize_codes(w, scales, zeros, scheme.bits, group_size)
    return {"qweight": pack_codes(codes, scheme.bits), "scales": scales, "zeros": zeros}
