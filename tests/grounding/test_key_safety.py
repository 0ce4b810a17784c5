"""API keys stay out of every text and every other host: error bodies are redacted before they are cut to a
length, redirects to another origin lose the key (header or query), and a key too short to be redacted
safely is refused. Real servers on 127.0.0.1 (the fault server of conftest, two of them for redirects)."""

from __future__ import annotations

import json
import logging

import pytest
from conftest import Fault, FaultServer

from grounding.http import MIN_API_KEY_CHARS, RetryPolicy, redact
from grounding.llm import GeminiREST, LLMError
from grounding.nl_client import NLClient
from grounding.rest_client import RestClient
from grounding.types import AuthError, DataSourceError, GroundingError, SchemaDriftError, TransientError

pytestmark = pytest.mark.timeout(60)

POLICY = RetryPolicy(attempts=2, connect_timeout=1.0, read_timeout=1.0, backoff_base=0.01, backoff_max=0.02)
KEY = "KEY-0123456789-abcdefghijklmnopqrstuvw"  # 39 characters, like a real key
NL_PATH = "/nodejs/query"
GOOD_NL = {"charts": [{"type": "LINE", "title": "Population in Kenya", "vars": ["Count_Person"],
                       "places": ["country/KEN"], "srcs": [{"name": "Gapminder"}],
                       "highlight": {"value": 35610177, "date": "2007"}, "dataCsv": "date,x\r\n2007,35610177"}]}


def key_pieces(text: str, shortest: int = 5) -> list[str]:
    """Every run of ``shortest`` or more characters of the key found in ``text``."""
    return [KEY[i:i + shortest] for i in range(len(KEY) - shortest + 1) if KEY[i:i + shortest] in text]


@pytest.fixture
def other_server():
    server = FaultServer()
    yield server
    server.stop()


# (status, the client's cut, error type): the key is placed across the cut in the server's error body.
CUTS = [(500, 200, TransientError), (403, 200, AuthError), (400, 300, DataSourceError), (200, 120, SchemaDriftError)]


@pytest.mark.parametrize("status,cut,error", CUTS)
def test_a_key_across_the_cut_of_an_error_body_is_redacted(fault_server, caplog, status, cut, error):
    caplog.set_level(logging.DEBUG)
    fault_server.good[NL_PATH] = GOOD_NL
    client = NLClient(fault_server.url, KEY, policy=POLICY)
    # json.dumps of the text adds no escapes to it; the SchemaDriftError quotes the text with repr (2 more).
    body = "x" * (cut - 12 - (2 if status == 200 else 0)) + KEY + " and more"
    fault_server.plan(NL_PATH, [Fault(status=status, body=body)] * POLICY.attempts)
    with pytest.raises(error) as caught:
        client.point("population of Kenya")
    assert "***" in str(caught.value) or status == 200
    for text in (str(caught.value), caplog.text):
        assert not key_pieces(text), key_pieces(text)


def test_gemini_error_texts_are_redacted_before_the_cut(fault_server, caplog):
    caplog.set_level(logging.DEBUG)
    llm = GeminiREST("m", api_key=KEY, base_url=f"{fault_server.url}/v1beta", retries=0)
    path = "/v1beta/models/m:generateContent"
    message = "y" * 290 + KEY
    fault_server.plan(path, [Fault(status=400, body=json.dumps({"error": {"message": message}}))])
    with pytest.raises(LLMError) as as_json:
        llm.generate("hi")
    fault_server.plan(path, [Fault(status=200, body="z" * 190 + KEY)])
    with pytest.raises(LLMError) as not_json:
        llm.generate("hi")
    for text in (str(as_json.value), str(not_json.value), caplog.text):
        assert not key_pieces(text), key_pieces(text)
    assert fault_server.requests[-1].headers.get("x-goog-api-key") == KEY  # it was sent


def redirect_to(server, target_url: str, status: int = 302) -> Fault:
    return Fault(status=status, body="", headers={"Location": target_url})


@pytest.mark.parametrize("status", [301, 302, 307, 308])
def test_cross_origin_redirects_drop_the_key(fault_server, other_server, status):
    fault_server.good[NL_PATH] = other_server.good[NL_PATH] = GOOD_NL
    other_server.good["/v2/observation"] = {"byVariable": {}}

    # NL client: the key is a query parameter; the redirect target (another port = another origin) keeps the
    # rest of the query but must not get the key, even when the Location repeats it.
    nl = NLClient(fault_server.url, KEY, policy=POLICY)
    fault_server.plan(NL_PATH, [redirect_to(fault_server, f"{other_server.url}{NL_PATH}?q=x&key={KEY}&mode=m", status)])
    assert nl.point("population of Kenya").value == 35610177
    (arrived,) = other_server.requests
    assert KEY not in arrived.query and "q=x" in arrived.query and KEY not in json.dumps(arrived.headers)

    # REST client: the key is the X-API-Key header.
    rest = RestClient(f"{fault_server.url}/v2", KEY, policy=POLICY)
    fault_server.plan("/v2/observation", [redirect_to(fault_server, f"{other_server.url}/v2/observation", status)])
    rest.observation("Count_Person", ["country/KEN"])
    arrived = other_server.requests[-1]
    assert arrived.path == "/v2/observation" and "x-api-key" not in {h.lower() for h in arrived.headers}
    assert (arrived.method == "POST") == (status in (307, 308))  # 301/302 turn a POST into a GET

    # Gemini: the key is the x-goog-api-key header.
    llm = GeminiREST("m", api_key=KEY, base_url=f"{fault_server.url}/v1beta", retries=0)
    path = "/v1beta/models/m:generateContent"
    other_server.good[path] = {"candidates": [{"content": {"parts": [{"text": "hello"}]}}]}
    fault_server.plan(path, [redirect_to(fault_server, f"{other_server.url}{path}", status)])
    if status in (307, 308):
        assert llm.generate("hi") == "hello"
    else:
        llm.generate("hi")  # the emulator answers the GET alike
    assert "x-goog-api-key" not in {h.lower() for h in other_server.requests[-1].headers}


def test_same_origin_redirects_keep_the_key(fault_server):
    fault_server.good["/v2/observation"] = {"byVariable": {}}
    rest = RestClient(f"{fault_server.url}/v1", KEY, policy=POLICY)
    fault_server.plan("/v1/observation", [redirect_to(fault_server, f"{fault_server.url}/v2/observation", 308)])
    rest.observation("Count_Person", ["country/KEN"])
    assert fault_server.requests[-1].path == "/v2/observation"
    assert fault_server.requests[-1].headers.get("X-API-Key") == KEY


def test_redirect_loops_end(fault_server):
    rest = RestClient(f"{fault_server.url}/v2", KEY, policy=POLICY)
    fault_server.plan("/v2/observation", [redirect_to(fault_server, f"{fault_server.url}/v2/observation", 307)] * 10)
    with pytest.raises(DataSourceError, match="redirects"):
        rest.observation("Count_Person", ["country/KEN"])


@pytest.mark.parametrize("short", ["a", "k3y", "x" * (MIN_API_KEY_CHARS - 1)])
def test_a_key_too_short_to_redact_safely_is_refused(short, monkeypatch):
    with pytest.raises(AuthError, match=f"{len(short)} characters"):
        NLClient("http://127.0.0.1:9", short)
    with pytest.raises(AuthError, match="DC_API_KEY"):
        RestClient("http://127.0.0.1:9/v2", short)
    monkeypatch.setenv("DC_API_KEY", short)
    with pytest.raises(AuthError, match="DC_API_KEY"):
        NLClient("http://127.0.0.1:9")
    with pytest.raises(AuthError, match="GEMINI_API_KEY"):
        GeminiREST("m", api_key=short)
    # The shortest accepted key is redacted whole, and text merely sharing its characters is kept.
    key = "q" * MIN_API_KEY_CHARS
    NLClient("http://127.0.0.1:9", key)
    assert redact(f"a q qq key={key} {key}q", [key]) == "a q qq key=*** ***q"


def test_errors_are_grounding_errors():
    assert issubclass(AuthError, GroundingError) and issubclass(DataSourceError, GroundingError)
