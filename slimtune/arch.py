"""Where things are inside a transformer: the one place that knows architectures.

Distillation (students from a subset of the teacher's layers), structured
pruning (heads, FFN neurons, layers), parameter sharing (groups of layers)
and AWQ and GPTQ quantization (which linears share an input, in which order:
:func:`input_groups`)
all ask this module where the blocks, the attention projections and the FFN
projections of a model are, and how to rewrite its config after surgery. No
algorithm branches on ``model_type`` itself.

Two families are known:

* ``bert`` (BERT, RoBERTa, XLM-R, MiniLM - post-LN encoders): blocks at
  ``<base>.encoder.layer``; ``attention.self.{query,key,value}``,
  ``attention.output.dense``, ``intermediate.dense``, ``output.dense``.
* ``llama`` (Llama, SmolLM2, Mistral, Qwen2 - pre-LN decoders with grouped-query
  attention): blocks at ``<base>.layers``; ``self_attn.{q,k,v,o}_proj``,
  ``mlp.{gate,up,down}_proj``; ``config.head_dim`` is explicit, so fewer heads
  keep their width.

Anything else raises :class:`UnknownArchitecture` naming the model type.
"""

from __future__ import annotations

import copy
import fnmatch
import re
from dataclasses import dataclass

from torch import nn

from slimtune.errors import SlimTuneError


class UnknownArchitecture(SlimTuneError):
    pass


@dataclass(frozen=True)
class Attention:
    """The projections of one block's attention and its head layout.

    ``q``/``k``/``v`` are ``(heads * head_dim, hidden)`` linears (k and v have
    ``kv_heads`` heads), ``o`` is ``(hidden, heads * head_dim)``. Query head
    ``h`` reads key/value head ``h // (heads // kv_heads)``.
    """

    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    heads: int
    kv_heads: int
    head_dim: int


@dataclass(frozen=True)
class FFN:
    """``inputs`` map hidden -> neurons (gate and up, or one dense); ``output`` maps neurons -> hidden."""

    inputs: tuple[nn.Linear, ...]
    output: nn.Linear


@dataclass(frozen=True)
class Family:
    name: str
    model_types: tuple[str, ...]
    layers_path: str  # under the base model
    q: str
    k: str
    v: str
    o: str
    attention: str  # the module holding the head-count attributes
    ffn_inputs: tuple[str, ...]
    ffn_output: str


FAMILIES = (
    Family("bert", ("bert", "roberta", "xlm-roberta", "camembert", "ernie"), "encoder.layer",
           "attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
           "attention.self", ("intermediate.dense",), "output.dense"),
    Family("llama", ("llama", "mistral", "qwen2"), "layers",
           "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
           "self_attn", ("mlp.gate_proj", "mlp.up_proj"), "mlp.down_proj"),
)


def family_of(model: nn.Module) -> Family:
    """The family of a transformers model (base or with a head)."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for family in FAMILIES:
        if model_type in family.model_types:
            return family
    known = ", ".join(t for f in FAMILIES for t in f.model_types)
    raise UnknownArchitecture(
        f"SlimTune does not know the layer layout of model type {model_type!r}",
        f"structured compression supports model types: {known}",
    )


def base_model(model: nn.Module) -> nn.Module:
    """The transformer body without a task head (``model.bert``, ``model.model``, or the model itself)."""
    return getattr(model, "base_model", model)


def layers(model: nn.Module) -> nn.ModuleList:
    """The model's list of transformer blocks."""
    return base_model(model).get_submodule(family_of(model).layers_path)


def num_layers(model: nn.Module) -> int:
    return len(layers(model))


def attention(model: nn.Module, index: int) -> Attention:
    """The attention projections and head layout of block ``index``."""
    family, block = family_of(model), layers(model)[index]
    module = block.get_submodule(family.attention)
    q = block.get_submodule(family.q)
    k = block.get_submodule(family.k)
    head_dim = _head_dim(model, module)
    heads = q.out_features // head_dim  # from the weights: right after head pruning, whatever the config says
    kv_heads = k.out_features // head_dim
    return Attention(module, q, k, block.get_submodule(family.v), block.get_submodule(family.o), heads, kv_heads, head_dim)


def _head_dim(model: nn.Module, module: nn.Module) -> int:
    """Width of one head: the attention module's own attribute, else the config's."""
    config = model.config
    return (getattr(module, "attention_head_size", None) or getattr(module, "head_dim", None)
            or getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


def ffn(model: nn.Module, index: int) -> FFN:
    family, block = family_of(model), layers(model)[index]
    return FFN(tuple(block.get_submodule(p) for p in family.ffn_inputs), block.get_submodule(family.ffn_output))


def check_layer_indices(model: nn.Module, indices, field: str) -> list[int]:
    """Validate user-given layer indices against the model; returns them as a sorted list.

    Raises:
        SlimTuneError: an index is out of range or repeated, naming ``field``.
    """
    n = num_layers(model)
    indices = list(indices)
    bad = [i for i in indices if not isinstance(i, int) or not 0 <= i < n]
    if bad:
        raise SlimTuneError(f"{field}: layer(s) {bad} do not exist; the model has {n} layers (0..{n - 1})",
                            f"use indices between 0 and {n - 1}")
    if len(set(indices)) != len(indices):
        raise SlimTuneError(f"{field}: layer indices {indices} repeat a layer", "list each layer once")
    return sorted(indices)


def keep_layers_(model: nn.Module, indices) -> nn.Module:
    """Keep only blocks ``indices`` (in order), in place; rewrite the config to match.

    Decoder blocks are renumbered (``layer_idx`` addresses the KV cache), and
    per-layer config lists (``layer_types``) are subset the same way.
    """
    indices = check_layer_indices(model, indices, "layers")
    family = family_of(model)
    blocks = layers(model)
    kept = nn.ModuleList([blocks[i] for i in indices])
    parent_path, _, name = family.layers_path.rpartition(".")
    parent = base_model(model).get_submodule(parent_path) if parent_path else base_model(model)
    setattr(parent, name, kept)
    for new_index, block in enumerate(kept):
        for module in block.modules():
            if hasattr(module, "layer_idx"):
                module.layer_idx = new_index
    for config in _configs(model):
        config.num_hidden_layers = len(indices)
        if isinstance(getattr(config, "layer_types", None), list):
            config.layer_types = [config.layer_types[i] for i in indices]
    return model


def set_heads_(model: nn.Module, heads: int, kv_heads: int) -> None:
    """Record a new (uniform) head count in the modules and the config after heads were removed.

    Llama family: the config takes the new counts (``head_dim`` is written
    explicitly so it survives). BERT family: the config keeps its head count,
    because ``BertSelfAttention`` derives the head width as ``hidden_size /
    num_attention_heads`` and transformers 5 has no ``pruned_heads``; only the
    modules change, and :func:`module_attrs` reports what a loader must replay.
    """
    family = family_of(model)
    head_dim = attention(model, 0).head_dim
    for block in layers(model):
        module = block.get_submodule(family.attention)
        if family.name == "bert":
            module.num_attention_heads = heads
            module.all_head_size = heads * head_dim
        else:
            module.num_key_value_groups = heads // kv_heads
    if family.name == "llama":
        for config in _configs(model):
            config.num_attention_heads = heads
            config.num_key_value_heads = kv_heads
            config.head_dim = head_dim


def head_count_fits(model: nn.Module, heads: int) -> bool:
    """Whether the config can record ``heads`` query heads per block.

    transformers 5's ``LlamaConfig`` (and its relatives) refuses a head count
    that does not divide ``hidden_size``, even with an explicit ``head_dim``;
    the BERT family keeps its config's count (see :func:`set_heads_`).
    """
    return family_of(model).name == "bert" or model.config.hidden_size % heads == 0


def module_attrs(model: nn.Module) -> dict[str, dict]:
    """``{module path: {attribute: value}}`` the config cannot express, for ``Artifact.module_attrs``.

    Non-empty only for a BERT-family model whose blocks have fewer heads than
    ``config.num_attention_heads``: then every block's ``attention.self`` with
    its ``num_attention_heads`` and ``all_head_size``. Paths are relative to
    ``model``. The full description, so it replaces (never merges with) what an
    artifact recorded before.
    """
    if family_of(model).name != "bert":
        return {}
    heads = [attention(model, i) for i in range(num_layers(model))]
    if all(a.heads == model.config.num_attention_heads for a in heads):
        return {}
    names = {id(m): name for name, m in model.named_modules()}
    return {names[id(a.module)]: {"num_attention_heads": a.heads, "all_head_size": a.heads * a.head_dim} for a in heads}


def set_intermediate_size_(model: nn.Module, size: int) -> None:
    for config in _configs(model):
        config.intermediate_size = size


def resized_config(model: nn.Module, hidden_size: int, num_layers: int, num_heads: int, intermediate_size: int,
                   kv_heads: int | None = None):
    """A copy of ``model.config`` with new widths and depth, for a fresh model of the same family.

    Decoder (llama) configs get ``num_key_value_heads = kv_heads`` (default:
    ``num_heads``) and ``head_dim = hidden_size // num_heads``; per-layer
    lists (``layer_types``) are resampled to ``num_layers`` entries.
    """
    family = family_of(model)
    config = copy.deepcopy(model.config)
    types = getattr(config, "layer_types", None)
    config.hidden_size, config.num_attention_heads, config.intermediate_size = hidden_size, num_heads, intermediate_size
    config.num_hidden_layers = num_layers
    if isinstance(types, list):
        config.layer_types = [types[i * len(types) // num_layers] for i in range(num_layers)]
    if family.name == "llama":
        config.num_key_value_heads = kv_heads or num_heads
        config.head_dim = hidden_size // num_heads
    return config


def _configs(model: nn.Module):
    """The model's config and its base model's, when they are distinct objects."""
    seen = []
    for config in (model.config, getattr(base_model(model), "config", None)):
        if config is not None and all(config is not c for c in seen):
            seen.append(config)
    return seen


@dataclass(frozen=True)
class InputGroup:
    """Linears of one block that read the same input, and where a per-channel scale of that input folds.

    Used by activation-aware scaling (AWQ): the input ``x`` of ``linears`` can
    be replaced by ``x / s`` (and each weight by ``W * s``, columns) without
    changing the model only if the op producing ``x`` feeds nothing else.

    Attributes:
        linears: paths relative to the block; all read the same input (hook the first).
        prev: path relative to the block of the op whose output is that input, or
            None when no op can absorb ``1 / s``.
        kind: how ``prev`` absorbs it: ``"norm"`` (divide a LayerNorm/RMSNorm
            weight and bias), ``"linear"`` (divide a linear's output rows and
            bias; the path from it to ``linears`` is linear per channel), or
            ``"none"``.
    """

    linears: tuple[str, ...]
    prev: str | None = None
    kind: str = "none"


def input_groups(model: nn.Module, index: int) -> list[InputGroup]:
    """The groups of linears of block ``index`` that share an input, for AWQ-style scaling.

    Groups come in the order the block computes them (q/k/v, o, the FFN
    inputs, the FFN output), so each group's input depends only on groups
    before it: GPTQ's true-sequential mode quantizes them in this order.

    Llama family (pre-LN): ``input_layernorm`` -> q/k/v; ``post_attention_layernorm``
    -> gate/up; ``up_proj`` -> down (its input is ``act(gate) * up``); ``v_proj``
    -> o when no key/value head is repeated (GQA repeats v's channels, so one
    scale per o input cannot be divided out of v's rows).

    BERT family (post-LN): the LayerNorm output entering q/k/v (and the one
    entering ``intermediate.dense``) is also the residual stream, so a scale
    folded into that LayerNorm would change the residual too: those groups
    get ``prev=None``. ``value`` -> ``attention.output.dense`` folds (attention
    mixes tokens, not channels, and rows of probabilities sum to 1, so v's bias
    scales too); ``output.dense`` reads ``GELU(intermediate)``, which does not.
    """
    family, att = family_of(model), attention(model, index)
    o_reads_v = att.v.out_features == att.o.in_features  # no repeated key/value heads
    qkv, o = (family.q, family.k, family.v), (family.o,)
    if family.name == "llama":
        return [InputGroup(qkv, "input_layernorm", "norm"),
                InputGroup(o, family.v, "linear") if o_reads_v else InputGroup(o),
                InputGroup(family.ffn_inputs, "post_attention_layernorm", "norm"),
                InputGroup((family.ffn_output,), "mlp.up_proj", "linear")]
    return [InputGroup(qkv),
            InputGroup(o, family.v, "linear") if o_reads_v else InputGroup(o),
            InputGroup(family.ffn_inputs),
            InputGroup((family.ffn_output,))]


# ------------------------------------------------------------------ projection roles
# Where the projections a delta may adapt sit, by role, as regexes over qualified
# module names (searched, so a task head's prefix such as ``bert.`` or
# ``model.`` is free). One table per family of ``config.model_type``; fused
# projections (GPT-2's ``c_attn`` holds query, key and value) answer all the
# roles they serve. Pruned, shared and quantized students keep these names.
ROLES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")

_BERT_ROLES = {"query": r"\.attention\.self\.query$", "key": r"\.attention\.self\.key$",
               "value": r"\.attention\.self\.value$", "attn_out": r"\.attention\.output\.dense$",
               "ffn_in": r"\.intermediate\.dense$", "ffn_out": r"\.layer\.\d+\.output\.dense$"}
_LLAMA_ROLES = {"query": r"\.self_attn\.q_proj$", "key": r"\.self_attn\.k_proj$", "value": r"\.self_attn\.v_proj$",
                "attn_out": r"\.self_attn\.o_proj$", "ffn_in": r"\.mlp\.(gate|up)_proj$", "ffn_out": r"\.mlp\.down_proj$"}
ROLE_PATTERNS: dict[tuple[str, ...], dict[str, str]] = {
    FAMILIES[0].model_types: _BERT_ROLES,
    FAMILIES[1].model_types: _LLAMA_ROLES,
    ("distilbert",): {"query": r"\.attention\.q_lin$", "key": r"\.attention\.k_lin$", "value": r"\.attention\.v_lin$",
                      "attn_out": r"\.attention\.out_lin$", "ffn_in": r"\.ffn\.lin1$", "ffn_out": r"\.ffn\.lin2$"},
    ("gpt2",): {"query": r"(^|\.)h\.\d+\.attn\.c_attn$", "key": r"(^|\.)h\.\d+\.attn\.c_attn$", "value": r"(^|\.)h\.\d+\.attn\.c_attn$",
                "attn_out": r"(^|\.)h\.\d+\.attn\.c_proj$", "ffn_in": r"(^|\.)h\.\d+\.mlp\.c_fc$", "ffn_out": r"(^|\.)h\.\d+\.mlp\.c_proj$"},
    ("t5", "mt5", "umt5"): {"query": r"\.(SelfAttention|EncDecAttention)\.q$", "key": r"\.(SelfAttention|EncDecAttention)\.k$",
                            "value": r"\.(SelfAttention|EncDecAttention)\.v$", "attn_out": r"\.(SelfAttention|EncDecAttention)\.o$",
                            "ffn_in": r"\.DenseReluDense\.wi(_0|_1)?$", "ffn_out": r"\.DenseReluDense\.wo$"},
}
# The blocks of each family, for ``all-linear`` (every projection inside them; never a task or LM head).
BLOCK_PATTERNS: dict[tuple[str, ...], str] = {
    FAMILIES[0].model_types: r"(^|\.)encoder\.layer\.\d+\.", FAMILIES[1].model_types: r"(^|\.)layers\.\d+\.",
    ("distilbert",): r"(^|\.)transformer\.layer\.\d+\.", ("gpt2",): r"(^|\.)h\.\d+\.",
    ("t5", "mt5", "umt5"): r"(^|\.)block\.\d+\.",
}


def _family_table(model: nn.Module, table: dict) -> dict | str:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    for types, value in table.items():
        if model_type in types:
            return value
    known = ", ".join(t for types in table for t in types)
    raise UnknownArchitecture(f"SlimTune does not know the projection roles of model type {model_type!r}",
                              f"name modules by glob or re:regex instead, or use a model type SlimTune knows: {known}")


def matches(name: str, patterns) -> bool:
    """Whether a module name matches any pattern: a glob (``"*.attention.*"``) or a regex written ``"re:<regex>"`` (full match)."""
    return any(re.fullmatch(p[3:], name) if p.startswith("re:") else fnmatch.fnmatchcase(name, p) for p in patterns)


def role_pattern(model: nn.Module, role: str) -> str:
    """The regex over qualified module names that finds role ``role`` (one of :data:`ROLES`) in ``model``."""
    if role not in ROLES:
        raise SlimTuneError(f"unknown role {role!r}", f"use one of: {', '.join(ROLES)}, all-linear, a glob or re:<regex>")
    return _family_table(model, ROLE_PATTERNS)[role]


def block_pattern(model: nn.Module) -> str:
    """The regex matching qualified names inside the transformer blocks of ``model``."""
    return _family_table(model, BLOCK_PATTERNS)
