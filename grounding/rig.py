"""RIG (retrieval interleaved generation): ground the numbers a model writes in a statistics source.

The DataGemma RIG model writes each statistic as ``[__DC__("<query>") --> "<its own value>"]``. This
module

- parses those annotations incrementally (:class:`AnnotationParser` works on streamed text and
  tolerates the known malformations: missing ``[`` or closing ``]``, a stray ``$`` in front, escaped
  quotes);
- looks each *distinct* query up once, concurrently (:func:`ground_text`);
- replaces every annotation by its span (never ``str.replace``, so repeated or overlapping text stays
  right) in the paper's display format ``[__DC__#<id>(<dc value> <unit> [<n>] || <model value>)]``
  with ``*`` after ``[n]`` when the two values differ by more than 5%, plus footnotes
  ``[n] - Per <source>, value was <value> <unit> in <date>. See more at <url>``;
- returns a structured :class:`RIGResult` listing every claim with both values and its source.

:class:`RIG` runs the model and grounds its output, either post hoc (the paper's flow: the model never
sees the true value) or interleaved (generation pauses when the model has written ``--> "``, the value
is fetched and written for it, and the model continues after the true value).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence

from pydantic import BaseModel, Field

from .types import LLM, Lookup, PointResult, SourceRef, StatSource

__all__ = [
    "Annotation", "AnnotationParser", "parse_annotations", "parse_number", "format_number",
    "Claim", "RIGResult", "substitute", "ground_text", "RIG", "DIFFERENCE_THRESHOLD", "ARROW",
]

DIFFERENCE_THRESHOLD = 0.05  # the paper flags a model value more than 5% away from the Data Commons value
ARROW = '--> "'  # what the model writes right before its own value; the interleaved mode stops here
ARROW_STOPS = [ARROW, '-->"', '--> \\"']  # spellings models use; any of them pauses generation
_MARKER = "__DC__"
# A query or value longer than this is not one (a stray marker in prose): it stays text. The bound also
# keeps re-parsing an open annotation on every streamed chunk cheap.
MAX_FIELD_CHARS = 500


class Annotation(BaseModel):
    """One ``[__DC__("query") --> "value"]`` found in model output; ``start:end`` is its span."""

    query: str
    model_value: str | None = None  # None when the model wrote no ``--> "value"`` part
    start: int
    end: int
    problems: list[str] = Field(default_factory=list)  # malformations tolerated while parsing


# -- parsing -----------------------------------------------------------------------------------
class _NeedMore(Exception):
    """The buffer ends inside an annotation; more text could change how it parses."""


class _TooLong(ValueError):
    """A quoted field ran past MAX_FIELD_CHARS: the marker is not the start of an annotation."""


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i] in " \t":
        i += 1
    return i


def _read_quoted(text: str, i: int, final: bool, what: str, stop_at_newline: bool) -> tuple[str, int, list[str]]:
    """Read a quoted string starting at ``text[i]`` (``"`` or an escaped ``\\"``).

    Returns (content, index after the closing quote, problems). The closing quote of a ``"``-quoted
    string is the first ``"`` not preceded by a backslash (inside, ``\\"`` is a quote character); an
    escaped-quote string (``\\"...\\"``, as models write when they imitate JSON) closes at ``\\"``.
    """
    problems = []
    if text.startswith('\\"', i):
        escaped, i = True, i + 2
        problems.append(f"escaped quotes around the {what}")
    elif i < len(text) and text[i] == '"':
        escaped, i = False, i + 1
    else:
        raise ValueError(f"no opening quote for the {what}")
    out = []
    opened_at = i
    while True:
        if i - opened_at > MAX_FIELD_CHARS:
            raise _TooLong(what)
        if i >= len(text):
            if not final:
                raise _NeedMore
            problems.append(f"unterminated {what}")
            return "".join(out).strip(), i, problems
        c = text[i]
        if stop_at_newline and c == "\n":  # queries and values never span lines: the quote was never closed
            problems.append(f"unterminated {what}")
            return "".join(out).strip(), i, problems
        if c == "\\" and i + 1 < len(text):
            nxt = text[i + 1]
            if nxt == '"':
                if escaped:
                    return "".join(out), i + 2, problems
                out.append('"')
                i += 2
                continue
            if nxt == "\\":
                out.append("\\")
                i += 2
                continue
        elif c == "\\" and not final:
            raise _NeedMore  # could be the start of an escape
        if c == '"' and not escaped:
            return "".join(out), i + 1, problems
        if c == '"' and escaped:
            problems.append(f"unescaped quote inside escaped-quote {what}")
            return "".join(out), i + 1, problems
        out.append(c)
        i += 1


def _span_start(text: str, marker_at: int, floor: int) -> tuple[int, list[str]]:
    """Extend the span left over ``[`` and stray ``$`` written right before ``__DC__``."""
    start, problems = marker_at, []
    while start > floor and text[start - 1] in "[$":
        start -= 1
    prefix = text[start:marker_at]
    if "$" in prefix:
        problems.append("stray '$'")
    if "[" not in prefix:
        problems.append("missing '['")
    return start, problems


def _parse_at(text: str, marker_at: int, floor: int, final: bool) -> Annotation | None:
    """Parse the annotation whose ``__DC__`` starts at ``marker_at``; None when it is not one.

    Raises :class:`_NeedMore` when the text ends too early to decide (only when not ``final``).
    """
    start, problems = _span_start(text, marker_at, floor)
    i = _skip_space(text, marker_at + len(_MARKER))
    if i >= len(text):
        if final:
            return None
        raise _NeedMore
    if text[i] != "(":
        return None
    i = _skip_space(text, i + 1)
    if i >= len(text) or (text[i] == "\\" and i + 1 >= len(text)):
        if final:
            return None
        raise _NeedMore
    try:
        query, i, more = _read_quoted(text, i, final, "query", stop_at_newline=True)
    except ValueError:
        return None
    problems += more
    query = query.strip()
    close_paren = _skip_space(text, i)
    if close_paren < len(text) and text[close_paren] == ")":
        i = close_paren + 1
    elif close_paren >= len(text) and not final:
        raise _NeedMore
    else:
        problems.append("missing ')'")
    # The value part: ``--> "value"``; a model that stopped after the query wrote no value.
    j = _skip_space(text, i)
    if not final and len(text) - j < 3 and "-->".startswith(text[j:]):
        raise _NeedMore  # an arrow may be on its way
    model_value = None
    arrow = re.match(r"-{1,2}>|→", text[j:])
    if arrow:
        k = _skip_space(text, j + arrow.end())
        if k >= len(text) or (text[k] == "\\" and k + 1 >= len(text)):
            if not final:
                raise _NeedMore
            problems.append("missing value")
            return Annotation(query=query, model_value=None, start=start, end=len(text), problems=problems)
        try:
            model_value, i, more = _read_quoted(text, k, final, "value", stop_at_newline=True)
            problems += more
            model_value = model_value.strip()
        except _TooLong:
            return None
        except ValueError:
            problems.append("unquoted value")
            m = re.match(r"[^\]\n]*", text[k:k + MAX_FIELD_CHARS + 1])
            if m.end() > MAX_FIELD_CHARS:
                return None
            model_value, i = m.group(0).strip(), k + m.end()
            if i >= len(text) and not final:
                raise _NeedMore from None
    j = _skip_space(text, i)
    if j < len(text) and text[j] == "]":
        end = j + 1
    elif j >= len(text) and not final:
        raise _NeedMore  # the closing bracket may still come
    else:
        end = i
        problems.append("missing ']'")
    return Annotation(query=query, model_value=model_value, start=start, end=end, problems=problems)


class AnnotationParser:
    """Incremental annotation parser for streamed model output.

    ``feed(chunk)`` returns the annotations that became complete; ``close()`` returns the rest (an
    annotation cut off by the end of the text is parsed as far as it goes). Spans are offsets into the
    whole text fed so far (``parser.text``). Text that cannot be an annotation is skipped, and each
    chunk re-parses only the annotation still open at the end (bounded by ``MAX_FIELD_CHARS``).
    """

    def __init__(self) -> None:
        self.text = ""
        self._cursor = 0  # where to look for the next marker
        self._floor = 0  # end of the last annotation: a span never reaches back before it

    def feed(self, chunk: str) -> list[Annotation]:
        self.text += chunk
        return self._scan(final=False)

    def close(self) -> list[Annotation]:
        return self._scan(final=True)

    def pending(self) -> Annotation | None:
        """The annotation still open at the end of the text, parsed as if the text ended here."""
        at = self.text.find(_MARKER, self._cursor)
        if at < 0:
            return None
        return _parse_at(self.text, at, self._floor, final=True)

    def _scan(self, final: bool) -> list[Annotation]:
        found = []
        while True:
            at = self.text.find(_MARKER, self._cursor)
            if at < 0:
                # A marker may be split across chunks ("__D" + "C__"): look at the tail again.
                self._cursor = max(self._cursor, len(self.text) - len(_MARKER) + 1)
                return found
            try:
                annotation = _parse_at(self.text, at, self._floor, final)
            except _NeedMore:
                self._cursor = at
                return found
            if annotation is None:
                self._cursor = at + len(_MARKER)
                continue
            found.append(annotation)
            self._cursor = self._floor = annotation.end


def parse_annotations(text: str) -> list[Annotation]:
    """Every annotation in a complete text, in order."""
    parser = AnnotationParser()
    return parser.feed(text) + parser.close()


# -- numbers -----------------------------------------------------------------------------------
_MULTIPLIERS = {"thousand": 1e3, "million": 1e6, "billion": 1e9, "trillion": 1e12,
                "k": 1e3, "m": 1e6, "mn": 1e6, "bn": 1e9, "b": 1e9, "tn": 1e12, "t": 1e12}
_NUMBER = re.compile(r"[-+−]?(?:\d[\d,]*(?:\.\d+)?|\.\d+)(?:[eE][-+]?\d+)?")


def parse_number(text: str | None) -> float | None:
    """The number a model wrote (``"61.8 years"``, ``"$1.2 billion"``, ``"45%"``, ``"3,000"``).

    As in the paper, a "thousand/million/billion/trillion" word multiplies and other characters are
    ignored. Returns None when there is no number.
    """
    if not text:
        return None
    m = _NUMBER.search(text)
    if not m:
        return None
    value = float(m.group(0).replace(",", "").replace("−", "-"))
    word = re.match(r"\s*([A-Za-z]+)", text[m.end():])
    if word and word.group(1).lower() in _MULTIPLIERS:
        value *= _MULTIPLIERS[word.group(1).lower()]
    return value


def format_number(value: float) -> str:
    """Integers without a decimal point; values from 1000 up with at most 2 decimals; smaller ones with
    at most 6 significant digits."""
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    if abs(value) >= 1000:
        return f"{value:.2f}".rstrip("0").rstrip(".")
    return f"{value:.6g}"


def relative_difference(reference: float, other: float) -> float:
    if reference == 0:
        return 0.0 if other == 0 else float("inf")
    return abs(other - reference) / abs(reference)


# -- substitution ------------------------------------------------------------------------------
class Claim(BaseModel):
    """One statistic the model stated, with the value the source has for it."""

    id: int  # 1-based, in order of appearance (the ``#id`` of the display)
    query: str
    model_value: str | None = None  # as the model wrote it
    model_number: float | None = None  # parsed from model_value
    dc_value: float | None = None
    unit: str | None = None
    date: str | None = None
    source: SourceRef | None = None
    url: str | None = None
    attribution: str | None = None  # the line the source asks to be shown with its numbers
    footnote: int | None = None  # number of the footnote citing the source
    differs: bool | None = None  # more than 5% apart; None when either value is missing
    relative_difference: float | None = None
    inserted: bool = False  # interleaved mode: the source value was written into the generation
    error: str | None = None  # lookup failure (the claim keeps the model's value)
    start: int
    end: int
    problems: list[str] = Field(default_factory=list)


class RIGResult(BaseModel):
    """The grounded answer: raw model text, display text, every claim, the footnotes."""

    question: str | None = None
    raw_text: str  # what the model wrote (interleaved: including inserted values)
    text: str  # annotations replaced by the display format
    footnotes: list[str]
    claims: list[Claim]
    interleaved: bool = False


def _value_with_unit(value: float, unit: str | None) -> str:
    return f"{format_number(value)} {unit}" if unit else format_number(value)


def footnote_text(n: int, result: PointResult) -> str:
    source = result.source.name if result.source else "the statistics source"
    text = f"[{n}] - Per {source}, value was {_value_with_unit(result.value, result.unit)}"
    if result.date:
        text += f" in {result.date}"
    text += "."
    url = result.url or (result.source.url if result.source else None)
    if url:
        text += f" See more at {url}"
    return text


def display(claim: Claim) -> str:
    """``[__DC__#id(<dc value> <unit> [n]* || <model value>)]``; ``---`` stands for a missing side."""
    if claim.dc_value is not None:
        left = f"{_value_with_unit(claim.dc_value, claim.unit)} [{claim.footnote}]"
        if claim.differs:
            left += "*"
    else:
        left = "---"
    right = claim.model_value if claim.model_value else "---"
    return f"[__DC__#{claim.id}({left} || {right})]"


def substitute(text: str, annotations: Sequence[Annotation], results: dict[str, PointResult | None],
               errors: dict[str, str] | None = None, inserted: Iterable[int] = ()) -> RIGResult:
    """Replace each annotation by its display form, by span, and build claims and footnotes.

    ``results`` maps each query to its lookup result (None = no data). A query that appears several
    times is cited by one footnote. ``inserted`` holds indexes of annotations whose value was written by
    the interleaved mode rather than the model.
    """
    errors = errors or {}
    inserted = set(inserted)
    footnote_of: dict[str, int] = {}
    footnotes: list[str] = []
    claims: list[Claim] = []
    pieces: list[str] = []
    cursor = 0
    for index, ann in enumerate(sorted(annotations, key=lambda a: a.start)):
        if ann.start < cursor:
            raise ValueError(f"annotation spans overlap at offset {ann.start}; parse the text once")
        result = results.get(ann.query)
        is_inserted = index in inserted
        model_value = None if is_inserted else ann.model_value
        claim = Claim(id=index + 1, query=ann.query, model_value=model_value,
                      model_number=parse_number(model_value), start=ann.start, end=ann.end,
                      problems=list(ann.problems), error=errors.get(ann.query), inserted=is_inserted)
        if result is not None:
            if ann.query not in footnote_of:
                footnote_of[ann.query] = len(footnotes) + 1
                footnotes.append(footnote_text(footnote_of[ann.query], result))
            claim.dc_value, claim.unit, claim.date = result.value, result.unit, result.date
            claim.source, claim.url = result.source, result.url or (result.source.url if result.source else None)
            claim.attribution = result.attribution
            claim.footnote = footnote_of[ann.query]
            if claim.model_number is not None:
                claim.relative_difference = relative_difference(result.value, claim.model_number)
                claim.differs = claim.relative_difference > DIFFERENCE_THRESHOLD
        claims.append(claim)
        pieces.append(text[cursor:ann.start])
        pieces.append(display(claim))
        cursor = ann.end
    pieces.append(text[cursor:])
    return RIGResult(raw_text=text, text="".join(pieces), footnotes=footnotes, claims=claims)


def _lookup_points(source: StatSource, queries: list[str], max_workers: int) -> list[Lookup]:
    from .sources import lookup_many

    return lookup_many(source, queries, mode="point", max_workers=max_workers)


def ground_text(text: str, source: StatSource, *, max_workers: int = 8) -> RIGResult:
    """Post-hoc grounding of a finished text: each distinct query looked up once, concurrently."""
    annotations = parse_annotations(text)
    queries = list(dict.fromkeys(a.query for a in annotations))
    results: dict[str, PointResult | None] = {}
    errors: dict[str, str] = {}
    for lookup in _lookup_points(source, queries, max_workers) if queries else []:
        if lookup.error is not None:
            errors[lookup.query] = lookup.error
        results[lookup.query] = lookup.result if isinstance(lookup.result, PointResult) else None
    return substitute(text, annotations, results, errors)


# -- the pipeline ------------------------------------------------------------------------------
_OPEN_AT_ARROW = re.compile(r'__DC__\s*\(\s*\\?".*?\\?"\s*\)?\s*(?:-{1,2}>?\s*\\?"?)?\s*$', re.S)


class RIG:
    """Run a RIG model and ground its statistics in ``source``.

    The DataGemma RIG model is prompted with the raw question (no chat template); ``prompt_template``
    (``{question}``) changes that. ``interleaved=True`` pauses at each ``--> "`` and writes the
    source's value for the model to continue from; the default is the paper's post-hoc flow.
    """

    def __init__(self, source: StatSource, llm: LLM, *, prompt_template: str = "{question}",
                 max_new_tokens: int = 1024, max_workers: int = 8, max_lookups: int = 32):
        self.source, self.llm = source, llm
        self.prompt_template = prompt_template
        self.max_new_tokens, self.max_workers, self.max_lookups = max_new_tokens, max_workers, max_lookups

    def prompt(self, question: str) -> str:
        return self.prompt_template.format(question=question)

    def run(self, question: str, *, interleaved: bool = False) -> RIGResult:
        if interleaved:
            return self.run_interleaved(question)
        text = self.llm.generate(self.prompt(question), max_new_tokens=self.max_new_tokens)
        result = ground_text(text, self.source, max_workers=self.max_workers)
        result.question = question
        return result

    def stream(self, question: str) -> Iterator[str | Annotation]:
        """Post-hoc streaming: text pieces as the model writes them, and each annotation once complete."""
        parser = AnnotationParser()
        for piece in self.llm.stream(self.prompt(question), max_new_tokens=self.max_new_tokens):
            yield piece
            yield from parser.feed(piece)
        yield from parser.close()

    def _continue(self, prompt: str, text: str, stop: list[str]) -> str:
        # Chat-template backends know how to continue an assistant turn; completion models take text.
        continue_from = getattr(self.llm, "continue_from", None)
        if continue_from is not None:
            return continue_from(prompt, text, max_new_tokens=self.max_new_tokens, stop=stop)
        return self.llm.generate(prompt + text, max_new_tokens=self.max_new_tokens, stop=stop)

    def run_interleaved(self, question: str) -> RIGResult:
        prompt = self.prompt(question)
        text = ""
        cache: dict[str, PointResult | None] = {}
        errors: dict[str, str] = {}
        inserted_at: list[int] = []  # offsets where a source value was written for the model
        for _ in range(self.max_lookups + 1):
            piece = self._continue(prompt, text, ARROW_STOPS)
            text += piece
            tail = _OPEN_AT_ARROW.search(text[-2000:])
            open_query = AnnotationParser()
            open_query.feed(text)
            pending = open_query.pending()
            if not piece or tail is None or pending is None or pending.model_value:
                break  # finished: no open annotation waiting for its value
            # Normalise the stop point to exactly '--> "' (backends drop the stop string they hit).
            text = text[:pending.start] + text[pending.start:].rstrip()
            if not re.search(r'-{1,2}>\s*\\?"$', text):
                text = re.sub(r"\s*-{1,2}>?$", "", text) + " " + ARROW
            query = pending.query
            if query not in cache:
                lookup = _lookup_points(self.source, [query], 1)[0]
                cache[query] = lookup.result if isinstance(lookup.result, PointResult) else None
                if lookup.error is not None:
                    errors[query] = lookup.error
            result = cache[query]
            if result is not None:
                inserted_at.append(pending.start)
                text += _value_with_unit(result.value, result.unit) + '"]'
            # No data: the model goes on and writes its own value.
        annotations = parse_annotations(text)
        # Annotations written without a pause (a backend that ignores stop strings, an odd arrow) are
        # grounded post hoc, so every claim is checked either way.
        unseen = list(dict.fromkeys(a.query for a in annotations if a.query not in cache))
        for lookup in _lookup_points(self.source, unseen, self.max_workers) if unseen else []:
            cache[lookup.query] = lookup.result if isinstance(lookup.result, PointResult) else None
            if lookup.error is not None:
                errors[lookup.query] = lookup.error
        inserted = [i for i, a in enumerate(annotations) if a.start in set(inserted_at)]
        result = substitute(text, annotations, cache, errors, inserted)
        result.question, result.interleaved = question, True
        return result
