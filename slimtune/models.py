"""Resolve a recipe's ``model`` and load it for a task.

A model reference is ``embedded:<name>``, a local HF directory, or a hub id
(online only). Remote code is never trusted.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import torch
from torch import nn

from slimtune.errors import ModelSourceError

log = logging.getLogger(__name__)


def resolve_model_dir(ref: str) -> str:
    """A loadable path or hub id for ``ref``; raises when it cannot exist."""
    if ref.startswith("embedded:"):
        from slimtune.assets import embedded_model_dir

        return str(embedded_model_dir(ref.split(":", 1)[1]))
    path = Path(ref).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelSourceError(f"model directory {ref!r} has no config.json", "point model at a Hugging Face model directory (save_pretrained output)")
        return str(path)
    if ref.startswith((".", "/", "~")) or ref.count("/") > 1:
        raise ModelSourceError(f"model directory {ref!r} does not exist", "check the path in model")
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise ModelSourceError(
            f"model {ref!r} is not a local directory, and it would be a hub id but the hub is offline (HF_HUB_OFFLINE=1)",
            "use embedded:minilm / embedded:smollm2 or a local model directory, or go online with HF_HUB_OFFLINE=0",
        )
    return ref


def load_pretrained(ref: str, auto_class: str, num_labels: int | None = None, dtype: torch.dtype | None = None) -> tuple[nn.Module, object]:
    """Load ``(model, tokenizer)`` for ``ref`` with the given transformers Auto class."""
    import transformers

    where = resolve_model_dir(ref)
    kwargs = {"num_labels": num_labels} if num_labels is not None else {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(where)
        if auto_class == "AutoModelForSequenceClassification" and num_labels is not None:
            kwargs["ignore_mismatched_sizes"] = _replaces_head(ref, transformers.AutoConfig.from_pretrained(where), num_labels)
        model = getattr(transformers, auto_class).from_pretrained(where, **kwargs)
    except (OSError, ValueError) as err:
        raise ModelSourceError(f"cannot load model {ref!r}: {first_line(err)}", "check the model id or directory, and that you are online for hub ids") from None
    if tokenizer.pad_token is None:
        # Decoder-only tokenizers often ship without one; padding is masked anyway.
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def _replaces_head(ref: str, config, num_labels: int) -> bool:
    """Whether ``ref`` holds a trained classification head for another number of classes; says so when it does.

    The head is then replaced by a new, randomly initialised one (transformers'
    ``ignore_mismatched_sizes``), as a fine-tuning recipe on new labels wants.
    """
    trained_head = any(a.endswith("ForSequenceClassification") for a in getattr(config, "architectures", None) or [])
    if not trained_head or config.num_labels == num_labels:
        return False
    old = ", ".join(str(config.id2label[i]) for i in sorted(config.id2label))
    log.warning("%s has a classification head for %d classes (%s) but the data has %d: a new %d-class head is initialised "
                "randomly and the old one is dropped; train it (e.g. a finetune stage) before measuring", ref, config.num_labels, old,
                num_labels, num_labels)
    return True


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type when empty), for one-line user errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def parameter_count(model: nn.Module) -> int:
    """The model's parameter count: its distinct weights.

    This is the one definition behind every ``parameters`` SlimTune prints
    (``slimtune eval``, ``info``, ``latency``, the run report) and the stages'
    before/after counts. Each tied or shared tensor counts once. A module that
    stores its weight packed (a quantized linear or embedding) counts the
    number of weights it stands for (``quantized_weight_numel``, e.g.
    ``in_features * out_features``), once per packed tensor ``qweight``; its
    scales and zero points, and buffers in general, are not parameters (their
    bytes show in the artifact's size). So quantizing a model leaves its count
    unchanged; pruning to zeros does too; removing heads or sharing lowers it.
    """
    seen, total = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    for m in model.modules():
        numel = getattr(m, "quantized_weight_numel", None)
        if numel is not None and id(m.qweight) not in seen:
            seen.add(id(m.qweight))
            total += numel
    return total
