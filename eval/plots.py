"""Cost/quality trade-off plots for ``slimtune bench``: accuracy against size or latency.

Each plot shows every measured variant as one marker labelled with its name,
the reference (the uncompressed model) as a star named in the legend, and the
Pareto front (:func:`slimtune.eval.pareto.pareto_front`) as a step line: at
any cost, the best quality a variant of at most that cost reaches.

Drawing uses a private :class:`matplotlib.figure.Figure` on an Agg canvas, so
importing this module neither picks a global backend nor touches pyplot
state. The x axis is logarithmic when the costs span more than a factor of 10
(all positive and ``max / min > 10``). Labels are placed greedily, each at the
one of a few small offsets around its marker that overlaps the labels and
markers already placed the least; with many close points some overlap can
remain. Points with a missing cost or quality (None, NaN, inf) cannot be
placed: they are named in a note under the plot instead.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.text import Annotation
from matplotlib.ticker import FuncFormatter, LogLocator
from matplotlib.transforms import Bbox

from slimtune.eval.pareto import Point, is_measured, pareto_front

LOG_SPAN = 10.0  # x is drawn on a log scale when max(x) / min(x) exceeds this
# Candidate label offsets from the marker, in points: right-up first, then around it.
OFFSETS = ((6, 4), (6, -4), (-6, 4), (-6, -4), (0, 9), (0, -9), (12, 12), (-12, -12), (12, -12), (-12, 12))
FRONT_COLOR, DOMINATED_COLOR, REFERENCE_COLOR = "tab:blue", "tab:gray", "tab:red"


def tradeoff_plot(path: str | Path, points: Sequence[Point], x_label: str, y_label: str, title: str,
                  reference: int | None = None, higher_is_better: bool = True) -> Figure:
    """Draw a trade-off plot and write it to ``path`` as a PNG, atomically.

    Args:
        path: the PNG to write; its directory is created if needed. The file
            appears complete or not at all (an existing file is replaced only
            once the new one is fully written).
        points: the variants; ``x`` is the cost (lower is better), ``y`` the metric.
        x_label, y_label, title: axis labels (with units) and plot title.
        reference: index in ``points`` of the reference model, drawn as a star; None for none.
        higher_is_better: direction of the metric (False for perplexity).

    Returns:
        The drawn figure (for inspection; it holds no global state).
    """
    fig = tradeoff_figure(points, x_label, y_label, title, reference, higher_is_better)
    save_png_atomic(fig, path)
    return fig


def tradeoff_figure(points: Sequence[Point], x_label: str, y_label: str, title: str,
                    reference: int | None = None, higher_is_better: bool = True) -> Figure:
    """The figure :func:`tradeoff_plot` writes: same arguments, without the file."""
    if reference is not None and not 0 <= reference < len(points):
        raise ValueError(f"reference index {reference} is outside the {len(points)} points")
    fig = Figure(figsize=(7.5, 5.0), dpi=120)
    FigureCanvasAgg(fig)
    fig.subplots_adjust(left=0.11, right=0.97, bottom=0.13, top=0.92)  # fixed, so label placement stays valid
    ax = fig.add_subplot()
    ax.set(xlabel=x_label, ylabel=y_label, title=title)
    ax.grid(True, alpha=0.3)
    shown = [i for i, p in enumerate(points) if is_measured(p)]
    front = pareto_front(points, higher_is_better)
    _draw_points(ax, points, shown, set(front), reference)
    if len(front) >= 2:
        ax.step([points[i].x for i in front], [points[i].y for i in front], where="post",
                color=FRONT_COLOR, alpha=0.6, linewidth=1.2, zorder=2, label="Pareto front")
    _set_limits(ax, [points[i].x for i in shown])
    _place_labels(fig, ax, [points[i] for i in shown])
    missing = [p.label for p in points if not is_measured(p)]
    if missing:
        fig.text(0.01, 0.01, "not plotted (no value): " + ", ".join(missing), fontsize=7, color=DOMINATED_COLOR)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(loc="best", fontsize=8)
    return fig


def _draw_points(ax, points: Sequence[Point], shown: list[int], front: set[int], reference: int | None) -> None:
    """One marker per shown point: front points in colour, dominated ones grey, the reference a star."""
    groups = (
        ([i for i in shown if i in front and i != reference], dict(color=FRONT_COLOR, marker="o", s=30), "on the Pareto front"),
        ([i for i in shown if i not in front and i != reference], dict(color=DOMINATED_COLOR, marker="o", s=30), "dominated"),
        # under the other markers, so a variant at (nearly) the reference's coordinates stays visible
        ([i for i in shown if i == reference], dict(color=REFERENCE_COLOR, marker="*", s=160, zorder=2.5),
         f"reference: {points[reference].label}" if reference is not None else ""),
    )
    for indices, style, name in groups:
        if indices:
            ax.scatter([points[i].x for i in indices], [points[i].y for i in indices], label=name, **{"zorder": 3, **style})


def _set_limits(ax, xs: list[float]) -> None:
    """Log x when the costs span more than :data:`LOG_SPAN`; then freeze the limits (labels are placed against them)."""
    if xs and min(xs) > 0 and max(xs) / min(xs) > LOG_SPAN:
        ax.set_xscale("log")
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))  # 10, 20, 50: readable without powers
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.margins(0.12)
    ax.autoscale_view()
    ax.set_xlim(ax.get_xlim())
    ax.set_ylim(ax.get_ylim())


def _place_labels(fig: Figure, ax, points: list[Point]) -> list[Annotation]:
    """Annotate every point with its label, each at the candidate offset that overlaps least."""
    renderer = fig.canvas.get_renderer()
    to_display = ax.transData.transform
    taken = [_marker_box(*to_display((p.x, p.y))) for p in points]
    inside = ax.get_window_extent(renderer)
    texts = []
    for p in sorted(points, key=lambda p: (p.x, p.y)):
        text = ax.annotate(p.label, (p.x, p.y), xytext=OFFSETS[0], textcoords="offset points", fontsize=7, zorder=4)
        best, best_cost = OFFSETS[0], math.inf
        for offset in OFFSETS:
            box = _try_offset(text, offset, renderer)
            cost = sum(_overlap(box, t) for t in taken) + box.width * box.height - _overlap(box, inside)
            if cost < best_cost:
                best, best_cost = offset, cost
            if cost == 0:
                break
        taken.append(_try_offset(text, best, renderer))
        texts.append(text)
    return texts


def _try_offset(text: Annotation, offset: tuple[int, int], renderer) -> Bbox:
    """Move ``text`` to ``offset`` points from its point, aligned away from it; its box in display pixels."""
    dx, dy = offset
    text.xyann = offset
    text.set_horizontalalignment("left" if dx > 0 else "right" if dx < 0 else "center")
    text.set_verticalalignment("bottom" if dy > 0 else "top" if dy < 0 else "center")
    return text.get_window_extent(renderer)


def _marker_box(x: float, y: float, half: float = 5.0) -> Bbox:
    """A marker's footprint in display pixels."""
    return Bbox.from_extents(x - half, y - half, x + half, y + half)


def _overlap(a: Bbox, b: Bbox) -> float:
    """Area (pixels^2) the two boxes share."""
    w = min(a.x1, b.x1) - max(a.x0, b.x0)
    h = min(a.y1, b.y1) - max(a.y0, b.y0)
    return max(w, 0.0) * max(h, 0.0)


def save_png_atomic(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` to ``path`` as a PNG through a temporary file in the same directory and ``os.replace``.

    If drawing or writing fails, the temporary file is removed and ``path``
    is untouched (absent, or its previous content). The file gets mode 0644.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            fig.savefig(f, format="png")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)  # a no-op once replaced
    return path
