"""Prefix-tuning (Li & Liang, 2021): trained keys and values in front of every attention layer's own.

Every self-attention layer ``l`` attends to ``P`` trained key/value pairs (the
prefix; ``P = num_virtual_tokens``) besides the input's own::

    attn_l(x) = softmax(q [K_l^p; K_l x]^T / sqrt(d)) [V_l^p; V_l x],   K_l^p, V_l^p: (kv_heads_l, P, head_dim_l)

For classification with encoders this is P-tuning v2 (Liu et al., 2022).
Training reparameterises the prefix, as the paper (section 4.3) and PEFT's
``prefix_projection`` do, since the raw tensor trains unstably::

    prefix = MLP(E),   E: (P, hidden_size),   MLP: Linear(hidden_size, h) -> tanh -> Linear(h, sum_l 2 kv_heads_l head_dim_l)

After training, :func:`finalize_` (the ``prefix`` stage calls it) computes the
prefix once, drops ``E`` and the MLP and keeps the ``(P, width)`` prefix itself
as the parameter: the saved delta holds only the final prefixes.
``projection=False`` trains that tensor directly from the start.

How the prefix reaches the attention, with nothing patched: :class:`PrefixTuning`
wraps the model's transformer body (``model.bert``, ``model.model``: the
module ``base_model_prefix`` names) and calls it with a transformers key/value
cache that already holds the prefix (:class:`PrefixCache`, a ``DynamicCache``)
and an attention mask widened by ``P`` always-visible columns in front. Each
attention layer's own ``cache.update`` returns ``[prefix; keys]``, so the
model's attention code (eager, SDPA, any attention interface) runs as it is.

* The prefix takes no position. ``PrefixCache.get_seq_length`` counts only
  real tokens, so the models derive the position ids the input has without a
  prefix (BERT's absolute positions stay those it was trained on; Llama's
  RoPE positions are those ``generate`` computes from its own mask), while the
  causal mask's offsets come from the cache layers, whose lengths include the
  prefix.
* Encoders (BERT family): ``BertModel`` takes a cache even as an encoder; its
  layers call ``cache.update`` and its bidirectional mask takes the key length
  from the widened mask.
* Decoders (Llama family), and ``generate``: the first step gets an empty
  ``DynamicCache`` from ``generate``; the wrapper uses a fresh ``PrefixCache``
  instead and returns it in the output, and ``generate`` passes that on to the
  next steps, where the prefix is already in place. A cache the caller passes
  must be one this model returned (``outputs.cache``) or an empty one.

Limits: model types whose layout :mod:`slimtune.arch` knows and whose forward
takes a cache (BERT, RoBERTa, XLM-R, CamemBERT, ERNIE; Llama, SmolLM2,
Mistral, Qwen2); others are refused by name (DistilBERT has no key/value cache
path at all). A task model is needed (the body must have a parent to be
wrapped in; a bare ``AutoModel``, as the embedding task loads, is refused).
One prefix per model; other deltas nest with it in either order (targeting
looks through the wrapper). ONNX export
traces the wrapper: the final prefix is a constant of the graph, and a
decoder exports without a cache (whole-sequence logits), as every decoder here.
transformers' gradient checkpointing drops the cache, so training with
activation checkpointing is refused. In sliding-window layers (Mistral) the
prefix slides out of the window like any old token.
"""

from __future__ import annotations

import inspect

import torch
from torch import nn
from transformers.cache_utils import DynamicCache

from slimtune import arch
from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type
from slimtune.delta.inject import DEFAULT, DeltaLayer, _innermost, delta_names, delta_parameter_count, deltas, freeze_backbone_, wrap_

SUPPORTED = tuple(t for family in arch.FAMILIES for t in family.model_types)


# ---------------------------------------------------------------- tensors
def split_prefix(flat: torch.Tensor, layout: list[tuple[int, int]], batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """``(P, sum_l 2 kv_l d_l)`` -> per layer ``(keys, values)``, each ``(batch, kv_l, P, d_l)``.

    Layer ``l``'s columns hold its keys then its values, head by head.
    """
    out, start = [], 0
    for kv_heads, head_dim in layout:
        width = 2 * kv_heads * head_dim
        block = flat[:, start:start + width].view(-1, 2, kv_heads, head_dim)  # (P, 2, kv, d)
        block = block.permute(1, 2, 0, 3)  # (2, kv, P, d)
        out.append((block[0].expand(batch, -1, -1, -1), block[1].expand(batch, -1, -1, -1)))
        start += width
    return out


def widen_mask(mask: torch.Tensor | None, prefix_length: int, batch: int, keys: int, device) -> torch.Tensor:
    """An attention mask over the input's ``keys`` key positions, with ``prefix_length`` visible columns in front.

    Args:
        mask: ``(B, keys)`` (1 = attend), a 4D ``(B, 1, Q, keys)`` mask (bool: True = attend; float:
            added to the scores, 0 = attend), or None (every key visible).

    Returns:
        ``(B, P + keys)`` (from None or 2D) or ``(B, 1, Q, P + keys)``.
    """
    if mask is None:
        return torch.ones(batch, prefix_length + keys, dtype=torch.long, device=device)
    if mask.dim() == 2:
        return torch.cat([mask.new_ones(mask.shape[0], prefix_length), mask], dim=-1)
    if mask.dim() == 4:
        visible = torch.ones_like(mask[..., :1]) if mask.dtype == torch.bool else torch.zeros_like(mask[..., :1])
        return torch.cat([visible.expand(*mask.shape[:-1], prefix_length), mask], dim=-1)
    raise SlimTuneError(f"attention_mask of shape {tuple(mask.shape)}: prefix-tuning widens 2D (batch, keys) "
                        "or 4D (batch, 1, queries, keys) masks", "pass a 2D padding mask")


# ---------------------------------------------------------------- the cache
class PrefixCache(DynamicCache):
    """A ``DynamicCache`` whose layers start with a prefix that counts as no tokens.

    ``get_seq_length`` (which models read to place positions and ``generate``
    to slice its inputs) counts real tokens only; the layers' own lengths
    (which size the attention mask) and ``get_query_offset`` (the causal mask's
    query offset) include the prefix.
    """

    def __init__(self, key_values: list[tuple[torch.Tensor, torch.Tensor]], owner: str):
        super().__init__()
        for layer_idx, (keys, values) in enumerate(key_values):
            super().update(keys, values, layer_idx)
        self.prefix_length = key_values[0][0].shape[-2]
        self.owner = owner  # the name of the delta whose prefix this is

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx] if layer_idx < len(self.layers) else None
        if layer is not None and layer.keys is not None and layer.keys.dtype != key_states.dtype:
            # Under autocast the projections compute in half precision while the prefix is a float parameter.
            layer.keys, layer.values = layer.keys.to(key_states.dtype), layer.values.to(value_states.dtype)
        return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(super().get_seq_length(layer_idx) - self.prefix_length, 0)

    def get_query_offset(self, layer_idx: int = 0) -> int:
        return super().get_seq_length(layer_idx)


# ---------------------------------------------------------------- the module
def prefix_layout(body: nn.Module) -> list[tuple[int, int]]:
    """``(kv_heads, head_dim)`` of every attention layer of a transformer body (pruned layers may differ)."""
    return [(a.kv_heads, a.head_dim) for a in (arch.attention(body, i) for i in range(arch.num_layers(body)))]


@register_module_type
class PrefixTuning(DeltaLayer):
    """A prefix-tuning delta around a transformer body (see the module docstring).

    Attribute access the wrapper does not answer goes to the wrapped body, so
    ``model.bert.embeddings`` and ``model.model.layers`` (and what transformers
    and :mod:`slimtune.arch` ask of a body) still resolve.
    """

    method = "prefix"

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT, num_virtual_tokens: int = 20,
                 projection: bool = True, hidden: int | None = None):
        super().__init__(base_layer, name)
        check_supported(base_layer)
        _check_sizes(num_virtual_tokens, hidden)
        self.layout = prefix_layout(base_layer)
        self.num_virtual_tokens = num_virtual_tokens
        self.width = sum(2 * kv * d for kv, d in self.layout)
        hidden_size = base_layer.config.hidden_size
        self.hidden = (hidden or hidden_size) if projection else None
        self.projection = projection
        like = next(p for p in base_layer.parameters() if p.is_floating_point())
        factory = {"dtype": like.dtype, "device": like.device}
        if projection:
            # As PEFT's PrefixEncoder: an embedding of the virtual tokens, then Linear -> tanh -> Linear.
            self.embedding = nn.Embedding(num_virtual_tokens, hidden_size, **factory)
            self.mlp = nn.Sequential(nn.Linear(hidden_size, self.hidden, **factory), nn.Tanh(),
                                     nn.Linear(self.hidden, self.width, **factory))
        else:
            self.prefix = nn.Parameter(torch.randn(num_virtual_tokens, self.width, **factory))  # PEFT: an nn.Embedding's N(0, 1)
        self._positional = [p.name for p in inspect.signature(base_layer.forward).parameters.values()
                            if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]

    # -- the prefix --------------------------------------------------------------
    def prefix_tensor(self) -> torch.Tensor:
        """``(P, width)``: every layer's prefix keys and values (see :func:`split_prefix`)."""
        return self.mlp(self.embedding.weight) if self.projection else self.prefix

    def key_values(self, batch: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Per layer ``(keys, values)``, each ``(batch, kv_heads, P, head_dim)``."""
        return split_prefix(self.prefix_tensor(), self.layout, batch)

    @torch.no_grad()
    def finalize(self) -> None:
        """Replace the reparameterisation (embedding and MLP) by the prefix it computes; a no-op without one."""
        if not self.projection:
            return
        trains = self.embedding.weight.requires_grad
        prefix = self.prefix_tensor().detach().clone()
        del self.embedding, self.mlp
        self.prefix = nn.Parameter(prefix, requires_grad=trains)
        self.projection, self.hidden = False, None

    # -- forward -----------------------------------------------------------------
    def forward(self, *args, **kwargs):
        if not self.active:
            return self.base_layer(*args, **kwargs)
        kwargs.update(zip(self._positional, args))
        given = kwargs.pop("cache", None)
        given = kwargs.pop("past_key_values", None) if given is None else given
        self._refuse_gradient_checkpointing()
        inputs = kwargs.get("input_ids")
        inputs = kwargs.get("inputs_embeds") if inputs is None else inputs
        batch, length = inputs.shape[0], inputs.shape[1]
        cache = self._cache(given, batch, length, kwargs.get("attention_mask"))
        kwargs["attention_mask"] = widen_mask(kwargs.get("attention_mask"), self.num_virtual_tokens, batch,
                                              cache.get_seq_length() + length, inputs.device)
        out = self.base_layer(cache=cache, **kwargs)
        use_cache = kwargs.get("use_cache")
        if given is None and not (getattr(self.base_layer.config, "use_cache", False) if use_cache is None else use_cache):
            if getattr(out, "cache", None) is not None:
                out.cache = None  # as the body without a prefix would: no cache asked for, none returned
        return out

    def _cache(self, given, batch: int, length: int, mask: torch.Tensor | None) -> PrefixCache:
        """The cache to run with: ``given`` if it holds this prefix, else a fresh one (``given`` must be empty)."""
        if isinstance(given, PrefixCache):
            if given.owner != self.delta_name or given.prefix_length != self.num_virtual_tokens:
                raise SlimTuneError(f"the key/value cache passed holds prefix {given.owner!r}, not {self.delta_name!r}",
                                    "pass the cache this model returned (outputs.cache), or none")
            return given
        if given is not None and given.get_seq_length() > 0:
            raise SlimTuneError(f"the key/value cache passed holds {given.get_seq_length()} tokens but not prefix "
                                f"{self.delta_name!r} (it was filled without the prefix)",
                                "pass the cache this model returned (outputs.cache), or none")
        if mask is not None and mask.dim() == 2 and mask.shape[-1] != length:
            raise SlimTuneError(f"attention_mask covers {mask.shape[-1]} positions but the input has {length} and the "
                                "cache passed holds none (a cache must be passed on as the model returns it)",
                                "pass outputs.cache of the previous call, or a mask over the input alone")
        return PrefixCache(self.key_values(batch), self.delta_name)

    def _refuse_gradient_checkpointing(self) -> None:
        if self.training and torch.is_grad_enabled() and any(
                getattr(m, "gradient_checkpointing", False) is True for m in self.base_layer.modules()):
            raise SlimTuneError("prefix-tuning reaches the attention through the key/value cache, which transformers' "
                                "gradient checkpointing drops", "train without activation checkpointing "
                                "(train.activation_checkpointing: false in a recipe)")

    # -- artifact protocol -------------------------------------------------------
    def config(self) -> dict:
        return {"num_virtual_tokens": self.num_virtual_tokens, "projection": self.projection, "hidden": self.hidden}

    def extra_repr(self) -> str:
        form = f"projection: hidden={self.hidden}" if self.projection else "prefix stored"
        return (f"{super().extra_repr()}, num_virtual_tokens={self.num_virtual_tokens}, "
                f"layers={len(self.layout)}, width={self.width}, {form}")


def _check_sizes(num_virtual_tokens, hidden) -> None:
    if isinstance(num_virtual_tokens, bool) or not isinstance(num_virtual_tokens, int) or num_virtual_tokens < 1:
        raise SlimTuneError(f"num_virtual_tokens={num_virtual_tokens!r}: a prefix needs at least one virtual token",
                            "use a positive integer (Li & Liang use 10 for table-to-text; P-tuning v2 uses 20-100)")
    if hidden is not None and (isinstance(hidden, bool) or not isinstance(hidden, int) or hidden < 1):
        raise SlimTuneError(f"hidden={hidden!r}: the reparameterisation MLP needs a positive width",
                            "use a positive integer, or leave it unset (the model's hidden size)")


def check_supported(model: nn.Module) -> None:
    """Refuse a model (task model or body) whose attention takes no prefix through a key/value cache.

    Raises:
        SlimTuneError: naming the model type and the types that work.
    """
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    body = _innermost(arch.base_model(model))
    takes_cache = any(n in inspect.signature(body.forward).parameters for n in ("cache", "past_key_values"))
    if model_type not in SUPPORTED or not takes_cache:
        why = "has no key/value cache path" if not takes_cache else "has an attention layout SlimTune does not know"
        raise SlimTuneError(f"prefix-tuning needs a key/value cache to hand its prefix to the attention: model type "
                            f"{model_type!r} {why}", f"use a model of type {', '.join(SUPPORTED)}; or another delta "
                            "(lora, adapter, bitfit) on this one")


def add_prefix_(model: nn.Module, num_virtual_tokens: int = 20, projection: bool = True, hidden: int | None = None,
                name: str = DEFAULT, train: list[str] | tuple = (), freeze: bool = True) -> list[str]:
    """Wrap the transformer body of ``model`` in a :class:`PrefixTuning` delta named ``name``, in place.

    Args:
        num_virtual_tokens: the prefix length ``P``.
        projection: train through the reparameterisation MLP (drop it after with :func:`finalize_`);
            False trains the ``(P, width)`` prefix directly.
        hidden: the MLP's width (default: the model's hidden size).
        train: parameter-name globs that train besides the delta (e.g. a task head), when ``freeze``.
        freeze: freeze everything else (the default).

    Returns:
        The qualified name of the wrapped body (``["bert"]``, ``["model"]``).

    Raises:
        SlimTuneError: ``num_virtual_tokens`` or ``hidden`` not positive, a model type without a
            key/value cache path, a model without a task head around its body, a second prefix, or
            a delta ``name`` already attached.
    """
    _check_sizes(num_virtual_tokens, hidden)
    check_supported(model)
    if name in delta_names(model):
        raise SlimTuneError(f"a delta named {name!r} is already attached", "choose another name or detach_ it first")
    body = getattr(model, "base_model_prefix", "")
    if not body or not isinstance(getattr(model, body, None), nn.Module):
        raise SlimTuneError(f"prefix-tuning wraps the transformer body inside a task model; {type(model).__name__} "
                            "is a bare body", "load the model with its task head (AutoModelForSequenceClassification, "
                            "AutoModelForCausalLM); the embedding task's bare model takes no prefix")
    other = [n for n, m in deltas(model) if isinstance(m, PrefixTuning)]
    if other:
        raise SlimTuneError(f"prefix-tuning wraps {body!r}, but a prefix is already attached at {other[0]}",
                            "one prefix per model: detach_ the other one, or give it more virtual tokens")
    wrap_(model, body, lambda m: PrefixTuning(m, name, num_virtual_tokens, projection, hidden))
    if freeze:
        freeze_backbone_(model, train)
    return [body]


def finalize_(model: nn.Module, name: str = DEFAULT) -> int:
    """Drop the reparameterisation MLP of prefix ``name``, keeping the prefix it computes; returns the wrappers changed."""
    found = [w for _, w in deltas(model, name) if isinstance(w, PrefixTuning)]
    if not found:
        raise SlimTuneError(f"no prefix delta named {name!r} is attached", f"attached: {delta_names(model) or 'none'}")
    changed = sum(w.projection for w in found)
    for w in found:
        w.finalize()
    return changed


# ---------------------------------------------------------------- the stage
from pydantic import Field  # noqa: E402

from slimtune.registry import register_stage  # noqa: E402
from slimtune.stage import CompositionError  # noqa: E402
from slimtune.delta.stage import DeltaConfig, DeltaStage  # noqa: E402


class PrefixConfig(DeltaConfig):
    """``prefix: {num_virtual_tokens: 20, projection: true}``."""

    num_virtual_tokens: int = Field(20, ge=1, description="prefix length P: virtual key/value positions per layer")
    projection: bool = Field(True, description="train through a reparameterisation MLP (dropped after training)")
    hidden: int | None = Field(None, ge=1, description="the MLP's width (default: the model's hidden size)")


@register_stage("prefix")
class Prefix(DeltaStage):
    """Train a prefix on the artifact's model; the saved delta holds the final prefixes only."""

    Config = PrefixConfig

    @classmethod
    def compose(cls, config, state, this: str):
        model_type = state.model_type
        if model_type is not None and model_type not in SUPPORTED:
            raise CompositionError(f"{this}: prefix-tuning needs a key/value cache to hand its prefix to the attention; "
                                   f"model type {model_type!r} has none SlimTune can use",
                                   f"use a model of type {', '.join(SUPPORTED)}; or another delta (lora, adapter, bitfit)")
        if "prefix" in state.delta_methods:
            raise CompositionError(f"{this}: an earlier stage already attached a prefix (one prefix per model)",
                                   "give the first prefix stage more virtual tokens instead")
        return super().compose(config, state, this)

    def attach(self, ctx, model, config: PrefixConfig, name: str) -> list[str]:
        if getattr(ctx.train, "activation_checkpointing", False):
            raise SlimTuneError("prefix-tuning reaches the attention through the key/value cache, which transformers' "
                                "gradient checkpointing drops", "set train.activation_checkpointing: false")
        return add_prefix_(model, config.num_virtual_tokens, config.projection, config.hidden, name, freeze=False)

    def run(self, ctx, config: PrefixConfig):
        result = super().run(ctx, config)
        name = self.delta_name(config)
        finalize_(result.artifact.model, name)
        result.metrics["delta_parameters"] = delta_parameter_count(result.artifact.model, name)
        return result
