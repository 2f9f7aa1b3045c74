"""The Pareto front on hand-made examples (ties, dominated points, one point, missing values) and against brute force."""

import math
import random

import pytest

from slimtune.eval.pareto import Point, pareto_front


def brute_force_front(points: list[Point], higher_is_better: bool) -> list[int]:
    """Straight from the definition: i is on the front unless some j costs no more, is no worse, and is better on one axis."""
    sign = 1 if higher_is_better else -1

    def dominates(a: Point, b: Point) -> bool:
        return a.x <= b.x and sign * a.y >= sign * b.y and (a.x < b.x or sign * a.y > sign * b.y)

    ok = [i for i, p in enumerate(points) if p.x is not None and p.y is not None and not math.isnan(p.x) and not math.isnan(p.y)]
    front = [i for i in ok if not any(dominates(points[j], points[i]) for j in ok if j != i)]
    return sorted(front, key=lambda i: (points[i].x, i))


def test_front_with_ties_and_dominated_points():
    points = [
        Point("a", 1.0, 0.70),  # cheapest: on the front
        Point("b", 2.0, 0.80),  # better than a: on the front
        Point("c", 2.0, 0.75),  # same cost as b, worse: dominated by b
        Point("d", 3.0, 0.80),  # same quality as b, costs more: dominated by b
        Point("e", 4.0, 0.90),  # better than b: on the front
        Point("f", 4.0, 0.90),  # equal to e on both axes: neither dominates the other, both on the front
        Point("g", 5.0, 0.85),  # costs more than e and is worse: dominated
        Point("h", 0.5, 0.60),  # cheaper than everything: on the front, listed first
    ]
    assert pareto_front(points) == [7, 0, 1, 4, 5]


def test_a_single_point_is_the_front():
    assert pareto_front([Point("only", 12.5, 0.5)]) == [0]
    assert pareto_front([]) == []


def test_every_point_on_the_front_when_quality_rises_with_cost():
    points = [Point("c", 30.0, 0.9), Point("a", 10.0, 0.7), Point("b", 20.0, 0.8)]
    assert pareto_front(points) == [1, 2, 0]  # sorted by cost: 10, 20, 30


def test_lower_is_better_flips_the_quality_axis():
    # perplexity: lower is better
    points = [Point("fp32", 100.0, 20.0), Point("int8", 50.0, 21.0), Point("int4", 25.0, 25.0),
              Point("bad-int4", 25.0, 30.0),  # same cost as int4, higher perplexity: dominated
              Point("big", 120.0, 20.0)]  # same perplexity as fp32, costs more: dominated
    assert pareto_front(points, higher_is_better=False) == [2, 1, 0]
    # read as higher-is-better, the same numbers make bad-int4 (25, 30) the best: it dominates everything costlier
    assert pareto_front(points, higher_is_better=True) == [3]


def test_points_without_a_value_are_left_out_and_dominate_nothing():
    points = [Point("a", 1.0, 0.5), Point("nan-metric", 0.1, math.nan), Point("no-latency", None, 0.99),
              Point("nan-cost", math.nan, 0.99), Point("b", 2.0, 0.6), Point("no-metric", 0.2, None)]
    assert pareto_front(points) == [0, 4]  # without the excluded ones, a and b both lie on the front


@pytest.mark.parametrize("higher_is_better", [True, False])
def test_matches_brute_force_on_random_points_with_many_ties(higher_is_better):
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 12)
        # small integer grids make equal costs, equal qualities and duplicate points common
        points = [Point(str(i), float(rng.randint(0, 4)), float(rng.randint(0, 4))) for i in range(n)]
        if rng.random() < 0.3:
            points[rng.randrange(n)] = Point("missing", math.nan, 1.0)
        assert pareto_front(points, higher_is_better) == brute_force_front(points, higher_is_better)
