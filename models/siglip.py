"""SigLIP: the vision transformer of PaliGemma and of standalone SigLIP checkpoints, and its sigmoid loss.

The tower: a ``Conv2d(patch, stride=patch)`` patch embedding plus one learned position embedding per
patch (no CLS token); pre-LayerNorm encoder layers ``h += attn(ln1(h))``, ``h += mlp(ln2(h))`` with
biases everywhere, non-causal multi-head attention (head_dim 72 in So400m, through
:func:`gemma_kernels.attention.attention` so CUDA runs the Triton kernels), a GELU-tanh MLP; a final
``post_layernorm``. Standalone checkpoints add a MAP head (a learned probe attends over the patches,
then LayerNorm + MLP with a residual) that pools the patches into one image embedding; PaliGemma
does not use it.

Module names follow Hugging Face's (``embeddings.patch_embedding``, ``encoder.layers.{i}.self_attn.q_proj``,
``post_layernorm``, ``head.attention.in_proj_weight`` ...) so checkpoints load as they are.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from gemma_kernels.attention import attention

from .config import ConfigError

__all__ = ["SiglipVisionConfig", "SiglipVisionModel", "sigmoid_loss", "build_from_config",
           "normalize_checkpoint_keys", "IGNORED_CHECKPOINT_KEYS"]


@dataclass
class SiglipVisionConfig:
    hidden_size: int = 1152  # patch embedding width (So400m: 1152)
    intermediate_size: int = 4304  # MLP inner width (So400m: 4304, not the 4096 of some library defaults)
    num_hidden_layers: int = 27
    num_attention_heads: int = 16  # head_dim = hidden_size / heads (72 for So400m)
    num_channels: int = 3
    image_size: int = 224  # square input side in pixels
    patch_size: int = 14
    layer_norm_eps: float = 1e-6
    hidden_act: str = "gelu_pytorch_tanh"  # the tanh approximation of GELU
    use_head: bool = False  # the MAP pooling head of standalone SigLIP checkpoints

    def __post_init__(self) -> None:
        for name in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                     "num_channels", "image_size", "patch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"vision {name} must be >= 1, got {getattr(self, name)}")
        if self.hidden_size % self.num_attention_heads:
            raise ConfigError(f"vision hidden_size ({self.hidden_size}) must be divisible by "
                              f"num_attention_heads ({self.num_attention_heads})")
        if self.image_size < self.patch_size:
            raise ConfigError(f"vision image_size ({self.image_size}) is smaller than patch_size ({self.patch_size})")
        if self.hidden_act not in _ACTIVATIONS:
            raise ConfigError(f"vision hidden_act {self.hidden_act!r} is not supported; "
                              f"expected one of {sorted(_ACTIVATIONS)}")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patches_per_side(self) -> int:
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens per image (224 px / 14 -> 256; 448 -> 1024; 896 -> 4096)."""
        return self.patches_per_side ** 2

    @classmethod
    def from_hf(cls, raw: dict, defaults: SiglipVisionConfig | None = None) -> SiglipVisionConfig:
        """From a ``vision_config`` dict (or a standalone ``siglip_vision_model`` config.json).

        Fields the dict lacks come from ``defaults`` (which the caller picks for the checkpoint family:
        So400m for PaliGemma, transformers' documented defaults for standalone SigLIP).
        """
        base = dataclasses.asdict(defaults or cls())
        image_size = raw.get("image_size", base["image_size"])
        if isinstance(image_size, (list, tuple)):
            if len(image_size) != 2 or image_size[0] != image_size[1]:
                raise ConfigError(f"vision image_size {image_size} is not square; SigLIP needs a square input")
            image_size = image_size[0]
        patch_size = raw.get("patch_size", base["patch_size"])
        if isinstance(patch_size, (list, tuple)):
            patch_size = patch_size[0]
        get = lambda key, field: raw.get(key, base[field])  # noqa: E731
        return cls(
            hidden_size=int(get("hidden_size", "hidden_size")),
            intermediate_size=int(get("intermediate_size", "intermediate_size")),
            num_hidden_layers=int(get("num_hidden_layers", "num_hidden_layers")),
            num_attention_heads=int(get("num_attention_heads", "num_attention_heads")),
            num_channels=int(get("num_channels", "num_channels")),
            image_size=int(image_size),
            patch_size=int(patch_size),
            layer_norm_eps=float(get("layer_norm_eps", "layer_norm_eps")),
            hidden_act=str(get("hidden_act", "hidden_act")),
            use_head=bool(get("vision_use_head", "use_head")),
        )


def _gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# Every tanh-approximate spelling computes the same function; "gelu" is the exact erf form.
_ACTIVATIONS = {"gelu_pytorch_tanh": _gelu_tanh, "gelu_fast": _gelu_tanh, "gelu_new": _gelu_tanh,
                "gelu": F.gelu}

# transformers' SiglipVisionConfig defaults (siglip-base-patch16-224), which standalone checkpoints
# rely on for the fields their config.json leaves out.
STANDALONE_DEFAULTS = SiglipVisionConfig(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                         num_attention_heads=12, image_size=224, patch_size=16, use_head=True)


class SiglipEmbeddings(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.patch_size = config.patch_size
        self.patch_embedding = nn.Conv2d(config.num_channels, config.hidden_size, kernel_size=config.patch_size,
                                         stride=config.patch_size, padding="valid")
        self.position_embedding = nn.Embedding(config.num_patches, config.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(dtype=weight.dtype))  # (B, D, H/p, W/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, D), row-major patch order
        return patches + self.position_embedding.weight[None]


class SiglipAttention(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        d = config.hidden_size
        self.n_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj = nn.Linear(d, d)
        self.k_proj = nn.Linear(d, d)
        self.v_proj = nn.Linear(d, d)
        self.out_proj = nn.Linear(d, d)

    def forward(self, x: torch.Tensor, backend: str | None) -> torch.Tensor:
        b, n, _ = x.shape
        split = lambda t: t.view(b, n, self.n_heads, self.head_dim).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        out = attention(q, k, v, scale=self.head_dim ** -0.5, causal=False, backend=backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, n, self.n_heads * self.head_dim))


class SiglipMLP(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.act = _ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class SiglipEncoderLayer(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.self_attn = SiglipAttention(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, h: torch.Tensor, backend: str | None) -> torch.Tensor:
        h = h + self.self_attn(self.layer_norm1(h), backend)
        return h + self.mlp(self.layer_norm2(h))


class SiglipEncoder(nn.Module):
    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(SiglipEncoderLayer(config) for _ in range(config.num_hidden_layers))


class PoolingAttention(nn.Module):
    """``torch.nn.MultiheadAttention``'s parameters (packed q/k/v projection) computed with our kernel."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.n_heads, self.head_dim = heads, dim // heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, query: torch.Tensor, keys: torch.Tensor, backend: str | None) -> torch.Tensor:
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        b, lq, d = query.shape
        lk = keys.shape[1]
        q = F.linear(query, wq, bq).view(b, lq, self.n_heads, self.head_dim).transpose(1, 2)
        k = F.linear(keys, wk, bk).view(b, lk, self.n_heads, self.head_dim).transpose(1, 2)
        v = F.linear(keys, wv, bv).view(b, lk, self.n_heads, self.head_dim).transpose(1, 2)
        out = attention(q, k, v, scale=self.head_dim ** -0.5, causal=False, backend=backend)
        return self.out_proj(out.transpose(1, 2).reshape(b, lq, d))


class SiglipPoolingHead(nn.Module):
    """Multi-head attention pooling (MAP): a learned probe attends over all patches."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.probe = nn.Parameter(torch.empty(1, 1, config.hidden_size))
        self.attention = PoolingAttention(config.hidden_size, config.num_attention_heads)
        self.layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = SiglipMLP(config)

    def forward(self, h: torch.Tensor, backend: str | None) -> torch.Tensor:
        pooled = self.attention(self.probe.expand(h.shape[0], -1, -1), h, backend)
        pooled = pooled + self.mlp(self.layernorm(pooled))
        return pooled[:, 0]


class SiglipVisionModel(nn.Module):
    """The SigLIP tower: ``model(pixel_values)`` -> patch features ``(batch, num_patches, hidden)``
    after ``post_layernorm``; :meth:`pool` (MAP head) -> one embedding per image."""

    def __init__(self, config: SiglipVisionConfig):
        super().__init__()
        self.config = config
        self.embeddings = SiglipEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        if config.use_head:
            self.head = SiglipPoolingHead(config)
        self.attention_backend: str | None = None  # None: the attention entry point's default (auto)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        c = self.config
        if pixel_values.dim() != 4 or pixel_values.shape[1] != c.num_channels:
            raise ValueError(f"pixel_values must be (batch, {c.num_channels}, height, width), "
                             f"got {tuple(pixel_values.shape)}")
        if tuple(pixel_values.shape[2:]) != (c.image_size, c.image_size):
            raise ValueError(f"pixel_values are {tuple(pixel_values.shape[2:])} pixels but this model takes "
                             f"{c.image_size}x{c.image_size}; resize with models.image.preprocess")
        h = self.embeddings(pixel_values)
        for layer in self.encoder.layers:
            h = layer(h, self.attention_backend)
        return self.post_layernorm(h)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        """One embedding per image ``(batch, hidden)`` from :meth:`forward`'s features (MAP head)."""
        if not self.config.use_head:
            raise ValueError("this SigLIP tower has no pooling head (vision_use_head is false)")
        return self.head(features, self.attention_backend)

    def image_embeds(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.pool(self.forward(pixel_values))

    @property
    def device(self) -> torch.device:
        return self.embeddings.patch_embedding.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.embeddings.patch_embedding.weight.dtype


def sigmoid_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor | float,
                 logit_bias: torch.Tensor | float, *, normalize: bool = True) -> torch.Tensor:
    """SigLIP's pairwise sigmoid loss over a batch of ``n`` matching (image, text) pairs.

    ``logits = exp(logit_scale) * z_img @ z_txt.T + logit_bias`` with L2-normalised embeddings
    (``normalize=False`` if they already are); labels are +1 on the diagonal (matching pairs) and -1
    elsewhere; ``loss = -sum(log_sigmoid(labels * logits)) / n`` over all ``n^2`` pairs. SigLIP
    initialises ``logit_scale = log 10`` and ``logit_bias = -10``.
    """
    if image_embeds.dim() != 2 or image_embeds.shape != text_embeds.shape:
        raise ValueError(f"image and text embeddings must both be (n, dim), got {tuple(image_embeds.shape)} "
                         f"and {tuple(text_embeds.shape)}")
    zi, zt = image_embeds.float(), text_embeds.float()
    if normalize:
        zi, zt = F.normalize(zi, dim=-1), F.normalize(zt, dim=-1)
    scale = torch.as_tensor(logit_scale, dtype=torch.float32, device=zi.device).exp()
    bias = torch.as_tensor(logit_bias, dtype=torch.float32, device=zi.device)
    logits = scale * zi @ zt.T + bias
    n = logits.shape[0]
    labels = 2 * torch.eye(n, device=logits.device) - 1
    return -F.logsigmoid(labels * logits).sum() / n


# -- checkpoint conventions (models.loading.ARCHITECTURES: "siglip", "siglip_vision_model") ----------------
# A full SigLIP checkpoint (model_type "siglip") also carries the text tower and the loss parameters:
# only the vision tower is built, and these keys are knowingly left out.
IGNORED_CHECKPOINT_KEYS = (r"text_model\..*", r"logit_scale", r"logit_bias")


def build_from_config(raw: dict) -> SiglipVisionModel:
    """The vision tower of a standalone SigLIP checkpoint (``siglip`` or ``siglip_vision_model``)."""
    if raw.get("model_type") == "siglip" or "vision_config" in raw:
        raw = raw.get("vision_config") or {}
    return SiglipVisionModel(SiglipVisionConfig.from_hf(raw, STANDALONE_DEFAULTS))


def normalize_checkpoint_keys(state: dict) -> dict:
    """``vision_model.embeddings...`` (SiglipModel and older SiglipVisionModel saves) -> ``embeddings...``."""
    return {re.sub(r"^vision_model\.", "", k): v for k, v in state.items()}

