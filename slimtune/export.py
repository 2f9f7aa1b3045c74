"""ONNX export of any artifact, validated in ONNX Runtime.

The exporter is ``torch.onnx.export(..., dynamo=True)`` with dynamic batch and
sequence axes; torch ops registered in ``slimtune.registry.ONNX_LOWERINGS``
(e.g. the dequant-matmul custom op) are lowered with their onnxscript
functions. The graph's inputs are the tokenizer's (``input_ids``,
``attention_mask`` and ``token_type_ids`` when the model takes them); its
output is the task's (``logits`` or ``embeddings``).

Validation runs PyTorch and ONNX Runtime on real examples of the task's test
split and reports the max absolute output difference and how often the
predictions agree; a difference above ``atol`` is an error.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from pydantic import Field

from slimtune.artifact import Artifact, disk_size_bytes
from slimtune.errors import SlimTuneError
from slimtune.progress import progress
from slimtune.recipe import Strict
from slimtune.registry import ONNX_LOWERINGS, register_stage
from slimtune.stage import StageContext, StageResult
from slimtune.tasks import ExportWrapper, task_kind

log = logging.getLogger(__name__)
ONNX_FILE = "model.onnx"


def input_names(artifact: Artifact) -> tuple[str, ...]:
    """Graph inputs: what the tokenizer produces and the model's forward accepts."""
    import inspect

    accepted = inspect.signature(artifact.model.forward).parameters
    names = ["input_ids", "attention_mask"]
    if "token_type_ids" in getattr(artifact.tokenizer, "model_input_names", []) and "token_type_ids" in accepted:
        names.append("token_type_ids")
    return tuple(names)


def example_inputs(artifact: Artifact, names: tuple[str, ...]) -> tuple[torch.Tensor, ...]:
    """Two padded sentences: padding in the example keeps the mask in the graph."""
    enc = artifact.tokenizer(
        ["an example sentence for export", "short"], padding=True, return_tensors="pt"
    )
    return tuple(enc[n] if n in enc else torch.zeros_like(enc["input_ids"]) for n in names)


def export_onnx(artifact: Artifact, path: str | Path, opset: int = 18) -> Path:
    """Export ``artifact`` to ONNX at ``path`` (one self-contained file).

    Returns:
        the path written.
    """
    path = Path(path)
    names = input_names(artifact)
    kind = task_kind(artifact.task.kind)
    wrapper = ExportWrapper(artifact.model, kind, names).eval()
    args = example_inputs(artifact, names)
    batch, seq = torch.export.Dim("batch"), torch.export.Dim("sequence")
    shapes = {n: {0: batch, 1: seq} for n in names}
    was_training = artifact.model.training
    artifact.model.eval()
    # The exporter narrates every pass on stdout; keep ours clean.
    bar = progress(total=1, desc="export onnx")
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            wrapper, args, dynamo=True, input_names=list(names), output_names=list(kind.output_names),
            dynamic_shapes=shapes, opset_version=opset, custom_translation_table=dict(ONNX_LOWERINGS) or None,
            optimize=True, verbose=False,
        )
    program.save(str(path), external_data=False)
    bar.update(1)
    bar.close()
    artifact.model.train(was_training)
    return path


def ort_session(path: str | Path, threads: int | None = None):
    try:
        import onnxruntime as ort
    except ImportError:
        raise SlimTuneError("ONNX Runtime is not installed", "pip install 'slimtune[cpu]' (or 'slimtune[gpu]' for onnxruntime-gpu)") from None

    options = ort.SessionOptions()
    options.log_severity_level = 3
    # ORT fuses weight-only INT8 (DequantizeLinear + MatMul) into MatMulNBits with INT8
    # activations by default (accuracy level 4); keep them float, as PyTorch computes.
    options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    if threads:
        options.intra_op_num_threads = threads
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def ort_feed(session, batch: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {i.name: batch[i.name].numpy() for i in session.get_inputs()}


def validate_onnx(artifact: Artifact, path: str | Path, batches: list[dict]) -> dict:
    """Compare PyTorch and ONNX Runtime outputs on real batches.

    Returns:
        ``{"max_abs_diff", "prediction_agreement", "examples", <metric>_onnx}``
        where the metric is computed from ONNX Runtime outputs when the task
        has labels (classification accuracy).
    """
    kind = task_kind(artifact.task.kind)
    session = ort_session(path)
    names = input_names(artifact)
    model = artifact.model.eval()
    max_diff, agree, units, correct, total = 0.0, 0, 0, 0, 0
    for batch in progress(batches, desc="validate onnx"):
        with torch.no_grad():
            ref = kind.forward_export(model, **{n: batch[n] for n in names}).float()
        out = torch.from_numpy(session.run(None, ort_feed(session, batch))[0]).float()
        max_diff = max(max_diff, (out - ref).abs().max().item())
        same = _agreement(kind.name, ref, out, batch["attention_mask"].bool())  # (units,)
        agree, units = agree + int(same.sum()), units + same.numel()
        if kind.name == "classification" and "labels" in batch:
            correct += int((out.argmax(-1) == batch["labels"]).sum())
        total += len(batch["input_ids"])
    result = {"max_abs_diff": max_diff, "prediction_agreement": agree / max(units, 1), "examples": total}
    if kind.name == "classification" and total:
        result["accuracy_onnx"] = correct / total
    return result


def _agreement(kind: str, ref: torch.Tensor, out: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-unit agreement: same class (classification), same next token on real
    tokens (causal LM), cosine > 0.999 (embedding)."""
    if kind == "embedding":
        return torch.nn.functional.cosine_similarity(out, ref, dim=-1) > 0.999
    same = ref.argmax(-1) == out.argmax(-1)
    return same[mask] if kind == "causal-lm" else same


@register_stage("export")
class ExportStage:
    """Export the artifact to ONNX beside its weights and validate it."""

    changes_model = False
    main_process_only = True  # measures or writes files; other ranks wait

    class Config(Strict):
        format: Literal["onnx"] = "onnx"
        opset: int = Field(18, ge=14, le=23)
        validate_split: Literal["train", "validation", "test"] = "test"
        max_examples: int = Field(1000, ge=1)
        atol: float = Field(1e-3, gt=0)

    def run(self, ctx: StageContext, config: Config) -> StageResult:
        path = export_onnx(ctx.artifact, ctx.out_dir / ONNX_FILE, config.opset)
        report = validate_onnx(ctx.artifact, path, ctx.batches(config.validate_split, limit=config.max_examples))
        if report["max_abs_diff"] > config.atol:
            raise SlimTuneError(
                f"ONNX output differs from PyTorch by {report['max_abs_diff']:.3g} (> atol {config.atol})",
                "raise stages.export.atol if this precision is expected, or report the model as an export bug",
            )
        report["onnx_mb"] = disk_size_bytes(ctx.out_dir, (ONNX_FILE,)) / 1e6
        log.info("exported %s: max |diff| %.2e, agreement %.4f", path.name, report["max_abs_diff"], report["prediction_agreement"])
        return StageResult(ctx.artifact, report)


def onnx_path_of(artifact: Artifact) -> Path | None:
    """The ONNX file saved with an artifact, if an export stage wrote one."""
    if artifact.path is None:
        return None
    path = artifact.path / ONNX_FILE
    return path if path.is_file() and os.path.getsize(path) > 0 else None
