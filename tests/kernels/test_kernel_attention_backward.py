"""The Triton backward of the prefill attention (interpreted on CPU) against autograd of the torch
reference, over a pairwise design of masks, softcap, GQA, query offsets, padding, head dims, dtypes and
lengths; and a tiny Gemma 2 trained through either backend.

Gradients are compared with the reference's autograd on the same (fp16-rounded, then fp32) inputs:
- float32: 2e-5 * max|reference gradient| + 1e-6. Same math in another order (tiles, exp2 with a folded
  log2(e), tanh through exp): ~1e-6 relative here, while a wrong mask, offset or head moves gradients by
  a good fraction of their size.
- float16: 4 * 2**-11 * max|reference gradient|. The kernel rounds the probabilities and the score
  gradients to fp16 before the products (relative error <= 2**-11 each) and rounds each gradient to fp16
  once more; the output it saves for ``delta`` is fp16 too.
- bfloat16 runs compiled on a GPU only (the interpreter's bf16 arithmetic is broken, see DESIGN.md).
"""

from __future__ import annotations

import pytest
import torch
from kernel_covering import covers_all_pairs, pairwise
from test_kernel_attention import build_case, case_id

from gemma_kernels.attention import attention

FACTORS = dict(
    mask=["causal", "window", "prefix", "prefix_window", "none"],
    softcap=[None, 2.0],
    gqa=[(2, 2), (4, 1)],  # one KV head per query head; four query heads sharing one
    q_offset=["zero", "rows"],
    kv_lens=[False, True],
    head_dim=[24, 64],  # 24: padded to a 32-wide tile
    dtype=[torch.float32, torch.float16],
    seq=[7, 40],  # one partial tile; one and a bit (tiles are 32)
    scale=[None, 0.3],
)
CASES = pairwise(FACTORS, seed=3)


def gradients(q, k, v, dout, backend, **kwargs):
    q, k, v = (t.detach().clone().requires_grad_() for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kwargs)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def check(grads, reference, dtype):
    for name, got, want in zip(("out", "dq", "dk", "dv"), grads, reference, strict=True):
        assert got.dtype == dtype and got.shape == want.shape, name
        scale = float(want.abs().max())
        unit_roundoff = {torch.float16: 2.0 ** -11, torch.bfloat16: 2.0 ** -8}.get(dtype)
        tolerance = 2e-5 * scale + 1e-6 if unit_roundoff is None else 4 * unit_roundoff * scale + 1e-6
        error = float((got.float() - want.float()).abs().max())
        assert error <= tolerance, f"{name}: max abs error {error} > {tolerance}"


def test_design_covers_every_pair():
    assert covers_all_pairs(FACTORS, CASES)
    assert len(CASES) <= 12


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_backward_matches_autograd_of_the_reference(case):
    q, k, v, kwargs = build_case(case, seed=1)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(q.dtype)
    got = gradients(q, k, v, dout, "triton", **kwargs)
    reference = gradients(q.float(), k.float(), v.float(), dout.float(), "torch", **kwargs)
    assert all(torch.isfinite(g.float()).all() for g in got)
    assert float(reference[2].abs().max()) > 0.05  # keys get real gradients
    check(got, reference, case["dtype"])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="compiled kernels need a CUDA GPU; the interpreted runs "
                    "above cover the CPU")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_backward_on_cuda(dtype):
    """The same design compiled on a GPU, bf16 included (the interpreter cannot check bf16)."""
    for case in CASES:
        q, k, v, kwargs = build_case({**case, "dtype": dtype}, seed=1)
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        kwargs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2)).to(dtype).cuda()
        got = gradients(q, k, v, dout, "triton", **kwargs)
        check(got, gradients(q.float(), k.float(), v.float(), dout.float(), "torch", **kwargs), dtype)


def test_keys_nobody_sees_get_zero_gradients():
    """Padding keys (past kv_lens) and rows whose queries see nothing: exact zeros, never NaN."""
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 2, 9, 16, generator=gen) for _ in range(3))
    kwargs = dict(causal=False, kv_lens=torch.tensor([5, 0]))
    _, dq, dk, dv = gradients(q, k, v, torch.ones_like(q), "triton", **kwargs)
    assert torch.equal(dk[0, :, 5:], torch.zeros_like(dk[0, :, 5:])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))
    reference = gradients(q, k, v, torch.ones_like(q), "torch", **kwargs)  # the reference is NaN-free too
    assert all(torch.isfinite(g).all() for g in reference)
    check((_, dq, dk, dv), reference, torch.float32)


def test_training_a_tiny_gemma2_through_either_backend():
    """LoRA gradients of the causal LM loss through the whole model (softcap, sliding window, GQA) agree
    between the torch path and the Triton kernels."""
    from models.config import GemmaConfig
    from models.gemma import GemmaLM
    from models.lm_loss import causal_lm_loss
    from models.loading import init_random_weights
    from models.lora import LoraSettings, add_lora, lora_modules

    config = GemmaConfig(architecture="gemma2", vocab_size=64, hidden_size=32, intermediate_size=48,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                         max_position_embeddings=128, query_pre_attn_scalar=16, sliding_window=6,
                         attn_logit_softcapping=5.0, final_logit_softcapping=8.0)
    model = init_random_weights(GemmaLM(config), seed=4, std=0.2)
    add_lora(model, LoraSettings(r=2, alpha=4), seed=1)
    with torch.no_grad():
        for module in lora_modules(model).values():
            module.lora_B.weight.normal_(0, 0.2, generator=torch.Generator().manual_seed(5))
    ids = torch.randint(0, 64, (2, 37), generator=torch.Generator().manual_seed(6))
    grads = {}
    for backend in ("torch", "triton"):
        model.attention_backend = backend
        model.zero_grad()
        loss, count = causal_lm_loss(model, ids, ids)
        (loss / count).backward()
        grads[backend] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, want in grads["torch"].items():
        torch.testing.assert_close(grads["triton"][name], want, atol=2e-5 * float(want.abs().max()) + 1e-7, rtol=0,
                                   msg=name)
