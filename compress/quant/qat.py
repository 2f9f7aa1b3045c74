"""Quantization-aware training (QAT): fake quantization with a straight-through estimator.

During training each selected ``nn.Linear`` computes with its weight rounded
to the target format (round-to-nearest with group parameters recomputed from
the current weight at every step), and, for W8A8, with its input rounded to
per-token INT8; the rounding is invisible to the backward pass, which treats
it as the identity (the straight-through estimator). After training,
:func:`convert_qat_` swaps each wrapper for a :class:`QuantLinear` holding the
RTN packing of the trained weight, which is by construction the quantized
weight the forward pass already used, so the converted model computes what the
fake-quantized one did.

References:
    Jacob et al. 2018, "Quantization and Training of Neural Networks for
    Efficient Integer-Arithmetic-Only Inference" (fake quantization in the
    forward pass, float weights kept for the update).
    Bengio, Leonard and Courville 2013, "Estimating or Propagating Gradients
    Through Stochastic Neurons for Conditional Computation" (the
    straight-through estimator).

Limits:
    * The scales are not learned (unlike LSQ / PACT); they follow the weight's
      range, so they change whenever an extreme weight moves.
    * The STE passes gradients through clipping too; with range-derived scales
      a symmetric 4-bit group's largest positive weight (7.5 steps on the full
      grid) is clipped to code 7, half a step, and an asymmetric zero point
      that was rounded can clip a group's extreme value by up to one step.
    * Wrapping never caches weights: under FSDP2 the forward reads
      ``base_layer.weight`` as the plain tensor ``fully_shard`` unsharded for
      it. :func:`convert_qat_` needs the full (unsharded) weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.compress.kernels.reference import quantize_per_token_int8
from slimtune.compress.quant.linear import QuantLinear
from slimtune.compress.quant.rtn import QuantScheme, fake_quantize

ACT_BITS = (None, 8)


# ---------------------------------------------------------------- tensor functions

def straight_through(x: torch.Tensor, x_q: torch.Tensor) -> torch.Tensor:
    """Value ``x_q``, gradient that of the identity in ``x``.

    Written ``x_q + (x - x.detach())`` rather than ``x + (x_q - x).detach()``:
    ``x - x.detach()`` is exactly zero, so the value is ``x_q`` bit for bit in
    any dtype (the other form rounds in bf16/fp16).
    """
    return x_q.detach() + (x - x.detach())


def fake_quantize_weight(w: torch.Tensor, scheme: QuantScheme, group_size: int) -> torch.Tensor:
    """RTN fake quantization of ``w`` ``(N, K)`` with a straight-through gradient; ``w.dtype``."""
    return straight_through(w, fake_quantize(w.detach(), scheme, group_size).to(w.dtype))


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """Dynamic per-token symmetric INT8 fake quantization of ``x`` ``(..., K)`` with a straight-through gradient."""
    flat = x.detach().reshape(-1, x.shape[-1])  # (M, K)
    codes, scale = quantize_per_token_int8(flat)  # (M, K), (M, 1)
    x_q = (codes.float() * scale).reshape(x.shape).to(x.dtype)
    return straight_through(x, x_q)


# ---------------------------------------------------------------- module

class FakeQuantLinear(nn.Module):
    """An ``nn.Linear`` trained through fake quantization (PEFT's base-layer pattern).

    Args:
        base_layer: the float linear; kept as is (unwrapping returns this object).
        scheme: the weight format the layer will be converted to.
        act_bits: 8 to also fake-quantize activations per token (W8A8; needs 8-bit weights), else None.
        where: the module's name, for error messages.

    Raises:
        SlimTuneError: ``act_bits`` unsupported or paired with non-8-bit weights.
    """

    def __init__(self, base_layer: nn.Linear, scheme: QuantScheme, act_bits: int | None = None, where: str = ""):
        super().__init__()
        check_act_bits(scheme, act_bits, where)
        self.group_size = scheme.groups_of(base_layer.in_features, where)
        self.base_layer = base_layer
        self.scheme = scheme
        self.act_bits = act_bits

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Read the weight afresh every call: FSDP2 swaps it between sharded and full.
        w_q = fake_quantize_weight(self.base_layer.weight, self.scheme, self.group_size)  # (N, K)
        if self.act_bits == 8:
            x = fake_quantize_per_token(x)
        return F.linear(x, w_q, self.base_layer.bias)

    def extra_repr(self) -> str:
        group = "per-channel" if self.scheme.group_size is None else f"group_size={self.scheme.group_size}"
        acts = f", act_bits={self.act_bits}" if self.act_bits else ""
        return f"bits={self.scheme.bits}, {group}, symmetric={self.scheme.symmetric}{acts}"


def check_act_bits(scheme: QuantScheme, act_bits: int | None, where: str = "") -> None:
    """Raise a SlimTuneError unless ``act_bits`` is None, or 8 over 8-bit weights."""
    at = f" for {where}" if where else ""
    if act_bits not in ACT_BITS:
        raise SlimTuneError(f"act_bits={act_bits}{at} is not supported", "use 8 (W8A8) or null (weight-only)")
    if act_bits == 8 and scheme.bits != 8:
        raise SlimTuneError(f"act_bits=8{at} needs 8-bit weights, got bits={scheme.bits}", "set bits: 8 for W8A8")


# ---------------------------------------------------------------- surgery

def prepare_qat_(model: nn.Module, schemes: dict[str, QuantScheme], act_bits: dict[str, int | None] | None = None) -> list[str]:
    """Wrap each named ``nn.Linear`` in a :class:`FakeQuantLinear`, in place.

    Every name is checked before anything is swapped, so a bad name leaves the model untouched.

    Args:
        model: the float model.
        schemes: ``{fully qualified module name: scheme}`` (names as in ``model.named_modules()``).
        act_bits: ``{name: 8 | None}``; missing names are weight-only.

    Returns:
        The wrapped module names, in the order given.

    Raises:
        SlimTuneError: a name that is missing, not an ``nn.Linear`` or already
            quantized; an unsupported ``act_bits``.
    """
    act_bits = act_bits or {}
    wrappers = {name: FakeQuantLinear(linear_named(model, name), scheme, act_bits.get(name), name)
                for name, scheme in schemes.items()}
    for name, wrapper in wrappers.items():
        model.set_submodule(name, wrapper)
    return list(wrappers)


def convert_qat_(model: nn.Module) -> list[str]:
    """Replace every :class:`FakeQuantLinear` by the :class:`QuantLinear` packing of its trained weight, in place.

    The packing is RTN with the layer's scheme, i.e. exactly the weight (and
    activation) rounding the fake-quantized forward used. Call it on a model
    whose parameters are full tensors (not FSDP2 shards).

    Returns:
        The converted module names.
    """
    names = [name for name, module in model.named_modules() if isinstance(module, FakeQuantLinear)]
    for name in names:
        fake = model.get_submodule(name)
        model.set_submodule(name, QuantLinear.from_linear(fake.base_layer, fake.scheme, fake.act_bits, where=name))
    return names


def linear_named(model: nn.Module, name: str) -> nn.Linear:
    """The ``nn.Linear`` called ``name``, or a SlimTuneError saying what is there instead."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise SlimTuneError(f"module {name!r} not found in the model", "use names as printed by model.named_modules()") from None
    if isinstance(module, (FakeQuantLinear, QuantLinear)):
        raise SlimTuneError(f"module {name!r} is already quantized ({type(module).__name__})",
                            "quantize a float model, or exclude the module")
    if not isinstance(module, nn.Linear):
        raise SlimTuneError(f"module {name!r} is a {type(module).__name__}, not an nn.Linear",
                            "QAT wraps linear layers only; exclude the module")
    return module

