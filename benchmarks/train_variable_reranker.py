"""Train the variable search reranker (added to the shipped search model) on the tuning half only.

    python benchmarks/train_variable_reranker.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv [--model grounding/data/variable_search.safetensors]

The reranker (``grounding.variable_index.Reranker``) reorders the hybrid's best 30 candidates with
variable-agnostic features (adapter and base cosines, per-view cosines, lexical shares, BM25, the
share of the variable's own constraint words found in the query, opposite-word conflicts, numbers,
ranks and gaps). It must generalise to variables whose queries it never saw, but the adapter's cosine
is better on the tuning queries it was trained on than on new ones, so the reranker's training
features are made OUT OF FOLD: the tuning variables are split in two (by a second hash), an adapter
is trained on each half with ``train_variable_search.train_adapter`` (same recipe as the shipped one),
and each half's features come from the adapter trained on the other half. The held-out half of the
gold set is never read.

Model choice (hidden size, L2) by 2-fold cross-validation over those halves (train on one, top-1 on
the other); the chosen model is then trained on both halves, and Platt-scaled on its cross-validated
top logits so that the top candidate's score is the observed chance that it is right (the
resolver's threshold 0.5 keeps its meaning). ``--sg-tuning`` adds the Systema Globalis tuning
questions (``benchmarks/systema_globalis_tuning.csv``; never the reported set) to training, weighted
by ``--sg-weight``, so the reranker also sees a catalogue whose adapter cosines were not trained on.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
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
    systema_globalis_docs,
)
from train_variable_search import train_adapter  # noqa: E402

from grounding.gazetteer import Gazetteer  # noqa: E402
from grounding.variable_index import (  # noqa: E402
    DEFAULT_SEARCH_MODEL_PATH,
    RERANK_FEATURES,
    RERANK_POOL,
    Reranker,
    SearchModel,
)

SG_TUNING = Path(__file__).resolve().parent / "systema_globalis_tuning.csv"


def fold_of(dcid: str) -> int:
    """A second, independent split of the tuning variables into two halves."""
    return int(hashlib.sha256(("fold:" + dcid).encode()).hexdigest(), 16) % 2


def featurize(index, model: SearchModel, phrases, raw, gold):
    """Padded features (Q, P, F), mask (Q, P) and the gold's candidate position (-1: not among them)."""
    adapted = model.adapt(raw) if model.down is not None else raw
    index.weights = model.weights
    X = np.zeros((len(phrases), RERANK_POOL, len(RERANK_FEATURES)), np.float32)
    mask = np.zeros((len(phrases), RERANK_POOL), bool)
    y = np.full(len(phrases), -1)
    for q, (phrase, qvec, rvec, g) in enumerate(zip(phrases, adapted, raw, gold, strict=True)):
        fused, feats = index.rerank_features(phrase, qvec, rvec)
        X[q, :len(fused)] = feats
        mask[q, :len(fused)] = True
        y[q] = next((j for j, (_, i, _, _) in enumerate(fused) if i == g), -1)
    return X, mask, y


def fit(X, mask, y, weight, *, hidden: int, l2: float, seed: int = 0, steps: int = 400):
    """Listwise softmax over each query's candidates; returns the Reranker (bias 0, uncalibrated)."""
    torch.manual_seed(seed)
    keep = y >= 0
    X, mask, y, weight = (torch.tensor(a[keep]) for a in (X, mask, y, weight))
    flat = X[mask]
    mean, scale = flat.mean(0), flat.std(0).clamp_min(1e-3)
    Z = (X - mean) / scale
    F = X.shape[-1]
    lin = torch.zeros(F, requires_grad=True)
    params = [lin]
    if hidden:
        w1 = (torch.randn(F, hidden) * 0.1).requires_grad_()
        b1 = torch.zeros(hidden, requires_grad=True)
        w2 = torch.zeros(hidden, requires_grad=True)
        params += [w1, b1, w2]
    opt = torch.optim.Adam(params, lr=0.02)
    for _ in range(steps):
        logits = Z @ lin
        if hidden:
            logits = logits + torch.relu(Z @ w1 + b1) @ w2
        logits = logits.masked_fill(~mask, -1e9)
        loss = (torch.nn.functional.cross_entropy(logits, y, reduction="none") * weight).sum() / weight.sum()
        loss = loss + l2 * sum((p ** 2).sum() for p in params if p.dim() > 1 or p is lin)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return Reranker(mean=mean.numpy(), scale=scale.numpy(), linear=lin.detach().numpy(), bias=0.0,
                    w1=w1.detach().numpy() if hidden else None, b1=b1.detach().numpy() if hidden else None,
                    w2=w2.detach().numpy() if hidden else None)


def top_logits(reranker: Reranker, X, mask, y):
    """(top logit, top is right) per query; a query whose gold is not among the candidates is wrong."""
    logits = np.where(mask, reranker.logits(X.reshape(-1, X.shape[-1])).reshape(mask.shape), -np.inf)
    best = logits.argmax(1)
    return logits.max(1), best == y


def platt(top: np.ndarray, right: np.ndarray) -> tuple[float, float]:
    ab = torch.tensor([1.0, -float(top.mean())], requires_grad=True)
    t, r = torch.tensor(top, dtype=torch.float32), torch.tensor(right, dtype=torch.float32)
    opt = torch.optim.LBFGS([ab], max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(ab[0] * t + ab[1], r)
        loss.backward()
        return loss

    opt.step(closure)
    a, b = ab.detach().tolist()
    return a, b


def cached_phrases(queries: list[str], gazetteer, cache_dir: Path) -> list[str]:
    """``statistic_phrase`` of each query, cached in ``cache_dir`` by the queries and the gazetteer's size."""
    key = hashlib.sha256(("\n".join(queries) + f"\n{len(gazetteer.places)}").encode()).hexdigest()[:16]
    path = cache_dir / f"phrases-{key}.json"
    if path.is_file():
        return json.loads(path.read_text())
    phrases = [statistic_phrase(q, gazetteer)[0] for q in queries]
    path.write_text(json.dumps(phrases))
    return phrases


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--model", type=Path, default=DEFAULT_SEARCH_MODEL_PATH,
                        help="the search model whose adapter and fusion are kept; the reranker is written into it")
    parser.add_argument("--out", type=Path, default=None, help="default: --model")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "varsearch")
    parser.add_argument("--systema-globalis", type=Path, default=Path("/work/shared/data/systema_globalis-c63631a.tar.xz"))
    parser.add_argument("--sg-weight", type=float, nargs="+", default=[0.0, 3.0, 10.0],
                        help="weights of each SG tuning question to try (0: unused)")
    parser.add_argument("--hidden", type=int, nargs="+", default=[0])
    parser.add_argument("--l2", type=float, nargs="+", default=[1e-4])
    parser.add_argument("--rank", type=int, default=128)
    parser.add_argument("--epochs", type=int, default=20)
    args = parser.parse_args(argv)

    from models.sentence_embedder import SentenceEmbedder

    t0 = time.perf_counter()
    embedder = SentenceEmbedder.load()
    model = SearchModel.load(args.model)
    docs = catalog_docs(args.catalog)
    position = {d.dcid: i for i, d in enumerate(docs)}
    rows = [r for r in read_rows(args.queries, ("Query", "SV")) if r["SV"] in position and is_tuning_variable(r["SV"])]
    gazetteer = Gazetteer.default()
    phrases = cached_phrases([r["Query"] for r in rows], gazetteer, args.cache)
    raw = cached_embeddings(embedder, phrases, args.cache)
    raw = raw / np.linalg.norm(raw, axis=1, keepdims=True)
    gold = np.array([position[r["SV"]] for r in rows])
    folds = np.array([fold_of(r["SV"]) for r in rows])
    index = open_catalog_index(docs, embedder, args.cache, search_model=SearchModel())
    print(f"{len(rows)} tuning queries, folds {np.bincount(folds).tolist()}", flush=True)

    # Out-of-fold adapters: features of fold f come from an adapter trained on the other fold only.
    X = np.zeros((len(rows), RERANK_POOL, len(RERANK_FEATURES)), np.float32)
    mask = np.zeros((len(rows), RERANK_POOL), bool)
    y = np.full(len(rows), -1)
    for f in (0, 1):
        train = folds != f
        cache = args.cache / f"oof-adapter-{f}-r{args.rank}-e{args.epochs}.npz"
        if cache.is_file():
            saved = np.load(cache, allow_pickle=False)
            down, up = saved["down"], saved["up"]
        else:
            down, up = train_adapter(torch.tensor(raw[train]), torch.tensor(gold[train]),
                                     torch.tensor(index.view_vectors), torch.tensor(index.view_owner), len(docs),
                                     rank=args.rank, epochs=args.epochs)
            np.savez(cache, down=down, up=up)
        oof = SearchModel(down=down, up=up, base_fingerprint=embedder.fingerprint, weights=model.weights)
        X[~train], mask[~train], y[~train] = featurize(index, oof, [p for p, t in zip(phrases, train, strict=True)
                                                                    if not t], raw[~train], gold[~train])
        print(f"fold {f}: features done ({time.perf_counter() - t0:.0f} s); gold among candidates "
              f"{np.mean(y[~train] >= 0):.3f}; hybrid top-1 {np.mean(y[~train] == 0):.3f}", flush=True)
    weight = np.ones(len(rows), np.float32)

    if max(args.sg_weight) > 0:
        sg_docs = systema_globalis_docs(args.systema_globalis)
        sg_index = open_catalog_index(sg_docs, embedder, args.cache, search_model=SearchModel())
        sg_pos = {d.dcid: i for i, d in enumerate(sg_docs)}
        sg_rows = [r for r in read_rows(SG_TUNING, ("Query", "SV")) if r["SV"] in sg_pos]
        sg_phrases = [statistic_phrase(r["Query"], gazetteer)[0] for r in sg_rows]
        sg_raw = embedder.encode(sg_phrases)
        sg_raw = sg_raw / np.linalg.norm(sg_raw, axis=1, keepdims=True)
        sx, sm, sy = featurize(sg_index, model, sg_phrases, sg_raw, np.array([sg_pos[r["SV"]] for r in sg_rows]))
        print(f"SG tuning: {len(sg_rows)} questions, hybrid top-1 {np.mean(sy == 0):.3f}", flush=True)
        # SG questions join fold by their own hash, so cross-validation keeps them apart too.
        X, mask, y = np.concatenate([X, sx]), np.concatenate([mask, sm]), np.concatenate([y, sy])
        folds = np.concatenate([folds, [fold_of(r["SV"]) for r in sg_rows]])
        weight = np.concatenate([weight, np.ones(len(sg_rows), np.float32)])
        is_sg = np.r_[np.zeros(len(rows), bool), np.ones(len(sg_rows), bool)]
    else:
        is_sg = np.zeros(len(rows), bool)

    # Chosen by the mean of the cross-validated top-1 on DC and on the SG tuning questions (DC alone without them).
    best = None
    for sg_weight in args.sg_weight if is_sg.any() else [0.0]:
        weight = np.where(is_sg, sg_weight, 1.0).astype(np.float32)
        for hidden in args.hidden:
            for l2 in args.l2:
                cv_top = np.zeros(len(y))
                cv_right = np.zeros(len(y), bool)
                for f in (0, 1):
                    r = fit(X[folds != f], mask[folds != f], y[folds != f], weight[folds != f], hidden=hidden, l2=l2)
                    cv_top[folds == f], cv_right[folds == f] = top_logits(r, X[folds == f], mask[folds == f],
                                                                          y[folds == f])
                dc, sg = cv_right[~is_sg].mean(), cv_right[is_sg].mean() if is_sg.any() else float("nan")
                print(f"SG weight {sg_weight:g} hidden {hidden:3d} l2 {l2:g}: cross-validated top-1 DC {dc:.4f}, SG "
                      f"tuning {sg:.3f} (hybrid DC {np.mean(y[~is_sg] == 0):.4f}, SG "
                      f"{np.mean(y[is_sg] == 0) if is_sg.any() else float('nan'):.3f})", flush=True)
                score = (dc + sg) / 2 if is_sg.any() else dc
                if best is None or score > best[0]:
                    best = (score, dc, sg_weight, hidden, l2, cv_top.copy(), cv_right.copy())
    _, dc, sg_weight, hidden, l2, cv_top, cv_right = best
    weight = np.where(is_sg, sg_weight, 1.0).astype(np.float32)
    reranker = fit(X, mask, y, weight, hidden=hidden, l2=l2)
    a, b = platt(cv_top[~is_sg], cv_right[~is_sg])
    reranker.linear, reranker.w2, reranker.bias = reranker.linear * a, reranker.w2 * a, b
    model.reranker = reranker
    model.notes = (model.notes.split(" | reranker:")[0] + f" | reranker: hidden {hidden}, l2 {l2:g}, trained on "
                   f"{int((y[~is_sg] >= 0).sum())} tuning queries with out-of-fold adapter features"
                   + (f" and {int(is_sg.sum())} SG tuning questions (weight {sg_weight:g})" if sg_weight else "")
                   + f"; cross-validated top-1 {dc:.3f}; Platt a={a:.3f} b={b:.3f}")
    out = args.out or args.model
    model.save(out)
    print(f"chose SG weight {sg_weight:g}, hidden {hidden}, l2 {l2:g} (cross-validated DC top-1 {dc:.4f}); Platt a={a:.3f}, b={b:.3f}; "
          f"wrote {out} ({out.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.0f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
