"""Structured pruning with physical removal: attention heads, FFN neurons and whole blocks.

Every block loses the same number of units, ranked inside the block by an
importance score (:mod:`slimtune.compress.prune.importance`: Michel et al.
2019 gate gradients, weight norms, or activation norms; blocks by ShortGPT
block influence, Men et al. 2024, or a gate gradient). The lowest-ranked units
are then cut out of the weights - the model gets smaller and its config is
rewritten - not masked:

* a head: its rows of ``q`` (and of ``k``/``v`` when its key/value head goes
  too) and its columns of ``o``; biases alike;
* a neuron: its rows of every FFN input (gate and up, or the one dense) and
  its column of the FFN output;
* a block: dropped from the layer list (``arch.keep_layers_``).

Counts (explicit rounding, never more than asked):

* ``heads = f``: multi-head attention (``kv_heads == heads``: BERT, most
  Llamas) loses ``floor(f * heads)`` heads per block, each with its key/value
  head. Grouped-query attention keeps every key/value head and loses
  ``floor(f * group)`` query heads from *each* group (``group = heads //
  kv_heads``), so ``heads % kv_heads == 0`` still holds; a fraction below
  ``1 / group`` removes nothing.
* ``ffn = f``: ``floor(f * intermediate_size)`` neurons per block.
* ``layers = n``: the ``n`` lowest-scoring blocks; a list: exactly those blocks.

All scores come from one pass over the unpruned model. Blocks are dropped
first, then heads and neurons are cut from the blocks that stay.

Limits: BERT-family head pruning cannot be written into a transformers 5
``BertConfig`` (the head width is derived from the head count), so the config
keeps its head count and the report's ``module_attrs`` must be stored in the
artifact (``slimtune.load`` replays it; plain ``from_pretrained`` cannot load
such a model). Llama models and BERT FFN/layer pruning reload with plain
``transformers``. Encoder-decoder cross-attention is not handled. Embeddings
and the LM head are never touched, so tied embeddings stay tied.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import nn

from slimtune import arch
from slimtune.compress.prune.importance import LAYER_SCORES, METHODS, importance_scores
from slimtune.errors import SlimTuneError
from slimtune.models import parameter_count

EPSILON = 1e-9  # so that 0.29 * 100 counts as 29, not 28


# ---------------------------------------------------------------- pure functions

def removal_count(fraction: float, units: int) -> int:
    """``floor(fraction * units)``: how many of ``units`` a fraction removes."""
    return math.floor(fraction * units + EPSILON)


def lowest(scores: torch.Tensor, count: int) -> list[int]:
    """Indices of the ``count`` lowest scores, ascending by index (ties go to the lower index)."""
    order = torch.argsort(scores, stable=True)
    return sorted(order[:count].tolist())


def heads_to_remove(scores: torch.Tensor, kv_heads: int, per_group: int) -> list[int]:
    """The ``per_group`` lowest-scoring query heads of every key/value group; ``scores`` (heads,)."""
    group = scores.numel() // kv_heads
    return [g * group + h for g in range(kv_heads) for h in lowest(scores[g * group:(g + 1) * group], per_group)]


def unit_rows(kept: list[int], width: int) -> torch.Tensor:
    """(len(kept) * width,) row indices of the kept units of a (units * width, ...) weight."""
    kept = torch.as_tensor(kept, dtype=torch.long)
    return (kept[:, None] * width + torch.arange(width)).flatten()


# ---------------------------------------------------------------- surgery

def select_rows_(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep output features ``index`` of ``linear`` (weight rows and bias), in place."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[index].clone(), requires_grad=linear.weight.requires_grad)
    if linear.bias is not None:
        linear.bias = nn.Parameter(linear.bias.detach()[index].clone(), requires_grad=linear.bias.requires_grad)
    linear.out_features = len(index)


def select_columns_(linear: nn.Linear, index: torch.Tensor) -> None:
    """Keep input features ``index`` of ``linear`` (weight columns), in place."""
    index = index.to(linear.weight.device)
    linear.weight = nn.Parameter(linear.weight.detach()[:, index].clone(), requires_grad=linear.weight.requires_grad)
    linear.in_features = len(index)


def remove_heads_(attention: arch.Attention, removed: list[int]) -> None:
    """Cut query heads ``removed`` out of one block; a key/value head goes when all its query heads go."""
    group = attention.heads // attention.kv_heads
    kept = [h for h in range(attention.heads) if h not in set(removed)]
    kept_kv = sorted({h // group for h in kept})
    rows = unit_rows(kept, attention.head_dim)
    select_rows_(attention.q, rows)
    select_columns_(attention.o, rows)
    if len(kept_kv) < attention.kv_heads:
        kv_rows = unit_rows(kept_kv, attention.head_dim)
        select_rows_(attention.k, kv_rows)
        select_rows_(attention.v, kv_rows)


def remove_neurons_(ffn: arch.FFN, removed: list[int]) -> None:
    """Cut FFN neurons ``removed`` out of one block."""
    kept = torch.as_tensor([n for n in range(ffn.output.in_features) if n not in set(removed)], dtype=torch.long)
    for linear in ffn.inputs:
        select_rows_(linear, kept)
    select_columns_(ffn.output, kept)


# ---------------------------------------------------------------- validation and planning

def _check_fraction(value: float, field: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
        raise SlimTuneError(f"{field}: fraction {value!r} is outside [0, 1)",
                            f"set {field} to the share of units to remove, e.g. 0.25")
    return float(value)


def _check_layers(model: nn.Module, layers) -> int | list[int]:
    n = arch.num_layers(model)
    if isinstance(layers, bool) or not isinstance(layers, (int, list, tuple)):
        raise SlimTuneError(f"layers: {layers!r} is neither a count nor a list of layer indices",
                            "give how many blocks to remove, or which ones, e.g. [2, 3]")
    if isinstance(layers, int):
        if layers < 0:
            raise SlimTuneError(f"layers: cannot remove {layers} layers", "give a count of 0 or more")
        count = layers
    else:
        layers = arch.check_layer_indices(model, layers, "layers")
        count = len(layers)
    if count >= n:
        raise SlimTuneError(f"layers: removing {count} of the model's {n} layers would leave none",
                            f"remove at most {n - 1} layers")
    return layers


def _kept_heads(attention: arch.Attention, removed: int) -> int:
    """Query heads per block after removing ``removed`` per kv group (GQA) or per block (MHA)."""
    grouped = attention.heads > attention.kv_heads
    return attention.heads - removed * (attention.kv_heads if grouped else 1)


def _check_head_count(model: nn.Module, attention: arch.Attention, removed: int) -> None:
    if removed == 0 or arch.head_count_fits(model, _kept_heads(attention, removed)):
        return
    unit = attention.heads // attention.kv_heads if attention.heads > attention.kv_heads else attention.heads
    fits = [r / unit for r in range(1, unit) if arch.head_count_fits(model, _kept_heads(attention, r))]
    raise SlimTuneError(
        f"heads: keeping {_kept_heads(attention, removed)} of {attention.heads} heads per block cannot be written into "
        f"this {model.config.model_type} config (hidden_size {model.config.hidden_size} must be a multiple of the head count)",
        f"use heads: {' or '.join(f'{f:.4g}' for f in fits)}" if fits else "this model's heads cannot be pruned; set heads: 0")


def _check_method(importance: str, needs_data: bool, ranks_layers: bool, batches, loss_fn) -> None:
    if importance not in METHODS:
        raise SlimTuneError(f"importance: unknown importance {importance!r}", f"use one of: {', '.join(METHODS)}")
    if ranks_layers and importance not in LAYER_SCORES:
        raise SlimTuneError(f"layers: importance {importance!r} has no score for whole layers",
                            f"list the layers to remove, or use importance {' or '.join(LAYER_SCORES)} with calibration batches")
    if needs_data and not batches:
        raise SlimTuneError(f"batches: importance {importance!r} needs calibration batches",
                            "pass batches (e.g. from the train split), or use importance 'weight'")
    if needs_data and importance == "gradient" and loss_fn is None:
        raise SlimTuneError("loss_fn: importance 'gradient' needs a loss function", "pass the task kind's loss")


def _cut_blocks_(model: nn.Module, scores, kept_layers: list[int], per_group: int, grouped: bool,
                 neurons: int) -> tuple[dict, dict]:
    """Remove the lowest-scoring heads and neurons of every remaining block (block ``new`` was ``kept_layers[new]``)."""
    report_heads, report_ffn = {}, {}
    for new, old in enumerate(kept_layers):
        if per_group:
            att = arch.attention(model, new)
            removed = heads_to_remove(scores.heads[old], att.kv_heads if grouped else 1, per_group)
            remove_heads_(att, removed)
            report_heads[str(old)] = removed
        if neurons:
            remove_neurons_(arch.ffn(model, new), lowest(scores.neurons[old], neurons))
            report_ffn[str(old)] = neurons
    return report_heads, report_ffn


# ---------------------------------------------------------------- the public verb

def prune_structured_(model: nn.Module, heads: float = 0.0, ffn: float = 0.0, layers: int | list[int] = 0,
                      importance: str = "gradient", batches: list[dict] | None = None,
                      loss_fn: Callable | None = None) -> dict:
    """Remove attention heads, FFN neurons and whole blocks from ``model``, in place.

    Args:
        model: a transformers model of a family :mod:`slimtune.arch` knows.
        heads: fraction of attention heads to remove from every block, in [0, 1) (rounding: module docstring).
        ffn: fraction of FFN neurons to remove from every block, in [0, 1).
        layers: how many whole blocks to remove (lowest importance), or their indices.
        importance: ``gradient`` | ``weight`` | ``activation`` (see importance.py).
        batches: calibration batches (``slimtune.tasks.Collator`` output) for ``gradient``/``activation``.
        loss_fn: ``loss_fn(model, batch) -> (loss, n)`` for ``gradient``.

    Returns:
        A JSON-serialisable report: ``heads`` ``{layer: [removed query heads]}``,
        ``ffn`` ``{layer: neurons removed}`` (keys are the *original* layer indices
        as strings, kept layers only), ``layers`` (removed indices), ``importance``,
        ``layer_score`` (what ranked the layers), ``parameters_before``/``_after``,
        ``block_parameters_before``/``_after`` (the transformer blocks only: the encoder or decoder without embeddings and head)
        and ``module_attrs`` (store in ``Artifact.module_attrs``, replacing what was there).

    Raises:
        SlimTuneError: a bad fraction, layer count or index, importance method, or missing data; names the field.
        arch.UnknownArchitecture: the model's layout is not known.
    """
    arch.family_of(model)
    heads, ffn = _check_fraction(heads, "heads"), _check_fraction(ffn, "ffn")
    layers = _check_layers(model, layers)
    n = arch.num_layers(model)
    first = arch.attention(model, 0)
    group = first.heads // first.kv_heads
    per_group = removal_count(heads, group if group > 1 else first.heads)  # GQA: per group; MHA: per block
    _check_head_count(model, first, per_group)
    neurons = removal_count(ffn, arch.ffn(model, 0).output.in_features)
    rank_layers = isinstance(layers, int) and layers > 0
    needs_data = importance != "weight" and (per_group > 0 or neurons > 0 or rank_layers)
    _check_method(importance, needs_data, rank_layers, batches, loss_fn)

    before, blocks_before = parameter_count(model), parameter_count(arch.layers(model))
    scores = importance_scores(model, importance, batches, loss_fn, heads=per_group > 0, neurons=neurons > 0,
                               layers=rank_layers) if (per_group or neurons or rank_layers) else None
    dropped = lowest(scores.layers, layers) if rank_layers else list(layers or [])
    kept_layers = [i for i in range(n) if i not in dropped]
    if dropped:
        arch.keep_layers_(model, kept_layers)

    report_heads, report_ffn = _cut_blocks_(model, scores, kept_layers, per_group, group > 1, neurons)
    if per_group:
        kept = _kept_heads(first, per_group)
        arch.set_heads_(model, kept, first.kv_heads if group > 1 else kept)
    if neurons:
        arch.set_intermediate_size_(model, arch.ffn(model, 0).output.in_features)

    return {
        "heads": report_heads, "ffn": report_ffn, "layers": dropped, "importance": importance,
        "layer_score": LAYER_SCORES.get(importance) if rank_layers else None,
        "layer_scores": scores.layers.tolist() if rank_layers else None,
        "parameters_before": before, "parameters_after": parameter_count(model),
        "block_parameters_before": blocks_before, "block_parameters_after": parameter_count(arch.layers(model)),
        "module_attrs": arch.module_attrs(model),
    }
