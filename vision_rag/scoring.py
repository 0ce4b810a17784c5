"""Exact late-interaction (MaxSim) scoring, fast on CPU.

    score(q, d) = sum over query tokens i of max over page tokens j of <q_i, d_j>

Pages are *packed*: all token vectors of all pages concatenated into one ``(T, D)`` array (half
precision is the normal storage) with ``offsets`` of length ``N + 1``; page ``p`` owns rows
``offsets[p]:offsets[p + 1]``. Nothing is padded, so pages of different lengths (pooled pages, pages
with different prompt lengths) cost exactly their own tokens.

Why it is fast on this kind of CPU: half precision arithmetic on CPUs is emulated and slow, so pages
are converted to fp32 a chunk at a time (a few tens of thousands of tokens, so the fp32 copy and the
``(query tokens, chunk tokens)`` similarity block stay in cache-friendly sizes), every query token of
every query is multiplied against the chunk in ONE matrix product, and the per-page max and per-query
sum are reductions over that block (torch for the conversion and product, NumPy for the reductions).

On CUDA tensors :func:`maxsim` calls the Triton kernel in ``gemma_kernels.maxsim``.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import numpy as np
import torch

# Below this many multiply-adds a call runs on one thread: measured on the shared 2-core machine,
# small products and fp16 -> fp32 copies are 5-25x slower on two threads (the hand-off between
# threads costs more than the work, worse when other processes hold the cores).
SINGLE_THREAD_BELOW_MACS = 2_000_000_000

# Tokens converted to fp32 and scored per step. 16k tokens x 128 dims = 8 MB fp32; with 400 query
# tokens the similarity block is 26 MB. Measured on 2 cores: 8k-64k tokens are within a few percent.
DEFAULT_CHUNK_TOKENS = 16384

ArrayLike = np.ndarray | torch.Tensor


class ScoringError(ValueError):
    """Bad input to a scoring function (shapes, lengths, dtypes); the message says which and why."""


def _as_numpy(x: ArrayLike) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach()
        if x.device.type != "cpu":
            x = x.cpu()
        if x.dtype == torch.bfloat16:  # NumPy has no bf16; fp32 holds every bf16 value exactly
            x = x.float()
        return x.numpy()
    return np.asarray(x)


def pack_pages(pages: Sequence[ArrayLike], dtype=np.float16) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate per-page ``(n_i, D)`` token matrices into ``(vectors (T, D), offsets (N + 1,))``."""
    if len(pages) == 0:
        raise ScoringError("pack_pages got no pages; pass at least one (n_tokens, dim) matrix")
    arrays = [_as_numpy(p) for p in pages]
    dim = arrays[0].shape[-1]
    for i, a in enumerate(arrays):
        if a.ndim != 2 or a.shape[1] != dim or a.shape[0] == 0:
            raise ScoringError(
                f"page {i} has shape {tuple(a.shape)}; every page must be a non-empty (n_tokens, {dim}) matrix"
            )
    lengths = np.array([a.shape[0] for a in arrays], dtype=np.int64)
    offsets = np.zeros(len(arrays) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    return np.concatenate(arrays, axis=0).astype(dtype, copy=False), offsets


def _query_block(queries, query_lens=None) -> tuple[np.ndarray, np.ndarray]:
    """All query tokens as one fp32 ``(R, D)`` block plus row offsets ``(Q + 1,)`` per query."""
    if isinstance(queries, (np.ndarray, torch.Tensor)) and queries.ndim == 3:
        q = _as_numpy(queries).astype(np.float32, copy=False)
        lens = [q.shape[1]] * q.shape[0] if query_lens is None else [int(n) for n in _as_numpy(query_lens)]
        rows = [q[i, :n] for i, n in enumerate(lens)]
    elif isinstance(queries, (np.ndarray, torch.Tensor)) and queries.ndim == 2:
        rows = [_as_numpy(queries).astype(np.float32, copy=False)]
    else:
        rows = [_as_numpy(q).astype(np.float32, copy=False) for q in queries]
    if not rows:
        raise ScoringError("no queries given; pass a (Lq, D) matrix or a list of them")
    for i, r in enumerate(rows):
        if r.ndim != 2 or r.shape[0] == 0:
            raise ScoringError(f"query {i} has shape {tuple(r.shape)}; expected a non-empty (Lq, D) matrix")
    offsets = np.zeros(len(rows) + 1, dtype=np.int64)
    np.cumsum([r.shape[0] for r in rows], out=offsets[1:])
    return np.ascontiguousarray(np.concatenate(rows, axis=0)), offsets


def maxsim_packed(
    queries,
    vectors: ArrayLike,
    offsets: ArrayLike,
    *,
    query_lens=None,
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
    threads: int | None = None,
) -> np.ndarray:
    """Exact MaxSim of every query against every packed page -> ``(Q, N)`` float32.

    ``queries``: one ``(Lq, D)`` matrix, a list of them (lengths may differ), or a padded
    ``(Q, Lq, D)`` array with optional ``query_lens``. ``vectors``: ``(T, D)`` fp16/fp32 (a NumPy
    memmap works: only one chunk is read into memory at a time). ``offsets``: ``(N + 1,)``.
    ``threads``: torch threads for this call; None: one thread for small calls, torch's setting otherwise.
    """
    q_block, q_offsets = _query_block(queries, query_lens)
    vectors = _as_numpy(vectors)
    offsets = _as_numpy(offsets).astype(np.int64, copy=False)
    if vectors.ndim != 2 or vectors.shape[1] != q_block.shape[1]:
        raise ScoringError(
            f"page vectors have shape {tuple(vectors.shape)} but queries have dim {q_block.shape[1]}; "
            "queries and pages must come from the same embedder"
        )
    if offsets.ndim != 1 or offsets[0] != 0 or offsets[-1] != vectors.shape[0] or np.any(np.diff(offsets) <= 0):
        raise ScoringError(
            "offsets must start at 0, end at the number of token rows and increase strictly (no empty pages)"
        )
    n_pages = len(offsets) - 1
    rows = q_block.shape[0]
    previous = torch.get_num_threads()
    if threads is None:
        threads = 1 if rows * vectors.shape[0] * vectors.shape[1] < SINGLE_THREAD_BELOW_MACS else previous
    torch.set_num_threads(threads)
    try:
        return _maxsim_chunks(q_block, q_offsets, vectors, offsets, n_pages, rows, chunk_tokens)
    finally:
        torch.set_num_threads(previous)


def _maxsim_chunks(q_block, q_offsets, vectors, offsets, n_pages, rows, chunk_tokens) -> np.ndarray:
    out = np.empty((len(q_offsets) - 1, n_pages), dtype=np.float32)
    lengths = np.diff(offsets)
    queries = torch.from_numpy(q_block)
    fp32_buffer = torch.empty((max(chunk_tokens, int(lengths.max())), vectors.shape[1]), dtype=torch.float32)
    sim_buffer = torch.empty((rows * fp32_buffer.shape[0],), dtype=torch.float32)

    first = 0
    while first < n_pages:
        # Take as many whole pages as fit in the chunk (always at least one page).
        last = int(np.searchsorted(offsets, offsets[first] + chunk_tokens, side="right")) - 1
        last = min(max(last, first + 1), n_pages)
        t0, t1 = int(offsets[first]), int(offsets[last])
        n_tokens = t1 - t0
        chunk = fp32_buffer[:n_tokens]
        with warnings.catch_warnings():  # read-only memmaps: torch warns, but we only read
            warnings.simplefilter("ignore", UserWarning)
            chunk.copy_(torch.from_numpy(np.ascontiguousarray(vectors[t0:t1])))
        sim_t = sim_buffer[: rows * n_tokens].view(rows, n_tokens)
        torch.mm(queries, chunk.T, out=sim_t)
        sim = sim_t.numpy()
        chunk_lengths = lengths[first:last]
        if np.all(chunk_lengths == chunk_lengths[0]):  # common case: a free reshape, no index work
            page_max = sim.reshape(rows, last - first, int(chunk_lengths[0])).max(axis=2)
        else:
            page_max = np.maximum.reduceat(sim, offsets[first:last] - t0, axis=1)
        out[:, first:last] = np.add.reduceat(page_max, q_offsets[:-1], axis=0)
        first = last
    return out


def maxsim(queries, pages, *, query_lens=None, doc_lens=None) -> torch.Tensor:
    """Exact MaxSim -> ``(Q, N)`` float32 tensor.

    ``pages``: a list of ``(n_i, D)`` tensors or a padded ``(N, Ld, D)`` tensor with ``doc_lens``
    (packed pages go to :func:`maxsim_packed`). CUDA inputs use the Triton kernel of ``gemma_kernels.maxsim``.
    """
    if isinstance(pages, (torch.Tensor, np.ndarray)) and pages.ndim == 3:
        if isinstance(pages, torch.Tensor) and pages.is_cuda:
            return _maxsim_cuda(queries, pages, query_lens, doc_lens)
        lens = [pages.shape[1]] * pages.shape[0] if doc_lens is None else [int(n) for n in _as_numpy(doc_lens)]
        vectors, offsets = pack_pages([pages[i, :n] for i, n in enumerate(lens)], dtype=None)
    else:
        if len(pages) and isinstance(pages[0], torch.Tensor) and pages[0].is_cuda:
            padded, lens = _pad(pages)
            return _maxsim_cuda(queries, padded, query_lens, lens)
        vectors, offsets = pack_pages(pages, dtype=None)
    return torch.from_numpy(maxsim_packed(queries, vectors, offsets, query_lens=query_lens))


def _pad(tensors: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    lens = torch.tensor([t.shape[0] for t in tensors], device=tensors[0].device)
    return torch.nn.utils.rnn.pad_sequence(list(tensors), batch_first=True), lens


def _maxsim_cuda(queries, docs: torch.Tensor, query_lens, doc_lens) -> torch.Tensor:
    from gemma_kernels.maxsim import maxsim as maxsim_kernel  # imported lazily: only CUDA needs Triton

    if isinstance(queries, torch.Tensor) and queries.ndim == 2:
        queries = queries[None]
    elif not isinstance(queries, torch.Tensor):
        queries, query_lens = _pad([q.to(docs.device) for q in queries])
    return maxsim_kernel(queries, docs, query_lens=query_lens, doc_lens=doc_lens)


def top_k(scores: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices and values of the ``k`` best scores of a 1-D array, best first; ties keep lower index."""
    scores = _as_numpy(scores).astype(np.float32, copy=False)
    k = min(int(k), scores.shape[0])
    if k <= 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.float32)
    if k < scores.shape[0]:
        part = np.argpartition(-scores, k - 1)[:k]
        # argpartition may cut through a tie at the k-th value; resolve it by index so results are stable.
        kth = scores[part].min()
        tied_or_better = np.flatnonzero(scores >= kth)
        candidates = tied_or_better if len(tied_or_better) <= 4 * k + 64 else part
    else:
        candidates = np.arange(scores.shape[0])
    order = np.lexsort((candidates, -scores[candidates]))[:k]
    best = candidates[order]
    return best.astype(np.int64), scores[best]
