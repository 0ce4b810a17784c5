"""A page collection split into N shard indexes, searched as one (in this process; over Ray actors in
:mod:`vision_rag.ray_shards`).

On disk a sharded collection is a directory::

    shards.json      format name + version, number of shards, model id, vector dimension
    shard-000/       an ordinary :class:`~vision_rag.index.Index` (its own manifest, SQLite, segments)
    shard-001/ ...
    embedder.json    the model that built it (written by ``gemma-ground index``)

Page ids are global and name their shard: page ``g`` lives in shard ``g % N`` under that shard's own id
``g // N`` (:func:`split_page_id`), so a delete, an update or a lookup goes to one shard without a
directory of pages. A directory holding one plain index is a collection of one shard (``g`` = its id).

New pages of a document go to the shard that already holds the document, else to the shard with the
fewest pages: all pages of one file live in one shard, so replacing a file's pages (delete old + add
new) is one atomic commit of one shard, as in a single index. :meth:`ShardedIndex.transaction` opens a
transaction on every shard and commits them one after another: each file's change is atomic, a set of
files is not (a crash between two shard commits keeps the files of the committed shards).

Search asks every shard for its best ``k`` pages and keeps the best ``k`` of those (:func:`merge_hits`).
In exact mode that is exactly the single-index answer: a page in the global top ``k`` is in its own
shard's top ``k``. In approximate mode each shard reranks its own candidates (``rerank`` per shard
instead of in total), so recall is, in practice, no lower than the single index's (measured in the
tests and ``benchmarks/bench_scale.py``).
"""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, Field

from .index import (
    Hit,
    Index,
    IndexFormatError,
    IndexSettings,
    IndexSettingsError,
    Page,
    PageNotFoundError,
    PageRecord,
    SearchFilter,
    VisionIndexError,
    _as_float32,
)

LAYOUT_FILE = "shards.json"
LAYOUT_FORMAT = "gemma-grounding.sharded-index"
LAYOUT_VERSION = 1


class ShardUnavailableError(VisionIndexError):
    """A shard needed to answer did not answer (its actor is down or restarting, or timed out)."""

    def __init__(self, message: str, shards: Sequence[int] = ()):
        super().__init__(message)
        self.shards = sorted(shards)


class ShardLayout(BaseModel):
    """``shards.json``: what makes a directory a sharded collection."""

    format: Literal["gemma-grounding.sharded-index"] = LAYOUT_FORMAT
    format_version: int = LAYOUT_VERSION
    shards: int = Field(ge=1)
    model_id: str
    dim: int


class ShardedHits(list):
    """The hits of one query over a sharded collection, best first (a ``list[Hit]``, as
    :meth:`Index.search` returns), plus which shards answered: ``missing_shards`` lists the shards that
    did not, so a partial answer is never mistaken for a whole one."""

    def __init__(self, hits: Iterable[Hit] = (), *, shards: int = 1, missing_shards: Sequence[int] = ()):
        super().__init__(hits)
        self.shards = shards
        self.missing_shards = sorted(missing_shards)

    @property
    def complete(self) -> bool:
        return not self.missing_shards

    def __repr__(self) -> str:
        return f"ShardedHits({list.__repr__(self)}, shards={self.shards}, missing_shards={self.missing_shards})"


# --------------------------------------------------------------------------------------------------
# Page ids and the layout


def global_page_id(local_id: int, shard: int, n_shards: int) -> int:
    return int(local_id) * n_shards + shard


def split_page_id(page_id: int, n_shards: int) -> tuple[int, int]:
    """``(shard, id within the shard)`` of a global page id."""
    page_id = int(page_id)
    if page_id < 0:
        raise PageNotFoundError(f"page ids are >= 0, got {page_id}")
    return page_id % n_shards, page_id // n_shards


def shard_directory(directory: str | os.PathLike, shard: int) -> Path:
    return Path(directory) / f"shard-{shard:03d}"


def read_layout(directory: str | os.PathLike) -> ShardLayout | None:
    """The layout of a sharded collection, ``None`` for a plain index directory (one shard)."""
    path = Path(directory) / LAYOUT_FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise IndexFormatError(f"{path} is not readable JSON ({exc}); this is not a usable sharded index") from exc
    if raw.get("format") != LAYOUT_FORMAT:
        raise IndexFormatError(f"{path} is not a gemma-grounding sharded index layout")
    if raw.get("format_version", 0) > LAYOUT_VERSION:
        raise IndexFormatError(f"{path} uses sharded layout version {raw['format_version']}, newer than this "
                               f"version reads ({LAYOUT_VERSION}); upgrade gemma-grounding")
    return ShardLayout.model_validate(raw)


def shard_directories(directory: str | os.PathLike, shards: int | None = None) -> list[Path]:
    """The index directory of every shard of the collection in ``directory`` (a plain index: itself).
    ``shards``, if given, must equal the collection's number of shards."""
    directory = Path(directory)
    layout = read_layout(directory)
    if layout is None:
        if not (directory / "manifest.json").is_file():
            raise IndexFormatError(f"{directory} holds no index (neither {LAYOUT_FILE} nor manifest.json)")
        found = [directory]
    else:
        found = [shard_directory(directory, s) for s in range(layout.shards)]
    if shards is not None and shards != len(found):
        raise IndexSettingsError(
            f"{directory} holds {'a single index' if layout is None else f'{layout.shards} shards'}, not {shards} "
            f"shards; build a {shards}-shard collection with `gemma-ground index --shards {shards}` into a new directory"
        )
    return found


def _write_layout(directory: Path, layout: ShardLayout) -> None:
    tmp = directory / f"{LAYOUT_FILE}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(layout.model_dump_json(indent=2))
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, directory / LAYOUT_FILE)
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------------
# Results


def relabel_hit(hit: Hit, shard: int, n_shards: int) -> Hit:
    """A shard's hit with its page id turned into the global one."""
    page_id = global_page_id(hit.page_id, shard, n_shards)
    return hit.model_copy(update={"page_id": page_id, "page": relabel_page(hit.page, shard, n_shards)})


def relabel_page(page: Page, shard: int, n_shards: int) -> Page:
    return page.model_copy(update={"page_id": global_page_id(page.page_id, shard, n_shards)})


def merge_hits(per_shard: Iterable[Sequence[Hit]], k: int) -> list[Hit]:
    """The best ``k`` of the shards' hits (global ids), best first; equal scores: lower page id first."""
    return sorted((h for hits in per_shard for h in hits), key=lambda h: (-h.score, h.page_id))[:k]


def shard_filter(filter: SearchFilter | Mapping | None, shard: int, n_shards: int) -> SearchFilter | None:
    """The filter a shard applies: the same conditions, with global ``page_ids`` turned into its own
    (``page_ids=[]`` when none of them is in this shard)."""
    if filter is None:
        return None
    f = filter if isinstance(filter, SearchFilter) else SearchFilter.model_validate(dict(filter))
    if f.page_ids is None:
        return f
    local = [split_page_id(p, n_shards)[1] for p in f.page_ids if int(p) >= 0 and int(p) % n_shards == shard]
    return f.model_copy(update={"page_ids": local})


def as_query_list(queries, dim: int) -> tuple[bool, list[np.ndarray]]:
    """``(single, [fp32 (Lq, dim) arrays])`` for one query matrix or a list of them (shapes checked)."""
    single = isinstance(queries, (torch.Tensor, np.ndarray)) and queries.ndim == 2
    query_list = [_as_float32(q) for q in ([queries] if single else list(queries))]
    for q in query_list:
        if q.ndim != 2 or q.shape[1] != dim or q.shape[0] == 0:
            raise IndexSettingsError(f"query of shape {tuple(q.shape)}; expected (n_tokens, {dim})")
    return single, query_list


# --------------------------------------------------------------------------------------------------
# The collection


class ShardedIndex:
    """N shard indexes in one directory, used like one :class:`Index` (page ids are global). Use
    :meth:`open`."""

    def __init__(self, directory: Path, shards: list[Index], sharded: bool):
        self.directory = directory
        self.shards = shards
        self.sharded = sharded  # False: a plain index directory opened as one shard
        self._pending_pages = [0] * len(shards)  # pages added but not committed, per shard (for routing)
        self._pending_routes: dict[str, int] = {}  # document id -> shard, of documents added but not committed

    @classmethod
    def open(cls, directory: str | os.PathLike, *, create: bool = False, shards: int | None = None,
             model_id: str | None = None, dim: int | None = None, autocommit: bool = True,
             **settings: Any) -> ShardedIndex:
        """Open the collection in ``directory`` (a sharded one, or a plain index as one shard); with
        ``create=True`` make a new one of ``shards`` shards if there is none. ``model_id``, ``dim`` and the
        index ``settings`` are checked against (or, when creating, given to) every shard, as
        :meth:`Index.open` does."""
        directory = Path(directory)
        if shards is not None and shards < 1:
            raise IndexSettingsError(f"shards must be >= 1, got {shards}")
        exists = (directory / LAYOUT_FILE).is_file() or (directory / "manifest.json").is_file()
        if not exists:
            if not create:
                raise IndexFormatError(f"{directory} holds no index; pass create=True (and shards=N) to make one")
            if not model_id:
                raise IndexSettingsError("a new sharded index needs model_id= (the embedding model that fills it)")
            _create(directory, shards or 1, model_id, dim or 128, settings)
        paths = shard_directories(directory, shards)
        layout = read_layout(directory)
        opened: list[Index] = []
        try:
            for path in paths:
                opened.append(Index.open(path, model_id=model_id, dim=dim, autocommit=autocommit, **settings))
        except BaseException:
            for index in opened:
                index.close()
            raise
        return cls(directory, opened, sharded=layout is not None)

    def close(self) -> None:
        errors = []
        for index in self.shards:
            try:
                index.close()
            except Exception as exc:  # close every shard; report the first failure
                errors.append(exc)
        if errors:
            raise errors[0]

    def __enter__(self) -> ShardedIndex:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- facts -------------------------------------------------------------------------------

    @property
    def n_shards(self) -> int:
        return len(self.shards)

    @property
    def model_id(self) -> str:
        return self.shards[0].model_id

    @property
    def dim(self) -> int:
        return self.shards[0].dim

    @property
    def settings(self) -> IndexSettings:
        return self.shards[0].settings

    @property
    def generation(self) -> int:
        """Changes whenever any shard commits (the sum of the shards' generations)."""
        return sum(index.generation for index in self.shards)

    def __len__(self) -> int:
        return sum(len(index) for index in self.shards)

    def shard_sizes(self) -> list[int]:
        return [len(index) for index in self.shards]

    def refresh(self) -> None:
        for index in self.shards:
            index.refresh()

    def page_ids(self) -> list[int]:
        n = self.n_shards
        return sorted(global_page_id(p, s, n) for s, index in enumerate(self.shards) for p in index.page_ids())

    # ---- reading -------------------------------------------------------------------------------

    def _owner(self, page_id: int) -> tuple[Index, int]:
        shard, local = split_page_id(page_id, self.n_shards)
        return self.shards[shard], local

    def get(self, page_id: int) -> Page:
        index, local = self._owner(page_id)
        try:
            return relabel_page(index.get(local), page_id % self.n_shards, self.n_shards)
        except PageNotFoundError:
            raise PageNotFoundError(f"no page with id {page_id} in index {self.directory}") from None

    def vectors(self, page_id: int) -> torch.Tensor:
        index, local = self._owner(page_id)
        try:
            return index.vectors(local)
        except PageNotFoundError:
            raise PageNotFoundError(f"no page with id {page_id} in index {self.directory}") from None

    def pages(self, document_id: str | None = None, source_path: str | None = None) -> list[Page]:
        n = self.n_shards
        found = [relabel_page(p, s, n) for s, index in enumerate(self.shards)
                 for p in index.pages(document_id=document_id, source_path=source_path)]
        return sorted(found, key=lambda p: p.page_id)

    def find_by_hash(self, content_hash: str) -> list[Page]:
        n = self.n_shards
        return sorted((relabel_page(p, s, n) for s, index in enumerate(self.shards)
                       for p in index.find_by_hash(content_hash)), key=lambda p: p.page_id)

    def search(self, queries, k: int = 10, filter: SearchFilter | Mapping | None = None, *,
               exact: bool | None = None):
        """:meth:`Index.search` over every shard: a :class:`ShardedHits` per query (a list of them for a
        list of queries), the best ``k`` pages of all shards, with global page ids."""
        single, query_list = as_query_list(queries, self.dim)
        n = self.n_shards
        per_shard = []
        for s, index in enumerate(self.shards):
            local_filter = shard_filter(filter, s, n)
            if local_filter is not None and local_filter.page_ids == []:
                per_shard.append([[] for _ in query_list])
                continue
            results = index.search(query_list, k=k, filter=local_filter, exact=exact)
            per_shard.append([[relabel_hit(h, s, n) for h in hits] for hits in results])
        merged = [ShardedHits(merge_hits((shard_hits[q] for shard_hits in per_shard), k), shards=n)
                  for q in range(len(query_list))]
        return merged[0] if single else merged

    # ---- writing -------------------------------------------------------------------------------

    def _route(self, document_id: str, loads: list[int]) -> int:
        """The shard of a document's new pages: the one holding the document, else the least loaded."""
        if document_id in self._pending_routes:
            return self._pending_routes[document_id]
        for s, index in enumerate(self.shards):
            if index.pages(document_id=document_id):
                return s
        return int(np.argmin(loads))

    def add(self, items: Iterable[tuple[PageRecord | Mapping, Any]]) -> list[int]:
        """:meth:`Index.add` with global ids; each document's pages go to one shard (see the module doc)."""
        n = self.n_shards
        loads = [size + pending for size, pending in zip(self.shard_sizes(), self._pending_pages, strict=True)]
        by_shard: dict[int, list[tuple[int, Any]]] = {}
        routed: dict[str, int] = {}
        for position, (record, vectors) in enumerate(items):
            record = record if isinstance(record, PageRecord) else PageRecord.model_validate(dict(record))
            shard = routed.get(record.document_id)
            if shard is None:
                shard = routed[record.document_id] = self._route(record.document_id, loads)
            loads[shard] += 1
            by_shard.setdefault(shard, []).append((position, (record, vectors)))
        ids: dict[int, int] = {}
        for shard, entries in by_shard.items():
            index = self.shards[shard]
            local_ids = index.add([item for _, item in entries])
            if not index.autocommit:
                self._pending_pages[shard] += len(local_ids)
                self._pending_routes.update((record.document_id, shard) for _, (record, _) in entries)
            for (position, _), local in zip(entries, local_ids, strict=True):
                ids[position] = global_page_id(local, shard, n)
        return [ids[i] for i in range(len(ids))]

    def delete(self, page_ids: Iterable[int]) -> None:
        """:meth:`Index.delete` by global ids (each shard deletes its own; checked before any is changed)."""
        by_shard: dict[int, list[int]] = {}
        for page_id in page_ids:
            shard, local = split_page_id(page_id, self.n_shards)
            by_shard.setdefault(shard, []).append(local)
        missing = []
        for shard, local_ids in by_shard.items():
            live = set(self.shards[shard].page_ids())
            missing += [global_page_id(p, shard, self.n_shards) for p in local_ids if p not in live]
        if missing:
            raise PageNotFoundError(f"cannot delete pages {sorted(missing)}: no such pages in {self.directory}")
        for shard, local_ids in by_shard.items():
            self.shards[shard].delete(local_ids)

    def update(self, page_id: int, record: PageRecord | Mapping | None = None, vectors=None, **fields) -> None:
        index, local = self._owner(page_id)
        index.update(local, record, vectors, **fields)

    def lock_for_writing(self) -> None:
        for index in self.shards:
            index.lock_for_writing()

    @contextmanager
    def transaction(self) -> Iterator[ShardedIndex]:
        """:meth:`Index.transaction` on every shard; at the end the shards commit one after another
        (atomic per shard, so per file; not across shards)."""
        with ExitStack() as stack:
            for index in self.shards:
                stack.enter_context(index.transaction())
            try:
                yield self
            finally:
                self._forget_pending()

    def commit(self) -> None:
        for index in self.shards:
            index.commit()
        self._forget_pending()

    def _forget_pending(self) -> None:
        self._pending_pages = [0] * self.n_shards
        self._pending_routes.clear()

    def save(self) -> None:
        self.commit()

    def compact(self) -> None:
        for index in self.shards:
            index.compact()


def _create(directory: Path, shards: int, model_id: str, dim: int, settings: Mapping[str, Any]) -> None:
    """Make the shard indexes, then write ``shards.json`` (the commit point) under a lock, so two
    creators agree on one layout."""
    directory.mkdir(parents=True, exist_ok=True)
    with open(directory / "LOCK", "a+") as lock:
        fcntl.flock(lock.fileno(), fcntl.LOCK_EX)
        if (directory / LAYOUT_FILE).is_file() or (directory / "manifest.json").is_file():
            return  # another creator finished first; the caller checks the shard count
        for s in range(shards):
            Index.open(shard_directory(directory, s), create=True, model_id=model_id, dim=dim, **settings).close()
        _write_layout(directory, ShardLayout(shards=shards, model_id=model_id, dim=dim))


def open_collection(directory: str | os.PathLike, *, shards: int | None = None, **options: Any) -> Index | ShardedIndex:
    """The index in ``directory``: a :class:`ShardedIndex` for a sharded collection (or when ``shards`` is
    given: one to create or to find), else an :class:`Index`. ``options``: those of ``open``."""
    if shards is not None or read_layout(directory) is not None:
        return ShardedIndex.open(directory, shards=shards, **options)
    return Index.open(directory, **options)
