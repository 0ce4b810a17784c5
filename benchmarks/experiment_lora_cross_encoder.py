"""Experiment: the cross-encoder on top of the query-LoRA search instead of the shipped adapter search.

    python benchmarks/experiment_lora_cross_encoder.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv --cross-encoder .cache/varsearch/ce-full-sg3.safetensors

Reuses what the two earlier experiments left in ``--cache`` (nothing is trained here):

- ``experiment_lora_reranker.py``: the query LoRA (rank 8) trained on the tuning half, the out-of-fold
  LoRAs of each tuning fold, and the fusion weights and reranker fitted for them;
- ``experiment_cross_encoder.py``: the fold-0 cross-encoder (``ce-f0-*``) and the one trained on all
  tuning queries plus the Systema Globalis tuning questions (``--cross-encoder``).

Protocol (the held-out half chooses nothing): candidates are the LoRA search's best ``k``. ``beta`` of
``CE logit + beta * logit(LoRA search score)`` is chosen on the mean top-1 of (a) DC tuning fold 1,
scored by the fold-0 cross-encoder on candidates from the fold-0 LoRA (out of fold for both), and (b)
the Systema Globalis tuning questions, scored by the fold-0 cross-encoder. The held-out half is then
ranked once, by the ``--cross-encoder`` model with that ``beta``; the Systema Globalis reported
questions too. The same is printed for the shipped adapter search for comparison.
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_variable_search import (  # noqa: E402
    SG_QUESTIONS,
    cached_embeddings,
    catalog_docs,
    is_tuning_variable,
    open_catalog_index,
    read_rows,
    statistic_phrase,
    systema_globalis_docs,
)
from experiment_cross_encoder import logit, top1  # noqa: E402
from experiment_lora_reranker import lora_vectors, unit  # noqa: E402
from train_variable_reranker import SG_TUNING, cached_phrases, fold_of  # noqa: E402

from grounding.gazetteer import Gazetteer  # noqa: E402
from grounding.variable_index import (  # noqa: E402
    FusionWeights,
    Reranker,
    SearchModel,
    cross_encoder_text,
)

BETAS = [0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 5.0, 7.0, 10.0, 15.0]


def lora_search_model(path: Path) -> tuple[FusionWeights, Reranker]:
    import json

    from safetensors import safe_open

    with safe_open(str(path), framework="numpy") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    for name in ("rerank_w1", "rerank_b1", "rerank_w2"):
        tensors.setdefault(name, np.zeros(0, np.float32))
    return FusionWeights.model_validate_json(meta["weights"]), Reranker.from_tensors(
        tensors, json.loads(meta["rerank_features"]))


def top_k(index, phrases, qvecs, raws, k):
    """(Q, k) doc positions and scores of the search's best k."""
    pos = np.full((len(phrases), k), -1, np.int64)
    score = np.full((len(phrases), k), np.nan, np.float32)
    for q, (p, v, r) in enumerate(zip(phrases, qvecs, raws, strict=True)):
        for j, (s, i, _, _) in enumerate(index._scored(p, v, k, 50, r)[:k]):
            pos[q, j], score[q, j] = i, s
    return pos, score


class PairScores:
    """A cross-encoder's logits for (query text, variable text) pairs, scored once each."""

    def __init__(self, tensors_path: Path, embedder, rank: int):
        from safetensors.numpy import load_file

        from grounding.cross_encoder import CrossEncoder

        self.cross = CrossEncoder.from_tensors(embedder, {k.removeprefix("bert."): v for k, v in
                                                          load_file(str(tensors_path)).items()},
                                               rank=rank, alpha=2.0 * rank)
        self.memo: dict[tuple[str, str], float] = {}

    def __call__(self, phrases, texts, pos, rows) -> np.ndarray:
        out = np.full(pos.shape, np.nan, np.float32)
        todo = sorted({(phrases[q], texts[i]) for q in rows for i in pos[q] if i >= 0} - self.memo.keys())
        start = time.perf_counter()
        for s in range(0, len(todo), 256):
            chunk = todo[s:s + 256]
            self.memo.update(zip(chunk, (float(z) for z in self.cross.score(chunk)), strict=True))
        if todo:
            print(f"  scored {len(todo)} pairs in {time.perf_counter() - start:.0f} s", flush=True)
        for q in rows:
            for j, i in enumerate(pos[q]):
                if i >= 0:
                    out[q, j] = self.memo[(phrases[q], texts[i])]
        return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--cross-encoder", type=Path, required=True, help="the cross-encoder to measure (tensors)")
    parser.add_argument("--fold0-cross-encoder", type=Path, default=None,
                        help="the fold-0 cross-encoder that chooses beta (default: the cached ce-f0-r16-e2-* file)")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "varsearch")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16, help="the cross-encoder's LoRA rank")
    parser.add_argument("--systema-globalis", type=Path,
                        default=Path("/work/shared/data/systema_globalis-c63631a.tar.xz"))
    args = parser.parse_args(argv)
    lora_args = SimpleNamespace(rank=8, epochs=2, seed=0, lr=5e-4, cache=args.cache)

    from models.sentence_embedder import SentenceEmbedder

    base = SentenceEmbedder.load()
    gazetteer = Gazetteer.default()
    docs = catalog_docs(args.catalog)
    where = {d.dcid: i for i, d in enumerate(docs)}
    rows = [r for r in read_rows(args.queries, ("Query", "SV")) if r["SV"] in where]
    gold = np.array([where[r["SV"]] for r in rows])
    tuning = np.array([is_tuning_variable(r["SV"]) for r in rows])
    folds = np.array([fold_of(r["SV"]) for r in rows])
    tune, held = np.flatnonzero(tuning), np.flatnonzero(~tuning)
    choose = tune[folds[tune] == 1]
    phrases = cached_phrases([r["Query"] for r in rows], gazetteer, args.cache)
    raw = unit(cached_embeddings(base, phrases, args.cache))
    texts = [cross_encoder_text(d) for d in docs]

    weights, reranker = lora_search_model(args.cache / "lora-tuning-r8-e2-s0-search-model.safetensors")
    index = open_catalog_index(docs, base, args.cache, search_model=SearchModel())
    index.weights, index.reranker = weights, reranker
    # The LoRA vectors (read from the cache): whole-tuning-half LoRA for every query; fold 0's for fold 1.
    full = unit(lora_vectors("tuning", [phrases[i] for i in tune], gold[tune], {"all": phrases}, index,
                             lora_args)["all"])
    train0 = tune[folds[tune] == 0]
    # (experiment_lora_reranker names a fold's LoRA by the fold it encodes: "fold1" is trained on fold 0)
    oof1 = unit(lora_vectors("fold1", [phrases[i] for i in train0], gold[train0],
                             {"oof": [phrases[i] for i in choose]}, index, lora_args)["oof"])
    qv = full.copy()
    qv[choose] = oof1

    sg_docs = systema_globalis_docs(args.systema_globalis)
    sg_where = {d.dcid: i for i, d in enumerate(sg_docs)}
    sg_texts = [cross_encoder_text(d) for d in sg_docs]
    sg_index = open_catalog_index(sg_docs, base, args.cache, search_model=SearchModel())
    sg_index.weights, sg_index.reranker = weights, reranker
    sets = {}
    for name, path in (("sgtune", SG_TUNING), ("sgq", SG_QUESTIONS)):
        qs = read_rows(path, ("Query", "SV"))
        ph = [statistic_phrase(q["Query"], gazetteer)[0] for q in qs]
        sets[name] = (ph, np.array([sg_where[q["SV"]] for q in qs]), unit(base.encode(ph)))
    sg_lora = lora_vectors("tuning", [phrases[i] for i in tune], gold[tune],
                           {"sgtune": sets["sgtune"][0], "sgq": sets["sgq"][0]}, index, lora_args)

    t0 = time.perf_counter()
    key = hashlib.sha256("\n".join(phrases).encode() + qv.tobytes()).hexdigest()[:12]
    cands = args.cache / f"lora-ce-cands-{key}-k{args.k}.npz"
    if cands.is_file():
        z = np.load(cands, allow_pickle=False)
        pos, shipped = z["pos"], z["score"]
    else:
        pos, shipped = top_k(index, phrases, qv, raw, args.k)
        np.savez(cands, pos=pos, score=shipped)
    sg = {name: (ph, g, *top_k(sg_index, ph, unit(sg_lora[name]), r, args.k)) for name, (ph, g, r) in sets.items()}
    print(f"LoRA search candidates: {time.perf_counter() - t0:.0f} s; top-1 fold-1 (out of fold) "
          f"{top1(pos, shipped, gold, choose):.3f}, held-out {top1(pos, shipped, gold, held):.3f}; gold in top-{args.k} "
          f"held-out {np.mean([gold[q] in pos[q] for q in held]):.3f}", flush=True)

    fold0_path = args.fold0_cross_encoder or next(iter(sorted(args.cache.glob(f"ce-f0-r{args.rank}-e2-*.safetensors"))))
    ce0 = PairScores(fold0_path, SentenceEmbedder.load(), args.rank)
    s_choose = ce0(phrases, texts, pos, choose)
    bl = logit(shipped)
    on_choose = {b: top1(pos, s_choose + b * bl, gold, choose) for b in BETAS}
    on_sg = {}
    ph, g, spos, sscore = sg["sgtune"]
    s_sg = ce0(ph, sg_texts, spos, range(len(ph)))
    on_sg = {b: top1(spos, s_sg + b * logit(sscore), g, range(len(ph))) for b in BETAS}
    print("beta -> DC fold 1 / SG tuning top-1: " + ", ".join(f"{b}: {on_choose[b]:.3f}/{on_sg[b]:.3f}" for b in BETAS))
    beta = max(BETAS, key=lambda b: ((on_choose[b] + on_sg[b]) / 2, -b))
    print(f"chosen beta {beta}", flush=True)

    ce = PairScores(args.cross_encoder, SentenceEmbedder.load(), args.rank)
    s_held = ce(phrases, texts, pos, held)
    print(f"held-out top-1: LoRA search {top1(pos, shipped, gold, held):.3f}; + cross-encoder (beta {beta}) "
          f"{top1(pos, s_held + beta * bl, gold, held):.3f}; cross-encoder alone {top1(pos, s_held, gold, held):.3f}")
    print("for information only, held-out by beta: " + ", ".join(
        f"{b}: {top1(pos, s_held + b * bl, gold, held):.3f}" for b in BETAS), flush=True)
    ph, g, spos, sscore = sg["sgq"]
    s_q = ce(ph, sg_texts, spos, range(len(ph)))
    print(f"Systema Globalis reported questions ({len(ph)}): LoRA search {top1(spos, sscore, g, range(len(ph))):.3f}; "
          f"+ cross-encoder {top1(spos, s_q + beta * logit(sscore), g, range(len(ph))):.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
