"""What the compression records of an artifact promise, kept by later training and re-checked after every stage.

An artifact's ``compression`` says what earlier stages did: ``prune`` (which
modules, at what measured sparsity, in which N:M pattern), ``share`` (which
layers hold one set of weights), ``quantize`` (which modules are packed). A
later stage can undo that silently: fine-tuning refills pruned weights,
``share: {init: mean}`` averages differently masked layers, a distilled
student has none of the teacher's layers. So each record has an
:class:`~slimtune.registry.Invariant`:

* ``prune`` (unstructured and N:M): training the artifact's model keeps the
  zeros (re-applied after every optimizer step); after any stage the
  sparsity is measured again, and a record whose zeros were refilled is
  rewritten with the measured values (an N:M pattern that no longer holds is
  dropped), with a warning saying so.
* ``share``: members that hold equal values but lost their ties are re-tied;
  members that differ (or no longer exist) drop the record, with a warning.
* ``quantize``: modules that are no longer packed leave the record.
"""

from __future__ import annotations

import torch
from torch import nn

from slimtune.registry import Invariant, register_invariant
from slimtune.compress.prune.masks import apply_masks_, parse_pattern
from slimtune.compress.share import retie_, sharing_holds_in_values, sharing_intact


def weight_of(model: nn.Module, name: str) -> torch.Tensor | None:
    """The float weight of module ``name`` (a linear, the linear inside a QAT wrapper, or a packed module dequantized)."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    module = getattr(module, "base_layer", module)
    if hasattr(module, "dequantized_weight"):
        return module.dequantized_weight()
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) else None


def holds_pattern(weight: torch.Tensor, pattern: str) -> bool:
    """Every group of M consecutive inputs of every row has at most N non-zeros."""
    n, m = parse_pattern(pattern)
    rows, k = weight.shape
    padded = torch.nn.functional.pad(weight.detach(), (0, -k % m))  # zeros never break the pattern
    return bool(((padded.reshape(rows, -1, m) != 0).sum(-1) <= n).all())


class Pruned(Invariant):
    """Unstructured / N:M pruning: zeros kept in training, sparsity re-measured after every stage."""

    def keep(self, model, record):
        if record.get("method") == "structured":
            return None
        masks = {}
        for name in record.get("modules", {}):
            weight = weight_of(model, name)
            if weight is not None and not _is_packed(model, name):
                masks[name] = weight.detach() != 0  # True = keep
        if not masks:
            return None

        def keep_zeros(m: nn.Module) -> None:
            apply_masks_(m, {_float_linear(m, name): mask for name, mask in masks.items()})

        return keep_zeros

    def check(self, model, record):
        if record.get("method") == "structured":
            return record, None
        weights = {name: weight_of(model, name) for name in record.get("modules", {})}
        gone = [name for name, w in weights.items() if w is None]
        if gone:
            return None, f"the pruned modules {gone[:3]} no longer exist; the prune record is dropped"
        modules = {name: float((w == 0).sum()) / w.numel() for name, w in weights.items()}
        zeros = sum(int((w == 0).sum()) for w in weights.values())
        total = sum(w.numel() for w in weights.values())
        overall = zeros / max(total, 1)
        pattern = record.get("pattern")
        kept = pattern is None or all(holds_pattern(w, pattern) for w in weights.values())
        if zeros >= record.get("zeros", 0) and kept:  # rounding to a zero code may add zeros; none were refilled
            return record, None
        before = record.get("overall", 0.0)
        what = f"the pruned weights changed: sparsity {before:.4f} -> {overall:.4f}"
        if not kept:
            what += f", and the {pattern} pattern no longer holds"
        if zeros == 0:
            return None, what + "; the pruning is undone and its record dropped"
        new = {**record, "modules": modules, "overall": overall, "zeros": zeros, "weights": total,
               "pattern": pattern if kept else None, "changed": what}
        return new, what + " (the record now holds the measured values)"


def _float_linear(model: nn.Module, name: str) -> str:
    """``name``, or its float linear inside a QAT wrapper."""
    return f"{name}.base_layer" if hasattr(model.get_submodule(name), "base_layer") else name


class Shared(Invariant):
    """Cross-layer sharing: lost ties of equal values are restored; diverged or missing members drop the record."""

    def check(self, model, record):
        groups = record.get("groups", [])
        held = []
        for group in groups:
            if not sharing_intact(model, [group]) and sharing_holds_in_values(model, [group]):
                retie_(model, [group])
            if sharing_intact(model, [group]):
                held.append(group)
        if held == groups:
            return record, None
        lost = [g for g in groups if g not in held]
        what = f"layers {lost} no longer share their weights (trained apart, or not in this model)"
        if not held:
            return None, what + "; the share record is dropped"
        return {**record, "groups": held}, what + f"; the share record keeps {held}"


class Quantized(Invariant):
    """Quantized modules: the record lists only modules that are still packed."""

    def check(self, model, record):
        modules = record.get("modules", {})
        packed = {name: entry for name, entry in modules.items() if _is_packed(model, name)}
        if len(packed) == len(modules):
            return record, None
        if not packed:
            return None, "no quantized module is left (a new model replaced them); the quantize record is dropped"
        return {**record, "modules": packed}, f"{len(modules) - len(packed)} quantized modules are gone from the model"


def _is_packed(model: nn.Module, name: str) -> bool:
    try:
        return hasattr(model.get_submodule(name), "dequantized_weight")
    except AttributeError:
        return False


register_invariant("prune", Pruned())
register_invariant("share", Shared())
register_invariant("quantize", Quantized())
