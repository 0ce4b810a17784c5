"""SAE training: the straight-through estimators against SAELens' (DeepMind's variant, no gradient to
the pre-activations through the step), the schedules against the paper's formulas, the on-disk
shuffling buffer, the corpus reader, and recovery of a planted dictionary.

Planted dictionary: 48 unit directions in 32 dimensions (non-orthogonal), each token a sparse mix of
about 3 of them with magnitudes in [3.5, 10.5] plus a constant offset; a 64-latent SAE trained through
the on-disk buffer must find every direction: mean over planted directions of the best cosine with a
learned decoder row >= 0.9 (the issue's bar; 0.98 in trials over four seeds).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models import sae_data
from models.sae_data import ActivationBuffer, SAEDataError, text_contexts
from models.sae_train import TrainConfig, jumprelu, learning_rate_factor, sparsity_factor, step, train_sae


@pytest.mark.parametrize("fn", ["jumprelu", "step"])
def test_straight_through_gradients_equal_saelens(fn):
    jr = pytest.importorskip("sae_lens.saes.jumprelu_sae")
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(64, 24, generator=gen)
    threshold = torch.rand(24, generator=gen) * 0.5
    grad_out = torch.randn(64, 24, generator=gen)
    bandwidth = 0.3  # wide enough that many pre-activations fall inside the kernel
    z1, t1 = z.clone().requires_grad_(), threshold.clone().requires_grad_()
    ours = (jumprelu if fn == "jumprelu" else step)(z1, t1, bandwidth)
    ours.backward(grad_out)
    z2, t2 = z.clone().requires_grad_(), threshold.clone().requires_grad_()
    theirs = (jr.JumpReLU if fn == "jumprelu" else jr.Step).apply(z2, t2, bandwidth, False)
    theirs.backward(grad_out)
    torch.testing.assert_close(ours, theirs, atol=0, rtol=0)
    assert t2.grad.abs().sum() > 0  # the kernel window caught some
    torch.testing.assert_close(t1.grad, t2.grad, atol=1e-6, rtol=1e-6)
    if fn == "jumprelu":
        torch.testing.assert_close(z1.grad, z2.grad, atol=0, rtol=0)
    else:
        assert z1.grad is None and z2.grad is None  # the L0 penalty trains the thresholds only


def test_schedules_follow_the_paper():
    assert learning_rate_factor(0, 1000) == pytest.approx(0.1)
    assert learning_rate_factor(500, 1000) == pytest.approx(0.55)
    assert learning_rate_factor(250, 1000) == pytest.approx(0.1 + 0.9 * (1 - math.cos(math.pi / 4)) / 2)
    assert learning_rate_factor(1000, 1000) == learning_rate_factor(10**6, 1000) == 1.0
    assert [sparsity_factor(s, 10) for s in (0, 5, 10, 20)] == [0.0, 0.5, 1.0, 1.0]
    assert learning_rate_factor(0, 0) == sparsity_factor(0, 0) == 1.0


def numbered_chunks(n_chunks: int, rows: int, width: int):
    """Chunks whose rows carry their global row number in column 0 and their chunk in column 1."""
    for c in range(n_chunks):
        chunk = torch.zeros(rows, width)
        chunk[:, 0] = torch.arange(c * rows, (c + 1) * rows)
        chunk[:, 1] = c
        yield chunk


def test_buffer_serves_every_row_once_mixed_and_leaves_no_file(tmp_path):
    path = tmp_path / "buffer.f32"
    with ActivationBuffer(path, capacity=400, width=3, seed=1) as buffer:
        assert path.stat().st_size == 400 * 3 * 4  # bounded: the pool is the only copy
        batches = list(buffer.batches(numbered_chunks(25, 50, 3), batch_size=64))
    assert not path.exists()
    rows = torch.cat(batches)
    assert sorted(rows[:, 0].long().tolist()) == list(range(25 * 50))
    assert all(len(b) == 64 for b in batches[:-1])
    first = batches[0][:, 1]
    assert len(set(first.long().tolist())) >= 6  # the first batch mixes the 8 chunks of the first fill
    # a chunk's rows are spread over many batches, not served together
    where = {int(r): i for i, b in enumerate(batches) for r in b[b[:, 1] == 12][:, 0]}
    assert len(set(where.values())) >= 4


def test_buffer_rejects_bad_settings(tmp_path):
    with ActivationBuffer(tmp_path / "b.f32", capacity=100, width=4) as buffer:
        with pytest.raises(SAEDataError, match="between 1 and half the buffer"):
            next(buffer.batches(numbered_chunks(2, 10, 4), batch_size=80))
        with pytest.raises(SAEDataError, match=r"must be \(rows, 4\)"):
            next(buffer.batches([torch.zeros(5, 3)], batch_size=10))


class LetterTokenizer:
    """One id per character (an independent, obviously right tokenizer for the corpus reader)."""

    bos_id = 0

    def encode(self, text, add_bos=True):
        return ([0] if add_bos else []) + [ord(c) for c in text]


def test_text_contexts_cover_the_file_in_order(tmp_path, monkeypatch):
    monkeypatch.setattr(sae_data, "_READ_CHARS", 37)  # many small reads, cut at newlines
    text = "".join(f"line {i} of the corpus, é and ü\n" for i in range(60))
    path = tmp_path / "corpus.txt"
    path.write_text(text, encoding="utf-8")
    contexts = list(text_contexts(LetterTokenizer(), path, context_len=17))
    assert all(len(c) == 17 and c[0] == 0 for c in contexts)
    body = [t for c in contexts for t in c[1:]]
    assert len(contexts) == len(text) // 16
    assert body == [ord(ch) for ch in text[:len(body)]]
    limited = list(text_contexts(LetterTokenizer(), path, context_len=17, max_tokens=100))
    assert len(limited) == 6 and limited == contexts[:6]


def test_text_contexts_bad_files(tmp_path):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait\n".encode("latin-1") * 10)
    with pytest.raises(SAEDataError, match="not UTF-8 text"):
        list(text_contexts(LetterTokenizer(), bad, 8))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    with pytest.raises(SAEDataError, match="the text has 4 tokens, fewer than one context of 15"):
        list(text_contexts(LetterTokenizer(), short, 16))
    with pytest.raises(FileNotFoundError):
        list(text_contexts(LetterTokenizer(), tmp_path / "missing.txt", 16))


D, N_PLANTED, P_ACTIVE = 32, 48, 0.06


def planted(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    directions = torch.randn(N_PLANTED, D, generator=gen)
    directions /= directions.norm(dim=1, keepdim=True)

    def chunks(n_chunks, rows):
        for _ in range(n_chunks):
            on = torch.rand(rows, N_PLANTED, generator=gen) < P_ACTIVE
            magnitude = torch.rand(rows, N_PLANTED, generator=gen) + 0.5
            yield (on * magnitude) @ directions * 7.0 + 1.0
    return directions, chunks


def test_training_recovers_a_planted_dictionary(tmp_path):
    directions, chunks = planted()
    config = TrainConfig(width=64, l0_coefficient=1e-2, lr=1e-2, lr_warmup_steps=50, sparsity_warmup_steps=250,
                         batch_size=512, seed=1)
    with ActivationBuffer(tmp_path / "b.f32", capacity=8192, width=D, seed=0) as buffer:
        sae, report = train_sae(buffer.batches(chunks(125, 4096), config.batch_size), D, config)
    assert report.steps == 1000 and report.tokens == 512_000
    learned = sae.W_dec.detach()
    torch.testing.assert_close(learned.norm(dim=1), torch.ones(64), atol=1e-5, rtol=0)  # unit decoder rows
    best_cos = (directions @ learned.T).max(dim=1).values
    assert best_cos.mean() >= 0.9, best_cos
    # the returned SAE takes raw activations (the training scale is folded in)
    x = next(chunks(1, 4096))
    with torch.no_grad():
        x_hat, acts = sae(x), sae.encode(x)
    fvu = float(((x - x_hat) ** 2).sum() / ((x - x.mean(0)) ** 2).sum())
    assert fvu < 0.2 and abs(fvu - report.final_fvu) < 0.05, (fvu, report.final_fvu)
    l0 = float((acts > 0).sum(1).float().mean())
    assert abs(l0 - report.final_l0) < 1.0 and 2.0 < l0 < 5.0  # about the planted 48 * 0.06 = 2.9


def test_scaling_the_inputs_scales_the_saved_sae():
    """Training normalises the inputs, so 10x the data gives the same SAE in normalised units: the
    saved (raw-unit) SAE must then reconstruct 10x inputs as 10x its reconstruction of the originals."""
    _, chunks = planted(seed=3)
    data = list(chunks(4, 256))
    config = TrainConfig(width=16, lr=1e-3, l0_coefficient=1e-2, lr_warmup_steps=2, sparsity_warmup_steps=2,
                         batch_size=256, seed=0)
    sae1, r1 = train_sae(iter(data), D, config)
    sae10, r10 = train_sae((x * 10 for x in data), D, config)
    assert r10.input_scale == pytest.approx(r1.input_scale / 10, rel=1e-6)
    x = data[0]
    with torch.no_grad():
        torch.testing.assert_close(sae10(10 * x), 10 * sae1(x), atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(sae10.encode(10 * x), 10 * sae1.encode(x), atol=1e-3, rtol=1e-4)
    assert np.isclose(r1.final_l0, r10.final_l0)


def test_bad_training_settings_are_named():
    with pytest.raises(ValueError, match="lr=0"):
        train_sae(iter([]), 4, TrainConfig(width=8, lr=0))
    with pytest.raises(ValueError, match="activation stream was empty"):
        train_sae(iter([]), 4, TrainConfig(width=8))
    with pytest.raises(ValueError, match=r"must be \(tokens, 4\)"):
        train_sae(iter([torch.zeros(3, 5)]), 4, TrainConfig(width=8))


def test_decoder_gradient_projection_builds_no_graph():
    """The projection runs on every step: done with grad mode on, it chained an autograd graph onto
    the gradient and memory grew by a batch-by-width tensor a step (seen in the real run)."""
    from models.sae_train import _project_decoder_gradient

    w = torch.nn.Parameter(torch.randn(8, 5))
    with torch.no_grad():
        w /= w.norm(dim=1, keepdim=True)
    w.grad = torch.randn(8, 5)
    _project_decoder_gradient(w)
    assert w.grad.grad_fn is None and not w.grad.requires_grad
    torch.testing.assert_close((w.grad * w).sum(1), torch.zeros(8), atol=1e-6, rtol=0)
