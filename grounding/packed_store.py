"""The packed statistics store: a compact, versioned, read-only SQLite file of annual series.

One row per value (the importable :class:`~grounding.store.Store`) does not fit millions of values in
a file small enough to ship in the repository, so the default store packs them:

- ``meta``: ``format`` (:data:`FORMAT_NAME`), ``version`` (:data:`FORMAT_VERSION`), ``provenance``
  (JSON: inputs, checksums, counts), ``attribution`` (the line shown with every answer).
- ``sources``, ``variables`` (name, short name, description, unit and where the unit came from, source,
  source URL, tags, aliases, dataset) and ``places`` (type, parents, aliases, ISO 3166 codes, names in
  other languages) as plain rows.
- ``series``: one row per (variable, kind) where kind is ``observation`` or ``projection`` (values for
  years after the last year that can have been observed: kept apart and labelled). The row lists its
  places and how many values each has; the blob holds the years (int16, delta-coded) and the values,
  xz-compressed, with a CRC-32 of the blob. Values are stored as decimal mantissas with one power-of-ten
  scale per row (delta-coded int64; ``54.11`` is ``5411`` at scale 2) whenever that reads every value
  back exactly (``m / 10**k`` is correctly rounded in IEEE arithmetic, so it equals ``float(text)`` for
  ``|m| < 2**53``); otherwise as raw float64. The build verifies every value it writes reads back equal.

Opening checks the file is complete and of this format (a truncated, corrupt or foreign file raises
:class:`StoreFormatError` naming it); each series is checked against its CRC when first decoded.
"""

from __future__ import annotations

import json
import lzma
import sqlite3
import threading
import zlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from .store import DataSource, Observation, Place, Variable
from .types import GroundingError

__all__ = ["PackedStore", "StoreFormatError", "write_packed_store", "encode_series", "decode_series",
           "is_packed_store", "FORMAT_NAME", "FORMAT_VERSION", "SeriesData"]

FORMAT_NAME = "gemma-grounding packed statistics store"
FORMAT_VERSION = 1
SQLITE_MAGIC = b"SQLite format 3\x00"
MAX_EXACT_MANTISSA = 2 ** 53  # integers below this are exact in float64
MAX_SCALE = 22  # 10.0 ** k is exact in float64 up to k = 22

SCHEMA = """
CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE sources (name TEXT PRIMARY KEY, url TEXT, licence TEXT NOT NULL DEFAULT '',
    attribution TEXT NOT NULL DEFAULT '');
CREATE TABLE variables (
    dcid TEXT PRIMARY KEY, name TEXT NOT NULL, short_name TEXT NOT NULL DEFAULT '',
    description TEXT NOT NULL DEFAULT '', unit TEXT NOT NULL DEFAULT '', unit_basis TEXT NOT NULL DEFAULT '',
    source TEXT NOT NULL DEFAULT '', source_url TEXT NOT NULL DEFAULT '', tags TEXT NOT NULL DEFAULT '[]',
    aliases TEXT NOT NULL DEFAULT '[]', dataset TEXT NOT NULL DEFAULT '');
CREATE TABLE places (
    dcid TEXT PRIMARY KEY, name TEXT NOT NULL, type TEXT NOT NULL, parents TEXT NOT NULL DEFAULT '[]',
    aliases TEXT NOT NULL DEFAULT '[]', iso_alpha2 TEXT NOT NULL DEFAULT '', iso_alpha3 TEXT NOT NULL DEFAULT '',
    iso_numeric TEXT NOT NULL DEFAULT '', names TEXT NOT NULL DEFAULT '{}');
CREATE TABLE series (
    variable TEXT NOT NULL, kind TEXT NOT NULL CHECK (kind IN ('observation', 'projection')),
    entities TEXT NOT NULL, counts TEXT NOT NULL, encoding TEXT NOT NULL, scale INTEGER NOT NULL,
    n_values INTEGER NOT NULL, crc32 INTEGER NOT NULL, data BLOB NOT NULL, PRIMARY KEY (variable, kind));
"""

Kind = Literal["observation", "projection"]


class StoreFormatError(GroundingError):
    """A store file is missing, truncated, corrupt or not a store of this format; the message names it."""


@dataclass(frozen=True)
class SeriesData:
    """All values of one variable (one kind): ``years[offsets[i]:offsets[i+1]]`` belong to ``entities[i]``."""

    entities: tuple[str, ...]
    offsets: np.ndarray  # int64, len(entities) + 1
    years: np.ndarray  # int64, ascending within each entity
    values: np.ndarray  # float64

    def slice(self, entity: str) -> tuple[np.ndarray, np.ndarray] | None:
        index = self._index().get(entity)
        if index is None:
            return None
        start, end = self.offsets[index], self.offsets[index + 1]
        return self.years[start:end], self.values[start:end]

    def _index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index_cache")
        if cached is None:
            cached = {e: i for i, e in enumerate(self.entities)}
            object.__setattr__(self, "_index_cache", cached)
        return cached


# ---- encoding ------------------------------------------------------------------------------------------

def _decimal_mantissas(texts: Sequence[str]) -> tuple[np.ndarray, int] | None:
    """(mantissas, scale) so that ``mantissa / 10**scale`` is each value exactly; None when that cannot be."""
    from decimal import Decimal, InvalidOperation

    try:
        decimals = [Decimal(t) for t in texts]
    except InvalidOperation:
        return None
    scale = max((-d.as_tuple().exponent for d in decimals), default=0)
    scale = max(scale, 0)
    if scale > MAX_SCALE:
        return None
    mantissas = [int(d.scaleb(scale)) for d in decimals]
    if any(abs(m) >= MAX_EXACT_MANTISSA for m in mantissas):
        return None
    return np.array(mantissas, dtype=np.int64), scale


def encode_series(rows: Iterable[tuple[str, int, str]]) -> dict:
    """Pack ``(entity, year, value text)`` rows of one variable into the columns of a ``series`` row.

    Rows are sorted by entity then year; an (entity, year) given twice is an error. The value texts are
    the source's own (``"54.11"``, ``"1.5e-05"``): they decide the exact float each value reads back as.
    """
    ordered = sorted(rows, key=lambda r: (r[0], r[1]))
    for a, b in zip(ordered, ordered[1:], strict=False):
        if (a[0], a[1]) == (b[0], b[1]):
            raise ValueError(f"two values for {a[0]} in {a[1]}")
    entities: list[str] = []
    counts: list[int] = []
    for entity, _year, _text in ordered:
        if not entities or entities[-1] != entity:
            entities.append(entity)
            counts.append(0)
        counts[-1] += 1
    years = np.array([r[1] for r in ordered], dtype=np.int64)
    if len(years) and (years.min() < -32768 or years.max() > 32767):
        raise ValueError("years must fit in int16")
    texts = [r[2] for r in ordered]
    floats = np.array([float(t) for t in texts], dtype=np.float64)
    if not np.isfinite(floats).all():
        raise ValueError("values must be finite")
    year_bytes = np.diff(years, prepend=0).astype(np.int16).tobytes()
    packed = _decimal_mantissas(texts)
    if packed is not None and np.array_equal(packed[0] / 10.0 ** packed[1], floats):
        mantissas, scale = packed
        encoding, value_bytes = "decimal", np.diff(mantissas, prepend=0).astype(np.int64).tobytes()
    else:  # byte-shuffled float64: the bytes of equal significance together compress better
        encoding, scale = "float64", 0
        value_bytes = np.frombuffer(floats.tobytes(), dtype=np.uint8).reshape(-1, 8).T.tobytes()
    data = lzma.compress(year_bytes + value_bytes, preset=9 | lzma.PRESET_EXTREME)
    return {"entities": json.dumps(entities), "counts": json.dumps(counts), "encoding": encoding, "scale": scale,
            "n_values": len(ordered), "crc32": zlib.crc32(data), "data": data, "_floats": floats}


def decode_series(entities: Sequence[str], counts: Sequence[int], encoding: str, scale: int, n_values: int,
                  data: bytes) -> SeriesData:
    """The inverse of :func:`encode_series` (raises ValueError on any inconsistency)."""
    raw = lzma.decompress(data)
    if len(raw) != n_values * 10 or sum(counts) != n_values or len(counts) != len(entities):
        raise ValueError(f"series holds {len(raw)} bytes for {n_values} values")
    years = np.cumsum(np.frombuffer(raw[: 2 * n_values], dtype=np.int16).astype(np.int64))
    body = raw[2 * n_values:]
    if encoding == "decimal":
        values = np.cumsum(np.frombuffer(body, dtype=np.int64)) / 10.0 ** scale
    elif encoding == "float64":
        values = np.frombuffer(np.frombuffer(body, dtype=np.uint8).reshape(8, -1).T.tobytes(), dtype=np.float64)
    else:
        raise ValueError(f"unknown value encoding {encoding!r}")
    offsets = np.concatenate([[0], np.cumsum(np.asarray(counts, dtype=np.int64))])
    return SeriesData(tuple(entities), offsets, years, values)


# ---- writing -------------------------------------------------------------------------------------------

def write_packed_store(path: str | Path, *, meta: dict[str, str], sources: list[dict], variables: list[dict],
                       places: list[dict], series: dict[tuple[str, str], list[tuple[str, int, str]]]) -> dict:
    """Write a new store file at ``path`` (replaced atomically); returns {(variable, kind): floats written}.

    ``series`` maps (variable dcid, kind) to ``(entity, year, value text)`` rows. Every row's value is
    decoded again after packing and compared with ``float(text)``: a mismatch is an error, not a warning.
    """
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    db = sqlite3.connect(tmp)
    written = {}
    try:
        db.executescript(SCHEMA)
        db.executemany("INSERT INTO meta VALUES (?, ?)",
                       list({"format": FORMAT_NAME, "version": str(FORMAT_VERSION), **meta}.items()))
        db.executemany("INSERT INTO sources VALUES (:name, :url, :licence, :attribution)", sources)
        db.executemany(
            "INSERT INTO variables VALUES (:dcid, :name, :short_name, :description, :unit, :unit_basis, :source, "
            ":source_url, :tags, :aliases, :dataset)",
            [{**v, "tags": json.dumps(v.get("tags", [])), "aliases": json.dumps(v.get("aliases", []))}
             for v in variables])
        db.executemany(
            "INSERT INTO places VALUES (:dcid, :name, :type, :parents, :aliases, :iso_alpha2, :iso_alpha3, "
            ":iso_numeric, :names)",
            [{"iso_alpha2": "", "iso_alpha3": "", "iso_numeric": "", **p, "parents": json.dumps(p.get("parents", [])),
              "aliases": json.dumps(p.get("aliases", [])), "names": json.dumps(p.get("names", {}), ensure_ascii=False)}
             for p in places])
        for (variable, kind), rows in sorted(series.items()):
            packed = encode_series(rows)
            floats = packed.pop("_floats")
            decoded = decode_series(json.loads(packed["entities"]), json.loads(packed["counts"]), packed["encoding"],
                                    packed["scale"], packed["n_values"], packed["data"])
            if not np.array_equal(decoded.values, floats):
                raise ValueError(f"{variable} ({kind}): values do not read back exactly")
            db.execute("INSERT INTO series VALUES (:variable, :kind, :entities, :counts, :encoding, :scale, "
                       ":n_values, :crc32, :data)", {"variable": variable, "kind": kind, **packed})
            written[(variable, kind)] = decoded
        db.commit()
        db.execute("VACUUM")
    finally:
        db.close()
    tmp.replace(path)
    return written


# ---- reading -------------------------------------------------------------------------------------------

def is_packed_store(path: str | Path) -> bool:
    """True when ``path`` is an SQLite file whose ``meta`` table names this format."""
    try:
        with open(path, "rb") as f:
            if f.read(16) != SQLITE_MAGIC:
                return False
        db = sqlite3.connect(f"file:{Path(path).resolve()}?mode=ro", uri=True)
        try:
            row = db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
        finally:
            db.close()
    except (OSError, sqlite3.Error):
        return False
    return row is not None and row[0] == FORMAT_NAME


def _check_complete(path: Path) -> None:
    """The SQLite header states the page size and count: a shorter file was cut off."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            header = f.read(100)
    except FileNotFoundError:
        raise StoreFormatError(f"{path}: no such store file") from None
    except OSError as exc:
        raise StoreFormatError(f"{path}: cannot read the store file ({exc.strerror})") from None
    if len(header) < 100 or header[:16] != SQLITE_MAGIC:
        raise StoreFormatError(f"{path}: not a statistics store (not an SQLite file)")
    page_size = int.from_bytes(header[16:18], "big")
    page_size = 65536 if page_size == 1 else page_size
    pages = int.from_bytes(header[28:32], "big")
    if pages and size < page_size * pages:
        raise StoreFormatError(f"{path}: the store file is truncated ({size} bytes, its header says "
                               f"{page_size * pages}); download or build it again")


class PackedStore:
    """Read-only access to a packed store file with the read API of :class:`~grounding.store.Store`.

    Safe to share between threads. Decoded series are cached per variable.
    """

    def __init__(self, path: str | Path):
        self.path = str(path)
        self._path = Path(path)
        _check_complete(self._path)
        self._lock = threading.RLock()
        try:
            self._db = sqlite3.connect(f"file:{self._path.resolve()}?mode=ro&immutable=1", uri=True,
                                       check_same_thread=False)
            meta = dict(self._db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.Error as exc:
            raise StoreFormatError(f"{self.path}: not a readable statistics store ({exc})") from None
        if meta.get("format") != FORMAT_NAME:
            raise StoreFormatError(f"{self.path}: not a {FORMAT_NAME} (format {meta.get('format')!r})")
        if meta.get("version") != str(FORMAT_VERSION):
            raise StoreFormatError(f"{self.path}: store format version {meta.get('version')!r}; this code reads "
                                   f"version {FORMAT_VERSION}: rebuild the store or update gemma-grounding")
        self.meta = meta
        self.attribution = meta.get("attribution", "")
        self._variables: list[Variable] | None = None
        self._places: list[Place] | None = None
        self._entities: dict[tuple[str, str], tuple[str, ...]] | None = None
        self._decoded: dict[tuple[str, str], SeriesData] = {}
        self._sources: dict[str, DataSource] | None = None

    def __repr__(self) -> str:
        return f"PackedStore({self.path!r})"

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _query(self, sql: str, params: tuple = ()) -> list[tuple]:
        with self._lock:
            try:
                return self._db.execute(sql, params).fetchall()
            except sqlite3.Error as exc:
                raise StoreFormatError(f"{self.path}: the store file is corrupt ({exc})") from None

    @property
    def provenance(self) -> dict:
        return json.loads(self.meta.get("provenance", "{}"))

    # ---- metadata -------------------------------------------------------------------------------------

    def variables(self) -> list[Variable]:
        if self._variables is None:
            rows = self._query("SELECT dcid, name, short_name, description, unit, unit_basis, source, source_url, "
                               "tags, aliases, dataset FROM variables ORDER BY dcid")
            self._variables = [Variable(dcid=r[0], name=r[1], short_name=r[2], description=r[3], unit=r[4],
                                        unit_basis=r[5], source=r[6], source_url=r[7], tags=json.loads(r[8]),
                                        aliases=json.loads(r[9]), dataset=r[10]) for r in rows]
            self._variable_index = {v.dcid: v for v in self._variables}
        return self._variables

    def places(self) -> list[Place]:
        if self._places is None:
            rows = self._query("SELECT dcid, name, type, parents, aliases, iso_alpha2, iso_alpha3, iso_numeric, "
                               "names FROM places ORDER BY dcid")
            self._places = [Place(dcid=r[0], name=r[1], type=r[2], parents=json.loads(r[3]),
                                  aliases=json.loads(r[4]), iso_alpha2=r[5], iso_alpha3=r[6], iso_numeric=r[7],
                                  names=json.loads(r[8])) for r in rows]
            self._place_index = {p.dcid: p for p in self._places}
            children: dict[str, list[Place]] = {}
            for place in self._places:
                for parent in place.parents:
                    children.setdefault(parent, []).append(place)
            self._children = {k: sorted(v, key=lambda p: p.name) for k, v in children.items()}
        return self._places

    def variable(self, dcid: str) -> Variable | None:
        self.variables()
        return self._variable_index.get(dcid)

    def place(self, dcid: str) -> Place | None:
        self.places()
        return self._place_index.get(dcid)

    def source(self, name: str) -> DataSource | None:
        if self._sources is None:
            self._sources = {r[0]: DataSource(name=r[0], url=r[1], licence=r[2], attribution=r[3])
                             for r in self._query("SELECT name, url, licence, attribution FROM sources")}
        found = self._sources.get(name)
        return found if found is not None else (DataSource(name=name) if name else None)

    def sources(self) -> list[DataSource]:
        self.source("")
        return list(self._sources.values())

    def children(self, parent: str, place_type: str | None = None) -> list[Place]:
        self.places()
        return [p for p in self._children.get(parent, []) if place_type is None or p.type == place_type]

    # ---- series ---------------------------------------------------------------------------------------

    def _entity_lists(self) -> dict[tuple[str, str], tuple[str, ...]]:
        if self._entities is None:
            self._entities = {(r[0], r[1]): tuple(json.loads(r[2]))
                              for r in self._query("SELECT variable, kind, entities FROM series")}
        return self._entities

    def series_data(self, variable: str, kind: Kind = "observation") -> SeriesData | None:
        """Every value of ``variable`` of one kind, decoded (cached); None when the store has none."""
        key = (variable, kind)
        found = self._decoded.get(key)
        if found is not None:
            return found
        rows = self._query("SELECT entities, counts, encoding, scale, n_values, crc32, data FROM series "
                           "WHERE variable = ? AND kind = ?", key)
        if not rows:
            return None
        entities, counts, encoding, scale, n_values, crc, data = rows[0]
        if zlib.crc32(data) != crc:
            raise StoreFormatError(f"{self.path}: the series of {variable} ({kind}) is corrupt (checksum mismatch)")
        try:
            decoded = decode_series(json.loads(entities), json.loads(counts), encoding, scale, n_values, data)
        except (ValueError, lzma.LZMAError) as exc:
            raise StoreFormatError(f"{self.path}: the series of {variable} ({kind}) cannot be read ({exc})") from None
        with self._lock:
            self._decoded[key] = decoded
        return decoded

    def _observations(self, entity: str, variable: str, kind: Kind) -> list[Observation]:
        if entity not in self._entity_lists().get((variable, kind), ()):
            return []
        found = self.series_data(variable, kind).slice(entity)
        unit = self._unit(variable)
        source = self._source_name(variable)
        years, values = found
        return [Observation(entity=entity, variable=variable, date=str(int(y)), value=float(v), unit=unit,
                            source=source, projection=kind == "projection") for y, v in zip(years, values, strict=True)]

    def _unit(self, variable: str) -> str:
        found = self.variable(variable)
        return found.unit if found else ""

    def _source_name(self, variable: str) -> str:
        found = self.variable(variable)
        return found.source if found else ""

    def count_observations(self, kind: Kind | None = None) -> int:
        if kind is None:
            return self._query("SELECT COALESCE(SUM(n_values), 0) FROM series")[0][0]
        return self._query("SELECT COALESCE(SUM(n_values), 0) FROM series WHERE kind = ?", (kind,))[0][0]

    def series(self, entity: str, variable: str, *, projections: bool = False) -> list[Observation]:
        """Observations of ``variable`` for ``entity``, oldest first; ``projections=True`` appends the
        projections (``Observation.projection``)."""
        found = self._observations(entity, variable, "observation")
        if projections:
            found += self._observations(entity, variable, "projection")
        return found

    def observation(self, entity: str, variable: str, date: str | None = None) -> Observation | None:
        """The value at ``date`` (an observation, else a projection for that year), or the latest
        observation when ``date`` is None; None when there is none."""
        if date is None:
            series = self._observations(entity, variable, "observation")
            return series[-1] if series else None
        for kind in ("observation", "projection"):
            found = next((o for o in self._observations(entity, variable, kind) if o.date == date), None)
            if found is not None:
                return found
        return None

    def coverage(self, variable: str) -> int:
        """How many places have observations of ``variable``."""
        return len(self._entity_lists().get((variable, "observation"), ()))

    def has_data(self, entity: str, variable: str) -> bool:
        lists = self._entity_lists()
        return entity in lists.get((variable, "observation"), ()) or entity in lists.get((variable, "projection"), ())

    def dates(self, variable: str, entities: Iterable[str] | None = None) -> list[str]:
        """Observed dates of ``variable`` (for any of ``entities`` when given), oldest first."""
        data = self.series_data(variable)
        if data is None:
            return []
        if entities is None:
            return [str(y) for y in np.unique(data.years)]
        years = [part[0] for e in entities if (part := data.slice(e)) is not None]
        return [str(y) for y in np.unique(np.concatenate(years))] if years else []


    def variables_with_data(self, entity: str) -> list[str]:
        return sorted({variable for (variable, _kind), entities in self._entity_lists().items() if entity in entities})
