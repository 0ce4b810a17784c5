"""Resilient HTTP for every remote statistics call: timeouts, retries, concurrency, caching, redaction.

- Every request has a (connect, read) timeout.
- Connection errors, timeouts, truncated bodies, HTTP 429 and 5xx are retried with exponential backoff
  and full jitter; a 429's ``Retry-After`` (seconds or an HTTP date) is honoured up to
  ``RetryPolicy.max_retry_after`` (a longer wait is not slept through: :class:`RateLimitedError`).
- 401/403 raise :class:`AuthError`; other 4xx raise :class:`DataSourceError` with the server's message.
- A body that is not JSON, or JSON without the documented fields, raises :class:`SchemaDriftError`
  naming the field (see :func:`validate`).
- Responses can be cached on disk (:class:`ResponseCache`) with an expiry, to save quota.
- :func:`map_bounded` runs calls with at most N in flight and returns outcomes in input order.
- API keys never reach logs, exception messages or reprs: the key is added to the request at send
  time only, and all text leaving this module passes through :func:`redact` (whole, before it is cut
  to a length: :func:`excerpt`). Keys shorter than :data:`MIN_API_KEY_CHARS` are refused (they could not
  be redacted without mangling ordinary text). A redirect to another origin (scheme, host, port) is
  followed without the key, in header or query (:func:`send`).
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import parse_qsl, urlencode, urljoin, urlsplit, urlunsplit

import requests
from pydantic import BaseModel, ValidationError

from .types import AuthError, DataSourceError, RateLimitedError, SchemaDriftError, TransientError

__all__ = [
    "DEFAULT_NL_URL", "DEFAULT_REST_URL", "API_KEY_ENV", "RetryPolicy", "ResponseCache", "HttpClient",
    "map_bounded", "Outcome", "validate", "redact", "excerpt", "api_key_from_env", "checked_api_key", "send",
    "MIN_API_KEY_CHARS",
]

# The public Data Commons endpoints, in one place.
DEFAULT_NL_URL = "https://nl.datacommons.org"  # natural-language endpoint: {url}/nodejs/query
DEFAULT_REST_URL = "https://api.datacommons.org/v2"  # REST v2: {url}/observation, /resolve, /node
API_KEY_ENV = "DC_API_KEY"
# Real keys are long (Data Commons and Gemini keys have 39 characters); a shorter "key" would be
# redacted out of every text it happens to occur in ("a" from every word).
MIN_API_KEY_CHARS = 8
MAX_REDIRECTS = 5

log = logging.getLogger("grounding.http")
T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)


def checked_api_key(api_key: str | None, setting: str = API_KEY_ENV) -> str | None:
    """``api_key`` (None or "" -> None), refused with :class:`AuthError` when it is too short to be a key."""
    if not api_key:
        return None
    if len(api_key) < MIN_API_KEY_CHARS:
        raise AuthError(f"the API key ({setting} or api_key=) has {len(api_key)} characters; a real key has at "
                        f"least {MIN_API_KEY_CHARS} (Data Commons and Gemini keys have 39): check the setting")
    return api_key


def api_key_from_env(api_key: str | None = None) -> str | None:
    """The explicit key, else ``$DC_API_KEY``, else None (checked by the client that uses it)."""
    return api_key or os.environ.get(API_KEY_ENV) or None


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` with every secret (and its URL-encoded form) replaced by ``***``."""
    for secret in secrets:
        if secret:
            for form in sorted({secret, urlencode({"k": secret})[2:]}, key=len, reverse=True):
                text = text.replace(form, "***")
    return text


def excerpt(text: str, secrets: Iterable[str | None], limit: int) -> str:
    """At most ``limit`` characters of ``text``, redacted first: a key cut in two by the limit would
    escape the redaction of the cut text."""
    return redact(text, secrets)[:limit]


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    return scheme, (parts.hostname or "").lower(), parts.port or {"http": 80, "https": 443}.get(scheme)


def _without_params(url: str, names: Iterable[str]) -> str:
    drop = {n.lower() for n in names}
    parts = urlsplit(url)
    query = [(k, v) for k, v in parse_qsl(parts.query, keep_blank_values=True) if k.lower() not in drop]
    return urlunsplit(parts._replace(query=urlencode(query)))


def send(session: requests.Session, method: str, url: str, *, secret_headers: Iterable[str] = (),
         secret_params: Iterable[str] = (), max_redirects: int = MAX_REDIRECTS, **kwargs) -> requests.Response:
    """``session.request`` following redirects itself: to the same origin as the request, as requests
    would; to another origin, without the ``secret_headers`` and ``secret_params`` (the API key)."""
    secret_headers, secret_params = tuple(secret_headers), tuple(secret_params)
    response = session.request(method, url, allow_redirects=False, **kwargs)
    for _ in range(max_redirects):
        if not response.is_redirect:
            return response
        location = urljoin(response.url, response.headers["Location"])
        response.close()
        if _origin(location) != _origin(response.url):
            headers = {k: v for k, v in (kwargs.get("headers") or {}).items()
                       if k.lower() not in {h.lower() for h in secret_headers}}
            kwargs = {**kwargs, "headers": headers}
            location = _without_params(location, secret_params)
            secret_headers, secret_params = (), ()  # gone: nothing more to strip on later hops
        kwargs.pop("params", None)  # the query is in the Location now
        if response.status_code in (301, 302, 303) and method.upper() != "HEAD":
            method = "GET"  # as browsers and requests do; 307/308 repeat the method and body
            kwargs.pop("json", None)
            kwargs.pop("data", None)
        response = session.request(method, location, allow_redirects=False, **kwargs)
    if response.is_redirect:
        response.close()
        raise DataSourceError(f"{method} {url}: more than {max_redirects} redirects")
    return response


class _RedactingFilter(logging.Filter):
    """Removes known API keys from records of loggers we do not control.

    urllib3 logs every request line at DEBUG, query string included, and the NL endpoint takes its key
    as the ``key=`` query parameter.
    """

    def __init__(self):
        super().__init__()
        self.secrets: set[str] = set()

    def filter(self, record: logging.LogRecord) -> bool:
        if self.secrets:
            message = record.getMessage()
            cleaned = redact(message, self.secrets)
            if cleaned != message:
                record.msg, record.args = cleaned, ()
        return True


_REDACTING_FILTER = _RedactingFilter()
for _name in ("urllib3.connectionpool", "urllib3.connection", "requests"):
    logging.getLogger(_name).addFilter(_REDACTING_FILTER)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try. Defaults suit an interactive tool; tests shrink the delays."""

    attempts: int = 4  # total tries, including the first
    connect_timeout: float = 5.0  # seconds
    read_timeout: float = 30.0  # seconds, between bytes of the response
    backoff_base: float = 0.5  # first retry waits up to this long (full jitter), doubling each retry
    backoff_max: float = 8.0
    max_retry_after: float = 60.0  # longest Retry-After we sleep through; longer -> RateLimitedError

    def __post_init__(self):
        if self.attempts < 1 or self.connect_timeout <= 0 or self.read_timeout <= 0:
            raise ValueError(f"RetryPolicy needs attempts >= 1 and positive timeouts, got {self}")

    def backoff(self, retry: int, rng: random.Random) -> float:
        """Full-jitter exponential backoff before retry number ``retry`` (0-based)."""
        return rng.uniform(0, min(self.backoff_max, self.backoff_base * 2 ** retry))


def _retry_after_seconds(header: str | None) -> float | None:
    if not header:
        return None
    try:
        return max(0.0, float(header))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(header)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class ResponseCache:
    """JSON responses on disk, one file per request, valid for ``ttl`` seconds.

    The file name is a hash of the request without the API key; files hold only the response body and
    the time it was stored.
    """

    def __init__(self, directory: str | Path, ttl: float = 24 * 3600):
        self.directory = Path(directory)
        self.ttl = ttl
        self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        return f"ResponseCache({str(self.directory)!r}, ttl={self.ttl})"

    def _path(self, key: str) -> Path:
        return self.directory / (hashlib.sha256(key.encode("utf-8")).hexdigest() + ".json")

    def get(self, key: str) -> Any | None:
        path = self._path(key)
        try:
            entry = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(entry, dict) or time.time() - entry.get("stored_at", 0) > self.ttl:
            return None
        return entry.get("body")

    def put(self, key: str, body: Any) -> None:
        path = self._path(key)
        tmp = path.with_suffix(f".{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps({"stored_at": time.time(), "body": body}), encoding="utf-8")
        os.replace(tmp, path)  # atomic: readers never see half a file

    def clear(self) -> None:
        for path in self.directory.glob("*.json"):
            path.unlink(missing_ok=True)


class HttpClient:
    """JSON over HTTP with the policy above. ``key_param`` / ``key_header`` say how the key is sent."""

    def __init__(self, base_url: str, *, api_key: str | None = None, key_param: str | None = None,
                 key_header: str | None = None, policy: RetryPolicy | None = None,
                 cache: ResponseCache | None = None, session: requests.Session | None = None,
                 user_agent: str = "gemma-grounding/0.1", seed: int | None = None):
        self.base_url = base_url.rstrip("/")
        self._api_key = api_key = checked_api_key(api_key)
        if api_key:
            _REDACTING_FILTER.secrets.add(api_key)
        self.key_param = key_param
        self.key_header = key_header
        self.policy = policy or RetryPolicy()
        self.cache = cache
        self._session = session or requests.Session()
        self._session.headers["User-Agent"] = user_agent
        self._rng = random.Random(seed)
        self._rng_lock = threading.Lock()

    def __repr__(self) -> str:
        key = ", api_key=***" if self._api_key else ""
        return f"HttpClient({self.base_url!r}{key})"

    @property
    def has_key(self) -> bool:
        return bool(self._api_key)

    def _redact(self, text: str) -> str:
        return redact(text, [self._api_key])

    def _excerpt(self, text: str, limit: int) -> str:
        return excerpt(text, [self._api_key], limit)

    def get_json(self, path: str, params: dict[str, Any] | Sequence[tuple[str, Any]] | None = None, *,
                 check: Callable[[Any], Any] | None = None) -> Any:
        """GET ``path`` and decode JSON. ``check(data)`` may raise (schema drift) before it is cached."""
        return self._request("GET", path, params=params, check=check)

    def post_json(self, path: str, body: dict[str, Any], *, check: Callable[[Any], Any] | None = None) -> Any:
        return self._request("POST", path, body=body, check=check)

    def _request(self, method: str, path: str, *, params=None, body=None, check=None) -> Any:
        url = f"{self.base_url}/{path.lstrip('/')}" if path else self.base_url
        param_list = list(params.items() if isinstance(params, dict) else params or [])
        # What the request is, without the key: names it in errors and keys the cache.
        described = f"{method} {url}" + (f"?{urlencode(param_list)}" if param_list else "")
        cache_key = described + ("" if body is None else " " + json.dumps(body, sort_keys=True))
        if self.cache is not None:
            cached = self.cache.get(cache_key)
            if cached is not None:
                log.debug("cache hit: %s", self._redact(described))
                return cached

        headers = {"Accept": "application/json"}
        if self._api_key and self.key_header:
            headers[self.key_header] = self._api_key
        if self._api_key and self.key_param:
            param_list = [*param_list, (self.key_param, self._api_key)]

        last_error: Exception | None = None
        for attempt in range(self.policy.attempts):
            try:
                data = self._send_once(method, url, param_list, body, headers, described)
            except RateLimitedError as exc:
                last_error = exc
                wait = exc.retry_after
                if wait is not None and wait > self.policy.max_retry_after:
                    raise
                if wait is None:
                    with self._rng_lock:
                        wait = self.policy.backoff(attempt, self._rng)
            except TransientError as exc:
                last_error = exc
                with self._rng_lock:
                    wait = self.policy.backoff(attempt, self._rng)
            else:
                if check is not None:
                    check(data)  # a drifted answer is an error, and is not cached
                if self.cache is not None:
                    self.cache.put(cache_key, data)
                return data
            if attempt + 1 < self.policy.attempts:
                log.info("retrying in %.2fs after: %s", wait, last_error)
                time.sleep(wait)
        assert last_error is not None
        if isinstance(last_error, RateLimitedError):
            raise RateLimitedError(f"{last_error} (gave up after {self.policy.attempts} attempts)",
                                   retry_after=last_error.retry_after) from None
        raise type(last_error)(f"{last_error} (gave up after {self.policy.attempts} attempts)") from None

    def _send_once(self, method, url, params, body, headers, described) -> Any:
        try:
            response = send(
                self._session, method, url, params=params, json=body, headers=headers,
                timeout=(self.policy.connect_timeout, self.policy.read_timeout),
                secret_headers=[self.key_header] if self.key_header else [],
                secret_params=[self.key_param] if self.key_param else [])
            content = response.content  # reads the whole body: a cut connection fails here
        except requests.Timeout:
            raise TransientError(f"{described}: timed out (connect {self.policy.connect_timeout}s, read "
                                 f"{self.policy.read_timeout}s)") from None
        except requests.RequestException as exc:
            # The exception text can contain the full URL with the key: redact, and drop the chain.
            raise TransientError(self._redact(f"{described}: connection failed: {type(exc).__name__}: {exc}")) \
                from None
        text = content.decode("utf-8", errors="replace")  # for messages; JSON is parsed from the bytes
        status = response.status_code
        if status == 429:
            retry_after = _retry_after_seconds(response.headers.get("Retry-After"))
            raise RateLimitedError(f"{described}: HTTP 429 rate limited"
                                   + (f" (Retry-After {retry_after:.0f}s)" if retry_after is not None else ""),
                                   retry_after=retry_after)
        if status >= 500:
            raise TransientError(f"{described}: HTTP {status} server error: {self._excerpt(text, 200)}")
        if status in (401, 403):
            raise AuthError(f"{described}: HTTP {status}: the API key is missing, wrong or not enabled for "
                            f"this API (set {API_KEY_ENV} or pass api_key=): {self._excerpt(text, 200)}")
        if status >= 400:
            raise DataSourceError(f"{described}: HTTP {status}: {self._excerpt(text, 300)}")
        try:
            return json.loads(content)
        except ValueError as exc:
            declared = response.headers.get("Content-Length")
            if declared is not None and declared.isdigit() and int(declared) != len(content):
                raise TransientError(f"{described}: body cut short ({len(content)} of {declared} bytes)") from None
            detail = f"{exc.msg} at character {exc.pos} of {len(text)}" if isinstance(exc, json.JSONDecodeError) \
                else str(exc)
            raise SchemaDriftError(f"{described}: the response is not valid JSON ({detail}): "
                                   f"{self._excerpt(text, 120)!r}") from None


def validate(model: type[M], data: Any, what: str) -> M:
    """``model.model_validate(data)``, with drift reported as :class:`SchemaDriftError` naming the fields."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
                             for e in exc.errors()[:5])
        raise SchemaDriftError(f"{what}: the response does not have the documented shape ({problems}); the "
                               f"API may have changed") from None


@dataclass
class Outcome:
    """The result of one call in :func:`map_bounded`: ``value`` or ``error``."""

    value: Any = None
    error: BaseException | None = None


def map_bounded(function: Callable[[T], Any], items: Sequence[T], max_workers: int = 4) -> list[Outcome]:
    """``function`` over ``items`` with at most ``max_workers`` running; outcomes in input order.

    An exception in one call becomes that item's ``Outcome.error``; the other items still finish.
    """
    if max_workers < 1:
        raise ValueError(f"max_workers must be >= 1, got {max_workers}")

    def run(item: T) -> Outcome:
        try:
            return Outcome(value=function(item))
        except Exception as exc:  # reported per item, never lost
            return Outcome(error=exc)

    if max_workers == 1 or len(items) <= 1:
        return [run(item) for item in items]
    with ThreadPoolExecutor(max_workers=min(max_workers, len(items))) as pool:
        return list(pool.map(run, items))
