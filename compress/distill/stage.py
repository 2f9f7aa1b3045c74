"""``distill``: replace the model by a smaller student trained to match it.

    - distill: {student: {layers: [0, 2, 4]}, temperature: 2.0, losses: {soft: 1.0, hard: 1.0}, epochs: 2}

The teacher is the artifact entering the stage (or ``teacher: <artifact
dir>``), frozen and replicated on every rank; the student is built from it
(:mod:`~slimtune.compress.distill.student`) and trained through
``Trainer.for_stage``, so the stage runs single-process, under DDP and under
FSDP (which shards the student's blocks). Evaluates the student on the
validation split after each epoch and keeps the best epoch, like
``finetune``. Everything the recipe names (layers, layer map, losses for this
task) is checked against the models before training starts, so a bad recipe
writes nothing.

Limits: not under the pipeline strategy; the teacher must use the same
tokenizer (same vocabulary) and task kind as the artifact.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Literal

from pydantic import Field

from slimtune.artifact import Artifact, load
from slimtune.compress.distill.distill import prepare_distillation
from slimtune.compress.distill.objective import DistillConfig
from slimtune.compress.distill.student import StudentSpec, build_student, describe_student, kept_layers, remap_module_attrs
from slimtune.errors import RecipeError
from slimtune.models import parameter_count
from slimtune.registry import register_stage
from slimtune.stage import CompositionError, ModelState, StageContext, StageResult
from slimtune.distributed.trainer import Trainer, seed_everything, stage_metrics, task_eval_fn


@register_stage("distill")
class Distill:
    changes_model = True
    main_process_only = False

    class Config(DistillConfig):
        student: StudentSpec = Field(description="layers: [0, 2, 4] | every_other, first: N, or a narrower config")
        teacher: str | None = Field(None, description="artifact directory of the teacher (default: the input artifact)")
        epochs: int = Field(1, ge=1)
        lr: float | None = Field(None, gt=0, description="overrides train.lr for this stage")
        max_steps: int | None = Field(None, ge=1, description="stop after this many optimizer steps")
        eval_split: Literal["validation", "test", "none"] = "validation"

    @staticmethod
    def compose(config: Config, state: ModelState, this: str) -> ModelState:
        """A student from the teacher's layers needs float layers that exist; a new student starts afresh."""
        spec = config.student
        if not spec.from_teacher_layers:
            return ModelState(layers=spec.num_layers or state.layers)
        if state.quantized:
            raise CompositionError(f"{this} builds its student from the teacher's layers, but {state.quantized} quantized them",
                                   "distill before quantize, or give the student a narrower config of its own "
                                   "(student: {num_layers: N, hidden_size: H})")
        if spec.first is not None:
            field, named, kept = "student.first", list(range(spec.first)), spec.first
        elif spec.layers == "every_other":
            field, named, kept = "student.layers", [], None if state.layers is None else -(-state.layers // 2)
        else:
            field, named, kept = "student.layers", list(spec.layers), len(spec.layers)
        if state.layers is not None and any(i >= state.layers for i in named):
            raise CompositionError(f"{this}: {field} keeps layers {named}, but the model entering it has {state.layers} "
                                   f"layers (0..{state.layers - 1})", "keep existing layers")
        # The student is trained densely (no pruning kept) and keeps the teacher's widths and ties.
        return state.but(sparse=None, layers=kept)

    def run(self, ctx: StageContext, config: Config) -> StageResult:
        if ctx.strategy is not None and ctx.strategy.name == "pipeline":
            raise RecipeError("distill does not support strategy pipeline yet; use ddp or fsdp",
                              "set distributed.strategy: ddp (or fsdp)")
        art, kind = ctx.artifact, ctx.kind
        teacher = load_teacher(art, config.teacher)
        if art.swaps and config.student.from_teacher_layers:
            raise RecipeError("student.layers: a student cannot keep layers of a model with swapped (e.g. quantized) modules",
                              "distil before quantizing, or use a narrower random student")
        examples = ctx.data()["train"]
        labelled = bool(examples) and "label" in examples[0]
        seed_everything(ctx.train.seed)  # random students and projections: the same on every rank
        student = build_student(teacher, config.student)
        setup = prepare_distillation(teacher, student, kind, config, labelled)
        eval_fn = task_eval_fn(ctx, config.eval_split) if labelled or kind.name == "causal-lm" else None
        trainer = Trainer.for_stage(ctx, setup.model, setup.objective, eval_fn, kind.metric, kind.higher_is_better,
                                    collate=setup.collate(ctx.collator()))
        setup.objective.to(trainer.strategy.device)
        result = trainer.fit(setup.examples(examples), config.epochs, lr=config.lr, max_steps=config.max_steps)
        student = setup.finish(trainer.trained_model())
        setup.objective.teacher.cpu()

        record = {**describe_student(teacher, student, config.student), "losses": setup.weights.active(),
                  "temperature": config.temperature, "teacher": config.teacher or "input"}
        if setup.weights.hidden or setup.weights.attention:
            record["layer_map"] = {str(s): t for s, t in setup.layer_map.items()}
        attrs = remap_module_attrs(teacher, art.module_attrs, kept_layers(teacher, config.student)) \
            if config.student.from_teacher_layers and art.module_attrs else {}
        out = replace(art, model=student, compression={**art.compression, "distill": record}, module_attrs=attrs,
                      swaps=[])
        metrics = stage_metrics(result, trainer.strategy.world_size, config.eval_split if eval_fn else None)
        metrics.update(student_parameters=parameter_count(student), teacher_parameters=parameter_count(teacher))
        return StageResult(out, metrics)


def load_teacher(art: Artifact, path: str | None):
    """The teacher model: the input artifact's, or the artifact at ``path`` (same vocabulary and task kind)."""
    if path is None:
        return art.model
    other = load(path)
    if other.task.kind != art.task.kind:
        raise RecipeError(f"teacher: {path} is a {other.task.kind} model but this task is {art.task.kind}",
                          "name a teacher artifact trained for the same task kind")
    if other.tokenizer.get_vocab() != art.tokenizer.get_vocab():
        raise RecipeError(f"teacher: {path} uses a different vocabulary from the model being distilled",
                          "student and teacher must share the tokenizer")
    return other.model

