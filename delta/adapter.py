"""Bottleneck adapters: Houlsby (serial) and parallel adapters.

A bottleneck maps the hidden width ``d`` down to ``size``, applies a
nonlinearity, and maps back up, scaled by ``s``::

    A(h) = s * W_up dropout(act(W_down h + b_down)) + b_up,   W_down: (size, d), W_up: (d, size)

``W_up`` and ``b_up`` start at zero (``W_down`` as an ``nn.Linear``'s default,
Kaiming-uniform), so a fresh adapter adds exactly nothing: the model's outputs
are unchanged bit for bit. This is the initialisation of He et al.'s reference
code and AdapterHub's ``mam_adapter`` option.

* **Houlsby** (Houlsby et al., 2019, "Parameter-Efficient Transfer Learning
  for NLP"): a serial adapter on the output of the attention's output
  projection (role ``attn_out``) and of the FFN's output projection
  (``ffn_out``), before the block's residual add (and, post-LN, its
  LayerNorm): :class:`HoulsbyAdapter` wraps that linear, ``y = W x; y + A(y)``.
  In BERT the block's hidden dropout then follows the adapter (the paper puts
  it before; the two agree in evaluation).
* **Parallel** (He et al., 2022, "Towards a Unified View of
  Parameter-Efficient Transfer Learning"): ``A`` reads the sublayer's input
  ``x`` and is added to its output, ``f(x) + A(x)``; the paper's best
  placement is the FFN, with ``s = 4``. The wrapped module is the one that
  owns the output projection (its parent in the module tree):

  - Llama's ``mlp`` / ``self_attn``, GPT-2's ``mlp`` / ``attn``, T5's
    ``DenseReluDense`` / ``SelfAttention``, DistilBERT's ``ffn`` /
    ``attention`` compute ``f(x)`` alone: :class:`ParallelAdapter` returns
    ``f(x) + A(x)`` (``x`` is the module's first input).
  - BERT's FFN is split into ``intermediate`` (in-projection and activation)
    and ``output`` (out-projection, dropout, residual add and LayerNorm,
    called as ``output(h, x)`` with ``x`` the FFN's input, which is also the
    residual); likewise ``attention.output``. :class:`ResidualParallelAdapter`
    wraps ``output`` and hands it ``x + A(x)`` as the residual, so it computes
    ``LayerNorm(dense(h) + x + A(x))``: the adapter's output added to the
    FFN's output before the residual LayerNorm, as the paper has it, without
    re-implementing any of BERT's code.

Defaults follow AdapterHub's configurations: Houlsby ``reduction_factor`` 16,
``swish``, scaling 1, attention and FFN; parallel ``reduction_factor`` 2,
``relu``, scaling 4, FFN only.

Limits: adapters do not merge into the weights (the nonlinearity is in the
way). A parallel adapter wraps a whole sublayer; a delta attached after it
still finds the projections inside (targets look through wrappers). Families: every family of :mod:`slimtune.arch`'s role
map (BERT/RoBERTa, DistilBERT, GPT-2, Llama/Mistral/Qwen2, T5).
"""

from __future__ import annotations

import inspect
import math
from typing import Literal

import torch
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.delta.inject import (DEFAULT, DeltaLayer, _innermost, delta_names, freeze_backbone_, in_out_features,
                                   select_modules, wrap_)

ACTIVATIONS = {"relu": nn.ReLU, "gelu": nn.GELU, "swish": nn.SiLU, "silu": nn.SiLU, "tanh": nn.Tanh}
KINDS = ("houlsby", "parallel")
WHERE = {"attention": ("attn_out",), "ffn": ("ffn_out",), "both": ("attn_out", "ffn_out")}
# AdapterHub's DoubleSeqBnConfig (Houlsby) and ParBnConfig (He et al.'s parallel adapter).
DEFAULTS = {"houlsby": {"reduction_factor": 16.0, "activation": "swish", "scaling": 1.0, "where": "both"},
            "parallel": {"reduction_factor": 2.0, "activation": "relu", "scaling": 4.0, "where": "ffn"}}


def bottleneck_size(features: int, size: int | None, reduction_factor: float | None, kind: str = "houlsby") -> int:
    """The bottleneck width: ``size`` if given, else ``features // reduction_factor`` (the kind's default factor).

    Raises:
        SlimTuneError: both given, ``size < 1``, or a factor leaving no unit.
    """
    if size is not None and reduction_factor is not None:
        raise SlimTuneError("adapter: give the bottleneck as size or as reduction_factor, not both",
                            "e.g. size: 16, or reduction_factor: 16")
    if size is not None:
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise SlimTuneError(f"adapter size {size!r} is not a positive integer",
                                "use a bottleneck width of 1 or more, e.g. size: 16")
        return size
    factor = DEFAULTS[kind]["reduction_factor"] if reduction_factor is None else reduction_factor
    if not factor > 0 or features // factor < 1:
        raise SlimTuneError(f"adapter reduction_factor {factor!r} leaves no bottleneck unit of a {features}-wide layer",
                            f"use a reduction_factor between 0 and {features}, or give size")
    return int(features // factor)


class Bottleneck(nn.Module):
    """``s * up(dropout(act(down(h))))`` with ``up`` zero: (..., features) -> (..., features)."""

    def __init__(self, features: int, size: int, activation: str = "relu", dropout: float = 0.0, scaling: float = 1.0,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        if activation not in ACTIVATIONS:
            raise SlimTuneError(f"unknown adapter activation {activation!r}", f"use one of: {', '.join(ACTIVATIONS)}")
        self.scaling = float(scaling)
        self.down = nn.Linear(features, size, dtype=dtype, device=device)
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(size, features, dtype=dtype, device=device)
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # nn.Linear's default; He et al.'s "lora" init
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        z = self.dropout(self.act(self.down(h.to(self.down.weight.dtype))))  # (..., size)
        return (self.scaling * self.up(z)).to(h.dtype)  # (..., features)

    def extra_repr(self) -> str:
        return f"scaling={self.scaling:g}"


class _AdapterLayer(DeltaLayer):
    """What the three adapter wrappers share: a :class:`Bottleneck` named ``adapter`` and its config."""

    method = "adapter"

    def __init__(self, base_layer: nn.Module, name: str, features: int, size: int, activation: str,
                 dropout: float, scaling: float):
        super().__init__(base_layer, name)
        if not isinstance(size, int) or size < 1:
            raise SlimTuneError(f"adapter size {size!r} is not a positive integer", "use a bottleneck width of 1 or more")
        weight = next((p for p in base_layer.parameters() if p.is_floating_point()), None)
        device = next((t.device for t in base_layer.parameters()), None) or next((t.device for t in base_layer.buffers()), None)
        self.features, self.size, self.activation, self.dropout_p = features, size, activation, float(dropout)
        self.adapter = Bottleneck(features, size, activation, dropout, scaling,
                                  dtype=weight.dtype if weight is not None else torch.float32, device=device)

    def config(self) -> dict:
        return {"size": self.size, "activation": self.activation, "dropout": self.dropout_p, "scaling": self.adapter.scaling}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, size={self.size}, activation={self.activation}"


@register_module_type
class HoulsbyAdapter(_AdapterLayer):
    """A serial adapter on a linear-like projection's output: ``y = W x; y + A(y)``."""

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, size: int = 16, activation: str = "swish",
                 dropout: float = 0.0, scaling: float = 1.0):
        super().__init__(base_layer, name, in_out_features(base_layer)[1], size, activation, dropout, scaling)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)  # (..., out_features)
        return y + self.adapter(y) if self.active else y


def _output_with(result, added: torch.Tensor):
    """``result + added`` for a tensor, or for the first element of a tuple (attention modules return ``(out, weights)``)."""
    if isinstance(result, tuple):
        return (result[0] + added,) + result[1:]
    return result + added


@register_module_type
class ParallelAdapter(_AdapterLayer):
    """A parallel adapter around a sublayer ``f`` computing its output alone: ``f(x) + A(x)``, ``x`` its first input."""

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, features: int = 0, size: int = 16,
                 activation: str = "relu", dropout: float = 0.0, scaling: float = 4.0):
        super().__init__(base_layer, name, features, size, activation, dropout, scaling)
        self._input = _first_input(base_layer)

    def forward(self, *args, **kwargs):
        result = self.base_layer(*args, **kwargs)
        if not self.active:
            return result
        x = args[0] if args else kwargs[self._input]  # (..., features)
        return _output_with(result, self.adapter(x))

    def config(self) -> dict:
        return {"features": self.features, **super().config()}


@register_module_type
class ResidualParallelAdapter(_AdapterLayer):
    """A parallel adapter around a post-LN sublayer called as ``f(h, x)`` that computes ``LayerNorm(g(h) + x)``.

    ``x`` is both the sublayer's input and its residual (BERT's ``output`` and
    ``attention.output``); handing ``f`` the residual ``x + A(x)`` adds the
    adapter to ``g(h)`` before the LayerNorm.
    """

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, features: int = 0, size: int = 16,
                 activation: str = "relu", dropout: float = 0.0, scaling: float = 4.0):
        super().__init__(base_layer, name, features, size, activation, dropout, scaling)

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        if self.active:
            input_tensor = input_tensor + self.adapter(input_tensor)  # (..., features)
        return self.base_layer(hidden_states, input_tensor)

    def config(self) -> dict:
        return {"features": self.features, **super().config()}


def _first_input(module: nn.Module) -> str:
    params = [p for p in inspect.signature(_innermost(module).forward).parameters.values()
              if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if not params:
        raise SlimTuneError(f"a parallel adapter cannot find the input of {type(_innermost(module)).__name__}",
                            "use kind: houlsby for this model")
    return params[0].name


def _takes_residual(module: nn.Module) -> bool:
    """Whether the sublayer adds the residual itself and takes it as ``input_tensor`` (BERT's post-LN outputs)."""
    return "input_tensor" in inspect.signature(_innermost(module).forward).parameters


# ------------------------------------------------------------------ attaching
def add_adapters_(model: nn.Module, kind: Literal["houlsby", "parallel"] = "houlsby", size: int | None = None,
                  reduction_factor: float | None = None, activation: str | None = None, dropout: float = 0.0,
                  scaling: float | None = None, where: Literal["attention", "ffn", "both"] | None = None,
                  name: str = DEFAULT, train: list[str] | tuple = (), freeze: bool = True) -> list[str]:
    """Attach bottleneck adapters named ``name`` to every block of ``model``, in place (see the module docstring).

    Args:
        kind: ``houlsby`` (serial, after the output projections) or ``parallel`` (beside the sublayer).
        size: bottleneck width; or ``reduction_factor``: width = hidden // factor (default 16 for
            Houlsby, 2 for parallel). Not both.
        activation: ``relu``, ``gelu``, ``swish`` (= ``silu``) or ``tanh`` (default: swish for Houlsby, relu for parallel).
        dropout: on the bottleneck's activations, while training.
        scaling: multiplies the adapter's output (default 1 for Houlsby, 4 for parallel).
        where: ``attention``, ``ffn`` or ``both`` (default: both for Houlsby, ffn for parallel).
        train: parameter-name globs that train besides the adapters (e.g. a task head), when ``freeze``.
        freeze: freeze everything else (the default).

    Returns:
        The qualified names of the wrapped modules.

    Raises:
        SlimTuneError: an unknown kind, where or activation; a bad size or factor; a model
            whose projection roles SlimTune does not know; a delta ``name`` already attached.
    """
    if kind not in KINDS:
        raise SlimTuneError(f"unknown adapter kind {kind!r}", f"use one of: {', '.join(KINDS)}")
    where = where or DEFAULTS[kind]["where"]
    if where not in WHERE:
        raise SlimTuneError(f"unknown adapter placement where={where!r}", f"use one of: {', '.join(WHERE)}")
    activation = activation or DEFAULTS[kind]["activation"]
    if activation not in ACTIVATIONS:
        raise SlimTuneError(f"unknown adapter activation {activation!r}", f"use one of: {', '.join(ACTIVATIONS)}")
    scaling = DEFAULTS[kind]["scaling"] if scaling is None else float(scaling)
    if not 0 <= dropout < 1:
        raise SlimTuneError(f"adapter dropout {dropout!r} is outside [0, 1)", "use e.g. dropout: 0.1")
    if name in delta_names(model):
        raise SlimTuneError(f"a delta named {name!r} is already attached", "choose another name or detach_ it first")
    plan = []  # (qualified name, wrapper class, features): everything is checked before anything is wrapped
    for role in WHERE[where]:
        for projection in select_modules(model, role):
            features = in_out_features(model.get_submodule(projection))[1]
            if kind == "houlsby":
                plan.append((projection, HoulsbyAdapter, features))
            else:
                sublayer = projection.rpartition(".")[0]
                cls = ResidualParallelAdapter if _takes_residual(model.get_submodule(sublayer)) else ParallelAdapter
                plan.append((sublayer, cls, features))
    sizes = [bottleneck_size(features, size, reduction_factor, kind) for _, _, features in plan]
    for (qualified, cls, features), width in zip(plan, sizes):
        extra = {} if cls is HoulsbyAdapter else {"features": features}
        wrap_(model, qualified,
              lambda m: cls(m, name, size=width, activation=activation, dropout=dropout, scaling=scaling, **extra))
    if freeze:
        freeze_backbone_(model, train)
    return [q for q, _, _ in plan]


# ---------------------------------------------------------------- the stage
from pydantic import Field, model_validator  # noqa: E402

from slimtune.registry import register_stage  # noqa: E402
from slimtune.delta.stage import DeltaConfig, DeltaStage  # noqa: E402


class AdapterConfig(DeltaConfig):
    """``adapter: {kind: houlsby, size: 16}`` or ``adapter: {kind: parallel, reduction_factor: 2, scaling: 4}``."""

    kind: Literal["houlsby", "parallel"] = Field("houlsby", description="serial (Houlsby) or parallel (He et al.) adapters")
    size: int | None = Field(None, ge=1, description="bottleneck width (or give reduction_factor)")
    reduction_factor: float | None = Field(None, gt=0, description="bottleneck width = hidden // reduction_factor "
                                           "(default: 16 for houlsby, 2 for parallel)")
    activation: Literal["relu", "gelu", "swish", "silu", "tanh"] | None = Field(
        None, description="the bottleneck's nonlinearity (default: swish for houlsby, relu for parallel)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the bottleneck's activations")
    scaling: float | None = Field(None, gt=0, description="multiplies the adapter's output (default: 1 houlsby, 4 parallel)")
    where: Literal["attention", "ffn", "both"] | None = Field(
        None, description="which sublayers get adapters (default: both for houlsby, ffn for parallel)")

    @model_validator(mode="after")
    def _one_width(self):
        if self.size is not None and self.reduction_factor is not None:
            raise ValueError("give the bottleneck as size or as reduction_factor, not both")
        return self


@register_stage("adapter")
class Adapter(DeltaStage):
    """Train bottleneck adapters (Houlsby or parallel) on the artifact's model."""

    Config = AdapterConfig

    def attach(self, ctx, model, config: AdapterConfig, name: str) -> list[str]:
        return add_adapters_(model, config.kind, config.size, config.reduction_factor, config.activation, config.dropout,
                             config.scaling, config.where, name, freeze=False)
