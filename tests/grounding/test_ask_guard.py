"""``ask(..., guard=...)`` and ``gemma-ground ask --guard``: the safety guard as a pipeline step.

The guard is a real :class:`models.guard.SafetyGuard` over a tiny random Gemma 2 checkpoint
(``tests/guard_support.py``); its threshold makes it flag everything (0: every
P(violation) >= 0) or nothing (1: the test checks every score is below 1). The data source is our
statistics server on 127.0.0.1, reached through the Data Commons NL client; its request log (the
``grounding.server`` logger, one DEBUG line per request) shows whether anything was asked of it.
"""

from __future__ import annotations

import logging

import guard_support
import pytest
from guard_support import answer_only_guard, server_requests, with_threshold
from test_ask import KENYA_2007, Scripted

from grounding import Answer, ask
from grounding.sources import open_source
from models.cli import main

QUESTIONS = [KENYA_2007, "How has GDP per capita changed in Japan?", "Life expectancy of countries in Africa in 2007"]


@pytest.fixture(scope="module")
def tiny_guard():
    return guard_support.tiny_guard()


def test_a_guard_that_flags_everything_refuses_and_touches_no_data_source(tiny_guard, stats_server, caplog):
    caplog.set_level(logging.DEBUG, logger="grounding.server")
    source = open_source("nl", base_url=stats_server.url)
    strict = with_threshold(tiny_guard, 0.0)
    for question in QUESTIONS:
        for mode in ("rag", "rig"):
            llm = Scripted("What is life expectancy in Kenya?")
            answer = ask(question, mode=mode, source=source, llm=llm, guard=strict)
            assert answer.refused and answer.guard.refused == "question" and answer.guard.answer is None
            assert answer.guard.question.scores == tiny_guard.probabilities(question)
            assert answer.guard.question.flagged_policies == list(answer.guard.question.scores)
            assert answer.text.startswith(f"Refused: the safety guard ({tiny_guard.model_id}) flagged this question")
            assert (answer.tables, answer.statistics, answer.claims, answer.model) == ([], [], [], None)
            assert llm.prompts == []  # no model was asked either
    assert server_requests(caplog) == []
    # The same questions unguarded do reach the server: the empty log above means something.
    assert ask(KENYA_2007, mode="rig", source=source).statistics
    assert server_requests(caplog)


def test_a_guard_that_flags_nothing_changes_no_answer(tiny_guard):
    lenient = with_threshold(tiny_guard, 1.0)
    script = 'Kenyans lived [__DC__("life expectancy in Kenya in 2007") --> "58 years"].'
    cases = [(q, mode, None) for q in QUESTIONS for mode in ("rag", "rig")]
    cases += [(KENYA_2007, mode, script) for mode in ("rag", "rig")]  # with a model writing the text
    for question, mode, script in cases:
        plain = ask(question, mode=mode, llm=Scripted(script, script) if script else None)
        guarded = ask(question, mode=mode, llm=Scripted(script, script) if script else None, guard=lenient)
        assert guarded.model_copy(update={"guard": None}) == plain
        report = guarded.guard
        assert report.refused is None and not guarded.refused
        # Both checks ran: the question as a prompt, the answer as the response to it.
        assert report.question.mode == "prompt" and report.answer.mode == "response"
        assert report.answer.scores == tiny_guard.probabilities(question, response=plain.text)
        assert max(report.question.scores.values()) < 1 and max(report.answer.scores.values()) < 1


def test_a_flagged_answer_is_withheld(tiny_guard):
    plain = ask(KENYA_2007, mode="rag")
    guarded = ask(KENYA_2007, mode="rag", guard=answer_only_guard(tiny_guard, KENYA_2007, plain.text))
    assert guarded.guard.refused == "answer" and not guarded.guard.question.flagged and guarded.guard.answer.flagged
    assert guarded.text.startswith("Refused:") and "flagged this answer" in guarded.text
    assert (guarded.tables, guarded.statistics, guarded.citations) == ([], [], [])
    rendered = guarded.render()
    (policy,) = guarded.guard.answer.scores
    assert plain.text not in rendered and f"guard scores: {policy} " in rendered


def test_cli_ask_with_a_guard(tiny_guard, capsys):
    args = ["ask", KENYA_2007, "--mode", "rig", "--guard", str(guard_support.tiny_guard_dir())]
    assert main([*args, "--guard-threshold", "0", "--json"]) == 0
    refused = Answer.model_validate_json(capsys.readouterr().out)
    assert refused.refused and refused.guard.question.scores == tiny_guard.probabilities(KENYA_2007)
    assert refused.guard.question.model == "tiny-shieldgemma" and refused.guard.question.threshold == 0
    assert main([*args, "--guard-threshold", "1", "--guard-policy", "hate"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Life expectancy in Kenya was 54.11 years in 2007, according to Gapminder [1].")
    assert main([*args, "--guard-threshold", "0"]) == 0
    assert capsys.readouterr().out.startswith("Refused: the safety guard (tiny-shieldgemma) flagged this question for ")
