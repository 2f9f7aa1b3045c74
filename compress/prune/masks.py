"""Sparsity masks: which weights to prune, from scores, and keeping them pruned.

A mask set is a plain ``{module name: bool tensor}`` with ``True`` where a
weight is *kept*, shaped like that linear's ``weight`` ``(out, in)``. Masks
are made from importance scores (``|W|`` for magnitude, ``|W| * ||X||`` for
Wanda) in one of four comparison groups:

* ``layer``: each matrix keeps its largest ``(1 - sparsity)`` share;
* ``row``: each output row does (Wanda's per-output comparison);
* ``global``: one threshold over every targeted matrix;
* ``N:M``: in every group of ``M`` consecutive input weights of a row the
  ``N`` largest stay (Mishra et al., 2021, "Accelerating Sparse Deep Neural
  Networks": the 2:4 pattern sparse tensor cores run).

The count pruned in a group of ``n`` weights is ``round(sparsity * n)``,
exactly: scores tied at the threshold are broken by position (lower index
kept), so every process and device picks the same weights.

``apply_masks_`` zeroes the masked weights in place, also for FSDP's DTensor
shards (each mask is sharded like its parameter, once, and cached).

Limits: only ``nn.Linear`` weights are pruned (biases, embeddings, norms and
``Conv1D``-style layers are not).
"""

from __future__ import annotations

import re
import torch
from torch import nn
from torch.utils.weak import WeakIdKeyDictionary

from slimtune.errors import SlimTuneError
from slimtune import arch
from slimtune.arch import matches  # noqa: F401 - re-exported: quantize and prune choose modules alike

Masks = dict[str, torch.Tensor]


class MaskSet(dict):
    """``{module name: boolean keep-mask}`` that prints as a summary, not as every tensor."""

    def __repr__(self) -> str:
        shown = ", ".join(f"{name} {tuple(mask.shape)} keeps {float(mask.float().mean()):.1%}" for name, mask in list(self.items())[:3])
        return f"<{len(self)} masks: {shown}{', ...' if len(self) > 3 else ''}>"


def parse_pattern(pattern: str) -> tuple[int, int]:
    """``"2:4"`` -> ``(2, 4)``: keep ``N`` of every ``M`` consecutive weights.

    Raises:
        ValueError: malformed, or ``N >= M`` (nothing would be pruned), or ``N < 1``.
    """
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match:
        raise ValueError(f"{pattern!r} is not an N:M pattern; write it like \"2:4\" (keep 2 of every 4 weights)")
    n, m = int(match[1]), int(match[2])
    if not 1 <= n < m:
        raise ValueError(f"{pattern!r} keeps N={n} of M={m}; N:M sparsity needs 1 <= N < M, e.g. \"2:4\" or \"4:8\"")
    return n, m


def target_linears(model: nn.Module, include: list[str] | None = None, exclude: list[str] | tuple = ()) -> dict[str, nn.Linear]:
    """The linears to prune, by module name.

    By default every ``nn.Linear`` inside the transformer blocks (attention
    and FFN projections), not embeddings or task/LM heads. ``include`` globs
    (matched against full module names, e.g. ``"*.attention.*"``, or regexes
    written ``"re:.*\\.(q|v)_proj"``) choose among
    *all* linears instead; ``exclude`` globs then drop some. A weight shared
    by several modules is listed once, under its first name.

    Raises:
        SlimTuneError: nothing is left to prune.
    """
    if include:
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and matches(n, include)}
    else:
        inside = {id(m) for block in arch.layers(model) for m in block.modules()}
        chosen = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and id(m) in inside}
    seen: set[int] = set()
    targets = {}
    for name, module in chosen.items():
        if not matches(name, exclude) and id(module.weight) not in seen:
            seen.add(id(module.weight))
            targets[name] = module
    if not targets:
        raise SlimTuneError(f"no linear layer chosen (include={include}, exclude={list(exclude)})",
                            "check the include/exclude globs against the model's module names (print(model))")
    return targets


def pruned_count(n: int, sparsity: float) -> int:
    """How many of ``n`` weights a group at ``sparsity`` prunes."""
    return int(round(sparsity * n))


def keep_largest(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the ``keep`` largest entries along the last dim (ties: lower index kept).

    ``scores`` is ``(..., n)``; every slice along the last dim keeps exactly
    ``keep`` entries. Uses a k-th-value threshold, not a full sort.
    """
    n = scores.shape[-1]
    if keep >= n:
        return torch.ones_like(scores, dtype=torch.bool)
    if keep <= 0:
        return torch.zeros_like(scores, dtype=torch.bool)
    threshold = scores.kthvalue(n - keep + 1, dim=-1, keepdim=True).values  # (..., 1): the keep-th largest
    at_least = scores >= threshold
    if bool((torch.count_nonzero(at_least, dim=-1) == keep).all()):  # no tie to break: two passes, not six
        return at_least
    above = scores > threshold
    missing = keep - above.sum(-1, keepdim=True)  # (..., 1) ties still to keep
    tied = scores == threshold
    return above | (tied & (tied.cumsum(-1) <= missing))


def layer_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(out, in) scores -> mask keeping the largest of the whole matrix."""
    flat = scores.reshape(-1)
    return keep_largest(flat, flat.numel() - pruned_count(flat.numel(), sparsity)).view_as(scores)


def row_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """(out, in) scores -> mask keeping the largest of each output row."""
    n = scores.shape[-1]
    return keep_largest(scores, n - pruned_count(n, sparsity))


def nm_mask(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """(out, in) scores -> mask keeping ``n`` of every ``m`` consecutive inputs of each row.

    Raises:
        SlimTuneError: ``in`` is not a multiple of ``m``.
    """
    rows, cols = scores.shape
    if cols % m:
        raise SlimTuneError(f"pattern: a {n}:{m} pattern needs input widths divisible by {m}, but a layer has {cols}",
                            f"use an M that divides {cols}, or exclude that layer")
    groups = scores.reshape(rows, cols // m, m)  # (out, in/M, M)
    return keep_largest(groups, n).reshape(rows, cols)


def global_masks(scores: dict[str, torch.Tensor], sparsity: float) -> Masks:
    """One threshold over all matrices: exactly ``round(sparsity * total)`` weights pruned in all."""
    names = list(scores)
    flat = torch.cat([scores[k].reshape(-1).float() for k in names])  # (total,)
    keep = keep_largest(flat, flat.numel() - pruned_count(flat.numel(), sparsity))
    out, start = {}, 0
    for name in names:
        size = scores[name].numel()
        out[name] = keep[start : start + size].view_as(scores[name])
        start += size
    return out


def masks_from_scores(scores: dict[str, torch.Tensor], sparsity: float | None = None, scope: str = "layer",
                      pattern: str | None = None) -> Masks:
    """Masks for ``{name: (out, in) scores}``.

    Args:
        scores: higher = more important.
        sparsity: fraction to prune, in [0, 1) (ignored with ``pattern``).
        scope: ``layer``, ``row`` or ``global``: the group sharing one threshold.
        pattern: ``"N:M"`` semi-structured sparsity instead of ``sparsity``.
    """
    if pattern is not None:
        n, m = parse_pattern(pattern)
        return {k: nm_mask(s, n, m) for k, s in scores.items()}
    if scope == "global":
        return global_masks(scores, sparsity)
    one = {"layer": layer_mask, "row": row_mask}[scope]
    return {k: one(s, sparsity) for k, s in scores.items()}


# mask -> {(device, mesh, placements): the mask placed like a parameter}; dies with the mask.
_PLACED = WeakIdKeyDictionary()


def placed_like(mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """``mask`` on ``param``'s device, as ``param``'s local shard when it is a DTensor (cached)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        key = (param.device, id(param.device_mesh), tuple(param.placements))
    else:
        key = (param.device, None, None)
    cache = _PLACED.setdefault(mask, {})
    if key not in cache:
        if isinstance(param, DTensor):
            # Every rank holds the same full mask, so each just slices its shard (no communication).
            local = mask.to(param.to_local().device)
            cache[key] = distribute_tensor(local, param.device_mesh, param.placements, src_data_rank=None).to_local()
        else:
            cache[key] = mask.to(param.device)
    return cache[key]


@torch.no_grad()
def apply_masks_(model: nn.Module, masks: Masks) -> nn.Module:
    """Zero every masked-out weight of ``model`` in place.

    ``model`` is a plain module, the module inside DDP, or an FSDP2 module
    whose parameters are DTensor shards; module names are those of the
    unwrapped model. Returns ``model``.
    """
    from torch.distributed.tensor import DTensor

    for name, mask in masks.items():
        weight = model.get_submodule(name).weight
        local = weight.to_local() if isinstance(weight, DTensor) else weight
        local.masked_fill_(~placed_like(mask, weight), 0)
    return model


@torch.no_grad()
def measure_sparsity(model: nn.Module, names) -> dict:
    """``{"modules": {name: fraction of zero weights}, "overall": fraction over all of them, "zeros", "weights"}``."""
    modules, zeros, total = {}, 0, 0
    for name in names:
        weight = model.get_submodule(name).weight
        z = int((weight == 0).sum())
        modules[name] = z / weight.numel()
        zeros += z
        total += weight.numel()
    return {"modules": modules, "overall": zeros / max(total, 1), "zeros": zeros, "weights": total}


def full_weight(module: nn.Module) -> torch.Tensor:
    """The module's whole weight, gathered when it is an FSDP DTensor shard (collective: call on every rank)."""
    from torch.distributed.tensor import DTensor

    weight = module.weight
    return weight.full_tensor() if isinstance(weight, DTensor) else weight
