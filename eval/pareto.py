"""The Pareto front of a benchmark sweep: the variants no other variant beats on both cost and quality.

Each variant is a :class:`Point`: ``x`` is its cost (size on disk in MB,
latency in ms; lower is better) and ``y`` its quality (the task metric,
higher or lower is better as the caller says). The front is what a reader of
``report.md`` chooses from; every other variant is dominated.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import groupby
from typing import Sequence


@dataclass(frozen=True)
class Point:
    """One variant on a cost/quality plot.

    Attributes:
        label: how the variant is named on plots and in tables.
        x: cost, lower is better (MB, ms, ...); None or NaN when not measured.
        y: quality, the task metric; None or NaN when not measured.
    """

    label: str
    x: float | None
    y: float | None


def is_measured(point: Point) -> bool:
    """Whether both of the point's coordinates are finite numbers (None, NaN and inf are not)."""
    return all(v is not None and math.isfinite(v) for v in (point.x, point.y))


def pareto_front(points: Sequence[Point], higher_is_better: bool = True) -> list[int]:
    """Indices of the non-dominated points, sorted by cost (then by index).

    Point ``a`` dominates point ``b`` when ``a`` costs no more
    (``a.x <= b.x``), is at least as good (``a.y >= b.y`` when
    ``higher_is_better``, ``a.y <= b.y`` otherwise), and is strictly better on
    at least one of the two. Hence, on ties:

    * two points equal on both axes do not dominate each other: both are on
      the front (unless a third point dominates them both);
    * a point with the same cost as another but worse quality is dominated;
    * a point with the same quality as another but higher cost is dominated.

    Points whose cost or quality is None, NaN or infinite were not measured
    (or failed): they are left out of the front and never dominate anything.

    Args:
        points: the variants; only ``x`` and ``y`` are read.
        higher_is_better: direction of the quality axis (False for perplexity).

    Returns:
        Indices into ``points``, by increasing ``x``; equal ``x`` by index.
    """
    sign = 1.0 if higher_is_better else -1.0
    measured = [(points[i].x, sign * points[i].y, i) for i in range(len(points)) if is_measured(points[i])]
    measured.sort(key=lambda p: (p[0], -p[1], p[2]))
    front: list[int] = []
    best_cheaper = -math.inf  # best quality among points strictly cheaper than the current cost
    for _, group in groupby(measured, key=lambda p: p[0]):
        group = list(group)
        top = group[0][1]  # the group is sorted by quality, best first
        if top > best_cheaper:
            front += [i for _, q, i in group if q == top]
            best_cheaper = top
    return front
