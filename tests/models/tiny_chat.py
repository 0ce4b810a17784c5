"""Tiny chat models for the training tests: a Gemma-style chat vocabulary (control tokens, ``\\n`` as a
user-defined piece as in Gemma's, byte fallback), a tiny Gemma decoder with every parameter random
(norm weights too), checkpoint directories in Hugging Face's layout, and instruction rows."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from models.config import GemmaConfig
from models.gemma import GemmaLM
from models.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    GemmaTokenizer,
    tokenizer_from_vocabulary,
)

SPECIALS = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN),
            ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL), ("\n", USER_DEFINED)]
WORDS = ["what", "is", "the", "answer", "colour", "of", "red", "blue", "sky", "grass", "green"]
ANIMALS = ["cat", "dog", "cow", "owl", "bee", "ant", "eel", "yak", "elk", "emu", "fox", "hen"]


def chat_tokenizer() -> GemmaTokenizer:
    pieces = [p for p, _ in SPECIALS] + [f"<0x{b:02X}>" for b in range(256)]
    types = [t for _, t in SPECIALS] + [BYTE] * 256
    normal = list(dict.fromkeys(["\u2581", *"abcdefghijklmnopqrstuvwxyz.,?"]))
    for word in WORDS + ANIMALS:  # every prefix, so BPE can build each word by merges
        normal += [word[:i] for i in range(2, len(word) + 1)] + ["\u2581" + word[:i] for i in range(1, len(word) + 1)]
    normal = list(dict.fromkeys(normal))
    return GemmaTokenizer(tokenizer_from_vocabulary(pieces + normal, types + [NORMAL] * len(normal), bos_id=2),
                          source="tiny-chat")


def tiny_config(vocab_size: int, arch: str = "gemma3", dropout_free: bool = True) -> GemmaConfig:
    extra = dict(attn_logit_softcapping=5.0, final_logit_softcapping=10.0) if arch == "gemma2" else {}
    return GemmaConfig(architecture=arch, vocab_size=vocab_size, hidden_size=32, intermediate_size=48,
                       num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1, head_dim=16,
                       max_position_embeddings=256, query_pre_attn_scalar=16 if arch != "gemma" else None,
                       sliding_window=8 if arch != "gemma" else None, use_qk_norm=arch == "gemma3",
                       use_post_norms=arch != "gemma", **extra)


def tiny_gemma(vocab_size: int, arch: str = "gemma3", seed: int = 0) -> GemmaLM:
    model = GemmaLM(tiny_config(vocab_size, arch))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * (0.3 if "norm" in name else 0.15))
    return model.eval()


def save_checkpoint(model: GemmaLM, tokenizer: GemmaTokenizer, directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(directory / "model.safetensors"))
    (directory / "config.json").write_text(json.dumps(model.config.to_hf()))
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    return directory


def instruction_rows(count: int = 12) -> list[dict]:
    """Learnable rows: the answer repeats a word of the question."""
    return [{"instruction": f"what is the {a}?", "output": f"the answer is {a}.", "source": "tiny"}
            for a in (ANIMALS * 3)[:count]]


def write_jsonl(path: Path, rows: list) -> Path:
    with path.open("w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")
    return path
