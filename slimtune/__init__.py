"""SlimTune: compress a pretrained language model by a recipe, then tune,
export and measure it.

    import slimtune
    result = slimtune.run("minilm-sentiment", overrides={"train.lr": 3e-5})
    art = slimtune.load(result.stages[-1].path)
    art.model, art.tokenizer, art.lineage
"""

from __future__ import annotations

from slimtune.artifact import Artifact, load
from slimtune.errors import SlimTuneError
from slimtune.recipe import Recipe, load_recipe

__version__ = "0.1.0"
__all__ = ["Artifact", "Recipe", "SlimTuneError", "load", "load_recipe", "run", "__version__"]


def run(recipe, overrides=None, out=None, fresh=False):
    """Run a recipe (shipped name, YAML path or Recipe); see ``slimtune.distributed.runner.run``."""
    from slimtune import plugins
    from slimtune.distributed.runner import run as _run

    plugins.load()
    return _run(recipe, overrides=overrides, out=out, fresh=fresh)
