"""Experiment: fine-tune MiniLM's query side with LoRA for variable search, then measure both splits.

    python benchmarks/experiment_query_lora.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv [--rank 8 --epochs 2 --lr 5e-4]

The shipped search model corrects the query vector after the encoder (a rank-128 adapter,
``train_variable_search.py``). This experiment adapts the encoder itself, for queries only: LoRA
(rank ``--rank``, alpha 2x rank) on every linear layer of all-MiniLM-L6-v2 (query, key, value and the
dense projections; 332k parameters at rank 8, 0.66 MB in fp16) is trained with a softmax over ALL
catalogue variables (each scored by its best view, temperature 0.05), so every other variable is a
negative, the near-twins included. The variables' vectors stay the base model's: the vectors cached
in a store need no re-embedding. Training reads ONLY the tuning half (split by variable,
``eval_variable_search.is_tuning_variable``); the fusion weights are then fitted on the tuning half
(``train_variable_search.fit_fusion``), and only then is the held-out half encoded and scored.

Seeded (torch, data order, LoRA init). The LoRA factors are written to ``--out`` (safetensors) for
inspection; nothing here changes the shipped model. On this project's shared 2-core CPU (load 7-8)
2 epochs took 21 minutes and encoding the 8,216 queries 5 more.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_variable_search import (  # noqa: E402
    accuracy,
    catalog_docs,
    fmt,
    is_tuning_variable,
    open_catalog_index,
    read_rows,
    statistic_phrase,
)
from train_variable_search import fit_fusion  # noqa: E402

from grounding.gazetteer import Gazetteer  # noqa: E402
from grounding.variable_index import SearchModel, VariableIndex  # noqa: E402

TEMPERATURE = 0.05  # as the shipped adapter's training
BATCH = 64


def encode(embedder, texts: list[str]) -> torch.Tensor:
    """Pooled (and normalised) embeddings with gradients, through the embedder's own model."""
    encodings = embedder.tokenizer.encode_batch(texts)
    lengths = torch.tensor([len(e.ids) for e in encodings], dtype=torch.int32)
    ids = torch.zeros(len(texts), int(lengths.max()), dtype=torch.long)
    for j, e in enumerate(encodings):
        ids[j, : len(e.ids)] = torch.tensor(e.ids)
    return embedder._pool(embedder.model(ids, lengths), lengths)


def train(embedder, phrases: list[str], gold: np.ndarray, index: VariableIndex, *, rank: int, epochs: int,
          lr: float, seed: int) -> dict[str, torch.Tensor]:
    from models.lora import LoraSettings, add_lora

    add_lora(embedder.model, LoraSettings(r=rank, alpha=2 * rank, targets=["query", "key", "value", "dense"]),
             seed=seed)
    params = [p for p in embedder.model.parameters() if p.requires_grad]
    print(f"LoRA rank {rank}: {sum(p.numel() for p in params)} trainable parameters", flush=True)
    views = torch.tensor(index.view_vectors)
    owner = torch.tensor(index.view_owner)
    n_docs = len(index.docs)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    embedder.model.train()
    for epoch in range(epochs):
        order = torch.randperm(len(phrases), generator=gen).numpy()
        total, start = 0.0, time.perf_counter()
        for s in range(0, len(order), BATCH):
            batch = order[s:s + BATCH]
            logits = encode(embedder, [phrases[i] for i in batch]) @ views.T / TEMPERATURE
            doc_logits = torch.full((len(batch), n_docs), -1e9).scatter_reduce(
                1, owner.expand(len(batch), -1), logits, "amax")
            loss = torch.nn.functional.cross_entropy(doc_logits, torch.tensor(gold[batch]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(phrases):.4f} ({time.perf_counter() - start:.0f} s)",
              flush=True)
    embedder.model.eval()
    return {k: v.detach().to(torch.float16).contiguous() for k, v in embedder.model.state_dict().items() if "lora_" in k}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="use every n-th query only (smoke runs)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "varsearch")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "varsearch" / "query_lora.safetensors")
    args = parser.parse_args(argv)

    from safetensors.torch import save_file

    from models.sentence_embedder import SentenceEmbedder

    torch.manual_seed(args.seed)
    embedder = SentenceEmbedder.load()
    docs = catalog_docs(args.catalog)
    position = {d.dcid: i for i, d in enumerate(docs)}
    rows = [r for r in read_rows(args.queries, ("Query", "SV")) if r["SV"] in position]
    if args.limit:
        rows = rows[:: max(1, len(rows) // args.limit)]
    index = open_catalog_index(docs, embedder, args.cache, search_model=SearchModel())
    gazetteer = Gazetteer.default()
    phrases = [statistic_phrase(r["Query"], gazetteer)[0] for r in rows]
    gold = np.array([position[r["SV"]] for r in rows])
    tuning = np.array([is_tuning_variable(r["SV"]) for r in rows])
    tune_rows = np.flatnonzero(tuning)
    print(f"{len(tune_rows)} tuning queries, {(~tuning).sum()} held out", flush=True)

    start = time.perf_counter()
    factors = train(embedder, [phrases[i] for i in tune_rows], gold[tune_rows], index, rank=args.rank,
                    epochs=args.epochs, lr=args.lr, seed=args.seed)
    print(f"training: {time.perf_counter() - start:.0f} s", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save_file(factors, str(args.out), metadata={"rank": str(args.rank), "epochs": str(args.epochs),
                                                "base_fingerprint": embedder.fingerprint})
    with torch.inference_mode():
        vectors = embedder.encode(phrases)  # the LoRA'd model: every query, tuning half first used below

    features, labels = [], []
    for i in tune_rows:  # fusion weights from the tuning half only
        found = index.candidate_features(phrases[i], vectors[i])
        features.append(np.array([[dense, lexical] for _, dense, lexical in found], dtype=np.float32))
        labels.append(next((j for j, (d, _, _) in enumerate(found) if d == gold[i]), -1))
    index.weights = fit_fusion(features, labels)
    ranked = [[c.dcid for c in found] for found in index.search_many(phrases, k=10, embeddings=vectors)]
    dcids = [docs[g].dcid for g in gold]
    print("\n| method | all | tuning split | held-out split |\n|---|---|---|---|")
    print(f"| query-side LoRA (rank {args.rank}, {args.epochs} epochs) + lexical fusion | {fmt(accuracy(ranked, dcids))} | "
          f"{fmt(accuracy(ranked, dcids, tuning))} | {fmt(accuracy(ranked, dcids, ~tuning))} |")
    t1, t3, t10 = accuracy(ranked, dcids, ~tuning)
    print(f"held-out top1={t1:.3f} top3={t3:.3f} top10={t10:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
