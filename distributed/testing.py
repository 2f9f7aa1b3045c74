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


# Metrics that describe the result (not timing or bookkeeping).
RESULT_METRICS = ("accuracy", "perplexity", "centroid_accuracy", "train_loss", "accuracy_onnx", "prediction_agreement")


@dataclass
class Comparison:
    """Per strategy and stage: the largest weight difference and metric differences against the reference.

    ``mismatches`` holds what makes runs incomparable (a different number or
    order of stages, a result metric only one side reports, a run on another
    world size than requested); each is a failure.
    """

    reference: str
    weight_diff: dict[tuple[str, str], float] = field(default_factory=dict)
    metric_diff: dict[tuple[str, str, str], float] = field(default_factory=dict)
    atol: float = 1e-5
    metric_atol: float = 1e-3
    runs: dict[str, Any] = field(default_factory=dict)
    mismatches: list[str] = field(default_factory=list)
    code_diff: dict[tuple[str, str], float] = field(default_factory=dict)  # fraction of integer elements (packed codes) that differ
    code_tol: float = 0.0

    @property
    def failures(self) -> list[str]:
        bad = list(self.mismatches)
        bad += [f"{s} {stage}: weights differ by {d:.2e} > {self.atol:g}" for (s, stage), d in self.weight_diff.items() if not d <= self.atol]
        bad += [f"{s} {stage}: {m} differs by {d:.2e} > {self.metric_atol:g}" for (s, stage, m), d in self.metric_diff.items()
                if not d <= self.metric_atol]
        bad += [f"{s} {stage}: {d:.2e} of the integer codes differ > {self.code_tol:g}" for (s, stage), d in self.code_diff.items()
                if not d <= self.code_tol]
        return bad

    @property
    def ok(self) -> bool:
        return not self.failures

    def __str__(self) -> str:
        lines = [f"reference: {self.reference}"]
        lines += [f"{s} {stage}: max weight diff {d:.2e}" for (s, stage), d in self.weight_diff.items()]
        lines += [f"{s} {stage} {m}: diff {d:.2e}" for (s, stage, m), d in self.metric_diff.items()]
        lines += [f"{s} {stage}: {d:.2e} of the integer codes differ" for (s, stage), d in self.code_diff.items()]
        return "\n".join(lines + [f"FAILED: {f}" for f in self.failures])


def compare_strategies(recipe: str | Path, out: str | Path, overrides: dict[str, Any] | None = None,
                       strategies: tuple[str, ...] = ("single", "ddp", "fsdp"), nproc: int = 2,
                       atol: float = 1e-5, metric_atol: float = 1e-3, code_tol: float = 0.0) -> Comparison:
    """Run ``recipe`` under each strategy (the first is the reference) and compare.

    ``atol`` bounds the largest difference of each stage's floating-point
    tensors (floating-point reduction order differs between strategies);
    ``code_tol`` the fraction of integer elements (quantized codes) that may
    differ (a float weight that lands within ``atol`` of a rounding boundary
    flips its code); ``metric_atol`` bounds each result metric's difference.
    """
    import slimtune

    out = Path(out)
    runs, world_sizes = {}, {}
    for name in strategies:
        world_sizes[name] = 1 if name == "single" else nproc
        settings = {"distributed.strategy": name, "distributed.nproc": world_sizes[name]}
        runs[name] = slimtune.run(recipe, overrides={**(overrides or {}), **settings}, out=out / name)
    return compare_runs(runs, world_sizes, atol, metric_atol, code_tol)


def compare_runs(runs: dict[str, Any], world_sizes: dict[str, int], atol: float = 1e-5, metric_atol: float = 1e-3,
                 code_tol: float = 0.0) -> Comparison:
    """Compare finished runs (``RunResult``s by strategy name; the first is the reference) stage by stage.

    Every run must have the reference's stages in order, have run each stage
    on ``world_sizes[name]`` processes (the ``world_size`` the runner records
    in each stage's metrics), and report the same result metrics.
    """
    names = list(runs)
    report = Comparison(names[0], atol=atol, metric_atol=metric_atol, runs=dict(runs), code_tol=code_tol)
    for name, run in runs.items():
        for stage in run.stages:
            if stage.metrics.get("world_size") != world_sizes[name]:
                report.mismatches.append(f"{name} {stage.name}: ran on world size {stage.metrics.get('world_size')}, "
                                         f"not the requested {world_sizes[name]}")
    reference = runs[names[0]]
    for name in names[1:]:
        ref_stages, other_stages = [s.name for s in reference.stages], [s.name for s in runs[name].stages]
        if ref_stages != other_stages:
            report.mismatches.append(f"{name}: stages {other_stages} differ from the reference's {ref_stages}")
            continue
        for ref, other in zip(reference.stages, runs[name].stages):
            _compare_stage(report, name, ref, other)
    return report


def _compare_stage(report: Comparison, name: str, ref, other) -> None:
    """Every tensor file of the stage (the weights, and the deltas beside them) on both sides, then the metrics."""
    files = sorted({p.relative_to(ref.path).as_posix() for p in ref.path.rglob("*.safetensors")}
                   | {p.relative_to(other.path).as_posix() for p in other.path.rglob("*.safetensors")})
    for file in files:
        if (ref.path / file).is_file() != (other.path / file).is_file():
            report.mismatches.append(f"{name} {ref.name}: {file} exists on one side only")
            continue
        x, y = load_file(str(ref.path / file)), load_file(str(other.path / file))
        if x.keys() != y.keys() or any(x[k].shape != y[k].shape or x[k].dtype != y[k].dtype for k in x):
            report.mismatches.append(f"{name} {ref.name}: {file} holds different tensors")
            continue
        floats = [k for k in x if x[k].is_floating_point() and x[k].numel()]
        diff = max(((x[k].double() - y[k].double()).abs().max().item() for k in floats), default=0.0)
        report.weight_diff[(name, ref.name)] = max(report.weight_diff.get((name, ref.name), 0.0), diff)
        codes = [k for k in x if not x[k].is_floating_point() and x[k].numel()]
        if codes:
            differing = sum((x[k] != y[k]).sum().item() for k in codes)
            report.code_diff[(name, ref.name)] = differing / sum(x[k].numel() for k in codes)
    for metric in RESULT_METRICS:
        a, b = ref.metrics.get(metric), other.metrics.get(metric)
        if (a is None) != (b is None):
            report.mismatches.append(f"{name} {ref.name}: metric {metric!r} is reported by "
                                     f"{'the reference' if b is None else name} only")
        elif isinstance(a, (int, float)) and isinstance(b, (int, float)):
            report.metric_diff[(name, ref.name, metric)] = abs(a - b) if math.isfinite(a) else (0.0 if a == b else math.inf)

