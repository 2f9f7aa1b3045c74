"""CPU/GPU latency of a model at a fixed input shape, in PyTorch and ONNX Runtime.

Latency is the median wall time of ``runs`` calls after ``warmup`` calls, on
one batch of ``batch_size`` real examples padded to the task's ``max_length``
(a fixed, worst-case shape so numbers are comparable across stages). Threads
are whatever torch / onnxruntime choose on the machine; compare ratios from
one run, not absolute times across machines.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def median_ms(fn: Callable[[], object], runs: int = 30, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def torch_latency_ms(forward: Callable[[], object], runs: int = 30, warmup: int = 5) -> float:
    with torch.inference_mode():
        return median_ms(forward, runs, warmup)


def ort_latency_ms(session, feed: dict, runs: int = 30, warmup: int = 5) -> float:
    return median_ms(lambda: session.run(None, feed), runs, warmup)


def interleaved_latency_ms(forwards: dict[str, Callable[[], object]], rounds: int = 5, runs: int = 20, warmup: int = 5) -> dict[str, float]:
    """Median latency of each forward, measured round-robin so drift on a shared machine hits all alike.

    Each of ``rounds`` rounds times every forward ``runs`` times in turn; the
    result per name is the median over all its ``rounds * runs`` calls.
    """
    times: dict[str, list[float]] = {name: [] for name in forwards}
    with torch.inference_mode():
        for fn in forwards.values():
            for _ in range(warmup):
                fn()
        for _ in range(rounds):
            for name, fn in forwards.items():
                for _ in range(runs):
                    start = time.perf_counter()
                    fn()
                    times[name].append((time.perf_counter() - start) * 1e3)
    return {name: statistics.median(t) for name, t in times.items()}
