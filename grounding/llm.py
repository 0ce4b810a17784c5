"""Text generators behind :class:`grounding.types.LLM` (``generate`` and ``stream``).

- :class:`NativeGemma`: any checkpoint :func:`models.load_model` accepts, run by this project's models;
  instruction-tuned checkpoints get the Gemma chat template (``chat=True``).
- :class:`GeminiREST`: the Gemini API (``generateContent`` and SSE ``streamGenerateContent``), the
  answering model of the paper's RAG; the key travels in the ``x-goog-api-key`` header only and never
  appears in logs, errors or reprs.
- :class:`LangChainLLM`: any LangChain chat model.
"""

from __future__ import annotations

import json
import logging
import os
import random
import time
from collections.abc import Iterator, Sequence

import requests

from .http import checked_api_key, excerpt, send
from .types import AuthError, GroundingError

__all__ = ["LLMError", "NativeGemma", "GeminiREST", "LangChainLLM", "load_llm"]

log = logging.getLogger(__name__)


class LLMError(GroundingError):
    """A text generator failed (HTTP error, malformed response, blocked prompt ...)."""


# -- native Gemma ------------------------------------------------------------------------------
class NativeGemma:
    """A Gemma model of this project with its tokenizer.

    ``chat=True`` wraps prompts in the chat template (instruction-tuned checkpoints); the DataGemma
    RIG model is prompted with raw text (``chat=False``).
    """

    def __init__(self, model, tokenizer, *, chat: bool = False, name: str = "gemma"):
        self.model, self.tokenizer, self.chat, self.name = model, tokenizer, chat, name

    @classmethod
    def load(cls, source: str, *, tokenizer: str | None = None, chat: bool | None = None, dtype=None,
             device: str = "cpu") -> NativeGemma:
        """Load ``source`` (checkpoint directory, .gguf file or preset name) and its tokenizer.

        ``chat=None`` turns the chat template on for instruction-tuned names (``-it``).
        """
        from models import load_model, load_tokenizer

        if tokenizer is None and not os.path.exists(os.path.expanduser(str(source))):
            raise ValueError(f"{source!r} is not a file or directory (a preset name?): presets carry no "
                             "tokenizer, pass one (tokenizer=..., CLI --tokenizer: tokenizer.json or .gguf)")
        model = load_model(source, dtype=dtype, device=device)
        tok = load_tokenizer(tokenizer or source)
        if chat is None:
            chat = "-it" in os.path.basename(str(source)).lower()
        return cls(model, tok, chat=chat, name=os.path.basename(str(source).rstrip("/")))

    def __repr__(self) -> str:
        return f"NativeGemma(name={self.name!r}, chat={self.chat})"

    def _generate(self, prompt: str, *, chat: bool, stream: bool, max_new_tokens: int, temperature: float,
                  stop: Sequence[str] | None):
        from models import generate

        return generate(self.model, self.tokenizer, prompt, chat=chat, max_new_tokens=max_new_tokens,
                        temperature=temperature, stop=list(stop or []), stream=stream)

    def generate(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
                 stop: Sequence[str] | None = None) -> str:
        return self._generate(prompt, chat=self.chat, stream=False, max_new_tokens=max_new_tokens,
                              temperature=temperature, stop=stop)

    def stream(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
               stop: Sequence[str] | None = None) -> Iterator[str]:
        return self._generate(prompt, chat=self.chat, stream=True, max_new_tokens=max_new_tokens,
                              temperature=temperature, stop=stop)

    def continue_from(self, prompt: str, continuation: str, *, max_new_tokens: int = 512,
                      temperature: float = 0.0, stop: Sequence[str] | None = None) -> str:
        """Generate what follows ``continuation``, an answer to ``prompt`` the model has begun.

        Used by the interleaved RIG mode: the answer so far (with inserted values) is the beginning of
        the model's turn, so the chat template wraps only the prompt.
        """
        text = prompt
        if self.chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
        return self._generate(text + continuation, chat=False, stream=False, max_new_tokens=max_new_tokens,
                              temperature=temperature, stop=stop)


# -- Gemini over REST --------------------------------------------------------------------------
class GeminiREST:
    """The Gemini API over plain HTTPS.

    ``api_key`` defaults to ``GEMINI_API_KEY`` (or ``GOOGLE_API_KEY``). Model ids change as models are
    retired, so ``model`` is a setting. Connection errors, 429 (honouring Retry-After) and 5xx are
    retried with exponential backoff and jitter.
    """

    DEFAULT_BASE_URL = "https://generativelanguage.googleapis.com/v1beta"

    def __init__(self, model: str = "gemini-2.5-flash", *, api_key: str | None = None, base_url: str | None = None,
                 system_instruction: str | None = None, timeout: float = 120.0, retries: int = 3,
                 backoff: float = 1.0):
        self.model = model
        self.base_url = (base_url or os.environ.get("GEMINI_BASE_URL") or self.DEFAULT_BASE_URL).rstrip("/")
        self.__key = checked_api_key(api_key or os.environ.get("GEMINI_API_KEY") or os.environ.get("GOOGLE_API_KEY"),
                                     "GEMINI_API_KEY")
        self.system_instruction = system_instruction
        self.timeout, self.retries, self.backoff = timeout, retries, backoff
        self._session = requests.Session()

    def __repr__(self) -> str:
        key = "set" if self.__key else "missing"
        return f"GeminiREST(model={self.model!r}, base_url={self.base_url!r}, api_key=<{key}>)"

    def _excerpt(self, text: str, limit: int) -> str:
        return excerpt(text, [self.__key], limit)

    def _body(self, prompt: str, max_new_tokens: int, temperature: float, stop: Sequence[str] | None) -> dict:
        config: dict = {"temperature": temperature, "maxOutputTokens": max_new_tokens}
        if stop:
            config["stopSequences"] = list(stop)[:5]  # the API accepts at most 5
        body: dict = {"contents": [{"role": "user", "parts": [{"text": prompt}]}], "generationConfig": config}
        if self.system_instruction:
            body["systemInstruction"] = {"parts": [{"text": self.system_instruction}]}
        return body

    def _post(self, method: str, body: dict, *, stream: bool) -> requests.Response:
        if not self.__key:
            raise AuthError("no Gemini API key: pass api_key= or set GEMINI_API_KEY")
        url = f"{self.base_url}/models/{self.model}:{method}"
        params = {"alt": "sse"} if stream else None
        headers = {"x-goog-api-key": self.__key, "Content-Type": "application/json"}
        for attempt in range(self.retries + 1):
            wait = self.backoff * 2 ** attempt * (0.5 + random.random() / 2)
            try:
                # Redirects to another origin are followed without the key header.
                response = send(self._session, "POST", url, params=params, headers=headers, json=body,
                                timeout=self.timeout, stream=stream, secret_headers=["x-goog-api-key"])
            except requests.RequestException as e:
                # The message of a requests error can quote the request; keep only its type.
                problem = f"{type(e).__name__} talking to {self.base_url}"
                if attempt == self.retries:
                    raise LLMError(f"Gemini {method}: {problem} (after {attempt + 1} attempts)") from None
                log.warning("Gemini %s: %s; retrying in %.1fs", method, problem, wait)
                time.sleep(wait)
                continue
            if response.status_code == 429 or response.status_code >= 500:
                retry_after = response.headers.get("Retry-After")
                if retry_after and retry_after.replace(".", "", 1).isdigit():
                    wait = float(retry_after)
                if attempt < self.retries:
                    log.warning("Gemini %s: HTTP %d; retrying in %.1fs", method, response.status_code, wait)
                    response.close()
                    time.sleep(wait)
                    continue
            if response.status_code in (401, 403):
                raise AuthError(f"Gemini {method}: HTTP {response.status_code}: the API key was refused "
                                f"(check that it is valid and has the Generative Language API enabled)")
            if response.status_code != 200:
                raise LLMError(f"Gemini {method} with model {self.model!r}: HTTP {response.status_code}: "
                               f"{self._excerpt(_error_message(response), 300)}")
            return response
        raise AssertionError("unreachable")

    def generate(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
                 stop: Sequence[str] | None = None) -> str:
        response = self._post("generateContent", self._body(prompt, max_new_tokens, temperature, stop), stream=False)
        try:
            data = response.json()
        except ValueError:
            raise LLMError(f"Gemini generateContent: response is not JSON: {self._excerpt(response.text, 200)!r}") \
                from None
        return _candidate_text(data)

    def stream(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
               stop: Sequence[str] | None = None) -> Iterator[str]:
        body = self._body(prompt, max_new_tokens, temperature, stop)
        response = self._post("streamGenerateContent", body, stream=True)
        with response:
            for line in response.iter_lines(decode_unicode=True):
                if not line or not line.startswith("data:"):
                    continue  # blank separators, comments, event names
                payload = line[len("data:"):].strip()
                try:
                    data = json.loads(payload)
                except ValueError:
                    raise LLMError(f"Gemini streamGenerateContent: bad SSE data line: "
                                   f"{self._excerpt(payload, 200)!r}") from None
                piece = _candidate_text(data, allow_empty=True)
                if piece:
                    yield piece


def _error_message(response: requests.Response) -> str:
    """The API's error message (whole: the caller redacts, then cuts)."""
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text


def _candidate_text(data: dict, allow_empty: bool = False) -> str:
    """Text of ``candidates[0].content.parts[*].text``; a blocked prompt or a missing field is an error."""
    if not isinstance(data, dict):
        raise LLMError(f"Gemini: expected a JSON object, got {type(data).__name__}")
    candidates = data.get("candidates")
    if not candidates:
        feedback = data.get("promptFeedback", {})
        if feedback.get("blockReason"):
            raise LLMError(f"Gemini blocked the prompt: {feedback['blockReason']}")
        if allow_empty:
            return ""
        raise LLMError(f"Gemini: response has no candidates (keys: {sorted(data)})")
    parts = (candidates[0].get("content") or {}).get("parts") or []
    return "".join(p.get("text", "") for p in parts if isinstance(p, dict))


# -- LangChain ---------------------------------------------------------------------------------
class LangChainLLM:
    """Any LangChain chat model (``BaseChatModel``) as an :class:`~grounding.types.LLM`.

    Sampling settings are the chat model's own (set when it is built); ``max_new_tokens`` and
    ``temperature`` are passed on only where the model declares such fields.
    """

    def __init__(self, chat_model):
        self.chat_model = chat_model

    def __repr__(self) -> str:
        return f"LangChainLLM({type(self.chat_model).__name__})"

    def _bound(self, max_new_tokens: int, temperature: float):
        fields = getattr(type(self.chat_model), "model_fields", {})
        settings = {}
        for name in ("max_tokens", "max_output_tokens", "max_new_tokens"):
            if name in fields:
                settings[name] = max_new_tokens
                break
        if "temperature" in fields:
            settings["temperature"] = temperature
        return self.chat_model.model_copy(update=settings) if settings else self.chat_model

    def generate(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
                 stop: Sequence[str] | None = None) -> str:
        from langchain_core.messages import HumanMessage

        message = self._bound(max_new_tokens, temperature).invoke([HumanMessage(prompt)], stop=list(stop) if stop else None)
        return _message_text(message.content)

    def stream(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
               stop: Sequence[str] | None = None) -> Iterator[str]:
        from langchain_core.messages import HumanMessage

        model = self._bound(max_new_tokens, temperature)
        for chunk in model.stream([HumanMessage(prompt)], stop=list(stop) if stop else None):
            text = _message_text(chunk.content)
            if text:
                yield text


def _message_text(content) -> str:
    if isinstance(content, str):
        return content
    return "".join(part if isinstance(part, str) else str(part.get("text", "")) for part in content)


def load_llm(spec: str, *, tokenizer: str | None = None, device: str = "cpu", dtype=None):
    """An LLM from a CLI-style spec: ``gemini:<model id>`` or a native model source (directory, .gguf, preset)."""
    if spec.startswith("gemini:"):
        return GeminiREST(model=spec.removeprefix("gemini:"))
    return NativeGemma.load(spec, tokenizer=tokenizer, device=device, dtype=dtype)
