"""End to end through ``gemma-ground index | search | explain`` with a tiny random ColPali.

Pages: a 2-page PDF and a 1-page PDF drawn with Pillow (different shapes and colours, so their
embeddings differ), a PNG page, and a corrupt PDF. The first ``index`` and ``search`` run the console
script in a subprocess (the installed entry point, argument parsing, exit codes); the rest call
``models.cli.main`` in-process to keep the test fast.

Search results are checked against a direct computation: the query embedded by the same checkpoint
loaded here, MaxSim by its definition over the page vectors the index stored (and those vectors
against the PNG page embedded here directly). Tolerances: the index stores fp16 (relative error
~5e-4 per component), so a MaxSim score over ~20 query tokens may differ by ~1e-2 from fp32.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image, ImageDraw
from tiny_colpali import hf_colpali, paligemma_tokenizer, save_colpali

from models.cli import main
from vision_rag.colpali import ColPaliEmbedder
from vision_rag.index import Index

SCRIPT = Path(sys.executable).parent / "gemma-ground"
IMAGE_SIZE = 56  # 4 x 4 patches of 14 px


def draw_page(kind: str, size=(120, 160)) -> Image.Image:
    page = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(page)
    if kind == "circle":
        d.ellipse((20, 30, 100, 110), fill="red")
    elif kind == "square":
        d.rectangle((10, 60, 110, 150), fill="blue")
    elif kind == "stripes":
        for y in range(0, size[1], 16):
            d.rectangle((0, y, size[0], y + 7), fill="black")
    else:
        d.text((10, 10), "Invoice total 1234", fill="black")
        d.line((0, 0, size[0], size[1]), fill="green", width=9)
    return page


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    tokenizer = paligemma_tokenizer()
    model_dir = save_colpali(hf_colpali(tokenizer, seed=5, image_size=IMAGE_SIZE), tokenizer, root / "colpali")
    other_dir = save_colpali(hf_colpali(tokenizer, seed=6, image_size=IMAGE_SIZE), tokenizer, root / "other")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    first, second = draw_page("circle"), draw_page("square")
    first.save(docs / "report.pdf", save_all=True, append_images=[second], resolution=72)
    draw_page("stripes").save(docs / "sub" / "memo.pdf", resolution=72)
    draw_page("text").save(docs / "sub" / "scan.png")
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> garbage, not a PDF\n")
    return root, model_dir, other_dir, docs


def run_script(*args) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([str(SCRIPT), *map(str, args)], capture_output=True, text=True, timeout=300, env=env)


def run_main(capsys, *args) -> tuple[int, str, str]:
    capsys.readouterr()
    rc = main([str(a) for a in args])
    out = capsys.readouterr()
    return rc, out.out, out.err


def maxsim(query: torch.Tensor, page: torch.Tensor) -> float:
    return float((query @ page.T).max(dim=1).values.sum())


def test_index_search_explain_end_to_end(workspace, capsys):
    root, model_dir, other_dir, docs = workspace
    index_dir = root / "index"
    assert SCRIPT.is_file(), f"console script {SCRIPT} is not installed (pip install -e .)"

    # -- index: 4 pages added, the corrupt PDF reported and skipped, exit 0 --------------------------------------
    done = run_script("index", "--model", model_dir, "--index", index_dir, "--dpi", 72, "--json", docs)
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert (summary["pages_added"], summary["pages_skipped"], summary["files_failed"]) == (4, 0, 1)
    assert summary["pages_in_index"] == 4
    assert "broken.pdf" in summary["failures"][0]["path"] and "broken.pdf" in done.stderr

    embedder = ColPaliEmbedder.load(model_dir)
    assert summary["model_id"] == embedder.model_id
    with Index.open(index_dir) as index:
        assert index.model_id == embedder.model_id
        pages = {p.page_id: p for p in index.pages()}
        stored = {pid: index.vectors(pid) for pid in pages}
    by_source = sorted((Path(p.source_path).name, p.page_number) for p in pages.values())
    assert by_source == [("memo.pdf", 0), ("report.pdf", 0), ("report.pdf", 1), ("scan.png", 0)]
    # The stored vectors are the embedder's (checked on the PNG page, embedded here from the same file).
    (png_id,) = [pid for pid, p in pages.items() if p.source_path.endswith("scan.png")]
    (direct_png,) = embedder.embed_pages([docs / "sub" / "scan.png"])
    torch.testing.assert_close(stored[png_id], direct_png, atol=2e-3, rtol=0)

    # -- search --json: every page, ranked as MaxSim over the stored vectors ranks them -----------------------------
    query = "red circle"
    done = run_script("search", "--index", index_dir, query, "-k", 10, "--json")
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["query"] == query and result["model_id"] == embedder.model_id
    (q,) = embedder.embed_queries([query])
    expected = {pid: maxsim(q, vectors) for pid, vectors in stored.items()}
    got = {h["page_id"]: h["score"] for h in result["hits"]}
    assert set(got) == set(expected)
    for pid, score in got.items():
        assert score == pytest.approx(expected[pid], abs=2e-2)
    assert [h["page_id"] for h in result["hits"]] == sorted(expected, key=expected.get, reverse=True)
    assert result["hits"][0]["normalized_score"] == pytest.approx(result["hits"][0]["score"] / len(q), abs=1e-6)
    # The winner stands out enough that the order above is not a tie broken by noise.
    top = sorted(expected.values(), reverse=True)
    assert top[0] - top[1] > 0.05

    # -k and filters, in-process.
    rc, out, _ = run_main(capsys, "search", "--index", index_dir, query, "-k", 2, "--json")
    assert rc == 0 and len(json.loads(out)["hits"]) == 2
    rc, out, _ = run_main(capsys, "search", "--index", index_dir, query, "--json",
                          "--path-prefix", str(docs / "sub"))
    assert rc == 0 and {Path(h["source_path"]).name for h in json.loads(out)["hits"]} == {"memo.pdf", "scan.png"}
    rc, out, _ = run_main(capsys, "search", "--index", index_dir, query)
    assert rc == 0 and "page_id=" in out and len(out.strip().splitlines()) == 4

    # -- explain writes a PNG heat map -------------------------------------------------------------------------
    best = result["hits"][0]["page_id"]
    out_png = root / "map.png"
    rc, out, err = run_main(capsys, "explain", "--index", index_dir, query, best, "--out", out_png)
    assert rc == 0, err
    with Image.open(out_png) as image:
        assert image.format == "PNG" and image.width > 0 and image.height > 0
    rc, _, err = run_main(capsys, "explain", "--index", index_dir, query, 999, "--out", root / "none.png")
    assert rc != 0 and "999" in err

    # -- re-indexing unchanged files is a no-op ------------------------------------------------------------------
    with Index.open(index_dir) as index:
        generation = index.generation
    rc, out, err = run_main(capsys, "index", "--model", model_dir, "--index", index_dir, "--dpi", 72, "--json", docs)
    assert rc == 0, err
    again = json.loads(out)
    assert (again["pages_added"], again["pages_skipped"], again["pages_in_index"]) == (0, 4, 4)
    with Index.open(index_dir) as index:
        assert sorted(p.page_id for p in index.pages()) == sorted(pages)

    # -- a different model is refused, clearly, for indexing and for searching -----------------------------------
    rc, _, err = run_main(capsys, "index", "--model", other_dir, "--index", index_dir, docs / "sub" / "scan.png")
    assert rc == 2 and "was built with model" in err and embedder.model_id in err
    rc, _, err = run_main(capsys, "search", "--index", index_dir, query, "--model", other_dir)
    assert rc == 2 and "was built with model" in err
    with Index.open(index_dir) as index:
        assert len(index) == 4 and index.generation >= generation

    # -- search loads the recorded model; a moved checkpoint is found with --model ---------------------------------
    moved = root / "moved-colpali"
    shutil.move(model_dir, moved)
    try:
        rc, _, err = run_main(capsys, "search", "--index", index_dir, query)
        assert rc == 2 and "pass --model" in err
        rc, out, err = run_main(capsys, "search", "--index", index_dir, query, "--json", "--model", moved)
        assert rc == 0, err
        assert [h["page_id"] for h in json.loads(out)["hits"]] == [h["page_id"] for h in result["hits"][:5]]
    finally:
        shutil.move(moved, model_dir)


def test_plaid_width_is_a_cli_setting(workspace, capsys, tmp_path):
    _, model_dir, _, docs = workspace
    # PLAID trains its centroids on the first file's token vectors (>= 256): 12 pages of 22 tokens
    pages = [draw_page(kind) for kind in ["circle", "square", "stripes", "text"] * 3]
    pages[0].save(tmp_path / "long.pdf", save_all=True, append_images=pages[1:], resolution=72)
    rc, _, err = run_main(capsys, "index", "--model", model_dir, "--index", tmp_path / "p", "--dpi", 72,
                          "--storage", "plaid", "--plaid-nbits", "3.75", tmp_path / "long.pdf")
    assert rc == 0, err
    with Index.open(tmp_path / "p") as index:
        assert (index.settings.storage, index.settings.plaid_nbits, index.manifest.format_version) == ("plaid", 3.75, 3)
    rc, _, err = run_main(capsys, "index", "--model", model_dir, "--index", tmp_path / "q",
                          "--plaid-nbits", "3", docs / "sub" / "scan.png")
    assert rc == 2 and "--plaid-nbits needs --storage plaid" in err
    rc, _, err = run_main(capsys, "index", "--model", model_dir, "--index", tmp_path / "r", "--storage", "plaid",
                          "--plaid-nbits", "5", docs / "sub" / "scan.png")
    assert rc == 2 and "plaid_nbits" in err


def test_cli_errors_are_clear(workspace, capsys, tmp_path):
    _, model_dir, _, docs = workspace
    rc, _, err = run_main(capsys, "search", "--index", tmp_path / "nothing", "query")
    assert rc == 2 and "no index" in err
    rc, _, err = run_main(capsys, "index", "--model", model_dir, "--index", tmp_path / "i", tmp_path / "missing.pdf")
    assert rc == 2 and "missing.pdf" in err
    # every file failed: exit 1 (a failure among good files is reported and exits 0, above)
    rc, _, err = run_main(capsys, "index", "--model", model_dir, "--index", tmp_path / "j", docs / "broken.pdf")
    assert rc == 1 and "none of the 1 files could be indexed" in err and "broken.pdf" in err
