"""MaxSim scoring and multi-vector search benchmark (CPU).

1. Exact scoring: Q queries x Lq tokens against N pages x L tokens x D dims stored in fp16 —
   ``vision_rag.scoring.maxsim_packed`` vs the algorithm of colpali-engine's ``score_multi_vector``
   (batches of 128, zero padding, ``einsum("bnd,csd->bcns").amax(3).sum(2)`` in the storage dtype),
   timed in the same run, plus the largest score difference between the two.
2. Approximate search on synthetic clustered collections (topics of related "visual words", pages
   mixing a main topic with others, per-token noise; queries are perturbed tokens of a page, so the
   exact top 10 are that page and its topic neighbours): build time, p50/p95 latency of one query,
   recall@10 against exact search, bytes per page, for the IVF token index at several search
   settings and for each compression option (including PLAID residual compression at 1 to 4 bits,
   fractional widths such as 3.75 that mix 3- and 4-bit dimensions, and, for comparison, ColBERTv2's
   equal-probability buckets instead of Lloyd-Max ones; PLAID's candidates come from its centroid
   postings instead of the IVF token index), with a
   projection to 1M pages, and a closing table of all options side by side.

3. ``--gpu``: the Triton MaxSim kernel (``gemma_kernels.maxsim``) on a CUDA GPU against the torch
   specification (one einsum per block of pages, fp32 accumulation), TFLOP/s and pages scored per
   second, bf16 and fp16, after checking the kernel's scores against the reference. With
   ``--dry-run`` the same runs on the CPU under the Triton interpreter at tiny sizes.

Usage: python benchmarks/bench_maxsim.py [--pages 2000] [--ann-sizes 5000,10000,20000] ...
(every size is a flag; small values make a quick smoke run); python benchmarks/bench_maxsim.py --gpu.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

if "--dry-run" in sys.argv:  # the interpreter must be chosen before triton is imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from device_results import record  # noqa: E402

from vision_rag import plaid as plaid_module  # noqa: E402
from vision_rag.index import Index  # noqa: E402
from vision_rag.plaid import LLOYD_ITERATIONS  # noqa: E402
from vision_rag.scoring import maxsim_packed  # noqa: E402

# --------------------------------------------------------------------------------------------------
# The reference algorithm (colpali-engine's score_multi_vector), re-stated


def colpali_engine_scores(queries: list[torch.Tensor], pages: list[torch.Tensor], batch_size: int = 128) -> torch.Tensor:
    out = []
    for i in range(0, len(queries), batch_size):
        q = torch.nn.utils.rnn.pad_sequence(queries[i : i + batch_size], batch_first=True, padding_value=0)
        row = []
        for j in range(0, len(pages), batch_size):
            p = torch.nn.utils.rnn.pad_sequence(pages[j : j + batch_size], batch_first=True, padding_value=0)
            row.append(torch.einsum("bnd,csd->bcns", q, p).amax(dim=3).sum(dim=2))
        out.append(torch.cat(row, dim=1))
    return torch.cat(out, dim=0).to(torch.float32)


def bench_exact(args) -> None:
    print(f"== exact MaxSim: {args.queries} queries x {args.query_tokens} tokens vs {args.pages} pages x "
          f"{args.page_tokens} x {args.dim} fp16, torch threads {torch.get_num_threads()}")
    gen = torch.Generator().manual_seed(0)
    pages = torch.randn(args.pages * args.page_tokens, args.dim, generator=gen)
    pages = torch.nn.functional.normalize(pages, dim=1).half()
    queries = torch.nn.functional.normalize(torch.randn(args.queries, args.query_tokens, args.dim, generator=gen), dim=2)
    offsets = np.arange(args.pages + 1, dtype=np.int64) * args.page_tokens

    flops = 2 * args.queries * args.query_tokens * pages.shape[0] * args.dim
    timings = {}
    for threads in sorted({torch.get_num_threads(), 1}, reverse=True):
        t = time.perf_counter()
        ours = maxsim_packed(list(queries), pages, offsets, threads=threads)
        timings[threads] = time.perf_counter() - t
        print(f"ours (packed, fp16 storage, fp32 chunks, {threads} thread(s)): {timings[threads]:.2f} s "
              f"({flops / timings[threads] / 1e9:.1f} GFLOP/s)", flush=True)
    if args.skip_reference:
        return
    page_list = list(pages.view(args.pages, args.page_tokens, args.dim))
    t = time.perf_counter()
    reference = colpali_engine_scores(list(queries.half()), page_list)
    ref_s = time.perf_counter() - t
    print(f"colpali-engine score_multi_vector algorithm (fp16): {ref_s:.2f} s")
    speedups = "  ".join(f"{ref_s / s:.1f}x with {n} thread(s)" for n, s in timings.items())
    print(f"speed-up: {speedups}   max |ours - reference| = {np.abs(ours - reference.numpy()).max():.4f} "
          "(reference rounds to fp16)")


# --------------------------------------------------------------------------------------------------
# Synthetic clustered collection


class Corpus:
    """Deterministic clustered pages, generated a chunk at a time (never all in memory)."""

    def __init__(self, dim: int, page_tokens: int, n_topics: int = 512, words_per_topic: int = 64, seed: int = 0):
        rng = np.random.default_rng(seed)
        self.dim, self.page_tokens, self.seed = dim, page_tokens, seed
        topics = _unit(rng.standard_normal((n_topics, dim)))
        self.words = _unit(topics[:, None, :] + 0.8 * _unit(rng.standard_normal((n_topics, words_per_topic, dim))))
        self.n_topics, self.words_per_topic = n_topics, words_per_topic

    BLOCK = 50  # pages are generated in fixed blocks, so page i is the same however it is asked for

    def chunk(self, first: int, count: int) -> np.ndarray:
        """Pages ``first .. first + count - 1`` as ``(count, page_tokens, dim)`` float32."""
        blocks = range(first // self.BLOCK, (first + count - 1) // self.BLOCK + 1)
        pages = np.concatenate([self._block(b) for b in blocks])
        start = first - blocks[0] * self.BLOCK
        return pages[start : start + count]

    def _block(self, block: int) -> np.ndarray:
        count = self.BLOCK
        rng = np.random.default_rng([self.seed, block])
        main = rng.integers(self.n_topics, size=(count, 1))
        others = rng.integers(self.n_topics, size=(count, 2))
        pick = rng.random((count, self.page_tokens))
        topic = np.where(pick < 0.7, main, np.where(pick < 0.85, others[:, :1], others[:, 1:]))
        word = rng.integers(self.words_per_topic, size=(count, self.page_tokens))
        noise = rng.standard_normal((count, self.page_tokens, self.dim), dtype=np.float32)
        noise *= 0.35 / math.sqrt(self.dim)
        return _unit(self.words[topic, word] + noise).astype(np.float32)

    def query(self, page: np.ndarray, n_tokens: int, seed: int) -> np.ndarray:
        rng = np.random.default_rng(seed)
        tokens = page[rng.choice(len(page), n_tokens, replace=False)]
        return _unit(tokens + 0.25 / math.sqrt(self.dim) * rng.standard_normal(tokens.shape)).astype(np.float32)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _dir_bytes(path: Path) -> tuple[int, int]:
    vectors = sum(p.stat().st_size for p in (path / "data").glob("seg-*.npy")) + sum(
        p.stat().st_size for p in (path / "data").glob("codec-*"))
    ann = sum(p.stat().st_size for p in (path / "data").glob("*.ivf")) + sum(
        p.stat().st_size for p in (path / "data").glob("ann-*")) + sum(
        p.stat().st_size for p in (path / "data").glob("*.postings.npz"))  # PLAID's token index
    return vectors, ann


def _latencies(index: Index, queries: list[np.ndarray], repeats: int) -> tuple[list[list[int]], np.ndarray]:
    results, times = [], []
    for r in range(repeats):
        for q in queries:
            t = time.perf_counter()
            hits = index.search(q, k=10)
            times.append(time.perf_counter() - t)
            if r == 0:
                results.append([h.page_id for h in hits])
    return results, np.array(times) * 1000


def _recall(found: list[list[int]], truth: list[list[int]]) -> float:
    return float(np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)]))


def bench_ann(args) -> None:
    sizes = [int(s) for s in args.ann_sizes.split(",") if s]
    corpus = Corpus(args.dim, args.page_tokens)
    root = Path(tempfile.mkdtemp(prefix="bench_maxsim_", dir=args.workdir))
    rng = np.random.default_rng(1)
    # Query source pages for each size, drawn among that size's pages.
    query_pages = {n: sorted(rng.choice(n, args.recall_queries, replace=False).tolist()) for n in sizes}
    wanted = {p for ps in query_pages.values() for p in ps}
    options = [o for o in args.options.split(",") if o]
    print(f"\n== approximate search: clustered pages x {args.page_tokens} x {args.dim}, {args.recall_queries} queries "
          f"x {args.query_tokens} tokens (perturbed tokens of a page), k=10, options {options}, dir {root}")
    settings = {
        "fp16": dict(storage="fp16"),
        "sq8": dict(storage="sq8"),
        "pq32": dict(storage="pq", pq_m=32),
        "pool3-fp16": dict(storage="fp16", pool_factor=3),
        "pool3-sq8": dict(storage="sq8", pool_factor=3),
        "plaid1": dict(storage="plaid", plaid_nbits=1),
        "plaid2": dict(storage="plaid", plaid_nbits=2),
        "plaid4": dict(storage="plaid", plaid_nbits=4),
        "plaid3": dict(storage="plaid", plaid_nbits=3),
        "plaid3.5": dict(storage="plaid", plaid_nbits=3.5),
        "plaid3.75": dict(storage="plaid", plaid_nbits=3.75),
        # ColBERTv2's equal-probability buckets (how the codec trained before Lloyd-Max buckets), for comparison
        "plaid2-quantile": dict(storage="plaid", plaid_nbits=2, lloyd_iterations=0),
        "plaid4-quantile": dict(storage="plaid", plaid_nbits=4, lloyd_iterations=0),
    }
    truths: dict[int, list[list[int]]] = {}
    summary: list[tuple] = []
    try:
        for option in options:
            option_sizes = sizes if option in args.full_options.split(",") else sizes[:1]
            summary += _bench_option(args, corpus, root / option, option, settings[option], option_sizes, query_pages,
                                     wanted, truths)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print("\n== compression options side by side (per option and size: the search setting with the best recall, "
          "then the lowest p50)")
    print("| option | pages | KB/page | recall@10 vs exact fp16 | p50 ms | p95 ms | nprobe/rerank | build ms/page |")
    print("|---|---|---|---|---|---|---|---|")
    for option, size, kb, recall, p50, p95, nprobe, rerank, build_ms in summary:
        print(f"| {option} | {size} | {kb:.1f} | {recall:.3f} | {p50:.1f} | {p95:.1f} | {nprobe}/{rerank} | {build_ms:.1f} |")


def exact_fp16_truth(corpus: Corpus, size: int, queries: list[np.ndarray], chunk_pages: int) -> list[list[int]]:
    """Top 10 pages of each query by exact MaxSim over the uncompressed (fp16) pages 0..size-1,
    computed from the generator, so every compression option is compared with the same truth."""
    scores = np.empty((len(queries), size), dtype=np.float32)
    for first in range(0, size, chunk_pages):
        count = min(chunk_pages, size - first)
        pages = corpus.chunk(first, count).astype(np.float16).reshape(-1, corpus.dim)
        offsets = np.arange(count + 1, dtype=np.int64) * corpus.page_tokens
        scores[:, first : first + count] = maxsim_packed(queries, pages, offsets)
    return [np.argsort(-row, kind="stable")[:10].tolist() for row in scores]


def _bench_option(args, corpus, directory, option, settings, sizes, query_pages, wanted, truths):
    settings = dict(settings)
    plaid_module.LLOYD_ITERATIONS = settings.pop("lloyd_iterations", LLOYD_ITERATIONS)  # a training choice, not a setting
    index = Index.open(directory, create=True, model_id="synthetic", dim=args.dim, ann="ivf",
                       autocommit=False, **settings)
    queries_by_page: dict[int, np.ndarray] = {}
    added, build_s, rows, summary = 0, 0.0, [], []
    for size in sizes:
        while added < size:
            count = min(args.chunk_pages, size - added)
            pages = corpus.chunk(added, count)
            for p in range(added, added + count):
                if p in wanted and p not in queries_by_page:
                    queries_by_page[p] = corpus.query(pages[p - added], args.query_tokens, seed=p)
            t = time.perf_counter()
            index.add([({"document_id": f"p{added + i}"}, pages[i]) for i in range(count)])
            build_s += time.perf_counter() - t
            added += count
        t = time.perf_counter()
        index.commit()
        build_s += time.perf_counter() - t
        queries = [queries_by_page[p] for p in query_pages[size]]
        t = time.perf_counter()
        own_exact = [[h.page_id for h in hits] for hits in index.search(queries, k=10, exact=True)]
        exact_s = (time.perf_counter() - t) / len(queries)  # amortised: all queries in one pass
        if size not in truths:
            truths[size] = exact_fp16_truth(corpus, size, queries, args.chunk_pages)
        truth = truths[size]  # page ids are 0..size-1 in generation order in every option's index
        print(f"{option:11s} {size:6d} pages  exact search on this option's stored vectors: recall@10 "
              f"{_recall(own_exact, truth):.3f} vs exact fp16 (the cost of the compression alone)", flush=True)
        t = time.perf_counter()
        for q in queries[:3]:
            index.search(q, k=10, exact=True)
        single_exact_s = (time.perf_counter() - t) / 3  # one query alone (what a user's search costs)
        vec_bytes, ann_bytes = _dir_bytes(directory)
        for nprobe, rerank in [tuple(int(x) for x in s.split("/")) for s in args.ann_settings.split(",")]:
            handle = Index.open(directory, nprobe=nprobe, rerank=rerank)
            found, ms = _latencies(handle, queries, args.repeats)
            handle.close()
            recall = _recall(found, truth)
            rows.append((size, nprobe, rerank, np.percentile(ms, 50), np.percentile(ms, 95), recall))
            print(f"{option:11s} {size:6d} pages  nprobe {nprobe:3d} rerank {rerank:4d}: p50 {np.percentile(ms, 50):7.1f} ms "
                  f"p95 {np.percentile(ms, 95):7.1f} ms  recall@10 {recall:.3f}", flush=True)
        print(f"{option:11s} {size:6d} pages  build {build_s:7.1f} s (cumulative, {1000 * build_s / size:.1f} ms/page)  "
              f"exact search {single_exact_s * 1000:.0f} ms for one query ({single_exact_s * 1e6 / size:.1f} us/page), "
              f"{exact_s * 1000:.0f} ms/query for {len(queries)} at once  "
              f"bytes/page {(vec_bytes + ann_bytes) / size / 1024:.1f} KB "
              f"(vectors {vec_bytes / size / 1024:.1f} KB + token index {ann_bytes / size / 1024:.1f} KB)", flush=True)
        by_recall = max((r for r in rows if r[0] == size), key=lambda r: (round(r[5], 3), -r[3]))
        summary.append((option, size, (vec_bytes + ann_bytes) / size / 1024, by_recall[5], by_recall[3], by_recall[4],
                        by_recall[1], by_recall[2], 1000 * build_s / size))
        if len(rows) and rows[-1][0] == size:
            best = min((r for r in rows if r[0] == size), key=lambda r: (r[5] < 0.95, r[3]))
            crossover = best[3] / 1000 / (single_exact_s / size)
            print(f"{option:11s} {size:6d} pages  exact/IVF crossover at ~{crossover:.0f} pages "
                  f"(IVF p50 {best[3]:.1f} ms / exact {single_exact_s * 1e6 / size:.1f} us per page, one query)", flush=True)
    index.close()
    if len(sizes) >= 2:
        s0, s1 = sizes[0], sizes[-1]
        for nprobe, rerank in {(r[1], r[2]) for r in rows}:
            l0 = next(r[3] for r in rows if r[:3] == (s0, nprobe, rerank))
            l1 = next(r[3] for r in rows if r[:3] == (s1, nprobe, rerank))
            exponent = math.log(max(l1, 1e-3) / max(l0, 1e-3)) / math.log(s1 / s0)
            projected = l1 * (1_000_000 / s1) ** exponent
            print(f"{option:11s} projection to 1M pages (nprobe {nprobe}, rerank {rerank}): latency grows as N^{exponent:.2f} "
                  f"from {s0} to {s1} -> p50 ~{projected:.0f} ms; bytes {(vec_bytes + ann_bytes) / s1 * 1e6 / 2**30:.0f} GiB; "
                  f"build ~{build_s / s1 * 1e6 / 3600:.1f} h at this rate", flush=True)
    return summary


def bench_hnsw(args) -> None:
    """HNSW vs IVF token index on a small collection (HNSW's build cost decides the choice)."""
    if args.hnsw_pages <= 0:
        return
    corpus = Corpus(args.dim, args.page_tokens, n_topics=max(4, args.hnsw_pages // 20))  # ~20 pages per topic
    root = Path(tempfile.mkdtemp(prefix="bench_hnsw_", dir=args.workdir))
    print(f"\n== token index choice at {args.hnsw_pages} pages ({args.hnsw_pages * args.page_tokens} token vectors)")
    try:
        pages = corpus.chunk(0, args.hnsw_pages)
        queries = [corpus.query(pages[p], args.query_tokens, seed=p) for p in range(0, args.hnsw_pages, max(1, args.hnsw_pages // 20))]
        for ann in ("ivf", "hnsw"):
            index = Index.open(root / ann, create=True, model_id="synthetic", dim=args.dim, ann=ann, exact_below_pages=0)
            t = time.perf_counter()
            index.add([({"document_id": f"p{i}"}, pages[i]) for i in range(len(pages))])
            build = time.perf_counter() - t
            truth = [[h.page_id for h in hits] for hits in index.search(queries, k=10, exact=True)]
            found, ms = _latencies(index, queries, args.repeats)
            _, ann_bytes = _dir_bytes(root / ann)
            print(f"{ann:5s}: build {build:6.1f} s ({1000 * build / len(pages):.0f} ms/page)  p50 {np.percentile(ms, 50):6.1f} ms  "
                  f"recall@10 {_recall(found, truth):.3f}  token index {ann_bytes / len(pages) / 1024:.1f} KB/page", flush=True)
            index.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)


def bench_gpu(args) -> None:
    """Triton MaxSim kernel vs the torch specification on padded (N, Ld, D) pages."""
    from gemma_kernels.maxsim import maxsim_reference, maxsim_triton

    device = "cpu" if args.dry_run else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--gpu needs a CUDA GPU (or --dry-run for the CPU interpreter)")
    n_pages, page_tokens, n_queries = (8, 64, 2) if args.dry_run else (args.gpu_pages, args.page_tokens, args.queries)
    dtypes = [torch.float32] if args.dry_run else [torch.bfloat16, torch.float16]
    print(f"\n== MaxSim on {device}{' (Triton interpreter, tiny sizes: not a measurement)' if args.dry_run else ''}: "
          f"{n_queries} queries x {args.query_tokens} tokens vs {n_pages} pages x {page_tokens} x {args.dim}")
    for dtype in dtypes:
        gen = torch.Generator(device=device).manual_seed(0)
        docs = torch.nn.functional.normalize(
            torch.randn(n_pages, page_tokens, args.dim, device=device, generator=gen), dim=-1).to(dtype)
        queries = torch.nn.functional.normalize(
            torch.randn(n_queries, args.query_tokens, args.dim, device=device, generator=gen), dim=-1).to(dtype)

        def reference(queries=queries, docs=docs):  # blocks of pages bound the (Q, Lq, block, Ld) product
            return torch.cat([maxsim_reference(queries, docs[i : i + 256]) for i in range(0, n_pages, 256)], dim=1)

        err = (maxsim_triton(queries, docs) - reference()).abs().max().item()
        # fp32 accumulation on both sides; bf16/fp16 products are exact in fp32, so only summation order differs.
        limit = 1e-3 * args.query_tokens
        print(f"  check {str(dtype)[6:]}: max|ours - reference| {err:.2e} (limit {limit:.0e}) {'ok' if err <= limit else 'MISMATCH'}")
        if err > limit:
            record("CHECK FAILED", f"maxsim {str(dtype)[6:]}", err, "max|err|", target=f"<= {limit:.0e}")
        flops = 2.0 * n_queries * args.query_tokens * n_pages * page_tokens * args.dim
        ours_ms, ref_ms = _time_ms(lambda q=queries, d=docs: maxsim_triton(q, d), device), _time_ms(reference, device)
        print(f"  {str(dtype)[6:]:>8}: ours {flops / ours_ms / 1e9:7.1f} TFLOP/s ({n_pages / ours_ms * 1000:,.0f} pages/s)  "
              f"torch reference {flops / ref_ms / 1e9:7.1f} TFLOP/s  ratio {ref_ms / ours_ms:.2f}x")
        record("MaxSim kernel", f"{str(dtype)[6:]} {n_queries}x{args.query_tokens} q vs {n_pages} x {page_tokens}",
               flops / ours_ms / 1e9, "TFLOP/s", baseline=flops / ref_ms / 1e9, baseline_name="torch einsum",
               note=f"{n_pages / ours_ms * 1000:,.0f} pages/s")


def _time_ms(fn, device: str) -> float:
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=10, rep=50)
    start = time.perf_counter()  # the dry run's interpreter: one call, the figure means nothing
    fn()
    return 1000 * (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=2000, help="pages for the exact scoring benchmark")
    parser.add_argument("--page-tokens", type=int, default=1030)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--queries", type=int, default=20)
    parser.add_argument("--query-tokens", type=int, default=20)
    parser.add_argument("--skip-exact", action="store_true")
    parser.add_argument("--skip-reference", action="store_true", help="do not time the colpali-engine algorithm")
    parser.add_argument("--ann-sizes", default="5000,10000,20000", help="collection sizes (pages), built incrementally")
    parser.add_argument("--options", default="fp16,sq8,pq32,pool3-fp16,pool3-sq8,plaid1,plaid2",
                        help="compression options to measure")
    parser.add_argument("--full-options", default="fp16,pq32,plaid2",
                        help="options measured at every size (the others only at the first size)")
    parser.add_argument("--ann-settings", default="8/32,8/64,16/64,16/128", help="nprobe/rerank pairs to measure")
    parser.add_argument("--recall-queries", type=int, default=25)
    parser.add_argument("--repeats", type=int, default=2, help="latency samples per query")
    parser.add_argument("--chunk-pages", type=int, default=500)
    parser.add_argument("--hnsw-pages", type=int, default=200, help="pages for the IVF vs HNSW comparison (0: skip)")
    parser.add_argument("--workdir", default=None, help="where the temporary indexes go (needs ~2x fp16 size)")
    parser.add_argument("--gpu", action="store_true", help="only the Triton kernel vs torch on a CUDA GPU")
    parser.add_argument("--gpu-pages", type=int, default=4096, help="pages scored per query batch by --gpu")
    parser.add_argument("--dry-run", action="store_true", help="with --gpu: on the CPU interpreter, tiny sizes")
    args = parser.parse_args()
    if args.gpu:
        bench_gpu(args)
        return
    if not args.skip_exact:
        bench_exact(args)
    bench_hnsw(args)
    if args.ann_sizes:
        bench_ann(args)


if __name__ == "__main__":
    main()
