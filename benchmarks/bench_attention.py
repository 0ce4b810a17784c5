"""Speed of our Triton attention kernels on a CUDA GPU, in hardware units, beside baselines.

    python benchmarks/bench_attention.py                   # everything (about a minute on an H100)
    python benchmarks/bench_attention.py --seq-lens 1024 4096 --decode-contexts 4096
    python benchmarks/bench_attention.py --dry-run         # CPU, Triton interpreter, tiny shapes, fp32

``--dry-run`` checks that the script and the kernels run end to end without a GPU (the figures mean
nothing: interpreted kernels, and FlexAttention is skipped); ``benchmarks/device_all.sh --dry-run``
uses it.

Prefill (TFLOP/s): our kernel against FlexAttention (softcap as a score_mod, sliding window as a
block mask) on Gemma 2 shapes (head dim 256, softcap 50, window 4096, 16 query / 8 KV heads, bf16,
sequence 1k-16k), and against SDPA's flash backend on plain causal attention with head dim 128.
Targets: >= 1.0x FlexAttention on the Gemma 2 shapes, >= 0.8x SDPA flash on plain causal.

FLOPs are counted over the (query, key) pairs that are actually visible: two matmuls (Q K^T and
P V) of 2 * head_dim FLOPs per pair, so ``4 * batch * heads * head_dim * visible_pairs``; a causal
mask halves the pairs (L (L + 1) / 2) and a window of W keys leaves about L * W.

Decode (GB/s): the split-K kernel for one new token per row against a bf16 KV cache of 1k-32k
tokens, bytes = the K and V rows it must read (plus q and the output), against the GPU's memory
bandwidth (from its clock and bus width when torch reports them, and a measured device copy).
Target: > 70 % of bandwidth at long contexts.

Prefix-LM (TFLOP/s): PaliGemma 2's decoder (Gemma 2 2B: 8 query / 4 KV heads, head dim 256, softcap
50) with the first half of each sequence a bidirectional prefix (image tokens + prompt), against
FlexAttention with the same mask and softcap, and SDPA's memory-efficient backend with the mask as a
boolean tensor (SDPA has no softcap: it does less work).

Before timing, each kernel configuration is checked against the torch reference at a small size
(bf16 is verified here, on the GPU: the CPU interpreter's bf16 arithmetic is unreliable).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported (by kernels)
    os.environ.setdefault("TRITON_INTERPRET", "1")

from device_results import record  # noqa: E402

from gemma_kernels.attention import attention_prefill_triton, attention_reference  # noqa: E402
from gemma_kernels.decode import decode_attention_triton  # noqa: E402

DEVICE = "cuda"  # "cpu" in a dry run
DTYPE = torch.bfloat16  # float32 in a dry run (the interpreter's bf16 arithmetic is unreliable)


def visible_pairs(q_len: int, kv_len: int, causal: bool, window: int | None) -> int:
    """(query, key) pairs the mask leaves, queries being the last ``q_len`` positions of the keys."""
    total = 0
    for pos in range(kv_len - q_len, kv_len):
        hi = pos + 1 if causal else kv_len
        lo = max(0, pos - window + 1) if window is not None else 0
        total += max(0, hi - lo)
    return total


def prefill_flops(batch, heads, q_len, kv_len, head_dim, causal, window) -> float:
    return 4.0 * batch * heads * head_dim * visible_pairs(q_len, kv_len, causal, window)


def bench_ms(fn, *args, **kwargs) -> float:
    """Median milliseconds of ``fn(*args, **kwargs)`` (Triton's do_bench: warm-up, L2 flush; on the
    CPU of a dry run, one call: the interpreter's figures mean nothing, the run only has to work)."""
    if DEVICE == "cpu":
        start = time.perf_counter()
        fn(*args, **kwargs)
        return 1000 * (time.perf_counter() - start)
    from triton.testing import do_bench

    return do_bench(lambda: fn(*args, **kwargs), warmup=25, rep=100)


def check(name, out, ref, v) -> None:
    """Kernel against the reference at the benchmark's dtype. The kernel rounds the softmax weights
    and its output to the input dtype and the reference rounds its output: <= 3 u max|v|. In fp32 (the
    dry run) summation order and exp2 dominate: 2e-5, as in tests/kernels."""
    unit = {torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11}.get(v.dtype)
    limit = 3 * unit * float(v.float().abs().max()) if unit else 2e-5
    err = (out.float() - ref.float()).abs().max().item()
    status = "ok" if err <= limit else "MISMATCH"
    print(f"  check {name:<44} max|err| {err:.2e} (limit {limit:.1e}) {status}")
    if status != "ok":
        record("CHECK FAILED", name, err, "max|err|", target=f"<= {limit:.1e}")


# -- prefill ------------------------------------------------------------------------------------------

_flex_compiled = None


def flex_callable(mask_mod, softcap: float, seq: int, scale: float):
    """FlexAttention with ``mask_mod(b, h, q_idx, kv_idx)`` and a tanh softcap (compiled once), or None
    and the reason."""
    global _flex_compiled
    if DEVICE == "cpu":
        return None, "FlexAttention skipped in the CPU dry run"
    try:
        from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    except ImportError as exc:
        return None, f"FlexAttention unavailable ({exc})"

    def tanh_softcap(score, b, h, q_idx, kv_idx):
        return softcap * torch.tanh(score / softcap)

    if _flex_compiled is None:
        _flex_compiled = torch.compile(flex_attention, dynamic=False)
    block_mask = create_block_mask(mask_mod, None, None, seq, seq, device=DEVICE)

    def run(q, k, v):
        return _flex_compiled(q, k, v, score_mod=tanh_softcap, block_mask=block_mask, scale=scale,
                              enable_gqa=True)

    return run, None


def sliding_causal(window: int):
    """Causal attention over the last ``window`` keys, as a FlexAttention mask."""
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) & (q_idx - kv_idx < window)


def prefix_lm(prefix: int):
    """A prefix-LM mask: the first ``prefix`` tokens see each other, later ones what is before them."""
    return lambda b, h, q_idx, kv_idx: (q_idx >= kv_idx) | ((q_idx < prefix) & (kv_idx < prefix))


def bench_prefill_gemma2(seq_lens, batch_tokens, do_check: bool) -> None:
    heads, kv_heads, head_dim, window, softcap = 16, 8, 256, 4096, 50.0
    scale, dtype = 256 ** -0.5, DTYPE
    print(f"\nPrefill, Gemma 2 local layer: {heads} q / {kv_heads} kv heads, head dim {head_dim}, softcap "
          f"{softcap:g}, window {window}, causal, {str(dtype)[6:]}")
    print(f"  {'seq':>6} {'batch':>5} {'ours TFLOP/s':>13} {'flex TFLOP/s':>13} {'ours/flex':>9}")
    for seq in seq_lens:
        batch = max(1, batch_tokens // seq)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q = torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=gen)
        k = torch.randn(batch, kv_heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=gen)
        v = torch.randn(batch, kv_heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=gen)
        kwargs = dict(scale=scale, causal=True, window=window, softcap=softcap)
        if do_check and seq <= 2048:
            check(f"gemma2 seq {seq}", attention_prefill_triton(q[:1], k[:1], v[:1], **kwargs),
                  attention_reference(q[:1], k[:1], v[:1], **kwargs), v)
        flops = prefill_flops(batch, heads, seq, seq, head_dim, True, window)
        ours = flops / bench_ms(attention_prefill_triton, q, k, v, **kwargs) / 1e9
        flex, why = flex_callable(sliding_causal(window), softcap, seq, scale)
        flex_tflops = None
        if flex is not None:
            try:
                flex_tflops = flops / bench_ms(flex, q, k, v) / 1e9
            except Exception as exc:  # report, keep benchmarking our kernel
                why = f"FlexAttention failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        ratio = f"{ours / flex_tflops:9.2f}" if flex_tflops else f"{'-':>9}"
        flex_text = f"{flex_tflops:13.1f}" if flex_tflops else f"{'-':>13}"
        print(f"  {seq:>6} {batch:>5} {ours:13.1f} {flex_text} {ratio}" + (f"   ({why})" if why else ""))
        record("prefill Gemma 2 softcap+window hd256", f"seq {seq} x {batch}", ours, "TFLOP/s", baseline=flex_tflops,
               baseline_name="FlexAttention", target=">= 1.0x", note=why or "")
    print("  target: ours/flex >= 1.00")


def sdpa_flash_causal(q, k, v):
    if DEVICE == "cpu":  # no flash backend on the CPU: the dry run times the default one
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def bench_prefill_causal_128(seq_lens, batch_tokens, do_check: bool) -> None:
    heads, head_dim, dtype = 16, 128, DTYPE
    print(f"\nPrefill, plain causal: {heads} heads (MHA), head dim {head_dim}, {str(dtype)[6:]}")
    print(f"  {'seq':>6} {'batch':>5} {'ours TFLOP/s':>13} {'SDPA flash':>13} {'ours/SDPA':>9}")
    for seq in seq_lens:
        batch = max(1, batch_tokens // seq)
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q, k, v = (torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=gen)
                   for _ in range(3))
        if do_check and seq <= 2048:
            check(f"causal d128 seq {seq}", attention_prefill_triton(q[:1], k[:1], v[:1]),
                  attention_reference(q[:1], k[:1], v[:1]), v)
        flops = prefill_flops(batch, heads, seq, seq, head_dim, True, None)
        ours = flops / bench_ms(attention_prefill_triton, q, k, v, causal=True) / 1e9
        try:
            base = flops / bench_ms(sdpa_flash_causal, q, k, v) / 1e9
            print(f"  {seq:>6} {batch:>5} {ours:13.1f} {base:13.1f} {ours / base:9.2f}")
            record("prefill causal hd128", f"seq {seq} x {batch}", ours, "TFLOP/s", baseline=base,
                   baseline_name="SDPA flash", target=">= 0.8x")
        except RuntimeError as exc:
            print(f"  {seq:>6} {batch:>5} {ours:13.1f} {'-':>13} {'-':>9}   (SDPA flash failed: {exc})")
            record("prefill causal hd128", f"seq {seq} x {batch}", ours, "TFLOP/s", target=">= 0.8x",
                   note=f"SDPA flash failed: {str(exc).splitlines()[0][:60]}")
    print("  target: ours/SDPA >= 0.80")


def prefix_visible_pairs(seq: int, prefix: int) -> int:
    """Pairs a prefix-LM mask leaves: the prefix sees itself whole, later tokens see what is before them."""
    return prefix * prefix + sum(p + 1 for p in range(prefix, seq))


def bench_prefill_prefix_lm(seq_lens, batch_tokens, do_check: bool) -> None:
    heads, kv_heads, head_dim, softcap = 8, 4, 256, 50.0
    scale, dtype = 256 ** -0.5, DTYPE
    print(f"\nPrefill, prefix-LM (PaliGemma 2 decoder): {heads} q / {kv_heads} kv heads, head dim {head_dim}, "
          f"softcap {softcap:g}, prefix = first half, {str(dtype)[6:]}")
    print(f"  {'seq':>6} {'batch':>5} {'ours TFLOP/s':>13} {'flex TFLOP/s':>13} {'ours/flex':>9} {'SDPA mask':>10}")
    for seq in seq_lens:
        batch, prefix = max(1, batch_tokens // seq), seq // 2
        gen = torch.Generator(device=DEVICE).manual_seed(0)
        q = torch.randn(batch, heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=gen)
        k = torch.randn(batch, kv_heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=gen)
        v = torch.randn(batch, kv_heads, seq, head_dim, device=DEVICE, dtype=dtype, generator=gen)
        prefix_lens = torch.full((batch,), prefix, device=DEVICE, dtype=torch.int32)
        kwargs = dict(scale=scale, causal=True, softcap=softcap, prefix_lens=prefix_lens)
        if do_check and seq <= 2048:
            one = dict(kwargs, prefix_lens=prefix_lens[:1])
            check(f"prefix-LM seq {seq}", attention_prefill_triton(q[:1], k[:1], v[:1], **one),
                  attention_reference(q[:1], k[:1], v[:1], **one), v)
        flops = 4.0 * batch * heads * head_dim * prefix_visible_pairs(seq, prefix)
        ours = flops / bench_ms(attention_prefill_triton, q, k, v, **kwargs) / 1e9
        flex, why = flex_callable(prefix_lm(prefix), softcap, seq, scale)
        flex_tflops = None
        if flex is not None:
            try:
                flex_tflops = flops / bench_ms(flex, q, k, v) / 1e9
            except Exception as exc:  # report, keep benchmarking our kernel
                why = f"FlexAttention failed: {type(exc).__name__}: {str(exc).splitlines()[0][:80]}"
        positions = torch.arange(seq, device=DEVICE)
        allowed = (positions[:, None] >= positions[None, :]) | ((positions[:, None] < prefix) & (positions[None, :] < prefix))
        k_rep, v_rep = k.repeat_interleave(heads // kv_heads, 1), v.repeat_interleave(heads // kv_heads, 1)
        try:
            sdpa = flops / bench_ms(F.scaled_dot_product_attention, q, k_rep, v_rep, attn_mask=allowed, scale=scale) / 1e9
        except RuntimeError as exc:
            sdpa, why = None, (why + "; " if why else "") + f"SDPA failed: {str(exc).splitlines()[0][:60]}"
        flex_text = f"{flex_tflops:13.1f}" if flex_tflops else f"{'-':>13}"
        ratio = f"{ours / flex_tflops:9.2f}" if flex_tflops else f"{'-':>9}"
        sdpa_text = f"{sdpa:10.1f}" if sdpa else f"{'-':>10}"
        print(f"  {seq:>6} {batch:>5} {ours:13.1f} {flex_text} {ratio} {sdpa_text}" + (f"   ({why})" if why else ""))
        record("prefill prefix-LM hd256 softcap", f"seq {seq} x {batch}", ours, "TFLOP/s", baseline=flex_tflops,
               baseline_name="FlexAttention", target=">= 1.0x",
               note=(f"SDPA+mask (no softcap) {sdpa:.1f} TFLOP/s; " if sdpa else "") + (why or ""))
    print("  target: ours/flex >= 1.00")


# -- decode -------------------------------------------------------------------------------------------

def peak_bandwidth_gbs() -> float | None:
    """Theoretical DRAM bandwidth from the reported memory clock (kHz) and bus width (bits), if any."""
    if DEVICE == "cpu":
        return None
    props = torch.cuda.get_device_properties(0)
    clock_khz = getattr(props, "memory_clock_rate", None)
    bus_bits = getattr(props, "memory_bus_width", None)
    if not clock_khz or not bus_bits:
        return None
    return 2 * clock_khz * 1e3 * bus_bits / 8 / 1e9  # double data rate


def measured_copy_gbs() -> float:
    """Bandwidth of a large device-to-device copy (read + write), the practical ceiling."""
    src = torch.empty(1 << 30 if DEVICE == "cuda" else 1 << 24, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    return 2 * src.numel() / bench_ms(dst.copy_, src) / 1e6


def bench_decode(contexts, batch: int, do_check: bool) -> None:
    heads, kv_heads, head_dim, dtype = 16, 8, 256, DTYPE
    peak, copy = peak_bandwidth_gbs(), measured_copy_gbs()
    peak_text = f"{peak:.0f} GB/s theoretical, " if peak else ""
    print(f"\nDecode (split-K): batch {batch}, {heads} q / {kv_heads} kv heads, head dim {head_dim}, "
          f"{str(dtype)[6:]} cache; memory: {peak_text}{copy:.0f} GB/s measured copy")
    print(f"  {'context':>7} {'window':>6} {'us':>8} {'GB/s':>8} {'% peak':>7} {'% copy':>7}")
    elem = torch.finfo(dtype).bits // 8
    for context in contexts:
        for window in (None, 4096):
            gen = torch.Generator(device=DEVICE).manual_seed(0)
            q = torch.randn(batch, heads, 1, head_dim, device=DEVICE, dtype=dtype, generator=gen)
            k = torch.randn(batch, kv_heads, context, head_dim, device=DEVICE, dtype=dtype, generator=gen)
            v = torch.randn(batch, kv_heads, context, head_dim, device=DEVICE, dtype=dtype, generator=gen)
            kwargs = dict(scale=256 ** -0.5, softcap=50.0, window=window, q_offset=context - 1)
            if do_check and context <= 8192:
                check(f"decode ctx {context} window {window}", decode_attention_triton(q, k, v, **kwargs),
                      attention_reference(q, k, v, **kwargs), v)
            keys = min(context, window) if window else context
            bytes_moved = (2 * batch * kv_heads * keys * head_dim + 2 * batch * heads * head_dim) * elem
            ms = bench_ms(decode_attention_triton, q, k, v, **kwargs)
            gbs = bytes_moved / ms / 1e6
            peak_pct = f"{100 * gbs / peak:6.1f}%" if peak else f"{'-':>7}"
            print(f"  {context:>7} {str(window):>6} {ms * 1e3:8.1f} {gbs:8.0f} {peak_pct} {100 * gbs / copy:6.1f}%")
            record("decode split-K hd256", f"ctx {context} window {window} batch {batch}", gbs, "GB/s",
                   baseline=peak or copy, baseline_name="theoretical peak" if peak else "measured copy",
                   target="> 0.70x at 16k+", note=f"measured copy {copy:.0f} GB/s")
    print("  target: > 70% of memory bandwidth at long contexts (window None, 16k+)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--batch-tokens", type=int, default=16384, help="batch = batch_tokens // seq")
    parser.add_argument("--decode-contexts", type=int, nargs="+", default=[1024, 4096, 16384, 32768])
    parser.add_argument("--decode-batch", type=int, default=4)
    parser.add_argument("--prefix-seq-lens", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--no-check", action="store_true", help="skip the checks against the reference")
    parser.add_argument("--dry-run", action="store_true",
                        help="CPU + Triton interpreter, fp32, tiny shapes: checks the script runs, measures nothing")
    args = parser.parse_args(argv)
    global DEVICE, DTYPE
    if args.dry_run:
        DEVICE, DTYPE = "cpu", torch.float32
        print("dry run: CPU, Triton interpreter, fp32, tiny shapes (the figures are not measurements)")
        do_check = not args.no_check
        bench_prefill_gemma2([64], 64, do_check)
        bench_prefill_causal_128([64], 64, do_check)
        bench_prefill_prefix_lm([64], 64, do_check)
        bench_decode([128], 1, do_check)
        return 0
    if not torch.cuda.is_available():
        print("bench_attention.py needs a CUDA GPU (the kernels are compiled by Triton for it); none is "
              "visible here. Correctness is tested on the CPU by tests/kernels under TRITON_INTERPRET=1.",
              file=sys.stderr)
        return 2
    import triton

    print(f"GPU: {torch.cuda.get_device_name(0)}; torch {torch.__version__}, triton {triton.__version__}")
    do_check = not args.no_check
    bench_prefill_gemma2(args.seq_lens, args.batch_tokens, do_check)
    bench_prefill_causal_128(args.seq_lens, args.batch_tokens, do_check)
    bench_prefill_prefix_lm(args.prefix_seq_lens, args.batch_tokens, do_check)
    bench_decode(args.decode_contexts, args.decode_batch, do_check)
    return 0


if __name__ == "__main__":
    sys.exit(main())
