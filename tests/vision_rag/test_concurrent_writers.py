"""Concurrent writers of one index: one live copy of each page of a file's content, for any mix of writers.

Real processes: a ``gemma-ground index`` whose embedding is held at a gate (so the race is not left to
timing) while second writers (another ``gemma-ground index`` process, then the Python API in this process)
index the same file, then the gate opens. Threads: two ``index_paths`` on one shared handle.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import pytest
from test_ingest import ColourEmbedder, solid
from webapp_support import tiny_index

from vision_rag import Index, index_paths
from vision_rag.index import IndexLockedError

REPO = Path(__file__).resolve().parents[2]
CLI = Path(sys.executable).with_name("gemma-ground")

# ``gemma-ground index ...`` (models.cli.main, the console script's entry) whose ColPali embedding waits at a gate.
GATED_CLI = r"""
import pathlib, sys, time
from vision_rag.colpali import ColPaliEmbedder
started, gate = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
embed = ColPaliEmbedder.embed_pages
def gated(self, images, *args, **kwargs):
    started.touch()
    while not gate.exists():
        time.sleep(0.02)
    return embed(self, images, *args, **kwargs)
ColPaliEmbedder.embed_pages = gated
from models.cli import main
sys.exit(main(sys.argv[3:]))
"""


def wait_for(path: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def one_live_copy(index_dir: Path, pages_per_file: dict[str, int]) -> None:
    with Index.open(index_dir) as index:
        live = Counter((p.source_path, p.page_number, p.content_hash) for p in index.pages())
    assert all(n == 1 for n in live.values()), f"duplicated pages: {live}"
    assert Counter(source for source, _, _ in live) == Counter(pages_per_file), live


def test_writer_processes_never_duplicate_a_file(tmp_path):
    import pypdfium2 as pdfium

    index_dir, embedder = tiny_index()  # the tiny ColPali checkpoint and its sample PDFs
    checkpoint, pdf = index_dir.parent / "colpali", (index_dir.parent / "pdfs" / "report.pdf").resolve()
    expected = {str(pdf): len(pdfium.PdfDocument(str(pdf)))}
    command = ["index", "--model", str(checkpoint), "--dpi", "50", "--index", str(tmp_path / "index"), str(pdf)]
    started, gate = tmp_path / "started", tmp_path / "gate"
    first = subprocess.Popen([sys.executable, "-c", GATED_CLI, str(started), str(gate), *command],
                             cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_for(started, first)  # the first writer decided to index the file and is embedding it
        # Second writers meanwhile: another CLI process, then the Python API in this process.
        second_cli = subprocess.run([str(CLI), *command], cwd=REPO, capture_output=True, text=True, timeout=300)
        try:
            with Index.open(tmp_path / "index") as index:
                api_report = index_paths(index, embedder, [pdf], dpi=50, progress=False)
        except IndexLockedError:
            api_report = None
        gate.touch()
        _, first_err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
    assert first.returncode == 0, first_err[-3000:]
    one_live_copy(tmp_path / "index", expected)
    # The second writers were refused (one writer at a time), clearly, and nothing was lost.
    assert second_cli.returncode == 2 and "being written by another process" in second_cli.stderr, second_cli.stderr
    assert api_report is None


def test_threads_sharing_one_handle_index_a_file_once(tmp_path):
    """The decision is checked again at the commit: the second thread finds the file indexed meanwhile."""
    solid((200, 30, 30)).save(tmp_path / "page.png")
    both_embedding = threading.Barrier(2)

    class Gated(ColourEmbedder):
        def embed_pages(self, images):
            both_embedding.wait(timeout=30)  # both threads passed the first check before either commits
            return super().embed_pages(images)

    reports = []
    with Index.open(tmp_path / "index", create=True, model_id="colour-test", dim=4) as index:
        threads = [threading.Thread(target=lambda: reports.append(
            index_paths(index, Gated(), [tmp_path / "page.png"], progress=False))) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=60)
    assert sorted(r.pages_added for r in reports) == [0, 1]
    assert sorted(len(r.files_unchanged) for r in reports) == [0, 1]
    one_live_copy(tmp_path / "index", {str((tmp_path / "page.png").resolve()): 1})


def test_a_failed_transaction_commits_nothing(tmp_path):
    vectors = ColourEmbedder().embed_pages([solid((10, 200, 10))])[0]
    with Index.open(tmp_path / "index", create=True, model_id="colour-test", dim=4) as index:
        index.add([({"document_id": "kept"}, vectors)])
        with pytest.raises(RuntimeError, match="changed my mind"), index.transaction():
            index.add([({"document_id": "dropped"}, vectors)])
            index.delete(index.page_ids())
            raise RuntimeError("changed my mind")
        assert [p.document_id for p in index.pages()] == ["kept"]
    with Index.open(tmp_path / "index") as index:  # and closing did not commit it either
        assert [p.document_id for p in index.pages()] == ["kept"]
