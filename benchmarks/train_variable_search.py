"""Train the default variable search model (query adapter + fusion weights + calibration).

    python benchmarks/train_variable_search.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv [--out grounding/data/variable_search.safetensors]

Uses ONLY the tuning half of the gold queries (split by variable, ``eval_variable_search.is_tuning_variable``);
the held-out half is never read here. Steps, all on frozen all-MiniLM-L6-v2 embeddings:

1. Each tuning query is reduced to its statistic phrase (place and dates cut, as at search time) and
   embedded; every catalogue variable is embedded as its views (description, dcid words).
2. A low-rank query adapter ``q' = normalize(q + q @ down @ up)`` (rank 128) is trained with a softmax
   over ALL catalogue variables (each variable scored by its best view; temperature 0.05, Adam,
   L2 on the correction), so every other variable is a negative, the hard ones included.
3. Fusion weights for (dense, lexical) are fitted for ranking by a softmax over each query's
   candidates, then scaled and shifted (Platt scaling) so that the top candidate's score is the
   observed probability that it is right. The threshold is 0.5: abstain when the top candidate is
   more likely wrong than right.

The reranker is trained afterwards, on top of this model, by ``benchmarks/train_variable_reranker.py``
(retraining the adapter or the fusion drops it). About 20 minutes on a quiet 2-core CPU (embedding ~15k texts dominates); the embeddings are cached.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_variable_search import (  # noqa: E402
    cached_embeddings,
    catalog_docs,
    is_tuning_variable,
    open_catalog_index,
    read_rows,
    statistic_phrase,
)

from grounding.gazetteer import Gazetteer  # noqa: E402
from grounding.variable_index import DEFAULT_SEARCH_MODEL_PATH, FusionWeights, SearchModel  # noqa: E402


def train_adapter(queries: torch.Tensor, gold: torch.Tensor, views: torch.Tensor, owner: torch.Tensor, n_docs: int,
                  *, rank: int, epochs: int, temperature: float = 0.05, l2: float = 1e-2, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    dim = queries.shape[1]
    down = torch.zeros(dim, rank, requires_grad=True)
    up = (torch.randn(rank, dim, generator=gen) * 0.01).requires_grad_()
    opt = torch.optim.Adam([down, up], lr=3e-3)
    for epoch in range(epochs):
        perm = torch.randperm(len(queries), generator=gen)
        total = 0.0
        for start in range(0, len(queries), 256):
            batch = perm[start:start + 256]
            q = torch.nn.functional.normalize(queries[batch] + queries[batch] @ down @ up, dim=-1)
            view_logits = q @ views.T / temperature
            # A variable's logit is its best view's.
            doc_logits = torch.full((len(batch), n_docs), -1e9).scatter_reduce(
                1, owner.expand(len(batch), -1), view_logits, "amax")
            loss = torch.nn.functional.cross_entropy(doc_logits, gold[batch]) + l2 * ((down @ up) ** 2).sum()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        print(f"adapter epoch {epoch + 1}/{epochs}: loss {total / len(queries):.4f}", flush=True)
    return down.detach().numpy(), up.detach().numpy()


def fit_fusion(features: list[np.ndarray], labels: list[int]) -> FusionWeights:
    """Ranking weights by softmax over each query's candidates, then Platt scaling of the top score."""
    w = torch.zeros(2, requires_grad=True)
    usable = [(torch.tensor(f, dtype=torch.float32), y) for f, y in zip(features, labels, strict=True) if y >= 0]
    opt = torch.optim.LBFGS([w], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = sum(-torch.log_softmax(f @ w, 0)[y] for f, y in usable) / len(usable) + 1e-3 * (w ** 2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    w = w.detach()
    top = torch.stack([(f @ w).max() for f, _ in usable])
    right = torch.tensor([float(int((f @ w).argmax()) == y) for f, y in usable])
    ab = torch.tensor([1.0, -float(top.mean())], requires_grad=True)
    opt = torch.optim.LBFGS([ab], max_iter=200, line_search_fn="strong_wolfe")

    def platt():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * top + ab[1], right)
        loss.backward()
        return loss

    opt.step(platt)
    a, b = ab.detach().tolist()
    return FusionWeights(dense=a * float(w[0]), lexical=a * float(w[1]), bias=b)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--out", type=Path, default=DEFAULT_SEARCH_MODEL_PATH)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "varsearch")
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--refit-fusion", action="store_true",
                        help="keep the adapter already in --out and fit only the fusion weights")
    args = parser.parse_args(argv)

    from models.sentence_embedder import SentenceEmbedder

    torch.manual_seed(0)
    embedder = SentenceEmbedder.load()
    docs = catalog_docs(args.catalog)
    position = {d.dcid: i for i, d in enumerate(docs)}
    rows = [r for r in read_rows(args.queries, ("Query", "SV")) if r["SV"] in position and is_tuning_variable(r["SV"])]
    print(f"{len(rows)} tuning queries for {len({r['SV'] for r in rows})} variables", flush=True)
    index = open_catalog_index(docs, embedder, args.cache, search_model=SearchModel())
    gazetteer = Gazetteer.default()
    phrases = [statistic_phrase(r["Query"], gazetteer)[0] for r in rows]
    queries = cached_embeddings(embedder, phrases, args.cache)
    gold = [position[r["SV"]] for r in rows]
    if args.refit_fusion:
        model = SearchModel.load(args.out)
    else:
        down, up = train_adapter(torch.tensor(queries), torch.tensor(gold), torch.tensor(index.view_vectors),
                                 torch.tensor(index.view_owner), len(docs), rank=args.rank, epochs=args.epochs)
        model = SearchModel(down=down, up=up, base_fingerprint=embedder.fingerprint)
    adapted = model.adapt(queries)
    features, labels = [], []
    for phrase, qvec, g in zip(phrases, adapted, gold, strict=True):
        found = index.candidate_features(phrase, qvec)
        features.append(np.array([[dense, lexical] for _, dense, lexical in found], dtype=np.float32))
        labels.append(next((j for j, (i, _, _) in enumerate(found) if i == g), -1))
    model.weights = fit_fusion(features, labels)
    model.threshold = 0.5
    if model.reranker is not None:  # trained on the old adapter and fusion: no longer valid
        model.reranker = None
        print("the reranker was dropped: retrain it with benchmarks/train_variable_reranker.py")
    if not args.refit_fusion:
        model.notes = (f"all-MiniLM-L6-v2 query adapter rank {args.rank}, {args.epochs} epochs, trained on {len(rows)} "
                       "tuning-split Data Commons gold queries (split by sha256 of the variable dcid, even = tuning)")
    model.save(args.out)
    print(f"weights {model.weights.model_dump()}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
