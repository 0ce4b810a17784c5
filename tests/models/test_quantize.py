"""Weight-only int8/int4: the layers against their definitions, and a quantised Gemma against fp32.

Tolerances: the layers run with bf16 activations, so they are compared with the definition
``bf16(x) @ W.T`` within bf16 rounding of the result (2^-8 relative). The rescored LM head must give
exactly the fp32 logits at its candidates. The whole model is compared by next-token agreement and a
logit error bound relative to the logit scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import GemmaConfig, GemmaLM, load_model
from models.quantize import Int4Linear, Int8Linear, RescoredHead, int4_weight, int8_weight, quantize_model


def test_int8_weight_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(37, 53, generator=torch.Generator().manual_seed(0))
    q, scale = int8_weight(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127
    assert ((q.float() * scale[:, None]) - w).abs().le(scale[:, None] / 2 + 1e-7).all()


@pytest.mark.parametrize("in_features", [40, 128])  # the plain path and the fused CPU kernel
def test_int8_linear_matches_its_definition(in_features):
    gen = torch.Generator().manual_seed(1)
    w, x = torch.randn(96, in_features, generator=gen), torch.randn(3, 5, in_features, generator=gen)
    layer = Int8Linear(w)
    q, scale = int8_weight(w)
    expected = F.linear(x.bfloat16().float(), q.float() * scale.bfloat16().float()[:, None])
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == (3, 5, 96)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=2 ** -7)


def test_int4_weight_round_trip_error_is_at_most_half_a_step():
    w = torch.randn(37, 128, generator=torch.Generator().manual_seed(3))
    q, scale, low = int4_weight(w, 64)
    assert q.min() >= 0 and q.max() <= 15
    back = q.float() * scale.repeat_interleave(64, 1) + low.repeat_interleave(64, 1)
    assert (back - w).abs().le(scale.repeat_interleave(64, 1) / 2 + 1e-6).all()


def test_int4_linear_matches_its_definition():
    gen = torch.Generator().manual_seed(4)
    w, x = torch.randn(96, 128, generator=gen), torch.randn(3, 5, 128, generator=gen)
    layer = Int4Linear(w)
    q, scale, low = int4_weight(w, 64)
    # torch's int4pack convention: W = (q - 8) * scale + zero, scale and zero = low + 8 * scale in bf16
    s = scale.bfloat16().float().repeat_interleave(64, 1)
    z = (low + 8 * scale).bfloat16().float().repeat_interleave(64, 1)
    expected = F.linear(x.bfloat16().float(), (q.float() - 8) * s + z)
    got = layer(x)
    assert got.dtype == x.dtype and got.shape == (3, 5, 96)
    torch.testing.assert_close(got, expected, atol=0.05, rtol=2 ** -7)


def test_rescored_head_gives_exact_logits_at_its_candidates():
    gen = torch.Generator().manual_seed(5)
    w, h = torch.randn(4096, 64, generator=gen), torch.randn(2, 3, 64, generator=gen)
    head = RescoredHead(w, candidates=16)
    got, exact, approx = head(h, w), F.linear(h, w), head.approx(h)
    top = approx.topk(16, dim=-1).indices  # the candidates
    torch.testing.assert_close(got.gather(-1, top), exact.gather(-1, top), atol=1e-5, rtol=1e-5)
    assert not torch.equal(approx.gather(-1, top), exact.gather(-1, top))  # rescoring changed something
    assert torch.equal(got.argmax(-1), exact.argmax(-1))
    # elsewhere the int4 approximation: within a bound relative to the logit scale, not garbage
    assert (got - exact).abs().max() < 0.25 * exact.abs().max()


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantised_gemma_stays_close_to_fp32(mode):
    config = GemmaConfig(vocab_size=211, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=1, head_dim=16, sliding_window=8)
    model = GemmaLM(config).eval()
    gen = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "norm" in name else 0.1))
    ids = torch.randint(0, 211, (2, 20), generator=gen)
    with torch.no_grad():
        exact = model(ids)
        quant = quantize_model(model, mode)(ids)
    assert any(isinstance(m, torch.nn.Linear) for m in GemmaLM(config).modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    # The best logits (rescored exactly by the LM head) carry only the projections' error; the rest
    # carry the int4 head's as well.
    top = exact.topk(8, dim=-1).indices
    err = (quant.gather(-1, top) - exact.gather(-1, top)).abs().max() / exact.abs().max()
    # int4 rounds each weight by up to 1/30 of its group's range (int8: 1/254 of the row's).
    assert err < (0.05 if mode == "int8" else 0.3), err
    assert (quant - exact).abs().max() < 0.4 * exact.abs().max()
    agree = (quant.argmax(-1) == exact.argmax(-1)).float().mean()
    assert agree >= (0.9 if mode == "int8" else 0.8), agree


def test_quantize_setting_is_checked():
    with pytest.raises(ValueError, match="quantize must be None or one of 'int8', 'int4'"):
        load_model("gemma-3-270m", quantize="int2")


def test_training_refuses_a_quantised_head():
    from models.lm_loss import output_embedding

    config = GemmaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=32)
    model = GemmaLM(config).eval()
    assert output_embedding(model) is model.model.embed_tokens.weight
    with pytest.raises(ValueError, match="floating-point LM head"):
        output_embedding(quantize_model(model, "int8"))
