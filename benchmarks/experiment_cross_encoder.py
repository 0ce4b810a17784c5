"""Experiment: a cross-encoder over the shipped search's best candidates, trained on tuning variables only.

    python benchmarks/experiment_cross_encoder.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv [--cache .cache/varsearch]

The shipped search (hybrid + adapter + linear reranker) ranks the right variable first for 81.5% of
held-out queries but within its best 3 for 95.5% and its best 10 for 99.3%: what is left is ordering
near twins, which needs the query and the variable read TOGETHER. A cross-encoder does that: the pair
"[CLS] statistic phrase [SEP] variable name (dcid words) [SEP]" goes through all-MiniLM-L6-v2 with
LoRA (every linear layer) and a linear head on the mean-pooled tokens; the loss is a softmax over each
query's K candidates (the shipped search's best K, with the gold variable swapped in for the last one
when it is missing).

Honest protocol (the held-out half of the gold set is never used for learning or any choice):

1. The cross-encoder is trained on the queries of tuning variables of fold 0 (``fold_of``).
2. The weight ``beta`` of the combination ``CE logit + beta * logit(shipped score)`` is chosen on the
   tuning variables of fold 1 (never seen by the cross-encoder; the shipped adapter and reranker did
   train on them, which favours the shipped score there: the choice errs towards the baseline).
3. The held-out half is scored once with that ``beta``.

``--full`` then retrains on all tuning variables with the same recipe (``--train-sg N``: plus the
Systema Globalis tuning questions, each N times) and writes the LoRA, head and beta to ``--out``;
``--ship PATH`` writes the shipped search model with it. The shipped one came from
``--epochs 2 --sg-tuning --full --train-sg 3``. Everything expensive is cached in ``--cache``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
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
)
from train_variable_reranker import cached_phrases, fold_of  # noqa: E402

from grounding.gazetteer import Gazetteer  # noqa: E402
from grounding.variable_index import cross_encoder_text  # noqa: E402


class CrossEncoder(torch.nn.Module):
    def __init__(self, embedder, rank: int, seed: int):
        super().__init__()
        from models.lora import LoraSettings, add_lora

        self.bert = embedder.model
        self.tokenizer = embedder.tokenizer
        for p in self.bert.parameters():
            p.requires_grad_(False)
        add_lora(self.bert, LoraSettings(r=rank, alpha=2 * rank, targets=["query", "key", "value", "dense"]), seed=seed)
        self.head = torch.nn.Linear(self.bert.config.hidden_size, 1)
        torch.nn.init.zeros_(self.head.weight)
        torch.nn.init.zeros_(self.head.bias)

    def forward(self, pairs: list[tuple[str, str]]) -> torch.Tensor:
        from grounding.cross_encoder import pooled_pairs

        return self.head(pooled_pairs(self.bert, self.tokenizer.encode_batch(pairs)))[:, 0]

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {k: v.detach().to(torch.float32).contiguous() for k, v in self.bert.state_dict().items() if "lora_" in k}
        out["head.weight"] = self.head.weight.detach().clone()
        out["head.bias"] = self.head.bias.detach().clone()
        return out


def prepare(args):
    """What every experiment over the Data Commons gold set shares: the embedding model, the gazetteer,
    the catalogue's docs, each gold row's statistic phrase, the shipped search's best ``args.k``
    (positions into the docs and scores), gold positions, tuning and fold masks, and a key of the
    candidates' content (a trained model depends on the candidates, not on the bytes of the search-model
    file, which also holds the shipped cross-encoder)."""
    from grounding.variable_index import DEFAULT_SEARCH_MODEL_PATH
    from models.sentence_embedder import SentenceEmbedder

    embedder = SentenceEmbedder.load()
    gazetteer = Gazetteer.default()
    docs = catalog_docs(args.catalog)
    known = {d.dcid for d in docs}
    rows = [r for r in read_rows(args.queries, ("Query", "SV")) if r["SV"] in known]
    where = {d.dcid: i for i, d in enumerate(docs)}
    gold = np.array([where[r["SV"]] for r in rows])
    tuning = np.array([is_tuning_variable(r["SV"]) for r in rows])
    fold = np.array([fold_of(r["SV"]) for r in rows])
    phrases = cached_phrases([r["Query"] for r in rows], gazetteer, args.cache)
    index = open_catalog_index(docs, embedder, args.cache)
    key = hashlib.sha256("\n".join(phrases).encode() + Path(DEFAULT_SEARCH_MODEL_PATH).read_bytes()).hexdigest()[:12]
    t0 = time.perf_counter()
    pos, shipped = candidates(index, phrases, cached_embeddings(embedder, phrases, args.cache), args.k, args.cache, key)
    print(f"candidates: {time.perf_counter() - t0:.0f} s", flush=True)
    cands_key = hashlib.sha256(pos.tobytes() + shipped.tobytes()).hexdigest()[:12]
    return embedder, gazetteer, docs, phrases, pos, shipped, gold, tuning, fold, cands_key


def fold0_tag(args, seed: int, cands_key: str) -> str:
    """The cache name of the cross-encoder trained on tuning fold 0 with ``args``' recipe and ``seed``."""
    return f"ce-f0-r{args.rank}-e{args.epochs}-lr{args.lr}-b{args.batch}-s{seed}-{cands_key}"


def candidates(index, phrases, vectors, k: int, cache: Path, key: str):
    """(Q, k) doc positions and shipped scores, best first (-1 / nan padded)."""
    path = cache / f"ce-cands-{key}-k{k}.npz"
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        return z["pos"], z["score"]
    where = {d.dcid: i for i, d in enumerate(index.docs)}
    pos = np.full((len(phrases), k), -1, np.int64)
    score = np.full((len(phrases), k), np.nan, np.float32)
    for s in range(0, len(phrases), 512):
        for q, found in enumerate(index.search_many(phrases[s:s + 512], k=k, embeddings=vectors[s:s + 512]), start=s):
            for j, c in enumerate(found):
                pos[q, j], score[q, j] = where[c.dcid], c.score
    np.savez(path, pos=pos, score=score)
    return pos, score


def train(ce: CrossEncoder, phrases, texts, pos, gold, rows, *, epochs: int, lr: float, batch: int, seed: int):
    params = [p for p in ce.parameters() if p.requires_grad]
    print(f"cross-encoder: {sum(p.numel() for p in params)} trainable parameters, {len(rows)} queries", flush=True)
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    steps = epochs * math.ceil(len(rows) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 20) * max(0.0, 1 - s / steps))
    gen = np.random.default_rng(seed)
    ce.train()
    for epoch in range(epochs):
        order = gen.permutation(rows)
        total, start = 0.0, time.perf_counter()
        for s in range(0, len(order), batch):
            qs = order[s:s + batch]
            groups = []
            for q in qs:
                cand = [int(i) for i in pos[q] if i >= 0]
                if gold[q] not in cand:
                    cand[-1] = int(gold[q])
                groups.append(cand)
            pairs = [(phrases[q], texts[i]) for q, cand in zip(qs, groups, strict=True) for i in cand]
            logits = ce(pairs)
            loss, at = 0.0, 0
            for q, cand in zip(qs, groups, strict=True):
                z = logits[at:at + len(cand)]
                loss = loss + torch.nn.functional.cross_entropy(z[None], torch.tensor([cand.index(int(gold[q]))]))
                at += len(cand)
            loss = loss / len(qs)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            total += float(loss.detach()) * len(qs)
            if (s // batch) % 20 == 0:
                print(f"  epoch {epoch + 1} step {s // batch}: loss {float(loss.detach()):.4f} ({time.perf_counter() - start:.0f} s)",
                      flush=True)
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(rows):.4f} ({time.perf_counter() - start:.0f} s)", flush=True)
    ce.eval()


@torch.inference_mode()
def score(ce, phrases, texts, pos, rows, batch: int = 256) -> np.ndarray:
    """Logits of ``ce`` (a callable on a list of (phrase, text) pairs: the training module, or a runtime
    cross-encoder's ``score``) for every candidate of ``rows``, NaN elsewhere."""
    out = np.full(pos.shape, np.nan, np.float32)
    pairs = [(q, j) for q in rows for j in range(pos.shape[1]) if pos[q, j] >= 0]
    start = time.perf_counter()
    for s in range(0, len(pairs), batch):
        chunk = pairs[s:s + batch]
        z = ce([(phrases[q], texts[pos[q, j]]) for q, j in chunk])
        z = z.numpy() if isinstance(z, torch.Tensor) else z
        for (q, j), v in zip(chunk, z, strict=True):
            out[q, j] = v
    print(f"scored {len(pairs)} pairs in {time.perf_counter() - start:.0f} s "
          f"({len(pairs) / (time.perf_counter() - start):.0f} pairs/s)", flush=True)
    return out


def top1(pos, values, gold, rows) -> float:
    right = 0
    for q in rows:
        v = np.where(np.isnan(values[q]), -np.inf, values[q])
        right += pos[q, int(np.argmax(v))] == gold[q]
    return right / max(1, len(rows))


def logit(p):
    p = np.clip(p, 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def platt_fit(z: np.ndarray, right: np.ndarray) -> tuple[np.ndarray, float]:
    """``P(right) = sigmoid(z @ a + b)`` by logistic regression (L-BFGS); ``z`` is (n, features)."""
    zt, yt = torch.tensor(z, dtype=torch.float64), torch.tensor(right, dtype=torch.float64)
    a = torch.zeros(z.shape[1], dtype=torch.float64, requires_grad=True)
    b = torch.tensor(0.0, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([a, b], max_iter=300, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(zt @ a + b, yt)
        loss.backward()
        return loss

    opt.step(closure)
    return a.detach().numpy(), float(b.detach())


def sg_tuning(tensors, args, embedder, gazetteer, *, rank: int | None = None, alpha: float | None = None):
    """For the Systema Globalis tuning questions (never the reported set): per question, the cross-encoder
    logits of the shipped search's best ``k``, their reranker logits, and which is right."""
    from eval_variable_search import statistic_phrase, systema_globalis_docs
    from train_variable_reranker import SG_TUNING

    from grounding.cross_encoder import CrossEncoder as Runtime

    docs = systema_globalis_docs(args.systema_globalis)
    index = open_catalog_index(docs, embedder, args.cache)
    cross = Runtime.from_tensors(embedder, {k: v.numpy() for k, v in tensors.items()},
                                 rank=args.rank if rank is None else rank,
                                 alpha=2.0 * args.rank if alpha is None else alpha)
    questions = read_rows(SG_TUNING, ("Query", "SV"))
    phrases = [statistic_phrase(q["Query"], gazetteer)[0] for q in questions]
    ce, base, right = [], [], []
    for phrase, found, q in zip(phrases, index.search_many(phrases, k=args.k), questions, strict=True):
        ce.append(cross.score([(phrase, cross_encoder_text(index.doc(c.dcid))) for c in found]))
        base.append(logit(np.array([c.score for c in found])))
        right.append(np.array([c.dcid == q["SV"] for c in found], dtype=float))
    return ce, base, right


def sg_training_rows(args, embedder, gazetteer):
    """The Systema Globalis tuning questions as training rows: (phrases, doc texts, (Q, k) candidate positions
    into those texts, gold positions). A question whose variable is not among the candidates gets it in
    the last slot, as for the Data Commons queries."""
    from eval_variable_search import statistic_phrase, systema_globalis_docs
    from train_variable_reranker import SG_TUNING

    docs = systema_globalis_docs(args.systema_globalis)
    index = open_catalog_index(docs, embedder, args.cache)
    where = {d.dcid: i for i, d in enumerate(docs)}
    questions = read_rows(SG_TUNING, ("Query", "SV"))
    phrases = [statistic_phrase(q["Query"], gazetteer)[0] for q in questions]
    pos = np.full((len(phrases), args.k), -1, np.int64)
    for q, found in enumerate(index.search_many(phrases, k=args.k)):
        for j, c in enumerate(found):
            pos[q, j] = where[c.dcid]
    gold = np.array([where[q["SV"]] for q in questions])
    return phrases, [cross_encoder_text(d) for d in docs], pos, gold


def ship(args, tensors, beta: float, pos, combined, reranker_logit, gold, choose_rows, held, extra=None, *,
         rank: int | None = None, alpha: float | None = None, description: str | None = None) -> None:
    """Write ``args.ship``: the shipped search model with the cross-encoder ``tensors`` (LoRA ``rank`` and
    ``alpha``, by default ``args.rank`` and twice it), ``beta``, and a Platt scaling fitted on the top
    candidates of ``choose_rows`` (plus ``extra``); ``description`` replaces the notes' account of how it
    was trained."""
    rank = args.rank if rank is None else rank
    alpha = 2.0 * args.rank if alpha is None else alpha
    from grounding.variable_index import DEFAULT_SEARCH_MODEL_PATH, CrossEncoderSettings, SearchModel

    def tops(rows):
        z, right = [], []
        for q in rows:
            v = np.where(np.isnan(combined[q]), -np.inf, combined[q])
            j = int(np.argmax(v))
            z.append((v[j], reranker_logit[q, j]))
            right.append(float(pos[q, j] == gold[q]))
        return np.array(z), np.array(right)

    z, right = tops(choose_rows)
    if extra is not None:
        z, right = np.concatenate([z, extra[0]]), np.concatenate([right, extra[1]])
    a, b = platt_fit(z, right)
    zh, rh = tops(held)
    p = 1 / (1 + np.exp(-(zh @ a + b)))
    print(f"Platt on fold-1 tuning: scales {a}, bias {b:.4f}; held-out: mean predicted {p.mean():.3f} vs "
          f"observed {rh.mean():.3f}; answered at 0.5: {np.mean(p >= 0.5):.3f}, right among them "
          f"{rh[p >= 0.5].mean():.3f}", flush=True)
    model = SearchModel.load(DEFAULT_SEARCH_MODEL_PATH)
    model.cross_encoder = {k.removeprefix("bert."): v.numpy() for k, v in tensors.items()}
    model.cross_encoder_settings = CrossEncoderSettings(rank=rank, alpha=alpha, k=args.k, beta=beta,
                                                        scale=float(a[0]), scale_reranker=float(a[1]), bias=b)
    if description is None:
        trained_on = "all tuning variables" if args.full else "tuning fold 0"
        if args.full and args.train_sg:
            trained_on += f" and the Systema Globalis tuning questions (x{args.train_sg})"
        description = (f"LoRA r{args.rank} on all-MiniLM-L6-v2, {args.epochs} epochs on {trained_on}, beta and Platt "
                       f"chosen on tuning fold 1 with the fold-0 model (benchmarks/experiment_cross_encoder.py)")
    model.notes = (model.notes.split("; cross-encoder:")[0] + f"; cross-encoder: {description}").lstrip("; ")
    model.save(args.ship)
    print(f"wrote {args.ship}", flush=True)


def train_full(args, embedder, gazetteer, phrases, texts, pos, gold, tuning) -> CrossEncoder:
    """The cross-encoder retrained with ``args``' recipe on every tuning variable's queries (with
    ``args.train_sg``: plus the Systema Globalis tuning questions, each that many times)."""
    from models.sentence_embedder import SentenceEmbedder

    full = CrossEncoder(SentenceEmbedder.load(), args.rank, args.seed)
    all_phrases, all_texts, all_pos, all_gold = phrases, texts, pos, gold
    train_on = np.flatnonzero(tuning)
    if args.train_sg:  # appended after the Data Commons rows, their texts after the catalogue's
        sp, st, spos, sgold = sg_training_rows(args, embedder, gazetteer)
        all_phrases, all_texts = phrases + sp, texts + st
        all_pos = np.concatenate([pos, np.where(spos >= 0, spos + len(texts), -1)])
        all_gold = np.concatenate([gold, sgold + len(texts)])
        train_on = np.concatenate([train_on] + [len(phrases) + np.arange(len(sp))] * args.train_sg)
    train(full, all_phrases, all_texts, all_pos, all_gold, train_on, epochs=args.epochs, lr=args.lr,
          batch=args.batch, seed=args.seed)
    return full


def add_recipe_arguments(parser: argparse.ArgumentParser, *, epochs: int) -> None:
    """The data, cache and training-recipe options every cross-encoder experiment shares (the recipe
    names a trained fold-0 model in the cache: :func:`fold0_tag`)."""
    parser.add_argument("--catalog", type=Path, required=True)
    parser.add_argument("--queries", type=Path, required=True)
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "varsearch")
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=epochs)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--systema-globalis", type=Path,
                        default=Path("/work/shared/data/systema_globalis-c63631a.tar.xz"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser, epochs=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--full", action="store_true", help="then retrain on all tuning variables and save")
    parser.add_argument("--out", type=Path, default=ROOT / ".cache" / "varsearch" / "cross_encoder.safetensors")
    parser.add_argument("--sg-tuning", action="store_true",
                        help="choose beta on the mean top-1 of DC fold 1 and the Systema Globalis tuning questions, "
                             "and fit the Platt scaling on both")
    parser.add_argument("--train-sg", type=int, default=0, metavar="N",
                        help="with --full: also train on the Systema Globalis tuning questions, each N times")
    parser.add_argument("--ship", type=Path, default=None,
                        help="write the shipped search model plus the cross-encoder (fold 0's, or with --full the "
                             "retrained one), beta and a Platt scaling fitted on fold 1, to this path")
    args = parser.parse_args(argv)
    torch.manual_seed(args.seed)

    from models.sentence_embedder import SentenceEmbedder

    embedder, gazetteer, docs, phrases, pos, shipped, gold, tuning, fold, cands_key = prepare(args)
    texts = [cross_encoder_text(d) for d in docs]
    train_rows = np.flatnonzero(tuning & (fold == 0))
    choose_rows = np.flatnonzero(tuning & (fold == 1))
    held = np.flatnonzero(~tuning)
    print(f"shipped top-1: fold-1 tuning {top1(pos, shipped, gold, choose_rows):.3f}, held-out {top1(pos, shipped, gold, held):.3f}; "
          f"gold within top-{args.k}: held-out {np.mean([gold[q] in pos[q] for q in held]):.3f}", flush=True)
    tag = fold0_tag(args, args.seed, cands_key)
    ce_embedder = SentenceEmbedder.load()
    ce = CrossEncoder(ce_embedder, args.rank, args.seed)
    scores_path = args.cache / f"{tag}-scores.npz"
    if scores_path.is_file():  # trained and scored before (its tensors are beside the scores)
        ce_scores = np.load(scores_path, allow_pickle=False)["scores"]
    else:
        train(ce, phrases, texts, pos, gold, train_rows, epochs=args.epochs, lr=args.lr, batch=args.batch, seed=args.seed)
        ce_scores = score(ce, phrases, texts, pos, np.concatenate([choose_rows, held]))
        np.savez(scores_path, scores=ce_scores)
    base = logit(shipped)
    print(f"cross-encoder alone top-1: fold-1 tuning {top1(pos, ce_scores, gold, choose_rows):.3f}, "
          f"held-out {top1(pos, ce_scores, gold, held):.3f}", flush=True)
    betas = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0]
    on_choose = {b: top1(pos, ce_scores + b * base, gold, choose_rows) for b in betas}
    print("beta -> fold-1 tuning top-1: " + ", ".join(f"{b}: {a:.3f}" for b, a in on_choose.items()))
    from safetensors.torch import load_file, save_file

    tensors_path = args.cache / f"{tag}.safetensors"
    if not tensors_path.is_file():
        save_file(ce.tensors(), str(tensors_path))
    sg = sg_tuning(load_file(str(tensors_path)), args, embedder, gazetteer) if args.sg_tuning else None
    if sg is not None:
        on_sg = {b: float(np.mean([r[int(np.argmax(z + b * bl))] for z, bl, r in zip(*sg, strict=True)]))
                 for b in betas}
        print("beta -> Systema Globalis tuning top-1: " + ", ".join(f"{b}: {a:.3f}" for b, a in on_sg.items()))
        beta = max(betas, key=lambda b: ((on_choose[b] + on_sg[b]) / 2, -b))
        print(f"chosen on the mean of both: beta {beta}")
    else:
        beta = max(betas, key=lambda b: (on_choose[b], -b))
    print(f"chosen beta {beta}: held-out top-1 {top1(pos, ce_scores + beta * base, gold, held):.3f} "
          f"(shipped {top1(pos, shipped, gold, held):.3f})", flush=True)
    print("for information only, never used for a choice, held-out by beta: " + ", ".join(
        f"{b}: {top1(pos, ce_scores + b * base, gold, held):.3f}" for b in betas), flush=True)
    extra = None
    if sg is not None:  # the SG tuning questions' top combined logits and whether they are right
        tops = []
        for z, bl, r in zip(*sg, strict=True):
            j = int(np.argmax(z + beta * bl))
            tops.append(((float(z[j] + beta * bl[j]), float(bl[j])), float(r[j])))
        extra = (np.array([t for t, _ in tops]), np.array([r for _, r in tops]))
    if args.ship and not args.full:
        ship(args, load_file(str(tensors_path)), beta, pos, ce_scores + beta * base, base, gold, choose_rows, held, extra)
    if args.full:
        full = train_full(args, embedder, gazetteer, phrases, texts, pos, gold, tuning)
        full_scores = score(full, phrases, texts, pos, held)
        print(f"full-tuning cross-encoder, beta {beta}: held-out top-1 "
              f"{top1(pos, full_scores + beta * base, gold, held):.3f}; alone {top1(pos, full_scores, gold, held):.3f}")
        save_file(full.tensors(), str(args.out), metadata={"beta": json.dumps(beta), "k": str(args.k)})
        if args.ship:  # beta and the Platt scaling as chosen for the fold-0 model, on fold 1
            ship(args, load_file(str(args.out)), beta, pos, ce_scores + beta * base, base, gold, choose_rows, held, extra)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
