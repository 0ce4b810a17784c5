"""``gemma-ground train-retriever --base DIR --pairs FILE --out DIR``: fine-tune a ColPali retriever.

Thin: parses arguments and calls :func:`vision_rag.retriever_training.train_retriever`; the output directory
is a PEFT adapter that ``gemma-ground index --model BASE --adapter OUT`` and ``ColPaliEmbedder.load`` use.
"""

from __future__ import annotations

import sys

__all__ = ["register"]


def register(sub) -> None:
    from models.train_cli import add_training_options

    p = sub.add_parser("train-retriever", help="fine-tune a ColPali retriever on (query, page image) pairs")
    p.add_argument("--base", required=True, help="ColPali checkpoint directory to start from")
    p.add_argument("--pairs", required=True, help='JSON lines: {"query": ..., "image": path[, "page": n]'
                                                  '[, "negative": path]}, paths relative to the file')
    p.add_argument("--out", required=True, help="output directory (PEFT adapter, logs, checkpoints)")
    p.add_argument("--eval-pairs", default=None, help="held-out pairs for the evaluation loss and recall")
    p.add_argument("--loss", choices=("pairwise", "hard-negative", "cross-entropy"), default="pairwise",
                   help="pairwise softplus (the paper's), with hard negatives, or in-batch cross-entropy")
    p.add_argument("--projection", choices=("full", "lora"), default="full",
                   help="train the 128-dim projection in full (default) or with LoRA")
    p.add_argument("--temperature", type=float, default=0.02, help="of the cross-entropy loss")
    add_training_options(p, lora_r=32, lora_alpha=32, lora_dropout=0.1, lr=5e-5)
    p.set_defaults(func=_cmd_train_retriever)


def _cmd_train_retriever(args) -> int:
    from models.train_cli import training_settings

    from .retriever_training import train_retriever

    lora, train = training_settings(args)
    result = train_retriever(args.base, args.pairs, args.out, loss=args.loss, lora=lora, projection=args.projection,
                             train_settings=train, batch_size=args.batch_size, eval_pairs=args.eval_pairs,
                             temperature=args.temperature, dtype=args.dtype, device=args.device, resume=args.resume)
    report = result.pairs
    print(f"{report.source}: {report.used} of {report.rows} pairs used, {report.skipped} skipped {report.reasons}",
          file=sys.stderr)
    for problem in report.problems:
        print(f"  row {problem['row']}: {problem['reason']}", file=sys.stderr)
    if args.json:
        print(result.model_dump_json(indent=1))
    else:
        t = result.training
        print(f"{t.steps} steps, loss {t.losses[0]:.4f} -> {t.losses[-1]:.4f}; recall {result.recall_before} -> "
              f"{result.recall_after}; adapter in {result.out_dir}")
    return 0
