"""``gemma-ground ask`` and ``gemma-ground serve-stats``: thin wrappers over :func:`grounding.ask` (with
``--guard``: :func:`models.load_guard`) and :func:`grounding.server.serve`."""

from __future__ import annotations

import sys

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("ask", help="answer a statistical question with grounded, cited numbers",
                       description="Exit status: 0 answered (or the source has no data for it), 1 every "
                                   "statistics lookup failed (the reasons are printed), 2 bad input or settings.")
    p.add_argument("question", help='e.g. "What was the life expectancy in Kenya in 2007?"')
    p.add_argument("--mode", choices=("rag", "rig"), default="rag",
                   help="rag: retrieve tables then answer (default); rig: ground each number the model writes")
    p.add_argument("--source", choices=("local", "nl", "rest"), default="local",
                   help="local: the embedded statistics store (default, offline); nl: the Data Commons NL "
                        "endpoint; rest: Data Commons REST v2 (nl/rest read DC_API_KEY)")
    p.add_argument("--base-url", default=None,
                   help="nl/rest: the server to ask instead of the public Data Commons (a self-hosted Data Commons, "
                        "or gemma-ground serve-stats: http://127.0.0.1:8080 for nl, .../v2 for rest)")
    p.add_argument("--model", default=None,
                   help="LLM: a checkpoint directory, .gguf file or preset name (native Gemma), or "
                        "gemini:<model id> (reads GEMINI_API_KEY). Without one the statistics are stated plainly")
    p.add_argument("--tokenizer", default=None, help="tokenizer source if not beside the model")
    p.add_argument("--interleaved", action="store_true",
                   help="rig: pause at each value, fetch it and let the model continue from the true value")
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the structured answer as JSON")
    p.add_argument("--guard", default=None, metavar="MODEL",
                   help="safety guard (a ShieldGemma checkpoint directory or .gguf): screens the question before "
                        "any lookup and the answer before it is shown; refusals say why (scores in --json)")
    p.add_argument("--guard-threshold", type=float, default=0.5,
                   help="the guard flags when P(violation) >= this for any policy (default 0.5)")
    p.add_argument("--guard-policy", action="append", default=None, metavar="NAME",
                   help="guard policy: dangerous, harassment, hate, sexual (repeatable; default: all four)")
    p.add_argument("--plot", metavar="PNG", default=None,
                   help="rag: also write the answer's tables as a chart to this PNG file (a series as a line, a "
                        "comparison or ranking as bars; needs matplotlib: pip install 'gemma-grounding[plot]')")
    p.set_defaults(func=_cmd_ask)

    s = sub.add_parser("serve-stats", help="serve the statistics store over HTTP (Data Commons NL/REST shapes)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--store", default=None, help="store file (default: the embedded store, Systema Globalis)")
    s.set_defaults(func=_cmd_serve_stats)


def _cmd_ask(args) -> int:
    from .answer import ask
    from .llm import load_llm
    from .sources import open_source
    from .types import GroundingError

    if args.base_url and args.source == "local":
        raise ValueError("--base-url is for --source nl or rest")
    if args.plot is not None:
        from pathlib import Path

        from .chart import require_matplotlib

        if args.mode != "rag":
            raise ValueError("--plot draws the answer's tables, which only --mode rag retrieves")
        if not Path(args.plot).resolve().parent.is_dir():
            raise FileNotFoundError(f"--plot {args.plot}: no such directory to write the chart into")
    try:
        if args.plot is not None:
            require_matplotlib()  # before any model loads
        guard = None
        if args.guard:
            from models.guard import load_guard

            guard = load_guard(args.guard, device=args.device, threshold=args.guard_threshold,
                               policies=args.guard_policy)
        llm = load_llm(args.model, tokenizer=args.tokenizer, device=args.device) if args.model else None
        source = open_source(args.source, base_url=args.base_url) if args.base_url else args.source
        answer = ask(args.question, mode=args.mode, source=source, llm=llm, interleaved=args.interleaved,
                     max_new_tokens=args.max_new_tokens, guard=guard)
    except GroundingError as e:
        print(f"gemma-ground ask: error: {e}", file=sys.stderr)
        return 2
    print(answer.model_dump_json(indent=2) if args.json else answer.render())
    if args.plot is not None:
        from .chart import save_chart_png

        if answer.charts:
            try:
                save_chart_png(answer.charts, args.plot)
            except GroundingError as e:
                print(f"gemma-ground ask: error: {e}", file=sys.stderr)
                return 2
            print(f"chart of {len(answer.charts)} table(s) written to {args.plot}", file=sys.stderr)
        else:
            print("gemma-ground ask: no chart written: the answer has no table with values to draw", file=sys.stderr)
    if answer.failed:  # printed above with the reasons; the exit status tells scripts
        first = next(iter(answer.errors.values()))
        print(f"gemma-ground ask: error: every statistics lookup failed ({len(answer.errors)}), e.g.: {first}",
              file=sys.stderr)
        return 1
    return 0


def _cmd_serve_stats(args) -> int:

    from .server import serve
    from .store import open_store
    from .types import GroundingError

    try:
        store = open_store(args.store) if args.store else None
    except GroundingError as exc:
        print(f"gemma-ground serve-stats: error: {exc}", file=sys.stderr)
        return 2
    print(f"serving statistics on http://{args.host}:{args.port} (Ctrl-C to stop)", file=sys.stderr)
    serve(store, host=args.host, port=args.port)
    return 0
