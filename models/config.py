"""One configuration for the Gemma decoder family (Gemma 1, 2, 3 text).

Gemma 1, 2 and 3 differ only in fields of :class:`GemmaConfig` (attention type per layer, window,
softcaps, query scaling, qk-norm, sandwich norms, rope bases and scaling), never in classes.
Named presets cover every official size; :meth:`GemmaConfig.from_hf` reads a Hugging Face
``config.json`` and :meth:`GemmaConfig.from_gguf_metadata` a GGUF header.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = ["GemmaConfig", "ConfigError", "PRESETS", "preset", "preset_names"]

FULL = "full_attention"
SLIDING = "sliding_attention"


class ConfigError(ValueError):
    """A configuration that cannot describe a Gemma decoder (names the field and the problem)."""


@dataclass
class GemmaConfig:
    # Which generation of Gemma this is: "gemma" (1), "gemma2" or "gemma3". Informational for the
    # numerics (every difference is a field below) but used to pick checkpoint conventions.
    architecture: str = "gemma3"
    vocab_size: int = 262144  # rows of the (tied) embedding matrix
    hidden_size: int = 640  # residual stream width
    intermediate_size: int = 2048  # GeGLU inner width
    num_hidden_layers: int = 18
    num_attention_heads: int = 4  # query heads
    num_key_value_heads: int = 1  # KV heads; must divide query heads (GQA; 1 = MQA)
    head_dim: int = 256  # per-head width; not always hidden_size / heads in Gemma
    max_position_embeddings: int = 32768  # longest context the model was trained for
    rms_norm_eps: float = 1e-6
    # Attention scores are scaled by query_pre_attn_scalar ** -0.5 (Gemma 2/3); None means
    # head_dim ** -0.5 (Gemma 1).
    query_pre_attn_scalar: float | None = 256
    attn_logit_softcapping: float | None = None  # Gemma 2: tanh(s / 50) * 50 after scaling
    final_logit_softcapping: float | None = None  # Gemma 2: tanh(l / 30) * 30 on the logits
    sliding_window: int | None = 512  # keys a local layer sees, the query's own included
    # Per layer: "full_attention" (global) or "sliding_attention" (local, uses sliding_window).
    layer_types: list[str] = field(default_factory=list)
    rope_theta: float = 1_000_000.0  # RoPE base of global layers
    rope_local_base_freq: float = 10_000.0  # RoPE base of local layers
    rope_scaling_factor: float = 1.0  # linear RoPE scaling (positions / factor) on global layers
    use_qk_norm: bool = True  # Gemma 3: RMSNorm over head_dim on q and k before RoPE
    # Gemma 2/3 "sandwich" norms: post-attention, pre- and post-feedforward RMSNorms. Gemma 1 has
    # only input and pre-MLP norms (its pre-MLP norm is named post_attention_layernorm).
    use_post_norms: bool = True
    hidden_activation: str = "gelu_pytorch_tanh"  # GeGLU gate activation (always tanh GELU)
    tie_word_embeddings: bool = True  # LM head is the embedding matrix
    pad_token_id: int = 0
    eos_token_id: int | list[int] = 1
    bos_token_id: int = 2

    def __post_init__(self) -> None:
        if not self.layer_types:
            self.layer_types = default_layer_types(self.architecture, self.num_hidden_layers)
        self.validate()

    # -- derived -------------------------------------------------------------------------------
    @property
    def attn_scale(self) -> float:
        base = self.query_pre_attn_scalar if self.query_pre_attn_scalar is not None else self.head_dim
        return float(base) ** -0.5

    def is_sliding(self, layer: int) -> bool:
        return self.layer_types[layer] == SLIDING

    @property
    def eos_token_ids(self) -> list[int]:
        return list(self.eos_token_id) if isinstance(self.eos_token_id, (list, tuple)) else [self.eos_token_id]

    def validate(self) -> None:
        if self.architecture not in ("gemma", "gemma2", "gemma3"):
            raise ConfigError(f"architecture must be gemma, gemma2 or gemma3, got {self.architecture!r}")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(f"num_key_value_heads ({self.num_key_value_heads}) must divide "
                              f"num_attention_heads ({self.num_attention_heads})")
        if len(self.layer_types) != self.num_hidden_layers:
            raise ConfigError(f"layer_types has {len(self.layer_types)} entries for "
                              f"{self.num_hidden_layers} layers")
        bad = sorted({t for t in self.layer_types if t not in (FULL, SLIDING)})
        if bad:
            raise ConfigError(f"unknown layer types {bad}; expected {FULL!r} or {SLIDING!r}")
        if SLIDING in self.layer_types and not self.sliding_window:
            raise ConfigError("sliding layers need sliding_window")

    def replace(self, **changes) -> GemmaConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_hf(self) -> dict[str, Any]:
        """A Hugging Face ``config.json`` dict describing the same model (transformers 5.x keys)."""
        model_type, arch = {"gemma": ("gemma", "GemmaForCausalLM"), "gemma2": ("gemma2", "Gemma2ForCausalLM"),
                            "gemma3": ("gemma3_text", "Gemma3ForCausalLM")}[self.architecture]
        out: dict[str, Any] = dict(
            model_type=model_type, architectures=[arch], vocab_size=self.vocab_size, hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size, num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads, num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim, max_position_embeddings=self.max_position_embeddings,
            rms_norm_eps=self.rms_norm_eps, hidden_activation=self.hidden_activation,
            tie_word_embeddings=self.tie_word_embeddings, pad_token_id=self.pad_token_id,
            eos_token_id=self.eos_token_id, bos_token_id=self.bos_token_id)
        if self.architecture == "gemma":
            out["rope_theta"] = self.rope_theta
            return out
        scalar = self.query_pre_attn_scalar
        scalar = int(scalar) if scalar is not None and float(scalar).is_integer() else scalar
        out.update(query_pre_attn_scalar=scalar, sliding_window=self.sliding_window,
                   layer_types=list(self.layer_types), final_logit_softcapping=self.final_logit_softcapping,
                   attn_logit_softcapping=self.attn_logit_softcapping)
        if self.architecture == "gemma2":
            out["rope_theta"] = self.rope_theta
            return out
        full = {"rope_type": "default", "rope_theta": self.rope_theta}
        if self.rope_scaling_factor != 1.0:
            full = {"rope_type": "linear", "factor": self.rope_scaling_factor, "rope_theta": self.rope_theta}
        out["rope_parameters"] = {"full_attention": full,
                                  "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq}}
        return out

    # -- readers -------------------------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | os.PathLike | dict) -> GemmaConfig:
        """From a Hugging Face ``config.json`` (path, directory or parsed dict).

        Understands GemmaForCausalLM, Gemma2ForCausalLM and Gemma3ForCausalLM configs of
        transformers 4.x and 5.x (``rope_scaling``/``rope_local_base_freq`` or ``rope_parameters``;
        ``sliding_window_pattern`` or explicit ``layer_types``), and the ``text_config`` of a Gemma 3
        multimodal config.
        """
        raw = _read_json(source)
        if "text_config" in raw and "hidden_size" not in raw:
            raw = {**raw["text_config"], "architectures": raw.get("architectures")}
        model_type = raw.get("model_type")
        arch = _architecture_of(raw)
        if arch is None:
            raise ConfigError(
                f"unknown architecture in config.json: architectures={raw.get('architectures')}, "
                f"model_type={model_type!r}; expected a Gemma, Gemma 2 or Gemma 3 text decoder")
        defaults = _ARCH_DEFAULTS[arch]
        get = lambda key, default=None: raw.get(key, defaults.get(key, default))  # noqa: E731
        n_layers = int(raw["num_hidden_layers"])
        heads = int(raw["num_attention_heads"])
        hidden = int(raw["hidden_size"])
        layer_types = raw.get("layer_types")
        if not layer_types:
            layer_types = default_layer_types(arch, n_layers, raw.get("sliding_window_pattern"))
        rope_global, rope_local, factor = _rope_fields(raw, arch)
        sliding = raw.get("sliding_window", defaults.get("sliding_window"))
        return cls(
            architecture=arch,
            vocab_size=int(raw["vocab_size"]),
            hidden_size=hidden,
            intermediate_size=int(raw["intermediate_size"]),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(raw.get("num_key_value_heads", heads)),
            head_dim=int(raw.get("head_dim") or hidden // heads),
            max_position_embeddings=int(get("max_position_embeddings", 8192)),
            rms_norm_eps=float(get("rms_norm_eps", 1e-6)),
            query_pre_attn_scalar=get("query_pre_attn_scalar") if arch != "gemma" else None,
            attn_logit_softcapping=get("attn_logit_softcapping") if arch == "gemma2" else None,
            final_logit_softcapping=get("final_logit_softcapping") if arch != "gemma" else None,
            sliding_window=int(sliding) if sliding and arch != "gemma" else None,
            layer_types=list(layer_types),
            rope_theta=rope_global,
            rope_local_base_freq=rope_local,
            rope_scaling_factor=factor,
            use_qk_norm=arch == "gemma3",
            use_post_norms=arch != "gemma",
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
            pad_token_id=int(raw.get("pad_token_id", 0) or 0),
            eos_token_id=raw.get("eos_token_id", 1),
            bos_token_id=int(raw.get("bos_token_id", 2)),
        )

    @classmethod
    def from_gguf_metadata(cls, meta: dict[str, Any]) -> GemmaConfig:
        """From GGUF key/values (``{arch}.block_count`` ...). Missing fields take Gemma 3 defaults
        (local rope base 1e4, global layer every 6th, query_pre_attn_scalar 256, no softcaps)."""
        arch_key = meta.get("general.architecture")
        arch = {"gemma": "gemma", "gemma2": "gemma2", "gemma3": "gemma3"}.get(arch_key)
        if arch is None:
            raise ConfigError(f"GGUF architecture {arch_key!r} is not a Gemma text decoder")
        p = lambda key, default=None: meta.get(f"{arch_key}.{key}", default)  # noqa: E731
        n_layers = int(p("block_count"))
        heads = int(p("attention.head_count"))
        hidden = int(p("embedding_length"))
        head_dim = int(p("attention.key_length", hidden // heads))
        vocab = meta.get("tokenizer.ggml.tokens")
        vocab_size = int(p("vocab_size", len(vocab) if vocab is not None else 0))
        defaults = _ARCH_DEFAULTS[arch]
        window = p("attention.sliding_window", defaults.get("sliding_window"))
        scaling = p("rope.scaling.factor")
        return cls(
            architecture=arch,
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=int(p("feed_forward_length")),
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=int(p("attention.head_count_kv", heads)),
            head_dim=head_dim,
            max_position_embeddings=int(p("context_length", defaults.get("max_position_embeddings", 8192))),
            rms_norm_eps=float(p("attention.layer_norm_rms_epsilon", 1e-6)),
            query_pre_attn_scalar=None if arch == "gemma" else float(
                p("attention.query_pre_attn_scalar", head_dim if arch == "gemma3" else head_dim)),
            attn_logit_softcapping=p("attn_logit_softcapping", defaults.get("attn_logit_softcapping")),
            final_logit_softcapping=p("final_logit_softcapping", defaults.get("final_logit_softcapping")),
            sliding_window=int(window) if window and arch != "gemma" else None,
            layer_types=default_layer_types(arch, n_layers),
            rope_theta=float(p("rope.freq_base", defaults["rope_theta"])),
            rope_local_base_freq=float(defaults["rope_local_base_freq"]),
            rope_scaling_factor=float(scaling) if scaling else 1.0,
            use_qk_norm=arch == "gemma3",
            use_post_norms=arch != "gemma",
            eos_token_id=int(meta.get("tokenizer.ggml.eos_token_id", 1)),
            bos_token_id=int(meta.get("tokenizer.ggml.bos_token_id", 2)),
            pad_token_id=int(meta.get("tokenizer.ggml.padding_token_id", 0)),
        )


def default_layer_types(arch: str, n_layers: int, pattern: int | None = None) -> list[str]:
    """Gemma 1: all global. Gemma 2: even layers local. Gemma 3: every ``pattern``-th (6) global."""
    if arch == "gemma":
        return [FULL] * n_layers
    if arch == "gemma2":
        return [SLIDING if i % 2 == 0 else FULL for i in range(n_layers)]
    pattern = int(pattern or 6)
    return [FULL if (i + 1) % pattern == 0 else SLIDING for i in range(n_layers)]


_ARCH_DEFAULTS: dict[str, dict[str, Any]] = {
    "gemma": dict(max_position_embeddings=8192, rope_theta=10_000.0, rope_local_base_freq=10_000.0),
    "gemma2": dict(max_position_embeddings=8192, query_pre_attn_scalar=256, attn_logit_softcapping=50.0,
                   final_logit_softcapping=30.0, sliding_window=4096, rope_theta=10_000.0,
                   rope_local_base_freq=10_000.0),
    "gemma3": dict(max_position_embeddings=131072, query_pre_attn_scalar=256, sliding_window=4096,
                   rope_theta=1_000_000.0, rope_local_base_freq=10_000.0),
}

_HF_ARCHS = {
    "GemmaForCausalLM": "gemma", "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3",
    "Gemma3ForConditionalGeneration": "gemma3",
}
_HF_MODEL_TYPES = {"gemma": "gemma", "gemma2": "gemma2", "gemma3_text": "gemma3", "gemma3": "gemma3"}


def _architecture_of(raw: dict) -> str | None:
    for name in raw.get("architectures") or []:
        if name in _HF_ARCHS:
            return _HF_ARCHS[name]
    if raw.get("architectures"):
        return None
    return _HF_MODEL_TYPES.get(raw.get("model_type"))


def _rope_fields(raw: dict, arch: str) -> tuple[float, float, float]:
    """(global base, local base, linear factor on global layers) from either config generation."""
    defaults = _ARCH_DEFAULTS[arch]
    params = raw.get("rope_parameters")
    if isinstance(params, dict) and ("full_attention" in params or "sliding_attention" in params):
        full = params.get("full_attention") or {}
        local = params.get("sliding_attention") or full
        factor = float(full.get("factor", 1.0)) if full.get("rope_type", "default") == "linear" else 1.0
        return (float(full.get("rope_theta", defaults["rope_theta"])),
                float(local.get("rope_theta", defaults["rope_local_base_freq"])), factor)
    if isinstance(params, dict) and params:
        theta = float(params.get("rope_theta", raw.get("rope_theta", defaults["rope_theta"])))
        factor = float(params.get("factor", 1.0)) if params.get("rope_type", "default") == "linear" else 1.0
        local = float(raw.get("rope_local_base_freq", theta if arch != "gemma3" else defaults["rope_local_base_freq"]))
        return theta, local, factor
    theta = float(raw.get("rope_theta", defaults["rope_theta"]))
    scaling = raw.get("rope_scaling") or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ("default", "linear"):
        raise ConfigError(f"unsupported rope_scaling type {kind!r} (only linear is used by Gemma)")
    factor = float(scaling.get("factor", 1.0)) if kind == "linear" else 1.0
    local = float(raw.get("rope_local_base_freq", defaults["rope_local_base_freq"] if arch == "gemma3" else theta))
    return theta, local, factor


def _read_json(source) -> dict:
    if isinstance(source, dict):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path}: no config.json there") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e})") from None


# -- presets -----------------------------------------------------------------------------------
def _g1(hidden, inter, layers, heads, kv, head_dim=256) -> GemmaConfig:
    return GemmaConfig(architecture="gemma", vocab_size=256000, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=head_dim, max_position_embeddings=8192, query_pre_attn_scalar=None,
                       sliding_window=None, rope_theta=10_000.0, rope_local_base_freq=10_000.0,
                       use_qk_norm=False, use_post_norms=False)


def _g2(hidden, inter, layers, heads, kv, head_dim, qpas) -> GemmaConfig:
    return GemmaConfig(architecture="gemma2", vocab_size=256000, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=head_dim, max_position_embeddings=8192, query_pre_attn_scalar=qpas,
                       attn_logit_softcapping=50.0, final_logit_softcapping=30.0, sliding_window=4096,
                       rope_theta=10_000.0, rope_local_base_freq=10_000.0, use_qk_norm=False)


def _g3(hidden, inter, layers, heads, kv, head_dim, qpas, window, vocab, ctx, factor) -> GemmaConfig:
    return GemmaConfig(architecture="gemma3", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
                       num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=kv,
                       head_dim=head_dim, max_position_embeddings=ctx, query_pre_attn_scalar=qpas,
                       sliding_window=window, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                       rope_scaling_factor=factor)


_PRESET_BUILDERS = {
    "gemma-2b": lambda: _g1(2048, 16384, 18, 8, 1),
    "gemma-7b": lambda: _g1(3072, 24576, 28, 16, 16),
    "gemma-2-2b": lambda: _g2(2304, 9216, 26, 8, 4, 256, 256),
    "gemma-2-9b": lambda: _g2(3584, 14336, 42, 16, 8, 256, 256),
    "gemma-2-27b": lambda: _g2(4608, 36864, 46, 32, 16, 128, 144),
    "gemma-3-270m": lambda: _g3(640, 2048, 18, 4, 1, 256, 256, 512, 262144, 32768, 1.0),
    "gemma-3-1b": lambda: _g3(1152, 6912, 26, 4, 1, 256, 256, 512, 262144, 32768, 1.0),
    "gemma-3-4b": lambda: _g3(2560, 10240, 34, 8, 4, 256, 256, 1024, 262208, 131072, 8.0),
    "gemma-3-12b": lambda: _g3(3840, 15360, 48, 16, 8, 256, 256, 1024, 262208, 131072, 8.0),
    "gemma-3-27b": lambda: _g3(5376, 21504, 62, 32, 16, 128, 168, 1024, 262208, 131072, 8.0),
}

# Fine-tunes that keep their base model's shapes.
_ALIASES = {
    "codegemma-2b": "gemma-2b", "codegemma-7b": "gemma-7b", "codegemma-7b-it": "gemma-7b",
    "gemmar-7b": "gemma-7b",
    "datagemma-rig-27b-it": "gemma-2-27b", "datagemma-rag-27b-it": "gemma-2-27b",
    "shieldgemma-2b": "gemma-2-2b", "shieldgemma-9b": "gemma-2-9b", "shieldgemma-27b": "gemma-2-27b",
}
for _name in list(_PRESET_BUILDERS):
    if _name.startswith(("gemma-2-", "gemma-3-")) or _name in ("gemma-2b", "gemma-7b"):
        _ALIASES.setdefault(_name + "-it", _name)

PRESETS = tuple(_PRESET_BUILDERS) + tuple(_ALIASES)


def preset_names() -> list[str]:
    return sorted(PRESETS)


def preset(name: str) -> GemmaConfig:
    """The config of an official size by name (``gemma-2-9b``, ``datagemma-rig-27b-it`` ...)."""
    key = name.lower().removeprefix("google/")
    key = _ALIASES.get(key, key)
    if key not in _PRESET_BUILDERS:
        raise ConfigError(f"unknown preset {name!r}; known: {', '.join(preset_names())}")
    return _PRESET_BUILDERS[key]()
