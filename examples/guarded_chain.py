"""A safety guard (ShieldGemma) in front of LangChain chains: a statistics retriever and a chat model.

    .venv/bin/python examples/guarded_chain.py                       # tiny random guard and chat model
    .venv/bin/python examples/guarded_chain.py --guard path/to/shieldgemma-2b \\
        --chat-model path/to/gemma-2-2b-it "How do I pick a lock?"

1. ``safety_guard(guard) | retriever``: the question passes through unchanged, or a flagged one raises
   ``GuardRefusal`` before any lookup.
2. ``guarded(prompt | chat_model, guard)``: the question and then the model's reply (as the response to
   it) are screened; a flagged one comes back as a ``Refusal`` (its text and per-policy scores) and a
   flagged question never reaches the model.

Without ``--guard`` a tiny *random* Gemma 2 plays the guard: its scores are noise, so the threshold
decides (``--threshold 0`` flags everything, ``--threshold 1`` nothing).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import sample_data  # noqa: E402
from langchain_core.prompts import ChatPromptTemplate  # noqa: E402

from grounding.langchain import (  # noqa: E402
    ChatGemma,
    GuardRefusal,
    Refusal,
    StatisticsRetriever,
    guarded,
    safety_guard,
)
from grounding.sources import open_source  # noqa: E402
from models import load_guard  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("question", nargs="?", default="What was the life expectancy in Kenya in 2007?")
    parser.add_argument("--guard", help="ShieldGemma checkpoint directory or .gguf (default: tiny random)")
    parser.add_argument("--chat-model", help="Gemma checkpoint directory, .gguf file or preset (default: tiny random)")
    parser.add_argument("--threshold", type=float, default=0.5, help="flag when P(violation) >= this")
    parser.add_argument("--max-tokens", type=int, default=24)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="guarded-chain-"))
    guard = load_guard(args.guard or sample_data.write_tiny_shieldgemma(work / "tiny-shieldgemma"),
                       threshold=args.threshold)
    chat_model = ChatGemma(checkpoint=str(args.chat_model or sample_data.write_tiny_gemma(work / "tiny-gemma")),
                           max_tokens=args.max_tokens)
    verdict = guard.check(args.question)
    print(f"question: {args.question}")
    print("guard: " + ", ".join(f"{name} {p:.3f}" for name, p in verdict.scores.items())
          + f" (threshold {guard.threshold:g}: {'flagged' if verdict.flagged else 'passed'})")

    # 1. In front of a retriever: raise before any lookup.
    retriever = StatisticsRetriever(source=open_source("local"), k=2)
    try:
        for doc in (safety_guard(guard) | retriever).invoke(args.question):
            print(f"1. guard | retriever: retrieved {doc.metadata['title']!r} ({doc.metadata['source']})")
    except GuardRefusal as refusal:
        print(f"1. guard | retriever: refused: {refusal}")

    # 2. A chat model behind the guard: the question and the reply are screened, refusals returned.
    prompt = ChatPromptTemplate.from_messages([("human", "Answer briefly: {question}")])
    reply = guarded(prompt | chat_model, guard).invoke({"question": args.question})
    if isinstance(reply, Refusal):
        print(f"2. guarded(prompt | chat model): refused ({reply.result.mode}): {reply.text}")
    else:
        print(f"2. guarded(prompt | chat model): answer: {reply.content!r}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
