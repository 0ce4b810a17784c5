"""Probe: does a PLAID codec with ColBERTv2's centroid count (2^floor(log2(16 sqrt(n_tokens)))) code the
benchmark corpus's tokens with less error than the capped default of 1,024, at the same bytes?

    python benchmarks/probe_plaid_centroids.py [--pages 600] [--centroids 1024,8192,32768] [--nbits 3.75]

Trains each codec on the first pages' tokens (a sample of ``--train-points``), then encodes held-out
pages of the same synthetic corpus as ``bench_maxsim.py`` and prints the RMS decompression error per
token (unit vectors), the residual RMS before quantisation, and the training and encoding time. It
measures codes only, not recall: a lower error is necessary, not sufficient, for better recall.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_maxsim import Corpus  # noqa: E402

from vision_rag import plaid  # noqa: E402
from vision_rag.clustering import nearest_centroids  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pages", type=int, default=600, help="training pages (held-out pages: 50 more)")
    parser.add_argument("--centroids", default="1024,8192,32768")
    parser.add_argument("--nbits", type=float, default=3.75)
    parser.add_argument("--train-points", type=int, default=1 << 19)
    args = parser.parse_args()
    corpus = Corpus(128, 1030)
    train = corpus.chunk(0, args.pages).reshape(-1, 128)
    held = corpus.chunk(args.pages, 50).reshape(-1, 128)
    print(f"{len(train)} training tokens, {len(held)} held-out tokens; ColBERTv2's rule: "
          f"{2 ** int(np.floor(np.log2(16 * np.sqrt(len(train)))))} centroids", flush=True)
    plaid.MAX_TRAIN_POINTS = args.train_points
    for k in (int(c) for c in args.centroids.split(",")):
        t0 = time.perf_counter()
        codec = plaid.PlaidCodec.train(train, args.nbits, n_centroids=k)
        t1 = time.perf_counter()
        codes = codec.sa_encode(held)
        t2 = time.perf_counter()
        decoded = codec.sa_decode(codes)
        residual = held - codec.centroids[nearest_centroids(held, codec.centroids)]
        err = np.sqrt(np.mean(np.sum((decoded - held) ** 2, axis=1)))
        res = np.sqrt(np.mean(np.sum(residual ** 2, axis=1)))
        print(f"{k:6d} centroids: residual RMS {res:.3f}, decompression error {err:.4f} at {codec.code_size} B/token; "
              f"train {t1 - t0:.0f} s, encode {1e6 * (t2 - t1) / len(held):.1f} us/token", flush=True)


if __name__ == "__main__":
    main()
