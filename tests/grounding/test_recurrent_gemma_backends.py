"""RecurrentGemma behind the grounding pipelines, as a user loads it (a checkpoint directory; the
``tiny_recurrent_gemma`` fixture of tests/conftest.py): the native backend (generate, stream, the
interleaved-RIG continuation), RIG and RAG on the shipped statistics store, and LangChain's ChatGemma,
each against greedy decoding by its definition (full forward, argmax, no state)."""

from __future__ import annotations

import pytest
from test_llm import greedy_reference

from grounding.langchain import ChatGemma
from grounding.llm import NativeGemma
from grounding.rag import RAG, answer_prompt, parse_questions, question_prompt
from grounding.rig import RIG
from grounding.sources import open_source
from models import RecurrentGemmaLM

QUESTION = "what is the life expectancy in kenya?"


@pytest.fixture(scope="module")
def native(tiny_recurrent_gemma):
    llm = NativeGemma.load(str(tiny_recurrent_gemma), chat=False)
    assert isinstance(llm.model, RecurrentGemmaLM)
    return llm


def test_native_backend_generates_greedily(native):
    expected = greedy_reference(native.model, native.tokenizer, QUESTION, 12)
    assert len(set(expected)) > 3
    assert native.generate(QUESTION, max_new_tokens=12) == expected
    assert "".join(native.stream(QUESTION, max_new_tokens=12)) == expected
    begun = 'the [__DC__("life expectancy in kenya") --> "54"] and'
    assert native.continue_from(QUESTION, begun, max_new_tokens=6) == \
        greedy_reference(native.model, native.tokenizer, QUESTION + begun, 6)


def test_rig_and_rag_run_on_it(native):
    source = open_source("local")
    rig = RIG(source, native, max_new_tokens=12).run(QUESTION)
    assert rig.raw_text == greedy_reference(native.model, native.tokenizer, QUESTION, 12)
    interleaved = RIG(source, native, max_new_tokens=12).run(QUESTION, interleaved=True)
    assert interleaved.raw_text == rig.raw_text  # a random model writes no annotation to pause at
    rag = RAG(source, native, max_new_tokens=12).run(QUESTION)
    written = greedy_reference(native.model, native.tokenizer, question_prompt(QUESTION), 12)
    assert rag.questions == parse_questions(written) and rag.questions
    if rag.fallback:  # no table (or the model declined): the bare question is answered, as in the paper
        assert rag.answer == greedy_reference(native.model, native.tokenizer, QUESTION, 12).strip()
    else:
        prompt = answer_prompt(QUESTION, rag.tables)
        assert rag.answer == greedy_reference(native.model, native.tokenizer, prompt, 12).strip()


def test_chat_gemma_on_a_recurrent_checkpoint(tiny_recurrent_gemma, native):
    chat = ChatGemma(checkpoint=str(tiny_recurrent_gemma), max_tokens=10)
    prompt = native.tokenizer.apply_chat_template([{"role": "user", "content": "hello"}])
    expected = greedy_reference(native.model, native.tokenizer, prompt, 10)
    result = chat.invoke("hello")
    assert result.content == expected and len(result.content) > 0
    assert "".join(c.content for c in chat.stream("hello")) == expected
