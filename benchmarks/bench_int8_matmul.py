"""Weight-only int8 (what ``quantize="int8"`` uses) against int8 x int8 matmuls, at decode shapes.

    python benchmarks/bench_int8_matmul.py [--threads 1] [--rounds 5]

One decode step of Gemma 3 270M multiplies a single activation row by ~100 MB of int8 projection
weights (18 blocks: fused Q/K/V, O, fused gate/up, down). This streams weights of that size and shape
(random values; the speed of these kernels does not depend on them) through:

- ``torch.ops.aten._weight_int8pack_mm``: bf16 activations, int8 weights, per-row scales (the shipped
  int8 mode; exact up to bf16 rounding of the activations);
- ``torch._int_mm``: the activation row quantised to int8 (one scale per row, as llama.cpp's Q8
  activations) and int32 accumulation (oneDNN; AVX-512 VNNI on this CPU), then both scales applied.
  This changes the numerics (the activations lose bits), so it is measured, not shipped.

Prints ms per step and GB/s of weights for each, interleaved rounds, and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

HIDDEN, HEADS_DIM, INTER, BLOCKS = 640, 1024 + 256 + 256, 2048, 18
SHAPES = [(HIDDEN, HEADS_DIM), (1024, HIDDEN), (HIDDEN, 2 * INTER), (INTER, HIDDEN)]  # (in, out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=20, help="decode steps per round")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    layers = []
    for _ in range(BLOCKS):
        for k, n in SHAPES:
            w = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
            layers.append((w, w.t(), torch.rand(n, generator=gen).to(torch.bfloat16) / 64))
    nbytes = sum(w.numel() for w, _, _ in layers)
    xs = {k: torch.randn(1, k, generator=gen) for k, _ in SHAPES}

    def weight_only():
        for w, _, s in layers:
            torch.ops.aten._weight_int8pack_mm(xs[w.shape[1]].to(torch.bfloat16), w, s)

    def int8_int8():
        for w, wt, s in layers:
            x = xs[w.shape[1]]
            scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
            xi = torch.round(x / scale).to(torch.int8)
            torch._int_mm(xi, wt).float() * scale * s.float()

    try:
        int8_int8()
    except RuntimeError as e:
        print(f"torch._int_mm is not available on this CPU build: {e}")
        return 1
    times = {"weight-only int8 (_weight_int8pack_mm, shipped)": [], "int8 x int8 (_int_mm, dynamic activations)": []}
    fns = dict(zip(times, (weight_only, int8_int8), strict=True))
    for f in fns.values():
        f()  # warm-up
    for _ in range(args.rounds):
        for name, f in fns.items():
            start = time.perf_counter()
            for _ in range(args.steps):
                f()
            times[name].append((time.perf_counter() - start) / args.steps)
    print(f"{nbytes / 1e6:.0f} MB of int8 weights per step, {args.threads} thread(s), {args.rounds} rounds x "
          f"{args.steps} steps (median, min-max)")
    med = {}
    for name, ts in times.items():
        med[name] = statistics.median(ts)
        print(f"{name}: {med[name] * 1e3:.2f} ms ({min(ts) * 1e3:.2f}-{max(ts) * 1e3:.2f}), "
              f"{nbytes / med[name] / 1e9:.1f} GB/s")
    a, b = med.values()
    print(f"ratio (int8 x int8 speed / weight-only speed): {a / b:.2f}x")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
