"""Native PyTorch Gemma-family models: configs, checkpoint and tokenizer loading, generation.

Public API: :func:`load_model`, :func:`load_tokenizer`, :func:`generate` (text, streaming) and
:func:`generate_ids` (token level), :class:`GemmaConfig` with :func:`preset`, the ShieldGemma safety
guard (:func:`load_guard` -> :class:`SafetyGuard`, :class:`GuardResult`, :class:`Policy`). Submodules import
lazily so ``import models`` stays cheap.
"""

from __future__ import annotations

import importlib

# ``generate`` is both a submodule and a function: bind the function eagerly, or the first import of
# the submodule would replace it on the package and ``from models import generate`` would get a module.
from .generate import generate, generate_ids  # noqa: F401  (exported through __all__)

_EXPORTS = {
    "ConfigError": "config", "GemmaConfig": "config", "preset": "config", "preset_names": "config",
    "GemmaLM": "gemma", "PaliGemma": "paligemma", "SiglipVisionModel": "siglip",
    "RecurrentGemmaLM": "recurrent_gemma", "RecurrentGemmaConfig": "recurrent_gemma",
    "recurrent_preset": "recurrent_gemma", "recurrent_preset_names": "recurrent_gemma",
    "generate": "generate", "generate_ids": "generate",
    "CheckpointError": "loading", "load_model": "loading",
    "load_tokenizer": "tokenizer", "GemmaTokenizer": "tokenizer",
    "SafetyGuard": "guard", "GuardResult": "guard", "Policy": "guard", "load_guard": "guard",
    "BertModel": "bert", "SentenceEmbedder": "sentence_embedder", "EmbeddingModelError": "sentence_embedder",
    "JumpReLUSAE": "sae", "load_sae": "sae", "Site": "hooks", "Steer": "hooks",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'models' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__
