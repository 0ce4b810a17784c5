"""Embedded statistics store: SQLite holding observations, variable metadata and place metadata.

Import format (Data Commons custom-import shape, one file each, header row required):

- observations: ``entity,variable,date,value[,unit][,source]`` (extra columns are an error);
- variables:    ``dcid,name[,description][,unit][,aliases]``;
- places:       ``dcid,name,type[,parent][,aliases]``.

``aliases`` and ``parent`` hold several values separated by ``;``. An import is all-or-nothing: every
row is checked first, and if any is bad a :class:`StoreImportError` lists each bad row as
``file:line: problem`` and the store is left exactly as it was.

The store is safe to share between threads (one connection behind a lock): the HTTP server answers
requests from several threads.
"""

from __future__ import annotations

import csv
import io
import json
import math
import sqlite3
import threading
from collections.abc import Iterable
from functools import lru_cache
from pathlib import Path
from typing import Protocol

from pydantic import BaseModel, Field

from .types import GroundingError

__all__ = [
    "Store", "StoreImportError", "RowProblem", "Variable", "Place", "Observation", "DataSource",
    "open_default_store", "open_gapminder_store", "open_store", "StatStore", "DEFAULT_DATA_DIR",
    "DEFAULT_STORE_PATH",
]

DEFAULT_DATA_DIR = Path(__file__).resolve().parent / "data"
# The default store: Gapminder's Systema Globalis and the gapminder excerpt, packed (grounding.packed_store),
# built by grounding/data/build_default_store.py.
DEFAULT_STORE_PATH = DEFAULT_DATA_DIR / "default_store.sqlite"

OBSERVATION_COLUMNS = ("entity", "variable", "date", "value", "unit", "source")
VARIABLE_COLUMNS = ("dcid", "name", "description", "unit", "aliases")
PLACE_COLUMNS = ("dcid", "name", "type", "parent", "aliases")
REQUIRED = {
    "observations": ("entity", "variable", "date", "value"),
    "variables": ("dcid", "name"),
    "places": ("dcid", "name", "type"),
}

SCHEMA = """
CREATE TABLE IF NOT EXISTS variables (
    dcid TEXT PRIMARY KEY, name TEXT NOT NULL, description TEXT NOT NULL DEFAULT '',
    unit TEXT NOT NULL DEFAULT '', aliases TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS places (
    dcid TEXT PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL,
    parents TEXT NOT NULL DEFAULT '[]', aliases TEXT NOT NULL DEFAULT '[]');
CREATE TABLE IF NOT EXISTS place_parents (
    child TEXT NOT NULL, parent TEXT NOT NULL, PRIMARY KEY (child, parent));
CREATE TABLE IF NOT EXISTS sources (name TEXT PRIMARY KEY, url TEXT);
CREATE TABLE IF NOT EXISTS observations (
    entity TEXT NOT NULL, variable TEXT NOT NULL, date TEXT NOT NULL, value REAL NOT NULL,
    unit TEXT NOT NULL DEFAULT '', source TEXT NOT NULL DEFAULT '',
    PRIMARY KEY (entity, variable, date, source));
CREATE INDEX IF NOT EXISTS observations_by_variable ON observations (variable, date);
CREATE INDEX IF NOT EXISTS parents_by_parent ON place_parents (parent);
"""


class Variable(BaseModel):
    dcid: str
    name: str
    description: str = ""
    unit: str = ""  # "" = none
    aliases: list[str] = Field(default_factory=list)
    short_name: str = ""
    unit_basis: str = ""  # where the unit came from ("format: percent", "name: ...", "none stated in the data")
    source: str = ""  # the source of its values (a name in the store's sources)
    source_url: str = ""
    tags: list[str] = Field(default_factory=list)
    dataset: str = ""  # the data set it belongs to ("gapminder", "systema_globalis", ...)


class Place(BaseModel):
    dcid: str
    name: str
    type: str
    parents: list[str] = Field(default_factory=list)
    aliases: list[str] = Field(default_factory=list)
    iso_alpha2: str = ""  # ISO 3166-1 codes, when the place has them
    iso_alpha3: str = ""
    iso_numeric: str = ""
    names: dict[str, str] = Field(default_factory=dict)  # language tag -> name ("fr-FR": "Allemagne")


class Observation(BaseModel):
    entity: str
    variable: str
    date: str
    value: float
    unit: str = ""
    source: str = ""
    projection: bool = False  # a projected value (a year after the last observed one), not an observation


class DataSource(BaseModel):
    name: str
    url: str | None = None
    licence: str = ""
    attribution: str = ""  # the line to show with every number from this source


class RowProblem(BaseModel):
    file: str
    line: int  # 1-based line number in the file (the header is line 1)
    message: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.message}"


class StoreImportError(GroundingError):
    """An import was rejected; ``problems`` lists every bad row. Nothing was imported."""

    def __init__(self, problems: list[RowProblem]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:50])
        more = f"\n  ... and {len(problems) - 50} more" if len(problems) > 50 else ""
        super().__init__(f"import rejected, nothing was imported ({len(problems)} bad rows); fix these rows "
                         f"and import again:\n{shown}{more}")


def _split_list(text: str | None) -> list[str]:
    return [part.strip() for part in (text or "").split(";") if part.strip()]


def _read_rows(source: str | Path | io.TextIOBase, kind: str, allowed: tuple[str, ...],
               problems: list[RowProblem]) -> tuple[str, list[tuple[int, dict[str, str]]]]:
    """Read a CSV (path, text stream) into (file label, [(line number, row)]); header problems are recorded."""
    if isinstance(source, (str, Path)):
        label = str(source)
        try:
            text = Path(source).read_text(encoding="utf-8-sig")
        except OSError as exc:
            problems.append(RowProblem(file=label, line=0, message=f"cannot read {kind} file: {exc.strerror}"))
            return label, []
        except UnicodeDecodeError:
            problems.append(RowProblem(file=label, line=0, message=f"{kind} file is not UTF-8 text"))
            return label, []
    else:
        label = getattr(source, "name", f"<{kind}>")
        text = source.read()
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        problems.append(RowProblem(file=label, line=1, message=f"empty {kind} file: a header row is required"))
        return label, []
    missing = [c for c in REQUIRED[kind] if c not in header]
    unknown = [c for c in header if c not in allowed]
    if missing or unknown:
        parts = []
        if missing:
            parts.append(f"missing columns {missing}")
        if unknown:
            parts.append(f"unknown columns {unknown}")
        problems.append(RowProblem(file=label, line=1, message=f"bad {kind} header ({'; '.join(parts)}); "
                                   f"expected columns {list(allowed)}"))
        return label, []
    rows = []
    for values in reader:
        line = reader.line_num
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            problems.append(RowProblem(file=label, line=line,
                                       message=f"{len(values)} fields where the header has {len(header)}"))
            continue
        rows.append((line, {h: v.strip() for h, v in zip(header, values, strict=True)}))
    return label, rows


class Store:
    """A SQLite statistics store. ``path=":memory:"`` (default) keeps it in memory."""

    def __init__(self, path: str | Path = ":memory:"):
        self.path = str(path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False)
        self._db.executescript(SCHEMA)
        self._db.commit()
        # metadata is small and read on every question: cached, dropped by each import
        self._variables_cache: list[Variable] | None = None
        self._places_cache: list[Place] | None = None

    def __repr__(self) -> str:
        return f"Store({self.path!r}, observations={self.count_observations()})"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # ---- import -------------------------------------------------------------------------------------

    def import_csv(self, observations: str | Path | io.TextIOBase | None = None, *,
                   variables: str | Path | io.TextIOBase | None = None,
                   places: str | Path | io.TextIOBase | None = None,
                   sources: dict[str, str | None] | None = None) -> int:
        """Import the given files in one transaction; returns the number of observations added.

        Every row of every file is validated before anything is written: values must be finite numbers,
        dates ISO-like (``YYYY``, ``YYYY-MM`` or ``YYYY-MM-DD``), and each observation's entity and
        variable must be known (in the store already or in the files of this import).
        """
        problems: list[RowProblem] = []
        variable_rows = place_rows = observation_rows = []
        if variables is not None:
            variables_label, variable_rows = _read_rows(variables, "variables", VARIABLE_COLUMNS, problems)
        if places is not None:
            places_label, place_rows = _read_rows(places, "places", PLACE_COLUMNS, problems)
        if observations is not None:
            observations_label, observation_rows = _read_rows(observations, "observations",
                                                              OBSERVATION_COLUMNS, problems)

        new_variables: dict[str, Variable] = {}
        for line, row in variable_rows:
            if not row["dcid"] or not row["name"]:
                problems.append(RowProblem(file=variables_label, line=line, message="dcid and name must not be empty"))
                continue
            if row["dcid"] in new_variables:
                problems.append(RowProblem(file=variables_label, line=line,
                                           message=f"variable {row['dcid']!r} listed twice"))
                continue
            new_variables[row["dcid"]] = Variable(
                dcid=row["dcid"], name=row["name"], description=row.get("description", ""),
                unit=row.get("unit", ""), aliases=_split_list(row.get("aliases")))

        new_places: dict[str, Place] = {}
        for line, row in place_rows:
            if not row["dcid"] or not row["name"] or not row["type"]:
                problems.append(RowProblem(file=places_label, line=line,
                                           message="dcid, name and type must not be empty"))
                continue
            if row["dcid"] in new_places:
                problems.append(RowProblem(file=places_label, line=line, message=f"place {row['dcid']!r} listed twice"))
                continue
            new_places[row["dcid"]] = Place(dcid=row["dcid"], name=row["name"], type=row["type"],
                                            parents=_split_list(row.get("parent")),
                                            aliases=_split_list(row.get("aliases")))

        known_variables = set(new_variables) | self._dcids("variables")
        known_places = set(new_places) | self._dcids("places")
        for line, row in place_rows:
            for parent in _split_list(row.get("parent")):
                if parent not in known_places:
                    problems.append(RowProblem(file=places_label, line=line,
                                               message=f"parent place {parent!r} is not a known place"))

        new_observations: list[Observation] = []
        seen: set[tuple[str, str, str, str]] = set()
        for line, row in observation_rows:
            row_problems = []
            if row["entity"] not in known_places:
                row_problems.append(f"unknown entity {row['entity']!r} (add it to the places file)")
            if row["variable"] not in known_variables:
                row_problems.append(f"unknown variable {row['variable']!r} (add it to the variables file)")
            if not _is_iso_date(row["date"]):
                row_problems.append(f"bad date {row['date']!r} (use YYYY, YYYY-MM or YYYY-MM-DD)")
            try:
                value = float(row["value"])
                if not math.isfinite(value):
                    raise ValueError
            except ValueError:
                row_problems.append(f"value {row['value']!r} is not a finite number")
                value = math.nan
            key = (row["entity"], row["variable"], row["date"], row.get("source", ""))
            if key in seen:
                row_problems.append("duplicate observation (same entity, variable, date and source)")
            seen.add(key)
            if row_problems:
                problems.append(RowProblem(file=observations_label, line=line, message="; ".join(row_problems)))
                continue
            new_observations.append(Observation(entity=row["entity"], variable=row["variable"], date=row["date"],
                                                value=value, unit=row.get("unit", ""),
                                                source=row.get("source", "")))
        if problems:
            file_order = list(dict.fromkeys(p.file for p in problems))
            raise StoreImportError(sorted(problems, key=lambda p: (file_order.index(p.file), p.line)))

        with self._lock:
            try:
                with self._db:  # one transaction: commit on success, roll back on any error
                    self._db.executemany(
                        "INSERT OR REPLACE INTO variables VALUES (?, ?, ?, ?, ?)",
                        [(v.dcid, v.name, v.description, v.unit, json.dumps(v.aliases))
                         for v in new_variables.values()])
                    self._db.executemany(
                        "INSERT OR REPLACE INTO places VALUES (?, ?, ?, ?, ?)",
                        [(p.dcid, p.name, p.type, json.dumps(p.parents), json.dumps(p.aliases))
                         for p in new_places.values()])
                    self._db.executemany("DELETE FROM place_parents WHERE child = ?", [(d,) for d in new_places])
                    self._db.executemany("INSERT INTO place_parents VALUES (?, ?)",
                                         [(p.dcid, parent) for p in new_places.values() for parent in p.parents])
                    self._db.executemany("INSERT OR REPLACE INTO sources VALUES (?, ?)",
                                         list((sources or {}).items()))
                    self._db.executemany(
                        "INSERT INTO observations VALUES (?, ?, ?, ?, ?, ?)",
                        [(o.entity, o.variable, o.date, o.value, o.unit, o.source) for o in new_observations])
            except sqlite3.IntegrityError as exc:
                raise StoreImportError([RowProblem(
                    file=observations_label, line=0,
                    message=f"observation already in the store ({exc}); remove it from the file or use a new store")
                ]) from exc
        self._cache_clear()
        return len(new_observations)

    def _dcids(self, table: str) -> set[str]:
        with self._lock:
            return {r[0] for r in self._db.execute(f"SELECT dcid FROM {table}")}  # noqa: S608 (fixed names)

    # ---- metadata -------------------------------------------------------------------------------------

    def _cache_clear(self) -> None:
        self._variables_cache = None
        self._places_cache = None

    def variables(self) -> list[Variable]:
        if self._variables_cache is None:
            with self._lock:
                rows = self._db.execute("SELECT dcid, name, description, unit, aliases FROM variables "
                                        "ORDER BY dcid").fetchall()
            self._variables_cache = [Variable(dcid=r[0], name=r[1], description=r[2], unit=r[3],
                                              aliases=json.loads(r[4])) for r in rows]
        return self._variables_cache

    def places(self) -> list[Place]:
        if self._places_cache is None:
            with self._lock:
                rows = self._db.execute("SELECT dcid, name, type, parents, aliases FROM places "
                                        "ORDER BY dcid").fetchall()
            self._places_cache = [Place(dcid=r[0], name=r[1], type=r[2], parents=json.loads(r[3]),
                                        aliases=json.loads(r[4])) for r in rows]
        return self._places_cache

    def variable(self, dcid: str) -> Variable | None:
        return next((v for v in self.variables() if v.dcid == dcid), None)

    def place(self, dcid: str) -> Place | None:
        return next((p for p in self.places() if p.dcid == dcid), None)

    def source(self, name: str) -> DataSource | None:
        with self._lock:
            row = self._db.execute("SELECT name, url FROM sources WHERE name = ?", (name,)).fetchone()
        if row is None:
            return DataSource(name=name) if name else None
        return DataSource(name=row[0], url=row[1])

    def children(self, parent: str, place_type: str | None = None) -> list[Place]:
        """Places directly contained in ``parent`` (optionally of one type), by name."""
        with self._lock:
            dcids = {r[0] for r in self._db.execute("SELECT child FROM place_parents WHERE parent = ?", (parent,))}
        found = [p for p in self.places() if p.dcid in dcids and (place_type is None or p.type == place_type)]
        return sorted(found, key=lambda p: p.name)

    # ---- observations ---------------------------------------------------------------------------------

    def count_observations(self) -> int:
        with self._lock:
            return self._db.execute("SELECT COUNT(*) FROM observations").fetchone()[0]

    def series(self, entity: str, variable: str, *, projections: bool = False) -> list[Observation]:
        """All observations of one variable for one place, oldest first (one per date: first source).

        Imported stores hold observations only, so ``projections`` changes nothing here."""
        with self._lock:
            rows = self._db.execute(
                "SELECT entity, variable, date, value, unit, source FROM observations "
                "WHERE entity = ? AND variable = ? ORDER BY date, source", (entity, variable)).fetchall()
        by_date: dict[str, Observation] = {}
        for r in rows:
            by_date.setdefault(r[2], Observation(entity=r[0], variable=r[1], date=r[2], value=r[3], unit=r[4],
                                                 source=r[5]))
        return list(by_date.values())

    def observation(self, entity: str, variable: str, date: str | None = None) -> Observation | None:
        """The observation at ``date``, or the latest one when ``date`` is None; None when there is none."""
        series = self.series(entity, variable)
        if date is None:
            return series[-1] if series else None
        return next((o for o in series if o.date == date), None)

    def dates(self, variable: str, entities: Iterable[str] | None = None) -> list[str]:
        """Dates with observations of ``variable`` (for any of ``entities`` when given), oldest first."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT entity, date FROM observations WHERE variable = ?",
                                    (variable,)).fetchall()
        wanted = None if entities is None else set(entities)
        return sorted({d for e, d in rows if wanted is None or e in wanted})

    def variables_with_data(self, entity: str) -> list[str]:
        with self._lock:
            return [r[0] for r in self._db.execute(
                "SELECT DISTINCT variable FROM observations WHERE entity = ? ORDER BY variable", (entity,))]

    def coverage(self, variable: str) -> int:
        """How many places have observations of ``variable``."""
        with self._lock:
            return self._db.execute("SELECT COUNT(DISTINCT entity) FROM observations WHERE variable = ?",
                                    (variable,)).fetchone()[0]

    def has_data(self, entity: str, variable: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM observations WHERE entity = ? AND variable = ? LIMIT 1",
                                    (entity, variable)).fetchone() is not None



def _is_iso_date(text: str) -> bool:
    parts = text.split("-")
    if not 1 <= len(parts) <= 3 or len(parts[0]) != 4 or not all(p.isdigit() for p in parts):
        return False
    return all(len(p) == 2 for p in parts[1:])


class StatStore(Protocol):
    """What the resolver, the server and the answers read from a store (:class:`Store` and
    :class:`~grounding.packed_store.PackedStore` both provide it)."""

    path: str

    def variables(self) -> list[Variable]: ...
    def places(self) -> list[Place]: ...
    def variable(self, dcid: str) -> Variable | None: ...
    def place(self, dcid: str) -> Place | None: ...
    def source(self, name: str) -> DataSource | None: ...
    def children(self, parent: str, place_type: str | None = None) -> list[Place]: ...
    def count_observations(self) -> int: ...
    def series(self, entity: str, variable: str, *, projections: bool = False) -> list[Observation]: ...
    def observation(self, entity: str, variable: str, date: str | None = None) -> Observation | None: ...
    def dates(self, variable: str, entities: Iterable[str] | None = None) -> list[str]: ...
    def variables_with_data(self, entity: str) -> list[str]: ...
    def has_data(self, entity: str, variable: str) -> bool: ...


@lru_cache(maxsize=1)
def _gapminder_store() -> Store:
    store = Store()
    provenance = json.loads((DEFAULT_DATA_DIR / "provenance.json").read_text(encoding="utf-8"))
    source = provenance["source"]
    store.import_csv(DEFAULT_DATA_DIR / "observations.csv", variables=DEFAULT_DATA_DIR / "variables.csv",
                     places=DEFAULT_DATA_DIR / "places.csv", sources={source["name"]: source["url"]})
    return store


def open_gapminder_store() -> Store:
    """The gapminder excerpt alone (3 variables, 142 countries, 1952-2007; built by
    ``grounding/data/build_gapminder.py``), imported into memory, shared. The default store holds it too."""
    return _gapminder_store()


@lru_cache(maxsize=1)
def _default_store():
    from .packed_store import PackedStore

    return PackedStore(DEFAULT_STORE_PATH)


def open_default_store():
    """The shipped default store (:data:`DEFAULT_STORE_PATH`: Systema Globalis and the gapminder excerpt),
    opened read-only, shared."""
    return _default_store()


def open_store(path: str | Path):
    """A store file: a packed store (read-only) or an importable SQLite store; a missing, truncated or
    foreign file raises :class:`~grounding.packed_store.StoreFormatError` naming it."""
    from .packed_store import PackedStore, StoreFormatError, _check_complete, is_packed_store

    path = Path(path)
    if not path.is_file():
        raise StoreFormatError(f"{path}: no such store file (build one with python -m grounding.store)")
    _check_complete(path)
    if is_packed_store(path):
        return PackedStore(path)
    try:
        store = Store(path)
        store.count_observations()
    except sqlite3.Error as exc:
        raise StoreFormatError(f"{path}: not a readable statistics store ({exc})") from None
    return store


def main(argv: list[str] | None = None) -> int:
    """``python -m grounding.store STORE.sqlite --observations obs.csv [--variables v.csv] [--places p.csv]``"""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m grounding.store",
                                     description="Import CSV files (Data Commons custom-import shape) into a store file.")
    parser.add_argument("store", help="SQLite file to create or extend")
    parser.add_argument("--observations", help="entity,variable,date,value[,unit][,source]")
    parser.add_argument("--variables", help="dcid,name[,description][,unit][,aliases]")
    parser.add_argument("--places", help="dcid,name,type[,parent][,aliases]")
    parser.add_argument("--source", action="append", default=[], metavar="NAME=URL",
                        help="provenance URL of a source named in the observations (repeatable)")
    args = parser.parse_args(argv)
    sources = dict(item.split("=", 1) if "=" in item else (item, None) for item in args.source)
    store = Store(args.store)
    try:
        added = store.import_csv(args.observations, variables=args.variables, places=args.places, sources=sources)
    except StoreImportError as exc:
        print(exc, file=sys.stderr)
        return 1
    print(f"{args.store}: imported {added} observations ({store.count_observations()} in the store)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
