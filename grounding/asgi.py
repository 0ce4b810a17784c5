"""Hardened HTTP serving for the project's servers (the statistics server here, the web app in ``webapp/``).

Uvicorn runs the ASGI app; two layers make every malformed request end fast, in bounded memory, with a
JSON error in the server's own shape:

- :class:`LimitedRequests` (ASGI middleware) reads the whole request body before the app sees it: a
  declared or streamed body over ``max_body_bytes`` gets 413, a body that does not arrive completely
  within ``body_timeout`` seconds (a Content-Length larger than the body, a slowloris drip) gets 408,
  and a body that is not JSON, or JSON nested deeper than pydantic-core's limit (200), gets
  ``invalid_json_status``; the JSON is parsed by pydantic-core, never by the recursive ``json`` module.
- :func:`hardened_protocol` (the HTTP protocol class given to uvicorn) answers what never reaches the
  app: a request line or headers that are not HTTP (a non-numeric or negative Content-Length ...) get
  a JSON 400 instead of uvicorn's plain-text one, and a request head that takes longer than
  ``head_timeout`` seconds gets a JSON 408.

Each refusal closes the connection. :class:`BackgroundServer` runs an app in a daemon thread on a socket
bound before it returns (so ``port=0`` gives a known free port); :func:`run_server` blocks until Ctrl-C.
Neither logs query strings (they may hold API keys): uvicorn's access log is off.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from pydantic import BaseModel, ConfigDict, Field
from pydantic_core import from_json

__all__ = ["RequestLimits", "ErrorRenderer", "LimitedRequests", "hardened_protocol", "BackgroundServer",
           "run_server"]

log = logging.getLogger("grounding.asgi")

# (status, kind, message) -> the JSON document the server answers errors with.
ErrorRenderer = Callable[[int, str, str], Any]


class RequestLimits(BaseModel):
    """Bounds on one request; the defaults suit JSON APIs on a local machine."""

    model_config = ConfigDict(frozen=True)

    max_body_bytes: int = Field(1 << 20, ge=0, description="largest request body accepted (413 above)")
    body_timeout: float = Field(10.0, gt=0, description="seconds for the whole body to arrive (408 after)")
    head_timeout: float = Field(10.0, gt=0, description="seconds for the request line and headers (408 after)")


def _error_bytes(render: ErrorRenderer, status: int, kind: str, message: str) -> bytes:
    return json.dumps(render(status, kind, message)).encode("utf-8")


def _header_list(headers: Mapping[str, str]) -> list[tuple[bytes, bytes]]:
    return [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in headers.items()]


class LimitedRequests:
    """ASGI middleware: the request body bounded in size and time and checked to be JSON, before the app
    runs. ``headers`` are added to its own error responses (the app's security headers)."""

    def __init__(self, app, *, limits: RequestLimits, render_error: ErrorRenderer,
                 invalid_json_status: int = 400, headers: Mapping[str, str] | None = None):
        self.app = app
        self.limits = limits
        self.render_error = render_error
        self.invalid_json_status = invalid_json_status
        self.headers = _header_list(headers or {})

    async def _refuse(self, send, status: int, kind: str, message: str) -> None:
        body = _error_bytes(self.render_error, status, kind, message)
        await send({"type": "http.response.start", "status": status, "headers": [
            (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"), *self.headers]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limits.max_body_bytes
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None:
            if not declared.isdigit():
                return await self._refuse(send, 400, "bad_request", "Content-Length must be a non-negative integer")
            if int(declared) > limit:
                return await self._refuse(send, 413, "request_too_large",
                                          f"request bodies are limited to {limit} bytes")
        messages, size = [], 0
        deadline = asyncio.get_running_loop().time() + self.limits.body_timeout
        while True:
            remaining = deadline - asyncio.get_running_loop().time()
            try:
                message = await asyncio.wait_for(receive(), timeout=max(remaining, 0.001))
            except asyncio.TimeoutError:
                return await self._refuse(send, 408, "request_timeout",
                                          f"the request body did not arrive within {self.limits.body_timeout:g} s")
            messages.append(message)
            if message["type"] != "http.request":
                break  # the client went away: let the app see the disconnect
            size += len(message.get("body", b""))
            if size > limit:  # a body without Content-Length (chunked) is bounded the same way
                return await self._refuse(send, 413, "request_too_large",
                                          f"request bodies are limited to {limit} bytes")
            if not message.get("more_body", False):
                break
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        if body.strip():
            try:
                from_json(body)  # pydantic-core: no recursion in Python, depth capped at 200
            except ValueError as e:
                return await self._refuse(send, self.invalid_json_status, "invalid_json",
                                          f"the request body is not valid JSON ({e})")

        async def replay():
            return messages.pop(0) if messages else await receive()

        await self.app(scope, replay, send)


def hardened_protocol(render_error: ErrorRenderer, limits: RequestLimits, *,
                      headers: Mapping[str, str] | None = None):
    """A uvicorn HTTP protocol class (``uvicorn.Config(http=...)``) whose protocol-level errors are JSON:
    400 for a request that is not HTTP, 408 for a request head slower than ``limits.head_timeout``
    seconds (a connection that sent nothing is closed silently then, as an idle keep-alive one is)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    head_timeout = limits.head_timeout
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())

    def raw_response(status: int, reason: str, kind: str, message: str) -> bytes:
        body = _error_bytes(render_error, status, kind, message)
        return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
                f"connection: close\r\n{extra}\r\n").encode("latin-1") + body

    class HardenedH11Protocol(H11Protocol):
        _head_timer: asyncio.TimerHandle | None = None
        _timed_cycle = None
        _head_started = False  # bytes of the next request arrived since the timer was armed

        def _arm_head_timer(self) -> None:
            self._cancel_head_timer()
            self._timed_cycle = self.cycle
            self._head_started = False
            self._head_timer = self.loop.call_later(head_timeout, self._head_timed_out)

        def _cancel_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self) -> None:
            self._head_timer = None
            if self.transport.is_closing():
                return
            if self._head_started:
                self.transport.write(raw_response(408, "Request Timeout", "request_timeout",
                                                  f"the request head did not arrive within {head_timeout:g} s"))
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            self._head_started = self._head_started or bool(data)
            super().data_received(data)

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def connection_lost(self, exc) -> None:
            self._cancel_head_timer()
            super().connection_lost(exc)

        def handle_events(self) -> None:
            super().handle_events()
            if self.cycle is not self._timed_cycle:  # a request head arrived: the app's limits take over
                self._cancel_head_timer()

        def on_response_complete(self) -> None:
            self._arm_head_timer()  # before super(), which may start a pipelined request at once
            super().on_response_complete()

        def send_400_response(self, msg: str) -> None:
            self._cancel_head_timer()
            if not self.transport.is_closing():
                self.transport.write(raw_response(400, "Bad Request", "bad_request",
                                                  f"not a valid HTTP request: {msg}"))
                self.transport.close()

    return HardenedH11Protocol


def _config(app, *, protocol, log_level: str):
    import uvicorn

    # No access log (it prints query strings), no logging set-up of uvicorn's own, no lifespan events.
    return uvicorn.Config(app, http=protocol, lifespan="off", access_log=False, log_config=None,
                          log_level=log_level, timeout_keep_alive=5, timeout_graceful_shutdown=3)


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.set_inheritable(True)
    return sock


class BackgroundServer:
    """``app`` served by uvicorn in a daemon thread; the socket is bound (and the port known) on return."""

    def __init__(self, app, host: str = "127.0.0.1", port: int = 0, *, protocol, log_level: str = "warning",
                 name: str = "http-server"):
        import uvicorn

        self._socket = _bind(host, port)
        self.host, self.port = self._socket.getsockname()[:2]
        self._server = uvicorn.Server(_config(app, protocol=protocol, log_level=log_level))
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [self._socket]},
                                        name=f"{name}-{self.port}", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 30
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server on {self.host}:{self.port} did not start (see the log)")
            time.sleep(0.01)

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._socket.close()


def run_server(app, host: str, port: int, *, protocol, log_level: str = "info") -> None:
    """Serve ``app`` until interrupted (uvicorn handles Ctrl-C and SIGTERM)."""
    import uvicorn

    sock = _bind(host, port)
    try:
        uvicorn.Server(_config(app, protocol=protocol, log_level=log_level)).run(sockets=[sock])
    finally:
        sock.close()
