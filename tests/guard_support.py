"""A tiny random safety guard for the tests: ``examples/sample_data.write_tiny_shieldgemma`` (a Gemma 2
checkpoint with "Yes"/"No" tokens) loaded once per process by :func:`models.load_guard`. Its scores are
noise; :func:`with_threshold` 0 flags everything, 1 flags nothing (tests check the scores stay below 1)."""

from __future__ import annotations

import functools
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

import sample_data  # noqa: E402


@functools.cache
def tiny_guard_dir() -> Path:
    return sample_data.write_tiny_shieldgemma(Path(tempfile.mkdtemp(prefix="guard-")) / "tiny-shieldgemma")


@functools.cache
def tiny_guard():
    from models.guard import load_guard

    return load_guard(tiny_guard_dir())


def with_threshold(guard, threshold: float, policies=None):
    """Another guard over the same model and tokenizer, flagging at ``threshold``."""
    from models.guard import SafetyGuard

    return SafetyGuard(guard.model, guard.tokenizer, threshold=threshold, policies=policies, model_id=guard.model_id)


def answer_only_guard(guard, question: str, response: str):
    """A one-policy guard that passes ``question`` but flags ``response`` to it: the policy where the
    response scores most above the question, the threshold halfway between the two scores."""
    asked, answered = guard.probabilities(question), guard.probabilities(question, response=response)
    policy = max(asked, key=lambda name: answered[name] - asked[name])
    assert answered[policy] - asked[policy] > 0.01, "no policy scores the response above the question"
    return with_threshold(guard, (asked[policy] + answered[policy]) / 2, policies=[policy])


def server_requests(caplog) -> list[str]:
    """The requests our statistics server logged (``grounding.server`` at DEBUG: "GET /path -> 200")."""
    return [r.getMessage() for r in caplog.records
            if r.name == "grounding.server" and r.getMessage().split()[0] in ("GET", "POST")]
