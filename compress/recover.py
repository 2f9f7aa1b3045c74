"""Recovery training after a lossy compression step (pruning, sharing).

Fine-tunes the compressed model on the task's own loss or, with
``distill: true``, distills from the model as it was before compression
(Hinton et al., 2015): ``alpha * T^2 KL(teacher_T || student_T) + (1 - alpha) *
task loss``, with the KL on pooled embeddings replaced by a cosine loss for
``embedding`` tasks. Trains through the one Trainer, so precision,
accumulation and DDP/FSDP apply; ``after_step`` lets pruning keep its masks
applied after every optimizer step.
"""

from __future__ import annotations

import copy
from typing import Callable, Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.recipe import Strict
from slimtune.stage import StageContext
from slimtune.tasks import embed, model_inputs
from slimtune.distributed.trainer import Trainer, stage_metrics, task_eval_fn


class RecoverConfig(Strict):
    """``recover: {epochs: 1, distill: true}`` of a compression stage."""

    epochs: int = Field(1, ge=1)
    distill: bool = Field(False, description="distill from the uncompressed model instead of plain fine-tuning")
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the distillation loss; 1 - alpha weighs the task loss")
    lr: float | None = Field(None, gt=0, description="overrides train.lr for recovery")
    max_steps: int | None = Field(None, ge=1)
    eval_split: Literal["validation", "test", "none"] = "validation"


def frozen_copy(model: nn.Module) -> nn.Module:
    """A detached, frozen, eval-mode copy of ``model`` (the teacher for recovery by distillation)."""
    teacher = copy.deepcopy(model).eval()
    teacher.requires_grad_(False)
    return teacher


def recovery_loss(kind, teacher: nn.Module, temperature: float, alpha: float) -> Callable:
    """``(student, batch) -> (loss, n)``: distillation from ``teacher`` mixed with the task loss."""
    from slimtune.compress.distill.losses import embedding_loss, soft_kl

    def loss_fn(student: nn.Module, batch: dict) -> tuple[torch.Tensor, int]:
        out = student(**model_inputs(batch))
        cached = lambda **_: out  # noqa: E731 - lets the task kind's loss reuse this forward pass
        with torch.no_grad():
            reference = teacher(**model_inputs(batch))
        if kind.name == "embedding":
            soft = embedding_loss(embed(cached, batch).float(), embed(lambda **_: reference, batch).float())
        else:
            mask = batch["attention_mask"] if out.logits.dim() == 3 else None
            soft = soft_kl(out.logits, reference.logits, temperature, mask)
        has_task_loss = "labels" in batch or kind.name == "causal-lm"  # next-token loss needs no labels
        if not has_task_loss or alpha == 1:
            return soft, len(batch["input_ids"])
        task, n = kind.loss(cached, batch)
        return alpha * soft + (1 - alpha) * task, n

    return loss_fn


def recover(ctx: StageContext, model: nn.Module, config: RecoverConfig, teacher: nn.Module | None = None,
            after_step: Callable[[nn.Module], None] | None = None) -> tuple[nn.Module, dict]:
    """Train ``model`` back towards its task; returns the trained (plain CPU) model and metrics.

    Args:
        ctx: the stage context (training config, strategy, data, checkpoints).
        model: the compressed model.
        config: epochs, distillation, learning rate.
        teacher: the uncompressed model; required when ``config.distill``.
        after_step: called with the model after every optimizer step (no grad).
    """
    kind = ctx.kind
    if config.distill:
        if teacher is None:
            raise ValueError("recover with distill needs the uncompressed teacher")
        loss_fn = recovery_loss(kind, teacher, config.temperature, config.alpha)
    else:
        loss_fn = kind.loss
    eval_fn = task_eval_fn(ctx, config.eval_split)
    trainer = Trainer.for_stage(ctx, model, loss_fn, eval_fn, kind.metric, kind.higher_is_better, after_step=after_step)
    if teacher is not None:
        teacher.to(trainer.strategy.device)
    result = trainer.fit(ctx.data()["train"], config.epochs, lr=config.lr, max_steps=config.max_steps)
    model = trainer.trained_model()
    if teacher is not None:
        teacher.cpu()
    metrics = stage_metrics(result, trainer.strategy.world_size, config.eval_split if eval_fn else None, prefix="recover_")
    return model, metrics
