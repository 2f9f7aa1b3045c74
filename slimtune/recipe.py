"""The recipe: a YAML file validated against typed models.

A recipe names a model, a task, training defaults and an ordered list of
stages, each a one-key mapping ``{stage_name: {config}}``. Every block rejects
unknown keys; errors name the key, its line in the file, and what is allowed.
``--set a.b.c=value`` overrides are applied to the raw mapping before
validation, so they are checked the same way. ``stages.<name>.key`` addresses a
stage by name (``stages.<index>.key`` when a name repeats).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import re
from importlib import resources
from pathlib import Path
from typing import Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from slimtune.errors import RecipeError


class Strict(BaseModel):
    """Base of every config block: unknown keys are errors, values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    @classmethod
    def from_fields(cls, fields: dict, hint: str):
        """Validate a Python verb's keyword arguments; a bad value raises SlimTuneError naming the field."""
        from slimtune.errors import SlimTuneError

        try:
            return cls.model_validate(fields)
        except ValidationError as err:
            first = err.errors()[0]
            where = ".".join(map(str, first["loc"]))
            raise SlimTuneError(f"{where + ': ' if where else ''}{first['msg']}", hint) from None


class SplitLimits(Strict):
    train: int | None = Field(None, gt=0)
    validation: int | None = Field(None, gt=0)
    test: int | None = Field(None, gt=0)


class TaskConfig(Strict):
    """What the model is for and which data teaches and measures it."""

    kind: Literal["classification", "causal-lm", "embedding"]
    data: Union[str, dict[str, str]]
    text: str = "text"
    text_pair: str | None = None
    label: str = "label"
    max_length: int = Field(128, gt=0, le=8192)
    limit: Union[int, SplitLimits, None] = None

    @field_validator("limit")
    @classmethod
    def _positive(cls, v):
        if isinstance(v, int) and v <= 0:
            raise ValueError("limit must be a positive number of examples")
        return v

    def split_limit(self, split: str) -> int | None:
        if isinstance(self.limit, int) or self.limit is None:
            return self.limit
        return getattr(self.limit, split, None)


class TrainConfig(Strict):
    """Defaults for every training stage (a stage may override some)."""

    batch_size: int = Field(32, gt=0)
    eval_batch_size: int = Field(64, gt=0)
    lr: float = Field(5.0e-5, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_ratio: float = Field(0.1, ge=0, lt=1)
    grad_accum: int = Field(1, gt=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    precision: Literal["fp32", "bf16", "fp16"] = Field("fp32", description="fp16 trains with a gradient scaler")
    activation_checkpointing: bool = Field(False, description="recompute each block's activations in backward (less memory, ~30% more compute)")
    checkpoint_every: int | None = Field(None, gt=0, description="save a resumable (sharded) training checkpoint every N optimizer steps")
    group_by_length: bool = Field(False, description="batch examples of similar length together (less padding)")
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    num_threads: int | None = Field(None, gt=0)


class FSDPConfig(Strict):
    reshard_after_forward: bool = Field(True, description="true: ZeRO-3 (free gathered weights after forward); false: ZeRO-2")
    cpu_offload: bool = Field(False, description="keep sharded parameters, gradients and optimizer state in CPU memory")


class PipelineConfig(Strict):
    schedule: Literal["gpipe", "1f1b"] = "1f1b"
    microbatches: int = Field(2, ge=1, description="micro-batches each (per-step) batch is cut into")


class DistributedConfig(Strict):
    """How training stages run: one process, or several under torchrun."""

    strategy: Literal["single", "ddp", "fsdp", "pipeline"] = "single"
    nproc: int = Field(1, ge=1, description="processes per machine")
    nnodes: int = Field(1, ge=1, description="machines")
    max_restarts: int = Field(0, ge=0, description="torchrun restarts after a rank dies (resumes from the last checkpoint)")
    fsdp: FSDPConfig = FSDPConfig()
    pipeline: PipelineConfig = PipelineConfig()

    @property
    def world_size(self) -> int:
        return self.nproc * self.nnodes

    @model_validator(mode="after")
    def _consistent(self):
        if self.strategy == "single" and self.world_size > 1:
            raise ValueError(f"strategy 'single' runs one process but nproc*nnodes is {self.world_size}; use strategy ddp, fsdp or pipeline")
        if self.strategy == "pipeline" and self.world_size < 2:
            raise ValueError("strategy 'pipeline' needs at least 2 processes (one per pipeline stage); set nproc: 2")
        return self


class StageSpec(BaseModel):
    """One validated entry of ``stages``: its name and typed config."""

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)
    name: str
    config: Any

    def resolved(self) -> dict:
        return self.config.model_dump(mode="json")


class Recipe(Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    model: str
    task: TaskConfig
    train: TrainConfig = TrainConfig()
    distributed: DistributedConfig = DistributedConfig()
    stages: list[StageSpec]

    def resolved(self) -> dict:
        """The recipe as plain data, every default filled in."""
        out = self.model_dump(mode="json", exclude={"stages"})
        out["stages"] = [{s.name: s.resolved()} for s in self.stages]
        return out

    def root_key(self) -> str:
        """Hash of everything a stage's input depends on before any stage ran."""
        # How training is executed (not what it computes) stays out of the key.
        base = self.model_dump(mode="json", include={"model", "task", "train"}, exclude={"train": {"activation_checkpointing", "checkpoint_every"}})
        return content_key(base)


def content_key(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------- loading


class RecipeLoader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: ``pattern: 2:4`` stays the string "2:4" (plain YAML reads 124)."""


def _without_base_60() -> None:
    # A copy: the inherited table is shared with yaml.SafeLoader and the dumpers.
    RecipeLoader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in ("tag:yaml.org,2002:int", "tag:yaml.org,2002:float")]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
        r"^(?:[-+]?0b[0-1_]+|[-+]?0[0-7_]+|[-+]?(?:0|[1-9][0-9_]*)|[-+]?0x[0-9a-fA-F_]+)$"), list("-+0123456789"))
    RecipeLoader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+][0-9]+)?|\.[0-9_]+(?:[eE][-+][0-9]+)?"
        r"|[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))


_without_base_60()


def yaml_load(text: str) -> Any:
    return yaml.load(text, Loader=RecipeLoader)  # noqa: S506 - a SafeLoader subclass


def shipped_recipes() -> dict[str, Path]:
    """Shipped recipe name -> path."""
    folder = resources.files("slimtune") / "recipes"
    return {Path(p.name).stem: Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml")}


def locate(recipe: str | Path) -> Path:
    """A recipe argument is a path to a YAML file or a shipped recipe name."""
    path = Path(recipe)
    if path.is_file():
        return path
    shipped = shipped_recipes()
    if str(recipe) in shipped:
        return shipped[str(recipe)]
    close = difflib.get_close_matches(str(recipe), shipped, n=1)
    hint = f"did you mean {close[0]!r}? " if close else ""
    raise RecipeError(
        f"recipe {str(recipe)!r} is neither a file nor a shipped recipe",
        f"{hint}pass a path to a YAML file or one of: {', '.join(sorted(shipped))}",
    )


def load_recipe(recipe: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        recipe: a YAML path or a shipped recipe name.
        overrides: ``{"train.lr": 3e-5, "stages.finetune.epochs": 2}``; values
            given as strings are parsed as YAML scalars (``"3e-5"`` -> float).

    Raises:
        RecipeError: naming the key, its line, and what is allowed.
    """
    path = locate(recipe)
    text = path.read_text()
    try:
        raw = yaml_load(text)
        root = yaml.compose(text, Loader=RecipeLoader)
    except yaml.YAMLError as err:
        raise RecipeError(f"{path}: not valid YAML: {err}", "fix the YAML syntax at the position shown") from None
    if not isinstance(raw, dict):
        raise RecipeError(f"{path}: a recipe must be a mapping of keys (name, model, task, stages, ...)")
    for key, value in (overrides or {}).items():
        apply_override(raw, key, value)
    return validate(raw, source=str(path), node=root, overridden=set(overrides or {}))


def parse_set(items: list[str]) -> dict[str, Any]:
    """Parse CLI ``--set key.path=value`` items; values are YAML scalars."""
    out = {}
    for item in items:
        if "=" not in item:
            raise RecipeError(f"--set {item!r} has no '='", "write --set key.path=value, e.g. --set train.lr=3e-5")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml_load(value) if value.strip() else ""
    return out


def apply_override(raw: dict, dotted: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``dotted = "a.b.c"``; stages by name or index."""
    if isinstance(value, str):
        try:
            value = yaml_load(value)
        except yaml.YAMLError:
            pass
    parts = dotted.split(".")
    node: Any = raw
    for i, part in enumerate(parts[:-1]):
        if isinstance(node, list):
            node = _stage_config(node, part, dotted)
            continue
        if node.get(part) is None:
            node[part] = {}
        node = node[part]
        if not isinstance(node, (dict, list)):
            raise RecipeError(f"--set {dotted}: {'.'.join(parts[:i + 1])} is a value, not a block")
    if isinstance(node, list):
        raise RecipeError(f"--set {dotted}: set a key inside the stage, e.g. --set {dotted}.epochs=2")
    node[parts[-1]] = value


def _stage_config(stages: list, ref: str, dotted: str) -> dict:
    items = [s for s in stages if isinstance(s, dict) and len(s) == 1]
    if ref.isdigit() and int(ref) < len(stages):
        entry = stages[int(ref)]
    else:
        matches = [s for s in items if ref in s]
        if len(matches) != 1:
            names = [next(iter(s)) for s in items]
            why = "appears more than once; address it by index" if matches else "is not in the recipe"
            raise RecipeError(f"--set {dotted}: stage {ref!r} {why}", f"stages are: {names} (index 0..{len(stages) - 1})")
        entry = matches[0]
    name = next(iter(entry))
    if entry[name] is None:
        entry[name] = {}
    return entry[name]


# ---------------------------------------------------------------- validation


def validate(raw: dict, source: str = "<recipe>", node: yaml.Node | None = None, overridden: set[str] = frozenset()) -> Recipe:
    """Validate raw recipe data (stages looked up in the stage registry)."""
    from slimtune.registry import STAGES, get_stage

    stages_raw = raw.get("stages")
    if not isinstance(stages_raw, list) or not stages_raw:
        raise RecipeError(f"{source}: 'stages' must be a non-empty list of {{stage_name: {{config}}}}", "e.g. stages: [{finetune: {epochs: 1}}]")
    specs = []
    for i, entry in enumerate(stages_raw):
        where = _where(source, node, ("stages", i))
        if not isinstance(entry, dict) or len(entry) != 1:
            raise RecipeError(f"{where}: stages[{i}] must be a one-key mapping like {{finetune: {{epochs: 1}}}}, got {entry!r}")
        name, cfg = next(iter(entry.items()))
        try:
            cls = get_stage(name)
        except RecipeError:
            raise RecipeError(f"{where}: unknown stage {name!r}", f"use one of: {', '.join(sorted(STAGES))}") from None
        try:
            specs.append(StageSpec(name=name, config=cls.Config.model_validate(cfg or {})))
        except ValidationError as err:
            raise RecipeError(_explain(err, source, node, ("stages", i, name), cls.Config, overridden)) from None
    try:
        recipe = Recipe.model_validate({**raw, "stages": specs})
    except ValidationError as err:
        raise RecipeError(_explain(err, source, node, (), Recipe, overridden)) from None
    from slimtune.stage import compose_stages, initial_state

    # Each stage can take what the stages before it leave (float linears, unshared weights, ...).
    compose_stages(recipe.stages, initial_state(recipe.model), where=lambda i: _where(source, node, ("stages", i)))
    return recipe


def _explain(err: ValidationError, source: str, node, prefix: tuple, model: type[BaseModel], overridden: set[str]) -> str:
    lines = []
    for e in err.errors():
        loc = prefix + tuple(p for p in e["loc"] if not (isinstance(p, str) and "[" in p))
        dotted = ".".join(str(p) for p in loc)
        where = _where(source, node, loc)
        via = " (from --set)" if any(dotted.endswith(k.split(".", 1)[-1]) for k in overridden) else ""
        if e["type"] == "extra_forbidden":
            allowed = _allowed_keys(model, loc[len(prefix):-1])
            lines.append(f"{where}: unknown key {dotted!r}{via}; allowed keys: {', '.join(allowed)}")
        else:
            lines.append(f"{where}: {dotted}{via}: {e['msg']} (got {e.get('input')!r})")
    return "invalid recipe:\n  " + "\n  ".join(lines)


def _allowed_keys(model: type[BaseModel], path: tuple) -> list[str]:
    for part in path:
        field = model.model_fields.get(str(part))
        if field is None:
            break
        ann = field.annotation
        subs = [a for a in getattr(ann, "__args__", (ann,)) if isinstance(a, type) and issubclass(a, BaseModel)]
        if not subs:
            break
        model = subs[0]
    return list(model.model_fields)


def _where(source: str, node, loc: tuple) -> str:
    """``file:line`` of the deepest YAML node on ``loc`` (the recipe's own position)."""
    line = None
    for part in loc:
        if node is None:
            break
        if isinstance(node, yaml.MappingNode):
            match = [(k, v) for k, v in node.value if k.value == str(part)]
            if not match:
                break
            key, node = match[0]
            line = key.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return f"{source}:{line}" if line else source
