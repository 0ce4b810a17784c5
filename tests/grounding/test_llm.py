"""LLM backends: Gemini REST against a real local server, LangChain chat models, the native Gemma backend."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grounding.llm import GeminiREST, LangChainLLM, LLMError
from grounding.types import LLM, AuthError

SENTINEL_KEY = "SENTINEL-KEY-7f3a9c-do-not-leak"


class GeminiEmulator(BaseHTTPRequestHandler):
    """generateContent / streamGenerateContent?alt=sse as documented; faults queued in ``server.faults``."""

    def log_message(self, *args):  # keep test output clean
        pass

    def do_POST(self):
        server = self.server
        length = int(self.headers.get("Content-Length", 0))
        body = json.loads(self.rfile.read(length))
        server.requests.append((self.path, dict(self.headers), body))
        if self.headers.get("x-goog-api-key") != SENTINEL_KEY:
            return self._json(403, {"error": {"code": 403, "message": "API key not valid.", "status": "PERMISSION_DENIED"}})
        if server.faults:
            status, headers = server.faults.pop(0)
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"{}")
            return
        prompt = body["contents"][0]["parts"][0]["text"]
        answer = f"echo: {prompt}"
        if self.path.startswith("/v1beta/models/test-model:generateContent"):
            return self._json(200, {"candidates": [{"content": {"role": "model", "parts": [{"text": answer}]}}]})
        if self.path == "/v1beta/models/test-model:streamGenerateContent?alt=sse":
            self.send_response(200)
            self.send_header("Content-Type", "text/event-stream")
            self.end_headers()
            for i in range(0, len(answer), 4):
                chunk = {"candidates": [{"content": {"role": "model", "parts": [{"text": answer[i:i + 4]}]}}]}
                self.wfile.write(f"data: {json.dumps(chunk)}\r\n\r\n".encode())
                self.wfile.flush()
            return
        return self._json(404, {"error": {"code": 404, "message": f"models/{self.path} is not found"}})

    def _json(self, status, data):
        payload = json.dumps(data).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


@pytest.fixture
def gemini_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), GeminiEmulator)
    server.requests, server.faults = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def make_gemini(server, key=SENTINEL_KEY, **kw):
    return GeminiREST("test-model", api_key=key, base_url=f"http://127.0.0.1:{server.server_port}/v1beta",
                      backoff=0.01, timeout=5, **kw)


def test_generate_content(gemini_server):
    llm = make_gemini(gemini_server, system_instruction="be brief")
    assert isinstance(llm, LLM)
    assert llm.generate("How many people live in Kenya?", max_new_tokens=7, temperature=0.5, stop=["\n"]) \
        == "echo: How many people live in Kenya?"
    path, headers, body = gemini_server.requests[-1]
    assert headers["x-goog-api-key"] == SENTINEL_KEY and "key=" not in path
    assert body["generationConfig"] == {"temperature": 0.5, "maxOutputTokens": 7, "stopSequences": ["\n"]}
    assert body["systemInstruction"] == {"parts": [{"text": "be brief"}]}
    assert body["contents"] == [{"role": "user", "parts": [{"text": "How many people live in Kenya?"}]}]


def test_stream_sse(gemini_server):
    pieces = list(make_gemini(gemini_server).stream("abcdefghij"))
    assert "".join(pieces) == "echo: abcdefghij" and len(pieces) == 4


def test_retries_429_with_retry_after_and_500(gemini_server):
    gemini_server.faults += [(429, {"Retry-After": "0.2"}), (500, {})]
    start = time.monotonic()
    assert make_gemini(gemini_server).generate("x") == "echo: x"
    assert time.monotonic() - start >= 0.2  # honoured Retry-After
    assert len(gemini_server.requests) == 3


def test_persistent_failure_is_a_typed_error(gemini_server):
    gemini_server.faults += [(503, {})] * 3
    with pytest.raises(LLMError, match="HTTP 503"):
        make_gemini(gemini_server, retries=2).generate("x")


def test_unknown_model_names_the_problem(gemini_server):
    llm = GeminiREST("retired-model", api_key=SENTINEL_KEY, base_url=f"http://127.0.0.1:{gemini_server.server_port}/v1beta")
    with pytest.raises(LLMError, match="retired-model.*HTTP 404"):
        llm.generate("x")


def test_sentinel_key_never_in_logs_errors_or_reprs(gemini_server, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    gemini_server.faults += [(429, {"Retry-After": "0"})]
    llm = make_gemini(gemini_server)
    llm.generate("x")
    texts = [repr(llm), str(llm)]
    bad_key = make_gemini(gemini_server, key=SENTINEL_KEY + "-wrong")
    with pytest.raises(AuthError) as refused:
        bad_key.generate("x")
    texts += [str(refused.value), repr(refused.value), repr(bad_key)]
    dead = GeminiREST("test-model", api_key=SENTINEL_KEY, base_url="http://127.0.0.1:9/v1beta", retries=1, backoff=0.01)
    with pytest.raises(LLMError) as unreachable:
        dead.generate("x")
    texts += [str(unreachable.value), repr(unreachable.value), str(unreachable.value.__cause__)]
    texts += [r.getMessage() for r in caplog.records]
    assert any("retrying" in t for t in texts)  # the logs were captured
    assert not any("SENTINEL" in t for t in texts)
    monkeypatch.delenv("GEMINI_API_KEY", raising=False)
    monkeypatch.delenv("GOOGLE_API_KEY", raising=False)
    with pytest.raises(AuthError, match="GEMINI_API_KEY"):
        GeminiREST("test-model").generate("x")


# -- LangChain ---------------------------------------------------------------------------------
def test_langchain_chat_model():
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    chat = GenericFakeChatModel(messages=iter([AIMessage("Kenya had 54.11 years [Table 1]."),
                                               AIMessage("streamed answer")]))
    llm = LangChainLLM(chat)
    assert isinstance(llm, LLM)
    assert llm.generate("question") == "Kenya had 54.11 years [Table 1]."
    pieces = list(llm.stream("question"))
    assert "".join(pieces) == "streamed answer" and len(pieces) > 1
