"""ColPali page embedding speed: pages per second through our native ColPali (SigLIP + PaliGemma
decoder + 128-dim projection) with random weights, Triton attention kernels against the torch
attention path in the same run.

    python benchmarks/bench_colpali.py                 # ColPali v1.x shapes (PaliGemma-3B, 448 px), CUDA, bf16
    python benchmarks/bench_colpali.py --dry-run       # tiny random model on the CPU (Triton interpreter)

The default model has the shapes of vidore/colpali-v1.x (SigLIP So400m at 448 px = 1,024 image
tokens, Gemma 2B decoder, 1,030 tokens a page); speed does not depend on the weights' values, so no
checkpoint is needed. Pages are random pixels; every page is the same length, so batches are full.
Reported: pages/s (median over timed batches after warm-up), and the Triton/torch ratio. The ColPali
paper reports 0.39 s/page (2.6 pages/s) on an L4 for indexing, image rendering included.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from device_results import record  # noqa: E402

from models.paligemma import PaliGemmaConfig  # noqa: E402
from vision_rag.colpali import ColPali  # noqa: E402

COLPALI_V1 = {"vision_config": {"image_size": 448}}  # every other size: PaliGemma-3B's (from_hf defaults)
TINY = {
    "vision_config": {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
                      "image_size": 56, "patch_size": 14},
    "text_config": {"model_type": "gemma", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                    "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16, "vocab_size": 1024},
    "image_token_index": 1000,
}
PROMPT_TOKENS = 6  # <bos> + "Describe the image.\n" in PaliGemma's tokenizer


def build(config: PaliGemmaConfig, device: str, dtype: torch.dtype) -> ColPali:
    """Random weights made on the device (normal 0.02; norms at their identity): values do not change
    speed. Built on the device, not on meta, so the rope buffers are computed; only parameters take ``dtype``."""
    with torch.device(device):
        model = ColPali(config)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and "vision" in name and name.endswith("weight"):
                p.fill_(1.0)  # SigLIP LayerNorm
            elif "norm" in name or name.endswith("bias"):
                p.zero_()  # Gemma's RMSNorm scales by 1 + w
            else:
                p.normal_(0.0, 0.02, generator=gen)
            p.data = p.data.to(dtype)
    return model.eval()


def pages_per_second(model: ColPali, batch: int, batches: int, device: str) -> float:
    config = model.config
    n_image = config.num_image_tokens
    ids = torch.full((batch, n_image + PROMPT_TOKENS), 2, dtype=torch.long, device=device)
    ids[:, :n_image] = config.image_token_id
    pixels = torch.rand(batch, 3, config.image_size, config.image_size, device=device, dtype=model.dtype)
    times = []
    with torch.inference_mode():
        for i in range(batches + 1):  # the first batch warms up (kernel compilation, allocator)
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            out = model(ids, pixels)
            if device == "cuda":
                torch.cuda.synchronize()
            if i:
                times.append(time.perf_counter() - start)
    assert out.shape == (batch, n_image + PROMPT_TOKENS, model.embedding_dim)
    return batch / statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--batches", type=int, default=5, help="timed batches per backend")
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU under the Triton interpreter")
    args = parser.parse_args(argv)
    if args.dry_run:
        device, dtype, raw, batch, batches = "cpu", torch.float32, TINY, 2, 1
    else:
        if not torch.cuda.is_available():
            print("bench_colpali.py measures a CUDA GPU; use --dry-run on a CPU", file=sys.stderr)
            return 2
        device, dtype, raw, batch, batches = "cuda", torch.bfloat16, COLPALI_V1, args.batch, args.batches
    config = PaliGemmaConfig.from_hf(raw)
    model = build(config, device, dtype)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"ColPali {'tiny' if args.dry_run else 'v1.x shapes'}: {n_params / 1e9:.2f} B parameters, "
          f"{config.num_image_tokens} image tokens + {PROMPT_TOKENS} per page, {str(dtype)[6:]} on {device}, batch {batch}")
    rates = {}
    for backend in ("triton", "torch"):
        model.model.attention_backend = backend
        rates[backend] = pages_per_second(model, batch, batches, device)
        print(f"  attention {backend:6s}: {rates[backend]:8.2f} pages/s")
    print(f"  triton / torch: {rates['triton'] / rates['torch']:.2f}x")
    record("ColPali page embedding", f"{'tiny (dry run)' if args.dry_run else 'v1.x shapes'} batch {batch} {str(dtype)[6:]}",
           rates["triton"], "pages/s", baseline=rates["torch"], baseline_name="torch attention",
           note="random weights; paper: 2.6 pages/s on an L4 incl. rendering")
    return 0


if __name__ == "__main__":
    sys.exit(main())
