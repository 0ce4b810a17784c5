"""Every fault a remote source can throw ends in a successful retry or a typed error, never a hang.

The fault server (conftest) is a real HTTP server on 127.0.0.1; the clients run with short timeouts and
backoffs so the whole file stays fast. A sentinel API key must never leak into errors, logs or reprs.
"""

from __future__ import annotations

import json
import logging
import socket
import time

import pytest
from conftest import Fault

from grounding.http import HttpClient, ResponseCache, RetryPolicy, map_bounded, redact
from grounding.nl_client import NLClient
from grounding.rest_client import RestClient
from grounding.sources import lookup_many
from grounding.types import AuthError, DataSourceError, RateLimitedError, SchemaDriftError, TransientError

pytestmark = pytest.mark.timeout(30)  # a hang is a failure, not a stuck suite

POLICY = RetryPolicy(attempts=3, connect_timeout=1.0, read_timeout=0.3, backoff_base=0.01, backoff_max=0.05,
                     max_retry_after=5)
SENTINEL = "SENTINEL-KEY-7f3a9c"
GOOD_NL = {"charts": [{"type": "LINE", "title": "Population in Kenya", "vars": ["Count_Person"],
                       "places": ["country/KEN"], "srcs": [{"name": "Gapminder", "url": "https://www.gapminder.org/data/"}],
                       "highlight": {"value": 35610177, "date": "2007"},
                       "dataCsv": "date,Population in Kenya\r\n2007,35610177"}]}
NL_PATH = "/nodejs/query"


def nl_client(server, **kwargs):
    server.good[NL_PATH] = GOOD_NL
    return NLClient(server.url, policy=kwargs.pop("policy", POLICY), **kwargs)


def test_500s_then_success(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(status=500, body="oops"), Fault(status=503, body="busy")])
    assert client.point("population of Kenya").value == 35610177
    assert fault_server.count(NL_PATH) == 3


def test_500s_forever_is_a_transient_error(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(status=500, body="oops")] * 5)
    with pytest.raises(TransientError, match=r"HTTP 500.*gave up after 3 attempts"):
        client.point("population of Kenya")
    assert fault_server.count(NL_PATH) == 3


def test_429_honours_retry_after(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(status=429, headers={"Retry-After": "1"}, body="{}")])
    start = time.monotonic()
    assert client.point("population of Kenya").value == 35610177
    assert time.monotonic() - start >= 1.0  # waited as told, not the (0.01 s) backoff
    assert fault_server.count(NL_PATH) == 2


def test_429_with_a_long_retry_after_is_not_slept_through(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(status=429, headers={"Retry-After": "3600"}, body="{}")])
    start = time.monotonic()
    with pytest.raises(RateLimitedError) as caught:
        client.point("population of Kenya")
    assert caught.value.retry_after == 3600 and time.monotonic() - start < 2
    assert fault_server.count(NL_PATH) == 1


def test_429_without_retry_after_backs_off_and_gives_up(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(status=429, body="{}")] * 3)
    with pytest.raises(RateLimitedError, match="gave up"):
        client.point("population of Kenya")


def test_timeout_then_success_and_timeout_forever(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(delay=1.0)])
    assert client.point("population of Kenya").value == 35610177
    fault_server.plan(NL_PATH, [Fault(delay=1.0)] * 3)
    start = time.monotonic()
    with pytest.raises(TransientError, match="timed out"):
        client.point("population of Kenya")
    assert time.monotonic() - start < 3  # 3 attempts x 0.3 s read timeout + tiny backoffs


def test_truncated_json(fault_server):
    client = nl_client(fault_server)
    cut = json.dumps(GOOD_NL)[:40]
    # the connection dies mid-body (Content-Length promises more): transient, retried
    fault_server.plan(NL_PATH, [Fault(body=cut, declared_length=len(json.dumps(GOOD_NL)))])
    assert client.point("population of Kenya").value == 35610177
    assert fault_server.count(NL_PATH) == 2
    # a complete response whose JSON is cut: not retried, a schema error naming the problem
    fault_server.plan(NL_PATH, [Fault(body=cut)])
    with pytest.raises(SchemaDriftError, match="not valid JSON"):
        client.point("population of Kenya")


def test_renamed_fields_are_schema_drift(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(body=json.dumps({"chart": GOOD_NL["charts"]}))])
    with pytest.raises(SchemaDriftError, match="charts"):
        client.point("population of Kenya")
    renamed_highlight = dict(GOOD_NL["charts"][0], highlight={"val": 1, "date": "2007"})
    fault_server.plan(NL_PATH, [Fault(body=json.dumps({"charts": [renamed_highlight]}))])
    with pytest.raises(SchemaDriftError, match=r"charts\.0\.highlight\.value"):
        client.point("population of Kenya")
    rest = RestClient(fault_server.url, policy=POLICY)
    fault_server.good["/observation"] = {"byVariables": {}}
    with pytest.raises(SchemaDriftError, match="byVariable"):
        rest.observation("Count_Person", ["country/KEN"])
    fault_server.good["/resolve"] = {"entities": [{"node": "x", "candidates": [{"dcid": "A", "metadata": {"score": "high"}}]}]}
    with pytest.raises(SchemaDriftError, match="score"):
        rest.resolve_indicators(["x"])
    fault_server.good["/node"] = {"data": {"country/KEN": {"arcs": {"name": {"nodes": "Kenya"}}}}}
    with pytest.raises(SchemaDriftError):
        rest.names(["country/KEN"])


def test_auth_and_client_errors_are_not_retried(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(status=403, body='{"message": "API key not valid"}')])
    with pytest.raises(AuthError, match="DC_API_KEY"):
        client.point("population of Kenya")
    fault_server.plan(NL_PATH, [Fault(status=400, body='{"message": "bad q"}')])
    with pytest.raises(DataSourceError, match="HTTP 400.*bad q"):
        client.point("population of Kenya")
    assert fault_server.count(NL_PATH) == 2


def test_connection_refused_is_transient():
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = NLClient(f"http://127.0.0.1:{port}", SENTINEL, policy=POLICY)
    with pytest.raises(TransientError, match="connection failed") as caught:
        client.point("population of Kenya")
    assert SENTINEL not in str(caught.value) and caught.value.__cause__ is None


def test_sentinel_key_is_sent_but_never_leaks(fault_server, caplog):
    caplog.set_level(logging.DEBUG)
    client = nl_client(fault_server, api_key=SENTINEL)
    rest = RestClient(fault_server.url, SENTINEL, policy=POLICY)
    assert client.point("population of Kenya").value == 35610177
    assert f"key={SENTINEL}" in fault_server.requests[-1].query  # it was really sent
    # errors whose server text echoes the request URL (with the key) are redacted
    fault_server.plan(NL_PATH, [Fault(status=500, echo_request=True)] * 3)
    with pytest.raises(TransientError) as transient:
        client.point("population of Kenya")
    assert "***" in str(transient.value)
    fault_server.plan(NL_PATH, [Fault(status=400, echo_request=True)])
    with pytest.raises(DataSourceError) as client_error:
        client.point("population of Kenya")
    fault_server.plan(NL_PATH, [Fault(body=f"not json {SENTINEL}")])
    with pytest.raises(SchemaDriftError) as drift:
        client.point("population of Kenya")
    fault_server.good["/observation"] = {"byVariable": {}}
    rest.observation("Count_Person", ["country/KEN"])
    assert fault_server.requests[-1].headers.get("X-API-Key") == SENTINEL
    fault_server.plan(NL_PATH, [Fault(status=500, echo_request=True)] * 3)
    lookups = lookup_many(client, ["population of Kenya"], "point")
    texts = [str(transient.value), str(client_error.value), str(drift.value), repr(client), repr(rest),
             repr(client.http), repr(rest.api), lookups[0].error, caplog.text,
             *(str(e.__context__) for e in (transient.value, client_error.value) if e.__context__)]
    for text in texts:
        assert SENTINEL not in text


def test_redact_handles_url_encoding():
    assert redact("key=a%2Bb%2Fc and a+b/c", ["a+b/c"]) == "key=*** and ***"
    assert redact("nothing", [None, ""]) == "nothing"


def test_response_cache_saves_requests_and_expires(fault_server, tmp_path):
    client = nl_client(fault_server, api_key=SENTINEL, cache_dir=tmp_path / "cache", cache_ttl=1.5)
    assert client.point("population of Kenya").value == 35610177
    assert client.point("population of Kenya").value == 35610177
    assert fault_server.count(NL_PATH) == 1  # the second answer came from disk
    for path in (tmp_path / "cache").iterdir():
        assert SENTINEL not in path.name and SENTINEL not in path.read_text()
    time.sleep(1.6)
    client.point("population of Kenya")
    assert fault_server.count(NL_PATH) == 2  # expired: fetched again
    client.point("population of Nigeria")
    assert fault_server.count(NL_PATH) == 3  # another question is another entry
    ResponseCache(tmp_path / "cache").clear()
    assert not list((tmp_path / "cache").glob("*.json"))


def test_failures_are_not_cached(fault_server, tmp_path):
    client = nl_client(fault_server, cache_dir=tmp_path / "cache")
    fault_server.plan(NL_PATH, [Fault(status=500)] * 3)
    with pytest.raises(TransientError):
        client.point("population of Kenya")
    fault_server.plan(NL_PATH, [Fault(body=json.dumps({"chart": []}))])  # drifted: an error, not cached
    with pytest.raises(SchemaDriftError):
        client.point("population of Kenya")
    assert client.point("population of Kenya").value == 35610177
    assert not list((tmp_path / "cache").glob("*.tmp"))


def test_bounded_concurrency_over_http_in_input_order(fault_server):
    fault_server.good["/echo"] = {"ok": True}
    fault_server.plan("/echo", [Fault(delay=0.1)] * 8)
    http = HttpClient(fault_server.url, policy=POLICY)
    outcomes = map_bounded(lambda i: (i, http.get_json("/echo", {"i": i})), list(range(8)), max_workers=3)
    assert [o.value[0] for o in outcomes] == list(range(8))
    assert all(o.error is None for o in outcomes)
    assert 2 <= fault_server.max_in_flight <= 3
    with pytest.raises(ValueError):
        map_bounded(str, [1], max_workers=0)


def test_mixed_batch_finishes_good_items_and_reports_bad_ones(fault_server):
    client = nl_client(fault_server)
    fault_server.plan(NL_PATH, [Fault(status=404, body="gone")])  # the first request fails for good
    lookups = lookup_many(client, ["q1", "q2", "q3"], "point", max_workers=1)
    assert [lk.ok for lk in lookups] == [False, True, True]
    assert "DataSourceError" in lookups[0].error and "HTTP 404" in lookups[0].error
