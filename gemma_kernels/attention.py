"""Attention for every Gemma-family pattern: the plain-torch specification and the entry point.

Shapes: ``q`` is ``(batch, q_heads, q_len, head_dim)``; ``k`` and ``v`` are
``(batch, kv_heads, kv_len, head_dim)`` with ``kv_heads`` dividing ``q_heads`` (GQA/MQA, never copied).

Which keys a query sees. Query ``i`` of row ``b`` sits at absolute position ``p = q_offset[b] + i``
(``q_offset`` lets a chunk of queries start inside a longer KV cache). Key ``j`` is visible iff

- ``j < kv_lens[b]`` (per-row valid length; keys past it are padding), and
- ``causal`` is False, or ``j <= p`` and (``window`` is None or ``p - window < j``: a sliding window
  of ``window`` keys ending at ``p``), or ``j < prefix_lens[b]`` and ``p < prefix_lens[b]``
  (prefix-LM: the first ``P_b`` tokens attend to each other bidirectionally, whatever the window,
  as transformers' PaliGemma does; the rest is causal), and
- without ``causal``, ``window`` is None or ``p - window < j``.

Scores are ``softcap * tanh(q.k * scale / softcap)`` when ``softcap`` is set (Gemma 2), else
``q.k * scale``; softmax is taken in fp32 over visible keys. A query that sees no key at all outputs
zeros (only padding queries can be in that state).

Implementations, all taking the same arguments: :func:`attention_reference` (plain torch, the
specification); :func:`attention_prefill_triton`, a FlashAttention-2-style forward kernel (online
softmax over key tiles, the score matrix never materialised, fully hidden key tiles skipped, masks
built only on edge tiles); ``gemma_kernels.decode.decode_attention_triton``, a split-K kernel for one query
per row. :func:`attention` picks one (Triton on CUDA, torch elsewhere). The kernels take head dims
16..256 (padded to a power-of-two tile, so 72 works), fp16/bf16/fp32, accumulating in fp32.
"""

from __future__ import annotations

import os

import torch

try:  # triton is a Linux dependency; the torch path works without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = ["attention", "attention_reference", "attention_triton", "attention_prefill_triton",
           "validate_attention_args", "AttentionArgumentError", "MIN_HEAD_DIM", "MAX_HEAD_DIM"]


class AttentionArgumentError(ValueError):
    """Arguments that no attention implementation accepts (raised before anything is launched)."""


def _check_row_arg(value, batch: int, name: str) -> None:
    """A per-row argument is None, an int (every row) or a 1-D integer tensor of length ``batch``."""
    if value is None or isinstance(value, int):
        return
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != batch:
        raise AttentionArgumentError(f"{name} must be an int or a 1-D tensor of length batch={batch}")
    if value.dtype.is_floating_point or value.dtype == torch.bool:
        raise AttentionArgumentError(f"{name} must hold integers, got {value.dtype}")


def _as_row_tensor(value, batch: int, device, name: str) -> torch.Tensor | None:
    _check_row_arg(value, batch, name)
    if value is None:
        return None
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    return value.to(device=device, dtype=torch.int64)


def validate_attention_args(q, k, v, *, window=None, softcap=None) -> None:
    """Check shapes, dtypes and devices; raise :class:`AttentionArgumentError` naming the problem."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise AttentionArgumentError(f"{name} must be a 4-D tensor (batch, heads, seq, head_dim)")
    if not (q.dtype == k.dtype == v.dtype):
        raise AttentionArgumentError(f"q, k, v dtypes differ: {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise AttentionArgumentError(f"q, k, v devices differ: {q.device}, {k.device}, {v.device}")
    if k.shape != v.shape:
        raise AttentionArgumentError(f"k and v shapes differ: {tuple(k.shape)} vs {tuple(v.shape)}")
    if q.shape[0] != k.shape[0] or q.shape[3] != k.shape[3]:
        raise AttentionArgumentError(
            f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on batch or head_dim")
    if q.shape[1] % k.shape[1] != 0:
        raise AttentionArgumentError(
            f"kv heads ({k.shape[1]}) must divide query heads ({q.shape[1]})")
    if window is not None and window < 1:
        raise AttentionArgumentError(f"window must be >= 1, got {window}")
    if softcap is not None and softcap <= 0:
        raise AttentionArgumentError(f"softcap must be > 0, got {softcap}")


def visible_mask(batch: int, q_len: int, kv_len: int, *, device, causal: bool = True,
                 window: int | None = None, prefix_lens=None, q_offset=0, kv_lens=None) -> torch.Tensor:
    """Boolean ``(batch, 1, q_len, kv_len)`` mask of the keys each query sees (module docstring)."""
    offset = _as_row_tensor(q_offset, batch, device, "q_offset")
    qpos = offset[:, None] + torch.arange(q_len, device=device)[None, :]  # (B, Lq)
    kpos = torch.arange(kv_len, device=device)
    qpos, kpos = qpos[:, :, None], kpos[None, None, :]  # (B, Lq, 1), (1, 1, Lk)
    mask = torch.ones(batch, q_len, kv_len, dtype=torch.bool, device=device)
    in_window = (kpos > qpos - window) if window is not None else None
    if causal:
        allowed = kpos <= qpos
        if in_window is not None:
            allowed = allowed & in_window
        prefix = _as_row_tensor(prefix_lens, batch, device, "prefix_lens")
        if prefix is not None:
            p = prefix[:, None, None]
            allowed = allowed | ((kpos < p) & (qpos < p))
        mask &= allowed
    elif in_window is not None:
        mask &= in_window
    lens = _as_row_tensor(kv_lens, batch, device, "kv_lens")
    if lens is not None:
        mask &= kpos < lens[:, None, None]
    return mask[:, None]


def attention_reference(q, k, v, *, scale: float | None = None, causal: bool = True,
                        window: int | None = None, softcap: float | None = None, prefix_lens=None,
                        q_offset=0, kv_lens=None) -> torch.Tensor:
    """The specification (module docstring), in fp32 torch; returns ``q``'s dtype."""
    validate_attention_args(q, k, v, window=window, softcap=softcap)
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    scale = head_dim ** -0.5 if scale is None else scale
    # (B, Hkv, G*Lq, D) @ (B, Hkv, D, Lk): query heads of a group share their KV head without a copy.
    qg = q.float().reshape(batch, kv_heads, group * q_len, head_dim)
    scores = torch.matmul(qg, k.float().transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    scores = scores.view(batch, kv_heads, group, q_len, kv_len)
    mask = visible_mask(batch, q_len, kv_len, device=q.device, causal=causal, window=window,
                        prefix_lens=prefix_lens, q_offset=q_offset, kv_lens=kv_lens)
    mask = mask[:, :, None]  # (B, 1, 1, Lq, Lk)
    # The dtype's lowest value rather than -inf: a query that sees no key then gets a finite (uniform)
    # softmax that the next line zeroes, so autograd through it gives zero gradients, never NaN.
    scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    probs = torch.softmax(scores, dim=-1)
    probs = torch.where(mask.any(-1, keepdim=True), probs, torch.zeros((), dtype=probs.dtype, device=q.device))
    out = torch.matmul(probs.view(batch, kv_heads, group * q_len, kv_len), v.float())
    return out.view(batch, q_heads, q_len, head_dim).to(q.dtype)


# "auto": Triton kernels on CUDA tensors, the torch path elsewhere. "torch" / "triton" force one.
_BACKEND_ENV = "GEMMA_GROUNDING_ATTENTION"


def _resolve_backend(backend: str | None, q: torch.Tensor) -> str:
    backend = backend or os.environ.get(_BACKEND_ENV, "auto")
    if backend not in ("auto", "torch", "triton"):
        raise AttentionArgumentError(f"attention backend must be auto, torch or triton, got {backend!r}")
    if backend == "auto":
        return "triton" if q.is_cuda else "torch"
    return backend


def attention(q, k, v, *, scale: float | None = None, causal: bool = True, window: int | None = None,
              softcap: float | None = None, prefix_lens=None, q_offset=0, kv_lens=None,
              backend: str | None = None) -> torch.Tensor:
    """The one attention entry point the models call.

    ``backend``: ``"auto"`` (default; also settable with the ``GEMMA_GROUNDING_ATTENTION``
    environment variable) runs the Triton kernels on CUDA and the torch path elsewhere; ``"torch"``
    or ``"triton"`` force one (``"triton"`` on CPU needs ``TRITON_INTERPRET=1``).
    """
    kwargs = dict(scale=scale, causal=causal, window=window, softcap=softcap, prefix_lens=prefix_lens,
                  q_offset=q_offset, kv_lens=kv_lens)
    if _resolve_backend(backend, q) == "torch":
        return attention_reference(q, k, v, **kwargs)
    return _attention_triton(q, k, v, **kwargs)


# ---------------------------------------------------------------------------------------------------
# Triton kernels
# ---------------------------------------------------------------------------------------------------

# Head dims the kernels take: one padded power-of-two tile of at least 16 (tl.dot's smallest K) and
# at most 256 (q, k, v tiles plus the fp32 accumulator must fit in shared memory and registers).
MIN_HEAD_DIM, MAX_HEAD_DIM = 16, 256
_KERNEL_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
_LOG2E = 1.4426950408889634


def validate_kernel_args(q, k, v, *, window=None, softcap=None, prefix_lens=None, q_offset=0,
                         kv_lens=None) -> None:
    """Everything the reference checks plus what only the kernels need; raises before any launch."""
    validate_attention_args(q, k, v, window=window, softcap=softcap)
    for name, value in (("prefix_lens", prefix_lens), ("q_offset", q_offset), ("kv_lens", kv_lens)):
        _check_row_arg(value, q.shape[0], name)
    head_dim = q.shape[3]
    if not MIN_HEAD_DIM <= head_dim <= MAX_HEAD_DIM:
        raise AttentionArgumentError(
            f"head_dim {head_dim} is not supported by the Triton kernels (supported: {MIN_HEAD_DIM}.."
            f"{MAX_HEAD_DIM}, e.g. 64, 72, 128, 256); use backend='torch' for other head dims")
    if q.dtype not in _KERNEL_DTYPES:
        raise AttentionArgumentError(
            f"the Triton kernels take float16, bfloat16 or float32, got {q.dtype}; cast the inputs first")
    if triton is None:
        raise AttentionArgumentError("backend='triton' needs the triton package (Linux); use backend='torch'")
    if not q.is_cuda and not _interpreted(_prefill_kernel):
        raise AttentionArgumentError(
            f"backend='triton' on {q.device} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, move the tensors to CUDA, or use backend='torch'")


def _interpreted(kernel) -> bool:
    return type(kernel).__name__ == "InterpretedFunction"


def _row_args(q, k, prefix_lens, q_offset, kv_lens) -> dict:
    """Kernel arguments for the per-row values (query start, valid KV length, prefix length).

    An int (the same for every row) goes by value with its ``ROWS_*`` flag off, so a decode step
    builds no tensor and launches nothing but the kernels; a per-row tensor goes by pointer (any
    integer dtype, read as int32). ``q`` stands in as the pointer a kernel never reads.
    """
    kv_len = k.shape[2]
    args = {}
    for name, value, default in (("q_offset", q_offset, 0), ("kv_lens", kv_lens, kv_len),
                                 ("prefix", prefix_lens, 0)):
        value = default if value is None else value
        per_row = isinstance(value, torch.Tensor)
        if name == "kv_lens" and not per_row:
            value = min(int(value), kv_len)  # keys past the tensor do not exist
        args[name.upper()] = value.to(q.device) if per_row else q
        args[f"{name}_all"] = 0 if per_row else int(value)
        args[f"ROWS_{name.upper()}"] = per_row
    return args


def _kernel_flags(causal, window, softcap, prefix_lens, scale, head_dim):
    """Constants shared by the prefill and decode kernels.

    Scores are kept in base-2 units (exp2 is the fast exponential): without softcap the kernel
    multiplies q.k by ``scale * log2(e)``; with softcap it computes ``cap * tanh(q.k * scale / cap)``
    and then multiplies by ``log2(e)``.
    """
    scale = head_dim ** -0.5 if scale is None else float(scale)
    has_softcap = softcap is not None
    return dict(
        qk_scale=scale / softcap if has_softcap else scale * _LOG2E,
        softcap_log2=float(softcap) * _LOG2E if has_softcap else 1.0,
        window=int(window) if window is not None else 0,
        CAUSAL=bool(causal), HAS_WINDOW=window is not None, HAS_SOFTCAP=has_softcap,
        HAS_PREFIX=bool(causal) and prefix_lens is not None,
    )


if triton is not None:

    @triton.jit
    def _scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr, FP32: tl.constexpr):
        """``(M, N)`` fp32 scores in base-2 units from a ``(M, D)`` q tile and a ``(D, N)`` k tile."""
        if FP32:  # exact fp32 products (the default would be TF32 on tensor cores)
            s = tl.dot(q, k, input_precision="ieee")
        else:
            s = tl.dot(q, k)
        s = s * qk_scale
        if HAS_SOFTCAP:
            # tanh(x) = 1 - 2 / (exp(2x) + 1): no NaN at either end (exp overflows to inf -> 1).
            s = softcap_log2 * (1.0 - 2.0 / (tl.exp(2.0 * s) + 1.0))
        return s

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, FP32: tl.constexpr):
        """Fold one tile of base-2 scores ``s`` and values ``v`` into the running max, sum and output."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row that has seen no visible key yet keeps m = -inf; subtract 0 instead (no NaN).
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32:
            acc = acc * alpha[:, None] + tl.dot(p, v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        return m_new, l_i, acc

    @triton.jit
    def _visible(qpos, kpos, kv_len, prefix, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr,
                 HAS_PREFIX: tl.constexpr):
        """Which keys each query sees (the module docstring's rule); qpos ``(M, 1)``, kpos ``(1, N)``."""
        mask = kpos < kv_len
        if CAUSAL:
            allowed = kpos <= qpos
            if HAS_WINDOW:
                allowed = allowed & (kpos > qpos - window)
            if HAS_PREFIX:
                # prefix pairs see each other whatever the window (transformers' PaliGemma rule)
                allowed = allowed | ((kpos < prefix) & (qpos < prefix))
            mask = mask & allowed
        elif HAS_WINDOW:
            mask = mask & (kpos > qpos - window)
        return mask

    @triton.jit
    def _row_values(Q_OFFSET, KV_LENS, PREFIX, b, q_offset, kv_len, prefix, kv_len_total,
                    ROWS_Q_OFFSET: tl.constexpr, ROWS_KV_LENS: tl.constexpr, ROWS_PREFIX: tl.constexpr):
        """Row ``b``'s query start, valid KV length (never past the tensor) and prefix length."""
        if ROWS_Q_OFFSET:
            q_offset = tl.load(Q_OFFSET + b).to(tl.int32)
        if ROWS_KV_LENS:
            kv_len = tl.minimum(tl.load(KV_LENS + b).to(tl.int32), kv_len_total)
        if ROWS_PREFIX:
            prefix = tl.load(PREFIX + b).to(tl.int32)
        return q_offset, kv_len, prefix

    @triton.jit
    def _key_range(first_pos, last_pos, kv_len, prefix, window, CAUSAL: tl.constexpr,
                   HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr):
        """Keys ``[lo, hi)`` that queries at positions ``first_pos..last_pos`` can see at all."""
        hi = kv_len
        if CAUSAL:
            causal_hi = last_pos + 1
            if HAS_PREFIX:
                # queries inside the prefix see the whole prefix
                causal_hi = tl.maximum(causal_hi, tl.where(first_pos < prefix, prefix, 0))
            hi = tl.minimum(hi, causal_hi)
        lo = hi * 0
        if HAS_WINDOW:
            lo = tl.maximum(first_pos - window + 1, 0)
            if CAUSAL and HAS_PREFIX:
                # a query inside the prefix sees the prefix from its start
                lo = tl.where(first_pos < prefix, 0, lo)
        return lo, hi

    @triton.jit
    def _prefill_kernel(
        Q, K, V, OUT, LSE, Q_OFFSET, KV_LENS, PREFIX,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        q_len, kv_len_total, q_heads, group, qk_scale, softcap_log2, window,
        q_offset_all, kv_lens_all, prefix_all,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_PREFIX: tl.constexpr, FP32: tl.constexpr,
        ROWS_Q_OFFSET: tl.constexpr, ROWS_KV_LENS: tl.constexpr, ROWS_PREFIX: tl.constexpr,
        STORE_LSE: tl.constexpr = False,
    ):
        """One program: BLOCK_M queries of one (row, query head), streaming its KV head's keys in
        BLOCK_N tiles with an online softmax (FlashAttention-2 forward). With ``STORE_LSE`` it also
        writes each query's base-2 log-sum-exp of scores to ``LSE`` ``(batch * q_heads, q_len)`` fp32
        (+inf for a query that sees no key), which the backward kernels need."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // q_heads
        h = pid_bh % q_heads
        kv_h = h // group  # GQA/MQA: index the shared KV head, never copy it
        b64, h64, kv_h64 = b.to(tl.int64), h.to(tl.int64), kv_h.to(tl.int64)  # no int32 overflow on big caches

        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM  # head dims like 72 live in a 128-wide padded tile
        m_valid = offs_m < q_len

        q_offset, kv_len, prefix = _row_values(Q_OFFSET, KV_LENS, PREFIX, b, q_offset_all, kv_lens_all, prefix_all,
                                               kv_len_total, ROWS_Q_OFFSET, ROWS_KV_LENS, ROWS_PREFIX)
        qpos = q_offset + offs_m

        q_ptrs = Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd
        q = tl.load(q_ptrs, mask=m_valid[:, None] & d_valid[None, :], other=0.0)
        k_base = K + b64 * stride_kb + kv_h64 * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + b64 * stride_vb + kv_h64 * stride_vh + offs_d[None, :] * stride_vd

        first_pos = q_offset + pid_m * BLOCK_M
        last_pos = q_offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
        lo, hi = _key_range(first_pos, last_pos, kv_len, prefix, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)

        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            kpos = start_n + offs_n
            k_valid = kpos < hi
            k = tl.load(k_base + kpos[None, :] * stride_kn, mask=d_valid[:, None] & k_valid[None, :], other=0.0)
            s = _scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP, FP32)
            # Most tiles of a long causal or windowed sequence are seen in full by every query of
            # the block; only tiles on the diagonal, the window's edge or the padding build a mask.
            needs_mask = start_n + BLOCK_N > hi
            if CAUSAL:
                needs_mask = needs_mask | (start_n + BLOCK_N - 1 > first_pos)
            if HAS_WINDOW:
                needs_mask = needs_mask | (start_n <= last_pos - window)
            if needs_mask:
                visible = _visible(qpos[:, None], kpos[None, :], kv_len, prefix, window, CAUSAL, HAS_WINDOW,
                                   HAS_PREFIX)
                s = tl.where(visible, s, float("-inf"))
            v = tl.load(v_base + kpos[:, None] * stride_vn, mask=k_valid[:, None] & d_valid[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32)

        # Queries that see no key at all output zeros (the reference's rule).
        l_safe = tl.where(l_i > 0.0, l_i, 1.0)
        out = acc / l_safe[:, None]
        o_ptrs = OUT + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
        tl.store(o_ptrs, out.to(OUT.dtype.element_ty), mask=m_valid[:, None] & d_valid[None, :])
        if STORE_LSE:
            lse = tl.where(l_i > 0.0, m_i + tl.math.log2(l_safe), float("inf"))
            tl.store(LSE + pid_bh.to(tl.int64) * q_len + offs_m, lse, mask=m_valid)

else:  # pragma: no cover
    _prefill_kernel = None


def _prefill_config(head_dim_block: int, on_gpu: bool, fp32: bool = False) -> dict:
    """Tile sizes and launch parameters per padded head dim.

    On a GPU the tiles are sized so that the q tile, the pipelined k/v tiles and the layout
    conversions fit Ampere's and Hopper's shared memory (fp32 inputs take twice the bytes, so
    smaller tiles); under the interpreter 32x32 tiles keep the Python loop short and still make the
    odd test lengths (33, 130) straddle several tiles.
    """
    if not on_gpu:
        return dict(BLOCK_M=32, BLOCK_N=32)
    if fp32:
        return dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, num_stages=2)
    if head_dim_block <= 64:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)
    if head_dim_block <= 128:
        return dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, num_stages=3)
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=2)


def attention_prefill_triton(q, k, v, *, scale=None, causal=True, window=None, softcap=None,
                             prefix_lens=None, q_offset=0, kv_lens=None) -> torch.Tensor:
    """The FlashAttention-2-style Triton kernel for any ``q_len`` (same arguments as the reference).

    Differentiable: when autograd needs gradients of ``q``, ``k`` or ``v`` the forward also keeps each
    query's log-sum-exp and the backward runs the two Triton backward kernels (section below).
    """
    validate_kernel_args(q, k, v, window=window, softcap=softcap, prefix_lens=prefix_lens,
                         q_offset=q_offset, kv_lens=kv_lens)
    kwargs = dict(scale=scale, causal=causal, window=window, softcap=softcap, prefix_lens=prefix_lens,
                  q_offset=q_offset, kv_lens=kv_lens)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _PrefillAttention.apply(q, k, v, kwargs)
    return _prefill_forward(q, k, v, **kwargs)[0]


def _prefill_forward(q, k, v, *, scale, causal, window, softcap, prefix_lens, q_offset, kv_lens,
                     store_lse: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch the prefill kernel on validated arguments; ``(out, lse or None)``."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = torch.empty_like(q)
    lse = torch.empty((batch * q_heads, q_len), dtype=torch.float32, device=q.device) if store_lse else None
    if q_len == 0 or batch == 0:
        return out, lse
    rows = _row_args(q, k, prefix_lens, q_offset, kv_lens)
    flags = _kernel_flags(causal, window, softcap, prefix_lens, scale, head_dim)
    block_d = max(triton.next_power_of_2(head_dim), MIN_HEAD_DIM)
    config = _prefill_config(block_d, q.is_cuda, fp32=q.dtype == torch.float32)
    grid = (triton.cdiv(q_len, config["BLOCK_M"]), batch * q_heads)
    _prefill_kernel[grid](
        q, k, v, out, out if lse is None else lse, rows.pop("Q_OFFSET"), rows.pop("KV_LENS"), rows.pop("PREFIX"),
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        q_len, kv_len, q_heads, q_heads // kv_heads, flags.pop("qk_scale"), flags.pop("softcap_log2"),
        flags.pop("window"), rows.pop("q_offset_all"), rows.pop("kv_lens_all"), rows.pop("prefix_all"),
        HEAD_DIM=head_dim, BLOCK_D=block_d, FP32=q.dtype == torch.float32, **flags, **rows, **config,
        STORE_LSE=store_lse,
    )
    return out, lse


def attention_triton(q, k, v, *, scale=None, causal=True, window=None, softcap=None, prefix_lens=None,
                     q_offset=0, kv_lens=None) -> torch.Tensor:
    """The Triton path: the split-K decode kernel for one query per row (inference), the prefill kernel
    otherwise (and whenever gradients are needed)."""
    kwargs = dict(scale=scale, causal=causal, window=window, softcap=softcap, prefix_lens=prefix_lens,
                  q_offset=q_offset, kv_lens=kv_lens)
    validate_kernel_args(q, k, v, window=window, softcap=softcap, prefix_lens=prefix_lens,
                         q_offset=q_offset, kv_lens=kv_lens)
    needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if q.shape[2] == 1 and not needs_grad:
        from .decode import decode_attention_triton  # decode.py builds on this module

        return decode_attention_triton(q, k, v, **kwargs)
    return attention_prefill_triton(q, k, v, **kwargs)


_attention_triton = attention_triton


# ---------------------------------------------------------------------------------------------------
# Backward (FlashAttention-2): gradients of the prefill kernel
# ---------------------------------------------------------------------------------------------------
#
# With p = softmax(sigma) over visible keys, sigma = z * scale (z = q.k) or cap * tanh(z * scale / cap)
# with softcap, out = p v, and the forward's log-sum-exp per query (so p is recomputed tile by tile,
# never stored):
#   dv_j = sum_i p_ij do_i        dp_ij = do_i . v_j        delta_i = sum_j p_ij dp_ij = do_i . out_i
#   dsigma_ij = p_ij (dp_ij - delta_i)
#   dz_ij = dsigma_ij * scale * (1 - tanh^2)   (softcap; tanh = sigma / cap), else dsigma_ij * scale
#   dq_i = sum_j dz_ij k_j        dk_j = sum_i dz_ij q_i  (summed over the query heads sharing the KV head)
# One kernel owns a tile of keys of one KV head (dk, dv; loops over the group's query heads and the
# queries that can see the tile); the other owns a tile of queries (dq; loops over the keys it sees).


def _backward_config(head_dim_block: int, on_gpu: bool, fp32: bool = False) -> dict:
    """Tiles of the backward kernels. Each program holds two key tiles, two query tiles and two fp32
    accumulators, so the tiles are smaller than the forward's; under the interpreter 32x32 as there."""
    if not on_gpu or fp32:
        return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1) if on_gpu else dict(BLOCK_M=32, BLOCK_N=32)
    if head_dim_block <= 64:
        return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=2)
    if head_dim_block <= 128:
        return dict(BLOCK_M=32, BLOCK_N=64, num_warps=4, num_stages=2)
    return dict(BLOCK_M=32, BLOCK_N=32, num_warps=4, num_stages=1)


if triton is not None:

    @triton.jit
    def _dot(a, b, FP32: tl.constexpr):
        if FP32:
            return tl.dot(a, b, input_precision="ieee")
        return tl.dot(a, b)

    @triton.jit
    def _query_range(n_first, n_last, q_offset, q_len, prefix, window, CAUSAL: tl.constexpr,
                     HAS_WINDOW: tl.constexpr, HAS_PREFIX: tl.constexpr):
        """Query indices ``[lo, hi)`` that can see any key at positions ``n_first..n_last`` (the
        inverse of :func:`_key_range`)."""
        lo = q_offset * 0
        hi = q_len + lo
        if CAUSAL:
            lo = tl.maximum(n_first - q_offset, 0)  # key j is seen from position j on
            if HAS_WINDOW:
                hi = tl.minimum(hi, n_last + window - q_offset)  # ... until position j + window - 1
            if HAS_PREFIX:
                # prefix queries see every prefix key
                lo = tl.where(n_first < prefix, 0, lo)
                hi = tl.where(n_first < prefix, tl.maximum(hi, tl.minimum(prefix - q_offset, q_len)), hi)
        elif HAS_WINDOW:
            hi = tl.minimum(hi, n_last + window - q_offset)
        return lo, hi

    @triton.jit
    def _score_grad(s, p, dp, delta, sm_scale, softcap_log2, HAS_SOFTCAP: tl.constexpr):
        """d loss / d(q.k) from base-2 scores ``s``, probabilities ``p`` and ``dp = do . v``."""
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            t = s / softcap_log2  # tanh(z * scale / cap)
            ds = ds * (1.0 - t * t)
        return ds * sm_scale

    @triton.jit
    def _prefill_bwd_dkdv_kernel(
        Q, K, V, DO, LSE, DELTA, DK, DV, Q_OFFSET, KV_LENS, PREFIX,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_gb, stride_gh, stride_gn, stride_gd,
        q_len, kv_len_total, q_heads, kv_heads, group, qk_scale, softcap_log2, sm_scale, window,
        q_offset_all, kv_lens_all, prefix_all,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_PREFIX: tl.constexpr, FP32: tl.constexpr,
        ROWS_Q_OFFSET: tl.constexpr, ROWS_KV_LENS: tl.constexpr, ROWS_PREFIX: tl.constexpr,
    ):
        """One program: dk and dv of BLOCK_N keys of one (row, KV head). ``stride_o*`` are dO's strides,
        ``stride_g*`` dK's and dV's (allocated alike)."""
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // kv_heads
        kv_h = pid_bh % kv_heads
        b64, kv_h64 = b.to(tl.int64), kv_h.to(tl.int64)
        q_offset, kv_len, prefix = _row_values(Q_OFFSET, KV_LENS, PREFIX, b, q_offset_all, kv_lens_all, prefix_all,
                                               kv_len_total, ROWS_Q_OFFSET, ROWS_KV_LENS, ROWS_PREFIX)
        n_first = pid_n * BLOCK_N
        offs_n = n_first + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        n_valid = offs_n < kv_len
        kv_mask = d_valid[:, None] & n_valid[None, :]
        k_t = tl.load(K + b64 * stride_kb + kv_h64 * stride_kh + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                      mask=kv_mask, other=0.0)
        v_t = tl.load(V + b64 * stride_vb + kv_h64 * stride_vh + offs_n[None, :] * stride_vn + offs_d[:, None] * stride_vd,
                      mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        n_last = tl.minimum(n_first + BLOCK_N, kv_len) - 1
        lo, hi = _query_range(n_first, n_last, q_offset, q_len, prefix, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
        hi = tl.where(n_first < kv_len, hi, lo)  # a tile of padding keys: no gradient
        for g in range(group):
            h64 = (kv_h * group + g).to(tl.int64)
            row = (b64 * q_heads + h64) * q_len
            q_base = Q + b64 * stride_qb + h64 * stride_qh + offs_d[None, :] * stride_qd
            do_base = DO + b64 * stride_ob + h64 * stride_oh + offs_d[None, :] * stride_od
            for start_m in range(lo, hi, BLOCK_M):
                offs_m = start_m + offs_m0
                m_valid = offs_m < hi
                q_mask = m_valid[:, None] & d_valid[None, :]
                q = tl.load(q_base + offs_m[:, None] * stride_qm, mask=q_mask, other=0.0)
                do = tl.load(do_base + offs_m[:, None] * stride_om, mask=q_mask, other=0.0)
                lse = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf"))
                delta = tl.load(DELTA + row + offs_m, mask=m_valid, other=0.0)
                s = _scores(q, k_t, qk_scale, softcap_log2, HAS_SOFTCAP, FP32)
                visible = _visible((q_offset + offs_m)[:, None], offs_n[None, :], kv_len, prefix, window, CAUSAL,
                                   HAS_WINDOW, HAS_PREFIX) & m_valid[:, None]
                p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
                dv += _dot(tl.trans(p.to(do.dtype)), do, FP32)
                dp = _dot(do, v_t, FP32)
                ds = _score_grad(s, p, dp, delta, sm_scale, softcap_log2, HAS_SOFTCAP)
                dk += _dot(tl.trans(ds.to(q.dtype)), q, FP32)
        out_mask = n_valid[:, None] & d_valid[None, :]
        g_off = b64 * stride_gb + kv_h64 * stride_gh + offs_n[:, None] * stride_gn + offs_d[None, :] * stride_gd
        tl.store(DK + g_off, dk.to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + g_off, dv.to(DV.dtype.element_ty), mask=out_mask)

    @triton.jit
    def _prefill_bwd_dq_kernel(
        Q, K, V, DO, LSE, DELTA, DQ, Q_OFFSET, KV_LENS, PREFIX,
        stride_qb, stride_qh, stride_qm, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        stride_ob, stride_oh, stride_om, stride_od,
        stride_gb, stride_gh, stride_gm, stride_gd,
        q_len, kv_len_total, q_heads, group, qk_scale, softcap_log2, sm_scale, window,
        q_offset_all, kv_lens_all, prefix_all,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_PREFIX: tl.constexpr, FP32: tl.constexpr,
        ROWS_Q_OFFSET: tl.constexpr, ROWS_KV_LENS: tl.constexpr, ROWS_PREFIX: tl.constexpr,
    ):
        """One program: dq of BLOCK_M queries of one (row, query head), over the keys they see."""
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // q_heads
        h = pid_bh % q_heads
        kv_h = h // group
        b64, h64, kv_h64 = b.to(tl.int64), h.to(tl.int64), kv_h.to(tl.int64)
        q_offset, kv_len, prefix = _row_values(Q_OFFSET, KV_LENS, PREFIX, b, q_offset_all, kv_lens_all, prefix_all,
                                               kv_len_total, ROWS_Q_OFFSET, ROWS_KV_LENS, ROWS_PREFIX)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_valid = offs_d < HEAD_DIM
        m_valid = offs_m < q_len
        q_mask = m_valid[:, None] & d_valid[None, :]
        q = tl.load(Q + b64 * stride_qb + h64 * stride_qh + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    mask=q_mask, other=0.0)
        do = tl.load(DO + b64 * stride_ob + h64 * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                     mask=q_mask, other=0.0)
        row = (b64 * q_heads + h64) * q_len
        lse = tl.load(LSE + row + offs_m, mask=m_valid, other=float("inf"))
        delta = tl.load(DELTA + row + offs_m, mask=m_valid, other=0.0)
        first_pos = q_offset + pid_m * BLOCK_M
        last_pos = q_offset + tl.minimum(pid_m * BLOCK_M + BLOCK_M, q_len) - 1
        lo, hi = _key_range(first_pos, last_pos, kv_len, prefix, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
        k_base = K + b64 * stride_kb + kv_h64 * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + b64 * stride_vb + kv_h64 * stride_vh + offs_d[:, None] * stride_vd
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        for start_n in range(lo, hi, BLOCK_N):
            offs_n = start_n + offs_n0
            kv_mask = d_valid[:, None] & (offs_n < hi)[None, :]
            k_t = tl.load(k_base + offs_n[None, :] * stride_kn, mask=kv_mask, other=0.0)
            v_t = tl.load(v_base + offs_n[None, :] * stride_vn, mask=kv_mask, other=0.0)
            s = _scores(q, k_t, qk_scale, softcap_log2, HAS_SOFTCAP, FP32)
            visible = _visible((q_offset + offs_m)[:, None], offs_n[None, :], kv_len, prefix, window, CAUSAL,
                               HAS_WINDOW, HAS_PREFIX) & m_valid[:, None]
            p = tl.where(visible, tl.math.exp2(s - lse[:, None]), 0.0)
            dp = _dot(do, v_t, FP32)
            ds = _score_grad(s, p, dp, delta, sm_scale, softcap_log2, HAS_SOFTCAP)
            dq += _dot(ds.to(q.dtype), tl.trans(k_t), FP32)
        g_ptrs = DQ + b64 * stride_gb + h64 * stride_gh + offs_m[:, None] * stride_gm + offs_d[None, :] * stride_gd
        tl.store(g_ptrs, dq.to(DQ.dtype.element_ty), mask=q_mask)

else:  # pragma: no cover
    _prefill_bwd_dkdv_kernel = _prefill_bwd_dq_kernel = None


def _prefill_backward(q, k, v, out, lse, dout, *, scale, causal, window, softcap, prefix_lens, q_offset,
                      kv_lens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dq, dk, dv)`` from the forward's output and log-sum-exp (arguments already validated)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    dq, dk, dv = torch.empty_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if q_len == 0 or batch == 0:
        return dq.zero_(), dk, dv
    delta = (dout.float() * out.float()).sum(-1).reshape(batch * q_heads, q_len).contiguous()
    sm_scale = head_dim ** -0.5 if scale is None else float(scale)
    block_d = max(triton.next_power_of_2(head_dim), MIN_HEAD_DIM)
    fp32 = q.dtype == torch.float32
    config = _backward_config(block_d, q.is_cuda, fp32=fp32)
    shared = dict(HEAD_DIM=head_dim, BLOCK_D=block_d, FP32=fp32, **config)

    def launch(kernel, grid, grads, sizes):
        rows = _row_args(q, k, prefix_lens, q_offset, kv_lens)
        flags = _kernel_flags(causal, window, softcap, prefix_lens, scale, head_dim)
        kernel[grid](
            q, k, v, dout, lse, delta, *grads, rows.pop("Q_OFFSET"), rows.pop("KV_LENS"), rows.pop("PREFIX"),
            *q.stride(), *k.stride(), *v.stride(), *dout.stride(), *grads[0].stride(),
            *sizes, flags.pop("qk_scale"), flags.pop("softcap_log2"), sm_scale, flags.pop("window"),
            rows.pop("q_offset_all"), rows.pop("kv_lens_all"), rows.pop("prefix_all"), **flags, **rows, **shared)

    if dk.stride() != dv.stride():  # one set of strides serves both in the kernel
        dv = torch.empty_like(dk).zero_()
    launch(_prefill_bwd_dkdv_kernel, (triton.cdiv(kv_len, config["BLOCK_N"]), batch * kv_heads), (dk, dv),
           (q_len, kv_len, q_heads, kv_heads, q_heads // kv_heads))
    launch(_prefill_bwd_dq_kernel, (triton.cdiv(q_len, config["BLOCK_M"]), batch * q_heads), (dq,),
           (q_len, kv_len, q_heads, q_heads // kv_heads))
    return dq, dk, dv


class _PrefillAttention(torch.autograd.Function):
    """The prefill kernel with its Triton backward (row arguments and flags are not differentiable)."""

    @staticmethod
    def forward(ctx, q, k, v, kwargs):
        out, lse = _prefill_forward(q, k, v, store_lse=True, **kwargs)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.kwargs = kwargs
        return out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, out, lse = ctx.saved_tensors
        dq, dk, dv = _prefill_backward(q, k, v, out, lse, dout, **ctx.kwargs)
        return dq, dk, dv, None
