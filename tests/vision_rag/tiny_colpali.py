"""Tiny random ColPali checkpoints for tests: transformers' ColPaliForRetrieval with every parameter
randomised (norm weights too: zeros would hide a missing ``1 + w``), saved in the two merged layouts,
with a PaliGemma-style tokenizer.json.

Layouts: ``"hf"`` is what ``ColPaliForRetrieval.save_pretrained`` writes (``vlm.*`` +
``embedding_proj_layer``, a ``colpali`` config.json); ``"engine"`` is colpali-engine's (``model.*`` +
``custom_text_proj``, a PaliGemma config.json, the tied LM head stored as a copy).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers
from safetensors.torch import save_file

from models.tokenizer import GemmaTokenizer, tokenizer_from_vocabulary

CONTROL, UNKNOWN, NORMAL, USER, BYTE = 3, 2, 1, 4, 6
WORDS = ["Describe", "Question", "Query", "the", "image", "invoice", "total", "chart", "revenue", "page", "red",
         "blue", "circle", "square", "what", "is"]
EMBEDDING_DIM = 128


def paligemma_tokenizer() -> GemmaTokenizer:
    """A small vocabulary laid out like PaliGemma's: <pad> <eos> <bos> <unk>, \\n, text pieces, byte pieces,
    some <locNNNN>, then <image> last."""
    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\n"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, USER]
    chars = ["▁", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'-"]
    words = []
    for w in WORDS:  # every prefix of a word, so BPE can build it by merges
        words += [w[:i] for i in range(2, len(w) + 1)] + ["▁" + w[:i] for i in range(1, len(w) + 1)]
    text = list(dict.fromkeys(chars + words))
    pieces += text
    types += [NORMAL] * len(text)
    pieces += [f"<0x{i:02X}>" for i in range(256)]
    types += [BYTE] * 256
    pieces += [f"<loc{i:04d}>" for i in range(16)]
    types += [USER] * 16
    pieces += ["<image>"]
    types += [CONTROL]
    return GemmaTokenizer(tokenizer_from_vocabulary(pieces, types, bos_id=2))


def vlm_config(vocab_size: int, image_token: int, *, image_size: int = 28, text_type: str = "gemma") -> dict:
    """A PaliGemma config.json with tiny sizes (head dims not powers of two on the vision side)."""
    text = dict(model_type=text_type, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=vocab_size, max_position_embeddings=256,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    if text_type == "gemma2":
        text.update(query_pre_attn_scalar=16, attn_logit_softcapping=3.0, final_logit_softcapping=5.0,
                    sliding_window=256)
    vision = dict(model_type="siglip_vision_model", hidden_size=30, intermediate_size=44, num_hidden_layers=2,
                  num_attention_heads=3, image_size=image_size, patch_size=14, vision_use_head=False)
    return dict(model_type="paligemma", architectures=["ColPali"], image_token_index=image_token, projection_dim=32,
                hidden_size=32, vocab_size=vocab_size, text_config=text, vision_config=vision)


def randomise(module: torch.nn.Module, seed: int) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            std = 0.5 if "norm" in name else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * std)
    return module


def hf_colpali(tokenizer: GemmaTokenizer, *, seed: int = 0, image_size: int = 28, text_type: str = "gemma"):
    """transformers' ColPaliForRetrieval (eager attention, fp32) with random weights: the oracle."""
    vlm = vlm_config(tokenizer.vocab_size, tokenizer.token_to_id("<image>"), image_size=image_size, text_type=text_type)
    config = transformers.ColPaliConfig(vlm_config=vlm, embedding_dim=EMBEDDING_DIM)
    config._attn_implementation = "eager"
    for sub in (config.vlm_config, config.vlm_config.text_config, config.vlm_config.vision_config):
        sub._attn_implementation = "eager"
    torch.manual_seed(seed)
    return randomise(transformers.ColPaliForRetrieval(config).eval(), seed)


def engine_state(hf_model) -> dict[str, torch.Tensor]:
    """colpali-engine key names for a transformers ColPaliForRetrieval's weights."""
    out = {}
    for key, tensor in hf_model.state_dict().items():
        t = tensor.detach().clone().contiguous()
        if key.startswith("embedding_proj_layer."):
            out["custom_text_proj." + key.removeprefix("embedding_proj_layer.")] = t
        elif key.startswith("vlm.language_model."):
            rest = key.removeprefix("vlm.language_model.")
            out["model.language_model.model." + rest] = t
        elif key.startswith("vlm.vision_tower."):
            out["model.vision_tower.vision_model." + key.removeprefix("vlm.vision_tower.")] = t
        elif key.startswith("vlm.multi_modal_projector."):
            out["model." + key.removeprefix("vlm.")] = t
        else:
            raise AssertionError(f"unexpected transformers key {key}")
    # colpali-engine checkpoints carry the tied LM head as its own tensor.
    out["model.language_model.lm_head.weight"] = out["model.language_model.model.embed_tokens.weight"].clone()
    return out


def save_colpali(hf_model, tokenizer: GemmaTokenizer, directory: Path, layout: str = "hf") -> Path:
    """Write a checkpoint directory (config.json, model.safetensors, tokenizer.json) in ``layout``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if layout == "hf":
        hf_model.save_pretrained(directory)
    elif layout == "engine":
        vlm = hf_model.config.vlm_config.to_dict()
        vlm.update(model_type="paligemma", architectures=["ColPali"])
        (directory / "config.json").write_text(json.dumps(vlm, indent=2))
        save_file(engine_state(hf_model), str(directory / "model.safetensors"))
    else:
        raise ValueError(f"unknown layout {layout!r}")
    tokenizer.backend.save(str(directory / "tokenizer.json"))
    return directory
