"""``gemma-ground features`` and ``gemma-ground train-sae``: thin layers over :mod:`models.sae_eval` and
:mod:`models.sae_train`.

    gemma-ground features --model SOURCE --sae DIR --site res --layer L "text" [--json] [-k 5]
    gemma-ground train-sae --model SOURCE --site res --layer L --width N --data TEXTFILE --out DIR
"""

from __future__ import annotations

import sys
from pathlib import Path

__all__ = ["register"]


def _model_args(p) -> None:
    p.add_argument("--model", required=True,
                   help="Hugging Face checkpoint directory, .gguf file, or preset name (random init)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source if not beside the model")
    p.add_argument("--site", required=True, choices=["res", "att", "mlp"],
                   help="res: residual stream after the block; att: attention output before o_proj; "
                        "mlp: MLP output after the post-feedforward norm")
    p.add_argument("--layer", required=True, type=int, help="decoder block (0-based)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU)")
    p.add_argument("--device", default="cpu")


def register(sub) -> None:
    p = sub.add_parser("features", help="top SAE features of each token of a text")
    _model_args(p)
    p.add_argument("--sae", required=True,
                   help="Gemma Scope params.npz, Gemma Scope 2 params.safetensors, or a SAELens directory")
    p.add_argument("-k", "--top-k", type=int, default=5, help="features shown per token (default 5)")
    p.add_argument("--json", action="store_true", help="print the readout as JSON")
    p.add_argument("text", help="the text to read")
    p.set_defaults(func=_cmd_features)

    p = sub.add_parser("train-sae", help="train a JumpReLU SAE (Gemma Scope's method) on a text file")
    _model_args(p)
    p.add_argument("--width", required=True, type=int, help="number of latents")
    p.add_argument("--data", required=True, help="UTF-8 text file (read a piece at a time)")
    p.add_argument("--out", required=True, help="output directory (SAELens format + training.json)")
    p.add_argument("--tokens", type=int, default=None, help="stop after this many training tokens (default: all)")
    p.add_argument("--context-len", type=int, default=1024, help="tokens per context, BOS included")
    p.add_argument("--batch-size", type=int, default=4096, help="tokens per training step")
    p.add_argument("--l0-coefficient", type=float, default=1e-3,
                   help="sparsity coefficient lambda (inputs scaled to unit mean squared norm)")
    p.add_argument("--lr", type=float, default=7e-5, help="Adam learning rate after warm-up")
    p.add_argument("--lr-warmup-steps", type=int, default=1000)
    p.add_argument("--sparsity-warmup-steps", type=int, default=10000)
    p.add_argument("--model-batch", type=int, default=4, help="contexts per model forward")
    p.add_argument("--buffer-tokens", type=int, default=1 << 18,
                   help="rows of the on-disk shuffling buffer (x width x 4 bytes on disk)")
    p.add_argument("--buffer-dir", default=None, help="where the buffer file goes (default: --out)")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=_cmd_train)


def _load(args):
    from .hooks import Site
    from .loading import load_model
    from .tokenizer import load_tokenizer

    model = load_model(args.model, dtype=args.dtype, device=args.device)
    return model, load_tokenizer(args.tokenizer or args.model), Site(args.site, args.layer)


def _cmd_features(args) -> int:
    from .sae import load_sae
    from .sae_eval import read_features

    model, tokenizer, site = _load(args)
    sae = load_sae(args.sae, device=args.device)
    readout = read_features(model, tokenizer, sae, site, args.text, k=args.top_k)
    if args.json:
        print(readout.model_dump_json(indent=2))
        return 0
    for t in readout.tokens:
        feats = "  ".join(f"{f.index}={f.value:.3g}" for f in t.features) or "(none active)"
        print(f"{t.position:>4}  {t.token!r:<16} {feats}")
    return 0


def _cmd_train(args) -> int:
    from tqdm import tqdm

    from .sae_train import TrainConfig, train_sae_on_text

    config = TrainConfig(width=args.width, l0_coefficient=args.l0_coefficient, lr=args.lr,
                         lr_warmup_steps=args.lr_warmup_steps, sparsity_warmup_steps=args.sparsity_warmup_steps,
                         batch_size=args.batch_size, seed=args.seed)
    config.validate()
    model, tokenizer, site = _load(args)
    total = None if args.tokens is None else args.tokens // args.batch_size
    bar = tqdm(total=total, unit="step", desc=f"train-sae {site}", file=sys.stderr)

    def progress(step, entry):
        bar.update(1)
        bar.set_postfix(L0=f"{entry.l0:.1f}", FVU=f"{entry.fvu:.3f}", refresh=False)
        if step % config.log_every == 0:
            bar.write(f"step {step}  tokens {entry.tokens}  L0 {entry.l0:.2f}  FVU {entry.fvu:.4f}  "
                      f"loss {entry.loss:.4f}", file=sys.stderr)

    try:
        report = train_sae_on_text(model, tokenizer, site, args.data, args.out, config, context_len=args.context_len,
                                   max_tokens=args.tokens, model_batch=args.model_batch,
                                   buffer_rows=args.buffer_tokens, buffer_dir=args.buffer_dir,
                                   metadata={"model_name": Path(args.model).name}, progress=progress)
    finally:
        bar.close()
    print(f"trained {report.steps} steps on {report.tokens} tokens: L0 {report.final_l0:.2f}, "
          f"FVU {report.final_fvu:.4f}, {report.dead_latents} dead latents; saved to {args.out}")
    return 0
