"""Targeting and wrapping: which modules a delta adapts, and the protocol every delta follows.

Choosing modules (:func:`select_modules`): each target is a role name
(``query``, ``key``, ``value``, ``attn_out``, ``ffn_in``, ``ffn_out``, resolved
by the structure map in :mod:`slimtune.arch`), ``all-linear`` (every
linear-like projection inside the transformer blocks, never a task or LM
head), a glob over qualified module names (``"*.attention.self.query"``) or a
regex written ``"re:<regex>"`` (full match), as ``quantize`` takes them;
``types`` narrows by module class name (``Linear``, ``QuantLinear``,
``Conv1D``). Linear-like means ``nn.Linear``, SlimTune's ``QuantLinear`` and
transformers' ``Conv1D`` (GPT-2), or a delta already wrapping one.

Wrapping (:class:`DeltaLayer`): a delta *replaces* the module it adapts by a
wrapper holding it as ``base_layer``, untouched; nothing patches ``forward``.
Wrappers are registered module types, so ``print(model)`` shows them and
artifacts rebuild them. Several deltas may sit on one backbone, each under a
name: wrappers nest (a LoRA's ``base_layer`` may itself be an adapter), and

* :func:`set_active` switches which named deltas take part,
* :func:`disabled` is a context manager running the bare backbone (or without some deltas),
* :func:`detach_` removes a delta and puts back the very module objects it wrapped.

Training a delta freezes everything else (:func:`freeze_backbone_`); a task
head that must learn (a freshly initialised classifier) trains as a
:class:`TrainedCopy`, a delta of its own that keeps the original head for
``detach_``, as PEFT's ``modules_to_save`` does.
"""

from __future__ import annotations

import copy
import itertools
import re
from contextlib import contextmanager
from typing import ClassVar, Iterator

import torch
from torch import nn

from slimtune import arch
from slimtune.errors import SlimTuneError
from slimtune.registry import register_module_type

ALL_LINEAR = "all-linear"
_ORDER = itertools.count()
DEFAULT = "default"


class DeltaLayer(nn.Module):
    """Base of every delta: wraps ``base_layer`` (kept as is) under a delta name.

    Subclasses set ``method`` (``"lora"``, ``"adapter"``, ...), create their
    trainable parameters in ``__init__``, compute in ``forward`` (calling
    ``self.base_layer``, and skipping their own part when ``not self.active``),
    and implement the artifact protocol: ``config() -> dict`` (their
    hyperparameters) and ``from_config(base_layer, config)``. Methods that can
    fold into the base weight implement ``merge()``/``unmerge()``.
    """

    method: ClassVar[str] = "delta"

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT):
        super().__init__()
        self.base_layer = base_layer
        self.delta_name = name
        self.active = True
        self.merged = False
        self.order = next(_ORDER)  # attach order: saved deltas are rebuilt inner first

    def __getattr__(self, name: str):
        """What the wrapper lacks is the wrapped backbone module's (``in_features``, ``head_dim``, ``config``, ...), so code
        that reads a module's attributes (the structure map, a task head) works on the wrapper too."""
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name in ("base_layer", "_modules", "_parameters", "_buffers") or "base_layer" not in self._modules:
                raise
            inner = self._modules["base_layer"]
            while isinstance(inner, DeltaLayer):  # the backbone module's own attributes, never another delta's
                inner = inner._modules["base_layer"]
            return getattr(inner, name)

    # -- artifact protocol -------------------------------------------------------
    def config(self) -> dict:
        return {}

    @classmethod
    def from_config(cls, base_layer: nn.Module, config: dict, name: str = DEFAULT) -> "DeltaLayer":
        return cls(base_layer, name=name, **config)

    # -- merging -----------------------------------------------------------------
    def merge(self) -> None:
        raise SlimTuneError(f"{self.method} cannot be merged into the weights it adapts",
                            "keep the delta attached (merge: false); LoRA, DoRA, QA-LoRA and BitFit merge")

    def unmerge(self) -> None:
        raise SlimTuneError(f"{self.method} cannot be unmerged", "only a merged LoRA unmerges")

    def delta_parameters(self) -> Iterator[tuple[str, nn.Parameter]]:
        """``(name relative to this wrapper, parameter)`` of the delta itself, not of the wrapped module."""
        for name, p in self.named_parameters():
            if not name.startswith("base_layer."):
                yield name, p

    def extra_repr(self) -> str:
        state = "" if self.active else ", inactive"
        return f"name={self.delta_name!r}{', merged' if self.merged else ''}{state}"


@register_module_type
class TrainedCopy(DeltaLayer):
    """A module that trains as a copy beside its frozen original (a new task head, say).

    ``copy`` computes while the delta is active; the original (``base_layer``)
    otherwise, and after :func:`detach_`.
    """

    method = "trained-copy"

    def __init__(self, base_layer: nn.Module, name: str = DEFAULT):
        super().__init__(base_layer, name)
        self.copy = copy.deepcopy(base_layer)
        for p in self.copy.parameters():
            p.requires_grad_(True)

    def forward(self, *args, **kwargs):
        return (self.copy if self.active else self.base_layer)(*args, **kwargs)


# ------------------------------------------------------------------ choosing modules
def _innermost(module: nn.Module) -> nn.Module:
    while isinstance(module, DeltaLayer):
        module = module.base_layer
    return module


def linear_like(module: nn.Module) -> bool:
    """``nn.Linear``, ``QuantLinear``, transformers' ``Conv1D``, or a delta wrapping one."""
    inner = _innermost(module)
    return isinstance(inner, nn.Linear) or type(inner).__name__ in ("QuantLinear", "Conv1D")


def in_out_features(module: nn.Module) -> tuple[int, int]:
    """``(in_features, out_features)`` of a linear-like module (Conv1D stores its weight transposed)."""
    inner = _innermost(module)
    if type(inner).__name__ == "Conv1D":
        return inner.weight.shape[0], inner.weight.shape[1]
    return inner.in_features, inner.out_features


def _candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Every module a target may name: the backbone's, also inside a delta that wraps a whole body, but never
    a delta's own parts (its adapters, side network, ...) nor a wrapped module apart from its wrapper."""
    own = [f"{n}.{child}." for n, m in model.named_modules() if isinstance(m, DeltaLayer)
           for child, _ in m.named_children() if child != "base_layer"]
    return {n: m for n, m in model.named_modules()
            if not n.endswith("base_layer") and not any(f"{n}.".startswith(o) for o in own)}


def canonical(name: str) -> str:
    """A module path without the ``base_layer`` steps wrappers add (the backbone's own name for it)."""
    return ".".join(part for part in name.split(".") if part != "base_layer")


def resolve(model: nn.Module, name: str) -> str:
    """The current path of the slot a backbone path (:func:`canonical`) names, through any wrappers on the way."""
    path, module = [], model
    for part in name.split(".") if name else []:
        while isinstance(module, DeltaLayer) and part not in dict(module.named_children()):
            path.append("base_layer")
            module = module.base_layer
        path.append(part)
        module = getattr(module, part)
    return ".".join(path)


def select_modules(model: nn.Module, targets: list[str] | str, types: list[str] | None = None,
                   exclude: list[str] | tuple = (), linear_only: bool = True) -> list[str]:
    """Qualified names of the modules ``targets`` choose (see the module docstring), in model order.

    Raises:
        SlimTuneError: an unknown role, or a target matching nothing; the
            message lists the names that exist.
    """
    targets = [targets] if isinstance(targets, str) else list(targets)
    if not targets:
        raise SlimTuneError("no targets given", f"name roles ({', '.join(arch.ROLES)}), {ALL_LINEAR}, globs or re:regexes")
    modules = _candidates(model)
    eligible = {n: m for n, m in modules.items() if n and (not linear_only or linear_like(m))}
    if types:
        eligible = {n: m for n, m in eligible.items() if type(_innermost(m)).__name__ in types or type(m).__name__ in types}
    chosen: set[str] = set()
    for target in targets:
        if target == ALL_LINEAR:
            block = re.compile(arch.block_pattern(model))
            hits = {n for n in eligible if block.search(n)}
        elif target in arch.ROLES:
            pattern = re.compile(arch.role_pattern(model, target))
            hits = {n for n in eligible if pattern.search(n)}
        elif re.fullmatch(r"[A-Za-z_]+", target) and not any(target == n.rpartition(".")[2] for n in eligible):
            raise SlimTuneError(f"unknown target {target!r}: not a role of model type "
                                f"{getattr(model.config, 'model_type', '?')!r}, {ALL_LINEAR}, nor a module name",
                                f"use a role ({', '.join(arch.ROLES)}), {ALL_LINEAR}, or a glob / re:regex over: "
                                f"{_sample(eligible)}")
        else:
            hits = {n for n in eligible if arch.matches(n, [target])}
        if not hits:
            raise SlimTuneError(f"target {target!r} matches no {'linear ' if linear_only else ''}module",
                                f"the model's {'linear ' if linear_only else ''}modules are: {_sample(eligible)}")
        chosen |= hits
    chosen = {n for n in chosen if not arch.matches(n, exclude)}
    if not chosen:
        raise SlimTuneError(f"exclude={list(exclude)} removes every target", "exclude fewer modules")
    return [n for n in modules if n in chosen]


def _sample(names, limit: int = 12) -> str:
    names = list(names)
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "") if names else "(none)"


# ------------------------------------------------------------------ wrapping
def wrap_(model: nn.Module, name: str, make) -> DeltaLayer:
    """Replace submodule ``name`` by ``make(module)`` (a :class:`DeltaLayer`), in place; return the wrapper."""
    parent, _, child = name.rpartition(".")
    owner = model.get_submodule(parent) if parent else model
    wrapper = make(getattr(owner, child))
    setattr(owner, child, wrapper)
    return wrapper


def deltas(model: nn.Module, name: str | None = None) -> list[tuple[str, DeltaLayer]]:
    """``(qualified name, wrapper)`` of every delta in ``model`` (of delta ``name`` only, if given)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, DeltaLayer) and (name is None or m.delta_name == name)]


def delta_names(model: nn.Module) -> list[str]:
    """The names of the deltas attached to ``model``, in the order first met."""
    return list(dict.fromkeys(m.delta_name for _, m in deltas(model)))


def _require(model: nn.Module, name: str) -> list[tuple[str, DeltaLayer]]:
    found = deltas(model, name)
    if not found:
        raise SlimTuneError(f"no delta named {name!r} is attached", f"attached: {delta_names(model) or 'none'}")
    return found


def wrappers_of(model: nn.Module, name: str, cls: type, method: str) -> list[tuple[str, DeltaLayer]]:
    """The ``cls`` wrappers of delta ``name``, for an operation only ``method`` deltas support (merging).

    A task head trained with the delta (a :class:`TrainedCopy` of the same name) is left aside.

    Raises:
        SlimTuneError: no delta ``name``, or one of its wrappers is of another method.
    """
    found = _require(model, name)
    bad = [(n, w) for n, w in found if not isinstance(w, (cls, TrainedCopy))]
    if bad:
        raise SlimTuneError(f"delta {name!r} is not a {method} delta ({type(bad[0][1]).__name__} at {bad[0][0]})",
                            f"this folds only {method} deltas; use the method's own merge, or keep the delta attached")
    return [(n, w) for n, w in found if isinstance(w, cls)]


def unload_heads_(model: nn.Module, name: str) -> None:
    """Put each task head trained with delta ``name`` (its :class:`TrainedCopy`) in place as the head."""
    for qualified, head in _require(model, name):
        if isinstance(head, TrainedCopy):
            _replace(model, qualified, head.copy)


def set_active(model: nn.Module, names: str | list[str] | None) -> None:
    """Let only the deltas ``names`` take part (None: all of them)."""
    if isinstance(names, str):
        names = [names]
    for n in names or []:
        _require(model, n)
    for _, m in deltas(model):
        m.active = names is None or m.delta_name in names


@contextmanager
def disabled(model: nn.Module, names: str | list[str] | None = None):
    """Run without the deltas ``names`` (None: every delta, i.e. the bare backbone); restores the switches after."""
    if isinstance(names, str):
        names = [names]
    found = [m for _, m in deltas(model) if names is None or m.delta_name in names]
    if names:
        for n in names:
            _require(model, n)
    before = [m.active for m in found]
    merged = [m for m in found if m.merged]
    if merged:
        raise SlimTuneError(f"delta {merged[0].delta_name!r} is merged into the weights: it cannot be disabled",
                            "unmerge it first (unmerge_)")
    try:
        for m in found:
            m.active = False
        yield model
    finally:
        for m, active in zip(found, before):
            m.active = active


def detach_(model: nn.Module, name: str = DEFAULT) -> nn.Module:
    """Remove delta ``name``: every wrapper of it is replaced by the very module it wrapped.

    A merged delta is unmerged first, so the backbone comes back as it was
    (bit-exact on float weights). Returns ``model``.
    """
    for qualified, wrapper in reversed(_require(model, name)):
        if wrapper.merged:
            wrapper.unmerge()
        parent, _, child = qualified.rpartition(".")
        owner = model.get_submodule(parent) if parent else model
        setattr(owner, child, wrapper.base_layer)
    return model


@contextmanager
def detached(model: nn.Module):
    """The bare backbone for the duration of the block (e.g. to save it); every delta is put back after.

    Wrappers are taken off innermost first (nested wrappers, and deltas inside a
    wrapped body, alike) and put back in the opposite order.
    """
    taken = []
    try:
        for qualified, wrapper in reversed(deltas(model)):  # named_modules is pre-order: inner ones come later
            parent, _, child = qualified.rpartition(".")
            owner = model.get_submodule(parent) if parent else model
            setattr(owner, child, wrapper.base_layer)
            taken.append((owner, child, wrapper))
        yield model
    finally:
        for owner, child, wrapper in reversed(taken):
            setattr(owner, child, wrapper)


def _replace(model: nn.Module, qualified: str, module: nn.Module) -> None:
    parent, _, child = qualified.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def freeze_backbone_(model: nn.Module, train: list[str] | tuple = ()) -> dict:
    """Freeze every parameter but the deltas' own (and those named by ``train``, globs over parameter names).

    Returns ``{"trainable": n, "total": n, "percent": float}`` over distinct
    parameters (a packed quantized weight counts as the weights it stands for).
    """
    delta_ids = {id(p) for _, m in deltas(model) for _, p in m.delta_parameters()}
    for pname, p in model.named_parameters():
        p.requires_grad_(id(p) in delta_ids or arch.matches(pname, train))
    return trainable_summary(model)


def trainable_summary(model: nn.Module) -> dict:
    from slimtune.models import parameter_count

    trainable = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    total = parameter_count(model)
    return {"trainable": trainable, "total": total, "percent": 100.0 * trainable / max(total, 1)}


def delta_parameter_count(model: nn.Module, name: str) -> int:
    """Elements of delta ``name``'s own parameters (what its file holds)."""
    return sum(p.numel() for _, w in deltas(model, name) for _, p in w.delta_parameters())
