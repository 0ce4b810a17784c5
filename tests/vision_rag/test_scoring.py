"""Exact MaxSim against the definition computed directly (float64 loops), odd shapes, chunk edges."""

import numpy as np
import pytest
import torch

from vision_rag.scoring import ScoringError, maxsim, maxsim_packed, pack_pages, top_k


def reference_maxsim(queries, pages):
    """The definition, one (query, page) pair at a time, in float64."""
    out = torch.empty(len(queries), len(pages), dtype=torch.float64)
    for i, q in enumerate(queries):
        for j, d in enumerate(pages):
            out[i, j] = (q.double() @ d.double().T).max(dim=1).values.sum()
    return out


def random_unit(n, dim, generator):
    x = torch.randn(n, dim, generator=generator)
    return x / x.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("chunk_tokens", [1, 7, 50, 100_000])
def test_packed_matches_definition_variable_lengths(chunk_tokens):
    g = torch.Generator().manual_seed(0)
    pages = [random_unit(n, 24, g) for n in (5, 1, 17, 33, 17, 17, 2, 40)]
    queries = [random_unit(n, 24, g) for n in (3, 1, 9)]
    vectors, offsets = pack_pages(pages, dtype=np.float32)
    got = maxsim_packed(queries, vectors, offsets, chunk_tokens=chunk_tokens)
    # fp32 accumulation of <= 9 dot products of 24 unit-vector terms: errors ~1e-6.
    np.testing.assert_allclose(got, reference_maxsim(queries, pages).numpy(), rtol=0, atol=1e-5)


def test_fp16_storage_scores_the_stored_values():
    g = torch.Generator().manual_seed(1)
    pages = [random_unit(n, 128, g) for n in (30, 30, 30, 31)]
    queries = [random_unit(20, 128, g)]
    vectors, offsets = pack_pages(pages)  # fp16 storage
    assert vectors.dtype == np.float16
    stored_pages = [torch.from_numpy(vectors[offsets[i] : offsets[i + 1]].astype(np.float32)) for i in range(4)]
    got = maxsim_packed(queries, vectors, offsets, chunk_tokens=64)
    np.testing.assert_allclose(got, reference_maxsim(queries, stored_pages).numpy(), rtol=0, atol=1e-5)
    # Against the unrounded pages the only difference is fp16 rounding (<= 2^-11 relative per value).
    np.testing.assert_allclose(got, reference_maxsim(queries, pages).numpy(), rtol=0, atol=20 * 2e-3)


def test_padded_inputs_with_lengths_and_memmap(tmp_path):
    g = torch.Generator().manual_seed(2)
    pages = [random_unit(n, 16, g) for n in (4, 9, 6)]
    padded = torch.nn.utils.rnn.pad_sequence(pages, batch_first=True)
    queries = [random_unit(n, 16, g) for n in (2, 5)]
    padded_q = torch.nn.utils.rnn.pad_sequence(queries, batch_first=True)
    expected = reference_maxsim(queries, pages).float()
    got = maxsim(padded_q, padded, query_lens=torch.tensor([2, 5]), doc_lens=torch.tensor([4, 9, 6]))
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    torch.testing.assert_close(maxsim(queries, pages), expected, rtol=0, atol=1e-5)

    vectors, offsets = pack_pages(pages)
    np.save(tmp_path / "v.npy", vectors)
    mapped = np.load(tmp_path / "v.npy", mmap_mode="r")
    np.testing.assert_array_equal(maxsim_packed(queries, mapped, offsets), maxsim_packed(queries, vectors, offsets))


def test_bad_inputs_are_named():
    with pytest.raises(ScoringError, match="page 1"):
        pack_pages([torch.ones(2, 4), torch.ones(0, 4)])
    vectors, offsets = pack_pages([torch.ones(2, 4)])
    with pytest.raises(ScoringError, match="dim 3"):
        maxsim_packed([torch.ones(2, 3)], vectors, offsets)


def test_top_k_orders_by_score_then_index():
    scores = np.array([0.5, 2.0, 1.0, 2.0, -1.0, 1.0, 1.0], dtype=np.float32)
    idx, val = top_k(scores, 4)
    assert idx.tolist() == [1, 3, 2, 5]
    assert val.tolist() == [2.0, 2.0, 1.0, 1.0]
    assert top_k(scores, 100)[0].tolist() == [1, 3, 2, 5, 6, 0, 4]
    rng = np.random.default_rng(0)
    many = rng.normal(size=10_000).astype(np.float32)
    assert top_k(many, 10)[0].tolist() == np.argsort(-many, kind="stable")[:10].tolist()
