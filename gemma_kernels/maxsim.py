"""Late-interaction (ColBERT / ColPali) MaxSim scoring: the torch specification and a Triton kernel.

``queries`` is ``(Q, Lq, D)`` and ``docs`` ``(N, Ld, D)``, both padded (with zeros, or marked by
``query_lens`` ``(Q,)`` / ``doc_lens`` ``(N,)``). The score of query ``q`` against document ``n`` is

    score[q, n] = sum over valid query tokens i of  max over valid doc tokens j of  <queries[q, i], docs[n, j]>

returned as float32 ``(Q, N)``; products are accumulated in fp32 whatever the input dtype. Without
lengths every token is valid (zero padding then takes part in the max with a dot product of 0, as in
colpali-engine). A document with no valid token contributes 0 for every query token.
"""

from __future__ import annotations

import os

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - triton is a Linux dependency
    triton = None

__all__ = ["maxsim", "maxsim_reference", "maxsim_triton", "MaxSimArgumentError", "MAX_DIM"]

MAX_DIM = 256  # embedding widths the kernel takes in one tile (ColPali uses 128)
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class MaxSimArgumentError(ValueError):
    """Inputs no MaxSim implementation accepts (raised before anything is launched)."""


def _lengths(lens, count: int, max_len: int, device, name: str) -> torch.Tensor:
    if lens is None:
        return torch.full((count,), max_len, dtype=torch.int64, device=device)
    if not isinstance(lens, torch.Tensor) or lens.dim() != 1 or lens.shape[0] != count:
        raise MaxSimArgumentError(f"{name} must be a 1-D tensor of length {count}")
    if lens.dtype.is_floating_point or lens.dtype == torch.bool:
        raise MaxSimArgumentError(f"{name} must hold integers, got {lens.dtype}")
    lens = lens.to(device=device, dtype=torch.int64)
    if lens.numel() and (int(lens.min()) < 0 or int(lens.max()) > max_len):
        raise MaxSimArgumentError(f"{name} must lie in 0..{max_len} (the padded length)")
    return lens


def validate_maxsim_args(queries, docs, query_lens=None, doc_lens=None):
    """Check shapes, dtypes, devices and lengths; return the lengths as int64 tensors."""
    for name, t in (("queries", queries), ("docs", docs)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise MaxSimArgumentError(f"{name} must be a 3-D tensor (count, tokens, dim)")
        if not t.dtype.is_floating_point:
            raise MaxSimArgumentError(f"{name} must be floating point, got {t.dtype}")
    if queries.shape[2] != docs.shape[2]:
        raise MaxSimArgumentError(
            f"queries and docs embedding widths differ: {queries.shape[2]} vs {docs.shape[2]}")
    if queries.dtype != docs.dtype:
        raise MaxSimArgumentError(f"queries and docs dtypes differ: {queries.dtype} vs {docs.dtype}")
    if queries.device != docs.device:
        raise MaxSimArgumentError(f"queries and docs devices differ: {queries.device} vs {docs.device}")
    q_lens = _lengths(query_lens, queries.shape[0], queries.shape[1], queries.device, "query_lens")
    d_lens = _lengths(doc_lens, docs.shape[0], docs.shape[1], docs.device, "doc_lens")
    return q_lens, d_lens


def maxsim_reference(queries, docs, *, query_lens=None, doc_lens=None) -> torch.Tensor:
    """The specification (module docstring), in fp32 torch: float32 ``(Q, N)``."""
    q_lens, d_lens = validate_maxsim_args(queries, docs, query_lens, doc_lens)
    n_queries, q_tokens, _ = queries.shape
    n_docs, d_tokens, _ = docs.shape
    if d_tokens == 0 or q_tokens == 0:
        return torch.zeros(n_queries, n_docs, dtype=torch.float32, device=queries.device)
    sim = torch.einsum("qid,njd->qnij", queries.float(), docs.float())  # (Q, N, Lq, Ld)
    doc_valid = torch.arange(d_tokens, device=docs.device)[None, :] < d_lens[:, None]  # (N, Ld)
    sim = sim.masked_fill(~doc_valid[None, :, None, :], float("-inf"))
    best = sim.amax(-1)  # (Q, N, Lq)
    best = torch.where(doc_valid.any(-1)[None, :, None], best, torch.zeros((), device=best.device))
    query_valid = torch.arange(q_tokens, device=queries.device)[None, :] < q_lens[:, None]  # (Q, Lq)
    return (best * query_valid[:, None, :]).sum(-1)


if triton is not None:

    @triton.jit
    def _maxsim_kernel(
        QUERIES, DOCS, DOC_LENS, TOKEN_MAX,
        stride_qq, stride_qi, stride_qd, stride_dn, stride_dj, stride_dd, stride_tr, stride_tn,
        rows, q_tokens,
        DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_L: tl.constexpr,
        FP32: tl.constexpr,
    ):
        """One program: BLOCK_R query tokens (of any queries, flattened) against one document; writes
        each token's max similarity over the document's valid tokens."""
        pid_r = tl.program_id(0)
        n = tl.program_id(1).to(tl.int64)  # no int32 overflow on large collections
        offs_r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_d = tl.arange(0, BLOCK_D)
        offs_l = tl.arange(0, BLOCK_L)
        r_valid = offs_r < rows
        d_valid = offs_d < DIM
        query, token = (offs_r // q_tokens).to(tl.int64), offs_r % q_tokens
        q_ptrs = QUERIES + query[:, None] * stride_qq + token[:, None] * stride_qi + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=r_valid[:, None] & d_valid[None, :], other=0.0)
        doc_len = tl.load(DOC_LENS + n)
        doc_base = DOCS + n * stride_dn + offs_d[:, None] * stride_dd

        best = tl.full([BLOCK_R], float("-inf"), dtype=tl.float32)
        for start in range(0, doc_len, BLOCK_L):
            j = start + offs_l
            j_valid = j < doc_len
            d = tl.load(doc_base + j[None, :] * stride_dj, mask=d_valid[:, None] & j_valid[None, :], other=0.0)
            if FP32:  # exact fp32 products (the default would be TF32 on tensor cores)
                s = tl.dot(q, d, input_precision="ieee")
            else:
                s = tl.dot(q, d)
            s = tl.where(j_valid[None, :], s, float("-inf"))
            best = tl.maximum(best, tl.max(s, 1))
        best = tl.where(best == float("-inf"), 0.0, best)  # an empty document contributes 0
        tl.store(TOKEN_MAX + offs_r.to(tl.int64) * stride_tr + n * stride_tn, best, mask=r_valid)


def _interpreted() -> bool:
    return type(_maxsim_kernel).__name__ == "InterpretedFunction"


def maxsim_triton(queries, docs, *, query_lens=None, doc_lens=None) -> torch.Tensor:
    """The Triton kernel (CUDA, or CPU under ``TRITON_INTERPRET=1``); same arguments as the reference."""
    q_lens, d_lens = validate_maxsim_args(queries, docs, query_lens, doc_lens)
    dim = queries.shape[2]
    if not 1 <= dim <= MAX_DIM:
        raise MaxSimArgumentError(
            f"embedding width {dim} is not supported by the Triton kernel (1..{MAX_DIM}); use backend='torch'")
    if queries.dtype not in _KERNEL_DTYPES:
        raise MaxSimArgumentError(f"the Triton kernel takes float16, bfloat16 or float32, got {queries.dtype}")
    if triton is None:
        raise MaxSimArgumentError("backend='triton' needs the triton package (Linux); use backend='torch'")
    if not queries.is_cuda and not _interpreted():
        raise MaxSimArgumentError(
            f"backend='triton' on {queries.device} tensors needs TRITON_INTERPRET=1 set before triton is "
            "imported, CUDA tensors, or backend='torch'")
    n_queries, q_tokens, _ = queries.shape
    n_docs = docs.shape[0]
    rows = n_queries * q_tokens
    if rows == 0 or n_docs == 0:
        return torch.zeros(n_queries, n_docs, dtype=torch.float32, device=queries.device)
    token_max = torch.empty(rows, n_docs, dtype=torch.float32, device=queries.device)
    block_d = max(16, triton.next_power_of_2(dim))
    if queries.is_cuda:
        block_r = 128 if rows > 64 else 64
        block_l = 64 if block_d <= 128 else 32
        launch = dict(num_warps=4 if block_r == 64 else 8, num_stages=3)
    else:
        block_r, block_l, launch = 32, 32, {}
    grid = (triton.cdiv(rows, block_r), n_docs)
    _maxsim_kernel[grid](
        queries, docs, d_lens.to(torch.int32).contiguous(), token_max,
        *queries.stride(), *docs.stride(), *token_max.stride(),
        rows, q_tokens,
        DIM=dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_L=block_l, FP32=queries.dtype == torch.float32,
        **launch,
    )
    query_valid = torch.arange(q_tokens, device=queries.device)[None, :] < q_lens[:, None]  # (Q, Lq)
    return (token_max.view(n_queries, q_tokens, n_docs) * query_valid[:, :, None]).sum(1)


_BACKEND_ENV = "GEMMA_GROUNDING_MAXSIM"


def maxsim(queries, docs, *, query_lens=None, doc_lens=None, backend: str | None = None) -> torch.Tensor:
    """MaxSim scores ``(Q, N)`` in float32.

    ``backend``: ``"auto"`` (default, or the ``GEMMA_GROUNDING_MAXSIM`` environment variable) runs
    the Triton kernel on CUDA tensors and the torch reference elsewhere (CPU callers with large
    collections should use a chunked fp32 path such as vision_rag's); ``"torch"`` / ``"triton"`` force one.
    """
    backend = backend or os.environ.get(_BACKEND_ENV, "auto")
    if backend not in ("auto", "torch", "triton"):
        raise MaxSimArgumentError(f"maxsim backend must be auto, torch or triton, got {backend!r}")
    if backend == "auto":
        backend = "triton" if isinstance(queries, torch.Tensor) and queries.is_cuda else "torch"
    if backend == "torch":
        return maxsim_reference(queries, docs, query_lens=query_lens, doc_lens=doc_lens)
    return maxsim_triton(queries, docs, query_lens=query_lens, doc_lens=doc_lens)
