"""QA-LoRA (Xu et al., 2023, "QA-LoRA: Quantization-Aware Low-Rank Adaptation of Large Language Models").

A LoRA over an INT4 ``QuantLinear`` whose update is constant within each
quantization group, so that it folds into the packed format exactly. The
adapter sees group-pooled inputs: with the base's ``G = ceil(K / group_size)``
groups along K (the last one ``|g| = K - (G - 1) group_size`` wide when
``group_size`` does not divide K)::

    pool(x)_g = mean_{i in g} x_i                       (..., G)
    y = base(x) + s * B A dropout(pool(x)),   A: (r, G), B: (out, r), s = alpha / r

which is a LoRA whose ``A`` repeats each column ``A[:, g] / |g|`` over the
group's inputs, so the weight moves by ``c[o, g] = s (B A)[o, g] / |g|``, one
constant per (output row, group). This follows the paper's reference code
(``nn.AvgPool1d(group_size)`` before ``lora_A``, ``lora_dropout`` after the
pooling; its merge script subtracts ``s (B A)^T / group_size / scales`` from
the zero points), extended to a short last group by averaging over the inputs
that group really has.

The exact merge. The base computes ``W[o, i] = s_og (q_oi - z_og)``, so
``W + c = s_og (q_oi - (z_og - c_og / s_og))``: codes and scales stay, and the
zero points become the float32 offsets ``z' = z - c / s`` (packed format
version 2, see :mod:`slimtune.compress.kernels.reference`; a symmetric base's
implicit zero point is 8). :meth:`QALoraLinear.merged_quant_layer` builds that
layer; :func:`slimtune.delta.merge_and_unload_` uses it for QA-LoRA wrappers.

Its only error is float32 rounding of one division, one subtraction and the
dequantization itself (:func:`merge_error_bound`): with ``u = 2^-24``, for the
merge's float32 ``c``, ``|W'(merged) - (W + c)| <= u (|c| + s |z'| / (1 - u)) +
gamma_2 s |q - z'|`` per weight (Higham's standard model; ``gamma_n = n u /
(1 - n u)``), i.e. a few ulps of the group's code range ``s * 16``: about
2^-19 of a quantization step for zero points in the code range, against the
half a step that re-quantizing with round-to-nearest costs.

Limits: INT4 bases only (INT8 weights are symmetric per channel and carry no
zero points to absorb the update: refused); no DoRA (its row re-normalisation
is not constant per group); the base must be the ``QuantLinear`` itself, not
another delta around one, for the merge (training works either way). The
update has rank at most ``min(rank, G)``: with per-channel weights (one group)
it is a rank-one bias-like shift of each row by the mean input.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.delta.inject import DEFAULT, _innermost
from slimtune.delta.lora import LoraLinear, _is_quant


# -- pure tensor functions ----------------------------------------------------------------


def group_lengths(k: int, group_size: int, device=None) -> torch.Tensor:
    """``|g|`` for each of the ``G = ceil(k / group_size)`` groups: float32 ``(G,)``, the last possibly shorter."""
    groups = -(-k // group_size)
    lengths = torch.full((groups,), float(group_size), device=device)
    lengths[-1] = k - (groups - 1) * group_size
    return lengths


def group_mean(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Average ``x`` ``(..., K)`` over each group of ``group_size`` inputs -> ``(..., G)`` (a short last group
    averages over the inputs it has)."""
    k = x.shape[-1]
    groups = -(-k // group_size)
    padded = nn.functional.pad(x, (0, groups * group_size - k))  # (..., G * group_size), zeros add nothing
    sums = padded.reshape(*x.shape[:-1], groups, group_size).sum(-1)  # (..., G)
    return sums / group_lengths(k, group_size, x.device).to(x.dtype)


def expand_groups(t: torch.Tensor, group_size: int, k: int) -> torch.Tensor:
    """``(..., G)`` per-group values -> ``(..., K)``, each repeated over its group's inputs."""
    return t.repeat_interleave(group_size, dim=-1)[..., :k]


def merged_zeros(scales: torch.Tensor, zeros: torch.Tensor | None, update: torch.Tensor) -> torch.Tensor:
    """The float32 zero points ``z' = z - c / s`` ``(N, G)`` that add ``update`` ``c`` ``(N, G)`` to every weight
    of each group (``zeros`` None: the symmetric zero point 8).

    Raises:
        SlimTuneError: a group with scale 0 and a nonzero update (no zero point can move its weights).
    """
    scales = scales.float()
    stuck = (scales == 0) & (update != 0)
    if stuck.any():
        row, group = (int(i) for i in stuck.nonzero()[0])
        raise SlimTuneError(f"QA-LoRA cannot merge: output row {row}, group {group} has scale 0, so its weights cannot move",
                            "keep the delta unmerged (merge: false)")
    zero = zeros.float() if zeros is not None else torch.full_like(scales, 8.0)
    offset = torch.where(scales == 0, torch.zeros_like(update), update.float() / scales)  # (N, G)
    return zero - offset


def merge_error_bound(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, update: torch.Tensor,
                      group_size: int, k: int) -> torch.Tensor:
    """Elementwise bound (float64 ``(N, K)``) on ``|W' - (W + c)|`` for a merged layer's float32 zero points.

    ``W'`` is what the merged layer dequantizes to, ``fl(fl(q - z') s)``, with
    ``z' = fl(z - fl(c / s))`` (``zeros`` here are those ``z'``); ``W + c`` the
    exact sum of the base's weight and the update ``c`` ``(N, G)`` the merge
    used. Higham's standard model (each operation rounds by ``1 + delta``,
    ``|delta| <= u``): ``q - z' = (q - z + c/s) + (c/s) delta_1 - (z - fl(c/s)) delta_2``
    and ``|z - fl(c/s)| <= |z'| / (1 - u)``, so
    ``(q - z') s - (W + c)`` is at most ``u (|c| + s |z'| / (1 - u))``; the two
    roundings of the dequantization add ``gamma_2 s |q - z'|``.
    """
    from slimtune.compress.kernels.reference import unpack

    u = 2.0**-24
    codes = unpack(qweight, 4, k).double()  # (N, K)
    z = expand_groups(zeros.double(), group_size, k)  # (N, K): the merged z'
    s = expand_groups(scales.double(), group_size, k)
    c = expand_groups(update.double(), group_size, k)
    gamma2 = 2 * u / (1 - 2 * u)
    return u * (c.abs() + s * z.abs() / (1 - u)) + gamma2 * s * (codes - z).abs()


# -- the module ---------------------------------------------------------------------------


@register_module_type
class QALoraLinear(LoraLinear):
    """QA-LoRA around an INT4 ``QuantLinear`` (see the module docstring); ``lora_A`` is ``(rank, G)``.

    Args:
        base_layer: a ``QuantLinear`` with 4-bit weights (or a delta wrapping one).
        rank, alpha, dropout, rslora: as :class:`LoraLinear`.
        dora: must be False.

    Raises:
        SlimTuneError: a float base, an INT8 base, DoRA, or a rank that does not fit the layer.
    """

    method = "qa-lora"

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False, dora: bool = False):
        quant = _innermost(base_layer)
        if not _is_quant(quant):
            raise SlimTuneError(f"quant_aware LoRA (QA-LoRA) needs a quantized base; got {type(quant).__name__}",
                                "quantize the model first (a quantize stage with bits: 4), or use quant_aware: false")
        if quant.bits != 4:
            raise SlimTuneError(f"quant_aware LoRA (QA-LoRA) merges into INT4 weights only; this layer is INT{quant.bits}",
                                "quantize with bits: 4 for QA-LoRA, or use plain LoRA (quant_aware: false) over INT8")
        if dora:
            raise SlimTuneError("quant_aware LoRA (QA-LoRA) cannot use DoRA (its row re-normalisation is not constant per group)",
                                "use dora: false with quant_aware: true")
        super().__init__(base_layer, name, rank, alpha, dropout, rslora, dora=False)
        self.group_size = quant.group_size
        self.groups = -(-quant.in_features // self.group_size)
        weight = self.lora_A.weight
        self.lora_A = nn.Linear(self.groups, rank, bias=False, dtype=weight.dtype, device=weight.device)  # (r, G)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))

    @property
    def _quant(self) -> nn.Module:
        return _innermost(self.base_layer)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active or self.merged:
            return result
        pooled = group_mean(x.to(self.lora_A.weight.dtype), self.group_size)  # (..., G)
        lora = self.lora_B(self.lora_A(self.lora_dropout(pooled)))  # (..., out)
        return result + (self.scaling * lora).to(result.dtype)

    def group_update(self) -> torch.Tensor:
        """``c = s (B A) / |g|`` ``(out, G)`` float32: what the update adds to each weight of each group."""
        lengths = group_lengths(self._quant.in_features, self.group_size, self.lora_A.weight.device)  # (G,)
        ba = self.lora_B.weight.detach().float() @ self.lora_A.weight.detach().float()  # (out, G)
        return self.scaling * ba / lengths

    def delta_weight(self) -> torch.Tensor:
        """The update as a dense ``(out, in)`` weight: ``c`` repeated over each group's inputs."""
        return expand_groups(self.group_update(), self.group_size, self._quant.in_features)

    def merged_quant_layer(self) -> nn.Module:
        """A new ``QuantLinear`` computing ``W + c`` exactly (up to :func:`merge_error_bound`): the base's codes,
        scales and bias, with float32 zero points ``z - c / s`` (packed format version 2).

        Raises:
            SlimTuneError: another delta sits between this one and the ``QuantLinear``, or a scale-0 group
                would have to move.
        """
        from slimtune.compress.quant.linear import QuantLinear

        base = self.base_layer
        if not _is_quant(base):
            raise SlimTuneError("another delta sits between this QA-LoRA and its quantized weight",
                                "merge or detach the inner delta first")
        zeros = merged_zeros(base.scales, base.zeros, self.group_update().to(base.scales.device))  # (out, G)
        bias = base.bias
        merged = QuantLinear(base.in_features, base.out_features, 4, base.scheme.group_size, symmetric=False,
                             bias=bias is not None, act_bits=base.act_bits,
                             dtype=bias.dtype if bias is not None else torch.float32, zero_dtype="float32")
        merged = merged.to(base.qweight.device)
        merged.qweight.copy_(base.qweight)
        merged.scales.copy_(base.scales)
        merged.zeros.copy_(zeros)
        if bias is not None:
            merged.bias.data.copy_(bias.data)
        return merged

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, groups={self.groups} of {self.group_size}"
