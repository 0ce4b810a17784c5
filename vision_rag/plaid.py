"""PLAID / ColBERTv2-style residual compression of token vectors, and candidate pages from centroid postings.

A token vector is stored as the id of its nearest k-means centroid (2 bytes while there are at most
65,536 centroids, else 4) plus its residual to that centroid quantised to ``nbits`` per dimension:
each dimension has its own bucket cutoffs (quantiles of the training residuals in that dimension) and
bucket values (the mean training residual falling in each bucket). A 128-dim token takes 2 + 32 bytes
at 2 bits, 2 + 16 at 1 bit, against 256 for fp16. No per-token page id is stored: a page's tokens are
a contiguous run of its segment, found through the page's offset.

Search does not need a separate FAISS token index: each segment keeps the postings centroid -> pages
(unique pairs, ~1-2 KB per page). A query token probes its ``nprobe`` best centroids; every page in
those postings is scored by centroid-only MaxSim (a token's similarity to a page is taken as its best
similarity to a probed centroid the page uses, or at most the best unprobed one), and only the best
``rerank`` pages are decompressed and scored exactly. This is the candidate generation and centroid
interaction of PLAID (Santhanam et al., 2022) without its centroid pruning.

Files (all ``.npz``/``.npy`` read with ``allow_pickle=False``): the codec (centroids, cutoffs, bucket
values, nbits) and one postings file per segment.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from .clustering import kmeans, nearest_centroids
from .scoring import SINGLE_THREAD_BELOW_MACS

NBITS = (1, 2, 4)  # residual bits per dimension (whole codes per byte)
MAX_TRAIN_POINTS = 1 << 17  # k-means sample; more costs training time without changing the centroids much
# Cap of the default centroid count. Encoding compares every token with every centroid, so its cost grows
# with the count; on the benchmark corpus (bench_maxsim.py, 1,000 pages, 2 bits) 4,096 centroids gave a
# decompression error of 0.253 against 0.259 for 1,024, and lower recall (0.82 vs 0.86), at 3.4x the
# encoding time. Set ``plaid_centroids`` to use more.
DEFAULT_MAX_CENTROIDS = 1024


class PlaidSettingsError(ValueError):
    """Invalid PLAID parameters (nbits, dimension, too few training vectors)."""


def default_centroids(n_tokens: int) -> int:
    """ColBERTv2's rule, 2^floor(log2(16 sqrt(n))) centroids, bounded by the k-means sample (>= 16
    points per centroid) and by :data:`DEFAULT_MAX_CENTROIDS`."""
    rule = 2 ** int(np.floor(np.log2(16 * np.sqrt(max(n_tokens, 1)))))
    return int(max(1, min(rule, min(n_tokens, MAX_TRAIN_POINTS) // 16, DEFAULT_MAX_CENTROIDS)))


class PlaidCodec:
    """Centroid id + ``nbits``-per-dimension residual codes; ``sa_encode``/``sa_decode`` as FAISS codecs name them."""

    def __init__(self, centroids: np.ndarray, cutoffs: np.ndarray, values: np.ndarray, nbits: int):
        check_nbits(nbits)
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.cutoffs = np.ascontiguousarray(cutoffs, dtype=np.float32)  # (dim, 2^nbits - 1), ascending per row
        self.values = np.ascontiguousarray(values, dtype=np.float32)  # (dim, 2^nbits) decoded residual per bucket
        self.nbits = nbits
        self.dim = self.centroids.shape[1]
        self.id_bytes = 2 if len(self.centroids) <= 1 << 16 else 4
        self.per_byte = 8 // nbits
        self.residual_bytes = self.dim // self.per_byte
        self.code_size = self.id_bytes + self.residual_bytes
        self._shifts = (nbits * np.arange(self.per_byte)).astype(np.uint8)
        # Decoding table: byte k of a residual code, value v -> the per_byte residual values it holds.
        dims = np.arange(self.residual_bytes)[:, None, None] * self.per_byte + np.arange(self.per_byte)[None, None, :]
        buckets = (np.arange(256)[None, :, None] >> self._shifts[None, None, :].astype(np.int64)) & ((1 << nbits) - 1)
        self._table = torch.from_numpy(
            np.ascontiguousarray(self.values[dims, buckets].reshape(self.residual_bytes * 256, self.per_byte))
        )
        self._byte_base = torch.arange(self.residual_bytes, dtype=torch.int32) * 256
        self._centroids_t = torch.from_numpy(self.centroids)

    @property
    def n_centroids(self) -> int:
        return len(self.centroids)

    @classmethod
    def train(cls, vectors: np.ndarray, nbits: int, n_centroids: int | None = None, seed: int = 0) -> PlaidCodec:
        """Centroids by k-means on (a sample of) ``vectors``, then per-dimension buckets of the residuals."""
        check_nbits(nbits)
        dim = vectors.shape[1]
        if dim % (8 // nbits):
            raise PlaidSettingsError(f"nbits={nbits} packs {8 // nbits} dimensions per byte; dim {dim} is not a multiple")
        k = n_centroids or default_centroids(len(vectors))
        if len(vectors) < max(2 * k, 256):
            raise PlaidSettingsError(
                f"PLAID trains {k} centroids on the first pages added and needs at least {max(2 * k, 256)} token "
                f"vectors; got {len(vectors)}. Add more pages at once or set plaid_centroids lower"
            )
        rng = np.random.default_rng(seed)
        if len(vectors) > MAX_TRAIN_POINTS:
            vectors = vectors[np.sort(rng.choice(len(vectors), MAX_TRAIN_POINTS, replace=False))]
        vectors = np.asarray(vectors, dtype=np.float32)  # after sampling: the input may be millions of fp16 rows
        centroids = kmeans(vectors, k, seed=seed)
        residuals = vectors - centroids[nearest_centroids(vectors, centroids)]
        levels = 1 << nbits
        cutoffs = np.quantile(residuals, np.arange(1, levels) / levels, axis=0).T.astype(np.float32)  # (dim, levels-1)
        buckets = _bucketize(residuals, cutoffs)
        # Each bucket decodes to the mean residual in it (the least-squares value for these cutoffs);
        # an empty bucket (a dimension with many equal residuals) falls back to its quantile midpoint.
        midpoints = np.quantile(residuals, (np.arange(levels) + 0.5) / levels, axis=0).T
        counts = np.zeros((dim, levels))
        sums = np.zeros((dim, levels))
        cols = np.broadcast_to(np.arange(dim), buckets.shape)
        np.add.at(counts, (cols, buckets), 1)
        np.add.at(sums, (cols, buckets), residuals)
        values = np.where(counts > 0, sums / np.maximum(counts, 1), midpoints).astype(np.float32)
        return cls(centroids, cutoffs, values, nbits)

    # ---- codes -----------------------------------------------------------------------------------

    def sa_encode(self, vectors: np.ndarray, block: int = 65536) -> np.ndarray:
        """``(n, dim)`` float -> ``(n, code_size)`` uint8: little-endian centroid id, then packed residual buckets."""
        out = np.empty((len(vectors), self.code_size), dtype=np.uint8)
        id_type = np.dtype("<u2") if self.id_bytes == 2 else np.dtype("<u4")
        for start in range(0, len(vectors), block):
            part = np.asarray(vectors[start : start + block], dtype=np.float32)
            ids = nearest_centroids(part, self.centroids)
            buckets = _bucketize(part - self.centroids[ids], self.cutoffs)
            packed = (buckets.reshape(len(part), self.residual_bytes, self.per_byte) << self._shifts).sum(
                axis=2, dtype=np.uint8
            )
            out[start : start + len(part), : self.id_bytes] = ids.astype(id_type).view(np.uint8).reshape(len(part), -1)
            out[start : start + len(part), self.id_bytes :] = packed
        return out

    def centroid_ids(self, codes: np.ndarray) -> np.ndarray:
        """The centroid id of each code row -> ``(n,)`` int64."""
        id_type = np.dtype("<u2") if self.id_bytes == 2 else np.dtype("<u4")
        return np.ascontiguousarray(np.asarray(codes)[:, : self.id_bytes]).view(id_type).ravel().astype(np.int64)

    def sa_decode(self, codes: np.ndarray) -> np.ndarray:
        """``(n, code_size)`` uint8 -> ``(n, dim)`` float32: centroid + decoded residual."""
        ids, residual = self._split(codes)
        return (residual + torch.nn.functional.embedding(ids, self._centroids_t)).numpy()

    def maxsim(self, queries: list[np.ndarray], codes: np.ndarray, offsets: np.ndarray) -> np.ndarray:
        """MaxSim of each query against the pages whose codes lie at ``offsets`` -> ``(Q, n_pages)``, equal
        to scoring the decoded vectors but ~2x faster: q.x = q.centroid + q.residual, where q.centroid is
        looked up in the query's (Lq, n_centroids) similarities instead of adding centroids to every token."""
        macs = sum(len(q) for q in queries) * len(codes) * self.dim
        previous = torch.get_num_threads()
        # One thread below maxsim_packed's threshold, as it does: a rerank of 128 pages is too little work
        # to share, and on the shared 2-core machine two threads made it 2.5x slower (98 vs 230 ms p50).
        torch.set_num_threads(1 if macs < SINGLE_THREAD_BELOW_MACS else previous)
        try:
            ids, residual = self._split(codes)
            starts = np.asarray(offsets[:-1], dtype=np.int64)
            out = np.empty((len(queries), len(starts)), dtype=np.float32)
            for i, query in enumerate(queries):
                q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
                sims = q @ residual.T  # (Lq, n_tokens)
                sims += torch.index_select(q @ self._centroids_t.T, 1, ids)
                out[i] = np.maximum.reduceat(sims.numpy(), starts, axis=1).sum(axis=0)
            return out
        finally:
            torch.set_num_threads(previous)

    def _split(self, codes: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroid ids ``(n,)`` and decoded residuals ``(n, dim)`` float32 of code rows."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise PlaidSettingsError(f"PLAID codes of shape {codes.shape}; expected (n, {self.code_size})")
        ids = torch.from_numpy(self.centroid_ids(codes))
        residual_bytes = torch.from_numpy(np.ascontiguousarray(codes[:, self.id_bytes :])).to(torch.int32)
        # embedding() is the fastest row gather in torch on CPU (measured ~1.7x faster than indexing).
        residual = torch.nn.functional.embedding(residual_bytes + self._byte_base, self._table)
        return ids, residual.reshape(len(codes), self.dim)

    # ---- files -----------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, centroids=self.centroids, cutoffs=self.cutoffs, values=self.values, nbits=np.int64(self.nbits))
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: Path) -> PlaidCodec:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["centroids"], data["cutoffs"], data["values"], int(data["nbits"]))


def check_nbits(nbits: int) -> None:
    if nbits not in NBITS:
        raise PlaidSettingsError(f"plaid_nbits={nbits!r} is not one of {NBITS} (residual bits per dimension)")


def _bucketize(residuals: np.ndarray, cutoffs: np.ndarray) -> np.ndarray:
    """Bucket of each residual in its dimension's cutoffs -> uint8 of the same shape."""
    out = np.zeros(residuals.shape, dtype=np.uint8)
    for level in range(cutoffs.shape[1]):
        out += residuals > cutoffs[:, level]
    return out


# --------------------------------------------------------------------------------------------------
# Postings and candidate generation


class Postings:
    """centroid -> ids of the pages with a token assigned to it, as CSR arrays (pages sorted per centroid)."""

    def __init__(self, offsets: np.ndarray, pages: np.ndarray):
        self.offsets = offsets  # (n_centroids + 1,) int64
        self.pages = pages  # page ids, uint32 where they fit

    @classmethod
    def build(cls, centroid_ids: np.ndarray, token_pages: np.ndarray, n_centroids: int) -> Postings:
        """From each token's centroid and page id (-1: a token of no recorded page, left out)."""
        keep = token_pages >= 0
        cids, pages = centroid_ids[keep], token_pages[keep]
        distinct, local = np.unique(pages, return_inverse=True)
        pairs = np.unique(cids * np.int64(max(len(distinct), 1)) + local)
        pair_cids = pairs // max(len(distinct), 1)
        pair_pages = distinct[pairs % max(len(distinct), 1)] if len(distinct) else pairs
        offsets = np.zeros(n_centroids + 1, dtype=np.int64)
        np.cumsum(np.bincount(pair_cids, minlength=n_centroids), out=offsets[1:])
        dtype = np.uint32 if len(pair_pages) == 0 or pair_pages.max() < 1 << 32 else np.int64
        return cls(offsets, pair_pages.astype(dtype))

    def pages_of(self, centroids: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Page ids of the postings of ``centroids`` and, for each, the position of its centroid in ``centroids``."""
        starts, ends = self.offsets[centroids], self.offsets[centroids + 1]
        lengths = ends - starts
        which = np.repeat(np.arange(len(centroids)), lengths)
        flat = np.repeat(starts - np.concatenate([[0], np.cumsum(lengths)[:-1]]), lengths) + np.arange(lengths.sum())
        return self.pages[flat].astype(np.int64), which

    def save(self, path: Path) -> None:
        with open(path, "wb") as f:
            np.savez(f, offsets=self.offsets, pages=self.pages)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: Path) -> Postings:
        with np.load(path, allow_pickle=False) as data:
            return cls(data["offsets"], data["pages"])


def centroid_scores(
    query: np.ndarray, centroids: np.ndarray, postings: list[Postings], nprobe: int
) -> tuple[np.ndarray, np.ndarray]:
    """Approximate MaxSim of the pages found in the postings of the query tokens' ``nprobe`` best
    centroids -> ``(page_ids, scores)``. A query token's similarity to a page is its best similarity
    to a probed centroid the page has a token at, or, when it has none, the best similarity to any
    unprobed centroid (an upper bound, so a page is never ruled out by centroids it was not seen at)."""
    sims = query @ centroids.T  # (Lq, K)
    nprobe = min(nprobe, sims.shape[1])
    probed = np.unique(np.argpartition(-sims, nprobe - 1, axis=1)[:, :nprobe])
    rest = sims.copy()
    rest[:, probed] = -np.inf
    floor = rest.max(axis=1) if len(probed) < sims.shape[1] else np.full(len(query), -np.inf, dtype=np.float32)
    page_parts, which_parts = [], []
    for p in postings:
        pages, which = p.pages_of(probed)
        page_parts.append(pages)
        which_parts.append(which)
    pages, which = np.concatenate(page_parts), np.concatenate(which_parts)
    if len(pages) == 0:
        return pages, np.zeros(0, dtype=np.float32)
    order = np.argsort(pages, kind="stable")
    pages, which = pages[order], which[order]
    starts = np.flatnonzero(np.concatenate([[True], pages[1:] != pages[:-1]]))
    best = np.maximum.reduceat(sims[:, probed][:, which], starts, axis=1)  # (Lq, n_pages)
    scores = np.maximum(best, floor[:, None]).sum(axis=0)
    return pages[starts], scores
