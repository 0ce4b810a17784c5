"""Data that crosses the boundaries of the grounding package: lookup results, errors, protocols.

Every statistics backend (Data Commons NL endpoint, Data Commons REST v2, the embedded local store)
answers the same two questions through :class:`StatSource`:

- ``point(query)``: one value for a natural-language statistical query (RIG mode), or ``None`` when
  the source has no data for it ("no data" is an answer, not an error);
- ``table(query)``: a table for the query (RAG mode), or ``None``.

Failures (network, quota, schema drift) raise :class:`DataSourceError` subclasses.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Literal, Protocol, runtime_checkable

from pydantic import BaseModel, Field

__all__ = [
    "SourceRef", "PointResult", "TableResult", "Lookup", "StatSource", "LLM",
    "GroundingError", "DataSourceError", "TransientError", "RateLimitedError", "SchemaDriftError",
    "AuthError", "NoDataError", "PROJECTION_MARK", "projection_label", "split_projection_label",
]

# How a projected value's date is shown in tables ("2050 (projection)"): readers see it, and charts
# read it back to mark projections, also from tables that came over HTTP.
PROJECTION_MARK = " (projection)"


def projection_label(date: str, projection: bool) -> str:
    """``"2050 (projection)"`` for a projection, the date itself otherwise."""
    return date + PROJECTION_MARK if projection else date


def split_projection_label(label: str) -> tuple[str, bool]:
    """(date, is a projection) from a table's date cell: the inverse of :func:`projection_label`."""
    if label.endswith(PROJECTION_MARK):
        return label[: -len(PROJECTION_MARK)], True
    return label, False


class SourceRef(BaseModel):
    """Where a number comes from (Data Commons ``srcs[0]`` / a facet's provenance)."""

    name: str
    url: str | None = None


class PointResult(BaseModel):
    """One statistic answering a point query."""

    query: str  # the natural-language query as asked
    value: float
    unit: str | None = None
    date: str | None = None  # ISO-like date of the observation ("2007", "2019-06")
    source: SourceRef | None = None
    title: str | None = None  # human title of the series ("Life expectancy in Kenya")
    variable: str | None = None  # statistical variable dcid (LifeExpectancy_Person)
    variable_name: str | None = None
    place: str | None = None  # place dcid (country/KEN)
    place_name: str | None = None
    score: float | None = None  # resolver confidence for the variable match, 0..1 when known
    url: str | None = None  # a page where a reader can see the series (dcUrl)
    projection: bool = False  # a projected value (a year after the last observed one), not an observation
    attribution: str | None = None  # the line the source asks to be shown with its numbers (licence)


class TableResult(BaseModel):
    """A table answering a table query (RAG mode)."""

    query: str
    title: str
    unit: str | None = None
    source: SourceRef | None = None
    columns: list[str]
    rows: list[list[str | float | None]]
    variables: list[str] = Field(default_factory=list)
    places: list[str] = Field(default_factory=list)
    score: float | None = None
    url: str | None = None
    kind: Literal["series", "comparison", "ranking"] | None = None  # how to draw it: line, bars, ranked bars
    attribution: str | None = None  # the line the source asks to be shown with its numbers (licence)


class Lookup(BaseModel):
    """The outcome of one query in a batch: a result, no data (both None), or an error message."""

    query: str
    mode: Literal["point", "table"]
    result: PointResult | TableResult | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None


@runtime_checkable
class StatSource(Protocol):
    """A statistics backend."""

    name: str

    def point(self, query: str) -> PointResult | None: ...

    def table(self, query: str) -> TableResult | None: ...


@runtime_checkable
class LLM(Protocol):
    """A text generator: the native Gemma models, Gemini over REST, or any LangChain chat model."""

    def generate(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
                 stop: Sequence[str] | None = None) -> str: ...

    def stream(self, prompt: str, *, max_new_tokens: int = 512, temperature: float = 0.0,
               stop: Sequence[str] | None = None) -> Iterator[str]: ...


class GroundingError(Exception):
    """Base of the errors raised by the grounding package."""


class DataSourceError(GroundingError):
    """A statistics backend could not answer (after retries where they apply)."""


class TransientError(DataSourceError):
    """A failure worth retrying: connection error, timeout, HTTP 5xx."""


class RateLimitedError(TransientError):
    """HTTP 429; ``retry_after`` is the server's Retry-After in seconds when it sent one."""

    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class SchemaDriftError(DataSourceError):
    """The response did not have the documented shape (renamed fields, truncated JSON ...)."""


class AuthError(DataSourceError):
    """The API key was missing, wrong or not enabled for this API (HTTP 401/403)."""


class NoDataError(GroundingError):
    """Raised by callers that require a value where the source has none."""
