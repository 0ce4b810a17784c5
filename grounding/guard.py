"""The safety guard as a pipeline step: screen a question before any lookup or generation, and the answer
as a model response before it is shown.

The scoring is :class:`models.guard.SafetyGuard` (ShieldGemma prompts, P(violation) per policy); this
module holds what the pipelines share: the :class:`Guard` protocol (anything with ``check``), the
:class:`GuardReport` an :class:`~grounding.answer.Answer` carries, and the refusal text.
"""

from __future__ import annotations

from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel

from models.guard import GuardResult

__all__ = ["Guard", "GuardReport", "GuardResult", "refusal_text", "screen"]


@runtime_checkable
class Guard(Protocol):
    """A safety classifier: :class:`models.guard.SafetyGuard` or anything with the same ``check``."""

    def check(self, text: str, *, response: str | None = None) -> GuardResult: ...


class GuardReport(BaseModel):
    """What the guard said about one exchange: the question (always), the answer (when one was written)."""

    question: GuardResult
    answer: GuardResult | None = None
    refused: Literal["question", "answer"] | None = None  # which check refused, None = passed


def screen(guard: Guard, question: str, answer: str | None = None) -> GuardResult:
    """The guard's verdict on ``question`` as a user prompt, or on ``answer`` as the response to it."""
    if not isinstance(guard, Guard):
        raise TypeError(f"guard must have check(text, response=...) (models.load_guard(...)), "
                        f"got {type(guard).__name__}")
    return guard.check(question) if answer is None else guard.check(question, response=answer)


def refusal_text(result: GuardResult) -> str:
    """What the user sees instead of an answer: which check refused and why (the flagged policies)."""
    what = "question" if result.mode == "prompt" else "answer"
    return (f"Refused: the safety guard ({result.model}) flagged this {what} for {result.reason()} "
            f"at threshold {result.threshold:g}.")
