"""``gemma-ground``: one console script; each package contributes its subcommands.

The CLI is a thin layer: it parses arguments and calls the packages' public functions. Packages
register subcommands through the ``gemma_ground.commands`` entry-point group (a function
``register(subparsers)`` that adds parsers whose ``func(args) -> int`` does the work), so ``models``
never imports the applications built on it.
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import entry_points

__all__ = ["main", "register", "build_parser"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gemma-ground",
        description="Gemma models grounded in facts: generation, document search, statistics Q&A.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for ep in sorted(entry_points(group="gemma_ground.commands"), key=lambda e: e.name != "models"):
        try:
            register_fn = ep.load()
        except ImportError as e:  # a package missing an optional dependency loses its commands only
            print(f"gemma-ground: commands of {ep.name!r} unavailable: {e}", file=sys.stderr)
            continue
        register_fn(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        return 130
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as e:
        print(f"gemma-ground {args.command}: error: {e}", file=sys.stderr)
        return 2


def register(sub) -> None:
    from .guard_cli import register as register_guard
    from .sae_cli import register as register_sae
    from .train_cli import register as register_training
    from .vlm_cli import register as register_vision_language

    _register_generate(sub)
    register_vision_language(sub)
    register_guard(sub)
    register_sae(sub)
    register_training(sub)


def _register_generate(sub) -> None:
    p = sub.add_parser("generate", help="generate text with a Gemma model (streams to stdout)")
    p.add_argument("prompt", help="the prompt text")
    p.add_argument("--model", required=True,
                   help="Hugging Face checkpoint directory, .gguf file, or preset name (random init)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source if not beside the model")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the Gemma chat template")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--stop", action="append", default=None, help="stop string (repeatable)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--quantize", choices=("int8", "int4"), default=None,
                   help="weight-only quantisation for faster CPU decoding (Gemma text models; README 'Decode')")
    p.add_argument("--compile", action="store_true",
                   help="compile the decode step with torch.compile (Gemma text models; the first step pays "
                        "the compilation, tens of seconds on CPU; needs a C++ compiler)")
    p.set_defaults(func=_cmd_generate)


def _cmd_generate(args) -> int:
    from . import generate, load_model, load_tokenizer

    model = load_model(args.model, dtype=args.dtype, device=args.device, quantize=args.quantize)
    if args.compile:
        if not hasattr(model, "compile_decode"):
            raise ValueError(f"--compile applies to Gemma text models, not {type(model).__name__}")
        model.compile_decode()
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    for piece in generate(model, tokenizer, args.prompt, chat=args.chat, max_new_tokens=args.max_new_tokens,
                          temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
                          stop=args.stop, stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
