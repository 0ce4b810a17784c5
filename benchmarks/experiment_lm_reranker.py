"""Experiment: reorder the search's best 10 by query likelihood under Gemma 3 270M (zero-shot), and ship it.

    python benchmarks/experiment_lm_reranker.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv [--lm PATH] [--ship grounding/data/variable_search.safetensors]

For each query's best ``k`` candidates (the shipped search: hybrid, adapter, reranker), the language model
scores ``log P(" " + phrase | "<bos>Statistic: " + variable name + "\\nQuestion:")``
(:class:`grounding.lm_reranker.QueryLikelihoodReranker`, the shipped code). Nothing is trained; what is
chosen is one weight per combination and a Platt scaling:

- after the reranker: ``logit(reranker score) + w * log P``;
- after the cross-encoder: ``ce_logit + beta * logit(reranker score) + w * log P`` (``beta`` as shipped).

Honest protocol, as for the cross-encoder (the held-out half of the gold set is used for nothing but the
final figures): ``w`` is chosen on the mean top-1 of the tuning variables of fold 1 and the Systema
Globalis tuning questions; with the cross-encoder, its logits there come from the cross-encoder trained
on fold 0 only (``experiment_cross_encoder.py``'s cached model: the one the shipped ``beta`` was chosen
with), since the shipped one was trained on fold 1 too. The Platt scaling is fitted on the same
questions' top candidates. Held out, the shipped cross-encoder is used. The language model's scores
are cached in ``--cache`` (``lm-*.npz``, saved as they are made: an interrupted run resumes).
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from eval_variable_search import SG_QUESTIONS, open_catalog_index, read_rows, statistic_phrase  # noqa: E402
from experiment_cross_encoder import (  # noqa: E402
    add_recipe_arguments,
    fold0_tag,
    logit,
    platt_fit,
    prepare,
    score,
    sg_tuning,
)

WEIGHTS = [0.0, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0]


def lm_scores(lm, phrases: list[str], names: list[list[str]], path: Path) -> np.ndarray:
    """``(len(phrases), k)`` log-likelihoods (nan where a query has fewer candidates), cached at ``path``
    and saved every 200 queries."""
    k = max((len(n) for n in names), default=0)
    out = np.full((len(phrases), k), np.nan, np.float32)
    done = np.zeros(len(phrases), bool)
    if path.is_file():
        z = np.load(path, allow_pickle=False)
        if z["scores"].shape == out.shape:
            out, done = z["scores"], z["done"]
    todo = np.flatnonzero(~done)
    t0 = time.perf_counter()
    for n, q in enumerate(todo, start=1):
        if names[q]:
            out[q, :len(names[q])] = lm.score(phrases[q], names[q])
        done[q] = True
        if n % 200 == 0 or n == len(todo):
            np.savez(path, scores=out, done=done)
            print(f"  language model: {n}/{len(todo)} queries, {(time.perf_counter() - t0) / n:.2f} s each", flush=True)
    return out


def top1(values: np.ndarray, right: np.ndarray) -> float:
    """Share of rows whose best value is a right candidate (``right``: (n, k) 0/1, nan-padded values)."""
    best = np.argmax(np.where(np.isnan(values), -np.inf, values), axis=1)
    return float(right[np.arange(len(right)), best].mean()) if len(right) else 0.0


def topn(values: np.ndarray, right: np.ndarray, n: int) -> float:
    order = np.argsort(-np.where(np.isnan(values), -np.inf, values), axis=1, kind="stable")[:, :n]
    return float(np.take_along_axis(right, order, axis=1).max(axis=1).mean()) if len(right) else 0.0


def calibration_features(values: np.ndarray, rl: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the best candidate's position, and its features for the Platt scaling as
    :class:`grounding.variable_index.LMCombination` computes them (its share of the combined values, a
    log-softmax over the row's candidates, and the reranker's logit)."""
    v = np.where(np.isnan(values), -np.inf, values)
    j = np.argmax(v, axis=1)
    rows = np.arange(len(v))
    top = v[rows, j]
    share = top - (top + np.log(np.exp(v - top[:, None]).sum(axis=1)))
    return j, np.stack([share, rl[rows, j]], axis=1)


def combined(base: np.ndarray, ll: np.ndarray, w: float, k: int) -> tuple[np.ndarray, np.ndarray]:
    """As the runtime stage combines them: the best ``k`` of each row by ``base`` (the earlier stage's
    order; stable, so the reranker's own order when ``base`` is its logit) get ``base + w * ll``, the others
    keep their order below them. Returns the values to rank by, and the same with NaN outside the best ``k``
    (what :func:`calibration_features` reads)."""
    b = np.where(np.isnan(base), -np.inf, base)
    head = np.argsort(-b, axis=1, kind="stable")[:, :k]
    rows = np.arange(len(b))[:, None]
    values = np.where(np.isnan(base), np.nan, base - 1e9)
    values[rows, head] = base[rows, head] + w * ll[rows, head]
    head_values = np.full(base.shape, np.nan)
    head_values[rows, head] = values[rows, head]
    return values, head_values


def choose(name: str, z_dc, ll_dc, right_dc, z_sg, ll_sg, right_sg, rl_dc, rl_sg, k: int):
    """The weight with the best mean top-1 of fold 1 and SG tuning (ties: the smaller), and its Platt scaling
    fitted on both sets' top candidates (features: :func:`calibration_features`)."""
    on_dc = {w: top1(combined(z_dc, ll_dc, w, k)[0], right_dc) for w in WEIGHTS}
    on_sg = {w: top1(combined(z_sg, ll_sg, w, k)[0], right_sg) for w in WEIGHTS}
    print(f"{name}: weight -> top-1 on fold-1 tuning / SG tuning: "
          + ", ".join(f"{w}: {on_dc[w]:.3f}/{on_sg[w]:.3f}" for w in WEIGHTS), flush=True)
    w = max(WEIGHTS, key=lambda w: ((on_dc[w] + on_sg[w]) / 2, -w))
    feats, rights = [], []
    for z, ll, right, rl in ((z_dc, ll_dc, right_dc, rl_dc), (z_sg, ll_sg, right_sg, rl_sg)):
        j, f = calibration_features(combined(z, ll, w, k)[1], rl)
        feats.append(f)
        rights.append(right[np.arange(len(j)), j])
    a, b = platt_fit(np.concatenate(feats), np.concatenate(rights))
    print(f"{name}: chosen weight {w} (fold-1 {on_dc[w]:.3f}, SG tuning {on_sg[w]:.3f}; without it "
          f"{on_dc[0.0]:.3f}, {on_sg[0.0]:.3f}); Platt scales {a}, bias {b:.3f}", flush=True)
    return w, a, b


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser, epochs=2)
    parser.add_argument("--lm", default=None, help="language model (checkpoint directory or .gguf; default: Gemma "
                                                   "3 270M of the 'weights' extra)")
    parser.add_argument("--lm-k", type=int, default=5,
                        help="how many of the earlier stage's best the language model reorders (it scores only "
                             "those: the cost is proportional)")
    parser.add_argument("--ship", type=Path, default=None,
                        help="write the shipped search model with the chosen language-model settings to this path")
    args = parser.parse_args(argv)

    from safetensors.torch import load_file

    from grounding.cross_encoder import CrossEncoder as Runtime
    from grounding.lm_reranker import DEFAULT_TEMPLATE, QueryLikelihoodReranker
    from grounding.variable_index import (
        DEFAULT_SEARCH_MODEL_PATH,
        LMCombination,
        LMRerankerSettings,
        SearchModel,
    )

    embedder, gazetteer, docs, phrases, pos, shipped, gold, tuning, fold, cands_key = prepare(args)
    choose_rows, held = np.flatnonzero(tuning & (fold == 1)), np.flatnonzero(~tuning)
    lm = QueryLikelihoodReranker.load(args.lm)
    lm_key = hashlib.sha256(f"{Path(lm.source).name}|{lm.template}|{cands_key}".encode()).hexdigest()[:12]
    names = [[docs[p].name for p in pos[q] if p >= 0] for q in range(len(phrases))]
    right = (pos == gold[:, None]).astype(float)
    rl = logit(shipped)

    def rows_scores(rows, label):
        print(f"{label}: {len(rows)} queries", flush=True)
        return lm_scores(lm, [phrases[q] for q in rows], [names[q] for q in rows], args.cache / f"lm-{lm_key}-{label}.npz")

    ll_choose = rows_scores(choose_rows, "fold1")
    # Fold 0's cross-encoder (the shipped beta was chosen with it) on fold 1 and the SG tuning questions.
    tag = fold0_tag(args, 0, cands_key)
    scores_path, tensors_path = args.cache / f"{tag}-scores.npz", args.cache / f"{tag}.safetensors"
    if not (scores_path.is_file() and tensors_path.is_file()):
        raise SystemExit(f"{scores_path} or its tensors are missing: run benchmarks/experiment_cross_encoder.py "
                         "--epochs 2 --sg-tuning first (it trains and scores the fold-0 cross-encoder)")
    ce0 = np.load(scores_path, allow_pickle=False)["scores"]
    model = SearchModel.load(DEFAULT_SEARCH_MODEL_PATH)
    beta = model.cross_encoder_settings.beta
    sg_ce, sg_rl, sg_right = sg_tuning(load_file(str(tensors_path)), args, embedder, gazetteer)
    from eval_variable_search import systema_globalis_docs
    from train_variable_reranker import SG_TUNING

    sg_docs = systema_globalis_docs(args.systema_globalis)
    sg_index = open_catalog_index(sg_docs, embedder, args.cache)

    def sg_set(path: Path, label: str):
        questions = read_rows(path, ("Query", "SV"))
        sg_phrases = [statistic_phrase(q["Query"], gazetteer)[0] for q in questions]
        found = sg_index.search_many(sg_phrases, k=args.k)
        k = max(len(f) for f in found)
        pad = lambda rows: np.array([r + [np.nan] * (k - len(r)) for r in rows], dtype=float)  # noqa: E731
        sg_rl_ = pad([[float(logit(np.array(c.score))) for c in f] for f in found])
        sg_right_ = np.nan_to_num(pad([[float(c.dcid == q["SV"]) for c in f] for f, q in zip(found, questions,
                                                                                            strict=True)]))
        ll = lm_scores(lm, sg_phrases, [[sg_index.doc(c.dcid).name for c in f] for f in found],
                       args.cache / f"lm-{lm_key}-{label}-{hashlib.sha256(path.read_bytes()).hexdigest()[:8]}.npz")
        return sg_rl_, sg_right_, ll, found, questions, sg_phrases

    t_rl, t_right, t_ll, *_ = sg_set(SG_TUNING, "sg-tuning")
    # sg_tuning() gives the same candidates (the same index and phrases); check, then use its CE logits.
    assert np.allclose(np.nan_to_num(t_rl), np.nan_to_num(np.array([np.r_[b, [np.nan] * (t_rl.shape[1] - len(b))]
                                                                        for b in sg_rl])), atol=1e-5)
    t_ce = np.array([np.r_[c, [np.nan] * (t_rl.shape[1] - len(c))] for c in sg_ce])

    rc, rl_c = right[choose_rows], rl[choose_rows]
    k = args.lm_k
    w_a, a_a, b_a = choose("after the reranker", rl_c, ll_choose, rc, t_rl, t_ll, t_right, rl_c, t_rl, k)
    w_c, a_c, b_c = choose("after the cross-encoder (fold-0 model)", ce0[choose_rows] + beta * rl_c, ll_choose, rc,
                           t_ce + beta * t_rl, t_ll, t_right, rl_c, t_rl, k)

    # Held out: the language model, and the shipped cross-encoder, once.
    ll_held = rows_scores(held, "held-out")
    cross = Runtime.from_tensors(embedder, model.cross_encoder, rank=model.cross_encoder_settings.rank,
                                 alpha=model.cross_encoder_settings.alpha)
    from grounding.variable_index import cross_encoder_text

    texts = [cross_encoder_text(d) for d in docs]
    ce_held = score(lambda pairs: cross.score(pairs), phrases, texts, pos, held)[held]
    rh, rl_h = right[held], rl[held]
    lm_a = combined(rl_h, ll_held, w_a, k)
    lm_c = combined(ce_held + beta * rl_h, ll_held, w_c, k)
    variants = {
        "shipped default (adapter + fusion + reranker)": rl_h,
        f"+ language model (w {w_a}, best {k})": lm_a[0],
        "+ cross-encoder (shipped, opt-in)": ce_held + beta * rl_h,
        f"+ cross-encoder + language model (w {w_c}, best {k})": lm_c[0],
        "language model alone (over the best 10)": ll_held,
    }
    print(f"\nheld-out split ({len(held)} queries), top-1 / top-3 / top-10 over the best {args.k}:")
    for label, v in variants.items():
        print(f"| {label} | {top1(v, rh):.3f} / {topn(v, rh, 3):.3f} / {topn(v, rh, 10):.3f} |")
    for label, (_, head_values), a, b in (("language model", lm_a, a_a, b_a),
                                          ("cross-encoder + language model", lm_c, a_c, b_c)):
        j, f = calibration_features(head_values, rl_h)
        # capped at the reranker's best score among the candidates, as the runtime does
        p = np.minimum(1 / (1 + np.exp(-(f @ a + b))), np.nanmax(shipped[held], axis=1))
        ok = rh[np.arange(len(j)), j]
        print(f"{label}: held-out mean predicted {p.mean():.3f} vs observed {ok.mean():.3f}; answered at 0.5: "
              f"{np.mean(p >= 0.5):.3f}, right among them {ok[p >= 0.5].mean():.3f}")
    print("for information only, never used for a choice, held-out top-1 by weight: after the reranker "
          + ", ".join(f"{w}: {top1(combined(rl_h, ll_held, w, k)[0], rh):.3f}" for w in WEIGHTS)
          + "; after the cross-encoder "
          + ", ".join(f"{w}: {top1(combined(ce_held + beta * rl_h, ll_held, w, k)[0], rh):.3f}" for w in WEIGHTS)
          + "; by how many the language model reorders (chosen weights): "
          + ", ".join(f"{n}: {top1(combined(rl_h, ll_held, w_a, n)[0], rh):.3f} / "
                      f"{top1(combined(ce_held + beta * rl_h, ll_held, w_c, n)[0], rh):.3f}" for n in (2, 3, 5, 10)),
          flush=True)

    # The reported Systema Globalis questions (never used for a choice).
    r_rl, r_right, r_ll, found, questions, sg_phrases = sg_set(SG_QUESTIONS, "sg-reported")
    r_ce = np.array([np.r_[cross.score([(p, cross_encoder_text(sg_index.doc(c.dcid))) for c in f]),
                           [np.nan] * (r_rl.shape[1] - len(f))] for p, f in zip(sg_phrases, found, strict=True)])
    print(f"Systema Globalis reported questions ({len(questions)}), top-1 / top-3: shipped "
          f"{top1(r_rl, r_right):.3f} / {topn(r_rl, r_right, 3):.3f}; + language model "
          f"{top1(combined(r_rl, r_ll, w_a, k)[0], r_right):.3f} / {topn(combined(r_rl, r_ll, w_a, k)[0], r_right, 3):.3f}"
          f"; + cross-encoder {top1(r_ce + beta * r_rl, r_right):.3f}; + cross-encoder + language model "
          f"{top1(combined(r_ce + beta * r_rl, r_ll, w_c, k)[0], r_right):.3f}", flush=True)

    if args.ship:
        model.lm_reranker_settings = LMRerankerSettings(
            k=k, template=DEFAULT_TEMPLATE, model=Path(lm.source).name,
            after_reranker=LMCombination(weight=w_a, scale=float(a_a[0]), scale_reranker=float(a_a[1]), bias=b_a),
            after_cross_encoder=LMCombination(weight=w_c, scale=float(a_c[0]), scale_reranker=float(a_c[1]), bias=b_c))
        model.notes = (model.notes.split("; language model:")[0] + "; language model: zero-shot query likelihood, "
                       "weights and Platt chosen on tuning fold 1 + SG tuning (benchmarks/experiment_lm_reranker.py)")
        model.save(args.ship)
        print(f"wrote {args.ship}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
