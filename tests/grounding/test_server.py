"""The statistics server over real HTTP on 127.0.0.1: NL endpoint shapes and the /v2 subset."""

from __future__ import annotations

import csv
import io
from concurrent.futures import ThreadPoolExecutor

import requests

from grounding.server import format_number, start_server

TIMEOUT = 10


def nl(server, question, mode):
    params = {"q": question, "mode": mode, "idx": "base_uae_mem"}
    params.update({"allCharts": "1"} if mode == "toolformer_rig" else {"client": "table"})
    response = requests.get(f"{server.url}/nodejs/query", params=params, timeout=TIMEOUT)
    assert response.status_code == 200
    return response.json()


def test_rig_mode_answers_a_line_chart_with_highlight(stats_server, gapminder_truth):
    data = nl(stats_server, "What was the life expectancy in Kenya in 1977?", "toolformer_rig")
    chart = data["charts"][0]
    assert chart["type"] == "LINE"
    assert chart["highlight"] == {"value": float(gapminder_truth[("Kenya", "1977")]["lifeExp"]), "date": "1977"}
    assert chart["vars"] == ["LifeExpectancy_Person"] and chart["places"] == ["country/KEN"]
    assert chart["srcs"] == [{"name": "Gapminder", "url": "https://www.gapminder.org/data/"}]
    assert chart["unit"] == "years" and chart["title"] == "Life expectancy in Kenya"
    rows = list(csv.reader(io.StringIO(chart["dataCsv"])))
    assert rows[0] == ["date", "Life expectancy in Kenya"] and len(rows) == 13
    assert data["debug"]["debug"]["sv_matching"]["SV"][0] == "LifeExpectancy_Person"
    assert data["debug"]["debug"]["sv_matching"]["CosineScore"][0] == 1.0


def test_rag_mode_answers_tables(stats_server, gapminder_truth):
    chart = nl(stats_server, "countries in Africa by life expectancy", "toolformer_rag")["charts"][0]
    assert chart["type"] == "RANKING" and chart["placeType"] == "Country" and chart["places"] == ["africa"]
    assert chart["data_csv"] == chart["dataCsv"]  # both names: DataGemma's reference client reads data_csv
    rows = list(csv.reader(io.StringIO(chart["dataCsv"])))
    assert rows[0] == ["rank", "place", "date", "Life expectancy"] and len(rows) == 53
    best = max((float(r["lifeExp"]), c) for (c, y), r in gapminder_truth.items()
               if y == "2007" and r["continent"] == "Africa")
    assert float(rows[1][3]) == best[0]
    chart = nl(stats_server, "population of Kenya", "toolformer_rag")["charts"][0]
    rows = list(csv.reader(io.StringIO(chart["dataCsv"])))
    assert chart["type"] == "LINE" and rows[0] == ["date", "Population"]
    assert rows[-1] == ["2007", gapminder_truth[("Kenya", "2007")]["pop"]]  # integers without ".0"
    chart = nl(stats_server, "life expectancy in Kenya and Nigeria", "toolformer_rag")["charts"][0]
    assert chart["type"] == "BAR" and chart["places"] == ["country/KEN", "country/NGA"]


def test_no_data_is_an_empty_answer_with_a_reason(stats_server):
    for mode in ("toolformer_rig", "toolformer_rag"):
        data = nl(stats_server, "What is the capital of France?", mode)
        assert data["charts"] == [] and "no variable matched" in data["err"]


def test_v2_node(stats_server):
    url = stats_server.rest_url
    data = requests.post(f"{url}/node", json={"nodes": ["country/KEN", "LifeExpectancy_Person", "nowhere"],
                                              "property": "->[name, typeOf]"}, timeout=TIMEOUT).json()["data"]
    assert data["country/KEN"]["arcs"]["name"]["nodes"] == [{"value": "Kenya"}]
    assert data["country/KEN"]["arcs"]["typeOf"]["nodes"][0]["dcid"] == "Country"
    assert data["LifeExpectancy_Person"]["arcs"]["typeOf"]["nodes"][0]["dcid"] == "StatisticalVariable"
    assert data["nowhere"] == {}
    # the probe the official client makes on construction (GET form)
    probe = requests.get(f"{url}/node?nodes=country%2FGTM&property=->name", timeout=TIMEOUT).json()
    assert probe["data"]["country/GTM"]["arcs"]["name"]["nodes"][0]["value"] == "Guatemala"
    children = requests.post(f"{url}/node", json={"nodes": ["africa"], "property": "<-containedInPlace+{typeOf:Country}"},
                             timeout=TIMEOUT).json()["data"]["africa"]["arcs"]["containedInPlace+"]["nodes"]
    assert {"dcid": "country/KEN", "name": "Kenya", "types": ["Country"]} in children
    bad = requests.post(f"{url}/node", json={"nodes": ["africa"], "property": "garbage"}, timeout=TIMEOUT)
    assert bad.status_code == 400 and "unsupported node request" in bad.json()["message"]


def test_v2_resolve(stats_server):
    url = stats_server.rest_url
    entities = requests.post(f"{url}/resolve", json={"nodes": ["Kenya", "Deutschland", "us", "US", "Atlantis"],
                                                     "property": "<-description->dcid"}, timeout=TIMEOUT).json()["entities"]
    found = {e["node"]: [c["dcid"] for c in e["candidates"]] for e in entities}
    assert found == {"Kenya": ["country/KEN"], "Deutschland": ["country/DEU"], "us": [], "US": ["country/USA"],
                     "Atlantis": []}
    typed = requests.post(f"{url}/resolve", json={"nodes": ["Africa"], "property": "<-description{typeOf:Country}->dcid"},
                          timeout=TIMEOUT).json()["entities"]
    assert typed[0]["candidates"] == []
    indicators = requests.post(f"{url}/resolve", json={"nodes": ["how long do people live"], "resolver": "indicator"},
                               timeout=TIMEOUT).json()["entities"][0]["candidates"]
    assert indicators[0]["dcid"] == "LifeExpectancy_Person"
    assert indicators[0]["metadata"]["score"] == "1.0000" and indicators[0]["typeOf"] == ["StatisticalVariable"]


def test_v2_observation(stats_server, gapminder_truth):
    url = stats_server.rest_url
    body = {"date": "LATEST", "variable": {"dcids": ["Count_Person"]}, "entity": {"dcids": ["country/KEN"]},
            "select": ["date", "variable", "entity", "value", "facet"]}
    data = requests.post(f"{url}/observation", json=body, timeout=TIMEOUT).json()
    facet = data["byVariable"]["Count_Person"]["byEntity"]["country/KEN"]["orderedFacets"][0]
    assert facet["observations"] == [{"date": "2007", "value": float(gapminder_truth[("Kenya", "2007")]["pop"])}]
    assert data["facets"][facet["facetId"]]["importName"] == "Gapminder"
    everything = requests.post(f"{url}/observation", json=dict(body, date=""), timeout=TIMEOUT).json()
    assert everything["byVariable"]["Count_Person"]["byEntity"]["country/KEN"]["orderedFacets"][0]["obsCount"] == 12
    one_year = requests.post(f"{url}/observation", json=dict(body, date="1952"), timeout=TIMEOUT).json()
    assert one_year["byVariable"]["Count_Person"]["byEntity"]["country/KEN"]["orderedFacets"][0]["observations"] == \
        [{"date": "1952", "value": float(gapminder_truth[("Kenya", "1952")]["pop"])}]
    by_expression = requests.post(f"{url}/observation", json=dict(
        body, entity={"expression": "europe<-containedInPlace+{typeOf:Country}"}), timeout=TIMEOUT).json()
    assert len(by_expression["byVariable"]["Count_Person"]["byEntity"]) == 30
    # GET form and the custom-instance path
    got = requests.get(f"{stats_server.url}/core/api/v2/observation", params={
        "date": "2002", "variable.dcids": "LifeExpectancy_Person", "entity.dcids": "country/JPN",
        "select": ["date", "variable", "entity", "value"]}, timeout=TIMEOUT).json()
    assert got["byVariable"]["LifeExpectancy_Person"]["byEntity"]["country/JPN"]["orderedFacets"][0][
        "observations"][0]["value"] == float(gapminder_truth[("Japan", "2002")]["lifeExp"])


def test_errors_are_json(stats_server):
    missing = requests.get(f"{stats_server.url}/v3/nothing", timeout=TIMEOUT)
    assert missing.status_code == 404 and "/nodejs/query" in missing.json()["message"]
    bad_body = requests.post(f"{stats_server.rest_url}/observation", data=b"{not json", timeout=TIMEOUT)
    assert bad_body.status_code == 400
    no_query = requests.get(f"{stats_server.url}/nodejs/query", timeout=TIMEOUT)
    assert no_query.status_code == 400


def test_api_key_is_enforced_when_set(default_store):
    with start_server(default_store, api_key="s3cret-key") as server:
        query = {"q": "population of Kenya", "mode": "toolformer_rig"}
        assert requests.get(f"{server.url}/nodejs/query", params=query, timeout=TIMEOUT).status_code == 401
        ok = requests.get(f"{server.url}/nodejs/query", params=dict(query, key="s3cret-key"), timeout=TIMEOUT)
        assert ok.status_code == 200 and ok.json()["charts"]
        header = requests.post(f"{server.rest_url}/node", json={"nodes": ["africa"], "property": "->name"},
                               headers={"X-API-Key": "s3cret-key"}, timeout=TIMEOUT)
        assert header.status_code == 200


def test_concurrent_requests(stats_server):
    questions = [f"population of Kenya in {year}" for year in range(1952, 2008, 5)] * 3

    def ask(question):
        return nl(stats_server, question, "toolformer_rig")["charts"][0]["highlight"]["date"]

    with ThreadPoolExecutor(8) as pool:
        dates = list(pool.map(ask, questions))
    assert dates == [q[-4:] for q in questions]


def test_format_number_round_trips():
    for value in [35610177.0, 54.11, 0.1 + 0.2, 1e20, -3.5, 974.5803384]:
        assert float(format_number(value)) == value
    assert format_number(35610177.0) == "35610177"


def test_reference_client_style_urls(stats_server, gapminder_truth):
    # DataGemma's reference client joins the question with '+' and does not otherwise encode it
    url = (f"{stats_server.url}/nodejs/query?&q=what+was+the+life+expectancy+in+Kenya+in+2002?"
           "&allCharts=1&mode=toolformer_rig&idx=base_uae_mem&key=anything")
    chart = requests.get(url, timeout=TIMEOUT).json()["charts"][0]
    assert chart["highlight"] == {"value": float(gapminder_truth[("Kenya", "2002")]["lifeExp"]), "date": "2002"}
