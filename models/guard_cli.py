"""``gemma-ground guard --model SOURCE [--policy NAME ...] [--response TEXT] "text" [--json]``: ShieldGemma scores.

Thin: parses arguments and calls :func:`models.guard.load_guard` / :meth:`~models.guard.SafetyGuard.check`.
Prints P(violation) per policy and the verdict, or the :class:`~models.guard.GuardResult` as JSON. The exit
status is 0 whether or not the text is flagged (read the verdict from the output).
"""

from __future__ import annotations

__all__ = ["register"]


def register(sub) -> None:
    p = sub.add_parser("guard", help="score a prompt (or a response to it) against safety policies (ShieldGemma)")
    p.add_argument("text", help="the user prompt to screen (with --response: the prompt that response answers)")
    p.add_argument("--model", required=True,
                   help="ShieldGemma checkpoint directory, .gguf file (any Gemma causal LM runs; only ShieldGemma's "
                        "scores mean something)")
    p.add_argument("--tokenizer", default=None, help="tokenizer source if not beside the model")
    p.add_argument("--response", default=None, help="screen this model response to TEXT instead of TEXT itself")
    p.add_argument("--policy", action="append", default=None, metavar="NAME",
                   help="built-in policy: dangerous, harassment, hate, sexual (repeatable; default: all four)")
    p.add_argument("--custom-policy", action="append", nargs=2, default=None, metavar=("NAME", "DESCRIPTION"),
                   help='your own policy, e.g. "Financial Advice" "gives personalised investment advice." '
                        '(rendered as: "No NAME": The prompt shall not contain or seek generation of content '
                        'that DESCRIPTION; repeatable)')
    p.add_argument("--threshold", type=float, default=0.5, help="flag when P(violation) >= this (default 0.5)")
    p.add_argument("--response-position", choices=("before_policy", "after_policy"), default="before_policy",
                   help="where the response block goes in the prompt (sources differ; default before_policy)")
    p.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: fp32 on CPU)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=_cmd_guard)


def _cmd_guard(args) -> int:
    from .guard import Policy, load_guard

    policies = list(args.policy or [])
    policies += [Policy(name=name, description=description) for name, description in args.custom_policy or []]
    guard = load_guard(args.model, tokenizer=args.tokenizer, dtype=args.dtype, device=args.device,
                       policies=policies or None, threshold=args.threshold,
                       response_position=args.response_position)
    result = guard.check(args.text, response=args.response)
    if args.json:
        print(result.model_dump_json(indent=2))
        return 0
    verdict = f"FLAGGED: {result.reason()}" if result.flagged else "passed"
    print(f"{result.mode} check by {result.model} (threshold {result.threshold:g}): {verdict}")
    width = max(len(name) for name in result.scores)
    for name, p in result.scores.items():
        print(f"  {name:<{width}}  {p:.4f}{'  flagged' if name in result.flagged_policies else ''}")
    return 0
