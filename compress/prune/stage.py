"""The ``prune`` stage and ``prune_``, its Python verb: every pruning method behind one config.

* ``magnitude`` / ``wanda``: unstructured (``sparsity``, ``scope``) or N:M
  (``pattern``) masks on the blocks' linears (masks.py, magnitude.py,
  wanda.py: one-shot Wanda scores block by block on the pruned prefix);
  optionally reached gradually during recovery on a cubic schedule
  (schedule.py). Masks stay applied after every recovery step.
* ``structured``: attention heads, FFN neurons and blocks physically removed
  (structured.py); the artifact records the module attributes to replay.

Then an optional recovery phase (``recover: {epochs: N, distill: true}``,
:mod:`slimtune.compress.recover`) fine-tunes, or distills from the unpruned
model. The artifact's ``compression["prune"]`` records the method, the
target and the *measured* sparsity of every pruned module.

Limits: zeroed weights are stored densely (no size or speed gain on disk or
on CPU by themselves; 2:4 needs sparse kernels to run faster); a resumed
gradual run restarts the schedule's step count.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, NonNegativeInt, field_validator, model_validator
from torch import nn

from slimtune.errors import SlimTuneError
from slimtune.recipe import Strict
from slimtune.registry import register_stage
from slimtune.stage import CompositionError, ModelState, StageContext, StageResult, device_of
from slimtune.distributed.strategy import SingleDevice
from slimtune.compress.prune.magnitude import magnitude_masks, magnitude_scores
from slimtune.compress.prune.masks import Masks, MaskSet, apply_masks_, measure_sparsity, parse_pattern, target_linears
from slimtune.compress.prune.schedule import GradualPruner
from slimtune.compress.prune.structured import prune_structured_
from slimtune.compress.prune.wanda import input_norms, wanda_scores, wanda_sequential_
from slimtune.compress.recover import RecoverConfig, frozen_copy, recover

UNSTRUCTURED_FIELDS = ("sparsity", "scope", "pattern", "include", "exclude", "schedule")
STRUCTURED_FIELDS = ("heads", "ffn", "layers", "importance")


class Calibration(Strict):
    """Which batches calibration (Wanda norms, structured importance) runs on."""

    batches: int = Field(8, ge=1, description="number of batches (train.eval_batch_size examples each)")
    split: Literal["train", "validation", "test"] = "train"


class Schedule(Strict):
    """Cubic gradual pruning during recovery (Zhu & Gupta, 2017): ramp over ``steps`` or ``epochs``."""

    steps: int | None = Field(None, ge=1, description="ramp length in optimizer steps")
    epochs: float | None = Field(None, gt=0, description="ramp length in recovery epochs")
    every: int | None = Field(None, ge=1, description="prune every this many steps (default: ten pruning steps)")
    initial: float = Field(0.0, ge=0, lt=1, description="sparsity at the start of the ramp")
    start: int = Field(0, ge=0, description="optimizer steps before the ramp starts")

    @model_validator(mode="after")
    def _one_length(self):
        if (self.steps is None) == (self.epochs is None):
            raise ValueError("schedule: give the ramp length as exactly one of steps or epochs, e.g. {steps: 100}")
        return self


class PruneConfig(Strict):
    """``prune: {method: magnitude, sparsity: 0.5}`` (see the module docstring)."""

    method: Literal["magnitude", "wanda", "structured"] = "magnitude"
    sparsity: float | None = Field(None, description="fraction of the targeted weights to prune, in [0, 1)")
    scope: Literal["layer", "global"] = Field("layer", description="magnitude: per layer, or one threshold for all")
    pattern: str | None = Field(None, description='N:M semi-structured sparsity, e.g. "2:4"')
    include: list[str] | None = Field(None, description="module-name globs to prune instead of the blocks' linears")
    exclude: list[str] = Field(default_factory=list, description="module-name globs to leave dense")
    calibration: Calibration = Calibration()
    schedule: Schedule | None = None
    heads: float = Field(0.0, ge=0, lt=1, description="structured: fraction of attention heads to remove")
    ffn: float = Field(0.0, ge=0, lt=1, description="structured: fraction of FFN neurons to remove")
    layers: NonNegativeInt | list[NonNegativeInt] = Field(0, description="structured: how many blocks to remove, or which")
    importance: Literal["gradient", "weight", "activation"] = "gradient"
    recover: RecoverConfig | None = None

    @field_validator("sparsity")
    @classmethod
    def _fraction(cls, v):
        if v is not None and not 0 <= v < 1:
            raise ValueError(f"sparsity {v} is outside [0, 1); give the fraction of weights to prune, e.g. 0.5")
        return v

    @field_validator("pattern")
    @classmethod
    def _pattern(cls, v):
        if v is not None:
            parse_pattern(v)
        return v

    @model_validator(mode="after")
    def _consistent(self):
        # Fields count as given when they differ from their defaults: a resolved
        # recipe (as torchrun ranks read it) spells out every default.
        given = {k for k, f in type(self).model_fields.items() if getattr(self, k) != f.get_default(call_default_factory=True)}
        if self.method == "structured":
            _check_structured(self, given)
        else:
            _check_unstructured(self, given)
        return self

    @property
    def target(self) -> float:
        """The sparsity asked for (implied by ``pattern`` when given)."""
        if self.pattern is not None:
            n, m = parse_pattern(self.pattern)
            return 1 - n / m
        return self.sparsity


def _check_structured(c: PruneConfig, given: set) -> None:
    wrong = [f for f in UNSTRUCTURED_FIELDS if f in given]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: not used by method structured (it takes heads, ffn, layers, importance)")
    if not (c.heads or c.ffn or c.layers):
        raise ValueError("method structured removes nothing: set heads, ffn or layers")
    if c.layers and c.importance == "weight":
        raise ValueError("layers: importance 'weight' has no score for whole layers; use importance: gradient or activation")


def _check_unstructured(c: PruneConfig, given: set) -> None:
    wrong = [f for f in STRUCTURED_FIELDS if f in given]
    if wrong:
        raise ValueError(f"{', '.join(wrong)}: only used by method structured, not {c.method}")
    if c.sparsity is None and c.pattern is None:
        raise ValueError(f"sparsity: method {c.method} needs a sparsity (e.g. 0.5) or an N:M pattern (e.g. \"2:4\")")
    if c.pattern is not None:
        if c.sparsity is not None and not math.isclose(c.sparsity, c.target):
            raise ValueError(f"sparsity {c.sparsity} disagrees with pattern {c.pattern} (sparsity {c.target:g}); give only one")
        if c.scope == "global" or c.schedule is not None:
            raise ValueError(f"pattern: {c.pattern} fixes N of every M weights; it takes neither scope: global nor a schedule")
    if c.method == "wanda" and c.scope == "global":
        raise ValueError("scope: wanda compares scores within each output row; scope global is for magnitude")
    if c.schedule is not None:
        if c.recover is None:
            raise ValueError("schedule: gradual pruning happens during recovery training; add recover: {epochs: N}")
        if c.schedule.initial > c.sparsity:
            raise ValueError(f"schedule: initial sparsity {c.schedule.initial} is above the final sparsity {c.sparsity}")


def prune_config(**fields) -> PruneConfig:
    """A validated :class:`PruneConfig`; bad values raise :class:`SlimTuneError` naming the field."""
    return PruneConfig.from_fields(fields, "see help(slimtune.compress.prune_)")


# ---------------------------------------------------------------- one-shot pruning (the Python verb)

def prune_(model: nn.Module, method: str = "magnitude", sparsity: float | None = None, pattern: str | None = None,
           scope: str = "layer", batches: list[dict] | None = None, include: list[str] | None = None,
           exclude: list[str] = (), heads: float = 0.0, ffn: float = 0.0, layers: int | list[int] = 0,
           importance: str = "gradient", loss_fn=None) -> dict:
    """Prune ``model`` in place, once; returns a report (JSON-serialisable but for ``masks``).

    Args:
        model: a transformers model (BERT or Llama family by default; any
            model with ``include`` globs for unstructured methods).
        method: ``magnitude`` | ``wanda`` | ``structured``.
        sparsity: fraction of the targeted weights to prune, in [0, 1).
        pattern: ``"N:M"`` instead of ``sparsity`` (keep N of every M inputs of a row).
        scope: magnitude: ``layer`` (each linear alone) or ``global`` (one threshold).
        batches: calibration batches (Collator output) for Wanda and data-based structured importance.
        include, exclude: module-name globs of the linears to prune / leave.
        heads, ffn, layers, importance, loss_fn: structured pruning (see ``prune_structured_``).

    Returns:
        Unstructured: ``{"method", "target", "scope", "pattern", "modules": {name:
        measured sparsity}, "overall", "zeros", "weights", "masks"}`` (``masks``:
        a dict of boolean tensors that prints as a summary; not JSON, drop it before saving). Structured: the report of
        ``prune_structured_`` with ``"method"``.

    Raises:
        SlimTuneError: a bad argument (named), or Wanda without batches.
    """
    config = prune_config(method=method, sparsity=sparsity, pattern=pattern, scope=scope, include=include, exclude=list(exclude),
                          heads=heads, ffn=ffn, layers=layers, importance=importance)
    return prune_once_(model, config, batches, loss_fn)


def prune_once_(model: nn.Module, config: PruneConfig, batches: list[dict] | None, loss_fn=None) -> dict:
    if config.method == "structured":
        report = prune_structured_(model, config.heads, config.ffn, config.layers, config.importance, batches, loss_fn)
        return {"method": "structured", **report}
    modules = target_linears(model, config.include, config.exclude)
    if config.method == "wanda":
        if not batches:
            raise SlimTuneError("batches: wanda needs calibration batches", "pass a few batches of task text (Collator output)")
        masks = wanda_sequential_(model, modules, batches, config.sparsity, config.pattern)
    else:
        masks = magnitude_masks(modules, config.sparsity, config.scope, config.pattern)
        apply_masks_(model, masks)
    return {**sparsity_report(model, config, masks), "masks": MaskSet(masks)}


def sparsity_report(model: nn.Module, config: PruneConfig, masks: Masks) -> dict:
    return {"method": config.method, "target": config.target, "scope": "row" if config.method == "wanda" else config.scope,
            "pattern": config.pattern, **measure_sparsity(model, list(masks))}


# ---------------------------------------------------------------- the stage

@register_stage("prune")
class Prune:
    """Prune the artifact's model (see the module docstring); recover it if asked."""

    changes_model = True
    main_process_only = False
    Config = PruneConfig

    @staticmethod
    def compose(config: PruneConfig, state: ModelState, this: str) -> ModelState:
        """Needs float linears; structured pruning also needs unshared layers and leaves at least one."""
        if state.quantized:
            raise CompositionError(f"{this} needs float linears, but {state.quantized} quantized them",
                                   "put prune before quantize")
        if config.method != "structured":
            return state.but(sparse=this)
        if state.shared:
            raise CompositionError(f"{this} (method structured) removes heads, neurons or layers of each layer on its own, "
                                   f"but {state.shared} made layers share their weights",
                                   "prune (structured) before share, removing whole layers only (layers: N) so the rest keep one shape; "
                                   "or leave out one of the two")
        removed = config.layers if isinstance(config.layers, int) else len(config.layers)
        layers = state.layers
        if layers is not None:
            beyond = [i for i in (config.layers if isinstance(config.layers, list) else []) if i >= layers]
            if beyond:
                raise CompositionError(f"{this}: layers {beyond} do not exist; the model entering it has {layers} layers "
                                       f"(0..{layers - 1})", "name existing layers")
            if removed >= layers:
                raise CompositionError(f"{this}: removing {removed} of the {layers} layers the model has there would leave none",
                                       f"remove at most {layers - 1}")
            layers -= removed
        return state.but(uneven=this if config.heads or config.ffn else state.uneven, layers=layers)

    def run(self, ctx: StageContext, config: PruneConfig) -> StageResult:
        art = ctx.artifact
        model = art.model
        teacher = frozen_copy(model) if config.recover and config.recover.distill else None
        batches = calibration_batches(ctx, config)
        metrics: dict = {}
        if config.schedule is not None:
            model, masks, metrics = prune_gradually(ctx, config, model, teacher, batches)
        else:
            report = prune_once_(model, config, batches, ctx.kind.loss)
            masks = report.pop("masks", None)
            if config.recover is not None:
                keep = (lambda m: apply_masks_(m, masks)) if masks else None
                model, metrics = recover(ctx, model, config.recover, teacher, after_step=keep)
        if config.method == "structured":
            art.module_attrs = report.pop("module_attrs")
            art.compression["prune"] = report
            metrics.update({k: report[k] for k in ("parameters_before", "block_parameters_before", "block_parameters_after")},
                           parameters=report["parameters_after"])
        else:
            if config.recover is not None:  # what training left, before re-applying the final masks
                metrics["sparsity_after_recovery"] = measure_sparsity(model, list(masks))["overall"]
            apply_masks_(model, masks)  # a restored best epoch may predate the last pruning step
            art.compression["prune"] = sparsity_report(model, config, masks)
            metrics["sparsity"] = art.compression["prune"]["overall"]
        art.model = model
        return StageResult(art, metrics)


def prune_gradually(ctx: StageContext, config: PruneConfig, model: nn.Module, teacher, batches) -> tuple[nn.Module, Masks, dict]:
    """Recovery training that prunes on the cubic schedule; returns (model, final masks, metrics)."""
    pruner = gradual_pruner(ctx, config, model, batches)
    pruner.start_(model)
    model, metrics = recover(ctx, model, config.recover, teacher, after_step=pruner)
    if not pruner.history or pruner.history[-1][1] != config.sparsity:  # e.g. a resumed run restarted the count
        pruner.prune_(model, config.sparsity)
    metrics["schedule"] = [list(h) for h in pruner.history]
    return model, pruner.masks, metrics


def calibration_batches(ctx: StageContext, config: PruneConfig) -> list[dict] | None:
    """The calibration batches, when the method reads data."""
    if config.method == "magnitude" or (config.method == "structured" and config.importance == "weight"):
        return None
    size = ctx.train.eval_batch_size
    return ctx.batches(config.calibration.split, limit=config.calibration.batches * size)


def gradual_pruner(ctx: StageContext, config: PruneConfig, model: nn.Module, batches) -> GradualPruner:
    """The ``after_step`` hook of a scheduled run, its ramp checked against the recovery's length.

    Raises:
        SlimTuneError: the ramp ends after recovery does.
    """
    s = config.schedule
    per_epoch, total = recovery_steps(ctx, config.recover)
    steps = s.steps or max(1, round(s.epochs * per_epoch))
    if s.start + steps > total:
        raise SlimTuneError(f"schedule: the ramp ends at step {s.start + steps} but recovery takes only {total} steps",
                            f"shorten the schedule (steps <= {total - s.start}) or recover for more epochs")
    modules = target_linears(model, config.include, config.exclude)
    if config.method == "wanda":
        # One pass over the dense model, before training: masks are recomputed at every pruning step from the
        # current weights, and walking the blocks again each time (under FSDP too) would cost a calibration per step.
        norms = input_norms(model, modules, batches)
        scorer, scope = (lambda name, w: wanda_scores(w, norms[name])), "row"
    else:
        scorer, scope = (lambda name, w: magnitude_scores(w)), config.scope
    return GradualPruner(list(modules), scorer, config.sparsity, steps, s.every or max(1, math.ceil(steps / 10)),
                         s.initial, s.start, scope)


def recovery_steps(ctx: StageContext, config: RecoverConfig) -> tuple[int, int]:
    """(optimizer steps per epoch, total steps) recovery will take, counted as the Trainer counts them."""
    train = ctx.train
    strategy = ctx.strategy or SingleDevice(device_of(train))
    batches = len(strategy.batches(ctx.data()["train"], train.batch_size, True, train.seed, train.group_by_length))
    per_epoch = math.ceil(batches / train.grad_accum)
    return per_epoch, min(per_epoch * config.epochs, config.max_steps or math.inf)
