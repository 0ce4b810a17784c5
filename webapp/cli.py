"""``gemma-ground serve``: the web app (page search + grounded statistics) on 127.0.0.1.

    gemma-ground serve [--index DIR] [--colpali SOURCE] [--llm SPEC] [--guard MODEL] [--store FILE] [--host H] [--port P]

Thin: parses arguments and calls :func:`webapp.serve`.
"""

from __future__ import annotations

import sys

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("serve", help="serve the web app: search pages and ask statistical questions (127.0.0.1)")
    p.add_argument("--index", default=None, help="a vision_rag index directory (gemma-ground index); without one "
                                                 "only the statistics page works")
    p.add_argument("--colpali", default=None, help="ColPali checkpoint for the index (default: the model recorded "
                                                   "in the index's embedder.json)")
    p.add_argument("--adapter", default=None, help="LoRA adapter directory for --colpali")
    p.add_argument("--llm", default=None, help="answering model: a checkpoint directory, .gguf file or preset "
                                               "(native Gemma), or gemini:<model id>; without one statistics are "
                                               "stated plainly")
    p.add_argument("--guard", default=None, metavar="MODEL",
                   help="safety guard (a ShieldGemma checkpoint directory or .gguf) screening questions and answers")
    p.add_argument("--guard-threshold", type=float, default=0.5, help="the guard flags at P(violation) >= this")
    p.add_argument("--store", default=None, help="statistics store file (default: the embedded Gapminder store)")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_cmd_serve)


def _cmd_serve(args) -> int:
    from pathlib import Path

    from .app import serve

    if args.store is not None and not Path(args.store).is_file():
        raise FileNotFoundError(f"{args.store}: no such statistics store file")
    embedder = None
    if args.colpali:
        from vision_rag.colpali import ColPaliEmbedder

        embedder = ColPaliEmbedder.load(args.colpali, adapter=args.adapter, device=args.device)
    llm = None
    if args.llm:
        from grounding.llm import load_llm

        llm = load_llm(args.llm, device=args.device)
    guard = None
    if args.guard:
        from models.guard import load_guard

        guard = load_guard(args.guard, device=args.device, threshold=args.guard_threshold)
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    serve(args.index, store=args.store, embedder=embedder, llm=llm, host=args.host, port=args.port, guard=guard)
    return 0
