"""Experiment: query-side LoRA + the learned reranker, trained on the tuning half only, measured on both splits.

    python benchmarks/experiment_lora_reranker.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv [--cache .cache/varsearch]

Combines ``experiment_query_lora.py`` (LoRA rank 8 on every linear layer of all-MiniLM-L6-v2, queries
only, softmax over all catalogue variables) with ``train_variable_reranker.py``'s recipe:

1. The tuning variables are split in two (``train_variable_reranker.fold_of``); a LoRA is trained on
   each half and encodes the OTHER half's tuning queries (out-of-fold query vectors).
2. Fusion weights (``train_variable_search.fit_fusion``) and the reranker (linear, listwise softmax over
   the best 30; SG-tuning weight chosen by 2-fold cross-validation as in the shipped script, then
   Platt-scaled) are fitted on those out-of-fold features. The reranker's "adapter cosine" features are
   the LoRA query's cosines, its "base cosine" features the base model's.
3. A LoRA trained on the whole tuning half encodes every query; the index ranks them with the fusion
   weights and reranker of step 2. Only then is the held-out half scored.

The held-out half is never used for learning or any choice. LoRA factors and query vectors are cached
in ``--cache`` (keyed by rank, epochs, seed, fold and the phrases) so an interrupted run resumes.
The fusion weights and reranker fitted for the whole-half LoRA are written beside its factors
(``lora-tuning-r<rank>-e<epochs>-s<seed>-search-model.safetensors``), so shipping needs no retraining.
Printed: all / tuning / held-out top-1 | top-3 | top-10 for the LoRA with fusion only, LoRA + reranker,
and (``--baseline``) the shipped adapter + reranker on the same queries; the Systema Globalis reported
questions for the LoRA + reranker.
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
    SG_QUESTIONS,
    accuracy,
    cached_embeddings,
    catalog_docs,
    fmt,
    is_tuning_variable,
    open_catalog_index,
    read_rows,
    statistic_phrase,
    systema_globalis_docs,
)
from experiment_query_lora import train as train_lora  # noqa: E402
from train_variable_reranker import SG_TUNING, cached_phrases, fit, fold_of, platt, top_logits  # noqa: E402
from train_variable_search import fit_fusion  # noqa: E402

from grounding.gazetteer import Gazetteer  # noqa: E402
from grounding.variable_index import RERANK_FEATURES, RERANK_POOL, SearchModel  # noqa: E402


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def lora_vectors(tag: str, train_phrases, train_gold, encode_sets: dict[str, list[str]], index, args) -> dict:
    """Train a LoRA on ``train_phrases`` (cached by tag) and encode each list of ``encode_sets`` with it."""
    from safetensors.torch import load_file, save_file

    from models.lora import LoraSettings, add_lora
    from models.sentence_embedder import SentenceEmbedder

    key = hashlib.sha256(("\n".join(train_phrases) + repr(train_gold.tolist())).encode()).hexdigest()[:12]
    stem = args.cache / f"lora-{tag}-r{args.rank}-e{args.epochs}-s{args.seed}-{key}"
    out, todo = {}, {}
    for name, texts in encode_sets.items():
        digest = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:12]
        path = Path(f"{stem}-{name}-{digest}.npy")
        if path.is_file():
            out[name] = np.load(path, allow_pickle=False)
        else:
            todo[name] = (texts, path)
    if not todo:
        return out
    torch.manual_seed(args.seed)
    embedder = SentenceEmbedder.load()
    weights = Path(f"{stem}.safetensors")
    start = time.perf_counter()
    if weights.is_file():
        add_lora(embedder.model, LoraSettings(r=args.rank, alpha=2 * args.rank,
                                              targets=["query", "key", "value", "dense"]), seed=args.seed)
        embedder.model.load_state_dict({k: v.float() for k, v in load_file(str(weights)).items()}, strict=False)
        embedder.model.eval()
    else:
        factors = train_lora(embedder, list(train_phrases), train_gold, index, rank=args.rank, epochs=args.epochs,
                             lr=args.lr, seed=args.seed)
        save_file(factors, str(weights), metadata={"rank": str(args.rank), "epochs": str(args.epochs)})
        # Encode with the fp16-rounded factors, as a shipped file would be.
        embedder.model.load_state_dict({k: v.float() for k, v in factors.items()}, strict=False)
        print(f"LoRA {tag}: trained on {len(train_phrases)} queries in {time.perf_counter() - start:.0f} s", flush=True)
    with torch.inference_mode():
        for name, (texts, path) in todo.items():
            t0 = time.perf_counter()
            vectors = embedder.encode(texts)
            np.save(path, vectors, allow_pickle=False)
            out[name] = vectors
            print(f"LoRA {tag}: encoded {len(texts)} {name} queries in {time.perf_counter() - t0:.0f} s", flush=True)
    return out


def featurize(index, phrases, qvecs, raws, gold):
    """Padded reranker features (Q, P, F), mask and the gold's position among the candidates (-1: absent)."""
    X = np.zeros((len(phrases), RERANK_POOL, len(RERANK_FEATURES)), np.float32)
    mask = np.zeros((len(phrases), RERANK_POOL), bool)
    y = np.full(len(phrases), -1)
    for q, (phrase, qvec, rvec, g) in enumerate(zip(phrases, qvecs, raws, gold, strict=True)):
        fused, feats = index.rerank_features(phrase, qvec, rvec)
        X[q, :len(fused)] = feats
        mask[q, :len(fused)] = True
        y[q] = next((j for j, (_, i, _, _) in enumerate(fused) if i == g), -1)
    return X, mask, y


def rank_all(index, phrases, qvecs, raws, *, rerank: bool) -> list[list[str]]:
    return [[c.dcid for c in index._explain(p, q, index._scored(p, q, 10, 50, r if rerank else None), 10)]
            for p, q, r in zip(phrases, qvecs, raws, strict=True)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sg-weight", type=float, nargs="+", default=[0.0, 3.0])
    parser.add_argument("--limit", type=int, default=0, help="use every n-th query only (smoke runs)")
    parser.add_argument("--baseline", action="store_true", help="also rank with the shipped adapter + reranker")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "varsearch")
    parser.add_argument("--systema-globalis", type=Path, default=Path("/work/shared/data/systema_globalis-c63631a.tar.xz"))
    args = parser.parse_args(argv)

    from models.sentence_embedder import SentenceEmbedder

    torch.set_num_threads(max(1, torch.get_num_threads()))
    t_start = time.perf_counter()
    base = SentenceEmbedder.load()
    gazetteer = Gazetteer.default()
    docs = catalog_docs(args.catalog)
    position = {d.dcid: i for i, d in enumerate(docs)}
    rows = [r for r in read_rows(args.queries, ("Query", "SV")) if r["SV"] in position]
    if args.limit:
        rows = rows[:: max(1, len(rows) // args.limit)]
    index = open_catalog_index(docs, base, args.cache, search_model=SearchModel())
    phrases = cached_phrases([r["Query"] for r in rows], gazetteer, args.cache)
    raw = unit(cached_embeddings(base, phrases, args.cache))
    gold = np.array([position[r["SV"]] for r in rows])
    dcids = [r["SV"] for r in rows]
    tuning = np.array([is_tuning_variable(sv) for sv in dcids])
    folds = np.array([fold_of(sv) for sv in dcids])
    tune = np.flatnonzero(tuning)
    print(f"{len(rows)} queries: {tuning.sum()} tuning (folds {np.bincount(folds[tune]).tolist()}), "
          f"{(~tuning).sum()} held out", flush=True)

    sg_docs = systema_globalis_docs(args.systema_globalis)
    sg_index = open_catalog_index(sg_docs, base, args.cache, search_model=SearchModel())
    sg_pos = {d.dcid: i for i, d in enumerate(sg_docs)}
    sg_rows = [r for r in read_rows(SG_TUNING, ("Query", "SV")) if r["SV"] in sg_pos]
    sg_phrases = [statistic_phrase(r["Query"], gazetteer)[0] for r in sg_rows]
    sg_raw = unit(base.encode(sg_phrases))
    sg_gold = np.array([sg_pos[r["SV"]] for r in sg_rows])
    sg_q = read_rows(SG_QUESTIONS, ("Query", "SV"))
    sgq_phrases = [statistic_phrase(q["Query"], gazetteer)[0] for q in sg_q]
    sgq_raw = unit(base.encode(sgq_phrases))

    # 1. Out-of-fold LoRA vectors for the tuning queries.
    oof = np.zeros_like(raw)
    for f in (0, 1):
        train = tune[folds[tune] != f]
        held = tune[folds[tune] == f]
        vecs = lora_vectors(f"fold{f}", [phrases[i] for i in train], gold[train],
                            {"oof": [phrases[i] for i in held]}, index, args)
        oof[held] = unit(vecs["oof"])
    # 2. Fusion and reranker on the out-of-fold features (tuning half only).
    fusion_feats, fusion_labels = [], []
    for i in tune:
        found = index.candidate_features(phrases[i], oof[i])
        fusion_feats.append(np.array([[d, lex] for _, d, lex in found], dtype=np.float32))
        fusion_labels.append(next((j for j, (d, _, _) in enumerate(found) if d == gold[i]), -1))
    weights = fit_fusion(fusion_feats, fusion_labels)
    index.weights = sg_index.weights = weights
    print(f"fusion (out-of-fold LoRA vectors): {weights}", flush=True)
    X, mask, y = featurize(index, [phrases[i] for i in tune], oof[tune], raw[tune], gold[tune])
    print(f"tuning features done ({time.perf_counter() - t_start:.0f} s): gold among candidates {np.mean(y >= 0):.3f}; "
          f"out-of-fold hybrid top-1 {np.mean(y == 0):.4f}", flush=True)

    # 3. The LoRA on the whole tuning half: every query (and the SG questions) encoded with it.
    full = lora_vectors("tuning", [phrases[i] for i in tune], gold[tune],
                        {"all": phrases, "sgtune": sg_phrases, "sgq": sgq_phrases}, index, args)
    lora_all, lora_sgtune, lora_sgq = (unit(full[k]) for k in ("all", "sgtune", "sgq"))

    sx, sm, sy = featurize(sg_index, sg_phrases, lora_sgtune, sg_raw, sg_gold)
    Xa, Ma, Ya = np.concatenate([X, sx]), np.concatenate([mask, sm]), np.concatenate([y, sy])
    fa = np.concatenate([folds[tune], [fold_of(r["SV"]) for r in sg_rows]])
    is_sg = np.r_[np.zeros(len(y), bool), np.ones(len(sy), bool)]
    best = None
    for sg_weight in args.sg_weight:
        w = np.where(is_sg, sg_weight, 1.0).astype(np.float32)
        cv_top, cv_right = np.zeros(len(Ya)), np.zeros(len(Ya), bool)
        for f in (0, 1):
            r = fit(Xa[fa != f], Ma[fa != f], Ya[fa != f], w[fa != f], hidden=0, l2=1e-4)
            cv_top[fa == f], cv_right[fa == f] = top_logits(r, Xa[fa == f], Ma[fa == f], Ya[fa == f])
        dc, sg = cv_right[~is_sg].mean(), cv_right[is_sg].mean()
        print(f"SG weight {sg_weight:g}: cross-validated top-1 DC {dc:.4f}, SG tuning {sg:.3f} "
              f"(hybrid DC {np.mean(Ya[~is_sg] == 0):.4f}, SG {np.mean(Ya[is_sg] == 0):.3f})", flush=True)
        if best is None or (dc + sg) / 2 > best[0]:
            best = ((dc + sg) / 2, sg_weight, cv_top.copy(), cv_right.copy())
    _, sg_weight, cv_top, cv_right = best
    reranker = fit(Xa, Ma, Ya, np.where(is_sg, sg_weight, 1.0).astype(np.float32), hidden=0, l2=1e-4)
    a, b = platt(cv_top[~is_sg], cv_right[~is_sg])
    reranker.linear, reranker.bias = reranker.linear * a, b
    print(f"chose SG weight {sg_weight:g}; Platt a={a:.3f} b={b:.3f} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    # Fusion and reranker for the whole-tuning-half LoRA, next to its factors (so shipping needs no retraining).
    from safetensors.numpy import save_file

    learned = args.cache / f"lora-tuning-r{args.rank}-e{args.epochs}-s{args.seed}-search-model.safetensors"
    save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in reranker.tensors().items() if v.size},
              str(learned), metadata={"weights": weights.model_dump_json(), "rerank_features": json.dumps(
                  list(reranker.features)), "base_fingerprint": base.fingerprint, "sg_weight": repr(sg_weight)})
    print(f"wrote {learned}", flush=True)

    # Evaluation: both splits, after every choice above was made on the tuning half.
    index.reranker = sg_index.reranker = reranker
    fused_only = rank_all(index, phrases, lora_all, raw, rerank=False)
    reranked = rank_all(index, phrases, lora_all, raw, rerank=True)
    sg_gold_q = [q["SV"] for q in sg_q]
    sg_ours = rank_all(sg_index, sgq_phrases, lora_sgq, sgq_raw, rerank=True)
    print(f"\nranking done ({time.perf_counter() - t_start:.0f} s)")
    print("\n| method | all | tuning split | held-out split |\n|---|---|---|---|")
    label = f"query LoRA (rank {args.rank}, {args.epochs} epochs)"
    for name, ranked in ((f"{label} + lexical fusion", fused_only), (f"{label} + fusion + reranker", reranked)):
        print(f"| {name} | {fmt(accuracy(ranked, dcids))} | {fmt(accuracy(ranked, dcids, tuning))} | "
              f"{fmt(accuracy(ranked, dcids, ~tuning))} |", flush=True)
    print(f"\nSystema Globalis reported questions ({len(sg_q)}), {label} + fusion + reranker: "
          f"{fmt(accuracy(sg_ours, sg_gold_q))}", flush=True)
    if args.baseline:
        shipped = open_catalog_index(docs, base, args.cache)
        ranked = [[c.dcid for c in f] for f in shipped.search_many(phrases, k=10, embeddings=raw)]
        print(f"| shipped: adapter + fusion + reranker (same queries) | {fmt(accuracy(ranked, dcids))} | "
              f"{fmt(accuracy(ranked, dcids, tuning))} | {fmt(accuracy(ranked, dcids, ~tuning))} |")
    t1, t3, t10 = accuracy(reranked, dcids, ~tuning)
    print(f"held-out top1={t1:.3f} top3={t3:.3f} top10={t10:.3f} ({time.perf_counter() - t_start:.0f} s in all)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
