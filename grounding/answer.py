"""``ask``: one call from a question to a grounded answer (used by the CLI, the web app and LangChain).

With a model, ``mode="rag"`` runs :class:`grounding.rag.RAG` and ``mode="rig"`` runs
:class:`grounding.rig.RIG`. Without a model the answer is still useful: the statistics retrieved for
the question, stated plainly with their sources (and, in RAG mode, the tables).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

from .chart import Chart, charts_for
from .guard import Guard, GuardReport, refusal_text, screen
from .rag import RAG, NumberedTable, number_tables
from .rig import RIG, Claim, _value_with_unit, footnote_text
from .types import LLM, PointResult, StatSource, projection_label

__all__ = ["Answer", "ask", "state_plainly"]


class Answer(BaseModel):
    """A grounded answer, as the CLI prints it (``render``) or emits it (``--json``)."""

    question: str
    mode: Literal["rag", "rig"]
    text: str  # the answer: citations [Table N], RIG display annotations, footnote marks
    source: str  # name of the statistics source
    model: str | None = None  # the LLM that wrote the text; None = statistics stated plainly
    statistics: list[PointResult] = Field(default_factory=list)  # point values the text states (no model)
    claims: list[Claim] = Field(default_factory=list)  # RIG: every statistic with both values
    footnotes: list[str] = Field(default_factory=list)
    tables: list[NumberedTable] = Field(default_factory=list)
    questions: list[str] = Field(default_factory=list)  # RAG: the statistical questions looked up
    citations: list[int] = Field(default_factory=list)  # table numbers cited that exist
    invalid_citations: list[int] = Field(default_factory=list)  # cited numbers with no such table
    no_answer: bool = False  # the source had nothing for the question (or the model said [NO ANSWER])
    fallback: bool = False  # RAG: answered from the bare question, without tables
    errors: dict[str, str] = Field(default_factory=dict)  # query -> lookup failure
    # How the question resolved (the local store explains itself: "resolved to: ... (0.83); also considered:
    # ..."), the nearest years when the asked one has no value, and the sources' attribution lines.
    resolution: dict[str, Any] | None = None
    nearest: list[PointResult] = Field(default_factory=list)
    attribution: list[str] = Field(default_factory=list)  # of every source a number of the answer comes from
    # Each statistical query looked up -> how the source resolved it (sources that explain themselves: the
    # local store), with a model too; and the charts of the tables used (the web app and --plot draw them).
    explanations: dict[str, str] = Field(default_factory=dict)
    charts: list[Chart] = Field(default_factory=list)

    @property
    def failed(self) -> bool:
        """Every statistics lookup failed: nothing in the answer comes from the source (the errors say why).
        Not the same as ``no_answer`` alone, where the source answered that it has no data."""
        grounded = self.statistics or self.tables or any(c.dc_value is not None for c in self.claims)
        return bool(self.errors) and not grounded
    guard: GuardReport | None = None  # the safety guard's scores (ask(..., guard=...)); refused: text says why

    @property
    def refused(self) -> bool:
        return self.guard is not None and self.guard.refused is not None

    @property
    def used_tables(self) -> list[NumberedTable]:
        """The tables the answer cites (all of them when it cites none)."""
        return [t for t in self.tables if not self.citations or t.number in self.citations]

    def render(self) -> str:
        """Human-readable: the answer, footnotes, the tables used, warnings."""
        parts = [self.text.strip()]
        if self.footnotes:
            parts.append("\n".join(self.footnotes))
        used = self.used_tables
        if used:
            parts.append("\n\n".join(t.text for t in used))
        notes = []
        if self.fallback:
            notes.append("note: the tables could not answer; this answer is the model's own, not grounded")
        if self.invalid_citations:
            notes.append("warning: the answer cites tables that do not exist: "
                         + ", ".join(f"[Table {n}]" for n in self.invalid_citations))
        notes += [f"lookup failed for {query!r}: {error}" for query, error in self.errors.items()]
        if self.refused:
            result = self.guard.answer if self.guard.refused == "answer" else self.guard.question
            notes.append("guard scores: " + ", ".join(f"{name} {p:.3f}" for name, p in result.scores.items()))
        if notes:
            parts.append("\n".join(notes))
        if self.attribution:
            parts.append("\n".join(self.attribution))
        return "\n\n".join(p for p in parts if p)


def _subject(point: PointResult) -> str:
    if point.variable_name and point.place_name:
        return f"{point.variable_name} in {point.place_name}"
    return point.title or point.query


def state_plainly(point: PointResult, citation: str = "") -> str:
    """``Life expectancy in Kenya was 54.11 years in 2007, according to Gapminder [1].``"""
    verb = "is projected to be" if point.projection else "was"
    text = f"{_subject(point)} {verb} {_value_with_unit(point.value, point.unit)}"
    if point.date:
        text += f" in {projection_label(point.date, point.projection)}"
    if point.source is not None:
        text += f", according to {point.source.name}"
    return text + (f" {citation}" if citation else "") + "."


def _describe_table(t: NumberedTable) -> str:
    """``Table 1 gives <title> (52 rows), according to <source>; first: Réunion, 76.442 years [Table 1].``"""
    table = t.table
    text = f"Table {t.number} gives {table.title} ({len(table.rows)} rows)"
    if table.source is not None:
        text += f", according to {table.source.name}"
    columns = [str(c).lower() for c in table.columns]
    if "rank" in columns and "place" in columns and table.rows:  # a ranking: its first row is the answer
        first = table.rows[0]
        value = first[-1]
        shown = _value_with_unit(value, table.unit) if isinstance(value, (int, float)) else str(value)
        text += f"; first: {first[columns.index('place')]}, {shown}"
    return text + f" [Table {t.number}]."


def _resolve_source(source: str | StatSource | None) -> StatSource:
    if source is None or isinstance(source, str):
        from .sources import open_source

        return open_source(kind=source or "local")
    return source


def _lookup(source: StatSource, query: str, mode: Literal["point", "table"]):
    from .sources import lookup_many

    return lookup_many(source, [query], mode=mode, max_workers=1)[0]


def _comparison_sentence(t: NumberedTable) -> str:
    """``Life expectancy: France 80.657 years (2007), Germany 79.406 years (2007) [Table 1].``"""
    table = t.table
    variable = table.columns[-1]
    shown = ", ".join(f"{row[0]} {_value_with_unit(row[-1], table.unit)} ({row[1]})" for row in table.rows)
    return f"{variable}: {shown} [Table {t.number}]."


def _nearest_sentence(explanation: dict[str, Any], nearest: list[PointResult]) -> str:
    """``No value for 1990 (Life expectancy in Kenya); the nearest: 1987: 59.339 years, 1992: 59.285 years,
    according to Gapminder.``"""
    by_place: dict[str, list[PointResult]] = {}
    for point in nearest:
        by_place.setdefault(point.place_name or "", []).append(point)
    parts = []
    for place, points in by_place.items():
        shown = ", ".join(f"{projection_label(p.date, p.projection)}: {_value_with_unit(p.value, p.unit)}"
                          for p in points)
        parts.append(f"{points[0].variable_name} in {place}: {shown or 'no other year'}")
    source = nearest[0].source.name if nearest and nearest[0].source else None
    text = f"No value for {explanation['missing_date']}; the nearest years: " + "; ".join(parts)
    return text + (f", according to {source}." if source else ".")


def _change_sentence(change: dict[str, Any]) -> str:
    start, end = PointResult(**change["start"]), PointResult(**change["end"])
    percent = f", {change['percent']:+.1f}%" if change["percent"] is not None else ""
    text = (f"{start.variable_name} in {change['place_name']} went from {_value_with_unit(start.value, start.unit)} "
            f"in {start.date} to {_value_with_unit(end.value, end.unit)} in {end.date} "
            f"({'+' if change['difference'] > 0 else ''}{_value_with_unit(change['difference'], start.unit)}{percent})")
    return text + (f", according to {start.source.name}." if start.source else ".")


def _answer_without_model(question: str, mode: Literal["rag", "rig"], source: StatSource) -> Answer:
    answer = Answer(question=question, mode=mode, text="", source=source.name)
    explain = getattr(source, "explain", None)  # the local store explains how it resolved the question
    explanation = explain(question).model_dump(mode="json") if explain is not None else None
    answer.resolution = explanation
    point = _lookup(source, question, "point")
    if point.error is not None:
        answer.errors[question] = point.error
    if mode == "rag":
        table = _lookup(source, question, "table")
        if table.error is not None:
            answer.errors.setdefault(question, table.error)
        answer.questions = [question]
        answer.tables = number_tables([table])
        answer.citations = [t.number for t in answer.tables]
    sentences = []
    # A table over many places (countries in Africa) is not summed up by the one value a point lookup
    # picks from it (the top-ranked place); state only the table then.
    many_places = any(len(t.table.places) > 1 for t in answer.tables)
    comparison = [t for t in answer.tables if t.table.kind == "comparison"]
    if isinstance(point.result, PointResult) and not many_places:
        answer.statistics = [point.result]
        if mode == "rig":
            answer.footnotes = [footnote_text(1, point.result)]
            sentences.append(state_plainly(point.result, "[1]"))
            answer.claims = [Claim(id=1, query=question, dc_value=point.result.value, unit=point.result.unit,
                                   date=point.result.date, source=point.result.source, footnote=1,
                                   url=point.result.url or (point.result.source.url if point.result.source else None),
                                   attribution=point.result.attribution, start=0, end=0)]
        else:
            sentences.append(state_plainly(point.result, "[Table 1]" if answer.tables else ""))
    for t in answer.tables:
        sentences.append(_comparison_sentence(t) if t in comparison else _describe_table(t))
    if explanation is not None:
        sentences += [_change_sentence(change) for change in explanation["change"]]
        if explanation["missing_date"] and explanation["nearest"]:
            answer.nearest = [PointResult(**p) for p in explanation["nearest"]]
            sentences.append(_nearest_sentence(explanation, answer.nearest))
    found = [point.result, table.result if mode == "rag" else None, *answer.nearest]
    answer.attribution = _attribution_lines(r.attribution for r in found if r is not None)
    answer.explanations = {question: explanation["text"]} if explanation is not None else {}
    answer.charts = charts_for(answer.used_tables)
    answer.no_answer = not answer.statistics and not answer.tables and not (explanation or {}).get("change")
    if not sentences:
        sentences.append(f"No statistics found for this question in the {source.name!r} statistics source.")
    answer.text = " ".join(sentences)
    return answer


def ask(question: str, mode: Literal["rag", "rig"] = "rag", source: str | StatSource | None = "local",
        llm: LLM | None = None, *, answer_llm: LLM | None = None, interleaved: bool = False,
        max_new_tokens: int = 512, max_workers: int = 8, guard: Guard | None = None) -> Answer:
    """Answer a statistical question from ``source`` (a :class:`StatSource`, or ``"local"``/``"nl"``/``"rest"``).

    ``llm=None`` states the retrieved statistics plainly. With a model, RAG answers from numbered
    tables with ``[Table N]`` citations (checked; ``answer_llm``, default ``llm``, writes the answer as
    Gemini does in the paper while ``llm`` writes the statistical questions), RIG grounds each
    statistic the model writes (``interleaved=True`` feeds the true values to the model as it writes).

    ``guard`` (:func:`models.load_guard`): the question is screened first; a flagged question gets a
    refusal (``answer.guard`` holds the scores) and touches no data source and no model. The answer is
    then screened as the response to the question and replaced by a refusal when flagged.
    """
    if mode not in ("rag", "rig"):
        raise ValueError(f"mode must be 'rag' or 'rig', got {mode!r}")
    if not question or not question.strip():
        raise ValueError("question is empty")
    if guard is None:
        return _answer(question, mode, source, llm, answer_llm, interleaved, max_new_tokens, max_workers)
    checked = GuardReport(question=screen(guard, question))
    if checked.question.flagged:
        name = source if isinstance(source, str) or source is None else source.name
        return Answer(question=question, mode=mode, text=refusal_text(checked.question), source=str(name or "local"),
                      guard=checked.model_copy(update={"refused": "question"}))
    answer = _answer(question, mode, source, llm, answer_llm, interleaved, max_new_tokens, max_workers)
    checked.answer = screen(guard, question, answer.text)
    if checked.answer.flagged:  # nothing of the flagged answer is shown
        return Answer(question=question, mode=mode, text=refusal_text(checked.answer), source=answer.source,
                      model=answer.model, guard=checked.model_copy(update={"refused": "answer"}))
    return answer.model_copy(update={"guard": checked})


def _answer(question: str, mode: Literal["rag", "rig"], source: str | StatSource | None, llm: LLM | None,
            answer_llm: LLM | None, interleaved: bool, max_new_tokens: int, max_workers: int) -> Answer:
    stat_source = _resolve_source(source)
    if llm is None:
        return _answer_without_model(question, mode, stat_source)
    model_name = getattr(llm, "name", None) or getattr(llm, "model", None) or type(llm).__name__
    model_name = str(model_name)
    if mode == "rig":
        rig = RIG(stat_source, llm, max_new_tokens=max_new_tokens, max_workers=max_workers)
        result = rig.run(question, interleaved=interleaved)
        errors = {c.query: c.error for c in result.claims if c.error}
        grounded = [c for c in result.claims if c.dc_value is not None]
        return Answer(question=question, mode=mode, text=result.text, source=stat_source.name, model=model_name,
                      claims=result.claims, footnotes=result.footnotes, errors=errors, no_answer=not grounded,
                      attribution=_attribution_lines(c.attribution for c in grounded),
                      explanations=_explanations(stat_source, [c.query for c in result.claims]))
    result = RAG(stat_source, llm, answer_llm, max_new_tokens=max_new_tokens, max_workers=max_workers).run(question)
    answer = Answer(question=question, mode=mode, text=result.answer, source=stat_source.name, model=model_name,
                    tables=result.tables, questions=result.questions, citations=result.citations,
                    invalid_citations=result.invalid_citations, no_answer=result.no_answer,
                    fallback=result.fallback, errors=result.lookup_errors,
                    explanations=_explanations(stat_source, result.questions))
    if not result.fallback:  # a fallback answer is the model's own: no table, no source to attribute or chart
        answer.attribution = _attribution_lines(t.table.attribution for t in answer.used_tables)
        answer.charts = charts_for(answer.used_tables)
    return answer


def _attribution_lines(lines) -> list[str]:
    """The distinct attribution lines, in order of first use."""
    return list(dict.fromkeys(line for line in lines if line))


def _explanations(source: StatSource, queries: list[str]) -> dict[str, str]:
    """How the source resolved each query, for sources that explain themselves (the local store)."""
    explain = getattr(source, "explain", None)
    if explain is None:
        return {}
    return {query: explain(query).text for query in dict.fromkeys(queries)}
