"""Registries the packages below the core fill in.

The core owns three tables and never imports algorithm code to fill them:

* stages: recipe stage name -> stage class (``distributed``, ``eval``,
  ``compress``, ``delta``, ``prompt`` register theirs on import);
* module types: name -> ``nn.Module`` class an artifact may contain in place of
  an original layer (e.g. a quantized linear), rebuilt on load;
* ONNX lowerings: torch op -> onnxscript function, handed to the exporter.

The top-level package installs a loader (``set_loader``) that imports those
packages on first need, so the tables are full after a plain ``import slimtune``.
"""

from __future__ import annotations

from typing import Any, Callable, TypeVar

from slimtune.errors import RecipeError

T = TypeVar("T")

STAGES: dict[str, type] = {}
MODULE_TYPES: dict[str, type] = {}
ONNX_LOWERINGS: dict[Any, Callable] = {}
_loader: Callable[[], None] | None = None


def set_loader(fn: Callable[[], None]) -> None:
    """Install the function that imports every package that registers something."""
    global _loader
    _loader = fn


def ensure_loaded() -> None:
    if _loader is not None:
        _loader()


def register_stage(name: str) -> Callable[[type[T]], type[T]]:
    """Class decorator: make ``cls`` available as recipe stage ``name``."""

    def wrap(cls: type[T]) -> type[T]:
        if name in STAGES and STAGES[name] is not cls:
            raise ValueError(f"stage {name!r} registered twice: {STAGES[name]} and {cls}")
        cls.name = name
        STAGES[name] = cls
        return cls

    return wrap


def register_module_type(cls: type[T]) -> type[T]:
    """Class decorator: let artifacts contain ``cls`` (rebuilt by its name on load)."""
    MODULE_TYPES[cls.__name__] = cls
    return cls


def register_onnx_lowering(op: Any, fn: Callable) -> None:
    """Export torch op ``op`` to ONNX with the onnxscript function ``fn``."""
    ONNX_LOWERINGS[op] = fn


def get_stage(name: str) -> type:
    """Look up a stage class by name, loading the plugin packages first."""
    ensure_loaded()
    if name not in STAGES:
        raise RecipeError(
            f"unknown stage {name!r}",
            f"use one of: {', '.join(sorted(STAGES))}",
        )
    return STAGES[name]
