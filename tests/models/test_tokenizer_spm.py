"""The sentencepiece engine of GGUF tokenizers against the ``tokenizers`` backend it stands in for.

The backend (BPE over merges derived from the vocabulary, checked against transformers in
test_tokenizer.py) is the oracle: sentencepiece's C++ BPE, which needs no merges, must give the very same
ids, and the Python decoder the very same text, on the real Gemma 3 vocabulary and on small random ones.
The ModelProto written with numpy is read back with the independent protobuf reader of models.tokenizer.
"""

from __future__ import annotations

import random
import struct

import numpy as np
import pytest
from test_tokenizer import TEXTS

import models.tokenizer as tokenizer_module
from models.tokenizer import (
    BYTE,
    CONTROL,
    NORMAL,
    UNUSED,
    USER_DEFINED,
    _prepare_vocabulary,
    _protobuf_fields,
    load_tokenizer,
    tokenizer_from_gguf_metadata,
    tokenizer_from_vocabulary,
)
from models.tokenizer_spm import SentencePieceEngine, build_engine, sentencepiece_proto

EXTRAS = [" ", "  ", "   ", "\t", "\n", "\n\n", "\r\n", "\u00a0", "\u200d", "é", "e\u0301", "中", "😀", "<", ">",
          "\u2581", "<start_of_turn>", "<end_of_turn>", "<unk>", "<bos>", "<eos>", "<pad>", "<table>", "</td>",
          "<0x41>", "<start_of", "_turn>", "\x00", "\ud7ff", "𝔘", "0123456789", "....", "----", "===="]


@pytest.fixture(scope="module")
def both(gemma3_270m_gguf):
    """(new, old): the default GGUF tokenizer and the one built with the tokenizers backend at once."""
    from models.gguf import read_gguf_metadata

    metadata = read_gguf_metadata(gemma3_270m_gguf)
    new = tokenizer_from_gguf_metadata(metadata, source="new")
    old = tokenizer_from_gguf_metadata(metadata, source="old", engine="tokenizers")
    assert isinstance(new._engine, SentencePieceEngine) and old._engine is None
    return new, old


def _soup(rng: random.Random, old, count: int) -> list[str]:
    texts = []
    for _ in range(count):
        parts = [old.id_to_token(rng.randrange(old.vocab_size)) if rng.random() < 0.6 else rng.choice(EXTRAS)
                 for _ in range(rng.randint(1, 14))]
        texts.append("".join(parts).replace("\u2581", " ") if rng.random() < 0.8 else "".join(parts))
    return texts


def _periodic(rng: random.Random, old, count: int) -> list[str]:
    """Repeated short units: where BPE tie-breaking between equal pieces decides the ids."""
    short = [p for p in (old.id_to_token(i) for i in range(old.vocab_size)) if p and 1 <= len(p) <= 3
             and not p.startswith("<")]
    texts = []
    for _ in range(count):
        unit = "".join(rng.choice(short) for _ in range(rng.randint(1, 3)))
        if rng.random() < 0.5:
            unit = unit[:1] * rng.randint(1, 3) + unit[1:]
        texts.append(((rng.choice(short) if rng.random() < 0.5 else "") + unit * rng.randint(2, 12))
                     .replace("\u2581", " "))
    return texts


def test_engine_encodes_as_the_tokenizers_backend_on_the_real_gguf(both):
    new, old = both
    rng = random.Random(17)
    texts = [*TEXTS, *EXTRAS, "".join(EXTRAS), " " * 40, "\t" * 9, "\n" * 7, "a" * 300,
             *_soup(rng, old, 3000), *_periodic(rng, old, 3000)]
    mismatched = [t for t in texts if new.encode(t, add_bos=False) != old.encode(t, add_bos=False)]
    assert not mismatched, mismatched[:5]
    assert new.encode("hi") == old.encode("hi") and new.encode("hi")[0] == new.bos_id
    new_ids, new_mask = new.batch_encode(texts[:300])
    old_ids, old_mask = old.batch_encode(texts[:300])
    assert new_ids.equal(old_ids) and new_mask.equal(old_mask)


def test_engine_decodes_as_the_tokenizers_backend_on_the_real_gguf(both):
    new, old = both
    rng = random.Random(18)
    byte_ids = [new.token_to_id(f"<0x{b:02X}>") for b in range(256)]
    assert None not in byte_ids
    special = list(range(0, 110))
    for _ in range(3000):
        ids = [rng.choice(byte_ids) if r < 0.35 else rng.choice(special) if r < 0.45 else rng.randrange(new.vocab_size)
               for r in (rng.random() for _ in range(rng.randint(0, 24)))]
        for skip in (True, False):
            assert new.decode(ids, skip_special_tokens=skip) == old.decode(ids, skip_special_tokens=skip), (ids, skip)
    emoji = new.encode("😀 and é", add_bos=False)
    assert new.decode(emoji[:1]) == old.decode(emoji[:1])  # a cut UTF-8 sequence: U+FFFD per byte


def test_engine_vocabulary_queries_and_lazy_backend(both):
    new, old = both
    assert new.vocab_size == old.vocab_size == 262144
    assert (new.bos_id, new.eos_id, new.pad_id, new.unk_id) == (old.bos_id, old.eos_id, old.pad_id, old.unk_id)
    assert new.special_tokens == old.special_tokens and new.stop_token_ids == old.stop_token_ids
    for token in ["<bos>", "<start_of_turn>", "\u2581the", "\u2581\u2581", "\n", "<0x41>", "nope", "", "<table>"]:
        assert new.token_to_id(token) == old.token_to_id(token), token
    for i in [0, 1, 2, 3, 105, 106, 107, 138, 255999, 262143, 262144, 10**7]:
        assert new.id_to_token(i) == old.id_to_token(i), i
    assert new.apply_chat_template([{"role": "user", "content": "x"}]) == old.apply_chat_template(
        [{"role": "user", "content": "x"}])
    # The backend is built only when read, and is the same tokenizer.
    assert new._backend is None
    assert new.backend.to_str() == old.backend.to_str()
    assert new._backend is not None


def test_load_tokenizer_gguf_uses_the_engine(gemma3_270m_gguf):
    tok = load_tokenizer(gemma3_270m_gguf)
    assert isinstance(tok._engine, SentencePieceEngine) and tok._backend is None
    assert tok.decode(tok.encode("<start_of_turn>user\nHello world<end_of_turn>"), skip_special_tokens=False) == \
        "<bos><start_of_turn>user\nHello world<end_of_turn>"


def test_engine_on_random_small_vocabularies():
    """Small alphabets, random piece orders: dense in equal-piece ties and overlapping merges."""
    rng = random.Random(5)
    for trial in range(60):
        alphabet = "ab" if trial % 2 else "abc"
        normal: set[str] = set()
        while len(normal) < rng.randint(10, 60):
            normal.add("".join(rng.choice(alphabet) for _ in range(rng.randint(2, 7))))
        order = [*alphabet, *sorted(normal)]
        rng.shuffle(order)
        order.insert(rng.randrange(len(order)), "\u2581\u2581")
        pieces = ["<pad>", "<eos>", "<bos>", "<unk>", "<x>", *(f"<0x{b:02X}>" for b in range(256)), *order]
        types = [CONTROL] * 4 + [USER_DEFINED] + [BYTE] * 256 + [
            USER_DEFINED if p == "\u2581\u2581" else NORMAL for p in order]
        if "\u2581" not in order:
            pieces.append("\u2581")
            types.append(NORMAL)
        spelled, kinds, _, spaces = _prepare_vocabulary(pieces, types)
        engine = build_engine(spelled, kinds, spaces, unk_id=3, bos_id=2, eos_id=1, pad_id=0)
        assert engine is not None
        backend = tokenizer_from_vocabulary(pieces, types, bos_id=2)
        for _ in range(150):
            text = "".join(rng.choice([*alphabet, " ", "<x>", "é"]) for _ in range(rng.randint(0, 25)))
            expected = backend.encode(text, add_special_tokens=False).ids
            assert engine.encode(text) == expected, (trial, text)
            assert engine.decode(expected, skip_special_tokens=False) == backend.decode(
                expected, skip_special_tokens=False)


def test_engine_declines_vocabularies_it_is_not_proven_on():
    base = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "a", "b", "ab"]
    base_types = [CONTROL] * 4 + [BYTE] * 256 + [NORMAL] * 3

    def engine(pieces, types):
        spelled, kinds, _, spaces = _prepare_vocabulary(pieces, types)
        return build_engine(spelled, kinds, spaces, unk_id=3, bos_id=2, eos_id=1, pad_id=0)

    assert engine(base, base_types) is not None
    assert engine([*base, "zz"], [*base_types, UNUSED]) is None  # unused pieces
    assert engine([*base, "ac"], [*base_types, NORMAL]) is None  # "c" is no piece: the backend spells it as bytes
    assert engine([*base, "a"], [*base_types, NORMAL]) is None  # a duplicated piece: sentencepiece refuses it
    assert engine(base[:-10] + base[-3:], base_types[:-10] + base_types[-3:]) is None  # byte pieces missing
    assert engine([*base, "\ud800"], [*base_types, NORMAL]) is None  # a lone surrogate


def test_gguf_vocabulary_the_engine_declines_still_loads(monkeypatch):
    metadata = {"tokenizer.ggml.model": "llama",
                "tokenizer.ggml.tokens": ["<pad>", "<eos>", "<bos>", "<unk>", "a", "b", "ab", "zz"],
                "tokenizer.ggml.token_type": [CONTROL] * 4 + [NORMAL] * 3 + [UNUSED]}
    tok = tokenizer_from_gguf_metadata(metadata)
    assert tok._engine is None and tok.encode("ab", add_bos=False) == [6]
    with pytest.raises(ValueError, match="engine"):
        tokenizer_from_gguf_metadata(metadata, engine="spm")
    monkeypatch.setattr(tokenizer_module, "build_engine", lambda *a, **k: None)
    assert tokenizer_from_gguf_metadata(metadata)._engine is None


def test_proto_reads_back_with_the_independent_reader():
    """Multi-byte characters, an empty-type mix and pieces long enough for two-byte varints."""
    pieces = ["<unk>", "a", "é", "中文", "😀", "x" * 127, "y" * 128, "z" * 300, "\u2581" * 50]
    types = np.array([CONTROL, NORMAL, NORMAL, USER_DEFINED, BYTE, NORMAL, NORMAL, NORMAL, NORMAL])
    proto = sentencepiece_proto(pieces, types, unk_id=0, bos_id=-1, eos_id=2, pad_id=-1)
    fields = _protobuf_fields(proto)
    read = [dict(_protobuf_fields(value)) for number, value in fields if number == 1]
    assert [r[1].decode("utf-8") for r in read] == pieces
    assert [struct.unpack("<f", r[2])[0] for r in read] == [-float(i) for i in range(len(pieces))]
    assert [r[3] for r in read] == types.tolist()
    trainer = dict(_protobuf_fields(dict(fields)[2]))
    assert trainer[3] == 2 and trainer[35] == 1 and trainer[40] == 0 and trainer[42] == 2
    assert tokenizer_module._int32(trainer[41]) == -1
    normalizer = dict(_protobuf_fields(dict(fields)[3]))
    assert normalizer[1] == b"identity" and normalizer[3] == 0 and normalizer[4] == 0 and normalizer[5] == 1
    assert sentencepiece_proto(["a\ud800"], np.array([NORMAL]), unk_id=0, bos_id=0, eos_id=0, pad_id=0) is None


def test_engine_tokenizer_deep_copies():
    import copy

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "a", "b", "ab"]
    metadata = {"tokenizer.ggml.model": "llama", "tokenizer.ggml.tokens": pieces,
                "tokenizer.ggml.token_type": [CONTROL] * 4 + [BYTE] * 256 + [NORMAL] * 3}
    tok = tokenizer_from_gguf_metadata(metadata)
    assert tok._engine is not None
    twin = copy.deepcopy(tok)
    assert twin.encode("abé") == tok.encode("abé") == [2, 262, 4 + 0xC3, 4 + 0xA9]
    assert twin.backend.encode("abé", add_special_tokens=False).ids == [262, 4 + 0xC3, 4 + 0xA9]
    assert tok._backend is None  # building the copy's backend left the original's alone


def test_decode_counts_the_vocabulary_once():
    """The backend's vocabulary count costs ~0.16 ms: read per id, 59k ids took 9.6 s to decode."""
    from models.tokenizer import GemmaTokenizer

    class Counting(GemmaTokenizer):
        reads = 0

        @property
        def vocab_size(self) -> int:
            Counting.reads += 1
            return super().vocab_size

    pieces = ["<pad>", "<eos>", "<bos>", "<unk>", *(f"<0x{b:02X}>" for b in range(256)), "a", "b", "ab"]
    tok = Counting(tokenizer_from_vocabulary(pieces, [CONTROL] * 4 + [BYTE] * 256 + [NORMAL] * 3, bos_id=2))
    Counting.reads = 0
    assert tok.decode([262, 260, 261] * 1000) == "abab" * 1000
    assert Counting.reads == 1
