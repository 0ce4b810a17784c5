"""RAG (retrieval augmented generation): fetch statistics tables first, then answer from them.

The DataGemma flow: the fine-tuned RAG model turns the user's question into at most 25 statistical
questions (one per line); each is fetched as a table; the tables are numbered and rendered as text;
an answering model answers from them, citing ``[Table N]``, or starts with ``[NO ANSWER]`` when they
cannot answer, and then the bare question is answered without tables.

Unlike the reference client, questions are de-duplicated in order (so table numbering is the same on
every run), empty lookups take no number (numbering is contiguous), one failed lookup does not drop
the others, and the citations of the answer are checked against the tables that exist.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pydantic import BaseModel, Field

from .types import LLM, Lookup, StatSource, TableResult

__all__ = [
    "QUESTION_PROMPT", "ANSWER_PROMPT", "MAX_QUESTIONS", "NO_ANSWER", "parse_questions", "question_prompt",
    "NumberedTable", "number_tables", "render_table", "answer_prompt", "check_citations", "RAGResult", "RAG",
]

MAX_QUESTIONS = 25
NO_ANSWER = "[NO ANSWER]"

# The structure documented on the DataGemma RAG model card: role, the three allowed question forms,
# one per line without numbering, at most 25, empty when nothing applies, then Query / Statistical
# Questions. Override with RAG(question_template=...); it must contain {question}.
QUESTION_PROMPT = """\
Your role is that of a Question Generator. Given a Query about statistical data, you write
Statistical Questions that, when answered from a statistics database, provide the data needed
to answer the Query.

A Statistical Question takes one of these three forms only:
1. What is $METRIC in $PLACE?
2. What is $METRIC in $PLACE $PLACE_TYPE?
3. How has $METRIC changed over time in $PLACE $PLACE_TYPE?

where $METRIC is a metric about societal subjects (population, health, economy, education,
environment, ...), $PLACE is the name of a place (a country, a state, a city ...), and $PLACE_TYPE
is an immediate child type within $PLACE (countries, states, counties, cities ...).

Write at most 25 Statistical Questions, one per line, without numbering or bullets. If no
Statistical Question applies to the Query, write nothing.

Query: {question}
Statistical Questions:"""

ANSWER_PROMPT = """\
Answer the question below using the statistics in the tables that follow.

- Cite every table you use as [Table N], where N is the table's number.
- When the question needs it, do simple arithmetic on the values (differences, ratios, growth rates)
  and show it.
- If the tables do not contain what is needed to answer, write {no_answer} as the first line and
  nothing else.

{tables}

Question: {question}
Answer:"""


def question_prompt(question: str, template: str = QUESTION_PROMPT) -> str:
    return template.format(question=question)


_LIST_PREFIX = re.compile(r"^\s*(?:[-*•]+|\d+[.)]|\(\d+\))\s*")


def parse_questions(text: str, limit: int = MAX_QUESTIONS) -> list[str]:
    """One question per line: list markers stripped, empty lines dropped, duplicates (ignoring case and
    spacing) removed keeping the first, at most ``limit``, in the model's order."""
    seen: set[str] = set()
    questions: list[str] = []
    for line in text.splitlines():
        question = _LIST_PREFIX.sub("", line).strip()
        key = " ".join(question.lower().split()).rstrip("?")
        if not question or key in seen:
            continue
        seen.add(key)
        questions.append(question)
        if len(questions) == limit:
            break
    return questions


class NumberedTable(BaseModel):
    number: int  # N in "Table N", contiguous from 1
    question: str  # the statistical question that fetched it
    table: TableResult
    text: str  # the rendered table


def _cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        from .rig import format_number

        return format_number(value)
    return str(value).replace("|", "/").replace("\n", " ")


def render_table(number: int, table: TableResult) -> str:
    """``Table N: <title> (unit: <unit>), according to <source>`` then a pipe table."""
    heading = f"Table {number}: {table.title}"
    if table.unit:
        heading += f" (unit: {table.unit})"
    if table.source is not None:
        heading += f", according to {table.source.name}"
    lines = [heading, "| " + " | ".join(_cell(c) for c in table.columns) + " |",
             "| " + " | ".join("---" for _ in table.columns) + " |"]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in table.rows]
    return "\n".join(lines)


def number_tables(lookups: Sequence[Lookup]) -> list[NumberedTable]:
    """Number the tables found, in question order; lookups without a table and repeated titles get none."""
    tables: list[NumberedTable] = []
    titles: set[str] = set()
    for lookup in lookups:
        table = lookup.result
        if not isinstance(table, TableResult):
            continue
        key = " ".join(table.title.lower().split())
        if key in titles:
            continue
        titles.add(key)
        n = len(tables) + 1
        tables.append(NumberedTable(number=n, question=lookup.query, table=table, text=render_table(n, table)))
    return tables


def answer_prompt(question: str, tables: Sequence[NumberedTable], template: str = ANSWER_PROMPT) -> str:
    return template.format(question=question, tables="\n\n".join(t.text for t in tables), no_answer=NO_ANSWER)


_CITATION = re.compile(r"\[\s*Tables?\s+([^\]]*)\]", re.I)


def check_citations(answer: str, table_count: int) -> tuple[list[int], list[int]]:
    """(cited tables that exist, cited numbers with no such table), each sorted, without repeats.

    Accepts ``[Table 2]``, ``[Table 1, Table 3]``, ``[Tables 1 and 2]``.
    """
    cited = {int(n) for group in _CITATION.findall(answer) for n in re.findall(r"\d+", group)}
    return sorted(n for n in cited if 1 <= n <= table_count), sorted(n for n in cited if not 1 <= n <= table_count)


class RAGResult(BaseModel):
    question: str
    questions: list[str]  # the statistical questions that were looked up
    tables: list[NumberedTable]
    answer: str
    no_answer: bool = False  # the model said the tables cannot answer (or there were none)
    fallback: bool = False  # the answer comes from the bare question, without tables
    citations: list[int] = Field(default_factory=list)
    invalid_citations: list[int] = Field(default_factory=list)
    lookup_errors: dict[str, str] = Field(default_factory=dict)


def fetch_tables(source: StatSource, questions: Sequence[str], max_workers: int = 8) -> list[Lookup]:
    from .sources import lookup_many

    return lookup_many(source, list(questions), mode="table", max_workers=max_workers)


class RAG:
    """Retrieve tables for a question and answer from them.

    ``question_llm`` writes the statistical questions (the DataGemma RAG model); without one the
    question itself is the only lookup. ``answer_llm`` answers from the tables (defaults to
    ``question_llm``).
    """

    def __init__(self, source: StatSource, question_llm: LLM | None = None, answer_llm: LLM | None = None, *,
                 question_template: str = QUESTION_PROMPT, answer_template: str = ANSWER_PROMPT,
                 max_questions: int = MAX_QUESTIONS, max_workers: int = 8, max_new_tokens: int = 512):
        if "{question}" not in question_template:
            raise ValueError("question_template must contain '{question}' where the user's question goes")
        self.source = source
        self.question_llm, self.answer_llm = question_llm, answer_llm or question_llm
        self.question_template, self.answer_template = question_template, answer_template
        self.max_questions, self.max_workers, self.max_new_tokens = max_questions, max_workers, max_new_tokens

    def statistical_questions(self, question: str) -> list[str]:
        if self.question_llm is None:
            return [question]
        text = self.question_llm.generate(question_prompt(question, self.question_template),
                                          max_new_tokens=self.max_new_tokens)
        return parse_questions(text, self.max_questions)

    def retrieve(self, question: str) -> tuple[list[str], list[NumberedTable], dict[str, str]]:
        questions = self.statistical_questions(question)
        lookups = fetch_tables(self.source, questions, self.max_workers) if questions else []
        errors = {lk.query: lk.error for lk in lookups if lk.error is not None}
        return questions, number_tables(lookups), errors

    def run(self, question: str) -> RAGResult:
        if self.answer_llm is None:
            raise ValueError("RAG.run needs an answer_llm; use RAG.retrieve (or grounding.ask) without a model")
        questions, tables, errors = self.retrieve(question)
        result = RAGResult(question=question, questions=questions, tables=tables, answer="", lookup_errors=errors)
        if tables:
            answer = self.answer_llm.generate(answer_prompt(question, tables, self.answer_template),
                                              max_new_tokens=self.max_new_tokens).strip()
            result.no_answer = answer.startswith(NO_ANSWER)
        else:
            answer, result.no_answer = "", True
        if result.no_answer:  # as in the paper: answer the bare question, without tables
            answer = self.answer_llm.generate(question, max_new_tokens=self.max_new_tokens).strip()
            result.fallback = True
        result.answer = answer
        if not result.fallback:
            result.citations, result.invalid_citations = check_citations(answer, len(tables))
        return result
