"""Ladder side-tuning (LST; Sung, Cho and Bansal, 2022, "LST: Ladder Side-Tuning for Parameter and Memory
Efficient Transfer Learning").

A small *side network* learns beside a frozen backbone and reads the
backbone's hidden states through gated *ladder* connections. The backbone runs
under ``torch.no_grad()``: it keeps no activations for backward and no
gradient ever flows through it, which is what saves the training memory that
LoRA or adapters spend on back-propagating through every block. The backbone
may be quantized or pruned; it is only read.

:class:`LadderSideNetwork` wraps the model's *base model* (``model.bert``,
``model.model``: ``model.base_model_prefix`` names it), asks it for its hidden
states (``output_hidden_states=True``; ``h_0`` the embeddings' output, ``h_i``
block ``i``'s), and computes, for the chosen backbone blocks ``l_1 < ... < l_n``::

    s_0 = down_0(h_0)                                                # (B, T, H) -> (B, T, H / r)
    s_j = block_j(g_j * down_j(h_{l_j + 1}) + (1 - g_j) * s_{j-1}),   g_j = sigmoid(alpha_j / T)
    out = h_last + up(norm(s_n))            (residual, the default; ``up`` starts at zero)
    out = up(norm(s_n))                     (residual=False: the paper's output, ``up`` random)

``r`` is the reduction factor, ``alpha_j`` (initialised to 0, so ``g_j = 0.5``)
and ``T`` the paper's learned gate and its temperature. The side blocks are
pre-LN transformer blocks of width ``H / r`` (attention over the same padding
mask, causal when the backbone is a decoder; a GELU MLP of width
``intermediate_size / r``), written here once for every family rather than
reusing each family's own block class, whose calling conventions (rotary
embeddings, mask formats, caches) differ per family: the side network gets
token positions through the ladders, from the backbone's states.

The wrapper returns the base model's own output type with ``last_hidden_state``
replaced by ``out``, so the task head (LM head, classifier) reads the side
network. Where the base model has a pooler (BERT), ``pooler_output`` is the
backbone's own frozen pooler applied to ``out``: gradients pass through it to
the side network, its weights stay as they are. With ``residual`` the
up-projection starts at zero, so a fresh LST leaves the model's outputs
exactly unchanged (as LoRA's ``B = 0`` does) and training starts from the
backbone's predictions; ``residual=False`` is the paper's design, where the
task head reads the side network alone.

Limits: the side network is initialised randomly (the paper's initialisation
from a structurally pruned copy of the backbone is not done); it keeps no
key/value cache, so generate with ``use_cache=False``; it cannot be merged; the
backbone must be a base model inside a task model (``...ForSequenceClassification``,
``...ForCausalLM``) of a family :mod:`slimtune.arch` knows, whose forward
returns ``hidden_states``. A delta attached inside the backbone it wraps would
run under ``no_grad`` with it, so it would not train.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from slimtune import arch
from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.delta.inject import DEFAULT, DeltaLayer, delta_names, freeze_backbone_, wrap_


# ---------------------------------------------------------------- tensor functions
def side_mask(attention_mask: torch.Tensor | None, length: int, causal: bool, device) -> torch.Tensor:
    """``(B or 1, 1, T, T)`` bool: may query ``t`` attend key ``s``.

    Keys must be real tokens (``attention_mask``, ``(B, T)`` of 0/1) and, for a
    decoder, not in the future. A query always sees itself, so no row is all
    masked (a left-padded decoder's first pads would otherwise give NaN).
    """
    pos = torch.arange(length, device=device)
    keep = pos[None, :] <= pos[:, None] if causal else torch.ones(length, length, dtype=torch.bool, device=device)  # (T, T)
    keep = keep[None, None]  # (1, 1, T, T)
    if attention_mask is not None:
        keep = keep & attention_mask.bool()[:, None, None, :]  # (B, 1, T, T)
    return keep | (pos[None, :] == pos[:, None])


class SideBlock(nn.Module):
    """One pre-LN transformer block of the side network: ``x + attn(LN(x))``, then ``+ MLP(LN(x))``."""

    def __init__(self, width: int, heads: int, ffn_width: int, dropout: float = 0.0, **factory):
        super().__init__()
        self.heads = heads
        self.attn_norm = nn.LayerNorm(width, **factory)
        self.qkv = nn.Linear(width, 3 * width, **factory)
        self.attn_out = nn.Linear(width, width, **factory)
        self.ffn_norm = nn.LayerNorm(width, **factory)
        self.ffn_in = nn.Linear(width, ffn_width, **factory)
        self.ffn_out = nn.Linear(ffn_width, width, **factory)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, T, W = x.shape
        q, k, v = self.qkv(self.attn_norm(x)).reshape(B, T, 3, self.heads, W // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (B, h, T, d)
        a = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # (B, h, T, d)
        x = x + self.dropout(self.attn_out(a.transpose(1, 2).reshape(B, T, W)))  # (B, T, W)
        return x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(self.ffn_norm(x)))))


# ---------------------------------------------------------------- the wrapper
@register_module_type
class LadderSideNetwork(DeltaLayer):
    """An LST side network around a frozen base model (see the module docstring).

    Args:
        base_layer: the base model (``BertModel``, ``LlamaModel``, ...); its forward must return ``hidden_states``.
        layers: the backbone blocks whose outputs feed a side block each, ascending.
        hidden_size: the backbone's width ``H``.
        width, heads, ffn_width: the side blocks' width (``H / r``), attention heads and MLP width.
        temperature: ``T`` of the gates ``sigmoid(alpha / T)``.
        residual: add the side output to the backbone's last hidden state (``up`` starts at zero).
        causal: the side attention is causal (a decoder backbone).
    """

    method = "ladder"

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, layers: list[int] = (), hidden_size: int = 0,
                 width: int = 0, heads: int = 1, ffn_width: int = 0, temperature: float = 0.1, residual: bool = True,
                 dropout: float = 0.0, causal: bool = False):
        super().__init__(base_layer, name)
        self.layers, self.hidden_size, self.width, self.heads = [int(i) for i in layers], hidden_size, width, heads
        self.ffn_width, self.temperature, self.residual = ffn_width, float(temperature), residual
        self.dropout_p, self.causal = float(dropout), causal
        self._inputs = _positional_names(base_layer)
        self._takes_use_cache = "use_cache" in inspect.signature(base_layer.forward).parameters
        factory = _factory(base_layer)
        self.down = nn.ModuleList([nn.Linear(hidden_size, width, **factory) for _ in range(len(self.layers) + 1)])
        self.alpha = nn.Parameter(torch.zeros(len(self.layers), **factory))  # (n,) gate logits: g = 0.5 at start
        self.blocks = nn.ModuleList([SideBlock(width, heads, ffn_width, dropout, **factory) for _ in self.layers])
        self.norm = nn.LayerNorm(width, **factory)
        self.up = nn.Linear(width, hidden_size, **factory)
        if residual:
            nn.init.zeros_(self.up.weight)
            nn.init.zeros_(self.up.bias)

    def side(self, hidden: tuple[torch.Tensor, ...], attention_mask: torch.Tensor | None) -> torch.Tensor:
        """The side network on the backbone's hidden states ``(h_0, ..., h_L)``, each ``(B, T, H)`` -> ``(B, T, H)``."""
        dtype = self.up.weight.dtype
        mask = side_mask(attention_mask, hidden[0].shape[1], self.causal, hidden[0].device)  # (B, 1, T, T)
        s = self.down[0](hidden[0].to(dtype))  # (B, T, W)
        gates = torch.sigmoid(self.alpha / self.temperature)  # (n,)
        for j, i in enumerate(self.layers):
            s = gates[j] * self.down[j + 1](hidden[i + 1].to(dtype)) + (1 - gates[j]) * s  # (B, T, W)
            s = self.blocks[j](s, mask)
        return self.up(self.norm(s))  # (B, T, H)

    def forward(self, *args, **kwargs):
        if not self.active:
            return self.base_layer(*args, **kwargs)
        kwargs.update(zip(self._inputs, args))
        return_dict = kwargs.pop("return_dict", None)
        want_hidden = kwargs.pop("output_hidden_states", None)
        out = self.read_backbone(kwargs)
        side = self.side(out.hidden_states, kwargs.get("attention_mask"))  # (B, T, H)
        last = out.last_hidden_state
        fields = dict(out)
        fields["last_hidden_state"] = (last + side.to(last.dtype)) if self.residual else side.to(last.dtype)
        pooler = getattr(self.base_layer, "pooler", None)
        if fields.get("pooler_output") is not None and pooler is not None:
            fields["pooler_output"] = pooler(fields["last_hidden_state"])  # frozen weights; gradients pass to the side
        if not want_hidden:
            fields.pop("hidden_states", None)  # (when asked for, they are the backbone's)
        result = type(out)(**fields)
        return result.to_tuple() if return_dict is False else result

    def read_backbone(self, inputs: dict):
        """The base model's output on ``inputs``, with its hidden states, computed without autograd.

        Raises:
            SlimTuneError: the backbone was given a key/value cache, returns too few hidden
                states, or gets an attention mask that is not ``(B, T)``.
        """
        if inputs.get("cache") is not None or inputs.get("past_key_values") is not None:
            raise SlimTuneError("LST's side network keeps no key/value cache, but the backbone was given one",
                                "generate with use_cache=False (each step then reads the whole sequence)")
        mask = inputs.get("attention_mask")
        if mask is not None and mask.dim() != 2:
            raise SlimTuneError(f"LST reads a (batch, length) padding mask, not a {mask.dim()}-d attention mask",
                                "pass the tokenizer's attention_mask")
        if self._takes_use_cache:
            inputs = {**inputs, "use_cache": False}  # a cache would only hold the frozen backbone's keys and values
        with torch.no_grad():  # the backbone builds no autograd graph and keeps no activations
            out = self.base_layer(**inputs, output_hidden_states=True, return_dict=True)
        hidden = getattr(out, "hidden_states", None)
        if hidden is None or len(hidden) < self.layers[-1] + 2:
            raise SlimTuneError(f"LST cannot read the hidden states of {type(self.base_layer).__name__}: its forward returned "
                                f"{'none' if hidden is None else len(hidden)} (needs block {self.layers[-1]}'s)",
                                "use a backbone whose base model returns hidden_states with output_hidden_states=True")
        return out

    # -- what a task model asks of its base model ---------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.base_layer.get_input_embeddings()

    # -- artifact protocol -------------------------------------------------------
    def config(self) -> dict:
        return {"layers": self.layers, "hidden_size": self.hidden_size, "width": self.width, "heads": self.heads,
                "ffn_width": self.ffn_width, "temperature": self.temperature, "residual": self.residual,
                "dropout": self.dropout_p, "causal": self.causal}

    def extra_repr(self) -> str:
        return (f"{super().extra_repr()}, layers={self.layers}, width={self.width}, heads={self.heads}, "
                f"temperature={self.temperature:g}{', residual' if self.residual else ''}{', causal' if self.causal else ''}")


def _positional_names(module: nn.Module) -> list[str]:
    """Names of ``module.forward``'s parameters that positional arguments fill, in order."""
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return [p.name for p in inspect.signature(module.forward).parameters.values() if p.kind in kinds]


def _factory(module: nn.Module) -> dict:
    """dtype and device of the module's first floating-point parameter (float32 on its device if none)."""
    tensors = [t for t in module.parameters()] + [t for t in module.buffers()]
    floating = next((t for t in tensors if t.is_floating_point()), None)
    device = tensors[0].device if tensors else torch.device("cpu")
    return {"dtype": floating.dtype if floating is not None else torch.float32, "device": device}


def _reads_hidden_states(module: nn.Module) -> bool:
    params = inspect.signature(module.forward).parameters.values()
    return any(p.name == "output_hidden_states" or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


def _default_heads(backbone_heads: int, width: int) -> int:
    """The most heads, at most the backbone's, that divide the side width."""
    return next(h for h in range(min(backbone_heads, width), 0, -1) if width % h == 0)


def add_ladder_(model: nn.Module, reduction: int = 8, layers: list[int] | None = None, heads: int | None = None,
                temperature: float = 0.1, residual: bool = True, dropout: float = 0.0, name: str = DEFAULT,
                train: list[str] | tuple = (), freeze: bool = True) -> list[str]:
    """Attach an LST side network named ``name`` around ``model``'s base model, in place.

    Args:
        model: a transformers task model (``...ForSequenceClassification``, ``...ForCausalLM``) of a
            family :mod:`slimtune.arch` knows, float, quantized or pruned.
        reduction: ``r``: the side network is ``hidden_size // r`` wide (MLP ``intermediate_size // r``).
        layers: the backbone blocks that feed a side block each (default: every block).
        heads: the side blocks' attention heads (default: the most, at most the backbone's, that divide the width).
        temperature: ``T`` of the ladder gates ``sigmoid(alpha / T)``.
        residual: the task head reads ``h_last + up(side)`` with ``up`` starting at zero (a fresh ladder
            changes nothing); False: ``up(side)`` alone, as in the paper.
        dropout: dropout inside the side blocks.
        train: parameter-name globs that train besides the side network (e.g. a task head), when ``freeze``.
        freeze: freeze everything else (the default).

    Returns:
        The qualified name of the wrapped base model (one entry).

    Raises:
        SlimTuneError: a model whose hidden states LST cannot read (an architecture SlimTune does not
            know, a bare base model, a base model without ``output_hidden_states``), a bad layer index,
            a reduction or head count that does not fit, or a delta ``name`` already attached.
    """
    if name in delta_names(model):
        raise SlimTuneError(f"a delta named {name!r} is already attached", "choose another name or detach_ it first")
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    prefix = getattr(model, "base_model_prefix", "")
    base = getattr(model, prefix, None) if prefix else None
    if isinstance(base, DeltaLayer):
        raise SlimTuneError(f"{prefix} is already wrapped by delta {base.delta_name!r} ({type(base).__name__})",
                            "detach_ it first: one ladder per backbone")
    try:
        blocks = arch.num_layers(model)
    except arch.UnknownArchitecture:
        known = ", ".join(t for f in arch.FAMILIES for t in f.model_types)
        raise SlimTuneError(f"LST cannot read the hidden states of model type {model_type!r}: SlimTune does not know its "
                            "layer layout", f"use a model of a type SlimTune knows ({known})") from None
    if not isinstance(base, nn.Module) or base is model:
        raise SlimTuneError(f"LST wraps the base model inside a task model, but {type(model).__name__} is a bare base model "
                            "(no task head reads the side network)",
                            "use a classification or causal-lm task (a ...ForSequenceClassification or ...ForCausalLM model)")
    if not _reads_hidden_states(base):
        raise SlimTuneError(f"LST cannot read the hidden states of {type(base).__name__}: its forward takes no "
                            "output_hidden_states", "use a transformers base model that returns hidden_states")
    layers = arch.check_layer_indices(model, range(blocks) if layers is None else layers, "layers")
    if not layers:
        raise SlimTuneError("layers: no backbone block is chosen", f"list at least one of 0..{blocks - 1}, or leave layers out")
    hidden = model.config.hidden_size
    if not isinstance(reduction, int) or not 1 <= reduction <= hidden:
        raise SlimTuneError(f"reduction {reduction} does not fit hidden size {hidden}", f"use an integer between 1 and {hidden}")
    width = hidden // reduction
    heads = heads or _default_heads(model.config.num_attention_heads, width)
    if width % heads:
        raise SlimTuneError(f"heads {heads} do not divide the side network's width {width} (hidden {hidden} / reduction {reduction})",
                            f"use a divisor of {width}, or leave heads out")
    ffn_width = max(1, getattr(model.config, "intermediate_size", 4 * hidden) // reduction)
    causal = any(getattr(m, "is_causal", False) is True for m in base.modules())  # decoders' attention says so
    wrap_(model, prefix, lambda m: LadderSideNetwork(m, name, layers, hidden, width, heads, ffn_width, temperature,
                                                      residual, dropout, causal))
    if freeze:
        freeze_backbone_(model, train)
    return [prefix]


# ---------------------------------------------------------------- the stage
from pydantic import Field  # noqa: E402

from slimtune.registry import register_stage  # noqa: E402
from slimtune.stage import CompositionError  # noqa: E402
from slimtune.delta.stage import DeltaConfig, DeltaStage  # noqa: E402


class LadderConfig(DeltaConfig):
    """``ladder: {reduction: 8, layers: [0, 2, 4]}``."""

    reduction: int = Field(8, ge=1, description="the side network is hidden_size / reduction wide")
    layers: list[int] | None = Field(None, description="backbone blocks feeding the side network (default: all)")
    heads: int | None = Field(None, ge=1, description="side attention heads (default: the most, up to the backbone's, dividing the width)")
    temperature: float = Field(0.1, gt=0, description="T of the ladder gates sigmoid(alpha / T)")
    residual: bool = Field(True, description="the head reads the backbone's last state plus the side output (a fresh "
                           "ladder changes nothing); false: the side output alone, as in the paper")
    dropout: float = Field(0.0, ge=0, lt=1)


@register_stage("ladder")
class Ladder(DeltaStage):
    """Train a ladder side network beside the artifact's frozen (float or quantized) backbone."""

    Config = LadderConfig

    @classmethod
    def compose(cls, config: LadderConfig, state, this: str):
        if config.layers is not None and state.layers is not None:
            bad = [i for i in config.layers if not 0 <= i < state.layers]
            if bad:
                raise CompositionError(f"{this}: layers {bad} do not exist; the model entering it has {state.layers} blocks",
                                       f"use indices between 0 and {state.layers - 1}")
        return super().compose(config, state, this)

    def attach(self, ctx, model, config: LadderConfig, name: str) -> list[str]:
        return add_ladder_(model, config.reduction, config.layers, config.heads, config.temperature, config.residual,
                           config.dropout, name, freeze=False)
