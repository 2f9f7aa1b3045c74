"""What every delta stage shares: attach, freeze, train through the Trainer, optionally merge.

A delta stage (``lora``, ``adapter``, ``prefix``, ``bitfit``, ``ladder``) is a
:class:`DeltaStage` subclass whose ``attach(model, config)`` wraps modules of
the artifact's model; the base then freezes everything else (the task head
trains as a copy when ``head`` asks for it), trains on the task's own objective
with :meth:`Trainer.for_stage` (single, DDP, FSDP alike; FSDP gathers the full
delta back before saving), and reports the trainable parameters and their
share. The artifact keeps the backbone's weight file (a hard link) and adds
the delta (:mod:`slimtune.delta.io`); ``merge: true`` folds a mergeable delta
into the weights instead and writes a plain (or quantized) model.
"""

from __future__ import annotations

import logging
from abc import ABC, abstractmethod
from typing import ClassVar, Literal

import torch
from pydantic import Field
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.recipe import Strict
from slimtune.stage import CompositionError, ModelState, StageContext, StageResult
from slimtune.tasks import model_inputs
from slimtune.delta.io import backbone_sha256
from slimtune.delta.inject import TrainedCopy, delta_names, delta_parameter_count, freeze_backbone_, trainable_summary, wrap_

log = logging.getLogger(__name__)

# Task heads by module name: transformers' sequence-classification heads.
HEAD_NAMES = ("classifier", "score")


class DeltaConfig(Strict):
    """Fields every delta stage takes, beside its method's own."""

    name: str | None = Field(None, description="the delta's name (default: the method's); several deltas may share a backbone")
    epochs: int = Field(1, ge=1)
    lr: float | None = Field(None, gt=0, description="overrides train.lr for this stage (deltas usually want ~1e-3)")
    max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
    eval_split: Literal["validation", "test", "none"] = "validation"
    head: Literal["auto", "train", "frozen"] = Field(
        "auto", description="the task head: auto trains a classification head (classifier/score) as part of the delta")
    train: list[str] = Field(default_factory=list, description="parameter-name globs that also train (saved with the delta)")
    merge: bool = Field(False, description="fold the trained delta into the weights and save a plain model (LoRA only)")


class DeltaStage(ABC):
    """Base of the delta stages (see the module docstring)."""

    changes_model = True
    main_process_only = False
    takes_deltas = True  # may run on a model that already carries a delta
    mergeable: ClassVar[bool] = False

    @abstractmethod
    def attach(self, ctx: StageContext, model: nn.Module, config, name: str) -> list[str]:
        """Wrap the modules of ``model`` this method adapts; returns their qualified names."""

    @classmethod
    def delta_name(cls, config) -> str:
        return config.name or cls.name

    @classmethod
    def compose(cls, config, state: ModelState, this: str) -> ModelState:
        """Refuses a name already attached and ``merge`` of a method that cannot merge; leaves the delta attached (unless merged)."""
        name = cls.delta_name(config)
        if name in state.deltas:
            raise CompositionError(f"{this} attaches delta {name!r}, but an earlier stage already attached one of that name",
                                   "give this stage another name: (name: ...)")
        if config.merge and not cls.mergeable:
            raise CompositionError(f"{this}: {cls.name} cannot be merged into the weights it adapts",
                                   "remove merge: true (the delta stays attached and is saved beside its backbone)")
        return state if config.merge else state.but(deltas=state.deltas + (name,), delta_methods=state.delta_methods + (cls.name,),
                                                    delta_stage=state.delta_stage or this)

    def run(self, ctx: StageContext, config) -> StageResult:
        from slimtune.distributed.trainer import Trainer, stage_metrics, task_eval_fn

        art, kind = ctx.artifact, ctx.kind
        model = art.model
        name = self.delta_name(config)
        if name in delta_names(model):
            raise SlimTuneError(f"a delta named {name!r} is already attached", "give the stage another name: (name: ...)")
        backbone = backbone_sha256(art)
        torch.manual_seed(ctx.train.seed)  # the delta's initialisation is part of the run's result
        modules = self.attach(ctx, model, config, name)
        heads = self.train_head(model, kind.name, config, name)
        summary = freeze_backbone_(model, config.train)
        log.info("%s: %d modules adapted; %d of %d parameters train (%.3f%%)", name, len(modules),
                 summary["trainable"], summary["total"], summary["percent"])
        eval_fn = task_eval_fn(ctx, config.eval_split)
        trainer = Trainer.for_stage(ctx, model, kind.loss, eval_fn, kind.metric, kind.higher_is_better)
        result = trainer.fit(ctx.data()["train"], config.epochs, lr=config.lr, max_steps=config.max_steps)
        art.model = trainer.trained_model()
        metrics = stage_metrics(result, trainer.strategy.world_size, config.eval_split if eval_fn else None)
        metrics.update(delta=name, method=self.name, adapted_modules=len(modules), head_trained=heads,
                       trainable_parameters=summary["trainable"], total_parameters=summary["total"],
                       trainable_percent=summary["percent"])
        if config.merge:
            probe = _probe_batch(ctx)
            before = _outputs(art.model, kind, probe)
            metrics["merge"] = self.merge(art.model, name)
            # What merging changed, measured: the task outputs on one batch before and after (0 up to float
            # rounding for an exact merge; a re-quantizing merge shows the error it adds).
            metrics["merge"]["output_max_abs_diff"] = float((_outputs(art.model, kind, probe) - before).abs().max())
            metrics["merge"]["output_max_abs"] = float(before.abs().max())
            art.swaps = refreshed_swaps(art.model, art.swaps)
            for p in art.model.parameters():
                p.requires_grad_(True)
        else:
            records = [r for r in (art.attachments.get("deltas") or []) if isinstance(r, dict)]
            art.attachments["deltas"] = records + [{"name": name, "backbone_sha256": backbone,
                                                    "stage": {"method": self.name, **config.model_dump(mode="json")}}]
            metrics["delta_parameters"] = delta_parameter_count(art.model, name)
        return StageResult(art, metrics)

    def merge(self, model: nn.Module, name: str) -> dict:
        raise SlimTuneError(f"{self.name} cannot be merged", "remove merge: true")

    @staticmethod
    def train_head(model: nn.Module, kind: str, config, name: str) -> list[str]:
        """Wrap the task head in a :class:`TrainedCopy` when ``head`` asks for it; returns the wrapped names."""
        if config.head == "frozen" or (config.head == "auto" and kind != "classification"):
            return []
        found = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)
                 and not isinstance(getattr(model, n), TrainedCopy)]
        if not found and config.head == "train":
            raise SlimTuneError(f"head: train, but the model has no task head named {' or '.join(HEAD_NAMES)}",
                                "use head: frozen, or name the head's parameters in train:")
        for n in found:
            wrap_(model, n, lambda m: TrainedCopy(m, name))
        return found


def _probe_batch(ctx: StageContext) -> dict:
    """One batch of real examples (the first of validation, else train) to compare outputs on."""
    data = ctx.data()
    split = "validation" if data["validation"] else "train"
    return ctx.batches(split, limit=ctx.train.eval_batch_size)[0]


@torch.no_grad()
def _outputs(model: nn.Module, kind, batch: dict) -> torch.Tensor:
    model.eval()
    device = next(model.parameters()).device
    return kind.forward_export(model, **{k: v.to(device) for k, v in model_inputs(batch).items()}).float()


def refreshed_swaps(model: nn.Module, swaps: list[dict]) -> list[dict]:
    """The artifact's swap records with each config re-read from its module: a merge may change a swapped
    module's format (QA-LoRA's exact merge writes float zero points, ``zero_dtype: float32``)."""
    fresh = []
    for swap in swaps:
        try:
            module = model.get_submodule(swap["module"])
        except AttributeError:
            module = None
        same = module is not None and type(module).__name__ == swap["type"] and hasattr(module, "config")
        fresh.append({**swap, "config": module.config()} if same else swap)
    return fresh
