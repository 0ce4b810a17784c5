"""A tiny random Gemma 2 model gives the same logits through the interpreted Triton kernels as
through the torch path: prefill (softcap + a sliding window shorter than the sequence), prefix-LM,
bidirectional with padding, and incremental decoding with the KV cache (per-row positions, so
every decode step goes through the split-K decode kernel).

Tolerance: 1e-4 absolute on logits bounded by the final softcap (5). Each attention call differs
from the reference by ~1e-6 in fp32 (summation order, exp2); two layers of residual blocks with
random weights amplify that by well under 100x, while a masking error changes logits by ~0.1-1.
"""

from __future__ import annotations

import pytest
import torch

import gemma_kernels.attention as attention_module
import gemma_kernels.decode as decode_module
from models.config import GemmaConfig
from models.gemma import GemmaLM

ATOL = 1e-4


@pytest.fixture(scope="module")
def model():
    config = GemmaConfig(
        architecture="gemma2", vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16,
        # caps far below Gemma 2's 50/30 so that tanh bends the tiny model's scores and logits
        attn_logit_softcapping=3.0, final_logit_softcapping=5.0, sliding_window=4,
        rope_theta=10_000.0, rope_local_base_freq=10_000.0, use_qk_norm=False, use_post_norms=True,
    )
    assert config.is_sliding(0) and not config.is_sliding(1)
    model = GemmaLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():  # every parameter, norm weights included
            std = 0.5 if "norm" in name else 0.3
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return model


def logits_with(model, backend, **kwargs):
    model.attention_backend = backend
    try:
        with torch.no_grad():
            return model(**kwargs)
    finally:
        model.attention_backend = None


@pytest.fixture
def count_launches(monkeypatch):
    """Count the prefill and decode launches so a test knows the kernels really ran."""
    counts = {"prefill": 0, "decode": 0}
    real_prefill, real_decode = attention_module.attention_prefill_triton, decode_module.decode_attention_triton

    def prefill(*args, **kwargs):
        counts["prefill"] += 1
        return real_prefill(*args, **kwargs)

    def decode(*args, **kwargs):
        counts["decode"] += 1
        return real_decode(*args, **kwargs)

    monkeypatch.setattr(attention_module, "attention_prefill_triton", prefill)
    monkeypatch.setattr(decode_module, "decode_attention_triton", decode)
    return counts


def test_gemma2_prefill_logits(model, count_launches):
    ids = torch.randint(0, 97, (2, 13), generator=torch.Generator().manual_seed(1))  # window 4 < 13
    expected = logits_with(model, "torch", input_ids=ids)
    got = logits_with(model, "triton", input_ids=ids)
    assert count_launches["prefill"] == 2  # one per layer
    assert (got - expected).abs().max() <= ATOL


@pytest.mark.parametrize("kwargs", [
    dict(prefix_lens=torch.tensor([5, 11])),  # PaliGemma: a bidirectional prefix, then causal
    dict(causal=False, kv_lens=torch.tensor([11, 6])),  # ColPali: bidirectional, right padding
], ids=["prefix_lm", "bidirectional_padded"])
def test_prefix_lm_and_bidirectional_logits(model, count_launches, kwargs):
    ids = torch.randint(0, 97, (2, 11), generator=torch.Generator().manual_seed(2))
    expected = logits_with(model, "torch", input_ids=ids, **kwargs)
    got = logits_with(model, "triton", input_ids=ids, **kwargs)
    assert count_launches["prefill"] == 2
    valid = 6 if "kv_lens" in kwargs else 11  # padding queries of row 1 are not compared
    assert (got[0] - expected[0]).abs().max() <= ATOL
    assert (got[1, :valid] - expected[1, :valid]).abs().max() <= ATOL


def run_incremental(model, backend, prompt, lens, steps):
    """Right-padded batched prefill into the cache, then one token per row per step."""
    model.attention_backend = backend
    outputs = []
    try:
        with torch.no_grad():
            model.setup_cache(2, 24)
            outputs.append(model(prompt, input_pos=0, kv_lens=lens))
            pos = lens.clone()
            for token in steps:
                outputs.append(model(token[:, None], input_pos=pos))
                pos = pos + 1
    finally:
        model.clear_cache()
        model.attention_backend = None
    return outputs


def test_incremental_decode_with_kv_cache(model, count_launches):
    gen = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 97, (2, 9), generator=gen)
    lens = torch.tensor([9, 5])  # row 1 is right-padded: it decodes from position 5
    steps = torch.randint(0, 97, (6, 2), generator=gen)  # fixed tokens: both runs see the same inputs
    expected = run_incremental(model, "torch", prompt, lens, steps)
    got = run_incremental(model, "triton", prompt, lens, steps)
    assert count_launches == {"prefill": 2, "decode": 2 * 6}
    assert (got[0][0] - expected[0][0]).abs().max() <= ATOL
    assert (got[0][1, :5] - expected[0][1, :5]).abs().max() <= ATOL
    for step_got, step_expected in zip(got[1:], expected[1:], strict=True):
        assert (step_got - step_expected).abs().max() <= ATOL
