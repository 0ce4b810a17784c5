"""The RG-LRU linear recurrence of RecurrentGemma: the plain-torch specification, a fast CPU path and
a Triton kernel.

Shapes: ``a`` and ``x`` are ``(batch, seq, width)`` (any float dtype, not necessarily the same);
``h0`` is an optional initial state ``(batch, width)`` in float32; ``reset`` an optional boolean
``(batch, seq)`` marking where a new document starts. The recurrence, accumulated in float32, is

    h_t = a_t * h_(t-1) + x_t        with a_t taken as 0 where reset[t] (the state is forgotten)
    h_(-1) = h0 (zeros when not given)

and every implementation returns ``(y, h_last)``: ``y[:, t] = h_t`` cast to ``x``'s dtype and the final
state ``h_(seq-1)`` in float32 (``h0``, or zeros, when ``seq == 0``).

Implementations, all with the same arguments: :func:`rglru_scan_reference` (one step per token, the
specification); :func:`rglru_scan_chunked`, the torch path for CPUs: every chunk of about sqrt(seq)
tokens advances in lock-step, once for the chunk totals (scanned recursively the same way) and once
more from the state entering each chunk, so a few hundred vectorised steps replace one per token;
:func:`rglru_scan_triton`, one program per (row, block of channels) walking the sequence in tiles of
``BLOCK_T`` steps, each tile scanned in parallel with ``tl.associative_scan``. :func:`rglru_scan`
picks one (Triton on CUDA, the chunked torch path elsewhere).
"""

from __future__ import annotations

import math
import os

import torch

try:  # triton is a Linux dependency; the torch paths work without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is absent
    triton = None

__all__ = ["rglru_scan", "rglru_scan_reference", "rglru_scan_chunked", "rglru_scan_triton",
           "validate_scan_args", "ScanArgumentError"]


class ScanArgumentError(ValueError):
    """Arguments that no RG-LRU scan implementation accepts (raised before anything runs)."""


def validate_scan_args(a, x, h0=None, reset=None) -> None:
    """Check shapes, dtypes and devices; raise :class:`ScanArgumentError` naming the problem."""
    for name, t in (("a", a), ("x", x)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            raise ScanArgumentError(f"{name} must be a 3-D tensor (batch, seq, width)")
        if not t.dtype.is_floating_point:
            raise ScanArgumentError(f"{name} must be floating point, got {t.dtype}")
    if a.shape != x.shape:
        raise ScanArgumentError(f"a and x shapes differ: {tuple(a.shape)} vs {tuple(x.shape)}")
    if a.device != x.device:
        raise ScanArgumentError(f"a and x devices differ: {a.device}, {x.device}")
    batch, seq, width = x.shape
    if h0 is not None:
        if not isinstance(h0, torch.Tensor) or tuple(h0.shape) != (batch, width):
            raise ScanArgumentError(f"h0 must be a (batch, width) = ({batch}, {width}) tensor")
        if h0.dtype != torch.float32:
            raise ScanArgumentError(f"h0 must be float32 (the state is kept in float32), got {h0.dtype}")
        if h0.device != x.device:
            raise ScanArgumentError(f"h0 is on {h0.device}, x on {x.device}")
    if reset is not None:
        if not isinstance(reset, torch.Tensor) or tuple(reset.shape) != (batch, seq):
            raise ScanArgumentError(f"reset must be a (batch, seq) = ({batch}, {seq}) tensor")
        if reset.dtype != torch.bool:
            raise ScanArgumentError(f"reset must be a bool tensor, got {reset.dtype}")
        if reset.device != x.device:
            raise ScanArgumentError(f"reset is on {reset.device}, x on {x.device}")


def _initial_state(x: torch.Tensor, h0: torch.Tensor | None) -> torch.Tensor:
    return h0 if h0 is not None else torch.zeros(x.shape[0], x.shape[2], dtype=torch.float32, device=x.device)


def rglru_scan_reference(a, x, *, h0=None, reset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The specification (module docstring): one float32 step per token."""
    validate_scan_args(a, x, h0, reset)
    h = _initial_state(x, h0)
    y = torch.empty_like(x)
    for t in range(x.shape[1]):
        a_t = a[:, t].float()
        if reset is not None:
            a_t = torch.where(reset[:, t, None], torch.zeros_like(a_t), a_t)
        h = a_t * h + x[:, t].float()
        y[:, t] = h.to(x.dtype)
    return y, h


# -- the CPU path -----------------------------------------------------------------------------------
def _scan_steps(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """Advance ``h`` over dim 1 of float32 ``a``, ``x`` one step at a time, into ``out``; return the last."""
    for t in range(x.shape[1]):
        h = torch.addcmul(x[:, t], a[:, t], h, out=out[:, t])
    return h


def _chunk_for(seq: int) -> int:
    """About sqrt(seq) steps per chunk (the Python steps per level are ~2 * chunk + seq / chunk), 16..128:
    on this CPU 64..128 were fastest from 2k to 32k tokens (benchmarks/bench_recurrent.py --scan-only)."""
    return min(128, max(16, 2 ** round(math.log2(math.sqrt(max(seq, 1))))))


def _scan_fp32(a: torch.Tensor, x: torch.Tensor, h: torch.Tensor, chunk: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Inclusive float32 scan of ``(batch, seq, width)`` ``a``, ``x`` from state ``h``; returns (states, last).

    Two passes over the chunks of each row, every chunk advancing in lock-step: the first keeps only
    each chunk's running product of ``a`` and its end state from zero (in place, no per-step output);
    those chunk totals are a recurrence of ``seq / chunk`` steps, scanned the same way, which gives the
    state entering every chunk; the second pass replays each chunk from that state, writing the output.
    Five passes over the data (read a, x twice; write y once) and no per-token Python step.
    """
    batch, seq, width = x.shape
    chunk = chunk or _chunk_for(seq)
    states = torch.empty_like(x)
    if seq <= 2 * chunk:
        return states, _scan_steps(a, x, h, states)
    n = seq // chunk
    main = n * chunk
    a_chunks = a[:, :main].view(batch, n, chunk, width)
    x_chunks = x[:, :main].view(batch, n, chunk, width)
    end = x_chunks[:, :, 0].clone()  # each chunk's state from zero ...
    decay = a_chunks[:, :, 0].clone()  # ... and the product of its a, so far
    for t in range(1, chunk):
        end.mul_(a_chunks[:, :, t]).add_(x_chunks[:, :, t])
        decay.mul_(a_chunks[:, :, t])
    ends, last = _scan_fp32(decay, end, h, chunk)  # the state after each chunk
    entering = torch.cat([h[:, None], ends[:, :-1]], dim=1)
    out = states[:, :main].view(batch, n, chunk, width)
    for t in range(chunk):
        entering = torch.addcmul(x_chunks[:, :, t], a_chunks[:, :, t], entering, out=out[:, :, t])
    if main < seq:
        last = _scan_steps(a[:, main:], x[:, main:], last, states[:, main:])
    return states, last


def rglru_scan_chunked(a, x, *, h0=None, reset=None, chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The two-pass chunked scan in torch (see ``_scan_fp32``): a few hundred vectorised steps instead
    of one per token; float32 throughout, differing from the reference only by rounding. ``chunk``
    defaults to about sqrt(seq)."""
    validate_scan_args(a, x, h0, reset)
    _inference_only("rglru_scan_chunked", a, x, h0)
    if chunk is not None and chunk < 2:
        raise ScanArgumentError(f"chunk must be >= 2, got {chunk}")
    a32 = a.float()
    if reset is not None:
        a32 = a32.masked_fill(reset[..., None], 0.0)
    states, last = _scan_fp32(a32.contiguous(), x.float().contiguous(), _initial_state(x, h0).float(), chunk)
    return states.to(x.dtype), last


# -- the Triton kernel ------------------------------------------------------------------------------
if triton is not None:

    @triton.jit
    def _compose(a_first, b_first, a_then, b_then):
        """Two affine steps ``h -> a h + b`` applied in order, as one step."""
        return a_first * a_then, a_then * b_first + b_then

    @triton.jit
    def _rglru_scan_kernel(A, X, RESET, Y, H, seq_len, width, HAS_RESET: tl.constexpr,
                           BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
        """One program: BLOCK_D channels of one row over the whole sequence, BLOCK_T steps per tile.
        ``H`` holds the initial state on entry and the final state on exit."""
        pid_d = tl.program_id(0)
        b = tl.program_id(1).to(tl.int64)  # int64 offsets: batch * seq * width passes 2**31 at long contexts
        offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
        d_valid = offs_d < width
        offs_tile = tl.arange(0, BLOCK_T)
        h = tl.load(H + b * width + offs_d, mask=d_valid, other=0.0)
        row = b * seq_len * width
        for t0 in range(0, seq_len, BLOCK_T):
            offs_t = t0 + offs_tile
            t_valid = offs_t < seq_len
            valid = t_valid[:, None] & d_valid[None, :]
            offsets = row + offs_t[:, None].to(tl.int64) * width + offs_d[None, :]
            # Steps past the end load as the identity (a = 1, x = 0), so the tile's last row is the state.
            a = tl.load(A + offsets, mask=valid, other=1.0).to(tl.float32)
            x = tl.load(X + offsets, mask=valid, other=0.0).to(tl.float32)
            if HAS_RESET:
                r = tl.load(RESET + b * seq_len + offs_t, mask=t_valid, other=0)
                a = tl.where(r[:, None] != 0, 0.0, a)
            decay, local = tl.associative_scan((a, x), 0, _compose)
            states = decay * h[None, :] + local
            tl.store(Y + offsets, states.to(Y.dtype.element_ty), mask=valid)
            h = tl.sum(tl.where(offs_tile[:, None] == BLOCK_T - 1, states, 0.0), axis=0)
        tl.store(H + b * width + offs_d, h, mask=d_valid)

else:  # pragma: no cover
    _rglru_scan_kernel = None


def _scan_config(on_gpu: bool) -> dict:
    """Tiles per launch: on a GPU 64 steps x 64 channels per tile (unmeasured on hardware, see the
    README); under the interpreter small tiles so that test lengths straddle several tiles."""
    if not on_gpu:
        return dict(BLOCK_T=16, BLOCK_D=16)
    return dict(BLOCK_T=64, BLOCK_D=64, num_warps=4)


def rglru_scan_triton(a, x, *, h0=None, reset=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Triton kernel (same arguments as the reference)."""
    validate_scan_args(a, x, h0, reset)
    _inference_only("rglru_scan_triton", a, x, h0)
    if triton is None:
        raise ScanArgumentError("the Triton scan needs the triton package (Linux); use rglru_scan_chunked")
    if not x.is_cuda and type(_rglru_scan_kernel).__name__ != "InterpretedFunction":
        raise ScanArgumentError(
            f"the Triton scan on {x.device} tensors needs the Triton interpreter: set TRITON_INTERPRET=1 "
            "before triton is imported, move the tensors to CUDA, or use backend='torch'")
    batch, seq, width = x.shape
    y = torch.empty_like(x)
    h_last = _initial_state(x, h0).clone()
    if seq == 0 or batch == 0 or width == 0:
        return y, h_last
    a, x = a.contiguous(), x.contiguous()
    config = _scan_config(x.is_cuda)
    grid = (triton.cdiv(width, config["BLOCK_D"]), batch)
    reset_arg = reset.to(torch.int8).contiguous() if reset is not None else x
    _rglru_scan_kernel[grid](a, x, reset_arg, y, h_last, seq, width, HAS_RESET=reset is not None, **config)
    return y, h_last


# "auto": the Triton kernel on CUDA tensors, the chunked torch path elsewhere. "torch" / "triton" force one.
_BACKEND_ENV = "GEMMA_GROUNDING_SCAN"


def _needs_grad(*tensors) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _inference_only(name: str, *tensors) -> None:
    if _needs_grad(*tensors):
        raise ScanArgumentError(f"{name} computes no gradients (it updates buffers in place): call it under "
                                "torch.no_grad(), or use rglru_scan, which falls back to the reference")


def rglru_scan(a, x, *, h0=None, reset=None, backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The one scan entry point the models call. ``backend``: ``"auto"`` (default; also settable with
    the ``GEMMA_GROUNDING_SCAN`` environment variable), ``"torch"`` or ``"triton"``. When gradients are
    needed the differentiable reference runs instead (the fast paths are for inference)."""
    backend = backend or os.environ.get(_BACKEND_ENV, "auto")
    if backend not in ("auto", "torch", "triton"):
        raise ScanArgumentError(f"scan backend must be auto, torch or triton, got {backend!r}")
    if _needs_grad(a, x, h0):
        return rglru_scan_reference(a, x, h0=h0, reset=reset)
    if backend == "triton" or (backend == "auto" and x.is_cuda):
        return rglru_scan_triton(a, x, h0=h0, reset=reset)
    return rglru_scan_chunked(a, x, h0=h0, reset=reset)
