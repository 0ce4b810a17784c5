"""The web app against hostile requests and leaks: raw sockets to a real uvicorn server on 127.0.0.1 (every
malformed request gets a fast 4xx JSON error carrying the security headers, and the server keeps serving),
then, in process, the security headers on refusals and errors, no CDN page, no server paths in answers."""

from __future__ import annotations

import re
import shutil

import pytest
from fastapi.testclient import TestClient
from raw_http import check_refused, hostile_requests
from webapp_support import tiny_index

from grounding.asgi import BackgroundServer, RequestLimits
from webapp import create_app, http_protocol
from webapp.app import MAX_BODY_BYTES, public_document_id

LIMITS = RequestLimits(max_body_bytes=MAX_BODY_BYTES, body_timeout=0.8, head_timeout=0.8)
SECURITY_HEADERS = ("content-security-policy", "x-content-type-options", "x-frame-options", "referrer-policy")


@pytest.fixture(scope="module")
def server():
    running = BackgroundServer(create_app(limits=LIMITS), protocol=http_protocol(LIMITS), name="webapp-hostile")
    yield running
    running.stop()


CASES = hostile_requests("/api/ask", body_timeout=LIMITS.body_timeout, head_timeout=LIMITS.head_timeout)


@pytest.mark.parametrize("name", sorted(CASES))
def test_hostile_request_gets_a_fast_json_4xx_with_security_headers(server, name):
    import requests

    parts, status = CASES[name]
    response = check_refused((server.host, server.port), parts, status, within=LIMITS.body_timeout + 2.0)
    error = response.json()["error"]
    assert error["status"] == response.status and error["type"] and error["message"]
    for header in SECURITY_HEADERS:
        assert header in response.headers, (header, response.headers)
    status = requests.get(f"http://{server.host}:{server.port}/api/status", timeout=10)
    assert status.status_code == 200 and status.json()["search_enabled"] is False


@pytest.fixture(scope="module")
def client():
    index_dir, _ = tiny_index()
    with TestClient(create_app(index_dir), raise_server_exceptions=False) as c:
        yield c


def test_refusals_and_errors_carry_the_security_headers(client):
    big = b'{"query": "' + b"x" * MAX_BODY_BYTES + b'"}'
    responses = {
        "413": client.post("/api/search", content=big, headers={"content-type": "application/json"}),
        "422 not JSON": client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}),
        "404": client.get("/api/nothing-here"),
        "405": client.delete("/api/search"),
    }

    class BrokenEmbedder:
        model_id = tiny_index()[1].model_id

        def embed_queries(self, texts, progress=None):
            raise RuntimeError("broken")

    with TestClient(create_app(tiny_index()[0], embedder=BrokenEmbedder()), raise_server_exceptions=False) as broken:
        responses["500"] = broken.post("/api/search", json={"query": "x"})
    for name, response in responses.items():
        assert response.headers["content-type"].startswith("application/json"), name
        for header in SECURITY_HEADERS:
            assert header in response.headers, (name, header)
    assert responses["413"].status_code == 413 and responses["500"].status_code == 500


def test_no_page_loads_a_script_from_elsewhere(client):
    assert client.get("/api/docs").status_code == 404  # Swagger UI's page loaded its script from a CDN
    for path in ("/", "/stats"):
        page = client.get(path)
        assert "default-src 'none'" in page.headers["content-security-policy"]
        assert not re.search(r"(src|href)=\"(https?:)?//", page.text), path  # nothing from another origin
        for link in re.findall(r'href="([^"]+)"', page.text):
            assert client.get(link).status_code == 200, link  # every link leads somewhere


def test_answers_never_hold_a_server_path(client, tmp_path):
    index_dir, embedder = tiny_index()
    hits = client.post("/api/search", json={"query": "invoice", "k": 6}).json()["hits"]
    root = str(index_dir.parent)
    for hit in hits:
        assert root not in str(hit) and "/" not in hit["document_id"] and "/" not in hit["document_name"]
    # the opaque id still selects its document
    by_id = {h["document_id"]: h["document_name"] for h in hits}
    for document_id, name in by_id.items():
        only = client.post("/api/search", json={"query": "invoice", "k": 6, "document_id": document_id}).json()
        assert {h["document_name"] for h in only["hits"]} == {name}
    unknown = client.post("/api/search", json={"query": "x", "document_id": public_document_id("/etc/passwd")})
    assert unknown.status_code == 404 and unknown.json()["error"]["type"] == "document_not_found"

    # A page whose source file is gone: the 410 says so without naming the file.
    from vision_rag import Index

    copy = tmp_path / "index"
    shutil.copytree(index_dir, copy)
    gone = tmp_path / "secret-folder" / "gone.pdf"
    with Index.open(copy) as index:
        page_id = index.page_ids()[0]
        index.update(page_id, source_path=str(gone), document_id=str(gone))
    with TestClient(create_app(copy, embedder=embedder), raise_server_exceptions=False) as moved:
        response = moved.get(f"/api/pages/{page_id}/image")
        assert response.status_code == 410 and response.json()["error"]["type"] == "page_source_gone"
        assert "secret-folder" not in response.text and str(tmp_path) not in response.text
