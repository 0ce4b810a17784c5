"""Query-likelihood reranking with a Gemma language model (``grounding.lm_reranker``) and its stage in the
variable search.

- Scores: a tiny random Gemma 3 (every parameter randomised, norms included) loaded by our loader from a
  transformers checkpoint, against transformers' ``Gemma3ForCausalLM`` on the same weights, each
  variable's sequence run alone (no padding, no batching) and ``log_softmax`` summed over the phrase's
  tokens: within 1e-4 (fp32 sums of ~10 log-probabilities of order 1-10, same math in another order; an
  off-by-one position or a padding leak moves a sum by > 0.1).
- The stage: with stand-in scorers, the best ``k`` are ordered by ``z + weight * log P`` (``z`` the
  reranker's logit, or the cross-encoder's combination) and scored by the settings' Platt scaling,
  computed here from the index's own scores without it; settings round-trip through the search model file.
- Bad input: a missing model path is a typed error naming it, at construction; 10,000-character phrases
  are cut, not run.
- Real weights: Gemma 3 270M of the test dependencies, through the shipped settings.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import transformers
from search_support import TWINS

from grounding.lm_reranker import MAX_QUERY_TOKENS, LMRerankerError, QueryLikelihoodReranker
from grounding.variable_index import (
    LM_RERANKER_ENV,
    CrossEncoderSettings,
    LMCombination,
    LMRerankerSettings,
    SearchModel,
    VariableIndex,
)
from models import load_model

VOCAB = 101


class CharTokenizer:
    """Characters to ids 3..VOCAB-1 (0 pad, 1 eos, 2 bos): enough to test the scoring's positions."""

    bos_id = 2

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        ids = [3 + ord(c) % (VOCAB - 3) for c in text]
        return [self.bos_id, *ids] if add_bos else ids


def tiny_pair(tmp_path):
    config = transformers.Gemma3TextConfig(
        vocab_size=VOCAB, hidden_size=48, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=24, max_position_embeddings=512, pad_token_id=0, eos_token_id=1,
        bos_token_id=2, sliding_window=16, query_pre_attn_scalar=24,
        layer_types=["sliding_attention", "full_attention"])
    config._attn_implementation = "eager"
    ref = transformers.Gemma3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "norm" in name else 0.15))
    ref.save_pretrained(tmp_path)
    return ref, load_model(tmp_path)


def oracle(ref, tokenizer, template: str, phrase: str, name: str) -> float:
    prompt = tokenizer.encode(template.format(variable=name), add_bos=True)
    target = tokenizer.encode(" " + phrase, add_bos=False)[:MAX_QUERY_TOKENS]
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([prompt + target])).logits[0].double(), -1)
    return float(sum(logp[len(prompt) - 1 + t, tok] for t, tok in enumerate(target)))


def test_scores_match_transformers(tmp_path):
    ref, ours = tiny_pair(tmp_path)
    tokenizer = CharTokenizer()
    lm = QueryLikelihoodReranker(ours, tokenizer)
    names = ["Female Population", "Median Age", "Number of Households Without Children Under 18"]  # unequal lengths
    for phrase in ("how many women", "age of people here"):
        got = lm.score(phrase, names)
        want = [oracle(ref, tokenizer, lm.template, phrase, n) for n in names]
        assert got.dtype == np.float32 and got.shape == (3,)
        assert max(abs(w) for w in want) > 10  # sums of a meaningful size
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
        assert len(set(np.round(got, 3))) == 3  # the names matter
    # A 10,000-character phrase is cut to its first MAX_QUERY_TOKENS tokens, not run whole.
    long = "women " * 1700
    np.testing.assert_allclose(lm.score(long, names[:1]), [oracle(ref, tokenizer, lm.template, long, names[0])],
                               atol=1e-4)
    assert lm.score("", names).tolist() == [0.0, 0.0, 0.0]
    assert lm.score("women", []).shape == (0,)
    with pytest.raises(ValueError, match="variable"):
        QueryLikelihoodReranker(ours, tokenizer, template="no placeholder")


def test_a_missing_or_unreadable_model_is_a_clear_error(tmp_path, monkeypatch, embedder):
    with pytest.raises(LMRerankerError, match="nowhere.gguf: no such language model"):
        QueryLikelihoodReranker.load(tmp_path / "nowhere.gguf")
    (tmp_path / "empty").mkdir()
    with pytest.raises(LMRerankerError, match="empty: cannot load it"):
        QueryLikelihoodReranker.load(tmp_path / "empty")
    with pytest.raises(LMRerankerError, match="nowhere.gguf: no such language model"):
        VariableIndex.build(TWINS[:3], embedder=embedder, lm_reranker=tmp_path / "nowhere.gguf")
    monkeypatch.setenv(LM_RERANKER_ENV, str(tmp_path / "nowhere.gguf"))
    with pytest.raises(LMRerankerError, match="nowhere.gguf"):
        VariableIndex.build(TWINS[:3], embedder=embedder)


@pytest.fixture(scope="module")
def embedder():
    from models.sentence_embedder import SentenceEmbedder

    return SentenceEmbedder.load()


class LikelihoodStandIn:
    """log P: -1 for names with "Female" or "Imported", -5 for the others; records what it was asked."""

    def __init__(self):
        self.calls = []

    def score(self, phrase, names):
        self.calls.append((phrase, list(names)))
        return np.array([-1.0 if ("Female" in n or "Imported" in n) else -5.0 for n in names], np.float32)


class CrossStandIn:
    def score(self, pairs):
        return np.array([3.0 if "Male" in text and "Female" not in text else 0.0 for _, text in pairs], np.float32)


def _logit(score: float) -> float:
    p = min(max(score, 1e-6), 1 - 1e-6)
    return math.log(p / (1 - p))


SETTINGS = LMRerankerSettings(k=4, after_reranker=LMCombination(weight=0.7, scale=0.9, scale_reranker=0.2, bias=-0.5),
                              after_cross_encoder=LMCombination(weight=2.0, scale=0.5, scale_reranker=0.1, bias=0.3))


def test_the_language_model_reorders_the_reranked_best(embedder, monkeypatch):
    monkeypatch.delenv(LM_RERANKER_ENV, raising=False)
    index = VariableIndex.build(TWINS, embedder=embedder)
    assert index._lm_settings is None  # opt-in: off by default
    query = "how many men live there"
    before = index.search(query, k=len(TWINS))
    lm = LikelihoodStandIn()
    index._lm_settings, index._lm = SETTINGS, lm
    after = index.search(query, k=len(TWINS))
    top = before[:4]
    assert lm.calls == [(query, [index.doc(c.dcid).name for c in top])]

    def ll(c):
        return -1.0 if ("Female" in c.dcid or "Imports" in c.dcid) else -5.0

    c = SETTINGS.after_reranker
    expected = sorted(top, key=lambda x: (-(_logit(x.score) + c.weight * ll(x)), x.dcid))
    assert [x.dcid for x in after[:4]] == [x.dcid for x in expected]
    assert [x.dcid for x in after[:4]] != [x.dcid for x in top]  # the stand-in did move something
    zs = {x.dcid: _logit(x.score) + c.weight * ll(x) for x in top}
    norm = math.log(sum(math.exp(v) for v in zs.values()))
    for got, want in zip(after[:4], expected, strict=True):
        # before's scores are rounded to 4 places, so z differs by up to ~1e-4 / p(1-p)
        share = zs[want.dcid] - norm
        platt = 1 / (1 + math.exp(-(c.scale * share + c.scale_reranker * _logit(want.score) + c.bias)))
        assert got.score == pytest.approx(min(platt, before[0].score), abs=2e-3)
    assert [x.dcid for x in after[4:]] == [x.dcid for x in before[4:]]
    assert all(x.score <= min(y.score for y in after[:4]) + 1e-9 for x in after[4:])
    # The reason says what the language model said (explainable in --json and the web app).
    assert all(f"language model log P(question | name) {ll(x):.1f}" in x.reason for x in after[:4])
    assert not any("language model" in x.reason for x in after[4:])

    # With the cross-encoder too, its combination is the base and the second weight applies.
    index._cross_settings = CrossEncoderSettings(rank=1, alpha=1.0, k=4, beta=0.5, scale=1.0, bias=0.0)
    index._cross = CrossStandIn()
    both = index.search(query, k=len(TWINS))
    c = SETTINGS.after_cross_encoder

    def z_both(x):
        ce = 3.0 if x.dcid == "Count_Person_Male" else 0.0
        return ce + 0.5 * _logit(x.score) + c.weight * ll(x)

    assert [x.dcid for x in both[:4]] == [x.dcid for x in sorted(top, key=lambda x: (-z_both(x), x.dcid))]
    best = max(top, key=lambda x: (z_both(x), x.dcid))
    share = z_both(best) - math.log(sum(math.exp(z_both(x)) for x in top))
    platt = 1 / (1 + math.exp(-(c.scale * share + c.scale_reranker * _logit(best.score) + c.bias)))
    assert both[0].score == pytest.approx(min(platt, before[0].score), abs=2e-3)
    # A language-model window smaller than the cross-encoder's: it reorders the best 2 of the cross-encoder's
    # order; the other 2 keep that order below them, scored no higher.
    index._lm_settings = SETTINGS.model_copy(update={"k": 2})
    narrow = index.search(query, k=len(TWINS))

    def z_ce(x):
        return (3.0 if x.dcid == "Count_Person_Male" else 0.0) + 0.5 * _logit(x.score)

    by_ce = sorted(top, key=lambda x: (-z_ce(x), x.dcid))
    head = sorted(by_ce[:2], key=lambda x: (-(z_ce(x) + c.weight * ll(x)), x.dcid))
    assert [x.dcid for x in narrow[:4]] == [x.dcid for x in head + by_ce[2:]]
    zh = {x.dcid: z_ce(x) + c.weight * ll(x) for x in by_ce[:2]}
    norm = math.log(sum(math.exp(v) for v in zh.values()))
    head_scores = [min(before[0].score, 1 / (1 + math.exp(-(c.scale * (zh[x.dcid] - norm)
                                                             + c.scale_reranker * _logit(x.score) + c.bias))))
                   for x in head]
    assert [x.score for x in narrow[:2]] == pytest.approx(head_scores, abs=2e-3)
    assert all(x.score <= min(head_scores) + 2e-3 for x in narrow[2:])
    assert sum("language model" in x.reason for x in narrow) == 2
    # Never above the reranker's best: a generous calibration cannot make the search answer more often.
    generous = LMRerankerSettings(k=4, after_reranker=LMCombination(weight=1.0, scale=1.0, bias=50.0))
    index._cross_settings, index._cross, index._lm_settings = None, None, generous
    assert [x.score for x in index.search(query, k=4)] == pytest.approx([before[0].score] * 4, abs=1e-4)


def test_switches_and_settings_file(embedder, tmp_path, monkeypatch, caplog):
    base = SearchModel.default()
    model = SearchModel(down=base.down, up=base.up, base_fingerprint=base.base_fingerprint, reranker=base.reranker,
                        lm_reranker_settings=SETTINGS)
    model.save(tmp_path / "m.safetensors")
    back = SearchModel.load(tmp_path / "m.safetensors")
    assert back.lm_reranker_settings == SETTINGS
    plain = SearchModel(down=base.down, up=base.up, base_fingerprint=base.base_fingerprint, reranker=base.reranker)
    plain.save(tmp_path / "plain.safetensors")
    assert SearchModel.load(tmp_path / "plain.safetensors").lm_reranker_settings is None  # optional in format 3

    stand_in = LikelihoodStandIn()
    monkeypatch.delenv(LM_RERANKER_ENV, raising=False)
    assert VariableIndex.build(TWINS, embedder=embedder, search_model=back)._lm_settings is None
    for off in ("0", "off", "none", ""):
        monkeypatch.setenv(LM_RERANKER_ENV, off)
        assert VariableIndex.build(TWINS, embedder=embedder, search_model=back)._lm_settings is None
    monkeypatch.setenv(LM_RERANKER_ENV, "1")
    index = VariableIndex.build(TWINS, embedder=embedder, search_model=back)
    assert index._lm_settings == SETTINGS and index._lm is None  # the default model, loaded on first use
    index = VariableIndex.build(TWINS, embedder=embedder, search_model=back, lm_reranker=stand_in)
    assert index._lm is stand_in
    index.search("women", k=2)
    assert stand_in.calls
    # A search model without settings for it: a warning, and the search goes on as before.
    with caplog.at_level("WARNING"):
        index = VariableIndex.build(TWINS, embedder=embedder, search_model=plain, lm_reranker=stand_in)
    assert index._lm_settings is None and "no settings for it" in caplog.text


def test_real_gemma_through_the_shipped_settings(embedder, monkeypatch):
    shipped = SearchModel.default()
    assert shipped.lm_reranker_settings is not None and shipped.lm_reranker_settings.after_reranker.weight > 0
    monkeypatch.delenv(LM_RERANKER_ENV, raising=False)
    index = VariableIndex.build(TWINS, embedder=embedder, lm_reranker=True)
    found = index.search("how many women live there", k=3)
    assert found[0].dcid == "Count_Person_Female" and 0 <= found[0].score <= 1
    lm = index._lm
    assert isinstance(lm, QueryLikelihoodReranker) and lm.source.endswith(".gguf")
    # The real model prefers the variable that explains the question's words.
    scores = lm.score("how many people are divorced", ["Divorced Population", "Separated Population"])
    assert scores[0] > scores[1]
    assert index.search("x" * 10_000, k=3) is not None  # cut, not run whole: no crash
