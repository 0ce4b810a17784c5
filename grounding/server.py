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
"""

from __future__ import annotations

import hmac
import json
import logging
import re
import threading
import zlib
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit

from .resolver import CASE_SENSITIVE_ALIASES, LocalSource, Resolution
from .store import Observation, Place, StatStore, open_default_store
from .text import normalize, stem
from .types import PointResult, TableResult

__all__ = ["StatsServer", "RunningServer", "serve", "start_server", "format_number"]

log = logging.getLogger("grounding.server")

V2_PREFIXES = ("/v2/", "/core/api/v2/")
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
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


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

    def observation(self, body: dict[str, Any]) -> dict[str, Any]:
        variables = (body.get("variable") or {}).get("dcids") or []
        entity = body.get("entity") or {}
        date = str(body.get("date") or "")
        select = body.get("select") or ["date", "variable", "entity", "value"]
        if isinstance(variables, str):
            variables = [variables]
        if not variables:
            raise RequestError(400, "observation needs variable.dcids")
        if entity.get("dcids"):
            entities = [entity["dcids"]] if isinstance(entity["dcids"], str) else list(entity["dcids"])
        elif entity.get("expression"):
            match = ENTITY_EXPRESSION.match(entity["expression"])
            if not match:
                raise RequestError(400, f"unsupported entity expression {entity['expression']!r}; use "
                                   "'<parent><-containedInPlace+{typeOf:Country}'")
            parent, transitive, place_type = match.groups()
            entities = [p.dcid for p in self._descendants(parent, bool(transitive) or parent == "Earth", place_type)]
        else:
            raise RequestError(400, "observation needs entity.dcids or entity.expression")

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
                facet_id = self._facet(series[-1], facets)
                ordered = {"facetId": facet_id, "obsCount": len(series), "earliestDate": series[0].date,
                           "latestDate": series[-1].date}
                if "value" in select or "date" in select:
                    ordered["observations"] = [{"date": o.date, "value": o.value} for o in series]
                by_entity[dcid] = {"orderedFacets": [ordered]}
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


def _list_param(params: dict[str, list[str]], name: str) -> list[str]:
    """A repeated query parameter (``?nodes=a&nodes=b``); values are not split (names can hold commas)."""
    return [value for value in params.get(name, []) if value.strip()]


class _Handler(BaseHTTPRequestHandler):
    server: _HTTPServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (stdlib signature)
        # The request line can hold an API key: log the path only.
        log.debug("%s %s -> %s", self.command, urlsplit(self.path).path, args[1] if len(args) > 1 else "")

    def _send(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self, params: dict[str, list[str]]) -> bool:
        expected = self.server.api_key
        if not expected:
            return True
        given = self.headers.get("X-API-Key") or (params.get("key") or params.get("apikey") or [""])[0]
        return hmac.compare_digest(given.encode(), expected.encode())

    def _handle(self, body: dict[str, Any] | None) -> None:
        url = urlsplit(self.path)
        params = parse_qs(url.query, keep_blank_values=True)
        app: StatsServer = self.server.app
        try:
            if not self._authorized(params):
                raise RequestError(401, "missing or wrong API key: pass key=... or the X-API-Key header")
            path = url.path.rstrip("/")
            if path == "/nodejs/query":
                query = (params.get("q") or [""])[0]
                mode = (params.get("mode") or ["toolformer_rig"])[0]
                self._send(200, app.nl_query(query, mode))
                return
            prefix = next((p for p in V2_PREFIXES if url.path.startswith(p)), None)
            endpoint = url.path[len(prefix):].strip("/") if prefix else None
            body = body or {}
            if endpoint == "node":
                nodes = body.get("nodes") or _list_param(params, "nodes")
                self._send(200, app.node([nodes] if isinstance(nodes, str) else nodes,
                                         body.get("property") or (params.get("property") or [""])[0]))
            elif endpoint == "resolve":
                nodes = body.get("nodes") or _list_param(params, "nodes")
                self._send(200, app.resolve([nodes] if isinstance(nodes, str) else nodes,
                                            body.get("property") or (params.get("property") or [None])[0],
                                            body.get("resolver") or (params.get("resolver") or [None])[0]))
            elif endpoint == "observation":
                if not body:
                    body = {"date": (params.get("date") or [""])[0],
                            "variable": {"dcids": _list_param(params, "variable.dcids")},
                            "entity": {"dcids": _list_param(params, "entity.dcids"),
                                       "expression": (params.get("entity.expression") or [None])[0]},
                            "select": _list_param(params, "select") or None}
                self._send(200, app.observation(body))
            else:
                raise RequestError(404, f"no endpoint at {url.path}; this server has /nodejs/query, "
                                        "/v2/observation, /v2/resolve and /v2/node")
        except RequestError as exc:
            self._send(exc.status, {"code": exc.status, "message": str(exc)})
        except Exception:  # a bug must not kill the server thread; the client gets a 500
            log.exception("error answering %s", url.path)
            self._send(500, {"code": 500, "message": "internal error"})

    def do_GET(self) -> None:  # noqa: N802 (stdlib name)
        self._handle(None)

    def do_POST(self) -> None:  # noqa: N802 (stdlib name)
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        try:
            body = json.loads(raw) if raw else {}
            if not isinstance(body, dict):
                raise ValueError("not an object")
        except ValueError:
            self._send(400, {"code": 400, "message": "the request body must be a JSON object"})
            return
        self._handle(body)


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address: tuple[str, int], app: StatsServer, api_key: str | None):
        super().__init__(address, _Handler)
        self.app = app
        self.api_key = api_key


class RunningServer:
    """A server answering in a background thread. ``url`` is its root; ``rest_url`` = ``url + "/v2"``."""

    def __init__(self, httpd: _HTTPServer, thread: threading.Thread):
        self._httpd = httpd
        self._thread = thread
        host, port = httpd.server_address[:2]
        self.host, self.port = host, port
        self.url = f"http://{host}:{port}"
        self.rest_url = f"{self.url}/v2"

    def __repr__(self) -> str:
        return f"RunningServer({self.url!r})"

    def stop(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> RunningServer:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.stop()


def _make(store: StatStore | None, host: str, port: int, api_key: str | None, threshold: float | None) -> _HTTPServer:
    return _HTTPServer((host, port), StatsServer(store if store is not None else open_default_store(), threshold),
                       api_key)


def start_server(store: StatStore | None = None, host: str = "127.0.0.1", port: int = 0, *,
                 api_key: str | None = None, threshold: float | None = None) -> RunningServer:
    """Serve ``store`` (default: the shipped data) in a daemon thread; ``port=0`` picks a free port."""
    httpd = _make(store, host, port, api_key, threshold)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              name=f"stats-server-{httpd.server_address[1]}",
                              daemon=True)
    thread.start()
    return RunningServer(httpd, thread)


def serve(store: StatStore | None = None, host: str = "127.0.0.1", port: int = 8080, *,
          api_key: str | None = None, threshold: float | None = None) -> None:
    """Serve ``store`` until interrupted (Ctrl-C). ``gemma-ground serve-stats`` calls this."""
    httpd = _make(store, host, port, api_key, threshold)
    log.info("serving statistics on http://%s:%d (/nodejs/query, /v2/observation, /v2/resolve, /v2/node)",
             host, httpd.server_address[1])
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()
