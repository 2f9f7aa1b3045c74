"""SlimTune: compress a pretrained language model by a recipe, then tune,
export and measure it.

    import slimtune
    result = slimtune.run("minilm-sentiment", overrides={"train.lr": 3e-5})
    art = slimtune.load(result.stages[-1].path)
    art.model, art.tokenizer, art.lineage
"""

from __future__ import annotations

import importlib
from importlib.metadata import entry_points

from slimtune import registry
from slimtune.artifact import Artifact, load
from slimtune.errors import SlimTuneError
from slimtune.recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["Artifact", "Recipe", "SlimTuneError", "load", "load_recipe", "run", "__version__"]


def run(recipe, overrides=None, out=None, fresh=False, **launch):
    """Run a recipe (shipped name, YAML path or Recipe); see ``slimtune.distributed.runner.run``."""
    from slimtune.distributed.runner import run as _run

    _load_packages()
    return _run(recipe, overrides=overrides, out=out, fresh=fresh, **launch)


# Packages that register stages, module types and ONNX lowerings on import.
# Third parties add theirs through the ``slimtune.plugins`` entry-point group.
PACKAGES = ("slimtune.export", "slimtune.distributed", "slimtune.eval", "slimtune.compress", "slimtune.delta", "slimtune.prompt")
_loaded = False


def _load_packages() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for name in PACKAGES:
        importlib.import_module(name)
    for ep in entry_points(group="slimtune.plugins"):
        ep.load()


registry.set_loader(_load_packages)
