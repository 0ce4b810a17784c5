"""Serve a statistics store over HTTP with the Data Commons JSON shapes.

Endpoints (GET, and POST with a JSON body for the ``/v2`` ones):

- ``/nodejs/query?q=...&mode=toolformer_rig|toolformer_rag`` -- the NL endpoint DataGemma calls. RIG mode
  answers a LINE chart (the series, ``highlight`` = the point value) or, for "highest ... in Africa",
  a HIGHLIGHT chart; RAG mode answers one chart whose ``dataCsv`` (also sent as ``data_csv``, the name
  DataGemma's reference client reads) is the table (LINE: ``date,<variable>``;
  BAR: ``place,date,<variable>``; RANKING: ``rank,place,date,<variable>``). ``debug.debug.sv_matching``
  carries the variable candidates and their scores. No data -> ``{"charts": [], "err": "..."}``.
- ``/v2/observation``, ``/v2/resolve`` (``<-description->dcid`` places, ``resolver: indicator``
  variables), ``/v2/node`` (``->name``, ``->[name, typeOf]``, ``->containedInPlace``,
  ``<-containedInPlace[+]{typeOf:X}``, ``->description``, ``->alternateName``, ``->``). Also under
  ``/core/api/v2`` (the path of custom Data Commons instances). The official ``datacommons-client``
  works with ``DataCommonsClient(url=f"{server.url}/v2")``.

Binds 127.0.0.1 by default. With ``api_key`` set, requests must carry it (``key``/``apikey`` parameter or
``X-API-Key`` header). Request logs never include query strings (they may hold keys).

FastAPI on uvicorn, hardened by :mod:`grounding.asgi`: request bodies are validated by the pydantic models
below (a wrongly typed field is a 400 naming the field), bounded in size and time, parsed without Python
recursion; every malformed request, down to one that is not HTTP, gets a 4xx JSON error
``{"code": <status>, "message": ...}``. :class:`StatsServer` holds the request logic, apart from HTTP.
"""

from __future__ import annotations

import hmac
import logging
import re
import zlib
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi import FastAPI, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .asgi import BackgroundServer, LimitedRequests, RequestLimits, hardened_protocol, run_server
from .resolver import CASE_SENSITIVE_ALIASES, LocalSource, Resolution
from .store import Observation, Place, StatStore, open_default_store
from .text import normalize, stem
from .types import PointResult, TableResult

__all__ = ["StatsServer", "RunningServer", "serve", "start_server", "create_app", "format_number",
           "NodeRequest", "ResolveRequest", "ObservationRequest", "RequestError", "RequestLimits"]

log = logging.getLogger("grounding.server")

V2_PREFIXES = ("/v2/", "/core/api/v2/")
MAX_LIST_ITEMS = 5000  # Data Commons caps an observation request at 5000 series
M = TypeVar("M", bound=BaseModel)
NODE_EXPRESSION = re.compile(r"^(->|<-)\s*(\[[^\]]*\]|[\w*]+)?(\+)?(?:\{typeOf:\s*(\w+)\})?$")
ENTITY_EXPRESSION = re.compile(r"^\s*([^<\s]+)\s*<-containedInPlace(\+)?(?:\{typeOf:\s*(\w+)\})?\s*$")
DESCRIPTION_EXPRESSION = re.compile(r"^<-description(?:\{typeOf:\s*(\w+)\})?->dcid$")


def format_number(value: float) -> str:
    """Shortest text that reads back as the same float ("35610177", "54.11")."""
    return str(int(value)) if value.is_integer() and abs(value) < 1e15 else repr(value)


def _csv_line(cells: list[Any]) -> str:
    out = []
    for cell in cells:
        text = format_number(cell) if isinstance(cell, float) else "" if cell is None else str(cell)
        if any(c in text for c in ',"\r\n'):
            text = '"' + text.replace('"', '""') + '"'
        out.append(text)
    return ",".join(out)


def _extras(attribution: str | None, projection: bool) -> dict[str, Any]:
    """Fields Data Commons does not send: the source's attribution line, and the projection flag."""
    return {**({"attribution": attribution} if attribution else {}), **({"projection": True} if projection else {})}


class RequestError(Exception):
    """A request this server cannot answer: ``status`` is the HTTP status (4xx), the message says why."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


# -- request bodies (POST JSON, or the same fields as GET parameters) ----------------------------------------
def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str) else value


Dcids = list[str]


class _Request(BaseModel):
    # Fields of Data Commons requests this server does not use (nextToken, filter ...) are ignored.
    model_config = ConfigDict(extra="ignore")


class NodeRequest(_Request):
    nodes: Dcids = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    property: str = Field("", max_length=1000)

    _one_or_many = field_validator("nodes", mode="before")(_as_list)


class ResolveRequest(_Request):
    nodes: list[str] = Field(default_factory=list, max_length=MAX_LIST_ITEMS)
    property: str | None = Field(None, max_length=1000)
    resolver: str | None = Field(None, max_length=100)

    _one_or_many = field_validator("nodes", mode="before")(_as_list)


class DcidSelection(_Request):
    dcids: Dcids = Field(default_factory=list, max_length=MAX_LIST_ITEMS)

    _one_or_many = field_validator("dcids", mode="before")(_as_list)


class EntitySelection(DcidSelection):
    expression: str | None = Field(None, max_length=1000)


class ObservationRequest(_Request):
    date: str = Field("", max_length=100)  # "LATEST", "" (every date) or a date
    variable: DcidSelection = Field(default_factory=DcidSelection)  # no dcids: which variables have data
    entity: EntitySelection = Field(default_factory=EntitySelection)
    select: list[str] | None = Field(None, max_length=10)

    @field_validator("date", mode="before")
    @classmethod
    def _no_date(cls, value: Any) -> Any:
        return "" if value is None else value


class StatsServer:
    """The request logic, independent of the HTTP plumbing (one instance per served store)."""

    def __init__(self, store: StatStore | None = None, threshold: float | None = None):
        self.source = LocalSource(store, **({} if threshold is None else {"threshold": threshold}))
        self.store = self.source.store
        self._gazetteer: dict[str, list[Place]] = {}
        for place in self.store.places():
            for alias in {normalize(a) for a in [place.name, place.dcid, *place.aliases]}:
                self._gazetteer.setdefault(alias, []).append(place)

    # ---- /nodejs/query --------------------------------------------------------------------------------

    def nl_query(self, query: str, mode: str) -> dict[str, Any]:
        if not query.strip():
            raise RequestError(400, "missing q: pass the question as ?q=...")
        resolution = self.source.resolve(query)
        debug = {"debug": {"sv_matching": {"SV": [c.dcid for c in resolution.candidates],
                                           "CosineScore": [c.score for c in resolution.candidates]},
                           "places": [p.dcid for p in resolution.places]}}
        if mode == "toolformer_rag":
            table = self.source.table(query)
            charts = [] if table is None else [self._table_chart(table, resolution)]
        else:
            point = self.source.point(query)
            charts = [] if point is None else [self._point_chart(point, resolution)]
        response: dict[str, Any] = {"charts": charts, "debug": debug}
        if not charts:
            response["err"] = resolution.problem or "no data for this place, variable and date"
        return response

    def _source_fields(self, source) -> dict[str, Any]:
        return {"srcs": [{"name": source.name, "url": source.url}] if source else []}

    def _point_chart(self, point: PointResult, resolution: Resolution) -> dict[str, Any]:
        if resolution.child_type:  # a ranking question answered by one place
            csv_text = "\r\n".join([_csv_line(["variable", "place", "value"]),
                                    _csv_line([point.variable_name, point.place_name, point.value])])
            chart_type = "HIGHLIGHT"
        else:
            series = self.store.series(point.place, point.variable)
            csv_text = "\r\n".join([_csv_line(["date", point.title])]
                                   + [_csv_line([o.date, o.value]) for o in series])
            chart_type = "LINE"
        chart = {"type": chart_type, "title": point.title, "unit": point.unit, "vars": [point.variable],
                 "places": [point.place], **self._source_fields(point.source),
                 "highlight": {"value": point.value, "date": point.date}, "dataCsv": csv_text}
        return {**chart, **_extras(point.attribution, point.projection)}

    def _table_chart(self, table: TableResult, resolution: Resolution) -> dict[str, Any]:
        if resolution.child_type:
            chart_type, place_type = "RANKING", resolution.child_type
        else:
            chart_type, place_type = ("BAR" if len(table.places) > 1 else "LINE"), None
        csv_text = "\r\n".join([_csv_line(table.columns)] + [_csv_line(row) for row in table.rows])
        chart = {"type": chart_type, "title": table.title, "unit": table.unit, "vars": table.variables,
                 "places": [resolution.places[0].dcid] if resolution.child_type else table.places,
                 **self._source_fields(table.source), "dataCsv": csv_text,
                 "data_csv": csv_text}  # the pre-Dec-2024 name, still read by DataGemma's reference client
        if place_type:
            chart["placeType"] = place_type
        return {**chart, **_extras(table.attribution, False)}

    # ---- /v2/node -------------------------------------------------------------------------------------

    def _descendants(self, parent: str, transitive: bool, place_type: str | None) -> list[Place]:
        if parent == "Earth":
            found = [p for p in self.store.places() if not p.parents or transitive]
        else:
            found, frontier, seen = [], [parent], {parent}
            while frontier:
                children = self.store.children(frontier.pop(0))
                for child in children:
                    if child.dcid not in seen:
                        seen.add(child.dcid)
                        found.append(child)
                        if transitive:
                            frontier.append(child.dcid)
        return [p for p in found if place_type is None or p.type == place_type]

    def _node_arcs(self, dcid: str, direction: str, prop: str, transitive: bool,
                   place_type: str | None) -> list[dict[str, Any]] | None:
        place = self.store.place(dcid)
        variable = self.store.variable(dcid)
        if direction == "<-":
            if prop == "containedInPlace" and (place is not None or dcid == "Earth"):
                return [{"dcid": p.dcid, "name": p.name, "types": [p.type]}
                        for p in self._descendants(dcid, transitive, place_type)]
            return None
        if place is not None:
            values = {
                "name": [{"value": place.name}],
                "typeOf": [{"dcid": place.type, "name": place.type, "types": ["Class"]}],
                "containedInPlace": [{"dcid": d, "name": p.name, "types": [p.type]}
                                     for d in place.parents if (p := self.store.place(d)) is not None],
                "alternateName": [{"value": a} for a in place.aliases],
            }
        elif variable is not None:
            values = {
                "name": [{"value": variable.name}],
                "typeOf": [{"dcid": "StatisticalVariable", "name": "StatisticalVariable", "types": ["Class"]}],
                "description": [{"value": variable.description}] if variable.description else [],
                "alternateName": [{"value": a} for a in variable.aliases],
            }
        elif dcid == "Earth":
            values = {"name": [{"value": "Earth"}], "typeOf": [{"dcid": "Place", "name": "Place", "types": ["Class"]}]}
        else:
            return None
        return values.get(prop) or None

    def node(self, nodes: list[str], expression: str) -> dict[str, Any]:
        match = NODE_EXPRESSION.match(expression.strip())
        if not nodes or not match:
            raise RequestError(400, f"unsupported node request: nodes={nodes!r} property={expression!r}; this "
                               f"server supports '->name', '->[name, typeOf]', '<-containedInPlace+{{typeOf:X}}'")
        direction, props, transitive, place_type = match.groups()
        data: dict[str, Any] = {}
        for dcid in nodes:
            if props is None:  # property labels
                labels = ["name", "typeOf", "containedInPlace", "alternateName"] if direction == "->" else \
                    ["containedInPlace"]
                data[dcid] = {"properties": labels} if self.store.place(dcid) or self.store.variable(dcid) else {}
                continue
            names = [p.strip() for p in props.strip("[]").split(",") if p.strip()]
            if names == ["*"]:
                names = ["name", "typeOf", "containedInPlace", "alternateName", "description"]
            arcs = {}
            for prop in names:
                found = self._node_arcs(dcid, direction, prop, bool(transitive), place_type)
                if found:  # Data Commons keys a transitive arc by its expression: "containedInPlace+"
                    arcs[prop + ("+" if transitive else "")] = {"nodes": found}
            data[dcid] = {"arcs": arcs} if arcs else {}
        return {"data": data}

    # ---- /v2/resolve ----------------------------------------------------------------------------------

    def resolve(self, nodes: list[str], expression: str | None, resolver: str | None) -> dict[str, Any]:
        if not nodes:
            raise RequestError(400, "resolve needs 'nodes': the names or queries to resolve")
        entities = []
        if resolver == "indicator":
            for text in nodes:
                matches = self.source.resolver.match_variables(normalize(text).split())
                entities.append({"node": text, "candidates": [
                    {"dcid": m.dcid, "metadata": {"score": f"{m.score:.4f}", "sentence": m.matched},
                     "typeOf": ["StatisticalVariable"]} for m in matches if m.score > 0]})
            return {"entities": entities}
        match = DESCRIPTION_EXPRESSION.match((expression or "").replace(" ", ""))
        if not match:
            raise RequestError(400, f"unsupported resolve property {expression!r}; this server supports "
                               "'<-description->dcid', '<-description{typeOf:Country}->dcid' and "
                               "resolver='indicator'")
        wanted_type = match.group(1)
        for text in nodes:
            key = normalize(text)
            if key in CASE_SENSITIVE_ALIASES and not text.strip(". ").isupper():
                key = ""  # "us" the pronoun is not "US"
            found = self._gazetteer.get(key) or self._gazetteer.get(stem(key), [])  # "Brazilians"
            places = [p for p in found if wanted_type in (None, p.type)]
            places.sort(key=lambda p: p.type != "Country")
            entities.append({"node": text, "candidates": [{"dcid": p.dcid, "dominantType": p.type} for p in places]})
        return {"entities": entities}

    # ---- /v2/observation ------------------------------------------------------------------------------

    def observation(self, body: ObservationRequest | dict[str, Any]) -> dict[str, Any]:
        """``/v2/observation``. Without variable dcids it answers which variables have data for the
        entities (as Data Commons does: ``byVariable -> byEntity -> {}``)."""
        if not isinstance(body, ObservationRequest):
            try:
                body = ObservationRequest.model_validate(body)
            except ValidationError as exc:
                raise RequestError(400, _problems(exc)) from None
        date = body.date
        select = body.select or ["date", "variable", "entity", "value"]
        if body.entity.dcids:
            entities = list(body.entity.dcids)
        elif body.entity.expression:
            match = ENTITY_EXPRESSION.match(body.entity.expression)
            if not match:
                raise RequestError(400, f"unsupported entity expression {body.entity.expression!r}; use "
                                   "'<parent><-containedInPlace+{typeOf:Country}'")
            parent, transitive, place_type = match.groups()
            entities = [p.dcid for p in self._descendants(parent, bool(transitive) or parent == "Earth", place_type)]
        else:
            raise RequestError(400, "observation needs entity.dcids or entity.expression")
        variables = list(body.variable.dcids) or sorted({v for e in entities for v in self.store.variables_with_data(e)})
        wants_values = "value" in select or "date" in select

        facets: dict[str, dict[str, Any]] = {}
        by_variable: dict[str, Any] = {}
        for variable in variables:
            by_entity: dict[str, Any] = {}
            for dcid in entities:
                series = self.store.series(dcid, variable)
                if date.upper() == "LATEST":
                    series = series[-1:]
                elif date:
                    series = [o for o in series if o.date == date]
                if not series:
                    continue
                if not wants_values and "facet" not in select:
                    by_entity[dcid] = {}  # existence only
                    continue
                facet_id = self._facet(series[-1], facets)
                ordered = {"facetId": facet_id, "obsCount": len(series), "earliestDate": series[0].date,
                           "latestDate": series[-1].date}
                if wants_values:
                    ordered["observations"] = [{"date": o.date, "value": o.value} for o in series]
                by_entity[dcid] = {"orderedFacets": [ordered]}
            if by_entity or body.variable.dcids:
                by_variable[variable] = {"byEntity": by_entity}
        response: dict[str, Any] = {"byVariable": by_variable}
        if "facet" in select or "value" in select:
            response["facets"] = facets
        return response

    def _facet(self, observation: Observation, facets: dict[str, dict[str, Any]]) -> str:
        facet_id = str(zlib.crc32(f"{observation.source}|{observation.unit}".encode()))
        if facet_id not in facets:
            source = self.store.source(observation.source)
            facet = {"importName": observation.source or "local"}
            if source is not None and source.url:
                facet["provenanceUrl"] = source.url
            if observation.unit:
                facet["unit"] = observation.unit
            facets[facet_id] = facet
        return facet_id


def _list_param(params, name: str) -> list[str]:
    """A repeated query parameter (``?nodes=a&nodes=b``); values are not split (names can hold commas)."""
    return [value for value in params.getlist(name) if value.strip()]


def _first_param(params, name: str, default: str | None = None) -> str | None:
    values = params.getlist(name)
    return values[0] if values else default


def _node_request(params) -> dict[str, Any]:
    return {"nodes": _list_param(params, "nodes"), "property": _first_param(params, "property", "")}


def _resolve_request(params) -> dict[str, Any]:
    return {"nodes": _list_param(params, "nodes"), "property": _first_param(params, "property"),
            "resolver": _first_param(params, "resolver")}


def _observation_request(params) -> dict[str, Any]:
    return {"date": _first_param(params, "date", ""), "variable": {"dcids": _list_param(params, "variable.dcids")},
            "entity": {"dcids": _list_param(params, "entity.dcids"),
                       "expression": _first_param(params, "entity.expression")},
            "select": _list_param(params, "select") or None}


def _error_document(status: int, kind: str, message: str) -> dict[str, Any]:
    """Errors in the shape this server always used: ``{"code": <HTTP status>, "message": ...}``."""
    return {"code": status, "message": message}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse(_error_document(status, "", message), status_code=status)


def create_app(stats: StatsServer, *, api_key: str | None = None) -> FastAPI:
    """The HTTP face of ``stats``: routes, API-key check, request models, JSON errors. Request bodies are
    bounded by :class:`grounding.asgi.LimitedRequests` (see :func:`start_server`)."""
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None, redirect_slashes=False)

    def authorized(request: Request) -> bool:
        if not api_key:
            return True
        params = request.query_params
        given = request.headers.get("X-API-Key") or _first_param(params, "key") or _first_param(params, "apikey", "")
        return hmac.compare_digest(given.encode(), api_key.encode())

    async def answer(request: Request, handle: Callable[[Any, bytes], dict[str, Any]]) -> JSONResponse:
        log.debug("%s %s", request.method, request.url.path)  # never the query string: it may hold a key
        if not authorized(request):
            return _error(401, "missing or wrong API key: pass key=... or the X-API-Key header")
        body = await request.body() if request.method == "POST" else b""
        try:
            return JSONResponse(await run_in_threadpool(handle, request.query_params, body))
        except RequestError as exc:
            return _error(exc.status, str(exc))

    def parsed(model: type[M], body: bytes, from_params: dict[str, Any]) -> M:
        try:
            return model.model_validate_json(body) if body.strip() else model.model_validate(from_params)
        except ValidationError as exc:
            raise RequestError(400, _problems(exc)) from None

    def nl_query(params, body: bytes) -> dict[str, Any]:
        return stats.nl_query(_first_param(params, "q", ""), _first_param(params, "mode", "toolformer_rig"))

    def node(params, body: bytes) -> dict[str, Any]:
        request = parsed(NodeRequest, body, _node_request(params))
        return stats.node(request.nodes, request.property)

    def resolve(params, body: bytes) -> dict[str, Any]:
        request = parsed(ResolveRequest, body, _resolve_request(params))
        return stats.resolve(request.nodes, request.property, request.resolver)

    def observation(params, body: bytes) -> dict[str, Any]:
        return stats.observation(parsed(ObservationRequest, body, _observation_request(params)))

    def endpoint(handle):
        async def run(request: Request) -> JSONResponse:
            return await answer(request, handle)

        return run

    routes = {"/nodejs/query": nl_query, **{f"{prefix}{name}": handle for prefix in V2_PREFIXES for name, handle in
                                            (("node", node), ("resolve", resolve), ("observation", observation))}}
    for path, handle in routes.items():
        for variant in (path, path + "/"):  # answered alike, never redirected
            app.add_api_route(variant, endpoint(handle), methods=["GET", "POST"])

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        if exc.status_code == 404:
            return _error(404, f"no endpoint at {request.url.path}; this server has /nodejs/query, "
                               "/v2/observation, /v2/resolve and /v2/node")
        if exc.status_code == 405:
            return _error(405, f"method {request.method} is not allowed here; use GET or POST")
        return _error(exc.status_code, str(exc.detail))

    @app.exception_handler(Exception)
    async def unexpected_error(request: Request, exc: Exception):  # a bug: the client still gets JSON
        log.error("error answering %s", request.url.path, exc_info=exc)
        return _error(500, "internal error")

    return app


def _problems(exc: ValidationError) -> str:
    """``variable.dcids: Input should be a valid list; ...`` (field paths, never the input values)."""
    return "invalid request: " + "; ".join(
        f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5])


def _wrap(app: FastAPI, limits: RequestLimits) -> LimitedRequests:
    return LimitedRequests(app, limits=limits, render_error=_error_document)


class RunningServer:
    """A server answering in a background thread. ``url`` is its root; ``rest_url`` = ``url + "/v2"``."""

    def __init__(self, server: BackgroundServer):
        self._server = server
        self.host, self.port = server.host, server.port
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.url = f"http://{host}:{self.port}"
        self.rest_url = f"{self.url}/v2"

    def __repr__(self) -> str:
        return f"RunningServer({self.url!r})"

    def stop(self) -> None:
        self._server.stop()

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _make(store: StatStore | None, api_key: str | None, threshold: float | None, limits: RequestLimits | None):
    limits = limits or RequestLimits()
    stats = StatsServer(store if store is not None else open_default_store(), threshold)
    protocol = hardened_protocol(_error_document, limits)
    return _wrap(create_app(stats, api_key=api_key), limits), protocol


def start_server(store: StatStore | None = None, host: str = "127.0.0.1", port: int = 0, *,
                 api_key: str | None = None, threshold: float | None = None,
                 limits: RequestLimits | None = None) -> RunningServer:
    """Serve ``store`` (default: the shipped data) in a daemon thread; ``port=0`` picks a free port.
    ``limits`` bounds request bodies (size, time) and heads (time); see :class:`grounding.asgi.RequestLimits`."""
    app, protocol = _make(store, api_key, threshold, limits)
    return RunningServer(BackgroundServer(app, host, port, protocol=protocol, name="stats-server"))


def serve(store: StatStore | None = None, host: str = "127.0.0.1", port: int = 8080, *,
          api_key: str | None = None, threshold: float | None = None, limits: RequestLimits | None = None) -> None:
    """Serve ``store`` until interrupted (Ctrl-C). ``gemma-ground serve-stats`` calls this."""
    app, protocol = _make(store, api_key, threshold, limits)
    log.info("serving statistics on http://%s:%d (/nodejs/query, /v2/observation, /v2/resolve, /v2/node)",
             host, port)
    run_server(app, host, port, protocol=protocol)
