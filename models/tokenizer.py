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

A SentencePiece ``tokenizer.model`` is converted the same way from its pieces, read with a small
protobuf wire-format reader (no protobuf runtime, no sentencepiece, nothing unpickled). Models that
normalise text (NFKC, whitespace collapsing) or add a dummy prefix are refused: Gemma's do neither.

:meth:`GemmaTokenizer.apply_chat_template` returns the prompt text **without** ``<bos>``:
``encode(text)`` adds it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
from tokenizers.models import BPE

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
    writes a tokenizer.json that loads back with :func:`load_tokenizer`).
    """

    def __init__(self, tokenizer: Tokenizer, *, bos_token: str = "<bos>", eos_token: str = "<eos>",
                 pad_token: str = "<pad>", unk_token: str = "<unk>", source: str = "tokenizer"):
        self.backend = tokenizer
        self.source = source
        self.bos_id = self._required_id(bos_token, "bos")
        self.eos_id = self._required_id(eos_token, "eos")
        pad_id = tokenizer.token_to_id(pad_token)
        self.pad_id = pad_id if pad_id is not None else self.eos_id  # pad with eos when there is no <pad>
        self.unk_id = tokenizer.token_to_id(unk_token)
        self.special_tokens: dict[str, int] = {
            name: tokenizer.token_to_id(token) for name, token in _NAMED_TOKENS.items()
            if tokenizer.token_to_id(token) is not None}
        self.special_tokens.update(bos=self.bos_id, eos=self.eos_id, pad=self.pad_id)
        end_of_turn = self.special_tokens.get("end_of_turn")
        self.stop_token_ids: list[int] = [self.eos_id] + ([end_of_turn] if end_of_turn is not None else [])
        fim_stops = [self.special_tokens.get(n) for n in ("fim_prefix", "fim_middle", "fim_suffix",
                                                          "file_separator")]
        self.fim_stop_token_ids: list[int] = [i for i in fim_stops if i is not None] + [self.eos_id]

    def _required_id(self, token: str, role: str) -> int:
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: the vocabulary has no {role} token {token!r}")
        return token_id

    def __repr__(self) -> str:
        return f"GemmaTokenizer(source={self.source!r}, vocab_size={self.vocab_size})"

    # -- vocabulary -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (the embedding matrix may have padding rows beyond)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token: str) -> int | None:
        """The id of a piece as spelled in the vocabulary (``▁the``, ``<start_of_turn>``), or None."""
        return self.backend.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self.backend.id_to_token(int(token_id))

    # -- encode / decode ----------------------------------------------------------------------------
    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of ``text``; special tokens written in the text (``<start_of_turn>``) are parsed."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return [self.bos_id, *ids] if add_bos else list(ids)

    def batch_encode(self, texts: Sequence[str], add_bos: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, attention_mask)``, both ``(batch, longest)`` int64, right-padded with :attr:`pad_id`."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("batch_encode expects a sequence of str")
        if not texts:
            raise ValueError("batch_encode needs at least one text")
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
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"ids out of the vocabulary (0..{self.vocab_size - 1}): {bad[:10]}")
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
    """
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


def tokenizer_from_vocabulary(pieces: Sequence[str], types: Sequence[int] | None = None, *,
                              bos_id: int | None = None, add_bos: bool = True) -> Tokenizer:
    """A ``tokenizers`` BPE tokenizer for a rank-ordered SentencePiece BPE vocabulary with byte fallback.

    ``types`` are SentencePiece piece types (1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused,
    6 byte). Control and unknown pieces become special added tokens; user-defined pieces become
    (non-special) added tokens matched whole, except whitespace runs, which BPE builds from ``▁``.
    Like Gemma's, the tokenizer adds no dummy prefix (no ``▁`` in front of the text).
    """
    pieces = [_sentencepiece_spelling(p) for p in pieces]
    types = list(types) if types is not None else [NORMAL] * len(pieces)
    if len(types) != len(pieces):
        raise TokenizerError(f"{len(pieces)} pieces but {len(types)} piece types")
    whitespace_run = [t == USER_DEFINED and set(p) == {SPACE} for p, t in zip(pieces, types, strict=True)]
    mergeable = [t == NORMAL or ws for t, ws in zip(types, whitespace_run, strict=True)]
    # A duplicated piece keeps its best (first) rank: later entries are written first and overwritten.
    vocab = dict(zip(reversed(pieces), range(len(pieces) - 1, -1, -1), strict=True))
    unk = next((p for p, t in zip(pieces, types, strict=True) if t == UNKNOWN),
               "<unk>" if "<unk>" in vocab else None)
    tokenizer = Tokenizer(BPE(vocab=vocab, merges=derive_merges(pieces, mergeable), unk_token=unk,
                              fuse_unk=True, byte_fallback=True))
    tokenizer.normalizer = normalizers.Replace(" ", SPACE)
    tokenizer.decoder = decoders.Sequence([decoders.Replace(SPACE, " "), decoders.ByteFallback(),
                                           decoders.Fuse()])
    special = [AddedToken(p, special=True, normalized=False)
               for p, t in zip(pieces, types, strict=True) if t in (CONTROL, UNKNOWN)]
    user = [AddedToken(p, special=False, normalized=False)
            for p, t, ws in zip(pieces, types, whitespace_run, strict=True) if t == USER_DEFINED and not ws]
    tokenizer.add_special_tokens(special)
    tokenizer.add_tokens(user)
    if add_bos and bos_id is not None:
        # Only used by callers of the saved tokenizer.json; GemmaTokenizer.encode adds <bos> itself.
        bos = pieces[bos_id]
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tokenizer


def tokenizer_from_gguf_metadata(metadata: Mapping[str, Any], source: str = "GGUF") -> GemmaTokenizer:
    """The tokenizer described by a GGUF header (``tokenizer.ggml.*`` keys)."""
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
    backend = tokenizer_from_vocabulary(pieces, types, bos_id=bos_id,
                                        add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", True)))
    return GemmaTokenizer(backend, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk, source=source)


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
