"""Task kinds: the one place that knows what a model is trained and measured for.

* ``classification`` - ``AutoModelForSequenceClassification``; cross-entropy;
  metric ``accuracy``.
* ``causal-lm`` - ``AutoModelForCausalLM``; next-token cross-entropy; metric
  ``perplexity`` = exp(total NLL / predicted tokens), lower is better.
* ``embedding`` - ``AutoModel`` whose token states are mean-pooled over the
  attention mask (the sentence-transformers recipe of all-MiniLM-L6-v2), L2
  normalised. Fine-tuned with a supervised contrastive loss on labelled data
  (Khosla et al., 2020) and measured by ``centroid_accuracy``: each test
  embedding takes the label of the nearest class centroid of the train
  embeddings (cosine).

Every algorithm (trainer, distillation, export) goes through these objects
instead of branching on architecture or task itself.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from slimtune.errors import SlimTuneError

Batch = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Collator:
    """Tokenize a list of examples into a padded batch (picklable for workers)."""

    tokenizer: object
    max_length: int
    kind: str

    def __call__(self, examples: list[dict]) -> Batch:
        texts = [e["text"] for e in examples]
        pairs = [e["text_pair"] for e in examples] if "text_pair" in examples[0] else None
        # Right padding whatever the tokenizer's default: positions then count from each sequence's first token,
        # as without padding (a left-padded batch shifts absolute positions and feeds pads to causal LMs).
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.max_length, padding=True, padding_side="right",
                             return_tensors="pt")
        batch = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}
        if "token_type_ids" in enc:
            batch["token_type_ids"] = enc["token_type_ids"]
        key = label_key(examples[0])
        if key is not None:
            batch["labels"] = torch.tensor([e[key] for e in examples])
        return batch


def label_key(example: dict) -> str | None:
    """Which key of an example holds its label: ``label`` (SlimTune's loaders), ``labels`` (Hugging Face's convention), or None."""
    return next((k for k in ("label", "labels") if k in example), None)


def model_inputs(batch: Batch) -> Batch:
    return {k: v for k, v in batch.items() if k in ("input_ids", "attention_mask", "token_type_ids")}


def mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T, H), (B, T) -> (B, H): mean of the unmasked token states."""
    mask = mask.unsqueeze(-1).to(hidden.dtype)  # (B, T, 1)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embed(model: nn.Module, batch: Batch) -> torch.Tensor:
    """(B, H) L2-normalised mean-pooled sentence embeddings."""
    hidden = model(**model_inputs(batch)).last_hidden_state  # (B, T, H)
    return F.normalize(mean_pool(hidden, batch["attention_mask"]), dim=-1)


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """Supervised contrastive loss over a batch of normalised embeddings (B, H)."""
    sim = z @ z.T / temperature  # (B, B)
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    sim = sim.masked_fill(self_mask, float("-inf"))
    positives = (labels[:, None] == labels[None, :]) & ~self_mask  # (B, B)
    log_prob = sim - torch.logsumexp(sim, dim=1, keepdim=True)
    has_pos = positives.any(1)
    if not has_pos.any():
        return z.sum() * 0.0
    per_anchor = -(log_prob.masked_fill(~positives, 0.0).sum(1) / positives.sum(1).clamp(min=1))
    return per_anchor[has_pos].mean()


class Classification:
    name = "classification"
    auto_class = "AutoModelForSequenceClassification"
    metric, higher_is_better = "accuracy", True
    output_names = ("logits",)

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        logits = model(**model_inputs(batch)).logits  # (B, C)
        return F.cross_entropy(logits.float(), batch["labels"]), len(batch["labels"])

    def forward_export(self, model: nn.Module, **inputs) -> torch.Tensor:
        return model(**inputs).logits

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], train_batches=None) -> dict:
        correct = total = 0
        for batch in batches:
            pred = model(**model_inputs(batch)).logits.argmax(-1)
            correct += (pred == batch["labels"]).sum().item()
            total += len(pred)
        return {"accuracy": correct / max(total, 1), "examples": total}



class CausalLM:
    name = "causal-lm"
    auto_class = "AutoModelForCausalLM"
    metric, higher_is_better = "perplexity", False
    output_names = ("logits",)

    def nll(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        """Summed next-token NLL over unpadded targets, and the target count.

        A target counts when it and the position predicting it are both real
        tokens, so a sequence contributes its length - 1 targets however it is
        padded (left padding would otherwise predict its first token from a pad).
        """
        mask = batch["attention_mask"].bool()
        targets = batch["input_ids"][:, 1:].masked_fill(~(mask[:, 1:] & mask[:, :-1]), -100)  # (B, T-1)
        head = _chunkable_head(model, targets.numel())
        if head is not None:
            return _chunked_nll(model, head, batch, targets), int((targets != -100).sum())
        logits = model(**model_inputs(batch)).logits[:, :-1]  # (B, T-1, V)
        nll = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100, reduction="sum")
        return nll, int((targets != -100).sum())

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        nll, n = self.nll(model, batch)
        return nll / max(n, 1), n

    def forward_export(self, model: nn.Module, **inputs) -> torch.Tensor:
        return model(**inputs, use_cache=False).logits

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], train_batches=None) -> dict:
        total_nll, total = 0.0, 0
        for batch in batches:
            nll, n = self.nll(model, batch)
            total_nll += nll.item()
            total += n
        return {"perplexity": math.exp(total_nll / max(total, 1)), "tokens": total}



# Logits bigger than this are never materialised whole in training: the LM head runs over chunks of
# positions whose logits are recomputed in backward (large vocabularies: SmolLM2's 49,152 x 2,048
# positions would be 400 MB of fp32 logits, and as much again for their log-softmax and gradient).
CHUNKED_LOGITS_BYTES = 64 * 2**20
CHUNK_POSITIONS = 64  # 64 x 49,152 fp32 logits: 12 MiB per chunk (and as much for its softmax and gradient)
CHUNKABLE = ("llama", "mistral", "qwen2", "gpt2")  # heads applied once to the final states, no post-processing


def _chunkable_head(model: nn.Module, positions: int) -> nn.Module | None:
    """The LM head to run chunk by chunk, or None to compute the logits whole.

    Only while training (gradients on), for families whose logits are the head
    applied to the final hidden states with nothing after it, when the logits
    would exceed :data:`CHUNKED_LOGITS_BYTES`, and not under FSDP (whose
    sharded head cannot run outside the model's forward).
    """
    inner = getattr(model, "module", model)  # DDP
    config = getattr(inner, "config", None)
    if not torch.is_grad_enabled() or getattr(config, "model_type", None) not in CHUNKABLE:
        return None
    head = inner.get_output_embeddings() if hasattr(inner, "get_output_embeddings") else None
    if head is None or positions * config.vocab_size * 4 <= CHUNKED_LOGITS_BYTES:
        return None
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in head.parameters()):
        return None
    return head


def _chunked_nll(model: nn.Module, head: nn.Module, batch: Batch, targets: torch.Tensor) -> torch.Tensor:
    """Summed next-token NLL with the LM head applied to chunks of positions under activation checkpointing.

    The model's forward runs with the head fed zero positions (a pre-hook keeps
    the final hidden states and hands the head an empty slice), so it returns
    empty logits; each chunk's logits then exist only while that chunk's loss is
    computed, in forward and again in backward. The same sum as the whole-logits
    path, in another order of summation.
    """
    from torch.utils.checkpoint import checkpoint

    kept = []

    def keep(module, args):
        kept.append(args[0])
        return (args[0][:, :0],) + tuple(args[1:])

    handle = head.register_forward_pre_hook(keep)
    try:
        model(**model_inputs(batch))
    finally:
        handle.remove()
    hidden = kept[-1][:, :-1].flatten(0, 1)  # (B (T-1), H)
    flat = targets.flatten()

    def chunk_nll(h: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(head(h).float(), t, ignore_index=-100, reduction="sum")

    total = hidden.new_zeros((), dtype=torch.float32)
    for start in range(0, hidden.shape[0], CHUNK_POSITIONS):
        part = slice(start, start + CHUNK_POSITIONS)
        total = total + checkpoint(chunk_nll, hidden[part], flat[part], use_reentrant=False)
    return total


class Embedding:
    name = "embedding"
    auto_class = "AutoModel"
    metric, higher_is_better = "centroid_accuracy", True
    output_names = ("embeddings",)
    temperature = 0.1

    def loss(self, model: nn.Module, batch: Batch) -> tuple[torch.Tensor, int]:
        if "labels" not in batch:
            raise SlimTuneError("fine-tuning an embedding task needs labelled data", "set task.label to a label column")
        return supcon_loss(embed(model, batch).float(), batch["labels"], self.temperature), len(batch["labels"])

    def forward_export(self, model: nn.Module, **inputs) -> torch.Tensor:
        hidden = model(**inputs).last_hidden_state
        return F.normalize(mean_pool(hidden, inputs["attention_mask"]), dim=-1)

    @torch.no_grad()
    def evaluate(self, model: nn.Module, batches: Iterable[Batch], train_batches=None) -> dict:
        if train_batches is None:
            raise SlimTuneError("centroid accuracy needs train data for the class centroids")
        centroids = self._centroids(model, train_batches)  # (C, H)
        correct = total = 0
        absent = centroids.norm(dim=-1) == 0  # (C,) labels without train examples: no centroid, never predicted
        for batch in batches:
            pred = (embed(model, batch) @ centroids.T).masked_fill(absent, float("-inf")).argmax(-1)
            correct += (pred == batch["labels"]).sum().item()
            total += len(pred)
        return {"centroid_accuracy": correct / max(total, 1), "examples": total}

    def _centroids(self, model, batches) -> torch.Tensor:
        """(C, H) normalised mean embedding of each label (zero for a label without train examples)."""
        sums = None
        for batch in batches:
            z = embed(model, batch)  # (B, H)
            n_labels = int(batch["labels"].max()) + 1
            if sums is None or len(sums) < n_labels:
                grown = z.new_zeros(n_labels, z.shape[1])
                if sums is not None:
                    grown[: len(sums)] = sums
                sums = grown
            sums.index_add_(0, batch["labels"], z)
        return F.normalize(sums, dim=-1)



TASK_KINDS: dict[str, Callable[[], object]] = {"classification": Classification, "causal-lm": CausalLM, "embedding": Embedding}


def task_kind(name: str):
    if name not in TASK_KINDS:
        raise SlimTuneError(f"unknown task kind {name!r}", f"use one of: {', '.join(TASK_KINDS)}")
    return TASK_KINDS[name]()


class ExportWrapper(nn.Module):
    """Named tensor inputs -> the task's output tensor, for tracing and export."""

    def __init__(self, model: nn.Module, kind, input_names: tuple[str, ...]):
        super().__init__()
        self.model = model
        self.kind = kind
        self.input_names = input_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        inputs = {"input_ids": input_ids, "attention_mask": attention_mask, "token_type_ids": token_type_ids}
        return self.kind.forward_export(self.model, **{n: inputs[n] for n in self.input_names})
