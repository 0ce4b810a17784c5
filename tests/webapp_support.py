"""A tiny page index for the web app tests: the sample PDFs of ``examples/sample_data.py`` plus a PDF whose
text is markup (to check escaping), ingested by ``vision_rag.index_paths`` with a tiny random ColPali
(``tests/vision_rag/tiny_colpali.py``), with ``embedder.json`` recorded beside it as ``gemma-ground index`` does."""

from __future__ import annotations

import functools
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
sys.path.insert(0, str(REPO / "tests" / "vision_rag"))

import sample_data  # noqa: E402
import tiny_colpali  # noqa: E402

MARKUP_TITLE = '<script>alert("x")</script>'  # (a ' would come back as U+2019: Helvetica's StandardEncoding)
MARKUP_LINE = "<img src=x onerror=alert(1)> & <b>bold</b>"


@functools.cache
def tiny_index() -> tuple[Path, object]:
    """(index directory, embedder): 6 pages in 3 PDFs, fp32 storage, pool factor 1."""
    from vision_rag import Index, index_paths
    from vision_rag.colpali import ColPaliEmbedder, write_embedder_record

    root = Path(tempfile.mkdtemp(prefix="webapp-"))
    tokenizer = tiny_colpali.paligemma_tokenizer()
    checkpoint = tiny_colpali.save_colpali(tiny_colpali.hf_colpali(tokenizer, seed=2, image_size=56), tokenizer,
                                           root / "colpali")
    embedder = ColPaliEmbedder.load(checkpoint)
    pdfs = sample_data.write_sample_pdfs(root / "pdfs")
    pdfs.append(sample_data.write_pdf(root / "pdfs" / "markup.pdf", [(MARKUP_TITLE, [MARKUP_LINE], (0.1, 0.1, 0.1))]))
    with Index.open(root / "index", create=True, model_id=embedder.model_id, dim=embedder.dim,
                    storage="fp32") as index:
        report = index_paths(index, embedder, [pdfs[0].parent], dpi=50, progress=False)
    assert len(report.files_indexed) == 3 and not report.files_failed, report
    write_embedder_record(root / "index", embedder)
    return root / "index", embedder


def wait_for_status(process, port: int, timeout: float = 120) -> dict:
    """``/api/status`` of a server starting in ``process`` on 127.0.0.1:``port``, once it answers (the
    test fails with the server's output if it exits first, or after ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=2) as response:
                return json.load(response)
        except OSError:
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.3)
