"""Weight-only int8: the layer against its definition, and a quantised Gemma against fp32.

Tolerances: Int8Linear runs with bf16 activations, so it is compared with the definition
``bf16(x) @ (q * scale).T`` within bf16 rounding of the result (2^-8 relative). The whole model is
compared by next-token agreement and a logit error bound relative to the logit scale.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from models import GemmaConfig, GemmaLM, load_model
from models.quantize import Int8Linear, int8_weight, quantize_int8


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


def test_quantised_gemma_stays_close_to_fp32():
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
        quant = quantize_int8(model)(ids)
    assert any(isinstance(m, torch.nn.Linear) for m in GemmaLM(config).modules())
    assert not any(isinstance(m, torch.nn.Linear) for m in model.modules())
    err = (quant - exact).abs().max() / exact.abs().max()
    assert err < 0.05, err
    agree = (quant.argmax(-1) == exact.argmax(-1)).float().mean()
    assert agree >= 0.9, agree


def test_quantize_setting_is_checked():
    with pytest.raises(ValueError, match="quantize must be None or 'int8'"):
        load_model("gemma-3-270m", quantize="int4")
