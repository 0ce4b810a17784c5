"""Charts of answer tables: the chart description against the gapminder CSV (the data's upstream) and the
Systema Globalis CSVs, tables that came over HTTP, and the PNG of ``ask --plot`` checked pixel by pixel at
the positions of the data it must show."""

from __future__ import annotations

import io
import sys

import numpy as np
import pytest
from gapminder_truth import gapminder
from PIL import Image

from grounding import ask
from grounding.chart import (
    LINE_COLOR,
    PROJECTION_COLOR,
    Chart,
    ChartError,
    PlotUnavailableError,
    chart_figure,
    chart_for,
    save_chart_png,
)
from grounding.sources import open_source
from grounding.types import TableResult

JAPAN = "How has life expectancy changed in Japan?"
LANDLOCKED = "Which landlocked countries have the highest life expectancy?"
COMPARE = "Compare life expectancy in France and Germany in 2007"
NIGERIA = "median age in Nigeria between 2000 and 2050"
# ddf--datapoints--median_age_years--by--geo--time.csv, nga 2050 (copied by hand; a UN projection), and the
# release year of the Systema Globalis snapshot (datapackage.json): later years are projections.
NIGERIA_2050 = 23.885
RELEASE_YEAR = 2026
# The store's names of places that the gapminder CSV names otherwise.
GAPMINDER_NAMES = {"Czechia": "Czech Republic", "Slovakia": "Slovak Republic", "Eswatini": "Swaziland",
                   "Democratic Republic of the Congo": "Congo, Dem. Rep."}


@pytest.fixture(scope="module")
def source():
    return open_source("local")


@pytest.fixture(scope="module")
def charts(source) -> dict[str, Chart]:
    found = {}
    for question in (JAPAN, LANDLOCKED, COMPARE, NIGERIA):
        (chart,) = ask(question, source=source).charts
        found[question] = chart
    return found


def test_a_series_is_a_line_over_the_years_with_units_source_and_attribution(charts):
    chart = charts[JAPAN]
    assert (chart.kind, chart.horizontal, chart.table) == ("line", False, 1)
    assert chart.title == "Table 1: Life expectancy in Japan"
    assert (chart.x_label, chart.y_label, chart.unit) == ("Year", "Life expectancy (years)", "years")
    years = list(range(1952, 2008, 5))
    assert [p.x for p in chart.points] == years
    assert [p.value for p in chart.points] == [gapminder("Japan", y, "lifeExp") for y in years]
    assert not chart.projections and not any(p.projection for p in chart.points)
    assert chart.footer[0] == "Source: Gapminder, https://www.gapminder.org/data/"
    assert chart.footer[1] == chart.attribution and "Gapminder" in chart.attribution


def test_projections_are_marked(charts):
    chart = charts[NIGERIA]
    assert [p.x for p in chart.points] == list(range(2000, 2051))
    assert [p.projection for p in chart.points] == [p.x >= RELEASE_YEAR for p in chart.points]
    assert chart.points[-1].value == NIGERIA_2050 and chart.points[-1].label == "2050"
    assert chart.y_label == "Median age (years)"  # the unit in the name is not repeated
    assert chart.projections and "projections" in chart.footer[-1] and "Dashed" in chart.footer[-1]
    assert "CC BY 4.0" in chart.attribution and chart.attribution in chart.footer


def test_rankings_and_comparisons_are_bars(charts):
    ranking = charts[LANDLOCKED]
    assert (ranking.kind, ranking.horizontal, ranking.x_label) == ("bar", True, "Place, 2007")
    names = [p.label.split(". ", 1)[1] for p in ranking.points]
    assert [p.label.split(".")[0] for p in ranking.points] == [str(i) for i in range(1, len(names) + 1)]
    values = [gapminder(GAPMINDER_NAMES.get(name, name), 2007, "lifeExp") for name in names]
    assert [p.value for p in ranking.points] == values == sorted(values, reverse=True)
    assert len(names) > 20 and names[0] == "Switzerland" and "Eswatini" in names
    comparison = charts[COMPARE]
    assert (comparison.kind, comparison.horizontal, comparison.x_label) == ("bar", False, "Place, 2007")
    assert [(p.label, p.value) for p in comparison.points] == [
        ("France", gapminder("France", 2007, "lifeExp")), ("Germany", gapminder("Germany", 2007, "lifeExp"))]


def test_tables_that_came_over_http_chart_alike(stats_server, source):
    """The NL endpoint's tables carry no ``kind``: the chart reads the shape from the columns."""
    remote = open_source("nl", base_url=stats_server.url)
    for question in (JAPAN, LANDLOCKED, NIGERIA):
        over_http, local = remote.table(question), source.table(question)
        assert over_http.kind is None and local.kind is not None
        drawn = chart_for(over_http)
        assert drawn is not None and drawn.attribution == local.attribution
        assert drawn.model_dump(exclude={"source"}) == chart_for(local).model_dump(exclude={"source"})


def test_tables_without_a_chart_shape_or_numbers():
    def table(columns, rows, kind=None):
        return TableResult(query="q", title="t", columns=columns, rows=rows, kind=kind)

    assert chart_for(table(["name", "capital"], [["France", "Paris"]])) is None
    assert chart_for(table(["date", "x"], [["2000", None], ["2001", "n/a"]])) is None
    mixed = chart_for(table(["date", "x"], [["2000", 1.0], ["2001-07", 2.0], ["", 5.0], ["2002 (projection)", 3.0]]))
    assert [p.x for p in mixed.points] == [None] * 4  # one date of another form: categories in table order
    assert [p.label for p in mixed.points] == ["2000", "2001-07", "", "2002"] and mixed.points[-1].projection
    monthly = chart_for(table(["date", "x"], [["2019-01", 1.0], ["2019-07", 2.0]]))
    assert [p.x for p in monthly.points] == [2019.0, 2019.5]
    dated = chart_for(table(["place", "date", "x"], [["A", "2000", 1.0], ["B", "2001 (projection)", 2.0]]))
    assert [p.label for p in dated.points] == ["A (2000)", "B (2001)"] and dated.x_label == "Place"
    assert [p.projection for p in dated.points] == [False, True] and "hatched" in dated.footer[-1]
    # Odd tables from a server: ragged rows, no place column, values that are not finite numbers.
    odd = chart_for(table(["place", "date", "x"], [["A", "2000"], ["B", None, 2.0], ["C", "2000", float("nan")],
                                                   ["E", "2000", 3.0, 4.0]], kind="comparison"))
    assert [(p.label, p.value) for p in odd.points] == [("B", 2.0)]
    assert chart_for(table(["country", "x"], [["A", 1.0]], kind="ranking")) is None


# -- the PNG ---------------------------------------------------------------------------------------------
def _rgb(hex_color: str) -> np.ndarray:
    return np.array([int(hex_color[i:i + 2], 16) for i in (1, 3, 5)])


def _near(pixels: np.ndarray, color: str, tolerance: int = 40) -> bool:
    return bool((np.abs(pixels.astype(int) - _rgb(color)).sum(axis=-1) <= tolerance).any())


def _rendered(chart: Chart, dpi: int = 100):
    """(image as an RGB array, the chart's Axes) of the figure exactly as save_chart_png writes it."""
    figure = chart_figure([chart])
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=dpi, facecolor="white")
    image = np.asarray(Image.open(buffer).convert("RGB"))
    (axes,) = [a for a in figure.axes if a.axison]
    return image, axes


def _pixel_of(axes, x: float, y: float, height: int) -> tuple[int, int]:
    """Image (row, column) of a data point (display coordinates have their origin at the bottom left)."""
    px, py = axes.transData.transform((x, y))
    return int(round(height - py)), int(round(px))


def test_png_line_draws_the_values_and_marks_projections(charts):
    chart = charts[NIGERIA]
    image, axes = _rendered(chart)
    height = image.shape[0]
    for point in chart.points:  # a filled point (observed) or a hollow one (projected) at each value
        row, column = _pixel_of(axes, point.x, point.value, height)
        centre, ring = image[row - 1:row + 2, column - 1:column + 2], image[row - 4:row + 5, column - 4:column + 5]
        assert _near(ring, LINE_COLOR), point
        assert _near(centre, "#ffffff", 60) == point.projection, point
    # No point where the data have none: well above the line at the first year there is only background.
    row, column = _pixel_of(axes, 2000, chart.points[0].value + 3, height)
    assert not _near(image[row - 3:row + 4, column - 3:column + 4], LINE_COLOR)


def test_png_bars_reach_each_value(charts):
    for question in (LANDLOCKED, COMPARE):
        chart = charts[question]
        image, axes = _rendered(chart)
        height = image.shape[0]
        margin = 0.02 * max(p.value for p in chart.points)  # a few pixels
        for index, point in enumerate(chart.points):  # the bar ends at its value: coloured before, not after
            inside, beyond = point.value - margin, point.value + margin
            inside = (inside, index) if chart.horizontal else (index, inside)
            beyond = (beyond, index) if chart.horizontal else (index, beyond)
            row, column = _pixel_of(axes, *inside, height)
            assert _near(image[row:row + 1, column:column + 1], LINE_COLOR), (question, point)
            row, column = _pixel_of(axes, *beyond, height)
            assert not _near(image[row:row + 1, column:column + 1], LINE_COLOR), (question, point)
    projected = chart_for(TableResult(query="q", title="t", columns=["place", "date", "x"],
                                      rows=[["A", "2050 (projection)", 4.0], ["B", "2050 (projection)", 2.0]]))
    image, axes = _rendered(projected)
    row, column = _pixel_of(axes, 0, 2.0, image.shape[0])
    assert _near(image[row - 8:row + 8, column - 8:column + 8], PROJECTION_COLOR, 20)  # light, hatched


def test_save_chart_png_size_and_content(charts, tmp_path):
    path = save_chart_png([charts[JAPAN], charts[LANDLOCKED]], tmp_path / "two.png", dpi=80)
    image = Image.open(path)
    assert image.format == "PNG" and image.width == 9 * 80 and image.height > 900  # 26 bars under a line chart
    pixels = np.asarray(image.convert("RGB"))
    assert (pixels.sum(axis=-1) < 600).mean() > 0.05  # far from blank: lines, bars and text
    with pytest.raises(ChartError, match="nothing to chart"):
        save_chart_png([], tmp_path / "none.png")
    with pytest.raises(ChartError, match="cannot write"):
        save_chart_png([charts[JAPAN]], tmp_path / "no-such-dir" / "x.png")


def test_missing_matplotlib_is_a_clear_error(charts, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    with pytest.raises(PlotUnavailableError, match=r"pip install 'gemma-grounding\[plot\]'"):
        save_chart_png([charts[JAPAN]], tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()


def test_cli_plot_writes_the_answers_chart(tmp_path, capsys):
    from models.cli import main

    assert main(["ask", LANDLOCKED, "--plot", str(tmp_path / "cli.png")]) == 0
    assert "Switzerland" in capsys.readouterr().out
    save_chart_png(ask(LANDLOCKED).charts, tmp_path / "api.png")
    assert (tmp_path / "cli.png").read_bytes() == (tmp_path / "api.png").read_bytes()  # the same chart
    assert main(["ask", "What is the GDP of Mars?", "--plot", str(tmp_path / "mars.png")]) == 0
    assert "no chart written" in capsys.readouterr().err and not (tmp_path / "mars.png").exists()
    assert main(["ask", JAPAN, "--mode", "rig", "--plot", str(tmp_path / "rig.png")]) == 2
    assert "--mode rag" in capsys.readouterr().err
    assert main(["ask", JAPAN, "--plot", str(tmp_path / "missing" / "x.png")]) == 2
    assert "no such directory" in capsys.readouterr().err
