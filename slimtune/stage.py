"""What a stage is, and what the runner hands it.

A stage is a small class registered by name (``@register_stage("finetune")``)
with a typed ``Config`` (a :class:`slimtune.recipe.Strict` model) and
``run(ctx, config) -> StageResult``. Stages that only measure or export set
``changes_model = False``; the runner then links the input's weight files
instead of writing them again. Under several processes every rank runs every
stage (training is collective), except stages that set
``main_process_only = True`` (measuring, exporting), which run on rank 0
while the others wait.

Stages that change the model also say, at validation, what they need from
the model they receive and what they leave: ``compose(config, state) ->
state`` on :class:`ModelState` (quantized? layers sharing weights? sparse?
blocks of unequal widths? how many blocks?), raising :class:`CompositionError`
for an order or option they cannot take, so a bad chain is refused before
anything is written. A stage without ``compose`` passes the state through.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar, Protocol

import torch

from slimtune.artifact import Artifact, attached, bare
from slimtune.data import TaskData, load_task_data
from slimtune.errors import RecipeError
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


class CompositionError(RecipeError):
    """A stage cannot take the model an earlier stage of the recipe leaves (found at validation)."""


@dataclass(frozen=True)
class ModelState:
    """What recipe validation knows of the model entering a stage.

    Each flag names the earlier stage that caused it, as ``"stages[2] quantize"``
    (None: not so), so a refusal can say which stage is in the way.

    Attributes:
        quantized: linears were swapped for packed quantized modules.
        shared: transformer blocks share weights (cross-layer sharing).
        sparse: the weights carry pruning's zeros (unstructured or N:M).
        uneven: structured pruning removed heads or FFN neurons, so blocks may differ in width.
        layers: transformer blocks (None: unknown, e.g. before the model is read).
        model_type: the source model's ``config.model_type`` (None: unknown); stages keep it.
        deltas: names of the deltas attached (and not merged) by delta stages; delta_methods: their methods.
        delta_stage: the first stage that attached one.
    """

    quantized: str | None = None
    shared: str | None = None
    sparse: str | None = None
    uneven: str | None = None
    layers: int | None = None
    model_type: str | None = None
    deltas: tuple[str, ...] = ()
    delta_methods: tuple[str, ...] = ()
    delta_stage: str | None = None

    def but(self, **changes) -> "ModelState":
        return replace(self, **changes)


def compose_stages(stages: list, state: ModelState, where=lambda i: f"stages[{i}]") -> ModelState:
    """Walk validated stage specs through their ``compose``; returns the final state.

    Args:
        where: stage index -> where it is written (``recipe.yaml:12``), prefixed to a refusal.

    Raises:
        CompositionError: naming the stage, the earlier stage in the way, and the fix.
    """
    from slimtune.registry import get_stage

    for i, spec in enumerate(stages):
        cls = get_stage(spec.name)
        if state.deltas and cls.changes_model and not getattr(cls, "takes_deltas", False):
            raise CompositionError(
                f"{where(i)}: stages[{i}] {spec.name} would change the backbone, but {state.delta_stage} attached "
                f"delta(s) {', '.join(state.deltas)} that are bound to it",
                f"put {spec.name} before {state.delta_stage}, or fold the delta in with merge: true")
        compose = getattr(cls, "compose", None)
        if compose is not None:
            try:
                state = compose(spec.config, state, f"stages[{i}] {spec.name}")
            except CompositionError as err:
                raise CompositionError(f"{where(i)}: {err.message}", err.hint) from None
    return state


def initial_state(model: str) -> ModelState:
    """The state of the recipe's source model: float, unshared, dense; its block count if its config is at hand."""
    import json

    from slimtune.assets import cache_dir
    from slimtune.models import resolve_model_dir

    try:
        path = Path(cache_dir() / "smollm2-135m-instruct" if model == "embedded:smollm2" else resolve_model_dir(model))
        config = json.loads((path / "config.json").read_text())
    except Exception:  # unknown, not yet converted, or a hub id: the runner reports a bad model itself
        return ModelState()
    layers = config.get("num_hidden_layers", config.get("n_layer"))
    return ModelState(layers=layers if isinstance(layers, int) else None, model_type=config.get("model_type"))


def keepers(artifact: Artifact, model) -> list:
    """The ``after_step`` hooks that keep ``artifact``'s compression properties while ``model`` trains.

    Only when ``model`` is the artifact's own model: a new student (``distill``)
    starts without them.
    """
    from slimtune.registry import INVARIANTS, ensure_loaded

    if artifact is None or model is not artifact.model or not artifact.compression or attached(model):
        return []  # (under a delta the backbone is frozen: nothing can undo its properties)
    ensure_loaded()
    hooks = [INVARIANTS[key].keep(model, record) for key, record in artifact.compression.items() if key in INVARIANTS]
    return [h for h in hooks if h is not None]


def reconcile(artifact: Artifact, stage: str) -> list[str]:
    """Re-check every compression record against the model a stage left; returns the warnings.

    A record a stage invalidated is recomputed or dropped (see
    :class:`slimtune.registry.Invariant`), and the user is told, e.g. that
    ``share: {init: mean}`` averaged differently pruned layers.
    """
    from slimtune.registry import INVARIANTS, ensure_loaded

    ensure_loaded()
    notes = []
    for key in list(artifact.compression):
        if key not in INVARIANTS:
            continue
        with bare(artifact.model):  # records describe the backbone, not the deltas on it
            record, message = INVARIANTS[key].check(artifact.model, artifact.compression[key])
        if record is None:
            del artifact.compression[key]
        else:
            artifact.compression[key] = record
        if message:
            notes.append(f"{stage}: {message}")
    return notes


class Stage(Protocol):
    name: ClassVar[str]
    Config: ClassVar[type[Strict]]
    changes_model: ClassVar[bool]
    main_process_only: ClassVar[bool]

    def run(self, ctx: StageContext, config: Strict) -> StageResult: ...
