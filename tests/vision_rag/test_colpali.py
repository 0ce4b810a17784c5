"""The ColPali embedder against transformers' ColPaliForRetrieval and ColPaliProcessor.

The oracle is built from the same tiny random weights (every parameter randomised, norms included) and
saved in both merged layouts; ours loads the saved directory. Both sides get the same input ids, pixel
values and attention mask. transformers' ColPaliProcessor returns ``token_type_ids`` (all 0: no suffix),
which makes PaliGemma's mask one bidirectional block over the valid tokens; we pass them too, as the
processor's output would be passed on.

Tolerance 1e-5 on unit vectors: both sides do the same fp32 arithmetic in a different order (observed
differences ~1e-7); a wrong mask, position, scale or missing norm moves components by > 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import transformers
from PIL import Image
from safetensors.torch import load_file, save_file
from tiny_colpali import EMBEDDING_DIM, hf_colpali, paligemma_tokenizer, save_colpali

from models.loading import CheckpointError
from vision_rag.colpali import ColPaliEmbedder, ColPaliError, ColPaliSettings, load_colpali

ATOL = 1e-5
QUERIES = ["what is the total", "red circle", "revenue chart on the page, page 3?"]


@pytest.fixture(scope="module")
def tokenizer():
    return paligemma_tokenizer()


@pytest.fixture(scope="module", params=["gemma", "gemma2"])
def reference(request, tokenizer):
    """(transformers model, its checkpoint directory in the transformers layout)."""
    return hf_colpali(tokenizer, seed=1, text_type=request.param)


@pytest.fixture(scope="module")
def checkpoints(reference, tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("colpali")
    return {layout: save_colpali(reference, tokenizer, root / layout, layout) for layout in ("hf", "engine")}


@pytest.fixture(scope="module")
def embedder(checkpoints):
    return ColPaliEmbedder.load(checkpoints["hf"])


@pytest.fixture(scope="module")
def pages():
    rng = np.random.default_rng(3)
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(40, 30), (28, 28), (70, 50)]]


def processor(tokenizer, image_size=28, patch=14):
    """transformers' ColPaliProcessor over our tokenizer (the layout oracle)."""
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tokenizer.backend, bos_token="<bos>", eos_token="<eos>",
                                                pad_token="<pad>", unk_token="<unk>")
    images = transformers.SiglipImageProcessorPil(size={"height": image_size, "width": image_size}, resample=3,
                                                  image_mean=[0.5] * 3, image_std=[0.5] * 3)
    images.image_seq_length = (image_size // patch) ** 2
    return transformers.ColPaliProcessor(image_processor=images, tokenizer=fast)


def hf_embeddings(model, batch: dict) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch, token_type_ids=torch.zeros_like(batch["input_ids"])).embeddings


def test_input_layout_matches_colpali_processor(embedder, tokenizer, pages):
    proc = processor(tokenizer)
    expected = proc.process_images(pages[:2])
    ours = embedder.page_batch(pages[:2])
    assert ours["input_ids"].tolist() == expected["input_ids"].tolist()
    torch.testing.assert_close(ours["pixel_values"], expected["pixel_values"], atol=0, rtol=0)
    expected = proc.process_queries(QUERIES)
    ours = embedder.query_batch(QUERIES)
    assert ours["input_ids"].tolist() == expected["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == expected["attention_mask"].tolist()


def test_pinned_page_and_query_layouts(embedder, tokenizer):
    image, bos, pad, newline = tokenizer.token_to_id("<image>"), tokenizer.bos_id, tokenizer.pad_id, \
        tokenizer.token_to_id("\n")
    prompt = tokenizer.encode("Describe the image.", add_bos=False)
    n = embedder.num_image_tokens
    assert n == 4 and embedder.patch_grid == (2, 2)
    assert embedder.page_input_ids() == [image] * n + [bos] + prompt + [newline]  # 1030 tokens at 448 px
    double = ColPaliEmbedder(embedder.model, tokenizer, ColPaliSettings(page_double_bos=True))
    assert double.page_input_ids() == [image] * n + [bos, bos] + prompt + [newline]  # 1031 at 448 px
    question = tokenizer.encode("Question: red circle", add_bos=False)
    assert embedder.query_input_ids("red circle") == [bos] + question + [pad] * 10 + [newline]
    # The query's own words, for similarity maps: the prefix's trailing space merges into "▁red".
    labels = embedder.query_tokens("red circle")
    assert len(labels) == len(embedder.query_input_ids("red circle"))
    assert "".join(labels[i] for i in embedder.query_text_span("red circle")) == " red circle"
    custom = ColPaliEmbedder(embedder.model, tokenizer, ColPaliSettings(query_prefix="Query: ", query_augmentation_tokens=3))
    assert custom.query_input_ids("red circle") == [bos] + tokenizer.encode("Query: red circle", add_bos=False) + \
        [pad] * 3 + [newline]


def test_page_embeddings_match_transformers(embedder, reference, pages):
    got = embedder.embed_pages(pages, batch_size=2)  # batches of 2 and 1
    batch = embedder.page_batch(pages)
    expected = hf_embeddings(reference, batch)
    assert len(got) == len(pages)
    for g, e in zip(got, expected, strict=True):
        assert g.shape == (batch["input_ids"].shape[1], EMBEDDING_DIM) and g.dtype == torch.float32
        torch.testing.assert_close(g, e, atol=ATOL, rtol=0)
        torch.testing.assert_close(g.norm(dim=-1), torch.ones(len(g)), atol=1e-6, rtol=0)
    # Bidirectional: the image patches see the prompt after them; a causal mask would change them.
    with torch.no_grad():
        causal = reference(**batch).embeddings  # no token_type_ids: transformers' causal mask
    assert (causal[:, :embedder.num_image_tokens] - expected[:, :embedder.num_image_tokens]).abs().max() > 1e-2


def test_query_embeddings_match_transformers(embedder, reference):
    got = embedder.embed_queries(QUERIES, batch_size=2)
    batch = embedder.query_batch(QUERIES)
    expected = hf_embeddings(reference, batch)
    lengths = batch["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) > 1  # padding is exercised
    for g, e, n in zip(got, expected, lengths, strict=True):
        assert g.shape == (n, EMBEDDING_DIM)
        torch.testing.assert_close(g, e[:n], atol=ATOL, rtol=0)
        assert e[n:].abs().max() == 0 if n < e.shape[0] else True  # the oracle zeroes padding too
    # A query embeds the same alone as in a padded batch.
    alone = embedder.embed_queries(QUERIES[0])[0]
    torch.testing.assert_close(alone, got[0], atol=ATOL, rtol=0)


def test_both_layouts_load_identical_embeddings(checkpoints, embedder, pages):
    engine = ColPaliEmbedder.load(checkpoints["engine"])
    assert engine.model_id == embedder.model_id
    for a, b in zip(engine.embed_pages(pages[:2]), embedder.embed_pages(pages[:2]), strict=True):
        assert torch.equal(a, b)
    for a, b in zip(engine.embed_queries(QUERIES), embedder.embed_queries(QUERIES), strict=True):
        assert torch.equal(a, b)


def test_model_id_tells_models_apart(checkpoints, embedder, tokenizer, tmp_path):
    other = save_colpali(hf_colpali(tokenizer, seed=2), tokenizer, tmp_path / "other", "hf")
    assert ColPaliEmbedder.load(other).model_id != embedder.model_id
    reprompted = ColPaliEmbedder.load(checkpoints["hf"], settings=ColPaliSettings(query_prefix="Query: "))
    assert reprompted.model_id != embedder.model_id  # other inputs, other embedding space
    assert ColPaliEmbedder.load(checkpoints["hf"]).model_id == embedder.model_id  # stable across loads
    assert embedder.model_id.startswith("colpali-")


def test_half_precision_stays_close(checkpoints, embedder, pages):
    """bf16 weights (the GPU default) on CPU: unit vectors, within bf16 error of fp32."""
    half = ColPaliEmbedder.load(checkpoints["hf"], dtype="bfloat16")
    assert half.model.dtype == torch.bfloat16 and half.model_id == embedder.model_id
    for a, b in zip(half.embed_pages(pages[:1]), embedder.embed_pages(pages[:1]), strict=True):
        assert a.dtype == torch.float32
        assert (a * b).sum(-1).min() > 0.9  # cosine similarity per token


def test_bad_inputs(checkpoints, embedder, tokenizer, tmp_path):
    with pytest.raises(ColPaliError, match="non-empty"):
        embedder.embed_queries(["  "])
    with pytest.raises(ColPaliError, match="batch_size"):
        embedder.embed_queries(["x"], batch_size=0)
    # A plain PaliGemma checkpoint (no projection) is refused with a message saying so.
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_text((checkpoints["engine"] / "config.json").read_text())
    state = load_file(str(checkpoints["engine"] / "model.safetensors"))
    save_file({k: v for k, v in state.items() if not k.startswith("custom_text_proj")}, str(plain / "model.safetensors"))
    with pytest.raises(CheckpointError, match="projection"):
        ColPaliEmbedder.load(plain, tokenizer=checkpoints["engine"])
    with pytest.raises(FileNotFoundError):
        ColPaliEmbedder.load(tmp_path / "missing")
    # A tokenizer whose <image> id differs from the model's.
    model, _ = load_colpali(checkpoints["hf"])
    model.config.image_token_id = 3
    with pytest.raises(ColPaliError, match="<image>"):
        ColPaliEmbedder(model, tokenizer)


def test_sharded_checkpoint_loads_the_same(reference, tokenizer, embedder, tmp_path):
    """Published base checkpoints are sharded (model-0000k-of-0000n.safetensors + an index)."""
    reference.save_pretrained(tmp_path, max_shard_size="40KB")
    tokenizer.backend.save(str(tmp_path / "tokenizer.json"))
    assert (tmp_path / "model.safetensors.index.json").is_file() and len(list(tmp_path.glob("model-*.safetensors"))) > 1
    sharded = ColPaliEmbedder.load(tmp_path)
    assert sharded.model_id == embedder.model_id
    for a, b in zip(sharded.embed_queries(QUERIES), embedder.embed_queries(QUERIES), strict=True):
        assert torch.equal(a, b)
