"""LLM backends: Gemini REST against a real local server, LangChain chat models, the native Gemma backend."""

from __future__ import annotations

import json
import logging
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from grounding.llm import GeminiREST, LangChainLLM, LLMError, NativeGemma
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


# -- native Gemma ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    """A tiny random Gemma 3 (no preset) and a small byte-fallback BPE Gemma tokenizer saved as tokenizer.json."""
    import torch

    from models.config import GemmaConfig
    from models.gemma import GemmaLM
    from models.loading import init_random_weights
    from models.tokenizer import CONTROL, NORMAL, UNKNOWN, load_tokenizer, tokenizer_from_vocabulary

    # No byte pieces: a random model then writes readable characters instead of byte-fallback debris.
    specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
                ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL)]
    normal = list("\u2581abcdefghijklmnopqrstuvwxyz0123456789.,?\"[]()-_>\n") + ["\u2581t", "he", "\u2581the", "__", "DC"]
    pieces = [p for p, _ in specials] + normal
    types = [t for _, t in specials] + [NORMAL] * len(normal)
    directory = tmp_path_factory.mktemp("tiny_tokenizer")
    tokenizer_from_vocabulary(pieces, types, bos_id=2).save(str(directory / "tokenizer.json"))
    tokenizer = load_tokenizer(directory)
    config = GemmaConfig(architecture="gemma3", vocab_size=len(pieces), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
                         max_position_embeddings=256, query_pre_attn_scalar=32, sliding_window=8)
    model = init_random_weights(GemmaLM(config), seed=2, std=0.02).eval()
    torch.manual_seed(0)
    return model, tokenizer


def greedy_reference(model, tokenizer, text, max_new_tokens):
    """Greedy decoding by the definition: full forward of the whole sequence, argmax, no cache."""
    import torch

    ids = tokenizer.encode(text, add_bos=not text.startswith("<bos>"))
    out = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            token = int(model(torch.tensor([ids + out]))[0, -1].argmax())
            if token in tokenizer.stop_token_ids:
                break
            out.append(token)
    return tokenizer.decode(out)


def test_native_gemma_generate_stream_and_chat_template(tiny_gemma):
    model, tokenizer = tiny_gemma
    prompt = "what is the life expectancy in kenya?"
    raw = NativeGemma(model, tokenizer, chat=False)
    chat = NativeGemma(model, tokenizer, chat=True)
    assert isinstance(raw, LLM)
    expected_raw = greedy_reference(model, tokenizer, prompt, 12)
    templated = tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
    expected_chat = greedy_reference(model, tokenizer, templated, 12)
    assert len(set(expected_raw)) > 2 and expected_raw != expected_chat  # varied text; the template matters
    assert raw.generate(prompt, max_new_tokens=12) == expected_raw
    assert chat.generate(prompt, max_new_tokens=12) == expected_chat
    assert "".join(chat.stream(prompt, max_new_tokens=12)) == expected_chat
    # Interleaved RIG continues the model's own turn: the template wraps only the question.
    begun = 'the [__DC__("life expectancy in kenya") --> "54"] and'
    assert chat.continue_from(prompt, begun, max_new_tokens=6) == greedy_reference(model, tokenizer, templated + begun, 6)
    # A stop string cuts the text before it.
    stop = expected_raw[3:5]
    assert raw.generate(prompt, max_new_tokens=12, stop=[stop]) == expected_raw[:expected_raw.find(stop)]
