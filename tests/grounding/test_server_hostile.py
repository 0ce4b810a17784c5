"""The statistics server against malformed and hostile requests, over raw sockets to a real server on
127.0.0.1: each gets a fast 4xx JSON error in the API's shape, nothing is logged as an error, and the
server keeps answering (also while slow clients hold connections open)."""

from __future__ import annotations

import json
import logging
import threading

import pytest
import requests
from datacommons_client import DataCommonsClient
from raw_http import check_refused, exchange, hostile_requests, request_head

from grounding.asgi import RequestLimits
from grounding.server import start_server
from grounding.store import open_gapminder_store

LIMITS = RequestLimits(max_body_bytes=1 << 20, body_timeout=0.8, head_timeout=0.8)
TIMEOUT = 10


@pytest.fixture(scope="module")
def server(default_store):
    running = start_server(default_store, limits=LIMITS)
    yield running
    running.stop()


def still_serving(server) -> None:
    probe = requests.get(f"{server.rest_url}/node", params={"nodes": "country/KEN", "property": "->name"},
                         timeout=TIMEOUT)
    assert probe.json()["data"]["country/KEN"]["arcs"]["name"]["nodes"] == [{"value": "Kenya"}]


CASES = hostile_requests("/v2/observation", body_timeout=LIMITS.body_timeout, head_timeout=LIMITS.head_timeout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_request_gets_a_fast_json_4xx(server, name, caplog):
    parts, status = CASES[name]
    with caplog.at_level(logging.ERROR):
        response = check_refused((server.host, server.port), parts, status, within=LIMITS.body_timeout + 2.0)
    body = response.json()
    assert set(body) == {"code", "message"} and body["code"] == response.status and body["message"]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    still_serving(server)


def test_slow_clients_do_not_block_others(server):
    """Eight connections dripping their bodies, one request answered meanwhile at normal speed."""
    slow = CASES["slowloris body"][0]
    results = []
    threads = [threading.Thread(target=lambda: results.append(exchange((server.host, server.port), slow)))
               for _ in range(8)]
    for thread in threads:
        thread.start()
    answered = requests.post(f"{server.rest_url}/node", json={"nodes": ["africa"], "property": "->name"},
                             timeout=TIMEOUT)
    assert answered.status_code == 200 and answered.elapsed.total_seconds() < LIMITS.body_timeout
    for thread in threads:
        thread.join(timeout=30)
    assert [r.status for r in results] == [408] * 8


WRONG_TYPES = [
    ("observation", {"variable": {"dcids": {"a": 1}}, "entity": {"dcids": ["country/KEN"]}}, "variable.dcids"),
    ("observation", {"variable": "Count_Person", "entity": {"dcids": ["country/KEN"]}}, "variable"),
    ("observation", {"variable": {"dcids": ["Count_Person"]}, "entity": {"dcids": [1, 2]}}, "entity.dcids.0"),
    ("observation", {"variable": {"dcids": ["Count_Person"]}, "entity": ["country/KEN"]}, "entity"),
    ("observation", {"variable": {"dcids": ["Count_Person"]}, "entity": {"dcids": ["country/KEN"]},
                     "date": {"y": 2007}}, "date"),
    ("observation", {"variable": {"dcids": ["Count_Person"]}, "entity": {"expression": ["x"]}}, "entity.expression"),
    ("observation", {"variable": {"dcids": ["Count_Person"]}, "entity": {"dcids": ["country/KEN"]},
                     "select": "value"}, "select"),
    ("node", {"nodes": {"country/KEN": 1}, "property": "->name"}, "nodes"),
    ("node", {"nodes": ["country/KEN"], "property": {"x": "->name"}}, "property"),
    ("node", {"nodes": [["country/KEN"]], "property": "->name"}, "nodes.0"),
    ("resolve", {"nodes": [{"name": "Kenya"}], "property": "<-description->dcid"}, "nodes.0"),
    ("resolve", {"nodes": ["Kenya"], "property": ["<-description->dcid"]}, "property"),
    ("resolve", {"nodes": ["Kenya"], "resolver": 7}, "resolver"),
]


@pytest.mark.parametrize("endpoint,body,field", WRONG_TYPES)
def test_wrongly_typed_fields_are_400_naming_the_field(server, endpoint, body, field, caplog):
    with caplog.at_level(logging.ERROR):
        response = requests.post(f"{server.rest_url}/{endpoint}", json=body, timeout=TIMEOUT)
    assert response.status_code == 400, response.text
    message = response.json()["message"]
    assert f"{field}:" in message, message
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_json_that_is_not_an_object(server):
    for body in (b"[1, 2]", b'"nodes"', b"12", b"null"):
        response = requests.post(f"{server.rest_url}/node", data=body, timeout=TIMEOUT)
        assert response.status_code == 400 and response.json()["code"] == 400, (body, response.text)


def test_unknown_methods_and_paths_are_json(server):
    for method in ("DELETE", "PUT", "PATCH", "OPTIONS"):
        response = requests.request(method, f"{server.rest_url}/observation", timeout=TIMEOUT)
        assert response.status_code == 405 and response.json()["code"] == 405, (method, response.text)
    response = exchange((server.host, server.port), [request_head("GET", "/%ff%fe/../../etc", {})])
    assert response.status == 404 and response.json()["code"] == 404


@pytest.fixture(scope="module")
def gapminder_server():
    running = start_server(open_gapminder_store(), limits=LIMITS)
    yield running
    running.stop()


def test_official_client_fetches_available_variables(gapminder_server, gapminder_truth):
    """``fetch_available_statistical_variables`` sends an empty variable list: the variables with data.
    Run on the gapminder excerpt, whose three measures cover every country (the oracle is its CSV)."""
    server = gapminder_server
    client = DataCommonsClient(url=server.rest_url)
    available = client.observation.fetch_available_statistical_variables(["country/KEN", "country/JPN"])
    assert set(available) == {"country/KEN", "country/JPN"}
    kenya = available["country/KEN"]
    # gapminder has three measures (lifeExp, pop, gdpPercap) for every country
    assert len(kenya) == 3 and set(available["country/JPN"]) == set(kenya)
    for variable in kenya:  # each one has observations when asked for by name
        response = client.observation.fetch(variable_dcids=variable, entity_dcids="country/KEN", date="")
        observations = response.byVariable[variable].byEntity["country/KEN"].orderedFacets[0].observations
        assert len(observations) == sum(1 for country, _ in gapminder_truth if country == "Kenya")
    raw = requests.post(f"{server.rest_url}/observation", json={
        "date": "LATEST", "entity": {"dcids": ["country/KEN"]}, "select": ["entity", "variable"]}, timeout=TIMEOUT)
    assert raw.json() == {"byVariable": {v: {"byEntity": {"country/KEN": {}}} for v in kenya}}


def test_error_bodies_never_echo_a_key(default_store):
    with start_server(default_store, api_key="k3y-that-must-stay-secret") as keyed:
        response = requests.get(f"{keyed.url}/nodejs/query", params={"q": "x", "key": "wrong-k3y-guess"},
                                timeout=TIMEOUT)
        assert response.status_code == 401 and "wrong-k3y-guess" not in response.text
        assert json.loads(response.text)["code"] == 401
