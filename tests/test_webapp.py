"""The web app's JSON API (in-process through Starlette's TestClient): search against MaxSim computed by its
definition, pages by id only, escaping, bounds, JSON errors; statistics against the gapminder CSV."""

from __future__ import annotations

import argparse
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from fastapi.testclient import TestClient
from gapminder_truth import gapminder
from PIL import Image
from webapp_support import MARKUP_LINE, MARKUP_TITLE, tiny_index, wait_for_status

from webapp import create_app
from webapp.app import MAX_BODY_BYTES, WebAppError

STATIC = Path(__file__).resolve().parents[1] / "webapp" / "static"




@pytest.fixture(scope="module")
def client():
    index_dir, _ = tiny_index()
    with TestClient(create_app(index_dir), raise_server_exceptions=False) as c:  # embedder from embedder.json
        yield c


def assert_json_error(response, status: int, kind: str | None = None) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["status"] == status and isinstance(error["message"], str) and error["message"]
    if kind:
        assert error["type"] == kind
    return error["message"]


def test_search_matches_maxsim_by_definition(client):
    from vision_rag.index import Index

    index_dir, embedder = tiny_index()
    query = "total due on the invoice"
    data = client.post("/api/search", json={"query": query, "k": 6}).json()
    assert data["pages_in_index"] == 6 and len(data["hits"]) == 6
    (q,) = embedder.embed_queries([query], progress=False)
    with Index.open(index_dir) as index:
        expected = {pid: float((q @ index.vectors(pid).T).max(dim=1).values.sum()) for pid in index.page_ids()}
    for rank, hit in enumerate(data["hits"], 1):
        assert hit["rank"] == rank and hit["score"] == pytest.approx(expected[hit["page_id"]], abs=1e-4)
        assert hit["normalized_score"] == pytest.approx(hit["score"] / q.shape[0], abs=1e-6)
        assert hit["image_url"] == f"/api/pages/{hit['page_id']}/image"
        assert "/" not in hit["document_name"]  # a file name, never the full path
    assert [h["score"] for h in data["hits"]] == pytest.approx(sorted(expected.values(), reverse=True), abs=1e-4)
    invoice_first = next(h for h in data["hits"] if h["document_name"] == "invoice.pdf" and h["page_number"] == 1)
    assert invoice_first["text"].splitlines() == ["Invoice 2024-017", "Total due: 1,250.00 EUR", "Payable within 30 days"]
    report = next(h["document_id"] for h in data["hits"] if h["document_name"] == "report.pdf")
    only = client.post("/api/search", json={"query": query, "k": 5, "document_id": report}).json()["hits"]
    assert len(only) == 3 and {h["document_name"] for h in only} == {"report.pdf"}


def test_page_images_by_id_and_similarity_map(client):
    import pypdfium2 as pdfium

    hit = client.post("/api/search", json={"query": "revenue chart", "k": 1}).json()["hits"][0]
    response = client.get(hit["thumbnail_url"])
    assert response.status_code == 200 and response.headers["content-type"] == "image/png"
    thumb = Image.open(io.BytesIO(response.content))
    assert max(thumb.size) == 320 and thumb.size[0] < thumb.size[1]  # portrait US letter page
    full = Image.open(io.BytesIO(client.get(hit["image_url"] + "?size=792").content)).convert("RGB")
    index_dir, embedder = tiny_index()
    pdf = pdfium.PdfDocument(Path(index_dir).parent / "pdfs" / hit["document_name"])
    reference = pdf[hit["page_number"] - 1].render(scale=1.0).to_pil().convert("RGB")  # 612x792 at 72 dpi
    pdf.close()
    assert full.size == reference.size
    assert np.abs(np.asarray(full, dtype=int) - np.asarray(reference, dtype=int)).mean() < 2  # same page, same renderer
    # The heat map: alpha is largest over the patch whose summed query similarity is largest.
    heat = np.asarray(Image.open(io.BytesIO(client.get(hit["simmap_url"]).content)).convert("RGBA"))
    assert heat.shape == (256, 256, 4)
    from vision_rag.index import Index

    (q,) = embedder.embed_queries(["revenue chart"], progress=False)
    rows, cols = embedder.patch_grid
    with Index.open(index_dir) as index:
        per_patch = (q @ index.vectors(hit["page_id"])[: rows * cols].T).sum(0).reshape(rows, cols)
    r, c = divmod(int(torch.argmax(per_patch)), cols)
    centre = heat[int((r + 0.5) * 256 / rows), int((c + 0.5) * 256 / cols), 3]
    assert centre == heat[..., 3].max() and centre >= 190
    r, c = divmod(int(torch.argmin(per_patch)), cols)
    assert heat[int((r + 0.5) * 256 / rows), int((c + 0.5) * 256 / cols), 3] <= 10


def test_pages_are_served_by_id_only(client):
    assert_json_error(client.get("/api/pages/..%2F..%2Fetc%2Fpasswd/image"), 404, "not_found")  # no such route
    for url in ["/api/pages/..%2E/image", "/api/pages/-1/image", "/api/pages/1e3/image",
                "/api/pages/0/image?size=5000", "/api/pages/0/image?size=1", "/api/pages/0/simmap?query="]:
        assert_json_error(client.get(url), 422, "invalid_request")
    assert "99999" in assert_json_error(client.get("/api/pages/99999/image"), 404, "page_not_found")
    for url in ["/static/../pyproject.toml", "/static/%2e%2e/%2e%2e/pyproject.toml", "/etc/passwd",
                "/static//etc/passwd"]:
        response = client.get(url)
        assert response.status_code == 404 and "gemma-grounding" not in response.text and "root:" not in response.text
    # No operation of the API takes a file path or file name.
    spec = client.get("/api/openapi.json").json()
    names = {p["name"] for op in spec["paths"].values() for m in op.values() for p in m.get("parameters", [])}
    assert names == {"page_id", "size", "query"}
    assert {"/api/search", "/api/ask", "/api/status", "/api/pages/{page_id}/image",
            "/api/pages/{page_id}/simmap"} <= set(spec["paths"])


def test_text_is_escaped_by_construction(client):
    hits = client.post("/api/search", json={"query": "<b>bold</b>", "k": 6}).json()["hits"]
    markup = next(h for h in hits if h["document_name"] == "markup.pdf")
    assert markup["text"].splitlines() == [MARKUP_TITLE, MARKUP_LINE]  # JSON carries the text as it is
    page = client.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
    assert page.headers["x-content-type-options"] == "nosniff"
    # The pages hold no inline script and put text into the document only through textContent.
    for html in STATIC.glob("*.html"):
        source = html.read_text()
        assert "<script>" not in source and " on" not in source.replace("\n", " ").split("<body>")[1].split("=")[0]
    for script in STATIC.glob("*.js"):
        source = script.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
            assert sink not in source, f"{script.name} uses {sink}"


def test_request_bounds(client):
    assert_json_error(client.post("/api/search", json={"query": "x", "k": 51}), 422)
    assert_json_error(client.post("/api/search", json={"query": "x", "k": 0}), 422)
    assert_json_error(client.post("/api/search", json={"query": "x" * 501}), 422)
    assert_json_error(client.post("/api/search", json={"query": "   "}), 422)
    assert_json_error(client.post("/api/ask", json={"question": "x" * 1001}), 422)
    assert_json_error(client.post("/api/ask", json={"question": "Kenya?", "mode": "sql"}), 422)
    big = b'{"query": "' + b"x" * MAX_BODY_BYTES + b'"}'
    assert "16384" in assert_json_error(client.post("/api/search", content=big,
                                                    headers={"content-type": "application/json"}), 413)

    def chunks():  # no Content-Length: the limit applies to what arrives
        for _ in range(40):
            yield b"x" * 1024

    assert_json_error(client.post("/api/search", content=chunks(), headers={"content-type": "application/json"}), 413)
    assert len(client.post("/api/search", json={"query": "page", "k": 50}).json()["hits"]) == 6  # k bounded by pages


def test_errors_are_json_with_status_codes(client):
    assert_json_error(client.get("/api/nothing-here"), 404, "not_found")
    assert_json_error(client.get("/api/search"), 405)
    assert_json_error(client.post("/api/search", content=b"{not json", headers={"content-type": "application/json"}), 422)
    with TestClient(create_app(), raise_server_exceptions=False) as stats_only:
        assert "--index" in assert_json_error(stats_only.post("/api/search", json={"query": "x"}), 503, "search_disabled")
        assert stats_only.get("/api/status").json()["search_enabled"] is False

    class BrokenEmbedder:
        model_id = tiny_index()[1].model_id

        def embed_queries(self, texts, progress=None):
            raise RuntimeError("secret internal detail")

    with TestClient(create_app(tiny_index()[0], embedder=BrokenEmbedder()), raise_server_exceptions=False) as broken:
        message = assert_json_error(broken.post("/api/search", json={"query": "x"}), 500, "internal_error")
        assert "secret" not in message and "Traceback" not in message

    from grounding.types import TransientError

    class Down:
        name = "down"

        def point(self, query):
            raise TransientError("connection refused")

        def table(self, query):
            raise TransientError("connection refused")

    with TestClient(create_app(store=Down()), raise_server_exceptions=False) as down:
        answer = down.post("/api/ask", json={"question": "Kenya life expectancy", "mode": "rig"}).json()
        assert answer["no_answer"] and "connection refused" in str(answer["errors"])  # a failed lookup is reported


def test_ask_statistics_rag_and_rig(client):
    rig = client.post("/api/ask", json={"question": "What was the life expectancy in Kenya in 2007?", "mode": "rig"})
    data = rig.json()
    assert rig.status_code == 200 and data["statistics"][0]["value"] == gapminder("Kenya", 2007, "lifeExp")
    assert data["footnotes"][0].startswith("[1] - Per Gapminder") and "[1]" in data["text"]
    rag = client.post("/api/ask", json={"question": "How has life expectancy changed in Japan?"}).json()
    (table,) = rag["tables"]
    assert rag["citations"] == [1] and "[Table 1]" in rag["text"]
    years = {row[0]: row[-1] for row in table["table"]["rows"]}
    assert years["2007"] == gapminder("Japan", 2007, "lifeExp") and years["1952"] == gapminder("Japan", 1952, "lifeExp")
    # What the page draws and shows under the answer: the chart of the table, the resolution, the attribution.
    (chart,) = rag["charts"]
    assert chart["kind"] == "line" and chart["y_label"] == "Life expectancy (years)" and chart["table"] == 1
    assert {str(int(p["x"])): p["value"] for p in chart["points"]} == years
    assert rag["explanations"]["How has life expectancy changed in Japan?"].startswith("resolved to: Life expectancy")
    assert rag["attribution"] == [table["table"]["attribution"]] and chart["attribution"] == rag["attribution"][0]


def test_the_charting_library_is_served_by_the_app(client):
    """Chart.js comes from the app's own static files (no CDN), with its licence, under the same CSP."""
    page = client.get("/stats").text
    assert '<script src="/static/vendor/chart.umd.min.js" defer></script>' in page and "https://" not in page
    script = client.get("/static/vendor/chart.umd.min.js")
    assert script.status_code == 200 and "javascript" in script.headers["content-type"]
    assert script.text.startswith("/*!\n * Chart.js v4.6.1") and "sourceMappingURL" not in script.text
    assert script.headers["content-security-policy"].startswith("default-src 'none'; script-src 'self'")
    licence = client.get("/static/vendor/chart.js-LICENSE.md")
    assert licence.status_code == 200 and "MIT License" in licence.text


def test_app_settings_errors_and_cli(tmp_path):
    from vision_rag.index import Index

    index_dir, embedder = tiny_index()
    with Index.open(tmp_path / "bare", create=True, model_id=embedder.model_id, dim=embedder.dim):
        pass
    with pytest.raises(WebAppError, match="embedder.json"):
        create_app(tmp_path / "bare")

    class Other:
        model_id = "some-other-model"

        def embed_queries(self, texts, progress=None):
            return []

    with pytest.raises(WebAppError, match="some-other-model"):
        create_app(index_dir, embedder=Other())
    with pytest.raises(Exception, match="no index"):
        create_app(tmp_path / "nowhere")

    from webapp.cli import register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "--index", str(index_dir)])
    assert args.host == "127.0.0.1" and args.port == 8000 and callable(args.func)


def test_serve_command_runs_a_real_server_on_loopback(tmp_path):
    """``serve`` as the CLI runs it (parse + func) in a subprocess: a uvicorn server on 127.0.0.1 only."""
    import os
    import socket
    import subprocess
    import sys

    index_dir, _ = tiny_index()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ("import argparse, sys; from webapp.cli import register; p = argparse.ArgumentParser(); "
              "register(p.add_subparsers()); a = p.parse_args(sys.argv[1:]); sys.exit(a.func(a))")
    process = subprocess.Popen([sys.executable, "-c", script, "serve", "--index", str(index_dir), "--port", str(port)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=Path(__file__).resolve().parents[1], env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        status = wait_for_status(process, port)
        assert status["search_enabled"] and status["pages_in_index"] == 6
        listening = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout
        assert [line.split()[3] for line in listening.splitlines()] == [f"127.0.0.1:{port}"]  # local address
    finally:
        process.terminate()
        process.wait(timeout=20)


def test_answers_written_by_a_langchain_chat_model():
    from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
    from langchain_core.messages import AIMessage

    model = GenericFakeChatModel(messages=iter([AIMessage("What is life expectancy in Japan?"),  # its questions
                                                AIMessage("It rose to 82.6 years [Table 1] <b>[Table 7]</b>.")]))
    with TestClient(create_app(llm=model), raise_server_exceptions=False) as client:
        assert client.get("/api/status").json()["llm"].startswith("LangChainLLM(GenericFakeChatModel")
        answer = client.post("/api/ask", json={"question": "How has life expectancy changed in Japan?"}).json()
    assert answer["text"] == "It rose to 82.6 years [Table 1] <b>[Table 7]</b>."
    assert answer["citations"] == [1] and answer["invalid_citations"] == [7]
    assert answer["tables"][0]["table"]["rows"][-1][-1] == gapminder("Japan", 2007, "lifeExp")


def test_ask_with_a_safety_guard():
    """A guard that flags everything: a refusal with the scores and no lookup; one that flags nothing: the
    same answer as without a guard, with both checks' scores."""
    from guard_support import tiny_guard, with_threshold

    question = "What was the life expectancy in Kenya in 2007?"
    guard = tiny_guard()
    with TestClient(create_app(guard=with_threshold(guard, 0.0)), raise_server_exceptions=False) as client:
        assert client.get("/api/status").json()["guard"].startswith("SafetyGuard(model_id='tiny-shieldgemma'")
        refused = client.post("/api/ask", json={"question": question, "mode": "rig"}).json()
        too_long = client.post("/api/ask", json={"question": "é" * 999})  # 2 byte tokens each: past the context
        assert "shorten the text" in assert_json_error(too_long, 422, "guard_error")
    assert refused["guard"]["refused"] == "question" and refused["text"].startswith("Refused: the safety guard")
    assert refused["guard"]["question"]["scores"] == guard.probabilities(question) and refused["statistics"] == []
    with TestClient(create_app(guard=with_threshold(guard, 1.0)), raise_server_exceptions=False) as client:
        passed = client.post("/api/ask", json={"question": question, "mode": "rig"}).json()
    with TestClient(create_app(), raise_server_exceptions=False) as client:
        plain = client.post("/api/ask", json={"question": question, "mode": "rig"}).json()
    assert passed["guard"]["refused"] is None and passed["guard"]["answer"]["mode"] == "response"
    assert {**passed, "guard": None} == plain
