"""BERT encoders (BERT, MiniLM, BGE/E5-small ...): the text tower of sentence-embedding models.

Post-LayerNorm encoder layers ``h = ln1(h + attn(h))``, ``h = ln2(h + mlp(h))`` with biases
everywhere, bidirectional multi-head attention over the unpadded tokens (right padding, through
:func:`gemma_kernels.attention.attention` with ``kv_lens`` so CUDA runs the Triton kernels), exact-erf GELU.
Embeddings are word + learned absolute position + token type, then LayerNorm.

Module names follow Hugging Face's ``BertModel`` (``embeddings.word_embeddings``,
``encoder.layer.{i}.attention.self.query``, ``encoder.layer.{i}.output.LayerNorm`` ...) so
checkpoints load as they are; the pooler (unused by sentence embedders) is not built.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemma_kernels.attention import attention

from .config import ConfigError

__all__ = ["BertConfig", "BertModel", "build_from_config", "normalize_checkpoint_keys", "IGNORED_CHECKPOINT_KEYS"]

_ACTIVATIONS = {"gelu": F.gelu, "relu": F.relu,
                "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}


@dataclass
class BertConfig:
    vocab_size: int = 30522
    hidden_size: int = 384  # all-MiniLM-L6-v2: 384; bert-base: 768
    num_hidden_layers: int = 6
    num_attention_heads: int = 12  # head_dim = hidden_size / heads (32 for MiniLM-L6)
    intermediate_size: int = 1536
    hidden_act: str = "gelu"  # exact erf GELU, as BERT was trained
    max_position_embeddings: int = 512  # longest input in tokens, [CLS] and [SEP] included
    type_vocab_size: int = 2  # segment ids (0 for single sentences)
    layer_norm_eps: float = 1e-12

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                     "intermediate_size", "max_position_embeddings", "type_vocab_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"BERT {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"BERT hidden_size ({self.hidden_size}) must be divisible by "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"BERT hidden_act {self.hidden_act!r} is not supported; "
                              f"expected one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def from_hf(cls, raw: dict) -> BertConfig:
        """From a Hugging Face ``config.json`` dict (``model_type`` "bert"); absent fields keep defaults."""
        if raw.get("model_type", "bert") != "bert":
            raise ConfigError(f"model_type {raw.get('model_type')!r} is not a BERT encoder; supported: bert")
        if raw.get("position_embedding_type", "absolute") != "absolute":
            raise ConfigError(f"position_embedding_type {raw['position_embedding_type']!r} is not supported "
                              "(only absolute)")
        fields = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in raw.items() if k in fields})


class BertEmbeddings(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        h = self.word_embeddings(input_ids) + self.position_embeddings(positions)[None]
        return self.LayerNorm(h + self.token_type_embeddings(token_type_ids))


class BertSelfAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.query, self.key, self.value = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)


class BertProjection(nn.Module):
    """``LayerNorm(residual + dense(x))``: the output block after attention and after the MLP."""

    def __init__(self, d_in: int, d_out: int, eps: float):
        super().__init__()
        self.dense = nn.Linear(d_in, d_out)
        self.LayerNorm = nn.LayerNorm(d_out, eps=eps)

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(residual + self.dense(x))


class BertAttention(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.self = BertSelfAttention(config)
        self.output = BertProjection(config.hidden_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor, backend: str | None) -> torch.Tensor:
        b, n, d = h.shape
        s = self.self
        split = lambda t: t.view(b, n, s.n_heads, s.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(s.query(h)), split(s.key(h)), split(s.value(h))
        out = attention(q, k, v, scale=s.head_dim ** -0.5, causal=False, kv_lens=lengths, backend=backend)
        return self.output(out.transpose(1, 2).reshape(b, n, d), h)


class BertIntermediate(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.dense = nn.Linear(config.hidden_size, config.intermediate_size)
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.dense(x))


class BertLayer(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.attention = BertAttention(config)
        self.intermediate = BertIntermediate(config)
        self.output = BertProjection(config.intermediate_size, config.hidden_size, config.layer_norm_eps)

    def forward(self, h: torch.Tensor, lengths: torch.Tensor, backend: str | None) -> torch.Tensor:
        h = self.attention(h, lengths, backend)
        return self.output(self.intermediate(h), h)


class BertEncoder(nn.Module):
    def __init__(self, config: BertConfig):
        super().__init__()
        self.layer = nn.ModuleList(BertLayer(config) for _ in range(config.num_hidden_layers))


class BertModel(nn.Module):
    """``model(input_ids, lengths)`` -> last hidden states ``(batch, seq, hidden)``.

    Sequences are right-padded; ``lengths`` (batch,) counts each row's real tokens. Hidden states at
    padded positions are computed but meaningless: pool over the first ``lengths[i]`` positions.
    """

    def __init__(self, config: BertConfig):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.encoder = BertEncoder(config)
        self.attention_backend: str | None = None  # None: the attention entry point's default (auto)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got {tuple(input_ids.shape)}")
        b, n = input_ids.shape
        if n > self.config.max_position_embeddings:
            raise ValueError(f"input of {n} tokens is longer than max_position_embeddings "
                             f"({self.config.max_position_embeddings}); truncate it")
        if lengths is None:
            lengths = torch.full((b,), n, dtype=torch.int32, device=input_ids.device)
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        h = self.embeddings(input_ids, token_type_ids)
        for layer in self.encoder.layer:
            h = layer(h, lengths.to(torch.int32), self.attention_backend)
        return h

    @property
    def device(self) -> torch.device:
        return self.embeddings.word_embeddings.weight.device


# -- checkpoint conventions -----------------------------------------------------------------------------
# The pooler (a tanh dense layer over [CLS] for next-sentence prediction) is not used by sentence
# embedders; position_ids is a buffer some checkpoints saved.
IGNORED_CHECKPOINT_KEYS = (r"pooler\..*", r"embeddings\.position_ids", r"cls\..*")


def build_from_config(raw: dict) -> BertModel:
    return BertModel(BertConfig.from_hf(raw))


def normalize_checkpoint_keys(state: dict) -> dict:
    """``bert.encoder...`` (BertForX checkpoints) -> ``encoder...``."""
    return {k.removeprefix("bert."): v for k, v in state.items()}
