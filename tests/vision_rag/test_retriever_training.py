"""ColPali retriever training: colpali-engine's losses against the formulas written out here, and a tiny
random ColPali (transformers' ColPaliForRetrieval weights) that learns to retrieve synthetic pages through
``gemma-ground train-retriever``, its adapter loading with ``ColPaliEmbedder.load(base, adapter=...)``."""

from __future__ import annotations

import contextlib
import io
import json
import math

import pytest
import torch
from PIL import Image
from tiny_colpali import hf_colpali, paligemma_tokenizer, save_colpali

from models.lora import LoraSettings
from models.train import TrainSettings
from vision_rag.colpali import ColPaliEmbedder
from vision_rag.retriever_training import (
    RetrieverTrainingError,
    hard_negative_loss,
    in_batch_cross_entropy_loss,
    pairwise_softplus_loss,
    read_pairs,
    retrieval_recall,
    train_retriever,
)

# -- the losses against their formulas -----------------------------------------------------------------------------


def embeddings(batch, tokens, lengths, seed):
    """Unit vectors, zero rows past each item's length (padding, as ColPali returns it); float64."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.nn.functional.normalize(torch.randn(batch, tokens, 16, generator=gen, dtype=torch.float64), dim=-1)
    for i, n in enumerate(lengths):
        x[i, n:] = 0
    return x


def maxsim_formula(q, d) -> float:
    """sum over the query's tokens of the best dot product with any of the page's tokens."""
    return sum(max(float(q[n] @ d[s]) for s in range(d.shape[0])) for n in range(q.shape[0]))


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))


def pairwise_formula(q, d) -> float:
    b = q.shape[0]
    s = [[maxsim_formula(q[i], d[j]) for j in range(b)] for i in range(b)]
    return sum(softplus(max(s[i][j] for j in range(b) if j != i) - s[i][i]) for i in range(b)) / b


def hard_negative_formula(q, d, n, in_batch: bool) -> float:
    b = q.shape[0]
    loss = sum(softplus(maxsim_formula(q[i], n[i]) - maxsim_formula(q[i], d[i])) for i in range(b)) / b
    return (loss + (pairwise_formula(q, d) if in_batch else 0.0)) / 2


def cross_entropy_formula(q, d, temperature: float, normalize: bool) -> float:
    b, total = q.shape[0], 0.0
    for i in range(b):
        tokens = sum(1 for n in range(q.shape[1]) if float(q[i, n].abs().sum()) != 0) if normalize else 1
        logits = [maxsim_formula(q[i], d[j]) / tokens / temperature for j in range(b)]
        top = max(logits)
        total += top + math.log(sum(math.exp(x - top) for x in logits)) - logits[i]
    return total / b


def test_losses_equal_their_formulas():
    q = embeddings(4, 6, [6, 3, 5, 2], seed=1)
    d = embeddings(4, 9, [9, 9, 7, 9], seed=2)
    n = embeddings(4, 9, [9, 8, 9, 9], seed=3)
    assert abs(float(pairwise_softplus_loss(q, d)) - pairwise_formula(q, d)) < 1e-6
    for in_batch in (True, False):
        assert abs(float(hard_negative_loss(q, d, n, in_batch_term=in_batch)) - hard_negative_formula(q, d, n, in_batch)) < 1e-6
    for temperature, normalize in ((0.02, True), (1.0, False)):
        got = float(in_batch_cross_entropy_loss(q, d, temperature=temperature, normalize_scores=normalize))
        assert abs(got - cross_entropy_formula(q, d, temperature, normalize)) < 1e-6
    with pytest.raises(RetrieverTrainingError, match="expected"):
        pairwise_softplus_loss(q, d[:3])


# -- a tiny ColPali learns to retrieve -----------------------------------------------------------------------------
COLOURS = {"red": (220, 30, 30), "blue": (30, 30, 220), "green": (30, 180, 30), "black": (0, 0, 0),
           "white": (255, 255, 255), "yellow": (230, 230, 20), "purple": (140, 20, 160), "grey": (128, 128, 128)}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A base checkpoint and a pairs file: eight one-colour pages, one query naming each, and bad rows."""
    root = tmp_path_factory.mktemp("retriever")
    tokenizer = paligemma_tokenizer()
    base = save_colpali(hf_colpali(tokenizer, seed=1), tokenizer, root / "base", "hf")
    rows = []
    for name, rgb in COLOURS.items():
        Image.new("RGB", (28, 28), rgb).save(root / f"{name}.png")
        other = list(COLOURS)[(list(COLOURS).index(name) + 1) % len(COLOURS)]
        rows.append({"query": f"the {name} page", "image": f"{name}.png", "negative": f"{other}.png"})
    (root / "broken.png").write_bytes(b"not a png")
    bad = [{"query": "no image"}, {"query": "gone", "image": "missing.png"}, {"query": "broken", "image": "broken.png"},
           {"image": "red.png"}]
    with (root / "pairs.jsonl").open("w") as f:
        for row in rows[:4] + bad + rows[4:]:
            f.write(json.dumps(row) + "\n")
    return base, root / "pairs.jsonl"


def test_train_retriever_command_learns_to_retrieve(corpus, tmp_path):
    from models.cli import main

    base, pairs = corpus
    out = tmp_path / "adapter"
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main(["train-retriever", "--base", str(base), "--pairs", str(pairs), "--out", str(out), "--lr", "1e-2",
                     "--epochs", "40", "--batch-size", "8", "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0",
                     "--max-grad-norm", "0", "--json"])
    assert code == 0, stderr.getvalue()
    result = json.loads(stdout.getvalue())
    assert result["pairs"]["reasons"] == {"missing image": 1, "missing file": 1, "unreadable file": 1, "missing query": 1}
    assert "8 of 12 pairs used" in stderr.getvalue()
    assert result["recall_before"]["recall@1"] <= 0.5  # chance is 1/8
    assert result["recall_after"]["recall@1"] >= 0.9
    losses = result["training"]["losses"]
    assert losses[-1] < losses[0] / 5

    config = json.loads((out / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["custom_text_proj"] and "language_model" in config["target_modules"]
    embedder = ColPaliEmbedder.load(base, adapter=out)  # merged at load time
    assert embedder.model_id != ColPaliEmbedder.load(base).model_id
    recall = retrieval_recall(embedder, read_pairs(pairs)[0])
    assert recall == pytest.approx(result["recall_after"], abs=1e-9)


def test_hard_negatives_with_lora_on_the_projection(corpus, tmp_path):
    """The other loss and vidore's adapter layout (LoRA on custom_text_proj): the trained in-process model and
    the adapter merged at load time give the same embeddings."""
    base, pairs = corpus
    embedder = ColPaliEmbedder.load(base)
    base_id = embedder.model_id
    result = train_retriever(base, pairs, tmp_path / "out", loss="hard-negative", projection="lora",
                             lora=LoraSettings(r=4, alpha=8), batch_size=4, embedder=embedder, recall=False,
                             train_settings=TrainSettings(learning_rate=1e-2, max_steps=4, max_grad_norm=None))
    assert result.training.steps == 4 and result.lora_modules == 2 * 7 + 1
    assert result.training.losses[-1] < result.training.losses[0]
    loaded = ColPaliEmbedder.load(base, adapter=tmp_path / "out")
    from safetensors.torch import load_file

    keys = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert "base_model.model.custom_text_proj.lora_A.weight" in keys  # vidore's names
    assert "base_model.model.model.language_model.model.layers.1.mlp.down_proj.lora_B.weight" in keys
    assert embedder.model_id != base_id  # the in-process embedder knows its weights changed
    queries = ["the red page", "the grey page"]
    for got, want in zip(loaded.embed_queries(queries), embedder.embed_queries(queries), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    with pytest.raises(RetrieverTrainingError, match="batch_size must be >= 2"):
        train_retriever(base, pairs, tmp_path / "x", batch_size=1, embedder=embedder)
