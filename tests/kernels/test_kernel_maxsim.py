"""The Triton MaxSim kernel (interpreted on CPU) against the torch reference, and the reference
against a direct double loop over the definition.

Tolerances: scores are sums over <= Lq query tokens of dot products of width D accumulated in fp32
(fp16 inputs are exact in fp32, so both paths compute the same products and differ only in
summation order). Relative 1e-5 of the score scale sum_i max_j |<q_i, d_j>| bound (here ~1e2-1e3)
covers reordering (~D * 2**-24 relative per dot product) with a wide margin, while a wrong mask or
a missing token changes a score by the size of one dot product (~1-10).
"""

from __future__ import annotations

import pytest
import torch

from gemma_kernels.maxsim import MaxSimArgumentError, maxsim, maxsim_reference, maxsim_triton


def close(out, ref, queries, docs):
    scale = torch.einsum("qid,njd->qnij", queries.float().abs(), docs.float().abs()).amax(-1).sum(-1)
    assert out.dtype == torch.float32 and out.shape == ref.shape
    assert ((out - ref).abs() <= 1e-5 * scale + 1e-5).all(), (out - ref).abs().max()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("n_queries,q_tokens,n_docs,d_tokens,dim", [
    (1, 1, 1, 1, 16), (3, 7, 5, 33, 72), (2, 20, 3, 130, 128), (5, 33, 2, 7, 100)])
def test_kernel_matches_reference(n_queries, q_tokens, n_docs, d_tokens, dim, dtype):
    gen = torch.Generator().manual_seed(q_tokens * 31 + d_tokens)
    queries = torch.randn(n_queries, q_tokens, dim, generator=gen).to(dtype)
    docs = torch.randn(n_docs, d_tokens, dim, generator=gen).to(dtype)
    query_lens = torch.randint(1, q_tokens + 1, (n_queries,), generator=gen)
    doc_lens = torch.randint(1, d_tokens + 1, (n_docs,), generator=gen)
    for kwargs in ({}, dict(query_lens=query_lens, doc_lens=doc_lens)):
        out = maxsim(queries, docs, backend="triton", **kwargs)
        close(out, maxsim_reference(queries, docs, **kwargs), queries, docs)


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="compiled kernels need a CUDA GPU; the interpreted runs above cover the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_kernel_on_cuda(dtype):
    gen = torch.Generator().manual_seed(0)
    queries = torch.randn(20, 23, 128, generator=gen).to(dtype).cuda()
    docs = torch.randn(300, 1030, 128, generator=gen).to(dtype).cuda()
    doc_lens = torch.randint(1, 1031, (300,), generator=gen).cuda()
    out = maxsim(queries, docs, doc_lens=doc_lens)  # auto: the kernel on CUDA
    close(out, maxsim_reference(queries, docs, doc_lens=doc_lens), queries, docs)


def test_padding_rules():
    """Zero padding without lengths takes part (dot 0); with lengths it does not; empty docs score 0."""
    queries = -torch.ones(1, 2, 16)  # every real dot product is negative
    docs = torch.zeros(2, 4, 16)
    docs[:, :2] = 1.0
    for run in (maxsim_reference, maxsim_triton):
        assert run(queries, docs).tolist() == [[0.0, 0.0]]  # the zero tokens win the max
        got = run(queries, docs, doc_lens=torch.tensor([2, 0]), query_lens=torch.tensor([1]))
        assert got.tolist() == [[-16.0, 0.0]]


def test_reference_is_the_definition():
    gen = torch.Generator().manual_seed(0)
    queries, docs = torch.randn(2, 5, 8, generator=gen), torch.randn(3, 6, 8, generator=gen)
    query_lens, doc_lens = torch.tensor([5, 2]), torch.tensor([6, 1, 4])
    expected = torch.zeros(2, 3, dtype=torch.float64)
    for q in range(2):
        for n in range(3):
            expected[q, n] = sum(max(float(queries[q, i].double() @ docs[n, j].double())
                                     for j in range(doc_lens[n])) for i in range(query_lens[q]))
    got = maxsim_reference(queries, docs, query_lens=query_lens, doc_lens=doc_lens)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


def test_non_contiguous_inputs():
    queries = torch.randn(7, 3, 64).transpose(0, 1)  # (3, 7, 64) with strides of a transpose
    docs = torch.randn(40, 2, 64).transpose(0, 1)
    close(maxsim_triton(queries, docs), maxsim_reference(queries, docs), queries, docs)


@pytest.mark.parametrize("make,message", [
    (lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 16)), "widths differ"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8).half()), "dtypes differ"),
    (lambda: (torch.randn(2, 3, 8), torch.randn(2, 3, 8, device="meta")), "devices differ"),
    (lambda: (torch.randn(3, 8), torch.randn(2, 3, 8)), "3-D"),
    (lambda: (torch.randn(2, 3, 300), torch.randn(2, 3, 300)), "not supported by the Triton kernel"),
])
def test_invalid_inputs(make, message):
    queries, docs = make()
    with pytest.raises(MaxSimArgumentError, match=message):
        maxsim(queries, docs, backend="triton")


def test_invalid_lengths():
    queries, docs = torch.randn(2, 3, 8), torch.randn(2, 4, 8)
    with pytest.raises(MaxSimArgumentError, match="doc_lens must lie in 0..4"):
        maxsim(queries, docs, doc_lens=torch.tensor([5, 1]))
    with pytest.raises(MaxSimArgumentError, match="query_lens must be a 1-D tensor of length 2"):
        maxsim(queries, docs, query_lens=torch.tensor([1]))
    with pytest.raises(MaxSimArgumentError, match="backend must be"):
        maxsim(queries, docs, backend="gpu")
