"""The distillation objective: which losses, on which outputs, with which weights.

A :class:`DistillationModel` holds the student and the learned projections
(student width -> teacher width, TinyBERT's ``W_h``) and is what the Trainer
trains, so projections are optimised, sharded and checkpointed with the
student; only the student is kept afterwards. A :class:`DistillObjective` is
the Trainer's ``loss_fn``: one student forward, one (frozen, ``no_grad``)
teacher forward - or a :class:`TeacherCache` lookup - and the weighted sum of
the losses in :mod:`slimtune.compress.distill.losses`.

Loss names: ``soft`` (Hinton KL on logits), ``hard`` (the task's own loss,
``kind.loss``), ``hidden`` (MSE of hidden states over ``layer_map``),
``attention`` (KL of attention distributions over ``layer_map``),
``embedding`` (cosine/MSE of mean-pooled last hidden states).

Limits: attention KL needs attention probabilities, which transformers only
returns with eager attention, so student and teacher switch to eager (slower)
while that loss has a weight; the teacher cache keeps every example's outputs
in CPU memory (per-token logits of a causal LM are ``tokens x vocab`` each),
and assumes an example's teacher outputs do not depend on the padding around
it (right padding; left-padded decoders shift positions).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, field_validator, model_validator
from torch import Tensor, nn

from slimtune.compress.distill.losses import attention_kl, embedding_loss, hidden_mse, soft_kl
from slimtune.recipe import Strict
from slimtune.tasks import mean_pool, model_inputs


class LossWeights(Strict):
    """The weight of each distillation loss (0 = not computed)."""

    soft: float = Field(0.0, ge=0, description="KL between temperature-softened teacher and student logits (x T^2)")
    hard: float = Field(0.0, ge=0, description="the task's own loss on the labels (or next tokens)")
    hidden: float = Field(0.0, ge=0, description="MSE between mapped hidden states (TinyBERT)")
    attention: float = Field(0.0, ge=0, description="KL between mapped attention distributions (MiniLM/TinyBERT)")
    embedding: float = Field(0.0, ge=0, description="cosine/MSE between mean-pooled sentence embeddings")

    @model_validator(mode="after")
    def _some_loss(self):
        if not any(self.active().values()):
            raise ValueError("every loss weight is 0; give at least one of soft, hard, hidden, attention, embedding a weight > 0")
        return self

    def active(self) -> dict[str, float]:
        return {name: w for name, w in self.model_dump().items() if w > 0}


def default_weights(kind_name: str) -> LossWeights:
    """DistilBERT-style soft + hard for logit tasks; embedding matching for sentence encoders."""
    return LossWeights(embedding=1.0) if kind_name == "embedding" else LossWeights(soft=1.0, hard=1.0)


class DistillConfig(Strict):
    """How to distil (the student and the training length are given separately)."""

    losses: LossWeights | None = Field(None, description="loss weights; default soft 1 + hard 1 (embedding 1 for embedding tasks)")
    temperature: float = Field(2.0, gt=0, description="softmax temperature T of the soft loss")
    layer_map: dict[int, int] | None = Field(
        None, description="{student_layer: teacher_layer} for hidden/attention losses; default: uniform (last to last)")
    embedding_kind: Literal["cosine", "mse"] = "cosine"
    cache_teacher: bool = Field(False, description="keep teacher outputs in CPU memory so later epochs skip the teacher")

    @field_validator("layer_map")
    @classmethod
    def _non_negative(cls, v):
        if v is not None and (not v or any(s < 0 or t < 0 for s, t in v.items())):
            raise ValueError("layer_map must map student layer indices to teacher layer indices (both >= 0)")
        return v


def uniform_layer_map(student_layers: int, teacher_layers: int) -> dict[int, int]:
    """TinyBERT's uniform map: student layer ``i`` of ``M`` learns teacher layer ``ceil((i + 1) * N / M) - 1`` of ``N``.

    The last student layer learns the last teacher layer; a student deeper than
    its teacher maps several layers to one.
    """
    return {i: -(-(i + 1) * teacher_layers // student_layers) - 1 for i in range(student_layers)}


def last_hidden(output) -> Tensor:
    """(B, T, H) the final hidden states of a transformers output (base model or with a head)."""
    last = getattr(output, "last_hidden_state", None)
    return last if last is not None else output.hidden_states[-1]


class DistillationModel(nn.Module):
    """The student plus the projections its losses need; ``forward(**inputs)`` is the student's.

    ``forward(features=True, **inputs)`` returns ``{"output": student output,
    "hidden": {s: (B, T, H_t)}, "attentions": {s: (B, heads, T, T)},
    "embedding": (B, H_t)}`` for the layers and losses configured.
    """

    supports_gradient_checkpointing = True

    def __init__(self, student: nn.Module, weights: LossWeights, layer_map: dict[int, int], teacher_width: int):
        super().__init__()
        self.student = student
        self.layer_map = dict(layer_map)
        self.want_hidden, self.want_attention, self.want_embedding = weights.hidden > 0, weights.attention > 0, weights.embedding > 0
        self.projections = nn.ModuleDict()
        width = student.config.hidden_size
        if width != teacher_width:
            for name, wanted in (("hidden", self.want_hidden), ("embedding", self.want_embedding)):
                if wanted:
                    self.projections[name] = nn.Linear(width, teacher_width)

    def forward(self, features: bool = False, **inputs):
        if not features:
            return self.student(**inputs)
        output = self.student(**inputs, output_hidden_states=self.want_hidden or self.want_embedding,
                              output_attentions=self.want_attention)
        out = {"output": output}
        if self.want_hidden:
            out["hidden"] = {s: self._project("hidden", output.hidden_states[s + 1]) for s in self.layer_map}  # (B, T, H_t)
        if self.want_attention:
            out["attentions"] = {s: output.attentions[s] for s in self.layer_map}
        if self.want_embedding:
            out["embedding"] = self._project("embedding", mean_pool(last_hidden(output), inputs["attention_mask"]))
        return out

    def _project(self, name: str, x: Tensor) -> Tensor:
        return self.projections[name](x) if name in self.projections else x

    # Activation checkpointing goes to the student's own transformers support.
    def gradient_checkpointing_enable(self, **kwargs) -> None:
        self.student.gradient_checkpointing_enable(**kwargs)

    def gradient_checkpointing_disable(self) -> None:
        self.student.gradient_checkpointing_disable()

    @property
    def is_gradient_checkpointing(self) -> bool:
        return getattr(self.student, "is_gradient_checkpointing", False)


# How each cached output is laid out in a padded batch: one row per example,
# one per real token, or one per (real token, real token) pair per head.
EXAMPLE, TOKEN, PAIR = "example", "token", "pair"


def layout(name: str, value: Tensor) -> str:
    """The layout of teacher output ``name`` given its padded batch tensor ``value``."""
    if name.startswith("attention."):
        return PAIR
    if name.startswith("hidden.") or (name == "logits" and value.dim() == 3):
        return TOKEN
    return EXAMPLE


class TeacherCache:
    """Teacher outputs per training example, unpadded, in CPU memory (keyed by ``batch["index"]``).

    Batches are re-formed and padded differently every epoch, so each
    example's outputs are stored at its real positions only and re-padded
    for the batch that asks for them. Only missing examples go through the teacher.
    """

    def __init__(self):
        self.entries: dict[int, dict[str, Tensor]] = {}

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, batch: dict, run_teacher) -> dict[str, Tensor]:
        """Padded teacher outputs for ``batch``; ``run_teacher(inputs, mask)`` computes missing rows."""
        index, mask = batch["index"].tolist(), batch["attention_mask"]  # mask (B, T)
        missing = [row for row, i in enumerate(index) if i not in self.entries]
        if missing:
            rows = torch.tensor(missing, device=mask.device)
            inputs = {k: v[rows] for k, v in model_inputs(batch).items()}
            outputs = run_teacher(inputs, mask[rows])
            for j, row in enumerate(missing):
                self.entries[index[row]] = unpad(outputs, j, mask[row])
        return pad([self.entries[i] for i in index], mask)


def unpad(outputs: dict[str, Tensor], row: int, mask: Tensor) -> dict[str, Tensor]:
    """Row ``row`` of each padded output, at the real positions ``mask`` (T,) marks, as CPU copies."""
    real = mask.bool()
    out = {}
    for name, value in outputs.items():
        kind = layout(name, value)
        v = value[row]
        v = v[real] if kind == TOKEN else v[:, real][:, :, real] if kind == PAIR else v
        out[name] = v.to("cpu", copy=True)
    return out


def pad(entries: list[dict[str, Tensor]], mask: Tensor) -> dict[str, Tensor]:
    """Stack unpadded per-example outputs into a batch padded like ``mask`` (B, T), zeros at padding."""
    B, T = mask.shape
    out = {}
    for name, first in entries[0].items():
        kind = layout(name, first.unsqueeze(0))  # a stored entry has the batch dimension removed
        if kind == EXAMPLE:
            out[name] = torch.stack([e[name] for e in entries]).to(mask.device)  # (B, ...)
            continue
        shape = (B, T, *first.shape[1:]) if kind == TOKEN else (B, first.shape[0], T, T)
        padded = torch.zeros(shape, dtype=first.dtype, device=mask.device)
        for b, e in enumerate(entries):
            real = mask[b].bool().nonzero().squeeze(1)  # (n,)
            if kind == TOKEN:
                padded[b, real] = e[name].to(mask.device)
            else:
                padded[b][:, real[:, None], real[None, :]] = e[name].to(mask.device)
        out[name] = padded
    return out


class DistillObjective:
    """The Trainer's ``loss_fn``: ``(model, batch) -> (weighted loss, units)``.

    Args:
        teacher: frozen teacher (eval mode, no gradients); moved with :meth:`to`.
        kind: the task kind (its ``loss`` is the hard loss).
        weights: the loss weights.
        temperature: of the soft loss.
        layer_map: ``{student_layer: teacher_layer}`` for hidden/attention losses.
        embedding_kind: ``"cosine"`` or ``"mse"``.
        cache: a :class:`TeacherCache` (batches must then carry ``index``), or None.

    ``teacher_forwards`` counts teacher forward passes; ``last_terms`` holds
    the unweighted losses of the latest batch.
    """

    def __init__(self, teacher: nn.Module, kind, weights: LossWeights, temperature: float, layer_map: dict[int, int],
                 embedding_kind: str = "cosine", cache: TeacherCache | None = None):
        self.teacher = teacher.eval().requires_grad_(False)
        self.kind, self.weights, self.temperature = kind, weights, temperature
        self.layer_map, self.embedding_kind, self.cache = dict(layer_map), embedding_kind, cache
        self.teacher_forwards = 0
        self.last_terms: dict[str, float] = {}

    def to(self, device: torch.device) -> "DistillObjective":
        self.teacher.to(device)
        return self

    def __call__(self, model: nn.Module, batch: dict) -> tuple[Tensor, int]:
        features = model(features=True, **model_inputs(batch))
        teacher = self.cache.get(batch, self.run_teacher) if self.cache is not None else \
            self.run_teacher(model_inputs(batch), batch["attention_mask"])
        terms = self.terms(features, teacher, batch)
        self.last_terms = {name: value.item() for name, value in terms.items()}
        loss = sum(self.weights.active()[name] * value for name, value in terms.items())
        return loss, self.units(batch)

    def units(self, batch: dict) -> int:
        """Examples, or predicted tokens for per-token (causal LM) objectives."""
        if self.kind.name == "causal-lm":
            return int(batch["attention_mask"][:, 1:].sum())
        return len(batch["attention_mask"])

    @torch.no_grad()
    def run_teacher(self, inputs: dict, mask: Tensor) -> dict[str, Tensor]:
        """The teacher outputs the active losses need, padded like ``mask`` (B, T)."""
        self.teacher_forwards += 1
        w = self.weights
        output = self.teacher(**inputs, output_hidden_states=w.hidden > 0 or w.embedding > 0, output_attentions=w.attention > 0)
        out = {}
        if w.soft:
            out["logits"] = output.logits  # (B, C) or (B, T, V)
        for t in sorted(set(self.layer_map.values())):
            if w.hidden:
                out[f"hidden.{t}"] = output.hidden_states[t + 1]  # (B, T, H_t)
            if w.attention:
                out[f"attention.{t}"] = output.attentions[t]  # (B, heads_t, T, T)
        if w.embedding:
            out["embedding"] = mean_pool(last_hidden(output), mask)  # (B, H_t)
        return out

    def terms(self, student: dict, teacher: dict[str, Tensor], batch: dict) -> dict[str, Tensor]:
        """The unweighted value of every active loss."""
        w, mask = self.weights, batch["attention_mask"]
        out = {}
        if w.hard:
            output = student["output"]
            out["hard"] = self.kind.loss(lambda **_: output, batch)[0]  # the task loss on the outputs already computed
        if w.soft:
            s, t = student["output"].logits, teacher["logits"]
            if s.dim() == 3:  # per-token logits: the positions that predict a real next token, as the task loss
                out["soft"] = soft_kl(s[:, :-1], t[:, :-1], self.temperature, mask[:, 1:])
            else:
                out["soft"] = soft_kl(s, t, self.temperature)
        pairs = list(self.layer_map.items())
        if w.hidden:
            out["hidden"] = sum(hidden_mse(student["hidden"][s], teacher[f"hidden.{t}"], mask) for s, t in pairs) / len(pairs)
        if w.attention:
            out["attention"] = sum(attention_kl(student["attentions"][s], teacher[f"attention.{t}"], mask)
                                   for s, t in pairs) / len(pairs)
        if w.embedding:
            out["embedding"] = embedding_loss(student["embedding"], teacher["embedding"], self.embedding_kind)
        return out
