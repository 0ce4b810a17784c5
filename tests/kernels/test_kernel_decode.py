"""The split-K Triton decode kernel (interpreted on CPU) against the torch references.

Two references: ``attention_reference`` (the general specification) and ``decode_attention_reference``
(written separately, KV heads expanded per query head); they must agree with each other too.
Tolerances as for the prefill kernel (see test_kernel_attention.py): float32 2e-5 absolute;
float16 3 * 2**-11 * max|v| (softmax weights rounded to fp16 before P @ V, kernel and reference
outputs each rounded to fp16); bfloat16 (CUDA only) 3 * 2**-8 * max|v|. Split partials are kept in
fp32, so splitting adds only reordering.
"""

from __future__ import annotations

import pytest
import torch
from kernel_covering import covers_all_pairs, pairwise

from gemma_kernels.attention import AttentionArgumentError, attention, attention_reference
from gemma_kernels.decode import decode_attention, decode_attention_reference, decode_attention_triton


def tolerance(dtype, v):
    if dtype == torch.float32:
        return 2e-5
    unit_roundoff = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    return 3 * unit_roundoff * float(v.float().abs().max()) + 1e-6


FACTORS = dict(
    mask=["causal", "window", "prefix_window", "none"],
    softcap=[None, 2.0],
    gqa=[(1, 1), (2, 1), (4, 2), (4, 1)],
    kv_len=[1, 7, 33, 130],  # tiles are 32 keys
    per_row=[False, True],  # per-row cache lengths and positions (batches of different lengths)
    head_dim=[16, 72, 128, 256],
    dtype=[torch.float32, torch.float16],
    splits=[None, 1, 3],  # chosen by the launcher, one chunk, several chunks (merge kernel)
)
CASES = pairwise(FACTORS, seed=5)


def build_case(case, seed=0):
    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = case["gqa"]
    kv_len, dim, dtype = case["kv_len"], case["head_dim"], case["dtype"]
    kwargs = dict(softcap=case["softcap"], causal=case["mask"] != "none")
    if case["per_row"]:
        lens = torch.tensor([kv_len, max(1, kv_len - 5)])
        kwargs.update(kv_lens=lens, q_offset=lens - 1)  # the new token is the last cached one
    else:
        kwargs.update(q_offset=kv_len - 1)
    if case["mask"] in ("window", "prefix_window"):
        kwargs["window"] = 5
    if case["mask"] == "prefix_window":
        kwargs["prefix_lens"] = torch.tensor([kv_len + 1, 3])  # row 0: the query is inside its prefix
    q = torch.randn(2, q_heads, 1, dim, generator=gen).to(dtype)
    k = torch.randn(2, kv_heads, kv_len, dim, generator=gen).to(dtype)
    v = torch.randn(2, kv_heads, kv_len, dim, generator=gen).to(dtype)
    return q, k, v, kwargs


def case_id(case):
    h, kvh = case["gqa"]
    return (f"{case['mask']}-cap{case['softcap']}-h{h}kv{kvh}-L{case['kv_len']}-rows{int(case['per_row'])}"
            f"-d{case['head_dim']}-{str(case['dtype'])[6:]}-splits{case['splits']}")


def test_design_covers_every_pair_of_features():
    assert covers_all_pairs(FACTORS, CASES)


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_decode_kernel_matches_reference(case):
    q, k, v, kwargs = build_case(case)
    out = decode_attention_triton(q, k, v, num_splits=case["splits"], **kwargs)
    ref = attention_reference(q, k, v, **kwargs)
    assert out.dtype == ref.dtype and out.shape == ref.shape == q.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tolerance(case["dtype"], v), err


@pytest.mark.skipif(not torch.cuda.is_available(),
                    reason="compiled kernels need a CUDA GPU; the interpreted runs above cover the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_decode_kernel_on_cuda(dtype):
    """The same design compiled on a GPU, bf16 included (the interpreter cannot check bf16)."""
    for case in CASES:
        q, k, v, kwargs = build_case({**case, "dtype": dtype})
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        kwargs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        out = decode_attention_triton(q, k, v, num_splits=case["splits"], **kwargs)
        err = (out.float() - attention_reference(q, k, v, **kwargs).float()).abs().max().item()
        assert err <= tolerance(dtype, v), (case_id(case), err)


@pytest.mark.parametrize("case", CASES[:8], ids=case_id)
def test_two_references_agree(case):
    q, k, v, kwargs = build_case(case)
    torch.testing.assert_close(decode_attention_reference(q.float(), k.float(), v.float(), **kwargs),
                               attention_reference(q.float(), k.float(), v.float(), **kwargs),
                               atol=1e-5, rtol=0)


def test_decode_inside_a_longer_cache_with_a_query_that_sees_nothing():
    """A row whose cache length is 0 (an empty slot in the batch) outputs zeros; the other row is exact."""
    q, k, v = torch.randn(2, 2, 1, 64), torch.randn(2, 1, 40, 64), torch.randn(2, 1, 40, 64)
    kwargs = dict(kv_lens=torch.tensor([37, 0]), q_offset=torch.tensor([36, 0]), window=20)
    out = decode_attention_triton(q, k, v, num_splits=4, **kwargs)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert (out[0] - attention_reference(q, k, v, **kwargs)[0]).abs().max() <= 2e-5


def test_entry_points_agree():
    q, k, v = torch.randn(2, 4, 1, 16), torch.randn(2, 2, 9, 16), torch.randn(2, 2, 9, 16)
    ref = decode_attention(q, k, v, q_offset=8)  # CPU auto: the reference
    for out in (decode_attention(q, k, v, q_offset=8, backend="triton"), attention(q, k, v, q_offset=8,
                                                                                  backend="triton")):
        assert (out - ref).abs().max() <= 2e-5


def test_decode_rejects_more_than_one_query_and_bad_split_counts():
    q, k = torch.randn(1, 1, 2, 16), torch.randn(1, 1, 4, 16)
    with pytest.raises(AttentionArgumentError, match="one query per row"):
        decode_attention_triton(q, k, k)
    with pytest.raises(AttentionArgumentError, match="num_splits"):
        decode_attention_triton(q[:, :, :1], k, k, num_splits=0)
