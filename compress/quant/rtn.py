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


def group_params(w: torch.Tensor, scheme: QuantScheme, group_size: int,
                 shrink: torch.Tensor | float = 1.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Scales and zero points from each group's range.

    Args:
        w: ``(N, K)`` float weight.
        group_size: a divisor of K (K for per-channel).
        shrink: a factor ``(N, G)`` (or one for all) on each group's range: below 1 the
            extremes are clipped to a finer grid (:func:`search_group_params`).

    Returns:
        scales float32 ``(N, G)`` and zeros uint8 ``(N, G)`` (None when symmetric).
    """
    wg = grouped(w.float(), group_size)  # (N, G, g); zero padding changes neither max |w| nor a range that includes 0
    if scheme.symmetric:
        scales = (wg.abs().amax(-1) * shrink).clamp(min=1e-8) / symmetric_steps(scheme.bits)  # (N, G)
        return scales, None
    lo, hi = wg.amin(-1).clamp(max=0) * shrink, wg.amax(-1).clamp(min=0) * shrink  # the range includes 0
    levels = 2 ** scheme.bits - 1
    scales = ((hi - lo) / levels).clamp(min=1e-8)  # (N, G)
    zeros = torch.clamp(torch.round(-lo / scales), 0, levels).to(torch.uint8)
    return scales, zeros


@torch.no_grad()
def search_group_params(w: torch.Tensor, h: torch.Tensor, scheme: QuantScheme, group_size: int, grid: int = 100,
                        max_shrink: float = 0.8) -> tuple[torch.Tensor, torch.Tensor | None]:
    """:func:`group_params` with each group's range shrunk to minimise its rounding's output error.

    The range of group ``g`` is scaled by ``1 - i / grid``, ``i < max_shrink * grid``
    (``i = 0``: the full range), and the factor with the smallest ``d_g^T H_gg d_g``
    per row is kept, ``d_g`` being the group's rounding error and ``H_gg`` its diagonal
    block of ``h``. GPTQ's reference quantizer searches the same shrink factors
    (``mse``: grid 100, maxshrink 0.8), weighting the error by ``|d|^2.4`` instead;
    AWQ's ``auto_clip`` weights by the inputs, as here.

    Args:
        w: ``(N, K)`` weight.
        h: ``(K, K)`` second moment of the inputs (any positive multiple).

    Returns:
        scales ``(N, G)`` and zeros ``(N, G)`` (None when symmetric), as :func:`group_params`.
    """
    w = w.float()
    h_gg = diagonal_blocks(h.float(), group_size)  # (G, g, g)
    wg = grouped(w, group_size)  # (N, G, g); padding is 0, rounds to 0 and adds no error
    shrinks = 1 - torch.arange(max(1, int(max_shrink * grid)), device=w.device, dtype=torch.float64) / grid  # (S,)
    lo, hi = code_range(scheme.bits)
    best_err = torch.full(wg.shape[:2], float("inf"), device=w.device)  # (N, G)
    best_shrink = torch.ones_like(best_err)
    chunk = max(1, 2 ** 22 // wg.numel())  # candidates per batch: ~16 MB per (S, N, G, g) temporary
    for start in range(0, len(shrinks), chunk):
        p = shrinks[start:start + chunk]
        scales, zeros = group_params(w, scheme, group_size, p.float()[:, None, None])  # (S, N, G): each candidate's parameters
        zero = zeros.float() if zeros is not None else torch.full_like(scales, float(symmetric_zero(scheme.bits)))
        s, z = scales[..., None], zero[..., None]
        d = (torch.clamp(torch.round(wg / s) + z, lo, hi) - z) * s - wg  # (S, N, G, g), as quantize_codes rounds
        err = group_errors(d.reshape(-1, *wg.shape[1:]), h_gg).reshape(len(p), *wg.shape[:2])  # (S, N, G)
        err, index = err.min(0)  # the first (widest) of equal errors
        better = err < best_err  # an earlier chunk wins ties, as the widest range
        best_err[better], best_shrink[better] = err[better], p.float()[index][better]
    return group_params(w, scheme, group_size, best_shrink)


def group_errors(d: torch.Tensor, h_gg: torch.Tensor) -> torch.Tensor:
    """``d_ng^T H_g d_ng`` for errors ``d`` ``(N, G, g)`` and diagonal blocks ``h_gg`` ``(G, g, g)``: ``(N, G)``.

    One batched matmul over the groups (``einsum("ngk,gkl,ngl->ng")`` ran ~100x slower on CPU).
    """
    dg = d.transpose(0, 1)  # (G, N, g)
    return (torch.bmm(dg, h_gg) * dg).sum(-1).t()  # (N, G)


def grouped(t: torch.Tensor, group_size: int) -> torch.Tensor:
    """``(R, K)`` -> ``(R, G, group_size)``, zero-padding a short last group."""
    g = num_groups(t.shape[1], group_size)
    if g * group_size != t.shape[1]:
        t = torch.nn.functional.pad(t, (0, g * group_size - t.shape[1]))
    return t.reshape(t.shape[0], g, group_size)


def diagonal_blocks(h: torch.Tensor, group_size: int) -> torch.Tensor:
    """The ``(G, g, g)`` diagonal blocks of ``h`` ``(K, K)`` (zero-padded to ``G * g``)."""
    k = h.shape[0]
    g = num_groups(k, group_size)
    padded = torch.nn.functional.pad(h, (0, g * group_size - k, 0, g * group_size - k))  # (Gg, Gg)
    blocks = padded.reshape(g, group_size, g, group_size)
    return blocks[torch.arange(g), :, torch.arange(g), :]  # (G, g, g)


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
