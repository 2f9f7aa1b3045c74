"""What a stage is, and what the runner hands it.

A stage is a small class registered by name (``@register_stage("finetune")``)
with a typed ``Config`` (a :class:`slimtune.recipe.Strict` model) and
``run(ctx, config) -> StageResult``. Stages that only measure or export set
``changes_model = False``; the runner then links the input's weight files
instead of writing them again. Under several processes every rank runs every
stage (training is collective), except stages that set
``main_process_only = True`` (measuring, exporting), which run on rank 0
while the others wait.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from slimtune.artifact import Artifact
from slimtune.data import TaskData, load_task_data
from slimtune.recipe import Recipe, Strict, TrainConfig
from slimtune.tasks import Collator, task_kind


@dataclass
class StageResult:
    artifact: Artifact
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class StageContext:
    """Everything a stage may use besides its own config.

    Attributes:
        artifact: the input artifact (output of the previous stage).
        train: the recipe's training defaults.
        out_dir: the stage's temporary directory; extra files written here
            (e.g. ``model.onnx``) become part of the stage's output.
        recipe: the whole validated recipe, read-only (None outside a run).
        strategy: the execution strategy object the Trainer uses (built by
            the runner from ``recipe.distributed``; None = one device).
        checkpoint_dir: where training checkpoints of this stage live; it
            survives a killed run so a restart resumes from it.
    """

    artifact: Artifact
    train: TrainConfig
    out_dir: Path
    recipe: Recipe | None = None
    strategy: Any = None
    checkpoint_dir: Path | None = None

    @property
    def is_main(self) -> bool:
        return self.strategy is None or self.strategy.is_main

    @property
    def kind(self):
        return task_kind(self.artifact.task.kind)

    def data(self) -> TaskData:
        return load_task_data(self.artifact.task)

    def collator(self) -> Collator:
        return Collator(self.artifact.tokenizer, self.artifact.task.max_length, self.artifact.task.kind)

    def batches(self, split: str, batch_size: int | None = None, limit: int | None = None) -> list[dict]:
        """Deterministic, unshuffled batches of a split, for evaluation."""
        examples = self.data()[split][:limit]
        return list(iterate_batches(examples, self.collator(), batch_size or self.train.eval_batch_size))


def iterate_batches(examples: list[dict], collate: Collator, batch_size: int):
    for i in range(0, len(examples), batch_size):
        yield collate(examples[i : i + batch_size])


def device_of(config: TrainConfig) -> torch.device:
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


class Stage(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type[Strict]]
    changes_model: ClassVar[bool]
    main_process_only: ClassVar[bool]

    def run(self, ctx: StageContext, config: Strict) -> StageResult: ...
