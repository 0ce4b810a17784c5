"""End-to-end on the real Gemma 3 270M (base) Q4_K_M GGUF: our loader, model and generation against
transformers loading the same file.

Both sides dequantise the same quantised tensors with the gguf package to fp32 and run the same fp32
math in a different order, so logits agree to ~1e-5; the tolerance is 1e-3 absolute on logits of
order 10-40 (what the issue asks), and greedy continuations must be identical token for token.
"""

from __future__ import annotations

import shutil

import pytest
import torch

from models import generate_ids, load_model
from models.gguf import GGUFError, read_gguf_metadata

PROMPTS = [
    "The capital of France is",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n"
    "\n# 中文 العربية 😀\ttabs\t\tand   spaces",
]


def test_config_read_from_gguf_metadata(gemma3_270m_model):
    """The published Gemma 3 270M shapes (reference/models.md), with Gemma 3 defaults for absent keys."""
    c = gemma3_270m_model.config
    assert (c.architecture, c.vocab_size, c.hidden_size, c.intermediate_size, c.num_hidden_layers) == \
        ("gemma3", 262144, 640, 2048, 18)
    assert (c.num_attention_heads, c.num_key_value_heads, c.head_dim, c.sliding_window) == (4, 1, 256, 512)
    assert (c.rope_theta, c.rope_local_base_freq, c.query_pre_attn_scalar) == (1e6, 1e4, 256)
    assert c.attn_logit_softcapping is None and c.final_logit_softcapping is None
    assert [i for i, t in enumerate(c.layer_types) if t == "full_attention"] == [5, 11, 17]
    assert next(gemma3_270m_model.parameters()).dtype == torch.float32


@pytest.mark.parametrize("prompt", PROMPTS, ids=["france", "code-multilingual"])
def test_logits_match_transformers_from_the_same_gguf(gemma3_270m_model, hf_gemma3_270m_model,
                                                     gemma3_270m_tokenizer, prompt):
    ids = torch.tensor([gemma3_270m_tokenizer.encode(prompt)])
    with torch.no_grad():
        expected = hf_gemma3_270m_model(ids).logits
        got = gemma3_270m_model(ids)
    assert got.shape == expected.shape == (1, ids.shape[1], 262144)
    assert expected[0, -1].abs().max() > 10  # real logits, not a degenerate model
    torch.testing.assert_close(got[0, -1], expected[0, -1], atol=1e-3, rtol=0)
    torch.testing.assert_close(got, expected, atol=1e-3, rtol=0)  # every position, not only the last


def test_greedy_continuation_matches_transformers(gemma3_270m_model, hf_gemma3_270m_model,
                                                  gemma3_270m_tokenizer):
    prompt = gemma3_270m_tokenizer.encode("The capital of France is")
    ours = generate_ids(gemma3_270m_model, [prompt], max_new_tokens=20)[0]
    ids = torch.tensor([prompt])
    with torch.no_grad():
        reference = hf_gemma3_270m_model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20,
                                                  do_sample=False)
    reference = reference[0, len(prompt):].tolist()
    assert len(reference) == 20
    assert ours == reference
    # The published fp32 greedy continuation (reference/models.md).
    assert gemma3_270m_tokenizer.decode(ours).startswith(" the capital of the country of France.")


def test_truncated_real_file(gemma3_270m_gguf, tmp_path):
    """Cut inside the vocabulary of the header: a clear error naming the file, not a numpy traceback."""
    cut = tmp_path / "gemma-3-270m-cut.gguf"
    with gemma3_270m_gguf.open("rb") as src, cut.open("wb") as dst:
        dst.write(src.read(1 << 20))
    with pytest.raises(GGUFError, match="truncated") as info:
        load_model(cut)
    assert str(cut) in str(info.value)


def test_not_a_gguf_and_missing_file(tmp_path):
    fake = tmp_path / "model.gguf"
    shutil.copyfile(__file__, fake)
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_model(fake)
    with pytest.raises(FileNotFoundError, match="no such GGUF file"):
        load_model(tmp_path / "absent.gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        read_gguf_metadata(fake)


def test_int8_mode_greedy_tokens_equal_fp32(gemma3_270m_gguf, gemma3_270m_model, gemma3_270m_tokenizer):
    """``quantize="int8"`` (int8 projections, int4 LM head rescored exactly) keeps the first 32 greedy
    tokens of the fp32 model on the real weights (issue 17's bar for a fast CPU mode).

    Checked with one fp32 forward over prompt + the int8 continuation: each token must be fp32's
    argmax after the same prefix, which is what makes two greedy continuations identical. One
    exception is allowed and checked: a step where fp32's own two best logits are within ``near_tie``
    of each other, which any rounding may flip (the France prompt has one at its 32nd token: 20.922 vs
    20.903); the comparison ends there.
    """
    near_tie = 0.05
    quantized = load_model(gemma3_270m_gguf, quantize="int8")
    assert getattr(quantized, "lm_head_quantized", None) is not None
    full_matches = 0
    threads = torch.get_num_threads()
    # One torch thread: on this shared 2-core machine every op of a 2-thread run waits at a barrier
    # for a time slice (this test took ~100 s that way, ~10 s on one thread); the results are the same.
    torch.set_num_threads(1)
    try:
        outcomes = [_int8_first_difference(quantized, gemma3_270m_model, gemma3_270m_tokenizer.encode(p))
                    for p in PROMPTS]
    finally:
        torch.set_num_threads(threads)
    for prompt, (first_diff, gap) in zip(PROMPTS, outcomes, strict=True):
        if first_diff is None:
            full_matches += 1
        else:
            assert first_diff >= 24 and gap < near_tie, (prompt, first_diff, gap)
    assert full_matches >= 1


def _int8_first_difference(quantized, fp32_model, ids: list[int]) -> tuple[int | None, float]:
    """First of 32 greedy int8 tokens that is not fp32's argmax after the same prefix, and fp32's
    gap between its two best logits there."""
    got = generate_ids(quantized, [ids], max_new_tokens=32, stop_token_ids=[])[0]
    with torch.no_grad():
        best = fp32_model(torch.tensor([ids + got[:-1]]))[0, len(ids) - 1:].topk(2, dim=-1)
    first_diff = next((i for i, t in enumerate(got) if t != int(best.indices[i, 0])), None)
    gap = 0.0 if first_diff is None else float(best.values[first_diff, 0] - best.values[first_diff, 1])
    return first_diff, gap
