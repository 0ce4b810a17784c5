"""``gemma-ground serve``: the web app (page search + grounded statistics) on 127.0.0.1.

    gemma-ground serve [--index DIR] [--colpali SOURCE] [--llm SPEC] [--guard MODEL] [--store FILE] [--host H]
                       [--port P] [--ray [ADDRESS] [--shards N]]

Thin: parses arguments and calls :func:`webapp.serve` (with ``--ray``, on a
:class:`vision_rag.ray_shards.RayShardedIndex`: each shard of ``--index`` held by a Ray actor).
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
    p.add_argument("--ray", nargs="?", const="local", default=None, metavar="ADDRESS",
                   help="hold each shard of --index in a Ray actor and fan searches out to them (no ADDRESS: a local "
                        "cluster; 'auto': the one `ray start` runs here; HOST:PORT or ray://HOST:10001)")
    p.add_argument("--shards", type=int, default=None,
                   help="the number of shards --index holds (checked; built by `gemma-ground index --shards N`)")
    p.add_argument("--shard-timeout", type=float, default=30.0,
                   help="seconds a search waits for each shard before answering without it (default 30)")
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
    index = None
    if args.ray is not None:
        if args.index is None:
            raise ValueError("--ray serves the shards of --index DIR; give the index directory")
        from vision_rag.distributed import connect
        from vision_rag.ray_shards import RayShardedIndex

        connect(args.ray)
        index = RayShardedIndex(args.index, shards=args.shards, timeout_s=args.shard_timeout)
        print(f"{index.n_shards} shard actors on Ray hold {args.index}", file=sys.stderr)
    elif args.shards is not None:
        raise ValueError("--shards needs --ray (without it a sharded --index is searched in this process)")
    print(f"serving on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    try:
        serve(args.index, store=args.store, embedder=embedder, llm=llm, index=index, host=args.host, port=args.port,
              guard=guard)
    finally:
        if index is not None:
            index.close()
    return 0
