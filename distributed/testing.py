"""Check that a recipe gives the same result under every strategy.

``compare_strategies`` runs one recipe single-process, under DDP and under
FSDP (each distributed run under torchrun, like a user's ``--nproc``) and
compares every training stage's weights and every stage's task metric.
Each stage family's tests call it on a tiny model, so a new training stage
is checked for distributed execution the same way as ``finetune``::

    report = compare_strategies(recipe_path, tmp_path, overrides={...})
    assert report.ok, report
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from slimtune.artifact import WEIGHTS_FILE

# Metrics that describe the result (not timing or bookkeeping).
RESULT_METRICS = ("accuracy", "perplexity", "centroid_accuracy", "train_loss", "accuracy_onnx", "prediction_agreement")


@dataclass
class Comparison:
    """Per strategy and stage: the largest weight difference and metric differences against the reference."""

    reference: str
    weight_diff: dict[tuple[str, str], float] = field(default_factory=dict)
    metric_diff: dict[tuple[str, str, str], float] = field(default_factory=dict)
    atol: float = 1e-5
    metric_atol: float = 1e-3
    runs: dict[str, Any] = field(default_factory=dict)

    @property
    def failures(self) -> list[str]:
        bad = [f"{s} {stage}: weights differ by {d:.2e} > {self.atol:g}" for (s, stage), d in self.weight_diff.items() if not d <= self.atol]
        bad += [f"{s} {stage}: {m} differs by {d:.2e} > {self.metric_atol:g}" for (s, stage, m), d in self.metric_diff.items()
                if not d <= self.metric_atol]
        return bad

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"reference: {self.reference}"]
        lines += [f"{s} {stage}: max weight diff {d:.2e}" for (s, stage), d in self.weight_diff.items()]
        lines += [f"{s} {stage} {m}: diff {d:.2e}" for (s, stage, m), d in self.metric_diff.items()]
        return "\n".join(lines + [f"FAILED: {f}" for f in self.failures])


def compare_strategies(recipe: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
                       strategies: tuple[str, ...] = ("single", "ddp", "fsdp"), nproc: int = 2,
                       atol: float = 1e-5, metric_atol: float = 1e-3) -> Comparison:
    """Run ``recipe`` under each strategy (the first is the reference) and compare.

    ``atol`` bounds the largest parameter difference of each stage's weights
    (floating-point reduction order differs between strategies);
    ``metric_atol`` bounds each result metric's difference.
    """
    import slimtune

    out = Path(out)
    report = Comparison(strategies[0], atol=atol, metric_atol=metric_atol)
    for name in strategies:
        settings = {"distributed.strategy": name, "distributed.nproc": 1 if name == "single" else nproc}
        report.runs[name] = slimtune.run(recipe, overrides={**(overrides or {}), **settings}, out=out / name)
    reference = report.runs[strategies[0]]
    for name in strategies[1:]:
        for ref, other in zip(reference.stages, report.runs[name].stages):
            if (ref.path / WEIGHTS_FILE).is_file():
                report.weight_diff[(name, ref.name)] = _max_diff(ref.path / WEIGHTS_FILE, other.path / WEIGHTS_FILE)
            for metric in RESULT_METRICS:
                a, b = ref.metrics.get(metric), other.metrics.get(metric)
                if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                    report.metric_diff[(name, ref.name, metric)] = abs(a - b) if math.isfinite(a) else (0.0 if a == b else math.inf)
    return report


def _max_diff(a: Path, b: Path) -> float:
    x, y = load_file(str(a)), load_file(str(b))
    if x.keys() != y.keys():
        return math.inf
    return max(((x[k].double() - y[k].double()).abs().max().item() for k in x if x[k].numel()), default=0.0)
