"""RecurrentGemma (Griffin): config, model and its fixed-size generation state.

Residual blocks ``r = x + temporal(temporal_pre_norm(x)); out = r + mlp(channel_pre_norm(r))`` whose
temporal block follows ``block_types`` cyclically: a recurrent block (gelu branch times conv1d ->
RG-LRU branch) or a local multi-query attention block (partial RoPE, sliding window, through the
project's attention entry point). The RG-LRU recurrence runs on :func:`gemma_kernels.rglru.rglru_scan`.

Generation state (:class:`RecurrentState`) is fixed-size: per recurrent layer the last
``conv1d_width - 1`` conv inputs and the float32 RG-LRU state; per attention layer a ring buffer of
the last ``window`` keys and values. Memory and time per token do not grow with the context.

Positions: ``input_pos`` is where a chunk starts in each row's token stream (``0`` restarts the
row); ``position_ids`` (default: the stream positions) drive RoPE, and a position of 0 inside a
sequence starts a new document: the RG-LRU state resets there. How the conv and the attention treat
such a boundary, and whether a query sees ``window`` or ``window + 1`` keys, are the two known
differences between transformers (the default) and Google's ``recurrentgemma``: see the
``attention_window_plus_one`` and ``isolate_documents`` fields of :class:`RecurrentGemmaConfig`.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from gemma_kernels.attention import attention
from gemma_kernels.rglru import rglru_scan

from .config import ConfigError, _read_json
from .gemma import GemmaLM, RMSNorm, apply_rope, rope_cos_sin, rope_inv_freq

__all__ = ["RecurrentGemmaConfig", "RecurrentGemmaLM", "RecurrentState", "recurrent_preset",
           "recurrent_preset_names", "build_from_config", "IGNORED_CHECKPOINT_KEYS"]

RECURRENT = "recurrent"
ATTENTION = "attention"

# Tied LM head: some checkpoints carry it, the module reuses the embedding matrix.
IGNORED_CHECKPOINT_KEYS = (r"lm_head\.weight",)


@dataclass
class RecurrentGemmaConfig:
    vocab_size: int = 256000  # rows of the (tied) embedding matrix
    hidden_size: int = 2560  # residual stream width
    # transformers' convention: the gated MLP's inner width is intermediate_size // 2 (7680 for 2b)
    intermediate_size: int = 15360
    num_hidden_layers: int = 26
    num_attention_heads: int = 10  # attention query heads, and the diagonal blocks of the RG-LRU gates
    num_key_value_heads: int = 1  # KV heads of the local attention (1 = MQA in every official size)
    lru_width: int = 2560  # width of the recurrent branch (linear_x/linear_y outputs, conv, RG-LRU)
    conv1d_width: int = 4  # taps of the causal depthwise convolution before the RG-LRU
    attention_window_size: int = 2048  # keys a local attention query sees, its own included
    # Temporal block of each layer, repeated cyclically over the layers: "recurrent" or "attention".
    block_types: list[str] = field(default_factory=lambda: [RECURRENT, RECURRENT, ATTENTION])
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10_000.0  # RoPE base
    partial_rotary_factor: float = 0.5  # RoPE rotates this leading fraction of each head (the first half)
    logits_soft_cap: float | None = 30.0  # final logits become tanh(l / cap) * cap
    attention_bias: bool = False  # biases on the q/k/v projections (o_proj always has one)
    hidden_activation: str = "gelu_pytorch_tanh"  # of the MLP gate and the recurrent block's y branch
    tie_word_embeddings: bool = True  # LM head is the embedding matrix
    # Longest token stream `generate` accepts. The state does not grow with it; RoPE positions past
    # the 8192 tokens the official models were trained on are extrapolation.
    max_position_embeddings: int = 1 << 20
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2
    # The two known differences from Google's recurrentgemma; the defaults follow transformers.
    # Google: a query sees its own key and the `window` keys before it (window + 1 in all);
    # transformers: `window` keys, its own included.
    attention_window_plus_one: bool = False
    # Google (full forward): at a position 0 inside a sequence (a new document) the conv and the local
    # attention do not look back across it (a token at position p sees only the p tokens before it).
    # transformers (cached forward and generate): only the RG-LRU state resets there.
    isolate_documents: bool = False

    def __post_init__(self) -> None:
        self.block_types = list(self.block_types)
        self.validate()

    # -- derived -------------------------------------------------------------------------------
    @property
    def architecture(self) -> str:
        return "recurrent_gemma"

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    @property
    def mlp_width(self) -> int:
        return self.intermediate_size // 2

    @property
    def layer_types(self) -> list[str]:
        pattern = self.block_types
        return [pattern[i % len(pattern)] for i in range(self.num_hidden_layers)]

    @property
    def attention_keys(self) -> int:
        """Keys one attention query sees (and the ring buffer's length)."""
        return self.attention_window_size + int(self.attention_window_plus_one)

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def validate(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_key_value_heads", "lru_width", "conv1d_width", "attention_window_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must divide hidden_size "
                              f"({self.hidden_size})")
        if self.lru_width % self.num_attention_heads:
            raise ConfigError(f"num_attention_heads ({self.num_attention_heads}) must divide lru_width "
                              f"({self.lru_width}): the RG-LRU gates are block-diagonal per head")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads ({self.num_key_value_heads}) must divide num_attention_heads "
                              f"({self.num_attention_heads})")
        if self.rotary_dim % 2 or not 0 < self.rotary_dim <= self.head_dim:
            raise ConfigError(f"partial_rotary_factor {self.partial_rotary_factor} of head_dim {self.head_dim} "
                              "must give an even rotary width between 2 and head_dim")
        if not self.block_types:
            raise ConfigError("block_types is empty; expected e.g. ['recurrent', 'recurrent', 'attention']")
        bad = sorted({t for t in self.block_types if t not in (RECURRENT, ATTENTION)})
        if bad:
            raise ConfigError(f"unknown block types {bad}; expected {RECURRENT!r} or {ATTENTION!r}")
        if self.hidden_activation not in ("gelu_pytorch_tanh", "gelu"):
            raise ConfigError(f"hidden_activation {self.hidden_activation!r} is not the tanh GELU RecurrentGemma uses")

    def replace(self, **changes) -> RecurrentGemmaConfig:
        return dataclasses.replace(self, **changes)

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict describing the same model (transformers 5.x keys)."""
        out = dict(
            model_type="recurrent_gemma", architectures=["RecurrentGemmaForCausalLM"], vocab_size=self.vocab_size,
            hidden_size=self.hidden_size, intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers, num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads, head_dim=self.head_dim, lru_width=self.lru_width,
            conv1d_width=self.conv1d_width, attention_window_size=self.attention_window_size,
            block_types=list(self.block_types), rms_norm_eps=self.rms_norm_eps,
            rope_parameters={"rope_type": "default", "rope_theta": self.rope_theta,
                             "partial_rotary_factor": self.partial_rotary_factor},
            logits_soft_cap=self.logits_soft_cap, attention_bias=self.attention_bias,
            hidden_activation=self.hidden_activation, tie_word_embeddings=self.tie_word_embeddings,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id,
            max_position_embeddings=self.max_position_embeddings)  # ours; transformers keeps it as an attribute
        # Our settings only when they differ from transformers (which ignores them).
        if self.attention_window_plus_one:
            out["attention_window_plus_one"] = True
        if self.isolate_documents:
            out["isolate_documents"] = True
        return out

    @classmethod
    def from_hf(cls, source) -> RecurrentGemmaConfig:
        """From a Hugging Face ``config.json`` (path, directory or parsed dict) of transformers 4.x
        (``rope_theta``, ``partial_rotary_factor``, official ``_block_types``) or 5.x
        (``rope_parameters``, ``block_types``)."""
        raw = _read_json(source)
        archs = raw.get("architectures") or []
        if raw.get("model_type") != "recurrent_gemma" and "RecurrentGemmaForCausalLM" not in archs:
            raise ConfigError(f"not a RecurrentGemma config: model_type={raw.get('model_type')!r}, "
                              f"architectures={archs}")
        missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                               "num_attention_heads") if k not in raw]
        if missing:
            raise ConfigError(f"RecurrentGemma config lacks {', '.join(missing)}")
        hidden, heads = int(raw["hidden_size"]), int(raw["num_attention_heads"])
        if raw.get("head_dim") not in (None, hidden // heads):
            raise ConfigError(f"head_dim {raw['head_dim']} disagrees with hidden_size / num_attention_heads = "
                              f"{hidden // heads} (RecurrentGemma derives it)")
        rope = raw.get("rope_parameters") or {}
        if rope.get("rope_type", "default") != "default":
            raise ConfigError(f"unsupported rope_type {rope.get('rope_type')!r} (RecurrentGemma uses default RoPE)")
        block_types = raw.get("block_types") or raw.get("_block_types") or [RECURRENT, RECURRENT, ATTENTION]
        soft_cap = raw.get("logits_soft_cap", 30.0)
        return cls(
            vocab_size=int(raw["vocab_size"]), hidden_size=hidden, intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=int(raw["num_hidden_layers"]), num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads") or heads),
            lru_width=int(raw.get("lru_width") or hidden), conv1d_width=int(raw.get("conv1d_width", 4)),
            attention_window_size=int(raw.get("attention_window_size", 2048)), block_types=list(block_types),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-6)),
            rope_theta=float(rope.get("rope_theta", raw.get("rope_theta", 10_000.0))),
            partial_rotary_factor=float(rope.get("partial_rotary_factor", raw.get("partial_rotary_factor", 0.5))),
            logits_soft_cap=float(soft_cap) if soft_cap else None,
            attention_bias=bool(raw.get("attention_bias", False)),
            hidden_activation=raw.get("hidden_activation") or "gelu_pytorch_tanh",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            max_position_embeddings=int(raw.get("max_position_embeddings") or cls.max_position_embeddings),
            pad_token_id=int(raw.get("pad_token_id", 0) or 0), eos_token_id=raw.get("eos_token_id", 1),
            bos_token_id=int(raw.get("bos_token_id", 2)),
            attention_window_plus_one=bool(raw.get("attention_window_plus_one", False)),
            isolate_documents=bool(raw.get("isolate_documents", False)),
        )


_PRESETS = {
    "recurrentgemma-2b": dict(hidden_size=2560, intermediate_size=15360, num_hidden_layers=26,
                              num_attention_heads=10, lru_width=2560),
    "recurrentgemma-9b": dict(hidden_size=4096, intermediate_size=24576, num_hidden_layers=38,
                              num_attention_heads=16, lru_width=4096),
}


def recurrent_preset_names() -> list[str]:
    return sorted([*_PRESETS, *(name + "-it" for name in _PRESETS)])


def recurrent_preset(name: str) -> RecurrentGemmaConfig:
    """The official shapes by name (``recurrentgemma-2b``, ``google/recurrentgemma-9b-it`` ...)."""
    key = name.lower().removeprefix("google/").removesuffix("-it")
    if key not in _PRESETS:
        raise ConfigError(f"unknown RecurrentGemma preset {name!r}; known: {', '.join(recurrent_preset_names())}")
    return RecurrentGemmaConfig(**_PRESETS[key])


def build_from_config(raw: dict) -> RecurrentGemmaLM:
    return RecurrentGemmaLM(RecurrentGemmaConfig.from_hf(raw))


# -- the fixed-size state ---------------------------------------------------------------------------
class RecurrentState:
    """Everything a :class:`RecurrentGemmaLM` carries from one chunk of tokens to the next.

    ``layers[i]`` is ``(conv_inputs (batch, conv1d_width - 1, lru_width), lru (batch, lru_width) float32)``
    for a recurrent layer and ``(keys, values)``, each ``(batch, kv_heads, ring, head_dim)``, for an
    attention layer, where token ``n`` of a row lives in ring slot ``n % ring``. ``seen`` counts the
    tokens each row has consumed (kept on the CPU: it is bookkeeping, read every step). All tensors
    are allocated once and updated in place.
    """

    def __init__(self, config: RecurrentGemmaConfig, batch: int, dtype: torch.dtype, device):
        c = config
        self.kinds = c.layer_types
        self.layers: list[tuple[torch.Tensor, torch.Tensor]] = []
        for kind in self.kinds:
            if kind == RECURRENT:
                self.layers.append((torch.zeros(batch, c.conv1d_width - 1, c.lru_width, dtype=dtype, device=device),
                                    torch.zeros(batch, c.lru_width, dtype=torch.float32, device=device)))
            else:
                shape = (batch, c.num_key_value_heads, c.attention_keys, c.head_dim)
                self.layers.append((torch.zeros(shape, dtype=dtype, device=device),
                                    torch.zeros(shape, dtype=dtype, device=device)))
        self.seen = torch.zeros(batch, dtype=torch.long)

    @property
    def batch(self) -> int:
        return self.seen.shape[0]

    def tensors(self) -> list[torch.Tensor]:
        return [t for pair in self.layers for t in pair] + [self.seen]

    def nbytes(self) -> int:
        """Total bytes of the state (constant for the state's lifetime)."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def restart(self, rows: torch.Tensor) -> None:
        """Forget the rows where ``rows`` (bool, CPU) is set: zero conv inputs and RG-LRU state, no tokens
        seen (stale ring entries are never read: only the ``seen`` most recent slots are)."""
        if not bool(rows.any()):
            return
        every = bool(rows.all())
        index = rows.nonzero()[:, 0]
        for kind, tensors in zip(self.kinds, self.layers, strict=True):
            if kind != RECURRENT:
                continue
            for t in tensors:
                if every:
                    t.zero_()
                else:
                    t[index.to(t.device)] = 0
        self.seen[rows] = 0


class _Step:
    """What every layer of one forward pass shares: positions, resets, padding, state bookkeeping."""

    # seen: tokens each row's state holds before this chunk (CPU tensor; None without a state), and
    # seen_int the same as an int when every row agrees. valid: real tokens per row in this chunk
    # (CPU tensor; None when every row fills the chunk), pad the matching (batch, seq) mask.
    __slots__ = ("positions", "reset", "valid", "pad", "seen", "seen_int", "fresh", "cos", "sin",
                 "query_window", "attention_backend", "scan_backend", "isolate")

    def __init__(self, **values):
        for name in self.__slots__:
            setattr(self, name, values.get(name))


# -- layers -----------------------------------------------------------------------------------------
def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class GatedMLP(nn.Module):
    """``down(gelu_tanh(gate(x)) * up(x))`` with biases, inner width ``intermediate_size // 2``."""

    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(config.hidden_size, config.mlp_width)
        self.up_proj = nn.Linear(config.hidden_size, config.mlp_width)
        self.down_proj = nn.Linear(config.mlp_width, config.hidden_size)

    def forward(self, x):
        return self.down_proj(_gelu(self.gate_proj(x)) * self.up_proj(x))


class CausalConv1d(nn.Module):
    """Depthwise causal convolution over time; ``weight`` ``(width, 1, taps)`` as in nn.Conv1d, the
    last tap on the current token."""

    def __init__(self, width: int, taps: int):
        super().__init__()
        # Google's initialisation (checkpoints overwrite it): normal with variance 0.01 / taps, zero bias.
        self.weight = nn.Parameter(torch.randn(width, 1, taps) * math.sqrt(0.01 / taps))
        self.bias = nn.Parameter(torch.zeros(width))

    def forward(self, x: torch.Tensor, history: torch.Tensor | None, step: _Step):
        """``x`` ``(batch, seq, width)``, ``history`` the ``taps - 1`` inputs before it (None: zeros).
        Returns the output and the ``taps - 1`` inputs before each row's end (its next history)."""
        batch, seq, width = x.shape
        taps = self.weight.shape[2]
        if history is None:
            history = x.new_zeros(batch, taps - 1, width)
        inputs = torch.cat([history.to(x.dtype), x], dim=1)  # (batch, taps - 1 + seq, width)
        out = self.bias.expand(batch, seq, width)
        for tap in range(taps):
            window = inputs[:, tap:tap + seq]
            back = taps - 1 - tap  # how far back this tap looks
            if step.isolate and back:
                window = window * (step.positions >= back)[..., None].to(x.dtype)  # not across a document start
            out = torch.addcmul(out, window, self.weight[:, 0, tap])
        if step.valid is None:
            return out, inputs[:, seq:]
        ends = step.valid.to(x.device)[:, None] + torch.arange(taps - 1, device=x.device)  # (batch, taps - 1)
        return out, inputs.gather(1, ends[..., None].expand(batch, taps - 1, width))


class RGLRU(nn.Module):
    """Real-gated linear recurrent unit with per-head block-diagonal gates (applied as ``x @ W``)."""

    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        heads, block = config.num_attention_heads, config.lru_width // config.num_attention_heads
        self.heads, self.block = heads, block
        # Google's initialisation (checkpoints overwrite it): gates normal with variance 1 / block, zero
        # biases; recurrent_param such that a = exp(-softplus(param)) lies uniformly on the ring 0.9..0.999.
        radius_squared = torch.empty(config.lru_width).uniform_(0.9 ** 2 + 1e-8, 0.999 ** 2 + 1e-8)
        self.recurrent_param = nn.Parameter(torch.log(torch.expm1(-0.5 * torch.log(radius_squared))))
        self.input_gate_weight = nn.Parameter(torch.randn(heads, block, block) * block ** -0.5)
        self.input_gate_bias = nn.Parameter(torch.zeros(heads, block))
        self.recurrent_gate_weight = nn.Parameter(torch.randn(heads, block, block) * block ** -0.5)
        self.recurrent_gate_bias = nn.Parameter(torch.zeros(heads, block))

    def _gate(self, per_head: torch.Tensor, weight, bias, shape) -> torch.Tensor:
        return torch.sigmoid(torch.baddbmm(bias[:, None, :], per_head, weight).transpose(0, 1).reshape(shape))

    def forward(self, x: torch.Tensor, step: _Step, h0: torch.Tensor | None):
        batch, seq, width = x.shape
        per_head = x.reshape(batch * seq, self.heads, self.block).transpose(0, 1)  # (heads, tokens, block)
        gate_x = self._gate(per_head, self.input_gate_weight, self.input_gate_bias, x.shape)
        gate_a = self._gate(per_head, self.recurrent_gate_weight, self.recurrent_gate_bias, x.shape)
        log_a = -8.0 * gate_a * F.softplus(self.recurrent_param)
        a = torch.exp(log_a)
        multiplier = torch.sqrt(1 - torch.exp(2 * log_a))  # keeps the state's scale (1 where the state resets)
        if step.reset is not None:
            multiplier = torch.where(step.reset[..., None], torch.ones((), dtype=x.dtype, device=x.device),
                                     multiplier)
        inputs = x * gate_x * multiplier
        if step.pad is not None:  # padding after a row's end leaves its state as it was
            a = torch.where(step.pad[..., None], a, torch.ones((), dtype=a.dtype, device=a.device))
            inputs = torch.where(step.pad[..., None], inputs, torch.zeros((), dtype=x.dtype, device=x.device))
        return rglru_scan(a, inputs, h0=h0, reset=step.reset, backend=step.scan_backend)


class RecurrentBlock(nn.Module):
    """``linear_out(gelu(linear_y(x)) * RG_LRU(conv1d(linear_x(x))))``, every linear with a bias."""

    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        self.linear_y = nn.Linear(config.hidden_size, config.lru_width)
        self.linear_x = nn.Linear(config.hidden_size, config.lru_width)
        self.linear_out = nn.Linear(config.lru_width, config.hidden_size)
        self.conv_1d = CausalConv1d(config.lru_width, config.conv1d_width)
        self.rg_lru = RGLRU(config)

    def forward(self, x, step: _Step, state):
        batch = x.shape[0]
        y = _gelu(self.linear_y(x))
        history, h0 = (None, None) if state is None else (state[0][:batch], state[1][:batch])
        conv_out, next_history = self.conv_1d(self.linear_x(x), history, step)
        out, h_last = self.rg_lru(conv_out, step, h0)
        if state is not None:
            history.copy_(next_history)
            h0.copy_(h_last)
        return self.linear_out(out * y)


class LocalAttention(nn.Module):
    """Local multi-query attention: partial RoPE, ``head_dim ** -0.5`` scaling, a sliding window."""

    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        c = config
        self.n_heads, self.n_kv, self.head_dim = c.num_attention_heads, c.num_key_value_heads, c.head_dim
        self.q_proj = nn.Linear(c.hidden_size, c.num_attention_heads * c.head_dim, bias=c.attention_bias)
        self.k_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.v_proj = nn.Linear(c.hidden_size, c.num_key_value_heads * c.head_dim, bias=c.attention_bias)
        self.o_proj = nn.Linear(c.num_attention_heads * c.head_dim, c.hidden_size, bias=True)
        self.window = c.attention_keys
        self.scale = c.head_dim ** -0.5

    def _rope(self, x, step: _Step):
        rotary = step.cos.shape[-1]
        return torch.cat([apply_rope(x[..., :rotary], step.cos, step.sin), x[..., rotary:]], dim=-1)

    def forward(self, x, step: _Step, state):
        batch, seq, _ = x.shape
        q = self._rope(self.q_proj(x).view(batch, seq, self.n_heads, self.head_dim).transpose(1, 2), step)
        k = self._rope(self.k_proj(x).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2), step)
        v = self.v_proj(x).view(batch, seq, self.n_kv, self.head_dim).transpose(1, 2)
        if state is not None and seq == 1:
            out = self._decode(q, k, v, step, state[0][:batch], state[1][:batch])
        else:
            keys, values, offset, kv_lens = k, v, 0, step.valid
            if state is not None and not step.fresh:
                keys, values, offset, kv_lens = _with_history(state[0][:batch], state[1][:batch], k, v, step)
            out = _local_attention(q, keys, values, scale=self.scale, window=self.window, q_offset=offset,
                                   kv_lens=kv_lens, query_window=step.query_window, backend=step.attention_backend)
            if state is not None:
                _write_ring(state[0][:batch], state[1][:batch], k, v, step)
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.n_heads * self.head_dim))

    def _decode(self, q, k, v, step: _Step, ring_k, ring_v):
        """One token per row: write its key into the ring first; then every filled slot is in its window."""
        ring = ring_k.shape[2]
        seen = step.seen
        if step.seen_int is not None:
            ring_k[:, :, step.seen_int % ring] = k[:, :, 0]
            ring_v[:, :, step.seen_int % ring] = v[:, :, 0]
            kv_lens = min(step.seen_int + 1, ring)
        else:
            rows = torch.arange(q.shape[0], device=q.device)
            slots = (seen % ring).to(q.device)
            ring_k[rows, :, slots] = k[:, :, 0]
            ring_v[rows, :, slots] = v[:, :, 0]
            kv_lens = (seen + 1).clamp(max=ring)
        if step.query_window is None:
            return attention(q, ring_k, ring_v, scale=self.scale, causal=False, kv_lens=kv_lens,
                             backend=step.attention_backend)
        # Document isolation: slot s holds the token (now - s) mod ring steps back.
        now = seen.to(q.device)[:, None]
        age = (now - torch.arange(ring, device=q.device)) % ring
        visible = (age < step.query_window.reshape(-1, 1)) & (age <= now)  # unfilled slots look older than now
        return _masked_attention(q, ring_k, ring_v, visible[:, None, :], self.scale)


def _with_history(ring_k, ring_v, k, v, step: _Step):
    """Keys of a chunk preceded by the (up to ``ring``) cached keys of each row, in stream order:
    row b holds its ``m_b`` cached keys, then the chunk; its queries start at key ``m_b``."""
    batch, kv_heads, ring, dim = ring_k.shape
    seq = k.shape[2]
    cached = step.seen.clamp(max=ring)  # m_b
    p = torch.arange(ring + seq)[None, :]
    from_ring = (step.seen[:, None] - cached[:, None] + p) % ring
    index = torch.where(p < cached[:, None], from_ring, ring + (p - cached[:, None]).clamp(max=seq - 1))
    index = index.to(k.device)[:, None, :, None].expand(batch, kv_heads, ring + seq, dim)
    keys = torch.cat([ring_k, k], dim=2).gather(2, index)
    values = torch.cat([ring_v, v], dim=2).gather(2, index)
    valid = step.valid if step.valid is not None else torch.full_like(cached, seq)
    return keys, values, cached, cached + valid


def _write_ring(ring_k, ring_v, k, v, step: _Step) -> None:
    """Put each row's last ``ring`` tokens of the stream into their slots (``token % ring``)."""
    batch, kv_heads, ring, dim = ring_k.shape
    seq = k.shape[2]
    seen = step.seen
    valid = step.valid if step.valid is not None else torch.full((batch,), seq)
    end = (seen + valid)[:, None]
    slot = torch.arange(ring)[None, :]
    latest = end - 1 - (end - 1 - slot) % ring  # the newest token that belongs in each slot
    index = torch.where(latest >= seen[:, None], ring + latest - seen[:, None], slot)
    index = index.to(k.device)[:, None, :, None].expand(batch, kv_heads, ring, dim)
    ring_k.copy_(torch.cat([ring_k, k], dim=2).gather(2, index))
    ring_v.copy_(torch.cat([ring_v, v], dim=2).gather(2, index))


_QUERY_BLOCK = 256  # queries per attention call for long inputs on the CPU (fastest of 128..1024 at 8k)


def _local_attention(q, k, v, *, scale, window, q_offset, kv_lens, query_window, backend):
    """Causal attention of ``window`` keys for queries at key index ``q_offset + t`` (int or per row).

    Goes through the attention entry point (the Triton kernels on CUDA). On the CPU a long input is
    cut into blocks of queries, each given only the keys its window reaches, so the work grows with
    ``seq * window`` rather than ``seq ** 2``. ``query_window`` ``(batch, seq)`` narrows the window per
    query (document isolation) and takes an explicit mask.
    """
    seq, keys = q.shape[2], k.shape[2]
    offsets = q_offset if isinstance(q_offset, torch.Tensor) else torch.tensor([q_offset])
    spans = [(0, seq)] if q.is_cuda or seq <= _QUERY_BLOCK else [
        (s, min(seq, s + _QUERY_BLOCK)) for s in range(0, seq, _QUERY_BLOCK)]
    outputs = []
    for start, end in spans:
        lo = max(0, start + int(offsets.min()) - window + 1)
        hi = min(keys, end + int(offsets.max()))
        qb, kb, vb = q[:, :, start:end], k[:, :, lo:hi], v[:, :, lo:hi]
        offset = q_offset + start - lo
        lens = None if kv_lens is None else (kv_lens - lo).clamp(min=0)
        if query_window is None:
            outputs.append(attention(qb, kb, vb, scale=scale, causal=True, window=window, q_offset=offset,
                                     kv_lens=lens, backend=backend))
            continue
        # Keys past a row's length come after its last real query: causality already hides them, and
        # padding queries keep at least their own key (no empty softmax).
        qpos = (torch.as_tensor(offset).reshape(-1, 1) + torch.arange(end - start)).to(q.device)[..., None]
        kpos = torch.arange(hi - lo, device=q.device)
        visible = (kpos <= qpos) & (kpos > qpos - query_window[:, start:end, None])
        outputs.append(_masked_attention(qb, kb, vb, visible, scale))
    return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=2)


def _masked_attention(q, k, v, visible: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention under an explicit ``(batch, q_len, kv_len)`` mask (document isolation only)."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=visible[:, None], scale=scale)


class ResidualBlock(nn.Module):
    def __init__(self, config: RecurrentGemmaConfig, layer: int):
        super().__init__()
        self.kind = config.layer_types[layer]
        self.temporal_pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.temporal_block = RecurrentBlock(config) if self.kind == RECURRENT else LocalAttention(config)
        self.channel_pre_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp_block = GatedMLP(config)

    def forward(self, h, step: _Step, state):
        residual = h + self.temporal_block(self.temporal_pre_norm(h), step, state)
        return residual + self.mlp_block(self.channel_pre_norm(residual))


class RecurrentGemmaDecoder(nn.Module):
    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(ResidualBlock(config, i) for i in range(config.num_hidden_layers))
        self.final_norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class RecurrentGemmaLM(nn.Module):
    """A RecurrentGemma causal LM: ``model(input_ids)`` returns logits ``(batch, seq, vocab)``.

    With a state set up (:meth:`setup_cache`), pass ``input_pos`` (an int, or one start per row) to
    continue each row's stream from its state (``input_pos`` equal to the tokens it has seen) or
    restart it (``input_pos`` 0); the state then holds the stream up to this chunk's end. The same
    protocol as :class:`~models.gemma.GemmaLM`, so :func:`models.generate` drives both.
    """

    def __init__(self, config: RecurrentGemmaConfig):
        super().__init__()
        self.config = config
        self.model = RecurrentGemmaDecoder(config)
        if not config.tie_word_embeddings:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.register_buffer("inv_freq", rope_inv_freq(config.head_dim, config.rope_theta,
                                                       rotary_dim=config.rotary_dim), persistent=False)
        self.attention_backend: str | None = None  # None: the entry points' defaults (auto)
        self.scan_backend: str | None = None
        self.state: RecurrentState | None = None
        self.cache_batch = 0

    # -- state ---------------------------------------------------------------------------------
    def setup_cache(self, batch_size: int, max_len: int | None = None, dtype: torch.dtype | None = None,
                    device=None) -> None:
        """Allocate the fixed-size state for ``batch_size`` rows (reused while it fits). ``max_len`` is
        accepted for the generation protocol and ignored: the state does not depend on it."""
        dtype = dtype or self.dtype
        device = torch.device(device or self.device)
        s = self.state
        first = None if s is None else s.layers[0][0]
        # Tensors made under inference_mode (as in generate) cannot be updated in place outside it.
        if (first is None or s.batch < batch_size or first.dtype != dtype or first.device != device
                or (first.is_inference() and not torch.is_inference_mode_enabled())):
            self.state = RecurrentState(self.config, batch_size, dtype, device)
        self.cache_batch = batch_size

    def clear_cache(self) -> None:
        self.state = None
        self.cache_batch = 0

    # -- forward -------------------------------------------------------------------------------
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token embeddings times sqrt(hidden) rounded to bfloat16 first (50.5 for 2560), in every dtype."""
        h = self.model.embed_tokens(input_ids)
        return h * torch.tensor(math.sqrt(self.config.hidden_size), dtype=torch.bfloat16).to(h.dtype)

    def hidden_states(self, input_ids: torch.Tensor | None = None, *, inputs_embeds: torch.Tensor | None = None,
                      input_pos: int | torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                      kv_lens: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states ``(batch, seq, hidden)``.

        Without ``input_pos`` the chunk is a whole sequence and the state is neither read nor written.
        ``kv_lens`` ``(batch,)`` is each row's stream length after this chunk when rows are right-padded
        (the state ends at each row's last real token; without ``input_pos`` padding after the real
        tokens changes nothing and ``kv_lens`` is not needed). ``position_ids`` ``(batch, seq)``
        default to the stream positions; a 0 inside starts a new document.
        """
        h = self.embed(input_ids) if inputs_embeds is None else inputs_embeds
        batch, seq = h.shape[:2]
        if seq == 0:
            raise ValueError("empty input: at least one token per row is needed")
        step = self._step(batch, seq, h.device, input_pos, position_ids, kv_lens)
        cos, sin = rope_cos_sin(step.positions, self.inv_freq, h.dtype)
        step.cos, step.sin = cos, sin
        state_layers = self.state.layers if input_pos is not None else [None] * len(self.model.layers)
        for layer, state in zip(self.model.layers, state_layers, strict=True):
            h = layer(h, step, state)
        if input_pos is not None:
            self.state.seen[:batch] = step.seen + (step.valid if step.valid is not None else seq)
        return self.model.final_norm(h)

    def _step(self, batch, seq, device, input_pos, position_ids, kv_lens) -> _Step:
        c = self.config
        step = _Step(attention_backend=self.attention_backend, scan_backend=self.scan_backend,
                     isolate=c.isolate_documents, fresh=True)
        start: int | torch.Tensor = 0
        if input_pos is not None:
            starts = self._checked_starts(batch, input_pos)
            if kv_lens is not None:  # checked before the state changes
                kv_lens = torch.as_tensor(kv_lens).to("cpu", torch.long)
                valid = kv_lens - starts if kv_lens.shape == (batch,) else None
                if valid is None or bool((valid < 1).any()) or bool((valid > seq).any()):
                    raise ValueError(f"kv_lens must hold, per row, its stream length after this chunk: between "
                                     f"input_pos + 1 and input_pos + {seq}; got {kv_lens.tolist()}")
                if bool((valid < seq).any()):
                    step.valid = valid
                    step.pad = (torch.arange(seq)[None, :] < valid[:, None]).to(device)
            state = self.state
            state.restart(torch.cat([starts == 0, torch.zeros(state.batch - batch, dtype=torch.bool)]))
            step.seen = state.seen[:batch].clone()
            start = int(starts[0]) if bool((starts == starts[0]).all()) else starts
            step.seen_int = start if isinstance(start, int) else None
            step.fresh = bool((step.seen == 0).all())
        if position_ids is None:
            base = torch.arange(seq, device=device)[None, :]
            position_ids = (base + (start if isinstance(start, int) else start.to(device)[:, None])).expand(batch, seq)
            has_reset = bool((start == 0).any()) if isinstance(start, torch.Tensor) else start == 0
        else:
            if tuple(position_ids.shape) != (batch, seq):
                raise ValueError(f"position_ids must be (batch, seq) = ({batch}, {seq}), got {tuple(position_ids.shape)}")
            position_ids = position_ids.to(device=device, dtype=torch.long)
            has_reset = bool((position_ids == 0).any())
        step.positions = position_ids
        if has_reset:
            step.reset = position_ids == 0
            if step.pad is not None:
                step.reset &= step.pad
        if c.isolate_documents and ATTENTION in c.layer_types:
            step.query_window = self._query_window(step, seq)
        return step

    def _checked_starts(self, batch: int, input_pos) -> torch.Tensor:
        """``input_pos`` per row (CPU), each either 0 (restart) or the tokens its state holds (continue)."""
        state = self.state
        if state is None:
            raise RuntimeError("input_pos given but no state: call setup_cache(batch) first")
        if batch > self.cache_batch:
            raise ValueError(f"batch {batch} exceeds the state's batch {self.cache_batch}")
        starts = torch.as_tensor(input_pos).to("cpu", torch.long).reshape(-1)
        if starts.numel() not in (1, batch):
            raise ValueError(f"input_pos must be an int or one start per row ({batch}), got {starts.numel()} values")
        starts = starts.expand(batch).clone()
        seen = state.seen[:batch]
        bad = (starts != 0) & (starts != seen)
        if bool(bad.any()):
            row = int(bad.nonzero()[0, 0])
            raise ValueError(f"row {row}: input_pos {int(starts[row])} but its recurrent state holds "
                             f"{int(seen[row])} tokens; continue at {int(seen[row])} or restart at 0")
        return starts

    def _query_window(self, step: _Step, seq: int) -> torch.Tensor | None:
        """Per-query windows ``min(window, position + 1)`` when they hide a key the window would show."""
        window = self.config.attention_keys
        earlier = torch.arange(seq)[None, :]  # keys before each query in its attention call
        if step.seen is not None and (seq == 1 or not step.fresh):
            earlier = earlier + step.seen[:, None].clamp(max=window - 1 if seq == 1 else window)
        narrower = step.positions.cpu() < earlier.clamp(max=window - 1)
        return (step.positions + 1).clamp(max=window) if bool(narrower.any()) else None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """LM head (tied) and the final soft cap."""
        weight = self.lm_head.weight if hasattr(self, "lm_head") else self.model.embed_tokens.weight
        out = F.linear(hidden, weight)
        cap = self.config.logits_soft_cap
        return torch.tanh(out / cap) * cap if cap else out

    # The rest of the causal-LM protocol is GemmaLM's, written over hidden_states, logits and embed_tokens.
    forward = GemmaLM.forward
    device = GemmaLM.device
    dtype = GemmaLM.dtype
    generate = GemmaLM.generate
