"""Experiment: cross-encoders trained with different seeds, averaged in weight space (a "soup") or in output.

    python benchmarks/experiment_cross_encoder.py ... --epochs 2 --sg-tuning --seed 0   # and --seed 1, ...
    python benchmarks/experiment_cross_encoder_soup.py --catalog ../shared/data/dc_nl/catalog.csv \
        --queries ../shared/data/dc_nl/queries_dev.csv --epochs 2 --seeds 0,1

Every model is all-MiniLM-L6-v2 plus a LoRA update and a linear head, trained from the same weights with
the same recipe; only the seed (LoRA initialisation and batch order) differs. Two ways to combine them:

- **ensemble**: the mean of the models' logits. N encoder passes per pair.
- **soup**: the mean of the models' weight updates, ``mean_i (alpha/r) B_i A_i``, which is itself a LoRA
  update of rank ``N * r`` (the factors side by side, ``alpha`` kept at ``2 r`` so the scale becomes
  ``2 / N``), and the mean of the heads. The runtime merges it into the weights, so it costs exactly what
  one model costs. Models fine-tuned from one pretrained model usually lie in one basin, where the
  averaged weights score about like the ensemble (Wortsman et al., "Model soups", 2022).

Protocol, as in ``experiment_cross_encoder.py``: the models compared here are the ones trained on
tuning fold 0 (cached by that script); the variant (one model, ensemble or soup) and ``beta`` are chosen
on the mean top-1 of tuning fold 1 and the Systema Globalis tuning questions; the held-out half is scored
for the chosen variant (all are printed, for information, after the choice). Measured on 2026-12-07/08
(README): neither the ensemble nor the soup beat a single model, so nothing here writes a search model;
shipping a soup would mean souping models retrained on all tuning variables the same way.
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

from experiment_cross_encoder import add_recipe_arguments, fold0_tag, logit, prepare, score, sg_tuning, top1  # noqa: E402

from grounding.variable_index import cross_encoder_text  # noqa: E402

BETAS = [0.0, 0.1, 0.2, 0.3, 0.5, 0.7, 1.0, 1.5, 2.0, 3.0, 5.0, 7.0, 10.0, 15.0, 20.0]


def soup(models: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """One LoRA update of rank ``N * r`` equal to the mean of ``N`` rank-``r`` updates (each with scale
    ``alpha / r = 2``, so the soup, with ``alpha = 2 r`` at rank ``N r``, has scale ``2 / N``), and the
    mean head. Tensor names as :meth:`experiment_cross_encoder.CrossEncoder.tensors` writes them."""
    names = set(models[0])
    for m in models[1:]:
        if set(m) != names:
            raise ValueError("the cross-encoders to average have different tensors")
    out = {}
    for name in sorted(names):
        values = [m[name].to(torch.float32) for m in models]
        if ".lora_A." in name:  # (r, in): stacked along the rank
            out[name] = torch.cat(values, dim=0).contiguous()
        elif ".lora_B." in name:  # (out, r)
            out[name] = torch.cat(values, dim=1).contiguous()
        else:  # the head
            out[name] = torch.stack(values).mean(0)
    return out


def runtime_scores(tensors, rank: int, alpha: float, embedder, phrases, texts, pos, rows) -> np.ndarray:
    """Logits of the merged (runtime) cross-encoder for every candidate of ``rows``; NaN elsewhere."""
    from grounding.cross_encoder import CrossEncoder as Runtime

    cross = Runtime.from_tensors(embedder, {k: v.numpy() for k, v in tensors.items()}, rank=rank, alpha=alpha)
    return score(cross.score, phrases, texts, pos, rows, batch=4096)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_recipe_arguments(parser, epochs=2)
    parser.add_argument("--seeds", default="0,1", help="the fold-0 cross-encoders to combine (comma-separated seeds)")
    args = parser.parse_args(argv)
    from safetensors.torch import load_file

    seeds = [int(s) for s in args.seeds.split(",")]
    embedder, gazetteer, docs, phrases, pos, shipped, gold, tuning, fold, cands_key = prepare(args)
    texts = [cross_encoder_text(d) for d in docs]
    choose_rows = np.flatnonzero(tuning & (fold == 1))
    held = np.flatnonzero(~tuning)
    scored = np.concatenate([choose_rows, held])
    base = logit(shipped)

    models, scores = [], []
    for seed in seeds:
        tag = fold0_tag(args, seed, cands_key)
        path = args.cache / f"{tag}.safetensors"
        if not path.is_file():
            raise SystemExit(f"no fold-0 cross-encoder for seed {seed} ({path}): run experiment_cross_encoder.py "
                             f"--seed {seed} with the same recipe first")
        models.append(load_file(str(path)))
        scores.append(np.load(args.cache / f"{tag}-scores.npz", allow_pickle=False)["scores"])
    n, rank, alpha = len(seeds), args.rank * len(seeds), 2.0 * args.rank
    soup_fold0 = soup(models)
    soup_path = args.cache / f"soup-f0-{'-'.join(map(str, seeds))}-{fold0_tag(args, 0, cands_key)}-scores.npz"
    if soup_path.is_file():
        soup_scores = np.load(soup_path, allow_pickle=False)["scores"]
    else:
        soup_scores = runtime_scores(soup_fold0, rank, alpha, embedder, phrases, texts, pos, scored)
        np.savez(soup_path, scores=soup_scores)

    # Systema Globalis tuning questions: per question (CE logits, reranker logits, right)
    sg_each = [sg_tuning(m, args, embedder, gazetteer) for m in models]
    sg_soup = sg_tuning(soup_fold0, args, embedder, gazetteer, rank=rank, alpha=alpha)
    sg_ens = ([np.mean([s[0][i] for s in sg_each], axis=0) for i in range(len(sg_each[0][0]))],
              sg_each[0][1], sg_each[0][2])
    variants = {f"seed {s}": (scores[i], sg_each[i]) for i, s in enumerate(seeds)}
    variants[f"ensemble of {n}"] = (np.mean(scores, axis=0), sg_ens)
    variants[f"soup of {n}"] = (soup_scores, sg_soup)

    choice = {}
    for name, (values, sg) in variants.items():
        on_choose = {b: top1(pos, values + b * base, gold, choose_rows) for b in BETAS}
        on_sg = {b: float(np.mean([r[int(np.argmax(z + b * bl))] for z, bl, r in zip(*sg, strict=True)])) for b in BETAS}
        beta = max(BETAS, key=lambda b: ((on_choose[b] + on_sg[b]) / 2, -b))
        choice[name] = (beta, (on_choose[beta] + on_sg[beta]) / 2)
        print(f"{name}: beta {beta}: fold-1 tuning {on_choose[beta]:.3f}, SG tuning {on_sg[beta]:.3f}; "
              f"alone: fold-1 {top1(pos, values, gold, choose_rows):.3f}", flush=True)
    chosen = max(choice, key=lambda name: choice[name][1])
    beta = choice[chosen][0]
    print(f"chosen on fold 1 + SG tuning: {chosen}, beta {beta}: held-out top-1 "
          f"{top1(pos, variants[chosen][0] + beta * base, gold, held):.3f} (shipped search {top1(pos, shipped, gold, held):.3f})",
          flush=True)
    print("for information only, never used for a choice, held-out at each variant's beta: " + ", ".join(
        f"{name} {top1(pos, values + choice[name][0] * base, gold, held):.3f}" for name, (values, _) in variants.items()))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
