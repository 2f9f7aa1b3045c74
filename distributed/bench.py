"""Benchmark a recipe's training under single, DDP and FSDP side by side.

    python -m slimtune.distributed.bench RECIPE [--nproc 2] [--out DIR] [--set k=v ...]

Runs the recipe under each strategy (``compare_strategies``: the distributed
runs under torchrun) and prints, per strategy, the first stage's final
training loss and validation metric, the evaluated test metric, the mean
optimizer-step time, the peak resident memory of each rank's process, the
whole stage's wall time and the largest weight difference from the
single-process run.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from rich.console import Console
from rich.table import Table

from slimtune.distributed.testing import compare_strategies
from slimtune.recipe import parse_set


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m slimtune.distributed.bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("recipe")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--strategies", default="single,ddp,fsdp,pipeline")
    parser.add_argument("--out", default="runs/bench-distributed")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = parser.parse_args(argv)
    os.environ.setdefault("SLIMTUNE_QUIET", "1")
    strategies = tuple(args.strategies.split(","))
    report = compare_strategies(args.recipe, Path(args.out), parse_set(args.overrides), strategies, args.nproc, atol=float("inf"),
                                metric_atol=float("inf"))
    table = Table(title=f"{args.recipe}: strategies side by side (nproc {args.nproc})")
    cuda = any(report.runs[name].stages[0].metrics.get("peak_cuda_mb") for name in strategies)
    for col in ("strategy", "processes", "train loss", "validation", "test", "step s", "peak RSS MB per rank",
                *(["peak CUDA MB per rank"] if cuda else []), "stage s", "max weight diff"):
        table.add_column(col)
    for name in strategies:
        stages = report.runs[name].stages
        train = stages[0].metrics
        test = next((s.metrics for s in stages[1:] if s.name == "evaluate"), {})
        metric = next((k for k in ("accuracy", "perplexity", "centroid_accuracy") if k in train), None)
        diff = report.weight_diff.get((name, stages[0].name))
        table.add_row(name, str(train.get("world_size", 1)), f"{train.get('train_loss', float('nan')):.4f}",
                      f"{train.get(metric, float('nan')):.4f}", f"{test.get(metric, float('nan')):.4f}",
                      f"{train.get('step_seconds') or float('nan'):.3f}", ", ".join(f"{m:.0f}" for m in train.get("peak_rss_mb", [])),
                      *([", ".join(f"{m:.0f}" for m in train.get("peak_cuda_mb", []))] if cuda else []),
                      f"{train.get('seconds', float('nan')):.0f}", "reference" if diff is None else f"{diff:.1e}")
    Console(width=200).print(table)


if __name__ == "__main__":
    main()
