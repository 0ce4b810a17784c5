"""The safety guard as LangChain Runnables: ``safety_guard`` (pass through / raise / return a refusal) and
``guarded`` (a retriever, chat model or chain behind the guard, its output screened as a response).

The guard is a real SafetyGuard over a tiny random Gemma 2 (scores are noise; thresholds 0 and 1 make it
flag everything / nothing, and a threshold between two scores separates them). Which text was screened is
checked through the scores: a refusal's scores equal the guard's scores of the expected text.
"""

from __future__ import annotations

import logging

import guard_support
import pytest
from guard_support import answer_only_guard, server_requests, with_threshold
from langchain_core.documents import Document
from langchain_core.language_models.fake_chat_models import FakeListChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate

from grounding.answer import Answer
from grounding.langchain import GuardRefusal, Refusal, StatisticsRetriever, guarded, rag_chain, safety_guard
from grounding.sources import open_source

QUESTION = "What was the life expectancy in Kenya in 2007?"
REPLY = "It was 54 years, according to Gapminder."


@pytest.fixture(scope="module")
def tiny_guard():
    return guard_support.tiny_guard()


def test_safety_guard_passes_input_through_or_refuses_the_screened_text(tiny_guard):
    prompt = ChatPromptTemplate.from_messages([("system", "Be brief."), ("human", "{question}")])
    inputs = [QUESTION, {"question": QUESTION, "tables": "..."},
              [SystemMessage("Be brief."), HumanMessage(QUESTION), AIMessage("Hm?")],
              prompt.invoke({"question": QUESTION})]
    lenient, strict = with_threshold(tiny_guard, 1.0), with_threshold(tiny_guard, 0.0)
    expected = tiny_guard.probabilities(QUESTION)
    for value in inputs:
        assert safety_guard(lenient).invoke(value) is value
        with pytest.raises(GuardRefusal) as raised:
            safety_guard(strict).invoke(value)
        assert raised.value.refusal.result.scores == expected  # the human question was screened
        returned = safety_guard(strict, on_flag="return").invoke(value)
        assert isinstance(returned, Refusal) and returned.text == str(raised.value)
        assert returned.text.startswith("Refused: the safety guard")
    with pytest.raises(ValueError, match=r"input\['question'\].*\['query'\]"):
        safety_guard(lenient).invoke({"query": QUESTION})
    with pytest.raises(ValueError, match="on_flag"):
        safety_guard(lenient, on_flag="ignore")


def test_in_front_of_a_retriever_a_refused_question_makes_no_request(tiny_guard, stats_server, caplog):
    caplog.set_level(logging.DEBUG, logger="grounding.server")
    retriever = StatisticsRetriever(source=open_source("nl", base_url=stats_server.url), k=2)
    with pytest.raises(GuardRefusal):
        (safety_guard(with_threshold(tiny_guard, 0.0)) | retriever).invoke(QUESTION)
    refused = guarded(retriever, with_threshold(tiny_guard, 0.0)).invoke(QUESTION)
    assert isinstance(refused, Refusal) and refused.result.mode == "prompt"
    assert server_requests(caplog) == []
    documents = (safety_guard(with_threshold(tiny_guard, 1.0)) | retriever).invoke(QUESTION)
    assert server_requests(caplog)  # the retriever did ask the server once the guard let the question through
    assert documents == retriever.invoke(QUESTION) and "Life expectancy in Kenya" in documents[0].page_content
    behind = guarded(retriever, with_threshold(tiny_guard, 1.0)).invoke(QUESTION)
    assert all(isinstance(d, Document) for d in behind) and behind == documents


def test_guarded_chat_model_screens_the_question_and_the_reply(tiny_guard):
    model = FakeListChatModel(responses=[REPLY] * 3)
    refused = guarded(model, with_threshold(tiny_guard, 0.0)).invoke(QUESTION)
    assert isinstance(refused, Refusal) and refused.result.mode == "prompt" and model.i == 0  # the model never ran
    answer_only = answer_only_guard(tiny_guard, QUESTION, REPLY)
    withheld = guarded(model, answer_only).invoke([HumanMessage(QUESTION)])
    assert isinstance(withheld, Refusal) and withheld.result.mode == "response" and model.i == 1
    (policy,) = withheld.result.scores
    # the same one-policy scoring (one row: a full forward; several policies share a cached prefix,
    # which agrees to ~1e-7, not to the bit)
    assert withheld.result.scores[policy] == tiny_guard.probabilities(QUESTION, response=REPLY, policies=[policy])[policy]
    assert "flagged this answer" in withheld.text
    passed = guarded(model, with_threshold(tiny_guard, 1.0)).invoke(QUESTION)
    assert isinstance(passed, AIMessage) and passed.content == REPLY
    with pytest.raises(GuardRefusal):
        guarded(model, answer_only, on_flag="raise").invoke(QUESTION)


def test_guarded_chain_screens_a_grounded_answer(tiny_guard):
    chain = rag_chain(open_source("local"))
    plain = chain.invoke(QUESTION)
    answer = guarded(chain, with_threshold(tiny_guard, 1.0)).invoke({"question": QUESTION})
    assert isinstance(answer, Answer) and answer == plain
    threshold = max(tiny_guard.probabilities(QUESTION, response=plain.text).values())
    refused = guarded(chain, with_threshold(tiny_guard, threshold)).invoke(QUESTION)
    assert isinstance(refused, Refusal)  # the question or the answer (scored exactly at the threshold)
