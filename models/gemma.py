"""The Gemma decoder (Gemma 1, 2 and 3 text), one file; every difference is a config field.

Module names follow Hugging Face's so a checkpoint's state dict loads as is:
``model.embed_tokens``, ``model.layers.{i}.{input_layernorm, self_attn.{q,k,v,o}_proj, self_attn.{q,k}_norm,
post_attention_layernorm, pre_feedforward_layernorm, post_feedforward_layernorm, mlp.{gate,up,down}_proj}``,
``model.norm``; the LM head is tied to the embedding matrix.

The KV cache is static: :meth:`GemmaLM.setup_cache` preallocates ``(batch, kv_heads, max_len, head_dim)``
per layer (``max_len`` rounded up to a multiple of 256) and forward passes write into it in place at
their positions (``input_pos``), which may differ per row (batches of prompts of different lengths,
right-padded). Attention reads the cache up to the next multiple of 256 past the last position, so
the key length, and with it every rounding, depends on the positions only, never on how large an
earlier call left the cache: the same input gives the same bits whatever ran before.
"""

from __future__ import annotations

import itertools
import math
import os
import types

import torch
import torch.nn.functional as F
from torch import nn

from gemma_kernels.attention import attention

from .config import GemmaConfig

_KV_BUCKET = 256

__all__ = ["GemmaLM", "RMSNorm", "KVCache", "rope_inv_freq", "apply_rope", "CompileUnavailableError"]


class RMSNorm(nn.Module):
    """Gemma RMSNorm: normalise in fp32, multiply by ``1 + w`` (w initialised to 0), cast back."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (1.0 + self.weight.float())).to(x.dtype)


def rope_inv_freq(head_dim: int, base: float, scaling_factor: float = 1.0, rotary_dim: int | None = None) -> torch.Tensor:
    """Inverse frequencies of rotate-half RoPE; linear scaling divides them by ``scaling_factor``."""
    dim = rotary_dim or head_dim
    # An explicit CPU device keeps this buffer real when the model is built on the meta device.
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim))
    return inv / scaling_factor


def rope_cos_sin(position_ids: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype):
    """``(batch, seq, dim)`` cos and sin computed in fp32 and cast to ``dtype`` (as transformers does)."""
    freqs = position_ids.float()[..., None] * inv_freq.float()[None, None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate ``x`` ``(batch, heads, seq, dim)`` by per-position ``cos``/``sin`` ``(batch, seq, dim)``."""
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + _rotate_half(x) * sin


class KVCache(nn.Module):
    """Preallocated keys and values of one layer, written in place at the tokens' positions."""

    def __init__(self, batch: int, kv_heads: int, max_len: int, head_dim: int, dtype, device=None):
        super().__init__()
        shape = (batch, kv_heads, max_len, head_dim)
        self.register_buffer("k", torch.zeros(shape, dtype=dtype, device=device), persistent=False)
        self.register_buffer("v", torch.zeros(shape, dtype=dtype, device=device), persistent=False)

    @property
    def max_len(self) -> int:
        return self.k.shape[2]

    def update(self, start: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor, used: int):
        """Write ``k``/``v`` ``(batch, kv_heads, seq, dim)`` from position ``start`` (int or per row);
        return views of the first ``used`` cached positions."""
        batch, seq = k.shape[0], k.shape[2]
        if isinstance(start, int):
            self.k[:batch, :, start:start + seq] = k
            self.v[:batch, :, start:start + seq] = v
        elif seq == 1:
            rows = torch.arange(batch, device=k.device)
            self.k[rows, :, start] = k[:, :, 0]
            self.v[rows, :, start] = v[:, :, 0]
        else:
            idx = (start[:, None] + torch.arange(seq, device=k.device)[None, :])
            idx = idx[:, None, :, None].expand(batch, k.shape[1], seq, k.shape[3])
            self.k[:batch].scatter_(2, idx, k)
            self.v[:batch].scatter_(2, idx, v)
        return self.k[:batch, :, :used], self.v[:batch, :, :used]


class Attention(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=False)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=False)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=False)
        if c.use_qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps)
        self.use_qk_norm = c.use_qk_norm
        self.scale = c.attn_scale
        self.softcap = c.attn_logit_softcapping
        self.window = c.sliding_window if c.is_sliding(layer) else None
        self.cache: KVCache | None = None
        self.qkv_proj: nn.Module | None = None  # Q, K and V in one matrix (models.quantize sets it)
        self.qkv_sizes = (self.n_heads * self.head_dim, self.n_kv * self.head_dim, self.n_kv * self.head_dim)

    def forward(self, x, cos, sin, ctx: _Context) -> torch.Tensor:
        b, seq, _ = x.shape
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split(self.qkv_sizes, dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(b, seq, self.n_heads, self.head_dim).transpose(1, 2)
        k = k.view(b, seq, self.n_kv, self.head_dim).transpose(1, 2)
        v = v.view(b, seq, self.n_kv, self.head_dim).transpose(1, 2)
        if self.use_qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if q.dtype != v.dtype:  # autocast: bf16 projections, RoPE tables in the fp32 residual's dtype
            q, k = q.to(v.dtype), k.to(v.dtype)
        if ctx.use_cache:
            k, v = self.cache.update(ctx.start, k, v, ctx.kv_used)
        out = attention(q, k, v, scale=self.scale, causal=ctx.causal, window=self.window,
                        softcap=self.softcap, prefix_lens=ctx.prefix_lens, q_offset=ctx.start,
                        kv_lens=ctx.kv_lens, backend=ctx.backend)
        return self.o_proj(out.transpose(1, 2).reshape(b, seq, self.n_heads * self.head_dim))


class MLP(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.up_proj = nn.Linear(config.hidden_size, config.intermediate_size, bias=False)
        self.down_proj = nn.Linear(config.intermediate_size, config.hidden_size, bias=False)
        self.gate_up_proj: nn.Module | None = None  # gate and up in one matrix (models.quantize sets it)

    def forward(self, x):
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        else:
            gate, up = self.gate_proj(x), self.up_proj(x)
        return self.down_proj(F.gelu(gate, approximate="tanh") * up)


class DecoderLayer(nn.Module):
    def __init__(self, config: GemmaConfig, layer: int):
        super().__init__()
        eps = config.rms_norm_eps
        self.sliding = config.is_sliding(layer)
        self.self_attn = Attention(config, layer)
        self.mlp = MLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, eps)
        # Gemma 1 names its pre-MLP norm post_attention_layernorm; Gemma 2/3 use it after attention.
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps)
        self.sandwich = config.use_post_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = RMSNorm(config.hidden_size, eps)
            self.post_feedforward_layernorm = RMSNorm(config.hidden_size, eps)

    def forward(self, h, rope, ctx: _Context):
        cos, sin = rope[self.sliding]
        a = self.self_attn(self.input_layernorm(h), cos, sin, ctx)
        if not self.sandwich:
            h = h + a
            return h + self.mlp(self.post_attention_layernorm(h))
        h = h + self.post_attention_layernorm(a)
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


class CompileUnavailableError(RuntimeError):
    """torch.compile cannot run here (no C++ compiler for TorchInductor's CPU code)."""


_COMPILED_STEPS = itertools.count()


def _compiled_step(model: GemmaLM):
    """A compiled decode step of its own: a copy of the step's code object gets its own Dynamo cache,
    so that a step compiled for another structure (whose module guards were skipped) is never reused."""
    fn = GemmaLM._decode_logits
    code = fn.__code__.replace(co_name=f"_decode_logits_{next(_COMPILED_STEPS)}")
    fresh = types.FunctionType(code, fn.__globals__, code.co_name, fn.__defaults__, fn.__closure__)
    skip = getattr(torch.compiler, "skip_guard_on_all_nn_modules_unsafe", None)
    options = {"guard_filter_fn": skip} if skip is not None else None
    return torch.compile(types.MethodType(fresh, model), dynamic=True, options=options)


def _require_cxx() -> None:
    import shutil

    candidates = [os.environ.get("CXX"), "g++", "c++", "clang++"]
    if not any(c and shutil.which(c) for c in candidates):
        raise CompileUnavailableError(
            "compile_decode() on a CPU needs a C++ compiler for TorchInductor (none of $CXX, g++, c++, "
            "clang++ was found on PATH); install one (e.g. 'apt install g++') or decode without compiling")


class _Context:
    """What every layer of one forward pass shares (cache position, masks, backend)."""

    __slots__ = ("start", "kv_used", "kv_lens", "prefix_lens", "causal", "use_cache", "backend")

    def __init__(self, start, kv_used, kv_lens, prefix_lens, causal, use_cache, backend):
        self.start, self.kv_used, self.kv_lens = start, kv_used, kv_lens
        self.prefix_lens, self.causal, self.use_cache, self.backend = prefix_lens, causal, use_cache, backend


class GemmaDecoder(nn.Module):
    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, padding_idx=None)
        self.layers = nn.ModuleList(DecoderLayer(config, i) for i in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class GemmaLM(nn.Module):
    """A Gemma causal language model: ``model(input_ids)`` returns logits ``(batch, seq, vocab)``.

    With a cache set up (:meth:`setup_cache`), pass ``input_pos`` (an int, or one start per row) to
    write this chunk's keys and values at those positions and attend over everything cached before.
    """

    def __init__(self, config: GemmaConfig):
        super().__init__()
        self.config = config
        self.model = GemmaDecoder(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        c = config
        self.register_buffer("inv_freq_global", rope_inv_freq(c.head_dim, c.rope_theta, c.rope_scaling_factor),
                             persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(c.head_dim, c.rope_local_base_freq),
                             persistent=False)
        self.attention_backend: str | None = None  # None: the entry point's default (auto)
        self.lm_head_quantized: nn.Module | None = None  # int4 head rescored exactly (models.quantize)
        self.cache_batch = 0
        self._compile_decode = False  # compile_decode(): the one-token step compiled by torch.compile
        self._compiled_decode = None
        self._compiled_signature: tuple | None = None
        self._compiled_modules: tuple[nn.Module, ...] = ()

    # -- cache ---------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int, dtype: torch.dtype | None = None, device=None) -> None:
        """Preallocate the static KV cache (reused while large enough) for ``max_len`` positions, rounded
        up to a multiple of 256: attention reads whole 256-position blocks of it (see ``hidden_states``),
        and a compiled step is traced for one cache size, so fewer sizes compile less often."""
        c = self.config
        max_len = -(-max_len // _KV_BUCKET) * _KV_BUCKET
        dtype = dtype or self.model.embed_tokens.weight.dtype
        device = device or self.model.embed_tokens.weight.device
        first = self.model.layers[0].self_attn.cache
        if (first is not None and first.k.shape[0] >= batch_size and first.max_len >= max_len
                and first.k.dtype == dtype and first.k.device == torch.device(device)):
            self.cache_batch = batch_size
            return
        for layer in self.model.layers:
            layer.self_attn.cache = KVCache(batch_size, c.num_key_value_heads, max_len, c.head_dim, dtype, device)
        self.cache_batch = batch_size

    def copy_cache_prefix(self, length: int, rows: int) -> None:
        """Copy row 0's first ``length`` cached positions to rows ``1..rows-1``: several continuations
        of one prefix (safety policies after one text) then share a prefill computed once."""
        if self.model.layers[0].self_attn.cache is None:
            raise RuntimeError("no KV cache: call setup_cache(batch, max_len) first")
        if rows > self.cache_batch or length > self.cache_len:
            raise ValueError(f"{rows} rows x {length} positions exceed the KV cache "
                             f"({self.cache_batch} x {self.cache_len})")
        for layer in self.model.layers:
            cache = layer.self_attn.cache
            cache.k[1:rows, :, :length] = cache.k[:1, :, :length]
            cache.v[1:rows, :, :length] = cache.v[:1, :, :length]

    def clear_cache(self) -> None:
        for layer in self.model.layers:
            layer.self_attn.cache = None
        self.cache_batch = 0

    @property
    def cache_len(self) -> int:
        cache = self.model.layers[0].self_attn.cache
        return 0 if cache is None else cache.max_len

    # -- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings scaled by sqrt(hidden), the scale rounded to the weight dtype first."""
        w = self.model.embed_tokens.weight
        return self.model.embed_tokens(input_ids) * torch.tensor(math.sqrt(self.config.hidden_size), dtype=w.dtype)

    def hidden_states(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                      input_pos: int | torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      kv_lens: torch.Tensor | None = None, prefix_lens=None, causal: bool = True) -> torch.Tensor:
        """Final-norm hidden states ``(batch, seq, hidden)``.

        ``inputs_embeds`` replaces the (scaled) token embeddings (vision-language models insert image
        features there). ``position_ids`` ``(batch, seq)`` default to the cache positions. ``kv_lens``
        marks per-row valid key lengths (padding). ``prefix_lens`` makes the first P tokens of each
        row bidirectional (prefix-LM); ``causal=False`` makes the whole sequence bidirectional.
        """
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = h.shape[:2]
        device = h.device
        use_cache = input_pos is not None
        if use_cache and self.model.layers[0].self_attn.cache is None:
            raise RuntimeError("input_pos given but no KV cache: call setup_cache(batch, max_len) first")
        start = 0 if input_pos is None else input_pos
        if isinstance(start, torch.Tensor):
            start = start.to(device=device, dtype=torch.long)
            if start.dim() == 0:
                start = int(start)
        if use_cache:
            end = (start + seq) if isinstance(start, int) else int(start.max()) + seq
            if end > self.cache_len:
                raise ValueError(f"positions up to {end} exceed the KV cache length {self.cache_len}")
            if batch > self.cache_batch:
                raise ValueError(f"batch {batch} exceeds the KV cache batch {self.cache_batch}")
            # Attend over a bucketed prefix of the cache: on CPU every new matmul shape pays a
            # one-off kernel selection, so letting the key length grow by one per decode step would
            # pay it at every step. Keys past each row's end are masked by kv_lens. The cache is a
            # whole number of buckets, so the key length depends on ``end`` alone (not on the size
            # an earlier, longer call left the cache at), and so do the results' last bits.
            kv_used = -(-end // _KV_BUCKET) * _KV_BUCKET
            if kv_lens is None:
                kv_lens = start + seq if not isinstance(start, int) else torch.full(
                    (batch,), end, dtype=torch.long, device=device)
        else:
            kv_used = seq
        if position_ids is None:
            base = torch.arange(seq, device=device)[None, :]
            position_ids = base + (start if isinstance(start, int) else start[:, None])
            position_ids = position_ids.expand(batch, seq)
        dtype = h.dtype
        rope = {False: rope_cos_sin(position_ids, self.inv_freq_global, dtype),
                True: rope_cos_sin(position_ids, self.inv_freq_local, dtype)}
        ctx = _Context(start, kv_used, kv_lens, prefix_lens, causal, use_cache, self.attention_backend)
        for layer in self.model.layers:
            h = layer(h, rope, ctx)
        return self.model.norm(h)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (tied) plus Gemma 2's final soft-capping."""
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight
        if self.lm_head_quantized is not None:
            out = self.lm_head_quantized(hidden, weight)
        else:
            out = F.linear(hidden, weight)
        cap = self.config.final_logit_softcapping
        if cap is not None:
            out = torch.tanh(out / cap) * cap
        return out

    def forward(self, input_ids: torch.Tensor | None = None, **kwargs) -> torch.Tensor:
        return self.logits(self.hidden_states(input_ids, **kwargs))

    # -- decoding ------------------------------------------------------------------------------
    def _decode_logits(self, token_ids: torch.Tensor, input_pos) -> torch.Tensor:
        return self.logits(self.hidden_states(token_ids, input_pos=input_pos)[:, -1])

    def decode_step(self, token_ids: torch.Tensor, input_pos) -> torch.Tensor:
        """Logits ``(batch, vocab)`` of the next token after ``token_ids`` ``(batch, 1)`` written at
        ``input_pos`` (an int, or one position per row) into the KV cache: one step of generation.

        Runs the step compiled by :meth:`compile_decode` when it was called and no forward hook is
        attached (hooks such as steering run eagerly, exactly as registered)."""
        if self._compile_decode:
            signature = self._decode_signature()
            if self._compiled_decode is None or signature != self._compiled_signature:
                self._compiled_decode, self._compiled_signature = _compiled_step(self), signature
                self._compiled_modules = tuple(self.modules())  # walked once, not at every step
            if not any(m._forward_hooks or m._forward_pre_hooks for m in self._compiled_modules):
                return self._compiled_decode(token_ids, input_pos)
        return self._decode_logits(token_ids, input_pos)

    def compile_decode(self, enabled: bool = True) -> GemmaLM:
        """Compile :meth:`decode_step` with ``torch.compile`` (TorchInductor; shapes dynamic in the
        position, so one compilation serves every step with one KV cache).

        On a CPU the one-token step is mostly hundreds of small operations (norms, RoPE, attention,
        residuals) around a few matmuls; Inductor fuses them into a few C++ loops, which removes most
        of the per-operation overhead: see ``benchmarks/bench_decode.py --modes int8,int8+compile``.
        The first step pays the compilation (about a minute on two cores; Inductor caches its work on
        disk for later processes) and needs a C++ compiler on CPU. Numerics: fused elementwise chains
        are evaluated without rounding between them, so logits differ from the eager step in the last
        bits (greedy tokens: ``bench_decode.py`` reports them against fp32).

        Dynamo's per-call guards on every module attribute (hundreds of weights: ~4 ms a token on
        this CPU, as much as the fused operations save) are skipped. In their place the step checks
        what can change the traced code (quantisation, the LM head, the attention backend and its
        environment setting) and compiles afresh when it changed; weights updated or replaced with
        tensors of the same shapes are read anew at every call. The KV cache's sizes are fixed in the
        traced code, so a new cache size compiles again: :meth:`setup_cache` rounds lengths up to a
        multiple of 256 and keeps a cache that is large enough. ``enabled=False``
        returns to the eager step. Returns the model."""
        self._compiled_decode = None
        self._compile_decode = bool(enabled)
        if enabled and self.device.type == "cpu":
            _require_cxx()
        return self

    def _decode_signature(self) -> tuple:
        """What the compiled step's code depends on beyond its tensors' values and sizes."""
        first = self.model.layers[0]
        cache = first.self_attn.cache
        # the KV cache's sizes are static in the traced graph (module buffers), hence part of it
        return (self.attention_backend, os.environ.get("GEMMA_GROUNDING_ATTENTION"), id(self.lm_head_quantized),
                id(first.self_attn.qkv_proj), id(first.mlp.gate_up_proj), self.training, self.device, self.dtype,
                None if cache is None else (tuple(cache.k.shape), cache.k.dtype))

    @property
    def device(self) -> torch.device:
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.embed_tokens.weight.dtype

    def generate(self, input_ids, **kwargs):
        """Token-level generation; see :func:`models.generate.generate_ids`."""
        from .generate import generate_ids

        return generate_ids(self, input_ids, **kwargs)
