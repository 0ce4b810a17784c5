"""``gemma-ground finetune --model SOURCE --data FILE --out DIR``: LoRA instruction tuning from the shell.

Thin: parses arguments and calls :func:`models.finetune.finetune`. The LoRA and training options are
shared with ``gemma-ground train-retriever`` (:func:`add_training_options`, :func:`training_settings`).
Prints the data report, then (with ``--json``) the whole result as JSON, else a short summary.
"""

from __future__ import annotations

import sys

__all__ = ["register", "add_training_options", "training_settings"]


def add_training_options(p, *, lora_r: int, lora_alpha: float, lora_dropout: float, lr: float) -> None:
    """LoRA and loop options (defaults differ per command)."""
    p.add_argument("--lora-r", type=int, default=lora_r, help=f"LoRA rank (default {lora_r})")
    p.add_argument("--lora-alpha", type=float, default=lora_alpha, help=f"LoRA alpha (default {lora_alpha:g})")
    p.add_argument("--lora-dropout", type=float, default=lora_dropout, help=f"LoRA dropout (default {lora_dropout:g})")
    p.add_argument("--rslora", action="store_true", help="scale by alpha / sqrt(r) (rank-stabilised LoRA)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps (default: all epochs)")
    p.add_argument("--lr", type=float, default=lr, help=f"peak learning rate (default {lr:g})")
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--warmup-steps", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=4, help="examples per micro-batch")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the gradient norm (0: no clipping)")
    p.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in the backward")
    p.add_argument("--autocast", choices=("auto", "bf16", "off"), default="auto",
                   help="bf16 autocast (auto: on CUDA only)")
    p.add_argument("--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)")
    p.add_argument("--eval-every", type=int, default=0, help="steps between evaluations (0: at start and end)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU, bf16 on GPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def training_settings(args, **lora_fields):
    """``(LoraSettings, TrainSettings)`` from the parsed options."""
    from .lora import LoraSettings
    from .train import TrainSettings

    lora = LoraSettings(r=args.lora_r, alpha=args.lora_alpha, dropout=args.lora_dropout, rslora=args.rslora,
                        **lora_fields)
    train = TrainSettings(learning_rate=args.lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
                          epochs=args.epochs, max_steps=args.max_steps, grad_accum=args.grad_accum,
                          max_grad_norm=args.max_grad_norm or None, autocast=args.autocast,
                          gradient_checkpointing=args.gradient_checkpointing, checkpoint_every=args.checkpoint_every,
                          eval_every=args.eval_every, seed=args.seed)
    return lora, train


def register(sub) -> None:
    p = sub.add_parser("finetune", help="LoRA instruction tuning of a Gemma model on JSONL/Parquet data")
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory, .gguf file or preset name")
    p.add_argument("--tokenizer", default=None, help="tokenizer source if not beside the model")
    p.add_argument("--data", required=True, help="JSONL or Parquet: InstAr fields (instruction, output, system) "
                                                 "or chat messages")
    p.add_argument("--out", required=True, help="output directory (adapter, logs, checkpoints)")
    p.add_argument("--eval-data", default=None, help="held-out data file (default: --eval-fraction of --data)")
    p.add_argument("--eval-fraction", type=float, default=0.05, help="share of --data held out (default 0.05)")
    p.add_argument("--max-len", type=int, default=None,
                   help="longest example in tokens (default 512, or the model's context if shorter); longer rows "
                        "are skipped")
    p.add_argument("--pack", action="store_true", help="pack several examples into each row of --max-len tokens")
    p.add_argument("--targets", default=None,
                   help="comma-separated module names for LoRA (default q,k,v,o,gate,up,down projections)")
    add_training_options(p, lora_r=8, lora_alpha=16, lora_dropout=0.05, lr=2e-4)
    p.set_defaults(func=_cmd_finetune)


def _cmd_finetune(args) -> int:
    from . import load_model, load_tokenizer
    from .finetune import finetune

    lora, train = training_settings(args, **({"targets": args.targets.split(",")} if args.targets else {}))
    model = load_model(args.model, dtype=args.dtype, device=args.device)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    result = finetune(model, tokenizer, args.data, args.out, lora=lora, train_settings=train, max_len=args.max_len,
                      batch_size=args.batch_size, pack=args.pack, eval_data=args.eval_data,
                      eval_fraction=0.0 if args.eval_data else args.eval_fraction, base_model=str(args.model),
                      resume=args.resume)
    print(result.data.summary(), file=sys.stderr)
    for problem in result.data.problems:
        print(f"  row {problem.row}: {problem.reason}", file=sys.stderr)
    if args.json:
        print(result.model_dump_json(indent=1))
    else:
        t = result.training
        first = f"{t.eval_losses[0][1]:.4f} -> {t.eval_losses[-1][1]:.4f}" if len(t.eval_losses) > 1 else "n/a"
        print(f"{t.steps} steps, loss {t.losses[0]:.4f} -> {t.losses[-1]:.4f}, eval loss {first}, "
              f"{t.tokens_per_s:.0f} tokens/s; adapter in {result.out_dir}")
    return 0
