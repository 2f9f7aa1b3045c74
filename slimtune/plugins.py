"""Bring the stage/module registrations in without core modules importing them.

The algorithm packages register on import; ``load()`` imports them once. Third
parties can add stages through the ``slimtune.plugins`` entry-point group.
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

PACKAGES = (
    "slimtune.distributed",
    "slimtune.eval",
    "slimtune.compress",
    "slimtune.delta",
    "slimtune.prompt",
)
_loaded = False


def load() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    importlib.import_module("slimtune.export")  # the core's own export stage
    for name in PACKAGES:
        importlib.import_module(name)
    for ep in entry_points(group="slimtune.plugins"):
        ep.load()
