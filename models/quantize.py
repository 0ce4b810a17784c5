"""Weight-only int8 quantisation for fast CPU decoding (opt-in; gpt-fast's int8 scheme).

Decoding one token reads every weight once, so on a CPU it is bound by memory traffic: the Gemma 3
270M LM head alone is 262144 x 640 fp32 = 671 MB per token. Storing each weight matrix as int8 with one
scale per output row reads a quarter of that; the product runs in PyTorch's fused
``_weight_int8pack_mm`` kernel with bf16 activations and is cast back to the model's dtype.

This changes numerics (per-row symmetric rounding, error <= scale / 2 per weight, plus bf16
activations in the products): it is an explicit choice (``load_model(..., quantize="int8")``), never a
default; ``benchmarks/bench_decode.py`` reports its speed and how often its greedy tokens agree with fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Int8Linear", "quantize_int8", "int8_weight"]


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``weight ~= q * scale[:, None]`` with q in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T`` (+ bias) with q stored as int8; no bias in Gemma's projections."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        q, scale = int8_weight(weight)
        self.register_buffer("weight_int8", q)
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone(), requires_grad=False)
        self.in_features, self.out_features = weight.shape[1], weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        # The fused CPU kernel crashes on inner sizes that are not a multiple of its block (seen with
        # 40 on torch 2.13); every Gemma width is a multiple of 64, anything else takes the plain path.
        if flat.device.type == "cpu" and self.in_features % 64 == 0:
            out = torch._weight_int8pack_mm(flat, self.weight_int8, self.scales)
        else:
            out = F.linear(flat, self.weight_int8.to(flat.dtype)) * self.scales
        out = out.to(x.dtype).reshape(*shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


@torch.no_grad()
def quantize_int8(model: nn.Module) -> nn.Module:
    """Replace every ``nn.Linear`` of a :class:`~models.gemma.GemmaLM` with :class:`Int8Linear` and give
    it an int8 LM head (the embedding table itself stays in the model dtype for lookups)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, Int8Linear(child.weight, child.bias))
    if hasattr(model, "model") and hasattr(model.model, "embed_tokens") and not hasattr(model, "lm_head"):
        model.lm_head_int8 = Int8Linear(model.model.embed_tokens.weight)
    return model
