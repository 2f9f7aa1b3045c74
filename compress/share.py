"""Cross-layer parameter sharing: groups of transformer blocks use one set of weights.

ALBERT (Lan et al., 2020, "ALBERT: A Lite BERT for Self-supervised Learning of
Language Representations", arXiv:1909.11942) shares every parameter of every
block across all layers; here any partition into groups of blocks is allowed
(``groups: [[0, 1], [2, 3]]`` or ``every: 2``), as in the "shared by groups"
ablations of ALBERT and Takase & Kiyono (2021, "Lessons on Parameter Sharing
across Layers in Transformers"). The blocks of a group keep their own module
objects (so ``layer_idx``, hooks and ``print(model)`` stay per layer), but
each of their parameters is the *same* ``nn.Parameter``: gradients of all
members accumulate into it, the optimizer steps it once, and an artifact
stores it once (``slimtune.artifact`` records the ties and re-ties on load).

The shared value starts as the element-wise mean of the members' tensors
(``init: mean``), or as one member's (``first``, or the position of the
member in each group), and is usually recovered by fine-tuning or distilling
from the unshared model (``recover: {...}``).

Limits: sharing saves memory and disk, not compute - every layer still runs.
Members must have the same structure (parameter names, shapes, dtypes, module
types), so layers pruned to different widths cannot share. Buffers of a
group (none in the BERT and Llama blocks) get the group's value but stay
separate tensors. A pipeline strategy cannot split shared blocks over ranks.
"""

from __future__ import annotations

import logging
from typing import Annotated, Literal

import torch
from pydantic import Field, StrictInt, field_validator, model_validator
from torch import nn

from slimtune.errors import RecipeError, SlimTuneError
from slimtune.models import parameter_count
from slimtune.recipe import Strict
from slimtune.registry import register_stage
from slimtune.stage import CompositionError, ModelState, StageContext, StageResult
from slimtune import arch
from slimtune.compress.recover import RecoverConfig, frozen_copy, recover

log = logging.getLogger(__name__)

Init = Literal["mean", "first"] | Annotated[StrictInt, Field(ge=0)]


# --- pure tensor functions ----------------------------------------------------

def shared_value(tensors: list[torch.Tensor], init: Init) -> torch.Tensor:
    """The value a group's members start from.

    Args:
        tensors: the members' tensors of one parameter, each of the same shape ``S``.
        init: ``"mean"`` (element-wise, accumulated in fp32), ``"first"``, or
            the position of the member in the group.
    Returns:
        A new tensor of shape ``S`` and the members' dtype.
    """
    if init == "mean":
        return torch.stack([t.detach().float() for t in tensors]).mean(0).to(tensors[0].dtype)  # (S)
    return tensors[0 if init == "first" else init].detach().clone()


def consecutive_groups(num_layers: int, every: int) -> list[list[int]]:
    """``[[0, .., every-1], [every, ..], ...]``; the last group holds the remainder."""
    return [list(range(i, min(i + every, num_layers))) for i in range(0, num_layers, every)]


# --- validation -----------------------------------------------------------------

def block_structure(block: nn.Module) -> list[tuple]:
    """What must match for two blocks to share: module types, parameter and buffer names, shapes, dtypes."""
    modules = [(name, type(m).__name__) for name, m in block.named_modules()]
    params = [(name, tuple(p.shape), p.dtype) for name, p in block.named_parameters(remove_duplicate=False)]
    buffers = [(name, tuple(b.shape), b.dtype) for name, b in block.named_buffers(remove_duplicate=False)]
    return modules + params + buffers


def check_groups(model: nn.Module, groups: list[list[int]], init: Init = "mean") -> list[list[int]]:
    """Validate ``groups`` (and a positional ``init``) against ``model``; returns them as lists, in the given order.

    Raises:
        SlimTuneError: an empty group, a layer that does not exist or is in
            two groups, members of different structure, ``init`` beyond a group.
    """
    if not groups or any(not group for group in groups):
        raise SlimTuneError(f"groups: {groups} has an empty group", "give each group at least one layer, e.g. [[0, 1], [2, 3]]")
    arch.check_layer_indices(model, [i for group in groups for i in group], "groups")  # also: a layer in two groups
    blocks = arch.layers(model)
    for group in groups:
        if isinstance(init, int) and not isinstance(init, bool) and init >= len(group):
            raise SlimTuneError(f"init: member {init} does not exist in group {group} ({len(group)} members)",
                                f"use a position below {min(len(g) for g in groups)}, 'first' or 'mean'")
        reference = block_structure(blocks[group[0]])
        for i in group[1:]:
            if block_structure(blocks[i]) != reference:
                raise SlimTuneError(f"groups: layers {group[0]} and {i} have different shapes or structure "
                                    f"({_first_difference(reference, block_structure(blocks[i]))}), so they cannot share weights",
                                    "group only layers of the same width (structured pruning may have made them differ)")
    return [list(group) for group in groups]


def _first_difference(a: list[tuple], b: list[tuple]) -> str:
    for x, y in zip(a, b):
        if x != y:
            return f"{x[0]}: {x[1:]} vs {y[0]}: {y[1:]}" if x[0] == y[0] else f"{x[0]} vs {y[0]}"
    return f"{len(a)} vs {len(b)} entries"


# --- model surgery ---------------------------------------------------------------

def _set(module: nn.Module, path: str, value: torch.Tensor) -> None:
    parent, _, name = path.rpartition(".")
    owner = module.get_submodule(parent) if parent else module
    if isinstance(value, nn.Parameter) or name not in owner._buffers:
        setattr(owner, name, value)
    else:
        owner._buffers[name] = value


@torch.no_grad()
def _share_group_(blocks: list[nn.Module], init: Init) -> None:
    """Give every member of ``blocks`` one new parameter per name, holding the group's value."""
    lead = blocks[0]
    for name, param in list(lead.named_parameters(remove_duplicate=False)):
        shared = nn.Parameter(shared_value([b.get_parameter(name) for b in blocks], init), requires_grad=param.requires_grad)
        for block in blocks:
            _set(block, name, shared)
    for name, _ in list(lead.named_buffers(remove_duplicate=False)):
        value = shared_value([b.get_buffer(name) for b in blocks], init)
        for block in blocks:
            block.get_buffer(name).copy_(value)


def share_layers_(model: nn.Module, groups: list[list[int]] | None = None, every: int | None = None, init: Init = "mean") -> dict:
    """Share the weights of groups of blocks, in place (ALBERT-style cross-layer sharing).

    Args:
        model: a transformers model of a family :mod:`slimtune.arch` knows.
        groups: lists of layer indices that share one set of weights, e.g.
            ``[[0, 1], [2, 3]]``; layers in no group keep their own weights.
        every: instead of ``groups``: consecutive groups of ``every`` layers
            (the last one holds the remainder).
        init: the shared starting value: ``"mean"`` of the members, ``"first"``
            member's, or the member at that position of each group.
    Returns:
        ``{"groups", "init", "unique_parameters_before", "unique_parameters_after"}``
        (unique parameters count each shared tensor once).
    Raises:
        SlimTuneError: bad ``groups`` / ``every`` / ``init`` (see :func:`check_groups`).
    """
    if (groups is None) == (every is None):
        raise SlimTuneError("share: give exactly one of groups and every", "e.g. every: 2, or groups: [[0, 1], [2, 3]]")
    if every is not None and (isinstance(every, bool) or not isinstance(every, int) or every < 2):
        raise SlimTuneError(f"every: {every!r} must be an integer >= 2", "every: 2 shares layers 0-1, 2-3, ...")
    if not (init in ("mean", "first") or (isinstance(init, int) and not isinstance(init, bool) and init >= 0)):
        raise SlimTuneError(f"init: {init!r} is not 'mean', 'first' or a member position >= 0", "use init: mean")
    if every is not None:
        groups = consecutive_groups(arch.num_layers(model), every)
    groups = check_groups(model, groups, init)
    before = parameter_count(model)
    blocks = arch.layers(model)
    for group in groups:
        _share_group_([blocks[i] for i in group], init)
    return {"groups": groups, "init": init, "unique_parameters_before": before, "unique_parameters_after": parameter_count(model)}


def sharing_intact(model: nn.Module, groups: list[list[int]]) -> bool:
    """True when every parameter (and packed buffer) of every group's members is one object."""
    return _members_agree(model, groups, lambda t, lead: t is lead)


def sharing_holds_in_values(model: nn.Module, groups: list[list[int]]) -> bool:
    """True when every group's members hold equal values (so re-tying changes nothing)."""
    return _members_agree(model, groups, lambda t, lead: t.shape == lead.shape and torch.equal(t, lead))


def _members_agree(model: nn.Module, groups: list[list[int]], same) -> bool:
    """Every group's members exist and ``same(tensor, lead's tensor)`` holds for each of their tied tensors."""
    blocks = arch.layers(model)
    if any(i >= len(blocks) for group in groups for i in group):
        return False
    for group in groups:
        lead = _tied(blocks[group[0]])
        for i in group[1:]:
            other = _tied(blocks[i])
            if other.keys() != lead.keys() or not all(same(t, lead[n]) for n, t in other.items()):
                return False
    return True


def _tied(block: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors sharing ties: parameters, and the buffers of packed (quantized) modules.

    Plain buffers (e.g. BERT's position ids) are copied, not tied, by :func:`share_layers_`.
    """
    tensors = dict(block.named_parameters(remove_duplicate=False))
    for name, module in block.named_modules(remove_duplicate=False):
        if hasattr(module, "shared_copy"):
            tensors.update((f"{name}.{n}" if name else n, b) for n, b in module.named_buffers(recurse=False) if b is not None)
    return tensors


@torch.no_grad()
def retie_(model: nn.Module, groups: list[list[int]]) -> None:
    """Make the members of each group share their first member's parameters (and packed buffers) again.

    For a model whose sharing a wrapper or copy lost although the values
    stayed equal (training a shared parameter updates all its uses alike).

    Raises:
        RuntimeError: members hold different values, so re-tying would change the model.
    """
    blocks = arch.layers(model)
    for group in groups:
        lead = _tied(blocks[group[0]])
        for i in group[1:]:
            for name, other in _tied(blocks[i]).items():
                if other is not lead[name] and not torch.equal(other, lead[name]):
                    raise RuntimeError(f"layers {group[0]} and {i} diverged in {name}; their sharing was lost during training")
                _set(blocks[i], name, lead[name])


# --- the recipe stage ----------------------------------------------------------------

class ShareConfig(Strict):
    """``share: {every: 2, init: mean, recover: {epochs: 1}}``."""

    groups: list[list[StrictInt]] | None = Field(None, description="layers that share one set of weights, e.g. [[0, 1], [2, 3]]")
    every: StrictInt | None = Field(None, ge=2, description="share consecutive groups of this many layers")
    init: Init = Field("mean", description="mean of the members, the first member, or the member at this position of each group")
    recover: RecoverConfig | None = None

    @field_validator("groups")
    @classmethod
    def _disjoint(cls, groups):
        if groups is not None:
            if not groups or any(not g for g in groups):
                raise ValueError("every group needs at least one layer, e.g. [[0, 1], [2, 3]]")
            flat = [i for g in groups for i in g]
            repeated = sorted({i for i in flat if flat.count(i) > 1})
            if repeated:
                raise ValueError(f"layer(s) {repeated} appear in more than one group (or twice in one); list each layer once")
        return groups

    @model_validator(mode="after")
    def _one_of(self):
        if (self.groups is None) == (self.every is None):
            raise ValueError("give exactly one of groups and every (e.g. every: 2)")
        if isinstance(self.init, int):
            size = self.every or min(len(g) for g in self.groups)
            if self.init >= size:
                raise ValueError(f"init: member {self.init} does not exist in a group of {size} layers; "
                                 f"use a position below {size}, 'first' or 'mean'")
        return self


@register_stage("share")
class Share:
    """Cross-layer parameter sharing, then optional recovery training."""

    changes_model = True
    main_process_only = False
    Config = ShareConfig

    @staticmethod
    def compose(config: ShareConfig, state: ModelState, this: str) -> ModelState:
        """Needs float layers of one shape, and the layers it names."""
        if state.quantized:
            raise CompositionError(f"{this} averages float weights, but {state.quantized} quantized them", "put share before quantize")
        if state.uneven:
            raise CompositionError(f"{this} needs layers of one shape, but {state.uneven} removed heads or FFN neurons "
                                   "layer by layer", "share before pruning with method structured is refused too: "
                                   "prune whole layers only (layers: N), or leave out one of the two")
        if state.layers is not None:
            named = [i for g in config.groups for i in g] if config.groups else []
            beyond = [i for i in named if i >= state.layers]
            if beyond or (config.every or 0) > state.layers:
                what = f"layers {beyond} do not exist" if beyond else f"every: {config.every} is more than the model's layers"
                raise CompositionError(f"{this}: {what}; the model entering it has {state.layers} layers", "name existing layers")
        return state.but(shared=this)

    def run(self, ctx: StageContext, config: ShareConfig) -> StageResult:
        art = ctx.artifact
        teacher = frozen_copy(art.model) if config.recover and config.recover.distill else None
        try:
            report = share_layers_(art.model, config.groups, config.every, config.init)
        except SlimTuneError as err:
            raise RecipeError(f"share: {err.message}", err.hint) from err
        metrics = {"groups": report["groups"], "unique_parameters_before": report["unique_parameters_before"],
                   "unique_parameters_after": report["unique_parameters_after"]}
        if config.recover is not None:
            art.model, recovered = recover(ctx, art.model, config.recover, teacher)
            metrics.update(recovered)
            if not sharing_intact(art.model, report["groups"]):
                log.warning("share: training lost the sharing of the groups; re-tying them")
                retie_(art.model, report["groups"])
        unique = parameter_count(art.model)
        metrics["parameters"] = unique  # the size reports' column: shared tensors counted once
        art.compression = {**art.compression, "share": {"groups": report["groups"], "init": config.init, "unique_parameters": unique}}
        return StageResult(art, metrics)
