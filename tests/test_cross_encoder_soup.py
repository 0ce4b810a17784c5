"""The cross-encoder soup (benchmarks/experiment_cross_encoder_soup.py) is one LoRA update whose merged
weights equal the mean of the models' merged weights, and whose head is the mean head: checked
against models.lora's own merge on random factors."""

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from experiment_cross_encoder_soup import soup  # noqa: E402

from models.lora import lora_delta, lora_scale  # noqa: E402


def _model(gen: torch.Generator, r: int) -> dict[str, torch.Tensor]:
    out = {}
    for name, (n_out, n_in) in {"encoder.layer.0.attention.self.query": (6, 5),
                                "encoder.layer.0.output.dense": (5, 7)}.items():
        out[f"{name}.lora_A.weight"] = torch.randn(r, n_in, generator=gen)
        out[f"{name}.lora_B.weight"] = torch.randn(n_out, r, generator=gen)
    out["head.weight"] = torch.randn(1, 5, generator=gen)
    out["head.bias"] = torch.randn(1, generator=gen)
    return out


@pytest.mark.parametrize("n", [1, 2, 3])
def test_soup_is_the_mean_update(n):
    gen = torch.Generator().manual_seed(n)
    r = 4
    models = [_model(gen, r) for _ in range(n)]
    mixed = soup(models)
    for name in ("encoder.layer.0.attention.self.query", "encoder.layer.0.output.dense"):
        a, b = mixed[f"{name}.lora_A.weight"], mixed[f"{name}.lora_B.weight"]
        assert a.shape[0] == b.shape[1] == n * r
        # each model: alpha = 2r at rank r; the soup keeps alpha = 2r at rank n r
        merged = lora_delta(a, b, lora_scale(2.0 * r, n * r))
        expected = torch.stack([lora_delta(m[f"{name}.lora_A.weight"], m[f"{name}.lora_B.weight"],
                                           lora_scale(2.0 * r, r)) for m in models]).mean(0)
        torch.testing.assert_close(merged, expected, rtol=1e-5, atol=1e-5)  # fp32 sums of <= 12 products
    torch.testing.assert_close(mixed["head.weight"], torch.stack([m["head.weight"] for m in models]).mean(0))
    torch.testing.assert_close(mixed["head.bias"], torch.stack([m["head.bias"] for m in models]).mean(0))


def test_soup_refuses_models_of_different_shape():
    gen = torch.Generator().manual_seed(0)
    a, b = _model(gen, 2), _model(gen, 2)
    del b["head.bias"]
    with pytest.raises(ValueError, match="different tensors"):
        soup([a, b])
