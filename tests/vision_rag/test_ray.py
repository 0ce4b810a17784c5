"""The Ray paths on a real local Ray cluster (2 CPUs, started once for this module, stopped at its end):
a distributed build against a build in one process (the same pages, the same vectors, the same search
results) with an embedding actor killed while it runs; ``gemma-ground index --ray --shards``; shards
held by Ray actors against one index (exact top-k, filters, deletes), a shard actor killed (search
answers from the others and names the missing shard, then recovers); the web app on the Ray shards.

The model is a tiny random ColPali (``tiny_colpali.py``); pages are drawn with Pillow and numpy. Vectors
are compared at 1e-6: both builds run the same model on the same pixels on one CPU, in batches of
different composition (equal-length pages, so batching changes no arithmetic but BLAS blocking)."""

from __future__ import annotations

import os
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from test_index import clustered_corpus, queries_from_pages, record
from tiny_colpali import hf_colpali, paligemma_tokenizer, save_colpali

ray = pytest.importorskip("ray")
# Ray Data reads its own deprecated settings when it copies its context: not this project's warnings.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:ray.data.context")

from models.cli import main  # noqa: E402
from vision_rag.colpali import ColPaliEmbedder  # noqa: E402
from vision_rag.distributed import connect, index_paths_ray  # noqa: E402
from vision_rag.index import Index, PageNotFoundError  # noqa: E402
from vision_rag.ingest import index_paths, read_page  # noqa: E402
from vision_rag.ray_shards import RayShardedIndex  # noqa: E402
from vision_rag.sharded import ShardedIndex, open_collection, split_page_id  # noqa: E402

IMAGE_SIZE = 56
QUERIES = ["red circle", "blue square invoice", "what is the total revenue", "chart page"]


@pytest.fixture(scope="module")
def cluster():
    # Ray's memory monitor kills workers when the whole machine is short of memory; on a machine shared
    # with other jobs that is not this test's doing.
    os.environ["RAY_memory_monitor_refresh_ms"] = "0"
    connect(num_cpus=2, object_store_memory=200 * 2**20)
    yield ray
    ray.shutdown()


def draw(seed: int, size=(70, 90)) -> Image.Image:
    rng = np.random.default_rng(seed)
    page = Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))
    d = ImageDraw.Draw(page)
    d.ellipse((10, 10, 50, 60), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
    return page


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A mixed folder: PDFs of 1-3 pages, PNG and JPEG pages, a 2-frame TIFF, a corrupt PDF and a text file."""
    root = tmp_path_factory.mktemp("ray")
    tokenizer = paligemma_tokenizer()
    checkpoint = save_colpali(hf_colpali(tokenizer, seed=7, image_size=IMAGE_SIZE), tokenizer, root / "colpali")
    docs = root / "docs"
    (docs / "sub").mkdir(parents=True)
    seed = 0
    for name, n_pages in [("a.pdf", 3), ("b.pdf", 1), ("sub/c.pdf", 2), ("sub/d.pdf", 3)]:
        pages = [draw(seed + i) for i in range(n_pages)]
        pages[0].save(docs / name, save_all=True, append_images=pages[1:], resolution=72)
        seed += n_pages
    for i in range(6):
        draw(100 + i).save(docs / f"scan{i}.png")
    draw(200).save(docs / "sub" / "photo.jpg", quality=95)
    draw(300).save(docs / "multi.tif", save_all=True, append_images=[draw(301)])
    (docs / "broken.pdf").write_bytes(b"%PDF-1.7\n1 0 obj << /Type /Catalog >> not a PDF\n")
    (docs / "notes.txt").write_text("not a page")
    embedder = ColPaliEmbedder.load(checkpoint)
    return root, checkpoint, docs, embedder


def page_key(page):
    return page.source_path, page.page_number


def search_keys(index, embedder, k=6):
    queries = embedder.embed_queries(QUERIES, progress=False)
    return [[(page_key(h.page), round(h.score, 4)) for h in index.search(q, k=k, exact=True)] for q in queries]


def assert_same_collection(got, expected):
    """The same pages (each once), the same vectors (1e-6), the same search results."""
    got_pages, expected_pages = got.pages(), expected.pages()
    assert sorted(map(page_key, got_pages)) == sorted(map(page_key, expected_pages))
    assert len({page_key(p) for p in got_pages}) == len(got_pages) == len(got)
    expected_by_key = {page_key(p): p for p in expected_pages}
    for page in got_pages:
        twin = expected_by_key[page_key(page)]
        assert (page.content_hash, page.document_id, page.n_tokens) == (twin.content_hash, twin.document_id,
                                                                       twin.n_tokens)
        np.testing.assert_allclose(got.vectors(page.page_id).numpy(), expected.vectors(twin.page_id).numpy(),
                                   rtol=0, atol=1e-6)


def test_distributed_build_equals_one_process_and_survives_a_killed_worker(cluster, workspace):
    root, checkpoint, docs, embedder = workspace
    with Index.open(root / "single", create=True, model_id=embedder.model_id, dim=embedder.dim,
                    storage="fp32") as single:
        expected = index_paths(single, embedder, [docs], progress=False)
    killed = []

    def kill_the_first_worker(event):
        if not killed:  # SIGKILL the actor that embedded the first page, while the others are still coming
            killed.append(int(event.worker.rsplit(":", 1)[1]))
            os.kill(killed[0], signal.SIGKILL)

    report = index_paths_ray(root / "dist", checkpoint, [docs], workers=2, batch_size=1,
                             index_settings=dict(storage="fp32"), on_page=kill_the_first_worker, progress=False)
    assert killed and not _alive(killed[0])
    assert sorted(report.files_indexed) == sorted(expected.files_indexed) and len(report.files_indexed) == 12
    assert report.pages_added == expected.pages_added == 18
    assert [f.path for f in report.files_failed] == [str((docs / "broken.pdf").resolve())]
    assert "not a readable PDF" in report.files_failed[0].reason
    assert [(p.path, p.page_number) for p in report.page_failures] == [(str((docs / "broken.pdf").resolve()), -1)]
    assert [f.path for f in report.files_ignored] == [str(docs / "notes.txt")]
    with Index.open(root / "dist") as dist, Index.open(root / "single") as single:
        assert dist.model_id == single.model_id
        assert_same_collection(dist, single)
        assert search_keys(dist, embedder) == search_keys(single, embedder)
    # Idempotent: unchanged files are skipped before any page is rendered (no pipeline runs).
    good = sorted(report.files_indexed)
    again = index_paths_ray(root / "dist", checkpoint, good, workers=2, progress=False)
    assert (again.pages_added, again.attempts, sorted(again.files_unchanged)) == (0, 0, good)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_collector_keeps_one_copy_of_each_page_and_commits_whole_files_only(tmp_path):
    """What this process does with the pipeline's rows, whatever order, repeats and losses the cluster
    produces (rows given directly: no cluster needed)."""
    from vision_rag.distributed import DistributedIngestReport, EmbedderSpec, _collect, _File, _Writer

    def row(kind, path, number=-1, n_pages=0, fill=0.0, reason=""):
        vectors = np.full((3, 4), fill, np.float16).tobytes() if kind == "page" else b""
        return dict(kind=kind, path=path, content_hash="h-" + path, page_number=number, n_pages=n_pages,
                    reason=reason, vectors=vectors, n_tokens=3 if kind == "page" else 0, dim=4, model_id="m",
                    worker="host:1")

    class Rows:  # stands in for the Ray dataset: batches of columns
        def __init__(self, rows):
            self.rows = rows

        def iter_batches(self, **_):
            for start in range(0, len(self.rows), 2):
                part = self.rows[start:start + 2]
                yield {key: np.array([r[key] for r in part], dtype=object) for key in part[0]}

    rows = [row("page", "/x.pdf", 1, fill=1), row("page", "/y.pdf", 0, fill=5), row("page", "/x.pdf", 1, fill=9),
            row("end", "/x.pdf", n_pages=2), row("page", "/x.pdf", 0, fill=2), row("end", "/y.pdf", n_pages=2),
            row("page", "/z.pdf", 0), row("page_error", "/z.pdf", 1, reason="cannot embed page 2: boom"),
            row("end", "/z.pdf", n_pages=2), row("page", "/x.pdf", 0, fill=7)]
    report = DistributedIngestReport()
    writer = _Writer(tmp_path / "ix", None, {}, EmbedderSpec(source="/m"), None, report)
    states = {path: _File(content_hash="h-" + path) for path in ("/x.pdf", "/y.pdf", "/z.pdf")}
    _collect(Rows(rows), states, writer, commit_pages=1, on_page=None, progress=False)
    writer.commit_ready()
    # x: complete (its repeated pages kept once, first copy); y: page 1 never came (run again);
    # z: a page failed, so none of its pages is indexed, and the page is named.
    assert report.files_indexed == ["/x.pdf"] and states["/y.pdf"].pages.keys() == {0}
    assert "/y.pdf" not in writer.decided and "/z.pdf" in writer.decided
    assert [(p.path, p.page_number) for p in report.page_failures] == [("/z.pdf", 1)]
    assert "(page 2)" in report.files_failed[0].reason
    writer.close()
    with Index.open(tmp_path / "ix") as index:
        assert [(p.source_path, p.page_number, p.content_hash) for p in index.pages()] == [
            ("/x.pdf", 0, "h-/x.pdf"), ("/x.pdf", 1, "h-/x.pdf")]
        assert [float(index.vectors(p.page_id)[0, 0]) for p in index.pages()] == [2.0, 1.0]


def test_render_stage_rows(workspace):
    """The reading stage alone (no cluster): a row per page, then the page count; a file that cannot be
    read is one error row for the whole file (page -1)."""
    from vision_rag.distributed import render_files

    root, checkpoint, docs, embedder = workspace
    batch = {"path": np.array([str(docs / "a.pdf"), str(docs / "broken.pdf")], dtype=object),
             "content_hash": np.array(["h1", "h2"], dtype=object)}
    rows = [{k: v[0] for k, v in out.items()} for out in render_files(batch, dpi=72, max_pixels=10**6)]
    assert [(r["kind"], r["page_number"], r["n_pages"]) for r in rows] == [
        ("page", 0, 0), ("page", 1, 0), ("page", 2, 0), ("end", -1, 3), ("file_error", -1, 0)]
    first = Image.frombytes("RGB", (int(rows[0]["width"]), int(rows[0]["height"])), rows[0]["pixels"])
    assert np.array_equal(np.asarray(first), np.asarray(read_page(docs / "a.pdf", 0, dpi=72, max_pixels=10**6)))
    assert "not a readable PDF" in rows[-1]["reason"] and rows[-1]["content_hash"] == "h2"


def test_cli_builds_shards_on_ray(cluster, workspace, capsys):
    root, checkpoint, docs, embedder = workspace
    files = [docs / "a.pdf", docs / "sub" / "c.pdf", docs / "scan0.png", docs / "scan1.png", docs / "broken.pdf"]
    capsys.readouterr()
    rc = main(["index", "--model", str(checkpoint), "--index", str(root / "shards"), "--ray", "--workers", "2",
               "--shards", "2", "--storage", "fp32", "--batch-size", "2", "--json", *map(str, files)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert '"pages_added": 7' in out.out and '"files_failed": 1' in out.out and "ray: 2 workers" in out.err
    with ShardedIndex.open(root / "shards", shards=2) as sharded, Index.open(root / "single") as single:
        assert sorted(s for s in sharded.shard_sizes()) in ([2, 5], [3, 4])  # documents kept whole
        for page in sharded.pages():
            shard, _ = split_page_id(page.page_id, 2)
            assert all(split_page_id(p.page_id, 2)[0] == shard for p in sharded.pages(document_id=page.document_id))
        subset = {str(f.resolve()) for f in files[:4]}
        for got, want in zip(search_keys(sharded, embedder, k=7), search_keys(single, embedder, k=18), strict=True):
            assert got == [hit for hit in want if hit[0][0] in subset][:7]
    # `search` reads a sharded collection as one index.
    rc = main(["search", "--index", str(root / "shards"), QUERIES[0], "-k", "3", "--json"])
    assert rc == 0 and '"rank": 3' in capsys.readouterr().out
    rc = main(["index", "--model", str(checkpoint), "--index", str(root / "other"), "--workers", "2", str(files[0])])
    assert rc == 2 and "--workers and --gpus-per-worker need --ray" in capsys.readouterr().err


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """One index and a 3-shard collection holding the same 120 pages."""
    root = tmp_path_factory.mktemp("synthetic")
    pages = clustered_corpus(120, 16, 32, 8, seed=40)
    records = [dict(record(i), metadata={"year": 2000 + i % 5}) for i in range(120)]
    items = list(zip(records, pages, strict=True))
    with Index.open(root / "single", create=True, model_id="m", dim=32, storage="fp32") as single:
        single.add(items)
    with ShardedIndex.open(root / "sharded", create=True, shards=3, model_id="m", dim=32, storage="fp32") as sharded:
        sharded.add(items[:60])
        sharded.add(items[60:])
    return root, pages


def keys_and_scores(hits):
    return [(page_key(h.page), round(h.score, 4)) for h in hits]


def test_shards_on_ray_actors_search_delete_and_recover(cluster, synthetic):
    root, pages = synthetic
    single = Index.open(root / "single")
    queries = [torch.from_numpy(q) for q in queries_from_pages(pages, 4, 5, seed=41)]
    with RayShardedIndex(root / "sharded", shards=3, timeout_s=60) as remote:
        assert remote.n_shards == 3 and len(remote) == 120 and remote.model_id == "m"
        results = remote.search(queries, k=8)
        for query, hits in zip(queries, results, strict=True):
            assert hits.complete and hits.shards == 3
            assert keys_and_scores(hits) == keys_and_scores(single.search(query, k=8))
        flt = {"metadata": {"year": 2003}, "document_id": [f"doc{i}" for i in range(0, 30, 2)]}
        assert keys_and_scores(remote.search(queries[0], k=20, filter=flt)) == \
            keys_and_scores(single.search(queries[0], k=20, filter=flt))
        # Deletes by global id, across shards; the same pages deleted from the single index.
        doomed = [h.page_id for h in remote.search(queries[1], k=4)]
        keys = [page_key(remote.get(p)) for p in doomed]
        remote.delete(doomed)
        with Index.open(root / "single") as writer:
            writer.delete([p.page_id for p in writer.pages() if page_key(p) in keys])
        assert keys_and_scores(remote.search(queries[1], k=8)) == keys_and_scores(single.search(queries[1], k=8))
        with pytest.raises(PageNotFoundError):
            remote.get(doomed[0])
        with pytest.raises(PageNotFoundError, match=str(doomed[0])):
            remote.delete([doomed[0]])
        # A shard actor dies: search answers from the other shards and says which one is missing.
        full = remote.search(queries[2], k=120)
        victim = split_page_id(full[0].page_id, 3)[0]
        pid = int(next(s for s in remote.status() if s.shard == victim).worker.rsplit(":", 1)[1])
        os.kill(pid, signal.SIGKILL)
        partial = remote.search(queries[2], k=8, timeout_s=0.5)
        assert partial.missing_shards == [victim] and not partial.complete
        assert keys_and_scores(partial) == keys_and_scores([h for h in full if split_page_id(h.page_id, 3)[0] != victim][:8])
        # Ray restarts it; search answers whole again.
        deadline = time.monotonic() + 180
        while not (again := remote.search(queries[2], k=8, timeout_s=5)).complete:
            assert time.monotonic() < deadline, "the shard actor did not come back"
            time.sleep(1)
        assert keys_and_scores(again) == keys_and_scores(full[:8])
        assert int(next(s for s in remote.status() if s.shard == victim).worker.rsplit(":", 1)[1]) != pid
    single.close()


def test_web_app_on_ray_shards(cluster, workspace):
    from fastapi.testclient import TestClient

    from webapp import create_app

    root, checkpoint, docs, embedder = workspace
    (query,) = embedder.embed_queries([QUERIES[1]], progress=False)
    with open_collection(root / "shards") as local:
        expected = local.search(query, k=7)
    with RayShardedIndex(root / "shards", shards=2, timeout_s=60) as remote, \
            TestClient(create_app(root / "shards", embedder=embedder, index=remote)) as client:
        status = client.get("/api/status").json()
        assert (status["shards"], status["missing_shards"], status["pages_in_index"]) == (2, [], 7)
        answer = client.post("/api/search", json={"query": QUERIES[1], "k": 7}).json()
        assert [h["page_id"] for h in answer["hits"]] == [h.page_id for h in expected]
        assert answer["missing_shards"] == [] and answer["shards"] == 2
        page = client.get(f"/api/pages/{expected[0].page_id}/image?size=64")
        assert page.status_code == 200 and page.headers["content-type"] == "image/png"
        # Shard 1's actor is gone for good (killed without restart): answers say so, pages of it are 503.
        ray.kill(remote.actor(1), no_restart=True)
        answer = client.post("/api/search", json={"query": QUERIES[1], "k": 7}).json()
        assert answer["missing_shards"] == [1]
        assert [h["page_id"] for h in answer["hits"]] == [h.page_id for h in expected if h.page_id % 2 == 0]
        assert client.get("/api/status").json()["missing_shards"] == [1]
        lost = next(h.page_id for h in expected if h.page_id % 2 == 1)
        response = client.get(f"/api/pages/{lost}/image?size=64")
        assert response.status_code == 503 and response.json()["error"]["type"] == "shard_unavailable"
        remote.restart_shard(1)
        answer = client.post("/api/search", json={"query": QUERIES[1], "k": 7}).json()
        assert answer["missing_shards"] == [] and [h["page_id"] for h in answer["hits"]] == [h.page_id for h in expected]


def test_serve_command_on_ray_shards(cluster, workspace):
    """``gemma-ground serve --ray ADDRESS --shards 2`` in a subprocess: a second driver on this module's
    cluster, its shard actors holding the collection, the JSON API answering from them on 127.0.0.1."""
    import json
    import socket
    import subprocess
    import sys
    import urllib.request
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from webapp_support import wait_for_status

    root, checkpoint, docs, embedder = workspace
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = ray.get_runtime_context().gcs_address
    script = ("import sys; from models.cli import main; sys.exit(main(sys.argv[1:]))")
    process = subprocess.Popen([sys.executable, "-c", script, "serve", "--index", str(root / "shards"), "--ray", address,
                                "--shards", "2", "--port", str(port)], stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, cwd=Path(__file__).resolve().parents[2],
                               env={**os.environ, "TQDM_DISABLE": "1"})
    try:
        status = wait_for_status(process, port, timeout=180)
        assert (status["shards"], status["missing_shards"], status["pages_in_index"]) == (2, [], 7)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/api/search", method="POST",
                                         data=json.dumps({"query": QUERIES[0], "k": 3}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as response:
            answer = json.load(response)
        (query,) = embedder.embed_queries([QUERIES[0]], progress=False)
        with open_collection(root / "shards") as local:
            assert [h["page_id"] for h in answer["hits"]] == [h.page_id for h in local.search(query, k=3)]
    finally:
        process.terminate()
        process.wait(timeout=30)
