"""The Gemma tokenizer over the ``tokenizers`` library: from tokenizer.json, a GGUF vocabulary or
a SentencePiece ``tokenizer.model``.

Gemma's tokenizer is SentencePiece BPE with byte fallback and no dummy prefix: spaces become ``▁``
before BPE, characters missing from the vocabulary are spelled as ``<0xXX>`` byte pieces, and
control tokens (``<bos>``, ``<start_of_turn>`` ...) and user-defined tokens (``\\n``, tab runs, HTML tags)
are matched whole in the text before BPE runs.

A GGUF file stores no merges, only the pieces with a type (normal / control / user-defined / byte)
in rank order. The BPE merges are derived from that order: every split ``left + right`` of a normal
piece whose two halves are pieces is a merge, ranked by the piece's position (earlier pieces merge
first, as in SentencePiece, whose pieces are stored by decreasing score). GGUF stores runs of spaces
with real spaces where SentencePiece writes ``▁``; they are respelled.

A GGUF vocabulary loads in ~0.2 s instead of ~1 s: encode/decode run on sentencepiece, from a ModelProto
written with numpy (:mod:`models.tokenizer_spm`, tested id for id against the ``tokenizers`` backend),
and the backend is built only when :attr:`GemmaTokenizer.backend` is first read.

A SentencePiece ``tokenizer.model`` is converted the same way from its pieces, read with a small
protobuf wire-format reader (no protobuf runtime, no sentencepiece, nothing unpickled). Models that
normalise text (NFKC, whitespace collapsing) or add a dummy prefix are refused: Gemma's do neither.

:meth:`GemmaTokenizer.apply_chat_template` returns the prompt text **without** ``<bos>``:
``encode(text)`` adds it.
"""

from __future__ import annotations

import functools
import gc
import json
import os
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

from .tokenizer_spm import SentencePieceEngine, build_engine

__all__ = ["GemmaTokenizer", "TokenizerError", "load_tokenizer", "tokenizer_from_vocabulary",
           "tokenizer_from_gguf_metadata"]

SPACE = "\u2581"  # "▁", SentencePiece's spelling of a space

# SentencePiece piece types, as stored in GGUF's tokenizer.ggml.token_type.
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Named special tokens a Gemma vocabulary may hold (name in :attr:`GemmaTokenizer.special_tokens`).
_NAMED_TOKENS = {
    "pad": "<pad>", "eos": "<eos>", "bos": "<bos>", "unk": "<unk>", "mask": "<mask>",
    "start_of_turn": "<start_of_turn>", "end_of_turn": "<end_of_turn>",
    "start_of_image": "<start_of_image>", "end_of_image": "<end_of_image>", "image": "<image>",
    "fim_prefix": "<|fim_prefix|>", "fim_middle": "<|fim_middle|>", "fim_suffix": "<|fim_suffix|>",
    "file_separator": "<|file_separator|>",
}


class TokenizerError(ValueError):
    """A tokenizer source that cannot be loaded, or a request the vocabulary cannot serve."""


class GemmaTokenizer:
    """Encode/decode, batches, the Gemma chat template and CodeGemma fill-in-the-middle prompts.

    ``tokenizer`` is a :class:`tokenizers.Tokenizer`; :attr:`backend` exposes it (``backend.save(path)``
    writes a tokenizer.json that loads back with :func:`load_tokenizer`). With ``tokenizer=None``,
    ``engine`` (a :class:`~models.tokenizer_spm.SentencePieceEngine`) encodes and decodes, and
    ``build_backend()`` makes the backend when it is first read.
    """

    def __init__(self, tokenizer: Tokenizer | None, *, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 pad_token: str = "<pad>", unk_token: str = "<unk>", source: str = "tokenizer",
                 engine: SentencePieceEngine | None = None, build_backend: Callable[[], Tokenizer] | None = None):
        if tokenizer is None and (engine is None or build_backend is None):
            raise TypeError("GemmaTokenizer needs a tokenizers.Tokenizer, or an engine and build_backend")
        self._backend = tokenizer
        self._engine = engine
        self._build_backend = build_backend
        self._backend_lock = threading.Lock()
        self.source = source
        self.bos_id = self._required_id(bos_token, "bos")
        self.eos_id = self._required_id(eos_token, "eos")
        pad_id = self.token_to_id(pad_token)
        self.pad_id = pad_id if pad_id is not None else self.eos_id  # pad with eos when there is no <pad>
        self.unk_id = self.token_to_id(unk_token)
        self.special_tokens: dict[str, int] = {
            name: self.token_to_id(token) for name, token in _NAMED_TOKENS.items()
            if self.token_to_id(token) is not None}
        self.special_tokens.update(bos=self.bos_id, eos=self.eos_id, pad=self.pad_id)
        end_of_turn = self.special_tokens.get("end_of_turn")
        self.stop_token_ids: list[int] = [self.eos_id] + ([end_of_turn] if end_of_turn is not None else [])
        fim_stops = [self.special_tokens.get(n) for n in ("fim_prefix", "fim_middle", "fim_suffix",
                                                          "file_separator")]
        self.fim_stop_token_ids: list[int] = [i for i in fim_stops if i is not None] + [self.eos_id]

    @property
    def backend(self) -> Tokenizer:
        """The :class:`tokenizers.Tokenizer`. A GGUF vocabulary encodes through its sentencepiece engine
        and builds this (~1 s) only when it is first read."""
        if self._backend is None:
            with self._backend_lock:
                if self._backend is None:
                    self._backend = self._build_backend()
        return self._backend

    @backend.setter
    def backend(self, tokenizer: Tokenizer) -> None:
        self._backend, self._engine = tokenizer, None

    def __getstate__(self) -> dict[str, Any]:  # copy.deepcopy: a lock does not copy
        state = dict(self.__dict__)
        del state["_backend_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._backend_lock = threading.Lock()

    def _required_id(self, token: str, role: str) -> int:
        token_id = self.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: the vocabulary has no {role} token {token!r}")
        return token_id

    def __repr__(self) -> str:
        return f"GemmaTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    # -- vocabulary -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding matrix may have padding rows beyond)."""
        if self._engine is not None:
            return self._engine.vocab_size
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece as spelled in the vocabulary (``▁the``, ``<start_of_turn>``), or None."""
        if self._engine is not None:
            return self._engine.token_to_id(token)
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        if self._engine is not None:
            return self._engine.id_to_token(int(token_id))
        return self.backend.id_to_token(int(token_id))

    # -- encode / decode ----------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<start_of_turn>``) are parsed."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        if self._engine is not None:
            ids = self._engine.encode(text)
        else:
            ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def batch_encode(self, texts: Sequence[str], add_bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, both ``(batch, longest)`` int64, right-padded with :attr:`pad_id`."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("batch_encode expects a sequence of str")
        if not texts:
            raise ValueError("batch_encode needs at least one text")
        if self._engine is not None:
            rows = self._engine.encode_batch(list(texts))
        else:
            rows = [e.ids for e in self.backend.encode_batch(list(texts), add_special_tokens=False)]
        if add_bos:
            rows = [[self.bos_id, *r] for r in rows]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[i, :len(r)] = 1
        return ids, mask

    def decode(self, ids: Iterable[int] | torch.Tensor, skip_special_tokens: bool = True) -> str:
        """Text of ``ids``; byte pieces are reassembled into UTF-8 (an incomplete sequence gives U+FFFD)."""
        if isinstance(ids, torch.Tensor):
            if ids.dim() > 1:
                raise ValueError(f"decode expects one sequence of ids, got shape {tuple(ids.shape)}")
            ids = ids.tolist()
        ids = [int(i) for i in ids]
        size = self.vocab_size  # once: the backend's count is slow (~0.16 ms a call)
        bad = [i for i in ids if not 0 <= i < size]
        if bad:
            raise ValueError(f"ids out of the vocabulary (0..{size - 1}): {bad[:10]}")
        if self._engine is not None:
            return self._engine.decode(ids, skip_special_tokens=skip_special_tokens)
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    # -- prompts ------------------------------------------------------------------------------------
    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = True) -> str:
        """The Gemma chat prompt (without ``<bos>``, which :meth:`encode` adds).

        Roles: ``user`` and ``assistant`` (or ``model``), alternating and starting with ``user``.
        Gemma has no system role: a leading ``system`` message is prepended to the first user turn.
        ``content`` is a string or a list of ``{"type": "text", "text": ...}`` parts.
        """
        if "start_of_turn" not in self.special_tokens or "end_of_turn" not in self.special_tokens:
            raise TokenizerError(f"{self.source}: the vocabulary has no <start_of_turn>/<end_of_turn> "
                                 "tokens; it is not a Gemma chat tokenizer")
        turns = [(str(m.get("role", "")), _message_text(m)) for m in messages]
        if turns and turns[0][0] == "system":
            system = turns.pop(0)[1]
            if not turns or turns[0][0] != "user":
                raise TokenizerError("a system message must be followed by a user message")
            turns[0] = ("user", f"{system}\n\n{turns[0][1]}")
        parts = []
        for i, (role, text) in enumerate(turns):
            role = {"assistant": "model"}.get(role, role)
            expected = "user" if i % 2 == 0 else "model"
            if role != expected:
                raise TokenizerError(f"message {i} has role {role!r}, expected {expected!r}: roles must "
                                     "alternate user/assistant starting with user (system only first)")
            parts.append(f"<start_of_turn>{role}\n{text.strip()}<end_of_turn>\n")
        if add_generation_prompt:
            parts.append("<start_of_turn>model\n")
        return "".join(parts)

    def fim_prompt(self, prefix: str, suffix: str) -> str:
        """CodeGemma fill-in-the-middle: ``<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>``.

        Generation should stop at :attr:`fim_stop_token_ids`.
        """
        names = ("fim_prefix", "fim_suffix", "fim_middle")
        missing = [_NAMED_TOKENS[n] for n in names if n not in self.special_tokens]
        if missing:
            raise TokenizerError(f"{self.source}: the vocabulary has no {', '.join(missing)}; "
                                 "fill-in-the-middle needs a CodeGemma tokenizer")
        return f"<|fim_prefix|>{prefix}<|fim_suffix|>{suffix}<|fim_middle|>"


def _message_text(message: Mapping[str, Any]) -> str:
    content = message.get("content", "")
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, Mapping) or part.get("type") != "text":
                raise TokenizerError(f"only text content parts are supported in chat messages, got {part!r}")
            texts.append(str(part.get("text", "")))
        return "".join(texts)
    raise TokenizerError("message content must be a string or a list of text parts, "
                         f"got {type(content).__name__}")


# -- building from a vocabulary ---------------------------------------------------------------------
def _sentencepiece_spelling(piece: str) -> str:
    """GGUF writes runs of spaces with real spaces; SentencePiece (and the normaliser) use ``▁``."""
    return piece.replace(" ", SPACE) if " " in piece and not piece.strip() else piece


def derive_merges(pieces: Sequence[str], mergeable: Sequence[bool]) -> list[tuple[str, str]]:
    """BPE merges implied by a rank-ordered SentencePiece vocabulary.

    Every split of a mergeable piece into two mergeable pieces is a merge; merges are ranked by the
    resulting piece's position, then longer left half first.

    The splits are tested with numpy (hashes of every half looked up in a table of the mergeable pieces,
    each hit then compared code point by code point): 0.35-0.45 s of CPU instead of ~0.6 s for a 262k
    vocabulary. The result is the same list as :func:`_derive_merges_loop`'s, which remains for
    vocabularies the hashing cannot serve (two different pieces with one hash, lone surrogates).
    """
    pieces = list(pieces)
    mergeable = list(mergeable)
    if len(pieces) != len(mergeable):
        raise TokenizerError(f"{len(pieces)} pieces but {len(mergeable)} mergeable flags")
    pairs = _merge_pairs(pieces, mergeable) if pieces else None
    if pairs is None:
        return _derive_merges_loop(pieces, mergeable)
    strings = np.empty(len(pieces), dtype=object)
    strings[:] = pieces
    with _gc_paused():  # half a million new tuples would start the cyclic collector again and again
        return list(zip(strings[pairs[0]].tolist(), strings[pairs[1]].tolist(), strict=True))


def _derive_merges_loop(pieces: Sequence[str], mergeable: Sequence[bool]) -> list[tuple[str, str]]:
    """:func:`derive_merges` one split at a time (the definition; the fallback)."""
    usable = {p for p, ok in zip(pieces, mergeable, strict=True) if ok}
    merges = []
    for piece, ok in zip(pieces, mergeable, strict=True):
        if not ok or len(piece) < 2:
            continue
        for cut in range(len(piece) - 1, 0, -1):
            left, right = piece[:cut], piece[cut:]
            if left in usable and right in usable:
                merges.append((left, right))
    return merges


@contextmanager
def _gc_paused():
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# Polynomial string hashes modulo 2**64 (numpy's uint64 arithmetic wraps). The base is odd, hence
# invertible, so a substring's hash can be shifted to start at 0; the mixer (odd, a bijection) spreads
# the small hashes of short strings over the top bits that pick a table bucket.
_HASH_BASE = 0x9E3779B97F4A7C15
_HASH_BASE_INVERSE = pow(_HASH_BASE, -1, 1 << 64)
_HASH_MIX = 0xD6E8FEB86659FD93


def _merge_pairs(pieces: list[str], mergeable: list[bool]) -> tuple[np.ndarray, np.ndarray] | None:
    """``(left ids, right ids)`` of the merges in rank order, or None where hashing cannot decide."""
    count = len(pieces)
    try:
        codes = np.frombuffer("".join(pieces).encode("utf-32-le"), dtype=np.uint32).astype(np.uint64)
    except UnicodeEncodeError:  # a lone surrogate
        return None
    lengths = np.fromiter(map(len, pieces), dtype=np.int64, count=count)
    starts = np.zeros(count + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    # prefix[i] = sum_{t < i} c_t B^t, so text[s:e] hashes to (prefix[e] - prefix[s]) B^-s.
    total = int(starts[-1])
    powers = np.full(total + 1, _HASH_BASE, dtype=np.uint64)
    powers[0] = 1
    np.cumprod(powers, out=powers)
    inverse = np.full(total + 1, _HASH_BASE_INVERSE, dtype=np.uint64)
    inverse[0] = 1
    np.cumprod(inverse, out=inverse)
    prefix = np.zeros(total + 1, dtype=np.uint64)
    np.cumsum(codes * powers[:-1], out=prefix[1:])
    mix = np.uint64(_HASH_MIX)

    def hashes(s: np.ndarray, e: np.ndarray) -> np.ndarray:
        return (prefix[e] - prefix[s]) * inverse[s] * mix

    usable = np.flatnonzero(np.fromiter(mergeable, dtype=bool, count=count))
    if usable.size == 0:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    usable_hash = hashes(starts[usable], starts[usable + 1])
    order = np.argsort(usable_hash, kind="stable")
    table_hash, table_id = usable_hash[order], usable[order]
    same = np.flatnonzero(table_hash[1:] == table_hash[:-1])
    if any(pieces[table_id[i]] != pieces[table_id[i + 1]] for i in same.tolist()):
        return None
    # Buckets by the top bits of the sorted hashes: a lookup probes a run of ~1 entry.
    bits = int(usable.size).bit_length() + 1
    shift = np.uint64(64 - bits)
    bucket_start = np.zeros((1 << bits) + 1, dtype=np.int64)
    np.cumsum(np.bincount((table_hash >> shift).astype(np.int64), minlength=1 << bits), out=bucket_start[1:])

    def lookup(h: np.ndarray) -> np.ndarray:
        """The table row holding each hash, -1 where none does."""
        bucket = (h >> shift).astype(np.int64)
        probe, end = bucket_start[bucket], bucket_start[bucket + 1]
        row = np.full(h.size, -1, dtype=np.int64)
        pending = np.flatnonzero(probe < end)
        probe = probe[pending]
        while pending.size:
            hit = table_hash[probe] == h[pending]
            row[pending[hit]] = probe[hit]
            probe += 1
            more = ~hit & (probe < end[pending])
            pending, probe = pending[more], probe[more]
        return row

    # Pieces of one length at a time: their splits form a (pieces, cuts) grid, longer left half first.
    targets = usable[lengths[usable] >= 2]
    found_piece, found_cut, found_left, found_right = [], [], [], []
    for length in np.unique(lengths[targets]).tolist():
        ids = targets[lengths[targets] == length]
        begin = starts[ids][:, None]
        middle = begin + np.arange(length - 1, 0, -1)
        left_row = lookup(hashes(np.broadcast_to(begin, middle.shape).ravel(), middle.ravel()))
        hit = np.flatnonzero(left_row >= 0)
        end = np.broadcast_to(begin + length, middle.shape).ravel()[hit]
        right_row = lookup(hashes(middle.ravel()[hit], end))
        both = right_row >= 0
        hit = hit[both]
        piece, cut = np.divmod(hit, length - 1)
        found_piece.append(ids[piece])
        found_cut.append(length - 1 - cut)
        found_left.append(table_id[left_row[hit]])
        found_right.append(table_id[right_row[both]])
    if not found_piece:
        return np.empty(0, dtype=np.int64), np.empty(0, dtype=np.int64)
    piece, cut = np.concatenate(found_piece), np.concatenate(found_cut)
    left, right = np.concatenate(found_left), np.concatenate(found_right)
    # Equal hashes need not be equal strings: compare every accepted half with its piece.
    begin = starts[piece]
    exact = (_same_text(codes, starts, lengths, left, begin, begin + cut)
             & _same_text(codes, starts, lengths, right, begin + cut, starts[piece + 1]))
    order = np.lexsort((-cut, piece))
    order = order[exact[order]]
    return left[order], right[order]


def _same_text(codes: np.ndarray, starts: np.ndarray, lengths: np.ndarray, ids: np.ndarray,
               begin: np.ndarray, end: np.ndarray) -> np.ndarray:
    """Whether ``text[begin:end]`` equals piece ``ids``, element by element (one 2-D compare per width)."""
    width = end - begin
    same = lengths[ids] == width
    order = np.argsort(width, kind="stable")
    bounds = np.searchsorted(width[order], np.arange(int(width.max(initial=0)) + 2))
    for w in range(1, bounds.size - 1):
        rows = order[bounds[w]:bounds[w + 1]]
        rows = rows[same[rows]]
        if rows.size:
            offsets = np.arange(w)
            same[rows] = (codes[begin[rows, None] + offsets] == codes[starts[ids[rows], None] + offsets]).all(axis=1)
    return same


def _prepare_vocabulary(pieces: Sequence[str], types: Sequence[int] | None
                        ) -> tuple[list[str], np.ndarray, list[int], list[int]]:
    """Pieces respelled, their types as an array, the user-defined ids and the whitespace runs among them."""
    pieces = [_sentencepiece_spelling(p) if " " in p else p for p in pieces]
    try:
        kinds = np.full(len(pieces), NORMAL, dtype=np.int64) if types is None else np.asarray(types, dtype=np.int64)
    except (TypeError, ValueError, OverflowError) as e:
        raise TokenizerError(f"piece types must be integers (SentencePiece types 1-6): {e}") from None
    if kinds.shape != (len(pieces),):
        raise TokenizerError(f"{len(pieces)} pieces but {kinds.size} piece types")
    # Whole-array tests on the types: these run once per entry of a 262k vocabulary.
    user_defined = np.flatnonzero(kinds == USER_DEFINED).tolist()
    whitespace_run = [i for i in user_defined if set(pieces[i]) == {SPACE}]
    return pieces, kinds, user_defined, whitespace_run


def tokenizer_from_vocabulary(pieces: Sequence[str], types: Sequence[int] | None = None, *,
                              bos_id: int | None = None, add_bos: bool = True) -> Tokenizer:
    """A ``tokenizers`` BPE tokenizer for a rank-ordered SentencePiece BPE vocabulary with byte fallback.

    ``types`` are SentencePiece piece types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte). Control and unknown pieces become special added tokens; user-defined pieces become
    (non-special) added tokens matched whole, except whitespace runs, which BPE builds from ``▁``.
    Like Gemma's, the tokenizer adds no dummy prefix (no ``▁`` in front of the text).
    """
    pieces, kinds, user_defined, whitespace_run = _prepare_vocabulary(pieces, types)
    mergeable = kinds == NORMAL
    mergeable[whitespace_run] = True
    # A duplicated piece keeps its best (first) rank: later entries are written first and overwritten.
    vocab = dict(zip(reversed(pieces), range(len(pieces) - 1, -1, -1), strict=True))
    unknown = np.flatnonzero(kinds == UNKNOWN)
    unk = pieces[unknown[0]] if unknown.size else ("<unk>" if "<unk>" in vocab else None)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=derive_merges(pieces, mergeable.tolist()), unk_token=unk,
                              fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    special = [AddedToken(pieces[i], special=True, normalized=False)
               for i in np.flatnonzero((kinds == CONTROL) | (kinds == UNKNOWN)).tolist()]
    spaces = set(whitespace_run)
    user = [AddedToken(pieces[i], special=False, normalized=False) for i in user_defined if i not in spaces]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
    if add_bos and bos_id is not None:
        # Only used by callers of the saved tokenizer.json; GemmaTokenizer.encode adds <bos> itself.
        bos = pieces[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tokenizer


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str = "GGUF", *,
                                 engine: str = "auto") -> GemmaTokenizer:
    """The tokenizer described by a GGUF header (``tokenizer.ggml.*`` keys).

    ``engine="auto"`` encodes and decodes with sentencepiece where :func:`~models.tokenizer_spm.build_engine`
    can prove it equal to the ``tokenizers`` backend (~0.1 s to load instead of ~1 s), building the backend
    only when :attr:`GemmaTokenizer.backend` is read; ``engine="tokenizers"`` builds the backend now.
    """
    if engine not in ("auto", "tokenizers"):
        raise ValueError(f"engine must be 'auto' or 'tokenizers', got {engine!r}")
    model = metadata.get("tokenizer.ggml.model")
    pieces = metadata.get("tokenizer.ggml.tokens")
    if pieces is None:
        raise TokenizerError(f"{source}: no tokenizer.ggml.tokens in the GGUF metadata (no vocabulary)")
    if model != "llama":
        raise TokenizerError(f"{source}: tokenizer.ggml.model is {model!r}; only SentencePiece vocabularies "
                             "('llama', as written for Gemma) are supported")
    if metadata.get("tokenizer.ggml.merges"):
        raise TokenizerError(f"{source}: the GGUF stores explicit BPE merges, which Gemma vocabularies "
                             "never do; this is not a Gemma tokenizer")
    if metadata.get("tokenizer.ggml.add_space_prefix", False):
        raise TokenizerError(f"{source}: the vocabulary wants a dummy space prefix, which Gemma tokenizers "
                             "never use; this is not a Gemma tokenizer")
    types = metadata.get("tokenizer.ggml.token_type")

    def special_id(key: str, default: int) -> int:
        index = int(metadata.get(f"tokenizer.ggml.{key}", default))
        if not 0 <= index < len(pieces):
            raise TokenizerError(f"{source}: tokenizer.ggml.{key} = {index} is outside the vocabulary")
        return index

    bos_id = special_id("bos_token_id", 2)
    eos_id, pad_id, unk_id = (special_id("eos_token_id", 1), special_id("padding_token_id", 0),
                              special_id("unknown_token_id", 3))
    bos, eos, pad, unk = (_sentencepiece_spelling(pieces[i]) for i in (bos_id, eos_id, pad_id, unk_id))
    build_backend = functools.partial(tokenizer_from_vocabulary, pieces, types, bos_id=bos_id,
                                      add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)))

    names = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": unk, "source": source}
    if engine == "auto":
        spelled, kinds, _, whitespace_run = _prepare_vocabulary(pieces, types)
        fast = build_engine(spelled, kinds, whitespace_run, unk_id=unk_id, bos_id=bos_id, eos_id=eos_id,
                            pad_id=pad_id)
        if fast is not None:
            return GemmaTokenizer(None, engine=fast, build_backend=build_backend, **names)
    return GemmaTokenizer(build_backend(), **names)


def _from_tokenizer_json(path: Path, config_dir: Path | None) -> GemmaTokenizer:
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises plain Exception subclasses on bad JSON
        raise TokenizerError(f"{path}: not a valid tokenizer.json ({e})") from None
    names = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    config_file = (config_dir / "tokenizer_config.json") if config_dir else None
    if config_file is not None and config_file.is_file():
        try:
            config = json.loads(config_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise TokenizerError(f"{config_file}: not valid JSON ({e})") from None
        for key in names:
            value = config.get(key)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str) and backend.token_to_id(value) is not None:
                names[key] = value
    return GemmaTokenizer(backend, source=str(path), **names)


# -- SentencePiece tokenizer.model ------------------------------------------------------------------
# A tokenizer.model is a protobuf ModelProto. Its few fields needed here are read straight from the
# wire format, so neither the protobuf runtime nor sentencepiece's generated module is involved.
# Field numbers are those of sentencepiece_model.proto.
_MODEL_PIECES, _MODEL_TRAINER, _MODEL_NORMALIZER = 1, 2, 3
_PIECE_TEXT, _PIECE_SCORE, _PIECE_TYPE = 1, 2, 3
_TRAINER_MODEL_TYPE, _TRAINER_BYTE_FALLBACK = 3, 35
_TRAINER_IDS = {"unk": 40, "bos": 41, "eos": 42, "pad": 43}
_TRAINER_ID_DEFAULTS = {"unk": 0, "bos": 1, "eos": 2, "pad": -1}
_NORMALIZER_NAME, _NORMALIZER_DUMMY_PREFIX, _NORMALIZER_REMOVE_SPACES = 1, 3, 4
_SP_BPE = 2


def _protobuf_fields(buf: bytes) -> list[tuple[int, Any]]:
    """``(field number, value)`` of one protobuf message: ints for varints, bytes otherwise."""
    fields, pos = [], 0

    def varint() -> int:
        nonlocal pos
        result = shift = 0
        while True:
            byte = buf[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    while pos < len(buf):
        key = varint()
        number, wire = key >> 3, key & 7
        if wire == 0:
            fields.append((number, varint()))
        elif wire == 1:
            fields.append((number, buf[pos:pos + 8]))
            pos += 8
        elif wire == 2:
            length = varint()
            fields.append((number, buf[pos:pos + length]))
            pos += length
        elif wire == 5:
            fields.append((number, buf[pos:pos + 4]))
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > len(buf):
            raise ValueError("message ends early")
    return fields


def _int32(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value  # negative int32s are 10-byte varints


def _from_sentencepiece_model(path: Path) -> GemmaTokenizer:
    """Convert a SentencePiece BPE ``tokenizer.model`` (identity normaliser, as Gemma's) to ``tokenizers``."""
    try:
        model = _protobuf_fields(path.read_bytes())
        pieces, types = [], []
        for number, value in model:
            if number == _MODEL_PIECES:
                piece = dict(_protobuf_fields(value))
                pieces.append(piece.get(_PIECE_TEXT, b"").decode("utf-8"))
                types.append(int(piece.get(_PIECE_TYPE, NORMAL)))
        trainer = dict(_protobuf_fields(dict(model).get(_MODEL_TRAINER, b"")))
        normalizer = dict(_protobuf_fields(dict(model).get(_MODEL_NORMALIZER, b"")))
    except (ValueError, IndexError, UnicodeDecodeError) as e:
        raise TokenizerError(f"{path}: not a SentencePiece model file ({e})") from None
    if not pieces:
        raise TokenizerError(f"{path}: not a SentencePiece model file (no pieces)")
    if trainer.get(_TRAINER_MODEL_TYPE, 1) != _SP_BPE:
        raise TokenizerError(f"{path}: a SentencePiece unigram/word/char model; Gemma tokenizers are BPE")
    name = normalizer.get(_NORMALIZER_NAME, b"").decode("utf-8", "replace")
    if name != "identity" or normalizer.get(_NORMALIZER_REMOVE_SPACES, 1):
        raise TokenizerError(f"{path}: this SentencePiece model normalises text (rule {name!r}, whitespace "
                             "collapsing), which the conversion does not reproduce; use its tokenizer.json")
    if normalizer.get(_NORMALIZER_DUMMY_PREFIX, 1):
        raise TokenizerError(f"{path}: this SentencePiece model adds a dummy space prefix, which Gemma "
                             "tokenizers never do and the conversion does not reproduce; use its "
                             "tokenizer.json")
    if not trainer.get(_TRAINER_BYTE_FALLBACK, 0):
        raise TokenizerError(f"{path}: a SentencePiece model without byte fallback; Gemma tokenizers have it")
    ids = {role: _int32(trainer.get(number, _TRAINER_ID_DEFAULTS[role]))
           for role, number in _TRAINER_IDS.items()}
    names = {f"{role}_token": pieces[i] for role, i in ids.items() if 0 <= i < len(pieces)}
    backend = tokenizer_from_vocabulary(pieces, types, bos_id=ids["bos"] if ids["bos"] >= 0 else None)
    return GemmaTokenizer(backend, source=str(path), **names)


def load_tokenizer(source: str | os.PathLike) -> GemmaTokenizer:
    """A :class:`GemmaTokenizer` from a directory (tokenizer.json, else tokenizer.model), a
    ``tokenizer.json`` file, a SentencePiece ``.model`` file, or a ``.gguf`` file's vocabulary."""
    path = Path(os.fspath(source)).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such tokenizer source (expected a directory with "
                                "tokenizer.json, a tokenizer.json file or a .gguf file)")
    if path.is_dir():
        if (path / "tokenizer.json").is_file():
            return _from_tokenizer_json(path / "tokenizer.json", path)
        if (path / "tokenizer.model").is_file():
            return _from_sentencepiece_model(path / "tokenizer.model")
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return load_tokenizer(ggufs[0])
        raise TokenizerError(f"{path}: no tokenizer.json or tokenizer.model in this directory")
    if path.suffix.lower() == ".gguf":
        from .gguf import read_gguf_metadata

        return tokenizer_from_gguf_metadata(read_gguf_metadata(path), source=str(path))
    if path.suffix.lower() == ".model":
        return _from_sentencepiece_model(path)
    if path.suffix.lower() == ".json":
        return _from_tokenizer_json(path, path.parent)
    raise TokenizerError(f"{path}: unrecognised tokenizer file; pass a tokenizer.json, tokenizer.model "
                         "or .gguf file")
