"""Instruction-tuning data (GemmAr-style): rows -> Gemma chat tokens with a loss on the model's turns only.

Rows come from JSONL (one JSON object per line) or Parquet, in either shape:

- InstAr-500k's fields: ``instruction`` and ``output`` (required), ``system`` (optional: prepended to the
  user turn, as Gemma has no system role), ``input`` (optional: appended to the instruction after a blank
  line, Alpaca-style); other fields (``source``, ``task``, ``uuid``, ``topic``) are ignored.
- Chat: ``messages``, a list of ``{"role": "system" | "user" | "assistant" | "model", "content": ...}``
  alternating user/model and ending with a model turn; every model turn is trained on.

Each row becomes ``<bos>`` + the Gemma chat template (:meth:`models.tokenizer.GemmaTokenizer.apply_chat_template`)
of its turns; the labels are the token ids of each model turn's text and its ``<end_of_turn>`` and
``IGNORE_INDEX`` everywhere else (found by character offsets, so the tokens are those of the whole text).
Text is never normalised: Arabic (right-to-left, with diacritics) round-trips exactly.

Bad rows (invalid JSON, not an object, a missing or non-string field, an empty output, turns out of order,
longer than ``max_len`` tokens) are counted by reason and skipped; :class:`DataReport` names the first
ones. Packing (``pack=True``) concatenates whole examples into rows of at most ``max_len`` tokens, each
keeping its own ``<bos>``; as in TRL's classic packing, an example attends to the ones before it in
its row (labels never cross examples).
"""

from __future__ import annotations

import json
import os
from array import array
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from pydantic import BaseModel

from .lm_loss import IGNORE_INDEX
from .tokenizer import GemmaTokenizer, TokenizerError

__all__ = ["InstructionDataError", "RowProblem", "DataReport", "Example", "read_rows", "row_messages",
           "encode_chat", "load_instructions", "pack_examples", "InstructionBatches", "split_examples"]

_MAX_LISTED = 20  # problems named one by one in the report; the counts cover all


class InstructionDataError(ValueError):
    """A data file that cannot be used at all (unreadable, unknown format, no usable row)."""


class BadRow(ValueError):
    """One row that cannot be used; ``kind`` is the reason counted in the report."""

    def __init__(self, kind: str, detail: str | None = None):
        super().__init__(detail or kind)
        self.kind = kind


class RowProblem(BaseModel):
    row: int  # 1-based: the line of a JSONL file, the row of a Parquet file
    reason: str


class DataReport(BaseModel):
    source: str
    rows: int  # rows read (blank JSONL lines are not rows)
    used: int  # examples built
    skipped: int
    reasons: dict[str, int]  # skipped rows per reason
    problems: list[RowProblem]  # the first skipped rows, with details
    tokens: int  # of the used examples
    label_tokens: int  # tokens with a loss

    def summary(self) -> str:
        reasons = ", ".join(f"{n} {kind}" for kind, n in sorted(self.reasons.items())) or "none"
        return (f"{self.source}: {self.used} of {self.rows} rows used, {self.skipped} skipped ({reasons}); "
                f"{self.tokens} tokens, {self.label_tokens} with a loss")


class Example(NamedTuple):
    """Token ids and labels as int32 arrays (a tenth of the memory of lists: InstAr-500k is ~10^8 tokens)."""

    ids: array
    labels: array  # IGNORE_INDEX where there is no loss


# -- reading ---------------------------------------------------------------------------------------------------
def read_rows(path: str | os.PathLike) -> Iterator[tuple[int, Any]]:
    """``(row number, row)`` of a ``.jsonl`` / ``.json`` (JSON lines) or ``.parquet`` file; a JSONL line that is
    not valid JSON yields a :class:`BadRow` instead of a row."""
    path = Path(path)
    if not path.is_file():
        raise InstructionDataError(f"{path}: no such data file")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _parquet_rows(path)
    elif suffix in (".jsonl", ".json", ".ndjson"):
        try:
            with path.open(encoding="utf-8") as f:
                for number, line in enumerate(f, 1):
                    if not line.strip():
                        continue
                    try:
                        yield number, json.loads(line)
                    except json.JSONDecodeError as e:
                        yield number, BadRow("invalid JSON", f"invalid JSON ({e.msg} at column {e.colno})")
        except UnicodeDecodeError as e:
            raise InstructionDataError(f"{path}: not UTF-8 text ({e})") from None
    else:
        raise InstructionDataError(f"{path}: unknown data format {suffix!r}; use .jsonl (JSON lines) or .parquet")


def _parquet_rows(path: Path) -> Iterator[tuple[int, Any]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise InstructionDataError(f"{path}: reading Parquet needs pyarrow (pip install 'gemma-grounding[train]')") from None
    try:
        file = pq.ParquetFile(str(path))
    except Exception as e:  # pyarrow raises its own error types for damaged files
        raise InstructionDataError(f"{path}: unreadable Parquet file ({e})") from None
    number = 0
    for batch in file.iter_batches(batch_size=1024):
        for row in batch.to_pylist():
            number += 1
            yield number, row


def _text_field(row: dict, name: str, required: bool) -> str | None:
    value = row.get(name)
    if value is None:
        if required:
            raise BadRow(f"missing {name}", f"missing field {name!r}")
        return None
    if not isinstance(value, str):
        raise BadRow(f"non-text {name}", f"field {name!r} is {type(value).__name__}, not text")
    return value


def row_messages(row: Any) -> list[dict[str, str]]:
    """The chat messages of one row (either shape); raises :class:`BadRow`."""
    if not isinstance(row, dict):
        raise BadRow("not an object", f"a row must be a JSON object, got {type(row).__name__}")
    if row.get("messages") is not None:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages:
            raise BadRow("bad messages", "messages must be a non-empty list")
        out = []
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise BadRow("bad messages", f"message {i} must be an object with text role and content")
            out.append({"role": m["role"], "content": m["content"]})
        if out[-1]["role"] not in ("assistant", "model"):
            raise BadRow("bad messages", "the last message must be the model's (nothing to train on otherwise)")
        if any(not m["content"].strip() for m in out if m["role"] in ("assistant", "model")):
            raise BadRow("empty output", "a model turn is empty")
        return out
    instruction = _text_field(row, "instruction", True)
    output = _text_field(row, "output", True)
    system = _text_field(row, "system", False)
    extra = _text_field(row, "input", False)
    if not instruction.strip():
        raise BadRow("empty instruction")
    if not output.strip():
        raise BadRow("empty output")
    user = instruction if not (extra and extra.strip()) else f"{instruction}\n\n{extra}"
    messages = [{"role": "system", "content": system}] if system and system.strip() else []
    return messages + [{"role": "user", "content": user}, {"role": "model", "content": output}]


def encode_chat(tokenizer: GemmaTokenizer, messages: Sequence[dict[str, str]]) -> Example:
    """``<bos>`` + the chat template of ``messages``, labels on each model turn's text and ``<end_of_turn>``."""
    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=False)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] in ("assistant", "model"):
                start = len(tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True))
                end = len(tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)) - 1
                spans.append((start, end))  # the turn's text and <end_of_turn>, not the "\n" after it
    except TokenizerError as e:
        raise BadRow("bad messages", str(e)) from None
    encoding = tokenizer.backend.encode(text, add_special_tokens=False)
    ids = [tokenizer.bos_id, *encoding.ids]
    labels = [IGNORE_INDEX]
    for token, (char_start, _) in zip(encoding.ids, encoding.offsets, strict=True):
        labels.append(token if any(s <= char_start < e for s, e in spans) else IGNORE_INDEX)
    return Example(array("i", ids), array("i", labels))


def load_instructions(path: str | os.PathLike, tokenizer: GemmaTokenizer, max_len: int) -> tuple[list[Example], DataReport]:
    """Every usable row of ``path`` as an :class:`Example` of at most ``max_len`` tokens, and the report."""
    if max_len < 8:
        raise InstructionDataError(f"max_len must be at least 8 tokens, got {max_len}")
    examples: list[Example] = []
    reasons: Counter[str] = Counter()
    problems: list[RowProblem] = []
    rows = 0
    for number, row in read_rows(path):
        rows += 1
        try:
            if isinstance(row, BadRow):
                raise row
            example = encode_chat(tokenizer, row_messages(row))
            if len(example.ids) > max_len:
                raise BadRow("longer than the context",
                             f"{len(example.ids)} tokens, more than max_len={max_len}")
        except BadRow as e:
            reasons[e.kind] += 1
            if len(problems) < _MAX_LISTED:
                problems.append(RowProblem(row=number, reason=str(e)))
            continue
        examples.append(example)
    report = DataReport(source=str(path), rows=rows, used=len(examples), skipped=rows - len(examples),
                        reasons=dict(reasons), problems=problems, tokens=sum(len(e.ids) for e in examples),
                        label_tokens=sum(len(e.labels) - e.labels.count(IGNORE_INDEX) for e in examples))
    if not examples:
        raise InstructionDataError(f"no usable row: {report.summary()}")
    return examples, report


def split_examples(examples: Sequence[Example], fraction: float, seed: int = 0) -> tuple[list[Example], list[Example]]:
    """``(train, held out)``: a seeded random ``fraction`` of the examples held out (at least one when > 0)."""
    if not 0 <= fraction < 1:
        raise ValueError(f"the held-out fraction must be in [0, 1), got {fraction}")
    count = 0 if fraction == 0 else max(1, round(len(examples) * fraction))
    if count >= len(examples):
        raise InstructionDataError(f"holding out {count} of {len(examples)} examples leaves none to train on")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    held = set(order[:count])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


def pack_examples(examples: Sequence[Example], max_len: int) -> list[Example]:
    """Whole examples concatenated in order into rows of at most ``max_len`` tokens."""
    rows: list[Example] = []
    ids, labels = array("i"), array("i")
    for e in examples:
        if ids and len(ids) + len(e.ids) > max_len:
            rows.append(Example(ids, labels))
            ids, labels = array("i"), array("i")
        ids.extend(e.ids)
        labels.extend(e.labels)
    if ids:
        rows.append(Example(ids, labels))
    return rows


class InstructionBatches:
    """Micro-batches of examples for :func:`models.train.train`: shuffled per epoch (seeded), right-padded
    with ``pad_id`` to the longest row of each micro-batch (padding has no label)."""

    def __init__(self, examples: Sequence[Example], batch_size: int, pad_id: int, *, shuffle: bool = True):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not examples:
            raise InstructionDataError("no examples to batch")
        self.examples, self.batch_size, self.pad_id, self.shuffle = list(examples), batch_size, pad_id, shuffle

    def __len__(self) -> int:
        return -(-len(self.examples) // self.batch_size)

    def collate(self, examples: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.ids) for e in examples)
        ids = torch.full((len(examples), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
        for i, e in enumerate(examples):
            ids[i, :len(e.ids)] = torch.tensor(e.ids, dtype=torch.long)
            labels[i, :len(e.labels)] = torch.tensor(e.labels, dtype=torch.long)
        return {"input_ids": ids, "labels": labels, "lengths": torch.tensor([len(e.ids) for e in examples])}

    def epoch(self, index: int, seed: int) -> list[dict[str, torch.Tensor]]:
        order = list(range(len(self.examples)))
        if self.shuffle:
            order = torch.randperm(len(order), generator=torch.Generator().manual_seed(seed * 1_000_003 + index)).tolist()
        return [self.collate([self.examples[i] for i in order[s:s + self.batch_size]])
                for s in range(0, len(order), self.batch_size)]

    def weight(self, batch: dict[str, torch.Tensor]) -> float:
        """Predicted tokens: positions whose next label is not ignored."""
        return float((batch["labels"][:, 1:] != IGNORE_INDEX).sum())

    def tokens(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch["lengths"].sum())
