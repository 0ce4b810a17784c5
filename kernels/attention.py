"""Attention for every Gemma-family pattern: the plain-torch specification and the entry point.

Shapes: ``q`` is ``(batch, q_heads, q_len, head_dim)``; ``k`` and ``v`` are
``(batch, kv_heads, kv_len, head_dim)`` with ``kv_heads`` dividing ``q_heads`` (GQA/MQA, never copied).

Which keys a query sees. Query ``i`` of row ``b`` sits at absolute position ``p = q_offset[b] + i``
(``q_offset`` lets a chunk of queries start inside a longer KV cache). Key ``j`` is visible iff

- ``j < kv_lens[b]`` (per-row valid length; keys past it are padding), and
- ``causal`` is False, or ``j <= p``, or ``j < prefix_lens[b]`` and ``p < prefix_lens[b]``
  (prefix-LM: the first ``P_b`` tokens attend to each other bidirectionally, the rest causally), and
- ``window`` is None, or ``p - window < j`` (a sliding window of ``window`` keys ending at ``p``).

Scores are ``softcap * tanh(q.k * scale / softcap)`` when ``softcap`` is set (Gemma 2), else
``q.k * scale``; softmax is taken in fp32 over visible keys. A query that sees no key at all outputs
zeros (only padding queries can be in that state).
"""

from __future__ import annotations

import os

import torch

__all__ = ["attention", "attention_reference", "validate_attention_args", "AttentionArgumentError"]


class AttentionArgumentError(ValueError):
    """Arguments that no attention implementation accepts (raised before anything is launched)."""


def _as_row_tensor(value, batch: int, device, name: str) -> torch.Tensor | None:
    if value is None:
        return None
    if isinstance(value, int):
        return torch.full((batch,), value, dtype=torch.int64, device=device)
    if not isinstance(value, torch.Tensor) or value.dim() != 1 or value.shape[0] != batch:
        raise AttentionArgumentError(f"{name} must be an int or a 1-D tensor of length batch={batch}")
    if value.dtype.is_floating_point:
        raise AttentionArgumentError(f"{name} must hold integers, got {value.dtype}")
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
    if causal:
        allowed = kpos <= qpos
        prefix = _as_row_tensor(prefix_lens, batch, device, "prefix_lens")
        if prefix is not None:
            p = prefix[:, None, None]
            allowed = allowed | ((kpos < p) & (qpos < p))
        mask &= allowed
    if window is not None:
        mask &= kpos > qpos - window
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
    scores = scores.masked_fill(~mask, float("-inf"))
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


def _attention_triton(q, k, v, **kwargs):  # replaced by the Triton implementation below
    raise AttentionArgumentError("the Triton attention backend is not available in this build")
