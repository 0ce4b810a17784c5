"""The variable search's cross-encoder: its arithmetic against transformers, its file format, and how it
reorders the reranker's best candidates.

- Pair scoring: a tiny random BERT (every parameter randomised, LayerNorm included) with random LoRA
  factors on every linear layer, against transformers' ``BertModel`` holding weights merged here with
  plain torch (``W + alpha / r * B @ A``), token types set by hand (0 up to the first [SEP], then 1),
  mean pooling over real tokens and the head: within 1e-5 (fp32, same arithmetic in another order; a
  missing LoRA factor, a wrong scale or wrong token types move the logits by > 1e-2).
- The search model file keeps the cross-encoder (fp16 tensors, settings) and older files still load.
- Reordering: with a stand-in scorer, the best ``k`` are ordered by ``ce + beta * logit(reranker score)``
  and scored ``sigmoid(scale * z + bias)``, computed here from the index's own scores without it.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import transformers
from search_support import TWINS
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from tokenizers.processors import BertProcessing

from grounding.cross_encoder import CrossEncoder, CrossEncoderError
from grounding.variable_index import (
    CrossEncoderSettings,
    SearchModel,
    VariableIndex,
    VariableIndexError,
    cross_encoder_text,
)
from models.bert import IGNORED_CHECKPOINT_KEYS, build_from_config, normalize_checkpoint_keys
from models.loading import assign_weights, read_hf_config, read_safetensors

WORDS = [f"w{i}" for i in range(90)]
TARGETS = ("query", "key", "value", "dense")


def tiny_tokenizer() -> Tokenizer:
    vocab = {"[PAD]": 0, "[UNK]": 1, "[CLS]": 2, "[SEP]": 3, **{w: i + 4 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = Whitespace()
    tok.post_processor = BertProcessing(("[SEP]", 3), ("[CLS]", 2))
    return tok


def tiny_bert(tmp_path):
    config = transformers.BertConfig(vocab_size=94, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=40, max_position_embeddings=32, type_vocab_size=2,
                                     layer_norm_eps=1e-12, hidden_act="gelu")
    config._attn_implementation = "eager"
    ref = transformers.BertModel(config, add_pooling_layer=False).eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in ref.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "LayerNorm" in name else 0.1))
    ref.save_pretrained(tmp_path)
    with torch.device("meta"):
        ours = build_from_config(read_hf_config(tmp_path))
    assign_weights(ours, normalize_checkpoint_keys(read_safetensors(tmp_path)), dtype=torch.float32, device="cpu",
                   ignored=IGNORED_CHECKPOINT_KEYS, source=str(tmp_path))
    return ref, ours.eval()


def random_factors(model, rank: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {}
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in TARGETS:
            out[f"{name}.lora_A.weight"] = rng.normal(0, 0.2, (rank, module.in_features)).astype(np.float32)
            out[f"{name}.lora_B.weight"] = rng.normal(0, 0.2, (module.out_features, rank)).astype(np.float32)
    return out


def test_pair_scores_match_transformers_with_merged_lora(tmp_path):
    ref, ours = tiny_bert(tmp_path)
    rank, alpha = 4, 6.0
    factors = random_factors(ours, rank)
    assert len(factors) == 2 * 2 * 6  # 2 layers x (q, k, v, attention out, intermediate, output) x (A, B)
    head_w = np.random.default_rng(2).normal(size=(1, 48)).astype(np.float32)
    tensors = {**factors, "head.weight": head_w, "head.bias": np.array([0.3], np.float32)}
    embedder = SimpleNamespace(model=ours, tokenizer=tiny_tokenizer())
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    cross = CrossEncoder.from_tensors(embedder, tensors, rank=rank, alpha=alpha)
    assert all(torch.equal(before[k], v) for k, v in ours.state_dict().items())  # the embedder's weights untouched

    rng = np.random.default_rng(3)
    pairs = [(" ".join(rng.choice(WORDS, size=a)), " ".join(rng.choice(WORDS, size=b)))
             for a, b in [(3, 5), (1, 12), (7, 2), (4, 4), (2, 9)]]
    got = cross.score(pairs, batch_size=2)

    with torch.no_grad():  # merge by hand into the reference
        for name, module in ref.named_modules():
            if f"{name}.lora_A.weight" in factors:
                a = torch.from_numpy(factors[f"{name}.lora_A.weight"])
                b = torch.from_numpy(factors[f"{name}.lora_B.weight"])
                module.weight += (alpha / rank) * b @ a
    vocab = tiny_tokenizer().get_vocab()
    expected = []
    for left, right in pairs:
        first = [vocab["[CLS]"], *(vocab[w] for w in left.split()), vocab["[SEP]"]]
        second = [*(vocab[w] for w in right.split()), vocab["[SEP]"]]
        ids = torch.tensor([first + second])
        types = torch.tensor([[0] * len(first) + [1] * len(second)])
        with torch.no_grad():
            hidden = ref(input_ids=ids, token_type_ids=types).last_hidden_state[0]
        expected.append(float(hidden.mean(0) @ torch.from_numpy(head_w[0]) + 0.3))
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    # Token types matter: the same pair read as one segment scores otherwise (so the check above can fail).
    ids = torch.tensor([[vocab["[CLS]"], *(vocab[w] for w in pairs[0][0].split()), vocab["[SEP]"],
                         *(vocab[w] for w in pairs[0][1].split()), vocab["[SEP]"]]])
    with torch.no_grad():
        flat = float(ref(input_ids=ids).last_hidden_state[0].mean(0) @ torch.from_numpy(head_w[0]) + 0.3)
    assert abs(flat - expected[0]) > 1e-3


def test_factors_that_do_not_fit_are_a_clear_error(tmp_path):
    _, ours = tiny_bert(tmp_path)
    factors = random_factors(ours, 4)
    head = {"head.weight": np.zeros((1, 48), np.float32), "head.bias": np.zeros(1, np.float32)}
    embedder = SimpleNamespace(model=ours, tokenizer=tiny_tokenizer())
    missing = dict(factors)
    missing.pop(next(iter(missing)))
    with pytest.raises(CrossEncoderError, match="do not fit"):
        CrossEncoder.from_tensors(embedder, {**missing, **head}, rank=4, alpha=8)
    with pytest.raises(CrossEncoderError, match="shape"):
        CrossEncoder.from_tensors(embedder, {**factors, **head}, rank=3, alpha=8)  # factors are rank 4
    with pytest.raises(CrossEncoderError, match="head"):
        CrossEncoder.from_tensors(embedder, factors, rank=4, alpha=8)
    with pytest.raises(CrossEncoderError, match="SentenceEmbedder"):
        CrossEncoder.from_tensors(SimpleNamespace(), {**factors, **head}, rank=4, alpha=8)


def test_search_model_file_keeps_the_cross_encoder(tmp_path):
    from safetensors.numpy import save_file

    base = SearchModel.default()
    rng = np.random.default_rng(4)
    tensors = {"encoder.layer.0.attention.self.query.lora_A.weight": rng.normal(size=(2, 8)).astype(np.float32),
               "head.weight": rng.normal(size=(1, 8)).astype(np.float32)}
    settings = CrossEncoderSettings(rank=2, alpha=4.0, k=7, beta=0.25, scale=1.5, bias=-0.75)
    model = SearchModel(down=base.down, up=base.up, base_fingerprint="fp", reranker=base.reranker,
                        cross_encoder=tensors, cross_encoder_settings=settings)
    model.save(tmp_path / "m.safetensors")
    back = SearchModel.load(tmp_path / "m.safetensors")
    assert back.cross_encoder_settings == settings
    assert set(back.cross_encoder) == set(tensors)
    for name, value in tensors.items():  # stored in fp16
        np.testing.assert_allclose(back.cross_encoder[name], value, rtol=1e-3, atol=1e-3)
        assert back.cross_encoder[name].dtype == np.float32
    # Without one, the file has none (and a model cannot have settings without tensors).
    SearchModel(down=base.down, up=base.up, base_fingerprint="fp", reranker=base.reranker).save(tmp_path / "n.safetensors")
    assert SearchModel.load(tmp_path / "n.safetensors").cross_encoder is None
    with pytest.raises(ValueError, match="both"):
        SearchModel(cross_encoder_settings=settings)
    meta = {"format": "3", "base_fingerprint": "x", "weights": base.weights.model_dump_json(), "threshold": "0.5",
            "cross_encoder": settings.model_dump_json()}
    save_file({"down": base.down, "up": base.up}, str(tmp_path / "settings_only.safetensors"), metadata=meta)
    with pytest.raises(VariableIndexError, match="settings_only.safetensors.*tensors"):
        SearchModel.load(tmp_path / "settings_only.safetensors")
    save_file({"down": base.down, "up": base.up, "ce.head.weight": tensors["head.weight"]},
              str(tmp_path / "bad_settings.safetensors"), metadata={**meta, "cross_encoder": '{"rank": "x"}'})
    with pytest.raises(VariableIndexError, match="bad_settings.safetensors"):
        SearchModel.load(tmp_path / "bad_settings.safetensors")
    save_file({"down": base.down, "up": base.up, "ce.head.weight": np.full((1, 8), np.nan, np.float16)},
              str(tmp_path / "nan.safetensors"), metadata=meta)
    with pytest.raises(VariableIndexError, match="nan.safetensors.*not finite.*head.weight"):
        SearchModel.load(tmp_path / "nan.safetensors")


class Scorer:
    """A stand-in cross-encoder: +4 for variables whose text says "female" or "imports", else 0."""

    def __init__(self):
        self.pairs = []

    def score(self, pairs):
        self.pairs += list(pairs)
        return np.array([4.0 if ("Female" in text or "Imports" in text) else 0.0 for _, text in pairs], np.float32)


@pytest.fixture(scope="module")
def embedder():
    from models.sentence_embedder import SentenceEmbedder

    return SentenceEmbedder.load()


def test_the_cross_encoder_reorders_the_reranked_best(embedder):
    index = VariableIndex.build(TWINS, embedder=embedder)
    assert index.reranker is not None and index._cross_settings is None  # opt-in: off by default
    query = "how many men live there"
    before = index.search(query, k=len(TWINS))  # the reranker alone
    settings = CrossEncoderSettings(rank=1, alpha=1.0, k=4, beta=0.5, scale=0.8, scale_reranker=0.3, bias=-1.0)
    scorer = Scorer()
    index._cross_settings, index._cross = settings, scorer
    after = index.search(query, k=len(TWINS))
    top = before[:4]
    assert [text for _, text in scorer.pairs] == [cross_encoder_text(index.doc(c.dcid)) for c in top]
    assert all(q == query for q, _ in scorer.pairs)

    def rl(c):
        p = min(max(c.score, 1e-6), 1 - 1e-6)
        return math.log(p / (1 - p))

    def z(c):
        return (4.0 if ("Female" in c.dcid or "Imports" in c.dcid) else 0.0) + 0.5 * rl(c)

    expected = sorted(top, key=lambda c: (-z(c), c.dcid))
    assert [c.dcid for c in after[:4]] == [c.dcid for c in expected]
    for got, want in zip(after[:4], expected, strict=True):
        # before's scores are rounded to 4 places, so z differs by up to ~1e-4 / p(1-p)
        assert got.score == pytest.approx(1 / (1 + math.exp(-(0.8 * z(want) + 0.3 * rl(want) - 1.0))), abs=2e-3)
    floor = min(c.score for c in after[:4])
    assert [c.dcid for c in after[4:]] == [c.dcid for c in before[4:]]
    assert all(c.score <= floor + 1e-9 for c in after[4:])
    # k=1 still reorders the best 4 (the answer must not depend on how many candidates are asked for).
    scorer.pairs.clear()
    assert index.search(query, k=1)[0].dcid == after[0].dcid and len(scorer.pairs) == 4


def test_the_shipped_cross_encoder_is_opt_in_and_applies_to_its_model(embedder, monkeypatch):
    from grounding.variable_index import CROSS_ENCODER_ENV

    shipped = SearchModel.default()
    assert shipped.cross_encoder is not None and shipped.applies_to(embedder)
    monkeypatch.delenv(CROSS_ENCODER_ENV, raising=False)
    assert VariableIndex.build(TWINS, embedder=embedder)._cross_settings is None
    assert VariableIndex.build(TWINS, embedder=embedder, cross_encoder=True)._cross_settings is not None
    monkeypatch.setenv(CROSS_ENCODER_ENV, "1")
    index = VariableIndex.build(TWINS, embedder=embedder)
    assert index._cross_settings == shipped.cross_encoder_settings
    found = index.search("how many women live there", k=3)  # the real cross-encoder, merged on first use
    assert found[0].dcid == "Count_Person_Female" and 0 <= found[0].score <= 1
    assert index._cross is not None
    assert VariableIndex.build(TWINS, embedder=embedder, cross_encoder=False)._cross_settings is None


def test_without_a_sentence_embedder_the_search_goes_on_without_it(embedder, caplog):
    class Wrapped:  # same model and fingerprint, but no BERT model or tokenizer to copy
        fingerprint, dim = embedder.fingerprint, embedder.dim

        def encode(self, texts):
            return embedder.encode(texts)

    index = VariableIndex.build(TWINS, embedder=Wrapped(), cross_encoder=True)
    plain = VariableIndex.build(TWINS, embedder=embedder)
    with caplog.at_level("WARNING"):
        found = index.search("how many women live there", k=3)
    assert "needs a SentenceEmbedder" in caplog.text
    assert [(c.dcid, c.score) for c in found] == [(c.dcid, c.score) for c in plain.search("how many women live there", k=3)]
