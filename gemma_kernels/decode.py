"""Decode attention: one new query token per row against a KV cache (flash-decoding, split-K).

Same arguments and semantics as :func:`gemma_kernels.attention.attention` with ``q_len == 1``: ``q`` is
``(batch, q_heads, 1, head_dim)``, ``k``/``v`` the cache ``(batch, kv_heads, kv_len, head_dim)``; the
query of row ``b`` sits at position ``q_offset[b]`` and sees keys ``j < kv_lens[b]`` that are causal
(``j <= q_offset[b]`` and inside the sliding window when one is set, or both inside the prefix-LM prefix).

One query per row leaves too little parallelism for a FlashAttention grid, so the key range of
each row is cut into ``num_splits`` chunks: one program per (row, KV head, chunk) streams its chunk
once for every query head of the GQA group (K/V are read once per group, never copied) and writes a
partial softmax (running max, sum, unnormalised output); a second small kernel merges the chunks.
"""

from __future__ import annotations

import torch

from .attention import (
    MIN_HEAD_DIM,
    AttentionArgumentError,
    _as_row_tensor,
    _kernel_flags,
    _row_args,
    triton,
    validate_attention_args,
    validate_kernel_args,
)

if triton is not None:
    import triton.language as tl

    from .attention import _key_range, _online_softmax_step, _row_values, _scores, _visible

__all__ = ["decode_attention", "decode_attention_reference", "decode_attention_triton"]


def decode_attention_reference(q, k, v, *, scale: float | None = None, causal: bool = True,
                               window: int | None = None, softcap: float | None = None, prefix_lens=None,
                               q_offset=0, kv_lens=None) -> torch.Tensor:
    """The specification for one query per row, written directly (KV heads expanded per query head)."""
    validate_attention_args(q, k, v, window=window, softcap=softcap)
    if q.shape[2] != 1:
        raise AttentionArgumentError(f"decode attention takes one query per row, got q_len={q.shape[2]}")
    batch, q_heads, _, head_dim = q.shape
    kv_len = k.shape[2]
    scale = head_dim ** -0.5 if scale is None else scale
    group = q_heads // k.shape[1]
    keys = k.float().repeat_interleave(group, dim=1)  # (B, Hq, Lk, D)
    values = v.float().repeat_interleave(group, dim=1)
    scores = torch.einsum("bhd,bhkd->bhk", q[:, :, 0].float(), keys) * scale
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)

    pos = _as_row_tensor(q_offset, batch, q.device, "q_offset")[:, None]  # (B, 1)
    j = torch.arange(kv_len, device=q.device)[None, :]  # (1, Lk)
    lens = _as_row_tensor(kv_lens if kv_lens is not None else kv_len, batch, q.device, "kv_lens")[:, None]
    visible = j < lens
    in_window = (j > pos - window) if window is not None else torch.ones_like(visible)
    if causal:
        seen = (j <= pos) & in_window
        if prefix_lens is not None:  # prefix pairs see each other whatever the window
            prefix = _as_row_tensor(prefix_lens, batch, q.device, "prefix_lens")[:, None]
            seen = seen | ((j < prefix) & (pos < prefix))
        visible = visible & seen
    else:
        visible = visible & in_window
    visible = visible[:, None, :]  # (B, 1, Lk)

    scores = scores.masked_fill(~visible, float("-inf"))
    best = scores.amax(-1, keepdim=True)
    weights = torch.exp(scores - torch.where(best.isinf(), torch.zeros_like(best), best))
    total = weights.sum(-1, keepdim=True)
    out = torch.einsum("bhk,bhkd->bhd", weights, values) / torch.where(total > 0, total, torch.ones_like(total))
    return out[:, :, None].to(q.dtype)


if triton is not None:

    @triton.jit
    def _decode_split_kernel(
        Q, K, V, PART_O, PART_M, PART_L, Q_OFFSET, KV_LENS, PREFIX,
        stride_qb, stride_qh, stride_qd,
        stride_kb, stride_kh, stride_kn, stride_kd,
        stride_vb, stride_vh, stride_vn, stride_vd,
        kv_len_total, q_heads, kv_heads, group, num_splits, chunk, qk_scale, softcap_log2, window,
        q_offset_all, kv_lens_all, prefix_all,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
        CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
        HAS_PREFIX: tl.constexpr, FP32: tl.constexpr,
        ROWS_Q_OFFSET: tl.constexpr, ROWS_KV_LENS: tl.constexpr, ROWS_PREFIX: tl.constexpr,
    ):
        """One program: every query head of one KV head of one row, over one chunk of its keys."""
        pid_bh = tl.program_id(0)
        split = tl.program_id(1)
        b = pid_bh // kv_heads
        kv_h = pid_bh % kv_heads
        b64, kv_h64 = b.to(tl.int64), kv_h.to(tl.int64)  # no int32 overflow on big caches

        offs_g = tl.arange(0, BLOCK_G)  # the group's query heads, padded to tl.dot's 16 rows
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        g_valid = offs_g < group
        d_valid = offs_d < HEAD_DIM
        heads = kv_h * group + offs_g

        pos, kv_len, prefix = _row_values(Q_OFFSET, KV_LENS, PREFIX, b, q_offset_all, kv_lens_all, prefix_all,
                                          kv_len_total, ROWS_Q_OFFSET, ROWS_KV_LENS, ROWS_PREFIX)
        lo, hi = _key_range(pos, pos, kv_len, prefix, window, CAUSAL, HAS_WINDOW, HAS_PREFIX)
        start = lo + split * chunk
        end = tl.minimum(start + chunk, hi)

        q = tl.load(Q + b64 * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                    mask=g_valid[:, None] & d_valid[None, :], other=0.0)
        k_base = K + b64 * stride_kb + kv_h64 * stride_kh + offs_d[:, None] * stride_kd
        v_base = V + b64 * stride_vb + kv_h64 * stride_vh + offs_d[None, :] * stride_vd

        m_i = tl.full([BLOCK_G], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_G], dtype=tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], dtype=tl.float32)
        for start_n in range(start, end, BLOCK_N):
            kpos = start_n + offs_n
            k_valid = kpos < end
            k = tl.load(k_base + kpos[None, :] * stride_kn, mask=d_valid[:, None] & k_valid[None, :], other=0.0)
            s = _scores(q, k, qk_scale, softcap_log2, HAS_SOFTCAP, FP32)
            visible = _visible(pos + offs_g[:, None] * 0, kpos[None, :], kv_len, prefix, window, CAUSAL,
                               HAS_WINDOW, HAS_PREFIX)
            s = tl.where(visible & k_valid[None, :], s, float("-inf"))
            v = tl.load(v_base + kpos[:, None] * stride_vn, mask=k_valid[:, None] & d_valid[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, FP32)

        # Partials are indexed (row, query head, split); an empty chunk leaves m = -inf, l = 0.
        part = (b * q_heads + heads) * num_splits + split
        tl.store(PART_M + part, m_i, mask=g_valid)
        tl.store(PART_L + part, l_i, mask=g_valid)
        tl.store(PART_O + part[:, None] * BLOCK_D + offs_d[None, :], acc, mask=g_valid[:, None])

    @triton.jit
    def _decode_merge_kernel(
        PART_O, PART_M, PART_L, OUT, stride_ob, stride_oh, stride_od, q_heads, num_splits,
        HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_S: tl.constexpr,
    ):
        """One program per (row, query head): rescale every chunk to the common max and normalise."""
        pid = tl.program_id(0)
        b = pid // q_heads
        h = pid % q_heads
        offs_s = tl.arange(0, BLOCK_S)
        offs_d = tl.arange(0, BLOCK_D)
        s_valid = offs_s < num_splits
        part = pid * num_splits + offs_s
        m = tl.load(PART_M + part, mask=s_valid, other=float("-inf"))
        l_part = tl.load(PART_L + part, mask=s_valid, other=0.0)
        acc = tl.load(PART_O + part[:, None] * BLOCK_D + offs_d[None, :], mask=s_valid[:, None], other=0.0)
        m_max = tl.max(m, 0)
        m_safe = tl.where(m_max == float("-inf"), 0.0, m_max)
        w = tl.math.exp2(m - m_safe)  # empty chunks: exp2(-inf) = 0
        total = tl.sum(w * l_part, 0)
        out = tl.sum(w[:, None] * acc, 0) / tl.where(total > 0.0, total, 1.0)
        tl.store(OUT + b.to(tl.int64) * stride_ob + h * stride_oh + offs_d * stride_od, out.to(OUT.dtype.element_ty),
                 mask=offs_d < HEAD_DIM)


_MAX_SPLITS = 64


def _num_splits(q: torch.Tensor, rows_x_kv_heads: int, key_range: int, block_n: int) -> int:
    """Chunks per row: enough programs to cover the GPU about twice, chunks no shorter than 256 keys."""
    if q.is_cuda:
        programs = 2 * torch.cuda.get_device_properties(q.device).multi_processor_count
    else:
        programs = 4  # the interpreter: a few chunks so that the merge is always exercised
    wanted = triton.cdiv(programs, max(rows_x_kv_heads, 1))
    longest = triton.cdiv(key_range, 256 if q.is_cuda else block_n)
    return max(1, min(wanted, longest, _MAX_SPLITS))


def decode_attention_triton(q, k, v, *, scale=None, causal=True, window=None, softcap=None, prefix_lens=None,
                            q_offset=0, kv_lens=None, num_splits: int | None = None) -> torch.Tensor:
    """Split-K Triton decode attention (``num_splits`` None: chosen from the GPU's size)."""
    validate_kernel_args(q, k, v, window=window, softcap=softcap, prefix_lens=prefix_lens,
                         q_offset=q_offset, kv_lens=kv_lens)
    if q.shape[2] != 1:
        raise AttentionArgumentError(f"decode attention takes one query per row, got q_len={q.shape[2]}")
    if num_splits is not None and not 1 <= num_splits <= _MAX_SPLITS:
        raise AttentionArgumentError(f"num_splits must be in 1..{_MAX_SPLITS}, got {num_splits}")
    batch, q_heads, _, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    group = q_heads // kv_heads
    out = torch.empty_like(q)
    if batch == 0:
        return out
    rows = _row_args(q, k, prefix_lens, q_offset, kv_lens)
    flags = _kernel_flags(causal, window, softcap, prefix_lens, scale, head_dim)
    block_d = max(triton.next_power_of_2(head_dim), MIN_HEAD_DIM)
    block_n = (64 if head_dim <= 128 else 32) if q.is_cuda else 32
    # The longest key range of any row: a causal window bounds it by the window, unless a prefix-LM
    # prefix lets an early query see keys after its own position as well.
    windowed = window is not None and causal and prefix_lens is None
    key_range = min(kv_len, window) if windowed else kv_len
    key_range = max(key_range, 1)
    splits = num_splits or _num_splits(q, batch * kv_heads, key_range, block_n)
    chunk = triton.cdiv(triton.cdiv(key_range, splits), block_n) * block_n
    splits = triton.cdiv(key_range, chunk)

    part_o = torch.empty(batch, q_heads, splits, block_d, dtype=torch.float32, device=q.device)
    part_m = torch.empty(batch, q_heads, splits, dtype=torch.float32, device=q.device)
    part_l = torch.empty_like(part_m)
    launch = dict(num_warps=4, num_stages=2) if q.is_cuda else {}
    _decode_split_kernel[(batch * kv_heads, splits)](
        q, k, v, part_o, part_m, part_l, rows.pop("Q_OFFSET"), rows.pop("KV_LENS"), rows.pop("PREFIX"),
        q.stride(0), q.stride(1), q.stride(3), *k.stride(), *v.stride(),
        kv_len, q_heads, kv_heads, group, splits, chunk, flags.pop("qk_scale"), flags.pop("softcap_log2"),
        flags.pop("window"), rows.pop("q_offset_all"), rows.pop("kv_lens_all"), rows.pop("prefix_all"),
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=block_n,
        FP32=q.dtype == torch.float32, **flags, **rows, **launch,
    )
    _decode_merge_kernel[(batch * q_heads,)](
        part_o, part_m, part_l, out, out.stride(0), out.stride(1), out.stride(3), q_heads, splits,
        HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_S=max(2, triton.next_power_of_2(splits)),
        **({"num_warps": 4} if q.is_cuda else {}),
    )
    return out


def decode_attention(q, k, v, *, scale=None, causal=True, window=None, softcap=None, prefix_lens=None,
                     q_offset=0, kv_lens=None, backend: str | None = None) -> torch.Tensor:
    """Decode entry point: the Triton kernel on CUDA (or when forced), the reference elsewhere."""
    from .attention import _resolve_backend

    kwargs = dict(scale=scale, causal=causal, window=window, softcap=softcap, prefix_lens=prefix_lens,
                  q_offset=q_offset, kv_lens=kv_lens)
    if _resolve_backend(backend, q) == "torch":
        return decode_attention_reference(q, k, v, **kwargs)
    return decode_attention_triton(q, k, v, **kwargs)
