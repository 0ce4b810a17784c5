"""A fast-loading encode/decode engine for GGUF Gemma vocabularies, on the ``sentencepiece`` library.

Building the ``tokenizers`` BPE object for Gemma 3's 262,144 pieces takes ~1 s (deriving 514k merges,
then ``tokenizers`` hashing them). ``sentencepiece`` needs no merges: its BPE merges the adjacent pair
whose concatenation is the best-scored piece. A ModelProto is written from the GGUF arrays with numpy
(score = -rank, so "best score" is "earliest piece", the order the derived merges follow) and loaded in
~0.05 s. Encoding and decoding are the ``tokenizers`` backend's, token for token:

- Control and user-defined pieces (``<start_of_turn>``, ``\\n``, HTML tags) are matched in the raw text
  by a small ``tokenizers`` splitter holding only those added tokens (the same leftmost-longest matching
  the full backend runs); the text between them goes to sentencepiece, one segment at a time, as the
  backend runs BPE on each segment. In the proto they are CONTROL pieces: never matched, never merged.
- Whitespace runs (user-defined in Gemma) are NORMAL pieces, as in the backend, where BPE builds them.
- Decoding mirrors the backend's decoder chain (``▁`` -> space, byte fallback, fuse) in Python.

:func:`build_engine` returns None where the equivalence is not established (unknown or unused piece types,
a character of a mergeable piece that is not a piece itself, sentencepiece missing or refusing the
proto); the caller then builds the ``tokenizers`` backend at once. Otherwise the backend is built only
when :attr:`GemmaTokenizer.backend` is first read.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
from tokenizers import AddedToken, Tokenizer
from tokenizers.models import WordLevel

SPACE = "\u2581"
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_HEX = frozenset(string.hexdigits)


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field_varint(number: int, value: int) -> bytes:
    return _varint(number << 3) + _varint(value)


def _field_bytes(number: int, value: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(value)) + value


def sentencepiece_proto(pieces: Sequence[str], types: np.ndarray, *, unk_id: int, bos_id: int, eos_id: int,
                        pad_id: int) -> bytes | None:
    """A serialised SentencePiece BPE ModelProto: ``pieces`` with ``types``, score -rank, byte fallback,
    identity normaliser, no dummy prefix, spaces escaped as ``▁``. None where a piece cannot be written
    (a lone surrogate, a piece of 16 kB or more)."""
    count = len(pieces)
    try:
        joined = "".join(pieces)
        raw = np.frombuffer(joined.encode("utf-8"), dtype=np.uint8)
        codes = np.frombuffer(joined.encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:
        return None
    char_ends = np.cumsum(np.fromiter(map(len, pieces), dtype=np.int64, count=count))
    utf8_width = 1 + (codes >= 0x80).astype(np.int64) + (codes >= 0x800) + (codes >= 0x10000)
    byte_ends = np.concatenate(([0], np.cumsum(utf8_width)))[char_ends]
    length = np.diff(np.concatenate(([0], byte_ends)))  # UTF-8 bytes of each piece
    if count == 0 or length.max() >= 16000:
        return None
    # Per piece: 0x0A varint(sub) | sub = 0x0A varint(len) text 0x15 f32(score) 0x18 type
    len_width = 1 + (length >= 128)
    sub = 1 + len_width + length + 5 + 2
    sub_width = 1 + (sub >= 128)
    size = 1 + sub_width + sub
    start = np.concatenate(([0], np.cumsum(size)[:-1]))
    out = np.zeros(int(size.sum()), dtype=np.uint8)
    out[start] = 0x0A
    out[start + 1] = (sub & 0x7F) | np.where(sub_width == 2, 0x80, 0)
    two = np.flatnonzero(sub_width == 2)
    out[start[two] + 2] = sub[two] >> 7
    text_tag = start + 1 + sub_width
    out[text_tag] = 0x0A
    out[text_tag + 1] = (length & 0x7F) | np.where(len_width == 2, 0x80, 0)
    two = np.flatnonzero(len_width == 2)
    out[text_tag[two] + 2] = length[two] >> 7
    text = text_tag + 1 + len_width
    out[np.repeat(text - (byte_ends - length), length) + np.arange(raw.size)] = raw
    score = text + length
    out[score] = 0x15
    out[score[:, None] + 1 + np.arange(4)] = (-np.arange(count, dtype=np.float32)).astype("<f4").view(
        np.uint8).reshape(count, 4)
    out[score + 5] = 0x18
    out[score + 6] = np.asarray(types, dtype=np.uint8)
    trainer = (_field_varint(3, 2) + _field_varint(35, 1)  # model_type BPE, byte_fallback
               + b"".join(_field_varint(n, v & ((1 << 64) - 1))
                          for n, v in ((40, unk_id), (41, bos_id), (42, eos_id), (43, pad_id))))
    normalizer = (_field_bytes(1, b"identity") + _field_varint(3, 0) + _field_varint(4, 0)
                  + _field_varint(5, 1))
    return out.tobytes() + _field_bytes(2, trainer) + _field_bytes(3, normalizer)


class SentencePieceEngine:
    """Encode/decode of a Gemma vocabulary, equal to the ``tokenizers`` backend's (see the module doc)."""

    def __init__(self, processor, splitter: Tokenizer, pieces: list[str], special_ids: frozenset[int],
                 segment_id: int):
        self._sp = processor
        self._splitter = splitter
        self._pieces = pieces
        self._special = special_ids
        self._segment = segment_id

    @property
    def vocab_size(self) -> int:
        return len(self._pieces)

    def token_to_id(self, token: str) -> int | None:
        if not isinstance(token, str):
            raise TypeError(f"token must be a str, got {type(token).__name__}")
        i = self._sp.piece_to_id(token)
        return i if self._pieces[i] == token else None

    def id_to_token(self, token_id: int) -> str | None:
        if token_id < 0:
            raise OverflowError(f"token id {token_id} is negative")
        return self._pieces[token_id] if token_id < len(self._pieces) else None

    def encode(self, text: str) -> list[int]:
        return self._assemble(text, self._splitter.encode(text, add_special_tokens=False))

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        splits = self._splitter.encode_batch(list(texts), add_special_tokens=False)
        return [self._assemble(text, split) for text, split in zip(texts, splits, strict=True)]

    def _assemble(self, text: str, split) -> list[int]:
        """The added tokens the splitter found, and sentencepiece's ids for the text between them."""
        ids = split.ids
        if len(ids) == 1 and ids[0] == self._segment:  # no added token: the whole text is one segment
            return self._sp.encode(text)
        row: list[int] = []
        # One sentencepiece call per segment: a list call starts a thread pool (~50 us a call).
        for token, (begin, end) in zip(ids, split.offsets, strict=True):
            if token == self._segment:
                row.extend(self._sp.encode(text[begin:end]))
            else:
                row.append(token)
        return row

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """The backend's decoder chain: Replace("▁", " "), ByteFallback, Fuse."""
        out: list[str] = []
        pending = bytearray()
        pieces, special = self._pieces, self._special
        for i in ids:
            if skip_special_tokens and i in special:
                continue
            piece = pieces[i]
            if piece.startswith("<0x") and len(piece) == 6 and piece[5] == ">" and (
                    (piece[3] in _HEX or piece[3] == "+") and piece[4] in _HEX):
                pending.append(int(piece[3:5], 16))
                continue
            if pending:
                out.append(_bytes_text(pending))
                pending.clear()
            out.append(piece.replace(SPACE, " "))
        if pending:
            out.append(_bytes_text(pending))
        return "".join(out)


def _bytes_text(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "\ufffd" * len(data)  # as tokenizers' ByteFallback: one replacement per byte


def build_engine(pieces: list[str], kinds: np.ndarray, whitespace_run: list[int], *, unk_id: int, bos_id: int,
                 eos_id: int, pad_id: int) -> SentencePieceEngine | None:
    """The engine for a vocabulary prepared as :func:`models.tokenizer.tokenizer_from_vocabulary` does
    (``pieces`` respelled, ``kinds`` SentencePiece types, ``whitespace_run`` the user-defined ``▁`` runs),
    or None where it is not known to encode as the ``tokenizers`` backend does."""
    try:
        import sentencepiece
    except ImportError:
        return None
    if np.isin(kinds, (UNKNOWN, UNUSED)).any() or not np.isin(kinds, (NORMAL, CONTROL, USER_DEFINED, BYTE)).all():
        return None
    proto_types = np.where(kinds == USER_DEFINED, CONTROL, kinds)
    proto_types[whitespace_run] = NORMAL
    mergeable = np.flatnonzero(proto_types == NORMAL)
    # Every character of a mergeable piece must be a mergeable piece itself: the backend spells a character
    # outside the vocabulary as bytes, which never merge; sentencepiece would keep it as a symbol.
    merge_pieces = [pieces[i] for i in mergeable.tolist()]
    try:
        codes = np.frombuffer("".join(merge_pieces).encode("utf-32-le"), dtype=np.uint32)
        single = np.frombuffer("".join(p for p in merge_pieces if len(p) == 1).encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:  # a lone surrogate
        return None
    known = np.zeros(0x110000, dtype=bool)
    known[single] = True
    if not known[codes].all():
        return None
    proto = sentencepiece_proto(pieces, proto_types, unk_id=unk_id, bos_id=bos_id, eos_id=eos_id, pad_id=pad_id)
    if proto is None:
        return None
    try:
        processor = sentencepiece.SentencePieceProcessor(model_proto=proto)
    except (RuntimeError, ValueError, OSError):  # duplicated or empty pieces, missing byte pieces
        return None
    if processor.get_piece_size() != len(pieces):
        return None
    special = np.flatnonzero(kinds == CONTROL).tolist()
    spaces = set(whitespace_run)
    user = [i for i in np.flatnonzero(kinds == USER_DEFINED).tolist() if i not in spaces]
    segment_id = len(pieces)
    segment_token = "\x00segment\x00"
    vocab = {pieces[i]: i for i in [*special, *user]}
    if len(vocab) != len(special) + len(user) or segment_token in vocab:
        return None
    vocab[segment_token] = segment_id
    splitter = Tokenizer(WordLevel(vocab=vocab, unk_token=segment_token))
    splitter.add_special_tokens([AddedToken(pieces[i], special=True, normalized=False) for i in special])
    splitter.add_tokens([AddedToken(pieces[i], special=False, normalized=False) for i in user])
    return SentencePieceEngine(processor, splitter, pieces, frozenset(special), segment_id)
