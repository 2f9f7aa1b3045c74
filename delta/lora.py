"""LoRA (Hu et al., 2021), rank-stabilised LoRA, DoRA (Liu et al., 2024), and LoRA over quantized weights.

A :class:`LoraLinear` wraps a linear-like module ``W`` (``nn.Linear``,
GPT-2's ``Conv1D``, or a packed ``QuantLinear``) and adds a low-rank update::

    y = W x + s * B A dropout(x),   A: (r, in), B: (out, r), s = alpha / r   (alpha / sqrt(r) with rslora)

``B`` starts at zero, so a fresh LoRA leaves the model's outputs unchanged.
With ``dora`` the updated weight is re-normalised per output row and scaled
by a trained magnitude ``m`` (initialised to the row norms of ``W``); as in
the paper and PEFT, the norm is treated as a constant in the backward pass.

Over a ``QuantLinear`` the base stays packed and frozen: its forward is the
dequant-matmul op, whose backward gives the input gradient through the
transposed product, so the low-rank branch trains without the weight ever
being dequantized whole. Ways out: keep the branch (the default), or
:func:`merge_and_unload_`, which re-quantizes ``dequant(W) + s B A`` one layer
at a time with the base's own scheme (round to nearest) and reports the
error that adds.

Merging a float base is exact both ways: :func:`merge_` adds ``s B A`` into the
weight and keeps the original tensor, :func:`unmerge_` puts that tensor back.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.delta.inject import (DEFAULT, DeltaLayer, _innermost, _replace, freeze_backbone_, in_out_features, select_modules,
                                   unload_heads_, wrap_, wrappers_of)


def _is_quant(module: nn.Module) -> bool:
    return type(module).__name__ == "QuantLinear"


def _is_conv1d(module: nn.Module) -> bool:
    return type(module).__name__ == "Conv1D"


@register_module_type
class LoraLinear(DeltaLayer):
    """A LoRA delta around a linear-like module (see the module docstring)."""

    method = "lora"

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, rank: int = 8, alpha: float = 16.0,
                 dropout: float = 0.0, rslora: bool = False, dora: bool = False):
        super().__init__(base_layer, name)
        in_features, out_features = in_out_features(base_layer)
        if not isinstance(rank, int) or rank < 1 or rank > min(in_features, out_features):
            raise SlimTuneError(f"LoRA rank {rank} does not fit a {in_features} -> {out_features} layer",
                                f"use a rank between 1 and {min(in_features, out_features)}")
        if dora and _is_quant(_innermost(base_layer)):
            raise SlimTuneError("DoRA over a quantized weight is not supported (its row norms need the whole float weight)",
                                "use plain LoRA (dora: false) over quantized layers")
        self.rank, self.alpha, self.rslora, self.dora = rank, float(alpha), rslora, dora
        self.dropout_p = float(dropout)
        self.scaling = self.alpha / (math.sqrt(rank) if rslora else rank)
        weight = self._base_weight_param()
        dtype = weight.dtype if weight is not None and weight.is_floating_point() else torch.float32
        device = next((t.device for t in base_layer.parameters()), None) or next((t.device for t in base_layer.buffers()), torch.device("cpu"))
        self.lora_A = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)
        self.lora_B = nn.Linear(rank, out_features, bias=False, dtype=dtype, device=device)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))  # as PEFT and the reference implementation
        nn.init.zeros_(self.lora_B.weight)
        if dora:
            with torch.no_grad():
                norm = self._float_weight().norm(dim=1)
            self.lora_magnitude_vector = nn.Parameter(norm.to(dtype))
        self._original: torch.Tensor | None = None

    # -- helpers -----------------------------------------------------------------
    def _base_weight_param(self) -> torch.Tensor | None:
        base = _innermost(self.base_layer)
        return getattr(base, "weight", None) if not _is_quant(base) else None

    def _float_weight(self) -> torch.Tensor:
        """The base weight as ``(out, in)`` float (dequantized for a QuantLinear)."""
        base = _innermost(self.base_layer)
        if _is_quant(base):
            return base.dequantized_weight()
        return base.weight.t() if _is_conv1d(base) else base.weight

    def delta_weight(self) -> torch.Tensor:
        """``s B A`` as ``(out, in)``."""
        return self.scaling * (self.lora_B.weight @ self.lora_A.weight)

    def _bias(self) -> torch.Tensor | None:
        return getattr(_innermost(self.base_layer), "bias", None)

    # -- forward -----------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        if not self.active or self.merged:
            return result
        lora = self.lora_B(self.lora_A(self.lora_dropout(x.to(self.lora_A.weight.dtype))))
        if not self.dora:
            return result + (self.scaling * lora).to(result.dtype)
        weight = self._float_weight()
        norm = (weight + self.delta_weight().to(weight.dtype)).norm(dim=1).detach()  # a constant, as in DoRA section 4.3
        scale = (self.lora_magnitude_vector / norm).to(result.dtype)
        bias = self._bias()
        plain = result - bias.to(result.dtype) if bias is not None else result
        return result + (scale - 1) * plain + scale * (self.scaling * lora).to(result.dtype)

    # -- merging -----------------------------------------------------------------
    def merged_weight(self) -> torch.Tensor:
        """The float ``(out, in)`` weight this delta computes with: ``W + s B A`` (DoRA: re-normalised and scaled)."""
        weight = self._float_weight().detach()
        merged = weight + self.delta_weight().detach().to(weight.dtype)
        if self.dora:
            merged = merged * (self.lora_magnitude_vector.detach() / merged.norm(dim=1)).to(weight.dtype)[:, None]
        return merged

    def merge(self) -> None:
        """Fold the update into a float base weight (kept for :meth:`unmerge`)."""
        base = _innermost(self.base_layer)
        if _is_quant(base):
            raise SlimTuneError("merging into a quantized weight replaces the layer: use merge_and_unload_",
                                "merge_and_unload_(model) re-quantizes each merged weight, or keep the branch unmerged")
        if self.merged:
            return
        merged = self.merged_weight()
        self._original = base.weight.data
        base.weight.data = (merged.t() if _is_conv1d(base) else merged).to(base.weight.dtype).contiguous()
        self.merged = True

    def unmerge(self) -> None:
        """Put the original weight back, bit for bit."""
        if not self.merged:
            return
        _innermost(self.base_layer).weight.data = self._original
        self._original = None
        self.merged = False

    # -- artifact protocol -------------------------------------------------------
    def config(self) -> dict:
        return {"rank": self.rank, "alpha": self.alpha, "dropout": self.dropout_p, "rslora": self.rslora, "dora": self.dora}

    def extra_repr(self) -> str:
        extra = ", rslora" if self.rslora else ""
        extra += ", dora" if self.dora else ""
        return f"{super().extra_repr()}, rank={self.rank}, alpha={self.alpha:g}, scaling={self.scaling:g}{extra}"


def add_lora_(model: nn.Module, targets: list[str] | str = ("query", "value"), rank: int = 8, alpha: float = 16.0,
              dropout: float = 0.0, rslora: bool = False, dora: bool = False, name: str = DEFAULT,
              exclude: list[str] | tuple = (), types: list[str] | None = None, train: list[str] | tuple = (),
              freeze: bool = True, quant_aware: bool = False) -> list[str]:
    """Wrap the chosen linears of ``model`` in :class:`LoraLinear` deltas named ``name``, in place.

    Args:
        targets: roles, ``all-linear``, globs or ``re:`` regexes (see :func:`slimtune.delta.select_modules`).
        rank, alpha, dropout, rslora, dora: the LoRA hyperparameters (scaling ``alpha / rank``, or
            ``alpha / sqrt(rank)`` with ``rslora``).
        train: parameter-name globs that train besides the delta (e.g. a task head), when ``freeze``.
        freeze: freeze everything else (the default).
        quant_aware: QA-LoRA over quantized (``QuantLinear``) bases: the update is constant within each
            quantization group, so :func:`merge_and_unload_` folds it into the packed format exactly
            (:mod:`slimtune.delta.qalora`).

    Returns:
        The qualified names of the wrapped modules.

    Raises:
        SlimTuneError: a bad target, a rank that does not fit a layer, or a delta ``name`` already attached.
    """
    from slimtune.delta.inject import delta_names

    if name in delta_names(model):
        raise SlimTuneError(f"a delta named {name!r} is already attached", "choose another name or detach_ it first")
    names = select_modules(model, targets, types=types, exclude=exclude)
    for qualified in names:  # check every layer before wrapping any, so a bad rank changes nothing
        i, o = in_out_features(model.get_submodule(qualified))
        if not isinstance(rank, int) or rank < 1 or rank > min(i, o):
            raise SlimTuneError(f"LoRA rank {rank} does not fit {qualified} ({i} -> {o})",
                                f"use a rank between 1 and {min(i, o)}")
    cls = LoraLinear
    if quant_aware:
        from slimtune.delta.qalora import QALoraLinear as cls
    for qualified in names:
        wrap_(model, qualified, lambda m: cls(m, name, rank, alpha, dropout, rslora, dora))
    if freeze:
        freeze_backbone_(model, train)
    return names


def merge_(model: nn.Module, name: str = DEFAULT) -> None:
    """Fold LoRA ``name`` into its float base weights (reversible with :func:`unmerge_`)."""
    for _, wrapper in _lora(model, name):
        wrapper.merge()


def unmerge_(model: nn.Module, name: str = DEFAULT) -> None:
    for _, wrapper in _lora(model, name):
        wrapper.unmerge()


def merge_and_unload_(model: nn.Module, name: str = DEFAULT) -> dict:
    """Replace every wrapper of LoRA ``name`` by a plain module holding the merged weight.

    A task head trained with it (a :class:`TrainedCopy` of the same name) is replaced by its trained copy.

    Float bases get ``W + s B A`` in their own weight. ``QuantLinear`` bases are
    re-quantized with their scheme (round to nearest): the returned report gives, per
    layer and overall, the relative error ``||Q(W') - W'|| / ||W'||`` that the
    re-quantization adds (``W'`` the float merged weight). QA-LoRA wrappers
    (``quant_aware``) merge exactly instead, into float zero points
    (:meth:`slimtune.delta.qalora.QALoraLinear.merged_quant_layer`).

    Returns:
        ``{"layers": n, "requantized": n, "merged_exactly": n, "requant_rel_error_mean": float | None,
        "requant_rel_error_max": ...}``
    """
    errors, exact = [], []
    found = _lora(model, name)
    unload_heads_(model, name)
    for qualified, wrapper in reversed(found):
        inner = wrapper.base_layer
        if _is_quant(_innermost(inner)):
            if inner is not _innermost(inner):
                raise SlimTuneError(f"{qualified}: another delta sits between this LoRA and its quantized weight",
                                    "merge or detach the inner delta first")
            exact_merge = getattr(wrapper, "merged_quant_layer", None)  # QA-LoRA (delta/qalora.py): exact, no rounding to codes
            if exact_merge is not None:
                merged = exact_merge()
                exact.append(qualified)
            else:
                merged, err = requantize(inner, wrapper.merged_weight())
                errors.append(err)
        else:
            wrapper.merge()
            wrapper._original = None
            wrapper.merged = False
            merged = inner
        _replace(model, qualified, merged)
    return {"layers": len(found), "requantized": len(errors), "merged_exactly": len(exact),
            "requant_rel_error_mean": float(sum(errors) / len(errors)) if errors else None,
            "requant_rel_error_max": float(max(errors)) if errors else None}


def requantize(layer: nn.Module, weight: torch.Tensor) -> tuple[nn.Module, float]:
    """A new ``QuantLinear`` of ``layer``'s scheme holding ``weight`` rounded to nearest, and the relative error."""
    from slimtune.compress.quant.linear import QuantLinear
    from slimtune.compress.quant.rtn import quantize_rtn
    from slimtune.compress.kernels.reference import dequantize

    new = QuantLinear.from_packed(layer, layer.scheme, quantize_rtn(weight.float(), layer.scheme, "merged LoRA"), layer.act_bits)
    back = dequantize(new.qweight, new.scales, new.zeros, new.bits, new.group_size, new.in_features)
    err = float((back - weight.float()).norm() / weight.float().norm().clamp_min(1e-12))
    return new, err


def _lora(model: nn.Module, name: str) -> list[tuple[str, LoraLinear]]:
    return wrappers_of(model, name, LoraLinear, "LoRA")


# ---------------------------------------------------------------- the stage
from pydantic import Field  # noqa: E402

from slimtune.registry import register_stage  # noqa: E402
from slimtune.delta.stage import DeltaConfig, DeltaStage  # noqa: E402


class LoraConfig(DeltaConfig):
    """``lora: {rank: 8, alpha: 16, targets: [query, value]}``."""

    targets: list[str] = Field(default_factory=lambda: ["query", "value"],
                               description="roles (query, key, value, attn_out, ffn_in, ffn_out), all-linear, globs or re:regexes")
    exclude: list[str] = Field(default_factory=list, description="globs or re:regexes of modules to leave alone")
    types: list[str] | None = Field(None, description="only modules of these classes (Linear, QuantLinear, Conv1D)")
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    rslora: bool = Field(False, description="scale by alpha / sqrt(rank) instead of alpha / rank")
    dora: bool = Field(False, description="weight-decomposed LoRA (a trained magnitude per output row)")
    quant_aware: bool = Field(False, description="QA-LoRA over quantized weights: an update constant within each "
                              "quantization group, merged into the INT4 format exactly (INT4 bases only)")


@register_stage("lora")
class Lora(DeltaStage):
    """Train a LoRA delta on the artifact's model (float or quantized)."""

    Config = LoraConfig
    mergeable = True

    def attach(self, ctx, model, config: LoraConfig, name: str) -> list[str]:
        return add_lora_(model, config.targets, config.rank, config.alpha, config.dropout, config.rslora, config.dora,
                         name, config.exclude, config.types, freeze=False, quant_aware=config.quant_aware)

    def merge(self, model, name: str) -> dict:
        return merge_and_unload_(model, name)
