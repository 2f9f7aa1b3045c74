"""Teacher-student distillation from Python: ``distill(teacher, student, examples, ...)``.

Knowledge distillation (Hinton et al., 2015) trains a smaller student to
match a frozen teacher: soft labels with a temperature, optionally the hard
task loss, intermediate hidden states and attention maps (TinyBERT, Jiao et
al., 2020; MiniLM, Wang et al., 2020), or pooled sentence embeddings for
task-agnostic distillation of encoders on raw text. Training goes through the
one :class:`~slimtune.distributed.trainer.Trainer`, so precision, gradient
accumulation and DDP/FSDP come with it; the teacher is a plain module
replicated on every rank. The ``distill`` recipe stage is a thin layer over
:func:`prepare_distillation`.

    from slimtune.compress import distill
    result = distill(teacher, {"layers": [0, 2, 4]}, examples, kind="classification",
                     collate=collator, temperature=2.0, losses={"soft": 1.0, "hard": 1.0})
    result.student   # a plain transformers model with 3 layers

Limits: student and teacher share the tokenizer (same input ids); the
pipeline strategy is not supported.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from slimtune import arch
from slimtune.compress.distill.objective import (DistillationModel, DistillConfig, DistillObjective, LossWeights,
                                                 TeacherCache, default_weights, uniform_layer_map)
from slimtune.compress.distill.student import StudentSpec, _recipe_error, build_student
from slimtune.errors import RecipeError
from slimtune.recipe import TrainConfig
from slimtune.stage import device_of
from slimtune.tasks import label_key, task_kind
from slimtune.distributed.strategy import SingleDevice
from slimtune.distributed.trainer import Trainer, TrainResult, seed_everything


@dataclass(frozen=True)
class IndexedCollator:
    """Adds each example's position in the training list (``batch["index"]``), the teacher cache's key."""

    collate: Callable

    def __call__(self, examples: list[dict]) -> dict:
        batch = self.collate(examples)
        batch["index"] = torch.tensor([e["_index"] for e in examples])
        return batch


@dataclass
class Distillation:
    """Everything one distillation run trains with, built (and validated) before any training.

    Attributes:
        model: the :class:`DistillationModel` (student + projections) the Trainer trains.
        objective: the Trainer's ``loss_fn``.
        weights: the resolved loss weights.
        layer_map: the resolved ``{student_layer: teacher_layer}`` map.
    """

    model: DistillationModel
    objective: DistillObjective
    weights: LossWeights
    layer_map: dict[int, int]
    attn_implementations: tuple[str | None, str | None]  # (student, teacher) before eager was forced

    def collate(self, base: Callable) -> Callable:
        return IndexedCollator(base) if self.objective.cache is not None else base

    def examples(self, examples: list[dict]) -> list[dict]:
        """The training examples, each with its ``_index`` when the teacher is cached."""
        if self.objective.cache is None:
            return examples
        return [{**e, "_index": i} for i, e in enumerate(examples)]

    def finish(self, trained: DistillationModel) -> nn.Module:
        """The trained student (projections dropped), with its attention implementation restored."""
        student = trained.student
        original_student, original_teacher = self.attn_implementations
        if original_student is not None:
            student.set_attn_implementation(original_student)
            self.objective.teacher.set_attn_implementation(original_teacher)
        return student.eval()


def resolve_weights(config: DistillConfig, kind, labelled: bool) -> LossWeights:
    """The loss weights (defaults by task kind), checked against what the task and data provide.

    Raises:
        RecipeError: a soft loss for a model without logits, a hard loss without labels.
    """
    weights = config.losses or default_weights(kind.name)
    if weights.soft and kind.name == "embedding":
        raise RecipeError("losses.soft: an embedding model has no logits to soften",
                          "use losses.embedding (and hidden/attention) for embedding tasks")
    if weights.hard and not labelled and kind.name != "causal-lm":
        raise RecipeError(f"losses.hard: the {kind.name} task loss needs labels, and the training data has none",
                          "set losses.hard: 0 (distil from the teacher alone) or give the task a label column")
    return weights


def resolve_layer_map(student: nn.Module, teacher: nn.Module, config: DistillConfig) -> dict[int, int]:
    """``config.layer_map`` checked against both models, or the uniform map.

    Raises:
        RecipeError: a mapped layer does not exist in the student or the teacher (names ``layer_map``).
    """
    if config.layer_map is None:
        return uniform_layer_map(arch.num_layers(student), arch.num_layers(teacher))
    _recipe_error(arch.check_layer_indices, student, list(config.layer_map), "layer_map (student layers, the keys)")
    _recipe_error(arch.check_layer_indices, teacher, sorted(set(config.layer_map.values())), "layer_map (teacher layers, the values)")
    return dict(config.layer_map)


def prepare_distillation(teacher: nn.Module, student: nn.Module, kind, config: DistillConfig, labelled: bool = True) -> Distillation:
    """Validate the configuration against the two models and build the trainable wrapper and the objective.

    Call after seeding: the projections (when widths differ) start random.
    The teacher is frozen (eval mode, no gradients); with an attention loss,
    both models switch to eager attention (the only one returning probabilities).

    Raises:
        RecipeError: see :func:`resolve_weights` and :func:`resolve_layer_map`.
    """
    kind = task_kind(kind) if isinstance(kind, str) else kind
    weights = resolve_weights(config, kind, labelled)
    layer_map = resolve_layer_map(student, teacher, config)
    originals: tuple[str | None, str | None] = (None, None)
    if weights.attention:
        originals = (student.config._attn_implementation, teacher.config._attn_implementation)
        student.set_attn_implementation("eager")
        teacher.set_attn_implementation("eager")
    model = DistillationModel(student, weights, layer_map, teacher.config.hidden_size)
    cache = TeacherCache() if config.cache_teacher else None
    objective = DistillObjective(teacher, kind, weights, config.temperature, layer_map, config.embedding_kind, cache)
    return Distillation(model, objective, weights, layer_map, originals)


@dataclass
class DistillResult:
    student: nn.Module
    train: TrainResult
    distillation: Distillation


def distill(teacher: nn.Module, student: nn.Module | StudentSpec | dict, examples: list[dict], *, collate: Callable,
            kind="classification", config: DistillConfig | None = None, train: TrainConfig | None = None,
            epochs: int = 1, lr: float | None = None, max_steps: int | None = None, strategy=None,
            eval_fn: Callable[[nn.Module], dict] | None = None, metric: str | None = None, higher_is_better: bool = True,
            **options) -> DistillResult:
    """Distil ``teacher`` into ``student`` on ``examples``.

    Args:
        teacher: a transformers model (frozen during distillation).
        student: a model, or a student spec (``{"layers": [0, 2]}``, ``{"first": 3}``,
            ``{"layers": "every_other"}``, ``{"hidden_size": 64, "num_heads": 2, ...}``)
            built from the teacher by :func:`~slimtune.compress.distill.student.build_student`.
        examples: training examples (``{"text": ..., "label": ...}``, or ``"labels"`` as in Hugging Face datasets; labels optional).
        collate: list of examples -> batch of tensors (e.g. :class:`slimtune.tasks.Collator`).
        kind: the task kind name or object (its loss is the ``hard`` loss).
        config: a :class:`DistillConfig`; or give its fields as keyword ``options``
            (``losses={"soft": 1.0}``, ``temperature=2.0``, ``layer_map={0: 1}``, ``cache_teacher=True``).
        train: batch size, lr, precision, seed... (default :class:`~slimtune.recipe.TrainConfig`).
        epochs, lr, max_steps: training length and learning-rate override.
        strategy: a Trainer strategy (default: one device from ``train.device``).
        eval_fn, metric, higher_is_better: per-epoch evaluation of the student; best epoch kept.

    Returns:
        :class:`DistillResult` with the trained ``student`` (plain CPU module) and the training history.

    Raises:
        RecipeError: invalid student spec, layer map or losses for this task.
    """
    kind = task_kind(kind) if isinstance(kind, str) else kind
    config = config or DistillConfig(**options)
    train = train or TrainConfig()
    strategy = strategy or SingleDevice(device_of(train))
    seed_everything(train.seed)
    if not isinstance(student, nn.Module):
        student = build_student(teacher, student)
    setup = prepare_distillation(teacher, student, kind, config, labelled=bool(examples) and label_key(examples[0]) is not None)
    trainer = Trainer(setup.model, setup.objective, train, strategy, setup.collate(collate), eval_fn, metric, higher_is_better)
    setup.objective.to(strategy.device)
    result = trainer.fit(setup.examples(examples), epochs, lr=lr, max_steps=max_steps)
    return DistillResult(setup.finish(trainer.trained_model()), result, setup)
