"""Text corpora and activation streams for SAE training and evaluation, with bounded memory.

- :func:`text_contexts` reads a UTF-8 text file a piece at a time, tokenizes it and cuts the token
  stream into contexts of ``context_len`` tokens, each starting with BOS (as Gemma Scope's were).
- :func:`stream_activations` runs a model over batches of contexts, only as far as the site, and yields
  the activations of every token but BOS (Gemma Scope trained and evaluated without BOS).
- :class:`ActivationBuffer` mixes that stream through a fixed-size pool of rows in a file on disk, so
  that a batch holds tokens from many contexts and positions while memory holds one batch.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .hooks import Site, run_to_sites

__all__ = ["SAEDataError", "text_contexts", "context_batches", "stream_activations", "ActivationBuffer"]

_READ_CHARS = 1 << 16


class SAEDataError(ValueError):
    """A corpus that cannot be used (missing, not UTF-8 text, too short) or bad stream settings."""


def _text_pieces(path: Path) -> Iterator[str]:
    """The file's text in pieces of about 64K characters, cut after a newline where there is one (so
    that words are not split between two tokenizer calls)."""
    carry = ""
    with path.open("r", encoding="utf-8", newline="") as f:
        while True:
            try:
                block = f.read(_READ_CHARS)
            except UnicodeDecodeError as e:
                raise SAEDataError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start} of a read block)") from None
            if not block:
                break
            text = carry + block
            cut = text.rfind("\n") + 1
            if cut == 0:
                cut = len(text)  # one very long line: cut anyway
            yield text[:cut]
            carry = text[cut:]
    if carry:
        yield carry


def text_contexts(tokenizer, path: str | os.PathLike, context_len: int, *,
                  max_tokens: int | None = None) -> Iterator[list[int]]:
    """Contexts of ``context_len`` token ids (BOS then ``context_len - 1`` tokens of the text) in file
    order; a trailing part too short for a whole context is left out. Stops once ``max_tokens`` tokens
    (BOS excluded) have been yielded."""
    path = Path(path)
    if context_len < 2:
        raise SAEDataError(f"context_len must be >= 2 (BOS and at least one token), got {context_len}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such text file")
    body = context_len - 1
    if max_tokens is not None and max_tokens < body:
        raise SAEDataError(f"max_tokens={max_tokens} is less than one context ({body} tokens + BOS)")
    pending: list[int] = []
    yielded = total = 0
    for piece in _text_pieces(path):
        pending.extend(tokenizer.encode(piece, add_bos=False))
        total = max(total, len(pending))
        while len(pending) >= body:
            if max_tokens is not None and yielded + body > max_tokens:
                return
            yield [tokenizer.bos_id, *pending[:body]]
            del pending[:body]
            yielded += body
    if yielded == 0:
        raise SAEDataError(f"{path}: the text has {total} tokens, fewer than one context of {body} "
                           f"(+ BOS); use a longer text or a shorter context")


def context_batches(contexts: Iterable[list[int]], batch_size: int) -> Iterator[torch.Tensor]:
    """``(batch, context_len)`` id tensors of ``batch_size`` contexts (the last may hold fewer)."""
    rows: list[list[int]] = []
    for ctx in contexts:
        rows.append(ctx)
        if len(rows) == batch_size:
            yield torch.tensor(rows, dtype=torch.long)
            rows = []
    if rows:
        yield torch.tensor(rows, dtype=torch.long)


def stream_activations(model, site: Site, batches: Iterable[torch.Tensor], *, bos_id: int) -> Iterator[torch.Tensor]:
    """fp32 ``(tokens, width)`` activations at ``site`` of each batch of contexts, BOS positions left out."""
    device = model.device
    for ids in batches:
        # no grad mode across the yield: the consumer (training) needs autograd on
        with torch.no_grad():
            ids = ids.to(device)
            acts = run_to_sites(model, ids, site)[site]
            rows = acts[ids != bos_id].float().cpu()
        yield rows


class _Rows:
    """Takes exactly ``n`` rows at a time from a stream of ``(rows, width)`` chunks."""

    def __init__(self, chunks: Iterable[torch.Tensor], width: int):
        self.chunks, self.width = iter(chunks), width
        self.current = np.empty((0, width), dtype=np.float32)
        self.done = False

    def take(self, n: int) -> np.ndarray:
        parts, have = [], 0
        while have < n and not self.done:
            if len(self.current) == 0:
                try:
                    chunk = next(self.chunks)
                except StopIteration:
                    self.done = True
                    break
                chunk = torch.as_tensor(chunk)
                if chunk.dim() != 2 or chunk.shape[1] != self.width:
                    raise SAEDataError(f"activation chunks must be (rows, {self.width}), got {tuple(chunk.shape)}")
                self.current = chunk.detach().to("cpu", torch.float32).numpy()
                continue
            part = self.current[:n - have]
            self.current = self.current[len(part):]
            parts.append(part)
            have += len(part)
        return np.concatenate(parts) if parts else np.empty((0, self.width), dtype=np.float32)


class ActivationBuffer:
    """A pool of ``capacity`` activation rows in a raw float32 file (``np.memmap``; no pickle) that
    mixes a stream before it is served in batches.

    The pool is filled; then, round after round, a random half of its slots is served as batches and
    refilled from the stream. A row waits a geometric number of rounds, so consecutive tokens of one
    context end up in different batches. When the stream ends, what remains is served in random order.
    The file is deleted by :meth:`close` (or on leaving a ``with`` block).
    """

    def __init__(self, path: str | os.PathLike, capacity: int, width: int, *, seed: int = 0):
        if capacity < 2 or width < 1:
            raise SAEDataError(f"buffer capacity must be >= 2 rows and width >= 1, got {capacity} x {width}")
        self.path, self.capacity, self.width = Path(path), int(capacity), int(width)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.pool = np.memmap(self.path, dtype=np.float32, mode="w+", shape=(self.capacity, self.width))
        self.filled = np.zeros(self.capacity, dtype=bool)
        self.rng = np.random.default_rng(seed)
        self.rows_in = 0

    def __enter__(self) -> ActivationBuffer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.pool is not None:
            del self.pool
            self.pool = None
        self.path.unlink(missing_ok=True)

    def _fill(self, slots: np.ndarray, rows: _Rows) -> None:
        for start in range(0, len(slots), 8192):
            part = slots[start:start + 8192]
            got = rows.take(len(part))
            if len(got):
                self.pool[part[:len(got)]] = got
                self.filled[part[:len(got)]] = True
                self.rows_in += len(got)
            if len(got) < len(part):
                return

    def _serve(self, slots: np.ndarray, batch_size: int) -> Iterator[torch.Tensor]:
        for start in range(0, len(slots), batch_size):
            part = np.sort(slots[start:start + batch_size])  # sorted reads are sequential on disk
            batch = torch.from_numpy(np.array(self.pool[part]))
            self.filled[part] = False
            yield batch

    def batches(self, chunks: Iterable[torch.Tensor], batch_size: int) -> Iterator[torch.Tensor]:
        """Shuffled ``(batch_size, width)`` fp32 batches of every row of ``chunks`` (the last may be smaller)."""
        if not 1 <= batch_size <= self.capacity // 2:
            raise SAEDataError(f"batch_size must be between 1 and half the buffer ({self.capacity // 2} rows), "
                               f"got {batch_size}")
        rows = _Rows(chunks, self.width)
        self._fill(np.arange(self.capacity), rows)
        half = self.capacity // 2 // batch_size * batch_size  # whole batches each round
        while not rows.done:
            slots = self.rng.permutation(np.flatnonzero(self.filled))[:half]
            yield from self._serve(slots, batch_size)
            self._fill(slots, rows)
        yield from self._serve(self.rng.permutation(np.flatnonzero(self.filled)), batch_size)
