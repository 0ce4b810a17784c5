"""Data Commons REST v2 client: observation, resolve (incl. the indicator resolver) and node.

The official ``datacommons-client`` builds the request payloads and parses the responses (its
endpoints and pydantic models are used as they are). What it lacks is added here by giving its
endpoints a different transport: :class:`ResilientAPI` sends through :class:`grounding.http.HttpClient`
(timeouts, retries with backoff on 429/5xx/connection errors, on-disk cache, key redaction) instead of
a bare ``requests.post``, checks the documented top-level fields (``byVariable``, ``entities``,
``data``) so a renamed field is a :class:`SchemaDriftError` rather than an empty answer, and skips the
client's construction-time URL probe (an untimed GET).

:class:`RestClient` is also a ``StatSource``: a question is resolved to a place (``resolve`` with
``<-description->dcid`` over the question's word n-grams) and a variable (``resolve`` with the
indicator resolver), then observed -- the second way to answer a question, independent of the NL
endpoint.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from datacommons_client.endpoints.base import API
from datacommons_client.endpoints.node import NodeEndpoint
from datacommons_client.endpoints.observation import ObservationEndpoint
from datacommons_client.endpoints.resolve import ResolveEndpoint
from datacommons_client.endpoints.response import NodeResponse, ObservationResponse, ResolveResponse
from datacommons_client.utils.error_handling import DataCommonsError
from pydantic import BaseModel, ValidationError

from .http import DEFAULT_REST_URL, HttpClient, ResponseCache, RetryPolicy, api_key_from_env
from .resolution import CHILD_WORDS, RANK_ASCENDING, parse_dates
from .text import STOPWORDS, normalize
from .types import DataSourceError, PointResult, SchemaDriftError, SourceRef, TableResult

__all__ = ["RestClient", "ResilientAPI", "IndicatorCandidate", "REQUIRED_FIELDS"]

T = TypeVar("T")

# The field every answer of each endpoint has; without it the API has changed.
REQUIRED_FIELDS = {"observation": "byVariable", "resolve": "entities", "node": "data"}
MAX_PAGES = 50
MAX_PLACE_WORDS = 6  # "the Democratic Republic of the Congo"


def _merge_pages(base: Any, new: Any) -> Any:
    """Merge a page into the pages before it: dicts key by key, lists concatenated."""
    if isinstance(base, dict) and isinstance(new, dict):
        merged = dict(base)
        for key, value in new.items():
            if key != "nextToken":
                merged[key] = _merge_pages(merged[key], value) if key in merged else value
        return merged
    if isinstance(base, list) and isinstance(new, list):
        return base + new
    return new


class ResilientAPI(API):
    """``datacommons_client``'s API object with :class:`HttpClient` as transport."""

    def __init__(self, http: HttpClient):
        # super().__init__ is not called: it would probe the URL with an untimed GET.
        self.http = http
        self.base_url = http.base_url
        self.headers = {"Content-Type": "application/json"}  # the key is added by HttpClient at send time

    def __repr__(self) -> str:
        return f"<ResilientAPI at {self.base_url}{' (Authenticated)' if self.http.has_key else ''}>"

    def _check(self, endpoint: str | None, page: Any) -> None:
        required = REQUIRED_FIELDS.get(endpoint or "")
        if not isinstance(page, dict) or (required and required not in page):
            present = sorted(page) if isinstance(page, dict) else type(page).__name__
            raise SchemaDriftError(f"POST {self.base_url}/{endpoint}: the response has no {required!r} field "
                                   f"(got {present}); the API may have changed")

    def post(self, payload: dict[str, Any], endpoint: str | None = None, *, all_pages: bool = True,
             next_token: str | None = None) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        token = next_token
        for _ in range(MAX_PAGES):
            body = dict(payload, nextToken=token) if token else payload
            page = self.http.post_json(endpoint or "", body, check=lambda p: self._check(endpoint, p))
            merged = _merge_pages(merged, page)
            token = page.get("nextToken")
            if not all_pages or not token:
                break
        return merged


class IndicatorCandidate(BaseModel):
    """A statistical variable proposed by the indicator resolver."""

    dcid: str
    score: float | None = None  # the API sends it as a string
    sentence: str | None = None  # the description sentence that matched
    types: list[str] = []


class RestClient:
    """Data Commons REST v2 (``base_url`` default: the public API; our server: ``f"{url}/v2"``)."""

    name = "rest"

    def __init__(self, base_url: str = DEFAULT_REST_URL, api_key: str | None = None, *,
                 policy: RetryPolicy | None = None, cache_dir: str | Path | None = None,
                 cache_ttl: float = 24 * 3600, threshold: float = 0.7, http: HttpClient | None = None):
        cache = ResponseCache(cache_dir, cache_ttl) if cache_dir is not None else None
        self.http = http or HttpClient(base_url, api_key=api_key_from_env(api_key), key_header="X-API-Key",
                                       policy=policy, cache=cache)
        self.api = ResilientAPI(self.http)
        self.observation_endpoint = ObservationEndpoint(api=self.api)
        self.resolve_endpoint = ResolveEndpoint(api=self.api)
        self.node_endpoint = NodeEndpoint(api=self.api)
        self.threshold = threshold

    def __repr__(self) -> str:
        return f"RestClient({self.http!r}, threshold={self.threshold})"

    def _call(self, what: str, function: Callable[[], T]) -> T:
        """Run an official-client call; its parse and request errors become our typed errors."""
        try:
            return function()
        except ValidationError as exc:
            raise SchemaDriftError(f"{what}: the response does not have the documented shape "
                                   f"({exc.error_count()} problems, first: {exc.errors()[0]['msg']})") from None
        except DataCommonsError as exc:
            raise DataSourceError(f"{what}: {type(exc).__name__}: {exc}") from None

    # ---- the three endpoints --------------------------------------------------------------------------

    def observation(self, variables: str | list[str], entities: str | list[str] | None = None, *,
                    expression: str | None = None, date: str = "LATEST",
                    select: list[str] | None = None) -> ObservationResponse:
        """``/v2/observation``; ``date`` is "LATEST", "" (all) or a date such as "2007"."""
        select = select or ["date", "variable", "entity", "value", "facet"]
        return self._call("observation", lambda: self.observation_endpoint.fetch(
            variable_dcids=variables, entity_dcids=entities, entity_expression=expression, date=date,
            select=select))

    def resolve(self, nodes: str | list[str], expression: str | None = None,
                resolver: str | None = None) -> ResolveResponse:
        return self._call("resolve", lambda: self.resolve_endpoint.fetch(node_ids=nodes, expression=expression,
                                                                         resolver=resolver))

    def node(self, nodes: str | list[str], expression: str) -> NodeResponse:
        return self._call("node", lambda: self.node_endpoint.fetch(node_dcids=nodes, expression=expression))

    # ---- conveniences ---------------------------------------------------------------------------------

    def resolve_places(self, names: list[str], place_type: str | None = None) -> dict[str, list[str]]:
        """{name: [place dcid, ...]} by the description resolver."""
        expression = f"<-description{{typeOf:{place_type}}}->dcid" if place_type else "<-description->dcid"
        response = self.resolve(names, expression)
        return {e.node: [c.dcid for c in e.candidates if c.dcid] for e in response.entities}

    def resolve_indicators(self, queries: list[str]) -> dict[str, list[IndicatorCandidate]]:
        """{query: candidates, best first} by the indicator resolver."""
        response = self.resolve(queries, resolver="indicator")
        found = {}
        for entity in response.entities:
            candidates = []
            for c in entity.candidates:
                metadata = c.metadata or {}
                try:
                    score = float(metadata["score"]) if "score" in metadata else None
                except ValueError:
                    raise SchemaDriftError(f"resolve indicator: score {metadata['score']!r} is not a number") from None
                candidates.append(IndicatorCandidate(dcid=c.dcid, score=score, sentence=metadata.get("sentence"),
                                                     types=c.typeOf or []))
            candidates.sort(key=lambda c: -(c.score or 0.0))
            found[entity.node] = candidates
        return found

    def names(self, dcids: list[str]) -> dict[str, str]:
        """{dcid: name} for nodes that have a name."""
        properties = self.node(dcids, "->name").get_properties()
        names = {}
        for dcid, arcs in properties.items():
            nodes = arcs.get("name") or []
            if nodes and nodes[0].value:
                names[dcid] = nodes[0].value
        return names

    # ---- StatSource -----------------------------------------------------------------------------------

    def _understand(self, query: str) -> tuple[str, str, float, str | None, str | None] | None:
        """(place dcid, variable dcid, score, date, child type) for a question, or None."""
        date, _range, spans = parse_dates(query)
        masked = query
        for start, end in spans:
            masked = masked[:start] + " " * (end - start) + masked[end:]
        tokens = [t for t in re.split(r"[\s,;:!?()\"]+", masked) if normalize(t)]
        grams: list[tuple[int, int]] = [(i, j) for n in range(min(MAX_PLACE_WORDS, len(tokens)), 0, -1)
                                        for i in range(len(tokens) - n + 1) for j in [i + n]]
        grams = [(i, j) for i, j in grams
                 if not all(normalize(t) in STOPWORDS and not t.isupper() for t in tokens[i:j])]
        if not grams:
            return None
        texts = [" ".join(tokens[i:j]).rstrip(".") for i, j in grams]
        resolved = self.resolve_places(list(dict.fromkeys(texts)))
        # Proper nouns first (a capitalised first word), then longer phrases, then earlier ones.
        order = sorted(range(len(grams)), key=lambda k: (not tokens[grams[k][0]][:1].isupper(),
                                                         -(grams[k][1] - grams[k][0]), grams[k][0]))
        best = next((k for k in order if resolved.get(texts[k])), None)
        if best is None:
            return None
        place = resolved[texts[best]][0]
        i, j = grams[best]
        rest = [t for k, t in enumerate(tokens) if not i <= k < j]
        child_type = next((CHILD_WORDS[normalize(t)] for t in rest if normalize(t) in CHILD_WORDS), None)
        indicator_query = " ".join(rest)
        candidates = self.resolve_indicators([indicator_query]).get(indicator_query, [])
        if not candidates or candidates[0].score is None or candidates[0].score < self.threshold:
            return None
        return place, candidates[0].dcid, candidates[0].score, date, child_type

    def _facet_source(self, response: ObservationResponse, facet_id: str | None) -> tuple[SourceRef | None, str | None]:
        facet = response.facets.get(facet_id) if facet_id and response.facets else None
        if facet is None:
            return None, None
        source = SourceRef(name=facet.importName, url=facet.provenanceUrl) if facet.importName else None
        return source, facet.unit

    def point(self, query: str) -> PointResult | None:
        understood = self._understand(query)
        if understood is None:
            return None
        place, variable, score, date, child_type = understood
        if child_type:  # "the country in Africa with the highest ...": the top row of the ranking
            table = self.table(query)
            if table is None or not table.rows:
                return None
            _rank, place_name, row_date, value = table.rows[0]
            return PointResult(query=query, value=value, unit=table.unit, date=row_date, source=table.source,
                               title=f"{table.columns[-1]} in {place_name}", variable=variable,
                               variable_name=table.columns[-1], place=table.places[0], place_name=place_name,
                               score=score)
        response = self.observation(variable, [place], date=date or "LATEST")
        by_entity = response.byVariable.get(variable)
        facets = by_entity.byEntity.get(place) if by_entity else None
        if not facets or not facets.orderedFacets or not facets.orderedFacets[0].observations:
            return None
        facet = facets.orderedFacets[0]
        observation = facet.observations[-1]
        if observation.value is None:
            return None
        source, unit = self._facet_source(response, facet.facetId)
        names = self.names([place, variable])
        return PointResult(
            query=query, value=observation.value, unit=unit, date=observation.date, source=source,
            title=f"{names.get(variable, variable)} in {names.get(place, place)}", variable=variable,
            variable_name=names.get(variable), place=place, place_name=names.get(place), score=score)

    def table(self, query: str) -> TableResult | None:
        understood = self._understand(query)
        if understood is None:
            return None
        place, variable, score, date, child_type = understood
        if child_type:
            response = self.observation(variable, expression=f"{place}<-containedInPlace+{{typeOf:{child_type}}}",
                                        date=date or "LATEST")
        else:
            response = self.observation(variable, [place], date="")
        by_entity = response.byVariable.get(variable)
        if by_entity is None or not by_entity.byEntity:
            return None
        rows, facet_id = [], None
        for entity, facets in by_entity.byEntity.items():
            if facets.orderedFacets:
                facet_id = facet_id or facets.orderedFacets[0].facetId
                rows.extend((entity, o) for o in facets.orderedFacets[0].observations if o.value is not None)
        if not rows:
            return None
        source, unit = self._facet_source(response, facet_id)
        names = self.names(list(dict.fromkeys([variable, place, *(e for e, _ in rows)])))
        variable_name = names.get(variable, variable)
        if child_type:
            ascending = bool(set(normalize(query).split()) & RANK_ASCENDING)  # "lowest", "poorest", ...
            rows.sort(key=lambda r: r[1].value if ascending else -r[1].value)
            return TableResult(
                query=query, title=f"{variable_name} of places in {names.get(place, place)}", unit=unit,
                source=source, columns=["rank", "place", "date", variable_name],
                rows=[[str(k + 1), names.get(e, e), o.date, o.value] for k, (e, o) in enumerate(rows)],
                variables=[variable], places=[e for e, _ in rows], score=score)
        rows.sort(key=lambda r: r[1].date or "")
        return TableResult(
            query=query, title=f"{variable_name} in {names.get(place, place)}", unit=unit, source=source,
            columns=["date", variable_name], rows=[[o.date, o.value] for _, o in rows], variables=[variable],
            places=[place], score=score)
