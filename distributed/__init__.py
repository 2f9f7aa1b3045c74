"""The engine: the one Trainer, execution strategies, and the recipe runner.

Importing this package registers the ``finetune`` stage.
"""

from slimtune.distributed import finetune  # noqa: F401  (registers the stage)
from slimtune.distributed.trainer import Trainer, TrainResult

__all__ = ["Trainer", "TrainResult"]
