"""PLAID storage (``storage="plaid"``): decompression error against the quantisation error theory
allows, the stored bytes per token, search recall against brute-force MaxSim, the centroid-postings
candidates against exact search on the same stored vectors, save/open round trip and the format
version, incremental adds / deletes / updates / transactions / compaction / shards, bad settings,
and a format-1 index written by the code from before PLAID (committed fixture) opening unchanged."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_index import brute_force, clustered_corpus, queries_from_pages, record, unit_rows

from vision_rag import index as index_module
from vision_rag.index import Index, IndexFormatError, IndexSettingsError, PageNotFoundError
from vision_rag.plaid import PlaidCodec, PlaidSettingsError
from vision_rag.sharded import ShardedIndex

FIXTURES = Path(__file__).parent / "fixtures"


def gaussian_clusters(n, dim, n_clusters, sigma, seed):
    """Points = one of ``n_clusters`` centres + isotropic Gaussian noise: the residual to the right
    centre is Gaussian by construction, so quantisation theory says what error to expect."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    return (centres[rng.integers(n_clusters, size=n)] + sigma * rng.standard_normal((n, dim))).astype(np.float32)


# Mean squared error of a Gaussian quantised with 2^b equal-probability buckets, each decoded to its
# conditional mean, as a fraction of the variance (closed form: 1 - sum over buckets of p * E[x|bucket]^2;
# e.g. 1 bit: 1 - 2/pi = 0.363). A 25% margin covers k-means leaving a few points on a wrong centre and
# the quantiles being estimated from a sample.
GAUSSIAN_MSE_FRACTION = {1: 0.3634, 2: 0.1394, 4: 0.0222}


@pytest.mark.parametrize("nbits", [1, 2, 4])
def test_decompression_error_is_what_the_bits_allow(nbits):
    dim, sigma = 32, 0.05
    points = gaussian_clusters(6000, dim, 16, sigma, seed=nbits)
    codec = PlaidCodec.train(points, nbits, n_centroids=64)  # several per cluster: random-init k-means never merges two
    codes = codec.sa_encode(points)
    assert codes.dtype == np.uint8 and codes.shape == (6000, 2 + dim * nbits // 8)  # no per-token page id
    decoded = codec.sa_decode(codes)
    mse_fraction = float(((decoded - points) ** 2).mean() / sigma**2)
    assert mse_fraction <= 1.25 * GAUSSIAN_MSE_FRACTION[nbits], mse_fraction
    # Against the fp16 vectors an index would otherwise store: unit vectors 0.05-0.1 apart (fp16
    # rounding is ~5e-4, so this is the codec's error).
    unit = points / np.linalg.norm(points, axis=1, keepdims=True)
    unit_codec = PlaidCodec.train(unit, nbits, n_centroids=64)
    error = np.linalg.norm(unit_codec.sa_decode(unit_codec.sa_encode(unit)) - unit.astype(np.float16), axis=1)
    expected_rms = np.sqrt(GAUSSIAN_MSE_FRACTION[nbits] * dim) * sigma / np.linalg.norm(points, axis=1).mean()
    assert np.sqrt((error**2).mean()) <= 1.25 * expected_rms


def test_bad_nbits_and_too_little_data_are_typed_errors(tmp_path):
    with pytest.raises(IndexSettingsError, match="plaid_nbits=3"):
        Index.open(tmp_path / "ix", create=True, model_id="m", dim=16, storage="plaid", plaid_nbits=3)
    with pytest.raises(PlaidSettingsError, match="plaid_nbits=0"):
        PlaidCodec.train(np.zeros((1000, 16), np.float32), 0)
    with pytest.raises(PlaidSettingsError, match="not a multiple"):
        PlaidCodec.train(np.zeros((1000, 18), np.float32), 2)
    with pytest.raises(IndexSettingsError, match="own centroid postings"):
        Index.open(tmp_path / "h", create=True, model_id="m", dim=16, storage="plaid", ann="hnsw")
    index = Index.open(tmp_path / "small", create=True, model_id="m", dim=16, storage="plaid")
    with pytest.raises(IndexSettingsError, match="at least"):
        index.add([(record(0), np.ones((5, 16), np.float32))])


def build(tmp_path, pages, name="ix", **settings):
    index = Index.open(tmp_path / name, create=True, model_id="m", dim=pages[0].shape[1], storage="plaid",
                       ann="ivf", exact_below_pages=0, plaid_centroids=64, **settings)
    return index, index.add([(record(i), p) for i, p in enumerate(pages)])


def visual_words_corpus(n_pages, n_tokens, dim, n_topics, seed):
    """bench_maxsim.py's corpus in small: 16 'visual words' per topic (0.8 off the topic direction),
    70% of a page's tokens from its main topic, per-token noise of norm 0.35 (what tells pages of one
    topic apart, so what the residual codes must keep)."""
    rng = np.random.default_rng(seed)
    topics = unit_rows(rng.standard_normal((n_topics, dim)))
    words = unit_rows(topics[:, None, :] + 0.8 * unit_rows(rng.standard_normal((n_topics, 16, dim))))
    pages = []
    for _ in range(n_pages):
        topic = np.where(rng.random(n_tokens) < 0.7, rng.integers(n_topics), rng.integers(n_topics, size=n_tokens))
        noise = 0.35 / np.sqrt(dim) * rng.standard_normal((n_tokens, dim))
        pages.append(unit_rows(words[topic, rng.integers(16, size=n_tokens)] + noise).astype(np.float32))
    return pages


def top10(query, pages):
    """Exact MaxSim top 10 of equal-length pages, float64, by definition (independent of vision_rag.scoring)."""
    sims = torch.einsum("qd,ptd->pqt", torch.from_numpy(query).double(), torch.from_numpy(np.stack(pages)).double())
    return set(torch.topk(sims.amax(dim=2).sum(dim=1), 10).indices.tolist())


# Measured recall@10 against the uncompressed pages on this corpus (dim 32, 64 centroids): 0.90 at 2
# bits, 0.94 at 4 bits, 0.78 at 1 bit. The floors leave ~0.1 for seeds and BLAS differences; a codec
# that mixed up dimensions or buckets falls to ~0.3.
@pytest.mark.parametrize(("nbits", "min_recall"), [(2, 0.8), (4, 0.85)])
def test_search_recall_and_candidates(tmp_path, nbits, min_recall):
    pages = visual_words_corpus(240, 30, 32, 12, seed=5)
    index, ids = build(tmp_path, pages, plaid_nbits=nbits)
    assert ids == list(range(240))
    stored = [index.vectors(pid).numpy() for pid in ids]
    recall_original, recall_stored = [], []
    for query in queries_from_pages(pages, 12, 6, seed=6, noise=0.25):
        found = {h.page_id for h in index.search(query, k=10)}
        recall_stored.append(len(found & top10(query, stored)) / 10)
        recall_original.append(len(found & top10(query, pages)) / 10)
    # Candidates from centroid postings + exact rerank lose almost nothing against exhaustive search
    # on the same stored vectors (measured 1.0).
    assert np.mean(recall_stored) >= 0.95, recall_stored
    assert np.mean(recall_original) >= min_recall, recall_original
    # Exhaustive search scores the decompressed vectors: brute force on them gives the same scores.
    query = queries_from_pages(pages, 1, 6, seed=7, noise=0.25)[0]
    exact = index.search(query, k=5, exact=True)
    expected = brute_force(query, dict(enumerate(stored)), 5)
    assert [h.page_id for h in exact] == [p for p, _ in expected]
    np.testing.assert_allclose([h.score for h in exact], [s for _, s in expected], atol=1e-4)


def test_round_trip_changes_and_format_version(tmp_path):
    pages = clustered_corpus(80, 20, 16, 6, seed=7)
    index, ids = build(tmp_path, pages[:60], rerank=16)
    index.delete(ids[:2])
    late = index.add([(record(60 + i), p) for i, p in enumerate(pages[60:])])  # encoded by the trained codec
    assert late == list(range(60, 80))
    query = queries_from_pages(pages[60:], 1, 4, seed=8)[0]
    before = [(h.page_id, h.score, h.page) for h in index.search(query, k=8)]
    assert before[0][0] >= 60  # the source page is one of the pages added after training
    vectors_before = index.vectors(late[3]).numpy()
    index.close()

    directory = tmp_path / "ix"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["settings"]["storage"] == "plaid"
    assert manifest["codec_file"].endswith(".npz") and all(s["ann_file"].endswith(".postings.npz") for s in manifest["segments"])
    for path in (directory / "data").iterdir():  # every file loads without pickle
        (np.load(path, allow_pickle=False).close() if path.suffix == ".npz" else np.load(path, allow_pickle=False))
    reopened = Index.open(directory, model_id="m", storage="plaid")
    assert [(h.page_id, h.score, h.page) for h in reopened.search(query, k=8)] == before
    np.testing.assert_array_equal(reopened.vectors(late[3]).numpy(), vectors_before)
    assert reopened.page_ids() == ids[2:] + late
    with pytest.raises(PageNotFoundError):
        reopened.vectors(ids[0])

    # Update, a rolled-back transaction, then compaction: searches see exactly the committed pages.
    reopened.update(late[0], vectors=pages[5])
    with pytest.raises(RuntimeError), reopened.transaction():
        reopened.delete(late[1:])
        raise RuntimeError("roll back")
    reopened.compact()
    assert len(json.loads((directory / "manifest.json").read_text())["segments"]) == 1
    assert reopened.page_ids() == ids[2:] + late
    hits = reopened.search(queries_from_pages(pages[5:6], 1, 4, seed=9)[0], k=3)
    assert {ids[5], late[0]} <= {h.page_id for h in hits}  # page 5's vectors now under two ids
    # Code that reads only format 1 refuses this index instead of misreading it.
    reopened.close()
    original = index_module.FORMAT_VERSION
    index_module.FORMAT_VERSION = 1
    try:
        with pytest.raises(IndexFormatError, match="upgrade"):
            Index.open(directory)
    finally:
        index_module.FORMAT_VERSION = original


def test_sharded_plaid(tmp_path):
    pages = clustered_corpus(90, 20, 16, 6, seed=10)
    sharded = ShardedIndex.open(tmp_path / "sh", create=True, shards=2, model_id="m", dim=16, storage="plaid",
                                ann="ivf", exact_below_pages=0, plaid_centroids=16)
    ids = sharded.add([(record(i), p) for i, p in enumerate(pages)])
    query = queries_from_pages(pages, 1, 5, seed=11)[0]
    approx = [h.page_id for h in sharded.search(query, k=5)]
    exact = [h.page_id for h in sharded.search(query, k=5, exact=True)]
    assert approx == exact
    sharded.delete([exact[0]])
    assert exact[0] not in [h.page_id for h in sharded.search(query, k=5)]
    assert len(ids) == 90


def test_format_1_index_from_older_code_opens_unchanged(tmp_path):
    directory = tmp_path / "v1"
    shutil.copytree(FIXTURES / "index_v1", directory)
    inputs = np.load(FIXTURES / "inputs.npy", allow_pickle=False)
    index = Index.open(directory, model_id="fixture-model")
    assert index.page_ids() == [0, 2, 3, 4, 5]  # page 1 was deleted by the writer
    for pid in index.page_ids():
        np.testing.assert_array_equal(index.vectors(pid).numpy(), inputs[pid].astype(np.float16).astype(np.float32))
    assert index.get(3).metadata == {"n": 3} and index.get(4).document_id == "doc9"
    hits = index.search(torch.from_numpy(inputs[2][:3]), k=2)
    assert hits[0].page_id == 2
    index.add([({"document_id": "new"}, inputs[1])])
    index.close()
    assert json.loads((directory / "manifest.json").read_text())["format_version"] == 1  # still readable by old code
    assert Index.open(directory).page_ids() == [0, 2, 3, 4, 5, 6]
