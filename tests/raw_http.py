"""Raw HTTP/1.1 over a socket, for the hostile-request tests of the servers (a client library would refuse to
send most of these requests): bytes in, the first response out.

``hostile_requests(path)`` is the shared list of malformed requests; ``check_refused`` sends one and checks
that a 4xx JSON error came back fast. The servers differ only in their error shape and limits.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field

MIB = 1 << 20


@dataclass
class RawResponse:
    status: int
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    seconds: float = 0.0  # from connecting to the end of the response

    def json(self):
        return json.loads(self.body)


def exchange(address: tuple[str, int], parts: Iterable[bytes | float], *, timeout: float = 15.0) -> RawResponse:
    """Send ``parts`` (bytes, or a number = pause that many seconds) from a thread while reading the
    response, so a server that answers before the request is complete is seen doing so."""
    started = time.monotonic()
    sock = socket.create_connection(address, timeout=timeout)

    def feed():
        try:
            for part in parts:
                if isinstance(part, (int, float)):
                    time.sleep(part)
                else:
                    sock.sendall(part)
        except OSError:
            pass  # the server refused the request and closed the connection: expected

    sender = threading.Thread(target=feed, daemon=True)
    sender.start()
    try:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                raise AssertionError(f"connection closed without a response (got {data[:200]!r})")
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        status_line, *header_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        length = int(headers.get("content-length", "0"))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return RawResponse(int(status_line.split()[1]), headers, body[:length], time.monotonic() - started)
    finally:
        sock.close()


def request_head(method: str, path: str, headers: dict[str, str]) -> bytes:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in headers.items())]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _megabytes(n: int, chunked: bool) -> Iterable[bytes]:
    block = b"[" * (64 * 1024)
    for _ in range(n * 16):
        yield (b"10000\r\n" + block + b"\r\n") if chunked else block


def hostile_requests(path: str, *, body_timeout: float, head_timeout: float) -> dict[str, tuple[list, int]]:
    """name -> (parts to send, expected status) for POST ``path``."""
    post = lambda headers: request_head("POST", path, {"Content-Type": "application/json", **headers})  # noqa: E731
    deep = b'{"query": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    return {
        "non-numeric Content-Length": ([post({"Content-Length": "ten"}), b"{}"], 400),
        "negative Content-Length": ([post({"Content-Length": "-5"}), b"{}"], 400),
        "two different Content-Lengths": ([post({"Content-Length": "2"})[:-2] + b"Content-Length: 3\r\n\r\n{}"], 400),
        "Content-Length larger than the body": ([post({"Content-Length": "1000"}), b"{}"], 408),
        "slowloris body": ([post({"Content-Length": "1000"}),
                            *[x for _ in range(int(body_timeout / 0.1) + 10) for x in (b" ", 0.1)]], 408),
        "slowloris head": ([b"POST " + path.encode() + b" HTTP/1.1\r\nHost: 127.0.0.1\r\n",
                            *[x for _ in range(int(head_timeout / 0.1) + 10) for x in (b"X-A: b\r\n", 0.1)]], 408),
        "JSON nested 5000 deep": ([post({"Content-Length": str(len(deep))}), deep], None),  # 400 or 422
        "64 MiB declared": ([post({"Content-Length": str(64 * MIB)}), *_megabytes(64, chunked=False)], 413),
        "64 MiB chunked": ([post({"Transfer-Encoding": "chunked"}), *_megabytes(64, chunked=True)], 413),
        "unknown method": ([request_head("FROB", path, {"Content-Length": "0"})], 405),
        "not HTTP at all": ([b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40 + b"\r\n\r\n"], 400),
    }


def check_refused(address, parts, expected_status: int | None, *, within: float) -> RawResponse:
    """The request gets a 4xx JSON answer (``expected_status`` unless None) within ``within`` seconds."""
    response = exchange(address, parts, timeout=within + 10)
    assert 400 <= response.status < 500, (response.status, response.body[:300])
    if expected_status is not None:
        assert response.status == expected_status, (response.status, response.body[:300])
    assert response.headers.get("content-type", "").startswith("application/json"), response.headers
    response.json()  # a JSON document, not an HTML or text page
    assert response.seconds < within, f"answered after {response.seconds:.1f} s"
    return response
