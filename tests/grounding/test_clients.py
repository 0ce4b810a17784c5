"""Our NL and REST clients against real servers on 127.0.0.1, and the source factory."""

from __future__ import annotations

import threading
import time
from urllib.parse import parse_qs

import pytest

from grounding.http import RetryPolicy
from grounding.nl_client import NLClient
from grounding.resolver import LocalSource
from grounding.rest_client import RestClient
from grounding.sources import lookup_many, open_source
from grounding.types import AuthError, PointResult

FAST = RetryPolicy(attempts=2, backoff_base=0.01, read_timeout=5)

QUESTIONS = [
    ("life expectancy in Kenya in 2007", "country/KEN", "LifeExpectancy_Person", "2007", ("Kenya", "lifeExp")),
    ("How many people live in Nigeria?", "country/NGA", "Count_Person", "2007", ("Nigeria", "pop")),
    ("population of the US in 1952", "country/USA", "Count_Person", "1952", ("United States", "pop")),
    ("GDP per capita of Deutschland latest", "country/DEU",
     "Amount_EconomicActivity_GrossDomesticProduction_RealValue_PerCapita", "2007", ("Germany", "gdpPercap")),
]


@pytest.mark.parametrize(("question", "place", "variable", "year", "truth_key"), QUESTIONS)
def test_nl_client_point_against_our_server(stats_server, gapminder_truth, question, place, variable, year,
                                            truth_key):
    client = NLClient(stats_server.url, policy=FAST)
    result = client.point(question)
    assert (result.place, result.variable, result.date) == (place, variable, year)
    assert result.value == float(gapminder_truth[(truth_key[0], year)][truth_key[1]])
    assert result.source.name == "Gapminder" and result.score == 1.0
    assert result == LocalSource().point(question).model_copy(update={"variable_name": None, "place_name": None})


@pytest.mark.parametrize(("question", "place", "variable", "year", "truth_key"), QUESTIONS)
def test_rest_client_point_against_our_server(stats_server, gapminder_truth, question, place, variable, year,
                                              truth_key):
    client = RestClient(stats_server.rest_url, policy=FAST)
    result = client.point(question)
    assert (result.place, result.variable, result.date) == (place, variable, year)
    assert result.value == float(gapminder_truth[(truth_key[0], year)][truth_key[1]])
    assert result.source.name == "Gapminder" and result.unit in (None, "years", "USD (inflation-adjusted)")


def test_tables_through_both_clients_match_the_store(stats_server):
    local = LocalSource()
    nl = NLClient(stats_server.url, policy=FAST)
    for question in ["countries in Africa by life expectancy", "How has life expectancy changed in Kenya?",
                     "population of Kenya and Nigeria in 1977"]:
        expected, got = local.table(question), nl.table(question)
        assert (got.columns, got.rows, got.title, got.unit) == (expected.columns, expected.rows, expected.title,
                                                                 expected.unit)
    rest = RestClient(stats_server.rest_url, policy=FAST)
    ranking = rest.table("countries in Africa by life expectancy")
    assert [r[1:] for r in ranking.rows] == [r[1:] for r in local.table("countries in Africa by life expectancy").rows]
    series = rest.table("life expectancy in Kenya")
    assert series.rows == local.table("life expectancy in Kenya").rows


def test_no_data_through_clients(stats_server):
    for client in (NLClient(stats_server.url, policy=FAST), RestClient(stats_server.rest_url, policy=FAST)):
        assert client.point("What is the capital of France?") is None
        assert client.table("What is the capital of France?") is None


def test_rest_client_endpoints(stats_server):
    client = RestClient(stats_server.rest_url, policy=FAST)
    assert client.resolve_places(["Kenya", "Ivory Coast"]) == {"Kenya": ["country/KEN"], "Ivory Coast": ["country/CIV"]}
    candidates = client.resolve_indicators(["life expectancy"])["life expectancy"]
    assert candidates[0].dcid == "LifeExpectancy_Person" and candidates[0].score == 1.0
    assert client.names(["country/KEN", "Count_Person"]) == {"country/KEN": "Kenya", "Count_Person": "Population"}


def test_queries_are_url_encoded(fault_server):
    fault_server.good["/nodejs/query"] = {"charts": []}
    tricky = "life expectancy & GDP in Côte d'Ivoire? 100% #1 a+b=c"
    NLClient(fault_server.url, policy=FAST).point(tricky)
    sent = parse_qs(fault_server.requests[-1].query)
    assert sent["q"] == [tricky]
    assert sent["mode"] == ["toolformer_rig"] and sent["allCharts"] == ["1"] and sent["idx"] == ["base_uae_mem"]
    NLClient(fault_server.url, policy=FAST).table(tricky)
    sent = parse_qs(fault_server.requests[-1].query)
    assert sent["q"] == [tricky] and sent["mode"] == ["toolformer_rag"] and sent["client"] == ["table"]


CHART = {"type": "LINE", "title": "Average Income for Family Households in North Dakota", "unit": "Infl. adj. USD (CY)",
         "vars": ["Mean_Income_Household_FamilyHousehold"], "places": ["geoId/38"],
         "srcs": [{"name": "data.census.gov", "url": "https://data.census.gov/"}],
         "highlight": {"date": "2019", "value": 105819},
         "dcUrl": "https://datacommons.org/explore#q=family%20earnings%20in%20north%20dakota"}
CSV_TEXT = "date,Average Income for Family Households\r\n2019,105819\r\n2018,103731"


@pytest.mark.parametrize("csv_field", ["dataCsv", "data_csv"])
def test_both_csv_field_names_are_accepted(fault_server, csv_field):
    fault_server.good["/nodejs/query"] = {"charts": [dict(CHART, **{csv_field: CSV_TEXT})],
                                          "debug": {"debug": {"sv_matching": {"SV": ["Mean_Income_Household_FamilyHousehold"],
                                                                              "CosineScore": [0.91]}}}}
    client = NLClient(fault_server.url, policy=FAST)
    table = client.table("family earnings in north dakota")
    assert table.columns == ["date", "Average Income for Family Households"]
    assert table.rows == [["2019", 105819.0], ["2018", 103731.0]]
    assert table.source.name == "data.census.gov" and table.score == 0.91
    point = client.point("family earnings in north dakota")
    assert (point.value, point.date, point.unit, point.place, point.url) == (
        105819.0, "2019", "Infl. adj. USD (CY)", "geoId/38", CHART["dcUrl"])


def test_open_source_picks_local_without_a_key(monkeypatch, stats_server):
    monkeypatch.delenv("DC_API_KEY", raising=False)
    assert isinstance(open_source(), LocalSource)
    with pytest.raises(AuthError, match="DC_API_KEY"):
        open_source("nl")
    assert isinstance(open_source("nl", base_url=stats_server.url), NLClient)  # self-hosted: no key needed
    assert isinstance(open_source("rest", base_url=stats_server.rest_url), RestClient)
    monkeypatch.setenv("DC_API_KEY", "from-the-environment")
    chosen = open_source()
    assert isinstance(chosen, NLClient) and chosen.http.has_key
    with pytest.raises(ValueError, match="unknown source kind"):
        open_source("sql")
    with pytest.raises(TypeError, match="unknown settings"):
        open_source("local", colour="blue")


class SlowFlakySource:
    """A StatSource that fails on queries containing "boom" and records how many calls overlap."""

    name = "flaky"

    def __init__(self):
        self.active = 0
        self.max_active = 0
        self.calls = []
        self.lock = threading.Lock()

    def point(self, query):
        with self.lock:
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            self.calls.append(query)
        time.sleep(0.05)
        with self.lock:
            self.active -= 1
        if "boom" in query:
            raise RuntimeError(f"cannot look up {query!r}")
        return PointResult(query=query, value=float(len(query)))

    def table(self, query):
        return None


def test_lookup_many_keeps_order_reports_errors_and_bounds_concurrency():
    source = SlowFlakySource()
    queries = [f"q{i}" + (" boom" if i % 4 == 1 else "") for i in range(12)] + ["q0"]
    lookups = lookup_many(source, queries, mode="point", max_workers=3)
    assert [lk.query for lk in lookups] == queries
    for lookup in lookups:
        if "boom" in lookup.query:
            assert not lookup.ok and lookup.result is None and "RuntimeError" in lookup.error
        else:
            assert lookup.ok and lookup.result.value == float(len(lookup.query))
    assert source.max_active <= 3 and source.max_active >= 2
    assert len(source.calls) == 12  # the repeated "q0" was looked up once
    assert lookup_many(source, ["anything"], mode="table")[0].result is None


def test_lookup_many_over_http(stats_server):
    client = NLClient(stats_server.url, policy=FAST)
    lookups = lookup_many(client, ["population of Kenya", "capital of France", "life expectancy in Japan in 2007"],
                          "point", max_workers=2)
    assert [lk.ok for lk in lookups] == [True, True, True]
    assert lookups[1].result is None and lookups[2].result.value == 82.603
