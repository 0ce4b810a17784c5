"""Client of the Data Commons natural-language endpoint (``/nodejs/query``), what DataGemma calls.

Point lookups (RIG) use ``mode=toolformer_rig&allCharts=1``; table lookups (RAG) use
``mode=toolformer_rag&client=table``; both with ``idx=base_uae_mem``. The API key goes in the ``key``
query parameter (public endpoint) or ``apikey`` (self-hosted servers read that one): pass
``key_param="apikey"`` for those. ``base_url`` points the client at any server with these shapes,
including :mod:`grounding.server`.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path
from typing import Any

from pydantic import AliasChoices, BaseModel, ConfigDict, Field

from .http import DEFAULT_NL_URL, HttpClient, ResponseCache, RetryPolicy, api_key_from_env, validate
from .types import PointResult, SchemaDriftError, SourceRef, TableResult

__all__ = ["NLClient", "NLResponse", "NLChart", "NLHighlight", "NLSource", "parse_point", "parse_table",
           "RIG_PARAMS", "RAG_PARAMS"]

log = logging.getLogger("grounding.nl_client")

RIG_PARAMS = {"allCharts": "1", "mode": "toolformer_rig", "idx": "base_uae_mem"}
RAG_PARAMS = {"mode": "toolformer_rag", "client": "table", "idx": "base_uae_mem"}
POINT_CHART_TYPES = ("LINE", "HIGHLIGHT")


class NLSource(BaseModel):
    model_config = ConfigDict(extra="allow")
    name: str = ""
    url: str | None = None


class NLHighlight(BaseModel):
    model_config = ConfigDict(extra="allow")
    value: float
    date: str | None = None


class NLChart(BaseModel):
    """One chart (TileResult) of an NL response. ``dataCsv`` was called ``data_csv`` before Dec 2024."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)
    type: str
    title: str = ""
    srcs: list[NLSource] = Field(default_factory=list)
    vars: list[str] = Field(default_factory=list)
    places: list[str] = Field(default_factory=list)
    placeType: str | None = None
    unit: str | None = None
    highlight: NLHighlight | None = None
    dataCsv: str | None = Field(default=None, validation_alias=AliasChoices("dataCsv", "data_csv"))
    dcUrl: str | None = None
    # Not in Data Commons' answers; our own server (grounding.server) sends them.
    attribution: str | None = None
    projection: bool = False


class NLResponse(BaseModel):
    model_config = ConfigDict(extra="allow")
    charts: list[NLChart]  # required: a response without it is drift, not "no data"
    debug: dict[str, Any] | None = None
    err: str | None = None


def _match_score(response: NLResponse) -> float | None:
    """``debug.debug.sv_matching.CosineScore[0]`` when present."""
    try:
        return float(response.debug["debug"]["sv_matching"]["CosineScore"][0])  # type: ignore[index]
    except (TypeError, KeyError, IndexError, ValueError):
        return None


def _matched_variable(response: NLResponse) -> str | None:
    try:
        return str(response.debug["debug"]["sv_matching"]["SV"][0])  # type: ignore[index]
    except (TypeError, KeyError, IndexError):
        return None


# Columns whose cells stay text even when they look like numbers ("2007", rank "1").
TEXT_COLUMNS = {"date", "rank", "place", "variable", "entity", "name"}


def _cell(text: str, column: str) -> str | float | None:
    if text == "":
        return None
    if column.strip().lower() in TEXT_COLUMNS:
        return text
    try:
        return float(text)
    except ValueError:
        return text


def parse_point(query: str, response: NLResponse) -> PointResult | None:
    """The first LINE/HIGHLIGHT chart with a highlight, as a PointResult; None when there is none."""
    for chart in response.charts:
        if chart.type in POINT_CHART_TYPES and chart.highlight is not None:
            source = chart.srcs[0] if chart.srcs else None
            return PointResult(
                query=query, value=chart.highlight.value, unit=chart.unit or None, date=chart.highlight.date,
                source=SourceRef(name=source.name, url=source.url) if source else None, title=chart.title or None,
                variable=chart.vars[0] if chart.vars else _matched_variable(response),
                place=chart.places[0] if chart.places else None, score=_match_score(response), url=chart.dcUrl,
                projection=chart.projection, attribution=chart.attribution)
    return None


def parse_table(query: str, response: NLResponse) -> TableResult | None:
    """The first chart carrying CSV data, as a TableResult; None when there is none."""
    for chart in response.charts:
        if not chart.dataCsv:
            continue
        rows = list(csv.reader(io.StringIO(chart.dataCsv)))
        if not rows:
            continue
        header, body = rows[0], [r for r in rows[1:] if r]
        if any(len(r) != len(header) for r in body):
            raise SchemaDriftError(f"table for {query!r}: CSV rows do not match the header {header}")
        source = chart.srcs[0] if chart.srcs else None
        return TableResult(
            query=query, title=chart.title, unit=chart.unit or None,
            source=SourceRef(name=source.name, url=source.url) if source else None, columns=header,
            rows=[[_cell(c, h) for c, h in zip(r, header, strict=True)] for r in body], variables=chart.vars, places=chart.places,
            score=_match_score(response), url=chart.dcUrl, attribution=chart.attribution)
    return None


class NLClient:
    """``point(query)`` and ``table(query)`` against a Data Commons NL endpoint."""

    name = "nl"

    def __init__(self, base_url: str = DEFAULT_NL_URL, api_key: str | None = None, *, key_param: str = "key",
                 policy: RetryPolicy | None = None, cache_dir: str | Path | None = None,
                 cache_ttl: float = 24 * 3600, http: HttpClient | None = None):
        cache = ResponseCache(cache_dir, cache_ttl) if cache_dir is not None else None
        self.http = http or HttpClient(base_url, api_key=api_key_from_env(api_key), key_param=key_param,
                                       policy=policy, cache=cache)

    def __repr__(self) -> str:
        return f"NLClient({self.http!r})"

    def query(self, query: str, mode: str = "point") -> NLResponse:
        """The raw, validated response for ``query`` in ``mode`` "point" (RIG) or "table" (RAG)."""
        if mode not in ("point", "table"):
            raise ValueError(f"mode must be 'point' or 'table', got {mode!r}")
        params = [("q", query), *(RIG_PARAMS if mode == "point" else RAG_PARAMS).items()]
        what = f"NL query {query!r}"
        # requests URL-encodes every parameter; validation runs before the answer is cached
        data = self.http.get_json("/nodejs/query", params, check=lambda d: validate(NLResponse, d, what))
        response = validate(NLResponse, data, what)
        if response.err and not response.charts:
            log.debug("no data for %r: %s", query, response.err)
        return response

    def point(self, query: str) -> PointResult | None:
        return parse_point(query, self.query(query, "point"))

    def table(self, query: str) -> TableResult | None:
        return parse_table(query, self.query(query, "table"))
