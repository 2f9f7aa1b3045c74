"""Trade-off plots: valid PNGs, one marker and one label per point, the reference and the front drawn, atomic writes."""

import itertools
import math

import pytest
from matplotlib.figure import Figure
from matplotlib.image import imread

from slimtune.eval.pareto import Point
from slimtune.eval.plots import tradeoff_figure, tradeoff_plot

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
POINTS = [
    Point("fp32", 90.0, 0.80),  # the reference: costliest, best
    Point("int8", 25.0, 0.79),
    Point("int4-rtn", 14.0, 0.70),  # dominated by int4-gptq: same size, worse
    Point("int4-gptq", 14.0, 0.76),
    Point("distill-3L", 45.0, 0.74),  # dominated by int8: bigger and worse
]


def plotted_offsets(fig: Figure) -> list[tuple[float, float]]:
    """Every marker of the figure's scatter collections, as (x, y)."""
    ax = fig.axes[0]
    return [tuple(map(float, xy)) for c in ax.collections for xy in c.get_offsets()]


def test_writes_a_valid_png_of_the_figure_size(tmp_path):
    path = tmp_path / "size.png"
    tradeoff_plot(path, POINTS, "size on disk (MB)", "accuracy", "accuracy vs size", reference=0)
    assert path.read_bytes()[:8] == PNG_MAGIC
    # 7.5 x 5.0 inches at 120 dpi = 900 x 600 pixels, RGBA
    assert imread(path).shape == (600, 900, 4)
    assert [p.name for p in tmp_path.iterdir()] == ["size.png"]  # no temporary file left behind


def test_one_marker_and_one_label_per_point():
    fig = tradeoff_figure(POINTS, "size (MB)", "accuracy", "t", reference=0)
    assert sorted(plotted_offsets(fig)) == sorted((p.x, p.y) for p in POINTS)
    assert sorted(t.get_text() for t in fig.axes[0].texts) == sorted(p.label for p in POINTS)


def test_reference_is_a_star_named_in_the_legend():
    fig = tradeoff_figure(POINTS, "size (MB)", "accuracy", "t", reference=0)
    ax = fig.axes[0]
    stars = [c for c in ax.collections if c.get_label() == "reference: fp32"]
    assert len(stars) == 1 and [tuple(xy) for xy in stars[0].get_offsets()] == [(90.0, 0.80)]
    assert "reference: fp32" in [t.get_text() for t in ax.get_legend().get_texts()]
    dominated = next(c for c in ax.collections if c.get_label() == "dominated")
    assert sorted(map(tuple, dominated.get_offsets())) == [(14.0, 0.70), (45.0, 0.74)]


def test_the_front_is_a_step_line_through_the_front_points_by_cost():
    fig = tradeoff_figure(POINTS, "size (MB)", "accuracy", "t", reference=0)
    (line,) = [l for l in fig.axes[0].lines if l.get_label() == "Pareto front"]
    # front by hand: int4-gptq (14, .76) < int8 (25, .79) < fp32 (90, .80); int4-rtn and distill-3L are dominated
    assert list(line.get_xdata()) == [14.0, 25.0, 90.0]
    assert list(line.get_ydata()) == [0.76, 0.79, 0.80]
    assert line.get_drawstyle() == "steps-post"


def test_log_x_only_when_costs_span_more_than_ten_times():
    assert tradeoff_figure(POINTS, "ms", "acc", "t").axes[0].get_xscale() == "linear"  # 90 / 14 = 6.4
    wide = POINTS + [Point("tiny", 2.0, 0.5)]  # 90 / 2 = 45
    assert tradeoff_figure(wide, "ms", "acc", "t").axes[0].get_xscale() == "log"


def test_points_without_a_value_are_named_not_plotted():
    points = POINTS + [Point("no-onnx", None, 0.7), Point("failed", 10.0, math.nan)]
    fig = tradeoff_figure(points, "ms", "acc", "t", reference=0)
    assert len(plotted_offsets(fig)) == len(POINTS)
    assert any("no-onnx" in t.get_text() and "failed" in t.get_text() for t in fig.texts)


def test_labels_of_a_tight_cluster_do_not_overlap():
    # with one fixed offset these five labels, 1-2 % of the axis apart, would overlap
    cluster = [Point(f"variant-{i}", 10.0 + 0.3 * i, 0.800 + 0.002 * (i % 2)) for i in range(5)]
    fig = tradeoff_figure(cluster + [Point("far", 30.0, 0.6)], "MB", "acc", "t")
    renderer = fig.canvas.get_renderer()
    boxes = [t.get_window_extent(renderer) for t in fig.axes[0].texts]
    for a, b in itertools.combinations(boxes, 2):
        assert not a.overlaps(b)


def test_lower_is_better_front_and_no_reference():
    points = [Point("a", 1.0, 30.0), Point("b", 2.0, 20.0), Point("c", 3.0, 25.0)]  # perplexity: c is dominated by b
    fig = tradeoff_figure(points, "MB", "perplexity", "t", higher_is_better=False)
    (line,) = fig.axes[0].lines
    assert list(line.get_xdata()) == [1.0, 2.0]
    assert not any(c.get_label().startswith("reference") for c in fig.axes[0].collections)


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "plot.png"
    path.write_bytes(b"previous")

    def fail_halfway(self, f, **kwargs):
        f.write(PNG_MAGIC + b"half")
        raise OSError("disk full")

    monkeypatch.setattr(Figure, "savefig", fail_halfway)
    with pytest.raises(OSError, match="disk full"):
        tradeoff_plot(path, POINTS, "MB", "acc", "t")
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
    assert path.read_bytes() == b"previous"


def test_a_reference_outside_the_points_is_refused():
    with pytest.raises(ValueError, match="reference index 5"):
        tradeoff_figure(POINTS, "MB", "acc", "t", reference=5)
