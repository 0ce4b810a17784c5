"""Generation: prefill + decode with the static KV cache; greedy and sampling; stops; streaming.

Batches of prompts of different lengths are right-padded: the whole batch is prefilled at once
(causal attention keeps padding out of every real token's view), then each row decodes at its own
position (``input_pos`` holds one position per row, and the cache keys past a row's length are masked
by per-row KV lengths). Nothing is allocated per step beyond the step's activations.

Token level: :func:`generate_ids` (and :meth:`GemmaLM.generate`). Text level: :func:`generate`
(strings in, strings or a stream of text pieces out, stop strings, the chat template).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["generate", "generate_ids", "stream_ids", "sample_next", "GenerationError", "TextStream"]


class GenerationError(ValueError):
    """Bad generation input: an empty prompt, a prompt longer than the context, bad settings."""


def sample_next(logits: torch.Tensor, *, temperature: float = 0.0, top_k: int | None = None,
                top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Next token per row from ``(batch, vocab)`` logits: greedy at temperature 0, else sampled
    after temperature, top-k and nucleus (top-p) filtering."""
    if temperature is None or temperature <= 0:
        return logits.argmax(dim=-1)
    scores = logits.float() / temperature
    if top_k is not None and 0 < top_k < scores.shape[-1]:
        kth = torch.topk(scores, top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p is not None and 0 < top_p < 1:
        sorted_scores, order = torch.sort(scores, descending=True, dim=-1)
        cumulative = torch.softmax(sorted_scores, dim=-1).cumsum(dim=-1)
        # Drop a token when the mass before it already reaches top_p (the first is always kept).
        drop_sorted = (cumulative - torch.softmax(sorted_scores, dim=-1)) >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        scores = scores.masked_fill(drop, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_settings(max_new_tokens, temperature, top_k, top_p) -> None:
    if max_new_tokens < 0:
        raise GenerationError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature is not None and temperature < 0:
        raise GenerationError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GenerationError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GenerationError(f"top_p must be in (0, 1], got {top_p}")


def _as_rows(prompts) -> list[list[int]]:
    if isinstance(prompts, torch.Tensor):
        prompts = prompts.tolist() if prompts.dim() == 2 else [prompts.tolist()]
    rows = [list(map(int, p)) for p in prompts]
    if not rows:
        raise GenerationError("no prompts given")
    for i, row in enumerate(rows):
        if not row:
            raise GenerationError(f"prompt {i} is empty (no tokens)")
    return rows


@torch.inference_mode()
def stream_ids(model, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
               top_p: float | None = None, seed: int | None = None,
               stop_token_ids: Sequence[int] | None = None, steer=None) -> Iterator[list[int | None]]:
    """Yield, step by step, the new token of each row (``None`` for rows that already stopped).

    A row stops after emitting a stop token (which is yielded) or after ``max_new_tokens``.
    ``steer``: a :class:`models.hooks.Steer` (or a list of them) applied during the whole generation.
    """
    if steer is not None:
        from .hooks import steer as steering

        with steering(model, steer):
            yield from stream_ids(model, prompts, max_new_tokens=max_new_tokens, temperature=temperature,
                                  top_k=top_k, top_p=top_p, seed=seed, stop_token_ids=stop_token_ids)
        return
    rows = _as_rows(prompts)
    _check_settings(max_new_tokens, temperature, top_k, top_p)
    if max_new_tokens == 0:
        return
    config = model.config
    lens = [len(r) for r in rows]
    batch, longest = len(rows), max(lens)
    context = config.max_position_embeddings
    if longest + max_new_tokens > context:
        raise GenerationError(f"prompt of {longest} tokens + max_new_tokens {max_new_tokens} exceeds the "
                              f"model's context of {context} tokens; shorten the prompt or ask for fewer tokens")
    stops = set(config.eos_token_ids if stop_token_ids is None else stop_token_ids)
    device = model.device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device).manual_seed(seed)

    model.setup_cache(batch, longest + max_new_tokens)
    ids = torch.full((batch, longest), config.pad_token_id, dtype=torch.long, device=device)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
    lengths = torch.tensor(lens, dtype=torch.long, device=device)
    same_length = len(set(lens)) == 1

    # Per-row lengths tell a recurrent model where each row's state ends (attention models need no more
    # than causality, and the masked padding keys change nothing for them).
    hidden = model.hidden_states(ids, input_pos=0, kv_lens=None if same_length else lengths)
    last = hidden[torch.arange(batch, device=device), lengths - 1]
    token = sample_next(model.logits(last), temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)
    done = [False] * batch
    for step in range(max_new_tokens):
        out: list[int | None] = []
        for i, t in enumerate(token.tolist()):
            if done[i]:
                out.append(None)
                continue
            out.append(t)
            if t in stops:
                done[i] = True
        yield out
        if all(done) or step == max_new_tokens - 1:
            return
        pos = longest + step if same_length else lengths + step
        if hasattr(model, "decode_step"):  # Gemma: possibly compiled (GemmaLM.compile_decode)
            logits = model.decode_step(token[:, None], pos)
        else:
            logits = model.logits(model.hidden_states(token[:, None], input_pos=pos)[:, -1])
        token = sample_next(logits, temperature=temperature, top_k=top_k, top_p=top_p, generator=generator)


def generate_ids(model, prompts, *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int | None = None,
                 top_p: float | None = None, seed: int | None = None,
                 stop_token_ids: Sequence[int] | None = None, steer=None) -> list[list[int]]:
    """Generate new token ids for each prompt (lists of ids, or a ``(batch, seq)`` tensor without
    padding). Stop tokens are included in the output; prompts are not."""
    rows = _as_rows(prompts)
    outputs: list[list[int]] = [[] for _ in rows]
    for step in stream_ids(model, rows, max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                           top_p=top_p, seed=seed, stop_token_ids=stop_token_ids, steer=steer):
        for out, t in zip(outputs, step, strict=True):
            if t is not None:
                out.append(t)
    return outputs


# -- text level ------------------------------------------------------------------------------------
def _prompt_ids(tokenizer, prompt: str, chat: bool, add_bos: bool) -> list[int]:
    if not isinstance(prompt, str):
        raise GenerationError(f"prompt must be a string, got {type(prompt).__name__}")
    if not prompt:
        raise GenerationError("prompt is empty")
    text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}]) if chat else prompt
    bos_in_text = text.startswith("<bos>")
    return tokenizer.encode(text, add_bos=add_bos and not bos_in_text)


class TextStream:
    """Turns a growing list of token ids into text pieces, honouring stop strings.

    Text is re-decoded from the start each step (correct across multi-token characters and the
    tokenizer's whitespace rules); a trailing replacement character (an incomplete UTF-8 sequence
    from byte-fallback tokens) and any tail that could begin a stop string are held back.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = (), stop_ids: Sequence[int] = ()):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.emitted = 0
        self.finished = False

    def _held_back(self, text: str) -> int:
        hold = 0
        for s in self.stop:
            for k in range(min(len(s) - 1, len(text)), 0, -1):
                if text.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        return hold

    def push(self, token: int | None) -> str:
        if self.finished or token is None:
            return ""
        if token in self.stop_ids:
            self.finished = True
            return self.flush()
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s, max(0, self.emitted - len(s))) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.finished = True
            piece, self.emitted = text[self.emitted:cut], cut
            return piece
        end = len(text) - self._held_back(text)
        if text.endswith("\ufffd"):
            end = min(end, len(text) - 1)
        piece = text[self.emitted:end] if end > self.emitted else ""
        self.emitted = max(self.emitted, end)
        return piece

    def flush(self) -> str:
        text = self.tokenizer.decode(self.ids)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=len(text))
        piece = text[self.emitted:cut] if cut > self.emitted else ""
        self.emitted = max(self.emitted, cut)
        return piece


def generate(model, tokenizer, prompt: str | Sequence[str], *, chat: bool = False, max_new_tokens: int = 64,
             temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
             seed: int | None = None, stop: Sequence[str] | None = None,
             stop_token_ids: Sequence[int] | None = None, add_bos: bool = True, stream: bool = False, steer=None):
    """Generate text.

    ``prompt``: one string (returns a string, or an iterator of text pieces with ``stream=True``) or a
    list of strings (returns a list; generated as one batch). ``chat`` wraps the prompt in the Gemma
    chat template. Generation stops at ``stop_token_ids`` (default: the tokenizer's end-of-sequence and
    end-of-turn tokens), at any of the ``stop`` strings (excluded from the output) or after
    ``max_new_tokens``. ``seed`` makes sampling reproducible. ``steer`` adds SAE feature directions
    during generation (:class:`models.hooks.Steer`, or a list of them).
    """
    stop = list(stop or [])
    if stop_token_ids is None:
        stop_token_ids = list(getattr(tokenizer, "stop_token_ids", None) or model.config.eos_token_ids)
    settings = dict(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                    stop_token_ids=stop_token_ids, steer=steer)
    if isinstance(prompt, str):
        ids = [_prompt_ids(tokenizer, prompt, chat, add_bos)]
        pieces = _stream_text(model, tokenizer, ids, stop, settings)
        return pieces if stream else "".join(pieces)
    if stream:
        raise GenerationError("stream=True takes a single prompt string")
    prompts = list(prompt)
    ids = [_prompt_ids(tokenizer, p, chat, add_bos) for p in prompts]
    streams = [TextStream(tokenizer, stop, stop_token_ids) for _ in prompts]
    texts = [""] * len(prompts)
    for step in stream_ids(model, ids, **settings):
        for i, t in enumerate(step):
            texts[i] += streams[i].push(t)
        if all(s.finished for s in streams):
            break
    return [text + s.flush() for text, s in zip(texts, streams, strict=True)]


def _stream_text(model, tokenizer, ids, stop, settings) -> Iterator[str]:
    text_stream = TextStream(tokenizer, stop, settings["stop_token_ids"])
    for step in stream_ids(model, ids, **settings):
        piece = text_stream.push(step[0])
        if piece:
            yield piece
        if text_stream.finished:
            return
    tail = text_stream.flush()
    if tail:
        yield tail
