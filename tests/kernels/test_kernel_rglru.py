"""The RG-LRU scan: the Triton kernel (interpreted on CPU) and the chunked torch path against the
one-step-per-token reference; a tiny RecurrentGemma through the Triton kernels against its torch path.

Tolerances (every implementation accumulates in float32 from the same inputs):
- float32: 1e-5 * max(1, max|y|) absolute. The kernel and the chunked path combine the same products
  in a different order (a tree within tiles, chunk carries), a few ulps per output, while a wrong
  carry, tile edge or reset moves outputs by O(|y|).
- float16: 2**-10 * max|y| + 1e-5. Outputs are rounded to fp16 once; float32 values a few ulps apart
  can round to neighbouring fp16 values, one fp16 ulp (2**-10 relative) apart.
- bfloat16 (torch path only; the interpreter's bf16 arithmetic is broken, DESIGN.md): 2**-7 * max|y|,
  the same argument with bf16's 8-bit significand.
"""

from __future__ import annotations

import pytest
import torch
from kernel_covering import covers_all_pairs, pairwise

import gemma_kernels.rglru as rglru_module
from gemma_kernels.rglru import (
    ScanArgumentError,
    rglru_scan,
    rglru_scan_chunked,
    rglru_scan_reference,
    rglru_scan_triton,
)


def tolerance(dtype, y):
    scale = float(y.float().abs().max())
    if dtype == torch.float32:
        return 1e-5 * max(1.0, scale)
    return (2.0 ** -10 if dtype == torch.float16 else 2.0 ** -7) * scale + 1e-5


def make_inputs(batch, seq, width, dtype, *, initial, resets, seed=0):
    gen = torch.Generator().manual_seed(seed)
    # decays spread over (0, 1), some near 1 so that the state carries across many tiles
    a = (1 - torch.rand(batch, seq, width, generator=gen) ** 3).to(dtype)
    x = torch.randn(batch, seq, width, generator=gen).to(dtype)
    h0 = torch.randn(batch, width, generator=gen) * 3 if initial else None
    reset = None
    if resets:
        reset = torch.rand(batch, seq, generator=gen) < 0.08
        reset[0, 0] = True  # a document starting at the first token discards h0
        reset[-1, seq // 2] = True  # and one in the middle of a tile
    return a, x, h0, reset


def check(got, expected, dtype):
    (y, h), (y_ref, h_ref) = got, expected
    assert y.dtype == y_ref.dtype == dtype and y.shape == y_ref.shape
    assert h.dtype == h_ref.dtype == torch.float32 and h.shape == h_ref.shape
    assert (y.float() - y_ref.float()).abs().max() <= tolerance(dtype, y_ref)
    assert (h - h_ref).abs().max() <= tolerance(torch.float32, h_ref)


FACTORS = dict(
    seq=[1, 16, 37, 100],  # one token, exactly one 16-step tile, not a multiple of the tile, many tiles
    width=[5, 16, 33],  # channel blocks are 16 wide under the interpreter
    batch=[1, 3],
    initial=[False, True],
    resets=[False, True],
    dtype=[torch.float32, torch.float16],
)
CASES = pairwise(FACTORS, seed=3)


def test_design_covers_every_pair():
    assert covers_all_pairs(FACTORS, CASES)


@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(str(v).replace("torch.", "") for v in c.values()))
def test_triton_kernel_matches_reference(case):
    dtype = case["dtype"]
    a, x, h0, reset = make_inputs(case["batch"], case["seq"], case["width"], dtype, initial=case["initial"],
                                  resets=case["resets"])
    check(rglru_scan_triton(a, x, h0=h0, reset=reset), rglru_scan_reference(a, x, h0=h0, reset=reset), dtype)


@pytest.mark.parametrize("seq,chunk", [(1, 4), (8, 4), (9, 4), (37, 4), (203, 4), (1000, None), (5000, None)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_chunked_path_matches_reference(seq, chunk, dtype):
    """Chunk sizes that make the chunk totals recurse (37 = 9 chunks of 4 > 2 * 4) and leave tails; None
    picks about sqrt(seq)."""
    a, x, h0, reset = make_inputs(2, seq, 7, dtype, initial=True, resets=True, seed=seq)
    check(rglru_scan_chunked(a, x, h0=h0, reset=reset, chunk=chunk), rglru_scan_reference(a, x, h0=h0, reset=reset),
          dtype)


def test_reference_is_the_recurrence():
    """The specification against the formula written out for three steps."""
    a = torch.tensor([[[0.5], [0.25], [0.75]]])
    x = torch.tensor([[[1.0], [2.0], [4.0]]])
    h0 = torch.tensor([[8.0]])
    y, h = rglru_scan_reference(a, x, h0=h0, reset=torch.tensor([[False, True, False]]))
    h1 = 0.5 * 8.0 + 1.0
    h2 = 0.0 * h1 + 2.0  # reset: the state before is forgotten
    h3 = 0.75 * h2 + 4.0
    assert y[0, :, 0].tolist() == [h1, h2, h3] and h.item() == h3


def test_entry_point_picks_the_chunked_path_on_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(rglru_module, "rglru_scan_chunked", lambda *a, **k: calls.append("torch"))
    monkeypatch.setattr(rglru_module, "rglru_scan_triton", lambda *a, **k: calls.append("triton"))
    a, x, _, _ = make_inputs(1, 3, 4, torch.float32, initial=False, resets=False)
    rglru_scan(a, x)
    rglru_scan(a, x, backend="triton")
    monkeypatch.setenv("GEMMA_GROUNDING_SCAN", "triton")
    rglru_scan(a, x)
    assert calls == ["torch", "triton", "triton"]
    with pytest.raises(ScanArgumentError, match="auto, torch or triton"):
        rglru_scan(a, x, backend="cuda")


def test_gradients_come_from_the_reference():
    """The fast paths are inference-only; with gradients needed the entry point runs the reference."""
    a, x, h0, reset = make_inputs(2, 9, 4, torch.float32, initial=True, resets=True)
    a.requires_grad_(True)
    y, h = rglru_scan(a, x, h0=h0, reset=reset)
    (y.sum() + h.sum()).backward()
    got, a.grad = a.grad, None
    # The closed form h_t = prod(a_1..t) h0 + sum_s prod(a_s+1..t) x_s, differentiated by autograd.
    kept = a.masked_fill(reset[..., None], 0.0)
    states = [h0 * kept[:, :t + 1].prod(1) + sum(x[:, s] * kept[:, s + 1:t + 1].prod(1) for s in range(t + 1))
              for t in range(a.shape[1])]
    (torch.stack(states, 1).sum() + states[-1].sum()).backward()
    assert got.abs().sum() > 0
    torch.testing.assert_close(got, a.grad, atol=1e-5, rtol=1e-5)
    for scan in (rglru_scan_chunked, rglru_scan_triton):
        with pytest.raises(ScanArgumentError, match="computes no gradients"):
            scan(a, x, h0=h0)
    with torch.no_grad():
        check(rglru_scan_chunked(a, x, h0=h0, reset=reset), rglru_scan_reference(a, x, h0=h0, reset=reset),
              torch.float32)


def test_bad_arguments_are_named():
    a, x, h0, reset = make_inputs(2, 5, 4, torch.float32, initial=True, resets=True)
    for kwargs, message in [
        (dict(a=a[:, :4]), "a and x shapes differ"),
        (dict(x=x[0]), "x must be a 3-D tensor"),
        (dict(h0=h0.half()), "h0 must be float32"),
        (dict(h0=h0[:1]), r"h0 must be a \(batch, width\) = \(2, 4\) tensor"),
        (dict(reset=reset.long()), "reset must be a bool tensor"),
        (dict(x=x.long()), "x must be floating point"),
    ]:
        args = dict(a=a, x=x, h0=h0, reset=reset) | kwargs
        for scan in (rglru_scan_reference, rglru_scan_chunked, rglru_scan_triton):
            with pytest.raises(ScanArgumentError, match=message):
                scan(args["a"], args["x"], h0=args["h0"], reset=args["reset"])


# -- the model on the kernels ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    from models.recurrent_gemma import RecurrentGemmaConfig, RecurrentGemmaLM

    config = RecurrentGemmaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, lru_width=48, attention_window_size=4, logits_soft_cap=5.0)
    model = RecurrentGemmaLM(config).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * (0.5 if "norm" in name else 0.2))
    return model


def run(model, backend, fn):
    model.attention_backend = model.scan_backend = backend
    try:
        with torch.no_grad():
            return fn()
    finally:
        model.attention_backend = model.scan_backend = None


def test_model_on_the_triton_kernels_matches_the_torch_path(model, monkeypatch):
    """Prefill past the window (prefill attention kernel + scan kernel), then per-row decoding (split-K
    decode kernel over the ring buffer). Tolerance 1e-4 on logits bounded by the soft cap 5, as for
    the Gemma model on the kernels (tests/kernels/test_kernel_model.py)."""
    launches = []
    real = rglru_module.rglru_scan_triton
    monkeypatch.setattr(rglru_module, "rglru_scan_triton", lambda *a, **k: launches.append(1) or real(*a, **k))
    ids = torch.randint(3, 97, (2, 9), generator=torch.Generator().manual_seed(1))

    def prefill_then_decode():
        model.setup_cache(2)
        out = [model(ids[:, :7], input_pos=0, kv_lens=torch.tensor([7, 5]))]
        out += [model(ids[:, t:t + 1], input_pos=torch.tensor([t, t - 2])) for t in range(7, 9)]
        return torch.cat([out[0][:, :5]] + out[1:], dim=1)

    expected = run(model, "torch", prefill_then_decode)
    got = run(model, "triton", prefill_then_decode)
    assert len(launches) == 2 * 3  # two recurrent layers, three forward calls
    assert (got - expected).abs().max() <= 1e-4
