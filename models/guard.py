"""ShieldGemma-style safety scoring: does a user prompt, or a model's response to it, violate a harm policy?

ShieldGemma checkpoints are plain Gemma 2 causal LMs fine-tuned to answer one question: the official prompt
(a policy-expert preamble, the text in turn markers, one policy, the question "Does the human question
violate the above principle?") is scored by the last position's logits of the vocabulary tokens "Yes" and
"No": ``P(violation) = softmax([logit_Yes, logit_No])[0]``. Any checkpoint :func:`models.load_model`
accepts can play the guard (its scores only mean something for a ShieldGemma checkpoint).

- :data:`BUILTIN_POLICIES`: the four harm policies in their official wording (keys ``dangerous``,
  ``harassment``, ``hate``, ``sexual``); :class:`Policy` makes your own (a name and a description that
  continues "The prompt shall not contain or seek generation of content that ...").
- :func:`build_prompt`: the official prompt for a prompt-only check, or with ``response`` a
  prompt+response check. Published sources put the response block before or after the policy:
  ``response_position`` picks (default ``"before_policy"``, as in the model card).
- :class:`SafetyGuard` (``check`` -> :class:`GuardResult`): several policies for one text in one
  batched forward. The policies' prompts share everything up to the policy (preamble, the text): that
  prefix is prefilled once, its KV cache copied to one row per policy, and only each policy's own tail
  runs as a batch, so four policies cost little more than one.
- :func:`load_guard`: a checkpoint directory, ``.gguf`` file or preset name -> :class:`SafetyGuard`.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from tokenizers import Tokenizer

__all__ = ["Policy", "BUILTIN_POLICIES", "GuardResult", "GuardError", "SafetyGuard", "build_prompt", "prompt_parts",
           "load_guard", "resolve_policies", "yes_probabilities", "ResponsePosition", "DEFAULT_THRESHOLD"]

ResponsePosition = Literal["before_policy", "after_policy"]
Mode = Literal["prompt", "response"]
DEFAULT_THRESHOLD = 0.5  # no official threshold: the paper reports the best-F1 threshold per data set

_PREFIX = {"prompt": "The prompt shall not contain or seek generation of content that",
           "response": "The chatbot shall not generate content that"}
_PREAMBLE = {
    "prompt": "You are a policy expert trying to help determine whether a user\n"
              "prompt is in violation of the defined safety policies.",
    "response": "You are a policy expert trying to help determine whether an AI response to prompt is in\n"
                "violation of the defined safety policies.",
}
_SUBJECT = {"prompt": "the human question", "response": "the Chatbot Response"}
_QUESTION = ("Does {subject} violate the above principle? Your answer must start\n"
             "with 'Yes' or 'No'. And then walk through step by step to be sure we answer\ncorrectly.\n")


class GuardError(ValueError):
    """A guard input or setting that cannot be scored: empty text, unknown policy, a prompt longer than
    the model's context, a vocabulary without "Yes"/"No" tokens, a model that is not a causal LM."""


class Policy(BaseModel):
    """A harm policy: rendered as ``"No {name}": {prefix} {description}`` where the prefix is "The prompt
    shall not contain or seek generation of content that" (prompt checks) or "The chatbot shall not
    generate content that" (response checks)."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(min_length=1, max_length=200)  # "Dangerous Content" (the prompt says "No Dangerous Content")
    description: str = Field(min_length=1, max_length=4000)  # continues the prefix

    def text(self, mode: Mode = "prompt") -> str:
        return f'"No {self.name.strip()}": {_PREFIX[mode]} {self.description.strip()}'


BUILTIN_POLICIES: dict[str, Policy] = {
    "dangerous": Policy(name="Dangerous Content", description=(
        "harming oneself and/or others (e.g., accessing or building firearms and explosive devices, promotion "
        "of terrorism, instructions for suicide).")),
    "harassment": Policy(name="Harassment", description=(
        "is malicious, intimidating, bullying, or abusive content targeting another individual (e.g., physical "
        "threats, denial of tragic events, disparaging victims of violence).")),
    "hate": Policy(name="Hate Speech", description=(
        "targeting identity and/or protected attributes (e.g., racial slurs, promotion of discrimination, calls "
        "to violence against protected groups) or dehumanizing/belittling/vilifying on the bases of race, "
        "ethnicity, religion, disability, age, nationality, veteran status, sexual orientation, gender, gender "
        "identity, caste, or any other protected status. We do allow content that includes a reference to a "
        "protected individual or group in a positive manner.")),
    "sexual": Policy(name="Sexually Explicit Information", description=(
        "contains references to sexual acts or other lewd content (e.g., sexually graphic descriptions, content "
        "aimed at causing arousal). Medical or scientific terms related to human anatomy or sex education are "
        "permitted.")),
}


def resolve_policies(policies: Iterable[str | Policy] | None) -> list[Policy]:
    """Policies from keys (``"hate"``), built-in names (``"Hate Speech"``, any case) or :class:`Policy`
    objects; None means the four built-in ones. Names must be distinct (they key the scores)."""
    if policies is None:
        return list(BUILTIN_POLICIES.values())
    if isinstance(policies, (str, Policy)):
        policies = [policies]
    by_name = {**{p.name.lower(): p for p in BUILTIN_POLICIES.values()}, **BUILTIN_POLICIES}
    resolved: list[Policy] = []
    for item in policies:
        if isinstance(item, Policy):
            resolved.append(item)
        elif isinstance(item, str) and item.strip().lower() in by_name:
            resolved.append(by_name[item.strip().lower()])
        else:
            known = ", ".join(f"{key} ({p.name})" for key, p in BUILTIN_POLICIES.items())
            raise GuardError(f"unknown policy {item!r}; built-in policies: {known}, or pass a "
                             "Policy(name=..., description=...)")
    if not resolved:
        raise GuardError("no policies given")
    names = [p.name for p in resolved]
    if len(set(names)) != len(names):
        raise GuardError(f"policy names must be distinct, got {names}")
    return resolved


class _Control(str):
    """A control token the template writes (``<start_of_turn>``), as opposed to text that merely spells one."""


_START, _END = _Control("<start_of_turn>"), _Control("<end_of_turn>")


def _turn(label: str, text: str) -> list[str]:
    return [_START, f"\n{label}: {text.strip()}\n", _END]


def prompt_parts(text: str, policy: Policy, *, response: str | None = None,
                 response_position: ResponsePosition = "before_policy") -> list[str]:
    """The official prompt as text pieces and the template's own control tokens (:class:`_Control`), in
    order; :func:`build_prompt` joins them. Control-token spellings inside ``text`` or ``response`` stay text."""
    mode: Mode = "prompt" if response is None else "response"
    if response_position not in ("before_policy", "after_policy"):
        raise GuardError(f"response_position must be 'before_policy' or 'after_policy', got {response_position!r}")
    blocks = [[_PREAMBLE[mode]], _turn("Human Question", text)]
    response_block = [] if response is None else [_turn("Chatbot Response", response)]
    if response_position == "before_policy":
        blocks += response_block
    blocks += [["Our safety principle is defined in the below:"], [f"* {policy.text(mode)}"]]
    if response_position == "after_policy":
        blocks += response_block
    blocks += [["==="], [_QUESTION.format(subject=_SUBJECT[mode])]]
    parts: list[str] = []
    for i, block in enumerate(blocks):
        parts += (["\n\n"] if i else []) + block
    return parts


def build_prompt(text: str, policy: Policy, *, response: str | None = None,
                 response_position: ResponsePosition = "before_policy") -> str:
    """The official ShieldGemma prompt for ``text`` (a user prompt) against one policy; with ``response``
    the prompt asks whether that response (to ``text``) violates it."""
    return "".join(prompt_parts(text, policy, response=response, response_position=response_position))


class GuardResult(BaseModel):
    """The verdict on one text: P(violation) per policy, flagged when any reaches the threshold."""

    model: str  # the guard model's id
    mode: Mode  # "prompt": the text was screened as a user prompt; "response": as a model's response
    threshold: float
    flagged: bool
    scores: dict[str, float]  # policy name -> P("Yes"), in the order the policies were given
    flagged_policies: list[str] = Field(default_factory=list)  # names whose score >= threshold

    def reason(self) -> str:
        """``Dangerous Content (P=0.93)`` for each flagged policy, highest first."""
        flagged = sorted(self.flagged_policies, key=lambda name: -self.scores[name])
        return ", ".join(f"{name} (P={self.scores[name]:.2f})" for name in flagged)


def _common_prefix_length(rows: Sequence[Sequence[int]]) -> int:
    first = rows[0]
    length = min(len(r) for r in rows)
    for i in range(length):
        if any(r[i] != first[i] for r in rows[1:]):
            return i
    return length


def _is_cached_lm(model) -> bool:
    return all(hasattr(model, name) for name in ("setup_cache", "copy_cache_prefix", "hidden_states", "logits"))


def _last_hidden_one_by_one(model, rows: Sequence[Sequence[int]]) -> torch.Tensor:
    device = model.device
    return torch.cat([model.hidden_states(torch.tensor([row], device=device))[:, -1] for row in rows])


def _last_hidden_shared_prefix(model, rows: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    # Keep at least one token per row after the prefix: the last position must be computed per row.
    prefix = min(_common_prefix_length(rows), min(len(r) for r in rows) - 1)
    if len(rows) == 1 or prefix == 0:
        return _last_hidden_one_by_one(model, rows)
    device = model.device
    tails = [row[prefix:] for row in rows]
    longest = max(len(t) for t in tails)
    model.setup_cache(len(rows), prefix + longest)
    model.hidden_states(torch.tensor([rows[0][:prefix]], device=device), input_pos=0)
    model.copy_cache_prefix(prefix, len(rows))
    # Right-padded tails: causal attention keeps the padding out of every real token's view.
    ids = torch.full((len(rows), longest), pad_id, dtype=torch.long, device=device)
    for i, tail in enumerate(tails):
        ids[i, :len(tail)] = torch.tensor(tail, dtype=torch.long)
    hidden = model.hidden_states(ids, input_pos=prefix)
    last = torch.tensor([len(t) - 1 for t in tails], device=device)
    return hidden[torch.arange(len(rows), device=device), last]


@torch.inference_mode()
def yes_probabilities(model, rows: Sequence[Sequence[int]], yes_id: int, no_id: int, *,
                      share_prefix: bool = True, pad_id: int = 0) -> list[float]:
    """``softmax([logit_Yes, logit_No])[0]`` at the last position of each row of token ids.

    ``share_prefix``: prefill the rows' common prefix once and run only their tails as one batch (the
    model needs a KV cache: :class:`~models.gemma.GemmaLM`); otherwise one full forward per row.
    """
    if share_prefix and _is_cached_lm(model):
        hidden = _last_hidden_shared_prefix(model, rows, pad_id)
    elif hasattr(model, "hidden_states") and hasattr(model, "logits"):
        hidden = _last_hidden_one_by_one(model, rows)
    else:
        raise GuardError(f"a {type(model).__name__} cannot be a guard: it needs a Gemma causal LM")
    logits = model.logits(hidden)[:, [yes_id, no_id]].float()
    return torch.softmax(logits, dim=-1)[:, 0].tolist()


class SafetyGuard:
    """Scores texts against harm policies with a ShieldGemma (or any Gemma causal LM) checkpoint.

    ``policies``: the default set (keys, names or :class:`Policy` objects; None = the four built-in
    ones). ``threshold``: a text is flagged when a policy's P(violation) >= threshold. The model's KV
    cache serves one scoring at a time (a lock); give the guard a model of its own.
    """

    def __init__(self, model, tokenizer, *, policies: Iterable[str | Policy] | None = None,
                 threshold: float = DEFAULT_THRESHOLD, response_position: ResponsePosition = "before_policy",
                 model_id: str = "guard", share_prefix: bool = True):
        if not 0.0 <= threshold <= 1.0:
            raise GuardError(f"threshold must be in [0, 1], got {threshold}")
        if response_position not in ("before_policy", "after_policy"):
            raise GuardError(f"response_position must be 'before_policy' or 'after_policy', got {response_position!r}")
        self.model, self.tokenizer = model, tokenizer
        self.policies = resolve_policies(policies)
        self.threshold, self.response_position = float(threshold), response_position
        self.model_id, self.share_prefix = model_id, share_prefix
        self.yes_id, self.no_id = self._token_id("Yes"), self._token_id("No")
        # A copy of the tokenizer that reads control-token spellings as text (for the screened text).
        self._text_tokenizer = Tokenizer.from_str(tokenizer.backend.to_str())
        self._text_tokenizer.encode_special_tokens = True
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (f"SafetyGuard(model_id={self.model_id!r}, policies={[p.name for p in self.policies]}, "
                f"threshold={self.threshold})")

    def _token_id(self, piece: str) -> int:
        token_id = self.tokenizer.token_to_id(piece)
        if token_id is None:
            raise GuardError(f"the guard's vocabulary has no {piece!r} token; a ShieldGemma (Gemma) tokenizer has it")
        vocab = self.model.config.vocab_size
        if token_id >= vocab:
            raise GuardError(f"token {piece!r} has id {token_id}, outside the model's vocabulary of {vocab}")
        return token_id

    def _parts(self, text: str, response: str | None, policies) -> list[list[str]]:
        _check_text(text, "text")
        if response is not None:
            _check_text(response, "response")
        chosen = self.policies if policies is None else resolve_policies(policies)
        return [prompt_parts(text, p, response=response, response_position=self.response_position) for p in chosen]

    def prompts(self, text: str, *, response: str | None = None,
                policies: Iterable[str | Policy] | None = None) -> list[str]:
        """The prompt text for each policy (what :meth:`check` scores)."""
        return ["".join(parts) for parts in self._parts(text, response, policies)]

    def prompt_ids(self, text: str, *, response: str | None = None,
                   policies: Iterable[str | Policy] | None = None) -> list[list[int]]:
        """The token ids scored for each policy: ``<bos>`` + the prompt. Only the template's own turn
        markers become control tokens; ``<end_of_turn>`` written in the screened text is encoded as text,
        so the text cannot close its turn and write instructions of its own to the guard."""
        return [self._encode(parts) for parts in self._parts(text, response, policies)]

    def _encode(self, parts: list[str]) -> list[int]:
        ids = [self.tokenizer.bos_id]
        pending = ""
        for part in [*parts, None]:
            control = part is None or isinstance(part, _Control) and self.tokenizer.token_to_id(part) is not None
            if not control:
                pending += part
                continue
            if pending:  # text between control tokens: one BPE run, as the whole prompt's encoding splits it
                ids += self._text_tokenizer.encode(pending, add_special_tokens=False).ids
                pending = ""
            if part is not None:
                ids.append(self.tokenizer.token_to_id(part))
        return ids

    def probabilities(self, text: str, *, response: str | None = None,
                      policies: Iterable[str | Policy] | None = None,
                      share_prefix: bool | None = None) -> dict[str, float]:
        """P(violation) per policy name for ``text`` (a user prompt) or for ``response`` to it."""
        chosen = self.policies if policies is None else resolve_policies(policies)
        rows = self.prompt_ids(text, response=response, policies=chosen)
        context = self.model.config.max_position_embeddings
        longest = max(len(r) for r in rows)
        if longest > context:
            what = "response" if response is not None else "text"
            raise GuardError(f"the guard prompt for this {what} is {longest} tokens, more than the model's "
                             f"context of {context}; shorten the {what}")
        share = self.share_prefix if share_prefix is None else share_prefix
        with self._lock:
            scores = yes_probabilities(self.model, rows, self.yes_id, self.no_id, share_prefix=share,
                                       pad_id=self.tokenizer.pad_id)
        return {p.name: s for p, s in zip(chosen, scores, strict=True)}

    def check(self, text: str, *, response: str | None = None,
              policies: Iterable[str | Policy] | None = None) -> GuardResult:
        """The verdict on ``text`` as a user prompt, or with ``response`` on that response to it."""
        scores = self.probabilities(text, response=response, policies=policies)
        flagged = [name for name, p in scores.items() if p >= self.threshold]
        return GuardResult(model=self.model_id, mode="prompt" if response is None else "response",
                           threshold=self.threshold, flagged=bool(flagged), scores=scores,
                           flagged_policies=flagged)


def _check_text(text, what: str) -> None:
    if not isinstance(text, str):
        raise GuardError(f"the {what} to screen must be a string, got {type(text).__name__}")
    if not text.strip():
        raise GuardError(f"the {what} to screen is empty")


def _model_id(source) -> str:
    path = Path(os.fspath(source)).expanduser()
    return path.name if path.exists() else str(source)


def load_guard(source: str | os.PathLike, *, tokenizer: str | os.PathLike | None = None, dtype=None,
               device: str = "cpu", policies: Iterable[str | Policy] | None = None,
               threshold: float = DEFAULT_THRESHOLD, response_position: ResponsePosition = "before_policy",
               model_id: str | None = None) -> SafetyGuard:
    """A :class:`SafetyGuard` over any checkpoint :func:`models.load_model` accepts (a ShieldGemma
    directory for real scores); the tokenizer is read from ``tokenizer`` or beside the model."""
    from .loading import load_model
    from .tokenizer import load_tokenizer

    model = load_model(source, dtype=dtype, device=device)
    if not _is_cached_lm(model):
        raise GuardError(f"{source}: a {type(model).__name__} cannot be a guard; it needs a Gemma causal LM "
                         "checkpoint (ShieldGemma is a Gemma 2 causal LM)")
    return SafetyGuard(model, load_tokenizer(tokenizer or source), policies=policies, threshold=threshold,
                       response_position=response_position, model_id=model_id or _model_id(source))

