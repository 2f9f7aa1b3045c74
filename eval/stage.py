"""``evaluate``: measure an artifact - task metric, parameters, size, latency.

The task metric is computed on a split (test by default) with the task kind's
own evaluation (:mod:`slimtune.tasks`). Parameters are
:func:`slimtune.models.parameter_count` (distinct weights, a packed quantized
weight counted as the weights it stands for), the count ``slimtune info``
prints too. Size on disk is the bytes of the weight file. Latency is measured at batch size 1 (configurable) at the task's
``max_length`` in PyTorch and, when ``onnx: true``, in ONNX Runtime on the
artifact's ``model.onnx`` (exported to a temporary file if no export stage ran
before).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Literal

from pydantic import Field

from slimtune.artifact import Artifact, disk_size_bytes
from slimtune.data import check_labels, load_task_data
from slimtune.export import export_onnx, input_names, onnx_path_of, ort_feed, ort_session
from slimtune.models import parameter_count
from slimtune.progress import progress
from slimtune.recipe import Strict
from slimtune.registry import register_stage
from slimtune.stage import StageContext, StageResult, iterate_batches
from slimtune.tasks import Collator, ExportWrapper, task_kind
from slimtune.eval.latency import interleaved_latency_ms, ort_latency_ms, torch_latency_ms


class EvaluateConfig(Strict):
    split: Literal["train", "validation", "test"] = "test"
    max_examples: int | None = Field(None, ge=1, description="evaluate on the first N examples of the split")
    latency: bool = True
    onnx: bool = True
    batch_size: int = Field(1, ge=1, description="batch size of the latency measurement")
    runs: int = Field(30, ge=1)
    warmup: int = Field(5, ge=0)


def evaluate_artifact(artifact: Artifact, config: EvaluateConfig = EvaluateConfig(), eval_batch_size: int = 64) -> dict:
    """All measurements of one artifact, as a flat dict (what metrics.json holds)."""
    kind = task_kind(artifact.task.kind)
    data = load_task_data(artifact.task)
    if kind.name == "classification":  # the head's outputs mean the labels it was trained for
        check_labels(artifact.labels, data, str(artifact.path or "the artifact"))
    collate = Collator(artifact.tokenizer, artifact.task.max_length, artifact.task.kind)
    examples = data[config.split][: config.max_examples]
    model = artifact.model.eval()
    batches = progress(iterate_batches(examples, collate, eval_batch_size), desc=f"evaluate {config.split}", total=-(-len(examples) // eval_batch_size))
    train = list(iterate_batches(data["train"], collate, eval_batch_size)) if kind.name == "embedding" else None
    metrics = {"split": config.split, "metric": kind.metric, **kind.evaluate(model, batches, train)}
    metrics["parameters"] = parameter_count(model)
    if artifact.path is not None:
        metrics["size_mb"] = disk_size_bytes(artifact.path) / 1e6
    if config.latency:
        metrics.update(measure_latency(artifact, examples, config))
    return metrics


def latency_batch(artifact: Artifact, examples: list[dict], batch_size: int) -> dict:
    """Real examples padded to max_length: the fixed shape latency is measured at."""
    texts = [e["text"] for e in (examples or [{"text": "a"}])[:batch_size]]
    texts += texts[-1:] * (batch_size - len(texts))
    enc = artifact.tokenizer(texts, truncation=True, max_length=artifact.task.max_length, padding="max_length", return_tensors="pt")
    return {n: enc[n] for n in input_names(artifact)}


def latency_forward(artifact: Artifact, examples: list[dict], batch_size: int = 1):
    """``(forward, batch)``: a no-argument call of the artifact's task output on a fixed latency batch."""
    batch = latency_batch(artifact, examples, batch_size)
    wrapper = ExportWrapper(artifact.model, task_kind(artifact.task.kind), tuple(batch)).eval()
    args = tuple(batch.values())
    return (lambda: wrapper(*args)), batch


def compare_latency(artifacts: list[Artifact], batch_size: int = 1, rounds: int = 5, runs: int = 20) -> list[dict]:
    """PyTorch latency of several artifacts on the same input, measured side by side (interleaved)."""
    examples = load_task_data(artifacts[0].task)["test"][:batch_size]
    forwards = {str(i): latency_forward(a, examples, batch_size)[0] for i, a in enumerate(artifacts)}
    medians = interleaved_latency_ms(forwards, rounds, runs)
    first = medians["0"]
    return [{"artifact": str(a.path), "parameters": parameter_count(a.model), "torch_ms": medians[str(i)],
             "ratio": medians[str(i)] / first} for i, a in enumerate(artifacts)]


def measure_latency(artifact: Artifact, examples: list[dict], config: EvaluateConfig) -> dict:
    forward, batch = latency_forward(artifact, examples, config.batch_size)
    args = tuple(batch.values())
    out = {"latency_batch": config.batch_size, "latency_seq": int(args[0].shape[1])}
    out["torch_ms"] = torch_latency_ms(forward, config.runs, config.warmup)
    if config.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            path = onnx_path_of(artifact) or export_onnx(artifact, Path(tmp) / "model.onnx")
            session = ort_session(path)
            out["onnx_ms"] = ort_latency_ms(session, ort_feed(session, batch), config.runs, config.warmup)
    return out


@register_stage("evaluate")
class Evaluate:
    changes_model = False
    main_process_only = True  # measures or writes files; other ranks wait
    Config = EvaluateConfig

    def run(self, ctx: StageContext, config: EvaluateConfig) -> StageResult:
        return StageResult(ctx.artifact, evaluate_artifact(ctx.artifact, config, ctx.train.eval_batch_size))
