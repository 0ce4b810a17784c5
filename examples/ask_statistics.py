"""Ask statistical questions, answered from the embedded Gapminder store — offline, in seconds.

    .venv/bin/python examples/ask_statistics.py
    .venv/bin/python examples/ask_statistics.py --model path/to/gemma-3-1b-it      # or a .gguf, or gemini:<id>
    .venv/bin/python examples/ask_statistics.py --model gemma-3-270m --tokenizer model.gguf   # random preset

1. RAG and RIG over the embedded store (no model: the retrieved statistics are stated plainly).
2. The same questions through a Data Commons NL client pointed at our own statistics server on
   127.0.0.1, the way DataGemma's client talks to Data Commons.
3. RIG grounding of text written in the DataGemma RIG model's annotation format: every number is
   checked against the store, with footnotes and a * where the model was more than 5% off.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grounding import ask, ground_text, load_llm, open_source  # noqa: E402
from grounding.server import start_server  # noqa: E402

QUESTIONS = [
    ("What was the life expectancy in Kenya in 2007?", "rig"),
    ("How many people lived in Brazil in 1952?", "rig"),
    ("Which country in Asia had the highest GDP per capita in 2007?", "rig"),
    ("How has life expectancy changed in Japan?", "rag"),
    ("What was the population of Russia in 2007?", "rag"),  # not in the data set: says so
]

# What the DataGemma RIG model writes (illustrative text, not the output of a model run here).
RIG_MODEL_TEXT = (
    'Kenya\'s life expectancy was [__DC__("what was the life expectancy in Kenya in 2007?") --> "57 years"] '
    'in 2007, with a population of [__DC__("population of Kenya in 2007") --> "35.6 million"] and a GDP per '
    'capita of [__DC__("GDP per capita of Kenya in 2007") --> "$1,500"].')


def banner(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=None, help="native Gemma source or gemini:<model id> (optional)")
    parser.add_argument("--tokenizer", default=None, help="tokenizer source when the model has none (presets)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    args = parser.parse_args()
    llm = load_llm(args.model, tokenizer=args.tokenizer) if args.model else None
    settings = {"llm": llm, "max_new_tokens": args.max_new_tokens}

    local = open_source("local")
    banner("embedded store")
    for question, mode in QUESTIONS:
        print(f"\nQ ({mode}): {question}")
        answer = ask(question, mode=mode, source=local, **settings)
        print(answer.render() if mode == "rig" else answer.text)

    banner("Data Commons NL client -> our statistics server on 127.0.0.1")
    with start_server() as server:
        remote = open_source("nl", base_url=server.url)
        for question, mode in QUESTIONS[:2]:
            print(f"\nQ ({mode}) via {server.url}/nodejs/query: {question}")
            print(ask(question, mode=mode, source=remote, **settings).render())

    banner("RIG: grounding a model's annotated text")
    print(RIG_MODEL_TEXT, "\n")
    result = ground_text(RIG_MODEL_TEXT, local)
    print(result.text)
    print("\n".join(result.footnotes))
    for claim in result.claims:
        print(f"  claim #{claim.id}: model {claim.model_value!r} vs source {claim.dc_value} "
              f"({claim.date}) -> {'differs by more than 5%' if claim.differs else 'agrees'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
