"""Students built from a teacher: a subset of its layers, or a narrower copy of its config.

* Layer subsets (``layers: [0, 2, 4]``, ``layers: every_other``, ``first: 3``)
  copy the teacher and keep those blocks, so embeddings, kept blocks and
  the task head start from the teacher's weights - the DistilBERT
  initialisation (Sanh et al., 2019, which takes every other layer).
* A narrower config (``hidden_size``, ``num_layers``, ``num_heads``,
  ``num_kv_heads``, ``intermediate_size``; unset values come from the
  teacher) is the teacher's config with those overrides, initialised
  randomly by the model class, with the same tokenizer and task head shape.

Both work for every family :mod:`slimtune.arch` knows (BERT-style
encoders, Llama-style decoders). Limits: a layer-subset student of a model
with swapped (e.g. quantized) modules is not supported.
"""

from __future__ import annotations

import copy
from typing import Literal

from pydantic import Field, model_validator
from torch import nn

from slimtune import arch
from slimtune.errors import RecipeError, SlimTuneError
from slimtune.recipe import Strict

WIDTH_FIELDS = ("hidden_size", "num_layers", "num_heads", "num_kv_heads", "intermediate_size")


class StudentSpec(Strict):
    """Which student to build: exactly one of ``layers``, ``first``, or the width fields."""

    layers: list[int] | Literal["every_other"] | None = Field(
        None, description="teacher layers to keep (DistilBERT-style init), or every_other")
    first: int | None = Field(None, ge=1, description="keep the teacher's first N layers")
    hidden_size: int | None = Field(None, gt=0, description="narrower random student: hidden width")
    num_layers: int | None = Field(None, gt=0, description="narrower random student: number of blocks")
    num_heads: int | None = Field(None, gt=0, description="narrower random student: attention heads")
    num_kv_heads: int | None = Field(None, gt=0, description="narrower random decoder student: key/value heads")
    intermediate_size: int | None = Field(None, gt=0, description="narrower random student: FFN width")

    @model_validator(mode="after")
    def _one_kind(self):
        chosen = [self.layers is not None, self.first is not None, any(getattr(self, f) is not None for f in WIDTH_FIELDS)]
        if sum(chosen) != 1:
            raise ValueError("give exactly one of: layers (a list or every_other), first, "
                             "or a narrower config (hidden_size / num_layers / num_heads / intermediate_size)")
        if isinstance(self.layers, list) and not self.layers:
            raise ValueError("layers must name at least one teacher layer")
        return self

    @property
    def from_teacher_layers(self) -> bool:
        return self.layers is not None or self.first is not None


def kept_layers(teacher: nn.Module, spec: StudentSpec) -> list[int]:
    """The teacher layers a layer-subset student keeps, checked against the teacher.

    Raises:
        RecipeError: a layer does not exist or repeats (names ``student.layers`` / ``student.first``).
    """
    n = arch.num_layers(teacher)
    if spec.first is not None:
        indices, field = list(range(spec.first)), "student.first"
    elif spec.layers == "every_other":
        indices, field = list(range(0, n, 2)), "student.layers"
    else:
        indices, field = list(spec.layers), "student.layers"
    return _recipe_error(arch.check_layer_indices, teacher, indices, field)


def student_config(teacher: nn.Module, spec: StudentSpec):
    """The teacher's config with the spec's width overrides (unset fields keep the teacher's values)."""
    config = teacher.config
    attention = arch.attention(teacher, 0)
    hidden = spec.hidden_size or config.hidden_size
    heads = spec.num_heads or attention.heads
    if hidden % heads:
        raise RecipeError(f"student.num_heads: hidden_size {hidden} must be a multiple of the head count ({heads})",
                          "set student.num_heads to a divisor of student.hidden_size")
    group = attention.heads // attention.kv_heads  # query heads per key/value head (1 for encoders)
    kv_heads = spec.num_kv_heads or (heads // group if heads % group == 0 else heads)
    if heads % kv_heads:
        raise RecipeError(f"student.num_kv_heads: {kv_heads} must divide num_heads {heads}", "choose a divisor of num_heads")
    return arch.resized_config(teacher, hidden, spec.num_layers or arch.num_layers(teacher), heads,
                               spec.intermediate_size or config.intermediate_size, kv_heads)


def build_student(teacher: nn.Module, spec: StudentSpec | dict) -> nn.Module:
    """A new student model (the teacher is left untouched).

    Args:
        teacher: a transformers model of a family :mod:`~slimtune.arch` knows.
        spec: a :class:`StudentSpec` or its dict form, e.g. ``{"layers": [0, 2]}``.

    Returns:
        A trainable model of the teacher's class (all parameters ``requires_grad``).
        Random initialisation of a narrower student uses torch's global RNG:
        seed first for reproducible (and rank-identical) students.

    Raises:
        RecipeError: layers that do not exist, incompatible head counts.
    """
    spec = StudentSpec.model_validate(spec) if isinstance(spec, dict) else spec
    _recipe_error(arch.family_of, teacher)
    if spec.from_teacher_layers:
        indices = kept_layers(teacher, spec)
        student = copy.deepcopy(teacher)
        arch.keep_layers_(student, indices)
    else:
        student = type(teacher)(student_config(teacher, spec))
    return student.requires_grad_(True).train()


def describe_student(teacher: nn.Module, student: nn.Module, spec: StudentSpec) -> dict:
    """What the artifact records about the student: the kept layers or the new widths."""
    if spec.from_teacher_layers:
        return {"layers": kept_layers(teacher, spec), "teacher_layers": arch.num_layers(teacher)}
    attention = arch.attention(student, 0)
    return {"config": {"hidden_size": student.config.hidden_size, "num_layers": arch.num_layers(student),
                       "num_heads": attention.heads, "num_kv_heads": attention.kv_heads,
                       "intermediate_size": student.config.intermediate_size},
            "teacher_layers": arch.num_layers(teacher)}


def remap_module_attrs(teacher: nn.Module, attrs: dict, indices: list[int]) -> dict:
    """Artifact ``module_attrs`` of the teacher, renumbered for a student keeping blocks ``indices``.

    Entries under dropped blocks are left out; entries outside the blocks are kept.
    """
    blocks = arch.layers(teacher)
    prefix = next(name for name, module in teacher.named_modules() if module is blocks) + "."
    new_index = {old: new for new, old in enumerate(indices)}
    out = {}
    for path, values in attrs.items():
        if not path.startswith(prefix):
            out[path] = values
            continue
        old, _, rest = path[len(prefix):].partition(".")
        if int(old) in new_index:
            out[f"{prefix}{new_index[int(old)]}" + (f".{rest}" if rest else "")] = values
    return out


def _recipe_error(fn, *args):
    """Call ``fn``, turning a SlimTuneError about the user's input into a RecipeError (CLI exit 2)."""
    try:
        return fn(*args)
    except RecipeError:
        raise
    except SlimTuneError as e:
        raise RecipeError(e.message, e.hint) from e
