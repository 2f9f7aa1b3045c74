"""``QuantLinear``: the module an ``nn.Linear`` is swapped for when quantized.

It holds the packed tensors of :mod:`slimtune.compress.kernels.reference`
(``qweight``, ``scales``, optional ``zeros``) as buffers and an optional float
bias, and its forward is one call to the dispatching custom op. Artifacts
record each swap (``{"module", "type": "QuantLinear", "config"}``); loading
builds ``QuantLinear.from_config(config)`` on the skeleton and loads the
tensors from safetensors. Zero points are uint8 (format version 1) unless the
config says ``"zero_dtype": "float32"`` (version 2: float offsets, written by
an exact QA-LoRA merge); the key is absent for uint8, so version-1 configs
build what they always built.
"""

from __future__ import annotations

from weakref import WeakKeyDictionary

import torch
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.compress.kernels import dispatch  # noqa: F401 - registers torch.ops.slimtune.*
from slimtune.compress.kernels.reference import num_groups
from slimtune.compress.quant.rtn import QuantScheme, quantize_rtn

ZERO_DTYPES = {"uint8": torch.uint8, "float32": torch.float32}  # format v1 zero points; v2 adds float32


class PackedModule(nn.Module):
    """Base of the modules that hold packed tensors (``qweight``, float32 ``scales``, ``zeros``).

    A dtype cast of the model (``model.half()``, ``model.to(torch.bfloat16)``)
    changes the float dtype such a module computes in (its bias; ``dtype``
    where it has one) but never the stored format: ``scales`` (and float
    ``zeros``) stay float32.
    Device moves apply to every tensor, and packed tensors shared between
    modules (a tied LM head and the quantized embedding) stay shared: torch
    re-creates each module's buffers separately, so one ``.to()`` call's
    results are remembered by the tensor they replace.
    """

    _moved: WeakKeyDictionary = WeakKeyDictionary()  # fn of one .to()/.cuda() call -> {id(old buffer): (old, new)}

    def shared_copy(self) -> "PackedModule":
        """Another module of the same configuration holding this one's very tensors (cross-layer sharing)."""
        copy = type(self).from_config(self.config())
        copy._buffers.update(self._buffers)
        copy._parameters.update(self._parameters)
        return copy

    def _apply(self, fn, recurse=True):
        before = dict(self._buffers)
        super()._apply(fn, recurse)
        try:
            moved = PackedModule._moved.setdefault(fn, {})
        except TypeError:  # fn cannot be weakly referenced: no sharing to keep
            moved = {}
        for name, old in before.items():
            if old is None:
                continue
            new = self._buffers[name]
            if name in ("scales", "zeros") and new.dtype != old.dtype:
                new = self._buffers[name] = old.to(new.device)
            if id(old) in moved:  # another module's buffer too: share what it became
                self._buffers[name] = moved[id(old)][1]
            else:
                moved[id(old)] = (old, new)  # holding old keeps its id from being reused during the call
        if isinstance(getattr(self, "dtype", None), torch.dtype):
            self.dtype = fn(torch.empty(0, dtype=self.dtype)).dtype  # follows .half() / .to(dtype) / .float()
        return self


@register_module_type
class QuantLinear(PackedModule):
    """A linear layer with a quantized, frozen weight.

    Args:
        in_features, out_features: as ``nn.Linear``.
        bits: 4 or 8.
        group_size: inputs per scale (the last group may be shorter), or None for per output channel.
        symmetric: no stored zero points; None: the default of ``bits`` (asymmetric 4-bit, symmetric 8-bit).
        bias: keep a float bias (trainable, e.g. for BitFit).
        act_bits: 8 for W8A8 (dynamic per-token INT8 activations; 8-bit weights only), else None.
        zero_dtype: ``"uint8"`` integer zero points (format v1), or ``"float32"`` offsets (v2; asymmetric
            4-bit only), which :class:`slimtune.delta.qalora.QALoraLinear` writes when it merges exactly.

    Raises:
        SlimTuneError: float zero points on a symmetric or 8-bit scheme, or an unknown ``zero_dtype``.
    """

    def __init__(self, in_features: int, out_features: int, bits: int = 4, group_size: int | None = 128,
                 symmetric: bool | None = None, bias: bool = True, act_bits: int | None = None, dtype: torch.dtype = torch.float32,
                 zero_dtype: str = "uint8"):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.scheme = QuantScheme(bits, group_size, symmetric)
        self.act_bits = act_bits
        if zero_dtype not in ZERO_DTYPES:
            raise SlimTuneError(f"zero_dtype={zero_dtype!r} is not a zero-point type of the packed format",
                                f"use one of {sorted(ZERO_DTYPES)}")
        if zero_dtype != "uint8" and (bits != 4 or self.scheme.symmetric):
            raise SlimTuneError(f"float zero points need asymmetric 4-bit weights; got bits={bits}, "
                                f"symmetric={self.scheme.symmetric}", "use bits: 4 with symmetric: false, or zero_dtype uint8")
        self.zero_dtype = zero_dtype
        g = self.scheme.groups_of(in_features)
        packed_k = (in_features + 1) // 2 if bits == 4 else in_features
        self.register_buffer("qweight", torch.zeros(out_features, packed_k, dtype=torch.uint8 if bits == 4 else torch.int8))
        groups = num_groups(in_features, g)
        self.register_buffer("scales", torch.ones(out_features, groups, dtype=torch.float32))
        self.register_buffer("zeros", None if self.scheme.symmetric else torch.zeros(out_features, groups, dtype=ZERO_DTYPES[zero_dtype]))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype)) if bias else None

    @property
    def bits(self) -> int:
        return self.scheme.bits

    @property
    def group_size(self) -> int:
        """The effective group size (``in_features`` when per channel)."""
        return self.scheme.groups_of(self.in_features)

    @property
    def quantized_weight_numel(self) -> int:
        """The number of weights ``qweight`` packs (counted as parameters in size reports)."""
        return self.in_features * self.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act_bits == 8:
            y = torch.ops.slimtune.int8_dynamic_matmul(x, self.qweight, self.scales)
        else:
            y = torch.ops.slimtune.dequant_matmul(x, self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def dequantized_weight(self) -> torch.Tensor:
        """The float32 weight ``(out_features, in_features)`` this layer computes with."""
        from slimtune.compress.kernels.reference import dequantize

        return dequantize(self.qweight, self.scales, self.zeros, self.bits, self.group_size, self.in_features)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # copy_ would cast float zero points to uint8 (or back) without a word: a file and a config that
        # disagree on the format version are refused instead
        stored = state_dict.get(prefix + "zeros")
        if stored is not None and self.zeros is not None and stored.dtype != self.zeros.dtype:
            raise SlimTuneError(f"{prefix}zeros holds {stored.dtype} zero points, but this QuantLinear was built for "
                                f"{self.zeros.dtype} (zero_dtype={self.zero_dtype!r})",
                                "rebuild the layer from the config saved with these tensors (its zero_dtype)")
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    # -- artifact swap protocol -------------------------------------------------
    def config(self) -> dict:
        float_zeros = {"zero_dtype": self.zero_dtype} if self.zero_dtype != "uint8" else {}  # absent: v1's uint8
        return {"in_features": self.in_features, "out_features": self.out_features, "bits": self.bits,
                "group_size": self.scheme.group_size, "symmetric": self.scheme.symmetric,
                "bias": self.bias is not None, "act_bits": self.act_bits, **float_zeros}

    @classmethod
    def from_config(cls, config: dict) -> QuantLinear:
        return cls(**config)

    @classmethod
    def from_packed(cls, linear: nn.Module, scheme: QuantScheme, packed: dict, act_bits: int | None = None) -> QuantLinear:
        """Build from a linear (float, or a ``QuantLinear`` being re-quantized: for shape, bias, dtype and device)
        and its packed tensors ``{"qweight", "scales", "zeros"}`` (float32 ``zeros`` make a format-v2 layer with
        float zero points)."""
        zeros = packed.get("zeros")
        zero_dtype = "float32" if zeros is not None and zeros.is_floating_point() else "uint8"
        weight = getattr(linear, "weight", None)
        like = weight if isinstance(weight, torch.Tensor) else linear.bias
        layer = cls(linear.in_features, linear.out_features, scheme.bits, scheme.group_size, scheme.symmetric,
                    linear.bias is not None, act_bits, dtype=like.dtype if like is not None else torch.float32,
                    zero_dtype=zero_dtype)
        layer.qweight.copy_(packed["qweight"])
        layer.scales.copy_(packed["scales"])
        if packed.get("zeros") is not None:
            layer.zeros.copy_(packed["zeros"])
        if linear.bias is not None:
            layer.bias.data.copy_(linear.bias.data)
        return layer.to(next(iter([*linear.parameters(), *linear.buffers()])).device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, scheme: QuantScheme, act_bits: int | None = None, where: str = "") -> QuantLinear:
        """Round-to-nearest quantization of a float linear."""
        return cls.from_packed(linear, scheme, quantize_rtn(linear.weight.detach(), scheme, where), act_bits)

    def extra_repr(self) -> str:
        group = "per-channel" if self.scheme.group_size is None else f"group_size={self.scheme.group_size}"
        acts = f", act_bits={self.act_bits}" if self.act_bits else ""
        sym = "symmetric" if self.scheme.symmetric else "asymmetric"
        sym += f" ({self.zero_dtype} zeros)" if self.zero_dtype != "uint8" else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, {group}, {sym}{acts}, bias={self.bias is not None}"
