"""A persistent multi-vector (late-interaction) page index on FAISS.

Every page is a set of token vectors. Search is exact MaxSim (``vision_rag.scoring``) over all pages
for small collections, and for large ones FAISS finds candidate pages from their token vectors (each
query token asks an IVF index for its nearest page tokens), the candidates are ranked by the
similarities FAISS returned, and the best of them are rescored exactly from the stored vectors.

Why IVF and not HNSW for the token index (measured by ``benchmarks/bench_maxsim.py`` on 2 cores):
a collection of 20,000 pages is 20.6 million token vectors. At 200 pages both reach recall@10
0.97-0.99 at ~11 ms per query, but HNSW costs 797 KB of token index per page (fp32 vectors + graph)
against 29 KB for IVF-PQ (16-byte codes + 8-byte ids), and builds 1.5-2x slower (32-68 vs 22-36
ms/page over two runs; HNSW insertion also slows as the graph grows); at 20,000 pages HNSW would
need ~16 GB of RAM. IVF-PQ
is trained once, on the first pages, and new pages are added to it without retraining.
``ann="hnsw"`` remains available for small collections.

On disk an index is a directory::

    manifest.json        format name + version, model id, settings, generation, the live files
    meta.sqlite          page records (SQLite, WAL), one row per version of a page
    data/seg-*.npy       token vectors of the pages added by one commit (fp16/fp32 or codec bytes)
    data/seg-*.ivf       the FAISS token index of that segment (faiss.write_index), ids = page ids
    data/codec-*.faiss   trained FAISS codec (SQ8 / PQ) when vectors are stored compressed
    data/codec-*.npz     trained PLAID codec (centroids, residual buckets) with storage="plaid"
    data/seg-*.postings.npz  PLAID: centroid -> pages of that segment (its token index)
    data/ann-*.faiss     trained, empty FAISS token index every segment index is copied from
    LOCK                 held (flock) by the one process that writes

Commits are atomic: new files are written and fsynced, the records are inserted in one SQLite
transaction tagged with the new generation, and only then ``manifest.json`` is replaced (write to a
temporary file, fsync, rename, fsync the directory). Readers see rows with ``added_gen <= G <
deleted_gen`` for the manifest's generation ``G``, so a process killed at any moment leaves the last
committed state readable and complete; the next writer removes the leftovers. Nothing is pickled.

Format versions: 1 is every storage but PLAID; an index with ``storage="plaid"`` is written as
version 2, or 3 when its residual codes are 3 bits wide or mix widths (``plaid_nbits`` 3 or fractional,
which code reading only version 2 cannot decode), so older code refuses it with a clear error instead
of misreading it. Older indexes are opened and written as they are (they keep their version).
"""

from __future__ import annotations

import fcntl
import json
import math
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import faiss
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .clustering import kmeans
from .plaid import PlaidCodec, PlaidSettingsError, Postings, centroid_scores, check_nbits, dim_bits_for
from .scoring import maxsim_packed, top_k

FORMAT_NAME = "gemma-grounding.vision-index"
FORMAT_VERSION = 3  # the newest format this code reads; see format_version_for
CODEC_STORAGES = ("sq8", "pq", "plaid")  # stored as codes of a codec trained on the first pages

Storage = Literal["fp16", "fp32", "sq8", "pq", "plaid"]
AnnKind = Literal["auto", "exact", "ivf", "hnsw"]
STORAGES = ("fp16", "fp32", "sq8", "pq", "plaid")
ANN_KINDS = ("auto", "exact", "ivf", "hnsw")

# With ann="auto" pages are scored exhaustively below this many pages and through the IVF token index
# from there on. Measured by benchmarks/bench_maxsim.py (fp16 storage, one 20-token query, 2 cores):
# exhaustive scoring costs ~50-80 us per page while the IVF path costs ~10-15 ms at 5,000 pages, so
# they meet at ~150-300 pages.
DEFAULT_EXACT_BELOW_PAGES = 200
MAX_SEGMENTS = 16  # more segments than this are merged into one at commit (each is searched apart)
METADATA_VALUE = str | int | float | bool | None


# --------------------------------------------------------------------------------------------------
# Errors


class VisionIndexError(RuntimeError):
    """Base class of the errors of this module."""


class IndexFormatError(VisionIndexError):
    """The directory is not an index this version can read (missing/corrupt/newer manifest)."""


class ModelMismatchError(VisionIndexError):
    """The index was built by a different embedding model than the one given."""


class IndexSettingsError(VisionIndexError, ValueError):
    """Invalid settings or inputs (wrong dimension, unknown storage, too little data to train ...)."""


class IndexLockedError(VisionIndexError):
    """Another process holds the index for writing."""


class PageNotFoundError(VisionIndexError, KeyError):
    """No live page with this id."""


# --------------------------------------------------------------------------------------------------
# Data models


class PageRecord(BaseModel):
    """What is known about a page besides its vectors (given to ``add``)."""

    model_config = ConfigDict(extra="forbid")

    document_id: str
    page_number: int = 0  # 0-based page within the document
    source_path: str = ""
    content_hash: str = ""  # hash of the source file, to skip re-indexing unchanged files
    metadata: dict[str, METADATA_VALUE] = Field(default_factory=dict)  # user metadata, filterable by equality


class Page(PageRecord):
    """A stored page: its record plus its stable id and token count."""

    page_id: int
    n_tokens: int


class Hit(BaseModel):
    page_id: int
    score: float  # MaxSim: sum over query tokens of the best page-token similarity, in [-Lq, Lq]
    normalized_score: float  # score / Lq, in [-1, 1] for unit vectors: comparable across queries
    page: Page


class SearchFilter(BaseModel):
    """Restrict a search; every given condition must hold."""

    model_config = ConfigDict(extra="forbid")

    document_id: str | list[str] | None = None
    source_path_prefix: str | None = None
    metadata: dict[str, METADATA_VALUE] | None = None  # equality on each key
    page_ids: list[int] | None = None


class SegmentInfo(BaseModel):
    name: str
    vector_file: str
    ann_file: str | None = None
    n_tokens: int
    n_pages: int


class IndexSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    storage: Storage = "fp16"
    pool_factor: int = Field(1, ge=1)
    ann: AnnKind = "auto"
    exact_below_pages: int = DEFAULT_EXACT_BELOW_PAGES
    pq_m: int = 32  # PQ bytes per token of the "pq" codec (dim must be divisible by it); +1-2 bytes list id
    pq_coarse: int = 1024  # coarse centroids of the "pq" codec (it codes the residual to the nearest one)
    # "plaid": residual bits per dimension, 1 to 4; a fraction (e.g. 3.75) mixes the two whole widths around it
    plaid_nbits: int | float = 2
    plaid_centroids: int | None = None  # "plaid": k-means centroids; None: ColBERTv2's rule, capped (plaid.py)
    ann_pq_m: int = 16  # bytes per token in the IVF token index
    nlist: int | None = None  # IVF lists; None: chosen from the number of training tokens
    nprobe: int = 16
    hnsw_m: int = 32
    ef_search: int = 128
    tokens_per_query_token: int = 128  # neighbours FAISS returns per query token
    rerank: int = 128  # candidate pages rescored exactly (>= k); 128 keeps recall@10 >= 0.95 at 20k pages (bench)


def format_version_for(storage: str, plaid_nbits: float = 2) -> int:
    """The format version an index with these settings is written in: PLAID needs version 2, and 3
    when its codes are 3 bits wide or mix widths (``plaid_nbits`` not 1, 2 or 4); the others keep
    version 1, so older code still opens every index it can read."""
    if storage != "plaid":
        return 1
    return 2 if plaid_nbits in (1, 2, 4) else 3


class Manifest(BaseModel):
    format: Literal["gemma-grounding.vision-index"] = FORMAT_NAME
    format_version: int = FORMAT_VERSION
    generation: int = 0
    model_id: str
    dim: int
    settings: IndexSettings
    next_page_id: int = 0
    codec_file: str | None = None
    ann_template_file: str | None = None
    segments: list[SegmentInfo] = Field(default_factory=list)
    retired_files: list[str] = Field(default_factory=list)  # unreferenced since this commit; deleted next one


# --------------------------------------------------------------------------------------------------
# Token pooling


def pool_tokens(vectors: np.ndarray, pool_factor: int, iterations: int = 6) -> np.ndarray:
    """Cluster a page's token vectors into ``ceil(n / pool_factor)`` groups, return the group means.

    k-means (Lloyd) seeded with evenly spaced tokens: page tokens are patches in reading order, so
    the seeds cover the page and neighbouring patches (often alike: background, one text block)
    start in one group. colpali-engine uses hierarchical (Ward) clustering for the same purpose;
    k-means needs no SciPy and costs ~1 ms per iteration for a 1030-token page.
    """
    vectors = np.asarray(vectors, dtype=np.float32)
    n = vectors.shape[0]
    n_clusters = math.ceil(n / pool_factor)
    if pool_factor <= 1 or n_clusters >= n:
        return vectors
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # page-sized products: one thread is several times faster here
    try:
        points = torch.from_numpy(vectors)
        centroids = points[torch.linspace(0, n - 1, n_clusters).round().long()].clone()
        for _ in range(iterations):
            # argmin |x - c|^2 = argmax (x.c - |c|^2 / 2)
            assign = (points @ centroids.T - 0.5 * (centroids * centroids).sum(1)).argmax(1)
            sums = torch.zeros_like(centroids).index_add_(0, assign, points)
            counts = torch.bincount(assign, minlength=n_clusters)
            filled = counts > 0  # an emptied cluster keeps its previous centre
            new = centroids.clone()
            new[filled] = sums[filled] / counts[filled, None].float()
            if torch.allclose(new, centroids):
                break
            centroids = new
        counts = torch.bincount(assign, minlength=n_clusters)
        return centroids[counts > 0].numpy()
    finally:
        torch.set_num_threads(threads)


# --------------------------------------------------------------------------------------------------
# Files


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    _fsync_file(path)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)
        f.flush()
        os.fsync(f.fileno())


def _write_faiss(path: Path, index) -> None:
    faiss.write_index(index, str(path))
    _fsync_file(path)


def _read_manifest(directory: Path) -> Manifest:
    path = directory / "manifest.json"
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is not readable JSON ({exc}); this is not a usable index") from exc
    if raw.get("format") != FORMAT_NAME:
        raise IndexFormatError(f"{path} is not a gemma-grounding vision index manifest")
    if raw.get("format_version", 0) > FORMAT_VERSION:
        raise IndexFormatError(
            f"{directory} uses index format {raw['format_version']}, newer than this version reads "
            f"({FORMAT_VERSION}); upgrade gemma-grounding"
        )
    return Manifest.model_validate(raw)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS pages (
    row_id INTEGER PRIMARY KEY,
    page_id INTEGER NOT NULL,
    added_gen INTEGER NOT NULL,
    deleted_gen INTEGER,
    document_id TEXT NOT NULL,
    page_number INTEGER NOT NULL,
    source_path TEXT NOT NULL,
    content_hash TEXT NOT NULL,
    metadata TEXT NOT NULL,
    segment TEXT NOT NULL,
    token_offset INTEGER NOT NULL,
    n_tokens INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS pages_by_id ON pages(page_id);
CREATE INDEX IF NOT EXISTS pages_by_document ON pages(document_id);
CREATE INDEX IF NOT EXISTS pages_by_hash ON pages(content_hash);
"""
_VISIBLE = "added_gen <= :gen AND (deleted_gen IS NULL OR deleted_gen > :gen)"
_RECORD_COLUMNS = "page_id, document_id, page_number, source_path, content_hash, metadata, n_tokens"


def _page_from_row(row) -> Page:
    page_id, document_id, page_number, source_path, content_hash, metadata, n_tokens = row
    return Page(
        page_id=page_id, document_id=document_id, page_number=page_number, source_path=source_path,
        content_hash=content_hash, metadata=json.loads(metadata), n_tokens=n_tokens,
    )


class _Segment:
    """An opened segment: its vectors (memory-mapped) and, if any, its FAISS token index."""

    def __init__(self, directory: Path, info: SegmentInfo):
        self.info = info
        self.vectors = np.load(directory / "data" / info.vector_file, mmap_mode="r", allow_pickle=False)
        self.ann: Any = None  # a FAISS token index, or PLAID postings (.npz)
        if info.ann_file and info.ann_file.endswith(".npz"):
            self.ann = Postings.load(directory / "data" / info.ann_file)
        elif info.ann_file:
            self.ann = faiss.read_index(str(directory / "data" / info.ann_file))


class _Snapshot:
    """The live pages of one committed generation, as arrays sorted by (segment, offset)."""

    def __init__(self, manifest: Manifest, rows: list[tuple[int, str, int, int]], segments: dict[str, _Segment]):
        self.manifest = manifest
        self.segments = segments
        order = {info.name: i for i, info in enumerate(manifest.segments)}
        rows = sorted(rows, key=lambda r: (order[r[1]], r[2]))
        self.page_ids = np.array([r[0] for r in rows], dtype=np.int64)
        self.segment_names = [r[1] for r in rows]
        self.offsets = np.array([r[2] for r in rows], dtype=np.int64)
        self.lengths = np.array([r[3] for r in rows], dtype=np.int64)
        self.position = {int(p): i for i, p in enumerate(self.page_ids)}


# --------------------------------------------------------------------------------------------------
# The index


class Index:
    """A multi-vector page index in a directory. Use :meth:`open`."""

    def __init__(self, directory: Path, manifest: Manifest, autocommit: bool):
        self.directory = directory
        self.autocommit = autocommit
        self._db = sqlite3.connect(directory / "meta.sqlite", timeout=60, check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(_SCHEMA)
        self._mutex = threading.RLock()
        self._lock_file = None
        self._segments: dict[str, _Segment] = {}
        self._codec = None
        self._codec_name: str | None = None
        self._ann_template = None
        self._search_overrides: dict[str, Any] = {}
        self._snapshot: _Snapshot | None = None
        self._pending_adds: list[tuple[int, PageRecord, np.ndarray]] = []
        self._pending_deletes: set[int] = set()
        self._pending_records: dict[int, PageRecord] = {}
        self._next_page_id = manifest.next_page_id
        self._load(manifest)

    # ---- opening -------------------------------------------------------------------------------

    @classmethod
    def open(
        cls,
        directory: str | os.PathLike,
        *,
        create: bool = False,
        model_id: str | None = None,
        dim: int | None = None,
        storage: Storage | None = None,
        pool_factor: int | None = None,
        ann: AnnKind | None = None,
        autocommit: bool = True,
        **settings: Any,
    ) -> Index:
        """Open the index in ``directory``; with ``create=True`` make it if it does not exist.

        Settings given for an existing index must match the stored ones (``storage``, ``pool_factor``,
        ``ann``, ``dim``); ``model_id``, if given, must equal the model that built it. Search-time
        settings (``nprobe``, ``rerank`` ...) may be changed freely. With ``autocommit`` every
        ``add``/``delete``/``update`` is committed at once; otherwise call :meth:`commit`.
        """
        directory = Path(directory)
        given = {"storage": storage, "pool_factor": pool_factor, "ann": ann}
        given = {k: v for k, v in given.items() if v is not None}
        unknown = set(settings) - set(IndexSettings.model_fields)
        if unknown:
            raise IndexSettingsError(f"unknown index settings {sorted(unknown)}; known: {sorted(IndexSettings.model_fields)}")
        if storage is not None and storage not in STORAGES:
            raise IndexSettingsError(f"storage={storage!r} is not one of {STORAGES}")
        if ann is not None and ann not in ANN_KINDS:
            raise IndexSettingsError(f"ann={ann!r} is not one of {ANN_KINDS}")
        if "plaid_nbits" in settings:
            try:
                check_nbits(settings["plaid_nbits"])
                dim_bits_for(settings["plaid_nbits"], dim or 128)
            except PlaidSettingsError as exc:
                raise IndexSettingsError(str(exc)) from None
        if storage == "plaid" and ann == "hnsw":
            raise IndexSettingsError('storage="plaid" searches through its own centroid postings; use ann="auto", "ivf" or "exact"')
        manifest_path = directory / "manifest.json"
        existed = manifest_path.exists()
        if not existed:
            if not create:
                raise IndexFormatError(
                    f"{directory} holds no index (no manifest.json); pass create=True to make a new one"
                )
            if not model_id:
                raise IndexSettingsError("a new index needs model_id= (the embedding model that fills it)")
            directory.mkdir(parents=True, exist_ok=True)
            (directory / "data").mkdir(exist_ok=True)
            index_settings = IndexSettings(**given, **settings)
            manifest = Manifest(
                model_id=model_id, dim=dim or 128, settings=index_settings,
                format_version=format_version_for(index_settings.storage, index_settings.plaid_nbits),
            )
            lock = _acquire_lock(directory)
            try:
                if not manifest_path.exists():  # another creator may have won the race
                    _write_manifest(directory, manifest)
            finally:
                lock.close()
        manifest = _read_manifest(directory)
        if model_id is not None and model_id != manifest.model_id:
            raise ModelMismatchError(
                f"index {directory} was built with model {manifest.model_id!r}, not {model_id!r}; "
                "search it with the same model or index into a new directory"
            )
        if dim is not None and dim != manifest.dim:
            raise IndexSettingsError(f"index {directory} stores {manifest.dim}-dim vectors, not {dim}")
        for key, value in given.items():
            if getattr(manifest.settings, key) != value:
                raise IndexSettingsError(
                    f"index {directory} was created with {key}={getattr(manifest.settings, key)!r}; "
                    f"it cannot be reopened with {key}={value!r} (create a new index to change it)"
                )
        index = cls(directory, manifest, autocommit)
        if existed and settings:
            fixed = set(settings) - set(_SEARCH_KNOBS)
            changed = {k for k in fixed if getattr(manifest.settings, k) != settings[k]}
            if changed:
                raise IndexSettingsError(
                    f"index {directory} was created with other {sorted(changed)}; only the search settings "
                    f"{list(_SEARCH_KNOBS)} can be changed when reopening"
                )
            index._search_overrides = {k: v for k, v in settings.items() if k in _SEARCH_KNOBS}
        return index

    def close(self) -> None:
        with self._mutex:
            if self._pending_adds or self._pending_deletes or self._pending_records:
                self.commit()
            self._db.close()
            if self._lock_file is not None:
                self._lock_file.close()
                self._lock_file = None

    def __enter__(self) -> Index:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- properties --------------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        return self._snapshot.manifest

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def dim(self) -> int:
        return self.manifest.dim

    @property
    def settings(self) -> IndexSettings:
        """The stored settings with this handle's search-time overrides applied."""
        if not self._search_overrides:
            return self.manifest.settings
        return self.manifest.settings.model_copy(update=self._search_overrides)

    @property
    def generation(self) -> int:
        return self.manifest.generation

    def __len__(self) -> int:
        self.refresh()
        return len(self._snapshot.page_ids)

    def page_ids(self) -> list[int]:
        self.refresh()
        return sorted(int(p) for p in self._snapshot.page_ids)

    # ---- reading -------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Pick up commits made by other processes (called by every read)."""
        with self._mutex:
            try:
                current = json.loads((self.directory / "manifest.json").read_text())["generation"]
            except (OSError, ValueError, KeyError):
                return  # a torn read cannot happen with rename, but never fail a search on it
            if current != self._snapshot.manifest.generation:
                self._load(_read_manifest(self.directory))

    def _load(self, manifest: Manifest) -> None:
        # Retry while a concurrent writer commits between our manifest and SQLite reads (or removes
        # files of generations we were about to open).
        for _ in range(20):
            try:
                rows = self._db.execute(
                    f"SELECT page_id, segment, token_offset, n_tokens FROM pages WHERE {_VISIBLE}",
                    {"gen": manifest.generation},
                ).fetchall()
                segments = {
                    info.name: self._segments.get(info.name) or _Segment(self.directory, info)
                    for info in manifest.segments
                }
                if manifest.codec_file and (self._codec is None or self._codec_name != manifest.codec_file):
                    path = self.directory / "data" / manifest.codec_file
                    self._codec = PlaidCodec.load(path) if path.suffix == ".npz" else faiss.read_index(str(path))
                    self._codec_name = manifest.codec_file
            except FileNotFoundError:
                manifest = _read_manifest(self.directory)
                continue
            if _read_manifest(self.directory).generation != manifest.generation and self._lock_file is None:
                manifest = _read_manifest(self.directory)
                continue
            self._segments = segments
            self._snapshot = _Snapshot(manifest, rows, segments)
            return
        raise IndexFormatError(f"could not read a consistent state of {self.directory} (writer too busy?)")

    def get(self, page_id: int) -> Page:
        """The record of a live page."""
        self.refresh()
        row = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM pages WHERE page_id = :pid AND {_VISIBLE}",
            {"pid": int(page_id), "gen": self.generation},
        ).fetchone()
        if row is None:
            raise PageNotFoundError(f"no page with id {page_id} in index {self.directory}")
        return _page_from_row(row)

    def _records(self, page_ids: Sequence[int]) -> dict[int, Page]:
        out = {}
        ids = [int(p) for p in page_ids]
        for start in range(0, len(ids), 500):
            part = ids[start : start + 500]
            marks = ",".join("?" * len(part))
            for row in self._db.execute(
                f"SELECT {_RECORD_COLUMNS} FROM pages WHERE page_id IN ({marks}) "
                "AND added_gen <= ? AND (deleted_gen IS NULL OR deleted_gen > ?)",
                [*part, self.generation, self.generation],
            ):
                out[row[0]] = _page_from_row(row)
        return out

    def vectors(self, page_id: int) -> torch.Tensor:
        """The stored token vectors of a page as fp32 ``(n_tokens, dim)`` (decoded, pooled if pooling is on)."""
        self.refresh()
        snap = self._snapshot
        pos = snap.position.get(int(page_id))
        if pos is None:
            raise PageNotFoundError(f"no page with id {page_id} in index {self.directory}")
        seg = snap.segments[snap.segment_names[pos]]
        stored = seg.vectors[snap.offsets[pos] : snap.offsets[pos] + snap.lengths[pos]]
        return torch.from_numpy(self._decode(np.asarray(stored)))

    def find_by_hash(self, content_hash: str) -> list[Page]:
        """Live pages whose source file had this content hash (used to skip unchanged files)."""
        self.refresh()
        rows = self._db.execute(
            f"SELECT {_RECORD_COLUMNS} FROM pages WHERE content_hash = :h AND {_VISIBLE}",
            {"h": content_hash, "gen": self.generation},
        ).fetchall()
        return [_page_from_row(r) for r in rows]

    def pages(self, document_id: str | None = None, source_path: str | None = None) -> list[Page]:
        """Live page records, optionally of one document or one source file."""
        self.refresh()
        sql = f"SELECT {_RECORD_COLUMNS} FROM pages WHERE {_VISIBLE}"
        params: dict[str, Any] = {"gen": self.generation}
        if document_id is not None:
            sql += " AND document_id = :doc"
            params["doc"] = document_id
        if source_path is not None:
            sql += " AND source_path = :src"
            params["src"] = source_path
        return [_page_from_row(r) for r in self._db.execute(sql + " ORDER BY page_id", params)]

    def _decode(self, stored: np.ndarray) -> np.ndarray:
        if self.settings.storage in ("fp16", "fp32"):
            return stored.astype(np.float32)
        return self._codec.sa_decode(np.ascontiguousarray(stored))

    # ---- search --------------------------------------------------------------------------------

    def search(
        self, queries, k: int = 10, filter: SearchFilter | Mapping | None = None, *, exact: bool | None = None,
        _retried: bool = False,
    ):
        """Best pages for a query (``(Lq, dim)`` tensor -> ``list[Hit]``) or a list of queries
        (-> ``list[list[Hit]]``). ``filter`` restricts the pages (see :class:`SearchFilter`).
        ``exact=None`` follows the index's ``ann`` setting; True forces exhaustive MaxSim."""
        self.refresh()
        single = isinstance(queries, (torch.Tensor, np.ndarray)) and queries.ndim == 2
        query_list = [queries] if single else list(queries)
        query_list = [_as_float32(q) for q in query_list]
        for q in query_list:
            if q.ndim != 2 or q.shape[1] != self.dim or q.shape[0] == 0:
                raise IndexSettingsError(f"query of shape {tuple(q.shape)}; expected (n_tokens, {self.dim})")
        with self._mutex:
            snap = self._snapshot
            allowed = self._filter_positions(filter) if filter else None
            n_allowed = len(snap.page_ids) if allowed is None else len(allowed)
            use_ann = not exact and self._ann_ready(snap) and n_allowed >= self.settings.exact_below_pages
            if use_ann:
                results = [self._search_ann(q, k, allowed) for q in query_list]
            else:
                results = self._search_exact(query_list, k, allowed)
            records = self._records({pid for r in results for pid, _ in r})
        if any(pid not in records for r in results for pid, _ in r):
            if _retried:
                raise IndexFormatError(f"{self.directory}: search hits without records; the index is damaged")
            # A writer two commits ahead purged rows of our generation mid-search: search again.
            self.refresh()
            return self.search(queries, k, filter, exact=exact, _retried=True)
        hits = [
            [
                Hit(page_id=pid, score=score, normalized_score=score / q.shape[0], page=records[pid])
                for pid, score in result
            ]
            for q, result in zip(query_list, results, strict=True)
        ]
        return hits[0] if single else hits

    def _ann_ready(self, snap: _Snapshot) -> bool:
        return self.settings.ann != "exact" and bool(snap.segments) and all(
            s.ann is not None for s in snap.segments.values()
        )

    def _filter_positions(self, filter: SearchFilter | Mapping) -> np.ndarray:
        f = filter if isinstance(filter, SearchFilter) else SearchFilter.model_validate(dict(filter))
        sql = f"SELECT page_id FROM pages WHERE {_VISIBLE}"
        params: dict[str, Any] = {"gen": self.generation}
        if f.document_id is not None:
            docs = [f.document_id] if isinstance(f.document_id, str) else list(f.document_id)
            names = [f"doc{i}" for i in range(len(docs))]
            sql += f" AND document_id IN ({','.join(':' + n for n in names)})"
            params.update(zip(names, docs, strict=True))
        if f.source_path_prefix is not None:
            escaped = f.source_path_prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
            sql += " AND source_path LIKE :prefix ESCAPE '\\'"
            params["prefix"] = escaped + "%"
        for i, (key, value) in enumerate((f.metadata or {}).items()):
            path = "$." + json.dumps(key)
            if value is None:
                sql += f" AND json_type(metadata, :k{i}) = 'null'"
            elif isinstance(value, bool):  # JSON true/false are returned by SQLite as 1/0
                sql += f" AND json_type(metadata, :k{i}) = :t{i}"
                params[f"t{i}"] = "true" if value else "false"
            else:
                sql += f" AND json_type(metadata, :k{i}) IN ('integer', 'real', 'text') AND json_extract(metadata, :k{i}) = :v{i}"
                params[f"v{i}"] = value
            params[f"k{i}"] = path
        ids = [r[0] for r in self._db.execute(sql, params)]
        if f.page_ids is not None:
            ids = sorted(set(ids) & {int(p) for p in f.page_ids})
        positions = self._snapshot.position
        return np.array(sorted(positions[p] for p in ids if p in positions), dtype=np.int64)

    def _score_positions(self, queries: list[np.ndarray], positions: np.ndarray, chunk_tokens: int = 65536) -> np.ndarray:
        """Exact MaxSim of ``queries`` against the pages at snapshot ``positions`` -> ``(Q, len(positions))``."""
        snap = self._snapshot
        out = np.empty((len(queries), len(positions)), dtype=np.float32)
        for columns, _segment, vectors, offsets in self._chunks(snap, positions, chunk_tokens):
            if self.settings.storage == "plaid":
                out[:, columns] = self._codec.maxsim(queries, vectors, offsets)
                continue
            if self.settings.storage in CODEC_STORAGES:
                vectors = self._codec.sa_decode(np.ascontiguousarray(vectors))
            out[:, columns] = maxsim_packed(queries, vectors, offsets)
        return out

    def _chunks(self, snap: _Snapshot, positions: np.ndarray, chunk_tokens: int) -> Iterator:
        """Group positions (sorted) into runs of one segment of at most ``chunk_tokens`` tokens; a run of
        pages lying back to back is a view of the stored array, others are gathered."""
        order = np.argsort(positions, kind="stable")
        start = 0
        while start < len(order):
            seg_name = snap.segment_names[positions[order[start]]]
            end, tokens = start, 0
            while end < len(order):
                pos = positions[order[end]]
                if snap.segment_names[pos] != seg_name or (end > start and tokens + snap.lengths[pos] > chunk_tokens):
                    break
                tokens += int(snap.lengths[pos])
                end += 1
            cols = order[start:end]
            pos = positions[cols]
            offs, lens = snap.offsets[pos], snap.lengths[pos]
            stored = snap.segments[seg_name].vectors
            local = np.zeros(len(pos) + 1, dtype=np.int64)
            np.cumsum(lens, out=local[1:])
            if np.all(offs[1:] == offs[:-1] + lens[:-1]):
                vectors = stored[offs[0] : offs[0] + local[-1]]
            else:
                vectors = np.concatenate([stored[o : o + n] for o, n in zip(offs, lens, strict=True)])
            yield cols, seg_name, vectors, local
            start = end

    def _search_exact(self, queries: list[np.ndarray], k: int, allowed: np.ndarray | None) -> list[list[tuple[int, float]]]:
        snap = self._snapshot
        positions = np.arange(len(snap.page_ids)) if allowed is None else allowed
        if len(positions) == 0:
            return [[] for _ in queries]
        scores = self._score_positions(queries, positions)
        out = []
        for row in scores:
            best, values = top_k(row, k)
            out.append([(int(snap.page_ids[positions[b]]), float(v)) for b, v in zip(best, values, strict=True)])
        return out

    def _search_ann(self, query: np.ndarray, k: int, allowed: np.ndarray | None) -> list[tuple[int, float]]:
        snap, s = self._snapshot, self.settings
        if s.storage == "plaid":
            pages, approx_scores = centroid_scores(query, self._codec.centroids, [g.ann for g in snap.segments.values()], s.nprobe)
            positions = np.array([snap.position.get(int(p), -1) for p in pages], dtype=np.int64)
            keep = positions >= 0  # stale ids: deleted pages (an updated page's old tokens count with its new ones)
            if allowed is not None:
                keep &= np.isin(positions, allowed)
            return self._rerank(query, k, positions[keep], approx_scores[keep])
        n_tok = query.shape[0]
        sims, labels = [], []
        for segment in snap.segments.values():
            index = segment.ann
            if isinstance(index, faiss.IndexIVF):
                index.nprobe = s.nprobe
                faiss.downcast_index(index.quantizer).hnsw.efSearch = max(64, 2 * s.nprobe)
            else:
                faiss.downcast_index(index.index).hnsw.efSearch = max(s.ef_search, s.tokens_per_query_token)
            d, i = _single_thread_faiss(index.search, query, min(s.tokens_per_query_token, index.ntotal))
            sims.append(d)
            labels.append(i)
        sims, labels = np.concatenate(sims, axis=1), np.concatenate(labels, axis=1)
        valid = labels >= 0
        # A page a query token did not reach scores at most that token's worst returned similarity.
        floor = np.where(valid, sims, np.inf).min(axis=1)
        floor[~np.isfinite(floor)] = 0.0
        token_rows = np.broadcast_to(np.arange(n_tok)[:, None], labels.shape)[valid]
        pages, page_index = np.unique(labels[valid], return_inverse=True)
        positions = np.array([snap.position.get(int(p), -1) for p in pages], dtype=np.int64)
        approx = np.repeat(floor[:, None], len(pages), axis=1)
        np.maximum.at(approx, (token_rows, page_index), sims[valid])
        keep = positions >= 0  # stale labels: deleted pages and superseded versions
        if allowed is not None:
            keep &= np.isin(positions, allowed)
        return self._rerank(query, k, positions[keep], approx[:, keep].sum(axis=0))

    def _rerank(self, query: np.ndarray, k: int, positions: np.ndarray, approx_scores: np.ndarray) -> list[tuple[int, float]]:
        """Score the ``rerank`` best candidates by approximate score exactly (from the stored vectors)."""
        snap, s = self._snapshot, self.settings
        if len(positions) == 0:
            return []
        best, _ = top_k(approx_scores, max(s.rerank, k))
        candidates = positions[best]
        exact = self._score_positions([query], candidates)[0]
        best, values = top_k(exact, k)
        return [(int(snap.page_ids[candidates[b]]), float(v)) for b, v in zip(best, values, strict=True)]

    # ---- writing -------------------------------------------------------------------------------

    def add(self, items: Iterable[tuple[PageRecord | Mapping, Any]]) -> list[int]:
        """Add pages given as ``(record, token_vectors (n, dim))`` pairs; returns their new ids.

        Ids are never reused or renumbered. Vectors are pooled (``pool_factor``) here and stored in
        the index's storage format at commit."""
        staged = []
        for record, vectors in items:
            record = record if isinstance(record, PageRecord) else PageRecord.model_validate(dict(record))
            staged.append((record, self._prepare_vectors(vectors, record)))
        with self._mutex:
            self._take_write_lock()
            ids = []
            for record, vectors in staged:
                page_id = self._next_page_id
                self._next_page_id += 1
                self._pending_adds.append((page_id, record, vectors))
                ids.append(page_id)
            if self.autocommit:
                self.commit()
            return ids

    def delete(self, page_ids: Iterable[int]) -> None:
        """Remove pages; the ids of all other pages stay as they are."""
        with self._mutex:
            self._take_write_lock()
            page_ids = [int(p) for p in page_ids]
            pending_ids = {p for p, _, _ in self._pending_adds}
            missing = [p for p in page_ids if p not in self._snapshot.position and p not in pending_ids]
            if missing:
                raise PageNotFoundError(f"cannot delete pages {missing}: no such pages in {self.directory}")
            for pid in page_ids:
                pending = [i for i, (p, _, _) in enumerate(self._pending_adds) if p == pid]
                if pending:
                    del self._pending_adds[pending[0]]
                    continue
                self._pending_deletes.add(pid)
                self._pending_records.pop(pid, None)
            if self.autocommit:
                self.commit()

    def update(self, page_id: int, record: PageRecord | Mapping | None = None, vectors=None, **fields) -> None:
        """Change a page's record (whole ``record`` or some ``fields``) and/or its ``vectors``; its id stays."""
        with self._mutex:
            self._take_write_lock()
            pid = int(page_id)
            current = self._pending_records.get(pid)
            if current is None:
                current = PageRecord(**self.get(pid).model_dump(exclude={"page_id", "n_tokens"}))
            if record is not None:
                current = record if isinstance(record, PageRecord) else PageRecord.model_validate(dict(record))
            if fields:
                current = PageRecord.model_validate({**current.model_dump(), **fields})
            if vectors is not None:
                self._pending_deletes.add(pid)
                self._pending_records.pop(pid, None)
                self._pending_adds.append((pid, current, self._prepare_vectors(vectors, current)))
            else:
                self._pending_records[pid] = current
            if self.autocommit:
                self.commit()

    def _prepare_vectors(self, vectors, record: PageRecord) -> np.ndarray:
        array = _as_float32(vectors)
        if array.ndim != 2 or array.shape[1] != self.dim or array.shape[0] == 0:
            raise IndexSettingsError(
                f"page {record.document_id!r} p.{record.page_number}: vectors of shape {tuple(array.shape)}; "
                f"this index stores non-empty (n_tokens, {self.dim}) matrices"
            )
        pooled = pool_tokens(array, self.settings.pool_factor)
        # Held until commit in the precision it will be stored in (codecs lose far more than fp16).
        return pooled if self.settings.storage == "fp32" else pooled.astype(np.float16)

    def lock_for_writing(self) -> None:
        """Become this index's one writer now (not at the first change): take the write lock, which this
        handle holds until :meth:`close`, and read the latest committed state. Raises
        :class:`IndexLockedError` when another process (or another handle) is writing."""
        with self._mutex:
            self._take_write_lock()

    @contextmanager
    def transaction(self) -> Iterator[Index]:
        """Read, decide and change as one step: inside the block this handle holds the write lock (no
        other process writes) and its mutex (no other thread of this process uses the handle), so what is
        read there is still true when the changes made there are committed, together, at its end.
        An exception in the block discards the changes made in it."""
        with self._mutex:
            self._take_write_lock()
            autocommit, self.autocommit = self.autocommit, False
            staged = (list(self._pending_adds), set(self._pending_deletes), dict(self._pending_records),
                      self._next_page_id)
            try:
                yield self
            except BaseException:
                self._pending_adds, self._pending_deletes, self._pending_records, self._next_page_id = staged
                raise
            else:
                self.commit()
            finally:
                self.autocommit = autocommit

    def _take_write_lock(self) -> None:
        if self._lock_file is not None:
            return
        self._lock_file = _acquire_lock(self.directory)
        # We are the only writer now: undo what a killed writer left behind, then read the latest state.
        manifest = _read_manifest(self.directory)
        with self._db:
            self._db.execute("DELETE FROM pages WHERE added_gen > ?", (manifest.generation,))
            self._db.execute("UPDATE pages SET deleted_gen = NULL WHERE deleted_gen > ?", (manifest.generation,))
        _remove_unreferenced(self.directory, manifest)
        for leftover in self.directory.glob("manifest.json.tmp-*"):
            leftover.unlink(missing_ok=True)
        self._load(manifest)
        self._next_page_id = max(self._next_page_id, manifest.next_page_id)

    def save(self) -> None:
        """Commit pending changes (same as :meth:`commit`)."""
        self.commit()

    def commit(self) -> None:
        """Make all pending changes durable and visible, atomically."""
        with self._mutex:
            if not (self._pending_adds or self._pending_deletes or self._pending_records):
                return
            self._take_write_lock()
            old = self._snapshot.manifest
            gen = old.generation + 1
            manifest = old.model_copy(deep=True)
            manifest.generation = gen
            manifest.next_page_id = self._next_page_id
            new_rows: list[tuple] = []
            if self._pending_adds:
                self._write_segment(manifest, self._pending_adds, new_rows, f"seg-{gen:08d}")
            for pid, record in self._pending_records.items():
                pos = self._snapshot.position[pid]
                new_rows.append((pid, record, self._snapshot.segment_names[pos], int(self._snapshot.offsets[pos]),
                                 int(self._snapshot.lengths[pos])))
            superseded = set(self._pending_deletes) | set(self._pending_records)
            live = (set(self._snapshot.position) - superseded) | {row[0] for row in new_rows}
            self._maybe_build_ann(manifest, len(live), new_rows)
            self._publish(old, manifest, new_rows, superseded)
            self._pending_adds.clear()
            self._pending_deletes.clear()
            self._pending_records.clear()
            if len(self._snapshot.manifest.segments) > MAX_SEGMENTS:
                self.compact()

    def compact(self) -> None:
        """Merge all segments into one, dropping deleted and superseded vectors."""
        with self._mutex:
            self._take_write_lock()
            if self._pending_adds or self._pending_deletes or self._pending_records:
                self.commit()
            snap = self._snapshot
            old = snap.manifest
            if len(old.segments) <= 1 and len(snap.page_ids) == sum(s.n_pages for s in old.segments):
                return
            gen = old.generation + 1
            manifest = old.model_copy(deep=True)
            manifest.generation = gen
            manifest.segments = []
            records = self._records(snap.page_ids)
            positions = np.arange(len(snap.page_ids))
            stored_parts, rows, offset = [], [], 0
            for cols, _seg, stored, local in self._chunks(snap, positions, 1 << 20):
                stored_parts.append(np.asarray(stored))
                for c, start, n in zip(cols, local[:-1], np.diff(local), strict=True):
                    pid = int(snap.page_ids[c])
                    rec = records[pid]
                    rows.append((pid, PageRecord(**rec.model_dump(exclude={"page_id", "n_tokens"})), offset + int(start), int(n)))
                offset += int(local[-1])
            new_rows = []
            if stored_parts:
                name = f"seg-{gen:08d}"
                stored = np.concatenate(stored_parts)
                _save_npy(self.directory / "data" / f"{name}.npy", stored)
                info = SegmentInfo(name=name, vector_file=f"{name}.npy", n_tokens=len(stored), n_pages=len(rows))
                if old.settings.storage == "plaid":
                    info.ann_file = self._write_postings(name, stored, rows)
                elif old.ann_template_file:
                    info.ann_file = self._write_ann(name, stored, rows)
                manifest.segments.append(info)
                new_rows = [(pid, rec, name, off, n) for pid, rec, off, n in rows]
            self._publish(old, manifest, new_rows, {int(p) for p in snap.page_ids})

    def _write_segment(self, manifest: Manifest, adds, new_rows: list, name: str) -> None:
        vectors = np.concatenate([v for _, _, v in adds])
        if manifest.settings.storage in CODEC_STORAGES and manifest.codec_file is None:
            manifest.codec_file = self._train_codec(vectors, manifest.generation)
        stored = self._encode(vectors, manifest)
        _save_npy(self.directory / "data" / f"{name}.npy", stored)
        info = SegmentInfo(name=name, vector_file=f"{name}.npy", n_tokens=len(stored), n_pages=len(adds))
        offset = 0
        rows = []
        for pid, record, v in adds:
            rows.append((pid, record, offset, len(v)))
            offset += len(v)
        if manifest.settings.storage == "plaid":
            info.ann_file = self._write_postings(name, stored, rows)
        elif manifest.ann_template_file:
            info.ann_file = self._write_ann(name, stored, rows)
        manifest.segments.append(info)
        new_rows.extend((pid, rec, name, off, n) for pid, rec, off, n in rows)

    def _encode(self, vectors: np.ndarray, manifest: Manifest) -> np.ndarray:
        storage = manifest.settings.storage
        if storage == "fp16":
            return vectors.astype(np.float16)
        if storage == "fp32":
            return vectors.astype(np.float32)
        if storage == "plaid":
            return self._codec.sa_encode(vectors)  # converts block by block (no fp32 copy of the whole segment)
        return self._codec.sa_encode(np.ascontiguousarray(vectors, dtype=np.float32))

    def _train_codec(self, vectors: np.ndarray, gen: int) -> str:
        s = self.settings
        if s.storage == "plaid":
            try:
                codec = PlaidCodec.train(vectors, s.plaid_nbits, s.plaid_centroids)
            except PlaidSettingsError as exc:
                raise IndexSettingsError(f"storage='plaid': {exc}") from None
            name = f"codec-{gen:08d}.npz"
            codec.save(self.directory / "data" / name)
            self._codec, self._codec_name = codec, name
            return name
        if s.storage == "sq8":
            codec = faiss.index_factory(self.dim, "SQ8", faiss.METRIC_INNER_PRODUCT)
            needed = 1
        else:
            if self.dim % s.pq_m:
                raise IndexSettingsError(f"pq_m={s.pq_m} must divide the vector dimension {self.dim}")
            # Residual PQ: a token is stored as its nearest coarse centroid + PQ code of the rest. Measured
            # on the benchmark corpus (1,500 pages): relative error 0.23 vs 0.31 for plain PQ32 and
            # recall@10 of exact search 0.99 vs 0.955, for 2 more bytes per token.
            coarse = max(1, min(s.pq_coarse, len(vectors) // 39))
            codec = faiss.index_factory(self.dim, f"IVF{coarse},PQ{s.pq_m}x8", faiss.METRIC_INNER_PRODUCT)
            needed = 4 * 256
        if len(vectors) < needed:
            raise IndexSettingsError(
                f"storage={s.storage!r} trains its codec on the first pages added and needs at least {needed} "
                f"token vectors; the first add has {len(vectors)}. Add more pages at once or use fp16 storage"
            )
        rng = np.random.default_rng(0)
        sample = vectors if len(vectors) <= 65536 else vectors[np.sort(rng.choice(len(vectors), 65536, replace=False))]
        sample = np.ascontiguousarray(sample, dtype=np.float32)
        if s.storage == "pq":
            _train_ivfpq(codec, sample)
        else:
            codec.train(sample)
        name = f"codec-{gen:08d}.faiss"
        _write_faiss(self.directory / "data" / name, codec)
        self._codec, self._codec_name = codec, name
        return name

    def _maybe_build_ann(self, manifest: Manifest, n_pages: int, new_rows: list) -> None:
        """Train the token index once the collection is large enough, and index every segment without one."""
        s = manifest.settings
        if s.ann == "exact" or manifest.ann_template_file or s.storage == "plaid":  # PLAID: postings per segment
            return
        if s.ann == "auto" and n_pages < s.exact_below_pages:
            return
        total_tokens = sum(info.n_tokens for info in manifest.segments)
        if s.ann == "ivf" and total_tokens < 1024:
            return  # too few vectors to train an IVF; stays exact until there are more
        if s.ann == "hnsw":
            template = faiss.index_factory(self.dim, f"IDMap,HNSW{s.hnsw_m}", faiss.METRIC_INNER_PRODUCT)
        else:
            nlist = s.nlist or int(min(4096, max(16, 2 ** round(math.log2(math.sqrt(total_tokens))))))
            nlist = min(nlist, total_tokens // 39)  # FAISS wants >= 39 training points per list
            template = faiss.index_factory(
                self.dim, f"IVF{nlist}_HNSW32,PQ{s.ann_pq_m}", faiss.METRIC_INNER_PRODUCT
            )
            _train_ivfpq(template, self._training_sample(manifest, max(64 * nlist, 16384)))
        name = f"ann-{manifest.generation:08d}.faiss"
        _write_faiss(self.directory / "data" / name, template)
        self._ann_template = template
        manifest.ann_template_file = name
        # Index the vectors of every segment (pages not live any more are indexed too and filtered at
        # search; compaction drops them).
        for info in manifest.segments:
            if info.ann_file:
                continue
            rows = [(pid, None, off, n) for pid, _, seg, off, n in new_rows if seg == info.name]
            rows += self._db.execute(
                "SELECT page_id, NULL, token_offset, n_tokens FROM pages WHERE segment = ? AND added_gen <= ?",
                (info.name, self.generation),
            ).fetchall()
            info.ann_file = self._write_ann(f"{info.name}.g{manifest.generation:08d}", self._stored_of(info), rows)

    def _stored_of(self, info: SegmentInfo) -> np.ndarray:
        return np.load(self.directory / "data" / info.vector_file, mmap_mode="r", allow_pickle=False)

    def _training_sample(self, manifest: Manifest, max_points: int) -> np.ndarray:
        rng = np.random.default_rng(0)
        parts = []
        total = sum(info.n_tokens for info in manifest.segments)
        for info in manifest.segments:
            stored = self._stored_of(info)
            take = min(len(stored), max(1, int(max_points * len(stored) / total)))
            rows = np.sort(rng.choice(len(stored), take, replace=False))
            parts.append(self._decode(np.asarray(stored[rows])))
        return np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def _write_postings(self, name: str, stored: np.ndarray, rows) -> str:
        """PLAID token index of a segment: centroid -> recorded pages with a token there."""
        token_pages = np.full(len(stored), -1, dtype=np.int64)
        for pid, _, off, n in rows:
            token_pages[off : off + n] = pid
        postings = Postings.build(self._codec.centroid_ids(stored), token_pages, self._codec.n_centroids)
        file_name = f"{name}.postings.npz"
        postings.save(self.directory / "data" / file_name)
        return file_name

    def _write_ann(self, name: str, stored: np.ndarray, rows) -> str:
        """FAISS token index of a segment's stored vectors; tokens of pages no longer recorded are left out."""
        template = self._ann_template
        if template is None:
            template = faiss.read_index(str(self.directory / "data" / self.manifest.ann_template_file))
            self._ann_template = template
        index = faiss.clone_index(template)
        ids = np.full(len(stored), -1, dtype=np.int64)
        for pid, _, off, n in rows:
            ids[off : off + n] = pid
        step = 1 << 18
        for start in range(0, len(stored), step):  # bounded fp32 working memory
            part_ids = ids[start : start + step]
            keep = part_ids >= 0
            vectors = self._decode(np.asarray(stored[start : start + step])[keep])
            index.add_with_ids(np.ascontiguousarray(vectors, dtype=np.float32), part_ids[keep])
        file_name = f"{name}.ivf"
        _write_faiss(self.directory / "data" / file_name, index)
        return file_name

    def _publish(self, old: Manifest, manifest: Manifest, new_rows: list, superseded: set[int]) -> None:
        gen = manifest.generation
        live_files = _referenced_files(manifest)
        manifest.retired_files = sorted(_referenced_files(old) - live_files)
        with self._db:  # one SQLite transaction; invisible to readers until the manifest says `gen`
            if superseded:
                self._db.executemany(
                    "UPDATE pages SET deleted_gen = ? WHERE page_id = ? AND deleted_gen IS NULL",
                    [(gen, pid) for pid in superseded],
                )
            self._db.executemany(
                "INSERT INTO pages (page_id, added_gen, deleted_gen, document_id, page_number, source_path, "
                "content_hash, metadata, segment, token_offset, n_tokens) VALUES (?,?,NULL,?,?,?,?,?,?,?,?)",
                [
                    (pid, gen, rec.document_id, rec.page_number, rec.source_path, rec.content_hash,
                     json.dumps(rec.metadata, sort_keys=True), seg, off, n)
                    for pid, rec, seg, off, n in new_rows
                ],
            )
        _write_manifest(self.directory, manifest)  # the commit point
        # Old row versions are invisible now; readers of the previous generation re-read on a miss.
        with self._db:
            self._db.execute("DELETE FROM pages WHERE deleted_gen IS NOT NULL AND deleted_gen < ?", (gen,))
        _remove_unreferenced(self.directory, manifest)
        self._load(manifest)


_SEARCH_KNOBS = ("exact_below_pages", "nprobe", "ef_search", "tokens_per_query_token", "rerank")


def _set_pq_codebooks(pq, points: np.ndarray) -> None:
    """Train a FAISS ProductQuantizer's 2^nbits centroids per sub-space with :func:`kmeans`."""
    books = [
        kmeans(points[:, m * pq.dsub : (m + 1) * pq.dsub], pq.ksub, seed=m) for m in range(pq.M)
    ]
    faiss.copy_array_to_vector(np.ascontiguousarray(np.stack(books), dtype=np.float32).ravel(), pq.centroids)


def _train_ivfpq(index, points: np.ndarray) -> None:
    """Train an IVF-PQ token index: spherical k-means lists (unit centroids, so inner-product and L2
    assignment agree for unit token vectors), then PQ codebooks on the residuals."""
    centroids = kmeans(points, index.nlist)
    centroids /= np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    index.quantizer.add(centroids)
    index.quantizer.is_trained = True
    _, assign = index.quantizer.search(points, 1)
    _set_pq_codebooks(index.pq, points - centroids[assign[:, 0]])
    index.is_trained = True


def _single_thread_faiss(fn, *args):
    """Run a FAISS call on one OpenMP thread: a 20-token query is too little work to share between
    threads (measured several times faster on one thread on the shared 2-core machine)."""
    threads = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    try:
        return fn(*args)
    finally:
        faiss.omp_set_num_threads(threads)


def _as_float32(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.float32).numpy()
    return np.asarray(x, dtype=np.float32)


def _referenced_files(manifest: Manifest) -> set[str]:
    files = {f for info in manifest.segments for f in (info.vector_file, info.ann_file) if f}
    files.update(f for f in (manifest.codec_file, manifest.ann_template_file) if f)
    return files


def _remove_unreferenced(directory: Path, manifest: Manifest) -> None:
    """Delete data files neither the committed manifest uses nor readers of the previous one may still open."""
    keep = _referenced_files(manifest) | set(manifest.retired_files)
    for path in (directory / "data").iterdir():
        if path.name not in keep:
            path.unlink(missing_ok=True)


def _write_manifest(directory: Path, manifest: Manifest) -> None:
    tmp = directory / f"manifest.json.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(manifest.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / "manifest.json")
    _fsync_dir(directory)


def _acquire_lock(directory: Path):
    lock = open(directory / "LOCK", "a+")
    try:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise IndexLockedError(
            f"index {directory} is being written by another process; wait for it to finish (searching is fine)"
        ) from None
    return lock
