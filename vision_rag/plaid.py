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

NBITS = (1, 2, 3, 4)  # whole residual bits per dimension; a value between them mixes the two (see dim_bits_for)
BYTE_ALIGNED = (1, 2, 4)  # widths whose codes never straddle a byte (decoded through a byte table)
MAX_TRAIN_POINTS = 1 << 17  # k-means sample; more costs training time without changing the centroids much
LLOYD_ITERATIONS = 20  # per-dimension 1-D k-means of the bucket values (see PlaidCodec.train)
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


def dim_bits_for(nbits: float, dim: int) -> tuple[int, int]:
    """``nbits`` (average residual bits per dimension) -> (dimensions at ceil(nbits), dimensions at
    floor(nbits)). A whole ``nbits`` puts every dimension at it; 3.75 with 128 dimensions puts 96 at 4
    bits and 32 at 3. Each group is packed 8 dimensions at a time (8 codes of b bits = b bytes), so
    both group sizes must be multiples of 8."""
    check_nbits(nbits)
    low, high = int(np.floor(nbits)), int(np.ceil(nbits))
    if high == low:
        if dim % 8:
            raise PlaidSettingsError(f"plaid_nbits={nbits} packs 8 dimensions at a time; dim {dim} is not a multiple of 8")
        return dim, 0
    n_high = (nbits - low) * dim
    if abs(n_high - round(n_high)) > 1e-6 or round(n_high) % 8 or (dim - round(n_high)) % 8:
        raise PlaidSettingsError(
            f"plaid_nbits={nbits} with dim {dim}: codes are packed 8 dimensions at a time, so the dimensions at "
            f"{high} bits ({n_high:g}) and at {low} bits ({dim - n_high:g}) must be whole multiples of 8"
        )
    return round(n_high), dim - round(n_high)


class PlaidCodec:
    """Centroid id + residual codes of ``dim_bits[d]`` bits in dimension d; ``sa_encode``/``sa_decode`` as
    FAISS codecs name them.

    Code layout after the id: one section per width, widest first, each holding its dimensions in
    ascending order. A 1-, 2- or 4-bit section packs 8/b codes per byte, the first in the low bits (the
    layout of format 2, so codecs written before widths could mix decode unchanged). A 3-bit section is
    two planes: the low 2 bits of each code as a 2-bit section, then the high bits as a 1-bit section,
    so 4 dimensions decode with one lookup of a 4,096-row table (a low-plane byte and a high-plane
    nibble), as fast as the byte-aligned widths.
    """

    def __init__(self, centroids: np.ndarray, cutoffs: np.ndarray, values: np.ndarray, dim_bits):
        self.centroids = np.ascontiguousarray(centroids, dtype=np.float32)
        self.dim = self.centroids.shape[1]
        dim_bits = np.broadcast_to(np.asarray(dim_bits, dtype=np.int64), (self.dim,)).copy()
        for b in np.unique(dim_bits):
            if int(b) not in NBITS:
                raise PlaidSettingsError(f"residual width {int(b)} bits is not one of {NBITS}")
        self.dim_bits = dim_bits
        levels = 1 << int(dim_bits.max())
        self.cutoffs = np.ascontiguousarray(cutoffs, dtype=np.float32)  # (dim, levels - 1), ascending, +inf padded
        self.values = np.ascontiguousarray(values, dtype=np.float32)  # (dim, levels) decoded residual per bucket
        if self.cutoffs.shape != (self.dim, levels - 1) or self.values.shape != (self.dim, levels):
            raise PlaidSettingsError(f"PLAID codec tables of shapes {self.cutoffs.shape} and {self.values.shape}; "
                                     f"expected ({self.dim}, {levels - 1}) and ({self.dim}, {levels})")
        mean = float(dim_bits.mean())
        self.nbits = int(mean) if mean == int(mean) else mean  # average bits per dimension (the setting)
        self.id_bytes = 2 if len(self.centroids) <= 1 << 16 else 4
        # Sections: (width, dimensions) in code order.
        self.order = np.argsort(-dim_bits, kind="stable")
        self.sections = []
        for b in sorted({int(x) for x in dim_bits}, reverse=True):
            dims = self.order[dim_bits[self.order] == b]
            if len(dims) % 8:
                raise PlaidSettingsError(f"{len(dims)} dimensions at {b} bits; codes pack 8 at a time")
            self.sections.append((b, dims))
        self.residual_bytes = int(dim_bits.sum()) // 8
        self.code_size = self.id_bytes + self.residual_bytes
        self._decoders = []
        byte_start = 0
        for b, dims in self.sections:
            n_bytes = len(dims) * b // 8
            vals = self.values[dims]  # (m, levels)
            if b in BYTE_ALIGNED:
                per_byte = 8 // b
                shifts = b * np.arange(per_byte)
                # Decoding table: byte k of the section, value v -> the per_byte residual values it holds.
                rows = np.arange(n_bytes)[:, None, None] * per_byte + np.arange(per_byte)[None, None, :]
                buckets = (np.arange(256)[None, :, None] >> shifts[None, None, :]) & ((1 << b) - 1)
            else:  # 3 bits: 4 dimensions' 12 bits (a low-plane byte + a high-plane nibble) index one table row
                groups = len(dims) // 4
                rows = np.arange(groups)[:, None, None] * 4 + np.arange(4)[None, None, :]
                entry = np.arange(4096)[None, :, None]
                i = np.arange(4)[None, None, :]
                buckets = ((entry >> (2 * i)) & 3) | (((entry >> (8 + i)) & 1) << 2)
            table = torch.from_numpy(np.ascontiguousarray(vals[rows, buckets].reshape(-1, rows.shape[2])))
            base = torch.arange(rows.shape[0], dtype=torch.int32) * buckets.shape[1]
            self._decoders.append((b, byte_start, n_bytes, table, base))
            byte_start += n_bytes
        self._identity = bool((self.order == np.arange(self.dim)).all())
        self._inverse = torch.from_numpy(np.argsort(self.order))
        self._centroids_t = torch.from_numpy(self.centroids)

    @property
    def n_centroids(self) -> int:
        return len(self.centroids)

    @classmethod
    def train(cls, vectors: np.ndarray, nbits: float, n_centroids: int | None = None, seed: int = 0) -> PlaidCodec:
        """Centroids by k-means on (a sample of) ``vectors``, then per-dimension buckets of the residuals:
        each dimension's bucket values are a 1-D k-means (Lloyd-Max quantiser) of its training residuals,
        started from ColBERTv2's equal-probability buckets (each bucket's mean), and its cutoffs the
        midpoints between them. With a fractional ``nbits`` the dimensions with the largest residual
        variance get the extra bit."""
        dim = vectors.shape[1]
        n_high, _ = dim_bits_for(nbits, dim)
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
        dim_bits = np.full(dim, int(np.floor(nbits)), dtype=np.int64)
        dim_bits[np.argsort(-residuals.var(axis=0), kind="stable")[:n_high]] = int(np.ceil(nbits))
        cutoffs, values = lloyd_max(residuals, dim_bits)
        return cls(centroids, cutoffs, values, dim_bits)

    # ---- codes -----------------------------------------------------------------------------------

    def sa_encode(self, vectors: np.ndarray, block: int = 65536) -> np.ndarray:
        """``(n, dim)`` float -> ``(n, code_size)`` uint8: little-endian centroid id, then packed residual buckets."""
        out = np.empty((len(vectors), self.code_size), dtype=np.uint8)
        id_type = np.dtype("<u2") if self.id_bytes == 2 else np.dtype("<u4")
        for start in range(0, len(vectors), block):
            part = np.asarray(vectors[start : start + block], dtype=np.float32)
            ids = nearest_centroids(part, self.centroids)
            buckets = _bucketize(part - self.centroids[ids], self.cutoffs)
            out[start : start + len(part), : self.id_bytes] = ids.astype(id_type).view(np.uint8).reshape(len(part), -1)
            column = self.id_bytes
            for b, dims in self.sections:
                codes = buckets[:, dims]
                planes = [_pack(codes, b)] if b in BYTE_ALIGNED else [_pack(codes & 3, 2), _pack(codes >> 2, 1)]
                for plane in planes:
                    out[start : start + len(part), column : column + plane.shape[1]] = plane
                    column += plane.shape[1]
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
            ids, residual = self._split(codes, code_order=True)
            starts = np.asarray(offsets[:-1], dtype=np.int64)
            out = np.empty((len(queries), len(starts)), dtype=np.float32)
            for i, query in enumerate(queries):
                q = torch.from_numpy(np.ascontiguousarray(query, dtype=np.float32))
                sims = q[:, self.order] @ residual.T if not self._identity else q @ residual.T  # (Lq, n_tokens)
                sims += torch.index_select(q @ self._centroids_t.T, 1, ids)
                out[i] = np.maximum.reduceat(sims.numpy(), starts, axis=1).sum(axis=0)
            return out
        finally:
            torch.set_num_threads(previous)

    def _split(self, codes: np.ndarray, code_order: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Centroid ids ``(n,)`` and decoded residuals ``(n, dim)`` float32 of code rows (dimensions in code
        order, see the class docstring, when ``code_order``; in the vectors' order otherwise)."""
        codes = np.asarray(codes)
        if codes.ndim != 2 or codes.shape[1] != self.code_size:
            raise PlaidSettingsError(f"PLAID codes of shape {codes.shape}; expected (n, {self.code_size})")
        n = len(codes)
        ids = torch.from_numpy(self.centroid_ids(codes))
        residual_bytes = torch.from_numpy(np.ascontiguousarray(codes[:, self.id_bytes :])).to(torch.int32)
        parts = []
        for b, byte_start, n_bytes, table, base in self._decoders:
            section = residual_bytes[:, byte_start : byte_start + n_bytes]
            if b in BYTE_ALIGNED:
                index = section
            else:  # low plane: 2-bit codes, a byte per 4 dimensions; high plane: a bit per dimension
                low = section[:, : n_bytes * 2 // 3]
                high = section[:, n_bytes * 2 // 3 :]
                nibbles = torch.stack([high & 15, high >> 4], dim=2).reshape(n, -1)
                index = low | (nibbles << 8)
            # embedding() is the fastest row gather in torch on CPU (measured ~1.7x faster than indexing).
            parts.append(torch.nn.functional.embedding(index + base, table).reshape(n, -1))
        residual = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        if not code_order and not self._identity:
            residual = torch.index_select(residual, 1, self._inverse)
        return ids, residual

    # ---- files -----------------------------------------------------------------------------------

    def save(self, path: Path) -> None:
        # A codec of one width keeps format 2's scalar "nbits" (older code reads it); mixed widths add dim_bits.
        extra = {"dim_bits": self.dim_bits} if len(self.sections) > 1 else {}
        with open(path, "wb") as f:
            np.savez(f, centroids=self.centroids, cutoffs=self.cutoffs, values=self.values,
                     nbits=np.int64(self.dim_bits.max()), **extra)
            f.flush()
            os.fsync(f.fileno())

    @classmethod
    def load(cls, path: Path) -> PlaidCodec:
        with np.load(path, allow_pickle=False) as data:
            dim_bits = data["dim_bits"] if "dim_bits" in data.files else int(data["nbits"])
            return cls(data["centroids"], data["cutoffs"], data["values"], dim_bits)


def check_nbits(nbits: float) -> None:
    if isinstance(nbits, bool) or not isinstance(nbits, (int, float, np.integer, np.floating)) or not (
        NBITS[0] <= nbits <= NBITS[-1]
    ):
        raise PlaidSettingsError(
            f"plaid_nbits={nbits!r} is not a number of residual bits per dimension from {NBITS[0]} to {NBITS[-1]} "
            f"(whole: {NBITS}; a fraction such as 3.75 mixes the two widths around it)"
        )


def lloyd_max(residuals: np.ndarray, dim_bits: np.ndarray, iterations: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension scalar quantisers of ``residuals`` -> cutoffs ``(dim, L - 1)`` and values ``(dim, L)``
    (L = 2^max(dim_bits); a narrower dimension's spare cutoffs are +inf and its spare values repeat its
    last). Starts from equal-probability buckets decoded to their means (ColBERTv2's quantiser), then
    alternates cutoffs = midpoints between values, values = mean of each bucket (1-D k-means, which
    never raises the squared error). An empty bucket keeps its previous value. ``iterations`` defaults
    to :data:`LLOYD_ITERATIONS` (0: ColBERTv2's buckets, as this codec trained before format 3)."""
    iterations = LLOYD_ITERATIONS if iterations is None else iterations
    x = torch.from_numpy(np.ascontiguousarray(residuals.T, dtype=np.float32))  # (dim, n)
    dim, n = x.shape
    levels = 1 << int(dim_bits.max())
    cutoffs = np.full((dim, levels - 1), np.inf, dtype=np.float32)
    values = np.empty((dim, levels), dtype=np.float32)
    for b in np.unique(dim_bits):
        rows = np.flatnonzero(dim_bits == b)
        width = 1 << int(b)
        sorted_x = torch.sort(x[rows], dim=1).values  # buckets are runs of the sorted residuals
        prefix = torch.cat([torch.zeros(len(rows), 1, dtype=torch.float64), torch.cumsum(sorted_x.double(), dim=1)], dim=1)
        bounds = (torch.arange(width + 1, dtype=torch.float64) * n / width).long().expand(len(rows), -1)  # equal-probability
        val = None
        for _ in range(iterations + 1):
            counts = (bounds[:, 1:] - bounds[:, :-1]).double()
            sums = torch.gather(prefix, 1, bounds[:, 1:]) - torch.gather(prefix, 1, bounds[:, :-1])
            means = (sums / counts.clamp(min=1)).float()
            val = means if val is None else torch.where(counts > 0, means, val)
            val = torch.sort(val, dim=1).values
            cut = (val[:, 1:] + val[:, :-1]) / 2
            # A residual goes to bucket j when cut[j-1] < x <= cut[j] (as _bucketize does).
            inner = torch.searchsorted(sorted_x, cut.contiguous(), right=True)
            bounds = torch.cat([torch.zeros(len(rows), 1, dtype=torch.long), inner,
                                torch.full((len(rows), 1), n, dtype=torch.long)], dim=1)
        cutoffs[rows, : width - 1] = cut.numpy()
        values[rows, :width] = val.numpy()
        values[rows, width:] = val[:, -1:].numpy()
    return cutoffs, values


def _pack(codes: np.ndarray, b: int) -> np.ndarray:
    """``(n, m)`` codes of ``b`` (1, 2 or 4) bits -> ``(n, m * b / 8)`` bytes, ``8 / b`` codes per byte, the
    first in the low bits."""
    per_byte = 8 // b
    grouped = codes.reshape(len(codes), -1, per_byte).astype(np.uint8)
    return (grouped << (b * np.arange(per_byte, dtype=np.uint8))).sum(axis=2, dtype=np.uint8)


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
