"""``finetune``: train the whole model on the task's own objective.

Cross-entropy for classification, next-token NLL for causal LMs, supervised
contrastive loss for embeddings (see :mod:`slimtune.tasks`). Evaluates on the
validation split after each epoch and keeps the best epoch.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from slimtune.recipe import Strict
from slimtune.registry import register_stage
from slimtune.stage import StageContext, StageResult
from slimtune.distributed.trainer import Trainer, stage_metrics, task_eval_fn


@register_stage("finetune")
class Finetune:
    changes_model = True
    main_process_only = False

    class Config(Strict):
        epochs: int = Field(1, ge=1)
        lr: float | None = Field(None, gt=0, description="overrides train.lr for this stage")
        max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
        eval_split: Literal["validation", "test", "none"] = "validation"

    def run(self, ctx: StageContext, config: Config) -> StageResult:
        art, kind = ctx.artifact, ctx.kind
        eval_fn = task_eval_fn(ctx, config.eval_split)
        trainer = Trainer.for_stage(ctx, art.model, kind.loss, eval_fn, kind.metric, kind.higher_is_better)
        strategy = trainer.strategy
        result = trainer.fit(ctx.data()["train"], config.epochs, lr=config.lr, max_steps=config.max_steps)
        art.model = trainer.trained_model()
        metrics = stage_metrics(result, strategy.world_size, config.eval_split if eval_fn else None)
        return StageResult(art, metrics)
