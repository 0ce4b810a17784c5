"""The Gemma tokenizer against independent implementations.

- From the real Gemma 3 GGUF: ids must equal transformers' tokenizer built from the same file
  (``AutoTokenizer.from_pretrained(dir, gguf_file=...)``) on texts in several scripts, emoji, code, tabs,
  runs of spaces and newlines, and chat markers; the reference ids of reference/models.md; decoding
  round-trips.
- From a SentencePiece ``tokenizer.model``: ids must equal the sentencepiece library's own encoding of a
  small BPE model trained here with Gemma's settings (identity normaliser, no dummy prefix, byte fallback).
- tokenizer.json files: our own saved tokenizer, transformers' and a PaliGemma-style one with added tokens.
"""

from __future__ import annotations

import json

import pytest
from tokenizers import AddedToken, Tokenizer

from models.gguf import GGUFError
from models.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNKNOWN,
    USER_DEFINED,
    GemmaTokenizer,
    TokenizerError,
    load_tokenizer,
    tokenizer_from_vocabulary,
)

TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "مرحبا بالعالم! كيف حالك اليوم؟",
    "你好，世界。今天的天气很好，我们去公园散步吧。",
    "Emoji: 😀👍🏽🇫🇷 👨‍👩‍👧‍👦 ❤️ 🧪",
    "def add(a, b):\n\treturn a + b  # sum\n\nprint(add(1, 2))\n",
    "for (int i = 0; i < n; ++i) {\n        x[i] = y[i] * 2;\n}",
    "tabs\tand\t\t\tmore\t\t\t\t\ttabs",
    "runs of    spaces     here          and there",
    "  leading and trailing spaces   ",
    "line one\nline two\n\n\nline five\r\n",
    "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello!<end_of_turn>\n",
    "Ünïcödé: ß, ﬁ, Å, é (NFC) vs e\u0301 (NFD)",
    "<table><tr><td>42</td></tr></table> and <b>bold</b>",
    "numbers 3.14159 1,000,000 2026-11-22 0x1F",
    "Ωmega ∑ ∫ √2 ≈ 1.414 — “quotes” ‘single’ …",
    "\x00\x07 control chars and a \u200b zero-width space",
    "Привет, мир! Γειά σου Κόσμε! नमस्ते दुनिया",
    "",
    " ",
    "\n",
]


# -- the real Gemma 3 vocabulary (GGUF) ----------------------------------------------------------------
def test_ids_match_transformers_from_the_same_gguf(gemma3_270m_tokenizer, hf_gemma3_270m_tokenizer):
    for text in TEXTS:
        expected = hf_gemma3_270m_tokenizer(text).input_ids  # adds <bos>
        assert gemma3_270m_tokenizer.encode(text) == expected, text
        assert gemma3_270m_tokenizer.encode(text, add_bos=False) == expected[1:], text


def test_ids_match_transformers_on_random_piece_soup(gemma3_270m_tokenizer, hf_gemma3_270m_tokenizer):
    """Seeded random strings glued from vocabulary pieces, whitespace and odd characters: these hit the
    derived merges far more densely than prose does."""
    import random

    rng = random.Random(0)
    backend = gemma3_270m_tokenizer.backend
    extras = [" ", "  ", "\t", "\n", "\n\n", "\u00a0", "\u200d", "é", "中", "😀", "<", ">", "▁"]
    for _ in range(400):
        parts = [backend.id_to_token(rng.randrange(262144)) if rng.random() < 0.7 else rng.choice(extras)
                 for _ in range(rng.randint(1, 12))]
        text = "".join(parts).replace("\u2581", " ")
        assert gemma3_270m_tokenizer.encode(text) == hf_gemma3_270m_tokenizer(text).input_ids, repr(text)


def test_reference_ids(gemma3_270m_tokenizer):
    """Ids published in reference/models.md for the Gemma 3 vocabulary."""
    tok = gemma3_270m_tokenizer
    assert tok.encode("The quick brown fox jumps over the lazy dog.")[:11] == \
        [2, 818, 3823, 8864, 37423, 38167, 1024, 506, 31770, 4799, 236761]
    chat = "<start_of_turn>user\nHi<end_of_turn>\n"
    assert tok.encode(chat, add_bos=False) == [105, 2364, 107, 10979, 106, 107]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (2, 1, 0, 262144)
    assert tok.stop_token_ids == [1, 106]
    assert tok.special_tokens["start_of_turn"] == 105 and tok.special_tokens["end_of_turn"] == 106
    assert tok.token_to_id("<start_of_image>") == 255999 and tok.id_to_token(106) == "<end_of_turn>"
    # GGUF spells the whitespace-run pieces with real spaces; they are "▁" pieces here.
    assert tok.token_to_id("\u2581\u2581") == 138 and tok.token_to_id("  ") is None


def test_decode_round_trips_and_matches_transformers(gemma3_270m_tokenizer, hf_gemma3_270m_tokenizer):
    tok = gemma3_270m_tokenizer
    for text in TEXTS:
        ids = tok.encode(text)
        assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + text
        if "<start_of_turn>" not in text:
            assert tok.decode(ids) == text
        assert tok.decode(ids) == hf_gemma3_270m_tokenizer.decode(ids, skip_special_tokens=True)
    # Text that spells a byte piece literally stays text (SentencePiece never produces byte pieces from text).
    assert tok.decode(tok.encode("<0x41> is not A")) == "<0x41> is not A"


def test_chat_template(gemma3_270m_tokenizer, hf_gemma3_270m_tokenizer):
    tok = gemma3_270m_tokenizer
    messages = [{"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What is 2+2?"},
                {"role": "assistant", "content": "4"},
                {"role": "user", "content": [{"type": "text", "text": "And 3+3?"}]}]
    prompt = tok.apply_chat_template(messages)
    assert prompt == ("<start_of_turn>user\nAnswer briefly.\n\nWhat is 2+2?<end_of_turn>\n"
                      "<start_of_turn>model\n4<end_of_turn>\n"
                      "<start_of_turn>user\nAnd 3+3?<end_of_turn>\n"
                      "<start_of_turn>model\n")
    assert tok.apply_chat_template(messages[1:2], add_generation_prompt=False) == \
        "<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n"
    ids = tok.encode(prompt)
    assert ids == hf_gemma3_270m_tokenizer(prompt).input_ids
    assert ids[:2] == [2, 105] and ids.count(105) == 4 and ids.count(106) == 3
    with pytest.raises(TokenizerError, match="alternate"):
        tok.apply_chat_template([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}])
    with pytest.raises(TokenizerError, match="alternate"):
        tok.apply_chat_template([{"role": "tool", "content": "a"}])


def test_batch_encode_right_pads(gemma3_270m_tokenizer):
    tok = gemma3_270m_tokenizer
    texts = ["short", "a much longer text with 中文 and 😀", ""]
    ids, mask = tok.batch_encode(texts)
    rows = [tok.encode(t) for t in texts]
    assert ids.shape == mask.shape == (3, max(map(len, rows)))
    for i, row in enumerate(rows):
        assert ids[i, :len(row)].tolist() == row
        assert (ids[i, len(row):] == tok.pad_id).all()
        assert mask[i].tolist() == [1] * len(row) + [0] * (ids.shape[1] - len(row))
    ids, _ = tok.batch_encode(texts, add_bos=False)
    assert ids[0, :len(rows[0]) - 1].tolist() == rows[0][1:]


def test_fim_needs_codegemma_tokens(gemma3_270m_tokenizer):
    with pytest.raises(TokenizerError, match="fim_prefix"):
        gemma3_270m_tokenizer.fim_prompt("def f(", "):")


def test_saved_tokenizer_json_loads_back_to_the_same_ids(gemma3_270m_tokenizer, hf_gemma3_270m_tokenizer,
                                                          tmp_path):
    ours_dir, hf_dir = tmp_path / "ours", tmp_path / "hf"
    ours_dir.mkdir()
    hf_dir.mkdir()
    gemma3_270m_tokenizer.backend.save(str(ours_dir / "tokenizer.json"))
    hf_gemma3_270m_tokenizer.backend_tokenizer.save(str(hf_dir / "tokenizer.json"))
    for reloaded in (load_tokenizer(ours_dir), load_tokenizer(hf_dir / "tokenizer.json")):
        assert (reloaded.bos_id, reloaded.eos_id, reloaded.pad_id) == (2, 1, 0)
        assert reloaded.stop_token_ids == [1, 106]
        for text in TEXTS:
            ids = gemma3_270m_tokenizer.encode(text)
            assert reloaded.encode(text) == ids, text
            assert reloaded.decode(ids) == gemma3_270m_tokenizer.decode(ids)
    # The saved file alone, through the tokenizers library, adds <bos> like encode() does.
    plain = Tokenizer.from_file(str(ours_dir / "tokenizer.json"))
    assert plain.encode(TEXTS[0]).ids == gemma3_270m_tokenizer.encode(TEXTS[0])


def test_paligemma_added_tokens_survive(gemma3_270m_tokenizer, tmp_path):
    """PaliGemma's tokenizer.json adds <loc0000>..<loc1023>, <seg000>..<seg127> and <image>."""
    backend = Tokenizer.from_str(gemma3_270m_tokenizer.backend.to_str())
    first = backend.get_vocab_size()
    backend.add_tokens([AddedToken(f"<loc{i:04d}>", normalized=False) for i in range(1024)]
                       + [AddedToken(f"<seg{i:03d}>", normalized=False) for i in range(128)])
    backend.add_special_tokens([AddedToken("<image>", normalized=False)])
    backend.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "<bos>"}, "eos_token": "<eos>", "pad_token": "<pad>"}))
    tok = load_tokenizer(tmp_path)
    loc, seg, image = first, first + 1024, first + 1024 + 128
    assert tok.vocab_size == image + 1 and tok.special_tokens["image"] == image
    text = "<image><image><bos>detect cat\n<loc0012><loc1023><loc0000><loc0511> cat ; <seg127>"
    ids = tok.encode(text, add_bos=False)
    assert ids[:3] == [image, image, 2]
    assert [loc + 12, loc + 1023, loc, loc + 511] == ids[ids.index(107) + 1:ids.index(107) + 5]
    assert ids[-1] == seg + 127
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.decode(ids) == "detect cat\n<loc0012><loc1023><loc0000><loc0511> cat ; <seg127>"


# -- small vocabularies ----------------------------------------------------------------------------------
def small_tokenizer(extra_user=(), extra_control=()) -> GemmaTokenizer:
    specials = [("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", UNKNOWN)]
    specials += [(t, CONTROL) for t in extra_control] + [(t, USER_DEFINED) for t in extra_user]
    normal = list("\u2581abcdefghijklmnopqrstuvwxyz():=") + ["\u2581d", "ef", "\u2581def"]
    pieces = [p for p, _ in specials] + [f"<0x{b:02X}>" for b in range(256)] + normal
    types = [t for _, t in specials] + [BYTE] * 256 + [NORMAL] * len(normal)
    return GemmaTokenizer(tokenizer_from_vocabulary(pieces, types, bos_id=2), source="small")


def test_codegemma_fill_in_the_middle():
    fim = ["<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|file_separator|>"]
    tok = small_tokenizer(extra_user=fim)
    prompt = tok.fim_prompt("def f(x):\n    return ", "\n")
    assert prompt == "<|fim_prefix|>def f(x):\n    return <|fim_suffix|>\n<|fim_middle|>"
    ids = tok.encode(prompt)
    ids_of = {t: tok.token_to_id(t) for t in fim}
    assert ids[1] == ids_of["<|fim_prefix|>"] and ids[-1] == ids_of["<|fim_middle|>"]
    assert ids_of["<|fim_suffix|>"] in ids
    assert tok.token_to_id("ef") in ids  # merges derived from the vocabulary order
    assert sorted(tok.fim_stop_token_ids) == sorted([*ids_of.values(), tok.eos_id])
    assert tok.decode(ids, skip_special_tokens=False) == "<bos>" + prompt


def test_byte_fallback_for_characters_outside_the_vocabulary():
    tok = small_tokenizer()
    ids = tok.encode("déf 😀", add_bos=False)
    assert tok.id_to_token(ids[0]) == "d" and tok.id_to_token(ids[1]) == "<0xC3>"  # é = C3 A9
    assert tok.decode(ids) == "déf 😀"


# -- merges derived from the vocabulary ---------------------------------------------------------------
def test_vectorised_merges_equal_the_split_by_split_definition(gemma3_270m_gguf):
    """derive_merges (numpy hashing) gives the very list, order included, of the one-split-at-a-time loop
    on the real 262k vocabulary: token ids cannot change."""
    from models.gguf import read_gguf_metadata
    from models.tokenizer import _derive_merges_loop, _sentencepiece_spelling, derive_merges

    metadata = read_gguf_metadata(gemma3_270m_gguf)
    pieces = [_sentencepiece_spelling(p) for p in metadata["tokenizer.ggml.tokens"]]
    types = metadata["tokenizer.ggml.token_type"]
    mergeable = [t == NORMAL or (t == USER_DEFINED and set(p) == {"\u2581"}) for p, t in zip(pieces, types, strict=True)]
    merges = derive_merges(pieces, mergeable)
    assert len(merges) > 500_000
    assert merges == _derive_merges_loop(pieces, mergeable)


ODD_PIECES = ["a", "b", "ab", "ba", "bab", "abab", "a", "é", "e\u0301", "😀", "😀😀", "😀a", "a😀",
              "\u2581", "\u2581\u2581", "\u2581a", "ab\u2581", "x", "xab", "bx", "abx", "中", "中文", "文"]


def test_vectorised_merges_on_odd_vocabularies(monkeypatch):
    """Duplicates, pieces outside the BMP, combining marks, non-mergeable pieces; then hashes forced to
    collide: false hits are rejected by the exact comparison, and colliding pieces fall back to the loop."""
    import models.tokenizer as tokenizer_module
    from models.tokenizer import _derive_merges_loop, derive_merges

    mergeable = [p not in ("ba", "x") for p in ODD_PIECES]
    expected = _derive_merges_loop(ODD_PIECES, mergeable)
    assert ("b", "ab") in expected and ("😀", "😀") in expected and ("ab", "x") not in expected
    assert derive_merges(ODD_PIECES, mergeable) == expected
    assert derive_merges(["\ud800a", "\ud800", "a"], [True] * 3) == [("\ud800", "a")]  # lone surrogate: loop
    assert derive_merges([], []) == []
    # Base 1: a string's hash is the sum of its code points, so "ba" hashes as "ab" ("ba" is no piece
    # here): splitting "bab" at 2 is a false hit that only the code point comparison rejects.
    monkeypatch.setattr(tokenizer_module, "_HASH_BASE", 1)
    monkeypatch.setattr(tokenizer_module, "_HASH_BASE_INVERSE", 1)
    pieces, ok = ["a", "b", "ab", "bab"], [True] * 4
    assert tokenizer_module._merge_pairs(pieces, ok) is not None
    assert derive_merges(pieces, ok) == [("a", "b"), ("b", "ab")] == _derive_merges_loop(pieces, ok)
    # Two different mergeable pieces with one hash: the vectorised path declines, the loop answers.
    assert tokenizer_module._merge_pairs(ODD_PIECES, mergeable) is None
    assert derive_merges(ODD_PIECES, mergeable) == expected
    with pytest.raises(TokenizerError, match="mergeable flags"):
        derive_merges(["a", "b"], [True])


# -- SentencePiece tokenizer.model -----------------------------------------------------------------------
CORPUS = [
    "the quick brown fox jumps over the lazy dog", "def main():\n    return 0", "tabs\tand  double  spaces",
    "Gemma is a family of open models", "the models are small and fast", "numbers 12345 and 678",
] * 40


def train_sentencepiece(tmp_path, **overrides):
    import sentencepiece

    options = dict(model_type="bpe", vocab_size=400, hard_vocab_limit=False, byte_fallback=True,
                   normalization_rule_name="identity", add_dummy_prefix=False, remove_extra_whitespaces=False,
                   split_digits=True,
                   pad_id=0, eos_id=1, bos_id=2, unk_id=3, pad_piece="<pad>", eos_piece="<eos>",
                   bos_piece="<bos>", unk_piece="<unk>",
                   user_defined_symbols=["<start_of_turn>", "<end_of_turn>"],
                   character_coverage=1.0, minloglevel=2)
    options.update(overrides)
    directory = tmp_path / "sp"
    directory.mkdir(exist_ok=True)
    sentencepiece.SentencePieceTrainer.train(sentence_iterator=iter(CORPUS),
                                             model_prefix=str(directory / "tokenizer"), **options)
    return directory, sentencepiece.SentencePieceProcessor(model_file=str(directory / "tokenizer.model"))


def test_sentencepiece_model_matches_sentencepiece(tmp_path):
    directory, sp = train_sentencepiece(tmp_path)
    tok = load_tokenizer(directory)  # the directory has tokenizer.model and no tokenizer.json
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 1, 0)
    texts = CORPUS[:6] + ["the lazy models jump", "unseen: 中文 é 😀", "  two  spaces\tand tab",
                          "<start_of_turn>user\nthe fox<end_of_turn>"]
    for text in texts:
        assert tok.encode(text, add_bos=False) == sp.encode(text), text
        assert tok.decode(tok.encode(text, add_bos=False), skip_special_tokens=False) == text


def test_sentencepiece_models_gemma_does_not_use_are_refused(tmp_path):
    directory, _ = train_sentencepiece(tmp_path, normalization_rule_name="nmt_nfkc",
                                       remove_extra_whitespaces=True)
    with pytest.raises(TokenizerError, match="normalises text"):
        load_tokenizer(directory / "tokenizer.model")
    directory, _ = train_sentencepiece(tmp_path, add_dummy_prefix=True)
    with pytest.raises(TokenizerError, match="dummy space prefix"):
        load_tokenizer(directory)
    directory, _ = train_sentencepiece(tmp_path, model_type="unigram")
    with pytest.raises(TokenizerError, match="unigram"):
        load_tokenizer(directory)


# -- bad input -------------------------------------------------------------------------------------------
def test_bad_sources(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such tokenizer source"):
        load_tokenizer(tmp_path / "absent")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid tokenizer.json"):
        load_tokenizer(tmp_path)
    (tmp_path / "broken.model").write_bytes(b"\xff\xff\xff")
    with pytest.raises(TokenizerError, match="not a SentencePiece model"):
        load_tokenizer(tmp_path / "broken.model")
    (tmp_path / "fake.gguf").write_text("not a gguf")
    with pytest.raises(GGUFError, match="not a GGUF file"):
        load_tokenizer(tmp_path / "fake.gguf")


def test_gguf_without_a_sentencepiece_vocabulary(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "bpe.gguf"
    writer = gguf.GGUFWriter(str(path), "gemma3")
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b", "ab"])
    writer.add_token_merges(["a b"])
    writer.add_tensor("output_norm.weight", np.ones(32, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(TokenizerError, match="only SentencePiece vocabularies"):
        load_tokenizer(path)


def test_bad_calls():
    tok = small_tokenizer()
    with pytest.raises(TypeError):
        tok.encode(123)
    with pytest.raises(ValueError, match="out of the vocabulary"):
        tok.decode([tok.vocab_size])
    with pytest.raises(TypeError):
        tok.batch_encode("not a list")
    with pytest.raises(TokenizerError, match="not a Gemma chat tokenizer"):
        tok.apply_chat_template([{"role": "user", "content": "hi"}])
