"""Index search against brute-force MaxSim over the stored pages, approximate recall, storage codecs,
token pooling, delete/update id stability, metadata filters and model/settings checks."""

import numpy as np
import pytest
import torch

from vision_rag.index import (
    Index,
    IndexSettingsError,
    ModelMismatchError,
    PageNotFoundError,
    SearchFilter,
    pool_tokens,
)


def unit_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def clustered_corpus(n_pages, n_tokens, dim, n_topics, seed):
    """Pages made of 'visual words' of a main topic (70%) and random other topics (30%), plus noise."""
    rng = np.random.default_rng(seed)
    topics = unit_rows(rng.standard_normal((n_topics, dim)))
    words = unit_rows(topics[:, None, :] + 0.6 * unit_rows(rng.standard_normal((n_topics, 32, dim))))
    pages = []
    for _ in range(n_pages):
        main = rng.integers(n_topics)
        topic_of_token = np.where(rng.random(n_tokens) < 0.7, main, rng.integers(n_topics, size=n_tokens))
        chosen = words[topic_of_token, rng.integers(32, size=n_tokens)]
        pages.append(unit_rows(chosen + 0.25 * rng.standard_normal((n_tokens, dim)) / np.sqrt(dim) * 4).astype(np.float32))
    return pages


def queries_from_pages(pages, n_queries, n_tokens, seed, noise=1.2):
    """A query is a few tokens of one page, perturbed by noise of norm about ``noise``: its source page
    and its neighbours should rank high."""
    rng = np.random.default_rng(seed)
    out = []
    for p in rng.choice(len(pages), n_queries, replace=False):
        tokens = pages[p][rng.choice(len(pages[p]), n_tokens, replace=False)]
        out.append(unit_rows(tokens + noise * rng.standard_normal(tokens.shape) / np.sqrt(tokens.shape[1])).astype(np.float32))
    return out


def brute_force(query, pages_by_id, k):
    """Definition of MaxSim, page by page, float64; returns [(page_id, score)] best first."""
    q = torch.from_numpy(query).double()
    scored = [(pid, float((q @ torch.as_tensor(v).double().T).max(dim=1).values.sum())) for pid, v in pages_by_id.items()]
    return sorted(scored, key=lambda t: (-t[1], t[0]))[:k]


def record(i, **extra):
    return {"document_id": f"doc{i // 4}", "page_number": i % 4, "source_path": f"/archive/doc{i // 4}.pdf", **extra}


def test_exact_search_equals_brute_force(tmp_path):
    pages = clustered_corpus(60, 30, 32, 6, seed=0)
    index = Index.open(tmp_path / "ix", create=True, model_id="test-model", dim=32, storage="fp32", ann="exact")
    ids = index.add([(record(i), p) for i, p in enumerate(pages)])
    assert ids == list(range(60))
    for query in queries_from_pages(pages, 5, 7, seed=1):
        expected = brute_force(query, dict(zip(ids, pages, strict=True)), 10)
        hits = index.search(torch.from_numpy(query), k=10)
        assert [h.page_id for h in hits] == [pid for pid, _ in expected]
        # fp32 sums of 7 products of 32-term dot products: ~1e-6 error.
        np.testing.assert_allclose([h.score for h in hits], [s for _, s in expected], rtol=0, atol=1e-5)
        np.testing.assert_allclose([h.normalized_score for h in hits], [s / 7 for _, s in expected], atol=1e-6)
        assert hits[0].page.document_id == f"doc{hits[0].page_id // 4}"
    # Several queries at once give the same answers as one at a time.
    queries = queries_from_pages(pages, 3, 5, seed=2)
    together = index.search([torch.from_numpy(q) for q in queries], k=4)
    assert [[h.page_id for h in hs] for hs in together] == [[h.page_id for h in index.search(q, k=4)] for q in queries]


def test_fp16_storage_scores_rounded_vectors(tmp_path):
    pages = clustered_corpus(20, 12, 16, 3, seed=3)
    index = Index.open(tmp_path / "ix", create=True, model_id="m", dim=16)  # default storage fp16
    ids = index.add([(record(i), p) for i, p in enumerate(pages)])
    rounded = {pid: p.astype(np.float16).astype(np.float32) for pid, p in zip(ids, pages, strict=True)}
    for pid in ids:
        np.testing.assert_array_equal(index.vectors(pid).numpy(), rounded[pid])
    query = queries_from_pages(pages, 1, 4, seed=4)[0]
    expected = brute_force(query, rounded, 5)
    hits = index.search(query, k=5)
    assert [h.page_id for h in hits] == [pid for pid, _ in expected]


@pytest.mark.parametrize("ann", ["ivf", "hnsw"])
def test_approximate_search_recall_against_exact(tmp_path, ann):
    pages = clustered_corpus(700, 40, 64, 40, seed=5)
    index = Index.open(tmp_path / ann, create=True, model_id="m", dim=64, ann=ann, exact_below_pages=0, ann_pq_m=8)
    ids = index.add([(record(i), p) for i, p in enumerate(pages[:400])])
    index.add([(record(i), p) for i, p in enumerate(pages[400:], start=400)])  # a second segment
    assert ids[0] == 0 and len(index) == 700
    assert all(s.ann_file for s in index.manifest.segments)
    recalls = []
    for query in queries_from_pages(pages, 30, 12, seed=6):
        exact = {h.page_id for h in index.search(query, k=10, exact=True)}
        approx = {h.page_id for h in index.search(query, k=10)}
        recalls.append(len(exact & approx) / 10)
    assert np.mean(recalls) >= 0.95, recalls


def test_auto_switches_to_ann_above_threshold(tmp_path):
    pages = clustered_corpus(90, 30, 32, 5, seed=7)
    index = Index.open(tmp_path / "ix", create=True, model_id="m", dim=32, ann="auto", exact_below_pages=50, ann_pq_m=4)
    index.add([(record(i), p) for i, p in enumerate(pages[:40])])
    assert index.manifest.ann_template_file is None  # below the crossover: exhaustive only
    index.add([(record(i), p) for i, p in enumerate(pages[40:], start=40)])
    assert index.manifest.ann_template_file is not None
    assert all(s.ann_file for s in index.manifest.segments)  # the earlier segment was indexed too


@pytest.mark.parametrize("storage,min_cosine", [("sq8", 0.995), ("pq", 0.9)])
def test_codec_storage_reconstructs_and_ranks(tmp_path, storage, min_cosine):
    pages = clustered_corpus(120, 40, 64, 8, seed=8)
    index = Index.open(tmp_path / storage, create=True, model_id="m", dim=64, storage=storage, ann="exact", pq_m=16)
    ids = index.add([(record(i), p) for i, p in enumerate(pages)])
    stored_bytes = np.load(next((tmp_path / storage / "data").glob("seg-*.npy")), mmap_mode="r")
    # sq8: one byte per dimension; pq: 1 byte of coarse list id (4800 // 39 = 123 lists) + pq_m=16 bytes.
    assert stored_bytes.dtype == np.uint8 and stored_bytes.shape == (120 * 40, 64 if storage == "sq8" else 17)
    for pid in ids[:10]:
        decoded = index.vectors(pid).numpy()
        cosine = (unit_rows(decoded) * pages[pid]).sum(1)
        assert cosine.min() >= min_cosine
    # Exact search over decoded vectors equals brute force over the decoded vectors.
    decoded_pages = {pid: index.vectors(pid).numpy() for pid in ids}
    query = queries_from_pages(pages, 1, 8, seed=9)[0]
    assert [h.page_id for h in index.search(query, k=5)] == [pid for pid, _ in brute_force(query, decoded_pages, 5)]


def test_pq_codec_needs_enough_training_vectors(tmp_path):
    index = Index.open(tmp_path / "ix", create=True, model_id="m", dim=16, storage="pq", pq_m=4)
    with pytest.raises(IndexSettingsError, match="needs at least"):
        index.add([(record(0), np.ones((10, 16), np.float32))])


def test_pool_tokens_keeps_cluster_means():
    rng = np.random.default_rng(10)
    centres = unit_rows(rng.standard_normal((3, 16))) * 5
    tokens = np.concatenate([c + 0.01 * rng.standard_normal((4, 16)) for c in centres]).astype(np.float32)
    pooled = pool_tokens(tokens, pool_factor=4)  # groups of neighbouring tokens, as patches of a region
    assert pooled.shape == (3, 16)
    expected = np.stack([tokens[i * 4 : i * 4 + 4].mean(0) for i in range(3)])
    order = [int(np.argmin(((expected - p) ** 2).sum(1))) for p in pooled]
    assert sorted(order) == [0, 1, 2]
    np.testing.assert_allclose(pooled, expected[order], atol=1e-5)


def test_pool_factor_stores_fewer_vectors(tmp_path):
    pages = clustered_corpus(10, 31, 16, 2, seed=11)
    index = Index.open(tmp_path / "ix", create=True, model_id="m", dim=16, pool_factor=3)
    ids = index.add([(record(i), p) for i, p in enumerate(pages)])
    for pid in ids:
        assert 1 <= index.get(pid).n_tokens <= 11 and index.vectors(pid).shape[1] == 16


def test_delete_and_update_keep_ids_stable(tmp_path):
    pages = clustered_corpus(8, 10, 16, 2, seed=12)
    index = Index.open(tmp_path / "ix", create=True, model_id="m", dim=16)
    ids = index.add([(record(i), p) for i, p in enumerate(pages[:6])])
    index.delete([ids[1]])
    index.update(ids[3], metadata={"reviewed": True})
    replacement = clustered_corpus(1, 5, 16, 1, seed=13)[0]
    index.update(ids[4], vectors=replacement, page_number=9)
    assert index.page_ids() == [0, 2, 3, 4, 5]
    assert index.add([(record(6), pages[6])]) == [6]  # never reuses the deleted id 1
    assert index.get(3).metadata == {"reviewed": True} and index.get(3).document_id == "doc0"
    assert index.get(4).page_number == 9 and index.get(4).n_tokens == 5
    np.testing.assert_array_equal(index.vectors(4).numpy(), replacement.astype(np.float16).astype(np.float32))
    np.testing.assert_array_equal(index.vectors(5).numpy(), pages[5].astype(np.float16).astype(np.float32))
    with pytest.raises(PageNotFoundError):
        index.get(1)
    with pytest.raises(PageNotFoundError):
        index.delete([1])
    for query in queries_from_pages(pages, 4, 3, seed=14):
        assert 1 not in {h.page_id for h in index.search(query, k=10)}
    index.compact()  # merging segments renumbers nothing either
    assert index.page_ids() == [0, 2, 3, 4, 5, 6] and index.get(4).n_tokens == 5
    np.testing.assert_array_equal(index.vectors(6).numpy(), pages[6].astype(np.float16).astype(np.float32))


def test_staged_changes_commit_together(tmp_path):
    pages = clustered_corpus(4, 6, 8, 2, seed=15)
    index = Index.open(tmp_path / "ix", create=True, model_id="m", dim=8, autocommit=False)
    ids = index.add([(record(i), p) for i, p in enumerate(pages)])
    reader = Index.open(tmp_path / "ix")
    assert len(reader) == 0  # nothing visible before commit
    index.commit()
    assert len(reader) == 4 and reader.generation == 1
    index.delete(ids[:2])
    assert len(reader) == 4
    index.save()
    assert reader.page_ids() == ids[2:]


def test_filters(tmp_path):
    pages = clustered_corpus(12, 8, 16, 3, seed=16)
    records = [
        {"document_id": "report", "source_path": "/data/2024_q1/report.pdf", "metadata": {"year": 2024, "lang": "en"}},
        {"document_id": "report", "source_path": "/data/2024_q1/report.pdf", "metadata": {"year": 2024, "lang": "de"}},
        {"document_id": "memo", "source_path": "/data/2024%x/memo.pdf", "metadata": {"year": 2023, "lang": "en", "draft": True}},
        {"document_id": "memo", "source_path": "/data/2024%x/memo.pdf", "metadata": {"year": "2023", "draft": False}},
        {"document_id": "scan", "source_path": "/other/scan.tif", "metadata": {"year": 2024.0, "lang": None}},
        {"document_id": "scan", "source_path": "/data/2024Aq1/scan.tif", "metadata": {"draft": 1}},
    ] * 2
    index = Index.open(tmp_path / "ix", create=True, model_id="m", dim=16)
    ids = index.add(list(zip(records, pages, strict=True)))
    query = queries_from_pages(pages, 1, 4, seed=17)[0]

    def check(filter, predicate):
        expected_ids = [pid for pid, r in zip(ids, records, strict=True) if predicate(r)]
        expected = brute_force(query, {p: pages[p].astype(np.float16) for p in expected_ids}, 100)
        got = index.search(query, k=100, filter=filter)
        assert [h.page_id for h in got] == [pid for pid, _ in expected], filter

    meta = lambda r, k: r["metadata"].get(k, "<absent>")
    check({"document_id": "memo"}, lambda r: r["document_id"] == "memo")
    check(SearchFilter(document_id=["memo", "scan"]), lambda r: r["document_id"] in ("memo", "scan"))
    # '_' and '%' in a prefix are literal characters, not SQL wildcards.
    check({"source_path_prefix": "/data/2024_q"}, lambda r: r["source_path"].startswith("/data/2024_q"))
    check({"source_path_prefix": "/data/2024%"}, lambda r: r["source_path"].startswith("/data/2024%"))
    check({"metadata": {"year": 2024}}, lambda r: meta(r, "year") in (2024, 2024.0) and not isinstance(meta(r, "year"), str))
    check({"metadata": {"year": "2023"}}, lambda r: meta(r, "year") == "2023")
    check({"metadata": {"draft": True}}, lambda r: meta(r, "draft") is True)
    check({"metadata": {"draft": 1}}, lambda r: meta(r, "draft") == 1 and not isinstance(meta(r, "draft"), bool))
    check({"metadata": {"lang": None}}, lambda r: meta(r, "lang") is None)
    check({"document_id": "report", "metadata": {"lang": "en"}}, lambda r: r["document_id"] == "report" and meta(r, "lang") == "en")
    got = index.search(query, k=100, filter={"page_ids": [0, 5, 11, 99]})
    assert sorted(h.page_id for h in got) == [0, 5, 11]
    with pytest.raises(ValueError):
        index.search(query, filter={"documentid": "x"})


def test_model_and_settings_are_remembered(tmp_path):
    Index.open(tmp_path / "ix", create=True, model_id="vidore/colpali-v1.3", dim=8, storage="sq8").close()
    with pytest.raises(ModelMismatchError, match="vidore/colpali-v1.3"):
        Index.open(tmp_path / "ix", model_id="vidore/colpali-v1.2")
    with pytest.raises(IndexSettingsError, match="storage"):
        Index.open(tmp_path / "ix", storage="fp16")
    with pytest.raises(IndexSettingsError, match=r"\(n_tokens, 8\)"):
        Index.open(tmp_path / "ix").add([(record(0), np.ones((3, 16), np.float32))])  # 16 != 8
    reopened = Index.open(tmp_path / "ix", model_id="vidore/colpali-v1.3", nprobe=4)
    assert reopened.settings.storage == "sq8" and reopened.settings.nprobe == 4 and reopened.dim == 8
