"""The Triton prefill kernel (interpreted on CPU) against the torch reference, and the reference
against a direct per-query evaluation of the masking rules.

Tolerances (kernel vs reference, both accumulating in fp32):
- float32: 2e-5 absolute. Inputs are exact in both; the only differences are summation order,
  exp2 with a folded log2(e) instead of exp, and tanh written through exp: a few ulps on scores and
  outputs of magnitude <= ~5, far below 2e-5, while any masking or indexing error moves outputs by ~0.1.
- float16: 3 * 2**-11 * max|v| absolute. The kernel rounds the softmax weights to fp16 before the
  P @ V product (relative error <= 2**-11 per weight, so <= 2**-11 * max|v| on the output) and rounds
  its output to fp16 (<= 2**-11 * max|v|); the reference rounds its output once more.
- bfloat16 (compiled on CUDA only: the interpreter's bf16 arithmetic is broken on this CPU, see
  DESIGN.md): 3 * 2**-8 * max|v|, the same argument with bf16's 8-bit significand.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from kernel_covering import covers_all_pairs, pairwise

import gemma_kernels.attention as attention_module
from gemma_kernels.attention import AttentionArgumentError, attention, attention_reference, attention_triton

ROOT = Path(__file__).resolve().parents[2]


def tolerance(dtype: torch.dtype, v: torch.Tensor) -> float:
    if dtype == torch.float32:
        return 2e-5
    unit_roundoff = 2.0 ** -8 if dtype == torch.bfloat16 else 2.0 ** -11
    return 3 * unit_roundoff * float(v.float().abs().max()) + 1e-6


def assert_close(out, ref, v, dtype):
    assert out.dtype == ref.dtype == dtype and out.shape == ref.shape
    err = (out.float() - ref.float()).abs().max().item()
    assert err <= tolerance(dtype, v), f"max abs error {err} > {tolerance(dtype, v)}"


# -- the case design --------------------------------------------------------------------------------

MASKS = ["causal", "window", "prefix", "prefix_window", "none"]
FACTORS = dict(
    mask=MASKS,
    softcap=[None, 2.0],  # 2.0: tanh is far from linear at unit-variance scores
    gqa=[(1, 1), (2, 1), (2, 2), (4, 2), (4, 1)],  # (query heads, kv heads): MHA, MQA and GQA
    q_offset=["zero", "int", "rows"],  # queries at the start, or inside a longer cache (chunked prefill)
    kv_lens=[False, True],  # per-row valid key lengths (right padding)
    head_dim=[16, 64, 72, 128, 256],
    dtype=[torch.float32, torch.float16],
    seq=[1, 7, 33, 130],  # odd lengths: a partial tile, one and a bit, several tiles (tiles are 32)
    scale=[None, 0.125],
)
CASES = pairwise(FACTORS, seed=3)
WINDOW = 5  # far shorter than the longer sequences, so whole key tiles are skipped


def build_case(case, seed=0):
    """Tensors and keyword arguments for one case of the design (batch of 2 rows)."""
    gen = torch.Generator().manual_seed(seed)
    q_heads, kv_heads = case["gqa"]
    seq, dim, dtype = case["seq"], case["head_dim"], case["dtype"]
    offsets = {"zero": (0, 0), "int": (9, 9), "rows": (9, 3)}[case["q_offset"]]
    kv_total = max(offsets) + seq + (3 if case["kv_lens"] else 0)
    kwargs = dict(scale=case["scale"], softcap=case["softcap"], causal=case["mask"] != "none")
    kwargs["q_offset"] = {"zero": 0, "int": 9, "rows": torch.tensor(offsets)}[case["q_offset"]]
    if case["kv_lens"]:
        # row 0: the cache minus its padding; row 1: shorter than its own queries reach
        kwargs["kv_lens"] = torch.tensor([kv_total - 3, max(1, offsets[1] + seq // 2)])
    if case["mask"] in ("window", "prefix_window"):
        kwargs["window"] = WINDOW
    if case["mask"] in ("prefix", "prefix_window"):
        kwargs["prefix_lens"] = torch.tensor([offsets[0] + seq // 2 + 1, 2])

    def randn(heads, length):
        return torch.randn(2, heads, length, dim, generator=gen).to(dtype)

    return randn(q_heads, seq), randn(kv_heads, kv_total), randn(kv_heads, kv_total), kwargs


def case_id(case):
    h, kvh = case["gqa"]
    return (f"{case['mask']}-cap{case['softcap']}-h{h}kv{kvh}-off_{case['q_offset']}-lens{int(case['kv_lens'])}"
            f"-d{case['head_dim']}-{str(case['dtype'])[6:]}-L{case['seq']}-s{case['scale']}")


def test_design_covers_every_pair_of_features():
    assert covers_all_pairs(FACTORS, CASES)
    assert len(CASES) < 40


@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_prefill_kernel_matches_reference(case):
    q, k, v, kwargs = build_case(case)
    if q.shape[2] == 1:  # the entry point would route this to the decode kernel; test prefill itself
        out = attention_module.attention_prefill_triton(q, k, v, **kwargs)
    else:
        out = attention(q, k, v, backend="triton", **kwargs)
    assert_close(out, attention_reference(q, k, v, **kwargs), v, case["dtype"])


CUDA_ONLY = pytest.mark.skipif(not torch.cuda.is_available(),
                               reason="compiled kernels need a CUDA GPU; the interpreted runs above cover the CPU")


@CUDA_ONLY
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_compiled_prefill_kernel_on_cuda(dtype):
    """The same design compiled on a GPU, bf16 included (the interpreter cannot check bf16)."""
    for case in CASES:
        q, k, v, kwargs = build_case({**case, "dtype": dtype})
        q, k, v = q.cuda(), k.cuda(), v.cuda()
        kwargs = {key: value.cuda() if isinstance(value, torch.Tensor) else value for key, value in kwargs.items()}
        out = attention_module.attention_prefill_triton(q, k, v, **kwargs)
        assert_close(out, attention_reference(q, k, v, **kwargs), v, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemma2_layer_shapes_and_odd_lengths(dtype):
    """Gemma 2 pattern (softcap 50 scaled to test size, window, GQA 2:1) at lengths 7, 33 and 130."""
    gen = torch.Generator().manual_seed(1)
    for seq in (7, 33, 130):
        q = (3 * torch.randn(1, 4, seq, 72, generator=gen)).to(dtype)  # larger scores: softcap bites
        k = (3 * torch.randn(1, 2, seq, 72, generator=gen)).to(dtype)
        v = torch.randn(1, 2, seq, 72, generator=gen).to(dtype)
        kwargs = dict(scale=72 ** -0.5, causal=True, window=31, softcap=5.0)
        out = attention(q, k, v, backend="triton", **kwargs)
        assert_close(out, attention_reference(q, k, v, **kwargs), v, dtype)


@pytest.mark.parametrize("causal,window", [(True, None), (True, 5), (True, 40), (False, None), (False, 7)])
def test_tile_edges_at_every_offset(causal, window):
    """Rows starting at every offset (and ending at every length) modulo the 32-key tile: each
    diagonal, window-edge and padding boundary, where the kernel switches between masked and
    unmasked tiles, falls on every key of a tile."""
    gen = torch.Generator().manual_seed(5)
    offsets = torch.arange(32)
    q = torch.randn(32, 1, 40, 16, generator=gen)
    k = torch.randn(32, 1, 72, 16, generator=gen)
    v = torch.randn(32, 1, 72, 16, generator=gen)
    kwargs = dict(q_offset=offsets, kv_lens=offsets + 40, causal=causal, window=window, softcap=2.0)
    out = attention(q, k, v, backend="triton", **kwargs)
    assert_close(out, attention_reference(q, k, v, **kwargs), v, torch.float32)


@pytest.mark.parametrize("q_len", [1, 9])  # the decode and the prefill kernel
@pytest.mark.parametrize("kv_lens", [12, 99])  # 99: more than the cache holds (clamped like the reference)
def test_every_row_argument_given_as_an_int(q_len, kv_lens):
    """Ints go to the kernels by value (no per-row tensor is built): the same results as tensors."""
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, q_len, 16, generator=gen)
    k, v = torch.randn(2, 1, 20, 16, generator=gen), torch.randn(2, 1, 20, 16, generator=gen)
    kwargs = dict(q_offset=3, kv_lens=kv_lens, prefix_lens=7, window=6)
    ref = attention_reference(q, k, v, **kwargs)
    assert_close(attention(q, k, v, backend="triton", **kwargs), ref, v, torch.float32)
    as_rows = {key: torch.full((2,), value) for key, value in kwargs.items() if key != "window"}
    assert_close(attention(q, k, v, backend="triton", window=6, **as_rows), ref, v, torch.float32)


def test_non_contiguous_inputs_as_the_models_pass_them():
    """Models pass q/k/v as transposes of (batch, seq, heads, dim) projections: strides, not copies."""
    gen = torch.Generator().manual_seed(2)
    q = torch.randn(2, 33, 4, 64, generator=gen).transpose(1, 2)
    k = torch.randn(2, 40, 2, 64, generator=gen).transpose(1, 2)
    v = torch.randn(2, 40, 2, 64, generator=gen).transpose(1, 2)
    kwargs = dict(q_offset=torch.tensor([7, 0]), kv_lens=torch.tensor([40, 33]), window=9)
    out = attention(q, k, v, backend="triton", **kwargs)
    assert_close(out, attention_reference(q, k, v, **kwargs), v, torch.float32)


def test_fully_masked_padding_queries_output_zeros():
    """ColPali-style bidirectional batch: a row with kv_lens 0 has no visible key at all."""
    q, k, v = (torch.randn(2, 2, 7, 16) for _ in range(3))
    out = attention(q, k, v, causal=False, kv_lens=torch.tensor([7, 0]), backend="triton")
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert out[0].abs().sum() > 0


# -- the reference against a direct evaluation of the rules -----------------------------------------

def direct_attention(q, k, v, *, scale, causal, window, softcap, prefix_lens, q_offset, kv_lens):
    """Per query, in float64, straight from the module docstring's visibility rule."""
    batch, q_heads, q_len, dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = torch.zeros(q.shape, dtype=torch.float64)
    for b in range(batch):
        for h in range(q_heads):
            kv_h = h // (q_heads // kv_heads)
            for i in range(q_len):
                p = q_offset[b] + i
                in_window = [window is None or p - window < j for j in range(kv_len)]
                prefix_pair = [j < prefix_lens[b] and p < prefix_lens[b] for j in range(kv_len)]
                if causal:  # window limits the causal part; prefix pairs see each other regardless
                    seen = [(j <= p and in_window[j]) or prefix_pair[j] for j in range(kv_len)]
                else:
                    seen = in_window
                keys = [j for j in range(kv_len) if j < kv_lens[b] and seen[j]]
                if not keys:
                    continue
                s = (k[b, kv_h, keys].double() @ q[b, h, i].double()) * scale
                if softcap is not None:
                    s = softcap * torch.tanh(s / softcap)
                out[b, h, i] = torch.softmax(s, 0) @ v[b, kv_h, keys].double()
    return out


@pytest.mark.parametrize("causal,window,prefix", [(True, None, None), (True, 3, None), (True, None, [4, 0]),
                                                  (True, 3, [5, 2]), (True, 2, [8, 7]), (False, None, None), (False, 2, None)])
def test_reference_follows_the_visibility_rule(causal, window, prefix):
    gen = torch.Generator().manual_seed(4)
    q = torch.randn(2, 4, 5, 8, generator=gen)
    k = torch.randn(2, 2, 9, 8, generator=gen)
    v = torch.randn(2, 2, 9, 8, generator=gen)
    offsets, lens = [4, 1], [9, 6]
    expected = direct_attention(q, k, v, scale=0.3, causal=causal, window=window, softcap=1.5,
                                prefix_lens=prefix or [0, 0], q_offset=offsets, kv_lens=lens)
    got = attention_reference(q, k, v, scale=0.3, causal=causal, window=window, softcap=1.5,
                              prefix_lens=None if prefix is None else torch.tensor(prefix),
                              q_offset=torch.tensor(offsets), kv_lens=torch.tensor(lens))
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=0)


# -- invalid arguments: clear errors before any launch -----------------------------------------------

@pytest.fixture
def no_launch(monkeypatch):
    """Replace every kernel with a recorder: a launch during validation fails the test."""
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            launched.append(grid)
            raise AssertionError("a kernel was launched")

    import gemma_kernels.decode as decode_module

    monkeypatch.setattr(attention_module, "_prefill_kernel", Recorder())
    monkeypatch.setattr(decode_module, "_decode_split_kernel", Recorder())
    return launched


def _qkv(q_heads=2, kv_heads=1, dim=64, q_len=5, kv_len=5, dtype=torch.float32):
    return (torch.randn(2, q_heads, q_len, dim, dtype=dtype), torch.randn(2, kv_heads, kv_len, dim, dtype=dtype),
            torch.randn(2, kv_heads, kv_len, dim, dtype=dtype))


@pytest.mark.parametrize("q_len", [1, 5])  # the decode and the prefill kernel
@pytest.mark.parametrize("make,message", [
    (lambda: _qkv(dim=8), "head_dim 8 is not supported"),
    (lambda: _qkv(dim=320), "head_dim 320 is not supported"),
    (lambda: _qkv(q_heads=3, kv_heads=2), "must divide query heads"),
    (lambda: (_qkv()[0], _qkv()[1].half(), _qkv()[2]), "dtypes differ"),
    (lambda: (_qkv()[0], _qkv()[1].to("meta"), _qkv()[2]), "devices differ"),
    (lambda: _qkv(dtype=torch.float64), "float16, bfloat16 or float32"),
])
def test_invalid_arguments_raise_before_launch(no_launch, make, message, q_len):
    q, k, v = make()
    q = q[:, :, :q_len]
    with pytest.raises(AttentionArgumentError, match=message):
        attention(q, k, v, backend="triton")
    assert no_launch == []


@pytest.mark.parametrize("kwargs,message", [
    (dict(q_offset=torch.tensor([1, 2, 3])), "q_offset must be"),
    (dict(kv_lens=torch.tensor([5.0, 5.0])), "kv_lens must hold integers"),
    (dict(prefix_lens=torch.tensor([[1, 2]])), "prefix_lens must be"),
    (dict(window=0), "window must be >= 1"),
    (dict(softcap=-1.0), "softcap must be > 0"),
])
def test_invalid_row_arguments_raise_before_launch(no_launch, kwargs, message):
    q, k, v = _qkv()
    for q_len in (1, 5):
        with pytest.raises(AttentionArgumentError, match=message):
            attention(q[:, :, :q_len], k, v, backend="triton", **kwargs)
    assert no_launch == []


def test_backend_selection(monkeypatch):
    q, k, v = _qkv()
    calls = []
    monkeypatch.setattr(attention_module, "_attention_triton", lambda *a, **kw: calls.append("triton"))
    attention(q, k, v)  # auto on CPU: the torch path
    assert calls == []
    attention(q, k, v, backend="triton")
    assert calls == ["triton"]
    monkeypatch.setenv("GEMMA_GROUNDING_ATTENTION", "triton")
    attention(q, k, v)
    assert calls == ["triton", "triton"]
    with pytest.raises(AttentionArgumentError, match="backend must be"):
        attention(q, k, v, backend="cuda")


def test_one_query_per_row_goes_to_the_decode_kernel(monkeypatch):
    import gemma_kernels.decode as decode_module

    calls = []
    real = decode_module.decode_attention_triton
    monkeypatch.setattr(decode_module, "decode_attention_triton",
                        lambda *a, **kw: calls.append("decode") or real(*a, **kw))
    q, k, v = _qkv(q_len=1, kv_len=9)
    attention_triton(q, k, v, q_offset=8)
    assert calls == ["decode"]
    attention_triton(*_qkv(q_len=3, kv_len=3))
    assert calls == ["decode"]


def test_triton_on_cpu_without_the_interpreter_says_what_to_do():
    code = ("import torch\nfrom gemma_kernels.attention import attention, AttentionArgumentError\n"
            "q = torch.randn(1, 1, 4, 16)\n"
            "try:\n    attention(q, q, q, backend='triton')\nexcept AttentionArgumentError as e:\n    print(e)\n")
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)
    assert "TRITON_INTERPRET=1" in result.stdout, result.stdout + result.stderr
