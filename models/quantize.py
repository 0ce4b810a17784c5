"""Weight-only int8 / int4 quantisation for fast CPU decoding (opt-in: ``load_model(..., quantize=...)``).

Decoding one token reads every weight once, so on a CPU it is bound by memory traffic. The Gemma 3
270M LM head alone is 262144 x 640 fp32 = 671 MB per token; its 18 blocks hold another ~400 MB. The
modes store fewer bytes and run PyTorch's fused CPU kernels with bf16 activations:

- ``"int8"``: every projection as int8 with one scale per output row (``_weight_int8pack_mm``), and
  the LM head in int4 (``_weight_int4pack_mm_for_cpu``, groups of 64 along the hidden size) whose
  best :data:`HEAD_CANDIDATES` tokens are rescored with the exact (model dtype) embedding rows. The
  head reads an eighth of its fp32 bytes, yet the top candidates' logits, and so greedy tokens, are
  those of the exact head as long as the exact best token is among the int4 head's top candidates
  (the int4 error is far below the gap that would take it out).
- ``"int4"``: the projections in int4 as well (half the bytes again; changes greedy tokens sooner).

Q/K/V and gate/up are fused into one matrix each (one kernel call instead of three or two per block:
at ~20 ms per token, per-call overhead matters). Quantisation changes numerics (per-row or per-group
rounding, bf16 activations); ``benchmarks/bench_decode.py`` reports the speed of each mode and how many
greedy tokens agree with fp32, and ``tests/models/test_real_weights.py`` checks the first 32.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["Int8Linear", "Int4Linear", "RescoredHead", "quantize_model", "int8_weight",
           "int4_weight", "QUANTIZE_MODES", "HEAD_CANDIDATES"]

QUANTIZE_MODES = ("int8", "int4")
HEAD_CANDIDATES = 64  # int4 LM-head logits rescored exactly per position
INT4_GROUP = 64  # values sharing one int4 scale and zero (along the input dimension)
_ROWS_PER_CHUNK = 16384  # int4 conversion in row chunks: bounded temporaries for the 262144-row head


def int8_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-row int8: ``weight ~= q * scale[:, None]`` with q in [-127, 127]."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127.0
    q = torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scale


def int4_weight(weight: torch.Tensor, group: int = INT4_GROUP) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric int4 per group of ``group`` inputs: ``weight ~= q * scale + low`` with q in [0, 15].

    Returns ``(q int32 [out, in], scale [out, in / group], low [out, in / group])`` in fp32.
    """
    w = weight.detach().float()
    rows, cols = w.shape
    groups = w.reshape(rows, cols // group, group)
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = (high - low).clamp(min=1e-6) / 15.0
    q = ((groups - low[..., None]) / scale[..., None]).round_().clamp_(0, 15).to(torch.int32)
    return q.reshape(rows, cols), scale, low


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


class Int4Linear(nn.Module):
    """``y = bf16(x) @ W.T`` with ``W = (q - 8) * scale + zero`` per group of :data:`INT4_GROUP` inputs
    (``zero = low + 8 * scale``, torch's int4pack convention), packed for ``_weight_int4pack_mm_for_cpu``."""

    def __init__(self, weight: torch.Tensor, group: int = INT4_GROUP):
        super().__init__()
        rows, cols = weight.shape
        if cols % group:
            raise ValueError(f"int4 needs the input size ({cols}) to be a multiple of the group size {group}")
        if rows % 16:  # the packing kernel wants outputs in multiples of 16: pad with zero rows
            weight = torch.cat([weight, weight.new_zeros(16 - rows % 16, cols)])
        packed, scales_zeros = [], []
        for start in range(0, rows, _ROWS_PER_CHUNK):
            q, scale, low = int4_weight(weight[start:start + _ROWS_PER_CHUNK], group)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            scales_zeros.append(torch.stack([scale, low + 8 * scale], dim=-1))
        self.register_buffer("weight_int4", torch.cat(packed))
        # [in / group, out, 2] as the kernel wants, in the activations' dtype
        self.register_buffer("scales_zeros", torch.cat(scales_zeros).transpose(0, 1).contiguous().to(torch.bfloat16))
        self.group, self.in_features, self.out_features = group, cols, rows

    def dequantized(self) -> torch.Tensor:
        """The fp32 matrix the kernel multiplies by (its definition, for tests)."""
        eye = torch.eye(self.in_features, dtype=torch.bfloat16)
        return torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight_int4, self.group,
                                                          self.scales_zeros)[:, :self.out_features].float().T

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        flat = x.reshape(-1, shape[-1]).to(torch.bfloat16)
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.weight_int4, self.group, self.scales_zeros)
        if out.shape[-1] != self.out_features:
            out = out[:, :self.out_features]
        return out.to(x.dtype).reshape(*shape[:-1], self.out_features)


class RescoredHead(nn.Module):
    """An int4 LM head whose best ``candidates`` logits per position are recomputed with the exact
    weight rows (passed at call time: the embedding matrix, which the model keeps for lookups)."""

    def __init__(self, weight: torch.Tensor, candidates: int = HEAD_CANDIDATES):
        super().__init__()
        self.approx = Int4Linear(weight)
        self.candidates = min(candidates, weight.shape[0])

    def forward(self, hidden: torch.Tensor, exact_weight: torch.Tensor) -> torch.Tensor:
        logits = self.approx(hidden)
        flat_hidden = hidden.reshape(-1, hidden.shape[-1])
        flat = logits.view(-1, logits.shape[-1])
        top = flat.topk(self.candidates, dim=-1, sorted=False).indices  # (positions, k)
        rows = exact_weight[top]  # (positions, k, hidden)
        exact = torch.bmm(rows, flat_hidden.to(rows.dtype)[:, :, None])[..., 0]
        flat.scatter_(-1, top, exact.to(flat.dtype))
        return logits


def _run_single_threaded(jobs: list) -> list:
    """Run independent conversions on one Python thread per torch thread, each with one torch thread:
    no barrier after every op, which on a busy machine (more runnable threads than cores) costs a
    time slice each."""
    workers = torch.get_num_threads()
    if workers == 1:
        return [job() for job in jobs]
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(max_workers=workers) as pool:
            return list(pool.map(lambda job: job(), jobs))
    finally:
        torch.set_num_threads(workers)


def _fuse(linears: list[nn.Linear]) -> torch.Tensor:
    return torch.cat([m.weight.detach() for m in linears], dim=0)


@torch.no_grad()
def quantize_model(model: nn.Module, mode: str = "int8") -> nn.Module:
    """Quantise a :class:`~models.gemma.GemmaLM` in place (see the module docstring for the modes):
    fused Q/K/V and gate/up projections, every projection int8 or int4, the tied LM head int4 with
    exact rescoring (the embedding table stays in the model dtype for lookups and rescoring)."""
    from .gemma import GemmaLM

    if mode not in QUANTIZE_MODES:
        raise ValueError(f"quantize must be None or one of {', '.join(map(repr, QUANTIZE_MODES))}, got {mode!r}")
    if not isinstance(model, GemmaLM):
        raise ValueError(f"quantize={mode!r} applies to Gemma text decoders, not {type(model).__name__}")
    linear = Int8Linear if mode == "int8" else Int4Linear
    head = model.lm_head.weight if hasattr(model, "lm_head") else model.model.embed_tokens.weight
    jobs = {"lm_head_quantized": lambda: RescoredHead(head)}  # the largest first
    for i, layer in enumerate(model.model.layers):
        attn, mlp = layer.self_attn, layer.mlp
        prefix = f"model.layers.{i}."
        jobs[prefix + "self_attn.qkv_proj"] = partial(linear, _fuse([attn.q_proj, attn.k_proj, attn.v_proj]))
        jobs[prefix + "self_attn.o_proj"] = partial(linear, attn.o_proj.weight)
        jobs[prefix + "mlp.gate_up_proj"] = partial(linear, _fuse([mlp.gate_proj, mlp.up_proj]))
        jobs[prefix + "mlp.down_proj"] = partial(linear, mlp.down_proj.weight)
    for name, module in zip(jobs, _run_single_threaded(list(jobs.values())), strict=True):
        parent, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, module)
    for layer in model.model.layers:
        del layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj
        del layer.mlp.gate_proj, layer.mlp.up_proj
    return model
