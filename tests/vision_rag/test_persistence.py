"""Persistence: round trips, format checks, a writer killed with SIGKILL at chosen and random moments
during `add` (the last committed state must stay readable and complete), searches from another
process while one adds, and one writer at a time."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import faiss
import numpy as np
import pytest

from vision_rag.index import Index, IndexFormatError, IndexLockedError

BATCH = 12  # pages per add() call: every committed state holds whole batches only
DIM = 32
REPO = Path(__file__).resolve().parents[2]


def page_vectors(batch: int, page: int) -> np.ndarray:
    rng = np.random.default_rng(1000 * batch + page)
    x = rng.standard_normal((20 + (7 * batch + page) % 13, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


# The writer adds batch after batch forever. Optionally it SIGKILLs itself at the N-th call of one
# step of the commit (fault injection from the outside: the library is not changed).
WRITER = r"""
import os, signal, sys
import numpy as np
sys.path.insert(0, {repo!r})
import vision_rag.index as vi
from tests.vision_rag.test_persistence import BATCH, DIM, page_vectors

directory, phase, at = sys.argv[1], sys.argv[2], int(sys.argv[3])
calls = [0]

def die_at_nth(fn, after=False):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if not after and calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        out = fn(*args, **kwargs)
        if after and calls[0] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        return out
    return wrapped

if phase == "segment-file":            # vectors of the new segment half written
    real_save = vi._save_npy
    def partial_save(path, array):
        calls[0] += 1
        if calls[0] == at:
            with open(path, "wb") as f:
                f.write(b"\x93NUMPY partial")
            os.kill(os.getpid(), signal.SIGKILL)
        real_save(path, array)
    vi._save_npy = partial_save
elif phase == "before-manifest":       # rows committed in SQLite, manifest not yet switched
    vi._write_manifest = die_at_nth(vi._write_manifest)
elif phase == "manifest-rename":       # new manifest written to its temporary name, not renamed
    real_replace = os.replace
    vi.os.replace = die_at_nth(real_replace)
elif phase == "after-manifest":        # committed; old rows and files not yet cleaned
    vi._write_manifest = die_at_nth(vi._write_manifest, after=True)
elif phase == "ann-build":             # while the token index of a segment is written
    vi._write_faiss = die_at_nth(vi._write_faiss)

index = vi.Index.open(directory, create=True, model_id="test-model", dim=DIM, ann="auto",
                      exact_below_pages=3 * BATCH, ann_pq_m=4)
batch = len(index) // BATCH
while True:
    index.add([({{"document_id": f"batch{{batch}}", "page_number": j, "metadata": {{"batch": batch}}}},
                page_vectors(batch, j)) for j in range(BATCH)])
    print(batch, flush=True)
    batch += 1
"""


def start_writer(directory, phase="none", at=0):
    script = WRITER.format(repo=str(REPO))
    return subprocess.Popen(
        [sys.executable, "-c", script, str(directory), phase, str(at)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
    )


def wait_for_batches(proc, n, timeout=60):
    deadline = time.time() + timeout
    seen = -1
    while seen < n - 1:
        line = proc.stdout.readline()
        if not line:
            raise AssertionError(f"writer died early: {proc.stderr.read()[-2000:]}")
        seen = int(line)
        assert time.time() < deadline, "writer too slow"


def check_complete(directory) -> int:
    """The committed state is whole batches 0..n-1 with exactly the vectors written; returns n."""
    index = Index.open(directory)
    pages = index.pages()
    by_batch: dict[int, list] = {}
    for page in pages:
        by_batch.setdefault(page.metadata["batch"], []).append(page)
    n = len(by_batch)
    assert sorted(by_batch) == list(range(n)), sorted(by_batch)
    for batch, batch_pages in by_batch.items():
        assert sorted(p.page_number for p in batch_pages) == list(range(BATCH)), batch
        for p in batch_pages:
            expected = page_vectors(batch, p.page_number).astype(np.float16).astype(np.float32)
            np.testing.assert_array_equal(index.vectors(p.page_id).numpy(), expected)
    if n:
        query = page_vectors(n - 1, 3)[:6]
        assert index.search(query, k=3)[0].page.metadata["batch"] == n - 1
        assert index.search(query, k=3, exact=True)[0].page.metadata["batch"] == n - 1
    index.close()
    return n


@pytest.mark.parametrize(
    "phase,at",
    [
        # Call counts include the manifest written when the index is created.
        ("segment-file", 3),  # during the 3rd add
        ("before-manifest", 3),  # 2nd add
        ("manifest-rename", 3),  # 2nd add
        ("after-manifest", 3),  # 2nd add, after its commit point
        ("ann-build", 2),  # the 3rd add crosses exact_below_pages: killed while indexing its segments
    ],
)
def test_sigkill_at_each_commit_step_keeps_last_commit(tmp_path, phase, at):
    directory = tmp_path / "ix"
    writer = start_writer(directory, phase, at)
    writer.wait(timeout=120)
    assert writer.returncode == -signal.SIGKILL, writer.stderr.read()[-2000:]
    committed = check_complete(directory)
    expected = {"segment-file": 2, "before-manifest": 1, "manifest-rename": 1, "after-manifest": 2, "ann-build": 2}
    assert committed == expected[phase]
    # A new writer cleans up after the dead one and continues with fresh, never reused ids.
    dead_writers_tmp = directory / f"manifest.json.tmp-{writer.pid}"
    writer = start_writer(directory)
    wait_for_batches(writer, committed + 2)
    writer.send_signal(signal.SIGKILL)
    writer.wait()
    assert check_complete(directory) >= committed + 2
    index = Index.open(directory)
    assert len(set(index.page_ids())) == len(index)
    assert {p.name for p in (directory / "data").iterdir()} >= {s.vector_file for s in index.manifest.segments}
    # The second writer is killed at an arbitrary moment and may leave its own temporary manifest;
    # the first one's must be gone.
    assert not dead_writers_tmp.exists()


def test_sigkill_at_random_moments(tmp_path):
    directory = tmp_path / "ix"
    rng = np.random.default_rng(0)
    committed = 0
    for _ in range(4):
        writer = start_writer(directory)
        wait_for_batches(writer, committed + 1)
        time.sleep(float(rng.uniform(0, 0.4)))
        writer.send_signal(signal.SIGKILL)
        writer.wait()
        now = check_complete(directory)
        assert now >= committed + 1
        committed = now


def test_searches_from_another_process_while_adding(tmp_path):
    directory = tmp_path / "ix"
    writer = start_writer(directory)
    try:
        wait_for_batches(writer, 1)
        reader = Index.open(directory)
        sizes, searches = [], 0
        deadline = time.time() + 4
        while time.time() < deadline:
            n = len(reader)
            assert n % BATCH == 0
            sizes.append(n)
            hits = reader.search(page_vectors(0, 5)[:5], k=5)
            assert hits[0].page.metadata == {"batch": 0} and hits[0].page.page_number == 5
            for hit in hits:
                assert reader.vectors(hit.page_id).shape == (hit.page.n_tokens, DIM)
            searches += 1
        assert sizes == sorted(sizes) and sizes[-1] > sizes[0], sizes  # it saw the writer's commits
        assert searches > 5
    finally:
        writer.send_signal(signal.SIGKILL)
        writer.wait()
    check_complete(directory)


def test_round_trip_every_storage(tmp_path):
    for storage in ("fp16", "fp32", "sq8", "pq"):
        directory = tmp_path / storage
        index = Index.open(directory, create=True, model_id="m", dim=DIM, storage=storage, ann="ivf", pq_m=8, ann_pq_m=4)
        ids = index.add([({"document_id": "d", "page_number": j, "metadata": {"k": j}}, page_vectors(0, j)) for j in range(60)])
        index.delete(ids[:2])
        query = page_vectors(0, 9)[:4]
        before = [(h.page_id, h.score, h.page) for h in index.search(query, k=8)]
        vectors_before = index.vectors(ids[7]).numpy()
        index.close()

        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["format"] == "gemma-grounding.vision-index" and manifest["format_version"] == 1
        assert manifest["model_id"] == "m" and manifest["settings"]["storage"] == storage
        files = {p.suffix for p in (directory / "data").iterdir()}
        assert files <= {".npy", ".faiss", ".ivf"}
        for path in (directory / "data").iterdir():  # every file loads without pickle
            if path.suffix == ".npy":
                np.load(path, allow_pickle=False)
            else:
                faiss.read_index(str(path))
        reopened = Index.open(directory, model_id="m")
        assert [(h.page_id, h.score, h.page) for h in reopened.search(query, k=8)] == before
        np.testing.assert_array_equal(reopened.vectors(ids[7]).numpy(), vectors_before)
        assert reopened.page_ids() == ids[2:]


def test_format_errors(tmp_path):
    with pytest.raises(IndexFormatError, match="create=True"):
        Index.open(tmp_path / "missing")
    Index.open(tmp_path / "ix", create=True, model_id="m", dim=4).close()
    manifest_path = tmp_path / "ix" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "format_version": 99}))
    with pytest.raises(IndexFormatError, match="upgrade"):
        Index.open(tmp_path / "ix")
    manifest_path.write_text("{not json")
    with pytest.raises(IndexFormatError, match="not readable"):
        Index.open(tmp_path / "ix")


def test_one_writer_at_a_time(tmp_path):
    first = Index.open(tmp_path / "ix", create=True, model_id="test-model", dim=DIM, ann_pq_m=4)
    first.add([({"document_id": "a"}, page_vectors(0, 0))])
    writer = start_writer(tmp_path / "ix")
    writer.wait(timeout=60)
    assert "IndexLockedError" in writer.stderr.read()
    first.close()
    second = Index.open(tmp_path / "ix")
    second.add([({"document_id": "b"}, page_vectors(0, 1))])
    with pytest.raises(IndexLockedError):
        Index.open(tmp_path / "ix").delete([0])
    assert os.path.exists(tmp_path / "ix" / "LOCK")
