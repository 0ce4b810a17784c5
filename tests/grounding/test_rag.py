"""RAG pipeline: question generation, table numbering and rendering, the answer prompt, citations."""

from __future__ import annotations

import random
import threading
import time

import pytest

from grounding.rag import (
    NO_ANSWER,
    QUESTION_PROMPT,
    RAG,
    answer_prompt,
    check_citations,
    number_tables,
    parse_questions,
    question_prompt,
    render_table,
)
from grounding.types import DataSourceError, Lookup, SourceRef, TableResult

GAPMINDER = SourceRef(name="Gapminder", url="https://www.gapminder.org/data/")


def kenya_life() -> TableResult:  # values from the gapminder data set
    return TableResult(query="", title="Life expectancy in Kenya", unit="years", source=GAPMINDER,
                       columns=["date", "Life expectancy"], rows=[["2002", 50.992], ["2007", 54.11]])


def table(title: str) -> TableResult:
    return TableResult(query="", title=title, columns=["date", "value"], rows=[["2007", 1.0]], source=GAPMINDER)


class TableSource:
    """Fixed tables by question, with random latency so that completion order varies between runs."""

    name = "tables"

    def __init__(self, tables, failing=(), jitter=0.0):
        self.tables, self.failing, self.jitter = tables, set(failing), jitter
        self.calls = []
        self.lock = threading.Lock()

    def point(self, query):
        return None

    def table(self, query):
        with self.lock:
            self.calls.append(query)
        time.sleep(random.random() * self.jitter)
        if query in self.failing:
            raise DataSourceError(f"backend down for {query!r}")
        found = self.tables.get(query)
        return found.model_copy(update={"query": query}) if found else None


class Scripted:
    """An LLM answering each prompt with the next scripted text; records prompts."""

    def __init__(self, *answers):
        self.answers, self.prompts = list(answers), []

    def generate(self, prompt, *, max_new_tokens=512, temperature=0.0, stop=None):
        self.prompts.append(prompt)
        return self.answers.pop(0)

    def stream(self, prompt, **kw):
        yield self.generate(prompt, **kw)


def test_parse_questions_one_per_line_ordered_dedupe_at_most_25():
    text = ("What is the population in Kenya?\n\n1. What is life expectancy in Kenya?\n"
            "- what is the population in  kenya\n* What is GDP per capita in Kenya?\n"
            "What is life expectancy in Kenya?\n")
    assert parse_questions(text) == ["What is the population in Kenya?", "What is life expectancy in Kenya?",
                                     "What is GDP per capita in Kenya?"]
    many = "\n".join(f"What is metric {i} in Kenya?" for i in range(40))
    assert parse_questions(many) == [f"What is metric {i} in Kenya?" for i in range(25)]
    assert parse_questions("") == [] and parse_questions("\n  \n") == []


def test_question_prompt_structure_and_override():
    prompt = question_prompt("How long do people live in Kenya?")
    assert prompt.endswith("Query: How long do people live in Kenya?\nStatistical Questions:")
    for form in ("What is $METRIC in $PLACE?", "What is $METRIC in $PLACE $PLACE_TYPE?",
                 "How has $METRIC changed over time in $PLACE $PLACE_TYPE?"):
        assert form in prompt
    assert "at most 25" in prompt and "one per line" in prompt
    llm = Scripted("q1\nq2", "answer")
    RAG(TableSource({}), llm, question_template="Q={question}\nList:").statistical_questions("x")
    assert llm.prompts == ["Q=x\nList:"]
    with pytest.raises(ValueError, match="question"):
        RAG(TableSource({}), question_template=QUESTION_PROMPT.replace("{question}", ""))


def test_render_table_golden():
    assert render_table(3, kenya_life()) == (
        "Table 3: Life expectancy in Kenya (unit: years), according to Gapminder\n"
        "| date | Life expectancy |\n"
        "| --- | --- |\n"
        "| 2002 | 50.992 |\n"
        "| 2007 | 54.11 |")


def test_numbering_is_contiguous_and_drops_empty_failed_and_repeated_tables():
    lookups = [Lookup(query="a", mode="table", result=table("A")),
               Lookup(query="b", mode="table"),  # no data
               Lookup(query="c", mode="table", error="timeout"),
               Lookup(query="d", mode="table", result=table("a ")),  # same title as A
               Lookup(query="e", mode="table", result=table("E"))]
    numbered = number_tables(lookups)
    assert [(t.number, t.question, t.table.title) for t in numbered] == [(1, "a", "A"), (2, "e", "E")]
    assert numbered[1].text.startswith("Table 2: E, according to Gapminder\n")


def test_table_numbering_is_deterministic_across_runs():
    questions = [f"What is metric {i} in Kenya?" for i in range(12)]
    tables = {q: table(f"Metric {i % 9}") for i, q in enumerate(questions) if i % 4 != 1}
    source = TableSource(tables, jitter=0.02)
    runs = []
    for workers in (8, 3, 8):
        rag = RAG(source, Scripted("\n".join(questions)), max_workers=workers)
        _, numbered, _ = rag.retrieve("Kenya?")
        runs.append([(t.number, t.question, t.table.title) for t in numbered])
    assert runs[0] == runs[1] == runs[2]
    # Question order, skipping the questions without a table (1, 5, 9) and the repeated title of 11
    # (Metric 2, as 2): 8 tables numbered 1..8.
    assert [q for _, q, _ in runs[0]] == [questions[i] for i in (0, 2, 3, 4, 6, 7, 8, 10)]
    assert [n for n, _, _ in runs[0]] == list(range(1, 9))


def test_answer_prompt_asks_for_citations_and_no_answer():
    numbered = number_tables([Lookup(query="q", mode="table", result=kenya_life())])
    prompt = answer_prompt("How long do people live in Kenya?", numbered)
    assert "[Table N]" in prompt and NO_ANSWER in prompt and "first line" in prompt
    assert numbered[0].text in prompt and prompt.rstrip().endswith("Question: How long do people live in Kenya?\nAnswer:")


def test_check_citations():
    assert check_citations("A [Table 1], B [Table 3] and [Tables 2 and 7]; [table 1, Table 9]", 3) == ([1, 2, 3], [7, 9])
    assert check_citations("no citations", 2) == ([], [])


def test_run_answers_from_tables_and_checks_citations():
    q = "What is life expectancy in Kenya?"
    source = TableSource({q: kenya_life()}, failing={"What is GDP in Kenya?"})
    llm = Scripted(f"{q}\nWhat is GDP in Kenya?\nWhat is rainfall in Kenya?",
                   "It rose from 50.99 to 54.11 years [Table 1], by 6.1% [Table 2].")
    result = RAG(source, llm).run("How long do Kenyans live?")
    assert result.questions == [q, "What is GDP in Kenya?", "What is rainfall in Kenya?"]
    assert [t.number for t in result.tables] == [1]
    assert (result.citations, result.invalid_citations) == ([1], [2])
    assert "backend down" in result.lookup_errors["What is GDP in Kenya?"]
    assert render_table(1, result.tables[0].table) in llm.prompts[1]
    assert not result.no_answer and not result.fallback


def test_no_answer_falls_back_to_the_bare_question():
    q = "What is life expectancy in Kenya?"
    llm = Scripted(q, f"{NO_ANSWER}\n", "People in Kenya live about 54 years.")
    result = RAG(TableSource({q: kenya_life()}), llm).run("How long do Kenyans live?")
    assert result.no_answer and result.fallback
    assert llm.prompts[2] == "How long do Kenyans live?"
    assert result.answer == "People in Kenya live about 54 years." and result.citations == []


def test_no_tables_falls_back_without_asking_about_tables():
    llm = Scripted("", "My own answer.")  # no statistical question applies
    result = RAG(TableSource({}), llm).run("Who wrote Hamlet?")
    assert result.questions == [] and result.tables == [] and result.fallback
    assert llm.prompts == [question_prompt("Who wrote Hamlet?"), "Who wrote Hamlet?"]


def test_table_lookups_run_concurrently():
    class Slow(TableSource):
        def table(self, query):
            time.sleep(0.3)
            return super().table(query)

    questions = [f"What is metric {i} in Kenya?" for i in range(4)]
    rag = RAG(Slow({q: table(q) for q in questions}), Scripted("\n".join(questions)), max_workers=4)
    start = time.monotonic()
    _, numbered, _ = rag.retrieve("Kenya?")
    assert time.monotonic() - start < 0.3 * 4 * 0.6 and len(numbered) == 4
