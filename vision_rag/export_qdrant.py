"""Export an index (plain or sharded) to a Qdrant multi-vector collection (``gemma-ground export-qdrant``).

Each live page becomes one point: id = its page id, one named multi-vector (default ``"colpali"``: the
page's stored token vectors, decoded) compared with ``MaxSim`` over the ``Dot`` product, which is this
project's score exactly, and the page record as payload::

    {"page_id", "document_id", "page_number", "source_path", "content_hash", "n_tokens", "metadata": {...}}

``document_id``, ``source_path`` (keyword) and ``page_number`` (integer) get payload indexes, so
Qdrant filters on them as :class:`~vision_rag.index.SearchFilter` does here (``metadata.<key>`` for user
metadata). Vectors are stored as float16 when the index stores fp16 (the same values) and float32
otherwise. An export is an upsert by page id, so running it again updates the collection, and points
whose pages are gone from the index are deleted (``prune``).

Two targets: a Qdrant server (or Qdrant Cloud) through ``qdrant-client`` (:class:`QdrantClientTarget`),
and an embedded Qdrant Edge shard on disk through ``qdrant-edge-py`` (:class:`EdgeShardTarget`), the
same Rust engine in-process. Install either with ``pip install 'gemma-grounding[qdrant]'``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel

from .index import Index, IndexSettingsError, Page
from .sharded import ShardedIndex

DEFAULT_VECTOR_NAME = "colpali"
KEYWORD_FIELDS = ("document_id", "source_path")
INTEGER_FIELDS = ("page_number",)


class QdrantUnavailableError(RuntimeError):
    """The Qdrant package for this target is not installed."""


class ExportReport(BaseModel):
    target: str
    vector_name: str
    datatype: str  # float16 | float32
    points_written: int
    points_removed: int  # points of pages no longer in the index
    points_in_target: int


def page_payload(page: Page) -> dict[str, Any]:
    """The payload of a page's point: its record (user metadata nested under ``metadata``)."""
    return dict(page_id=page.page_id, document_id=page.document_id, page_number=page.page_number,
                source_path=page.source_path, content_hash=page.content_hash, n_tokens=page.n_tokens,
                metadata=dict(page.metadata))


class ExportTarget(Protocol):
    """Where points go (:class:`EdgeShardTarget`, :class:`QdrantClientTarget`)."""

    description: str

    def prepare(self, dim: int, datatype: str) -> None: ...
    def upsert(self, points: list[tuple[int, np.ndarray, dict]]) -> None: ...
    def point_ids(self) -> set[int]: ...
    def delete(self, ids: list[int]) -> None: ...
    def count(self) -> int: ...
    def finish(self) -> None: ...


def _qdrant_edge():
    try:
        import qdrant_edge
    except ImportError as exc:
        raise QdrantUnavailableError("exporting to a Qdrant Edge shard needs qdrant-edge-py: "
                                     "pip install 'gemma-grounding[qdrant]'") from exc
    return qdrant_edge


def _qdrant_client_models():
    try:
        from qdrant_client import models
    except ImportError as exc:
        raise QdrantUnavailableError("exporting to a Qdrant server needs qdrant-client: "
                                     "pip install 'gemma-grounding[qdrant]'") from exc
    return models


class EdgeShardTarget:
    """An embedded Qdrant Edge shard in ``path`` (created if missing), via ``qdrant-edge-py``."""

    def __init__(self, path: str | os.PathLike, vector_name: str = DEFAULT_VECTOR_NAME):
        self.path, self.vector_name = Path(path), vector_name
        self.description = f"qdrant-edge:{self.path}"
        self.shard = None

    def prepare(self, dim: int, datatype: str) -> None:
        q = _qdrant_edge()
        kind = q.VectorStorageDatatype.Float16 if datatype == "float16" else q.VectorStorageDatatype.Float32
        params = q.EdgeVectorParams(size=dim, distance=q.Distance.Dot, datatype=kind,
                                    multivector_config=q.MultiVectorConfig(q.MultiVectorComparator.MaxSim))
        config = q.EdgeConfig(vectors={self.vector_name: params})
        if (self.path / "edge_config.json").is_file():
            try:  # Qdrant checks the stored configuration against ours
                self.shard = q.EdgeShard.load(str(self.path), config)
            except Exception as exc:
                raise IndexSettingsError(f"the Qdrant Edge shard in {self.path} does not fit this index ({exc}); "
                                         "export into a new directory") from None
            return
        self.shard = q.EdgeShard.create(str(self.path), config)
        for name in KEYWORD_FIELDS:
            self.shard.update(q.UpdateOperation.create_field_index(name, q.PayloadSchemaType.Keyword))
        for name in INTEGER_FIELDS:
            self.shard.update(q.UpdateOperation.create_field_index(name, q.PayloadSchemaType.Integer))

    def upsert(self, points: list[tuple[int, np.ndarray, dict]]) -> None:
        q = _qdrant_edge()
        self.shard.update(q.UpdateOperation.upsert_points(
            [q.Point(pid, {self.vector_name: vectors}, payload) for pid, vectors, payload in points]))

    def point_ids(self) -> set[int]:
        q = _qdrant_edge()
        ids: set[int] = set()
        offset = None
        while True:
            records, offset = self.shard.scroll(q.ScrollRequest(offset=offset, limit=1024, with_payload=False,
                                                                with_vector=False))
            ids.update(int(r.id) for r in records)
            if offset is None:
                return ids

    def delete(self, ids: list[int]) -> None:
        self.shard.update(_qdrant_edge().UpdateOperation.delete_points(ids))

    def count(self) -> int:
        return int(self.shard.count(_qdrant_edge().CountRequest(exact=True)))

    def finish(self) -> None:
        self.shard.flush()
        self.shard.close()


class QdrantClientTarget:
    """A collection of a Qdrant server through ``qdrant-client`` (``QdrantClient(url=..., api_key=...)``;
    created if missing)."""

    def __init__(self, client, collection: str, vector_name: str = DEFAULT_VECTOR_NAME):
        self.client, self.collection, self.vector_name = client, collection, vector_name
        self.description = f"qdrant:{collection}"

    def prepare(self, dim: int, datatype: str) -> None:
        m = _qdrant_client_models()
        if self.client.collection_exists(self.collection):
            vectors = self.client.get_collection(self.collection).config.params.vectors
            if not isinstance(vectors, dict) or self.vector_name not in vectors:
                raise IndexSettingsError(f"Qdrant collection {self.collection!r} has no vector {self.vector_name!r}; "
                                         "export into a new collection")
            params = vectors[self.vector_name]
            if params.size != dim or params.multivector_config is None:
                raise IndexSettingsError(f"Qdrant collection {self.collection!r}: vector {self.vector_name!r} is not "
                                         f"a {dim}-dim multi-vector; export into a new collection")
            return
        self.client.create_collection(self.collection, vectors_config={self.vector_name: m.VectorParams(
            size=dim, distance=m.Distance.DOT, datatype=m.Datatype.FLOAT16 if datatype == "float16" else m.Datatype.FLOAT32,
            multivector_config=m.MultiVectorConfig(comparator=m.MultiVectorComparator.MAX_SIM))})
        for name in KEYWORD_FIELDS:
            self.client.create_payload_index(self.collection, name, m.PayloadSchemaType.KEYWORD)
        for name in INTEGER_FIELDS:
            self.client.create_payload_index(self.collection, name, m.PayloadSchemaType.INTEGER)

    def upsert(self, points: list[tuple[int, np.ndarray, dict]]) -> None:
        m = _qdrant_client_models()
        self.client.upsert(self.collection, wait=True, points=[
            m.PointStruct(id=pid, vector={self.vector_name: vectors.tolist()}, payload=payload)
            for pid, vectors, payload in points])

    def point_ids(self) -> set[int]:
        ids: set[int] = set()
        offset = None
        while True:
            records, offset = self.client.scroll(self.collection, limit=1024, offset=offset, with_payload=False,
                                                 with_vectors=False)
            ids.update(int(r.id) for r in records)
            if offset is None:
                return ids

    def delete(self, ids: list[int]) -> None:
        m = _qdrant_client_models()
        self.client.delete(self.collection, points_selector=m.PointIdsList(points=ids), wait=True)

    def count(self) -> int:
        return int(self.client.count(self.collection, exact=True).count)

    def finish(self) -> None:
        pass


def _pages_in_batches(index: Index | ShardedIndex, batch_pages: int) -> Iterator[list[Page]]:
    pages = index.pages()
    for start in range(0, len(pages), batch_pages):
        yield pages[start : start + batch_pages]


def export_to_qdrant(index: Index | ShardedIndex | str | os.PathLike, target: ExportTarget, *,
                     batch_pages: int = 64, prune: bool = True, datatype: str | None = None) -> ExportReport:
    """Write every live page of ``index`` (an opened index or a directory) into ``target`` as one point;
    with ``prune`` delete the target's points whose pages are gone. ``datatype``: ``"float16"`` or
    ``"float32"`` (default: float32 for fp32 storage, else float16)."""
    from .sharded import open_collection

    opened = None
    if isinstance(index, (str, os.PathLike)):
        index = opened = open_collection(index)
    try:
        storage = index.settings.storage
        datatype = datatype or ("float32" if storage == "fp32" else "float16")
        if datatype not in ("float16", "float32"):
            raise IndexSettingsError(f"datatype must be float16 or float32, got {datatype!r}")
        dtype = np.float16 if datatype == "float16" else np.float32
        target.prepare(index.dim, datatype)
        written, live = 0, set()
        for batch in _pages_in_batches(index, batch_pages):
            points = [(p.page_id, index.vectors(p.page_id).numpy().astype(dtype), page_payload(p)) for p in batch]
            target.upsert(points)
            written += len(points)
            live.update(p.page_id for p in batch)
        stale = sorted(target.point_ids() - live) if prune else []
        for start in range(0, len(stale), 1024):
            target.delete(stale[start : start + 1024])
        report = ExportReport(target=target.description, vector_name=getattr(target, "vector_name", ""),
                              datatype=datatype, points_written=written, points_removed=len(stale),
                              points_in_target=target.count())
        target.finish()
        return report
    finally:
        if opened is not None:
            opened.close()


def open_target(edge: str | os.PathLike | None = None, url: str | None = None, collection: str | None = None,
                vector_name: str = DEFAULT_VECTOR_NAME, api_key: str | None = None,
                timeout_s: float = 60.0) -> ExportTarget:
    """An Edge shard directory (``edge``) or a server collection (``url`` + ``collection``; ``api_key`` is
    sent to the server only, never printed)."""
    if (edge is None) == (url is None):
        raise IndexSettingsError("give one target: an Edge shard directory, or a Qdrant URL and a collection")
    if edge is not None:
        return EdgeShardTarget(edge, vector_name)
    if not collection:
        raise IndexSettingsError("a Qdrant server target needs a collection name")
    _qdrant_client_models()
    from qdrant_client import QdrantClient

    return QdrantClientTarget(QdrantClient(url=url, api_key=api_key, timeout=int(timeout_s)), collection, vector_name)
