"""Hugging Face checkpoint conventions of the Gemma text decoders (Gemma 1, 2, 3)."""

from __future__ import annotations

from .config import GemmaConfig
from .gemma import GemmaLM

# Tied LM head: some checkpoints carry it, the module reuses the embedding matrix.
IGNORED_CHECKPOINT_KEYS = (r"lm_head\.weight",)


def build_from_config(raw: dict) -> GemmaLM:
    return GemmaLM(GemmaConfig.from_hf(raw))


def normalize_checkpoint_keys(state: dict) -> dict:
    """Gemma 3 checkpoints saved from the multimodal class nest the decoder under language_model."""
    prefix = "language_model."
    if any(k.startswith(prefix) for k in state) and not any(k.startswith("model.") for k in state):
        return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}
    return state
