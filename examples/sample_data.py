"""Sample data for the examples, so each runs with no downloads: small PDFs with a text layer, and tiny
*random* ColPali / PaliGemma checkpoints written in the Hugging Face layout (they load exactly like real
ones, but their rankings and answers are meaningless — pass real checkpoints to the examples for that).

    write_sample_pdfs(folder)          -> two PDFs (an invoice, a report) with text and coloured shapes
    write_tiny_colpali(folder)         -> a ColPali checkpoint directory (config.json, safetensors, tokenizer)
    write_tiny_paligemma(folder)       -> a PaliGemma checkpoint directory
    write_tiny_gemma(folder)           -> a Gemma 3 chat checkpoint directory (Gemma chat template tokens)
    write_tiny_shieldgemma(folder)     -> a Gemma 2 checkpoint directory a safety guard can load ("Yes"/"No")
"""

from __future__ import annotations

import json
from pathlib import Path

SAMPLE_PAGES = {
    "invoice.pdf": [
        ("Invoice 2024-017", ["Total due: 1,250.00 EUR", "Payable within 30 days"], (0.9, 0.2, 0.2)),
        ("Invoice items", ["3 x red circles", "2 x blue squares"], (0.2, 0.3, 0.9)),
    ],
    "report.pdf": [
        ("Quarterly revenue", ["Revenue grew 12% in Q3", "Chart: revenue by region"], (0.2, 0.7, 0.3)),
        ("Outlook", ["Costs stable", "Hiring in the second half"], (0.8, 0.7, 0.1)),
        ("Appendix", ["Page of tables", "No images here"], (0.5, 0.5, 0.5)),
    ],
}


def _pdf_string(text: str) -> str:
    return "(" + text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)") + ")"


def write_pdf(path: str | Path, pages: list[tuple[str, list[str], tuple[float, float, float]]]) -> Path:
    """A PDF (US letter pages) with a title, text lines (a real text layer, Helvetica) and a filled
    rectangle of the given RGB colour on each page. Written by hand: the PDF syntax is small."""
    objects: list[bytes] = []

    def add(body: str | bytes) -> int:
        objects.append(body.encode("latin-1") if isinstance(body, str) else body)
        return len(objects)

    catalog = add("")  # filled in below, once the page ids are known
    pages_id = add("")
    font = add("<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>")
    page_ids = []
    for title, lines, (r, g, b) in pages:
        ops = [f"{r} {g} {b} rg 72 430 300 200 re f", "0 0 0 rg", f"BT /F1 28 Tf 72 700 Td {_pdf_string(title)} Tj ET"]
        ops += [f"BT /F1 16 Tf 72 {660 - 24 * i} Td {_pdf_string(line)} Tj ET" for i, line in enumerate(lines)]
        stream = "\n".join(ops).encode("latin-1")
        content = add(b"<< /Length %d >>\nstream\n" % len(stream) + stream + b"\nendstream")
        page_ids.append(add(f"<< /Type /Page /Parent {pages_id} 0 R /MediaBox [0 0 612 792] "
                            f"/Resources << /Font << /F1 {font} 0 R >> >> /Contents {content} 0 R >>"))
    objects[catalog - 1] = f"<< /Type /Catalog /Pages {pages_id} 0 R >>".encode()
    kids = " ".join(f"{p} 0 R" for p in page_ids)
    objects[pages_id - 1] = f"<< /Type /Pages /Kids [{kids}] /Count {len(page_ids)} >>".encode()
    out = bytearray(b"%PDF-1.4\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root %d 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, catalog, xref)
    path = Path(path)
    path.write_bytes(bytes(out))
    return path


def write_sample_pdfs(folder: str | Path) -> list[Path]:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    return [write_pdf(folder / name, pages) for name, pages in SAMPLE_PAGES.items()]


# -- tiny random checkpoints -------------------------------------------------------------------------------
WORDS = ["Describe", "Question", "answer", "the", "image", "invoice", "total", "chart", "revenue", "page", "due",
         "red", "blue", "what", "is", "en", "caption"]


def _paligemma_tokenizer():
    """A small PaliGemma-style vocabulary: <pad> <eos> <bos> <unk>, newline, letters and word pieces, a few
    <locNNNN>, then <image> last (as in PaliGemma). No byte pieces, so a random model writes letters."""
    from models.tokenizer import CONTROL, NORMAL, UNKNOWN, USER_DEFINED, tokenizer_from_vocabulary

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "\n"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, USER_DEFINED]
    text = ["\u2581", *"abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,:;?!'-%"]
    for word in WORDS:  # every prefix of each word, so BPE can build it by merges
        text += [word[:i] for i in range(2, len(word) + 1)] + ["\u2581" + word[:i] for i in range(1, len(word) + 1)]
    text = list(dict.fromkeys(text))
    pieces += text + [f"<loc{i:04d}>" for i in range(16)] + ["<image>"]
    types += [NORMAL] * len(text) + [USER_DEFINED] * 16 + [CONTROL]
    return tokenizer_from_vocabulary(pieces, types, bos_id=2), len(pieces)


def _tiny_paligemma_config(vocab_size: int, image_size: int) -> dict:
    text = dict(model_type="gemma", hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                num_key_value_heads=1, head_dim=16, vocab_size=vocab_size, max_position_embeddings=512,
                pad_token_id=0, eos_token_id=1, bos_token_id=2)
    vision = dict(model_type="siglip_vision_model", hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=2, image_size=image_size, patch_size=14, vision_use_head=False)
    return dict(model_type="paligemma", architectures=["PaliGemmaForConditionalGeneration"],
                image_token_index=vocab_size - 1, projection_dim=32, hidden_size=32, vocab_size=vocab_size,
                text_config=text, vision_config=vision)


def _randomise(module, seed: int):
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, p in module.named_parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.2)
    return module


def _save(module, config: dict, tokenizer, folder: Path) -> Path:
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, str(folder / "model.safetensors"))
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


def write_tiny_colpali(folder: str | Path, *, seed: int = 0, image_size: int = 56) -> Path:
    """A random ColPali checkpoint (colpali-engine layout: ``model.*`` + ``custom_text_proj``)."""
    from models.paligemma import PaliGemmaConfig
    from vision_rag.colpali import ColPali

    tokenizer, vocab = _paligemma_tokenizer()
    config = _tiny_paligemma_config(vocab, image_size)
    config["architectures"] = ["ColPali"]
    return _save(_randomise(ColPali(PaliGemmaConfig.from_hf(config)), seed), config, tokenizer, Path(folder))


def write_tiny_paligemma(folder: str | Path, *, seed: int = 1, image_size: int = 28) -> Path:
    """A random PaliGemma checkpoint (generates text: its answers are noise)."""
    import torch

    from models.paligemma import PaliGemma, PaliGemmaConfig

    tokenizer, vocab = _paligemma_tokenizer()
    config = _tiny_paligemma_config(vocab, image_size)
    model = _randomise(PaliGemma(PaliGemmaConfig.from_hf(config)), seed)
    with torch.no_grad():  # never emits <pad> <eos> <bos> <unk> or a newline (tied head): always some text
        next(p for name, p in model.named_parameters() if name.endswith("embed_tokens.weight"))[:5] = 0
    return _save(model, config, tokenizer, Path(folder))


def write_tiny_gemma(folder: str | Path, *, seed: int = 3) -> Path:
    """A random Gemma 3 text model with a tokenizer that has the chat template tokens."""
    import torch

    from models.config import GemmaConfig
    from models.gemma import GemmaLM
    from models.loading import init_random_weights
    from models.tokenizer import CONTROL, NORMAL, UNKNOWN, tokenizer_from_vocabulary

    specials = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    normal = list(dict.fromkeys(["\u2581", *"abcdefghijklmnopqrstuvwxyz0123456789.,?"]
                                + ["\u2581" + w for w in WORDS] + WORDS))
    tokenizer = tokenizer_from_vocabulary(specials + normal, [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL]
                                          + [NORMAL] * len(normal), bos_id=2)
    config = GemmaConfig(architecture="gemma3", vocab_size=len(specials) + len(normal), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, max_position_embeddings=2048, query_pre_attn_scalar=32, sliding_window=64)
    model = init_random_weights(GemmaLM(config), seed=seed, std=0.02)
    with torch.no_grad():
        model.model.embed_tokens.weight[:len(specials)] = 0  # never emits control tokens: always some text
    return _save(model, config.to_hf(), tokenizer, Path(folder))


# Words of the ShieldGemma prompt, so its text is a few hundred tokens rather than one per character.
GUARD_WORDS = ["You", "are", "policy", "expert", "trying", "to", "help", "determine", "whether", "user", "prompt",
               "is", "in", "violation", "of", "the", "defined", "safety", "policies", "Human", "Question", "Our",
               "principle", "below", "Does", "violate", "above", "answer", "must", "start", "with", "or", "And",
               "then", "walk", "through", "step", "by", "be", "sure", "we", "correctly", "The", "shall", "not",
               "contain", "seek", "generation", "content", "that", "chatbot", "generate", "Chatbot", "Response",
               "an", "AI", "response", "harming", "others", "targeting", "what", "was", "life", "expectancy",
               "Kenya", "population"]


def guard_tokenizer():
    """A small Gemma-style vocabulary for guard models: control tokens, all 256 byte pieces (any text
    encodes), ASCII characters, the guard prompt's words built by merges, and "Yes" / "No"."""
    from models.tokenizer import BYTE, CONTROL, NORMAL, UNKNOWN, tokenizer_from_vocabulary

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    types = [CONTROL, CONTROL, CONTROL, UNKNOWN, CONTROL, CONTROL]
    pieces += [f"<0x{b:02X}>" for b in range(256)]
    types += [BYTE] * 256
    text = ["\u2581", "\n", *(chr(c) for c in range(33, 127)), "Yes", "No", "Ye"]
    for word in GUARD_WORDS:  # every prefix of each word, so BPE can build it by merges
        text += [word[:i] for i in range(2, len(word) + 1)] + ["\u2581" + word[:i] for i in range(1, len(word) + 1)]
    text = list(dict.fromkeys(text))
    return tokenizer_from_vocabulary(pieces + text, types + [NORMAL] * len(text), bos_id=2)


def write_tiny_shieldgemma(folder: str | Path, *, seed: int = 4) -> Path:
    """A random Gemma 2 checkpoint (ShieldGemma's architecture) with :func:`guard_tokenizer`: a safety
    guard loads and runs it; its scores are noise."""
    from models.config import GemmaConfig
    from models.gemma import GemmaLM

    tokenizer = guard_tokenizer()
    config = GemmaConfig(architecture="gemma2", vocab_size=tokenizer.get_vocab_size(), hidden_size=64,
                         intermediate_size=128, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=32, max_position_embeddings=2048, query_pre_attn_scalar=32, sliding_window=64,
                         attn_logit_softcapping=50.0, final_logit_softcapping=30.0, use_qk_norm=False,
                         rope_theta=10_000.0, rope_local_base_freq=10_000.0,
                         layer_types=["sliding_attention", "full_attention"])
    return _save(_randomise(GemmaLM(config), seed), config.to_hf(), tokenizer, Path(folder))
