"""RecurrentGemma against a Gemma of the same size and against transformers' RecurrentGemma, by context.

    python benchmarks/bench_recurrent.py                          # contexts 512, 2k, 8k, 32k (long: minutes)
    python benchmarks/bench_recurrent.py --contexts 512 2048      # a quicker run
    python benchmarks/bench_recurrent.py --scan-only              # the RG-LRU scan alone
    python benchmarks/bench_recurrent.py --decode-only --cpu-time --threads 1   # steadier on a shared machine

Models (random weights, fp32, vocabulary 32000, width 768, 12 layers, MLP 2304): our RecurrentGemma
(recurrent, recurrent, attention; window 2048; 108M parameters), our Gemma 3-style decoder (five local
layers of window 512 per global layer, 4 heads x 256, 1 KV head; 112M), and transformers'
RecurrentGemmaForCausalLM holding our RecurrentGemma's weights (its default attention, logits of the
last position only, as in generation).

For each context C: prefill tokens/s (C tokens into a fresh state, the last position's logits), decode
tokens/s (greedy steps after C tokens) and the bytes of the state (ours) or KV cache (Gemma) at C.
Decode starts from a state / KV cache filled with random contents as if C tokens had been read (a
step does the same work whatever they hold), and runs in ``--decode-rounds`` interleaved rounds over
the contexts, reported as the median (with our spread), so that load drifting on a shared machine
does not pass for a trend. transformers' decode is its ``generate`` minus its prefill, after a real
prefill. Gemma prefills up to ``--gemma-max-prefill`` tokens (its attention is O(C^2) on the CPU) and
transformers runs up to ``--hf-max-context`` (its windowed attention still builds a C x C mask).
Targets (issue #10): prefill >= 5x transformers' at 8k tokens; our decode tokens/s within 10% from
2k to 32k while Gemma's falls; our state bytes flat.

The scan part times the RG-LRU recurrence alone: on the CPU the chunked torch path against one step per
token (the reference); on a GPU (only when CUDA is present) the Triton kernel's GB/s against a
device-to-device copy of the same bytes (target >= 60%).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

WIDTH, LAYERS, VOCAB = 768, 12, 32000
clock = time.perf_counter  # --cpu-time: time.process_time


def _timed(fn, repeats: int = 1) -> float:
    times = []
    for _ in range(repeats):
        start = clock()
        fn()
        times.append(clock() - start)
    return statistics.median(times)


def build_models(with_hf: bool):
    from models.config import GemmaConfig
    from models.loading import build_random
    from models.recurrent_gemma import RecurrentGemmaConfig

    recurrent = build_random(RecurrentGemmaConfig(
        vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=2 * 3 * WIDTH, num_hidden_layers=LAYERS,
        num_attention_heads=12, lru_width=WIDTH, attention_window_size=2048, max_position_embeddings=1 << 17))
    gemma = build_random(GemmaConfig(
        architecture="gemma3", vocab_size=VOCAB, hidden_size=WIDTH, intermediate_size=3 * WIDTH,
        num_hidden_layers=LAYERS, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
        query_pre_attn_scalar=256, sliding_window=512, max_position_embeddings=1 << 17))
    hf = None
    if with_hf:
        import transformers

        hf = transformers.RecurrentGemmaForCausalLM(transformers.RecurrentGemmaConfig(**recurrent.config.to_hf()))
        hf.load_state_dict(recurrent.state_dict(), strict=False)
        hf.tie_weights()
        hf = hf.eval().float()
        hf.generation_config.eos_token_id = None
        ids = torch.randint(3, VOCAB, (1, 64))
        with torch.inference_mode():  # the same weights: the same logits
            gap = (hf(ids).logits - recurrent(ids)).abs().max().item()
        assert gap < 1e-3, f"transformers and ours disagree by {gap}"
    return recurrent, gemma, hf


def params(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


@torch.inference_mode()
def prefill_seconds(model, ids) -> float:
    """One prefill of ``ids`` into a fresh state / cache, the last position's logits included."""
    model.setup_cache(1, ids.shape[1] + 1)
    return _timed(lambda: model.logits(model.hidden_states(ids, input_pos=0)[:, -1:]))


@torch.inference_mode()
def as_if_read(model, context: int, steps: int) -> None:
    """The state (ours) or KV cache (Gemma) as after ``context`` tokens, with random contents: a decode
    step does the same work whatever the keys, values and recurrent states hold."""
    from models.recurrent_gemma import RecurrentGemmaLM

    if isinstance(model, RecurrentGemmaLM):
        model.setup_cache(1)
        for tensors in model.state.layers:
            for t in tensors:
                t.normal_()
        model.state.seen[:] = context
    else:
        model.setup_cache(1, context + steps)
        for layer in model.model.layers:
            layer.self_attn.cache.k.normal_()
            layer.self_attn.cache.v.normal_()


@torch.inference_mode()
def decode_seconds(model, context: int, steps: int) -> float:
    """Seconds per greedy decode step after ``context`` tokens."""
    as_if_read(model, context, steps)
    token = torch.tensor([[5]])
    start = clock()
    for step in range(steps):
        token = model(token, input_pos=context + step).argmax(-1)
    return (clock() - start) / steps


@torch.inference_mode()
def hf_run(model, ids, steps: int) -> tuple[float, float]:
    """(prefill seconds, seconds per decode step) of transformers' RecurrentGemma: its generate, minus
    the prefill measured on its own."""
    prefill_s = _timed(lambda: model(ids, use_cache=True, logits_to_keep=1))
    total = _timed(lambda: model.generate(ids, max_new_tokens=steps + 1, do_sample=False, pad_token_id=0))
    return prefill_s, max(total - prefill_s, 0.0) / steps


def model_benchmark(args) -> None:
    torch.manual_seed(0)
    recurrent, gemma, hf = build_models(with_hf=not args.no_hf and not args.decode_only)
    print(f"RecurrentGemma {params(recurrent):.1f}M parameters, Gemma {params(gemma):.1f}M")
    warm = torch.randint(3, VOCAB, (1, 64))
    for model in (recurrent, gemma):
        prefill_seconds(model, warm)
        decode_seconds(model, 64, 4)
    rows = {c: dict(context=c) for c in args.contexts}
    for context in [] if args.decode_only else args.contexts:
        ids = torch.randint(3, VOCAB, (1, context), generator=torch.Generator().manual_seed(context))
        row = rows[context]
        row["ours"] = prefill_seconds(recurrent, ids)
        row["gemma"] = prefill_seconds(gemma, ids) if context <= args.gemma_max_prefill else None
        if hf is not None and context <= args.hf_max_context:
            row["hf"], row["hf_step"] = hf_run(hf, ids, args.steps)
        print(f"prefill {context:6d}: ours {context / row['ours']:8.1f} tok/s, gemma {_rate(context, row['gemma'])}, "
              f"transformers {_rate(context, row.get('hf'))}", flush=True)
    # Decode in interleaved rounds (median per context), so that load on a shared machine drifting
    # over minutes does not pass for a trend over contexts.
    times = {(name, c): [] for name in ("ours", "gemma") for c in args.contexts}
    for _ in range(args.decode_rounds):
        for context in args.contexts:
            times["ours", context].append(decode_seconds(recurrent, context, args.steps))
            times["gemma", context].append(decode_seconds(gemma, context, args.steps))
    c = gemma.config
    for context in args.contexts:
        row = rows[context]
        row["ours_step"] = statistics.median(times["ours", context])
        row["gemma_step"] = statistics.median(times["gemma", context])
        spread = max(times["ours", context]) / min(times["ours", context]) - 1
        row["spread"] = f"{spread:.0%}"
        as_if_read(recurrent, context, 1)
        row["state"] = recurrent.state.nbytes()
        row["kv"] = c.num_hidden_layers * 2 * c.num_key_value_heads * context * c.head_dim * 4
    print_table(list(rows.values()))


def _rate(tokens, seconds):
    return f"{tokens / seconds:9.1f}" if seconds else "        -"


def print_table(rows) -> None:
    print(f"{'context':>8} | {'prefill tok/s: ours':>19} {'gemma':>9} {'hf':>9} {'speedup':>8} | "
          f"{'decode tok/s: ours':>18} {'(spread)':>8} {'gemma':>9} {'hf':>9} | {'state MB':>8} {'gemma KV MB':>11}")
    for r in rows:
        ours, hf = r.get("ours"), r.get("hf")
        ratio = f"{hf / ours:7.2f}x" if hf and ours else "       -"
        print(f"{r['context']:>8} | {_rate(r['context'], ours):>19} {_rate(r['context'], r.get('gemma'))} "
              f"{_rate(r['context'], hf)} {ratio} | {_rate(1, r['ours_step']):>18} {r['spread']:>8} "
              f"{_rate(1, r['gemma_step'])} {_rate(1, r.get('hf_step'))} | {r['state'] / 2**20:8.2f} "
              f"{r['kv'] / 2**20:11.1f}", flush=True)


def scan_benchmark(args) -> None:
    from gemma_kernels.rglru import rglru_scan_chunked, rglru_scan_reference

    print("RG-LRU scan on the CPU (batch 1, fp32): one step per token vs the chunked path")
    for width in (768, 2560):
        for seq in (2048, 8192, 32768):
            a, x = torch.rand(1, seq, width), torch.randn(1, seq, width)
            step = _timed(lambda a=a, x=x: rglru_scan_reference(a, x), args.repeats)
            chunked = _timed(lambda a=a, x=x: rglru_scan_chunked(a, x), args.repeats)
            print(f"  width {width:5d} seq {seq:6d}: per-step {step * 1e3:8.1f} ms  chunked {chunked * 1e3:8.1f} ms "
                  f"({step / chunked:5.1f}x)", flush=True)
    if not torch.cuda.is_available():
        print("no CUDA device: the Triton kernel's GB/s is not measured here")
        return
    from gemma_kernels.rglru import rglru_scan_triton

    batch, seq, width = 8, 8192, 2560
    a = torch.rand(batch, seq, width, device="cuda", dtype=torch.bfloat16)
    x = torch.randn(batch, seq, width, device="cuda", dtype=torch.bfloat16)
    moved = 3 * a.numel() * a.element_size()  # read a and x, write y
    src = torch.empty(moved // 2, dtype=torch.bfloat16, device="cuda")
    dst = torch.empty_like(src)

    def cuda_time(fn) -> float:
        fn()
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(args.repeats * 5):
            fn()
        torch.cuda.synchronize()
        return (time.perf_counter() - start) / (args.repeats * 5)

    copy_gbs = 2 * src.numel() * src.element_size() / cuda_time(lambda: dst.copy_(src)) / 1e9
    scan_gbs = moved / cuda_time(lambda: rglru_scan_triton(a, x)) / 1e9
    torch_gbs = moved / cuda_time(lambda: rglru_scan_chunked(a, x)) / 1e9
    print(f"GPU {torch.cuda.get_device_name()}: bf16 ({batch}, {seq}, {width}): Triton scan {scan_gbs:.0f} GB/s, "
          f"chunked torch {torch_gbs:.0f} GB/s, copy {copy_gbs:.0f} GB/s; scan / copy = {scan_gbs / copy_gbs:.0%}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[512, 2048, 8192, 32768])
    parser.add_argument("--steps", type=int, default=16, help="decode steps timed per context and round")
    parser.add_argument("--decode-rounds", type=int, default=3, help="interleaved rounds of decode timings")
    parser.add_argument("--decode-only", action="store_true", help="skip the prefills (and transformers)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the scan timings (median)")
    parser.add_argument("--gemma-max-prefill", type=int, default=8192)
    parser.add_argument("--hf-max-context", type=int, default=8192)
    parser.add_argument("--no-hf", action="store_true", help="skip transformers")
    parser.add_argument("--scan-only", action="store_true")
    parser.add_argument("--no-scan", action="store_true")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cpu-time", action="store_true",
                        help="time with this process's CPU seconds (all threads) instead of wall time: steadier "
                             "when other work shares the machine")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.cpu_time:
        global clock
        clock = time.process_time
    print(f"timing: {'CPU' if args.cpu_time else 'wall'} seconds, {torch.get_num_threads()} threads")
    if not args.no_scan:
        scan_benchmark(args)
    if not args.scan_only:
        model_benchmark(args)


if __name__ == "__main__":
    main()
