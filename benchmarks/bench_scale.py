"""Scale-out benchmark (Ray): indexing throughput with Ray workers, and search over shards held by Ray
actors against one index, each against its baseline in the same run.

1. Indexing: PNG pages embedded by a random-weight ColPali of modest size (SigLIP 6 x 384 at 224 px,
   Gemma 4 x 512: ~27M parameters, ~0.5 s/page here; the real 3B model is ~100x more work per page,
   which only makes the fixed costs below smaller). Baseline: ``index_paths`` in this process (torch
   on ``--baseline-threads``, 1 like a worker); then ``index_paths_ray`` with 1 and 2 workers on a
   local Ray cluster of all cores. Pages/s over the whole run (actor start-up included) and over the steady part (first
   to last embedded page arriving).
2. Search: the synthetic clustered corpus of ``bench_maxsim.py`` (1,030 x 128 fp16 per page), in one
   index and in a collection of ``--shards`` shards (documents of one page, so the shards are equal),
   both with the IVF token index: p50/p95 latency of one query and recall@10 against exact search, for
   the single index, the shards searched one after another in this process, and the shards held by Ray
   actors (fan-out + merge); exact search for a few queries; one shard alone (its size is the per-shard
   point of the latency curve); a projection to 1M and 10M pages.

Usage: python benchmarks/bench_scale.py [--index-pages 48] [--workers 1,2] [--search-pages 20000]
       [--shards 4] ...   (small values make a quick smoke run; --skip-index / --skip-search)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from vision_rag.index import Index
from vision_rag.sharded import ShardedIndex

REPO = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------------------
# 1. Indexing


def write_model(directory: Path) -> Path:
    """A random-weight ColPali checkpoint of modest size (this project's own module layout)."""
    from safetensors.torch import save_file

    sys.path.insert(0, str(REPO / "tests" / "vision_rag"))  # the PaliGemma-style test tokenizer and config
    from tiny_colpali import paligemma_tokenizer, vlm_config

    from models.paligemma import PaliGemmaConfig
    from vision_rag.colpali import ColPali

    tokenizer = paligemma_tokenizer()
    raw = vlm_config(tokenizer.vocab_size, tokenizer.token_to_id("<image>"), image_size=224)
    raw["text_config"].update(hidden_size=512, intermediate_size=2048, num_hidden_layers=4, num_attention_heads=4,
                              head_dim=128)
    raw["vision_config"].update(hidden_size=384, intermediate_size=1536, num_hidden_layers=6, num_attention_heads=6)
    raw["hidden_size"] = raw["projection_dim"] = 512
    torch.manual_seed(0)
    model = ColPali(PaliGemmaConfig.from_hf(raw))
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * (0.5 if "norm" in name else 0.02))
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(raw))
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    return directory


def write_pages(directory: Path, n: int) -> Path:
    from PIL import Image, ImageDraw

    directory.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        page = Image.new("RGB", (612, 792), "white")
        draw = ImageDraw.Draw(page)
        for _ in range(12):
            x, y = rng.integers(0, 560), rng.integers(0, 740)
            draw.rectangle((x, y, x + rng.integers(20, 200), y + rng.integers(8, 60)),
                           fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
        page.save(directory / f"page{i:04d}.png")
    return directory


def bench_indexing(args, root: Path) -> None:
    from vision_rag.colpali import ColPaliEmbedder
    from vision_rag.distributed import connect, index_paths_ray
    from vision_rag.ingest import index_paths

    model = write_model(root / "model")
    pages = write_pages(root / "pages", args.index_pages)
    print(f"== indexing {args.index_pages} PNG pages (612 x 792), random ColPali ~27M params at 224 px, "
          f"batch {args.batch_size}, {os.cpu_count()} CPUs", flush=True)
    embedder = ColPaliEmbedder.load(model)
    threads = torch.get_num_threads()
    torch.set_num_threads(args.baseline_threads)  # a Ray worker on one CPU runs one thread
    try:
        embedder.embed_pages([str(next(pages.iterdir()))], progress=False)  # warm-up
        with Index.open(root / "one", create=True, model_id=embedder.model_id, dim=embedder.dim) as index:
            t = time.perf_counter()
            report = index_paths(index, embedder, [pages], batch_size=args.batch_size, progress=False)
            base_s = time.perf_counter() - t
    finally:
        torch.set_num_threads(threads)
    base = report.pages_added / base_s
    print(f"one process (torch {args.baseline_threads} thread(s)): {base_s:6.1f} s  {base:5.2f} pages/s", flush=True)
    connect(num_cpus=os.cpu_count())
    for workers in [int(w) for w in args.workers.split(",") if w]:
        arrivals: list[float] = []
        t = time.perf_counter()
        report = index_paths_ray(root / f"ray{workers}", model, [pages], workers=workers, batch_size=args.batch_size,
                                 on_page=lambda _, seen=arrivals: seen.append(time.perf_counter()), progress=False)
        total = time.perf_counter() - t
        first = arrivals[0] - t  # start-up: actors load the model, the first batch comes back
        later = [a for a in arrivals if a > arrivals[0] + 1e-3]  # pages after the first block arrived
        steady = len(later) / (arrivals[-1] - arrivals[0]) if later else float("nan")
        print(f"ray, {workers} worker(s): {total:6.1f} s  {report.pages_added / total:5.2f} pages/s overall "
              f"({report.pages_added / total / base:.2f}x one process); first page after {first:.1f} s, then "
              f"{steady:5.2f} pages/s ({steady / base:.2f}x); pages per actor {sorted(report.pages_per_worker.values())}",
              flush=True)


# --------------------------------------------------------------------------------------------------
# 2. Search


def _latency(search, queries, repeats: int) -> tuple[list[list[int]], np.ndarray]:
    found, times = [], []
    for r in range(repeats):
        for q in queries:
            t = time.perf_counter()
            hits = search(q)
            times.append(time.perf_counter() - t)
            if r == 0:
                found.append([h.page_id for h in hits])
    return found, 1000 * np.array(times)


def _recall(found, truth) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def bench_search(args, root: Path) -> None:
    from bench_maxsim import Corpus, _dir_bytes

    from vision_rag.distributed import connect
    from vision_rag.ray_shards import RayShardedIndex

    corpus = Corpus(args.dim, args.page_tokens)
    n, shards = args.search_pages, args.shards
    print(f"\n== search: {n} pages x {args.page_tokens} x {args.dim} fp16, one index vs {shards} shards, IVF token "
          f"index (nprobe 16, rerank 128), {args.queries} queries x {args.query_tokens} tokens, k=10", flush=True)
    options = dict(model_id="synthetic", dim=args.dim, ann="ivf", autocommit=False)
    rng = np.random.default_rng(1)
    query_pages = sorted(rng.choice(n, args.queries, replace=False).tolist())
    queries = {}
    built = (root / "sharded" / "shards.json").is_file() and len(Index.open(root / "single")) == n
    if built:
        print(f"  reusing the indexes in {root}", flush=True)
    else:
        shutil.rmtree(root, ignore_errors=True)
        single = Index.open(root / "single", create=True, **options)
        sharded = ShardedIndex.open(root / "sharded", create=True, shards=shards, **options)
    build = {"single": 0.0, "sharded": 0.0}
    for first in range(0, n, args.chunk_pages):
        count = min(args.chunk_pages, n - first)
        pages = corpus.chunk(first, count)
        for p in query_pages:
            if first <= p < first + count:
                queries[p] = corpus.query(pages[p - first], args.query_tokens, seed=p)
        if built:
            continue
        items = [({"document_id": f"p{first + i}"}, pages[i]) for i in range(count)]
        for name, index in (("single", single), ("sharded", sharded)):
            t = time.perf_counter()
            index.add(items)
            index.commit()
            build[name] += time.perf_counter() - t
        print(f"  built {first + count} pages (single {build['single']:.0f} s, sharded {build['sharded']:.0f} s)",
              flush=True)
    queries = [queries[p] for p in query_pages]
    if not built:
        single.close()
        sharded.close()
    single, sharded = Index.open(root / "single"), ShardedIndex.open(root / "sharded")
    vec, ann = _dir_bytes(root / "single")
    print(f"sizes: single {sharded.shard_sizes() and len(single)} pages; shards {sharded.shard_sizes()}; "
          f"{(vec + ann) / n / 1024:.1f} KB/page", flush=True)

    t = time.perf_counter()
    truth = [[h.page_id for h in hits] for hits in single.search(queries, k=10, exact=True)]
    print(f"exact truth for {len(queries)} queries in one pass: {time.perf_counter() - t:.1f} s", flush=True)
    single_map = {p.page_id: p.document_id for p in single.pages()}
    shard_doc = {p.page_id: p.document_id for p in sharded.pages()}
    truth_docs = [[single_map[p] for p in row] for row in truth]

    def report(name, found, ms, docs):
        found_docs = [[docs[p] for p in row] for row in found]
        print(f"{name:34s} p50 {np.percentile(ms, 50):7.1f} ms  p95 {np.percentile(ms, 95):7.1f} ms  "
              f"recall@10 {_recall(found_docs, truth_docs):.3f}", flush=True)
        return float(np.percentile(ms, 50))

    for index in [single, *sharded.shards]:
        index.search(queries[0], k=10)  # warm the page cache and FAISS
    found, ms = _latency(lambda q: single.search(q, k=10), queries, args.repeats)
    p50_single = report("one index", found, ms, single_map)
    found, ms = _latency(lambda q: sharded.search(q, k=10), queries, args.repeats)
    report(f"{shards} shards, one after another", found, ms, shard_doc)
    shard0 = sharded.shards[0]
    _, ms = _latency(lambda q: shard0.search(q, k=10), queries, args.repeats)
    p50_shard = float(np.percentile(ms, 50))
    print(f"{'one shard alone (' + str(len(shard0)) + ' pages)':34s} p50 {p50_shard:7.1f} ms", flush=True)
    connect(num_cpus=os.cpu_count())
    with RayShardedIndex(root / "sharded", shards=shards, timeout_s=600) as remote:
        remote.search(queries[0], k=10)
        found, ms = _latency(lambda q: remote.search(q, k=10), queries, args.repeats)
        p50_ray = report(f"{shards} shards on Ray actors", found, ms, shard_doc)
        exact_q = queries[: args.exact_queries]
        _, ms_one = _latency(lambda q: single.search(q, k=10, exact=True), exact_q, 1)
        _, ms_ray = _latency(lambda q: remote.search(q, k=10, exact=True), exact_q, 1)
        print(f"exact search, one query: one index p50 {np.percentile(ms_one, 50):.0f} ms, {shards} Ray shards "
              f"p50 {np.percentile(ms_ray, 50):.0f} ms ({np.percentile(ms_one, 50) / np.percentile(ms_ray, 50):.2f}x)",
              flush=True)
        fanout_ms = []
        for _ in range(len(queries) * args.repeats):
            t = time.perf_counter()
            remote.status()
            fanout_ms.append(1000 * (time.perf_counter() - t))
        fanout = float(np.percentile(fanout_ms, 50))
    print(f"ray / one index p50: {p50_ray / p50_single:.2f}x; a fan-out to the {shards} actors that does no work "
          f"(status) takes p50 {fanout:.1f} ms", flush=True)
    project(p50_single, p50_shard, n, len(shard0), fanout, (vec + ann) / n)


def project(p50_n: float, p50_shard: float, n: int, shard_pages: int, overhead_ms: float, bytes_per_page: float) -> None:
    """Per-shard p50 from the measured curve p50 ~ pages^a (a from the shard alone and the whole index)."""
    a = math.log(p50_n / p50_shard) / math.log(n / shard_pages) if p50_n > p50_shard else 0.66
    print(f"\nlatency grows as pages^{a:.2f} between {shard_pages} and {n} pages; projection (one query, "
          f"fp16 + IVF {bytes_per_page / 1024:.0f} KB/page; each shard on its own core, + fan-out {overhead_ms:.0f} ms):")
    for total, per_shard in [(1_000_000, 125_000), (1_000_000, 250_000), (10_000_000, 250_000), (10_000_000, 625_000)]:
        shard_p50 = p50_n * (per_shard / n) ** a
        print(f"  {total:>10,d} pages = {total // per_shard:3d} shards x {per_shard:,d}: {per_shard * bytes_per_page / 2**30:6.1f}"
              f" GiB per shard (fp16), p50 ~{shard_p50 + overhead_ms:.0f} ms with one core per shard", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--index-pages", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--baseline-threads", type=int, default=1,
                        help="torch threads of the one-process baseline (1: as one Ray worker on one CPU; on the busy "
                             "2-core development machine 2 threads gave 0.16 pages/s against 2.00 for 1)")
    parser.add_argument("--workers", default="1,2", help="Ray worker counts to measure")
    parser.add_argument("--search-pages", type=int, default=20000)
    parser.add_argument("--shards", type=int, default=4)
    parser.add_argument("--page-tokens", type=int, default=1030)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--query-tokens", type=int, default=20)
    parser.add_argument("--exact-queries", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--chunk-pages", type=int, default=2000, help="pages per commit while building")
    parser.add_argument("--skip-index", action="store_true")
    parser.add_argument("--skip-search", action="store_true")
    parser.add_argument("--workdir", default=None, help="where the temporary indexes go (needs ~2x the fp16 size)")
    parser.add_argument("--keep", default=None,
                        help="build the search indexes in this directory and keep them; a later run with the same "
                             "--keep and sizes reuses them (the build takes ~20 min at 20k pages here)")
    args = parser.parse_args()
    os.environ.setdefault("RAY_memory_monitor_refresh_ms", "0")  # a shared machine: no OOM kills of our workers
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    root = Path(tempfile.mkdtemp(prefix="bench_scale_", dir=args.workdir))
    try:
        if not args.skip_index:
            bench_indexing(args, root / "indexing")
        if not args.skip_search:
            bench_search(args, Path(args.keep) if args.keep else root / "search")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
