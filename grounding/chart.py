"""Charts of answer tables: one description (:class:`Chart`) drawn by the web app (Chart.js) and by
``gemma-ground ask --plot`` (matplotlib), so both show the same data.

- a series (a variable over time in one place) is a line over the years;
- a comparison (several places) is a bar per place;
- a ranking (the places of a continent, region or group) is a horizontal bar per place, in rank order.

Projections (dates shown as ``"2050 (projection)"``) are marked: a dashed line and hollow points, light
hatched bars, and a note under the chart. Under every chart: the source and its attribution line.

    charts_for(tables)                   -> [Chart]   (numbered tables of an answer; tables without numbers: none)
    chart_figure(charts)                 -> a matplotlib Figure (no pyplot state)
    save_chart_png(charts, path, dpi=100) -> path     (raises PlotUnavailableError without matplotlib)
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field

from .rig import format_number
from .types import GroundingError, SourceRef, TableResult, split_projection_label

__all__ = ["Chart", "ChartPoint", "ChartError", "PlotUnavailableError", "chart_for", "charts_for",
           "chart_figure", "save_chart_png", "require_matplotlib", "PROJECTION_NOTE", "LINE_COLOR", "PROJECTION_COLOR"]

PROJECTION_NOTE = {"line": "Dashed line and hollow points: projections (years after the last observed one)",
                   "bar": "Light hatched bars: projections (years after the last observed one)"}
LINE_COLOR = "#1a5fb4"  # the web app's accent colour; observed values
PROJECTION_COLOR = "#8fb3e0"  # projections: the same hue, lighter
_DATE = re.compile(r"^(\d{4})(?:-(\d{2}))?(?:-(\d{2}))?$")


class ChartError(GroundingError):
    """A chart cannot be drawn (nothing to draw, or a file that cannot be written)."""


class PlotUnavailableError(ChartError):
    """matplotlib, which writes PNG charts, is not installed."""


class ChartPoint(BaseModel):
    label: str  # what the reader sees on the category axis: "2007", "Norway", "France (1990)"
    value: float
    x: float | None = None  # line charts: the date as a (fractional) year
    date: str | None = None  # the date of the value, without the projection mark
    projection: bool = False


class Chart(BaseModel):
    """What to draw for one table, independent of the drawing library."""

    kind: Literal["line", "bar"]
    horizontal: bool = False  # rankings: bars across, first rank at the top
    title: str  # "Table 1: Life expectancy in Japan"
    table: int | None = None  # the N of the [Table N] it draws
    x_label: str  # "Year", "Place", "Place, 1990"
    y_label: str  # the value axis: "Life expectancy (years)"
    unit: str | None = None
    points: list[ChartPoint]
    source: SourceRef | None = None
    attribution: str | None = None
    projections: bool = False  # some points are projections (the note says how they are drawn)
    footer: list[str] = Field(default_factory=list)  # the lines under the chart: source, attribution, note


def _year(date: str) -> float | None:
    """``"2007"`` -> 2007.0, ``"2019-07"`` -> 2019.5; None for a date of another form."""
    match = _DATE.match(date)
    if match is None:
        return None
    year, month = int(match.group(1)), int(match.group(2) or 1)
    return year + (month - 1) / 12


def _value_label(name: str, unit: str | None) -> str:
    """``Life expectancy (years)``; a unit the name already states is not repeated."""
    if not unit or unit.lower() in name.lower():
        return name
    return f"{name} ({unit})"


def _kind(table: TableResult) -> str | None:
    """The table's shape: its ``kind``, or read from its columns (tables that came over HTTP have none)."""
    if table.kind is not None:
        return table.kind
    columns = [str(c).lower() for c in table.columns]
    if columns[:1] == ["rank"] and "place" in columns:
        return "ranking"
    if columns[:2] == ["place", "date"]:
        return "comparison"
    if columns[:1] == ["date"] and len(columns) == 2:
        return "series"
    return None


def _number(value) -> float | None:
    """A finite number, else None (text, booleans, NaN and infinities are not drawn)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def chart_for(table: TableResult, number: int | None = None) -> Chart | None:
    """The chart of one table (None: a table of another shape, or without a numeric value)."""
    kind = _kind(table)
    columns = [str(c).lower() for c in table.columns]
    if kind is None or not columns or (kind != "series" and "place" not in columns):
        return None
    rows = [row for row in table.rows if len(row) == len(columns)]  # a ragged row (from a server) is not drawn
    variable = str(table.columns[-1])
    points: list[ChartPoint] = []
    if kind == "series":
        for date_cell, value in ((row[0], _number(row[-1])) for row in rows):
            if value is None or date_cell is None:
                continue
            date, projection = split_projection_label(str(date_cell))
            points.append(ChartPoint(label=date, value=value, x=_year(date), date=date, projection=projection))
        if any(p.x is None for p in points):  # dates of mixed forms: categories in table order
            points = [p.model_copy(update={"x": None}) for p in points]
        x_label = "Year" if points and points[0].x is not None else "Date"
    else:
        place_at = columns.index("place")
        date_at = columns.index("date") if "date" in columns else None
        for row in rows:
            value = _number(row[-1])
            if value is None:
                continue
            cell = row[date_at] if date_at is not None else None
            date, projection = split_projection_label(str(cell)) if cell not in (None, "") else ("", False)
            points.append(ChartPoint(label=str(row[place_at]), value=value, date=date or None, projection=projection))
        dates = {p.date for p in points}
        if len(dates) > 1:  # values of different years: each bar says its own
            points = [p.model_copy(update={"label": f"{p.label} ({p.date})"}) if p.date else p for p in points]
        if kind == "ranking":
            points = [p.model_copy(update={"label": f"{rank}. {p.label}"}) for rank, p in enumerate(points, 1)]
        x_label = f"Place, {next(iter(dates))}" if len(dates) == 1 and None not in dates else "Place"
    if not points:
        return None
    projections = any(p.projection for p in points)
    footer = []
    if table.source is not None:
        footer.append(f"Source: {table.source.name}" + (f", {table.source.url}" if table.source.url else ""))
    if table.attribution:
        footer.append(table.attribution)
    chart_kind = "line" if kind == "series" else "bar"
    if projections:
        footer.append(PROJECTION_NOTE[chart_kind])
    title = f"Table {number}: {table.title}" if number is not None else table.title
    return Chart(kind=chart_kind, horizontal=kind == "ranking", title=title, table=number,
                 x_label=x_label, y_label=_value_label(variable, table.unit), unit=table.unit, points=points,
                 source=table.source, attribution=table.attribution, projections=projections, footer=footer)


def charts_for(tables: Sequence) -> list[Chart]:
    """Charts of an answer's numbered tables (:class:`~grounding.rag.NumberedTable`), in table order."""
    return [chart for t in tables if (chart := chart_for(t.table, t.number)) is not None]


# -- matplotlib ----------------------------------------------------------------------------------------
WIDTH_INCHES = 9.0
BAR_INCHES = 0.22  # per bar of a ranking, so that 200 countries stay readable
MAX_VALUE_LABELS = 60  # bars labelled with their value (more would overlap)


def _height(chart: Chart) -> float:
    drawing = max(3.0, BAR_INCHES * len(chart.points) + 1.0) if chart.horizontal else 4.0
    return drawing + 0.25 * len(chart.footer) + 0.5


def _draw(ax, chart: Chart) -> None:
    values = [p.value for p in chart.points]
    if chart.kind == "line":
        xs = [p.x if p.x is not None else i for i, p in enumerate(chart.points)]
        observed = [i for i, p in enumerate(chart.points) if not p.projection]
        projected = [i for i, p in enumerate(chart.points) if p.projection]
        if observed:
            ax.plot([xs[i] for i in observed], [values[i] for i in observed], color=LINE_COLOR, marker="o",
                    markersize=4, linewidth=2)
        if projected:  # joined to the last observation, dashed, hollow points
            joined = observed[-1:] + projected
            ax.plot([xs[i] for i in joined], [values[i] for i in joined], color=LINE_COLOR, linestyle="--",
                    linewidth=2)
            ax.plot([xs[i] for i in projected], [values[i] for i in projected], linestyle="none", marker="o",
                    markersize=4, markerfacecolor="white", markeredgecolor=LINE_COLOR)
        if chart.points[0].x is None:
            ax.set_xticks(range(len(chart.points)), [p.label for p in chart.points], rotation=45, ha="right")
        else:
            from matplotlib.ticker import MaxNLocator

            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel(chart.x_label)
        ax.set_ylabel(chart.y_label)
        ax.grid(True, color="#e3e7eb")
        return
    colors = [PROJECTION_COLOR if p.projection else LINE_COLOR for p in chart.points]
    hatches = ["//" if p.projection else "" for p in chart.points]
    positions = range(len(chart.points))
    labels = [p.label for p in chart.points]
    if chart.horizontal:
        bars = ax.barh(positions, values, color=colors, edgecolor=LINE_COLOR)
        ax.set_yticks(positions, labels, fontsize=8 if len(labels) > 30 else 10)
        ax.invert_yaxis()  # rank 1 at the top
        ax.set_ylim(len(labels) - 0.5, -0.5)
        ax.set_xlabel(chart.y_label)
        ax.set_ylabel(chart.x_label)
        ax.grid(True, axis="x", color="#e3e7eb")
    else:
        bars = ax.bar(positions, values, color=colors, edgecolor=LINE_COLOR)
        ax.set_xticks(positions, labels, rotation=30 if len(labels) > 4 else 0, ha="right" if len(labels) > 4 else "center")
        ax.set_xlabel(chart.x_label)
        ax.set_ylabel(chart.y_label)
        ax.grid(True, axis="y", color="#e3e7eb")
    ax.set_axisbelow(True)
    for bar, hatch in zip(bars, hatches, strict=True):
        bar.set_hatch(hatch)
    if len(bars) <= MAX_VALUE_LABELS:
        ax.bar_label(bars, labels=[format_number(v) for v in values], padding=2, fontsize=8, color="#1d232a")


def require_matplotlib() -> None:
    """Raise :class:`PlotUnavailableError` (saying how to install it) when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise PlotUnavailableError("writing a chart needs matplotlib: pip install 'gemma-grounding[plot]' "
                                   "(or pip install matplotlib)") from None


def chart_figure(charts: Sequence[Chart]):
    """A matplotlib Figure with the charts one under the other, each with its title, axis labels and the
    lines under it (source, attribution, projection note). Built without pyplot: no global state."""
    if not charts:
        raise ChartError("nothing to chart: the answer has no table with numeric values")
    require_matplotlib()
    from matplotlib.figure import Figure

    heights = [_height(c) for c in charts]
    figure = Figure(figsize=(WIDTH_INCHES, sum(heights)), layout="constrained")
    subfigures = figure.subfigures(len(charts), 1, height_ratios=heights) if len(charts) > 1 else [figure]
    for sub, chart in zip(subfigures, charts, strict=True):
        footer = "\n".join(chart.footer)
        grid = sub.add_gridspec(2, 1, height_ratios=[_height(chart) - 0.25 * len(chart.footer) - 0.3,
                                                     0.25 * len(chart.footer) + 0.3])
        ax = sub.add_subplot(grid[0])
        ax.set_title(chart.title, loc="left", fontsize=11, fontweight="bold")
        _draw(ax, chart)
        note = sub.add_subplot(grid[1])
        note.axis("off")
        note.text(0, 1, footer, va="top", ha="left", fontsize=8, color="#5b6670", wrap=True)
    return figure


def save_chart_png(charts: Sequence[Chart], path: str | Path, *, dpi: int = 100) -> Path:
    """Write the charts as one PNG (see :func:`chart_figure`)."""
    path = Path(path)
    figure = chart_figure(charts)
    try:
        figure.savefig(path, format="png", dpi=dpi, facecolor="white")
    except OSError as e:
        raise ChartError(f"{path}: cannot write the chart ({e.strerror or e})") from None
    return path
