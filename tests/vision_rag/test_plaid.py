"""PLAID storage (``storage="plaid"``): decompression error against the quantisation error theory
allows, the stored bytes per token, search recall against brute-force MaxSim, the centroid-postings
candidates against exact search on the same stored vectors, save/open round trip and the format
version, incremental adds / deletes / updates / transactions / compaction / shards, bad settings,
a format-1 index written by the code from before PLAID and a format-2 PLAID index written by the
code from before 3-bit and mixed-width codes (committed fixtures) opening unchanged, and the code
layout decoded by an independent numpy reader."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from test_index import brute_force, clustered_corpus, queries_from_pages, record, unit_rows

from vision_rag import index as index_module
from vision_rag.index import Index, IndexFormatError, IndexSettingsError, PageNotFoundError
from vision_rag.plaid import PlaidCodec, PlaidSettingsError, lloyd_max
from vision_rag.sharded import ShardedIndex

FIXTURES = Path(__file__).parent / "fixtures"


def gaussian_clusters(n, dim, n_clusters, sigma, seed):
    """Points = one of ``n_clusters`` centres + isotropic Gaussian noise: the residual to the right
    centre is Gaussian by construction, so quantisation theory says what error to expect."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_clusters, dim))
    return (centres[rng.integers(n_clusters, size=n)] + sigma * rng.standard_normal((n, dim))).astype(np.float32)


# Mean squared error of a Gaussian quantised with 2^b buckets, as a fraction of the variance, for the
# optimal (Lloyd-Max) scalar quantiser (Max, 1960: 1 bit 1 - 2/pi = 0.3634, 2 bits 0.1175, 3 bits
# 0.03454, 4 bits 0.009497); 3.5 bits is half the dimensions at 3 and half at 4. For comparison,
# ColBERTv2's equal-probability buckets decoded to their means give 0.3634, 0.1394 and 0.0222 at 1, 2
# and 4 bits: the codec must beat those from 2 bits up. A 25% margin covers k-means leaving a few points
# on a wrong centre and the buckets being fitted on a sample.
GAUSSIAN_MSE_FRACTION = {1: 0.3634, 2: 0.1175, 3: 0.03454, 3.5: (0.03454 + 0.009497) / 2, 4: 0.009497}


@pytest.mark.parametrize("nbits", [1, 2, 3, 3.5, 4])
def test_decompression_error_is_what_the_bits_allow(nbits):
    dim, sigma = 32, 0.05
    points = gaussian_clusters(6000, dim, 16, sigma, seed=int(2 * nbits))
    codec = PlaidCodec.train(points, nbits, n_centroids=64)  # several per cluster: random-init k-means never merges two
    codes = codec.sa_encode(points)
    assert codes.dtype == np.uint8 and codes.shape == (6000, 2 + round(dim * nbits) // 8)  # no per-token page id
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


def unpack_codes(codes, dim_bits, id_bytes=2):
    """The code layout of PlaidCodec's docstring, read bit by bit in numpy (independent of its tables):
    centroid id (little-endian), then one section per width, widest first, dimensions ascending; a 3-bit
    section is a 2-bit plane of the low bits then a 1-bit plane of the high bits. -> (ids, buckets)."""
    ids = sum(codes[:, i].astype(np.int64) << (8 * i) for i in range(id_bytes))
    bits = np.unpackbits(codes[:, id_bytes:], axis=1, bitorder="little").astype(np.int64)
    buckets = np.zeros((len(codes), len(dim_bits)), dtype=np.int64)
    position = 0
    for width in sorted(set(dim_bits.tolist()), reverse=True):
        dims = np.flatnonzero(dim_bits == width)
        planes = [(width, 0)] if width != 3 else [(2, 0), (1, 2)]
        for plane_bits, shift in planes:
            for i, d in enumerate(dims):
                for j in range(plane_bits):
                    buckets[:, d] |= bits[:, position + i * plane_bits + j] << (shift + j)
            position += len(dims) * plane_bits
    assert position == bits.shape[1]
    return ids, buckets


@pytest.mark.parametrize("nbits", [1, 2, 3, 3.5, 3.75, 4])
def test_code_layout_against_an_independent_reader(nbits):
    dim = 64 if nbits == 3.75 else 32  # 3.75 needs a multiple of 8 dimensions at each width: 48 + 16
    rng = np.random.default_rng(3)
    # Anisotropic residuals, so the mixed widths go to particular dimensions (the widest variances).
    points = (rng.standard_normal((16, dim))[rng.integers(16, size=3000)]
              + 0.05 * rng.standard_normal((3000, dim)) * np.linspace(0.5, 2, dim)[rng.permutation(dim)]).astype(np.float32)
    codec = PlaidCodec.train(points, nbits, n_centroids=32)
    assert codec.dim_bits.mean() == nbits and sorted(set(codec.dim_bits.tolist())) == sorted({int(np.floor(nbits)), int(np.ceil(nbits))})
    if nbits % 1:  # the extra bit went to the dimensions whose residuals vary most
        residuals = points - codec.centroids[codec.centroid_ids(codec.sa_encode(points))]
        wide = codec.dim_bits == np.ceil(nbits)
        assert residuals.var(axis=0)[wide].min() >= residuals.var(axis=0)[~wide].max()
    codes = codec.sa_encode(points)
    ids, buckets = unpack_codes(codes, codec.dim_bits)
    nearest = np.argmin(((points[:, None, :] - codec.centroids[None]) ** 2).sum(-1), axis=1)
    np.testing.assert_array_equal(ids, nearest)
    residuals = points - codec.centroids[ids]
    expected_buckets = np.stack([np.searchsorted(codec.cutoffs[d], residuals[:, d], side="left") for d in range(dim)], 1)
    np.testing.assert_array_equal(buckets, expected_buckets)
    assert buckets.max(axis=0).max() < 1 << int(np.ceil(nbits)) and (buckets < (1 << codec.dim_bits)).all()
    expected = codec.centroids[ids] + codec.values[np.arange(dim), buckets]
    np.testing.assert_allclose(codec.sa_decode(codes), expected, atol=1e-6)
    # MaxSim straight from the codes equals MaxSim of the decoded vectors.
    query = rng.standard_normal((5, dim)).astype(np.float32)
    offsets = np.array([0, 1000, 1700, 3000])
    direct = codec.maxsim([query], codes, offsets)[0]
    reference = [(query @ expected[a:b].T).max(axis=1).sum() for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
    np.testing.assert_allclose(direct, reference, rtol=1e-5, atol=1e-4)


def test_lloyd_max_buckets_never_raise_the_error():
    rng = np.random.default_rng(4)
    residuals = np.concatenate([rng.standard_normal((4000, 8)), rng.laplace(size=(4000, 8)) * 3], axis=1).astype(np.float32)
    for width in (1, 2, 3, 4):
        dim_bits = np.full(16, width)
        errors = []
        for iterations in (0, 5, 20):  # 0: ColBERTv2's equal-probability buckets decoded to their means
            cutoffs, values = lloyd_max(residuals, dim_bits, iterations=iterations)
            assert (np.diff(values[:, : 1 << width], axis=1) >= 0).all()
            assert np.isinf(cutoffs[:, (1 << width) - 1 :]).all()
            buckets = np.stack([np.searchsorted(cutoffs[d], residuals[:, d]) for d in range(16)], 1)
            errors.append(((values[np.arange(16), buckets] - residuals) ** 2).mean(axis=0))
        assert (errors[1] <= errors[0] * (1 + 1e-5)).all() and (errors[2] <= errors[1] * (1 + 1e-5)).all()
        if width >= 2:  # on heavy-tailed Laplace residuals the equal-probability tails are far too wide
            assert errors[2][8:].mean() < 0.9 * errors[0][8:].mean()


def test_bad_nbits_and_too_little_data_are_typed_errors(tmp_path):
    for bad in (0, 5, 0.5, "2", True, None):
        with pytest.raises(IndexSettingsError, match=f"plaid_nbits={bad!r}"):
            Index.open(tmp_path / "ix", create=True, model_id="m", dim=16, storage="plaid", plaid_nbits=bad)
    with pytest.raises(IndexSettingsError, match="multiples of 8"):  # 3.3 x 128 is not whole dimensions
        Index.open(tmp_path / "ix", create=True, model_id="m", dim=128, storage="plaid", plaid_nbits=3.3)
    with pytest.raises(IndexSettingsError, match="multiples of 8"):  # 3.75 x 16 = 12 dimensions at 4 bits
        Index.open(tmp_path / "ix", create=True, model_id="m", dim=16, storage="plaid", plaid_nbits=3.75)
    assert not (tmp_path / "ix").exists()
    with pytest.raises(PlaidSettingsError, match="plaid_nbits=0"):
        PlaidCodec.train(np.zeros((1000, 16), np.float32), 0)
    with pytest.raises(PlaidSettingsError, match="not a multiple"):
        PlaidCodec.train(np.zeros((1000, 18), np.float32), 2)
    with pytest.raises(PlaidSettingsError, match="codes of shape"):
        PlaidCodec.train(np.random.default_rng(0).standard_normal((1000, 16)).astype(np.float32), 3).sa_decode(
            np.zeros((4, 5), np.uint8))
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
@pytest.mark.parametrize(("nbits", "min_recall"), [(2, 0.8), (3, 0.85), (4, 0.85)])
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


def test_format_2_plaid_index_from_older_code_opens_unchanged(tmp_path):
    """A 2-bit PLAID index written before widths could mix (quantile buckets, scalar ``nbits`` in the
    codec file) decodes to exactly what the code that wrote it returned, searches the same, and stays
    format 2 when pages are added (so that code still reads it)."""
    directory = tmp_path / "v2"
    shutil.copytree(FIXTURES / "index_v2_plaid", directory)
    with np.load(FIXTURES / "index_v2_plaid_expected.npz", allow_pickle=False) as data:
        expected = {name: data[name] for name in data.files}
    index = Index.open(directory)
    assert index.page_ids() == expected["page_ids"].tolist() and 3 not in index.page_ids()
    for pid, vectors in zip(expected["page_ids"], expected["decoded"], strict=True):
        np.testing.assert_array_equal(index.vectors(int(pid)).numpy(), vectors)
    hits = index.search(expected["query"], k=3)
    assert [h.page_id for h in hits] == expected["hit_ids"].tolist()
    np.testing.assert_allclose([h.score for h in hits], expected["hit_scores"], rtol=1e-6)
    # The decoded vectors are within the 2-bit error of the inputs (the fixture is not all zeros).
    error = np.linalg.norm(expected["decoded"] - expected["inputs"][expected["page_ids"]], axis=-1)
    assert 0.01 < error.mean() < 0.5
    index.add([({"document_id": "new"}, expected["inputs"][3])])
    index.close()
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format_version"] == 2 and manifest["settings"]["plaid_nbits"] == 2
    reopened = Index.open(directory)
    assert reopened.page_ids()[-1] == 24
    added = reopened.vectors(24).numpy()  # encoded by the old codec: within its error of the input
    assert np.linalg.norm(added - expected["inputs"][3], axis=-1).mean() < 0.5
    reopened.close()


@pytest.mark.parametrize("nbits", [3, 3.75])
def test_3_bit_and_mixed_width_indexes_are_format_3(tmp_path, nbits):
    pages = clustered_corpus(60, 20, 64, 6, seed=12)
    index, ids = build(tmp_path, pages, plaid_nbits=nbits, rerank=16)
    query = queries_from_pages(pages, 1, 4, seed=13)[0]
    before = [(h.page_id, h.score) for h in index.search(query, k=5)]
    stored = index.vectors(ids[7]).numpy()
    error = np.linalg.norm(stored - pages[7], axis=1).mean()
    assert error < 0.3 * np.linalg.norm(pages[7], axis=1).mean()  # decoded near the input
    index.close()
    directory = tmp_path / "ix"
    manifest = json.loads((directory / "manifest.json").read_text())
    assert manifest["format_version"] == 3 and manifest["settings"]["plaid_nbits"] == nbits
    with np.load(directory / "data" / manifest["codec_file"], allow_pickle=False) as codec_file:
        assert ("dim_bits" in codec_file.files) == (nbits % 1 != 0)
    reopened = Index.open(directory)
    assert [(h.page_id, h.score) for h in reopened.search(query, k=5)] == before
    np.testing.assert_array_equal(reopened.vectors(ids[7]).numpy(), stored)
    reopened.close()
    original = index_module.FORMAT_VERSION
    index_module.FORMAT_VERSION = 2  # code that reads up to format 2 refuses it
    try:
        with pytest.raises(IndexFormatError, match="upgrade"):
            Index.open(directory)
    finally:
        index_module.FORMAT_VERSION = original
