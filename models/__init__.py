"""Native PyTorch Gemma-family models: configs, checkpoint and tokenizer loading, generation."""

from .config import ConfigError, GemmaConfig, preset, preset_names
from .gemma import GemmaLM
from .generate import generate, generate_ids
from .loading import CheckpointError, load_model
from .tokenizer import load_tokenizer

__all__ = [
    "ConfigError", "CheckpointError", "GemmaConfig", "GemmaLM", "generate", "generate_ids", "load_model",
    "load_tokenizer", "preset", "preset_names",
]
